//! Integer convolution kernels with the requantization fused into their last step.
//!
//! Activations arrive as raw 8-bit values. Signed ones are flipped to unsigned (`b ^ 0x80`,
//! zero point + 128) so that every kernel sees one representation, and the zero point is
//! subtracted while the data is laid out for the kernel: `x - x0` and `w - w0` both fit in an
//! i16, so no zero-point correction terms (row or column sums) are ever needed, and padding is
//! simply 0.
//!
//! - [`gemm`]: `C = A·B` over i16 pairs with i32 accumulation (`vpmaddwd` on x86_64 with AVX2,
//!   `smlal` on aarch64, a portable loop elsewhere), used by pointwise, dense and grouped
//!   convolutions.
//! - [`gemm4`]: the same over byte quads on CPUs with a dot-product instruction (AVX-512 VNNI
//!   `vpdpbusd`, aarch64 `sdot`), for weights that fit an i8 once their zero point is
//!   subtracted (symmetric int8 weights, what onnxruntime's quantizer writes by default). The
//!   activations stay raw bytes there; the zero-point term moves into the bias at load.
//! - [`depthwise`]: a direct kernel (no im2col). Products of two 9-bit values are exact in f32
//!   and so are sums of up to 258 of them, so the taps run as f32 multiply-adds, which vectorise
//!   far better than i32 multiplies, and give the same integers.
//!
//! Every output is `clamp(round_half_even((acc + bias) · scale) + y0, lo, hi)`, the rule of
//! onnxruntime's `QLinearConv` (float multiplier, ties to even).
//!
//! [`depthwise_f32`] is the same depthwise kernel for float models (`crate::dwconv`): the same
//! layout and accumulation, with `acc + bias` stored as it is.

/// Rows of a packed weight panel.
pub(crate) const MR: usize = 4;
/// Columns of a packed activation panel.
pub(crate) const NR: usize = 16;
/// Depthwise taps whose sums stay exact in f32 (`taps · 255² < 2²⁴`).
pub(crate) const MAX_EXACT_TAPS: usize = 258;
/// Depthwise outputs of a row computed together (two AVX2 vectors).
const DW_BLOCK: usize = 16;
/// Depthwise output rows computed together: 8 independent accumulator chains hide the
/// multiply-add latency.
const DW_ROWS: usize = 4;
/// Reduction length whose sums stay inside an i32 (`k · 255² < 2³¹`).
pub(crate) const MAX_GEMM_K: usize = 33_000;

/// Requantization of one output channel after the reduction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Requant {
    pub(crate) y0: i32,
    /// Output range, e.g. `[0, 255]`, narrower when an activation was folded in.
    pub(crate) lo: i32,
    pub(crate) hi: i32,
}

impl Requant {
    /// The stored byte for an accumulator (bias included) and this channel's multiplier.
    #[inline(always)]
    pub(crate) fn apply(&self, acc: i32, scale: f32) -> u8 {
        let v = (acc as f32 * scale).round_ties_even();
        let v = v.clamp((self.lo - self.y0) as f32, (self.hi - self.y0) as f32);
        // Both u8 and i8 outputs are stored as their bit pattern.
        (v as i32 + self.y0) as u8
    }
}

/// Weights packed for [`gemm`]: panels of [`MR`] rows, each k-pair of a row as one i32 holding
/// two i16 (`w[2p]` low, `w[2p+1]` high), zero-padded to whole panels and pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackedA {
    pub(crate) m: usize,
    pub(crate) k: usize,
    data: Vec<i32>,
}

impl PackedA {
    /// `w` is `m × k`, row-major, already minus its zero point.
    pub(crate) fn pack(w: &[i16], m: usize, k: usize) -> PackedA {
        debug_assert_eq!(w.len(), m * k);
        let kp = k.div_ceil(2);
        let panels = m.div_ceil(MR);
        let mut data = vec![0i32; panels * kp * MR];
        for row in 0..m {
            let (panel, r) = (row / MR, row % MR);
            for p in 0..kp {
                let lo = w[row * k + 2 * p];
                let hi = if 2 * p + 1 < k {
                    w[row * k + 2 * p + 1]
                } else {
                    0
                };
                data[(panel * kp + p) * MR + r] = pair(lo, hi);
            }
        }
        PackedA { m, k, data }
    }

    fn kp(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn panel(&self, ix: usize) -> &[i32] {
        let len = self.kp() * MR;
        &self.data[ix * len..][..len]
    }
}

#[inline(always)]
fn pair(lo: i16, hi: i16) -> i32 {
    (lo as u16 as u32 | ((hi as u16 as u32) << 16)) as i32
}

/// Lays `k × n` bytes (row-major) out as panels of [`NR`] columns, each k-pair of a column as
/// two adjacent i16 values `(b ^ flip) - x0`.
pub(crate) fn pack_b(rows: &[u8], k: usize, n: usize, flip: u8, x0: i16, out: &mut Vec<i16>) {
    debug_assert_eq!(rows.len(), k * n);
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    out.clear();
    out.resize(panels * kp * NR * 2, 0);
    // Whole panels of both rows of a pair, where the SIMD path took them.
    #[cfg(target_arch = "x86_64")]
    let (fast_pairs, fast_panels) = if simd::avx2() {
        // SAFETY: AVX2 was detected on this CPU.
        unsafe { avx2::pack_b(rows, k, n, flip, x0, out) };
        (k / 2, n / NR)
    } else {
        (0, 0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (fast_pairs, fast_panels) = (0, 0);
    let value = |b: u8| (b ^ flip) as i16 - x0;
    for p in 0..kp {
        let r0 = &rows[2 * p * n..][..n];
        let r1 = (2 * p + 1 < k).then(|| &rows[(2 * p + 1) * n..][..n]);
        let first_panel = if p < fast_pairs { fast_panels } else { 0 };
        for panel in first_panel..panels {
            let first = panel * NR;
            let cols = NR.min(n - first);
            let dst = &mut out[(panel * kp + p) * NR * 2..][..cols * 2];
            match r1 {
                Some(r1) => {
                    for ((d, &a), &b) in dst
                        .chunks_exact_mut(2)
                        .zip(&r0[first..first + cols])
                        .zip(&r1[first..first + cols])
                    {
                        d[0] = value(a);
                        d[1] = value(b);
                    }
                }
                None => {
                    for (d, &a) in dst.chunks_exact_mut(2).zip(&r0[first..first + cols]) {
                        d[0] = value(a);
                    }
                }
            }
        }
    }
}

/// What the activation bytes of the quad kernels hold: `x - DOT_OFFSET` for an unsigned
/// value `x`. x86's `vpdpbusd` reads them unsigned; aarch64's `sdot` reads both operands
/// signed, so there they are shifted by 128.
#[cfg(target_arch = "aarch64")]
pub(crate) const DOT_OFFSET: i32 = 128;
#[cfg(not(target_arch = "aarch64"))]
pub(crate) const DOT_OFFSET: i32 = 0;

/// Whether this CPU has a dot-product instruction for [`gemm4`].
pub(crate) fn dot4_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd::vnni();
    #[cfg(target_arch = "aarch64")]
    return simd::dotprod();
    #[allow(unreachable_code)]
    false
}

/// Weights packed for [`gemm4`]: panels of [`MR`] rows, each k-quad of a row as one i32
/// holding four i8 (`w[4q]` in the lowest byte), zero-padded; plus each row's sum.
///
/// The quad kernels multiply raw activation bytes, not `x - x0`, whose 9 bits would not fit
/// their 8-bit operands. `Σ (x - x0)·w = Σ (x - DOT_OFFSET)·w + (DOT_OFFSET - x0)·Σ w`, and
/// the last term is a constant per row, folded into the bias at load
/// ([`PackedA4::corrected_bias`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackedA4 {
    pub(crate) m: usize,
    pub(crate) k: usize,
    data: Vec<i32>,
    sums: Vec<i32>,
}

impl PackedA4 {
    /// `w` is `m × k`, row-major, already minus its zero point; `None` when a value does not
    /// fit an i8 (weights with a zero point, e.g. u8 weights), which keep the i16 kernels.
    pub(crate) fn pack(w: &[i16], m: usize, k: usize) -> Option<PackedA4> {
        debug_assert_eq!(w.len(), m * k);
        let kq = k.div_ceil(4);
        let panels = m.div_ceil(MR);
        let mut data = vec![0i32; panels * kq * MR];
        let mut sums = vec![0i32; m];
        for row in 0..m {
            let (panel, r) = (row / MR, row % MR);
            let values = &w[row * k..][..k];
            for (q, quad) in values.chunks(4).enumerate() {
                let mut bytes = [0u8; 4];
                for (b, &v) in bytes.iter_mut().zip(quad) {
                    *b = i8::try_from(v).ok()? as u8;
                }
                data[(panel * kq + q) * MR + r] = i32::from_le_bytes(bytes);
            }
            sums[row] = values.iter().map(|&v| v as i32).sum();
        }
        Some(PackedA4 { m, k, data, sums })
    }

    fn kq(&self) -> usize {
        self.k.div_ceil(4)
    }

    fn panel(&self, ix: usize) -> &[i32] {
        let len = self.kq() * MR;
        &self.data[ix * len..][..len]
    }

