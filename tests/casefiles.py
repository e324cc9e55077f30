"""Data-driven evaluation cases read from YAML and run through the real engine.

Used by ``tests/unit/test_cases.py`` (``tests/cases/*.yaml``: variations of one base patient per
trial) and ``tests/unit/test_coding.py`` (``tests/coding/*.yaml``: one clinical fact coded the way
each EHR convention codes it; format in ``tests/coding/README.md``).

A case is a base patient (plain FHIR JSON resources) changed by ``remove`` (base ids),
``patch`` (deep-merged into the base resource with that id: ``null`` deletes a key, lists are
replaced) and ``add`` (new resources), and what the engine must say about it (``expect``).
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

ROOT = Path(__file__).resolve().parents[1]
TRIALS_DIR = ROOT / "fixtures" / "trials"

CASE_KEYS = frozenset({"id", "description", "patch", "remove", "add", "expect", "xfail"})
EXPECT_KEYS = frozenset({"status", "outcomes", "evidence", "reason"})
OUTCOMES = frozenset({"pass", "fail", "unknown", "manual"})
STATUSES = frozenset({"eligible", "ineligible", "insufficient-data"})


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
    #: the coding convention the case's data follows (coding corpus only)
    coding: str | None = None


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


def parse_case(
    trial: str,
    as_of: Any,
    base: list[dict[str, Any]],
    spec: dict[str, Any],
    where: str,
    *,
    extra_keys: frozenset[str] = frozenset(),
    param_id: str | None = None,
) -> Any:
    """One case as a pytest param (``xfail`` becomes a strict xfail mark)."""
    extra = set(spec) - CASE_KEYS - extra_keys
    if extra or "id" not in spec or "expect" not in spec:
        raise ValueError(f"{where}: bad case keys {sorted(extra)} (id and expect are required)")
    expect = spec["expect"]
    if not isinstance(expect, dict) or set(expect) - EXPECT_KEYS:
        raise ValueError(f"{where}: expect takes only {sorted(EXPECT_KEYS)}")
    outcomes = {str(k): str(v) for k, v in (expect.get("outcomes") or {}).items()}
    if set(outcomes.values()) - OUTCOMES:
        raise ValueError(f"{where}: unknown outcome in {outcomes}")
    status = expect.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"{where}: unknown status {status!r}")
    if not (status or outcomes or expect.get("evidence") or expect.get("reason")):
        raise ValueError(f"{where}: the case expects nothing")
    case = Case(
        trial=trial,
        id=spec["id"],
        as_of=as_of if isinstance(as_of, date) else date.fromisoformat(str(as_of)),
        resources=build_resources(base, spec, where),
        status=status,
        outcomes=outcomes,
        evidence={str(k): list(v) for k, v in (expect.get("evidence") or {}).items()},
        reason={str(k): str(v) for k, v in (expect.get("reason") or {}).items()},
        coding=spec.get("coding"),
    )
    marks = []
    if spec.get("xfail"):
        marks.append(pytest.mark.xfail(strict=True, reason=str(spec["xfail"])))
    return pytest.param(case, id=param_id or f"{case.trial}::{case.id}", marks=marks)


def read_yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name}: not a mapping")
    return doc


@functools.cache
def terminology() -> Terminology:
    return Terminology.load([default_mappings_dir()])


@functools.cache
def engine_for(trial: str) -> Engine:
    """The engine for one trial file, built once per test session."""
    term = terminology()
    trials = load_trials([TRIALS_DIR / f"{trial}.json"], terminology=term)
    assert [t.id for t in trials] == [trial]
    return Engine(trials, term)


def by_id(result: TrialResult) -> dict[str, CriterionResult]:
    """Every criterion of a result (nested ones included) by id."""
    found: dict[str, CriterionResult] = {}

    def walk(items: list[CriterionResult]) -> None:
        for c in items:
            found[c.id] = c
            walk(c.criteria)

    walk(result.criteria)
    return found


def check_case(case: Case) -> None:
    """Evaluate the case's patient with the real engine and assert what the case expects."""
    [result] = engine_for(case.trial).evaluate(case.resources, as_of=case.as_of)
    criteria = by_id(result)
    named = set(case.outcomes) | set(case.evidence) | set(case.reason)
    missing = named - set(criteria)
    assert not missing, f"criteria not in the result: {sorted(missing)}"
    got = {cid: criteria[cid].outcome for cid in case.outcomes}
    reasons = {cid: criteria[cid].reason for cid in case.outcomes}
    assert got == case.outcomes, f"reasons: {reasons}"
    for cid, refs in case.evidence.items():
        assert set(criteria[cid].evidence) == set(refs), criteria[cid].reason
    for cid, text in case.reason.items():
        assert text in criteria[cid].reason, criteria[cid].reason
    if case.status is not None:
        assert result.status == case.status, {
            c.id: (c.outcome, c.reason) for c in criteria.values() if c.outcome in ("fail",)
        }
