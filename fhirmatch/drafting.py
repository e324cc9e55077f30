"""Draft computable criteria from eligibility text: a deterministic, rule-based recogniser.

No model and no network: regular expressions over the wording, and the same ValueSets and
analyte table (``mappings/``) the hand-written trials use. What it recognises:

* age ranges and bounds (``Age 16-70 years``, ``≥18 years``, ``Age>70 or <16 years``);
* ECOG and Karnofsky ranges (``ECOG performance status 0-1``, ``KPS>70``);
* lab thresholds for every analyte of ``mappings/analytes.json``, with the units protocols use
  (``≥ 1.5 × 10^9/L``, ``1.5×109/L``, ``100,000/mm3``, ``/µL``, ``×10³/µL``, ``g/dL``, ``g/L``,
  ``mg/dL``, ``µmol/L``, ``mL/min``, ``IU/mL``, ``copies/mL``) or relative to the upper limit of
  normal (``≤ 1.5 × ULN``, ``< 3.0 times the upper limit of the normal range``); several tests
  sharing one limit (``AST and ALT ≤ 2.5 × ULN``); an "or" between two tests; a conditional
  limit (``≤ 5 × ULN with liver metastases``) kept as a manual alternative;
* pregnancy and lactation; HIV, hepatitis B and C; brain metastases; prior therapy with the
  classes ``mappings/`` knows (platinum, taxanes, fluoropyrimidines, anti-PD-1, radiotherapy).

Everything else becomes a manual action with its wording. A criterion is never drafted so that a
patient the record cannot decide is excluded: when a recognised part comes with qualifiers the
record cannot check ("untreated brain metastases", "thoracic irradiation"), a match makes the
criterion ``unknown`` rather than ``fail``; a conditional limit is an alternative a person checks.

Every drafted action carries the ``drafted`` extension (the span it came from and the rule) until
a person reviews it and removes the mark. Same input, same output: nothing depends on time,
randomness or dictionary order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .criteria_text import Bullet, Section
from .model import (
    CS_CRITERION_KIND,
    EXT_ANALYTE,
    EXT_CLINICAL_STATUS,
    EXT_DRAFTED,
    EXT_MANUAL_REVIEW,
    EXT_TARGET_UNIT,
    VS_BASE,
)
from .trials import EXT_NOTE

__all__ = [
    "LAB_ANALYTES",
    "ActionIds",
    "DraftContext",
    "Finding",
    "LabAnalyte",
    "Residual",
    "draft_actions",
    "drafted_extension",
    "drafted_value_sets",
    "duration",
    "find_criteria",
    "kind_code",
    "observation_input",
    "within_days",
]

UCUM = "http://unitsofmeasure.org"

# ------------------------------------------------------------------------------------ text


def _work(text: str) -> str:
    """A copy of ``text`` for matching, the same length (offsets stay valid): Markdown escapes
    (``\\<``, ``\\^``) become spaces before the character, exotic spaces plain ones."""
    out = re.sub(r"\\([<>^*\[\]_~])", r" \1", text)
    return out.replace("\u00a0", " ").replace("\u2009", " ").replace("\u202f", " ")


_CMP_TABLE: list[tuple[str, str]] = [
    (r"≥|>=|=>|≧|⩾|＞=", ">="),
    (r"≤|<=|=<|≦|⩽", "<="),
    (
        r"(?:greater|more|higher)\s+than\s+or\s+equal\s+to|equal\s+to\s+or\s+(?:greater|more|"
        r"higher)\s+than|at\s+least|(?:no|not)\s+(?:less|lower|fewer)\s+than|minimum\s+of",
        ">=",
    ),
    (
        r"less\s+than\s+or\s+equal\s+to|equal\s+to\s+or\s+(?:less|lower)\s+than|(?:no|not)\s+"
        r"(?:more|greater|higher)\s+than|at\s+most|up\s+to|maximum\s+of|(?:does|do|must|should)"
        r"\s+not\s+exceed|not\s+exceeding|not\s+above",
        "<=",
    ),
    (r"(?:greater|more|higher)\s+than|above|exceeding|exceeds?|over", ">"),
    (r"(?:less|lower|fewer)\s+than|below|under", "<"),
    (r">|＞", ">"),
    (r"<|＜", "<"),
]
_CMP = re.compile(
    "|".join(f"(?P<c{i}>{pat})" for i, (pat, _) in enumerate(_CMP_TABLE)), re.IGNORECASE
)


def _op(match: re.Match[str]) -> str:
    for i, (_, op) in enumerate(_CMP_TABLE):
        if match.group(f"c{i}") is not None:
            return op
    raise AssertionError("comparator without a group")


#: a number: thousands separated by commas or spaces ("100,000", "100 000"), or a decimal with a
#: point or a comma ("1.5", "1,5")
_NUM = re.compile(
    r"\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d{1,3}(?: \d{3})+(?![\d.,])"
    r"|\d+(?:[.,]\d+)?)"
)
_SUP = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_POW = re.compile(
    r"\s*(?:[×xX*✕·]|times)\s*10\s*(?:\^|\*\*|\*|[eE])?\s*(?P<exp>[⁰¹²³⁴⁵⁶⁷⁸⁹]{1,2}|\d{1,2})"
    r"\s*(?:cells?\s*)?/\s*(?P<vol>[µμu]L|[µμu]l|mcL|mm3|mm³|mm\^3|cumm|L|l)(?![A-Za-z])"
)
_PER = re.compile(
    r"\s*(?:cells?\s*)?/\s*(?P<vol>[µμu]L|[µμu]l|mcL|mm3|mm³|mm\^3|cumm|cu\.?\s?mm)(?![A-Za-z])"
)
_UNIT_TABLE: list[tuple[str, str]] = [
    (r"(?-i:K\s*/\s*[µμu]L)", "10*3/uL"),
    (r"(?-i:G\s*/\s*L)", "10*9/L"),
    (r"mg\s*/\s*dl", "mg/dL"),
    (r"mg\s*/\s*l", "mg/L"),
    (r"g\s*/\s*dl", "g/dL"),
    (r"g\s*/\s*l", "g/L"),
    (r"[µμu]mol\s*/\s*l", "umol/L"),
    (r"mmol\s*/\s*l", "mmol/L"),
    (
        r"ml\s*/\s*min(?:ute)?\s*(?:/|per)\s*1[.,]73\s*(?:m2|m²|m\^2|square\s+met(?:er|re)s?)",
        "mL/min/{1.73_m2}",
    ),
    (r"ml\s*/\s*min(?:ute)?", "mL/min"),
    (r"(?:international\s+units|iu)\s*/\s*ml", "[IU]/mL"),
    (r"copies\s*/\s*ml", "{copies}/mL"),
    (r"(?:iu|u)\s*/\s*l", "U/L"),
]
_UNITS = re.compile(
    r"\s*(?:" + "|".join(f"(?P<u{i}>{p})" for i, (p, _) in enumerate(_UNIT_TABLE)) + r")"
    r"(?![A-Za-z])",
    re.IGNORECASE,
)
_ULN = re.compile(
    r"\s*(?:[×xX*✕·]|times|-?fold)?\s*(?:the\s+)?(?:(?:institutional|site)\s+)?"
    r"(?:ULN|IULN|upper\s+limits?\s+of\s+(?:the\s+)?(?:institutional\s+|site\s+)?normal"
    r"(?:\s+(?:range|limits?|values?))?|upper\s+normal\s+limits?)"
    r"(?:\s*\((?:I?ULN)\))?",
    re.IGNORECASE,
)
_WITHIN_NORMAL = re.compile(
    r"within\s+(?:the\s+)?(?:institutional\s+)?normal\s+(?:range|limits?)|\bWNL\b", re.IGNORECASE
)
_VOLUMES = {"l": "L", "ul": "uL", "µl": "uL", "μl": "uL", "mcl": "uL"}


def _volume(text: str) -> str:
    v = text.replace(" ", "").replace(".", "").lower()
    if v in ("mm3", "mm³", "mm^3", "cumm", "cumm3"):
        return "mm3"
    return _VOLUMES.get(v, "uL")


def _number(text: str) -> float:
    if re.fullmatch(r"\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?", text):
        return float(text.replace(",", "").replace(" ", ""))
    return float(text.replace(",", "."))


@dataclass(frozen=True)
class Threshold:
    """``op value unit`` found in the text; ``unit`` is UCUM or ``ULN`` (value × the ULN)."""

    op: str
    value: float
    unit: str | None
    start: int
    end: int
    #: the number was read as a power of ten whose superscript was lost ("104 copies/mL")
    guessed: str | None = None


_VIRAL_UNITS = ("{copies}/mL", "[IU]/mL")


def _value_at(work: str, op: str, start: int, pos: int) -> Threshold | None:
    """The value and unit written at ``pos`` (after a comparator that starts at ``start``)."""
    num = _NUM.match(work, pos)
    if num is None:
        uln = _ULN.match(work, pos)
        if uln and op in ("<=", "<"):
            return Threshold(op, 1.0, "ULN", start, uln.end())
        return None
    raw = num.group("num")
    value = _number(raw)
    pos = num.end()
    uln = _ULN.match(work, pos)
    if uln and re.search(r"ULN|upper|normal", uln.group(0), re.IGNORECASE):
        return Threshold(op, value, "ULN", start, uln.end())
    power = _POW.match(work, pos)
    if power:
        exp = int(power.group("exp").translate(_SUP))
        return Threshold(op, value, f"10*{exp}/{_volume(power.group('vol'))}", start, power.end())
    per = _PER.match(work, pos)
    if per:
        return Threshold(op, value, f"/{_volume(per.group('vol'))}", start, per.end())
    units = _UNITS.match(work, pos)
    if units:
        for i, (_, ucum) in enumerate(_UNIT_TABLE):
            if units.group(f"u{i}") is not None:
                if ucum in _VIRAL_UNITS and re.fullmatch(r"10[2-9]", raw):
                    guess = f"'{raw} {ucum}' read as 10^{raw[2]} (a superscript lost in copying)"
                    return Threshold(op, 10.0 ** int(raw[2]), ucum, start, units.end(), guess)
                return Threshold(op, value, ucum, start, units.end())
    pct = re.match(r"\s*%", work[pos:])
    if pct:
        return Threshold(op, value, "%", start, pos + pct.end())
    return Threshold(op, value, None, start, pos)


_OR_VALUE = re.compile(r"\s*,?\s*(?:or|/)\s*(?=\d)", re.IGNORECASE)


def _thresholds(work: str, start: int = 0, end: int | None = None) -> list[Threshold]:
    """Every ``comparator value unit`` in ``work[start:end]``; a value following one with "or"
    ("≥ 2000 IU/mL or 10^4 copies/mL") shares its comparator; "within normal limits" is ≤ ULN."""
    end = len(work) if end is None else end
    out: list[Threshold] = []
    for cmp in _CMP.finditer(work, start, end):
        if out and cmp.start() < out[-1].end:
            continue
        found = _value_at(work, _op(cmp), cmp.start(), cmp.end())
        if found is None or found.end > end:
            continue
        out.append(found)
        more = _OR_VALUE.match(work, found.end)
        if more:
            extra = _value_at(work, found.op, more.end(), more.end())
            if extra is not None and extra.unit is not None and extra.end <= end:
                out.append(extra)
    for m in _WITHIN_NORMAL.finditer(work, start, end):
        if not any(t.start <= m.start() < t.end for t in out):
            out.append(Threshold("<=", 1.0, "ULN", m.start(), m.end()))
    return sorted(out, key=lambda t: t.start)


# ------------------------------------------------------------------------------------ labs


@dataclass(frozen=True)
class LabAnalyte:
    """How an analyte of ``mappings/analytes.json`` is drafted."""

    var: str
    value_set: str
    names: str  # regular expression, case-insensitive
    abbreviations: str = ""  # regular expression, case-sensitive
    lookback_days: int = 30


#: the ValueSets of the performance-status scores the drafter reads (ECOG, Karnofsky)
_SCORE_VALUE_SETS = ("ecog", "karnofsky")

LAB_ANALYTES: dict[str, LabAnalyte] = {
    "creatinine-clearance": LabAnalyte(
        "crcl",
        "creatinine-clearance",
        r"(?:calculated\s+|measured\s+|estimated\s+)?creatinine\s+clearance(?:\s+rate)?"
        r"|glomerular\s+filtration\s+rate",
        r"\bCrCl\b|\bCLcr\b|\be?GFR\b",
    ),
    "creatinine": LabAnalyte(
        "crea", "creatinine", r"(?:serum\s+)?creatinine", r"\bCREAT?\b|\bS?Cr\b"
    ),
    "wbc": LabAnalyte(
        "wbc",
        "wbc",
        r"white\s+blood\s+(?:cells?|cell\s+count|count)(?:\s+count)?|(?:total\s+)?leu[ck]ocytes?"
        r"(?:\s+count)?",
        r"\bWBCs?\b",
    ),
    "anc": LabAnalyte(
        "anc",
        "anc",
        r"(?:absolute\s+)?neutrophils?(?:\s+granulocytes?)?(?:\s+counts?)?"
        r"|absolute\s+granulocytes?(?:\s+counts?)?",
        r"\bANC\b|\bAGC\b",
    ),
    "platelets": LabAnalyte(
        "plt",
        "platelets",
        r"platelets?(?:\s+counts?)?|thrombocytes?(?:\s+counts?)?",
        r"\bPLTs?\b|\bPlt\b",
    ),
    "hemoglobin": LabAnalyte("hgb", "hemoglobin", r"ha?emoglobin", r"\bHGB\b|\bHgb\b|\bHb\b"),
    "albumin": LabAnalyte("alb", "albumin", r"(?:serum\s+)?albumin", r"\bALB\b"),
    "bilirubin-direct": LabAnalyte(
        "dbil",
        "bilirubin-direct",
        r"(?:direct|conjugated)\s+bilirubin|bilirubin,?\s+(?:direct|conjugated)",
        r"\bDBIL\b|\bDBil\b",
    ),
    "bilirubin-total": LabAnalyte(
        "tbil",
        "bilirubin-total",
        r"(?:total\s+)?(?:serum\s+)?bilirubin(?:\s+total)?",
        r"\bT?BIL\b|\bTBili\b|\bTB\b",
    ),
    "alt": LabAnalyte(
        "alt",
        "alt",
        r"alanine\s+(?:amino\s*)?transaminase|alanine\s+(?:amino\s*)?transferase",
        r"\bALT\b|\bSGPT\b|\bGPT\b",
    ),
    "ast": LabAnalyte(
        "ast",
        "ast",
        r"aspartate\s+(?:amino\s*)?transaminase|aspartate\s+(?:amino\s*)?transferase",
        r"\bAST\b|\bSGOT\b|\bGOT\b",
    ),
    "alp": LabAnalyte("alp", "alp", r"alkaline\s+phosphatase", r"\bALP\b|\bAKP\b"),
    "ggt": LabAnalyte(
        "ggt",
        "ggt",
        r"gamma[- ]?glutamyl\s*(?:trans(?:ferase|peptidase))|γ-?glutamyl\s*transferase",
        r"\bGGT\b|\bγ-?GT\b",
    ),
    "ldh": LabAnalyte("ldh", "ldh", r"lactate\s+dehydrogenase", r"\bLDH\b"),
    "glucose": LabAnalyte(
        "glu", "glucose", r"(?:fasting\s+)?(?:blood\s+|plasma\s+|serum\s+)?glucose"
    ),
    "calcium": LabAnalyte("ca", "calcium", r"(?:serum\s+)?(?:total\s+)?calcium"),
    "urea-nitrogen": LabAnalyte(
        "bun", "urea-nitrogen", r"(?:blood\s+)?urea\s+nitrogen", r"\bBUN\b"
    ),
    "uric-acid": LabAnalyte("ua", "uric-acid", r"uric\s+acid|(?:serum\s+)?urate"),
    "cholesterol-total": LabAnalyte("chol", "cholesterol-total", r"(?:total\s+)?cholesterol"),
    "hbv-dna": LabAnalyte(
        "hbv",
        "hbv-dna-iu",
        r"HBV[- ]?DNA|hepatitis\s+B\s+(?:virus\s+)?DNA",
        lookback_days=180,
    ),
    "hcv-rna": LabAnalyte(
        "hcv", "hcv-rna", r"HCV[- ]?RNA|hepatitis\s+C\s+(?:virus\s+)?RNA", lookback_days=180
    ),
}
#: names that stand for several analytes
_GROUP_NAMES = [(re.compile(r"(?:liver\s+)?transaminases|aminotransferases", re.I), ("ast", "alt"))]
_LAB_PATTERNS: list[tuple[str, re.Pattern[str]]] = []
for _code, _lab in LAB_ANALYTES.items():
    _LAB_PATTERNS.append((_code, re.compile(_lab.names, re.IGNORECASE)))
    if _lab.abbreviations:
        _LAB_PATTERNS.append((_code, re.compile(_lab.abbreviations)))


@dataclass(frozen=True)
class _Name:
    analytes: tuple[str, ...]
    start: int
    end: int


def _lab_names(work: str, start: int, end: int) -> list[_Name]:
    found: list[_Name] = []
    for code, pattern in _LAB_PATTERNS:
        for m in pattern.finditer(work, start, end):
            found.append(_Name((code,), m.start(), m.end()))
    for pattern, codes in _GROUP_NAMES:
        for m in pattern.finditer(work, start, end):
            found.append(_Name(codes, m.start(), m.end()))
    # longest first, then drop the ones inside an earlier (longer) match
    found.sort(key=lambda n: (n.start, -(n.end - n.start)))
    out: list[_Name] = []
    for n in found:
        if out and n.start < out[-1].end:
            continue
        out.append(n)
    return out


# ------------------------------------------------------------------------------ findings


@dataclass
class Finding:
    """One computable criterion recognised in a piece of text."""

    rule: str
    slug: str
    title: str
    spans: list[tuple[int, int]]
    inputs: list[dict[str, Any]]
    expression: str
    notes: list[str] = field(default_factory=list)
    #: where conditional alternatives are worded ("≤ 5 × ULN with liver metastases"): a person
    #: checks them
    alternatives: list[tuple[int, int]] = field(default_factory=list)
    #: qualifiers the record cannot check: a match must give unknown, never fail
    qualified: bool = False
    #: lab thresholds: alternatives (OR) of conjunctions (AND) of ``(input id, comparison)``
    branches: list[list[tuple[str, str]]] = field(default_factory=list)
    analytes: list[str] = field(default_factory=list)

    @property
    def start(self) -> int:
        return min(s for s, _ in self.spans)

    @property
    def end(self) -> int:
        return max(e for _, e in self.spans)


@dataclass(frozen=True)
class DraftContext:
    """What drafting a bullet needs besides its text."""

    kind: Section
    lookback_days: int | None = None  # "tested within 15 days" of the enclosing bullet


def drafted_value_sets() -> frozenset[str]:
    """Canonical URLs of the ValueSets a drafted criterion may name."""
    names = {a.value_set for a in LAB_ANALYTES.values()}
    names |= {c.value_set for c in _CONCEPTS} | {t.value_set for t in _THERAPIES}
    names |= set(_SCORE_VALUE_SETS)
    return frozenset(f"{VS_BASE}/{name}" for name in names)


def duration(days: int) -> dict[str, Any]:
    return {"value": days, "unit": "d", "system": UCUM, "code": "d"}


def observation_input(
    var: str, value_set: str, unit: str | None, analyte: str | None, days: int
) -> dict[str, Any]:
    ext: list[dict[str, Any]] = []
    if unit is not None:
        ext.append({"url": EXT_TARGET_UNIT, "valueCode": unit})
    if analyte is not None:
        ext.append({"url": EXT_ANALYTE, "valueCode": analyte})
    out: dict[str, Any] = {"id": var, "type": "Observation", "limit": 1}
    if ext:
        out["extension"] = ext
    out["codeFilter"] = [{"path": "code", "valueSet": VS_BASE + "/" + value_set}]
    out["dateFilter"] = [{"path": "effective", "valueDuration": duration(days)}]
    return out


def _condition_input(
    var: str, value_set: str, status: str = "any", days: int | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"id": var, "type": "Condition"}
    if status != "any":
        out["extension"] = [{"url": EXT_CLINICAL_STATUS, "valueCode": status}]
    out["codeFilter"] = [{"path": "code", "valueSet": VS_BASE + "/" + value_set}]
    if days is not None:
        out["dateFilter"] = [{"path": "onset", "valueDuration": duration(days)}]
    return out


def _fmt(value: float) -> str:
    text = f"{value:.6g}"
    return text if "e" not in text else str(int(value))


_OP_TEXT = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


def _unit_ok(analyte: str, unit: str) -> bool:
    from .errors import UnitError
    from .units import analyte_info, conversion_factor, parse_unit

    info = analyte_info(analyte)
    try:
        parse_unit(unit)
    except UnitError:
        return False
    for source in (info.unit, *info.other_units):
        if source == unit:
            return True
        try:
            conversion_factor(source, unit, analyte=analyte)
            return True
        except UnitError:
            continue
    return False


def _lab_term(
    analyte: str, t: Threshold, days: int, taken: Iterable[str] = ()
) -> tuple[dict[str, Any], str, str] | None:
    """(input, FHIRPath comparison, label) for one analyte and threshold, or None when the unit
    does not fit the analyte."""
    from .units import analyte_info

    lab = LAB_ANALYTES[analyte]
    info = analyte_info(analyte)
    var = lab.var
    value_set = lab.value_set
    unit: str | None
    if t.unit == "ULN":
        unit = info.unit
        label = f"{_OP_TEXT[t.op]} {_fmt(t.value)} × ULN"
    else:
        unit = t.unit if t.unit not in (None, "%") else None
        if unit is None or not _unit_ok(analyte, unit):
            return None
        if analyte == "hbv-dna":
            copies = unit == "{copies}/mL"
            value_set = "hbv-dna-copies" if copies else "hbv-dna-iu"
            var = "hbv_copies" if copies else "hbv_iu"
        label = f"{_OP_TEXT[t.op]} {_fmt(t.value)} {unit}"
    taken = set(taken)
    base, n = var, 2
    while var in taken:
        var, n = f"{base}_{n}", n + 1
    if t.unit == "ULN":
        expr = (
            f"%{var}.valueQuantity.value {t.op} {_fmt(t.value)} * %{var}.referenceRange.high.value"
        )
    else:
        expr = f"%{var}.valueQuantity.value {t.op} {_fmt(t.value)}"
    return observation_input(var, value_set, unit, analyte, days), expr, label


_CONDITIONAL = re.compile(
    r"\b(?:with|in\s+(?:patients|subjects|case|the\s+presence)|for\s+(?:patients|subjects)|if|"
    r"when|unless|due\s+to|in\s+presence|documented)\b",
    re.IGNORECASE,
)
_DISPLAY = {
    "wbc": "WBC",
    "anc": "ANC",
    "platelets": "Platelets",
    "hemoglobin": "Hemoglobin",
    "albumin": "Albumin",
    "bilirubin-total": "Total bilirubin",
    "bilirubin-direct": "Direct bilirubin",
    "alt": "ALT",
    "ast": "AST",
    "alp": "ALP",
    "ggt": "GGT",
    "ldh": "LDH",
    "creatinine": "Creatinine",
    "creatinine-clearance": "Creatinine clearance",
    "glucose": "Glucose",
    "calcium": "Calcium",
    "urea-nitrogen": "BUN",
    "uric-acid": "Uric acid",
    "cholesterol-total": "Total cholesterol",
    "hbv-dna": "HBV DNA",
    "hcv-rna": "HCV RNA",
}


def _lab_findings(work: str, ctx: DraftContext) -> list[Finding]:
    """Lab thresholds, clause by clause (``;`` separates clauses unless the next starts with
    "or")."""
    findings: list[Finding] = []
    for cstart, cend in _clauses(work):
        names = _lab_names(work, cstart, cend)
        if not names:
            continue
        thresholds = _thresholds(work, cstart, cend)
        previous_end = cstart
        last: Finding | None = None
        skip_until = -1
        for t in thresholds:
            if t.start < skip_until:
                continue
            prev = previous_end
            own = [n for n in names if prev <= n.start and n.end <= t.start]
            between = work[prev : min([t.start, *(n.start for n in own)])]
            previous_end = t.end
            tail_end = _tail_end(work, t, thresholds, cend)
            tail = work[t.end : tail_end]
            conditional = bool(
                _CONDITIONAL.search(tail) or (not own and _CONDITIONAL.search(between))
            )
            if last is not None and (not own or _joined_by_or(between)):
                # an alternative to the finding before: another unit, another test, or a limit
                # that applies only to some patients
                tail_names = {a for n in _lab_names(work, t.end, tail_end) for a in n.analytes}
                complement = bool(tail_names & set(last.analytes))
                if conditional and not complement:
                    alt_start = min([t.start, *(n.start for n in own)])
                    word = re.search(r"\bor\b", work[prev:alt_start], re.IGNORECASE)
                    span_start = prev + word.start() if word else alt_start
                    span_end = cend if own else tail_end
                    last.alternatives.append(_trim(work, span_start, span_end))
                    last.spans.append(last.alternatives[-1])
                    skip_until = span_end
                    previous_end = span_end
                    continue
                if own or re.search(r"\bor\b", between, re.IGNORECASE):
                    analytes = _analytes(own) if own else list(dict.fromkeys(last.analytes))
                    if len(analytes) == 1 or own:
                        extra = _make_lab(analytes, t, own, ctx, taken=_vars(last))
                        if extra is not None:
                            _merge_or(last, extra)
                continue
            if not own:
                continue
            finding = _make_lab(_analytes(own), t, own, ctx)
            if finding is None:
                continue
            if conditional:
                # "AST ≤ 2.5 × ULN in patients with …": a limit that applies only sometimes
                finding.qualified = True
            findings.append(finding)
            last = finding
    for f in findings:
        f.expression = _lab_expression(f, ctx.kind)
    return findings


def _trim(work: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` without the spaces and punctuation around the words."""
    while start < end and work[start] in " ,;().\n":
        start += 1
    while end > start and work[end - 1] in " ,;().\n":
        end -= 1
    return start, end


