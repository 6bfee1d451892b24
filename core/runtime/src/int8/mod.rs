//! Tern's fused int8 convolutions, placed into tract's graph in place of its quantized `Conv`.
//!
//! tract lowers a quantized convolution to im2col, an int8 matrix product, zero-point
//! correction sums and a chain of element-wise requantization ops; on small layers the chain
//! costs more than the product. [`QConv`] is one node doing all of it: activations go in and
//! out as 8-bit values, weights are prepared once at load (zero point subtracted, packed for the
//! kernel), and requantization happens in the kernel's last step. Depthwise convolutions get a
//! direct kernel; every other shape goes through one integer GEMM.
//!
//! The rewrite runs on the typed graph before tract's declutter (which would otherwise turn
//! 1×1 convolutions into generic `EinSum`s), after constant propagation so that weights and
//! quantization parameters are plain constants. A convolution whose parameters are not
//! constant, or whose layout the kernels do not cover, stays with tract.

pub(crate) mod kernels;
mod lut;
mod quantize;

pub(crate) use lut::fuse as fuse_islands;
use lut::Lut;
pub(crate) use quantize::fix as fix_quantize;

use std::cell::RefCell;
use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use kernels::{DwChannel, DwGeometry, DwInput, DwScratch, Epilogue, PackedA, PackedA4, Requant};

/// Which kernel a fused convolution runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Depthwise,
    Pointwise,
    Im2col,
}

impl Kernel {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kernel::Depthwise => "Tern int8 depthwise kernel",
            Kernel::Pointwise => "Tern int8 GEMM (pointwise)",
            Kernel::Im2col => "Tern int8 GEMM (im2col)",
        }
    }
}

#[derive(Debug, Clone)]
enum Weights {
    /// Per channel, `kh × kw` taps minus the zero point (exact in f32).
    Depthwise(Arc<Vec<f32>>),
    /// One packed matrix per group.
    Gemm(Arc<Vec<PackedA>>),
    /// One packed matrix per group for the dot-product kernels, and the bias with the input
    /// zero point's term folded in.
    Gemm4(Arc<Vec<PackedA4>>, Arc<Vec<i32>>),
}

/// A quantized 2-D convolution (NCHW, OIHW weights) with requantization fused in.
#[derive(Debug, Clone)]
pub(crate) struct QConv {
    pool_spec: PoolSpec,
    group: usize,
    kernel: Kernel,
    weights: Weights,
    bias: Arc<Vec<i32>>,
    /// `x_scale · w_scale[c] / y_scale`, per output channel.
    scale: Arc<Vec<f32>>,
    /// XOR that turns the input's bytes unsigned (0x80 for i8 input).
    flip: u8,
    /// Input zero point in the unsigned representation.
    x0: i32,
    requant: Requant,
    /// A table of one byte (an activation such as h-swish) applied to every stored output,
    /// folded in from the `TernLut` that was the output's only reader.
    post: Option<Arc<[u8; 256]>>,
    out_dt: DatumType,
}

