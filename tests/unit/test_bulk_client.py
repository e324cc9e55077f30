"""Bulk Data $export client: kick-off parameters, polling, downloads, retries and cleanup."""

from __future__ import annotations

from pathlib import Path

import pytest
import responses
from responses import matchers

from fhirmatch.bulk import BulkExporter, export_patient_data, export_request_for
from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.errors import FatalNetworkError, TemporaryNetworkError
from fhirmatch.model import DataInput

BASE = "https://fhir.example.org/r4"
STATUS = f"{BASE}/bulk-status/42"
LOINC = "http://loinc.org"

REQS = [
    DataInput("hgb", "Observation", codes=frozenset({(LOINC, "718-7")})),
    DataInput("plt", "Observation", codes=frozenset({(LOINC, "777-3")})),
    DataInput("meds", "MedicationRequest", code_path="medication"),
]


def client(sleeps: list[float]) -> FhirClient:
    return FhirClient(ClientConfig(BASE, max_attempts=3), sleep=sleeps.append)


def manifest(token: bool = False, file_url: str = f"{BASE}/files/obs.ndjson") -> dict[str, object]:
    return {
        "transactionTime": "2026-11-01T00:00:00Z",
        "requiresAccessToken": token,
        "output": [{"type": "Observation", "url": file_url}],
        "error": [],
    }


def test_request_types_and_filters() -> None:
    req = export_request_for(REQS, since="2026-10-01T00:00:00Z", group="g1")
    assert req.types == ("Medication", "MedicationRequest", "Observation", "Patient")
    assert req.type_filters == (f"Observation?code={LOINC}|718-7,{LOINC}|777-3",)
    assert req.path == "Group/g1/$export"
    assert ("_since", "2026-10-01T00:00:00Z") in req.params()
    assert all(k != "_typeFilter" for k, _ in req.params(with_filters=False))


@responses.activate
def test_full_export_polls_downloads_and_deletes(tmp_path: Path) -> None:
    kick = responses.get(
        f"{BASE}/Patient/$export",
        status=202,
        headers={"Content-Location": STATUS},
        match=[matchers.header_matcher({"Prefer": "respond-async"})],
    )
    responses.get(STATUS, status=202, headers={"X-Progress": "10%", "Retry-After": "7"})
    responses.get(STATUS, status=202, headers={"X-Progress": "50%"})
    responses.get(STATUS, json=manifest())
    responses.get(f"{BASE}/files/obs.ndjson", body='{"resourceType":"Observation"}\n')
    delete = responses.delete(STATUS, status=202)
    sleeps: list[float] = []
    paths = export_patient_data(
        client(sleeps), REQS, workdir=tmp_path, type_filter=True, sleep=sleeps.append
    )
    assert [p.read_text() for p in paths] == ['{"resourceType":"Observation"}\n']
    assert sleeps == [7.0, 2.0]  # Retry-After honoured, then the doubling default
    sent = kick.calls[0].request.url
    assert "_typeFilter=Observation" in sent and "_type=Medication" in sent
    assert delete.call_count == 1
    assert not list(tmp_path.glob("*.part"))


@responses.activate
def test_type_filter_refused_falls_back(tmp_path: Path) -> None:
    responses.get(
        f"{BASE}/Patient/$export",
        status=400,
        match=[matchers.query_param_matcher({"_typeFilter": "x"}, strict_match=False)],
    )
    plain = responses.get(
        f"{BASE}/Patient/$export", status=202, headers={"Content-Location": STATUS}
    )
    exporter = BulkExporter(client([]), tmp_path, sleep=lambda s: None)
    req = export_request_for(REQS)
    object.__setattr__(req, "type_filters", ("x",))
    url, filtered = exporter.kickoff(req)
    assert (url, filtered) == (STATUS, False)
    assert "_typeFilter" not in plain.calls[0].request.url


@responses.activate
def test_download_retries_then_token_only_same_origin(tmp_path: Path) -> None:
    responses.get(f"{BASE}/files/obs.ndjson", status=503, headers={"Retry-After": "3"})
    ok = responses.get(f"{BASE}/files/obs.ndjson", body="{}\n")
    other = responses.get("https://s3.example.com/obs.ndjson", body="{}\n")

    class Token:
        def authorization(self, _transport: object) -> str:
            return "Bearer t"

        def invalidate(self) -> bool:
            return False

    c = client([])
    c.transport.auth = Token()  # type: ignore[assignment]
    sleeps: list[float] = []
    exporter = BulkExporter(c, tmp_path, sleep=sleeps.append)
    exporter.download(manifest(token=True))
    assert sleeps == [3.0]
    assert ok.calls[0].request.headers["Authorization"] == "Bearer t"
    exporter.download(manifest(token=True, file_url="https://s3.example.com/obs.ndjson"))
    assert "Authorization" not in other.calls[0].request.headers
    exporter.download(manifest(token=False))
    assert "Authorization" not in ok.calls[-1].request.headers


