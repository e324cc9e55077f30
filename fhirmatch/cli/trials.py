"""``fhirmatch trials``: work with trial definitions.

Sub-subcommands (each registered by a ``_register_<name>`` function on the ``trials`` parser):

* ``check [PATH...]``: load and check definitions (default: the bundled seed trials); print each
  trial's criteria; exit 0 when all are valid, 2 (configuration error) with every problem listed
  otherwise;
* ``show ID [--trials PATH...]``: one trial's criteria in plain language;
* ``publish --server URL [PATH...]``: check the definitions, then upload each trial's
  ResearchStudy, PlanDefinition and ValueSets idempotently (conditional update on the study's
  identifier and the canonical URLs);
* ``import FILE... [--out DIR] [--id ID]``: turn ClinicalTrials.gov API v2 records (or, with
  ``--id``, a plain-text eligibility section) into trial Bundles with drafted computable criteria,
  written to ``DIR/<id>.json`` and checked;
* ``new ID [--out DIR]``: write a valid skeleton Bundle with one example criterion of each kind.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..model import EXT_DRAFTED, EXT_MANUAL_REVIEW, Criterion, DataInput, Trial
from ..trials import check_trials, computable_leaves, default_trials_paths, load_trials
from . import exitcodes

_WIDTH = 100


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``trials`` parser and its sub-subcommands."""
    p = sub.add_parser(
        "trials",
        help="check, inspect and publish trial definitions",
        description="Check and inspect computable trial definitions (ResearchStudy + "
        "PlanDefinition bundles, see docs/trial-format.md).",
    )
    trials_sub = p.add_subparsers(dest="trials_command", metavar="ACTION")
    trials_sub.required = True
    _register_check(trials_sub)
    _register_show(trials_sub)
    _register_publish(trials_sub)
    _register_import(trials_sub)
    _register_new(trials_sub)


def _register_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="draft trial definitions from ClinicalTrials.gov records or eligibility text",
        description="Import ClinicalTrials.gov API v2 study records (JSON: one study, or a page "
        "with 'studies'), or with --id one plain-text eligibility section, as trial Bundles: "
        "one action per criterion bullet, common structured criteria (age, sex, ECOG/Karnofsky, "
        "lab thresholds, pregnancy, HIV/HBV/HCV, brain metastases, prior therapy) drafted as "
        "computable and marked 'drafted, not reviewed', everything else manual. Writes "
        "DIR/<id>.json and checks it. Deterministic, offline.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="record or text files")
    p.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="output directory (default: .)"
    )
    p.add_argument(
        "--id",
        dest="trial_id",
        default=None,
        metavar="ID",
        help="the files are eligibility text (one file) for the trial with this id",
    )
    p.add_argument("--title", default=None, help="the trial's title (with --id)")
    p.set_defaults(func=run_import)


def _register_new(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "new",
        help="write a skeleton trial definition to start from",
        description="Write DIR/<ID>.json: a valid trial Bundle with one example criterion of "
        "each kind (lab threshold, diagnosis present, medication given, manual), marked "
        "incomplete until the protocol's criteria replace the examples.",
    )
    p.add_argument("trial_id", metavar="ID", help="trial id (an NCT number or a local id)")
    p.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="output directory (default: .)"
    )
    p.add_argument("--title", default=None, help="the trial's title")
    p.set_defaults(func=run_new)


def _register_publish(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .common import add_config_option, add_logging_options, add_server_options

    p = sub.add_parser(
        "publish",
        help="upload trial definitions to a FHIR server, idempotently",
        description="Check the trial definitions, then upload each trial's ResearchStudy, "
        "PlanDefinition and bundled ValueSets with conditional updates (on the study's "
        "identifier and the canonical URLs), so publishing twice changes nothing.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="trial files/dirs (default: $FHIRMATCH_TRIALS, else the bundled seed trials)",
    )
    add_config_option(p)
    add_server_options(p)
    add_logging_options(p)
    p.set_defaults(func=run_publish)


def _register_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="validate trial definitions and list their criteria",
        description="Validate trial definition files or directories: FHIR R4 validity, "
        "ValueSets, FHIRPath, UCUM units, analytes, manual reasons, unique ids. Exit 0 when all "
        "are valid, 2 otherwise.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="files or directories (default: $FHIRMATCH_TRIALS, else the bundled seed trials)",
    )
    p.set_defaults(func=run_check)