impl PartialEq for QConv {
    fn eq(&self, other: &Self) -> bool {
        // Prepared weights are shared, never rebuilt: the same op is the same allocation.
        let same_weights = match (&self.weights, &other.weights) {
            (Weights::Depthwise(a), Weights::Depthwise(b)) => Arc::ptr_eq(a, b),
            (Weights::Gemm(a), Weights::Gemm(b)) => Arc::ptr_eq(a, b),
            (Weights::Gemm4(a, _), Weights::Gemm4(b, _)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_weights
            && self.pool_spec == other.pool_spec
            && self.group == other.group
            && Arc::ptr_eq(&self.bias, &other.bias)
            && Arc::ptr_eq(&self.scale, &other.scale)
            && self.x0 == other.x0
            && self.flip == other.flip
            && self.requant == other.requant
            && self.post == other.post
            && self.out_dt == other.out_dt
    }
}

impl Eq for QConv {}

impl QConv {
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Whether a table was folded into the outputs.
    pub(crate) fn has_table(&self) -> bool {
        self.post.is_some()
    }

    /// The fused op for a quantized tract `Conv` node, or why it stays with tract.
    fn from_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> Result<QConv, String> {
        let spec = &conv.pool_spec;
        if spec.data_format != DataFormat::NCHW || conv.kernel_fmt != KernelFormat::OIHW {
            return Err("layout is not NCHW/OIHW".into());
        }
        if spec.rank() != 2 {
            return Err(format!("{}-D convolution", spec.rank()));
        }
        let out_dt = conv.q_params.ok_or("not quantized")?;
        let requant_range = match out_dt.unquantized() {
            DatumType::U8 => (0, 255),
            DatumType::I8 => (-128, 127),
            other => return Err(format!("output type {other:?}")),
        };
        let fact = |ix: usize| -> Result<&TypedFact, String> {
            let outlet = node.inputs.get(ix).ok_or("missing input")?;
            model.outlet_fact(*outlet).map_err(|e| e.to_string())
        };
        let konst = |ix: usize, what: &str| -> Result<Arc<Tensor>, String> {
            fact(ix)?
                .konst
                .clone()
                .ok_or_else(|| format!("{what} is not a constant"))
        };
        let flip = match fact(0)?.datum_type.unquantized() {
            DatumType::U8 => 0,
            DatumType::I8 => 0x80,
            other => return Err(format!("input type {other:?}")),
        };
        let i32s = values::<i32>;
        let f32s = values::<f32>;
        let scalar_i = |ix: usize, what: &str| -> Result<i32, String> {
            match i32s(&*konst(ix, what)?)?.as_slice() {
                [v] => Ok(*v),
                _ => Err(format!("{what} is not per-tensor")),
            }
        };
        let scalar_f = |ix: usize, what: &str| -> Result<f32, String> {
            match f32s(&*konst(ix, what)?)?.as_slice() {
                [v] => Ok(*v),
                _ => Err(format!("{what} is not per-tensor")),
            }
        };
        let kernel = konst(1, "the weight")?;
        let &[cout, cin_g, kh, kw] = kernel.shape() else {
            return Err("weight is not OIHW".into());
        };
        let group = conv.group;
        let cin = cin_g * group;
        if cout % group != 0 || spec.input_channels != cin || spec.output_channels != cout {
            return Err("inconsistent channel counts".into());
        }
        let per_channel = |v: Vec<i32>, what: &str| -> Result<Vec<i32>, String> {
            match v.len() {
                1 => Ok(vec![v[0]; cout]),
                n if n == cout => Ok(v),
                _ => Err(format!("{what} has {} values for {cout} channels", v.len())),
            }
        };
        let bias = per_channel(i32s(&*konst(2, "the bias")?)?, "bias")?;
        let x0 = scalar_i(3, "the input zero point")? + if flip != 0 { 128 } else { 0 };
        let x_scale = scalar_f(4, "the input scale")?;
        let w0 = per_channel(
            i32s(&*konst(5, "the weight zero point")?)?,
            "weight zero point",
        )?;
        let w_scale = f32s(&*konst(6, "the weight scale")?)?;
        let w_scale = match w_scale.len() {
            1 => vec![w_scale[0]; cout],
            n if n == cout => w_scale,
            n => return Err(format!("weight scale has {n} values for {cout} channels")),
        };
        let y0 = scalar_i(7, "the output zero point")?;
        let y_scale = scalar_f(8, "the output scale")?;
        // onnxruntime's multiplier, computed in the same order.
        let scale: Vec<f32> = w_scale.iter().map(|ws| x_scale * ws / y_scale).collect();
        if scale.iter().any(|s| !s.is_finite()) {
            return Err("scales give a non-finite multiplier".into());
        }
        let w = i32s(&kernel)?;
        let taps = kh * kw;
        let per_out = cin_g * taps;
        let w: Vec<i32> = w
            .chunks(per_out)
            .zip(&w0)
            .flat_map(|(row, z)| row.iter().map(move |v| v - z))
            .collect();
        if w.iter().any(|v| !(-255..=255).contains(v)) {
            return Err("weights minus zero point exceed 8 bits".into());
        }
        let dilated = spec.dilations().iter().any(|d| *d != 1);
        let depthwise = group == cin && group == cout && !dilated;
        let (kernel_kind, weights) = if depthwise && taps <= kernels::MAX_EXACT_TAPS {
            (
                Kernel::Depthwise,
                Weights::Depthwise(Arc::new(w.iter().map(|v| *v as f32).collect())),
            )
        } else if per_out <= kernels::MAX_GEMM_K {
            let cout_g = cout / group;
            let w16: Vec<i16> = w.iter().map(|v| *v as i16).collect();
            let groups = w16.chunks(cout_g * per_out);
            // The dot-product kernels where the CPU has them and every weight fits an i8.
            let quads: Option<Vec<PackedA4>> = kernels::dot4_available()
                .then(|| {
                    groups
                        .clone()
                        .map(|g| PackedA4::pack(g, cout_g, per_out))
                        .collect()
                })
                .flatten();
            // A 1×1 kernel at stride 1 reads each input value once: no im2col needed, unless
            // explicit padding adds rows of zero points.
            let pointwise =
                taps == 1 && spec.strides().iter().all(|s| *s == 1) && unpadded(&spec.padding);
            let kind = if pointwise {
                Kernel::Pointwise
            } else {
                Kernel::Im2col
            };
            let weights = match quads {
                Some(quads) => {
                    let bias4 = quads
                        .iter()
                        .zip(bias.chunks(cout_g))
                        .flat_map(|(a, b)| a.corrected_bias(b, x0))
                        .collect();
                    Weights::Gemm4(Arc::new(quads), Arc::new(bias4))
                }
                None => Weights::Gemm(Arc::new(
                    groups.map(|g| PackedA::pack(g, cout_g, per_out)).collect(),
                )),
            };
            (kind, weights)
        } else {
            return Err(format!("reduction of {per_out} is too long for i32 sums"));
        };
        Ok(QConv {
            pool_spec: spec.clone(),
            group,
            kernel: kernel_kind,
            weights,
            bias: Arc::new(bias),
            scale: Arc::new(scale),
            flip,
            x0,
            requant: Requant {
                y0,
                lo: requant_range.0,
                hi: requant_range.1,
            },
            post: None,
            out_dt,
        })
    }

    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        let &[n, c, h, w] = x.shape() else {
            bail!("expected an NCHW input, got shape {:?}", x.shape());
        };
        ensure!(
            c == self.pool_spec.input_channels,
            "expected {} channels, got {c}",
            self.pool_spec.input_channels
        );
        let pads = self.pool_spec.computed_padding(&[h, w]);
        let (oh, ow) = (pads[0].convoluted, pads[1].convoluted);
        let cout = self.pool_spec.output_channels;
        // SAFETY: both kernels write every output element.
        let mut out = unsafe { Tensor::uninitialized_dt(self.out_dt, &[n, cout, oh, ow])? };
        let input = x.as_bytes();
        let output = out.as_bytes_mut();
        let (sy, sx) = (self.pool_spec.stride(0), self.pool_spec.stride(1));
        let kshape = &self.pool_spec.kernel_shape;
        let (kh, kw) = (kshape[0], kshape[1]);
        let (pt, pb) = (pads[0].pad_before, pads[0].pad_after);
        let (pl, pr) = (pads[1].pad_before, pads[1].pad_after);
        SCRATCH.with(|s| {
            let scratch = &mut *s.borrow_mut();
            match &self.weights {
                Weights::Depthwise(weights) => {
                    let g = DwGeometry {
                        h,
                        w,
                        kh,
                        kw,
                        stride: (sy, sx),
                        pad: (pt, pl, pb, pr),
                        oh,
                        ow,
                    };
                    let taps = kh * kw;
                    for b in 0..n {
                        for ch in 0..c {
                            let plane = &input[(b * c + ch) * h * w..][..h * w];
                            let dst = &mut output[(b * cout + ch) * oh * ow..][..oh * ow];
                            let x = DwInput {
                                plane,
                                flip: self.flip,
                                x0: self.x0,
                            };
                            let channel = DwChannel {
                                weights: &weights[ch * taps..][..taps],
                                bias: self.bias[ch],
                                scale: self.scale[ch],
                            };
                            kernels::depthwise(
                                &g,
                                &x,
                                &channel,
                                &self.requant,
                                &mut scratch.dw,
                                dst,
                            );
                            self.apply_post(dst);
                        }
                    }
                }
                Weights::Gemm(_) | Weights::Gemm4(..) => {
                    let cin_g = c / self.group;
                    let cout_g = cout / self.group;
                    let k = cin_g * kh * kw;
                    let cols = oh * ow;
                    let (dy, dx) = (self.pool_spec.dilation(0), self.pool_spec.dilation(1));
                    let Scratch {
                        cols: im2col,
                        phases,
                        packed,
                        packed4,
                        ..
                    } = scratch;
                    for b in 0..n {
                        for gi in 0..self.group {
                            let src = &input[(b * c + gi * cin_g) * h * w..][..cin_g * h * w];
                            // The k × cols matrix of bytes, and what makes them unsigned.
                            let (rows, flip) = if self.kernel == Kernel::Pointwise {
                                (src, self.flip)
                            } else {
                                let geo = Im2col {
                                    h,
                                    w,
                                    kh,
                                    kw,
                                    stride: (sy, sx),
                                    dilation: (dy, dx),
                                    pad: (pt, pl),
                                    oh,
                                    ow,
                                };
                                geo.fill(src, cin_g, (self.flip, self.x0 as u8), im2col, phases);
                                // Unsigned bytes already.
                                (&im2col[..], 0)
                            };
                            let first = gi * cout_g;
                            let dst = &mut output[(b * cout + first) * cols..][..cout_g * cols];
                            let scale = &self.scale[first..][..cout_g];
                            match &self.weights {
                                Weights::Gemm(a) => {
                                    kernels::pack_b(rows, k, cols, flip, self.x0 as i16, packed);
                                    let epilogue = Epilogue {
                                        bias: &self.bias[first..][..cout_g],
                                        scale,
                                        q: &self.requant,
                                    };
                                    kernels::gemm(&a[gi], packed, cols, &epilogue, dst);
                                }
                                Weights::Gemm4(a, bias) => {
                                    kernels::pack_b4(rows, k, cols, flip, packed4);
                                    let epilogue = Epilogue {
                                        bias: &bias[first..][..cout_g],
                                        scale,
                                        q: &self.requant,
                                    };
                                    kernels::gemm4(&a[gi], packed4, cols, &epilogue, dst);
                                }
                                Weights::Depthwise(_) => unreachable!("matched above"),
                            }
                            self.apply_post(dst);
                        }
                    }
                }
            }
        });
        Ok(out)
    }
}

impl QConv {
    /// The folded table over outputs just written, while they are still in cache.
    #[inline]
    fn apply_post(&self, out: &mut [u8]) {
        if let Some(table) = &self.post {
            kernels::lookup_in_place(table, out);
        }
    }
}

/// A constant's values converted to `T`.
fn values<T: Datum + Copy>(t: &Tensor) -> Result<Vec<T>, String> {
    let cast = t.cast_to::<T>().map_err(|e| e.to_string())?;
    cast.try_as_plain_ram()
        .and_then(|v| v.as_slice::<T>().map(|s| s.to_vec()))
        .map_err(|e| e.to_string())
}

/// Whether a 1×1, stride-1 convolution with this padding spec pads nothing.
fn unpadded(p: &PaddingSpec) -> bool {
    match p {
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, _) => {
            b.iter().chain(a.iter()).all(|v| *v == 0)
        }
        PaddingSpec::Valid | PaddingSpec::SameUpper | PaddingSpec::SameLower => true,
    }
}

