#!/usr/bin/env bash
# Builds the previous release for the upgrade drill (scripts/cluster.sh drill) and prints its
# binary's path: the commit just before the one that added the newest migration, so the drill
# upgrades across that migration as a rolling deployment would. Built from `git archive` of that
# commit in a target directory of its own (so it never replaces target/release/todo-service), with
# a quicker profile than the release one (no LTO, parallel codegen, opt-level 2): the drill needs
# the old behaviour, not the old speed. Skipped when already built for that commit.
#
#   scripts/build-previous-release.sh        -> target/previous-release/<commit>/todo-service
set -euo pipefail
cd "$(dirname "$0")/.."
newest="$(git ls-files 'migrations/*.sql' | sort | tail -1)"
added="$(git log -1 --format=%H --diff-filter=A -- "$newest")"
if [ -z "$added" ] || ! git rev-parse --verify --quiet "$added^" >/dev/null; then
  echo "build-previous-release.sh: cannot find the commit before $newest was added: commit it" >&2
  echo "  first, and run from a clone with its history (a shallow clone has none)" >&2
  exit 1
fi
commit="$(git rev-parse --short=12 "$added^")"
out="target/previous-release/$commit"
if [ -x "$out/todo-service" ]; then
  echo "$PWD/$out/todo-service"
  exit 0
fi
src="target/previous-release/src-$commit"
rm -rf "$src"
mkdir -p "$src"
git archive "$commit" | tar -x -C "$src"
echo "building the previous release ($commit, before $newest) for the upgrade drill..." >&2
# Its build script names the release from TODO_SERVICE_COMMIT: the archive has no .git.
TODO_SERVICE_COMMIT="$commit" cargo build --release --locked --quiet --bin todo-service \
  --manifest-path "$src/Cargo.toml" --target-dir target/previous-release/target \
  --config 'profile.release.lto=false' --config 'profile.release.codegen-units=16' \
  --config 'profile.release.opt-level=2' >&2
mkdir -p "$out"
cp target/previous-release/target/release/todo-service "$out/todo-service"
rm -rf "$src"
echo "$PWD/$out/todo-service"
