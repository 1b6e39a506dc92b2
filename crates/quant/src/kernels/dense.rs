//! Dense weights (f32, f16, bf16): `y = x · Wᵀ` for a few activation rows, the shape of
//! a decode step (one row) or a small batch of them.
//!
//! A decode step reads every weight once and does two flops per weight, so it runs at
//! the speed memory delivers the weights. These kernels stream each weight row once,
//! convert it in registers (`vcvtph2ps` for f16 with F16C or AVX-512F, a 16-bit shift
//! for bf16) and multiply it with up to [`DENSE_TILE_ROWS`] activation rows held in L1
//! (eight with AVX-512F when a batch has more), with several independent FMA chains
//! (with AVX-512F and two to four activation rows, two weight rows at a time, sharing
//! each activation load); a batch's activation rows are copied onto 64-byte lines first
//! where they do not start on one, and output rows are split across the rayon pool as
//! the quantized kernels split theirs. Beyond [`DENSE_ROWS_STREAM_MAX_ROWS`] rows
//! ([`DENSE_PANELS_STREAM_MAX_ROWS`] for a matrix in panels: a prompt, a large batch)
//! a packed GEMM runs instead: panels of 16 weight
//! rows converted to f32 and transposed once per call, then 6 x 16 register tiles of
//! FMA chains over them (AVX2); with AVX-512F, panels of 64 rows through 6 x 64 tiles
//! (four 512-bit registers a row) and the last columns through 12 x 16 ones, the same
//! FMA chain per output. A prompt splits its activation rows across threads, one block
//! per thread (each block packs every panel). Without AVX2 the many-row case is the
//! scalar reference, so [`QLinear`](crate::QLinear) leaves it to candle's GEMM there
//! ([`dense_packed_available`]).
//!
//! An f32 matrix whose rows fill panels of 64 is stored packed at load
//! ([`DensePanels`], on 64-byte lines): prompts read the panels in place, and a decode
//! step or a batch runs the same tiles over them, [`DENSE_GEMV_MAX_ROWS`] rows a pass,
//! so every row count takes one FMA chain per output and a row gives the same bits
//! alone as in a prompt (but for prompts on AMX-BF16 tiles, below). Where the AVX-512
//! kernel runs, the panels keep their exponents in four-bit codes
//! ([`CodedPanels`](super::CodedPanels), [`PanelCoding`]): a decode step reads 12.5%
//! fewer bytes and rebuilds every value exactly in registers, a batch once per pass; a
//! prompt decodes each panel into a buffer once per call and thread and runs the same
//! tiles.
//!
//! Where the CPU has AMX-BF16 and the OS grants the tiles, a prompt of
//! [`DENSE_BF16X6_MIN_ROWS`] rows or more over f32 panels runs on them instead
//! ([`dense_runs_bf16x6`]): each value split into three bf16s, six bf16 products per
//! f32 product, f32's accuracy (tested against the exact product), not the FMA chains'
//! bits; a row's results there do not depend on the rows beside it or the thread count
//! either. So does a prompt over f16 or bf16 rows that fill whole panels, with the
//! passes whose weight part is not zero: five for f16 (an f16 value is two bf16s
//! exactly), three for bf16; they give the bits the same values give in f32 panels.
//!
//! Every path sums in f32 in the same order for every split of the output, so results
//! do not depend on the thread count; they differ from the scalar reference only by
//! the order of f32 additions.

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use super::Kernel;
use super::coded::CodedPanels;
use super::driver::{COL_ALIGN, split_many, split_rows_or_columns};
use super::error::{Error, Result};

/// Activation rows one pass over the weights serves (more rows take more passes); with
/// AVX-512F, a batch of more rows takes passes of eight.
pub const DENSE_TILE_ROWS: usize = 4;

/// Activation rows one streaming pass over a matrix in f32 panels serves (a decode
/// step's one row takes one pass, a batch several: [`DENSE_PANELS_STREAM_MAX_ROWS`]);
/// without AVX2, [`QLinear`](crate::QLinear) leaves more rows than this to candle.
pub const DENSE_GEMV_MAX_ROWS: usize = 4;

/// Up to this many activation rows, a matrix in f32 panels (plain or coded) streams
/// them past each panel in passes of [`DENSE_GEMV_MAX_ROWS`] (coded values rebuilt in
/// registers at each pass) instead of the packed pass, which decodes each coded panel
/// once into a buffer and runs the GEMM tiles over it: a batched decode step's rows
/// went faster streamed at every count measured below a prompt's. AMD EPYC Zen 5, two
/// threads, `afo bench batching`, SmolLM2 F32, streamed against packed: 8 sequences
/// 1.26-1.33x (one thread 1.30x), 16 1.13x, 32 1.10x, 48 1.03-1.10x with the AVX-512
/// kernel's coded panels; 1.8x, 1.5x, 1.4x, 1.3-1.4x with `--kernels avx2`'s plain
/// ones. A prompt of 512 rows streamed ran at 0.72x.
pub const DENSE_PANELS_STREAM_MAX_ROWS: usize = 48;

/// Up to this many activation rows, a row-major dense matrix (f16, bf16, or f32 whose
/// rows do not fill panels) streams each weight row past them, [`DENSE_TILE_ROWS`] at
/// a time from L1, instead of the packed GEMM, which converts and packs every weight
/// once per call: at a batched decode step's 8-16 rows that packing cost more than
/// the products (an F16 model batched: 240 vs 154-163 tok/s at 8 sequences, 213-238
/// vs 178-208 at 16; 32 rows gained nothing more). A row's results are then the same
/// alone as in a batch.
pub const DENSE_ROWS_STREAM_MAX_ROWS: usize = 16;

/// Whether [`dense_gemm`] runs its packed GEMM for more than [`DENSE_GEMV_MAX_ROWS`]
/// rows: the CPU has AVX2, FMA and F16C, and [`Kernel::detect`] chose a SIMD kernel
/// (not capped at [`Kernel::Scalar`]); otherwise the many-row case runs the scalar
/// reference.
pub fn dense_packed_available() -> bool {
    Kernel::detect() >= Kernel::Avx2
}

/// Output rows per panel of a [`DensePanels`] matrix: four 512-bit vectors, the width
/// of the AVX-512 GEMM's tile.
pub const DENSE_PANEL_ROWS: usize = 64;

/// Sixteen floats on a 64-byte line: in a buffer of these, every 512-bit load of a
/// panel row reads one cache line (a plain `Vec<f32>` is 16-byte aligned, and each
/// such load then straddles two lines: the packed GEMM ran 12-20% slower).
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct F32Line([f32; 16]);

/// Zeroed lines for at least `n` floats.
fn line_buffer(n: usize) -> Vec<F32Line> {
    vec![F32Line::default(); n.div_ceil(16)]
}

/// A copy of the `m` activation rows of `k` floats in `x` on 64-byte lines, when `x`
/// does not start on one and `k` is a multiple of 16 (so that every row starts on a
/// line): unaligned, every 512-bit load of a row straddles two lines, and a batch's
/// rows are loaded once for every weight row. `None` when `x` is aligned already, or
/// its rows could not be.
fn aligned_rows(x: &[f32], m: usize, k: usize) -> Option<Vec<F32Line>> {
    if x.as_ptr().addr().is_multiple_of(64) || !k.is_multiple_of(16) {
        return None;
    }
    let src = x.get(..m * k)?;
    let mut lines = line_buffer(src.len());
    floats_mut(&mut lines)[..src.len()].copy_from_slice(src);
    Some(lines)
}

/// The floats of `lines`, in order.
fn floats(lines: &[F32Line]) -> &[f32] {
    // SAFETY: `F32Line` is `repr(C)` over `[f32; 16]` with no padding (64 bytes, align
    // 64), so the lines are `16 * len` contiguous, initialised floats.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<f32>(), lines.len() * 16) }
}

/// The floats of `lines`, in order, writable.
fn floats_mut(lines: &mut [F32Line]) -> &mut [f32] {
    // SAFETY: as in `floats`, with the one mutable borrow of the lines.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<f32>(), lines.len() * 16) }
}

/// The `k` elements of row `c` of a matrix in panels (`v`), in order.
fn panel_row(v: &[f32], c: usize, k: usize) -> impl Iterator<Item = &f32> {
    let first = (c / DENSE_PANEL_ROWS) * DENSE_PANEL_ROWS * k + c % DENSE_PANEL_ROWS;
    v.get(first..)
        .unwrap_or(&[])
        .iter()
        .step_by(DENSE_PANEL_ROWS)
        .take(k)
}

/// [`Error::NotMultiple`] unless `n_out` rows fill whole panels.
fn check_panel_rows(n_out: usize) -> Result<()> {
    if n_out.is_multiple_of(DENSE_PANEL_ROWS) {
        return Ok(());
    }
    Err(Error::NotMultiple {
        what: "rows of a matrix in panels",
        n: n_out,
        multiple: DENSE_PANEL_ROWS,
    })
}

/// How [`DensePanels`] keeps its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelCoding {
    /// [`PanelCoding::Exponents`] where the detected kernel rebuilds the values in a
    /// decode step's registers ([`Kernel::Avx512Vnni`]) and at most one value in 512
    /// has an exponent outside the matrix's fifteen most common; otherwise
    /// [`PanelCoding::Plain`].
    Auto,
    /// Four bytes a value.
    Plain,
    /// Exponents in four-bit codes ([`CodedPanels`]): the same values in 28 bits each.
    Exponents,
}

/// The most values in `n` that may have an exponent outside a matrix's fifteen most
/// common for [`PanelCoding::Auto`] to code it: one in 512, so that about one
/// record in eight (64 values) or fewer takes the slow path of a decode step.
fn auto_escapes(n: usize) -> usize {
    n / 512
}

