"""FhirClient and fetch_patient_data against a real FHIR server over HTTP.

Every test creates its own data under fresh identifiers (uuid), so the tests pass on the local
sandbox and on a shared server (``FHIR_BASE_URL``) alike.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.errors import (
    FatalNetworkError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
)
from fhirmatch.fetch import fetch_patient_data
from fhirmatch.model import DataInput

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
ID_SYSTEM = "urn:fhirmatch:test"


@pytest.fixture
def client(fhir_base_url: str) -> Iterator[FhirClient]:
    config = ClientConfig(
        fhir_base_url,
        extra_headers={"Prefer": "handling=strict"},
        read_timeout=30,
        max_attempts=3,
    )
    with FhirClient(config) as c:
        yield c


def new_tag() -> str:
    return uuid.uuid4().hex


def make_patient(client: FhirClient, tag: str) -> str:
    out = client.create(
        {
            "resourceType": "Patient",
            "identifier": [{"system": ID_SYSTEM, "value": tag}],
            "gender": "unknown",
        },
        if_none_exist={"identifier": f"{ID_SYSTEM}|{tag}"},
    )
    assert out.id
    return out.id


def observation(pid: str, code: str, date: str, value: float = 1.0) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": date,
        "valueQuantity": {"value": value, "unit": "mg/dL"},
    }


def post_all(client: FhirClient, resources: list[dict[str, Any]]) -> list[str]:
    """Create resources in one transaction; return their ids."""
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for r in resources
        ],
    }
    outcomes = client.transaction(bundle)
    assert all(o.ok for o in outcomes), [o.status for o in outcomes]
    ids = [o.id for o in outcomes]
    assert all(ids)
    return [str(i) for i in ids]


def test_capabilities(client: FhirClient) -> None:
    assert client.fhir_version in ("R4", "R4B", "R5")
    assert client.capabilities().supports_type("Observation")
    assert client.supports_search_param("Observation", "patient")
    before = client.stats.requests
    client.capabilities()
    assert client.stats.requests == before  # cached


def test_conditional_create_returns_same_id(client: FhirClient) -> None:
    tag = new_tag()
    first = make_patient(client, tag)
    second = make_patient(client, tag)
    assert first == second
    found = client.search_all("Patient", {"identifier": f"{ID_SYSTEM}|{tag}"})
    assert [r["id"] for r in found.matches] == [first]


def test_paging_across_many_pages(client: FhirClient) -> None:
    pid = make_patient(client, new_tag())
    created = post_all(
        client, [observation(pid, "2160-0", f"2024-01-{i + 1:02d}", i) for i in range(30)]
    )
    before = client.stats.requests
    result = client.search_all("Observation", {"patient": pid, "_count": 7})
    assert sorted(r["id"] for r in result.matches) == sorted(created)
    assert result.pages == 5
    assert client.stats.requests - before == 5
    pages = list(client.iter_pages("Observation", {"patient": pid, "_count": 7}))
    assert [len(p.get("entry") or []) for p in pages] == [7, 7, 7, 7, 2]


def test_search_shapes(client: FhirClient) -> None:
    pid = make_patient(client, new_tag())
    post_all(
        client,
        [
            observation(pid, "2160-0", "2020-05-01"),
            observation(pid, "2160-0", "2024-05-01"),
            observation(pid, "718-7", "2024-06-01"),
            observation(pid, "4548-4", "2024-07-01"),
        ],
    )

    def ids(params: dict[str, Any]) -> int:
        return len(client.search_all("Observation", {"patient": pid, **params}).matches)

    assert ids({}) == 4
    assert ids({"code": f"{LOINC}|2160-0"}) == 2
    assert ids({"code": f"{LOINC}|2160-0,{LOINC}|718-7"}) == 3
    assert ids({"code": f"{LOINC}|2160-0", "date": "ge2021-01-01"}) == 1
    assert ids({"date": ["ge2024-05-15", "lt2024-06-30"]}) == 1
    assert ids({"_lastUpdated": "ge2000-01-01"}) == 4
    by_ref = client.search_all("Observation", {"subject": f"Patient/{pid}"})
    assert len(by_ref.matches) == 4
    # a long query goes out as POST _search and means the same
    padding = ",".join(f"{LOINC}|99{i:04d}-9" for i in range(120))
    before = client.stats.requests
    assert ids({"code": f"{padding},{LOINC}|718-7"}) == 1
    assert client.stats.requests - before == 1


def test_include_and_revinclude(client: FhirClient) -> None:
    pid = make_patient(client, new_tag())
    post_all(client, [observation(pid, "2160-0", "2024-01-01") for _ in range(3)])
    inc = client.search_all("Observation", {"patient": pid, "_include": "Observation:patient"})
    assert len(inc.matches) == 3
    assert [r["id"] for r in inc.included] == [pid]
    rev = client.search_all("Patient", {"_id": pid, "_revinclude": "Observation:patient"})
    assert [r["id"] for r in rev.matches] == [pid]
    assert len(rev.included) == 3
    assert {r["resourceType"] for r in rev.included} == {"Observation"}


def test_multi_patient_search(client: FhirClient) -> None:
    a, b, c = (make_patient(client, new_tag()) for _ in range(3))
    post_all(client, [observation(p, "2160-0", "2024-01-01") for p in (a, b, c)])
    found = client.search_all("Observation", {"patient": f"{a},{b}"})
    owners = sorted(r["subject"]["reference"].rsplit("/", 1)[-1] for r in found.matches)
    assert owners == sorted([a, b])


def test_transaction_rollback_leaves_nothing(client: FhirClient) -> None:
    tag = new_tag()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": ID_SYSTEM, "value": tag}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                # invalid on every server: code is required (HAPI does not check that on
                # write) and the status is not an ObservationStatus code (HAPI's parser refuses it)
                "resource": {
                    "resourceType": "Observation",
                    "status": "not-a-status",
                    "valueString": "x",
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    with pytest.raises(FatalNetworkError) as info:
        client.transaction(bundle)
    assert info.value.status is not None and 400 <= info.value.status < 500
    found = client.search_all("Patient", {"identifier": f"{ID_SYSTEM}|{tag}"})
    assert found.matches == []


def test_not_found_gone_and_precondition(client: FhirClient) -> None:
    with pytest.raises(ResourceNotFound) as info:
        client.read("Patient", f"nope-{new_tag()[:20]}")
    assert info.value.status == 404
    pid = make_patient(client, new_tag())
    current = client.read("Patient", pid)
    version = current["meta"]["versionId"]
    updated = client.update({**current, "gender": "female"}, if_match=version)
    assert updated.version_id != version
    with pytest.raises(PreconditionFailed):
        client.update({**current, "gender": "male"}, if_match=version)  # stale version
    client.delete("Patient", pid)
    with pytest.raises(ResourceGone) as gone:
        client.read("Patient", pid)
    assert gone.value.status == 410


def test_conditional_update_creates_then_updates(client: FhirClient) -> None:
    tag = new_tag()
    resource = {
        "resourceType": "Patient",
        "identifier": [{"system": ID_SYSTEM, "value": tag}],
        "gender": "female",
    }
    criteria = {"identifier": f"{ID_SYSTEM}|{tag}"}
    first = client.conditional_update(resource, criteria)
    second = client.conditional_update({**resource, "gender": "male"}, criteria)
    assert first.id == second.id
    assert client.read("Patient", str(first.id))["gender"] == "male"


def test_everything_or_fallback(client: FhirClient) -> None:
    pid = make_patient(client, new_tag())
    obs_ids = post_all(client, [observation(pid, "2160-0", "2024-01-01") for _ in range(2)])
    result = client.everything(pid)
    got = {(r["resourceType"], r["id"]) for r in result.matches + result.included}
    assert ("Patient", pid) in got
    assert {("Observation", i) for i in obs_ids} <= got
    only_obs = client.everything(pid, types=["Observation"])
    types = {r["resourceType"] for r in only_obs.matches + only_obs.included}
    assert "Observation" in types
    assert "Condition" not in types


def test_fetch_patient_data_exact_and_few_requests(client: FhirClient) -> None:
    pids = [make_patient(client, new_tag()) for _ in range(3)]
    wanted: dict[str, set[str]] = {p: set() for p in pids}
    resources: list[dict[str, Any]] = []
    for p in pids:
        resources += [
            observation(p, "2160-0", "2025-06-01"),  # wanted: in window
            observation(p, "718-7", "2025-05-01"),  # wanted: other code, in the wider window
            observation(p, "2160-0", "2019-01-01"),  # too old
            observation(p, "4548-4", "2025-06-01"),  # code not asked for
            {
                "resourceType": "Condition",
                "subject": {"reference": f"Patient/{p}"},
                "code": {"coding": [{"system": SCT, "code": "254637007"}]},
            },
        ]
    ids = post_all(client, resources)
    for i, p in enumerate(pids):
        base = i * 5
        wanted[p] = {ids[base], ids[base + 1], ids[base + 4]}
    reqs = [
        DataInput("creat", "Observation", codes=frozenset({(LOINC, "2160-0")}), lookback_days=90),
        DataInput("hb", "Observation", codes=frozenset({(LOINC, "718-7")}), lookback_days=180),
        DataInput("nsclc", "Condition", codes=frozenset({(SCT, "254637007")})),
    ]
    result = fetch_patient_data(client, pids, reqs, as_of=dt.date(2025, 6, 30))
    assert result.errors == {}
    assert result.requests == 3  # Patients, Observations, Conditions
    for p in pids:
        got = result.resources[p]
        assert got[0]["resourceType"] == "Patient" and got[0]["id"] == p
        assert {r["id"] for r in got[1:]} == wanted[p]
    missing = f"missing-{new_tag()[:16]}"
    partial = fetch_patient_data(client, [pids[0], missing], reqs, as_of=dt.date(2025, 6, 30))
    assert partial.errors == {missing: ["Patient not found"]}
    assert {r["id"] for r in partial.resources[pids[0]][1:]} == wanted[pids[0]]


def test_fetch_medications_by_reference(client: FhirClient) -> None:
    rx = "http://www.nlm.nih.gov/research/umls/rxnorm"
    pid = make_patient(client, new_tag())
    med_ids = post_all(
        client,
        [
            {"resourceType": "Medication", "code": {"coding": [{"system": rx, "code": "860975"}]}},
            {"resourceType": "Medication", "code": {"coding": [{"system": rx, "code": "1"}]}},
        ],
    )

    def request(**medication: Any) -> dict[str, Any]:
        return {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{pid}"},
            **medication,
        }

    mr_ids = post_all(
        client,
        [
            request(medicationReference={"reference": f"Medication/{med_ids[0]}"}),
            request(medicationReference={"reference": f"Medication/{med_ids[1]}"}),
            request(medicationCodeableConcept={"coding": [{"system": rx, "code": "860975"}]}),
        ],
    )
    reqs = [
        DataInput(
            "metformin",
            "MedicationRequest",
            codes=frozenset({(rx, "860975")}),
            code_path="medication",
        )
    ]
    result = fetch_patient_data(client, [pid], reqs)
    got = {(r["resourceType"], r["id"]) for r in result.resources[pid]}
    assert got == {
        ("Patient", pid),
        ("MedicationRequest", mr_ids[0]),
        ("Medication", med_ids[0]),
        ("MedicationRequest", mr_ids[2]),
    }
    assert result.requests == 2
