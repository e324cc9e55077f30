"""Loading patient records from Bundles, NDJSON, directories and gzip; tolerance of bad data."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.records import iter_patient_records, load_patient_records, patient_reference_of

SYNTHEA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "synthea-r4"


def res(rtype: str, rid: str, ref: str | None = None, field: str = "subject") -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": rtype, "id": rid}
    if ref:
        r[field] = {"reference": ref}
    return r


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_patient_reference_forms() -> None:
    assert patient_reference_of(res("Observation", "o", "Patient/1")) == "1"
    assert patient_reference_of(res("Observation", "o", "http://x/fhir/Patient/1")) == "1"
    assert patient_reference_of(res("Observation", "o", "Patient/1/_history/3")) == "1"
    assert patient_reference_of(res("Claim", "c", "Patient/2", "patient")) == "2"
    assert patient_reference_of(res("Coverage", "c", "Patient/3", "beneficiary")) == "3"
    assert patient_reference_of(res("Observation", "o", "Group/1")) is None
    urls = {"urn:uuid:abc": "p9"}
    assert patient_reference_of(res("Observation", "o", "urn:uuid:abc"), urls) == "p9"


def test_transaction_bundle_with_urn_uuid_references(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:u1", "resource": res("Patient", "u1-id")},
            {"fullUrl": "urn:uuid:o1", "resource": res("Observation", "o1", "urn:uuid:u1")},
            {"fullUrl": "urn:uuid:m1", "resource": res("Medication", "m1")},
            {"resource": res("Condition", "c1", "Patient/u1-id")},
        ],
    }
    (rec,) = load_patient_records([write_json(tmp_path / "b.json", bundle)])
    assert rec.patient_id == "u1-id"
    assert [r["id"] for r in rec.resources] == ["u1-id", "o1", "c1", "m1"]
    assert rec.patient is not None and rec.problems == []


def test_searchset_with_two_patients_and_orphan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": res("Patient", "a")},
            {"resource": res("Patient", "b")},
            {"resource": res("Observation", "oa", "Patient/a")},
            {"resource": res("Observation", "ob", "Patient/b")},
            {"resource": res("Observation", "orphan")},
        ],
    }
    problems: list[str] = []
    with caplog.at_level(logging.WARNING):
        recs = load_patient_records([write_json(tmp_path / "s.json", bundle)], problems=problems)
    assert {r.patient_id: [x["id"] for x in r.resources] for r in recs} == {
        "a": ["a", "oa"],
        "b": ["b", "ob"],
    }
    assert len(problems) == 1 and "Observation/orphan has no patient reference" in problems[0]
    assert "Observation/orphan" in caplog.text


def test_bad_files_are_reported_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "latin1.json").write_bytes(b'{"resourceType": "Patient", "id": "\xe9"}')
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    write_json(tmp_path / "good.json", res("Patient", "ok"))
    problems: list[str] = []
    recs = load_patient_records([tmp_path, tmp_path / "missing.json"], problems=problems)
    assert [r.patient_id for r in recs] == ["ok"]
    text = "\n".join(problems)
    assert "bad.json: not valid JSON" in text
    assert "latin1.json: not UTF-8" in text
    assert "list.json: not a FHIR resource" in text
    assert "missing.json: no such file" in text


def test_ndjson_bad_line_reported_with_number(tmp_path: Path) -> None:
    lines = [
        json.dumps(res("Patient", "p1")),
        json.dumps(res("Observation", "o1", "Patient/p1")),
        '{"resourceType": "Observation", "id": "trunc',
        json.dumps(res("Observation", "o2", "Patient/p1")),
    ]
    path = tmp_path / "all.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems: list[str] = []
    (rec,) = load_patient_records([path], problems=problems)
    assert [r["id"] for r in rec.resources] == ["p1", "o1", "o2"]
    assert problems == [f"{path}: line 3 is not valid JSON; line skipped"]


def test_ndjson_split_by_type_is_grouped_gzip_too(tmp_path: Path) -> None:
    pats = [res("Patient", "p1"), res("Patient", "p2")]
    obs = [
        res("Observation", "o1", "Patient/p1"),
        res("Observation", "o2", "Patient/p2"),
        res("Observation", "o3", "Patient/p1"),
    ]
    med = {"resourceType": "Medication", "id": "m1"}
    req = {
        **res("MedicationRequest", "r1", "Patient/p2"),
        "medicationReference": {"reference": "Medication/m1"},
    }
    (tmp_path / "Patient.ndjson").write_text(
        "\n".join(json.dumps(p) for p in pats), encoding="utf-8"
    )
    with gzip.open(tmp_path / "Observation.ndjson.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(o) for o in obs))
    (tmp_path / "Medication.ndjson").write_text(json.dumps(med), encoding="utf-8")
    (tmp_path / "MedicationRequest.ndjson").write_text(json.dumps(req), encoding="utf-8")
    recs = {
        r.patient_id: sorted(x["id"] for x in r.resources) for r in iter_patient_records([tmp_path])
    }
    assert recs == {"p1": ["o1", "o3", "p1"], "p2": ["m1", "o2", "p2", "r1"]}


def test_patient_ordered_ndjson_streams(tmp_path: Path) -> None:
    path = tmp_path / "ordered.ndjson"
    with path.open("w", encoding="utf-8") as fh:
        for n in range(3):
            fh.write(json.dumps(res("Patient", f"p{n}")) + "\n")
            fh.write(json.dumps(res("Observation", f"o{n}", f"Patient/p{n}")) + "\n")
    records = iter_patient_records([path])
    first = next(records)
    assert first.patient_id == "p0" and len(first.resources) == 2
    assert [r.patient_id for r in records] == ["p1", "p2"]


@pytest.mark.skipif(not SYNTHEA.exists(), reason="shared Synthea data not available")
def test_synthea_bundle_groups_everything_under_its_patient() -> None:
    path = sorted(SYNTHEA.glob("*.json.gz"))[0]
    problems: list[str] = []
    (rec,) = load_patient_records([path], problems=problems)
    assert problems == []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        n_entries = len(json.load(fh)["entry"])
    assert len(rec.resources) == n_entries
    assert rec.patient is not None and rec.patient["id"] == rec.patient_id
