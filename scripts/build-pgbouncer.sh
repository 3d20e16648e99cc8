#!/usr/bin/env bash
# Builds a PgBouncer that carries prepared statements in transaction mode (1.21 or later:
# max_prepared_statements) for the tests, the load test and the cluster, and prints its path.
# Debian 12 packages only 1.18, which cannot (DB_POOLER_MODE=transaction is for that one).
#
#   scripts/build-pgbouncer.sh [DEST_DIR]      (default target/pgbouncer; skipped when built)
#
# Source, in order: PGBOUNCER_BUILD (a build script taking DEST_DIR, such as the workplace's
# ../shared/pgbouncer/build.sh, which builds 1.25.2), that script beside the checkout when present,
# else Debian 13's source of PgBouncer 1.24.1 from the Debian archive (checked against the
# SHA-256 that Debian's Sources index gives). Builds with Debian's build packages, installed when
# missing and running as root; about a minute.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/target/pgbouncer}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

if [ -x "$dest/pgbouncer" ] && "$dest/pgbouncer" --version >/dev/null 2>&1; then
  echo "$dest/pgbouncer"
  exit 0
fi

shared="${PGBOUNCER_BUILD:-$root/../shared/pgbouncer/build.sh}"
if [ -x "$shared" ]; then
  "$shared" "$dest" >&2
  echo "$dest/pgbouncer"
  exit 0
fi

version=1.24.1
sha256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
url="http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_${version}.orig.tar.gz"

need=()
for p in build-essential pkg-config libevent-dev libssl-dev curl ca-certificates; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "build-pgbouncer.sh: missing Debian packages: ${need[*]} (apt-get install them as root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "building PgBouncer $version from Debian's source ($url)" >&2
curl -fsS --retry 3 -m 300 -o "$work/src.tar.gz" "$url"
echo "$sha256  $work/src.tar.gz" | sha256sum -c --quiet -
tar -xzf "$work/src.tar.gz" -C "$work"
cd "$work/pgbouncer-$version"
# The release tarball carries its configure script; c-ares and systemd are not needed here.
{ ./configure --without-cares --with-systemd=no && make -j"$(nproc)" pgbouncer; } >"$work/build.log" 2>&1 \
  || { tail -20 "$work/build.log" >&2; exit 1; }
install -m 0755 pgbouncer "$dest/pgbouncer"
echo "$dest/pgbouncer"
