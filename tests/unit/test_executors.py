"""The local, process-pool and Dask executors give exactly the same results, in input order."""

from __future__ import annotations

import datetime as dt
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
