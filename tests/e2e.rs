//! End to end: the binaries the workspace builds, driven as a user drives them, on the bundled
//! model repository.
//!
//! The binaries come from the workspace's target directory; `cargo test --workspace` builds them
//! (the daemon crate's own integration tests need them).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{binary, digits_request, exchange, json_u64, python, repo, served_version, Daemon};

/// Every model of the repository, run by `tern run` on the held-out digits, agrees with the
/// onnxruntime outputs stored beside it.
#[test]
fn the_bundled_repository_runs_through_the_cli() {
    let out_root = std::env::temp_dir().join(format!("tern-e2e-{}", std::process::id()));
    let labels = |file: &str| {
        tern_core::npy::read_file(repo().join("models/testdata").join(file))
            .unwrap()
            .view()
            .to_vec::<i64>()
            .unwrap()
    };
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("models")).unwrap() {
        let dir = entry.unwrap().path();
        let model = dir.join("1/model.onnx");
        if !model.exists() {
            continue;
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        // (input, its test data, labels, classes): the digits family, or the activity model.
        let (input, x, y, classes) = if name == "activity" {
            ("window", "activity_windows.npy", "activity_labels.npy", 2)
        } else {
            ("input", "digits_test_x.npy", "digits_test_y.npy", 10)
        };
        let labels = labels(y);
        let out_dir = out_root.join(&name);
        let status = Command::new(binary("tern"))
            .args(["run", model.to_str().unwrap(), "--input"])
            .arg(format!(
                "{input}={}",
                repo().join("models/testdata").join(x).display()
            ))
            .arg("--output-dir")
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        // One output per model: logits, or probabilities for the Softmax-headed variant.
        let output = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "npy"))
            .unwrap();
        let got = tern_core::npy::read_file(output)
            .unwrap()
            .view()
            .to_vec::<f32>()
            .unwrap();
        let reference =
            tern_core::npy::read_file(repo().join(format!("models/testdata/{name}.ref.npy")))
                .unwrap()
                .view()
                .to_vec::<f32>()
                .unwrap();
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        let rows = labels.len();
        let agree = (0..rows)
            .filter(|&i| {
                argmax(&got[i * classes..][..classes])
                    == argmax(&reference[i * classes..][..classes])
            })
            .count();
        let correct = (0..rows)
            .filter(|&i| argmax(&got[i * classes..][..classes]) as i64 == labels[i])
            .count();
        assert!(
            agree * 100 >= rows * 99,
            "{name}: top-1 agreement {agree}/{rows}"
        );
        assert!(
            correct * 100 >= rows * 95,
            "{name}: accuracy {correct}/{rows}"
        );
        seen += 1;
    }
    assert!(seen >= 8, "expected the bundled models, found {seen}");
    std::fs::remove_dir_all(out_root).ok();
}

