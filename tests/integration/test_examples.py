"""The scripts in ``examples/`` run as they are, against the test FHIR server.

Each script gets the server URL as its first argument and the evaluation date in
``FHIRMATCH_AS_OF``; each test writes its own tagged patient so it also runs against a shared
server (``FHIR_BASE_URL``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from fhirmatch.match import CLOCK_MARGIN

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TAG_SYSTEM = "https://fhirmatch.dev/fhir/test-run"
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
ENV = {**os.environ, "FHIRMATCH_AS_OF": "2026-11-01", "PYTHONUNBUFFERED": "1"}


def make_patient(base: str) -> tuple[str, str]:
    """A tagged copy of the demo patient eligible for NCT06767007; returns (id, tag)."""
    tag = uuid.uuid4().hex[:12]
    pid = f"ex-{tag}"
    text = (REPO / "fixtures" / "patients" / "demo-rectal-eligible.json").read_text()
    bundle = json.loads(text.replace("demo-rectal-eligible", pid))
    patient = bundle["entry"][0]["resource"]
    patient["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": tag}]}
    resp = requests.post(base, json=bundle, headers=JSON, timeout=60)
    assert resp.status_code == 200, resp.text[:300]
    return pid, tag


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=False,
    )


def test_screen_one_patient(fhir_base_url: str) -> None:
    pid, _ = make_patient(fhir_base_url)
    done = run("screen_patient.py", fhir_base_url, pid)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert out["patient"] == pid and out["skipped"] == {}
    assert out["results"]["ResearchStudy/NCT06767007"] == "eligible"
    assert out["writes"]["ResearchStudy/NCT06767007"] == "create"
    again = json.loads(run("screen_patient.py", fhir_base_url, pid).stdout)
    assert again["writes"]["ResearchStudy/NCT06767007"] == "unchanged"

    missing = run("screen_patient.py", fhir_base_url, f"{pid}-nobody", "--dry-run")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["skipped"]


def test_nightly_job_is_incremental(fhir_base_url: str, tmp_path: Path) -> None:
    _, tag = make_patient(fhir_base_url)
    time.sleep(CLOCK_MARGIN.total_seconds() + 0.5)  # keep the patient out of the next window
    args = [
        fhir_base_url,
        "--state",
        str(tmp_path / "state.json"),
        "--report",
        str(tmp_path / "report.html"),
        "--patients-query",
        f"Patient?_tag={TAG_SYSTEM}|{tag}",
    ]
    first = run("nightly.py", *args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary == {"incremental": False, "screened": 1, "skipped": 0, "written": 2}
    assert "NCT06767007" in (tmp_path / "report.html").read_text()
    second = json.loads(run("nightly.py", *args).stdout.strip().splitlines()[-1])
    assert second["incremental"] is True and second["screened"] == 0


def test_web_service_handler(fhir_base_url: str) -> None:
    pid, _ = make_patient(fhir_base_url)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "web_service.py"), fhir_base_url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        url = line.split()[-1]
        resp = requests.get(f"{url}/screen", params={"patient": pid}, timeout=60)
        assert resp.status_code == 200
        body = resp.json()
        statuses = {r["study"]: r["status"] for r in body["results"]}
        assert statuses["ResearchStudy/NCT06767007"] == "eligible"
        assert body["writes"]["ResearchStudy/NCT06767007"] == "create"
        assert requests.get(f"{url}/screen", timeout=10).status_code == 400
        nobody = requests.get(f"{url}/screen", params={"patient": f"{pid}-x"}, timeout=60)
        assert nobody.status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_is_tested(script: str) -> None:
    tested = Path(__file__).read_text()
    assert f'"{script}"' in tested
