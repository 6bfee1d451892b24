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
    /// Above 1 needs the `threads` cargo feature (on by default); without it, load fails.
    pub threads: usize,
    pub precision: Precision,
    /// Makes axis 0 of every input a symbolic batch named so, for models exported with a fixed
    /// batch of 1. `None` uses the model's own `dim_param` on axis 0, if all inputs share one.
    pub batch_symbol: Option<String>,
    /// Largest batch a session accepts; larger requests fail with [`Error::BatchTooLarge`].
    pub max_batch: Option<usize>,
    /// Fuse QDQ-quantized Conv/Gemm/MatMul into int8 kernels (on by default).
    pub int8_fusion: bool,
    /// Run quantized convolutions on Tern's fused int8 kernels (on by default). Off leaves them
    /// to tract's own lowering (im2col, int8 matrix product, separate requantization ops),
    /// which is slower; kept for comparisons.
    pub int8_kernels: bool,
    /// Run f32 depthwise convolutions on Tern's direct kernel, 1×1 and small convolutions
    /// (stems) on its pointwise kernel (x86-64 with AVX2; tract's elsewhere), each with the
    /// activation after it applied as it stores, and sums over trailing axes (global average
    /// pools) on Tern's loop (on by default; CPU plans in the stored precision). Off leaves
    /// them to tract's own ops, which are slower; kept for comparisons.
    pub float_kernels: bool,
    /// Inputs fixed to concrete shapes. Declared output shapes and `value_info` are then
    /// ignored, since exporters write them with the symbols the pins replace.
    pub pinned: Vec<PinnedInput>,
    /// Whether one plan serves every shape or each shape gets its own.
    pub plans: PlanMode,
    /// Batch sizes prepared ahead in concrete mode; a batch runs padded up to the nearest one.
    /// Empty: powers of two up to `max_batch` (or 8), plus `max_batch` itself.
    pub batch_sizes: Vec<usize>,
    /// Concrete plans kept at most (least recently used go first).
    pub plan_cache: usize,
    /// Where the model runs.
    pub device: Device,
    /// Let tract move and remove axes across the whole graph while preparing (on by default).
    /// Off, tract's declutter of a conv net is 3–4× faster (MobileNetV3: 104 → 25 ms; cold start
    /// 158 → 98 ms) and the models measured ran as fast; graphs full of reshapes and transposes
    /// may run slower without it.
    pub axis_rewrites: bool,
    /// Directory where plan decisions are kept between loads (`None`, the default: decide at
    /// every load). In `auto` and `fastest` modes a later load of the same model skips the
    /// probe run or the timing of both plans (`fastest`: MobileNetV3-Small 685 → 90 ms), see
    /// BENCHMARKS.md. Entries are keyed by the model's sha256, tract's version, the CPU's
    /// features and these options; a cache that cannot be read or written is only a warning.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Threads that prepare the model (`None`, the default: one per core). A large graph is
    /// prepared in parts, in parallel; 1 prepares it on the loading thread alone, so that a
    /// daemon swapping in a new version while it serves keeps its other cores for requests.
    pub prepare_threads: Option<usize>,
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU through tract's CUDA runtime (ops tract cannot place there stay on the
    /// CPU). Without a usable GPU the model runs on the CPU, and says why in its inspection.
    /// Needs a build with the `cuda` feature; without it, asking for CUDA is an error.
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(Error::InvalidOption(format!(
                "device `{s}`: expected cpu or cuda"
            ))),
        }
    }
}

/// How shapes are planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanMode {
    /// One symbolic plan for every batch size and shape; when tract cannot prepare the model
    /// with symbols (shapes computed at run time, up-sampled sizes it cannot prove equal,
    /// `If` branches valid only for some shapes), concrete plans instead.
    #[default]
    Auto,
    /// One symbolic plan, or fail.
    Symbolic,
    /// One plan per input shape, batch padded up to the nearest planned size.
    Concrete,
    /// Prepares both, times them at load and keeps the faster (concrete shapes let tract pick
    /// faster convolution paths; symbolic plans serve any batch without padding).
    Fastest,
}

impl std::fmt::Display for PlanMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanMode::Auto => "auto",
            PlanMode::Symbolic => "symbolic",
            PlanMode::Concrete => "concrete",
            PlanMode::Fastest => "fastest",
        })
    }
}

impl std::str::FromStr for PlanMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<PlanMode> {
        Ok(match s {
            "auto" => PlanMode::Auto,
            "symbolic" => PlanMode::Symbolic,
            "concrete" => PlanMode::Concrete,
            "fastest" => PlanMode::Fastest,
            _ => {
                return Err(Error::InvalidOption(format!(
                    "plan mode `{s}`: expected auto, symbolic, concrete or fastest"
                )))
            }
        })
    }
}

/// One input fixed to a shape. `None` keeps the model's own dimension (e.g. the batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedInput {
    pub name: String,
    pub shape: Vec<Option<usize>>,
}

impl std::str::FromStr for PinnedInput {
    type Err = Error;
    /// `NAME=D,D,…` where each `D` is a size or a symbol name (kept symbolic), e.g.
    /// `image=N,3,224,224`.
    fn from_str(s: &str) -> Result<PinnedInput> {
        let bad = |why: &str| {
            Error::InvalidOption(format!(
                "pin `{s}`: {why}; expected NAME=D,D,… e.g. image=N,3,224,224"
            ))
        };
        let (name, dims) = s.rsplit_once('=').ok_or_else(|| bad("no `=`"))?;
        if name.is_empty() {
            return Err(bad("empty input name"));
        }
        let shape = dims
            .split(',')
            .map(|d| {
                let d = d.trim();
                match d.parse::<usize>() {
                    Ok(n) => Ok(Some(n)),
                    Err(_)
                        if !d.is_empty()
                            && d.chars()
                                .all(|c| c.is_alphanumeric() || c == '_' || c == '?') =>
                    {
                        Ok(None)
                    }
                    Err(_) => Err(bad(&format!("`{d}` is neither a size nor a symbol"))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PinnedInput {
            name: name.to_string(),
            shape,
        })
    }
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            threads: 1,
            precision: Precision::AsStored,
            batch_symbol: None,
            max_batch: None,
            int8_fusion: true,
            int8_kernels: true,
            float_kernels: true,
            pinned: vec![],
            plans: PlanMode::Auto,
            batch_sizes: vec![],
            plan_cache: 8,
            device: Device::Cpu,
            axis_rewrites: true,
            cache_dir: None,
            prepare_threads: None,
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
        Model::from_vec(bytes, options)
    }

    /// Prepares an ONNX model held in memory. [`Model::from_vec`] saves a copy of the weights
    /// when the caller can give the buffer away.
    pub fn from_bytes(bytes: &[u8], options: &ModelOptions) -> Result<Model> {
        Model::from_vec(bytes.to_vec(), options)
    }

    /// Prepares an ONNX model handed over in memory: weights are decoded straight out of this
    /// buffer, which is freed once the model is prepared.
    pub fn from_vec(bytes: Vec<u8>, options: &ModelOptions) -> Result<Model> {
        let started = std::time::Instant::now();
        let prepared = prepare::prepare(bytes.into(), options)?;
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

    /// Concrete plans prepared and cached right now; `None` for a model with one symbolic plan.
    pub fn concrete_plans(&self) -> Option<usize> {
        match &self.inner.plans {
            prepare::Plans::Concrete(c) => Some(c.cached()),
            prepare::Plans::Symbolic(_) => None,
        }
    }

    /// A new session: per-worker run state and reusable buffers.
    pub fn session(&self) -> Result<Session> {
        Session::new(self.clone())
    }
}
