//! SwiGLU's gating, `silu(gate) * up`, in one pass over the two projections, the
//! vectorised `exp` it shares with attention's softmax, and the residual addition.
//!
//! Candle computes the same thing as two operations, each allocating its output and
//! the first calling the C library's `expf` element by element; a prompt of 512
//! tokens through SmolLM2 runs 24 million of them. Here each element is read once,
//! with `exp` evaluated sixteen (AVX-512F) or eight (AVX2) lanes at a time by the
//! polynomial below, and the rows are split among the threads.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::Result;

/// Elements per parallel task.
const TASK: usize = 1 << 14;

/// `silu(gate) * up` element-wise (`silu(x) = x / (1 + exp(-x))`), for two f32
/// tensors of the same shape. Contiguous CPU tensors take the vectorised pass; any
/// other pair takes candle's operations.
///
/// # Errors
/// Shapes that differ, and candle's errors.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let pass = |g: &[f32], u: &[f32]| {
        let mut out = afo_quant::kernels::zeroed(g.len());
        let kernel = Kernel::best();
        if g.len() <= TASK {
            kernel.silu_mul(g, u, &mut out);
        } else {
            out.par_chunks_mut(TASK)
                .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)))
                .for_each(|(o, (g, u))| kernel.silu_mul(g, u, o));
        }
        out
    };
    if gate.dims() == up.dims()
        && let Ok(Some(out)) =
            afo_quant::in_place(gate, |g| afo_quant::in_place(up, |u| pass(g, u)).ok())
    {
        return Ok(Tensor::from_vec(out, gate.shape(), gate.device())?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// `a + b` element-wise for two f32 tensors of the same shape (the residual adds of
/// a layer), on the current rayon pool. Contiguous CPU tensors take this pass; any
/// other pair takes candle's addition, whose result is the same bits.
///
/// Candle splits an addition of 64K elements or more over a pool of its own: one
/// thread per core whatever the pool the caller runs on, each spinning for a while
/// after the work ends, so a prompt's residual adds took the cores that the layer's
/// matrix products on the caller's pool were running on.
///
/// # Errors
/// Shapes that differ, and candle's errors.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let pass = |a: &[f32], b: &[f32]| {
        if a.len() <= TASK {
            // A decode step's rows: no parallel split.
            return a.iter().zip(b).map(|(x, y)| x + y).collect();
        }
        let mut out = Vec::new();
        a.par_iter()
            .zip(b)
            .with_min_len(TASK)
            .map(|(x, y)| x + y)
            .collect_into_vec(&mut out);
        out
    };
    if a.dims() == b.dims()
        && let Ok(Some(out)) =
            afo_quant::in_place(a, |x| afo_quant::in_place(b, |y| pass(x, y)).ok())
    {
        return Ok(Tensor::from_vec(out, a.shape(), a.device())?);
    }
    Ok((a + b)?)
}

/// The f32 tensors `rows` (each `[t, width]`, the same width) one after another as one
/// `[sum of t, width]` tensor: candle's `Tensor::cat` along the first dimension, by
/// plain copies of contiguous CPU tensors (a batched step's attention rows, each a
/// small tensor of its own, which candle's concatenation took several microseconds a
/// row to lay out); any other takes candle's.
///
/// # Errors
/// No rows, widths that differ, and candle's errors.
pub(crate) fn cat_rows(rows: &[Tensor]) -> Result<Tensor> {
    let width = rows.first().and_then(|r| r.dims().last().copied());
    let fits = |r: &Tensor| r.rank() == 2 && r.dims().last().copied() == width;
    if let (Some(first), Some(width), true) = (rows.first(), width, rows.iter().all(fits)) {
        let mut out: Vec<f32> = Vec::with_capacity(rows.iter().map(|r| r.elem_count()).sum());
        let copied = rows
            .iter()
            .all(|r| afo_quant::in_place(r, |xs: &[f32]| out.extend_from_slice(xs)).is_ok());
        if copied {
            let n = out.len() / width.max(1);
            return Ok(Tensor::from_vec(out, (n, width), first.device())?);
        }
    }
    Ok(Tensor::cat(rows, 0)?)
}

/// Rows normalised per group of [`RMS_GROUP`] for [`rms_norm`].
const RMS_GROUP: usize = 8;

