//! Tests of the integer formats and of every integer kernel this machine can run.

use super::*;

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

const FORMATS: [IntFormat; 7] = [
    IntFormat::Int8,
    IntFormat::Int4 {
        group: 32,
        asymmetric: false,
    },
    IntFormat::Int4 {
        group: 64,
        asymmetric: false,
    },
    IntFormat::Int4 {
        group: 128,
        asymmetric: false,
    },
    IntFormat::Int4 {
        group: 32,
        asymmetric: true,
    },
    IntFormat::Int4 {
        group: 64,
        asymmetric: true,
    },
    IntFormat::Int4 {
        group: 128,
        asymmetric: true,
    },
];

#[test]
fn names_round_trip() {
    for f in FORMATS {
        assert_eq!(f.to_string().parse::<IntFormat>().unwrap(), f);
    }
    assert_eq!("int4".parse::<IntFormat>().unwrap(), FORMATS[1]);
    assert!("int4-g48".parse::<IntFormat>().is_err());
    assert!("int3".parse::<IntFormat>().is_err());
}

#[test]
fn dequantized_weights_are_within_half_a_step() {
    let (n, k) = (5, 256);
    let w = seeded(n * k, 7);
    for f in FORMATS {
        let q = IntWeights::quantize(f, &w, n, k).unwrap();
        assert_eq!(q.bytes(), f.matrix_bytes(n, k));
        let back = q.dequantize();
        let group = match f {
            IntFormat::Int8 => k,
            IntFormat::Int4 { group, .. } => group,
        };
        for (g, (a, b)) in w.chunks(group).zip(back.chunks(group)).enumerate() {
            let scale = q.scales()[g];
            for (x, y) in a.iter().zip(b) {
                // Half a step (the symmetric int4 top, +7.5 steps, clamps to 7:
                // also half a step).
                let bound = 0.5 * scale * (1.0 + 1e-5) + 1e-7;
                assert!((x - y).abs() <= bound, "{f}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn scalar_gemm_matches_dequantize_then_matmul() {
    for (m, n, k) in [(1, 3, 32), (3, 7, 128), (5, 4, 256)] {
        let w = seeded(n * k, 3);
        let x = seeded(m * k, 11);
        let acts = QuantizedActs::quantize(&x, m, k).unwrap();
        for f in FORMATS {
            if f.validate().is_err()
                || !k.is_multiple_of(match f {
                    IntFormat::Int8 => 32,
                    IntFormat::Int4 { group, .. } => group,
                })
            {
                continue;
            }
            let q = IntWeights::quantize(f, &w, n, k).unwrap();
            let wd = q.dequantize();
            let mut y = vec![0f32; m * n];
            gemm_int_with(Kernel::Scalar, &q, &acts, &mut y).unwrap();
            for i in 0..m {
                for r in 0..n {
                    let exact: f32 = (0..k).map(|c| x[i * k + c] * wd[r * k + c]).sum();
                    // Activation rounding: at most max|x_block| / 254 per element.
                    let bound: f32 = (0..k / 32)
                        .map(|b| {
                            let xb = &x[i * k + b * 32..i * k + b * 32 + 32];
                            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                            let wsum: f32 = wd[r * k + b * 32..r * k + b * 32 + 32]
                                .iter()
                                .map(|v| v.abs())
                                .sum();
                            amax / 254.0 * wsum
                        })
                        .sum::<f32>()
                        + 1e-4;
                    let got = y[i * n + r];
                    assert!(
                        (got - exact).abs() <= bound,
                        "{f} m{m} n{n} k{k}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let w = vec![0.5f32; 2 * 96];
    let g64 = IntFormat::Int4 {
        group: 64,
        asymmetric: false,
    };
    assert!(matches!(
        IntWeights::quantize(g64, &w, 2, 96),
        Err(Error::GroupDoesNotDivide { k: 96, group: 64 })
    ));
    assert!(matches!(
        IntWeights::quantize(IntFormat::Int8, &w[..2 * 40], 2, 40),
        Err(Error::KNotMultipleOfBlock { .. })
    ));
    assert!(matches!(
        IntWeights::quantize(
            IntFormat::Int4 {
                group: 48,
                asymmetric: false
            },
            &w,
            2,
            96
        ),
        Err(Error::InvalidGroup { group: 48 })
    ));
    let mut nan = w.clone();
    nan[100] = f32::NAN;
    assert!(matches!(
        IntWeights::quantize(IntFormat::Int8, &nan, 2, 96),
        Err(Error::NonFinite { row: 1, col: 4 })
    ));
    let q = IntWeights::quantize(IntFormat::Int8, &w, 2, 96).unwrap();
    assert!(
        IntWeights::from_parts(
            IntFormat::Int8,
            2,
            96,
            q.quants().unwrap().to_vec(),
            vec![1.0],
            vec![]
        )
        .is_err()
    );
    assert_eq!(
        IntWeights::from_parts(
            IntFormat::Int8,
            2,
            96,
            q.quants().unwrap().to_vec(),
            q.scales().to_vec(),
            vec![]
        )
        .unwrap(),
        q
    );
}

#[test]
fn zero_rows_decode_to_zero() {
    let w = vec![0f32; 64];
    for f in [FORMATS[0], FORMATS[1], FORMATS[4]] {
        let q = IntWeights::quantize(f, &w, 1, 64).unwrap();
        assert!(q.dequantize().iter().all(|&v| v == 0.0), "{f}");
    }
}

// Kernel tests.
//
// Error bound for kernel results against `x · Wᵀ` computed in f64 from the stored parts
// (`W` decoded independently of `IntWeights::dequantize`, from the layout in the
// module docs): the weights are exact, each activation element is off by at most half
// a quantization step (`max|x_block| / 254`), so
// `|y - y_exact| <= sum_b max|x_b| / 254 * sum_{i in b} |w_i|`, plus f32 rounding,
// allowed as `1e-4 * sum_i (|s q_i| + |min|) |x_i| + 1e-6` (the int4 terms before they
// cancel, so that an asymmetric minimum that nearly cancels its codes is covered).

use crate::kernels::available_kernels;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) plus `shift`, with an occasional outlier (x 8).
    fn f32(&mut self, shift: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        let u = if self.next_u64().is_multiple_of(97) {
            u * 8.0
        } else {
            u
        };
        u + shift
    }

    fn vec(&mut self, n: usize, shift: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(shift)).collect()
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn group_of(f: IntFormat, k: usize) -> usize {
    match f {
        IntFormat::Int8 => k,
        IntFormat::Int4 { group, .. } => group,
    }
}

/// The weights in f64 from the stored parts, as `(value, |scale * code| + |min|)` per
/// element: int8 `s_r * q`, int4 `s_g * nibble + min_g` (`min_g = -8 s_g` when
/// symmetric), nibbles in GGML order.
fn decode_f64(q: &IntWeights) -> Vec<(f64, f64)> {
    let (n, k, f) = (q.n_out(), q.k(), q.format());
    let quants = q.quants().unwrap();
    let mut out = Vec::with_capacity(n * k);
    for r in 0..n {
        for c in 0..k {
            out.push(match f {
                IntFormat::Int8 => {
                    let v = f64::from(q.scales()[r]) * f64::from(quants[r * k + c] as i8);
                    (v, v.abs())
                }
                IntFormat::Int4 { group, asymmetric } => {
                    let (b, j) = (c / 32, c % 32);
                    let byte = quants[r * k / 2 + b * 16 + j % 16];
                    let code = if j < 16 { byte & 0x0F } else { byte >> 4 };
                    let g = r * (k / group) + c / group;
                    let s = f64::from(q.scales()[g]);
                    let m = if asymmetric {
                        f64::from(q.mins()[g])
                    } else {
                        -8.0 * s
                    };
                    let sq = s * f64::from(code);
                    (sq + m, sq.abs() + m.abs())
                }
            });
        }
    }
    out
}

/// `(exact, bound, slack)` per output, row-major `m x n_out`.
fn reference(
    w: &[(f64, f64)],
    x: &[f32],
    m: usize,
    n_out: usize,
    k: usize,
) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(m * n_out);
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        let amax: Vec<f64> = xr
            .chunks(32)
            .map(|b| b.iter().fold(0.0f64, |a, v| a.max(f64::from(v.abs()))))
            .collect();
        for r in 0..n_out {
            let wr = &w[r * k..(r + 1) * k];
            let (mut exact, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
            for c in 0..k {
                let ((wv, wmag), xv) = (wr[c], f64::from(xr[c]));
                exact += wv * xv;
                bound += amax[c / 32] / 254.0 * wv.abs();
                mag += wmag * xv.abs();
            }
            out.push((exact, bound, 1e-4 * mag + 1e-6));
        }
    }
    out
}

#[test]
fn every_kernel_matches_reference_and_scalar() {
    crate::kernels::report_kernel_coverage("every_kernel_matches_reference_and_scalar");
    let kernels = available_kernels();
    assert_eq!(kernels[0], Kernel::Scalar);
    assert!(kernels.contains(&Kernel::detect()));
    let pool = pool(2);
    let mut rng = Rng(42);
    let mut checked = 0usize;
    let ms: Vec<usize> = (1..=9).chain([17]).collect();
    for (fi, f) in FORMATS.into_iter().enumerate() {
        for k in [32usize, 64, 96, 128, 384, 4096 + 128] {
            if !k.is_multiple_of(group_of(f, k)) {
                continue;
            }
            for n_out in [1, 2, 3, 8, 33, 257] {
                // Shifted weights give asymmetric groups a minimum far from zero.
                let shift = if fi % 2 == 0 { 0.5 } else { 0.0 };
                let q = IntWeights::quantize(f, &rng.vec(n_out * k, shift), n_out, k).unwrap();
                let wd = decode_f64(&q);
                for (ours, (theirs, _)) in q.dequantize().iter().zip(&wd) {
                    assert!((f64::from(*ours) - theirs).abs() <= 1e-6 * theirs.abs().max(1.0));
                }
                for &m in &ms {
                    if k > 1000 && n_out > 33 && m > 3 && m != 17 {
                        continue; // the largest shapes: m = 1, 2, 3 and 17 suffice
                    }
                    let x = rng.vec(m * k, 0.0);
                    let refs = reference(&wd, &x, m, n_out, k);
                    let acts = QuantizedActs::quantize(&x, m, k).unwrap();
                    let mut scalar = vec![f32::NAN; m * n_out];
                    gemm_int_with(Kernel::Scalar, &q, &acts, &mut scalar).unwrap();
                    for &kernel in &kernels {
                        let mut y = vec![f32::NAN; m * n_out];
                        pool.install(|| gemm_int_with(kernel, &q, &acts, &mut y))
                            .unwrap();
                        for (i, ((&got, &(exact, bound, slack)), &s)) in
                            y.iter().zip(&refs).zip(&scalar).enumerate()
                        {
                            let what = format!("{kernel} {f} m={m} n_out={n_out} k={k} [{i}]");
                            let err = (f64::from(got) - exact).abs();
                            assert!(
                                err <= bound + slack,
                                "{what}: {got} vs exact {exact}, error {err} > {bound} + {slack}"
                            );
                            let vs_scalar = (f64::from(got) - f64::from(s)).abs();
                            assert!(vs_scalar <= slack, "{what}: {got} vs scalar {s}");
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 100_000, "{checked}");
}

/// A prompt's sixteen-column AVX-512 VNNI panels compute every column bit for bit as
/// the AVX2 eight-column panels do, for every integer format (int8 at the largest
/// codes, -128 and 127, included), with widths that leave eight-column panels and tile
/// columns after the last sixteen (those past the last panel run the tiles).
#[test]
fn vnni_panels_equal_avx2_panels_bit_for_bit() {
    if !Kernel::Avx512Vnni.is_available() {
        println!(
            "vnni_panels_equal_avx2_panels_bit_for_bit (int): NOT TESTED on this CPU (it \
             lacks AVX-512 VNNI)"
        );
        return;
    }
    let mut rng = Rng(17);
    let mut compared = 0usize;
    for f in FORMATS {
        for (n_out, k) in [(16usize, 128usize), (24, 256), (40, 384), (57, 1536)] {
            if !k.is_multiple_of(group_of(f, k)) {
                continue;
            }
            let mut q = IntWeights::quantize(f, &rng.vec(n_out * k, 0.3), n_out, k).unwrap();
            if f == IntFormat::Int8 {
                // The extreme codes: every weight -128 or 127.
                for (i, v) in q.quants.iter_mut().enumerate() {
                    *v = if i % 3 == 0 { 0x80 } else { 0x7F };
                }
            }
            for m in (4..=13).chain([64, 67]) {
                let x = rng.vec(m * k, 0.0);
                let acts = QuantizedActs::quantize(&x, m, k).unwrap();
                let run = |kernel, threads| {
                    let mut y = vec![f32::NAN; m * n_out];
                    pool(threads)
                        .install(|| gemm_int_with(kernel, &q, &acts, &mut y))
                        .unwrap();
                    y
                };
                let avx2 = run(Kernel::Avx2, 1);
                for threads in [1, 2] {
                    let vnni = run(Kernel::Avx512Vnni, threads);
                    for (i, (a, v)) in avx2.iter().zip(&vnni).enumerate() {
                        if i % n_out >= n_out / 8 * 8 {
                            continue; // past the last panel: each kernel's own tiles
                        }
                        assert_eq!(
                            a.to_bits(),
                            v.to_bits(),
                            "{f} m={m} n_out={n_out} k={k} threads={threads} [{i}]: avx2 {a} \
                             vs vnni {v}"
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 50_000, "{compared}");
}

#[test]
fn thread_count_does_not_change_results() {
    let (one, two) = (pool(1), pool(2));
    let mut rng = Rng(5);
    // Large enough to be split (m * n_out * k >= 2^18, n_out >= 32), with an odd
    // n_out and, for m > 1, a partial last tile of rows; m = 67 splits rows, not
    // columns, with columns past the last packed panel.
    for (m, n_out, k) in [
        (1, 257, 4096 + 128),
        (1, 1000, 384),
        (6, 257, 384),
        (17, 99, 256),
        // A prompt: output rows split across threads, blocks with a partial tile.
        (67, 45, 384),
    ] {
        let x = rng.vec(m * k, 0.0);
        let acts = QuantizedActs::quantize(&x, m, k).unwrap();
        for f in FORMATS {
            if !k.is_multiple_of(group_of(f, k)) {
                continue;
            }
            let q = IntWeights::quantize(f, &rng.vec(n_out * k, 0.1), n_out, k).unwrap();
            for kernel in available_kernels() {
                let mut y1 = vec![f32::NAN; m * n_out];
                let mut y2 = vec![f32::NAN; m * n_out];
                one.install(|| gemm_int_with(kernel, &q, &acts, &mut y1))
                    .unwrap();
                two.install(|| gemm_int_with(kernel, &q, &acts, &mut y2))
                    .unwrap();
                let same = y1.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{kernel} {f} m={m} n_out={n_out} k={k}");
            }
        }
    }
}

#[test]
fn extreme_codes_do_not_saturate() {
    // Every activation quant is +-127 and every weight code at its extreme: int8 bytes
    // -128 and 127 (only `from_parts` can store -128), nibbles 0 and 15. The pair sums of
    // `maddubs` reach 2 * 128 * 127 = 32,512 without saturating.
    let (n_out, k, m) = (3, 96, 5);
    let x: Vec<f32> = (0..m * k)
        .map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let acts = QuantizedActs::quantize(&x, m, k).unwrap();
    let int8: Vec<u8> = (0..n_out * k)
        .map(|i| if (i / 5) % 3 == 0 { 0x7F } else { 0x80 })
        .collect();
    let nib: Vec<u8> = (0..n_out * k / 2)
        .map(|i| [0xFF, 0x00, 0x0F, 0xF0][i % 4])
        .collect();
    let parts = [
        (IntFormat::Int8, int8, vec![0.5; n_out], vec![]),
        (FORMATS[1], nib.clone(), vec![0.25; n_out * 3], vec![]),
        (
            FORMATS[4],
            nib,
            vec![0.25; n_out * 3],
            vec![-1.0; n_out * 3],
        ),
    ];
    for (f, quants, scales, mins) in parts {
        let q = IntWeights::from_parts(f, n_out, k, quants, scales, mins).unwrap();
        let wd = decode_f64(&q);
        for kernel in available_kernels() {
            let mut y = vec![f32::NAN; m * n_out];
            gemm_int_with(kernel, &q, &acts, &mut y).unwrap();
            for (i, got) in y.iter().enumerate() {
                let (row, col) = (i / n_out, i % n_out);
                let exact: f64 = (0..k)
                    .map(|c| wd[col * k + c].0 * f64::from(x[row * k + c]))
                    .sum();
                assert!(
                    (f64::from(*got) - exact).abs() <= 1e-5 * exact.abs().max(1.0),
                    "{kernel} {f} [{i}]: {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn zero_activations_give_zero() {
    let mut rng = Rng(8);
    let acts = QuantizedActs::quantize(&[0.0; 3 * 128], 3, 128).unwrap();
    for f in FORMATS {
        let q = IntWeights::quantize(f, &rng.vec(5 * 128, 0.3), 5, 128).unwrap();
        for kernel in available_kernels() {
            let mut y = vec![1.0f32; 15];
            gemm_int_with(kernel, &q, &acts, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{kernel} {f}: {y:?}");
        }
    }
}

#[test]
fn gemm_int_uses_the_detected_kernel() {
    let mut rng = Rng(10);
    let acts = QuantizedActs::quantize(&rng.vec(4 * 256, 0.0), 4, 256).unwrap();
    for f in FORMATS {
        let q = IntWeights::quantize(f, &rng.vec(9 * 256, 0.0), 9, 256).unwrap();
        let mut y1 = vec![0.0f32; 36];
        let mut y2 = vec![0.0f32; 36];
        gemm_int(&q, &acts, &mut y1).unwrap();
        gemm_int_with(Kernel::detect(), &q, &acts, &mut y2).unwrap();
        assert_eq!(y1, y2, "{f}");
    }
}

#[test]
fn kernel_errors_not_panics() {
    let mut rng = Rng(12);
    let q = IntWeights::quantize(FORMATS[5], &rng.vec(4 * 128, 0.0), 4, 128).unwrap();
    let acts = QuantizedActs::quantize(&rng.vec(2 * 128, 0.0), 2, 128).unwrap();
    // Activations for another k.
    let other = QuantizedActs::quantize(&rng.vec(2 * 96, 0.0), 2, 96).unwrap();
    let mut y = vec![0.0f32; 8];
    assert!(matches!(
        gemm_int(&q, &other, &mut y),
        Err(Error::IntInnerDimensionMismatch {
            acts_k: 96,
            weights_k: 128
        })
    ));
    assert!(matches!(
        gemm_int(&q, &QuantizedActs::new(), &mut y),
        Err(Error::IntInnerDimensionMismatch { acts_k: 0, .. })
    ));
    // Wrong y lengths.
    for len in [0, 7, 9] {
        let mut y = vec![0.0f32; len];
        assert!(matches!(
            gemm_int(&q, &acts, &mut y),
            Err(Error::LengthMismatch {
                expected: 8,
                actual,
                ..
            }) if actual == len
        ));
    }
    // Kernels the CPU lacks.
    for kernel in Kernel::ALL {
        let r = gemm_int_with(kernel, &q, &acts, &mut y);
        if kernel.is_available() {
            assert!(r.is_ok(), "{kernel}");
        } else {
            assert!(
                matches!(r, Err(Error::KernelUnavailable { kernel: k }) if k == kernel),
                "{kernel}"
            );
        }
    }
}

#[test]
fn decode_of_large_matrices_matches_reference() {
    // Over 1 MiB of quants: one activation row streams the weight rows one at a time
    // (smaller matrices use tiles of four rows); odd block counts (k = 4128) reach the
    // loops' tails.
    let (one, two) = (pool(1), pool(2));
    let mut rng = Rng(77);
    for f in FORMATS {
        let k = if group_of(f, 4128) == 32 || f == IntFormat::Int8 {
            4128
        } else {
            4224
        };
        let n_out = 520;
        assert!(n_out * f.quant_bytes_per_row(k) > 1 << 20);
        let q = IntWeights::quantize(f, &rng.vec(n_out * k, 0.2), n_out, k).unwrap();
        let wd = decode_f64(&q);
        let x = rng.vec(k, 0.0);
        let refs = reference(&wd, &x, 1, n_out, k);
        let acts = QuantizedActs::quantize(&x, 1, k).unwrap();
        let mut scalar = vec![f32::NAN; n_out];
        gemm_int_with(Kernel::Scalar, &q, &acts, &mut scalar).unwrap();
        for kernel in available_kernels() {
            let mut y1 = vec![f32::NAN; n_out];
            let mut y2 = vec![f32::NAN; n_out];
            one.install(|| gemm_int_with(kernel, &q, &acts, &mut y1))
                .unwrap();
            two.install(|| gemm_int_with(kernel, &q, &acts, &mut y2))
                .unwrap();
            assert!(y1.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()));
            for (i, ((&got, &(exact, bound, slack)), &s)) in
                y1.iter().zip(&refs).zip(&scalar).enumerate()
            {
                let err = (f64::from(got) - exact).abs();
                assert!(err <= bound + slack, "{kernel} {f} [{i}]: {got} vs {exact}");
                assert!(
                    (f64::from(got) - f64::from(s)).abs() <= slack,
                    "{kernel} {f} [{i}]"
                );
            }
        }
    }
}

/// Int8 weights in panels of sixteen rows: the same quants back row-major and the same
/// dequantized rows; only AVX-512 VNNI gets and reads them. Its kernel against the
/// exact product and the scalar kernel on the row-major weights, for one row (decode),
/// batches and prompts, on one to three threads (the same bits); each row of a batch
/// equals that row alone bit for bit; and the extreme codes (-128, 127) do not
/// overflow.
#[test]
fn int8_panels_match_reference_and_each_row_alone() {
    let mut rng = Rng(77);
    let vnni = Kernel::Avx512Vnni.is_available();
    if !vnni {
        println!(
            "int8_panels_match_reference_and_each_row_alone: the panel kernel NOT TESTED on \
             this CPU (it lacks AVX-512 VNNI); the layout is"
        );
    }
    let mut checked = 0usize;
    for (n_out, k) in [(16, 32), (32, 64), (192, 576), (576, 1536), (48, 4096 + 32)] {
        let rows =
            IntWeights::quantize(IntFormat::Int8, &rng.vec(n_out * k, 0.0), n_out, k).unwrap();
        let panels = rows.clone().for_kernel(Kernel::Avx512Vnni).unwrap();
        assert!(panels.in_panels() && !rows.in_panels());
        assert_eq!(panels.bytes(), rows.bytes());
        assert_eq!(panels.quants().unwrap(), rows.quants().unwrap());
        assert_eq!(panels.dequantize(), rows.dequantize());
        for kernel in [Kernel::Scalar, Kernel::Avx2] {
            assert!(!rows.clone().for_kernel(kernel).unwrap().in_panels());
        }
        let wd = decode_f64(&rows);
        for m in [1, 2, 3, 5, 8, 9, 17, 64] {
            let x = rng.vec(m * k, 0.0);
            let mut acts = QuantizedActs::quantize(&x, m, k).unwrap();
            let mut y = vec![f32::NAN; m * n_out];
            for kernel in [Kernel::Scalar, Kernel::Avx2] {
                assert!(matches!(
                    gemm_int_with(kernel, &panels, &acts, &mut y),
                    Err(Error::PanelsUnreadable { .. } | Error::KernelUnavailable { .. })
                ));
            }
            if !vnni {
                continue;
            }
            let refs = reference(&wd, &x, m, n_out, k);
            let mut scalar = vec![0.0f32; m * n_out];
            gemm_int_with(Kernel::Scalar, &rows, &acts, &mut scalar).unwrap();
            let run = |acts: &QuantizedActs, threads| {
                let mut y = vec![f32::NAN; acts.m() * n_out];
                pool(threads)
                    .install(|| gemm_int_with(Kernel::Avx512Vnni, &panels, acts, &mut y))
                    .unwrap();
                y
            };
            let what = format!("int8 m={m} n_out={n_out} k={k}");
            let (y, n) = crate::kernels::tests::check_panel_batch(
                &what, &x, n_out, &mut acts, &refs, &scalar, run,
            );
            checked += n;
            // The q/k/v path: several matrices over the same rows in one parallel
            // region (a prompt's rows: one after another), on two threads.
            let mut y2 = vec![f32::NAN; m * n_out];
            let mut y3 = vec![f32::NAN; m * n_out];
            let mut items = [(&panels, &mut y2[..]), (&panels, &mut y3[..])];
            pool(2)
                .install(|| crate::kernels::gemm_int_many(&mut items, &acts))
                .unwrap();
            assert!(
                y2.iter()
                    .chain(&y3)
                    .zip(y.iter().chain(&y))
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: q/k/v in one call"
            );
        }
    }
    // Extreme codes: -128 (only from_parts stores it) and 127 against activations at +-1.
    let (n_out, k) = (32, 1536);
    let codes: Vec<u8> = (0..n_out * k)
        .map(|i| if (i / 5) % 3 == 0 { 0x7F } else { 0x80 })
        .collect();
    let q =
        IntWeights::from_parts(IntFormat::Int8, n_out, k, codes, vec![0.5; n_out], vec![]).unwrap();
    let panels = q.clone().for_kernel(Kernel::Avx512Vnni).unwrap();
    if vnni {
        for m in [1, 9] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let acts = QuantizedActs::quantize(&x, m, k).unwrap();
            let mut scalar = vec![0.0f32; m * n_out];
            gemm_int_with(Kernel::Scalar, &q, &acts, &mut scalar).unwrap();
            let mut y = vec![f32::NAN; m * n_out];
            gemm_int_with(Kernel::Avx512Vnni, &panels, &acts, &mut y).unwrap();
            for (i, (got, s)) in y.iter().zip(&scalar).enumerate() {
                assert!(
                    (got - s).abs() <= 1e-5 * s.abs() + 1e-3,
                    "extreme m={m} [{i}]: {got} vs scalar {s}"
                );
            }
        }
        assert!(checked > 30_000, "{checked}");
    }
}
