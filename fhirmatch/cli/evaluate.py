"""``fhirmatch evaluate``: screen patient files against trial definitions, offline.

::

    fhirmatch evaluate [--trials fixtures/trials] --patients fixtures/patients \\
        [--as-of 2026-11-01] [--format table|json|ndjson] [--output FILE] [--trial ID ...]
        [--executor local|processes|dask] [--scheduler tcp://host:8786] [--workers N]

``table`` prints a per-patient, per-trial summary for a terminal; ``json`` one
:class:`~fhirmatch.results.EvaluationReport` (with the run's ``problems``); ``ndjson`` one
:class:`~fhirmatch.results.TrialResult` per line, streamed as patients are evaluated, and one
``{"problem": "..."}`` line per problem, before the results it concerns. NDJSON patient files not
ordered by patient (Bulk Data exports) are grouped in bounded memory (:mod:`fhirmatch.stream`);
``--executor`` spreads the evaluation over processes or a Dask cluster
(:mod:`fhirmatch.executors`) with identical output.

For scripts: ``--output FILE`` writes the results to an owner-only file that appears only when the
run ends (never half-written); stderr carries each problem once, a progress line on a terminal,
and a one-line summary. Exit codes: 0 when everything was evaluated, whatever the verdicts; 1 when
some input was skipped (each listed as a problem); 2 for bad arguments, unreadable trial files,
or ``--patients`` missing, unreadable or holding no patient; 141 when the reader closed the
output (``| head``), quietly, as a program stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import IO, TYPE_CHECKING, TextIO

from ..engine import Engine
from ..errors import ConfigurationError, TerminologyError
from ..executors import (
    add_executor_arguments,
    executor_from_args,
    freeze_heap,
    partition_bytes,
)
from ..results import CriterionResult, EvaluationReport, TrialResult, result_json
from . import exitcodes

if TYPE_CHECKING:
    from ..model import Trial
    from ..records import PatientRecord
    from ..terminology import Terminology

_OUTCOME_MARK = {"pass": "+", "fail": "x", "unknown": "?", "manual": "m"}
#: exit code when the reader of the output went away (128 + SIGPIPE, as the shell reports it)
#: width the table's trial titles are wrapped to
TITLE_WIDTH = 96


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
        "--output",
        type=Path,
        metavar="FILE",
        help="write the results to FILE (owner-only; it appears when the run ends) instead of "
        "stdout",
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
    from ..data import default_trial_paths
    from ..trialcache import load_compiled

    trials, terminology = load_compiled(args.trials or default_trial_paths(), args.valuesets)
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


def _check_patients(paths: list[str]) -> None:
    """Exit 2 before anything is read when a ``--patients`` path is missing or unreadable."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise exitcodes.CliExit(
                exitcodes.CONFIG_ERROR, f"--patients {raw}: no such file or directory"
            )
        need = os.R_OK | (os.X_OK if path.is_dir() else 0)
        if not os.access(path, need):
            raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, f"--patients {raw}: not readable")


class _Output:
    """Where results go: stdout, or ``--output FILE`` written to an owner-only temporary file
    beside it and moved into place by :meth:`commit` (so a failed run leaves no half file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tmp: str | None = None
        self.stream: TextIO = sys.stdout
        if path is None:
            return
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise exitcodes.CliExit(
                exitcodes.CONFIG_ERROR, f"--output {path}: no such directory {folder}"
            )
        try:
            fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise exitcodes.CliExit(
                exitcodes.CONFIG_ERROR, f"--output {path}: cannot write there ({exc.strerror})"
            ) from None
        os.fchmod(fd, 0o600)
        self.stream = open(fd, "w", encoding="utf-8")

    @property
    def to_terminal(self) -> bool:
        return self.path is None and self.stream.isatty()

    def commit(self) -> None:
        if self.path is None or self._tmp is None:
            self.stream.flush()
            return
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self._tmp, self.path)
        self._tmp = None

    def discard(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


class _Progress:
    """On a terminal (stderr), a line counting patients, rewritten at most ten times a second;
    nothing otherwise. Log lines clear it first (see :class:`_ProblemHandler`)."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.shown = False
        self._t0 = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        rate = done / (now - self._t0) if now > self._t0 else 0.0
        self.stream.write(f"\rfhirmatch evaluate: {done} patients ({rate:.0f}/s)\033[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


class _ProblemHandler(logging.Handler):
    """Prints each warning of the ``fhirmatch`` logger once, as ``fhirmatch: message``."""

    def __init__(self, stream: IO[str], progress: _Progress) -> None:
        super().__init__(logging.WARNING)
        self.stream = stream
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.clear()
            self.stream.write(f"fhirmatch: {record.getMessage()}\n")
            self.stream.flush()
        except Exception:  # a broken stderr must not stop the run
            self.handleError(record)


@contextlib.contextmanager
def _stderr_reporting(progress: _Progress) -> Iterator[None]:
    """Problems (logged by the loader and the executors, once each) go to stderr once."""
    logger = logging.getLogger("fhirmatch")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = [_ProblemHandler(sys.stderr, progress)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def run(args: argparse.Namespace) -> int:
    """Run ``fhirmatch evaluate``; returns the exit code."""
    t0 = time.monotonic()
    _check_patients(args.patients)
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
    from ..trialcache import load_unit_factors, save_unit_factors
    from .common import warn_about_trials

    warn_about_trials(trials)  # once the configuration is known to be good
    load_unit_factors()
    output = _Output(args.output)
    progress = _Progress(sys.stderr, sys.stderr.isatty() and not output.to_terminal)
    tally = _Tally()
    freeze_heap()
    try:
        with _stderr_reporting(progress), executor:
            evaluated = executor.evaluate_files(
                args.patients,
                as_of=as_of,
                problems=problems,
                spill_dir=args.spill_dir,
                partition_bytes=partition_bytes(args),
            )
            _write(
                _with_problems(evaluated, problems, tally, progress),
                args.format,
                as_of,
                output.stream,
                tally,
            )
        progress.clear()
    except BrokenPipeError:
        output.discard()
        exitcodes.silence_stdout()
        return exitcodes.BROKEN_PIPE
    except BaseException:
        output.discard()
        progress.clear()
        raise
    if tally.patients == 0:
        output.discard()
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, "no patients found in --patients")
    try:
        output.commit()
    except BrokenPipeError:
        exitcodes.silence_stdout()
        return exitcodes.BROKEN_PIPE
    save_unit_factors()
    print(tally.summary(len(trials), time.monotonic() - t0), file=sys.stderr)
    return exitcodes.PARTIAL if tally.problems else exitcodes.OK


class _Tally:
    """Counts for the summary line."""

    def __init__(self) -> None:
        self.patients = 0
        self.problems = 0
        self.statuses: dict[str, int] = {"eligible": 0, "insufficient-data": 0, "ineligible": 0}

    def add(self, results: list[TrialResult]) -> None:
        self.patients += 1
        for r in results:
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1

    def summary(self, n_trials: int, seconds: float) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.statuses.items())
        skipped = (
            f"; {self.problems} problem{'s' if self.problems != 1 else ''} (input skipped)"
            if self.problems
            else ""
        )
        return (
            f"fhirmatch: evaluated {self.patients} patient{'s' if self.patients != 1 else ''} "
            f"against {n_trials} trial{'s' if n_trials != 1 else ''} in {seconds:.1f} s: "
            f"{counts}{skipped}"
        )


