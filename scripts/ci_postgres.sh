#!/usr/bin/env bash
# Install PostgreSQL (Debian apt) and start a throw-away cluster on 127.0.0.1 for the study tests;
# print the URL for them on stdout (everything else goes to stderr), so CI does:
#
#     eval "$(bash scripts/ci_postgres.sh)"     # exports DORA_LAB_TEST_POSTGRES=postgresql://...
#     .venv/bin/python -m pytest -q tests/test_study.py -k postgres
#
# Idempotent: a second call reuses the installed server and the running cluster.  Stop it with
#     bash scripts/ci_postgres.sh stop
# Settings (environment): DORA_LAB_PG_DIR (data folder, default /tmp/dora_lab_pg),
# DORA_LAB_PG_PORT (default 55432), DORA_LAB_PG_USER / _PASSWORD / _DB (default dora_lab / dora_lab /
# dora_lab_test).
set -euo pipefail
exec 3>&1 1>&2  # keep stdout for the export line only

DATA=${DORA_LAB_PG_DIR:-/tmp/dora_lab_pg}
PORT=${DORA_LAB_PG_PORT:-55432}
USER_=${DORA_LAB_PG_USER:-dora_lab}
PASS=${DORA_LAB_PG_PASSWORD:-dora_lab}
DB=${DORA_LAB_PG_DB:-dora_lab_test}
SOCK=$DATA/socket

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

# PostgreSQL refuses to run as root: as root, run the server as the 'postgres' user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

BIN=$(pg_bin)
if [ "${1:-}" = stop ]; then
  [ -n "$BIN" ] && [ -f "$DATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop || true
  exit 0
fi

if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  echo "== installing PostgreSQL (apt)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
  BIN=$(pg_bin)
fi
echo "== PostgreSQL binaries: $BIN"

if [ ! -f "$DATA/PG_VERSION" ]; then
  echo "== new cluster in $DATA"
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
  chmod 700 "$DATA"
  as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >/dev/null
fi
mkdir -p "$SOCK"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$SOCK"

if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  echo "== starting the cluster on 127.0.0.1:$PORT"
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK -c max_connections=100" start \
    3>&- </dev/null >>"$DATA/pg_ctl.out" 2>&1  # the server must not hold our stdout: $(...) would wait forever
fi

psql_() { as_pg "$BIN/psql" -h "$SOCK" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_ -c "SELECT 1 FROM pg_roles WHERE rolname = '$USER_'")" != 1 ]; then
  psql_ -c "CREATE ROLE $USER_ LOGIN PASSWORD '$PASS'"
fi
if [ "$(psql_ -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  psql_ -c "CREATE DATABASE $DB OWNER $USER_"
fi

URL="postgresql://$USER_:$PASS@127.0.0.1:$PORT/$DB"
# check the URL the tests will use, through TCP and the password
PGPASSWORD=$PASS "$BIN/psql" "$URL" -qtA -c "SELECT 1" >/dev/null
echo "== PostgreSQL ready: postgresql://$USER_:***@127.0.0.1:$PORT/$DB"
echo "export DORA_LAB_TEST_POSTGRES=$URL" >&3
