# shellcheck shell=bash
# Throwaway PostgreSQL for the run and test commands.
#
# Sourced, not executed. `pg_start NAME` starts a fresh cluster from the installed server binaries in
# target/pg/NAME on a free 127.0.0.1 port with trust auth, and exports PG_URL (superuser, database
# "postgres"). `pg_stop` stops it and removes the directory; callers register it in a trap so it also
# runs on failure and Ctrl-C. PostgreSQL refuses to run as root, so as root its binaries run as the
# `postgres` system user.

PG_ROOT_DIR="${PG_ROOT_DIR:-$(pwd)/target/pg}"

pg_find_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return 0; fi
  local d
  # Highest installed major version first.
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}

pg_free_port() {
  python3 - <<'PY' 2>/dev/null && return 0
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
  # Fallback without python: probe random high ports with bash's /dev/tcp.
  local p
  for _ in $(seq 1 50); do
    p=$(( (RANDOM % 20000) + 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  return 1
}

# Runs a PostgreSQL binary as the postgres user when we are root.
pg_as_owner() {
  # From /: the postgres user may not be allowed into the caller's working directory.
  if [ "$(id -u)" = "0" ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Who may run apt-get here: prints "root", "sudo" (password-less) or "none". Never prompts.
pg_installer() {
  if ! command -v apt-get >/dev/null 2>&1; then echo none
  elif [ "$(id -u)" = "0" ]; then echo root
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then echo sudo
  else echo none
  fi
}

# apt-get update + install of the given packages, as root or through password-less sudo.
pg_apt_install() {
  local as_root=()
  [ "$(pg_installer)" = sudo ] && as_root=(sudo -n)
  export DEBIAN_FRONTEND=noninteractive
  "${as_root[@]}" apt-get update -qq >&2 && "${as_root[@]}" apt-get install -y -qq "$@" >/dev/null
}

# Installs PostgreSQL's server binaries from the distribution when none are found, and says so:
# the run and test commands are all the set-up a fresh machine needs. As root directly; otherwise
# through sudo when it needs no password (never a prompt in a script). Without apt-get or rights,
# says what to run instead.
pg_ensure_server() {
  pg_find_bindir >/dev/null && return 0
  if [ "$(pg_installer)" = none ]; then
    echo "error: PostgreSQL server binaries (initdb, pg_ctl) were not found, and they cannot be" >&2
    echo "       installed from here (no apt-get, or no root and no password-less sudo)." >&2
    echo "       Install them (Debian/Ubuntu: sudo apt-get install -y postgresql)," >&2
    echo "       or set DATABASE_URL to a server you already run." >&2
    return 1
  fi
  echo "PostgreSQL server binaries not found: installing them (apt-get install postgresql; a minute or two)..." >&2
  pg_apt_install postgresql || {
    echo "error: apt-get install postgresql failed; install it by hand or set DATABASE_URL." >&2
    return 1
  }
  pg_find_bindir >/dev/null || { echo "error: installed postgresql, but initdb is still not found" >&2; return 1; }
  echo "installed PostgreSQL server binaries in $(pg_find_bindir)" >&2
}

# Debian's PgBouncer (1.18: no prepared statements in transaction mode), for the tests and the
# load test that measure that release: installed the way pg_ensure_server installs PostgreSQL.
pg_ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then return 0; fi
  if [ "$(pg_installer)" = none ]; then
    echo "error: pgbouncer is not installed and cannot be installed from here;" >&2
    echo "       install it (Debian/Ubuntu: sudo apt-get install -y pgbouncer)." >&2
    return 1
  fi
  echo "pgbouncer not found: installing it (apt-get install pgbouncer)..." >&2
  pg_apt_install --no-install-recommends pgbouncer || {
    echo "error: apt-get install pgbouncer failed; install it by hand." >&2
    return 1
  }
}

# `pg_pgbouncer_binary [prepared|1.18]`: the path of a PgBouncer of that kind, provided first:
# `prepared` (the default) carries prepared statements in transaction mode (1.21 or later, built by
# scripts/build-pgbouncer.sh into target/pgbouncer), `1.18` is Debian's package.
pg_pgbouncer_binary() {
  case "${1:-prepared}" in
    prepared) "$(dirname "${BASH_SOURCE[0]}")/../build-pgbouncer.sh" ;;
    1.18) pg_ensure_pgbouncer && { command -v pgbouncer || echo /usr/sbin/pgbouncer; } ;;
    *) echo "error: pg_pgbouncer_binary: unknown kind $1 (prepared or 1.18)" >&2; return 1 ;;
  esac
}

