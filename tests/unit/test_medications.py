"""Medicines by ingredient: the tables in mappings/medications, how a medication ValueSet is
widened to the codes that record its ingredients, and how the engine reads them (products,
brands, ATC substances and classes, names in text, all four medication resource types)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from fhirmatch.engine import Engine
from fhirmatch.errors import TerminologyError
from fhirmatch.terminology import INGREDIENT_SYSTEM, Terminology
from fhirmatch.trials import compile_trial, default_mappings_dir

RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
NAME = "https://fhirmatch.dev/fhir/CodeSystem/medication-name"
VS = "https://fhirmatch.dev/fhir/ValueSet/"
TABLE = default_mappings_dir() / "medications" / "ingredients.csv"
HEADER = "system,code,kind,display,ingredients,source\n"


@pytest.fixture(scope="module")
def term() -> Terminology:
    return Terminology.load()


def test_every_row_cites_a_source_and_every_ingredient_of_a_value_set_is_recorded_somehow(
    term: Terminology,
) -> None:
    rows = list(term._medications.values())
    assert len(rows) > 50
    assert all(r.source for r in rows)
    recorded = {i for r in rows if not r.is_class for i in r.ingredients}
    for name in ("platinum", "taxane", "fluoropyrimidine", "anti-pd1"):
        named = {c for s, c in term.expand(VS + name) if s == INGREDIENT_SYSTEM}
        assert named, name
        assert named <= recorded, (name, named - recorded)


def test_a_value_set_widens_to_products_brands_atc_and_names(term: Terminology) -> None:
    certain, possible = term.medication_codes(term.expand(VS + "anti-pd1"))
    assert (RX, "1547545") in certain  # ingredient
    assert (RX, "1547550") in certain  # brand name Keytruda
    assert (RX, "1657746") in certain  # Keytruda vial
    assert (RX, "2596778") in certain  # Opdualag: nivolumab with relatlimab
    assert (ATC, "L01FF09") in certain  # tislelizumab
    assert (NAME, "camrelizumab") in certain
    assert (RX, "1919507") not in certain  # durvalumab is a PD-L1 antibody
    assert (ATC, "L01FF03") not in certain
    assert possible == {(ATC, "L01FF")}  # the class also holds PD-L1 antibodies


def test_a_class_whose_members_all_belong_is_certain(term: Terminology) -> None:
    certain, possible = term.medication_codes(term.expand(VS + "platinum"))
    assert (ATC, "L01XA") in certain and not possible
    certain, possible = term.medication_codes(term.expand(VS + "fluoropyrimidine"))
    assert (ATC, "L01BC53") in certain  # S-1
    assert (ATC, "L01BC") in possible  # also gemcitabine, cytarabine ...
    assert (RX, "1156710") not in certain  # gemcitabine Injectable Product


def test_a_value_set_listing_an_rxnorm_ingredient_directly_is_widened_too(
    term: Terminology,
) -> None:
    certain, _ = term.medication_codes([(RX, "1547545")])
    assert (RX, "1657746") in certain and (ATC, "L01FF02") in certain


def test_other_csv_files_are_ignored_and_a_bad_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "aliases.csv").write_text("alias,ucum,note\nmg/dl,mg/dL,x\n", encoding="utf-8")
    assert Terminology.load([tmp_path])._medications == {}
    (tmp_path / "meds.csv").write_text(HEADER + "rxnorm,1,IN,x,x\n", encoding="utf-8")
    with pytest.raises(TerminologyError, match="row 2 has 5 columns"):
        Terminology.load([tmp_path])
    (tmp_path / "meds.csv").write_text(HEADER + "ndc,1,IN,x,x,src\n", encoding="utf-8")
    with pytest.raises(TerminologyError, match="system 'ndc'"):
        Terminology.load([tmp_path])
    (tmp_path / "meds.csv").write_text(HEADER + "rxnorm,1,IN,x,,src\n", encoding="utf-8")
    with pytest.raises(TerminologyError, match="required"):
        Terminology.load([tmp_path])


def _trial(rtypes: list[str]) -> dict[str, object]:
    inputs = [
        {
            "id": f"pd1_{n}",
            "type": rtype,
            "codeFilter": [{"path": "medication", "valueSet": VS + "anti-pd1"}],
        }
        for n, rtype in enumerate(rtypes)
    ]
    expr = " or ".join(f"%pd1_{n}.exists()" for n in range(len(rtypes)))
    kind = {"system": "https://fhirmatch.dev/fhir/CodeSystem/criterion-kind", "code": "inclusion"}
    return {
        "resourceType": "PlanDefinition",
        "id": "t-eligibility",
        "action": [
            {
                "id": "inc-pd1",
                "description": "received anti-PD-1",
                "code": [{"coding": [kind]}],
                "input": inputs,
                "condition": [
                    {
                        "kind": "applicability",
                        "expression": {"language": "text/fhirpath", "expression": expr},
                    }
                ],
            }
        ],
    }


TYPES = [
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationStatement",
    "MedicationDispense",
]


@pytest.fixture(scope="module")
def engine(term: Terminology) -> Engine:
    study = {"resourceType": "ResearchStudy", "id": "t", "status": "active"}
    return Engine([compile_trial(study, _trial(TYPES), term)], term)


def _outcome(engine: Engine, *resources: dict[str, object]) -> tuple[str, str]:
    patient = {"resourceType": "Patient", "id": "p"}
    [result] = engine.evaluate([patient, *resources], as_of=date(2026, 11, 1))
    c = result.criteria[0]
    return c.outcome, c.reason


def _med(rtype: str, concept: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "resourceType": rtype,
        "id": "m",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "medicationCodeableConcept": concept,
        **extra,
    }


def _cc(system: str, code: str) -> dict[str, object]:
    return {"coding": [{"system": system, "code": code}]}


@pytest.mark.parametrize("rtype", TYPES)
def test_every_medication_resource_type_is_read(engine: Engine, rtype: str) -> None:
    assert _outcome(engine, _med(rtype, _cc(RX, "1657746")))[0] == "pass"


@pytest.mark.parametrize(
    ("concept", "outcome"),
    [
        (_cc(RX, "1547550"), "pass"),  # brand
        (_cc(ATC, "L01FF09"), "pass"),  # tislelizumab
        (_cc(RX, "1919507"), "fail"),  # durvalumab: a PD-L1 antibody
        ({"text": "Camrelizumab 200 mg"}, "pass"),
        ({"text": "SHR-1210 200mg"}, "pass"),
        ({"text": "pembrolizumabX trial drug"}, "fail"),  # whole words only
        ({"coding": [{"system": "urn:local", "code": "1", "display": "KEYTRUDA 100MG"}]}, "pass"),
    ],
)
def test_codes_and_names_that_record_an_ingredient(
    engine: Engine, concept: dict[str, object], outcome: str
) -> None:
    assert _outcome(engine, _med("MedicationAdministration", concept))[0] == outcome


def test_a_class_code_alone_is_undecided_and_says_why(engine: Engine) -> None:
    outcome, reason = _outcome(engine, _med("MedicationStatement", _cc(ATC, "L01FF")))
    assert outcome == "unknown"
    assert "MedicationStatement/m" in reason and "class that also covers other drugs" in reason
    both = [
        _med("MedicationStatement", _cc(ATC, "L01FF")),
        {**_med("MedicationRequest", _cc(RX, "1547545")), "id": "r", "intent": "order"},
    ]
    assert _outcome(engine, *both)[0] == "pass"


def test_cancelled_or_declined_dispenses_do_not_count(engine: Engine) -> None:
    for status in ("cancelled", "declined", "entered-in-error"):
        med = _med("MedicationDispense", _cc(RX, "1547545"), status=status)
        assert _outcome(engine, med)[0] == "fail", status


def test_dispense_dated_after_the_as_of_date_is_not_known_yet(engine: Engine) -> None:
    med = _med("MedicationDispense", _cc(RX, "1547545"), whenHandedOver="2027-01-01")
    assert _outcome(engine, med)[0] == "fail"


def test_the_shipped_table_has_the_documented_header() -> None:
    lines = [ln for ln in TABLE.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    assert lines[0] == HEADER.strip()


def test_names_found_in_a_text_are_remembered_for_each_engines_names() -> None:
    """The search for medicine names is remembered per text (a population repeats a few hundred
    drug texts), and per pattern: engines whose trials ask for other names share the memory."""
    from fhirmatch.engine import _name_pattern, _names_in

    first, second = _name_pattern(["camrelizumab"]), _name_pattern(["pembrolizumab", "keytruda"])
    assert first is not None and second is not None
    text = "Camrelizumab 200 mg, then KEYTRUDA (pembrolizumab)"
    assert _names_in(first, text) == ["camrelizumab"]
    assert _names_in(second, text) == ["keytruda", "pembrolizumab"]
    assert _names_in(first, text) == ["camrelizumab"]
