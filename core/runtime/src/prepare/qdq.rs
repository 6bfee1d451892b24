//! QDQ fusion: `DequantizeLinear → Conv/Gemm/MatMul (→ Relu/Clip) → QuantizeLinear` becomes the
//! QOperator form (`QLinearConv` / `QLinearMatMul`) that tract lowers to int8 kernels with i32
//! accumulation and fused requantization.
//!
//! tract 0.23 leaves QDQ graphs in f32 (the DQ/Q pairs are not fused), so a model quantized with
//! onnxruntime's default QDQ format would pay the quantization noise and get no speed. The
//! rewrite is done on the ONNX protobuf so that tract's own loader checks what we emit. Whatever
//! does not match exactly stays as it was, in float, and the reason is recorded for `inspect`.

use tract_onnx::pb;
use tract_onnx::prelude::{DatumType, Tensor};

use super::graph::{self, GraphIndex};

/// What the rewrite did to one heavy node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Fused into the named QOperator op.
    Fused(&'static str),
    /// Had quantized neighbours but stayed in float, for the given reason.
    KeptFloat(String),
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// (node name, original op, outcome), in graph order.
    pub(crate) nodes: Vec<(String, String, Outcome)>,
}

struct Replacement {
    at: usize,
    remove: Vec<usize>,
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

impl Replacement {
    /// Replaces the heavy node at `at` and the nodes its fusion absorbed.
    fn new(
        at: usize,
        absorbed: Vec<usize>,
        nodes: Vec<pb::NodeProto>,
        initializers: Vec<pb::TensorProto>,
    ) -> Replacement {
        let mut remove = vec![at];
        remove.extend(absorbed);
        Replacement {
            at,
            remove,
            nodes,
            initializers,
        }
    }
}

/// Fuses every matching pattern of the main graph in place.
pub(crate) fn fuse(model: &mut pb::ModelProto) -> Report {
    let opset = graph::opset(model);
    let Some(g) = model.graph.as_mut() else {
        return Report::default();
    };
    let index = GraphIndex::new(g);
    let mut report = Report::default();
    let mut replacements = Vec::new();
    let mut claimed = std::collections::HashSet::new();
    for (ix, node) in g.node.iter().enumerate() {
        let kind = match node.op_type.as_str() {
            "Conv" | "Gemm" | "MatMul" if graph::is_onnx_op(node, &node.op_type) => {
                node.op_type.clone()
            }
            _ => continue,
        };
        let has_dq_input = node.input.iter().any(|i| {
            index
                .producer(g, i)
                .is_some_and(|p| graph::is_onnx_op(p, "DequantizeLinear"))
        });
        if !has_dq_input {
            continue;
        }
        let name = if node.name.is_empty() {
            format!("{kind}#{ix}")
        } else {
            node.name.clone()
        };
        let m = Matcher {
            g,
            index: &index,
            opset,
        };
        let outcome = match m.match_heavy(ix) {
            Ok(r) if r.remove.iter().all(|i| !claimed.contains(i)) => {
                claimed.extend(r.remove.iter().copied());
                let op = if r.nodes.iter().any(|n| n.op_type == "QLinearConv") {
                    "QLinearConv"
                } else {
                    "QLinearMatMul"
                };
                replacements.push(r);
                Outcome::Fused(op)
            }
            Ok(_) => {
                Outcome::KeptFloat("its output quantizer is shared with another fusion".into())
            }
            Err(reason) => Outcome::KeptFloat(reason),
        };
        report.nodes.push((name, kind, outcome));
    }
    apply(g, replacements);
    report
}

fn apply(g: &mut pb::GraphProto, mut replacements: Vec<Replacement>) {
    if replacements.is_empty() {
        return;
    }
    replacements.sort_by_key(|r| r.at);
    let removed: std::collections::HashSet<usize> = replacements
        .iter()
        .flat_map(|r| r.remove.iter().copied())
        .collect();
    let mut by_position: std::collections::HashMap<usize, Vec<pb::NodeProto>> = Default::default();
    for r in replacements {
        g.initializer.extend(r.initializers);
        by_position.entry(r.at).or_default().extend(r.nodes);
    }
    let old = std::mem::take(&mut g.node);
    for (ix, node) in old.into_iter().enumerate() {
        // New nodes go where the heavy node was: their inputs are all produced earlier and their
        // output's consumers all come after the quantizer they replace.
        if let Some(new) = by_position.remove(&ix) {
            g.node.extend(new);
        }
        if !removed.contains(&ix) {
            g.node.push(node);
        }
    }
    graph::prune_dead(g);
}

/// Quantization parameters of one value: names in the graph plus their decoded constants.
struct Quant {
    value: String,
    scale: String,
    scale_v: Vec<f32>,
    zero_point: Option<String>,
    zp_v: Vec<i32>,
    zp_dt: DatumType,
}

/// Where a heavy node's result ends up once quantized.
struct QuantizedOutput {
    /// Activation and QuantizeLinear nodes the fusion absorbs.
    consumed: Vec<usize>,
    quant: Quant,
    /// The quantizer's output: the fused op's output name.
    name: String,
    /// Bounds of an activation narrower than the 8-bit range, in the quantized domain.
    clamp: Option<(i32, i32)>,
}

struct Matcher<'a> {
    g: &'a pb::GraphProto,
    index: &'a GraphIndex,
    opset: i64,
}

