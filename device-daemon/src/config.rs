//! `ternd` configuration: TOML with built-in defaults (`ternd print-config`), overridden by flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the KServe v2 HTTP API. Loopback by default: the API is local.
    pub listen: SocketAddr,
    /// Model repository: `REPO/MODEL/VERSION/model.onnx` (+ optional `REPO/MODEL/config.toml`).
    pub repository: PathBuf,
    /// Largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Longest wait for a request body to arrive in full, in milliseconds (longer: 408). A
    /// client that stalls mid-body holds a connection and its buffer until then.
    pub body_timeout_ms: u64,
    /// If set, every request but health checks must carry `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// If set, the repository is rescanned this often and new versions are loaded and swapped
    /// in (old ones finish their requests first).
    pub poll_interval_ms: Option<u64>,
    /// Estimated bytes all loaded models may hold together; loading past it evicts the least
    /// recently used idle model, which reloads on its next request.
    pub memory_budget_bytes: Option<u64>,
    /// Defaults for models whose `config.toml` does not say otherwise.
    pub model_defaults: ModelConfig,
    /// Fleet updates and inference over MQTT, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Fleet>,
    /// Sensor streams run through models (`[[streams]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<Stream>,
}

/// A sensor stream: samples from `source`, windows of `window` samples every `hop`, each run
/// through `model`; results counted in `/metrics` and published to `topic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stream {
    pub name: String,
    /// `file:PATH` (lines `x,y,z` in g), `stdin`, or `i2c:/dev/i2c-N[@0x68]` (an MPU-6050).
    pub source: String,
    /// Samples per second read from the source (a file replays at this pace).
    pub rate_hz: f64,
    /// Samples per window; the model's input is `[N, 3, window]` (x/y/z × time).
    pub window: usize,
    /// Samples between two windows (`window` for no overlap).
    pub hop: usize,
    /// A model of the repository (its served version).
    pub model: String,
    /// MQTT topic for the results (JSON), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Broker for `topic`; the fleet's by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<String>,
}

/// Membership of a fleet: where the broker is, who this device is, whom it trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fleet {
    /// `mqtt://HOST:PORT`, or `mqtts://HOST:PORT` for TLS.
    pub mqtt: String,
    pub fleet: String,
    pub device_id: String,
    /// Public key files (`tern keygen`); manifests signed by any other key are refused.
    pub trust_keys: Vec<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificate(s) the broker's certificate must chain to (`mqtts://`; the system's
    /// roots when unset).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate and private key identifying this device to the broker (`mqtts://`).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Versions of a fleet-managed model kept on disk (the active one and rollback targets).
    pub keep_versions: usize,
    /// Chunk topics subscribed at once while downloading: the transfer's flow control.
    pub chunk_window: usize,
    /// Largest MQTT packet accepted (chunks, self-test vectors, inference requests).
    pub max_packet_bytes: u32,
    pub telemetry_interval_ms: u64,
    /// A download that makes no progress for this long re-subscribes its missing chunks.
    pub stall_timeout_ms: u64,
    /// After activation, the new version is watched this long; if the canary rule trips, the
    /// previous version is restored. 0 disables the watch.
    pub probation_ms: u64,
    pub canary_max_error_rate: Option<f64>,
    pub canary_max_p99_ms: Option<f64>,
    /// Requests the new version must have served before the canary rule judges it.
    pub canary_min_requests: u64,
    /// Answer inference requests published to the fleet and device inference topics.
    pub serve_inference: bool,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            mqtt: "mqtt://127.0.0.1:1883".into(),
            fleet: String::new(),
            device_id: String::new(),
            trust_keys: vec![],
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_versions: 2,
            chunk_window: 16,
            max_packet_bytes: 1 << 20,
            telemetry_interval_ms: 10_000,
            stall_timeout_ms: 5_000,
            probation_ms: 0,
            canary_max_error_rate: None,
            canary_max_p99_ms: None,
            canary_min_requests: 20,
            serve_inference: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".parse().expect("literal address"),
            repository: PathBuf::from("models"),
            max_body_bytes: 64 << 20,
            body_timeout_ms: 30_000,
            bearer_token: None,
            poll_interval_ms: None,
            memory_budget_bytes: None,
            model_defaults: ModelConfig::default(),
            fleet: None,
            streams: vec![],
        }
    }
}

