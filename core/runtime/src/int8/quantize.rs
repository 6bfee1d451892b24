//! `QuantizeLinear` from f32 that saturates for every input.
//!
//! tract 0.23.9 computes `round(x · scale) as i32 + zero_point` and then clamps: for a value
//! whose product passes `i32::MAX` (a model input of 1e38, say) the cast saturates and the
//! addition overflows, which panics in builds with overflow checks and wraps in release, so that
//! a huge positive input quantizes to 0 instead of 255. The replacement clamps in float before
//! rounding, so nothing can overflow; NaN maps to the zero point as in tract.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{QuantizeLinearI8, QuantizeLinearU8};

#[derive(Debug, Clone)]
pub(crate) struct Quantize {
    /// Multiplier (tract stores 1 / the ONNX scale).
    scale: f32,
    zero_point: i32,
    out_dt: DatumType,
}

/// `(y + MAGIC) - MAGIC` rounds `y` to an integer, ties to even (the FPU's rounding mode), for
/// `|y| < 2²²`: plain adds that vectorise on every target, unlike `round_ties_even`, which is
/// a library call per element on x86_64 without SSE4.1.
const MAGIC: f32 = 12_582_912.0;

impl Quantize {
    fn range(&self) -> (i32, i32) {
        if self.out_dt.unquantized() == DatumType::I8 {
            (i8::MIN as i32, i8::MAX as i32)
        } else {
            (0, u8::MAX as i32)
        }
    }

    /// Every value beyond these saturates the same way: clamping to them first keeps what
    /// is rounded small, whatever the input (±Inf, 1e38).
    fn clamps(&self) -> (f32, f32) {
        let (lo, hi) = self.range();
        (
            (lo - self.zero_point - 1) as f32,
            (hi - self.zero_point + 1) as f32,
        )
    }

    #[inline(always)]
    fn quantize_with(&self, x: f32, (lo, hi): (i32, i32), (flo, fhi): (f32, f32)) -> i32 {
        let y = x * self.scale;
        // NaN maps to the zero point, as in tract.
        let y = if y.is_nan() { 0.0 } else { y.max(flo).min(fhi) };
        let r = (y + MAGIC) - MAGIC;
        (r as i32 + self.zero_point).clamp(lo, hi)
    }

    #[cfg(test)]
    fn quantize(&self, x: f32) -> i32 {
        self.quantize_with(x, self.range(), self.clamps())
    }

    /// Every `xs[i]` quantized into `out[i]` (stored as its bit pattern for i8).
    fn quantize_slice(&self, xs: &[f32], out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        let done = if crate::int8::kernels::simd::avx2() {
            // SAFETY: AVX2 was detected on this CPU.
            unsafe { self.quantize_avx2(xs, out) }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        let (range, clamps) = (self.range(), self.clamps());
        for (o, &v) in out[done..].iter_mut().zip(&xs[done..]) {
            *o = self.quantize_with(v, range, clamps) as u8;
        }
    }

    /// [`Quantize::quantize_with`] on whole blocks of 16 values; returns how many were done.
    /// The input model's first op runs this on every pixel, where the SSE2 code the compiler
    /// makes of the portable loop (4 lanes, a saturating cast emulated) was 12% of a small
    /// quantized network's time.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&self, xs: &[f32], out: &mut [u8]) -> usize {
        use std::arch::x86_64::*;
        let n = xs.len().min(out.len()) / 16 * 16;
        let (lo, hi) = self.range();
        let scale = _mm256_set1_ps(self.scale);
        // Clamping to the integer bounds before rounding gives the same result as clamping
        // after (both are integers), and keeps the conversion in range.
        let flo = _mm256_set1_ps((lo - self.zero_point) as f32);
        let fhi = _mm256_set1_ps((hi - self.zero_point) as f32);
        let zp = _mm256_set1_epi32(self.zero_point);
        let byte = _mm256_set1_epi32(0xff);
        for i in (0..n).step_by(16) {
            let mut v = [_mm256_setzero_si256(); 2];
            for (h, word) in v.iter_mut().enumerate() {
                // SAFETY: i + 16 <= n <= xs.len().
                let x = unsafe { _mm256_loadu_ps(xs.as_ptr().add(i + 8 * h)) };
                let y = _mm256_mul_ps(x, scale);
                // NaN becomes 0, i.e. the zero point, as in tract.
                let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
                let y = _mm256_min_ps(_mm256_max_ps(y, flo), fhi);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
                // The low byte is the stored pattern for u8 and i8 alike.
                *word = _mm256_and_si256(_mm256_add_epi32(_mm256_cvtps_epi32(r), zp), byte);
            }
            let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(v[0], v[1]));
            let bytes = _mm_packus_epi16(
                _mm256_castsi256_si128(words),
                _mm256_extracti128_si256::<1>(words),
            );
            // SAFETY: i + 16 <= n <= out.len().
            unsafe { _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, bytes) };
        }
        n
    }
}

