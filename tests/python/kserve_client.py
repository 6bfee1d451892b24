"""Drives a running ternd as a user would: the stock tritonclient, raw HTTP for malformed
requests, and a Prometheus parser for /metrics. Exits non-zero on the first failed check.

    python kserve_client.py --url 127.0.0.1:8000 --repo models --max-body-bytes 1048576
"""
import argparse
import json
import sys
import urllib.error
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from prometheus_client.openmetrics.parser import text_string_to_metric_families

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--repo", required=True)
p.add_argument("--max-body-bytes", type=int, required=True)
args = p.parse_args()
base = f"http://{args.url}"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


client = httpclient.InferenceServerClient(url=args.url)
check(client.is_server_live(), "server live")
check(client.is_server_ready(), "server ready")
check(client.is_model_ready("digits"), "digits ready")
meta = client.get_model_metadata("digits")
check(meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}, f"metadata {meta}")
check(meta["outputs"][0]["name"] == "logits", "metadata outputs")

x_all = np.load(f"{args.repo}/testdata/digits_test_x.npy")
x = x_all[:8]  # the default max_batch_size (Triton rejects larger requests too)
for model, tol in [("digits", 1e-4), ("digits-int8-qdq", 0.25), ("resblock-int8-qop", 0.25)]:
    ref = np.load(f"{args.repo}/testdata/{model}.ref.npy")[:8]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary by default, and no Content-Type
    r = client.infer(model, [inp], request_id="req-1")
    got = r.as_numpy("logits")
    check(got.shape == (8, 10) and np.abs(got - ref).max() <= tol, f"{model}: binary infer matches onnxruntime")
    check(r.get_response()["model_version"] == "1" and r.get_response()["id"] == "req-1", f"{model}: id and version echoed")
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = httpclient.InferRequestedOutput("logits", binary_data=False)
    r = client.infer(model, [inp], outputs=[out], model_version="1")
    check(np.abs(r.as_numpy("logits") - ref).max() <= tol, f"{model}: JSON infer matches onnxruntime")

meta = client.get_model_metadata("digits-ensemble")
check(meta["platform"] == "ensemble" and meta["inputs"][0]["name"] == "image", f"pipeline metadata {meta}")
inp = httpclient.InferInput("image", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
r = client.infer("digits-ensemble", [inp])
for out, model, tol in [("logits_fp32", "digits", 1e-4), ("logits_int8", "digits-int8-qdq", 0.25)]:
    ref = np.load(f"{args.repo}/testdata/{model}.ref.npy")[:8]
    check(np.abs(r.as_numpy(out) - ref).max() <= tol, f"pipeline output {out} matches {model}")

index = client.get_model_repository_index()
check({m["name"] for m in index} >= {"digits", "resblock", "digits-int8-qdq"}, "repository index lists the models")
client.unload_model("resblock")
check(not client.is_model_ready("resblock"), "unloaded model is not ready")
client.load_model("resblock")
check(client.is_model_ready("resblock"), "reloaded model is ready")


def post(path, body, headers=None):
    req = urllib.request.Request(base + path, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def infer_json(inputs):
    return json.dumps({"inputs": inputs}).encode()


good = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
cases = [
    ("malformed JSON", "/v2/models/digits/infer", b"{not json", {}, 400, "malformed JSON"),
    ("wrong dtype", "/v2/models/digits/infer", infer_json([dict(good, datatype="INT64", data=[0] * 64)]), {}, 400,
     "expected shape [N,1,8,8] f32, got [1,1,8,8] i64"),
    ("wrong shape", "/v2/models/digits/infer", infer_json([dict(good, shape=[1, 64])]), {}, 400,
     "expected shape [N,1,8,8] f32, got [1,64] f32"),
    ("too few values", "/v2/models/digits/infer", infer_json([dict(good, data=[0.0] * 10)]), {}, 400, "needs 64 values, got 10"),
    ("unknown input", "/v2/models/digits/infer", infer_json([dict(good, name="pixels")]), {}, 400, "unknown input `pixels`"),
    ("binary size mismatch", "/v2/models/digits/infer",
     json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                             "parameters": {"binary_data_size": 100}}]}).encode() + b"\0" * 100,
     "header", 400, "needs 256"),
    ("header length past the body", "/v2/models/digits/infer", b"{}", {"Inference-Header-Content-Length": "4096"}, 400,
     "Inference-Header-Content-Length is 4096"),
    ("unknown model", "/v2/models/nope/infer", infer_json([good]), {}, 404, "unknown model `nope`"),
    ("unknown version", "/v2/models/digits/versions/7/infer", infer_json([good]), {}, 404, "has no version 7"),
    ("oversize body", "/v2/models/digits/infer", b"x" * (args.max_body_bytes + 1), {}, 413, "exceeds"),
    ("path traversal in load", "/v2/repository/models/..%2F..%2Fetc/load", b"", {}, 400, "invalid model name"),
    ("dot-dot model name", "/v2/repository/models/../load", b"", {}, None, None),
]
for what, path, body, headers, status, message in cases:
    if headers == "header":
        headers = {"Inference-Header-Content-Length": str(body.index(b"\0"))}
    code, reply = post(path, body, headers)
    if status is None:
        check(code in (400, 404), f"{what}: refused ({code})")
        continue
    err = json.loads(reply).get("error", "") if reply.startswith(b"{") else reply.decode(errors="replace")
    check(code == status and message in err, f"{what}: {code} {err!r}")
    check(client.is_server_live(), f"{what}: still serving")

inp = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
inp.set_data_from_numpy(x[:1])
check(client.infer("digits", [inp]).as_numpy("logits").shape == (1, 10), "infers after the bad-input catalogue")

with urllib.request.urlopen(base + "/metrics") as resp:
    families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
check("tern_request_success" in families, f"metrics families: {sorted(families)}")
success = [s for s in families["tern_request_success"].samples if s.labels.get("model") == "digits"]
check(success and success[0].value >= 2, "success counter counts digits requests")
failure = [s for s in families["tern_request_failure"].samples if s.labels.get("model") == "digits" and s.labels["reason"] == "invalid_input"]
check(failure and failure[0].value >= 2, "failures are counted by reason")
for h in ["tern_request_duration_seconds", "tern_queue_duration_seconds", "tern_compute_duration_seconds", "tern_batch_size"]:
    check(families[h].type == "histogram", f"{h} is a histogram")
check(families["process_resident_memory_bytes"].samples[0].value > 0, "RSS is reported")
check("tern_model_load_seconds" in families, "model load time is reported")
print("all checks passed")
