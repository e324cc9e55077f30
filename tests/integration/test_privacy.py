"""No patient data in logs, and owner-only output files.

The whole demo population (``fixtures/patients``) is loaded into a sandbox of its own and
screened with ``fhirmatch match`` — once in-process at the default log level with text logs,
once as a subprocess with JSON logs — and everything written to stderr is searched for the
names, birth dates and lab values read from the fixture files themselves. The results file and
HTML report the run writes must be readable by the owner only.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.cli import main
from fhirmatch.sandbox import SandboxHandle, start_sandbox

REPO = Path(__file__).resolve().parents[2]
PATIENTS = REPO / "fixtures" / "patients"
TRIALS = REPO / "fixtures" / "trials"
AS_OF = "2026-11-01"


def _resources(path: Path) -> Iterator[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("resourceType") == "Bundle":
        for entry in data.get("entry") or []:
            if isinstance(entry.get("resource"), dict):
                yield entry["resource"]
    else:
        yield data


def _number(value: float) -> str:
    return f"{value:g}"


def sensitive_strings() -> tuple[list[str], list[str]]:
    """(strings that identify a patient or state a result, the demo patients' ids)."""
    found: set[str] = set()
    ids: list[str] = []
    for path in sorted(PATIENTS.rglob("*.json")):
        for res in _resources(path):
            rtype = res.get("resourceType")
            if rtype == "Patient":
                ids.append(str(res["id"]))
                for name in res.get("name") or []:
                    parts = [*name.get("given", []), name.get("family", "")]
                    found.update(p for p in parts if len(p) >= 3)
                    if name.get("text"):
                        found.add(name["text"])
                if res.get("birthDate"):
                    found.add(res["birthDate"])
                for addr in res.get("address") or []:
                    found.update(line for line in addr.get("line", []) if len(line) >= 5)
            elif rtype == "Observation":
                q = res.get("valueQuantity") or {}
                if isinstance(q.get("value"), int | float):
                    unit = q.get("code") or q.get("unit") or ""
                    found.add(f"{_number(q['value'])} {unit}".strip())
                if isinstance(res.get("valueString"), str) and len(res["valueString"]) >= 2:
                    found.add(res["valueString"])
    # bare short numbers ("1", "62") would match counts and timings: keep value+unit pairs
    return sorted(s for s in found if len(s) >= 3 and not s.isdigit()), ids


@pytest.fixture(autouse=True)
def _restore_fhirmatch_logger() -> Iterator[None]:
    """``main`` reconfigures the ``fhirmatch`` logger (no propagation); undo it afterwards so
    later tests' ``caplog`` still sees fhirmatch logs."""
    logger = logging.getLogger("fhirmatch")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def demo_server() -> Iterator[SandboxHandle]:
    handle = start_sandbox(load=True)
    try:
        yield handle
    finally:
        handle.stop()


def test_fixture_strings_are_collected() -> None:
    strings, ids = sensitive_strings()
    assert len(ids) >= 15
    assert any(len(s) == 10 and s[4] == "-" for s in strings)  # birth dates
    assert any(" " in s and s[0].isdigit() for s in strings)  # lab values with units


def _assert_no_patient_data(text: str, strings: list[str]) -> None:
    leaked = [s for s in strings if s in text]
    assert not leaked, f"patient data in logs: {leaked[:5]}"


def test_match_logs_hold_no_patient_data(
    demo_server: SandboxHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strings, ids = sensitive_strings()
    report = tmp_path / "report.html"
    output = tmp_path / "results.json"
    old_umask = os.umask(0o022)  # the common default: new files world-readable
    try:
        code = main(
            [
                "match",
                "--server",
                demo_server.base_url,
                "--trials",
                str(TRIALS),
                "--as-of",
                AS_OF,
                "--patient",
                *ids,
                "--state",
                str(tmp_path / "state.json"),
                "--report",
                str(report),
                "--output",
                str(output),
                "--format",
                "json",
                "--progress-interval",
                "0",
            ]
        )
    finally:
        os.umask(old_umask)
    err = capsys.readouterr().err
    assert code in (0, 1)
    assert "INFO" in err and "screening" in err  # the default level really logged
    _assert_no_patient_data(err, strings)
    results = json.loads(output.read_text(encoding="utf-8"))
    assert {r["patient"] for r in results["results"]} >= {f"Patient/{i}" for i in ids[:5]}
    for path in (report, output, tmp_path / "state.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_match_json_logs_hold_no_patient_data(demo_server: SandboxHandle, tmp_path: Path) -> None:
    strings, ids = sensitive_strings()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhirmatch",
            "match",
            "--server",
            demo_server.base_url,
            "--trials",
            str(TRIALS),
            "--as-of",
            AS_OF,
            "--patient",
            *ids,
            "--dry-run",
            "--log-format",
            "json",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines and all(json.loads(line)["level"] for line in lines)
    _assert_no_patient_data(proc.stderr, strings)
    # stdout is the requested result: there the values belong (it is the user's output)
    assert json.loads(proc.stdout)["dry_run"] is True