def _register_show(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "show",
        help="print one trial's criteria in plain language",
        description="Print a trial's criteria: kind, wording, and how each is computed (inputs, "
        "value sets, look-back, unit, condition) or why it needs manual review.",
    )
    p.add_argument("trial_id", metavar="ID", help="ResearchStudy id, e.g. NCT06767007")
    p.add_argument(
        "--trials",
        nargs="+",
        type=Path,
        metavar="PATH",
        default=None,
        help="trial files or directories (default: $FHIRMATCH_TRIALS, else the bundled seed "
        "trials)",
    )
    p.set_defaults(func=run_show)


def _walk(criteria: Sequence[Criterion], depth: int = 0) -> Iterator[tuple[int, Criterion]]:
    for c in criteria:
        yield depth, c
        yield from _walk(c.children, depth + 1)


def _how(c: Criterion) -> str:
    if c.is_group:
        return f"group:{c.selection}"
    return "manual" if c.is_manual else "computable"


def print_table(trial: Trial, out: TextIO) -> None:
    """Print one trial's criteria as a table: id, kind, computable/manual/group, title."""
    rows = [(("  " * d) + c.id, c.kind, _how(c), c.text) for d, c in _walk(trial.criteria)]
    wid = max(len(r[0]) for r in rows)
    print(f"{trial.id}: {trial.title}", file=out)
    print(f"  {'criterion':<{wid}}  {'kind':<9}  {'how':<12}  wording", file=out)
    for cid, kind, how, text in rows:
        line = " ".join(text.split())
        room = max(20, _WIDTH - wid - 30)
        if len(line) > room:
            line = line[: room - 1] + "…"
        print(f"  {cid:<{wid}}  {kind:<9}  {how:<12}  {line}", file=out)
    counts = {"computable": 0, "manual": 0}
    for _, c in _walk(trial.criteria):
        if not c.is_group:
            counts["manual" if c.is_manual else "computable"] += 1
    drafted = len(trial.drafted_criteria())
    print(
        f"  {counts['computable']} computable, {counts['manual']} manual "
        f"({len(trial.criteria)} top-level criteria)"
        + (f"; {drafted} drafted, not reviewed" if drafted else "")
        + ("; DEFINITION INCOMPLETE" if trial.incomplete else ""),
        file=out,
    )


