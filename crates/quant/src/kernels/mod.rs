//! Fast CPU matrix kernels for quantized weights: GGML blocks (Q4_0, Q4_1, Q8_0) and
//! afo's own integer formats (int8 per row, int4 grouped).
//!
//! `y = x · Wᵀ` for `m` activation rows `x` (`m x k`, f32) and a weight matrix `W`
//! (`n_out x k`), kept either in its GGUF bytes ([`GgmlMatrix`], [`GgmlWeights`]) or as
//! [`IntWeights`] ([`IntFormat::Int8`], [`IntFormat::Int4`] with groups of 32, 64 or 128,
//! symmetric or with a minimum). The activation rows are quantized once per call to 8
//! bits per block of 32 ([`QuantizedActs`]), then each weight block is multiplied with
//! integer dot products:
//!
//! - [`Kernel::Avx512Vnni`]: GGML weights repacked at load into panels of sixteen rows
//!   ([`GgmlWeights::for_kernel`], same size): one `vpdpbusd` per broadcast of four
//!   activation bytes multiplies sixteen rows, for decode, batches and prompts alike
//!   (eight activation rows per weight load, each row bit-identical to that row
//!   alone); row-major GGML weights (a row count that is not a multiple of 16) run
//!   `vpdpbusd` on two blocks per 512-bit register, and a prompt's packed panels; int8
//!   weights are repacked into the same panels (no block headers, the row scale
//!   applied at the end) and run the same kernel; int4's packed panels use it too, its
//!   decode steps run the AVX2 code; where the CPU also has AMX-INT8 and the OS grants
//!   the tiles ([`amx_available`]), products of [`AMX_MIN_ROWS`] rows or more over
//!   panels (loaded, or the packed kernel's per-call ones: int4 prompts) run on AMX
//!   tiles, one `tdpbsud` per block of sixteen rows and columns, the VNNI kernels'
//!   results bit for bit;
//! - [`Kernel::Avx2`]: `vpmaddubsw` + `vpmaddwd` (the sign trick for Q8_0 and int8);
//!   Q4_0 and Q4_1 weights in the same panels, each 512-bit vector read as two halves
//!   of eight rows (bit-identical to the VNNI kernel's), Q8_0 row-major;
//! - [`Kernel::Scalar`]: portable Rust.
//!
//! Dense f32, f16 and bf16 weights have their own kernels ([`dense_gemm`]: a decode
//! step streams each weight row once through FMA chains, converting f16 with F16C /
//! AVX-512F and bf16 with a shift; a prompt runs a packed GEMM of 6 x 16 register
//! tiles, 6 x 64 with AVX-512F; an f32 matrix whose rows fill panels of 64 is stored
//! packed at load, [`DensePanels`], and every row count runs those tiles over it;
//! where the AVX-512 kernel runs, those panels keep each exponent as a four-bit code,
//! [`CodedPanels`]: the same values in 28 bits instead of 32, rebuilt in registers;
//! where the CPU also has AMX-BF16, a prompt of [`DENSE_BF16X6_MIN_ROWS`] rows or more
//! over such panels runs on the tiles as six bf16 products per f32 product, f32's
//! accuracy, [`dense_runs_bf16x6`], and over f16 or bf16 rows of whole panels as five or
//! three).
//!
//! The best kernel the CPU supports is detected once at run time ([`Kernel::detect`]),
//! independent of the compile-time target; [`gemm_with`] and [`gemm_int_with`] force one
//! (tests, benches). Apart from GGML weights in panels (one arithmetic whatever the
//! row count: AVX2 unpacks a prompt's panel halves into L1 first), from four
//! activation rows on (a prompt) the kernel of every GGML
//! and integer format is packed: eight weight rows (AVX2) or sixteen (AVX-512 VNNI,
//! `vpdpbusd`, bit-identical to the AVX2 panels) are unpacked per call into a panel in
//! L1, one output column per 32-bit lane, and every activation row streams past it.
//! Between two and three rows (and for batched decode steps), each decoded weight block serves a register
//! tile (GGML: 4 rows x 2 outputs; int8: 4 x 2; int4: 6 x 1), so weights are
//! read once per call; a single row streams the weight rows in order (the integer
//! formats take four rows at a time for matrices up to 1 MiB). Output columns are
//! split across the current rayon pool when the work is large enough
//! (`m * n_out * k >= 2^18`), a prompt's rows (64 or more) instead of its columns;
//! results do not depend on the thread count. The tests run
//! every kernel the machine has, so the AVX-512 kernel is exercised only on CPUs with
//! AVX-512 VNNI.
//!
//! # Accuracy
//!
//! Weights are used exactly as stored. Activations lose at most half a quantization
//! step, `max|x_block| / 254`, per element, so `|y - y_exact|` is at most
//! `sum over blocks of max|x_block| / 254 * sum|w_block|`, plus f32 rounding.
//!
//! ```
//! use afo_quant::kernels::{self, GgmlWeights, WeightDType};
//!
//! // One Q8_0 block: d = 1.0 (f16 0x3c00), q = 0, 1, ..., 31.
//! let mut bytes = vec![0x00, 0x3c];
//! bytes.extend((0..32u8).map(|q| q));
//! let w = GgmlWeights::new(WeightDType::Q8_0, 1, 32, bytes)?;
//! let x = vec![1.0f32; 32];
//! let mut y = [0.0f32; 1];
//! kernels::gemm(&w, &x, 1, &mut y)?;
//! assert_eq!(y[0], (0..32).sum::<i32>() as f32);
//! # Ok::<(), kernels::Error>(())
//! ```

