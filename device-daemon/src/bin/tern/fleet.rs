//! Fleet-manager commands: keys, pushes, rollouts, rollbacks, status and garbage collection.
//! Everything lives in retained MQTT messages (SPEC.md): these commands only read and write
//! them, so no fleet server runs anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tern_daemon::fleet::{mqtt_options, BrokerAuth, Topics};
use tern_proto::{DesiredModel, DesiredState, Frame, Manifest, UpdateState};
use tern_update::SecretKey;
use tokio::sync::mpsc;

#[derive(Args, Clone)]
pub struct Broker {
    /// MQTT broker of the fleet (`mqtts://` for TLS).
    #[arg(long, env = "TERN_MQTT", default_value = "mqtt://127.0.0.1:1883")]
    mqtt: String,
    /// PEM CA certificate(s) the broker's certificate must chain to (mqtts://; default: the
    /// system's roots).
    #[arg(long, env = "TERN_MQTT_CA")]
    ca_file: Option<PathBuf>,
    /// PEM certificate identifying the fleet manager to the broker (mqtts://).
    #[arg(long, env = "TERN_MQTT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key of --client-cert (PEM).
    #[arg(long, env = "TERN_MQTT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// MQTT username (with --password).
    #[arg(long, env = "TERN_MQTT_USERNAME", requires = "password")]
    username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "TERN_MQTT_PASSWORD", requires = "username")]
    password: Option<String>,
    /// Fleet name.
    #[arg(long, env = "TERN_FLEET")]
    fleet: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Create an ed25519 signing key: KEY (secret, mode 0600) and KEY.pub (give it to devices).
    Keygen {
        /// Path of the secret key file.
        #[arg(long, default_value = "tern.key")]
        out: PathBuf,
    },
    /// Sign a model and publish it to the fleet: chunks, manifest, then the desired state.
    Push(PushArgs),
    /// Sign a model without publishing it: writes OUT_DIR/manifest.tern (and selftest.tern)
    /// for apps that install models through the bindings' model store.
    Sign {
        #[command(flatten)]
        sign: SignArgs,
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Point the fleet (or one device) at a version already pushed, for a share of devices.
    Rollout {
        model: String,
        version: u32,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        broker: Broker,
    },
    /// Order devices back to an earlier version (allowed to go down).
    Rollback {
        model: String,
        /// The version to return to.
        #[arg(long)]
        to: u32,
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        broker: Broker,
    },
    /// Devices × models × version × state, from the devices' retained reports.
    Status {
        /// Keep printing reports as they change.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        broker: Broker,
    },
    /// Delete retained artifacts that no desired state references.
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        broker: Broker,
    },
}

/// What a signed release is made of; shared by `push` and `sign`.
#[derive(Args)]
pub struct SignArgs {
    /// The ONNX file.
    file: PathBuf,
    #[arg(long)]
    model: String,
    #[arg(long)]
    version: u32,
    /// Secret key from `tern keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Chunk payload bytes (at most 65536; AWS IoT allows 128 KiB messages).
    #[arg(long, default_value_t = tern_update::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// NAME=FILE.npy (or FILE.npy): record a self-test vector by running the model here;
    /// devices must reproduce its outputs before serving the model.
    #[arg(long = "selftest-input")]
    selftest_inputs: Vec<String>,
    /// Self-test tolerance: |got - expected| <= atol + rtol * |expected|.
    #[arg(long, default_value_t = 1e-3)]
    selftest_atol: f32,
    #[arg(long, default_value_t = 1e-3)]
    selftest_rtol: f32,
}

#[derive(Args)]
pub struct PushArgs {
    #[command(flatten)]
    sign: SignArgs,
    /// Only this device (a per-device desired state) instead of the whole fleet.
    #[arg(long)]
    device: Option<String>,
    /// Staged rollout: devices whose cohort (stable hash of the id, 0..100) is below this.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    percent: u8,
    /// Publish the artifact only; leave the desired state alone (roll out later).
    #[arg(long)]
    no_rollout: bool,
    #[command(flatten)]
    broker: Broker,
}