#: what :func:`_write` consumes: per patient, the problems seen since the previous patient
#: (general ones, then the record's own) and its results
Item = tuple[list[str], list[TrialResult]]


def _with_problems(
    evaluated: Iterator[tuple[PatientRecord, list[TrialResult]]],
    problems: list[str],
    tally: _Tally,
    progress: _Progress,
) -> Iterator[Item]:
    """Pair each patient's results with the problems found since the last one; a last item with
    no results carries the problems found after the last patient."""
    seen = 0
    for record, results in evaluated:
        new = problems[seen:] + record.problems
        seen = len(problems)
        tally.problems += len(new)
        tally.add(results)
        progress(tally.patients)
        yield new, results
    rest = problems[seen:]
    tally.problems += len(rest)
    if rest:
        yield rest, []


def _write(items: Iterator[Item], fmt: str, as_of: date, out: TextIO, tally: _Tally) -> None:
    if fmt == "json":
        collected: list[TrialResult] = []
        all_problems: list[str] = []
        for item_problems, trial_results in items:
            all_problems.extend(item_problems)
            collected.extend(trial_results)
        if tally.patients == 0:
            return
        report = EvaluationReport(as_of=as_of, results=collected, problems=all_problems)
        out.write(report.model_dump_json(indent=2))
        out.write("\n")
        return
    if fmt == "ndjson":
        write = _bytes_writer(out)
        for item_problems, trial_results in items:
            lines = [
                json.dumps({"problem": problem}, ensure_ascii=False).encode("utf-8")
                for problem in item_problems
            ]
            lines.extend(result_json(tr) for tr in trial_results)
            lines.append(b"")
            write(b"\n".join(lines))
        return
    for item_problems, trial_results in items:
        out.write(format_table(trial_results, as_of, item_problems))
        out.flush()


def _bytes_writer(out: TextIO) -> Callable[[bytes], None]:
    """Writes UTF-8 bytes to ``out`` and flushes them: to its binary buffer when it has one
    (a file or stdout: no decoding and encoding again), else as text."""
    buffer = getattr(out, "buffer", None)
    if buffer is None:

        def write_text(data: bytes) -> None:
            out.write(data.decode("utf-8"))
            out.flush()

        return write_text
    out.flush()  # nothing written as text may follow what is written to the buffer

    def write(data: bytes) -> None:
        buffer.write(data)
        buffer.flush()

    return write


def format_table(trial_results: list[TrialResult], as_of: date, problems: list[str]) -> str:
    """A readable summary of one patient's results (one block per trial)."""
    if not trial_results:
        return ""
    lines = [f"{trial_results[0].patient}  (as of {as_of})"]
    lines.extend(f"  ! {p}" for p in problems)
    for tr in trial_results:
        head = f"  {tr.study}"
        if tr.title:
            # whole words only: a long title continues on the next lines, indented
            lines.extend(
                textwrap.wrap(
                    f"{head} {tr.title}",
                    width=TITLE_WIDTH,
                    subsequent_indent=" " * (len(head) + 1),
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
        else:
            lines.append(head)
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
