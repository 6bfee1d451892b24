//! Translate time: everything done once per model version. Decode the ONNX protobuf, apply
//! Tern's rewrites, let tract type, declutter and optimize, and build the plan that sessions
//! run. Nothing here is on the request path.

mod graph;
mod qdq;
mod reductions;

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::transform::ModelTransform;

use crate::error::{catch, chain, Error, Result};
use crate::inspect::{ExecPrecision, HeavyOp, Inspection};
use crate::model::{ModelOptions, Precision};
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

/// Immutable, shared result of preparation. Sessions hold an `Arc` of it.
pub(crate) struct Prepared {
    pub(crate) plan: Arc<TypedSimplePlan>,
    pub(crate) info: ModelInfo,
    pub(crate) inspection: Inspection,
    /// tract's element type for each input, to build input tensors without re-deriving it.
    pub(crate) input_dts: Vec<DatumType>,
}

pub(crate) fn prepare(bytes: &[u8], options: &ModelOptions) -> Result<Prepared> {
    catch("preparing the model", || prepare_inner(bytes, options))
}

fn prepare_inner(bytes: &[u8], options: &ModelOptions) -> Result<Prepared> {
    if options.threads == 0 {
        return Err(Error::InvalidOption("threads must be at least 1".into()));
    }
    if options.max_batch == Some(0) {
        return Err(Error::InvalidOption("max_batch must be at least 1".into()));
    }
    let mut proto = decode(bytes)?;
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
    // Before any fusion: correctness does not depend on the int8 option.
    reductions::protect(&mut proto);
    let report = if options.int8_fusion {
        qdq::fuse(&mut proto)
    } else {
        qdq::Report::default()
    };

    // Declared value_info and output shapes carry a fixed batch of 1 when the batch was forced;
    // they would then fail to unify with the symbol, and tract re-derives them anyway.
    let onnx = onnx.with_ignore_value_info(forced_batch);
    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| Error::Prepare(chain(&e)))?;
    let mut typed = model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| Error::Prepare(chain(&e)))?;
    if options.precision == Precision::F16 {
        FloatPrecisionTranslator::new(DatumType::F32, DatumType::F16)
            .transform(&mut typed)
            .and_then(|_| typed.declutter())
            .map_err(|e| Error::Prepare(format!("converting to f16: {}", chain(&e))))?;
    }

    let info = model_info(&typed, batch.as_deref(), options.max_batch)?;
    let input_dts = typed
        .input_outlets()
        .and_then(|o| {
            o.iter()
                .map(|o| Ok(typed.outlet_fact(*o)?.datum_type))
                .collect()
        })
        .map_err(|e| Error::Prepare(chain(&e)))?;
    let inspection = inspect(&typed, &report, op_histogram, parameter_bytes);

    let optimized = typed
        .into_optimized()
        .map_err(|e| Error::Prepare(chain(&e)))?;
    let run_options = tract_onnx::tract_core::runtime::RunOptions {
        executor: (options.threads > 1)
            .then(|| tract_linalg::multithread::Executor::multithread(options.threads)),
        ..Default::default()
    };
    let plan = TypedSimplePlan::new_with_options(optimized, &run_options)
        .map_err(|e| Error::Prepare(chain(&e)))?;
    Ok(Prepared {
        plan,
        info,
        inspection,
        input_dts,
    })
}

fn decode(bytes: &[u8]) -> Result<pb::ModelProto> {
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

fn model_info(m: &TypedModel, batch: Option<&str>, max_batch: Option<usize>) -> Result<ModelInfo> {
    let describe = |outlet: OutletId, role: &str| -> Result<TensorInfo> {
        let fact = m
            .outlet_fact(outlet)
            .map_err(|e| Error::Prepare(chain(&e)))?;
        let name = m
            .outlet_label(outlet)
            .unwrap_or(&m.node(outlet.node).name)
            .to_string();
        let dtype = dtype_of(fact.datum_type).ok_or_else(|| {
            Error::Prepare(format!(
                "{role} `{name}` is {:?}, which Tern does not serve",
                fact.datum_type
            ))
        })?;
        Ok(TensorInfo {
            name,
            dtype,
            shape: fact.shape.iter().map(|d| dim_of(d, batch)).collect(),
        })
    };
    let inputs = m
        .input_outlets()
        .map_err(|e| Error::Prepare(chain(&e)))?
        .iter()
        .map(|o| describe(*o, "input"))
        .collect::<Result<Vec<_>>>()?;
    let outputs = m
        .output_outlets()
        .map_err(|e| Error::Prepare(chain(&e)))?
        .iter()
        .map(|o| describe(*o, "output"))
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

/// Classifies every convolution and matrix product by the element type it really computes in,
/// read from tract's typed graph rather than from what the rewrite intended.
fn inspect(
    m: &TypedModel,
    report: &qdq::Report,
    op_histogram: BTreeMap<String, usize>,
    parameter_bytes: u64,
) -> Inspection {
    let mut heavy = vec![];
    for node in m.nodes() {
        let op = node.op.name();
        let kind = match &*op {
            "Conv" => "Conv",
            "EinSum" | "MatMul" | "MatMatMul" | "OptMatMul" => "MatMul",
            _ => continue,
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
        let note = report
            .nodes
            .iter()
            .find(|(n, _, _)| n == &node.name)
            .map(|(_, _, o)| match o {
                qdq::Outcome::Fused(into) => format!("QDQ fused into {into}"),
                qdq::Outcome::KeptFloat(why) => format!("kept in float: {why}"),
            });
        heavy.push(HeavyOp {
            name: node.name.clone(),
            op: kind.to_string(),
            precision,
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
    Inspection {
        op_histogram,
        parameter_bytes,
        heavy,
    }
}
