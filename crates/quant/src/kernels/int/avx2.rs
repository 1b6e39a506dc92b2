//! AVX2 kernels for [`IntWeights`]: `vpmaddubsw` (u8 x i8 -> i16 pairs) + `vpmaddwd`
//! (-> i32), then one FMA per block into f32 accumulators scaled by the activation
//! block's `d`.
//!
//! - Int8 weights are signed, so the sign trick moves the weight's sign onto the
//!   activation: `maddubs(|w|, sign(x, w))`. `|w| <= 128` and `|x| <= 127`, so a pair
//!   sum is at most 32,512 and the i16 lanes never saturate. The row's scale multiplies
//!   the finished sum once.
//! - Int4 nibbles (0..=15) are the unsigned operand directly. One 32-byte load holds two
//!   blocks; its low nibbles meet the activations' elements `0..16` of both blocks and
//!   its high nibbles elements `16..32`, rearranged once per call to match
//!   ([`IntActs`]). The two `maddubs` results add in i16 (at most 7,620 per lane), so a
//!   pair of blocks costs one `madd`, one conversion and one FMA with the per-lane factor
//!   `scale_g * d_x`. The symmetric offset (`-8`) is folded in as the integer
//!   `-8 * sum(q_x)`; an asymmetric minimum adds `min_g * d_x * sum(q_x)` with one more
//!   FMA.
//!
//! Loops:
//! - one activation row (decode), matrix up to [`DECODE_CACHED_BYTES`] of quants:
//!   tiles of 1 x [`DECODE_NR`] weight rows, independent sums that hide the latency of
//!   each row's chain, prefetching rows ahead;
//! - one activation row, larger matrix: each weight row streamed on its own with
//!   several accumulators and prefetching [`PF`] bytes ahead, which reads memory
//!   fastest;
//! - several rows: register tiles ([`tile_shape`]) over blocks of weight rows
//!   ([`WEIGHT_BLOCK_BYTES`]) that stay in L2 while every group of activation rows,
//!   in L1, meets them, so weights come from memory once per call.
//!
//! For a given matrix and row count, every output is summed in the same order whatever
//! its tile or the split across threads, so results do not depend on the thread count.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::Kernel;
use super::super::avx2::{self as ggml_avx2, hsum256};
use super::super::blocks::BLOCK_ELEMS;
use super::super::driver::store;
use super::super::driver::{F_Q4_1, F_Q8_0};
use super::super::packed::{PANEL, run_panels_on, takes_packed};
use super::IntWeights;
use super::driver::{I4_ASYM, I4_SYM, I8, IntActs, check_range, format_is};

/// Register tile shape (activation rows x weight rows) for several activation rows:
/// int8 keeps 8 accumulators and 4 weight registers (`q`, `|q|` of two rows); int4's
/// weights take more registers (low and high nibbles, per-lane scales), so it keeps
/// one weight row against more activation rows, which fits in the 16 `ymm` registers.
const fn tile_shape(f: u8) -> (usize, usize) {
    if f == I8 { (4, 2) } else { (INT4_MR, 1) }
}

/// Activation rows per int4 register tile.
const INT4_MR: usize = 6;

/// See [`IntRangeFn`](super::driver::IntRangeFn). `F` is the format id, `G` the blocks
/// per int4 group; `V` runs a prompt's panels with AVX-512 VNNI
/// ([`super::super::packed_vnni`]). Does nothing (and asserts in debug builds) if the
/// CPU lacks AVX2 (or AVX-512 VNNI for `V`), the weights are of another format or the
/// bounds do not hold; the driver checks all three first.
pub(super) fn range<const F: u8, const G: usize, const V: bool>(
    w: &IntWeights,
    a: &IntActs<'_>,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if !Kernel::Avx2.is_available()
        || (V && !Kernel::Avx512Vnni.is_available())
        || !format_is::<F, G>(w.format)
        || !check_range(w, a, &cols, out, ld, F != I8)
    {
        debug_assert!(
            false,
            "AVX2 integer kernel called without AVX2 or out of bounds"
        );
        return;
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked above), the format is the one the
    // kernel reads, and `check_range` holds.
    unsafe { range_impl::<F, G, V>(w, a, cols, out, ld) }
}

