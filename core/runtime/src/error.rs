use std::fmt;

/// Everything that can go wrong in `tern-core`.
///
/// Messages are written for the person who has to fix the input: they name what was expected and
/// what was received. tract's own errors are wrapped once, here, and never leak as types.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read model file `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a valid ONNX model: {0}")]
    NotOnnx(String),
    #[error("model cannot be prepared: {0}")]
    Prepare(String),
    #[error("unsupported operator `{op}` (node `{node}`): {reason}")]
    UnsupportedOp {
        op: String,
        node: String,
        reason: String,
    },
    #[error("{0}")]
    InvalidInput(String),
    #[error("batch of {got} exceeds the configured maximum of {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("execution failed: {0}")]
    Execution(String),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The batcher's queue is full; nothing was queued. Retry later or add capacity.
    #[error("overloaded: the queue already holds {queued} requests")]
    Overloaded { queued: usize },
    /// The request's deadline passed before it could run; it was not executed.
    #[error("timed out after {waited_ms} ms in the queue; the request was not executed")]
    TimedOut { waited_ms: u64 },
    #[error("shutting down: the request was not executed")]
    ShuttingDown,
    /// A bug in tract or in Tern: a panic was caught at the boundary instead of taking the
    /// caller down.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl Error {
    /// The same error for another request of a failed batch (`io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::NotOnnx(m) => Error::NotOnnx(m.clone()),
            Error::Prepare(m) => Error::Prepare(m.clone()),
            Error::UnsupportedOp { op, node, reason } => Error::UnsupportedOp {
                op: op.clone(),
                node: node.clone(),
                reason: reason.clone(),
            },
            Error::InvalidInput(m) => Error::InvalidInput(m.clone()),
            Error::BatchTooLarge { got, max } => Error::BatchTooLarge {
                got: *got,
                max: *max,
            },
            Error::Execution(m) => Error::Execution(m.clone()),
            Error::InvalidOption(m) => Error::InvalidOption(m.clone()),
            Error::Overloaded { queued } => Error::Overloaded { queued: *queued },
            Error::TimedOut { waited_ms } => Error::TimedOut {
                waited_ms: *waited_ms,
            },
            Error::ShuttingDown => Error::ShuttingDown,
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }
}

impl From<tern_tensor::TensorError> for Error {
    fn from(e: tern_tensor::TensorError) -> Error {
        match e {
            tern_tensor::TensorError::Invalid(m) => Error::InvalidInput(m),
            tern_tensor::TensorError::BatchTooLarge { got, max } => {
                Error::BatchTooLarge { got, max }
            }
            tern_tensor::TensorError::Io { path, source } => Error::Io { path, source },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats a tract (anyhow) error with its whole context chain on one line.
pub(crate) fn chain(e: &impl fmt::Display) -> String {
    format!("{e:#}")
}

/// Runs `f`, turning a panic inside tract into [`Error::Internal`].
///
/// tract still has `unimplemented!`/`unwrap` on some malformed-model paths; a runtime that loads
/// user files must not abort on them.
pub(crate) fn catch<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Internal(format!("{what}: {msg}")))
        }
    }
}
