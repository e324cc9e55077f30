"""Evaluation results: what :class:`fhirmatch.engine.Engine` returns and ``fhirmatch evaluate``
prints.

The JSON shape (``EvaluationReport.model_dump(mode="json")``)::

    {"as_of": "2026-11-01",
     "results": [
      {"patient": "Patient/p1", "study": "ResearchStudy/NCT06767007", "status": "eligible",
       "criteria": [{"id": "inc-ecog", "kind": "inclusion", "text": "...", "outcome": "pass",
                     "evidence": ["Observation/o7"], "reason": "...", "criteria": []}],
       "incomplete": null, "drafted": []}],
     "problems": ["patients/p9.json: not valid JSON (line 3); file skipped"]}

``incomplete`` repeats the trial's ``definition-incomplete`` marker (what the definition lacks);
``drafted`` lists the criteria drafted by the importer that nobody has reviewed yet.

A group criterion keeps its sub-criteria nested in its own ``criteria`` list (the children's ids
are the PlanDefinition action ids); a plain criterion has an empty list there.

Results contain clinical values and dates (they are the answer the user asked for); they are
written to stdout or files, never to logs.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from .model import CriterionKind, Outcome, TrialStatus

__all__ = [
    "DECEASED_CRITERION_ID",
    "CriterionResult",
    "EvaluationReport",
    "TrialResult",
    "result_json",
]

#: id of the synthetic criterion the engine adds when the patient is recorded as deceased
DECEASED_CRITERION_ID = "patient-deceased"

# The models build their validators and serializers when first used (``defer_build``): the
# engine constructs results without validating them and ``--format ndjson`` writes them with
# msgspec (:func:`result_json`), so a screening run never needs them, and building them at
# import (with pydantic's plugin look-up, which imports importlib.metadata) took about 15 ms of
# ``fhirmatch evaluate``'s start-up (0.25 s).


class CriterionResult(BaseModel):
    """The outcome of one criterion for one patient.

    ``evidence`` lists the resources the outcome rests on (``Observation/o7``); ``reason`` says in
    words why, with values after unit conversion, or what data is missing.
    """

    model_config = ConfigDict(frozen=True, defer_build=True)

    id: str
    kind: CriterionKind
    text: str
    outcome: Outcome
    evidence: list[str] = Field(default_factory=list)
    reason: str = ""
    title: str | None = None
    #: sub-criteria of a group, in protocol order (empty for a plain criterion)
    criteria: list[CriterionResult] = Field(default_factory=list)


class TrialResult(BaseModel):
    """One patient screened against one trial."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    patient: str
    study: str
    status: TrialStatus
    criteria: list[CriterionResult] = Field(default_factory=list)
    title: str | None = None
    #: what the trial's definition is known to lack (its ``definition-incomplete`` marker): an
    #: ``eligible`` status then means "passed what is modelled"
    incomplete: str | None = None
    #: ids of criteria drafted by ``fhirmatch trials import`` that nobody has reviewed yet
    drafted: list[str] = Field(default_factory=list)

    def manual_criteria(self) -> list[CriterionResult]:
        """Criteria a coordinator must review by hand (top level and inside groups)."""
        out: list[CriterionResult] = []

        def walk(items: list[CriterionResult]) -> None:
            for c in items:
                if c.outcome == "manual" and not c.criteria:
                    out.append(c)
                walk(c.criteria)

        walk(self.criteria)
        return out


class EvaluationReport(BaseModel):
    """Every (patient, trial) result of one evaluation run at one as-of date, and the problems
    met reading the input (what was skipped, by file name, line and resource id)."""

    model_config = ConfigDict(defer_build=True)

    as_of: date
    results: list[TrialResult] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


def _fields(obj: object) -> dict[str, Any]:
    if isinstance(obj, CriterionResult | TrialResult):
        return obj.__dict__
    raise TypeError(f"cannot write {type(obj).__name__} as a result")


_ENCODE = msgspec.json.Encoder(enc_hook=_fields).encode


def result_json(result: TrialResult) -> bytes:
    """``result.model_dump_json()`` as UTF-8 bytes, written about twice as fast: a result holds
    only strings, lists, None and nested results, each of whose fields msgspec writes in the
    same order and the same way (``fhirmatch evaluate --format ndjson`` writes thousands)."""
    return _ENCODE(result)
