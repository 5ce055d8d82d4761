#!/usr/bin/env bash
# Before/after a change, in one session: bench_apply.py run in interleaved rounds against two commits' code (the same
# checkpoints, the same venv, the same load), plus `capmerge --help` start-up. Prints both tables per round; compare
# the medians over rounds (the first round warms the page cache: drop it).
#   bash benchmarks/bench_ab.sh BEFORE_REV [ROUNDS]     # after = the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: bench_ab.sh BEFORE_REV [ROUNDS]}
rounds=${2:-4}
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/before" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/before" "$before"
cp capmerge/_native*.so "$tmp/before/capmerge/" 2>/dev/null || true
for v in before after; do
  src=$PWD; [ $v = before ] && src=$tmp/before
  printf '#!/bin/sh\nPYTHONPATH=%s exec %s -P -m capmerge "$@"\n' "$src" "$PWD/.venv/bin/python" > "$tmp/capmerge-$v"
  chmod +x "$tmp/capmerge-$v"
done
for r in $(seq 1 "$rounds"); do
  for v in before after; do
    echo "=== round $r $v"
    .venv/bin/python benchmarks/bench_apply.py --layers 4 --repeats 3 --no-mergekit --no-csv \
      --work-dir benchmarks/work --capmerge "$tmp/capmerge-$v" 2>&1 | grep -v '^  repeat'
    /usr/bin/time -f "start-up $v: %e s wall, %U+%S s cpu" "$tmp/capmerge-$v" --help > /dev/null
  done
done
