//! Validation, kernel selection and the split of output columns across threads.

use std::ops::Range;

use rayon::prelude::*;

use super::acts::{ActsView, QuantizedActs};
use super::blocks::GgmlMatrix;
use super::error::{Error, Result};
use super::{Kernel, WeightDType, scalar};

/// Format ids used as const generic parameters by the kernels.
pub(super) const F_Q4_0: u8 = 0;
pub(super) const F_Q4_1: u8 = 1;
pub(super) const F_Q8_0: u8 = 2;
/// afo's int8 rows in panels (see [`super::panels`]): Q8_0's arithmetic without a block
/// scale, the row scale applied at the end.
pub(super) const F_I8: u8 = 3;

/// Computes `out[r * ld + (c - cols.start)]` for every row `r < m` and column `c` in
/// `cols`. Implementations may rely on the checks of [`check_range`].
pub(super) type RangeFn = fn(
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
);

/// The bounds every [`RangeFn`] relies on; the SIMD kernels read through raw pointers
/// only after this returned `true`.
pub(super) fn check_range(
    w: &GgmlMatrix<'_>,
    a: &ActsView<'_>,
    m: usize,
    cols: &Range<usize>,
    out: &[f32],
    ld: usize,
) -> bool {
    cols.end <= w.n_out()
        && w.bytes().len() == w.n_out() * w.row_bytes()
        && acts_and_out_fit(a, m, w.blocks_per_row(), cols, out, ld)
}

/// The activation and output bounds of [`check_range`]: rows `0..m` of `a` hold `nb`
/// blocks with their scales and sums, `cols` is not empty, and `out` holds `m` rows of
/// `cols.len()` floats `ld` apart.
pub(super) fn acts_and_out_fit(
    a: &ActsView<'_>,
    m: usize,
    nb: usize,
    cols: &Range<usize>,
    out: &[f32],
    ld: usize,
) -> bool {
    let ncols = cols.end.saturating_sub(cols.start);
    m >= 1
        && cols.start < cols.end
        && a.stride >= nb
        && a.stride.is_multiple_of(2)
        && a.lines.len() * 2 >= m * a.stride
        && a.d.len() >= m * a.stride
        && a.ds.len() >= m * a.stride
        && a.sums.len() >= m * a.stride
        && ld >= ncols
        && out.len() >= (m - 1) * ld + ncols
}

/// Smallest amount of work (`m * n_out * k` multiply-adds) worth splitting over threads.
const PAR_MIN_WORK: usize = 1 << 18;

