#!/usr/bin/env bash
# Builds Tern's app library for Android and lays it out for an app or an AAR:
#
#   OUT/jniLibs/{arm64-v8a,armeabi-v7a,x86_64}/libtern_ffi.so
#   OUT/kotlin/dev/tern/tern.kt          (generated bindings; needs JNA at run time)
#
#   targets/android/build.sh [OUT]      # default target/android
#   TERN_ONE_THREAD=1 targets/android/build.sh   # 6 MB smaller; numThreads above 1 refused
#
# Needs the Android NDK (ANDROID_NDK_HOME) and cargo-ndk (`cargo install cargo-ndk`). Not run
# in CI (no NDK can be had there); CI type-checks the same crate for the Android targets.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/android}
API=${ANDROID_API:-24}
: "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME to the NDK (r26 or newer)}"

rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
features=()
[[ ${TERN_ONE_THREAD:-0} == 1 ]] && features=(--no-default-features)
# -p: only the library's own features (a workspace build would pull the bindgen CLI into it).
cargo ndk --platform "$API" -t arm64-v8a -t armeabi-v7a -t x86_64 -o "$OUT/jniLibs" \
  build -p tern-ffi --profile mobile --locked "${features[@]}"

# The bindings come from the library's own metadata; any of the built ABIs will do.
cargo build -p uniffi-bindgen --locked
target/debug/uniffi-bindgen generate --library "$OUT/jniLibs/arm64-v8a/libtern_ffi.so" \
  --language kotlin --out-dir "$OUT/kotlin" --no-format
ls -l "$OUT"/jniLibs/*/libtern_ffi.so
echo "copy $OUT/jniLibs to app/src/main/jniLibs and $OUT/kotlin to app/src/main/java (README)"
