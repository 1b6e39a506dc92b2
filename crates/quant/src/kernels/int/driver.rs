//! Validation, kernel selection, the activations laid out for the int4 SIMD kernels,
//! and the split of output rows across threads (shared with the GGML kernels).

use std::ops::Range;

use super::super::Kernel;
use super::super::acts::{ActsView, Line, QuantizedActs};
use super::super::blocks::BLOCK_ELEMS;
use super::super::driver::{COL_ALIGN, ROW_SPLIT_MIN_ROWS, split_many, split_rows_or_columns};
use super::super::error::{Error, Result};
use super::{IntFormat, IntWeights, scalar};

/// Format ids used as const generic parameters by the SIMD kernels.
pub(super) const I8: u8 = 0;
/// Int4, symmetric (`min = -8 * scale`).
pub(super) const I4_SYM: u8 = 1;
/// Int4 with a stored minimum per group.
pub(super) const I4_ASYM: u8 = 2;

/// The activations as the integer kernels read them.
///
/// Besides the quantized rows (`view`), the int4 SIMD kernels take each pair of blocks
/// `(2p, 2p + 1)` of a row rearranged to match 32 bytes of int4 weight nibbles: the
/// low nibbles of those bytes are elements `0..16` of both blocks, the high nibbles
/// elements `16..32`. So `pairs[row * np + p]` holds `[x0[0..16], x1[0..16]]` then
/// `[x0[16..32], x1[16..32]]`, and the per-lane factors hold each block's value in the
/// four `i32` lanes its products land in (lanes `0..4` for block `2p`, `4..8` for
/// `2p + 1`). Rows with an odd block count end with a zero block.
#[derive(Clone, Copy)]
pub(super) struct IntActs<'a> {
    /// Activation rows.
    pub(super) m: usize,
    /// Blocks of 32 per row.
    pub(super) nb: usize,
    /// The quantized rows.
    pub(super) view: ActsView<'a>,
    /// Block pairs per row in the arrays below (`stride / 2`).
    pub(super) np: usize,
    /// Rearranged quants (int4 SIMD kernels only, else empty).
    pub(super) pairs: &'a [Line],
    /// `[d0; 4]` then `[d1; 4]` per pair (int4 SIMD kernels only).
    pub(super) dx: &'a [[f32; 8]],
    /// `[-8 * sum(q0), 0, 0, 0, -8 * sum(q1), 0, 0, 0]` per pair (symmetric int4).
    pub(super) qs: &'a [[i32; 8]],
    /// `[ds0, 0, 0, 0, ds1, 0, 0, 0]` per pair (asymmetric int4).
    pub(super) ds: &'a [[f32; 8]],
}

impl<'a> IntActs<'a> {
    /// The activation rows `rows` (a range inside `0..m`) on their own.
    fn rows(&self, rows: Range<usize>) -> IntActs<'a> {
        let at = rows.start * self.np;
        IntActs {
            m: rows.len(),
            view: self.view.rows_from(rows.start),
            pairs: self.pairs.get(at..).unwrap_or(&[]),
            dx: self.dx.get(at..).unwrap_or(&[]),
            qs: self.qs.get(at..).unwrap_or(&[]),
            ds: self.ds.get(at..).unwrap_or(&[]),
            ..*self
        }
    }
}

/// Owner of the rearranged activations of [`IntActs`].
#[derive(Default)]
struct PairBufs {
    pairs: Vec<Line>,
    dx: Vec<[f32; 8]>,
    qs: Vec<[i32; 8]>,
    ds: Vec<[f32; 8]>,
}

impl PairBufs {
    fn build(view: &ActsView<'_>, m: usize, asymmetric: bool) -> Self {
        let np = view.stride / 2;
        let mut bufs = PairBufs {
            pairs: Vec::with_capacity(m * np),
            dx: Vec::with_capacity(m * np),
            ..PairBufs::default()
        };
        for row in 0..m {
            for p in 0..np {
                let (b0, b1) = (2 * p, 2 * p + 1);
                let (x0, x1) = (view.block(row, b0), view.block(row, b1));
                let mut line = Line([[0; BLOCK_ELEMS]; 2]);
                let h = BLOCK_ELEMS / 2;
                line.0[0][..h].copy_from_slice(&x0[..h]);
                line.0[0][h..].copy_from_slice(&x1[..h]);
                line.0[1][..h].copy_from_slice(&x0[h..]);
                line.0[1][h..].copy_from_slice(&x1[h..]);
                bufs.pairs.push(line);
                let at = row * view.stride + b0;
                let (d0, d1) = (view.d[at], view.d[at + 1]);
                bufs.dx.push([d0, d0, d0, d0, d1, d1, d1, d1]);
                if asymmetric {
                    let (s0, s1) = (view.ds[at], view.ds[at + 1]);
                    bufs.ds.push([s0, 0.0, 0.0, 0.0, s1, 0.0, 0.0, 0.0]);
                } else {
                    let sum =
                        |x: &[i8; BLOCK_ELEMS]| -8 * x.iter().map(|&v| i32::from(v)).sum::<i32>();
                    bufs.qs.push([sum(x0), 0, 0, 0, sum(x1), 0, 0, 0]);
                }
            }
        }
        bufs
    }
}

