//! Tern's direct f32 depthwise convolution, placed into tract's decluttered graph in place of
//! its `Conv` (NCHW, or CHW once tract has dropped a batch of 1).
//!
//! On float MobileNets half of a forward pass went to tract's depthwise path (zone scanning,
//! a generic loop on every border zone, one output at a time in the middle). Tern's kernel is
//! the one its int8 depthwise convolutions run on (`int8/kernels.rs`): each plane is padded
//! once and split by column phase, and blocks of 4 rows × 16 outputs accumulate every tap in
//! registers. The rewrite runs after tract's declutter, where weights and biases are constants
//! and the layout is final; a convolution the kernel does not cover stays with tract. The
//! activation that follows (ReLU, ReLU6, h-swish: every depthwise convolution of a MobileNet
//! has one) is applied as the kernel stores, instead of as a node of its own.

use std::cell::RefCell;
use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Max, Min};
use tract_onnx::tract_core::ops::nn::HardSwish;

use crate::int8::kernels::{self, DwFloatChannel, DwGeometry, DwScratch, FloatAct};

/// What the inspection says runs a convolution replaced here.
pub(crate) const KERNEL: &str = "Tern f32 depthwise kernel";

/// A 2-D depthwise convolution over f32 NCHW input, bias added, then an activation.
#[derive(Debug, Clone)]
pub(crate) struct DwConv {
    pool_spec: PoolSpec,
    /// `kh × kw` taps per channel.
    weights: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    act: FloatAct,
}

impl PartialEq for DwConv {
    fn eq(&self, other: &Self) -> bool {
        // Weights are shared, never rebuilt: the same op is the same allocation.
        Arc::ptr_eq(&self.weights, &other.weights)
            && Arc::ptr_eq(&self.bias, &other.bias)
            && self.pool_spec == other.pool_spec
            && self.act == other.act
    }
}

impl Eq for DwConv {}

impl DwConv {
    /// The op for a float tract `Conv` node, or why it stays with tract.
    fn from_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> Result<DwConv, String> {
        let spec = &conv.pool_spec;
        if spec.dilations().iter().any(|d| *d != 1) {
            return Err("dilated".into());
        }
        let channels = spec.input_channels;
        if conv.group != channels || spec.output_channels != channels {
            return Err("not depthwise".into());
        }
        let (weights, bias) = float_conv_constants(model, node, conv)?;
        let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
        if weights.len() != channels * kh * kw {
            return Err(format!(
                "{} weights for {channels} channels of {kh}×{kw}",
                weights.len()
            ));
        }
        Ok(DwConv {
            pool_spec: spec.clone(),
            weights: Arc::new(weights),
            bias: Arc::new(bias),
            act: FloatAct::None,
        })
    }

