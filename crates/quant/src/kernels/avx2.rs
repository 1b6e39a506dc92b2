//! AVX2 kernels: `vpmaddubsw` (u8 x i8 -> i16 pairs) + `vpmaddwd` (-> i32), one block
//! of 32 per 256-bit register.
//!
//! Q4 nibbles are unsigned, so they are the `u8` operand directly. For Q8_0 (signed x
//! signed) the sign trick moves the weight's sign onto the activation:
//! `maddubs(|w|, sign(x, w))`. `|w| <= 128` and `|x| <= 127`, so a pair sum is at most
//! 32,512 and the i16 lanes never saturate.

use std::arch::x86_64::*;
use std::ops::Range;

use super::Kernel;
use super::acts::ActsView;
use super::blocks::GgmlMatrix;
use super::driver::{F_Q4_1, F_Q8_0, check_range, tile_loops};
use super::packed::{self, PANEL};

/// See [`RangeFn`](super::driver::RangeFn). Does nothing (and asserts in debug builds)
/// if the CPU lacks AVX2 or the bounds do not hold; the driver checks both first.
pub(super) fn range<const F: u8>(
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if !Kernel::Avx2.is_available() || !check_range(&w, &a, m, &cols, out, ld) {
        debug_assert!(false, "AVX2 kernel called without AVX2 or out of bounds");
        return;
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked above), and `check_range` holds.
    unsafe { range_impl::<F>(w, a, m, cols, out, ld) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn range_impl<const F: u8>(
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if packed::takes_packed(m, a.independent) {
        // Whole panels through the packed kernel, the last few columns through the
        // register tiles.
        let split = cols.start + (cols.end - cols.start) / PANEL * PANEL;
        if split > cols.start {
            // SAFETY: as this function's; the columns are a subrange of `cols`.
            unsafe { packed::range_impl::<F>(false, w, a, m, cols.start..split, out, ld) };
        }
        let rest = split..cols.end;
        if !rest.is_empty() {
            let out = &mut out[split - cols.start..];
            tile_loops!(F, w, a, m, rest, out, ld)
        }
        return;
    }
    tile_loops!(F, w, a, m, cols, out, ld)
}

const fn block_bytes(f: u8) -> usize {
    match f {
        F_Q4_1 => 20,
        F_Q8_0 => 34,
        _ => 18,
    }
}

/// Transposes 8 x 8 floats: lane `j` of result `i` is lane `i` of input `j`. The
/// dense packed GEMM packs weight panels with it, the engine's attention its key chunks.
///
/// # Safety
/// The CPU has AVX2 (`is_x86_feature_detected!("avx2")`); there are no other
/// requirements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Horizontal sum of eight floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Scale and minimum of the block at `p` (the minimum is `-8 d` for Q4_0 and 0 for
/// Q8_0, whose sign is handled in the dot product).
///
/// # Safety
/// `p` points to a whole block of format `F`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scales<const F: u8>(p: *const u8) -> (f32, f32) {
    if F == F_Q4_1 {
        // SAFETY: the block starts with two f16 (4 bytes).
        let dm = unsafe { p.cast::<i32>().read_unaligned() };
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    } else {
        // SAFETY: the block starts with one f16 (2 bytes).
        let h = unsafe { p.cast::<u16>().read_unaligned() };
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))));
        (d, if F == F_Q8_0 { 0.0 } else { -8.0 * d })
    }
}

/// The 32 weight quants of the block at `p` in element order: unsigned nibbles for
/// Q4, signed bytes for Q8_0.
///
/// # Safety
/// `p` points to a whole block of format `F`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quants<const F: u8>(p: *const u8) -> __m256i {
    if F == F_Q8_0 {
        // SAFETY: bytes 2..34 of the block are the quants.
        unsafe { _mm256_loadu_si256(p.add(2).cast()) }
    } else {
        let off = if F == F_Q4_1 { 4 } else { 2 };
        // SAFETY: the 16 nibble bytes follow the header.
        unsafe { nibbles(p.add(off)) }
    }
}

/// The 32 nibbles of the 16 bytes at `p` as bytes: the low nibbles first (elements
/// `0..16` of a block), then the high nibbles (elements `16..32`).
///
/// # Safety
/// `p` points to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller's.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Dot products of `MR` activation rows (from `r0`) with `NR` weight rows (from `w`,
/// `rb` bytes apart), `nb` blocks each.
///
/// # Safety
/// How far ahead of its loads the register tile prefetches weight bytes (as the
/// AVX-512 panels and the dense rows do).
const PREFETCH: usize = 8192;

/// `w` points to `NR` whole rows of `nb` blocks of format `F`; rows `r0..r0 + MR` of
/// `a` exist and have at least `nb` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // i, j index several tile arrays at once
unsafe fn tile<const F: u8, const MR: usize, const NR: usize>(
    w: *const u8,
    rb: usize,
    a: &ActsView<'_>,
    r0: usize,
    nb: usize,
) -> [[f32; NR]; MR] {
    let bb = block_bytes(F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut macc = [[0.0f32; NR]; MR];
    let dptr = a.d.as_ptr();
    let dsptr = a.ds.as_ptr();
    for b in 0..nb {
        let mut wq = [_mm256_setzero_si256(); NR];
        let mut wabs = [_mm256_setzero_si256(); NR];
        let mut dw = [0.0f32; NR];
        let mut mw = [0.0f32; NR];
        for j in 0..NR {
            // SAFETY: block b of weight row j is inside the rows the caller vouched for.
            unsafe {
                let p = w.add(j * rb + b * bb);
                // The bytes PREFETCH ahead (the rows after these): a decode step
                // streams every weight once, from memory.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
                (dw[j], mw[j]) = scales::<F>(p);
                wq[j] = quants::<F>(p);
            }
            if F == F_Q8_0 {
                wabs[j] = _mm256_abs_epi8(wq[j]);
            }
        }
        for i in 0..MR {
            let idx = (r0 + i) * a.stride + b;
            // SAFETY: block b of activation row r0 + i exists (caller); quants are
            // 32-byte aligned (`Line` is 64-byte aligned, blocks are 32 bytes).
            let (x, dx, dsx) = unsafe {
                (
                    _mm256_load_si256(a.block_ptr(r0 + i, b).cast()),
                    *dptr.add(idx),
                    *dsptr.add(idx),
                )
            };
            for j in 0..NR {
                let p16 = if F == F_Q8_0 {
                    _mm256_maddubs_epi16(wabs[j], _mm256_sign_epi8(x, wq[j]))
                } else {
                    _mm256_maddubs_epi16(wq[j], x)
                };
                let p32 = _mm256_madd_epi16(p16, ones);
                acc[i][j] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(p32),
                    _mm256_set1_ps(dw[j] * dx),
                    acc[i][j],
                );
                if F != F_Q8_0 {
                    macc[i][j] = mw[j].mul_add(dsx, macc[i][j]);
                }
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            res[i][j] = hsum256(acc[i][j]) + macc[i][j];
        }
    }
    res
}
