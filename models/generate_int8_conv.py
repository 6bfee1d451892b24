#!/usr/bin/env python3
"""Reference data for Tern's fused int8 convolutions, computed by onnxruntime.

1. A grid of single-QLinearConv models (models/testdata/qconv/): pointwise, depthwise (3x3, 5x5,
   7x7, strides 1 and 2, symmetric and asymmetric padding), dense, grouped, dilated and
   rectangular kernels; u8 and i8 activations; per-channel i8 and per-tensor u8 weights (with a
   non-zero weight zero point); batch 1 and 3; odd spatial sizes. For each case NN-name:
     NN-name.onnx    one QLinearConv, input `x` [N,C,H,W] (u8 or i8), output `y`
     NN-name.x.npy   the input (random bytes)
     NN-name.y.npy   the expected output: onnxruntime's (CPU EP, one thread), checked equal to
                     an exact int64 computation; for the `-fullrange` cases (u8 activations,
                     full-range i8 weights, where onnxruntime's AVX2 kernel saturates) the
                     exact computation itself
   tests/exactness in tern-core compares Tern's kernels with these: equal or within 1 LSB.

2. A MobileNetV3-Small-style classifier (models/testdata/mobilenet/): width 0.35, 3x48x192 input
   (a text-line crop), depthwise-separable blocks with squeeze-and-excitation and h-swish, built
   by generate_bench.py's builder with seeded random weights, then quantized by onnxruntime:
     fp32.onnx       the float model
     int8-qdq.onnx   QDQ format, i8 activations, per-channel i8 weights
     int8-qop.onnx   QOperator format (QLinearConv), u8 activations, 7-bit per-channel
                     weights (onnxruntime's reduce_range, for its AVX2 kernel); the two Gemm
                     layers stay float (onnxruntime would emit its contrib QGemm)
     input.npy       float32 [4,3,48,192], standard normal
     <model>.out.npy onnxruntime's output for each model on input.npy (basic graph
                     optimizations: the QDQ graph's own semantics; ORT_ENABLE_ALL replaces QDQ
                     groups with contrib ops that round differently)

3. Single layers at that network's sizes (models/testdata/ops/), each as FP32 Conv and as
   QLinearConv, for the per-op benchmarks (`cargo bench -p tern-core --bench executor -- int8`).

Deterministic (fixed seeds). Run from the repository root with the models venv:

    .venv-models/bin/python models/generate_int8_conv.py
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import QDQ_SETTINGS, QOP_SETTINGS  # noqa: E402
from generate_bench import mobilenetv3_small  # noqa: E402
from generate_exports import make_model  # noqa: E402
from onnxruntime.quantization import quant_pre_process, quantize_static  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OPS = REPO / "models/testdata/ops"
GRID = REPO / "models/testdata/qconv"
MOBILENET = REPO / "models/testdata/mobilenet"

NP = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def session(path_or_bytes, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
    """Basic optimizations keep the graph's own semantics; ORT_ENABLE_ALL swaps QDQ groups for
    contrib ops (QLinearMul, QLinearAdd, ...) that round differently."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