/// Per-model settings, from `REPO/MODEL/config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Threads per forward pass.
    pub threads: usize,
    /// Run f32 computation in f16.
    pub f16: bool,
    /// Which versions to serve.
    pub version_policy: VersionPolicy,
    /// `.npy` files (relative to the model's directory), one per model input in order, run
    /// through every new version before it is marked ready; a failure fails the load.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warmup_inputs: Vec<String>,
    pub batching: Batching,
    /// Canary or shadow routing between two served versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
    /// Makes this repository entry a pipeline of other models instead of a model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
    /// Inputs fixed to a shape, e.g. `pin = { image = "N,3,224,224" }` (a name keeps that axis
    /// symbolic).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pin: std::collections::BTreeMap<String, PinnedShape>,
    /// `auto` (symbolic, or concrete plans when tract cannot keep the shapes symbolic),
    /// `symbolic`, `concrete` or `fastest`.
    pub plans: Plans,
    /// Concrete plans kept per model version.
    pub plan_cache: usize,
    /// `cpu`, or `cuda` (needs ternd built with `--features cuda`; runs on the CPU, with a
    /// warning, where no GPU is usable).
    pub device: DeviceName,
    /// tract's graph-wide axis rewrites while preparing; `false` prepares conv nets faster
    /// (quicker restarts and hot swaps; MobileNetV3 cold start 158 → 98 ms), see BENCHMARKS.md.
    pub axis_rewrites: bool,
    /// Directory where plan decisions are kept across restarts (`auto`: the probe run;
    /// `fastest`: timing both plans), e.g. `cache_dir = "/var/cache/ternd"` under
    /// `[model_defaults]`. Unset: every load decides again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Threads that prepare a model when it loads (unset: one per core). 1 keeps the other
    /// cores serving requests while a new version loads, at the cost of a slower load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepare_threads: Option<usize>,
}

/// An executor setting named in a config file (`plans = "concrete"`, `device = "cuda"`),
/// checked when the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    try_from = "String",
    into = "String",
    bound = "T: std::str::FromStr<Err = tern_core::Error> + std::fmt::Display + Clone"
)]
pub struct Named<T>(pub T);

/// A [`tern_core::PlanMode`] in a config file.
pub type Plans = Named<tern_core::PlanMode>;
/// A [`tern_core::Device`] in a config file.
pub type DeviceName = Named<tern_core::Device>;

impl<T: std::str::FromStr<Err = tern_core::Error>> TryFrom<String> for Named<T> {
    type Error = String;
    fn try_from(s: String) -> Result<Named<T>, String> {
        s.parse()
            .map(Named)
            .map_err(|e: tern_core::Error| e.to_string())
    }
}

impl<T: std::fmt::Display> From<Named<T>> for String {
    fn from(n: Named<T>) -> String {
        n.0.to_string()
    }
}

/// A pinned input shape in a config file: `"N,3,224,224"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PinnedShape {
    text: String,
    dims: Vec<Option<usize>>,
}

impl TryFrom<String> for PinnedShape {
    type Error = String;
    fn try_from(text: String) -> Result<PinnedShape, String> {
        let pin: tern_core::PinnedInput = format!("input={text}")
            .parse()
            .map_err(|e: tern_core::Error| e.to_string())?;
        Ok(PinnedShape {
            text,
            dims: pin.shape,
        })
    }
}

impl From<PinnedShape> for String {
    fn from(p: PinnedShape) -> String {
        p.text
    }
}

/// A DAG of models: each step maps tensors of the pipeline's namespace (its inputs and earlier
/// steps' outputs) to a model's inputs, and the model's outputs back into the namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Tensors the caller provides.
    pub inputs: Vec<String>,
    /// Tensors returned to the caller.
    pub outputs: Vec<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    pub model: String,
    /// A specific version; the served (or routed) one otherwise.
    pub version: Option<u64>,
    /// Model input name → namespace tensor.
    #[serde(default)]
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Model output name → namespace tensor.
    #[serde(default)]
    pub outputs: std::collections::BTreeMap<String, String>,
}

impl Pipeline {
    /// Orders the steps so each runs after the producers of its inputs; refuses unknown
    /// sources, tensors produced twice, cycles and outputs nothing produces.
    pub fn schedule(&self) -> Result<Vec<usize>, String> {
        let mut available: std::collections::BTreeSet<&str> =
            self.inputs.iter().map(String::as_str).collect();
        let mut producers = std::collections::BTreeMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            for t in step.outputs.values() {
                if available.contains(t.as_str()) || producers.insert(t.as_str(), i).is_some() {
                    return Err(format!(
                        "tensor `{t}` is produced twice (step `{}`)",
                        step.name
                    ));
                }
            }
        }
        let mut order = vec![];
        let mut done = vec![false; self.steps.len()];
        while order.len() < self.steps.len() {
            let next = (0..self.steps.len()).find(|&i| {
                !done[i]
                    && self.steps[i]
                        .inputs
                        .values()
                        .all(|src| available.contains(src.as_str()))
            });
            let Some(i) = next else {
                let stuck = (0..self.steps.len())
                    .find(|&i| !done[i])
                    .expect("some step left");
                let step = &self.steps[stuck];
                let missing = step
                    .inputs
                    .values()
                    .find(|src| !available.contains(src.as_str()))
                    .expect("blocked");
                return Err(if producers.contains_key(missing.as_str()) {
                    format!(
                        "steps form a cycle through `{missing}` (step `{}`)",
                        step.name
                    )
                } else {
                    format!(
                        "step `{}` reads `{missing}`, which no input or step provides",
                        step.name
                    )
                });
            };
            done[i] = true;
            order.push(i);
            available.extend(self.steps[i].outputs.values().map(String::as_str));
        }
        if let Some(o) = self
            .outputs
            .iter()
            .find(|o| !available.contains(o.as_str()))
        {
            return Err(format!("pipeline output `{o}` is produced by no step"));
        }
        Ok(order)
    }
}

