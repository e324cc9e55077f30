"""Tests for ConceptMap loading, translation and Terminology.apply_concept_maps."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.terminology import LOINC, Terminology

LOCAL = "http://hospital.example.org/fhir/CodeSystem/lab-codes"


def observation(*codings: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "code": {"coding": list(codings), "text": "local test"},
        "valueQuantity": {"value": 1.1, "unit": "mg/dL"},
    }


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return Terminology.load()


@pytest.mark.parametrize(
    ("local", "loinc"),
    [
        ("WBC", "6690-2"),
        ("ANC", "751-8"),
        ("PLT", "777-3"),
        ("HGB", "718-7"),
        ("ALB", "1751-7"),
        ("TBIL", "1975-2"),
        ("ALT", "1742-6"),
        ("AST", "1920-8"),
        ("ALP", "6768-6"),
        ("CREA", "2160-0"),
        ("CRCL24", "2164-2"),
        ("HBVDNA", "42595-9"),
        ("HCVAB", "13955-0"),
        ("HCVRNA", "11011-4"),
        ("HCGS", "2118-8"),
    ],
)
def test_example_map_translates_local_codes(
    terminology: Terminology, local: str, loinc: str
) -> None:
    assert terminology.translate(LOCAL, local) == [(LOINC, loinc)]


def test_example_map_targets_are_in_the_shipped_value_sets(terminology: Terminology) -> None:
    vs = "https://fhirmatch.dev/fhir/ValueSet/"
    pairs = {"CREA": "creatinine", "ALT": "alt", "PLT": "platelets", "HCVRNA": "hcv-rna"}
    for local, name in pairs.items():
        [(system, code)] = terminology.translate(LOCAL, local)
        assert terminology.contains(vs + name, system, code)


def test_unmapped_code_translates_to_nothing(terminology: Terminology) -> None:
    assert terminology.translate(LOCAL, "NOPE") == []
    assert terminology.translate("http://other.example.org", "CREA") == []
    assert terminology.translate(LOCAL, None) == []


def test_apply_adds_loinc_and_never_mutates(terminology: Terminology) -> None:
    original = observation({"system": LOCAL, "code": "CREA", "display": "Creatinine"})
    snapshot = copy.deepcopy(original)
    mapped = terminology.apply_concept_maps(original)
    assert original == snapshot
    assert mapped is not original
    assert mapped["code"]["coding"] == [
        {"system": LOCAL, "code": "CREA", "display": "Creatinine"},
        {
            "system": LOINC,
            "code": "2160-0",
            "display": "Creatinine [Mass/volume] in Serum or Plasma",
        },
    ]
    assert mapped["code"]["text"] == "local test"
    assert mapped["valueQuantity"] == original["valueQuantity"]
    assert terminology.matches("https://fhirmatch.dev/fhir/ValueSet/creatinine", mapped["code"])
    assert not terminology.matches(
        "https://fhirmatch.dev/fhir/ValueSet/creatinine", original["code"]
    )


def test_apply_returns_input_when_nothing_maps(terminology: Terminology) -> None:
    already = observation({"system": LOINC, "code": "2160-0"})
    assert terminology.apply_concept_maps(already) is already
    unmapped = observation({"system": LOCAL, "code": "NOPE"})
    assert terminology.apply_concept_maps(unmapped) is unmapped
    no_code = {"resourceType": "Observation", "id": "x"}
    assert terminology.apply_concept_maps(no_code) is no_code


def test_apply_does_not_duplicate_an_existing_target(terminology: Terminology) -> None:
    both = observation({"system": LOCAL, "code": "ALT"}, {"system": LOINC, "code": "1742-6"})
    assert terminology.apply_concept_maps(both) is both


def test_only_usable_equivalences_map(tmp_path: Path) -> None:
    concept_map = {
        "resourceType": "ConceptMap",
        "url": "http://example.org/cm",
        "group": [
            {
                "source": "urn:oid:1.2.3.4.5.99.1",
                "target": "urn:oid:2.16.840.1.113883.6.1",
                "element": [
                    {"code": "A", "target": [{"code": "1-1", "equivalence": "equivalent"}]},
                    {"code": "B", "target": [{"code": "2-2", "equivalence": "narrower"}]},
                    {"code": "C", "target": [{"code": "3-3", "equivalence": "wider"}]},
                    {"code": "D", "target": [{"code": "4-4", "equivalence": "disjoint"}]},
                ],
            }
        ],
    }
    (tmp_path / "cm.json").write_text(json.dumps(concept_map), encoding="utf-8")
    terminology = Terminology.load([tmp_path])
    assert terminology.translate("urn:oid:1.2.3.4.5.99.1", "A") == [(LOINC, "1-1")]
    assert terminology.translate("urn:oid:1.2.3.4.5.99.1", "B") == []
    assert terminology.translate("urn:oid:1.2.3.4.5.99.1", "C") == [(LOINC, "3-3")]
    assert terminology.translate("urn:oid:1.2.3.4.5.99.1", "D") == []


def test_terminology_without_concept_maps_returns_input(tmp_path: Path) -> None:
    terminology = Terminology.load([tmp_path])
    resource = observation({"system": LOCAL, "code": "CREA"})
    assert terminology.apply_concept_maps(resource) is resource


def test_sources_of_finds_local_codes_for_required_codes() -> None:
    """The fetch widens its code filter with these, so locally coded results are not missed."""
    from fhirmatch.match import fetch_requirements
    from fhirmatch.model import Criterion, DataInput, Trial

    term = Terminology.load()
    local = "http://hospital.example.org/fhir/CodeSystem/lab-codes"
    assert (local, "PLT") in term.sources_of({("http://loinc.org", "777-3")})
    assert term.sources_of({("http://loinc.org", "0000-0")}) == frozenset()
    plt = DataInput(
        name="plt", resource_type="Observation", codes=frozenset({("http://loinc.org", "777-3")})
    )
    crit = Criterion(id="c", kind="inclusion", text="t", expression="true", inputs=(plt,))
    trial = Trial(id="t", title="t", identifiers=(), plan_definition_id="p", criteria=(crit,))
    (widened,) = fetch_requirements([trial], term)
    assert (local, "PLT") in widened.codes
    assert ("http://loinc.org", "777-3") in widened.codes
