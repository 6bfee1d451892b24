//! Fleet updates end to end: the real `tern` CLI pushes to a real broker (an in-process
//! rumqttd, and Mosquitto on 127.0.0.1:1883), real `ternd` processes download, verify, install
//! and serve over HTTP. Failures are injected where a user would meet them: a connection cut
//! mid-transfer, `kill -9`, a corrupted chunk, a forged or foreign signature, a downgrade, a
//! model that fails its self-test, a canary that trips.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{binary, digits_request, generate_model, repo, served_version, Daemon};
use rumqttc::v5::mqttbytes::QoS;

/// One in-process broker for this test binary (rumqttd cannot be stopped or restarted).
fn rumqttd() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conn = rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 2 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let server = rumqttd::ServerSettings {
            name: "v5".into(),
            listen: ([127, 0, 0, 1], port).into(),
            tls: None,
            next_connection_delay_ms: 0,
            connections: conn,
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 1000,
                max_segment_size: 64 << 20,
                max_segment_count: 4,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v5: Some([("v5".to_string(), server)].into_iter().collect()),
            ..Default::default()
        };
        std::thread::spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        });
        wait_until(Duration::from_secs(10), "rumqttd listening", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        format!("mqtt://127.0.0.1:{port}")
    })
    .clone()
}

/// Mosquitto as installed on these machines (and by `.ci/run`).
fn mosquitto() -> String {
    assert!(
        TcpStream::connect("127.0.0.1:1883").is_ok(),
        "Mosquitto is not listening on 127.0.0.1:1883 (.ci/run installs and starts it)"
    );
    "mqtt://127.0.0.1:1883".into()
}

fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A scratch directory per test: keys, repositories, logs.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-fleet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(binary("tern")).args(args).output().unwrap()
}