/// Root-mean-square normalisation of each row (last dimension) of `x` times `alpha`:
/// `x / sqrt(sum(x^2) / n + eps) * alpha`, candle's `rms_norm` bit for bit (each row's
/// sum of squares in order from its first element, then the division and the product
/// per element). Contiguous f32 CPU tensors take this pass; any other pair takes
/// candle's.
///
/// A row's sum is a chain of dependent additions, so one row at a time waits on each
/// addition's latency: here the rows of a group of eight run their chains side by side
/// (a batched step's rows, a prompt's rows), each still in its own order (with AVX2,
/// the eight sums in one register, the rows' columns transposed eight at a time, and
/// the divisions eight lanes at a time); groups of a prompt are split among the
/// threads.
///
/// # Errors
/// A weight whose length is not the rows', and candle's errors.
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    let pass = |xs: &[f32], alpha: &[f32]| -> Option<Vec<f32>> {
        if n == 0 || alpha.len() != n || !xs.len().is_multiple_of(n) {
            return None;
        }
        let mut out = afo_quant::kernels::zeroed(xs.len());
        let group = |(src, dst): (&[f32], &mut [f32])| rms_rows(src, dst, alpha, eps);
        let chunk = RMS_GROUP * n;
        if xs.len() <= 4 * chunk {
            xs.chunks(chunk).zip(out.chunks_mut(chunk)).for_each(group);
        } else {
            xs.par_chunks(chunk)
                .zip(out.par_chunks_mut(chunk))
                .for_each(group);
        }
        Some(out)
    };
    if let Ok(Some(out)) = afo_quant::in_place(x, |xs| {
        afo_quant::in_place(alpha, |a| pass(xs, a)).ok().flatten()
    }) {
        return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
    }
    Ok(candle_nn::ops::rms_norm(x, alpha, eps)?)
}

/// [`rms_norm`] of the rows of `src` (at most [`RMS_GROUP`], `alpha.len()` each) into
/// `dst`.
fn rms_rows(src: &[f32], dst: &mut [f32], alpha: &[f32], eps: f32) {
    let n = alpha.len();
    let rows = (src.len() / n).min(RMS_GROUP);
    #[cfg(target_arch = "x86_64")]
    if rows == RMS_GROUP
        && n >= 8
        && src.len() >= RMS_GROUP * n
        && dst.len() >= RMS_GROUP * n
        && Kernel::Avx2.is_available()
    {
        // SAFETY: AVX2 is available (checked); eight whole rows of `n` in `src` and
        // `dst` (checked).
        unsafe { x86::rms_rows8(src, dst, alpha, eps) };
        return;
    }
    let mut sums = [0.0f32; RMS_GROUP];
    for i in 0..n {
        for (r, sum) in sums.iter_mut().enumerate().take(rows) {
            if let Some(&v) = src.get(r * n + i) {
                *sum += v * v;
            }
        }
    }
    for ((s, d), sum) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)).zip(sums) {
        // Candle's steps: the mean square plus eps, its root, then each element divided
        // by it and multiplied by its weight.
        #[allow(clippy::cast_precision_loss)] // rows are far below 2^24 elements
        let m = (sum / n as f32 + eps).sqrt();
        for ((d, s), a) in d.iter_mut().zip(s).zip(alpha) {
            *d = *s / m * *a;
        }
    }
}

/// Candle's element-wise operation `Op` (GELU, SiLU, ...) over an f32 tensor, on the
/// current rayon pool: the function candle applies (`Op::f32_vec`), so the same bits.
/// A contiguous CPU tensor is cut into tasks here; any other goes to `fallback`,
/// candle's own method for the operation.
///
/// Candle runs such an operation of 64K elements or more on its own pool, as it does
/// additions (see [`add`]): a vision encoder's GELU over every patch took cores that
/// the caller's pool was running on.
///
/// # Errors
/// Candle's errors, from the fallback.
pub(crate) fn unary<Op: candle_core::op::UnaryOpT>(
    x: &Tensor,
    fallback: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let pass = |xs: &[f32]| {
        let mut out = afo_quant::kernels::zeroed(xs.len());
        if xs.len() <= TASK {
            Op::f32_vec(xs, &mut out);
        } else {
            out.par_chunks_mut(TASK)
                .zip(xs.par_chunks(TASK))
                .for_each(|(o, x)| Op::f32_vec(x, o));
        }
        out
    };
    match afo_quant::in_place(x, pass) {
        Ok(out) => Ok(Tensor::from_vec(out, x.shape(), x.device())?),
        Err(_) => Ok(fallback(x)?),
    }
}