pub fn run(cmd: FleetCommand) -> Result<()> {
    match &cmd {
        FleetCommand::Keygen { out } => return keygen(out),
        FleetCommand::Sign { sign, out_dir } => return sign_to_files(sign, out_dir),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            FleetCommand::Keygen { .. } | FleetCommand::Sign { .. } => {
                unreachable!("handled above")
            }
            FleetCommand::Push(args) => push(args).await,
            FleetCommand::Rollout {
                model,
                version,
                percent,
                device,
                broker,
            } => point(&broker, &model, version, percent, device.as_deref(), false).await,
            FleetCommand::Rollback {
                model,
                to,
                device,
                broker,
            } => point(&broker, &model, to, 100, device.as_deref(), true).await,
            FleetCommand::Status { watch, broker } => status(&broker, watch).await,
            FleetCommand::Gc { dry_run, broker } => gc(&broker, dry_run).await,
        }
    })
}

fn keygen(out: &Path) -> Result<()> {
    let key = SecretKey::generate()?;
    let public = out.with_extension("pub");
    if public.exists() {
        bail!("{} exists; not overwriting", public.display());
    }
    key.save(out)?;
    std::fs::write(&public, key.public().to_text())
        .with_context(|| format!("writing {}", public.display()))?;
    println!(
        "secret key {} (keep it off devices), public key {} (key id {})",
        out.display(),
        public.display(),
        key.public().id_hex()
    );
    Ok(())
}

/// What the connection task reports.
enum Ev {
    Publish(String, Bytes),
    SubAck,
    PubAck,
}

/// A short-lived MQTT 5 session of the CLI.
struct Conn {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Ev>,
    topics: Topics,
}