fn tern_ok(args: &[&str]) -> String {
    let out = tern(args);
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keygen(dir: &Path, name: &str) -> (String, String) {
    let key = dir.join(format!("{name}.key"));
    tern_ok(&["keygen", "--out", key.to_str().unwrap()]);
    let public = dir.join(format!("{name}.pub"));
    (key.display().to_string(), public.display().to_string())
}

/// A device repository holding digits version 1, as shipped.
fn device_repo(dir: &Path, device: &str) -> PathBuf {
    let root = dir.join(device);
    std::fs::create_dir_all(root.join("digits/1")).unwrap();
    std::fs::copy(
        repo().join("models/digits/1/model.onnx"),
        root.join("digits/1/model.onnx"),
    )
    .unwrap();
    root
}

fn model(name: &str) -> String {
    repo()
        .join(format!("models/{name}/1/model.onnx"))
        .display()
        .to_string()
}

struct Fleet {
    dir: PathBuf,
    name: String,
    url: String,
    key: String,
    public: String,
    /// Extra broker arguments of the manager's CLI (TLS identity).
    broker_args: Vec<String>,
}

impl Fleet {
    fn new(tag: &str, url: String) -> Fleet {
        let dir = scratch(tag);
        let (key, public) = keygen(&dir, "fleet");
        Fleet {
            dir,
            name: format!("{tag}-{}", std::process::id()),
            url,
            key,
            public,
            broker_args: vec![],
        }
    }

    fn device(&self, id: &str, extra: &[&str]) -> Daemon {
        let root = self.dir.join(id);
        if !root.exists() {
            device_repo(&self.dir, id);
        }
        let mut args = vec![
            "--repository",
            root.to_str().unwrap(),
            "--mqtt",
            &self.url,
            "--fleet",
            &self.name,
            "--device-id",
            id,
            "--trust-key",
            &self.public,
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }

    /// `tern ARGS --fleet F --mqtt URL`, which must succeed.
    fn cli(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--fleet", &self.name, "--mqtt", &self.url]);
        all.extend(self.broker_args.iter().map(String::as_str));
        tern_ok(&all)
    }

    fn push(&self, file: &str, version: u32, extra: &[&str]) -> String {
        self.push_as("digits", file, version, extra)
    }

    fn push_as(&self, name: &str, file: &str, version: u32, extra: &[&str]) -> String {
        let v = version.to_string();
        let mut args = vec![
            "push",
            file,
            "--model",
            name,
            "--version",
            &v,
            "--key",
            &self.key,
            "--json",
        ];
        args.extend_from_slice(extra);
        self.cli(&args)
    }

    /// `tern status --json` rows for one device and model.
    fn state(&self, device: &str) -> Option<serde_json::Value> {
        self.state_of(device, "digits")
    }

    fn state_of(&self, device: &str, model: &str) -> Option<serde_json::Value> {
        let out = self.cli(&["status", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        rows.as_array()?
            .iter()
            .find(|r| r["device"] == device && r["model"] == model)
            .cloned()
    }

    fn wait_state(&self, device: &str, state: &str, version: u32) -> serde_json::Value {
        self.wait_model_state(device, "digits", state, version)
    }

    fn wait_model_state(
        &self,
        device: &str,
        model: &str,
        state: &str,
        version: u32,
    ) -> serde_json::Value {
        let mut last = None;
        let patience = if model == "large" { 180 } else { 45 };
        let deadline = Instant::now() + Duration::from_secs(patience);
        loop {
            let row = self.state_of(device, model);
            if let Some(r) = &row {
                if r["state"] == state && r["target_version"] == version {
                    return r.clone();
                }
            }
            if Instant::now() > deadline {
                panic!("{device} never reached {state} {version}; last report {last:?}");
            }
            last = row;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn serves(d: &Daemon, version: u32) -> bool {
    let (code, body) = d.post("/v2/models/digits/infer", &digits_request(3, "k"));
    code == 200 && served_version(&body) == version.to_string()
}

fn metric(d: &Daemon, name: &str) -> u64 {
    let (_, text) = d.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn push_reaches_running_and_late_devices(url: String, tag: &str) {
    let fleet = Fleet::new(tag, url);
    let early = fleet.device("early", &[]);
    assert!(serves(&early, 1));
    let input = repo().join("models/testdata/digits_test_x.npy");
    let pushed = fleet.push(
        &model("digits-int8-qdq"),
        2,
        &["--selftest-input", input.to_str().unwrap()],
    );
    let pushed: serde_json::Value = serde_json::from_str(&pushed).unwrap();
    assert_eq!(pushed["selftest"], true);
    fleet.wait_state("early", "active", 2);
    assert!(serves(&early, 2));
    // A device that was off during the push converges from retained messages alone.
    let late = fleet.device("late", &[]);
    fleet.wait_state("late", "active", 2);
    assert!(serves(&late, 2));
    let installed = fleet.dir.join("late/digits/2/model.onnx");
    assert_eq!(
        std::fs::read(installed).unwrap(),
        std::fs::read(model("digits-int8-qdq")).unwrap()
    );
}

#[test]
fn a_push_reaches_a_running_device_and_one_started_later_on_rumqttd() {
    push_reaches_running_and_late_devices(rumqttd(), "push-rumqttd");
}

#[test]
fn a_push_reaches_a_running_device_and_one_started_later_on_mosquitto() {
    push_reaches_running_and_late_devices(mosquitto(), "push-mosquitto");
}

/// A TCP relay between devices and the broker that can cut or hold the broker-to-device
/// direction after a number of bytes: a network failure at a chosen point of a transfer.
struct Relay {
    port: u16,
    cut_after: Arc<AtomicU64>,
    hold_after: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn new(upstream: &str) -> Relay {
        let upstream = upstream.trim_start_matches("mqtt://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_after = Arc::new(AtomicU64::new(u64::MAX));
        let hold = Arc::new(AtomicU64::new(u64::MAX));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, h, cs) = (cut_after.clone(), hold.clone(), conns.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                cs.lock().unwrap().push(down.try_clone().unwrap());
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || pump(d2, u2, None, None));
                let (c, h) = (c.clone(), h.clone());
                std::thread::spawn(move || pump(up, down, Some(c), Some(h)));
            }
        });
        Relay {
            port,
            cut_after,
            hold_after: hold,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: Option<Arc<AtomicU64>>,
    hold: Option<Arc<AtomicU64>>,
) {
    let mut buf = [0u8; 16 * 1024];
    let mut relayed = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Held: the bytes wait here until the limit is lifted.
        while hold
            .as_ref()
            .is_some_and(|h| relayed + n as u64 > h.load(Ordering::SeqCst))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(c) = &cut {
            let limit = c.load(Ordering::SeqCst);
            if relayed + n as u64 > limit {
                // Once: the next connection goes through untouched.
                c.store(u64::MAX, Ordering::SeqCst);
                break;
            }
        }
        relayed += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_transfer_cut_mid_way_resumes_without_fetching_completed_chunks_again() {
    let fleet = Fleet::new("resume", rumqttd());
    let relay = Relay::new(&fleet.url);
    let mut device_fleet = Fleet::new("resume-dev", relay.url());
    device_fleet.name = fleet.name.clone();
    device_fleet.public = fleet.public.clone();
    let d = device_fleet.device("dev", &["--config", &chunk_window_config(&fleet.dir, 4)]);
    // 40 KB in 512-byte chunks: 79 chunks; the connection drops after about a third.
    relay.cut_after.store(14_000, Ordering::SeqCst);
    let pushed = fleet.push(&model("digits"), 2, &["--chunk-size", "512"]);
    let chunks = json_field(&pushed, "chunks");
    fleet.wait_state("dev", "active", 2);
    assert!(serves(&d, 2));
    assert_eq!(
        relay.cut_after.load(Ordering::SeqCst),
        u64::MAX,
        "the cut happened"
    );
    assert!(
        relay.conns.lock().unwrap().len() >= 2,
        "the device reconnected"
    );
    // Every chunk was written exactly once; only the window in flight at the cut came twice.
    assert_eq!(metric(&d, "tern_fleet_chunks_received_total"), chunks);
    assert!(metric(&d, "tern_fleet_chunks_duplicate_total") <= 4);
}

fn chunk_window_config(dir: &Path, window: usize) -> String {
    let path = dir.join(format!("window-{window}.toml"));
    std::fs::write(
        &path,
        format!("[fleet]\nchunk_window = {window}\nstall_timeout_ms = 1000\n"),
    )
    .unwrap();
    path.display().to_string()
}

fn json_field(doc: &str, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(doc).unwrap();
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {doc}"))
}

/// A device behind a relay, downloading digits version 2 (157 chunks of 256 bytes, a window of
/// 4), frozen by the relay after about 20 KB of 40 KB (~75 chunks, two bitmap checkpoints): the
/// moment to inject a fault.
struct Frozen {
    fleet: Fleet,
    device_fleet: Fleet,
    relay: Relay,
    config: String,
    d: Daemon,
    chunks: u64,
    received: u64,
}

fn freeze_a_transfer(tag: &str, url: String) -> Frozen {
    let fleet = Fleet::new(tag, url);
    let relay = Relay::new(&fleet.url);
    let mut device_fleet = Fleet::new(&format!("{tag}-dev"), relay.url());
    device_fleet.name = fleet.name.clone();
    device_fleet.public = fleet.public.clone();
    let config = chunk_window_config(&fleet.dir, 4);
    let d = device_fleet.device("dev", &["--config", &config]);
    relay.hold_after.store(20_000, Ordering::SeqCst);
    let pushed = fleet.push(&model("digits"), 2, &["--chunk-size", "256"]);
    let chunks = json_field(&pushed, "chunks");
    let mut received = 0;
    wait_until(Duration::from_secs(30), "the transfer to freeze", || {
        let now = metric(&d, "tern_fleet_chunks_received_total");
        let settled = now > 0 && now == received;
        received = now;
        std::thread::sleep(Duration::from_millis(300));
        settled
    });
    Frozen {
        fleet,
        device_fleet,
        relay,
        config,
        d,
        chunks,
        received,
    }
}

#[test]
fn kill_9_during_a_download_resumes_from_the_bitmap_after_restart() {
    let Frozen {
        fleet,
        device_fleet,
        relay,
        config,
        d,
        chunks,
        received: before,
    } = freeze_a_transfer("kill", rumqttd());
    assert!(
        before >= 32 && before < chunks,
        "{before} of {chunks} chunks before the kill"
    );
    let mut d = d;
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    relay.hold_after.store(u64::MAX, Ordering::SeqCst);
    let root = device_fleet.dir.join("dev");
    // The old version is intact and serves on restart; the update then completes.
    let d = device_fleet.device("dev", &["--config", &config]);
    fleet.wait_state("dev", "active", 2);
    assert!(serves(&d, 2));
    let after = metric(&d, "tern_fleet_chunks_received_total");
    // Only chunks past the last checkpoint (every 32) are fetched again.
    assert!(
        after + before >= chunks && after <= chunks - 32,
        "after restart {after} of {chunks} chunks fetched ({before} before the kill)"
    );
    assert!(!root.join(".tern-staging").read_dir().unwrap().any(|_| true));
}

/// Publishes raw retained frames, as a misbehaving or malicious publisher would.
fn publish_retained(url: &str, items: Vec<(String, Vec<u8>)>) {
    let (client, mut conn) = client(url, "forger");
    let n = items.len();
    for (t, p) in items {
        client.publish(t, QoS::AtLeastOnce, true, p).unwrap();
    }
    let mut acked = 0;
    for ev in conn.iter() {
        if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))) = ev
        {
            acked += 1;
            if acked == n {
                break;
            }
        }
        ev.unwrap();
    }
}

/// A plain MQTT 5 client of the test, as any third party would write.
fn client(url: &str, id: &str) -> (rumqttc::v5::Client, rumqttc::v5::Connection) {
    let (host, port) = url.trim_start_matches("mqtt://").split_once(':').unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(
        format!("{id}-{}", std::process::id()),
        host,
        port.parse().unwrap(),
    );
    o.set_max_packet_size(Some(1 << 20));
    rumqttc::v5::Client::new(o, 64)
}

fn topic(fleet: &Fleet, sha: &str, rest: &str) -> String {
    format!("tern/v1/{}/artifacts/{sha}/{rest}", fleet.name)
}

#[test]
fn a_corrupted_chunk_fails_the_digest_and_the_old_version_keeps_serving() {
    let fleet = Fleet::new("corrupt", rumqttd());
    let d = fleet.device("dev", &[]);
    let bytes = std::fs::read(model("digits-int8-qdq")).unwrap();
    let pushed = fleet.push(
        &model("digits-int8-qdq"),
        2,
        &["--chunk-size", "4096", "--no-rollout"],
    );
    let sha = serde_json::from_str::<serde_json::Value>(&pushed).unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    // Replace chunk 1 with same-length garbage in a well-formed frame.
    let mut artifact = [0u8; 32];
    hex_decode(&sha, &mut artifact);
    let mut evil = bytes[4096..8192].to_vec();
    evil[100] ^= 0x55;
    let mut frame = vec![0u8; 8192];
    let n = tern_proto::encode(
        &tern_proto::Frame::Chunk(tern_proto::Chunk {
            artifact,
            index: 1,
            data: &evil,
        }),
        &mut frame,
    )
    .unwrap();
    publish_retained(
        &fleet.url,
        vec![(topic(&fleet, &sha, "chunks/1"), frame[..n].to_vec())],
    );
    fleet.cli(&["rollout", "digits", "2"]);
    let row = fleet.wait_state("dev", "failed", 2);
    assert_eq!(row["detail"], "HashMismatch");
    assert_eq!(row["active_version"], 1);
    assert!(serves(&d, 1));
    assert!(!fleet.dir.join("dev/digits/2").exists());
}

fn hex_decode(s: &str, out: &mut [u8; 32]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
}

#[test]
fn unknown_keys_forged_signatures_and_downgrades_are_refused() {
    let fleet = Fleet::new("trust", rumqttd());
    let d = fleet.device("dev", &[]);
    // Signed by a key the device does not trust.
    let (stranger, _) = keygen(&fleet.dir, "stranger");
    let qop = model("digits-int8-qop");
    let v = fleet.cli(&[
        "push",
        &qop,
        "--model",
        "digits",
        "--version",
        "5",
        "--key",
        &stranger,
        "--json",
    ]);
    assert!(v.contains("\"version\":5"), "{v}");
    let row = fleet.wait_state("dev", "failed", 5);
    assert_eq!(row["detail"], "UnknownKey");
    assert!(serves(&d, 1));

    // A trusted manifest whose body was edited after signing (version 3 claimed as 6).
    let pushed = fleet.push(&model("digits-int8-qdq"), 3, &["--no-rollout"]);
    let sha = serde_json::from_str::<serde_json::Value>(&pushed).unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest_topic = topic(&fleet, &sha, "manifest");
    let original = retained_payload(&fleet.url, &manifest_topic);
    let mut m = tern_update::decode_manifest(&original).unwrap();
    m.body.version = 6;
    publish_retained(
        &fleet.url,
        vec![(manifest_topic.clone(), tern_update::encode_manifest(&m))],
    );
    let mut artifact = [0u8; 32];
    hex_decode(&sha, &mut artifact);
    let desired = tern_proto::DesiredState {
        generation: 100,
        models: [tern_proto::DesiredModel {
            name: "digits".try_into().unwrap(),
            version: 6,
            artifact,
            percent: 100,
            allow_downgrade: false,
        }]
        .into_iter()
        .collect(),
    };
    let mut buf = [0u8; 256];
    let n = tern_proto::encode(&tern_proto::Frame::Desired(desired), &mut buf).unwrap();
    publish_retained(
        &fleet.url,
        vec![(format!("tern/v1/{}/desired", fleet.name), buf[..n].to_vec())],
    );
    let row = fleet.wait_state("dev", "failed", 6);
    assert_eq!(row["detail"], "BadSignature");
    assert!(serves(&d, 1));

    // Restore the honest manifest; version 3 installs. Then an older version is refused...
    publish_retained(&fleet.url, vec![(manifest_topic, original)]);
    fleet.cli(&["rollout", "digits", "3"]);
    fleet.wait_state("dev", "active", 3);
    fleet.push(&model("digits"), 2, &[]);
    let row = fleet.wait_state("dev", "failed", 2);
    assert_eq!(row["detail"], "Downgrade");
    assert!(serves(&d, 3));
    // ...unless the fleet orders a rollback.
    fleet.cli(&["rollback", "digits", "--to", "2"]);
    fleet.wait_state("dev", "active", 2);
    assert!(serves(&d, 2));
    // Forward again to version 3, which is still on disk (retired): nothing is downloaded.
    let fetched = metric(&d, "tern_fleet_chunks_received_total");
    fleet.cli(&["rollout", "digits", "3"]);
    fleet.wait_state("dev", "active", 3);
    assert!(serves(&d, 3));
    assert_eq!(metric(&d, "tern_fleet_chunks_received_total"), fetched);
}

/// The first retained payload on `topic`.
fn retained_payload(url: &str, topic: &str) -> Vec<u8> {
    let (client, mut conn) = client(url, "reader");
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    for ev in conn.iter() {
        if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p))) = ev
        {
            return p.payload.to_vec();
        }
        ev.unwrap();
    }
    unreachable!("the connection ended")
}

#[test]
fn a_model_that_fails_its_self_test_is_never_served() {
    let fleet = Fleet::new("selftest", rumqttd());
    let d = fleet.device("dev", &[]);
    // The publisher's recorded outputs, shifted by 0.5: a model that no longer reproduces what
    // its publisher saw (a corrupted conversion, a wrong build) must not serve.
    let input = repo().join("models/testdata/digits_test_x.npy");
    let pushed = fleet.push(
        &model("digits"),
        2,
        &["--no-rollout", "--selftest-input", input.to_str().unwrap()],
    );
    let good_sha = serde_json::from_str::<serde_json::Value>(&pushed).unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let recorded = retained_payload(&fleet.url, &topic(&fleet, &good_sha, "selftest"));
    let mut st = tern_update::selftest::SelfTest::decode(&recorded).unwrap();
    for out in &mut st.expected {
        let t = tern_core::npy::read(out.npy.as_slice()).unwrap();
        let shifted: Vec<f32> = t
            .view()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v + 0.5)
            .collect();
        let t = tern_core::Tensor::from_vec(t.shape().to_vec(), shifted).unwrap();
        out.npy.clear();
        tern_core::npy::write(&mut out.npy, &t).unwrap();
    }
    let vector = st.encode();
    let other = std::fs::read(model("digits")).unwrap();
    let key = tern_update::SecretKey::load(Path::new(&fleet.key)).unwrap();
    // Version 3: a different manifest (and self-test digest) for the same bytes.
    let m = tern_update::sign(
        "digits",
        3,
        &other,
        4096,
        Some(tern_update::sha256(&vector)),
        &key,
    )
    .unwrap();
    let sha = tern_update::hex(&m.body.sha256);
    let mut items = vec![(topic(&fleet, &sha, "selftest"), vector)];
    for (i, piece) in other.chunks(4096).enumerate() {
        let mut buf = vec![0u8; 4200];
        let n = tern_proto::encode(
            &tern_proto::Frame::Chunk(tern_proto::Chunk {
                artifact: m.body.sha256,
                index: i as u32,
                data: piece,
            }),
            &mut buf,
        )
        .unwrap();
        items.push((
            topic(&fleet, &sha, &format!("chunks/{i}")),
            buf[..n].to_vec(),
        ));
    }
    items.push((
        topic(&fleet, &sha, "manifest"),
        tern_update::encode_manifest(&m),
    ));
    publish_retained(&fleet.url, items);
    fleet.cli(&["rollout", "digits", "3"]);
    let row = fleet.wait_state("dev", "failed", 3);
    assert_eq!(row["detail"], "SelfTestFailed");
    assert!(serves(&d, 1));
    assert!(!fleet.dir.join("dev/digits/.3.pending").exists());
    assert!(!fleet.dir.join("dev/digits/3").exists());
}

#[test]
fn a_canary_that_trips_during_probation_is_rolled_back() {
    let fleet = Fleet::new("canary", rumqttd());
    let config = fleet.dir.join("canary.toml");
    // Any real request is slower than 1 µs: the rule trips on the first judged window.
    std::fs::write(
        &config,
        "[fleet]\nprobation_ms = 60000\ncanary_max_p99_ms = 0.001\ncanary_min_requests = 5\n",
    )
    .unwrap();
    let d = fleet.device("dev", &["--config", config.to_str().unwrap()]);
    fleet.push(&model("digits-int8-qdq"), 2, &[]);
    wait_until(Duration::from_secs(30), "version 2 serving", || {
        serves(&d, 2)
    });
    let row = fleet.state("dev").unwrap();
    assert_eq!(row["state"], "validating", "on probation: {row}");
    for i in 0..20 {
        let (code, _) = d.post("/v2/models/digits/infer", &digits_request(i, "k"));
        assert_eq!(code, 200);
    }
    let row = fleet.wait_state("dev", "rolled_back", 2);
    assert_eq!(row["detail"], "2 -> 1");
    assert_eq!(row["active_version"], 1);
    assert!(serves(&d, 1));
}

#[test]
fn a_half_rollout_updates_exactly_the_hashed_cohort() {
    let fleet = Fleet::new("cohort", rumqttd());
    let ids: Vec<String> = (0..6).map(|i| format!("unit-{i}")).collect();
    let devices: Vec<Daemon> = ids.iter().map(|id| fleet.device(id, &[])).collect();
    fleet.push(&model("digits-int8-qdq"), 2, &["--percent", "50"]);
    let inside: Vec<bool> = ids.iter().map(|id| tern_proto::cohort(id) < 50).collect();
    assert!(
        inside.iter().any(|b| *b) && inside.iter().any(|b| !*b),
        "ids span both sides"
    );
    for (id, inside) in ids.iter().zip(&inside) {
        if *inside {
            fleet.wait_state(id, "active", 2);
        }
    }
    // Devices outside the cohort had the same retained state and did nothing.
    std::thread::sleep(Duration::from_millis(500));
    for ((id, inside), d) in ids.iter().zip(&inside).zip(&devices) {
        let expected = if *inside { 2 } else { 1 };
        assert!(
            serves(d, expected),
            "{id} (cohort {})",
            tern_proto::cohort(id)
        );
    }
}

#[test]
fn inference_requests_over_mqtt_are_answered_like_http_ones() {
    let fleet = Fleet::new("infer", rumqttd());
    let d = fleet.device("dev", &[]);
    let body = digits_request(7, "k");
    let (_, http) = d.post("/v2/models/digits/infer", &body);
    let (client, mut conn) = client(&fleet.url, "asker");
    client.subscribe("replies/asker", QoS::AtLeastOnce).unwrap();
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        response_topic: Some("replies/asker".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"req-1")),
        ..Default::default()
    };
    let mut sent = false;
    for ev in conn.iter() {
        match ev.unwrap() {
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::SubAck(_))
                if !sent =>
            {
                client
                    .publish_with_properties(
                        format!("tern/v1/{}/devices/dev/infer/digits", fleet.name),
                        QoS::AtLeastOnce,
                        false,
                        body.clone(),
                        props.clone(),
                    )
                    .unwrap();
                sent = true;
            }
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) => {
                let pp = p.properties.unwrap();
                assert_eq!(pp.correlation_data.as_deref(), Some(&b"req-1"[..]));
                assert!(pp
                    .user_properties
                    .contains(&("status".into(), "200".into())));
                let mqtt: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                let http: serde_json::Value = serde_json::from_str(&http).unwrap();
                assert_eq!(mqtt["outputs"], http["outputs"]);
                break;
            }
            _ => {}
        }
    }
}

