"""Data-driven evaluation cases: ``tests/cases/<trial>.yaml`` run through the real engine.

Each file screens variations of one base patient against one trial definition from
``fixtures/trials/`` with the repository's ValueSets and ConceptMaps. Format::

    trial: NCT06767007            # fixtures/trials/<trial>.json
    as_of: 2026-11-01
    base:                          # the base patient's resources (plain FHIR JSON)
      - {resourceType: Patient, id: p, birthDate: "1968-09-02"}
      - ...
    cases:
      - id: fails-platelets        # test id: NCT06767007::fails-platelets
        patch:                     # deep-merge into the base resource with this id;
          plt: {valueQuantity: {value: 80}}   # null deletes a key, lists are replaced
        remove: [anc]              # drop base resources by id
        add: [{resourceType: Condition, id: c2, ...}]
        expect:
          status: ineligible       # trial status
          outcomes: {inc-platelets: fail, inc-labs: fail}   # any criterion, nested included
          evidence: {inc-platelets: [Observation/plt]}      # exact set of evidence refs
          reason: {inc-platelets: "plt 80 10*9/L"}          # substring of the reason
        xfail: why                 # a known engine/definition bug: xfail(strict=True)

Every criterion id named in ``expect`` must exist in the result, so a misspelt id fails.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhirmatch.engine import Engine
from fhirmatch.results import CriterionResult, TrialResult
from fhirmatch.terminology import Terminology
from fhirmatch.trials import default_mappings_dir, load_trials

ROOT = Path(__file__).resolve().parents[2]
CASES_DIR = ROOT / "tests" / "cases"
TRIALS_DIR = ROOT / "fixtures" / "trials"

_CASE_KEYS = frozenset({"id", "description", "patch", "remove", "add", "expect", "xfail"})
_EXPECT_KEYS = frozenset({"status", "outcomes", "evidence", "reason"})
_OUTCOMES = frozenset({"pass", "fail", "unknown", "manual"})
_STATUSES = frozenset({"eligible", "ineligible", "insufficient-data"})


@dataclass(frozen=True)
class Case:
    """One case: the patient's resources after modification, and what the engine must say."""

    trial: str
    id: str
    as_of: date
    resources: list[dict[str, Any]]
    status: str | None
    outcomes: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, list[str]] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)


def deep_merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``target`` with ``patch`` merged in: dicts recursively, ``None`` deletes a key,
    anything else (lists included) replaces."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_resources(
    base: list[dict[str, Any]], spec: dict[str, Any], where: str
) -> list[dict[str, Any]]:
    """Apply a case's ``remove``, ``patch`` and ``add`` to the base resources (never mutated)."""
    ids = [r["id"] for r in base]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{where}: duplicate ids in base")
    remove = set(spec.get("remove") or [])
    patch = spec.get("patch") or {}
    unknown = (remove | set(patch)) - set(ids)
    if unknown:
        raise ValueError(f"{where}: remove/patch name ids not in base: {sorted(unknown)}")
    out = [
        deep_merge(r, patch[r["id"]]) if r["id"] in patch else copy.deepcopy(r)
        for r in base
        if r["id"] not in remove
    ]
    for res in spec.get("add") or []:
        if res["id"] in {r["id"] for r in out}:
            raise ValueError(f"{where}: added id {res['id']} already present")
        out.append(copy.deepcopy(res))
    return out


def _parse_case(doc: dict[str, Any], spec: dict[str, Any], source: str) -> Any:
    where = f"{source}::{spec.get('id')}"
    extra = set(spec) - _CASE_KEYS
    if extra or "id" not in spec or "expect" not in spec:
        raise ValueError(f"{where}: bad case keys {sorted(extra)} (id and expect are required)")
    expect = spec["expect"]
    if set(expect) - _EXPECT_KEYS:
        raise ValueError(f"{where}: bad expect keys {sorted(set(expect) - _EXPECT_KEYS)}")
    outcomes = {str(k): str(v) for k, v in (expect.get("outcomes") or {}).items()}
    if set(outcomes.values()) - _OUTCOMES:
        raise ValueError(f"{where}: unknown outcome in {outcomes}")
    status = expect.get("status")
    if status is not None and status not in _STATUSES:
        raise ValueError(f"{where}: unknown status {status!r}")
    if not (status or outcomes or expect.get("evidence") or expect.get("reason")):
        raise ValueError(f"{where}: the case expects nothing")
    as_of = doc["as_of"]
    case = Case(
        trial=doc["trial"],
        id=spec["id"],
        as_of=as_of if isinstance(as_of, date) else date.fromisoformat(str(as_of)),
        resources=build_resources(doc["base"], spec, where),
        status=status,
        outcomes=outcomes,
        evidence={str(k): list(v) for k, v in (expect.get("evidence") or {}).items()},
        reason={str(k): str(v) for k, v in (expect.get("reason") or {}).items()},
    )
    marks = []
    if spec.get("xfail"):
        marks.append(pytest.mark.xfail(strict=True, reason=str(spec["xfail"])))
    return pytest.param(case, id=f"{case.trial}::{case.id}", marks=marks)


