"""``fhirmatch demo``: the match job end to end on the embedded default.

Starts the local FHIR sandbox on a free port with a fresh data directory, loads the seed trials
and demo patients, runs the match job against it with write-back, prints the per-trial summary,
writes the HTML report, reads back what was written, and stops the server. Every figure printed
comes from this run.

The demo patients' data is dated for :data:`DEMO_AS_OF` (labs a few days before it), so the demo
screens as of that date, not today, and says so: run on any day, it shows the same picture.
``--as-of`` chooses another date.
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
from ..options import iso_date
from ..report import write_report
from ..sandbox import start_sandbox
from ..writeback import SUBJECT_IDENTIFIER_SYSTEM
from . import exitcodes
from .common import Progress, add_logging_options, setup_logging
from .match import load_file_trials, summary_line, summary_table

log = logging.getLogger("fhirmatch.cli")

#: the date the demo patients' data is written for (fixtures/README.md)
DEMO_AS_OF = dt.date(2026, 11, 1)


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
    p.add_argument(
        "--as-of",
        type=iso_date,
        metavar="YYYY-MM-DD",
        help=f"evaluation date (default: {DEMO_AS_OF}, the date the demo patients' data is "
        "written for)",
    )
    p.add_argument("--data-dir", type=Path, help="keep the sandbox database here")
    add_logging_options(p)
    p.set_defaults(func=run, log_level="WARNING")


def demo_as_of(given: dt.date | None) -> dt.date:
    """The demo's evaluation date: ``given``, else :data:`DEMO_AS_OF` (never today: the demo
    patients' labs are dated for that day and would be too old on a later one)."""
    return given or DEMO_AS_OF


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    as_of = demo_as_of(args.as_of)
    pinned = args.as_of is None
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
        why = (
            " (the date the demo patients' data is written for, not today; --as-of to change)"
            if pinned
            else ""
        )
        print(f"\nScreening as of {as_of}{why} ({sandbox.base_url})\n")
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
