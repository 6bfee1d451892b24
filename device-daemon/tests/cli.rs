//! The `tern` binary as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tern(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn inspect_reports_the_qdq_digits_layers_as_int8() {
    let (ok, stdout, stderr) = tern(&["inspect", "models/digits-int8-qdq/1/model.onnx", "--json"]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let heavy = doc["heavy_ops"].as_array().unwrap();
    let names: Vec<_> = heavy.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2"]);
    for h in heavy {
        assert_eq!(h["precision"], "int8", "{h}");
    }
    assert_eq!(doc["inputs"][0]["shape"], serde_json::json!(["N", 1, 8, 8]));
    assert_eq!(doc["op_histogram"]["Conv"], 2);

    let (ok, stdout, _) = tern(&[
        "inspect",
        "models/digits-int8-qdq/1/model.onnx",
        "--no-int8-fusion",
    ]);
    assert!(ok);
    assert!(stdout.contains("0 int8, 4 f32"), "{stdout}");
}

#[test]
fn run_writes_one_npy_per_output_matching_onnxruntime() {
    let dir = std::env::temp_dir().join(format!("tern-cli-run-{}", std::process::id()));
    let (ok, stdout, stderr) = tern(&[
        "run",
        "models/digits/1/model.onnx",
        "--input",
        "input=models/testdata/digits_test_x.npy",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("logits: [450, 10] f32"), "{stdout}");
    let got = tern_core::npy::read_file(dir.join("logits.npy"))
        .unwrap()
        .view()
        .to_vec::<f32>()
        .unwrap();
    let want = tern_core::npy::read_file(repo().join("models/testdata/digits.ref.npy"))
        .unwrap()
        .view()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "max abs diff {max}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn run_names_what_is_wrong_with_its_inputs() {
    let (ok, _, stderr) = tern(&[
        "run",
        "models/digits/1/model.onnx",
        "--input",
        "pixels=models/testdata/digits_test_x.npy",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown input `pixels`; the model's inputs are `input`"),
        "{stderr}"
    );

    let (ok, _, stderr) = tern(&[
        "run",
        "models/digits/1/model.onnx",
        "--input",
        "models/testdata/digits_test_y.npy",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("expected shape [N,1,8,8] f32, got [450] i64"),
        "{stderr}"
    );

    let (ok, _, stderr) = tern(&[
        "run",
        "models/digits/1/model.onnx",
        "--input",
        "models/README.md",
    ]);
    assert!(!ok);
    assert!(stderr.contains("not a valid .npy file"), "{stderr}");

    let (ok, _, stderr) = tern(&["inspect", "models/README.md"]);
    assert!(!ok);
    assert!(stderr.contains("not a valid ONNX model"), "{stderr}");
}

#[test]
fn bench_reports_percentiles_as_json() {
    let (ok, stdout, stderr) = tern(&[
        "bench",
        "models/resblock-int8-qdq/1/model.onnx",
        "--batch",
        "4",
        "--iters",
        "20",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let lat = &doc["latency_us"];
    assert_eq!(lat["count"], 20);
    let (p50, p90, p99) = (
        lat["p50_us"].as_f64().unwrap(),
        lat["p90_us"].as_f64().unwrap(),
        lat["p99_us"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{lat}");
    assert!(doc["throughput_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_drives_the_batcher_closed_and_open_loop() {
    let (ok, stdout, stderr) = tern(&[
        "bench",
        "models/digits/1/model.onnx",
        "--clients",
        "8",
        "--duration",
        "0.5",
        "--max-batch",
        "4",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let report = &doc["report"];
    assert!(report["ok"].as_u64().unwrap() > 0);
    assert_eq!(report["ok"], report["sent"]);
    let mean = doc["mean_batch_size"].as_f64().unwrap();
    assert!(mean > 1.0 && mean <= 4.0, "mean batch {mean}");

    let (ok, stdout, stderr) = tern(&[
        "bench",
        "models/digits/1/model.onnx",
        "--rate",
        "200",
        "--duration",
        "0.5",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(doc["report"]["latency_us"]["p99_us"].as_f64().unwrap() > 0.0);
}

#[test]
fn ternd_refuses_to_join_a_fleet_without_a_trusted_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_ternd"))
        .args(["--repository", repo().join("models").to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--mqtt", "mqtt://127.0.0.1:1"])
        .args(["--fleet", "f", "--device-id", "d"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signed manifests are required"), "{err}");
}

#[test]
fn keygen_then_a_bad_key_file_gives_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tern-cli-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k.key");
    let (ok, out, _) = tern(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(dir.join("k.pub").is_file());
    // A second keygen never overwrites a key.
    let (ok, _, err) = tern(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!ok, "{err}");
    // A public key is not a signing key.
    let (ok, _, err) = tern(&[
        "push",
        repo().join("models/digits/1/model.onnx").to_str().unwrap(),
        "--model",
        "digits",
        "--version",
        "2",
        "--key",
        dir.join("k.pub").to_str().unwrap(),
        "--fleet",
        "f",
        "--mqtt",
        "mqtt://127.0.0.1:1",
    ]);
    assert!(!ok);
    assert!(err.contains("tern-ed25519-secret-v1"), "{err}");
}

/// `--device cuda` runs on the GPU in a build with the `cuda` feature (on the CPU, saying why,
/// when there is no usable GPU) and is refused with the fix in a build without it.
#[test]
fn device_cuda_uses_the_gpu_falls_back_with_a_reason_or_is_refused() {
    let (ok, stdout, stderr) = tern(&["inspect", "models/digits/1/model.onnx", "--device", "cuda"]);
    if cfg!(feature = "cuda") {
        assert!(ok, "{stderr}");
        let fell_back = stdout.contains("device: cpu (CUDA was asked for but is unavailable");
        assert!(fell_back || stdout.contains("device: cuda"), "{stdout}");
    } else {
        assert!(!ok, "{stdout}");
        assert!(stderr.contains("--features cuda"), "{stderr}");
    }
}
