//! What a prepared model will execute, and in which precision.

use std::collections::BTreeMap;
use std::fmt;

/// Element type a convolution or matrix product computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPrecision {
    /// 8-bit operands, i32 accumulation.
    Int8,
    F16,
    F32,
    Other,
}

impl fmt::Display for ExecPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecPrecision::Int8 => "int8",
            ExecPrecision::F16 => "f16",
            ExecPrecision::F32 => "f32",
            ExecPrecision::Other => "other",
        })
    }
}

/// One convolution or matrix product of the prepared model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeavyOp {
    /// Node name (the ONNX node's name where tract kept it).
    pub name: String,
    /// `Conv` or `MatMul` (Gemm and MatMul both execute as matrix products).
    pub op: String,
    pub precision: ExecPrecision,
    /// Why: the QDQ fusion applied, or the reason it did not.
    pub note: Option<String>,
}

/// Static facts about a prepared model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// ONNX op type → node count, as in the file.
    pub op_histogram: BTreeMap<String, usize>,
    /// Bytes of constant parameters (initializers) in the file.
    pub parameter_bytes: u64,
    pub heavy: Vec<HeavyOp>,
    /// How shapes are planned, and why.
    pub plan: PlanReport,
    /// Graph rewrites made for tract, one line each (e.g. a constant `If` folded).
    pub rewrites: Vec<String>,
    /// Where the model runs, and why not where it was asked to, if so.
    pub device: crate::model::Device,
    pub device_note: Option<String>,
    /// Where a GPU plan's ops run (`None` on the CPU): tract decides op by op.
    pub placement: Option<Placement>,
}

/// How tract placed the ops of a GPU plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Ops that run on the device (transfers between the CPU and the device not counted).
    pub on_device: usize,
    /// Op name → count of the ops tract kept on the CPU.
    pub on_cpu: BTreeMap<String, usize>,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ops on the GPU", self.on_device)?;
        if self.on_cpu.is_empty() {
            return f.write_str(", none on the CPU");
        }
        let cpu: Vec<String> = self
            .on_cpu
            .iter()
            .map(|(op, n)| format!("{n} {op}"))
            .collect();
        write!(f, "; on the CPU: {}", cpu.join(", "))
    }
}

/// Whether one symbolic plan serves every shape or each input shape gets its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    Symbolic,
    Concrete,
}

impl fmt::Display for PlanKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanKind::Symbolic => "symbolic",
            PlanKind::Concrete => "concrete",
        })
    }
}

/// The planning mode a model ended up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanReport {
    pub kind: PlanKind,
    /// Why this mode: what failed with symbols, or what was measured.
    pub why: String,
    /// Batch sizes planned ahead (concrete plans); a batch runs padded up to the nearest.
    pub batch_sizes: Vec<usize>,
    /// Concrete plans kept at most.
    pub cache_limit: usize,
}

impl Inspection {
    /// Number of heavy ops executing in the given precision.
    pub fn count(&self, p: ExecPrecision) -> usize {
        self.heavy.iter().filter(|h| h.precision == p).count()
    }
}
