"""The eligibility engine: compiled trials evaluated against one patient's record at a time.

Usage::

    engine = Engine(load_trials(paths, terminology), terminology)
    for record in iter_patient_records(patient_paths):
        results = engine.evaluate_patient_record(record, as_of=date(2026, 11, 1))

Design (see ``docs/trial-format.md`` for the meaning of conditions and inputs):

* Each criterion's FHIRPath condition is compiled once, when the :class:`Engine` is built, by
  :func:`fhirmatch.fhirpath.compile_expression` (closures with fhirpathpy's semantics for the
  subset trials use; fhirpathpy itself for anything else, or for everything with
  ``native_fhirpath=False``).
* Each patient's record is indexed once (:class:`PatientIndex`: by resource type and by
  ``(type, system, code)``), and every input is resolved at most once per patient, however many
  trials use it. Resources stay plain dicts.
* The engine keeps no mutable state after construction, so one engine can serve many threads.

Semantics implemented here, beyond the table in the trial format:

* Resources marked ``entered-in-error`` are ignored everywhere, as are cancelled / not-done /
  not-taken medication and procedure records, refuted Conditions and AllergyIntolerances, and
  Observations whose status is not ``final``, ``amended`` or ``corrected``. Resources dated after
  the as-of date are ignored (they were not known then). Dates are compared at day precision, as
  written (no time-zone shift); a partial date counts as its first day.
* A ``latest`` Observation input uses the most recent result in its look-back window (effective
  date, then ``issued``, then id). If that result is unusable (unit that cannot be converted, no
  value, unreadable string), the input is empty and the criterion's reason says why: the engine
  does not silently fall back to an older result.
* Censored values (``<0.5``, ``>1000``, from ``valueQuantity.comparator`` or ``valueString``) are
  replaced by the two ends of the interval they describe (``[0, 0.5)``, ``(1000, 10^12]``). The
  condition is evaluated at both; if the answers agree that answer is used, otherwise the
  criterion is ``unknown``. This is exact for threshold comparisons (monotonic in the value),
  which is what eligibility conditions are. A partial birth date is handled the same way for
  ``%age`` (youngest and oldest possible age).
* Upper limit of normal: the Observation's ``referenceRange.high`` converted to the target unit;
  when it has none (or its unit cannot be converted) the analyte's default from
  ``mappings/analytes.json``. The reason says which one was used.
* Condition clinical status: ``current`` = active, recurrence, relapse, or no clinicalStatus at
  all (systems often omit it for current problems); ``history`` = current plus remission,
  resolved, inactive.
* Observations whose codes match no code any trial asks for are passed through the terminology's
  ConceptMaps (local lab codes), when a terminology is given.
* A deceased patient (``deceasedBoolean`` true, or ``deceasedDateTime`` on or before the as-of
  date) gets a synthetic failing exclusion criterion ``patient-deceased`` first in every trial.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final, TypeVar

from pydantic import BaseModel

from . import units
from .errors import TrialDefinitionError, UnitError
from .fhirpath import compile_expression, parse_expression, reads_context
from .model import Criterion, DataInput, Outcome, Trial, TrialStatus, answers_value_set
from .qualitative import NEGATIVE_CODING, POSITIVE_CODING, read_coded_answer, read_qualitative
from .records import PatientRecord, reference_id
from .results import DECEASED_CRITERION_ID, CriterionResult, TrialResult
from .terminology import DiagnosisText, Terminology, canonical_coding, normalise_system

__all__ = [
    "Engine",
    "PatientIndex",
    "age_range",
    "combine_group",
    "trial_status",
]

log = logging.getLogger(__name__)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"

#: what an Observation component carries of its own (the rest comes from the panel)
_COMPONENT_FIELDS = frozenset({"code", "interpretation", "dataAbsentReason", "referenceRange"})
#: a panel's fields that belong to its own result (and every ``value[x]``), not to its components'
_RESULT_FIELDS = frozenset(
    {"code", "component", "interpretation", "dataAbsentReason", "referenceRange", "hasMember"}
)

OBSERVATION_OK = frozenset({"final", "amended", "corrected"})
_DROP_STATUS: dict[str, frozenset[str]] = {
    "Procedure": frozenset({"not-done", "entered-in-error"}),
    "MedicationRequest": frozenset({"cancelled", "entered-in-error"}),
    "MedicationStatement": frozenset({"not-taken", "entered-in-error"}),
    "MedicationAdministration": frozenset({"not-done", "entered-in-error"}),
    "MedicationDispense": frozenset({"cancelled", "declined", "entered-in-error"}),
}
_DROP_VERIFICATION = frozenset({"entered-in-error", "refuted"})
CURRENT_STATUSES = frozenset({"active", "recurrence", "relapse"})
HISTORY_STATUSES = CURRENT_STATUSES | {"remission", "resolved", "inactive"}
MEDICATION_TYPES = frozenset(
    {"MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense"}
)
#: pseudo code system of medicine names found in a record's text (see mappings/medications)
MEDICATION_NAME_SYSTEM = "https://fhirmatch.dev/fhir/CodeSystem/medication-name"

#: where each type keeps its clinically relevant date, in order of preference
_DATE_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "Observation": ("effectiveDateTime", "effectiveInstant", "effectivePeriod", "issued"),
    "Condition": ("onsetDateTime", "onsetPeriod", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod"),
    "MedicationRequest": ("authoredOn",),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod", "dateAsserted"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod"),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "AllergyIntolerance": ("onsetDateTime", "onsetPeriod", "recordedDate"),
}
_GENERIC_DATE_FIELDS: Final = (
    "effectiveDateTime",
    "effectivePeriod",
    "date",
    "recordedDate",
    "issued",
)

_CENSOR_LOW = 0.0
_CENSOR_HIGH = 1e12
_MAX_VARIANTS = 16
_SCORE_UNITS = frozenset({"{score}", "1", "{Score}", "{ScoreOf}"})


# --------------------------------------------------------------------------- dates and ages


_UNSET: Final[Any] = object()


def _date_key(value: Any) -> str | None:
    """An ISO date string (YYYY[-MM[-DD]]) from a FHIR date/dateTime/instant/Period, or None."""
    if isinstance(value, dict):  # Period: its end if known, else its start
        value = value.get("end") or value.get("start")
    if isinstance(value, str) and len(value) >= 4:
        return value[:10]
    return None


@functools.lru_cache(maxsize=65536)
def _to_date(key: str) -> date | None:
    """The first day a (partial) ISO date can denote (results of one day share their dates,
    and each is checked against several windows: remembered)."""
    try:
        parts = key.split("-")
        year = int(parts[0])
        month = int(parts[1]) if len(parts) > 1 else 1
        day = int(parts[2]) if len(parts) > 2 else 1
        return date(year, month, day)
    except (ValueError, IndexError):
        return None


def _years_between(born: date, as_of: date) -> int:
    return as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))


def age_range(birth_date: object, as_of: date) -> tuple[int, int] | None:
    """(youngest, oldest) possible age in whole years at ``as_of``; None when not computable.

    ``1960-05-17`` gives one age; ``1960-05`` and ``1960`` give the range of ages a birth on any
    day of that month or year would give.
    """
    if not isinstance(birth_date, str):
        return None
    parts = birth_date[:10].split("-")
    try:
        year = int(parts[0])
        if len(parts) >= 3:
            born = date(year, int(parts[1]), int(parts[2]))
            years = _years_between(born, as_of)
            return years, years
        if len(parts) == 2:
            month = int(parts[1])
            first = date(year, month, 1)
            nxt = date(year + (month == 12), month % 12 + 1, 1)
            last = date.fromordinal(nxt.toordinal() - 1)
        else:
            first, last = date(year, 1, 1), date(year, 12, 31)
    except (ValueError, IndexError):
        return None
    return _years_between(last, as_of), _years_between(first, as_of)


def _resource_date(resource: dict[str, Any]) -> str | None:
    for name in _DATE_FIELDS.get(resource.get("resourceType", ""), _GENERIC_DATE_FIELDS):
        key = _date_key(resource.get(name))
        if key:
            return key
    return None


def _ref(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id', '?')}"


def _items(value: Any) -> list[Any]:
    """The items of an element that FHIR makes a JSON array; none when a malformed resource has
    a value of another type there (read as absent, never a reason to stop)."""
    return value if isinstance(value, list) else []


def _code_of(cc: Any) -> str:
    """A human label for a CodeableConcept (its text, or the first coding's display or code)."""
    if not isinstance(cc, dict):
        return "?"
    if isinstance(cc.get("text"), str):
        return cc["text"]
    for coding in _items(cc.get("coding")):
        if isinstance(coding, dict):
            return str(coding.get("display") or coding.get("code") or "?")
    return "?"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _tail(url: str | None) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] if url else "?"


# --------------------------------------------------------------------------- the patient index


