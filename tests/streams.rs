//! Sensor streams end to end: a real `ternd` replays a recorded accelerometer stream (still,
//! then moving) through the bundled activity model, and a plain MQTT client on Mosquitto
//! receives one result per window; `/metrics` counts them.

mod common;

use std::time::{Duration, Instant};

use common::{repo, Daemon};

const SAMPLES: usize = 400; // models/testdata/activity_stream.csv: 200 still, then 200 moving
const WINDOW: usize = 32;
const HOP: usize = 16;

#[test]
fn a_replayed_sensor_stream_is_classified_window_by_window_over_mqtt() {
    assert!(
        std::net::TcpStream::connect("127.0.0.1:1883").is_ok(),
        "Mosquitto is not listening on 127.0.0.1:1883 (.ci/run installs and starts it)"
    );
    let topic = format!("tern-test/streams/{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("tern-streams-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            r#"repository = "{repo}"

[[streams]]
name = "wrist"
source = "file:{repo}/testdata/activity_stream.csv"
rate_hz = 400.0
window = {WINDOW}
hop = {HOP}
model = "activity"
topic = "{topic}"
mqtt = "mqtt://127.0.0.1:1883"
"#,
            repo = repo().join("models").display()
        ),
    )
    .unwrap();

    // Subscribed before the daemon starts: results are not retained.
    let mut o =
        rumqttc::MqttOptions::new(format!("streams-{}", std::process::id()), "127.0.0.1", 1883);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(o, 64);
    client.subscribe(&topic, rumqttc::QoS::AtMostOnce).unwrap();
    for ev in conn.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) = ev {
            break;
        }
    }

    let daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
    let expected = (SAMPLES - WINDOW) / HOP + 1;
    let mut results = vec![];
    let deadline = Instant::now() + Duration::from_secs(30);
    while results.len() < expected && Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                results.push(serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap());
            }
            Ok(Err(e)) => panic!("MQTT: {e}"),
            _ => {}
        }
    }
    assert_eq!(results.len(), expected, "one result per window");
    for r in &results {
        let seq = r["seq"].as_u64().unwrap() as usize;
        assert_eq!(r["stream"], "wrist");
        assert_eq!(r["model"], "activity");
        let probs: Vec<f64> = r["outputs"]["probs"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 2);
        // Window `seq` covers samples [(seq-1)·hop, (seq-1)·hop + window).
        let start = (seq - 1) * HOP;
        let moving = probs[1] > probs[0];
        if start + WINDOW <= SAMPLES / 2 {
            assert!(!moving, "window {seq} is all still: {probs:?}");
        } else if start >= SAMPLES / 2 {
            assert!(moving, "window {seq} is all moving: {probs:?}");
        }
    }
    let (_, metrics) = daemon.get("/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tern_stream_windows_total") && l.contains("outcome=\"ok\""))
        .unwrap_or_else(|| panic!("no stream counter in:\n{metrics}"));
    assert!(line.ends_with(&format!(" {expected}")), "{line}");
    assert!(metrics.contains(&format!(
        "tern_stream_samples_total{{stream=\"wrist\"}} {SAMPLES}"
    )));
    daemon.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stream_without_a_broker_or_with_a_bad_window_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("tern-streams-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (stream, why) in [
        (
            "window = 32\nhop = 64\ntopic = \"t\"\nmqtt = \"mqtt://127.0.0.1:1883\"",
            "hop",
        ),
        ("window = 32\nhop = 16\ntopic = \"t\"", "MQTT broker"),
    ] {
        let config = dir.join("bad.toml");
        std::fs::write(
            &config,
            format!(
                "repository = \"{}\"\n[[streams]]\nname = \"s\"\nsource = \"stdin\"\nrate_hz = 50.0\nmodel = \"activity\"\n{stream}\n",
                repo().join("models").display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(common::binary("ternd"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--config",
                config.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("stream `s`") && err.contains(why), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
