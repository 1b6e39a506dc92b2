//! GGML weights repacked at load into panels of sixteen rows, and the kernels that read
//! them for every number of activation rows: AVX-512 VNNI for every format, AVX2 for
//! Q4_0 and Q4_1 (each 64-byte vector as two 256-bit halves of eight rows, `vpmaddubsw`
//! and `vpmaddwd` for `vpdpbusd`; a prompt unpacks each half once into L1 and streams
//! its activation rows past it, see [`super::packed`]). afo's int8 rows take the same
//! layout without block headers ([`PanelFormat::Int8`]), read by the VNNI kernel.
//!
//! # Layout
//!
//! Rows `16p..16p + 16` form panel `p`, `16 x row_bytes` bytes at `16p x row_bytes`, the
//! same bytes a row-major matrix gives those rows. Inside a panel, block `b` of the
//! sixteen rows is one chunk of `16 x block_bytes` bytes:
//!
//! - a header: the sixteen rows' f16 scales `d` (32 bytes), for Q4_1 then their f16
//!   minimums (32 bytes);
//! - the quants as 64-byte vectors, one 32-bit lane per row: Q4_0/Q4_1 four vectors,
//!   lane `j` of vector `v` holding bytes `4v..4v + 4` of row `j`'s sixteen nibble bytes
//!   (low nibbles: elements `4v..4v + 4`, high nibbles: elements `16 + 4v..`); Q8_0 eight
//!   vectors, lane `j` of vector `g` holding quants `4g..4g + 4` of row `j` plus 128 (as
//!   unsigned bytes).
//!
//! So one `vpdpbusd` per broadcast of four activation bytes multiplies sixteen rows, with
//! no shuffle: the whole step is loads, two masks and a shift for the nibbles, and the
//! dot products. The matrix takes exactly its GGML size; [`to_rows`] gives the GGML
//! bytes back (for writing a file) and [`block`] one block of one row (for embedding
//! lookups and dequantization).
//!
//! # Arithmetic
//!
//! Per block and row the integer sum is exact: nibbles `0..=15` (Q4_0 takes
//! `8 x sum(q_x)` back, Q4_1 adds `m x d_x x sum(q_x)` as a float) and Q8_0 quants plus
//! 128 (takes `128 x sum(q_x)` back). Then `acc += isum x (d_w x d_x)` in f32, block by
//! block, the same for every row whatever the number of rows in the call: a batched
//! decode step, a prompt and one decode step compute each row identically, and the
//! result does not depend on the thread count. The AVX2 kernel sums a block's Q4
//! products in 16 bits (at most `16 x 15 x 127 = 30,480` per lane) before widening, the
//! same integer, so it gives the VNNI kernel's results bit for bit.

use std::sync::Arc;

use rayon::prelude::*;

use super::blocks::{BLOCK_ELEMS, WeightDType};
use super::error::{Error, Result};

/// Weight rows per panel (one 32-bit lane of a 512-bit register each).
pub(super) const PANEL_ROWS: usize = 16;

/// What a panel holds: a GGML format's blocks, or afo's int8 rows (32 quants a block, no
/// header: the scale is per row, kept beside the quants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PanelFormat {
    /// Q4_0, Q4_1 or Q8_0 blocks.
    Ggml(WeightDType),
    /// [`IntFormat::Int8`](super::IntFormat::Int8) quants.
    Int8,
}

impl From<WeightDType> for PanelFormat {
    fn from(dtype: WeightDType) -> Self {
        PanelFormat::Ggml(dtype)
    }
}

impl PanelFormat {
    /// Bytes of one row's block as stored row-major.
    pub(super) const fn block_bytes(self) -> usize {
        match self {
            PanelFormat::Ggml(dtype) => dtype.block_bytes(),
            PanelFormat::Int8 => BLOCK_ELEMS,
        }
    }
}

/// Header bytes per block of a panel: sixteen f16 scales, and for Q4_1 sixteen f16
/// minimums; none for int8.
pub(super) const fn header_bytes(format: PanelFormat) -> usize {
    match format {
        PanelFormat::Ggml(WeightDType::Q4_1) => 4 * PANEL_ROWS,
        PanelFormat::Ggml(_) => 2 * PANEL_ROWS,
        PanelFormat::Int8 => 0,
    }
}

/// Bytes of one row's block header (scale, and minimum for Q4_1).
const fn row_header_bytes(format: PanelFormat) -> usize {
    header_bytes(format) / PANEL_ROWS
}

/// Whether a matrix of `n_out` rows can be stored in panels.
pub(super) fn fits(n_out: usize) -> bool {
    n_out > 0 && n_out.is_multiple_of(PANEL_ROWS)
}

