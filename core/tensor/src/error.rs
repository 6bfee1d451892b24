/// A tensor that does not fit what was asked of it. Messages name what was expected and what
/// was received; `tern-core` turns each into its own error of the same meaning.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// Wrong element type, shape, byte length or contents.
    #[error("{0}")]
    Invalid(String),
    #[error("batch of {got} exceeds the configured maximum of {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type TensorResult<T> = std::result::Result<T, TensorError>;