def _analytes(names: Sequence[_Name]) -> list[str]:
    out: list[str] = []
    for n in names:
        for a in n.analytes:
            if a not in out:
                out.append(a)
    return out


def _vars(f: Finding) -> list[str]:
    return [str(i["id"]) for i in f.inputs]


def _merge_or(last: Finding, extra: Finding) -> None:
    last.spans.extend(extra.spans)
    last.inputs.extend(extra.inputs)
    last.branches.extend(extra.branches)
    last.analytes.extend(a for a in extra.analytes if a not in last.analytes)
    last.notes.extend(n for n in extra.notes if n not in last.notes)
    last.title = f"{last.title} or {extra.title}"
    last.slug = f"{last.slug}-or-{extra.slug}" if extra.slug != last.slug else last.slug


def _lab_expression(f: Finding, kind: Section) -> str:
    def conj(branch: list[tuple[str, str]]) -> str:
        return " and ".join(term for _, term in branch)

    if len(f.branches) == 1:
        return conj(f.branches[0])
    if kind == "exclusion":
        # one missing test must not hide another one that excludes: a missing test is "not
        # excluding" here, and the engine's closed world passes when nothing was found at all
        return " or ".join(
            "iif(" + " and ".join(f"%{var}.exists()" for var, _ in b) + f", {conj(b)}, false)"
            for b in f.branches
        )
    return " or ".join(f"({conj(b)})" if len(b) > 1 else conj(b) for b in f.branches)


