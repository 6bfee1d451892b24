#!/usr/bin/env python3
"""Realistic conv nets for cold-start benchmarks (model file -> first inference result), with
random (seeded) weights: MobileNetV3-Small, a 0.35-width MobileNetV3-Small on a text-line crop,
and ResNet-18.

The graphs are built by hand with `onnx.helper` the way a PyTorch export of the inference
graph looks after BatchNorm folding: every Conv carries its bias, there is no BatchNormalization
and no Dropout. Every model has one float32 input `x` [N,3,H,W] and one float32 output `y`
[N,classes], with the symbolic batch dimension `N`, uses opset 13 (default domain only) and IR
version 8, and passes `onnx.checker` with `full_check`. Weights are He-initialised (normal,
std sqrt(2 / fan_in)), biases normal with std 0.1. Opset 13 has no HardSwish (it came in opset
14), so h-swish is written as PyTorch exports it below opset 14: x * HardSigmoid(x) with
alpha 1/6, beta 0.5; h-sigmoid is HardSigmoid(alpha 1/6, beta 0.5).

  mobilenetv3-small               MobileNetV3-Small (Howard et al. 2019, Table 2), width 1.0,
                                  3x224x224, 1000 classes, ~2.5M parameters (~10 MB)
  mobilenetv3-small-x0.35-48x192  the same network at width 0.35 (channels rounded with
                                  make_divisible(c * 0.35, 8)), 3x48x192 input (a PaddleOCR-style
                                  text-recognition crop), 100 classes (~0.6 MB)
  resnet18                        ResNet-18 (He et al. 2015), 3x224x224, 1000 classes,
                                  ~11.7M parameters (~47 MB); skipped if it would exceed 50 MB

Writes, into OUT_DIR (default target/bench-models; the files are large, keep them out of git):
  <name>.onnx
  <name>.input.npy    float32 input, batch 1, standard normal
  <name>.output.npy   onnxruntime's output on it (CPU EP, intra_op_num_threads=1,
                      ORT_ENABLE_ALL)
  models.json         per model: file size, parameter count, input/output shapes, op types

Deterministic (fixed seeds, one thread); takes a few seconds. Run from the repository root with
the models venv (see models/README.md):

    .venv-models/bin/python models/generate_bench.py [OUT_DIR]

Cold-start timings for onnxruntime on these files: scripts/coldstart_ort.py.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from generate_exports import check, make_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "target/bench-models"
OPSET = 13
IR_VERSION = 8
F = TensorProto.FLOAT
MAX_BYTES = 50_000_000


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Channel rounding of the MobileNet papers (TF slim / torchvision `_make_divisible`):
    nearest multiple of `divisor`, but never more than 10% below `v`."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Builder:
    """Accumulates nodes and initializers of one graph; every op returns its output name."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0
        self.n = 0

    def name(self, op: str) -> str:
        self.n += 1
        return f"{op.lower()}_{self.n}"

    def weight(self, name: str, a: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(a, name))
        self.params += a.size
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> str:
        """Conv k x k with 'same' padding (k // 2) and a bias (the folded BatchNorm)."""
        fan_in = (c_in // groups) * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (c_out, c_in // groups, k, k))
        b = self.rng.normal(0.0, 0.1, c_out)
        out = self.name("Conv")
        wn = self.weight(f"{out}.weight", w.astype(np.float32))
        bn = self.weight(f"{out}.bias", b.astype(np.float32))
        p = k // 2
        self.nodes.append(helper.make_node(
            "Conv", [x, wn, bn], [out], name=out, kernel_shape=[k, k], strides=[stride, stride],
            pads=[p, p, p, p], dilations=[1, 1], group=groups))
        return out

    def gemm(self, x: str, c_in: int, c_out: int) -> str:
        """Fully connected layer as PyTorch exports nn.Linear: Gemm(x, W[out,in], b, transB=1)."""
        w = self.rng.normal(0.0, np.sqrt(2.0 / c_in), (c_out, c_in))
        b = self.rng.normal(0.0, 0.1, c_out)
        out = self.name("Gemm")
        wn = self.weight(f"{out}.weight", w.astype(np.float32))
        bn = self.weight(f"{out}.bias", b.astype(np.float32))
        self.nodes.append(helper.make_node(
            "Gemm", [x, wn, bn], [out], name=out, alpha=1.0, beta=1.0, transB=1))
        return out

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def hsigmoid(self, x: str) -> str:
        return self.node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)

    def hswish(self, x: str) -> str:
        return self.node("Mul", [x, self.hsigmoid(x)])

    def act(self, x: str, kind: str) -> str:
        return {"RE": self.relu, "HS": self.hswish}[kind](x)

    def model(self, x: str, y: str, shape: tuple[int, ...], classes: int, producer: str):
        # The last node's output is renamed to `y`.
        last = self.nodes[-1]
        assert last.output[0] == y
        last.output[0] = "y"
        graph = helper.make_graph(
            self.nodes, producer, [helper.make_tensor_value_info("x", F, ["N", *shape])],
            [helper.make_tensor_value_info("y", F, ["N", classes])], self.inits)
        return make_model(graph, "tern-models-generate_bench")


