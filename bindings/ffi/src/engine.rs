use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_core::{BatchConfig, Batcher, DType, Dim, ExecPrecision, RequestOptions, Session};

use crate::error::{Result, TernError};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum DataType {
    F32,
    F16,
    I8,
    U8,
    I32,
    I64,
    Bool,
}

impl From<DType> for DataType {
    fn from(d: DType) -> DataType {
        match d {
            DType::F32 => DataType::F32,
            DType::F16 => DataType::F16,
            DType::I8 => DataType::I8,
            DType::U8 => DataType::U8,
            DType::I32 => DataType::I32,
            DType::I64 => DataType::I64,
            DType::Bool => DataType::Bool,
        }
    }
}

impl From<DataType> for DType {
    fn from(d: DataType) -> DType {
        match d {
            DataType::F32 => DType::F32,
            DataType::F16 => DType::F16,
            DataType::I8 => DType::I8,
            DataType::U8 => DType::U8,
            DataType::I32 => DType::I32,
            DataType::I64 => DType::I64,
            DataType::Bool => DType::Bool,
        }
    }
}

/// A named tensor: dense, row-major, little-endian element bytes.
///
/// Bytes rather than typed arrays because they cross the FFI boundary as one copy (a
/// `ByteBuffer` on the JVM, `Data` in Swift, `bytes` in Python); typed lists are converted
/// element by element, about 20× slower.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// A declared input or output.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    /// -1 for a dimension chosen per request (the batch, or another symbol), as in ORT.
    pub shape: Vec<i64>,
    /// Which dimension is the batch, when the model batches.
    pub batch_axis: Option<u32>,
}

/// Numeric precision the model is prepared in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Precision {
    /// The types stored in the file: f32, or int8 kernels for quantized models.
    AsStored,
    /// f32 computation converted to f16; inputs and outputs become f16 too.
    Fp16,
}

/// How a model is prepared. Names follow what LiteRT and ORT Mobile users know.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ModelOptions {
    /// Threads one forward pass may use (LiteRT `numThreads`, ORT `intraOpNumThreads`).
    #[uniffi(default = 1)]
    pub num_threads: u32,
    /// `None` is [`Precision::AsStored`].
    #[uniffi(default)]
    pub precision: Option<Precision>,
    /// Largest batch a request (or a formed batch) may have.
    #[uniffi(default)]
    pub max_batch: Option<u32>,
    /// Makes axis 0 of every input a batch dimension, for models exported with a fixed batch
    /// of 1 (ORT's free dimension override, in reverse).
    #[uniffi(default)]
    pub batch_dim: Option<String>,
    /// Run QDQ-quantized convolutions and matrix products on int8 kernels.
    #[uniffi(default = true)]
    pub int8_fusion: bool,
    /// A directory (the app's cache directory) where what a load measured to choose its plan
    /// is kept for the next launch, keyed by the model's sha256 (LiteRT's GPU delegate keeps
    /// its serialization directory for the same reason). `None`: decided at every load.
    #[uniffi(default)]
    pub cache_dir: Option<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            num_threads: 1,
            precision: None,
            max_batch: None,
            batch_dim: None,
            int8_fusion: true,
            cache_dir: None,
        }
    }
}

impl ModelOptions {
    pub(crate) fn to_core(&self) -> Result<tern_core::ModelOptions> {
        if self.num_threads == 0 {
            return Err(TernError::InvalidInput(
                "num_threads must be at least 1".into(),
            ));
        }
        if self.max_batch == Some(0) {
            return Err(TernError::InvalidInput(
                "max_batch must be at least 1".into(),
            ));
        }
        Ok(tern_core::ModelOptions {
            threads: self.num_threads as usize,
            precision: match self.precision.unwrap_or(Precision::AsStored) {
                Precision::AsStored => tern_core::Precision::AsStored,
                Precision::Fp16 => tern_core::Precision::F16,
            },
            batch_symbol: self.batch_dim.clone(),
            max_batch: self.max_batch.map(|b| b as usize),
            int8_fusion: self.int8_fusion,
            cache_dir: self.cache_dir.as_ref().map(std::path::PathBuf::from),
            ..Default::default()
        })
    }
}