type Match<T> = Result<T, String>;

fn f32s(t: &Tensor) -> Option<Vec<f32>> {
    Some(
        t.cast_to::<f32>()
            .ok()?
            .try_as_plain_ram()
            .ok()?
            .as_slice::<f32>()
            .ok()?
            .to_vec(),
    )
}

fn i32s(t: &Tensor) -> Option<Vec<i32>> {
    Some(
        t.cast_to::<i32>()
            .ok()?
            .try_as_plain_ram()
            .ok()?
            .as_slice::<i32>()
            .ok()?
            .to_vec(),
    )
}

fn q_range(dt: DatumType) -> (i32, i32) {
    if dt == DatumType::I8 {
        (-128, 127)
    } else {
        (0, 255)
    }
}

impl Matcher<'_> {
    fn node(&self, ix: usize) -> &pb::NodeProto {
        &self.g.node[ix]
    }

    /// The DequantizeLinear feeding `value`, with constant scale and zero point.
    fn dequantized(&self, value: &str, what: &str) -> Match<Quant> {
        let dq = self
            .index
            .producer(self.g, value)
            .filter(|p| graph::is_onnx_op(p, "DequantizeLinear"))
            .ok_or_else(|| format!("{what} is not dequantized (no DequantizeLinear)"))?;
        if graph::attr_int(dq, "block_size").unwrap_or(0) != 0 {
            return Err(format!("{what} uses blocked quantization"));
        }
        let scale = dq.input.get(1).cloned().unwrap_or_default();
        let scale_t = self
            .index
            .constant(self.g, &scale)
            .ok_or_else(|| format!("{what}'s scale is not a constant"))?;
        let scale_v = f32s(&scale_t).ok_or_else(|| format!("{what}'s scale is not f32"))?;
        if scale_v.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(format!("{what}'s scale is not positive and finite"));
        }
        let zero_point = dq.input.get(2).filter(|s| !s.is_empty()).cloned();
        let (zp_v, zp_dt) = match &zero_point {
            Some(zp) => {
                let t = self
                    .index
                    .constant(self.g, zp)
                    .ok_or_else(|| format!("{what}'s zero point is not a constant"))?;
                let dt = t.datum_type().unquantized();
                if !matches!(dt, DatumType::U8 | DatumType::I8 | DatumType::I32) {
                    return Err(format!("{what} is quantized to {dt:?}, not 8-bit"));
                }
                (
                    i32s(&t).ok_or_else(|| format!("{what}'s zero point is unreadable"))?,
                    dt,
                )
            }
            // Without a zero point the type is the quantized value's, known only for constants.
            None => match self.index.constant(self.g, &dq.input[0]) {
                Some(t) => (vec![0; scale_v.len()], t.datum_type().unquantized()),
                None => return Err(format!("{what} has no zero point")),
            },
        };
        if zp_v.len() != scale_v.len() {
            return Err(format!("{what}'s scale and zero point differ in length"));
        }
        Ok(Quant {
            value: dq.input[0].clone(),
            scale,
            scale_v,
            zero_point,
            zp_v,
            zp_dt,
        })
    }

    fn dq_axis(&self, value: &str) -> i64 {
        self.index
            .producer(self.g, value)
            .and_then(|p| graph::attr_int(p, "axis"))
            .unwrap_or(1)
    }

    /// Follows the heavy node's output through an optional Relu/Clip to its QuantizeLinear.
    fn quantized_output(&self, heavy: usize) -> Match<QuantizedOutput> {
        let y = &self.node(heavy).output[0];
        let next = self
            .index
            .sole_consumer(y)
            .ok_or("its output has several consumers or is a graph output")?;
        let mut consumed = vec![];
        let mut bounds = (f32::NEG_INFINITY, f32::INFINITY);
        let q_ix = if graph::is_onnx_op(self.node(next), "Relu") {
            bounds.0 = 0.0;
            consumed.push(next);
            self.index
                .sole_consumer(&self.node(next).output[0])
                .ok_or("the activation's output has several consumers")?
        } else if graph::is_onnx_op(self.node(next), "Clip") {
            let clip = self.node(next);
            if self.opset < 11 {
                bounds = (
                    graph::attr_float(clip, "min").unwrap_or(f32::NEG_INFINITY),
                    graph::attr_float(clip, "max").unwrap_or(f32::INFINITY),
                );
            } else {
                let bound = |i: usize| -> Match<Option<f32>> {
                    match clip.input.get(i).filter(|s| !s.is_empty()) {
                        None => Ok(None),
                        Some(name) => {
                            let t = self
                                .index
                                .constant(self.g, name)
                                .ok_or("Clip bounds are not constants")?;
                            Ok(f32s(&t).and_then(|v| v.first().copied()))
                        }
                    }
                };
                bounds = (
                    bound(1)?.unwrap_or(f32::NEG_INFINITY),
                    bound(2)?.unwrap_or(f32::INFINITY),
                );
            }
            consumed.push(next);
            self.index
                .sole_consumer(&clip.output[0])
                .ok_or("the activation's output has several consumers")?
        } else {
            next
        };
        let q = self.node(q_ix);
        if !graph::is_onnx_op(q, "QuantizeLinear") {
            return Err(format!(
                "its output feeds {} instead of QuantizeLinear",
                q.op_type
            ));
        }
        if graph::attr(q, "output_dtype").is_some()
            || graph::attr_int(q, "block_size").unwrap_or(0) != 0
        {
            return Err("the output quantizer uses opset-21 options".into());
        }
        consumed.push(q_ix);
        let scale = q.input.get(1).cloned().unwrap_or_default();
        let scale_v = self
            .index
            .constant(self.g, &scale)
            .and_then(|t| f32s(&t))
            .ok_or("the output scale is not a constant")?;
        let zero_point = q.input.get(2).filter(|s| !s.is_empty()).cloned();
        let (zp_v, zp_dt) = match &zero_point {
            Some(zp) => {
                let t = self
                    .index
                    .constant(self.g, zp)
                    .ok_or("the output zero point is not a constant")?;
                let dt = t.datum_type().unquantized();
                if !matches!(dt, DatumType::U8 | DatumType::I8) {
                    return Err(format!("the output is quantized to {dt:?}, not 8-bit"));
                }
                (i32s(&t).ok_or("unreadable output zero point")?, dt)
            }
            None => (vec![0], DatumType::U8),
        };
        if scale_v.len() != 1 || zp_v.len() != 1 || !(scale_v[0].is_finite() && scale_v[0] > 0.0) {
            return Err("the output quantization is not per-tensor".into());
        }
        let (qmin, qmax) = q_range(zp_dt);
        let quantize = |v: f32| -> i64 {
            if v.is_infinite() {
                return if v > 0.0 { i64::MAX } else { i64::MIN };
            }
            (v / scale_v[0]).round_ties_even() as i64 + zp_v[0] as i64
        };
        let (lo, hi) = (quantize(bounds.0), quantize(bounds.1));
        // Saturation to the 8-bit range already clamps; only a narrower activation needs ops.
        let clamp = if lo <= qmin as i64 && hi >= qmax as i64 {
            None
        } else {
            Some((
                lo.clamp(qmin as i64, qmax as i64) as i32,
                hi.clamp(qmin as i64, qmax as i64) as i32,
            ))
        };
        let out = Quant {
            value: String::new(),
            scale,
            scale_v,
            zero_point,
            zp_v,
            zp_dt,
        };
        Ok(QuantizedOutput {
            consumed,
            quant: out,
            name: q.output[0].clone(),
            clamp,
        })
    }

    fn match_heavy(&self, ix: usize) -> Match<Replacement> {
        let node = self.node(ix);
        match node.op_type.as_str() {
            "Conv" => self.match_conv(ix),
            "Gemm" => self.match_gemm(ix),
            _ => self.match_matmul(ix),
        }
    }

    fn activation_input(&self, node: &pb::NodeProto) -> Match<Quant> {
        let x = self.dequantized(&node.input[0], "the input")?;
        if x.scale_v.len() != 1 {
            return Err("the input is quantized per-channel".into());
        }
        if x.zp_dt == DatumType::I32 {
            return Err("the input is quantized to i32".into());
        }
        Ok(x)
    }

    /// Weight constant, its quant params, checked per-tensor or per-`channel_axis`.
    /// The constant 8-bit weight behind `value`, its quantization, and its output-channel count.
    /// `channel_axis` picks the output-channel axis from the weight's shape (or rejects the
    /// shape); per-channel scales must run along that axis.
    fn weight(
        &self,
        value: &str,
        channel_axis: impl Fn(&[usize]) -> Match<usize>,
    ) -> Match<(Tensor, Quant, usize)> {
        let w = self.dequantized(value, "the weight")?;
        let wq = self
            .index
            .constant(self.g, &w.value)
            .ok_or("the weight is not a constant")?;
        if !matches!(wq.datum_type().unquantized(), DatumType::I8 | DatumType::U8) {
            return Err("the weight is not 8-bit".into());
        }
        let channel_axis = channel_axis(wq.shape())?;
        let channels = wq.shape()[channel_axis];
        let rank = wq.rank();
        if w.scale_v.len() > 1 {
            let axis = self.dq_axis(value);
            let axis = if axis < 0 { axis + rank as i64 } else { axis };
            if axis != channel_axis as i64 {
                return Err(format!(
                    "the weight is quantized along axis {axis}, not the output channels"
                ));
            }
            if w.scale_v.len() != channels {
                return Err("the weight's per-channel scale does not match its channels".into());
            }
        }
        // tract's int8 kernels take weight zero points, but symmetric weights are what every
        // quantizer emits; an asymmetric per-channel weight is left in float rather than trusted.
        if w.zp_v.iter().any(|&z| z != 0) && w.zp_v.len() > 1 {
            return Err("the weight has non-zero per-channel zero points".into());
        }
        Ok((wq, w, channels))
    }

    /// The bias as i32 in the accumulator's scale (x_scale × w_scale), from either an int32
    /// DequantizeLinear or a float constant.
    fn bias_i32(&self, value: &str, x: &Quant, w: &Quant, channels: usize) -> Match<Tensor> {
        let acc_scale =
            |c: usize| x.scale_v[0] * w.scale_v[if w.scale_v.len() == 1 { 0 } else { c }];
        let broadcast = |v: Vec<f32>| -> Match<Vec<f32>> {
            match v.len() {
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v),
                n => Err(format!("the bias has {n} values for {channels} channels")),
            }
        };
        let values: Vec<i32> = if let Ok(b) = self.dequantized(value, "the bias") {
            let bq = self
                .index
                .constant(self.g, &b.value)
                .and_then(|t| i32s(&t))
                .ok_or("the bias is not a constant")?;
            if bq.len() != channels {
                return Err("the bias does not match the output channels".into());
            }
            (0..channels)
                .map(|c| {
                    let s = b.scale_v[if b.scale_v.len() == 1 { 0 } else { c }];
                    let zp = b.zp_v[if b.zp_v.len() == 1 { 0 } else { c }];
                    if zp == 0 && s == acc_scale(c) {
                        bq[c]
                    } else {
                        requantize_bias((bq[c] - zp) as f64 * s as f64, acc_scale(c))
                    }
                })
                .collect()
        } else {
            let t = self
                .index
                .constant(self.g, value)
                .ok_or("the bias is neither quantized nor a constant")?;
            if t.datum_type() != DatumType::F32 {
                return Err("the bias is not f32".into());
            }
            let b = broadcast(f32s(&t).ok_or("unreadable bias")?)?;
            (0..channels)
                .map(|c| requantize_bias(b[c] as f64, acc_scale(c)))
                .collect()
        };
        Tensor::from_shape(&[channels], &values).map_err(|e| e.to_string())
    }

    fn match_conv(&self, ix: usize) -> Match<Replacement> {
        let conv = self.node(ix);
        let name = if conv.name.is_empty() {
            graph::fresh_name(self.g, "qconv")
        } else {
            conv.name.clone()
        };
        let x = self.activation_input(conv)?;
        let (_wq, w, channels) = self.weight(&conv.input[1], |shape| match shape.len() {
            3.. => Ok(0),
            r => Err(format!("the weight has rank {r}, expected at least 3")),
        })?;
        let QuantizedOutput {
            consumed,
            quant: y,
            name: out,
            clamp,
        } = self.quantized_output(ix)?;
        let mut initializers = vec![];
        let mut inputs = self.qlinear_inputs(
            &name,
            (&x, x.value.clone(), "x_zp"),
            (&w, w.value.clone(), "w_zp"),
            &y,
            &mut initializers,
        );
        if let Some(b) = conv.input.get(2).filter(|s| !s.is_empty()) {
            let bias = self.bias_i32(b, &x, &w, channels)?;
            let name = graph::fresh_name(self.g, &format!("{}.tern_bias_i32", conv.name));
            initializers.push(graph::initializer(&name, &bias).ok_or("cannot encode the bias")?);
            inputs.push(name);
        }
        let mut attrs: Vec<_> = conv.attribute.clone();
        attrs.retain(|a| {
            matches!(
                a.name.as_str(),
                "auto_pad" | "dilations" | "group" | "kernel_shape" | "pads" | "strides"
            )
        });
        let mut nodes = vec![];
        let conv_out = if clamp.is_some() {
            graph::fresh_name(self.g, &format!("{name}.unclamped"))
        } else {
            out.clone()
        };
        nodes.push(node(
            "QLinearConv",
            &name,
            inputs,
            vec![conv_out.clone()],
            attrs,
        ));
        self.push_clamp(
            &mut nodes,
            &mut initializers,
            &name,
            conv_out,
            out,
            clamp,
            &y,
        )?;
        Ok(Replacement::new(ix, consumed, nodes, initializers))
    }

    fn match_gemm(&self, ix: usize) -> Match<Replacement> {
        let gemm = self.node(ix);
        if graph::attr_float(gemm, "alpha").unwrap_or(1.0) != 1.0 {
            return Err("alpha is not 1".into());
        }
        if graph::attr_int(gemm, "transA").unwrap_or(0) != 0 {
            return Err("transA is set".into());
        }
        let has_bias = gemm.input.get(2).is_some_and(|s| !s.is_empty());
        if has_bias && graph::attr_float(gemm, "beta").unwrap_or(1.0) != 1.0 {
            return Err("beta is not 1".into());
        }
        let trans_b = graph::attr_int(gemm, "transB").unwrap_or(0) != 0;
        let x = self.activation_input(gemm)?;
        let (wq, w, channels) = self.weight(&gemm.input[1], |shape| match shape.len() {
            2 => Ok(if trans_b { 0 } else { 1 }),
            _ => Err("the weight is not a matrix".into()),
        })?;
        let k = wq.len() / channels.max(1);
        let QuantizedOutput {
            consumed,
            quant: y,
            name: out,
            clamp,
        } = self.quantized_output(ix)?;
        let name = if gemm.name.is_empty() {
            graph::fresh_name(self.g, "qgemm")
        } else {
            gemm.name.clone()
        };
        let mut initializers = vec![];
        // A Gemm is a 1×1 convolution over [N, K, 1, 1]: that form carries per-channel weight
        // scales and an i32 bias, which QLinearMatMul cannot.
        let w_oihw = if trans_b {
            wq
        } else {
            wq.permute_axes(&[1, 0]).map_err(|e| e.to_string())?
        };
        let w_oihw = w_oihw
            .into_shape(&[channels, k, 1, 1])
            .map_err(|e| e.to_string())?;
        let w_name = graph::fresh_name(self.g, &format!("{name}.tern_w_oihw"));
        initializers.push(graph::initializer(&w_name, &w_oihw).ok_or("cannot encode the weight")?);
        let x4 = graph::fresh_name(self.g, &format!("{name}.x4"));
        let y4 = graph::fresh_name(self.g, &format!("{name}.y4"));
        let mut nodes = vec![];
        nodes.push(self.axes_node(
            "Unsqueeze",
            &format!("{name}.unsqueeze"),
            x.value.clone(),
            x4.clone(),
            &mut initializers,
        ));
        let mut inputs = self.qlinear_inputs(
            &name,
            (&x, x4, "x_zp"),
            (&w, w_name, "w_zp"),
            &y,
            &mut initializers,
        );
        if has_bias {
            let bias = self.bias_i32(&gemm.input[2], &x, &w, channels)?;
            let bname = graph::fresh_name(self.g, &format!("{name}.tern_bias_i32"));
            initializers.push(graph::initializer(&bname, &bias).ok_or("cannot encode the bias")?);
            inputs.push(bname);
        }
        nodes.push(node("QLinearConv", &name, inputs, vec![y4.clone()], vec![]));
        let squeezed = if clamp.is_some() {
            graph::fresh_name(self.g, &format!("{name}.unclamped"))
        } else {
            out.clone()
        };
        nodes.push(self.axes_node(
            "Squeeze",
            &format!("{name}.squeeze"),
            y4,
            squeezed.clone(),
            &mut initializers,
        ));
        self.push_clamp(
            &mut nodes,
            &mut initializers,
            &name,
            squeezed,
            out,
            clamp,
            &y,
        )?;
        Ok(Replacement::new(ix, consumed, nodes, initializers))
    }

    fn match_matmul(&self, ix: usize) -> Match<Replacement> {
        let mm = self.node(ix);
        let a = self.activation_input(mm)?;
        let (_wq, w, _) = self.weight(&mm.input[1], |shape| match shape.len() {
            2 => Ok(1),
            _ => Err("the weight is not a matrix".into()),
        })?;
        let QuantizedOutput {
            consumed,
            quant: y,
            name: out,
            clamp,
        } = self.quantized_output(ix)?;
        let name = if mm.name.is_empty() {
            graph::fresh_name(self.g, "qmatmul")
        } else {
            mm.name.clone()
        };
        let mut initializers = vec![];
        let inputs = self.qlinear_inputs(
            &name,
            (&a, a.value.clone(), "a_zp"),
            (&w, w.value.clone(), "b_zp"),
            &y,
            &mut initializers,
        );
        let mm_out = if clamp.is_some() {
            graph::fresh_name(self.g, &format!("{name}.unclamped"))
        } else {
            out.clone()
        };
        let mut nodes = vec![node(
            "QLinearMatMul",
            &name,
            inputs,
            vec![mm_out.clone()],
            vec![],
        )];
        self.push_clamp(&mut nodes, &mut initializers, &name, mm_out, out, clamp, &y)?;
        Ok(Replacement::new(ix, consumed, nodes, initializers))
    }

    /// The eight inputs every QLinear op takes: x, x_scale, x_zp, w, w_scale, w_zp, y_scale,
    /// y_zp. `x` and `w` name the quantized values, which a rewrite may have reshaped.
    fn qlinear_inputs(
        &self,
        name: &str,
        (x, x_value, x_what): (&Quant, String, &str),
        (w, w_value, w_what): (&Quant, String, &str),
        y: &Quant,
        initializers: &mut Vec<pb::TensorProto>,
    ) -> Vec<String> {
        vec![
            x_value,
            x.scale.clone(),
            self.zp_name(name, x, initializers, x_what),
            w_value,
            w.scale.clone(),
            self.zp_name(name, w, initializers, w_what),
            y.scale.clone(),
            self.zp_name(name, y, initializers, "y_zp"),
        ]
    }

    /// Zero-point input name; QLinear ops require it, so a missing one becomes a zero constant
    /// of the right type and shape.
    fn zp_name(
        &self,
        node: &str,
        q: &Quant,
        initializers: &mut Vec<pb::TensorProto>,
        what: &str,
    ) -> String {
        if let Some(zp) = &q.zero_point {
            return zp.clone();
        }
        let name = graph::fresh_name(self.g, &format!("{node}.tern_{what}"));
        let shape: Vec<usize> = if q.scale_v.len() == 1 {
            vec![]
        } else {
            vec![q.scale_v.len()]
        };
        let t = Tensor::zero_dt(q.zp_dt, &shape).expect("small zero tensor");
        if let Some(p) = graph::initializer(&name, &t) {
            initializers.push(p);
        }
        name
    }

    fn axes_node(
        &self,
        op: &str,
        name: &str,
        input: String,
        output: String,
        initializers: &mut Vec<pb::TensorProto>,
    ) -> pb::NodeProto {
        if self.opset >= 13 {
            let axes = graph::fresh_name(self.g, &format!("{name}.axes"));
            let t = Tensor::from_shape(&[2], &[2i64, 3]).expect("static shape");
            initializers.push(graph::initializer(&axes, &t).expect("i64 encodes"));
            node(op, name, vec![input, axes], vec![output], vec![])
        } else {
            node(
                op,
                name,
                vec![input],
                vec![output],
                vec![graph::ints_attr("axes", vec![2, 3])],
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_clamp(
        &self,
        nodes: &mut Vec<pb::NodeProto>,
        initializers: &mut Vec<pb::TensorProto>,
        name: &str,
        input: String,
        output: String,
        clamp: Option<(i32, i32)>,
        y: &Quant,
    ) -> Match<()> {
        let Some((lo, hi)) = clamp else { return Ok(()) };
        let constant = |v: i32, what: &str, inits: &mut Vec<pb::TensorProto>| -> Match<String> {
            let t = Tensor::from(v)
                .cast_to_dt(y.zp_dt)
                .map_err(|e| e.to_string())?
                .into_owned();
            let n = graph::fresh_name(self.g, &format!("{name}.tern_{what}"));
            inits.push(graph::initializer(&n, &t).ok_or("cannot encode clamp bound")?);
            Ok(n)
        };
        // Saturation already holds the type's own bounds: emit only the side that narrows it.
        let (qmin, qmax) = q_range(y.zp_dt);
        let mut current = input;
        let mut steps = vec![];
        if lo > qmin {
            steps.push(("Max", constant(lo, "lo", initializers)?));
        }
        if hi < qmax {
            steps.push(("Min", constant(hi, "hi", initializers)?));
        }
        let last = steps.len().saturating_sub(1);
        for (i, (op, bound)) in steps.into_iter().enumerate() {
            let out = if i == last {
                output.clone()
            } else {
                graph::fresh_name(self.g, &format!("{name}.act_{op}"))
            };
            nodes.push(node(
                op,
                &format!("{name}.act_{op}"),
                vec![current, bound],
                vec![out.clone()],
                vec![],
            ));
            current = out;
        }
        Ok(())
    }
}

fn requantize_bias(value: f64, acc_scale: f32) -> i32 {
    (value / acc_scale as f64)
        .round()
        .clamp(i32::MIN as f64, i32::MAX as f64) as i32
}

fn node(
    op: &str,
    name: &str,
    input: Vec<String>,
    output: Vec<String>,
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input,
        output,
        attribute,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::testing::value_info;
    use super::*;
    use crate::{Model, ModelOptions, TensorView};
    use prost::Message;
    use tract_onnx::pb::tensor_proto::DataType;

    fn init(name: &str, dt: DataType, dims: &[i64], raw: Vec<u8>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: dt as i32,
            dims: dims.to_vec(),
            raw_data: raw,
            ..Default::default()
        }
    }

    fn f32s_raw(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// x [N,2,4,4] → Q → DQ → Conv(3×2×3×3, pad 1, per-channel int8 weights, bias)
    /// → [activation] → Q(y_zp) → DQ → out.
    fn conv_model(activation: Option<&str>, y_zp: u8, weight_is_input: bool) -> pb::ModelProto {
        let w: Vec<u8> = (0..54).map(|i| ((i * 37 % 23) as i8 - 11) as u8).collect();
        let mut initializer = vec![
            init("xs", DataType::Float, &[], f32s_raw(&[1.0 / 255.0])),
            init("xzp", DataType::Uint8, &[], vec![0]),
            init("ws", DataType::Float, &[3], f32s_raw(&[0.02, 0.03, 0.05])),
            init("wzp", DataType::Int8, &[3], vec![0; 3]),
            init("b", DataType::Float, &[3], f32s_raw(&[0.1, -0.2, 0.05])),
            init("ys", DataType::Float, &[], f32s_raw(&[0.01])),
            init("yzp", DataType::Uint8, &[], vec![y_zp]),
        ];
        if !weight_is_input {
            initializer.push(init("wq", DataType::Int8, &[3, 2, 3, 3], w));
        }
        let n = |op: &str, name: &str, i: &[&str], o: &[&str]| pb::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: i.iter().map(|s| s.to_string()).collect(),
            output: o.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let mut dq_w = n("DequantizeLinear", "dq_w", &["wq", "ws", "wzp"], &["wf"]);
        dq_w.attribute.push(pb::AttributeProto {
            name: "axis".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 0,
            ..Default::default()
        });
        let mut conv = n("Conv", "conv", &["xf", "wf", "b"], &["y"]);
        conv.attribute
            .push(graph::ints_attr("pads", vec![1, 1, 1, 1]));
        let mut node = vec![
            n("QuantizeLinear", "q_x", &["x", "xs", "xzp"], &["xq"]),
            n("DequantizeLinear", "dq_x", &["xq", "xs", "xzp"], &["xf"]),
            dq_w,
            conv,
        ];
        let pre_q = match activation {
            Some(op) => {
                node.push(n(op, "act", &["y"], &["ya"]));
                "ya"
            }
            None => "y",
        };
        node.push(n("QuantizeLinear", "q_y", &[pre_q, "ys", "yzp"], &["yq"]));
        node.push(n(
            "DequantizeLinear",
            "dq_y",
            &["yq", "ys", "yzp"],
            &["out"],
        ));
        let mut input = vec![value_info("x", &["N", "2", "4", "4"])];
        if weight_is_input {
            let mut wi = value_info("wq", &["3", "2", "3", "3"]);
            if let Some(pb::type_proto::Value::TensorType(t)) =
                wi.r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.elem_type = DataType::Int8 as i32;
            }
            input.push(wi);
        }
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(pb::GraphProto {
                node,
                initializer,
                input,
                output: vec![value_info("out", &["N", "3", "4", "4"])],
                name: "g".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ops(m: &pb::ModelProto) -> Vec<String> {
        m.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.clone())
            .collect()
    }

    fn run(m: &pb::ModelProto, fusion: bool) -> Vec<f32> {
        let opts = ModelOptions {
            int8_fusion: fusion,
            ..Default::default()
        };
        let model = Model::from_bytes(&m.encode_to_vec(), &opts).unwrap();
        let x: Vec<f32> = (0..64).map(|i| ((i * 13) % 29) as f32 / 28.0).collect();
        let mut s = model.session().unwrap();
        let out = s.run(&[TensorView::new(&[2, 2, 4, 4], &x)]).unwrap();
        out.get(0).unwrap().to_vec::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn a_qdq_conv_becomes_one_qlinearconv_with_the_same_results() {
        let m = conv_model(None, 128, false);
        let mut fused = m.clone();
        let report = fuse(&mut fused);
        assert_eq!(
            report.nodes,
            vec![("conv".into(), "Conv".into(), Outcome::Fused("QLinearConv"))]
        );
        assert_eq!(
            ops(&fused),
            ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
        );
        // Float bias requantized to i32 can differ from the float path by one output step.
        assert!(max_diff(&run(&m, true), &run(&m, false)) <= 0.01 + 1e-6);
    }

    #[test]
    fn a_relu_that_saturation_covers_is_absorbed() {
        let m = conv_model(Some("Relu"), 0, false);
        let mut fused = m.clone();
        fuse(&mut fused);
        assert_eq!(
            ops(&fused),
            ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
        );
        assert!(max_diff(&run(&m, true), &run(&m, false)) <= 0.01 + 1e-6);
    }

    #[test]
    fn a_relu_above_the_quantized_minimum_becomes_an_integer_clamp() {
        let m = conv_model(Some("Relu"), 100, false);
        let mut fused = m.clone();
        fuse(&mut fused);
        assert_eq!(
            ops(&fused),
            ["QuantizeLinear", "QLinearConv", "Max", "DequantizeLinear"]
        );
        let (a, b) = (run(&m, true), run(&m, false));
        assert!(a.iter().all(|&v| v >= 0.0), "relu must hold");
        assert!(max_diff(&a, &b) <= 0.01 + 1e-6);
    }

    #[test]
    fn a_weight_that_is_not_constant_stays_in_float_with_a_reason() {
        let mut m = conv_model(None, 128, true);
        let report = fuse(&mut m);
        assert_eq!(
            report.nodes,
            vec![(
                "conv".into(),
                "Conv".into(),
                Outcome::KeptFloat("the weight is not a constant".into())
            )]
        );
        assert!(ops(&m).contains(&"Conv".to_string()));
    }

    #[test]
    fn an_output_read_twice_stays_in_float() {
        let mut m = conv_model(None, 128, false);
        let g = m.graph.as_mut().unwrap();
        g.output.push(value_info("y", &["N", "3", "4", "4"]));
        let report = fuse(&mut m);
        assert!(
            matches!(&report.nodes[0].2, Outcome::KeptFloat(r) if r.contains("several consumers"))
        );
    }
}