/// Whether `kernel` reads weights of `dtype` in panels: AVX-512 VNNI every format;
/// AVX2 the 4-bit ones (`vpmaddubsw` takes the nibbles as its unsigned operand, but a
/// Q8_0 quant stored plus 128 times an activation byte would saturate its 16-bit pair
/// sums, so Q8_0 stays row-major there).
pub(super) fn readable_by(kernel: super::Kernel, dtype: WeightDType) -> bool {
    match kernel {
        super::Kernel::Avx512Vnni => true,
        super::Kernel::Avx2 => !matches!(dtype, WeightDType::Q8_0),
        super::Kernel::Scalar => false,
    }
}

/// Whether weights of `dtype` with `n_out` rows are kept in panels when `kernel` runs
/// them.
pub(super) fn chosen_for(kernel: super::Kernel, dtype: WeightDType, n_out: usize) -> bool {
    readable_by(kernel, dtype) && fits(n_out)
}

/// Where row `j` of a panel keeps, in its chunk of one block, the f16 field `f` of its
/// GGML block header (0: the scale, 1: the Q4_1 minimum): `2j` into the field's 32-byte
/// array.
const fn field_at(f: usize, j: usize) -> usize {
    2 * PANEL_ROWS * f + 2 * j
}

/// Where row `j` keeps its quant group `g` (GGML quant bytes `4g..4g + 4`): lane `j` of
/// the chunk's vector `g`.
const fn group_at(format: PanelFormat, g: usize, j: usize) -> usize {
    header_bytes(format) + 4 * PANEL_ROWS * g + 4 * j
}

/// What a signed 8-bit quant byte (Q8_0, int8) is stored as (plus 128, as unsigned);
/// the flip is its own inverse. Other formats store their bytes as they are.
const fn flip(format: PanelFormat) -> u8 {
    if matches!(
        format,
        PanelFormat::Ggml(WeightDType::Q8_0) | PanelFormat::Int8
    ) {
        0x80
    } else {
        0
    }
}

/// Writes one block (GGML bytes, or 32 int8 quants) into row `j`'s places in its panel
/// chunk.
fn write_block(dtype: PanelFormat, block: &[u8], chunk: &mut [u8], j: usize) {
    let rh = row_header_bytes(dtype);
    for f in 0..rh / 2 {
        let at = field_at(f, j);
        chunk[at..at + 2].copy_from_slice(&block[2 * f..2 * f + 2]);
    }
    let x = flip(dtype);
    for g in 0..(dtype.block_bytes() - rh) / 4 {
        let mut v = [0u8; 4];
        v.copy_from_slice(&block[rh + 4 * g..rh + 4 * g + 4]);
        let at = group_at(dtype, g, j);
        chunk[at..at + 4].copy_from_slice(&v.map(|q| q ^ x));
    }
}

/// Reads row `j`'s block back from its panel chunk into its row-major bytes.
fn read_block(dtype: PanelFormat, chunk: &[u8], j: usize, block: &mut [u8]) {
    let rh = row_header_bytes(dtype);
    for f in 0..rh / 2 {
        let at = field_at(f, j);
        block[2 * f..2 * f + 2].copy_from_slice(&chunk[at..at + 2]);
    }
    let x = flip(dtype);
    for g in 0..(dtype.block_bytes() - rh) / 4 {
        let mut v = [0u8; 4];
        let at = group_at(dtype, g, j);
        v.copy_from_slice(&chunk[at..at + 4]);
        block[rh + 4 * g..rh + 4 * g + 4].copy_from_slice(&v.map(|q| q ^ x));
    }
}

fn check(dtype: PanelFormat, n_out: usize, k: usize, len: usize) -> Result<usize> {
    let nb = super::blocks::blocks_per_row(k)?;
    if !fits(n_out) {
        return Err(Error::LengthMismatch {
            what: "panel rows (n_out, a multiple of 16)",
            expected: n_out.next_multiple_of(PANEL_ROWS),
            actual: n_out,
            unit: "rows",
        });
    }
    let expected = n_out * nb * dtype.block_bytes();
    if len != expected {
        return Err(Error::LengthMismatch {
            what: "weight bytes",
            expected,
            actual: len,
            unit: "bytes",
        });
    }
    Ok(nb)
}

/// Repacks a row-major GGML matrix (`n_out` a multiple of 16) into panels.
///
/// # Errors
/// [`Error::LengthMismatch`] when `n_out` is not a multiple of 16 or `rows` has another
/// length than the shape calls for.
pub(super) fn from_rows(
    dtype: impl Into<PanelFormat>,
    n_out: usize,
    k: usize,
    rows: &[u8],
) -> Result<Arc<[u8]>> {
    let dtype = dtype.into();
    let nb = check(dtype, n_out, k, rows.len())?;
    // Written in place in its final allocation: a load holds the source and the panels,
    // never a third copy.
    let mut out: Arc<[u8]> = std::iter::repeat_n(0u8, rows.len()).collect();
    // A new Arc has one owner: `make_mut` hands out its bytes without a copy.
    fill(dtype, nb, rows, Arc::make_mut(&mut out));
    Ok(out)
}