def collect_cases(directory: Path = CASES_DIR) -> list[Any]:
    """Every case of every ``*.yaml`` file in ``directory``, as pytest params."""
    params: list[Any] = []
    for path in sorted(directory.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not {"trial", "as_of", "base", "cases"} <= set(doc):
            raise ValueError(f"{path.name}: needs trial, as_of, base and cases")
        params.extend(_parse_case(doc, spec, path.name) for spec in doc["cases"])
    return params


CASES = collect_cases()


@functools.cache
def _terminology() -> Terminology:
    return Terminology.load([default_mappings_dir()])


@functools.cache
def engine_for(trial: str) -> Engine:
    """The engine for one trial file, built once per test session."""
    terminology = _terminology()
    trials = load_trials([TRIALS_DIR / f"{trial}.json"], terminology=terminology)
    assert [t.id for t in trials] == [trial]
    return Engine(trials, terminology)


def _by_id(result: TrialResult) -> dict[str, CriterionResult]:
    found: dict[str, CriterionResult] = {}

    def walk(items: list[CriterionResult]) -> None:
        for c in items:
            found[c.id] = c
            walk(c.criteria)

    walk(result.criteria)
    return found


def test_the_case_files_hold_enough_distinct_cases() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique within a trial"
    assert len(ids) >= 60
    assert {i.split("::")[0] for i in ids} == {p.stem for p in TRIALS_DIR.glob("*.json")}


def test_build_resources_patches_removes_and_adds_without_touching_the_base() -> None:
    base = [
        {"resourceType": "Patient", "id": "p", "birthDate": "1960-01-01", "gender": "male"},
        {"resourceType": "Observation", "id": "o", "valueQuantity": {"value": 1, "unit": "g"}},
    ]
    spec = {
        "patch": {"p": {"gender": None}, "o": {"valueQuantity": {"value": 2}}},
        "add": [{"resourceType": "Condition", "id": "c"}],
    }
    out = build_resources(base, spec, "t")
    assert out[0] == {"resourceType": "Patient", "id": "p", "birthDate": "1960-01-01"}
    assert out[1]["valueQuantity"] == {"value": 2, "unit": "g"}
    assert [r["id"] for r in out] == ["p", "o", "c"]
    assert base[0]["gender"] == "male" and base[1]["valueQuantity"]["value"] == 1
    assert [r["id"] for r in build_resources(base, {"remove": ["o"]}, "t")] == ["p"]
    with pytest.raises(ValueError, match="not in base"):
        build_resources(base, {"remove": ["nope"]}, "t")


@pytest.mark.parametrize("case", CASES)
def test_case(case: Case) -> None:
    [result] = engine_for(case.trial).evaluate(case.resources, as_of=case.as_of)
    criteria = _by_id(result)
    named = set(case.outcomes) | set(case.evidence) | set(case.reason)
    missing = named - set(criteria)
    assert not missing, f"criteria not in the result: {sorted(missing)}"
    got = {cid: criteria[cid].outcome for cid in case.outcomes}
    reasons = {cid: criteria[cid].reason for cid in case.outcomes}
    assert got == case.outcomes, f"reasons: {reasons}"
    for cid, refs in case.evidence.items():
        assert set(criteria[cid].evidence) == set(refs), criteria[cid].reason
    for cid, text in case.reason.items():
        assert text in criteria[cid].reason
    if case.status is not None:
        assert result.status == case.status, {
            c.id: (c.outcome, c.reason) for c in criteria.values() if c.outcome in ("fail",)
        }
