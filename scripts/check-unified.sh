#!/usr/bin/env bash
# Checks that every package CI builds on its own resolves its dependencies with the
# same features as `cargo test --workspace`, so that no command compiles the
# dependency tree a second time (see crates/workspace-hack/Cargo.toml). Prints each
# dependency whose features differ and fails; add those features to the hack.
set -euo pipefail
cd "$(dirname "$0")/.."
fmt='{p} [{f}]'
tree() { cargo tree --locked "$@" -f "$fmt" --prefix none | sed 's/ (\*)$//' | sort -u; }
all=$(mktemp); one=$(mktemp)
trap 'rm -f "$all" "$one"' EXIT
tree --workspace -e normal,build,dev >"$all"
status=0
check() {
  local edges=$1; shift
  tree "$@" -e "$edges" >"$one"
  local differ
  differ=$(comm -13 "$all" "$one")
  if [[ -n "$differ" ]]; then
    printf 'cargo build %s compiles these with other features than the workspace:\n%s\n' "$*" "$differ"
    status=1
  fi
}
check normal,build -p afo-cli -p afo-workspace-hack
check normal,build -p afo-python
check normal,build,dev -p afo-examples
check normal,build,dev -p afo-benches
check normal,build,dev -p afo-engine
check normal,build,dev -p afo-cli -p afo-examples
if [[ $status == 0 ]]; then echo "features unified: every package CI builds alone shares the workspace build"; fi
exit $status
