//! tern-core: Tern's executor.
//!
//! Load an ONNX model once ([`Model`]), share it between threads, and run it through per-worker
//! [`Session`]s that reuse their buffers. QDQ-quantized convolutions and matrix products are
//! rewritten onto int8 operators at load time, and quantized convolutions run on Tern's fused
//! int8 kernels; [`Inspection`] says what runs in which precision, on which kernel.
//!
//! ```no_run
//! use tern_core::{Model, ModelOptions, TensorView};
//! let model = Model::load("models/digits/1/model.onnx", &ModelOptions::default())?;
//! let mut session = model.session()?;
//! let pixels = vec![0f32; 64];
//! let outputs = session.run(&[TensorView::new(&[1, 1, 8, 8], &pixels)])?;
//! let logits = outputs.get(0).unwrap().as_slice::<f32>()?;
//! # Ok::<(), tern_core::Error>(())
//! ```

mod batch;
mod dwconv;
mod error;
mod excite;
mod im2col;
mod inspect;
mod int8;
mod model;
mod planesum;
mod prepare;
mod pwconv;
mod run;
#[cfg(test)]
mod testing;

pub use batch::{
    BatchConfig, BatchStats, Batcher, FailureReason, Histogram, RequestOptions, Response,
    LATENCY_BOUNDS_US,
};
pub use error::{Error, Result};
pub use inspect::{ExecPrecision, HeavyOp, Inspection, Placement, PlanKind, PlanReport};
pub use model::{Device, Model, ModelOptions, PinnedInput, PlanMode, Precision};
pub use prepare::ModelInfo;
pub use run::{Outputs, Session};
pub use tern_tensor::{npy, DType, Dim, Element, Tensor, TensorInfo, TensorView};

/// The tensor vocabulary lives in `tern-tensor` (no executor attached); `crate::tensor` keeps
/// the paths inside tern-core short.
mod tensor {
    pub(crate) use tern_tensor::*;
}
