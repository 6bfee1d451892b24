//! Squeeze-and-excitation blocks as one op, placed into tract's decluttered graph in place of
//! the dozen nodes such a block is after declutter.
//!
//! A MobileNetV3 block scales its feature map by a per-channel gate: a global average pool, a
//! 1×1 convolution with a bias and ReLU, another with a bias, a hard sigmoid (`Mul`, `Add`,
//! `Min`, `Max` once decluttered), and the `Mul` by the gate; SE-ResNet's and RegNetY's have a
//! logistic gate instead. Blocks with a SiLU inside (EfficientNet) are not taken: they stay
//! with tract as they were.
//! tract optimizes each of those nodes (it plans the two products as packed matrix-vector
//! products, repacking their input before each) and runs them one by one on vectors of a few
//! dozen values: on the 48×192 MobileNet a fifth of the nodes tract optimizes at load are these,
//! for well under 1% of the arithmetic. Here the block is one pass: pool each plane, the two
//! small products, the gate, then each plane scaled in place.

use std::cell::RefCell;
use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Add, Max, Min, Mul};
use tract_onnx::tract_core::ops::nn::Sigmoid;

use crate::dwconv::{activation_after, other_scalar, replace_run};
use crate::int8::kernels::FloatAct;
use crate::planesum::{sum, PlaneSum};
use crate::pwconv::{bias_after, product};

/// What the inspection says runs the two convolutions of a block replaced here.
pub(crate) const KERNEL: &str =
    "Tern f32 squeeze-and-excitation kernel (pool, both 1×1 convolutions, gate and scale in one)";

/// A fully connected layer: `o × k` weights, row by row, and one bias per output.
#[derive(Debug)]
struct Dense {
    o: usize,
    k: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    /// `weights` as a product stores them: `o × k`, or `k × o` when `transposed`.
    fn new(o: usize, k: usize, weights: &[f32], transposed: bool, bias: Vec<f32>) -> Dense {
        let weights = if transposed {
            (0..o)
                .flat_map(|j| (0..k).map(move |i| weights[i * o + j]))
                .collect()
        } else {
            weights.to_vec()
        };
        Dense {
            o,
            k,
            weights,
            bias,
        }
    }

    fn apply(&self, x: &[f32], out: &mut [f32], act: impl Fn(f32) -> f32) {
        for ((y, row), b) in out
            .iter_mut()
            .zip(self.weights.chunks_exact(self.k))
            .zip(&self.bias)
        {
            *y = act(dot(row, x) + b);
        }
    }
}

/// Eight partial sums, so that the loop vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// `clamp(σ(v · mul + add))`, σ the logistic function or none: a hard sigmoid as exports
/// write it (MobileNetV3), a logistic gate (SE-ResNet, RegNetY), or any affine map and clamp
/// of scalars.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Gate {
    mul: f32,
    add: f32,
    logistic: bool,
    clamp: FloatAct,
}

impl Gate {
    fn apply(self, v: f32) -> f32 {
        let v = v * self.mul + self.add;
        let v = if self.logistic {
            1.0 / (1.0 + (-v).exp())
        } else {
            v
        };
        self.clamp.apply(v)
    }
}

/// `x · gate(excite(act(squeeze(mean(x)))))` per channel, channels on `axis`, every axis
/// after it pooled.
#[derive(Debug, Clone)]
pub(crate) struct SqueezeExcite {
    axis: usize,
    /// What makes the pool's sum a mean (1 / pixels, as the graph had it).
    scale: f32,
    squeeze: Arc<Dense>,
    act: FloatAct,
    excite: Arc<Dense>,
    gate: Gate,
    /// The names of the two convolutions, which the inspection lists.
    pub(crate) products: [String; 2],
}

impl PartialEq for SqueezeExcite {
    fn eq(&self, other: &Self) -> bool {
        // Weights are shared, never rebuilt: the same op is the same allocation.
        Arc::ptr_eq(&self.squeeze, &other.squeeze)
            && Arc::ptr_eq(&self.excite, &other.excite)
            && self.axis == other.axis
            && self.scale == other.scale
            && self.act == other.act
            && self.gate == other.gate
    }
}

impl Eq for SqueezeExcite {}

