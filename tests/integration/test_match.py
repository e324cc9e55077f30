"""``fhirmatch match`` end to end against a real FHIR server over HTTP.

Each test creates its own patients, tagged with a fresh code, and screens only those
(``--patients-query Patient?_tag=…``), so the tests also run against a shared server named by
``FHIR_BASE_URL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from fhirdata import (
    JSON_HEADERS,
    coding,
    observation,
    patient_resources,
    put_all,
    query_for,
)

from fhirmatch.cli import main
from fhirmatch.match import CLOCK_MARGIN
from fhirmatch.writeback import SUBJECT_IDENTIFIER_SYSTEM, subject_identifier

REPO = Path(__file__).resolve().parents[2]
TRIALS = REPO / "fixtures" / "trials"
AS_OF = "2026-11-01"


def subjects_for(base: str, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    tokens = ",".join(f"{SUBJECT_IDENTIFIER_SYSTEM}|{subject_identifier(s, p)}" for s, p in pairs)
    out: list[dict[str, Any]] = []
    url: str | None = f"{base}/ResearchSubject"
    params: dict[str, str] | None = {"identifier": tokens, "_count": "200"}
    while url:
        page = requests.get(url, params=params, headers=JSON_HEADERS, timeout=30).json()
        out.extend(e["resource"] for e in page.get("entry", []))
        url = next(
            (link["url"] for link in page.get("link", []) if link["relation"] == "next"), None
        )
        params = None
    return out


@pytest.fixture()
def population(fhir_base_url: str) -> tuple[str, list[str]]:
    """Four fresh tagged patients: two rectal, two esophageal. Returns (tag, patient ids)."""
    tag = uuid.uuid4().hex[:12]
    ids = [f"fm-{tag}-{i}" for i in range(4)]
    resources: list[dict[str, Any]] = []
    for i, pid in enumerate(ids):
        resources += patient_resources(pid, tag, rectal=i < 2)
    put_all(fhir_base_url, resources)
    # the first run's incremental window starts CLOCK_MARGIN before it: keep these out of it
    time.sleep(CLOCK_MARGIN.total_seconds() + 0.5)
    return tag, ids


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(
        [
            "match",
            *args,
            "--format",
            "json",
            "--log-level",
            os.environ.get("FM_TEST_LOG", "WARNING"),
        ]
    )
    out = capsys.readouterr().out
    return code, json.loads(out)


def base_args(base: str, tag: str) -> list[str]:
    return [
        "--server",
        base,
        "--trials",
        str(TRIALS),
        "--as-of",
        AS_OF,
        "--patients-query",
        query_for(tag),
    ]


def written_pairs(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (r["study"], r["patient"])
        for r in report["results"]
        if r["status"] in ("eligible", "insufficient-data")
    ]


def test_match_writes_subjects_with_provenance_once(
    fhir_base_url: str, population: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    tag, ids = population
    code, first = run_cli(capsys, *base_args(fhir_base_url, tag))
    assert code == 0
    assert {r["patient"] for r in first["results"]} == {f"Patient/{p}" for p in ids}
    assert len(first["results"]) == 4 * 5  # every patient against every trial
    pairs = written_pairs(first)
    assert pairs, "some pairs should be candidates or potential candidates"
    creates = [w for w in first["writes"] if w["action"] == "create"]
    assert sorted((w["study"], w["patient"]) for w in creates) == sorted(pairs)

    subjects = subjects_for(fhir_base_url, pairs)
    assert len(subjects) == len(pairs)
    by_pair = {(s["study"]["reference"], s["individual"]["reference"]): s for s in subjects}
    statuses = {(r["study"], r["patient"]): r["status"] for r in first["results"]}
    for pair, subject in by_pair.items():
        expected = "candidate" if statuses[pair] == "eligible" else "potential-candidate"
        assert subject["status"] == expected
        prov = requests.get(
            f"{fhir_base_url}/Provenance",
            params={"target": f"ResearchSubject/{subject['id']}"},
            headers=JSON_HEADERS,
            timeout=30,
        ).json()
        provs = [e["resource"] for e in prov.get("entry", [])]
        assert len(provs) == 1
        entities = {e["what"]["reference"] for e in provs[0]["entity"]}
        study_id = pair[0].split("/")[1]
        assert f"PlanDefinition/{study_id}-eligibility" in entities
        agent = provs[0]["agent"][0]["who"]["reference"]
        assert agent.startswith("Device/")

    # again: nothing new, nothing duplicated
    code, second = run_cli(capsys, *base_args(fhir_base_url, tag))
    assert code == 0
    assert {w["action"] for w in second["writes"] if w["action"] != "not-written"} == {"unchanged"}
    assert len(subjects_for(fhir_base_url, pairs)) == len(pairs)


def test_dry_run_writes_nothing(
    fhir_base_url: str, population: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    tag, _ = population
    code, report = run_cli(capsys, *base_args(fhir_base_url, tag), "--dry-run")
    assert code == 0
    assert report["dry_run"] is True
    pairs = written_pairs(report)
    assert pairs
    assert [w["action"] for w in report["writes"] if w["action"] == "create"]
    assert subjects_for(fhir_base_url, pairs) == []


def test_match_warns_about_incomplete_definitions(
    fhir_base_url: str, population: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    tag, _ = population
    code = main(["match", *base_args(fhir_base_url, tag), "--dry-run", "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0
    warnings = [line for line in captured.err.splitlines() if "definition incomplete" in line]
    assert len(warnings) == 2, captured.err
    results = json.loads(captured.out)["results"]
    assert {r["study"] for r in results if "incomplete" in r} == {
        "ResearchStudy/NCT06084897",
        "ResearchStudy/NCT05183958",
    }


def test_incremental_run_rescreens_only_changed_patient(
    fhir_base_url: str,
    population: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    tag, ids = population
    state = tmp_path / "state.json"
    args = [*base_args(fhir_base_url, tag), "--state", str(state)]
    code, first = run_cli(capsys, *args)
    assert code == 0
    assert {r["patient"] for r in first["results"]} == {f"Patient/{p}" for p in ids}

    assert first["skipped"] == []
    code, quiet = run_cli(capsys, *args)
    assert code == 0
    assert quiet["results"] == []  # nothing changed since the last run

    # a new, lower white cell count for one patient
    changed = ids[0]
    put_all(
        fhir_base_url,
        [observation(changed, f"{changed}-wbc2", "6690-2", 1.1, "10*3/uL", day="2026-10-30")],
    )
    code, third = run_cli(capsys, *args)
    assert code == 0
    assert {r["patient"] for r in third["results"]} == {f"Patient/{changed}"}
    updated = [w for w in third["writes"] if w["action"] == "update"]
    assert updated and {w["patient"] for w in updated} == {f"Patient/{changed}"}
    assert len(subjects_for(fhir_base_url, written_pairs(first))) == len(written_pairs(first))


def test_killed_run_resumes_without_duplicates_or_gaps(
    fhir_base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = uuid.uuid4().hex[:12]
    ids = [f"fm-{tag}-{i}" for i in range(24)]
    resources: list[dict[str, Any]] = []
    for i, pid in enumerate(ids):
        resources += patient_resources(pid, tag, rectal=i % 2 == 0)
    put_all(fhir_base_url, resources)
    state = tmp_path / "state.json"
    journal = tmp_path / "state.json.journal"
    args = [*base_args(fhir_base_url, tag), "--state", str(state), "--chunk-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhirmatch", "match", *args, "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    done_before = journal.read_text().count("\n")
    assert 3 <= done_before < len(ids)

    code, resumed = run_cli(capsys, *args)
    assert code == 0
    screened_now = {r["patient"] for r in resumed["results"]}
    # the resumed run screens the rest (the patient in flight when killed may be done twice)
    assert len(screened_now) >= len(ids) - done_before
    assert len(screened_now) <= len(ids) - done_before + 1
    assert not state.with_name("state.json.journal").exists()

    # every candidate pair of all twelve patients exists exactly once
    code, check = run_cli(capsys, *base_args(fhir_base_url, tag), "--dry-run")
    pairs = written_pairs(check)
    assert {w["action"] for w in check["writes"] if w["action"] != "not-written"} == {"unchanged"}
    subjects = subjects_for(fhir_base_url, pairs)
    keys = [(s["study"]["reference"], s["individual"]["reference"]) for s in subjects]
    assert sorted(keys) == sorted(pairs)


def test_bad_trial_definition_stops_before_writing(
    fhir_base_url: str,
    population: tuple[str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tag, ids = population
    bundle = json.loads((TRIALS / "NCT06767007.json").read_text())
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "PlanDefinition":
            res["action"][2]["condition"][0]["expression"]["expression"] = "%age >= (18"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bundle))
    code = main(
        [
            "match",
            "--server",
            fhir_base_url,
            "--trials",
            str(bad),
            "--patients-query",
            query_for(tag),
        ]
    )
    assert code == 2
    assert "inc-age" in capsys.readouterr().err
    pairs = [(f"ResearchStudy/{t}", f"Patient/{p}") for t in ("NCT06767007",) for p in ids]
    assert subjects_for(fhir_base_url, pairs) == []


def test_unreachable_server_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from fhirmatch.sandbox import free_port

    code = main(
        [
            "match",
            "--server",
            f"http://127.0.0.1:{free_port()}/fhir",
            "--trials",
            str(TRIALS),
            "--retries",
            "1",
            "--connect-timeout",
            "1",
        ]
    )
    assert code == 3
    assert "server" in capsys.readouterr().err


def test_local_lab_codes_are_mapped_in_match(
    fhir_base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A platelet count coded only with the hospital's local code still decides the criterion."""
    tag = uuid.uuid4().hex[:12]
    pid = f"fm-{tag}-local"
    resources = patient_resources(pid, tag, rectal=True)
    plt = observation(pid, f"{pid}-plt", "777-3", 45, "10*9/L", day="2026-10-28")
    plt["code"] = coding("http://hospital.example.org/fhir/CodeSystem/lab-codes", "PLT")
    put_all(fhir_base_url, [*resources, plt])
    code, report = run_cli(capsys, *base_args(fhir_base_url, tag), "--dry-run")
    assert code == 0
    (rectal,) = [r for r in report["results"] if r["study"] == "ResearchStudy/NCT06767007"]

    def find(criteria: list[dict[str, Any]], cid: str) -> dict[str, Any]:
        for c in criteria:
            if c["id"] == cid:
                return c
            if c.get("criteria"):
                with contextlib.suppress(StopIteration):
                    return find(c["criteria"], cid)
        raise StopIteration(cid)

    platelets = find(rectal["criteria"], "inc-platelets")
    assert platelets["outcome"] == "fail"
    assert platelets["evidence"] == [f"Observation/{pid}-plt"]
    assert rectal["status"] == "ineligible"


