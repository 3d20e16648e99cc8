#!/usr/bin/env bash
# The test command: runs the whole test suite (unit + integration) against PostgreSQL, and then
# the contract test (scripts/contract.sh: property-based tests from the OpenAPI document).
#
#   scripts/test.sh [cargo test args...]
#
# The contract test runs when the whole suite does: no arguments, or only options for the test
# binaries after `--` (as CI passes `-- --show-output`). A selection (`--lib`, `--test api`, a
# name filter) runs just that.
# Without DATABASE_URL it starts a throwaway PostgreSQL under target/pg (stopped and removed on exit,
# also on failure or Ctrl-C). With DATABASE_URL it uses that server: the URL must be allowed to
# CREATE DATABASE, because every integration test gets a fresh, uniquely named database.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/pg.sh
. scripts/lib/pg.sh

if [ -z "${DATABASE_URL:-}" ]; then
  trap pg_stop EXIT
  trap 'exit 130' INT TERM
  pg_start test
  export TEST_DATABASE_URL="$PG_URL"
  # The TLS tests start PostgreSQL servers of their own (tests/api/pg_tls.rs) from these binaries.
  export TEST_PG_BIN="$PG_BIN"
else
  export TEST_DATABASE_URL="$DATABASE_URL"
fi
# tests/api/pgbouncer.rs runs the service through a PgBouncer of its own.
pg_ensure_pgbouncer
TEST_PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
export TEST_PGBOUNCER
# Load drills open thousands of sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --locked "$@"

whole=1
if [ $# -gt 0 ] && [ "$1" != "--" ]; then whole=0; fi
for arg in "${@:2}"; do
  case "$arg" in -*) ;; *) whole=0 ;; esac
done
if [ "$whole" = 1 ]; then
  scripts/contract.sh
fi
