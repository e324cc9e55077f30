"""Bounded-memory grouping of NDJSON by patient through hash-partitioned spill files."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fhirmatch import records
from fhirmatch.records import (
    ResourceFilter,
    iter_ndjson_slice,
    iter_patient_records,
    skippable_line,
)
from fhirmatch.stream import (
    Shuffle,
    group_ndjson_by_patient,
    group_partition,
    partition_count,
    partition_of,
    spill_slice,
    wanted_types,
)


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


# --------------------------------------------------------------------------- type filter


NEEDED = frozenset({"Patient", "Observation", "Medication", "MedicationRequest"})


@pytest.mark.parametrize(
    ("line", "skip"),
    [
        (b'{"resourceType": "Claim", "id": "c1"}', True),
        (b'{"id": "c1", "resourceType" : "ExplanationOfBenefit"}', True),
        (b'{"resourceType": "Observation", "id": "o1"}', False),
        # a contained resource of a needed type: decoded, judged after decoding
        (b'{"resourceType": "Claim", "contained": [{"resourceType": "Observation"}]}', False),
        # a misspelt type is never skipped unseen: the loader must report it
        (b'{"resourceType": "Observaton", "id": "o1"}', False),
        (b'{"id": "x"}', False),
        # a type that is not a plain name (not a FHIR resource): reported, never skipped
        (b'{"resourceType": 5, "contained": [{"resourceType": "Claim"}]}', False),
        # escapes could hide the real type or key: decoded
        (b'{"resourceType": "Claim", "note": "\\u0022resourceType\\u0022"}', False),
        (b'{"resource\\u0054ype": "Observation", "a": {"resourceType": "Claim"}}', False),
    ],
)
def test_skippable_line(line: bytes, skip: bool) -> None:
    assert skippable_line(line, NEEDED) is skip
    assert json.loads(line)  # every example is valid JSON


def test_type_filter_keeps_needed_types_and_reports_unknown_ones(tmp_path: Path) -> None:
    path = tmp_path / "mixed.ndjson"
    lines = [
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Claim", "id": "c1", "patient": {"reference": "Patient/p1"}},
        _obs("o1", "p1"),
        {"resourceType": "Observaton", "id": "typo", "subject": {"reference": "Patient/p1"}},
        # unneeded type with a contained Observation: decoded, then dropped by its own type
        {
            "resourceType": "Claim",
            "id": "c2",
            "patient": {"reference": "Patient/p1"},
            "contained": [{"resourceType": "Observation", "id": "inner"}],
        },
        # an unneeded line without a patient is not reported: its type is not read at all
        {"resourceType": "Encounter", "id": "e1"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    problems: list[str] = []
    (rec,) = iter_patient_records([path], problems=problems, types=NEEDED)
    assert [r["id"] for r in rec.resources] == ["p1", "o1"]
    assert problems == []
    assert rec.problems == [f"{path}: Observaton/typo has an unknown resourceType; skipped"]
    # without a filter every type is kept and the orphan Encounter is reported
    problems = []
    (rec,) = iter_patient_records([path], problems=problems)
    assert [r["id"] for r in rec.resources] == ["p1", "c1", "o1", "c2"]
    assert problems == [f"{path}: line 6 (Encounter/e1) has no patient reference"]


def test_wanted_types_follow_the_trials() -> None:
    from fhirmatch.model import Criterion, DataInput, Trial

    def trial(*types: str) -> Trial:
        inputs = tuple(DataInput(name=f"i{n}", resource_type=t) for n, t in enumerate(types))
        return Trial(
            id="t",
            title="t",
            identifiers=(),
            criteria=(Criterion(id="c", kind="inclusion", text="d", inputs=inputs),),
            plan_definition_id="pd",
        )

    assert wanted_types([trial("Observation")]) == {"Patient", "Observation"}
    coded = DataInput(
        name="crea", resource_type="Observation", codes=frozenset({("http://loinc.org", "2160-0")})
    )
    drug = DataInput(
        name="pd1",
        resource_type="MedicationRequest",
        codes=frozenset({("http://www.nlm.nih.gov/research/umls/rxnorm", "1547545")}),
        possible_codes=frozenset({("http://www.whocc.no/atc", "L01FF")}),
    )
    t = Trial(
        id="t",
        title="t",
        identifiers=(),
        criteria=(Criterion(id="c", kind="inclusion", text="d", inputs=(coded, drug)),),
        plan_definition_id="pd",
    )
    wanted = wanted_types([t])
    assert wanted.coded == {"Observation"}  # medicines are matched by ingredient, never dropped
    assert wanted.known_codes == coded.codes | drug.codes | drug.possible_codes
    # a defining diagnosis that reviews diagnoses written in words keeps every Condition (an
    # ICD-9-CM or local code with cancer-like text is looked for among all of them)
    cancer = DataInput(
        name="ec",
        resource_type="Condition",
        codes=frozenset({("http://hl7.org/fhir/sid/icd-10-cm", "C15")}),
        text_systems=frozenset({"http://hl7.org/fhir/sid/icd-10-cm"}),
    )
    plain = DataInput(name="ec", resource_type="Condition", codes=cancer.codes)
    for inp, coded_types in ((plain, {"Condition"}), (cancer, set())):
        c = Criterion(id="c", kind="inclusion", text="d", inputs=(inp,))
        t = Trial(id="t", title="t", identifiers=(), criteria=(c,), plan_definition_id="pd")
        assert wanted_types([t]).coded == coded_types
    assert wanted_types([trial("Condition"), trial("MedicationRequest")]) == {
        "Patient",
        "Condition",
        "MedicationRequest",
        "Medication",
    }


LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


def _coded(rtype: str, rid: str, pid: str | None, *codings: tuple[str, str]) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": rtype,
        "id": rid,
        "code": {"coding": [{"system": s, "code": c} for s, c in codings]},
    }
    if pid is not None:
        res["subject"] = {"reference": f"Patient/{pid}"}
    return res


def _code_filter_export(path: Path) -> None:
    rows = [
        {"resourceType": "Patient", "id": "p1"},
        _coded("Observation", "crea", "p1", (LOINC, "2160-0")),  # asked for
        _coded("Observation", "bp", "p1", (LOINC, "8480-6")),  # a vital sign nobody asks for
        _coded("Observation", "local", "p1", ("urn:oid:1.2.3", "K-CREA")),  # a ConceptMap may map
        _coded("Observation", "both", "p1", (LOINC, "8480-6"), (LOINC, " 2160-0 ")),
        _coded("Condition", "c15", "p1", (ICD10CM, "C15.4")),  # below the category asked for
        _coded("Condition", "flu", "p1", (ICD10CM, "J10.1")),
        _coded("Condition", "text", "p1"),  # no coding: the engine may read its words
        _coded("Observation", "orphan", None, (LOINC, "8480-6")),  # still reported
        {"resourceType": "MedicationRequest", "id": "rx", "subject": {"reference": "Patient/p1"}},
        # a panel asked for by a component (the stains of a mismatch-repair panel)
        {
            **_coded("Observation", "panel", "p1", (LOINC, "9999-1")),
            "component": [{"code": {"coding": [{"system": LOINC, "code": "2160-0"}]}}],
        },
        {
            **_coded("Observation", "bp-panel", "p1", (LOINC, "85354-9")),
            "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}}],
        },
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")


CODE_FILTER = ResourceFilter(
    {"Patient", "Observation", "Condition", "MedicationRequest", "Medication"},
    {(LOINC, "2160-0"), (ICD10CM, "C15")},
    {"Observation", "Condition"},
)
KEPT = ["p1", "crea", "local", "both", "c15", "text", "rx", "panel"]


def _read(
    path: Path, types: ResourceFilter, partitions: int | None, problems: list[str]
) -> list[records.PatientRecord]:
    """The records of ``path`` as the reader groups them (in memory or patient-ordered, as it
    chooses), or through ``partitions`` spill files (beside ``path``)."""
    if partitions is None:
        return list(iter_patient_records([path], problems=problems, types=types))
    return list(
        group_ndjson_by_patient(
            [path], problems, partitions=partitions, types=types, spill_dir=path.parent
        )
    )


@pytest.mark.parametrize("partitions", [None, 3])
def test_code_filter_drops_resources_no_input_can_find(tmp_path: Path, partitions: Any) -> None:
    """In memory, through spill files, and patient-ordered: the same resources are kept (those
    the engine's index keeps), and an orphan is reported whatever its code."""
    path = tmp_path / "export.ndjson"
    _code_filter_export(path)
    problems: list[str] = []
    (rec,) = _read(path, CODE_FILTER, partitions, problems)
    assert sorted(r["id"] for r in rec.resources) == sorted(KEPT)
    assert problems == [f"{path}: line 9 (Observation/orphan) has no patient reference"]


@pytest.mark.parametrize("partitions", [None, 1, 3])
def test_only_the_lines_kept_are_decoded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partitions: int | None
) -> None:
    """Patient-ordered, in memory (one partition) and through spill files, a line the filter
    drops is read only as far as its type, code and patient: only the lines kept are decoded
    whole."""
    path = tmp_path / "export.ndjson"
    _code_filter_export(path)
    decoded: list[str] = []
    real = records._DECODE

    def counting(data: bytes) -> Any:
        res = real(data)
        if isinstance(res, dict) and "resourceType" in res:
            decoded.append(res["id"])
        return res

    monkeypatch.setattr(records, "_DECODE", counting)
    problems: list[str] = []
    if partitions is None:
        (rec,) = iter_patient_records([path], problems=problems, types=CODE_FILTER)
    else:
        (rec,) = group_ndjson_by_patient(
            [path], problems, partitions=partitions, types=CODE_FILTER, spill_dir=tmp_path
        )
    assert sorted(r["id"] for r in rec.resources) == sorted(KEPT)
    # the orphan is kept to be reported: after its whole decode, or before (spill files)
    assert sorted(d for d in decoded if d != "orphan") == sorted(KEPT)
    assert problems == [f"{path}: line 9 (Observation/orphan) has no patient reference"]