@responses.activate
def test_failed_job_is_deleted_and_raises(tmp_path: Path) -> None:
    responses.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    responses.get(
        STATUS,
        status=400,
        json={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "bad type"}]},
    )
    delete = responses.delete(STATUS, status=202)
    exporter = BulkExporter(client([]), tmp_path, sleep=lambda s: None)
    req = export_request_for([], group=None, level="system")
    with pytest.raises(FatalNetworkError, match="bad type"):
        exporter.run(req)
    assert delete.call_count == 1


@responses.activate
def test_polling_gives_up_after_timeout(tmp_path: Path) -> None:
    responses.get(STATUS, status=202, headers={"Retry-After": "100"})
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    exporter = BulkExporter(
        client([]), tmp_path, timeout=150, max_wait=60, sleep=sleep, clock=lambda: now[0]
    )
    with pytest.raises(TemporaryNetworkError, match="did not complete"):
        exporter.poll(STATUS)
    assert now[0] == 120.0  # two capped waits of 60 s, the third would pass the deadline


@responses.activate
def test_medication_refused_at_patient_level_is_read_by_search(tmp_path: Path) -> None:
    """HAPI FHIR refuses Medication (outside the Patient compartment) in a patient-level export:
    export the rest, then read the Medications the exported requests refer to."""
    refused = responses.get(
        f"{BASE}/Patient/$export",
        status=400,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": "HAPI-0512"}],
        },
        match=[
            matchers.query_param_matcher(
                {"_type": "Medication,MedicationRequest,Observation,Patient"}
            )
        ],
    )
    kick = responses.get(
        f"{BASE}/Patient/$export",
        status=202,
        headers={"Content-Location": STATUS},
        match=[matchers.query_param_matcher({"_type": "MedicationRequest,Observation,Patient"})],
    )
    responses.get(
        STATUS,
        json={
            "transactionTime": "2026-11-01T00:00:00Z",
            "requiresAccessToken": False,
            "output": [{"type": "MedicationRequest", "url": f"{BASE}/files/mr.ndjson"}],
        },
    )
    lines = [
        '{"resourceType":"MedicationRequest","id":"r1","medicationReference":'
        '{"reference":"Medication/m1"},"subject":{"reference":"Patient/p"}}',
        '{"resourceType":"MedicationRequest","id":"r2","medicationReference":'
        '{"reference":"Medication/m2"},"subject":{"reference":"Patient/p"}}',
        '{"resourceType":"MedicationRequest","id":"r3","medicationCodeableConcept":{"text":"x"}}',
    ]
    responses.get(f"{BASE}/files/mr.ndjson", body="\n".join(lines) + "\n")
    responses.delete(STATUS, status=202)
    search = responses.get(
        f"{BASE}/Medication",
        json={
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"resource": {"resourceType": "Medication", "id": "m1"}},
                {"resource": {"resourceType": "Medication", "id": "m2"}},
            ],
        },
        match=[matchers.query_param_matcher({"_id": "m1,m2"})],
    )
    sleeps: list[float] = []
    paths = export_patient_data(client(sleeps), REQS, workdir=tmp_path, sleep=sleeps.append)
    assert refused.call_count == 1 and kick.call_count == 1 and search.call_count == 1
    meds = [p for p in paths if p.name.endswith("Medication.ndjson")]
    assert len(meds) == 1
    assert [line[:40] for line in meds[0].read_text().splitlines()] == [
        '{"resourceType":"Medication","id":"m1"}',
        '{"resourceType":"Medication","id":"m2"}',
    ]


@responses.activate
def test_medication_is_not_dropped_from_a_system_export(tmp_path: Path) -> None:
    responses.get(f"{BASE}/$export", status=400)
    exporter = BulkExporter(client([]), tmp_path, sleep=lambda s: None)
    request = export_request_for(REQS, level="system")
    from fhirmatch.bulk import _export_with_medications

    with pytest.raises(FatalNetworkError):
        _export_with_medications(exporter, request)
    # asked with and without _typeFilter, never without Medication
    assert responses.calls and all("_type=Medication" in c.request.url for c in responses.calls)