# (name, cin, cout, group, (kh, kw), (sy, sx), pads [t, l, b, r], dilation, (h, w), batch,
#  activation type, weight type)
U8, I8 = TensorProto.UINT8, TensorProto.INT8
CASES = [
    ("pw-16-32", 16, 32, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (14, 14), 1, U8, I8),
    ("pw-24-40-b3", 24, 40, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (7, 9), 3, U8, I8),
    ("pw-i8", 16, 24, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (10, 6), 1, I8, I8),
    ("pw-odd", 13, 7, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (5, 7), 1, U8, I8),
    ("pw-se", 40, 16, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (1, 1), 2, U8, I8),
    ("pw-u8w", 16, 20, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (6, 11), 1, U8, U8),
    ("pw-stride2", 8, 12, 1, (1, 1), (2, 2), [0, 0, 0, 0], 1, (9, 10), 1, U8, I8),
    ("pw-padded", 8, 12, 1, (1, 1), (1, 1), [1, 1, 1, 1], 1, (5, 5), 1, U8, I8),
    ("pw-grouped", 16, 24, 4, (1, 1), (1, 1), [0, 0, 0, 0], 1, (6, 6), 1, U8, I8),
    ("dw3-s1", 16, 16, 16, (3, 3), (1, 1), [1, 1, 1, 1], 1, (12, 20), 1, U8, I8),
    ("dw3-s2", 24, 24, 24, (3, 3), (2, 2), [1, 1, 1, 1], 1, (13, 17), 1, U8, I8),
    ("dw5-s1", 16, 16, 16, (5, 5), (1, 1), [2, 2, 2, 2], 1, (12, 12), 1, U8, I8),
    ("dw5-s2", 20, 20, 20, (5, 5), (2, 2), [2, 2, 2, 2], 1, (11, 24), 1, U8, I8),
    ("dw3-nopad", 8, 8, 8, (3, 3), (1, 1), [0, 0, 0, 0], 1, (9, 9), 1, U8, I8),
    ("dw3-asym", 8, 8, 8, (3, 3), (2, 2), [0, 0, 1, 1], 1, (12, 16), 1, U8, I8),
    ("dw3-i8-b3", 12, 12, 12, (3, 3), (1, 1), [1, 1, 1, 1], 1, (7, 11), 3, I8, I8),
    ("dw3-u8w", 8, 8, 8, (3, 3), (1, 1), [1, 1, 1, 1], 1, (8, 8), 1, U8, U8),
    ("dw7", 8, 8, 8, (7, 7), (1, 1), [3, 3, 3, 3], 1, (10, 10), 1, U8, I8),
    ("dw3-mult2", 8, 16, 8, (3, 3), (1, 1), [1, 1, 1, 1], 1, (6, 6), 1, U8, I8),
    ("dw3-dilated", 8, 8, 8, (3, 3), (1, 1), [2, 2, 2, 2], 2, (9, 9), 1, U8, I8),
    ("stem3-s2", 3, 8, 1, (3, 3), (2, 2), [1, 1, 1, 1], 1, (48, 64), 1, U8, I8),
    ("dense3-s1", 8, 16, 1, (3, 3), (1, 1), [1, 1, 1, 1], 1, (10, 12), 2, U8, I8),
    ("dense5-i8", 4, 6, 1, (5, 5), (1, 1), [2, 2, 2, 2], 1, (9, 8), 1, I8, I8),
    ("grouped3", 8, 12, 4, (3, 3), (1, 1), [1, 1, 1, 1], 1, (7, 7), 1, U8, I8),
    ("dilated3", 4, 8, 1, (3, 3), (1, 1), [2, 2, 2, 2], 2, (11, 9), 1, U8, I8),
    ("rect1x3", 6, 10, 1, (1, 3), (1, 1), [0, 1, 0, 1], 1, (5, 16), 1, U8, I8),
    ("rect3x1-s21", 6, 6, 6, (3, 1), (2, 1), [1, 0, 1, 0], 1, (12, 5), 1, U8, I8),
    ("dense3-u8w", 6, 8, 1, (3, 3), (1, 1), [1, 1, 1, 1], 1, (6, 7), 1, U8, U8),
    # Full-range i8 weights with u8 activations: onnxruntime's AVX2 kernel for this pair
    # (vpmaddubsw) saturates sums of two products at 16 bits, so its result is not the
    # convolution's; the reference for these two is the exact integer computation.
    ("pw-fullrange", 32, 24, 1, (1, 1), (1, 1), [0, 0, 0, 0], 1, (9, 13), 1, U8, I8),
    ("stem3-fullrange", 3, 8, 1, (3, 3), (2, 2), [1, 1, 1, 1], 1, (24, 32), 1, U8, I8),
]


