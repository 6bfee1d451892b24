//! Tern's fleet wire protocol, for devices down to microcontrollers.
//!
//! `#![no_std]` and allocation-free: every message has fixed capacities (`heapless`), is encoded
//! into a caller's buffer and decoded from a borrowed one. A frame is
//! `[PROTOCOL_VERSION, tag, postcard(message)]`; postcard is not self-describing, so the tag
//! says which message follows and the version guards against mismatched peers. `SPEC.md`
//! documents the layouts and topics; golden-byte tests pin them.

#![no_std]

#[cfg(feature = "std")]
extern crate std;

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

/// First byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Longest model name, fleet or device id.
pub const NAME_LEN: usize = 32;
/// Models a desired state or report can list.
pub const MAX_MODELS: usize = 8;
/// Largest chunk payload (well under AWS IoT's 128 KiB message limit).
pub const MAX_CHUNK: usize = 64 * 1024;
/// Samples in one sensor frame.
pub const MAX_SAMPLES: usize = 64;

pub type Name = String<NAME_LEN>;
pub type Sha256 = [u8; 32];

/// Errors are a small enum: no allocation, no formatting machinery needed on an MCU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The output buffer is too small; nothing usable was written.
    BufferFull,
    /// The frame ends before its message does.
    Truncated,
    /// A peer speaks another protocol version.
    UnknownVersion(u8),
    UnknownTag(u8),
    /// The bytes do not decode as the tagged message.
    Malformed,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::BufferFull => f.write_str("output buffer too small"),
            Error::Truncated => f.write_str("frame truncated"),
            Error::UnknownVersion(v) => {
                write!(f, "protocol version {v}, expected {PROTOCOL_VERSION}")
            }
            Error::UnknownTag(t) => write!(f, "unknown message tag {t}"),
            Error::Malformed => f.write_str("malformed message"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// What a fleet wants a device to run (retained on the desired-state topics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Monotonic per fleet: a device ignores a desired state older than the one it applied.
    pub generation: u32,
    pub models: Vec<DesiredModel, MAX_MODELS>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModel {
    pub name: Name,
    pub version: u32,
    /// sha256 of the artifact, which names its chunk topics.
    pub artifact: Sha256,
    /// Devices whose cohort (stable hash of the id, 0..100) is below this take the update.
    pub percent: u8,
    /// Allows going to an older version (a rollback ordered by the fleet).
    pub allow_downgrade: bool,
}

/// The signed description of one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub body: ManifestBody,
    /// ed25519 over `signing_bytes(body)`.
    pub signature: [[u8; 32]; 2],
}

/// The signed part of a manifest; its postcard encoding is the canonical signed bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBody {
    pub name: Name,
    pub version: u32,
    pub size: u64,
    pub sha256: Sha256,
    pub chunk_size: u32,
    pub chunk_count: u32,
    /// sha256 of a self-test vector (input and expected output) the device validates with.
    pub selftest: Option<Sha256>,
    /// First 8 bytes of the sha256 of the signer's public key.
    pub key_id: [u8; 8],
}

/// One piece of an artifact. Borrowed on decode: no copy on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk<'a> {
    pub artifact: Sha256,
    pub index: u32,
    #[serde(borrow)]
    pub data: &'a [u8],
}

/// Where one model stands on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    Idle,
    Downloading {
        version: u32,
        received: u32,
        total: u32,
    },
    Verifying {
        version: u32,
    },
    Installing {
        version: u32,
    },
    Validating {
        version: u32,
    },
    Active {
        version: u32,
    },
    Failed {
        version: u32,
        code: FailureCode,
    },
    RolledBack {
        from: u32,
        to: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureCode {
    BadSignature,
    UnknownKey,
    HashMismatch,
    Downgrade,
    DiskFull,
    LoadFailed,
    SelfTestFailed,
    CanaryTripped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelReport {
    pub name: Name,
    pub active_version: Option<u32>,
    pub state: UpdateState,
}

/// A device's retained report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub device: Name,
    /// The desired-state generation this report answers.
    pub generation: u32,
    pub models: Vec<ModelReport, MAX_MODELS>,
}

/// Periodic serving figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Telemetry {
    pub uptime_s: u32,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub cpu_permille: u16,
    pub rss_kb: u32,
}

/// Raw samples from a sensor, e.g. an accelerometer axis triple interleaved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorFrame {
    pub sensor: u16,
    pub seq: u32,
    pub samples: Vec<i16, MAX_SAMPLES>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Desired(DesiredState),
    Manifest(Manifest),
    Chunk(Chunk<'a>),
    Report(DeviceReport),
    Telemetry(Telemetry),
    Sensor(SensorFrame),
}

impl Frame<'_> {
    pub fn tag(&self) -> u8 {
        match self {
            Frame::Desired(_) => 1,
            Frame::Manifest(_) => 2,
            Frame::Chunk(_) => 3,
            Frame::Report(_) => 4,
            Frame::Telemetry(_) => 5,
            Frame::Sensor(_) => 6,
        }
    }
}

fn put<T: Serialize>(tag: u8, msg: &T, buf: &mut [u8]) -> Result<usize, Error> {
    if buf.len() < 2 {
        return Err(Error::BufferFull);
    }
    buf[0] = PROTOCOL_VERSION;
    buf[1] = tag;
    let used = postcard::to_slice(msg, &mut buf[2..])
        .map_err(|_| Error::BufferFull)?
        .len();
    Ok(2 + used)
}

/// Encodes a frame into `buf`; returns the bytes used.
pub fn encode(frame: &Frame<'_>, buf: &mut [u8]) -> Result<usize, Error> {
    let tag = frame.tag();
    match frame {
        Frame::Desired(m) => put(tag, m, buf),
        Frame::Manifest(m) => put(tag, m, buf),
        Frame::Chunk(m) => put(tag, m, buf),
        Frame::Report(m) => put(tag, m, buf),
        Frame::Telemetry(m) => put(tag, m, buf),
        Frame::Sensor(m) => put(tag, m, buf),
    }
}

fn take<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => Error::Truncated,
        _ => Error::Malformed,
    })?;
    // Trailing bytes mean the peer and we disagree on the layout.
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(Error::Malformed)
    }
}

/// Decodes one frame, borrowing chunk payloads from `buf`.
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, Error> {
    let [version, tag, body @ ..] = buf else {
        return Err(Error::Truncated);
    };
    if *version != PROTOCOL_VERSION {
        return Err(Error::UnknownVersion(*version));
    }
    Ok(match tag {
        1 => Frame::Desired(take(body)?),
        2 => Frame::Manifest(take(body)?),
        3 => {
            let chunk: Chunk<'_> = take(body)?;
            if chunk.data.len() > MAX_CHUNK {
                return Err(Error::Malformed);
            }
            Frame::Chunk(chunk)
        }
        4 => Frame::Report(take(body)?),
        5 => Frame::Telemetry(take(body)?),
        6 => Frame::Sensor(take(body)?),
        t => return Err(Error::UnknownTag(*t)),
    })
}

/// The canonical bytes a manifest's signature covers: the postcard encoding of its body.
pub fn signing_bytes<'b>(body: &ManifestBody, buf: &'b mut [u8]) -> Result<&'b [u8], Error> {
    postcard::to_slice(body, buf)
        .map(|s| &*s)
        .map_err(|_| Error::BufferFull)
}

/// A device's rollout cohort, 0..100: stable across restarts and platforms (FNV-1a of the id).
pub fn cohort(device_id: &str) -> u8 {
    let mut h: u32 = 0x811c_9dc5;
    for b in device_id.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 100) as u8
}