/// # Safety
/// As [`range`] after its checks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn range_impl<const F: u8, const G: usize, const V: bool>(
    w: &IntWeights,
    a: &IntActs<'_>,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if takes_packed(a.m, a.view.independent) {
        // Whole panels through the packed kernel, the last few columns through the
        // register tiles below.
        let split = cols.start + (cols.end - cols.start) / PANEL * PANEL;
        if split > cols.start {
            // SAFETY: as this function's; the columns are a subrange of `cols`.
            unsafe { packed::<F>(V, w, a, cols.start..split, out, ld) };
        }
        if split == cols.end {
            return;
        }
        let out = &mut out[split - cols.start..];
        // SAFETY: as this function's, for the remaining columns.
        return unsafe { tiles::<F, G>(w, a, split..cols.end, out, ld) };
    }
    // SAFETY: as this function's.
    unsafe { tiles::<F, G>(w, a, cols, out, ld) }
}

/// The packed kernel ([`run_panels_on`], with AVX-512 VNNI where `vnni` is set) over
/// the columns `cols`, a multiple of [`PANEL`] long: int8 as signed quants with the row's scale for every block, int4
/// as nibbles with each block's group scale and minimum (`-8 x scale` when symmetric).
///
/// # Safety
/// As [`range`] after its checks, and `cols` is a multiple of [`PANEL`] long.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed<const F: u8>(
    vnni: bool,
    w: &IntWeights,
    a: &IntActs<'_>,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let (k, nb) = (w.k, a.nb);
    let rb = w.format.quant_bytes_per_row(k);
    let groups = w.format.groups_per_row(k);
    let blocks_per_group = (k / groups.max(1) / BLOCK_ELEMS).max(1);
    let base = w.quants.as_ptr();
    let block = |row: usize, b: usize| {
        // SAFETY: rows of `cols` are below n_out and block b below k / 32 (checked by
        // the caller), so the quants, scales and minimums read lie inside the weights.
        unsafe {
            if F == I8 {
                let q = _mm256_loadu_si256(base.add(row * rb + b * BLOCK_ELEMS).cast());
                (q, *w.scales.as_ptr().add(row), 0.0)
            } else {
                let q = ggml_avx2::nibbles(base.add(row * rb + b * BLOCK_ELEMS / 2));
                let g = row * groups + b / blocks_per_group;
                let d = *w.scales.as_ptr().add(g);
                let min = if F == I4_ASYM {
                    *w.mins.as_ptr().add(g)
                } else {
                    -8.0 * d
                };
                (q, d, min)
            }
        }
    };
    // SAFETY: the caller's bounds; `block` reads inside the weights. Int8 takes the signed
    // arithmetic of Q8_0, int4 that of the 4-bit formats with minimums.
    unsafe {
        if F == I8 {
            run_panels_on::<F_Q8_0>(vnni, nb, block, &a.view, a.m, cols, out, ld)
        } else {
            run_panels_on::<F_Q4_1>(vnni, nb, block, &a.view, a.m, cols, out, ld)
        }
    }
}

