//! Tern's f32 pointwise (1×1) convolution, placed into tract's decluttered graph in place of
//! the `EinSum` a 1×1 convolution becomes, with the bias `Add` and the activation after it.
//!
//! tract plans such an `EinSum` as a packed matrix product: before every product it copies the
//! input into its panel layout, then runs the bias, and an h-swish after it as a node of its
//! own (each one more pass over the output). On float MobileNets those products were half of a
//! forward pass. NCHW input already is a panel layout for this product (one row of pixels per
//! input channel), so Tern's kernel (`pwconv/kernel.rs`) reads it in place and adds the bias and
//! applies the activation as it stores. Placed only where the kernel has a vector path (x86-64
//! with AVX2 and FMA); elsewhere tract's hand-written kernels stay the faster choice.

pub(crate) mod kernel;

use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;

use crate::dwconv::{activation_after, replace_run, with_activation};
use crate::int8::kernels::FloatAct;
use kernel::{Isa, PwWeights};

/// What the inspection says runs a convolution replaced here.
pub(crate) const KERNEL: &str = "Tern f32 pointwise kernel";

/// Products over fewer pixels than this stay with tract: the kernel's 16-pixel tiles would be
/// mostly empty, and tract has matrix-vector kernels for them.
const MIN_PIXELS: usize = 8;

/// A 1×1 convolution over f32 input whose channels are axis `axis` (NCHW's 1, CHW's 0),
/// bias added, then an activation.
#[derive(Debug, Clone)]
pub(crate) struct PwConv {
    weights: Arc<PwWeights>,
    act: FloatAct,
    axis: usize,
    /// The output's axes. tract's axis rewrites leave products that also drop or add axes of
    /// size 1 (`oi,nihw->ohw`, `oi,i->ohw`): the same bytes, a different shape.
    out: TVec<OutAxis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OutAxis {
    /// The input's axis at this position.
    Input(usize),
    Fixed(usize),
}

impl PartialEq for PwConv {
    fn eq(&self, other: &Self) -> bool {
        // Weights are shared, never rebuilt: the same op is the same allocation.
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.act == other.act
            && self.axis == other.axis
            && self.out == other.out
    }
}

impl Eq for PwConv {}

impl PwConv {
    pub(crate) fn describe(&self) -> String {
        with_activation(KERNEL, self.act)
    }

    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        let shape = x.shape();
        let (o, k) = (self.weights.o, self.weights.k);
        ensure!(
            shape.len() > self.axis && shape[self.axis] == k,
            "expected {k} channels on axis {}, got shape {shape:?}",
            self.axis
        );
        ensure!(
            self.out
                .iter()
                .all(|a| !matches!(a, OutAxis::Input(i) if *i >= shape.len())),
            "input of rank {} for a product planned on more axes",
            shape.len()
        );
        let images: usize = shape[..self.axis].iter().product();
        let pixels: usize = shape[self.axis + 1..].iter().product();
        let dims: TVec<usize> = self
            .out
            .iter()
            .map(|a| match a {
                OutAxis::Input(i) => shape[*i],
                OutAxis::Fixed(n) => *n,
            })
            .collect();
        // SAFETY: the kernel writes every output element.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&dims)? };
        if out.len() == 0 {
            return Ok(out);
        }
        let input = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut view = out.try_as_plain_ram_mut()?;
        let output = view.as_slice_mut::<f32>()?;
        for (x, y) in input
            .chunks_exact(k * pixels)
            .zip(output.chunks_exact_mut(o * pixels))
            .take(images)
        {
            kernel::pointwise_f32(&self.weights, self.act, x, pixels, y);
        }
        Ok(out)
    }
}

impl Op for PwConv {
    fn name(&self) -> StaticName {
        "TernPwConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}, {} → {} channels",
            self.describe(),
            self.weights.k,
            self.weights.o
        )])
    }

    op_as_typed_op!();
}

crate::dwconv::eval_one_input!(PwConv);

