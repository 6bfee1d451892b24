//! Folds `If` nodes whose condition is a constant into their live branch.
//!
//! tract analyses both branches of an `If`. Exports often guard shape-specific code with a
//! condition on an input's shape (`if x.shape[1] == 3:`); once the shapes are known the
//! condition is constant, but the dead branch may be invalid for them ("Attempt to squeeze an
//! axis which dimension is not one") and loading fails. The condition is evaluated by tract
//! itself, on the slice of the graph that computes it, so every shape op tract folds counts;
//! the live branch's nodes then replace the `If`.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::graph::{fresh_name, is_onnx_op, GraphIndex};

/// Folds every top-level `If` with a constant condition. Returns one note per fold.
pub(crate) fn fold_constant_ifs(proto: &mut pb::ModelProto) -> Vec<String> {
    let mut notes = vec![];
    let mut undecided: HashSet<String> = HashSet::new();
    loop {
        let Some(g) = proto.graph.as_ref() else {
            return notes;
        };
        let next = g.node.iter().position(|n| {
            is_onnx_op(n, "If")
                && n.input.len() == 1
                && !n.output.is_empty()
                && !undecided.contains(&n.output[0])
        });
        let Some(ix) = next else {
            return notes;
        };
        let node = &g.node[ix];
        let label = if node.name.is_empty() {
            node.output[0].clone()
        } else {
            node.name.clone()
        };
        match condition(proto, &node.input[0]) {
            Some(taken) => {
                let g = proto.graph.as_mut().expect("checked above");
                if inline(g, ix, taken) {
                    let which = if taken { "then" } else { "else" };
                    log::info!(
                        "If `{label}`: condition is constant {taken}, {which} branch inlined"
                    );
                    notes.push(format!(
                        "If `{label}` folded: condition is constant {taken}, its {which} branch runs"
                    ));
                } else {
                    undecided.insert(g.node[ix].output[0].clone());
                }
            }
            None => {
                undecided.insert(node.output[0].clone());
            }
        }
    }
}

/// The condition's value, when tract can prove it constant from the graph's declared shapes and
/// constants.
fn condition(proto: &pb::ModelProto, cond: &str) -> Option<bool> {
    let g = proto.graph.as_ref()?;
    let index = GraphIndex::new(g);
    if let Some(proto) = index.initializer(g, cond) {
        let t = tract_onnx::tensor::load_tensor(
            &tract_onnx::data_resolver::MmapDataResolver,
            proto,
            None,
        )
        .ok()?;
        return scalar_bool(&t);
    }
    // The nodes the condition depends on, in graph order.
    let mut needed: HashSet<usize> = HashSet::new();
    let mut stack = vec![cond.to_string()];
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.clone()) {
            continue;
        }
        if let Some(p) = g.node.iter().position(|n| n.output.contains(&v)) {
            if needed.insert(p) {
                stack.extend(g.node[p].input.iter().filter(|i| !i.is_empty()).cloned());
            }
        }
    }
    if needed.is_empty() {
        return None;
    }
    let reads: HashSet<&str> = needed
        .iter()
        .flat_map(|&ix| g.node[ix].input.iter().map(|s| s.as_str()))
        .collect();
    let slice = pb::GraphProto {
        name: "condition".into(),
        node: g
            .node
            .iter()
            .enumerate()
            .filter(|(ix, _)| needed.contains(ix))
            .map(|(_, n)| n.clone())
            .collect(),
        initializer: g
            .initializer
            .iter()
            .filter(|t| reads.contains(t.name.as_str()))
            .cloned()
            .collect(),
        input: g.input.clone(),
        output: vec![pb::ValueInfoProto {
            name: cond.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let model = pb::ModelProto {
        graph: Some(slice),
        ..proto.clone_without_graph()
    };
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true);
    // A condition tract cannot type (or that panics in tract) simply stays an If.
    let konst = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let typed = onnx.model_for_proto_model(&model).ok()?.into_typed().ok()?;
        let outlet = *typed.output_outlets().ok()?.first()?;
        typed.outlet_fact(outlet).ok()?.konst.clone()
    }))
    .ok()??;
    scalar_bool(&konst)
}