/// Where a [`DensePanels`] keeps its values.
#[derive(Clone)]
enum Store {
    Plain(std::sync::Arc<Vec<F32Line>>),
    Coded(std::sync::Arc<CodedPanels>),
}

/// An f32 `[n_out, k]` weight stored the way the packed GEMM reads it: panels of
/// [`DENSE_PANEL_ROWS`] output rows, each `k x 64` (element `kk` of the panel's row
/// `j` at `kk * 64 + j`), on 64-byte lines. A prompt's product then reads the panels
/// where they lie instead of converting and transposing every panel of the matrix
/// per call and per thread (7.5% of an AVX-512 F32 prompt), and a decode step
/// streams them with the same FMA chain per output, so a row gives the same bits
/// alone, in a batch or in a prompt (where a prompt runs on AMX-BF16 tiles instead,
/// [`dense_runs_bf16x6`], its rows keep f32's accuracy, not those bits). Rows read back
/// ([`DensePanels::row`]) are gathered from their panel.
///
/// With [`PanelCoding::Exponents`] the panels keep each value's exponent as a
/// four-bit code ([`CodedPanels`]): 12.5% fewer bytes for a decode step to read and
/// to keep resident, the same values bit for bit, the same results.
#[derive(Clone)]
pub struct DensePanels {
    store: Store,
    n_out: usize,
    k: usize,
}

impl std::fmt::Debug for DensePanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DensePanels")
            .field("n_out", &self.n_out)
            .field("k", &self.k)
            .field("coding", &self.coding())
            .finish_non_exhaustive()
    }
}

impl DensePanels {
    /// Whether a matrix of `n_out` rows can be stored in panels.
    pub fn fits(n_out: usize) -> bool {
        n_out > 0 && n_out.is_multiple_of(DENSE_PANEL_ROWS)
    }

    /// The row-major `[n_out, k]` matrix `w` in panels ([`PanelCoding::Auto`]),
    /// packed in parallel on the current rayon pool.
    ///
    /// # Errors
    /// As [`DenseMatrix::new`] for the shape: `n_out` must be a multiple of
    /// [`DENSE_PANEL_ROWS`] and `w` hold `n_out * k` floats.
    pub fn from_rows(w: &[f32], n_out: usize, k: usize) -> Result<Self> {
        Self::from_rows_coded(w, n_out, k, PanelCoding::Auto)
    }

    /// [`DensePanels::from_rows`] with the values kept as `coding` says.
    ///
    /// # Errors
    /// As [`DensePanels::from_rows`].
    pub fn from_rows_coded(w: &[f32], n_out: usize, k: usize, coding: PanelCoding) -> Result<Self> {
        DenseMatrix::new(DenseData::F32(w), n_out, k)?;
        Self::pack(n_out, k, |i| w.get(i).copied().unwrap_or(0.0), coding)
    }

    /// As [`DensePanels::from_rows`], from the matrix's little-endian f32 bytes (a
    /// GGUF tensor's data, read in place).
    ///
    /// # Errors
    /// As [`DensePanels::from_rows`], counting `bytes` in f32s.
    pub fn from_le_bytes(bytes: &[u8], n_out: usize, k: usize) -> Result<Self> {
        let (words, rest) = bytes.as_chunks::<4>();
        let expected = n_out
            .checked_mul(k)
            .ok_or(Error::Overflow { what: "n_out * k" })?;
        if !rest.is_empty() || words.len() != expected {
            return Err(Error::LengthMismatch {
                what: "f32 weight bytes (4 * n_out * k)",
                expected: expected.saturating_mul(4),
                actual: bytes.len(),
                unit: "bytes",
            });
        }
        let get = |i: usize| words.get(i).map_or(0.0, |b| f32::from_le_bytes(*b));
        Self::pack(n_out, k, get, PanelCoding::Auto)
    }

    /// Packs the matrix whose row-major element `i` is `get(i)`; the shape is checked.
    fn pack(
        n_out: usize,
        k: usize,
        get: impl Fn(usize) -> f32 + Sync,
        coding: PanelCoding,
    ) -> Result<Self> {
        check_panel_rows(n_out)?;
        if n_out == 0 {
            return Err(Error::EmptyDimension { what: "n_out" });
        }
        if k == 0 {
            return Err(Error::EmptyDimension { what: "k" });
        }
        let max_escapes = match coding {
            PanelCoding::Plain => None,
            PanelCoding::Exponents => Some(usize::MAX),
            PanelCoding::Auto => {
                (Kernel::detect() == Kernel::Avx512Vnni).then(|| auto_escapes(n_out * k))
            }
        };
        if let Some(max) = max_escapes
            && let Some(coded) = CodedPanels::encode(n_out, k, &get, Some(max))?
        {
            return Ok(Self {
                store: Store::Coded(std::sync::Arc::new(coded)),
                n_out,
                k,
            });
        }
        let mut lines = line_buffer(n_out * k);
        floats_mut(&mut lines)
            .par_chunks_mut(DENSE_PANEL_ROWS * k)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..DENSE_PANEL_ROWS {
                    let row = (p * DENSE_PANEL_ROWS + j) * k;
                    for (kk, dst) in panel
                        .iter_mut()
                        .skip(j)
                        .step_by(DENSE_PANEL_ROWS)
                        .enumerate()
                    {
                        *dst = get(row + kk);
                    }
                }
            });
        Ok(Self {
            store: Store::Plain(std::sync::Arc::new(lines)),
            n_out,
            k,
        })
    }

    /// The matrix, for [`dense_gemm`].
    pub fn matrix(&self) -> DenseMatrix<'_> {
        let data = match &self.store {
            Store::Plain(lines) => DenseData::F32Panels(floats(lines)),
            Store::Coded(c) => DenseData::F32Coded(c),
        };
        DenseMatrix {
            data,
            n_out: self.n_out,
            k: self.k,
        }
    }

    /// How the values are kept: [`PanelCoding::Plain`] or [`PanelCoding::Exponents`].
    pub fn coding(&self) -> PanelCoding {
        match self.store {
            Store::Plain(_) => PanelCoding::Plain,
            Store::Coded(_) => PanelCoding::Exponents,
        }
    }

    /// Output rows.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the panels hold: those of the row-major matrix, or with coded exponents
    /// 28 bits a value and the list of the rare others.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Plain(_) => self.n_out * self.k * 4,
            Store::Coded(c) => c.bytes(),
        }
    }

    /// Row `c` of the matrix into `out` (`k` floats).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `c` is not a row or `out` is not `k` long.
    pub fn row(&self, c: usize, out: &mut [f32]) -> Result<()> {
        if c >= self.n_out {
            return Err(Error::LengthMismatch {
                what: "row of a matrix in panels (the row count)",
                expected: self.n_out,
                actual: c,
                unit: "rows",
            });
        }
        if out.len() != self.k {
            return Err(Error::LengthMismatch {
                what: "row of a matrix in panels",
                expected: self.k,
                actual: out.len(),
                unit: "elements",
            });
        }
        match &self.store {
            Store::Plain(lines) => {
                for (o, v) in out.iter_mut().zip(panel_row(floats(lines), c, self.k)) {
                    *o = *v;
                }
            }
            Store::Coded(coded) => coded.row(c, out),
        }
        Ok(())
    }

    /// The whole matrix, row-major `[n_out, k]`, unpacked in parallel on the current
    /// rayon pool.
    pub fn to_rows(&self) -> Vec<f32> {
        let k = self.k;
        let mut out = vec![0.0f32; self.n_out * k];
        out.par_chunks_mut(DENSE_PANEL_ROWS * k)
            .enumerate()
            .for_each(|(p, rows)| {
                let decoded;
                let panel = match &self.store {
                    Store::Plain(lines) => floats(lines)
                        .get(p * DENSE_PANEL_ROWS * k..(p + 1) * DENSE_PANEL_ROWS * k)
                        .unwrap_or(&[]),
                    Store::Coded(c) => {
                        let mut buf = vec![0.0f32; DENSE_PANEL_ROWS * k];
                        c.decode_panel_scalar(p, &mut buf);
                        decoded = buf;
                        &decoded
                    }
                };
                for (j, row) in rows.chunks_exact_mut(k).enumerate() {
                    for (o, v) in row
                        .iter_mut()
                        .zip(panel.iter().skip(j).step_by(DENSE_PANEL_ROWS))
                    {
                        *o = *v;
                    }
                }
            });
        out
    }
}