impl TypedOp for PwConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "TernPwConv takes one input");
        let x = &inputs[0].shape;
        ensure!(x.len() > self.axis, "input of rank {}", x.len());
        let shape: TVec<TDim> = self
            .out
            .iter()
            .map(|a| match a {
                OutAxis::Input(i) => x[*i].clone(),
                OutAxis::Fixed(n) => (*n).into(),
            })
            .collect();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// How an `EinSum` node is a 1×1 convolution: which input is the data, the channel axis, the
/// weights as stored (`o × k`, or `k × o` when transposed).
pub(crate) struct Product {
    pub(crate) x_input: usize,
    pub(crate) axis: usize,
    pub(crate) o: usize,
    pub(crate) k: usize,
    pub(crate) weights: Vec<f32>,
    pub(crate) transposed: bool,
    pub(crate) out: TVec<OutAxis>,
    /// The output's channel axis.
    pub(crate) o_pos: usize,
}

pub(crate) fn f32_values(t: &Tensor) -> Option<Vec<f32>> {
    if t.datum_type() != DatumType::F32 {
        return None;
    }
    Some(t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec())
}

/// The product node `node` computes, if it is a 1×1 convolution over at least `min_pixels`
/// pixels per channel.
pub(crate) fn product(
    model: &TypedModel,
    node: &TypedNode,
    op: &EinSum,
    min_pixels: usize,
) -> Result<Product, String> {
    if op.q_params.is_some() || op.operating_dt != DatumType::F32 || node.inputs.len() != 2 {
        return Err("not a two-input f32 product".into());
    }
    let fact = |ix: usize| {
        model
            .outlet_fact(node.inputs[ix])
            .map_err(|e| e.to_string())
    };
    let (w_input, x_input) = match (fact(0)?.konst.is_some(), fact(1)?.konst.is_some()) {
        (true, false) => (0, 1),
        (false, true) => (1, 0),
        _ => return Err("not one constant operand".into()),
    };
    let x = fact(x_input)?;
    if x.datum_type != DatumType::F32 {
        return Err("input is not f32".into());
    }
    let w = fact(w_input)?.konst.clone().expect("checked constant");
    let (inputs, outputs) = op.axes.to_strs();
    let (wa, xa, ya): (Vec<char>, Vec<char>, Vec<char>) = (
        inputs[w_input].chars().collect(),
        inputs[x_input].chars().collect(),
        outputs[0].chars().collect(),
    );
    let [first, second] = wa[..] else {
        return Err(format!("weights of rank {}", wa.len()));
    };
    // The output is the input with its summed axis replaced by the weights' other axis, in
    // place (x = P k S, y = P o S), once axes of size 1 (which tract adds and drops) are left
    // out on either side: then both have the bytes of [images, channels, pixels].
    let (o_axis, k_axis) = match (xa.contains(&first), xa.contains(&second)) {
        (false, true) => (first, second),
        (true, false) => (second, first),
        _ => return Err(format!("not a channel product ({})", op.axes)),
    };
    if xa.iter().filter(|c| **c == k_axis).count() != 1 || ya.contains(&k_axis) {
        return Err(format!("not a channel product ({})", op.axes));
    }
    let axis = xa
        .iter()
        .position(|c| *c == k_axis)
        .expect("contained above");
    let y = model
        .outlet_fact(OutletId::new(node.id, 0))
        .map_err(|e| e.to_string())?;
    let one = |d: &TDim| d.to_usize().is_ok_and(|d| d == 1);
    let kept_x: Vec<char> = xa
        .iter()
        .zip(x.shape.iter())
        .filter(|(c, d)| **c == k_axis || !one(d))
        .map(|(&c, _)| if c == k_axis { o_axis } else { c })
        .collect();
    let kept_y: Vec<char> = ya
        .iter()
        .zip(y.shape.iter())
        .filter(|(c, d)| **c == o_axis || !one(d))
        .map(|(&c, _)| c)
        .collect();
    if kept_x != kept_y {
        return Err(format!("not a channel product ({})", op.axes));
    }
    let pixels = x.shape[axis + 1..]
        .iter()
        .map(|d| d.to_usize().ok())
        .try_fold(1usize, |acc, d| d.map(|d| acc * d));
    match pixels {
        Some(p) if p >= min_pixels => {}
        Some(p) => return Err(format!("{p} pixels")),
        None => return Err("symbolic pixel count".into()),
    }
    let k = x.shape[axis]
        .to_usize()
        .map_err(|_| "symbolic channel count")?;
    let o = w.len() / k.max(1);
    let weights = f32_values(&w).ok_or("weights are not f32")?;
    if weights.len() != o * k || o == 0 {
        return Err(format!("{} weights for {k} input channels", weights.len()));
    }
    let out = ya
        .iter()
        .zip(y.shape.iter())
        .map(|(c, d)| match xa.iter().position(|x| x == c) {
            Some(i) => Ok(OutAxis::Input(i)),
            None if *c == o_axis => Ok(OutAxis::Fixed(o)),
            None if one(d) => Ok(OutAxis::Fixed(1)),
            None => Err(format!("output axis {c} of {d} is not the input's")),
        })
        .collect::<Result<_, String>>()?;
    Ok(Product {
        x_input,
        axis,
        o,
        k,
        weights,
        transposed: wa[0] == k_axis,
        out,
        o_pos: ya.iter().position(|c| *c == o_axis).expect("kept above"),
    })
}

