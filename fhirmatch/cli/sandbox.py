"""``fhirmatch sandbox``: run the local FHIR R4 server loaded with the trials and demo patients."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from types import FrameType

from ..options import port_number
from ..sandbox import start_sandbox
from . import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sandbox",
        help="run a local FHIR R4 server (127.0.0.1) loaded with the trials and demo patients",
        description="Start a real FHIR R4 server (sekmet-fhir) bound to 127.0.0.1 with its "
        "workflow simulator disabled, load the seed trials and demo patients bundled with "
        "fhirmatch, print its base URL, and serve until Ctrl-C.",
    )
    p.add_argument("--port", type=port_number, default=0, help="TCP port (default: a free one)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep the server's SQLite database here (default: a temporary directory, removed "
        "on exit)",
    )
    p.add_argument(
        "--no-load",
        action="store_true",
        help="start empty: do not load the seed trials and demo patients",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.port and not 0 < args.port < 65536:
        raise exitcodes.CliExit(exitcodes.CONFIG_ERROR, f"--port {args.port} is not a TCP port")
    handle = start_sandbox(port=args.port, data_dir=args.data_dir, load=not args.no_load)

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        if handle.loaded:
            summary = ", ".join(f"{n} {t}" for t, n in sorted(handle.loaded.items()))
            print(f"loaded: {summary}", flush=True)
        print(handle.base_url, flush=True)
        while handle.alive():
            time.sleep(0.5)
        print(f"fhirmatch: the sandbox stopped unexpectedly:\n{handle.log_tail()}")
        return exitcodes.FAILURE
    except KeyboardInterrupt:
        return exitcodes.OK
    finally:
        handle.stop()
