//! Small helpers over the ONNX protobuf graph, shared by the translate-time rewrites.
//!
//! The rewrites work on the protobuf, before tract sees the model: it keeps them independent of
//! tract's internal graph API and lets tract's own loader type-check whatever we produce.

use std::collections::HashMap;

use tract_onnx::pb::{self, attribute_proto::AttributeType, tensor_proto::DataType};
use tract_onnx::prelude::{DatumType, Tensor};

/// Read-only index of a graph: who produces and who consumes each value.
pub(crate) struct GraphIndex {
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
    initializer: HashMap<String, usize>,
    outputs: Vec<String>,
}

impl GraphIndex {
    pub(crate) fn new(g: &pb::GraphProto) -> GraphIndex {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (ix, n) in g.node.iter().enumerate() {
            for o in &n.output {
                if !o.is_empty() {
                    producer.insert(o.clone(), ix);
                }
            }
            for i in &n.input {
                if !i.is_empty() {
                    consumers.entry(i.clone()).or_default().push(ix);
                }
            }
            // Values read from inside a subgraph (If/Loop bodies) count as used by the node that
            // holds the subgraph, so no rewrite removes or fuses them away.
            let mut implicit = Vec::new();
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    subgraph_reads(sub, &mut implicit);
                }
            }
            for name in implicit {
                consumers.entry(name).or_default().push(ix);
            }
        }
        let initializer = g
            .initializer
            .iter()
            .enumerate()
            .map(|(ix, t)| (t.name.clone(), ix))
            .collect();
        let outputs = g.output.iter().map(|o| o.name.clone()).collect();
        GraphIndex {
            producer,
            consumers,
            initializer,
            outputs,
        }
    }

    pub(crate) fn producer<'g>(
        &self,
        g: &'g pb::GraphProto,
        value: &str,
    ) -> Option<&'g pb::NodeProto> {
        self.producer.get(value).map(|&ix| &g.node[ix])
    }

    /// Position in the graph's node list of the node producing `value`.
    pub(crate) fn producer_ix(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    pub(crate) fn consumers(&self, value: &str) -> &[usize] {
        self.consumers
            .get(value)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    pub(crate) fn is_graph_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o == value)
    }

    /// The value's only consumer, if it has exactly one and is not also a graph output.
    pub(crate) fn sole_consumer(&self, value: &str) -> Option<usize> {
        match self.consumers(value) {
            [one] if !self.is_graph_output(value) => Some(*one),
            _ => None,
        }
    }

    pub(crate) fn initializer<'g>(
        &self,
        g: &'g pb::GraphProto,
        name: &str,
    ) -> Option<&'g pb::TensorProto> {
        self.initializer.get(name).map(|&ix| &g.initializer[ix])
    }

    /// An initializer decoded into a tract tensor; `None` when the name is not a constant or the
    /// tensor cannot be decoded (the rewrite then leaves the pattern alone).
    pub(crate) fn constant(&self, g: &pb::GraphProto, name: &str) -> Option<Tensor> {
        let proto = self.initializer(g, name)?;
        if proto.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
            return None;
        }
        let dt = DataType::try_from(proto.data_type).ok()?;
        if !matches!(
            dt,
            DataType::Float | DataType::Uint8 | DataType::Int8 | DataType::Int32 | DataType::Int64
        ) {
            return None;
        }
        tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, proto, None)
            .ok()
    }
}

fn subgraph_reads(g: &pb::GraphProto, into: &mut Vec<String>) {
    for n in &g.node {
        into.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                subgraph_reads(sub, into);
            }
        }
    }
}

pub(crate) fn attr<'n>(node: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub(crate) fn attr_int(node: &pb::NodeProto, name: &str) -> Option<i64> {
    attr(node, name).map(|a| a.i)
}

pub(crate) fn attr_float(node: &pb::NodeProto, name: &str) -> Option<f32> {
    attr(node, name).map(|a| a.f)
}

pub(crate) fn ints_attr(name: &str, values: Vec<i64>) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values,
        ..Default::default()
    }
}

/// True for ops of the default ONNX domain (`""` or `ai.onnx`).
pub(crate) fn is_onnx_op(node: &pb::NodeProto, op: &str) -> bool {
    node.op_type == op && (node.domain.is_empty() || node.domain == "ai.onnx")
}

/// The opset of the default domain the model was exported with.
pub(crate) fn opset(model: &pb::ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

/// Encodes a tract tensor as an ONNX initializer (raw little-endian data).
pub(crate) fn initializer(name: &str, t: &Tensor) -> Option<pb::TensorProto> {
    let data_type = match t.datum_type().unquantized() {
        DatumType::F32 => DataType::Float,
        DatumType::U8 => DataType::Uint8,
        DatumType::I8 => DataType::Int8,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        _ => return None,
    };
    let raw_data = if cfg!(target_endian = "little") {
        // SAFETY-free path: the plain storage bytes are the little-endian element bytes.
        t.as_bytes().to_vec()
    } else {
        return None;
    };
    Some(pb::TensorProto {
        name: name.into(),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    })
}

/// A name not used by any value or initializer of the graph.
pub(crate) fn fresh_name(g: &pb::GraphProto, base: &str) -> String {
    let taken = |n: &str| {
        g.initializer.iter().any(|t| t.name == n)
            || g.node
                .iter()
                .any(|node| node.output.iter().any(|o| o == n) || node.name == n)
            || g.input.iter().any(|i| i.name == n)
    };
    if !taken(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !taken(n))
        .expect("unbounded range")
}

/// Removes nodes whose every output is unused (and not a graph output), repeatedly, and then
/// initializers nobody reads. Keeps the graph tidy after fusions consumed the Q/DQ nodes.
pub(crate) fn prune_dead(g: &mut pb::GraphProto) {
    loop {
        let index = GraphIndex::new(g);
        let before = g.node.len();
        g.node.retain(|n| {
            n.output.iter().any(|o| {
                !o.is_empty() && (!index.consumers(o).is_empty() || index.is_graph_output(o))
            })
        });
        if g.node.len() == before {
            break;
        }
    }
    let mut reads = Vec::new();
    for n in &g.node {
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                subgraph_reads(sub, &mut reads);
            }
        }
    }
    let used: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .chain(reads.iter().map(|s| s.as_str()))
        .collect();
    let outputs: std::collections::HashSet<String> =
        g.output.iter().map(|o| o.name.clone()).collect();
    g.initializer
        .retain(|t| used.contains(t.name.as_str()) || outputs.contains(&t.name));
}

/// Graph builders for the rewrites' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use tract_onnx::pb;

    pub(crate) fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A model of `nodes` whose graph outputs are `outputs`.
    pub(crate) fn model(nodes: Vec<pb::NodeProto>, outputs: &[&str]) -> pb::ModelProto {
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: nodes,
                output: outputs
                    .iter()
                    .map(|o| pb::ValueInfoProto {
                        name: o.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A float tensor's declaration; a dim that is not a number is a symbol.
    pub(crate) fn value_info(name: &str, dims: &[&str]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d.parse::<i64>() {
                    Ok(v) => Value::DimValue(v),
                    Err(_) => Value::DimParam(d.to_string()),
                }),
                ..Default::default()
            })
            .collect();
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
