"""How well ``fhirmatch trials import`` drafts thresholds, units and comparators.

    .venv/bin/python benchmarks/draft_accuracy.py

Drafts the eligibility texts of seeds 000, 003 and 004 (``../shared/seeds``, as plain text) and
the shared ClinicalTrials.gov record NCT02513394 (``../shared/data/ctm-mitre``), takes every
numeric comparison out of the computable criteria (``%x.valueQuantity.value >= 1.5``,
``… <= 2.5 * %x.referenceRange.high.value``, ``%age >= 18``) and compares them with the
hand-written definitions of the seeds (``fixtures/trials``) and, for NCT02513394, which has no
hand-written definition, with a reference list read off the record's text by hand (below).

A comparison is a fact ``(subject, value, unit, comparator)``: the subject is the analyte (or
``age``, ``ecog``, ``karnofsky``), the value is converted to the analyte's canonical unit (so
``100 10*9/L`` and ``100000 /mm3`` are the same threshold) or kept as a multiple of the ULN.

* threshold: subject and value agree;
* unit: subject, value and the unit written agree;
* comparator: subject, value and comparator agree.

Recall is the share of reference facts the draft has, precision the share of drafted facts the
reference has (facts are sets per trial). ``tests/unit/test_import.py`` keeps these figures from
falling below the ones in ``docs/trials.md``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from fhirmatch.importer import study_bundle, text_bundle  # noqa: E402
from fhirmatch.model import Trial  # noqa: E402
from fhirmatch.trials import compile_trial, load_trials  # noqa: E402
from fhirmatch.units import analyte_info, convert  # noqa: E402

#: (name, seed text or record, id of the hand-written trial or of the reference list)
SOURCES = [
    ("seed 000", SHARED / "seeds" / "000_aea05274eb8e5b42.txt", "escc-sbrt-antipd1"),
    ("seed 003", SHARED / "seeds" / "003_10aa501f83fe7039.txt", "NCT03731442"),
    ("seed 004", SHARED / "seeds" / "004_214137c21fe74785.txt", "NCT06767007"),
    ("NCT02513394", SHARED / "data" / "ctm-mitre" / "svc_NCT02513394.json", "NCT02513394"),
    ("NCT09000017", REPO / "tests" / "data" / "ctgov-unseen-NCT09000017.json", "NCT09000017"),
]

#: thresholds read off the records' texts by hand (they have no hand-written definition)
REFERENCES: dict[str, set[tuple[str, float, str, str]]] = {}

#: NCT02513394's computable thresholds, read off its eligibility text by hand. The Gilbert's
#: syndrome limit (total bilirubin ≤ 3.0 × ULN) is conditional and belongs to a manual
#: alternative, so it is not listed.
NCT02513394_REFERENCE = {
    ("age", 18.0, "a", ">="),
    ("ecog", 1.0, "{score}", "<="),
    ("anc", 1500.0, "/uL", ">="),
    ("platelets", 100000.0, "/mm3", ">="),
    ("hemoglobin", 10.0, "g/dL", ">="),
    ("bilirubin-total", 1.0, "ULN", "<="),
    ("ast", 1.5, "ULN", "<="),
    ("alt", 1.5, "ULN", "<="),
    ("creatinine", 1.0, "ULN", "<"),
    ("creatinine-clearance", 60.0, "mL/min/{1.73_m2}", ">="),
}
REFERENCES["NCT02513394"] = NCT02513394_REFERENCE
#: the record written for the tests (tests/data); the "≤ 5 × ULN for patients with liver
#: metastases" limit is conditional (a manual alternative), so it is not listed
REFERENCES["NCT09000017"] = {
    ("age", 18.0, "a", ">="),
    ("age", 80.0, "a", "<="),
    ("ecog", 1.0, "{score}", "<="),
    ("anc", 1.5, "10*9/L", ">="),
    ("platelets", 100.0, "10*3/uL", ">="),
    ("hemoglobin", 90.0, "g/L", ">="),
    ("bilirubin-total", 1.5, "ULN", "<="),
    ("ast", 3.0, "ULN", "<="),
    ("alt", 3.0, "ULN", "<="),
    ("creatinine", 1.5, "mg/dL", "<="),
    ("creatinine-clearance", 50.0, "mL/min", ">="),
    ("albumin", 25.0, "g/L", "<"),
}

_CMP = re.compile(
    r"%(?P<var>\w+)\.valueQuantity\.value\s*(?P<op><=|>=|<|>|=)\s*(?P<num>\d+(?:\.\d+)?)"
    r"(?P<uln>\s*\*\s*%(?P=var)\.referenceRange\.high\.value)?"
)
_AGE = re.compile(r"%age\s*(?P<op><=|>=|<|>|=)\s*(?P<num>\d+)")


@dataclass(frozen=True)
class Fact:
    subject: str
    value: float  # canonical unit, or × ULN
    unit: str  # as written in the definition
    op: str

    @property
    def threshold(self) -> tuple[str, float]:
        return (self.subject, self.value)

    @property
    def with_unit(self) -> tuple[str, float, str]:
        return (self.subject, self.value, self.unit)

    @property
    def with_op(self) -> tuple[str, float, str]:
        return (self.subject, self.value, self.op)


def _canonical(subject: str, value: float, unit: str) -> float:
    if unit in ("ULN", "a", "{score}"):
        return round(value, 6)
    try:
        info = analyte_info(subject)
    except Exception:
        return round(value, 6)
    for target in (info.unit, *info.other_units):
        try:
            return float(f"{convert(value, unit, target, analyte=subject):.6g}")
        except Exception:
            continue
    return round(value, 6)


def facts(trial: Trial) -> set[Fact]:
    """Every numeric comparison of the trial's computable criteria."""
    out: set[Fact] = set()
    stack = list(trial.criteria)
    while stack:
        c = stack.pop()
        stack.extend(c.children)
        if not c.expression:
            continue
        inputs = {i.name: i for i in c.inputs}
        for m in _CMP.finditer(c.expression):
            inp = inputs.get(m.group("var"))
            if inp is None:
                continue
            subject = inp.analyte or (inp.value_set or "").rsplit("/", 1)[-1]
            unit = "ULN" if m.group("uln") else (inp.unit or "")
            value = float(m.group("num"))
            out.add(Fact(subject, _canonical(subject, value, unit), unit, m.group("op")))
        for m in _AGE.finditer(c.expression):
            out.add(Fact("age", float(m.group("num")), "a", m.group("op")))
    return out