/// On-device canary: `percent` of the traffic (sticky per request key) goes to `candidate`, the
/// rest to `stable`; with `shadow`, every request is answered by `stable` and mirrored to
/// `candidate` for comparison only. The candidate is rolled back (100% to stable) when, over the
/// last `window` requests it served, its error rate exceeds `max_error_rate` or its p99 latency
/// exceeds `max_p99_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    pub stable: u64,
    pub candidate: u64,
    #[serde(default)]
    pub percent: u8,
    #[serde(default)]
    pub shadow: bool,
    /// Request parameter (or `x-tern-route-key` header) whose value keeps a caller on one side.
    #[serde(default = "default_route_key")]
    pub key: String,
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<f64>,
    #[serde(default = "default_window")]
    pub window: usize,
}

fn default_route_key() -> String {
    "route_key".into()
}

fn default_window() -> usize {
    100
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            threads: 1,
            f16: false,
            version_policy: VersionPolicy::Latest { latest: 1 },
            warmup_inputs: vec![],
            batching: Batching::default(),
            routing: None,
            pipeline: None,
            pin: Default::default(),
            plans: Plans::default(),
            plan_cache: 8,
            device: DeviceName::default(),
            axis_rewrites: true,
            cache_dir: None,
            prepare_threads: None,
        }
    }
}

/// Triton's version policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VersionPolicy {
    /// The `latest` highest version numbers.
    Latest { latest: usize },
    /// Every version on disk.
    All { all: bool },
    /// These versions only.
    Specific { specific: Vec<u64> },
}

impl VersionPolicy {
    /// The versions to serve among those on disk (sorted ascending).
    pub fn select(&self, on_disk: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest { latest } => {
                on_disk[on_disk.len().saturating_sub(*latest)..].to_vec()
            }
            VersionPolicy::All { .. } => on_disk.to_vec(),
            VersionPolicy::Specific { specific } => on_disk
                .iter()
                .copied()
                .filter(|v| specific.contains(v))
                .collect(),
        }
    }
}

/// Dynamic batching knobs (see `tern_core::BatchConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Batching {
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_size: usize,
    pub timeout_ms: Option<u64>,
    pub priority_levels: usize,
    pub instances: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch_size: 8,
            max_queue_delay_us: 500,
            preferred_batch_sizes: vec![],
            max_queue_size: 256,
            timeout_ms: None,
            priority_levels: 1,
            instances: 1,
        }
    }
}

