//! 1×1 convolutions become `Einsum` (and an `Add` for the bias) before tract imports the graph.
//!
//! tract's declutter turns every ungrouped 1×1 convolution with unit strides and no padding
//! into an EinSum (`declutter_as_einsum`): it wires the kernel through three reshapes and the
//! bias through one, then takes each apart and folds it into a constant, one patch at a time.
//! About eight patches per convolution, each costing a scan of the graph: on MobileNetV3, with
//! its 40 pointwise convolutions, a third of all the patches tract applies while preparing (half
//! with its axis rewrites on, which the reshapes also feed). Written as an Einsum in the
//! protobuf, with the kernel's dims set to `[O, I]` and the bias's to `[1, O, 1, 1]` (the bytes
//! stay where they are), the graph reaches tract's optimizer in the form its declutter would
//! have given it, and tract makes the same plan.

use std::collections::HashMap;

use tract_onnx::pb::{self, attribute_proto::AttributeType, tensor_proto::DataType};

use super::graph::{attr, fresh_name, is_onnx_op, GraphIndex};

/// Writes every qualifying `Conv` as `Einsum` (+ `Add`); returns how many.
pub(crate) fn convs_as_einsum(model: &mut pb::ModelProto) -> usize {
    let Some(g) = model.graph.as_mut() else {
        return 0;
    };
    let index = GraphIndex::new(g);
    let rewrites: Vec<(usize, Rewrite)> = g
        .node
        .iter()
        .enumerate()
        .filter_map(|(ix, n)| pointwise(g, &index, ix, n).map(|r| (ix, r)))
        .collect();
    if rewrites.is_empty() {
        return 0;
    }
    // The kernel and the bias are reshaped in place: their bytes are laid out the same, only the
    // dims change. Shapes declared for them would now contradict the data.
    let mut dims = HashMap::new();
    for (ix, r) in &rewrites {
        dims.insert(g.node[*ix].input[1].clone(), r.kernel_dims.clone());
        if let Some(b) = &r.bias {
            dims.insert(b.initializer.clone(), b.dims.clone());
        }
    }
    for t in g.initializer.iter_mut() {
        if let Some(d) = dims.get(&t.name) {
            t.dims = d.clone();
        }
    }
    g.value_info.retain(|v| !dims.contains_key(&v.name));
    let count = rewrites.len();
    let mut at = rewrites.into_iter().peekable();
    let mut nodes = Vec::with_capacity(g.node.len() + count);
    for (ix, n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        match at.next_if(|(r, _)| *r == ix) {
            Some((_, r)) => nodes.extend(r.nodes(n)),
            None => nodes.push(n),
        }
    }
    g.node = nodes;
    count
}

/// How one convolution is written instead.
struct Rewrite {
    equation: String,
    /// The kernel's dims as `[O, I]`.
    kernel_dims: Vec<i64>,
    bias: Option<Bias>,
}

/// A convolution's bias, added after the product.
struct Bias {
    initializer: String,
    /// `[1, O, 1, …]`: broadcast over the product without a reshape for tract to fold.
    dims: Vec<i64>,
    /// The product's output, which the `Add` reads.
    product: String,
    /// The `Add` node's name.
    add: String,
}

impl Rewrite {
    fn nodes(self, conv: pb::NodeProto) -> Vec<pb::NodeProto> {
        let name = if conv.name.is_empty() {
            conv.output[0].clone()
        } else {
            conv.name.clone()
        };
        let equation = pb::AttributeProto {
            name: "equation".into(),
            r#type: AttributeType::String as i32,
            s: self.equation.into_bytes(),
            ..Default::default()
        };
        let mut product = pb::NodeProto {
            name,
            op_type: "Einsum".into(),
            input: vec![conv.input[1].clone(), conv.input[0].clone()],
            output: conv.output.clone(),
            attribute: vec![equation],
            ..Default::default()
        };
        match self.bias {
            Some(bias) => {
                product.output = vec![bias.product.clone()];
                let add = pb::NodeProto {
                    name: bias.add,
                    op_type: "Add".into(),
                    input: vec![bias.product, bias.initializer],
                    output: conv.output,
                    ..Default::default()
                };
                vec![product, add]
            }
            None => vec![product],
        }
    }
}

