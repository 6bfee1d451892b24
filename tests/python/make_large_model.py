"""Writes an ONNX model of about SIZE_MIB MiB: y = relu(x @ W + b) with a deterministic W.

usage: make_large_model.py SIZE_MIB OUT.onnx [SEED]
The input is `x` [N, 256] f32, the output `y` [N, K] with K chosen to reach the size. Used to
measure push-to-serving time and to prove that models far beyond one MQTT message transfer.
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

size_mib, out = float(sys.argv[1]), sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
rows = 256
cols = max(1, int(size_mib * (1 << 20) / 4 / rows))
rng = np.random.default_rng(seed)
w = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(np.float32)
b = np.zeros(cols, dtype=np.float32)
graph = helper.make_graph(
    [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ],
    "large",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
    [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.save(model, out)