/// Buffers reused by every fused convolution run on this thread, so that steady-state
/// requests allocate nothing here but the output tensor tract asks for.
#[derive(Default)]
struct Scratch {
    cols: Vec<u8>,
    /// One padded input plane split by column phase, for [`Im2col::fill`].
    phases: Vec<u8>,
    /// Activations packed for the dot-product kernels.
    packed4: Vec<u8>,
    packed: Vec<i16>,
    dw: DwScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct Im2col {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: (usize, usize),
    dilation: (usize, usize),
    pad: (usize, usize),
    oh: usize,
    ow: usize,
}

impl Im2col {
    /// Rows `(ci, ky, kx)`, columns `(oy, ox)` of unsigned bytes (`b ^ flip`), the zero point
    /// `x0` (unsigned) in the padding, so that [`kernels::pack_b`] subtracting `x0` makes the
    /// padding 0. Bytes, not values: half the memory of i16, and the packer's fast path.
    /// `phases` is scratch.
    fn fill(
        &self,
        src: &[u8],
        channels: usize,
        x: (u8, u8),
        out: &mut Vec<u8>,
        phases: &mut Vec<u8>,
    ) {
        if self.dilation == (1, 1) {
            self.fill_by_phase(src, channels, x, out, phases);
        } else {
            self.fill_strided(src, channels, x, out);
        }
    }