/// How many convolutions and matrix products run in each precision: proof that a quantized
/// model really runs on int8 kernels.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct KernelCounts {
    pub int8: u32,
    pub f16: u32,
    pub f32: u32,
    pub other: u32,
}

/// A loaded model. Thread-safe: app threads may call [`Engine::infer`] concurrently; each
/// call runs on its own session (created on demand, then reused).
#[derive(uniffi::Object)]
pub struct Engine {
    model: tern_core::Model,
    sessions: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub(crate) fn new(model: tern_core::Model) -> Result<Arc<Engine>> {
        // One session up front: preparation problems surface at load, not on first use.
        let session = model.session()?;
        Ok(Arc::new(Engine {
            model,
            sessions: Mutex::new(vec![session]),
        }))
    }

    fn take_session(&self) -> Result<Session> {
        let idle = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        match idle {
            Some(s) => Ok(s),
            None => Ok(self.model.session()?),
        }
    }

    fn return_session(&self, s: Session) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }
}

#[uniffi::export]
impl Engine {
    /// Loads and prepares an ONNX file.
    #[uniffi::constructor]
    pub fn from_path(path: String, options: ModelOptions) -> Result<Arc<Engine>> {
        Engine::new(tern_core::Model::load(&path, &options.to_core()?)?)
    }

    /// Prepares an ONNX model held in memory (an app asset, a download).
    #[uniffi::constructor]
    pub fn from_bytes(bytes: Vec<u8>, options: ModelOptions) -> Result<Arc<Engine>> {
        Engine::new(tern_core::Model::from_vec(bytes, &options.to_core()?)?)
    }

    pub fn inputs(&self) -> Vec<TensorSpec> {
        self.model.info().inputs.iter().map(spec).collect()
    }

    pub fn outputs(&self) -> Vec<TensorSpec> {
        self.model.info().outputs.iter().map(spec).collect()
    }

    /// Largest batch a request may carry, when one was configured.
    pub fn max_batch(&self) -> Option<u32> {
        self.model.info().max_batch.map(|b| b as u32)
    }

    pub fn kernel_counts(&self) -> KernelCounts {
        let i = self.model.inspection();
        let n = |p| i.count(p) as u32;
        KernelCounts {
            int8: n(ExecPrecision::Int8),
            f16: n(ExecPrecision::F16),
            f32: n(ExecPrecision::F32),
            other: n(ExecPrecision::Other),
        }
    }

    /// Runs one request. Inputs are matched by name, in any order; every input is required.
    /// Outputs come back in the model's order.
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let ordered = arrange(self.model.info(), inputs)?;
        let views: Vec<_> = ordered.iter().map(tern_core::Tensor::view).collect();
        let mut session = self.take_session()?;
        let result = session.run(&views).map(|outputs| {
            outputs
                .iter()
                .map(|(name, v)| tensor(name, v))
                .collect::<Vec<_>>()
        });
        self.return_session(session);
        Ok(result?)
    }

    /// A handle through which many app threads submit single requests that the small-window
    /// batcher groups into one forward pass.
    pub fn batched(&self, options: BatchOptions) -> Result<Arc<BatchedEngine>> {
        let config = options.to_core()?;
        let batcher = Batcher::new(self.model.clone(), config)?;
        Ok(Arc::new(BatchedEngine {
            batcher,
            timeout: options.timeout_ms.map(Duration::from_millis),
        }))
    }
}

