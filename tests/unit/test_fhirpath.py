"""The FHIRPath compiler (fhirmatch.fhirpath) against fhirpathpy itself.

Every condition of the seed trials, and a set of hand-picked expressions, is evaluated natively
and by fhirpathpy over generated variable bindings (hypothesis); the results (or the fact that
both raise) must be identical, including the Python types of the values returned.
"""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirmatch.fhirpath import compile_expression, parse_expression, reads_context
from fhirmatch.trials import fhirpath_variables

TRIALS = Path(__file__).resolve().parents[2] / "fixtures" / "trials"
AS_OF = date(2026, 11, 1)


def _trial_expressions() -> list[str]:
    found: dict[str, None] = {}

    def walk(actions: list[dict[str, Any]]) -> None:
        for action in actions:
            for cond in action.get("condition") or []:
                found[cond["expression"]["expression"]] = None
            walk(action.get("action") or [])

    for path in sorted(TRIALS.glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        for entry in bundle.get("entry") or []:
            if entry["resource"]["resourceType"] == "PlanDefinition":
                walk(entry["resource"].get("action") or [])
    return list(found)


TRIAL_EXPRESSIONS = _trial_expressions()

#: constructs beyond the trials' own use: every operator and function of the subset, the
#: three-valued logic table, literals of each kind, and misuse that must raise the same way
EXTRA_EXPRESSIONS = [
    "%a.valueQuantity.value > 1 xor %b.valueQuantity.value > 1",
    "%a.valueQuantity.value > 1 implies %b.valueQuantity.value > 1",
    "%a.exists() and %b.exists()",
    "%a.valueQuantity.value",
    "%a.valueQuantity",
    "%a",
    "%a.code.coding.code",
    "%a.count() >= 2",
    "%a.code.coding.count()",
    "%a.exists(valueQuantity.value > 2)",
    "%a.valueQuantity.value = 2",
    "%a.valueQuantity.value != 2.5",
    "%a.code.coding.code = %b.code.coding.code",
    "%a.valueQuantity.value * 2",
    "%a.valueQuantity.value * %b.valueQuantity.value > 3",
    "%a.valueQuantity.value.not()",
    "%a.not()",
    "%a.code.coding.code.startsWith('C6')",
    "%a.where(code.coding.code.startsWith('C6')).exists()",
    "%a.where(valueQuantity.value > 2).valueQuantity.value",
    "%a.code.coding.where(exists()).count()",
    "%age >= 18 and %age <= 75",
    "%age > 70 or %age < 16",
    "%age in (17 | 18 | 19)",
    "%a.valueQuantity.value in (1 | 2.5 | 'x')",
    "iif(%a.exists(), %a.valueQuantity.value, {})",
    "iif(%a.valueQuantity.value, true, false)",
    "iif(%a.exists(), true)",
    "{} or true",
    "{} and false",
    "(true and {}).not()",
    "true xor {}",
    "'a' | 'b' | 'a'",
    "1.50 * 2",
    # literals: read natively unless a string has escapes (those are read by fhirpathpy)
    "'it\\'s' | 'tab\\there' | 'back\\\\slash' | '\\u00e9' | ''",
    "2.0 | 2.50 | 0.0 | 7 | 0.125",
    "%a.valueQuantity.value = 4.0",
    "true | false",
    "%a.valueQuantity.value and true",
]

SYSTEMS = ["http://snomed.info/sct", "http://loinc.org", "http://cancerstaging.org", None]
CODES = [
    "10828004",
    "LA6576-8",
    "POS",
    "DET",
    "1352836005",
    "4B",
    "M1",
    "C61.9",
    "399068003",
    "51185008",
    "resolved",
    "active",
    "28899001",
    "8070/3",
]
MORPHOLOGY = "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-histology-morphology-behavior"

numbers = st.one_of(
    st.integers(-5, 10_000),
    st.floats(-10, 10_000, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.1, 2.5, 1.2, 4.0, 60.0, 2000.0, 1e-7]),
)
#: a primitive's extension element (``_value``), which fhirpathpy navigates with the value
primitive_extension = st.just({"extension": [{"url": "http://example.org/data-absent"}]})
coding = st.fixed_dictionaries(
    {"code": st.sampled_from(CODES)},
    optional={"system": st.sampled_from(SYSTEMS), "_code": primitive_extension},
)
concept = st.fixed_dictionaries(
    {}, optional={"coding": st.lists(st.one_of(coding, st.none()), max_size=3)}
)
quantity = st.fixed_dictionaries(
    {},
    optional={
        "value": st.one_of(numbers, st.just("12"), st.booleans()),
        "_value": primitive_extension,
        "comparator": st.sampled_from(["<", ">="]),
        "unit": st.just("mg/dL"),
    },
)
resource = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Observation", "Condition", "Procedure"])},
    optional={
        "valueQuantity": quantity,
        "valueCodeableConcept": concept,
        "interpretation": st.lists(concept, max_size=2),
        "referenceRange": st.lists(
            st.fixed_dictionaries({}, optional={"high": quantity}), max_size=2
        ),
        "code": concept,
        "bodySite": st.lists(concept, max_size=2),
        "clinicalStatus": concept,
        "extension": st.lists(
            st.fixed_dictionaries(
                {"url": st.sampled_from([MORPHOLOGY, "http://example.org/x"])},
                optional={"valueCodeableConcept": concept},
            ),
            max_size=2,
        ),
        "_status": st.just({"extension": [{"url": "http://example.org/e"}]}),
    },
)
#: what the engine binds (a list of resources, possibly empty) plus a few odd values
variable = st.one_of(
    st.lists(resource, max_size=2),
    st.lists(resource, min_size=1, max_size=1),
    st.none(),
    resource,
)
age = st.one_of(
    st.lists(st.integers(0, 110), max_size=1),
    st.sampled_from([[17.5], ["40"], [True], [None], [30, 40]]),
)


