//! Packed GEMM on AVX2 for the GGML formats and afo's integer formats, for prompts of
//! at least [`PACKED_MIN_ROWS`] activation rows (batched decode steps keep the register
//! tiles: see [`QuantizedActs::set_independent_rows`](super::QuantizedActs::set_independent_rows)).
//!
//! Eight weight rows (eight output columns) form a panel. Each call unpacks a panel
//! once into a small buffer that stays in L1: per block, eight 32-byte vectors, vector
//! `g` holding elements `4g..4g + 4` of each of the eight rows (row `j` in 32-bit lane
//! `j`; Q4 nibbles widened to bytes), and the eight rows' scales (and minimums) as one
//! f32 vector each. The activation rows then stream past the panel: four activation
//! bytes are broadcast to every lane, so one `vpmaddubsw` (+ `vpmaddwd`) leaves in lane
//! `j` the partial dot product of weight row `j` — eight output columns per
//! instruction, no horizontal sums — and a block's scales apply as one vector FMA per
//! activation row. Q4 products of a block are summed in 16 bits (at most
//! `16 x 15 x 127 = 30,480`, no saturation) and widened once per block; Q8_0 uses the
//! sign trick of the tile kernel and widens every group (a pair sum may reach
//! 32,512). Four activation rows share each weight vector loaded.
//!
//! Scratch: `blocks_per_row x (256 + 64)` bytes per task (the panel's quants, scales
//! and minimums; 15 KiB for `k = 1536`), reused for every panel of the task.

use std::arch::x86_64::*;
use std::ops::Range;

use super::acts::ActsView;
use super::avx2::{quants, scales};
use super::blocks::GgmlMatrix;
use super::driver::{F_Q4_0, F_Q4_1, F_Q8_0};
use super::packed_vnni::{self, PANEL16};

/// Output columns per panel (one 32-bit lane each).
pub(super) const PANEL: usize = 8;

/// Activation rows from which the packed kernel runs instead of the register tiles:
/// unpacking a panel costs about what one activation row's products cost, so from a
/// few rows on it pays. The crossover was not measured; the `prefill_` bench measures
/// 512 rows.
pub(super) const PACKED_MIN_ROWS: usize = 4;

/// Whether a call of `m` activation rows takes the packed kernel (on AVX2): a prompt of
/// at least [`PACKED_MIN_ROWS`] rows, not rows declared independent sequences.
pub(super) fn takes_packed(m: usize, independent: bool) -> bool {
    m >= PACKED_MIN_ROWS && !independent
}

/// Activation rows that share each weight vector loaded.
const MR: usize = 4;

/// One panel, unpacked: what [`run_panels`] fills from each format's blocks (and the
/// AVX2 prompt kernel of [`super::panels`] from a stored panel's half) and reads.
pub(super) struct Panel {
    /// `nb x 8` vectors: block `b`, group `g` at `b * 8 + g`.
    pub(super) q: Vec<__m256i>,
    /// `nb` vectors of the eight rows' scales.
    pub(super) d: Vec<__m256>,
    /// `nb` vectors of the eight rows' minimums (Q4_1 `m`, Q4_0 `-8 d`; unused for Q8_0
    /// and, for Q4_0, by [`panel_rows`] with the offset arithmetic).
    pub(super) min: Vec<__m256>,
}

impl Panel {
    /// A panel of `nb` blocks, zeroed.
    #[target_feature(enable = "avx2")]
    pub(super) fn new(nb: usize) -> Self {
        Self {
            q: vec![_mm256_setzero_si256(); nb * 8],
            d: vec![_mm256_setzero_ps(); nb],
            min: vec![_mm256_setzero_ps(); nb],
        }
    }

    /// Sets block `b` from the eight rows' quants (`v[j]`: the 32 elements of row `j`
    /// in order, as bytes), scales and minimums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn set(&mut self, b: usize, v: [__m256i; PANEL], d: &[f32; PANEL], min: &[f32; PANEL]) {
        let g = transpose8(v);
        if let (Some(q), Some(dv), Some(mv)) = (
            self.q.get_mut(b * 8..b * 8 + 8),
            self.d.get_mut(b),
            self.min.get_mut(b),
        ) {
            q.copy_from_slice(&g);
            // SAFETY: both arrays hold eight floats.
            unsafe {
                *dv = _mm256_loadu_ps(d.as_ptr());
                *mv = _mm256_loadu_ps(min.as_ptr());
            }
        }
    }
}