    /// The kernel and the activation it applies, as `tern inspect` shows them.
    pub(crate) fn describe(&self) -> String {
        with_activation(KERNEL, self.act)
    }

    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        let (n, c, h, w) = match (self.pool_spec.data_format, x.shape()) {
            (DataFormat::NCHW, &[n, c, h, w]) => (n, c, h, w),
            (DataFormat::CHW, &[c, h, w]) => (1, c, h, w),
            (format, shape) => bail!("expected a {format:?} input, got shape {shape:?}"),
        };
        ensure!(
            c == self.pool_spec.input_channels,
            "expected {} channels, got {c}",
            self.pool_spec.input_channels
        );
        // Planes are chunks below, and their sizes go into the padding arithmetic.
        ensure!(
            h > 0 && w > 0,
            "depthwise convolution of an empty {h}×{w} plane"
        );
        let pads = self.pool_spec.computed_padding(&[h, w]);
        let (kh, kw) = (
            self.pool_spec.kernel_shape[0],
            self.pool_spec.kernel_shape[1],
        );
        let g = DwGeometry {
            h,
            w,
            kh,
            kw,
            stride: (self.pool_spec.stride(0), self.pool_spec.stride(1)),
            pad: (
                pads[0].pad_before,
                pads[1].pad_before,
                pads[0].pad_after,
                pads[1].pad_after,
            ),
            oh: pads[0].convoluted,
            ow: pads[1].convoluted,
        };
        // SAFETY: the kernel writes every output element.
        let mut out = unsafe {
            match self.pool_spec.data_format {
                DataFormat::CHW => Tensor::uninitialized::<f32>(&[c, g.oh, g.ow])?,
                _ => Tensor::uninitialized::<f32>(&[n, c, g.oh, g.ow])?,
            }
        };
        if out.len() == 0 {
            return Ok(out);
        }
        let input = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let taps = kh * kw;
        let mut view = out.try_as_plain_ram_mut()?;
        let output = view.as_slice_mut::<f32>()?;
        let channel = |ix: usize| {
            let ch = ix % c;
            DwFloatChannel {
                weights: &self.weights[ch * taps..][..taps],
                bias: self.bias[ch],
                act: self.act,
            }
        };
        let (plane, out_plane) = (h * w, g.oh * g.ow);
        SCRATCH.with(|s| {
            let scratch = &mut *s.borrow_mut();
            // Planes of (image, channel) in order; small ones four at a time.
            let mut done = 0;
            if kernels::quad_fits(&g) {
                for (q, (xs, ys)) in input
                    .chunks_exact(4 * plane)
                    .zip(output.chunks_exact_mut(4 * out_plane))
                    .enumerate()
                {
                    let ix = 4 * q;
                    let cs = [
                        channel(ix),
                        channel(ix + 1),
                        channel(ix + 2),
                        channel(ix + 3),
                    ];
                    let mut xs = xs.chunks_exact(plane);
                    let mut ys = ys.chunks_exact_mut(out_plane);
                    let mut next_x = || xs.next().expect("four planes");
                    let planes = [next_x(), next_x(), next_x(), next_x()];
                    let mut next_y = || ys.next().expect("four planes");
                    let outs = [next_y(), next_y(), next_y(), next_y()];
                    kernels::depthwise_f32_quad(
                        &g,
                        planes,
                        [&cs[0], &cs[1], &cs[2], &cs[3]],
                        scratch,
                        outs,
                    );
                    done = ix + 4;
                }
            }
            for (ix, (x, y)) in input
                .chunks_exact(plane)
                .zip(output.chunks_exact_mut(out_plane))
                .enumerate()
                .skip(done)
            {
                kernels::depthwise_f32(&g, x, &channel(ix), scratch, y);
            }
        });
        Ok(out)
    }
}

thread_local! {
    /// Reused by every depthwise convolution run on this thread, so that steady-state requests
    /// allocate nothing here but the output tensor tract asks for.
    static SCRATCH: RefCell<DwScratch> = RefCell::new(DwScratch::default());
}

impl Op for DwConv {
    fn name(&self) -> StaticName {
        "TernDwConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}, {} channels",
            self.describe(),
            self.pool_spec.input_channels
        )])
    }

    op_as_typed_op!();
}

/// tract's `EvalOp` for Tern's one-input ops, whose `run` is the whole evaluation: stateless,
/// so tract calls it directly instead of keeping a state per run.
macro_rules! eval_one_input {
    ($op:ty) => {
        impl EvalOp for $op {
            op_out_of_plan!();

            fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
                let x = args_1!(inputs);
                Ok(tvec!(self.run(&x)?.into_tvalue()))
            }
        }
    };
}
pub(crate) use eval_one_input;

eval_one_input!(DwConv);

impl TypedOp for DwConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "TernDwConv takes one input");
        self.pool_spec.output_facts(inputs)
    }
}