def _normalised(value: Any) -> Any:
    """A value with its Python types made visible (Decimal('1.0') != 1.0 != True)."""
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return (type(value).__name__, value)


def _run(expression: str, native: bool, env: dict[str, Any]) -> Any:
    compiled = compile_expression(expression, native=native)
    try:
        return ("ok", _normalised(compiled({"resourceType": "Patient", "id": "p"}, env)))
    except Exception:  # both evaluators raise plain exceptions of various types
        return ("error", None)


@st.composite
def bindings(draw: st.DrawFn, expression: str) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for name in sorted(fhirpath_variables(expression)):
        env[name] = draw(age) if name == "age" else draw(variable)
    return env


@pytest.mark.parametrize("expression", TRIAL_EXPRESSIONS + EXTRA_EXPRESSIONS)
def test_every_expression_compiles_natively(expression: str) -> None:
    compiled = compile_expression(expression)
    assert compiled.native, compiled.reason


@pytest.mark.parametrize("expression", TRIAL_EXPRESSIONS + EXTRA_EXPRESSIONS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_native_result_equals_fhirpathpy(expression: str, data: st.DataObject) -> None:
    env = data.draw(bindings(expression))
    assert _run(expression, True, env) == _run(expression, False, env)


def test_trials_hold_the_expected_number_of_conditions() -> None:
    # guards the differential test against silently collecting nothing
    assert len(TRIAL_EXPRESSIONS) >= 40


@pytest.mark.parametrize(
    ("left", "right", "op", "expected"),
    [
        ("true", "{}", "or", [True]),
        ("false", "{}", "or", []),
        ("{}", "{}", "or", []),
        ("false", "false", "or", [False]),
        ("false", "{}", "and", [False]),
        ("true", "{}", "and", []),
        ("true", "true", "and", [True]),
        ("false", "{}", "implies", [True]),
        ("{}", "true", "implies", [True]),
        ("true", "{}", "implies", []),
    ],
)
def test_three_valued_logic(left: str, right: str, op: str, expected: list[bool]) -> None:
    compiled = compile_expression(f"({left}) {op} ({right})")
    assert compiled.native
    assert compiled({}, {}) == expected


def test_missing_observation_makes_a_threshold_empty_and_an_or_decides_alone() -> None:
    compiled = compile_expression(
        "%wbc.valueQuantity.value >= 3.0 or %anc.valueQuantity.value >= 1.5"
    )
    anc = [{"valueQuantity": {"value": 2.0}}]
    assert compiled({}, {"wbc": [], "anc": anc}) == [True]
    assert compiled({}, {"wbc": [], "anc": [{"valueQuantity": {"value": 1.0}}]}) == []
    assert compiled({}, {"wbc": [{"valueQuantity": {"value": 2.9}}], "anc": []}) == []


def test_decimal_comparison_uses_the_shortest_repr_as_fhirpathpy_does() -> None:
    # binary 0.1 is slightly above one tenth; fhirpathpy compares Decimal('0.1')
    compiled = compile_expression("%x.valueQuantity.value > 0.1")
    assert compiled({}, {"x": [{"valueQuantity": {"value": 0.1}}]}) == [False]
    product = compile_expression("%x.valueQuantity.value <= 1.5 * %x.referenceRange.high.value")
    obs = {"valueQuantity": {"value": 1.8}, "referenceRange": [{"high": {"value": 1.2}}]}
    assert product({}, {"x": [obs]}) == [True]


def test_results_keep_fhirpathpy_types() -> None:
    compiled = compile_expression("%x.valueQuantity.value")
    assert compiled({}, {"x": [{"valueQuantity": {"value": 2.5}}]}) == [Decimal("2.5")]
    assert compile_expression("%n")({}, {"n": [3]}) == [3]


def test_equality_compares_first_items_of_equally_long_collections() -> None:
    # fhirpathpy's reading of '=' on collections, kept so both evaluators agree
    env = {"a": [{"code": {"coding": [{"code": "x"}, {"code": "y"}]}}]}
    env["b"] = [{"code": {"coding": [{"code": "x"}, {"code": "z"}]}}]
    expression = "%a.code.coding.code = %b.code.coding.code"
    assert compile_expression(expression)({}, env) == [True]
    assert compile_expression(expression, native=False)({}, env) == [True]


def test_undefined_variable_raises() -> None:
    with pytest.raises(ValueError, match="undefined environment variable"):
        compile_expression("%nope.exists()")({}, {})


def test_non_boolean_operand_of_and_raises_like_fhirpathpy() -> None:
    env = {"x": [{"valueQuantity": {"value": 3}}]}
    for native in (True, False):
        with pytest.raises(Exception, match=r"(?i)boolean"):
            compile_expression("%x.valueQuantity.value and true", native=native)({}, env)


@pytest.mark.parametrize(
    "expression",
    ["%a.first().exists()", "today() > @2020-01-01", "%a.where($this.code.exists())", "-1 < 2"],
)
def test_constructs_outside_the_subset_fall_back_to_fhirpathpy(expression: str) -> None:
    compiled = compile_expression(expression)
    assert not compiled.native
    assert compiled.reason
    env = {"a": [{"code": {"text": "x"}}]}
    assert compiled({}, env) == compile_expression(expression, native=False)({}, env)


@pytest.mark.parametrize(
    ("expression", "reads"),
    [
        ("gender = 'female' and %brain.empty()", True),
        ("iif(gender = 'female', true, false)", True),
        ("%context.gender = 'female'", True),
        ("%resource.id.exists() or %rootResource.id.exists()", True),
        ("$this.gender = 'female'", True),
        ("exists(gender = 'female')", True),
        ("where(true).exists()", True),
        ("%a.contains(gender)", True),  # an argument that is not a criterion: read at the root
        ("(gender)", True),
        ("%patient.gender = 'female'", False),  # through the variable: the engine knows
        ("%b.where(code.exists()).exists()", False),
        ("%a.where(iif(code.exists(), true, false)).exists()", False),
        ("%a.iif(gender.exists(), 1, 2)", False),
        ("iif(%a.exists(), true, false)", False),
        ("%a.valueQuantity.value > 4 and %age >= 18", False),
        ("%a.select(value).count() > 1 and today() > %asOf", False),
        ("%a.first().valueQuantity.value", False),
    ],
)
def test_reads_context_finds_paths_that_start_at_the_evaluated_resource(
    expression: str, reads: bool
) -> None:
    tree = parse_expression(expression).tree
    assert tree is not None
    assert reads_context(tree) is reads


def test_no_trial_condition_reads_the_patient_but_through_its_variable() -> None:
    """The engine decides a condition once for every patient whose inputs are absent unless it
    reads the Patient; the seed trials read it only through %patient (or not at all)."""
    assert not [e for e in TRIAL_EXPRESSIONS if reads_context(parse_expression(e).tree or {})]


def test_native_can_be_switched_off() -> None:
    compiled = compile_expression("%a.exists()", native=False)
    assert not compiled.native
    assert compiled({}, {"a": [1]}) == [True]
    assert "fhirpathpy" in repr(compiled)


# --------------------------------------------------------------------------- the engine


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PATIENTS = Path(__file__).resolve().parents[2] / "fixtures" / "patients"


def _records() -> list[Any]:
    from fhirmatch.records import iter_patient_records

    paths = [PATIENTS]
    for folder in ("synthea-r4", "mcode-stu4", "ctm-mitre"):
        if (SHARED / folder).is_dir():
            paths.extend(sorted((SHARED / folder).glob("*.json*"))[:4])
    return list(iter_patient_records(paths))


@pytest.fixture(scope="module")
def engines() -> tuple[Any, Any, Any]:
    from fhirmatch.engine import Engine
    from fhirmatch.terminology import Terminology
    from fhirmatch.trials import load_trials

    terminology = Terminology.load()
    trials = load_trials([TRIALS], terminology)
    native = Engine(trials, terminology)
    slow = Engine(trials, terminology, native_fhirpath=False)
    return trials, native, slow


def test_engine_results_do_not_depend_on_the_fhirpath_evaluator(
    engines: tuple[Any, Any, Any],
) -> None:
    _trials, native, slow = engines
    records = _records()
    assert len(records) >= 15
    for record in records:
        fast = [r.model_dump() for r in native.evaluate_patient_record(record, as_of=AS_OF)]
        ref = [r.model_dump() for r in slow.evaluate_patient_record(record, as_of=AS_OF)]
        assert fast == ref, record.patient_id


def test_engine_index_finds_what_a_full_index_finds(engines: tuple[Any, Any, Any]) -> None:
    """The engine indexes only the types and codes its trials ask for; every input must resolve
    exactly as over an index of the whole record."""
    from fhirmatch.engine import PatientIndex, resolve_input

    trials, native, _slow = engines
    inputs = {inp for t in trials for inp in t.all_inputs()}
    for record in _records():
        lean = native.index(record.resources, as_of=AS_OF)
        full = PatientIndex(
            record.resources,
            as_of=AS_OF,
            known_codes=native._known_codes,
            terminology=native.terminology,
        )
        assert sum(map(len, lean.by_type.values())) <= sum(map(len, full.by_type.values()))
        for inp in inputs:
            assert resolve_input(lean, inp) == resolve_input(full, inp), (record.patient_id, inp)


def test_engine_results_are_complete_pydantic_models(engines: tuple[Any, Any, Any]) -> None:
    """Results are built without validation; they must still be what validation would build."""
    from fhirmatch.results import CriterionResult, TrialResult

    _trials, native, _slow = engines
    results = native.evaluate_patient_record(_records()[0], as_of=AS_OF)
    for result in results:
        assert TrialResult.model_validate(result.model_dump()) == result
        assert result.model_fields_set == set(TrialResult.model_fields)
        assert list(result.model_dump()) == list(TrialResult.model_fields)
        for criterion in result.criteria:
            assert criterion.model_fields_set == set(CriterionResult.model_fields)
            assert list(criterion.model_dump()) == list(CriterionResult.model_fields)
        with pytest.raises(ValueError, match="frozen"):
            result.status = "eligible"  # type: ignore[misc]


# --------------------------------------------------------------------------- memberOf


def test_member_of_is_compiled_and_agrees_with_fhirpathpy() -> None:
    from fhirmatch.terminology import Terminology

    terminology = Terminology.load()
    base = "https://fhirmatch.dev/fhir/ValueSet/"
    prostate = {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C61"}
    lung = {"system": "http://snomed.info/sct", "code": "39607008"}
    cond = {"code": {"coding": [prostate]}, "bodySite": [{"coding": [lung]}, {"text": "left"}]}
    status = {"clinicalStatus": {"coding": [{"code": "resolved"}]}}  # no system, as feeds send it
    env = {"c": [cond], "s": [status], "none": []}
    cases = {
        f"%c.code.memberOf('{base}prostate-cancer')": [True],
        f"%c.code.coding.memberOf('{base}prostate-cancer')": [True],
        f"%c.code.memberOf('{base}esophageal-cancer')": [False],
        f"%c.bodySite.memberOf('{base}thoracic-body-site')": [],  # two items: empty
        f"%c.bodySite.where(memberOf('{base}thoracic-body-site')).exists()": [True],
        f"%c.where(code.memberOf('{base}prostate-cancer')).exists()": [True],
        f"%s.clinicalStatus.memberOf('{base}condition-inactive')": [True],
        f"%c.code.coding.code.memberOf('{base}prostate-cancer')": [],  # two systems: empty
        f"%none.code.memberOf('{base}prostate-cancer')": [],
    }
    for expression, expected in cases.items():
        fast = compile_expression(expression, terminology=terminology)
        slow = compile_expression(expression, native=False, terminology=terminology)
        assert fast.native and not slow.native
        assert fast({}, env) == expected, expression
        assert slow({}, env) == expected, expression


def test_member_of_without_terminology_or_with_an_unknown_value_set_is_an_error() -> None:
    from fhirmatch.terminology import Terminology

    env = {"c": [{"code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}}]}
    for native in (True, False):
        with pytest.raises(Exception, match="no terminology"):
            compile_expression("%c.code.memberOf('https://x/vs')", native=native)({}, env)
        with pytest.raises(Exception, match="unknown ValueSet"):
            compile_expression(
                "%c.code.memberOf('https://x/vs')", native=native, terminology=Terminology.load()
            )({}, env)