thread_local! {
    /// The pooled values, the hidden layer and the gates of one image, reused by every block
    /// run on this thread: a request allocates nothing here.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl SqueezeExcite {
    /// Scales `x` in place.
    fn run(&self, x: &mut Tensor) -> TractResult<()> {
        let (c, mid) = (self.excite.o, self.squeeze.o);
        let shape = x.shape();
        ensure!(
            shape.len() > self.axis && shape[self.axis] == c,
            "expected {c} channels on axis {}, got shape {shape:?}",
            self.axis
        );
        let plane: usize = shape[self.axis + 1..].iter().product();
        if plane == 0 {
            return Ok(());
        }
        let mut view = x.try_as_plain_ram_mut()?;
        let data = view.as_slice_mut::<f32>()?;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(2 * c + mid, 0.0);
            let (pooled, rest) = scratch.split_at_mut(c);
            let (hidden, gates) = rest.split_at_mut(mid);
            for image in data.chunks_exact_mut(c * plane) {
                for (p, run) in pooled.iter_mut().zip(image.chunks_exact(plane)) {
                    *p = sum(run) * self.scale;
                }
                self.squeeze.apply(pooled, hidden, |v| self.act.apply(v));
                self.excite.apply(hidden, gates, |v| self.gate.apply(v));
                for (g, run) in gates.iter().zip(image.chunks_exact_mut(plane)) {
                    run.iter_mut().for_each(|v| *v *= g);
                }
            }
        });
        Ok(())
    }

    /// The feature map is usually read by this op alone once the block is one: then it is
    /// scaled where it lies; when it is shared, `into_tensor` copies it first.
    fn scaled(&self, x: TValue) -> TractResult<TValue> {
        let mut x = x.into_tensor();
        self.run(&mut x)?;
        Ok(x.into_tvalue())
    }

    pub(crate) fn describe(&self) -> String {
        KERNEL.into()
    }
}

impl Op for SqueezeExcite {
    fn name(&self) -> StaticName {
        "TernSqueezeExcite".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} → {} → {} channels ({}, {})",
            self.excite.o, self.squeeze.o, self.excite.o, self.products[0], self.products[1]
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for SqueezeExcite {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.scaled(args_1!(inputs))?))
    }
}

impl TypedOp for SqueezeExcite {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "TernSqueezeExcite takes one input");
        ensure!(
            inputs[0].datum_type == DatumType::F32,
            "TernSqueezeExcite: f32 input"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}

