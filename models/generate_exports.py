#!/usr/bin/env python3
"""A small corpus of ONNX models that reproduce graph patterns found in real PyTorch and
PaddlePaddle exports and that tract 0.23.9 finds hard, with onnxruntime's outputs on them.

The graphs are built by hand with `onnx.helper` and have random (seeded) weights: they test
graph handling, not accuracy. Every model has one float32 input `x` and one float32 output `y`,
uses opset 13 (default domain only) and IR version 8, and passes `onnx.checker` with
`full_check`. See the "Exports corpus" section of models/README.md for what each one reproduces.

Writes:
  models/exports/<name>.onnx
  models/testdata/exports/<name>.<case>.input.npy    float32 input of one test case
  models/testdata/exports/<name>.<case>.output.npy   onnxruntime's output on it (CPU EP,
                                                     intra_op_num_threads=1, ORT_ENABLE_ALL)
  models/testdata/exports/cases.json                 one entry per (model, case)
  models/testdata/exports/ort_session_ms.json        onnxruntime session creation time per
                                                     model (median of 5, one thread); the only
                                                     file that differs between runs

Deterministic (fixed seeds, one thread) apart from ort_session_ms.json; takes a few seconds.
Run from the repository root with the models venv (see models/README.md):

    .venv-models/bin/python models/generate_exports.py
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "exports"
DATA = ROOT / "testdata/exports"
OPSET = 13
IR_VERSION = 8
F = TensorProto.FLOAT


def init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def conv_weights(rng, c_out: int, c_in: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """He-initialised conv weight [c_out,c_in,k,k] and a small bias [c_out], float32."""
    w = rng.normal(0.0, np.sqrt(2.0 / (c_in * k * k)), (c_out, c_in, k, k)).astype(np.float32)
    b = rng.normal(0.0, 0.1, c_out).astype(np.float32)
    return w, b


def make_model(graph: onnx.GraphProto, producer: str = "tern-models-generate_exports") -> onnx.ModelProto:
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=producer,
        producer_version="1",
    )
    m.ir_version = IR_VERSION
    return m


def check(m: onnx.ModelProto) -> None:
    """Every generated model: valid, opset 13 default domain only, IR 8, one input `x`, one
    output `y`."""
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in m.opset_import] == [("", OPSET)]
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["y"]


def fpn_model(name: str, nodes: list, inits: list) -> onnx.ModelProto:
    """An FPN graph over x [N,3,H,W]; y is declared [N,4,Ho,Wo] as exporters write it, with
    symbols of their own (ceil(H/2) cannot be written with dim_params)."""
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", F, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", F, ["N", 4, "Ho", "Wo"])],
        inits,
    )
    return make_model(g)


# ---------------------------------------------------------------------------------------------
# 1. reshape-head: flatten through a run-time computed shape, value_info with the symbolic N
# ---------------------------------------------------------------------------------------------


def reshape_head() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, b1 = conv_weights(rng, 8, 3, 3)
    fc_a = rng.normal(0.0, np.sqrt(1.0 / 512), (512, 10)).astype(np.float32)
    fc_b = rng.normal(0.0, np.sqrt(1.0 / 512), (512, 10)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, 10).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["conv"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("MaxPool", ["relu"], ["h"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        # PyTorch's x.view(x.size(0), -1) / Paddle's reshape([x.shape[0], -1]):
        # Shape -> Gather(0) -> Unsqueeze -> Concat([-1]) -> Reshape.
        helper.make_node("Shape", ["h"], ["h.shape"], name="gather.shape"),
        helper.make_node("Gather", ["h.shape", "zero"], ["h.n"], name="gather.n", axis=0),
        helper.make_node("Unsqueeze", ["h.n", "axes0"], ["h.n1"], name="gather.unsqueeze"),
        helper.make_node("Concat", ["h.n1", "minus_one"], ["flat_a.shape"], name="gather.concat", axis=0),
        helper.make_node("Reshape", ["h", "flat_a.shape"], ["flat_a"], name="gather.reshape"),
        helper.make_node("MatMul", ["flat_a", "fc_a.w"], ["logits_a"], name="fc_a"),
        # The same flatten as PaddlePaddle exports it: the shape goes through int32 (Paddle's
        # shape tensors are int32) and the batch is taken by Slice(shape, [0], [1]).
        helper.make_node("Shape", ["h"], ["h.shape2"], name="slice.shape"),
        helper.make_node("Cast", ["h.shape2"], ["h.shape2_i32"], name="slice.cast32", to=TensorProto.INT32),
        helper.make_node("Slice", ["h.shape2_i32", "starts0", "ends1"], ["h.n_sliced"], name="slice.n"),
        helper.make_node("Concat", ["h.n_sliced", "minus_one_i32"], ["flat_b.shape_i32"], name="slice.concat", axis=0),
        helper.make_node("Cast", ["flat_b.shape_i32"], ["flat_b.shape"], name="slice.cast64", to=TensorProto.INT64),
        helper.make_node("Reshape", ["h", "flat_b.shape"], ["flat_b"], name="slice.reshape"),
        helper.make_node("MatMul", ["flat_b", "fc_b.w"], ["logits_b"], name="fc_b"),
        helper.make_node("Add", ["logits_a", "logits_b"], ["logits"], name="sum"),
        helper.make_node("Add", ["logits", "fc.b"], ["y"], name="bias"),
    ]
    inits = [
        init("conv.w", w1), init("conv.b", b1), init("fc_a.w", fc_a), init("fc_b.w", fc_b),
        init("fc.b", bias), init("zero", np.array(0, dtype=np.int64)), init("axes0", i64(0)),
        init("minus_one", i64(-1)), init("starts0", i64(0)), init("ends1", i64(1)),
        init("minus_one_i32", np.array([-1], dtype=np.int32)),
    ]
    g = helper.make_graph(
        nodes, "reshape_head",
        [helper.make_tensor_value_info("x", F, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", F, ["N", 10])],
        inits,
    )
    m = make_model(g)
    # Exporters write value_info for the intermediate values, with the batch as N. Keep what
    # ONNX shape inference finds (the int64 shape values, and the float tensors up to the
    # Reshapes); it cannot resolve Reshape's -1 next to a symbolic N, so the float tensors
    # after it get their [N, ...] shapes from this table, as torch.onnx writes them.
    expected = {
        "conv": ["N", 8, 16, 16], "relu": ["N", 8, 16, 16], "h": ["N", 8, 8, 8],
        "flat_a": ["N", 512], "flat_b": ["N", 512],
        "logits_a": ["N", 10], "logits_b": ["N", 10], "logits": ["N", 10],
    }
    m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    seen = set()
    for vi in m.graph.value_info:
        t = vi.type.tensor_type
        if t.elem_type != F:
            continue
        want = expected[vi.name]
        if t.HasField("shape"):
            got = [d.dim_param or d.dim_value for d in t.shape.dim]
            assert len(got) == len(want) and got[1:] == want[1:], (vi.name, got, want)
        t.ClearField("shape")
        for d in want:
            dim = t.shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
        seen.add(vi.name)
    for name in sorted(set(expected) - seen):
        m.graph.value_info.append(helper.make_tensor_value_info(name, F, expected[name]))
    return m


# ---------------------------------------------------------------------------------------------
# 2. fpn-upsample: Resize to another tensor's run-time spatial size (F.interpolate(size=...))
# ---------------------------------------------------------------------------------------------


def fpn_stem(rng, head_in: int) -> tuple[list, list]:
    """Two stride-2 conv + Relu stages (c1, c2) and the weights of a 1x1 head with `head_in`
    input channels: what both FPN models share."""
    w1, b1 = conv_weights(rng, 8, 3, 3)
    w2, b2 = conv_weights(rng, 8, 8, 3)
    w3, b3 = conv_weights(rng, 4, head_in, 1)
    s2 = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1.conv"], name="c1", **s2),
        helper.make_node("Relu", ["c1.conv"], ["c1"], name="c1.relu"),
        helper.make_node("Conv", ["c1", "c2.w", "c2.b"], ["c2.conv"], name="c2", **s2),
        helper.make_node("Relu", ["c2.conv"], ["c2"], name="c2.relu"),
    ]
    inits = [
        init("c1.w", w1), init("c1.b", b1), init("c2.w", w2), init("c2.b", b2),
        init("head.w", w3), init("head.b", b3),
    ]
    return nodes, inits


def fpn_upsample() -> onnx.ModelProto:
    nodes, inits = fpn_stem(np.random.default_rng(1), 16)
    nodes += [
        # sizes = concat(c2.shape[0:2], c1.shape[2:4]), as torch.onnx exports
        # F.interpolate(c2, size=c1.shape[2:], mode="nearest").
        helper.make_node("Shape", ["c1"], ["c1.shape"], name="c1.shape"),
        helper.make_node("Slice", ["c1.shape", "starts2", "ends4", "axes0"], ["c1.hw"], name="c1.hw"),
        helper.make_node("Shape", ["c2"], ["c2.shape"], name="c2.shape"),
        helper.make_node("Slice", ["c2.shape", "starts0", "ends2", "axes0"], ["c2.nc"], name="c2.nc"),
        helper.make_node("Concat", ["c2.nc", "c1.hw"], ["up.sizes"], name="up.sizes", axis=0),
        helper.make_node("Resize", ["c2", "", "", "up.sizes"], ["up"], name="up",
                         mode="nearest", coordinate_transformation_mode="asymmetric",
                         nearest_mode="floor"),
        helper.make_node("Concat", ["c1", "up"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "head.w", "head.b"], ["y"], name="head", kernel_shape=[1, 1]),
    ]
    inits += [
        init("starts0", i64(0)), init("ends2", i64(2)), init("starts2", i64(2)), init("ends4", i64(4)),
        init("axes0", i64(0)),
    ]
    return fpn_model("fpn_upsample", nodes, inits)


# ---------------------------------------------------------------------------------------------
# 2b. fpn-scales: up-sample by a scale factor and add the skip connection (PaddleDetection)
# ---------------------------------------------------------------------------------------------


def fpn_scales() -> onnx.ModelProto:
    nodes, inits = fpn_stem(np.random.default_rng(4), 8)
    nodes += [
        # Up-sampled by 2: 2*ceil(ceil(H/2)/2) equals ceil(H/2) only when H is a multiple of 4,
        # which a detector's input always is, but nothing in the graph says so.
        helper.make_node("Resize", ["c2", "", "up.scales"], ["up"], name="up", mode="nearest"),
        helper.make_node("Add", ["c1", "up"], ["merged"], name="merge"),
        helper.make_node("Conv", ["merged", "head.w", "head.b"], ["y"], name="head", kernel_shape=[1, 1]),
    ]
    inits.append(init("up.scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32)))
    return fpn_model("fpn_scales", nodes, inits)


# ---------------------------------------------------------------------------------------------
# 3./4. const-if, const-if-init: an If whose untaken branch is shape-invalid for the inputs
# ---------------------------------------------------------------------------------------------


def const_if(cond_from_shape: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(2 if cond_from_shape else 3)
    w, b = conv_weights(rng, 4, 3, 1)
    then_g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["then.relu"], name="then.relu"),
            helper.make_node("Mul", ["then.relu", "two"], ["then.y"], name="then.mul"),
        ],
        "then_branch", [], [helper.make_tensor_value_info("then.y", F, None)],
        [init("two", np.array(2.0, dtype=np.float32))],
    )
    # Squeezing axis 1 (size 3 for every valid input) is an error if it ever runs: this branch
    # is dead, and only a lazy If (or constant folding of the condition) gets past it. The
    # squeeze reads x through Reshape(x, Shape(x)), a no-op at run time, only because ONNX's
    # own shape inference (onnx.checker's full_check) rejects Squeeze(x) on the statically
    # known size-3 axis; a runtime that propagates shapes through Shape/Reshape sees it all.
    else_g = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["else.shape"], name="else.shape"),
            helper.make_node("Reshape", ["x", "else.shape"], ["else.x"], name="else.reshape"),
            helper.make_node("Squeeze", ["else.x", "else.axes"], ["else.sq"], name="else.squeeze"),
            helper.make_node("Unsqueeze", ["else.sq", "else.axes"], ["else.y"], name="else.unsqueeze"),
        ],
        "else_branch", [], [helper.make_tensor_value_info("else.y", F, None)],
        [init("else.axes", i64(1))],
    )
    nodes = []
    inits = [init("head.w", w), init("head.b", b)]
    if cond_from_shape:
        # `if x.shape[1] == 3:` traced by torch.jit.script / Paddle's dy2static.
        nodes += [
            helper.make_node("Shape", ["x"], ["x.shape"], name="cond.shape"),
            helper.make_node("Gather", ["x.shape", "one"], ["x.c"], name="cond.gather", axis=0),
            helper.make_node("Equal", ["x.c", "three"], ["cond"], name="cond.equal"),
        ]
        inits += [init("one", np.array(1, dtype=np.int64)), init("three", np.array(3, dtype=np.int64))]
    else:
        inits.append(init("cond", np.array(True)))
    nodes += [
        helper.make_node("If", ["cond"], ["if.y"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Conv", ["if.y", "head.w", "head.b"], ["y"], name="head", kernel_shape=[1, 1]),
    ]
    g = helper.make_graph(
        nodes, "const_if" if cond_from_shape else "const_if_init",
        [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F, ["N", 4, 8, 8])],
        inits,
    )
    return make_model(g)


# ---------------------------------------------------------------------------------------------
# 5. pointwise: 1x1 convolutions Tern writes as matrix products, and ones it must leave alone
# ---------------------------------------------------------------------------------------------


def pointwise() -> onnx.ModelProto:
    """1x1 convolutions with and without bias, explicit zero pads and VALID padding, a kernel
    declared in value_info (as some exporters write), next to 1x1 convolutions that are not
    plain matrix products (stride 2, two groups) or whose kernel two nodes share. (The strided
    one comes first: tract 0.23.9 fails to pull its downsampling up through a matrix product's
    reshapes when H and W are symbolic, whoever wrote the product.)"""
    rng = np.random.default_rng(5)
    w0, b0 = conv_weights(rng, 8, 3, 3)
    w1, b1 = conv_weights(rng, 16, 8, 1)
    w2, _ = conv_weights(rng, 8, 16, 1)
    ws, bs = conv_weights(rng, 8, 8, 1)
    wd, bd = conv_weights(rng, 8, 8, 1)
    wg, bg = conv_weights(rng, 4, 4, 1)
    nodes = [
        helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["c0"], name="c0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
        helper.make_node("Conv", ["r0", "d.w", "d.b"], ["d"], name="down", strides=[2, 2]),
        helper.make_node("Conv", ["d", "p1.w", "p1.b"], ["p1"], name="p1", kernel_shape=[1, 1],
                         pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("Relu", ["p1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "p2.w"], ["p2"], auto_pad="VALID"),
        helper.make_node("Conv", ["p2", "shared.w", "shared.b"], ["s1"], name="s1"),
        helper.make_node("Relu", ["s1"], ["r2"], name="r2"),
        helper.make_node("Conv", ["r2", "shared.w", "shared.b"], ["s2"], name="s2"),
        helper.make_node("Add", ["p2", "s2"], ["res"], name="res"),
        helper.make_node("Conv", ["res", "g.w", "g.b"], ["y"], name="grouped", group=2),
    ]
    inits = [
        init("c0.w", w0), init("c0.b", b0), init("p1.w", w1), init("p1.b", b1), init("p2.w", w2),
        init("shared.w", ws), init("shared.b", bs), init("g.w", wg), init("g.b", bg),
        init("d.w", wd), init("d.b", bd),
    ]
    g = helper.make_graph(
        nodes, "pointwise",
        [helper.make_tensor_value_info("x", F, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", F, ["N", 4, "Ho", "Wo"])],
        inits,
        value_info=[helper.make_tensor_value_info("p1.w", F, [16, 8, 1, 1])],
    )
    return make_model(g)


# ---------------------------------------------------------------------------------------------
# 6. excite: squeeze-and-excitation blocks as exports write them
# ---------------------------------------------------------------------------------------------


def excite() -> onnx.ModelProto:
    """Two squeeze-and-excitation blocks Tern runs as one op each: SE-ResNet's (global average
    pool, 1x1 conv, ReLU, 1x1 conv, Sigmoid, Mul) and MobileNetV3's as torchvision exports it
    (HardSigmoid gate, the gate as the Mul's first operand); then a gate applied twice, which
    has two readers and stays with tract."""
    rng = np.random.default_rng(6)
    w0, b0 = conv_weights(rng, 16, 3, 3)
    layers = {name: conv_weights(rng, o, i, 1) for name, o, i in [
        ("a1", 4, 16), ("a2", 16, 4), ("b1", 8, 16), ("b2", 16, 8), ("c1", 4, 16), ("c2", 16, 4),
        ("head", 4, 16),
    ]}

    def conv(name: str, x: str) -> object:
        return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name)

    nodes = [
        helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["c0"], name="c0", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["f0"], name="r0"),
        helper.make_node("GlobalAveragePool", ["f0"], ["a.pool"], name="a.pool"),
        conv("a1", "a.pool"),
        helper.make_node("Relu", ["a1"], ["a.hidden"], name="a.relu"),
        conv("a2", "a.hidden"),
        helper.make_node("Sigmoid", ["a2"], ["a.gate"], name="a.gate"),
        helper.make_node("Mul", ["f0", "a.gate"], ["fa"], name="a.scale"),
        helper.make_node("GlobalAveragePool", ["fa"], ["b.pool"], name="b.pool"),
        conv("b1", "b.pool"),
        helper.make_node("Relu", ["b1"], ["b.hidden"], name="b.relu"),
        conv("b2", "b.hidden"),
        helper.make_node("HardSigmoid", ["b2"], ["b.gate"], name="b.gate", alpha=1.0 / 6, beta=0.5),
        helper.make_node("Mul", ["b.gate", "fa"], ["fb"], name="b.scale"),
        helper.make_node("GlobalAveragePool", ["fb"], ["c.pool"], name="c.pool"),
        conv("c1", "c.pool"),
        helper.make_node("Relu", ["c1"], ["c.hidden"], name="c.relu"),
        conv("c2", "c.hidden"),
        helper.make_node("Sigmoid", ["c2"], ["c.gate"], name="c.gate"),
        helper.make_node("Mul", ["fb", "c.gate"], ["fc"], name="c.scale"),
        helper.make_node("Mul", ["fc", "c.gate"], ["fd"], name="c.again"),
        conv("head", "fd"),
    ]
    inits = [init("c0.w", w0), init("c0.b", b0)]
    for name, (w, b) in layers.items():
        inits += [init(f"{name}.w", w), init(f"{name}.b", b)]
    nodes[-1].output[0] = "y"
    g = helper.make_graph(
        nodes, "excite",
        [helper.make_tensor_value_info("x", F, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", F, ["N", 4, "H", "W"])],
        inits,
    )
    return make_model(g)


# ---------------------------------------------------------------------------------------------

SPECS = [
    (
        "reshape-head",
        reshape_head,
        [("b1", (1, 3, 16, 16)), ("b3", (3, 3, 16, 16))],
        "Flatten done as Reshape(h, Concat(Unsqueeze(Gather(Shape(h), 0)), [-1])) and again as "
        "Reshape(h, Cast64(Concat(Slice(Cast32(Shape(h)), [0], [1]), [-1]))), with value_info "
        "carrying the symbolic N.",
    ),
    (
        "fpn-scales",
        fpn_scales,
        [("16x16", (1, 3, 16, 16)), ("32x48", (1, 3, 32, 48)), ("b2-16x16", (2, 3, 16, 16))],
        "Nearest Resize by scales [1,1,2,2] added to the skip connection: equal sizes only for "
        "inputs that are multiples of 4, which tract cannot prove for symbolic H and W.",
    ),
    (
        "fpn-upsample",
        fpn_upsample,
        [("16x16", (1, 3, 16, 16)), ("24x40", (1, 3, 24, 40)), ("17x23", (1, 3, 17, 23)),
         ("b2-16x16", (2, 3, 16, 16))],
        "Nearest Resize (opset 13, empty roi and scales) to sizes computed at run time as "
        "Concat(Slice(Shape(c2), 0, 2), Slice(Shape(c1), 2, 4)), as torch exports F.interpolate(size=...).",
    ),
    (
        "const-if",
        lambda: const_if(True),
        [("b1", (1, 3, 8, 8)), ("b2", (2, 3, 8, 8))],
        "If on Equal(Gather(Shape(x), 1), 3), always true, whose dead else branch squeezes the "
        "size-3 axis 1 (shape-invalid for every valid input).",
    ),
    (
        "const-if-init",
        lambda: const_if(False),
        [("b1", (1, 3, 8, 8))],
        "If on a boolean initializer `true` whose dead else branch squeezes the size-3 axis 1 "
        "(shape-invalid for every valid input).",
    ),
    (
        "pointwise",
        pointwise,
        [("b1-16x16", (1, 3, 16, 16)), ("b2-12x20", (2, 3, 12, 20))],
        "1x1 convolutions (bias or none, zero pads or VALID, kernel declared in value_info) that "
        "are matrix products, beside 1x1 ones that are not (stride 2, two groups, a shared kernel).",
    ),
    (
        "excite",
        excite,
        [("b1-12x20", (1, 3, 12, 20)), ("b2-9x9", (2, 3, 9, 9))],
        "Squeeze-and-excitation blocks: a Sigmoid gate (SE-ResNet), a HardSigmoid gate as the "
        "Mul's first operand (torchvision's MobileNetV3), and a gate read twice.",
    ),
]


def session(path: Path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_dead_branch_fails(m: onnx.ModelProto) -> None:
    """Flips the If's condition (3 -> 4 in the shape test, or `true` -> `false`) and checks that
    the else branch then fails in onnxruntime: it really is shape-invalid for the inputs."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    flip = {"three": np.array(4, dtype=np.int64), "cond": np.array(False)}
    for t in m.graph.initializer:
        if t.name in flip:
            t.CopyFrom(init(t.name, flip[t.name]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    try:
        sess.run(["y"], {"x": np.zeros((1, 3, 8, 8), np.float32)})
    except Exception as e:  # onnxruntime raises its own Fail type
        assert "Squeeze" in str(e), e
    else:
        raise AssertionError("the else branch ran without error")


def main() -> None:
    MODELS.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    cases = []
    timings = {}
    for seed, (name, build, tests, pattern) in enumerate(SPECS):
        m = build()
        check(m)
        path = MODELS / f"{name}.onnx"
        onnx.save(m, path)
        size = path.stat().st_size
        assert size < 200_000, (name, size)

        if any(n.op_type == "If" for n in m.graph.node):
            check_dead_branch_fails(m)
        sess = session(path)
        unopt = session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        worst = 0.0
        for k, (tag, shape) in enumerate(tests):
            rng = np.random.default_rng(1000 + 100 * seed + k)
            x = rng.standard_normal(shape).astype(np.float32)
            (y,) = sess.run(["y"], {"x": x})
            (y0,) = unopt.run(["y"], {"x": x})
            assert y.dtype == np.float32 and np.isfinite(y).all()
            worst = max(worst, float(np.abs(y - y0).max()))
            np.save(DATA / f"{name}.{tag}.input.npy", x)
            np.save(DATA / f"{name}.{tag}.output.npy", y)
            cases.append({
                "model": name,
                "case": tag,
                "input_shape": list(shape),
                "output_shape": list(y.shape),
                "pattern": pattern,
            })
            print(f"{name}.{tag}: x {list(shape)} -> y {list(y.shape)}")

        ms = []
        for _ in range(5):
            t0 = time.perf_counter()
            session(path)
            ms.append((time.perf_counter() - t0) * 1e3)
        timings[name] = round(statistics.median(ms), 3)
        ops = sorted({n.op_type for n in m.graph.node})
        print(f"{path.relative_to(ROOT.parent)}: {size} bytes, ops {ops}, "
              f"max |ORT_ENABLE_ALL - ORT_DISABLE_ALL| {worst:.3g}, session {timings[name]} ms")

    (DATA / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    (DATA / "ort_session_ms.json").write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
