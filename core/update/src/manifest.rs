//! Building, signing, checking and (de)coding manifests.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};
use tern_proto::{Manifest, ManifestBody, Name};

use crate::{PublicKey, SecretKey, TrustedKeys, UpdateError};

/// 60 KiB: a chunk frame stays under 64 KiB, well inside AWS IoT's 128 KiB message limit.
pub const DEFAULT_CHUNK_SIZE: u32 = 60 * 1024;

/// Most chunks an artifact may have: bounds the received-chunk bitmap (128 KiB) whatever a
/// manifest claims. At the default chunk size that is 60 GiB.
pub const MAX_CHUNKS: u32 = 1 << 20;

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn sha256_file(path: &Path) -> Result<[u8; 32], UpdateError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| UpdateError::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| UpdateError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    size.div_ceil(chunk_size.max(1) as u64) as u32
}

fn signing_bytes(body: &ManifestBody) -> Vec<u8> {
    // Every body fits: names are bounded, the rest is fixed-size.
    let mut buf = [0u8; 256];
    tern_proto::signing_bytes(body, &mut buf)
        .expect("a manifest body fits 256 bytes")
        .to_vec()
}

/// A signed manifest for `artifact`.
pub fn sign(
    name: &str,
    version: u32,
    artifact: &[u8],
    chunk_size: u32,
    selftest: Option<[u8; 32]>,
    key: &SecretKey,
) -> Result<Manifest, UpdateError> {
    if !crate::valid_name(name) || name.len() > tern_proto::NAME_LEN {
        return Err(UpdateError::InvalidManifest(format!(
            "model name `{name}`: use 1 to {} letters, digits, `_`, `-`, `.` (not starting with `.`)",
            tern_proto::NAME_LEN
        )));
    }
    if chunk_size == 0 || chunk_size as usize > tern_proto::MAX_CHUNK {
        return Err(UpdateError::InvalidManifest(format!(
            "chunk size {chunk_size} must be 1..={}",
            tern_proto::MAX_CHUNK
        )));
    }
    if artifact.is_empty() {
        return Err(UpdateError::InvalidManifest("empty artifact".into()));
    }
    if chunk_count(artifact.len() as u64, chunk_size) > MAX_CHUNKS {
        return Err(UpdateError::InvalidManifest(format!(
            "{} bytes in chunks of {chunk_size} would exceed {MAX_CHUNKS} chunks; use larger chunks",
            artifact.len()
        )));
    }
    let body = ManifestBody {
        name: Name::try_from(name).expect("length checked"),
        version,
        size: artifact.len() as u64,
        sha256: sha256(artifact),
        chunk_size,
        chunk_count: chunk_count(artifact.len() as u64, chunk_size),
        selftest,
        key_id: key.public().id(),
    };
    let sig = key.sign(&signing_bytes(&body));
    let mut signature = [[0u8; 32]; 2];
    signature[0].copy_from_slice(&sig[..32]);
    signature[1].copy_from_slice(&sig[32..]);
    Ok(Manifest { body, signature })
}

/// Checks a manifest's shape and its signature by a trusted key.
pub fn verify(manifest: &Manifest, trusted: &TrustedKeys) -> Result<(), UpdateError> {
    let b = &manifest.body;
    let invalid = |m: String| Err(UpdateError::InvalidManifest(m));
    if !crate::valid_name(&b.name) {
        return invalid(format!("model name `{}` is not allowed", b.name));
    }
    if b.chunk_size == 0 || b.chunk_size as usize > tern_proto::MAX_CHUNK {
        return invalid(format!("chunk size {}", b.chunk_size));
    }
    if b.chunk_count > MAX_CHUNKS {
        return invalid(format!("{} chunks (at most {MAX_CHUNKS})", b.chunk_count));
    }
    if b.size == 0 || b.chunk_count != chunk_count(b.size, b.chunk_size) {
        return invalid(format!(
            "{} chunks of {} bytes cannot hold {} bytes",
            b.chunk_count, b.chunk_size, b.size
        ));
    }
    let key: &PublicKey = trusted
        .find(&b.key_id)
        .ok_or_else(|| UpdateError::UnknownKey(crate::hex(&b.key_id)))?;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&manifest.signature[0]);
    sig[32..].copy_from_slice(&manifest.signature[1]);
    if key.verify(&signing_bytes(b), &sig) {
        Ok(())
    } else {
        Err(UpdateError::BadSignature(key.id_hex()))
    }
}

