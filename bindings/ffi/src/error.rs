use tern_core::Error as CoreError;
use tern_update::UpdateError;

/// Every failure an app sees. The variant says what kind of thing went wrong (so apps can
/// branch on it); the message is the core's own, written for the person fixing the input.
///
/// Flat over FFI: Kotlin and Swift get one exception/error type per variant, carrying the
/// message; Python gets `TernError.InvalidInput(...)` and so on.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum TernError {
    /// The file is not an ONNX model Tern can prepare, or cannot be read.
    #[error("{0}")]
    InvalidModel(String),
    /// Wrong tensor names, shapes, dtypes or byte lengths, or a bad option.
    #[error("{0}")]
    InvalidInput(String),
    /// The batched engine's queue is full; nothing was queued. Retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The request waited past its timeout and was not executed.
    #[error("{0}")]
    TimedOut(String),
    /// The engine was shut down; the request was not executed.
    #[error("{0}")]
    Closed(String),
    /// The forward pass failed.
    #[error("{0}")]
    Execution(String),
    /// A model update was refused: unknown signer, bad signature, digest or size mismatch,
    /// malformed manifest, or a self-test the model does not pass.
    #[error("{0}")]
    Rejected(String),
    /// The model store could not read or write its directory (including a full disk).
    #[error("{0}")]
    Storage(String),
    /// No such model or version in the store.
    #[error("{0}")]
    NotFound(String),
    /// A bug in Tern or tract, caught instead of crashing the app. Please report it.
    #[error("{0}")]
    Internal(String),
}

impl From<CoreError> for TernError {
    fn from(e: CoreError) -> TernError {
        let message = e.to_string();
        match e {
            CoreError::Io { .. }
            | CoreError::NotOnnx(_)
            | CoreError::Prepare(_)
            | CoreError::UnsupportedOp { .. } => TernError::InvalidModel(message),
            CoreError::InvalidInput(_)
            | CoreError::BatchTooLarge { .. }
            | CoreError::InvalidOption(_) => TernError::InvalidInput(message),
            CoreError::Overloaded { .. } => TernError::Overloaded(message),
            CoreError::TimedOut { .. } => TernError::TimedOut(message),
            CoreError::ShuttingDown => TernError::Closed(message),
            CoreError::Execution(_) => TernError::Execution(message),
            CoreError::Internal(_) => TernError::Internal(message),
        }
    }
}

impl From<UpdateError> for TernError {
    fn from(e: UpdateError) -> TernError {
        let message = e.to_string();
        match e {
            UpdateError::UnknownKey(_)
            | UpdateError::BadSignature(_)
            | UpdateError::HashMismatch { .. }
            | UpdateError::InvalidManifest(_)
            | UpdateError::BadChunk { .. }
            | UpdateError::SelfTest(_) => TernError::Rejected(message),
            UpdateError::DiskFull(_) | UpdateError::Io { .. } => TernError::Storage(message),
            UpdateError::KeyFile { .. } => TernError::InvalidInput(message),
        }
    }
}

pub type Result<T, E = TernError> = std::result::Result<T, E>;
