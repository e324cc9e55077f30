"""Tests for fhirmatch.terminology: loading, expansion, membership, system/code normalisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhirmatch.errors import TerminologyError
from fhirmatch.terminology import (
    ICD10CM,
    LOINC,
    SNOMED,
    Terminology,
    normalise_code,
    normalise_system,
)

BASE = "http://example.org/fhir/ValueSet/"


def value_set(name: str, include: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    compose: dict[str, Any] = {"include": include}
    if "exclude" in extra:
        compose["exclude"] = extra.pop("exclude")
    return {"resourceType": "ValueSet", "url": BASE + name, "status": "active",
            "compose": compose, **extra}  # fmt: skip


def icd_is_a(*codes: str, op: str = "is-a") -> dict[str, Any]:
    return {
        "system": ICD10CM,
        "filter": [{"property": "concept", "op": op, "value": c} for c in codes],
    }


def concepts(system: str, *codes: str) -> dict[str, Any]:
    return {"system": system, "concept": [{"code": c} for c in codes]}


@pytest.fixture
def terminology(tmp_path: Path) -> Terminology:
    resources = [
        value_set("esophageal", [icd_is_a("C15"), concepts(SNOMED, "363402007")]),
        value_set("stomach", [icd_is_a("C16")]),
        value_set("skin", [icd_is_a("C44")], exclude=[concepts(ICD10CM, "C44.01")]),
        value_set("malignant", [icd_is_a("C15"), icd_is_a("C16"), icd_is_a("C44")]),
        value_set(
            "malignant-not-esophageal",
            [{"valueSet": [BASE + "malignant"]}],
            exclude=[{"valueSet": [BASE + "esophageal"]}, {"valueSet": [BASE + "skin"]}],
        ),
        value_set("platinum", [concepts("http://www.nlm.nih.gov/research/umls/rxnorm", "2555")]),
        value_set("taxane", [concepts("http://www.nlm.nih.gov/research/umls/rxnorm", "56946")]),
        value_set("chemo", [{"valueSet": [BASE + "platinum"]}, {"valueSet": [BASE + "taxane"]}]),
        value_set("below-c15", [icd_is_a("C15", op="descendent-of")]),
        value_set("both", [{"valueSet": [BASE + "esophageal"]}, concepts(ICD10CM, "D00.1")]),
        value_set(
            "inter", [{**concepts(ICD10CM, "C15.3", "C16.0"), "valueSet": [BASE + "esophageal"]}]
        ),
        value_set(
            "bad-snomed-is-a",
            [
                {
                    "system": SNOMED,
                    "filter": [{"property": "concept", "op": "is-a", "value": "363346000"}],
                }
            ],
        ),
        value_set("uses-bad", [{"valueSet": [BASE + "bad-snomed-is-a"]}]),
        value_set("dangling", [{"valueSet": [BASE + "does-not-exist"]}]),
        value_set("cycle-a", [{"valueSet": [BASE + "cycle-b"]}]),
        value_set("cycle-b", [{"valueSet": [BASE + "cycle-a"]}]),
        {
            "resourceType": "ValueSet",
            "url": BASE + "expanded|2.0",
            "expansion": {
                "contains": [
                    {"system": LOINC, "code": "718-7"},
                    {
                        "abstract": True,
                        "code": "group",
                        "contains": [{"system": LOINC, "code": "777-3"}],
                    },
                ]
            },
        },
    ]
    (tmp_path / "sub").mkdir()
    half = len(resources) // 2
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": r} for r in resources[:half]]}  # fmt: skip
    (tmp_path / "bundle.json").write_text(json.dumps(bundle), encoding="utf-8")
    for i, resource in enumerate(resources[half:]):
        (tmp_path / "sub" / f"vs{i}.json").write_text(json.dumps(resource), encoding="utf-8")
    (tmp_path / "sub" / "not-fhir.json").write_text('{"hello": 1}', encoding="utf-8")
    return Terminology.load([tmp_path])


def test_icd_is_a_matches_the_root_and_descendants_by_prefix(terminology: Terminology) -> None:
    url = BASE + "esophageal"
    assert terminology.contains(url, ICD10CM, "C15")
    assert terminology.contains(url, ICD10CM, "C15.9")
    assert terminology.contains(url, ICD10CM, "C159")
    assert terminology.contains(url, ICD10CM, " c15.3 ")
    assert not terminology.contains(url, ICD10CM, "C16.0")
    assert not terminology.contains(url, ICD10CM, "C1")
    # A SNOMED code with the same digits is not an ICD code.
    assert not terminology.contains(url, SNOMED, "C15.9")
    assert terminology.contains(url, SNOMED, "363402007")
    assert not terminology.contains(url, SNOMED, "363402008")


def test_descendent_of_excludes_the_root(terminology: Terminology) -> None:
    assert terminology.contains(BASE + "below-c15", ICD10CM, "C15.9")
    assert not terminology.contains(BASE + "below-c15", ICD10CM, "C15")


def test_exclude_codes_and_nested_value_sets(terminology: Terminology) -> None:
    assert terminology.contains(BASE + "skin", ICD10CM, "C44.02")
    assert not terminology.contains(BASE + "skin", ICD10CM, "C44.01")
    url = BASE + "malignant-not-esophageal"
    assert terminology.contains(url, ICD10CM, "C16.2")
    assert not terminology.contains(url, ICD10CM, "C15.9")
    assert not terminology.contains(url, ICD10CM, "C44.02")
    # C44.01 is excluded from "skin", so excluding "skin" does not remove it from "malignant".
    assert terminology.contains(url, ICD10CM, "C44.01")


def test_nested_value_sets_are_unioned(terminology: Terminology) -> None:
    assert terminology.expand(BASE + "chemo") == {
        ("http://www.nlm.nih.gov/research/umls/rxnorm", "2555"),
        ("http://www.nlm.nih.gov/research/umls/rxnorm", "56946"),
    }
    assert terminology.contains(BASE + "chemo", "urn:oid:2.16.840.1.113883.6.88", "56946")


def test_expand_lists_explicit_codes_and_is_a_roots_with_their_descendants(
    terminology: Terminology,
) -> None:
    esophageal = terminology.expand(BASE + "esophageal")
    assert {(ICD10CM, "C15"), (ICD10CM, "C15.5"), (ICD10CM, "C15.9")} <= esophageal
    assert (SNOMED, "363402007") in esophageal
    assert {s for s, c in esophageal if not c.startswith("C15") and c != "363402007"} == set()
    skin = terminology.expand(BASE + "skin")
    assert (ICD10CM, "C44") in skin and (ICD10CM, "C44.02") in skin
    assert (ICD10CM, "C44.01") not in skin  # excluded
    assert all(c.startswith("C44") for _s, c in skin)


def test_value_set_with_expansion(terminology: Terminology) -> None:
    url = BASE + "expanded"
    assert terminology.expand(url) == {(LOINC, "718-7"), (LOINC, "777-3")}
    assert terminology.contains(url + "|2.0", LOINC, "777-3")
    assert not terminology.contains(url, LOINC, "group")


def test_unknown_url_raises(terminology: Terminology) -> None:
    with pytest.raises(TerminologyError, match="unknown ValueSet"):
        terminology.expand(BASE + "nope")
    with pytest.raises(TerminologyError):
        terminology.contains(BASE + "nope", LOINC, "718-7")
    with pytest.raises(TerminologyError):
        terminology.matches(BASE + "nope", {"coding": []})


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("bad-snomed-is-a", "not available offline"),
        ("uses-bad", "not available offline"),
        ("dangling", "unknown ValueSet"),
        ("cycle-a", "cycle"),
    ],
)
def test_unusable_value_sets_are_reported_and_raise(
    terminology: Terminology, name: str, reason: str
) -> None:
    assert reason in terminology.problems[BASE + name]
    with pytest.raises(TerminologyError, match=reason):
        terminology.contains(BASE + name, SNOMED, "363346000")
    assert BASE + "esophageal" not in terminology.problems


def test_matches_any_coding(terminology: Terminology) -> None:
    concept = {
        "coding": [
            {"system": "http://hospital.example.org/dx", "code": "X1"},
            {"system": "urn:oid:2.16.840.1.113883.6.90", "code": "C15.5"},
        ]
    }
    assert terminology.matches(BASE + "esophageal", concept)
    assert not terminology.matches(BASE + "stomach", concept)
    assert not terminology.matches(BASE + "esophageal", {"text": "esophageal cancer"})
    assert not terminology.matches(BASE + "esophageal", None)
    assert not terminology.matches(BASE + "esophageal", {"coding": [{"system": ICD10CM}]})


def test_separate_includes_are_unioned(terminology: Terminology) -> None:
    assert terminology.contains(BASE + "both", ICD10CM, "D00.1")
    assert terminology.contains(BASE + "both", ICD10CM, "C15.8")
    assert not terminology.contains(BASE + "both", ICD10CM, "D00.2")


def test_value_set_and_concepts_in_one_include_are_intersected(terminology: Terminology) -> None:
    assert terminology.expand(BASE + "inter") == {(ICD10CM, "C15.3")}
    assert terminology.contains(BASE + "inter", ICD10CM, "C153")
    assert not terminology.contains(BASE + "inter", ICD10CM, "C16.0")
    assert not terminology.contains(BASE + "inter", ICD10CM, "C15.4")


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("urn:oid:2.16.840.1.113883.6.96", SNOMED),
        ("http://snomed.info/sct/", SNOMED),
        ("urn:oid:2.16.840.1.113883.6.1", LOINC),
        ("urn:oid:2.16.840.1.113883.6.90", ICD10CM),
        (" http://loinc.org ", LOINC),
        ("http://example.org/other", "http://example.org/other"),
    ],
)
def test_system_aliases(alias: str, canonical: str) -> None:
    assert normalise_system(alias) == canonical


def test_code_normalisation() -> None:
    assert normalise_code(ICD10CM, " c15.9 ") == "C159"
    assert normalise_code(SNOMED, " 363402007\n") == "363402007"
    assert normalise_code(LOINC, "718-7") == "718-7"


def test_duplicate_url_with_different_content_raises(tmp_path: Path) -> None:
    for i, code in enumerate(["C15", "C16"]):
        vs = value_set("dup", [icd_is_a(code)])
        (tmp_path / f"{i}.json").write_text(json.dumps(vs), encoding="utf-8")
    with pytest.raises(TerminologyError, match="defined twice"):
        Terminology.load([tmp_path])


def test_bad_json_and_missing_path_raise(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TerminologyError, match=r"broken\.json"):
        Terminology.load([tmp_path])
    with pytest.raises(TerminologyError, match="no such file"):
        Terminology.load([tmp_path / "missing"])


def test_default_mappings_load_without_problems() -> None:
    terminology = Terminology.load()
    assert terminology.problems == {}
    assert terminology.translate("http://hospital.example.org/fhir/CodeSystem/lab-codes", "ALT")


def test_mappings_dir_can_be_overridden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vs.json").write_text(json.dumps(value_set("only", [icd_is_a("C20")])), "utf-8")
    monkeypatch.setenv("FHIRMATCH_MAPPINGS", str(tmp_path))
    terminology = Terminology.load()
    assert terminology.value_set_urls == {BASE + "only"}


def test_with_value_sets_adds_a_trials_bundled_value_sets_and_keeps_the_maps() -> None:
    base = Terminology.load()
    bundled = {
        "resourceType": "ValueSet",
        "url": "https://example.org/fhir/ValueSet/local-stage",
        "compose": {
            "include": [
                {"system": "http://snomed.info/sct", "concept": [{"code": "1222841004"}]},
                {"valueSet": ["https://fhirmatch.dev/fhir/ValueSet/m1"]},
            ]
        },
    }
    extended = base.with_value_sets([bundled])
    assert "https://example.org/fhir/ValueSet/local-stage" not in base
    assert extended.contains(bundled["url"], "http://snomed.info/sct", "1229916009")  # via m1
    assert extended.referenced_value_sets(bundled["url"]) == {
        "https://fhirmatch.dev/fhir/ValueSet/m1"
    }
    local = "http://hospital.example.org/fhir/CodeSystem/lab-codes"
    assert extended.translate(local, "PLT") == base.translate(local, "PLT") != []
    clash = {**bundled, "url": "https://fhirmatch.dev/fhir/ValueSet/m1"}
    with pytest.raises(TerminologyError, match="defined twice"):
        base.with_value_sets([clash])


def test_diagnosis_wording_table(tmp_path: Path) -> None:
    """The wording table decides which text diagnoses are cancer-like; a bad row is an error."""
    term = Terminology.load()
    words = term.diagnosis_text()
    assert words.is_cancer_like("Squamous cell carcinoma of the esophagus, mid third")
    assert words.is_cancer_like("Rektumkarzinom") and words.is_cancer_like("食管癌")
    assert words.is_cancer_like("Ca oesophagus")
    assert not words.is_cancer_like("Calcium deficiency")
    assert not words.is_cancer_like("Family history of colon cancer")
    assert not words.is_cancer_like("Benign neoplasm of rectum")
    assert all(w.source for w in term.wordings)
    (tmp_path / "w.csv").write_text(
        "wording,kind,match,source\ncancer,cancer,anywhere,x\n", encoding="utf-8"
    )
    with pytest.raises(TerminologyError, match="data row 2"):
        Terminology.load([tmp_path])
