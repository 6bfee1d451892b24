//! Small f32 convolutions (a network's stem: 3 input channels, 3×3 or 7×7, stride 2) as one
//! unrolled copy of the input and Tern's pointwise kernel, in place of tract's `Conv`.
//!
//! tract lowers such a convolution to a packed product whose input panels it computes from
//! the image as it goes (`LazyIm2col`), value by value: on MobileNetV3 x0.35 that stem was a
//! quarter of a forward pass for 2% of its multiply-adds. Written out once (`c · kh · kw` rows
//! of output pixels, zeros where the window leaves the image), the product is what the
//! pointwise kernel computes, activation included. Only convolutions with few rows
//! ([`MAX_ROWS`]) are taken: the copy is as large as the input times the taps, and for deep
//! convolutions tract's blocking of the sum is the better plan.

use std::cell::RefCell;
use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::dwconv::{float_conv_constants, fuse_convs, with_activation};
use crate::int8::kernels::FloatAct;
use crate::pwconv::kernel::{self, Isa, PwWeights};

/// What the inspection says runs a convolution replaced here.
pub(crate) const KERNEL: &str = "Tern f32 unrolled-window kernel";

/// Rows of the unrolled input (`c · kh · kw`) at most: 3 channels of 7×7, 32 of 3×3.
const MAX_ROWS: usize = 288;

/// A 2-D convolution over f32 NCHW (or CHW) input, bias added, then an activation.
#[derive(Debug, Clone)]
pub(crate) struct Im2colConv {
    pool_spec: PoolSpec,
    weights: Arc<PwWeights>,
    act: FloatAct,
}

impl PartialEq for Im2colConv {
    fn eq(&self, other: &Self) -> bool {
        // Weights are shared, never rebuilt: the same op is the same allocation.
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.pool_spec == other.pool_spec
            && self.act == other.act
    }
}

impl Eq for Im2colConv {}

/// Where one output's window starts and how it steps, per spatial axis.
#[derive(Clone, Copy)]
struct Axis {
    size: usize,
    out: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
}

impl Axis {
    /// The input position of output `o`'s tap `t`, if inside the image.
    fn at(&self, o: usize, t: usize) -> Option<usize> {
        (o * self.stride + t * self.dilation)
            .checked_sub(self.pad)
            .filter(|i| *i < self.size)
    }
}

impl Im2colConv {
    fn from_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> Result<Im2colConv, String> {
        let spec = &conv.pool_spec;
        if conv.group != 1 {
            return Err("grouped".into());
        }
        let (c, o) = (spec.input_channels, spec.output_channels);
        let rows = c * spec.kernel_shape.iter().product::<usize>();
        if rows > MAX_ROWS {
            return Err(format!("{rows} unrolled rows"));
        }
        let (weights, bias) = float_conv_constants(model, node, conv)?;
        if weights.len() != o * rows {
            return Err(format!("{} weights for {o} × {rows}", weights.len()));
        }
        // OIHW is already `o` rows of `c · kh · kw`, in the unrolled rows' order.
        let weights = PwWeights::pack(Isa::detect(), o, rows, &weights, false, &bias);
        Ok(Im2colConv {
            pool_spec: spec.clone(),
            weights: Arc::new(weights),
            act: FloatAct::None,
        })
    }

    pub(crate) fn describe(&self) -> String {
        with_activation(KERNEL, self.act)
    }

    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        let spec = &self.pool_spec;
        let (n, c, h, w) = match (spec.data_format, x.shape()) {
            (DataFormat::NCHW, &[n, c, h, w]) => (n, c, h, w),
            (DataFormat::CHW, &[c, h, w]) => (1, c, h, w),
            (format, shape) => bail!("expected a {format:?} input, got shape {shape:?}"),
        };
        ensure!(
            c == spec.input_channels,
            "expected {} channels, got {c}",
            spec.input_channels
        );
        // Planes are chunks below; padding alone could give an empty plane outputs.
        ensure!(h > 0 && w > 0, "convolution of an empty {h}×{w} plane");
        let pads = spec.computed_padding(&[h, w]);
        let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
        let axis = |i: usize, size: usize| Axis {
            size,
            out: pads[i].convoluted,
            stride: spec.stride(i),
            dilation: spec.dilation(i),
            pad: pads[i].pad_before,
        };
        let (ay, ax) = (axis(0, h), axis(1, w));
        let o = spec.output_channels;
        // SAFETY: the kernel writes every output element.
        let mut out = unsafe {
            match spec.data_format {
                DataFormat::CHW => Tensor::uninitialized::<f32>(&[o, ay.out, ax.out])?,
                _ => Tensor::uninitialized::<f32>(&[n, o, ay.out, ax.out])?,
            }
        };
        if out.len() == 0 {
            return Ok(out);
        }
        let input = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut view = out.try_as_plain_ram_mut()?;
        let output = view.as_slice_mut::<f32>()?;
        let pixels = ay.out * ax.out;
        let rows = c * kh * kw;
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            s.unrolled.resize(rows * pixels, 0.0);
            for (x, y) in input
                .chunks_exact(c * h * w)
                .zip(output.chunks_exact_mut(o * pixels))
            {
                unroll(x, (kh, kw), ay, ax, s);
                kernel::pointwise_f32(&self.weights, self.act, &s.unrolled, pixels, y);
            }
        });
        Ok(out)
    }
}