/// The bias `id`'s output gets, if its sole reader adds one constant per channel (on output
/// axis `axis`), or one for all: the bias and the `Add`.
pub(crate) fn bias_after(
    model: &TypedModel,
    id: usize,
    axis: usize,
    o: usize,
) -> Option<(Vec<f32>, usize)> {
    let outlet = OutletId::new(id, 0);
    if model.output_outlets().ok()?.contains(&outlet) {
        return None;
    }
    let next = model.single_succ(id).ok()??;
    if !next.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()) {
        return None;
    }
    let [a, b] = next.inputs[..] else {
        return None;
    };
    let other = if a == outlet { b } else { a };
    let here = model.outlet_fact(outlet).ok()?;
    let konst = model.outlet_fact(other).ok()?.konst.clone()?;
    if model.outlet_fact(next.id.into()).ok()?.shape != here.shape {
        return None;
    }
    let values = f32_values(&konst)?;
    let shape = konst.shape();
    // Right-aligned against the output: `o` on the channel axis, ones elsewhere.
    let offset = here.rank().checked_sub(shape.len())?;
    let per_channel = shape
        .iter()
        .enumerate()
        .all(|(i, &d)| d == 1 || (i + offset == axis && d == o));
    match values.len() {
        1 => Some((vec![values[0]; o], next.id)),
        n if n == o && per_channel => Some((values, next.id)),
        _ => None,
    }
}

