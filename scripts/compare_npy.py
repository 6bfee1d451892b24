"""Checks a `tern run` output against onnxruntime's reference: top-1 agreement, accuracy against
labels, and max abs difference. Used by .ci/run on outputs computed under qemu (ARM kernels).

    python scripts/compare_npy.py GOT.npy REF.npy LABELS.npy --max-abs 0.25 --min-agree 0.99
"""
import argparse
import sys

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("got")
p.add_argument("reference")
p.add_argument("labels")
p.add_argument("--max-abs", type=float, required=True)
p.add_argument("--min-agree", type=float, default=0.99)
a = p.parse_args()
got, ref, labels = np.load(a.got), np.load(a.reference), np.load(a.labels)
if got.shape != ref.shape:
    sys.exit(f"shape {got.shape} != reference {ref.shape}")
diff = float(np.abs(got - ref).max())
agree = float((got.argmax(1) == ref.argmax(1)).mean())
accuracy = float((got.argmax(1) == labels).mean())
print(f"{a.got}: max abs diff {diff:.3g}, top-1 agreement {agree:.4f}, accuracy {accuracy:.4f}")
if diff > a.max_abs or agree < a.min_agree:
    sys.exit("outside tolerance")
