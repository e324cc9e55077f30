"""``fhirmatch demo``: the match job end to end on the embedded default.

Starts the local FHIR sandbox on a free port with a fresh data directory, loads the seed trials
and demo patients, runs the match job against it with write-back, prints the per-trial summary,
writes the HTML report, reads back what was written, and stops the server. Every figure printed
comes from this run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

from ..client import ClientConfig, FhirClient
from ..data import seed_trials_dir
from ..match import MatchOptions, run_match
from ..report import write_report
from ..sandbox import start_sandbox
from ..writeback import SUBJECT_IDENTIFIER_SYSTEM
from . import exitcodes
from .common import Progress, add_logging_options, setup_logging
from .match import load_file_trials, summary_line, summary_table

log = logging.getLogger("fhirmatch.cli")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the match job on a local FHIR sandbox loaded with the seed trials and demo "
        "patients",
        description="Start the local FHIR sandbox (fresh, free port), load the five seed trials "
        "and the demo patients, screen every patient with write-back of ResearchSubject "
        "candidates, print the per-trial summary, write the HTML report, and stop the server.",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("fhirmatch-demo-report.html"),
        help="where to write the HTML report (default: ./fhirmatch-demo-report.html)",
    )
    p.add_argument("--as-of", metavar="YYYY-MM-DD", help="evaluation date (default: today)")
    p.add_argument("--data-dir", type=Path, help="keep the sandbox database here")
    add_logging_options(p)
    p.set_defaults(func=run, log_level="WARNING")


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    try:
        as_of = dt.date.fromisoformat(args.as_of) if args.as_of else dt.date.today()
    except ValueError:
        raise exitcodes.CliExit(
            exitcodes.CONFIG_ERROR, f"--as-of {args.as_of!r} is not a date (YYYY-MM-DD)"
        ) from None
    trials = load_file_trials([seed_trials_dir()], None)
    print(
        "starting the local FHIR sandbox and loading the seed trials and demo patients…",
        file=sys.stderr,
    )
    with start_sandbox(data_dir=args.data_dir, load=True) as sandbox:
        loaded = ", ".join(f"{n} {t}" for t, n in sorted(sandbox.loaded.items()))
        print(f"sandbox {sandbox.base_url}: loaded {loaded}", file=sys.stderr)
        with FhirClient(ClientConfig(base_url=sandbox.base_url)) as client:
            outcome = run_match(
                client,
                trials,
                MatchOptions(as_of=as_of),
                progress=Progress("screening", args.progress_interval),
            )
            subjects = list(
                client.iter_resources(
                    "ResearchSubject", {"identifier": f"{SUBJECT_IDENTIFIER_SYSTEM}|"}
                )
            )
            stored = sum(
                1
                for r in subjects
                if any(
                    i.get("system") == SUBJECT_IDENTIFIER_SYSTEM for i in r.get("identifier", [])
                )
            )
        print(f"\nScreening as of {as_of} ({sandbox.base_url})\n")
        print(summary_table(outcome))
        print(f"\nResearchSubjects on the server after the run: {stored}")
        write_report(
            args.report,
            outcome,
            trials,
            server=sandbox.base_url,
            parameters={"server": sandbox.base_url, "as_of": as_of.isoformat(), "demo": True},
        )
        print(f"HTML report: {args.report}")
    print(summary_line(outcome), file=sys.stderr)
    return exitcodes.PARTIAL if outcome.skipped else exitcodes.OK
