#!/usr/bin/env bash
# A local cluster on 127.0.0.1, one command: a PostgreSQL primary with a synchronous streaming
# standby, PgBouncer in transaction mode, three service replicas and HAProxy in front.
#
#   scripts/cluster.sh up [--port P]   start it and leave it running (prints where everything is)
#   scripts/cluster.sh status          where everything is, and what HAProxy thinks of each replica
#   scripts/cluster.sh drill [--keep]  the drills under load (an upgrade from the previous release
#                                      across the newest migration, rolling restart, kill -9 of a
#                                      replica, PgBouncer restart and PAUSE, throughput at 1-3
#                                      replicas, primary failover); exits 1 when a bound is broken.
#                                      Brings a cluster up and down itself unless one is up.
#   scripts/cluster.sh down            stop everything and remove its files
#
# Installs what is missing (PostgreSQL, PgBouncer and HAProxy from apt; oha with cargo) and says so,
# and builds the release binary (and, for drill, the previous release: scripts/build-previous-release.sh). The engine is scripts/cluster.py; see docs/scaling-out.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/pg.sh
. scripts/lib/pg.sh

command="${1:-}"
case "$command" in
  up|drill|status|down) ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

if [ "$command" = up ] || [ "$command" = drill ]; then
  pg_ensure_server
  # A PgBouncer that carries prepared statements (DB_POOLER_MODE=transaction-prepared).
  PGBOUNCER="$(pg_pgbouncer_binary prepared)"
  export PGBOUNCER
  if ! command -v haproxy >/dev/null 2>&1; then
    if [ "$(pg_installer)" = none ]; then
      echo "error: haproxy is not installed and cannot be installed from here;" >&2
      echo "       install it (Debian/Ubuntu: sudo apt-get install -y haproxy)." >&2
      exit 1
    fi
    echo "haproxy not found: installing it (apt-get install haproxy)..." >&2
    pg_apt_install --no-install-recommends haproxy
  fi
  if [ "$command" = drill ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! command -v oha >/dev/null 2>&1; then
      echo "installing oha 1.16.0 for the throughput drill (cargo install --locked; a few minutes)..." >&2
      cargo install --locked --quiet oha --version 1.16.0
    fi
  fi
  if [ "$command" = drill ]; then
    # The upgrade drill starts the cluster on the previous release (the commit before the newest
    # migration), built once into target/previous-release.
    PREVIOUS_RELEASE="$(scripts/build-previous-release.sh)"
    export PREVIOUS_RELEASE
  fi
  # The same build as loadtest/run.sh's (with the example, so the dependencies' features are the
  # same): after a load test, nothing to rebuild.
  cargo build --release --locked --quiet --bin todo-service --example lean_service
  ulimit -n 65536 2>/dev/null || true
fi
PG_BIN="$(pg_find_bindir || true)"
export PG_BIN
exec python3 scripts/cluster.py "$@"
