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

Every criterion id named in ``expect`` must exist in the result, so a misspelt id fails. The
machinery (``tests/casefiles.py``) is shared with the coding corpus in ``tests/coding/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from casefiles import ROOT, TRIALS_DIR, Case, build_resources, check_case, parse_case, read_yaml

CASES_DIR = ROOT / "tests" / "cases"


def collect_cases(directory: Path = CASES_DIR) -> list[Any]:
    """Every case of every ``*.yaml`` file in ``directory``, as pytest params."""
    params: list[Any] = []
    for path in sorted(directory.glob("*.yaml")):
        doc = read_yaml(path)
        if not {"trial", "as_of", "base", "cases"} <= set(doc):
            raise ValueError(f"{path.name}: needs trial, as_of, base and cases")
        params.extend(
            parse_case(
                doc["trial"], doc["as_of"], doc["base"], spec, f"{path.name}::{spec.get('id')}"
            )
            for spec in doc["cases"]
        )
    return params


CASES = collect_cases()


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
    check_case(case)