impl Batching {
    pub fn to_core(&self) -> tern_core::BatchConfig {
        tern_core::BatchConfig {
            max_batch_size: self.max_batch_size,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
            preferred_batch_sizes: self.preferred_batch_sizes.clone(),
            max_queue_size: self.max_queue_size,
            default_timeout: self.timeout_ms.map(Duration::from_millis),
            priority_levels: self.priority_levels,
            instances: self.instances,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration {path}: {message}")]
    Parse { path: String, message: String },
}

impl Config {
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

impl ModelConfig {
    /// The executor options this configuration asks for (one place for repository loads and
    /// fleet validation, so a candidate is validated exactly as it will be served).
    pub fn model_options(&self) -> tern_core::ModelOptions {
        tern_core::ModelOptions {
            threads: self.threads,
            precision: if self.f16 {
                tern_core::Precision::F16
            } else {
                tern_core::Precision::AsStored
            },
            pinned: self
                .pin
                .iter()
                .map(|(name, shape)| tern_core::PinnedInput {
                    name: name.clone(),
                    shape: shape.dims.clone(),
                })
                .collect(),
            plans: self.plans.0,
            // Concrete plans are prepared ahead for the batches the batcher forms.
            batch_sizes: std::iter::successors(Some(1usize), |b| b.checked_mul(2))
                .take_while(|&b| b < self.batching.max_batch_size)
                .chain([self.batching.max_batch_size.max(1)])
                .collect(),
            plan_cache: self.plan_cache.max(1),
            device: self.device.0,
            axis_rewrites: self.axis_rewrites,
            cache_dir: self.cache_dir.clone(),
            prepare_threads: self.prepare_threads,
            ..Default::default()
        }
    }

    /// A model's `config.toml`, layered over `defaults`: keys it omits keep the daemon's values.
    pub fn load_over(
        defaults: &ModelConfig,
        path: &std::path::Path,
    ) -> Result<ModelConfig, ConfigError> {
        if !path.exists() {
            return Ok(defaults.clone());
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parse = |e: toml::de::Error| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut base = toml::Table::try_from(defaults).expect("config serialises");
        let over: toml::Table = toml::from_str(&text).map_err(parse)?;
        merge(&mut base, over);
        toml::Value::Table(base).try_into().map_err(parse)
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) if k != "version_policy" => {
                merge(b, o)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_defaults_parse_back_to_the_defaults() {
        let c = Config::default();
        assert_eq!(Config::from_toml(&c.to_toml(), "x").unwrap(), c);
    }

    #[test]
    fn pipelines_are_scheduled_in_dependency_order_and_checked() {
        let step = |name: &str, ins: &[(&str, &str)], outs: &[(&str, &str)]| Step {
            name: name.into(),
            model: "m".into(),
            version: None,
            inputs: ins
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            outputs: outs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        let p = Pipeline {
            inputs: vec!["x".into()],
            outputs: vec!["z".into()],
            steps: vec![
                step("second", &[("i", "y")], &[("o", "z")]),
                step("first", &[("i", "x")], &[("o", "y")]),
            ],
        };
        assert_eq!(p.schedule().unwrap(), [1, 0]);
        let cyclic = Pipeline {
            steps: vec![
                step("a", &[("i", "y")], &[("o", "z")]),
                step("b", &[("i", "z")], &[("o", "y")]),
            ],
            ..p.clone()
        };
        assert!(cyclic.schedule().unwrap_err().contains("cycle"));
        let dangling = Pipeline {
            steps: vec![step("a", &[("i", "nope")], &[("o", "z")])],
            ..p.clone()
        };
        assert!(dangling.schedule().unwrap_err().contains("reads `nope`"));
        let unproduced = Pipeline {
            outputs: vec!["w".into()],
            ..p
        };
        assert!(unproduced
            .schedule()
            .unwrap_err()
            .contains("`w` is produced by no step"));
    }

    #[test]
    fn pins_and_plan_modes_reach_the_executor_and_bad_ones_name_the_file() {
        let text = "[model_defaults]\nplans = \"concrete\"\npin = { x = \"N,3,16,16\" }\n\
                    prepare_threads = 1\n\
                    [model_defaults.batching]\nmax_batch_size = 12\n";
        let c = Config::from_toml(text, "ternd.toml").unwrap();
        let o = c.model_defaults.model_options();
        assert_eq!(o.plans, tern_core::PlanMode::Concrete);
        assert_eq!(o.prepare_threads, Some(1));
        assert_eq!(o.pinned[0].name, "x");
        assert_eq!(o.pinned[0].shape, [None, Some(3), Some(16), Some(16)]);
        assert_eq!(o.batch_sizes, [1, 2, 4, 8, 12]);
        assert_eq!(Config::from_toml(&c.to_toml(), "x").unwrap(), c);
        for bad in [
            "[model_defaults]\nplans = \"quick\"\n",
            "[model_defaults]\npin = { x = \"1,,3\" }\n",
        ] {
            let e = Config::from_toml(bad, "ternd.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("ternd.toml"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_not_silence() {
        let e = Config::from_toml("listn = \"1.2.3.4:1\"", "ternd.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ternd.toml") && e.contains("listn"), "{e}");
    }

    #[test]
    fn a_model_config_overrides_only_what_it_names() {
        let dir = std::env::temp_dir().join(format!("ternd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.toml");
        std::fs::write(
            &p,
            "[batching]\nmax_batch_size = 32\n[version_policy]\nall = true\n",
        )
        .unwrap();
        let c = ModelConfig::load_over(&ModelConfig::default(), &p).unwrap();
        assert_eq!(c.batching.max_batch_size, 32);
        assert_eq!(c.batching.max_queue_delay_us, 500);
        assert_eq!(c.version_policy, VersionPolicy::All { all: true });
        assert_eq!(c.version_policy.select(&[1, 2, 3]), [1, 2, 3]);
        assert_eq!(
            VersionPolicy::Latest { latest: 2 }.select(&[1, 2, 3]),
            [2, 3]
        );
        assert_eq!(
            VersionPolicy::Specific {
                specific: vec![1, 9]
            }
            .select(&[1, 2]),
            [1]
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