    /// Without dilation, each channel is first padded and split by column phase
    /// (`x % stride`), as the depthwise kernel does: every `(ky, kx, oy)` segment of an im2col
    /// row is then one contiguous copy of `ow` values, instead of a strided gather with a
    /// conversion per value (10% of a quantized MobileNet's time went to that gather, in its
    /// stride-2 stem).
    fn fill_by_phase(
        &self,
        src: &[u8],
        channels: usize,
        (flip, x0): (u8, u8),
        out: &mut Vec<u8>,
        phases: &mut Vec<u8>,
    ) {
        let (sy, sx) = self.stride;
        let (pt, pl) = self.pad;
        let cols = self.oh * self.ow;
        // Rows and columns any tap reads; the input beyond them is never used.
        let rows = (self.oh - 1) * sy + self.kh;
        let width = (self.kw - 1) / sx + self.ow;
        let phase_len = rows * width;
        // Every cell is written below.
        out.clear();
        out.resize(channels * self.kh * self.kw * cols, 0);
        let mut row_ix = 0;
        for ci in 0..channels {
            let plane = &src[ci * self.h * self.w..][..self.h * self.w];
            // Reset per channel: a phase cell is written only where input lands on it.
            phases.clear();
            phases.resize(sx * phase_len, x0);
            for y in 0..self.h {
                let py = y + pt;
                if py >= rows {
                    break;
                }
                let line = &plane[y * self.w..][..self.w];
                if sx == 2 {
                    // Even columns land in phase pl % 2 from column pl / 2, odd ones in the
                    // other phase from column ⌈pl / 2⌉.
                    let (p0, p1) = phases.split_at_mut(phase_len);
                    let (e, o) = if pl % 2 == 0 { (p0, p1) } else { (p1, p0) };
                    let row = py * width;
                    let even = &mut e[row..row + width][(pl / 2).min(width)..];
                    let odd = &mut o[row..row + width][pl.div_ceil(2).min(width)..];
                    kernels::deal2(line, flip, even, odd);
                    continue;
                }
                for phase in 0..sx {
                    // Column x lands in phase (x + pl) % sx, at (x + pl) / sx.
                    let first = (phase + sx - pl % sx) % sx;
                    let col0 = (first + pl) / sx;
                    if col0 >= width {
                        continue;
                    }
                    let dst = &mut phases[phase * phase_len + py * width..][col0..width];
                    let values = line.iter().skip(first).step_by(sx);
                    for (d, &b) in dst.iter_mut().zip(values) {
                        *d = b ^ flip;
                    }
                }
            }
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut out[row_ix * cols..][..cols];
                    row_ix += 1;
                    let phase = &phases[(kx % sx) * phase_len + kx / sx..];
                    for (oy, dst) in row.chunks_exact_mut(self.ow).enumerate() {
                        kernels::copy_row(dst, &phase[(oy * sy + ky) * width..]);
                    }
                }
            }
        }
    }

    /// Any dilation: a gather per output row.
    fn fill_strided(&self, src: &[u8], channels: usize, (flip, x0): (u8, u8), out: &mut Vec<u8>) {
        let cols = self.oh * self.ow;
        out.clear();
        out.resize(channels * self.kh * self.kw * cols, x0);
        let mut row_ix = 0;
        for ci in 0..channels {
            let plane = &src[ci * self.h * self.w..][..self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut out[row_ix * cols..][..cols];
                    row_ix += 1;
                    for oy in 0..self.oh {
                        let iy = (oy * self.stride.0 + ky * self.dilation.0) as isize
                            - self.pad.0 as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let line = &plane[iy as usize * self.w..][..self.w];
                        let dst = &mut row[oy * self.ow..][..self.ow];
                        // Outputs whose column falls inside the line: ix = ox·s + off.
                        let (s, off) = (
                            self.stride.1 as isize,
                            (kx * self.dilation.1) as isize - self.pad.1 as isize,
                        );
                        let first = if off >= 0 { 0 } else { (-off + s - 1) / s };
                        let end = ((self.w as isize - off + s - 1) / s).clamp(0, self.ow as isize);
                        if first >= end {
                            continue;
                        }
                        let start = (first * s + off) as usize;
                        let values = line[start..].iter().step_by(s as usize);
                        for (d, &b) in dst[first as usize..end as usize].iter_mut().zip(values) {
                            *d = b ^ flip;
                        }
                    }
                }
            }
        }
    }
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        "TernQConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let post = if self.post.is_some() {
            ", table on its outputs"
        } else {
            ""
        };
        let dot = if matches!(self.weights, Weights::Gemm4(..)) {
            ", dot-product instructions"
        } else {
            ""
        };
        Ok(vec![format!(
            "{} group {}{dot}{post}",
            self.kernel.describe(),
            self.group
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        Ok(tvec!(self.run(&x)?.into_tvalue()))
    }
}

impl TypedOp for QConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "TernQConv takes one input");
        let mut fact = self.pool_spec.output_facts(inputs)?.remove(0);
        fact.datum_type = self.out_dt;
        Ok(tvec!(fact))
    }
}

