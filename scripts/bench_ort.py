#!/usr/bin/env python3
"""onnxruntime's steady-state latency, measured the way `tern bench` measures Tern's: one
session, one thread, random standard-normal input, untimed warm-up, then p50/p90/p99 of
back-to-back runs.

    .venv-models/bin/python scripts/bench_ort.py MODEL.onnx [MODEL.onnx ...] \
        [--batch 1 8] [--iters 500] [--warmup 20]

Prints one line per model and batch size: p50, p90, p99 in milliseconds.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import time

import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for path in args.models:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for batch in args.batch:
            feeds = {}
            for i in sess.get_inputs():
                shape = [batch if not isinstance(d, int) else d for d in i.shape]
                dt = TYPES[i.type]
                if dt == np.float32:
                    feeds[i.name] = rng.standard_normal(shape).astype(dt)
                else:
                    feeds[i.name] = rng.integers(0, 256, shape).astype(np.uint8).view(dt)
            for _ in range(args.warmup):
                sess.run(None, feeds)
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t)
            p50, p90, p99 = (np.percentile(times, q) * 1e3 for q in (50, 90, 99))
            print(f"{path} batch {batch}: p50 {p50:.3f} ms, p90 {p90:.3f} ms, p99 {p99:.3f} ms "
                  f"(onnxruntime {ort.__version__}, 1 thread)")


if __name__ == "__main__":
    main()
