//! The model repository: `REPO/MODEL/VERSION/model.onnx`, with an optional
//! `REPO/MODEL/config.toml`. Each served version is a prepared model behind a dynamic batcher;
//! a version is READY only after its warm-up succeeded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tern_core::{Batcher, Model};

use crate::config::ModelConfig;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "invalid model name `{0}`: use letters, digits, `_`, `-` and `.` (not starting with `.`)"
    )]
    InvalidName(String),
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("model `{name}` has no version {version}")]
    UnknownVersion { name: String, version: u64 },
    #[error("model `{0}` is not loaded")]
    NotReady(String),
    #[error("model `{0}` was evicted to respect the memory budget")]
    Evicted(String),
    #[error("model `{name}` failed to load: {message}")]
    Load { name: String, message: String },
}

/// One served version.
pub struct Loaded {
    pub name: String,
    pub version: u64,
    pub model: Model,
    pub batcher: Batcher,
    /// File to first result: read, prepare, warm up.
    pub load_time: Duration,
    /// Estimated memory held: twice the file (tract keeps packed weights beside the originals).
    pub footprint: u64,
    /// Milliseconds since the repository opened, at the last request: the LRU clock.
    last_used: AtomicU64,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

/// Runs the configured sample inputs through a new version before it serves.
fn warm_up(batcher: &Batcher, dir: &Path, files: &[String]) -> Result<(), String> {
    let tensors = files
        .iter()
        .map(|f| {
            let path = dir.join(f);
            // Sample files live beside the model: refuse paths that leave its directory.
            if Path::new(f)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(format!(
                    "warm-up input `{f}` must be a path inside the model directory"
                ));
            }
            tern_core::npy::read_file(&path).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = tensors.iter().map(|t| t.view()).collect();
    batcher
        .infer(&views, &tern_core::RequestOptions::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A pipeline ready to run: its steps in an order that respects their dependencies.
#[derive(Debug)]
pub struct LoadedPipeline {
    pub pipeline: crate::config::Pipeline,
    pub order: Vec<usize>,
}

/// What the repository index reports for one model version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
}

#[derive(Default)]
struct ModelState {
    versions: BTreeMap<u64, Arc<Loaded>>,
    /// The last load failure, reported by the index.
    error: Option<String>,
    /// Unloaded to fit the memory budget; the next request reloads it.
    evicted: bool,
    /// Canary or shadow routing, when configured and both versions are served.
    router: Option<std::sync::Mutex<routing::Router>>,
}

/// Shared by every request handler; loading happens on the caller's (blocking) thread.
pub struct Repository {
    root: PathBuf,
    defaults: ModelConfig,
    models: RwLock<BTreeMap<String, ModelState>>,
    /// Bytes the loaded versions may hold together (estimated), if limited.
    budget: Option<u64>,
    epoch: Instant,
    pipelines: RwLock<BTreeMap<String, Arc<LoadedPipeline>>>,
    /// Version selections the poller failed to load, per model.
    poll_failed: std::sync::Mutex<BTreeMap<String, Vec<u64>>>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Model names become path components: anything that could leave the repository is refused.
pub mod routing;

pub fn check_name(name: &str) -> Result<(), RepoError> {
    if tern_update::valid_name(name) {
        Ok(())
    } else {
        Err(RepoError::InvalidName(name.chars().take(64).collect()))
    }
}

impl Repository {
    pub fn new(root: PathBuf, defaults: ModelConfig, budget: Option<u64>) -> Repository {
        Repository {
            root,
            defaults,
            budget,
            epoch: Instant::now(),
            models: RwLock::new(BTreeMap::new()),
            poll_failed: Default::default(),
            pipelines: Default::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Model directories on disk: those with at least one numeric version holding a model.onnx.
    pub fn on_disk(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                check_name(n).is_ok()
                    && (!self.versions_on_disk(n).is_empty() || self.pipeline_config(n).is_some())
            })
            .collect();
        names.sort();
        names
    }

    /// The `[pipeline]` of an entry without versions, if its config declares one.
    fn pipeline_config(&self, name: &str) -> Option<Result<crate::config::Pipeline, String>> {
        let path = self.root.join(name).join("config.toml");
        if !path.is_file() {
            return None;
        }
        match ModelConfig::load_over(&self.defaults, &path) {
            Ok(c) => c.pipeline.map(Ok),
            Err(e) => Some(Err(e.to_string())),
        }
    }

    /// A loaded pipeline, with its steps in execution order.
    pub fn pipeline(&self, name: &str) -> Option<Arc<LoadedPipeline>> {
        self.pipelines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn versions_on_disk(&self, name: &str) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(self.root.join(name)) else {
            return vec![];
        };
        let mut v: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()))
            .filter(|v| {
                self.root
                    .join(name)
                    .join(v.to_string())
                    .join("model.onnx")
                    .is_file()
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Loads (or reloads) a model: the versions its policy selects, each prepared and warmed
    /// up before it becomes visible. Versions no longer selected are dropped.
    pub fn load(&self, name: &str) -> Result<Vec<u64>, RepoError> {
        check_name(name)?;
        let on_disk = self.versions_on_disk(name);
        if on_disk.is_empty() {
            let Some(pipeline) = self.pipeline_config(name) else {
                return Err(RepoError::UnknownModel(name.into()));
            };
            let loaded = pipeline.and_then(|p| {
                Ok(LoadedPipeline {
                    order: p.schedule()?,
                    pipeline: p,
                })
            });
            return match loaded {
                Ok(p) => {
                    log::info!("loaded pipeline {name} ({} steps)", p.order.len());
                    self.pipelines
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.into(), Arc::new(p));
                    Ok(vec![1])
                }
                Err(message) => Err(RepoError::Load {
                    name: name.into(),
                    message,
                }),
            };
        }
        let current: BTreeMap<u64, Arc<Loaded>> = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            models
                .get(name)
                .map(|s| s.versions.clone())
                .unwrap_or_default()
        };
        // New versions are prepared and warmed up here, outside the lock, while the current
        // ones keep serving; the swap below is one map assignment. Requests hold an `Arc` of
        // the version they started on, so an old version finishes its requests before it drops.
        let result = self.load_versions(name, &on_disk, &current);
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let result = result.and_then(|(loaded, routing)| {
            self.make_room(name, &loaded, &mut models)?;
            Ok((loaded, routing))
        });
        let state = models.entry(name.into()).or_default();
        match result {
            Ok((loaded, routing)) => {
                let served: Vec<u64> = loaded.iter().map(|l| l.version).collect();
                state.router = match routing {
                    Some(r) if served.contains(&r.stable) && served.contains(&r.candidate) => {
                        log::info!(
                            "{name}: {} {}% of traffic to version {} (stable {})",
                            if r.shadow { "shadowing" } else { "routing" },
                            if r.shadow { 100 } else { r.percent },
                            r.candidate,
                            r.stable
                        );
                        Some(std::sync::Mutex::new(routing::Router::new(r)))
                    }
                    Some(r) => {
                        log::warn!(
                            "{name}: routing needs versions {} and {} served (serving {served:?}); ignored",
                            r.stable,
                            r.candidate
                        );
                        None
                    }
                    None => None,
                };
                for l in &loaded {
                    l.last_used.store(self.now_ms(), Ordering::Relaxed);
                }
                state.versions = loaded.into_iter().map(|l| (l.version, l)).collect();
                state.error = None;
                state.evicted = false;
                Ok(state.versions.keys().copied().collect())
            }
            Err(message) => {
                state.error = Some(message.clone());
                Err(RepoError::Load {
                    name: name.into(),
                    message,
                })
            }
        }
    }

    fn load_versions(
        &self,
        name: &str,
        on_disk: &[u64],
        current: &BTreeMap<u64, Arc<Loaded>>,
    ) -> Result<(Vec<Arc<Loaded>>, Option<crate::config::Routing>), String> {
        let dir = self.root.join(name);
        let config = ModelConfig::load_over(&self.defaults, &dir.join("config.toml"))
            .map_err(|e| e.to_string())?;
        let wanted = config.version_policy.select(on_disk);
        if wanted.is_empty() {
            return Err("the version policy selects no version on disk".into());
        }
        let options = config.model_options();
        let loaded = wanted
            .into_iter()
            .map(|version| {
                if let Some(loaded) = current.get(&version) {
                    return Ok(loaded.clone());
                }
                let started = Instant::now();
                let path = dir.join(version.to_string()).join("model.onnx");
                let model =
                    Model::load(&path, &options).map_err(|e| format!("version {version}: {e}"))?;
                // Batcher::new warms up every instance's session before returning.
                let batcher = Batcher::new(model.clone(), config.batching.to_core())
                    .map_err(|e| format!("version {version}: {e}"))?;
                if !config.warmup_inputs.is_empty() {
                    warm_up(&batcher, &dir, &config.warmup_inputs)
                        .map_err(|e| format!("version {version}: warm-up failed: {e}"))?;
                }
                let load_time = started.elapsed();
                let footprint = 2 * std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                log::info!("loaded {name} version {version} in {load_time:?}");
                Ok(Arc::new(Loaded {
                    name: name.into(),
                    version,
                    model,
                    batcher,
                    load_time,
                    footprint,
                    last_used: AtomicU64::new(0),
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((loaded, config.routing))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Evicts least recently used idle models until `incoming` fits the budget beside what
    /// stays. A model is idle when no request holds any of its versions.
    fn make_room(
        &self,
        name: &str,
        incoming: &[Arc<Loaded>],
        models: &mut BTreeMap<String, ModelState>,
    ) -> Result<(), String> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let need: u64 = incoming.iter().map(|l| l.footprint).sum();
        loop {
            let used: u64 = models
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .flat_map(|(_, s)| s.versions.values())
                .map(|l| l.footprint)
                .sum();
            if used + need <= budget {
                return Ok(());
            }
            let victim = models
                .iter()
                .filter(|(n, s)| {
                    n.as_str() != name
                        && !s.versions.is_empty()
                        && s.versions.values().all(|l| {
                            Arc::strong_count(l) == 1 && l.batcher.stats().queue_depth == 0
                        })
                })
                .min_by_key(|(_, s)| {
                    s.versions
                        .values()
                        .map(|l| l.last_used.load(Ordering::Relaxed))
                        .max()
                })
                .map(|(n, _)| n.clone());
            match victim {
                Some(v) => {
                    log::info!("evicting {v} (least recently used) to fit {name} in the memory budget");
                    let s = models.get_mut(&v).expect("listed");
                    s.versions.clear();
                    s.evicted = true;
                }
                None => {
                    return Err(format!(
                        "memory budget of {budget} bytes exceeded: {name} needs {need}, {used} are held by models in use"
                    ))
                }
            }
        }
    }

    /// Loads models whose versions on disk changed (new version directories appeared, or a new
    /// model), for `poll_interval_ms`. Returns the models it (re)loaded.
    pub fn poll(&self) -> Vec<String> {
        let mut changed = vec![];
        for name in self.on_disk() {
            let on_disk = self.versions_on_disk(&name);
            let dir = self.root.join(&name);
            let Ok(config) = ModelConfig::load_over(&self.defaults, &dir.join("config.toml"))
            else {
                continue;
            };
            let wanted = config.version_policy.select(&on_disk);
            let served = self.versions(&name);
            let mut failed = self.poll_failed.lock().unwrap_or_else(|p| p.into_inner());
            // A selection that failed to load is not retried until the files change.
            if wanted == served || failed.get(&name) == Some(&wanted) {
                continue;
            }
            log::info!("repository poll: {name} versions {served:?} -> {wanted:?}");
            match self.load(&name) {
                Ok(_) => {
                    failed.remove(&name);
                    changed.push(name);
                }
                Err(e) => {
                    log::error!("{e}");
                    failed.insert(name, wanted);
                }
            }
        }
        changed
    }

    pub fn unload(&self, name: &str) -> Result<(), RepoError> {
        check_name(name)?;
        if self
            .pipelines
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .is_some()
        {
            return Ok(());
        }
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        match models.remove(name) {
            Some(state) if !state.versions.is_empty() => Ok(()),
            _ => Err(RepoError::NotReady(name.into())),
        }
    }

    /// Loads every model on disk; failures are logged and reported by the index.
    pub fn load_all(&self) -> Vec<(String, Result<Vec<u64>, RepoError>)> {
        self.on_disk()
            .into_iter()
            .map(|name| {
                let r = self.load(&name);
                if let Err(e) = &r {
                    log::error!("{e}");
                }
                (name, r)
            })
            .collect()
    }

    /// A served version: the given one, or the highest.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<Loaded>, RepoError> {
        check_name(name)?;
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let Some(state) = models.get(name).filter(|s| !s.versions.is_empty()) else {
            if models.get(name).is_some_and(|s| s.evicted) {
                return Err(RepoError::Evicted(name.into()));
            }
            // The client learns why, not only that: the file is what an operator must fix.
            if let Some(message) = models.get(name).and_then(|s| s.error.clone()) {
                return Err(RepoError::Load {
                    name: name.into(),
                    message,
                });
            }
            return Err(if self.versions_on_disk(name).is_empty() {
                RepoError::UnknownModel(name.into())
            } else {
                RepoError::NotReady(name.into())
            });
        };
        let found = match version {
            Some(v) => state
                .versions
                .get(&v)
                .cloned()
                .ok_or(RepoError::UnknownVersion {
                    name: name.into(),
                    version: v,
                }),
            None => Ok(state
                .versions
                .values()
                .next_back()
                .cloned()
                .expect("non-empty")),
        };
        if let Ok(l) = &found {
            l.last_used.store(self.now_ms(), Ordering::Relaxed);
        }
        found
    }

    /// Where a request without an explicit version goes: the served version and, in shadow
    /// mode, a version to mirror it to. Without routing, the highest version.
    pub fn route(
        &self,
        name: &str,
        key: Option<&str>,
        seq: u64,
    ) -> Result<(Arc<Loaded>, Option<Arc<Loaded>>), RepoError> {
        let route = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            models
                .get(name)
                .and_then(|s| s.router.as_ref())
                .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).route(key, seq))
        };
        match route {
            None => Ok((self.get(name, None)?, None)),
            Some(r) => {
                let serve = self.get(name, Some(r.serve))?;
                let shadow = r.shadow.and_then(|v| self.get(name, Some(v)).ok());
                Ok((serve, shadow))
            }
        }
    }

    /// The request parameter that keys canary routing for `name`, if it routes.
    pub fn route_key(&self, name: &str) -> Option<String> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let router = models.get(name)?.router.as_ref()?;
        let key = router
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rule()
            .key
            .clone();
        Some(key)
    }

    /// The stable version, when `version` is the canary candidate of `name` (not in shadow mode).
    pub fn stable_for(&self, name: &str, version: u64) -> Option<Arc<Loaded>> {
        let stable = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            let router = models.get(name)?.router.as_ref()?;
            let r = router.lock().unwrap_or_else(|p| p.into_inner());
            (r.rule().candidate == version && !r.rule().shadow).then_some(r.rule().stable)?
        };
        self.get(name, Some(stable)).ok()
    }

    /// Reports how the candidate did on one request; rolls back when the rule trips.
    pub fn record_candidate(&self, name: &str, version: u64, failed: bool, latency: Duration) {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let Some(router) = models.get(name).and_then(|s| s.router.as_ref()) else {
            return;
        };
        let mut router = router.lock().unwrap_or_else(|p| p.into_inner());
        if router.rule().candidate != version {
            return;
        }
        if let Some(reason) = router.record_candidate(failed, latency) {
            log::warn!("{name}: candidate version {version} rolled back: {reason}; all traffic to version {}", router.rule().stable);
        }
    }

    /// Compares a shadow answer with the served one.
    pub fn record_shadow(&self, name: &str, served: &[f32], shadow: &[f32], classes: usize) {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        if let Some(router) = models.get(name).and_then(|s| s.router.as_ref()) {
            router
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record_shadow(served, shadow, classes);
        }
    }

    /// Routing counters per model that has routing, for `/metrics` and the stats endpoint.
    pub fn routing_stats(&self) -> Vec<(String, crate::config::Routing, routing::RouterStats)> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .filter_map(|(n, s)| {
                let r = s.router.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
                Some((n.clone(), r.rule().clone(), r.stats().clone()))
            })
            .collect()
    }

    /// Versions served for `name`.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .get(name)
            .map(|s| s.versions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every loaded version, for metrics.
    pub fn loaded(&self) -> Vec<Arc<Loaded>> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .flat_map(|s| s.versions.values().cloned())
            .collect()
    }

    /// Triton's repository index: every model on disk with its state.
    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![];
        let pipelines = self.pipelines.read().unwrap_or_else(|p| p.into_inner());
        for name in self.on_disk() {
            if pipelines.contains_key(&name) {
                out.push(IndexEntry {
                    name,
                    version: "1".into(),
                    state: "READY".into(),
                    reason: String::new(),
                });
                continue;
            }
            match models.get(&name) {
                Some(s) if !s.versions.is_empty() => {
                    out.extend(s.versions.keys().map(|v| IndexEntry {
                        name: name.clone(),
                        version: v.to_string(),
                        state: "READY".into(),
                        reason: String::new(),
                    }))
                }
                Some(ModelState { evicted: true, .. }) => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: "evicted to respect the memory budget; reloads on demand".into(),
                }),
                Some(ModelState { error: Some(e), .. }) => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: e.clone(),
                }),
                _ => out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: "unloaded".into(),
                }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_repository_are_refused() {
        for bad in [
            "", "..", "../etc", "a/b", ".hidden", "a\\b", "x\0y", "%2e%2e",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["digits", "digits-int8-qdq", "res_block.v2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
    }
}
