"""``fhirmatch evaluate``: screen patient files against trial definitions, offline.

::

    fhirmatch evaluate [--trials fixtures/trials] --patients fixtures/patients \\
        [--as-of 2026-11-01] [--format table|json|ndjson] [--trial ID ...]
        [--executor local|processes|dask] [--scheduler tcp://host:8786] [--workers N]

``table`` prints a per-patient, per-trial summary for a terminal; ``json`` one
:class:`~fhirmatch.results.EvaluationReport`; ``ndjson`` one
:class:`~fhirmatch.results.TrialResult` per line, streamed as patients are evaluated. NDJSON
patient files not ordered by patient (Bulk Data exports) are grouped in bounded memory
(:mod:`fhirmatch.stream`); ``--executor`` spreads the evaluation over processes or a Dask cluster
(:mod:`fhirmatch.executors`) with identical output.

Exit code 0 when the evaluation ran, whatever the verdicts; 2 for bad arguments or unreadable
trial files. A malformed patient file is reported on stderr and skipped; the rest is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import date
from typing import TYPE_CHECKING, TextIO

from ..engine import Engine
from ..errors import ConfigurationError, TerminologyError
from ..executors import add_executor_arguments, executor_from_args, partition_bytes
from ..results import CriterionResult, EvaluationReport, TrialResult
from . import exitcodes

if TYPE_CHECKING:
    from ..model import Trial
    from ..terminology import Terminology

_OUTCOME_MARK = {"pass": "+", "fail": "x", "unknown": "?", "manual": "m"}


def _as_of(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="screen patient files against trial definitions (offline)",
        description="Evaluate FHIR patient records (Bundles, NDJSON, directories, .gz) against "
        "computable trial eligibility criteria and print each patient's status per trial.",
    )
    p.add_argument(
        "--trials",
        nargs="+",
        default=None,
        metavar="PATH",
        help="trial Bundle files or folders (default: $FHIRMATCH_TRIALS, else the bundled seed "
        "trials)",
    )
    p.add_argument(
        "--patients", nargs="+", required=True, metavar="PATH", help="patient files or folders"
    )
    p.add_argument(
        "--as-of",
        type=_as_of,
        default=None,
        metavar="YYYY-MM-DD",
        help="evaluate as of this date (default: today)",
    )
    p.add_argument(
        "--format", choices=("table", "json", "ndjson"), default="table", help="output format"
    )
    p.add_argument(
        "--trial",
        nargs="+",
        default=None,
        metavar="ID",
        help="only these trials (ResearchStudy id or identifier, e.g. an NCT number)",
    )
    p.add_argument(
        "--valuesets",
        nargs="+",
        default=None,
        metavar="PATH",
        help="ValueSet/ConceptMap files or folders (default: $FHIRMATCH_MAPPINGS, else the "
        "bundled mappings/)",
    )
    add_executor_arguments(p.add_argument_group("scale"))
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> tuple[list[Trial], Terminology | None]:
    from ..data import default_trial_paths, mappings_dir
    from ..terminology import Terminology
    from ..trials import load_trials

    term_paths = list(args.valuesets) if args.valuesets is not None else [mappings_dir()]
    terminology = Terminology.load(term_paths)
    trials = load_trials(args.trials or default_trial_paths(), terminology=terminology)
    if args.trial:
        wanted = set(args.trial)
        trials = [
            t
            for t in trials
            if t.id in wanted or any(value in wanted for _system, value in t.identifiers)
        ]
        if not trials:
            raise exitcodes.CliExit(
                exitcodes.CONFIG_ERROR, f"no trial matches --trial {' '.join(args.trial)}"
            )
    if not trials:
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, "no trials found in --trials")
    return trials, terminology


def run(args: argparse.Namespace) -> int:
    """Run ``fhirmatch evaluate``; returns the exit code."""
    try:
        trials, terminology = _load(args)
        engine = Engine(trials, terminology)
    except (ConfigurationError, TerminologyError) as exc:
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, str(exc)) from exc
    except OSError as exc:
        raise exitcodes.CliExit(
            exitcodes.CONFIG_ERROR, f"cannot read trial definitions: {exc}"
        ) from exc
    as_of: date = args.as_of or date.today()
    problems: list[str] = []
    try:
        executor = executor_from_args(args, trials, terminology, engine=engine)
    except ConfigurationError as exc:
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, str(exc)) from exc
    from .common import warn_about_trials

    warn_about_trials(trials)  # once the configuration is known to be good
    with executor:
        results = (
            (record.problems, trial_results)
            for record, trial_results in executor.evaluate_files(
                args.patients,
                as_of=as_of,
                problems=problems,
                spill_dir=args.spill_dir,
                partition_bytes=partition_bytes(args),
            )
        )
        n_patients = _write(results, args.format, as_of, sys.stdout)
    for problem in problems:
        print(f"fhirmatch: {problem}", file=sys.stderr)
    if n_patients == 0:
        print("fhirmatch: no patients found in --patients", file=sys.stderr)
    return exitcodes.OK


def _write(
    results: Iterator[tuple[list[str], list[TrialResult]]],
    fmt: str,
    as_of: date,
    out: TextIO,
) -> int:
    n = 0
    if fmt == "json":
        collected: list[TrialResult] = []
        for _problems, trial_results in results:
            n += 1
            collected.extend(trial_results)
        report = EvaluationReport(as_of=as_of, results=collected)
        out.write(report.model_dump_json(indent=2))
        out.write("\n")
        return n
    if fmt == "ndjson":
        for _problems, trial_results in results:
            n += 1
            for tr in trial_results:
                out.write(json.dumps(tr.model_dump(mode="json"), ensure_ascii=False))
                out.write("\n")
            out.flush()
        return n
    for record_problems, trial_results in results:
        n += 1
        out.write(format_table(trial_results, as_of, record_problems))
        out.flush()
    return n


def format_table(trial_results: list[TrialResult], as_of: date, problems: list[str]) -> str:
    """A readable summary of one patient's results (one block per trial)."""
    if not trial_results:
        return ""
    lines = [f"{trial_results[0].patient}  (as of {as_of})"]
    lines.extend(f"  ! {p}" for p in problems)
    for tr in trial_results:
        title = f" {tr.title}" if tr.title else ""
        lines.append(f"  {tr.study}{title[:70]}")
        lines.append(f"    status: {tr.status.upper()}")
        if tr.incomplete:
            lines.append(f"    ! definition incomplete: {' '.join(tr.incomplete.split())}")
        if tr.drafted:
            lines.append(f"    ! drafted, not reviewed: {', '.join(tr.drafted)}")
        for c in tr.criteria:
            _criterion_lines(c, 3, lines)
    lines.append("")
    return "\n".join(lines) + "\n"


def _criterion_lines(c: CriterionResult, depth: int, lines: list[str]) -> None:
    detail = f" - {c.reason}" if c.reason else ""
    pad = "  " * depth
    lines.append(f"{pad}[{_OUTCOME_MARK[c.outcome]}] {c.kind[:3]} {c.id}: {c.outcome}{detail}")
    for child in c.criteria:
        _criterion_lines(child, depth + 1, lines)
