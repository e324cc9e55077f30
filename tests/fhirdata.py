"""Test data the integration and reliability tests share: tagged patient populations.

Each test creates its own patients under a fresh tag and screens only those
(``Patient?_tag=…``), so tests do not see each other's data and also run against a shared
server named by ``FHIR_BASE_URL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import requests

TAG_SYSTEM = "https://fhirmatch.dev/fhir/test-run"
#: no-cache: HAPI FHIR answers a search repeated within 60 s from its cache unless told not to
JSON_HEADERS = {
    "Content-Type": "application/fhir+json",
    "Accept": "application/fhir+json",
    "Cache-Control": "no-cache",
}


def coding(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def observation(
    pid: str, oid: str, loinc: str, value: float, unit: str, day: str = "2026-10-25"
) -> dict[str, Any]:
    """A final LOINC-coded Observation with a UCUM quantity."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": coding("http://loinc.org", loinc),
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": day,
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }


def patient_resources(pid: str, tag: str, *, rectal: bool) -> list[dict[str, Any]]:
    """A patient with a cancer diagnosis, an ECOG score and a white cell count."""
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": tag}]},
        "birthDate": "1961-03-04",
        "gender": "male",
    }
    icd, sct = ("C20", "363351006") if rectal else ("C15.9", "363402007")
    condition = {
        "resourceType": "Condition",
        "id": f"{pid}-dx",
        "clinicalStatus": coding(
            "http://terminology.hl7.org/CodeSystem/condition-clinical", "recurrence"
        ),
        "verificationStatus": coding(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
        ),
        "code": {
            "coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": icd},
                {"system": "http://snomed.info/sct", "code": sct},
            ]
        },
        "subject": {"reference": f"Patient/{pid}"},
        "onsetDateTime": "2025-02-01",
    }
    return [
        patient,
        condition,
        observation(pid, f"{pid}-ecog", "89247-1", 1, "{score}"),
        observation(pid, f"{pid}-wbc", "6690-2", 5.2, "10*3/uL"),
    ]


def put_all(base: str, resources: Sequence[dict[str, Any]]) -> None:
    """Store resources with their ids in one transaction, straight to the server."""
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }
    resp = requests.post(base, json=bundle, headers=JSON_HEADERS, timeout=60)
    assert resp.status_code == 200, resp.text[:500]


def query_for(tag: str) -> str:
    """The Patient search that selects one test's population."""
    return f"Patient?_tag={TAG_SYSTEM}|{tag}"
