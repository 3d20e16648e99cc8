#!/usr/bin/env bash
# The run command: builds and serves todo-service.
#
#   scripts/run.sh [--release] [todo-service args...]
#
# Without DATABASE_URL it starts a throwaway PostgreSQL under target/pg with a `todos` database,
# and stops and removes it when the service exits (Ctrl-C). With DATABASE_URL it uses that server.
# Every other setting comes from the environment (see .env.example or `todo-service --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/pg.sh
. scripts/lib/pg.sh

profile=()
if [ "${1:-}" = "--release" ]; then profile=(--release); shift; fi

if [ -z "${DATABASE_URL:-}" ]; then
  trap pg_stop EXIT
  trap 'exit 130' INT TERM
  pg_start run
  pg_create_db "$PG_URL" todos
  export DATABASE_URL="${PG_URL%/postgres}/todos"
fi
export LISTEN_ADDR="${LISTEN_ADDR:-127.0.0.1:8080}"

cargo build --locked "${profile[@]}" --bin todo-service
target_dir="${CARGO_TARGET_DIR:-target}/$([ ${#profile[@]} -gt 0 ] && echo release || echo debug)"
# Not exec: the trap above must still stop PostgreSQL when the service exits.
"$target_dir/todo-service" "$@"
