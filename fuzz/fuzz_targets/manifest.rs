//! Signed manifests as they arrive over MQTT. Two inputs in one target, chosen by the first
//! byte: raw bytes as a manifest frame, or edits (position, xor) applied to a validly signed
//! one — the shape most forgeries take. Neither may panic, and no edited manifest that verifies
//! may say anything the signed one did not.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern_update::{
    decode_manifest, encode_manifest, sign, verify, Manifest, SecretKey, TrustedKeys,
};

struct Fixture {
    trusted: TrustedKeys,
    signed: Manifest,
    frame: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // A fixed key keeps runs reproducible from a saved input.
        let key = SecretKey::from_text(&format!("tern-ed25519-secret-v1 {}", "5a".repeat(32)))
            .expect("fixed key");
        let model = vec![7u8; 3000];
        let signed = sign("digits", 3, &model, 1024, None, &key).expect("sign");
        Fixture {
            trusted: TrustedKeys::new([key.public()]),
            frame: encode_manifest(&signed),
            signed,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let frame = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut frame = f.frame.clone();
        for e in rest.chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([e[0], e[1]])) % frame.len();
            frame[at] ^= e[2];
        }
        frame
    };
    let Ok(m) = decode_manifest(&frame) else {
        return;
    };
    if verify(&m, &f.trusted).is_ok() {
        assert_eq!(m.body, f.signed.body, "an altered manifest verified");
    }
    let again = decode_manifest(&encode_manifest(&m)).expect("a decoded manifest re-encodes");
    assert_eq!(again, m);
});
