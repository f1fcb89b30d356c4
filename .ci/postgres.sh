#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the distributed-search tests, and print
#   export BESPOKE_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@127.0.0.1:PORT/DB
# on stdout (everything else goes to stderr), so callers do: eval "$(.ci/postgres.sh)".
# Idempotent: a server already answering on the port is reused. Installs the Debian `postgresql`
# package (quietly) when no server binaries are found and we are root.
# Env: BESPOKE_PG_PORT (54329), BESPOKE_PG_DIR (/tmp/bespoke-pg), BESPOKE_PG_USER/PASSWORD/DB.
set -euo pipefail

PORT="${BESPOKE_PG_PORT:-54329}"
DIR="${BESPOKE_PG_DIR:-/tmp/bespoke-pg}"
USER_="${BESPOKE_PG_USER:-bespoke}"
PASS="${BESPOKE_PG_PASSWORD:-bespoke}"
DB="${BESPOKE_PG_DB:-bespoke_test}"

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

BIN="$(find_bin || true)"
if [ -z "$BIN" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "no PostgreSQL server binaries and not root: install the 'postgresql' package"; exit 1
  fi
  log "installing postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  BIN="$(find_bin)"
fi

# The server refuses to run as root: use the package's `postgres` account when we are root.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home "$DIR" postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  mkdir -p "$DIR"
  [ "$(id -u)" -eq 0 ] && chown postgres "$DIR"
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    log "initdb in $DIR/data"
    as_owner "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
  fi
  log "starting the server on 127.0.0.1:$PORT"
  as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >/dev/null
fi

psql_() { "$BIN/psql" -v ON_ERROR_STOP=1 -q -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }
if [ "$(psql_ -tAc "SELECT 1 FROM pg_roles WHERE rolname='$USER_'" postgres)" != "1" ]; then
  psql_ -c "CREATE ROLE $USER_ LOGIN PASSWORD '$PASS'" postgres >&2
fi
if [ "$(psql_ -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" postgres)" != "1" ]; then
  psql_ -c "CREATE DATABASE $DB OWNER $USER_" postgres >&2
fi

echo "export BESPOKE_TEST_POSTGRES_URL=postgresql://$USER_:$PASS@127.0.0.1:$PORT/$DB"
