// Tern on iOS: the same calls the Kotlin test program makes (bindings/kotlin/TernTest.kt).
// No Swift compiler runs on Linux CI; tests/bindings.rs checks that every Tern name used here
// exists in the generated Tern.swift, so this file cannot drift from the bindings.
import Foundation
import Tern

/// Logits of a classifier output, as Floats.
func floats(_ t: Tensor) -> [Float] {
    t.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
}

func classify(modelURL: URL, pixels: [Float]) throws -> Int {
    // Load once, share between threads; numThreads as in LiteRT.
    let engine = try Engine.fromPath(path: modelURL.path, options: ModelOptions(numThreads: 2))
    let input = engine.inputs()[0]  // name, dtype, shape (-1 = batch), batchAxis
    let request = Tensor(
        name: input.name,
        dtype: .f32,
        shape: [1, 1, 8, 8],
        data: pixels.withUnsafeBytes { Data($0) }
    )
    let logits = floats(try engine.infer(inputs: [request])[0])
    print("int8 kernels:", engine.kernelCounts().int8)
    return logits.enumerated().max(by: { $0.element < $1.element })!.offset
}

func classifyConcurrently(engine: Engine, rows: [Tensor]) throws {
    // Many threads, one small-window batcher: requests arriving together share a forward pass.
    let batched = try engine.batched(options: BatchOptions(maxBatchSize: 8, maxQueueDelayUs: 2000))
    DispatchQueue.concurrentPerform(iterations: rows.count) { i in
        do {
            _ = try batched.infer(inputs: [rows[i]])
        } catch TernError.Overloaded(let message) {
            print("retry later:", message)
        } catch {
            print("request \(i) failed:", error.localizedDescription)
        }
    }
    let stats = batched.stats()
    print("batches:", stats.batches, "mean size:", stats.meanBatchSize)
    batched.shutdown()
}

/// Installs a model the app downloaded, signed with `tern sign`, then serves it; rolls back if
/// the new version misbehaves.
func update(
    store directory: URL, trustedKey: String, model: URL, manifest: Data,
    acceptable: (Engine) -> Bool
) throws -> Engine {
    let store = try ModelStore(directory: directory.path, trustedKeys: [trustedKey], keepVersions: 2)
    do {
        let installed = try store.installFile(modelPath: model.path, manifest: manifest, selftest: nil)
        print("installed", installed.name, installed.version, "active:", installed.active)
    } catch TernError.Rejected(let message) {
        // Unknown signer, bad signature, wrong digest or size, or a model that does not run:
        // nothing changed, the previous version still serves.
        print("update refused:", message)
    }
    let engine = try store.open(name: "digits", options: ModelOptions())
    // The app's own acceptance check on what now serves; the previous version is one call away.
    if !acceptable(engine) {
        let previous = try store.rollback(name: "digits")
        print("rolled back to", previous, "of", try store.versions(name: "digits").count)
        return try store.open(name: "digits", options: ModelOptions())
    }
    return engine
}
