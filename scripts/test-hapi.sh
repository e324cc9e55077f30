#!/bin/sh
# The integration suite against a local HAPI FHIR JPA server: build and start it (scripts/hapi.sh),
# load the trial definitions and demo patients, run every test that talks to a FHIR server with
# FHIR_BASE_URL pointing at it, and stop it. Needs Java 17+ and Maven besides what scripts/test.sh
# needs. Extra arguments go to pytest.
. "$(dirname "$0")/env.sh"
out=$(sh scripts/hapi.sh start)
base=$(printf '%s\n' "$out" | sed -n 's/^FHIR_BASE_URL=//p' | tail -n 1)
[ -n "$base" ] || { echo "scripts/test-hapi.sh: scripts/hapi.sh printed no FHIR_BASE_URL" >&2; exit 1; }
trap 'sh scripts/hapi.sh stop' EXIT
trap 'exit 130' INT TERM
.venv/bin/python -c 'import sys; from fhirmatch.sandbox import load_fixtures; c = load_fixtures(sys.argv[1]); print("loaded", sum(c.values()), "fixture resources into", sys.argv[1])' "$base"
FHIR_BASE_URL=$base .venv/bin/python -m pytest -m "not slow" -q \
    tests/integration tests/reliability tests/badinput/test_bad_trials.py "$@"
