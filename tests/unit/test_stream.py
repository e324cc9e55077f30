"""Bounded-memory grouping of NDJSON by patient through hash-partitioned spill files."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.records import iter_patient_records
from fhirmatch.stream import group_ndjson_by_patient, partition_count, partition_of


def _obs(rid: str, pid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "subject": {"reference": f"Patient/{pid}"}}


def _write_split_export(folder: Path, n_patients: int, seed: int = 3) -> dict[str, list[str]]:
    """Write a by-type export (shuffled lines); return the expected ids per patient."""
    rng = random.Random(seed)
    expected: dict[str, list[str]] = {}
    patients, observations, requests = [], [], []
    for n in range(n_patients):
        pid = f"p{n}"
        patients.append({"resourceType": "Patient", "id": pid})
        expected[pid] = [pid]
        for k in range(rng.randint(0, 4)):
            observations.append(_obs(f"o{n}-{k}", pid))
            expected[pid].append(f"o{n}-{k}")
        if n % 3 == 0:
            requests.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": f"r{n}",
                    "subject": {"reference": f"Patient/{pid}"},
                    "medicationReference": {"reference": "Medication/m1"},
                }
            )
            expected[pid] += [f"r{n}", "m1"]
    rng.shuffle(observations)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Patient.ndjson").write_text(
        "".join(json.dumps(p) + "\n" for p in patients), encoding="utf-8"
    )
    with gzip.open(folder / "Observation.ndjson.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(o) + "\n" for o in observations)
    (folder / "MedicationRequest.ndjson").write_text(
        "".join(json.dumps(r) + "\n" for r in requests), encoding="utf-8"
    )
    (folder / "Medication.ndjson").write_text(
        json.dumps({"resourceType": "Medication", "id": "m1"}) + "\n", encoding="utf-8"
    )
    return {k: sorted(v) for k, v in expected.items()}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


@pytest.mark.parametrize("partitions", [1, 2, 7, 64])
def test_partitioned_grouping_equals_expected(tmp_path: Path, partitions: int) -> None:
    expected = _write_split_export(tmp_path / "export", 60)
    spill = tmp_path / "spill"
    spill.mkdir()
    problems: list[str] = []
    got = {
        r.patient_id: sorted(x["id"] for x in r.resources)
        for r in group_ndjson_by_patient(
            _files(tmp_path / "export"), problems, partitions=partitions, spill_dir=spill
        )
    }
    assert got == expected
    assert problems == []
    assert list(spill.iterdir()) == []  # the spill directory is removed at the end


def test_each_partition_holds_only_its_patients(tmp_path: Path) -> None:
    """Memory bound: a yielded batch (one partition) never mixes patients of two partitions."""
    _write_split_export(tmp_path / "export", 80)
    order = [
        partition_of(r.patient_id, 5)
        for r in group_ndjson_by_patient(_files(tmp_path / "export"), [], partitions=5)
    ]
    assert order == sorted(order)  # partitions are grouped one after the other
    assert len(set(order)) == 5


def test_abandoned_iteration_removes_spill_files(tmp_path: Path) -> None:
    _write_split_export(tmp_path / "export", 30)
    spill = tmp_path / "spill"
    spill.mkdir()
    it = group_ndjson_by_patient(_files(tmp_path / "export"), [], partitions=4, spill_dir=spill)
    next(it)
    assert len(list(spill.iterdir())) == 1
    it.close()
    assert list(spill.iterdir()) == []


def test_record_order_and_sources_follow_the_input(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "a.ndjson").write_text(
        json.dumps(_obs("o2", "p1")) + "\n" + json.dumps(_obs("o1", "p1")) + "\n", encoding="utf-8"
    )
    (folder / "b.ndjson").write_text(
        json.dumps({"resourceType": "Patient", "id": "p1"}) + "\n" + json.dumps(_obs("o3", "p2")),
        encoding="utf-8",
    )
    (rec1, rec2) = sorted(
        group_ndjson_by_patient(_files(folder), [], partitions=3), key=lambda r: r.patient_id
    )
    assert [r["id"] for r in rec1.resources] == ["o2", "o1", "p1"]
    assert rec1.source == f"{folder / 'a.ndjson'}, {folder / 'b.ndjson'}"
    assert rec2.problems == [f"{folder / 'b.ndjson'}: no Patient resource for Patient/p2"]


def test_bad_lines_reported_with_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    path.write_text(
        json.dumps(_obs("o1", "p1")) + "\n{oops\n" + json.dumps({"resourceType": "Observation"}),
        encoding="utf-8",
    )
    problems: list[str] = []
    recs = list(group_ndjson_by_patient([path], problems, partitions=2))
    assert [r.patient_id for r in recs] == ["p1"]
    assert problems == [
        f"{path}: line 2 is not valid JSON; line skipped",
        f"{path}: line 3 (Observation/?) has no patient reference",
    ]


def test_partition_count_from_size(tmp_path: Path) -> None:
    plain = tmp_path / "a.ndjson"
    plain.write_bytes(b"x" * 1000)
    packed = tmp_path / "b.ndjson.gz"
    packed.write_bytes(b"x" * 100)
    assert partition_count([plain], partition_bytes=1000) == 1
    assert partition_count([plain], partition_bytes=300) == 4
    assert partition_count([plain, packed], partition_bytes=300) == 6  # gzip counted x8
    with pytest.raises(ValueError):
        partition_count([plain], partition_bytes=0)


def test_iter_patient_records_uses_partitions_for_split_exports(tmp_path: Path) -> None:
    expected = _write_split_export(tmp_path / "export", 40)
    got = {
        r.patient_id: sorted(x["id"] for x in r.resources)
        for r in iter_patient_records([tmp_path / "export"], partition_bytes=200)
    }
    assert got == expected
