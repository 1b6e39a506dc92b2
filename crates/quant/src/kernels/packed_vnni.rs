//! The packed GEMM of [`super::packed`] on AVX-512 VNNI: sixteen weight rows per panel,
//! one output column per 32-bit lane of a 512-bit register, and one `vpdpbusd` per
//! broadcast of four activation bytes (sixteen columns, four products each, summed
//! exactly in 32 bits) where AVX2 needs `vpmaddubsw` + `vpmaddwd` for eight columns.
//!
//! The weight is the unsigned operand. Q4 nibbles are unsigned already. Signed 8-bit
//! quants (Q8_0, int8) are stored in the panel with 128 added (`xor 0x80`), which adds
//! `128 x sum(q_x)` of the block to every column's dot product; that integer is
//! subtracted once per block and row, so each block's integer sum is exactly the one
//! the AVX2 packed kernel computes, and the scales apply in the same order: the results
//! equal the AVX2 packed kernel's bit for bit (tested), whichever of the two runs a
//! column.
//!
//! Scratch: `blocks_per_row x (512 + 128)` bytes per task for the panel (30 KiB for
//! `k = 1536`); the offsets come from the activation blocks' integer sums, kept when
//! they were quantized.

use std::arch::x86_64::*;
use std::ops::Range;

use super::acts::ActsView;
use super::amx;
use super::driver::F_Q8_0;
use super::packed::{PANEL, transpose8};

/// Output columns per panel (one 32-bit lane of a 512-bit register each).
pub(super) const PANEL16: usize = 2 * PANEL;

/// Activation rows that share each weight vector loaded.
const MR: usize = 8;

/// One panel of sixteen weight rows, unpacked (see [`super::packed`]'s panel, twice as
/// wide).
struct Panel16 {
    /// `nb x 8` vectors: block `b`, group `g` at `b * 8 + g`; lane `j` holds elements
    /// `4g..4g + 4` of row `j` as unsigned bytes.
    q: Vec<__m512i>,
    /// `nb` vectors of the sixteen rows' scales.
    d: Vec<__m512>,
    /// `nb` vectors of the sixteen rows' minimums (unused for 8-bit weights).
    min: Vec<__m512>,
}

/// [`super::packed::run_panels`] with sixteen-column panels and `vpdpbusd`: the columns
/// `cols` (a multiple of [`PANEL16`] long) for every activation row `r < m`, into
/// `out[r * ld + (c - cols.start)]`. `block(row, b)` gives block `b` of weight row
/// `row`: its 32 elements in order as bytes (signed for [`F_Q8_0`], 0..=15 otherwise),
/// its scale and its minimum.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; activation rows `0..m` of `a`
/// exist with at least `nb` blocks each; `out` holds `(m - 1) * ld + cols.len()`
/// floats; `block` reads only inside the weights for the rows of `cols` and blocks
/// below `nb`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run_panels<const F: u8>(
    nb: usize,
    block: impl Fn(usize, usize) -> (__m256i, f32, f32),
    a: &ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let mut panel = Panel16 {
        q: vec![_mm512_setzero_si512(); nb * 8],
        d: vec![_mm512_setzero_ps(); nb],
        min: vec![_mm512_setzero_ps(); nb],
    };
    let flip = _mm256_set1_epi8(-128);
    // Activation rows in whole tiles of sixteen, on AMX tiles where available.
    let tiled = if m >= amx::AMX_MIN_ROWS && amx::amx_available() {
        m - m % PANEL16
    } else {
        0
    };
    let offsets = if tiled > 0 && F == F_Q8_0 {
        amx::offsets(a, tiled, 128)
    } else {
        Vec::new()
    };
    let mut sums = amx::Sums::pair();
    // SAFETY: `amx_available` held.
    let tiles_held = (tiled > 0).then(|| unsafe { amx::Tiles::acquire() });
    let mut c = cols.start;
    while c + PANEL16 <= cols.end {
        for b in 0..nb {
            let mut v = [_mm256_setzero_si256(); PANEL16];
            let mut d = [0.0f32; PANEL16];
            let mut mn = [0.0f32; PANEL16];
            for j in 0..PANEL16 {
                let (q, dj, mj) = block(c + j, b);
                v[j] = if F == F_Q8_0 {
                    _mm256_xor_si256(q, flip)
                } else {
                    q
                };
                (d[j], mn[j]) = (dj, mj);
            }
            let lo = transpose8([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]);
            let hi = transpose8([v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]]);
            if let (Some(q), Some(dv), Some(mv)) = (
                panel.q.get_mut(b * 8..b * 8 + 8),
                panel.d.get_mut(b),
                panel.min.get_mut(b),
            ) {
                for g in 0..8 {
                    q[g] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo[g]), hi[g]);
                }
                // SAFETY: both arrays hold sixteen floats.
                unsafe {
                    *dv = _mm512_loadu_ps(d.as_ptr());
                    *mv = _mm512_loadu_ps(mn.as_ptr());
                }
            }
        }
        let cc = c - cols.start;
        let mut r = 0;
        // Whole tiles of sixteen rows on AMX where the CPU has it (the same bits).
        while r < tiled {
            // SAFETY: the tiles are configured (`tiles_held`); rows r..r + 16 exist with
            // nb blocks, the panel holds nb blocks.
            let acc = unsafe {
                amx::packed_rows::<F>(
                    &panel.q, &panel.d, &panel.min, a, &offsets, r, nb, &mut sums,
                )
            };
            for (i, v) in acc.iter().enumerate() {
                let at = (r + i) * ld + cc;
                if let Some(dst) = out.get_mut(at..at + PANEL16) {
                    // SAFETY: dst holds sixteen floats.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *v) };
                }
            }
            r += PANEL16;
        }
        while r < m {
            // SAFETY: activation rows r..r + mr are below m, with their blocks' sums, and
            // the output rows hold columns cc..cc + 16 (the caller's bounds).
            unsafe {
                match m - r {
                    1 => rows::<F, 1>(&panel, a, r, nb, out, ld, cc),
                    2 => rows::<F, 2>(&panel, a, r, nb, out, ld, cc),
                    3 => rows::<F, 3>(&panel, a, r, nb, out, ld, cc),
                    4 => rows::<F, 4>(&panel, a, r, nb, out, ld, cc),
                    5 => rows::<F, 5>(&panel, a, r, nb, out, ld, cc),
                    6 => rows::<F, 6>(&panel, a, r, nb, out, ld, cc),
                    7 => rows::<F, 7>(&panel, a, r, nb, out, ld, cc),
                    _ => rows::<F, MR>(&panel, a, r, nb, out, ld, cc),
                }
            }
            r += MR;
        }
        c += PANEL16;
    }
    drop(tiles_held);
}