/// SPEC.md is enough for a third party: a paho-mqtt script written from it alone reads a
/// device's retained report.
#[test]
fn a_paho_client_written_from_the_spec_reads_a_device_report() {
    let fleet = Fleet::new("paho", mosquitto());
    let _d = fleet.device("dev", &[]);
    fleet.push(&model("digits-int8-qdq"), 2, &[]);
    fleet.wait_state("dev", "active", 2);
    let out = Command::new(common::python())
        .arg(repo().join("tests/python/read_report.py"))
        .args(["127.0.0.1", "1883", &fleet.name, "dev"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["device"], "dev");
    assert_eq!(report["retained"], true);
    let digits = &report["models"][0];
    assert_eq!(digits["name"], "digits");
    assert_eq!(digits["state"], "active");
    assert_eq!(digits["version"], 2);
    assert_eq!(digits["active_version"], 2);
}

/// Models far beyond one MQTT message: 64 MiB in 1 093 chunks through Mosquitto, then a second
/// 64 MiB version hot-swapped in while clients keep sending requests, none of which fails.
#[test]
fn a_64_mib_model_transfers_and_swaps_under_load_without_a_failed_request() {
    let fleet = Fleet::new("large", mosquitto());
    let (v1, v2) = (
        generate_model(&fleet.dir, 64, "1"),
        generate_model(&fleet.dir, 64, "2"),
    );
    let d = fleet.device("dev", &[]);
    fleet.push_as("large", &v1, 1, &[]);
    fleet.wait_model_state("dev", "large", "active", 1);
    let request = format!(
        r#"{{"inputs":[{{"name":"x","shape":[1,256],"datatype":"FP32","data":[{}]}}]}}"#,
        vec!["0.5"; 256].join(",")
    );
    let stop = Arc::new(AtomicU64::new(0));
    let addr = d.addr.clone();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, request, addr) = (stop.clone(), request.clone(), addr.clone());
            std::thread::spawn(move || {
                let probe = Daemon::attach(&addr);
                let (mut ok, mut failed, mut versions) =
                    (0, vec![], std::collections::BTreeSet::new());
                while stop.load(Ordering::SeqCst) == 0 {
                    let (code, body) = probe.post("/v2/models/large/infer", &request);
                    if code == 200 {
                        ok += 1;
                        versions.insert(served_version(&body));
                    } else {
                        failed.push((code, body));
                    }
                }
                (ok, failed, versions)
            })
        })
        .collect();
    fleet.push_as("large", &v2, 2, &[]);
    fleet.wait_model_state("dev", "large", "active", 2);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(1, Ordering::SeqCst);
    let mut seen = std::collections::BTreeSet::new();
    for c in clients {
        let (ok, failed, versions) = c.join().unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during the swap: {failed:?}"
        );
        assert!(ok > 0);
        seen.extend(versions);
    }
    assert!(seen.contains("1") && seen.contains("2"), "served {seen:?}");
}