/// Writes the `c · kh · kw` rows of one image's windows: row `(ch, ty, tx)` holds, for every
/// output pixel, the input under that tap (zero outside the image). Each plane is first split
/// by column phase (`stride` phases), so that every tap's run along an output row is one
/// contiguous copy.
fn unroll(x: &[f32], (kh, kw): (usize, usize), ay: Axis, ax: Axis, s: &mut Scratch) {
    let pixels = ay.out * ax.out;
    let stride = ax.stride;
    let width = ax.size.div_ceil(stride);
    let mut rows = s.unrolled.chunks_exact_mut(pixels);
    for plane in x.chunks_exact(ay.size * ax.size) {
        // Phase `ph` of input row `iy` at `(ph · h + iy) · width`.
        let split: &[f32] = if stride == 1 {
            plane
        } else {
            s.phases.resize(stride * ay.size * width, 0.0);
            for (iy, row) in plane.chunks_exact(ax.size).enumerate() {
                split_row(row, stride, &mut s.phases, |ph| (ph * ay.size + iy) * width);
            }
            &s.phases
        };
        for ty in 0..kh {
            for tx in 0..kw {
                let row = rows.next().expect("c · kh · kw rows, sized by the caller");
                // The outputs whose tap `tx` lands inside the row: a contiguous run.
                let first = (0..ax.out).find(|&o| ax.at(o, tx).is_some());
                let last = (0..ax.out).rev().find(|&o| ax.at(o, tx).is_some());
                for (oy, line) in row.chunks_exact_mut(ax.out).enumerate() {
                    let (Some(iy), Some(first), Some(last)) = (ay.at(oy, ty), first, last) else {
                        line.fill(0.0);
                        continue;
                    };
                    line[..first].fill(0.0);
                    line[last + 1..].fill(0.0);
                    let start = first * stride + tx * ax.dilation - ax.pad;
                    let (ph, off) = (start % stride, start / stride);
                    let from = (ph * ay.size + iy) * width + off;
                    line[first..=last].copy_from_slice(&split[from..][..last + 1 - first]);
                }
            }
        }
    }
}

/// Column `j · stride + ph` of `row` to `dst[at(ph) + j]`, for every phase `ph`.
fn split_row(row: &[f32], stride: usize, dst: &mut [f32], at: impl Fn(usize) -> usize) {
    #[cfg(target_arch = "x86_64")]
    if stride == 2 && crate::int8::kernels::simd::avx2() {
        // SAFETY: AVX2 and FMA detected; the kernel checks both runs fit `dst`.
        unsafe { crate::int8::kernels::avx2::split2_f32(row, dst, at(0), at(1)) };
        return;
    }
    for ph in 0..stride {
        let base = at(ph);
        for (j, v) in row.iter().skip(ph).step_by(stride).enumerate() {
            dst[base + j] = *v;
        }
    }
}

/// Scratch reused between runs.
#[derive(Default)]
struct Scratch {
    /// The unrolled rows of one image.
    unrolled: Vec<f32>,
    /// One plane split by column phase.
    phases: Vec<f32>,
}

thread_local! {
    /// Reused by every such convolution run on this thread: steady-state requests allocate
    /// nothing here but the output tensor tract asks for.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Op for Im2colConv {
    fn name(&self) -> StaticName {
        "TernIm2colConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}, {} → {} channels",
            self.describe(),
            self.pool_spec.input_channels,
            self.pool_spec.output_channels
        )])
    }

    op_as_typed_op!();
}

crate::dwconv::eval_one_input!(Im2colConv);

impl TypedOp for Im2colConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "TernIm2colConv takes one input");
        self.pool_spec.output_facts(inputs)
    }
}

