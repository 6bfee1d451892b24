// The generated Kotlin bindings on the JVM against the host library (bindings/test.sh):
// digits accuracy in FP32 and INT8, an error case, app threads through the batched handle, and
// the model store installing a model signed by `tern sign`.
//
//   java -Djna.library.path=target/debug -cp ... dev.tern.test.TernTestKt MODELS KEY.pub SIGNED_DIR
package dev.tern.test

import dev.tern.BatchOptions
import dev.tern.DataType
import dev.tern.Engine
import dev.tern.ModelOptions
import dev.tern.ModelStore
import dev.tern.Tensor
import dev.tern.TernException
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.file.Files
import kotlin.concurrent.thread
import kotlin.system.exitProcess

/** A little-endian .npy file: its shape and its raw element bytes. */
class Npy(val shape: List<Long>, val data: ByteArray)

fun readNpy(file: File): Npy {
    val bytes = file.readBytes()
    check(bytes[0] == 0x93.toByte() && String(bytes, 1, 5) == "NUMPY") { "$file is not .npy" }
    val le = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
    val (headerLen, start) =
        if (bytes[6].toInt() == 1) Pair(le.getShort(8).toInt() and 0xffff, 10) else Pair(le.getInt(8), 12)
    val header = String(bytes, start, headerLen)
    check(header.contains("'<")) { "$file is not little-endian" }
    val shape = Regex("'shape': \\(([^)]*)\\)").find(header)!!.groupValues[1]
        .split(",").map { it.trim() }.filter { it.isNotEmpty() }.map { it.toLong() }
    return Npy(shape, bytes.copyOfRange(start + headerLen, bytes.size))
}

fun floats(t: Tensor): FloatArray {
    check(t.dtype == DataType.F32) { "expected f32 logits, got ${t.dtype}" }
    val buf = ByteBuffer.wrap(t.data).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
    return FloatArray(buf.remaining()).also { buf.get(it) }
}

fun argmaxRows(logits: FloatArray, classes: Int): IntArray =
    IntArray(logits.size / classes) { r -> (0 until classes).maxByOrNull { logits[r * classes + it] }!! }

fun pixels(name: String, x: Npy, from: Int, rows: Int): Tensor {
    val rowBytes = 64 * 4
    return Tensor(
        name = name,
        dtype = DataType.F32,
        shape = listOf(rows.toULong(), 1u, 8u, 8u),
        data = x.data.copyOfRange(from * rowBytes, (from + rows) * rowBytes),
    )
}

fun accuracy(engine: Engine, x: Npy, labels: LongArray): Double {
    val name = engine.inputs()[0].name
    val out = engine.infer(listOf(pixels(name, x, 0, labels.size)))
    val predicted = argmaxRows(floats(out[0]), 10)
    return predicted.indices.count { predicted[it].toLong() == labels[it] }.toDouble() / labels.size
}

fun main(args: Array<String>) {
    val models = File(args[0])
    val trustedKey = File(args[1]).readText()
    val signed = File(args[2])
    val x = readNpy(File(models, "testdata/digits_test_x.npy"))
    val y = readNpy(File(models, "testdata/digits_test_y.npy"))
    val ly = ByteBuffer.wrap(y.data).order(ByteOrder.LITTLE_ENDIAN).asLongBuffer()
    val labels = LongArray(ly.remaining()).also { ly.get(it) }

    for ((variant, int8) in listOf("digits" to false, "digits-int8-qdq" to true)) {
        Engine.fromPath(File(models, "$variant/1/model.onnx").path, ModelOptions(numThreads = 2u)).use { engine ->
            val acc = accuracy(engine, x, labels)
            val counts = engine.kernelCounts()
            println("$variant: accuracy $acc, int8 kernels ${counts.int8}")
            check(acc > 0.985) { "$variant accuracy $acc" }
            check((counts.int8 > 0u) == int8) { "$variant kernels $counts" }
        }
    }

    Engine.fromPath(File(models, "digits/1/model.onnx").path, ModelOptions()).use { engine ->
        val name = engine.inputs()[0].name
        try {
            engine.infer(listOf(pixels(name, x, 0, 1).copy(shape = listOf(1u, 64u))))
            error("a wrong shape was accepted")
        } catch (e: TernException.InvalidInput) {
            println("wrong shape refused: ${e.message}")
        }
        try {
            Engine.fromBytes("not a model".toByteArray(), ModelOptions())
            error("a corrupt model was accepted")
        } catch (e: TernException.InvalidModel) {
            println("corrupt model refused: ${e.message}")
        }

        val expected = argmaxRows(floats(engine.infer(listOf(pixels(name, x, 0, 64)))[0]), 10)
        engine.batched(BatchOptions(maxQueueDelayUs = 5000u)).use { batched ->
            val failures = java.util.concurrent.ConcurrentLinkedQueue<String>()
            val threads = (0 until 8).map { t ->
                thread {
                    for (i in t until 64 step 8) {
                        try {
                            val row = argmaxRows(floats(batched.infer(listOf(pixels(name, x, i, 1)))[0]), 10)[0]
                            if (row != expected[i]) failures.add("row $i: $row != ${expected[i]}")
                        } catch (e: TernException) {
                            failures.add("row $i: ${e.message}")
                        }
                    }
                }
            }
            threads.forEach { it.join() }
            val stats = batched.stats()
            println("batched: $stats")
            check(failures.isEmpty()) { failures.joinToString() }
            check(stats.completed == 64uL && stats.batches < 64uL) { "$stats" }
        }
    }

    val storeDir = Files.createTempDirectory("tern-store").toFile()
    try {
        ModelStore(storeDir.path, listOf(trustedKey), 2u).use { store ->
            val manifest = File(signed, "manifest.tern").readBytes()
            val installed = store.installFile(File(models, "digits-int8-qdq/1/model.onnx").path, manifest, null)
            check(installed.active && installed.version == 3u) { "$installed" }
            try {
                val tampered = File(models, "digits-int8-qdq/1/model.onnx").readBytes().also { it[300] = (it[300] + 1).toByte() }
                store.installBytes(tampered, manifest, null)
                error("a tampered model was installed")
            } catch (e: TernException.Rejected) {
                println("tampered model refused: ${e.message}")
            }
            store.open("digits", ModelOptions()).use { engine ->
                val acc = accuracy(engine, x, labels)
                check(acc > 0.985 && engine.kernelCounts().int8 > 0u) { "store model accuracy $acc" }
                println("store: digits v${installed.version} accuracy $acc")
            }
        }
    } finally {
        storeDir.deleteRecursively()
    }
    println("kotlin: all checks passed")
    exitProcess(0)
}
