"""The generated Python bindings against the real library: accuracy, errors, threads, store.

Run by bindings/test.sh, which generates the module and sets:
  TERN_BINDINGS  folder holding tern.py and libtern_ffi.so
  TERN_CLI       the `tern` binary (keygen and sign, as a fleet manager would)
"""

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.environ["TERN_BINDINGS"])
import tern  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODELS = ROOT / "models"
X = np.load(MODELS / "testdata" / "digits_test_x.npy")
Y = np.load(MODELS / "testdata" / "digits_test_y.npy")


def model(variant):
    return str(MODELS / variant / "1" / "model.onnx")


def tensor(name, array):
    array = np.ascontiguousarray(array)
    dtype = {np.float32: tern.DataType.F32, np.int64: tern.DataType.I64}[array.dtype.type]
    return tern.Tensor(name=name, dtype=dtype, shape=list(array.shape), data=array.tobytes())


def logits(t):
    assert t.dtype == tern.DataType.F32
    return np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)


@pytest.mark.parametrize(
    "variant,int8", [("digits", False), ("digits-int8-qdq", True), ("digits-int8-qop", True)]
)
def test_digits_accuracy_matches_the_stored_labels(variant, int8):
    engine = tern.Engine.from_path(model(variant), tern.ModelOptions())
    name = engine.inputs()[0].name
    # The whole held-out split as one batch, then row by row: same answers.
    (out,) = engine.infer([tensor(name, X)])
    batch = logits(out)
    assert batch.shape == (len(Y), 10)
    accuracy = float((batch.argmax(axis=1) == Y).mean())
    assert accuracy > 0.985, accuracy
    for i in range(0, len(Y), 45):
        (row,) = engine.infer([tensor(name, X[i : i + 1])])
        np.testing.assert_allclose(logits(row)[0], batch[i], rtol=1e-4, atol=1e-4)
    counts = engine.kernel_counts()
    assert (counts.int8 > 0) == int8, counts


def test_metadata_and_options():
    engine = tern.Engine.from_path(model("digits"), tern.ModelOptions(num_threads=2, max_batch=16))
    (inp,) = engine.inputs()
    assert inp.dtype == tern.DataType.F32
    assert inp.shape == [-1, 1, 8, 8]
    assert inp.batch_axis == 0
    assert engine.max_batch() == 16
    with pytest.raises(tern.TernError.InvalidInput, match="exceeds"):
        engine.infer([tensor(inp.name, X[:17])])
    assert tern.version()


def test_plan_decisions_are_kept_for_the_next_launch(tmp_path):
    cache = tmp_path / "tern-cache"
    options = tern.ModelOptions(cache_dir=str(cache))
    first = tern.Engine.from_path(model("digits"), options)
    (entry,) = cache.iterdir()
    kept = entry.read_text()
    assert kept.startswith("tern-plan-decision 1\n"), kept
    stamp = (entry.stat().st_ino, entry.stat().st_mtime_ns)
    second = tern.Engine.from_path(model("digits"), options)
    # Read, not decided and written again (a rewrite renames a new file over it).
    assert list(cache.iterdir()) == [entry]
    assert (entry.stat().st_ino, entry.stat().st_mtime_ns) == stamp
    name = first.inputs()[0].name
    (a,) = first.infer([tensor(name, X[:8])])
    (b,) = second.infer([tensor(name, X[:8])])
    np.testing.assert_array_equal(logits(a), logits(b))


def test_wrong_shapes_dtypes_and_names_are_clear_errors():
    engine = tern.Engine.from_path(model("digits"), tern.ModelOptions())
    name = engine.inputs()[0].name
    with pytest.raises(tern.TernError.InvalidInput, match="shape|rank"):
        engine.infer([tensor(name, X[:1].reshape(1, 64))])
    with pytest.raises(tern.TernError.InvalidInput, match="i64"):
        engine.infer([tensor(name, X[:1].astype(np.int64))])
    with pytest.raises(tern.TernError.InvalidInput, match="unknown input `pixels`"):
        engine.infer([tensor("pixels", X[:1])])
    short = tern.Tensor(name=name, dtype=tern.DataType.F32, shape=[1, 1, 8, 8], data=b"\0" * 10)
    with pytest.raises(tern.TernError.InvalidInput, match="needs 256 bytes, got 10"):
        engine.infer([short])
    # The engine still answers afterwards.
    assert len(engine.infer([tensor(name, X[:1])])) == 1