/// Computes `out[r * ld + (c - cols.start)]` for every activation row `r < a.m` and
/// weight row (output column) `c` in `cols`. Implementations rely on [`check_range`].
pub(super) type IntRangeFn =
    fn(w: &IntWeights, a: &IntActs<'_>, cols: Range<usize>, out: &mut [f32], ld: usize);

/// The bounds every [`IntRangeFn`] relies on: the weight parts have the lengths of the
/// format, the activations have `a.m` rows of `a.nb` blocks (and, when `pairs` is set,
/// the rearranged arrays for every row), and `out` holds `a.m` rows of `ld` floats.
/// The SIMD kernels read through raw pointers only after this returned `true`.
pub(super) fn check_range(
    w: &IntWeights,
    a: &IntActs<'_>,
    cols: &Range<usize>,
    out: &[f32],
    ld: usize,
    pairs: bool,
) -> bool {
    let (m, k, n_out, f) = (a.m, w.k, w.n_out, w.format);
    let groups = f.groups_per_row(k);
    let ncols = cols.end.saturating_sub(cols.start);
    let v = &a.view;
    let weights_ok = k.is_multiple_of(BLOCK_ELEMS)
        && a.nb == k / BLOCK_ELEMS
        && groups >= 1
        && w.quants.len() == n_out * f.quant_bytes_per_row(k)
        && w.scales.len() == n_out * groups
        && w.mins.len() == if f.has_mins() { n_out * groups } else { 0 };
    let acts_ok = v.stride >= a.nb
        && v.stride.is_multiple_of(2)
        && v.lines.len() * 2 >= m * v.stride
        && v.d.len() >= m * v.stride
        && v.ds.len() >= m * v.stride;
    let pairs_ok = !pairs
        || (a.np * 2 == v.stride
            && a.pairs.len() >= m * a.np
            && a.dx.len() >= m * a.np
            && if f.has_mins() {
                a.ds.len() >= m * a.np
            } else {
                a.qs.len() >= m * a.np
            });
    m >= 1
        && cols.start < cols.end
        && cols.end <= n_out
        && weights_ok
        && acts_ok
        && pairs_ok
        && ld >= ncols
        && out.len() >= (m - 1) * ld + ncols
}

/// Whether a SIMD kernel instantiated for format id `F` and `G` blocks per group
/// handles `format`.
pub(super) fn format_is<const F: u8, const G: usize>(format: IntFormat) -> bool {
    match format {
        IntFormat::Int8 => F == I8,
        IntFormat::Int4 { group, asymmetric } => {
            group == G * BLOCK_ELEMS && F == if asymmetric { I4_ASYM } else { I4_SYM }
        }
    }
}

/// The SIMD kernel for a format, and whether it reads the rearranged pairs; `V` runs
/// prompts through the AVX-512 VNNI panels (decode steps and the last columns keep the
/// AVX2 code).
#[cfg(target_arch = "x86_64")]
fn avx2_fn<const V: bool>(format: IntFormat) -> Option<(IntRangeFn, bool)> {
    use super::avx2::range;
    Some(match format {
        IntFormat::Int8 => (range::<I8, 1, V>, false),
        IntFormat::Int4 { group, asymmetric } => {
            let f: IntRangeFn = match (group, asymmetric) {
                (32, false) => range::<I4_SYM, 1, V>,
                (64, false) => range::<I4_SYM, 2, V>,
                (128, false) => range::<I4_SYM, 4, V>,
                (32, true) => range::<I4_ASYM, 1, V>,
                (64, true) => range::<I4_ASYM, 2, V>,
                (128, true) => range::<I4_ASYM, 4, V>,
                _ => return None,
            };
            (f, true)
        }
    })
}

/// The code that runs the integer formats' decode steps and register tiles on
/// row-major weights when `kernel` is asked for: [`Kernel::Avx512Vnni`] runs the AVX2
/// code there (every AVX-512 CPU has AVX2); a prompt's packed panels, and int8 in
/// panels for every row count, use VNNI.
pub(in crate::kernels) fn runs_as(kernel: Kernel) -> Kernel {
    match kernel {
        Kernel::Avx512Vnni => Kernel::Avx2,
        k => k,
    }
}

/// The AVX-512 VNNI kernel for int8 weights in panels, every row count.
#[cfg(target_arch = "x86_64")]
fn int8_panels(w: &IntWeights, a: &IntActs<'_>, cols: Range<usize>, out: &mut [f32], ld: usize) {
    super::super::panels::range_int8(
        &w.quants, &w.scales, w.n_out, w.k, a.view, a.m, cols, out, ld,
    );
}

/// The range function of `kernel` for `format` (in panels or not; [`check`] has
/// refused panels to any kernel but AVX-512 VNNI), and whether it reads the rearranged
/// pairs (see [`runs_as`]).
fn range_fn(kernel: Kernel, format: IntFormat, panels: bool) -> (IntRangeFn, bool) {
    let scalar: (IntRangeFn, bool) = (scalar::range, false);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni if panels => (int8_panels, false),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => avx2_fn::<true>(format).unwrap_or(scalar),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2_fn::<false>(format).unwrap_or(scalar),
        _ => scalar,
    }
}

