#!/usr/bin/env bash
# Keeps the README and docs/ honest: starts the service with the README's run command
# (scripts/run.sh, on a free port) and runs every `curl` line of README.md's "API" section as
# printed, checking the HTTP status written in its trailing comment (`# 201`), then those of
# docs/api.md's "Concurrent edits: ETags", which continue them. Then it starts it again as
# docs/authentication.md says (AUTH_MODE=jwt, a fresh AUTH_JWT_SECRET) and runs that page's
# `TOKEN=` and `curl` lines the same way. Stops everything it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log=$(mktemp)
runner=
stop_service() {
  # SIGINT reaches the service through run.sh, whose trap then stops PostgreSQL.
  if [ -n "$runner" ]; then
    pkill -INT -P "$runner" 2>/dev/null || true
    wait "$runner" 2>/dev/null || true
    runner=
  fi
}
trap 'stop_service; rm -f "$log"' EXIT

# serve VAR=VALUE...: scripts/run.sh on free ports with the given settings, until /ready answers.
# A port found free can be taken by another process before the service binds it (the throwaway
# PostgreSQL picks its own the same way): then it starts again once on fresh ports.
serve() {
  local attempt
  for attempt in 1 2; do
    port=$(free_port)
    admin_port=$(free_port)
    env LISTEN_ADDR="127.0.0.1:$port" ADMIN_LISTEN_ADDR="127.0.0.1:$admin_port" "$@" scripts/run.sh >"$log" 2>&1 &
    runner=$!
    for _ in $(seq 1 600); do
      if curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then return; fi
      if ! kill -0 "$runner" 2>/dev/null; then break; fi
      sleep 0.5
    done
    stop_service
    cat "$log"
    if [ "$attempt" = 1 ] && grep -qi "address already in use" "$log"; then
      echo "a port was taken before the service bound it; starting again on fresh ports" >&2
      continue
    fi
    # The cause last, where a shortened CI log still shows it.
    echo "run.sh exited or never became ready; its errors:" >&2
    grep -iE "error|fatal|panicked|no space" "$log" | tail -n 5 >&2 || true
    exit 1
  done
}

failed=0
total=0
# check FILE SECTION: runs the curl lines (and TOKEN= lines) of the section headed SECTION (at
# any level, up to the next heading of its level or above), in order.
check() {
  local file=$1 section=$2 line expected cmd out status
  mapfile -t examples < <(awk -v s="$section" '
    /^```/ { fence = !fence }
    !fence && /^#+ / {
      level = index($0, " ") - 1
      if (on && level <= depth) on = 0
      if (substr($0, level + 2) == s) { on = 1; depth = level; next }
    }
    on && (/^curl / || /^TOKEN=/)' "$file")
  [ "${#examples[@]}" -ge 2 ] || { echo "found only ${#examples[@]} examples in $file's $section section" >&2; exit 1; }
  for line in "${examples[@]}"; do
    cmd=${line//localhost:8080/127.0.0.1:$port}
    cmd=${cmd//localhost:9091/127.0.0.1:$admin_port}
    if [[ $line == TOKEN=* ]]; then
      # As printed, minus the trailing comment: the token for the lines after it.
      TOKEN=$(bash -c "${cmd%%  #*}; printf %s \"\$TOKEN\"") || { echo "FAILED: $line"; failed=1; continue; }
      export TOKEN
      printf 'ok      %s\n' "$line"
      continue
    fi
    total=$((total + 1))
    expected=$(sed -n 's/.*# \([0-9][0-9][0-9]\).*/\1/p' <<<"$line")
    # Insert -w after `curl` to read the status without changing what the example prints.
    out=$(bash -c "curl -w '\n%{http_code}' ${cmd#curl }" 2>&1) || { echo "FAILED (curl error): $line"; failed=1; continue; }
    status=$(tail -n1 <<<"$out")
    if [ -n "$expected" ] && [ "$status" != "$expected" ]; then
      printf 'FAILED: %s\n  expected %s, got %s\n%s\n' "$line" "$expected" "$status" "$out"; failed=1
    else
      printf 'ok %s  %s\n' "$status" "$line"
    fi
  done
}

serve
check README.md API
check docs/api.md "Concurrent edits: ETags"
stop_service

# The section's first line, with python in place of openssl (not on every machine): the service
# and the `todo-service token` line both read it.
AUTH_JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')
export AUTH_JWT_SECRET
serve AUTH_MODE=jwt
check docs/authentication.md Authentication
stop_service

[ "$failed" = 0 ] && echo "$total passed, 0 failed" || { echo "README examples failed"; exit 1; }