def _tail_end(work: str, t: Threshold, thresholds: Sequence[Threshold], cend: int) -> int:
    later = [x.start for x in thresholds if x.start > t.start]
    end = min([cend, *later])
    close = work.find(")", t.end, end)
    comma = work.find(",", t.end, end)
    candidates = [c for c in (close, comma) if c != -1]
    return min(candidates) if candidates else end


def _joined_by_or(between: str) -> bool:
    return bool(re.search(r"\bor\b", between, re.IGNORECASE)) and not re.search(
        r"\band\b(?!/)", between, re.IGNORECASE
    )


def _make_lab(
    analytes: Sequence[str],
    t: Threshold,
    names: Sequence[_Name],
    ctx: DraftContext,
    taken: Iterable[str] = (),
) -> Finding | None:
    inputs: list[dict[str, Any]] = []
    branch: list[tuple[str, str]] = []
    labels: list[str] = []
    notes: list[str] = []
    used = list(taken)
    for analyte in analytes:
        days = ctx.lookback_days or LAB_ANALYTES[analyte].lookback_days
        term = _lab_term(analyte, t, days, used)
        if term is None:
            return None
        inp, expr, label = term
        used.append(str(inp["id"]))
        inputs.append(inp)
        branch.append((str(inp["id"]), expr))
        labels.append(f"{_DISPLAY[analyte]} {label}")
        if ctx.lookback_days is None:
            notes.append(
                f"Look-back {days} days for {_DISPLAY[analyte]}: chosen by the importer, the text "
                "gives none."
            )
    if len(branch) > 1:
        notes.append(
            "One limit for several tests: every one must be measured and within it (a missing "
            "one leaves the criterion unknown)."
        )
    if t.unit == "ULN":
        notes.append(
            "× ULN uses the result's own reference range, else the default upper limit of normal "
            "in mappings/analytes.json."
        )
    if t.guessed:
        notes.append(f"The importer {t.guessed}: check it against the protocol.")
    spans = [(n.start, n.end) for n in names] + [(t.start, t.end)]
    return Finding(
        rule="lab-threshold",
        slug="-".join(LAB_ANALYTES[a].var for a in analytes),
        title=" and ".join(labels),
        spans=spans,
        inputs=inputs,
        expression="",
        notes=notes,
        branches=[branch],
        analytes=list(analytes),
    )