def run_check(args: argparse.Namespace) -> int:
    paths = list(args.paths) or default_trials_paths()
    report = check_trials(paths)
    for trial in report.trials:
        print_table(trial, sys.stdout)
        print(file=sys.stdout)
    for source, warnings in report.warnings.items():
        for warning in warnings:
            print(f"fhirmatch: warning: {source}: {warning}", file=sys.stderr)
    if report.trials:
        done, total = computable_leaves(report.trials)
        print(
            f"{done} of {total} leaf criteria computable ({100 * done / total:.0f}%) "
            f"in {len(report.trials)} trial(s)."
        )
    if report.unused_value_sets:
        from ..importer import imported_value_sets

        drafts = imported_value_sets()
        unused = [url for url in report.unused_value_sets if url not in drafts]
        for_drafts = len(report.unused_value_sets) - len(unused)
        if for_drafts:
            print(
                f"{for_drafts} ValueSet(s) no criterion of these trials uses serve the criteria "
                "`fhirmatch trials import` drafts."
            )
        if unused:
            print(
                f"fhirmatch: warning: {len(unused)} ValueSet(s) no criterion uses and no draft "
                "names (editing them changes nothing):",
                file=sys.stderr,
            )
            for url in unused:
                print(f"  - {url}", file=sys.stderr)
    if report.ok:
        print(f"{len(report.trials)} trial(s) valid.")
        return exitcodes.OK
    for source, problems in report.problems.items():
        print(f"{source}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    n = sum(len(p) for p in report.problems.values())
    print(f"fhirmatch: {n} problem(s) in trial definitions", file=sys.stderr)
    return exitcodes.CONFIG_ERROR


def _describe_input(di: DataInput) -> str:
    parts = [f"%{di.name}: {di.resource_type}"]
    if di.value_set:
        parts.append(f"coded in {di.value_set} ({len(di.codes)} codes)")
    if di.possible_codes:
        parts.append(f"{len(di.possible_codes)} class codes read as undecided")
    for path, url in di.extra_filters:
        parts.append(f"{path} in {url}")
    if di.lookback_days is not None:
        parts.append(f"within the last {di.lookback_days} days")
    if di.select == "latest":
        parts.append("latest result")
    if di.unit:
        parts.append(f"in {di.unit}")
    if di.analyte:
        parts.append(f"analyte {di.analyte}")
    if di.clinical_status != "any":
        parts.append(f"clinical status {di.clinical_status}")
    if di.required:
        parts.append("required (missing = unknown)")
    return ", ".join(parts)


def print_criterion(c: Criterion, out: TextIO, depth: int = 0) -> None:
    """Print one criterion (and its sub-criteria) in plain language."""
    pad = "  " * depth
    wrap = textwrap.TextWrapper(
        width=_WIDTH, initial_indent=pad + "    ", subsequent_indent=pad + "    "
    )
    print(f"{pad}[{c.kind}] {c.id}", file=out)
    print(wrap.fill(" ".join(c.text.split())), file=out)
    if c.is_group:
        if c.drafted is not None:
            span = " ".join(c.drafted.split())
            print(wrap.fill(f"DRAFTED, NOT REVIEWED: drafted from {span!r}"), file=out)
        need = "every one" if c.selection == "all" else "at least one"
        print(f"{pad}    group: {need} of these must pass", file=out)
        for child in c.children:
            print_criterion(child, out, depth + 1)
        return
    if c.drafted is not None:
        span = " ".join(c.drafted.split())
        print(wrap.fill(f"DRAFTED, NOT REVIEWED: drafted from {span!r}"), file=out)
    if c.is_manual:
        print(wrap.fill(f"manual review: {c.manual_reason}"), file=out)
    else:
        for di in c.inputs:
            print(wrap.fill("input " + _describe_input(di)), file=out)
        print(wrap.fill(f"condition: {c.expression}"), file=out)
    if c.note:
        for para in c.note.splitlines():
            print(wrap.fill(f"note: {para}"), file=out)


def run_show(args: argparse.Namespace) -> int:
    paths = list(args.trials) if args.trials else default_trials_paths()
    trials = load_trials(paths)
    matches = [t for t in trials if t.id == args.trial_id]
    if not matches:
        known = ", ".join(sorted(t.id for t in trials)) or "none"
        raise exitcodes.CliExit(
            exitcodes.CONFIG_ERROR, f"no trial {args.trial_id!r} (known: {known})"
        )
    trial = matches[0]
    out = sys.stdout
    print(f"{trial.id}: {trial.title}", file=out)
    for system, value in trial.identifiers:
        print(f"  identifier {system} | {value}", file=out)
    print(f"  criteria: {trial.plan_definition_url or trial.plan_definition_id}", file=out)
    from ..trials import trial_warnings

    for warning in trial_warnings(trial):
        print(f"  WARNING: {warning.split(': ', 1)[1]}", file=out)
    print(file=out)
    for c in trial.criteria:
        print_criterion(c, out)
        print(file=out)
    return exitcodes.OK


def run_publish(args: argparse.Namespace) -> int:
    from ..match import publish_trials
    from .common import build_client, setup_logging
    from .match import load_file_trials

    setup_logging(args)
    paths = list(args.paths) or default_trials_paths()
    trials = load_file_trials(paths, None)  # everything is checked before anything is sent
    with build_client(args) as client:
        client.capabilities()
        refs = publish_trials(client, trials)
    for study, plan in refs.items():
        print(f"{study} -> {plan}")
    print(f"published {len(refs)} trials to {client.base_url}", file=sys.stderr)
    return exitcodes.OK


def _out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, f"--out {path}: not a directory")
    if not path.exists() and not path.parent.is_dir():
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, f"--out {path}: no such directory")
    return path