/// The register tiles and the decode loops (see the module docs).
///
/// # Safety
/// As [`range`] after its checks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiles<const F: u8, const G: usize>(
    w: &IntWeights,
    a: &IntActs<'_>,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let c0 = cols.start;
    // By the whole matrix, not this range, so that the split does not change the sums
    // (the two decode loops add in different orders).
    let cached = w.quants.len() <= DECODE_CACHED_BYTES;
    if a.m == 1 && cached {
        let rb = w.format.quant_bytes_per_row(w.k);
        let groups = w.format.groups_per_row(w.k);
        let ahead = (2 * PF).div_ceil(rb).max(DECODE_NR);
        let mut c = c0;
        while c + DECODE_NR <= cols.end {
            let next = c + ahead;
            prefetch_lines(w.quants.as_ptr().wrapping_add(next * rb), DECODE_NR * rb);
            if F != I8 {
                let bytes = DECODE_NR * groups * 4;
                prefetch_lines(w.scales.as_ptr().wrapping_add(next * groups).cast(), bytes);
                if F == I4_ASYM {
                    prefetch_lines(w.mins.as_ptr().wrapping_add(next * groups).cast(), bytes);
                }
            }
            // SAFETY: weight rows c..c + DECODE_NR are below n_out (checked).
            let t = unsafe { tile::<F, G, 1, DECODE_NR>(w, c, a, 0) };
            store(&t, out, ld, 0, c - c0);
            c += DECODE_NR;
        }
        while c < cols.end {
            // SAFETY: weight row c is below n_out (checked).
            let t = unsafe { tile::<F, G, 1, 1>(w, c, a, 0) };
            store(&t, out, ld, 0, c - c0);
            c += 1;
        }
        return;
    }
    if a.m == 1 {
        for c in cols {
            // SAFETY: row c is below n_out (checked) and `a` has one row.
            let v = unsafe {
                if F == I8 {
                    gemv_i8(w, c, a)
                } else {
                    gemv_i4::<F, G>(w, c, a)
                }
            };
            if let Some(o) = out.get_mut(c - c0) {
                *o = v;
            }
        }
        return;
    }
    // Blocks of weight rows small enough to stay in L2 while every group of activation
    // rows (in L1) meets each of their rows: the weights come from memory once, and
    // the activations are read from L1 by every tile.
    let (mr_max, nr) = tile_shape(F);
    let block = (WEIGHT_BLOCK_BYTES / w.format.quant_bytes_per_row(w.k).max(1))
        .clamp(2, 256)
        .next_multiple_of(2);
    let mut cb = c0;
    while cb < cols.end {
        let ce = (cb + block).min(cols.end);
        let mut r = 0;
        while r < a.m {
            let mr = (a.m - r).min(mr_max);
            let mut c = cb;
            while c < ce {
                // SAFETY: weight rows c..c + 2 (or c + 1) are below n_out and activation
                // rows r..r + mr below m (checked).
                unsafe {
                    if nr == 2 && c + 2 <= ce {
                        tile_rows::<F, G, 2>(mr, w, c, a, r, out, ld, c - c0);
                        c += 2;
                    } else {
                        tile_rows::<F, G, 1>(mr, w, c, a, r, out, ld, c - c0);
                        c += 1;
                    }
                }
            }
            r += mr;
        }
        cb = ce;
    }
}

/// Weight rows per tile with one activation row (matrices up to
/// [`DECODE_CACHED_BYTES`]): four independent sums hide the latency of each row's chain.
const DECODE_NR: usize = 4;

/// How far ahead (bytes of quants) the row-streaming loops prefetch; the 1 x
/// [`DECODE_NR`] tiles prefetch whole rows twice as far ahead. Measured on a Zen 3,
/// one thread: the int8 LM head (28 MB) from 2.1 ms to about 1.4 ms; a 0.9 MB int8
/// matrix read from memory, in tiles, from 130 us to about 63 us.
const PF: usize = 4096;

/// A hint to load the cache line at `p` (any address: prefetches never fault).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch(p: *const u8) {
    // A prefetch reads nothing the program sees and does not fault, whatever the address.
    _mm_prefetch::<_MM_HINT_T0>(p.cast())
}

/// Prefetches the cache lines of `bytes` bytes from `p` (any address).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch_lines(p: *const u8, bytes: usize) {
    let mut off = 0;
    while off < bytes {
        prefetch(p.wrapping_add(off));
        off += 64;
    }
}

/// Above this many bytes of weight quants, one activation row streams the weight rows
/// one at a time instead of in 1 x [`DECODE_NR`] tiles. Both prefetch; for matrices
/// read from memory they measured about the same up to this size (tiles faster when
/// the matrix is in cache), and streaming faster for larger ones (the int8 LM head:
/// 1.3-1.6 ms against 1.3-2.0 ms, a noisy machine).
const DECODE_CACHED_BYTES: usize = 1 << 20;