/// Sums every sample of a metric family, whatever its labels.
fn metric_sum(d: &Daemon, name: &str) -> u64 {
    let (_, text) = d.get("/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Blocks until `device` reports `model` in `state` (a SPEC.md `UpdateState` variant name).
fn wait_for_report(url: &str, fleet: &str, device: &str, model: &str, state: &str) {
    let (client, mut conn) = client(url, &format!("watch-{fleet}-{device}"));
    client
        .subscribe(
            format!("tern/v1/{fleet}/devices/{device}/reported"),
            QoS::AtLeastOnce,
        )
        .unwrap();
    for ev in conn.iter() {
        if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p))) =
            &ev
        {
            if let Ok(tern_proto::Frame::Report(r)) = tern_proto::decode(&p.payload) {
                let hit = r.models.iter().any(|m| {
                    m.name.as_str() == model && format!("{:?}", m.state).starts_with(state)
                });
                if hit {
                    return;
                }
            }
        }
        ev.unwrap();
    }
}

/// `kill -9` as soon as the device reports `stage` for a `mib` MiB update. Wherever the kill
/// lands, the repository is consistent at once (never both a pending and an active copy), and
/// after a restart the update completes from what is on disk: at most the chunks after the last
/// checkpoint (every 32) are fetched again.
fn kill_9_at(stage: &str, tag: &str, mib: u32) {
    let fleet = Fleet::new(tag, rumqttd());
    let big = generate_model(&fleet.dir, mib, "7");
    let mut d = fleet.device("dev", &[]);
    let (url, name, watched) = (fleet.url.clone(), fleet.name.clone(), stage.to_string());
    let watcher =
        std::thread::spawn(move || wait_for_report(&url, &name, "dev", "large", &watched));
    fleet.push_as("large", &big, 1, &[]);
    watcher.join().unwrap();
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let root = fleet.dir.join("dev/large");
    let pending = root.join(".1.pending/model.onnx").exists();
    let active = root.join("1/model.onnx").exists();
    assert!(
        !(pending && active),
        "killed at {stage}: both a pending and an active copy"
    );
    if stage == "Validating" {
        assert!(pending != active, "killed at {stage}: neither copy");
    }
    let d = fleet.device("dev", &[]);
    fleet.wait_model_state("dev", "large", "active", 1);
    assert!(root.join("1/model.onnx").exists() && !root.join(".1.pending").exists());
    let refetched = metric(&d, "tern_fleet_chunks_received_total");
    // Verifying checkpoints the bitmap as it starts; from Installing on nothing is fetched.
    let allowed = if stage == "Verifying" { 31 } else { 0 };
    assert!(
        refetched <= allowed,
        "killed at {stage}: {refetched} chunks fetched again"
    );
    let (code, _) = d.post(
        "/v2/models/large/infer",
        &format!(
            r#"{{"inputs":[{{"name":"x","shape":[1,256],"datatype":"FP32","data":[{}]}}]}}"#,
            vec!["0.5"; 256].join(",")
        ),
    );
    assert_eq!(code, 200);
}