impl Conn {
    async fn open(broker: &Broker) -> Result<Conn> {
        if !tern_daemon::fleet::topics::valid_id(&broker.fleet) {
            bail!("invalid fleet name `{}`", broker.fleet);
        }
        let id = format!(
            "tern-cli-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let auth = BrokerAuth {
            ca_file: broker.ca_file.as_deref(),
            client_cert: broker.client_cert.as_deref(),
            client_key: broker.client_key.as_deref(),
            credentials: broker.username.as_deref().zip(broker.password.as_deref()),
        };
        let mut options = mqtt_options(&broker.mqtt, &id, 1 << 20, false, &auth)?;
        // Bounded in-flight publishes: a 64 MiB push must not sit in memory all at once.
        options.set_outgoing_inflight_upper_limit(32);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Ev::Publish(String::from_utf8_lossy(&p.topic).into_owned(), p.payload)
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => Ev::SubAck,
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(_) => continue,
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e.to_string()));
                            return;
                        }
                        // Mid-command: rumqttc resends unacknowledged publishes on reconnect.
                        log::warn!("MQTT connection: {e}; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!("cannot connect to {}: {e}", broker.mqtt),
            _ => bail!("cannot connect to {}: timed out", broker.mqtt),
        }
        Ok(Conn {
            client,
            rx,
            topics: Topics::new(&broker.fleet),
        })
    }

    /// The retained messages matching `filter`: subscribe, then collect until the broker has
    /// been quiet for a moment after its SUBACK.
    async fn retained(&mut self, filter: String) -> Result<Vec<(String, Bytes)>> {
        self.client
            .subscribe(filter.clone(), QoS::AtLeastOnce)
            .await?;
        let mut out = vec![];
        let mut acked = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let quiet = if acked {
                Duration::from_millis(400)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match tokio::time::timeout(quiet, self.rx.recv()).await {
                Ok(Some(Ev::SubAck)) => acked = true,
                Ok(Some(Ev::Publish(t, p))) if !p.is_empty() => out.push((t, p)),
                Ok(Some(_)) => {}
                Ok(None) => bail!("connection closed"),
                Err(_) if acked => break,
                Err(_) => bail!("the broker did not acknowledge the subscription to {filter}"),
            }
        }
        self.client.unsubscribe(filter).await?;
        Ok(out)
    }

    /// Publishes retained QoS 1 messages and waits until the broker acknowledged all of them.
    async fn publish_all(
        &mut self,
        messages: impl Iterator<Item = (String, Vec<u8>)> + Send + 'static,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        let client = self.client.clone();
        let (count_tx, mut count_rx) = mpsc::unbounded_channel::<u64>();
        let sender = tokio::spawn(async move {
            for (topic, payload) in messages {
                let n = payload.len() as u64;
                client
                    .publish(topic, QoS::AtLeastOnce, true, payload)
                    .await?;
                let _ = count_tx.send(n);
            }
            Ok::<_, rumqttc::v5::ClientError>(())
        });
        let (mut sent, mut acked) = (vec![], 0usize);
        let mut done_sending = false;
        loop {
            if done_sending && acked >= sent.len() {
                break;
            }
            tokio::select! {
                n = count_rx.recv(), if !done_sending => match n {
                    Some(n) => sent.push(n),
                    None => done_sending = true,
                },
                ev = self.rx.recv() => match ev {
                    Some(Ev::PubAck) => {
                        if let (Some(p), Some(n)) = (progress, sent.get(acked)) {
                            p.inc(*n);
                        }
                        acked += 1;
                    }
                    Some(_) => {}
                    None => bail!("connection closed"),
                },
                _ = tokio::time::sleep(Duration::from_secs(60)) => {
                    bail!("the broker stopped acknowledging ({acked} of {} messages)", sent.len())
                }
            }
        }
        sender.await??;
        Ok(())
    }

    async fn desired(&mut self, device: Option<&str>) -> Result<DesiredState> {
        let topic = match device {
            Some(d) => self.topics.device_desired(d),
            None => self.topics.desired(),
        };
        let found = self.retained(topic.clone()).await?;
        match found.iter().find(|(t, _)| *t == topic) {
            None => Ok(DesiredState {
                generation: 0,
                models: Default::default(),
            }),
            Some((_, bytes)) => match tern_proto::decode(bytes) {
                Ok(Frame::Desired(d)) => Ok(d),
                _ => bail!("the retained desired state on {topic} is malformed"),
            },
        }
    }

    async fn set_desired(&mut self, device: Option<&str>, desired: &DesiredState) -> Result<()> {
        let topic = match device {
            Some(d) => self.topics.device_desired(d),
            None => self.topics.desired(),
        };
        let mut buf = vec![0u8; 2048];
        let n = tern_proto::encode(&Frame::Desired(desired.clone()), &mut buf)
            .map_err(|e| anyhow!("encoding the desired state: {e}"))?;
        buf.truncate(n);
        self.publish_all(std::iter::once((topic, buf)), None).await
    }

    async fn manifests(&mut self) -> Result<Vec<Manifest>> {
        let filter = self.topics.all_manifests();
        Ok(self
            .retained(filter)
            .await?
            .into_iter()
            .filter_map(|(_, b)| tern_update::decode_manifest(&b).ok())
            .collect())
    }
}

/// Sets `model` to `version` (with `artifact`) in a desired state, bumping its generation.
fn with_model(
    mut desired: DesiredState,
    model: &str,
    version: u32,
    artifact: [u8; 32],
    percent: u8,
    allow_downgrade: bool,
) -> Result<DesiredState> {
    let entry = DesiredModel {
        name: model
            .try_into()
            .map_err(|_| anyhow!("model name `{model}` is longer than 32 bytes"))?,
        version,
        artifact,
        percent,
        allow_downgrade,
    };
    match desired.models.iter_mut().find(|m| m.name == entry.name) {
        Some(m) => *m = entry,
        None => desired
            .models
            .push(entry)
            .map_err(|_| anyhow!("a desired state holds at most 8 models"))?,
    }
    desired.generation += 1;
    Ok(desired)
}

/// A signed release: the model's bytes, its manifest and its encoded self-test vector.
struct Release {
    bytes: Vec<u8>,
    manifest: Manifest,
    selftest: Option<Vec<u8>>,
    key_id: String,
}

