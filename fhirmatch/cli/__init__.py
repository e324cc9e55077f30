"""The ``fhirmatch`` command line: one module per subcommand.

Each subcommand module exposes ``register(subparsers) -> None`` (adds its parser and sets
``func``) and a ``run(args) -> int``. Library code never calls ``sys.exit``; fatal problems raise
:class:`fhirmatch.cli.exitcodes.CliExit` or a :class:`fhirmatch.errors.FhirmatchError`, which
:func:`main` turns into one line on stderr and a stable exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import (
    AuthenticationError,
    ConfigurationError,
    FhirmatchError,
    NetworkError,
    StateError,
    TerminologyError,
)
from . import exitcodes

SUBCOMMANDS = ("evaluate", "match", "trials", "sandbox", "demo", "listen")

log = logging.getLogger("fhirmatch")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and the configuration exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exitcodes.CONFIG_ERROR, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``fhirmatch`` parser; with ``only``, just that subcommand is registered (its module
    alone is imported: ``evaluate`` needs none of the HTTP, report or listener code)."""
    parser = _Parser(
        prog="fhirmatch",
        description="Screen FHIR R4 patient data against computable clinical-trial eligibility "
        "criteria, and record candidates as ResearchSubject resources.",
    )
    parser.add_argument("--version", action="version", version=f"fhirmatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in SUBCOMMANDS if only is None else (only,):
        modname = f"{__name__}.{name.replace('-', '_')}"
        # every name in SUBCOMMANDS must exist once released (tests/unit/test_cli.py checks);
        # skipping absent modules keeps the CLI usable while a subcommand is being built
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(sub)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names when it is its first argument (None: build them all)."""
    return argv[0] if argv and argv[0] in SUBCOMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None) is not None:
            from .config import load_config

            # the config file's keys become defaults: flags on the command line still win
            args._parser.set_defaults(**load_config(args.config, args._parser))
            args = parser.parse_args(argv)
        return int(args.func(args))
    except exitcodes.CliExit as exc:
        if exc.message:
            print(f"fhirmatch: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("fhirmatch: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`fhirmatch trials show ID | head`): stop quietly
        exitcodes.silence_stdout()
        return exitcodes.BROKEN_PIPE
    except StateError as exc:
        print(f"fhirmatch: {exc}", file=sys.stderr)
        return exitcodes.STATE_ERROR
    except ConfigurationError as exc:
        print(f"fhirmatch: configuration error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    except TerminologyError as exc:
        # raised while loading the ValueSet/ConceptMap tables, before anything is sent
        print(f"fhirmatch: terminology error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    except AuthenticationError as exc:
        print(f"fhirmatch: authentication failed: {exc}", file=sys.stderr)
        return exitcodes.SERVER_ERROR
    except NetworkError as exc:
        print(f"fhirmatch: server error: {exc}", file=sys.stderr)
        return exitcodes.SERVER_ERROR
    except FhirmatchError as exc:
        print(f"fhirmatch: {exc}", file=sys.stderr)
        return exitcodes.FAILURE