/// Computes the columns `cols` for every activation row `r < m`, into
/// `out[r * ld + (c - cols.start)]`, for whole panels only (the caller computes the
/// columns past the last multiple of [`PANEL`]). `block(row, b)` gives block `b` of
/// weight row `row`: its 32 elements in order as bytes, its scale and its minimum.
/// `F` chooses the arithmetic: [`F_Q8_0`]
/// for signed 8-bit quants without minimums, any other for 4-bit quants (0..=15) with
/// minimums.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; activation rows `0..m` of `a` exist with at least
/// `nb` blocks each; `out` holds `(m - 1) * ld + cols.len()` floats; `block` reads
/// only inside the weights for the rows of `cols` and blocks below `nb`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut panel = Panel::new(nb);
    let mut c = cols.start;
    while c + PANEL <= cols.end {
        for b in 0..nb {
            let mut v = [_mm256_setzero_si256(); PANEL];
            let mut d = [0.0f32; PANEL];
            let mut mn = [0.0f32; PANEL];
            for j in 0..PANEL {
                (v[j], d[j], mn[j]) = block(c + j, b);
            }
            panel.set(b, v, &d, &mn);
        }
        // SAFETY: the caller's bounds: rows 0..m of `a`, columns cc..cc + 8 of `out`.
        unsafe { panel_rows::<F, false>(&panel, a, m, nb, out, ld, c - cols.start) };
        c += PANEL;
    }
}

/// Every activation row `r < m` against the unpacked `panel` of `nb` blocks: eight
/// columns each, at `out[r * ld + cc..][..8]`. With `OFFSET` (Q4_0 and Q4_1 only) the
/// arithmetic of [`super::panels`]: Q4_0 takes `8 x sum(q_x)` from the block's
/// integer sum instead of adding `-8 d x d_x x sum(q_x)` as a float, and Q4_1 sums its
/// minimums' terms apart and adds them at the end, so each output equals the panel
/// kernels' bit for bit.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; rows `0..m` of `a` exist with at least `nb` blocks,
/// scales and sums; the panel holds `nb` blocks; `out` holds `(m - 1) * ld + cc + 8`
/// floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn panel_rows<const F: u8, const OFFSET: bool>(
    panel: &Panel,
    a: &ActsView<'_>,
    m: usize,
    nb: usize,
    out: &mut [f32],
    ld: usize,
    cc: usize,
) {
    let mut r = 0;
    while r < m {
        // SAFETY: activation rows r..r + mr are below m, and the output rows hold
        // columns cc..cc + 8 (the caller's bounds).
        unsafe {
            match m - r {
                1 => rows::<F, 1, OFFSET>(panel, a, r, nb, out, ld, cc),
                2 => rows::<F, 2, OFFSET>(panel, a, r, nb, out, ld, cc),
                3 => rows::<F, 3, OFFSET>(panel, a, r, nb, out, ld, cc),
                _ => rows::<F, MR, OFFSET>(panel, a, r, nb, out, ld, cc),
            }
        }
        r += MR;
    }
}

/// [`run_panels_on`] for a GGML matrix.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-512 F/BW/VL/VNNI when `vnni` is set),
/// [`check_range`](super::driver::check_range) holds for these arguments, and `cols`
/// is a multiple of [`PANEL`] long.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn range_impl<const F: u8>(
    vnni: bool,
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let nb = w.blocks_per_row();
    let rb = w.row_bytes();
    let bb = w.dtype().block_bytes();
    let base = w.bytes().as_ptr();
    let block = |row: usize, b: usize| {
        // SAFETY: block b of a row of `cols` lies inside the weight bytes (the rows are
        // below n_out, checked by the caller).
        unsafe {
            let p = base.add(row * rb + b * bb);
            let (d, min) = scales::<F>(p);
            (quants::<F>(p), d, min)
        }
    };
    // SAFETY: the caller's bounds (with AVX-512 VNNI when `vnni`); `block` reads inside
    // the weights.
    unsafe { run_panels_on::<F>(vnni, nb, block, &a, m, cols, out, ld) }
}

/// [`run_panels`], or where `vnni` is set the sixteen-column panels of
/// [`super::packed_vnni`] for as many columns as they cover and eight-column panels for
/// the rest (a multiple of [`PANEL`]): both compute a column alike, bit for bit.
///
/// # Safety
/// As [`run_panels`], and the CPU has AVX-512 F/BW/VL/VNNI when `vnni` is set.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run_panels_on<const F: u8>(
    vnni: bool,
    nb: usize,
    block: impl Fn(usize, usize) -> (__m256i, f32, f32),
    a: &ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let mut start = cols.start;
    if vnni {
        let split = start + (cols.end - start) / PANEL16 * PANEL16;
        if split > start {
            // SAFETY: the caller's bounds, AVX-512 VNNI included; the columns are a
            // subrange of `cols`.
            unsafe { packed_vnni::run_panels::<F>(nb, &block, a, m, start..split, out, ld) };
        }
        start = split;
    }
    if start < cols.end {
        let out = &mut out[start - cols.start..];
        // SAFETY: the caller's bounds, for the remaining columns.
        unsafe { run_panels::<F>(nb, &block, a, m, start..cols.end, out, ld) };
    }
}

