//! `x · HardSigmoid(x)` becomes one `HardSwish(x)`.
//!
//! Exports at opsets below 14 (and many at 14+) write MobileNetV3's h-swish as a HardSigmoid
//! and a Mul. tract expands HardSigmoid into four ops (Mul, Add, Min, Max), so each h-swish is
//! five nodes that its declutter, codegen and fusion passes then rewrite one patch at a time:
//! on MobileNetV3 a quarter of the patches tract applies while preparing. tract-core has
//! HardSwish as one element-wise op with a vectorised kernel; onnxruntime makes the same fusion.

use tract_onnx::pb;

use super::graph::{attr_float, is_onnx_op, GraphIndex};

/// Fuses every `Mul(x, HardSigmoid(x))` whose HardSigmoid is h-swish's (alpha 1/6, beta 1/2)
/// and read by nothing else; returns how many.
pub(crate) fn fuse_hard_swish(model: &mut pb::ModelProto) -> usize {
    let Some(g) = model.graph.as_mut() else {
        return 0;
    };
    let index = GraphIndex::new(g);
    // (mul node, hard sigmoid node, x)
    let mut fusions = vec![];
    for (ix, n) in g.node.iter().enumerate() {
        if !is_onnx_op(n, "Mul") || n.input.len() != 2 || n.output.len() != 1 {
            continue;
        }
        for (gate, x) in [(&n.input[0], &n.input[1]), (&n.input[1], &n.input[0])] {
            let Some(h) = index.sole_consumer(gate).and(index.producer_ix(gate)) else {
                continue;
            };
            let hs = &g.node[h];
            // Between 8-bit tensors the pair becomes one lookup table anyway (`int8::lut`),
            // built from these very ops: left as the file has it.
            let dequantized = index
                .producer(g, x)
                .is_some_and(|p| is_onnx_op(p, "DequantizeLinear"));
            if is_onnx_op(hs, "HardSigmoid")
                && !dequantized
                && hs.input.first() == Some(x)
                && hs.output.len() == 1
                && is_h_swish(hs)
            {
                fusions.push((ix, h, x.clone()));
                break;
            }
        }
    }
    let mut dead = std::collections::HashSet::new();
    for (mul, h, x) in &fusions {
        let n = &mut g.node[*mul];
        n.op_type = "HardSwish".into();
        n.domain = String::new();
        n.input = vec![x.clone()];
        n.attribute.clear();
        dead.insert(*h);
    }
    let mut at = 0;
    g.node.retain(|_| {
        at += 1;
        !dead.contains(&(at - 1))
    });
    fusions.len()
}

/// HardSigmoid's defaults are alpha 0.2, beta 0.5; h-swish's gate is relu6(x + 3) / 6.
fn is_h_swish(n: &pb::NodeProto) -> bool {
    let alpha = attr_float(n, "alpha").unwrap_or(0.2);
    let beta = attr_float(n, "beta").unwrap_or(0.5);
    (alpha - 1.0 / 6.0).abs() < 1e-6 && (beta - 0.5).abs() < 1e-6
}

#[cfg(test)]
mod tests {
    use super::super::graph::testing::{model, node};
    use super::*;
    use tract_onnx::pb::attribute_proto::AttributeType;

    fn hard_sigmoid(x: &str, out: &str, alpha: f32) -> pb::NodeProto {
        let mut n = node("HardSigmoid", &[x], &[out]);
        n.attribute = vec![pb::AttributeProto {
            name: "alpha".into(),
            r#type: AttributeType::Float as i32,
            f: alpha,
            ..Default::default()
        }];
        n
    }

    fn ops(m: &pb::ModelProto) -> Vec<String> {
        let g = m.graph.as_ref().unwrap();
        g.node
            .iter()
            .map(|n| format!("{}({})", n.op_type, n.input.join(",")))
            .collect()
    }

    #[test]
    fn h_swish_in_either_operand_order_becomes_one_op() {
        let mut m = model(
            vec![
                node("Conv", &["i", "w"], &["x"]),
                hard_sigmoid("x", "g", 1.0 / 6.0),
                node("Mul", &["x", "g"], &["y"]),
                hard_sigmoid("y", "g2", 0.16666667),
                node("Mul", &["g2", "y"], &["z"]),
            ],
            &["z"],
        );
        assert_eq!(fuse_hard_swish(&mut m), 2);
        assert_eq!(ops(&m), ["Conv(i,w)", "HardSwish(x)", "HardSwish(y)"]);
        assert_eq!(m.graph.unwrap().node[2].output, ["z"]);
    }

    #[test]
    fn other_gates_shared_gates_and_int8_islands_are_left_alone() {
        // Default alpha (0.2) is not h-swish; an SE gate multiplies another tensor.
        let nodes = vec![
            hard_sigmoid("x", "g", 0.2),
            node("Mul", &["x", "g"], &["y"]),
            hard_sigmoid("s", "gate", 1.0 / 6.0),
            node("Mul", &["x", "gate"], &["z"]),
        ];
        let mut m = model(nodes, &["y", "z"]);
        assert_eq!(fuse_hard_swish(&mut m), 0);
        // A gate also read elsewhere, or itself a graph output, stays.
        let shared = vec![
            hard_sigmoid("x", "g", 1.0 / 6.0),
            node("Mul", &["x", "g"], &["y"]),
            node("Relu", &["g"], &["r"]),
        ];
        let mut m = model(shared, &["y", "r"]);
        assert_eq!(fuse_hard_swish(&mut m), 0);
        let output = vec![
            hard_sigmoid("x", "g", 1.0 / 6.0),
            node("Mul", &["x", "g"], &["y"]),
        ];
        let mut m = model(output, &["y", "g"]);
        assert_eq!(fuse_hard_swish(&mut m), 0);
        let island = vec![
            node("DequantizeLinear", &["xq", "s", "z"], &["x"]),
            hard_sigmoid("x", "g", 1.0 / 6.0),
            node("Mul", &["x", "g"], &["y"]),
        ];
        let mut m = model(island, &["y"]);
        assert_eq!(fuse_hard_swish(&mut m), 0);
    }
}