/// The elements of a dense weight matrix, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum DenseData<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// IEEE half precision.
    F16(&'a [f16]),
    /// bfloat16.
    BF16(&'a [bf16]),
    /// 32-bit floats in panels of [`DENSE_PANEL_ROWS`] output rows, as
    /// [`DensePanels`] stores them: element `kk` of row `c` at
    /// `(c / 64) * 64 * k + kk * 64 + c % 64`.
    F32Panels(&'a [f32]),
    /// 32-bit floats in panels with four-bit exponent codes.
    F32Coded(&'a CodedPanels),
}

impl DenseData<'_> {
    fn len(&self) -> usize {
        match self {
            DenseData::F32(v) | DenseData::F32Panels(v) => v.len(),
            DenseData::F32Coded(c) => c.n_out() * c.k(),
            DenseData::F16(v) => v.len(),
            DenseData::BF16(v) => v.len(),
        }
    }

    /// Bytes per element (the f32 a coded element stands for counts 4).
    pub fn elem_bytes(&self) -> usize {
        match self {
            DenseData::F32(_) | DenseData::F32Panels(_) | DenseData::F32Coded(_) => 4,
            DenseData::F16(_) | DenseData::BF16(_) => 2,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            DenseData::F32(_) | DenseData::F32Panels(_) | DenseData::F32Coded(_) => "f32",
            DenseData::F16(_) => "f16",
            DenseData::BF16(_) => "bf16",
        }
    }
}

/// A row-major `[n_out, k]` dense weight matrix, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct DenseMatrix<'a> {
    data: DenseData<'a>,
    n_out: usize,
    k: usize,
}

impl<'a> DenseMatrix<'a> {
    /// A matrix over `data`, which must hold exactly `n_out * k` elements (and, in
    /// panels, `n_out` a multiple of [`DENSE_PANEL_ROWS`]).
    ///
    /// # Errors
    /// [`Error::EmptyDimension`] for a zero dimension, [`Error::LengthMismatch`] when
    /// the data is not `n_out * k` long, [`Error::Overflow`] when that overflows,
    /// [`Error::NotMultiple`] for panels of a partial panel's rows.
    pub fn new(data: DenseData<'a>, n_out: usize, k: usize) -> Result<Self> {
        if n_out == 0 {
            return Err(Error::EmptyDimension { what: "n_out" });
        }
        if k == 0 {
            return Err(Error::EmptyDimension { what: "k" });
        }
        if matches!(data, DenseData::F32Panels(_) | DenseData::F32Coded(_)) {
            check_panel_rows(n_out)?;
        }
        let expected = n_out
            .checked_mul(k)
            .ok_or(Error::Overflow { what: "n_out * k" })?;
        if data.len() != expected {
            return Err(Error::LengthMismatch {
                what: "dense weight (n_out * k)",
                expected,
                actual: data.len(),
                unit: "elements",
            });
        }
        Ok(Self { data, n_out, k })
    }

    /// Output rows.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The elements.
    pub fn data(&self) -> DenseData<'a> {
        self.data
    }

    /// The element type's name (`f32`, `f16`, `bf16`).
    pub fn dtype_name(&self) -> &'static str {
        self.data.name()
    }

    /// Weight bytes a multiplication reads.
    pub fn bytes(&self) -> usize {
        match self.data {
            DenseData::F32Coded(c) => c.bytes(),
            _ => self.n_out * self.k * self.data.elem_bytes(),
        }
    }

    /// The column multiple a split of the output starts its tasks at: whole panels
    /// for a matrix in panels (a task then streams its panels' lines alone).
    fn col_align(&self) -> usize {
        match self.data {
            DenseData::F32Panels(_) | DenseData::F32Coded(_) => DENSE_PANEL_ROWS,
            _ => COL_ALIGN,
        }
    }
}

/// `y = x · Wᵀ` with the detected kernel: `x` is `m x k`, `y` is `m x n_out`, row-major.
///
/// # Errors
/// [`Error::LengthMismatch`] when `x` or `y` does not match the shapes.
pub fn dense_gemm(w: DenseMatrix<'_>, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
    dense_gemm_with(Kernel::detect(), w, x, m, y)
}

/// `y = x · Wᵀ` with a chosen kernel; [`Error::KernelUnavailable`] if the CPU lacks it.
///
/// Runs on the current rayon pool (use `ThreadPool::install` to choose the thread count).
///
/// # Errors
/// As [`dense_gemm`], and [`Error::KernelUnavailable`].
pub fn dense_gemm_with(
    kernel: Kernel,
    w: DenseMatrix<'_>,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<()> {
    if !kernel.is_available() {
        return Err(Error::KernelUnavailable { kernel });
    }
    check_shapes(&w, x, m, y)?;
    let f = range_fn(kernel);
    // Decided by the whole call, not a thread's share of rows, so that the split does
    // not change which code computes a row.
    let pass = Pass::of(kernel, &w, m);
    let k = w.k;
    // A batch through the SIMD row kernels loads each activation row once per weight
    // row (or pair): on 64-byte lines, copied once per call and shared by the threads
    // (8 sequences over F16 with pairs of weight rows: 1.04x, the median of four
    // alternated pairs). One row (a decode step) is read once per weight row anyway.
    let lines = if reads_lines(kernel, &w, pass, m) {
        aligned_rows(x, m, k)
    } else {
        None
    };
    let x = lines.as_deref().map_or(x, |l| &floats(l)[..m * k]);
    // A prompt's row blocks each convert and transpose every panel of the matrix: one
    // block per thread packs it once per thread (two per thread: pp512 F16 9% slower;
    // a matrix in panels gained nothing from two).
    split_rows_or_columns(
        m,
        (w.n_out, k, w.col_align()),
        y,
        1,
        |rows, cols, out, ld| {
            let xr = x.get(rows.start * k..rows.end * k).unwrap_or(&[]);
            f(w, xr, rows.len(), cols, out, ld, pass)
        },
    );
    Ok(())
}

