//! Signed model updates, shared by ternd's fleet agent, the `tern` CLI and the app bindings:
//! one implementation of keys, manifests, resumable staging and atomic installation.
//!
//! The flow an artifact takes on a device:
//! 1. [`verify`] its manifest against [`TrustedKeys`] (unknown key or bad signature: refused);
//! 2. [`Staging`] receives its chunks in any order, any number of times, across restarts
//!    (the received-chunk bitmap is on disk), and checks the sha256 when complete;
//! 3. [`install::stage`] moves the verified file beside the served versions, hidden and durable;
//! 4. the caller validates it (load, warm-up, self-test) and [`install::activate`] makes it
//!    visible with one rename; [`install::retire`] takes a version back out of service.
//!
//! The repository layout is Triton's: `ROOT/NAME/VERSION/model.onnx`.

mod error;
pub mod install;
mod keys;
mod manifest;
pub mod selftest;
mod staging;
#[cfg(feature = "validate")]
pub mod validate;

pub use error::UpdateError;
pub use keys::{PublicKey, SecretKey, TrustedKeys};
pub use manifest::{
    chunk_count, decode_manifest, encode_manifest, sha256, sha256_file, sign, verify,
    DEFAULT_CHUNK_SIZE,
};
pub use staging::Staging;
pub use tern_proto::{FailureCode, Manifest, ManifestBody};

/// Model names become path components: anything that could leave the repository is refused.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Lower-case hex of a digest, as used in topic names and staging directories.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}