fn release(p: &SignArgs) -> Result<Release> {
    let key = SecretKey::load(&p.key)?;
    let bytes = std::fs::read(&p.file).with_context(|| format!("reading {}", p.file.display()))?;
    // A model that does not load here will not load on a device: refuse it now.
    let model = tern_core::Model::from_bytes(&bytes, &tern_core::ModelOptions::default())
        .with_context(|| format!("{} is not a model Tern can run", p.file.display()))?;
    let selftest = if p.selftest_inputs.is_empty() {
        None
    } else {
        let inputs = super::read_inputs(&model, &p.selftest_inputs)?;
        let st = tern_daemon::fleet::validate::record_selftest(
            &model,
            &inputs,
            p.selftest_atol,
            p.selftest_rtol,
        )
        .map_err(|e| anyhow!("recording the self-test vector: {e}"))?;
        Some(st.encode())
    };
    let manifest = tern_update::sign(
        &p.model,
        p.version,
        &bytes,
        p.chunk_size,
        selftest.as_deref().map(tern_update::sha256),
        &key,
    )?;
    Ok(Release {
        bytes,
        manifest,
        selftest,
        key_id: key.public().id_hex(),
    })
}

fn sign_to_files(p: &SignArgs, out_dir: &Path) -> Result<()> {
    let r = release(p)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let manifest = out_dir.join(tern_update::install::MANIFEST_FILE);
    std::fs::write(&manifest, tern_update::encode_manifest(&r.manifest))
        .with_context(|| format!("writing {}", manifest.display()))?;
    if let Some(st) = &r.selftest {
        let file = out_dir.join(tern_update::install::SELFTEST_FILE);
        std::fs::write(&file, st).with_context(|| format!("writing {}", file.display()))?;
    }
    println!(
        "signed {} version {} ({} bytes, sha256 {}, key {}): {}{}",
        p.model,
        p.version,
        r.bytes.len(),
        tern_update::hex(&r.manifest.body.sha256),
        r.key_id,
        manifest.display(),
        if r.selftest.is_some() {
            " with selftest.tern"
        } else {
            ""
        }
    );
    Ok(())
}

