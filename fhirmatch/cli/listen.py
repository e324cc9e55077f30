"""``fhirmatch listen``: re-screen patients as the server notifies changes to their data."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from ..data import seed_trials_dir
from ..errors import ConfigurationError
from ..listen import DEFAULT_MAX_CRITERIA_LENGTH, Listener, ListenOptions
from ..match import load_trials_from_server
from ..options import iso_date, port_number, positive_int
from ..terminology import Terminology
from . import exitcodes
from .common import (
    add_config_option,
    add_logging_options,
    add_server_options,
    build_client,
    setup_logging,
)
from .match import _as_of, _only, load_file_trials

log = logging.getLogger("fhirmatch.cli")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "listen",
        help="re-screen patients when the server notifies new or changed data (Subscriptions)",
        description="Register R4 rest-hook Subscriptions for the resources the trials' criteria "
        "use, receive the notifications on a local HTTP endpoint, and re-screen (and write "
        "back, as 'match' does) only the affected patient. With --state, changes made while "
        "the listener was down are caught up on start. Stops on SIGTERM or Ctrl-C, removing "
        "its Subscriptions.",
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
    ep = p.add_argument_group("endpoint")
    ep.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ep.add_argument(
        "--port", type=port_number, default=0, help="port to listen on (default: any free)"
    )
    ep.add_argument(
        "--public-url",
        metavar="URL",
        help="base URL the FHIR server reaches this endpoint at (default http://HOST:PORT)",
    )
    ep.add_argument(
        "--hook-token-env",
        metavar="VAR",
        help="bearer token the server must send, from this variable (default: random per run)",
    )
    ep.add_argument(
        "--max-criteria-length",
        type=positive_int,
        default=DEFAULT_MAX_CRITERIA_LENGTH,
        help="split a Subscription whose criteria would be longer than this "
        f"(default {DEFAULT_MAX_CRITERIA_LENGTH})",
    )
    run = p.add_argument_group("run")
    run.add_argument("--state", type=Path, metavar="FILE", help="checkpoint file for catch-up")
    run.add_argument(
        "--as-of", type=iso_date, metavar="YYYY-MM-DD", help="evaluation date (default: today)"
    )
    run.add_argument("--dry-run", action="store_true", help="evaluate but write nothing")
    run.add_argument(
        "--write",
        default="candidate,potential-candidate",
        metavar="STATUSES",
        help="which new subjects to create (default: both)",
    )
    run.add_argument(
        "--workers", type=positive_int, default=4, help="concurrent screens (default 4)"
    )
    add_logging_options(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    setup_logging(args)
    if bool(args.trials) == bool(args.trials_from_server):
        raise ConfigurationError(
            "give either --trials PATH… or --trials-from-server "
            f"(the seed trials bundled with fhirmatch are in {seed_trials_dir()})"
        )
    token = None
    if args.hook_token_env:
        import os

        token = os.environ.get(args.hook_token_env)
        if not token:
            raise ConfigurationError(f"--hook-token-env: {args.hook_token_env} is not set")
    options = ListenOptions(
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        token=token,
        state_path=args.state,
        as_of=_as_of(args.as_of),
        write=frozenset(w.strip() for w in args.write.split(",") if w.strip()),
        dry_run=args.dry_run,
        publish=not args.trials_from_server,
        workers=args.workers,
        max_criteria_length=args.max_criteria_length,
    )
    trials = load_file_trials(args.trials, args.trial) if args.trials else []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with build_client(args) as client:
            client.capabilities()
            terminology = Terminology.load()
            if args.trials_from_server:
                trials = _only(load_trials_from_server(client, terminology), args.trial)
                if not trials:
                    raise ConfigurationError("the server holds no active trial with a protocol")
            with Listener(client, trials, options, terminology=terminology) as listener:
                print(f"fhirmatch: listening at {listener.endpoint}", file=sys.stderr, flush=True)
                while not stop.wait(0.5):
                    pass
                print("fhirmatch: stopping", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
    return exitcodes.OK
