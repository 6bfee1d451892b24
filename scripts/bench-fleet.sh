#!/usr/bin/env bash
# Push-to-serving time for fleet updates on loopback, and failed requests during the swap.
#
#   scripts/bench-fleet.sh [MQTT_URL]        (default mqtt://127.0.0.1:1883, i.e. Mosquitto)
#
# Builds release binaries, generates 5 MiB and 64 MiB models (y = relu(x·W + b)), starts one
# ternd in a fleet, and for each size: pushes version 1 (time from `tern push` to the device
# reporting `active`), then pushes version 2 while `tern bench --url` keeps 4 clients sending
# requests to the model, and reports the push-to-serving time and the failed requests.
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${1:-mqtt://127.0.0.1:1883}
PY=${TERN_TEST_PYTHON:-target/debug/tern-e2e-venv/bin/python}
cargo build --release -p tern-daemon --bins >&2
BIN=target/release
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
FLEET="bench-$$"
$BIN/tern keygen --out "$WORK/fleet.key" >/dev/null
mkdir -p "$WORK/repo"
$BIN/ternd --repository "$WORK/repo" --listen 127.0.0.1:0 --mqtt "$URL" --fleet "$FLEET" \
  --device-id dev --trust-key "$WORK/fleet.pub" > "$WORK/ternd.out" 2> "$WORK/ternd.log" &
for _ in $(seq 100); do grep -q listening "$WORK/ternd.out" && break; sleep 0.1; done
HTTP=$(sed -n 's/ternd listening on //p' "$WORK/ternd.out")

wait_active() { # model version
  while ! $BIN/tern status --fleet "$FLEET" --mqtt "$URL" --json |
      "$PY" -c "import json,sys; r=[x for x in json.load(sys.stdin) if x['model']=='$1']; sys.exit(0 if r and r[0]['state']=='active' and r[0]['target_version']==$2 else 1)"; do
    sleep 0.05
  done
}

now() { date +%s.%N; }

for MIB in 5 64; do
  NAME="large$MIB"
  "$PY" tests/python/make_large_model.py "$MIB" "$WORK/$NAME-1.onnx" 1
  "$PY" tests/python/make_large_model.py "$MIB" "$WORK/$NAME-2.onnx" 2
  T0=$(now)
  PUSH=$($BIN/tern push "$WORK/$NAME-1.onnx" --model "$NAME" --version 1 --key "$WORK/fleet.key" \
    --fleet "$FLEET" --mqtt "$URL" --json)
  wait_active "$NAME" 1
  T1=$(now)
  $BIN/tern bench --url "$HTTP" "$NAME" --clients 4 --duration 25 --json > "$WORK/load-$MIB.json" &
  LOAD=$!
  sleep 2
  T2=$(now)
  $BIN/tern push "$WORK/$NAME-2.onnx" --model "$NAME" --version 2 --key "$WORK/fleet.key" \
    --fleet "$FLEET" --mqtt "$URL" --json > /dev/null
  wait_active "$NAME" 2
  T3=$(now)
  wait $LOAD
  "$PY" - "$MIB" "$T0" "$T1" "$T2" "$T3" "$PUSH" "$WORK/load-$MIB.json" <<'PYEOF'
import json, sys
mib, t0, t1, t2, t3, push, load = sys.argv[1:]
push = json.loads(push)
load = json.load(open(load))["report"]
lat = load.get("latency_us") or {}
print(json.dumps({
    "model_mib": float(mib), "bytes": push["bytes"], "chunks": push["chunks"],
    "publish_s": round(push["seconds"], 2),
    "push_to_serving_s": round(float(t1) - float(t0), 2),
    "push_to_serving_under_load_s": round(float(t3) - float(t2), 2),
    "load": {"sent": load["sent"], "ok": load["ok"], "rejected": load["rejected"],
             "timed_out": load["timed_out"], "failed": load["failed"],
             "p50_us": lat.get("p50_us"), "p99_us": lat.get("p99_us")},
}))
PYEOF
done
