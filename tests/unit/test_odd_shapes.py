"""Elements of an unexpected JSON type never stop a run.

Each demo patient is copied many times. In every copy, a few resources have one element, at any
depth, replaced by a value of another JSON type: null, a number, a string, a list, an object or
a boolean, where FHIR expects something else. The copies are written as a Bulk Data export split
by resource type. They are read the way ``fhirmatch evaluate`` reads one: partial decode, spill
files and grouping. Each copy is then evaluated against the seed trials.

Reading must report problems and go on, and the engine must give a result for every trial and
patient, with no exception. The suite also runs this against the compiled build
(``scripts/test-compiled.sh``), where a value of the wrong type reaching a typed variable raises
``TypeError`` instead of flowing on as it does in Python.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.engine import Engine
from fhirmatch.records import iter_patient_records
from fhirmatch.stream import wanted_types
from fhirmatch.terminology import Terminology
from fhirmatch.trials import default_mappings_dir, load_trials

REPO = Path(__file__).resolve().parents[2]
AS_OF = dt.date(2026, 11, 1)
#: values of every JSON type, and strings FHIR would refuse where it expects a date or a code
ODD: list[Any] = [None, 0, -1, 1.5, 1e308, "", "x", "2026-13-45", [], [1], [None], {}]
ODD += [{"a": 1}, True, False, [{"coding": "x"}], {"coding": [None]}, {"reference": 7}]
COPIES = 12
MUTATED_PER_COPY = 4


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) inside ``node``, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((node, key))
            _slots(value, out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((node, i))
            _slots(value, out)
    return out


def _copies(bundle: dict[str, Any], rng: random.Random) -> list[list[dict[str, Any]]]:
    """``COPIES`` copies of a demo patient's resources, each a patient of its own, with a few
    elements replaced by odd values (the Patient resource included)."""
    resources = [e["resource"] for e in bundle["entry"]]
    (patient,) = [r for r in resources if r["resourceType"] == "Patient"]
    out = []
    for n in range(COPIES):
        pid = f"{patient['id']}-c{n}"
        text = json.dumps(resources).replace(f'"Patient/{patient["id"]}"', f'"Patient/{pid}"')
        copied = json.loads(text)
        for res in copied:
            if res["resourceType"] == "Patient":
                res["id"] = pid
        for res in rng.sample(copied, min(MUTATED_PER_COPY, len(copied))):
            slots = [s for s in _slots(res, []) if s[1] not in ("resourceType",)]
            container, key = rng.choice(slots)
            container[key] = copy.deepcopy(rng.choice(ODD))
        out.append(copied)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """(export folder, number of patients in it)."""
    rng = random.Random(20261101)
    by_type: dict[str, list[str]] = defaultdict(list)
    patients = 0
    for path in sorted((REPO / "fixtures" / "patients").glob("demo-*.json")):
        for resources in _copies(json.loads(path.read_text(encoding="utf-8")), rng):
            patients += 1
            for res in resources:
                rtype = res["resourceType"] if isinstance(res["resourceType"], str) else "Other"
                by_type[rtype].append(json.dumps(res))
    folder = tmp_path_factory.mktemp("odd-export")
    for rtype, lines in by_type.items():
        (folder / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, patients


def test_odd_shapes_are_read_and_evaluated_without_an_exception(
    export: tuple[Path, int],
) -> None:
    folder, patients = export
    trials = load_trials([REPO / "fixtures" / "trials"])
    engine = Engine(trials, Terminology.load([default_mappings_dir()]))
    problems: list[str] = []
    # small partitions, so that several spill files are written and grouped
    records = iter_patient_records(
        [folder], problems=problems, partition_bytes=200_000, types=wanted_types(trials)
    )
    seen = 0
    outcomes: set[str] = set()
    for record in records:
        results = engine.evaluate_patient_record(record, as_of=AS_OF)
        assert len(results) == len(trials)
        for result in results:
            outcomes.update(str(c.outcome) for c in result.criteria)
        seen += 1
    # a copy whose Patient resource lost its id is read as resources without their patient
    assert patients * 0.9 <= seen <= patients
    assert outcomes <= {"pass", "fail", "unknown", "manual"}
    assert {"pass", "fail", "unknown", "manual"} <= outcomes
    assert problems, "odd elements are reported"
