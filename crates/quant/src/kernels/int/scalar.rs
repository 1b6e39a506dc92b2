//! The portable integer kernel: per block, an integer dot product of the activation
//! quants with the weight quants, scaled by both scales; int4 adds `min * d_x * sum(q_x)`.

use std::ops::Range;

use super::super::blocks::BLOCK_ELEMS;
use super::driver::{IntActs, check_range};
use super::{IntFormat, IntWeights};

/// See [`IntRangeFn`](super::driver::IntRangeFn).
pub(super) fn range(
    w: &IntWeights,
    a: &IntActs<'_>,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    if !check_range(w, a, &cols, out, ld, false) {
        debug_assert!(false, "integer kernel called out of bounds");
        return;
    }
    let view = &a.view;
    let (k, nb) = (w.k, a.nb);
    let groups = w.format.groups_per_row(k);
    for c in cols.clone() {
        for i in 0..a.m {
            let d = &view.d[i * view.stride..];
            let ds = &view.ds[i * view.stride..];
            let mut acc = 0f32;
            match w.format {
                IntFormat::Int8 => {
                    let q = &w.quants[c * k..(c + 1) * k];
                    for (b, qb) in q.chunks_exact(BLOCK_ELEMS).enumerate() {
                        let dot: i32 = qb
                            .iter()
                            .zip(view.block(i, b))
                            .map(|(&qw, &qx)| i32::from(qw as i8) * i32::from(qx))
                            .sum();
                        acc += d[b] * dot as f32;
                    }
                    acc *= w.scales[c];
                }
                IntFormat::Int4 { group, asymmetric } => {
                    let q = &w.quants[c * k / 2..(c + 1) * k / 2];
                    for (b, qb) in q.chunks_exact(BLOCK_ELEMS / 2).enumerate().take(nb) {
                        let (lo, hi) = view.block(i, b).split_at(BLOCK_ELEMS / 2);
                        let dot: i32 = qb
                            .iter()
                            .zip(lo.iter().zip(hi))
                            .map(|(&qw, (&xl, &xh))| {
                                i32::from(qw & 0x0F) * i32::from(xl)
                                    + i32::from(qw >> 4) * i32::from(xh)
                            })
                            .sum();
                        let g = c * groups + b * BLOCK_ELEMS / group;
                        let s = w.scales[g];
                        let m = if asymmetric { w.mins[g] } else { -8.0 * s };
                        acc += s * d[b] * dot as f32 + m * ds[b];
                    }
                }
            }
            out[i * ld + (c - cols.start)] = acc;
        }
    }
}
