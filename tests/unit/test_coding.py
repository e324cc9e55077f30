"""The coding corpus: ``tests/coding/*.yaml``, one clinical fact coded the way each EHR convention
codes it, every case run through the real engine. The format is in ``tests/coding/README.md``;
the known conventions are the keys of ``tests/coding/conventions.yaml``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from casefiles import ROOT, TRIALS_DIR, Case, check_case, engine_for, parse_case, read_yaml

from fhirmatch.records import iter_patient_records
from fhirmatch.stream import wanted_types

CODING_DIR = ROOT / "tests" / "coding"
CONVENTIONS_FILE = CODING_DIR / "conventions.yaml"
_FILE_KEYS = frozenset({"fact", "trial", "as_of", "base", "base_from", "cases"})


def conventions() -> dict[str, str]:
    """Convention label -> what it stands for."""
    doc = read_yaml(CONVENTIONS_FILE)
    return {str(k): str(v) for k, v in doc.items()}


def corpus_files(directory: Path = CODING_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != CONVENTIONS_FILE.name)


def _base(doc: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], Any]:
    """The base patient and as-of date (``base_from`` names a case file to take them from)."""
    if ("base" in doc) == ("base_from" in doc):
        raise ValueError(f"{path.name}: give exactly one of base and base_from")
    if "base" in doc:
        if "as_of" not in doc:
            raise ValueError(f"{path.name}: base needs as_of")
        return doc["base"], doc["as_of"]
    source = (path.parent / str(doc["base_from"])).resolve()
    other = read_yaml(source)
    return other["base"], doc.get("as_of", other["as_of"])


def collect_corpus(directory: Path = CODING_DIR) -> list[Any]:
    """Every case of every corpus file, once per trial the file names, as pytest params."""
    known = conventions()
    params: list[Any] = []
    for path in corpus_files(directory):
        doc = read_yaml(path)
        extra = set(doc) - _FILE_KEYS
        if extra or not {"fact", "trial", "cases"} <= set(doc):
            raise ValueError(f"{path.name}: needs fact, trial and cases; unknown keys {extra}")
        trials = doc["trial"] if isinstance(doc["trial"], list) else [doc["trial"]]
        base, as_of = _base(doc, path)
        for spec in doc["cases"]:
            where = f"{path.name}::{spec.get('id')}"
            if spec.get("coding") not in known:
                raise ValueError(
                    f"{where}: coding {spec.get('coding')!r} is not in {sorted(known)}"
                )
            for trial in trials:
                params.append(
                    parse_case(
                        trial,
                        as_of,
                        base,
                        spec,
                        where,
                        extra_keys=frozenset({"coding"}),
                        param_id=f"{path.stem}::{trial}::{spec['id']}",
                    )
                )
    return params


CORPUS = collect_corpus()


def test_the_corpus_is_well_formed() -> None:
    ids = [p.id for p in CORPUS]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicates, f"case ids must be unique within a file: {duplicates}"
    trials = {p.stem for p in TRIALS_DIR.glob("*.json")}
    for param in CORPUS:
        case: Case = param.values[0]
        assert case.trial in trials, f"{param.id}: no trial {case.trial} in fixtures/trials"


def test_every_fact_is_coded_more_than_one_way() -> None:
    by_file: dict[str, set[str]] = {}
    for param in CORPUS:
        case: Case = param.values[0]
        by_file.setdefault(param.id.split("::")[0], set()).add(str(case.coding))
    assert by_file, "the corpus is empty"
    single = {name: codings for name, codings in by_file.items() if len(codings) < 2}
    assert not single, f"facts coded only one way: {single}"


def test_a_case_without_a_known_coding_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "fact: x\ntrial: escc-sbrt-antipd1\nas_of: '2026-11-01'\n"
        "base: [{resourceType: Patient, id: p}]\n"
        "cases: [{id: a, coding: my-hospital, expect: {status: eligible}}]\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="coding 'my-hospital' is not in"):
        collect_corpus(tmp_path)


@pytest.mark.parametrize("case", CORPUS)
def test_coding_case(case: Case) -> None:
    check_case(case)


@pytest.mark.parametrize("case", CORPUS)
def test_coding_case_reads_the_same_from_a_bulk_export(case: Case, tmp_path: Path) -> None:
    """The same patient as a Bulk export (one NDJSON file per type, grouped through spill files):
    reading it with the trials' resource filter, which drops what no input can find before the
    JSON is decoded, gives exactly the results of reading every resource."""
    engine = engine_for(case.trial)
    export = tmp_path / "export"
    export.mkdir()
    lines: dict[str, list[str]] = {}
    for res in case.resources:
        lines.setdefault(res["resourceType"], []).append(json.dumps(res))
    for rtype, rows in lines.items():
        (export / f"{rtype}.ndjson").write_text("\n".join(rows) + "\n", encoding="utf-8")

    def screen(types: Any) -> list[dict[str, Any]]:
        problems: list[str] = []
        records = iter_patient_records(
            [export], problems=problems, types=types, partition_bytes=1, spill_dir=tmp_path
        )
        return [
            r.model_dump()
            for rec in records
            for r in engine.evaluate_patient_record(rec, as_of=case.as_of)
        ]

    filtered = screen(wanted_types(engine.trials))
    assert filtered == screen(None)
    assert [r["status"] for r in filtered] == [
        r.status for r in engine.evaluate(case.resources, as_of=case.as_of)
    ]