/// Replaces every f32 1×1 convolution product the kernel covers; returns how many.
/// `TERN_NO_POINTWISE=1` leaves them all to tract (for comparisons: the rest of Tern's float
/// kernels stay, unlike with `float_kernels` off).
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    if !kernel::available() || std::env::var_os("TERN_NO_POINTWISE").is_some() {
        return Ok(0);
    }
    let candidates: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<EinSum>())
        .map(|n| n.id)
        .collect();
    let mut fused = 0;
    for id in candidates {
        let node = model.node(id);
        let op = node.op_as::<EinSum>().expect("filtered above");
        let p = match product(model, node, op, MIN_PIXELS) {
            Ok(p) => p,
            Err(why) => {
                log::trace!("{}: stays with tract's product ({why})", node.name);
                continue;
            }
        };
        let mut absorbed = vec![];
        let bias = match bias_after(model, id, p.o_pos, p.o) {
            Some((bias, add)) => {
                absorbed.push(add);
                bias
            }
            None => vec![0.0; p.o],
        };
        let (act, more) = activation_after(model, absorbed.last().copied().unwrap_or(id));
        absorbed.extend(more);
        let weights = PwWeights::pack(Isa::detect(), p.o, p.k, &p.weights, p.transposed, &bias);
        let op = PwConv {
            weights: Arc::new(weights),
            act,
            axis: p.axis,
            out: p.out,
        };
        replace_run(model, id, p.x_input, &absorbed, op)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::str::FromStr;

    use crate::int8::Lcg;
    use crate::testing::{assert_outputs_close, random_tensor};
    use tract_onnx::tract_core::axes::AxesMapping;
    use tract_onnx::tract_core::ops::{math, nn};

    fn random(rng: &mut Lcg, shape: &[usize]) -> TractResult<Tensor> {
        random_tensor(rng, shape, 1.0)
    }

    /// One case: the product's einsum, the input's shape, the bias's shape (if any), what
    /// follows the bias, and when the kernel takes the product, the activation it applies and
    /// the nodes it absorbs.
    type Case = (
        &'static str,
        &'static [usize],
        Option<&'static [usize]>,
        &'static str,
        Option<(FloatAct, usize)>,
    );

    fn check(&(spec, x_shape, bias_shape, after, placed): &Case) -> TractResult<()> {
        let name = format!("{spec} {x_shape:?} {bias_shape:?} {after}");
        let mut rng = Lcg(x_shape.iter().product::<usize>() as u64);
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact(x_shape))?;
        let axes = AxesMapping::from_str(spec)?;
        let (inputs, _) = axes.to_strs();
        let k_char = inputs[1]
            .chars()
            .find(|c| inputs[0].contains(*c))
            .expect("a summed axis");
        let k = x_shape[inputs[1].find(k_char).expect("summed axis")];
        let o = 7;
        let w_shape = if inputs[0].starts_with(k_char) {
            [k, o]
        } else {
            [o, k]
        };
        let w = m.add_const("w", random(&mut rng, &w_shape)?)?;
        let mut y = m.wire_node("product", EinSum::new(axes, f32::datum_type()), &[w, x])?[0];
        if let Some(shape) = bias_shape {
            let b = m.add_const("b", random(&mut rng, shape)?)?;
            y = m.wire_node("bias", math::add(), &[y, b])?[0];
        }
        let rank = m.outlet_fact(y)?.rank();
        let scalar = |m: &mut TypedModel, name: &str, v: f32| {
            m.add_const(name, Tensor::from_shape(&vec![1; rank], &[v])?)
        };
        let mut outputs = vec![];
        match after {
            "relu6" => {
                let zero = scalar(&mut m, "zero", 0.0)?;
                let six = scalar(&mut m, "six", 6.0)?;
                let r = m.wire_node("relu", math::max(), &[y, zero])?[0];
                outputs.push(m.wire_node("relu6", math::min(), &[r, six])?[0]);
            }
            "hard-swish" => outputs.push(m.wire_node("hs", nn::hard_swish(), &[y])?[0]),
            "output and relu" => {
                let zero = scalar(&mut m, "zero", 0.0)?;
                outputs.push(y);
                outputs.push(m.wire_node("relu", math::max(), &[y, zero])?[0]);
            }
            _ => outputs.push(y),
        }
        m.select_output_outlets(&outputs)?;
        let input = random(&mut rng, x_shape)?;
        let want = m
            .clone()
            .into_runnable()?
            .run(tvec![input.clone().into()])?;
        let before = m.nodes().len();
        let fused = fuse(&mut m)?;
        if !kernel::available() {
            assert_eq!(fused, 0, "{name}: no vector path, no placing");
            return Ok(());
        }
        assert_eq!(fused, placed.is_some() as usize, "{name}");
        if let Some((act, absorbed)) = placed {
            let op = m
                .nodes()
                .iter()
                .find_map(|n| n.op_as::<PwConv>())
                .expect("placed");
            assert_eq!(op.act, act, "{name}");
            let constants = m
                .nodes()
                .iter()
                .filter(|n| n.op_is::<tract_onnx::tract_core::ops::konst::Const>())
                .count();
            let bias = bias_shape.is_some() as usize;
            let constants_before =
                1 + bias + 2 * (after == "relu6") as usize + (after == "output and relu") as usize;
            // The product is now the op; what it absorbed and the constants only they read
            // are gone.
            assert_eq!(
                m.nodes().len(),
                before - absorbed - (constants_before - constants),
                "{name}"
            );
        }
        let got = m.into_runnable()?.run(tvec![input.into()])?;
        assert_outputs_close(&name, &got, &want)
    }

    /// 1×1 convolution products in the forms tract's declutter leaves (NCHW, CHW, a batch axis
    /// of 1 dropped or added, weights either way round) run on the kernel with their bias and
    /// activation and compute what tract's graph did; products the kernel does not cover stay.
    #[test]
    fn channel_products_are_placed_with_their_bias_and_activation() -> TractResult<()> {
        let relu6 = FloatAct::Clamp { lo: 0.0, hi: 6.0 };
        let none = FloatAct::None;
        // (einsum, input shape, bias shape, what follows, (activation, nodes absorbed) if placed)
        let cases: [Case; 10] = [
            (
                "oi,nihw->nohw",
                &[1, 5, 3, 4],
                Some(&[1, 7, 1, 1]),
                "relu6",
                Some((relu6, 3)),
            ),
            (
                "oi,ihw->ohw",
                &[5, 3, 4],
                Some(&[7, 1, 1]),
                "hard-swish",
                Some((FloatAct::HardSwish, 2)),
            ),
            ("io,nihw->nohw", &[2, 9, 4, 5], None, "", Some((none, 0))),
            (
                "oi,nihw->ohw",
                &[1, 5, 2, 9],
                Some(&[7, 1, 1]),
                "",
                Some((none, 1)),
            ),
            (
                "oi,ihw->nohw",
                &[3, 17, 1],
                Some(&[1, 1, 1, 1]),
                "relu6",
                Some((relu6, 3)),
            ),
            // A bias per pixel is not a convolution's: the Add stays, the product is placed.
            (
                "oi,nihw->nohw",
                &[1, 5, 3, 4],
                Some(&[1, 1, 3, 4]),
                "",
                Some((none, 0)),
            ),
            (
                "oi,nihw->nohw",
                &[1, 5, 3, 4],
                None,
                "output and relu",
                Some((none, 0)),
            ),
            // Too few pixels for the kernel's tiles.
            ("oi,nihw->nohw", &[1, 5, 2, 2], None, "", None),
            // Not a channel product: a pixel axis reordered, a fully connected layer.
            ("oi,nihw->nowh", &[1, 5, 3, 4], None, "", None),
            ("oi,ni->no", &[16, 5], None, "", None),
        ];
        for case in &cases {
            check(case)?;
        }
        Ok(())
    }

    #[test]
    fn wrong_channel_counts_are_an_error_and_empty_batches_empty() -> TractResult<()> {
        let op = PwConv {
            weights: Arc::new(PwWeights::pack(
                Isa::detect(),
                2,
                3,
                &[1.0; 6],
                false,
                &[0.0; 2],
            )),
            act: FloatAct::None,
            axis: 1,
            out: tvec![OutAxis::Input(0), OutAxis::Fixed(2), OutAxis::Input(2)],
        };
        let err = op.run(&Tensor::zero::<f32>(&[1, 4, 9])?).unwrap_err();
        assert!(err.to_string().contains("expected 3 channels"), "{err}");
        let err = op.run(&Tensor::zero::<f32>(&[1, 3])?).unwrap_err();
        assert!(err.to_string().contains("rank 2"), "{err}");
        let empty = op.run(&Tensor::zero::<f32>(&[0, 3, 9])?)?;
        assert_eq!(empty.shape(), &[0, 2, 9]);
        let y = op.run(&Tensor::from_shape(&[1, 3, 1], &[1.0f32, 2.0, 3.0])?)?;
        assert_eq!(y.try_as_plain_ram()?.as_slice::<f32>()?, &[6.0, 6.0]);
        Ok(())
    }
}
