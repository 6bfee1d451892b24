#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, for a machine that has one (see targets/README.md, "CUDA").
# Nothing is built here: BIN holds x86-64 binaries built elsewhere with the `cuda` feature:
#   tern         cargo build --release -p tern-daemon --features cuda --bin tern
#   core-tests   cargo test --release -p tern-core --features cuda --test core --no-run
#   export-tests cargo test --release -p tern-core --features cuda --test exports --no-run
# It needs python3 with numpy, onnx and onnxruntime (for the references of the bench models).
#
#   scripts/gpu_check.sh BIN OUT [quick]
#
# `quick` runs the accuracy tests alone (the test binaries are all BIN needs then).
# Writes OUT/gpu-check.log (everything) and OUT/bench.jsonl (one `tern bench --json` per line).
set -uo pipefail
bin=$(realpath "${1:?BIN}")
out=$(realpath -m "${2:?OUT}")
quick=${3:-}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
repo=$(pwd)
failed=0
step() { echo; echo "== $*"; }
check() { "$@" || { echo "FAILED: $*"; failed=1; }; }

step "the machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
nproc
# cudarc opens the CUDA libraries by name at run time; the toolkit and the pip wheels keep
# them in folders the loader does not search. Not the toolkit's stubs: its stub libcuda
# would shadow the driver's.
libdirs=$(find /usr/local /opt /usr/lib -xdev \( -name 'libcudnn.so*' -o -name 'libnvrtc.so*' \
  -o -name 'libcublas.so*' -o -name 'libcudart.so*' \) -not -path '*/stubs/*' 2>/dev/null \
  | xargs -r -n1 dirname | sort -u)
echo "CUDA libraries in: $libdirs"
LD_LIBRARY_PATH="$(echo "$libdirs" | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
# The test binaries find the bundled models through the checkout they were built in
# (BUILT_IN, /work/main unless said otherwise).
built_in=${BUILT_IN:-/work/main}
if [ ! -e "$built_in" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -s "$repo" "$built_in"
fi

if [ "$quick" = quick ]; then
  step "accuracy: every bundled model on CUDA against onnxruntime's stored outputs"
  check env TERN_REQUIRE_GPU=1 "$bin/core-tests" cuda --nocapture --test-threads 1
  check "$bin/export-tests" cuda --nocapture
  [ $failed = 0 ] && echo "ALL CHECKS PASSED" || echo "SOME CHECKS FAILED"
  exit $failed
fi

step "bench models (generated here: resnet18 is too big to carry)"
bm=/tmp/bench-models
mkdir -p $bm
check python3 models/generate_bench.py $bm

step "placement: what tract runs on the GPU"
for m in models/{digits,digits-int8-qdq,digits-int8-qop,resblock,resblock-int8-qdq,resblock-int8-qop}/1/model.onnx \
    models/testdata/mobilenet/fp32.onnx $bm/mobilenetv3-small.onnx $bm/resnet18.onnx; do
  echo "-- $m"
  check "$bin/tern" inspect "$m" --device cuda | grep -E "^device|placed by"
done

step "accuracy: every bundled model on CUDA against onnxruntime's stored outputs"
check env TERN_REQUIRE_GPU=1 "$bin/core-tests" cuda --nocapture --test-threads 1
check "$bin/export-tests" cuda --nocapture

step "outputs of the bench models on the GPU against onnxruntime (CPU)"
for m in mobilenetv3-small-x0.35-48x192 mobilenetv3-small resnet18; do
  for prec in f32 f16; do
    flag=; input=$bm/$m.input.npy
    if [ $prec = f16 ]; then # f16 plans take f16 inputs
      flag=--f16 input=/tmp/input16.npy
      python3 -c "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1]).astype(np.float16))" $bm/$m.input.npy $input
    fi
    rm -rf /tmp/o && check "$bin/tern" run $bm/$m.onnx -i $input --device cuda $flag --output-dir /tmp/o >/dev/null
    python3 - "$m" "$prec" $bm/$m.output.npy /tmp/o/*.npy <<'EOF' || failed=1
import sys, numpy as np
name, prec, ref, got = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), np.load(sys.argv[4]).astype(np.float32)
d = float(np.abs(got - ref).max())
scale = float(np.abs(ref).max())
top = bool((got.reshape(got.shape[0], -1).argmax(1) == ref.reshape(ref.shape[0], -1).argmax(1)).all())
print(f"{name} {prec}: max abs diff {d:.3g} on outputs up to {scale:.3g}, top-1 same: {top}")
EOF
  done
done

step "latency: GPU against this machine's CPU"
bench() { # label, then tern bench arguments
  local label=$1; shift
  if "$bin/tern" bench "$@" --json > /tmp/b.json 2>/tmp/b.err; then
    python3 -c "import json,sys; d=json.load(open('/tmp/b.json')); d['label']=sys.argv[1]; print(json.dumps(d))" "$label" >> "$out/bench.jsonl"
    python3 -c "import json,sys; d=json.load(open('/tmp/b.json')); l=d['latency_us']; print(f\"{sys.argv[1]:<44} p50 {l['p50_us']/1000:8.3f} ms  p99 {l['p99_us']/1000:8.3f} ms\")" "$label"
  else
    echo "FAILED: tern bench $*"; cat /tmp/b.err; failed=1
  fi
}
for spec in "digits:models/digits/1/model.onnx" "x0.35:$bm/mobilenetv3-small-x0.35-48x192.onnx" \
    "mnv3s:$bm/mobilenetv3-small.onnx" "resnet18:$bm/resnet18.onnx"; do
  name=${spec%%:*}; m=${spec#*:}
  for b in 1 32; do
    bench "$name b$b cuda f32" "$m" --batch $b --device cuda --iters 200 --warmup 20
    bench "$name b$b cuda f16" "$m" --batch $b --device cuda --f16 --iters 200 --warmup 20
    bench "$name b$b cpu 1 thread" "$m" --batch $b --iters $((b == 1 ? 100 : 10)) --warmup 3
    bench "$name b$b cpu 16 threads" "$m" --batch $b --threads 16 --iters $((b == 1 ? 100 : 20)) --warmup 3
  done
done

step "done"
[ $failed = 0 ] && echo "ALL CHECKS PASSED" || echo "SOME CHECKS FAILED"
exit $failed