def _clauses(work: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    start = 0
    for m in re.finditer(r";", work):
        out.append((start, m.start()))
        start = m.end()
    out.append((start, len(work)))
    # a clause starting with "or" is an alternative to the one before: keep them together
    merged: list[tuple[int, int]] = []
    for s, e in out:
        if merged and re.match(r"\s*or\b", work[s:e], re.IGNORECASE):
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


# ------------------------------------------------------------------------------ age, scores

_AGE_WORD = re.compile(r"\bage[ds]?\b", re.IGNORECASE)
_NUM_TO = r"(?P<lo>\d{1,3})\s*(?:years?\s*)?(?:-|–|~|to|and)\s*(?P<hi>\d{1,3})\s*(?:years?|yrs?)?"
_AGE_RANGE = re.compile(
    r"\bage[ds]?\b(?:\s+(?:of|is|must\s+be|should\s+be|range|from|at\s+enrol?ment))*\s*[:：]?\s*"
    r"(?:between\s+)?" + _NUM_TO,
    re.IGNORECASE,
)
_RANGE_YEARS = re.compile(
    r"(?P<lo>\d{1,3})\s*(?:-|–|~|to)\s*(?P<hi>\d{1,3})\s*(?:years?|yrs?)\s*(?:old|of\s+age)",
    re.IGNORECASE,
)
_CMP_PAT = "|".join(f"(?:{p})" for p, _ in _CMP_TABLE)
_AGE_CMP = re.compile(
    r"\bage[ds]?\b(?:\s+(?:of|is|must\s+be|should\s+be|at\s+\w+))*\s*[:：]?\s*"
    rf"(?P<c1>{_CMP_PAT})\s*(?P<n1>\d{{1,3}})\s*(?:years?|yrs?)?"
    rf"(?:\s*(?:or|and)\s*(?P<c2>{_CMP_PAT})\s*(?P<n2>\d{{1,3}})\s*(?:years?|yrs?)?)?",
    re.IGNORECASE,
)
_CMP_YEARS = re.compile(
    rf"(?P<c1>{_CMP_PAT})\s*(?P<n1>\d{{1,3}})\s*(?:years?|yrs?)(?:\s+(?:old|of\s+age))?"
    r"(?!\s+(?:since|after|before|prior|from|ago|of\s+(?!age)|follow))",
    re.IGNORECASE,
)
_YEARS_OLDER = re.compile(
    r"(?P<n1>\d{1,3})\s*(?:years?|yrs?)(?:\s+(?:old|of\s+age))?\s+(?:or|and)\s+"
    r"(?P<w>older|over|above|more|younger|under|below|less)",
    re.IGNORECASE,
)


def _cmp_op(text: str) -> str:
    m = _CMP.fullmatch(text.strip())
    if m is None:
        m = _CMP.search(text)
    assert m is not None
    return _op(m)


def _age_findings(work: str, ctx: DraftContext) -> list[Finding]:
    for pattern in (_AGE_RANGE, _RANGE_YEARS):
        m = pattern.search(work)
        if m:
            lo, hi = int(m.group("lo")), int(m.group("hi"))
            if lo < hi <= 130:
                return [
                    Finding(
                        "age",
                        "age",
                        f"Age {lo}-{hi}",
                        [(m.start(), m.end())],
                        [],
                        f"%age >= {lo} and %age <= {hi}",
                    )
                ]
    m = _AGE_CMP.search(work)
    if m is None and (_AGE_WORD.search(work) or len(work.strip()) < 40):
        m = _CMP_YEARS.search(work)
    if m is not None:
        parts = [(m.group("c1"), int(m.group("n1")))]
        if "c2" in m.groupdict() and m.group("c2"):
            parts.append((m.group("c2"), int(m.group("n2"))))
        terms = [f"%age {_cmp_op(c)} {n}" for c, n in parts]
        joiner = " or " if re.search(r"\bor\b", m.group(0), re.IGNORECASE) else " and "
        title = "Age " + joiner.join(f"{_OP_TEXT[_cmp_op(c)]} {n}" for c, n in parts)
        return [Finding("age", "age", title, [(m.start(), m.end())], [], joiner.join(terms))]
    m = _YEARS_OLDER.search(work)
    if m is not None and (_AGE_WORD.search(work) or re.search(r"old|of\s+age", m.group(0))):
        n = int(m.group("n1"))
        op = ">=" if m.group("w").lower() in ("older", "over", "above", "more") else "<="
        return [Finding("age", "age", f"Age {_OP_TEXT[op]} {n}", [m.span()], [], f"%age {op} {n}")]
    return []


_ECOG = re.compile(
    r"(?:\bECOG\b|Eastern\s+Cooperative\s+Oncology\s+Group|\bWHO\b|\bZubrod\b)"
    r"(?:\s*\(ECOG\))?(?:\s+performance(?:\s+status)?(?:\s+score)?|\s+PS)?"
    r"(?:\s*\((?:ECOG\s*)?PS\))?(?:\s+score)?(?:\s+(?:of|is|was|must\s+be|should\s+be))*\s*[:：]?\s*",
    re.IGNORECASE,
)
_PS_ONLY = re.compile(
    r"\bperformance\s+status(?:\s*\(PS\))?(?:\s+score)?(?:\s+(?:of|is|must\s+be))*\s*[:：]?\s*"
    r"|\bPS\b\s*[:：]?\s*",
    re.IGNORECASE,
)
_KPS = re.compile(
    r"(?:\bKarnofsky\b(?:\s+performance)?(?:\s+(?:status|score|scale|index))?(?:\s*\(KPS\))?"
    r"|\bKPS\b)(?:\s+(?:score|of|is|must\s+be|should\s+be))*\s*[:：]?\s*",
    re.IGNORECASE,
)


def _score_values(work: str, pos: int, small: bool) -> tuple[str, int] | None:
    """``(FHIRPath comparison on %v, end)`` for the score written at ``pos``."""
    digit = r"\d" if small else r"\d{2,3}"
    pct = r"\s*%?" if not small else ""
    rest = work[pos:]
    m = re.match(rf"(?P<c>{_CMP_PAT})\s*(?P<n>{digit}){pct}", rest, re.IGNORECASE)
    if m:
        return f"%v {_cmp_op(m.group('c'))} {m.group('n')}", pos + m.end()
    m = re.match(rf"(?P<lo>{digit}){pct}\s*(?:-|–|~|to)\s*(?P<hi>{digit}){pct}", rest)
    if m:
        lo, hi = int(m.group("lo")), int(m.group("hi"))
        if lo > hi:
            return None
        if lo == 0:
            return f"%v <= {hi}", pos + m.end()
        return f"%v >= {lo} and %v <= {hi}", pos + m.end()
    m = re.match(rf"(?P<list>{digit}(?:\s*,\s*{digit})*),?\s*(?:or|and)\s*(?P<last>{digit})", rest)
    if m:
        values = sorted(
            {int(v) for v in re.findall(r"\d+", m.group("list"))} | {int(m.group("last"))}
        )
        if values == list(range(values[0], values[-1] + 1)):
            if values[0] == 0:
                return f"%v <= {values[-1]}", pos + m.end()
            return f"%v >= {values[0]} and %v <= {values[-1]}", pos + m.end()
        return None
    m = re.match(
        rf"(?P<n>{digit}){pct}\s*(?:or\s+(?P<w>higher|more|above|greater|better|less|lower|below))",
        rest,
        re.IGNORECASE,
    )
    if m:
        w = m.group("w").lower()
        if small:
            op = "<=" if w in ("better", "less", "lower", "below") else ">="
        else:
            op = ">=" if w in ("higher", "more", "above", "greater", "better") else "<="
        return f"%v {op} {m.group('n')}", pos + m.end()
    m = re.match(rf"(?P<n>{digit})(?!\d|\s*(?:-|–|\.\d))", rest)
    if m and small:
        return f"%v = {m.group('n')}", pos + m.end()
    return None


def _score_findings(work: str, ctx: DraftContext) -> list[Finding]:
    out: list[Finding] = []
    for m in _KPS.finditer(work):
        got = _score_values(work, m.end(), small=False)
        if got:
            expr, end = got
            out.append(
                Finding(
                    "karnofsky",
                    "kps",
                    "Karnofsky " + _score_title(expr),
                    [(m.start(), end)],
                    [
                        observation_input(
                            "kps", _SCORE_VALUE_SETS[1], "{score}", None, ctx.lookback_days or 90
                        )
                    ],
                    expr.replace("%v", "%kps.valueQuantity.value"),
                    notes=[] if ctx.lookback_days else [_SCORE_NOTE],
                )
            )
            break
    ecog_match = None
    for m in _ECOG.finditer(work):
        got = _score_values(work, m.end(), small=True)
        if got:
            ecog_match = (m, got)
            break
    if ecog_match is None and not out and not re.search(r"Karnofsky|KPS|Lansky", work, re.I):
        for m in _PS_ONLY.finditer(work):
            got = _score_values(work, m.end(), small=True)
            if got:
                ecog_match = (m, got)
                break
    if ecog_match:
        m, (expr, end) = ecog_match
        out.append(
            Finding(
                "ecog",
                "ecog",
                "ECOG " + _score_title(expr),
                [(m.start(), end)],
                [
                    observation_input(
                        "ecog", _SCORE_VALUE_SETS[0], "{score}", None, ctx.lookback_days or 90
                    )
                ],
                expr.replace("%v", "%ecog.valueQuantity.value"),
                notes=[] if ctx.lookback_days else [_SCORE_NOTE],
            )
        )
    return out


def _score_title(expr: str) -> str:
    text = expr.replace("%v ", "").replace(" and %v ", ", ")
    for op, sign in (("<=", "≤"), (">=", "≥")):
        text = text.replace(op, sign)
    return text


_SCORE_NOTE = "Look-back 90 days: chosen by the importer, the text gives none."

# ---------------------------------------------------------------- conditions and therapies

_NEGATION = re.compile(
    r"\b(?:no|not|non|without|never|negative\s+for|free\s+of|absence\s+of)\b", re.I
)
_QUALIFIERS = re.compile(
    r"\b(?:untreated|symptomatic|uncontrolled|unstable|progressive|progressing|progression|"
    r"requiring|detectable|significant|severe|clinically|leptomeningeal|active\s+(?:brain|CNS)|"
    r"new|growing|unless|except|within\s+the\s+(?:past|last))\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _Concept:
    rule: str
    slug: str
    title: str
    pattern: re.Pattern[str]
    value_set: str
    days: int | None = None
    status_default: str = "any"
    #: words right after the mention that make it something else ("pregnancy test")
    not_followed_by: str | None = None


_CONCEPTS = [
    _Concept(
        "pregnancy",
        "pregnancy",
        "Pregnancy",
        re.compile(r"\bpregnan\w*", re.I),
        "pregnancy",
        300,
        "current",
        r"\s*(?:test|tests|testing|prevention|potential)",
    ),
    _Concept(
        "pregnancy",
        "lactation",
        "Lactation",
        re.compile(r"\blactat\w*|\bbreast[- ]?feed\w*|\bnursing\b", re.I),
        "lactation",
        730,
        "current",
    ),
    _Concept(
        "infection",
        "hiv",
        "HIV",
        re.compile(r"\bHIV\b(?![- ]?(?:RNA|viral))|human\s+immunodeficiency\s+virus", re.I),
        "hiv",
    ),
    _Concept(
        "infection",
        "hbv",
        "Hepatitis B",
        re.compile(r"hepatitis\s+B\b(?!\s+(?:virus\s+)?DNA)|\bHBV\b(?![- ]?DNA)|\bHBsAg\b", re.I),
        "hepatitis-b",
    ),
    _Concept(
        "infection",
        "hcv",
        "Hepatitis C",
        re.compile(r"hepatitis\s+C\b(?!\s+(?:virus\s+)?RNA)|\bHCV\b(?![- ]?RNA)", re.I),
        "hepatitis-c",
    ),
    _Concept(
        "brain-metastases",
        "brain_mets",
        "Brain metastases",
        re.compile(
            r"(?:brain|intracranial|cerebral|CNS|central\s+nervous\s+system)\s+"
            r"(?:metastas[ie]s|metastatic\s+disease|metastasis\s+disease|mets|lesions?)"
            r"|metastas[ie]s\s+(?:to|in|of)\s+the\s+(?:brain|CNS|central\s+nervous\s+system)",
            re.I,
        ),
        "brain-metastasis",
    ),
]


def _status(clause: str, default: str) -> str:
    if re.search(r"\b(?:active|chronic|current(?:ly)?|ongoing|uncontrolled)\b", clause, re.I):
        return "current"
    if re.search(r"\bhistory\b|\bprior\b|\bprevious", clause, re.I):
        return "history"
    return default


#: a virus whose load has a drafted threshold is not also drafted as a diagnosis
_LOAD_OF = {"hbv": "hbv-dna", "hcv": "hcv-rna"}


def _concept_findings(
    work: str, ctx: DraftContext, skip: Iterable[tuple[int, int]], labs: Iterable[str]
) -> list[Finding]:
    taken = list(skip)
    measured = set(labs)
    grouped: dict[str, Finding] = {}
    order: list[str] = []
    for concept in _CONCEPTS:
        if _LOAD_OF.get(concept.slug) in measured:
            continue
        for m in concept.pattern.finditer(work):
            if any(s <= m.start() < e for s, e in taken):
                continue
            if concept.not_followed_by and re.match(concept.not_followed_by, work[m.end() :], re.I):
                continue
            clause_start = max(work.rfind(";", 0, m.start()), work.rfind(".", 0, m.start())) + 1
            before = work[clause_start : m.start()]
            negated = bool(_NEGATION.search(before))
            if ctx.kind == "inclusion" and not negated:
                continue  # "HIV-positive patients are eligible if …": a person reads it
            if ctx.kind == "exclusion" and negated:
                continue
            key = concept.rule if concept.rule == "pregnancy" else concept.slug
            status = _status(work[clause_start : m.end() + 40], concept.status_default)
            if concept.rule == "pregnancy":
                status = "current"
            if key in grouped:
                finding = grouped[key]
                finding.spans.append(m.span())
                if not any(i["id"] == concept.slug for i in finding.inputs):
                    finding.inputs.append(
                        _condition_input(concept.slug, concept.value_set, status, concept.days)
                    )
                    finding.title = f"{finding.title} or {concept.title.lower()}"
                continue
            finding = Finding(
                concept.rule,
                concept.slug.replace("_", "-"),
                concept.title,
                [m.span()],
                [_condition_input(concept.slug, concept.value_set, status, concept.days)],
                "",
                notes=[],
            )
            finding.qualified = bool(_QUALIFIERS.search(work[clause_start : m.end() + 30]))
            grouped[key] = finding
            order.append(key)
    out: list[Finding] = []
    for key in order:
        f = grouped[key]
        present = " or ".join(f"%{i['id']}.exists()" for i in f.inputs)
        f.expression = present if ctx.kind == "exclusion" else f"({present}).not()"
        if f.rule == "pregnancy":
            f.notes.append(
                "Pregnancy and lactation are read from Conditions (current, onset within 300 and "
                "730 days); a positive hCG result is not drafted."
            )
        out.append(f)
    return out


@dataclass(frozen=True)
class _Therapy:
    slug: str
    title: str
    pattern: re.Pattern[str]
    value_set: str
    procedure: bool = False


_THERAPIES = [
    _Therapy(
        "plat",
        "platinum",
        re.compile(r"platinum|cisplatin|carboplatin|oxaliplatin|nedaplatin|lobaplatin", re.I),
        "platinum",
    ),
    _Therapy("taxane", "taxane", re.compile(r"taxanes?|paclitaxel|docetaxel", re.I), "taxane"),
    _Therapy(
        "fp",
        "fluoropyrimidine",
        re.compile(r"fluoropyrimidines?|\b5-?FU\b|fluorouracil|capecitabine", re.I),
        "fluoropyrimidine",
    ),
    _Therapy(
        "pd1",
        "anti-PD-1",
        re.compile(
            r"anti-?\s?PD-?1\b|PD-?1\s+(?:inhibitors?|antibod(?:y|ies)|blockade|monoclonal|"
            r"therapy|treatment)|pembrolizumab|nivolumab|camrelizumab|tislelizumab|sintilimab|"
            r"toripalimab|cemiplimab",
            re.I,
        ),
        "anti-pd1",
    ),
    _Therapy(
        "rt",
        "radiotherapy",
        re.compile(r"radiotherapy|radiation(?:\s+therapy)?|irradiation|\bSBRT\b", re.I),
        "radiotherapy",
        procedure=True,
    ),
]
_PRIOR = re.compile(
    r"\b(?:prior|previous(?:ly)?|received|receiving|history\s+of|treated\s+with|treatment\s+with"
    r"|therapy\s+with|exposure\s+to|pretreated|pre-treated)\b",
    re.I,
)
_SITE = re.compile(
    r"\b(?:thoracic|chest|pelvic|pelvis|abdominal|abdomen|brain|cranial|whole[- ]brain|"
    r"mediastin\w*|breast|axilla\w*|lung|field|site|area|region|dose|Gy)\b",
    re.I,
)
_WITHIN = re.compile(r"within\s+(?P<n>\d{1,3})\s*(?P<u>days?|weeks?|months?|years?)", re.IGNORECASE)
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}


def within_days(text: str) -> int | None:
    """``within 15 days`` → 15 (weeks, months, years converted), else None."""
    m = _WITHIN.search(text)
    if m is None:
        return None
    unit = m.group("u").lower().rstrip("s")
    return int(m.group("n")) * _UNIT_DAYS[unit]


def _therapy_findings(work: str, ctx: DraftContext) -> list[Finding]:
    if not _PRIOR.search(work) and not re.search(r"\bno\s+prior\b", work, re.I):
        return []
    mentions: list[tuple[_Therapy, re.Match[str]]] = []
    for therapy in _THERAPIES:
        m = therapy.pattern.search(work)
        if m:
            mentions.append((therapy, m))
    if not mentions:
        return []
    mentions.sort(key=lambda tm: tm[1].start())
    negated = bool(_NEGATION.search(work[: mentions[0][1].start()]))
    if ctx.kind == "exclusion" and negated:
        return []
    days = within_days(work)
    inputs: list[dict[str, Any]] = []
    terms: list[str] = []
    for therapy, _ in mentions:
        if therapy.procedure:
            names = [(therapy.slug, "Procedure", "performed")]
        else:
            names = [
                (f"{therapy.slug}_req", "MedicationRequest", "authoredOn"),
                (f"{therapy.slug}_adm", "MedicationAdministration", "effective"),
                (f"{therapy.slug}_stmt", "MedicationStatement", "effective"),
            ]
        for var, rtype, path in names:
            inp: dict[str, Any] = {
                "id": var,
                "type": rtype,
                "codeFilter": [
                    {
                        "path": "code" if rtype == "Procedure" else "medication",
                        "valueSet": VS_BASE + "/" + therapy.value_set,
                    }
                ],
            }
            if days is not None:
                inp["dateFilter"] = [{"path": path, "valueDuration": duration(days)}]
            inputs.append(inp)
        terms.append("(" + " or ".join(f"%{v}.exists()" for v, _, _ in names) + ")")
    between = work[mentions[0][1].start() : mentions[-1][1].end()]
    joiner = (
        " and " if ctx.kind == "inclusion" and not re.search(r"\bor\b", between, re.I) else " or "
    )
    present = joiner.join(terms)
    if negated:
        expression = f"({present}).not()"  # a recorded treatment is evidence against
    elif ctx.kind == "inclusion":
        # treatment given elsewhere leaves no record here: absence is unknown, never a failure
        expression = f"iif({present}, true, {{}})"
    else:
        expression = present
    title = " / ".join(t.title for t, _ in mentions)
    finding = Finding(
        "prior-therapy",
        "prior-" + "-".join(t.slug for t, _ in mentions),
        ("No prior " if negated else "Prior ") + title,
        [m.span() for _, m in mentions],
        inputs,
        expression,
        notes=[
            "Treatment given: an order, administration or statement coded in the class's "
            "ValueSet" + (f", within {days} days." if days else ", at any time.")
        ],
    )
    finding.qualified = bool(_SITE.search(work) and any(t.procedure for t, _ in mentions)) or bool(
        re.search(r"\b(?:concurrent|ongoing|currently)\b", work, re.I)
    )
    if ctx.kind == "inclusion" and not negated and finding.qualified:
        return []
    return [finding]


# ------------------------------------------------------------------------------ assembly

_STOP = frozenset(
    """patients patient subjects subject participants participant must should have has had
    having with the and for are is was were be been being who which that this these those any all
    each known history documented confirmed evidence prior previous previously current currently
    count counts level levels value values serum plasma blood total test tests result results
    laboratory lab labs adequate function functions organ organs following requirement
    requirements criteria criterion defined within days day weeks week months month before
    enrollment enrolment registration randomization randomisation study start first dose screening
    institutional normal upper limit limits range times than less more greater equal least most
    years year old age aged performance status score scale cooperative oncology group eastern
    women woman female females male males men man diagnosis diagnosed disease active presence
    present positive rate absolute cell cells per not non also either both other than from into
    such including include includes includes will can may who whom their them they its his her
    time times ability able eligible allowed permitted required meet meets ecog who kps
    karnofsky uln mg dl ml min iu copies received receiving based therapy therapies treatment
    treatments treated regimen""".split()
)


@dataclass(frozen=True)
class Residual:
    """What no finding covers: its significant words, and whether it is an alternative (an
    "or", "unless" … that does not merely join two recognised parts)."""

    words: tuple[str, ...]
    alternative: bool

    @property
    def significant(self) -> bool:
        return len(self.words) >= 3


def _residual(work: str, findings: Sequence[Finding]) -> Residual:
    covered = bytearray(len(work))
    for f in findings:
        for s, e in f.spans:
            covered[s:e] = b"\x01" * (e - s)
    text = "".join("\u00a7" if covered[i] else ch for i, ch in enumerate(work))
    words = re.findall(r"[A-Za-z][A-Za-z-]{2,}", text)
    # "pregnant or breastfeeding": an "or" between two recognised parts is theirs
    joined = re.sub(r"\u00a7[\s,;/]*(?:(?:and/)?or|and)?[\s,;/]*(?=\u00a7)", "", text)
    alternative = bool(re.search(r"\b(?:or|unless|except|otherwise)\b", joined, re.IGNORECASE))
    return Residual(tuple(w for w in words if w.lower() not in _STOP), alternative)


def find_criteria(text: str, ctx: DraftContext) -> tuple[list[Finding], Residual]:
    """Every finding in ``text`` (offsets into ``text``) and what no finding covers."""
    work = _work(text)
    findings = _lab_findings(work, ctx)
    lab_spans = [s for f in findings for s in f.spans]
    lab_analytes = [a for f in findings for a in f.analytes]
    findings += _age_findings(work, ctx)
    findings += _score_findings(work, ctx)
    findings += _concept_findings(work, ctx, lab_spans, lab_analytes)
    findings += _therapy_findings(work, ctx)
    findings.sort(key=lambda f: f.start)
    return findings, _residual(work, findings)


def kind_code(kind: Section) -> list[dict[str, Any]]:
    return [{"coding": [{"system": CS_CRITERION_KIND, "code": kind}]}]


def _short(text: str, room: int = 70) -> str:
    line = " ".join(text.split()).rstrip(";,.")
    return line if len(line) <= room else line[: room - 1].rstrip() + "…"


class ActionIds:
    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, wanted: str) -> str:
        candidate = wanted
        n = 2
        while candidate in self.used:
            candidate = f"{wanted}-{n}"
            n += 1
        self.used.add(candidate)
        return candidate


