//! The app's model store: signed models installed atomically into a directory the app owns,
//! with the fleet's manifest format, signature check and repository layout (tern-update).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tern_update::install::{self, MODEL_FILE};
use tern_update::selftest::SelfTest;
use tern_update::validate::validate;
use tern_update::{decode_manifest, sha256_file, verify, PublicKey, TrustedKeys};

use crate::engine::{Engine, ModelOptions};
use crate::error::{Result, TernError};

/// One version of a model in the store.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ModelVersion {
    pub name: String,
    pub version: u32,
    /// Lower-case hex sha256 of the model file, from its signed manifest.
    pub sha256: String,
    pub size: u64,
    /// The version [`ModelStore::open`] loads: the newest version not rolled back.
    pub active: bool,
    /// Rolled back: kept on disk so [`ModelStore::activate`] can bring it back.
    pub retired: bool,
}

/// Signed models installed into an app directory.
///
/// Every install is verified (signature by a trusted key, size, sha256, optional self-test
/// vector), loaded and run once before it becomes visible with a single rename, so a crash or
/// a refused model never leaves the store half-updated. The newest installed version is the
/// active one; [`ModelStore::rollback`] retires it, [`ModelStore::activate`] picks any kept
/// version. Safe to share between threads.
#[derive(uniffi::Object)]
pub struct ModelStore {
    root: PathBuf,
    trusted: TrustedKeys,
    keep: usize,
    /// Installs and version moves are serialised; loading is not.
    lock: Mutex<()>,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("root", &self.root)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

fn storage(context: &str, path: &Path, e: std::io::Error) -> TernError {
    let full = e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28);
    TernError::Storage(format!(
        "{}{context} {}: {e}",
        if full { "disk full while " } else { "" },
        path.display()
    ))
}