    /// `bias` with the zero-point term of input zero point `x0` (unsigned) folded in.
    /// Wrapping: the kernels' sums wrap the same way, so the final i32 is the one the i16
    /// kernels compute.
    pub(crate) fn corrected_bias(&self, bias: &[i32], x0: i32) -> Vec<i32> {
        bias.iter()
            .zip(&self.sums)
            .map(|(&b, &s)| b.wrapping_add((DOT_OFFSET - x0).wrapping_mul(s)))
            .collect()
    }
}

/// Lays `k × n` bytes (row-major, `b ^ flip` unsigned) out for [`gemm4`]: panels of [`NR`]
/// columns, each k-quad of a column as four adjacent bytes `x - DOT_OFFSET`, zero-padded.
pub(crate) fn pack_b4(rows: &[u8], k: usize, n: usize, flip: u8, out: &mut Vec<u8>) {
    debug_assert_eq!(rows.len(), k * n);
    let flip = flip ^ DOT_OFFSET as u8;
    let kq = k.div_ceil(4);
    let panels = n.div_ceil(NR);
    out.clear();
    out.resize(panels * kq * NR * 4, 0);
    for q in 0..kq {
        for panel in 0..panels {
            let first = panel * NR;
            let cols = NR.min(n - first);
            let dst = &mut out[(panel * kq + q) * NR * 4..][..NR * 4];
            #[cfg(target_arch = "x86_64")]
            if 4 * q + 4 <= k && cols == NR {
                let quad = &rows[4 * q * n + first..];
                // SAFETY: SSE2 is part of x86_64; four rows of 16 bytes at stride n are inside
                // `rows` (4q + 3 < k, first + 16 <= n) and `dst` is 64 bytes.
                unsafe { sse2::interleave4(quad, n, flip, dst) };
                continue;
            }
            for t in 0..4 {
                let row = 4 * q + t;
                if row >= k {
                    break;
                }
                let src = &rows[row * n + first..][..cols];
                for (j, &b) in src.iter().enumerate() {
                    dst[4 * j + t] = b ^ flip;
                }
            }
        }
    }
}

/// `out[m × n] = requant(A·B + bias)` on the dot-product kernels, `b` from [`pack_b4`] and the
/// epilogue's bias from [`PackedA4::corrected_bias`].
pub(crate) fn gemm4(a: &PackedA4, b: &[u8], n: usize, e: &Epilogue, out: &mut [u8]) {
    debug_assert_eq!(out.len(), a.m * n);
    debug_assert_eq!(b.len(), n.div_ceil(NR) * a.kq() * NR * 4);
    #[cfg(target_arch = "x86_64")]
    if simd::vnni() {
        // SAFETY: AVX2, FMA, AVX-512 VNNI and VL were detected on this CPU.
        unsafe { avx2::gemm4_vnni(a, b, n, e, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if simd::dotprod() {
        // SAFETY: NEON and the dot-product extension were detected on this CPU.
        unsafe { neon::gemm4_sdot(a, b, n, e, out) };
        return;
    }
    portable::gemm4(a, b, n, e, out)
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// Four rows of 16 bytes (`rows`, stride `n`) as 16 columns of four bytes each, XOR `flip`.
    ///
    /// # Safety
    /// `rows` must hold `3n + 16` bytes, `dst` 64.
    #[inline]
    pub(super) unsafe fn interleave4(rows: &[u8], n: usize, flip: u8, dst: &mut [u8]) {
        debug_assert!(rows.len() >= 3 * n + 16 && dst.len() >= 64);
        // SAFETY: the caller's bounds.
        unsafe {
            let flip = _mm_set1_epi8(flip as i8);
            let p = rows.as_ptr();
            let r = |i: usize| _mm_xor_si128(_mm_loadu_si128(p.add(i * n) as *const __m128i), flip);
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            // Bytes of rows 0/1 and 2/3 paired per column, then the pairs paired: columns
            // 0-3, 4-7, 8-11, 12-15 as (r0, r1, r2, r3) quads.
            let (a, b) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (c, d) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let out = dst.as_mut_ptr() as *mut __m128i;
            _mm_storeu_si128(out, _mm_unpacklo_epi16(a, c));
            _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(a, c));
            _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(b, d));
            _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(b, d));
        }
    }
}

/// `dst[i] = table[src[i]]`.
pub(crate) fn lookup(table: &[u8; 256], src: &[u8], dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    // SAFETY: `n` bytes of each; distinct buffers (a `&mut` cannot alias a `&`).
    let done = unsafe { lookup_simd(table, src.as_ptr(), dst.as_mut_ptr(), n) };
    for (d, &b) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = table[b as usize];
    }
}

/// `buf[i] = table[buf[i]]`.
pub(crate) fn lookup_in_place(table: &[u8; 256], buf: &mut [u8]) {
    let p = buf.as_mut_ptr();
    // SAFETY: `buf.len()` bytes; each block is read before it is written.
    let done = unsafe { lookup_simd(table, p, p, buf.len()) };
    for b in &mut buf[done..] {
        *b = table[*b as usize];
    }
}

/// The SIMD part of a lookup: whole blocks where the CPU has a byte permute; returns how many
/// bytes were done.
///
/// # Safety
/// `src` and `dst` must be valid for `n` bytes; they may be equal but not otherwise overlap.
#[inline]
unsafe fn lookup_simd(table: &[u8; 256], src: *const u8, dst: *mut u8, n: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if simd::vbmi() {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI; the caller's bounds.
        return unsafe { avx512::lookup(table, src, dst, n) };
    }
    let _ = (table, src, dst, n);
    0
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// 64 table lookups per step: `vpermi2b` picks from entries 0-127 and from 128-255 by the
    /// low seven bits of each index, and the index's top bit chooses between the two.
    ///
    /// # Safety
    /// AVX-512 F, BW and VBMI; `src` and `dst` valid for `n` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn lookup(
        table: &[u8; 256],
        src: *const u8,
        dst: *mut u8,
        n: usize,
    ) -> usize {
        let t = table.as_ptr();
        // SAFETY: the table is 256 bytes; blocks stay below `n`, per the caller.
        unsafe {
            let (t0, t1) = (
                _mm512_loadu_si512(t as *const _),
                _mm512_loadu_si512(t.add(64) as *const _),
            );
            let (t2, t3) = (
                _mm512_loadu_si512(t.add(128) as *const _),
                _mm512_loadu_si512(t.add(192) as *const _),
            );
            let blocks = n / 64;
            for i in 0..blocks {
                let idx = _mm512_loadu_si512(src.add(64 * i) as *const _);
                let lo = _mm512_permutex2var_epi8(t0, idx, t1);
                let hi = _mm512_permutex2var_epi8(t2, idx, t3);
                let v = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
                _mm512_storeu_si512(dst.add(64 * i) as *mut _, v);
            }
            64 * blocks
        }
    }
}

