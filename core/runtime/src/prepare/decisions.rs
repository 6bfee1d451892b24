//! What a load learned about a model, kept on disk for the next load of the same model.
//!
//! tract cannot serialise an optimized plan, so the expensive part of preparation cannot be
//! cached. What can is what Tern measured to choose a plan: whether a symbolic plan survives a
//! probe run (`auto`; 43 ms on MobileNetV3-Small) and which of symbolic and concrete plans runs
//! faster (`fastest` prepares both and times them: 685 ms on MobileNetV3-Small). With the
//! verdict cached, a later load (a daemon restart, an app's next launch) prepares only the plan
//! it will serve.
//!
//! Entries are keyed by the model's sha256, tract's version, what Tern's kernels are, the CPU's
//! features and every option that shapes the plan, so a new model version, a tract or Tern
//! upgrade that changes the plans, or a different CPU decides again. An entry that cannot be
//! read, or a cache that cannot be written (read-only, full disk), costs the decision again
//! and nothing else.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::inspect::PlanKind;
use crate::model::{ModelOptions, PlanMode};

/// A decision taken at an earlier load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) kind: PlanKind,
    /// Why that plan was chosen then (what failed, what was measured).
    pub(crate) why: String,
}

/// The cache entry of one model under one set of options.
pub(crate) struct Decisions {
    path: PathBuf,
}

/// First line of an entry: a format tag, so that a future layout is not misread.
const TAG: &str = "tern-plan-decision 1";

/// What Tern's plans are made of, in the key: a verdict timed on other kernels ("fastest")
/// is stale once Tern places different ones. Changed with every such release.
const PLANNER: &str = "kernels 2: f32 pointwise and unrolled convolutions";

