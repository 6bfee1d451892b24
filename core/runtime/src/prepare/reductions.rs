//! Keeps quantization from turning reductions into element-wise tables.
//!
//! tract folds `DequantizeLinear → … → QuantizeLinear` into a 256-entry lookup table when every
//! op in between reports an element-wise axes mapping. Softmax and other ops that reduce over an
//! axis wrongly qualify, and every output becomes the same value (a quantized classifier drops
//! to chance). Before tract sees the model, the `QuantizeLinear → DequantizeLinear` pair that
//! follows such an op is removed: the op runs in float and its consumers read its float output.
//! The pair only simulated quantization noise, so the result moves towards the float model.

use tract_onnx::pb;

use super::graph::{is_onnx_op, GraphIndex};

/// Ops whose output element depends on more than the matching input element.
const REDUCING: &[&str] = &[
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "LayerNormalization",
    "InstanceNormalization",
    "LpNormalization",
    "MeanVarianceNormalization",
];

/// Removes the Q/DQ pair after every reducing op it can; returns the names of those ops.
pub(crate) fn protect(model: &mut pb::ModelProto) -> Vec<String> {
    let Some(g) = model.graph.as_mut() else {
        return vec![];
    };
    let index = GraphIndex::new(g);
    // (reducing node, Q node, DQ node)
    let mut rewrites = vec![];
    for (ix, n) in g.node.iter().enumerate() {
        if !REDUCING.iter().any(|op| is_onnx_op(n, op)) {
            continue;
        }
        let Some(out) = n.output.first() else {
            continue;
        };
        let Some(q) = index.sole_consumer(out) else {
            continue;
        };
        if !is_onnx_op(&g.node[q], "QuantizeLinear") {
            continue;
        }
        let Some(q_out) = g.node[q].output.first() else {
            continue;
        };
        let Some(dq) = index.sole_consumer(q_out) else {
            continue;
        };
        if is_onnx_op(&g.node[dq], "DequantizeLinear") {
            rewrites.push((ix, q, dq));
        }
    }
    let mut protected = vec![];
    let mut dead = std::collections::HashSet::new();
    for (ix, q, dq) in rewrites {
        // The reducing op takes over the DQ's output name: consumers and graph outputs follow.
        let name = g.node[dq].output[0].clone();
        g.node[ix].output[0] = name;
        dead.insert(q);
        dead.insert(dq);
        let n = &g.node[ix];
        protected.push(if n.name.is_empty() {
            n.op_type.clone()
        } else {
            n.name.clone()
        });
    }
    let mut at = 0;
    g.node.retain(|_| {
        at += 1;
        !dead.contains(&(at - 1))
    });
    if !protected.is_empty() {
        log::info!(
            "kept in float (tract would fold their Q/DQ into a lookup table): {}",
            protected.join(", ")
        );
    }
    protected
}

#[cfg(test)]
mod tests {
    use super::super::graph::testing::{model, node};
    use super::*;

    #[test]
    fn the_qdq_pair_after_a_softmax_is_removed_and_its_output_name_kept() {
        let mut m = model(
            vec![
                node("DequantizeLinear", &["xq", "s", "z"], &["x"]),
                node("Softmax", &["x"], &["p"]),
                node("QuantizeLinear", &["p", "s2", "z2"], &["pq"]),
                node("DequantizeLinear", &["pq", "s2", "z2"], &["probs"]),
            ],
            &["probs"],
        );
        assert_eq!(protect(&mut m), vec!["Softmax"]);
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["DequantizeLinear", "Softmax"]);
        assert_eq!(g.node[1].output, ["probs"]);
    }

    #[test]
    fn element_wise_ops_and_shared_outputs_are_left_alone() {
        let nodes = vec![
            node("DequantizeLinear", &["xq", "s", "z"], &["x"]),
            node("Relu", &["x"], &["r"]),
            node("QuantizeLinear", &["r", "s", "z"], &["rq"]),
            node("DequantizeLinear", &["rq", "s", "z"], &["out"]),
        ];
        let mut m = model(nodes, &["out"]);
        assert!(protect(&mut m).is_empty());
        // A Softmax whose output is also read elsewhere keeps its Q/DQ (no single chain).
        let mut m = model(
            vec![
                node("Softmax", &["x"], &["p"]),
                node("QuantizeLinear", &["p", "s", "z"], &["pq"]),
                node("DequantizeLinear", &["pq", "s", "z"], &["out"]),
                node("Identity", &["p"], &["also"]),
            ],
            &["out"],
        );
        assert!(protect(&mut m).is_empty());
    }
}
