//! The f32 pointwise product: `out[o][p] = act(bias[o] + Σₖ w[o][k] · x[k][p])`, `x` read
//! where it lies (`k` rows of `p` pixels, NCHW's layout), weights packed once.
//!
//! A matrix-product library packs both operands into panels before every product; for a 1×1
//! convolution the input already is the panel layout, rows of pixels one per input channel, so
//! the kernel reads it in place with the row stride. A tile (6 channels × 16 pixels with AVX2,
//! 8 × 32 with AVX-512) keeps 12 or 16 independent multiply-add chains in registers; pixels are
//! the outer loop so that a tile's input rows stay in L1 while every channel panel passes over
//! them. Weights are packed for the widest code the CPU runs.

use crate::int8::kernels::FloatAct;

/// Which code computes a product; the weights are packed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    /// Tiles of 6 channels × 16 pixels (12 of the 16 registers accumulate).
    Avx2,
    /// Tiles of 8 channels × 32 pixels (16 of the 32 registers accumulate).
    Avx512,
}

impl Isa {
    /// The best this CPU runs.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::int8::kernels::simd;
            if simd::avx512() {
                return Isa::Avx512;
            }
            if simd::avx2() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Output channels a tile computes (weights are packed in panels of this many).
    fn mr(self) -> usize {
        match self {
            Isa::Portable | Isa::Avx2 => 6,
            Isa::Avx512 => 8,
        }
    }
}

/// Weights packed for the kernel, with the bias.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PwWeights {
    isa: Isa,
    /// Output channels.
    pub(crate) o: usize,
    /// Input channels.
    pub(crate) k: usize,
    /// Panels of `isa.mr()` output channels, input-channel major within a panel
    /// (`data[(panel · k + k) · mr + row]`); rows past `o` are zero.
    data: Vec<f32>,
    /// One per output channel, padded with zeros to whole panels.
    bias: Vec<f32>,
}

