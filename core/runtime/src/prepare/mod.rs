//! Translate time: everything done once per model version. Decode the ONNX protobuf, apply
//! Tern's rewrites, let tract type, declutter and optimize, and build the plan that sessions
//! run. Nothing here is on the request path.

mod activations;
mod branches;
mod decisions;
mod graph;
pub(crate) mod parts;
pub(crate) mod plans;
mod pointwise;
mod qdq;
mod reductions;
mod shapes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use sha2::Digest;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::transform::ModelTransform;

use crate::error::{catch, chain, Error, Result};
use crate::inspect::{ExecPrecision, HeavyOp, Inspection, Placement, PlanKind, PlanReport};
use crate::model::{Device, ModelOptions, PlanMode, Precision};
use crate::tensor::{DType, Dim, TensorInfo};

/// Declared inputs and outputs of a prepared model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Name of the batch dimension's symbol, when the model has one.
    pub batch: Option<String>,
    /// Largest batch a session accepts, when configured.
    pub max_batch: Option<usize>,
}

impl ModelInfo {
    /// Position of the input called `name`, for callers that address inputs by name.
    pub fn input_index(&self, name: &str) -> Result<usize> {
        self.inputs
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| {
                let known: Vec<String> = self
                    .inputs
                    .iter()
                    .map(|i| format!("`{}`", i.name))
                    .collect();
                Error::InvalidInput(format!(
                    "unknown input `{name}`; the model's inputs are {}",
                    known.join(", ")
                ))
            })
    }
}

/// How a prepared model runs shapes.
pub(crate) enum Plans {
    Symbolic(Arc<parts::Plan>),
    Concrete(Box<plans::Concrete>),
}

/// Immutable, shared result of preparation. Sessions hold an `Arc` of it.
pub(crate) struct Prepared {
    pub(crate) plans: Plans,
    pub(crate) info: ModelInfo,
    pub(crate) inspection: Inspection,
    /// tract's element type for each input, to build input tensors without re-deriving it.
    pub(crate) input_dts: Vec<DatumType>,
}

/// What every plan of a model is compiled with.
#[derive(Debug, Clone)]
pub(crate) struct Compile {
    precision: Precision,
    threads: usize,
    /// Threads preparing the parts of a graph.
    prepare_threads: usize,
    device: Device,
    int8_kernels: bool,
    float_kernels: bool,
    axis_rewrites: bool,
    /// The plan's batch is above 1 (concrete plans): tract's rule that folds a batch into the
    /// spatial axis of a matrix product is left out (see `optimize`).
    batch_apart: bool,
}

pub(crate) fn prepare(bytes: bytes::Bytes, options: &ModelOptions) -> Result<Prepared> {
    catch("preparing the model", || prepare_inner(bytes, options))
}

fn prepare_inner(bytes: bytes::Bytes, options: &ModelOptions) -> Result<Prepared> {
    if options.threads == 0 {
        return Err(Error::InvalidOption("threads must be at least 1".into()));
    }
    if options.threads > 1 && !cfg!(feature = "threads") {
        return Err(Error::InvalidOption(format!(
            "{} threads asked for, but this build runs models on one thread (tern-core's \
             `threads` feature is off)",
            options.threads
        )));
    }
    if options.prepare_threads == Some(0) {
        return Err(Error::InvalidOption(
            "prepare_threads must be at least 1".into(),
        ));
    }
    if options.max_batch == Some(0) {
        return Err(Error::InvalidOption("max_batch must be at least 1".into()));
    }
    let ladder = plans::ladder(&options.batch_sizes, options.max_batch)?;
    let (proto, digest) = match &options.cache_dir {
        // The digest runs beside the decoding: on a second core it costs no time.
        Some(_) if decisions::decides(options.plans) => {
            let whole = bytes.clone();
            std::thread::scope(|s| {
                let digest = s.spawn(move || sha2::Sha256::digest(&whole));
                let proto = decode(bytes);
                (proto, digest.join().ok())
            })
        }
        _ => (decode(bytes), None),
    };
    let mut proto = proto?;
    let decisions = match (&options.cache_dir, digest) {
        (Some(dir), Some(digest)) => Some(decisions::Decisions::new(dir, &digest, options)),
        _ => None,
    };
    let cached = decisions.as_ref().and_then(|d| d.read());
    let cached_kind = cached.as_ref().map(|v| v.kind);
    // A symbolic plan chosen before passed its probe then; the model and tract are the same.
    let probed = cached_kind == Some(PlanKind::Symbolic);
    let onnx = tract_onnx::onnx();
    check_ops(&onnx, proto.graph.as_ref().expect("checked by decode"))?;
    let (op_histogram, parameter_bytes) = census(proto.graph.as_ref().expect("checked by decode"));

    let forced_batch = options.batch_symbol.is_some();
    let batch = match &options.batch_symbol {
        Some(name) => {
            force_batch(&mut proto, name)?;
            Some(name.clone())
        }
        None => detect_batch(&proto),
    };
    // A pinned batch is no batch at all.
    let batch = batch.filter(|b| !pins_batch(&proto, &options.pinned, b));
    // Before any fusion: correctness does not depend on the int8 option.
    reductions::protect(&mut proto);
    let hard_swish = activations::fuse_hard_swish(&mut proto);
    let report = if options.int8_fusion {
        qdq::fuse(&mut proto)
    } else {
        qdq::Report::default()
    };
    let original_outputs = proto
        .graph
        .as_ref()
        .expect("checked by decode")
        .output
        .clone();
    let pinned = shapes::pin(&mut proto, &options.pinned)?;
    let mut rewrites = branches::fold_constant_ifs(&mut proto);
    // After the folding: a live branch's convolutions are the graph's now.
    let pointwise = pointwise::convs_as_einsum(&mut proto);
    if pointwise > 0 {
        rewrites.push(format!(
            "{pointwise} 1×1 convolutions written as matrix products (Einsum)"
        ));
    }
    if hard_swish > 0 {
        rewrites.push(format!(
            "{hard_swish} HardSigmoid·Mul pairs (h-swish) fused into HardSwish"
        ));
    }
    let (device, device_note) = device(options.device)?;
    let compile = Compile {
        precision: options.precision,
        threads: options.threads,
        prepare_threads: options
            .prepare_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        device,
        int8_kernels: options.int8_kernels,
        float_kernels: options.float_kernels,
        axis_rewrites: options.axis_rewrites,
        batch_apart: false,
    };
    // Declared value_info and output shapes carry a fixed batch of 1 when the batch was forced;
    // they would then fail to unify with the symbol, and tract re-derives them anyway.
    let ignore_declared = forced_batch || pinned;

    let census = (op_histogram, parameter_bytes);
    let declared_outputs = declared_outputs(&original_outputs);
    let ctx = Context {
        compile,
        batch: batch.as_deref(),
        options,
        report: &report,
        census: &census,
        ladder: &ladder,
        declared_outputs: &declared_outputs,
    };
    let attempt = |ignore: bool| {
        symbolic(&proto, ignore, &ctx).and_then(|p| if probed { Ok(p) } else { probe(p) })
    };
    let symbolic = match (options.plans, cached_kind) {
        (PlanMode::Concrete, _) | (_, Some(PlanKind::Concrete)) => None,
        _ => Some(match attempt(ignore_declared) {
            // Exporters declare shapes with their own symbols (`Ho`) that tract cannot equate
            // with what it derives (`(H+1)/2`); tract re-derives them all anyway.
            Err(first) if !ignore_declared => match attempt(true) {
                Ok(p) => {
                    rewrites.push(format!(
                        "declared output shapes and value_info ignored: {}",
                        message(&first)
                    ));
                    Ok(p)
                }
                Err(second) => Err(second),
            },
            other => other,
        }),
    };
    let mut prepared = match symbolic {
        Some(Ok(s)) if options.plans != PlanMode::Fastest || probed => s,
        Some(Ok(s)) => match concrete(proto, &ctx) {
            Ok(c) => fastest(s, c)?,
            Err(e) => {
                log::info!("no concrete plan to compare with ({e}); keeping the symbolic plan");
                s
            }
        },
        Some(Err(e)) if options.plans == PlanMode::Symbolic => {
            return Err(Error::Prepare(format!(
                "{} (fix: plans `auto` or `concrete` prepare one plan per input shape instead){}",
                message(&e),
                hint(&proto, batch.as_deref())
            )))
        }
        Some(Err(sym)) => {
            let hint = hint(&proto, batch.as_deref());
            let mut c = concrete(proto, &ctx).map_err(|e| {
                Error::Prepare(format!(
                    "with symbolic shapes: {}; with concrete shapes: {}{hint}",
                    message(&sym),
                    message(&e)
                ))
            })?;
            c.inspection.plan.why =
                format!("tract cannot keep the shapes symbolic: {}", message(&sym));
            log::info!(
                "concrete plans (batch sizes {:?}): {}",
                c.inspection.plan.batch_sizes,
                c.inspection.plan.why
            );
            c
        }
        None => {
            let mut c = concrete(proto, &ctx).inspect_err(|_| {
                if let Some(d) = &decisions {
                    d.forget();
                }
            })?;
            c.inspection.plan.why = "concrete plans were asked for".into();
            c
        }
    };
    if let Some(d) = &decisions {
        let plan = &mut prepared.inspection.plan;
        match cached {
            Some(v) if v.kind == plan.kind => {
                plan.why = format!(
                    "{} (decided at an earlier load, kept in {})",
                    v.why,
                    d.path().display()
                );
            }
            _ => d.write(&decisions::Verdict {
                kind: plan.kind,
                why: plan.why.clone(),
            }),
        }
    }
    prepared.inspection.rewrites.append(&mut rewrites);
    prepared.inspection.device = device;
    prepared.inspection.device_note = device_note;
    Ok(prepared)
}