/// Bytes of weight quants per block of rows in the batched loop.
const WEIGHT_BLOCK_BYTES: usize = 64 * 1024;

/// One `mr x NR` tile (`mr <= 6`): activation rows `r..r + mr` against weight rows
/// `c..c + NR`, stored at row `r`, column `cc` of `out`.
///
/// # Safety
/// As [`range`] after its checks, with `r + mr <= m` and `c + NR <= n_out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<const F: u8, const G: usize, const NR: usize>(
    mr: usize,
    w: &IntWeights,
    c: usize,
    a: &IntActs<'_>,
    r: usize,
    out: &mut [f32],
    ld: usize,
    cc: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match mr {
            6 => store(&tile::<F, G, 6, NR>(w, c, a, r), out, ld, r, cc),
            5 => store(&tile::<F, G, 5, NR>(w, c, a, r), out, ld, r, cc),
            4 => store(&tile::<F, G, 4, NR>(w, c, a, r), out, ld, r, cc),
            3 => store(&tile::<F, G, 3, NR>(w, c, a, r), out, ld, r, cc),
            2 => store(&tile::<F, G, 2, NR>(w, c, a, r), out, ld, r, cc),
            _ => store(&tile::<F, G, 1, NR>(w, c, a, r), out, ld, r, cc),
        }
    }
}

/// `MR2 x NR` dot products: activation rows `r0..r0 + MR2`, weight rows `c..c + NR`.
///
/// # Safety
/// As [`range`] after its checks, with `r0 + MR2 <= m` and `c + NR <= n_out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const F: u8, const G: usize, const MR2: usize, const NR: usize>(
    w: &IntWeights,
    c: usize,
    a: &IntActs<'_>,
    r0: usize,
) -> [[f32; NR]; MR2] {
    // SAFETY: forwarded from the caller.
    unsafe {
        if F == I8 {
            tile_i8::<MR2, NR>(w, c, a, r0)
        } else {
            tile_i4::<F, G, MR2, NR>(w, c, a, r0)
        }
    }
}

/// `sum(|w| * sign(x, w))` over one block of 32 as eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_i8(wabs: __m256i, wq: __m256i, x: __m256i) -> __m256i {
    let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, wq));
    _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
}