def test_concurrency_gives_the_same_outcome_in_the_same_order(
    fhir_base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One request at a time or eight in flight: the same results, writes and skips, in the
    same order (the patient list's), dry run and real run alike."""
    tag = uuid.uuid4().hex[:12]
    ids = [f"fc-{tag}-{i}" for i in range(7)]
    resources: list[dict[str, Any]] = []
    for i, pid in enumerate(ids):
        resources += patient_resources(pid, tag, rectal=i % 3 != 0)
    put_all(fhir_base_url, resources)
    small = [*base_args(fhir_base_url, tag), "--chunk-size", "2"]
    code, one = run_cli(capsys, *small, "--dry-run", "--concurrency", "1")
    assert code == 0
    code, many = run_cli(capsys, *small, "--dry-run", "--concurrency", "8")
    assert code == 0
    assert many == one
    patients = list(dict.fromkeys(r["patient"] for r in one["results"]))
    assert sorted(patients) == sorted(f"Patient/{p}" for p in ids)
    code, written = run_cli(capsys, *small, "--concurrency", "8")
    assert code == 0
    assert written["results"] == one["results"]
    assert [(w["study"], w["patient"], w["action"]) for w in written["writes"]] == [
        (w["study"], w["patient"], w["action"]) for w in one["writes"]
    ]
    assert len(subjects_for(fhir_base_url, written_pairs(written))) == len(written_pairs(one))


def test_match_compiles_the_trials_once(
    fhir_base_url: str,
    population: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The local executor's engine is the one the match job evaluates with."""
    from fhirmatch.engine import Engine

    built: list[int] = []
    original = Engine.__init__

    def counting(self: Engine, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", counting)
    tag, _ = population
    code, report = run_cli(capsys, *base_args(fhir_base_url, tag), "--dry-run")
    assert code == 0 and report["results"]
    assert len(built) == 1


def test_table_run_keeps_counts_not_results(
    fhir_base_url: str, population: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without JSON output or a report the run keeps no per-patient results (its memory does
    not grow with the population), and still counts every patient."""
    tag, ids = population
    code = main(["match", *base_args(fhir_base_url, tag), "--dry-run", "--log-level", "ERROR"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"screened {len(ids)} patients" in captured.err
    assert "NCT06767007" in captured.out
