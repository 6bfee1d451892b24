use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::inspect::Inspection;
use crate::prepare::{self, ModelInfo, Prepared};
use crate::run::Session;

/// Numeric precision the model is prepared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Run the types stored in the file (f32, or int8 for quantized models).
    #[default]
    AsStored,
    /// Convert f32 computation to f16 (inputs and outputs become f16 too).
    F16,
}

/// How a model is prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOptions {
    /// Threads for one forward pass. 1 (the default) runs on the caller's thread only.
    pub threads: usize,
    pub precision: Precision,
    /// Makes axis 0 of every input a symbolic batch named so, for models exported with a fixed
    /// batch of 1. `None` uses the model's own `dim_param` on axis 0, if all inputs share one.
    pub batch_symbol: Option<String>,
    /// Largest batch a session accepts; larger requests fail with [`Error::BatchTooLarge`].
    pub max_batch: Option<usize>,
    /// Fuse QDQ-quantized Conv/Gemm/MatMul into int8 kernels (on by default).
    pub int8_fusion: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            threads: 1,
            precision: Precision::AsStored,
            batch_symbol: None,
            max_batch: None,
            int8_fusion: true,
        }
    }
}

/// A prepared model: immutable, cheap to clone and shared between threads. Each worker runs it
/// through its own [`Session`].
#[derive(Clone)]
pub struct Model {
    pub(crate) inner: Arc<Prepared>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads and prepares an ONNX file.
    pub fn load(path: impl AsRef<Path>, options: &ModelOptions) -> Result<Model> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Model::from_bytes(&bytes, options)
    }

    /// Prepares an ONNX model held in memory.
    pub fn from_bytes(bytes: &[u8], options: &ModelOptions) -> Result<Model> {
        let started = std::time::Instant::now();
        let prepared = prepare::prepare(bytes, options)?;
        log::debug!("model prepared in {:?}", started.elapsed());
        Ok(Model {
            inner: Arc::new(prepared),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn inspection(&self) -> &Inspection {
        &self.inner.inspection
    }

    /// A new session: per-worker run state and reusable buffers.
    pub fn session(&self) -> Result<Session> {
        Session::new(self.clone())
    }
}
