//! Portable kernels: integer dot products per block in plain Rust.

use std::ops::Range;

use half::f16;

use super::acts::ActsView;
use super::blocks::{BLOCK_ELEMS, GgmlMatrix};
use super::driver::{F_Q4_1, F_Q8_0, check_range};

#[inline]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    match bytes.get(at..at + 2) {
        Some(&[a, b]) => f16::from_le_bytes([a, b]).to_f32(),
        _ => 0.0,
    }
}

/// Dot product of one weight block with one activation block, before scaling:
/// returns `(sum(q_w * q_x), d_w, min_w)` so that the block contributes
/// `d_w * d_x * dot + min_w * d_x * sum(q_x)`.
#[inline]
pub(super) fn block_dot<const F: u8>(blk: &[u8], x: &[i8; BLOCK_ELEMS]) -> (i32, f32, f32) {
    let d = f16_at(blk, 0);
    if F == F_Q8_0 {
        let qs = blk.get(2..).unwrap_or(&[]);
        let dot = qs
            .iter()
            .zip(x)
            .map(|(&q, &xv)| i32::from(q as i8) * i32::from(xv))
            .sum();
        return (dot, d, 0.0);
    }
    let (min, off) = if F == F_Q4_1 {
        (f16_at(blk, 2), 4)
    } else {
        (-8.0 * d, 2)
    };
    let qs = blk.get(off..).unwrap_or(&[]);
    let (lo, hi) = x.split_at(BLOCK_ELEMS / 2);
    let dot = qs
        .iter()
        .zip(lo.iter().zip(hi))
        .map(|(&q, (&xl, &xh))| {
            i32::from(q & 0x0F) * i32::from(xl) + i32::from(q >> 4) * i32::from(xh)
        })
        .sum();
    (dot, d, min)
}

/// See [`RangeFn`](super::driver::RangeFn).
pub(super) fn range<const F: u8>(
    w: GgmlMatrix<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if !check_range(&w, &a, m, &cols, out, ld) {
        debug_assert!(false, "kernel called out of bounds");
        return;
    }
    let rb = w.row_bytes();
    let bb = w.dtype().block_bytes();
    for c in cols.clone() {
        let row = &w.bytes()[c * rb..(c + 1) * rb];
        for r in 0..m {
            let mut acc = 0.0f32;
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let idx = r * a.stride + b;
                let (dot, d, min) = block_dot::<F>(blk, a.block(r, b));
                acc += d * a.d[idx] * dot as f32 + min * a.ds[idx];
            }
            out[r * ld + (c - cols.start)] = acc;
        }
    }
}
