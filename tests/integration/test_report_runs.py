"""The HTML report across scheduled runs, against a real FHIR server: an incremental run keeps
the last picture (and says there were no changes), and ``--report-identifier mrn`` shows MRNs
read from the server, only when asked."""

from __future__ import annotations

import json
import logging
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fhirdata import observation, patient_resources, put_all, query_for

from fhirmatch.cli import main
from fhirmatch.match import CLOCK_MARGIN
from fhirmatch.report import read_report_data

REPO = Path(__file__).resolve().parents[2]
TRIALS = REPO / "fixtures" / "trials"
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


@pytest.fixture()
def tagged(fhir_base_url: str) -> tuple[str, list[str]]:
    """Three fresh tagged patients with an MRN each (typed MR) and a second, untyped
    identifier. Returns (tag, patient ids)."""
    tag = uuid.uuid4().hex[:12]
    ids = [f"rp-{tag}-{i}" for i in range(3)]
    resources: list[dict[str, Any]] = []
    for i, pid in enumerate(ids):
        res = patient_resources(pid, tag, rectal=i < 2)
        res[0]["identifier"] = [
            {"system": "http://hospital.example.org/mrn", "type": MR, "value": f"MRN{i}-{tag}"},
            {"system": "http://hospital.example.org/other", "value": f"OTHER{i}-{tag}"},
        ]
        resources += res
    put_all(fhir_base_url, resources)
    time.sleep(CLOCK_MARGIN.total_seconds() + 0.5)
    return tag, ids


def _match(base: str, tag: str, *extra: str) -> int:
    return main(
        [
            "match",
            "--server",
            base,
            "--trials",
            str(TRIALS),
            "--as-of",
            "2026-11-01",
            "--patients-query",
            query_for(tag),
            "--format",
            "json",
            "--log-level",
            "INFO",
            *extra,
        ]
    )


def _counts(html: str) -> list[list[int]]:
    """Each trial's counts row: screened, eligible, insufficient, ineligible, written,
    unchanged (and not re-screened, when shown)."""
    rows = re.findall(r'<tr><td class="num">.*?</tr>', html, re.DOTALL)
    return [[int(n) for n in re.findall(r'class="num">(\d+)<', row)] for row in rows]


def test_an_incremental_run_keeps_the_last_picture(
    fhir_base_url: str,
    tagged: tuple[str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tag, ids = tagged
    report = tmp_path / "report.html"
    state = tmp_path / "state.json"
    args = ("--state", str(state), "--report", str(report))

    assert _match(fhir_base_url, tag, *args) == 0
    first = report.read_text(encoding="utf-8")
    full = _counts(first)
    assert len(full) == 5 and all(row[0] == 3 for row in full)
    data = read_report_data(report)
    assert data is not None and {r.patient for r in data.results} == {f"Patient/{p}" for p in ids}

    # nothing changed: the report keeps every figure and says so
    assert _match(fhir_base_url, tag, *args) == 0
    quiet = report.read_text(encoding="utf-8")
    since = json.loads(state.read_text())["last_success"]
    assert "No changes since" in quiet
    assert re.search(r"No changes since [^<]*\d{4}-\d\d-\d\d", quiet)
    assert "0 patients screened" not in quiet
    quiet_counts = _counts(quiet)
    # same screened/eligible/insufficient/ineligible; nothing written; all 3 carried forward
    assert [row[:4] for row in quiet_counts] == [row[:4] for row in full]
    assert all(row[4] == 0 and row[-1] == 3 for row in quiet_counts)
    assert since

    # one patient's white cells drop: only that patient is screened again, the rest is kept
    changed = ids[0]
    put_all(
        fhir_base_url,
        [observation(changed, f"{changed}-wbc2", "6690-2", 1.1, "10*3/uL", day="2026-10-30")],
    )
    assert _match(fhir_base_url, tag, *args) == 0
    third = report.read_text(encoding="utf-8")
    assert "No changes since" not in third
    assert "Incremental run: 1 patients" in third
    third_counts = _counts(third)
    assert all(row[0] == 3 and row[-1] == 2 for row in third_counts)
    data = read_report_data(report)
    assert data is not None and len({r.patient for r in data.results}) == 3
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    capsys.readouterr()


def test_report_identifier_mrn_is_opt_in_and_stays_out_of_logs(
    fhir_base_url: str,
    tagged: tuple[str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tag, ids = tagged
    caplog.set_level(logging.DEBUG, logger="fhirmatch")
    plain = tmp_path / "plain.html"
    assert _match(fhir_base_url, tag, "--dry-run", "--report", str(plain)) == 0
    html = plain.read_text(encoding="utf-8")
    assert f"Patient/{ids[0]}" in html
    assert f"MRN0-{tag}" not in html

    with_mrn = tmp_path / "mrn.html"
    code = _match(
        fhir_base_url,
        tag,
        "--dry-run",
        "--report",
        str(with_mrn),
        "--report-identifier",
        "mrn",
    )
    assert code == 0
    html = with_mrn.read_text(encoding="utf-8")
    listed = set(re.findall(r"<summary>(Patient/[^<·]+?)(?: · MRN ([^<]+))?</summary>", html))
    assert listed, "no candidate listed"
    for patient, mrn in listed:
        i = ids.index(patient.removeprefix("Patient/"))
        assert mrn == f"MRN{i}-{tag}"  # the MR-typed identifier, not the other one
    assert f"OTHER0-{tag}" not in html
    assert stat.S_IMODE(with_mrn.stat().st_mode) == 0o600
    out = capsys.readouterr()
    logged = " ".join(r.getMessage() for r in caplog.records) + out.err
    assert "MRN0" not in logged and "MRN1" not in logged
