#!/usr/bin/env bash
# Runs Tern's fuzz targets (fuzz/) for SECONDS each and prints the executions of each run.
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (default: 60 s, every target)
# Needs the nightly toolchain and cargo-fuzz (installed here when absent). New inputs go to
# target/fuzz-corpus/TARGET, seeded from fuzz/corpus/TARGET; a crash stops the run and is kept in
# target/fuzz-artifacts/TARGET/ — turn it into a regression test before fixing it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
cd "$root/fuzz"
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
total=0
for t in "${targets[@]}"; do
  work="$root/target/fuzz-corpus/$t" artifacts="$root/target/fuzz-artifacts/$t/"
  mkdir -p "$work" "$artifacts" "corpus/$t"
  dict=()
  [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
  # Safe Rust throughout: without a sanitizer builds are faster and runs several times faster;
  # panics, aborts, overflows (debug assertions are on), timeouts and leaks of memory still stop it.
  log="$root/target/fuzz-$t.log"
  cargo +nightly fuzz run --sanitizer none "$t" "$work" "corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts" "${dict[@]}" >"$log" 2>&1 || {
    tail -n 40 "$log"
    echo "fuzz target $t failed; the input is in $artifacts" >&2
    exit 1
  }
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  echo "$t: ${execs:-0} executions in ${secs} s, no failure"
  total=$((total + ${execs:-0}))
done
echo "total: $total executions"