/// Splits a row of bytes by column parity, each byte XOR `flip`: columns 0, 2, 4, … to
/// `even`, 1, 3, 5, … to `odd`, as many as each destination holds.
pub(crate) fn deal2(src: &[u8], flip: u8, even: &mut [u8], odd: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    let done = if simd::avx2() {
        // SAFETY: AVX2 was detected on this CPU.
        unsafe { avx2::deal2(src, flip, even, odd) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (x, &b) in src.iter().enumerate().skip(done) {
        let dst = if x % 2 == 0 { &mut *even } else { &mut *odd };
        if let Some(d) = dst.get_mut(x / 2) {
            *d = b ^ flip;
        }
    }
}

/// `dst.copy_from_slice(&src[..dst.len()])` for short rows: whole 32-byte blocks are inlined
/// moves, where a copy of a variable length is a call to `memmove` (5% of a small quantized
/// network's time went to such calls for rows of ~100 bytes).
#[inline(always)]
pub(crate) fn copy_row(dst: &mut [u8], src: &[u8]) {
    let src = &src[..dst.len()];
    let mut d = dst.chunks_exact_mut(32);
    let mut s = src.chunks_exact(32);
    for (a, b) in (&mut d).zip(&mut s) {
        a.copy_from_slice(b);
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = *b;
    }
}

/// What [`gemm`] does with each row's sums: add the bias, scale, requantize.
pub(crate) struct Epilogue<'a> {
    pub(crate) bias: &'a [i32],
    pub(crate) scale: &'a [f32],
    pub(crate) q: &'a Requant,
}

/// `out[m × n] = requant(A·B + bias)`, `b` from [`pack_b`].
pub(crate) fn gemm(a: &PackedA, b: &[i16], n: usize, e: &Epilogue, out: &mut [u8]) {
    debug_assert_eq!(out.len(), a.m * n);
    debug_assert_eq!(b.len(), n.div_ceil(NR) * a.kp() * NR * 2);
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        // SAFETY: AVX2 was detected on this CPU.
        unsafe { avx2::gemm(a, b, n, e, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if simd::neon() {
        // SAFETY: NEON is part of every aarch64 target Rust supports; checked anyway.
        unsafe { neon::gemm(a, b, n, e, out) };
        return;
    }
    portable::gemm(a, b, n, e, out)
}

/// Stores the valid part of one `MR × NR` tile.
#[inline(always)]
fn store_tile(tile: &[[u8; NR]; MR], row0: usize, col0: usize, m: usize, n: usize, out: &mut [u8]) {
    let cols = NR.min(n - col0);
    for (r, bytes) in tile.iter().enumerate().take(m.saturating_sub(row0).min(MR)) {
        out[(row0 + r) * n + col0..][..cols].copy_from_slice(&bytes[..cols]);
    }
}

pub(crate) mod portable {
    use super::*;

    /// The reference the dot-product kernels are tested against.
    pub(crate) fn gemm4(a: &PackedA4, b: &[u8], n: usize, e: &Epilogue, out: &mut [u8]) {
        let kq = a.kq();
        // The stored byte as the instruction reads it: unsigned on x86, signed on aarch64.
        let value = |v: u8| {
            if DOT_OFFSET == 0 {
                v as i32
            } else {
                v as i8 as i32
            }
        };
        tiles(a.m, n, e, out, |panel_m, panel_n, acc| {
            let pa = a.panel(panel_m);
            let pb = &b[panel_n * kq * NR * 4..][..kq * NR * 4];
            for p in 0..kq {
                let bq = &pb[p * NR * 4..][..NR * 4];
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = pa[p * MR + r].to_le_bytes();
                    for (j, c) in row.iter_mut().enumerate() {
                        for t in 0..4 {
                            *c += w[t] as i8 as i32 * value(bq[4 * j + t]);
                        }
                    }
                }
            }
        })
    }

    /// The reference every SIMD path is tested against.
    pub(crate) fn gemm(a: &PackedA, b: &[i16], n: usize, e: &Epilogue, out: &mut [u8]) {
        let kp = a.kp();
        tiles(a.m, n, e, out, |panel_m, panel_n, acc| {
            let pa = a.panel(panel_m);
            let pb = &b[panel_n * kp * NR * 2..][..kp * NR * 2];
            for p in 0..kp {
                let bp = &pb[p * NR * 2..][..NR * 2];
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = pa[p * MR + r];
                    let (w0, w1) = (w as i16 as i32, (w >> 16) as i16 as i32);
                    for (j, c) in row.iter_mut().enumerate() {
                        *c += w0 * bp[2 * j] as i32 + w1 * bp[2 * j + 1] as i32;
                    }
                }
            }
        })
    }

    /// The tile loops both share: `tile(panel_m, panel_n, acc)` sums one `MR × NR` tile.
    fn tiles(
        m: usize,
        n: usize,
        e: &Epilogue,
        out: &mut [u8],
        tile: impl Fn(usize, usize, &mut [[i32; NR]; MR]),
    ) {
        let (bias, scale, q) = (e.bias, e.scale, e.q);
        for panel_m in 0..m.div_ceil(MR) {
            for panel_n in 0..n.div_ceil(NR) {
                let mut acc = [[0i32; NR]; MR];
                tile(panel_m, panel_n, &mut acc);
                let mut bytes = [[0u8; NR]; MR];
                for r in 0..MR.min(m - panel_m * MR) {
                    let row = panel_m * MR + r;
                    for j in 0..NR {
                        bytes[r][j] = q.apply(acc[r][j].wrapping_add(bias[row]), scale[row]);
                    }
                }
                store_tile(&bytes, panel_m * MR, panel_n * NR, m, n, out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::sync::OnceLock;

    /// Detected once; `TERN_NO_SIMD=1` forces the portable kernels (for comparisons).
    pub(crate) fn avx2() -> bool {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::env::var_os("TERN_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }

    /// AVX-512 Foundation: 16 f32 lanes a register, 32 registers.
    pub(crate) fn avx512() -> bool {
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512.get_or_init(|| avx2() && is_x86_feature_detected!("avx512f"))
    }

    /// AVX-512 VBMI (`vpermi2b`): a 256-entry byte table looked up 64 bytes at a time.
    pub(crate) fn vbmi() -> bool {
        static VBMI: OnceLock<bool> = OnceLock::new();
        *VBMI.get_or_init(|| {
            std::env::var_os("TERN_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vbmi")
        })
    }

    /// AVX-512 VNNI on 256-bit registers (`vpdpbusd`): four u8·i8 products summed into each
    /// i32 lane in one instruction, twice the products of `vpmaddwd` on i16 pairs.
    pub(crate) fn vnni() -> bool {
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            avx2() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
        })
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod simd {
    use std::sync::OnceLock;

    /// `TERN_NO_SIMD=1` forces the portable kernels (for comparisons).
    pub(crate) fn neon() -> bool {
        static NEON: OnceLock<bool> = OnceLock::new();
        *NEON.get_or_init(|| {
            std::env::var_os("TERN_NO_SIMD").is_none()
                && std::arch::is_aarch64_feature_detected!("neon")
        })
    }

    /// The dot-product extension (ARMv8.2 `sdot`: four i8·i8 products summed into each i32
    /// lane): Cortex-A55/A75 and later, Apple M1 and later; not the Raspberry Pi 4's A72.
    pub(crate) fn dotprod() -> bool {
        static DOT: OnceLock<bool> = OnceLock::new();
        *DOT.get_or_init(|| neon() && std::arch::is_aarch64_feature_detected!("dotprod"))
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// `smlal` over de-interleaved pairs: `vld2q` splits a k-pair row of the packed panel into
    /// the even-k and odd-k columns, each multiplied by its weight and accumulated in i32.
    ///
    /// # Safety
    /// The CPU must support NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn gemm(a: &PackedA, b: &[i16], n: usize, e: &Epilogue, out: &mut [u8]) {
        let (bias, scale, q) = (e.bias, e.scale, e.q);
        let kp = a.kp();
        let k = bounds(q);
        for panel_m in 0..a.m.div_ceil(MR) {
            let pa = a.panel(panel_m).as_ptr();
            let rows = MR.min(a.m - panel_m * MR);
            for panel_n in 0..n.div_ceil(NR) {
                let pb = b[panel_n * kp * NR * 2..][..kp * NR * 2].as_ptr();
                // c[r][q]: row r, columns 4q..4q+4.
                let mut c = [[vdupq_n_s32(0); 4]; MR];
                for p in 0..kp {
                    // SAFETY: `p < kp`; a panel row holds NR pairs (32 i16) and MR weights.
                    let (lo8, hi8, ap) = unsafe {
                        let bp = pb.add(p * NR * 2);
                        (vld2q_s16(bp), vld2q_s16(bp.add(16)), pa.add(p * MR))
                    };
                    for (r, row) in c.iter_mut().enumerate() {
                        // SAFETY: `r < MR`, inside the panel.
                        let w = unsafe { *ap.add(r) };
                        let (w0, w1) = (w as i16, (w >> 16) as i16);
                        row[0] = vmlal_n_s16(row[0], vget_low_s16(lo8.0), w0);
                        row[0] = vmlal_n_s16(row[0], vget_low_s16(lo8.1), w1);
                        row[1] = vmlal_high_n_s16(row[1], lo8.0, w0);
                        row[1] = vmlal_high_n_s16(row[1], lo8.1, w1);
                        row[2] = vmlal_n_s16(row[2], vget_low_s16(hi8.0), w0);
                        row[2] = vmlal_n_s16(row[2], vget_low_s16(hi8.1), w1);
                        row[3] = vmlal_high_n_s16(row[3], hi8.0, w0);
                        row[3] = vmlal_high_n_s16(row[3], hi8.1, w1);
                    }
                }
                let mut tile = [[0u8; NR]; MR];
                for r in 0..rows {
                    let row = panel_m * MR + r;
                    let bytes = requant16(&c[r], bias[row], scale[row], &k);
                    // SAFETY: the tile row is 16 bytes.
                    unsafe { vst1q_s8(tile[r].as_mut_ptr() as *mut i8, bytes) };
                }
                store_tile(&tile, panel_m * MR, panel_n * NR, a.m, n, out);
            }
        }
    }

    /// The output range, in registers.
    struct Bounds {
        y0: int32x4_t,
        lo: int32x4_t,
        hi: int32x4_t,
    }

    #[target_feature(enable = "neon")]
    fn bounds(q: &Requant) -> Bounds {
        Bounds {
            y0: vdupq_n_s32(q.y0),
            lo: vdupq_n_s32(q.lo),
            hi: vdupq_n_s32(q.hi),
        }
    }

    /// [`Requant::apply`] on 16 accumulators of one channel: the 16 stored bytes.
    #[inline]
    #[target_feature(enable = "neon")]
    fn requant16(acc: &[int32x4_t; 4], bias: i32, scale: f32, k: &Bounds) -> int8x16_t {
        let bias_v = vdupq_n_s32(bias);
        let scale_v = vdupq_n_f32(scale);
        let mut v = [vdupq_n_s32(0); 4];
        for (h, acc) in acc.iter().enumerate() {
            let f = vmulq_f32(vcvtq_f32_s32(vaddq_s32(*acc, bias_v)), scale_v);
            // Ties to even, saturating; the saturating add keeps huge values huge.
            let i = vqaddq_s32(vcvtnq_s32_f32(f), k.y0);
            v[h] = vminq_s32(vmaxq_s32(i, k.lo), k.hi);
        }
        // Narrowing keeps the low byte: the stored pattern for u8 and i8 alike.
        let w0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        let w1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
        vcombine_s8(vmovn_s16(w0), vmovn_s16(w1))
    }

    // One `sdot` lane per row of a panel.
    const _: () = assert!(MR == 4);

    /// `acc[i] += Σ_t b[4i + t] · w[4·LANE + t]`: `sdot` by element, through `asm!` because
    /// its intrinsic is not stable in Rust 1.95.
    ///
    /// # Safety
    /// The CPU must support the dot-product extension.
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn sdot_lane<const LANE: i32>(acc: int32x4_t, b: int8x16_t, w: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only arithmetic; the caller guarantees the instruction exists.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {b:v}.16b, {w:v}.4b[{lane}]",
                acc = inout(vreg) acc,
                b = in(vreg) b,
                w = in(vreg_low16) w,
                lane = const LANE,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// [`super::gemm4`] with `sdot`: per k-quad, one instruction per row and four columns.
    ///
    /// # Safety
    /// The CPU must support NEON and the dot-product extension.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn gemm4_sdot(
        a: &PackedA4,
        b: &[u8],
        n: usize,
        e: &Epilogue,
        out: &mut [u8],
    ) {
        let (bias, scale, q) = (e.bias, e.scale, e.q);
        let kq = a.kq();
        let k = bounds(q);
        for panel_m in 0..a.m.div_ceil(MR) {
            let pa = a.panel(panel_m).as_ptr() as *const i8;
            let rows = MR.min(a.m - panel_m * MR);
            for panel_n in 0..n.div_ceil(NR) {
                let pb = b[panel_n * kq * NR * 4..][..kq * NR * 4].as_ptr() as *const i8;
                // c[r][i]: row r, columns 4i..4i+4.
                let mut c = [[vdupq_n_s32(0); 4]; MR];
                for p in 0..kq {
                    // SAFETY: `p < kq`; a quad row of the B panel is 64 bytes, of A 16 (MR
                    // rows of four bytes).
                    let (bv, w) = unsafe {
                        let bp = pb.add(p * NR * 4);
                        (
                            [
                                vld1q_s8(bp),
                                vld1q_s8(bp.add(16)),
                                vld1q_s8(bp.add(32)),
                                vld1q_s8(bp.add(48)),
                            ],
                            vld1q_s8(pa.add(p * MR * 4)),
                        )
                    };
                    for (i, &bq) in bv.iter().enumerate() {
                        // SAFETY: dotprod was detected by the caller.
                        unsafe {
                            c[0][i] = sdot_lane::<0>(c[0][i], bq, w);
                            c[1][i] = sdot_lane::<1>(c[1][i], bq, w);
                            c[2][i] = sdot_lane::<2>(c[2][i], bq, w);
                            c[3][i] = sdot_lane::<3>(c[3][i], bq, w);
                        }
                    }
                }
                let mut tile = [[0u8; NR]; MR];
                for r in 0..rows {
                    let row = panel_m * MR + r;
                    let bytes = requant16(&c[r], bias[row], scale[row], &k);
                    // SAFETY: the tile row is 16 bytes.
                    unsafe { vst1q_s8(tile[r].as_mut_ptr() as *mut i8, bytes) };
                }
                store_tile(&tile, panel_m * MR, panel_n * NR, a.m, n, out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(a: &PackedA, b: &[i16], n: usize, e: &Epilogue, out: &mut [u8]) {
        assert_eq!(b.len(), n.div_ceil(NR) * a.kp() * NR * 2, "packed B");
        let mac = |c, w, b| _mm256_add_epi32(c, _mm256_madd_epi16(w, b));
        // SAFETY: AVX2 per the caller; the B panels' size is checked above.
        unsafe {
            tiles(
                &a.data,
                a.m,
                a.kp(),
                b.as_ptr() as *const __m256i,
                n,
                e,
                out,
                mac,
            )
        }
    }

    /// [`super::gemm4`] with `vpdpbusd` on 256-bit registers: the loop of [`gemm`] over
    /// k-quads, one instruction per product of a quad instead of a multiply and an add per
    /// pair.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn gemm4_vnni(
        a: &PackedA4,
        b: &[u8],
        n: usize,
        e: &Epilogue,
        out: &mut [u8],
    ) {
        assert_eq!(b.len(), n.div_ceil(NR) * a.kq() * NR * 4, "packed B");
        let mac = |c, w, b| _mm256_dpbusd_epi32(c, b, w);
        // SAFETY: the features per the caller; the B panels' size is checked above.
        unsafe {
            tiles(
                &a.data,
                a.m,
                a.kq(),
                b.as_ptr() as *const __m256i,
                n,
                e,
                out,
                mac,
            )
        }
    }

    /// The tile loops both GEMMs share. Each step of the reduction holds, per panel, [`MR`]
    /// i32 of A (one per row, broadcast) and 64 bytes of B (16 columns: i16 pairs or byte
    /// quads); `mac(acc, a, b)` adds one step's products of 8 columns into `acc`.
    ///
    /// # Safety
    /// AVX2 and FMA, and whatever `mac` needs; `b` holds `n.div_ceil(NR) · depth` steps of two
    /// vectors and `a` `m.div_ceil(MR) · depth · MR` values.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles(
        a: &[i32],
        m: usize,
        depth: usize,
        b: *const __m256i,
        n: usize,
        e: &Epilogue,
        out: &mut [u8],
        mac: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let (bias, scale) = (e.bias, e.scale);
        assert!(a.len() >= m.div_ceil(MR) * depth * MR, "packed A");
        // SAFETY: the caller's features and sizes.
        unsafe {
            let k = bounds(e.q);
            for panel_m in 0..m.div_ceil(MR) {
                let pa = a.as_ptr().add(panel_m * depth * MR);
                let rows = MR.min(m - panel_m * MR);
                for panel_n in 0..n.div_ceil(NR) {
                    let pb = b.add(panel_n * depth * 2);
                    let mut c = [_mm256_setzero_si256(); 2 * MR];
                    for p in 0..depth {
                        let (b0, b1) = (
                            _mm256_loadu_si256(pb.add(2 * p)),
                            _mm256_loadu_si256(pb.add(2 * p + 1)),
                        );
                        // Unrolled by the compiler: MR is a constant and `c` stays in registers.
                        for r in 0..MR {
                            let w = _mm256_set1_epi32(*pa.add(p * MR + r));
                            c[2 * r] = mac(c[2 * r], w, b0);
                            c[2 * r + 1] = mac(c[2 * r + 1], w, b1);
                        }
                    }
                    let col0 = panel_n * NR;
                    for r in 0..rows {
                        let row = panel_m * MR + r;
                        let bytes = requant16(c[2 * r], c[2 * r + 1], bias[row], scale[row], &k);
                        store16(bytes, &mut out[row * n + col0..][..NR.min(n - col0)]);
                    }
                }
            }
        }
    }

    /// The first `dst.len()` (at most 16) of 16 bytes: one store for a whole row of a tile,
    /// where a `copy_from_slice` of a variable length would be a call to `memmove`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store16(bytes: __m128i, dst: &mut [u8]) {
        if dst.len() == 16 {
            // SAFETY: `dst` is 16 bytes.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, bytes) };
        } else {
            let mut tmp = [0u8; 16];
            // SAFETY: `tmp` is 16 bytes.
            unsafe { _mm_storeu_si128(tmp.as_mut_ptr() as *mut __m128i, bytes) };
            // Pieces of fixed sizes, each an inlined move (a tile's last columns are often
            // partial: planes 12 or 24 wide).
            let mut at = 0;
            for size in [8, 4, 2, 1] {
                if dst.len() & size != 0 {
                    dst[at..at + size].copy_from_slice(&tmp[at..at + size]);
                    at += size;
                }
            }
        }
    }

    /// [`super::pack_b`] for every pair of rows and every whole panel: 16 bytes of each row
    /// interleaved, widened and shifted by the zero point in four instructions.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_b(
        rows: &[u8],
        k: usize,
        n: usize,
        flip: u8,
        x0: i16,
        out: &mut [i16],
    ) {
        let kp = k.div_ceil(2);
        assert!(
            rows.len() >= k * n && out.len() >= n.div_ceil(NR) * kp * NR * 2,
            "pack_b sizes"
        );
        let flip = _mm_set1_epi8(flip as i8);
        let x0 = _mm256_set1_epi16(x0);
        for p in 0..k / 2 {
            for panel in 0..n / NR {
                // SAFETY: rows 2p and 2p + 1 exist (2p + 1 < k) and the panel is whole
                // (16·panel + 16 <= n); the destination is inside `out`, checked above.
                unsafe {
                    let r0 = rows.as_ptr().add(2 * p * n + panel * NR);
                    let a = _mm_xor_si128(_mm_loadu_si128(r0 as *const __m128i), flip);
                    let b = _mm_xor_si128(_mm_loadu_si128(r0.add(n) as *const __m128i), flip);
                    let lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)), x0);
                    let hi = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)), x0);
                    let dst = out.as_mut_ptr().add((panel * kp + p) * NR * 2) as *mut __m256i;
                    _mm256_storeu_si256(dst, lo);
                    _mm256_storeu_si256(dst.add(1), hi);
                }
            }
        }
    }

    /// [`super::deal2`] on whole blocks of 16 source bytes; returns how many source bytes.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn deal2(src: &[u8], flip: u8, even: &mut [u8], odd: &mut [u8]) -> usize {
        let blocks = (src.len() / 16).min(even.len() / 8).min(odd.len() / 8);
        let deal = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let flip = _mm_set1_epi8(flip as i8);
        for i in 0..blocks {
            // SAFETY: 16·i + 16 <= src.len(), 8·i + 8 <= even.len() and odd.len().
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(16 * i) as *const __m128i);
                let v = _mm_shuffle_epi8(_mm_xor_si128(v, flip), deal);
                _mm_storel_epi64(even.as_mut_ptr().add(8 * i) as *mut __m128i, v);
                _mm_storel_epi64(
                    odd.as_mut_ptr().add(8 * i) as *mut __m128i,
                    _mm_srli_si128::<8>(v),
                );
            }
        }
        16 * blocks
    }

    /// The output range, in registers.
    struct Bounds {
        lo: __m256,
        hi: __m256,
        y0: __m256i,
    }

    #[target_feature(enable = "avx2,fma")]
    fn bounds(q: &Requant) -> Bounds {
        Bounds {
            lo: _mm256_set1_ps((q.lo - q.y0) as f32),
            hi: _mm256_set1_ps((q.hi - q.y0) as f32),
            y0: _mm256_set1_epi32(q.y0),
        }
    }

    /// [`Requant::apply`] on 16 accumulators of one channel: the 16 stored bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn requant16(a0: __m256i, a1: __m256i, bias: i32, scale: f32, k: &Bounds) -> __m128i {
        let bias = _mm256_set1_epi32(bias);
        let scale = _mm256_set1_ps(scale);
        let byte = _mm256_set1_epi32(0xff);
        let mut v = [a0, a1];
        for x in v.iter_mut() {
            let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(*x, bias)), scale);
            let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
            let f = _mm256_min_ps(_mm256_max_ps(f, k.lo), k.hi);
            // The low byte is the stored pattern for u8 and i8 alike.
            *x = _mm256_and_si256(_mm256_add_epi32(_mm256_cvtps_epi32(f), k.y0), byte);
        }
        let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(v[0], v[1]));
        _mm_packus_epi16(
            _mm256_castsi256_si128(words),
            _mm256_extracti128_si256::<1>(words),
        )
    }

    /// Where the even and the odd values of a row of `len` go in `dst`, once both runs are
    /// known to fit and not to overlap: the two split kernels write through these pointers.
    fn phase_rows(len: usize, dst: &mut [f32], even: usize, odd: usize) -> (*mut f32, *mut f32) {
        let (n_even, n_odd) = (len.div_ceil(2), len / 2);
        assert!(
            even + n_even <= dst.len() && odd + n_odd <= dst.len(),
            "phase rows"
        );
        assert!(
            even + n_even <= odd || odd + n_odd <= even,
            "phase rows overlap"
        );
        (
            dst.as_mut_ptr().wrapping_add(even),
            dst.as_mut_ptr().wrapping_add(odd),
        )
    }

    /// Converts a row of bytes to f32 (zero point subtracted), even columns to `dst[even..]`,
    /// odd ones to `dst[odd..]`: the two phases of a stride-2 depthwise input row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn split2(
        src: &[u8],
        flip: u8,
        x0: f32,
        dst: &mut [f32],
        even: usize,
        odd: usize,
    ) {
        let (e, o) = phase_rows(src.len(), dst, even, odd);
        let deal = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let flip_v = _mm_set1_epi8(flip as i8);
        let x0_v = _mm256_set1_ps(x0);
        let chunks = src.len() / 16;
        for i in 0..chunks {
            // SAFETY: 16 bytes at 16·i are inside `src`; 8 values at 8·i are inside each phase
            // row (8·i + 8 <= len / 2, the odd run), checked by `phase_rows`.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(16 * i) as *const __m128i);
                let v = _mm_shuffle_epi8(_mm_xor_si128(v, flip_v), deal);
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v)));
                _mm256_storeu_ps(e.add(8 * i), _mm256_sub_ps(lo, x0_v));
                _mm256_storeu_ps(o.add(8 * i), _mm256_sub_ps(hi, x0_v));
            }
        }
        for (x, &b) in src.iter().enumerate().skip(16 * chunks) {
            let at = if x % 2 == 0 {
                even + x / 2
            } else {
                odd + x / 2
            };
            dst[at] = (b ^ flip) as f32 - x0;
        }
    }

    /// [`split2`] for floats: the even columns of `src` to `dst[even..]`, the odd ones to
    /// `dst[odd..]`, 16 values a step.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn split2_f32(src: &[f32], dst: &mut [f32], even: usize, odd: usize) {
        let (e, o) = phase_rows(src.len(), dst, even, odd);
        let chunks = src.len() / 16;
        for i in 0..chunks {
            // SAFETY: 16 values at 16·i are inside `src`; 8 at 8·i inside each phase row
            // (8·i + 8 <= len / 2, the odd run), checked by `phase_rows`.
            unsafe {
                let a = _mm256_loadu_ps(src.as_ptr().add(16 * i));
                let b = _mm256_loadu_ps(src.as_ptr().add(16 * i + 8));
                // Within each 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6; the 64-bit swap of
                // the middle pairs puts them in order.
                let evens = _mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(a, b));
                let odds = _mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(a, b));
                let evens = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(evens));
                let odds = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(odds));
                _mm256_storeu_ps(e.add(8 * i), evens);
                _mm256_storeu_ps(o.add(8 * i), odds);
            }
        }
        for (x, &v) in src.iter().enumerate().skip(16 * chunks) {
            let at = if x % 2 == 0 {
                even + x / 2
            } else {
                odd + x / 2
            };
            dst[at] = v;
        }
    }

    /// [`depthwise_portable`] with the block of 16 outputs held in two registers across taps.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn depthwise(
        g: &DwGeometry,
        x: &DwInput,
        c: &DwChannel,
        q: &Requant,
        scratch: &mut DwScratch,
        out: &mut [u8],
    ) {
        // Integer values below 2^24 in, so the multiply-adds are exact: the same integers as
        // the portable kernel.
        let layout = fill_phases(g, DwSource::Bytes(x), scratch, 0, 1);
        let k = bounds(q);
        let row_step = checked_row_step(g, &layout, scratch);
        for oy0 in (0..g.oh).step_by(DW_ROWS) {
            for block in 0..layout.blocks {
                let ox = block * DW_BLOCK;
                // SAFETY: AVX2 and FMA per the caller; the layout was checked above.
                let acc = unsafe { dw_rows(scratch, oy0 * row_step, row_step, ox, c.weights) };
                let n = DW_BLOCK.min(g.ow - ox);
                for r in 0..DW_ROWS.min(g.oh - oy0) {
                    let (a0, a1) = (acc[2 * r], acc[2 * r + 1]);
                    let bytes = requant16(
                        _mm256_cvtps_epi32(a0),
                        _mm256_cvtps_epi32(a1),
                        c.bias,
                        c.scale,
                        &k,
                    );
                    store16(bytes, &mut out[(oy0 + r) * g.ow + ox..][..n]);
                }
            }
        }
    }

    /// [`super::depthwise_f32`] on the same blocks as [`depthwise`]; the bias is added as the
    /// block is stored.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn depthwise_f32(
        g: &DwGeometry,
        plane: &[f32],
        c: &DwFloatChannel,
        scratch: &mut DwScratch,
        out: &mut [f32],
    ) {
        let layout = fill_phases(g, DwSource::Floats(plane), scratch, 0, 1);
        let row_step = checked_row_step(g, &layout, scratch);
        let bias = _mm256_set1_ps(c.bias);
        let mut tile = [0f32; DW_BLOCK];
        for oy0 in (0..g.oh).step_by(DW_ROWS) {
            for block in 0..layout.blocks {
                let ox = block * DW_BLOCK;
                // SAFETY: AVX2 and FMA per the caller; the layout was checked above.
                let acc = unsafe { dw_rows(scratch, oy0 * row_step, row_step, ox, c.weights) };
                let n = DW_BLOCK.min(g.ow - ox);
                for r in 0..DW_ROWS.min(g.oh - oy0) {
                    let dst = &mut out[(oy0 + r) * g.ow + ox..][..n];
                    let (a0, a1) = (
                        activate(_mm256_add_ps(acc[2 * r], bias), c.act),
                        activate(_mm256_add_ps(acc[2 * r + 1], bias), c.act),
                    );
                    if n == DW_BLOCK {
                        // SAFETY: `dst` holds DW_BLOCK = 16 values.
                        unsafe {
                            _mm256_storeu_ps(dst.as_mut_ptr(), a0);
                            _mm256_storeu_ps(dst.as_mut_ptr().add(8), a1);
                        }
                    } else {
                        // SAFETY: `tile` holds 16 values.
                        unsafe {
                            _mm256_storeu_ps(tile.as_mut_ptr(), a0);
                            _mm256_storeu_ps(tile.as_mut_ptr().add(8), a1);
                        }
                        dst.copy_from_slice(&tile[..n]);
                    }
                }
            }
        }
    }

    /// [`super::depthwise_f32_quad`]: four planes of one geometry, each its own copy of the
    /// layout, in one pass over the taps. Each plane gets two registers a step: two output
    /// rows of 8 when the output is at most 8 wide, else one row of 16; so the 8 independent
    /// chains [`dw_rows`] gets from 4 rows × 16 of one plane come from planes too small to
    /// fill them.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `g.ow` must be at most [`DW_BLOCK`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn depthwise_f32_quad(
        g: &DwGeometry,
        planes: [&[f32]; 4],
        cs: [&DwFloatChannel; 4],
        scratch: &mut DwScratch,
        mut outs: [&mut [f32]; 4],
    ) {
        let mut layout = None;
        for (k, plane) in planes.into_iter().enumerate() {
            layout = Some(fill_phases(g, DwSource::Floats(plane), scratch, k, 4));
        }
        let layout = layout.expect("four planes");
        let row_step = checked_row_step(g, &layout, scratch);
        // The second register of a step: the next output row, or the next 8 columns.
        let narrow = g.ow <= 8;
        let (second, rows) = if narrow { (row_step, 2) } else { (8, 1) };
        let taps = &scratch.taps[..];
        assert!(cs.iter().all(|c| c.weights.len() >= taps.len()), "weights");
        // Raw pointers, hoisted: indexing four slices per tap kept the loop's addresses on
        // the stack.
        let weights = cs.map(|c| c.weights.as_ptr());
        let planes: [*const f32; 4] =
            std::array::from_fn(|k| scratch.phases.as_ptr().wrapping_add(k * layout.plane));
        let mut tile = [0f32; DW_BLOCK];
        for oy0 in (0..g.oh).step_by(rows) {
            let mut acc = [_mm256_setzero_ps(); 8];
            let row = oy0 * row_step;
            for (t, &tap) in taps.iter().enumerate() {
                for k in 0..4 {
                    // SAFETY: `t` < taps <= weights' length, asserted above. The reads stay
                    // inside copy k: `checked_row_step` bounds every row of DW_ROWS-row blocks
                    // and DW_BLOCK columns by the plane, and these cover at most 2 rows of 8 or
                    // 1 row of 16 from an output row below oh.
                    let (w, v0, v1) = unsafe {
                        let p = planes[k].add(row + tap);
                        (
                            _mm256_broadcast_ss(&*weights[k].add(t)),
                            _mm256_loadu_ps(p),
                            _mm256_loadu_ps(p.add(second)),
                        )
                    };
                    acc[2 * k] = _mm256_fmadd_ps(v0, w, acc[2 * k]);
                    acc[2 * k + 1] = _mm256_fmadd_ps(v1, w, acc[2 * k + 1]);
                }
            }
            for (k, out) in outs.iter_mut().enumerate() {
                let bias = _mm256_set1_ps(cs[k].bias);
                let a0 = activate(_mm256_add_ps(acc[2 * k], bias), cs[k].act);
                let a1 = activate(_mm256_add_ps(acc[2 * k + 1], bias), cs[k].act);
                // SAFETY: `tile` holds 16 values.
                unsafe {
                    _mm256_storeu_ps(tile.as_mut_ptr(), a0);
                    _mm256_storeu_ps(tile.as_mut_ptr().add(8), a1);
                }
                if narrow {
                    for r in 0..rows.min(g.oh - oy0) {
                        out[(oy0 + r) * g.ow..][..g.ow].copy_from_slice(&tile[8 * r..][..g.ow]);
                    }
                } else {
                    out[oy0 * g.ow..][..g.ow].copy_from_slice(&tile[..g.ow]);
                }
            }
        }
    }

    /// [`FloatAct::apply`] on 8 values. `maxps`/`minps` return their second operand where
    /// either is NaN: with the value second, NaN goes through, as the scalar path does.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn activate(v: __m256, act: FloatAct) -> __m256 {
        match act {
            FloatAct::None => v,
            FloatAct::Clamp { lo, hi } => {
                _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v))
            }
            FloatAct::HardSwish => {
                let r = _mm256_add_ps(v, _mm256_set1_ps(3.0));
                let r = _mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), _mm256_set1_ps(6.0));
                _mm256_mul_ps(_mm256_mul_ps(v, r), _mm256_set1_ps(1.0 / 6.0))
            }
        }
    }

    /// The sums of DW_ROWS output rows × DW_BLOCK columns starting at row offset `row0` and
    /// column `ox`, two registers per row: 8 independent chains hide the multiply-add latency.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; [`checked_row_step`] must have passed for the layout.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dw_rows(
        scratch: &DwScratch,
        row0: usize,
        row_step: usize,
        ox: usize,
        weights: &[f32],
    ) -> [__m256; 2 * DW_ROWS] {
        let base = scratch.phases.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2 * DW_ROWS];
        for (&tap, &w) in scratch.taps.iter().zip(weights) {
            let w = _mm256_set1_ps(w);
            for r in 0..DW_ROWS {
                // SAFETY: below the bound `checked_row_step` asserted.
                let (v0, v1) = unsafe {
                    let p = base.add(row0 + r * row_step + tap + ox);
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                };
                acc[2 * r] = _mm256_fmadd_ps(v0, w, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(v1, w, acc[2 * r + 1]);
            }
        }
        acc
    }
}