def _write_bundles(bundles: list[tuple[str, dict[str, Any]]], out: Path) -> list[Path]:
    from ..importer import dump_bundle

    out.mkdir(exist_ok=True)
    written: list[Path] = []
    for tid, bundle in bundles:
        path = out / f"{tid}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(dump_bundle(bundle), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def _summary(bundle: dict[str, Any]) -> str:
    plan = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "PlanDefinition"
    )
    counts = {"drafted": 0, "manual": 0}

    def walk(actions: list[dict[str, Any]]) -> None:
        for a in actions:
            urls = {e.get("url") for e in a.get("extension") or []}
            if a.get("action"):
                walk(a["action"])
            elif EXT_DRAFTED in urls:
                counts["drafted"] += 1
            elif EXT_MANUAL_REVIEW in urls:
                counts["manual"] += 1

    walk(plan.get("action") or [])
    return f"{counts['drafted']} drafted computable, {counts['manual']} manual"


def run_import(args: argparse.Namespace) -> int:
    from ..errors import ConfigurationError
    from ..importer import check_id, read_records, study_bundle, text_bundle

    out = _out_dir(args.out)
    bundles: list[tuple[str, dict[str, Any]]] = []
    try:
        if args.trial_id is not None:
            if len(args.files) != 1:
                raise ConfigurationError("--id takes exactly one eligibility text FILE")
            check_id(args.trial_id)
            try:
                text = args.files[0].read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigurationError(f"{args.files[0]}: cannot read: {exc}") from exc
            bundles.append((args.trial_id, text_bundle(args.trial_id, text, title=args.title)))
        else:
            if args.title is not None:
                raise ConfigurationError("--title goes with --id (records carry their titles)")
            for path in args.files:
                for record in read_records(path):
                    bundle = study_bundle(record)
                    bundles.append((str(bundle["entry"][0]["resource"]["id"]), bundle))
    except ConfigurationError as exc:
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, str(exc)) from exc
    ids = [tid for tid, _ in bundles]
    duplicates = sorted({t for t in ids if ids.count(t) > 1})
    if duplicates:
        raise exitcodes.CliExit(
            exitcodes.CONFIG_ERROR, f"the files hold trial {', '.join(duplicates)} more than once"
        )
    written = _write_bundles(bundles, out)
    report = check_trials(written)
    for path, (_tid, bundle) in zip(written, bundles, strict=True):
        print(f"wrote {path} ({_summary(bundle)})")
    for source, warnings in report.warnings.items():
        for warning in warnings:
            print(f"fhirmatch: warning: {source}: {warning}", file=sys.stderr)
    if not report.ok:
        for source, problems in report.problems.items():
            print(f"{source}:", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        return exitcodes.FAILURE
    print(
        f"{len(written)} trial(s) drafted and valid; review every drafted criterion "
        "(fhirmatch trials show ID --trials DIR) and remove its 'drafted' mark."
    )
    return exitcodes.OK


def run_new(args: argparse.Namespace) -> int:
    from ..errors import ConfigurationError
    from ..importer import skeleton_bundle

    out = _out_dir(args.out)
    try:
        bundle = skeleton_bundle(args.trial_id, title=args.title)
    except ConfigurationError as exc:
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, str(exc)) from exc
    path = out / f"{args.trial_id}.json"
    if path.exists():
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, f"{path} exists; not overwriting it")
    (written,) = _write_bundles([(args.trial_id, bundle)], out)
    report = check_trials([written])
    if not report.ok:  # the skeleton must always be valid
        for problems in report.problems.values():
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        return exitcodes.FAILURE
    for warnings in report.warnings.values():
        for warning in warnings:
            print(f"fhirmatch: warning: {warning}", file=sys.stderr)
    print(f"wrote {written}: edit its four EXAMPLE criteria, then fhirmatch trials check {written}")
    return exitcodes.OK
