//! Atomic installation into a repository laid out as `ROOT/NAME/VERSION/model.onnx`.
//!
//! A version is visible to the server only as a directory named by its number. Everything
//! before that happens under a hidden name (`.VERSION.pending`), made durable, so a crash at
//! any point leaves either the old set of versions or the new one, never a half-written model.

use std::path::{Path, PathBuf};

use tern_proto::Manifest;

use crate::staging::{sync_dir, write_durably};
use crate::UpdateError;

/// The manifest a fleet-installed version keeps beside its model.
pub const MANIFEST_FILE: &str = "manifest.tern";
pub const SELFTEST_FILE: &str = "selftest.tern";
pub const MODEL_FILE: &str = "model.onnx";

fn io(context: &str, path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError {
    let context = format!("{context} {}", path.display());
    move |e| UpdateError::io(context, e)
}

pub fn pending_dir(root: &Path, name: &str, version: u32) -> PathBuf {
    root.join(name).join(format!(".{version}.pending"))
}

pub fn version_dir(root: &Path, name: &str, version: u32) -> PathBuf {
    root.join(name).join(version.to_string())
}

pub fn retired_dir(root: &Path, name: &str, version: u32) -> PathBuf {
    root.join(name).join(format!(".{version}.retired"))
}

fn check(name: &str) -> Result<(), UpdateError> {
    if crate::valid_name(name) {
        Ok(())
    } else {
        Err(UpdateError::InvalidManifest(format!(
            "model name `{name}` is not allowed"
        )))
    }
}

/// Moves a verified artifact into the hidden pending directory of its version, with its
/// manifest and optional self-test vector, durably. Returns the pending directory.
pub fn stage(
    root: &Path,
    manifest: &Manifest,
    artifact: &Path,
    selftest: Option<&[u8]>,
) -> Result<PathBuf, UpdateError> {
    let (name, version) = (manifest.body.name.as_str(), manifest.body.version);
    check(name)?;
    let model_dir = root.join(name);
    std::fs::create_dir_all(&model_dir).map_err(io("creating", &model_dir))?;
    let pending = pending_dir(root, name, version);
    if pending.exists() {
        std::fs::remove_dir_all(&pending).map_err(io("clearing", &pending))?;
    }
    std::fs::create_dir(&pending).map_err(io("creating", &pending))?;
    let model = pending.join(MODEL_FILE);
    if std::fs::rename(artifact, &model).is_err() {
        // Another filesystem: copy, then make the copy durable.
        std::fs::copy(artifact, &model).map_err(io("copying into", &pending))?;
        std::fs::File::open(&model)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", &model))?;
    }
    write_manifest(&pending, manifest)?;
    if let Some(st) = selftest {
        write_durably(&pending.join(SELFTEST_FILE), st)?;
    }
    sync_dir(&pending)?;
    sync_dir(&model_dir)?;
    Ok(pending)
}

/// Makes a pending version visible with one rename. A directory already holding that version
/// number is retired first.
pub fn activate(root: &Path, name: &str, version: u32) -> Result<PathBuf, UpdateError> {
    check(name)?;
    let pending = pending_dir(root, name, version);
    let target = version_dir(root, name, version);
    if target.exists() {
        retire(root, name, version)?;
    }
    std::fs::rename(&pending, &target).map_err(io("activating", &pending))?;
    sync_dir(&root.join(name))?;
    Ok(target)
}

/// Takes a served version out of the server's sight (`.VERSION.retired`), kept for diagnosis
/// until [`prune`] runs.
pub fn retire(root: &Path, name: &str, version: u32) -> Result<(), UpdateError> {
    check(name)?;
    let dir = version_dir(root, name, version);
    let retired = retired_dir(root, name, version);
    if retired.exists() {
        std::fs::remove_dir_all(&retired).map_err(io("clearing", &retired))?;
    }
    std::fs::rename(&dir, &retired).map_err(io("retiring", &dir))?;
    sync_dir(&root.join(name))
}

/// Brings a retired version back (a rollback to a version the device already had).
pub fn restore(root: &Path, name: &str, version: u32) -> Result<bool, UpdateError> {
    check(name)?;
    let retired = retired_dir(root, name, version);
    if !retired.join(MODEL_FILE).is_file() {
        return Ok(false);
    }
    std::fs::rename(&retired, version_dir(root, name, version))
        .map_err(io("restoring", &retired))?;
    sync_dir(&root.join(name))?;
    Ok(true)
}

/// Records `manifest` beside the model in a version's directory, durably.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), UpdateError> {
    write_durably(&dir.join(MANIFEST_FILE), &crate::encode_manifest(manifest))?;
    sync_dir(dir)
}

/// The manifest of an installed (`Some(true)` for pending) version, if the fleet installed it.
pub fn installed_manifest(dir: &Path) -> Option<Manifest> {
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    crate::decode_manifest(&bytes).ok()
}