/// The rewrite of `n` when it is a convolution tract would turn into a matrix product: a float
/// kernel and bias stored in the file and read by this node alone (they get new dims), one group,
/// a 1×1… kernel, unit strides and dilations, no padding.
fn pointwise(
    g: &pb::GraphProto,
    index: &GraphIndex,
    ix: usize,
    n: &pb::NodeProto,
) -> Option<Rewrite> {
    if !is_onnx_op(n, "Conv") || !(2..=3).contains(&n.input.len()) || n.output.len() != 1 {
        return None;
    }
    let all = |name: &str, v: i64| attr(n, name).is_none_or(|a| a.ints.iter().all(|&x| x == v));
    let group = attr(n, "group").map_or(1, |a| a.i);
    if group != 1 || !all("strides", 1) || !all("dilations", 1) || !all("pads", 0) {
        return None;
    }
    if !all("kernel_shape", 1) {
        return None;
    }
    // With a 1×1 kernel and unit strides every padding mode pads nothing; anything else is not
    // ONNX and stays for tract to report.
    if let Some(a) = attr(n, "auto_pad") {
        let mode = std::str::from_utf8(&a.s).ok()?;
        if !["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER", ""].contains(&mode) {
            return None;
        }
    }
    let kernel = owned_constant(g, index, ix, &n.input[1])?;
    let float = |t: &pb::TensorProto| {
        matches!(
            DataType::try_from(t.data_type),
            Ok(DataType::Float | DataType::Float16 | DataType::Double)
        )
    };
    if !float(kernel) || kernel.dims.len() < 3 || kernel.dims[2..].iter().any(|&d| d != 1) {
        return None;
    }
    let (o, i) = (kernel.dims[0], kernel.dims[1]);
    if o < 1 || i < 1 {
        return None;
    }
    let spatial = kernel.dims.len() - 2;
    const SPATIAL: &[u8] = b"hwdabcefgjklm";
    if spatial > SPATIAL.len() {
        return None;
    }
    let letters = std::str::from_utf8(&SPATIAL[..spatial]).ok()?;
    // The kernel first: tract's matrix product takes its first operand as the one it packs
    // ahead; with the activations first (as its own rewrite wires them) it adds a patch per
    // product to swap them, for the same plan.
    let equation = format!("oi,ni{letters}->no{letters}");
    let bias_name = n.input.get(2).filter(|b| !b.is_empty());
    let bias = match bias_name {
        None => None,
        Some(b) => {
            let t = owned_constant(g, index, ix, b)?;
            if !float(t) || t.data_type != kernel.data_type || t.dims != [o] {
                return None;
            }
            let mut dims = vec![1, o];
            dims.extend(std::iter::repeat_n(1, spatial));
            let base = if n.name.is_empty() {
                &n.output[0]
            } else {
                &n.name
            };
            Some(Bias {
                initializer: b.clone(),
                dims,
                product: fresh_name(g, &format!("{}.product", n.output[0])),
                add: fresh_name(g, &format!("{base}.bias_add")),
            })
        }
    };
    Some(Rewrite {
        equation,
        kernel_dims: vec![o, i],
        bias,
    })
}

/// The initializer `name` when node `ix` alone reads it and no graph input overrides it.
fn owned_constant<'g>(
    g: &'g pb::GraphProto,
    index: &GraphIndex,
    ix: usize,
    name: &str,
) -> Option<&'g pb::TensorProto> {
    if index.sole_consumer(name) != Some(ix) || g.input.iter().any(|i| i.name == name) {
        return None;
    }
    index.initializer(g, name)
}

#[cfg(test)]
mod tests {
    use super::super::graph::testing::{model, node, value_info};
    use super::super::graph::{initializer, ints_attr};
    use super::*;
    use tract_onnx::prelude::*;