/// `ys[i] = x · W_iᵀ` for several dense matrices that read the same activation rows
/// (q, k and v; gate and up), with the detected kernel, split across the current rayon
/// pool as one parallel region instead of one per matrix: a decode step streams the
/// matrices back to back without a pause at each matrix's end, and a batched step's
/// few rows take one region for all of them. Each output is computed by the same code
/// as in [`dense_gemm`], so the results equal separate calls exactly. A prompt (from
/// [`DENSE_MANY_MAX_ROWS`] rows on) runs the matrices one after another (its product is
/// long enough to be its own region).
///
/// # Errors
/// As [`dense_gemm`], for any of the matrices.
pub fn dense_gemm_many(
    items: &mut [(DenseMatrix<'_>, &mut [f32])],
    x: &[f32],
    m: usize,
) -> Result<()> {
    dense_gemm_many_with(Kernel::detect(), items, x, m)
}

/// Activation rows up to which [`dense_gemm_many`] runs its matrices as one parallel
/// region (below, columns are split: a batched decode step; from here on, rows).
pub const DENSE_MANY_MAX_ROWS: usize = super::driver::ROW_SPLIT_MIN_ROWS - 1;

/// [`dense_gemm_many`] with a chosen kernel; [`Error::KernelUnavailable`] if the CPU
/// lacks it.
///
/// # Errors
/// As [`dense_gemm_with`], for any of the matrices.
pub fn dense_gemm_many_with(
    kernel: Kernel,
    items: &mut [(DenseMatrix<'_>, &mut [f32])],
    x: &[f32],
    m: usize,
) -> Result<()> {
    if m > DENSE_MANY_MAX_ROWS {
        for (w, y) in items.iter_mut() {
            dense_gemm_with(kernel, *w, x, m, y)?;
        }
        return Ok(());
    }
    if !kernel.is_available() {
        return Err(Error::KernelUnavailable { kernel });
    }
    for (w, y) in items.iter() {
        check_shapes(w, x, m, y)?;
    }
    let f = range_fn(kernel);
    // Each matrix's pass and activation rows as `dense_gemm_with` decides them; the
    // 64-byte lines copied once for every matrix that reads them.
    let passes: Vec<Pass> = items.iter().map(|(w, _)| Pass::of(kernel, w, m)).collect();
    let lines = match items
        .iter()
        .zip(&passes)
        .find(|((w, _), p)| reads_lines(kernel, w, **p, m))
    {
        Some(((w, _), _)) => aligned_rows(x, m, w.k),
        None => None,
    };
    let lined = lines.as_deref().map_or(x, |l| &floats(l)[..x.len()]);
    let mut with_pass: Vec<((DenseMatrix<'_>, Pass), &mut [f32])> = items
        .iter_mut()
        .zip(passes)
        .map(|((w, y), p)| ((*w, p), &mut **y))
        .collect();
    split_many(
        &mut with_pass,
        m,
        |(w, _)| (w.n_out, w.k, w.col_align()),
        |(w, pass), cols, out, ld| {
            let xs = if reads_lines(kernel, &w, pass, m) {
                lined
            } else {
                x
            };
            f(w, xs, m, cols, out, ld, pass)
        },
    );
    Ok(())
}

/// Whether `m` activation rows through `w` on `pass` are read from 64-byte lines (a
/// copy made once per call where they do not start on one): a batch streamed past
/// row-major weights by the SIMD row kernels, which load each activation row once per
/// weight row (or pair).
fn reads_lines(kernel: Kernel, w: &DenseMatrix<'_>, pass: Pass, m: usize) -> bool {
    m >= 2
        && pass == Pass::Stream
        && kernel >= Kernel::Avx2
        && matches!(
            w.data,
            DenseData::F32(_) | DenseData::F16(_) | DenseData::BF16(_)
        )
}

/// The shapes [`dense_gemm_with`] takes: `m` rows, `x` of `m * k` floats and `y` of
/// `m * n_out`.
fn check_shapes(w: &DenseMatrix<'_>, x: &[f32], m: usize, y: &[f32]) -> Result<()> {
    if m == 0 {
        return Err(Error::EmptyDimension { what: "m" });
    }
    let check = |what: &'static str, n: usize, actual: usize| -> Result<()> {
        let expected = m.checked_mul(n).ok_or(Error::Overflow { what })?;
        if actual != expected {
            return Err(Error::LengthMismatch {
                what,
                expected,
                actual,
                unit: "elements",
            });
        }
        Ok(())
    };
    check("x (m * k)", w.k, x.len())?;
    check("y (m * n_out)", w.n_out, y.len())
}

/// Which code a call's rows take, decided by the whole call (not a thread's share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Up to [`DENSE_ROWS_STREAM_MAX_ROWS`] rows ([`DENSE_PANELS_STREAM_MAX_ROWS`] for
    /// a matrix in panels): each weight row streams past them.
    Stream,
    /// More rows: the packed GEMM (or the panels' tiles).
    Packed,
    /// [`DENSE_BF16X6_MIN_ROWS`] rows or more over f32 panels, or f16 or bf16 rows that
    /// fill whole panels, where the AMX-BF16 tiles are available: six bf16 products per
    /// f32 product (five for f16 weights, three for bf16 ones).
    Bf16x6,
}

impl Pass {
    fn of(kernel: Kernel, w: &DenseMatrix<'_>, m: usize) -> Pass {
        let panels = matches!(w.data, DenseData::F32Panels(_) | DenseData::F32Coded(_));
        let stream_max = if panels {
            DENSE_PANELS_STREAM_MAX_ROWS
        } else {
            DENSE_ROWS_STREAM_MAX_ROWS
        };
        if m <= stream_max {
            return Pass::Stream;
        }
        let tiles_fit = match w.data {
            DenseData::F32Panels(_) | DenseData::F32Coded(_) => true,
            DenseData::F16(_) | DenseData::BF16(_) => rows_fit_bf16_tiles(w.n_out, w.k),
            DenseData::F32(_) => false,
        };
        if tiles_fit && bf16x6_with(kernel, m) {
            return Pass::Bf16x6;
        }
        Pass::Packed
    }
}

#[cfg(target_arch = "x86_64")]
use super::amx_f32::bf16x6_available;

#[cfg(not(target_arch = "x86_64"))]
fn bf16x6_available() -> bool {
    false
}

/// Activation rows from which a product over f32 panels (or f16 or bf16 rows of whole
/// panels) takes the AMX-BF16 tiles (where [`dense_runs_bf16x6`]): every thread converts
/// every panel's weights once per call, which fewer rows do not repay (measured for f32
/// panels). Two threads, 1536 x 576 and 576 x 1536 against the FMA tiles, alternated in
/// one process: 0.55x at 16 rows, 0.74-0.80x at 64, 0.6-1.07x at 128-192 (by the
/// minute), 0.84-1.23x at 256, 1.12-1.31x at 512.
pub const DENSE_BF16X6_MIN_ROWS: usize = 256;

/// Whether a product of `rows` activation rows over an f32 matrix in panels
/// ([`DensePanels`]) runs on AMX-BF16 tiles with the detected kernel: six bf16 products
/// per f32 product, f32's accuracy, not the FMA kernel's bits (over f16 or bf16 rows
/// whose count is a multiple of [`DENSE_PANEL_ROWS`]: five or three). It does where the
/// CPU has AMX-BF16, the OS grants the tiles, [`disable_amx`](super::disable_amx) was not
/// called and `rows` is at least [`DENSE_BF16X6_MIN_ROWS`] (a 512-token prompt chunk;
/// the scheduler's 64-token chunks keep the FMA tiles).
pub fn dense_runs_bf16x6(rows: usize) -> bool {
    bf16x6_with(Kernel::detect(), rows)
}

/// Whether a product of `rows` rows over a row-major f16 or bf16 matrix of `n_out` x
/// `k` runs on AMX-BF16 tiles ([`dense_runs_bf16x6`], five or three passes): its rows
/// fill whole panels of [`DENSE_PANEL_ROWS`] (and are not longer than the tiles'
/// conversion reaches).
pub fn dense_rows_run_bf16_tiles(n_out: usize, k: usize, rows: usize) -> bool {
    rows_fit_bf16_tiles(n_out, k) && dense_runs_bf16x6(rows)
}

/// Whether an f16 or bf16 matrix's rows can be read into AMX-BF16 tiles.
fn rows_fit_bf16_tiles(n_out: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let max_k = super::amx_f32::ROWS_MAX_K;
    #[cfg(not(target_arch = "x86_64"))]
    let max_k = 0;
    n_out.is_multiple_of(DENSE_PANEL_ROWS) && k <= max_k
}

/// Whether `rows` rows over f32 panels take the AMX-BF16 tiles with `kernel`.
fn bf16x6_with(kernel: Kernel, rows: usize) -> bool {
    kernel == Kernel::Avx512Vnni && rows >= DENSE_BF16X6_MIN_ROWS && bf16x6_available()
}

/// Computes `out[r * ld + (c - cols.start)]` for every activation row `r < m` and
/// output row `c` in `cols`; shapes were checked by [`dense_gemm_with`]. `pass`: the
/// code the whole call's rows take.
type DenseRangeFn = fn(
    w: DenseMatrix<'_>,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
    pass: Pass,
);

fn range_fn(kernel: Kernel) -> DenseRangeFn {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => simd::range_avx512,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => simd::range_avx2,
        _ => range_scalar,
    }
}

/// The bounds the SIMD paths rely on before they read through raw pointers.
fn in_bounds(
    w: &DenseMatrix<'_>,
    x: &[f32],
    m: usize,
    cols: &Range<usize>,
    out: &[f32],
    ld: usize,
) -> bool {
    let ncols = cols.end.saturating_sub(cols.start);
    let whole_panels = !matches!(w.data, DenseData::F32Panels(_) | DenseData::F32Coded(_))
        || (cols.start.is_multiple_of(DENSE_PANEL_ROWS)
            && cols.end.is_multiple_of(DENSE_PANEL_ROWS));
    whole_panels
        && m >= 1
        && cols.start < cols.end
        && cols.end <= w.n_out
        && w.data.len() == w.n_out * w.k
        && x.len() >= m * w.k
        && ld >= ncols
        && out.len() >= (m - 1) * ld + ncols
}

/// The reference: one f32 dot product per output, in element order.
fn range_scalar(
    w: DenseMatrix<'_>,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
    _pass: Pass,
) {
    let k = w.k;
    let mut coded_row = vec![
        0.0f32;
        if let DenseData::F32Coded(_) = w.data {
            k
        } else {
            0
        }
    ];
    for c in cols.clone() {
        if let DenseData::F32Coded(coded) = w.data {
            coded.row(c, &mut coded_row);
        }
        for (r, xr) in x.chunks_exact(k).take(m).enumerate() {
            let range = c * k..(c + 1) * k;
            let dot: f32 = match w.data {
                DenseData::F32Panels(v) => panel_row(v, c, k).zip(xr).map(|(a, b)| a * b).sum(),
                DenseData::F32Coded(_) => coded_row.iter().zip(xr).map(|(a, b)| a * b).sum(),
                DenseData::F32(v) => v
                    .get(range)
                    .unwrap_or(&[])
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| a * b)
                    .sum(),
                DenseData::F16(v) => v
                    .get(range)
                    .unwrap_or(&[])
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| a.to_f32() * b)
                    .sum(),
                DenseData::BF16(v) => v
                    .get(range)
                    .unwrap_or(&[])
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| a.to_f32() * b)
                    .sum(),
            };
            if let Some(o) = out.get_mut(r * ld + (c - cols.start)) {
                *o = dot;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::Kernel;
    use super::super::amx_f32::{self, K_PART as BF16X6_K_PART, Weights};
    use super::super::avx2::{hsum256, transpose8};
    use super::super::coded::simd::{bw, decode_panel, decode_panel_part, has_vbmi, vbmi};
    use super::super::coded::{CodedPanels, Escape};
    use super::{
        DENSE_GEMV_MAX_ROWS, DENSE_PANEL_ROWS, DENSE_TILE_ROWS, DenseData, DenseMatrix, Pass,
        floats_mut, in_bounds, line_buffer,
    };

    /// Element type ids (const generic parameters).
    const E_F32: u8 = 0;
    const E_F16: u8 = 1;
    const E_BF16: u8 = 2;

    /// See `DenseRangeFn`. Does nothing (and asserts in debug builds) without AVX2 or
    /// out of bounds; [`dense_gemm_with`](super::dense_gemm_with) checks both first.
    pub(super) fn range_avx2(
        w: DenseMatrix<'_>,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        pass: Pass,
    ) {
        if !Kernel::Avx2.is_available() || !in_bounds(&w, x, m, &cols, out, ld) {
            debug_assert!(false, "dense AVX2 kernel without AVX2 or out of bounds");
            return;
        }
        // SAFETY: the CPU has AVX2, FMA and F16C, and `in_bounds` holds.
        unsafe { range_simd::<false>(w, x, m, cols, out, ld, pass) }
    }

    /// See `DenseRangeFn`, with AVX-512F (the [`Kernel::Avx512Vnni`] machines have it).
    pub(super) fn range_avx512(
        w: DenseMatrix<'_>,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        pass: Pass,
    ) {
        if !Kernel::Avx512Vnni.is_available() || !in_bounds(&w, x, m, &cols, out, ld) {
            debug_assert!(
                false,
                "dense AVX-512 kernel without AVX-512 or out of bounds"
            );
            return;
        }
        // SAFETY: the CPU has AVX-512F/BW/VL, AVX2, FMA and F16C, and `in_bounds` holds.
        unsafe { range_simd::<true>(w, x, m, cols, out, ld, pass) }
    }

    /// See `DenseRangeFn`: the matrix's path (plain or coded panels, the packed GEMM,
    /// the row kernel) in 256-bit or (`ZMM`) 512-bit registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (and AVX-512F/BW/VL with `ZMM`), and `in_bounds`
    /// holds (panels: n_out x k floats, n_out a multiple of 64, whole panels in `cols`).
    #[allow(clippy::too_many_arguments)] // the matrix, the rows and the output window
    unsafe fn range_simd<const ZMM: bool>(
        w: DenseMatrix<'_>,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        pass: Pass,
    ) {
        // A prompt's rows are split across threads, so `cols` is every column; f16 and
        // bf16 rows are checked here (`in_bounds` checks panels').
        let whole = cols.start.is_multiple_of(WIDE_PANEL) && cols.len().is_multiple_of(WIDE_PANEL);
        if ZMM && pass == Pass::Bf16x6 && whole {
            // SAFETY: `Pass::of` chose the tiles (granted, AVX-512); the caller's bounds
            // (whole panels in `cols`).
            unsafe { bf16x6_panels(w, x, m, cols, out, ld) };
            return;
        }
        let packed = pass != Pass::Stream;
        let (e, p, eb) = match w.data {
            DenseData::F32Panels(v) => {
                // SAFETY: the caller's CPU and bounds.
                unsafe { panels_gemm::<ZMM>(v.as_ptr(), w.k, x, m, cols, out, ld, !packed) };
                return;
            }
            DenseData::F32Coded(c) => {
                // SAFETY: as for plain panels.
                unsafe { coded_gemm::<ZMM>(c, x, m, cols, out, ld, !packed) };
                return;
            }
            DenseData::F32(v) => (E_F32, v.as_ptr().cast::<u8>(), 4),
            DenseData::F16(v) => (E_F16, v.as_ptr().cast(), 2),
            DenseData::BF16(v) => (E_BF16, v.as_ptr().cast(), 2),
        };
        // SAFETY (all below): the caller's CPU and bounds.
        unsafe {
            match (packed, e, ZMM) {
                (true, E_F32, _) => packed_gemm::<E_F32, ZMM>(p, eb, w.k, x, m, cols, out, ld),
                (true, E_F16, _) => packed_gemm::<E_F16, ZMM>(p, eb, w.k, x, m, cols, out, ld),
                (true, _, _) => packed_gemm::<E_BF16, ZMM>(p, eb, w.k, x, m, cols, out, ld),
                (false, E_F32, true) => avx512_impl::<E_F32>(p, eb, w.k, x, m, cols, out, ld),
                (false, E_F16, true) => avx512_impl::<E_F16>(p, eb, w.k, x, m, cols, out, ld),
                (false, _, true) => avx512_impl::<E_BF16>(p, eb, w.k, x, m, cols, out, ld),
                (false, E_F32, false) => avx2_impl::<E_F32>(p, eb, w.k, x, m, cols, out, ld),
                (false, E_F16, false) => avx2_impl::<E_F16>(p, eb, w.k, x, m, cols, out, ld),
                (false, _, false) => avx2_impl::<E_BF16>(p, eb, w.k, x, m, cols, out, ld),
            }
        }
    }

    /// An f32 matrix in panels (plain or coded), or f16 or bf16 rows, times a prompt's
    /// rows on AMX-BF16 tiles ([`super::super::amx_f32`]); coded panels are decoded one
    /// at a time into a buffer, f16 and bf16 rows converted straight into tiles.
    ///
    /// # Safety
    /// `Pass::Bf16x6` was chosen (the tiles granted, AVX-512); `in_bounds` holds for a
    /// matrix in panels or f16 or bf16 rows, whole panels in `cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn bf16x6_panels(
        w: DenseMatrix<'_>,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let k = w.k;
        let first = cols.start / WIDE_PANEL;
        let npanels = cols.len() / WIDE_PANEL;
        match w.data {
            DenseData::F32Panels(v) => {
                let mut panel = |i: usize, kk: Range<usize>| {
                    v.as_ptr()
                        .wrapping_add((first + i) * WIDE_PANEL * k + kk.start * WIDE_PANEL)
                };
                let weights = Weights::F32(&mut panel);
                // SAFETY: the caller's; panel first + i holds k x 64 floats.
                unsafe { amx_f32::gemm(weights, npanels, k, x, m, out, ld) };
            }
            DenseData::F32Coded(c) => {
                let mut lines = line_buffer(k.min(BF16X6_K_PART) * WIDE_PANEL);
                let buf = floats_mut(&mut lines);
                let mut panel = |i: usize, kk: Range<usize>| {
                    // SAFETY: the caller's CPU; the buffer holds the part's kk x 64.
                    unsafe { decode_panel_part(c, first + i, kk, buf) };
                    buf.as_ptr()
                };
                let weights = Weights::F32(&mut panel);
                // SAFETY: the caller's; each part of a panel is decoded into the buffer.
                unsafe { amx_f32::gemm(weights, npanels, k, x, m, out, ld) };
            }
            DenseData::F16(v) => {
                let w = v.as_ptr().wrapping_add(cols.start * k).cast::<u16>();
                let weights = Weights::Rows { w, f16: true };
                // SAFETY: the caller's; rows cols hold k values each (k within the
                // gather's reach: `rows_fit_bf16_tiles`).
                unsafe { amx_f32::gemm(weights, npanels, k, x, m, out, ld) };
            }
            DenseData::BF16(v) => {
                let w = v.as_ptr().wrapping_add(cols.start * k).cast::<u16>();
                let weights = Weights::Rows { w, f16: false };
                // SAFETY: as for f16.
                unsafe { amx_f32::gemm(weights, npanels, k, x, m, out, ld) };
            }
            DenseData::F32(_) => debug_assert!(false, "AMX-BF16 pass for f32 rows"),
        }
    }

    /// Eight weights from `p` as f32.
    ///
    /// # Safety
    /// `p` points to 8 elements of type `E`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<const E: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller vouches for 8 elements at `p`.
        unsafe {
            match E {
                E_F32 => _mm256_loadu_ps(p.cast()),
                E_F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(p.cast()),
                ))),
            }
        }
    }

    /// Sixteen weights from `p` as f32.
    ///
    /// # Safety
    /// `p` points to 16 elements of type `E`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load16<const E: u8>(p: *const u8) -> __m512 {
        // SAFETY: the caller vouches for 16 elements at `p`.
        unsafe {
            match E {
                E_F32 => _mm512_loadu_ps(p.cast()),
                E_F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p.cast()),
                ))),
            }
        }
    }

    /// One weight element as f32 (the tails shorter than a vector).
    ///
    /// # Safety
    /// `p` points to one element of type `E`.
    #[inline]
    unsafe fn load1<const E: u8>(p: *const u8) -> f32 {
        // SAFETY: the caller vouches for one element at `p`.
        unsafe {
            match E {
                E_F32 => p.cast::<f32>().read_unaligned(),
                E_F16 => half::f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
                _ => half::bf16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
            }
        }
    }

    /// Dispatches a weight row over the activation rows in tiles of up to `$tile`
    /// rows ([`DENSE_TILE_ROWS`] or [`WIDE_TILE_ROWS`]); `$row::<E, MR>(wp, k, xp) ->
    /// [f32; MR]` computes one.
    macro_rules! rows_loop {
        ($row:ident, $E:ident, $p:ident, $eb:ident, $k:ident, $x:ident, $m:ident, $cols:ident, $out:ident, $ld:ident, $tile:expr) => {{
            let xp = $x.as_ptr();
            for c in $cols.clone() {
                // SAFETY: c < n_out, so the row lies inside the weight data.
                let wp = unsafe { $p.add(c * $k * $eb) };
                let cc = c - $cols.start;
                let mut r = 0;
                while r < $m {
                    let mr = ($m - r).min($tile);
                    // SAFETY: activation rows r..r + mr are below m (x holds m * k).
                    let xr = unsafe { xp.add(r * $k) };
                    // SAFETY: as above; the row function reads k elements of each.
                    unsafe {
                        match mr {
                            8 => store(&$row::<$E, 8>(wp, $k, xr), $out, $ld, r, cc),
                            7 => store(&$row::<$E, 7>(wp, $k, xr), $out, $ld, r, cc),
                            6 => store(&$row::<$E, 6>(wp, $k, xr), $out, $ld, r, cc),
                            5 => store(&$row::<$E, 5>(wp, $k, xr), $out, $ld, r, cc),
                            4 => store(&$row::<$E, 4>(wp, $k, xr), $out, $ld, r, cc),
                            3 => store(&$row::<$E, 3>(wp, $k, xr), $out, $ld, r, cc),
                            2 => store(&$row::<$E, 2>(wp, $k, xr), $out, $ld, r, cc),
                            _ => store(&$row::<$E, 1>(wp, $k, xr), $out, $ld, r, cc),
                        }
                    }
                    r += mr;
                }
            }
        }};
    }

    #[inline]
    fn store(t: &[f32], out: &mut [f32], ld: usize, r: usize, cc: usize) {
        for (i, v) in t.iter().enumerate() {
            if let Some(o) = out.get_mut((r + i) * ld + cc) {
                *o = *v;
            }
        }
    }

    /// Activation rows one pass of a weight row serves with AVX-512F when a batch has
    /// more than [`DENSE_TILE_ROWS`]: sixteen accumulators, each weight vector
    /// converted once for all of them, and the weights' stream from memory overlapped
    /// with every row's FMAs (in tiles of four the first tile waited on memory and the
    /// second ran from L1 after it: 8 sequences over F16, 1.09x, the median of six
    /// alternated pairs).
    const WIDE_TILE_ROWS: usize = 8;

    /// How far ahead of its loads the one-row kernel prefetches weight bytes.
    const PREFETCH: usize = 8192;

    /// Output columns per packed panel (two vectors).
    const PANEL: usize = 16;
    /// Activation rows per packed micro-kernel: 6 x 2 accumulators, two weight vectors
    /// and a broadcast fill the 16 `ymm` registers.
    const PACKED_MR: usize = 6;

    /// Activation rows per AVX-512 packed micro-kernel: 12 accumulators of 16 columns,
    /// the panel vector and broadcasts, of the 32 `zmm` registers.
    const PACKED_MR_512: usize = 12;

    /// Output columns per wide AVX-512 panel (four vectors).
    const WIDE_PANEL: usize = DENSE_PANEL_ROWS;
    /// Activation rows per wide AVX-512 micro-kernel: 6 x 4 accumulators, the four
    /// panel vectors and a broadcast, of the 32 `zmm` registers. Per element of `k`,
    /// ten loads feed 24 FMAs (the 12-row kernel's thirteen loads fed twelve, and two
    /// loads a cycle held it at about 60% of the FMA units).
    const WIDE_MR: usize = 6;

    /// A micro-kernel: `(panel, stride, k, x, r0, out, ld, cc)` multiplies activation
    /// rows `r0..` of `x` by the panel's columns (see [`micro`] and [`micro512`]).
    type Tile = unsafe fn(*const f32, usize, usize, &[f32], usize, &mut [f32], usize, usize);

    /// The instances of a micro-kernel for one to `N` rows, indexed by rows - 1.
    macro_rules! tiles {
        ($f:ident, $nv:literal, $pf:literal; $($mr:literal)*) => {
            [$($f::<$mr, $nv, $pf> as Tile),*]
        };
    }

    /// AVX2 tiles of 16 columns for prompts (1 to 6 rows), of 64 for a decode step's
    /// rows one at a time with the weights prefetched, and of 8 columns for a matrix's
    /// last ones.
    const AVX2_16: [Tile; PACKED_MR] = tiles!(micro, 2, false; 1 2 3 4 5 6);
    const AVX2_64_PF: [Tile; 1] = tiles!(micro, 8, true; 1);
    const AVX2_8: [Tile; PACKED_MR] = tiles!(micro, 1, false; 1 2 3 4 5 6);

    /// AVX-512 tiles: one 512-bit vector (16 columns) for up to twelve rows, four (64
    /// columns) for up to six, and four for a decode step's rows with the weights
    /// prefetched.
    const ZMM_1: [Tile; PACKED_MR_512] = tiles!(micro512, 1, false; 1 2 3 4 5 6 7 8 9 10 11 12);
    const ZMM_4: [Tile; WIDE_MR] = tiles!(micro512, 4, false; 1 2 3 4 5 6);
    const ZMM_4_PF: [Tile; DENSE_GEMV_MAX_ROWS] = tiles!(micro512, 4, true; 1 2 3 4);

    /// Runs `tiles[mr - 1]` over every group of up to `tiles.len()` rows of `x`.
    ///
    /// # Safety
    /// As the tiles': the CPU has their features; the panel holds `k` rows of its
    /// columns `stride` apart; `x` holds `m` rows of `k` floats; `out` holds the
    /// tile's columns of `m` rows `ld` apart from `cc`.
    #[allow(clippy::too_many_arguments)] // the panel, the rows and the output window
    #[inline]
    unsafe fn run_tiles(
        tiles: &[Tile],
        panel: *const f32,
        stride: usize,
        k: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        let mut r = 0;
        while r < m {
            let mr = (m - r).min(tiles.len());
            if let Some(tile) = mr.checked_sub(1).and_then(|i| tiles.get(i)) {
                // SAFETY: the caller's bounds, for rows r..r + mr.
                unsafe { tile(panel, stride, k, x, r, out, ld, cc) };
            }
            r += mr;
        }
    }

    /// The packed GEMM for many activation rows: panels of 16 weight rows (8 for the
    /// last ones) are converted to f32 and transposed once per call into a `k x 16`
    /// buffer (`64 k` bytes, in L2, on 64-byte lines), then every group of six
    /// activation rows runs through it: per element of `k`, two weight vectors and six
    /// broadcast activations in twelve FMA chains, one per output (so each output is
    /// summed in element order, whatever the tile). With `ZMM` (AVX-512F), 64-column
    /// panels first (`256 k` bytes) meet six activation rows at a time, four 512-bit
    /// vectors and 24 FMA chains per element, then a 16-column panel meets twelve rows,
    /// one vector and twelve chains: the same chains, so the same bits as the AVX2
    /// tiles. Columns past the last multiple of 8 take the row kernel.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (and AVX-512F/BW/VL with `ZMM`); `p` holds
    /// `n_out x k` elements of type `E` with `cols` below `n_out`; `x` holds `m x k`
    /// floats; `out` holds `(m - 1) * ld + cols.len()` floats.
    #[allow(clippy::too_many_arguments)] // the unpacked matrix and the output window
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn packed_gemm<const E: u8, const ZMM: bool>(
        p: *const u8,
        eb: usize,
        k: usize,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let mut lines = line_buffer(k * if ZMM { WIDE_PANEL } else { PANEL });
        let panel = floats_mut(&mut lines);
        let mut c = cols.start;
        while ZMM && c + WIDE_PANEL <= cols.end {
            // SAFETY: rows c..c + 64 are below n_out (the caller's bounds).
            unsafe { pack::<E>(p, eb, k, c, WIDE_PANEL, panel) };
            // SAFETY: the CPU has AVX-512F (the caller's); the panel holds k rows of
            // 64; x holds m rows; the output holds them.
            unsafe {
                let pp = panel.as_ptr();
                run_tiles(&ZMM_4, pp, WIDE_PANEL, k, x, m, out, ld, c - cols.start);
            }
            c += WIDE_PANEL;
        }
        while c + 8 <= cols.end {
            let width = if c + PANEL <= cols.end { PANEL } else { 8 };
            // SAFETY: rows c..c + width are below n_out (the caller's bounds).
            unsafe { pack::<E>(p, eb, k, c, width, panel) };
            let tiles: &[Tile] = match (ZMM, width) {
                (true, PANEL) => &ZMM_1,
                (false, PANEL) => &AVX2_16,
                _ => &AVX2_8,
            };
            // SAFETY: the CPU has the tiles' features (the caller's); the panel holds
            // k rows of `width`; x holds m rows; the output holds them.
            unsafe {
                run_tiles(
                    tiles,
                    panel.as_ptr(),
                    width,
                    k,
                    x,
                    m,
                    out,
                    ld,
                    c - cols.start,
                )
            };
            c += width;
        }
        if c < cols.end {
            let out = &mut out[c - cols.start..];
            let rest = c..cols.end;
            // SAFETY: as this function's, for the last columns.
            unsafe { avx2_impl::<E>(p, eb, k, x, m, rest, out, ld) }
        }
    }

    /// `y = x · Wᵀ` over a matrix stored in panels ([`DensePanels`]): the packed GEMM's
    /// tiles read the panels where they lie, with no conversion per call, a whole
    /// panel at a time (the drivers split a matrix in panels at panel boundaries). A
    /// decode step or a batch (`stream`: at most [`DENSE_PANELS_STREAM_MAX_ROWS`] rows,
    /// [`DENSE_GEMV_MAX_ROWS`] a pass) prefetches the
    /// weights ahead, as the row kernel does. Every output is one FMA chain in element
    /// order, as in the packed GEMM, so a row's result is the same in a decode step, a
    /// batch or a prompt, and the same as the packed GEMM's from the row-major matrix.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (and AVX-512F/BW/VL with `ZMM`); `p` holds the
    /// `n_out x k` panels with `cols` below `n_out`, both ends multiples of 64; `x`
    /// holds `m x k` floats; `out` holds `(m - 1) * ld + cols.len()` floats.
    #[allow(clippy::too_many_arguments)] // the panels and the output window
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panels_gemm<const ZMM: bool>(
        p: *const f32,
        k: usize,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        stream: bool,
    ) {
        for c in cols.clone().step_by(WIDE_PANEL) {
            let panel = p.wrapping_add(c * k);
            // SAFETY: the caller's, for the panel of columns c..c + 64.
            unsafe { panel_tiles::<ZMM>(panel, k, x, m, out, ld, c - cols.start, stream) };
        }
    }

    /// One panel of 64 columns (`k x 64` floats at `panel`) times the `m` rows of `x`,
    /// written at `out[r * ld + cc..]`: the tiles of [`panels_gemm`].
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (and AVX-512F/BW/VL with `ZMM`); the panel holds
    /// `k x 64` floats; `x` holds `m x k`; `out` holds `(m - 1) * ld + cc + 64`.
    #[allow(clippy::too_many_arguments)] // the panel and the output window
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panel_tiles<const ZMM: bool>(
        panel: *const f32,
        k: usize,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
        stream: bool,
    ) {
        if ZMM {
            let tiles: &[Tile] = if stream { &ZMM_4_PF } else { &ZMM_4 };
            // SAFETY: the CPU has AVX-512F (the caller's); the panel holds k rows of
            // 64; x holds m rows; the output holds the panel's columns.
            unsafe { run_tiles(tiles, panel, WIDE_PANEL, k, x, m, out, ld, cc) };
        } else if stream {
            // One pass over the whole panel per row: its lines stream from memory
            // together (16 columns at a time read every fourth line, and ran 30%
            // slower).
            // SAFETY: the CPU has AVX2 and FMA (the caller's); as above.
            unsafe { run_tiles(&AVX2_64_PF, panel, WIDE_PANEL, k, x, m, out, ld, cc) };
        } else {
            for v in 0..WIDE_PANEL / PANEL {
                // SAFETY: as above, for the 16 columns from v * 16.
                unsafe {
                    let b = panel.add(PANEL * v);
                    run_tiles(&AVX2_16, b, WIDE_PANEL, k, x, m, out, ld, cc + PANEL * v);
                }
            }
        }
    }

    /// A decode step's tiles over coded panels, for one to four rows.
    type CodedTile =
        unsafe fn(*const u8, &[Escape], &[u32; 16], usize, &[f32], usize, &mut [f32], usize, usize);
    /// The instances of a coded micro-kernel for one to four rows, indexed by rows - 1.
    macro_rules! coded_tiles {
        ($m:ident) => {
            [
                $m::micro::<1, true> as CodedTile,
                $m::micro::<2, true>,
                $m::micro::<3, true>,
                $m::micro::<4, true>,
            ]
        };
    }
    /// With AVX512_VBMI (`vpermb`) and without.
    const CODED_PF_VBMI: [CodedTile; DENSE_GEMV_MAX_ROWS] = coded_tiles!(vbmi);
    const CODED_PF_BW: [CodedTile; DENSE_GEMV_MAX_ROWS] = coded_tiles!(bw);

    /// `y = x · Wᵀ` over a matrix in coded panels ([`CodedPanels`]). With AVX-512F a
    /// decode step (`stream`) rebuilds each record's values in registers and
    /// multiplies them at once (the records read from memory are all it reads);
    /// otherwise each panel is decoded into a buffer of 64-byte lines and runs the
    /// plain panels' tiles (a prompt decodes each panel once per call and thread, and
    /// reuses it for every row). Every output is the plain panels' FMA chain over the
    /// same values, so the bits are theirs.
    ///
    /// # Safety
    /// As [`panels_gemm`], for the coded matrix `c`.
    #[allow(clippy::too_many_arguments)] // the panels and the output window
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn coded_gemm<const ZMM: bool>(
        c: &CodedPanels,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        stream: bool,
    ) {
        let k = c.k();
        if ZMM && stream {
            let tiles = if has_vbmi() {
                &CODED_PF_VBMI
            } else {
                &CODED_PF_BW
            };
            for col in cols.clone().step_by(WIDE_PANEL) {
                let p = col / WIDE_PANEL;
                let (recs, escapes) = (c.panel(p).as_ptr(), c.panel_escapes(p));
                let mut r = 0;
                while r < m {
                    let mr = (m - r).min(tiles.len());
                    if let Some(tile) = mr.checked_sub(1).and_then(|i| tiles.get(i)) {
                        // SAFETY: the CPU has AVX-512F (the caller's); the panel holds
                        // k records; x holds rows r..r + mr; the output holds them.
                        let cc = col - cols.start;
                        unsafe { tile(recs, escapes, c.table(), k, x, r, out, ld, cc) };
                    }
                    r += mr;
                }
            }
            return;
        }
        let mut lines = line_buffer(k * WIDE_PANEL);
        let buf = floats_mut(&mut lines);
        for col in cols.clone().step_by(WIDE_PANEL) {
            // SAFETY: the caller's CPU; the buffer holds k x 64 floats, the panel's.
            unsafe {
                decode_panel::<ZMM>(c, col / WIDE_PANEL, buf);
                panel_tiles::<ZMM>(buf.as_ptr(), k, x, m, out, ld, col - cols.start, stream);
            }
        }
    }

    /// Converts weight rows `c..c + width` (`width` 8, 16 or 64) to f32 into `panel`,
    /// transposed: element `kk` of row `c + j` at `panel[kk * width + j]`.
    ///
    /// # Safety
    /// Rows `c..c + width` of `k` elements of type `E` exist at `p`; `panel` holds
    /// `k * width` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack<const E: u8>(
        p: *const u8,
        eb: usize,
        k: usize,
        c: usize,
        width: usize,
        panel: &mut [f32],
    ) {
        let dst = panel.as_mut_ptr();
        for half in 0..width / 8 {
            let rows: [*const u8; 8] =
                std::array::from_fn(|j| p.wrapping_add((c + half * 8 + j) * k * eb));
            let mut kk = 0;
            while kk + 8 <= k {
                // SAFETY: elements kk..kk + 8 of the eight rows exist.
                let v: [__m256; 8] =
                    std::array::from_fn(|j| unsafe { load8::<E>(rows[j].add(kk * eb)) });
                let t = transpose8(v);
                for (i, ti) in t.iter().enumerate() {
                    // SAFETY: (kk + i) * width + half * 8 + 8 <= k * width.
                    unsafe { _mm256_storeu_ps(dst.add((kk + i) * width + half * 8), *ti) };
                }
                kk += 8;
            }
            while kk < k {
                for (j, row) in rows.iter().enumerate() {
                    // SAFETY: element kk of the row exists; the panel holds k * width.
                    unsafe { *dst.add(kk * width + half * 8 + j) = load1::<E>(row.add(kk * eb)) };
                }
                kk += 1;
            }
        }
    }

    /// `MR` activation rows from `r0` times `NV x 8` columns of a transposed panel
    /// (element `kk` of its column `j` at `panel[kk * stride + j]`), written at
    /// `out[(r0 + i) * ld + cc..]`: per element of `k`, `NV` weight vectors and `MR`
    /// broadcast activations in `MR x NV` FMA chains, one per output, in element order.
    /// `PF`: fetch the panel's lines [`PREFETCH`] bytes ahead (a decode step, which
    /// reads them from memory once).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; rows `r0..r0 + MR` of `x` (`k` floats each) exist, the
    /// panel holds `(k - 1) * stride + NV * 8` floats, and `out` holds
    /// `(r0 + MR - 1) * ld + cc + NV * 8` floats.
    #[allow(clippy::too_many_arguments)] // the panel, the rows and the output window
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i and v index the tile
    unsafe fn micro<const MR: usize, const NV: usize, const PF: bool>(
        panel: *const f32,
        stride: usize,
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let xp = x.as_ptr();
        for kk in 0..k {
            let row = panel.wrapping_add(kk * stride);
            if PF {
                for v in (0..NV).step_by(2) {
                    let ahead = row.wrapping_add(PREFETCH / 4 + 8 * v);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                }
            }
            let mut b = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                // SAFETY: kk < k, so the panel holds these eight floats.
                b[v] = unsafe { _mm256_loadu_ps(row.add(v * 8)) };
            }
            for i in 0..MR {
                // SAFETY: row r0 + i of x holds element kk.
                let a = _mm256_set1_ps(unsafe { *xp.add((r0 + i) * k + kk) });
                for v in 0..NV {
                    acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
                }
            }
        }
        for i in 0..MR {
            for v in 0..NV {
                let at = (r0 + i) * ld + cc + v * 8;
                if let Some(dst) = out.get_mut(at..at + 8) {
                    // SAFETY: dst holds eight floats.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), acc[i][v]) };
                }
            }
        }
    }

    /// [`micro`] in 512-bit registers: `MR` activation rows times `NV x 16` columns of
    /// a transposed panel, the same FMA chains (so the same bits).
    ///
    /// # Safety
    /// The CPU has AVX-512F; rows `r0..r0 + MR` of `x` (`k` floats each) exist, the
    /// panel holds `(k - 1) * stride + NV * 16` floats, and `out` holds
    /// `(r0 + MR - 1) * ld + cc + NV * 16` floats.
    #[allow(clippy::too_many_arguments)] // the panel, the rows and the output window
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i and v index the tile
    unsafe fn micro512<const MR: usize, const NV: usize, const PF: bool>(
        panel: *const f32,
        stride: usize,
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let xp = x.as_ptr();
        for kk in 0..k {
            let row = panel.wrapping_add(kk * stride);
            if PF {
                for v in 0..NV {
                    let ahead = row.wrapping_add(PREFETCH / 4 + 16 * v);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                }
            }
            // SAFETY: kk < k, so the panel holds these NV x 16 floats.
            let b: [__m512; NV] =
                std::array::from_fn(|v| unsafe { _mm512_loadu_ps(row.add(16 * v)) });
            for i in 0..MR {
                // SAFETY: row r0 + i of x holds element kk.
                let a = _mm512_set1_ps(unsafe { *xp.add((r0 + i) * k + kk) });
                for v in 0..NV {
                    acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
                }
            }
        }
        for i in 0..MR {
            for v in 0..NV {
                let at = (r0 + i) * ld + cc + 16 * v;
                if let Some(dst) = out.get_mut(at..at + 16) {
                    // SAFETY: dst holds sixteen floats.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), acc[i][v]) };
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // the unpacked matrix and the output window
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_impl<const E: u8>(
        p: *const u8,
        eb: usize,
        k: usize,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        rows_loop!(row_avx2, E, p, eb, k, x, m, cols, out, ld, DENSE_TILE_ROWS)
    }

    /// With AVX-512F: one weight row at a time for one activation row (a decode step
    /// reads every weight from memory once: nothing to share), two weight rows at a
    /// time for two to [`DENSE_TILE_ROWS`], so that each activation load from L1 feeds
    /// both rows' FMA chains (twelve loads for sixteen FMAs per 32 elements of `k`,
    /// against ten for eight), and one weight row at a time over tiles of up to
    /// [`WIDE_TILE_ROWS`] activation rows for more. Every output gets the chains
    /// [`row_avx512`] gives it alone.
    #[allow(clippy::too_many_arguments)] // the unpacked matrix and the output window
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn avx512_impl<const E: u8>(
        p: *const u8,
        eb: usize,
        k: usize,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        if m < 2 {
            return rows_loop!(row_avx512, E, p, eb, k, x, m, cols, out, ld, 1);
        }
        if m > DENSE_TILE_ROWS {
            return rows_loop!(row_avx512, E, p, eb, k, x, m, cols, out, ld, WIDE_TILE_ROWS);
        }
        let xp = x.as_ptr();
        let pairs = cols.start..cols.start + cols.len() / 2 * 2;
        for c in pairs.clone().step_by(2) {
            // SAFETY: c + 1 < n_out, so both rows lie inside the weight data.
            let (w0, w1) = unsafe { (p.add(c * k * eb), p.add((c + 1) * k * eb)) };
            let cc = c - cols.start;
            let mut r = 0;
            while r < m {
                let mr = (m - r).min(DENSE_TILE_ROWS);
                // SAFETY: activation rows r..r + mr are below m (x holds m * k); the
                // pair function reads k elements of each and of both weight rows.
                unsafe {
                    let xr = xp.add(r * k);
                    match mr {
                        4 => store_pair(pair_avx512::<E, 4>(w0, w1, k, xr), out, ld, r, cc),
                        3 => store_pair(pair_avx512::<E, 3>(w0, w1, k, xr), out, ld, r, cc),
                        2 => store_pair(pair_avx512::<E, 2>(w0, w1, k, xr), out, ld, r, cc),
                        _ => store_pair(pair_avx512::<E, 1>(w0, w1, k, xr), out, ld, r, cc),
                    }
                }
                r += mr;
            }
        }
        // The odd last weight row, alone; its outputs start at column
        // `pairs.end - cols.start` of `out`.
        if let Some(rest) = out.get_mut(pairs.end - cols.start..) {
            let odd = pairs.end..cols.end;
            rows_loop!(
                row_avx512,
                E,
                p,
                eb,
                k,
                x,
                m,
                odd,
                rest,
                ld,
                DENSE_TILE_ROWS
            )
        }
    }

    /// Stores the outputs of two weight rows (columns `cc` and `cc + 1`).
    #[inline]
    fn store_pair<const MR: usize>(
        t: [[f32; MR]; 2],
        out: &mut [f32],
        ld: usize,
        r: usize,
        cc: usize,
    ) {
        store(&t[0], out, ld, r, cc);
        store(&t[1], out, ld, r, cc + 1);
    }

    /// Dot products of one weight row (`k` elements at `w`) with `MR` activation rows
    /// (`k` apart from `x`): two 8-wide FMA chains per activation row.
    ///
    /// # Safety
    /// `w` points to `k` elements of type `E`; `x` to `MR * k` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i indexes the accumulators and the rows
    unsafe fn row_avx2<const E: u8, const MR: usize>(
        w: *const u8,
        k: usize,
        x: *const f32,
    ) -> [f32; MR] {
        let eb = if E == E_F32 { 4 } else { 2 };
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut j = 0;
        // SAFETY (whole loop): j + 16 <= k, inside the row and each activation row.
        while j + 16 <= k {
            // As in [`row_avx512`]: the weight bytes PREFETCH ahead (one line a step
            // for f32, the same line twice for the 16-bit types).
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * eb + PREFETCH).cast());
            let (w0, w1) = unsafe { (load8::<E>(w.add(j * eb)), load8::<E>(w.add((j + 8) * eb))) };
            for i in 0..MR {
                let xi = unsafe { x.add(i * k + j) };
                acc[i][0] = _mm256_fmadd_ps(w0, unsafe { _mm256_loadu_ps(xi) }, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, unsafe { _mm256_loadu_ps(xi.add(8)) }, acc[i][1]);
            }
            j += 16;
        }
        if j + 8 <= k {
            // SAFETY: j + 8 <= k.
            let w0 = unsafe { load8::<E>(w.add(j * eb)) };
            for i in 0..MR {
                let xi = unsafe { x.add(i * k + j) };
                acc[i][0] = _mm256_fmadd_ps(w0, unsafe { _mm256_loadu_ps(xi) }, acc[i][0]);
            }
            j += 8;
        }
        let mut res = [0.0f32; MR];
        for i in 0..MR {
            res[i] = hsum256(_mm256_add_ps(acc[i][0], acc[i][1]));
        }
        while j < k {
            // SAFETY: j < k.
            let wj = unsafe { load1::<E>(w.add(j * eb)) };
            for i in 0..MR {
                res[i] = wj.mul_add(unsafe { *x.add(i * k + j) }, res[i]);
            }
            j += 1;
        }
        res
    }

    /// [`row_avx512`] for two weight rows (`w0`, `w1`) at once: each activation load
    /// feeds both rows' chains; every output's chains, reduction and tail are
    /// [`row_avx512`]'s, so its bits are the ones it gives alone.
    ///
    /// # Safety
    /// As [`row_avx512`], for both weight rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i indexes the accumulators and the rows
    unsafe fn pair_avx512<const E: u8, const MR: usize>(
        w0: *const u8,
        w1: *const u8,
        k: usize,
        x: *const f32,
    ) -> [[f32; MR]; 2] {
        let eb = if E == E_F32 { 4 } else { 2 };
        let w = [w0, w1];
        let mut acc = [[[_mm512_setzero_ps(); 2]; MR]; 2];
        let mut j = 0;
        // SAFETY (whole loop): j + 32 <= k, inside both rows and each activation row.
        while j + 32 <= k {
            let mut wv = [[_mm512_setzero_ps(); 2]; 2];
            for (v, &wp) in wv.iter_mut().zip(&w) {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j * eb + PREFETCH).cast());
                if E == E_F32 {
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j * eb + PREFETCH + 64).cast());
                }
                *v = unsafe {
                    [
                        load16::<E>(wp.add(j * eb)),
                        load16::<E>(wp.add((j + 16) * eb)),
                    ]
                };
            }
            for i in 0..MR {
                let xi = unsafe { x.add(i * k + j) };
                let (x0, x1) = unsafe { (_mm512_loadu_ps(xi), _mm512_loadu_ps(xi.add(16))) };
                for (a, v) in acc.iter_mut().zip(&wv) {
                    a[i][0] = _mm512_fmadd_ps(v[0], x0, a[i][0]);
                    a[i][1] = _mm512_fmadd_ps(v[1], x1, a[i][1]);
                }
            }
            j += 32;
        }
        if j + 16 <= k {
            // SAFETY: j + 16 <= k.
            let wv = unsafe { [load16::<E>(w0.add(j * eb)), load16::<E>(w1.add(j * eb))] };
            for i in 0..MR {
                let x0 = unsafe { _mm512_loadu_ps(x.add(i * k + j)) };
                for (a, v) in acc.iter_mut().zip(&wv) {
                    a[i][0] = _mm512_fmadd_ps(*v, x0, a[i][0]);
                }
            }
            j += 16;
        }
        let mut res = [[0.0f32; MR]; 2];
        for (r, a) in res.iter_mut().zip(&acc) {
            for i in 0..MR {
                r[i] = _mm512_reduce_add_ps(_mm512_add_ps(a[i][0], a[i][1]));
            }
        }
        while j < k {
            for (r, &wp) in res.iter_mut().zip(&w) {
                // SAFETY: j < k.
                let wj = unsafe { load1::<E>(wp.add(j * eb)) };
                for i in 0..MR {
                    r[i] = wj.mul_add(unsafe { *x.add(i * k + j) }, r[i]);
                }
            }
            j += 1;
        }
        res
    }

    /// `_mm512_reduce_add_ps` of each of eight vectors, the same sums in the same
    /// pairs (so the same bits: the halves of 256, then of 128 bits, then lanes 0 + 2
    /// and 1 + 3, then those two), for eight vectors at once: sixteen shuffles and
    /// eight additions instead of eight reductions' 32 and 32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn reduce8(t: [__m512; 8]) -> [f32; 8] {
        // 512 -> 256 bits: u[i] holds row i's sums in its low half, row i + 4's in its
        // high half.
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[i], t[i + 4]);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[i], t[i + 4]);
            _mm512_add_ps(lo, hi)
        });
        // 256 -> 128 bits: v[0]'s quarters hold rows 0, 4, 1, 5; v[1]'s 2, 6, 3, 7.
        let v: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (u[2 * i], u[2 * i + 1]);
            let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            _mm512_add_ps(even, odd)
        });
        // Lanes 0 + 2 and 1 + 3 of each quarter: v[0]'s row in lanes 0-1, v[1]'s in
        // lanes 2-3.
        let x = _mm512_shuffle_ps::<0b01_00_01_00>(v[0], v[1]);
        let y = _mm512_shuffle_ps::<0b11_10_11_10>(v[0], v[1]);
        let w = _mm512_add_ps(x, y);
        // Then the two: lane 0 of each quarter for v[0]'s row, lane 2 for v[1]'s.
        let z = _mm512_add_ps(w, _mm512_shuffle_ps::<0b10_11_00_01>(w, w));
        // Rows 0..8 sit in lanes 0, 8, 2, 10, 4, 12, 6, 14.
        let order = _mm512_setr_epi32(0, 8, 2, 10, 4, 12, 6, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        let sums = _mm512_castps512_ps256(_mm512_permutexvar_ps(order, z));
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds eight floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
        out
    }

    /// As [`row_avx2`], with two 16-wide chains per activation row.
    ///
    /// # Safety
    /// As [`row_avx2`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i indexes the accumulators and the rows
    unsafe fn row_avx512<const E: u8, const MR: usize>(
        w: *const u8,
        k: usize,
        x: *const f32,
    ) -> [f32; MR] {
        let eb = if E == E_F32 { 4 } else { 2 };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut j = 0;
        // SAFETY (whole loop): j + 32 <= k, inside the row and each activation row.
        while j + 32 <= k {
            // Ask for the weight bytes PREFETCH ahead (the next rows when this one
            // ends): a decode step streams every weight once, from memory.
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * eb + PREFETCH).cast());
            if E == E_F32 {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(j * eb + PREFETCH + 64).cast());
            }
            let (w0, w1) = unsafe {
                (
                    load16::<E>(w.add(j * eb)),
                    load16::<E>(w.add((j + 16) * eb)),
                )
            };
            for i in 0..MR {
                let xi = unsafe { x.add(i * k + j) };
                acc[i][0] = _mm512_fmadd_ps(w0, unsafe { _mm512_loadu_ps(xi) }, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(w1, unsafe { _mm512_loadu_ps(xi.add(16)) }, acc[i][1]);
            }
            j += 32;
        }
        if j + 16 <= k {
            // SAFETY: j + 16 <= k.
            let w0 = unsafe { load16::<E>(w.add(j * eb)) };
            for i in 0..MR {
                let xi = unsafe { x.add(i * k + j) };
                acc[i][0] = _mm512_fmadd_ps(w0, unsafe { _mm512_loadu_ps(xi) }, acc[i][0]);
            }
            j += 16;
        }
        let mut res = [0.0f32; MR];
        if MR == WIDE_TILE_ROWS {
            let t: [__m512; WIDE_TILE_ROWS] =
                std::array::from_fn(|i| _mm512_add_ps(acc[i][0], acc[i][1]));
            res.copy_from_slice(&reduce8(t));
        } else {
            for i in 0..MR {
                res[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
            }
        }
        while j < k {
            // SAFETY: j < k.
            let wj = unsafe { load1::<E>(w.add(j * eb)) };
            for i in 0..MR {
                res[i] = wj.mul_add(unsafe { *x.add(i * k + j) }, res[i]);
            }
            j += 1;
        }
        res
    }
}
