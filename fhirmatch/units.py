"""Units of measure: UCUM parsing, lab-unit aliases and safe conversions.

Laboratory results arrive with UCUM codes (``mg/dL``, ``10*9/L``), with strings that merely look
like UCUM (``K/uL``, ``x10^9/L``, ``IU/mL``), or as free text in ``valueString`` (``"<0.5"``).
This module turns all of those into numbers that can be compared with a trial's thresholds.

How a unit string is read (:func:`parse_unit`):

1. the alias table ``mappings/units/aliases.csv`` (exact, case-sensitive match);
2. UCUM, case-sensitive, parsed by ``ucumvert``'s grammar into a pint quantity. Raw pint must not
   be used on UCUM: it reads ``10*9/L`` as arithmetic and ``pH`` as picohenry;
3. the alias table again, ignoring case, then ignoring case and whitespace.

UCUM codes are case-sensitive (``mg/dL`` vs ``Mg/dL``; ``K`` is kelvin; ``G`` is gauss): the
case-insensitive fallback only ever maps to entries of the alias table, never to a guessed UCUM
code.

Conversions (:func:`convert`, :func:`conversion_factor`) refuse, with :class:`UnitError`:

* unknown units and incompatible dimensions;
* anything listed in ``mappings/units/forbidden.json`` (IU <-> copies for viral loads; IU <-> U for
  enzymes unless the analyte says IU/L means U/L; arbitrary units);
* mass <-> molar without an analyte whose molar mass is in ``mappings/analytes.json``.

``[IU]`` (and ``[arb'U]``) get their own pint dimension here, so they are never silently
"dimensionless" and convertible to ``/mL``. UCUM annotations (``{cells}``, ``{1.73_m2}``) carry no
meaning in UCUM and are ignored, except ``{copies}``, which the forbidden-conversion rules see.

The registry is created once, lazily, under a lock; parsed units and conversion factors are
cached, so the hot path of :func:`convert` is one cached lookup and a multiplication.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fhirmatch import data
from fhirmatch.errors import DataFileError, UnitError

if TYPE_CHECKING:
    import pint

__all__ = [
    "AnalyteInfo",
    "ParsedValue",
    "analyte_info",
    "conversion_factor",
    "convert",
    "default_uln",
    "known_analytes",
    "mappings_dir",
    "normalise_unit",
    "parse_unit",
    "parse_value_string",
    "registry",
]

Comparator = Literal["<", "<=", ">", ">="]


def mappings_dir() -> Path:
    """Return the directory holding fhirmatch's mapping tables.

    ``$FHIRMATCH_MAPPINGS`` overrides the default, the bundled ``mappings/`` (inside the installed
    package, or the repository's top-level folder in a checkout). Same as
    :func:`fhirmatch.data.mappings_dir`.
    """
    return data.mappings_dir()


# --------------------------------------------------------------------------------------------
# Registry (one per process, built lazily)
# --------------------------------------------------------------------------------------------

# Lines replacing or extending ucumvert's definitions. International units and arbitrary units
# are UCUM "arbitrary units": not commensurable with anything, so each gets its own dimension.
_OWN_DEFINITIONS = {
    "international_unit": "international_unit = [international_unit] = _ = i.U. = IU = iU",
    "arbitrary_unit": "arbitrary_unit = [arbitrary_unit] = _ = arb_U",
}
_EXTRA_DEFINITIONS = ["pH_value = [pH] = _ = pH_level"]


class _Units:
    """The pint registry with UCUM definitions, the UCUM parser, and the mapping tables."""

    def __init__(self) -> None:
        import pint  # about a second to import and build: only when a unit is first needed
        import ucumvert

        defs_file = Path(ucumvert.__file__).resolve().parent / "pint_ucum_defs.txt"
        lines = []
        for line in defs_file.read_text(encoding="utf-8").splitlines():
            name = line.split("=", 1)[0].strip()
            lines.append(_OWN_DEFINITIONS.get(name, line))
        self.reg: pint.UnitRegistry = pint.UnitRegistry(cache_folder=None)
        self.reg.load_definitions(lines + _EXTRA_DEFINITIONS)
        self.parser = ucumvert.get_ucum_parser()
        self.transformer = ucumvert.UcumToPintTransformer(ureg=self.reg)
        self.lock = threading.RLock()
        base = mappings_dir()
        self.aliases = _read_table(_load_aliases, base / "units" / "aliases.csv")
        self.aliases_folded = {_fold(k): v for k, v in self.aliases.items()}
        self.rules = _read_table(_load_rules, base / "units" / "forbidden.json")
        self.analytes = _analytes_at(base / "analytes.json")
        self.parsed: dict[str, _ParsedUnit | UnitError] = {}


_T = TypeVar("_T")


def _read_table(loader: Callable[[Path], _T], path: Path) -> _T:
    """Read one mapping table; a missing, unreadable or malformed table is a
    :class:`DataFileError` naming the file (a configuration problem, not a unit problem)."""
    try:
        return loader(path)
    except OSError as exc:
        raise DataFileError(f"cannot read the mapping table {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, IndexError, StopIteration, csv.Error) as exc:
        reason = exc.reason if isinstance(exc, UnitError) else f"{type(exc).__name__}: {exc}"
        raise DataFileError(f"the mapping table {path} is malformed ({reason})") from None


_STATE: _Units | None = None
_STATE_LOCK = threading.Lock()


def _state() -> _Units:
    global _STATE
    state = _STATE
    if state is None:
        with _STATE_LOCK:
            if _STATE is None:
                _STATE = _Units()
            state = _STATE
    return state


def registry() -> pint.UnitRegistry:
    """Return fhirmatch's application pint registry (UCUM definitions loaded)."""
    return _state().reg


def _fold(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


def _load_aliases(path: Path) -> dict[str, str]:
    aliases: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(line for line in handle if not line.startswith("#"))
        header = next(rows)
        if header[:2] != ["alias", "ucum"]:
            raise UnitError(str(path), "alias table must start with the header 'alias,ucum,note'")
        for row in rows:
            if len(row) >= 2 and row[0].strip():
                aliases[row[0].strip()] = row[1].strip()
    return aliases


@dataclass(frozen=True)
class _Rule:
    kind_a: str
    kind_b: str
    reason: str
    unless_flag: str | None


def _load_rules(path: Path) -> list[_Rule]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        _Rule(r["between"][0], r["between"][1], r["reason"], r.get("unless_analyte_flag"))
        for r in data["rules"]
    ]


@dataclass(frozen=True)
class AnalyteInfo:
    """Facts about one analyte from ``mappings/analytes.json``.

    ``uln`` is the default adult upper limit of normal as ``(value, UCUM unit)``, or ``None``
    when the analyte is not judged against a ULN; ``uln_by_sex`` maps ``"male"``/``"female"`` to
    sex-specific defaults where the table has them; ``uln_source`` cites where the defaults come
    from.
    """

    code: str
    display: str
    loinc: tuple[str, ...]
    unit: str
    molar_mass_g_per_mol: float | None = None
    iu_is_enzyme_unit: bool = False
    uln: tuple[float, str] | None = None
    uln_by_sex: dict[str, tuple[float, str]] = field(default_factory=dict)
    uln_source: str = ""
    #: the largest value that is physiologically possible at all, in ``unit``: a larger one is
    #: a data error (wrong unit, a typo), not a result to compare
    plausible_max: float | None = None
    #: units of a separate measurement of the analyte that never converts to ``unit``
    #: (HBV DNA ``{copies}/mL`` besides ``[IU]/mL``)
    other_units: tuple[str, ...] = ()


def _analytes() -> dict[str, AnalyteInfo]:
    """The analyte table: the registry's once it is built, else read (once per location)
    without building the registry, which only unit conversions need."""
    state = _STATE
    if state is not None:
        return state.analytes
    # the engine asks for every lab result it checks: remember the table of the last location
    # (named by $FHIRMATCH_MAPPINGS, or the bundled one) rather than build its path each time
    global _LAST_ANALYTES
    override = os.environ.get("FHIRMATCH_MAPPINGS")
    last = _LAST_ANALYTES
    if last is not None and last[0] == override:
        return last[1]
    table = _analytes_at(mappings_dir() / "analytes.json")
    _LAST_ANALYTES = (override, table)
    return table


#: (the $FHIRMATCH_MAPPINGS it was read under, the analyte table) of the last look-up
_LAST_ANALYTES: tuple[str | None, dict[str, AnalyteInfo]] | None = None


@functools.lru_cache(maxsize=4)
def _analytes_at(path: Path) -> dict[str, AnalyteInfo]:
    return _read_table(_load_analytes, path)


def _load_analytes(path: Path) -> dict[str, AnalyteInfo]:
    data = json.loads(path.read_text(encoding="utf-8"))
    source = data.get("uln_source", "")
    out: dict[str, AnalyteInfo] = {}
    for code, entry in data["analytes"].items():
        uln = entry.get("uln")
        out[code] = AnalyteInfo(
            code=code,
            display=entry["display"],
            loinc=tuple(entry.get("loinc", ())),
            unit=entry["unit"],
            other_units=tuple(entry.get("other_units", ())),
            molar_mass_g_per_mol=entry.get("molar_mass_g_per_mol"),
            iu_is_enzyme_unit=bool(entry.get("iu_is_enzyme_unit", False)),
            uln=(float(uln["value"]), uln["unit"]) if uln else None,
            uln_by_sex={
                sex: (float(v["value"]), v["unit"])
                for sex, v in entry.get("uln_by_sex", {}).items()
            },
            uln_source=source,
            plausible_max=entry.get("plausible_max"),
        )
    return out


# --------------------------------------------------------------------------------------------
# Parsing units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedUnit:
    ucum: str  # canonical UCUM string
    magnitude: float  # numeric factor in the UCUM code (``1/1000000{Base}``), usually 1
    units: Any  # pint.Unit
    kinds: frozenset[str]


_COPIES = re.compile(r"\{\s*cop(?:y|ies)\b[^}]*\}", re.IGNORECASE)


def _kinds(ucum: str, units: Any) -> frozenset[str]:
    names = [str(name) for name in units._units]
    kinds = set()
    if any("international_unit" in n for n in names):
        kinds.add("international-unit")
    if any("enzyme_unit" in n or n.endswith("katal") for n in names):
        kinds.add("enzyme-unit")
    if any("arbitrary_unit" in n for n in names):
        kinds.add("arbitrary-unit")
    if _COPIES.search(ucum):
        kinds.add("copies")
    return frozenset(kinds)


def _parse_ucum(state: _Units, ucum: str) -> _ParsedUnit:
    """Parse a (case-sensitive) UCUM code; raise UnitError when it is not valid UCUM."""
    from lark.exceptions import LarkError
    from pint.errors import PintError

    try:
        with state.lock:
            result = state.transformer.transform(state.parser.parse(ucum))
    except (LarkError, PintError, AttributeError, TypeError, ValueError) as exc:
        raise UnitError(ucum, "not a known alias and not a valid UCUM code") from exc
    if not isinstance(result, state.reg.Quantity):
        # A bare annotation such as "{score}" means "1" (dimensionless).
        result = state.reg.Quantity(1, "dimensionless")
    magnitude = float(result.magnitude)
    if not math.isfinite(magnitude) or magnitude <= 0:
        raise UnitError(ucum, "unit has a non-positive numeric factor")
    return _ParsedUnit(ucum, magnitude, result.units, _kinds(ucum, result.units))


def _lookup(text: str) -> _ParsedUnit:
    if not isinstance(text, str):
        raise UnitError(repr(text), "unit must be a string")
    state = _state()
    cached = state.parsed.get(text)
    if cached is None:
        try:
            cached = _resolve(state, text)
        except UnitError as exc:
            cached = exc
        if len(state.parsed) > 10_000:
            state.parsed.clear()
        state.parsed[text] = cached
    if isinstance(cached, UnitError):
        raise UnitError(cached.unit, cached.reason)
    return cached


def _resolve(state: _Units, text: str) -> _ParsedUnit:
    stripped = text.strip()
    if not stripped:
        raise UnitError(text, "empty unit")
    alias = state.aliases.get(stripped)
    if alias is not None:
        return _parse_ucum(state, alias)
    try:
        return _parse_ucum(state, stripped)
    except UnitError:
        alias = state.aliases_folded.get(_fold(stripped))
        if alias is not None:
            return _parse_ucum(state, alias)
        raise UnitError(stripped, "not a known alias and not a valid UCUM code") from None


def parse_unit(text: str) -> pint.Unit:
    """Parse a unit string (alias table first, then UCUM) into a pint unit.

    A numeric factor in the code (``10*3/uL`` is a unit, ``1/1000000`` is a factor) is kept as
    a power of ten of the ``_10`` unit; other factors cannot be expressed as a pint unit and
    raise :class:`UnitError`. Raises :class:`UnitError` for empty or unknown units.
    """
    parsed = _lookup(text)
    if parsed.magnitude == 1:
        return parsed.units
    exponent = math.log10(parsed.magnitude)
    if abs(exponent - round(exponent)) > 1e-9:
        raise UnitError(text, "numeric factors other than powers of ten are not supported")
    return parsed.units * registry().Unit("_10") ** round(exponent)


def normalise_unit(text: str) -> str:
    """Return the canonical UCUM string for ``text`` (for display and for equality tests).

    ``"K/uL"`` -> ``"10*3/uL"``, ``"mg/dl"`` -> ``"mg/dL"``, ``" mmol/L "`` -> ``"mmol/L"``.
    Raises :class:`UnitError` for units that cannot be parsed.
    """
    known = _KNOWN_UCUM.get(text) if isinstance(text, str) else None
    if known is None:
        try:
            known = _lookup(text).ucum
        except UnitError as exc:
            known = exc
        if isinstance(text, str):
            _LEARNT_UCUM[text] = known
    if isinstance(known, UnitError):
        raise UnitError(known.unit, known.reason)
    return known


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------

_OFFSET = "offset"


def _check_rules(
    state: _Units, src: _ParsedUnit, dst: _ParsedUnit, info: AnalyteInfo | None, label: str
) -> None:
    for rule in state.rules:
        if rule.unless_flag and info is not None and getattr(info, rule.unless_flag, False):
            continue
        for one, other in ((src, dst), (dst, src)):
            if rule.kind_a not in one.kinds:
                continue
            if rule.kind_b == "*":
                hit = rule.kind_a not in other.kinds
            else:
                hit = rule.kind_b in other.kinds and rule.kind_b not in one.kinds
            if hit:
                raise UnitError(label, f"conversion forbidden: {rule.reason}")


def _compute_factor(from_unit: str, to_unit: str, analyte: str | None) -> float | UnitError | str:
    """Return the multiplicative factor, a UnitError to raise, or _OFFSET for offset units."""
    from pint.errors import PintError

    label = f"{from_unit} -> {to_unit}"
    try:
        src = _lookup(from_unit)
        dst = _lookup(to_unit)
        state = _state()
        info = _analyte(analyte) if analyte is not None else None
        _check_rules(state, src, dst, info, label)
        reg = state.reg
        with state.lock:
            quantity = reg.Quantity(src.magnitude, src.units)
            target = reg.Quantity(dst.magnitude, dst.units)
            if info is not None and info.iu_is_enzyme_unit and "international-unit" in src.kinds:
                quantity = quantity * _iu_as_enzyme(reg, src.units)
            if info is not None and info.iu_is_enzyme_unit and "international-unit" in dst.kinds:
                target = target * _iu_as_enzyme(reg, dst.units)
            ratio = (quantity / target).dimensionality if _multiplicative(quantity) else None
            if ratio is None or not _multiplicative(target):
                if quantity.dimensionality != target.dimensionality:
                    raise UnitError(label, "incompatible dimensions")
                return _OFFSET
            if ratio == {"[mass]": 1, "[substance]": -1} or ratio == {
                "[mass]": -1,
                "[substance]": 1,
            }:
                molar_mass = info.molar_mass_g_per_mol if info is not None else None
                if molar_mass is None:
                    raise UnitError(
                        label,
                        "mass <-> molar conversion needs an analyte with a molar mass "
                        f"(analyte {analyte!r} has none)",
                    )
                mass_per_mol = reg.Quantity(molar_mass, "g/mol")
                quantity = (
                    quantity / mass_per_mol
                    if "[mass]" in ratio and ratio["[mass]"] == 1
                    else quantity * mass_per_mol
                )
            elif ratio:
                raise UnitError(
                    label,
                    f"incompatible dimensions ({quantity.dimensionality} vs "
                    f"{target.dimensionality})",
                )
            factor = float((quantity / target).to("dimensionless").magnitude)
    except UnitError as exc:
        return exc
    except PintError as exc:
        return UnitError(label, f"cannot convert: {type(exc).__name__}")
    return factor


def _multiplicative(quantity: Any) -> bool:
    return bool(quantity._is_multiplicative)


def _iu_as_enzyme(reg: pint.UnitRegistry, units: Any) -> Any:
    """Factor that replaces every [IU] in ``units`` by the enzyme unit U (1 IU = 1 µmol/min)."""
    factor = reg.Quantity(1, "dimensionless")
    for name, power in units._units.items():
        if "international_unit" in str(name):
            factor = factor * (reg.Unit("enzyme_unit") / reg.Unit("international_unit")) ** power
    return factor


#: a conversion's outcome (factor, error, or offset) by ``(from unit, to unit, analyte)``
FactorKey = tuple[str, str, str | None]
Factor = float | UnitError | str
#: outcomes known without the registry (:func:`remember_factors`, e.g. from an earlier run)
_KNOWN: dict[FactorKey, Factor] = {}
#: outcomes this process computed with the registry
_LEARNT: dict[FactorKey, Factor] = {}
#: the same for :func:`normalise_unit`: canonical UCUM (or why there is none) by unit text
_KNOWN_UCUM: dict[str, str | UnitError] = {}
_LEARNT_UCUM: dict[str, str | UnitError] = {}


@functools.lru_cache(maxsize=4096)
def _cached_factor(from_unit: str, to_unit: str, analyte: str | None) -> Factor:
    key = (from_unit, to_unit, analyte)
    known = _KNOWN.get(key)
    if known is not None:
        return known
    outcome = _compute_factor(from_unit, to_unit, analyte)
    _LEARNT[key] = outcome
    return outcome


def remember_factors(known: dict[str, dict[Any, Any]]) -> None:
    """Outcomes of conversions (``"factors"``) and unit normalisations (``"ucum"``) computed
    earlier with the same unit definitions and mapping tables (the caller guarantees that): those
    then need no unit registry, whose construction takes about a second (see
    :mod:`fhirmatch.trialcache`)."""
    _KNOWN.update(known.get("factors", {}))
    _KNOWN_UCUM.update(known.get("ucum", {}))


def learnt_factors() -> dict[str, dict[Any, Any]]:
    """What :func:`remember_factors` takes: the outcomes known to this process, with the number
    computed here under ``"new"``."""
    return {
        "factors": {**_KNOWN, **_LEARNT},
        "ucum": {**_KNOWN_UCUM, **_LEARNT_UCUM},
        "new": {"count": len(_LEARNT) + len(_LEARNT_UCUM)},
    }


def _factor_or_raise(from_unit: str, to_unit: str, analyte: str | None) -> float | str:
    outcome = _cached_factor(from_unit, to_unit, analyte)
    if isinstance(outcome, UnitError):
        raise UnitError(outcome.unit, outcome.reason)
    return outcome


def conversion_factor(from_unit: str, to_unit: str, *, analyte: str | None = None) -> float:
    """Return ``f`` such that ``value [from_unit] == value * f [to_unit]`` (cached).

    ``analyte`` (a key of ``mappings/analytes.json``) enables mass <-> molar conversion via its
    molar mass, and IU/L == U/L for enzymes. Raises :class:`UnitError` for unknown units,
    incompatible dimensions, forbidden conversions, unknown analytes, and non-multiplicative
    conversions such as Cel -> [degF] (use :func:`convert` for those).
    """
    outcome = _factor_or_raise(from_unit, to_unit, analyte)
    if outcome == _OFFSET:
        raise UnitError(
            f"{from_unit} -> {to_unit}", "not a multiplicative conversion (offset units)"
        )
    assert isinstance(outcome, float)
    return outcome


def convert(value: float, from_unit: str, to_unit: str, *, analyte: str | None = None) -> float:
    """Convert ``value`` from ``from_unit`` to ``to_unit``.

    Examples: creatinine 1 mg/dL -> 88.42 umol/L (``analyte="creatinine"``); 4.0 10*9/L ->
    4000 /mm3; 9 g/dL -> 90 g/L; 37 Cel -> 98.6 [degF]. Raises :class:`UnitError` as
    :func:`conversion_factor` does (offset units excepted).
    """
    outcome = _factor_or_raise(from_unit, to_unit, analyte)
    if outcome != _OFFSET:
        return value * outcome  # type: ignore[operator]
    state = _state()
    src = _lookup(from_unit)
    dst = _lookup(to_unit)
    with state.lock:
        quantity = state.reg.Quantity(value * src.magnitude, src.units)
        return float(quantity.to(dst.units).magnitude) / dst.magnitude


# --------------------------------------------------------------------------------------------
# Analytes
# --------------------------------------------------------------------------------------------


def _analyte(code: str) -> AnalyteInfo:
    info = _analytes().get(code)
    if info is None:
        raise UnitError(code, "unknown analyte (not in mappings/analytes.json)")
    return info


def analyte_info(analyte: str) -> AnalyteInfo:
    """Return the :class:`AnalyteInfo` for an analyte code such as ``"creatinine"``.

    Raises :class:`UnitError` when the analyte is not in ``mappings/analytes.json``.
    """
    return _analyte(analyte)


def known_analytes() -> Iterator[str]:
    """Yield the analyte codes defined in ``mappings/analytes.json``."""
    yield from _analytes()


def default_uln(analyte: str, *, sex: str | None = None) -> tuple[float, str] | None:
    """Return the default adult upper limit of normal ``(value, UCUM unit)`` for ``analyte``.

    With ``sex`` (``"male"``/``"female"``, as in FHIR ``Patient.gender``), a sex-specific
    default is used where the table has one. ``None`` when the analyte has no ULN. The value is a
    fallback: the Observation's ``referenceRange.high`` should be preferred. Raises
    :class:`UnitError` for unknown analytes.
    """
    info = _analyte(analyte)
    if sex is not None and sex in info.uln_by_sex:
        return info.uln_by_sex[sex]
    return info.uln


# --------------------------------------------------------------------------------------------
# valueString results
# --------------------------------------------------------------------------------------------

_Interval = tuple[float, bool, float, bool]  # low, low_closed, high, high_closed


def _interval(comparator: str | None, value: float) -> _Interval:
    inf = math.inf
    return {
        None: (value, True, value, True),
        "=": (value, True, value, True),
        "==": (value, True, value, True),
        "<": (-inf, False, value, False),
        "<=": (-inf, False, value, True),
        ">": (value, False, inf, False),
        ">=": (value, True, inf, False),
    }[comparator]


def _subset(a: _Interval, b: _Interval) -> bool:
    a_lo, a_lo_c, a_hi, a_hi_c = a
    b_lo, b_lo_c, b_hi, b_hi_c = b
    low_ok = a_lo > b_lo or (a_lo == b_lo and (b_lo_c or not a_lo_c))
    high_ok = a_hi < b_hi or (a_hi == b_hi and (b_hi_c or not a_hi_c))
    return low_ok and high_ok


def _disjoint(a: _Interval, b: _Interval) -> bool:
    a_lo, a_lo_c, a_hi, a_hi_c = a
    b_lo, b_lo_c, b_hi, b_hi_c = b
    if a_hi < b_lo or b_hi < a_lo:
        return True
    if a_hi == b_lo and not (a_hi_c and b_lo_c):
        return True
    return b_hi == a_lo and not (b_hi_c and a_lo_c)


@dataclass(frozen=True)
class ParsedValue:
    """A number read from a ``valueString``, possibly censored.

    ``comparator`` is ``None`` for an exact value, or ``"<"``, ``"<="``, ``">"``, ``">="`` for a
    censored one (``"<0.5"`` means "below the detection limit 0.5"). ``unit`` is the canonical
    UCUM string when the text named a unit, else ``None``.
    """

    value: float
    comparator: Comparator | None = None
    unit: str | None = None

    def compare(self, op: str, threshold: float) -> bool | None:
        """Three-valued test of ``<true value> op threshold``.

        ``op`` is one of ``<``, ``<=``, ``>``, ``>=``, ``==``. Returns ``True``/``False`` when
        every value the result allows agrees, ``None`` when the censored value cannot tell:
        ``<0.5`` satisfies ``<= 1`` (True), fails ``>= 1`` (False), is unknown for ``>= 0.3``.
        """
        if op not in ("<", "<=", ">", ">=", "=="):
            raise ValueError(f"unknown comparison operator {op!r}")
        have = _interval(self.comparator, self.value)
        want = _interval(op, threshold)
        if _subset(have, want):
            return True
        if _disjoint(have, want):
            return False
        return None

    def to_unit(self, unit: str, *, analyte: str | None = None) -> ParsedValue:
        """Return this value converted to ``unit`` (comparator kept; factors are positive).

        Raises :class:`UnitError` when the value has no unit or cannot be converted.
        """
        if self.unit is None:
            raise UnitError("", "value has no unit to convert from")
        value = convert(self.value, self.unit, unit, analyte=analyte)
        return ParsedValue(value, self.comparator, normalise_unit(unit))


_VALUE = re.compile(
    r"""^\s*
    (?P<cmp><=|>=|=<|=>|≤|≥|<|>|=)?\s*
    (?P<num>[+-]?(?:\d[\d.,]*|[.,]\d+)(?:[eE][+-]?\d+)?)
    \s*(?P<unit>.*?)\s*$""",
    re.VERBOSE,
)
_CMP = {"<=": "<=", "=<": "<=", "≤": "<=", ">=": ">=", "=>": ">=", "≥": ">=", "<": "<", ">": ">"}


def _parse_number(text: str) -> float | None:
    """Read a number with decimal point or comma; refuse ambiguous thousands separators."""
    mantissa, _, exponent = text.lower().partition("e")
    dots, commas = mantissa.count("."), mantissa.count(",")
    if dots and commas:
        # The last separator is the decimal one: 1,234.5 or 1.234,5.
        decimal = "." if mantissa.rfind(".") > mantissa.rfind(",") else ","
        thousands = "," if decimal == "." else "."
        if mantissa.count(decimal) > 1:
            return None
        integer, frac = mantissa.split(decimal)
        groups = integer.lstrip("+-").split(thousands)
        if not groups[0] or any(len(g) != 3 for g in groups[1:]):
            return None
        mantissa = integer.replace(thousands, "") + "." + frac
    elif commas:
        if commas > 1:
            return None
        integer, frac = mantissa.split(",")
        if len(frac) == 3 and integer.lstrip("+-") not in ("", "0"):
            return None  # 1,000: thousands separator or decimal comma? Do not guess.
        mantissa = integer + "." + frac
    elif dots > 1:
        return None
    try:
        number = float(mantissa + ("e" + exponent if exponent else ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_value_string(text: str) -> ParsedValue | None:
    """Read a laboratory ``valueString`` into a :class:`ParsedValue`, or ``None``.

    Accepts ``"12.3"``, ``"12,3"`` (decimal comma), ``"<0.5"``, ``">= 1000"``, ``"≤5"``,
    ``"1.5 x10^9/L"`` and ``"88 umol/L"`` (unit after the number, any alias or UCUM code).
    Returns ``None`` for anything else (``"positive"``, ``"1,000"`` whose comma is ambiguous,
    trailing text that is not a unit). Never raises.
    """
    if not isinstance(text, str) or len(text) > 200:
        return None
    match = _VALUE.match(text)
    if match is None:
        return None
    number = _parse_number(match["num"])
    if number is None:
        return None
    comparator = _CMP.get(match["cmp"] or "")
    unit_text = match["unit"]
    unit: str | None = None
    if unit_text:
        try:
            unit = normalise_unit(unit_text)
        except UnitError:
            return None
    return ParsedValue(number, comparator, unit)  # type: ignore[arg-type]