impl Decisions {
    /// The entry for `model_sha256` (the model file's digest) prepared with `options`.
    pub(crate) fn new(dir: &Path, model_sha256: &[u8], options: &ModelOptions) -> Decisions {
        let mut key = Sha256::new();
        key.update(model_sha256);
        key.update(super::tract_version().as_bytes());
        key.update(PLANNER.as_bytes());
        key.update(cpu_features().as_bytes());
        // Every option but where the cache lives and how many threads prepare the plans;
        // `auto` and `fastest` decide differently.
        let options = ModelOptions {
            cache_dir: None,
            prepare_threads: None,
            ..options.clone()
        };
        key.update(format!("{options:?}").as_bytes());
        let name: String = key.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Decisions {
            path: dir.join(format!("{name}.plan")),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The cached verdict, if there is a readable one.
    pub(crate) fn read(&self) -> Option<Verdict> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!(
                    "plan decision {} unreadable ({e}); deciding again",
                    self.path.display()
                );
                return None;
            }
        };
        let verdict = parse(&text);
        if verdict.is_none() {
            log::warn!(
                "plan decision {} is malformed; deciding again",
                self.path.display()
            );
        }
        verdict
    }

    /// Keeps a verdict for the next load: written aside, then renamed over the entry, so a
    /// reader never sees half of one. Failing to write is logged, never an error.
    pub(crate) fn write(&self, verdict: &Verdict) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        // Unique per write: two loads of one model in one process may decide at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .path
            .with_extension(format!("tmp.{}.{n}", std::process::id()));
        let body = format!("{TAG}\n{}\n{}\n", verdict.kind, one_line(&verdict.why));
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::File::create(&tmp))
            .and_then(|mut f| f.write_all(body.as_bytes()).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => log::debug!("plan decision kept in {}", self.path.display()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                log::warn!(
                    "could not keep the plan decision in {} ({e}); the next load decides again",
                    self.path.display()
                );
            }
        }
    }

    /// Drops a verdict that did not hold.
    pub(crate) fn forget(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `mode` decides anything worth keeping.
pub(crate) fn decides(mode: PlanMode) -> bool {
    matches!(mode, PlanMode::Auto | PlanMode::Fastest)
}

fn parse(text: &str) -> Option<Verdict> {
    let mut lines = text.lines();
    if lines.next()? != TAG {
        return None;
    }
    let kind = match lines.next()? {
        "symbolic" => PlanKind::Symbolic,
        "concrete" => PlanKind::Concrete,
        _ => return None,
    };
    let why = lines.next()?.to_string();
    Some(Verdict { kind, why })
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The CPU features tract picks kernels by: a plan timed on one CPU says nothing of another.
fn cpu_features() -> String {
    #[allow(unused_mut)]
    let mut found: Vec<&str> = vec![std::env::consts::ARCH];
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$( if std::is_x86_feature_detected!($f) { found.push($f); } )*};
        }
        check!("avx", "avx2", "fma", "f16c", "avx512f", "avx512vnni");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$( if std::arch::is_aarch64_feature_detected!($f) { found.push($f); } )*};
        }
        check!("asimd", "fp16", "dotprod", "i8mm");
    }
    found.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tern-decisions-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_verdict_reads_back_and_other_models_or_options_miss_it() {
        let d = dir("roundtrip");
        let options = ModelOptions::default();
        let entry = Decisions::new(&d, b"model-a", &options);
        assert_eq!(entry.read(), None);
        let verdict = Verdict {
            kind: PlanKind::Concrete,
            why: "faster than the symbolic plan\nat batch 1".into(),
        };
        entry.write(&verdict);
        let back = Decisions::new(&d, b"model-a", &options).read().unwrap();
        assert_eq!(back.kind, PlanKind::Concrete);
        assert_eq!(back.why, "faster than the symbolic plan at batch 1");
        assert_eq!(Decisions::new(&d, b"model-b", &options).read(), None);
        let threads = ModelOptions {
            threads: 2,
            ..ModelOptions::default()
        };
        assert_eq!(Decisions::new(&d, b"model-a", &threads).read(), None);
        // Where the cache lives is not part of the key, nor how many threads prepare.
        let elsewhere = ModelOptions {
            cache_dir: Some(d.clone()),
            prepare_threads: Some(1),
            ..ModelOptions::default()
        };
        assert!(Decisions::new(&d, b"model-a", &elsewhere).read().is_some());
        entry.forget();
        assert_eq!(entry.read(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn loads_deciding_at_once_leave_one_whole_entry() {
        let d = dir("racing");
        let entry = Decisions::new(&d, b"model", &ModelOptions::default());
        std::thread::scope(|s| {
            for i in 0..8 {
                let entry = &entry;
                s.spawn(move || {
                    entry.write(&Verdict {
                        kind: if i % 2 == 0 {
                            PlanKind::Symbolic
                        } else {
                            PlanKind::Concrete
                        },
                        why: format!("writer {i}"),
                    })
                });
            }
        });
        assert!(entry.read().is_some());
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_entries_are_ignored() {
        let d = dir("malformed");
        let entry = Decisions::new(&d, b"model", &ModelOptions::default());
        std::fs::create_dir_all(&d).unwrap();
        for bad in [
            "",
            "concrete\nwhy\n",
            "tern-plan-decision 1\nsideways\nwhy\n",
            "\u{0}\u{1}",
        ] {
            std::fs::write(entry.path(), bad).unwrap();
            assert_eq!(entry.read(), None, "{bad:?}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unwritable_cache_is_only_a_warning() {
        // A file where the directory should be: create_dir_all fails, as on a read-only disk.
        let d = dir("unwritable");
        std::fs::write(&d, b"not a directory").unwrap();
        let entry = Decisions::new(&d.join("sub"), b"model", &ModelOptions::default());
        entry.write(&Verdict {
            kind: PlanKind::Symbolic,
            why: "w".into(),
        });
        assert_eq!(entry.read(), None);
        std::fs::remove_file(&d).unwrap();
    }
}
