//! Tern's tensor vocabulary: element types, borrowed views, owned tensors, `.npy` files, and
//! the check of request tensors against a model's declared inputs.
//!
//! No executor is attached: `tern-core` re-exports all of it, and the fuzz targets (`fuzz/`)
//! drive the input checks without building one. Shapes and bytes here come from clients, so
//! nothing may panic or overflow on them.

mod check;
mod error;
pub mod npy;
mod tensor;

pub use check::check_inputs;
pub use error::{TensorError, TensorResult};
pub use tensor::{DType, Dim, Element, Tensor, TensorInfo, TensorView};