/// What both kinds of preparation share.
struct Context<'a> {
    compile: Compile,
    batch: Option<&'a str>,
    options: &'a ModelOptions,
    report: &'a qdq::Report,
    census: &'a (BTreeMap<String, usize>, u64),
    ladder: &'a [usize],
    /// Output shapes as the file declares them, before any pin dropped them.
    declared_outputs: &'a [Option<Vec<Declared>>],
}

/// One declared dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Declared {
    Size(usize),
    Symbol(String),
    Unknown,
}

fn declared(v: &pb::ValueInfoProto) -> Option<Vec<Declared>> {
    use pb::tensor_shape_proto::dimension::Value;
    Some(
        dims(v)?
            .iter()
            .map(|d| match &d.value {
                Some(Value::DimValue(n)) if *n >= 0 => Declared::Size(*n as usize),
                Some(Value::DimParam(p)) if !p.is_empty() => Declared::Symbol(p.clone()),
                _ => Declared::Unknown,
            })
            .collect(),
    )
}

fn declared_outputs(outputs: &[pb::ValueInfoProto]) -> Vec<Option<Vec<Declared>>> {
    outputs.iter().map(declared).collect()
}

/// The message of a preparation error without its "model cannot be prepared" prefix.
fn message(e: &Error) -> String {
    match e {
        Error::Prepare(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Suggests pinning when inputs keep symbols other than the batch.
fn hint(proto: &pb::ModelProto, batch: Option<&str>) -> String {
    let Some(g) = proto.graph.as_ref() else {
        return String::new();
    };
    let mut open = vec![];
    for ix in real_inputs(g) {
        let input = &g.input[ix];
        let Some(d) = declared(input) else {
            open.push(format!("{}=…", input.name));
            continue;
        };
        let has_symbol = d.iter().enumerate().any(|(axis, d)| match d {
            Declared::Size(_) => false,
            Declared::Symbol(s) => !(axis == 0 && Some(s.as_str()) == batch),
            Declared::Unknown => true,
        });
        if has_symbol {
            let dims: Vec<String> = d
                .iter()
                .map(|d| match d {
                    Declared::Size(n) => n.to_string(),
                    Declared::Symbol(s) if Some(s.as_str()) == batch => s.clone(),
                    _ => "SIZE".into(),
                })
                .collect();
            open.push(format!("{}={}", input.name, dims.join(",")));
        }
    }
    if open.is_empty() {
        String::new()
    } else {
        format!(
            " (fix: pin the inputs with symbolic sizes to the shapes you serve, e.g. `--pin {}`, \
             or `pin` in the model's config.toml)",
            open.join(" --pin ")
        )
    }
}

/// ONNX → tract's graph, not typed yet.
pub(crate) fn import(proto: &pb::ModelProto, ignore_declared: bool) -> Result<InferenceModel> {
    let started = Instant::now();
    let onnx = tract_onnx::onnx()
        .with_ignore_value_info(ignore_declared)
        .with_ignore_output_shapes(ignore_declared);
    let model = onnx
        .model_for_proto_model(proto)
        .map_err(|e| Error::Prepare(chain(&e)))?;
    log::debug!("tract import {:.1?}", started.elapsed());
    Ok(model)
}

/// tract's analysis of the whole graph; not decluttered yet.
fn type_whole(model: InferenceModel) -> Result<TypedModel> {
    let started = Instant::now();
    let typed = model.into_typed().map_err(|e| Error::Prepare(chain(&e)))?;
    log::debug!("tract typing {:.1?}", started.elapsed());
    Ok(typed)
}

/// Names and facts of a typed graph's inputs and outputs.
pub(crate) struct Interface {
    inputs: Vec<(String, TypedFact)>,
    outputs: Vec<(String, TypedFact)>,
}

impl Interface {
    fn of(m: &TypedModel) -> Result<Interface> {
        let facts = |outlets: &[OutletId]| {
            outlets
                .iter()
                .map(|o| Ok(m.outlet_fact(*o)?.clone()))
                .collect::<TractResult<Vec<_>>>()
                .map_err(|e| Error::Prepare(chain(&e)))
        };
        Ok(Interface::new(
            Interface::names(m),
            facts(&m.inputs)?,
            facts(&m.outputs)?,
        ))
    }

    /// What a graph calls its inputs and its outputs.
    fn names<F, O>(m: &Graph<F, O>) -> (Vec<String>, Vec<String>)
    where
        F: Fact + Clone + 'static,
        O: parts::GraphOp,
    {
        let name = |o: &OutletId| {
            m.outlet_label(*o)
                .unwrap_or(&m.node(o.node).name)
                .to_string()
        };
        (
            m.inputs.iter().map(name).collect(),
            m.outputs.iter().map(name).collect(),
        )
    }

    fn new(
        (input_names, output_names): (Vec<String>, Vec<String>),
        inputs: Vec<TypedFact>,
        outputs: Vec<TypedFact>,
    ) -> Interface {
        Interface {
            inputs: input_names.into_iter().zip(inputs).collect(),
            outputs: output_names.into_iter().zip(outputs).collect(),
        }
    }
}

/// Whether the graph has a quantized convolution for the int8 kernels to take: where it has
/// none, folding the constants for them (a pass over every node, a millisecond of a small float
/// MobileNet's load) is skipped.
fn has_quantized_convs(m: &TypedModel) -> bool {
    m.nodes().iter().any(|n| {
        n.op_as::<tract_onnx::tract_core::ops::cnn::conv::Conv>()
            .is_some_and(|c| c.q_params.is_some())
    })
}

/// Typed model → int8 convolutions fused, decluttered (in f16 when asked), with Tern's int8
/// rewrites that need tract's simplified graph.
fn finish(typed: &mut TypedModel, compile: &Compile) -> Result<()> {
    let started = Instant::now();
    if compile.int8_kernels && has_quantized_convs(typed) {
        // Weights and quantization parameters reach the convolutions through casts; folded,
        // they are constants the fused kernels can prepare once.
        typed
            .prop_consts()
            .and_then(|_| crate::int8::fuse(typed))
            .map_err(|e| Error::Prepare(format!("fusing int8 convolutions: {}", chain(&e))))?;
    }
    declutter(typed, compile.axis_rewrites).map_err(|e| Error::Prepare(chain(&e)))?;
    log::debug!("tract declutter {:.1?}", started.elapsed());
    if compile.int8_kernels {
        let started = Instant::now();
        let tables = crate::int8::fuse_islands(typed)
            .map_err(|e| Error::Prepare(format!("fusing int8 activations: {}", chain(&e))))?;
        let folded = crate::int8::fold_tables(typed)
            .map_err(|e| Error::Prepare(format!("folding lookup tables: {}", chain(&e))))?;
        log::debug!(
            "{tables} float islands between 8-bit tensors became lookup tables, {folded} of \
             them folded into the op before, in {:.1?}",
            started.elapsed()
        );
    }
    // After the islands (which end in QuantizeLinear and become tables whole). A correctness
    // fix, kept whatever the kernels: see `int8/quantize.rs`.
    let fixed = crate::int8::fix_quantize(typed)
        .map_err(|e| Error::Prepare(format!("replacing QuantizeLinear: {}", chain(&e))))?;
    log::debug!("{fixed} QuantizeLinear nodes saturate in Tern's op");
    // f16 plans convert every op after this point and CUDA places tract's own: the kernel
    // serves f32 on the CPU only.
    if compile.float_kernels
        && compile.precision == Precision::AsStored
        && compile.device == Device::Cpu
    {
        let replaced = crate::dwconv::fuse(typed)
            .map_err(|e| Error::Prepare(format!("placing depthwise kernels: {}", chain(&e))))?;
        log::debug!("{replaced} f32 depthwise convolutions on Tern's kernel");
        let sums = crate::planesum::fuse(typed)
            .map_err(|e| Error::Prepare(format!("placing plane sums: {}", chain(&e))))?;
        log::debug!("{sums} f32 sums over trailing axes on Tern's loop");
        let products = crate::pwconv::fuse(typed)
            .map_err(|e| Error::Prepare(format!("placing pointwise kernels: {}", chain(&e))))?;
        log::debug!("{products} f32 1×1 convolutions on Tern's kernel");
        let unrolled = crate::im2col::fuse(typed)
            .map_err(|e| Error::Prepare(format!("placing unrolled convolutions: {}", chain(&e))))?;
        log::debug!("{unrolled} small f32 convolutions unrolled onto Tern's pointwise kernel");
        // After the plane sums (a block starts with one) and the pointwise products (which
        // leave the block's one-pixel products to tract).
        let blocks = crate::excite::fuse(typed).map_err(|e| {
            Error::Prepare(format!(
                "placing squeeze-and-excitation blocks: {}",
                chain(&e)
            ))
        })?;
        log::debug!("{blocks} squeeze-and-excitation blocks on Tern's loop");
    }
    trace_graph("decluttered", typed);
    if compile.precision == Precision::F16 {
        FloatPrecisionTranslator::new(DatumType::F32, DatumType::F16)
            .transform(typed)
            .and_then(|_| declutter(typed, compile.axis_rewrites))
            .map_err(|e| Error::Prepare(format!("converting to f16: {}", chain(&e))))?;
    }
    Ok(())
}

/// A prepared plan with what was read off the graph on the way.
pub(crate) struct Built<T> {
    pub(crate) plan: Arc<parts::Plan>,
    survey: Survey,
    io: T,
}

/// Imported graph → runnable plan. Large graphs planned for the CPU as stored (f32 or int8)
/// are split, their parts typed one after the other and each prepared on the pool as soon as
/// it is typed (`parts.rs`); a graph whose parts do not type alone is typed whole, then split.
/// `io` reads the model's interface.
pub(crate) fn build<T>(
    import: impl Fn() -> Result<InferenceModel>,
    compile: &Compile,
    io: impl FnOnce(&Interface) -> Result<T>,
) -> Result<Built<T>> {
    let threads = compile.prepare_threads;
    let model = import()?;
    // f16 retypes the inputs, and CUDA plans the whole graph on the device: both whole.
    if compile.device != Device::Cpu || compile.precision != Precision::AsStored {
        let mut typed = type_whole(model)?;
        finish(&mut typed, compile)?;
        let io = io(&Interface::of(&typed)?)?;
        let mut survey = Survey::of(&typed);
        let (n_in, n_out) = (typed.inputs.len(), typed.outputs.len());
        let plan = optimize(typed, compile)?;
        if compile.device != Device::Cpu {
            let placement = placement(plan.model());
            log::info!("placed by tract: {placement}");
            survey.placement = Some(placement);
        }
        return Ok(Built {
            plan: Arc::new(parts::Parts::whole(plan, n_in, n_out)),
            survey,
            io,
        });
    }
    let started = Instant::now();
    let prepare_part = |mut m: TypedModel| {
        finish(&mut m, compile)?;
        let survey = Survey::of(&m);
        Ok((optimize(m, compile)?, survey))
    };
    let whole = |model: InferenceModel| {
        let typed = type_whole(model)?;
        let interface = Interface::of(&typed)?;
        let split = parts::split(typed, threads)
            .map_err(|e| Error::Prepare(format!("splitting the graph: {}", chain(&e))))?;
        Ok::<_, Error>((split.map_parallel(threads, prepare_part)?, interface))
    };
    let cut = parts::cut(&model, threads, parts::PART_NODES_IMPORTED)
        .map_err(|e| Error::Prepare(format!("splitting the graph: {}", chain(&e))))?;
    let (built, interface) = match cut {
        Some(cut) => {
            let names = Interface::names(&model);
            // The parts share the graph's weights; with the graph gone, each weight is freed
            // once the parts that read it have packed it (ResNet-18: 40 MB less at the peak).
            drop(model);
            match parts::type_and_map(cut, threads, prepare_part)? {
                parts::Typed::Done {
                    parts,
                    inputs,
                    outputs,
                } => (parts, Interface::new(names, inputs, outputs)),
                parts::Typed::Untyped(why) => {
                    log::debug!("the graph's parts do not type alone ({why}): typing it whole");
                    whole(import()?)?
                }
            }
        }
        None => whole(model)?,
    };
    let io = io(&interface)?;
    let mut survey = Survey {
        cuts: built.cuts.clone(),
        ..Survey::default()
    };
    let plan = built.map(|(plan, s)| {
        survey.extend(s);
        plan
    });
    log::debug!(
        "{} part(s) typed, decluttered and optimized on {} thread(s) in {:.1?}",
        plan.parts.len(),
        threads.min(plan.parts.len()),
        started.elapsed()
    );
    Ok(Built {
        plan: Arc::new(plan),
        survey,
        io,
    })
}

/// tract's declutter, optionally without its `ChangeAxes` pass. That pass tries every axis
/// change on every wire and applies them one patch at a time; on MobileNetV3 it is three
/// quarters of the declutter (squeeze-and-excitation branches lose their 1×1 axes op by op).
fn declutter(typed: &mut TypedModel, axis_rewrites: bool) -> TractResult<()> {
    let mut optimizer = tract_onnx::tract_core::optim::Optimizer::declutter();
    if !axis_rewrites {
        without_pass(&mut optimizer, "ChangeAxes");
    }
    optimizer.optimize(typed)
}

/// Drops one of tract's passes from an optimizer. The pass types are private to tract; their
/// Debug names are the handle it gives.
fn without_pass(optimizer: &mut tract_onnx::tract_core::optim::Optimizer, name: &str) -> usize {
    let before = optimizer.passes.len();
    optimizer
        .passes
        .retain(|p| !format!("{p:?}").starts_with(name));
    before - optimizer.passes.len()
}

/// The device a model asked for runs on, or the CPU with the reason.
fn device(asked: Device) -> Result<(Device, Option<String>)> {
    match asked {
        Device::Cpu => Ok((Device::Cpu, None)),
        Device::Cuda => cuda_device(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<(Device, Option<String>)> {
    // Asked once per process: a GPU does not come and go between loads, and tract's context
    // is process-wide.
    static USABLE: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    let usable = USABLE.get_or_init(|| {
        // The libraries (driver, cudart, nvrtc, cuBLAS, cuDNN) first, then a context, a stream
        // and the library handles on this thread: libraries that load can still be the
        // toolkit's stub driver or find no device, and tract panics on those at prepare time.
        catch("probing CUDA", || {
            tract_cuda::utils::ensure_cuda_runtime_dependencies("CUDA runtime libraries not found")
                .and_then(|_| tract_cuda::with_cuda_stream(|_| Ok(())))
                .map_err(|e| Error::Prepare(format!("{e:#}")))
        })
        // A panic here is tract refusing a stub driver or a missing device, a fact about the
        // machine rather than a bug to report: its text is the reason.
        .map_err(|e| match e {
            Error::Prepare(why) | Error::Internal(why) => why,
            other => other.to_string(),
        })
    });
    match usable {
        Ok(()) => Ok((Device::Cuda, None)),
        Err(why) => {
            let note = format!("CUDA was asked for but is unavailable, running on the CPU: {why}");
            log::warn!("{note}");
            Ok((Device::Cpu, Some(note)))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<(Device, Option<String>)> {
    Err(Error::InvalidOption(
        "device `cuda` needs Tern built with the `cuda` feature (`cargo build --features cuda`); \
         this build runs on the CPU only"
            .into(),
    ))
}

#[cfg(feature = "threads")]
fn executor(threads: usize) -> Option<tract_linalg::multithread::Executor> {
    (threads > 1).then(|| tract_linalg::multithread::Executor::multithread(threads))
}

/// One thread: `prepare` refused more.
#[cfg(not(feature = "threads"))]
fn executor(_threads: usize) -> Option<tract_linalg::multithread::Executor> {
    None
}

/// Every node of a graph (id, op, inputs, output facts) at trace level: what tract made of the
/// model, to compare two preparations.
fn trace_graph(stage: &str, m: &TypedModel) {
    if !log::log_enabled!(log::Level::Trace) {
        return;
    }
    for node in m.nodes() {
        let facts: Vec<String> = node
            .outputs
            .iter()
            .map(|o| format!("{:?}", o.fact))
            .collect();
        log::trace!(
            "{stage}: {} {} {:?} -> {}",
            node.id,
            node.op.name(),
            node.inputs,
            facts.join(", ")
        );
    }
}

/// Decluttered model → tract's optimized, runnable plan.
fn optimize(typed: TypedModel, compile: &Compile) -> Result<Arc<TypedSimplePlan>> {
    let run_options = tract_onnx::tract_core::runtime::RunOptions {
        executor: executor(compile.threads),
        ..Default::default()
    };
    if compile.device == Device::Cuda {
        return cuda_plan(typed, &run_options);
    }
    let started = Instant::now();
    let mut optimized = typed;
    let mut codegen = tract_onnx::tract_core::optim::Optimizer::codegen();
    if compile.batch_apart {
        // tract's MergeConsecutiveSameRoleAxes moves the reduction axis of `oi,nihw->nohw` (a
        // 1×1 convolution) last whenever the batch and the spatial axis are both above 1, to
        // fold them into one: a copy before and after every such product, and a bias it can
        // no longer fuse. Without the pass tract loops over the batch instead: float
        // MobileNets at batch 4 run in 57% of the time (BENCHMARKS.md). At batch 1 the pass
        // only merges H and W, which is worth keeping.
        without_pass(&mut codegen, "MergeConsecutiveSameRoleAxes");
    }
    // `into_optimized` would declutter again; every caller hands over a decluttered model.
    optimized
        .optimize_with_session(&mut codegen.session())
        .map_err(|e| Error::Prepare(chain(&e)))?;
    log::debug!("tract optimize {:.1?}", started.elapsed());
    trace_graph("optimized", &optimized);
    TypedSimplePlan::new_with_options(optimized, &run_options)
        .map_err(|e| Error::Prepare(chain(&e)))
}

/// Counts a device plan's ops by where they run. tract's GPU runtimes name their ops after the
/// backend (`CudaConv`, `GpuSlice`); anything else runs on the CPU. Sources, constants and the
/// copies between host and device are not work of the model's.
fn placement(m: &TypedModel) -> Placement {
    use tract_onnx::tract_core::ops::{konst::Const, source::TypedSource};
    let mut placement = Placement::default();
    for node in m.nodes() {
        let name = node.op.name();
        if node.op_is::<TypedSource>() || node.op_is::<Const>() || name.starts_with("DeviceSync") {
            continue;
        }
        if name.starts_with("Cuda") || name.starts_with("Gpu") {
            placement.on_device += 1;
        } else {
            *placement.on_cpu.entry(name.to_string()).or_default() += 1;
        }
    }
    placement
}

/// tract's CUDA runtime: moves what it can to the GPU, optimizes, uploads the constants.
#[cfg(feature = "cuda")]
fn cuda_plan(
    typed: TypedModel,
    run_options: &tract_onnx::tract_core::runtime::RunOptions,
) -> Result<Arc<TypedSimplePlan>> {
    let runtime = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
        .map_err(|e| Error::Prepare(chain(&e)))?
        .ok_or_else(|| Error::Internal("tract's CUDA runtime is not registered".into()))?;
    let runnable = runtime
        .prepare_with_options(typed, run_options)
        .map_err(|e| Error::Prepare(format!("on the GPU: {}", chain(&e))))?;
    runnable
        .typed_plan()
        .cloned()
        .ok_or_else(|| Error::Internal("tract's CUDA runtime returned no plan".into()))
}

#[cfg(not(feature = "cuda"))]
fn cuda_plan(
    _: TypedModel,
    _: &tract_onnx::tract_core::runtime::RunOptions,
) -> Result<Arc<TypedSimplePlan>> {
    unreachable!("device() refuses CUDA in builds without the feature")
}

fn input_dts(io: &Interface) -> Vec<DatumType> {
    io.inputs.iter().map(|(_, f)| f.datum_type).collect()
}

fn symbolic(proto: &pb::ModelProto, ignore_declared: bool, ctx: &Context) -> Result<Prepared> {
    let built = build(
        || import(proto, ignore_declared),
        &ctx.compile,
        |io| {
            Ok((
                model_info(io, ctx.batch, ctx.options.max_batch)?,
                input_dts(io),
            ))
        },
    )?;
    let (info, input_dts) = built.io;
    let plan = PlanReport {
        kind: PlanKind::Symbolic,
        why: "tract keeps every shape symbolic".into(),
        batch_sizes: vec![],
        cache_limit: 0,
    };
    let inspection = inspect(Some(&built.survey), ctx.report, ctx.census, plan);
    Ok(Prepared {
        plans: Plans::Symbolic(built.plan),
        info,
        inspection,
        input_dts,
    })
}

fn concrete(proto: pb::ModelProto, ctx: &Context) -> Result<Prepared> {
    let g = proto.graph.as_ref().expect("checked by decode");
    let inputs: Vec<(String, i32, Vec<Declared>)> = real_inputs(g)
        .map(|ix| {
            let v = &g.input[ix];
            let elem = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(pb::type_proto::Value::TensorType(t)) => t.elem_type,
                None => 0,
            };
            (v.name.clone(), elem, declared(v).unwrap_or_default())
        })
        .collect();
    let batched: Vec<bool> = inputs
        .iter()
        .map(|(_, _, d)| matches!((d.first(), ctx.batch), (Some(Declared::Symbol(s)), Some(b)) if s == b))
        .collect();
    // The first plan is built now when every size but the batch is known.
    let first: Option<Vec<Vec<usize>>> = inputs
        .iter()
        .zip(&batched)
        .map(|((_, _, d), &batched)| {
            d.iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    _ if axis == 0 && batched => Some(ctx.ladder[0]),
                    Declared::Size(n) => Some(*n),
                    _ => None,
                })
                .collect::<Option<Vec<usize>>>()
                .filter(|s| !s.is_empty() || d.is_empty())
        })
        .collect();
    let plans = plans::Concrete::new(
        proto,
        ctx.compile.clone(),
        ctx.ladder.to_vec(),
        batched.clone(),
        ctx.options.plan_cache,
    );
    let report = PlanReport {
        kind: PlanKind::Concrete,
        why: String::new(),
        batch_sizes: if ctx.batch.is_some() {
            ctx.ladder.to_vec()
        } else {
            vec![]
        },
        cache_limit: plans.limit(),
    };
    let f16 = ctx.compile.precision == Precision::F16;
    let input_info: Vec<TensorInfo> = inputs
        .iter()
        .zip(&batched)
        .map(|((name, elem, d), &batched)| {
            let dtype = onnx_dtype(*elem, f16).ok_or_else(|| {
                Error::Prepare(format!(
                    "input `{name}` has ONNX element type {elem}, which Tern does not serve"
                ))
            })?;
            let shape = d
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    _ if axis == 0 && batched => {
                        Dim::Batch(ctx.batch.unwrap_or_default().to_string())
                    }
                    Declared::Size(n) => Dim::Fixed(*n),
                    Declared::Symbol(s) => Dim::Symbol(s.clone()),
                    Declared::Unknown => Dim::Symbol("?".into()),
                })
                .collect();
            Ok(TensorInfo {
                name: name.clone(),
                dtype,
                shape,
            })
        })
        .collect::<Result<_>>()?;
    let input_dts = input_info.iter().map(|i| datum_type(i.dtype)).collect();
    let (outputs, inspection) = match first {
        Some(shapes) => {
            let built = build(
                || plans.imported(&shapes),
                &plans.compile_for(&shapes),
                |io| concrete_outputs(io, ctx),
            )?;
            let inspection = inspect(Some(&built.survey), ctx.report, ctx.census, report);
            plans.insert(&shapes, built.plan);
            (built.io, inspection)
        }
        None => {
            let g = plans.source().graph.as_ref().expect("checked by decode");
            let outputs = g
                .output
                .iter()
                .zip(ctx.declared_outputs)
                .map(|(o, d)| declared_output(o, d.as_deref(), ctx.batch, f16))
                .collect::<Result<Vec<_>>>()?;
            (outputs, inspect(None, ctx.report, ctx.census, report))
        }
    };
    let batch = ctx.batch.filter(|_| batched.iter().any(|b| *b));
    Ok(Prepared {
        plans: Plans::Concrete(Box::new(plans)),
        info: ModelInfo {
            inputs: input_info,
            outputs,
            batch: batch.map(String::from),
            max_batch: ctx.options.max_batch,
        },
        inspection,
        input_dts,
    })
}

/// Outputs of a concrete plan: sizes from the plan, the batch axis where the file declares it
/// (or, undeclared, where the size is the planned batch).
fn concrete_outputs(io: &Interface, ctx: &Context) -> Result<Vec<TensorInfo>> {
    let info = model_info(io, None, None)?;
    Ok(info
        .outputs
        .into_iter()
        .enumerate()
        .map(|(ix, mut o)| {
            if let (Some(b), Some(first)) = (ctx.batch, o.shape.first()) {
                let declared = ctx
                    .declared_outputs
                    .get(ix)
                    .and_then(|d| d.as_ref())
                    .and_then(|d| d.first());
                let is_batch = match declared {
                    Some(Declared::Symbol(s)) => s == b,
                    Some(Declared::Size(_)) => false,
                    _ => *first == Dim::Fixed(ctx.ladder[0]),
                };
                if is_batch {
                    o.shape[0] = Dim::Batch(b.to_string());
                }
            }
            o
        })
        .collect())
}

fn declared_output(
    o: &pb::ValueInfoProto,
    declared: Option<&[Declared]>,
    batch: Option<&str>,
    f16: bool,
) -> Result<TensorInfo> {
    let elem = match o.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => t.elem_type,
        None => 0,
    };
    let dtype = onnx_dtype(elem, f16).ok_or_else(|| {
        Error::Prepare(format!(
            "output `{}` declares element type {elem}, which Tern does not serve",
            o.name
        ))
    })?;
    let shape = declared
        .unwrap_or_default()
        .iter()
        .map(|d| match d {
            Declared::Size(n) => Dim::Fixed(*n),
            Declared::Symbol(s) if Some(s.as_str()) == batch => Dim::Batch(s.clone()),
            Declared::Symbol(s) => Dim::Symbol(s.clone()),
            Declared::Unknown => Dim::Symbol("?".into()),
        })
        .collect();
    Ok(TensorInfo {
        name: o.name.clone(),
        dtype,
        shape,
    })
}

fn onnx_dtype(elem: i32, f16: bool) -> Option<DType> {
    use pb::tensor_proto::DataType as T;
    Some(match T::try_from(elem).ok()? {
        T::Float if f16 => DType::F16,
        T::Float => DType::F32,
        T::Float16 => DType::F16,
        T::Int8 => DType::I8,
        T::Uint8 => DType::U8,
        T::Int32 => DType::I32,
        T::Int64 => DType::I64,
        T::Bool => DType::Bool,
        _ => return None,
    })
}

fn datum_type(d: DType) -> DatumType {
    match d {
        DType::F32 => DatumType::F32,
        DType::F16 => DatumType::F16,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::Bool => DatumType::Bool,
    }
}

/// Times both plans on zeros (batch 1, after one untimed run each) and keeps the faster.
fn fastest(symbolic: Prepared, concrete: Prepared) -> Result<Prepared> {
    let time = |p: Prepared| -> Result<(Duration, Prepared)> {
        let model = crate::model::Model { inner: Arc::new(p) };
        let mut session = model.session()?;
        let zeros = session.zeros(1, None)?;
        let Some(zeros) = zeros else {
            drop(session);
            return Ok((Duration::ZERO, unwrap_model(model)));
        };
        let views: Vec<_> = zeros.iter().map(|t| t.view()).collect();
        session.run(&views)?;
        let mut runs = Vec::with_capacity(7);
        for _ in 0..7 {
            let t = Instant::now();
            session.run(&views)?;
            runs.push(t.elapsed());
        }
        runs.sort_unstable();
        drop(session);
        Ok((runs[runs.len() / 2], unwrap_model(model)))
    };
    let (s_time, symbolic) = time(symbolic)?;
    let (c_time, mut concrete) = time(concrete)?;
    let chosen = if c_time < s_time {
        concrete.inspection.plan.why =
            format!("faster than the symbolic plan at batch 1: {c_time:.1?} vs {s_time:.1?}");
        concrete
    } else {
        let mut s = symbolic;
        s.inspection.plan.why =
            format!("faster than concrete plans at batch 1: {s_time:.1?} vs {c_time:.1?}");
        s
    };
    log::info!(
        "plans: {} ({})",
        chosen.inspection.plan.kind,
        chosen.inspection.plan.why
    );
    Ok(chosen)
}

/// Size given to symbolic dimensions other than the batch when probing: a multiple of the
/// strides detectors and U-Nets use.
const PROBE_SIZE: usize = 32;

/// Runs a symbolic plan once on zeros. tract sometimes types a graph symbolically that it then
/// cannot evaluate ("Undetermined symbol in expression"); concrete plans serve such models.
fn probe(prepared: Prepared) -> Result<Prepared> {
    let started = Instant::now();
    let model = crate::model::Model {
        inner: Arc::new(prepared),
    };
    let outcome = model.session().and_then(|mut session| {
        match session.zeros(1, Some(PROBE_SIZE)) {
            Ok(Some(zeros)) => {
                let views: Vec<_> = zeros.iter().map(|t| t.view()).collect();
                session.run(&views)?;
            }
            Ok(None) => {}
            // Too big to make up: unverified, and warm-up will say so.
            Err(e) => log::info!("probe skipped: {e}"),
        }
        Ok(())
    });
    log::debug!("probe run {:.1?}", started.elapsed());
    match outcome {
        Ok(()) => Ok(unwrap_model(model)),
        Err(e) => Err(Error::Prepare(format!(
            "the symbolic plan fails on a probe run: {}",
            message(&e)
        ))),
    }
}

fn unwrap_model(model: crate::model::Model) -> Prepared {
    match Arc::try_unwrap(model.inner) {
        Ok(p) => p,
        Err(_) => unreachable!("the timing session was dropped: no other owner"),
    }
}

/// True when a pin fixes axis 0 of every input that carries the batch symbol.
fn pins_batch(proto: &pb::ModelProto, pins: &[crate::model::PinnedInput], batch: &str) -> bool {
    let Some(g) = proto.graph.as_ref() else {
        return false;
    };
    let batched: Vec<&str> = real_inputs(g)
        .filter(|&ix| {
            matches!(declared(&g.input[ix]).as_deref().and_then(|d| d.first()),
                Some(Declared::Symbol(s)) if s == batch)
        })
        .map(|ix| g.input[ix].name.as_str())
        .collect();
    !batched.is_empty()
        && batched.iter().all(|name| {
            pins.iter()
                .any(|p| p.name == *name && p.shape.first().is_some_and(|d| d.is_some()))
        })
}

/// From `Bytes`, prost slices each weight payload out of the buffer and copies it once; from a
/// `&[u8]` it copies it twice (into a `Bytes`, then into the field), which on ResNet-18 (47 MB)
/// is tens of milliseconds of page faults at load.
fn decode(bytes: bytes::Bytes) -> Result<pb::ModelProto> {
    if bytes.is_empty() {
        return Err(Error::NotOnnx("the file is empty".into()));
    }
    let proto = pb::ModelProto::decode(bytes).map_err(|e| {
        Error::NotOnnx(format!(
            "protobuf decoding failed ({e}); is the file truncated?"
        ))
    })?;
    match &proto.graph {
        Some(g) if !g.node.is_empty() || !g.output.is_empty() => Ok(proto),
        _ => Err(Error::NotOnnx("the protobuf holds no graph".into())),
    }
}

/// Names the first operator tract cannot run, before tract reports it less directly.
fn check_ops(onnx: &tract_onnx::Onnx, g: &pb::GraphProto) -> Result<()> {
    for node in &g.node {
        if !onnx.op_register.0.contains_key(&node.op_type) {
            let domain = if node.domain.is_empty() {
                "ai.onnx"
            } else {
                &node.domain
            };
            return Err(Error::UnsupportedOp {
                op: node.op_type.clone(),
                node: node.name.clone(),
                reason: format!(
                    "no implementation in tract {} (domain {domain})",
                    tract_version()
                ),
            });
        }
        for a in &node.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                check_ops(onnx, sub)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn tract_version() -> &'static str {
    "0.23.9"
}

/// Op histogram and bytes of constant parameters, as the model file declares them.
fn census(g: &pb::GraphProto) -> (BTreeMap<String, usize>, u64) {
    let mut ops = BTreeMap::new();
    for n in &g.node {
        *ops.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    let bytes = g
        .initializer
        .iter()
        .map(|t| {
            let elems: i64 = t.dims.iter().product();
            let size = match pb::tensor_proto::DataType::try_from(t.data_type) {
                Ok(
                    pb::tensor_proto::DataType::Int8
                    | pb::tensor_proto::DataType::Uint8
                    | pb::tensor_proto::DataType::Bool,
                ) => 1,
                Ok(
                    pb::tensor_proto::DataType::Float16
                    | pb::tensor_proto::DataType::Int16
                    | pb::tensor_proto::DataType::Uint16,
                ) => 2,
                Ok(
                    pb::tensor_proto::DataType::Int64
                    | pb::tensor_proto::DataType::Double
                    | pb::tensor_proto::DataType::Uint64,
                ) => 8,
                _ => 4,
            };
            elems.max(0) as u64 * size
        })
        .sum();
    (ops, bytes)
}

/// Inputs that are really graph inputs (older exporters also list initializers as inputs).
fn real_inputs(g: &pb::GraphProto) -> impl Iterator<Item = usize> + '_ {
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .enumerate()
        .filter(move |(_, i)| !inits.contains(i.name.as_str()))
        .map(|(ix, _)| ix)
}

fn dims_mut(v: &mut pb::ValueInfoProto) -> Option<&mut Vec<pb::tensor_shape_proto::Dimension>> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_mut()?.value.as_mut()?;
    t.shape.as_mut().map(|s| &mut s.dim)
}

fn dims(v: &pb::ValueInfoProto) -> Option<&[pb::tensor_shape_proto::Dimension]> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    t.shape.as_ref().map(|s| s.dim.as_slice())
}

/// The batch symbol: the `dim_param` every input shares on axis 0.
fn detect_batch(proto: &pb::ModelProto) -> Option<String> {
    let g = proto.graph.as_ref()?;
    let mut name: Option<String> = None;
    for ix in real_inputs(g) {
        let first = dims(&g.input[ix])?.first()?;
        match &first.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                if name.as_ref().is_some_and(|n| n != p) {
                    return None;
                }
                name = Some(p.clone());
            }
            _ => return None,
        }
    }
    name
}