/// Dynamic batching knobs (Triton's names).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct BatchOptions {
    /// Most rows one forward pass takes.
    #[uniffi(default = 8)]
    pub max_batch_size: u32,
    /// How long the oldest queued request may wait for others, in microseconds.
    #[uniffi(default = 500)]
    pub max_queue_delay_us: u64,
    /// Requests waiting at most; beyond it `infer` fails with `Overloaded`.
    #[uniffi(default = 128)]
    pub max_queue_size: u32,
    /// Worker threads, each with its own session.
    #[uniffi(default = 1)]
    pub instances: u32,
    /// Requests not started within this many milliseconds fail with `TimedOut`.
    #[uniffi(default)]
    pub timeout_ms: Option<u64>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch_size: 8,
            max_queue_delay_us: 500,
            max_queue_size: 128,
            instances: 1,
            timeout_ms: None,
        }
    }
}

impl BatchOptions {
    fn to_core(&self) -> Result<BatchConfig> {
        if self.max_batch_size == 0 || self.max_queue_size == 0 || self.instances == 0 {
            return Err(TernError::InvalidInput(
                "max_batch_size, max_queue_size and instances must be at least 1".into(),
            ));
        }
        Ok(BatchConfig {
            max_batch_size: self.max_batch_size as usize,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
            max_queue_size: self.max_queue_size as usize,
            instances: self.instances as usize,
            ..BatchConfig::default()
        })
    }
}

/// A snapshot of a batched engine's counters.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct BatchStatistics {
    pub queue_depth: u64,
    /// Requests answered with outputs.
    pub completed: u64,
    /// Requests that failed, were rejected or timed out.
    pub failed: u64,
    /// Forward passes executed.
    pub batches: u64,
    pub mean_batch_size: f64,
    /// Mean time from submission to answer.
    pub mean_latency_us: f64,
}

/// A model behind the small-window dynamic batcher.
#[derive(uniffi::Object)]
pub struct BatchedEngine {
    batcher: Batcher,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for BatchedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedEngine")
            .field("batcher", &self.batcher)
            .finish_non_exhaustive()
    }
}

#[uniffi::export]
impl BatchedEngine {
    /// Queues one request (which may carry several rows) and blocks until its answer.
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let info = self.batcher.model().info();
        let ordered = arrange(info, inputs)?;
        let views: Vec<_> = ordered.iter().map(tern_core::Tensor::view).collect();
        let options = RequestOptions {
            priority: 0,
            timeout: self.timeout,
        };
        let response = self.batcher.infer(&views, &options)?;
        info.outputs
            .iter()
            .enumerate()
            .map(|(ix, o)| {
                response
                    .get(ix)
                    .map(|v| tensor(&o.name, v))
                    .ok_or_else(|| TernError::Internal(format!("output `{}` missing", o.name)))
            })
            .collect()
    }

    pub fn stats(&self) -> BatchStatistics {
        let s = self.batcher.stats();
        BatchStatistics {
            queue_depth: s.queue_depth as u64,
            completed: s.success,
            failed: s.failures.iter().map(|(_, c)| c).sum(),
            batches: s.batches(),
            mean_batch_size: s.mean_batch_size(),
            mean_latency_us: s.request.sum_us as f64 / s.request.count().max(1) as f64,
        }
    }

    /// Stops accepting requests; queued ones fail with `Closed`. Also happens when the last
    /// reference goes away.
    pub fn shutdown(&self) {
        self.batcher.shutdown();
    }
}

fn spec(t: &tern_core::TensorInfo) -> TensorSpec {
    TensorSpec {
        name: t.name.clone(),
        dtype: t.dtype.into(),
        shape: t
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n as i64,
                Dim::Batch(_) | Dim::Symbol(_) => -1,
            })
            .collect(),
        batch_axis: t.batch_axis().map(|a| a as u32),
    }
}

fn tensor(name: &str, v: tern_core::TensorView<'_>) -> Tensor {
    Tensor {
        name: name.to_owned(),
        dtype: v.dtype().into(),
        shape: v.shape().iter().map(|&d| d as u64).collect(),
        data: v.bytes().to_vec(),
    }
}

