"""run_match against an R5 server (simulated with ``responses``): the subject's R5 shape."""

from __future__ import annotations

import json
import re
from datetime import date
from typing import Any

import requests
import responses

from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.match import MatchOptions, run_match
from fhirmatch.model import Criterion, DataInput, Trial

BASE = "http://127.0.0.1:9/fhir"


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def _trial() -> Trial:
    age = Criterion(id="inc-age", kind="inclusion", text="Age ≥ 18", expression="%age >= 18")
    ecog = Criterion(
        id="inc-ecog",
        kind="inclusion",
        text="ECOG ≤ 1",
        expression="%ecog.valueQuantity.value <= 1",
        inputs=(
            DataInput(
                name="ecog",
                resource_type="Observation",
                codes=frozenset({("http://loinc.org", "89247-1")}),
                select="latest",
                unit="{score}",
                lookback_days=90,
            ),
        ),
    )
    return Trial(
        id="S",
        title="Study S",
        identifiers=(),
        criteria=(age, ecog),
        plan_definition_id="S-eligibility",
    )


@responses.activate
def test_r5_server_gets_active_subject_with_progress_state() -> None:
    posted: list[dict[str, Any]] = []
    capability = {"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0", "rest": []}
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}
    ecog = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-10-20",
        "code": {"coding": [{"system": "http://loinc.org", "code": "89247-1"}]},
        "valueInteger": 1,
    }

    def search(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        path = request.path_url.split("?")[0].rstrip("/").split("/")[-1]
        if path == "Patient" and "_summary=count" in request.path_url:
            return 200, {"Date": "Sun, 01 Nov 2026 10:00:00 GMT"}, json.dumps(_bundle([]))
        if path == "metadata":
            return 200, {"Date": "Sun, 01 Nov 2026 10:00:00 GMT"}, json.dumps(capability)
        body = {"Patient": [patient], "Observation": [ecog]}.get(path, [])
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(_bundle(body))

    def transaction(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        bundle = json.loads(request.body or b"{}")
        posted.append(bundle)
        entries = [{"response": {"status": "201 Created"}} for _ in bundle["entry"]]
        return (
            200,
            {},
            json.dumps(
                {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
            ),
        )

    responses.add_callback(
        responses.GET, re.compile(rf"{re.escape(BASE)}/\w+(\?.*)?$"), callback=search
    )
    responses.add_callback(responses.POST, BASE, callback=transaction)

    with FhirClient(ClientConfig(base_url=BASE, max_attempts=1)) as client:
        outcome = run_match(
            client,
            [_trial()],
            MatchOptions(as_of=date(2026, 11, 1), patients=["p1"], publish=False),
        )
    assert [r.status for r in outcome.results] == ["eligible"]
    assert len(posted) == 1
    subject = next(
        e["resource"]
        for e in posted[0]["entry"]
        if e["resource"]["resourceType"] == "ResearchSubject"
    )
    assert subject["status"] == "active"
    assert subject["subject"] == {"reference": "Patient/p1"}
    assert subject["progress"][0]["subjectState"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/research-subject-state",
        "code": "candidate",
    }
    assert "individual" not in subject
    # the Device and Provenance of the same transaction in R5 shape too
    by_type = {e["resource"]["resourceType"]: e["resource"] for e in posted[0]["entry"]}
    device, prov = by_type["Device"], by_type["Provenance"]
    assert device["name"] == [{"value": "fhirmatch", "type": "user-friendly-name"}]
    assert isinstance(device["type"], list) and "deviceName" not in device
    assert prov["authorization"][0]["concept"]["text"] and "reason" not in prov
    assert outcome.started == "2026-11-01T09:59:58.000Z"  # server clock less the margin