/// Replaces every quantized convolution the kernels cover; returns (node, kernel) for those.
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<Vec<(String, Kernel)>> {
    let candidates: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| {
            n.op_as::<Conv>()
                .is_some_and(|c| c.q_params.is_some_and(|dt| dt != DatumType::I32))
        })
        .map(|n| n.id)
        .collect();
    let mut fused = vec![];
    for id in candidates {
        let node = model.node(id);
        let conv = node.op_as::<Conv>().expect("filtered above");
        match QConv::from_conv(model, node, conv) {
            Ok(op) => {
                let kernel = op.kernel;
                let name = node.name.clone();
                let patch = TypedModelPatch::replace_single_op(model, node, &[node.inputs[0]], op)?;
                patch.apply(model)?;
                fused.push((name, kernel));
            }
            Err(why) => log::debug!("{}: stays with tract's quantized conv ({why})", node.name),
        }
    }
    Ok(fused)
}

/// Folds a one-byte table into the op that writes its input when the table is that output's
/// only reader: a fused convolution applies it to each output plane as it is stored, and a
/// table after a table becomes their composition. Each fold removes one op and one full pass
/// over a tensor (and its allocation) from every run. Returns how many tables were folded.
pub(crate) fn fold_tables(model: &mut TypedModel) -> TractResult<usize> {
    let outputs = model.output_outlets()?.to_vec();
    let mut folded = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(lut) = node.op_as::<Lut>() else {
            continue;
        };
        let src = node.inputs[0];
        if model.outlet_successors(src).len() != 1 || outputs.contains(&src) {
            continue;
        }
        let producer = model.node(src.node);
        let compose = |first: Option<&[u8; 256]>| -> Arc<[u8; 256]> {
            let mut t = [0u8; 256];
            for (i, v) in t.iter_mut().enumerate() {
                let mid = first.map_or(i as u8, |f| f[i]);
                *v = lut.table()[mid as usize];
            }
            Arc::new(t)
        };
        let op: Box<dyn TypedOp> = if let Some(conv) = producer.op_as::<QConv>() {
            let mut conv = conv.clone();
            conv.post = Some(compose(conv.post.as_deref()));
            conv.out_dt = lut.out_dt();
            Box::new(conv)
        } else if let Some(first) = producer.op_as::<Lut>() {
            Box::new(Lut::new(*compose(Some(first.table())), lut.out_dt()))
        } else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let mut taps = tvec![];
        for input in &producer.inputs {
            taps.push(patch.tap_model(model, *input)?);
        }
        let y = patch.wire_node(format!("{}.folded", node.name), op, &taps)?;
        patch.shunt_outside(model, OutletId::new(id, 0), y[0])?;
        patch.apply(model)?;
        folded += 1;
    }
    // Drops the ops the folds replaced.
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// A small deterministic generator for the kernels' tests, so a failure names a reproducible
/// case.
#[cfg(test)]
pub(crate) struct Lcg(pub(crate) u64);

