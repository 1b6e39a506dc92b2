//! Dense weights (f32, f16, bf16): `y = x · Wᵀ` for a few activation rows, the shape of
//! a decode step (one row) or a small batch of them.
//!
//! A decode step reads every weight once and does two flops per weight, so it runs at
//! the speed memory delivers the weights. These kernels stream each weight row once,
//! convert it in registers (`vcvtph2ps` for f16 with F16C or AVX-512F, a 16-bit shift
//! for bf16) and multiply it with up to [`DENSE_TILE_ROWS`] activation rows held in
//! L1, with several independent FMA chains; output rows are split across the rayon
//! pool as the quantized kernels split theirs. Beyond [`DENSE_GEMV_MAX_ROWS`] rows (a
//! prompt, a large batch) a packed GEMM runs instead: panels of 16 weight rows
//! converted to f32 and transposed once per call, then 6 x 16 register tiles of FMA
//! chains over them (AVX2); with AVX-512F, panels of 64 rows through 6 x 64 tiles (four
//! 512-bit registers a row) and the last columns through 12 x 16 ones, the same FMA
//! chain per output. A prompt splits its activation rows across threads, one block per
//! thread (each block packs every panel). Without AVX2 the many-row case is the scalar
//! reference, so [`QLinear`](crate::QLinear) leaves it to candle's GEMM there
//! ([`dense_packed_available`]).
//!
//! Every path sums in f32 in the same order for every split of the output, so results
//! do not depend on the thread count; they differ from the scalar reference only by
//! the order of f32 additions.

use std::ops::Range;

use half::{bf16, f16};

use super::Kernel;
use super::driver::{split_many, split_rows_or_columns};
use super::error::{Error, Result};

/// Activation rows one pass over the weights serves (more rows take more passes).
pub const DENSE_TILE_ROWS: usize = 4;

/// Up to this many activation rows, [`dense_gemm`] streams each weight row past the
/// activation rows; beyond it, it runs the packed GEMM.
pub const DENSE_GEMV_MAX_ROWS: usize = 4;

/// Whether [`dense_gemm`] runs its packed GEMM for more than [`DENSE_GEMV_MAX_ROWS`]
/// rows: the CPU has AVX2, FMA and F16C, and [`Kernel::detect`] chose a SIMD kernel
/// (not capped at [`Kernel::Scalar`]); otherwise the many-row case runs the scalar
/// reference.
pub fn dense_packed_available() -> bool {
    Kernel::detect() >= Kernel::Avx2
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
}