#[test]
fn kill_9_during_validation_leaves_a_consistent_repository_and_the_update_completes() {
    kill_9_at("Validating", "kill-validate", 48);
}

#[test]
fn kill_9_while_verifying_leaves_a_consistent_repository_and_the_update_completes() {
    kill_9_at("Verifying", "kill-verify", 24);
}

#[test]
fn kill_9_while_installing_leaves_a_consistent_repository_and_the_update_completes() {
    kill_9_at("Installing", "kill-install", 24);
}

/// MQTT 3.1.1 requesters name their reply topic in the request; requests to the fleet topic
/// are shared among the devices of the fleet, each answered exactly once.
#[test]
fn mqtt311_requests_to_the_fleet_topic_are_shared_between_devices() {
    let fleet = Fleet::new("share", mosquitto());
    let devices = [fleet.device("a", &[]), fleet.device("b", &[])];
    let (_, http) = devices[0].post("/v2/models/digits/infer", &digits_request(9, "k"));
    let http: serde_json::Value = serde_json::from_str(&http).unwrap();
    let reply_to = format!("replies/{}", fleet.name);
    let mut o =
        rumqttc::MqttOptions::new(format!("v311-{}", std::process::id()), "127.0.0.1", 1883);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(o, 64);
    client
        .subscribe(&reply_to, rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let n = 12;
    let (mut replies, mut ids) = (0, std::collections::BTreeSet::new());
    for ev in conn.iter() {
        match ev.unwrap() {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                // Shared subscriptions take a moment to settle on both devices.
                std::thread::sleep(Duration::from_millis(500));
                for i in 0..n {
                    let body = digits_request(9, "k").replacen(
                        r#""parameters":{"route_key":"k"}"#,
                        &format!(r#""id":"q{i}","parameters":{{"reply_to":"{reply_to}"}}"#),
                        1,
                    );
                    client
                        .publish(
                            format!("tern/v1/{}/infer/digits", fleet.name),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            body,
                        )
                        .unwrap();
                }
            }
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                let reply: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(reply["outputs"], http["outputs"]);
                assert!(
                    ids.insert(reply["id"].as_str().unwrap().to_string()),
                    "answered twice"
                );
                replies += 1;
                if replies == n {
                    break;
                }
            }
            _ => {}
        }
    }
    let served: Vec<u64> = devices
        .iter()
        .map(|d| metric_sum(d, "tern_request_success_total"))
        .collect();
    // One warm-up HTTP request went to device a.
    assert_eq!(served.iter().sum::<u64>(), n as u64 + 1);
    assert!(
        served.iter().all(|s| *s > 0),
        "both devices answered: {served:?}"
    );
}

