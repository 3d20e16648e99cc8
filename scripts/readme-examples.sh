#!/usr/bin/env bash
# Keeps the README honest: starts the service with the README's run command (scripts/run.sh, on a
# free port) and runs every `curl` line of README.md's "API" section as printed, checking the
# HTTP status written in its trailing comment (`# 201`). Stops everything it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin_port=$(free_port)
log=$(mktemp)
LISTEN_ADDR="127.0.0.1:$port" ADMIN_LISTEN_ADDR="127.0.0.1:$admin_port" scripts/run.sh >"$log" 2>&1 &
runner=$!
cleanup() {
  # SIGINT reaches the service through run.sh, whose trap then stops PostgreSQL.
  pkill -INT -P "$runner" 2>/dev/null || true
  wait "$runner" 2>/dev/null || true
  rm -f "$log"
}
trap cleanup EXIT

for _ in $(seq 1 600); do
  if curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$runner" 2>/dev/null; then cat "$log"; echo "run.sh exited early" >&2; exit 1; fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { cat "$log"; echo "service never became ready" >&2; exit 1; }

# The curl lines of the API section, in order.
mapfile -t examples < <(awk '/^## API/{on=1; next} /^## /{on=0} on && /^curl /' README.md)
[ "${#examples[@]}" -ge 8 ] || { echo "found only ${#examples[@]} curl examples in README.md" >&2; exit 1; }

failed=0
for line in "${examples[@]}"; do
  expected=$(sed -n 's/.*# \([0-9][0-9][0-9]\).*/\1/p' <<<"$line")
  cmd=${line//localhost:8080/127.0.0.1:$port}
  cmd=${cmd//localhost:9091/127.0.0.1:$admin_port}
  # Insert -w after `curl` to read the status without changing what the example prints.
  out=$(bash -c "curl -w '\n%{http_code}' ${cmd#curl }" 2>&1) || { echo "FAILED (curl error): $line"; failed=1; continue; }
  status=$(tail -n1 <<<"$out")
  if [ -n "$expected" ] && [ "$status" != "$expected" ]; then
    printf 'FAILED: %s\n  expected %s, got %s\n%s\n' "$line" "$expected" "$status" "$out"; failed=1
  else
    printf 'ok %s  %s\n' "$status" "$line"
  fi
done
[ "$failed" = 0 ] && echo "${#examples[@]} passed, 0 failed" || { echo "README examples failed"; exit 1; }
