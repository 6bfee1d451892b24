//! Sensor streams: samples from a source (an accelerometer on I2C, a file, stdin) gathered
//! into sliding windows, each window run through a served model, each result counted in the
//! metrics and published to an MQTT topic.
//!
//! One thread per stream: it paces the source at the configured rate, so a file replays as the
//! sensor produced it. The window and the input tensor are allocated once; per window the
//! model runs through the same batcher as HTTP requests, so streams and API share the model.

use std::io::BufRead;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tern_core::{Dim, RequestOptions, TensorView};
use tern_sensors::{Accelerometer, Window};

use crate::config::Stream;
use crate::http::AppState;

/// Longest window a stream may configure (its ring is this big).
pub const MAX_WINDOW: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream `{name}`: {message}")]
    Config { name: String, message: String },
    #[error("stream `{0}`: publishing needs an MQTT broker: set `mqtt` or configure [fleet]")]
    NoBroker(String),
    #[error(transparent)]
    Mqtt(#[from] crate::fleet::FleetError),
}

/// Where samples come from.
enum Source {
    /// `x,y,z` lines in g, from a file or stdin.
    Lines(Box<dyn BufRead + Send>),
    Sensor(Box<dyn Accelerometer<Error = String> + Send>),
}

/// Any accelerometer, with its error as text (the thread only logs it).
struct Described<A>(A);

impl<A: Accelerometer> Accelerometer for Described<A> {
    type Error = String;
    fn read(&mut self) -> Result<[f32; 3], String> {
        self.0.read().map_err(|e| format!("{e:?}"))
    }
}

impl Source {
    fn open(spec: &str) -> Result<Source, String> {
        if spec == "stdin" {
            return Ok(Source::Lines(Box::new(std::io::BufReader::new(
                std::io::stdin(),
            ))));
        }
        if let Some(path) = spec.strip_prefix("file:") {
            let f = std::fs::File::open(path).map_err(|e| format!("opening {path}: {e}"))?;
            return Ok(Source::Lines(Box::new(std::io::BufReader::new(f))));
        }
        if let Some(rest) = spec.strip_prefix("i2c:") {
            let (bus, address) = match rest.split_once('@') {
                Some((bus, a)) => (
                    bus,
                    u8::from_str_radix(a.trim_start_matches("0x"), 16)
                        .map_err(|_| format!("I2C address `{a}` is not hex (e.g. 0x68)"))?,
                ),
                None => (rest, 0x68),
            };
            return open_i2c(bus, address);
        }
        Err(format!(
            "source `{spec}`: expected `file:PATH`, `stdin` or `i2c:/dev/i2c-N[@0x68]`"
        ))
    }