/// Versions served from `ROOT/NAME`, ascending.
pub fn versions(root: &Path, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(root.join(name)) else {
        return vec![];
    };
    let mut v: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|v: &u32| version_dir(root, name, *v).join(MODEL_FILE).is_file())
        .collect();
    v.sort_unstable();
    v
}

/// Versions retired from service that [`restore`] can bring back, ascending.
pub fn retired_versions(root: &Path, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(root.join(name)) else {
        return vec![];
    };
    let mut v: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_owned();
            n.strip_prefix('.')?.strip_suffix(".retired")?.parse().ok()
        })
        .filter(|v: &u32| retired_dir(root, name, *v).join(MODEL_FILE).is_file())
        .collect();
    v.sort_unstable();
    v
}

/// Deletes pending leftovers, then every version, served or retired, but the newest `keep`
/// and `active`. Returns what it removed.
pub fn prune(root: &Path, name: &str, keep: usize, active: Option<u32>) -> Vec<PathBuf> {
    let mut removed = vec![];
    let dir = root.join(name);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(".pending") {
                let _ = std::fs::remove_dir_all(e.path());
                removed.push(e.path());
            }
        }
    }
    let mut all: Vec<(u32, PathBuf)> = versions(root, name)
        .into_iter()
        .map(|v| (v, version_dir(root, name, v)))
        .chain(
            retired_versions(root, name)
                .into_iter()
                .map(|v| (v, retired_dir(root, name, v))),
        )
        .collect();
    all.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    for (i, (v, path)) in all.into_iter().enumerate() {
        if i >= keep.max(1) && Some(v) != active {
            let _ = std::fs::remove_dir_all(&path);
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sign, SecretKey};

    fn staged(root: &Path, version: u32, bytes: &[u8]) -> Manifest {
        let m = sign(
            "m",
            version,
            bytes,
            64,
            None,
            &SecretKey::generate().unwrap(),
        )
        .unwrap();
        let tmp = root.join(format!("art{version}"));
        std::fs::write(&tmp, bytes).unwrap();
        stage(root, &m, &tmp, Some(b"st")).unwrap();
        m
    }

    #[test]
    fn a_pending_version_is_invisible_until_activated() {
        let root = tempfile::tempdir().unwrap();
        let m = staged(root.path(), 2, b"model-two");
        assert!(versions(root.path(), "m").is_empty());
        activate(root.path(), "m", 2).unwrap();
        assert_eq!(versions(root.path(), "m"), vec![2]);
        let dir = version_dir(root.path(), "m", 2);
        assert_eq!(std::fs::read(dir.join(MODEL_FILE)).unwrap(), b"model-two");
        assert_eq!(installed_manifest(&dir), Some(m));
        assert_eq!(std::fs::read(dir.join(SELFTEST_FILE)).unwrap(), b"st");
    }

    #[test]
    fn retire_and_restore_move_a_version_out_of_and_back_into_service() {
        let root = tempfile::tempdir().unwrap();
        staged(root.path(), 1, b"one");
        activate(root.path(), "m", 1).unwrap();
        staged(root.path(), 2, b"two");
        activate(root.path(), "m", 2).unwrap();
        retire(root.path(), "m", 2).unwrap();
        assert_eq!(versions(root.path(), "m"), vec![1]);
        assert!(restore(root.path(), "m", 2).unwrap());
        assert_eq!(versions(root.path(), "m"), vec![1, 2]);
        assert!(!restore(root.path(), "m", 7).unwrap());
    }

    #[test]
    fn prune_keeps_the_newest_versions_and_drops_leftovers() {
        let root = tempfile::tempdir().unwrap();
        for v in 1..=3 {
            staged(root.path(), v, b"x");
            activate(root.path(), "m", v).unwrap();
        }
        staged(root.path(), 4, b"x");
        prune(root.path(), "m", 2, Some(3));
        assert_eq!(versions(root.path(), "m"), vec![2, 3]);
        assert!(!pending_dir(root.path(), "m", 4).exists());
    }

    #[test]
    fn prune_counts_retired_versions_and_never_removes_the_active_one() {
        let root = tempfile::tempdir().unwrap();
        for v in 1..=3 {
            staged(root.path(), v, b"x");
            activate(root.path(), "m", v).unwrap();
        }
        // Rolled back from 3 to 2: 3 stays available to go forward again, 1 goes.
        retire(root.path(), "m", 3).unwrap();
        prune(root.path(), "m", 2, Some(2));
        assert_eq!(versions(root.path(), "m"), vec![2]);
        assert_eq!(retired_versions(root.path(), "m"), vec![3]);
        // Keeping one: the active version survives even when a retired one is newer.
        prune(root.path(), "m", 1, Some(2));
        assert_eq!(versions(root.path(), "m"), vec![2]);
    }
}