mod acts;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod amx_f32;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocks;
mod coded;
mod dense;
mod driver;
mod error;
mod int;
#[cfg(target_arch = "x86_64")]
mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_vnni;
mod panels;
mod roofline;
mod scalar;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use std::sync::OnceLock;

pub use acts::QuantizedActs;
#[cfg(target_arch = "x86_64")]
pub use amx::{AMX_MIN_ROWS, amx_available, disable_amx, has_amx_bf16, has_amx_int8};
#[cfg(target_arch = "x86_64")]
pub use avx2::transpose8 as transpose8_avx2;
pub use blocks::{
    BLOCK_ELEMS, GgmlMatrix, GgmlWeights, WeightDType, dequantize_q8_0, quantize_q8_0,
};
pub use coded::CodedPanels;
pub use dense::{
    DENSE_BF16X6_MIN_ROWS, DENSE_GEMV_MAX_ROWS, DENSE_MANY_MAX_ROWS, DENSE_PANEL_ROWS,
    DENSE_PANELS_STREAM_MAX_ROWS, DENSE_ROWS_STREAM_MAX_ROWS, DENSE_TILE_ROWS, DenseData,
    DenseMatrix, DensePanels, PanelCoding, dense_gemm, dense_gemm_many, dense_gemm_many_with,
    dense_gemm_with, dense_packed_available, dense_rows_run_bf16_tiles, dense_runs_bf16x6,
};
pub use error::{Error, Result};
pub use int::{
    INT4_GROUPS, IntFormat, IntWeights, gemm_int, gemm_int_many, gemm_int_with, int_kernel_for,
};
pub use roofline::measure_read_bandwidth;

/// Asks the CPU to bring the `len` bytes from `p` into its first-level cache, line by
/// line (x86-64; nothing elsewhere). A hint: it never faults and changes no result.
pub fn prefetch_bytes(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let first = p.wrapping_sub(p as usize % 64);
        let lines = (p as usize % 64 + len).div_ceil(64);
        for i in 0..lines {
            // SAFETY: a prefetch reads nothing the program sees and does not fault on
            // any address; SSE is part of x86-64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(i * 64).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Elements from which [`zeroed`] fills a buffer on the rayon pool.
const PAR_ZERO_MIN: usize = 1 << 16;

/// A buffer of `n` zeros for a kernel to write its results into: from 65,536 elements
/// on, filled by the threads of the current rayon pool rather than by the calling
/// thread alone, so that a prompt's layer outputs (megabytes each) do not keep the
/// other cores waiting. Measured on a 512-token SmolLM2 prompt (2 threads): the cores
/// were busy 85% of the time before, 91% after.
pub fn zeroed(n: usize) -> Vec<f32> {
    if n < PAR_ZERO_MIN {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0.0f32, n).with_min_len(PAR_ZERO_MIN / 4));
    v
}

/// An implementation of the kernels, by instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kernel {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (Haswell, Zen 1 and later).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (Ice Lake, Zen 4 and later).
    Avx512Vnni,
}

