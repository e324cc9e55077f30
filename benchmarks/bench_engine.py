"""Throughput of the eligibility engine on a synthetic, Synthea-sized population.

    .venv/bin/python benchmarks/bench_engine.py [--patients 300] [--templates 20] [--naive 50]

Builds patients from real Synthea bundles (``../shared/data/synthea-r4``, beside the
repository) used as templates, adds oncology-relevant data (CBC, chemistry with reference
ranges, ECOG, cancer diagnoses, some values in other units or as strings), writes them to a
patient-ordered NDJSON file, then:

1. streams the file with :func:`fhirmatch.records.iter_patient_records` and evaluates every
   patient against every trial (load and evaluation timed separately; resident memory sampled
   while streaming, to show it stays flat);
2. on the first ``--naive`` patients (records loaded): the engine, the engine with every
   condition evaluated by fhirpathpy (``native_fhirpath=False``), and a naive baseline: no index
   (each input scans the whole record) and every condition evaluated uncompiled with
   ``fhirpathpy.evaluate`` on each call.

Trials come from ``fixtures/trials`` when it holds trial files, else from the five built-in
stand-ins below (same shape as the seed trials: ~10-20 criteria, labs with ULN, scores, diagnoses).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import fhirpathpy

from fhirmatch.engine import (
    Engine,
    PatientIndex,
    _PatientContext,
    _trials_terminology,
    _truth,
    resolve_input,
)
from fhirmatch.fhirpath import _user_functions
from fhirmatch.model import Criterion, DataInput, Trial
from fhirmatch.records import iter_patient_records

SYNTHEA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthea-r4"
TRIALS_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "trials"
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
AS_OF = date(2026, 11, 1)

LABS = {  # name: (LOINC, unit, low, high, analyte, reference high)
    "wbc": ("6690-2", "10*3/uL", 2.0, 11.0, None, None),
    "anc": ("751-8", "10*3/uL", 0.8, 7.0, None, None),
    "plt": ("777-3", "10*3/uL", 60, 400, None, None),
    "hgb": ("718-7", "g/dL", 7.0, 16.0, None, None),
    "alb": ("1751-7", "g/dL", 2.0, 5.0, None, None),
    "tbil": ("1975-2", "mg/dL", 0.2, 3.0, "bilirubin-total", 1.2),
    "alt": ("1742-6", "U/L", 5, 150, "alt", 40),
    "ast": ("1920-8", "U/L", 5, 150, "ast", 40),
    "crea": ("2160-0", "mg/dL", 0.5, 2.5, "creatinine", 1.2),
}
TARGET = {
    "wbc": "10*9/L",
    "anc": "10*9/L",
    "plt": "10*9/L",
    "hgb": "g/dL",
    "alb": "g/dL",
    "tbil": "mg/dL",
    "alt": "U/L",
    "ast": "U/L",
    "crea": "mg/dL",
}
CONDITIONS = {
    "escc": "722528006",  # squamous cell carcinoma of esophagus
    "rectal": "363351006",  # malignant tumor of rectum
    "brain": "94225005",  # secondary malignant neoplasm of brain
    "ild": "233703007",  # interstitial lung disease
}


def lab_input(name: str, days: int) -> DataInput:
    code, _unit, _lo, _hi, analyte, _ref = LABS[name]
    return DataInput(
        name,
        "Observation",
        codes=frozenset({(LOINC, code)}),
        unit=TARGET[name],
        analyte=analyte,
        select="latest",
        lookback_days=days,
    )


def builtin_trials() -> list[Trial]:
    """Five stand-in trials shaped like the seed trials (used when fixtures/trials is empty)."""
    ecog = DataInput(
        "ecog",
        "Observation",
        codes=frozenset({(LOINC, "89247-1")}),
        unit="{score}",
        select="latest",
        lookback_days=90,
    )

    def cond(name: str, status: str = "any") -> DataInput:
        return DataInput(
            name,
            "Condition",
            codes=frozenset({(SCT, CONDITIONS[name])}),
            clinical_status=status,  # type: ignore[arg-type]
        )

    def lab_rules(days: int, kind: str = "inclusion") -> list[Criterion]:
        rules = {
            "wbc": "%wbc.valueQuantity.value >= 4.0",
            "plt": "%plt.valueQuantity.value >= 100",
            "hgb": "%hgb.valueQuantity.value >= 9",
            "alb": "%alb.valueQuantity.value >= 2.8",
            "tbil": "%tbil.valueQuantity.value <= 1.5 * %tbil.referenceRange.high.value",
            "alt": "%alt.valueQuantity.value <= 2.5 * %alt.referenceRange.high.value",
            "ast": "%ast.valueQuantity.value <= 2.5 * %ast.referenceRange.high.value",
            "crea": "%crea.valueQuantity.value <= 1.5 * %crea.referenceRange.high.value",
        }
        return [
            Criterion(f"inc-{n}", "inclusion", n, expression=e, inputs=(lab_input(n, days),))
            for n, e in rules.items()
        ]

    trials = []
    for n, (days, dx) in enumerate(
        [(30, "escc"), (30, "escc"), (60, "escc"), (30, "escc"), (15, "rectal")]
    ):
        crits = [
            Criterion("inc-age", "inclusion", "age", expression="%age >= 18 and %age <= 75"),
            Criterion(
                "inc-ecog",
                "inclusion",
                "ecog",
                expression="%ecog.valueQuantity.value <= 2",
                inputs=(ecog,),
            ),
            Criterion(
                "inc-dx",
                "inclusion",
                "dx",
                expression=f"%{dx}.exists()",
                inputs=(cond(dx, "current"),),
            ),
            *lab_rules(days),
            Criterion(
                "inc-wbc-or-anc",
                "inclusion",
                "wbc or anc",
                expression="%wbc.valueQuantity.value >= 3.0 or %anc.valueQuantity.value >= 1.5",
                inputs=(lab_input("wbc", days), lab_input("anc", days)),
            ),
            Criterion(
                "exc-brain",
                "exclusion",
                "brain",
                expression="%brain.exists()",
                inputs=(cond("brain"),),
            ),
            Criterion(
                "exc-ild",
                "exclusion",
                "ild",
                expression="%ild.exists()",
                inputs=(cond("ild", "history"),),
            ),
            Criterion("inc-consent", "inclusion", "consent", manual_reason="informed consent"),
        ]
        trials.append(Trial(f"BENCH-{n}", f"Bench trial {n}", (), tuple(crits), f"pd-{n}"))
    return trials


def load_trials() -> list[Trial]:
    if TRIALS_DIR.is_dir() and any(TRIALS_DIR.glob("*.json")):
        from fhirmatch.trials import load_trials as real_load

        return real_load([TRIALS_DIR])
    return builtin_trials()


def oncology_resources(pid: str, rng: random.Random) -> list[dict[str, Any]]:
    """Labs, ECOG and diagnoses for one synthetic patient (several results per test)."""
    out: list[dict[str, Any]] = []
    subject = {"reference": f"Patient/{pid}"}
    for name, (code, unit, lo, hi, _analyte, ref) in LABS.items():
        for k in range(rng.randint(1, 4)):
            when = AS_OF - timedelta(days=rng.randint(0, 120))
            value = round(rng.uniform(lo, hi), 2)
            o: dict[str, Any] = {
                "resourceType": "Observation",
                "id": f"{pid}-{name}-{k}",
                "status": "final",
                "category": [{"coding": [{"code": "laboratory"}]}],
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": subject,
                "effectiveDateTime": when.isoformat(),
                "issued": f"{when.isoformat()}T12:00:00Z",
            }
            if rng.random() < 0.05:
                o["valueString"] = f"{value} {unit}"
            else:
                o["valueQuantity"] = {
                    "value": value,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                }
            if ref is not None and rng.random() < 0.7:
                o["referenceRange"] = [
                    {
                        "high": {
                            "value": ref,
                            "unit": unit,
                            "system": "http://unitsofmeasure.org",
                            "code": unit,
                        }
                    }
                ]
            out.append(o)
    out.append(
        {
            "resourceType": "Observation",
            "id": f"{pid}-ecog",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "89247-1"}]},
            "subject": subject,
            "effectiveDateTime": (AS_OF - timedelta(days=rng.randint(0, 100))).isoformat(),
            "valueInteger": rng.randint(0, 3),
        }
    )
    for name, code in CONDITIONS.items():
        if rng.random() < 0.3:
            out.append(
                {
                    "resourceType": "Condition",
                    "id": f"{pid}-{name}",
                    "clinicalStatus": {"coding": [{"code": rng.choice(["active", "resolved"])}]},
                    "code": {"coding": [{"system": SCT, "code": code}]},
                    "subject": subject,
                    "onsetDateTime": "2025-06-01",
                }
            )
    return out


def build_population(path: Path, n_patients: int, n_templates: int, seed: int = 7) -> int:
    """Write a patient-ordered NDJSON file; returns the number of resources written."""
    templates = []
    for rec in iter_patient_records(sorted(SYNTHEA.glob("*.json.gz"))[:n_templates]):
        if rec.patient is not None:
            templates.append(rec)
    rng = random.Random(seed)
    written = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
        for n in range(n_patients):
            tpl = templates[n % len(templates)]
            pid = f"bench-{n}"
            ref = {"reference": f"Patient/{pid}"}
            for r in tpl.resources:
                if r["resourceType"] == "Patient":
                    r = {**r, "id": pid}
                elif "subject" in r:
                    r = {**r, "id": f"{pid}-{r.get('id')}", "subject": ref}
                elif "patient" in r:
                    r = {**r, "id": f"{pid}-{r.get('id')}", "patient": ref}
                else:
                    continue
                fh.write(json.dumps(r))
                fh.write("\n")
                written += 1
            for r in oncology_resources(pid, rng):
                fh.write(json.dumps(r))
                fh.write("\n")
                written += 1
    return written


def naive_find(
    resources: list[dict[str, Any]], resource_type: str, codes: frozenset[tuple[str, str]]
) -> list[dict[str, Any]]:
    """No index: every lookup scans the whole record."""
    out = []
    for r in resources:
        if r.get("resourceType") != resource_type or r.get("status") not in (
            "final",
            "amended",
            "corrected",
            None,
            "active",
            "completed",
        ):
            continue
        for c in (r.get("code") or {}).get("coding") or []:
            if (c.get("system"), c.get("code")) in codes:
                out.append(r)
                break
    return out


def naive_evaluate(
    trials: list[Trial], resources: list[dict[str, Any]], functions: dict[str, Any]
) -> int:
    """Evaluate every computable criterion uncompiled, without index or shared inputs
    (``functions``: fhirmatch's FHIRPath functions for fhirpathpy, ``memberOf``)."""
    patient = [r for r in resources if r.get("resourceType") == "Patient"][:1]
    ctx = _PatientContext(PatientIndex(patient, as_of=AS_OF), "Patient/x", AS_OF)
    count = 0

    def walk(crits: tuple[Criterion, ...]) -> None:
        nonlocal count
        for c in crits:
            walk(c.children)
            if c.expression is None:
                continue
            env: dict[str, Any] = {
                "patient": ctx.patient,
                "asOf": AS_OF.isoformat(),
                "age": ctx.age[0],
            }
            for inp in c.inputs:
                # the scan's finds, resolved by the engine's rules (an index of just those: the
                # engine's index class cannot be subclassed when it is compiled)
                found = naive_find(resources, inp.resource_type, inp.codes)
                index = PatientIndex(found, as_of=AS_OF)
                env[inp.name] = resolve_input(index, inp).variants[0]
            options = {"userInvocationTable": functions}
            _truth(fhirpathpy.evaluate(ctx.patient, c.expression, env, options=options))
            count += 1

    for t in trials:
        walk(t.criteria)
    return count


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux), in MB."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def per_second(n: int, seconds: float) -> str:
    return f"{n / seconds:.0f} evaluations/s" if seconds > 0 else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--templates", type=int, default=20)
    ap.add_argument("--naive", type=int, default=30, help="patients for the naive baseline")
    args = ap.parse_args()

    trials = load_trials()
    engine = Engine(trials)
    n_crit = sum(len(t.criteria) for t in trials)
    print(f"trials: {len(trials)} ({n_crit} top-level criteria)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "population.ndjson.gz"
        t0 = time.perf_counter()
        n_res = build_population(path, args.patients, args.templates)
        print(
            f"population: {args.patients} patients, {n_res} resources "
            f"({n_res / args.patients:.0f}/patient), built in {time.perf_counter() - t0:.1f}s"
        )

        load_s = eval_s = 0.0
        n_eval = 0
        statuses: dict[str, int] = {}
        naive_records = []
        rss_start = current_rss_mb()
        rss_max = rss_start
        t_load = time.perf_counter()
        for n, rec in enumerate(iter_patient_records([path])):
            t_eval = time.perf_counter()
            load_s += t_eval - t_load
            results = engine.evaluate_patient_record(rec, as_of=AS_OF)
            t_load = time.perf_counter()
            eval_s += t_load - t_eval
            n_eval += len(results)
            for r in results:
                statuses[r.status] = statuses.get(r.status, 0) + 1
            if len(naive_records) < args.naive:
                naive_records.append(rec)
            if n % 50 == 0:
                rss_max = max(rss_max, current_rss_mb())
        rss_max = max(rss_max, current_rss_mb())
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"streamed load: {load_s:.2f}s ({args.patients / load_s:.0f} patients/s)")
    print(
        f"evaluation:    {eval_s:.2f}s for {n_eval} patient-trial evaluations "
        f"= {n_eval / eval_s:.0f} evaluations/s (records loaded)"
    )
    print(f"statuses: {statuses}")
    print(
        f"RSS while streaming: {rss_start:.0f} MB at the start, at most {rss_max:.0f} MB "
        f"(includes {len(naive_records)} records kept for the baseline); "
        f"process peak {peak_kb / 1e3:.0f} MB (population build included)"
    )

    if not naive_records:
        return
    n_same = len(naive_records) * len(trials)
    functions = _user_functions(_trials_terminology(trials))  # the terminology Engine(trials) uses
    t0 = time.perf_counter()
    for rec in naive_records:
        naive_evaluate(trials, rec.resources, functions)
    naive_s = time.perf_counter() - t0
    slow_engine = Engine(trials, native_fhirpath=False)
    t0 = time.perf_counter()
    for rec in naive_records:
        slow_engine.evaluate_patient_record(rec, as_of=AS_OF)
    slow_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rec in naive_records:
        engine.evaluate_patient_record(rec, as_of=AS_OF)
    fast_s = time.perf_counter() - t0
    print(f"on the first {len(naive_records)} patients ({n_same} evaluations, records loaded):")
    print(f"  naive baseline:                   {per_second(n_same, naive_s)}")
    print(
        f"  engine, fhirpathpy conditions:    {per_second(n_same, slow_s)} "
        f"({naive_s / slow_s:.1f}x naive)"
    )
    print(
        f"  engine, compiled conditions:      {per_second(n_same, fast_s)} "
        f"({naive_s / fast_s:.1f}x naive)"
    )


if __name__ == "__main__":
    main()