# ---------------------------------------------------------------------------------------------
# MobileNetV3-Small
# ---------------------------------------------------------------------------------------------

# Howard et al. 2019, Table 2: (kernel, expansion size, output channels, SE, activation, stride)
MOBILENETV3_SMALL = [
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]


def squeeze_excite(b: Builder, x: str, c: int) -> str:
    """x * h-sigmoid(W2 relu(W1 avgpool(x))), squeeze to make_divisible(c / 4) channels
    (as in torchvision's MobileNetV3)."""
    s = make_divisible(c // 4)
    g = b.node("GlobalAveragePool", [x])
    g = b.relu(b.conv(g, c, s, 1))
    g = b.hsigmoid(b.conv(g, s, c, 1))
    return b.node("Mul", [x, g])


def mobilenetv3_small(seed: int, width: float, hw: tuple[int, int], classes: int):
    b = Builder(seed)
    ch = lambda c: make_divisible(c * width)  # noqa: E731
    c = ch(16)
    x = b.hswish(b.conv("x", 3, c, 3, 2))
    for k, exp, out, se, act, stride in MOBILENETV3_SMALL:
        e, o = ch(exp), ch(out)
        h = x
        if e != c:  # the first block has no expansion conv (expansion == input channels)
            h = b.act(b.conv(h, c, e, 1), act)
        h = b.act(b.conv(h, e, e, k, stride, groups=e), act)
        if se:
            h = squeeze_excite(b, h, e)
        h = b.conv(h, e, o, 1)  # linear bottleneck: no activation
        if stride == 1 and c == o:
            h = b.node("Add", [x, h])
        x, c = h, o
    last_conv = ch(576)
    x = b.hswish(b.conv(x, c, last_conv, 1))
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    # torchvision scales the 1024-wide penultimate layer with the width multiplier too.
    last = ch(1024)
    x = b.hswish(b.gemm(x, last_conv, last))
    y = b.gemm(x, last, classes)
    return b.model("x", y, (3, *hw), classes, "mobilenetv3_small"), b.params


# ---------------------------------------------------------------------------------------------
# ResNet-18
# ---------------------------------------------------------------------------------------------


def resnet18(seed: int, hw: tuple[int, int], classes: int):
    b = Builder(seed)
    x = b.relu(b.conv("x", 3, 64, 7, 2))
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for stage, width in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = b.relu(b.conv(x, c, width, 3, stride))
            h = b.conv(h, width, width, 3)
            short = b.conv(x, c, width, 1, stride) if (stride != 1 or c != width) else x
            x = b.relu(b.node("Add", [h, short]))
            c = width
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    y = b.gemm(x, 512, classes)
    return b.model("x", y, (3, *hw), classes, "resnet18"), b.params


# name, builder, input (C, H, W), classes
SPECS = [
    ("mobilenetv3-small", lambda: mobilenetv3_small(1, 1.0, (224, 224), 1000), (3, 224, 224), 1000),
    ("mobilenetv3-small-x0.35-48x192", lambda: mobilenetv3_small(2, 0.35, (48, 192), 100),
     (3, 48, 192), 100),
    ("resnet18", lambda: resnet18(3, (224, 224), 1000), (3, 224, 224), 1000),
]


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for seed, (name, build, chw, classes) in enumerate(SPECS):
        m, params = build()
        size = m.ByteSize()
        if size > MAX_BYTES:
            print(f"{name}: {size} bytes > {MAX_BYTES}, skipped")
            continue
        check(m)
        path = out_dir / f"{name}.onnx"
        onnx.save(m, path)

        rng = np.random.default_rng(1000 + seed)
        x = rng.standard_normal((1, *chw)).astype(np.float32)
        (y,) = session(path).run(["y"], {"x": x})
        assert y.shape == (1, classes) and y.dtype == np.float32 and np.isfinite(y).all()
        np.save(out_dir / f"{name}.input.npy", x)
        np.save(out_dir / f"{name}.output.npy", y)

        ops = sorted({n.op_type for n in m.graph.node})
        summary[name] = {
            "file_bytes": path.stat().st_size,
            "parameters": params,
            "nodes": len(m.graph.node),
            "input": ["N", *chw],
            "output": ["N", classes],
            "ops": ops,
        }
        print(f"{path}: {path.stat().st_size} bytes, {params} parameters, "
              f"{len(m.graph.node)} nodes, ops {ops}, y std {float(y.std()):.3g}")
    (out_dir / "models.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
