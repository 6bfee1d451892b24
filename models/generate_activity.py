#!/usr/bin/env python3
"""A tiny accelerometer activity classifier ("still" or "moving") as a model-repository entry,
with synthetic sensor data to test it on.

The input is one window of a 3-axis accelerometer in g, 32 samples at 50 Hz (0.64 s), channel
major. The graph computes the per-axis variance over time and its log, and a logistic regression
on those three features (fitted here with numpy) gives the two class probabilities:

    window [N,3,32] -> ReduceMean(axis 2) =: m; Sub(window, m) -> Mul(d, d)
      -> ReduceMean(axis 2, keepdims 0) [N,3] -> Add(1e-4) -> Log -> Gemm([3,2], bias [2])
      -> Softmax(axis 1) -> probs [N,2]

The data are synthetic: class 0 "still" is gravity (0,0,1) plus gaussian noise (sigma 0.02);
class 1 "moving" is gravity plus, on each axis, a sinusoid of 1.5-3 Hz, amplitude 0.3-0.8 g and
random phase, plus noise (sigma 0.05).

Writes:
  models/activity/1/model.onnx              input `window` float32 [N,3,32], output `probs`
                                            float32 [N,2]; opset 13 (default domain only),
                                            IR 8, checked with onnx.checker full_check
  models/activity/config.toml               [batching] max_batch_size = 4
  models/testdata/activity_windows.npy      float32 [64,3,32] test windows, still and moving
                                            interleaved (even rows still, odd rows moving)
  models/testdata/activity_labels.npy       int64 [64] (0 still, 1 moving)
  models/testdata/activity.ref.npy          float32 [64,2] onnxruntime's probs on the test
                                            windows (CPU EP, intra_op_num_threads=1,
                                            ORT_ENABLE_ALL)
  models/testdata/activity_stream.csv       400 samples (8 s at 50 Hz) as a sensor emits them,
                                            one `x,y,z` line each (6 decimals, no header): 200
                                            still, then 200 moving

Deterministic (fixed seeds, one thread, float64 training; two runs give byte-identical files);
takes about a second. Run from the repository root with the models venv (see models/README.md):

    .venv-models/bin/python models/generate_activity.py
"""

from __future__ import annotations

from pathlib import Path

# First: it pins the BLAS threads before numpy loads, and holds what every generator shares.
from generate_exports import F, IR_VERSION, OPSET, make_model, session

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "activity"
TESTDATA = ROOT / "testdata"

RATE_HZ = 50.0
WINDOW = 32
GRAVITY = np.array([0.0, 0.0, 1.0])
EPS = 1e-4
N_TRAIN = 2000  # windows, half of each class
N_TEST = 64
STREAM_HALF = 200  # samples still, then as many moving


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def still(rng: np.random.Generator, n: int, length: int = WINDOW) -> np.ndarray:
    """n windows [n,3,length] of a sensor at rest: gravity plus noise (sigma 0.02 g)."""
    return GRAVITY[None, :, None] + rng.normal(0.0, 0.02, (n, 3, length))


def moving(rng: np.random.Generator, n: int, length: int = WINDOW) -> np.ndarray:
    """n windows [n,3,length] of a sensor in motion: gravity plus, per window and axis, a
    sinusoid of 1.5-3 Hz, amplitude 0.3-0.8 g and random phase, plus noise (sigma 0.05 g)."""
    t = np.arange(length) / RATE_HZ
    freq = rng.uniform(1.5, 3.0, (n, 3, 1))
    amp = rng.uniform(0.3, 0.8, (n, 3, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 3, 1))
    wave = amp * np.sin(2 * np.pi * freq * t + phase)
    return GRAVITY[None, :, None] + wave + rng.normal(0.0, 0.05, (n, 3, length))


def features(x: np.ndarray) -> np.ndarray:
    """What the graph computes before the Gemm: log(per-axis variance over time + 1e-4), [n,3]."""
    return np.log(x.var(axis=2) + EPS)


# ---------------------------------------------------------------------------------------------
# Training: softmax regression on the three log-variances, in float64
# ---------------------------------------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit(f: np.ndarray, y: np.ndarray, steps: int = 2000, lr: float = 0.5, l2: float = 1e-2):
    """Full-batch gradient descent on cross-entropy + l2 * |W|^2 / 2, on standardised features;
    the standardisation is then folded into W [3,2] and b [2]. The L2 term keeps the weights
    finite on separable data (the probabilities stay below 1 - 1e-6 or so, not saturated)."""
    mu, sd = f.mean(axis=0), f.std(axis=0)
    z = (f - mu) / sd
    onehot = np.eye(2)[y]
    w = np.zeros((3, 2))
    b = np.zeros(2)
    for _ in range(steps):
        g = (softmax(z @ w + b) - onehot) / len(y)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum(axis=0)
    w_folded = w / sd[:, None]
    b_folded = b - mu @ w_folded
    return w_folded, b_folded


# ---------------------------------------------------------------------------------------------
# Graph
# ---------------------------------------------------------------------------------------------