/// A per-device push updates that device only; `tern gc` deletes the retained artifacts no
/// desired state references, and nothing else.
#[test]
fn device_pushes_target_one_device_and_gc_keeps_only_referenced_artifacts() {
    let fleet = Fleet::new("gc", rumqttd());
    let (a, b) = (fleet.device("a", &[]), fleet.device("b", &[]));
    fleet.push(&model("digits-int8-qdq"), 2, &["--device", "b"]);
    fleet.wait_state("b", "active", 2);
    assert!(serves(&b, 2));
    assert!(serves(&a, 1));
    // Pushed but never rolled out: garbage once the fleet moves on.
    fleet.push(&model("digits-int8-qop"), 3, &["--no-rollout"]);
    let dry: serde_json::Value =
        serde_json::from_str(&fleet.cli(&["gc", "--dry-run", "--json"])).unwrap();
    let listed: Vec<u64> = dry["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["version"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, vec![3], "{dry}");
    fleet.cli(&["gc"]);
    let after: serde_json::Value =
        serde_json::from_str(&fleet.cli(&["gc", "--dry-run", "--json"])).unwrap();
    assert_eq!(after["artifacts"], serde_json::json!([]));
    let gone = tern(&[
        "rollout",
        "digits",
        "3",
        "--fleet",
        &fleet.name,
        "--mqtt",
        &fleet.url,
    ]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no retained artifact"));
    // The referenced artifact survived: a device joining now still converges.
    fleet.cli(&["rollout", "digits", "2", "--device", "c"]);
    let c = fleet.device("c", &[]);
    fleet.wait_state("c", "active", 2);
    assert!(serves(&c, 2));
}

/// Telemetry reaches the broker with the device's serving figures.
#[test]
fn telemetry_reports_requests_latency_and_resources() {
    let fleet = Fleet::new("telemetry", rumqttd());
    let config = fleet.dir.join("telemetry.toml");
    std::fs::write(&config, "[fleet]\ntelemetry_interval_ms = 200\n").unwrap();
    let d = fleet.device("dev", &["--config", config.to_str().unwrap()]);
    for i in 0..5 {
        assert_eq!(
            d.post("/v2/models/digits/infer", &digits_request(i, "k")).0,
            200
        );
    }
    let (client, mut conn) = client(&fleet.url, "telemetry");
    client
        .subscribe(
            format!("tern/v1/{}/devices/dev/telemetry", fleet.name),
            QoS::AtLeastOnce,
        )
        .unwrap();
    for ev in conn.iter() {
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) =
            ev.unwrap()
        {
            let Ok(tern_proto::Frame::Telemetry(t)) = tern_proto::decode(&p.payload) else {
                panic!("not a telemetry frame");
            };
            assert_eq!((t.requests, t.errors), (5, 0), "{t:?}");
            assert!(t.p50_us > 0 && t.p99_us >= t.p50_us, "{t:?}");
            assert!(t.rss_kb > 1000, "{t:?}");
            break;
        }
    }
}

/// A small tmpfs mounted over `dir` for one test, unmounted on drop. Mounting needs root (CI
/// runs as root); elsewhere `mount` fails and the caller skips.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_full_disk_fails_the_update_cleanly_and_the_old_version_keeps_serving() {
    let fleet = Fleet::new("disk-full", rumqttd());
    let root = fleet.dir.join("dev");
    // Room for the shipped digits model and the agent's state, not for an 8 MiB update.
    let Some(_disk) = SmallDisk::mount(&root, 4 << 20) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    device_repo(&fleet.dir, "dev");
    let d = fleet.device("dev", &[]);
    let before = files_under(&root);
    let big = generate_model(&fleet.dir, 8, "11");
    fleet.push_as("large", &big, 1, &[]);
    let row = fleet.wait_model_state("dev", "large", "failed", 1);
    assert_eq!(row["detail"], "DiskFull", "{row}");
    assert!(serves(&d, 1));
    // Nothing half-written remains: no staged chunks, no pending or partial version.
    let after: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|f| !before.contains(f))
        .filter(|f| !f.starts_with(".tern-fleet"))
        .collect();
    assert!(after.is_empty(), "left behind: {after:?}");
    // The space is free again: a model that fits installs.
    fleet.push(&model("digits-int8-qdq"), 2, &[]);
    fleet.wait_state("dev", "active", 2);
    assert!(serves(&d, 2));
}

