//! The device side of fleet updates: one task owns the update state and is fed MQTT events by
//! a second task that polls the connection (so keep-alives continue while a model validates).
//!
//! One update runs at a time. Its path: manifest (verify signature) → chunks, a window of
//! retained chunk topics at a time (resumable: the bitmap is on disk) → sha256 → hidden install
//! → validation (load, warm-up, self-test) → activation by rename + hot swap → optional
//! probation under a canary rule. Every transition is published as a retained report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tern_proto::{
    DesiredModel, DesiredState, DeviceReport, FailureCode, Frame, Manifest, ModelReport, Telemetry,
    UpdateState,
};
use tern_update::{install, Staging, TrustedKeys};
use tokio::sync::mpsc;

use super::plan::{self, Local, Plan};
use super::{FleetError, Topics};
use crate::config::{Fleet, ModelConfig};
use crate::http::AppState;

/// What the connection task hands the agent.
#[derive(Debug)]
enum Inbound {
    Connected,
    Disconnected,
    Message { topic: String, payload: Bytes },
}

/// Validates the configuration and starts the agent's tasks, which run until the runtime
/// stops. Must be called within a tokio runtime.
pub fn start(cfg: Fleet, app: Arc<AppState>) -> Result<(), FleetError> {
    for (what, value) in [("fleet name", &cfg.fleet), ("device id", &cfg.device_id)] {
        if !super::topics::valid_id(value) {
            return Err(FleetError::Id {
                what,
                value: value.clone(),
            });
        }
    }
    let trusted = TrustedKeys::load(&cfg.trust_keys)?;
    if trusted.is_empty() {
        return Err(FleetError::NoTrustedKeys);
    }
    let options = super::mqtt_options(
        &cfg.mqtt,
        &format!("ternd-{}-{}", cfg.fleet, cfg.device_id),
        cfg.max_packet_bytes,
        true,
        &super::BrokerAuth::of(&cfg),
    )?;
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let topics = Topics::new(&cfg.fleet);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let infer = cfg.serve_inference.then(|| {
        super::infer::Responder::new(
            crate::http::router(app.clone()),
            client.clone(),
            topics.clone(),
            app.config.bearer_token.clone(),
        )
    });
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            let event = eventloop.poll().await;
            let sent = match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(250);
                    tx.send(Inbound::Connected)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(r) = infer.as_ref().filter(|r| r.wants(&p)) {
                        r.spawn(p);
                        Ok(())
                    } else {
                        let Publish { topic, payload, .. } = p;
                        tx.send(Inbound::Message {
                            topic: String::from_utf8_lossy(&topic).into_owned(),
                            payload,
                        })
                    }
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    log::warn!("fleet: MQTT connection: {e}; retrying in {backoff:?}");
                    let sent = tx.send(Inbound::Disconnected);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    sent
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    let mut agent = Agent::new(cfg, app, client, topics, trusted);
    tokio::spawn(async move {
        let mut telemetry = tokio::time::interval(Duration::from_millis(
            agent.cfg.telemetry_interval_ms.max(100),
        ));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    None => return,
                    Some(Inbound::Connected) => agent.on_connect().await,
                    Some(Inbound::Disconnected) => agent.connected = false,
                    Some(Inbound::Message { topic, payload }) => {
                        agent.on_message(&topic, &payload).await
                    }
                },
                _ = telemetry.tick() => agent.publish_telemetry().await,
                _ = tick.tick() => agent.on_tick().await,
            }
        }
    });
    Ok(())
}

/// One artifact in flight.
#[derive(Debug)]
struct Job {
    want: DesiredModel,
    manifest: Option<Manifest>,
    staging: Option<Staging>,
    /// The self-test vector, once received, when the manifest names one.
    selftest: Option<Vec<u8>>,
    /// Chunk indices whose topics are subscribed now.
    window: BTreeSet<u32>,
    last_progress: Instant,
    last_report: Instant,
}

/// A newly activated version under watch.
#[derive(Debug)]
struct Probation {
    name: String,
    version: u32,
    artifact: [u8; 32],
    until: Instant,
    base_ok: u64,
    base_err: u64,
    base_hist: Vec<u64>,
}

/// Persisted across restarts beside the repository.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Persisted {
    /// Artifacts (hex sha256) that failed: the failure and the desired generation it
    /// answered. Not retried until a newer desired state (a new push or rollout) arrives.
    failed: BTreeMap<String, (FailureCode, u32)>,
}