    /// Seeded values in [-1, 1): enough to tell every weight apart.
    fn weights(name: &str, dims: &[usize], seed: usize) -> pb::TensorProto {
        let len = dims.iter().product::<usize>();
        let v: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect();
        initializer(name, &Tensor::from_shape(dims, &v).unwrap()).unwrap()
    }

    fn conv(inputs: &[&str], out: &str, attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
        let mut n = node("Conv", inputs, &[out]);
        n.name = format!("{out}_node");
        n.attribute = attrs;
        n
    }

    fn graph_with(
        nodes: Vec<pb::NodeProto>,
        inits: Vec<pb::TensorProto>,
        x: &[&str],
        y: &str,
    ) -> pb::ModelProto {
        let mut m = model(nodes, &[y]);
        let g = m.graph.as_mut().unwrap();
        g.input = vec![value_info("x", x)];
        g.initializer = inits;
        m
    }

    /// Runs the model through tract, typed and optimized, on a seeded input of `shape`.
    fn run(m: &pb::ModelProto, shape: &[usize]) -> Tensor {
        let len = shape.iter().product::<usize>();
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let plan = tract_onnx::onnx()
            .model_for_proto_model(m)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let out = plan
            .run(tvec!(Tensor::from_shape(shape, &x).unwrap().into()))
            .unwrap();
        out[0].clone().into_tensor()
    }