def qlinearconv_case(rng, case):
    (name, cin, cout, group, (kh, kw), strides, pads, dil, (height, width), batch, xt, wt) = case
    k = (cin // group) * kh * kw
    x_scale, x_zp = 0.02, (int(rng.integers(0, 256)) if xt == U8 else int(rng.integers(-128, 128)))
    per_channel = wt == I8
    full_range = name.endswith("-fullrange")
    if per_channel:
        w_scale = rng.uniform(0.004, 0.02, cout).astype(np.float32)
        w_zp = np.zeros(cout, NP[wt])
        # u8 x i8 at 7 bits (onnxruntime's reduce_range) keeps its AVX2 kernel exact.
        top = 128 if xt == I8 or full_range else 64
        w = rng.integers(-top + 1, top, (cout, cin // group, kh, kw)).astype(np.int8)
        w_spread = top / np.sqrt(3.0)  # std of the uniform weights
    else:
        w_scale = np.array(0.01, np.float32)
        w_zp = np.array(int(rng.integers(100, 156)), NP[wt])
        w = rng.integers(0, 256, (cout, cin // group, kh, kw)).astype(np.uint8)
        w_spread = 74.0
    # An output scale that puts typical sums inside the range, with some saturating.
    acc_std = np.sqrt(k) * 74.0 * w_spread
    y_scale = float(x_scale * float(np.mean(w_scale)) * acc_std / 20.0)
    y_zp = int(rng.integers(0, 256)) if xt == U8 else int(rng.integers(-128, 128))
    bias = rng.integers(-int(acc_std), int(acc_std) + 1, cout).astype(np.int32)

    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(x_zp, NP[xt]), "x_zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(w_zp, "w_zp"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(y_zp, NP[xt]), "y_zp"),
        numpy_helper.from_array(bias, "bias"),
    ]
    node = helper.make_node(
        "QLinearConv",
        ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "bias"],
        ["y"],
        name=name,
        kernel_shape=[kh, kw],
        strides=list(strides),
        pads=[pads[0], pads[1], pads[2], pads[3]],
        dilations=[dil, dil],
        group=group,
    )
    graph = helper.make_graph(
        [node],
        name,
        [helper.make_tensor_value_info("x", xt, ["N", cin, height, width])],
        [helper.make_tensor_value_info("y", xt, None)],
        inits,
    )
    model = make_model(graph, "tern-models-generate_int8_conv")
    x = rng.integers(0, 256, (batch, cin, height, width)).astype(np.uint8).view(NP[xt])
    y = session(model.SerializeToString()).run(None, {"x": x})[0]
    exact = exact_qlinearconv(model, x, y.dtype)
    if full_range:
        return model, x, exact, "exact integers", int(np.abs(exact.astype(int) - y).max())
    # Where onnxruntime is exact, both references must agree bit for bit.
    assert np.array_equal(exact, y), f"{name}: onnxruntime and the exact computation differ"
    return model, x, y, "onnxruntime", 0


def exact_qlinearconv(model, x, out_dt):
    """QLinearConv with int64 sums and the float requantization onnxruntime specifies."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = model.graph.node[0]
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = init["w"].astype(np.int64) - init["w_zp"].astype(np.int64).reshape(-1, 1, 1, 1)
    x = x.astype(np.int64) - int(init["x_zp"])
    kh, kw = at["kernel_shape"]
    sy, sx = at["strides"]
    pt, pl, pb, pr = at["pads"]
    d, g = at["dilations"][0], at["group"]
    n, c, h, wd = x.shape
    m = w.shape[0]
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr), np.int64)
    xp[:, :, pt : pt + h, pl : pl + wd] = x
    oh = (h + pt + pb - d * (kh - 1) - 1) // sy + 1
    ow = (wd + pl + pr - d * (kw - 1) - 1) // sx + 1
    acc = np.zeros((n, m, oh, ow), np.int64)
    cg, mg = c // g, m // g
    for o in range(m):
        gi = o // mg
        for ky in range(kh):
            for kx in range(kw):
                patch = xp[:, gi * cg : (gi + 1) * cg,
                           ky * d : ky * d + sy * (oh - 1) + 1 : sy,
                           kx * d : kx * d + sx * (ow - 1) + 1 : sx]
                acc[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, ky, kx])
    acc += init["bias"].reshape(1, -1, 1, 1)
    ws = init["w_scale"].astype(np.float32).reshape(-1) * np.ones(m, np.float32)
    scale = np.float32(init["x_scale"]) * ws / np.float32(init["y_scale"])
    v = np.round(acc.astype(np.float32) * scale.reshape(1, -1, 1, 1)) + int(init["y_zp"])
    info = np.iinfo(out_dt)
    return np.clip(v, info.min, info.max).astype(out_dt)


class Reader:
    def __init__(self, x):
        self.batches = [x[i : i + 1] for i in range(len(x))]
        self.it = iter(self.batches)

    def get_next(self):
        b = next(self.it, None)
        return None if b is None else {"x": b}

    def rewind(self):
        self.it = iter(self.batches)


def quantize(fp32_path: Path, out_path: Path, calib, settings, tmp: Path):
    pre = tmp / (out_path.stem + ".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_optimization=True, skip_symbolic_shape=True)
    quantize_static(str(pre), str(out_path), Reader(calib), **settings)
    m = onnx.load(out_path)
    del m.graph.value_info[:]
    m.producer_name = "tern-models-generate_int8_conv (onnxruntime " + ort.__version__ + ")"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, out_path)


# Single layers at the sizes of a MobileNetV3-Small-style text recognizer (48x192 input), for
# per-op benchmarks: (name, cin, cout, group, k, stride, (h, w)).
OP_BENCH = [
    ("stem", 3, 16, 1, 3, 2, (48, 192)),
    ("pointwise", 48, 144, 1, 1, 1, (12, 48)),
    ("depthwise5", 144, 144, 144, 5, 1, (12, 48)),
    ("depthwise3-s2", 72, 72, 72, 3, 2, (24, 96)),
]


def op_models(rng):
    """Each layer as FP32 `Conv` and as QOperator `QLinearConv` (u8 activations, per-channel
    i8 weights), same weights up to quantization; input `x` [N,C,H,W]."""
    for name, cin, cout, group, k, stride, (h, w) in OP_BENCH:
        fan_in = cin // group * k * k
        wf = rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        bf = rng.normal(0.0, 0.1, cout).astype(np.float32)
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                     group=group)
        fp32 = helper.make_graph(
            [helper.make_node("Conv", ["x", "w", "b"], ["y"], name=name, **attrs)], name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, h, w])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(wf, "w"), numpy_helper.from_array(bf, "b")])
        onnx.save(make_model(fp32, "tern-models-generate_int8_conv"), OPS / f"{name}.fp32.onnx")
        x_scale, x_zp, y_scale, y_zp = 0.03, 128, 0.05, 128
        w_scale = (np.abs(wf).reshape(cout, -1).max(1) / 127.0).astype(np.float32)
        wq = np.round(wf / w_scale[:, None, None, None]).clip(-127, 127).astype(np.int8)
        bq = np.round(bf / (x_scale * w_scale)).astype(np.int32)
        q = helper.make_graph(
            [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                              ["y"], name=name, **attrs)], name,
            [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", cin, h, w])],
            [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
            [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(x_zp, np.uint8), "xz"),
             numpy_helper.from_array(wq, "w"),
             numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
             numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(y_zp, np.uint8), "yz"),
             numpy_helper.from_array(bq, "b")])
        onnx.save(make_model(q, "tern-models-generate_int8_conv"), OPS / f"{name}.int8.onnx")
        print(f"op {name}: {cin}->{cout} k{k} s{stride} group {group} at {h}x{w}")


def main() -> None:
    # One generator per section, so that adding a grid case changes nothing else.
    rng = np.random.default_rng(20261129)
    GRID.mkdir(parents=True, exist_ok=True)
    for old in GRID.iterdir():
        old.unlink()
    for ix, case in enumerate(CASES):
        model, x, y, source, ort_error = qlinearconv_case(rng, case)
        stem = f"{ix:02d}-{case[0]}"
        onnx.save(model, GRID / f"{stem}.onnx")
        np.save(GRID / f"{stem}.x.npy", x)
        np.save(GRID / f"{stem}.y.npy", y)
        sat = float(np.mean((y == np.iinfo(y.dtype).min) | (y == np.iinfo(y.dtype).max)))
        note = f", onnxruntime off by up to {ort_error}" if ort_error else ""
        print(f"{stem:22s} x {list(x.shape)} -> y {list(y.shape)} {y.dtype}, saturated "
              f"{sat:.1%}, reference: {source}{note}")

    OPS.mkdir(parents=True, exist_ok=True)
    op_models(np.random.default_rng(2))

    MOBILENET.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    model, params = mobilenetv3_small(7, 0.35, (48, 192), 100)
    fp32 = MOBILENET / "fp32.onnx"
    onnx.save(model, fp32)
    x = rng.standard_normal((4, 3, 48, 192)).astype(np.float32)
    np.save(MOBILENET / "input.npy", x)
    calib = rng.standard_normal((32, 3, 48, 192)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        quantize(fp32, MOBILENET / "int8-qdq.onnx", calib, QDQ_SETTINGS, Path(tmp))
        # Gemm would become onnxruntime's contrib QGemm, which tract cannot load.
        # 7-bit weights (reduce_range), as onnxruntime advises for u8 activations on x86
        # without VNNI: its AVX2 kernel would saturate, and the reference would not be exact.
        qop = dict(QOP_SETTINGS, op_types_to_quantize=["Conv", "MatMul"], reduce_range=True)
        quantize(fp32, MOBILENET / "int8-qop.onnx", calib, qop, Path(tmp))
    ref = None
    for stem in ("fp32", "int8-qdq", "int8-qop"):
        path = MOBILENET / f"{stem}.onnx"
        out = session(str(path)).run(None, {"x": x})[0]
        np.save(MOBILENET / f"{stem}.out.npy", out)
        ops = {}
        for n in onnx.load(path).graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if ref is None:
            ref = out
            print(f"{stem}: {params} parameters, {path.stat().st_size} bytes, ops {ops}")
        else:
            agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
            err = float(np.abs(out - ref).max())
            full = session(str(path), ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"x": x})
            print(f"{stem}: {path.stat().st_size} bytes, top-1 agreement with fp32 {agree:.3f}, "
                  f"max |diff| {err:.3f}, with ORT_ENABLE_ALL max |diff| "
                  f"{float(np.abs(full[0] - out).max()):.3f}, ops {ops}")


if __name__ == "__main__":
    main()
