//! Run time: sessions fill reused input buffers and run a prepared plan.

mod session;

pub use session::{Outputs, Session};
