"""Tests for fhirmatch.units: aliases, UCUM parsing, conversions, forbidden rules, valueString."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhirmatch import units
from fhirmatch.errors import UnitError
from fhirmatch.units import (
    ParsedValue,
    analyte_info,
    conversion_factor,
    convert,
    default_uln,
    known_analytes,
    normalise_unit,
    parse_unit,
    parse_value_string,
)

ALIASES = {
    "K/uL": "10*3/uL",
    "x10E3/uL": "10*3/uL",
    "10^3/uL": "10*3/uL",
    "10^9/L": "10*9/L",
    "x10^9/L": "10*9/L",
    "10E9/L": "10*9/L",
    "/mm3": "/mm3",
    "cells/uL": "{cells}/uL",
    "IU/mL": "[IU]/mL",
    "mcg": "ug",
    "ug/dL": "ug/dL",
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "umol/L": "umol/L",
    "µmol/L": "umol/L",
    "mmol/l": "mmol/L",
    "U/L": "U/L",
    "IU/L": "[IU]/L",
    "copies/mL": "{copies}/mL",
    "mL/min": "mL/min",
    "mL/min/1.73m2": "mL/min/{1.73_m2}",
    "%": "%",
    "{score}": "{score}",
    "g/L": "g/L",
    "/uL": "/uL",
    "pH": "[pH]",
    "(score)": "{score}",
}


@pytest.mark.parametrize(("alias", "ucum"), sorted(ALIASES.items()))
def test_every_alias_parses_to_its_ucum_code(alias: str, ucum: str) -> None:
    assert normalise_unit(alias) == ucum
    assert parse_unit(alias) == parse_unit(ucum)


# Every unit code seen on a valueQuantity in the shared Synthea, mCODE and MITRE data.
SEEN_IN_SAMPLE_DATA = [
    "mg/dL", "mmol/L", "mm[Hg]", "{score}", "fL", "cm", "kg", "kg/m2", "g/dL", "%", "10*3/uL",
    "U/L", "10*6/uL", "pg", "mL/min/{1.73_m2}", "mL/min", "g/L", "Cel", "kU/L", "{nominal}",
    "mg/g", "ng/mL", "(score)", "mm", "pH", "pg/mL", "{count}", "cGy", "{T-score}", "[lb_av]",
    "1", "1/1000000{Base}", "ng/dl", "m[IU]/L", "g/dl", "[in_i]", "m^2", "m2",
]  # fmt: skip


@pytest.mark.parametrize("code", SEEN_IN_SAMPLE_DATA)
def test_units_seen_in_sample_data_parse(code: str) -> None:
    parse_unit(code)
    assert normalise_unit(code)


def test_case_matters_in_ucum() -> None:
    # "K" is kelvin in UCUM; "K/uL" must come from the alias table, not UCUM.
    assert parse_unit("K/uL") == parse_unit("10*3/uL")
    assert parse_unit("K").dimensionality == parse_unit("Cel").dimensionality
    # Case-insensitive fallback reaches the alias table only.
    assert normalise_unit("MG/DL") == "mg/dL"
    assert normalise_unit(" k/ul ") == "10*3/uL"


def test_raw_pint_pitfalls_are_avoided() -> None:
    assert convert(1, "10*9/L", "/L") == pytest.approx(1e9)
    assert str(parse_unit("pH").dimensionality) == "[pH]"


@pytest.mark.parametrize("bad", ["", "   ", "furlongs per fortnight", "mg/", "10**9/L", "xyz"])
def test_unknown_or_empty_unit_raises(bad: str) -> None:
    with pytest.raises(UnitError):
        parse_unit(bad)
    with pytest.raises(UnitError):
        convert(1.0, bad, "mg/dL")


def test_unit_error_message_names_the_unit() -> None:
    with pytest.raises(UnitError, match="xyz"):
        parse_unit("xyz")


@pytest.mark.parametrize(
    ("value", "src", "dst", "analyte", "expected"),
    [
        (1.0, "mg/dL", "umol/L", "creatinine", 88.40),
        (88.4, "umol/L", "mg/dL", "creatinine", 1.0),
        (1.0, "mg/dL", "µmol/L", "bilirubin-total", 17.10),
        (17.1, "umol/L", "mg/dL", "bilirubin-total", 1.0),
        (100.0, "mg/dL", "mmol/L", "glucose", 5.551),
        (5.551, "mmol/L", "mg/dL", "glucose", 100.0),
        (4.0, "10*9/L", "10*3/uL", None, 4.0),
        (4.0, "10*3/uL", "10*9/L", None, 4.0),
        (4.0, "10*9/L", "/mm3", None, 4000.0),
        (4000.0, "/mm3", "10*9/L", None, 4.0),
        (1500.0, "cells/uL", "10*9/L", None, 1.5),
        (150.0, "K/uL", "x10^9/L", None, 150.0),
        (9.0, "g/dL", "g/L", None, 90.0),
        (90.0, "g/L", "g/dL", None, 9.0),
        (12.0, "{score}", "1", None, 12.0),
        (50.0, "%", "1", None, 0.5),
        (60.0, "mL/min/1.73m2", "mL/min", None, 60.0),
        (1000.0, "mcg", "mg", None, 1.0),
        (40.0, "IU/L", "U/L", "alt", 40.0),
        (120.0, "U/L", "IU/L", "alp", 120.0),
        (2.0, "IU/mL", "IU/L", "hbv-dna", 2000.0),
        (37.0, "Cel", "[degF]", None, 98.6),
    ],
)
def test_known_conversions(
    value: float, src: str, dst: str, analyte: str | None, expected: float
) -> None:
    assert convert(value, src, dst, analyte=analyte) == pytest.approx(expected, rel=2e-3)


def test_creatinine_factor_is_88_42() -> None:
    factor = conversion_factor("mg/dL", "umol/L", analyte="creatinine")
    assert factor == pytest.approx(88.42, abs=0.05)


@pytest.mark.parametrize(
    ("src", "dst", "analyte", "reason"),
    [
        ("IU/mL", "copies/mL", "hbv-dna", "forbidden"),
        ("copies/mL", "IU/mL", "hcv-rna", "forbidden"),
        ("IU/mL", "copies/mL", None, "forbidden"),
        ("IU/L", "U/L", None, "forbidden"),
        ("IU/L", "U/L", "creatinine", "forbidden"),
        ("IU/mL", "/mL", None, "incompatible"),
        ("[arb'U]/mL", "/mL", None, "forbidden"),
        ("mg/dL", "umol/L", None, "molar mass"),
        ("g/dL", "umol/L", "albumin", "molar mass"),
        ("mg/dL", "U/L", None, "incompatible"),
        ("mg/dL", "10*9/L", None, "incompatible"),
        ("mg/dL", "mg/dL", "no-such-analyte", "unknown analyte"),
    ],
)
def test_refused_conversions(src: str, dst: str, analyte: str | None, reason: str) -> None:
    with pytest.raises(UnitError, match=reason):
        convert(1.0, src, dst, analyte=analyte)


def test_refusal_is_repeatable_from_cache() -> None:
    for _ in range(3):
        with pytest.raises(UnitError, match="forbidden"):
            conversion_factor("IU/mL", "copies/mL", analyte="hbv-dna")


def test_conversion_factor_refuses_offset_units() -> None:
    with pytest.raises(UnitError, match="multiplicative"):
        conversion_factor("Cel", "[degF]")
    assert convert(0.0, "Cel", "K") == pytest.approx(273.15)


def test_parse_unit_keeps_power_of_ten_factor() -> None:
    assert convert(2.0, "1/1000000{Base}", "1") == pytest.approx(2e-6)
    assert parse_unit("1/1000000{Base}") == parse_unit("1") / parse_unit("10*6")


def test_analyte_table() -> None:
    info = analyte_info("creatinine")
    assert info.molar_mass_g_per_mol == pytest.approx(113.12)
    assert "2160-0" in info.loinc
    assert info.uln_source
    assert default_uln("alt") == (40.0, "U/L")
    assert default_uln("bilirubin-total") == (1.2, "mg/dL")
    assert default_uln("creatinine", sex="female") == (1.1, "mg/dL")
    assert default_uln("creatinine", sex="unknown") == (1.2, "mg/dL")
    assert default_uln("platelets") is None
    with pytest.raises(UnitError):
        analyte_info("unobtainium")


def test_every_analyte_unit_and_uln_unit_parses() -> None:
    required = {"creatinine", "bilirubin-total", "alt", "ast", "alp", "albumin", "hemoglobin"}
    required |= {"wbc", "anc", "platelets", "hbv-dna", "hcv-rna", "creatinine-clearance"}
    codes = set(known_analytes())
    assert required <= codes
    for code in codes:
        info = analyte_info(code)
        parse_unit(info.unit)
        if info.uln is not None:
            convert(info.uln[0], info.uln[1], info.unit, analyte=code)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.3", ParsedValue(12.3)),
        ("12,3", ParsedValue(12.3)),
        (" 7 ", ParsedValue(7.0)),
        ("<0.5", ParsedValue(0.5, "<")),
        (">1000", ParsedValue(1000.0, ">")),
        (">= 10", ParsedValue(10.0, ">=")),
        ("≤5 mg/dL", ParsedValue(5.0, "<=", "mg/dL")),
        ("1.5 x10^9/L", ParsedValue(1.5, None, "10*9/L")),
        ("88 µmol/L", ParsedValue(88.0, None, "umol/L")),
        ("1,234.5", ParsedValue(1234.5)),
        ("1.234,5", ParsedValue(1234.5)),
        ("0,123", ParsedValue(0.123)),
        ("-2", ParsedValue(-2.0)),
        ("2.5e3 copies/mL", ParsedValue(2500.0, None, "{copies}/mL")),
    ],
)
def test_parse_value_string(text: str, expected: ParsedValue) -> None:
    parsed = parse_value_string(text)
    assert parsed is not None
    assert parsed.value == pytest.approx(expected.value)
    assert (parsed.comparator, parsed.unit) == (expected.comparator, expected.unit)


@pytest.mark.parametrize(
    "text", ["", "positive", "Not detected", "1,000", "1.2.3", "12 apples", "<", "nan", "inf"]
)
def test_parse_value_string_rejects_garbage(text: str) -> None:
    assert parse_value_string(text) is None


@pytest.mark.parametrize(
    ("value", "op", "threshold", "expected"),
    [
        ("<0.5", "<=", 1.0, True),
        ("<0.5", "<", 0.5, True),
        ("<0.5", ">=", 0.3, None),
        ("<0.5", ">=", 0.5, False),
        ("<=0.5", ">=", 0.5, None),
        ("<=0.5", ">", 0.5, False),
        (">1000", ">=", 1000.0, True),
        (">1000", "<=", 1000.0, False),
        (">1000", "<", 2000.0, None),
        ("3", ">=", 3.0, True),
        ("3", ">", 3.0, False),
        ("3", "==", 3.0, True),
    ],
)
def test_censored_comparison(value: str, op: str, threshold: float, expected: bool | None) -> None:
    parsed = parse_value_string(value)
    assert parsed is not None
    assert parsed.compare(op, threshold) is expected


def test_parsed_value_unit_conversion_keeps_comparator() -> None:
    parsed = parse_value_string("<17.1 umol/L")
    assert parsed is not None
    converted = parsed.to_unit("mg/dL", analyte="bilirubin-total")
    assert converted.comparator == "<"
    assert converted.unit == "mg/dL"
    assert converted.value == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(UnitError):
        ParsedValue(1.0).to_unit("mg/dL")


ROUND_TRIP_PAIRS = [
    ("mg/dL", "umol/L", "creatinine"),
    ("mg/dL", "umol/L", "bilirubin-total"),
    ("10*9/L", "/mm3", None),
    ("g/dL", "g/L", None),
    ("IU/L", "U/L", "ast"),
    ("Cel", "[degF]", None),
    ("mL/min", "L/h", None),
]


@given(
    value=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    pair=st.sampled_from(ROUND_TRIP_PAIRS),
)
def test_convert_round_trip_is_identity(value: float, pair: tuple[str, str, str | None]) -> None:
    src, dst, analyte = pair
    back = convert(convert(value, src, dst, analyte=analyte), dst, src, analyte=analyte)
    assert math.isclose(back, value, rel_tol=1e-9, abs_tol=1e-9)


@given(st.text(max_size=60))
def test_parse_value_string_never_raises(text: str) -> None:
    result = parse_value_string(text)
    assert result is None or math.isfinite(result.value)


@given(st.text(alphabet="0123456789.,<>=≤≥ -eE/Lmgdµu%*^x", max_size=20))
def test_parse_value_string_never_raises_on_numberish_text(text: str) -> None:
    result = parse_value_string(text)
    assert result is None or isinstance(result, ParsedValue)


def test_plausible_ceilings_are_above_real_extremes() -> None:
    """A ceiling must never refuse a real result: leukaemic WBC reach the hundreds x10^9/L."""
    assert units.analyte_info("wbc").plausible_max == 1000
    assert units.analyte_info("platelets").plausible_max == 10000
    for code in units.known_analytes():
        info = units.analyte_info(code)
        if info.plausible_max is not None and info.uln is not None:
            uln = units.convert(info.uln[0], info.uln[1], info.unit, analyte=code)
            assert info.plausible_max > 20 * uln, code
