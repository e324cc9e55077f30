"""Screen one patient on demand and print the outcome per trial as JSON.

    python examples/screen_patient.py http://127.0.0.1:8080/fhir PATIENT_ID [--dry-run]

The server URL may also come from ``FHIR_BASE_URL``; ``FHIRMATCH_AS_OF`` (YYYY-MM-DD) fixes the
evaluation date. Candidates are written back as ResearchSubjects unless ``--dry-run``. The trials
are those in ``$FHIRMATCH_TRIALS``, else the seed trials bundled with fhirmatch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os

import fhirmatch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", nargs="?", default=os.environ.get("FHIR_BASE_URL"))
    parser.add_argument("patient")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if not args.server:
        parser.error("give the server URL (or set FHIR_BASE_URL)")
    as_of = os.environ.get("FHIRMATCH_AS_OF")
    options = fhirmatch.MatchOptions(
        as_of=dt.date.fromisoformat(as_of) if as_of else None, dry_run=args.dry_run
    )
    trials = fhirmatch.load_trials(fhirmatch.default_trial_paths())
    try:
        with fhirmatch.connect(args.server) as client:
            if not args.dry_run:
                fhirmatch.publish_trials(client, trials)  # subjects must cite studies it holds
            outcome = fhirmatch.screen_patients(client, trials, [args.patient], options)
    except fhirmatch.FhirmatchError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(
        json.dumps(
            {
                "patient": args.patient,
                "skipped": outcome.skipped,
                "results": {r.study: r.status for r in outcome.results},
                "writes": {p.study: p.action for p in outcome.planned},
            },
            indent=2,
            sort_keys=True,
        )
    )
    return 1 if outcome.skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