/// A manifest as one protocol frame.
pub fn encode_manifest(manifest: &Manifest) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let n = tern_proto::encode(&tern_proto::Frame::Manifest(manifest.clone()), &mut buf)
        .expect("a manifest frame fits 512 bytes");
    buf[..n].to_vec()
}

pub fn decode_manifest(frame: &[u8]) -> Result<Manifest, UpdateError> {
    match tern_proto::decode(frame) {
        Ok(tern_proto::Frame::Manifest(m)) => Ok(m),
        Ok(other) => Err(UpdateError::InvalidManifest(format!(
            "expected a manifest frame, got tag {}",
            other.tag()
        ))),
        Err(e) => Err(UpdateError::InvalidManifest(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed() -> (SecretKey, Manifest) {
        let key = SecretKey::generate().unwrap();
        let m = sign("digits", 3, &[7u8; 1000], 300, None, &key).unwrap();
        (key, m)
    }

    #[test]
    fn a_signed_manifest_verifies_with_its_key_only() {
        let (key, m) = signed();
        assert_eq!(m.body.chunk_count, 4);
        verify(&m, &TrustedKeys::new([key.public()])).unwrap();
        let other = SecretKey::generate().unwrap();
        let err = verify(&m, &TrustedKeys::new([other.public()])).unwrap_err();
        assert!(matches!(err, UpdateError::UnknownKey(_)), "{err}");
    }

    #[test]
    fn any_change_to_the_signed_body_breaks_the_signature() {
        let (key, m) = signed();
        let trusted = TrustedKeys::new([key.public()]);
        let mut tampered = m.clone();
        tampered.body.version = 4;
        assert!(matches!(
            verify(&tampered, &trusted),
            Err(UpdateError::BadSignature(_))
        ));
        let mut tampered = m.clone();
        tampered.body.sha256[0] ^= 1;
        assert!(matches!(
            verify(&tampered, &trusted),
            Err(UpdateError::BadSignature(_))
        ));
        let mut tampered = m;
        tampered.signature[1][5] ^= 0x40;
        assert!(matches!(
            verify(&tampered, &trusted),
            Err(UpdateError::BadSignature(_))
        ));
    }

    #[test]
    fn inconsistent_chunking_is_refused_before_the_signature_is_checked() {
        let (key, mut m) = signed();
        m.body.chunk_count = 3;
        let err = verify(&m, &TrustedKeys::new([key.public()])).unwrap_err();
        assert!(matches!(err, UpdateError::InvalidManifest(_)), "{err}");
    }

    #[test]
    fn a_manifest_cannot_claim_more_chunks_than_a_device_tracks() {
        let (key, mut m) = signed();
        m.body.size = (MAX_CHUNKS as u64 + 1) * 300;
        m.body.chunk_count = MAX_CHUNKS + 1;
        let err = verify(&m, &TrustedKeys::new([key.public()])).unwrap_err();
        assert!(err.to_string().contains("chunks"), "{err}");
        assert!(sign("m", 1, &vec![0u8; (MAX_CHUNKS + 1) as usize], 1, None, &key).is_err());
    }

    #[test]
    fn names_that_are_paths_cannot_be_signed() {
        let key = SecretKey::generate().unwrap();
        for bad in ["../x", ".hidden", "a/b", ""] {
            assert!(sign(bad, 1, b"x", 10, None, &key).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_round_trip_as_frames() {
        let (_, m) = signed();
        assert_eq!(decode_manifest(&encode_manifest(&m)).unwrap(), m);
        assert!(decode_manifest(&encode_manifest(&m)[..20]).is_err());
    }
}
