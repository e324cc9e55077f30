"""FhirClient: capabilities, reads, writes, Bundles and $everything fallback."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from fhirmatch.client import ClientConfig, EntryOutcome, FhirClient, bundle_is_retry_safe
from fhirmatch.errors import (
    FatalNetworkError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    TemporaryNetworkError,
)

BASE = "https://fhir.example.org/r4"


def capability(version: str = "4.0.1", everything: bool = True) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "type": "Patient",
        "searchParam": [{"name": "identifier", "type": "token"}],
        "searchRevInclude": ["Observation:patient"],
    }
    if everything:
        patient["operation"] = [{"name": "everything", "definition": "x"}]
    return {
        "resourceType": "CapabilityStatement",
        "fhirVersion": version,
        "rest": [
            {
                "mode": "server",
                "resource": [
                    patient,
                    {
                        "type": "Observation",
                        "searchParam": [{"name": "patient"}, {"name": "code"}, {"name": "date"}],
                    },
                    {"type": "Condition", "searchParam": [{"name": "patient"}]},
                    {"type": "Procedure", "searchParam": [{"name": "code"}]},
                ],
                "operation": [{"name": "validate"}],
            }
        ],
    }


@pytest.fixture
def client() -> FhirClient:
    return FhirClient(ClientConfig(BASE, max_attempts=3), sleep=lambda s: None)


@pytest.mark.parametrize(
    ("version", "release"),
    [("4.0.1", "R4"), ("4.3.0", "R4B"), ("5.0.0", "R5"), ("3.0.2", "unknown")],
)
@responses.activate
def test_fhir_version(client: FhirClient, version: str, release: str) -> None:
    responses.get(f"{BASE}/metadata", json=capability(version))
    assert client.fhir_version == release
    assert client.fhir_version == release
    assert len(responses.calls) == 1  # cached


@responses.activate
def test_supports(client: FhirClient) -> None:
    responses.get(f"{BASE}/metadata", json=capability())
    caps = client.capabilities()
    assert caps.resource_types == {"Patient", "Observation", "Condition", "Procedure"}
    assert client.supports_search_param("Observation", "code")
    assert client.supports_search_param("Observation", "_lastUpdated")
    assert not client.supports_search_param("Observation", "category")
    assert not client.supports_search_param("Medication", "code")
    assert client.supports_operation("Patient", "$everything")
    assert not client.supports_operation("Observation", "everything")
    assert client.supports_operation(None, "validate")
    assert caps.supports_revinclude("Patient", "Observation:patient")
    assert not caps.supports_revinclude("Patient", "Condition:patient")


@responses.activate
def test_read_vread_and_errors(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    responses.get(f"{BASE}/Patient/1/_history/2", json={"resourceType": "Patient", "id": "1"})
    responses.get(f"{BASE}/Patient/2", status=404)
    responses.get(f"{BASE}/Patient/3", status=410)
    assert client.read("Patient", "1")["id"] == "1"
    assert client.vread("Patient", "1", "2")["id"] == "1"
    with pytest.raises(ResourceNotFound):
        client.read("Patient", "2")
    with pytest.raises(ResourceGone):
        client.read("Patient", "3")


@responses.activate
def test_create_conditional_and_outcome(client: FhirClient) -> None:
    responses.post(
        f"{BASE}/Patient",
        status=201,
        headers={"Location": f"{BASE}/Patient/7/_history/1", "ETag": 'W/"1"'},
        json={"resourceType": "Patient", "id": "7", "meta": {"versionId": "1"}},
        match=[matchers.header_matcher({"If-None-Exist": "identifier=urn:mrn|42"})],
    )
    out = client.create({"resourceType": "Patient"}, if_none_exist={"identifier": "urn:mrn|42"})
    assert out.status == 201
    assert out.id == "7"
    assert out.version_id == "1"
    assert out.ok
    sent = responses.calls[0].request
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert json.loads(sent.body) == {"resourceType": "Patient"}


@responses.activate
def test_update_if_match_conflict(client: FhirClient) -> None:
    oo = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "version conflict"}]}
    responses.put(
        f"{BASE}/Patient/7",
        status=412,
        json=oo,
        match=[matchers.header_matcher({"If-Match": 'W/"3"'})],
    )
    with pytest.raises(PreconditionFailed) as info:
        client.update({"resourceType": "Patient", "id": "7"}, if_match="3")
    assert info.value.outcome == "version conflict"
    assert len(responses.calls) == 1


#: an OperationOutcome whose diagnostics hold a JSON escape of a lone surrogate, which decodes
#: to a str that cannot be written as UTF-8
LONE_SURROGATE_OO = (
    b'{"resourceType": "OperationOutcome", "issue": [{"diagnostics": "bad unit \\udc80 here"}]}'
)


@responses.activate
def test_a_lone_surrogate_in_an_error_outcome_is_a_replacement_character(
    client: FhirClient,
) -> None:
    responses.put(
        f"{BASE}/Patient/7",
        status=412,
        body=LONE_SURROGATE_OO,
        content_type="application/fhir+json",
    )
    with pytest.raises(PreconditionFailed) as info:
        client.update({"resourceType": "Patient", "id": "7"}, if_match="3")
    assert info.value.outcome == "bad unit \ufffd here"
    str(info.value).encode("utf-8")  # a message that can be logged and reported


@responses.activate
def test_a_lone_surrogate_in_a_write_outcome_is_a_replacement_character(
    client: FhirClient,
) -> None:
    responses.post(
        f"{BASE}/Patient",
        status=200,
        body=LONE_SURROGATE_OO,
        content_type="application/fhir+json",
    )
    out = client.create({"resourceType": "Patient"}, if_none_exist={"identifier": "urn:mrn|42"})
    assert out.outcome == "bad unit \ufffd here"


@responses.activate
def test_update_if_match_conflict_as_hapi_answers_it(client: FhirClient) -> None:
    """HAPI FHIR answers a stale If-Match with 409 Conflict instead of 412."""
    oo = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "HAPI-0989: not current"}]}
    responses.put(f"{BASE}/Patient/7", status=409, json=oo)
    with pytest.raises(PreconditionFailed) as info:
        client.update({"resourceType": "Patient", "id": "7"}, if_match="3")
    assert info.value.status == 409 and info.value.outcome == "HAPI-0989: not current"


@responses.activate
def test_conflict_without_if_match_is_not_a_precondition(client: FhirClient) -> None:
    responses.put(f"{BASE}/Patient/7", status=409)
    with pytest.raises(FatalNetworkError) as info:
        client.update({"resourceType": "Patient", "id": "7"})
    assert info.value.status == 409 and not isinstance(info.value, PreconditionFailed)


@responses.activate
def test_conditional_update_uses_query(client: FhirClient) -> None:
    responses.put(
        f"{BASE}/ResearchSubject",
        status=200,
        json={"resourceType": "ResearchSubject", "id": "rs1"},
        match=[matchers.query_param_matcher({"identifier": "urn:x|1"})],
    )
    out = client.conditional_update({"resourceType": "ResearchSubject"}, {"identifier": "urn:x|1"})
    assert out.id == "rs1"


@responses.activate
def test_delete(client: FhirClient) -> None:
    responses.delete(f"{BASE}/Patient/7", status=204)
    assert client.delete("Patient", "7").status == 204


def _tx(entries: list[dict[str, Any]], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


SAFE = {"request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=a|1"}}
UNSAFE = {"request": {"method": "POST", "url": "Observation"}}
PUT = {"request": {"method": "PUT", "url": "Patient/1"}}
PUT_IF_MATCH = {"request": {"method": "PUT", "url": "Patient/1", "ifMatch": 'W/"1"'}}


@pytest.mark.parametrize(
    ("entries", "safe"),
    [
        ([SAFE, PUT], True),
        ([SAFE, UNSAFE], False),
        ([PUT_IF_MATCH], False),
        ([{"request": {"method": "DELETE", "url": "Patient/1"}}], True),
        ([{"request": {"method": "PATCH", "url": "Patient/1"}}], False),
        ([], True),
    ],
)
def test_bundle_retry_safety(entries: list[dict[str, Any]], safe: bool) -> None:
    assert bundle_is_retry_safe(_tx(entries)) is safe


@responses.activate
def test_transaction_outcomes(client: FhirClient) -> None:
    responses.post(
        BASE,
        json={
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {
                    "response": {
                        "status": "201 Created",
                        "location": "Patient/1/_history/1",
                        "etag": 'W/"1"',
                    }
                },
                {"response": {"status": "200 OK", "location": "Observation/2/_history/4"}},
            ],
        },
    )
    outs = client.transaction(_tx([SAFE, UNSAFE]))
    assert outs == [
        EntryOutcome(status=201, location="Patient/1/_history/1", etag='W/"1"'),
        EntryOutcome(status=200, location="Observation/2/_history/4"),
    ]
    assert [o.id for o in outs] == ["1", "2"]
    assert [o.version_id for o in outs] == ["1", "4"]


@responses.activate
def test_transaction_with_plain_create_not_retried_on_read_timeout(client: FhirClient) -> None:
    responses.post(BASE, body=requests.exceptions.ReadTimeout("lost"))
    with pytest.raises(TemporaryNetworkError):
        client.transaction(_tx([SAFE, UNSAFE]))
    assert len(responses.calls) == 1


@responses.activate
def test_transaction_of_conditional_entries_retried(client: FhirClient) -> None:
    responses.post(BASE, body=requests.exceptions.ReadTimeout("lost"))
    responses.post(
        BASE,
        json={
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": {"status": "200 OK"}}],
        },
    )
    outs = client.transaction(_tx([SAFE]))
    assert outs[0].status == 200
    assert len(responses.calls) == 2


@responses.activate
def test_batch_entry_errors(client: FhirClient) -> None:
    responses.post(
        BASE,
        json={
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [
                {
                    "response": {
                        "status": "404 Not Found",
                        "outcome": {
                            "resourceType": "OperationOutcome",
                            "issue": [{"diagnostics": "no Patient/9"}],
                        },
                    }
                },
            ],
        },
    )
    outs = client.batch(_tx([{"request": {"method": "GET", "url": "Patient/9"}}], "batch"))
    assert outs[0].status == 404
    assert not outs[0].ok
    assert outs[0].outcome == "no Patient/9"


@responses.activate
def test_everything_operation(client: FhirClient) -> None:
    responses.get(f"{BASE}/metadata", json=capability())
    responses.get(
        f"{BASE}/Patient/p1/$everything",
        json={
            "resourceType": "Bundle",
            "entry": [
                {"resource": {"resourceType": "Patient", "id": "p1"}},
                {"resource": {"resourceType": "Observation", "id": "o1"}},
            ],
        },
        match=[matchers.query_param_matcher({"_type": "Observation", "_since": "2024-01-01"})],
    )
    result = client.everything("p1", types=["Observation"], since="2024-01-01")
    assert [r["id"] for r in result.matches] == ["p1", "o1"]


@pytest.mark.parametrize("supported", [True, False])
@responses.activate
def test_everything_fallback(client: FhirClient, supported: bool) -> None:
    responses.get(f"{BASE}/metadata", json=capability(everything=supported))
    if supported:
        responses.get(f"{BASE}/Patient/p1/$everything", status=501)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    for rtype, rid in (("Observation", "o1"), ("Condition", "c1")):
        responses.get(
            f"{BASE}/{rtype}",
            json={
                "resourceType": "Bundle",
                "entry": [{"resource": {"resourceType": rtype, "id": rid}}],
            },
            match=[matchers.query_param_matcher({"patient": "p1"})],
        )
    result = client.everything("p1")
    # Procedure is listed but has no patient search parameter: skipped
    assert sorted(r["id"] for r in result.matches) == ["c1", "o1", "p1"]


@responses.activate
def test_metadata_gets_a_longer_read_timeout_than_searches() -> None:
    """HAPI FHIR's CapabilityStatement is 1.5 MB and slow to build: a short --timeout meant for
    searches does not cut it off."""
    responses.get(f"{BASE}/metadata", json=capability())
    responses.get(f"{BASE}/Patient", json={"resourceType": "Bundle", "type": "searchset"})
    fast = FhirClient(ClientConfig(BASE, read_timeout=2.0, connect_timeout=1.0))
    fast.capabilities()
    fast.search("Patient", {"_id": "x"})
    assert responses.calls[0].request.req_kwargs["timeout"] == (1.0, 60.0)
    assert responses.calls[1].request.req_kwargs["timeout"] == (1.0, 2.0)