    /// The next sample; `None` at the end of a file.
    fn read(&mut self) -> Result<Option<[f32; 3]>, String> {
        match self {
            Source::Sensor(s) => s.read().map(Some),
            Source::Lines(r) => {
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                        return Ok(None);
                    }
                    let text = line.trim();
                    if !text.is_empty() && !text.starts_with('#') {
                        return parse_sample(text).map(Some);
                    }
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn open_i2c(bus: &str, address: u8) -> Result<Source, String> {
    let imu = tern_sensors::linux::open(bus, address).map_err(|e| e.to_string())?;
    Ok(Source::Sensor(Box::new(Described(imu))))
}

#[cfg(not(target_os = "linux"))]
fn open_i2c(bus: &str, _: u8) -> Result<Source, String> {
    Err(format!("{bus}: I2C sources need Linux (/dev/i2c-N)"))
}

fn parse_sample(line: &str) -> Result<[f32; 3], String> {
    let mut it = line.split(',').map(|v| v.trim().parse::<f32>());
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(Ok(x)), Some(Ok(y)), Some(Ok(z)), None)
            if x.is_finite() && y.is_finite() && z.is_finite() =>
        {
            Ok([x, y, z])
        }
        _ => Err(format!(
            "`{line}` is not a sample `x,y,z` of finite numbers"
        )),
    }
}

/// Checks every stream and starts its thread. Sources are opened by the threads, so a sensor
/// that is not there yet is retried rather than failing the daemon.
pub fn start(streams: &[Stream], state: Arc<AppState>) -> Result<(), StreamError> {
    for s in streams {
        let bad = |message: String| StreamError::Config {
            name: s.name.clone(),
            message,
        };
        if s.window == 0 || s.window > MAX_WINDOW {
            return Err(bad(format!("window must be 1..={MAX_WINDOW} samples")));
        }
        if s.hop == 0 || s.hop > s.window {
            return Err(bad("hop must be 1..=window samples".into()));
        }
        if !(s.rate_hz.is_finite() && s.rate_hz > 0.0) {
            return Err(bad("rate_hz must be a positive number".into()));
        }
        crate::repository::check_name(&s.model).map_err(|e| bad(e.to_string()))?;
        let publisher = match &s.topic {
            None => None,
            Some(topic) => {
                let url = s
                    .mqtt
                    .clone()
                    .or_else(|| state.config.fleet.as_ref().map(|f| f.mqtt.clone()))
                    .ok_or_else(|| StreamError::NoBroker(s.name.clone()))?;
                Some((publisher(&url, &s.name)?, topic.clone()))
            }
        };
        let (stream, state) = (s.clone(), state.clone());
        std::thread::Builder::new()
            .name(format!("stream-{}", s.name))
            .spawn(move || run(&stream, &state, publisher))
            .map_err(|e| bad(format!("starting its thread: {e}")))?;
    }
    Ok(())
}

fn publisher(url: &str, stream: &str) -> Result<AsyncClient, StreamError> {
    let id = format!("ternd-stream-{stream}-{}", std::process::id());
    let options = crate::fleet::mqtt_options(url, &id, 1 << 20, false, &Default::default())?;
    let (client, mut events) = AsyncClient::new(options, 64);
    // The event loop does the (re)connecting; results published while the broker is away are
    // dropped (QoS 0: a sensor result is stale by the time it would be re-sent).
    tokio::spawn(async move {
        loop {
            if let Err(e) = events.poll().await {
                log::debug!("stream MQTT: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    Ok(client)
}

fn run(s: &Stream, state: &AppState, publisher: Option<(AsyncClient, String)>) {
    let counters = &state.metrics.streams;
    let count = |outcome: &str| {
        counters
            .windows
            .get_or_create(&vec![
                ("stream".to_string(), s.name.clone()),
                ("outcome".to_string(), outcome.to_string()),
            ])
            .inc();
    };
    while !state.ready.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut source = loop {
        match Source::open(&s.source) {
            Ok(source) => break source,
            Err(e) => {
                log::warn!("stream {}: {e}; retrying in 5 s", s.name);
                count("source_error");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    let Ok(mut window) = Window::<MAX_WINDOW>::new(s.window, s.hop) else {
        return; // checked by start()
    };
    let shape = [1, 3, s.window];
    let mut tensor = vec![0f32; 3 * s.window];
    let period = Duration::from_secs_f64(1.0 / s.rate_hz);
    let mut due = Instant::now();
    let mut seq = 0u64;
    log::info!(
        "stream {}: {} at {} Hz, windows of {} every {} samples → {}",
        s.name,
        s.source,
        s.rate_hz,
        s.window,
        s.hop,
        s.model
    );
    loop {
        // Paced like the sensor: a replayed file keeps its timing; a late read does not burst.
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        due = due.max(now) + period;
        let sample = match source.read() {
            Ok(Some(sample)) => sample,
            Ok(None) => {
                log::info!("stream {}: the source ended after {seq} windows", s.name);
                return;
            }
            Err(e) => {
                log::warn!("stream {}: bad sample: {e}", s.name);
                count("bad_sample");
                continue;
            }
        };
        counters
            .samples
            .get_or_create(&vec![("stream".to_string(), s.name.clone())])
            .inc();
        if !window.push(sample) {
            continue;
        }
        window.write_channel_major(&mut tensor);
        seq += 1;
        let result = infer(state, s, &shape, &tensor, seq);
        match result {
            Ok(json) => {
                count("ok");
                if let Some((client, topic)) = &publisher {
                    if let Err(e) = client.try_publish(topic.clone(), QoS::AtMostOnce, false, json)
                    {
                        log::debug!("stream {}: not published: {e}", s.name);
                    }
                }
            }
            Err(e) => {
                log::warn!("stream {}: window {seq}: {e}", s.name);
                count("error");
            }
        }
    }
}

/// Runs one window and returns the result as JSON: stream, sequence number, model version and
/// every output (shape and values).
fn infer(
    state: &AppState,
    s: &Stream,
    shape: &[usize; 3],
    tensor: &[f32],
    seq: u64,
) -> Result<Vec<u8>, String> {
    let loaded = state.repo.get(&s.model, None).map_err(|e| e.to_string())?;
    let info = loaded.model.info();
    let fits = info.inputs.len() == 1
        && info.inputs[0].shape.len() == 3
        && matches!(info.inputs[0].shape[0], Dim::Batch(_) | Dim::Fixed(1))
        && info.inputs[0].shape[1] == Dim::Fixed(3)
        && matches!(info.inputs[0].shape[2], Dim::Fixed(n) if n == s.window);
    if !fits {
        return Err(format!(
            "model `{}` must take one f32 input [N,3,{}] (axes x/y/z × time); its inputs are {:?}",
            s.model, s.window, info.inputs
        ));
    }
    let response = loaded
        .batcher
        .infer(
            &[TensorView::new(shape, tensor)],
            &RequestOptions::default(),
        )
        .map_err(|e| e.to_string())?;
    let mut outputs = serde_json::Map::new();
    for (ix, o) in info.outputs.iter().enumerate() {
        let Some(v) = response.get(ix) else { continue };
        let values: Vec<f64> = match v.to_vec::<f32>() {
            Ok(f) => f.into_iter().map(f64::from).collect(),
            Err(_) => continue,
        };
        outputs.insert(
            o.name.clone(),
            serde_json::json!({"shape": v.shape(), "data": values}),
        );
    }
    let doc = serde_json::json!({
        "stream": s.name,
        "seq": seq,
        "model": s.model,
        "model_version": loaded.version,
        "outputs": outputs,
    });
    serde_json::to_vec(&doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_bad_lines_say_why() {
        assert_eq!(parse_sample("0.1, -0.2,1").unwrap(), [0.1, -0.2, 1.0]);
        for bad in ["1,2", "1,2,3,4", "a,b,c", "1,NaN,2", "1,inf,2"] {
            assert!(parse_sample(bad).unwrap_err().contains(bad));
        }
    }

    #[test]
    fn sources_name_what_they_accept() {
        let e = Source::open("udp:9000").err().unwrap();
        assert!(e.contains("file:PATH") && e.contains("i2c:"), "{e}");
        let e = Source::open("i2c:/dev/i2c-1@zz").err().unwrap();
        assert!(e.contains("hex"), "{e}");
        let e = Source::open("file:/nonexistent/samples.csv").err().unwrap();
        assert!(e.contains("/nonexistent/samples.csv"), "{e}");
    }
}