/// Int8: `MR2 x NR` tile.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // i, j index several tile arrays at once
unsafe fn tile_i8<const MR2: usize, const NR: usize>(
    w: &IntWeights,
    c: usize,
    a: &IntActs<'_>,
    r0: usize,
) -> [[f32; NR]; MR2] {
    let k = w.k;
    let wp = w.quants.as_ptr();
    let dptr = a.view.d.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); NR]; MR2];
    for b in 0..a.nb {
        let mut wq = [_mm256_setzero_si256(); NR];
        let mut wabs = [_mm256_setzero_si256(); NR];
        for j in 0..NR {
            // SAFETY: block b of weight row c + j: bytes (c + j) k + 32 b .. + 32, inside
            // the quants (row below n_out, b < k / 32).
            wq[j] = unsafe { _mm256_loadu_si256(wp.add((c + j) * k + 32 * b).cast()) };
            wabs[j] = _mm256_abs_epi8(wq[j]);
        }
        for i in 0..MR2 {
            // SAFETY: block b of activation row r0 + i exists; quants are 32-byte
            // aligned (`Line` is 64-byte aligned, blocks are 32 bytes).
            let (x, dx) = unsafe {
                (
                    _mm256_load_si256(a.view.block_ptr(r0 + i, b).cast()),
                    _mm256_set1_ps(*dptr.add((r0 + i) * a.view.stride + b)),
                )
            };
            for j in 0..NR {
                let p = _mm256_cvtepi32_ps(dot_i8(wabs[j], wq[j], x));
                acc[i][j] = _mm256_fmadd_ps(p, dx, acc[i][j]);
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR2];
    for j in 0..NR {
        // SAFETY: row c + j is below n_out and int8 has one scale per row.
        let s = unsafe { *w.scales.as_ptr().add(c + j) };
        for i in 0..MR2 {
            res[i][j] = hsum256(acc[i][j]) * s;
        }
    }
    res
}

/// Int8, one activation row: weight row `c` streamed with four accumulators.
///
/// # Safety
/// As [`range`] after its checks, with `c < n_out` and `m == 1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_i8(w: &IntWeights, c: usize, a: &IntActs<'_>) -> f32 {
    let nb = a.nb;
    // SAFETY: row c starts at byte c k of the quants (c < n_out).
    let wp = unsafe { w.quants.as_ptr().add(c * w.k) };
    let xp = a.view.block_ptr(0, 0);
    let dp = a.view.d.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut b = 0;
    while b + 4 <= nb {
        prefetch(wp.wrapping_add(32 * b + PF));
        prefetch(wp.wrapping_add(32 * b + PF + 64));
        // SAFETY: blocks b..b + 4 exist (b + 3 < nb).
        unsafe {
            acc[0] = step_i8(wp, xp, dp, b, acc[0]);
            acc[1] = step_i8(wp, xp, dp, b + 1, acc[1]);
            acc[2] = step_i8(wp, xp, dp, b + 2, acc[2]);
            acc[3] = step_i8(wp, xp, dp, b + 3, acc[3]);
        }
        b += 4;
    }
    while b < nb {
        // SAFETY: b < nb.
        acc[0] = unsafe { step_i8(wp, xp, dp, b, acc[0]) };
        b += 1;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    // SAFETY: c < n_out, one scale per row.
    hsum256(sum) * unsafe { *w.scales.as_ptr().add(c) }
}

/// `acc + d_x * dot` for block `b` of an int8 weight row `wp` and an activation row
/// (quants `xp`, scales `dp`).
///
/// # Safety
/// Block `b` exists in all three (the quants of `xp` 32-byte aligned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_i8(wp: *const u8, xp: *const i8, dp: *const f32, b: usize, acc: __m256) -> __m256 {
    // SAFETY: block b is in bounds of the three arrays (caller).
    let (wq, x, dx) = unsafe {
        (
            _mm256_loadu_si256(wp.add(32 * b).cast()),
            _mm256_load_si256(xp.add(32 * b).cast()),
            _mm256_set1_ps(*dp.add(b)),
        )
    };
    let p = _mm256_cvtepi32_ps(dot_i8(_mm256_abs_epi8(wq), wq, x));
    _mm256_fmadd_ps(p, dx, acc)
}

/// The nibbles of block pair `p` of the int4 row at `row` as (low, high): with a full
/// pair, 32 bytes; with only block `2p` (the last of an odd count), 16 bytes and zeros.
///
/// # Safety
/// The row has block `2p`, and block `2p + 1` when `full`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(row: *const u8, p: usize, full: bool) -> (__m256i, __m256i) {
    let mask = _mm256_set1_epi8(0x0F);
    if full {
        // SAFETY: blocks 2p and 2p + 1 are bytes 32 p .. 32 p + 32 of the row.
        let v = unsafe { _mm256_loadu_si256(row.add(32 * p).cast()) };
        (
            _mm256_and_si256(v, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
        )
    } else {
        // SAFETY: block 2p is bytes 32 p .. 32 p + 16 of the row.
        let v = unsafe { _mm_loadu_si128(row.add(32 * p).cast()) };
        let zero = _mm_setzero_si128();
        let lo = _mm_and_si128(v, _mm256_castsi256_si128(mask));
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), _mm256_castsi256_si128(mask));
        (_mm256_set_m128i(zero, lo), _mm256_set_m128i(zero, hi))
    }
}

/// The per-lane value of a per-group array (scales or minimums) for block pair `p`:
/// lanes `0..4` for block `2p`, `4..8` for block `2p + 1`.
///
/// # Safety
/// `v` is the row's array of groups of `G` blocks; the row has block `2p`, and block
/// `2p + 1` when `full`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn per_lane<const G: usize>(v: *const f32, p: usize, full: bool) -> __m256 {
    if G == 1 && full {
        // SAFETY: groups 2p and 2p + 1 exist (caller): 8 bytes, read unaligned.
        let two = unsafe { v.add(2 * p).cast::<i64>().read_unaligned() };
        let idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        _mm256_permutevar8x32_ps(_mm256_castsi256_ps(_mm256_set1_epi64x(two)), idx)
    } else {
        // Both blocks are in one group (groups are whole pairs for G >= 2); for a lone
        // last block the lanes of the missing one meet zeros.
        // SAFETY: group 2p / G exists (caller).
        _mm256_set1_ps(unsafe { *v.add(2 * p / G) })
    }
}