/// One depthwise convolution over a single channel plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DwGeometry {
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: (usize, usize),
    /// (top, left, bottom, right).
    pub(crate) pad: (usize, usize, usize, usize),
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

/// Scratch reused between planes and calls.
#[derive(Default)]
pub(crate) struct DwScratch {
    /// Padded plane split by column phase (`stride.1` phases), so every tap reads contiguously.
    phases: Vec<f32>,
    taps: Vec<usize>,
    /// One input row in f32, before it is split by phase.
    row: Vec<f32>,
    /// The geometry `phases` and `taps` are laid out for.
    laid_out: Option<(DwGeometry, Phases)>,
}

/// One input plane of a depthwise convolution.
pub(crate) struct DwInput<'a> {
    pub(crate) plane: &'a [u8],
    /// XOR that makes the bytes unsigned.
    pub(crate) flip: u8,
    /// Zero point, unsigned representation.
    pub(crate) x0: i32,
}

/// What a plane is laid out from: 8-bit values with their zero point, or floats as they are.
#[derive(Clone, Copy)]
enum DwSource<'a> {
    Bytes(&'a DwInput<'a>),
    Floats(&'a [f32]),
}

/// One float channel's parameters: `kh × kw` weights, the bias and the activation after it.
pub(crate) struct DwFloatChannel<'a> {
    pub(crate) weights: &'a [f32],
    pub(crate) bias: f32,
    pub(crate) act: FloatAct,
}

