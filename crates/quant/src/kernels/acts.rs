//! Activation quantization: f32 rows to the kernels' internal 8-bit layout.
//!
//! Each row of `k` floats is cut into blocks of 32. A block gets a scale
//! `d = max|x| / 127`, quants `q = round(x / d)` in `-127..=127` (never -128, so that
//! `abs` and sign tricks are exact), and `ds = d * sum(q)`, the term a block minimum or
//! offset multiplies. Quants live in 64-byte aligned lines (two blocks per line, rows
//! padded to an even number of blocks with zero blocks), scales and sums in separate
//! `f32` arrays, so the kernels load a block with one aligned load.
//!
//! The quantization error of an element is at most `d / 2 = max|x| / 254` of its block.

use super::blocks::{BLOCK_ELEMS, blocks_per_row};
use super::error::{Error, Result};

/// 64 bytes of quants (two blocks), 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [[i8; BLOCK_ELEMS]; 2]);

/// `m` activation rows quantized to 8 bits per block of 32, ready for the kernels.
///
/// Build it once per input and reuse it for every weight matrix that reads the same
/// input (Q, K and V; gate and up) with [`gemm_quantized`](super::gemm_quantized).
#[derive(Clone, Default)]
pub struct QuantizedActs {
    m: usize,
    k: usize,
    nb: usize,
    stride: usize,
    lines: Vec<Line>,
    d: Vec<f32>,
    ds: Vec<f32>,
    sums: Vec<i32>,
    /// Whether the rows are independent sequences whose results must equal one-row
    /// products bit for bit (see [`QuantizedActs::set_independent_rows`]).
    independent: bool,
}

impl std::fmt::Debug for QuantizedActs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedActs")
            .field("m", &self.m)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Raw view used by the SIMD kernels.
#[derive(Clone, Copy)]
pub(crate) struct ActsView<'a> {
    /// Quants, `stride / 2` lines (of two blocks) per row.
    pub(crate) lines: &'a [Line],
    /// Scales, `stride` per row.
    pub(crate) d: &'a [f32],
    /// `d * sum(q)`, `stride` per row.
    pub(crate) ds: &'a [f32],
    /// `sum(q)` of each block as an integer, `stride` per row (what offset weights add
    /// to a dot product, taken back exactly).
    pub(crate) sums: &'a [i32],
    /// Blocks per row in the arrays (padded to even).
    pub(crate) stride: usize,
    /// The rows are independent sequences: every row must be computed as a one-row
    /// product would compute it (no packed kernel).
    pub(crate) independent: bool,
}

impl QuantizedActs {
    /// An empty buffer, to be filled with [`quantize_into`](Self::quantize_into).
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `m` rows of `k` floats (`x.len() == m * k`, `k` a multiple of 32).
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Result<Self> {
        let mut acts = Self::new();
        acts.quantize_into(x, m, k)?;
        Ok(acts)
    }

    /// Like [`quantize`](Self::quantize), reusing this buffer's allocations.
    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize) -> Result<()> {
        let nb = blocks_per_row(k)?;
        if m == 0 {
            return Err(Error::EmptyDimension { what: "m" });
        }
        let expected = m.checked_mul(k).ok_or(Error::Overflow { what: "m * k" })?;
        if x.len() != expected {
            return Err(Error::LengthMismatch {
                what: "x (m * k)",
                expected,
                actual: x.len(),
                unit: "elements",
            });
        }
        let stride = nb.next_multiple_of(2);
        self.m = m;
        self.k = k;
        self.nb = nb;
        self.stride = stride;
        self.lines.clear();
        self.lines
            .resize(m * stride / 2, Line([[0; BLOCK_ELEMS]; 2]));
        self.d.clear();
        self.d.resize(m * stride, 0.0);
        self.ds.clear();
        self.ds.resize(m * stride, 0.0);
        self.sums.clear();
        self.sums.resize(m * stride, 0);

        #[cfg(target_arch = "x86_64")]
        let simd = super::Kernel::Avx2.is_available();
        for (row, xr) in x.chunks_exact(k).enumerate() {
            let lines = &mut self.lines[row * stride / 2..(row + 1) * stride / 2];
            let d = &mut self.d[row * stride..(row + 1) * stride];
            let ds = &mut self.ds[row * stride..(row + 1) * stride];
            let sums = &mut self.sums[row * stride..(row + 1) * stride];
            for (b, xb) in xr.chunks_exact(BLOCK_ELEMS).enumerate() {
                let q = &mut lines[b / 2].0[b % 2];
                #[cfg(target_arch = "x86_64")]
                let (scale, sum) = if simd {
                    quantize_block_avx2(xb, q)
                } else {
                    quantize_block(xb, q)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let (scale, sum) = quantize_block(xb, q);
                d[b] = scale;
                ds[b] = scale * sum as f32;
                sums[b] = sum;
            }
        }
        Ok(())
    }

    /// Number of rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Elements per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `row`'s quants, scales and `d * sum(q)` per block (for inspection and tests).
    pub fn row(&self, row: usize) -> Option<(Vec<i8>, &[f32], &[f32])> {
        if row >= self.m {
            return None;
        }
        let view = self.view();
        let q: Vec<i8> = (0..self.nb).flat_map(|b| *view.block(row, b)).collect();
        let d = self.d.get(row * self.stride..row * self.stride + self.nb)?;
        let ds = self
            .ds
            .get(row * self.stride..row * self.stride + self.nb)?;
        Some((q, d, ds))
    }

    /// Declares the rows independent sequences (a batched decode step): the kernels
    /// then keep their register tiles, whose GGML results are bit-identical to
    /// multiplying each row alone, so batching never changes what a sequence
    /// generates. Without it (the default: a prompt's rows), four rows or more may take
    /// the packed kernel, whose sums differ from one row's by f32 rounding. Kept until
    /// changed, also across [`quantize_into`](Self::quantize_into).
    pub fn set_independent_rows(&mut self, independent: bool) {
        self.independent = independent;
    }

    /// Whether the rows were declared independent sequences
    /// ([`set_independent_rows`](Self::set_independent_rows)).
    pub fn independent_rows(&self) -> bool {
        self.independent
    }

    pub(crate) fn blocks(&self) -> usize {
        self.nb
    }

    pub(crate) fn view(&self) -> ActsView<'_> {
        ActsView {
            lines: &self.lines,
            d: &self.d,
            ds: &self.ds,
            sums: &self.sums,
            stride: self.stride,
            independent: self.independent,
        }
    }
}

