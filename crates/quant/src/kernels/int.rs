//! afo's own weight-only integer formats: int8 per output channel and int4 grouped
//! ([`IntFormat`], [`IntWeights`]), their quantization, and the integer kernels
//! ([`gemm_int`]).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod driver;
mod scalar;
#[cfg(test)]
mod tests;

use super::Kernel;
use super::acts::QuantizedActs;
use super::blocks::BLOCK_ELEMS;
use super::error::{Error, Result};
use super::panels::PanelFormat;

/// Group sizes the int4 format accepts.
pub const INT4_GROUPS: [usize; 3] = [32, 64, 128];

/// An integer weight-only format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntFormat {
    /// 8-bit, symmetric, one scale per output channel (row).
    Int8,
    /// 4-bit, one scale (and, asymmetric, one minimum) per `group` elements of a row.
    Int4 {
        /// Elements per group: 32, 64 or 128.
        group: usize,
        /// Whether each group has a minimum (zero point) besides its scale.
        asymmetric: bool,
    },
}

impl IntFormat {
    /// Checks the group size.
    ///
    /// # Errors
    /// [`Error::InvalidGroup`] for a group other than 32, 64 or 128.
    pub fn validate(self) -> Result<Self> {
        match self {
            IntFormat::Int4 { group, .. } if !INT4_GROUPS.contains(&group) => {
                Err(Error::InvalidGroup { group })
            }
            _ => Ok(self),
        }
    }

    /// Scale (and minimum) groups per row of `k` elements.
    pub fn groups_per_row(self, k: usize) -> usize {
        match self {
            IntFormat::Int8 => 1,
            IntFormat::Int4 { group, .. } => k / group.max(1),
        }
    }

    /// Bytes of quants per row of `k` elements.
    pub fn quant_bytes_per_row(self, k: usize) -> usize {
        match self {
            IntFormat::Int8 => k,
            IntFormat::Int4 { .. } => k / 2,
        }
    }

    /// Whether the format stores a minimum per group.
    pub fn has_mins(self) -> bool {
        matches!(
            self,
            IntFormat::Int4 {
                asymmetric: true,
                ..
            }
        )
    }

    /// Bytes a `[n_out, k]` matrix takes (quants, scales, minimums).
    pub fn matrix_bytes(self, n_out: usize, k: usize) -> usize {
        let groups = n_out * self.groups_per_row(k);
        n_out * self.quant_bytes_per_row(k) + groups * 4 * (1 + usize::from(self.has_mins()))
    }
}

impl fmt::Display for IntFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntFormat::Int8 => f.write_str("int8"),
            IntFormat::Int4 { group, asymmetric } => {
                write!(f, "int4-g{group}{}", if *asymmetric { "-asym" } else { "" })
            }
        }
    }
}

impl FromStr for IntFormat {
    type Err = Error;

    /// `int8`, `int4` (group 32, symmetric), `int4-g64`, `int4-g128-asym`, ...
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "int8" {
            return Ok(IntFormat::Int8);
        }
        let unknown = || Error::UnknownName {
            what: "integer format",
            name: s.to_owned(),
        };
        let rest = lower.strip_prefix("int4").ok_or_else(unknown)?;
        let (rest, asymmetric) = match rest.strip_suffix("-asym") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let group = match rest {
            "" => 32,
            g => g
                .strip_prefix("-g")
                .and_then(|g| g.parse().ok())
                .ok_or_else(unknown)?,
        };
        IntFormat::Int4 { group, asymmetric }.validate()
    }
}

