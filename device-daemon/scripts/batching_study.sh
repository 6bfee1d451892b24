#!/usr/bin/env bash
# The dynamic-batching study of BENCHMARKS.md: static batch sweep (best static throughput T*),
# dynamic batching at saturation (64 closed-loop clients), batching off at the same load, and
# light open-loop load at ~10% of batch-1 capacity. Prints a markdown table.
#
#   device-daemon/scripts/batching_study.sh [DURATION_SECONDS] [MODELS...]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p tern-daemon --bin tern
TERN=target/release/tern
DUR=${1:-3}
shift || true
MODELS=${*:-digits digits-int8-qdq resblock resblock-int8-qdq}
WINDOW_US=500
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

echo "| model | instances | T* (static best, rows/s) @ batch | batch-1 p50 µs | dynamic @64 clients req/s | dynamic/T* | mean batch | batching off req/s | dynamic/off | light load p50 µs (target) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for m in $MODELS; do
  path=models/$m/1/model.onnx
  best=0; best_b=1
  for b in 1 2 4 8 16 32 64; do
    out=$($TERN bench "$path" --batch $b --iters 300 --json)
    t=$(echo "$out" | json 'd["throughput_per_s"]')
    if [ "$b" = 1 ]; then p50=$(echo "$out" | json 'd["latency_us"]["p50_us"]'); fi
    if python3 -c "import sys; sys.exit(0 if $t > $best else 1)"; then best=$t; best_b=$b; fi
  done
  for inst in 1 2; do
    # The batcher is configured as an operator would: max batch = the best static batch.
    dyn=$($TERN bench "$path" --clients 64 --max-batch $best_b --preferred $best_b --max-delay-us $WINDOW_US --instances $inst --duration "$DUR" --json)
    dyn_t=$(echo "$dyn" | json 'd["report"]["throughput_per_s"]')
    dyn_b=$(echo "$dyn" | json 'd["mean_batch_size"]')
    off=$($TERN bench "$path" --clients 64 --max-batch 1 --instances $inst --duration "$DUR" --json)
    off_t=$(echo "$off" | json 'd["report"]["throughput_per_s"]')
    if [ "$inst" = 1 ]; then
      rate=$(python3 -c "print(round(0.1 * 1e6 / $p50))")
      light=$($TERN bench "$path" --rate "$rate" --max-batch $best_b --max-delay-us $WINDOW_US --duration "$DUR" --json)
      light_p50=$(echo "$light" | json 'd["report"]["latency_us"]["p50_us"]')
      light_cell=$(python3 -c "print(f'{$light_p50:.0f} (≤ {$WINDOW_US + 1.1 * $p50:.0f}) at {$rate}/s')")
    else
      light_cell="–"
    fi
    python3 - "$m" "$inst" "$best" "$best_b" "$p50" "$dyn_t" "$dyn_b" "$off_t" "$light_cell" <<'PY'
import sys
m, inst, best, best_b, p50, dyn, dyn_b, off, light = sys.argv[1:]
best, p50, dyn, dyn_b, off = map(float, (best, p50, dyn, dyn_b, off))
print(f"| {m} | {inst} | {best:.0f} @ {best_b} | {p50:.0f} | {dyn:.0f} | {dyn/best:.2f} | {dyn_b:.1f} | {off:.0f} | {dyn/off:.2f} | {light} |")
PY
  done
done
