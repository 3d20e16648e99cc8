#!/usr/bin/env bash
# One-command load tests: the post-mortem's spike, stepped ab runs, oha workloads against a pgbench
# baseline running the same SQL, telemetry export on/off, a 2000-connection flood, a database outage
# and a memory soak.
#
#   loadtest/run.sh [--quick] [--duration SECS] [--soak SECS] [--scenarios spike,steps,...] [--url URL]
#
# Installs what is missing (ab, oha, openssl, matplotlib) and says so; starts a throwaway PostgreSQL and the
# service in release mode unless DATABASE_URL / --url point at running ones; targets 127.0.0.1 only;
# stops everything it started on exit, Ctrl-C or failure. Results: loadtest/results/<UTC>.json, a
# Markdown summary beside it, and PNG plots. See loadtest/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../scripts/lib/pg.sh
. scripts/lib/pg.sh

installed=()
as_root() { if [ "$(id -u)" = "0" ]; then "$@"; else sudo "$@"; fi; }

if ! command -v ab >/dev/null 2>&1; then
  echo "installing ab (Debian apache2-utils)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends apache2-utils >/dev/null
  installed+=("ab (apt apache2-utils)")
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "installing openssl (Debian) for the db_tls scenario's server certificate..." >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends openssl >/dev/null
  installed+=("openssl (apt)")
fi
# The pooler scenario runs PgBouncers of its own: Debian's 1.18 and one that carries prepared
# statements (built once into target/pgbouncer).
PGBOUNCER_1_18="$(pg_pgbouncer_binary 1.18)"
PGBOUNCER_PREPARED="$(pg_pgbouncer_binary prepared)"
export PGBOUNCER_1_18 PGBOUNCER_PREPARED
OHA_VERSION=1.16.0
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
  echo "installing oha $OHA_VERSION (cargo install --locked; a few minutes)..." >&2
  cargo install --locked --quiet oha --version "$OHA_VERSION"
  installed+=("oha $OHA_VERSION (cargo install --locked)")
fi
if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
  echo "installing matplotlib (pip) for the plots..." >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore matplotlib
  installed+=("matplotlib (pip)")
fi
[ -n "${PG_BIN:-}" ] || pg_ensure_server
PG_BIN="${PG_BIN:-$(pg_find_bindir || true)}"
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/pgbench" ]; then
  echo "error: pgbench not found with the PostgreSQL server binaries; install postgresql" >&2
  exit 1
fi
export PG_BIN
if [ ${#installed[@]} -gt 0 ]; then printf 'installed: %s\n' "${installed[@]}" >&2; fi

url_given=0
for a in "$@"; do [ "$a" = "--url" ] && url_given=1; done
if [ -z "${DATABASE_URL:-}" ] && [ "$url_given" = 0 ]; then
  trap pg_stop EXIT
  trap 'exit 130' INT TERM
  pg_start loadtest
  pg_create_db "$PG_URL" todos
  export DATABASE_URL="${PG_URL%/postgres}/todos"
  # The outage scenario stops and starts this cluster.
  export LOADTEST_PG_DATA="$PG_DIR/data" LOADTEST_PG_LOG="$PG_DIR/server.log"
fi

if [ "$url_given" = 0 ]; then
  # The lean twin (no middleware) is measured beside the service on every workload; the OTLP/gRPC
  # sink receives the telemetry scenario's gRPC export.
  cargo build --release --locked --quiet --bin todo-service --example lean_service --example otlp_sink
fi
# Not exec: the trap above must still stop PostgreSQL.
# The flood and the open-loop overload hold thousands of sockets at once, on both ends.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
python3 loadtest/run.py "$@"
