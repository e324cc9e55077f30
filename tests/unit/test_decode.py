"""JSON decoding: msgspec with ``json.loads``'s results and exceptions, each patient line decoded
whole once while a Bulk export is grouped, and the collector frozen after start-up."""

from __future__ import annotations

import gc
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhirmatch import records
from fhirmatch.engine import Engine
from fhirmatch.executors import LocalExecutor, ProcessExecutor, freeze_heap
from fhirmatch.records import (
    LONE_SURROGATE,
    decode_head,
    decode_json,
    patient_reference_of,
    unicode_problem,
)
from fhirmatch.stream import group_ndjson_by_patient
from fhirmatch.trialcache import load_compiled

REPO = Path(__file__).resolve().parents[2]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4"

TRICKY = [
    b'{"resourceType": "Observation", "valueQuantity": {"value": 1.10}}',
    b'{"a": NaN, "b": Infinity}',  # not JSON, but json.loads accepts it
    b'{"t": "\\ud83d\\ude00"}',  # a surrogate pair: one character
    b'{"v": 123456789012345678901234567890}',
    b'{"subject": {"reference": "Patient/1"}, "subject": {"reference": "Patient/2"}}',
    b"[1, 2]",
    b'"text"',
    b'{"a": "\\u00e9\\n"}',
    '{"a": "M\u00fcller"}'.encode(),
]
BROKEN = [
    b'{"a": 1',
    b'{"a": 1} trailing',
    b'{"a": "\xff"}',  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # nested beyond any decoder's limit
    b"",
]


@pytest.mark.parametrize("data", TRICKY)
def test_decode_json_gives_what_json_loads_gives(data: bytes) -> None:
    expected = json.loads(data.decode("utf-8"))
    got = decode_json(data)
    assert json.dumps(got) == json.dumps(expected)  # NaN != NaN: compare the text
    assert type(got) is type(expected)


@pytest.mark.parametrize("data", [b'{"t": "\\ud800"}', b'{"\\udc80": 1}', b'[["x\\udfff"]]'])
def test_a_lone_surrogate_is_refused_as_text_that_is_not_unicode(data: bytes) -> None:
    """json.loads accepts ``"\\ud800"``, but no result or record could be written with it."""
    with pytest.raises(UnicodeDecodeError) as caught:
        decode_json(data)
    assert unicode_problem(caught.value) == "holds " + LONE_SURROGATE
    assert unicode_problem(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x")) == "is not UTF-8"


@pytest.mark.parametrize("data", BROKEN)
def test_decode_json_raises_what_json_loads_raises(data: bytes) -> None:
    def kind(fn: Any) -> type[BaseException]:
        try:
            fn()
        except Exception as exc:  # RecursionError, UnicodeDecodeError, JSONDecodeError
            return type(exc)
        raise AssertionError("no error")

    assert kind(lambda: decode_json(data)) is kind(lambda: json.loads(data.decode("utf-8")))


def _synthea_lines(limit: int = 4000) -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(SYNTHEA.glob("*.json*"))[:5]:
        for rec in records.iter_patient_records([path]):
            out.extend(json.dumps(r).encode() for r in rec.resources)
        if len(out) >= limit:
            break
    return out


@pytest.mark.parametrize(
    "line",
    [
        b'{"resourceType": "Observation", "id": "o", "subject": null}',
        b'{"resourceType": "Consent", "patient": [{"reference": "Patient/9"}]}',
        b'{"resourceType": "Coverage", "beneficiary": {"reference": "http://x/fhir/Patient/7"}}',
        b'{"resourceType": "Observation", "subject": {"reference": "Group/1"},'
        b' "patient": {"reference": "Patient/3"}}',
        b'{"resourceType": "Patient", "id": "p1", "name": [{"family": "X"}]}',
        b'{"resourceType": "Observation", "subject": {"reference": "Patient/1"},'
        b' "subject": {"reference": "Patient/2"}}',
    ],
)
def test_the_head_of_a_line_names_the_patient_the_whole_resource_does(line: bytes) -> None:
    full = decode_json(line)
    head = decode_head(line)
    assert patient_reference_of(head) == patient_reference_of(full)
    assert head["resourceType"] == full["resourceType"] and head.get("id") == full.get("id")


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="needs ../shared/data")
def test_head_and_whole_agree_on_every_synthea_resource() -> None:
    for line in _synthea_lines():
        assert patient_reference_of(decode_head(line)) == patient_reference_of(decode_json(line))


