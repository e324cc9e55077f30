"""The sandbox is a real FHIR server with the search parameters fhirmatch relies on."""

from __future__ import annotations

import uuid

import pytest
import requests

from fhirmatch.sandbox import SandboxError, fixture_files, start_sandbox

STRICT = {
    "Prefer": "handling=strict",
    "Accept": "application/fhir+json",
    "Cache-Control": "no-cache",  # HAPI FHIR would reuse a cached search for 60 s
}


def test_metadata_answers_r4(fhir_base_url: str) -> None:
    cs = requests.get(f"{fhir_base_url}/metadata", timeout=10).json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"].startswith("4.0")


@pytest.mark.parametrize("rtype", ["ResearchStudy", "ResearchSubject", "PlanDefinition"])
def test_identifier_search_filters_research_types(fhir_base_url: str, rtype: str) -> None:
    """Without registered search parameters sekmet would return every resource here."""
    system = "https://fhirmatch.dev/fhir/sid/test"
    value = uuid.uuid4().hex
    body: dict[str, object] = {
        "resourceType": rtype,
        "identifier": [{"system": system, "value": value}],
    }
    if rtype == "ResearchStudy":
        body["status"] = "active"
    elif rtype == "ResearchSubject":
        body |= {
            "status": "candidate",
            # resources the test session loaded: HAPI refuses references to absent ones
            "study": {"reference": "ResearchStudy/NCT06767007"},
            "individual": {"reference": "Patient/demo-escc-eligible"},
        }
    else:
        body["status"] = "draft"
    hdr = {
        **STRICT,
        "Content-Type": "application/fhir+json",
        "If-None-Exist": f"identifier={system}|{value}",
    }
    first = requests.post(f"{fhir_base_url}/{rtype}", json=body, headers=hdr, timeout=10)
    assert first.status_code == 201, first.text
    again = requests.post(f"{fhir_base_url}/{rtype}", json=body, headers=hdr, timeout=10)
    assert again.status_code == 200, again.text  # conditional create found the first one
    found = requests.get(
        f"{fhir_base_url}/{rtype}",
        params={"identifier": f"{system}|{value}"},
        headers=STRICT,
        timeout=10,
    ).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [first.json()["id"]]
    none = requests.get(
        f"{fhir_base_url}/{rtype}",
        params={"identifier": f"{system}|{uuid.uuid4().hex}"},
        headers=STRICT,
        timeout=10,
    ).json()
    assert none.get("entry", []) == []


def test_fixtures_are_loaded(fhir_base_url: str, is_local_sandbox: bool) -> None:
    if not is_local_sandbox:
        pytest.skip("only the local sandbox is loaded by the test session")
    files = fixture_files()
    assert any(f.parent.name == "trials" for f in files)
    assert any("patients" in f.parts for f in files)
    for study in ("escc-sbrt-antipd1", "NCT06084897", "NCT05183958", "NCT03731442", "NCT06767007"):
        resp = requests.get(f"{fhir_base_url}/ResearchStudy/{study}", timeout=10)
        assert resp.status_code == 200, study
        plan = requests.get(f"{fhir_base_url}/PlanDefinition/{study}-eligibility", timeout=10)
        assert plan.status_code == 200, study
    demo = requests.get(f"{fhir_base_url}/Patient/demo-escc-eligible", timeout=10)
    assert demo.status_code == 200
    assert demo.json()["id"] == "demo-escc-eligible"


def test_sandbox_binds_loopback_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with start_sandbox(data_dir=tmp_path, load=False) as sb:
        assert sb.base_url.startswith("http://127.0.0.1:")
        cs = requests.get(f"{sb.base_url}/metadata", timeout=10)
        assert cs.status_code == 200
        # the workflow simulator is off: creating a ServiceRequest spawns no Task
        sr = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/x"},
            "code": {"text": "x"},
        }
        requests.post(
            f"{sb.base_url}/ServiceRequest",
            json=sr,
            timeout=10,
            headers={"Content-Type": "application/fhir+json"},
        )
        tasks = requests.get(f"{sb.base_url}/Task", timeout=10).json()
        assert tasks.get("entry", []) == []
    assert not sb.alive()


def test_dead_sandbox_reports_its_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = start_sandbox(data_dir=tmp_path / "a", load=False)
    try:
        with pytest.raises(SandboxError) as err:
            start_sandbox(
                port=blocker.port, data_dir=tmp_path / "b", load=False, startup_timeout=20
            )
        assert "sandbox" in str(err.value)
    finally:
        blocker.stop()
