"""The local, process-pool and Dask executors give exactly the same results, in input order."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.engine import Engine
from fhirmatch.errors import ConfigurationError
from fhirmatch.executors import LocalExecutor, ProcessExecutor, make_executor
from fhirmatch.model import Trial
from fhirmatch.records import PatientRecord, load_patient_records
from fhirmatch.terminology import Terminology
from fhirmatch.trials import default_mappings_dir, load_trials

REPO = Path(__file__).resolve().parents[2]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4"
AS_OF = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def setup() -> tuple[list[Trial], Terminology, list[PatientRecord]]:
    if not SYNTHEA.exists():
        pytest.skip("shared Synthea data not available")
    terminology = Terminology.load([default_mappings_dir()])
    trials = load_trials([REPO / "fixtures" / "trials"], terminology=terminology)
    records = load_patient_records(sorted(SYNTHEA.glob("*.json.gz"))[:9])
    # a patient that fails the age criteria and one with only a Patient resource
    records.append(PatientRecord("minimal", [{"resourceType": "Patient", "id": "minimal"}]))
    return trials, terminology, records


def _run(executor: Any, records: list[PatientRecord]) -> list[tuple[str, list[dict[str, Any]]]]:
    with executor:
        return [
            (rec.patient_id, [r.model_dump(mode="json") for r in results])
            for rec, results in executor.evaluate(iter(records), as_of=AS_OF)
        ]


def test_process_pool_matches_local(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
) -> None:
    trials, terminology, records = setup
    local = _run(make_executor("local", trials, terminology), records)
    assert [pid for pid, _ in local] == [r.patient_id for r in records]
    assert {r["status"] for _, rs in local for r in rs} >= {"ineligible"}
    pool = ProcessExecutor(trials, terminology, workers=2, batch_size=2)
    assert _run(pool, records) == local


def test_dask_local_cluster_matches_local(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
) -> None:
    pytest.importorskip("dask")
    pytest.importorskip("distributed")
    from fhirmatch.executors import DaskExecutor

    trials, terminology, records = setup
    local = _run(LocalExecutor(Engine(trials, terminology)), records)
    dask_ex = DaskExecutor(trials, terminology, workers=2, processes=False, batch_size=3)
    assert dask_ex.window == 4  # two workers, two batches in flight each
    assert _run(dask_ex, records) == local


def test_window_bounds_batches_in_flight(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
) -> None:
    trials, terminology, records = setup
    pulled: list[str] = []

    def source() -> Iterator[PatientRecord]:
        for r in records:
            pulled.append(r.patient_id)
            yield r

    pool = ProcessExecutor(trials, terminology, workers=1, batch_size=2)
    with pool:
        it = pool.evaluate(source(), as_of=AS_OF)
        next(it)
        # window = 2 batches of 2: the first result is yielded after 4 records were read
        assert len(pulled) == 4


def test_unknown_executor_and_misplaced_scheduler() -> None:
    with pytest.raises(ConfigurationError, match="unknown executor"):
        make_executor("spark", [])
    with pytest.raises(ConfigurationError, match="only for --executor dask"):
        make_executor("local", [], scheduler="tcp://127.0.0.1:8786")


def test_dask_missing_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    with pytest.raises(ConfigurationError, match=r"fhirmatch\[dask\]"):
        make_executor("dask", [])


# --------------------------------------------------------------------------- evaluate_files


def _write_by_type(folder: Path, records: list[PatientRecord]) -> None:
    """A Bulk-style export of ``records``: one NDJSON file per resource type, plus a broken line
    and a resource without a patient (both must be reported, by file and line)."""
    import json

    folder.mkdir()
    by_type: dict[str, list[str]] = {}
    for rec in records:
        for res in rec.resources:
            if res["resourceType"] in ("Organization", "Practitioner", "Location"):
                continue
            line = json.dumps(res)
            if res["resourceType"] != "Patient":  # Synthea bundles use urn:uuid references
                line = json.dumps({**res, **_patient_ref(res, rec.patient_id)})
            by_type.setdefault(res["resourceType"], []).append(line)
    by_type["Observation"].insert(3, "{not json")
    typo = {"resourceType": "Observaton", "id": "typo", "subject": {"reference": "Patient/"}}
    typo["subject"]["reference"] += records[0].patient_id
    by_type["Observaton"] = [json.dumps(typo)]  # kept, then reported on the patient's record
    by_type["Observation"].append(json.dumps({"resourceType": "Observation", "id": "orphan"}))
    for rtype, lines in by_type.items():
        (folder / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _patient_ref(res: dict[str, Any], pid: str) -> dict[str, Any]:
    for name in ("subject", "patient", "beneficiary"):
        if name in res:
            return {name: {"reference": f"Patient/{pid}"}}
    return {}


def _run_files(executor: Any, folder: Path, **kwargs: Any) -> tuple[list[Any], list[str]]:
    problems: list[str] = []
    with executor:
        out = [
            (rec.patient_id, rec.problems, [r.model_dump(mode="json") for r in results])
            for rec, results in executor.evaluate_files(
                [folder], as_of=AS_OF, problems=problems, **kwargs
            )
        ]
    return out, problems


@pytest.fixture(scope="module")
def export(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]], tmp_path_factory: Any
) -> tuple[Path, list[Any], list[str]]:
    """The export, and what the local executor makes of the records grouped in this process."""
    from fhirmatch.records import iter_patient_records
    from fhirmatch.stream import wanted_types

    trials, terminology, records = setup
    folder = tmp_path_factory.mktemp("bulk") / "export"
    _write_by_type(folder, records[:-1])
    problems: list[str] = []
    local = LocalExecutor(Engine(trials, terminology))
    grouped = iter_patient_records(
        [folder], problems=problems, partition_bytes=20_000, types=wanted_types(trials)
    )
    expected = [
        (rec.patient_id, rec.problems, [r.model_dump(mode="json") for r in results])
        for rec, results in local.evaluate(grouped, as_of=AS_OF)
    ]
    assert len(expected) == len(records) - 1
    assert any(r[2] for r in expected)
    assert len(problems) == 2
    (typo_problem,) = (p for r in expected for p in r[1])
    assert typo_problem.endswith(": Observaton/typo has an unknown resourceType; skipped")
    return folder, expected, problems


GROUPING = {"partition_bytes": 20_000, "slice_bytes": 50_000}


def test_local_evaluate_files_equals_grouping_then_evaluating(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
    export: tuple[Path, list[Any], list[str]],
    tmp_path: Path,
) -> None:
    trials, terminology, _records = setup
    folder, expected, problems = export
    got, got_problems = _run_files(
        make_executor("local", trials, terminology), folder, spill_dir=tmp_path, **GROUPING
    )
    assert got == expected
    assert got_problems == problems
    assert problems[0].endswith("Observation.ndjson: line 4 is not valid JSON; line skipped")
    assert list(tmp_path.iterdir()) == []  # spill files removed


def test_process_workers_group_the_export_themselves(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
    export: tuple[Path, list[Any], list[str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trials, terminology, _records = setup
    folder, expected, problems = export
    pool = ProcessExecutor(trials, terminology, workers=2)
    with caplog.at_level(logging.WARNING, logger="fhirmatch"):
        got, got_problems = _run_files(pool, folder, spill_dir=tmp_path, **GROUPING)
    assert got == expected
    assert got_problems == problems
    assert list(tmp_path.iterdir()) == []
    # the workers do not log; their records' problems are logged here, with the others
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [*problems, *(p for r in expected for p in r[1])]


def test_workers_send_back_slim_records(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
    export: tuple[Path, list[Any], list[str]],
) -> None:
    trials, terminology, _records = setup
    folder, _expected, _problems = export
    with ProcessExecutor(trials, terminology, workers=2) as pool:
        records = [rec for rec, _ in pool.evaluate_files([folder], as_of=AS_OF, **GROUPING)]
    assert {len(r.resources) for r in records} == {1}
    assert all(r.patient is not None and r.patient["id"] == r.patient_id for r in records)


def test_dask_workers_group_the_export_themselves(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
    export: tuple[Path, list[Any], list[str]],
    tmp_path: Path,
) -> None:
    pytest.importorskip("distributed")
    from fhirmatch.executors import DaskExecutor

    trials, terminology, _records = setup
    folder, expected, problems = export
    dask_ex = DaskExecutor(trials, terminology, workers=2, processes=False)
    assert dask_ex.shared_files
    got, got_problems = _run_files(dask_ex, folder, spill_dir=tmp_path, **GROUPING)
    assert got == expected
    assert got_problems == problems


def test_remote_dask_without_shared_spill_dir_ships_records(
    setup: tuple[list[Trial], Terminology, list[PatientRecord]],
    export: tuple[Path, list[Any], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("distributed")
    from fhirmatch import executors
    from fhirmatch.executors import DaskExecutor

    trials, terminology, _records = setup
    folder, expected, problems = export
    dask_ex = DaskExecutor(trials, terminology, workers=2, processes=False)
    dask_ex.shared_files = False  # as with --scheduler: workers may not see our files

    def no_map(*_args: Any) -> Any:
        raise AssertionError("the workers were asked to read files they may not see")

    monkeypatch.setattr(dask_ex, "_map_slices", no_map)
    monkeypatch.setattr(executors, "_dask_partition", no_map)
    got, got_problems = _run_files(dask_ex, folder, **GROUPING)
    # the records were grouped here and shipped whole: full records come back
    assert got == expected
    assert got_problems == problems