#[cfg(test)]
impl Lcg {
    pub(crate) fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [0, 1): `next` gives 31 bits, so dividing it by `u32::MAX` would stop at 0.5
    /// and leave every value derived from it on one side of zero.
    pub(crate) fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u32 << 31) as f32
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
    pub(crate) fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luts(model: &TypedModel) -> usize {
        model.nodes().iter().filter(|n| n.op_is::<Lut>()).count()
    }

    /// Two tables in a row become their composition; a table whose input is also read
    /// elsewhere (here: a model output) stays.
    #[test]
    fn tables_in_a_row_fold_into_one_unless_the_middle_is_read_elsewhere() -> TractResult<()> {
        let mut rng = Lcg(7);
        let mut first = [0u8; 256];
        let mut second = [0u8; 256];
        for (a, b) in first.iter_mut().zip(second.iter_mut()) {
            (*a, *b) = (rng.byte(), rng.byte());
        }
        let input: Vec<u8> = (0..=255).collect();
        for middle_is_output in [false, true] {
            let mut m = TypedModel::default();
            let x = m.add_source("x", u8::datum_type().fact([16, 16]))?;
            let a = m.wire_node("a", Lut::new(first, DatumType::U8), &[x])?;
            let b = m.wire_node("b", Lut::new(second, DatumType::I8), &a)?;
            let outputs = if middle_is_output {
                vec![a[0], b[0]]
            } else {
                vec![b[0]]
            };
            m.select_output_outlets(&outputs)?;
            let folded = fold_tables(&mut m)?;
            assert_eq!(folded, usize::from(!middle_is_output));
            assert_eq!(luts(&m), 2 - folded);
            let x = tract_ndarray::Array2::from_shape_vec((16, 16), input.clone())?;
            let out = m.into_runnable()?.run(tvec![Tensor::from(x).into()])?;
            let last = out.last().unwrap();
            assert_eq!(last.datum_type(), DatumType::I8);
            let want: Vec<u8> = input
                .iter()
                .map(|&v| second[first[v as usize] as usize])
                .collect();
            assert_eq!(last.as_bytes(), &want[..]);
        }
        Ok(())
    }

    /// The phase-split fill (no dilation) equals the per-row gather on random geometries.
    #[test]
    fn im2col_by_phase_equals_the_gather() {
        let mut rng = Lcg(5);
        let (mut a, mut b, mut phases) = (vec![], vec![], vec![]);
        for case in 0..400 {
            let (kh, kw) = (1 + rng.below(5), 1 + rng.below(5));
            let stride = (1 + rng.below(3), 1 + rng.below(3));
            let pad = (rng.below(kh), rng.below(kw));
            let (pb, pr) = (rng.below(kh), rng.below(kw));
            let h = kh.saturating_sub(pad.0 + pb).max(1) + rng.below(12);
            let w = kw.saturating_sub(pad.1 + pr).max(1) + rng.below(30);
            let geo = Im2col {
                h,
                w,
                kh,
                kw,
                stride,
                dilation: (1, 1),
                pad,
                oh: (h + pad.0 + pb - kh) / stride.0 + 1,
                ow: (w + pad.1 + pr - kw) / stride.1 + 1,
            };
            let channels = 1 + rng.below(3);
            let src: Vec<u8> = (0..channels * h * w).map(|_| rng.byte()).collect();
            let x = ([0, 0x80][rng.below(2)], rng.byte());
            geo.fill_by_phase(&src, channels, x, &mut a, &mut phases);
            geo.fill_strided(&src, channels, x, &mut b);
            assert_eq!(a, b, "case {case}: {stride:?} {pad:?} {h}x{w} k {kh}x{kw}");
        }
    }

    /// A padded input and its im2col rows agree on a hand-checked 3×3 case.
    #[test]
    fn im2col_places_padding_as_zero() {
        let geo = Im2col {
            h: 2,
            w: 2,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            dilation: (1, 1),
            pad: (1, 1),
            oh: 2,
            ow: 2,
        };
        let mut out = vec![];
        // The zero point 10 fills the padding: the packer subtracts it, padding reads 0.
        geo.fill(&[11, 12, 13, 14], 1, (0, 10), &mut out, &mut vec![]);
        // Row (ky 1, kx 1) is the centre tap: the plane itself.
        assert_eq!(&out[4 * 4..5 * 4], &[11, 12, 13, 14]);
        // Row (ky 0, kx 0) reads up-left: only output (1,1) sees input (0,0).
        assert_eq!(&out[0..4], &[10, 10, 10, 11]);
        // Row (ky 2, kx 2) reads down-right: only output (0,0) sees input (1,1).
        assert_eq!(&out[8 * 4..9 * 4], &[14, 10, 10, 10]);
        // Signed input: bytes are flipped to the unsigned representation.
        geo.fill(
            &[11 ^ 0x80, 12 ^ 0x80, 13 ^ 0x80, 14 ^ 0x80],
            1,
            (0x80, 10),
            &mut out,
            &mut vec![],
        );
        assert_eq!(&out[4 * 4..5 * 4], &[11, 12, 13, 14]);
    }
}