fn range_fn(kernel: Kernel, dtype: WeightDType, panels: bool) -> RangeFn {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni if panels => match dtype {
            WeightDType::Q4_0 => super::panels::range::<F_Q4_0>,
            WeightDType::Q4_1 => super::panels::range::<F_Q4_1>,
            WeightDType::Q8_0 => super::panels::range::<F_Q8_0>,
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => match dtype {
            WeightDType::Q4_0 => super::avx512::range::<F_Q4_0>,
            WeightDType::Q4_1 => super::avx512::range::<F_Q4_1>,
            WeightDType::Q8_0 => super::avx512::range::<F_Q8_0>,
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if panels => match dtype {
            WeightDType::Q4_1 => super::panels::range_avx2::<F_Q4_1>,
            // Q8_0 is never in panels for AVX2 (`check` refuses it before this runs).
            _ => super::panels::range_avx2::<F_Q4_0>,
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => match dtype {
            WeightDType::Q4_0 => super::avx2::range::<F_Q4_0>,
            WeightDType::Q4_1 => super::avx2::range::<F_Q4_1>,
            WeightDType::Q8_0 => super::avx2::range::<F_Q8_0>,
        },
        _ => match dtype {
            WeightDType::Q4_0 => scalar::range::<F_Q4_0>,
            WeightDType::Q4_1 => scalar::range::<F_Q4_1>,
            WeightDType::Q8_0 => scalar::range::<F_Q8_0>,
        },
    }
}

/// The column multiple tasks start at: sixteen, so a task never splits an AVX-512
/// panel of quantized rows (sixteen) or an AVX2 one (eight).
pub(super) const COL_ALIGN: usize = 16;

/// Output columns per task: enough tasks to balance a noisy machine, few enough that
/// a task is worth its scheduling cost; a multiple of `align` ([`COL_ALIGN`], or a
/// layout's wider panels: a decode step over f32 panels of 64 rows split at 16 read
/// parts of each panel's lines from two threads, 5-8% slower).
fn cols_per_task(n_out: usize, threads: usize, align: usize) -> usize {
    (n_out / (threads * 8))
        .clamp(16, 256)
        .next_multiple_of(align.max(1))
}

/// What [`run`] and [`run_many`] check before any kernel reads: the CPU runs
/// `kernel`, the activations match the weight's `k` and blocks, and `y` holds
/// `m * n_out` floats.
fn check(kernel: Kernel, w: &GgmlMatrix<'_>, acts: &QuantizedActs, y: &[f32]) -> Result<()> {
    if !kernel.is_available() {
        return Err(Error::KernelUnavailable { kernel });
    }
    if w.in_panels() && !super::panels::readable_by(kernel, w.dtype()) {
        return Err(Error::PanelsUnreadable {
            kernel,
            format: w.dtype().to_string(),
        });
    }
    if acts.k() != w.k() || acts.blocks() != w.blocks_per_row() {
        return Err(Error::InnerDimensionMismatch {
            acts_k: acts.k(),
            weights_k: w.k(),
            dtype: w.dtype(),
        });
    }
    let expected = acts
        .m()
        .checked_mul(w.n_out())
        .ok_or(Error::Overflow { what: "m * n_out" })?;
    if y.len() != expected {
        return Err(Error::LengthMismatch {
            what: "y (m * n_out)",
            expected,
            actual: y.len(),
            unit: "elements",
        });
    }
    Ok(())
}

pub(super) fn run(
    kernel: Kernel,
    w: GgmlMatrix<'_>,
    acts: &QuantizedActs,
    y: &mut [f32],
) -> Result<()> {
    check(kernel, &w, acts, y)?;
    let m = acts.m();
    let n_out = w.n_out();
    let f = range_fn(kernel, w.dtype(), w.in_panels());
    let a = acts.view();
    split_rows_or_columns(m, (n_out, w.k(), COL_ALIGN), y, 2, |rows, cols, out, ld| {
        f(w, a.rows_from(rows.start), rows.len(), cols, out, ld)
    });
    Ok(())
}

/// Runs `f(rows, cols, out, ld)`, which fills `out[(r - rows.start) * ld + (c -
/// cols.start)]` for every activation row `r` in `rows` and column `c` in `cols`, over
/// the row-major `m x n_out` output `y`. A prompt (at least [`ROW_SPLIT_MIN_ROWS`]
/// rows, several threads) is cut into blocks of whole output rows written in place,
/// each reading every weight row once ([`row_blocks`]: at least four rows each, so
/// every row takes the same kernel path whatever the thread count), `blocks_per_thread`
/// of them per thread (two balance a noisy machine; one where each block repacks the
/// whole matrix, as the dense GEMM does); fewer rows split the columns
/// ([`split_columns`]).
pub(super) fn split_rows_or_columns<F>(
    m: usize,
    (n_out, k, align): (usize, usize, usize),
    y: &mut [f32],
    blocks_per_thread: usize,
    f: F,
) where
    F: Fn(Range<usize>, Range<usize>, &mut [f32], usize) + Sync,
{
    let threads = rayon::current_num_threads();
    let work = m.saturating_mul(n_out).saturating_mul(k);
    if m >= ROW_SPLIT_MIN_ROWS && threads > 1 && work >= PAR_MIN_WORK {
        let mut parts = Vec::new();
        let mut rest = y;
        for rows in row_blocks(m, threads * blocks_per_thread.max(1)) {
            let (head, tail) = rest.split_at_mut(rows.len() * n_out);
            parts.push((rows, head));
            rest = tail;
        }
        parts
            .into_par_iter()
            .for_each(|(rows, out)| f(rows, 0..n_out, out, n_out));
        return;
    }
    split_columns(m, (n_out, k, align), y, |cols, out, ld| {
        f(0..m, cols, out, ld)
    });
}

/// Activation rows from which a product splits its output rows (not columns) across
/// threads.
pub(super) const ROW_SPLIT_MIN_ROWS: usize = 64;

/// `m` rows cut into about `parts` contiguous blocks, each a multiple of four rows
/// except the last, and none shorter than four rows (what decides the kernel path for
/// a block: [`super::packed`] from four rows on, so every row is computed by the same
/// code whatever the thread count).
fn row_blocks(m: usize, parts: usize) -> Vec<Range<usize>> {
    let size = m.div_ceil(parts.max(1)).next_multiple_of(4).max(4);
    let mut blocks: Vec<Range<usize>> = Vec::new();
    let mut r = 0;
    while r < m {
        let end = (r + size).min(m);
        match blocks.last_mut() {
            Some(last) if end - r < 4 => last.end = end,
            _ => blocks.push(r..end),
        }
        r = end;
    }
    blocks
}

/// `ys[i] = x · W_iᵀ` for several matrices that read the same activation rows (q, k
/// and v; gate and up), split across the threads as one parallel region (on the
/// [`team`](crate::team) when one runs, otherwise the current rayon pool)
/// instead of one per matrix, for one row or a batched decode step's few; a prompt
/// (at least [`ROW_SPLIT_MIN_ROWS`] rows) runs each matrix with [`run`]. Each column is
/// computed by the same code as in [`run`], so the results equal separate calls
/// exactly.
pub(super) fn run_many(
    kernel: Kernel,
    items: &mut [(GgmlMatrix<'_>, &mut [f32])],
    acts: &QuantizedActs,
) -> Result<()> {
    let m = acts.m();
    if m >= ROW_SPLIT_MIN_ROWS {
        for (w, y) in items.iter_mut() {
            run(kernel, *w, acts, y)?;
        }
        return Ok(());
    }
    for (w, y) in items.iter() {
        check(kernel, w, acts, y)?;
    }
    let a = acts.view();
    split_many(
        items,
        m,
        |w| (w.n_out(), w.k(), COL_ALIGN),
        |w, cols, out, ld| range_fn(kernel, w.dtype(), w.in_panels())(w, a, m, cols, out, ld),
    );
    Ok(())
}

/// Several matrices over the same `m` activation rows (q, k and v; gate and up) as one
/// parallel region instead of one per matrix: each item is a matrix and its row-major
/// `m x n_out` output, `shape(matrix)` its `(n_out, k, align)` (tasks start at
/// multiples of `align`, as in [`cols_per_task`]); `f(matrix, cols, out, ld)` fills
/// `out[r * ld + (c - cols.start)]` for every row `r < m` and column `c` in `cols` of
/// that matrix. Columns are split as [`split_columns`] splits them (the same chunks,
/// so the same results), or run in order when the work is small. For more than one
/// row each task computes an `m x ncols` tile in a buffer of its thread and writes it
/// into its columns of the output's rows (as [`split_columns`] does); callers keep
/// prompts (at least [`ROW_SPLIT_MIN_ROWS`] rows) to one matrix at a time, split by
/// rows.
pub(super) fn split_many<W, S, F>(items: &mut [(W, &mut [f32])], m: usize, shape: S, f: F)
where
    W: Copy + Send + Sync,
    S: Fn(&W) -> (usize, usize, usize),
    F: Fn(W, Range<usize>, &mut [f32], usize) + Sync,
{
    if m == 0 {
        return; // No rows: nothing to compute (the callers' checks refuse it first).
    }
    let threads = rayon::current_num_threads();
    let work: usize = items
        .iter()
        .map(|(w, _)| {
            let (n, k, _) = shape(w);
            n.saturating_mul(k).saturating_mul(m)
        })
        .sum();
    let parallel = threads > 1 && work >= PAR_MIN_WORK;
    if !parallel {
        for (w, y) in items.iter_mut() {
            let n_out = shape(w).0;
            f(*w, 0..n_out, y, n_out);
        }
        return;
    }
    // Each item's columns in chunks: for one row, straight into its output; for more,
    // through a tile of the task's thread (below).
    let chunks: Vec<usize> = items
        .iter()
        .map(|(w, _)| {
            let (n_out, _, align) = shape(w);
            if n_out >= 32 {
                cols_per_task(n_out, threads, align)
            } else {
                n_out.max(1)
            }
        })
        .collect();
    if m == 1 {
        let mut tasks: Vec<(W, usize, &mut [f32])> = Vec::new();
        for ((w, y), &chunk) in items.iter_mut().zip(&chunks) {
            for (t, yc) in y.chunks_mut(chunk).enumerate() {
                tasks.push((*w, t * chunk, yc));
            }
        }
        crate::team::for_each_mut(&mut tasks, |(w, c0, out)| {
            let ncols = out.len();
            f(*w, *c0..*c0 + ncols, out, ncols)
        });
        return;
    }
    // More rows: each task computes an `m x ncols` tile in its thread's buffer and
    // writes it into its columns of every output row.
    let mut tasks: Vec<(W, Range<usize>, Columns)> = Vec::new();
    for ((w, y), &chunk) in items.iter_mut().zip(&chunks) {
        let n_out = shape(w).0;
        let Some(out) = Columns::new(y, m, n_out) else {
            continue; // Unreachable: the callers' checks sized `y`.
        };
        for c0 in (0..n_out).step_by(chunk.max(1)) {
            tasks.push((*w, c0..(c0 + chunk).min(n_out), out));
        }
    }
    crate::team::for_each_mut(&mut tasks, |(w, cols, out)| {
        let (w, cols, out) = (*w, cols.clone(), *out);
        with_tile(m * cols.len(), |tile| {
            f(w, cols.clone(), tile, cols.len());
            // SAFETY: the tasks' column ranges of one output are disjoint (chunks of
            // its columns), inside it, and nothing else touches it during the region.
            unsafe { out.put(cols, tile) };
        })
    });
}

/// A row-major `m x n` output whose column ranges parallel tasks fill ([`split_many`],
/// [`split_columns`]): each task computes a tile in a buffer of its thread and writes
/// it into its columns of every row (before, tiles of a scratch allocated and zeroed
/// per call were copied into the rows on one thread after the region: 10% of a batched
/// step of eight sequences).
#[derive(Clone, Copy)]
struct Columns {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: `Columns` is a pointer to an output that the region's tasks write in
// disjoint column ranges (see `put`), while its owner does not touch it.
unsafe impl Send for Columns {}
// SAFETY: as above.
unsafe impl Sync for Columns {}

impl Columns {
    /// The output `y` (`m x n`); `None` when it does not hold `m * n` floats.
    fn new(y: &mut [f32], m: usize, n: usize) -> Option<Self> {
        if y.len() != m.checked_mul(n)? {
            return None;
        }
        Some(Self {
            ptr: y.as_mut_ptr(),
            m,
            n,
        })
    }

    /// Writes `tile` (`m x cols.len()`, row-major) into columns `cols` of every row.
    ///
    /// # Safety
    /// No other thread reads or writes these columns of the output meanwhile, and the
    /// output outlives the call.
    unsafe fn put(&self, cols: Range<usize>, tile: &[f32]) {
        let nc = cols.len();
        if cols.end > self.n || tile.len() < self.m * nc {
            return; // Unreachable: the tasks' ranges lie inside the output.
        }
        for (r, row) in tile.chunks_exact(nc.max(1)).take(self.m).enumerate() {
            // SAFETY: `r < m` and `cols.end <= n`, so the `nc` floats from
            // `r * n + cols.start` lie inside the `m x n` output (the caller's).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    self.ptr.add(r * self.n + cols.start),
                    nc,
                );
            }
        }
    }
}

/// Runs `f` on a buffer of `len` floats kept by the calling thread from one call to
/// the next (a tile that `f` fills before anything reads it). Tiles are `m x ncols`
/// with `m` below [`ROW_SPLIT_MIN_ROWS`] (prompts split rows instead) and `ncols` at
/// most [`cols_per_task`]'s 256: at most 64.5 KB a thread, kept, where the scratch it
/// replaces took `m x n_out` floats per matrix and call (1.5 MB for a batched LM head
/// of eight rows).
fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    TILE.with(|tile| match tile.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Unreachable (a tile's work starts no other), but a fresh buffer is as good.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Runs `f(cols, out, ld)`, which fills `out[r * ld + (c - cols.start)]` for every
/// activation row `r < m` and column `c` in `cols`, over all `n_out` columns of the
/// row-major `m x n_out` output `y`: in one call when the work (`m * n_out * k`) is
/// small, otherwise in chunks of columns across the threads (the
/// [`team`](crate::team) when one runs, otherwise the current rayon pool).
///
/// Every column is computed by the same code whatever the split (chunks start at
/// multiples of 8), so the result does not depend on the thread count.
pub(super) fn split_columns<F>(
    m: usize,
    (n_out, k, align): (usize, usize, usize),
    y: &mut [f32],
    f: F,
) where
    F: Fn(Range<usize>, &mut [f32], usize) + Sync,
{
    let threads = rayon::current_num_threads();
    let work = m.saturating_mul(n_out).saturating_mul(k);
    if threads <= 1 || work < PAR_MIN_WORK || n_out < 32 {
        f(0..n_out, y, n_out);
        return;
    }
    let chunk = cols_per_task(n_out, threads, align);
    if m == 1 {
        let mut parts: Vec<(usize, &mut [f32])> = y.chunks_mut(chunk).enumerate().collect();
        crate::team::for_each_mut(&mut parts, |(t, yc)| {
            let c0 = *t * chunk;
            f(c0..c0 + yc.len(), yc, yc.len());
        });
        return;
    }
    // Each task computes an `m x ncols` tile in its thread's buffer and writes it into
    // its columns of `y`'s rows.
    let Some(out) = Columns::new(y, m, n_out) else {
        return; // Unreachable: the callers' checks sized `y`.
    };
    crate::team::for_each_index(n_out.div_ceil(chunk), |t| {
        let cols = t * chunk..((t + 1) * chunk).min(n_out);
        with_tile(m * cols.len(), |tile| {
            f(cols.clone(), tile, cols.len());
            // SAFETY: the tasks' column ranges are disjoint chunks of `y`'s
            // columns, and nothing else touches `y` during the region.
            unsafe { out.put(cols, tile) };
        });
    });
}

/// Writes an `MR x NR` tile of results at row `r`, tile column `cc` of `out`.
#[inline]
pub(super) fn store<const MR: usize, const NR: usize>(
    t: &[[f32; NR]; MR],
    out: &mut [f32],
    ld: usize,
    r: usize,
    cc: usize,
) {
    for (i, row) in t.iter().enumerate() {
        let at = (r + i) * ld + cc;
        if let Some(dst) = out.get_mut(at..at + NR) {
            dst.copy_from_slice(row);
        }
    }
}

/// The loops over register tiles shared by the SIMD kernels: 1 x [`DECODE_NR`] tiles
/// (one activation row) for decode, 4 x 2 tiles (four activation rows, two weight rows)
/// otherwise. Expands inside
/// an `unsafe` function whose `tile::<F, MR, NR>(w_row_ptr, row_bytes, &acts, r0, nb)`
/// reads `MR` activation rows from `r0` and `NR` weight rows from `w_row_ptr`; the
/// caller has passed [`check_range`].
macro_rules! tile_loops {
    ($F:ident, $w:ident, $a:ident, $m:ident, $cols:ident, $out:ident, $ld:ident) => {{
        use $crate::kernels::driver::{DECODE_NR, store};
        let base = $w.bytes().as_ptr();
        let rb = $w.row_bytes();
        let nb = $w.blocks_per_row();
        let c0 = $cols.start;
        let mut c = $cols.start;
        if $m == 1 {
            while c + DECODE_NR <= $cols.end {
                // SAFETY: rows c..c + 4 are within n_out (checked), so the pointer and
                // the reads of the tile stay inside the weight bytes.
                let t = unsafe { tile::<$F, 1, DECODE_NR>(base.add(c * rb), rb, &$a, 0, nb) };
                store(&t, $out, $ld, 0, c - c0);
                c += DECODE_NR;
            }
            while c < $cols.end {
                // SAFETY: as above, for row c.
                let t = unsafe { tile::<$F, 1, 1>(base.add(c * rb), rb, &$a, 0, nb) };
                store(&t, $out, $ld, 0, c - c0);
                c += 1;
            }
        } else {
            while c < $cols.end {
                let nr = ($cols.end - c).min(2);
                // SAFETY: rows c..c + nr are within n_out (checked).
                let wp = unsafe { base.add(c * rb) };
                let cc = c - c0;
                let mut r = 0;
                while r < $m {
                    let mr = ($m - r).min(4);
                    // SAFETY: activation rows r..r + mr are below m, weight rows
                    // c..c + nr below n_out; both were checked against the buffers.
                    unsafe {
                        match (mr, nr) {
                            (4, 2) => {
                                store(&tile::<$F, 4, 2>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            (3, 2) => {
                                store(&tile::<$F, 3, 2>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            (2, 2) => {
                                store(&tile::<$F, 2, 2>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            (1, 2) => {
                                store(&tile::<$F, 1, 2>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            (4, _) => {
                                store(&tile::<$F, 4, 1>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            (3, _) => {
                                store(&tile::<$F, 3, 1>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            (2, _) => {
                                store(&tile::<$F, 2, 1>(wp, rb, &$a, r, nb), $out, $ld, r, cc)
                            }
                            _ => store(&tile::<$F, 1, 1>(wp, rb, &$a, r, nb), $out, $ld, r, cc),
                        }
                    }
                    r += mr;
                }
                c += nr;
            }
        }
    }};
}
pub(super) use tile_loops;

/// Weight rows per register tile when there is one activation row. One row at a time
/// streams the weights in order, which measured fastest for matrices read from memory
/// (the LM head: 2.4 ms against 4.7 ms with four interleaved rows, one thread).
pub(super) const DECODE_NR: usize = 1;

#[cfg(test)]
mod tests {
    use super::row_blocks;

    #[test]
    fn row_blocks_cover_every_row_once_in_blocks_of_four_or_more() {
        for m in 1..300 {
            for parts in [1, 2, 3, 4, 8, 16] {
                let blocks = row_blocks(m, parts);
                let mut next = 0;
                for b in &blocks {
                    assert_eq!(b.start, next, "m={m} parts={parts}: {blocks:?}");
                    assert!(b.len() >= 4.min(m), "m={m} parts={parts}: {blocks:?}");
                    next = b.end;
                }
                assert_eq!(next, m, "m={m} parts={parts}");
            }
        }
    }
}