/// The constants of a float 2-D OIHW convolution over NCHW (or CHW: tract's axis rewrites
/// drop a batch axis of 1) f32 input: its weights as stored and one bias per output channel;
/// or why it is not one.
pub(crate) fn float_conv_constants(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let spec = &conv.pool_spec;
    if conv.q_params.is_some() {
        return Err("quantized".into());
    }
    let rank = match spec.data_format {
        DataFormat::NCHW => 4,
        DataFormat::CHW => 3,
        other => return Err(format!("layout {other:?}")),
    };
    if conv.kernel_fmt != KernelFormat::OIHW {
        return Err(format!("kernel layout {:?}", conv.kernel_fmt));
    }
    if spec.rank() != 2 {
        return Err(format!("{}-D convolution", spec.rank()));
    }
    let fact = |ix: usize| -> Result<&TypedFact, String> {
        let outlet = node.inputs.get(ix).ok_or("missing input")?;
        model.outlet_fact(*outlet).map_err(|e| e.to_string())
    };
    if fact(0)?.datum_type != DatumType::F32 || fact(0)?.rank() != rank {
        return Err(format!("input is not a {rank}-D f32 tensor"));
    }
    let values = |ix: usize, what: &str| -> Result<Vec<f32>, String> {
        let konst = fact(ix)?
            .konst
            .clone()
            .ok_or_else(|| format!("{what} is not a constant"))?;
        if konst.datum_type() != DatumType::F32 {
            return Err(format!("{what} is {:?}", konst.datum_type()));
        }
        konst
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>().map(|s| s.to_vec()))
            .map_err(|e| e.to_string())
    };
    let o = spec.output_channels;
    let bias = match values(2, "the bias")? {
        b if b.len() == 1 => vec![b[0]; o],
        b if b.len() == o => b,
        b => return Err(format!("{} biases for {o} channels", b.len())),
    };
    Ok((values(1, "the weight")?, bias))
}

/// `kernel`, then the activation it applies, as `tern inspect` shows them.
pub(crate) fn with_activation(kernel: &str, act: FloatAct) -> String {
    match act {
        FloatAct::None => kernel.into(),
        FloatAct::Clamp { lo, hi } => format!("{kernel}, then clamped to [{lo}, {hi}]"),
        FloatAct::HardSwish => format!("{kernel}, then h-swish"),
    }
}

/// Replaces every float depthwise convolution the kernel covers; returns how many.
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    fuse_convs(model, |model, node, conv, act| {
        DwConv::from_conv(model, node, conv).map(|op| DwConv { act, ..op })
    })
}

/// Replaces every float `Conv` that `place` makes an op of, given the activation after it,
/// with the nodes of that activation; returns how many.
pub(crate) fn fuse_convs<O: TypedOp>(
    model: &mut TypedModel,
    place: impl Fn(&TypedModel, &TypedNode, &Conv, FloatAct) -> Result<O, String>,
) -> TractResult<usize> {
    let candidates: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_as::<Conv>().is_some_and(|c| c.q_params.is_none()))
        .map(|n| n.id)
        .collect();
    let mut fused = 0;
    for id in candidates {
        let node = model.node(id);
        let conv = node.op_as::<Conv>().expect("filtered above");
        let (act, absorbed) = activation_after(model, id);
        match place(model, node, conv, act) {
            Ok(op) => {
                replace_run(model, id, 0, &absorbed, op)?;
                fused += 1;
            }
            Err(why) => log::trace!("{}: stays with tract's conv ({why})", node.name),
        }
    }
    if fused > 0 {
        // Drops the weight and bias constants only the replaced convolutions read.
        model.compact()?;
    }
    Ok(fused)
}