impl PwWeights {
    /// `w` holds `o × k` weights row-major (`transposed`: `k × o`); `bias` one per channel.
    pub(crate) fn pack(
        isa: Isa,
        o: usize,
        k: usize,
        w: &[f32],
        transposed: bool,
        bias: &[f32],
    ) -> Self {
        assert_eq!(w.len(), o * k, "{o}×{k} weights");
        assert_eq!(bias.len(), o, "one bias per output channel");
        let mr = isa.mr();
        let panels = o.div_ceil(mr);
        let mut data = vec![0.0; panels * k * mr];
        for row in 0..o {
            let (panel, r) = (row / mr, row % mr);
            for kk in 0..k {
                let v = if transposed {
                    w[kk * o + row]
                } else {
                    w[row * k + kk]
                };
                data[(panel * k + kk) * mr + r] = v;
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(panels * mr, 0.0);
        PwWeights {
            isa,
            o,
            k,
            data,
            bias: padded,
        }
    }
}

/// Whether the kernel has a vector path on this CPU; where it has none, tract's packed
/// products (hand-written for every target tract supports) are the faster choice.
pub(crate) fn available() -> bool {
    Isa::detect() != Isa::Portable
}

/// One image: `x` is `k × p`, `out` `o × p`.
pub(crate) fn pointwise_f32(w: &PwWeights, act: FloatAct, x: &[f32], p: usize, out: &mut [f32]) {
    assert_eq!(x.len(), w.k * p, "input of {} rows of {p}", w.k);
    assert_eq!(out.len(), w.o * p, "output of {} rows of {p}", w.o);
    #[cfg(target_arch = "x86_64")]
    {
        use crate::int8::kernels::simd;
        match w.isa {
            // SAFETY: the instruction sets detected; sizes checked above.
            Isa::Avx512 if simd::avx512() => unsafe { avx512::pointwise(w, act, x, p, out) },
            Isa::Avx2 if simd::avx2() => unsafe { avx2::pointwise(w, act, x, p, out) },
            _ => portable(w, act, x, p, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable(w, act, x, p, out);
}

fn portable(w: &PwWeights, act: FloatAct, x: &[f32], p: usize, out: &mut [f32]) {
    if p == 0 {
        return;
    }
    let mr = w.isa.mr();
    for (row, y) in out.chunks_exact_mut(p).enumerate() {
        let (panel, r) = (row / mr, row % mr);
        y.fill(0.0);
        for (kk, xs) in x.chunks_exact(p).enumerate() {
            let wk = w.data[(panel * w.k + kk) * mr + r];
            for (y, &v) in y.iter_mut().zip(xs) {
                *y = wk.mul_add(v, *y);
            }
        }
        for y in y.iter_mut() {
            *y = act.apply(*y + w.bias[row]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::int8::kernels::avx2::activate;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;

    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` must hold `w.k × p` values and `out` `w.o × p`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pointwise(
        w: &PwWeights,
        act: FloatAct,
        x: &[f32],
        p: usize,
        out: &mut [f32],
    ) {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut j = 0;
        while j < p {
            let n = (p - j).min(NR);
            let masks = [
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes),
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32 - 8), lanes),
            ];
            for (panel, bias) in w.bias.chunks_exact(MR).enumerate() {
                let rows = (w.o - panel * MR).min(MR);
                // SAFETY: the panel holds `k · MR` weights; `j + n <= p`, and masked lanes
                // are neither read nor written.
                unsafe {
                    let a = w.data.as_ptr().add(panel * w.k * MR);
                    let xp = x.as_ptr().add(j);
                    let acc = if n == NR {
                        tile::<true>(a, w.k, xp, p, masks)
                    } else {
                        tile::<false>(a, w.k, xp, p, masks)
                    };
                    for (r, (acc, &b)) in acc.iter().zip(bias).take(rows).enumerate() {
                        let b = _mm256_set1_ps(b);
                        let y = out.as_mut_ptr().add((panel * MR + r) * p + j);
                        let v0 = activate(_mm256_add_ps(acc[0], b), act);
                        let v1 = activate(_mm256_add_ps(acc[1], b), act);
                        if n == NR {
                            _mm256_storeu_ps(y, v0);
                            _mm256_storeu_ps(y.add(8), v1);
                        } else {
                            _mm256_maskstore_ps(y, masks[0], v0);
                            _mm256_maskstore_ps(y.add(8), masks[1], v1);
                        }
                    }
                }
            }
            j += n;
        }
    }

    /// The sums of one tile: `MR` channels × 16 pixels, input rows `p` apart.
    ///
    /// # Safety
    /// AVX2 and FMA; `a` holds `k · MR` weights; `x` reaches 16 values (those `masks` keep
    /// when not `FULL`) on each of `k` rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const FULL: bool>(
        a: *const f32,
        k: usize,
        x: *const f32,
        p: usize,
        masks: [__m256i; 2],
    ) -> [[__m256; 2]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for kk in 0..k {
            // SAFETY: per the caller.
            unsafe {
                let xr = x.add(kk * p);
                let (x0, x1) = if FULL {
                    (_mm256_loadu_ps(xr), _mm256_loadu_ps(xr.add(8)))
                } else {
                    (
                        _mm256_maskload_ps(xr, masks[0]),
                        _mm256_maskload_ps(xr.add(8), masks[1]),
                    )
                };
                let ak = a.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*ak.add(r));
                    acc[0] = _mm256_fmadd_ps(wv, x0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(wv, x1, acc[1]);
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    const MR: usize = 8;
    const NR: usize = 32;

    /// [`crate::int8::kernels::avx2::activate`] on 16 values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn activate(v: __m512, act: FloatAct) -> __m512 {
        match act {
            FloatAct::None => v,
            FloatAct::Clamp { lo, hi } => {
                _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v))
            }
            FloatAct::HardSwish => {
                let r = _mm512_add_ps(v, _mm512_set1_ps(3.0));
                let r = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), _mm512_set1_ps(6.0));
                _mm512_mul_ps(_mm512_mul_ps(v, r), _mm512_set1_ps(1.0 / 6.0))
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F; `x` must hold `w.k × p` values and `out` `w.o × p`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pointwise(
        w: &PwWeights,
        act: FloatAct,
        x: &[f32],
        p: usize,
        out: &mut [f32],
    ) {
        let mut j = 0;
        while j < p {
            let n = (p - j).min(NR);
            let lanes = |from: usize| -> __mmask16 {
                let left = n.saturating_sub(from).min(16);
                ((1u32 << left) - 1) as __mmask16
            };
            let masks = [lanes(0), lanes(16)];
            for (panel, bias) in w.bias.chunks_exact(MR).enumerate() {
                let rows = (w.o - panel * MR).min(MR);
                // SAFETY: the panel holds `k · MR` weights; `j + n <= p`, and masked lanes
                // are neither read nor written.
                unsafe {
                    let a = w.data.as_ptr().add(panel * w.k * MR);
                    let xp = x.as_ptr().add(j);
                    let acc = if n > 16 {
                        tile::<2>(a, w.k, xp, p, masks)
                    } else {
                        tile::<1>(a, w.k, xp, p, masks)
                    };
                    for (r, (acc, &b)) in acc.iter().zip(bias).take(rows).enumerate() {
                        let b = _mm512_set1_ps(b);
                        let y = out.as_mut_ptr().add((panel * MR + r) * p + j);
                        for (h, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                            if mask != 0 {
                                let v = activate(_mm512_add_ps(acc, b), act);
                                _mm512_mask_storeu_ps(y.add(16 * h), mask, v);
                            }
                        }
                    }
                }
            }
            j += n;
        }
    }

    /// The sums of one tile: `MR` channels × `16 · V` pixels, input rows `p` apart (the second
    /// half zero when `V` is 1).
    ///
    /// # Safety
    /// AVX-512F; `a` holds `k · MR` weights; `x` reaches the values `masks` keep on each of
    /// `k` rows.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const V: usize>(
        a: *const f32,
        k: usize,
        x: *const f32,
        p: usize,
        masks: [__mmask16; 2],
    ) -> [[__m512; 2]; MR] {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for kk in 0..k {
            // SAFETY: per the caller; masked-off lanes are not read.
            unsafe {
                let xr = x.add(kk * p);
                let mut xv = [_mm512_setzero_ps(); 2];
                for (v, xv) in xv.iter_mut().enumerate().take(V) {
                    *xv = _mm512_maskz_loadu_ps(masks[v], xr.add(16 * v));
                }
                let ak = a.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*ak.add(r));
                    for v in 0..V {
                        acc[v] = _mm512_fmadd_ps(wv, xv[v], acc[v]);
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::Lcg;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = Lcg(seed);
        (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect()
    }

    fn check(o: usize, k: usize, p: usize, transposed: bool, act: FloatAct, isa: Isa) {
        let seed = (o * 1000 + k * 10 + p) as u64;
        let w = values(seed, o * k);
        let bias = values(seed + 1, o);
        let x = values(seed + 2, k * p);
        let packed = PwWeights::pack(isa, o, k, &w, transposed, &bias);
        let mut out = vec![f32::NAN; o * p];
        pointwise_f32(&packed, act, &x, p, &mut out);
        for row in 0..o {
            for px in 0..p {
                let sum: f64 = (0..k)
                    .map(|kk| {
                        let wv = if transposed {
                            w[kk * o + row]
                        } else {
                            w[row * k + kk]
                        };
                        wv as f64 * x[kk * p + px] as f64
                    })
                    .sum::<f64>()
                    + bias[row] as f64;
                let want = act.apply(sum as f32);
                let got = out[row * p + px];
                assert!(
                    (got - want).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + want.abs()),
                    "{o}×{k}×{p} ({isa:?}, {act:?}) at {row},{px}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn products_match_the_definition_on_every_edge() {
        let acts = [
            FloatAct::None,
            FloatAct::Clamp { lo: 0.0, hi: 6.0 },
            FloatAct::HardSwish,
        ];
        // Channel counts around the 6- and 8-row panels, pixel counts around the halves of
        // 16- and 32-wide tiles; k of 1 and long sums.
        for (i, &(o, k, p)) in [
            (1, 1, 1),
            (6, 3, 16),
            (7, 5, 17),
            (5, 16, 8),
            (12, 1, 9),
            (13, 40, 49),
            (16, 24, 33),
            (96, 576, 12),
            (8, 4, 31),
            (9, 6, 32),
            (17, 3, 33),
            (24, 8, 48),
            (3, 7, 0),
        ]
        .iter()
        .enumerate()
        {
            // Each packing runs on its code where the CPU has it, on the portable loop where
            // not.
            for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                check(o, k, p, i % 2 == 1, acts[i % 3], isa);
            }
        }
    }

    /// NaN is data: it reaches every output it is summed into, through a clamp too, and no
    /// other.
    #[test]
    fn nan_goes_through_the_clamp_into_its_own_pixels_only() {
        let (o, k, p) = (9, 3, 20);
        let relu6 = FloatAct::Clamp { lo: 0.0, hi: 6.0 };
        let mut x = values(5, k * p);
        x[p + 17] = f32::NAN;
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            let packed = PwWeights::pack(isa, o, k, &values(6, o * k), false, &values(7, o));
            let mut out = vec![0.0; o * p];
            pointwise_f32(&packed, relu6, &x, p, &mut out);
            for (i, v) in out.iter().enumerate() {
                assert_eq!(v.is_nan(), i % p == 17, "{isa:?} at {i}: {v}");
            }
        }
    }
}
