#!/usr/bin/env bash
# Builds Tern's app library for iOS as an XCFramework and a Swift package around it:
#
#   OUT/TernFFI.xcframework      static library for devices and the simulator, with headers
#   OUT/Tern/Package.swift       `.package(path: ".../Tern")` in Xcode; `import Tern`
#
#   targets/ios/build.sh [OUT]   # default target/ios; on macOS with Xcode
#   TERN_ONE_THREAD=1 targets/ios/build.sh   # 6 MB smaller; numThreads above 1 refused
#
# Not run in CI (no Apple SDK on Linux); CI type-checks the same crate for the iOS targets.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/ios}
rm -rf "$OUT" && mkdir -p "$OUT/headers" "$OUT/Tern/Sources/Tern"

rustup target add aarch64-apple-ios aarch64-apple-ios-sim
features=()
[[ ${TERN_ONE_THREAD:-0} == 1 ]] && features=(--no-default-features)
# staticlib: iOS apps link Rust statically; -p keeps the bindgen CLI out of the library.
for t in aarch64-apple-ios aarch64-apple-ios-sim; do
  cargo build -p tern-ffi --profile mobile --target "$t" --locked "${features[@]}"
done

# Swift sources, C header and module map from the host library's metadata.
cargo build -p tern-ffi -p uniffi-bindgen --locked
target/debug/uniffi-bindgen generate --library target/debug/libtern_ffi.dylib \
  --language swift --out-dir "$OUT/swift"
cp "$OUT/swift/ternFFI.h" "$OUT/headers/"
cp "$OUT/swift/ternFFI.modulemap" "$OUT/headers/module.modulemap"
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/mobile/libtern_ffi.a -headers "$OUT/headers" \
  -library target/aarch64-apple-ios-sim/mobile/libtern_ffi.a -headers "$OUT/headers" \
  -output "$OUT/Tern/TernFFI.xcframework"
cp "$OUT/swift/Tern.swift" "$OUT/Tern/Sources/Tern/"
cp targets/ios/Package.swift "$OUT/Tern/"
echo "Swift package in $OUT/Tern (README: add it to the app, then \`import Tern\`)"