/// A `[n_out, k]` weight matrix in an [`IntFormat`], owned.
///
/// TorchAO semantics (`int8_weight_only`, `int4_weight_only`), laid out for the same
/// integer dot products as the GGML formats.
///
/// # Layout
///
/// | format | quants | scales | element `c` of row `r` |
/// | --- | --- | --- | --- |
/// | [`IntFormat::Int8`] | `n_out * k` bytes, `i8`, row-major | `n_out` `f32`, one per row | `scale[r] * q[r][c]` |
/// | [`IntFormat::Int4`] symmetric | `n_out * k / 2` bytes | `n_out * k / group` `f32` | `scale[r][c / group] * (nibble - 8)` |
/// | [`IntFormat::Int4`] asymmetric | as symmetric | as symmetric, plus as many `min`s | `scale[r][c / group] * nibble + min[r][c / group]` |
///
/// Int4 nibbles come in blocks of 32 elements, 16 bytes each, in GGML's order: byte `j`
/// of block `b` holds element `32 b + j` in its low nibble and `32 b + j + 16` in its
/// high nibble. Groups (32, 64 or 128 elements along a row) are whole blocks.
///
/// # Quantization
///
/// Round half to even everywhere:
/// - int8: `scale = max|w| / 127`, `q = clamp(round(w / scale), -127, 127)`;
/// - int4 symmetric: `scale = max|w| / 7.5` over the group, `q = clamp(round(w / scale), -8, 7)`,
///   stored as `q + 8` (TorchAO's symmetric choice of `(qmax - qmin) / 2`);
/// - int4 asymmetric: `scale = (max - min) / 15`, `nibble = clamp(round((w - min) / scale), 0, 15)`;
///   the zero point lives in the float domain (`min`), as TorchAO's
///   `ZeroPointDomain.FLOAT` (`min = zero - 8 * scale` in its terms).
///
/// A group (or row) of zeros gets scale 0 and quants that decode to 0.
#[derive(Clone, PartialEq)]
pub struct IntWeights {
    format: IntFormat,
    n_out: usize,
    k: usize,
    quants: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    /// Int8 quants in panels of sixteen rows ([`IntWeights::for_kernel`]).
    panels: bool,
}

impl fmt::Debug for IntWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntWeights")
            .field("format", &self.format)
            .field("n_out", &self.n_out)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

fn check_dims(format: IntFormat, n_out: usize, k: usize) -> Result<()> {
    format.validate()?;
    if n_out == 0 {
        return Err(Error::EmptyDimension { what: "n_out" });
    }
    if k == 0 {
        return Err(Error::EmptyDimension { what: "k" });
    }
    if !k.is_multiple_of(BLOCK_ELEMS) {
        return Err(Error::KNotMultipleOfBlock {
            k,
            block: BLOCK_ELEMS,
        });
    }
    if let IntFormat::Int4 { group, .. } = format
        && !k.is_multiple_of(group)
    {
        return Err(Error::GroupDoesNotDivide { k, group });
    }
    n_out
        .checked_mul(k)
        .ok_or(Error::Overflow { what: "n_out * k" })?;
    Ok(())
}

fn check_len<T>(what: &'static str, v: &[T], expected: usize, unit: &'static str) -> Result<()> {
    if v.len() == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            actual: v.len(),
            unit,
        })
    }
}