def _codings(cc: Any) -> list[tuple[str, str]]:
    """The codings of a CodeableConcept as (system, code), in the form ValueSet expansions use
    (canonical system URL for OIDs and aliases, ICD-10 codes with their dot)."""
    out: list[tuple[str, str]] = []
    if isinstance(cc, dict):
        for coding in _items(cc.get("coding")):
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    canonical = _CANONICAL.get((system, code))
                    if canonical is None:
                        if len(_CANONICAL) >= _MAX_CANONICAL:
                            _CANONICAL.clear()
                        canonical = _CANONICAL[system, code] = canonical_coding(system, code)
                    out.append(canonical)
    return out


#: :func:`~fhirmatch.terminology.canonical_coding` of the codings met lately (a population's
#: records repeat a few thousand codes), and its bound
_CANONICAL: Final[dict[tuple[str, str], tuple[str, str]]] = {}
_MAX_CANONICAL: Final = 65536


def _names_in(pattern: re.Pattern[str], text: str) -> list[str]:
    """The medicine names ``pattern`` finds in a medication's text, in lower case (remembered:
    a population's prescriptions repeat a few hundred texts, and the search is slow)."""
    # by the pattern's id, not the pattern: hashing a pattern hashes its whole compiled program
    # (thousands of names) every time; the pattern is kept beside its table, so its id is not
    # reused while the table is remembered
    held = _NAMES_IN_TEXT.get(id(pattern))
    if held is None or held[0] is not pattern:
        if len(_NAMES_IN_TEXT) >= _MAX_PATTERNS:
            _NAMES_IN_TEXT.clear()
        held = _NAMES_IN_TEXT[id(pattern)] = (pattern, {})
    table = held[1]
    found = table.get(text)
    if found is None:
        if len(table) >= _MAX_NAMES_IN_TEXT:
            table.clear()
        found = table[text] = [name.lower() for name in pattern.findall(text)]
    return found


#: :func:`_names_in` of the texts met lately, per pattern (each engine has its own): by the
#: pattern's ``id()``, the pattern and its texts; and their bounds
_NAMES_IN_TEXT: Final[dict[int, tuple[re.Pattern[str], dict[str, list[str]]]]] = {}
_MAX_PATTERNS: Final = 64
_MAX_NAMES_IN_TEXT: Final = 16384


ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"})


def icd_ancestors(code: str) -> list[str]:
    """``C79.31`` -> ``["C79.3", "C79"]``: the categories an ICD-10(-CM) code descends from
    (its code structure is hierarchical by prefix). Accepts codes written without the dot."""
    code = code.strip().upper()
    if "." not in code and len(code) > 3:
        code = f"{code[:3]}.{code[3:]}"
    out: list[str] = []
    while len(code) > 3:
        code = code[:-1].rstrip(".")
        out.append(code)
    return out


def _status_code(cc: Any) -> str | None:
    """The first code of a status CodeableConcept (the system may be omitted)."""
    if isinstance(cc, dict):
        for coding in _items(cc.get("coding")):
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                return str(coding["code"])
    return None


def _is_usable(resource: dict[str, Any]) -> bool:
    """False for records that must be ignored everywhere (entered in error, cancelled ...)."""
    rtype = resource.get("resourceType")
    status = resource.get("status")
    if not isinstance(status, str):
        status = None  # read as absent
    if status == "entered-in-error":
        return False
    if rtype == "Observation":
        return status in OBSERVATION_OK
    if rtype in ("Condition", "AllergyIntolerance"):
        return _status_code(resource.get("verificationStatus")) not in _DROP_VERIFICATION
    if rtype == "MedicationRequest" and resource.get("doNotPerform") is True:
        return False
    drop = _DROP_STATUS.get(rtype or "")
    return not (drop and status in drop)


def may_be_found(
    res: dict[str, Any],
    rtype: str,
    known_codes: frozenset[tuple[str, str]],
    *,
    local_codes_map: bool,
) -> bool:
    """Whether a (non-medication) resource could match an input: one of its codes is known, is
    an ICD-10 code below a known category, or is a local Observation code a ConceptMap may map
    (``local_codes_map``: a terminology with ConceptMaps is in use). The index keeps only these
    (:class:`PatientIndex`), and reading NDJSON drops the others early
    (:class:`fhirmatch.records.ResourceFilter`)."""
    return _codes_may_be_found(_codings(res.get("code")), rtype, known_codes, local_codes_map)


def _codes_may_be_found(
    codes: Iterable[tuple[str, str]],
    rtype: str,
    known_codes: frozenset[tuple[str, str]],
    local_codes_map: bool,
) -> bool:
    """:func:`may_be_found` of a resource whose codings are ``codes``."""
    local = False
    for system, code in codes:
        if (system, code) in known_codes:
            return True
        if system in ICD10_SYSTEMS and any((system, a) in known_codes for a in icd_ancestors(code)):
            return True
        local = local or system != LOINC
    return local and rtype == "Observation" and local_codes_map


@dataclass(frozen=True)
class TextDiagnosisRule:
    """Which Conditions are diagnoses recorded only as text: coded in none of ``systems`` (the
    code systems every input with ``review-text-diagnoses`` reads; no code at all, or a local
    or unmapped system only) and named in cancer-like words (``code.text`` or a coding's
    display, by the wording table)."""

    systems: frozenset[str]
    wording: DiagnosisText

    def matches(self, condition: dict[str, Any]) -> bool:
        cc = condition.get("code")
        if not isinstance(cc, dict):
            return False
        codings = _items(cc.get("coding"))
        systems = self.systems
        for coding in codings:  # on the hot path: most Conditions are coded in a known system
            if isinstance(coding, dict):
                system = coding.get("system")
                if isinstance(system, str) and (
                    system in systems or normalise_system(system) in systems
                ):
                    return False
        texts = [cc.get("text")]
        texts += [c.get("display") for c in codings if isinstance(c, dict)]
        return any(isinstance(t, str) and self.wording.is_cancer_like(t) for t in texts)


