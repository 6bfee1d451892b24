#!/usr/bin/env bash
# Builds tern-ffi and generates its Kotlin, Swift and Python bindings (library mode).
#
#   bindings/generate.sh [OUT_DIR]          # default target/bindings
#
# Generated sources are not committed: they follow from the library, and CI regenerates and
# tests them on every run. Output:
#   OUT_DIR/python/tern.py (+ libtern_ffi.so beside it, where Python loads it from)
#   OUT_DIR/kotlin/dev/tern/tern.kt
#   OUT_DIR/swift/Tern.swift, TernFFI.h, TernFFI.modulemap
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/bindings}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

# One workspace build: the library, the generator and the `tern` CLI the tests sign with,
# sharing the artifacts `cargo test --workspace` already built.
cargo build --workspace --bins --lib --locked
LIB="$TARGET_DIR/debug/libtern_ffi.so"
BINDGEN="$TARGET_DIR/debug/uniffi-bindgen"

rm -rf "$OUT"
for lang in python kotlin swift; do
  "$BINDGEN" generate --library "$LIB" --language "$lang" --out-dir "$OUT/$lang" --no-format
done
cp "$LIB" "$OUT/python/"
echo "bindings generated in $OUT:"
find "$OUT" -type f | sort
