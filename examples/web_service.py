"""Screen patients from a web service handler, in process (standard library only).

    python examples/web_service.py http://127.0.0.1:8080/fhir [--port 8000]
    curl 'http://127.0.0.1:8000/screen?patient=PATIENT_ID'

``GET /screen?patient=ID`` screens that patient against the trials, writes back candidates (as
``fhirmatch match`` does) and answers JSON. One :class:`fhirmatch.Engine` and one client serve
every request; the engine is immutable and thread-safe, so requests run concurrently. The server
URL may come from ``FHIR_BASE_URL``; ``FHIRMATCH_AS_OF`` fixes the evaluation date. On start the
script prints one line, ``listening on URL``. The trials are those in ``$FHIRMATCH_TRIALS``, else
the seed trials bundled with fhirmatch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import fhirmatch

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class ScreeningApp:
    """A WSGI application: ``GET /screen?patient=ID`` -> JSON results per trial."""

    def __init__(self, client: fhirmatch.FhirClient, trials: list[fhirmatch.Trial]) -> None:
        self.client = client
        self.trials = trials
        self.engine = fhirmatch.Engine(trials, fhirmatch.Terminology.load())
        as_of = os.environ.get("FHIRMATCH_AS_OF")
        self.options = fhirmatch.MatchOptions(as_of=dt.date.fromisoformat(as_of) if as_of else None)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/screen" or environ.get("REQUEST_METHOD") != "GET":
            return self._json(start_response, "404 Not Found", {"error": "GET /screen?patient=ID"})
        patient = (parse_qs(environ.get("QUERY_STRING", "")).get("patient") or [""])[0]
        if not patient or "/" in patient:
            return self._json(start_response, "400 Bad Request", {"error": "patient id needed"})
        try:
            outcome = fhirmatch.screen_patients(
                self.client, self.trials, [patient], self.options, engine=self.engine
            )
        except fhirmatch.NetworkError as exc:
            return self._json(start_response, "502 Bad Gateway", {"error": exc.message})
        if outcome.skipped:
            reason = next(iter(outcome.skipped.values()))
            return self._json(start_response, "404 Not Found", {"error": reason})
        body = {
            "patient": patient,
            "results": [
                {"study": r.study, "status": r.status, "title": r.title} for r in outcome.results
            ],
            "writes": {p.study: p.action for p in outcome.planned},
        }
        return self._json(start_response, "200 OK", body)

    @staticmethod
    def _json(start_response: StartResponse, status: str, body: Any) -> list[bytes]:
        data = json.dumps(body, sort_keys=True).encode()
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        )
        return [data]


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # requests go to logging
        logging.getLogger("web_service").info(format, *args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", nargs="?", default=os.environ.get("FHIR_BASE_URL"))
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not args.server:
        parser.error("give the server URL (or set FHIR_BASE_URL)")
    logging.basicConfig(level=logging.INFO)
    trials = fhirmatch.load_trials(fhirmatch.default_trial_paths())
    with fhirmatch.connect(args.server) as client:
        fhirmatch.publish_trials(client, trials)
        app = ScreeningApp(client, trials)
        with make_server(
            "127.0.0.1", args.port, app, ThreadingWSGIServer, handler_class=QuietHandler
        ) as httpd:
            print(f"listening on http://127.0.0.1:{httpd.server_port}", flush=True)
            try:
                httpd.serve_forever()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