/// The request's tensors in the model's input order, each checked for a consistent size.
fn arrange(info: &tern_core::ModelInfo, inputs: Vec<Tensor>) -> Result<Vec<tern_core::Tensor>> {
    let mut slots: Vec<Option<tern_core::Tensor>> = vec![None; info.inputs.len()];
    for t in inputs {
        let ix = info.input_index(&t.name)?;
        if slots[ix].is_some() {
            return Err(TernError::InvalidInput(format!(
                "input `{}` given twice",
                t.name
            )));
        }
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                TernError::InvalidInput(format!("input `{}`: dimension too large", t.name))
            })?;
        let name = t.name;
        slots[ix] = Some(
            tern_core::Tensor::from_bytes(t.dtype.into(), shape, t.data)
                .map_err(|e| TernError::InvalidInput(format!("input `{name}`: {e}")))?,
        );
    }
    slots
        .into_iter()
        .zip(&info.inputs)
        .map(|(t, i)| {
            t.ok_or_else(|| TernError::InvalidInput(format!("missing input `{}`", i.name)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn models() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    fn model(variant: &str) -> String {
        models()
            .join(variant)
            .join("1/model.onnx")
            .display()
            .to_string()
    }

    /// The held-out digits as (rows of pixels as bytes, labels).
    fn digits() -> (Vec<Vec<u8>>, Vec<i64>) {
        let x = tern_core::npy::read_file(models().join("testdata/digits_test_x.npy")).unwrap();
        let y = tern_core::npy::read_file(models().join("testdata/digits_test_y.npy")).unwrap();
        let rows = x.bytes().chunks(64 * 4).map(<[u8]>::to_vec).collect();
        (rows, y.view().to_vec::<i64>().unwrap())
    }

    fn pixels(name: &str, row: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DataType::F32,
            shape: vec![1, 1, 8, 8],
            data: row,
        }
    }

    fn argmax(t: &Tensor) -> i64 {
        let logits: Vec<f32> = t
            .data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as i64
    }

    fn accuracy(engine: &Engine) -> f64 {
        let name = engine.inputs()[0].name.clone();
        let (rows, labels) = digits();
        let correct = rows
            .into_iter()
            .zip(&labels)
            .filter(|(row, &label)| {
                let out = engine.infer(vec![pixels(&name, row.clone())]).unwrap();
                argmax(&out[0]) == label
            })
            .count();
        correct as f64 / labels.len() as f64
    }

    #[test]
    fn digits_fp32_and_int8_classify_the_held_out_set() {
        let fp32 = Engine::from_path(model("digits"), ModelOptions::default()).unwrap();
        let int8 = Engine::from_path(model("digits-int8-qdq"), ModelOptions::default()).unwrap();
        assert!(int8.kernel_counts().int8 > 0, "{:?}", int8.kernel_counts());
        assert_eq!(fp32.kernel_counts().int8, 0);
        // models/testdata/summary.json: onnxruntime scores 0.993 with both.
        assert!(accuracy(&fp32) > 0.985);
        assert!(accuracy(&int8) > 0.985);
    }

    #[test]
    fn metadata_names_the_batch_dimension() {
        let e = Engine::from_path(model("digits"), ModelOptions::default()).unwrap();
        let input = &e.inputs()[0];
        assert_eq!(input.dtype, DataType::F32);
        assert_eq!(input.shape, vec![-1, 1, 8, 8]);
        assert_eq!(input.batch_axis, Some(0));
        assert_eq!(e.outputs()[0].shape, vec![-1, 10]);
    }

    fn err(r: Result<Vec<Tensor>>) -> String {
        match r {
            Err(TernError::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let e = Engine::from_path(model("digits"), ModelOptions::default()).unwrap();
        let name = e.inputs()[0].name.clone();
        let ok = pixels(&name, vec![0; 256]);
        let m = err(e.infer(vec![Tensor {
            shape: vec![1, 64],
            ..ok.clone()
        }]));
        assert!(m.contains("shape") || m.contains("rank"), "{m}");
        let m = err(e.infer(vec![Tensor {
            data: vec![0; 255],
            ..ok.clone()
        }]));
        assert!(m.contains("needs 256 bytes, got 255"), "{m}");
        let m = err(e.infer(vec![Tensor {
            shape: vec![u64::MAX, 1 << 40, 8, 8],
            ..ok.clone()
        }]));
        assert!(m.contains("bytes"), "{m}");
        let m = err(e.infer(vec![Tensor {
            dtype: DataType::I32,
            ..ok.clone()
        }]));
        assert!(m.contains("i32") && m.contains("f32"), "{m}");
        let m = err(e.infer(vec![Tensor {
            name: "pixels".into(),
            ..ok.clone()
        }]));
        assert!(m.contains("unknown input `pixels`"), "{m}");
        assert!(err(e.infer(vec![])).contains("missing input"));
        assert!(err(e.infer(vec![ok.clone(), ok.clone()])).contains("given twice"));
        // After all that, the engine still answers.
        assert_eq!(e.infer(vec![ok]).unwrap().len(), 1);
    }

    #[test]
    fn corrupt_models_and_bad_options_are_refused() {
        let bad = Engine::from_bytes(b"not a model".to_vec(), ModelOptions::default());
        assert!(matches!(bad, Err(TernError::InvalidModel(_))), "{bad:?}");
        let mut bytes = std::fs::read(model("digits")).unwrap();
        bytes.truncate(bytes.len() / 2);
        let truncated = Engine::from_bytes(bytes, ModelOptions::default());
        assert!(matches!(truncated, Err(TernError::InvalidModel(_))));
        let missing = Engine::from_path("/nonexistent/model.onnx".into(), ModelOptions::default());
        assert!(matches!(missing, Err(TernError::InvalidModel(m)) if m.contains("/nonexistent")));
        let zero = ModelOptions {
            num_threads: 0,
            ..ModelOptions::default()
        };
        assert!(matches!(
            Engine::from_path(model("digits"), zero),
            Err(TernError::InvalidInput(_))
        ));
    }

    #[test]
    fn threads_submitting_through_the_batched_handle_get_their_own_answers() {
        let engine = Engine::from_path(model("digits"), ModelOptions::default()).unwrap();
        let name = engine.inputs()[0].name.clone();
        let (rows, _) = digits();
        let expected: Vec<Vec<u8>> = rows
            .iter()
            .take(64)
            .map(|r| {
                engine.infer(vec![pixels(&name, r.clone())]).unwrap()[0]
                    .data
                    .clone()
            })
            .collect();
        // A long window so that batches form even on a loaded machine.
        let batched = engine
            .batched(BatchOptions {
                max_queue_delay_us: 5_000,
                ..BatchOptions::default()
            })
            .unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (batched, rows, expected, name) = (&batched, &rows, &expected, &name);
                s.spawn(move || {
                    for i in (t..64).step_by(8) {
                        let out = batched.infer(vec![pixels(name, rows[i].clone())]).unwrap();
                        let got: Vec<f32> = bytemuck_f32(&out[0].data);
                        let want: Vec<f32> = bytemuck_f32(&expected[i]);
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() <= 1e-4 + 1e-4 * w.abs(), "row {i}");
                        }
                    }
                });
            }
        });
        let stats = batched.stats();
        assert_eq!(stats.completed, 64);
        assert_eq!(stats.failed, 0);
        assert!(stats.batches < 64, "no batch formed: {stats:?}");
        batched.shutdown();
        let closed = batched.infer(vec![pixels(&name, rows[0].clone())]);
        assert!(matches!(closed, Err(TernError::Closed(_))), "{closed:?}");
    }

    fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}