/// Makes axis 0 of every input the symbol `name`, for models exported with a fixed batch.
fn force_batch(proto: &mut pb::ModelProto, name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(Error::InvalidOption(format!(
            "batch symbol `{name}` must be a non-empty identifier"
        )));
    }
    let g = proto.graph.as_mut().expect("checked by decode");
    let inputs: Vec<usize> = real_inputs(g).collect();
    for ix in inputs {
        let input_name = g.input[ix].name.clone();
        let d = dims_mut(&mut g.input[ix])
            .filter(|d| !d.is_empty())
            .ok_or_else(|| {
                Error::InvalidOption(format!(
                    "input `{input_name}` declares no shape to put a batch axis on"
                ))
            })?;
        d[0].value = Some(pb::tensor_shape_proto::dimension::Value::DimParam(
            name.into(),
        ));
    }
    for o in &mut g.output {
        if let Some(d) = dims_mut(o).filter(|d| !d.is_empty()) {
            d[0].value = Some(pb::tensor_shape_proto::dimension::Value::DimParam(
                name.into(),
            ));
        }
    }
    Ok(())
}

fn dtype_of(dt: DatumType) -> Option<DType> {
    Some(match dt.unquantized() {
        DatumType::F32 => DType::F32,
        DatumType::F16 => DType::F16,
        DatumType::I8 => DType::I8,
        DatumType::U8 => DType::U8,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

pub(crate) fn dim_of(d: &TDim, batch: Option<&str>) -> Dim {
    match d {
        TDim::Val(v) if *v >= 0 => Dim::Fixed(*v as usize),
        TDim::Sym(s) if Some(s.to_string().as_str()) == batch => Dim::Batch(s.to_string()),
        other => Dim::Symbol(other.to_string()),
    }
}

fn model_info(io: &Interface, batch: Option<&str>, max_batch: Option<usize>) -> Result<ModelInfo> {
    let describe = |(name, fact): &(String, TypedFact), role: &str| -> Result<TensorInfo> {
        let dtype = dtype_of(fact.datum_type).ok_or_else(|| {
            Error::Prepare(format!(
                "{role} `{name}` is {:?}, which Tern does not serve",
                fact.datum_type
            ))
        })?;
        Ok(TensorInfo {
            name: name.clone(),
            dtype,
            shape: fact.shape.iter().map(|d| dim_of(d, batch)).collect(),
        })
    };
    let inputs = io
        .inputs
        .iter()
        .map(|i| describe(i, "input"))
        .collect::<Result<Vec<_>>>()?;
    let outputs = io
        .outputs
        .iter()
        .map(|o| describe(o, "output"))
        .collect::<Result<Vec<_>>>()?;
    let batch = batch.filter(|b| {
        inputs
            .iter()
            .any(|i| i.shape.iter().any(|d| matches!(d, Dim::Batch(n) if n == b)))
    });
    Ok(ModelInfo {
        inputs,
        outputs,
        batch: batch.map(String::from),
        max_batch,
    })
}

/// The kind of heavy op (convolution or matrix product) tract's op `name` is, if it is one.
pub(crate) fn heavy_kind(name: &str) -> Option<&'static str> {
    match name {
        // Typed ops, then the imported ones they come from.
        "Conv" | "TernQConv" | "TernDwConv" | "TernPwConv" | "TernIm2colConv" | "ConvHir" => {
            Some("Conv")
        }
        "EinSum" | "MatMul" | "MatMatMul" | "OptMatMul" => Some("MatMul"),
        "MatMulInference" | "Gemm" | "QLinearMatMul" | "MatMulInteger" => Some("MatMul"),
        _ => None,
    }
}

/// What the inspection reads off a prepared graph (or each of its parts).
#[derive(Default)]
pub(crate) struct Survey {
    /// Convolutions and matrix products: name, kind, input element type, Tern's kernel.
    heavy: Vec<(String, &'static str, ExecPrecision, Option<String>)>,
    luts: usize,
    luts2: usize,
    folded: usize,
    /// Where the graph was cut to prepare it in parts.
    cuts: Vec<String>,
    /// Where a device plan's ops run.
    placement: Option<Placement>,
}

impl Survey {
    /// Classifies every convolution and matrix product by the element type it really computes
    /// in, read from tract's typed graph rather than from what the rewrite intended.
    fn of(m: &TypedModel) -> Survey {
        let mut survey = Survey::default();
        for node in m.nodes() {
            let op = node.op.name();
            match &*op {
                "TernLut" => survey.luts += 1,
                "TernLut2" => survey.luts2 += 1,
                _ => {}
            }
            if node
                .op_as::<crate::int8::QConv>()
                .is_some_and(|q| q.has_table())
            {
                survey.folded += 1;
            }
            if let Some(se) = node.op_as::<crate::excite::SqueezeExcite>() {
                for name in &se.products {
                    let kernel = Some(se.describe());
                    survey
                        .heavy
                        .push((name.clone(), "Conv", ExecPrecision::F32, kernel));
                }
                continue;
            }
            let Some(kind) = heavy_kind(&op) else {
                continue;
            };
            let Some(input) = node.inputs.first() else {
                continue;
            };
            let Ok(fact) = m.outlet_fact(*input) else {
                continue;
            };
            let precision = match fact.datum_type.unquantized() {
                DatumType::I8 | DatumType::U8 => ExecPrecision::Int8,
                DatumType::F16 => ExecPrecision::F16,
                DatumType::F32 => ExecPrecision::F32,
                _ => ExecPrecision::Other,
            };
            let kernel = match node.op_as::<crate::int8::QConv>() {
                Some(q) => Some(q.kernel().describe().to_string()),
                None => node
                    .op_as::<crate::dwconv::DwConv>()
                    .map(|d| d.describe())
                    .or_else(|| node.op_as::<crate::pwconv::PwConv>().map(|p| p.describe()))
                    .or_else(|| {
                        node.op_as::<crate::im2col::Im2colConv>()
                            .map(|p| p.describe())
                    }),
            };
            survey
                .heavy
                .push((node.name.clone(), kind, precision, kernel));
        }
        survey
    }

    fn extend(&mut self, other: Survey) {
        self.heavy.extend(other.heavy);
        self.luts += other.luts;
        self.luts2 += other.luts2;
        self.folded += other.folded;
    }
}

fn inspect(
    survey: Option<&Survey>,
    report: &qdq::Report,
    census: &(BTreeMap<String, usize>, u64),
    plan: PlanReport,
) -> Inspection {
    let mut heavy = vec![];
    let empty = Survey::default();
    let survey = survey.unwrap_or(&empty);
    for (name, kind, precision, kernel) in &survey.heavy {
        let fusion = report
            .nodes
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, o)| match o {
                qdq::Outcome::Fused(into) => format!("QDQ fused into {into}"),
                qdq::Outcome::KeptFloat(why) => format!("kept in float: {why}"),
            });
        let note = match (fusion, kernel) {
            (Some(f), Some(k)) => Some(format!("{f}, on the {k}")),
            (f, k) => f.or(k.as_ref().map(|k| format!("on the {k}"))),
        };
        heavy.push(HeavyOp {
            name: name.clone(),
            op: kind.to_string(),
            precision: *precision,
            note,
        });
    }
    // A QDQ node the rewrite skipped may have been renamed or split by tract; keep its reason.
    for (name, op, outcome) in &report.nodes {
        if let qdq::Outcome::KeptFloat(why) = outcome {
            if !heavy.iter().any(|h| &h.name == name) {
                heavy.push(HeavyOp {
                    name: name.clone(),
                    op: op.clone(),
                    precision: ExecPrecision::F32,
                    note: Some(format!("kept in float: {why}")),
                });
            }
        }
    }
    let mut rewrites = vec![];
    let folded = survey.folded;
    let (one, two) = (survey.luts + folded, survey.luts2);
    if one + two > 0 {
        rewrites.push(format!(
            "{} element-wise float islands between 8-bit tensors run as lookup tables ({one} of \
             one input, {two} of two); {folded} applied by the convolution that writes their \
             input",
            one + two
        ));
    }
    if !survey.cuts.is_empty() {
        let cuts: Vec<String> = survey.cuts.iter().map(|c| format!("`{c}`")).collect();
        rewrites.push(format!(
            "prepared in {} parts, in parallel, cut after {} (one tensor crosses each cut)",
            cuts.len() + 1,
            cuts.join(", ")
        ));
    }
    Inspection {
        op_histogram: census.0.clone(),
        parameter_bytes: census.1,
        heavy,
        plan,
        rewrites,
        device: Device::Cpu,
        device_note: None,
        placement: survey.placement.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::optim::Optimizer;

    /// A tract upgrade that renames a pass would otherwise make Tern keep it without a word.
    #[test]
    fn the_passes_tern_leaves_out_are_found_by_name() {
        assert_eq!(without_pass(&mut Optimizer::declutter(), "ChangeAxes"), 1);
        assert_eq!(
            without_pass(&mut Optimizer::codegen(), "MergeConsecutiveSameRoleAxes"),
            1
        );
        assert_eq!(without_pass(&mut Optimizer::codegen(), "NoSuchPass"), 0);
    }

    /// A plan with no backend op runs wholly on the CPU; inputs and constants are no work.
    #[test]
    fn placement_counts_the_work_by_where_it_runs() {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([2])).unwrap();
        let c = m.add_const("c", tensor1(&[1f32, 2.])).unwrap();
        let y = m
            .wire_node("add", tract_onnx::tract_core::ops::math::add(), &[x, c])
            .unwrap();
        let z = m
            .wire_node("mul", tract_onnx::tract_core::ops::math::mul(), &[y[0], c])
            .unwrap();
        m.select_output_outlets(&z).unwrap();
        let p = placement(&m);
        assert_eq!(p.on_device, 0);
        assert_eq!(p.to_string(), "0 ops on the GPU; on the CPU: 1 Add, 1 Mul");
        let all_there = Placement {
            on_device: 3,
            ..Default::default()
        };
        assert_eq!(all_there.to_string(), "3 ops on the GPU, none on the CPU");
    }
}
