#!/bin/sh
# Set up (first time) and run the checks: lint (ruff), types (mypy), and the test suite (unit tests, and
# integration tests against a local FHIR server over HTTP, or the server in FHIR_BASE_URL).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the long tests.
. "$(dirname "$0")/env.sh"
.venv/bin/ruff check fhirmatch tests benchmarks scripts
.venv/bin/mypy
.venv/bin/python -m pytest -m "not slow" -q "$@"
