"""Trials on the server: ``trials publish`` is idempotent (the bundled trials by default);
``--trials-from-server`` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from fhirmatch.cli import main

REPO = Path(__file__).resolve().parents[2]
TRIALS = REPO / "fixtures" / "trials"
JSON = {"Accept": "application/fhir+json", "Cache-Control": "no-cache"}


def _versions(base: str, ref: str) -> int:
    history = requests.get(f"{base}/{ref}/_history", headers=JSON, timeout=30).json()
    return int(history.get("total") or len(history.get("entry", [])))


def test_publish_twice_changes_nothing(
    fhir_base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trials", "publish", "--server", fhir_base_url, str(TRIALS)]) == 0
    out = capsys.readouterr().out
    assert "ResearchStudy/NCT06767007 -> PlanDefinition/NCT06767007-eligibility" in out
    before = _versions(fhir_base_url, "PlanDefinition/NCT06767007-eligibility")
    # without a path: the bundled seed trials, the same definitions
    assert main(["trials", "publish", "--server", fhir_base_url]) == 0
    assert "ResearchStudy/NCT06767007 -> PlanDefinition/NCT06767007-eligibility" in (
        capsys.readouterr().out
    )
    assert _versions(fhir_base_url, "PlanDefinition/NCT06767007-eligibility") == before
    found = requests.get(
        f"{fhir_base_url}/ResearchStudy",
        params={"identifier": "https://clinicaltrials.gov|NCT06767007"},
        headers=JSON,
        timeout=30,
    ).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == ["NCT06767007"]


def test_match_with_trials_from_server(
    fhir_base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trials", "publish", "--server", fhir_base_url, str(TRIALS)]) == 0
    capsys.readouterr()
    code = main(
        [
            "match",
            "--server",
            fhir_base_url,
            "--trials-from-server",
            "--dry-run",
            "--patient",
            "no-such-patient",
            "--format",
            "json",
            "--as-of",
            "2026-11-01",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # the one patient does not exist: skipped, with the reason
    assert [s["patient"] for s in report["skipped"]] == ["Patient/no-such-patient"]
    assert "not found" in report["skipped"][0]["reason"].lower()
    assert report["results"] == []


def test_publish_refuses_bad_definitions_before_sending(
    fhir_base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = json.loads((TRIALS / "NCT03731442.json").read_text())
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "ResearchStudy":
            res["id"] = "fm-should-never-arrive"
            res["identifier"][0]["value"] = "fm-should-never-arrive"
        if res["resourceType"] == "PlanDefinition":
            computable = next(a for a in res["action"] if a.get("input"))
            computable["input"][0]["codeFilter"][0]["valueSet"] = (
                "https://fhirmatch.dev/fhir/ValueSet/no-such-set"
            )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bundle))
    assert main(["trials", "publish", "--server", fhir_base_url, str(bad)]) == 2
    assert "no-such-set" in capsys.readouterr().err
    found = requests.get(
        f"{fhir_base_url}/ResearchStudy",
        params={"identifier": "https://clinicaltrials.gov|fm-should-never-arrive"},
        headers=JSON,
        timeout=30,
    ).json()
    assert found.get("entry", []) == []