/// The activation a float depthwise convolution applies as it stores: the op tract would
/// otherwise run after it is one more pass over the output and one more node per layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum FloatAct {
    None,
    /// `min(max(x, lo), hi)`: ReLU, ReLU6 and the like. NaN stays NaN, as tract's fused
    /// activations leave it on x86 (its `Max` op alone follows `f32::max` and drops it): a
    /// NaN input should not come out as a plausible number.
    Clamp {
        lo: f32,
        hi: f32,
    },
    /// `x · clamp(x + 3, 0, 6) / 6`, in tract's order of operations.
    HardSwish,
}

impl FloatAct {
    #[inline(always)]
    pub(crate) fn apply(self, x: f32) -> f32 {
        match self {
            FloatAct::None => x,
            FloatAct::Clamp { .. } if x.is_nan() => x,
            FloatAct::Clamp { lo, hi } => x.max(lo).min(hi),
            FloatAct::HardSwish => x * (x + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0),
        }
    }
}

/// One channel's parameters: `kh × kw` weights minus their zero point, bias, multiplier.
pub(crate) struct DwChannel<'a> {
    pub(crate) weights: &'a [f32],
    pub(crate) bias: i32,
    pub(crate) scale: f32,
}

/// Depthwise convolution of one plane.
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise(
    g: &DwGeometry,
    x: &DwInput,
    c: &DwChannel,
    q: &Requant,
    scratch: &mut DwScratch,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        unsafe { avx2::depthwise(g, x, c, q, scratch, out) };
        return;
    }
    depthwise_portable(g, x, c, q, scratch, out)
}