def test_corrupt_models_are_refused():
    with pytest.raises(tern.TernError.InvalidModel):
        tern.Engine.from_bytes(b"definitely not onnx", tern.ModelOptions())
    data = pathlib.Path(model("digits")).read_bytes()
    with pytest.raises(tern.TernError.InvalidModel):
        tern.Engine.from_bytes(data[: len(data) // 2], tern.ModelOptions())
    with pytest.raises(tern.TernError.InvalidModel, match="nonexistent"):
        tern.Engine.from_path("/nonexistent.onnx", tern.ModelOptions())


def test_threads_share_the_batched_handle():
    engine = tern.Engine.from_path(model("digits-int8-qdq"), tern.ModelOptions())
    name = engine.inputs()[0].name
    (out,) = engine.infer([tensor(name, X[:96])])
    expected = logits(out)
    batched = engine.batched(tern.BatchOptions(max_batch_size=8, max_queue_delay_us=5000))
    errors = []

    def client(k):
        try:
            for i in range(k, 96, 12):
                (row,) = batched.infer([tensor(name, X[i : i + 1])])
                np.testing.assert_allclose(logits(row)[0], expected[i], rtol=1e-4, atol=1e-4)
        except Exception as e:  # surfaced below, with the thread's own traceback text
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = batched.stats()
    assert stats.completed == 96 and stats.failed == 0, stats
    assert stats.batches < 96 and stats.mean_batch_size > 1.0, stats
    batched.shutdown()
    with pytest.raises(tern.TernError.Closed):
        batched.infer([tensor(name, X[:1])])


@pytest.fixture()
def signer(tmp_path):
    key = tmp_path / "fleet.key"
    subprocess.run([os.environ["TERN_CLI"], "keygen", "--out", str(key)], check=True)

    def sign(variant, name, version, selftest=False):
        out = tmp_path / f"{name}-{version}"
        cmd = [os.environ["TERN_CLI"], "sign", model(variant), "--model", name,
               "--version", str(version), "--key", str(key), "--out-dir", str(out)]
        if selftest:
            np.save(tmp_path / "st.npy", X[:4])
            cmd += ["--selftest-input", str(tmp_path / "st.npy")]
        subprocess.run(cmd, check=True, capture_output=True)
        st = out / "selftest.tern"
        return (out / "manifest.tern").read_bytes(), st.read_bytes() if st.exists() else None

    return key.with_suffix(".pub").read_text(), sign


def test_the_store_installs_signed_models_and_rolls_back(tmp_path, signer):
    public, sign = signer
    store = tern.ModelStore(str(tmp_path / "store"), [public], 3)
    m1, _ = sign("digits", "digits", 1)
    v1 = store.install_file(model("digits"), m1, None)
    assert (v1.version, v1.active) == (1, True)
    m2, st2 = sign("digits-int8-qdq", "digits", 2, selftest=True)
    with pytest.raises(tern.TernError.Rejected, match="self-test"):
        store.install_file(model("digits-int8-qdq"), m2, None)
    v2 = store.install_file(model("digits-int8-qdq"), m2, st2)
    assert v2.active
    engine = store.open("digits", tern.ModelOptions())
    assert engine.kernel_counts().int8 > 0
    (out,) = engine.infer([tensor(engine.inputs()[0].name, X)])
    assert float((logits(out).argmax(axis=1) == Y).mean()) > 0.985

    assert store.rollback("digits") == 1
    assert store.active_version("digits") == 1
    assert [(v.version, v.retired) for v in store.versions("digits")] == [(1, False), (2, True)]
    store.activate("digits", 2)
    assert store.active_version("digits") == 2


def test_the_store_refuses_unsigned_and_tampered_models(tmp_path, signer):
    public, sign = signer
    store = tern.ModelStore(str(tmp_path / "store"), [public], 3)
    manifest, _ = sign("digits", "digits", 1)
    # A manifest signed by another key.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    subprocess.run([os.environ["TERN_CLI"], "keygen", "--out", str(other_dir / "k")],
                   check=True)
    stranger = tern.ModelStore(str(tmp_path / "s2"), [(other_dir / "k.pub").read_text()], 3)
    with pytest.raises(tern.TernError.Rejected, match="does not trust"):
        stranger.install_file(model("digits"), manifest, None)
    # The right manifest, the wrong bytes.
    data = bytearray(pathlib.Path(model("digits")).read_bytes())
    data[500] ^= 1
    with pytest.raises(tern.TernError.Rejected, match="sha256"):
        store.install_bytes(bytes(data), manifest, None)
    with pytest.raises(tern.TernError.Rejected):
        store.install_bytes(bytes(data[:-10]), manifest, None)
    with pytest.raises(tern.TernError.Rejected, match="manifest"):
        store.install_bytes(bytes(data), b"\x00" * 40, None)
    assert store.models() == []
    with pytest.raises(tern.TernError.NotFound):
        store.open("digits", tern.ModelOptions())
