"""Every ValueSet in mappings/valuesets: a code inside, a code outside, a descendant where the
value set is hierarchical (ICD-10-CM is-a), and the metadata every file must carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirmatch.terminology import Terminology

VS_DIR = Path(__file__).resolve().parents[2] / "mappings" / "valuesets"
BASE = "https://fhirmatch.dev/fhir/ValueSet/"
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
WHO = "http://hl7.org/fhir/sid/icd-10"
GA = "https://fhirmatch.dev/fhir/CodeSystem/geriatric-assessment"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
AJCC = "http://cancerstaging.org"
ING = "https://fhirmatch.dev/fhir/CodeSystem/medication-ingredient"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
UCUM = "http://unitsofmeasure.org"
V3I = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

# (value set, (system, code) inside, (system, code) outside, descendant inside or None)
CASES: list[tuple[str, tuple[str, str], tuple[str, str], tuple[str, str] | None]] = [
    (
        "administrative-gender-female",
        ("http://hl7.org/fhir/administrative-gender", "female"),
        ("http://hl7.org/fhir/administrative-gender", "male"),
        None,
    ),
    (
        "administrative-gender-male",
        ("http://hl7.org/fhir/administrative-gender", "male"),
        ("http://hl7.org/fhir/administrative-gender", "female"),
        None,
    ),
    ("wbc", (LOINC, "26464-8"), (LOINC, "751-8"), None),
    ("anc", (LOINC, "751-8"), (LOINC, "6690-2"), None),
    ("platelets", (LOINC, "777-3"), (LOINC, "32623-1"), None),
    ("hemoglobin", (LOINC, "718-7"), (LOINC, "5794-3"), None),
    ("albumin", (LOINC, "1751-7"), (LOINC, "14959-1"), None),
    ("bilirubin-total", (LOINC, "1975-2"), (LOINC, "20505-4"), None),
    ("alt", (LOINC, "1742-6"), (LOINC, "1920-8"), None),
    ("ast", (LOINC, "1920-8"), (LOINC, "1742-6"), None),
    ("alp", (LOINC, "6768-6"), (LOINC, "1742-6"), None),
    ("creatinine", (LOINC, "2160-0"), (LOINC, "2164-2"), None),
    ("creatinine-clearance", (LOINC, "2164-2"), (LOINC, "33914-3"), None),
    ("hbv-dna-iu", (LOINC, "42595-9"), (LOINC, "29615-2"), None),
    ("hbv-dna-copies", (LOINC, "29615-2"), (LOINC, "42595-9"), None),
    ("bilirubin-direct", (LOINC, "1968-7"), (LOINC, "1975-2"), None),
    ("ggt", (LOINC, "2324-2"), (LOINC, "6768-6"), None),
    ("ldh", (LOINC, "2532-0"), (LOINC, "2324-2"), None),
    ("glucose", (LOINC, "2345-7"), (LOINC, "3094-0"), None),
    ("calcium", (LOINC, "17861-6"), (LOINC, "2345-7"), None),
    ("urea-nitrogen", (LOINC, "3094-0"), (LOINC, "2160-0"), None),
    ("uric-acid", (LOINC, "3084-1"), (LOINC, "3094-0"), None),
    ("cholesterol-total", (LOINC, "2093-3"), (LOINC, "2345-7"), None),
    ("hiv", (SCT, "86406008"), (SCT, "61977001"), (ICD, "B20")),
    ("hcv-antibody", (LOINC, "16128-1"), (LOINC, "11011-4"), None),
    ("hcv-rna", (LOINC, "11011-4"), (LOINC, "16128-1"), None),
    ("hcg", (LOINC, "2106-3"), (LOINC, "718-7"), None),
    ("positive-result", (SCT, "10828004"), (SCT, "260385009"), None),
    ("ecog", (LOINC, "89247-1"), (LOINC, "89243-0"), (SCT, "423740007")),
    ("ecog-answers", (LOINC, "LA9622-7"), (LOINC, "LA29175-9"), (SCT, "422512005")),
    ("karnofsky-answers", (LOINC, "LA29178-3"), (LOINC, "LA9622-7"), (LOINC, "LA9627-6")),
    ("karnofsky", (LOINC, "89243-0"), (LOINC, "89247-1"), None),
    ("tnm-stage-group", (SCT, "399537006"), (SCT, "399387003"), None),
    ("tnm-distant-metastases", (SCT, "399387003"), (SCT, "399537006"), None),
    ("stage-ivb", (SCT, "1352836005"), (SCT, "1222806003"), None),
    ("m1", (SCT, "1229903009"), (SCT, "1229901006"), None),
    ("esophageal-cancer", (ICD, "C15"), (ICD, "C16.9"), (WHO, "C15.5")),
    ("squamous-cell-carcinoma-morphology", (SCT, "28899001"), (SCT, "1187332001"), None),
    ("esophageal-squamous-cell-carcinoma", (SCT, "276804009"), (SCT, "276803003"), None),
    ("esophagogastric-junction-cancer", (ICD, "C16.0"), (ICD, "C16.1"), (WHO, "C16.0")),
    ("g8-score", (GA, "g8-total-score"), (SCT, "273531005"), None),
    ("late-radiation-toxicity-bowel-bladder", (ICD, "N30.41"), (ICD, "K62.7"), (WHO, "K52.0")),
    ("esophagectomy", (SCT, "45900003"), (SCT, "48114000"), None),
    ("rectal-cancer", (ICD, "C20"), (ICD, "C18.7"), (ICD, "C19")),
    ("colorectal-cancer", (ICD, "C18"), (ICD, "C15.9"), (ICD, "C18.7")),
    ("brain-metastasis", (SCT, "94225005"), (SCT, "94222008"), (ICD, "C79.31")),
    ("bone-metastasis", (SCT, "94222008"), (SCT, "94225005"), (ICD, "C79.51")),
    ("secondary-malignant-neoplasm", (ICD, "C78"), (ICD, "C15.9"), (ICD, "C78.7")),
    ("spinal-cord-compression", (SCT, "71286001"), (ICD, "G95.0"), (ICD, "G95.20")),
    ("interstitial-lung-disease", (ICD, "J84"), (ICD, "J18.9"), (ICD, "J84.10")),
    ("autoimmune-disease", (SCT, "64766004"), (SCT, "38341003"), (ICD, "K51.90")),
    ("immunodeficiency", (ICD, "B20"), (ICD, "B18.2"), (ICD, "D84.9")),
    ("organ-transplant", (ICD, "Z94.0"), (ICD, "Z94.81"), (ICD, "D89.811")),
    ("hepatitis-b", (SCT, "61977001"), (SCT, "128302006"), (ICD, "B16.9")),
    ("hepatitis-c", (SCT, "128302006"), (SCT, "61977001"), (ICD, "B18.2")),
    ("pregnancy", (SCT, "77386006"), (SCT, "38341003"), (ICD, "Z34.00")),
    ("lactation", (ICD, "Z39.1"), (ICD, "Z39.2"), None),
    ("malignant-neoplasm", (ICD, "C34"), (ICD, "C79.31"), (WHO, "C34.9")),
    ("non-melanoma-skin-cancer", (ICD, "C44"), (ICD, "C43.9"), (ICD, "C44.91")),
    ("prostate-cancer", (ICD, "C61"), (ICD, "C67.9"), None),
    ("malignancy-other-than-esophageal", (ICD, "C34"), (ICD, "C15.9"), (ICD, "C43.9")),
    ("malignancy-other-than-rectal", (ICD, "C15"), (ICD, "C20"), (ICD, "C15.9")),
    ("cervical-carcinoma-in-situ", (ICD, "D06"), (ICD, "C53.9"), (ICD, "D06.9")),
    (
        "radiotherapy",
        (SCT, "53438000"),
        (SCT, "180256009"),
        ("http://www.ama-assn.org/go/cpt", "77427"),
    ),
    ("thoracic-body-site", (SCT, "44029006"), (SCT, "12921003"), (SCT, "80248007")),
    ("pelvic-body-site", (SCT, "12921003"), (SCT, "78904004"), (SCT, "719537008")),
    ("platinum", (ING, "cisplatin"), (ING, "paclitaxel"), None),
    ("taxane", (ING, "paclitaxel"), (ING, "cisplatin"), None),
    ("fluoropyrimidine", (ING, "capecitabine"), (ING, "gemcitabine"), None),
    ("doublet-partner", (ING, "fluorouracil"), (ING, "cisplatin"), None),
    ("chemotherapy-doublet", (ING, "oxaliplatin"), (ING, "cyclophosphamide"), None),
    ("anti-pd1", (ING, "camrelizumab"), (ING, "durvalumab"), None),
    ("allergy-mab-chemo", (RX, "194000"), (RX, "723"), None),
    ("drug-allergy", (SCT, "416098002"), (SCT, "91935009"), None),
    ("malignancy-history-other-than-esophageal", (ICD, "Z85.118"), (ICD, "Z85.01"), (WHO, "Z85.1")),
    ("malignancy-history-unclear-for-esophageal", (WHO, "Z85.0"), (WHO, "Z85.1"), None),
    ("malignancy-history-other-than-rectal", (ICD, "Z85.038"), (ICD, "Z85.040"), (WHO, "Z85.3")),
    ("malignancy-history-unclear-for-rectal", (ICD, "Z85.048"), (ICD, "Z85.038"), None),
    ("radiotherapy-history", (ICD, "Z92.3"), (ICD, "Z92.21"), (WHO, "Z92.3")),
    ("transplant-type-unclear", (ICD, "Z94.81"), (ICD, "Z94.0"), (WHO, "Z94.8")),
    ("negative-result", (SCT, "260385009"), (SCT, "10828004"), None),
    ("condition-inactive", (CLINICAL, "resolved"), (CLINICAL, "active"), None),
    ("pregnancy-status", (LOINC, "82810-3"), (LOINC, "2106-3"), None),
    ("breastfeeding-status", (LOINC, "63895-7"), (LOINC, "82810-3"), None),
    ("hcg-quantitative", (LOINC, "21198-7"), (LOINC, "2106-3"), None),
    ("distant-metastasis", (ICD, "C78"), (ICD, "C77.1"), (ICD, "C78.7")),
    ("cancer-disease-status", (LOINC, "97509-4"), (LOINC, "82810-3"), None),
    ("disease-progression", (SCT, "271299001"), (SCT, "268910001"), None),
    ("disease-response", (SCT, "268910001"), (SCT, "359746009"), None),
    ("msi-status", (LOINC, "81695-9"), (LOINC, "81691-8"), None),
    ("msi-stable", (LOINC, "LA14122-8"), (LOINC, "LA26202-4"), None),
    ("msi-high", (LOINC, "LA26203-2"), (LOINC, "LA26202-4"), None),
    ("mmr-ihc-mlh1", (LOINC, "81691-8"), (LOINC, "81692-6"), None),
    ("mmr-ihc-msh2", (LOINC, "81692-6"), (LOINC, "81693-4"), None),
    ("mmr-ihc-msh6", (LOINC, "81693-4"), (LOINC, "81694-2"), None),
    ("mmr-ihc-pms2", (LOINC, "81694-2"), (LOINC, "81691-8"), None),
    ("mmr-ihc", (LOINC, "81694-2"), (LOINC, "81695-9"), None),
    ("unit-cgy", (UCUM, "cGy"), (UCUM, "Gy"), None),
    ("unit-gy", (UCUM, "Gy"), (UCUM, "cGy"), None),
    ("chemo-immunotherapy", (ING, "cisplatin"), (ING, "cyclophosphamide"), None),
    ("disease-not-progressed", (SCT, "359746009"), (SCT, "271299001"), None),
    ("disease-status-value", (SCT, "709137006"), (SCT, "10828004"), None),
    ("stage-below-iv", (SCT, "1222805004"), (SCT, "1222837003"), None),
    ("metastasis-site-lung", (ICD, "C78.0"), (ICD, "C78.1"), (ICD, "C78.02")),
    ("metastasis-site-mediastinum", (ICD, "C78.1"), (ICD, "C78.0"), None),
    ("metastasis-site-pleura", (ICD, "C78.2"), (ICD, "C78.3"), None),
    ("metastasis-site-small-intestine", (ICD, "C78.4"), (ICD, "C78.5"), None),
    ("metastasis-site-large-intestine", (ICD, "C78.5"), (ICD, "C78.4"), None),
    ("metastasis-site-peritoneum", (ICD, "C78.6"), (ICD, "C78.7"), None),
    ("metastasis-site-liver", (SCT, "94381002"), (ICD, "C78.6"), (WHO, "C78.7")),
    ("metastasis-site-kidney", (ICD, "C79.0"), (ICD, "C79.1"), (ICD, "C79.01")),
    ("metastasis-site-urinary", (ICD, "C79.1"), (ICD, "C79.0"), (ICD, "C79.11")),
    ("metastasis-site-skin", (ICD, "C79.2"), (ICD, "C79.3"), None),
    ("metastasis-site-brain", (ICD, "C79.3"), (ICD, "C79.5"), (ICD, "C79.31")),
    ("metastasis-site-nervous-system", (ICD, "C79.4"), (ICD, "C79.3"), (ICD, "C79.49")),
    ("metastasis-site-bone", (ICD, "C79.5"), (ICD, "C79.3"), (ICD, "C79.51")),
    ("metastasis-site-ovary", (ICD, "C79.6"), (ICD, "C79.7"), (ICD, "C79.61")),
    ("metastasis-site-adrenal", (ICD, "C79.7"), (ICD, "C79.6"), (ICD, "C79.71")),
    ("metastasis-site-known", (ICD, "C78.7"), (ICD, "C77.1"), (ICD, "C79.51")),
    ("cardiovascular-disease-serious", (ICD, "I50"), (ICD, "I10"), (ICD, "I21.4")),
    ("infection", (ICD, "A41"), (ICD, "C15"), (WHO, "J18.9")),
    ("ulceration", (ICD, "K25"), (ICD, "K29"), (ICD, "L89.152")),
    ("diabetes-mellitus", (SCT, "44054006"), (ICD, "E03"), (ICD, "E11.9")),
    ("mental-disorder-serious", (ICD, "F32"), (ICD, "F17.210"), (ICD, "F20.9")),
    ("heart-failure-or-cardiomyopathy", (ICD, "I50"), (ICD, "I10"), (ICD, "I50.9")),
    ("chronic-lung-disease", (ICD, "J44"), (ICD, "J45"), (ICD, "J44.9")),
    ("liver-disease", (ICD, "K74"), (ICD, "K80"), (ICD, "K74.60")),
    ("kidney-failure", (ICD, "N18"), (ICD, "N20"), (ICD, "N18.6")),
    ("hematopoietic-disease", (ICD, "D64"), (ICD, "D10"), (ICD, "C91.00")),
    ("cachexia", (ICD, "R64"), (ICD, "R63"), None),
    ("condition-recurrence", (CLINICAL, "recurrence"), (CLINICAL, "active"), None),
    ("adenocarcinoma-morphology", (SCT, "35917007"), (SCT, "28899001"), None),
    ("m0", (SCT, "1229901006"), (SCT, "1229903009"), None),
    ("interpretation-abnormal", (V3I, "H"), (V3I, "N"), None),
]


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return Terminology.load()


def test_every_value_set_file_is_covered_by_a_case() -> None:
    names = {p.stem for p in VS_DIR.glob("*.json")}
    assert names == {c[0] for c in CASES}


@pytest.mark.parametrize(
    ("name", "inside", "outside", "descendant"), CASES, ids=[c[0] for c in CASES]
)
def test_membership(
    terminology: Terminology,
    name: str,
    inside: tuple[str, str],
    outside: tuple[str, str],
    descendant: tuple[str, str] | None,
) -> None:
    url = BASE + name
    assert terminology.contains(url, *inside)
    assert not terminology.contains(url, *outside)
    if descendant is not None:
        assert terminology.contains(url, *descendant)


def test_qualitative_answers_and_staging_codes_as_real_feeds_send_them(
    terminology: Terminology,
) -> None:
    positive, negative = BASE + "positive-result", BASE + "negative-result"
    interpretation = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
    assert terminology.contains(positive, interpretation, "POS")
    assert terminology.contains(negative, interpretation, "ND")
    assert terminology.contains(positive, SCT, "77386006")  # US Core pregnancy status: pregnant
    assert terminology.contains(negative, SCT, "60001007")  # not pregnant
    for unknown in ("261665006", "82334004"):  # unknown, indeterminate: neither
        assert not terminology.contains(positive, SCT, unknown)
        assert not terminology.contains(negative, SCT, unknown)
    assert terminology.contains(BASE + "m1", SCT, "1229916009")  # mCODE pM1
    assert terminology.contains(BASE + "tnm-distant-metastases", SCT, "371497001")  # pM category
    assert terminology.contains(BASE + "stage-ivb", SCT, "1222841004")  # AJCC stage IVB
    assert terminology.contains(BASE + "distant-metastasis", WHO, "C79.3")  # WHO ICD-10 site


def test_malignancy_exclusions(terminology: Terminology) -> None:
    url = BASE + "malignancy-other-than-esophageal"
    assert not terminology.contains(url, ICD, "C44.91")  # non-melanoma skin cancer excepted
    assert not terminology.contains(url, ICD, "D06.9")  # cervical CIS is not a malignancy code
    assert not terminology.contains(url, ICD, "C78.7")  # metastasis of the trial's own cancer
    assert terminology.contains(url, ICD, "C61")  # prostate stays; its 'cured' test is FHIRPath


@pytest.mark.parametrize("path", sorted(VS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_metadata(path: Path) -> None:
    vs = json.loads(path.read_text(encoding="utf-8"))
    assert vs["resourceType"] == "ValueSet"
    assert vs["url"] == BASE + path.stem
    assert vs["id"] == path.stem
    assert vs["status"] == "active"
    assert vs["description"].strip()
    assert "license" in vs["copyright"].lower() or "public domain" in vs["copyright"].lower()


def test_icd_hierarchy_comes_from_the_classification(terminology: Terminology) -> None:
    mal = BASE + "malignant-neoplasm"
    assert terminology.contains(mal, ICD, "C7A.010")  # block C7A, malignant carcinoid
    assert terminology.contains(mal, WHO, "C97")  # WHO: independent multiple primaries
    assert not terminology.contains(mal, ICD, "C7B.01")  # secondary neuroendocrine tumour
    assert not terminology.contains(mal, WHO, "C80.9")  # unspecified site
    assert not terminology.contains(mal, ICD, "D09.0")  # in situ
    codes = terminology.expand(mal)
    assert (ICD, "C34.12") in codes and (WHO, "C34.1") in codes  # descendants are enumerated
    assert terminology.contains(BASE + "esophageal-cancer", ICD, "C15.5X")  # unknown code


def test_an_icd_filter_on_something_the_classification_lacks_is_an_error(
    tmp_path: Path,
) -> None:
    for value, why in (("C15.X", "is not a code"), ("C00-C75", "heading with no codes")):
        vs = {
            "resourceType": "ValueSet",
            "url": "https://example.org/vs",
            "compose": {
                "include": [
                    {
                        "system": ICD,
                        "filter": [{"property": "concept", "op": "is-a", "value": value}],
                    }
                ]
            },
        }
        (tmp_path / "vs.json").write_text(json.dumps(vs), encoding="utf-8")
        problems = Terminology.load([tmp_path]).problems
        assert why in problems["https://example.org/vs"], problems