def _reference_facts(raw: set[tuple[str, float, str, str]]) -> set[Fact]:
    return {Fact(s, _canonical(s, v, u), u, op) for s, v, u, op in raw}


def drafted_trial(path: Path, tid: str) -> Trial:
    if path.suffix == ".json":
        record = json.loads(path.read_text(encoding="utf-8"))
        bundle = study_bundle(record)
    else:
        bundle = text_bundle(tid, path.read_text(encoding="utf-8"))
    study, plan = (e["resource"] for e in bundle["entry"])
    return compile_trial(study, plan, None)


def measure(
    names: tuple[str, ...] = ("seed 000", "seed 003", "seed 004", "NCT02513394"),
) -> dict[str, Any]:
    """Per source and overall (over ``names``): counts, and recall and precision of thresholds,
    units and comparators."""
    hand = {t.id: t for t in load_trials([REPO / "fixtures" / "trials"])}
    rows: dict[str, dict[str, Any]] = {}
    totals = {k: [0, 0, 0] for k in ("threshold", "unit", "comparator")}
    for name, path, ref_id in SOURCES:
        if name not in names:
            continue
        drafted = facts(drafted_trial(path, ref_id))
        reference = (
            _reference_facts(REFERENCES[ref_id]) if ref_id in REFERENCES else facts(hand[ref_id])
        )
        row: dict[str, Any] = {"reference": len(reference), "drafted": len(drafted)}
        for key, attr in (
            ("threshold", "threshold"),
            ("unit", "with_unit"),
            ("comparator", "with_op"),
        ):
            ref_keys = {getattr(f, attr) for f in reference}
            drafted_keys = {getattr(f, attr) for f in drafted}
            hit = len(ref_keys & drafted_keys)
            row[key] = (hit, len(ref_keys), len(drafted_keys))
            for i, n in enumerate((hit, len(ref_keys), len(drafted_keys))):
                totals[key][i] += n
        row["missed"] = sorted(
            f"{f.subject} {f.op} {f.value:g} {f.unit}"
            for f in reference
            if f.with_op not in {d.with_op for d in drafted}
        )
        row["extra"] = sorted(
            f"{f.subject} {f.op} {f.value:g} {f.unit}"
            for f in drafted
            if f.with_op not in {r.with_op for r in reference}
        )
        rows[name] = row
    overall = {
        key: {"recall": hit / ref if ref else 1.0, "precision": hit / dr if dr else 1.0}
        for key, (hit, ref, dr) in totals.items()
    }
    return {"sources": rows, "overall": overall}


def main() -> None:
    for names in (("seed 000", "seed 003", "seed 004", "NCT02513394"), ("NCT09000017",)):
        report(measure(names))
        print()


def report(result: dict[str, Any]) -> None:
    print(f"{'source':<12} {'ref':>4} {'draft':>5}   threshold   unit        comparator")
    for name, row in result["sources"].items():
        cells = "   ".join(
            f"{row[k][0]:>2}/{row[k][1]:<2} {row[k][0]:>2}/{row[k][2]:<2}"
            for k in ("threshold", "unit", "comparator")
        )
        print(f"{name:<12} {row['reference']:>4} {row['drafted']:>5}   {cells}")
        for label in ("missed", "extra"):
            if row[label]:
                print(f"    {label}: {'; '.join(row[label])}")
    for key, fig in result["overall"].items():
        print(f"{key:<11} recall {fig['recall']:.1%}  precision {fig['precision']:.1%}")


if __name__ == "__main__":
    main()
