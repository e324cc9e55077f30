"""One reader for qualitative results: is an Observation positive, negative, or undecided?

Usage::

    reading = read_qualitative(observation, terminology, threshold)
    reading.result        # "positive", "negative" or None (cannot tell)
    reading.source        # what it was read from ("valueString 'Detected'", ...)

Every criterion that asks whether a test was positive (pregnancy tests, hepatitis C antibody,
HCV RNA, a pregnancy-status observation) reads its Observations here, through the input
extensions described in ``docs/trial-format.md``. A result is read from, in this order:

* ``valueCodeableConcept``: a coding in the ValueSet ``positive-result`` or ``negative-result``
  (``mappings/valuesets/``: SNOMED CT findings and LOINC answer codes), else its ``text``;
* ``valueString``: the common wordings, in any case (``positive``, ``pos``, ``detected``,
  ``reactive``, ``present``; ``negative``, ``neg``, ``not detected``, ``non-reactive``,
  ``undetected``, ``absent``; for immune stains ``intact``, ``retained``, ``expressed`` and
  ``loss``, ``lost``, ``not expressed``), or a number when the input states a threshold;
* ``valueBoolean``;
* ``interpretation``: a coding in the same ValueSets (HL7 ``POS``/``DET``, ``NEG``/``ND``);
* ``valueQuantity`` / ``valueInteger`` against the input's stated threshold: positive at or above
  ``positive-threshold``, negative below it, or below ``negative-threshold`` when the input gives
  one (values in between are equivocal: undecided). A censored value (``<5``) is decided only
  when its whole interval falls on one side. With ``positive-if-quantified`` (HCV RNA "higher
  than the lower limit of the assay"), a number above zero is positive and a value reported as
  below a limit (``<15 IU/mL``) is negative.

When the sources present disagree (a ``valueCodeableConcept`` saying positive and an
``interpretation`` saying negative), the result is undecided: a person must look.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import units
from .errors import UnitError
from .model import VS_BASE, Threshold

if TYPE_CHECKING:
    from .terminology import Terminology

__all__ = [
    "NEGATIVE_CODING",
    "NEGATIVE_VS",
    "POSITIVE_CODING",
    "POSITIVE_VS",
    "Reading",
    "Threshold",
    "read_coded_answer",
    "read_qualitative",
    "wording_key",
]

Result = Literal["positive", "negative"]

POSITIVE_VS = f"{VS_BASE}/positive-result"
NEGATIVE_VS = f"{VS_BASE}/negative-result"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"

#: how a reading is written into the normalised copy the condition sees (``valueCodeableConcept``)
POSITIVE_CODING = {"system": SNOMED, "code": "10828004", "display": "Positive"}
NEGATIVE_CODING = {"system": SNOMED, "code": "260385009", "display": "Negative"}

_POSITIVE_WORDS = frozenset(
    {"positive", "pos", "detected", "reactive", "present", "+", "intact", "retained", "expressed"}
)
_NEGATIVE_WORDS = frozenset(
    {
        "negative",
        "neg",
        "not detected",
        "none detected",
        "undetected",
        "non reactive",
        "nonreactive",
        "not reactive",
        "absent",
        "not present",
        "loss",
        "lost",
        "loss of expression",
        "not expressed",
        "-",
    }
)


@dataclass(frozen=True)
class Reading:
    result: Result | None
    #: what the result was read from, or why it could not be read (no values of other fields)
    source: str


def _words(text: str) -> str:
    text = text.strip().lower().rstrip(".!")
    text = re.sub(r"[\s_\-]+", " ", text) if text not in ("-", "+") else text
    return text.strip()


def wording_key(text: str) -> str:
    """A wording as compared with a ValueSet's answer wordings: lower case, hyphens, underscores
    and runs of white space as one space, a final full stop dropped."""
    return _words(text)


def read_coded_answer(
    obs: Mapping[str, Any], terminology: Terminology, value_sets: tuple[str, ...]
) -> tuple[str, str] | None:
    """The coded answer of ``value_sets`` a result written as text stands for: its
    ``valueString``, or the ``text`` of a ``valueCodeableConcept`` none of whose codings is in
    those ValueSets, matched against their concepts' wordings (``"MSS"``, ``"microsatellite
    stable"`` -> LOINC LA14122-8). None when there is no such text, it matches no wording, or
    it matches answers of two ValueSets."""
    cc = obs.get("valueCodeableConcept")
    if isinstance(cc, dict) or isinstance(cc, Mapping):
        if any(terminology.matches(url, cc) for url in value_sets):
            return None  # coded: the condition reads the code
        text = cc.get("text")
    else:
        text = obs.get("valueString")
    if not isinstance(text, str):
        return None
    key = _words(text)
    found = {
        hit for url in value_sets if (hit := terminology.answer_wordings(url).get(key)) is not None
    }
    return found.pop() if len(found) == 1 else None


def read_text(text: str) -> Result | None:
    """A wording (``"Not detected"``, ``"POSITIVE"``, ``"non-reactive"``) as a result."""
    words = _words(text)
    if words in _POSITIVE_WORDS:
        return "positive"
    if words in _NEGATIVE_WORDS or words.replace(" ", "") in {"nonreactive", "notdetected"}:
        return "negative"
    return None


def _coded(terminology: Terminology, cc: Any) -> Result | None:
    if not (isinstance(cc, dict) or isinstance(cc, Mapping)):
        return None
    positive = terminology.matches(POSITIVE_VS, cc)
    negative = terminology.matches(NEGATIVE_VS, cc)
    if positive != negative:
        return "positive" if positive else "negative"
    return None


def _unit_of(q: Mapping[str, Any]) -> str | None:
    unit = q.get("code") if q.get("system") == UCUM and q.get("code") else q.get("unit")
    return unit if isinstance(unit, str) and unit else None


def _by_threshold(
    value: float, unit: str | None, comparator: str | None, threshold: Threshold
) -> Result | None:
    if threshold.if_quantified:
        if comparator in ("<", "<="):
            return "negative"
        if comparator in (">", ">="):
            return "positive"
        return "positive" if value > 0 else "negative"
    assert threshold.positive is not None
    if threshold.unit and unit != threshold.unit:
        if not unit:
            return None
        try:
            value = units.convert(value, unit, threshold.unit, analyte=threshold.analyte)
        except UnitError:
            return None
    return _decide(value, comparator, threshold)


def _decide(value: float, comparator: str | None, t: Threshold) -> Result | None:
    """A value (or the interval a censored value describes) against the threshold."""
    assert t.positive is not None
    cut = t.positive

    def positive(v: float, inclusive: bool = True) -> bool:  # every value from v up
        return v > cut or (v == cut and (not t.strict or not inclusive))

    def negative(v: float, inclusive: bool = True) -> bool:  # every value up to v
        if t.negative is not None:
            return v < t.negative or (v == t.negative and not inclusive)
        return v < cut or (v == cut and (t.strict or not inclusive))

    if comparator in ("<", "<="):
        return "negative" if negative(value, comparator == "<=") else None
    if comparator in (">", ">="):
        return "positive" if positive(value, comparator == ">=") else None
    if positive(value):
        return "positive"
    return "negative" if negative(value) else None


def _sources(
    obs: Mapping[str, Any], terminology: Terminology, threshold: Threshold | None
) -> Iterator[tuple[str, Result | None]]:
    if "valueCodeableConcept" in obs:
        cc = obs["valueCodeableConcept"]
        result = _coded(terminology, cc)
        readable = isinstance(cc, dict) or isinstance(cc, Mapping)
        if result is None and readable and isinstance(cc.get("text"), str):
            result = read_text(cc["text"])
        yield "valueCodeableConcept", result
    if "valueString" in obs:
        text = obs["valueString"]
        result = read_text(text) if isinstance(text, str) else None
        if result is None and threshold is not None and isinstance(text, str):
            parsed = units.parse_value_string(text)
            if parsed is not None:
                result = _by_threshold(
                    float(parsed.value), parsed.unit, parsed.comparator, threshold
                )
        yield "valueString", result
    if "valueBoolean" in obs:
        value = obs["valueBoolean"]
        yield (
            "valueBoolean",
            (("positive" if value else "negative") if isinstance(value, bool) else None),
        )
    for cc in obs.get("interpretation") or []:
        result = _coded(terminology, cc)
        if result is not None:  # other flags (H, L, A ...) say nothing about presence
            yield "interpretation", result
    if "valueQuantity" in obs:
        q = obs["valueQuantity"]
        value = q.get("value") if isinstance(q, dict) or isinstance(q, Mapping) else None
        if threshold is None or not isinstance(value, int | float) or isinstance(value, bool):
            yield "valueQuantity", None
        else:
            comparator = q.get("comparator")
            yield (
                "valueQuantity",
                _by_threshold(
                    float(value),
                    _unit_of(q),
                    comparator if isinstance(comparator, str) else None,
                    threshold,
                ),
            )
    if "valueInteger" in obs:
        value = obs["valueInteger"]
        if threshold is None or not isinstance(value, int) or isinstance(value, bool):
            yield "valueInteger", None
        else:
            yield "valueInteger", _by_threshold(float(value), threshold.unit, None, threshold)


def read_qualitative(
    obs: Mapping[str, Any], terminology: Terminology, threshold: Threshold | None = None
) -> Reading:
    """Read an Observation as positive, negative or undecided (see the module doc)."""
    found = list(_sources(obs, terminology, threshold))
    decided = {result for _name, result in found if result is not None}
    names = ", ".join(name for name, _result in found) or "no value"
    if len(decided) == 1:
        result = decided.pop()
        return Reading(result, f"{result} from {names}")
    if len(decided) > 1:
        return Reading(None, f"{names} disagree")
    if any(name in ("valueQuantity", "valueInteger") for name, _r in found) and threshold is None:
        return Reading(None, "a number, and the criterion states no threshold for it")
    if found:
        return Reading(None, f"{names} not readable as positive or negative")
    return Reading(None, "no value")