async fn push(p: PushArgs) -> Result<()> {
    let started = Instant::now();
    let Release {
        bytes,
        manifest,
        selftest,
        key_id,
    } = release(&p.sign)?;
    let sha = manifest.body.sha256;
    let mut conn = Conn::open(&p.broker).await?;
    let topics = conn.topics.clone();
    let progress = (!p.broker.json).then(|| {
        let bar = indicatif::ProgressBar::new(bytes.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} v{}", p.sign.model, p.sign.version));
        bar
    });
    if let Some(st) = selftest {
        conn.publish_all(std::iter::once((topics.selftest(&sha), st)), None)
            .await?;
    }
    let chunk_size = p.sign.chunk_size as usize;
    let count = manifest.body.chunk_count;
    let data = std::sync::Arc::new(bytes);
    let (d, t) = (data.clone(), topics.clone());
    let chunks = (0..count).map(move |i| {
        let start = i as usize * chunk_size;
        let piece = &d[start..(start + chunk_size).min(d.len())];
        let mut buf = vec![0u8; piece.len() + 64];
        let n = tern_proto::encode(
            &Frame::Chunk(tern_proto::Chunk {
                artifact: sha,
                index: i,
                data: piece,
            }),
            &mut buf,
        )
        .expect("a chunk fits its buffer");
        buf.truncate(n);
        (t.chunk(&sha, i), buf)
    });
    conn.publish_all(chunks, progress.as_ref()).await?;
    // The manifest goes last: a device that sees it finds every chunk already retained.
    conn.publish_all(
        std::iter::once((
            topics.manifest(&sha),
            tern_update::encode_manifest(&manifest),
        )),
        None,
    )
    .await?;
    let mut generation = None;
    if !p.no_rollout {
        let current = conn.desired(p.device.as_deref()).await?;
        let next = with_model(
            current,
            &p.sign.model,
            p.sign.version,
            sha,
            p.percent,
            false,
        )?;
        conn.set_desired(p.device.as_deref(), &next).await?;
        generation = Some(next.generation);
    }
    if let Some(bar) = &progress {
        bar.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    if p.broker.json {
        println!(
            "{}",
            serde_json::json!({
                "model": p.sign.model, "version": p.sign.version, "sha256": tern_update::hex(&sha),
                "bytes": data.len(), "chunks": count, "chunk_size": p.sign.chunk_size,
                "fleet": p.broker.fleet, "device": p.device, "percent": p.percent,
                "generation": generation, "key_id": key_id,
                "selftest": manifest.body.selftest.is_some(), "seconds": seconds,
            })
        );
    } else {
        println!(
            "pushed {} version {} ({} bytes, {count} chunks, sha256 {}) in {seconds:.2} s{}",
            p.sign.model,
            p.sign.version,
            data.len(),
            &tern_update::hex(&sha)[..16],
            match generation {
                Some(g) => format!("; desired generation {g}, {}% of devices", p.percent),
                None => "; desired state unchanged".into(),
            }
        );
    }
    Ok(())
}

/// `rollout` and `rollback`: point the desired state at an artifact the broker retains.
async fn point(
    broker: &Broker,
    model: &str,
    version: u32,
    percent: u8,
    device: Option<&str>,
    allow_downgrade: bool,
) -> Result<()> {
    let mut conn = Conn::open(broker).await?;
    let manifest = conn
        .manifests()
        .await?
        .into_iter()
        .find(|m| m.body.name == model && m.body.version == version)
        .ok_or_else(|| {
            anyhow!(
                "no retained artifact for {model} version {version} in fleet {}: push it first",
                broker.fleet
            )
        })?;
    let current = conn.desired(device).await?;
    let next = with_model(
        current,
        model,
        version,
        manifest.body.sha256,
        percent,
        allow_downgrade,
    )?;
    conn.set_desired(device, &next).await?;
    if broker.json {
        println!(
            "{}",
            serde_json::json!({"model": model, "version": version, "percent": percent,
                "device": device, "generation": next.generation, "allow_downgrade": allow_downgrade})
        );
    } else {
        println!(
            "{} {model} version {version} to {}{}; desired generation {}",
            if allow_downgrade {
                "rolled back"
            } else {
                "rolled out"
            },
            device
                .map(|d| format!("device {d}"))
                .unwrap_or_else(|| format!("fleet {}", broker.fleet)),
            if device.is_none() {
                format!(" ({percent}%)")
            } else {
                String::new()
            },
            next.generation
        );
    }
    Ok(())
}

fn state_text(s: &UpdateState) -> (String, String) {
    match s {
        UpdateState::Idle => ("idle".into(), String::new()),
        UpdateState::Downloading {
            received, total, ..
        } => ("downloading".into(), format!("{received}/{total} chunks")),
        UpdateState::Verifying { .. } => ("verifying".into(), String::new()),
        UpdateState::Installing { .. } => ("installing".into(), String::new()),
        UpdateState::Validating { .. } => ("validating".into(), String::new()),
        UpdateState::Active { .. } => ("active".into(), String::new()),
        UpdateState::Failed { code, .. } => ("failed".into(), format!("{code:?}")),
        UpdateState::RolledBack { from, to } => ("rolled_back".into(), format!("{from} -> {to}")),
    }
}

fn target_version(s: &UpdateState) -> Option<u32> {
    match s {
        UpdateState::Idle => None,
        UpdateState::Downloading { version, .. }
        | UpdateState::Verifying { version }
        | UpdateState::Installing { version }
        | UpdateState::Validating { version }
        | UpdateState::Active { version }
        | UpdateState::Failed { version, .. } => Some(*version),
        UpdateState::RolledBack { from, .. } => Some(*from),
    }
}

async fn status(broker: &Broker, watch: bool) -> Result<()> {
    let mut conn = Conn::open(broker).await?;
    let filter = conn.topics.all_reported();
    let mut reports: BTreeMap<String, tern_proto::DeviceReport> = BTreeMap::new();
    let topics = conn.topics.clone();
    let absorb = |reports: &mut BTreeMap<String, tern_proto::DeviceReport>, t: &str, b: &[u8]| {
        if let (Some(dev), Ok(Frame::Report(r))) =
            (topics.reporting_device(t), tern_proto::decode(b))
        {
            reports.insert(dev.to_owned(), r);
        }
    };
    if !watch {
        for (t, b) in conn.retained(filter).await? {
            absorb(&mut reports, &t, &b);
        }
        print_status(&reports, broker.json);
        return Ok(());
    }
    conn.client.subscribe(filter, QoS::AtLeastOnce).await?;
    loop {
        match conn.rx.recv().await {
            Some(Ev::Publish(t, b)) => {
                absorb(&mut reports, &t, &b);
                print_status(&reports, broker.json);
            }
            Some(_) => {}
            None => return Ok(()),
        }
    }
}

fn print_status(reports: &BTreeMap<String, tern_proto::DeviceReport>, json: bool) {
    let rows: Vec<serde_json::Value> = reports
        .iter()
        .flat_map(|(dev, r)| {
            r.models.iter().map(move |m| {
                let (state, detail) = state_text(&m.state);
                serde_json::json!({
                    "device": dev, "generation": r.generation, "model": m.name.as_str(),
                    "active_version": m.active_version, "target_version": target_version(&m.state),
                    "state": state, "detail": detail,
                })
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!(
        "{:<20} {:<20} {:>7} {:>7} {:<12} DETAIL",
        "DEVICE", "MODEL", "ACTIVE", "TARGET", "STATE"
    );
    let v = |x: &serde_json::Value| x.as_u64().map(|n| n.to_string()).unwrap_or("-".into());
    for r in rows {
        println!(
            "{:<20} {:<20} {:>7} {:>7} {:<12} {}",
            r["device"].as_str().unwrap_or(""),
            r["model"].as_str().unwrap_or(""),
            v(&r["active_version"]),
            v(&r["target_version"]),
            r["state"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or(""),
        );
    }
}

async fn gc(broker: &Broker, dry_run: bool) -> Result<()> {
    let mut conn = Conn::open(broker).await?;
    let mut referenced = std::collections::BTreeSet::new();
    let filters = [conn.topics.desired(), conn.topics.device_desired("+")];
    for f in filters {
        for (_, b) in conn.retained(f).await? {
            if let Ok(Frame::Desired(d)) = tern_proto::decode(&b) {
                referenced.extend(d.models.iter().map(|m| m.artifact));
            }
        }
    }
    let unused: Vec<Manifest> = conn
        .manifests()
        .await?
        .into_iter()
        .filter(|m| !referenced.contains(&m.body.sha256))
        .collect();
    let mut cleared = vec![];
    for m in &unused {
        let sha = m.body.sha256;
        cleared.push(serde_json::json!({"model": m.body.name.as_str(),
            "version": m.body.version, "sha256": tern_update::hex(&sha), "chunks": m.body.chunk_count}));
        if dry_run {
            continue;
        }
        // An empty retained message deletes the retained one; the manifest goes first so no
        // device starts on an artifact whose chunks are disappearing.
        let t = conn.topics.clone();
        let mut topics = vec![t.manifest(&sha), t.selftest(&sha)];
        topics.extend((0..m.body.chunk_count).map(|i| t.chunk(&sha, i)));
        conn.publish_all(topics.into_iter().map(|t| (t, vec![])), None)
            .await?;
    }
    if broker.json {
        println!(
            "{}",
            serde_json::json!({"dry_run": dry_run, "artifacts": cleared})
        );
    } else if cleared.is_empty() {
        println!("nothing to collect: every retained artifact is referenced");
    } else {
        for c in &cleared {
            println!(
                "{} {} version {} ({} chunks, sha256 {})",
                if dry_run { "would delete" } else { "deleted" },
                c["model"].as_str().unwrap_or(""),
                c["version"],
                c["chunks"],
                &c["sha256"].as_str().unwrap_or("")[..16]
            );
        }
    }
    Ok(())
}