class PatientIndex:
    """One patient's usable resources, indexed by type and by ``(type, system, code)``.

    Built once per patient and shared by every trial. ``known_codes`` (the codes any trial asks
    for) and ``terminology`` let unrecognised (local) Observation codes be mapped through
    ConceptMaps. ``types``, when given, limits the index to those resource types, and
    ``only_known`` leaves out resources that no code in ``known_codes`` can find (the engine
    passes both: most of a record, Encounters, Claims, vital signs ..., is never looked at).
    """

    __slots__ = (
        "_ages",
        "_dates",
        "_found",
        "_names",
        "_order",
        "_type_ancestors",
        "_type_codes",
        "as_of",
        "by_ancestor",
        "by_code",
        "by_type",
        "patient",
        "problems",
        "terminology",
        "text_conditions",
    )

    def __init__(
        self,
        resources: Iterable[dict[str, Any]],
        *,
        as_of: date,
        known_codes: frozenset[tuple[str, str]] = frozenset(),
        terminology: Terminology | None = None,
        types: frozenset[str] | None = None,
        only_known: bool = False,
        medication_names: re.Pattern[str] | None = None,
        text_diagnoses: TextDiagnosisRule | None = None,
    ) -> None:
        self.as_of = as_of
        #: usable Conditions coded in none of the rule's systems whose text is cancer-like
        self.text_conditions: list[dict[str, Any]] = []
        #: finds the medicine names a trial asks for in a medication's text
        self._names = medication_names
        #: per resource type, each indexed resource's position in the record (built on demand)
        self._order: dict[str, dict[int, int]] = {}
        #: what :meth:`find` returned, per question (inputs of several trials ask the same)
        self._found: dict[tuple[str, frozenset[tuple[str, str]], str | None], list[Any]] = {}
        self.patient: dict[str, Any] | None = None
        self.by_type: dict[str, list[dict[str, Any]]] = {}
        self.by_code: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        #: ICD-10 resources under each category they descend from, with their own code
        self.by_ancestor: dict[tuple[str, str, str], list[tuple[dict[str, Any], str]]] = {}
        #: per resource type, the (system, code) pairs and ICD ancestors the record holds
        self._type_codes: dict[str, set[tuple[str, str]]] = {}
        self._type_ancestors: dict[str, set[tuple[str, str]]] = {}
        self.terminology = terminology
        self.problems: list[str] = []
        #: each indexed resource's date (:func:`_resource_date`) and its age in days at the as-of
        #: date (None: no date), by ``id()``: asked for once per input that finds it
        self._dates: dict[int, str | None] = {}
        self._ages: dict[int, int | None] = {}
        resources = list(resources)
        medications: dict[str, dict[str, Any]] | None = None  # built when first needed
        as_of_key = as_of.isoformat()
        local_codes_map = terminology is not None
        by_type, by_code, dates = self.by_type, self.by_code, self._dates
        for res in resources:
            rtype = res.get("resourceType")
            if not isinstance(rtype, str):
                continue
            if rtype == "Patient":
                if self.patient is None:
                    self.patient = res
                continue
            if rtype == "Medication" or (types is not None and rtype not in types):
                continue
            if (
                rtype == "Condition"
                and text_diagnoses is not None
                and text_diagnoses.matches(res)
                and _is_usable(res)
            ):
                noted = _resource_date(res)
                if noted is None or noted <= as_of_key[: len(noted)]:
                    self._dated(res, noted)
                    self.text_conditions.append(res)
            if rtype == "Observation" and known_codes and isinstance(res.get("component"), list):
                self._add_components(res, known_codes, as_of_key)
            is_medication = rtype in MEDICATION_TYPES
            own = [] if is_medication else _codings(res.get("code"))
            if (
                only_known
                and not is_medication
                and not _codes_may_be_found(own, rtype, known_codes, local_codes_map)
            ):
                continue
            if not _is_usable(res):
                continue
            when = _resource_date(res)
            if when is not None and when > as_of_key[: len(when)]:
                continue  # recorded after the as-of date
            dates[id(res)] = when  # self._dated(res, when), on the hot path
            of_type = by_type.get(rtype)
            if of_type is None:
                of_type = by_type[rtype] = []
            of_type.append(res)
            if is_medication:
                if medications is None:
                    medications = {
                        r["id"]: r
                        for r in resources
                        if r.get("resourceType") == "Medication" and isinstance(r.get("id"), str)
                    }
                codes = list(self._medication_codes(res, medications))
            else:
                codes = own
                if (
                    rtype == "Observation"
                    and terminology is not None
                    and codes
                    and not any(c in known_codes for c in codes)
                    and any(system != LOINC for system, _ in codes)
                ):
                    codes.extend(self._mapped_codes(res, terminology))
            type_codes = self._type_codes.get(rtype)
            if type_codes is None:
                type_codes = self._type_codes[rtype] = set()
            for system, code in codes:
                found = by_code.get((rtype, system, code))
                if found is None:
                    by_code[rtype, system, code] = [res]
                else:
                    found.append(res)
                type_codes.add((system, code))
                if system in ICD10_SYSTEMS:
                    type_ancestors = self._type_ancestors.setdefault(rtype, set())
                    for ancestor in icd_ancestors(code):
                        key = (rtype, system, ancestor)
                        self.by_ancestor.setdefault(key, []).append((res, code))
                        type_ancestors.add((system, ancestor))

    def _add_components(
        self, res: dict[str, Any], known_codes: frozenset[tuple[str, str]], as_of_key: str
    ) -> None:
        """Index each component of a panel Observation that an input asks for as a result of
        its own (the panel's id, status, subject and dates; the component's code and value): a
        pathology report sends the four mismatch-repair stains as components of one panel."""
        wanted: list[tuple[dict[str, Any], list[tuple[str, str]]]] = []
        for comp in res["component"]:
            if isinstance(comp, dict) and isinstance(comp.get("code"), dict):
                codes = [key for key in _codings(comp["code"]) if key in known_codes]
                if codes:
                    wanted.append((comp, codes))
        if not wanted or not _is_usable(res):
            return
        when = _resource_date(res)
        if when is not None and when > as_of_key[: len(when)]:
            return
        base = {
            k: v for k, v in res.items() if k not in _RESULT_FIELDS and not k.startswith("value")
        }
        type_codes = self._type_codes.setdefault("Observation", set())
        for comp, codes in wanted:
            own = {k: v for k, v in comp.items() if k in _COMPONENT_FIELDS or k.startswith("value")}
            part = {**base, **own}
            self._dated(part, when)
            self.by_type.setdefault("Observation", []).append(part)
            for system, code in codes:
                self.by_code.setdefault(("Observation", system, code), []).append(part)
                type_codes.add((system, code))

    def _medication_codes(
        self, res: dict[str, Any], medications: dict[str, dict[str, Any]]
    ) -> Iterator[tuple[str, str]]:
        concept: Any = None
        if "medicationCodeableConcept" in res:
            concept = res["medicationCodeableConcept"]
        else:
            ref = res.get("medicationReference")
            text = ref.get("reference") if isinstance(ref, dict) else None
            if isinstance(text, str):
                mid = reference_id(text, "Medication") or (
                    text[1:] if text.startswith("#") else None
                )
                med = medications.get(mid or "")
                if med is None and text.startswith("#"):
                    med = next(
                        (c for c in res.get("contained") or [] if c.get("id") == text[1:]), None
                    )
                if med is not None:
                    concept = med.get("code")
                else:
                    self.problems.append(f"{_ref(res)}: {text} not found in the record")
            if concept is None and isinstance(ref, dict):
                concept = {"text": ref.get("display")}  # a reference may only name the drug
        yield from _codings(concept)
        if self._names is not None and isinstance(concept, dict):
            texts = [concept.get("text")]
            codings = _items(concept.get("coding"))
            texts += [c.get("display") for c in codings if isinstance(c, dict)]
            for text in texts:
                if isinstance(text, str):
                    for name in _names_in(self._names, text):
                        yield MEDICATION_NAME_SYSTEM, name

    def _mapped_codes(self, res: dict[str, Any], terminology: Terminology) -> list[tuple[str, str]]:
        try:
            mapped = terminology.apply_concept_maps(res)
        except (ValueError, KeyError, TypeError) as exc:
            self.problems.append(f"{_ref(res)}: concept map failed ({type(exc).__name__})")
            return []
        return _codings(mapped.get("code"))

    def _dated(self, res: dict[str, Any], when: str | None) -> None:
        self._dates[id(res)] = when

    def date_of(self, res: dict[str, Any]) -> str | None:
        """:func:`_resource_date` of a resource (remembered for those the index holds)."""
        when = self._dates.get(id(res), _UNSET)
        return _resource_date(res) if when is _UNSET else when

    def within(self, res: dict[str, Any], days: int | None) -> bool:
        """Whether ``res`` is dated at most ``days`` days before the as-of date (always, when
        ``days`` is None; never, when it has no date)."""
        if days is None:
            return True
        age = self._ages.get(id(res), _UNSET)
        if age is _UNSET:
            key = self.date_of(res)
            day = _to_date(key) if key else None
            age = None if day is None else (self.as_of - day).days
            if id(res) in self._dates:
                self._ages[id(res)] = age
        return age is not None and age <= days

    def code_keys(self) -> Iterator[tuple[str, str, str]]:
        """Every ``(type, system, code)`` that :meth:`find` can find something under: the codes
        the record holds, and the ICD-10 categories its codes descend from."""
        for table in (self._type_codes, self._type_ancestors):
            for rtype, pairs in table.items():
                for system, code in pairs:
                    yield rtype, system, code

    def find(
        self,
        resource_type: str,
        codes: frozenset[tuple[str, str]],
        value_set: str | None = None,
    ) -> list[dict[str, Any]]:
        """Usable resources of ``resource_type`` with any of ``codes``, in record order.

        An ICD-10 code in ``codes`` is a category that stands for its descendants (value sets
        say ``is-a C15``): a resource coded ``C15.4`` is found through it, and confirmed against
        ``value_set`` with the terminology when both are known, so excludes below a category
        (``is-a C79`` except ``C79.31``) hold.
        """
        if not codes:
            return []
        key = (resource_type, codes, value_set)
        found = self._found.get(key)
        if found is None:
            found = self._found[key] = self._find(resource_type, codes, value_set)
        return list(found)

    def _find(
        self,
        resource_type: str,
        codes: frozenset[tuple[str, str]],
        value_set: str | None,
    ) -> list[dict[str, Any]]:
        seen: dict[int, dict[str, Any]] = {}
        by_code = self.by_code
        by_ancestor = self.by_ancestor
        term = self.terminology
        # walk the smaller side: a value set may expand to thousands of codes (every ICD code
        # below a block, every product of an ingredient), a record holds a few of each type
        present = self._type_codes.get(resource_type, ())
        wanted = [k for k in present if k in codes] if len(present) < len(codes) else codes
        for system, code in wanted:
            hits = by_code.get((resource_type, system, code))
            if hits:
                for r in hits:
                    seen[id(r)] = r
        above = self._type_ancestors.get(resource_type, ())
        if above:
            wanted = [k for k in above if k in codes] if len(above) < len(codes) else codes
            for system, code in wanted:
                if system not in ICD10_SYSTEMS:
                    continue
                for r, own in by_ancestor.get((resource_type, system, code), ()):
                    if term is None or value_set is None or term.contains(value_set, system, own):
                        seen[id(r)] = r
        if len(seen) > 1:
            order = self._order.get(resource_type)
            if order is None:
                order = {id(r): n for n, r in enumerate(self.by_type.get(resource_type, ()))}
                self._order[resource_type] = order
            return sorted(seen.values(), key=lambda r: order.get(id(r), 0))
        return list(seen.values())


# --------------------------------------------------------------------------- resolved inputs


@dataclass(slots=True)
class Binding:
    """An input resolved for one patient.

    ``variants`` holds the FHIRPath value(s) of ``%name``: one list normally, two when the value
    is censored (the two ends of its interval). ``found`` is False when no record exists at all
    (closed-world exclusions pass then); ``summary`` describes what was used, ``missing`` why the
    value is empty.
    """

    variants: tuple[list[dict[str, Any]], ...]
    evidence: tuple[str, ...]
    summary: str
    missing: str | None
    found: bool
    #: qualitative results that could not be read as positive or negative (the variants read
    #: them both ways), and why
    undecided: str | None = None
    #: why the value has two variants when it is not a censored value (records that may or may
    #: not be members: a drug class code that also covers other drugs)
    ambiguity: str | None = None
    #: the record holds nothing the input could match, in or out of its window: the binding is
    #: the same for every such patient (see :func:`_absent`)
    absent: bool = False

    @property
    def empty(self) -> bool:
        return not self.variants[0]