/// The i32 lane sums of one block pair: `nibble * q_x` over both halves, plus the
/// symmetric offset.
///
/// # Safety
/// `idx < a.pairs.len()` (and `a.qs.len()` for the symmetric format).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i4<const F: u8>(lo: __m256i, hi: __m256i, a: &IntActs<'_>, idx: usize) -> __m256i {
    // SAFETY: `idx` is in bounds (caller); a `Line` is 64-byte aligned, its halves 32.
    let (xl, xh) = unsafe {
        let line = a.pairs.as_ptr().add(idx).cast::<__m256i>();
        (_mm256_load_si256(line), _mm256_load_si256(line.add(1)))
    };
    let p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    if F == I4_SYM {
        // SAFETY: as above.
        let q = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(idx).cast()) };
        _mm256_add_epi32(p32, q)
    } else {
        p32
    }
}

/// Int4: `MR2 x NR` tile.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // i, j index several tile arrays at once
unsafe fn tile_i4<const F: u8, const G: usize, const MR2: usize, const NR: usize>(
    w: &IntWeights,
    c: usize,
    a: &IntActs<'_>,
    r0: usize,
) -> [[f32; NR]; MR2] {
    let (nb, np) = (a.nb, a.np);
    let rb = w.k / 2;
    let groups = w.k / (32 * G);
    let mut acc = [[_mm256_setzero_ps(); NR]; MR2];
    // With one activation row (decode), the minimums get their own sums so that each
    // chain of dependent FMAs is half as long; larger tiles have no registers to spare.
    let mut macc = [_mm256_setzero_ps(); NR];
    for p in 0..nb.div_ceil(2) {
        let full = 2 * p + 1 < nb;
        let mut lo = [_mm256_setzero_si256(); NR];
        let mut hi = [_mm256_setzero_si256(); NR];
        let mut sv = [_mm256_setzero_ps(); NR];
        let mut mv = [_mm256_setzero_ps(); NR];
        for j in 0..NR {
            // SAFETY: weight row c + j is below n_out, so its quants, scales and
            // (asymmetric) minimums are in bounds; block 2p exists, 2p + 1 when `full`.
            unsafe {
                (lo[j], hi[j]) = nibbles(w.quants.as_ptr().add((c + j) * rb), p, full);
                sv[j] = per_lane::<G>(w.scales.as_ptr().add((c + j) * groups), p, full);
                if F == I4_ASYM {
                    mv[j] = per_lane::<G>(w.mins.as_ptr().add((c + j) * groups), p, full);
                }
            }
        }
        for i in 0..MR2 {
            let idx = (r0 + i) * np + p;
            // SAFETY: row r0 + i < m and p < np, so idx < m * np (checked lengths).
            let (dx, ds) = unsafe {
                (
                    _mm256_loadu_ps(a.dx.as_ptr().add(idx).cast()),
                    if F == I4_ASYM {
                        _mm256_loadu_ps(a.ds.as_ptr().add(idx).cast())
                    } else {
                        _mm256_setzero_ps()
                    },
                )
            };
            for j in 0..NR {
                // SAFETY: as above.
                let p32 = unsafe { dot_i4::<F>(lo[j], hi[j], a, idx) };
                let s = _mm256_mul_ps(sv[j], dx);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), s, acc[i][j]);
                if F == I4_ASYM && MR2 == 1 {
                    macc[j] = _mm256_fmadd_ps(mv[j], ds, macc[j]);
                } else if F == I4_ASYM {
                    acc[i][j] = _mm256_fmadd_ps(mv[j], ds, acc[i][j]);
                }
            }
        }
    }
    let mut res = [[0.0f32; NR]; MR2];
    for i in 0..MR2 {
        for j in 0..NR {
            res[i][j] = if F == I4_ASYM && MR2 == 1 {
                hsum256(_mm256_add_ps(acc[i][j], macc[j]))
            } else {
                hsum256(acc[i][j])
            };
        }
    }
    res
}

