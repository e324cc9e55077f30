"""match over Bulk Data $export against a real server: same results as the REST path."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from fhirdata import coding, put_all

from fhirmatch.bulk import export_patient_data
from fhirmatch.client import ClientConfig, FhirClient
from fhirmatch.match import MatchOptions, run_match
from fhirmatch.records import load_patient_records
from fhirmatch.trials import load_trials

REPO = Path(__file__).resolve().parents[2]
#: check the export's status at least this often: HAPI FHIR asks for 120 s whatever the job
POLL = 2.0


def _patient(pid: str, rectal: bool) -> list[dict[str, Any]]:
    subject = {"reference": f"Patient/{pid}"}
    icd, sct = ("C20", "363351006") if rectal else ("C15.9", "363402007")
    return [
        {"resourceType": "Patient", "id": pid, "birthDate": "1960-05-06", "gender": "female"},
        {
            "resourceType": "Condition",
            "id": f"{pid}-dx",
            "clinicalStatus": coding(
                "http://terminology.hl7.org/CodeSystem/condition-clinical", "active"
            ),
            "code": {
                "coding": [
                    {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": icd},
                    {"system": "http://snomed.info/sct", "code": sct},
                ]
            },
            "subject": subject,
            "onsetDateTime": "2025-03-01",
        },
        {
            "resourceType": "Observation",
            "id": f"{pid}-ecog",
            "status": "final",
            "code": coding("http://loinc.org", "89247-1"),
            "subject": subject,
            "effectiveDateTime": "2026-10-20",
            "valueInteger": 1,
        },
        {  # not asked for by any criterion, but of a type that is: exported
            "resourceType": "Observation",
            "id": f"{pid}-hr",
            "status": "final",
            "code": coding("http://loinc.org", "8867-4"),
            "subject": subject,
            "effectiveDateTime": "2026-10-20",
            "valueQuantity": {"value": 70, "unit": "/min"},
        },
    ]


@pytest.fixture()
def group(fhir_base_url: str) -> tuple[str, list[str]]:
    tag = uuid.uuid4().hex[:10]
    ids = [f"bulk-{tag}-{i}" for i in range(3)]
    resources = [r for i, pid in enumerate(ids) for r in _patient(pid, rectal=i != 1)]
    gid = f"bulk-{tag}"
    resources.append(
        {
            "resourceType": "Group",
            "id": gid,
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p}"}} for p in ids],
        }
    )
    put_all(fhir_base_url, resources)
    return gid, ids


def test_bulk_match_equals_rest_match(fhir_base_url: str, group: tuple[str, list[str]]) -> None:
    gid, ids = group
    trials = load_trials([REPO / "fixtures" / "trials"])
    client = FhirClient(ClientConfig(fhir_base_url, allow_insecure_http=True))
    common = {"dry_run": True, "publish": False, "bulk_poll_max": POLL}
    bulk = run_match(client, trials, MatchOptions(bulk=True, bulk_group=gid, **common))
    rest = run_match(client, trials, MatchOptions(patients=ids, **common))

    def key(outcome: Any) -> list[dict[str, Any]]:
        return sorted(
            (r.model_dump(mode="json") for r in outcome.results),
            key=lambda d: (d["patient"], d["study"]),
        )

    assert {r.patient for r in bulk.results} == {f"Patient/{p}" for p in ids}
    assert key(bulk) == key(rest)
    assert bulk.skipped == {} and len(bulk.planned) == len(rest.planned)
    assert [(p.study, p.patient, p.action) for p in bulk.planned] == [
        (p.study, p.patient, p.action) for p in rest.planned
    ]


def test_export_downloads_only_needed_types(
    fhir_base_url: str, group: tuple[str, list[str]], tmp_path: Path
) -> None:
    gid, ids = group
    trials = load_trials([REPO / "fixtures" / "trials"])
    client = FhirClient(ClientConfig(fhir_base_url, allow_insecure_http=True))
    reqs = [i for t in trials for i in t.all_inputs()]
    paths = export_patient_data(client, reqs, group=gid, workdir=tmp_path / "x", poll_max=POLL)
    records = {r.patient_id: r for r in load_patient_records(paths)}
    assert sorted(records) == sorted(ids)
    got = sorted(r["id"] for r in records[ids[0]].resources)
    # whole types by default (no _typeFilter), but only the types the criteria use: no Group
    assert got == sorted([ids[0], f"{ids[0]}-dx", f"{ids[0]}-ecog", f"{ids[0]}-hr"])
    assert not any(p.name.endswith("Group.ndjson") for p in paths)


@pytest.mark.parametrize("executor", ["processes", "dask"])
def test_parallel_bulk_run_writes_what_a_local_run_would(
    fhir_base_url: str,
    group: tuple[str, list[str]],
    executor: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The workers group the export themselves (tiny partitions force the spill path); the
    write-back they feed is the local executor's: a local run afterwards changes nothing."""
    if executor == "dask":
        pytest.importorskip("distributed")
    from fhirmatch.executors import make_executor

    gid, _ids = group
    trials = load_trials([REPO / "fixtures" / "trials"])
    client = FhirClient(ClientConfig(fhir_base_url, allow_insecure_http=True))
    spill = tmp_path / "spill"
    spill.mkdir()
    options = MatchOptions(
        bulk=True,
        bulk_group=gid,
        publish=True,
        partition_bytes=300,
        spill_dir=str(spill),
        bulk_poll_max=POLL,
    )
    dry = MatchOptions(bulk=True, bulk_group=gid, dry_run=True, bulk_poll_max=POLL)
    local_dry = run_match(client, trials, dry)
    with make_executor(executor, trials, workers=2) as ex:
        with caplog.at_level(logging.INFO, logger="fhirmatch.stream"):
            parallel = run_match(client, trials, options, executor=ex)
    assert any("partitions" in r.getMessage() for r in caplog.records)  # spilled, not shipped
    assert list(spill.iterdir()) == []

    def key(outcome: Any) -> list[dict[str, Any]]:  # partitioning changes the patient order
        return sorted(
            (r.model_dump(mode="json") for r in outcome.results),
            key=lambda d: (d["patient"], d["study"]),
        )

    assert key(parallel) == key(local_dry)
    written = sorted((p.study, p.patient, p.action) for p in parallel.planned)
    assert written == sorted((p.study, p.patient, p.action) for p in local_dry.planned)
    assert {a for _s, _p, a in written} >= {"create"}
    again = run_match(client, trials, dry)
    actions = [p.action for p in again.planned]
    assert "unchanged" in actions and not {"create", "update"} & set(actions)
    assert key(again) == key(parallel)
