#!/usr/bin/env python3
"""Generate Tern's test model repository (see models/README.md).

Trains two tiny CNNs on scikit-learn's bundled 8x8 `load_digits` data set with a
plain-numpy implementation (manual forward/backward, Adam), exports them to ONNX
(FP32, symbolic batch dim "N"), quantizes each one twice with onnxruntime
(QDQ and QOperator formats), and writes reference outputs computed with
onnxruntime (CPU, one intra-op thread) plus a summary.json.

Deterministic: fixed seeds, single-threaded BLAS. No network access at run time.

Usage:  python models/generate.py            (from anywhere; paths are relative to this file)
"""

from __future__ import annotations

import os

# Single-threaded BLAS: keeps results reproducible and CPU use modest.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent
TESTDATA = ROOT / "testdata"
OPSET = 13
IR_VERSION = 8  # matches opset 13 (ONNX 1.8+); the quantizer keeps it
SEED = 0

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_data():
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.ascontiguousarray(y_tr, dtype=np.int64),
        np.ascontiguousarray(x_te, dtype=np.float32),
        np.ascontiguousarray(y_te, dtype=np.int64),
    )


# ---------------------------------------------------------------------------
# Tiny numpy autograd-free layers (NCHW, 3x3 kernels, stride 1, pad 1)
# ---------------------------------------------------------------------------


def im2col3x3(x):
    """x [B,C,H,W] -> cols [B*H*W, C*9], column order (c, kh, kw) == W.reshape(O,-1)."""
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # B,C,H,W,3,3
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(b * h * w, c * 9)


def conv_fwd(x, w, bias):
    b, c, h, wd = x.shape
    o = w.shape[0]
    cols = im2col3x3(x)
    out = cols @ w.reshape(o, -1).T + bias
    return out.reshape(b, h, wd, o).transpose(0, 3, 1, 2), cols


def conv_bwd(dout, x_shape, w, cols):
    b, c, h, wd = x_shape
    o = w.shape[0]
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = (d2.T @ cols).reshape(w.shape)
    db = d2.sum(axis=0)
    dcols = (d2 @ w.reshape(o, -1)).reshape(b, h, wd, c, 3, 3)
    dxp = np.zeros((b, c, h + 2, wd + 2), dtype=dout.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + h, j : j + wd] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1], dw, db


def maxpool_fwd(x):
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)
    idx = t.argmax(axis=-1)
    return np.take_along_axis(t, idx[..., None], axis=-1)[..., 0], idx


