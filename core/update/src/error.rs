use tern_proto::FailureCode;

/// Why an update step failed. Each variant maps to the protocol's [`FailureCode`] where the
/// fleet needs to know.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("manifest signed by key {0}, which this device does not trust")]
    UnknownKey(String),
    #[error("manifest signature does not verify against key {0}")]
    BadSignature(String),
    #[error("artifact sha256 is {got}, the manifest says {expected}")]
    HashMismatch { expected: String, got: String },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("chunk {index}: {reason}")]
    BadChunk { index: u32, reason: String },
    #[error("disk full while {0}")]
    DiskFull(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("self-test vector: {0}")]
    SelfTest(String),
}

impl UpdateError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> UpdateError {
        let context = context.into();
        // ENOSPC and EDQUOT: the fleet must see "disk full", not a generic I/O failure.
        if source.kind() == std::io::ErrorKind::StorageFull
            || matches!(source.raw_os_error(), Some(28) | Some(122))
        {
            UpdateError::DiskFull(context)
        } else {
            UpdateError::Io { context, source }
        }
    }

    /// The code a device reports for this failure.
    pub fn code(&self) -> FailureCode {
        match self {
            UpdateError::UnknownKey(_) => FailureCode::UnknownKey,
            UpdateError::BadSignature(_) | UpdateError::InvalidManifest(_) => {
                FailureCode::BadSignature
            }
            UpdateError::HashMismatch { .. } | UpdateError::BadChunk { .. } => {
                FailureCode::HashMismatch
            }
            UpdateError::DiskFull(_) | UpdateError::Io { .. } | UpdateError::KeyFile { .. } => {
                FailureCode::DiskFull
            }
            UpdateError::SelfTest(_) => FailureCode::SelfTestFailed,
        }
    }
}