impl IntWeights {
    /// Quantizes a row-major `[n_out, k]` f32 matrix.
    ///
    /// # Errors
    /// [`Error::EmptyDimension`], [`Error::KNotMultipleOfBlock`],
    /// [`Error::GroupDoesNotDivide`], [`Error::InvalidGroup`], [`Error::LengthMismatch`]
    /// for a `w` of another length, [`Error::NonFinite`] for NaN or infinite weights.
    pub fn quantize(format: IntFormat, w: &[f32], n_out: usize, k: usize) -> Result<Self> {
        check_dims(format, n_out, k)?;
        check_len("w (n_out * k)", w, n_out * k, "elements")?;
        if let Some(at) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                row: at / k,
                col: at % k,
            });
        }
        let groups = format.groups_per_row(k);
        let mut quants = vec![0u8; n_out * format.quant_bytes_per_row(k)];
        let mut scales = vec![0f32; n_out * groups];
        let mut mins = vec![0f32; if format.has_mins() { n_out * groups } else { 0 }];
        match format {
            IntFormat::Int8 => {
                for ((row, q), s) in w
                    .chunks_exact(k)
                    .zip(quants.chunks_exact_mut(k))
                    .zip(&mut scales)
                {
                    let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for (qi, &v) in q.iter_mut().zip(row) {
                        *qi = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
                    }
                    *s = scale;
                }
            }
            IntFormat::Int4 { group, asymmetric } => {
                for (g, chunk) in w.chunks_exact(group).enumerate() {
                    let (scale, min, codes) = quantize_group4(chunk, asymmetric);
                    scales[g] = scale;
                    if asymmetric {
                        mins[g] = min;
                    }
                    // The group's elements start at element g * group of the matrix,
                    // which is byte g * group / 2 of the quants (rows are whole groups).
                    let base = g * group / 2;
                    for (b, block) in codes.chunks_exact(BLOCK_ELEMS).enumerate() {
                        let out = &mut quants[base + b * 16..base + b * 16 + 16];
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = block[j] | (block[j + 16] << 4);
                        }
                    }
                }
            }
        }
        Ok(Self {
            format,
            n_out,
            k,
            quants,
            scales,
            mins,
            panels: false,
        })
    }

    /// Rebuilds a matrix from its stored parts (a saved file), checking every length
    /// and that the scales are finite.
    ///
    /// # Errors
    /// As [`IntWeights::quantize`] for the dimensions; [`Error::LengthMismatch`] for
    /// parts of the wrong size; [`Error::NonFinite`] for a NaN or infinite scale or
    /// minimum.
    pub fn from_parts(
        format: IntFormat,
        n_out: usize,
        k: usize,
        quants: Vec<u8>,
        scales: Vec<f32>,
        mins: Vec<f32>,
    ) -> Result<Self> {
        check_dims(format, n_out, k)?;
        let groups = format.groups_per_row(k);
        check_len(
            "quants",
            &quants,
            n_out * format.quant_bytes_per_row(k),
            "bytes",
        )?;
        check_len("scales", &scales, n_out * groups, "elements")?;
        check_len(
            "mins",
            &mins,
            if format.has_mins() { n_out * groups } else { 0 },
            "elements",
        )?;
        for (i, v) in scales.iter().chain(&mins).enumerate() {
            if !v.is_finite() {
                let i = i % scales.len().max(1);
                return Err(Error::NonFinite {
                    row: i / groups,
                    col: (i % groups) * (k / groups),
                });
            }
        }
        Ok(Self {
            format,
            n_out,
            k,
            quants,
            scales,
            mins,
            panels: false,
        })
    }

    /// The format.
    pub fn format(&self) -> IntFormat {
        self.format
    }

    /// Output features (rows).
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Input features (columns).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The quants row-major (see the [layout](IntWeights#layout)); borrowed unless the
    /// weights are in panels.
    ///
    /// # Errors
    /// Only on a broken invariant of the stored bytes (their length).
    pub fn quants(&self) -> Result<Cow<'_, [u8]>> {
        if self.panels {
            Ok(Cow::Owned(super::panels::to_rows(
                PanelFormat::Int8,
                self.n_out,
                self.k,
                &self.quants,
            )?))
        } else {
            Ok(Cow::Borrowed(&self.quants))
        }
    }

    /// The weights in the layout `kernel` reads fastest: int8 with
    /// [`Kernel::Avx512Vnni`] and a row count that is a multiple of 16 is repacked into
    /// panels of sixteen rows (the same bytes, reordered, as the GGML formats' panels
    /// without block headers: one `vpdpbusd` per four activation bytes multiplies
    /// sixteen rows, for decode, batches and prompts alike); otherwise unchanged.
    /// [`gemm_int_with`] with another kernel refuses panels.
    ///
    /// # Errors
    /// Only on a broken invariant of the stored bytes (their length).
    pub fn for_kernel(self, kernel: Kernel) -> Result<Self> {
        let wanted = self.format == IntFormat::Int8
            && kernel == Kernel::Avx512Vnni
            && super::panels::fits(self.n_out);
        if self.panels || !wanted {
            return Ok(self);
        }
        let quants =
            super::panels::from_rows_vec(PanelFormat::Int8, self.n_out, self.k, &self.quants)?;
        Ok(Self {
            quants,
            panels: true,
            ..self
        })
    }

    /// Whether the int8 quants are in panels of sixteen rows
    /// ([`for_kernel`](Self::for_kernel)), read only by the AVX-512 VNNI kernel.
    pub fn in_panels(&self) -> bool {
        self.panels
    }

    /// The scales, row-major `[n_out, groups]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The minimums of the asymmetric int4 format (empty otherwise).
    pub fn mins(&self) -> &[f32] {
        &self.mins
    }

    /// Bytes held: quants, scales and minimums.
    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * (self.scales.len() + self.mins.len())
    }

    /// Decodes rows `rows` into `out` (`rows.len() * k` floats).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when the rows are out of range or `out` has another
    /// length.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        if rows.start > rows.end || rows.end > self.n_out {
            return Err(Error::LengthMismatch {
                what: "rows",
                expected: self.n_out,
                actual: rows.end,
                unit: "rows",
            });
        }
        let k = self.k;
        check_len(
            "out (rows * k)",
            out,
            (rows.end - rows.start) * k,
            "elements",
        )?;
        let groups = self.format.groups_per_row(k);
        for (r, o) in rows.zip(out.chunks_exact_mut(k)) {
            match self.format {
                IntFormat::Int8 if self.panels => {
                    let s = self.scales[r];
                    let mut q = [0u8; BLOCK_ELEMS];
                    for (b, ob) in o.chunks_exact_mut(BLOCK_ELEMS).enumerate() {
                        super::panels::block(
                            PanelFormat::Int8,
                            self.n_out,
                            k,
                            &self.quants,
                            r,
                            b,
                            &mut q,
                        )?;
                        for (v, &q) in ob.iter_mut().zip(&q) {
                            *v = s * f32::from(q as i8);
                        }
                    }
                }
                IntFormat::Int8 => {
                    let s = self.scales[r];
                    for (v, &q) in o.iter_mut().zip(&self.quants[r * k..(r + 1) * k]) {
                        *v = s * f32::from(q as i8);
                    }
                }
                IntFormat::Int4 { group, asymmetric } => {
                    let qrow = &self.quants[r * k / 2..(r + 1) * k / 2];
                    for (b, (ob, qb)) in o
                        .chunks_exact_mut(BLOCK_ELEMS)
                        .zip(qrow.chunks_exact(16))
                        .enumerate()
                    {
                        let g = r * groups + b * BLOCK_ELEMS / group;
                        let s = self.scales[g];
                        let m = if asymmetric { self.mins[g] } else { -8.0 * s };
                        for (j, &q) in qb.iter().enumerate() {
                            ob[j] = s * f32::from(q & 0x0F) + m;
                            ob[j + 16] = s * f32::from(q >> 4) + m;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_out * self.k];
        // The range and length match by construction.
        let _ = self.dequantize_rows(0..self.n_out, &mut out);
        out
    }
}

/// Scale, minimum and the 4-bit codes (`0..=15`, one per element) of one group.
fn quantize_group4(w: &[f32], asymmetric: bool) -> (f32, f32, Vec<u8>) {
    if asymmetric {
        let lo = w.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scale = (hi - lo) / 15.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let codes = w
            .iter()
            .map(|&v| ((v - lo) * inv).round_ties_even().clamp(0.0, 15.0) as u8)
            .collect();
        (scale, lo, codes)
    } else {
        let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 7.5;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let codes = w
            .iter()
            .map(|&v| ((v * inv).round_ties_even().clamp(-8.0, 7.0) + 8.0) as u8)
            .collect();
        (scale, -8.0 * scale, codes)
    }
}

/// `y = x · Wᵀ` for integer weights and quantized activations, with the detected
/// kernel: `acts` holds `m` rows of `k`, `y` is `m x n_out`, row-major.
///
/// Runs on the current rayon pool (use `ThreadPool::install` to choose the thread
/// count).
///
/// # Kernels
///
/// This multiplies by activations quantized to 8 bits per block of 32
/// ([`QuantizedActs`], shared with the GGML kernels) with integer dot products:
///
/// - [`Kernel::Avx2`]: `vpmaddubsw` + `vpmaddwd`; int8 with the sign trick and its row
///   scale applied once per row, int4 two blocks per register with `scale_g * d_x` per
///   block and the minimum term `min_g * d_x * sum(q_x)` (`min_g = -8 scale_g`
///   symmetric, folded in as an integer);
/// - [`Kernel::Avx512Vnni`]: int8 weights in panels of sixteen rows
///   ([`IntWeights::for_kernel`], as a model loads them there) run one kernel for
///   decode, batches and prompts, one `vpdpbusd` per four activation bytes and sixteen
///   rows (each row computed as it would be alone); row-major weights run a prompt's
///   packed panels with `vpdpbusd` (sixteen columns per instruction, bit-identical to
///   the AVX2 panels), and their decode steps and register tiles (int4's always) the
///   AVX2 code (every such CPU has AVX2);
/// - [`Kernel::Scalar`]: portable Rust, the reference the others are tested against.
///
/// One activation row (decode) reads four weight rows per step for matrices up to
/// 1 MiB of quants, otherwise streams the rows one at a time, both with prefetching; several activation rows use register tiles (int8: 4 activation rows x 2
/// weight rows, int4: 6 x 1) over blocks of weight rows that stay in L2, so weights
/// come from memory once per call. Output rows are split across the current rayon
/// pool as for the GGML kernels (when `m * n_out * k >= 2^18`); the result does not
/// depend on the thread count.
///
/// Accuracy: as for the GGML formats, weights are used exactly as stored and each
/// activation element is off by at most `max|x_block| / 254`, so `|y - y_exact|` is at
/// most `sum over blocks of max|x_block| / 254 * sum|w_block|`, plus f32 rounding.
///
/// ```
/// use afo_quant::kernels::{self, IntFormat, IntWeights, QuantizedActs};
///
/// let (n_out, k) = (3, 64);
/// let w: Vec<f32> = (0..n_out * k).map(|i| (i % 7) as f32 - 3.0).collect();
/// let format: IntFormat = "int4-g32".parse()?;
/// let weights = IntWeights::quantize(format, &w, n_out, k)?;
/// let x = vec![0.5f32; k];
/// let acts = QuantizedActs::quantize(&x, 1, k)?;
/// let mut y = vec![0.0f32; n_out];
/// kernels::gemm_int(&weights, &acts, &mut y)?;
/// let exact: f32 = w[..k].iter().map(|v| v * 0.5).sum();
/// assert!((y[0] - exact).abs() < 0.05 * w[..k].iter().map(|v| v.abs() * 0.5).sum::<f32>());
/// # Ok::<(), kernels::Error>(())
/// ```
///
/// # Errors
/// [`Error::IntInnerDimensionMismatch`] when `acts` has another `k`,
/// [`Error::LengthMismatch`] for a `y` of another length than `m * n_out`.
pub fn gemm_int(weights: &IntWeights, acts: &QuantizedActs, y: &mut [f32]) -> Result<()> {
    gemm_int_with(Kernel::detect(), weights, acts, y)
}

/// The kernel that runs the integer formats' decode steps and register tiles on
/// row-major weights when `kernel` is chosen (an AVX-512 machine runs their AVX2 code;
/// a prompt's packed panels use VNNI, see
/// [`prompt_runs_packed`](super::prompt_runs_packed); int8 in panels runs VNNI for
/// every row count).
pub fn int_kernel_for(kernel: Kernel) -> Kernel {
    driver::runs_as(kernel)
}

/// `ys[i] = x · W_iᵀ` for several integer matrices over the same activations (a
/// layer's q, k and v, or gate and up) with the detected kernel: with one activation
/// row or a batched decode step's few (up to [`DENSE_MANY_MAX_ROWS`](super::DENSE_MANY_MAX_ROWS))
/// and one format, one parallel region with the activations laid out once; otherwise
/// each as [`gemm_int`]. The results equal separate calls exactly.
///
/// # Errors
/// As [`gemm_int`], for any of the matrices.
pub fn gemm_int_many(items: &mut [(&IntWeights, &mut [f32])], acts: &QuantizedActs) -> Result<()> {
    driver::run_many(Kernel::detect(), items, acts)
}

/// `y = x · Wᵀ` for integer weights with a chosen kernel.
///
/// # Errors
/// As [`gemm_int`]; [`Error::KernelUnavailable`] if the CPU lacks the kernel.
pub fn gemm_int_with(
    kernel: Kernel,
    weights: &IntWeights,
    acts: &QuantizedActs,
    y: &mut [f32],
) -> Result<()> {
    driver::run(kernel, weights, acts, y)
}
