//! tern-ffi: Tern's core for apps, through uniffi (Kotlin, Swift, Python).
//!
//! The same executor, int8 path and batcher that `ternd` runs, plus a model store that
//! installs signed models the way fleet devices do. A thin layer: option and error mapping,
//! named tensors as bytes; everything else is `tern-core` and `tern-update`.
//!
//! ```no_run
//! use tern_ffi::{Engine, ModelOptions, Tensor, DataType};
//! let engine = Engine::from_path("models/digits/1/model.onnx".into(), ModelOptions::default())?;
//! let pixels = vec![0u8; 64 * 4];
//! let out = engine.infer(vec![Tensor {
//!     name: engine.inputs()[0].name.clone(),
//!     dtype: DataType::F32,
//!     shape: vec![1, 1, 8, 8],
//!     data: pixels,
//! }])?;
//! # Ok::<(), tern_ffi::TernError>(())
//! ```

mod engine;
mod error;
mod store;

pub use engine::{
    BatchOptions, BatchStatistics, BatchedEngine, DataType, Engine, KernelCounts, ModelOptions,
    Precision, Tensor, TensorSpec,
};
pub use error::TernError;
pub use store::{ModelStore, ModelVersion};

uniffi::setup_scaffolding!("tern");

/// The library's version, to check generated bindings and library belong together.
#[uniffi::export]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}