def build(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["window"], ["mean"], name="mean", axes=[2], keepdims=1),
        helper.make_node("Sub", ["window", "mean"], ["centred"], name="centre"),
        helper.make_node("Mul", ["centred", "centred"], ["squared"], name="square"),
        helper.make_node("ReduceMean", ["squared"], ["variance"], name="variance", axes=[2], keepdims=0),
        helper.make_node("Add", ["variance", "eps"], ["variance_eps"], name="add_eps"),
        helper.make_node("Log", ["variance_eps"], ["log_variance"], name="log"),
        helper.make_node("Gemm", ["log_variance", "fc.w", "fc.b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    inits = [
        numpy_helper.from_array(np.array(EPS, dtype=np.float32), "eps"),
        numpy_helper.from_array(w.astype(np.float32), "fc.w"),
        numpy_helper.from_array(b.astype(np.float32), "fc.b"),
    ]
    g = helper.make_graph(
        nodes, "activity",
        [helper.make_tensor_value_info("window", F, ["N", 3, WINDOW])],
        [helper.make_tensor_value_info("probs", F, ["N", 2])],
        inits,
    )
    m = make_model(g, "tern-models-generate_activity")
    m.doc_string = (
        "Accelerometer activity classifier: window [N,3,32] (x/y/z in g, 50 Hz) -> "
        "probs [N,2] (0 still, 1 moving)"
    )
    return m


def check(m: onnx.ModelProto) -> None:
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in m.opset_import] == [("", OPSET)]
    assert all(n.domain == "" for n in m.graph.node)
    assert [i.name for i in m.graph.input] == ["window"]
    assert [o.name for o in m.graph.output] == ["probs"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def main() -> None:
    # Training windows: half still, half moving.
    rng = np.random.default_rng(0)
    half = N_TRAIN // 2
    x_train = np.concatenate([still(rng, half), moving(rng, half)])
    y_train = np.repeat(np.array([0, 1], dtype=np.int64), half)
    w, b = fit(features(x_train), y_train)
    train_acc = float(((features(x_train) @ w + b).argmax(axis=1) == y_train).mean())

    # Test windows, from their own seed: even rows still, odd rows moving.
    rng = np.random.default_rng(1)
    x_test = np.empty((N_TEST, 3, WINDOW))
    x_test[0::2] = still(rng, N_TEST // 2)
    x_test[1::2] = moving(rng, N_TEST // 2)
    x_test = x_test.astype(np.float32)
    y_test = np.tile(np.array([0, 1], dtype=np.int64), N_TEST // 2)

    # The stream a sensor would emit: 4 s at rest, then 4 s of one continuous motion.
    rng = np.random.default_rng(2)
    stream = np.concatenate([still(rng, 1, STREAM_HALF)[0], moving(rng, 1, STREAM_HALF)[0]], axis=1).T

    m = build(w, b)
    check(m)
    (MODEL_DIR / "1").mkdir(parents=True, exist_ok=True)
    TESTDATA.mkdir(parents=True, exist_ok=True)
    path = MODEL_DIR / "1/model.onnx"
    onnx.save(m, path)
    (MODEL_DIR / "config.toml").write_text(
        "# Sensor windows arrive one at a time from a few devices: small batches.\n"
        "[batching]\nmax_batch_size = 4\n"
    )

    sess = session(path)
    (probs,) = sess.run(["probs"], {"window": x_test})
    assert probs.dtype == np.float32 and probs.shape == (N_TEST, 2)
    (unopt,) = session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["probs"], {"window": x_test})
    x64 = x_test.astype(np.float64)
    ref64 = softmax(features(x64) @ w.astype(np.float32) + b.astype(np.float32))
    # The symbolic batch: batches of 1 and 7 give the same rows.
    for n in (1, 7):
        (part,) = sess.run(["probs"], {"window": x_test[:n]})
        assert part.shape == (n, 2) and np.abs(part - probs[:n]).max() < 1e-6, n
    acc = float((probs.argmax(axis=1) == y_test).mean())
    assert acc == 1.0, acc

    # Stream windows (hop 16): the still half reads still, the moving half moving.
    starts = range(0, len(stream) - WINDOW + 1, WINDOW // 2)
    wins = np.stack([stream[s:s + WINDOW].T for s in starts]).astype(np.float32)
    (sp,) = sess.run(["probs"], {"window": wins})
    pred = sp.argmax(axis=1)
    for s, p in zip(starts, pred):
        if s + WINDOW <= STREAM_HALF:
            assert p == 0, s
        elif s >= STREAM_HALF:
            assert p == 1, s

    np.save(TESTDATA / "activity_windows.npy", x_test)
    np.save(TESTDATA / "activity_labels.npy", y_test)
    np.save(TESTDATA / "activity.ref.npy", probs)
    with open(TESTDATA / "activity_stream.csv", "w") as f:
        for x, y, z in stream:
            f.write(f"{x:.6f},{y:.6f},{z:.6f}\n")

    f_test = features(x64)
    print(f"W [3,2] = {w.astype(np.float32).tolist()}, b = {b.astype(np.float32).tolist()}")
    print(f"log-variance, still: [{f_test[y_test == 0].min():.2f}, {f_test[y_test == 0].max():.2f}], "
          f"moving: [{f_test[y_test == 1].min():.2f}, {f_test[y_test == 1].max():.2f}]")
    print(f"train accuracy (numpy, {N_TRAIN} windows): {train_acc:.4f}")
    print(f"test accuracy (ORT, {N_TEST} windows): {acc:.4f}; "
          f"min p(true class) {probs[np.arange(N_TEST), y_test].min():.6f}")
    print(f"max |ORT - float64 numpy| {np.abs(probs - ref64).max():.3g}, "
          f"max |ORT_ENABLE_ALL - ORT_DISABLE_ALL| {np.abs(probs - unopt).max():.3g}")
    print(f"stream windows (hop {WINDOW // 2}): predictions {''.join(map(str, pred))}")
    for p in [path, MODEL_DIR / "config.toml", TESTDATA / "activity_windows.npy",
              TESTDATA / "activity_labels.npy", TESTDATA / "activity.ref.npy",
              TESTDATA / "activity_stream.csv"]:
        print(f"{p.relative_to(ROOT.parent)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