#[uniffi::export]
impl ModelStore {
    /// A store in `directory` (created if missing) that accepts models signed by any of
    /// `trusted_keys` (the text of `tern keygen`'s `.pub` files). `keep_versions` versions of
    /// each model stay on disk for rollback (at least 1).
    #[uniffi::constructor]
    pub fn new(
        directory: String,
        trusted_keys: Vec<String>,
        keep_versions: u32,
    ) -> Result<Arc<ModelStore>> {
        if trusted_keys.is_empty() {
            return Err(TernError::InvalidInput(
                "a model store needs at least one trusted key".into(),
            ));
        }
        let keys = trusted_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                PublicKey::from_text(k)
                    .map_err(|e| TernError::InvalidInput(format!("trusted key {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>>>()?;
        let root = PathBuf::from(directory);
        std::fs::create_dir_all(&root).map_err(|e| storage("creating", &root, e))?;
        Ok(Arc::new(ModelStore {
            root,
            trusted: TrustedKeys::new(keys),
            keep: keep_versions.max(1) as usize,
            lock: Mutex::new(()),
        }))
    }

    /// Installs the model file at `model_path` described by `manifest` (the bytes of a
    /// `manifest.tern` from `tern sign`). `selftest` is required when the manifest names a
    /// self-test vector. The app's file is copied, never moved. Installing a version that is
    /// already installed with the same digest changes nothing.
    pub fn install_file(
        &self,
        model_path: String,
        manifest: Vec<u8>,
        selftest: Option<Vec<u8>>,
    ) -> Result<ModelVersion> {
        self.install(Source::File(Path::new(&model_path)), &manifest, selftest)
    }

    /// Like [`ModelStore::install_file`], for a model held in memory.
    pub fn install_bytes(
        &self,
        model: Vec<u8>,
        manifest: Vec<u8>,
        selftest: Option<Vec<u8>>,
    ) -> Result<ModelVersion> {
        self.install(Source::Bytes(&model), &manifest, selftest)
    }

    /// Names of the models with at least one version, sorted.
    pub fn models(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| tern_update::valid_name(n))
            .filter(|n| {
                !install::versions(&self.root, n).is_empty()
                    || !install::retired_versions(&self.root, n).is_empty()
            })
            .collect();
        names.sort();
        names
    }

    /// Every kept version of `name`, ascending.
    pub fn versions(&self, name: String) -> Result<Vec<ModelVersion>> {
        check_name(&name)?;
        let active = self.active(&name);
        let served = install::versions(&self.root, &name)
            .into_iter()
            .map(|v| (v, install::version_dir(&self.root, &name, v), false));
        let retired = install::retired_versions(&self.root, &name)
            .into_iter()
            .map(|v| (v, install::retired_dir(&self.root, &name, v), true));
        let mut all: Vec<ModelVersion> = served
            .chain(retired)
            .map(|(version, dir, retired)| {
                let m = install::installed_manifest(&dir);
                ModelVersion {
                    name: name.clone(),
                    version,
                    sha256: m
                        .as_ref()
                        .map(|m| tern_update::hex(&m.body.sha256))
                        .unwrap_or_default(),
                    size: m.map(|m| m.body.size).unwrap_or_default(),
                    active: Some(version) == active && !retired,
                    retired,
                }
            })
            .collect();
        all.sort_by_key(|v| v.version);
        Ok(all)
    }

    /// The version [`ModelStore::open`] loads, if any.
    pub fn active_version(&self, name: String) -> Result<Option<u32>> {
        check_name(&name)?;
        Ok(self.active(&name))
    }

    /// Makes `version` the active one: versions above it are retired (kept for going forward
    /// again), a retired `version` is brought back.
    pub fn activate(&self, name: String, version: u32) -> Result<()> {
        check_name(&name)?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let served = install::versions(&self.root, &name);
        if !served.contains(&version) && !install::restore(&self.root, &name, version)? {
            return Err(TernError::NotFound(format!(
                "model `{name}` has no version {version} in the store"
            )));
        }
        for v in served.into_iter().filter(|v| *v > version) {
            install::retire(&self.root, &name, v)?;
        }
        Ok(())
    }

    /// Retires the active version; the next newer-most version becomes active. Returns it.
    pub fn rollback(&self, name: String) -> Result<u32> {
        check_name(&name)?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let served = install::versions(&self.root, &name);
        match served.as_slice() {
            [] => Err(TernError::NotFound(format!(
                "model `{name}` is not in the store"
            ))),
            [only] => Err(TernError::NotFound(format!(
                "model `{name}` has no version before {only} to roll back to"
            ))),
            [.., previous, active] => {
                install::retire(&self.root, &name, *active)?;
                Ok(*previous)
            }
        }
    }

    /// Loads the active version of `name`, after checking its file still has the digest its
    /// signed manifest names (a store is only as good as the disk under it).
    pub fn open(&self, name: String, options: ModelOptions) -> Result<Arc<Engine>> {
        check_name(&name)?;
        let version = self
            .active(&name)
            .ok_or_else(|| TernError::NotFound(format!("model `{name}` is not in the store")))?;
        let dir = install::version_dir(&self.root, &name, version);
        let file = dir.join(MODEL_FILE);
        let manifest = install::installed_manifest(&dir).ok_or_else(|| {
            TernError::Rejected(format!(
                "model `{name}` version {version} has no readable manifest"
            ))
        })?;
        if sha256_file(&file)? != manifest.body.sha256 {
            return Err(TernError::Rejected(format!(
                "model `{name}` version {version} changed on disk since it was installed; \
                 install it again"
            )));
        }
        Engine::from_path(file.display().to_string(), options)
    }

    /// Removes `name` entirely.
    pub fn remove(&self, name: String) -> Result<()> {
        check_name(&name)?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.root.join(&name);
        if !dir.exists() {
            return Err(TernError::NotFound(format!(
                "model `{name}` is not in the store"
            )));
        }
        std::fs::remove_dir_all(&dir).map_err(|e| storage("removing", &dir, e))
    }
}

enum Source<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

fn check_name(name: &str) -> Result<()> {
    if tern_update::valid_name(name) {
        Ok(())
    } else {
        Err(TernError::InvalidInput(format!(
            "`{name}` is not a model name (letters, digits, `_`, `-`, `.`)"
        )))
    }
}

impl ModelStore {
    fn active(&self, name: &str) -> Option<u32> {
        install::versions(&self.root, name).last().copied()
    }

    fn install(
        &self,
        source: Source<'_>,
        manifest: &[u8],
        selftest: Option<Vec<u8>>,
    ) -> Result<ModelVersion> {
        let manifest = decode_manifest(manifest)?;
        verify(&manifest, &self.trusted)?;
        let body = &manifest.body;
        let name = body.name.as_str().to_owned();
        let selftest =
            match (body.selftest, selftest) {
                (Some(digest), Some(bytes)) => {
                    Some((SelfTest::decode_verified(&bytes, &digest)?, bytes))
                }
                (Some(_), None) => {
                    return Err(TernError::Rejected(format!(
                        "`{name}` version {}: the manifest names a self-test vector; pass it",
                        body.version
                    )))
                }
                (None, Some(_)) => return Err(TernError::InvalidInput(
                    "the manifest names no self-test vector, so an unsigned one is not accepted"
                        .into(),
                )),
                (None, None) => None,
            };
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // The copy is what gets checked and installed: the app's file may change under us.
        let incoming = self.root.join(".incoming");
        std::fs::create_dir_all(&incoming).map_err(|e| storage("creating", &incoming, e))?;
        let copy = incoming.join(format!("{}.onnx", tern_update::hex(&body.sha256)));
        let written = match source {
            Source::File(path) => std::fs::copy(path, &copy).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    TernError::NotFound(format!("no model file at {}: {e}", path.display()))
                } else {
                    storage("copying", path, e)
                }
            }),
            Source::Bytes(bytes) => std::fs::write(&copy, bytes)
                .map(|()| bytes.len() as u64)
                .map_err(|e| storage("writing", &copy, e)),
        };
        let result = written.and_then(|n| {
            if n != body.size {
                return Err(TernError::Rejected(format!(
                    "`{name}` version {}: the model has {n} bytes, the manifest says {}",
                    body.version, body.size
                )));
            }
            let got = sha256_file(&copy)?;
            if got != body.sha256 {
                return Err(TernError::Rejected(format!(
                    "`{name}` version {}: the model's sha256 is {}, the manifest says {}",
                    body.version,
                    tern_update::hex(&got),
                    tern_update::hex(&body.sha256)
                )));
            }
            // Checked after the bytes: a tampered file with an installed manifest is still
            // an error, not a no-op.
            let existing = install::version_dir(&self.root, &name, body.version);
            if install::installed_manifest(&existing).is_some_and(|m| m.body.sha256 == body.sha256)
                && existing.join(MODEL_FILE).is_file()
            {
                return Ok(false);
            }
            let pending = install::stage(
                &self.root,
                &manifest,
                &copy,
                selftest.as_ref().map(|(_, b)| b.as_slice()),
            )?;
            // Signed is not the same as runnable here: load, warm up and self-test before
            // the version becomes visible.
            let options = tern_core::ModelOptions::default();
            if let Err(invalid) = validate(
                &pending.join(MODEL_FILE),
                &options,
                selftest.as_ref().map(|(st, _)| st),
            ) {
                let _ = std::fs::remove_dir_all(&pending);
                return Err(TernError::Rejected(format!(
                    "`{name}` version {} does not run here: {}",
                    body.version, invalid.message
                )));
            }
            install::activate(&self.root, &name, body.version)?;
            Ok(true)
        });
        let _ = std::fs::remove_file(&copy);
        if !result? {
            return self.describe(&name, body.version);
        }
        let active = self.active(&name);
        let removed = install::prune(&self.root, &name, self.keep, active);
        log::info!(
            "installed `{name}` version {} (active {active:?}, pruned {})",
            body.version,
            removed.len()
        );
        if !install::version_dir(&self.root, &name, body.version).exists() {
            return Err(TernError::Rejected(format!(
                "`{name}` version {} is older than the {} newest versions the store keeps",
                body.version, self.keep
            )));
        }
        self.describe(&name, body.version)
    }

    fn describe(&self, name: &str, version: u32) -> Result<ModelVersion> {
        self.versions(name.to_owned())?
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| TernError::Internal(format!("`{name}` version {version} vanished")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_update::{encode_manifest, sign, SecretKey};

    fn model_bytes(variant: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../models")
                .join(variant)
                .join("1/model.onnx"),
        )
        .unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        key: SecretKey,
        store: Arc<ModelStore>,
    }

    fn fixture(keep: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let store = ModelStore::new(
            dir.path().join("store").display().to_string(),
            vec![key.public().to_text()],
            keep,
        )
        .unwrap();
        Fixture { dir, key, store }
    }

    impl Fixture {
        fn manifest(&self, name: &str, version: u32, bytes: &[u8]) -> Vec<u8> {
            encode_manifest(&sign(name, version, bytes, 4096, None, &self.key).unwrap())
        }

        fn install(&self, name: &str, version: u32, bytes: &[u8]) -> Result<ModelVersion> {
            self.store
                .install_bytes(bytes.to_vec(), self.manifest(name, version, bytes), None)
        }

        /// Everything under the store's directory except the hidden incoming area.
        fn listing(&self) -> Vec<String> {
            fn walk(dir: &Path, out: &mut Vec<String>, root: &Path) {
                for e in std::fs::read_dir(dir).unwrap().flatten() {
                    let p = e.path();
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                    if p.is_dir() {
                        walk(&p, out, root);
                    }
                }
            }
            let root = self.dir.path().join("store");
            let mut out = vec![];
            walk(&root, &mut out, &root);
            out.retain(|p| p != ".incoming");
            out.sort();
            out
        }
    }

    #[test]
    fn installed_versions_activate_roll_back_and_come_back() {
        let f = fixture(3);
        let v1 = f.install("digits", 1, &model_bytes("digits")).unwrap();
        assert!(v1.active && !v1.retired);
        let engine = f
            .store
            .open("digits".into(), ModelOptions::default())
            .unwrap();
        assert_eq!(engine.inputs()[0].shape, vec![-1, 1, 8, 8]);

        let v2 = f
            .install("digits", 2, &model_bytes("digits-int8-qdq"))
            .unwrap();
        assert!(v2.active);
        let engine = f
            .store
            .open("digits".into(), ModelOptions::default())
            .unwrap();
        assert!(engine.kernel_counts().int8 > 0, "version 2 is the int8 one");

        assert_eq!(f.store.rollback("digits".into()).unwrap(), 1);
        assert_eq!(f.store.active_version("digits".into()).unwrap(), Some(1));
        let versions = f.store.versions("digits".into()).unwrap();
        assert_eq!(
            versions
                .iter()
                .map(|v| (v.version, v.active, v.retired))
                .collect::<Vec<_>>(),
            vec![(1, true, false), (2, false, true)]
        );
        assert!(matches!(
            f.store.rollback("digits".into()),
            Err(TernError::NotFound(_))
        ));

        f.store.activate("digits".into(), 2).unwrap();
        assert_eq!(f.store.active_version("digits".into()).unwrap(), Some(2));
        f.store.activate("digits".into(), 1).unwrap();
        assert_eq!(f.store.active_version("digits".into()).unwrap(), Some(1));
        assert!(matches!(
            f.store.activate("digits".into(), 9),
            Err(TernError::NotFound(_))
        ));
        assert_eq!(f.store.models(), vec!["digits".to_string()]);
        // Reinstalling what is there is a no-op, not an error; tampered bytes still are one.
        let again = f.install("digits", 1, &model_bytes("digits")).unwrap();
        assert_eq!(again.sha256, v1.sha256);
        let mut tampered = model_bytes("digits");
        tampered[300] ^= 1;
        let r = f.store.install_bytes(
            tampered,
            f.manifest("digits", 1, &model_bytes("digits")),
            None,
        );
        assert!(matches!(r, Err(TernError::Rejected(_))), "{r:?}");
    }

    #[test]
    fn refused_installs_leave_the_store_as_it_was() {
        let f = fixture(3);
        let good = model_bytes("digits");
        f.install("digits", 1, &good).unwrap();
        let before = f.listing();

        let rejected = |r: Result<ModelVersion>, what: &str| match r {
            Err(TernError::Rejected(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a rejection mentioning `{what}`, got {other:?}"),
        };
        // Signed by a key the store does not trust.
        let stranger = SecretKey::generate().unwrap();
        let m = encode_manifest(&sign("digits", 2, &good, 4096, None, &stranger).unwrap());
        rejected(
            f.store.install_bytes(good.clone(), m, None),
            "does not trust",
        );
        // A signature that does not verify: one byte of the manifest's body changed.
        let mut forged = sign("digits", 2, &good, 4096, None, &f.key).unwrap();
        forged.body.version = 3;
        rejected(
            f.store
                .install_bytes(good.clone(), encode_manifest(&forged), None),
            "signature",
        );
        // Tampered and truncated models.
        let manifest = f.manifest("digits", 2, &good);
        let mut tampered = good.clone();
        tampered[100] ^= 1;
        rejected(
            f.store.install_bytes(tampered, manifest.clone(), None),
            "sha256",
        );
        rejected(
            f.store
                .install_bytes(good[..good.len() - 1].to_vec(), manifest.clone(), None),
            "bytes",
        );
        // Not a manifest at all.
        rejected(
            f.store
                .install_bytes(good.clone(), b"garbage".to_vec(), None),
            "manifest",
        );
        // Signed, intact, but not a model that runs.
        let junk = b"signed but not onnx".to_vec();
        rejected(f.install("digits", 2, &junk), "does not run here");
        // A self-test the manifest requires but the app did not pass.
        let st = tern_update::selftest::SelfTest {
            inputs: vec![],
            expected: vec![],
            atol: 0.0,
            rtol: 0.0,
        }
        .encode();
        let with_st = sign(
            "digits",
            2,
            &good,
            4096,
            Some(tern_update::sha256(&st)),
            &f.key,
        )
        .unwrap();
        rejected(
            f.store
                .install_bytes(good.clone(), encode_manifest(&with_st), None),
            "self-test",
        );
        // A missing file.
        let missing = f.store.install_file(
            "/nonexistent/model.onnx".into(),
            f.manifest("digits", 2, &good),
            None,
        );
        assert!(
            matches!(missing, Err(TernError::NotFound(_))),
            "{missing:?}"
        );

        assert_eq!(f.listing(), before);
        assert_eq!(f.store.active_version("digits".into()).unwrap(), Some(1));
    }

    #[test]
    fn a_self_test_vector_is_checked_before_the_version_serves() {
        let f = fixture(3);
        let bytes = model_bytes("digits");
        let model = tern_core::Model::from_bytes(&bytes, &Default::default()).unwrap();
        let x = tern_core::Tensor::from_vec(vec![1, 1, 8, 8], vec![0.5f32; 64]).unwrap();
        let name = model.info().inputs[0].name.clone();
        let st = tern_update::validate::record_selftest(&model, &[(name, x)], 1e-4, 1e-4)
            .unwrap()
            .encode();
        let digest = Some(tern_update::sha256(&st));
        let good = encode_manifest(&sign("digits", 1, &bytes, 4096, digest, &f.key).unwrap());
        f.store
            .install_bytes(bytes.clone(), good, Some(st.clone()))
            .unwrap();
        // Another model, signed with the same vector: it cannot reproduce the outputs.
        let other = model_bytes("resblock");
        let m = encode_manifest(&sign("digits", 2, &other, 4096, digest, &f.key).unwrap());
        let r = f.store.install_bytes(other, m, Some(st));
        assert!(
            matches!(&r, Err(TernError::Rejected(m)) if m.contains("does not run here")),
            "{r:?}"
        );
        assert_eq!(f.store.active_version("digits".into()).unwrap(), Some(1));
    }

    #[test]
    fn a_model_changed_on_disk_is_not_loaded() {
        let f = fixture(3);
        f.install("digits", 1, &model_bytes("digits")).unwrap();
        let file = f.dir.path().join("store/digits/1/model.onnx");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[200] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        let r = f.store.open("digits".into(), ModelOptions::default());
        assert!(
            matches!(&r, Err(TernError::Rejected(m)) if m.contains("changed on disk")),
            "{r:?}"
        );
    }

    #[test]
    fn old_versions_beyond_the_kept_count_are_pruned() {
        let f = fixture(2);
        let bytes = model_bytes("digits");
        for v in 1..=3 {
            f.install("digits", v, &bytes).unwrap();
        }
        let kept: Vec<u32> = f
            .store
            .versions("digits".into())
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(kept, vec![2, 3]);
        let r = f.install("digits", 1, &bytes);
        assert!(
            matches!(&r, Err(TernError::Rejected(m)) if m.contains("older")),
            "{r:?}"
        );
        f.store.remove("digits".into()).unwrap();
        assert!(f.store.models().is_empty());
    }

    #[test]
    fn bad_names_and_keys_are_refused() {
        let f = fixture(2);
        for name in ["../etc", "", ".hidden", "a/b"] {
            assert!(matches!(
                f.store.versions(name.into()),
                Err(TernError::InvalidInput(_))
            ));
        }
        let dir = f.dir.path().display().to_string();
        assert!(matches!(
            ModelStore::new(dir.clone(), vec![], 2),
            Err(TernError::InvalidInput(_))
        ));
        assert!(matches!(
            ModelStore::new(dir, vec!["not a key".into()], 2),
            Err(TernError::InvalidInput(m)) if m.contains("trusted key 1")
        ));
    }
}