// By bits: tract compares ops for equality, and an f32 field has no `Eq`.
impl PartialEq for Quantize {
    fn eq(&self, other: &Self) -> bool {
        self.scale.to_bits() == other.scale.to_bits()
            && self.zero_point == other.zero_point
            && self.out_dt == other.out_dt
    }
}

impl Eq for Quantize {}

impl std::hash::Hash for Quantize {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scale.to_bits().hash(state);
        self.zero_point.hash(state);
        self.out_dt.hash(state);
    }
}

impl Op for Quantize {
    fn name(&self) -> StaticName {
        "TernQuantize".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Quantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        // SAFETY: every byte is written below.
        let mut out = unsafe { Tensor::uninitialized_dt(self.out_dt, x.shape())? };
        self.quantize_slice(xs, out.as_bytes_mut());
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Quantize {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.out_dt.fact(inputs[0].shape.clone())))
    }
}

/// Replaces tract's f32 → u8/i8 `QuantizeLinear` nodes; returns how many.
pub(crate) fn fix(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(ew) = node.op_as::<ElementWiseOp>() else {
            continue;
        };
        if model.outlet_fact(node.inputs[0])?.datum_type != DatumType::F32 {
            continue;
        }
        let (scale, zero_point) = if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
            (q.scale, q.zero_point as i32)
        } else if let Some(q) = ew.0.downcast_ref::<QuantizeLinearI8>() {
            (q.scale, q.zero_point as i32)
        } else {
            continue;
        };
        let op = Quantize {
            scale,
            zero_point,
            out_dt: node.outputs[0].fact.datum_type,
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_float_saturates_to_the_8_bit_range() {
        let u8q = Quantize {
            scale: 10.0,
            zero_point: 128,
            out_dt: DatumType::U8,
        };
        let i8q = Quantize {
            scale: 10.0,
            zero_point: -3,
            out_dt: DatumType::I8,
        };
        for (x, u, i) in [
            (0.0, 128, -3),
            (1.26, 141, 10),
            // Ties go to even, as in ONNX.
            (1.25, 140, 9),
            (-0.05, 128, -3),
            (1e38, 255, 127),
            (f32::INFINITY, 255, 127),
            (f32::MAX, 255, 127),
            (-1e38, 0, -128),
            (f32::NEG_INFINITY, 0, -128),
            (f32::NAN, 128, -3),
        ] {
            assert_eq!(u8q.quantize(x), u, "u8 {x}");
            assert_eq!(i8q.quantize(x), i, "i8 {x}");
        }
    }

    #[test]
    fn the_vectorisable_rounding_and_the_simd_path_equal_round_ties_even() {
        let mut rng = crate::int8::Lcg(11);
        for (scale, zero_point, out_dt) in [
            (10.0, 128, DatumType::U8),
            (1.0, 0, DatumType::U8),
            (37.5, -3, DatumType::I8),
            (0.013, 0, DatumType::I8),
            (255.0, 255, DatumType::U8),
        ] {
            let q = Quantize {
                scale,
                zero_point,
                out_dt,
            };
            let (lo, hi) = q.range();
            // Ties (k / 2 / scale) and random bit patterns, including NaN and the infinities.
            let ties = (-700..700).map(|k| k as f32 / 2.0 / scale);
            let random = (0..20_000).map(|_| f32::from_bits(rng.next() << 1 ^ rng.next()));
            let xs: Vec<f32> = ties.chain(random).collect();
            // The whole-slice path (SIMD where the CPU has it, an odd length for the tail).
            let mut bytes = vec![0u8; xs.len()];
            q.quantize_slice(&xs, &mut bytes);
            for (&x, &b) in xs.iter().zip(&bytes) {
                let y = x * scale;
                let want = if y.is_nan() {
                    zero_point as i64
                } else {
                    (y.round_ties_even() as i64)
                        .saturating_add(zero_point as i64)
                        .clamp(lo as i64, hi as i64)
                };
                assert_eq!(q.quantize(x) as i64, want, "{x} at scale {scale}");
                let stored = if out_dt == DatumType::I8 {
                    b as i8 as i64
                } else {
                    b as i64
                };
                assert_eq!(stored, want, "slice path: {x} at scale {scale}");
            }
        }
    }
}
