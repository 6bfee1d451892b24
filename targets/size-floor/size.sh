#!/usr/bin/env bash
# Builds the floor library for a target (default aarch64-unknown-linux-gnu, the app library's
# stand-in for Android) with NNEF only and with the ONNX importer, and prints their stripped
# sizes next to Tern's app library and ternd when those were built with `--profile mobile`.
# About 5 minutes per variant on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-aarch64-unknown-linux-gnu}
dir=${CARGO_TARGET_DIR:-../../target}
export CARGO_TARGET_DIR=$dir
out=$dir/size-floor
mkdir -p "$out"
for variant in nnef onnx; do
  features=()
  [[ $variant == onnx ]] && features=(--features onnx)
  cargo build --release --locked --target "$target" "${features[@]}"
  cp "$dir/$target/release/libtern_size_floor.so" "$out/floor-$variant.so"
done
size_of() { printf '%-44s %11d B  gzip -9 %10d B\n' "$1" "$(stat -c %s "$2")" "$(gzip -9c "$2" | wc -c)"; }
size_of "floor, NNEF only (tract-nnef)" "$out/floor-nnef.so"
size_of "floor, ONNX (tract-onnx)" "$out/floor-onnx.so"
for f in "$dir/$target/mobile/libtern_ffi.so" "$dir/$target/mobile/ternd"; do
  [[ -f $f ]] && size_of "Tern: $(basename "$f") (mobile profile)" "$f"
done
exit 0