/// A Mosquitto of this test's own, on its own port, persisting to `dir` as a production broker
/// does: stopped and started again, it keeps its retained messages.
struct PrivateBroker {
    child: std::process::Child,
    port: u16,
    conf: PathBuf,
}

impl PrivateBroker {
    fn start(dir: &Path) -> PrivateBroker {
        PrivateBroker::start_with(
            dir,
            &format!(
                "allow_anonymous true\npersistence true\npersistence_location {}/\n",
                dir.display()
            ),
        )
    }

    /// A broker whose listener takes `settings` (TLS, ACLs) after its port.
    fn start_with(dir: &Path, settings: &str) -> PrivateBroker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("mosquitto.conf");
        // `user root`: started as root, Mosquitto would otherwise switch to a user that cannot
        // read or write the scratch directory (ignored when not started as root).
        std::fs::write(
            &conf,
            format!("user root\nlistener {port} 127.0.0.1\n{settings}"),
        )
        .unwrap();
        let child = PrivateBroker::spawn(&conf, port);
        PrivateBroker { child, port, conf }
    }

    fn spawn(conf: &Path, port: u16) -> std::process::Child {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto (Debian's package; .ci/run installs it)");
        wait_until(Duration::from_secs(10), "the private Mosquitto", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        child
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// A clean restart (SIGTERM, so the broker saves its state), on the same port.
    fn restart(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap();
        self.child = PrivateBroker::spawn(&self.conf, self.port);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_broker_restarted_mid_transfer_keeps_its_chunks_and_the_transfer_resumes() {
    let mut broker = PrivateBroker::start(&scratch("broker-restart-mosquitto"));
    let Frozen {
        fleet,
        relay,
        d,
        chunks,
        received: before,
        ..
    } = freeze_a_transfer("broker-restart", broker.url());
    assert!(
        before < chunks,
        "{before} of {chunks} chunks before the restart"
    );
    broker.restart();
    relay.hold_after.store(u64::MAX, Ordering::SeqCst);
    fleet.wait_state("dev", "active", 2);
    assert!(serves(&d, 2));
    assert!(
        relay.conns.lock().unwrap().len() >= 2,
        "the device reconnected"
    );
    // Every chunk was written once: the restart cost no completed chunk.
    assert_eq!(metric(&d, "tern_fleet_chunks_received_total"), chunks);
}

/// A test PKI in `dir`: a CA and certificates it issues (valid for 127.0.0.1 and localhost),
/// as PEM files.
struct TestPki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    fn new(dir: &Path) -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tern test fleet CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        TestPki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Certificate and key files for `name` (its common name: the broker's user name).
    fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// An MQTT 5 client of the TLS broker with the identity `(cert, key)`, or none.
fn tls_client(
    port: u16,
    id: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> (rumqttc::v5::Client, rumqttc::v5::Connection) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    rumqttc::v5::Client::new(o, 64)
}

/// Events of `conn` for `wait`: publishes received (topic, payload), SUBACK and PUBACK codes,
/// and whether the connection was refused.
#[derive(Default, Debug)]
struct Seen {
    publishes: Vec<(String, Vec<u8>)>,
    subacks: Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode>,
    pubacks: Vec<rumqttc::v5::mqttbytes::v5::PubAckReason>,
    connected: bool,
    refused: bool,
}

fn watch(conn: &mut rumqttc::v5::Connection, wait: Duration) -> Seen {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    let mut seen = Seen::default();
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match conn.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => seen.connected = true,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => seen.publishes.push((
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.payload.to_vec(),
            )),
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => seen.subacks.extend(a.return_codes),
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => seen.pubacks.push(a.reason),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                seen.refused = !seen.connected;
                break;
            }
            Err(_) => break,
        }
    }
    seen
}

#[test]
fn over_tls_a_device_reaches_its_own_topics_and_never_another_devices() {
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
    let dir = scratch("tls-broker");
    let pki = TestPki::new(&dir);
    let (broker_cert, broker_key) = pki.issue("broker");
    let manager = pki.issue("manager");
    let dev_a = pki.issue("dev-a");
    let acl = dir.join("acl");
    // The manager writes the whole tree; a device (its certificate's name is its user name,
    // %u) reads the fleet's desired state and artifacts and owns only its own subtree.
    std::fs::write(
        &acl,
        "user manager\ntopic readwrite tern/#\n\n\
         pattern read tern/v1/+/desired\n\
         pattern read tern/v1/+/artifacts/#\n\
         pattern readwrite tern/v1/+/devices/%u/#\n",
    )
    .unwrap();
    let broker = PrivateBroker::start_with(
        &dir,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\nacl_file {}\n",
            pki.ca_file().display(),
            broker_cert.display(),
            broker_key.display(),
            acl.display()
        ),
    );
    let mut fleet = Fleet::new("tls", format!("mqtts://127.0.0.1:{}", broker.port));
    fleet.broker_args = vec![
        "--ca-file".into(),
        pki.ca_file().display().to_string(),
        "--client-cert".into(),
        manager.0.display().to_string(),
        "--client-key".into(),
        manager.1.display().to_string(),
    ];
    let config = fleet.dir.join("dev-a.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
            pki.ca_file(),
            dev_a.0,
            dev_a.1
        ),
    )
    .unwrap();

    // The whole update flow works over TLS with the device's own certificate.
    let d = fleet.device("dev-a", &["--config", config.to_str().unwrap()]);
    fleet.push(&model("digits-int8-qdq"), 2, &[]);
    fleet.wait_state("dev-a", "active", 2);
    assert!(serves(&d, 2));

    // What dev-b's subtree holds, as the manager would leave it.
    let prefix = format!("tern/v1/{}", fleet.name);
    let ca = pki.ca_file();
    let (observer, mut observed) = tls_client(broker.port, "observer", &ca, Some(&manager));
    observer
        .publish(
            format!("{prefix}/devices/dev-b/desired"),
            QoS::AtLeastOnce,
            true,
            b"for dev-b only".to_vec(),
        )
        .unwrap();
    observer
        .subscribe(format!("{prefix}/devices/dev-b/#"), QoS::AtLeastOnce)
        .unwrap();
    observer
        .subscribe(format!("{prefix}/artifacts/forged/#"), QoS::AtLeastOnce)
        .unwrap();
    observer
        .subscribe(format!("{prefix}/devices/dev-a/probe"), QoS::AtLeastOnce)
        .unwrap();
    let before = watch(&mut observed, Duration::from_secs(1));
    assert!(before.pubacks.len() == 1, "{before:?}");

    // dev-a's own identity, from another process: it may not read dev-b's subtree...
    let (a, mut a_conn) = tls_client(broker.port, "dev-a-intruder", &ca, Some(&dev_a));
    a.subscribe(format!("{prefix}/devices/dev-b/#"), QoS::AtLeastOnce)
        .unwrap();
    a.subscribe(format!("{prefix}/devices/dev-a/#"), QoS::AtLeastOnce)
        .unwrap();
    // ...nor write it, nor forge artifacts; its own subtree it may write.
    for (topic, what) in [
        (
            format!("{prefix}/devices/dev-b/desired"),
            "forged desired state",
        ),
        (format!("{prefix}/devices/dev-b/reported"), "forged report"),
        (
            format!("{prefix}/artifacts/forged/manifest"),
            "forged manifest",
        ),
        (format!("{prefix}/devices/dev-a/probe"), "own topic"),
    ] {
        a.publish(topic, QoS::AtLeastOnce, false, what.as_bytes().to_vec())
            .unwrap();
    }
    let seen_by_a = watch(&mut a_conn, Duration::from_secs(2));
    let seen = watch(&mut observed, Duration::from_secs(1));

    assert!(seen_by_a.connected, "{seen_by_a:?}");
    assert!(
        !seen_by_a
            .publishes
            .iter()
            .any(|(t, _)| t.contains("/devices/dev-b/")),
        "dev-a read dev-b's topics: {:?}",
        seen_by_a.publishes
    );
    // Its own subtree it reads (the report its daemon keeps there, and its probe).
    assert!(
        seen_by_a
            .publishes
            .iter()
            .any(|(t, _)| t.ends_with("/devices/dev-a/reported")),
        "{:?}",
        seen_by_a.publishes
    );
    let from_a: Vec<&[u8]> = seen.publishes.iter().map(|(_, p)| &p[..]).collect();
    assert_eq!(
        from_a,
        [&b"own topic"[..]],
        "the observer saw {:?}",
        seen.publishes
    );
    // MQTT 5 tells the intruder so: the broker refuses each forged publish.
    use PubAckReason::{NotAuthorized, Success};
    assert_eq!(
        seen_by_a.pubacks,
        [NotAuthorized, NotAuthorized, NotAuthorized, Success]
    );
    assert!(
        seen_by_a
            .subacks
            .iter()
            .any(|c| matches!(c, SubscribeReasonCode::Success(_))),
        "{:?}",
        seen_by_a.subacks
    );

    // No certificate, no connection.
    let (_anon, mut anon_conn) = tls_client(broker.port, "anonymous", &ca, None);
    let anon = watch(&mut anon_conn, Duration::from_secs(3));
    assert!(!anon.connected && anon.refused, "{anon:?}");
}
