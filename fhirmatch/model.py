"""Compiled trial definitions: what the loader (:mod:`fhirmatch.trials`) produces from a
ResearchStudy + PlanDefinition and what the engine (:mod:`fhirmatch.engine`) evaluates.

The FHIR representation is documented in ``docs/trial-format.md``. These classes are immutable
so one compiled trial can be shared by many threads evaluating patients at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

CriterionKind = Literal["inclusion", "exclusion"]
Selection = Literal["all", "any"]
ClinicalStatusNeed = Literal["current", "history", "any"]
Outcome = Literal["pass", "fail", "unknown", "manual"]
TrialStatus = Literal["eligible", "insufficient-data", "ineligible"]

EXT_BASE = "https://fhirmatch.dev/fhir/StructureDefinition"
CS_BASE = "https://fhirmatch.dev/fhir/CodeSystem"
VS_BASE = "https://fhirmatch.dev/fhir/ValueSet"
#: FHIR's extension for the score of a coded answer (on ``ValueSet.compose.include.concept``)
ORDINAL_VALUE = "http://hl7.org/fhir/StructureDefinition/ordinalValue"


def answers_value_set(url: str) -> str:
    """The ValueSet of scored answers to the question ValueSet ``url`` (``ecog`` ->
    ``ecog-answers``): an Observation found by a score input and valued with a code is scored by
    the ``ordinalValue`` of that code in this ValueSet (see ``mappings/README.md``)."""
    return f"{url.split('|', 1)[0]}-answers"


#: Extension URLs (documented in docs/trial-format.md).
EXT_TARGET_UNIT = f"{EXT_BASE}/target-unit"
EXT_ANALYTE = f"{EXT_BASE}/analyte"
EXT_CLINICAL_STATUS = f"{EXT_BASE}/clinical-status"
EXT_REQUIRED = f"{EXT_BASE}/required"
EXT_MANUAL_REVIEW = f"{EXT_BASE}/manual-review"
#: PlanDefinition extension (``valueMarkdown``): the definition is known to be incomplete, and what
#: is missing; every user of the trial is warned
EXT_DEFINITION_INCOMPLETE = f"{EXT_BASE}/definition-incomplete"
#: action extension: the criterion was drafted by ``fhirmatch trials import`` and nobody has
#: reviewed it yet (sub-extensions ``span``: the text it was drafted from, ``rule``: the
#: recogniser); a reviewer removes it
EXT_DRAFTED = f"{EXT_BASE}/drafted"
EXT_QUALITATIVE = f"{EXT_BASE}/qualitative"
EXT_POSITIVE_THRESHOLD = f"{EXT_BASE}/positive-threshold"
EXT_NEGATIVE_THRESHOLD = f"{EXT_BASE}/negative-threshold"
EXT_POSITIVE_IF_QUANTIFIED = f"{EXT_BASE}/positive-if-quantified"
EXT_AFTER_START_OF = f"{EXT_BASE}/after-start-of"
#: Condition input extension (``valueBoolean``): when no record has a code of the input's
#: ValueSet, a diagnosis recorded only as text (no code in a system the ValueSet uses) whose
#: wording is cancer-like (``mappings/text/diagnosis-wording.csv``) makes the input undecided
EXT_REVIEW_TEXT_DIAGNOSES = f"{EXT_BASE}/review-text-diagnoses"
#: Observation input extension (``valueCanonical``, repeatable): a ValueSet of coded answers
#: whose concepts' display and ``designation`` wordings are read from a result written as text
#: (``valueString``, ``valueCodeableConcept.text``): "MSS" is LOINC LA14122-8 Stable
EXT_ANSWER_WORDINGS = f"{EXT_BASE}/answer-wordings"
CS_CRITERION_KIND = f"{CS_BASE}/criterion-kind"


@dataclass(frozen=True)
class Threshold:
    """How a numeric result reads as positive or negative (see :mod:`fhirmatch.qualitative`)."""

    #: positive at or above this value (above it when ``strict``), in ``unit``
    positive: float | None = None
    unit: str | None = None
    strict: bool = False
    #: negative below this value; between it and ``positive`` the result is equivocal
    negative: float | None = None
    #: positive when quantified above zero, negative when reported below a limit (``<15``)
    if_quantified: bool = False
    analyte: str | None = None

    def describe(self) -> str:
        if self.if_quantified:
            return "positive when quantified, negative when below the assay's limit"
        unit = f" {self.unit}" if self.unit else ""
        text = f"positive {'>' if self.strict else '>='} {self.positive:g}{unit}"
        if self.negative is not None:
            text += f", negative < {self.negative:g}{unit}"
        return text


@dataclass(frozen=True)
class DataInput:
    """One ``PlanDefinition.action.input`` (a DataRequirement), bound to FHIRPath as ``%name``.

    For ``select == "latest"`` (Observations, ``limit`` 1) ``%name`` is the most recent usable
    result inside the look-back window, normalised to ``unit``; otherwise ``%name`` is the list of
    every matching resource.
    """

    name: str
    resource_type: str
    value_set: str | None = None
    #: expanded codes of ``value_set`` as ``(system, code)`` pairs (for medicines, widened by
    #: the medicine tables to every code of a medicine containing one of its ingredients)
    codes: frozenset[tuple[str, str]] = frozenset()
    #: codes that may or may not mean a member (a drug class that also holds other drugs): a
    #: record coded only so makes the input undecided
    possible_codes: frozenset[tuple[str, str]] = frozenset()
    #: further ``codeFilter``s as ``(element, ValueSet URL)``: the element must hold a code of
    #: that ValueSet too (``bodySite`` of a radiotherapy Procedure)
    extra_filters: tuple[tuple[str, str], ...] = ()
    code_path: str = "code"
    lookback_days: int | None = None
    unit: str | None = None
    analyte: str | None = None
    select: Literal["latest", "all"] = "all"
    clinical_status: ClinicalStatusNeed = "any"
    required: bool = False
    #: Observations are read as positive / negative by :mod:`fhirmatch.qualitative`
    qualitative: bool = False
    threshold: Threshold | None = None
    #: only resources dated after the earliest record of these inputs (of the same criterion):
    #: "a response assessment after the treatment started"
    after: tuple[DataInput, ...] = ()
    #: with ``review-text-diagnoses``: the code systems of the input's ValueSet. A Condition
    #: coded in none of them, whose text is cancer-like, may be a match (a person reads it)
    text_systems: frozenset[str] = frozenset()
    #: with ``answer-wordings``: the ValueSets of coded answers a text result is read as
    answer_sets: tuple[str, ...] = ()

    # The engine looks each input up in a per-patient dict many times, and the generated hash
    # would hash every field each time: hash once. The hash of strings differs between
    # processes, so it is never pickled (worker processes, the compiled-trial cache).
    def __hash__(self) -> int:
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            self.__dict__["_hash"] = cached
        return cached

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}


@dataclass(frozen=True)
class Criterion:
    """One ``PlanDefinition.action``: a computable criterion, a manual one, or a group."""

    id: str
    kind: CriterionKind
    text: str
    #: FHIRPath applicability condition (``text/fhirpath``); None for manual criteria and groups
    expression: str | None = None
    inputs: tuple[DataInput, ...] = ()
    #: reason the criterion needs a person (consent, clinical judgement ...); None when computable
    manual_reason: str | None = None
    #: sub-criteria for a group; ``selection`` says whether all or any of them must pass
    children: tuple[Criterion, ...] = ()
    selection: Selection = "all"
    #: free-text note (source of the criterion, modelling decisions)
    note: str | None = None
    #: drafted by the importer and not reviewed yet: the text span it was drafted from
    drafted: str | None = None

    @property
    def is_manual(self) -> bool:
        return self.manual_reason is not None

    @property
    def is_group(self) -> bool:
        return bool(self.children)


@dataclass(frozen=True)
class Trial:
    """A ResearchStudy and its PlanDefinition, compiled."""

    id: str
    title: str
    identifiers: tuple[tuple[str, str], ...]
    criteria: tuple[Criterion, ...]
    plan_definition_id: str
    plan_definition_url: str | None = None
    version: str | None = None
    source: str | None = None
    recruitment_status: str | None = None
    #: what the definition is known to lack (``definition-incomplete`` extension), else None
    incomplete: str | None = None
    #: the FHIR resources as loaded (ResearchStudy, PlanDefinition, ValueSets), for publishing
    resources: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)

    @property
    def reference(self) -> str:
        return f"ResearchStudy/{self.id}"

    def drafted_criteria(self) -> list[str]:
        """Ids of the criteria drafted by the importer that nobody has reviewed yet."""
        out: list[str] = []

        def walk(cs: tuple[Criterion, ...]) -> None:
            for c in cs:
                if c.drafted is not None:
                    out.append(c.id)
                walk(c.children)

        walk(self.criteria)
        return out

    def all_inputs(self) -> list[DataInput]:
        out: list[DataInput] = []

        def walk(cs: tuple[Criterion, ...]) -> None:
            for c in cs:
                out.extend(c.inputs)
                walk(c.children)

        walk(self.criteria)
        return out