/// Replaces every squeeze-and-excitation block found after a [`PlaneSum`]; returns how many.
/// `TERN_NO_EXCITE=1` leaves them to tract (for comparisons).
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    if std::env::var_os("TERN_NO_EXCITE").is_some() {
        return Ok(0);
    }
    let candidates: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<PlaneSum>())
        .map(|n| n.id)
        .collect();
    let mut fused = 0;
    for id in candidates {
        match block(model, id) {
            Ok((op, absorbed)) => {
                replace_run(model, id, 0, &absorbed, op)?;
                fused += 1;
            }
            Err(why) => log::trace!(
                "{}: not a squeeze-and-excitation block ({why})",
                model.node(id).name
            ),
        }
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// The block that starts with the pool `id`, and the nodes after the pool it takes; or why
/// there is none.
fn block(model: &TypedModel, id: usize) -> Result<(SqueezeExcite, Vec<usize>), String> {
    let pool = model.node(id);
    let sum = pool.op_as::<PlaneSum>().ok_or("not a plane sum")?;
    let x = pool.inputs[0];
    let x_fact = model.outlet_fact(x).map_err(|e| e.to_string())?;
    let axis = sum.from.checked_sub(1).ok_or("no channel axis")?;
    let c = x_fact
        .shape
        .get(axis)
        .and_then(|d| d.to_usize().ok())
        .ok_or("symbolic channel count")?;
    let pooled_shape = model
        .outlet_fact(OutletId::new(id, 0))
        .map_err(|e| e.to_string())?
        .shape
        .clone();
    let mut absorbed = vec![];
    let (squeeze, squeeze_name, mid) = dense_after(model, id, c, Some(axis), None, None)?;
    absorbed.push(squeeze.0);
    let mut last = squeeze.0;
    if let Some(add) = squeeze.2 {
        absorbed.push(add);
        last = add;
    }
    let (act, acts) = activation_after(model, last);
    if let Some(&a) = acts.last() {
        last = a;
    }
    absorbed.extend(acts);
    // The gate must have the pooled shape to scale the channels of the feature map.
    let (excite, excite_name, _) =
        dense_after(model, last, mid, None, Some(c), Some(&pooled_shape))?;
    absorbed.push(excite.0);
    last = excite.0;
    if let Some(add) = excite.2 {
        absorbed.push(add);
        last = add;
    }
    let (gate, gates) = gate_after(model, last);
    if let Some(&g) = gates.last() {
        last = g;
    }
    absorbed.extend(gates);
    let scale = scale_by(model, last, x, &x_fact.shape)?;
    absorbed.push(scale);
    let op = SqueezeExcite {
        axis,
        scale: sum.scale,
        squeeze: Arc::new(squeeze.1),
        act,
        excite: Arc::new(excite.1),
        gate,
        products: [squeeze_name, excite_name],
    };
    Ok((op, absorbed))
}

/// The product (with its bias) that reads `id`'s output alone, over `k` channels (on `x_axis`
/// of its input, when given), writing `o` channels (when given) into a tensor of `out_shape`
/// (when given): the product node, its layer and the bias `Add`; its name; its output channels.
///
/// Between the two products tract's axis rewrites drop the axes of size 1 (`oi,nihw->no`,
/// then `oi,ni->nohw`): any layout is taken whose bytes are [images, channels], which
/// [`product`] checks.
type DenseFound = ((usize, Dense, Option<usize>), String, usize);

fn dense_after(
    model: &TypedModel,
    id: usize,
    k: usize,
    x_axis: Option<usize>,
    o: Option<usize>,
    out_shape: Option<&ShapeFact>,
) -> Result<DenseFound, String> {
    let outlet = OutletId::new(id, 0);
    let node = sole_reader(model, id)?;
    let op = node.op_as::<EinSum>().ok_or("not followed by a product")?;
    let p = product(model, node, op, 1)?;
    let over_channels = x_axis.is_none_or(|a| a == p.axis) && p.k == k;
    if node.inputs[p.x_input] != outlet || !over_channels {
        return Err(format!(
            "product {} is not over the pooled channels",
            node.name
        ));
    }
    if o.is_some_and(|o| o != p.o) {
        return Err(format!("product {} gives {} channels", node.name, p.o));
    }
    let out = model
        .outlet_fact(OutletId::new(node.id, 0))
        .map_err(|e| e.to_string())?;
    if out_shape.is_some_and(|s| *s != out.shape) || out.datum_type != DatumType::F32 {
        return Err(format!("product {} changes the axes", node.name));
    }
    let (bias, add) = match bias_after(model, node.id, p.o_pos, p.o) {
        Some((bias, add)) => (bias, Some(add)),
        None => (vec![0.0; p.o], None),
    };
    let dense = Dense::new(p.o, p.k, &p.weights, p.transposed, bias);
    Ok(((node.id, dense, add), node.name.clone(), p.o))
}

/// The one node that reads `id`'s output, when it is not an output of the model.
fn sole_reader(model: &TypedModel, id: usize) -> Result<&TypedNode, String> {
    let outlet = OutletId::new(id, 0);
    if model.output_outlets().is_ok_and(|o| o.contains(&outlet)) {
        return Err(format!("{} is an output of the model", model.node(id).name));
    }
    match model.single_succ(id) {
        Ok(Some(next)) => Ok(next),
        _ => Err(format!("{} has more than one reader", model.node(id).name)),
    }
}

/// The affine map by scalars, logistic function and clamp by scalars that `id`'s output goes
/// through, in that order (a hard sigmoid, a sigmoid), and the nodes that make it: each the
/// sole reader of the one before, of the same shape.
fn gate_after(model: &TypedModel, id: usize) -> (Gate, Vec<usize>) {
    let mut gate = Gate {
        mul: 1.0,
        add: 0.0,
        logistic: false,
        clamp: FloatAct::None,
    };
    let mut absorbed = vec![];
    let mut at = id;
    while let Ok(next) = sole_reader(model, at) {
        let outlet = OutletId::new(at, 0);
        let same_shape = match (model.outlet_fact(outlet), model.outlet_fact(next.id.into())) {
            (Ok(a), Ok(b)) => a.shape == b.shape && b.datum_type == DatumType::F32,
            _ => false,
        };
        if !same_shape {
            break;
        }
        let clamped = gate.clamp != FloatAct::None;
        let sigmoid = next
            .op_as::<ElementWiseOp>()
            .is_some_and(|e| e.0.is::<Sigmoid>());
        if sigmoid && !gate.logistic && !clamped {
            gate.logistic = true;
            absorbed.push(next.id);
            at = next.id;
            continue;
        }
        let (Some(bin), Some(c)) = (
            next.op_as::<TypedBinOp>(),
            other_scalar(model, next, outlet),
        ) else {
            break;
        };
        let (lo, hi) = match gate.clamp {
            FloatAct::Clamp { lo, hi } => (lo, hi),
            _ => (f32::NEG_INFINITY, f32::INFINITY),
        };
        let affine = !clamped && !gate.logistic;
        if bin.0.is::<Mul>() && affine {
            gate.mul *= c;
            gate.add *= c;
        } else if bin.0.is::<Add>() && affine {
            gate.add += c;
        } else if bin.0.is::<Max>() {
            gate.clamp = FloatAct::Clamp {
                lo: lo.max(c),
                hi: hi.max(c),
            };
        } else if bin.0.is::<Min>() {
            gate.clamp = FloatAct::Clamp {
                lo: lo.min(c),
                hi: hi.min(c),
            };
        } else {
            break;
        }
        absorbed.push(next.id);
        at = next.id;
    }
    (gate, absorbed)
}

/// The `Mul` of the feature map `x` by the gate `id` computes, as the gate's sole reader.
fn scale_by(
    model: &TypedModel,
    id: usize,
    x: OutletId,
    shape: &ShapeFact,
) -> Result<usize, String> {
    let gate = OutletId::new(id, 0);
    let next = sole_reader(model, id)?;
    let is_mul = next.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>());
    let reads = next.inputs[..] == [x, gate] || next.inputs[..] == [gate, x];
    let out = model
        .outlet_fact(OutletId::new(next.id, 0))
        .map_err(|e| e.to_string())?;
    if !is_mul || !reads || out.shape != *shape || out.datum_type != DatumType::F32 {
        return Err(format!("{} does not scale the pooled tensor", next.name));
    }
    Ok(next.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::str::FromStr;

    use crate::int8::Lcg;
    use crate::testing::{assert_outputs_close, random_tensor};
    use tract_onnx::tract_core::axes::AxesMapping;
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

    fn random(rng: &mut Lcg, shape: &[usize]) -> TractResult<Tensor> {
        random_tensor(rng, shape, 1.0)
    }

    /// How a test block is built, as tract's declutter leaves one.
    #[derive(Clone, Copy)]
    struct Block {
        /// The feature map's shape; channels on axis 1 (axis 0 at rank 3).
        shape: &'static [usize],
        mid: usize,
        /// The squeeze's weights stored `k × o`.
        transposed: bool,
        bias: bool,
        /// ReLU after the squeeze.
        relu: bool,
        /// The gate's nodes.
        gate: GateKind,
        /// The hidden layer without its axes of size 1, as tract's axis rewrites leave it.
        squeezed: bool,
        /// What else reads a tensor of the block (which keeps it with tract).
        leak: Leak,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum GateKind {
        None,
        /// `Mul`, `Add`, `Min`, `Max`, as tract declutters ONNX `HardSigmoid`.
        Hard,
        Logistic,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Leak {
        None,
        /// The hidden layer is also an output of the model.
        Hidden,
        /// The gate scales another tensor than the one pooled.
        OtherTensor,
    }

    const BASE: Block = Block {
        shape: &[1, 24, 3, 12],
        mid: 8,
        transposed: false,
        bias: true,
        relu: true,
        gate: GateKind::Hard,
        squeezed: false,
        leak: Leak::None,
    };

    fn scalar(m: &mut TypedModel, name: &str, rank: usize, v: f32) -> TractResult<OutletId> {
        m.add_const(name, Tensor::from_shape(&vec![1; rank], &[v])?)
    }

    /// The block as a graph of tract's ops, its input and the number of nodes it is.
    fn model(b: Block, rng: &mut Lcg) -> TractResult<(TypedModel, Tensor)> {
        let mut m = TypedModel::default();
        let rank = b.shape.len();
        let axis = rank - 3;
        let c = b.shape[axis];
        let x = m.add_source("x", f32::fact(b.shape))?;
        let pooled_axes: TVec<usize> = (axis + 1..rank).collect();
        let sum = Reduce {
            axes: pooled_axes,
            reducer: Reducer::Sum,
        };
        let mut y = m.wire_node("pool", sum, &[x])?[0];
        let plane: usize = b.shape[axis + 1..].iter().product();
        let k = scalar(&mut m, "mean", rank, 1.0 / plane as f32)?;
        y = m.wire_node("pool.mean", math::mul(), &[y, k])?[0];
        // (pooled → hidden, hidden → gate) axes, and the hidden layer's rank.
        let (x_axes, hidden_axes, gate_axes) = match (rank, b.squeezed) {
            (4, false) => ("nihw", "nihw", "nohw"),
            (4, true) => ("nihw", "ni", "nohw"),
            (_, false) => ("ihw", "ihw", "ohw"),
            (_, true) => ("ihw", "i", "ohw"),
        };
        let hidden_rank = if b.squeezed { rank - 2 } else { rank };
        let mut layer = |m: &mut TypedModel, y: OutletId, name: &str, o: usize, k: usize, t| {
            let first = name == "squeeze";
            let w = if t { "io" } else { "oi" };
            let spec = if first {
                format!("{w},{x_axes}->{}", hidden_axes.replace('i', "o"))
            } else {
                format!("{w},{hidden_axes}->{gate_axes}")
            };
            let out_rank = if first { hidden_rank } else { rank };
            let out_axis = out_rank - if first && b.squeezed { 1 } else { 3 };
            let w_shape = if t { [k, o] } else { [o, k] };
            // Small enough that the hard sigmoid is mostly between its bounds: a saturated
            // gate would hide a wrong product.
            let w = random_tensor(rng, &w_shape, 1.0 / (k as f32).sqrt())?;
            let w = m.add_const(format!("{name}.w"), w)?;
            let axes = AxesMapping::from_str(&spec)?;
            let mut y = m.wire_node(name, EinSum::new(axes, f32::datum_type()), &[w, y])?[0];
            if b.bias {
                let mut shape = vec![1; out_rank];
                shape[out_axis] = o;
                let bias = m.add_const(format!("{name}.b"), random(rng, &shape)?)?;
                y = m.wire_node(format!("{name}.bias"), math::add(), &[y, bias])?[0];
            }
            TractResult::Ok(y)
        };
        y = layer(&mut m, y, "squeeze", b.mid, c, b.transposed)?;
        if b.relu {
            let zero = scalar(&mut m, "zero", hidden_rank, 0.0)?;
            y = m.wire_node("relu", math::max(), &[y, zero])?[0];
        }
        let hidden = y;
        y = layer(&mut m, y, "excite", c, b.mid, false)?;
        if b.gate == GateKind::Logistic {
            y = m.wire_node("sigmoid", tract_onnx::tract_core::ops::nn::sigmoid(), &[y])?[0];
        }
        if b.gate == GateKind::Hard {
            let sixth = scalar(&mut m, "sixth", rank, 1.0 / 6.0)?;
            let half = scalar(&mut m, "half", rank, 0.5)?;
            let (one, zero) = (
                scalar(&mut m, "one", rank, 1.0)?,
                scalar(&mut m, "zero2", rank, 0.0)?,
            );
            y = m.wire_node("hs.mul", math::mul(), &[y, sixth])?[0];
            y = m.wire_node("hs.add", math::add(), &[y, half])?[0];
            y = m.wire_node("hs.min", math::min(), &[y, one])?[0];
            y = m.wire_node("hs.max", math::max(), &[y, zero])?[0];
        }
        let scaled = if b.leak == Leak::OtherTensor {
            let other = m.add_const("other", random(rng, b.shape)?)?;
            m.wire_node("scale", math::mul(), &[other, y])?[0]
        } else {
            m.wire_node("scale", math::mul(), &[x, y])?[0]
        };
        let mut outputs = vec![scaled];
        if b.leak == Leak::Hidden {
            outputs.push(hidden);
        }
        m.select_output_outlets(&outputs)?;
        let input = random(rng, b.shape)?;
        Ok((m, input))
    }

    fn check(name: &str, b: Block, placed: bool) -> TractResult<()> {
        let mut rng = Lcg(b.shape.iter().product::<usize>() as u64 + b.mid as u64);
        let (mut m, input) = model(b, &mut rng)?;
        let want = m
            .clone()
            .into_runnable()?
            .run(tvec![input.clone().into()])?;
        assert_eq!(crate::planesum::fuse(&mut m)?, 1, "{name}");
        assert_eq!(fuse(&mut m)?, placed as usize, "{name}");
        let blocks = m
            .nodes()
            .iter()
            .filter(|n| n.op_is::<SqueezeExcite>())
            .count();
        assert_eq!(blocks, placed as usize, "{name}");
        if placed {
            // The source, the block and nothing else: every constant went with its node.
            assert_eq!(m.nodes().len(), 2, "{name}");
        }
        let got = m.into_runnable()?.run(tvec![input.into()])?;
        assert_outputs_close(name, &got, &want)
    }

    /// Blocks in the forms exports and tract's declutter leave them (NCHW and CHW, a batch of
    /// 2, weights either way round, with and without biases, ReLU and hard sigmoid) become one
    /// op and compute what tract's graph did.
    #[test]
    fn squeeze_and_excitation_blocks_become_one_op_with_tracts_results() -> TractResult<()> {
        check("mobilenet", BASE, true)?;
        check(
            "batch of 2",
            Block {
                shape: &[2, 16, 5, 7],
                ..BASE
            },
            true,
        )?;
        check(
            "chw",
            Block {
                shape: &[40, 2, 9],
                mid: 10,
                ..BASE
            },
            true,
        )?;
        check(
            "transposed squeeze",
            Block {
                transposed: true,
                ..BASE
            },
            true,
        )?;
        check(
            "no bias, no activation, no gate",
            Block {
                bias: false,
                relu: false,
                gate: GateKind::None,
                ..BASE
            },
            true,
        )?;
        check(
            "logistic gate (SE-ResNet)",
            Block {
                gate: GateKind::Logistic,
                ..BASE
            },
            true,
        )?;
        check(
            "hidden layer without its axes of size 1",
            Block {
                squeezed: true,
                ..BASE
            },
            true,
        )?;
        check(
            "the same over CHW",
            Block {
                shape: &[12, 4, 4],
                squeezed: true,
                ..BASE
            },
            true,
        )?;
        check(
            "one channel in the middle, one pixel",
            Block {
                shape: &[1, 3, 1, 1],
                mid: 1,
                ..BASE
            },
            true,
        )?;
        Ok(())
    }

    /// A block whose hidden layer is read elsewhere, or whose gate scales another tensor than
    /// the one pooled, stays with tract, as it computed.
    #[test]
    fn blocks_read_elsewhere_stay_with_tract() -> TractResult<()> {
        check(
            "hidden layer an output",
            Block {
                leak: Leak::Hidden,
                ..BASE
            },
            false,
        )?;
        check(
            "gate on another tensor",
            Block {
                leak: Leak::OtherTensor,
                ..BASE
            },
            false,
        )?;
        Ok(())
    }

    /// A feature map of the wrong channel count is an error, an empty batch stays empty, and
    /// a feature map shared with another reader is scaled in a copy.
    #[test]
    fn wrong_channel_counts_are_an_error_and_shared_inputs_are_left_alone() -> TractResult<()> {
        let op = SqueezeExcite {
            axis: 1,
            scale: 0.5,
            squeeze: Arc::new(Dense::new(1, 2, &[1.0, 1.0], false, vec![0.0])),
            act: FloatAct::None,
            excite: Arc::new(Dense::new(2, 1, &[1.0, 2.0], false, vec![0.0, 1.0])),
            gate: Gate {
                mul: 1.0,
                add: 0.0,
                logistic: false,
                clamp: FloatAct::None,
            },
            products: ["a".into(), "b".into()],
        };
        let err = op.run(&mut Tensor::zero::<f32>(&[1, 3, 2])?).unwrap_err();
        assert!(err.to_string().contains("expected 2 channels"), "{err}");
        let mut empty = Tensor::zero::<f32>(&[0, 2, 2])?;
        op.run(&mut empty)?;
        assert_eq!(empty.shape(), &[0, 2, 2]);
        // Means 1.5 and 3.5, hidden 5, gates 5 and 11.
        let x = Tensor::from_shape(&[1, 2, 2], &[1.0f32, 2.0, 3.0, 4.0])?.into_tvalue();
        let kept = x.clone();
        let y = op.scaled(x)?;
        assert_eq!(
            y.try_as_plain_ram()?.as_slice::<f32>()?,
            &[5.0, 10.0, 33.0, 44.0]
        );
        assert_eq!(
            kept.try_as_plain_ram()?.as_slice::<f32>()?,
            &[1.0, 2.0, 3.0, 4.0]
        );
        Ok(())
    }
}