/// Depthwise convolution of one f32 plane: `out = conv(plane, weights) + bias`.
pub(crate) fn depthwise_f32(
    g: &DwGeometry,
    plane: &[f32],
    c: &DwFloatChannel,
    scratch: &mut DwScratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        unsafe { avx2::depthwise_f32(g, plane, c, scratch, out) };
        return;
    }
    depthwise_f32_portable(g, plane, c, scratch, out)
}

/// Whether [`depthwise_f32_quad`] runs planes of this geometry: output rows of at most one
/// block, where [`depthwise_f32`] would fill its 4 × 16 block with few outputs.
pub(crate) fn quad_fits(g: &DwGeometry) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        return g.ow <= DW_BLOCK;
    }
    let _ = g;
    false
}

/// [`depthwise_f32`] on four planes of one geometry at once; `quad_fits(g)` must hold.
pub(crate) fn depthwise_f32_quad(
    g: &DwGeometry,
    planes: [&[f32]; 4],
    cs: [&DwFloatChannel; 4],
    scratch: &mut DwScratch,
    outs: [&mut [f32]; 4],
) {
    assert!(quad_fits(g), "depthwise_f32_quad on {g:?}");
    for (plane, out) in planes.iter().zip(&outs) {
        assert!(
            plane.len() >= g.h * g.w && out.len() >= g.oh * g.ow,
            "plane sizes"
        );
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA were detected on this CPU (`quad_fits`); g.ow <= DW_BLOCK.
    unsafe {
        avx2::depthwise_f32_quad(g, planes, cs, scratch, outs)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (cs, scratch);
        unreachable!("quad_fits is false off x86_64");
    }
}

/// The step between two output rows in the phase buffer, once the buffer is known to hold
/// every load of the block kernels: row0 + r·step + tap + ox + [0, DW_BLOCK) for the rows and
/// blocks of `g`, padding rows included. Checked once per plane, not per load.
#[cfg(target_arch = "x86_64")]
fn checked_row_step(g: &DwGeometry, layout: &Phases, scratch: &DwScratch) -> usize {
    let row_step = g.stride.0 * layout.width;
    let max_tap = scratch.taps.iter().max().copied().unwrap_or(0);
    let rows_done = g.oh.div_ceil(DW_ROWS) * DW_ROWS;
    let last = (rows_done - 1) * row_step + max_tap + layout.blocks * DW_BLOCK;
    assert!(
        g.oh == 0 || (last <= layout.plane && layout.copies * layout.plane <= scratch.phases.len()),
        "depthwise layout"
    );
    row_step
}

/// How a plane is laid out by [`fill_phases`].
#[derive(Debug, Clone, Copy)]
struct Phases {
    /// Values per phase row.
    width: usize,
    /// Planes laid out side by side ([`depthwise_f32_quad`] fills four), each `plane` long.
    copies: usize,
    plane: usize,
    /// Output blocks of [`DW_BLOCK`] per row.
    blocks: usize,
    /// Rows per phase, padding included.
    ph_alloc: usize,
}

/// Sizes and zeroes the phase buffer for `g` (`copies` planes of it) and computes the tap
/// offsets.
#[cold]
fn lay_out(g: &DwGeometry, copies: usize, scratch: &mut DwScratch) -> Phases {
    let (_, sx) = g.stride;
    let (pt, pl, pb, pr) = g.pad;
    let ph = g.h + pt + pb;
    let pw = g.w + pl + pr;
    // The last tap of the last block of DW_BLOCK outputs stays inside a phase row, so that
    // blocks need no tail loop (the extra outputs are never stored).
    let blocks = g.ow.div_ceil(DW_BLOCK);
    let width = pw.div_ceil(sx).max(blocks * DW_BLOCK + (g.kw - 1) / sx);
    // Likewise DW_ROWS output rows are computed together: rows past the last are padding.
    let ph_alloc = ph + (DW_ROWS - 1) * g.stride.0;
    let plane = sx * ph_alloc * width;
    scratch.phases.clear();
    scratch.phases.resize(copies * plane, 0.0);
    scratch.taps.clear();
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            scratch
                .taps
                .push(((kx % sx) * ph_alloc + ky) * width + kx / sx);
        }
    }
    let layout = Phases {
        width,
        copies,
        plane,
        blocks,
        ph_alloc,
    };
    scratch.laid_out = Some((*g, layout));
    layout
}

