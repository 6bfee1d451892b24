//! Overload: an open-loop load at ten times the measured capacity of a real `ternd`, for 30 s,
//! from the `tern bench` load generator over HTTP. What must hold: excess requests are refused
//! at once with 503 and a reason, the daemon's memory stays bounded (the queue cap holds), and
//! the requests it accepts keep a bounded latency (they wait behind at most a queue's worth).
//!
//! Its own test binary: test binaries run one after another, so nothing else shares the cores
//! while it saturates them. Figures are printed (`--nocapture`) and recorded in RELIABILITY.md.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{binary, exchange, generate_model, Daemon};

const QUEUE: usize = 32;
const OVERLOAD: f64 = 10.0;
const SECONDS: f64 = 30.0;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `tern bench MODEL --url … --json ARGS`: the load generator's report.
fn bench(addr: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(binary("tern"))
        .args([
            "bench",
            "heavy",
            "--url",
            &format!("http://{addr}"),
            "--json",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["report"].clone()
}

/// A model that costs milliseconds per request (a 64 MiB dense layer), unbatched, so that
/// capacity is set by compute, not by HTTP, and ten times it is a load one machine can send.
fn heavy_repository(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("repo");
    std::fs::create_dir_all(root.join("heavy/1")).unwrap();
    let model = generate_model(dir, 64, "3");
    std::fs::copy(model, root.join("heavy/1/model.onnx")).unwrap();
    std::fs::write(
        root.join("heavy/config.toml"),
        format!("[batching]\nmax_batch_size = 1\nmax_queue_size = {QUEUE}\n"),
    )
    .unwrap();
    root
}

#[test]
fn ten_times_capacity_is_refused_with_503_while_memory_and_accepted_latency_stay_bounded() {
    let dir = std::env::temp_dir().join(format!("tern-overload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = heavy_repository(&dir);
    let d = Daemon::start(&["--repository", root.to_str().unwrap()]);
    let pid = d.child.id();

    let closed = bench(&d.addr, &["--clients", "4", "--duration", "3"]);
    let capacity = closed["throughput_per_s"].as_f64().unwrap();
    assert!(capacity > 0.0, "{closed}");
    let rss_before = rss_kib(pid);

    // While the load runs: the daemon's peak RSS, and the reply a refused client reads.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let prober = {
        let (done, addr) = (done.clone(), d.addr.clone());
        std::thread::spawn(move || {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1,256],"datatype":"FP32","data":[{}]}}]}}"#,
                vec!["0.5"; 256].join(",")
            );
            let mut refused = None;
            while !done.load(Ordering::Relaxed) && refused.is_none() {
                let (status, reply) = exchange(
                    &addr,
                    "POST",
                    "/v2/models/heavy/infer",
                    &[],
                    body.as_bytes(),
                    None,
                );
                if status == 503 {
                    refused = Some(reply);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            refused
        })
    };
    let rate = (capacity * OVERLOAD).round();
    let open = bench(
        &d.addr,
        &[
            "--rate",
            &rate.to_string(),
            "--duration",
            &SECONDS.to_string(),
            "--concurrency",
            "256",
        ],
    );
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let refused = prober.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);

    let count = |k: &str| {
        open[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {open}"))
    };
    let (sent, ok, rejected, failed) = (
        count("sent"),
        count("ok"),
        count("rejected"),
        count("failed"),
    );
    let p99_ms = open["latency_us"]["p99_us"].as_f64().unwrap_or(f64::MAX) / 1000.0;
    // An accepted request waits behind at most the queue: QUEUE + 1 services at capacity, with
    // a wide margin for a 2-core machine that also runs the generator. Unbounded queueing at
    // 10× would reach tens of seconds.
    let bound_ms = 10.0 * (QUEUE as f64 + 1.0) / capacity * 1000.0 + 500.0;
    println!(
        "capacity {capacity:.0} req/s (closed loop, 4 clients); open loop {rate} req/s for {SECONDS} s: \
         sent {sent}, ok {ok}, rejected (503) {rejected}, failed {failed}; accepted p99 {p99_ms:.1} ms \
         (bound {bound_ms:.0} ms); RSS {} MiB before, {} MiB peak",
        rss_before / 1024,
        peak / 1024
    );

    assert!(
        rejected > 0,
        "no request was refused: not overloaded? {open}"
    );
    assert!(ok > 0, "nothing was served: {open}");
    assert_eq!(failed, 0, "requests failed other than by refusal: {open}");
    let reply = refused.expect("a client saw no 503 during the overload");
    assert!(
        reply.contains(&format!(
            "overloaded: the queue already holds {QUEUE} requests"
        )),
        "{reply}"
    );
    let metrics = d.get("/metrics").1;
    let counted: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tern_request_failure_total{") && l.contains("reason=\"overloaded\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    assert!(counted >= rejected, "{counted} counted, {rejected} refused");
    assert!(
        p99_ms <= bound_ms,
        "accepted p99 {p99_ms:.1} ms > {bound_ms:.0} ms"
    );
    // The queue cap bounds what requests can hold; 64 MiB covers connections and allocator slack.
    assert!(
        peak <= rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {peak} KiB"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