def test_code_filter_is_the_engines_index_rule() -> None:
    from fhirmatch.engine import may_be_found

    rows: list[dict[str, Any]] = []
    for res in (
        _coded("Observation", "a", "p", (LOINC, "2160-0")),
        _coded("Observation", "b", "p", (LOINC, "8480-6")),
        _coded("Observation", "c", "p", ("urn:oid:1.2.3", "K")),
        _coded("Condition", "d", "p", (ICD10CM, "C154")),
        _coded("Condition", "e", "p", (ICD10CM, "J10.1")),
        _coded("Procedure", "f", "p", ("http://snomed.info/sct", "1")),
    ):
        rows.append(res)
        index_keeps = may_be_found(
            res, res["resourceType"], CODE_FILTER.known_codes, local_codes_map=True
        )
        uncoded = res["resourceType"] not in CODE_FILTER.coded
        assert CODE_FILTER.keeps(res) is (index_keeps or uncoded)
    assert [r["id"] for r in rows if CODE_FILTER.keeps(r)] == ["a", "c", "d", "f"]


def test_the_brief_read_of_a_line_keeps_what_the_full_read_keeps(tmp_path: Path) -> None:
    """Most lines are judged from a typed partial decode (type, codings, subject); every shape
    it does not expect must fall back to the full rule, so both reads keep the same lines."""
    sct = "http://snomed.info/sct"
    obs = _coded("Observation", "x", "p1", (LOINC, "8480-6"))
    rows: list[Any] = [
        _coded("Observation", "known", "p1", (LOINC, " 2160-0 ")),  # spaces around the code
        _coded("Observation", "unknown", "p1", (LOINC, "8480-6")),
        _coded("Observation", "two", "p1", (LOINC, "8480-6"), (LOINC, "2160-0")),
        _coded("Observation", "local", "p1", ("urn:oid:1.2.3", "K")),
        # the same code on a Condition: only an Observation's local code may be mapped
        _coded("Condition", "local-condition", "p1", ("urn:oid:1.2.3", "K")),
        _coded("Observation", "snomed", "p1", (sct, "1")),
        _coded("Condition", "c154", "p1", (ICD10CM, "C154")),
        _coded("Condition", "j101", "p1", (ICD10CM, "J10.1")),
        _coded("Condition", "oid-icd", "p1", ("urn:oid:2.16.840.1.113883.6.90", "c15.9")),
        _coded("Condition", "words", "p1"),
        {**obs, "id": "text-only", "code": {"text": "creatinine"}},
        {**obs, "id": "no-code", "code": None},
        {**obs, "id": "code-string", "code": "2160-0"},
        {**obs, "id": "no-system", "code": {"coding": [{"code": "2160-0"}]}},
        {**obs, "id": "number", "code": {"coding": [{"system": LOINC, "code": 2160}]}},
        {**obs, "id": "coding-string", "code": {"coding": ["2160-0"]}},
        {**obs, "id": "subject-list", "subject": [{"reference": "Patient/p1"}]},
        {**obs, "id": "group", "subject": {"reference": "Group/g1"}},
        {
            **obs,
            "id": "via-patient",
            "subject": {"reference": "Group/g1"},
            "patient": {"reference": "Patient/p1"},
        },
        {**obs, "id": "absolute", "subject": {"reference": "http://h/fhir/Patient/p1"}},
        {**obs, "id": "orphan", "subject": {"display": "someone"}},
        {
            **obs,
            "id": "panel",
            "component": [{"code": {"coding": [{"system": LOINC, "code": "2160-0"}]}}],
        },
        {**obs, "id": "bad-panel", "component": "x"},
        # panels whose own code no input asks for: kept for a part's code, judged part by part
        {
            **obs,
            "id": "panel-mixed",
            "component": [
                {"value": 1},
                {"code": None},
                {"code": {"coding": [{"code": 1}]}},
                {"code": {"coding": [{"system": LOINC, "code": "2160-0"}]}},
            ],
        },
        {
            **obs,
            "id": "panel-number",
            "component": [5, {"code": {"coding": [{"system": LOINC, "code": "2160-0"}]}}],
        },
        {**obs, "id": "panel-unknown", "component": [{"code": obs["code"]}, {"code": {}}]},
        {**obs, "id": "panel-empty", "component": []},
        {**obs, "id": "panel-odd", "component": [{"code": "2160-0"}, "2160-0"]},
        {**obs, "id": "escaped", "resourceType": "Obs\u0065rvation"},
        {
            **obs,
            "id": "contained",
            "contained": [_coded("Observation", "in", None, (LOINC, "2160-0"))],
        },
        {**obs, "id": "alien", "resourceType": "Alien"},
        {**obs, "id": "type-number", "resourceType": 5},
        {"resourceType": "MedicationRequest", "id": "rx", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Medication", "id": "med", "code": {"text": "x"}},
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Encounter", "id": "enc", "subject": {"reference": "Patient/p1"}},
        [1, 2],
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", '"text"', ""]
    lines += lines  # every line again: judged the same when its code has been judged before
    path = tmp_path / "mixed.ndjson"
    path.write_text("\n".join(line.replace("\\\\u", "\\u") for line in lines), "utf-8")

    def read(head: bool) -> tuple[list[int], list[tuple[int, str]]]:
        problems: list[tuple[int, str]] = []
        kept = iter_ndjson_slice(
            path, lambda n, t: problems.append((n, t)), types=CODE_FILTER, head=head
        )
        return [n for n, _res, _body in kept], problems

    brief, full = read(True), read(False)
    assert brief == full
    kept_ids = {json.loads(lines[n - 1]).get("id") for n in brief[0]}
    # a code that is not LOINC may be mapped by a ConceptMap: such Observations are kept
    assert {"known", "two", "local", "snomed", "c154", "oid-icd", "words", "text-only"} <= kept_ids
    assert {"panel", "panel-mixed", "panel-number"} <= kept_ids
    assert not {"panel-unknown", "panel-empty", "panel-odd"} & kept_ids
    assert not {"unknown", "j101", "enc", "local-condition"} & kept_ids
    half = len(lines) // 2
    assert [n - half for n in brief[0] if n > half] == [n for n in brief[0] if n <= half]
    assert "group" in kept_ids  # no patient reference: kept, so that it is reported


def test_a_panel_with_text_that_is_not_utf8_is_reported_not_fatal(tmp_path: Path) -> None:
    """A panel whose own code no input asks for is judged by its parts' codes. When text in the
    parts is not UTF-8, the line is kept to be decoded whole, and reported there with its line
    number; the read goes on."""
    unknown = {"coding": [{"system": LOINC, "code": "8480-6"}]}
    odd = {"coding": [{"system": LOINC, "code": 8480}]}  # read from the head, not the brief
    lines = [
        json.dumps({**_obs(f"o{n}", "p1"), "code": code, "component": [{"code": {"text": "T"}}]})
        .encode("utf-8")
        .replace(b'"T"', b'"\xff"')
        for n, code in enumerate((unknown, odd))
    ]
    path = tmp_path / "x.ndjson"
    lines.append(json.dumps({"resourceType": "Patient", "id": "p1"}).encode("utf-8"))
    path.write_bytes(b"\n".join(lines))
    problems: list[str] = []
    recs = list(group_ndjson_by_patient([path], problems, types=CODE_FILTER, partitions=2))
    assert [r.patient_id for r in recs] == ["p1"]
    assert [r["resourceType"] for r in recs[0].resources] == ["Patient"]
    assert problems == [
        f"{path}: line 1 is not UTF-8; line skipped",
        f"{path}: line 2 is not UTF-8; line skipped",
    ]


def test_code_filter_survives_pickling_for_worker_processes() -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(CODE_FILTER))  # noqa: S301 - our own bytes
    assert copy == CODE_FILTER and isinstance(copy, ResourceFilter)
    assert copy.known_codes == CODE_FILTER.known_codes and copy.coded == CODE_FILTER.coded
    assert not copy.keeps(_coded("Observation", "bp", "p1", (LOINC, "8480-6")))


# --------------------------------------------------------------------------- outdated lines


def test_wanted_types_give_each_code_the_widest_window_asking_for_it() -> None:
    import datetime as dt

    from fhirmatch.model import Criterion, DataInput, Trial

    crea = frozenset({(LOINC, "2160-0")})
    alt = frozenset({(LOINC, "1742-6")})
    bili = frozenset({(LOINC, "1975-2")})
    hb = frozenset({(LOINC, "718-7")})
    inputs = (
        DataInput(name="a", resource_type="Observation", codes=crea, lookback_days=14),
        DataInput(name="b", resource_type="Observation", codes=crea, lookback_days=28),
        DataInput(name="c", resource_type="Observation", codes=alt, lookback_days=28),
        DataInput(name="d", resource_type="Observation", codes=alt),  # ever: no window
        DataInput(
            name="e",
            resource_type="Observation",
            codes=bili,
            lookback_days=28,
            extra_filters=(("bodySite", "https://example.org/vs"),),
        ),
        DataInput(
            name="f",
            resource_type="Observation",
            codes=hb,
            lookback_days=28,
            clinical_status="current",
        ),
    )
    crit = Criterion(id="c", kind="inclusion", text="d", inputs=inputs)
    t = Trial(id="t", title="t", identifiers=(), criteria=(crit,), plan_definition_id="pd")
    as_of = dt.date(2026, 11, 1)
    wanted = wanted_types([t], as_of)
    assert wanted.windows == {("Observation", LOINC, "2160-0"): 28}
    assert wanted.as_of == as_of
    assert wanted_types([t]).as_of is None  # without a date, every kept line is read whole


def _dated(rid: str, pid: str, code: str, when: str | None, **more: Any) -> dict[str, Any]:
    res = {**_coded("Observation", rid, pid, (LOINC, code)), "status": "final", **more}
    if when is not None:
        res["effectiveDateTime"] = when
    return res


def _outdated_export(path: Path) -> None:
    rows = [
        {"resourceType": "Patient", "id": "p1"},
        _dated("new", "p1", "2160-0", "2026-10-20"),  # within 30 days: read whole
        _dated("old1", "p1", "2160-0", "2024-01-01T08:00:00Z"),
        _dated("old2", "p1", "2160-0", "2025-05-01", valueQuantity={"value": 1.1}),
        _dated("old3", "p1", "2160-0", "2024-12-01"),
        # another status is another kind: its own latest is kept
        _dated("prelim", "p1", "2160-0", "2025-06-01", status="preliminary"),
        # no date: never within a window, and no date to name: a dated one of its kind stands
        # for it
        _dated("nodate", "p1", "2160-0", None),
        # dated by a period (read by the general path): the same kind as old1-old3, older
        _dated("period", "p1", "2160-0", None, effectivePeriod={"start": "2022-01-01"}),
        # a panel is always read whole
        {**_dated("panel", "p1", "2160-0", "2020-01-01"), "component": []},
        # asked for without a window: every one is read whole
        _dated("alt1", "p1", "1742-6", "2019-01-01"),
        _dated("alt2", "p1", "1742-6", "2020-01-01"),
        {"resourceType": "Patient", "id": "p2"},
        _dated("p2old", "p2", "2160-0", "2023-01-01"),
        _dated("p2older", "p2", "2160-0", "2022-01-01"),
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")


@pytest.mark.parametrize("partitions", [None, 1, 3])
def test_outdated_lines_keep_only_the_latest_of_each_kind(tmp_path: Path, partitions: Any) -> None:
    """Of the lines dated outside every window that asks for their code, each patient keeps the
    latest of each kind (code and statuses as written): all the engine reads of them is that
    date. Patient-ordered, and through spill files."""
    import datetime as dt

    path = tmp_path / "export.ndjson"
    _outdated_export(path)
    windows = {("Observation", LOINC, "2160-0"): 30}
    types = ResourceFilter(
        {"Patient", "Observation"},
        {(LOINC, "2160-0"), (LOINC, "1742-6")},
        {"Observation"},
        windows,
        dt.date(2026, 11, 1),
    )
    problems: list[str] = []
    got = _read(path, types, partitions, problems)
    kept = {rec.patient_id: sorted(r["id"] for r in rec.resources) for rec in got}
    assert kept == {
        "p1": sorted(["p1", "new", "old2", "prelim", "panel", "alt1", "alt2"]),
        "p2": ["p2", "p2old"],
    }
    assert problems == []
    # the kept line is read whole, as it was written
    (old2,) = (r for rec in got for r in rec.resources if r["id"] == "old2")
    assert old2["valueQuantity"] == {"value": 1.1}
    # without the as-of date, nothing is dropped for its date
    whole = ResourceFilter(types, types.known_codes, types.coded, windows)
    (p1, p2) = iter_patient_records([path], types=whole)
    assert len(p1.resources) == 11 and len(p2.resources) == 3


def test_an_icd10_code_is_never_outdated() -> None:
    """An ICD-10 code is also found through the categories above it, which other inputs may ask
    for without a window: a line so coded is read whole whatever its date."""
    import datetime as dt

    from fhirmatch.records import _Brief

    types = ResourceFilter(
        {"Patient", "Condition"},
        {(ICD10CM, "I21.4"), (ICD10CM, "I21")},
        {"Condition"},
        {("Condition", ICD10CM, "I21.4"): 180},
        dt.date(2026, 11, 1),
    )
    old = {**_coded("Condition", "mi", "p1", (ICD10CM, "I21.4")), "onsetDateTime": "2001-01-01"}
    line = json.dumps(old).encode()
    brief = msgspec.json.decode(line, type=_Brief)
    assert types.keeps_brief(brief) is True
    assert types.outdated(brief, line) is None
    # the same window on a code without a hierarchy: outdated
    loinc = ResourceFilter(
        {"Patient", "Observation"},
        {(LOINC, "2160-0")},
        {"Observation"},
        {("Observation", LOINC, "2160-0"): 180},
        dt.date(2026, 11, 1),
    )
    crea = json.dumps(_dated("crea", "p1", "2160-0", "2001-01-01")).encode()
    assert loinc.outdated(msgspec.json.decode(crea, type=_Brief), crea) is not None


def test_dropping_outdated_lines_changes_no_result(tmp_path: Path) -> None:
    """The seed trials on one patient whose creatinine results are all older than the window:
    reading the export drops all but the latest, and the results are those of the engine on
    the whole record, down to the date the reason names."""
    import datetime as dt

    from fhirmatch.engine import Engine
    from fhirmatch.executors import LocalExecutor
    from fhirmatch.trials import load_trials

    as_of = dt.date(2026, 11, 1)
    trials = load_trials([Path(__file__).resolve().parents[2] / "fixtures" / "trials"])
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1960-05-05"}
    labs = [
        _dated(f"crea{n}", "p1", "2160-0", when, valueQuantity={"value": 0.9, "unit": "mg/dL"})
        for n, when in enumerate(["2019-01-01", "2023-03-03", "2021-02-02"])
    ]
    path = tmp_path / "export.ndjson"
    path.write_text("".join(json.dumps(x) + "\n" for x in [patient, *labs]), encoding="utf-8")
    (rec,) = iter_patient_records([path], types=wanted_types(trials, as_of))
    assert sorted(r["id"] for r in rec.resources) == ["crea1", "p1"]
    engine = Engine(trials)
    expected = [r.model_dump(mode="json") for r in engine.evaluate([patient, *labs], as_of=as_of)]
    (got,) = LocalExecutor(engine).evaluate_files([path], as_of=as_of)
    assert [r.model_dump(mode="json") for r in got[1]] == expected
    reasons = json.dumps(expected)
    assert "the latest, 2023-03-03, is outside the window" in reasons


# --------------------------------------------------------------------------- slices


def _write_lines(path: Path, rows: list[str]) -> None:
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("slice_bytes", [1, 7, 64, 333, 10_000])
def test_byte_slices_cover_every_line_once(tmp_path: Path, slice_bytes: int) -> None:
    expected = _write_split_export(tmp_path / "export", 30, seed=11)
    problems: list[str] = []
    got = {
        r.patient_id: sorted(x["id"] for x in r.resources)
        for r in group_ndjson_by_patient(
            _files(tmp_path / "export"), problems, partitions=4, slice_bytes=slice_bytes
        )
    }
    assert got == expected
    assert problems == []


@pytest.mark.parametrize("slice_bytes", [1, 50, 120, 100_000])
def test_line_numbers_are_whole_file_numbers_across_slices(
    tmp_path: Path, slice_bytes: int
) -> None:
    path = tmp_path / "x.ndjson"
    rows = [json.dumps(_obs(f"o{n}", f"p{n % 3}")) for n in range(40)]
    rows[17] = "{oops"
    rows[29] = ""  # blank lines count as lines
    rows[33] = json.dumps({"resourceType": "Observation", "id": "orphan"})
    _write_lines(path, rows)
    problems: list[str] = []
    recs = list(group_ndjson_by_patient([path], problems, partitions=2, slice_bytes=slice_bytes))
    assert sorted(r.patient_id for r in recs) == ["p0", "p1", "p2"]
    assert sum(len(r.resources) for r in recs) == 37
    assert problems == [
        f"{path}: line 18 is not valid JSON; line skipped",
        f"{path}: line 34 (Observation/orphan) has no patient reference",
    ]


def test_slice_outcomes_can_arrive_in_any_order(tmp_path: Path) -> None:
    expected = _write_split_export(tmp_path / "export", 25, seed=5)
    problems: list[str] = []
    with Shuffle(_files(tmp_path / "export"), partitions=3, slice_bytes=200) as shuffle:
        tasks = shuffle.slice_tasks()
        assert len(tasks) > 4
        outcomes = [spill_slice(t) for t in reversed(tasks)]
        parts = shuffle.partition_tasks(outcomes, problems)
        got = {
            r.patient_id: sorted(x["id"] for x in r.resources)
            for task in parts
            for r in group_partition(task)
        }
        with pytest.raises(RuntimeError, match="did not report"):
            shuffle.partition_tasks(outcomes[1:], problems)
    assert got == expected


def test_spill_keeps_the_original_line_text(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    rows = [
        '{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"},'
        '"valueQuantity":{"value":1.10}}',
        json.dumps({"resourceType": "Observation", "id": "o2", "subject": {"reference": "p2"}}),
    ]
    _write_lines(path, rows)
    with Shuffle([path], partitions=1) as shuffle:
        (outcome,) = [spill_slice(t) for t in shuffle.slice_tasks()]
        (spilled,) = outcome.spilled.values()
        # patient id, line number (for problems found when it is decoded), the original text
        assert Path(spilled).read_bytes() == b"p1\t1\t" + rows[0].encode() + b"\n"
    assert outcome.problems == [(2, "(Observation/o2) has no patient reference")]


def test_spill_files_are_private_and_removed_on_error(tmp_path: Path) -> None:
    """Spill files hold patient data: they live in a directory only the owner can read, which
    is removed even when the grouping fails half-way."""
    _write_split_export(tmp_path / "export", 20)
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o755)
    shuffle = Shuffle(_files(tmp_path / "export"), partitions=3, spill_dir=spill)
    with pytest.raises(RuntimeError, match="worker lost"), shuffle:
        assert shuffle.directory is not None
        assert shuffle.directory.stat().st_mode & 0o777 == 0o700
        for task in shuffle.slice_tasks():
            spill_slice(task)
        assert any(shuffle.directory.iterdir())
        raise RuntimeError("worker lost")
    assert list(spill.iterdir()) == []