def _manual(
    aid: str, kind: Section, text: str, reason: str, extra: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    return {
        "id": aid,
        "title": _short(text),
        "description": text,
        "code": kind_code(kind),
        **({"documentation": list(extra)} if extra else {}),
        "extension": [{"url": EXT_MANUAL_REVIEW, "valueString": reason}],
    }


def drafted_extension(span: str, rule: str) -> dict[str, Any]:
    return {
        "url": EXT_DRAFTED,
        "extension": [
            {"url": "span", "valueString": span},
            {"url": "rule", "valueCode": rule},
        ],
    }


def _computable(
    aid: str,
    kind: Section,
    description: str,
    finding: Finding,
    span: str,
    docs: Sequence[dict[str, Any]],
    downgrade: bool,
) -> dict[str, Any]:
    expression = finding.expression
    notes = list(finding.notes)
    if downgrade or finding.qualified:
        if kind == "exclusion":
            expression = f"iif({expression}, {{}}, false)"
            notes.append(
                "The wording qualifies this in ways the record cannot check: a match makes the "
                "criterion unknown (for a person to check), never a failure."
            )
        else:
            expression = f"iif({expression}, true, {{}})"
            notes.append(
                "The wording qualifies this in ways the record cannot check: only a pass is "
                "decided, anything else is unknown."
            )
    ext: list[dict[str, Any]] = [drafted_extension(span, finding.rule)]
    if notes:
        ext.append({"url": EXT_NOTE, "valueMarkdown": " ".join(notes)})
    action: dict[str, Any] = {
        "id": aid,
        "title": finding.title,
        "description": description,
        "code": kind_code(kind),
    }
    if docs:
        action["documentation"] = list(docs)
    action["extension"] = ext
    action["input"] = finding.inputs
    action["condition"] = [
        {
            "kind": "applicability",
            "expression": {"language": "text/fhirpath", "expression": expression},
        }
    ]
    return action


_UNRECOGNISED = (
    "Not recognised by the importer as a structured criterion: a person judges it from the record."
)


def _finding_action(
    base: str,
    kind: Section,
    text: str,
    finding: Finding,
    ids: ActionIds,
    docs: Sequence[dict[str, Any]],
    downgrade: bool,
    description: str | None = None,
) -> dict[str, Any]:
    core = [sp for sp in finding.spans if sp not in finding.alternatives] or finding.spans
    span = text[min(a for a, _ in core) : max(b for _, b in core)]
    if not finding.alternatives:
        aid = ids.take(f"{base}-{finding.slug}") if description is None else base
        return _computable(aid, kind, description or span, finding, span, docs, downgrade)
    gid = ids.take(f"{base}-{finding.slug}") if description is None else base
    main = _computable(ids.take(f"{gid}-limit"), kind, span, finding, span, docs, downgrade)
    alternatives = [
        _manual(
            ids.take(f"{gid}-conditional"),
            kind,
            alt,
            "A conditional limit: it applies only to some patients (as worded); a person "
            "checks whether it applies and whether it is met.",
            docs,
        )
        for alt in (text[a:b] for a, b in finding.alternatives)
    ]
    return {
        "id": gid,
        "title": finding.title + " (or a conditional limit)",
        "description": description or span,
        "code": kind_code(kind),
        **({"documentation": list(docs)} if docs else {}),
        "selectionBehavior": "any",
        "action": [main, *alternatives],
    }


def draft_actions(
    bullets: Sequence[Bullet],
    docs: Sequence[dict[str, Any]] = (),
    ids: ActionIds | None = None,
) -> list[dict[str, Any]]:
    """PlanDefinition actions for ``bullets``: one per bullet, in order, nested bullets as
    groups, with every recognised criterion drafted and the rest manual."""
    ids = ids or ActionIds()
    counters = {"inclusion": 0, "exclusion": 0}
    out: list[dict[str, Any]] = []
    for bullet in bullets:
        counters[bullet.kind] += 1
        prefix = "inc" if bullet.kind == "inclusion" else "exc"
        aid = ids.take(f"{prefix}-{counters[bullet.kind]:02d}")
        out.append(_draft_bullet(bullet, aid, DraftContext(bullet.kind), ids, docs))
    return out


def _draft_bullet(
    bullet: Bullet, aid: str, ctx: DraftContext, ids: ActionIds, docs: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    kind = bullet.kind
    text = bullet.text
    if bullet.children:
        header = text[: bullet.children[0].start - bullet.start]
        days = within_days(header) or ctx.lookback_days
        any_of = bool(
            re.search(r"\b(?:any|one)\s+of\s+the\s+following|at\s+least\s+one", header, re.I)
        )
        sub_ctx = DraftContext(kind, days)
        children = [
            _draft_bullet(child, ids.take(f"{aid}-{i}"), sub_ctx, ids, docs)
            for i, child in enumerate(bullet.children, start=1)
        ]
        return {
            "id": aid,
            "title": _short(text),
            "description": text,
            "code": kind_code(kind),
            **({"documentation": list(docs)} if docs else {}),
            "selectionBehavior": "any" if any_of else "all",
            "action": children,
        }
    ctx = DraftContext(kind, within_days(text) or ctx.lookback_days)
    findings, residual = find_criteria(text, ctx)
    if not findings:
        return _manual(aid, kind, text, _UNRECOGNISED, docs)
    significant = residual.significant
    alternative_rest = significant and residual.alternative
    downgrade = kind == "exclusion" and significant and not alternative_rest
    if len(findings) == 1 and not significant:
        return _finding_action(aid, kind, text, findings[0], ids, docs, False, description=text)
    children = [_finding_action(aid, kind, text, f, ids, docs, downgrade) for f in findings]
    if significant:
        children.append(
            _manual(
                ids.take(f"{aid}-rest"),
                kind,
                text,
                "Only part of this criterion was drafted (see the other parts); a person judges "
                f"the rest of the wording ({', '.join(dict.fromkeys(residual.words[:8]))}…).",
                docs,
            )
        )
    selection = "any" if (kind == "inclusion" and alternative_rest) else "all"
    return {
        "id": aid,
        "title": _short(text),
        "description": text,
        "code": kind_code(kind),
        **({"documentation": list(docs)} if docs else {}),
        "selectionBehavior": selection,
        "action": children,
    }