def _export(folder: Path, n_patients: int) -> int:
    """A by-type export; returns how many lines belong to a patient."""
    folder.mkdir()
    pats, obs, meds = [], [], []
    for n in range(n_patients):
        pats.append({"resourceType": "Patient", "id": f"p{n}"})
        for k in range(3):
            obs.append(
                {
                    "resourceType": "Observation",
                    "id": f"o{n}-{k}",
                    "status": "final",
                    "subject": {"reference": f"Patient/p{n}"},
                    "code": {"text": "x" * 50},
                }
            )
        meds.append(
            {
                "resourceType": "MedicationRequest",
                "id": f"r{n}",
                "subject": {"reference": f"Patient/p{n}"},
                "medicationReference": {"reference": "Medication/m1"},
            }
        )
    medication = {"resourceType": "Medication", "id": "m1"}
    for name, rows in (("Patient", pats), ("Observation", obs), ("Medication", [medication])):
        (folder / f"{name}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "MedicationRequest.ndjson").write_text("".join(json.dumps(r) + "\n" for r in meds))
    return len(pats) + len(obs) + len(meds)


def test_a_grouped_export_decodes_each_line_whole_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_lines = _export(tmp_path / "export", 40)
    calls: list[bytes] = []
    real = records._DECODE

    def counting(data: bytes) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(records, "_DECODE", counting)
    problems: list[str] = []
    recs = list(
        group_ndjson_by_patient(sorted((tmp_path / "export").iterdir()), problems, partitions=4)
    )
    assert problems == [] and len(recs) == 40
    assert sum(len(r.resources) for r in recs) == n_lines + 40  # + the shared Medication each
    assert len(calls) == n_lines + 1  # every patient line once, the Medication once
    assert len(set(calls)) == len(calls)


@pytest.mark.parametrize(
    ("executor", "bad", "why"),
    [
        ("local", b'"\xff\xfexxx', "is not UTF-8"),
        ("processes", b'"\xff\xfexxx', "is not UTF-8"),
        ("local", b'"\\udc80xxx', "holds " + LONE_SURROGATE),
    ],
)
def test_a_line_only_the_whole_decode_refuses_is_reported_once_with_its_line(
    tmp_path: Path, executor: str, bad: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Text that is not UTF-8 (or a lone surrogate escape) inside an element the first pass
    skips is found when the line is decoded whole: reported with its file and line number, the
    rest of the patient kept."""
    folder = tmp_path / "export"
    _export(folder, 6)
    path = folder / "Observation.ndjson"
    lines = path.read_bytes().splitlines()
    lines[4] = lines[4].replace(b'"xxxxx', bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    trials, terminology = load_compiled([REPO / "fixtures" / "trials"])
    ex = (
        LocalExecutor(Engine(trials, terminology))
        if executor == "local"
        else ProcessExecutor(trials, terminology, workers=1)
    )
    problems: list[str] = []
    with ex:
        done = list(
            ex.evaluate_files(
                [folder],
                as_of=date(2026, 11, 1),
                problems=problems,
                partition_bytes=200,
            )
        )
    assert len(done) == 6
    assert problems == [f"{path}: line 5 {why}; line skipped"]
    assert [r.getMessage() for r in caplog.records].count(problems[0]) == 1


def test_workers_and_the_cli_freeze_the_start_up_heap() -> None:
    trials, terminology = load_compiled([REPO / "fixtures" / "trials"])
    with ProcessExecutor(trials, terminology, workers=1) as ex:
        frozen = ex.pool.submit(gc.get_freeze_count).result()
        threshold = ex.pool.submit(gc.get_threshold).result()
    assert frozen > 10_000  # modules and compiled trials
    assert threshold[0] >= 50_000
    saved = gc.get_threshold()
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_worker_processes_reuse_remembered_unit_conversions(tmp_path: Path) -> None:
    """After a run that converted the demo patients' units, a worker process evaluates them
    without importing pint (in a fresh process: workers fork from a server that keeps the
    environment it started with)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FHIRMATCH_CACHE_DIR": str(tmp_path / "cache")}
    patients = REPO / "fixtures" / "patients"
    script = f"""
from datetime import date
from fhirmatch.cli import main
from fhirmatch.executors import ProcessExecutor
from fhirmatch.trialcache import load_compiled
args = ["evaluate", "--patients", {str(patients)!r}, "--as-of", "2026-11-01"]
assert main([*args, "--format", "ndjson", "--output", {str(tmp_path / "out.ndjson")!r}]) == 0
trials, terminology = load_compiled([{str(REPO / "fixtures" / "trials")!r}])
with ProcessExecutor(trials, terminology, workers=1) as ex:
    done = list(ex.evaluate_files([{str(patients)!r}], as_of=date(2026, 11, 1)))
    imported = ex.pool.submit(eval, "'pint' in __import__('sys').modules").result()
print(len(done), imported)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.split() == ["21", "False"]
    assert list((tmp_path / "cache").glob("units-*.pickle"))
