//! ed25519 keys in small text files: `tern-ed25519-secret-v1 HEX` / `tern-ed25519-public-v1 HEX`.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

use crate::UpdateError;

const SECRET_TAG: &str = "tern-ed25519-secret-v1";
const PUBLIC_TAG: &str = "tern-ed25519-public-v1";

/// A fleet manager's signing key.
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.public().id_hex())
    }
}

/// A key devices trust.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.id_hex())
    }
}

fn parse_line(text: &str, tag: &str) -> Result<[u8; 32], String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("empty file")?;
    let hex = line
        .strip_prefix(tag)
        .ok_or_else(|| format!("expected a line starting with `{tag}`"))?
        .trim();
    let mut out = [0u8; 32];
    ::hex::decode_to_slice(hex, &mut out).map_err(|e| format!("bad key hex: {e}"))?;
    Ok(out)
}

fn read(path: &Path) -> Result<String, UpdateError> {
    std::fs::read_to_string(path).map_err(|e| UpdateError::KeyFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, UpdateError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| UpdateError::KeyFile {
            path: "<random>".into(),
            reason: format!("no randomness available: {e}"),
        })?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn from_text(text: &str) -> Result<SecretKey, String> {
        parse_line(text, SECRET_TAG).map(|b| SecretKey(SigningKey::from_bytes(&b)))
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", ::hex::encode(self.0.to_bytes()))
    }

    pub fn load(path: &Path) -> Result<SecretKey, UpdateError> {
        SecretKey::from_text(&read(path)?).map_err(|reason| UpdateError::KeyFile {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Writes the key readable by its owner only; refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), UpdateError> {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options
            .open(path)
            .map_err(|e| UpdateError::io(format!("creating {}", path.display()), e))?;
        f.write_all(self.to_text().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| UpdateError::io(format!("writing {}", path.display()), e))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl PublicKey {
    pub fn from_text(text: &str) -> Result<PublicKey, String> {
        let bytes = parse_line(text, PUBLIC_TAG)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|e| format!("not an ed25519 public key: {e}"))
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", ::hex::encode(self.0.as_bytes()))
    }

    pub fn load(path: &Path) -> Result<PublicKey, UpdateError> {
        PublicKey::from_text(&read(path)?).map_err(|reason| UpdateError::KeyFile {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, String> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|e| format!("not an ed25519 public key: {e}"))
    }

    /// First 8 bytes of sha256(public key): how a manifest names its signer.
    pub fn id(&self) -> [u8; 8] {
        let digest = crate::sha256(self.0.as_bytes());
        digest[..8].try_into().expect("8 of 32 bytes")
    }

    pub fn id_hex(&self) -> String {
        ::hex::encode(self.id())
    }

    pub(crate) fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        // Strict verification refuses malleable and small-order signatures.
        self.0.verify_strict(message, &sig).is_ok() && self.0.verify(message, &sig).is_ok()
    }
}

/// The keys a device accepts manifests from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn load(paths: &[impl AsRef<Path>]) -> Result<TrustedKeys, UpdateError> {
        let keys = paths
            .iter()
            .map(|p| PublicKey::load(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn find(&self, id: &[u8; 8]) -> Option<&PublicKey> {
        self.keys.iter().find(|k| &k.id() == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text_form() {
        let secret = SecretKey::generate().unwrap();
        let again = SecretKey::from_text(&secret.to_text()).unwrap();
        assert_eq!(again.public(), secret.public());
        let public = PublicKey::from_text(&secret.public().to_text()).unwrap();
        assert_eq!(public, secret.public());
    }

    #[test]
    fn a_public_key_is_not_accepted_as_a_secret_one() {
        let secret = SecretKey::generate().unwrap();
        let err = SecretKey::from_text(&secret.public().to_text()).unwrap_err();
        assert!(err.contains("tern-ed25519-secret-v1"), "{err}");
        assert!(PublicKey::from_text("tern-ed25519-public-v1 abcd").is_err());
    }

    #[test]
    fn saving_a_key_never_overwrites_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        SecretKey::generate().unwrap().save(&path).unwrap();
        assert!(SecretKey::generate().unwrap().save(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "secret key readable by others: {mode:o}");
        }
    }
}
