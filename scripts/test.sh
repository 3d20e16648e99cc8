#!/usr/bin/env bash
# The test command: runs the whole test suite (unit + integration) against PostgreSQL, then the
# integration suite again through PgBouncer in transaction mode (a release that carries prepared
# statements, DB_POOLER_MODE=transaction-prepared), then the contract test
# (scripts/contract.sh: property-based tests from the OpenAPI document).
#
#   scripts/test.sh [cargo test args...]
#
# The PgBouncer pass and the contract test run when the whole suite does: no arguments, or only
# options for the test binaries after `--` (as CI passes `-- --show-output`). A selection
# (`--lib`, `--test api`, a name filter) runs just that.
# Without DATABASE_URL it starts a throwaway PostgreSQL under target/pg (stopped and removed on exit,
# also on failure or Ctrl-C). With DATABASE_URL it uses that server: the URL must be allowed to
# CREATE DATABASE, because every integration test gets a fresh, uniquely named database.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/pg.sh
. scripts/lib/pg.sh

if [ -z "${DATABASE_URL:-}" ]; then
  trap 'pg_stop_pgbouncer; pg_stop' EXIT
  trap 'exit 130' INT TERM
  pg_start test
  export TEST_DATABASE_URL="$PG_URL"
  # The TLS tests start PostgreSQL servers of their own (tests/api/pg_tls.rs) from these binaries.
  export TEST_PG_BIN="$PG_BIN"
else
  export TEST_DATABASE_URL="$DATABASE_URL"
fi
# tests/api/pgbouncer.rs and pooler_prepared.rs run the service through PgBouncers of their own:
# Debian's 1.18 and one that carries prepared statements (built once into target/pgbouncer).
TEST_PGBOUNCER="$(pg_pgbouncer_binary 1.18)"
TEST_PGBOUNCER_PREPARED="$(pg_pgbouncer_binary prepared)"
export TEST_PGBOUNCER TEST_PGBOUNCER_PREPARED
# Load drills open thousands of sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

whole=1
if [ $# -gt 0 ] && [ "$1" != "--" ]; then whole=0; fi
for arg in "${@:2}"; do
  case "$arg" in -*) ;; *) whole=0 ;; esac
done

cargo test --locked "$@"

if [ "$whole" = 1 ]; then
  # The integration suite again, every app reaching its database through PgBouncer in
  # transaction mode (DB_POOLER_MODE=transaction-prepared, its timeouts as database settings,
  # migrations direct): what users behind a pooler run. Tests that pick their own route (fault
  # proxies, TLS servers) keep it.
  if [ -n "${PG_PORT:-}" ] && [ -z "${DATABASE_URL:-}" ]; then
    pg_start_pgbouncer test "$PG_PORT" 4
    echo "==> the integration suite through PgBouncer (127.0.0.1:$PGB_PORT, DB_POOLER_MODE=transaction-prepared)" >&2
    TEST_THROUGH_PGBOUNCER="127.0.0.1:$PGB_PORT" cargo test --locked --test api -- "${@:2}"
    pg_stop_pgbouncer
  else
    echo "note: DATABASE_URL is set, so the suite's pass through PgBouncer is skipped (it runs in" >&2
    echo "      front of the throwaway cluster this script starts without DATABASE_URL)." >&2
  fi
  scripts/contract.sh
fi
