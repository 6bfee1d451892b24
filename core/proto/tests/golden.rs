//! Golden bytes: each message's encoding is pinned literally, so a layout change cannot slip
//! through unnoticed (postcard is not self-describing; peers must agree byte for byte).

use tern_proto::*;

fn name(s: &str) -> Name {
    Name::try_from(s).unwrap()
}

fn roundtrip(frame: Frame<'_>, golden: &[u8]) {
    let mut buf = [0u8; 512];
    let n = encode(&frame, &mut buf).unwrap();
    assert_eq!(&buf[..n], golden, "{frame:?}");
    assert_eq!(decode(golden).unwrap(), frame);
}

fn rep(b: u8, n: usize) -> Vec<u8> {
    vec![b; n]
}

#[test]
fn telemetry_bytes_are_pinned() {
    let t = Telemetry {
        uptime_s: 1,
        requests: 2,
        errors: 0,
        p50_us: 300,
        p99_us: 1000,
        cpu_permille: 5,
        rss_kb: 4096,
    };
    roundtrip(
        Frame::Telemetry(t),
        &[1, 5, 1, 2, 0, 0xAC, 0x02, 0xE8, 0x07, 5, 0x80, 0x20],
    );
}

#[test]
fn sensor_frame_bytes_are_pinned() {
    let f = SensorFrame {
        sensor: 7,
        seq: 1,
        samples: heapless::Vec::from_slice(&[1, -1, 300]).unwrap(),
    };
    // i16 samples are zigzag varints: 1 → 2, -1 → 1, 300 → 600.
    roundtrip(Frame::Sensor(f), &[1, 6, 7, 1, 3, 2, 1, 0xD8, 0x04]);
}

#[test]
fn chunk_bytes_are_pinned_and_decoding_borrows_the_payload() {
    let c = Chunk {
        artifact: [0xAB; 32],
        index: 5,
        data: &[1, 2, 3],
    };
    let mut golden = vec![1, 3];
    golden.extend(rep(0xAB, 32));
    golden.extend([5, 3, 1, 2, 3]);
    roundtrip(Frame::Chunk(c), &golden);
    let Frame::Chunk(c) = decode(&golden).unwrap() else {
        panic!()
    };
    let inside = golden.as_ptr_range();
    assert!(
        inside.contains(&c.data.as_ptr()),
        "payload must be borrowed, not copied"
    );
}

#[test]
fn desired_state_bytes_are_pinned() {
    let d = DesiredState {
        generation: 3,
        models: heapless::Vec::from_slice(&[DesiredModel {
            name: name("digits"),
            version: 2,
            artifact: [0x11; 32],
            percent: 50,
            allow_downgrade: false,
        }])
        .unwrap(),
    };
    let mut golden = vec![1, 1, 3, 1, 6];
    golden.extend(b"digits");
    golden.push(2);
    golden.extend(rep(0x11, 32));
    golden.extend([50, 0]);
    roundtrip(Frame::Desired(d), &golden);
}

#[test]
fn device_report_bytes_are_pinned() {
    let r = DeviceReport {
        device: name("dev-1"),
        generation: 3,
        models: heapless::Vec::from_slice(&[ModelReport {
            name: name("digits"),
            active_version: Some(1),
            state: UpdateState::Downloading {
                version: 2,
                received: 10,
                total: 40,
            },
        }])
        .unwrap(),
    };
    let mut golden = vec![1, 4, 5];
    golden.extend(b"dev-1");
    golden.extend([3, 1, 6]);
    golden.extend(b"digits");
    // Some(1); variant 1 (Downloading) { 2, 10, 40 }.
    golden.extend([1, 1, 1, 2, 10, 40]);
    roundtrip(Frame::Report(r), &golden);
    let failed = UpdateState::Failed {
        version: 2,
        code: FailureCode::HashMismatch,
    };
    let r = DeviceReport {
        device: name("d"),
        generation: 0,
        models: heapless::Vec::from_slice(&[ModelReport {
            name: name("m"),
            active_version: None,
            state: failed,
        }])
        .unwrap(),
    };
    roundtrip(
        Frame::Report(r),
        &[1, 4, 1, b'd', 0, 1, 1, b'm', 0, 6, 2, 2],
    );
}

#[test]
fn manifest_bytes_are_pinned_and_the_signed_bytes_are_its_body() {
    let body = ManifestBody {
        name: name("m"),
        version: 1,
        size: 1000,
        sha256: [0x22; 32],
        chunk_size: 256,
        chunk_count: 4,
        selftest: None,
        key_id: [9; 8],
    };
    let m = Manifest {
        body: body.clone(),
        signature: [[0x33; 32], [0x44; 32]],
    };
    let mut signed = vec![1, b'm', 1, 0xE8, 0x07];
    signed.extend(rep(0x22, 32));
    signed.extend([0x80, 0x02, 4, 0]);
    signed.extend(rep(9, 8));
    let mut buf = [0u8; 256];
    assert_eq!(signing_bytes(&body, &mut buf).unwrap(), &signed[..]);
    let mut golden = vec![1, 2];
    golden.extend(&signed);
    golden.extend(rep(0x33, 32));
    golden.extend(rep(0x44, 32));
    roundtrip(Frame::Manifest(m), &golden);
}

#[test]
fn bad_frames_get_errors_not_panics() {
    let t = Telemetry {
        uptime_s: 1,
        requests: 2,
        errors: 0,
        p50_us: 300,
        p99_us: 1000,
        cpu_permille: 5,
        rss_kb: 4096,
    };
    let mut buf = [0u8; 64];
    let n = encode(&Frame::Telemetry(t), &mut buf).unwrap();
    assert_eq!(decode(&buf[..n - 1]), Err(Error::Truncated));
    assert_eq!(decode(&[]), Err(Error::Truncated));
    assert_eq!(decode(&[1]), Err(Error::Truncated));
    assert_eq!(decode(&[2, 5]), Err(Error::UnknownVersion(2)));
    assert_eq!(decode(&[1, 99]), Err(Error::UnknownTag(99)));
    let mut trailing = buf[..n].to_vec();
    trailing.push(0);
    assert_eq!(decode(&trailing), Err(Error::Malformed));
    assert_eq!(
        encode(&Frame::Telemetry(t), &mut buf[..5]),
        Err(Error::BufferFull)
    );
    // A name longer than its capacity is malformed, never a panic or an overflow.
    let mut long = vec![1, 6, 0, 0, 65];
    long.extend(std::iter::repeat_n(0, 65));
    assert_eq!(decode(&long), Err(Error::Malformed));
    // Every prefix of every valid frame decodes to an error or a frame, never a panic.
    for len in 0..n {
        let _ = decode(&buf[..len]);
    }
}

#[test]
fn cohorts_are_stable_across_platforms() {
    assert_eq!(
        (cohort("device-1"), cohort("device-2"), cohort("")),
        (65, 8, 61)
    );
}
