"""The evaluator over real-world shaped data: every Synthea, mCODE and MITRE patient gets a status
for every seed trial, and nothing crashes (including deliberately invalid MITRE files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirmatch.cli import main

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TRIALS = Path(__file__).resolve().parents[2] / "fixtures" / "trials"

pytestmark = pytest.mark.skipif(
    not DATA.exists() or not any(TRIALS.glob("*.json")), reason="shared data or trials missing"
)


def test_every_patient_gets_a_status_for_every_trial(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(DATA / "synthea-r4"), str(DATA / "mcode-stu4"), str(DATA / "ctm-mitre")]
    code = main(
        [
            "evaluate",
            "--trials",
            str(TRIALS),
            "--patients",
            *paths,
            "--as-of",
            "2026-11-01",
            "--format",
            "ndjson",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1  # the MITRE files hold Observations with two value[x], skipped
    rows = [json.loads(line) for line in out.splitlines() if '"problem"' not in line[:12]]
    n_trials = len({r["study"] for r in rows})
    assert n_trials == len(list(TRIALS.glob("*.json")))
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        assert r["status"] in ("eligible", "insufficient-data", "ineligible")
        by_patient.setdefault(r["patient"], set()).add(r["study"])
    assert len(by_patient) >= 119 + 2  # 119 Synthea patients plus the mCODE/MITRE ones
    assert all(len(studies) == n_trials for studies in by_patient.values())


def test_cli_json_shape_and_bad_patient_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    good = DATA / "mcode-stu4" / "Bundle-mcode-patient-bundle-jenny-m.json"
    code = main(
        [
            "evaluate",
            "--trials",
            str(TRIALS),
            "--patients",
            str(bad),
            str(good),
            "--as-of",
            "2026-11-01",
            "--format",
            "json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("bad.json: not valid JSON") == 1
    report = json.loads(captured.out)
    assert report["problems"] == [f"{bad}: not valid JSON (line 1); file skipped"]
    assert report["as_of"] == "2026-11-01"
    first = report["results"][0]
    assert first["patient"] == "Patient/cancer-patient-jenny-m"
    assert first["study"].startswith("ResearchStudy/")
    assert {"id", "kind", "text", "outcome", "evidence", "reason"} <= set(first["criteria"][0])


def test_cli_unreadable_trials_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "trial.json"
    bad.write_text("[]", encoding="utf-8")
    code = main(["evaluate", "--trials", str(bad), "--patients", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("fhirmatch:")


def test_results_are_written_as_pydantic_writes_them() -> None:
    """``result_json`` (how ``evaluate --format ndjson`` writes) gives the same bytes as
    ``model_dump_json`` for every result of every real-data patient."""
    from datetime import date

    from fhirmatch.engine import Engine
    from fhirmatch.records import iter_patient_records
    from fhirmatch.results import result_json
    from fhirmatch.trials import load_trials

    trials = load_trials([TRIALS])
    engine = Engine(trials)
    paths = [DATA / "synthea-r4", DATA / "mcode-stu4", DATA / "ctm-mitre"]
    checked = 0
    for record in iter_patient_records(paths):
        for result in engine.evaluate_patient_record(record, as_of=date(2026, 11, 1)):
            assert result_json(result) == result.model_dump_json().encode("utf-8")
            checked += 1
    assert checked >= 121 * len(trials)