impl Kernel {
    /// Every kernel, slowest first.
    pub const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512Vnni];

    /// The fastest kernel this CPU runs, at most [`kernel_limit`] (chosen once, then
    /// cached).
    pub fn detect() -> Kernel {
        *BEST.get_or_init(|| {
            let limit = kernel_limit();
            Kernel::ALL
                .into_iter()
                .rev()
                .find(|k| k.is_available() && *k <= limit)
                .unwrap_or(Kernel::Scalar)
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx2 => has_avx2(),
            Kernel::Avx512Vnni => has_avx512_vnni(),
        }
    }
}

/// The kernel [`Kernel::detect`] chose, once.
static BEST: OnceLock<Kernel> = OnceLock::new();
/// The most capable kernel this process may choose ([`limit_kernels`]).
static LIMIT: OnceLock<Kernel> = OnceLock::new();

/// Caps the kernels this process runs at `kernel`: [`Kernel::detect`] then picks the
/// fastest the CPU has up to it, and the code that follows this crate's choice (the
/// engine's attention and activations) does the same. For timing one path against
/// another on one machine, or running as a CPU without AVX-512 (`afo --kernels avx2`).
///
/// The choice is made once: the cap takes effect only before the first
/// [`Kernel::detect`], and only the first cap counts. Returns whether this call set it.
pub fn limit_kernels(kernel: Kernel) -> bool {
    BEST.get().is_none() && LIMIT.set(kernel).is_ok()
}

/// The cap of [`limit_kernels`]; [`Kernel::Avx512Vnni`] (no cap) when none was set.
pub fn kernel_limit() -> Kernel {
    LIMIT.get().copied().unwrap_or(Kernel::Avx512Vnni)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        has_avx2()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512_vnni() -> bool {
    false
}

/// Activation rows from which products over weights in panels take AMX tiles (none on
/// this architecture).
#[cfg(not(target_arch = "x86_64"))]
pub const AMX_MIN_ROWS: usize = usize::MAX;

/// Whether products run on AMX tiles: never on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn amx_available() -> bool {
    false
}

/// Whether the CPU has AMX-INT8: never on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn has_amx_int8() -> bool {
    false
}

/// Whether the CPU has AMX-BF16: never on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn has_amx_bf16() -> bool {
    false
}

/// Keeps the kernels off AMX tiles (there are none on this architecture).
#[cfg(not(target_arch = "x86_64"))]
pub fn disable_amx() {}

/// Whether `rows` activation rows of a prompt through `kernel` take the packed kernel
/// (the GGML and integer formats, from four rows on, on [`Kernel::Avx2`] with
/// eight-column panels and on [`Kernel::Avx512Vnni`] with sixteen-column `vpdpbusd`
/// panels; batched decode steps, declared with
/// [`QuantizedActs::set_independent_rows`], keep the register tiles).
pub fn prompt_runs_packed(kernel: Kernel, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(kernel, Kernel::Avx2 | Kernel::Avx512Vnni) && packed::takes_packed(rows, false)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, rows);
        false
    }
}

/// The kernels this CPU can run, slowest first (always starts with [`Kernel::Scalar`]).
pub fn available_kernels() -> Vec<Kernel> {
    Kernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

/// Says which kernel paths a test ran and which this CPU cannot run (so they were not
/// tested here); printed by the kernel tests (`--nocapture` shows it).
#[cfg(test)]
pub(crate) fn report_kernel_coverage(test: &str) {
    let names = |ks: Vec<Kernel>| {
        ks.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|k| !k.is_available())
        .collect();
    if missing.is_empty() {
        println!(
            "{test}: every kernel path ran ({})",
            names(available_kernels())
        );
    } else {
        println!(
            "{test}: ran {}; NOT TESTED on this CPU (it lacks the instructions): {}",
            names(available_kernels()),
            names(missing)
        );
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512vnni",
        })
    }
}