/// [`from_rows`] into a `Vec` (int8 weights keep theirs in one).
///
/// # Errors
/// As [`from_rows`].
pub(super) fn from_rows_vec(
    dtype: impl Into<PanelFormat>,
    n_out: usize,
    k: usize,
    rows: &[u8],
) -> Result<Vec<u8>> {
    let dtype = dtype.into();
    let nb = check(dtype, n_out, k, rows.len())?;
    let mut out = vec![0u8; rows.len()];
    fill(dtype, nb, rows, &mut out);
    Ok(out)
}

/// Writes the row-major `rows` (whole panels of `nb` blocks a row) into `panels`, as
/// long.
fn fill(dtype: PanelFormat, nb: usize, rows: &[u8], panels: &mut [u8]) {
    let bb = dtype.block_bytes();
    panels
        .par_chunks_exact_mut(PANEL_ROWS * nb * bb)
        .zip(rows.par_chunks_exact(PANEL_ROWS * nb * bb))
        .for_each(|(panel, src)| {
            for (j, row) in src.chunks_exact(nb * bb).enumerate() {
                for (blk, chunk) in row
                    .chunks_exact(bb)
                    .zip(panel.chunks_exact_mut(PANEL_ROWS * bb))
                {
                    write_block(dtype, blk, chunk, j);
                }
            }
        });
}

/// Block `b` of row `row` of a panel matrix, in GGML bytes, into `out`
/// (`dtype.block_bytes()` long).
///
/// # Errors
/// [`Error::LengthMismatch`] when the row or block lies outside the matrix or `out` has
/// another length.
pub(super) fn block(
    dtype: impl Into<PanelFormat>,
    n_out: usize,
    k: usize,
    panels: &[u8],
    row: usize,
    b: usize,
    out: &mut [u8],
) -> Result<()> {
    let dtype = dtype.into();
    let nb = check(dtype, n_out, k, panels.len())?;
    let bb = dtype.block_bytes();
    if row >= n_out || b >= nb {
        return Err(Error::LengthMismatch {
            what: "weight rows (n_out)",
            expected: n_out,
            actual: row + 1,
            unit: "rows",
        });
    }
    if out.len() != bb {
        return Err(Error::LengthMismatch {
            what: "block",
            expected: bb,
            actual: out.len(),
            unit: "bytes",
        });
    }
    let at = ((row / PANEL_ROWS) * nb + b) * PANEL_ROWS * bb;
    read_block(
        dtype,
        &panels[at..at + PANEL_ROWS * bb],
        row % PANEL_ROWS,
        out,
    );
    Ok(())
}

/// The row-major GGML bytes of a panel matrix (the inverse of [`from_rows`]).
///
/// # Errors
/// As [`from_rows`].
pub(super) fn to_rows(
    dtype: impl Into<PanelFormat>,
    n_out: usize,
    k: usize,
    panels: &[u8],
) -> Result<Vec<u8>> {
    let dtype = dtype.into();
    let nb = check(dtype, n_out, k, panels.len())?;
    let bb = dtype.block_bytes();
    let mut out = vec![0u8; panels.len()];
    for (panel, dst) in panels
        .chunks_exact(PANEL_ROWS * nb * bb)
        .zip(out.chunks_exact_mut(PANEL_ROWS * nb * bb))
    {
        for (j, row) in dst.chunks_exact_mut(nb * bb).enumerate() {
            for (blk, chunk) in row
                .chunks_exact_mut(bb)
                .zip(panel.chunks_exact(PANEL_ROWS * bb))
            {
                read_block(dtype, chunk, j, blk);
            }
        }
    }
    Ok(out)
}

/// Elements per block (for the docs' arithmetic).
const _: () = assert!(BLOCK_ELEMS == 32);

