"""A nightly screening job as a plain Python script (cron it instead of ``fhirmatch match``).

    python examples/nightly.py http://127.0.0.1:8080/fhir --state /var/lib/fhirmatch/state.json \
        --report /var/lib/fhirmatch/report.html [--patients-query 'Patient?_tag=...']

With a state file the second and later runs re-screen only patients whose relevant data changed.
Logs go to stderr; the last line of stdout is a one-line JSON summary. ``FHIR_BASE_URL`` may
replace the URL argument and ``FHIRMATCH_AS_OF`` fixes the evaluation date. The trials are those
in ``$FHIRMATCH_TRIALS``, else the seed trials bundled with fhirmatch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
from pathlib import Path

import fhirmatch
from fhirmatch.state import StateStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", nargs="?", default=os.environ.get("FHIR_BASE_URL"))
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--patients-query")
    args = parser.parse_args()
    if not args.server:
        parser.error("give the server URL (or set FHIR_BASE_URL)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    as_of = os.environ.get("FHIRMATCH_AS_OF")
    trials = fhirmatch.load_trials(fhirmatch.default_trial_paths())
    options = fhirmatch.MatchOptions(
        as_of=dt.date.fromisoformat(as_of) if as_of else None,
        patients_query=args.patients_query,
    )
    try:
        with fhirmatch.connect(args.server) as client, StateStore(args.state) as state:
            outcome = fhirmatch.run_match(client, trials, options, state=state)
    except fhirmatch.StateError as exc:  # another run holds the state file
        logging.error("%s", exc)
        return 4
    except fhirmatch.FhirmatchError as exc:
        logging.error("screening failed: %s", exc)
        return 3
    if args.report:
        fhirmatch.write_report(args.report, outcome, trials, server=args.server)
    written = sum(s.written for s in outcome.summaries.values())
    summary = {
        "incremental": outcome.incremental,
        "screened": outcome.screened,
        "written": written,
        "skipped": len(outcome.skipped),
    }
    print(json.dumps(summary, sort_keys=True))
    return 1 if outcome.skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
