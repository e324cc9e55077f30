"""``fhirmatch match``: screen a FHIR server's patients and write back candidates."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..data import seed_trials_dir
from ..errors import ConfigurationError, TrialDefinitionError
from ..executors import (
    add_executor_arguments,
    executor_from_args,
    freeze_heap,
    partition_bytes,
)
from ..match import (
    DEFAULT_CONCURRENCY,
    MAX_CONCURRENCY,
    MatchOptions,
    MatchOutcome,
    load_trials_from_server,
    run_match,
)
from ..model import Trial
from ..options import Number, iso_date, positive_int
from ..state import StateStore, write_private_file
from ..terminology import Terminology
from . import exitcodes
from .common import (
    Progress,
    add_config_option,
    add_logging_options,
    add_server_options,
    build_client,
    setup_logging,
    warn_about_trials,
)

log = logging.getLogger("fhirmatch.cli")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "match",
        help="screen a FHIR server's patients and write back ResearchSubject candidates",
        description="Pull patients' data from a FHIR server, evaluate them against the trials, "
        "and record candidates as ResearchSubject resources (idempotently, with Provenance). "
        "With --state, later runs re-screen only patients whose relevant data changed.",
    )
    add_config_option(p)
    add_server_options(p)
    src = p.add_argument_group("trials")
    src.add_argument("--trials", nargs="+", type=Path, metavar="PATH", help="trial files/dirs")
    src.add_argument(
        "--trials-from-server",
        action="store_true",
        help="use the server's active ResearchStudies and their PlanDefinitions",
    )
    src.add_argument("--trial", nargs="+", metavar="ID", help="only these trial ids")
    who = p.add_argument_group("patients")
    who.add_argument("--patient", nargs="+", metavar="ID", help="screen only these patients")
    who.add_argument(
        "--patients-query",
        metavar="QUERY",
        help="screen the patients a FHIR search selects, e.g. 'Patient?_has:Condition:patient:"
        "code=http://snomed.info/sct|363346000'",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--as-of", type=iso_date, metavar="YYYY-MM-DD", help="evaluation date (default: today)"
    )
    run.add_argument("--dry-run", action="store_true", help="write nothing; show what would be")
    run.add_argument(
        "--write",
        default="candidate,potential-candidate",
        metavar="STATUSES",
        help="which new subjects to create: candidate, potential-candidate, or both "
        "(default: both)",
    )
    run.add_argument("--state", type=Path, metavar="FILE", help="state file for incremental runs")
    run.add_argument(
        "--restart", action="store_true", help="discard an interrupted run in the state file"
    )
    run.add_argument(
        "--chunk-size", type=positive_int, default=50, help="patients per fetch (default 50)"
    )
    run.add_argument(
        "--concurrency",
        type=Number(int, ge=1, le=MAX_CONCURRENCY),
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight at once, 1 to {MAX_CONCURRENCY} (default {DEFAULT_CONCURRENCY}); "
        "all back off together when the server answers 429 or 503",
    )
    scale = p.add_argument_group("scale")
    scale.add_argument(
        "--bulk",
        action="store_true",
        help="read the patients' data with one Bulk Data $export instead of REST searches",
    )
    scale.add_argument("--bulk-group", metavar="ID", help="with --bulk: export this Group only")
    scale.add_argument(
        "--bulk-type-filter",
        action="store_true",
        help="with --bulk: also send _typeFilter code filters (only for servers that OR them "
        "as the Bulk Data IG says)",
    )
    scale.add_argument(
        "--bulk-poll-max",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --bulk: the longest wait between two export status checks, also when the "
        "server's Retry-After asks for more (default 60)",
    )
    add_executor_arguments(scale)
    out = p.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="FILE", help="write an HTML report here")
    out.add_argument(
        "--report-identifier",
        choices=("none", "mrn"),
        default="none",
        help="show this identifier beside each candidate's id in the report: mrn (the "
        "Patient.identifier of type MR, read from the server). Default: none",
    )
    out.add_argument("--format", choices=("table", "json"), default="table")
    out.add_argument("--output", type=Path, metavar="FILE", help="results here, not stdout")
    add_logging_options(p)
    p.set_defaults(func=run_command)


def _as_of(text: str | dt.date | None) -> dt.date | None:
    if text is None or isinstance(text, dt.date):
        return text
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(f"--as-of {text!r} is not a date (YYYY-MM-DD)") from None


def load_file_trials(paths: list[Path], only: list[str] | None) -> list[Trial]:
    """Load and fully check trial files; any problem stops the run before anything is written."""
    from ..trials import check_trials

    report = check_trials(paths)
    if not report.ok:
        problems = [f"{src}: {p}" for src, ps in report.problems.items() for p in ps]
        raise TrialDefinitionError(", ".join(str(p) for p in paths), problems)
    return _only(report.trials, only)


def _only(trials: list[Trial], only: list[str] | None) -> list[Trial]:
    if not only:
        return trials
    known = {t.id for t in trials}
    missing = [t for t in only if t not in known]
    if missing:
        raise ConfigurationError(f"no trial with id {', '.join(missing)}")
    return [t for t in trials if t.id in only]


def run_command(args: argparse.Namespace) -> int:
    setup_logging(args)
    if bool(args.trials) == bool(args.trials_from_server):
        raise ConfigurationError(
            "give either --trials PATH… or --trials-from-server "
            f"(the seed trials bundled with fhirmatch are in {seed_trials_dir()})"
        )
    options = MatchOptions(
        as_of=_as_of(args.as_of),
        patients=args.patient or (),
        patients_query=args.patients_query,
        dry_run=args.dry_run,
        write=frozenset(w.strip() for w in args.write.split(",") if w.strip()),
        publish=not args.trials_from_server,
        chunk_size=args.chunk_size,
        concurrency=args.concurrency,
        # the table needs only the counts; JSON and the report list every result
        keep_results=args.format == "json" or bool(args.report),
        restart=args.restart,
        bulk=args.bulk or bool(args.bulk_group),
        bulk_group=args.bulk_group,
        bulk_type_filter=args.bulk_type_filter,
        bulk_poll_max=args.bulk_poll_max,
        spill_dir=args.spill_dir,
        partition_bytes=partition_bytes(args),
    )
    trials = load_file_trials(args.trials, args.trial) if args.trials else []
    client = build_client(args)
    with client:
        client.capabilities()  # unreachable server or refused credentials fail here, early
        # the mappings/ tables: ValueSets for trials from the server, ConceptMaps for local codes
        terminology = Terminology.load()
        if args.trials_from_server:
            trials = _only(load_trials_from_server(client, terminology), args.trial)
            if not trials:
                raise ConfigurationError("the server holds no active trial with a protocol")
        progress = Progress("screening", args.progress_interval)
        with executor_from_args(args, trials, terminology) as executor:
            warn_about_trials(trials)  # once the configuration is known to be good
            freeze_heap()  # trials and engine are built: what follows is per-patient garbage
            with contextlib.ExitStack() as stack:
                state = (
                    stack.enter_context(StateStore(args.state))
                    if args.state and not args.dry_run
                    else None
                )
                outcome = run_match(
                    client,
                    trials,
                    options,
                    state=state,
                    progress=progress,
                    executor=executor,
                    terminology=terminology,
                )
        identifiers = None
        if args.report and args.report_identifier == "mrn":
            from ..report import fetch_mrns

            listed = (r.patient for r in outcome.results if r.status != "ineligible")
            identifiers = fetch_mrns(client, listed)
    emit(outcome, args.format, args.output)
    if args.report:
        from ..report import write_report

        write_report(
            args.report,
            outcome,
            trials,
            parameters=_parameters(args),
            identifiers=identifiers,
        )
    print(summary_line(outcome), file=sys.stderr)
    return exitcodes.PARTIAL if outcome.skipped else exitcodes.OK


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    keep = (
        "server",
        "auth",
        "as_of",
        "dry_run",
        "write",
        "patients_query",
        "trial",
        "report_identifier",
    )
    return {k: getattr(args, k) for k in keep if getattr(args, k, None) not in (None, False)}


def outcome_json(outcome: MatchOutcome) -> dict[str, Any]:
    """The evaluate JSON shape plus the run's write-back and skips."""
    return {
        "as_of": outcome.as_of.isoformat(),
        "results": [r.model_dump(mode="json", exclude_none=True) for r in outcome.results],
        "writes": [
            {
                "study": p.study,
                "patient": p.patient,
                "status": p.trial_status,
                "action": p.action,
                "subject_status": p.subject_status,
                "reason": p.reason,
            }
            for p in outcome.planned
        ],
        "skipped": [{"patient": k, "reason": v} for k, v in sorted(outcome.skipped.items())],
        "dry_run": outcome.dry_run,
    }