def _clinical_status_ok(resource: dict[str, Any], need: str) -> bool:
    if need == "any" or resource.get("resourceType") != "Condition":
        return True
    status = _status_code(resource.get("clinicalStatus"))
    if status is None:
        return True
    allowed = CURRENT_STATUSES if need == "current" else HISTORY_STATUSES
    return status in allowed


def _instant_key(value: Any) -> str:
    """A sortable form of a FHIR date/dateTime/instant/Period: to the second and in UTC when it
    has a time (so two results of one day are ordered by their time, whatever their offsets),
    else the date itself (a date sorts before any time on that day)."""
    if isinstance(value, dict):  # Period: its end if known, else its start
        value = value.get("end") or value.get("start")
    if not isinstance(value, str) or len(value) < 4:
        return ""
    return _text_instant_key(value)


@functools.lru_cache(maxsize=65536)
def _text_instant_key(value: str) -> str:
    """:func:`_instant_key` of a string (the results of one panel share their times)."""
    if len(value) > 10 and "T" in value:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value[:10]
        if when.tzinfo is not None:
            when = when.astimezone(UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return value[:10]


def _sort_key(resource: dict[str, Any]) -> tuple[str, str, str]:
    when = ""
    for name in _DATE_FIELDS.get(resource.get("resourceType", ""), _GENERIC_DATE_FIELDS):
        when = _instant_key(resource.get(name))
        if when:
            break
    return (when, _instant_key(resource.get("issued")), str(resource.get("id") or ""))


def _is_score_unit(unit: str | None) -> bool:
    return unit is not None and (
        unit in _SCORE_UNITS or (unit.startswith("{") and unit.endswith("}"))
    )


class _Unusable(Exception):
    """An Observation value that cannot be used; the message says why (no values in it)."""


def _read_value(
    obs: dict[str, Any], inp: DataInput, terminology: Terminology
) -> tuple[float, str | None, str | None]:
    """(value, unit, comparator) of an Observation, before conversion."""
    rid = _ref(obs)
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        value = q.get("value") if isinstance(q, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _Unusable(f"{rid}: valueQuantity has no numeric value")
        unit = q.get("code") if q.get("system") == UCUM and q.get("code") else q.get("unit")
        return float(value), unit if isinstance(unit, str) else None, q.get("comparator")
    if "valueInteger" in obs:
        value = obs["valueInteger"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Unusable(f"{rid}: valueInteger is not an integer")
        return float(value), None, None
    if "valueCodeableConcept" in obs:
        # the answers to the input's question (ecog -> ecog-answers) carry their scores: LOINC
        # LA9627-6 "Dead" is ECOG 5 but Karnofsky 0
        scores = (
            terminology.ordinal_values(answers_value_set(inp.value_set)) if inp.value_set else {}
        )
        found = {
            score
            for system, code in _codings(obs["valueCodeableConcept"])
            if (score := scores.get((system, code))) is not None
        }
        if len(found) == 1:
            return found.pop(), None, None
        if found:
            raise _Unusable(f"{rid}: coded answers of different scores")
        raise _Unusable(f"{rid}: coded answer is not a known score")
    if "valueString" in obs:
        text = obs["valueString"]
        parsed = units.parse_value_string(text) if isinstance(text, str) else None
        if parsed is None:
            raise _Unusable(f"{rid}: valueString is not a number")
        return float(parsed.value), parsed.unit, parsed.comparator
    raise _Unusable(f"{rid}: no value")


def _check_plausible(
    inp: DataInput, value: float, rid: str, terminology: Terminology | None = None
) -> None:
    """Refuse values no patient can have: a negative count, concentration or score, a score
    outside its scale (the lowest to the highest score of the question's answers ValueSet,
    ``ecog-answers``: 0-5), or more than the analyte's ``plausible_max``
    (``mappings/analytes.json``). Such a value is a data error (a wrong unit, a typo), never a
    result to compare."""
    if value < 0:
        raise _Unusable(f"{rid}: a negative value is not a possible result")
    if terminology is not None and inp.value_set:
        scores = terminology.ordinal_values(answers_value_set(inp.value_set))
        if scores:
            low, high = min(scores.values()), max(scores.values())
            if not low <= value <= high:
                raise _Unusable(f"{rid}: score outside its scale {low:g}-{high:g}")
    if inp.analyte and inp.unit:
        try:
            info = units.analyte_info(inp.analyte)
        except UnitError:
            return
        ceiling = _ceiling(info, inp.analyte, inp.unit)
        if ceiling is not None and value > ceiling:
            raise _Unusable(f"{rid}: value above any possible {info.display} result")


#: (id of an analyte's table entry, unit) -> (the entry, its ceiling in the unit): the entry is
#: kept, so its id is not reused while remembered, and a table read again gets new entries
_CEILINGS: dict[tuple[int, str], tuple[units.AnalyteInfo, float | None]] = {}


def _ceiling(info: units.AnalyteInfo, analyte: str, unit: str) -> float | None:
    """The analyte's ``plausible_max`` in ``unit``, or None when it has none or it cannot be
    converted (remembered: every lab result is checked against it)."""
    hit = _CEILINGS.get((id(info), unit))
    if hit is not None and hit[0] is info:
        return hit[1]
    ceiling: float | None = None
    if info.plausible_max is not None:
        try:
            ceiling = units.convert(info.plausible_max, info.unit, unit, analyte=analyte)
        except UnitError:
            ceiling = None
    if len(_CEILINGS) >= 1024:
        _CEILINGS.clear()
    _CEILINGS[(id(info), unit)] = (info, ceiling)
    return ceiling


def _convert(value: float, unit: str | None, inp: DataInput, rid: str) -> float:
    target = inp.unit
    if target is None:
        return value
    if _is_score_unit(target):
        if unit in (None, "") or _is_score_unit(unit):
            return value
        raise _Unusable(f"{rid}: unit '{unit}' is not a score")
    if not unit:
        raise _Unusable(f"{rid}: value has no unit (expected {target})")
    try:
        return units.convert(value, unit, target, analyte=inp.analyte)
    except UnitError:
        raise _Unusable(f"{rid}: unit '{unit}' cannot be converted to {target}") from None


def _uln(obs: dict[str, Any], inp: DataInput, value_unit: str | None) -> tuple[float, str] | None:
    """(upper limit of normal in the target unit, where it came from), or None."""
    rid = _ref(obs)
    for rr in _items(obs.get("referenceRange")):
        high = rr.get("high") if isinstance(rr, dict) else None
        if isinstance(high, dict) and isinstance(high.get("value"), int | float):
            unit = high.get("code") if high.get("system") == UCUM and high.get("code") else None
            unit = unit or high.get("unit") or value_unit
            if not isinstance(unit, str):
                continue  # a unit of another JSON type: this range cannot be read
            try:
                return _convert(float(high["value"]), unit, inp, rid), "reference range"
            except _Unusable:
                break  # fall back to the default, and say so
    if inp.analyte:
        try:
            default = units.default_uln(inp.analyte)
            if default is not None:
                value = _convert(float(default[0]), default[1], inp, rid)
                return value, f"default ULN for {inp.analyte}"
        except (_Unusable, UnitError):
            return None
    return None


def _quantity(value: float, unit: str | None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    if unit:
        q.update(unit=unit, system=UCUM, code=unit)
    return q


def _censored(value: float, comparator: str) -> tuple[float, float]:
    if comparator in ("<", "<="):
        high = value if comparator == "<=" else math.nextafter(value, -math.inf)
        return min(_CENSOR_LOW, high), high
    low = value if comparator == ">=" else math.nextafter(value, math.inf)
    return low, max(_CENSOR_HIGH, low)


def _extra_filters_ok(resource: dict[str, Any], inp: DataInput, index: PatientIndex) -> bool:
    """Whether the resource's other filtered elements (``bodySite``) hold a code of their
    ValueSets. Without a terminology nothing can be checked, so nothing passes."""
    if not inp.extra_filters:
        return True
    term = index.terminology
    if term is None:
        return False
    for path, url in inp.extra_filters:
        value = resource.get(path)
        concepts = value if isinstance(value, list) else [value]
        if not any(term.matches(url, c) for c in concepts if isinstance(c, dict)):
            return False
    return True


def _list_summary(inp: DataInput, records: list[dict[str, Any]]) -> str:
    parts = [
        f"{_ref(r)} {_code_of(r.get('code') or r.get('medicationCodeableConcept'))}"
        f" ({_resource_date(r) or 'no date'})"
        for r in records[:5]
    ]
    more = f" and {len(records) - 5} more" if len(records) > 5 else ""
    return "; ".join(parts) + more


def _qualitative(
    inp: DataInput, matches: list[dict[str, Any]], terminology: Terminology
) -> Binding:
    """Each Observation (or the latest) read by :func:`fhirmatch.qualitative.read_qualitative`:
    ``%name`` holds copies whose ``valueCodeableConcept`` is the reading (SNOMED Positive or
    Negative). A result that cannot be read is taken both ways (two variants), so the criterion
    is decided only when the answer does not depend on it."""
    chosen = [max(matches, key=_sort_key)] if inp.select == "latest" else matches
    decided: list[dict[str, Any]] = []
    unread: list[dict[str, Any]] = []
    parts: list[str] = []
    why: list[str] = []
    for obs in chosen:
        reading = read_qualitative(obs, terminology, inp.threshold)
        base = {k: v for k, v in obs.items() if not k.startswith("value") and k != "interpretation"}
        when = _resource_date(obs) or "no date"
        if reading.result is None:
            unread.append(base)
            why.append(f"{_ref(obs)}: {reading.source}")
            parts.append(f"{_ref(obs)} not readable ({when})")
            continue
        coding = POSITIVE_CODING if reading.result == "positive" else NEGATIVE_CODING
        decided.append({**base, "valueCodeableConcept": {"coding": [dict(coding)]}})
        parts.append(f"{_ref(obs)} {reading.result} ({when})")
    more = f" and {len(parts) - 5} more" if len(parts) > 5 else ""
    summary = f"{inp.name}: " + "; ".join(parts[:5]) + more
    evidence = tuple(dict.fromkeys(_ref(r) for r in chosen))  # a panel's components: one ref
    if not unread:
        return Binding((decided,), evidence, summary, None, True)
    both = tuple(
        decided + [{**b, "valueCodeableConcept": {"coding": [dict(coding)]}} for b in unread]
        for coding in (POSITIVE_CODING, NEGATIVE_CODING)
    )
    return Binding(both, evidence, summary, None, True, "; ".join(why))


def _read_answers(
    matches: list[dict[str, Any]], terminology: Terminology, value_sets: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Results written as text ("MSS") read as the coded answer they name, so conditions over
    ``valueCodeableConcept`` see them; what cannot be read stays as it is (undecided)."""
    out = []
    for obs in matches:
        answer = read_coded_answer(obs, terminology, value_sets)
        if answer is None:
            out.append(obs)
            continue
        text = obs.get("valueString")
        if not isinstance(text, str):
            text = (obs.get("valueCodeableConcept") or {}).get("text")
        copy = {k: v for k, v in obs.items() if not k.startswith("value")}
        coding = {"system": answer[0], "code": answer[1]}
        copy["valueCodeableConcept"] = {"coding": [coding], "text": text}
        out.append(copy)
    return out


_DEFAULT_TERMINOLOGY: list[Terminology] = []


def _fallback_terminology() -> Terminology:
    """The repository's ValueSets, for engines built without a terminology."""
    if not _DEFAULT_TERMINOLOGY:
        from .terminology import Terminology

        _DEFAULT_TERMINOLOGY.append(Terminology.load())
    return _DEFAULT_TERMINOLOGY[0]


def _start_date(resource: dict[str, Any]) -> str | None:
    """When a resource (a treatment) began: its date, or the start of its period."""
    for name in _DATE_FIELDS.get(resource.get("resourceType", ""), _GENERIC_DATE_FIELDS):
        value = resource.get(name)
        if isinstance(value, dict):
            value = value.get("start") or value.get("end")
        key = _date_key(value)
        if key:
            return key
    return None


def resolve_input(
    index: PatientIndex,
    inp: DataInput,
    terminology: Terminology | None = None,
    after: tuple[str | None, str] | None = None,
) -> Binding:
    """Resolve one data requirement against a patient's index (``terminology`` reads qualitative
    results; the index's, or the repository's ValueSets, when not given). ``after`` is
    ``(earliest date of the inputs named in inp.after, their names)``: only resources dated after
    it count; when those inputs have no record, a found resource cannot be placed and the input
    is empty with the reason."""
    as_of = index.as_of

    def in_scope(r: dict[str, Any]) -> bool:
        # everything but the look-back window, so older records can be named in the reason
        return _clinical_status_ok(r, inp.clinical_status) and _extra_filters_ok(r, inp, index)

    candidates = index.find(inp.resource_type, inp.codes, inp.value_set)
    if inp.clinical_status != "any" or inp.extra_filters:
        candidates = [r for r in candidates if in_scope(r)]
    days = inp.lookback_days
    within = index.within
    matches = [r for r in candidates if within(r, days)]
    possible: list[dict[str, Any]] = []
    if inp.possible_codes:
        certain = {id(r) for r in matches}
        possible = [
            r
            for r in index.find(inp.resource_type, inp.possible_codes)
            if id(r) not in certain and in_scope(r) and within(r, days)
        ]
    if not matches and not possible and inp.text_systems and index.text_conditions:
        texts = [
            r
            for r in index.text_conditions
            if not any(system in inp.text_systems for system, _c in _codings(r.get("code")))
            and in_scope(r)
            and within(r, days)
        ]
        if texts:
            refs = tuple(_ref(r) for r in texts)
            listed = ", ".join(refs[:5]) + (f" and {len(refs) - 5} more" if len(refs) > 5 else "")
            why = (
                f"{listed}, recorded without a code of the systems ValueSet "
                f"{_tail(inp.value_set)} uses, is such a diagnosis (review the diagnosis "
                f"recorded as text: {listed})"
            )
            summary = f"{inp.name}: none coded; perhaps {listed} (a diagnosis recorded as text)"
            return Binding(([], texts), refs, summary, None, True, ambiguity=why)
    if not matches and not possible:
        if not candidates:
            return _absent(inp, as_of)
        older = max((d for r in candidates if (d := index.date_of(r))), default=None)
        # say that older records exist: the window, not the record, is what is missing
        latest = f"; the latest, {older[:10]}, is outside the window" if older else ""
        return Binding(([],), (), "", f"{_absent(inp, as_of).missing}{latest}", False)
    if after is not None:
        start, names = after
        if start is None:
            refs = tuple(_ref(r) for r in matches)
            why = f"{inp.name}: cannot tell which results follow the start of {names} (no record)"
            return Binding(([],), refs, "", why, True)
        matches = [r for r in matches if (index.date_of(r) or "") > start]
        if not matches:
            label, window = _label(inp), _window(inp, as_of)
            why = f"no record of {label}{window} after the start of {names} ({start})"
            return Binding(([],), (), "", why, False)
    if inp.qualitative:
        return _qualitative(
            inp, matches, terminology or index.terminology or _fallback_terminology()
        )
    if inp.answer_sets:
        matches = _read_answers(
            matches, terminology or index.terminology or _fallback_terminology(), inp.answer_sets
        )
    if inp.select != "latest":
        refs = tuple(dict.fromkeys(_ref(r) for r in matches + possible))
        summary = f"{inp.name}: " + (_list_summary(inp, matches) if matches else "none for sure")
        if not possible:
            return Binding((matches,), refs, summary, None, True)
        maybe = _list_summary(inp, possible)
        ambiguity = (
            f"{maybe} counts for {inp.name}: it is coded only by a class that also covers "
            "other drugs (review which drug was given)"
        )
        summary += f"; perhaps {maybe} (coded by a drug class only)"
        return Binding(
            (matches, matches + possible), refs, summary, None, True, ambiguity=ambiguity
        )
    obs = matches[0] if len(matches) == 1 else max(matches, key=_sort_key)
    rid = _ref(obs)
    when = index.date_of(obs) or "no date"
    try:
        term = terminology or index.terminology or _fallback_terminology()
        value, unit, comparator = _read_value(obs, inp, term)
        converted = _convert(value, unit, inp, rid)
        _check_plausible(inp, converted, rid, term)
    except _Unusable as exc:
        return Binding(([],), (rid,), "", f"latest {inp.name} result unusable: {exc}", True)
    target = inp.unit if inp.unit is not None else unit
    shown_unit = "" if target is None or _is_score_unit(target) else f" {target}"
    uln = _uln(obs, inp, unit)
    base: dict[str, Any] = {
        "resourceType": "Observation",
        "id": obs.get("id"),
        "status": obs.get("status"),
        "code": obs.get("code"),
    }
    if "effectiveDateTime" in obs:
        base["effectiveDateTime"] = obs["effectiveDateTime"]
    if uln is not None:
        base["referenceRange"] = [{"high": _quantity(uln[0], target)}]
    uln_text = f"; ULN {_fmt(uln[0])}{shown_unit} from {uln[1]}" if uln else ""
    if comparator in ("<", "<=", ">", ">="):
        ends = _censored(converted, comparator)
        variants = tuple([{**base, "valueQuantity": _quantity(v, target)}] for v in ends)
        text = f"{comparator}{_fmt(converted)}"
    else:
        variants = ([{**base, "valueQuantity": _quantity(converted, target)}],)
        text = _fmt(converted)
    summary = f"{inp.name} {text}{shown_unit} ({rid}, {when}{uln_text})"
    return Binding(variants, (rid,), summary, None, True)


def _label(inp: DataInput) -> str:
    return f"{inp.name} ({inp.resource_type} in ValueSet {_tail(inp.value_set)})"


def _window(inp: DataInput, as_of: date) -> str:
    return f" within {inp.lookback_days} days before {as_of}" if inp.lookback_days else ""


@functools.lru_cache(maxsize=4096)
def _absent(inp: DataInput, as_of: date) -> Binding:
    """The binding of an input for a record with nothing it could match (most records, for most
    inputs): built once per input and as-of date, and marked so that a criterion whose inputs
    are all absent is decided once too (:meth:`Engine._evaluate_condition`)."""
    status = "" if inp.clinical_status == "any" else f" ({inp.clinical_status})"
    why = f"no record of {_label(inp)}{status}{_window(inp, as_of)}"
    return Binding(([],), (), "", why, False, absent=True)


# --------------------------------------------------------------------------- combining outcomes


def combine_group(selection: str, outcomes: Sequence[Outcome]) -> Outcome:
    """A group's outcome from its children's (manual children are ignored).

    ``all``: fail if any child fails, else unknown if any is unknown, else pass.
    ``any``: pass if any child passes; otherwise, if a manual alternative remains, manual (a
    person may still find the patient qualifies that way, so the computable alternatives'
    failure must not exclude); else unknown if any is unknown, else fail.
    A group whose children are all manual is manual.
    """
    computable = [o for o in outcomes if o != "manual"]
    if not computable:
        return "manual"
    if selection == "any":
        if "pass" in computable:
            return "pass"
        if len(computable) < len(outcomes):
            return "manual"
        return "unknown" if "unknown" in computable else "fail"
    if "fail" in computable:
        return "fail"
    return "unknown" if "unknown" in computable else "pass"


def trial_status(outcomes: Iterable[Outcome]) -> TrialStatus:
    """``ineligible`` if any criterion fails, else ``insufficient-data`` if any computable one is
    unknown, else ``eligible``; manual criteria never change the status."""
    seen = set(outcomes)
    if "fail" in seen:
        return "ineligible"
    if "unknown" in seen:
        return "insufficient-data"
    return "eligible"


# --------------------------------------------------------------------------- compiled trials


Evaluator = Callable[[dict[str, Any], dict[str, Any]], list[Any]]


@dataclass(frozen=True)
class _CompiledCriterion:
    criterion: Criterion
    evaluator: Evaluator | None
    uses_age: bool
    uses_patient: bool
    uses_uln: frozenset[str]
    children: tuple[_CompiledCriterion, ...]
    #: inputs named only by other inputs' after-start-of (their records date the others)
    anchors: frozenset[str] = frozenset()
    #: the criterion's inputs, one object for equal inputs of every trial of an engine (looked
    #: up by identity in each patient's bindings, and resolved once for all trials)
    inputs: tuple[DataInput, ...] = ()
    #: ``id()`` of each of ``inputs``
    input_ids: tuple[int, ...] = ()
    #: what the criterion is: "manual", "group" or "condition"
    form: str = "condition"


def _compile(
    criterion: Criterion,
    trial: Trial,
    problems: list[str],
    native: bool = True,
    terminology: Terminology | None = None,
    shared: dict[DataInput, DataInput] | None = None,
) -> _CompiledCriterion:
    evaluator: Evaluator | None = None
    expr = criterion.expression
    if expr and not criterion.is_manual and not criterion.is_group:
        syntax = parse_expression(expr).problems
        if syntax:
            problems.extend(f"{criterion.id}: FHIRPath condition: {p}" for p in syntax)
        else:
            try:
                evaluator = compile_expression(expr, native=native, terminology=terminology)
            except Exception as exc:  # fhirpathpy raises many exception types
                problems.append(f"{criterion.id}: FHIRPath condition does not compile ({exc})")
    elif not criterion.is_manual and not criterion.is_group:
        problems.append(f"{criterion.id}: no condition and no manual-review reason")
    shared = {} if shared is None else shared
    children = tuple(
        _compile(c, trial, problems, native, terminology, shared) for c in criterion.children
    )
    text = expr or ""
    inputs = tuple(shared.setdefault(i, i) for i in criterion.inputs)
    return _CompiledCriterion(
        criterion=criterion,
        evaluator=evaluator,
        uses_age="%age" in text,
        # the Patient is read through %patient, or as the resource the condition is evaluated on
        uses_patient="%patient" in text or (evaluator is not None and _reads_patient(expr)),
        uses_uln=frozenset(i.name for i in criterion.inputs if f"%{i.name}.referenceRange" in text),
        children=children,
        anchors=frozenset(
            ref.name for i in criterion.inputs for ref in i.after if f"%{ref.name}" not in text
        ),
        inputs=inputs,
        input_ids=tuple(id(i) for i in inputs),
        form="manual" if criterion.is_manual else "group" if criterion.is_group else "condition",
    )


def _reads_patient(expression: str | None) -> bool:
    """Whether a condition reads the resource it is evaluated on (the Patient) other than by
    ``%patient`` (:func:`fhirmatch.fhirpath.reads_context`): such a condition is never decided
    once for all patients whose inputs are absent."""
    tree = parse_expression(expression).tree if expression else None
    return tree is not None and reads_context(tree)


_M = TypeVar("_M", bound=BaseModel)
# Final, here and on the module's other constants read per patient: the compiled build keeps a
# Final name in a static variable instead of looking it up in the module's dict at each use
_new: Final = object.__new__
# the setters of the four slots of a pydantic model (what model_construct sets, by
# object.__setattr__): called directly, they skip the look-up of the attribute by name
_set_dict: Final = BaseModel.__dict__["__dict__"].__set__
_set_fields_set: Final = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra: Final = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private: Final = BaseModel.__dict__["__pydantic_private__"].__set__
#: bound on the group results and condition answers an engine remembers (a few per criterion
#: in practice)
_MAX_REMEMBERED: Final = 65536
#: per model, the set of all its field names: every result has every field set, so one set
#: serves all (pydantic only adds to it when a field is assigned, and each is in it already)
_ALL_FIELDS: Final[dict[type[BaseModel], set[str]]] = {}


def _construct(model: type[_M], /, **fields: Any) -> _M:
    """``model.model_construct(**fields)`` when every field is given, in declaration order.

    Results are built about a hundred times per patient; this skips ``model_construct``'s
    per-call default handling (four times faster) and sets exactly the attributes it sets.
    """
    return _construct_from(model, fields)


def _construct_from(model: type[_M], fields: dict[str, Any]) -> _M:
    """:func:`_construct` taking ownership of the dict ``fields``."""
    names = _ALL_FIELDS.get(model)
    if names is None:
        names = _ALL_FIELDS[model] = set(model.model_fields)
    if len(fields) != len(names):
        raise TypeError(f"{model.__name__}: every field must be given")
    return _instance(model, fields, names)


def _instance(model: type[_M], fields: dict[str, Any], names: set[str]) -> _M:
    """An instance of ``model`` holding ``fields`` (all of them, in declaration order), set as
    ``model_construct`` sets them."""
    obj = _new(model)
    _set_dict(obj, fields)
    _set_fields_set(obj, names)
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


def _result_fields(c: Criterion, outcome: Outcome, reason: str) -> dict[str, Any]:
    """The fields of a criterion's result, in declaration order, without its lists (evidence and
    sub-criteria): all that is the same for every patient given that outcome and reason."""
    return {
        "id": c.id,
        "kind": c.kind,
        "text": c.text,
        "outcome": outcome,
        "evidence": None,
        "reason": reason,
        "title": None,
        "criteria": None,
    }


#: every field of a criterion result (:func:`_from_fields` sets them all)
_CRITERION_FIELDS: Final = set(CriterionResult.model_fields)


def _from_fields(
    fields: dict[str, Any], evidence: list[str], children: list[CriterionResult] | None = None
) -> CriterionResult:
    """A fresh result from :func:`_result_fields`: its own copy of the fields, ``evidence``, and
    ``children`` (none when not given). Its fields are known to be complete, so it skips
    :func:`_construct_from`'s check: a patient gets over a hundred of these."""
    own = fields.copy()
    own["evidence"] = evidence
    own["criteria"] = [] if children is None else children
    return _instance(CriterionResult, own, _CRITERION_FIELDS)


def _truth(result: list[Any]) -> bool | None:
    """FHIRPath result → True / False / None (empty), by singleton evaluation."""
    if not result:
        return None
    if len(result) == 1:
        value = result[0]
        return value if isinstance(value, bool) else True
    raise ValueError("condition returned several values")


class _PatientContext:
    """Per-patient state for one evaluation: the index and the inputs resolved so far."""

    __slots__ = (
        "age",
        "age_text",
        "as_of",
        "as_of_text",
        "bindings",
        "index",
        "patient",
        "patient_ref",
        "settled",
        "settled_at_age",
        "terminology",
        "touched",
    )

    def __init__(
        self,
        index: PatientIndex,
        patient_ref: str,
        as_of: date,
        terminology: Terminology | None = None,
        touched: set[int] | None = None,
    ) -> None:
        self.index = index
        self.terminology = terminology
        self.as_of = as_of
        self.as_of_text = as_of.isoformat()
        self.patient = index.patient or {}
        self.patient_ref = patient_ref
        #: resolved inputs, by ``id()`` (an engine's inputs are interned and live as long as it)
        self.bindings: dict[int, Binding] = {}
        #: the ``id()`` of the inputs the record may hold something for (see
        #: :meth:`Engine._touched`); every other input is absent, without being looked up
        #: (None: any input may be present)
        self.touched = touched
        #: the engine's results of criteria whose inputs were all absent, for this as-of date
        #: (and this patient's age): see :meth:`Engine._evaluate_condition`
        self.settled: dict[int, dict[str, Any]] = {}
        self.settled_at_age: dict[int, dict[str, Any]] = {}
        ages = age_range(self.patient.get("birthDate"), as_of)
        if ages is None:
            self.age: list[list[int]] = [[]]
            self.age_text = "birth date unknown"
        elif ages[1] < 0:
            self.age = [[]]
            self.age_text = "birth date is after the as-of date"
        elif ages[0] == ages[1]:
            self.age = [[ages[0]]]
            self.age_text = f"age {ages[0]} at {as_of}"
        else:
            self.age = [[max(ages[0], 0)], [ages[1]]]
            self.age_text = f"age {max(ages[0], 0)}-{ages[1]} at {as_of} (partial birth date)"

    def binding(self, inp: DataInput) -> Binding:
        b = self.bindings.get(id(inp))
        if b is None:
            if self.touched is not None and id(inp) not in self.touched:
                return _absent(inp, self.as_of)
            after = None
            if inp.after:
                starts = [
                    d
                    for ref in inp.after
                    for r in self.binding(ref).variants[0]
                    if (d := _start_date(r)) is not None
                ]
                after = (min(starts) if starts else None, ", ".join(a.name for a in inp.after))
            b = self.bindings[id(inp)] = resolve_input(self.index, inp, self.terminology, after)
        return b


class Engine:
    """Evaluates patients against compiled trials. Immutable after construction; thread-safe.

    Raises :class:`~fhirmatch.errors.TrialDefinitionError` when a trial's conditions do not
    compile. ``native_fhirpath=False`` evaluates every condition with fhirpathpy instead of the
    compiled closures (same results, slower; for baselines and cross-checks).
    """

    def __init__(
        self,
        trials: Sequence[Trial],
        terminology: Terminology | None = None,
        *,
        native_fhirpath: bool = True,
    ) -> None:
        self.trials: tuple[Trial, ...] = tuple(trials)
        self.terminology = terminology
        #: resolves memberOf() in conditions and reads qualitative results
        self._value_sets = terminology if terminology is not None else _trials_terminology(trials)
        compiled: list[tuple[Trial, tuple[_CompiledCriterion, ...]]] = []
        known: set[tuple[str, str]] = set()
        shared: dict[DataInput, DataInput] = {}
        for trial in self.trials:
            problems: list[str] = []
            crits = tuple(
                _compile(c, trial, problems, native_fhirpath, self._value_sets, shared)
                for c in trial.criteria
            )
            if problems:
                raise TrialDefinitionError(trial.source or trial.reference, problems)
            compiled.append((trial, crits))
            for inp in trial.all_inputs():
                known.update(inp.codes)
                known.update(inp.possible_codes)
        self._compiled = tuple(compiled)
        #: each input of every trial (one object for equal inputs), under every
        #: ``(type, system, code)`` it can find records by; and those that also read text
        #: (by ``id()``: see :meth:`_touched`)
        self._inputs_by_key: dict[tuple[str, str, str], list[int]] = {}
        self._text_inputs: list[int] = []
        for inp in shared.values():
            for system, code in inp.codes | inp.possible_codes:
                key = (inp.resource_type, system, code)
                self._inputs_by_key.setdefault(key, []).append(id(inp))
            if inp.text_systems:
                self._text_inputs.append(id(inp))
        self._drafted = {id(t): tuple(t.drafted_criteria()) for t in self.trials}
        #: (as-of, age or "") -> criterion -> the result fields of a criterion whose inputs were
        #: all absent (:func:`_result_fields`); the age is "" for criteria that do not read it
        self._settled: dict[tuple[date, str], dict[int, dict[str, Any]]] = {}
        #: manual criteria -> their result fields (the same for every patient)
        self._manual: dict[int, dict[str, Any]] = {}
        #: (criterion, as-of, age) -> what its condition gave when every input was empty
        self._empty_truths: dict[tuple[int, date, str], frozenset[bool | None]] = {}
        #: (group, its children's outcomes) -> the group's result fields
        self._groups: dict[tuple[int, tuple[Outcome, ...]], dict[str, Any]] = {}
        self._known_codes = frozenset(known)
        self._medication_names = _name_pattern(
            code for system, code in known if system == MEDICATION_NAME_SYSTEM
        )
        self._types = frozenset(inp.resource_type for t in self.trials for inp in t.all_inputs())
        text_inputs = [inp for t in self.trials for inp in t.all_inputs() if inp.text_systems]
        self._text_rule = (
            TextDiagnosisRule(
                frozenset.intersection(*(inp.text_systems for inp in text_inputs)),
                self._value_sets.diagnosis_text(),
            )
            if text_inputs
            else None
        )

    # -- public API

    def index(self, resources: Iterable[dict[str, Any]], *, as_of: date) -> PatientIndex:
        """Index one patient's resources (done once per patient, shared by all trials)."""
        return PatientIndex(
            resources,
            as_of=as_of,
            known_codes=self._known_codes,
            terminology=self.terminology,
            types=self._types,
            only_known=True,
            medication_names=self._medication_names,
            text_diagnoses=self._text_rule,
        )

    def evaluate(
        self,
        resources: Iterable[dict[str, Any]],
        *,
        as_of: date,
        patient_id: str | None = None,
    ) -> list[TrialResult]:
        """Evaluate one patient's record (the Patient and its resources) against every trial."""
        index = self.index(resources, as_of=as_of)
        pid = patient_id or (index.patient or {}).get("id") or "unknown"
        touched = self._touched(index)
        ctx = _PatientContext(index, f"Patient/{pid}", as_of, self._value_sets, touched)
        if len(self._settled) >= _MAX_REMEMBERED:
            self._settled.clear()
        ctx.settled = self._settled.setdefault((as_of, ""), {})
        ctx.settled_at_age = self._settled.setdefault((as_of, ctx.age_text), {})
        return [self._evaluate_trial(trial, crits, ctx) for trial, crits in self._compiled]

    def evaluate_patient_record(self, record: PatientRecord, *, as_of: date) -> list[TrialResult]:
        """:meth:`evaluate` for a :class:`~fhirmatch.records.PatientRecord`."""
        return self.evaluate(record.resources, as_of=as_of, patient_id=record.patient_id)

    def evaluate_many(
        self, records: Iterable[PatientRecord], *, as_of: date
    ) -> Iterator[list[TrialResult]]:
        """Yield the results of each record in turn (one list per patient, trials in order)."""
        for record in records:
            yield self.evaluate_patient_record(record, as_of=as_of)

    # -- internals

    def _touched(self, index: PatientIndex) -> set[int]:
        """The inputs that may find something in ``index``: one of their codes (or an ICD-10
        category above a code) is in the record, or they read diagnoses written as text and the
        record has some. Any other input resolves to :func:`_absent`, so it is not resolved."""
        touched: set[int] = set()
        by_key = self._inputs_by_key
        for key in index.code_keys():
            inputs = by_key.get(key)
            if inputs is not None:
                touched.update(inputs)
        if index.text_conditions:
            touched.update(self._text_inputs)
        return touched

    def _evaluate_trial(
        self, trial: Trial, crits: tuple[_CompiledCriterion, ...], ctx: _PatientContext
    ) -> TrialResult:
        results = [self._evaluate_criterion(c, ctx) for c in crits]
        deceased = self._deceased(ctx)
        if deceased is not None:
            results.insert(0, deceased)
        return _construct(
            TrialResult,
            patient=ctx.patient_ref,
            study=trial.reference,
            status=trial_status(r.outcome for r in results),
            criteria=results,
            title=trial.title,
            incomplete=trial.incomplete,
            drafted=list(self._drafted[id(trial)]),
        )

    @staticmethod
    def _deceased(ctx: _PatientContext) -> CriterionResult | None:
        patient = ctx.patient
        reason = None
        if patient.get("deceasedBoolean") is True:
            reason = "the patient is recorded as deceased"
        else:
            key = _date_key(patient.get("deceasedDateTime"))
            if key is not None and key <= ctx.as_of.isoformat()[: len(key)]:
                reason = f"the patient is recorded as deceased on {key}"
        if reason is None:
            return None
        return _construct(
            CriterionResult,
            id=DECEASED_CRITERION_ID,
            kind="exclusion",
            text="Patient is alive at the as-of date",
            outcome="fail",
            evidence=[ctx.patient_ref],
            reason=reason,
            title="Deceased",
            criteria=[],
        )

    def _evaluate_criterion(self, cc: _CompiledCriterion, ctx: _PatientContext) -> CriterionResult:
        c = cc.criterion
        if cc.form == "manual":
            fields = self._manual.get(id(cc))
            if fields is None:
                why = f"manual review: {c.manual_reason}"
                fields = self._manual[id(cc)] = _result_fields(c, "manual", why)
            return _from_fields(fields, [])
        if cc.form == "group":
            children = [self._evaluate_criterion(k, ctx) for k in cc.children]
            # the outcome and reason follow from the children's outcomes: worked out once each
            key = (id(cc), tuple([k.outcome for k in children]))
            fields = self._groups.get(key)
            if fields is None:
                outcome = combine_group(c.selection, key[1])
                fields = _result_fields(c, outcome, _group_reason(c, outcome, children))
                if len(self._groups) < _MAX_REMEMBERED:
                    self._groups[key] = fields
            evidence: list[str] = []
            for k in children:
                if k.evidence:
                    evidence.extend(k.evidence)
            if len(evidence) > 1:
                evidence = list(dict.fromkeys(evidence))
            return _from_fields(fields, evidence, children)
        return self._evaluate_condition(cc, ctx)

    @staticmethod
    def _result(
        c: Criterion,
        outcome: Outcome,
        evidence: list[str],
        reason: str,
        children: list[CriterionResult],
    ) -> CriterionResult:
        fields = _result_fields(c, outcome, reason)
        fields["evidence"], fields["criteria"] = evidence, children
        return _construct_from(CriterionResult, fields)

    def _evaluate_condition(self, cc: _CompiledCriterion, ctx: _PatientContext) -> CriterionResult:
        bindings: list[tuple[DataInput, Binding]] | None = None
        touched = ctx.touched
        if cc.uses_patient or touched is None or not touched.isdisjoint(cc.input_ids):
            bindings = [(inp, ctx.binding(inp)) for inp in cc.inputs]
            if cc.uses_patient or not all(b.absent for _inp, b in bindings):
                return self._decide(cc, ctx, bindings)[0]
        # nothing in the record for any input, and nothing else read but perhaps the age: the
        # outcome is the same for every such patient (of that age), so it is decided once
        if cc.uses_age:
            table, evidence = ctx.settled_at_age, [ctx.patient_ref]
        else:
            table, evidence = ctx.settled, []
        settled = table.get(id(cc))
        if settled is None:
            if bindings is None:
                bindings = [(inp, _absent(inp, ctx.as_of)) for inp in cc.inputs]
            result, evaluated = self._decide(cc, ctx, bindings)
            if evaluated and result.evidence == evidence:
                table[id(cc)] = _result_fields(cc.criterion, result.outcome, result.reason)
            return result
        return _from_fields(settled, evidence)

    def _decide(
        self,
        cc: _CompiledCriterion,
        ctx: _PatientContext,
        bindings: list[tuple[DataInput, Binding]],
    ) -> tuple[CriterionResult, bool]:
        """The criterion's result, and False when its condition raised (logged each time)."""
        c = cc.criterion
        assert cc.evaluator is not None
        names: list[str] = []
        choices: list[tuple[Any, ...]] = []
        for inp, b in bindings:
            names.append(inp.name)
            choices.append(b.variants)
        if cc.uses_age:
            names.append("age")
            choices.append(tuple(ctx.age))
        # every input empty (nothing found, or nothing in its window) and the Patient unread:
        # the answer is that of any such patient of this age
        empty = not cc.uses_patient and all(len(b.variants) == 1 for _i, b in bindings)
        empty = empty and not any(b.variants[0] for _i, b in bindings)
        key = (id(cc), ctx.as_of, ctx.age_text if cc.uses_age else "")
        known = self._empty_truths.get(key) if empty else None
        truths: set[bool | None] = set() if known is None else set(known)
        base_env: dict[str, Any] = {"patient": ctx.patient, "asOf": ctx.as_of_text}
        try:
            if known is None and all(len(v) == 1 for v in choices):  # one value per input
                base_env.update(zip(names, (v[0] for v in choices), strict=True))
                truths.add(_truth(cc.evaluator(ctx.patient, base_env)))
            for n, combo in enumerate(itertools.product(*choices) if len(truths) == 0 else ()):
                if n >= _MAX_VARIANTS:
                    break
                env = dict(base_env)
                env.update(zip(names, combo, strict=True))
                truths.add(_truth(cc.evaluator(ctx.patient, env)))
        except Exception as exc:  # a condition error must not stop the run
            log.warning("criterion %s: condition failed (%s)", c.id, type(exc).__name__)
            why = f"the condition could not be evaluated ({type(exc).__name__})"
            return self._result(c, "unknown", [], why, []), False
        if empty and known is None and len(self._empty_truths) < _MAX_REMEMBERED:
            self._empty_truths[key] = frozenset(truths)
        evidence = [e for _inp, b in bindings for e in b.evidence]
        if cc.uses_age or cc.uses_patient:
            evidence.insert(0, ctx.patient_ref)
        if cc.anchors:
            # inputs that only date others (after-start-of) decide nothing by themselves
            bindings = [(inp, b) for inp, b in bindings if inp.name not in cc.anchors]
        used = [b.summary for _inp, b in bindings if b.summary]
        if cc.uses_age:
            used.insert(0, ctx.age_text)
        missing = [b.missing for _inp, b in bindings if b.missing]
        if len(truths) > 1:
            why = "the answer depends on "
            ambiguous = [b.ambiguity for _inp, b in bindings if b.ambiguity]
            undecided = [b.undecided for _inp, b in bindings if b.undecided]
            if ambiguous:
                why += "whether " + " and whether ".join(ambiguous)
            elif undecided:
                why = "the answer depends on results that cannot be read as positive or negative"
                used = [*used, *undecided]
            elif cc.uses_age and len(ctx.age) > 1:
                why += "the exact birth date"
            else:
                why += "a censored value"
            return self._result(c, "unknown", evidence, f"{why}: " + "; ".join(used), []), True
        truth = truths.pop() if truths else None
        if truth is None:
            closed_world = (
                c.kind == "exclusion"
                and bindings
                and all(not b.found and not inp.required for inp, b in bindings)
            )
            if closed_world:
                return self._result(c, "pass", [], "; ".join(missing), []), True
            detail = missing + ([ctx.age_text] if cc.uses_age and not ctx.age[0] else [])
            if not detail:
                detail = ["the condition gave no answer for the data found", *used]
            return self._result(c, "unknown", evidence, "; ".join(detail), []), True
        unusable = [b.missing for _inp, b in bindings if b.found and b.empty and b.missing]
        if c.kind == "exclusion" and truth is False and unusable:
            # a result that exists but cannot be read must not count as "not excluding"
            # (a condition may guard an input with exists(); the value could be excluding)
            return self._result(c, "unknown", evidence, "; ".join(unusable), []), True
        met = "met" if truth else "not met"
        outcome: Outcome
        if c.kind == "inclusion":
            outcome = "pass" if truth else "fail"
        else:
            outcome = "fail" if truth else "pass"
        if used:
            reason = f"{met}: " + "; ".join(used)
            if missing:
                reason += " (" + "; ".join(missing) + ")"
        else:
            reason = "; ".join(missing) if missing else f"{met} by the data found"
        return self._result(c, outcome, evidence, reason, []), True


def _name_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A regular expression finding any of ``names`` as a whole word (case-insensitive)."""
    ordered = sorted(set(names), key=len, reverse=True)
    if not ordered:
        return None
    body = "|".join(re.escape(n) for n in ordered)
    return re.compile(rf"(?<![\w-])({body})(?![\w-])", re.IGNORECASE)


def _trials_terminology(trials: Sequence[Trial]) -> Terminology:
    """The repository's ValueSets plus those bundled with the trials (an engine built without a
    terminology still resolves the ValueSets its conditions name)."""
    from .terminology import Terminology

    bundled = {
        str(r["url"]).split("|", 1)[0]: r
        for t in trials
        for r in t.resources
        if r.get("resourceType") == "ValueSet" and r.get("url")
    }
    if not bundled:
        return _fallback_terminology()
    base = Terminology.load()
    return base.with_value_sets(bundled.values())


def _group_reason(c: Criterion, outcome: Outcome, children: list[CriterionResult]) -> str:
    def ids(which: str) -> str:
        return ", ".join(k.id for k in children if k.outcome == which)

    rule = "all of" if c.selection == "all" else "any of"
    if outcome == "manual":
        return f"{rule} {len(children)} sub-criteria, all needing manual review"
    if outcome == "pass":
        return f"{rule}: passed ({ids('pass')})"
    if outcome == "fail":
        return f"{rule}: failed ({ids('fail')})"
    return f"{rule}: undecided ({ids('unknown')} unknown)"