/// The first `"name": <integer>` in `tern bench --json` output.
/// The stock tritonclient against the real daemon: metadata, binary and JSON inference checked
/// against onnxruntime's outputs, the repository extension, a bad-input catalogue, and
/// /metrics through a Prometheus parser. Then SIGTERM stops it cleanly.
#[test]
fn stock_tritonclient_drives_ternd() {
    let python = python();
    let repo = repo().join("models");
    let d = Daemon::start(&[
        "--repository",
        repo.to_str().unwrap(),
        "--max-body-bytes",
        "1048576",
    ]);
    let out = Command::new(&python)
        .arg(repo.join("../tests/python/kserve_client.py"))
        .args([
            "--url",
            &d.addr,
            "--repo",
            repo.to_str().unwrap(),
            "--max-body-bytes",
            "1048576",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    let status = d.stop();
    assert!(status.success(), "ternd exited with {status} on SIGTERM");
}

#[test]
fn a_bearer_token_guards_everything_but_health() {
    let repo = repo().join("models");
    let d = Daemon::start(&[
        "--repository",
        repo.to_str().unwrap(),
        "--bearer-token",
        "s3cret",
    ]);
    assert_eq!(d.get("/v2/health/live").0, 200);
    let (status, body) = d.get("/v2/models/digits");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    assert_eq!(d.get("/metrics").0, 401);
    let request = digits_request(0, "k");
    let infer_with = |token: &str| {
        let auth = [("Authorization", format!("Bearer {token}"))];
        exchange(
            &d.addr,
            "POST",
            "/v2/models/digits/infer",
            &auth,
            request.as_bytes(),
            None,
        )
    };
    let (status, body) = infer_with("guess");
    assert_eq!(status, 401, "{body}");
    let (status, body) = infer_with("s3cret");
    assert_eq!(status, 200, "{body}");
    let auth = [("Authorization", "Bearer s3cret".to_string())];
    assert_eq!(
        exchange(&d.addr, "GET", "/metrics", &auth, b"", None).0,
        200
    );
}

#[test]
fn tern_bench_drives_ternd_over_http() {
    let repo = repo().join("models");
    let d = Daemon::start(&["--repository", repo.to_str().unwrap()]);
    let out = Command::new(binary("tern"))
        .args([
            "bench",
            "digits-int8-qdq",
            "--url",
            &format!("http://{}", d.addr),
        ])
        .args(["--clients", "4", "--duration", "0.5", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let ok = |field: &str| json_u64(&stdout, field);
    assert!(ok("ok") > 0, "{stdout}");
    assert_eq!(ok("failed"), 0, "{stdout}");
    assert_eq!(ok("ok"), ok("sent"), "{stdout}");
}

/// A new version dropped into the repository is loaded, warmed up and swapped in while load
/// runs, and not one request fails.
#[test]
fn a_new_version_hot_swaps_under_load_with_no_failed_request() {
    let root = std::env::temp_dir().join(format!("tern-e2e-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("digits/1")).unwrap();
    std::fs::copy(
        repo().join("models/digits/1/model.onnx"),
        root.join("digits/1/model.onnx"),
    )
    .unwrap();
    let d = Daemon::start(&[
        "--repository",
        root.to_str().unwrap(),
        "--poll-interval-ms",
        "100",
    ]);
    assert!(d.get("/v2/models/digits").1.contains(r#""versions":["1"]"#));
    let addr = d.addr.clone();
    let load = std::thread::spawn(move || {
        Command::new(binary("tern"))
            .args([
                "bench",
                "digits",
                "--url",
                &format!("http://{addr}"),
                "--clients",
                "4",
                "--duration",
                "3",
                "--json",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    // Versions are published atomically: written aside, then renamed into place.
    let staging = root.join(".staging-2");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(
        repo().join("models/digits-int8-qdq/1/model.onnx"),
        staging.join("model.onnx"),
    )
    .unwrap();
    std::fs::rename(&staging, root.join("digits/2")).unwrap();
    let out = load.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| json_u64(&report, name);
    assert!(field("ok") > 100, "{report}");
    assert_eq!(
        (field("failed"), field("rejected"), field("timed_out")),
        (0, 0, 0),
        "{report}"
    );
    assert_eq!(field("ok"), field("sent"), "{report}");
    let (_, meta) = d.get("/v2/models/digits");
    assert!(
        meta.contains(r#""versions":["2"]"#),
        "version 2 serves after the swap: {meta}"
    );
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

/// With a memory budget that holds two of three models, using the third evicts the least
/// recently used idle one, and a request to an evicted model reloads it.
#[test]
fn the_memory_budget_evicts_the_least_recently_used_model_and_reloads_on_demand() {
    let root = std::env::temp_dir().join(format!("tern-e2e-budget-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let file = repo().join("models/digits/1/model.onnx");
    let footprint = 2 * std::fs::metadata(&file).unwrap().len();
    for m in ["a", "b", "c"] {
        std::fs::create_dir_all(root.join(m).join("1")).unwrap();
        std::fs::copy(&file, root.join(m).join("1/model.onnx")).unwrap();
    }
    let budget = (2 * footprint + footprint / 2).to_string();
    let d = Daemon::start(&[
        "--repository",
        root.to_str().unwrap(),
        "--memory-budget",
        &budget,
    ]);
    let evicted = |d: &Daemon| -> Vec<String> {
        let (_, index) = d.post("/v2/repository/index", "");
        ["a", "b", "c"]
            .iter()
            .filter(|m| {
                index.contains(&format!(
                    r#""name":"{m}","version":"","state":"UNAVAILABLE","reason":"evicted"#
                ))
            })
            .map(|m| m.to_string())
            .collect()
    };
    // Loaded in order a, b, c: loading c evicted a, the least recently used.
    assert_eq!(evicted(&d), ["a"]);
    let zeros = vec!["0"; 64].join(",");
    let body = format!(
        r#"{{"inputs":[{{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":[{zeros}]}}]}}"#
    );
    let (status, reply) = d.post("/v2/models/b/infer", &body);
    assert_eq!(status, 200, "{reply}");
    // a comes back on demand; c is now the least recently used idle model.
    let (status, reply) = d.post("/v2/models/a/infer", &body);
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains(r#""model_name":"a""#), "{reply}");
    assert_eq!(evicted(&d), ["c"]);
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

/// A repository with model `cls`: version 1 = the digits FP32 model, version 2 = `candidate`
/// bytes, both served, with the given `[routing]` table.
fn canary_repo(tag: &str, candidate: &[u8], routing: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("tern-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for v in ["1", "2"] {
        std::fs::create_dir_all(root.join("cls").join(v)).unwrap();
    }
    std::fs::copy(
        repo().join("models/digits/1/model.onnx"),
        root.join("cls/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(root.join("cls/2/model.onnx"), candidate).unwrap();
    std::fs::write(
        root.join("cls/config.toml"),
        format!("[version_policy]\nall = true\n\n[routing]\n{routing}\n"),
    )
    .unwrap();
    root
}

/// A JSON request for held-out digit `row`, keyed for canary routing.

#[test]
fn a_healthy_canary_gets_its_sticky_share_of_traffic() {
    let candidate = std::fs::read(repo().join("models/digits-int8-qdq/1/model.onnx")).unwrap();
    let root = canary_repo(
        "canary-ok",
        &candidate,
        "stable = 1\ncandidate = 2\npercent = 30\nmax_error_rate = 0.5\nwindow = 20",
    );
    let d = Daemon::start(&["--repository", root.to_str().unwrap()]);
    let mut to_candidate = 0;
    for k in 0..200 {
        let key = format!("device-{k}");
        let (status, reply) = d.post("/v2/models/cls/infer", &digits_request(k, &key));
        assert_eq!(status, 200, "{reply}");
        let v = served_version(&reply);
        for _ in 0..2 {
            let (_, again) = d.post("/v2/models/cls/infer", &digits_request(k, &key));
            assert_eq!(
                served_version(&again),
                v,
                "key {key} must stay on version {v}"
            );
        }
        to_candidate += (v == "2") as usize;
    }
    assert!(
        (30..=90).contains(&to_candidate),
        "{to_candidate} of 200 keys on the 30% candidate"
    );
    let (_, stats) = d.get("/v2/models/cls/stats");
    assert!(stats.contains(r#""rolled_back":false"#), "{stats}");
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn a_failing_canary_is_rolled_back_and_no_request_fails() {
    // The candidate names its input `inpux`: it rejects every request the stable version serves.
    let mut candidate = std::fs::read(repo().join("models/digits/1/model.onnx")).unwrap();
    let mut at = 0;
    while let Some(p) = candidate[at..].windows(5).position(|w| w == b"input") {
        candidate[at + p + 4] = b'x';
        at += p + 5;
    }
    let root = canary_repo(
        "canary-bad",
        &candidate,
        "stable = 1\ncandidate = 2\npercent = 50\nmax_error_rate = 0.5\nwindow = 10",
    );
    let d = Daemon::start(&["--repository", root.to_str().unwrap()]);
    for k in 0..200 {
        let (status, reply) = d.post(
            "/v2/models/cls/infer",
            &digits_request(k, &format!("device-{k}")),
        );
        assert_eq!(status, 200, "request {k}: {reply}");
        assert_eq!(served_version(&reply), "1");
    }
    let (_, stats) = d.get("/v2/models/cls/stats");
    assert!(stats.contains(r#""rolled_back":true"#), "{stats}");
    assert!(
        stats.contains(r#""to_candidate":10"#),
        "exactly one window of candidate traffic: {stats}"
    );
    let (_, metrics) = d.get("/metrics");
    assert!(
        metrics.contains(r#"tern_routing_rolled_back{model="cls",candidate="2"} 1"#),
        "{metrics}"
    );
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn shadow_mode_answers_from_stable_and_compares_the_candidate() {
    let candidate = std::fs::read(repo().join("models/digits-int8-qdq/1/model.onnx")).unwrap();
    let root = canary_repo(
        "shadow",
        &candidate,
        "stable = 1\ncandidate = 2\nshadow = true",
    );
    let d = Daemon::start(&["--repository", root.to_str().unwrap()]);
    for k in 0..50 {
        let (status, reply) = d.post("/v2/models/cls/infer", &digits_request(k, &k.to_string()));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(served_version(&reply), "1");
    }
    // Shadow runs finish after their responses: wait for all 50 comparisons.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, stats) = d.get("/v2/models/cls/stats");
        if stats.contains(r#""shadow_compared":50"#) {
            assert!(
                stats.contains(r#""shadow_top1_agree":50"#),
                "int8 and fp32 agree on these digits: {stats}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stats}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

/// A pipeline whose step names a model that is not there fails with the step named, and the
/// daemon keeps serving.
#[test]
fn a_failing_pipeline_step_is_named_in_the_error() {
    let root = std::env::temp_dir().join(format!("tern-e2e-pipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("digits/1")).unwrap();
    std::fs::copy(
        repo().join("models/digits/1/model.onnx"),
        root.join("digits/1/model.onnx"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("chain")).unwrap();
    std::fs::write(
        root.join("chain/config.toml"),
        r#"[pipeline]
inputs = ["image"]
outputs = ["out"]

[[pipeline.steps]]
name = "classify"
model = "digits"
inputs = { input = "image" }
outputs = { logits = "scores" }

[[pipeline.steps]]
name = "post"
model = "calibrator"
inputs = { x = "scores" }
outputs = { y = "out" }
"#,
    )
    .unwrap();
    let d = Daemon::start(&["--repository", root.to_str().unwrap()]);
    let body = digits_request(0, "k").replace(r#""name":"input""#, r#""name":"image""#);
    let (status, reply) = d.post("/v2/models/chain/infer", &body);
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply.contains("pipeline step `post` (model `calibrator`): unknown model `calibrator`"),
        "{reply}"
    );
    let (status, _) = d.post("/v2/models/digits/infer", &digits_request(0, "k"));
    assert_eq!(status, 200);
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

/// Configured warm-up samples run before a version is ready; a version they break never serves.
#[test]
fn warm_up_samples_gate_readiness() {
    let root = std::env::temp_dir().join(format!("tern-e2e-warm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (m, shape) in [("good", vec![2usize, 1, 8, 8]), ("bad", vec![2usize, 64])] {
        std::fs::create_dir_all(root.join(m).join("1")).unwrap();
        std::fs::copy(
            repo().join("models/digits/1/model.onnx"),
            root.join(m).join("1/model.onnx"),
        )
        .unwrap();
        let n: usize = shape.iter().product();
        let t = tern_core::Tensor::from_vec(shape, vec![0.5f32; n]).unwrap();
        tern_core::npy::write(
            std::fs::File::create(root.join(m).join("sample.npy")).unwrap(),
            &t,
        )
        .unwrap();
        std::fs::write(
            root.join(m).join("config.toml"),
            "warmup_inputs = [\"sample.npy\"]\n",
        )
        .unwrap();
    }
    let d = Daemon::start(&["--repository", root.to_str().unwrap()]);
    assert_eq!(d.get("/v2/models/good/ready").0, 200);
    assert_eq!(d.get("/v2/models/bad/ready").0, 503);
    let (_, index) = d.post("/v2/repository/index", "");
    assert!(
        index.contains("warm-up failed")
            && index.contains("expected shape [N,1,8,8] f32, got [2,64] f32"),
        "{index}"
    );
    drop(d);
    std::fs::remove_dir_all(root).ok();
}

/// A restarted daemon reuses the plan decision its first start measured (`fastest` times both
/// plans once), and serves the same answers.
#[test]
fn plan_decisions_survive_a_restart() {
    let root = std::env::temp_dir().join(format!("tern-e2e-decisions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cache = root.join("cache");
    std::fs::create_dir_all(root.join("repo/cls/1")).unwrap();
    std::fs::copy(
        repo().join("models/digits/1/model.onnx"),
        root.join("repo/cls/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        root.join("repo/cls/config.toml"),
        format!(
            "plans = \"fastest\"\ncache_dir = {:?}\n",
            cache.to_str().unwrap()
        ),
    )
    .unwrap();
    let entries = || -> Vec<PathBuf> {
        std::fs::read_dir(&cache)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let repository = root.join("repo");
    let args = ["--repository", repository.to_str().unwrap()];
    let d = Daemon::start(&args);
    let (status, first) = d.post("/v2/models/cls/infer", &digits_request(3, "a"));
    assert_eq!(status, 200, "{first}");
    d.stop();
    let kept = entries();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let decision = std::fs::read_to_string(&kept[0]).unwrap();
    assert!(decision.starts_with("tern-plan-decision 1\n"), "{decision}");
    let stamp = |p: &PathBuf| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.modified().unwrap())
    };
    let written = stamp(&kept[0]);

    let d = Daemon::start(&args);
    let (status, second) = d.post("/v2/models/cls/infer", &digits_request(3, "a"));
    assert_eq!(status, 200, "{second}");
    d.stop();
    // Read, not decided again: a rewrite would rename a new file over the entry.
    assert_eq!(entries(), kept);
    assert_eq!(stamp(&kept[0]), written);
    assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), decision);
    let outputs = |r: &str| r[r.find("\"outputs\"").unwrap()..].to_string();
    assert_eq!(outputs(&first), outputs(&second));
    std::fs::remove_dir_all(root).ok();
}