/// Which SIMD code runs, for SwiGLU here and for attention's micro-kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Plain Rust, for any CPU.
    Portable,
    /// AVX2 and FMA intrinsics (x86-64).
    Avx2,
    /// AVX-512F intrinsics (sixteen lanes); attention's key transpose stays AVX2,
    /// which every AVX-512 CPU has.
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs, within afo-quant's cap
    /// ([`afo_quant::kernels::limit_kernels`]: AVX2 at most under an AVX2 cap, the
    /// portable code under a scalar one).
    pub(crate) fn best() -> Self {
        use afo_quant::kernels::{Kernel as Isa, kernel_limit};
        let limit = kernel_limit();
        [(Self::Avx512, Isa::Avx512Vnni), (Self::Avx2, Isa::Avx2)]
            .into_iter()
            .find(|(k, isa)| k.is_available() && *isa <= limit)
            .map_or(Self::Portable, |(k, _)| k)
    }

    /// Whether this CPU runs the kernel.
    pub(crate) fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => Self::Avx2.is_available() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Avx512 => false,
        }
    }

    /// Whether the AVX2 code runs (on both x86 kernels).
    pub(crate) fn has_avx2(self) -> bool {
        matches!(self, Self::Avx2 | Self::Avx512) && self.is_available()
    }

    /// `out[i] = silu(g[i]) * u[i]` over the common length (the portable pass where
    /// this kernel is not available).
    pub(crate) fn silu_mul(self, g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len().min(g.len()).min(u.len());
        let (g, u, out) = (&g[..n], &u[..n], &mut out[..n]);
        #[cfg(target_arch = "x86_64")]
        {
            if self == Self::Avx512 && self.is_available() {
                // SAFETY: the CPU has AVX-512F (checked); the three slices hold `n`
                // elements.
                unsafe { x86::silu_mul16(g, u, out) };
                return;
            }
            if self == Self::Avx2 && self.is_available() {
                // SAFETY: the CPU has AVX2 and FMA (checked); the three slices hold
                // `n` elements.
                unsafe { x86::silu_mul8(g, u, out) };
                return;
            }
        }
        for ((o, &x), &y) in out.iter_mut().zip(g).zip(u) {
            *o = x / (1.0 + (-x).exp()) * y;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{exp8, exp16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! `exp` in eight and sixteen lanes (Cephes' single-precision polynomial), the
    //! SwiGLU pass on top of it, and RMS norm's groups of eight rows.

    use std::arch::x86_64::{
        __m256, __m512, _mm256_add_epi32, _mm256_add_ps, _mm256_castsi256_ps, _mm256_cvttps_epi32,
        _mm256_div_ps, _mm256_floor_ps, _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_loadu_ps,
        _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_setzero_ps, _mm256_slli_epi32, _mm256_storeu_ps, _mm256_sub_ps, _mm512_add_epi32,
        _mm512_add_ps, _mm512_castsi512_ps, _mm512_cvttps_epi32, _mm512_div_ps, _mm512_fmadd_ps,
        _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps,
        _mm512_roundscale_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_slli_epi32,
        _mm512_storeu_ps, _mm512_sub_ps,
    };

    /// [`super::rms_rows`] for eight rows with AVX2, the same bits: the eight sums
    /// side by side in one register (eight columns of the rows transposed at a time,
    /// each square then added in the rows' own order, never fused), then each row's
    /// elements divided by its root and multiplied by the weight eight at a time.
    ///
    /// # Safety
    /// AVX2 is available; `src` and `dst` hold eight rows of `alpha.len()` (at least 8).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rms_rows8(src: &[f32], dst: &mut [f32], alpha: &[f32], eps: f32) {
        let n = alpha.len();
        let body = n / 8 * 8;
        let (sp, dp, ap) = (src.as_ptr(), dst.as_mut_ptr(), alpha.as_ptr());
        let mut sums = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            // SAFETY: `r * n + i + 8 <= 8 n`, inside `src` (the caller's).
            let v: [__m256; 8] =
                std::array::from_fn(|r| unsafe { _mm256_loadu_ps(sp.add(r * n + i)) });
            for c in afo_quant::kernels::transpose8_avx2(v) {
                sums = _mm256_add_ps(sums, _mm256_mul_ps(c, c));
            }
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sums) };
        for (r, sum) in lanes.iter_mut().enumerate() {
            for &v in src.get(r * n + body..(r + 1) * n).unwrap_or_default() {
                *sum += v * v;
            }
            #[allow(clippy::cast_precision_loss)] // rows are far below 2^24 elements
            let m = (*sum / n as f32 + eps).sqrt();
            let vm = _mm256_set1_ps(m);
            for i in (0..body).step_by(8) {
                // SAFETY: `r * n + i + 8 <= 8 n` (inside `src` and `dst`), `i + 8 <= n`
                // (inside `alpha`).
                unsafe {
                    let x = _mm256_loadu_ps(sp.add(r * n + i));
                    let y = _mm256_mul_ps(_mm256_div_ps(x, vm), _mm256_loadu_ps(ap.add(i)));
                    _mm256_storeu_ps(dp.add(r * n + i), y);
                }
            }
            let tail = (r * n + body..(r + 1) * n).zip(body..n);
            for (at, i) in tail {
                if let (Some(d), Some(x), Some(a)) = (dst.get_mut(at), src.get(at), alpha.get(i)) {
                    *d = *x / m * *a;
                }
            }
        }
    }

    /// The bound past which `exp` of an f32 overflows (or flushes to 0 below `-EXP_HI`).
    const EXP_HI: f32 = 88.376_26;
    /// `ln 2` split in two for the range reduction.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// The polynomial's coefficients, highest degree first (`P0` then these).
    const P0: f32 = 1.987_569_1e-4;
    const P: [f32; 5] = [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];

    /// `exp(x)` lane by lane (about 1 ulp for `x` in [-87, 88]; below that it flushes
    /// to 0 or a tiny value).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(EXP_HI)),
            _mm256_set1_ps(-EXP_HI),
        );
        let fx = _mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        );
        let fx = _mm256_floor_ps(fx);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), x);
        let mut y = _mm256_set1_ps(P0);
        for c in P {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x),
            _mm256_set1_ps(1.0),
        );
        let n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n));
        _mm256_mul_ps(y, pow2n)
    }

    /// [`exp8`] in sixteen lanes: the same operations.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(EXP_HI)),
            _mm512_set1_ps(-EXP_HI),
        );
        let fx = _mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        );
        // Rounded towards minus infinity (1), exceptions suppressed (8): floor.
        let fx = _mm512_roundscale_ps::<0x09>(fx);
        let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
        let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), x);
        let mut y = _mm512_set1_ps(P0);
        for c in P {
            y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x),
            _mm512_set1_ps(1.0),
        );
        let n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
        let pow2n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(n));
        _mm512_mul_ps(y, pow2n)
    }

    /// [`super::Kernel::silu_mul`] in sixteen lanes.
    ///
    /// # Safety
    /// AVX-512F is available; `g`, `u` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul16(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len();
        let body = n / 16 * 16;
        let (gp, up, op) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
        let one = _mm512_set1_ps(1.0);
        for i in (0..body).step_by(16) {
            // SAFETY: `i + 16 <= n`, the length of the three slices.
            unsafe {
                let x = _mm512_loadu_ps(gp.add(i));
                let e = exp16(_mm512_sub_ps(_mm512_set1_ps(0.0), x));
                let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
                _mm512_storeu_ps(op.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(up.add(i))));
            }
        }
        super::Kernel::Portable.silu_mul(&g[body..], &u[body..], &mut out[body..]);
    }

    /// [`super::Kernel::silu_mul`] in eight lanes.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `g`, `u` and `out` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul8(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len();
        let body = n / 8 * 8;
        let (gp, up, op) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
        let one = _mm256_set1_ps(1.0);
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= n`, the length of the three slices.
            unsafe {
                let x = _mm256_loadu_ps(gp.add(i));
                let e = exp8(_mm256_sub_ps(_mm256_set1_ps(0.0), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
                _mm256_storeu_ps(op.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
            }
        }
        super::Kernel::Portable.silu_mul(&g[body..], &u[body..], &mut out[body..]);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn kernels() -> Vec<Kernel> {
        let have: Vec<Kernel> = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .filter(|k| k.is_available())
            .collect();
        println!("SwiGLU passes run: {have:?} (the others are not tested on this CPU)");
        have
    }

    /// Inputs over the whole range the gate takes and past it: large negative gates
    /// (silu -> -0), large positive (silu -> x), around zero, and odd lengths that
    /// leave a tail after the vector body.
    fn inputs(n: usize) -> (Vec<f32>, Vec<f32>) {
        let g = (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 12.0 + if i % 7 == 0 { -120.0 } else { 0.0 })
            .map(|x| if n > 3 && x > 11.0 { 150.0 } else { x })
            .collect();
        let u = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        (g, u)
    }

    #[test]
    fn cat_rows_is_candles_cat() {
        let dev = Device::Cpu;
        let t = |n: usize, w: usize, seed: usize| {
            let v: Vec<f32> = (0..n * w).map(|i| (i * 31 + seed) as f32 * 0.5).collect();
            Tensor::from_vec(v, (n, w), &dev).unwrap()
        };
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        // One-row tensors (a batched step), taller ones, and a row narrowed from a
        // larger tensor (a view with an offset).
        let big = t(4, 6, 9);
        for rows in [
            vec![t(1, 6, 1), t(1, 6, 2), t(1, 6, 3)],
            vec![t(3, 6, 1), t(1, 6, 2)],
            vec![big.narrow(0, 2, 1).unwrap(), t(2, 6, 5)],
        ] {
            let got = cat_rows(&rows).unwrap();
            let want = Tensor::cat(&rows, 0).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(values(&got), values(&want));
        }
        // A transposed view (not contiguous) goes through candle, same result.
        let tr = t(6, 2, 4).t().unwrap();
        let rows = [t(1, 6, 1), tr];
        assert_eq!(
            values(&cat_rows(&rows).unwrap()),
            values(&Tensor::cat(&rows, 0).unwrap())
        );
        // Widths that differ, or nothing at all, are candle's errors.
        assert!(cat_rows(&[t(1, 6, 1), t(1, 5, 1)]).is_err());
        assert!(cat_rows(&[]).is_err());
    }

    #[test]
    fn rms_norm_is_candles_bit_for_bit() {
        let dev = Device::Cpu;
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
        };
        let mut compared = 0;
        // A decode row, a batched step, odd row counts, a prompt split among threads,
        // per-head norms (`[1, heads, t, head_dim]`), a row of zeros.
        for dims in [
            vec![1, 576],
            vec![8, 576],
            vec![5, 576],
            vec![9, 33],
            vec![200, 64],
            vec![1, 9, 3, 64],
            vec![3, 1],
        ] {
            let n = *dims.last().unwrap();
            let count: usize = dims.iter().product();
            let mut xs: Vec<f32> = (0..count).map(|_| next()).collect();
            if count > n {
                xs[n..2 * n].fill(0.0);
            }
            let alpha: Vec<f32> = (0..n).map(|_| next()).collect();
            let x = Tensor::from_vec(xs, dims.as_slice(), &dev).unwrap();
            let a = Tensor::from_vec(alpha, n, &dev).unwrap();
            for eps in [1e-5f32, 1e-6] {
                let want = candle_nn::ops::rms_norm(&x, &a, eps).unwrap();
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let got = pool.install(|| rms_norm(&x, &a, eps)).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    let bits = |t: &Tensor| -> Vec<u32> {
                        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                        v.iter().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(bits(&got), bits(&want), "{dims:?} eps {eps}");
                    compared += count;
                }
            }
        }
        assert_eq!(
            compared,
            4 * (576 + 8 * 576 + 5 * 576 + 9 * 33 + 200 * 64 + 27 * 64 + 3)
        );
        // A weight that does not fit the rows takes candle's path and its error.
        let x = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        let a = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(rms_norm(&x, &a, 1e-5).is_err());
    }

    #[test]
    fn every_pass_matches_the_definition() {
        for kernel in kernels() {
            for n in [0, 1, 7, 8, 15, 16, 17, 33, 1000] {
                let (g, u) = inputs(n);
                let mut out = vec![f32::NAN; n];
                kernel.silu_mul(&g, &u, &mut out);
                for i in 0..n {
                    let (x, y) = (f64::from(g[i]), f64::from(u[i]));
                    let want = x / (1.0 + (-x).exp()) * y;
                    let got = f64::from(out[i]);
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs() + 1e-30,
                        "{kernel:?} n={n} i={i}: silu({x}) * {y} = {got}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_tensor_op_matches_candles_and_takes_any_layout() {
        let dev = Device::Cpu;
        // More elements than one task, so the rows are split among threads.
        let n = 3 * TASK + 6;
        let (g, u) = inputs(n);
        let gate = Tensor::from_vec(g, (3, n / 3), &dev).unwrap();
        let up = Tensor::from_vec(u, (3, n / 3), &dev).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let got = silu_mul(&gate, &up).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "largest difference {diff}");
        // A transposed (non-contiguous) gate takes candle's path: the same values.
        let gt = gate.t().unwrap();
        let ut = up.t().unwrap();
        let strided = silu_mul(&gt, &ut).unwrap().t().unwrap();
        let diff = (strided - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "largest difference {diff}");
        // Shapes that differ are an error, not a panic.
        let short = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        assert!(silu_mul(&gate, &short).is_err());
    }

    #[test]
    fn the_residual_add_is_candles_bit_for_bit_on_any_pool() {
        let dev = Device::Cpu;
        // Several tasks' worth of elements (split among threads) and a short one.
        for n in [5 * TASK + 3, 7] {
            let (a, b) = inputs(n);
            let a = Tensor::from_vec(a, n, &dev).unwrap();
            let b = Tensor::from_vec(b, n, &dev).unwrap();
            let want: Vec<f32> = (&a + &b).unwrap().to_vec1().unwrap();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got: Vec<f32> = pool.install(|| add(&a, &b)).unwrap().to_vec1().unwrap();
                assert_eq!(got.len(), n);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "n={n}, {threads} threads: not candle's sums");
            }
        }
        // A narrowed view (an offset into its buffer) is read in place; a transposed
        // one takes candle's path; both give the sums of their elements.
        let (a, b) = inputs(4 * 6);
        let a = Tensor::from_vec(a, (4, 6), &dev).unwrap();
        let b = Tensor::from_vec(b, (4, 6), &dev).unwrap();
        for (x, y) in [
            (a.narrow(0, 1, 2).unwrap(), b.narrow(0, 2, 2).unwrap()),
            (a.t().unwrap(), b.t().unwrap()),
        ] {
            let want: Vec<Vec<f32>> = (&x + &y).unwrap().to_vec2().unwrap();
            assert_eq!(add(&x, &y).unwrap().to_vec2::<f32>().unwrap(), want);
        }
        // Shapes that differ are an error, not a panic.
        let short = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        assert!(add(&a, &short).is_err());
    }

    #[test]
    fn candles_unary_operations_give_candles_bits_on_any_pool() {
        use candle_core::op::{Gelu, GeluErf, Silu};
        let dev = Device::Cpu;
        let same = |got: &[f32], want: &[f32]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        };
        // Past candle's own parallel threshold (64K), several tasks, and a short one.
        for n in [70_000, 5 * TASK + 3, 7] {
            // Where the three functions differ: within a few units of zero.
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            let x = Tensor::from_vec(a, n, &dev).unwrap();
            let want_tanh: Vec<f32> = x.gelu().unwrap().to_vec1().unwrap();
            let want_erf: Vec<f32> = x.gelu_erf().unwrap().to_vec1().unwrap();
            let want_silu: Vec<f32> = x.silu().unwrap().to_vec1().unwrap();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let run = |t: Result<Tensor>| t.unwrap().to_vec1::<f32>().unwrap();
                let tanh = run(pool.install(|| unary::<Gelu>(&x, Tensor::gelu)));
                let erf = run(pool.install(|| unary::<GeluErf>(&x, Tensor::gelu_erf)));
                let silu = run(pool.install(|| unary::<Silu>(&x, Tensor::silu)));
                assert!(same(&tanh, &want_tanh), "gelu, n={n}, {threads} threads");
                assert!(same(&erf, &want_erf), "gelu_erf, n={n}, {threads} threads");
                assert!(same(&silu, &want_silu), "silu, n={n}, {threads} threads");
                // The three differ from each other, so a mixed-up operation fails.
                assert!(!same(&tanh, &want_erf) && !same(&erf, &want_silu));
            }
        }
        // A transposed view and an f16 tensor take candle's method.
        let (a, _) = inputs(4 * 6);
        let x = Tensor::from_vec(a, (4, 6), &dev).unwrap();
        let t = x.t().unwrap();
        let want: Vec<Vec<f32>> = t.gelu_erf().unwrap().to_vec2().unwrap();
        let got = unary::<GeluErf>(&t, Tensor::gelu_erf).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want);
        let h = x.to_dtype(DType::F16).unwrap();
        let got = unary::<Silu>(&h, Tensor::silu).unwrap();
        assert_eq!(got.dtype(), DType::F16);
        assert_eq!(
            got.to_vec2::<half::f16>().unwrap(),
            h.silu().unwrap().to_vec2::<half::f16>().unwrap()
        );
    }
}