/// Replaces every small float convolution the kernel covers; returns how many.
/// `TERN_NO_POINTWISE=1` leaves them to tract (for comparisons), as it does 1×1 products.
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    if !kernel::available() || std::env::var_os("TERN_NO_POINTWISE").is_some() {
        return Ok(0);
    }
    fuse_convs(model, |model, node, conv, act| {
        Im2colConv::from_conv(model, node, conv).map(|op| Im2colConv { act, ..op })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dwconv::tests::same_after;
    use crate::int8::Lcg;
    use tract_onnx::tract_core::ops::cnn::{KernelFormat, PaddingSpec};

    /// One random convolution graph: `c` input channels, an `o` × `c / group` × `kh` × `kw`
    /// kernel, and an input for it.
    fn graph(rng: &mut Lcg, case: usize, group: usize) -> TractResult<(TypedModel, Tensor)> {
        let value = |rng: &mut Lcg| (rng.unit() - 0.5) * 2.0;
        let c = group * (1 + rng.below(4));
        let o = group * (1 + rng.below(10));
        let (kh, kw) = [(3, 3), (1, 1), (7, 7), (1, 5), (3, 2)][case % 5];
        let stride = (1 + rng.below(3), 1 + rng.below(3));
        let dilation = (1 + rng.below(2), 1 + rng.below(2));
        let padding = match case % 3 {
            0 => PaddingSpec::SameUpper,
            1 => PaddingSpec::Valid,
            _ => PaddingSpec::Explicit(
                tvec![rng.below(kh + 1), rng.below(kw + 1)],
                tvec![rng.below(kh + 1), rng.below(kw + 1)],
            ),
        };
        let span = |k: usize, d: usize| (k - 1) * d + 1;
        let (h, w) = (
            span(kh, dilation.0) + rng.below(12),
            span(kw, dilation.1) + rng.below(40),
        );
        let chw = case % 4 == 1;
        let n = if chw { 1 } else { 1 + rng.below(2) };
        let shape = if chw { vec![c, h, w] } else { vec![n, c, h, w] };
        let spec = PoolSpec {
            data_format: if chw {
                DataFormat::CHW
            } else {
                DataFormat::NCHW
            },
            kernel_shape: tvec![kh, kw],
            padding,
            dilations: Some(tvec![dilation.0, dilation.1]),
            strides: Some(tvec![stride.0, stride.1]),
            input_channels: c,
            output_channels: o,
        };
        let conv = Conv {
            pool_spec: spec,
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        };
        let per_group = c / group;
        let weights: Vec<f32> = (0..o * per_group * kh * kw).map(|_| value(rng)).collect();
        let bias = if case.is_multiple_of(2) {
            let b: Vec<f32> = (0..o).map(|_| value(rng)).collect();
            Tensor::from_shape(&[o], &b)?
        } else {
            Tensor::from(value(rng))
        };
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact(&shape))?;
        let kernel = Tensor::from_shape(&[o, per_group, kh, kw], &weights)?;
        let kernel = m.add_const("kernel", kernel)?;
        let bias = m.add_const("bias", bias)?;
        let y = m.wire_node("conv", conv, &[x, kernel, bias])?;
        m.select_output_outlets(&y)?;
        let input: Vec<f32> = (0..n * c * h * w).map(|_| value(rng)).collect();
        Ok((m, Tensor::from_shape(&shape, &input)?))
    }

    /// Random small convolutions (kernels from 1×1 to 7×7, strides up to 3, dilations,
    /// `same`, `valid` and explicit padding, NCHW and CHW, batches of 1 and 2) give tract's
    /// outputs once unrolled onto the pointwise kernel.
    #[test]
    fn unrolled_convolutions_give_tracts_outputs() -> TractResult<()> {
        let mut rng = Lcg(11);
        let placed = kernel::available() as usize;
        for case in 0..60 {
            let (m, input) = graph(&mut rng, case, 1)?;
            // Sums of up to 196 products of values in [-1, 1], in another order.
            same_after(m, input, fuse, placed, 1e-4, &format!("case {case}"))?;
        }
        Ok(())
    }

    /// Wrong channel counts and empty planes are errors, not panics; an empty batch is empty.
    #[test]
    fn bad_inputs_are_errors() -> TractResult<()> {
        let (mut m, _) = graph(&mut Lcg(13), 2, 1)?;
        if fuse(&mut m)? == 0 {
            return Ok(());
        }
        let op = m
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<Im2colConv>())
            .expect("placed");
        let c = op.pool_spec.input_channels;
        let err = op
            .run(&Tensor::zero::<f32>(&[1, c + 1, 9, 9])?)
            .unwrap_err();
        assert!(err.to_string().contains("channels"), "{err}");
        let err = op.run(&Tensor::zero::<f32>(&[1, c, 0, 9])?).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let empty = op.run(&Tensor::zero::<f32>(&[0, c, 9, 9])?)?;
        assert_eq!(empty.len(), 0);
        Ok(())
    }

    /// Grouped convolutions and those with more unrolled rows than the limit stay tract's.
    #[test]
    fn grouped_and_deep_convolutions_stay_with_tract() -> TractResult<()> {
        let mut rng = Lcg(12);
        let (m, input) = graph(&mut rng, 0, 2)?;
        same_after(m, input, fuse, 0, 1e-5, "grouped")?;
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 33, 5, 5]))?;
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: None,
            input_channels: 33,
            output_channels: 2,
        };
        let conv = Conv {
            pool_spec: spec,
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let kernel = m.add_const("kernel", Tensor::zero::<f32>(&[2, 33, 3, 3])?)?;
        let bias = m.add_const("bias", Tensor::from(1.0f32))?;
        let y = m.wire_node("conv", conv, &[x, kernel, bias])?;
        m.select_output_outlets(&y)?;
        assert_eq!(fuse(&mut m)?, 0, "33 · 3 · 3 rows");
        Ok(())
    }
}
