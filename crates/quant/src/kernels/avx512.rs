//! AVX-512 VNNI kernels: `vpdpbusd` (u8 x i8, four products summed into each i32 lane),
//! two blocks per 512-bit register, a 256-bit step for an odd last block.
//!
//! The weight is the unsigned operand. Q4 nibbles (0..=15) are unsigned already, with
//! the Q4_0 offset folded into the block minimum (`-8 d`). Q8_0 quants get 128 added
//! (`xor 0x80`), which adds `128 * sum(q_x)` to the dot product; the block minimum
//! `-128 d` times the activation's precomputed `d_x * sum(q_x)` takes it back out.
//!
//! From four activation rows on (a prompt), whole panels of sixteen columns run the
//! packed kernel of [`super::packed_vnni`] instead of these tiles.

use std::arch::x86_64::*;
use std::ops::Range;

use super::Kernel;
use super::acts::ActsView;
use super::avx2::hsum256;
use super::blocks::GgmlMatrix;
use super::driver::{F_Q4_1, F_Q8_0, check_range, tile_loops};
use super::packed::{self, PANEL};

/// See [`RangeFn`](super::driver::RangeFn). Does nothing (and asserts in debug builds)
/// if the CPU lacks AVX-512 VNNI or the bounds do not hold; the driver checks both first.
pub(super) fn range<const F: u8>(
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if !Kernel::Avx512Vnni.is_available() || !check_range(&w, &a, m, &cols, out, ld) {
        debug_assert!(
            false,
            "AVX-512 kernel called without AVX-512 VNNI or out of bounds"
        );
        return;
    }
    // SAFETY: the CPU has every feature enabled below (checked above), and
    // `check_range` holds.
    unsafe { range_impl::<F>(w, a, m, cols, out, ld) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn range_impl<const F: u8>(
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if packed::takes_packed(m, a.independent) {
        // Whole panels through the packed kernel (sixteen columns with `vpdpbusd`, a last
        // eight through the AVX2 panel), the last few columns through the register tiles.
        let split = cols.start + (cols.end - cols.start) / PANEL * PANEL;
        if split > cols.start {
            // SAFETY: as this function's (the CPU has AVX-512 VNNI and AVX2); the
            // columns are a subrange of `cols`.
            unsafe { packed::range_impl::<F>(true, w, a, m, cols.start..split, out, ld) };
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

/// The factor of `d` that gives the block minimum of Q4_0 and Q8_0.
const fn min_factor(f: u8) -> f32 {
    if f == F_Q8_0 { -128.0 } else { -8.0 }
}

/// Scales and minimums of the blocks at `p0` and `p1` as `[d0, d1, min0, min1]`.
///
/// # Safety
/// `p0` and `p1` point to whole blocks of format `F`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scales2<const F: u8>(p0: *const u8, p1: *const u8) -> __m128 {
    if F == F_Q4_1 {
        // SAFETY: each block starts with two f16 (4 bytes).
        let (h0, h1) = unsafe {
            (
                p0.cast::<i32>().read_unaligned(),
                p1.cast::<i32>().read_unaligned(),
            )
        };
        let v = _mm_cvtph_ps(_mm_setr_epi32(h0, h1, 0, 0)); // [d0, m0, d1, m1]
        _mm_shuffle_ps::<0b11_01_10_00>(v, v) // [d0, d1, m0, m1]
    } else {
        // SAFETY: each block starts with one f16 (2 bytes).
        let (h0, h1) = unsafe {
            (
                p0.cast::<i16>().read_unaligned(),
                p1.cast::<i16>().read_unaligned(),
            )
        };
        let d = _mm_cvtph_ps(_mm_setr_epi16(h0, h1, 0, 0, 0, 0, 0, 0)); // [d0, d1, 0, 0]
        let mins = _mm_mul_ps(d, _mm_set1_ps(min_factor(F)));
        _mm_movelh_ps(d, mins)
    }
}

/// Scale and minimum of one block.
///
/// # Safety
/// `p` points to a whole block of format `F`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scales1<const F: u8>(p: *const u8) -> (f32, f32) {
    if F == F_Q4_1 {
        // SAFETY: the block starts with two f16 (4 bytes).
        let dm = unsafe { p.cast::<i32>().read_unaligned() };
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    } else {
        // SAFETY: the block starts with one f16 (2 bytes).
        let h = unsafe { p.cast::<u16>().read_unaligned() };
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))));
        (d, min_factor(F) * d)
    }
}

/// The 64 unsigned weight quants of the blocks at `p0` and `p1`, in element order.
///
/// # Safety
/// `p0` and `p1` point to whole blocks of format `F`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quants2<const F: u8>(p0: *const u8, p1: *const u8) -> __m512i {
    if F == F_Q8_0 {
        // SAFETY: bytes 2..34 of each block are the quants.
        let (q0, q1) = unsafe {
            (
                _mm256_loadu_si256(p0.add(2).cast()),
                _mm256_loadu_si256(p1.add(2).cast()),
            )
        };
        let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q0), q1);
        _mm512_xor_si512(q, _mm512_set1_epi8(-128))
    } else {
        let off = if F == F_Q4_1 { 4 } else { 2 };
        // SAFETY: the 16 nibble bytes follow each header.
        let (r0, r1) = unsafe {
            (
                _mm_loadu_si128(p0.add(off).cast()),
                _mm_loadu_si128(p1.add(off).cast()),
            )
        };
        // [r0, r0, r1, r1]; shift the second copy of each by 4 to reach the high
        // nibbles (elements 16..32 of the block), then keep the low nibble of each byte.
        let t = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_broadcastsi128_si256(r0)),
            _mm256_broadcastsi128_si256(r1),
        );
        let t = _mm512_srlv_epi64(t, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
        _mm512_and_si512(t, _mm512_set1_epi8(0x0F))
    }
}