impl DenseData<'_> {
    fn len(&self) -> usize {
        match self {
            DenseData::F32(v) => v.len(),
            DenseData::F16(v) => v.len(),
            DenseData::BF16(v) => v.len(),
        }
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            DenseData::F32(_) => 4,
            DenseData::F16(_) | DenseData::BF16(_) => 2,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            DenseData::F32(_) => "f32",
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
    /// A matrix over `data`, which must hold exactly `n_out * k` elements.
    ///
    /// # Errors
    /// [`Error::EmptyDimension`] for a zero dimension, [`Error::LengthMismatch`] when
    /// the data is not `n_out * k` long, [`Error::Overflow`] when that overflows.
    pub fn new(data: DenseData<'a>, n_out: usize, k: usize) -> Result<Self> {
        if n_out == 0 {
            return Err(Error::EmptyDimension { what: "n_out" });
        }
        if k == 0 {
            return Err(Error::EmptyDimension { what: "k" });
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

    /// The element type's name (`f32`, `f16`, `bf16`).
    pub fn dtype_name(&self) -> &'static str {
        self.data.name()
    }

    /// Weight bytes a multiplication reads.
    pub fn bytes(&self) -> usize {
        self.n_out * self.k * self.data.elem_bytes()
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
    let packed = m > DENSE_GEMV_MAX_ROWS;
    let k = w.k;
    // A prompt's row blocks each convert and transpose every panel of the matrix: one
    // block per thread packs it once per thread (two per thread: pp512 F16 9% slower).
    split_rows_or_columns(m, w.n_out, k, y, 1, |rows, cols, out, ld| {
        let xr = x.get(rows.start * k..rows.end * k).unwrap_or(&[]);
        f(w, xr, rows.len(), cols, out, ld, packed)
    });
    Ok(())
}

/// `ys[i] = x · W_iᵀ` for several dense matrices that read the same single activation
/// row (q, k and v; gate and up), with the detected kernel, split across the current
/// rayon pool as one parallel region instead of one per matrix: a decode step streams
/// the matrices back to back without a pause at each matrix's end. Each output is
/// computed by the same code as in [`dense_gemm`], so the results equal separate calls
/// exactly. More than one row runs the matrices one after another (a prompt's product
/// is long enough to be its own region).
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
    if m != 1 {
        for (w, y) in items.iter_mut() {
            dense_gemm_with(kernel, *w, x, m, y)?;
        }
        return Ok(());
    }
    if !kernel.is_available() {
        return Err(Error::KernelUnavailable { kernel });
    }
    for (w, y) in items.iter() {
        check_shapes(w, x, 1, y)?;
    }
    let f = range_fn(kernel);
    split_many(
        items,
        |w| (w.n_out, w.k),
        |w, cols, out| {
            let n = out.len();
            f(w, x, 1, cols, out, n, false)
        },
    );
    Ok(())
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

/// Computes `out[r * ld + (c - cols.start)]` for every activation row `r < m` and
/// output row `c` in `cols`; shapes were checked by [`dense_gemm_with`]. `packed`: the
/// call has more than [`DENSE_GEMV_MAX_ROWS`] rows, so the SIMD paths run the packed
/// GEMM.
type DenseRangeFn = fn(
    w: DenseMatrix<'_>,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
    packed: bool,
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
    m >= 1
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
    _packed: bool,
) {
    let k = w.k;
    for c in cols.clone() {
        for (r, xr) in x.chunks_exact(k).take(m).enumerate() {
            let range = c * k..(c + 1) * k;
            let dot: f32 = match w.data {
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
    use super::super::avx2::{hsum256, transpose8};
    use super::{DENSE_TILE_ROWS, DenseData, DenseMatrix, in_bounds};

    /// Element type ids (const generic parameters).
    const E_F32: u8 = 0;
    const E_F16: u8 = 1;
    const E_BF16: u8 = 2;

    fn parts(w: &DenseMatrix<'_>) -> (u8, *const u8, usize) {
        match w.data {
            DenseData::F32(v) => (E_F32, v.as_ptr().cast(), 4),
            DenseData::F16(v) => (E_F16, v.as_ptr().cast(), 2),
            DenseData::BF16(v) => (E_BF16, v.as_ptr().cast(), 2),
        }
    }

    /// See `DenseRangeFn`. Does nothing (and asserts in debug builds) without AVX2 or
    /// out of bounds; [`dense_gemm_with`](super::dense_gemm_with) checks both first.
    pub(super) fn range_avx2(
        w: DenseMatrix<'_>,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        packed: bool,
    ) {
        if !Kernel::Avx2.is_available() || !in_bounds(&w, x, m, &cols, out, ld) {
            debug_assert!(false, "dense AVX2 kernel without AVX2 or out of bounds");
            return;
        }
        let (e, p, eb) = parts(&w);
        if packed {
            // SAFETY: the CPU has AVX2, FMA and F16C, and `in_bounds` holds.
            unsafe {
                match e {
                    E_F32 => packed_gemm::<E_F32, false>(p, eb, w.k, x, m, cols, out, ld),
                    E_F16 => packed_gemm::<E_F16, false>(p, eb, w.k, x, m, cols, out, ld),
                    _ => packed_gemm::<E_BF16, false>(p, eb, w.k, x, m, cols, out, ld),
                }
            }
            return;
        }
        // SAFETY: the CPU has AVX2, FMA and F16C, and `in_bounds` holds.
        unsafe {
            match e {
                E_F32 => avx2_impl::<E_F32>(p, eb, w.k, x, m, cols, out, ld),
                E_F16 => avx2_impl::<E_F16>(p, eb, w.k, x, m, cols, out, ld),
                _ => avx2_impl::<E_BF16>(p, eb, w.k, x, m, cols, out, ld),
            }
        }
    }

    /// See `DenseRangeFn`, with AVX-512F (the [`Kernel::Avx512Vnni`] machines have it).
    pub(super) fn range_avx512(
        w: DenseMatrix<'_>,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        out: &mut [f32],
        ld: usize,
        packed: bool,
    ) {
        if !Kernel::Avx512Vnni.is_available() || !in_bounds(&w, x, m, &cols, out, ld) {
            debug_assert!(
                false,
                "dense AVX-512 kernel without AVX-512 or out of bounds"
            );
            return;
        }
        let (e, p, eb) = parts(&w);
        if packed {
            // SAFETY: the CPU has AVX-512F/BW/VL, AVX2, FMA and F16C, and `in_bounds`
            // holds.
            unsafe {
                match e {
                    E_F32 => packed_gemm::<E_F32, true>(p, eb, w.k, x, m, cols, out, ld),
                    E_F16 => packed_gemm::<E_F16, true>(p, eb, w.k, x, m, cols, out, ld),
                    _ => packed_gemm::<E_BF16, true>(p, eb, w.k, x, m, cols, out, ld),
                }
            }
            return;
        }
        // SAFETY: the CPU has AVX-512F/BW/VL, AVX2, FMA and F16C, and `in_bounds` holds.
        unsafe {
            match e {
                E_F32 => avx512_impl::<E_F32>(p, eb, w.k, x, m, cols, out, ld),
                E_F16 => avx512_impl::<E_F16>(p, eb, w.k, x, m, cols, out, ld),
                _ => avx512_impl::<E_BF16>(p, eb, w.k, x, m, cols, out, ld),
            }
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

    /// Dispatches a weight row over the activation rows in tiles of up to
    /// [`DENSE_TILE_ROWS`]; `$row::<E, MR>(wp, k, xp, ld_x) -> [f32; MR]` computes one.
    macro_rules! rows_loop {
        ($row:ident, $E:ident, $p:ident, $eb:ident, $k:ident, $x:ident, $m:ident, $cols:ident, $out:ident, $ld:ident) => {{
            let xp = $x.as_ptr();
            for c in $cols.clone() {
                // SAFETY: c < n_out, so the row lies inside the weight data.
                let wp = unsafe { $p.add(c * $k * $eb) };
                let cc = c - $cols.start;
                let mut r = 0;
                while r < $m {
                    let mr = ($m - r).min(DENSE_TILE_ROWS);
                    // SAFETY: activation rows r..r + mr are below m (x holds m * k).
                    let xr = unsafe { xp.add(r * $k) };
                    // SAFETY: as above; the row function reads k elements of each.
                    unsafe {
                        match mr {
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
    fn store<const MR: usize>(t: &[f32; MR], out: &mut [f32], ld: usize, r: usize, cc: usize) {
        for (i, v) in t.iter().enumerate() {
            if let Some(o) = out.get_mut((r + i) * ld + cc) {
                *o = *v;
            }
        }
    }

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
    const WIDE_PANEL: usize = 64;
    /// Activation rows per wide AVX-512 micro-kernel: 6 x 4 accumulators, the four
    /// panel vectors and a broadcast, of the 32 `zmm` registers. Per element of `k`,
    /// ten loads feed 24 FMAs (the 12-row kernel's thirteen loads fed twelve, and two
    /// loads a cycle held it at about 60% of the FMA units).
    const WIDE_MR: usize = 6;

    /// The packed GEMM for many activation rows: panels of 16 weight rows (8 for the
    /// last ones) are converted to f32 and transposed once per call into a `k x 16`
    /// buffer (`64 k` bytes, in L2), then every group of six activation rows runs
    /// through it: per element of `k`, two weight vectors and six broadcast
    /// activations in twelve FMA chains, one per output (so each output is summed in
    /// element order, whatever the tile). With `ZMM` (AVX-512F), 64-column panels
    /// first (`256 k` bytes) meet six activation rows at a time, four 512-bit vectors
    /// and 24 FMA chains per element, then a 16-column panel meets twelve rows, one
    /// vector and twelve chains: the same chains, so the same bits as the AVX2 tiles.
    /// Columns past the last multiple of 8 take the row kernel.
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
        let mut panel = vec![0.0f32; k * if ZMM { WIDE_PANEL } else { PANEL }];
        let mut c = cols.start;
        while ZMM && c + WIDE_PANEL <= cols.end {
            // SAFETY: rows c..c + 64 are below n_out (the caller's bounds).
            unsafe { pack::<E>(p, eb, k, c, WIDE_PANEL, &mut panel) };
            let cc = c - cols.start;
            let mut r = 0;
            while r < m {
                let mr = (m - r).min(WIDE_MR);
                // SAFETY: the CPU has AVX-512F (the caller's); rows r..r + mr of x
                // exist; the output holds them.
                unsafe { micro512_wide_any(mr, &panel, k, x, r, out, ld, cc) };
                r += mr;
            }
            c += WIDE_PANEL;
        }
        while c + 8 <= cols.end {
            let width = if c + PANEL <= cols.end { PANEL } else { 8 };
            // SAFETY: rows c..c + width are below n_out (the caller's bounds).
            unsafe { pack::<E>(p, eb, k, c, width, &mut panel) };
            let cc = c - cols.start;
            let mut r = 0;
            if ZMM && width == PANEL {
                while r < m {
                    let mr = (m - r).min(PACKED_MR_512);
                    // SAFETY: the CPU has AVX-512F (the caller's); rows r..r + mr of x
                    // exist; the output holds them.
                    unsafe { micro512_any(mr, &panel, k, x, r, out, ld, cc) };
                    r += mr;
                }
            }
            while r < m {
                let mr = (m - r).min(PACKED_MR);
                // SAFETY: rows r..r + mr of x exist; the output holds them.
                unsafe {
                    match (mr, width) {
                        (6, PANEL) => micro::<6, 2>(&panel, k, x, r, out, ld, cc),
                        (5, PANEL) => micro::<5, 2>(&panel, k, x, r, out, ld, cc),
                        (4, PANEL) => micro::<4, 2>(&panel, k, x, r, out, ld, cc),
                        (3, PANEL) => micro::<3, 2>(&panel, k, x, r, out, ld, cc),
                        (2, PANEL) => micro::<2, 2>(&panel, k, x, r, out, ld, cc),
                        (_, PANEL) => micro::<1, 2>(&panel, k, x, r, out, ld, cc),
                        (6, _) => micro::<6, 1>(&panel, k, x, r, out, ld, cc),
                        (5, _) => micro::<5, 1>(&panel, k, x, r, out, ld, cc),
                        (4, _) => micro::<4, 1>(&panel, k, x, r, out, ld, cc),
                        (3, _) => micro::<3, 1>(&panel, k, x, r, out, ld, cc),
                        (2, _) => micro::<2, 1>(&panel, k, x, r, out, ld, cc),
                        _ => micro::<1, 1>(&panel, k, x, r, out, ld, cc),
                    }
                }
                r += mr;
            }
            c += width;
        }
        if c < cols.end {
            let out = &mut out[c - cols.start..];
            let rest = c..cols.end;
            // SAFETY: as this function's, for the last columns.
            unsafe { avx2_impl::<E>(p, eb, k, x, m, rest, out, ld) }
        }
    }

    /// Converts weight rows `c..c + width` (`width` 8 or 16) to f32 into `panel`,
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

    /// `MR` activation rows from `r0` times a panel of `NV x 8` columns, written at
    /// `out[(r0 + i) * ld + cc..]`.
    ///
    /// # Safety
    /// Rows `r0..r0 + MR` of `x` (`k` floats each) exist, the panel holds `k * NV * 8`
    /// floats, and `out` holds `(r0 + MR - 1) * ld + cc + NV * 8` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i and v index the tile
    unsafe fn micro<const MR: usize, const NV: usize>(
        panel: &[f32],
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let pp = panel.as_ptr();
        let xp = x.as_ptr();
        for kk in 0..k {
            let mut b = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                // SAFETY: kk < k, so the panel holds these eight floats.
                b[v] = unsafe { _mm256_loadu_ps(pp.add(kk * NV * 8 + v * 8)) };
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

    /// [`micro512_wide`] for `mr` (1 to [`WIDE_MR`]) rows.
    ///
    /// # Safety
    /// As [`micro512_wide`], with the CPU's AVX-512F.
    #[allow(clippy::too_many_arguments)] // the panel, the rows and the output window
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn micro512_wide_any(
        mr: usize,
        panel: &[f32],
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        // SAFETY: the caller's bounds for `mr` rows.
        unsafe {
            match mr {
                6 => micro512_wide::<6>(panel, k, x, r0, out, ld, cc),
                5 => micro512_wide::<5>(panel, k, x, r0, out, ld, cc),
                4 => micro512_wide::<4>(panel, k, x, r0, out, ld, cc),
                3 => micro512_wide::<3>(panel, k, x, r0, out, ld, cc),
                2 => micro512_wide::<2>(panel, k, x, r0, out, ld, cc),
                _ => micro512_wide::<1>(panel, k, x, r0, out, ld, cc),
            }
        }
    }

    /// `MR` activation rows from `r0` times a 64-column panel, written at
    /// `out[(r0 + i) * ld + cc..][..64]`: [`micro`]'s FMA chains (one per output, in
    /// element order), four 512-bit vectors a row.
    ///
    /// # Safety
    /// The CPU has AVX-512F; rows `r0..r0 + MR` of `x` (`k` floats each) exist, the
    /// panel holds `k * 64` floats, and `out` holds `(r0 + MR - 1) * ld + cc + 64`
    /// floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i and v index the tile
    unsafe fn micro512_wide<const MR: usize>(
        panel: &[f32],
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        let pp = panel.as_ptr();
        let xp = x.as_ptr();
        for kk in 0..k {
            // SAFETY: kk < k, so the panel holds these 64 floats.
            let b: [__m512; 4] = std::array::from_fn(|v| unsafe {
                _mm512_loadu_ps(pp.add(kk * WIDE_PANEL + 16 * v))
            });
            for i in 0..MR {
                // SAFETY: row r0 + i of x holds element kk.
                let a = _mm512_set1_ps(unsafe { *xp.add((r0 + i) * k + kk) });
                for v in 0..4 {
                    acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
                }
            }
        }
        for i in 0..MR {
            for v in 0..4 {
                let at = (r0 + i) * ld + cc + 16 * v;
                if let Some(dst) = out.get_mut(at..at + 16) {
                    // SAFETY: dst holds sixteen floats.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), acc[i][v]) };
                }
            }
        }
    }

    /// [`micro512`] for `mr` (1 to [`PACKED_MR_512`]) rows.
    ///
    /// # Safety
    /// As [`micro512`], with the CPU's AVX-512F.
    #[allow(clippy::too_many_arguments)] // the panel, the rows and the output window
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn micro512_any(
        mr: usize,
        panel: &[f32],
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        // SAFETY: the caller's bounds for `mr` rows.
        unsafe {
            match mr {
                12 => micro512::<12>(panel, k, x, r0, out, ld, cc),
                11 => micro512::<11>(panel, k, x, r0, out, ld, cc),
                10 => micro512::<10>(panel, k, x, r0, out, ld, cc),
                9 => micro512::<9>(panel, k, x, r0, out, ld, cc),
                8 => micro512::<8>(panel, k, x, r0, out, ld, cc),
                7 => micro512::<7>(panel, k, x, r0, out, ld, cc),
                6 => micro512::<6>(panel, k, x, r0, out, ld, cc),
                5 => micro512::<5>(panel, k, x, r0, out, ld, cc),
                4 => micro512::<4>(panel, k, x, r0, out, ld, cc),
                3 => micro512::<3>(panel, k, x, r0, out, ld, cc),
                2 => micro512::<2>(panel, k, x, r0, out, ld, cc),
                _ => micro512::<1>(panel, k, x, r0, out, ld, cc),
            }
        }
    }

    /// `MR` activation rows from `r0` times a 16-column panel, written at
    /// `out[(r0 + i) * ld + cc..][..16]`: [`micro`]'s FMA chains in 512-bit registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F; rows `r0..r0 + MR` of `x` (`k` floats each) exist, the
    /// panel holds `k * 16` floats, and `out` holds `(r0 + MR - 1) * ld + cc + 16`
    /// floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // i indexes the tile
    unsafe fn micro512<const MR: usize>(
        panel: &[f32],
        k: usize,
        x: &[f32],
        r0: usize,
        out: &mut [f32],
        ld: usize,
        cc: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); MR];
        let pp = panel.as_ptr();
        let xp = x.as_ptr();
        for kk in 0..k {
            // SAFETY: kk < k, so the panel holds these sixteen floats.
            let b = unsafe { _mm512_loadu_ps(pp.add(kk * PANEL)) };
            for i in 0..MR {
                // SAFETY: row r0 + i of x holds element kk.
                let a = _mm512_set1_ps(unsafe { *xp.add((r0 + i) * k + kk) });
                acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
            }
        }
        for i in 0..MR {
            let at = (r0 + i) * ld + cc;
            if let Some(dst) = out.get_mut(at..at + PANEL) {
                // SAFETY: dst holds sixteen floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), acc[i]) };
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
        rows_loop!(row_avx2, E, p, eb, k, x, m, cols, out, ld)
    }

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
        rows_loop!(row_avx512, E, p, eb, k, x, m, cols, out, ld)
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
        for i in 0..MR {
            res[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
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