/// Replaces node `id` and the run of nodes after it that `absorbed` lists (each the sole
/// reader of the one before) by `op`, reading `id`'s input `input`: what the last one fed, `op`
/// now feeds. Leaves the constants only they read for `compact`.
pub(crate) fn replace_run(
    model: &mut TypedModel,
    id: usize,
    input: usize,
    absorbed: &[usize],
    op: impl Into<Box<dyn TypedOp>>,
) -> TractResult<()> {
    let node = model.node(id);
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, node.inputs[input])?;
    let y = patch.wire_node(&node.name, op, &[x])?[0];
    let last = absorbed.last().copied().unwrap_or(id);
    patch.shunt_outside(model, last.into(), y)?;
    for &dead in std::iter::once(&id).chain(absorbed) {
        patch.obliterate(dead)?;
    }
    patch.apply(model)
}

/// The activation the node `id` feeds, and the nodes it takes: an h-swish, or a run of `Max`
/// and `Min` against one constant each (ReLU is `Max(x, 0)` once tract has decluttered it,
/// ReLU6 `Min(Max(x, 0), 6)`). Each node taken must be the sole reader of the one before and
/// keep its shape; an output of the model is not taken past.
pub(crate) fn activation_after(model: &TypedModel, id: usize) -> (FloatAct, Vec<usize>) {
    let mut act = FloatAct::None;
    let mut absorbed = vec![];
    let mut at = id;
    loop {
        let outlet = OutletId::new(at, 0);
        if model.output_outlets().is_ok_and(|o| o.contains(&outlet)) {
            break;
        }
        let Ok(Some(next)) = model.single_succ(at) else {
            break;
        };
        let same_shape = match (model.outlet_fact(outlet), model.outlet_fact(next.id.into())) {
            (Ok(a), Ok(b)) => a.shape == b.shape && b.datum_type == DatumType::F32,
            _ => false,
        };
        if !same_shape || next.outputs.len() != 1 {
            break;
        }
        let step = if next
            .op_as::<ElementWiseOp>()
            .is_some_and(|e| e.0.is::<HardSwish>())
        {
            // Nothing composes after h-swish in the store.
            (act == FloatAct::None).then_some(FloatAct::HardSwish)
        } else if let Some(bin) = next.op_as::<TypedBinOp>() {
            let bound = other_scalar(model, next, outlet);
            let (lo, hi) = match act {
                FloatAct::None => (f32::NEG_INFINITY, f32::INFINITY),
                FloatAct::Clamp { lo, hi } => (lo, hi),
                FloatAct::HardSwish => break,
            };
            match bound {
                Some(c) if bin.0.is::<Max>() => Some(FloatAct::Clamp {
                    lo: lo.max(c),
                    hi: hi.max(c),
                }),
                Some(c) if bin.0.is::<Min>() => Some(FloatAct::Clamp {
                    lo: lo.min(c),
                    hi: hi.min(c),
                }),
                _ => None,
            }
        } else {
            None
        };
        let Some(step) = step else {
            break;
        };
        act = step;
        absorbed.push(next.id);
        at = next.id;
    }
    (act, absorbed)
}