/// Activation rows `r0..r0 + R` against the panel: sixteen columns each, written at
/// `out[(r0 + i) * ld + cc..][..16]`.
///
/// # Safety
/// Rows `r0..r0 + R` of `a` exist with at least `nb` blocks, the panel holds `nb`
/// blocks, and `out` holds `(r0 + R - 1) * ld + cc + 16` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)] // i indexes several arrays
unsafe fn rows<const F: u8, const R: usize>(
    panel: &Panel16,
    a: &ActsView<'_>,
    r0: usize,
    nb: usize,
    out: &mut [f32],
    ld: usize,
    cc: usize,
) {
    let mut acc = [_mm512_setzero_ps(); R];
    let dptr = a.d.as_ptr();
    let dsptr = a.ds.as_ptr();
    let q = panel.q.as_ptr();
    for b in 0..nb {
        let mut s = [_mm512_setzero_si512(); R];
        let mut x = [std::ptr::null::<i8>(); R];
        for i in 0..R {
            x[i] = a.block_ptr(r0 + i, b);
        }
        for g in 0..8 {
            // SAFETY: the panel holds nb * 8 vectors.
            let wv = unsafe { _mm512_load_si512(q.add(b * 8 + g).cast()) };
            for i in 0..R {
                // SAFETY: block b of row r0 + i holds 32 bytes; 4g + 4 <= 32.
                let xb =
                    _mm512_set1_epi32(unsafe { x[i].add(4 * g).cast::<i32>().read_unaligned() });
                s[i] = _mm512_dpbusd_epi32(s[i], wv, xb);
            }
        }
        let dw = panel.d[b];
        let mw = panel.min[b];
        for i in 0..R {
            let idx = (r0 + i) * a.stride + b;
            // SAFETY: the scales hold `stride` entries per row (checked by the caller).
            let (dx, dsx) = unsafe { (*dptr.add(idx), *dsptr.add(idx)) };
            let s32 = if F == F_Q8_0 {
                // 128 x the block's quant sum: what the offset weights add. SAFETY: the
                // sums hold `stride` entries per row, as the scales.
                let off = 128 * unsafe { *a.sums.as_ptr().add(idx) };
                _mm512_sub_epi32(s[i], _mm512_set1_epi32(off))
            } else {
                s[i]
            };
            acc[i] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(s32),
                _mm512_mul_ps(dw, _mm512_set1_ps(dx)),
                acc[i],
            );
            if F != F_Q8_0 {
                acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsx), acc[i]);
            }
        }
    }
    for i in 0..R {
        let at = (r0 + i) * ld + cc;
        if let Some(dst) = out.get_mut(at..at + PANEL16) {
            // SAFETY: dst holds sixteen floats.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), acc[i]) };
        }
    }
}
