"""The digits CNN with its Softmax head, quantized Softmax included (QDQ), as onnxruntime's
tooling quantizes a classifier exported with its Softmax.

It is the regression model for a fold in tract 0.23.9 that turns `DequantizeLinear → Softmax →
QuantizeLinear` into an element-wise lookup table (every probability becomes the same value).
Writes models/digits-int8-qdq-softmax/1/model.onnx and onnxruntime's outputs on the held-out
digits, models/testdata/digits-int8-qdq-softmax.ref.npy. Deterministic; run from the repository
root with the models venv (see models/README.md):

    .venv-models/bin/python models/generate_softmax_head.py
"""
from pathlib import Path
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

ROOT = Path(__file__).resolve().parent
X = np.load(ROOT / "testdata/digits_test_x.npy").astype(np.float32)


class Reader(CalibrationDataReader):
    # The held-out rows double as calibration data: this model tests a rewrite, not a
    # quantization recipe.
    def __init__(self):
        self.it = iter([{"input": X[i:i + 50]} for i in range(0, len(X), 50)])

    def get_next(self):
        return next(self.it, None)


fp32 = onnx.load(ROOT / "digits/1/model.onnx")
logits = fp32.graph.output[0].name
fp32.graph.node.append(helper.make_node("Softmax", [logits], ["probs"], name="head", axis=1))
del fp32.graph.output[:]
fp32.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10]))
out = ROOT / "digits-int8-qdq-softmax/1/model.onnx"
out.parent.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / "src.onnx"
    onnx.save(fp32, src)
    quantize_static(
        str(src),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
m = onnx.load(out)
del m.graph.value_info[:]
m.producer_name = "tern-models-generate_softmax_head (onnxruntime.quantization " + ort.__version__ + ")"
onnx.checker.check_model(m, full_check=True)
onnx.save(m, out)
ops = [n.op_type for n in m.graph.node]
i = ops.index("Softmax")
producers = {o: n for n in m.graph.node for o in n.output}
consumers = [n for n in m.graph.node if m.graph.node[i].output[0] in n.input]
assert producers[m.graph.node[i].input[0]].op_type == "DequantizeLinear", "Softmax input is not DQ"
assert [c.op_type for c in consumers] == ["QuantizeLinear"], "Softmax output is not quantized"
ref = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
np.save(ROOT / "testdata/digits-int8-qdq-softmax.ref.npy", ref.astype(np.float32))
y = np.load(ROOT / "testdata/digits_test_y.npy")
print(f"{out}: ops {sorted(set(ops))}; onnxruntime accuracy {(ref.argmax(1) == y).mean():.4f}")