def maxpool_bwd(dout, idx, x_shape):
    b, c, h, w = x_shape
    t = np.zeros((b, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(t, idx[..., None], dout[..., None], axis=-1)
    return t.reshape(b, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x_shape)


def softmax_xent(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
    d = p
    d[np.arange(n), y] -= 1.0
    return loss, d / n


def he(rng, shape, fan_in):
    return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)


# ---------------------------------------------------------------------------
# Models: parameters + forward/backward
# ---------------------------------------------------------------------------


class DigitsCNN:
    """Conv(1->8)+Relu, Conv(8->16)+Relu, MaxPool2, Flatten, Gemm(256->32)+Relu, Gemm(32->10)."""

    name = "digits"

    def __init__(self, rng):
        self.p = {
            "conv1.w": he(rng, (8, 1, 3, 3), 9),
            "conv1.b": np.zeros(8),
            "conv2.w": he(rng, (16, 8, 3, 3), 72),
            "conv2.b": np.zeros(16),
            "fc1.w": he(rng, (32, 256), 256),
            "fc1.b": np.zeros(32),
            "fc2.w": he(rng, (10, 32), 32) * 0.5,
            "fc2.b": np.zeros(10),
        }

    def forward(self, x, train=False):
        p = self.p
        c1, cols1 = conv_fwd(x, p["conv1.w"], p["conv1.b"])
        r1 = np.maximum(c1, 0)
        c2, cols2 = conv_fwd(r1, p["conv2.w"], p["conv2.b"])
        r2 = np.maximum(c2, 0)
        m, idx = maxpool_fwd(r2)
        f = m.reshape(m.shape[0], -1)
        h = f @ p["fc1.w"].T + p["fc1.b"]
        rh = np.maximum(h, 0)
        out = rh @ p["fc2.w"].T + p["fc2.b"]
        if train:
            self.cache = (x, c1, cols1, r1, c2, cols2, r2, idx, m, f, h, rh)
        return out

    def backward(self, dout):
        p = self.p
        x, c1, cols1, r1, c2, cols2, r2, idx, m, f, h, rh = self.cache
        g = {}
        g["fc2.w"] = dout.T @ rh
        g["fc2.b"] = dout.sum(0)
        dh = (dout @ p["fc2.w"]) * (h > 0)
        g["fc1.w"] = dh.T @ f
        g["fc1.b"] = dh.sum(0)
        df = dh @ p["fc1.w"]
        dr2 = maxpool_bwd(df.reshape(m.shape), idx, r2.shape)
        dc2 = dr2 * (c2 > 0)
        dr1, g["conv2.w"], g["conv2.b"] = conv_bwd(dc2, r1.shape, p["conv2.w"], cols2)
        dc1 = dr1 * (c1 > 0)
        _, g["conv1.w"], g["conv1.b"] = conv_bwd(dc1, x.shape, p["conv1.w"], cols1)
        return g


class ResBlockCNN:
    """Conv(1->16)+Relu, [Conv(16->16)+Relu, Conv(16->16)] + skip, Relu, GAP, Flatten, Gemm(16->10)."""

    name = "resblock"

    def __init__(self, rng):
        self.p = {
            "stem.w": he(rng, (16, 1, 3, 3), 9),
            "stem.b": np.zeros(16),
            "res1.w": he(rng, (16, 16, 3, 3), 144),
            "res1.b": np.zeros(16),
            "res2.w": he(rng, (16, 16, 3, 3), 144) * 0.5,
            "res2.b": np.zeros(16),
            "fc.w": he(rng, (10, 16), 16) * 0.5,
            "fc.b": np.zeros(10),
        }

    def forward(self, x, train=False):
        p = self.p
        c0, cols0 = conv_fwd(x, p["stem.w"], p["stem.b"])
        r0 = np.maximum(c0, 0)
        c1, cols1 = conv_fwd(r0, p["res1.w"], p["res1.b"])
        r1 = np.maximum(c1, 0)
        c2, cols2 = conv_fwd(r1, p["res2.w"], p["res2.b"])
        s = c2 + r0
        r2 = np.maximum(s, 0)
        g = r2.mean(axis=(2, 3))
        out = g @ p["fc.w"].T + p["fc.b"]
        if train:
            self.cache = (x, c0, cols0, r0, c1, cols1, r1, cols2, s, r2, g)
        return out

    def backward(self, dout):
        p = self.p
        x, c0, cols0, r0, c1, cols1, r1, cols2, s, r2, gp = self.cache
        g = {}
        g["fc.w"] = dout.T @ gp
        g["fc.b"] = dout.sum(0)
        dg = dout @ p["fc.w"]
        hw = r2.shape[2] * r2.shape[3]
        dr2 = np.broadcast_to(dg[:, :, None, None] / hw, r2.shape)
        ds = dr2 * (s > 0)
        dr1, g["res2.w"], g["res2.b"] = conv_bwd(ds, r1.shape, p["res2.w"], cols2)
        dc1 = dr1 * (c1 > 0)
        dr0, g["res1.w"], g["res1.b"] = conv_bwd(dc1, r0.shape, p["res1.w"], cols1)
        dr0 = dr0 + ds  # skip connection
        dc0 = dr0 * (c0 > 0)
        _, g["stem.w"], g["stem.b"] = conv_bwd(dc0, x.shape, p["stem.w"], cols0)
        return g


def train(model, x_tr, y_tr, x_te, y_te, epochs, lr, batch=32, wd=1e-4, seed=SEED):
    """Adam with a cosine learning-rate schedule, float64 maths, light shift augmentation."""
    rng = np.random.default_rng(seed + 1)
    x_tr = x_tr.astype(np.float64)
    m = {k: np.zeros_like(v) for k, v in model.p.items()}
    v = {k: np.zeros_like(v) for k, v in model.p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    n = x_tr.shape[0]
    steps_per_epoch = (n + batch - 1) // batch
    total = epochs * steps_per_epoch
    for ep in range(epochs):
        perm = rng.permutation(n)
        loss_sum = 0.0
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            xb = x_tr[idx]
            # augmentation: random +-1 pixel shift (zero fill) on half of the batch
            sh = rng.integers(-1, 2, size=(len(idx), 2))
            sh[rng.random(len(idx)) < 0.5] = 0
            xa = np.zeros_like(xb)
            for k in range(len(idx)):
                dy, dx = sh[k]
                src = xb[k, :, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
                xa[k, :, max(0, dy) : 8 - max(0, -dy), max(0, dx) : 8 - max(0, -dx)] = src
            logits = model.forward(xa, train=True)
            loss, d = softmax_xent(logits, y_tr[idx])
            loss_sum += loss * len(idx)
            grads = model.backward(d)
            step += 1
            cur_lr = lr * 0.5 * (1 + np.cos(np.pi * step / total))
            for k in model.p:
                gk = grads[k]
                if k.endswith(".w"):
                    gk = gk + wd * model.p[k]
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                mh = m[k] / (1 - b1**step)
                vh = v[k] / (1 - b2**step)
                model.p[k] -= cur_lr * mh / (np.sqrt(vh) + eps)
        if (ep + 1) % 10 == 0 or ep == epochs - 1:
            acc = (model.forward(x_te.astype(np.float64)).argmax(1) == y_te).mean()
            print(f"  [{model.name}] epoch {ep + 1:3d}  loss {loss_sum / n:.4f}  test acc {acc:.4f}", flush=True)
    return (model.forward(x_te.astype(np.float64)).argmax(1) == y_te).mean()


# ---------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.ascontiguousarray(arr, dtype=dtype), name)


def _io(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *dims])


def _conv(name, x, w, b, out):
    return helper.make_node(
        "Conv", [x, w, b], [out], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]
    )


def _linear(name, x, w, b, out, use_gemm, inits, p):
    """Gemm(transB=1, W [out,in]) or MatMul(x, W^T [in,out]) + Add(bias)."""
    if use_gemm:
        inits += [_init(w, p[w]), _init(b, p[b])]
        return [helper.make_node("Gemm", [x, w, b], [out], name=name, alpha=1.0, beta=1.0, transB=1)]
    wt = w + "_t"
    inits += [_init(wt, p[w].T), _init(b, p[b])]
    return [
        helper.make_node("MatMul", [x, wt], [name + "_mm"], name=name + "_matmul"),
        helper.make_node("Add", [name + "_mm", b], [out], name=name + "_add"),
    ]


def _finish(graph_name, nodes, inits, out_dim, doc):
    graph = helper.make_graph(
        nodes, graph_name, [_io("input", 1, 8, 8)], [_io("logits", out_dim)], initializer=inits
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tern-models-generate",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def export_digits(p, use_gemm=True):
    inits = [_init(k, p[k]) for k in ("conv1.w", "conv1.b", "conv2.w", "conv2.b")]
    nodes = [
        _conv("conv1", "input", "conv1.w", "conv1.b", "conv1_out"),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        _conv("conv2", "relu1_out", "conv2.w", "conv2.b", "conv2_out"),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node(
            "MaxPool", ["relu2_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["pool_out"], ["flat_out"], name="flatten", axis=1),
    ]
    nodes += _linear("fc1", "flat_out", "fc1.w", "fc1.b", "fc1_out", use_gemm, inits, p)
    nodes.append(helper.make_node("Relu", ["fc1_out"], ["relu3_out"], name="relu3"))
    nodes += _linear("fc2", "relu3_out", "fc2.w", "fc2.b", "logits", use_gemm, inits, p)
    return _finish("digits", nodes, inits, 10, "Tern test model: small CNN on sklearn load_digits (8x8)")


def export_resblock(p, use_gemm=True):
    inits = [_init(k, p[k]) for k in ("stem.w", "stem.b", "res1.w", "res1.b", "res2.w", "res2.b")]
    nodes = [
        _conv("stem", "input", "stem.w", "stem.b", "stem_out"),
        helper.make_node("Relu", ["stem_out"], ["stem_relu_out"], name="stem_relu"),
        _conv("res1", "stem_relu_out", "res1.w", "res1.b", "res1_out"),
        helper.make_node("Relu", ["res1_out"], ["res1_relu_out"], name="res1_relu"),
        _conv("res2", "res1_relu_out", "res2.w", "res2.b", "res2_out"),
        helper.make_node("Add", ["res2_out", "stem_relu_out"], ["skip_out"], name="skip_add"),
        helper.make_node("Relu", ["skip_out"], ["block_out"], name="block_relu"),
        helper.make_node("GlobalAveragePool", ["block_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
    ]
    nodes += _linear("fc", "flat_out", "fc.w", "fc.b", "logits", use_gemm, inits, p)
    return _finish(
        "resblock", nodes, inits, 10, "Tern test model: conv stem + one residual block on sklearn load_digits"
    )


# ---------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------


class DigitsReader(CalibrationDataReader):
    def __init__(self, x, batch=128):
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.it = iter(self.batches)

    def get_next(self):
        b = next(self.it, None)
        return None if b is None else {"input": b}

    def rewind(self):
        self.it = iter(self.batches)


QDQ_SETTINGS = dict(
    quant_format=QuantFormat.QDQ,
    per_channel=True,
    reduce_range=False,
    activation_type=QuantType.QInt8,  # quantize_static's default
    weight_type=QuantType.QInt8,
    calibrate_method=CalibrationMethod.MinMax,
    op_types_to_quantize=None,  # default: every supported op
    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
)
QOP_SETTINGS = dict(
    quant_format=QuantFormat.QOperator,
    per_channel=True,
    reduce_range=False,
    activation_type=QuantType.QUInt8,
    weight_type=QuantType.QInt8,
    calibrate_method=CalibrationMethod.MinMax,
    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
)


def quantize(fp32_model, out_path, x_calib, settings, tmp):
    src = Path(tmp) / f"{out_path.parent.parent.name}.src.onnx"
    pre = Path(tmp) / f"{out_path.parent.parent.name}.pre.onnx"
    onnx.save(fp32_model, src)
    # Shape inference only (ONNX); ORT graph optimisation is skipped so that the
    # quantized graph keeps the FP32 graph's structure (e.g. MatMul+Add is not
    # re-fused into Gemm). Symbolic shape inference is unnecessary here (and needs sympy).
    quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
    quantize_static(str(pre), str(out_path), DigitsReader(x_calib), **settings)
    m = onnx.load(out_path)
    # drop value_info added by shape inference: keeps files small and the graph plain
    del m.graph.value_info[:]
    m.producer_name = "tern-models-generate (onnxruntime.quantization " + ort.__version__ + ")"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, out_path)
    return m


# ---------------------------------------------------------------------------
# Inspection helpers
# ---------------------------------------------------------------------------

_DT = {v: k for k, v in TensorProto.DataType.items()}


def op_histogram(m):
    c = collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}") for n in m.graph.node
    )
    return dict(sorted(c.items()))


def describe_patterns(m):
    """Human-readable pattern around each compute node (Conv/Gemm/MatMul/QLinear*/Add)."""
    inits = {i.name: i for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    cons = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            cons[i].append(n)

    def init_desc(name):
        t = inits[name]
        return f"{_DT[t.data_type].lower()}{list(t.dims)}"

    def dq_desc(n):
        x, s = n.input[0], n.input[1]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if x in inits:
            per = f" per-channel axis {axis}" if len(inits[s].dims) > 0 and inits[s].dims[0] > 1 else " per-tensor"
            return f"DQ({x}: {init_desc(x)}{per})"
        src = prod.get(x)
        return f"DQ({x} <- {src.op_type if src else 'graph input'})"

    def in_desc(name):
        if name in inits:
            return f"{name}: {init_desc(name)}"
        p = prod.get(name)
        if p is None:
            return f"{name} (graph input)"
        if p.op_type == "DequantizeLinear":
            return dq_desc(p)
        return f"{name} <- {p.op_type}"

    def chain_after(name, depth=3):
        out = []
        cur = name
        for _ in range(depth):
            cs = cons.get(cur, [])
            if not cs:
                out.append("[graph output]")
                break
            names = [c.op_type for c in cs]
            out.append("|".join(names))
            if len(cs) != 1 or cs[0].op_type in ("QuantizeLinear",):
                if len(cs) == 1:
                    zp = cs[0].input[2] if len(cs[0].input) > 2 else None
                    if zp and zp in inits:
                        out[-1] += f"(zp={numpy_helper.to_array(inits[zp]).tolist()} {init_desc(zp)})"
                break
            cur = cs[0].output[0]
            if cs[0].op_type.startswith("QLinear") or cs[0].op_type in ("Conv", "Gemm", "MatMul", "Add"):
                break
        return " -> ".join(out)

    res = []
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "Add", "QLinearConv", "QLinearMatMul", "GlobalAveragePool", "MaxPool"):
            ins = [in_desc(i) for i in n.input if i]
            if n.op_type.startswith("QLinear"):
                ins = [in_desc(n.input[0]), in_desc(n.input[3])] + (
                    [in_desc(n.input[8])] if n.op_type == "QLinearConv" and len(n.input) > 8 else []
                )
                ins.append(f"x_zp {init_desc(n.input[2])}={numpy_helper.to_array(inits[n.input[2]]).tolist()}")
                ins.append(f"w_scale {list(inits[n.input[4]].dims)} w_zp {init_desc(n.input[5])}")
                ins.append(f"y_zp {init_desc(n.input[7])}={numpy_helper.to_array(inits[n.input[7]]).tolist()}")
            res.append(f"{n.name}: " + ", ".join(ins) + f" -> {n.op_type} -> " + chain_after(n.output[0]))
    return res


def check_no_contrib(m):
    bad = [f"{n.domain}.{n.op_type}" for n in m.graph.node if n.domain not in ("", "ai.onnx")]
    if bad:
        raise SystemExit(f"contrib ops in {m.graph.name}: {bad}")


def check_symbolic_batch(m):
    for vi in list(m.graph.input) + list(m.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        if d0.dim_param != "N":
            raise SystemExit(f"{m.graph.name}: {vi.name} batch dim is not symbolic N: {d0}")


def session(path, opt=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = opt
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main():
    t0 = time.time()
    np.random.seed(SEED)
    x_tr, y_tr, x_te, y_te = load_data()
    print(f"digits: train {x_tr.shape} test {x_te.shape}  (numpy {np.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__})")

    TESTDATA.mkdir(parents=True, exist_ok=True)
    np.save(TESTDATA / "digits_test_x.npy", x_te.astype(np.float32))
    np.save(TESTDATA / "digits_test_y.npy", y_te.astype(np.int64))

    specs = [
        (DigitsCNN, export_digits, dict(epochs=30, lr=3e-3)),
        (ResBlockCNN, export_resblock, dict(epochs=60, lr=1e-2)),
    ]
    variants = {}  # name -> (path, numpy_acc or None)
    with tempfile.TemporaryDirectory(prefix="tern-models-") as tmp:
        for cls, export, hp in specs:
            rng = np.random.default_rng(SEED)
            model = cls(rng)
            t = time.time()
            acc = train(model, x_tr, y_tr, x_te, y_te, **hp)
            print(f"  [{cls.name}] numpy test accuracy {acc:.4f}  ({time.time() - t:.1f}s)")
            p32 = {k: v.astype(np.float32) for k, v in model.p.items()}

            base = cls.name
            fp32 = export(p32, use_gemm=True)
            out = ROOT / base / "1" / "model.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(fp32, out)
            variants[base] = out

            out = ROOT / f"{base}-int8-qdq" / "1" / "model.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            quantize(fp32, out, x_tr, QDQ_SETTINGS, tmp)
            variants[f"{base}-int8-qdq"] = out

            # QOperator: ORT turns Gemm into com.microsoft.QGemm, so quantize a
            # MatMul+Add rewrite of the same weights instead (-> QLinearMatMul + float Add).
            out = ROOT / f"{base}-int8-qop" / "1" / "model.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            quantize(export(p32, use_gemm=False), out, x_tr, QOP_SETTINGS, tmp)
            variants[f"{base}-int8-qop"] = out

    summary = {
        "generator": {
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": OPSET,
            "test_samples": int(len(y_te)),
            "reference": "onnxruntime CPUExecutionProvider, intra_op_num_threads=1, ORT_ENABLE_ALL",
        },
        "variants": {},
    }
    for name, path in variants.items():
        m = onnx.load(path)
        check_no_contrib(m)
        check_symbolic_batch(m)
        sess = session(path)
        ref = sess.run(["logits"], {"input": x_te})[0].astype(np.float32)
        assert ref.shape == (len(y_te), 10) and ref.dtype == np.float32
        np.save(TESTDATA / f"{name}.ref.npy", ref)
        # literal (unfused) semantics: every DQ/Q and float op run as written
        ref_noopt = session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["logits"], {"input": x_te})[0]
        # symbolic batch: batch 1 and batch 7 must work and match the full-batch rows
        for bs in (1, 7):
            o = sess.run(["logits"], {"input": x_te[:bs]})[0]
            assert o.shape == (bs, 10), o.shape
            assert np.allclose(o, ref[:bs], atol=1e-4, rtol=1e-4), (name, bs, np.abs(o - ref[:bs]).max())
        acc = float((ref.argmax(1) == y_te).mean())
        summary["variants"][name] = {
            "path": str(path.relative_to(ROOT)),
            "accuracy": round(acc, 6),
            "ops": op_histogram(m),
            "size_bytes": path.stat().st_size,
            "max_abs_diff_vs_unoptimized_ort": float(np.abs(ref - ref_noopt).max()),
            "patterns": describe_patterns(m),
        }
        if path.stat().st_size > 200 * 1024:
            raise SystemExit(f"{name} too large: {path.stat().st_size}")

    for base in ("digits", "resblock"):
        for q in ("qdq", "qop"):
            if summary["variants"][f"{base}-int8-{q}"]["accuracy"] < 0.95:
                raise SystemExit(f"{base}-int8-{q} accuracy below 95%")
        if summary["variants"][base]["accuracy"] < 0.95:
            raise SystemExit(f"{base} accuracy below 95%")

    with open(TESTDATA / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
        f.write("\n")

    print()
    print(f"{'variant':<20} {'acc':>7} {'bytes':>8}  ops")
    for name, s in summary["variants"].items():
        ops = ", ".join(f"{k}x{v}" for k, v in s["ops"].items())
        print(f"{name:<20} {s['accuracy']:7.4f} {s['size_bytes']:8d}  {ops}")
    print(f"\ndone in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