fn scalar_bool(t: &Tensor) -> Option<bool> {
    if t.len() != 1 {
        return None;
    }
    t.cast_to_scalar::<bool>().ok()
}

trait CloneWithoutGraph {
    fn clone_without_graph(&self) -> pb::ModelProto;
}

impl CloneWithoutGraph for pb::ModelProto {
    fn clone_without_graph(&self) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: self.ir_version,
            opset_import: self.opset_import.clone(),
            producer_name: self.producer_name.clone(),
            domain: self.domain.clone(),
            model_version: self.model_version,
            ..Default::default()
        }
    }
}

/// Replaces the `If` at `ix` by the nodes of its `taken` branch. Every value the branch
/// produces is renamed to a fresh name (branches may reuse outer names), and the branch's
/// outputs are forwarded to the `If`'s outputs through `Identity` nodes, which tract removes.
fn inline(g: &mut pb::GraphProto, ix: usize, taken: bool) -> bool {
    let node = &g.node[ix];
    let attr = if taken { "then_branch" } else { "else_branch" };
    let Some(branch) = node
        .attribute
        .iter()
        .find(|a| a.name == attr)
        .and_then(|a| a.g.clone())
    else {
        return false;
    };
    if branch.output.len() != node.output.len() || !branch.sparse_initializer.is_empty() {
        return false;
    }
    let prefix = if node.name.is_empty() {
        node.output[0].clone()
    } else {
        node.name.clone()
    };
    let outputs = node.output.clone();
    let mut renamed: HashMap<String, String> = HashMap::new();
    let produced = branch
        .node
        .iter()
        .flat_map(|n| n.output.iter())
        .chain(branch.initializer.iter().map(|t| &t.name))
        .filter(|s| !s.is_empty());
    let mut used: HashSet<String> = HashSet::new();
    for name in produced {
        let mut fresh = fresh_name(g, &format!("{prefix}/{name}"));
        let mut k = 1;
        while used.contains(&fresh) {
            fresh = fresh_name(g, &format!("{prefix}/{name}_{k}"));
            k += 1;
        }
        used.insert(fresh.clone());
        renamed.insert(name.clone(), fresh);
    }
    let rename = |s: &String| renamed.get(s).cloned().unwrap_or_else(|| s.clone());
    let mut nodes: Vec<pb::NodeProto> = branch
        .node
        .iter()
        .map(|n| {
            let mut n = n.clone();
            n.input = n.input.iter().map(rename).collect();
            n.output = n.output.iter().map(rename).collect();
            if !n.name.is_empty() {
                n.name = format!("{prefix}/{}", n.name);
            }
            for a in &mut n.attribute {
                for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                    rename_reads(sub, &renamed);
                }
            }
            n
        })
        .collect();
    for (out, value) in outputs.iter().zip(&branch.output) {
        nodes.push(pb::NodeProto {
            op_type: "Identity".into(),
            name: format!("{prefix}/{out}"),
            input: vec![rename(&value.name)],
            output: vec![out.clone()],
            ..Default::default()
        });
    }
    for t in &branch.initializer {
        let mut t = t.clone();
        t.name = rename(&t.name);
        g.initializer.push(t);
    }
    g.node.splice(ix..=ix, nodes);
    true
}

/// Renames reads of outer values inside a nested subgraph.
fn rename_reads(g: &mut pb::GraphProto, renamed: &HashMap<String, String>) {
    for n in &mut g.node {
        for i in &mut n.input {
            if let Some(r) = renamed.get(i) {
                *i = r.clone();
            }
        }
        for a in &mut n.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_reads(sub, renamed);
            }
        }
    }
    for o in &mut g.output {
        if let Some(r) = renamed.get(&o.name) {
            o.name = r.clone();
        }
    }
}
