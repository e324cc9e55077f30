#!/bin/sh
# A local HAPI FHIR JPA server (R4, in-memory H2, 127.0.0.1) for fhirmatch's integration tests.
#
#   sh scripts/hapi.sh          build it the first time (Maven, reusing ~/.m2), start it on a free port
#                               of 127.0.0.1, wait until /metadata answers, print
#                               FHIR_BASE_URL=http://127.0.0.1:PORT/fhir as the last line, and leave it
#                               running (a second call prints the running server's URL)
#   sh scripts/hapi.sh stop     stop it
#   sh scripts/hapi.sh build    only build it
#
# Needs Java 17+ and Maven. State (pid, port, log) lives in $HAPI_RUN_DIR (default .hapi/); the server
# log is $HAPI_RUN_DIR/server.log. HAPI_HEAP sets the JVM heap cap (default 1g), HAPI_START_TIMEOUT
# the seconds to wait for /metadata (default 600).
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN_DIR=${HAPI_RUN_DIR:-$ROOT/.hapi}
HEAP=${HAPI_HEAP:-1g}
TIMEOUT=${HAPI_START_TIMEOUT:-600}
PROJECT=$ROOT/hapi
STAMP=$PROJECT/target/.built

die() { echo "scripts/hapi.sh: $*" >&2; exit "${2:-1}"; }

running_pid() {
    [ -f "$RUN_DIR/pid" ] || return 1
    pid=$(cat "$RUN_DIR/pid")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

build() {
    command -v java >/dev/null 2>&1 || die "java not found: the HAPI server needs Java 17 or newer" 2
    command -v mvn >/dev/null 2>&1 || die "mvn not found: building the HAPI server needs Maven" 2
    # rebuild when the POM or a source file is newer than the last build
    if [ -f "$STAMP" ] && [ -z "$(find "$PROJECT/pom.xml" "$PROJECT/src" -newer "$STAMP" -type f | head -n 1)" ]; then
        return 0
    fi
    echo "building the HAPI FHIR server (first build downloads its dependencies into ~/.m2)..." >&2
    mkdir -p "$RUN_DIR"
    if ! mvn -B -q -f "$PROJECT/pom.xml" -DskipTests package >"$RUN_DIR/build.log" 2>&1; then
        tail -n 40 "$RUN_DIR/build.log" >&2
        die "the Maven build failed (whole log: $RUN_DIR/build.log)"
    fi
    touch "$STAMP"
}

stop() {
    if pid=$(running_pid); then
        kill "$pid" 2>/dev/null || true
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        echo "HAPI FHIR server stopped (pid $pid)" >&2
    fi
    rm -f "$RUN_DIR/pid" "$RUN_DIR/port"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

metadata_ok() {
    curl -sf -o /dev/null --max-time 5 -H 'Accept: application/fhir+json' "$1/metadata"
}

start() {
    if pid=$(running_pid); then
        port=$(cat "$RUN_DIR/port")
        echo "HAPI FHIR server already running (pid $pid)" >&2
        echo "FHIR_BASE_URL=http://127.0.0.1:$port/fhir"
        return 0
    fi
    build
    mkdir -p "$RUN_DIR"
    port=$(free_port)
    base="http://127.0.0.1:$port/fhir"
    log="$RUN_DIR/server.log"
    # shellcheck disable=SC2086
    nohup java -Xms256m -Xmx"$HEAP" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Djava.net.preferIPv4Stack=true \
        -cp "$PROJECT/target/classes:$PROJECT/target/lib/*" org.fhirmatch.hapi.HapiServer \
        --fhirmatch.host=127.0.0.1 --fhirmatch.port="$port" >"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$RUN_DIR/pid"
    echo "$port" >"$RUN_DIR/port"
    echo "starting the HAPI FHIR server on 127.0.0.1:$port (pid $pid, log $log)..." >&2
    t0=$(date +%s)
    waited=0
    until metadata_ok "$base"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$log" >&2
            rm -f "$RUN_DIR/pid" "$RUN_DIR/port"
            die "the HAPI FHIR server exited during start-up (log: $log)"
        fi
        if [ "$waited" -ge "$TIMEOUT" ]; then
            tail -n 40 "$log" >&2
            stop
            die "the HAPI FHIR server did not answer /metadata within $TIMEOUT s (log: $log)"
        fi
        sleep 1
        waited=$(($(date +%s) - t0))
    done
    echo "HAPI FHIR server up after ${waited} s" >&2
    echo "FHIR_BASE_URL=$base"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    build) build ;;
    *) die "usage: scripts/hapi.sh [start|stop|build]" 2 ;;
esac