#[cfg(target_arch = "x86_64")]
pub(super) use simd::{PanelRows, vnni_columns};
#[cfg(target_arch = "x86_64")]
pub(super) use simd::{range, range_avx2, range_int8};

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::Kernel;
    use super::super::acts::ActsView;
    use super::super::blocks::BLOCK_ELEMS;
    use super::super::blocks::GgmlMatrix;
    use super::super::driver::{F_I8, F_Q4_0, F_Q4_1, F_Q8_0, acts_and_out_fit, check_range};
    use super::super::packed;
    use super::{PANEL_ROWS, header_bytes};

    /// A matrix in panels as the kernels over whole panels read it: its bytes, blocks
    /// per row, bytes per row, and (int8) each row's scale, applied at the end.
    #[derive(Debug, Clone, Copy)]
    pub(in super::super) struct PanelRows<'a> {
        pub(in super::super) bytes: &'a [u8],
        pub(in super::super) nb: usize,
        pub(in super::super) rb: usize,
        pub(in super::super) scales: Option<&'a [f32]>,
    }

    /// What the panel kernels read through raw pointers only after it held: the
    /// matrix is in panels, `cols` starts and ends on panel boundaries, and
    /// [`check_range`]'s bounds.
    fn in_bounds(
        w: &GgmlMatrix<'_>,
        a: &ActsView<'_>,
        m: usize,
        cols: &Range<usize>,
        out: &[f32],
        ld: usize,
    ) -> bool {
        w.in_panels()
            && cols.start.is_multiple_of(PANEL_ROWS)
            && cols.end.is_multiple_of(PANEL_ROWS)
            && check_range(w, a, m, cols, out, ld)
    }

    /// How far ahead of its loads the kernel prefetches weight bytes.
    const PREFETCH: usize = 8192;

    /// Runs `$body` once for each row `$i` in `0..$n` (`$n` a const of at most
    /// [`MR`]): unrolled when `$unroll` (a constant), so that `$i` is a constant in
    /// each copy and arrays indexed by it stay in registers, otherwise as a loop.
    /// Measured one thread, hot, 1536 x 576: unrolled Q4_0 at 8 rows 21.1 -> 16.9 us
    /// and Q4_1 24.5 -> 18.6 us (as a loop the accumulators lived on the stack, loaded,
    /// added to and stored back per row and block), but Q8_0 at 8 rows 23 -> 25 us
    /// (its eight weight vectors and eight accumulators crowd the registers) and one
    /// row 2-4% slower: those keep the loop.
    macro_rules! rows {
        ($unroll:expr, $n:expr, $i:ident => $body:block) => {
            const { assert!($n <= MR) };
            if $unroll {
                rows!(@each $n, $i, $body, 0 1 2 3 4 5 6 7)
            } else {
                for $i in 0..$n $body
            }
        };
        (@each $n:expr, $i:ident, $body:block, $($k:literal)*) => {{
            $(
                if $k < $n {
                    let $i: usize = $k;
                    $body
                }
            )*
        }};
    }

    /// Rows of activations that share each weight vector loaded.
    const MR: usize = 8;

    /// See [`RangeFn`](super::super::driver::RangeFn), for a matrix in panels: `cols`
    /// must start and end on panel boundaries (the driver splits columns in multiples
    /// of sixteen). Does nothing (and asserts in debug builds) if the CPU lacks AVX-512
    /// VNNI, the matrix is not in panels or the bounds do not hold.
    pub(in super::super) fn range<const F: u8>(
        w: GgmlMatrix<'_>,
        a: ActsView<'_>,
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let ok = Kernel::Avx512Vnni.is_available() && in_bounds(&w, &a, m, &cols, out, ld);
        if !ok {
            debug_assert!(
                false,
                "panel kernel called without AVX-512 VNNI or out of bounds"
            );
            return;
        }
        // SAFETY: the CPU has every feature `range_impl` enables (checked above), and
        // the bounds hold.
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
        let (nb, rb) = (w.blocks_per_row(), w.row_bytes());
        // SAFETY: the caller's (the bounds of `range`).
        let w = PanelRows {
            bytes: w.bytes(),
            nb,
            rb,
            scales: None,
        };
        // SAFETY: the caller's (the bounds of `range`).
        unsafe { columns::<F>(w, a, m, cols, out, ld) }
    }

    /// The panels of `cols` (`rb` bytes a row in `bytes`, `nb` blocks) for every
    /// activation row; with `scales` (int8), each column times its row's scale. From
    /// [`AMX_MIN_ROWS`](super::super::AMX_MIN_ROWS) rows on, where the tiles are
    /// available, on AMX tiles; otherwise eight rows at a time with `vpdpbusd`. Both
    /// give the same bits.
    ///
    /// # Safety
    /// The CPU has the features enabled here; the panels of `cols` lie in `bytes`,
    /// `scales` (if any) holds their rows, and the activation and output bounds of
    /// [`check_range`] hold.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn columns<const F: u8>(
        w: PanelRows<'_>,
        a: ActsView<'_>,
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        if m >= super::super::amx::AMX_MIN_ROWS && super::super::amx::amx_available() {
            // SAFETY: the caller's, and the tiles are granted.
            unsafe { super::super::amx::columns::<F>(w, a, m, cols, out, ld) };
        } else {
            // SAFETY: the caller's.
            unsafe { vnni_columns::<F>(w, a, m, cols, out, ld) };
        }
    }

    /// [`columns`] with `vpdpbusd`, eight activation rows per weight load.
    ///
    /// # Safety
    /// As [`columns`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(in super::super) unsafe fn vnni_columns<const F: u8>(
        w: PanelRows<'_>,
        a: ActsView<'_>,
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let PanelRows {
            bytes,
            nb,
            rb,
            scales,
        } = w;
        let base = bytes.as_ptr();
        let mut c = cols.start;
        while c < cols.end {
            // SAFETY: rows c..c + 16 are within the matrix (the caller's bounds).
            let p = unsafe { base.add(c * rb) };
            let sc = match scales.map(|s| s.get(c..c + PANEL_ROWS)) {
                // SAFETY: sixteen floats.
                Some(Some(s)) => Some(unsafe { _mm512_loadu_ps(s.as_ptr()) }),
                Some(None) => return,
                None => None,
            };
            let cc = c - cols.start;
            let mut r = 0;
            while r < m {
                let mr = (m - r).min(MR);
                // SAFETY: activation rows r..r + mr exist (the caller's bounds); the
                // panel lies inside the weight bytes.
                unsafe {
                    match mr {
                        8 => store::<8>(scaled(panel::<F, 8>(p, &a, r, nb), sc), out, ld, r, cc),
                        7 => store::<7>(scaled(panel::<F, 7>(p, &a, r, nb), sc), out, ld, r, cc),
                        6 => store::<6>(scaled(panel::<F, 6>(p, &a, r, nb), sc), out, ld, r, cc),
                        5 => store::<5>(scaled(panel::<F, 5>(p, &a, r, nb), sc), out, ld, r, cc),
                        4 => store::<4>(scaled(panel::<F, 4>(p, &a, r, nb), sc), out, ld, r, cc),
                        3 => store::<3>(scaled(panel::<F, 3>(p, &a, r, nb), sc), out, ld, r, cc),
                        2 => store::<2>(scaled(panel::<F, 2>(p, &a, r, nb), sc), out, ld, r, cc),
                        _ => store::<1>(scaled(panel::<F, 1>(p, &a, r, nb), sc), out, ld, r, cc),
                    }
                }
                r += mr;
            }
            c += PANEL_ROWS;
        }
    }

    /// Each row's sixteen sums times the sixteen weight rows' scales, if any.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scaled<const N: usize>(v: [__m512; N], scales: Option<__m512>) -> [__m512; N] {
        match scales {
            Some(s) => v.map(|x| _mm512_mul_ps(x, s)),
            None => v,
        }
    }

    /// Writes sixteen results per row at row `r`, column `cc` of `out`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store<const N: usize>(v: [__m512; N], out: &mut [f32], ld: usize, r: usize, cc: usize) {
        for (i, v) in v.iter().enumerate() {
            let at = (r + i) * ld + cc;
            if let Some(dst) = out.get_mut(at..at + PANEL_ROWS) {
                // SAFETY: `dst` holds sixteen floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *v) };
            }
        }
    }

    /// The sixteen dot products of the panel at `p` with activation rows
    /// `r0..r0 + N`, `nb` blocks each.
    ///
    /// # Safety
    /// `p` points to a whole panel of `nb` blocks of format `F`; rows `r0..r0 + N` of
    /// `a` exist with at least `nb` blocks, scales and sums.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn panel<const F: u8, const N: usize>(
        p: *const u8,
        a: &ActsView<'_>,
        r0: usize,
        nb: usize,
    ) -> [__m512; N] {
        let wt = super::format_of(F);
        let chunk = PANEL_ROWS * wt.block_bytes();
        let hb = header_bytes(wt);
        let low = _mm512_set1_epi8(0x0F);
        let unroll = (F == F_Q4_0 || F == F_Q4_1) && N > 1;
        let mut acc = [_mm512_setzero_ps(); N];
        let mut accm = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            // SAFETY: block b of the panel is inside it (b < nb).
            let blk = unsafe { p.add(b * chunk) };
            // Ask for the bytes PREFETCH ahead (the next panels when this one ends),
            // while the first rows stream the panel; later rows find it in cache.
            if r0 == 0 {
                let mut at = 0;
                while at < chunk {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + at).cast());
                    at += 64;
                }
            }
            let d = if F == F_I8 {
                // Int8 blocks have no scale (the row's applies at the end).
                _mm512_set1_ps(1.0)
            } else {
                // SAFETY: the header's sixteen f16 scales (and minimums) are its first
                // bytes.
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.cast()) })
            };
            let mins = if F == F_Q4_1 {
                // SAFETY: as above, the minimums follow the scales.
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(32).cast()) })
            } else {
                d
            };
            let q = unsafe { blk.add(hb) };
            let mut wv = [_mm512_setzero_si512(); 8];
            if F == F_Q8_0 || F == F_I8 {
                for (g, v) in wv.iter_mut().enumerate() {
                    // SAFETY: eight 64-byte vectors of quants follow the header.
                    *v = unsafe { _mm512_loadu_si512(q.add(64 * g).cast()) };
                }
            } else {
                for g in 0..4 {
                    // SAFETY: four 64-byte vectors of nibbles follow the header.
                    let raw = unsafe { _mm512_loadu_si512(q.add(64 * g).cast()) };
                    wv[g] = _mm512_and_si512(raw, low);
                    wv[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                }
            }
            rows!(unroll, N, i => {
                let idx = (r0 + i) * a.stride + b;
                // Block b of row r0 + i exists (caller's contract); its 32 quants are
                // eight 4-byte groups.
                let x = a.block_ptr(r0 + i, b).cast::<i32>();
                let (dx, sx) = unsafe { (*a.d.get_unchecked(idx), *a.sums.get_unchecked(idx)) };
                let mut s0 = _mm512_setzero_si512();
                let mut s1 = _mm512_setzero_si512();
                for g in 0..4 {
                    // SAFETY: groups g and g + 4 are inside the block.
                    let (x0, x1) =
                        unsafe { (x.add(g).read_unaligned(), x.add(g + 4).read_unaligned()) };
                    s0 = _mm512_dpbusd_epi32(s0, wv[g], _mm512_set1_epi32(x0));
                    s1 = _mm512_dpbusd_epi32(s1, wv[g + 4], _mm512_set1_epi32(x1));
                }
                let mut s = _mm512_add_epi32(s0, s1);
                if F == F_Q4_0 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * sx));
                } else if F == F_Q8_0 || F == F_I8 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * sx));
                } else {
                    // SAFETY: as for the scale.
                    let dsx = unsafe { *a.ds.get_unchecked(idx) };
                    accm[i] = _mm512_fmadd_ps(mins, _mm512_set1_ps(dsx), accm[i]);
                }
                let scale = if F == F_I8 {
                    _mm512_set1_ps(dx)
                } else {
                    _mm512_mul_ps(d, _mm512_set1_ps(dx))
                };
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[i]);
            });
        }
        if F == F_Q4_1 {
            rows!(unroll, N, i => {
                acc[i] = _mm512_add_ps(acc[i], accm[i]);
            });
        }
        acc
    }

    /// The panel kernel for afo's int8 rows in panels (`quants`, `n_out x k` bytes as
    /// [`from_rows`](super::from_rows) with [`PanelFormat::Int8`] lays them out;
    /// `scales`, one per row): the columns `cols` (on panel boundaries) for every
    /// activation row `r < m`, into `out[r * ld + (c - cols.start)]`. Q8_0's arithmetic
    /// per block with no block scale (`acc += (isum - 128 sum(q_x)) x d_x`), then each
    /// column times its row's scale: one row, a batch and a prompt compute a row alike.
    /// Does nothing (and asserts in debug builds) if the CPU lacks AVX-512 VNNI or the
    /// bounds do not hold.
    #[allow(clippy::too_many_arguments)] // the matrix's parts and the output window
    pub(in super::super) fn range_int8(
        quants: &[u8],
        scales: &[f32],
        n_out: usize,
        k: usize,
        a: ActsView<'_>,
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let nb = k / BLOCK_ELEMS;
        let ok = Kernel::Avx512Vnni.is_available()
            && k.is_multiple_of(BLOCK_ELEMS)
            && super::fits(n_out)
            && quants.len() == n_out * k
            && scales.len() == n_out
            && cols.start.is_multiple_of(PANEL_ROWS)
            && cols.end.is_multiple_of(PANEL_ROWS)
            && cols.end <= n_out
            && acts_and_out_fit(&a, m, nb, &cols, out, ld);
        if !ok {
            debug_assert!(
                false,
                "int8 panel kernel called without AVX-512 VNNI or out of bounds"
            );
            return;
        }
        // SAFETY: the CPU has every feature `columns` enables, and the bounds hold
        // (checked above).
        let w = PanelRows {
            bytes: quants,
            nb,
            rb: k,
            scales: Some(scales),
        };
        // SAFETY: as above.
        unsafe { columns::<F_I8>(w, a, m, cols, out, ld) }
    }

    /// Rows of activations that share each weight vector loaded, on AVX2 (sixteen
    /// registers: two accumulators per row, one sum per row, the weights and the
    /// broadcasts).
    const MR_AVX2: usize = 4;

    /// [`range`] on AVX2, for Q4_0 and Q4_1 panels: each 64-byte vector of a panel is
    /// two 256-bit halves (rows 0-7, rows 8-15), and `vpmaddubsw` (nibbles as the
    /// unsigned operand) + `vpmaddwd` take the place of `vpdpbusd`. A block's sixteen
    /// nibble products per lane are summed in 16 bits (at most `16 x 15 x 127 =
    /// 30,480`, activations never reach -128) and widened once, so each block's integer
    /// sum is exactly the one `vpdpbusd` gives, and the scales apply in the same order:
    /// every output equals the AVX-512 panel kernel's bit for bit (tested). Does nothing
    /// (and asserts in debug builds) if the CPU lacks AVX2, the format is Q8_0, the
    /// matrix is not in panels or the bounds do not hold.
    pub(in super::super) fn range_avx2<const F: u8>(
        w: GgmlMatrix<'_>,
        a: ActsView<'_>,
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let ok = Kernel::Avx2.is_available() && F != F_Q8_0 && in_bounds(&w, &a, m, &cols, out, ld);
        if !ok {
            debug_assert!(
                false,
                "AVX2 panel kernel called without AVX2 or out of bounds"
            );
            return;
        }
        // SAFETY: the CPU has every feature `range_avx2_impl` enables (checked above),
        // and the bounds hold.
        unsafe { range_avx2_impl::<F>(w, a, m, cols, out, ld) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn range_avx2_impl<const F: u8>(
        w: GgmlMatrix<'_>,
        a: ActsView<'_>,
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let nb = w.blocks_per_row();
        let rb = w.row_bytes();
        let base = w.bytes().as_ptr();
        let prompt = packed::takes_packed(m, a.independent);
        let mut scratch = if prompt {
            Some(packed::Panel::new(nb))
        } else {
            None
        };
        let mut c = cols.start;
        while c < cols.end {
            // SAFETY: rows c..c + 16 are within n_out (a panel of the checked matrix).
            let p = unsafe { base.add(c * rb) };
            let cc = c - cols.start;
            if let Some(panel) = scratch.as_mut() {
                // A prompt: each half of the panel unpacked once into L1 (nibbles to
                // bytes; already one row per lane, no transpose), then every activation
                // row streams past it, with the arithmetic of the kernel below.
                for h in 0..2 {
                    // SAFETY: the panel at p holds nb blocks; rows 0..m of `a` and
                    // columns cc + 8h..cc + 8h + 8 of `out` exist (checked).
                    unsafe {
                        unpack_half::<F>(p, h, nb, panel);
                        packed::panel_rows::<F, true>(panel, &a, m, nb, out, ld, cc + HALF * h);
                    }
                }
                c += PANEL_ROWS;
                continue;
            }
            let mut r = 0;
            while r < m {
                let mr = (m - r).min(MR_AVX2);
                // SAFETY: activation rows r..r + mr exist (checked); the panel lies
                // inside the weight bytes.
                for h in 0..2 {
                    let c = cc + HALF * h;
                    unsafe {
                        match mr {
                            4 => store_avx2(panel_avx2::<F, 4>(p, h, &a, r, nb), out, ld, r, c),
                            3 => store_avx2(panel_avx2::<F, 3>(p, h, &a, r, nb), out, ld, r, c),
                            2 => store_avx2(panel_avx2::<F, 2>(p, h, &a, r, nb), out, ld, r, c),
                            _ => store_avx2(panel_avx2::<F, 1>(p, h, &a, r, nb), out, ld, r, c),
                        }
                    }
                }
                r += mr;
            }
            c += PANEL_ROWS;
        }
    }

    /// Writes eight results per row at row `r`, column `cc` (the panel's half).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store_avx2<const N: usize>(v: [__m256; N], out: &mut [f32], ld: usize, r: usize, cc: usize) {
        for (i, v) in v.iter().enumerate() {
            let at = (r + i) * ld + cc;
            if let Some(dst) = out.get_mut(at..at + HALF) {
                // SAFETY: `dst` holds eight floats.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), *v) };
            }
        }
    }

    /// Rows per half panel (one 32-bit lane of a 256-bit register each).
    const HALF: usize = PANEL_ROWS / 2;

    /// Unpacks half `h` (rows `8h..8h + 8`) of the Q4 panel at `p` into `out`: per
    /// block, the low nibbles of vector `g` are group `g`, the high ones group `g + 4`.
    ///
    /// # Safety
    /// `p` points to a whole panel of `nb` blocks of format `F` (Q4_0 or Q4_1), `h` is
    /// 0 or 1, and `out` was made for `nb` blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_half<const F: u8>(p: *const u8, h: usize, nb: usize, out: &mut packed::Panel) {
        let wt = super::format_of(F);
        let chunk = PANEL_ROWS * wt.block_bytes();
        let hb = header_bytes(wt);
        let low = _mm256_set1_epi8(0x0F);
        for b in 0..nb {
            // SAFETY: block b of the panel is inside it (b < nb).
            let blk = unsafe { p.add(b * chunk) };
            if let (Some(q), Some(d), Some(mn)) = (
                out.q.get_mut(b * 8..b * 8 + 8),
                out.d.get_mut(b),
                out.min.get_mut(b),
            ) {
                for g in 0..4 {
                    // SAFETY: four 64-byte vectors of nibbles follow the header.
                    let raw = unsafe { _mm256_loadu_si256(blk.add(hb + 64 * g + 32 * h).cast()) };
                    q[g] = _mm256_and_si256(raw, low);
                    q[g + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                }
                // SAFETY: the sixteen f16 scales open the header, the Q4_1 minimums
                // follow.
                unsafe {
                    *d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast()));
                    if F == F_Q4_1 {
                        *mn = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(32 + 16 * h).cast()));
                    }
                }
            }
        }
    }

    /// The eight dot products of half `h` (rows `8h..8h + 8`) of the Q4 panel at `p`
    /// with activation rows `r0..r0 + N`, `nb` blocks each.
    ///
    /// # Safety
    /// `p` points to a whole panel of `nb` blocks of format `F` (Q4_0 or Q4_1), `h` is
    /// 0 or 1; rows `r0..r0 + N` of `a` exist with at least `nb` blocks, scales and
    /// sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i indexes several arrays at once
    unsafe fn panel_avx2<const F: u8, const N: usize>(
        p: *const u8,
        h: usize,
        a: &ActsView<'_>,
        r0: usize,
        nb: usize,
    ) -> [__m256; N] {
        let wt = super::format_of(F);
        let chunk = PANEL_ROWS * wt.block_bytes();
        let hb = header_bytes(wt);
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut accm = [_mm256_setzero_ps(); N];
        for b in 0..nb {
            // SAFETY: block b of the panel is inside it (b < nb).
            let blk = unsafe { p.add(b * chunk) };
            // Ask for the bytes PREFETCH ahead while the first pass streams the panel;
            // later rows and the second half find it in cache.
            if r0 == 0 && h == 0 {
                let mut at = 0;
                while at < chunk {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + at).cast());
                    at += 64;
                }
            }
            let mut x = [std::ptr::null::<i32>(); N];
            for i in 0..N {
                x[i] = a.block_ptr(r0 + i, b).cast::<i32>();
            }
            let mut s = [_mm256_setzero_si256(); N];
            for g in 0..4 {
                // SAFETY: four 64-byte vectors of nibbles follow the header; this half
                // is 32 bytes of each.
                let raw = unsafe { _mm256_loadu_si256(blk.add(hb + 64 * g + 32 * h).cast()) };
                // The low nibbles are group g of the eight rows, the high ones group
                // g + 4; one at a time keeps the registers for the activation rows.
                for (gg, w) in [
                    (g, _mm256_and_si256(raw, low)),
                    (g + 4, _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low)),
                ] {
                    for i in 0..N {
                        // SAFETY: group gg < 8 of block b of row r0 + i is inside its 32
                        // bytes.
                        let xg = unsafe { x[i].add(gg).read_unaligned() };
                        s[i] =
                            _mm256_add_epi16(s[i], _mm256_maddubs_epi16(w, _mm256_set1_epi32(xg)));
                    }
                }
            }
            // SAFETY: the header's sixteen f16 scales are its first bytes, the Q4_1
            // minimums follow; this half's eight are 16 bytes of each.
            let (d, mins) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h).cast())),
                    if F == F_Q4_1 {
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.add(32 + 16 * h).cast()))
                    } else {
                        _mm256_setzero_ps()
                    },
                )
            };
            for i in 0..N {
                let idx = (r0 + i) * a.stride + b;
                // SAFETY: the scales and sums hold `stride` entries per row (checked).
                let (dx, sx) = unsafe { (*a.d.get_unchecked(idx), *a.sums.get_unchecked(idx)) };
                let mut s32 = _mm256_madd_epi16(s[i], ones);
                if F == F_Q4_0 {
                    s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(8 * sx));
                } else {
                    // SAFETY: as for the scale.
                    let dsx = unsafe { *a.ds.get_unchecked(idx) };
                    accm[i] = _mm256_fmadd_ps(mins, _mm256_set1_ps(dsx), accm[i]);
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, acc[i]);
            }
        }
        if F == F_Q4_1 {
            for i in 0..N {
                acc[i] = _mm256_add_ps(acc[i], accm[i]);
            }
        }
        acc
    }
}

/// The format of a kernel's const format id.
#[cfg(target_arch = "x86_64")]
pub(super) const fn format_of(f: u8) -> PanelFormat {
    match f {
        super::driver::F_Q4_1 => PanelFormat::Ggml(WeightDType::Q4_1),
        super::driver::F_Q8_0 => PanelFormat::Ggml(WeightDType::Q8_0),
        super::driver::F_I8 => PanelFormat::Int8,
        _ => PanelFormat::Ggml(WeightDType::Q4_0),
    }
}