# `pg_start_pgbouncer NAME SERVER_PORT POOL_SIZE [prepared|1.18]`: PgBouncer in transaction mode
# on a free 127.0.0.1 port, in front of the throwaway cluster on SERVER_PORT, every database name
# passed through (`*`), trust auth as the cluster has; `prepared` (the default) with
# max_prepared_statements. Exports PGB_PORT and PGB_DIR; `pg_stop_pgbouncer` stops it. It runs as
# the postgres user when we are root (PgBouncer refuses root).
pg_start_pgbouncer() {
  local name="$1" server_port="$2" pool_size="$3" kind="${4:-prepared}"
  local binary prepared=""
  binary="$(pg_pgbouncer_binary "$kind")" || return 1
  if [ "$kind" = prepared ]; then prepared="max_prepared_statements = 200"; fi
  PGB_PORT=$(pg_free_port) || { echo "error: no free port found" >&2; return 1; }
  PGB_DIR=$(mktemp -d "/tmp/todo-service-pgbouncer-$name.XXXXXX")
  chmod 755 "$PGB_DIR"
  printf '"postgres" ""\n' >"$PGB_DIR/userlist.txt"
  cat >"$PGB_DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$server_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $PGB_DIR/userlist.txt
pool_mode = transaction
default_pool_size = $pool_size
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits,options
$prepared
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_DIR/pgbouncer.pid
INI
  # A copy beside its configuration: run as the postgres user, it may not reach into the checkout.
  install -m 0755 "$binary" "$PGB_DIR/pgbouncer"
  if [ "$(id -u)" = "0" ]; then chown -R postgres: "$PGB_DIR"; fi
  if ! pg_as_owner "$PGB_DIR/pgbouncer" -d "$PGB_DIR/pgbouncer.ini"; then
    cat "$PGB_DIR/pgbouncer.log" >&2 2>/dev/null
    return 1
  fi
  local _
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PGB_PORT") 2>/dev/null; then
      echo "started $("$binary" --version | head -1) (transaction mode, $pool_size server connections per database) on 127.0.0.1:$PGB_PORT" >&2
      export PGB_PORT PGB_DIR
      return 0
    fi
    sleep 0.05
  done
  echo "error: PgBouncer did not listen on $PGB_PORT; its log follows" >&2
  cat "$PGB_DIR/pgbouncer.log" >&2 2>/dev/null
  return 1
}

pg_stop_pgbouncer() {
  if [ -n "${PGB_DIR:-}" ] && [ -d "$PGB_DIR" ]; then
    # SIGINT: shut down once no query runs (from 1.23 on, SIGTERM waits for every client to leave).
    if [ -f "$PGB_DIR/pgbouncer.pid" ]; then kill -INT "$(cat "$PGB_DIR/pgbouncer.pid")" 2>/dev/null || true; fi
    rm -rf "$PGB_DIR"
    echo "stopped PgBouncer" >&2
  fi
  PGB_DIR=""
}

pg_start() {
  local name="${1:-default}"
  local bindir
  pg_ensure_server || return 1
  bindir=$(pg_find_bindir)
  if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
    echo "error: running as root but there is no 'postgres' system user to run PostgreSQL as." >&2
    echo "       Install the server package (apt-get install -y postgresql) which creates it." >&2
    return 1
  fi
  PG_PORT=$(pg_free_port) || { echo "error: no free port found" >&2; return 1; }
  mkdir -p "$PG_ROOT_DIR"
  PG_DIR="$PG_ROOT_DIR/$name-$$"
  rm -rf "$PG_DIR"
  PG_LINK=""
  if [ "$(id -u)" = "0" ] && ! runuser -u postgres -- test -x "$PG_ROOT_DIR" 2>/dev/null; then
    # The checkout lies under a directory the postgres user cannot enter (e.g. a 0700 temp dir).
    # Rather than loosen permissions outside the repository, keep the cluster in a private
    # directory of its own and link it from target/pg so it is still easy to find.
    PG_LINK="$PG_DIR"
    PG_DIR=$(mktemp -d "/tmp/todo-service-pg-$name.XXXXXX")
    ln -s "$PG_DIR" "$PG_LINK"
  fi
  mkdir -p "$PG_DIR"
  if [ "$(id -u)" = "0" ]; then chown postgres: "$PG_DIR"; fi
  echo "starting throwaway PostgreSQL ($bindir) in $PG_DIR on 127.0.0.1:$PG_PORT" >&2
  if ! pg_as_owner "$bindir/initdb" --auth=trust --username=postgres --encoding=UTF8 --locale=C \
      -D "$PG_DIR/data" >"$PG_DIR/initdb.log" 2>&1; then
    cat "$PG_DIR/initdb.log" >&2
    return 1
  fi
  # fsync off: the cluster is thrown away, durability across a machine crash is irrelevant here.
  # max_connections leaves room for many test databases' pools at once.
  if ! pg_as_owner "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
      start >/dev/null; then
    echo "error: PostgreSQL did not start; its log follows" >&2
    cat "$PG_DIR/server.log" >&2
    return 1
  fi
  PG_BIN="$bindir"
  export PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  export PG_DIR PG_PORT PG_BIN
}

pg_stop() {
  if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ]; then
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
    echo "stopped throwaway PostgreSQL" >&2
  fi
  if [ -n "${PG_LINK:-}" ]; then rm -f "$PG_LINK"; fi
  PG_DIR=""
  PG_LINK=""
}

# Creates database $2 on the server at admin URL $1 unless it exists (psql from the same install).
pg_create_db() {
  local admin_url="$1" db="$2"
  local psql="${PG_BIN:-$(pg_find_bindir)}/psql"
  if ! "$psql" "$admin_url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    "$psql" "$admin_url" -qc "CREATE DATABASE \"$db\"" >/dev/null
  fi
}