impl FromStr for Kernel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Ok(Kernel::Scalar),
            "avx2" => Ok(Kernel::Avx2),
            "avx512vnni" | "avx512" => Ok(Kernel::Avx512Vnni),
            _ => Err(Error::UnknownName {
                what: "kernel",
                name: s.to_owned(),
            }),
        }
    }
}

/// `y = x · Wᵀ` with the detected kernel: `x` is `m x k`, `y` is `m x n_out`, row-major.
pub fn gemm(weights: &GgmlWeights, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
    let acts = QuantizedActs::quantize(x, m, weights.k())?;
    gemm_with(Kernel::detect(), weights.matrix(), &acts, y)
}

/// `y = x · Wᵀ` for activations already quantized, with the detected kernel.
///
/// Quantize once with [`QuantizedActs::quantize`] and call this for every matrix that
/// reads the same input.
pub fn gemm_quantized(weights: GgmlMatrix<'_>, acts: &QuantizedActs, y: &mut [f32]) -> Result<()> {
    gemm_with(Kernel::detect(), weights, acts, y)
}

/// `ys[i] = x · W_iᵀ` for several matrices over the same activations (a layer's q, k
/// and v, or gate and up), with the detected kernel. With one activation row or a
/// batched decode step's few (up to [`DENSE_MANY_MAX_ROWS`]) the matrices' columns are
/// split across the current rayon pool as one parallel region (one fork and join
/// instead of one per matrix); a prompt's rows run each matrix as [`gemm_quantized`].
/// The results equal separate calls exactly.
///
/// # Errors
/// As [`gemm_with`], for any of the matrices.
pub fn gemm_quantized_many(
    items: &mut [(GgmlMatrix<'_>, &mut [f32])],
    acts: &QuantizedActs,
) -> Result<()> {
    driver::run_many(Kernel::detect(), items, acts)
}

/// `y = x · Wᵀ` with a chosen kernel; [`Error::KernelUnavailable`] if the CPU lacks it.
///
/// Runs on the current rayon pool (use `ThreadPool::install` to choose the thread count).
pub fn gemm_with(
    kernel: Kernel,
    weights: GgmlMatrix<'_>,
    acts: &QuantizedActs,
    y: &mut [f32],
) -> Result<()> {
    driver::run(kernel, weights, acts, y)
}

fn matmul_dtype(
    dtype: WeightDType,
    bytes: &[u8],
    n_out: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let w = GgmlMatrix::new(dtype, n_out, k, bytes)?;
    if !x.len().is_multiple_of(k) || x.is_empty() {
        return Err(Error::LengthMismatch {
            what: "x (a multiple of k)",
            expected: x.len().div_ceil(k).max(1) * k,
            actual: x.len(),
            unit: "elements",
        });
    }
    let acts = QuantizedActs::quantize(x, x.len() / k, k)?;
    gemm_with(Kernel::detect(), w, &acts, y)
}

/// `y = x · Wᵀ` for Q4_0 GGUF bytes of a `[n_out, k]` matrix; `m = x.len() / k` rows.
pub fn matmul_q4_0(bytes: &[u8], n_out: usize, k: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
    matmul_dtype(WeightDType::Q4_0, bytes, n_out, k, x, y)
}

/// `y = x · Wᵀ` for Q4_1 GGUF bytes of a `[n_out, k]` matrix; `m = x.len() / k` rows.
pub fn matmul_q4_1(bytes: &[u8], n_out: usize, k: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
    matmul_dtype(WeightDType::Q4_1, bytes, n_out, k, x, y)
}

/// `y = x · Wᵀ` for Q8_0 GGUF bytes of a `[n_out, k]` matrix; `m = x.len() / k` rows.
pub fn matmul_q8_0(bytes: &[u8], n_out: usize, k: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
    matmul_dtype(WeightDType::Q8_0, bytes, n_out, k, x, y)
}