def summary_table(outcome: MatchOutcome) -> str:
    head = ("trial", "screened", "eligible", "insufficient", "ineligible", "written", "unchanged")
    rows = [head]
    for s in outcome.summaries.values():
        rows.append(
            (
                s.study.removeprefix("ResearchStudy/"),
                str(s.screened),
                str(s.eligible),
                str(s.insufficient_data),
                str(s.ineligible),
                str(s.written) + (" (dry run)" if outcome.dry_run else ""),
                str(s.unchanged),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if outcome.skipped:
        lines.append(f"skipped {len(outcome.skipped)} patients:")
        lines.extend(f"  {k}: {v}" for k, v in sorted(outcome.skipped.items()))
    return "\n".join(lines)


def summary_line(outcome: MatchOutcome) -> str:
    eligible = sum(s.eligible for s in outcome.summaries.values())
    written = sum(s.written for s in outcome.summaries.values())
    verb = "would write" if outcome.dry_run else "wrote"
    mode = "incremental" if outcome.incremental else "full"
    return (
        f"fhirmatch: {mode} run screened {outcome.screened} patients against "
        f"{len(outcome.summaries)} trials: {eligible} eligible pairs, {verb} {written} "
        f"ResearchSubjects, skipped {len(outcome.skipped)}, {outcome.requests} requests in "
        f"{outcome.seconds:.1f}s"
    )


def emit(outcome: MatchOutcome, fmt: str, output: Path | None) -> None:
    text = json.dumps(outcome_json(outcome), indent=2) if fmt == "json" else summary_table(outcome)
    if output:
        # per-patient results: owner-only, like the state file and the HTML report
        write_private_file(output, (text + "\n").encode("utf-8"))
    else:
        print(text)
