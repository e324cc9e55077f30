"""Stable exit codes of the ``fhirmatch`` command (documented in the README)."""

from __future__ import annotations

import contextlib
import os
import sys

OK = 0
#: the run finished, but some patients were skipped (unreadable data, server errors for them)
PARTIAL = 1
#: bad arguments, configuration file or trial definitions; nothing was written
CONFIG_ERROR = 2
#: the FHIR server could not be reached, refused our credentials, or kept failing after retries
SERVER_ERROR = 3
#: another run holds the state file lock, or the state file does not match this run
STATE_ERROR = 4
#: any other fhirmatch error
FAILURE = 5
#: interrupted by the user (Ctrl-C) or a signal
INTERRUPTED = 130
#: the reader closed the output (``| head``): stopped quietly, as a program stopped by SIGPIPE
BROKEN_PIPE = 141


def silence_stdout() -> None:
    """After the reader closed stdout: point it at /dev/null so the interpreter's final flush
    does not print a BrokenPipeError traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class CliExit(Exception):
    """Raised by subcommands to stop with ``code`` after printing ``message`` once."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
