"""The demo patients in ``fixtures/patients/``: valid FHIR R4 transaction Bundles that load
idempotently (PUT ``Type/id``), with ids unique across files, and the outcomes the demo and
``fixtures/README.md`` promise."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirmatch.engine import Engine
from fhirmatch.records import iter_patient_records
from fhirmatch.results import TrialResult
from fhirmatch.terminology import Terminology
from fhirmatch.trials import default_mappings_dir, load_trials

ROOT = Path(__file__).resolve().parents[2]
PATIENTS = ROOT / "fixtures" / "patients"
TRIALS = ROOT / "fixtures" / "trials"
AS_OF = date(2026, 11, 1)
FILES = sorted(PATIENTS.rglob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def test_there_are_demo_and_synthea_patients() -> None:
    names = {p.stem for p in FILES}
    assert len(FILES) >= 18
    assert {"demo-escc-eligible", "demo-rectal-eligible"} <= names
    assert len(list((PATIENTS / "synthea").glob("*.json"))) == 3


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fixture_is_a_valid_r4_transaction_of_puts(path: Path) -> None:
    bundle = _load(path)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    get_fhir_model_class("Bundle").model_validate(bundle)
    patients = 0
    for entry in bundle["entry"]:
        res = entry["resource"]
        rtype = res["resourceType"]
        # each resource on its own, with its own R4B model
        get_fhir_model_class(rtype).model_validate(res)
        assert entry["request"] == {"method": "PUT", "url": f"{rtype}/{res['id']}"}
        patients += rtype == "Patient"
    assert patients == 1


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_references_are_literal_and_resolve_in_the_file(path: Path) -> None:
    bundle = _load(path)
    present = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    for ref in _references(bundle):
        assert not ref.startswith("urn:uuid:"), ref
        if ref.startswith("#"):
            continue  # contained resource
        assert re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", ref), ref
        assert ref in present, f"{path.name}: {ref} is not in the file"


def test_resource_ids_are_unique_across_files() -> None:
    seen: dict[str, str] = {}
    for path in FILES:
        for entry in _load(path)["entry"]:
            res = entry["resource"]
            if path.parent.name == "synthea" and res["resourceType"] in (
                "Organization",
                "Practitioner",
            ):
                continue  # shared reference data: the same resource PUT twice is harmless
            key = f"{res['resourceType']}/{res['id']}"
            assert key not in seen, f"{key} in {path.name} and {seen[key]}"
            seen[key] = path.name


def test_demo_resource_ids_are_prefixed_with_the_patient_id() -> None:
    for path in PATIENTS.glob("demo-*.json"):
        for entry in _load(path)["entry"]:
            rid = entry["resource"]["id"]
            assert rid == path.stem or rid.startswith(f"{path.stem}-"), rid


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], TrialResult]:
    terminology = Terminology.load([default_mappings_dir()])
    engine = Engine(load_trials([TRIALS], terminology=terminology), terminology)
    out: dict[tuple[str, str], TrialResult] = {}
    for record in iter_patient_records([PATIENTS]):
        for result in engine.evaluate_patient_record(record, as_of=AS_OF):
            out[(record.patient_id, result.study.split("/", 1)[1])] = result
    return out


def _failed(result: TrialResult) -> set[str]:
    out: set[str] = set()

    def walk(items: list[Any]) -> None:
        for c in items:
            if c.outcome == "fail" and not c.criteria:
                out.add(c.id)
            walk(c.criteria)

    walk(result.criteria)
    return out


#: (patient, trial, expected status, the leaf criteria that must be the failing ones)
EXPECTED = [
    ("demo-escc-eligible", "escc-sbrt-antipd1", "eligible", set()),
    ("demo-escc-eligible", "NCT05183958", "eligible", set()),
    ("demo-escc-eligible", "NCT06084897", "eligible", set()),
    ("demo-escc-eligible", "NCT03731442", "eligible", set()),
    ("demo-rectal-eligible", "NCT06767007", "eligible", set()),
    ("demo-rectal-local-labs", "NCT06767007", "eligible", set()),
    ("demo-rectal-partial-birthdate", "NCT06767007", "eligible", set()),
    ("demo-escc-coded-values", "escc-sbrt-antipd1", "eligible", set()),
    ("demo-escc-skin-cancer-history", "escc-sbrt-antipd1", "eligible", set()),
    ("demo-escc-low-platelets", "escc-sbrt-antipd1", "ineligible", {"inc-platelets"}),
    ("demo-escc-ecog3", "escc-sbrt-antipd1", "ineligible", {"inc-ecog"}),
    ("demo-escc-brain-mets", "escc-sbrt-antipd1", "ineligible", {"exc-brain-mets"}),
    ("demo-escc-prior-thoracic-rt", "escc-sbrt-antipd1", "ineligible", {"exc-thoracic-rt"}),
    ("demo-escc-drug-allergy", "escc-sbrt-antipd1", "ineligible", {"exc-allergy"}),
    (
        "demo-escc-drug-allergy",
        "NCT03731442",
        "ineligible",
        {"inc-no-drug-allergy", "exc-drug-allergy"},
    ),
    ("demo-escc-hbv-iu", "escc-sbrt-antipd1", "ineligible", {"exc-hbv"}),
    ("demo-escc-hbv-copies", "escc-sbrt-antipd1", "ineligible", {"exc-hbv"}),
    ("demo-escc-prostate-cancer", "escc-sbrt-antipd1", "ineligible", {"exc-other-malignancy"}),
    ("demo-escc-karnofsky-60", "NCT03731442", "ineligible", {"inc-kps"}),
    ("demo-rectal-age-80", "NCT06767007", "ineligible", {"inc-age"}),
    ("demo-escc-insufficient-data", "escc-sbrt-antipd1", "insufficient-data", set()),
    ("demo-escc-insufficient-data", "NCT05183958", "insufficient-data", set()),
    ("demo-escc-deceased", "escc-sbrt-antipd1", "ineligible", {"patient-deceased"}),
]


@pytest.mark.parametrize(
    ("patient", "trial", "status", "failing"), EXPECTED, ids=lambda v: str(v)[:40]
)
def test_demo_outcomes(
    results: dict[tuple[str, str], TrialResult],
    patient: str,
    trial: str,
    status: str,
    failing: set[str],
) -> None:
    result = results[(patient, trial)]
    assert result.status == status
    assert _failed(result) == failing


def test_every_trial_has_an_eligible_demo_patient(
    results: dict[tuple[str, str], TrialResult],
) -> None:
    eligible = {trial for (_p, trial), r in results.items() if r.status == "eligible"}
    assert eligible == {
        "escc-sbrt-antipd1",
        "NCT05183958",
        "NCT06084897",
        "NCT03731442",
        "NCT06767007",
    }