struct Agent {
    cfg: Fleet,
    app: Arc<AppState>,
    client: AsyncClient,
    topics: Topics,
    trusted: TrustedKeys,
    cohort: u8,
    connected: bool,
    /// Whether a desired state arrived since the connection opened, when, and how long to wait
    /// before asking again (a broker can lose a subscription made while it was still tearing
    /// down this client's previous connection).
    desired_seen: bool,
    asked_at: Instant,
    ask_again: Duration,
    fleet_desired: Option<DesiredState>,
    device_desired: Option<DesiredState>,
    job: Option<Job>,
    probation: Option<Probation>,
    states: BTreeMap<String, UpdateState>,
    failed: BTreeMap<[u8; 32], (FailureCode, u32)>,
    started: Instant,
    cpu_mark: (Instant, f64),
}

impl Agent {
    fn new(
        cfg: Fleet,
        app: Arc<AppState>,
        client: AsyncClient,
        topics: Topics,
        trusted: TrustedKeys,
    ) -> Agent {
        let cohort = tern_proto::cohort(&cfg.device_id);
        let mut agent = Agent {
            cfg,
            app,
            client,
            topics,
            trusted,
            cohort,
            connected: false,
            desired_seen: false,
            asked_at: Instant::now(),
            ask_again: Duration::from_secs(3),
            fleet_desired: None,
            device_desired: None,
            job: None,
            probation: None,
            states: BTreeMap::new(),
            failed: BTreeMap::new(),
            started: Instant::now(),
            cpu_mark: (Instant::now(), crate::metrics::process_usage().0),
        };
        let persisted: Persisted = std::fs::read(agent.state_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (hex, (code, generation)) in persisted.failed {
            let mut sha = [0u8; 32];
            if ::hex::decode_to_slice(&hex, &mut sha).is_ok() {
                agent.failed.insert(sha, (code, generation));
            }
        }
        log::info!(
            "fleet: device {} of fleet {} (cohort {}), broker {}",
            agent.cfg.device_id,
            agent.cfg.fleet,
            cohort,
            agent.cfg.mqtt
        );
        agent
    }

    fn root(&self) -> PathBuf {
        self.app.repo.root().to_path_buf()
    }

    fn state_file(&self) -> PathBuf {
        self.root().join(".tern-fleet.json")
    }

    fn staging_root(&self) -> PathBuf {
        self.root().join(".tern-staging")
    }

    fn persist(&self) {
        let p = Persisted {
            failed: self
                .failed
                .iter()
                .map(|(k, v)| (tern_update::hex(k), *v))
                .collect(),
        };
        let path = self.state_file();
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&p).expect("serialising a map");
        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)) {
            log::error!("fleet: saving {}: {e}", path.display());
        }
    }

    async fn subscribe(&self, topic: String) {
        // rumqttd re-sends retained messages only for a new subscription: drop it first.
        let _ = self.client.unsubscribe(topic.clone()).await;
        if let Err(e) = self.client.subscribe(topic, QoS::AtLeastOnce).await {
            log::warn!("fleet: subscribe: {e}");
        }
    }

    async fn on_connect(&mut self) {
        self.connected = true;
        log::info!("fleet: connected to {}", self.cfg.mqtt);
        self.desired_seen = false;
        self.ask_again = Duration::from_secs(3);
        self.ask_desired().await;
        if self.cfg.serve_inference {
            let filters = [
                self.topics.device_infer_filter(&self.cfg.device_id),
                self.topics.shared_infer_filter(),
            ];
            let _ = self
                .client
                .subscribe_many(filters.map(|f| Filter::new(f, QoS::AtLeastOnce)))
                .await;
        }
        self.resubscribe_job().await;
        self.publish_report().await;
    }

    /// Subscribing again re-delivers the retained desired states.
    async fn ask_desired(&mut self) {
        self.asked_at = Instant::now();
        self.subscribe(self.topics.desired()).await;
        self.subscribe(self.topics.device_desired(&self.cfg.device_id))
            .await;
    }

    /// (Re)requests everything the current job still needs.
    async fn resubscribe_job(&mut self) {
        let Some(job) = &mut self.job else { return };
        let sha = job.want.artifact;
        let window: Vec<u32> = std::mem::take(&mut job.window).into_iter().collect();
        let needs_manifest = job.manifest.is_none();
        let needs_selftest = job
            .manifest
            .as_ref()
            .is_some_and(|m| m.body.selftest.is_some())
            && job.selftest.is_none();
        job.last_progress = Instant::now();
        if needs_manifest {
            self.subscribe(self.topics.manifest(&sha)).await;
            return;
        }
        if needs_selftest {
            self.subscribe(self.topics.selftest(&sha)).await;
        }
        for i in window {
            let _ = self.client.unsubscribe(self.topics.chunk(&sha, i)).await;
        }
        self.fill_window().await;
    }

    async fn on_message(&mut self, topic: &str, payload: &[u8]) {
        log::debug!("fleet: {} bytes on {topic}", payload.len());
        if topic == self.topics.desired()
            || topic == self.topics.device_desired(&self.cfg.device_id)
        {
            let desired = if payload.is_empty() {
                None // a cleared retained message
            } else {
                match tern_proto::decode(payload) {
                    Ok(Frame::Desired(d)) => Some(d),
                    Ok(_) | Err(_) => {
                        log::warn!("fleet: ignoring a malformed desired state on {topic}");
                        return;
                    }
                }
            };
            self.desired_seen = true;
            if topic == self.topics.desired() {
                self.fleet_desired = desired;
            } else {
                self.device_desired = desired;
            }
            self.reconcile().await;
            return;
        }
        let Some(sha) = self.topics.artifact_of(topic) else {
            return;
        };
        if self.job.as_ref().map(|j| j.want.artifact) != Some(sha) || payload.is_empty() {
            return;
        }
        if topic.ends_with("/manifest") {
            self.on_manifest(payload).await;
        } else if topic.ends_with("/selftest") {
            self.on_selftest(payload).await;
        } else if let Some(index) = topic
            .rsplit_once("/chunks/")
            .and_then(|(_, i)| i.parse::<u32>().ok())
        {
            self.on_chunk(index, payload).await;
        }
    }

    fn generation(&self) -> u32 {
        [&self.fleet_desired, &self.device_desired]
            .into_iter()
            .flatten()
            .map(|d| d.generation)
            .max()
            .unwrap_or(0)
    }

    fn local(&self, name: &str) -> Local {
        let root = self.root();
        let served = install::versions(&root, name);
        let active = served.last().copied();
        let active_artifact = active.and_then(|v| {
            install::installed_manifest(&install::version_dir(&root, name, v))
                .map(|m| m.body.sha256)
        });
        let artifact_of =
            |dir: std::path::PathBuf| install::installed_manifest(&dir).map(|m| m.body.sha256);
        let mut restorable: Vec<(u32, Option<[u8; 32]>)> = served
            .iter()
            .filter(|v| Some(**v) != active)
            .map(|v| (*v, artifact_of(install::version_dir(&root, name, *v))))
            .collect();
        restorable.extend(
            install::retired_versions(&root, name)
                .into_iter()
                .map(|v| (v, artifact_of(install::retired_dir(&root, name, v)))),
        );
        Local {
            active,
            active_artifact,
            restorable,
        }
    }

    /// Compares the desired state with what is on disk and starts the next step.
    async fn reconcile(&mut self) {
        let wanted = plan::merge(self.fleet_desired.as_ref(), self.device_desired.as_ref());
        if let Some(job) = &self.job {
            let still = wanted
                .iter()
                .any(|w| w.name == job.want.name && w.artifact == job.want.artifact);
            if still {
                return;
            }
            log::info!(
                "fleet: {} version {} is no longer desired; download paused",
                job.want.name,
                job.want.version
            );
            self.abandon_job().await;
        }
        let generation = self.generation();
        let failed: BTreeMap<[u8; 32], FailureCode> = self
            .failed
            .iter()
            .filter(|(_, (_, g))| *g >= generation)
            .map(|(k, (c, _))| (*k, *c))
            .collect();
        for want in wanted {
            let name = want.name.to_string();
            if !tern_update::valid_name(&name) {
                continue;
            }
            match plan::plan(&want, self.cohort, &self.local(&name), &failed) {
                Plan::Keep => {
                    let active = self.local(&name).active;
                    let st = self.states.get(&name).copied();
                    if active == Some(want.version)
                        && !matches!(st, Some(UpdateState::Active { .. }))
                        && !matches!(st, Some(UpdateState::RolledBack { .. }))
                        && self.probation.as_ref().is_none_or(|p| p.name != name)
                    {
                        self.set_state(
                            &name,
                            UpdateState::Active {
                                version: want.version,
                            },
                        )
                        .await;
                    }
                }
                Plan::Refuse(code) => {
                    log::warn!(
                        "fleet: refusing {name} version {}: {code:?} (active {:?})",
                        want.version,
                        self.local(&name).active
                    );
                    self.set_state(
                        &name,
                        UpdateState::Failed {
                            version: want.version,
                            code,
                        },
                    )
                    .await;
                }
                Plan::Restore(version) => self.restore(&name, version).await,
                Plan::Fetch(_) => {
                    self.start_job(want).await;
                    return;
                }
            }
        }
    }

    async fn start_job(&mut self, want: DesiredModel) {
        log::info!(
            "fleet: updating {} to version {} (artifact {})",
            want.name,
            want.version,
            &tern_update::hex(&want.artifact)[..12]
        );
        self.job = Some(Job {
            want,
            manifest: None,
            staging: None,
            selftest: None,
            window: BTreeSet::new(),
            last_progress: Instant::now(),
            last_report: Instant::now(),
        });
        self.resubscribe_job().await;
    }

    async fn abandon_job(&mut self) {
        if let Some(mut job) = self.job.take() {
            let sha = job.want.artifact;
            if let Some(s) = job.staging.as_mut() {
                let _ = s.checkpoint();
            }
            let _ = self.client.unsubscribe(self.topics.manifest(&sha)).await;
            let _ = self.client.unsubscribe(self.topics.selftest(&sha)).await;
            for i in &job.window {
                let _ = self.client.unsubscribe(self.topics.chunk(&sha, *i)).await;
            }
        }
    }

    fn count_update(&self, outcome: &str) {
        let labels = vec![("outcome".to_owned(), outcome.to_owned())];
        self.app.metrics.fleet.updates.get_or_create(&labels).inc();
    }

    /// Ends the current job with a failure the fleet will see; the artifact is not retried.
    async fn fail(&mut self, code: FailureCode, message: &str) {
        let Some(job) = &self.job else { return };
        let (name, version, sha) = (
            job.want.name.to_string(),
            job.want.version,
            job.want.artifact,
        );
        log::error!("fleet: {name} version {version} rejected: {message}");
        self.abandon_job().await;
        Staging::discard(&self.staging_root(), &sha);
        let _ = std::fs::remove_dir_all(install::pending_dir(&self.root(), &name, version));
        self.failed.insert(sha, (code, self.generation()));
        self.persist();
        self.count_update("failed");
        self.set_state(&name, UpdateState::Failed { version, code })
            .await;
        self.reconcile().await;
    }

    async fn on_manifest(&mut self, payload: &[u8]) {
        let Some(job) = &self.job else { return };
        if job.manifest.is_some() {
            return;
        }
        let manifest = match tern_update::decode_manifest(payload) {
            Ok(m) => m,
            Err(e) => return self.fail(FailureCode::BadSignature, &e.to_string()).await,
        };
        if let Err(e) = tern_update::verify(&manifest, &self.trusted) {
            return self.fail(e.code(), &e.to_string()).await;
        }
        let b = &manifest.body;
        if b.sha256 != job.want.artifact || b.name != job.want.name || b.version != job.want.version
        {
            let msg = format!(
                "the signed manifest describes {} version {}, not the desired {} version {}",
                b.name, b.version, job.want.name, job.want.version
            );
            return self.fail(FailureCode::BadSignature, &msg).await;
        }
        let name = job.want.name.to_string();
        let sha = job.want.artifact;
        let _ = self.client.unsubscribe(self.topics.manifest(&sha)).await;
        // A crash after install but before activation leaves a verified pending copy: reuse it.
        // A crash inside the install can leave the model moved in but not yet its manifest;
        // the bytes are what the (verified) manifest signs, so the manifest is written again.
        let pending = install::pending_dir(&self.root(), &name, b.version);
        let pending_ok = tern_update::sha256_file(&pending.join(install::MODEL_FILE)).ok()
            == Some(sha)
            && match install::installed_manifest(&pending) {
                Some(m) => m == manifest,
                None => install::write_manifest(&pending, &manifest).is_ok(),
            };
        let staging = if pending_ok {
            None
        } else {
            match Staging::open(&self.staging_root(), &manifest) {
                Ok(s) => Some(s),
                Err(e) => return self.fail(e.code(), &e.to_string()).await,
            }
        };
        let job = self.job.as_mut().expect("checked above");
        job.manifest = Some(manifest.clone());
        job.last_progress = Instant::now();
        if let Some(digest) = manifest.body.selftest {
            let file = pending.join(install::SELFTEST_FILE);
            match std::fs::read(&file) {
                Ok(b) if pending_ok && tern_update::sha256(&b) == digest => job.selftest = Some(b),
                _ => self.subscribe(self.topics.selftest(&sha)).await,
            }
        }
        match staging {
            None => {
                log::info!("fleet: {name}: resuming from the verified pending install");
                self.advance().await;
            }
            Some(s) => {
                let (received, total) = (s.received(), s.total());
                if received > 0 {
                    log::info!("fleet: {name}: resuming download at {received}/{total} chunks");
                }
                self.job.as_mut().expect("job").staging = Some(s);
                self.set_state(
                    &name,
                    UpdateState::Downloading {
                        version: manifest.body.version,
                        received,
                        total,
                    },
                )
                .await;
                self.fill_window().await;
                self.advance().await;
            }
        }
    }

    async fn on_selftest(&mut self, payload: &[u8]) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(digest) = job.manifest.as_ref().and_then(|m| m.body.selftest) else {
            return;
        };
        if job.selftest.is_some() {
            return;
        }
        if tern_update::sha256(payload) != digest {
            // A stale retained vector from an earlier push: wait for the right one briefly,
            // but a signed manifest naming bytes nobody publishes must not hang forever.
            log::warn!("fleet: self-test vector does not match the manifest's digest");
            return self
                .fail(
                    FailureCode::SelfTestFailed,
                    "the published self-test vector does not match the signed digest",
                )
                .await;
        }
        job.selftest = Some(payload.to_vec());
        let sha = job.want.artifact;
        let _ = self.client.unsubscribe(self.topics.selftest(&sha)).await;
        self.advance().await;
    }

    /// Subscribes to missing chunks until the window is full.
    async fn fill_window(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(staging) = &job.staging else { return };
        let room = self
            .cfg
            .chunk_window
            .max(1)
            .saturating_sub(job.window.len());
        let next: Vec<u32> = staging
            .missing()
            .filter(|i| !job.window.contains(i))
            .take(room)
            .collect();
        if next.is_empty() {
            return;
        }
        job.window.extend(&next);
        let sha = job.want.artifact;
        let filters: Vec<Filter> = next
            .iter()
            .map(|i| Filter::new(self.topics.chunk(&sha, *i), QoS::AtLeastOnce))
            .collect();
        if let Err(e) = self.client.subscribe_many(filters).await {
            log::warn!("fleet: subscribe: {e}");
        }
    }

    async fn on_chunk(&mut self, index: u32, payload: &[u8]) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(staging) = job.staging.as_mut() else {
            return;
        };
        let chunk = match tern_proto::decode(payload) {
            Ok(Frame::Chunk(c)) if c.index == index && c.artifact == job.want.artifact => c,
            _ => {
                log::warn!("fleet: chunk {index}: malformed frame ignored");
                return;
            }
        };
        let sha = job.want.artifact;
        match staging.write_chunk(index, chunk.data) {
            Ok(true) => {
                let fleet = &self.app.metrics.fleet;
                fleet.chunks_received.inc();
                fleet.bytes_received.inc_by(chunk.data.len() as u64);
                job.last_progress = Instant::now();
            }
            Ok(false) => {
                self.app.metrics.fleet.chunks_duplicate.inc();
            }
            Err(e) => {
                let code = e.code();
                return self.fail(code, &e.to_string()).await;
            }
        }
        if job.window.remove(&index) {
            let _ = self
                .client
                .unsubscribe(self.topics.chunk(&sha, index))
                .await;
        }
        let job = self.job.as_mut().expect("job");
        let staging = job.staging.as_ref().expect("staging");
        let (received, total) = (staging.received(), staging.total());
        let version = job.want.version;
        let name = job.want.name.to_string();
        if received == total || job.last_report.elapsed() >= Duration::from_millis(500) {
            job.last_report = Instant::now();
            self.set_state(
                &name,
                UpdateState::Downloading {
                    version,
                    received,
                    total,
                },
            )
            .await;
        }
        self.fill_window().await;
        self.advance().await;
    }

    /// Runs verification, install and validation once everything has arrived.
    async fn advance(&mut self) {
        let root = self.root();
        let Some(job) = self.job.as_mut() else { return };
        let Some(manifest) = job.manifest.clone() else {
            return;
        };
        if manifest.body.selftest.is_some() && job.selftest.is_none() {
            return;
        }
        if job.staging.as_ref().is_some_and(|s| !s.is_complete()) {
            return;
        }
        let name = manifest.body.name.to_string();
        let version = manifest.body.version;
        let sha = manifest.body.sha256;
        let selftest = job.selftest.clone();
        if let Some(staging) = job.staging.take() {
            self.set_state(&name, UpdateState::Verifying { version })
                .await;
            let verified = tokio::task::spawn_blocking(move || staging.finish()).await;
            let artifact = match verified {
                Ok(Ok(path)) => path,
                Ok(Err(e)) => return self.fail(e.code(), &e.to_string()).await,
                Err(e) => return self.fail(FailureCode::LoadFailed, &e.to_string()).await,
            };
            self.set_state(&name, UpdateState::Installing { version })
                .await;
            let (r, m, st) = (root.clone(), manifest.clone(), selftest.clone());
            let staged = tokio::task::spawn_blocking(move || {
                install::stage(&r, &m, &artifact, st.as_deref())
            })
            .await;
            match staged {
                Ok(Ok(_)) => Staging::discard(&self.staging_root(), &sha),
                Ok(Err(e)) => return self.fail(e.code(), &e.to_string()).await,
                Err(e) => return self.fail(FailureCode::DiskFull, &e.to_string()).await,
            }
        }
        self.set_state(&name, UpdateState::Validating { version })
            .await;
        let pending = install::pending_dir(&root, &name, version);
        let options = model_options(&self.app.config.model_defaults, &root, &name);
        let checked = tokio::task::spawn_blocking(move || {
            let st = match selftest {
                Some(bytes) => Some(tern_update::selftest::SelfTest::decode(&bytes).map_err(
                    |e| super::validate::Invalid {
                        code: FailureCode::SelfTestFailed,
                        message: e.to_string(),
                    },
                )?),
                None => None,
            };
            super::validate::validate(&pending.join(install::MODEL_FILE), &options, st.as_ref())
        })
        .await;
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(invalid)) => return self.fail(invalid.code, &invalid.message).await,
            Err(e) => return self.fail(FailureCode::LoadFailed, &e.to_string()).await,
        }
        let previous = self.local(&name).active;
        if let Err(e) = install::activate(&root, &name, version) {
            return self.fail(e.code(), &e.to_string()).await;
        }
        // Versions above the new one (an ordered downgrade) step aside so it is served.
        for v in install::versions(&root, &name) {
            if v > version {
                let _ = install::retire(&root, &name, v);
            }
        }
        let repo = self.app.repo.clone();
        let n = name.clone();
        let loaded = tokio::task::spawn_blocking(move || repo.load(&n)).await;
        let served = matches!(&loaded, Ok(Ok(v)) if v.contains(&(version as u64)));
        if !served {
            let why = match loaded {
                Ok(Err(e)) => e.to_string(),
                _ => "the repository did not serve it".into(),
            };
            self.roll_back(&name, version, previous, FailureCode::LoadFailed, &why)
                .await;
            return;
        }
        self.job = None;
        install::prune(&root, &name, self.cfg.keep_versions, Some(version));
        log::info!("fleet: {name} version {version} serving");
        self.count_update("activated");
        let watched =
            self.cfg.canary_max_error_rate.is_some() || self.cfg.canary_max_p99_ms.is_some();
        if self.cfg.probation_ms > 0 && watched {
            let (base_ok, base_err, base_hist) = self.version_counts(&name, version);
            self.probation = Some(Probation {
                name: name.clone(),
                version,
                artifact: sha,
                until: Instant::now() + Duration::from_millis(self.cfg.probation_ms),
                base_ok,
                base_err,
                base_hist,
            });
        } else {
            self.set_state(&name, UpdateState::Active { version }).await;
        }
        self.reconcile().await;
    }

    /// Takes `version` out of service and serves `previous` again.
    async fn roll_back(
        &mut self,
        name: &str,
        version: u32,
        previous: Option<u32>,
        code: FailureCode,
        why: &str,
    ) {
        let root = self.root();
        log::error!("fleet: {name} version {version} rolled back: {why}");
        let _ = install::retire(&root, name, version);
        if let Some(p) = previous {
            let _ = install::restore(&root, name, p);
        }
        let repo = self.app.repo.clone();
        let n = name.to_string();
        let _ = tokio::task::spawn_blocking(move || repo.load(&n)).await;
        let generation = self.generation();
        if let Some(job) = self.job.take() {
            self.failed.insert(job.want.artifact, (code, generation));
        }
        if let Some(p) = self.probation.take() {
            self.failed.insert(p.artifact, (code, generation));
        }
        self.persist();
        self.count_update("rolled_back");
        let to = self.local(name).active.unwrap_or(0);
        self.set_state(name, UpdateState::RolledBack { from: version, to })
            .await;
        self.reconcile().await;
    }

    /// A desired version the device still has on disk (an ordered rollback, or forward again to
    /// a retired version): served again without a download.
    async fn restore(&mut self, name: &str, version: u32) {
        let root = self.root();
        let from = self.local(name).active;
        let _ = install::restore(&root, name, version);
        for v in install::versions(&root, name) {
            if v > version {
                let _ = install::retire(&root, name, v);
            }
        }
        let repo = self.app.repo.clone();
        let n = name.to_string();
        let _ = tokio::task::spawn_blocking(move || repo.load(&n)).await;
        log::info!("fleet: {name}: version {version} restored from disk (was {from:?})");
        let state = match self.local(name).active {
            Some(v) if v == version => UpdateState::Active { version },
            _ => UpdateState::Failed {
                version,
                code: FailureCode::LoadFailed,
            },
        };
        self.set_state(name, state).await;
    }

    /// (successes, execution failures, request-latency histogram) of one served version.
    fn version_counts(&self, name: &str, version: u32) -> (u64, u64, Vec<u64>) {
        match self.app.repo.get(name, Some(version as u64)) {
            Ok(l) => {
                let s = l.batcher.stats();
                (
                    s.success,
                    s.failures_of(tern_core::FailureReason::Execution),
                    s.request.counts.clone(),
                )
            }
            Err(_) => (0, 0, vec![]),
        }
    }

    async fn on_tick(&mut self) {
        if self.connected && !self.desired_seen && self.asked_at.elapsed() >= self.ask_again {
            log::info!("fleet: no desired state yet; asking the broker again");
            self.ask_again = (self.ask_again * 2).min(Duration::from_secs(60));
            self.ask_desired().await;
        }
        if let Some(p) = &self.probation {
            let (ok, err, hist) = self.version_counts(&p.name, p.version);
            let (ok, err) = (ok - p.base_ok.min(ok), err - p.base_err.min(err));
            let delta: Vec<u64> = hist
                .iter()
                .enumerate()
                .map(|(i, c)| c - p.base_hist.get(i).copied().unwrap_or(0).min(*c))
                .collect();
            let total = ok + err;
            let mut tripped = None;
            if total >= self.cfg.canary_min_requests.max(1) {
                let rate = err as f64 / total as f64;
                if let Some(max) = self.cfg.canary_max_error_rate.filter(|m| rate > *m) {
                    tripped = Some(format!("error rate {rate:.3} > {max}"));
                }
                let p99 = quantile_us(&delta, 0.99) as f64 / 1000.0;
                if let Some(max) = self.cfg.canary_max_p99_ms.filter(|m| p99 > *m) {
                    tripped = Some(format!("p99 {p99:.3} ms > {max} ms"));
                }
            }
            let (name, version) = (p.name.clone(), p.version);
            if let Some(why) = tripped {
                let previous = install::versions(&self.root(), &name)
                    .into_iter()
                    .rfind(|v| *v < version);
                self.roll_back(&name, version, previous, FailureCode::CanaryTripped, &why)
                    .await;
            } else if Instant::now() >= p.until {
                self.probation = None;
                log::info!("fleet: {name} version {version} passed probation ({total} requests)");
                self.set_state(&name, UpdateState::Active { version }).await;
            }
        }
        let stalled = self.job.as_ref().is_some_and(|j| {
            j.last_progress.elapsed() >= Duration::from_millis(self.cfg.stall_timeout_ms.max(100))
        });
        if stalled && self.connected {
            log::info!("fleet: transfer stalled; requesting the missing pieces again");
            self.resubscribe_job().await;
        }
    }

    async fn set_state(&mut self, name: &str, state: UpdateState) {
        if self.states.get(name) == Some(&state) {
            return;
        }
        log::debug!("fleet: {name}: {state:?}");
        self.states.insert(name.into(), state);
        self.publish_report().await;
    }

    fn report(&self) -> DeviceReport {
        let mut models: heapless::Vec<ModelReport, { tern_proto::MAX_MODELS }> =
            heapless::Vec::new();
        for (name, state) in &self.states {
            let Ok(n) = tern_proto::Name::try_from(name.as_str()) else {
                continue;
            };
            let r = ModelReport {
                name: n,
                active_version: self.local(name).active,
                state: *state,
            };
            if models.push(r).is_err() {
                break;
            }
        }
        DeviceReport {
            device: tern_proto::Name::try_from(self.cfg.device_id.as_str())
                .expect("validated at start"),
            generation: self.generation(),
            models,
        }
    }

    async fn publish_report(&mut self) {
        if !self.connected {
            return;
        }
        let mut buf = vec![0u8; 1024];
        let Ok(n) = tern_proto::encode(&Frame::Report(self.report()), &mut buf) else {
            return;
        };
        buf.truncate(n);
        let topic = self.topics.reported(&self.cfg.device_id);
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, true, buf)
            .await
        {
            log::warn!("fleet: publishing the report: {e}");
        }
    }

    async fn publish_telemetry(&mut self) {
        if !self.connected {
            return;
        }
        let (mut requests, mut errors, mut hist) = (0u64, 0u64, vec![]);
        for l in self.app.repo.loaded() {
            let s = l.batcher.stats();
            let failed: u64 = s.failures.iter().map(|(_, c)| c).sum();
            requests += s.success + failed;
            errors += failed;
            if hist.len() < s.request.counts.len() {
                hist.resize(s.request.counts.len(), 0);
            }
            for (h, c) in hist.iter_mut().zip(&s.request.counts) {
                *h += c;
            }
        }
        let (cpu, rss) = crate::metrics::process_usage();
        let (at, before) = self.cpu_mark;
        let wall = at.elapsed().as_secs_f64().max(1e-3);
        self.cpu_mark = (Instant::now(), cpu);
        let t = Telemetry {
            uptime_s: self.started.elapsed().as_secs() as u32,
            requests,
            errors,
            p50_us: quantile_us(&hist, 0.5),
            p99_us: quantile_us(&hist, 0.99),
            cpu_permille: (((cpu - before) / wall) * 1000.0).clamp(0.0, u16::MAX as f64) as u16,
            rss_kb: (rss / 1024) as u32,
        };
        let mut buf = [0u8; 64];
        if let Ok(n) = tern_proto::encode(&Frame::Telemetry(t), &mut buf) {
            let topic = self.topics.telemetry(&self.cfg.device_id);
            let _ = self
                .client
                .publish(topic, QoS::AtMostOnce, false, buf[..n].to_vec())
                .await;
        }
    }
}

/// Upper bound (µs) of the bucket holding quantile `q` of a per-bucket count histogram.
fn quantile_us(counts: &[u64], q: f64) -> u32 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return tern_core::LATENCY_BOUNDS_US
                .get(i)
                .copied()
                .unwrap_or(u32::MAX as u64)
                .min(u32::MAX as u64) as u32;
        }
    }
    u32::MAX
}

fn model_options(
    defaults: &ModelConfig,
    root: &std::path::Path,
    name: &str,
) -> tern_core::ModelOptions {
    ModelConfig::load_over(defaults, &root.join(name).join("config.toml"))
        .unwrap_or_else(|_| defaults.clone())
        .model_options()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_upper_bounds() {
        let mut counts = vec![0u64; tern_core::LATENCY_BOUNDS_US.len() + 1];
        counts[0] = 98;
        counts[3] = 2;
        assert_eq!(
            quantile_us(&counts, 0.5),
            tern_core::LATENCY_BOUNDS_US[0] as u32
        );
        assert_eq!(
            quantile_us(&counts, 0.99),
            tern_core::LATENCY_BOUNDS_US[3] as u32
        );
        assert_eq!(quantile_us(&[], 0.99), 0);
    }
}
