//! Any bytes as a fleet protocol frame (MQTT payloads from the broker, sensor frames from an
//! MCU): decoding never panics, and whatever decodes re-encodes to a frame that decodes to the
//! same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = tern_proto::decode(data) {
        // postcard's canonical form is never longer than what was accepted.
        let mut buf = vec![0u8; data.len() + 16];
        let n = tern_proto::encode(&frame, &mut buf).expect("a decoded frame re-encodes");
        assert_eq!(tern_proto::decode(&buf[..n]), Ok(frame));
    }
});