/// Int4, one activation row: weight row `c` streamed with two accumulators (two more
/// for the minimums).
///
/// # Safety
/// As [`range`] after its checks, with `c < n_out` and `m == 1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_i4<const F: u8, const G: usize>(w: &IntWeights, c: usize, a: &IntActs<'_>) -> f32 {
    let nb = a.nb;
    let groups = w.k / (32 * G);
    let row = Row {
        // SAFETY: row c < n_out: its quants and scales are in bounds.
        q: unsafe { w.quants.as_ptr().add(c * w.k / 2) },
        // SAFETY: as above.
        s: unsafe { w.scales.as_ptr().add(c * groups) },
        // Read only when asymmetric, where the row's minimums are in bounds.
        m: w.mins.as_ptr().wrapping_add(c * groups),
    };
    let z = _mm256_setzero_ps();
    let (mut acc0, mut acc1) = ((z, z), (z, z));
    let full_pairs = nb / 2;
    let mut p = 0;
    while p + 2 <= full_pairs {
        prefetch(row.q.wrapping_add(32 * p + PF));
        prefetch(row.s.wrapping_add(2 * p / G + PF / 16).cast());
        if F == I4_ASYM {
            prefetch(row.m.wrapping_add(2 * p / G + PF / 16).cast());
        }
        // SAFETY: blocks 2p .. 2p + 4 exist (p + 1 < full_pairs = nb / 2), and the single
        // activation row has np >= full_pairs pairs.
        unsafe {
            acc0 = step_i4::<F, G>(&row, a, p, true, acc0);
            acc1 = step_i4::<F, G>(&row, a, p + 1, true, acc1);
        }
        p += 2;
    }
    if p < full_pairs {
        // SAFETY: blocks 2p and 2p + 1 exist (p < full_pairs); pair p of the row does.
        acc0 = unsafe { step_i4::<F, G>(&row, a, p, true, acc0) };
        p += 1;
    }
    if nb % 2 == 1 {
        // SAFETY: block 2p = nb - 1 is the lone last block; pair p is the row's last.
        acc1 = unsafe { step_i4::<F, G>(&row, a, p, false, acc1) };
    }
    let dots = _mm256_add_ps(acc0.0, acc1.0);
    let mins = _mm256_add_ps(acc0.1, acc1.1);
    hsum256(_mm256_add_ps(dots, mins))
}

/// One int4 weight row: quants, scales and (asymmetric) minimums.
struct Row {
    q: *const u8,
    s: *const f32,
    m: *const f32,
}

/// Block pair `p` of `row` against activation row 0: `(acc + dots, macc + mins)`.
///
/// # Safety
/// The row has block `2p`, and `2p + 1` when `full`; `p < a.np`; `row.m` is the row's
/// minimums when the format is asymmetric.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_i4<const F: u8, const G: usize>(
    row: &Row,
    a: &IntActs<'_>,
    p: usize,
    full: bool,
    (acc, macc): (__m256, __m256),
) -> (__m256, __m256) {
    // SAFETY: the blocks, groups and activation pair are in bounds (caller).
    unsafe {
        let (lo, hi) = nibbles(row.q, p, full);
        let p32 = dot_i4::<F>(lo, hi, a, p);
        let dx = _mm256_loadu_ps(a.dx.as_ptr().add(p).cast());
        let s = _mm256_mul_ps(per_lane::<G>(row.s, p, full), dx);
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), s, acc);
        if F == I4_ASYM {
            let ds = _mm256_loadu_ps(a.ds.as_ptr().add(p).cast());
            (
                acc,
                _mm256_fmadd_ps(per_lane::<G>(row.m, p, full), ds, macc),
            )
        } else {
            (acc, macc)
        }
    }
}