/// Pads the plane (zero point subtracted from bytes, padding 0) and splits its columns by
/// phase (`x % stride`), so that every tap reads a contiguous run; records each tap's offset.
///
/// The layout depends on the geometry only, so the planes of one layer (and of later layers
/// of the same geometry) reuse it: the buffer is zeroed and the taps computed once, and each
/// plane then writes the same interior cells, leaving the padding zero.
///
/// `copy` picks which of the `copies` side-by-side planes the values go to.
#[inline(always)]
fn fill_phases(
    g: &DwGeometry,
    x: DwSource,
    scratch: &mut DwScratch,
    copy: usize,
    copies: usize,
) -> Phases {
    let (_, sx) = g.stride;
    let (pt, pl, _, _) = g.pad;
    let layout = match scratch.laid_out {
        Some((seen, layout)) if seen == *g && layout.copies >= copies => layout,
        _ => lay_out(g, copies, scratch),
    };
    let Phases {
        width, ph_alloc, ..
    } = layout;
    let base = copy * layout.plane;
    for y in 0..g.h {
        let py = y + pt;
        let row: &[f32] = match x {
            DwSource::Floats(plane) => {
                let src = &plane[y * g.w..][..g.w];
                if sx == 1 {
                    scratch.phases[base + py * width + pl..][..g.w].copy_from_slice(src);
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if sx == 2 && simd::avx2() {
                    let even = base + ((pl % 2) * ph_alloc + py) * width + pl / 2;
                    let odd = base + ((1 - pl % 2) * ph_alloc + py) * width + pl.div_ceil(2);
                    // SAFETY: AVX2 was detected on this CPU.
                    unsafe { avx2::split2_f32(src, &mut scratch.phases, even, odd) };
                    continue;
                }
                src
            }
            DwSource::Bytes(x) => {
                let (src, flip, x0) = (&x.plane[y * g.w..][..g.w], x.flip, x.x0 as f32);
                if sx == 1 {
                    let dst = &mut scratch.phases[base + py * width + pl..][..g.w];
                    for (d, &b) in dst.iter_mut().zip(src) {
                        *d = (b ^ flip) as f32 - x0;
                    }
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if sx == 2 && simd::avx2() {
                    // Column x lands at (x + pl) / 2 in phase (x + pl) % 2: evens in one, odds
                    // in the other.
                    let even = base + ((pl % 2) * ph_alloc + py) * width + pl / 2;
                    let odd = base + ((1 - pl % 2) * ph_alloc + py) * width + pl.div_ceil(2);
                    // SAFETY: AVX2 was detected on this CPU.
                    unsafe { avx2::split2(src, flip, x0, &mut scratch.phases, even, odd) };
                    continue;
                }
                // Converted in one vectorised pass, then dealt out below.
                scratch.row.clear();
                scratch
                    .row
                    .extend(src.iter().map(|&b| (b ^ flip) as f32 - x0));
                &scratch.row
            }
        };
        // Column x lands in phase (x + pl) % sx; walking each phase avoids a division per
        // value.
        for phase in 0..sx {
            let first = (phase + sx - pl % sx) % sx;
            let col0 = (first + pl) / sx;
            let dst = &mut scratch.phases[base + (phase * ph_alloc + py) * width + col0..];
            for (d, &v) in dst.iter_mut().zip(row.iter().skip(first).step_by(sx)) {
                *d = v;
            }
        }
    }
    layout
}

/// The sums of one block of DW_BLOCK outputs whose first tap reads `phases[at..]`.
#[inline(always)]
fn dw_block(phases: &[f32], taps: &[usize], weights: &[f32], at: usize) -> [f32; DW_BLOCK] {
    let mut acc = [0f32; DW_BLOCK];
    for (&tap, &w) in taps.iter().zip(weights) {
        let row = &phases[at + tap..][..DW_BLOCK];
        // A plain multiply-add vectorises on every target, where `mul_add` is a library call
        // without hardware FMA.
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v * w;
        }
    }
    acc
}

/// [`depthwise_f32`] without SIMD intrinsics: the reference for the AVX2 path, and the kernel
/// on other targets (the block loop auto-vectorises).
pub(crate) fn depthwise_f32_portable(
    g: &DwGeometry,
    plane: &[f32],
    c: &DwFloatChannel,
    scratch: &mut DwScratch,
    out: &mut [f32],
) {
    each_block(
        g,
        DwSource::Floats(plane),
        c.weights,
        scratch,
        out,
        |dst, acc| {
            for (o, &a) in dst.iter_mut().zip(acc) {
                *o = c.act.apply(a + c.bias);
            }
        },
    );
}

/// The reference the SIMD path is tested against, and the kernel on other targets (where
/// the block loop auto-vectorises).
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_portable(
    g: &DwGeometry,
    x: &DwInput,
    c: &DwChannel,
    q: &Requant,
    scratch: &mut DwScratch,
    out: &mut [u8],
) {
    // Integer values below 2^24: the sums are exact.
    each_block(
        g,
        DwSource::Bytes(x),
        c.weights,
        scratch,
        out,
        |dst, acc| {
            for (o, &a) in dst.iter_mut().zip(acc) {
                *o = q.apply((a as i32).wrapping_add(c.bias), c.scale);
            }
        },
    );
}

/// The portable kernels' walk over output blocks: `store` gets each block's place in `out`
/// and its sums.
#[inline(always)]
fn each_block<T>(
    g: &DwGeometry,
    src: DwSource,
    weights: &[f32],
    scratch: &mut DwScratch,
    out: &mut [T],
    store: impl Fn(&mut [T], &[f32]),
) {
    let layout = fill_phases(g, src, scratch, 0, 1);
    let (phases, taps) = (&scratch.phases[..], &scratch.taps[..]);
    for oy in 0..g.oh {
        let dst = &mut out[oy * g.ow..][..g.ow];
        let row0 = oy * g.stride.0 * layout.width;
        for block in 0..layout.blocks {
            let ox = block * DW_BLOCK;
            let acc = dw_block(phases, taps, weights, row0 + ox);
            let n = DW_BLOCK.min(g.ow - ox);
            store(&mut dst[ox..ox + n], &acc[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::int8::Lcg;

    /// The definition, with none of the kernels' layout tricks.
    #[allow(clippy::too_many_arguments)]
    fn reference_gemm(
        w: &[i16],
        x: &[i16],
        m: usize,
        k: usize,
        n: usize,
        bias: &[i32],
        scale: &[f32],
        q: &Requant,
    ) -> Vec<u8> {
        let mut out = vec![0; m * n];
        for i in 0..m {
            for j in 0..n {
                let acc: i32 = (0..k)
                    .map(|p| w[i * k + p] as i32 * x[p * n + j] as i32)
                    .sum();
                out[i * n + j] = q.apply(acc + bias[i], scale[i]);
            }
        }
        out
    }

    #[test]
    fn gemm_matches_the_definition_on_random_shapes() {
        let mut rng = Lcg(7);
        for case in 0..300 {
            let (m, k, n) = (1 + rng.below(23), 1 + rng.below(70), 1 + rng.below(50));
            let w: Vec<i16> = (0..m * k)
                .map(|_| rng.byte() as i16 - rng.byte() as i16)
                .collect();
            let bytes: Vec<u8> = (0..k * n).map(|_| rng.byte()).collect();
            let (flip, x0) = ([0, 0x80][rng.below(2)], rng.byte() as i16);
            let x: Vec<i16> = bytes.iter().map(|b| (b ^ flip) as i16 - x0).collect();
            let bias: Vec<i32> = (0..m).map(|_| rng.next() as i32 % 50_000).collect();
            let scale: Vec<f32> = (0..m)
                .map(|_| (1 + rng.below(1000)) as f32 * 2e-6)
                .collect();
            let q = if case % 2 == 0 {
                Requant {
                    y0: rng.below(256) as i32,
                    lo: 0,
                    hi: 255,
                }
            } else {
                Requant {
                    y0: rng.below(256) as i32 - 128,
                    lo: -128,
                    hi: 127,
                }
            };
            let expected = reference_gemm(&w, &x, m, k, n, &bias, &scale, &q);
            let a = PackedA::pack(&w, m, k);
            let mut b = vec![];
            pack_b(&bytes, k, n, flip, x0, &mut b);
            let mut got = vec![0; m * n];
            let e = Epilogue {
                bias: &bias,
                scale: &scale,
                q: &q,
            };
            portable::gemm(&a, &b, n, &e, &mut got);
            assert_eq!(got, expected, "portable, case {case}: m {m} k {k} n {n}");
            got.fill(0);
            gemm(&a, &b, n, &e, &mut got);
            assert_eq!(got, expected, "dispatched, case {case}: m {m} k {k} n {n}");
        }
    }

    #[test]
    fn gemm4_matches_the_definition_on_random_shapes() {
        eprintln!("dot-product instructions on this CPU: {}", dot4_available());
        let mut rng = Lcg(13);
        for case in 0..300 {
            let (m, k, n) = (1 + rng.below(23), 1 + rng.below(90), 1 + rng.below(70));
            let w: Vec<i16> = (0..m * k).map(|_| rng.byte() as i8 as i16).collect();
            let bytes: Vec<u8> = (0..k * n).map(|_| rng.byte()).collect();
            let (flip, x0) = ([0, 0x80][rng.below(2)], rng.byte() as i32);
            let x: Vec<i16> = bytes
                .iter()
                .map(|b| (b ^ flip) as i16 - x0 as i16)
                .collect();
            let bias: Vec<i32> = (0..m).map(|_| rng.next() as i32 % 50_000).collect();
            let scale: Vec<f32> = (0..m)
                .map(|_| (1 + rng.below(1000)) as f32 * 2e-6)
                .collect();
            let q = Requant {
                y0: rng.below(256) as i32,
                lo: 0,
                hi: 255,
            };
            let expected = reference_gemm(&w, &x, m, k, n, &bias, &scale, &q);
            let a = PackedA4::pack(&w, m, k).expect("i8 weights");
            let bias4 = a.corrected_bias(&bias, x0);
            let mut b = vec![];
            pack_b4(&bytes, k, n, flip, &mut b);
            let e = Epilogue {
                bias: &bias4,
                scale: &scale,
                q: &q,
            };
            let mut got = vec![0; m * n];
            portable::gemm4(&a, &b, n, &e, &mut got);
            assert_eq!(got, expected, "portable, case {case}: m {m} k {k} n {n}");
            got.fill(0);
            gemm4(&a, &b, n, &e, &mut got);
            assert_eq!(got, expected, "dispatched, case {case}: m {m} k {k} n {n}");
        }
        // A weight that needs 9 bits keeps the i16 kernels.
        assert!(PackedA4::pack(&[1, -200, 3], 1, 3).is_none());
    }

    #[test]
    fn lookups_equal_the_table_at_every_length() {
        let mut rng = Lcg(17);
        let mut table = [0u8; 256];
        table.iter_mut().for_each(|t| *t = rng.byte());
        for n in (0..300).chain([4096, 4097]) {
            let src: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            let want: Vec<u8> = src.iter().map(|&b| table[b as usize]).collect();
            let mut got = vec![0u8; n];
            lookup(&table, &src, &mut got);
            assert_eq!(got, want, "length {n}");
            let mut buf = src.clone();
            lookup_in_place(&table, &mut buf);
            assert_eq!(buf, want, "in place, length {n}");
        }
    }

    #[test]
    fn deal2_splits_by_parity_into_whatever_fits() {
        let mut rng = Lcg(3);
        for case in 0..500 {
            let n = rng.below(80);
            let src: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            let flip = [0, 0x80][rng.below(2)];
            let (ne, no) = (rng.below(45), rng.below(45));
            let (mut even, mut odd) = (vec![7u8; ne], vec![7u8; no]);
            deal2(&src, flip, &mut even, &mut odd);
            for (i, e) in even.iter().enumerate() {
                let want = src.get(2 * i).map_or(7, |b| b ^ flip);
                assert_eq!(*e, want, "case {case}: even {i} of {n}");
            }
            for (i, o) in odd.iter().enumerate() {
                let want = src.get(2 * i + 1).map_or(7, |b| b ^ flip);
                assert_eq!(*o, want, "case {case}: odd {i} of {n}");
            }
        }
    }

    #[test]
    fn requant_rounds_half_to_even_and_saturates() {
        let q = Requant {
            y0: 10,
            lo: 0,
            hi: 255,
        };
        assert_eq!(q.apply(5, 0.5), 12); // 2.5 -> 2
        assert_eq!(q.apply(7, 0.5), 14); // 3.5 -> 4
        assert_eq!(q.apply(-3, 0.5), 8); // -1.5 -> -2
        assert_eq!(q.apply(i32::MAX, 1.0), 255);
        assert_eq!(q.apply(i32::MIN, 1.0), 0);
        let s = Requant {
            y0: -3,
            lo: -128,
            hi: 127,
        };
        assert_eq!(s.apply(-1000, 1.0) as i8, -128);
        assert_eq!(s.apply(0, 1.0) as i8, -3);
    }

    fn reference_depthwise(g: &DwGeometry, plane: &[u8], x0: i32, w: &[f32]) -> Vec<i32> {
        let mut out = vec![0; g.oh * g.ow];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = 0i32;
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let iy = (oy * g.stride.0 + ky) as isize - g.pad.0 as isize;
                        let ix = (ox * g.stride.1 + kx) as isize - g.pad.1 as isize;
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue;
                        }
                        let v = plane[iy as usize * g.w + ix as usize] as i32 - x0;
                        acc += v * w[ky * g.kw + kx] as i32;
                    }
                }
                out[oy * g.ow + ox] = acc;
            }
        }
        out
    }

    /// The f32 kernel, both paths, against the definition summed in f64, on random geometries
    /// (1-D kernels, strides 1–3, any padding, widths around the block size).
    /// A random depthwise geometry, up to `extra_w` columns wider than its kernel.
    fn random_geometry(rng: &mut Lcg, case: usize, extra_w: usize) -> DwGeometry {
        let k = [1, 3, 5, 7][rng.below(4)];
        // One case in five has a kernel of another width.
        let kw = if case.is_multiple_of(5) {
            1 + rng.below(5)
        } else {
            k
        };
        let (kh, kw) = (k, kw);
        let stride = (1 + rng.below(3), 1 + rng.below(3));
        let pad = (rng.below(kh), rng.below(kw), rng.below(kh), rng.below(kw));
        let h = kh.saturating_sub(pad.0 + pad.2).max(1) + rng.below(20);
        let w = kw.saturating_sub(pad.1 + pad.3).max(1) + rng.below(extra_w);
        DwGeometry {
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            oh: (h + pad.0 + pad.2 - kh) / stride.0 + 1,
            ow: (w + pad.1 + pad.3 - kw) / stride.1 + 1,
        }
    }

    /// One random f32 channel of `g`: its plane, weights, bias and activation (each
    /// activation on a quarter of the cases, bounds inside the sums' range), and the outputs
    /// by the definition, in f64.
    struct FloatCase {
        plane: Vec<f32>,
        weights: Vec<f32>,
        bias: f32,
        act: FloatAct,
        expected: Vec<f64>,
    }

    impl FloatCase {
        fn random(rng: &mut Lcg, case: usize, g: &DwGeometry) -> FloatCase {
            let value = |rng: &mut Lcg| (rng.unit() - 0.5) * 4.0;
            let plane: Vec<f32> = (0..g.h * g.w).map(|_| value(rng)).collect();
            let weights: Vec<f32> = (0..g.kh * g.kw).map(|_| value(rng)).collect();
            let bias = value(rng);
            let act = match case % 4 {
                0 => FloatAct::None,
                1 => FloatAct::Clamp {
                    lo: 0.0,
                    hi: f32::INFINITY,
                },
                2 => FloatAct::Clamp {
                    lo: -value(rng).abs(),
                    hi: value(rng).abs(),
                },
                _ => FloatAct::HardSwish,
            };
            let mut expected = vec![0f64; g.oh * g.ow];
            for (at, e) in expected.iter_mut().enumerate() {
                let (oy, ox) = (at / g.ow, at % g.ow);
                *e = bias as f64;
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let iy = (oy * g.stride.0 + ky) as isize - g.pad.0 as isize;
                        let ix = (ox * g.stride.1 + kx) as isize - g.pad.1 as isize;
                        if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                            let v = plane[iy as usize * g.w + ix as usize] as f64;
                            *e += v * weights[ky * g.kw + kx] as f64;
                        }
                    }
                }
                *e = match act {
                    FloatAct::None => *e,
                    FloatAct::Clamp { lo, hi } => e.max(lo as f64).min(hi as f64),
                    FloatAct::HardSwish => *e * (*e + 3.0).clamp(0.0, 6.0) / 6.0,
                };
            }
            FloatCase {
                plane,
                weights,
                bias,
                act,
                expected,
            }
        }

        fn channel(&self) -> DwFloatChannel<'_> {
            DwFloatChannel {
                weights: &self.weights,
                bias: self.bias,
                act: self.act,
            }
        }

        fn check(&self, got: &[f32], what: &str) {
            for (i, (a, e)) in got.iter().zip(&self.expected).enumerate() {
                assert!(
                    (*a as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{what}, output {i}: {a} vs {e}, {:?}",
                    self.act
                );
            }
        }
    }

    #[test]
    fn f32_depthwise_matches_the_definition_on_random_shapes() {
        let mut rng = Lcg(13);
        let mut scratch = DwScratch::default();
        for case in 0..300 {
            let g = random_geometry(&mut rng, case, 40);
            let c = FloatCase::random(&mut rng, case, &g);
            let mut got = vec![f32::NAN; g.oh * g.ow];
            for path in ["portable", "dispatched"] {
                got.fill(f32::NAN);
                if path == "portable" {
                    depthwise_f32_portable(&g, &c.plane, &c.channel(), &mut scratch, &mut got);
                } else {
                    depthwise_f32(&g, &c.plane, &c.channel(), &mut scratch, &mut got);
                }
                c.check(&got, &format!("{path}, case {case}, {g:?}"));
            }
        }
    }

    /// Four narrow planes at once, each with its own weights, bias and activation, as each
    /// alone; the single-plane kernel run between two quads (sharing the scratch) too.
    #[test]
    fn f32_depthwise_on_four_planes_matches_the_definition() {
        let mut rng = Lcg(19);
        let mut scratch = DwScratch::default();
        let mut ran = 0;
        for case in 0..300 {
            let g = random_geometry(&mut rng, case, 18);
            if !quad_fits(&g) {
                continue;
            }
            let cases: Vec<FloatCase> = (0..4)
                .map(|k| FloatCase::random(&mut rng, case + k, &g))
                .collect();
            let mut got = vec![vec![f32::NAN; g.oh * g.ow]; 4];
            let [o0, o1, o2, o3] = &mut got[..] else {
                unreachable!()
            };
            let cs: Vec<DwFloatChannel> = cases.iter().map(|c| c.channel()).collect();
            depthwise_f32_quad(
                &g,
                [
                    &cases[0].plane,
                    &cases[1].plane,
                    &cases[2].plane,
                    &cases[3].plane,
                ],
                [&cs[0], &cs[1], &cs[2], &cs[3]],
                &mut scratch,
                [o0, o1, o2, o3],
            );
            for (k, (c, got)) in cases.iter().zip(&got).enumerate() {
                c.check(got, &format!("case {case}, plane {k}, {g:?}"));
            }
            let mut one = vec![f32::NAN; g.oh * g.ow];
            depthwise_f32(&g, &cases[2].plane, &cs[2], &mut scratch, &mut one);
            cases[2].check(&one, &format!("case {case}, alone after the quad, {g:?}"));
            ran += 1;
        }
        // Without AVX2 there is no quad path to test.
        if quad_fits(&random_geometry(&mut rng, 1, 1)) {
            assert!(ran > 100, "{ran} quad cases");
        }
    }

    #[test]
    fn depthwise_matches_the_definition_on_random_shapes() {
        let mut rng = Lcg(11);
        let mut scratch = DwScratch::default();
        for case in 0..300 {
            let k = [1, 3, 5, 7][rng.below(4)];
            let (kh, kw) = (k, if case % 5 == 0 { 1 + rng.below(5) } else { k });
            let stride = (1 + rng.below(2), 1 + rng.below(2));
            let pad = (rng.below(kh), rng.below(kw), rng.below(kh), rng.below(kw));
            let h = kh.saturating_sub(pad.0 + pad.2).max(1) + rng.below(20);
            let w = kw.saturating_sub(pad.1 + pad.3).max(1) + rng.below(40);
            let oh = (h + pad.0 + pad.2 - kh) / stride.0 + 1;
            let ow = (w + pad.1 + pad.3 - kw) / stride.1 + 1;
            let g = DwGeometry {
                h,
                w,
                kh,
                kw,
                stride,
                pad,
                oh,
                ow,
            };
            let plane: Vec<u8> = (0..h * w).map(|_| rng.byte()).collect();
            let x0 = rng.below(256) as i32;
            let weights: Vec<f32> = (0..kh * kw)
                .map(|_| (rng.byte() as i32 - rng.byte() as i32) as f32)
                .collect();
            let bias = rng.next() as i32 % 10_000;
            let scale = (1 + rng.below(1000)) as f32 * 1e-5;
            let q = Requant {
                y0: rng.below(256) as i32,
                lo: 0,
                hi: 255,
            };
            let expected: Vec<u8> = reference_depthwise(&g, &plane, x0, &weights)
                .into_iter()
                .map(|acc| q.apply(acc + bias, scale))
                .collect();
            let mut got = vec![0; oh * ow];
            let c = DwChannel {
                weights: &weights,
                bias,
                scale,
            };
            let x = DwInput {
                plane: &plane,
                flip: 0,
                x0,
            };
            depthwise_portable(&g, &x, &c, &q, &mut scratch, &mut got);
            assert_eq!(got, expected, "portable, case {case}: {g:?}");
            got.fill(0);
            depthwise(&g, &x, &c, &q, &mut scratch, &mut got);
            assert_eq!(got, expected, "dispatched, case {case}: {g:?}");
            // Signed input: the same values stored as i8 give the same result.
            let signed: Vec<u8> = plane.iter().map(|b| b ^ 0x80).collect();
            let x = DwInput {
                plane: &signed,
                flip: 0x80,
                x0,
            };
            depthwise(&g, &x, &c, &q, &mut scratch, &mut got);
            assert_eq!(got, expected, "signed, case {case}: {g:?}");
        }
    }
}