/// The constant, not NaN, single f32 that `node` combines with `from`, if its other input is one.
pub(crate) fn other_scalar(model: &TypedModel, node: &TypedNode, from: OutletId) -> Option<f32> {
    let [a, b] = node.inputs[..] else {
        return None;
    };
    let other = if a == from { b } else { a };
    if other == from || (a != from && b != from) {
        return None;
    }
    let konst = model.outlet_fact(other).ok()?.konst.clone()?;
    if konst.len() != 1 || konst.datum_type() != DatumType::F32 {
        return None;
    }
    let v = *konst
        .try_as_plain_ram()
        .ok()?
        .as_slice::<f32>()
        .ok()?
        .first()?;
    (!v.is_nan()).then_some(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::int8::Lcg;
    use tract_onnx::tract_core::ops::cnn::PaddingSpec;

    fn conv(pool_spec: PoolSpec, group: usize) -> Conv {
        Conv {
            pool_spec,
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        }
    }

    /// A 3×3 depthwise convolution over `c` channels, padded to keep its size.
    fn same_3x3(c: usize) -> PoolSpec {
        PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            dilations: None,
            strides: None,
            input_channels: c,
            output_channels: c,
        }
    }

    /// A one-conv graph through tract as it is and with the conv replaced: same outputs on
    /// random depthwise geometries (strides, explicit and `same` padding, 1-D kernels, scalar
    /// and per-channel bias, NCHW and CHW), and the replacement really happened.
    #[test]
    fn replaced_convolutions_give_tracts_outputs() -> TractResult<()> {
        let mut rng = Lcg(3);
        let value = |rng: &mut Lcg| (rng.unit() - 0.5) * 2.0;
        for case in 0..40 {
            let c = 1 + rng.below(6);
            let k = [1, 3, 5][rng.below(3)];
            let (kh, kw) = if case % 4 == 0 { (1, k) } else { (k, k) };
            let stride = 1 + rng.below(2);
            let padding = if case % 3 == 0 {
                PaddingSpec::SameUpper
            } else {
                PaddingSpec::Explicit(
                    tvec![rng.below(kh), rng.below(kw)],
                    tvec![rng.below(kh), rng.below(kw)],
                )
            };
            let (n, h, w) = (1 + rng.below(2), kh + rng.below(9), kw + rng.below(30));
            // As tract's axis rewrites leave a batch of 1: no batch axis at all.
            let chw = case % 5 == 1;
            let (n, shape) = if chw {
                (1, vec![c, h, w])
            } else {
                (n, vec![n, c, h, w])
            };
            let spec = PoolSpec {
                data_format: if chw {
                    DataFormat::CHW
                } else {
                    DataFormat::NCHW
                },
                kernel_shape: tvec![kh, kw],
                padding,
                dilations: None,
                strides: Some(tvec![stride, stride]),
                input_channels: c,
                output_channels: c,
            };
            let conv = conv(spec, c);
            let weights: Vec<f32> = (0..c * kh * kw).map(|_| value(&mut rng)).collect();
            // Per channel, or one scalar for all.
            let bias = if case % 2 == 0 {
                let b: Vec<f32> = (0..c).map(|_| value(&mut rng)).collect();
                Tensor::from_shape(&[c], &b)?
            } else {
                Tensor::from(value(&mut rng))
            };
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact(&shape))?;
            let kernel = tract_ndarray::Array4::from_shape_vec((c, 1, kh, kw), weights)?;
            let kernel = m.add_const("kernel", Tensor::from(kernel))?;
            let bias = m.add_const("bias", bias)?;
            let y = m.wire_node("conv", conv, &[x, kernel, bias])?;
            m.select_output_outlets(&y)?;
            let input: Vec<f32> = (0..n * c * h * w).map(|_| value(&mut rng)).collect();
            let input = Tensor::from_shape(&shape, &input)?;
            // Sums of up to 25 products of values in [-1, 1], in another order (and with FMA):
            // a few ulps of the largest partial sum apart.
            same_after(m, input, fuse, 1, 1e-5, &format!("case {case}"))?;
        }
        Ok(())
    }

    /// Runs the one-output graph `m` on `input` as tract plans it, then after `fuse` (which
    /// must replace `replaced` nodes): the outputs agree within `tolerance`.
    pub(crate) fn same_after(
        mut m: TypedModel,
        input: Tensor,
        fuse: fn(&mut TypedModel) -> TractResult<usize>,
        replaced: usize,
        tolerance: f32,
        case: &str,
    ) -> TractResult<()> {
        let want = m
            .clone()
            .into_runnable()?
            .run(tvec![input.clone().into()])?;
        assert_eq!(fuse(&mut m)?, replaced, "{case}");
        let got = m.into_runnable()?.run(tvec![input.into()])?;
        assert_eq!(got[0].shape(), want[0].shape(), "{case}");
        let got = got[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let want = want[0].try_as_plain_ram()?.as_slice::<f32>()?;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "{case}, output {i}: {g} vs {w}");
        }
        Ok(())
    }

    /// The activations after a depthwise convolution move into it when nothing else reads
    /// what they take; the graph computes what it did.
    #[test]
    fn activations_after_the_convolution_are_applied_as_it_stores() -> TractResult<()> {
        use tract_onnx::tract_core::ops::{math, nn};
        let (c, h, w) = (3, 7, 9);
        // (case, activation expected in the op, nodes taken besides the conv)
        let cases: [(&str, FloatAct, usize); 9] = [
            (
                "relu",
                FloatAct::Clamp {
                    lo: 0.0,
                    hi: f32::INFINITY,
                },
                1,
            ),
            ("relu6", FloatAct::Clamp { lo: 0.0, hi: 6.0 }, 2),
            (
                "min-first",
                FloatAct::Clamp {
                    lo: f32::NEG_INFINITY,
                    hi: 0.5,
                },
                1,
            ),
            ("hard-swish", FloatAct::HardSwish, 1),
            ("hard-swish then relu", FloatAct::HardSwish, 1),
            ("relu of an output", FloatAct::None, 0),
            ("max of two tensors", FloatAct::None, 0),
            ("conv read twice", FloatAct::None, 0),
            (
                "relu then a shared min",
                FloatAct::Clamp {
                    lo: 0.0,
                    hi: f32::INFINITY,
                },
                1,
            ),
        ];
        for (case, act, taken) in cases {
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact([1, c, h, w]))?;
            let mut rng = Lcg(5);
            let value = |rng: &mut Lcg| (rng.unit() - 0.5) * 8.0;
            let kernel: Vec<f32> = (0..c * 9).map(|_| value(&mut rng) / 4.0).collect();
            let kernel = tract_ndarray::Array4::from_shape_vec((c, 1, 3, 3), kernel)?;
            let kernel = m.add_const("kernel", Tensor::from(kernel))?;
            let bias = m.add_const("bias", Tensor::from_shape(&[c], &[0.5f32, -1.0, 2.0])?)?;
            let y = m.wire_node("conv", conv(same_3x3(c), c), &[x, kernel, bias])?[0];
            let scalar = |m: &mut TypedModel, name: &str, v: f32| {
                m.add_const(name, Tensor::from_shape(&[1, 1, 1, 1], &[v])?)
            };
            let zero = scalar(&mut m, "zero", 0.0)?;
            let six = scalar(&mut m, "six", 6.0)?;
            let half = scalar(&mut m, "half", 0.5)?;
            let mut outputs = vec![];
            match case {
                "relu" => outputs.push(m.wire_node("relu", math::max(), &[y, zero])?[0]),
                "relu6" => {
                    let r = m.wire_node("relu", math::max(), &[y, zero])?[0];
                    outputs.push(m.wire_node("relu6", math::min(), &[r, six])?[0]);
                }
                "min-first" => outputs.push(m.wire_node("min", math::min(), &[half, y])?[0]),
                "hard-swish" => outputs.push(m.wire_node("hs", nn::hard_swish(), &[y])?[0]),
                "hard-swish then relu" => {
                    let s = m.wire_node("hs", nn::hard_swish(), &[y])?[0];
                    outputs.push(m.wire_node("relu", math::max(), &[s, zero])?[0]);
                }
                "relu of an output" => {
                    outputs.push(y);
                    outputs.push(m.wire_node("relu", math::max(), &[y, zero])?[0]);
                }
                "max of two tensors" => {
                    outputs.push(m.wire_node("max", math::max(), &[y, x])?[0]);
                }
                "conv read twice" => {
                    outputs.push(m.wire_node("relu", math::max(), &[y, zero])?[0]);
                    outputs.push(m.wire_node("min", math::min(), &[y, six])?[0]);
                }
                "relu then a shared min" => {
                    let r = m.wire_node("relu", math::max(), &[y, zero])?[0];
                    outputs.push(m.wire_node("min", math::min(), &[r, six])?[0]);
                    outputs.push(m.wire_node("max", math::max(), &[r, half])?[0]);
                }
                _ => unreachable!(),
            }
            m.select_output_outlets(&outputs)?;
            let input: Vec<f32> = (0..c * h * w).map(|_| value(&mut rng)).collect();
            let input = Tensor::from_shape(&[1, c, h, w], &input)?;
            let want = m
                .clone()
                .into_runnable()?
                .run(tvec![input.clone().into()])?;
            let before = m.nodes().len();
            assert_eq!(fuse(&mut m)?, 1, "{case}");
            let op = m
                .nodes()
                .iter()
                .find_map(|n| n.op_as::<DwConv>())
                .expect("replaced");
            assert_eq!(op.act, act, "{case}");
            // The conv's weight and bias constants go with it, and every node taken.
            let unused = ["zero", "six", "half"]
                .iter()
                .filter(|k| !m.nodes().iter().any(|n| n.name == **k))
                .count();
            assert_eq!(m.nodes().len(), before - 2 - taken - unused, "{case}");
            let got = m.into_runnable()?.run(tvec![input.into()])?;
            assert_eq!(got.len(), want.len(), "{case}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.shape(), w.shape(), "{case}");
                let g = g.try_as_plain_ram()?.as_slice::<f32>()?;
                let w = w.try_as_plain_ram()?.as_slice::<f32>()?;
                for (i, (g, w)) in g.iter().zip(w).enumerate() {
                    assert!((g - w).abs() <= 1e-5, "{case}, output {i}: {g} vs {w}");
                }
            }
        }
        Ok(())
    }

    /// An empty batch gives an empty output; empty planes an error, not a panic.
    #[test]
    fn an_empty_batch_is_empty_and_empty_planes_are_an_error() -> TractResult<()> {
        let op = DwConv {
            pool_spec: same_3x3(2),
            weights: Arc::new(vec![1.0; 18]),
            bias: Arc::new(vec![0.5; 2]),
            act: FloatAct::None,
        };
        let y = op.run(&Tensor::zero::<f32>(&[0, 2, 5, 5])?)?;
        assert_eq!(y.shape(), [0, 2, 5, 5]);
        for shape in [[1, 2, 0, 5], [1, 2, 5, 0]] {
            let e = op.run(&Tensor::zero::<f32>(&shape)?).unwrap_err();
            assert!(e.to_string().contains("empty"), "{shape:?}: {e}");
        }
        Ok(())
    }

    /// Grouped but not depthwise, dilated, or computed weights: left to tract.
    #[test]
    fn convolutions_outside_the_kernel_stay_with_tract() -> TractResult<()> {
        let spec = |c_in: usize, c_out: usize, dilation: usize| PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::Valid,
            dilations: Some(tvec![dilation, dilation]),
            strides: None,
            input_channels: c_in,
            output_channels: c_out,
        };
        // (input channels, output channels, group, dilation, kernel is a graph input)
        for (c_in, c_out, group, dilation, computed) in [
            (4, 4, 2, 1, false),
            (4, 8, 4, 1, false),
            (4, 4, 4, 2, false),
            (4, 4, 4, 1, true),
        ] {
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact([1, c_in, 9, 9]))?;
            let shape = [c_out, c_in / group, 3, 3];
            let kernel = if computed {
                m.add_source("kernel", f32::fact(shape))?
            } else {
                m.add_const("kernel", Tensor::zero::<f32>(&shape)?)?
            };
            let bias = m.add_const("bias", Tensor::zero::<f32>(&[c_out])?)?;
            let conv = conv(spec(c_in, c_out, dilation), group);
            let y = m.wire_node("conv", conv, &[x, kernel, bias])?;
            m.select_output_outlets(&y)?;
            assert_eq!(
                fuse(&mut m)?,
                0,
                "{c_in}→{c_out} group {group} dilation {dilation}"
            );
        }
        Ok(())
    }
}