impl<'a> ActsView<'a> {
    /// The rows from `r0` on (empty past the end).
    pub(crate) fn rows_from(&self, r0: usize) -> ActsView<'a> {
        let at = r0 * self.stride;
        ActsView {
            lines: self.lines.get(at / 2..).unwrap_or(&[]),
            d: self.d.get(at..).unwrap_or(&[]),
            ds: self.ds.get(at..).unwrap_or(&[]),
            sums: self.sums.get(at..).unwrap_or(&[]),
            stride: self.stride,
            independent: self.independent,
        }
    }

    /// The quants of block `b` of row `row` .
    #[inline]
    pub(crate) fn block(&self, row: usize, b: usize) -> &[i8; BLOCK_ELEMS] {
        let idx = row * self.stride + b;
        &self.lines[idx / 2].0[idx % 2]
    }

    /// Pointer to the quants of block `b` of row `row` (32-byte aligned).
    #[inline]
    pub(crate) fn block_ptr(&self, row: usize, b: usize) -> *const i8 {
        self.lines
            .as_ptr()
            .cast::<i8>()
            .wrapping_add((row * self.stride + b) * BLOCK_ELEMS)
    }
}

/// Quantizes one block of 32 floats; returns the scale and the sum of the quants.
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0); the clamp keeps -128 out.
        let v = (xi * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        *qi = v;
        sum += i32::from(v);
    }
    (d, sum)
}

/// [`quantize_block`] with AVX2, bit for bit the same results (NaN quantizes to 0, the
/// maximum ignores NaN, rounding is to nearest even); falls back to it when the CPU lacks
/// AVX2 or the block is not 32 floats.
#[cfg(target_arch = "x86_64")]
pub(crate) fn quantize_block_avx2(x: &[f32], q: &mut [i8; BLOCK_ELEMS]) -> (f32, i32) {
    match <&[f32; BLOCK_ELEMS]>::try_from(x) {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        Ok(x) if super::Kernel::Avx2.is_available() => unsafe { quantize_block_avx2_impl(x, q) },
        _ => quantize_block(x, q),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_block_avx2_impl(x: &[f32; BLOCK_ELEMS], q: &mut [i8; BLOCK_ELEMS]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let p = x.as_ptr();
    // SAFETY: `x` is 32 floats: four unaligned loads of 8.
    let v = unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    };
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    // `max(a, m)` returns `m` when `a` is NaN, as `f32::max` ignores NaN.
    let mut m = _mm256_setzero_ps();
    for vi in v {
        m = _mm256_max_ps(_mm256_and_ps(vi, abs_mask), m);
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (idv, hi, lo) = (
        _mm256_set1_ps(id),
        _mm256_set1_ps(127.0),
        _mm256_set1_ps(-127.0),
    );
    let mut qi = [_mm256_setzero_si256(); 4];
    for (o, vi) in qi.iter_mut().zip(v) {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(vi, idv),
        );
        let c = _mm256_max_ps(_mm256_min_ps(r, hi), lo);
        // NaN (from NaN or infinite inputs) becomes 0, as `NaN as i8` does.
        let c = _mm256_and_ps(c, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
        *o = _mm256_cvtps_epi32(c);
    }
    // i32 -> i16 -> i8 packs work within 128-bit lanes; the permute restores the order.
    let w01 = _mm256_packs_epi32(qi[0], qi[1]);
    let w23 = _mm256_packs_epi32(qi[2], qi[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `q` is 32 bytes.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), b) };
    let s = _mm256_add_epi32(
        _mm256_add_epi32(qi[0], qi[1]),
        _mm256_add_epi32(qi[2], qi[3]),
    );
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2)));
    (d, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_block_quantization_is_bit_exact() {
        let mut s = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let specials = [
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-40,
            f32::MAX,
        ];
        for case in 0..20_000 {
            let mut x = [0f32; BLOCK_ELEMS];
            for v in &mut x {
                let r = next();
                *v = match case % 5 {
                    // Halves of the step: exercise ties.
                    0 => ((r % 255) as f32 - 127.0) * 0.5,
                    1 => f32::from_bits(r as u32),
                    2 if r % 7 == 0 => specials[(r >> 8) as usize % specials.len()],
                    _ => ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 3.0,
                };
            }
            let (mut q1, mut q2) = ([0i8; BLOCK_ELEMS], [0i8; BLOCK_ELEMS]);
            let (d1, s1) = quantize_block(&x, &mut q1);
            let (d2, s2) = quantize_block_avx2(&x, &mut q2);
            assert_eq!(q1, q2, "{x:?}");
            assert_eq!((d1.to_bits(), s1), (d2.to_bits(), s2), "{x:?}");
        }
    }
}