    /// Same shape, same values up to summation order.
    fn assert_same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.shape(), b.shape());
        let f32s = |t: &Tensor| {
            t.try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec()
        };
        let (a, b) = (f32s(a), f32s(b));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "max abs diff {diff}");
        assert!(a.iter().any(|&x| x != 0.0));
    }

    fn ops(m: &pb::ModelProto) -> Vec<String> {
        m.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| {
                format!(
                    "{}({})->{}",
                    n.op_type,
                    n.input.join(","),
                    n.output.join(",")
                )
            })
            .collect()
    }

    fn dims(m: &pb::ModelProto, name: &str) -> Vec<i64> {
        let g = m.graph.as_ref().unwrap();
        g.initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .dims
            .clone()
    }

    #[test]
    fn pointwise_convs_become_products_that_compute_the_same() {
        let nodes = vec![
            conv(&["x", "w1", "b1"], "h", vec![ints_attr("pads", vec![0; 4])]),
            conv(
                &["h", "w2"],
                "y",
                vec![ints_attr("kernel_shape", vec![1, 1])],
            ),
        ];
        let inits = vec![
            weights("w1", &[6, 3, 1, 1], 1),
            weights("b1", &[6], 2),
            weights("w2", &[4, 6, 1, 1], 3),
        ];
        let original = graph_with(nodes, inits, &["N", "3", "5", "4"], "y");
        let mut m = original.clone();
        m.graph.as_mut().unwrap().value_info = vec![value_info("w1", &["6", "3", "1", "1"])];
        assert_eq!(convs_as_einsum(&mut m), 2);
        assert_eq!(
            ops(&m),
            [
                "Einsum(w1,x)->h.product",
                "Add(h.product,b1)->h",
                "Einsum(w2,h)->y"
            ]
        );
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node[0].name, "h_node");
        assert_eq!(g.node[1].name, "h_node.bias_add");
        assert_eq!(attr(&g.node[0], "equation").unwrap().s, b"oi,nihw->nohw");
        assert_eq!(dims(&m, "w1"), [6, 3]);
        assert_eq!(dims(&m, "b1"), [1, 6, 1, 1]);
        assert_eq!(dims(&m, "w2"), [4, 6]);
        // The kernel's declared shape would contradict its new dims.
        assert!(g.value_info.is_empty());
        for shape in [[1, 3, 5, 4], [2, 3, 5, 4]] {
            assert_same(&run(&original, &shape), &run(&m, &shape));
        }
    }

    #[test]
    fn one_dimensional_pointwise_convs_too() {
        let nodes = vec![conv(&["x", "w", "b"], "y", vec![])];
        let inits = vec![weights("w", &[5, 3, 1], 4), weights("b", &[5], 5)];
        let original = graph_with(nodes, inits, &["2", "3", "7"], "y");
        let mut m = original.clone();
        assert_eq!(convs_as_einsum(&mut m), 1);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(attr(&g.node[0], "equation").unwrap().s, b"oi,nih->noh");
        assert_eq!(dims(&m, "b"), [1, 5, 1]);
        assert_same(&run(&original, &[2, 3, 7]), &run(&m, &[2, 3, 7]));
    }

    #[test]
    fn convs_that_are_not_plain_products_are_left_alone() {
        let cases: Vec<(&str, Vec<pb::NodeProto>, Vec<pb::TensorProto>)> = vec![
            (
                "3×3 kernel",
                vec![conv(&["x", "w"], "y", vec![])],
                vec![weights("w", &[4, 4, 3, 3], 1)],
            ),
            (
                "stride 2",
                vec![conv(
                    &["x", "w"],
                    "y",
                    vec![ints_attr("strides", vec![2, 2])],
                )],
                vec![weights("w", &[4, 4, 1, 1], 1)],
            ),
            (
                "two groups",
                vec![conv(
                    &["x", "w"],
                    "y",
                    vec![pb::AttributeProto {
                        name: "group".into(),
                        r#type: AttributeType::Int as i32,
                        i: 2,
                        ..Default::default()
                    }],
                )],
                vec![weights("w", &[4, 2, 1, 1], 1)],
            ),
            (
                "padding",
                vec![conv(&["x", "w"], "y", vec![ints_attr("pads", vec![1; 4])])],
                vec![weights("w", &[4, 4, 1, 1], 1)],
            ),
            (
                "dilation",
                vec![conv(
                    &["x", "w"],
                    "y",
                    vec![ints_attr("dilations", vec![2, 2])],
                )],
                vec![weights("w", &[4, 4, 1, 1], 1)],
            ),
            (
                "a kernel two nodes read",
                vec![
                    conv(&["x", "w"], "h", vec![]),
                    conv(&["h", "w"], "y", vec![]),
                ],
                vec![weights("w", &[4, 4, 1, 1], 1)],
            ),
            (
                "a kernel computed in the graph",
                vec![
                    node("Relu", &["w0"], &["w"]),
                    conv(&["x", "w"], "y", vec![]),
                ],
                vec![weights("w0", &[4, 4, 1, 1], 1)],
            ),
            (
                "a bias of another shape",
                vec![conv(&["x", "w", "b"], "y", vec![])],
                vec![weights("w", &[4, 4, 1, 1], 1), weights("b", &[1], 2)],
            ),
        ];
        for (why, nodes, inits) in cases {
            let mut m = graph_with(nodes, inits, &["1", "4", "6", "6"], "y");
            let before = m.clone();
            assert_eq!(convs_as_einsum(&mut m), 0, "{why}");
            assert_eq!(m, before, "{why}");
        }
        // An integer kernel, and a kernel a graph input can override.
        let int8 = initializer("w", &tensor4(&[[[[1i8]], [[2]]], [[[3]], [[4]]]])).unwrap();
        let mut m = graph_with(
            vec![conv(&["x", "w"], "y", vec![])],
            vec![int8],
            &["1", "2", "3", "3"],
            "y",
        );
        assert_eq!(convs_as_einsum(&mut m), 0, "int8 kernel");
        let mut m = graph_with(
            vec![conv(&["x", "w"], "y", vec![])],
            vec![weights("w", &[4, 4, 1, 1], 1)],
            &["1", "4", "6", "6"],
            "y",
        );
        m.graph
            .as_mut()
            .unwrap()
            .input
            .push(value_info("w", &["4", "4", "1", "1"]));
        assert_eq!(convs_as_einsum(&mut m), 0, "kernel overridable by an input");
    }
}
