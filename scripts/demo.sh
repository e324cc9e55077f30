#!/bin/sh
# Set up (first time) and run the demo: a local FHIR server loaded with the five seed trials and
# the demo patients, screened by the match job with write-back. Arguments go to `fhirmatch demo`.
. "$(dirname "$0")/env.sh"
exec .venv/bin/fhirmatch demo "$@"
