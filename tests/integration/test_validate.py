"""Everything fhirmatch writes passes HAPI FHIR's validator (``$validate``) without an error.

Runs only against a HAPI FHIR server (``scripts/test-hapi.sh``): the resources are the ones
fhirmatch itself builds and writes — the trials' ResearchStudy, PlanDefinition and ValueSets as
``publish`` sends them, the ResearchSubjects, Provenances and Device a screening wrote to the server
(read back as stored), and the Subscription ``listen`` registers. A deliberately broken resource
checks that the validator really reports errors.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.listen import NOTIFY_PATH, subscription_resource, watches_for
from fhirmatch.match import (
    MatchOptions,
    MatchOutcome,
    fetch_requirements,
    publish_trials,
    screen_patients,
)
from fhirmatch.model import Trial
from fhirmatch.terminology import Terminology
from fhirmatch.trials import load_trials
from fhirmatch.writeback import (
    SUBJECT_IDENTIFIER_SYSTEM,
    device_resource,
    plan_subject,
    provenance_resource,
    subject_identifier,
)

REPO = Path(__file__).resolve().parents[2]
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
AS_OF = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def hapi_base(fhir_base_url: str) -> str:
    meta = requests.get(f"{fhir_base_url}/metadata", headers=JSON, timeout=60).json()
    software = str((meta.get("software") or {}).get("name", ""))
    if "HAPI" not in software.upper():
        pytest.skip(f"$validate checks use HAPI FHIR's validator; this server is {software!r}")
    return fhir_base_url


@pytest.fixture(scope="module")
def trials() -> list[Trial]:
    return load_trials([REPO / "fixtures" / "trials"])


def validation_errors(base: str, resource: dict[str, Any]) -> list[str]:
    """POST ``resource`` to ``[type]/$validate``; the error and fatal issues, as text."""
    resp = requests.post(
        f"{base}/{resource['resourceType']}/$validate", json=resource, headers=JSON, timeout=120
    )
    # HAPI answers 200 when the resource is valid and 412 when it has errors, with the
    # OperationOutcome either way
    assert resp.status_code in (200, 412), resp.text[:500]
    outcome = resp.json()
    assert outcome.get("resourceType") == "OperationOutcome", resp.text[:500]
    return [
        f"{i.get('severity')}: {i.get('diagnostics')} at {i.get('location') or i.get('expression')}"
        for i in outcome.get("issue", [])
        if i.get("severity") in ("error", "fatal")
    ]


def test_the_validator_reports_errors(hapi_base: str) -> None:
    """The control: a ResearchSubject without its required study and individual."""
    broken = {"resourceType": "ResearchSubject", "status": "candidate"}
    errors = validation_errors(hapi_base, broken)
    assert any("ResearchSubject.study" in e for e in errors), errors
    assert any("ResearchSubject.individual" in e for e in errors), errors


def test_trial_definitions_validate(hapi_base: str, trials: list[Trial]) -> None:
    """ResearchStudy, PlanDefinition and ValueSet of every shipped trial, as ``publish`` writes
    them (the same dicts :func:`fhirmatch.match.publish_trials` sends)."""
    seen: set[str] = set()
    failures: dict[str, list[str]] = {}
    for trial in trials:
        for res in trial.resources:
            seen.add(res["resourceType"])
            errors = validation_errors(hapi_base, res)
            if errors:
                failures[f"{res['resourceType']}/{res.get('id')}"] = errors
    assert {"ResearchStudy", "PlanDefinition"} <= seen
    assert failures == {}


def test_valuesets_validate(hapi_base: str) -> None:
    """The ValueSets under ``mappings/valuesets`` that trials reference and publish sends."""
    files = sorted((REPO / "mappings" / "valuesets").glob("*.json"))
    assert files
    failures = {}
    for path in files:
        res = json.loads(path.read_text(encoding="utf-8"))
        if res.get("resourceType") != "ValueSet":
            continue
        errors = validation_errors(hapi_base, res)
        if errors:
            failures[path.name] = errors
    assert failures == {}


@pytest.fixture(scope="module")
def screened(hapi_base: str, trials: list[Trial]) -> Iterator[tuple[FhirClient, str, MatchOutcome]]:
    """A copy of two demo patients under fresh ids, screened with write-back."""
    with FhirClient(ClientConfig(base_url=hapi_base, read_timeout=60)) as client:
        pids = []
        for name in ("demo-rectal-eligible", "demo-escc-eligible"):
            pid = f"val-{uuid.uuid4().hex[:10]}"
            text = (REPO / "fixtures" / "patients" / f"{name}.json").read_text(encoding="utf-8")
            bundle = json.loads(text.replace(name, pid))
            resp = requests.post(hapi_base, json=bundle, headers=JSON, timeout=120)
            assert resp.status_code == 200, resp.text[:300]
            pids.append(pid)
        publish_trials(client, trials)  # HAPI refuses references to absent resources
        outcome = screen_patients(client, trials, pids, MatchOptions(as_of=AS_OF))
        assert outcome.skipped == {}
        assert any(p.action == "create" for p in outcome.planned)
        yield client, ",".join(pids), outcome


def test_written_subjects_provenance_and_device_validate(
    hapi_base: str, screened: tuple[FhirClient, str, MatchOutcome], trials: list[Trial]
) -> None:
    client, pids, _outcome = screened
    failures: dict[str, list[str]] = {}
    subjects = []
    for pid in pids.split(","):
        for trial in trials:
            value = subject_identifier(trial.reference, f"Patient/{pid}")
            found = list(
                client.iter_resources(
                    "ResearchSubject", {"identifier": f"{SUBJECT_IDENTIFIER_SYSTEM}|{value}"}
                )
            )
            subjects.extend(found)
    assert subjects, "the screening wrote no ResearchSubject"
    provenances = []
    for subject in subjects:
        provenances += list(
            client.iter_resources("Provenance", {"target": f"ResearchSubject/{subject['id']}"})
        )
    assert len(provenances) >= len(subjects)
    devices = {
        agent["who"]["reference"]
        for prov in provenances
        for agent in prov.get("agent", [])
        if agent.get("who", {}).get("reference", "").startswith("Device/")
    }
    assert devices
    written = subjects + provenances + [client.read(*d.split("/")) for d in sorted(devices)]
    for res in written:
        errors = validation_errors(hapi_base, res)
        if errors:
            failures[f"{res['resourceType']}/{res['id']}"] = errors
    assert failures == {}


def test_listen_subscriptions_validate(hapi_base: str, trials: list[Trial]) -> None:
    """The rest-hook Subscription ``listen`` registers, one per watched resource type."""
    requirements = fetch_requirements(trials, Terminology.load())
    watches = watches_for(requirements)
    assert watches
    failures = {}
    for watch in watches:
        sub = subscription_resource(
            watch.criteria, f"http://127.0.0.1:8765{NOTIFY_PATH}", "0123456789abcdef"
        )
        errors = validation_errors(hapi_base, sub)
        if errors:
            failures[watch.criteria[:80]] = errors
    assert failures == {}


def test_r5_shapes_validate(hapi_base: str, screened: tuple[FhirClient, str, MatchOutcome]) -> None:
    """What write-back sends an R5 server (``status: active`` with ``progress[].subjectState``,
    and its Provenance and Device), at the test server's R5 validation endpoint."""
    _client, _pids, outcome = screened
    r5 = hapi_base.rsplit("/fhir", 1)[0] + "/fhir-r5"
    failures: dict[str, list[str]] = {}
    statuses = set()
    for result in outcome.results:
        plan = plan_subject(
            result, None, as_of=AS_OF, plan_definition="PlanDefinition/x", version="R5"
        )
        if plan.subject is None:
            continue
        statuses.add(plan.subject_status)
        subject = {**plan.subject, "id": "rs1"}
        prov = provenance_resource(
            plan, "ResearchSubject/rs1", "PlanDefinition/x", "Device/d1", version="R5"
        )
        for res in (subject, prov):
            errors = validation_errors(r5, res)
            if errors:
                failures[f"{res['resourceType']} ({plan.subject_status})"] = errors
    assert {"candidate", "potential-candidate"} <= statuses
    errors = validation_errors(r5, device_resource(version="R5"))
    if errors:
        failures["Device"] = errors
    assert failures == {}
