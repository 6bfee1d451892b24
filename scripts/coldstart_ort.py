#!/usr/bin/env python3
"""onnxruntime cold start (model file -> first inference result) on ONNX models, for comparison
with Tern.

Every measurement runs in a fresh Python process (subprocess, `python -c`), so nothing is
cached in-process between runs. In that child, `onnxruntime` and `numpy` are imported and the
input is loaded first (not timed); then it times

  session  just before `InferenceSession(path, so)` to just after it returns (reading and
           parsing the file, graph optimisation, kernel creation)
  first    the first `run` on the input
  total    session + first

with intra_op_num_threads=1, inter_op_num_threads=1, ORT_ENABLE_ALL, CPUExecutionProvider.
The model file is read through the OS page cache, which is warm after the first run (this
measures process-cold, not disk-cold, start). Each model gets --runs such processes (median and
min reported), then one more process measures steady-state `run` latency: the median of
--steady runs after 5 warm-up runs.

The input is `<model>.input.npy` beside `<model>.onnx` (models/generate_bench.py writes one);
without it, a seeded standard-normal input of the model's input shape with every symbolic
dimension set to 1.

    .venv-models/bin/python models/generate_bench.py target/bench-models
    .venv-models/bin/python scripts/coldstart_ort.py target/bench-models/*.onnx [--runs 7]
        [--steady 50] [--json out.json]    (--json - prints the JSON to stdout instead)

Prints a Markdown table (milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

path, input_path, steady = sys.argv[1], sys.argv[2], int(sys.argv[3])
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
if input_path:
    x = np.load(input_path)
else:
    import onnx
    m = onnx.load(path, load_external_data=False)
    t = m.graph.input[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    del m
providers = ["CPUExecutionProvider"]

t0 = time.perf_counter()
sess = ort.InferenceSession(path, so, providers=providers)
t1 = time.perf_counter()
feeds = {sess.get_inputs()[0].name: x}
out = sess.run(None, feeds)
t2 = time.perf_counter()

res = {"session_ms": (t1 - t0) * 1e3, "first_ms": (t2 - t1) * 1e3,
       "total_ms": (t2 - t0) * 1e3, "output_shape": list(out[0].shape)}
if steady:
    for _ in range(5):
        sess.run(None, feeds)
    ms = []
    for _ in range(steady):
        a = time.perf_counter()
        sess.run(None, feeds)
        ms.append((time.perf_counter() - a) * 1e3)
    ms.sort()
    res["steady_median_ms"] = ms[len(ms) // 2] if len(ms) % 2 else (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]) / 2
    res["steady_min_ms"] = ms[0]
print("RESULT " + json.dumps(res))
"""


def child(model: Path, steady: int) -> dict:
    inp = model.with_name(model.name.removesuffix(".onnx") + ".input.npy")
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = "1"
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(inp) if inp.exists() else "", str(steady)],
        capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{model}: child failed (rc {p.returncode}):\n{p.stderr}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def measure(model: Path, runs: int, steady: int) -> dict:
    samples = [child(model, 0) for _ in range(runs)]
    res = {
        "model": model.name.removesuffix(".onnx"),
        "path": str(model),
        "file_bytes": model.stat().st_size,
        "runs": runs,
        "samples": samples,
    }
    for k in ("session_ms", "first_ms", "total_ms"):
        v = [s[k] for s in samples]
        res[k] = {"median": statistics.median(v), "min": min(v)}
    if steady:
        s = child(model, steady)
        res["steady_runs"] = steady
        res["steady_median_ms"] = s["steady_median_ms"]
        res["steady_min_ms"] = s["steady_min_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per model (default 7)")
    ap.add_argument("--steady", type=int, default=50,
                    help="timed runs for steady-state latency, after 5 warm-up (default 50; 0: skip)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (- for stdout)")
    a = ap.parse_args()

    import onnxruntime as ort  # only for the version in the report

    results = []
    for m in a.models:
        r = measure(m, a.runs, a.steady)
        results.append(r)
        print(f"{r['model']}: total median {r['total_ms']['median']:.1f} ms", file=sys.stderr)

    print(f"onnxruntime {ort.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{l:.2f}' for l in os.getloadavg())}; 1 thread, ORT_ENABLE_ALL, "
          f"CPUExecutionProvider; {a.runs} fresh processes per model, ms median (min)\n")
    print("| model | file MB | session create | first run | total (cold start) | steady run |")
    print("|---|---:|---:|---:|---:|---:|")
    f = lambda d: f"{d['median']:.1f} ({d['min']:.1f})"  # noqa: E731
    for r in results:
        steady = (f"{r['steady_median_ms']:.2f} ({r['steady_min_ms']:.2f})"
                  if "steady_median_ms" in r else "-")
        print(f"| {r['model']} | {r['file_bytes'] / 1e6:.2f} | {f(r['session_ms'])} | "
              f"{f(r['first_ms'])} | {f(r['total_ms'])} | {steady} |")

    if a.json:
        doc = {"onnxruntime": ort.__version__, "python": platform.python_version(),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "loadavg": os.getloadavg(), "threads": 1, "results": results}
        text = json.dumps(doc, indent=1) + "\n"
        if a.json == "-":
            sys.stdout.write(text)
        else:
            Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
