"""Property-based tests (hypothesis) for the unit and value parsers and for the evaluator.

The parsers must never raise anything but :class:`~fhirmatch.errors.UnitError` on any text,
read back the numbers they are shown, and keep censored values honest. The evaluator gets
random Observations and Conditions (codes drawn from the real value sets, values, units and
dates drawn from good and bad ones) against the real trials: no exception escapes, every
outcome is one of the four, statuses follow from the outcomes, and the verdict does not depend
on the order the resources arrive in.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirmatch.engine import Engine, trial_status
from fhirmatch.errors import UnitError
from fhirmatch.results import CriterionResult
from fhirmatch.trials import load_trials
from fhirmatch.units import ParsedValue, convert, normalise_unit, parse_value_string

REPO = Path(__file__).resolve().parents[2]
AS_OF = dt.date(2026, 11, 1)
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}

# --------------------------------------------------------------------------- units and values

UNITISH = st.text(alphabet="0123456789.,/*^[]{}()%µumgdLlIUkKnpfcsh -_'", max_size=24)


@settings(deadline=None)  # the first call loads the unit registry
@given(st.one_of(st.text(max_size=30), UNITISH))
def test_normalise_unit_raises_only_unit_error(text: str) -> None:
    try:
        result = normalise_unit(text)
    except UnitError as exc:
        assert exc.unit in (text, text.strip())
    else:
        assert isinstance(result, str) and result


@settings(deadline=None)  # the first call loads the unit registry
@given(
    value=st.floats(allow_nan=True, allow_infinity=True),
    src=st.one_of(UNITISH, st.sampled_from(["mg/dL", "g/L", "10*9/L", "umol/L", "%", "{score}"])),
    dst=st.sampled_from(["mg/dL", "g/dL", "10*9/L", "umol/L", "[IU]/mL", "{copies}/mL"]),
)
def test_convert_raises_only_unit_error(value: float, src: str, dst: str) -> None:
    try:
        out = convert(value, src, dst)
    except UnitError:
        return
    assert isinstance(out, float)
    if math.isfinite(value):
        assert math.isfinite(out) or abs(value) > 1e300


FINITE = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False).filter(lambda v: v != 0)


@settings(deadline=None)  # the first call loads the unit registry
@given(value=FINITE, cmp=st.sampled_from(["", "<", "<=", ">", ">="]))
def test_parse_value_string_reads_back_what_it_is_shown(value: float, cmp: str) -> None:
    parsed = parse_value_string(f"{cmp}{value!r}")
    assert parsed is not None
    assert math.isclose(parsed.value, value, rel_tol=1e-12)
    assert parsed.comparator == (cmp or None)


@settings(deadline=None)  # the first call loads the unit registry
@given(
    whole=st.integers(min_value=1, max_value=99999),
    frac=st.integers(min_value=0, max_value=99999).map(str).filter(lambda f: len(f) != 3),
)
def test_decimal_comma_equals_decimal_point(whole: int, frac: str) -> None:
    comma = parse_value_string(f"{whole},{frac}")
    point = parse_value_string(f"{whole}.{frac}")
    assert comma is not None and point is not None
    assert comma.value == point.value


@settings(deadline=None)  # the first call loads the unit registry
@given(whole=st.integers(min_value=1, max_value=999), group=st.integers(0, 999))
def test_ambiguous_thousands_comma_is_refused(whole: int, group: int) -> None:
    # "1,500": one and a half, or fifteen hundred? Never guessed.
    assert parse_value_string(f"{whole},{group:03d}") is None


@settings(deadline=None)  # the first call loads the unit registry
@given(
    limit=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    cmp=st.sampled_from(["<", "<=", ">", ">="]),
    op=st.sampled_from(list(OPS)),
    threshold=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    probes=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1),
)
def test_censored_comparison_never_claims_more_than_it_knows(
    limit: float, cmp: str, op: str, threshold: float, probes: list[float]
) -> None:
    """When ``compare`` answers True (False), every true value the censored result allows
    satisfies (violates) the test."""
    verdict = ParsedValue(limit, cmp).compare(op, threshold)  # type: ignore[arg-type]
    if verdict is None:
        return
    below = cmp in ("<", "<=")
    for p in probes:
        true_value = limit - p if below else limit + p
        if true_value == limit and cmp in ("<", ">"):
            continue  # the limit itself is excluded (also when p is below float resolution)
        assert OPS[op](true_value, threshold) is verdict, (true_value, op, threshold)


@settings(deadline=None)  # the first call loads the unit registry
@given(value=FINITE, op=st.sampled_from(list(OPS)), threshold=FINITE)
def test_exact_comparison_is_plain_arithmetic(value: float, op: str, threshold: float) -> None:
    assert ParsedValue(value).compare(op, threshold) is OPS[op](value, threshold)


# --------------------------------------------------------------------------- the evaluator


def _value_set_codes() -> list[tuple[str, str]]:
    codes: set[tuple[str, str]] = set()
    for path in sorted((REPO / "mappings" / "valuesets").glob("*.json")):
        vs = json.loads(path.read_text(encoding="utf-8"))
        for inc in (vs.get("compose") or {}).get("include", []):
            for concept in inc.get("concept", []):
                codes.add((inc.get("system", ""), concept["code"]))
    return sorted(codes)


CODES = _value_set_codes()
UNITS = ["10*9/L", "10*3/uL", "g/dL", "g/L", "mg/dL", "umol/L", "U/L", "%", "{score}", "mL/min"]
DATES = st.one_of(
    st.dates(min_value=dt.date(2020, 1, 1), max_value=dt.date(2027, 12, 31)).map(str),
    st.sampled_from(["2026", "2026-10", "2026-10-20T10:00:00", "2026-10-20T10:00:00+02:00"]),
    st.sampled_from(["", "yesterday", "20/10/2026", "2026-13-45"]),
)
CODING = st.sampled_from(CODES).map(lambda c: {"coding": [{"system": c[0], "code": c[1]}]})


@st.composite
def observations(draw: st.DrawFn, pid: str, n: int) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": draw(st.sampled_from(["final", "amended", "preliminary", "entered-in-error"])),
        "code": draw(CODING),
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": draw(DATES),
    }
    kind = draw(st.sampled_from(["quantity", "integer", "string", "coded", "none", "bad"]))
    number = draw(
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10, 1000))
    )
    if kind == "quantity":
        unit = draw(st.one_of(st.sampled_from(UNITS), UNITISH))
        quantity: dict[str, Any] = {"value": number, "unit": unit}
        if draw(st.booleans()):
            quantity.update(system="http://unitsofmeasure.org", code=unit)
        if draw(st.booleans()):
            quantity["comparator"] = draw(st.sampled_from(["<", "<=", ">", ">="]))
        obs["valueQuantity"] = quantity
        if draw(st.booleans()):
            obs["referenceRange"] = [
                {"high": {"value": draw(FINITE), "unit": draw(st.sampled_from(UNITS))}}
            ]
    elif kind == "integer":
        obs["valueInteger"] = draw(st.integers(-5, 200))
    elif kind == "string":
        obs["valueString"] = draw(st.one_of(st.text(max_size=12), UNITISH))
    elif kind == "coded":
        obs["valueCodeableConcept"] = draw(CODING)
    elif kind == "bad":
        obs["valueQuantity"] = draw(st.sampled_from([None, "7", [], {"value": "7"}, {}]))
    return obs


@st.composite
def conditions(draw: st.DrawFn, pid: str, n: int) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"c{n}",
        "code": draw(CODING),
        "subject": {"reference": f"Patient/{pid}"},
    }
    status = draw(st.sampled_from(["active", "recurrence", "remission", "resolved", None, "??"]))
    if status is not None:
        cond["clinicalStatus"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": status,
                }
            ]
        }
    if draw(st.booleans()):
        cond["onsetDateTime"] = draw(DATES)
    return cond


@st.composite
def patient_records(draw: st.DrawFn) -> list[dict[str, Any]]:
    pid = "p1"
    patient: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    birth = draw(st.one_of(st.none(), DATES))
    if birth is not None:
        patient["birthDate"] = birth
    gender = draw(st.sampled_from([None, "male", "female", "other", "unknown"]))
    if gender:
        patient["gender"] = gender
    if draw(st.integers(0, 9)) == 0:
        patient["deceasedBoolean"] = True
    n_obs = draw(st.integers(0, 12))
    n_cond = draw(st.integers(0, 4))
    resources = [patient]
    resources += [draw(observations(pid, i)) for i in range(n_obs)]
    resources += [draw(conditions(pid, i)) for i in range(n_cond)]
    return resources


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_trials([REPO / "fixtures" / "trials"]))


def _walk(criteria: list[CriterionResult]) -> Iterator[CriterionResult]:
    for c in criteria:
        yield c
        yield from _walk(c.criteria)


def _verdicts(engine: Engine, resources: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for result in engine.evaluate(resources, as_of=AS_OF):
        out[(result.study, "")] = result.status
        for c in _walk(result.criteria):
            assert (result.study, c.id) not in out, c.id  # one verdict per criterion
            out[(result.study, c.id)] = c.outcome
    return out


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(resources=patient_records(), order=st.randoms(use_true_random=False))
def test_evaluator_on_random_records(
    engine: Engine, resources: list[dict[str, Any]], order: Any
) -> None:
    snapshot = json.dumps(resources, sort_keys=True)
    results = engine.evaluate(resources, as_of=AS_OF)
    assert json.dumps(resources, sort_keys=True) == snapshot  # the input is not mutated
    assert len(results) == 5
    for result in results:
        outcomes = [c.outcome for c in result.criteria]
        for c in _walk(result.criteria):
            assert c.outcome in ("pass", "fail", "unknown", "manual")
        assert result.status == trial_status(outcomes)
    # the same data in another order: the same verdict for every criterion
    shuffled = list(resources)
    order.shuffle(shuffled)
    assert _verdicts(engine, shuffled) == _verdicts(engine, resources)