/// What [`run`] and [`run_many`] check before any kernel reads: the CPU runs
/// `kernel`, the activations match the weight's `k`, and `y` holds `m * n_out` floats.
fn check(kernel: Kernel, w: &IntWeights, acts: &QuantizedActs, y: &[f32]) -> Result<()> {
    if !kernel.is_available() {
        return Err(Error::KernelUnavailable { kernel });
    }
    if w.panels && kernel != Kernel::Avx512Vnni {
        return Err(Error::PanelsUnreadable {
            kernel,
            format: w.format.to_string(),
        });
    }
    if acts.k() != w.k {
        return Err(Error::IntInnerDimensionMismatch {
            acts_k: acts.k(),
            weights_k: w.k,
        });
    }
    let expected = acts
        .m()
        .checked_mul(w.n_out)
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
    w: &IntWeights,
    acts: &QuantizedActs,
    y: &mut [f32],
) -> Result<()> {
    check(kernel, w, acts, y)?;
    let m = acts.m();
    let (f, pairs) = range_fn(kernel, w.format, w.panels);
    let bufs = pair_bufs(acts, pairs, w.format);
    let a = int_acts(acts, &bufs);
    split_rows_or_columns(m, (w.n_out, w.k, COL_ALIGN), y, 2, |rows, cols, out, ld| {
        f(w, &a.rows(rows), cols, out, ld)
    });
    Ok(())
}

/// The rearranged activations a kernel that reads pairs needs for `format` (none
/// otherwise).
fn pair_bufs(acts: &QuantizedActs, pairs: bool, format: IntFormat) -> PairBufs {
    if pairs {
        PairBufs::build(&acts.view(), acts.m(), format.has_mins())
    } else {
        PairBufs::default()
    }
}

fn int_acts<'a>(acts: &'a QuantizedActs, bufs: &'a PairBufs) -> IntActs<'a> {
    let view = acts.view();
    IntActs {
        m: acts.m(),
        nb: acts.blocks(),
        view,
        np: view.stride / 2,
        pairs: &bufs.pairs,
        dx: &bufs.dx,
        qs: &bufs.qs,
        ds: &bufs.ds,
    }
}

/// As [`run`] for several matrices in the same format over the same activation rows
/// (one, or a batched decode step's few), as one parallel region with the activations
/// rearranged once (see [`split_many`](super::super::driver::split_many)); other cases
/// (a prompt, mixed formats) run each matrix with [`run`]. The results equal separate
/// calls exactly.
pub(super) fn run_many(
    kernel: Kernel,
    items: &mut [(&IntWeights, &mut [f32])],
    acts: &QuantizedActs,
) -> Result<()> {
    let first = items.first().map(|(w, _)| (w.format, w.panels));
    let same = items
        .iter()
        .all(|(w, _)| Some((w.format, w.panels)) == first);
    let m = acts.m();
    let (Some((format, panels)), true, true) = (first, same, m < ROW_SPLIT_MIN_ROWS) else {
        for (w, y) in items.iter_mut() {
            run(kernel, w, acts, y)?;
        }
        return Ok(());
    };
    for (w, y) in items.iter() {
        check(kernel, w, acts, y)?;
    }
    let (f, pairs) = range_fn(kernel, format, panels);
    let bufs = pair_bufs(acts, pairs, format);
    let a = int_acts(acts, &bufs);
    split_many(
        items,
        m,
        |w| (w.n_out, w.k, COL_ALIGN),
        |w, cols, out, ld| f(w, &a, cols, out, ld),
    );
    Ok(())
}