/// The 32 unsigned weight quants of the block at `p`, in element order.
///
/// # Safety
/// `p` points to a whole block of format `F`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quants1<const F: u8>(p: *const u8) -> __m256i {
    if F == F_Q8_0 {
        // SAFETY: bytes 2..34 of the block are the quants.
        let q = unsafe { _mm256_loadu_si256(p.add(2).cast()) };
        _mm256_xor_si256(q, _mm256_set1_epi8(-128))
    } else {
        let off = if F == F_Q4_1 { 4 } else { 2 };
        // SAFETY: the 16 nibble bytes follow the header.
        let raw = unsafe { _mm_loadu_si128(p.add(off).cast()) };
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

/// Dot products of `MR` activation rows (from `r0`) with `NR` weight rows (from `w`,
/// `rb` bytes apart), `nb` blocks each.
///
/// # Safety
/// `w` points to `NR` whole rows of `nb` blocks of format `F`; rows `r0..r0 + MR` of
/// `a` exist and have at least `nb` blocks (padded to an even count).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // i, j index several tile arrays at once
unsafe fn tile<const F: u8, const MR: usize, const NR: usize>(
    w: *const u8,
    rb: usize,
    a: &ActsView<'_>,
    r0: usize,
    nb: usize,
) -> [[f32; NR]; MR] {
    let bb = block_bytes(F);
    // Lanes 0..8 take the first block's scale, lanes 8..16 the second's.
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut macc = [[_mm_setzero_ps(); NR]; MR];
    let dptr = a.d.as_ptr();
    let dsptr = a.ds.as_ptr();
    let mut b = 0;
    while b + 2 <= nb {
        let mut wq = [_mm512_setzero_si512(); NR];
        let mut dw = [_mm_setzero_ps(); NR];
        let mut mw = [_mm_setzero_ps(); NR];
        for j in 0..NR {
            // SAFETY: blocks b and b + 1 of weight row j are inside the caller's rows.
            unsafe {
                let p0 = w.add(j * rb + b * bb);
                let p1 = p0.add(bb);
                let dm = scales2::<F>(p0, p1);
                dw[j] = dm;
                mw[j] = _mm_movehl_ps(dm, dm);
                wq[j] = quants2::<F>(p0, p1);
            }
        }
        for i in 0..MR {
            let idx = (r0 + i) * a.stride + b;
            // SAFETY: blocks b and b + 1 of activation row r0 + i exist (rows are padded
            // to an even block count); `idx` is even, so the 64 quant bytes are one
            // 64-byte aligned `Line`, and the two scales and sums are in bounds.
            let (x, dx, dsx) = unsafe {
                (
                    _mm512_load_si512(a.block_ptr(r0 + i, b).cast()),
                    _mm_castpd_ps(_mm_load_sd(dptr.add(idx).cast())),
                    _mm_castpd_ps(_mm_load_sd(dsptr.add(idx).cast())),
                )
            };
            for j in 0..NR {
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[j], x);
                let s = _mm_mul_ps(dw[j], dx); // [d0 dx0, d1 dx1, 0, 0]
                let s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s));
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i][j]);
                macc[i][j] = _mm_fmadd_ps(mw[j], dsx, macc[i][j]); // lanes 2, 3 get 0
            }
        }
        b += 2;
    }
    let mut tail = [[0.0f32; NR]; MR];
    if b < nb {
        let mut wq = [_mm256_setzero_si256(); NR];
        let mut dw = [0.0f32; NR];
        let mut mw = [0.0f32; NR];
        for j in 0..NR {
            // SAFETY: block b of weight row j is inside the caller's rows.
            unsafe {
                let p = w.add(j * rb + b * bb);
                (dw[j], mw[j]) = scales1::<F>(p);
                wq[j] = quants1::<F>(p);
            }
        }
        for i in 0..MR {
            let idx = (r0 + i) * a.stride + b;
            // SAFETY: block b of activation row r0 + i exists; blocks are 32-byte aligned.
            let (x, dx, dsx) = unsafe {
                (
                    _mm256_load_si256(a.block_ptr(r0 + i, b).cast()),
                    *dptr.add(idx),
                    *dsptr.add(idx),
                )
            };
            for j in 0..NR {
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq[j], x);
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[j] * dx));
                tail[i][j] = hsum256(v) + mw[j] * dsx;
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            let m = macc[i][j];
            let mins = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
            res[i][j] = _mm512_reduce_add_ps(acc[i][j]) + mins + tail[i][j];
        }
    }
    res
}
