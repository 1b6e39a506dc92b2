//! Activation quantization: f32 rows to the kernels' internal 8-bit layout.
//!
//! Each row of `k` floats is cut into blocks of 32. A block gets a scale
//! `d = max|x| / 127`, quants `q = round(x / d)` in `-127..=127` (never -128, so that
//! `abs` and sign tricks are exact), and `ds = d * sum(q)`, the term a block minimum or
//! offset multiplies. Quants live in 64-byte aligned lines (two blocks per line, rows
//! padded to an even number of blocks with zero blocks), scales and sums in separate
//! `f32` arrays, so the kernels load a block with one aligned load.
//!
//! The quantization error of an element is at most `d / 2 = max|x| / 254` of its block.

use super::blocks::{BLOCK_ELEMS, blocks_per_row};
use super::error::{Error, Result};

/// 64 bytes of quants (two blocks), 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [[i8; BLOCK_ELEMS]; 2]);

/// `m` activation rows quantized to 8 bits per block of 32, ready for the kernels.
///
/// Build it once per input and reuse it for every weight matrix that reads the same
/// input (Q, K and V; gate and up) with [`gemm_quantized`](super::gemm_quantized).
#[derive(Clone, Default)]
pub struct QuantizedActs {
    m: usize,
    k: usize,
    nb: usize,
    stride: usize,
    lines: Vec<Line>,
    d: Vec<f32>,
    ds: Vec<f32>,
}

impl std::fmt::Debug for QuantizedActs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedActs")
            .field("m", &self.m)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Raw view used by the SIMD kernels.
#[derive(Clone, Copy)]
pub(crate) struct ActsView<'a> {
    /// Quants, `stride / 2` lines (of two blocks) per row.
    pub(crate) lines: &'a [Line],
    /// Scales, `stride` per row.
    pub(crate) d: &'a [f32],
    /// `d * sum(q)`, `stride` per row.
    pub(crate) ds: &'a [f32],
    /// Blocks per row in the arrays (padded to even).
    pub(crate) stride: usize,
}

impl QuantizedActs {
    /// An empty buffer, to be filled with [`quantize_into`](Self::quantize_into).
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `m` rows of `k` floats (`x.len() == m * k`, `k` a multiple of 32).
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Result<Self> {
        let mut acts = Self::new();
        acts.quantize_into(x, m, k)?;
        Ok(acts)
    }

    /// Like [`quantize`](Self::quantize), reusing this buffer's allocations.
    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize) -> Result<()> {
        let nb = blocks_per_row(k)?;
        if m == 0 {
            return Err(Error::EmptyDimension { what: "m" });
        }
        let expected = m.checked_mul(k).ok_or(Error::Overflow { what: "m * k" })?;
        if x.len() != expected {
            return Err(Error::LengthMismatch {
                what: "x (m * k)",
                expected,
                actual: x.len(),
                unit: "elements",
            });
        }
        let stride = nb.next_multiple_of(2);
        self.m = m;
        self.k = k;
        self.nb = nb;
        self.stride = stride;
        self.lines.clear();
        self.lines
            .resize(m * stride / 2, Line([[0; BLOCK_ELEMS]; 2]));
        self.d.clear();
        self.d.resize(m * stride, 0.0);
        self.ds.clear();
        self.ds.resize(m * stride, 0.0);

        for (row, xr) in x.chunks_exact(k).enumerate() {
            let lines = &mut self.lines[row * stride / 2..(row + 1) * stride / 2];
            let d = &mut self.d[row * stride..(row + 1) * stride];
            let ds = &mut self.ds[row * stride..(row + 1) * stride];
            for (b, xb) in xr.chunks_exact(BLOCK_ELEMS).enumerate() {
                let q = &mut lines[b / 2].0[b % 2];
                let (scale, sum) = quantize_block(xb, q);
                d[b] = scale;
                ds[b] = scale * sum as f32;
            }
        }
        Ok(())
    }

    /// Number of rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Elements per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `row`'s quants, scales and `d * sum(q)` per block (for inspection and tests).
    pub fn row(&self, row: usize) -> Option<(Vec<i8>, &[f32], &[f32])> {
        if row >= self.m {
            return None;
        }
        let view = self.view();
        let q: Vec<i8> = (0..self.nb).flat_map(|b| *view.block(row, b)).collect();
        let d = self.d.get(row * self.stride..row * self.stride + self.nb)?;
        let ds = self
            .ds
            .get(row * self.stride..row * self.stride + self.nb)?;
        Some((q, d, ds))
    }

    pub(crate) fn blocks(&self) -> usize {
        self.nb
    }

    pub(crate) fn view(&self) -> ActsView<'_> {
        ActsView {
            lines: &self.lines,
            d: &self.d,
            ds: &self.ds,
            stride: self.stride,
        }
    }
}

impl ActsView<'_> {
    /// The quants of block `b` of row `row` .
    #[inline]
    pub(crate) fn block(&self, row: usize, b: usize) -> &[i8; BLOCK_ELEMS] {
        let idx = row * self.stride + b;
        &self.lines[idx / 2].0[idx % 2]
    }

    /// Pointer to the quants of block `b` of row `row` (32-byte aligned).
    #[inline]
    pub(crate) fn block_ptr(&self, row: usize, b: usize) -> *const i8 {
        self.lines
            .as_ptr()
            .cast::<i8>()
            .wrapping_add((row * self.stride + b) * BLOCK_ELEMS)
    }
}

/// Quantizes one block of 32 floats; returns the scale and the sum of the quants.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0); the clamp keeps -128 out.
        let v = (xi * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        *qi = v;
        sum += i32::from(v);
    }
    (d, sum)
}