/// Transposes an 8 x 8 matrix of 32-bit lanes: lane `j` of result `g` is lane `g` of
/// input `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let s0 = _mm256_unpacklo_epi64(t0, t2);
    let s1 = _mm256_unpackhi_epi64(t0, t2);
    let s2 = _mm256_unpacklo_epi64(t1, t3);
    let s3 = _mm256_unpackhi_epi64(t1, t3);
    let s4 = _mm256_unpacklo_epi64(t4, t6);
    let s5 = _mm256_unpackhi_epi64(t4, t6);
    let s6 = _mm256_unpacklo_epi64(t5, t7);
    let s7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256::<0x20>(s0, s4),
        _mm256_permute2x128_si256::<0x20>(s1, s5),
        _mm256_permute2x128_si256::<0x20>(s2, s6),
        _mm256_permute2x128_si256::<0x20>(s3, s7),
        _mm256_permute2x128_si256::<0x31>(s0, s4),
        _mm256_permute2x128_si256::<0x31>(s1, s5),
        _mm256_permute2x128_si256::<0x31>(s2, s6),
        _mm256_permute2x128_si256::<0x31>(s3, s7),
    ]
}

/// Activation rows `r0..r0 + R` against the panel: eight columns each, written at
/// `out[(r0 + i) * ld + cc..][..8]`.
///
/// # Safety
/// Rows `r0..r0 + R` of `a` exist with at least `nb` blocks, the panel holds `nb`
/// blocks, and `out` holds `(r0 + R - 1) * ld + cc + 8` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // i indexes several arrays at once
unsafe fn rows<const F: u8, const R: usize, const OFFSET: bool>(
    panel: &Panel,
    a: &ActsView<'_>,
    r0: usize,
    nb: usize,
    out: &mut [f32],
    ld: usize,
    cc: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut accm = [_mm256_setzero_ps(); R];
    let dptr = a.d.as_ptr();
    let dsptr = a.ds.as_ptr();
    let q = panel.q.as_ptr();
    for b in 0..nb {
        let mut s = [_mm256_setzero_si256(); R];
        let mut x = [std::ptr::null::<i8>(); R];
        for i in 0..R {
            x[i] = a.block_ptr(r0 + i, b);
        }
        for g in 0..8 {
            // SAFETY: the panel holds nb * 8 vectors.
            let wv = unsafe { _mm256_load_si256(q.add(b * 8 + g)) };
            let wa = if F == F_Q8_0 { _mm256_abs_epi8(wv) } else { wv };
            for i in 0..R {
                // SAFETY: block b of row r0 + i holds 32 bytes; 4g + 4 <= 32.
                let xb =
                    _mm256_set1_epi32(unsafe { x[i].add(4 * g).cast::<i32>().read_unaligned() });
                if F == F_Q8_0 {
                    let p16 = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xb, wv));
                    s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(p16, ones));
                } else {
                    s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(wv, xb));
                }
            }
        }
        let dw = panel.d[b];
        let mw = panel.min[b];
        for i in 0..R {
            let idx = (r0 + i) * a.stride + b;
            // SAFETY: the scales hold `stride` entries per row (checked by the caller).
            let (dx, dsx) = unsafe { (*dptr.add(idx), *dsptr.add(idx)) };
            let mut s32 = if F == F_Q8_0 {
                s[i]
            } else {
                _mm256_madd_epi16(s[i], ones)
            };
            if OFFSET && F == F_Q4_0 {
                // SAFETY: the sums hold `stride` entries per row, as the scales.
                let sx = unsafe { *a.sums.as_ptr().add(idx) };
                s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(8 * sx));
            }
            acc[i] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(s32),
                _mm256_mul_ps(dw, _mm256_set1_ps(dx)),
                acc[i],
            );
            if OFFSET && F == F_Q4_1 {
                accm[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(dsx), accm[i]);
            } else if !OFFSET && F != F_Q8_0 {
                acc[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(dsx), acc[i]);
            }
        }
    }
    if OFFSET && F == F_Q4_1 {
        for i in 0..R {
            acc[i] = _mm256_add_ps(acc[i], accm[i]);
        }
    }
    for i in 0..R {
        let at = (r0 + i) * ld + cc;
        if let Some(dst) = out.get_mut(at..at + PANEL) {
            // SAFETY: dst holds eight floats.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), acc[i]) };
        }
    }
}
