// swift-tools-version:5.9
// Copied next to TernFFI.xcframework and Sources/Tern/Tern.swift by targets/ios/build.sh.
import PackageDescription

let package = Package(
    name: "Tern",
    platforms: [.iOS(.v15)],
    products: [.library(name: "Tern", targets: ["Tern"])],
    targets: [
        .binaryTarget(name: "TernFFI", path: "TernFFI.xcframework"),
        .target(name: "Tern", dependencies: ["TernFFI"], path: "Sources/Tern"),
    ]
)
