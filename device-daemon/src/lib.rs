//! Library side of `ternd` and `tern`: the pieces the binaries share.

pub mod loadgen;
pub mod stats;
