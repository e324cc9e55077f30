"""Argument groups and plumbing shared by the subcommands that talk to a FHIR server.

- Server options (URL, auth, TLS, timeouts) build a :class:`fhirmatch.client.FhirClient`.
  Secrets are never flags: tokens and passwords come from a file or an environment variable,
  private keys from a file.
- ``--config FILE`` reads a TOML file whose keys are the long flag names (``server``,
  ``auth``, ``token-file``, ``state``, ...), checked against the flags' own types, choices and
  ranges (:mod:`fhirmatch.cli.config`); flags given on the command line win.
- ``--log-format text|json`` and ``--log-level``; logs go to stderr and carry resource ids,
  never patient data.
- A progress display: a bar on a terminal, a plain line every ``--progress-interval`` seconds
  otherwise (cron).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ..errors import ConfigurationError
from ..options import non_negative_float, positive_float, positive_int

if TYPE_CHECKING:
    from ..client import FhirClient
    from ..model import Trial


def add_server_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--server", required=False, metavar="URL", help="FHIR base URL")
    g.add_argument(
        "--auth",
        choices=("none", "bearer", "basic", "smart"),
        default="none",
        help="how to authenticate (default: none)",
    )
    g.add_argument("--token-file", metavar="FILE", help="bearer token in this file")
    g.add_argument("--token-env", metavar="VAR", help="bearer token in this environment variable")
    g.add_argument("--username", help="basic auth user name")
    g.add_argument("--password-file", metavar="FILE", help="basic auth password in this file")
    g.add_argument("--password-env", metavar="VAR", help="basic auth password in this variable")
    g.add_argument("--client-id", help="SMART Backend Services client id")
    g.add_argument("--private-key", metavar="FILE", help="SMART private key (PEM file)")
    g.add_argument("--key-id", metavar="KID", help="SMART key id (JWT 'kid' header)")
    g.add_argument("--key-alg", choices=("RS384", "ES384"), default="RS384")
    g.add_argument("--scope", default="system/*.read system/*.write", help="SMART scopes")
    g.add_argument("--token-url", metavar="URL", help="token endpoint (default: discovered)")
    g.add_argument("--ca-bundle", metavar="FILE", help="CA bundle for TLS verification")
    g.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        help="do not verify TLS certificates (never in production)",
    )
    g.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow http:// to hosts other than loopback",
    )
    g.add_argument("--timeout", type=positive_float, default=60.0, help="read timeout, seconds")
    g.add_argument("--connect-timeout", type=positive_float, default=10.0, help="seconds")
    g.add_argument(
        "--retries", type=positive_int, default=5, help="attempts per request (default 5)"
    )
    p.set_defaults(_server_required=required)


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file whose keys are this command's long flag names",
    )
    p.set_defaults(_parser=p)


def add_logging_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-format", choices=("text", "json"), default="text")
    g.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    g.add_argument(
        "--progress-interval",
        type=non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="without a terminal, print a progress line this often (default 60)",
    )


def build_client(args: argparse.Namespace, *, strict: bool = False) -> FhirClient:
    """A FhirClient from the server options (raises ConfigurationError for bad ones)."""
    # imported here: commands that need no server (evaluate) start without the HTTP stack
    from ..auth import build_auth
    from ..client import ClientConfig, FhirClient

    if not args.server:
        raise ConfigurationError("--server URL is required")
    if args.retries < 1:
        raise ConfigurationError("--retries must be at least 1")
    auth = build_auth(
        args.auth,
        token_env=args.token_env,
        token_file=args.token_file,
        username=args.username,
        password_env=args.password_env,
        password_file=args.password_file,
        client_id=args.client_id,
        private_key_path=args.private_key,
        kid=args.key_id,
        alg=args.key_alg,
        scope=args.scope,
        token_url=args.token_url,
    )
    if args.ca_bundle and not Path(args.ca_bundle).is_file():
        raise ConfigurationError(f"--ca-bundle {args.ca_bundle} is not a file")
    config = ClientConfig(
        base_url=args.server,
        auth=auth,
        connect_timeout=args.connect_timeout,
        read_timeout=args.timeout,
        max_attempts=args.retries,
        verify=not args.insecure_skip_tls_verify,
        ca_bundle=args.ca_bundle,
        allow_insecure_http=args.allow_insecure_http,
        extra_headers={"Prefer": "handling=strict"} if strict else {},
        connections=max(10, getattr(args, "concurrency", 1)),
    )
    return FhirClient(config)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry)


def setup_logging(args: argparse.Namespace, stream: TextIO | None = None) -> None:
    """Configure the ``fhirmatch`` logger (not the root: library users keep theirs)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fhirmatch")
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(args, "log_level", "INFO"))
    logger.propagate = False


class Progress:
    """A progress bar on a terminal; a plain line every ``interval`` seconds otherwise."""

    def __init__(self, label: str, interval: float = 60.0, stream: TextIO | None = None) -> None:
        self.label = label
        self.interval = interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = time.monotonic()
        self._t0 = self._last

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.tty:
            width = 30
            filled = int(width * done / total) if total else width
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self._last >= self.interval or done >= total:
            rate = done / (now - self._t0) if now > self._t0 else 0.0
            self.stream.write(f"{self.label}: {done}/{total} patients ({rate:.1f}/s)\n")
            self.stream.flush()
            self._last = now


def warn_about_trials(trials: Iterable[Trial], out: TextIO | None = None) -> None:
    """One warning line per incomplete definition or unreviewed draft (stderr by default)."""
    from ..trials import trial_warnings

    stream = out if out is not None else sys.stderr
    for trial in trials:
        for warning in trial_warnings(trial):
            print(f"fhirmatch: warning: {warning}", file=stream)
