"""publish_trials writes what is referred to before what refers to it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
import responses

from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.match import publish_trials
from fhirmatch.trials import load_trials

BASE = "https://fhir.example.org/r4"
REPO = Path(__file__).resolve().parents[2]


@responses.activate
def test_plan_definition_is_published_before_the_study_that_cites_it() -> None:
    """A server enforcing referential integrity (HAPI FHIR) refuses a ResearchStudy whose
    protocol PlanDefinition it does not hold yet."""
    written: list[str] = []

    def empty(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "searchset"})

    def put(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body or b"{}")
        written.append(body["resourceType"])
        return 201, {}, json.dumps(body)

    responses.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/\w+\?.*"), empty)
    # nothing held: PUT [type]/[id], so the trial keeps its ids on every server
    responses.add_callback(responses.PUT, re.compile(rf"{re.escape(BASE)}/\w+/[\w-]+$"), put)
    trials = [t for t in load_trials([REPO / "fixtures" / "trials"]) if t.id == "NCT06767007"]
    with FhirClient(ClientConfig(BASE, max_attempts=1)) as client:
        refs = publish_trials(client, trials)
    assert refs == {"ResearchStudy/NCT06767007": "PlanDefinition/NCT06767007-eligibility"}
    assert "ResearchStudy" in written and "PlanDefinition" in written
    assert written.index("PlanDefinition") < written.index("ResearchStudy")
    assert written[-1] == "ResearchStudy"
    assert all("?" not in c.request.url for c in responses.calls if c.request.method == "PUT")
