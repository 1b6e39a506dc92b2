//! Tests of the block layouts and of every kernel this machine can run.
//!
//! Error bound used for kernel results against `x · dequantize(W)ᵀ` computed in f64:
//! the weights are exact, each activation element is off by at most half a
//! quantization step (`max|x_block| / 254`), so
//! `|y - y_exact| <= sum_b max|x_b| / 254 * sum_{i in b} |w_i|`, plus f32 rounding,
//! allowed as `1e-4 * sum |w_i x_i| + 1e-6`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::*;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), with an occasional outlier (x 8) as in real activations.
    fn f32(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if self.next_u64().is_multiple_of(97) {
            u * 8.0
        } else {
            u
        }
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn qtensor(dtype: WeightDType, n_out: usize, k: usize, seed: u64) -> QTensor {
    let mut rng = Rng(seed);
    let data = rng.vec(n_out * k);
    let t = Tensor::from_vec(data, (n_out, k), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype.to_ggml()).unwrap()
}

/// `(exact, bound, sum |w x|)` per output.
fn reference(wd: &[f32], x: &[f32], m: usize, n_out: usize, k: usize) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(m * n_out);
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let amax: Vec<f64> = xr
            .chunks(32)
            .map(|b| b.iter().fold(0.0f64, |a, v| a.max(f64::from(v.abs()))))
            .collect();
        for c in 0..n_out {
            let wr = &wd[c * k..(c + 1) * k];
            let (mut exact, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
            for i in 0..k {
                let (w, xv) = (f64::from(wr[i]), f64::from(xr[i]));
                exact += w * xv;
                mag += (w * xv).abs();
                bound += amax[i / 32] / 254.0 * w.abs();
            }
            out.push((exact, bound, mag));
        }
    }
    out
}

/// A rayon pool of `threads` threads (also the team's tests').
pub(crate) fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

#[test]
fn layouts_match_candle_dequantize() {
    for dtype in WeightDType::ALL {
        for (n_out, k) in [(1, 32), (3, 64), (17, 576), (5, 4128)] {
            let qt = qtensor(dtype, n_out, k, 7 + k as u64);
            let w = GgmlWeights::from_qtensor(&qt).unwrap();
            assert_eq!(w.bytes().len(), n_out * k / 32 * dtype.block_bytes());
            let ours = w.dequantize().unwrap();
            let theirs: Vec<f32> = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{dtype} {n_out}x{k} element {i}: ours {a}, candle {b}"
                );
            }
        }
    }
}

#[test]
fn q8_0_rows_round_trip_within_half_a_step_and_read_as_ggml_blocks() {
    let mut rng = Rng(41);
    let mut x = rng.vec(4 * 32);
    x[5] = 0.0;
    x[40] = f32::NAN; // quantizes to 0
    x[64..96].fill(0.0); // an all-zero block: scale 0, quants 0
    let mut bytes = vec![0u8; 4 * 34];
    quantize_q8_0(&x, &mut bytes).unwrap();
    let mut back = vec![0.0f32; x.len()];
    dequantize_q8_0(&bytes, &mut back).unwrap();
    for (b, xb) in x.chunks(32).enumerate() {
        let amax = xb
            .iter()
            .filter(|v| !v.is_nan())
            .fold(0.0f32, |a, v| a.max(v.abs()));
        // Half a quantization step, plus the f16 rounding of the scale times 127.
        let bound = amax / 254.0 + amax * 2f32.powi(-11) + 1e-7;
        for j in 0..32 {
            let (i, got) = (b * 32 + j, back[b * 32 + j]);
            let want = if x[i].is_nan() { 0.0 } else { x[i] };
            assert!((got - want).abs() <= bound, "element {i}: {got} vs {want}");
        }
    }
    assert!(back[64..96].iter().all(|v| *v == 0.0));
    // The bytes are GGML Q8_0 blocks: the block decoder reads them the same.
    let mut one = [0.0f32; BLOCK_ELEMS];
    WeightDType::Q8_0
        .dequantize_block(&bytes[34..68], &mut one)
        .unwrap();
    assert_eq!(&one[..], &back[32..64]);
    // Wrong lengths are errors.
    assert!(quantize_q8_0(&x[..31], &mut bytes[..34]).is_err());
    assert!(quantize_q8_0(&x, &mut bytes[..100]).is_err());
    assert!(dequantize_q8_0(&bytes[..33], &mut back[..32]).is_err());
    assert!(dequantize_q8_0(&bytes, &mut back[..31]).is_err());
}

#[test]
fn q4_1_nibble_order() {
    // d = 1, m = 0; byte j = j (low nibble) | (15 - j) << 4 (high nibble).
    let mut block = vec![0x00, 0x3c, 0x00, 0x00];
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut out = [0.0f32; 32];
    WeightDType::Q4_1
        .dequantize_block(&block, &mut out)
        .unwrap();
    for j in 0..16 {
        assert_eq!(out[j], j as f32);
        assert_eq!(out[j + 16], (15 - j) as f32);
    }
}

#[test]
fn activation_quantization() {
    let mut rng = Rng(3);
    let x = rng.vec(2 * 96);
    let acts = QuantizedActs::quantize(&x, 2, 96).unwrap();
    for r in 0..2 {
        let (q, d, ds) = acts.row(r).unwrap();
        assert_eq!(q.len(), 96);
        for b in 0..3 {
            let xb = &x[r * 96 + b * 32..r * 96 + (b + 1) * 32];
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert!((d[b] - amax / 127.0).abs() <= 1e-7 * amax);
            let qb = &q[b * 32..(b + 1) * 32];
            assert!(qb.iter().all(|&v| v != -128));
            let sum: i32 = qb.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(ds[b], d[b] * sum as f32);
            for (xi, qi) in xb.iter().zip(qb) {
                assert!((xi - d[b] * f32::from(*qi)).abs() <= d[b] / 2.0 * 1.0001);
            }
        }
    }
    assert!(acts.row(2).is_none());
}

#[test]
fn every_kernel_matches_reference_and_candle() {
    crate::kernels::report_kernel_coverage("every_kernel_matches_reference_and_candle");
    let kernels = available_kernels();
    assert_eq!(kernels[0], Kernel::Scalar);
    assert!(kernels.contains(&Kernel::detect()));
    let pool = pool(3);
    let mut rng = Rng(42);
    let mut checked = 0usize;
    for dtype in WeightDType::ALL {
        for k in [32, 64, 576, 1536, 4096 + 32] {
            for n_out in [1, 3, 17, 192, 576] {
                let qt = qtensor(dtype, n_out, k, (k * 1000 + n_out) as u64);
                let w = GgmlWeights::from_qtensor(&qt).unwrap();
                let wd = w.dequantize().unwrap();
                let qmm = QMatMul::from_qtensor(qt).unwrap();
                for m in [1, 2, 3, 5, 6, 7, 8, 17] {
                    let x = rng.vec(m * k);
                    let refs = reference(&wd, &x, m, n_out, k);
                    let acts = QuantizedActs::quantize(&x, m, k).unwrap();
                    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                    // candle's Q4_1 dot product needs an even block count (it asserts).
                    let candle_ok = dtype != WeightDType::Q4_1 || (k / 32) % 2 == 0;
                    let candle: Vec<f32> = if candle_ok {
                        qmm.forward(&xt)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    } else {
                        vec![f32::NAN; m * n_out]
                    };
                    let mut scalar = vec![0.0f32; m * n_out];
                    gemm_with(Kernel::Scalar, w.matrix(), &acts, &mut scalar).unwrap();
                    for &kernel in &kernels {
                        let mut y = vec![f32::NAN; m * n_out];
                        pool.install(|| gemm_with(kernel, w.matrix(), &acts, &mut y))
                            .unwrap();
                        for (i, ((&got, &(exact, bound, mag)), (&s, &c))) in y
                            .iter()
                            .zip(&refs)
                            .zip(scalar.iter().zip(&candle))
                            .enumerate()
                        {
                            let what = format!("{kernel} {dtype} m={m} n_out={n_out} k={k} [{i}]");
                            let slack = 1e-4 * mag + 1e-6;
                            let err = (f64::from(got) - exact).abs();
                            assert!(
                                err <= bound + slack,
                                "{what}: {got} vs exact {exact}, error {err} > bound {bound}"
                            );
                            let vs_scalar = (f64::from(got) - f64::from(s)).abs();
                            assert!(vs_scalar <= slack, "{what}: {got} vs scalar {s}");
                            // candle's activations carry f16 scales: allow 1e-3 relative more.
                            let vs_candle = (f64::from(got) - f64::from(c)).abs();
                            assert!(
                                !candle_ok || vs_candle <= 2.0 * bound + 2e-3 * mag + 1e-5,
                                "{what}: {got} vs candle {c}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 100_000);
}

/// A matrix of the largest quants a file can hold: scale 0.5, Q8_0 quants -128 and 127
/// in alternate blocks, Q4 nibbles all 15 (and for Q4_1 a minimum of 0).
fn extreme_weights(dtype: WeightDType, n_out: usize, k: usize) -> GgmlWeights {
    let bb = dtype.block_bytes();
    let mut bytes = Vec::new();
    for c in 0..n_out {
        for b in 0..k / 32 {
            let mut blk = vec![0u8; bb];
            blk[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
            let q = match dtype {
                WeightDType::Q8_0 if (c + b) % 2 == 0 => 0x80, // -128
                WeightDType::Q8_0 => 0x7F,
                _ => 0xFF, // nibbles 15 and 15
            };
            let off = bb - if dtype == WeightDType::Q8_0 { 32 } else { 16 };
            blk[off..].iter_mut().for_each(|v| *v = q);
            bytes.extend(blk);
        }
    }
    GgmlWeights::new(dtype, n_out, k, bytes).unwrap()
}

/// The largest quants a file can hold (Q8_0 -128 and 127, Q4 nibble 15) against
/// activations at +-127: no 16-bit lane saturates in any kernel, for one row and for
/// the packed rows of a prompt.
#[test]
fn extreme_quants_do_not_saturate() {
    crate::kernels::report_kernel_coverage("extreme_quants_do_not_saturate");
    let k = 1536;
    let n_out = 19;
    for dtype in WeightDType::ALL {
        let w = extreme_weights(dtype, n_out, k);
        for m in [1, 9] {
            // Every activation at +-1: quantized to +-127 with scale 1/127.
            let x: Vec<f32> = (0..m * k)
                .map(|i| if (i / 32) % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let acts = QuantizedActs::quantize(&x, m, k).unwrap();
            let mut scalar = vec![0.0f32; m * n_out];
            gemm_with(Kernel::Scalar, w.matrix(), &acts, &mut scalar).unwrap();
            let wd = w.dequantize().unwrap();
            let refs = reference(&wd, &x, m, n_out, k);
            for (s, (exact, _, mag)) in scalar.iter().zip(&refs) {
                assert!(
                    (f64::from(*s) - exact).abs() <= 1e-4 * mag + 1e-3,
                    "scalar {dtype}: {s} vs {exact}"
                );
            }
            for kernel in available_kernels() {
                let mut y = vec![f32::NAN; m * n_out];
                gemm_with(kernel, w.matrix(), &acts, &mut y).unwrap();
                for (i, (got, s)) in y.iter().zip(&scalar).enumerate() {
                    assert!(
                        (got - s).abs() <= 1e-5 * s.abs() + 1e-3,
                        "{kernel} {dtype} m={m} [{i}]: {got} vs scalar {s}"
                    );
                }
            }
        }
    }
}

/// Decode, batches and prompts (where output rows, not columns, are split across
/// threads) give the same bits on one, two or three threads, and a prompt's rows equal
/// the same rows computed in a smaller batch through the same kernel path.
#[test]
fn ggml_results_do_not_depend_on_the_thread_count() {
    crate::kernels::report_kernel_coverage("ggml_results_do_not_depend_on_the_thread_count");
    let (n_out, k) = (203, 576);
    let mut rng = Rng(7);
    for dtype in WeightDType::ALL {
        let w = GgmlWeights::from_qtensor(&qtensor(dtype, n_out, k, 11)).unwrap();
        for m in [1, 5, 64, 67, 130] {
            let x = rng.vec(m * k);
            let acts = QuantizedActs::quantize(&x, m, k).unwrap();
            for kernel in available_kernels() {
                let run = |threads| {
                    let mut y = vec![f32::NAN; m * n_out];
                    pool(threads)
                        .install(|| gemm_with(kernel, w.matrix(), &acts, &mut y))
                        .unwrap();
                    y
                };
                let one = run(1);
                for threads in [2, 3] {
                    assert!(
                        one.iter()
                            .zip(run(threads))
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kernel} {dtype} m={m}: {threads} threads differ from one"
                    );
                }
                if m >= 64 {
                    // Rows 4..12 as a batch of their own take the same path.
                    let part = QuantizedActs::quantize(&x[4 * k..12 * k], 8, k).unwrap();
                    let mut y = vec![f32::NAN; 8 * n_out];
                    gemm_with(kernel, w.matrix(), &part, &mut y).unwrap();
                    assert_eq!(y, one[4 * n_out..12 * n_out], "{kernel} {dtype} m={m}");
                }
            }
        }
    }
}

/// A prompt's sixteen-column AVX-512 VNNI panels compute every column bit for bit as
/// the AVX2 eight-column panels do (so which of the two a column falls into, by its
/// place in a thread's range, never shows), for every GGML format, with widths that
/// leave eight-column panels and tile columns after the last sixteen (the columns past
/// the last panel run each kernel's own register tiles, checked against the reference
/// in `every_kernel_matches_reference_and_candle`).
#[test]
fn vnni_panels_equal_avx2_panels_bit_for_bit() {
    if !Kernel::Avx512Vnni.is_available() {
        println!(
            "vnni_panels_equal_avx2_panels_bit_for_bit: NOT TESTED on this CPU (it lacks \
             AVX-512 VNNI)"
        );
        return;
    }
    let mut rng = Rng(99);
    let mut compared = 0usize;
    for dtype in WeightDType::ALL {
        for (n_out, k) in [(16, 32), (24, 96), (40, 576), (51, 1536), (200, 64)] {
            let w = GgmlWeights::from_qtensor(&qtensor(dtype, n_out, k, 5)).unwrap();
            for m in (4..=19).chain([64, 130]) {
                let x = rng.vec(m * k);
                let acts = QuantizedActs::quantize(&x, m, k).unwrap();
                let run = |kernel, threads| {
                    let mut y = vec![f32::NAN; m * n_out];
                    pool(threads)
                        .install(|| gemm_with(kernel, w.matrix(), &acts, &mut y))
                        .unwrap();
                    y
                };
                let avx2 = run(Kernel::Avx2, 1);
                for threads in [1, 2, 3] {
                    let vnni = run(Kernel::Avx512Vnni, threads);
                    for (i, (a, v)) in avx2.iter().zip(&vnni).enumerate() {
                        if i % n_out >= n_out / 8 * 8 {
                            continue; // past the last panel: each kernel's own tiles
                        }
                        assert_eq!(
                            a.to_bits(),
                            v.to_bits(),
                            "{dtype} m={m} n_out={n_out} k={k} threads={threads} [{i}]: \
                             avx2 {a} vs vnni {v}"
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 100_000, "{compared}");
}

/// q, k and v (or gate and up) in one call give exactly what separate calls give:
/// one row, a batched step's few rows (one parallel region, each task writing its
/// tile into its columns of the outputs) and a prompt's (one matrix after another),
/// rows independent or not, on one to three threads, in every GGML format.
#[test]
fn ggml_products_of_several_matrices_equal_separate_calls_bit_for_bit() {
    crate::kernels::report_kernel_coverage(
        "ggml_products_of_several_matrices_equal_separate_calls_bit_for_bit",
    );
    // Output widths above, at and below a task's columns, k as in a model.
    let k = 576;
    let mut compared = 0usize;
    for dtype in WeightDType::ALL {
        let ws: Vec<GgmlWeights> = [576, 192, 40]
            .iter()
            .enumerate()
            .map(|(i, &n)| GgmlWeights::from_qtensor(&qtensor(dtype, n, k, 30 + i as u64)).unwrap())
            .collect();
        for m in [1, 3, 8, 9, 70] {
            let x = Rng(40 + m as u64).vec(m * k);
            for independent in [false, true] {
                let mut acts = QuantizedActs::quantize(&x, m, k).unwrap();
                acts.set_independent_rows(independent);
                for threads in [1, 2, 3] {
                    let separate: Vec<Vec<f32>> = ws
                        .iter()
                        .map(|w| {
                            let mut y = vec![f32::NAN; m * w.n_out()];
                            pool(threads)
                                .install(|| gemm_quantized(w.matrix(), &acts, &mut y))
                                .unwrap();
                            y
                        })
                        .collect();
                    let mut ys: Vec<Vec<f32>> =
                        ws.iter().map(|w| vec![f32::NAN; m * w.n_out()]).collect();
                    let mut items: Vec<(GgmlMatrix<'_>, &mut [f32])> = ws
                        .iter()
                        .zip(ys.iter_mut())
                        .map(|(w, y)| (w.matrix(), y.as_mut_slice()))
                        .collect();
                    pool(threads)
                        .install(|| gemm_quantized_many(&mut items, &acts))
                        .unwrap();
                    for (i, (a, b)) in separate.iter().zip(&ys).enumerate() {
                        assert!(
                            a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{dtype} m={m} independent={independent} t={threads}: matrix {i} \
                             differs"
                        );
                        compared += a.len();
                    }
                }
            }
        }
    }
    assert!(compared > 100_000, "{compared}");
}

#[test]
fn gemm_entry_points_agree() {
    let (n_out, k, m) = (70, 576, 3);
    let mut rng = Rng(9);
    let x = rng.vec(m * k);
    for dtype in WeightDType::ALL {
        let qt = qtensor(dtype, n_out, k, 11);
        let w = GgmlWeights::from_qtensor(&qt).unwrap();
        let mut y1 = vec![0.0f32; m * n_out];
        gemm(&w, &x, m, &mut y1).unwrap();
        let mut y2 = vec![0.0f32; m * n_out];
        let f = match dtype {
            WeightDType::Q4_0 => matmul_q4_0,
            WeightDType::Q4_1 => matmul_q4_1,
            WeightDType::Q8_0 => matmul_q8_0,
        };
        f(w.bytes(), n_out, k, &x, &mut y2).unwrap();
        let acts = QuantizedActs::quantize(&x, m, k).unwrap();
        let mut y3 = vec![0.0f32; m * n_out];
        gemm_quantized(w.matrix(), &acts, &mut y3).unwrap();
        assert_eq!(y1, y2);
        assert_eq!(y1, y3);
    }
}

#[test]
fn errors_not_panics() {
    let bytes = vec![0u8; 4 * 2 * 20];
    // k not a multiple of 32.
    assert!(matches!(
        GgmlMatrix::new(WeightDType::Q4_1, 4, 48, &bytes),
        Err(Error::KNotMultipleOfBlock { k: 48, block: 32 })
    ));
    assert!(matches!(
        QuantizedActs::quantize(&[0.0; 40], 1, 40),
        Err(Error::KNotMultipleOfBlock { .. })
    ));
    // Zero dimensions.
    assert!(matches!(
        GgmlMatrix::new(WeightDType::Q4_1, 0, 64, &bytes),
        Err(Error::EmptyDimension { what: "n_out" })
    ));
    assert!(GgmlMatrix::new(WeightDType::Q4_1, 4, 0, &bytes).is_err());
    // Wrong byte counts.
    assert!(matches!(
        GgmlMatrix::new(WeightDType::Q4_1, 4, 64, &bytes[1..]),
        Err(Error::LengthMismatch {
            expected: 160,
            actual: 159,
            ..
        })
    ));
    assert!(GgmlMatrix::new(WeightDType::Q8_0, 4, 64, &bytes).is_err());
    assert!(
        WeightDType::Q4_0
            .dequantize_block(&bytes[..17], &mut [0.0; 32])
            .is_err()
    );
    let w = GgmlWeights::new(WeightDType::Q4_1, 4, 64, bytes.clone()).unwrap();
    assert!(w.matrix().dequantize_row(4, &mut [0.0; 64]).is_err());
    assert!(w.matrix().dequantize_row(0, &mut [0.0; 63]).is_err());
    // Wrong x and y lengths.
    let mut y = vec![0.0f32; 8];
    assert!(matches!(
        gemm(&w, &[0.0; 127], 2, &mut y),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        gemm(&w, &[0.0; 128], 2, &mut y[..7]),
        Err(Error::LengthMismatch {
            expected: 8,
            actual: 7,
            ..
        })
    ));
    assert!(gemm(&w, &[0.0; 0], 0, &mut []).is_err());
    assert!(matmul_q4_1(&bytes, 4, 64, &[0.0; 100], &mut y).is_err());
    assert!(matmul_q4_1(&bytes, 4, 48, &[0.0; 96], &mut y).is_err());
    // Activations for another k.
    let acts = QuantizedActs::quantize(&[0.0; 96], 1, 96).unwrap();
    assert!(matches!(
        gemm_with(Kernel::Scalar, w.matrix(), &acts, &mut y[..4]),
        Err(Error::InnerDimensionMismatch {
            acts_k: 96,
            weights_k: 64,
            ..
        })
    ));
    // Kernels the CPU lacks.
    for kernel in Kernel::ALL {
        let acts = QuantizedActs::quantize(&[0.0; 64], 1, 64).unwrap();
        let r = gemm_with(kernel, w.matrix(), &acts, &mut y[..4]);
        if kernel.is_available() {
            assert!(r.is_ok());
        } else {
            assert!(matches!(r, Err(Error::KernelUnavailable { .. })));
        }
    }
    // Unsupported candle tensors.
    let t = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let f32_qt = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    assert!(matches!(
        GgmlWeights::from_qtensor(&f32_qt),
        Err(Error::UnsupportedDType { .. })
    ));
    let t3 = Tensor::zeros((2, 2, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q3 = QTensor::quantize(&t3, GgmlDType::Q8_0).unwrap();
    assert!(matches!(
        GgmlWeights::from_qtensor(&q3),
        Err(Error::NotAMatrix { .. })
    ));
}

#[test]
fn names_round_trip() {
    for kernel in Kernel::ALL {
        assert_eq!(kernel.to_string().parse::<Kernel>().unwrap(), kernel);
    }
    for dtype in WeightDType::ALL {
        assert_eq!(dtype.to_string().parse::<WeightDType>().unwrap(), dtype);
        assert_eq!(WeightDType::from_ggml(dtype.to_ggml()).unwrap(), dtype);
    }
    assert!("sse2".parse::<Kernel>().is_err());
    assert!("q5_k".parse::<WeightDType>().is_err());
}

#[test]
fn nan_and_zero_activations() {
    let qt = qtensor(WeightDType::Q4_1, 8, 64, 5);
    let w = GgmlWeights::from_qtensor(&qt).unwrap();
    for kernel in available_kernels() {
        let acts = QuantizedActs::quantize(&[0.0; 64], 1, 64).unwrap();
        let mut y = vec![1.0f32; 8];
        gemm_with(kernel, w.matrix(), &acts, &mut y).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{kernel}: {y:?}");
    }
}

/// The weights of `w` as the dense kernels see them, and their exact f64 products.
fn dense_case(dtype: &str, n_out: usize, k: usize, seed: u64) -> (Vec<f32>, DenseOwned) {
    let mut rng = Rng(seed);
    let w = rng.vec(n_out * k);
    let owned = match dtype {
        "f32" => DenseOwned::F32(w.clone()),
        "f16" => DenseOwned::F16(w.iter().map(|&v| half::f16::from_f32(v)).collect()),
        _ => DenseOwned::BF16(w.iter().map(|&v| half::bf16::from_f32(v)).collect()),
    };
    let exact = match &owned {
        DenseOwned::F32(v) => v.clone(),
        DenseOwned::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
        DenseOwned::BF16(v) => v.iter().map(|h| h.to_f32()).collect(),
    };
    (exact, owned)
}

enum DenseOwned {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl DenseOwned {
    fn data(&self) -> DenseData<'_> {
        match self {
            DenseOwned::F32(v) => DenseData::F32(v),
            DenseOwned::F16(v) => DenseData::F16(v),
            DenseOwned::BF16(v) => DenseData::BF16(v),
        }
    }
}

#[test]
fn dense_kernels_match_the_exact_product_for_every_dtype_shape_and_thread_count() {
    // k: below one vector, tails after 8, 16 and 32-wide steps, and the model's sizes;
    // n_out above 32 so that the output is split across threads; m across the tile
    // and, above 4 rows, through the packed GEMM.
    let shapes = [
        (5, 3, 1),
        (40, 17, 2),
        (70, 24, 3),
        (33, 40, 4),
        (64, 57, 5),
        (96, 576, 1),
        (48, 1536, 2),
        (40, 576, 9),
        // The packed GEMM: panels of 64 (AVX-512), 16 and 8, columns past them, rows
        // in groups of six, and a prompt whose rows are split across threads.
        (70, 100, 13),
        (45, 64, 67),
        (150, 40, 13),
    ];
    for kernel in available_kernels() {
        for dtype in ["f32", "f16", "bf16"] {
            for (i, &(n_out, k, m)) in shapes.iter().enumerate() {
                let (wd, owned) = dense_case(dtype, n_out, k, 11 + i as u64);
                let x = Rng(100 + i as u64).vec(m * k);
                let w = DenseMatrix::new(owned.data(), n_out, k).unwrap();
                assert_eq!(w.dtype_name(), dtype);
                for threads in [1, 2, 3] {
                    let mut y = vec![f32::NAN; m * n_out];
                    pool(threads)
                        .install(|| dense_gemm_with(kernel, w, &x, m, &mut y))
                        .unwrap();
                    let what = format!("{kernel} {dtype} {n_out}x{k} m={m} t={threads}");
                    assert_exact_product(&wd, &x, &y, (m, n_out, k), &what);
                }
            }
        }
    }
    report_kernel_coverage("dense kernels");
}

/// `y` (`m x n_out`) is `x · wᵀ` to within f32 rounding: each output within a few ulps
/// of the magnitude of its `k` products, summed exactly in f64.
fn assert_exact_product(
    w: &[f32],
    x: &[f32],
    y: &[f32],
    (m, n_out, k): (usize, usize, usize),
    what: &str,
) {
    for r in 0..m {
        for c in 0..n_out {
            let (exact, mag) = (0..k).fold((0.0f64, 0.0f64), |(e, a), j| {
                let p = f64::from(w[c * k + j]) * f64::from(x[r * k + j]);
                (e + p, a + p.abs())
            });
            let got = f64::from(y[r * n_out + c]);
            let tol = 4.0 * f64::from(f32::EPSILON) * (k as f64).sqrt() * mag + 1e-6;
            assert!(
                (got - exact).abs() <= tol,
                "{what} [{r},{c}]: {got} vs {exact} (tol {tol})"
            );
        }
    }
}

/// An f32 matrix in panels holds the matrix (whole, row by row, from its bytes), gives
/// the exact product for every row count, kernel and thread count, and with a SIMD
/// kernel the packed GEMM's bits over the row-major matrix for a prompt, each row the
/// bits of that row alone (a decode step equals the same row in a prompt), the same
/// bits with AVX2 as with AVX-512, and in one parallel region with other matrices the
/// bits of separate calls. (Prompts that take the AMX-BF16 tiles are checked for the
/// exact product here, and for the rest in their own test.)
#[test]
fn dense_panels_hold_the_matrix_and_give_the_packed_gemms_bits() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // One panel, several, k below a vector and as in a model; n_out above a task so
    // that decode splits across threads.
    let shapes = [(64, 1), (64, 7), (128, 33), (192, 576), (320, 100)];
    let mut compared = 0usize;
    let codings = [PanelCoding::Plain, PanelCoding::Exponents];
    for (i, (&(n_out, k), coding)) in shapes
        .iter()
        .flat_map(|s| codings.map(|c| (s, c)))
        .enumerate()
    {
        let w = Rng(200 + i as u64 / 2).vec(n_out * k);
        let p = DensePanels::from_rows_coded(&w, n_out, k, coding).unwrap();
        assert_eq!((p.n_out(), p.k(), p.coding()), (n_out, k, coding));
        if coding == PanelCoding::Plain {
            assert_eq!(p.bytes(), n_out * k * 4);
        } else if k >= 100 {
            // 28 bits a value and a few escaped exponents.
            assert!(p.bytes() < n_out * k * 4 * 9 / 10, "{}", p.bytes());
        }
        assert_eq!(bits(&p.to_rows()), bits(&w));
        let le: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let from_bytes = DensePanels::from_le_bytes(&le, n_out, k).unwrap();
        assert_eq!(bits(&from_bytes.to_rows()), bits(&w));
        for c in [0, 1, 63, n_out - 1] {
            let mut row = vec![f32::NAN; k];
            p.row(c, &mut row).unwrap();
            assert_eq!(bits(&row), bits(&w[c * k..(c + 1) * k]), "row {c}");
        }
        let rows = DenseMatrix::new(DenseData::F32(&w), n_out, k).unwrap();
        assert_eq!(p.matrix().dtype_name(), "f32");
        for m in [1, 2, 3, 4, 5, 7, 13, 17, 29, 70] {
            let x = Rng(300 + m as u64).vec(m * k);
            for threads in [1, 2, 3] {
                let run = |kernel, mat, x: &[f32], m| {
                    let mut y = vec![f32::NAN; m * n_out];
                    pool(threads)
                        .install(|| dense_gemm_with(kernel, mat, x, m, &mut y))
                        .unwrap();
                    y
                };
                let mut by_kernel = Vec::new();
                for kernel in available_kernels() {
                    let y = run(kernel, p.matrix(), &x, m);
                    let what = format!("{kernel} {coding:?} panels {n_out}x{k} m={m} t={threads}");
                    assert_exact_product(&w, &x, &y, (m, n_out, k), &what);
                    // Prompts on AMX-BF16 tiles keep f32's accuracy, not the FMA
                    // chains' bits (their own test below).
                    let tiles = kernel == Kernel::Avx512Vnni && dense_runs_bf16x6(m);
                    if kernel == Kernel::Scalar || tiles {
                        continue;
                    }
                    if m > DENSE_ROWS_STREAM_MAX_ROWS {
                        let packed = run(kernel, rows, &x, m);
                        assert_eq!(bits(&y), bits(&packed), "{what}: vs row-major");
                    }
                    for r in [0, m / 2, m - 1] {
                        let one = run(kernel, p.matrix(), &x[r * k..(r + 1) * k], 1);
                        assert_eq!(
                            bits(&one),
                            bits(&y[r * n_out..(r + 1) * n_out]),
                            "{what}: row {r} alone"
                        );
                    }
                    compared += y.len();
                    by_kernel.push(y);
                }
                for pair in by_kernel.windows(2) {
                    assert_eq!(
                        bits(&pair[0]),
                        bits(&pair[1]),
                        "{n_out}x{k} m={m}: AVX2 vs AVX-512"
                    );
                }
            }
        }
    }
    // Several matrices in panels (and one row-major) read one row in one region.
    let k = 576;
    let ws: Vec<Vec<f32>> = [576, 192, 128]
        .iter()
        .enumerate()
        .map(|(i, n)| Rng(400 + i as u64).vec(n * k))
        .collect();
    let panels: Vec<DensePanels> = ws
        .iter()
        .map(|w| DensePanels::from_rows(w, w.len() / k, k).unwrap())
        .collect();
    let mut mats: Vec<DenseMatrix<'_>> = panels.iter().map(DensePanels::matrix).collect();
    mats.push(DenseMatrix::new(DenseData::F32(&ws[2]), 128, k).unwrap());
    let x = Rng(500).vec(k);
    for kernel in available_kernels() {
        for threads in [1, 2, 3] {
            let (separate, ys) = separate_and_together(kernel, &mats, &x, 1, threads);
            for (a, b) in separate.iter().zip(&ys) {
                assert_eq!(
                    bits(a),
                    bits(b),
                    "{kernel} t={threads}: one region vs separate calls"
                );
            }
        }
    }
    assert!(compared > 100_000, "{compared}");
    // Shapes that do not fill panels, and rows out of range, are errors.
    let w = vec![0.0f32; 96 * 4];
    assert!(matches!(
        DensePanels::from_rows(&w, 96, 4),
        Err(Error::NotMultiple {
            n: 96,
            multiple: 64,
            ..
        })
    ));
    assert!(matches!(
        DensePanels::from_rows(&w[..64 * 4 - 1], 64, 4),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        DensePanels::from_le_bytes(&[0u8; 64 * 4 * 4 - 2], 64, 4),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        DenseMatrix::new(DenseData::F32Panels(&w), 96, 4),
        Err(Error::NotMultiple { .. })
    ));
    let p = DensePanels::from_rows(&w[..64 * 4], 64, 4).unwrap();
    assert!(p.row(64, &mut [0.0; 4]).is_err());
    assert!(p.row(0, &mut [0.0; 5]).is_err());
    report_kernel_coverage("dense panels");
}

/// With `k` = 1, each output `y[j]` is one product `x[j / n_out] * w[j % n_out]`: within
/// eight units of 2^-24 of its size (what one or three bf16 passes miss).
fn assert_single_products_within_eight_units(
    w: &[f32],
    x: &[f32],
    y: &[f32],
    n_out: usize,
    what: &str,
) {
    for (j, got) in y.iter().enumerate() {
        let exact = f64::from(x[j / n_out]) * f64::from(w[j % n_out]);
        let err = (f64::from(*got) - exact).abs();
        assert!(
            err <= 8.0 * exact.abs() / f64::from(1u32 << 24),
            "{what} [{j}]: {got} vs {exact}"
        );
    }
}

/// `run` over `x`'s rows rotated by `by` gives each row the bits it has in `y` (`run`
/// over `x`): each row lands in another tile, row of a tile and chunk. Returns the
/// outputs compared.
fn assert_rows_rotated_keep_their_bits(
    x: &[f32],
    y: &[f32],
    (m, n_out, k): (usize, usize, usize),
    by: usize,
    what: &str,
    run: impl Fn(&[f32]) -> Vec<f32>,
) -> usize {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let rotated: Vec<f32> = (0..m)
        .flat_map(|j| x[(j + by) % m * k..((j + by) % m + 1) * k].to_vec())
        .collect();
    let part = run(&rotated);
    for j in 0..m {
        let r = (j + by) % m;
        assert_eq!(
            bits(&part[j * n_out..(j + 1) * n_out]),
            bits(&y[r * n_out..(r + 1) * n_out]),
            "{what}: row {r} as row {j}"
        );
    }
    part.len()
}

/// A prompt over f32 panels on AMX-BF16 tiles (six bf16 products per f32 product):
/// within f32 rounding of the exact product for every shape (one product alone within
/// eight 2^-24 of its size, which one bf16 pass or three would miss), the same bits over
/// coded and plain panels, whatever the thread count, and for a row whatever rows
/// share its call (chunks, tiles of sixteen and their padding); an infinite activation
/// touches no other row.
#[test]
fn f32_prompts_on_bf16_tiles_keep_f32_accuracy_and_rows_independent() {
    if !dense_runs_bf16x6(DENSE_BF16X6_MIN_ROWS) {
        println!(
            "f32_prompts_on_bf16_tiles_keep_f32_accuracy_and_rows_independent: NOT TESTED on \
             this CPU (no AMX-BF16, or the OS does not grant the tiles)"
        );
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let kernel = Kernel::Avx512Vnni;
    let mut compared = 0usize;
    // k: one product, below a block of 32, odd, the model's hidden size and its MLP's
    // (two parts of k); m: whole tiles, tails of 1, 15 and 17 rows past them,
    // several pairs of tiles, and more rows than one chunk (two chunks, three parts).
    for (i, &(n_out, k, m)) in [
        (64, 1, 256),
        (64, 7, 257),
        (128, 33, 271),
        (192, 576, 273),
        (320, 100, 300),
        (64, 1536, 300),
        (64, 1000, 530),
    ]
    .iter()
    .enumerate()
    {
        assert!(dense_runs_bf16x6(m));
        let mut rng = Rng(600 + i as u64);
        // Values across a wide range of sizes: every split plane in use.
        let w: Vec<f32> = rng
            .vec(n_out * k)
            .iter()
            .enumerate()
            .map(|(j, v)| v * [1e-3, 1.0, 37.0][j % 3])
            .collect();
        let x: Vec<f32> = rng
            .vec(m * k)
            .iter()
            .enumerate()
            .map(|(j, v)| v * [5.0, 1e-2, 1.0, 3e3][j % 4])
            .collect();
        let plain = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Plain).unwrap();
        let coded = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Exponents).unwrap();
        let run = |p: &DensePanels, x: &[f32], m: usize, threads: usize| {
            let mut y = vec![f32::NAN; m * n_out];
            pool(threads)
                .install(|| dense_gemm_with(kernel, p.matrix(), x, m, &mut y))
                .unwrap();
            y
        };
        let y = run(&plain, &x, m, 1);
        let what = format!("bf16x6 {n_out}x{k} m={m}");
        assert_exact_product(&w, &x, &y, (m, n_out, k), &what);
        if k == 1 {
            assert_single_products_within_eight_units(&w, &x, &y, n_out, &what);
        }
        for threads in [2, 3] {
            assert_eq!(
                bits(&run(&plain, &x, m, threads)),
                bits(&y),
                "{what} t={threads}"
            );
        }
        assert_eq!(
            bits(&run(&coded, &x, m, 2)),
            bits(&y),
            "{what}: coded panels"
        );
        compared += y.len();
        compared += assert_rows_rotated_keep_their_bits(&x, &y, (m, n_out, k), 3, &what, |x| {
            run(&plain, x, m, 2)
        });
    }
    // An infinite activation makes its row's outputs NaN (infinity times a zero part)
    // and leaves every other row as it was.
    let (n_out, k, m) = (64, 40, DENSE_BF16X6_MIN_ROWS);
    let w = Rng(700).vec(n_out * k);
    let mut x = Rng(701).vec(m * k);
    x[3 * k + 5] = f32::INFINITY;
    let p = DensePanels::from_rows(&w, n_out, k).unwrap();
    let mut y = vec![0.0; m * n_out];
    dense_gemm_with(kernel, p.matrix(), &x, m, &mut y).unwrap();
    assert!(y[3 * n_out..4 * n_out].iter().all(|v| !v.is_finite()));
    x[3 * k + 5] = 0.0;
    let mut finite = vec![0.0; m * n_out];
    dense_gemm_with(kernel, p.matrix(), &x, m, &mut finite).unwrap();
    for r in (0..m).filter(|&r| r != 3) {
        let row = r * n_out..(r + 1) * n_out;
        assert_eq!(bits(&y[row.clone()]), bits(&finite[row]), "row {r}");
    }
    assert!(compared > 60_000, "{compared}");
}

/// A prompt over f16 or bf16 rows that fill whole panels runs on AMX-BF16 tiles too,
/// with the passes their values need (five for f16, three for bf16): within f32
/// rounding of the exact product, one product alone within eight 2^-24 of its size,
/// the same bits as the same values in f32 panels (the passes dropped are the ones
/// whose weight plane is zero), whatever the thread count and the rows beside a row;
/// odd `k` ends a row's last pair with one value (read alone: the next lies past the
/// matrix).
#[test]
fn f16_and_bf16_prompts_on_bf16_tiles_take_fewer_passes_and_keep_f32_accuracy() {
    if !dense_runs_bf16x6(DENSE_BF16X6_MIN_ROWS) {
        println!(
            "f16_and_bf16_prompts_on_bf16_tiles_take_fewer_passes_and_keep_f32_accuracy: NOT \
             TESTED on this CPU (no AMX-BF16, or the OS does not grant the tiles)"
        );
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let kernel = Kernel::Avx512Vnni;
    let mut compared = 0usize;
    for dtype in ["f16", "bf16"] {
        for (i, &(n_out, k, m)) in [
            (64, 1, 256),
            (64, 7, 257),
            (128, 33, 271),
            (192, 576, 273),
            (64, 1536, 300),
            (64, 1001, 530),
        ]
        .iter()
        .enumerate()
        {
            let mut rng = Rng(800 + i as u64);
            // Sizes from f16's subnormals to its large values.
            let scaled: Vec<f32> = rng
                .vec(n_out * k)
                .iter()
                .enumerate()
                .map(|(j, v)| v * [1e-6, 1.0, 37.0, 1e-2][j % 4])
                .collect();
            let owned = if dtype == "f16" {
                DenseOwned::F16(scaled.iter().map(|&v| half::f16::from_f32(v)).collect())
            } else {
                DenseOwned::BF16(scaled.iter().map(|&v| half::bf16::from_f32(v)).collect())
            };
            let w: Vec<f32> = match &owned {
                DenseOwned::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
                DenseOwned::BF16(v) => v.iter().map(|h| h.to_f32()).collect(),
                DenseOwned::F32(v) => v.clone(),
            };
            let x: Vec<f32> = rng
                .vec(m * k)
                .iter()
                .enumerate()
                .map(|(j, v)| v * [5.0, 1e-2, 1.0, 3e3][j % 4])
                .collect();
            let rows = DenseMatrix::new(owned.data(), n_out, k).unwrap();
            let panels = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Plain).unwrap();
            let run = |w: DenseMatrix<'_>, x: &[f32], threads: usize| {
                let mut y = vec![f32::NAN; m * n_out];
                pool(threads)
                    .install(|| dense_gemm_with(kernel, w, x, m, &mut y))
                    .unwrap();
                y
            };
            let y = run(rows, &x, 1);
            let what = format!("{dtype} tiles {n_out}x{k} m={m}");
            assert_exact_product(&w, &x, &y, (m, n_out, k), &what);
            if k == 1 {
                assert_single_products_within_eight_units(&w, &x, &y, n_out, &what);
            }
            assert_eq!(
                bits(&run(panels.matrix(), &x, 1)),
                bits(&y),
                "{what}: the values in f32 panels"
            );
            for threads in [2, 3] {
                assert_eq!(
                    bits(&run(rows, &x, threads)),
                    bits(&y),
                    "{what} t={threads}"
                );
            }
            compared += y.len();
            compared += assert_rows_rotated_keep_their_bits(&x, &y, (m, n_out, k), 5, &what, |x| {
                run(rows, x, 2)
            });
        }
    }
    // Rows that do not fill whole panels keep the packed FMA GEMM.
    let (values, owned) = dense_case("bf16", 72, 40, 9);
    let w = DenseMatrix::new(owned.data(), 72, 40).unwrap();
    let m = DENSE_BF16X6_MIN_ROWS;
    let x = Rng(10).vec(m * 40);
    let mut y = vec![f32::NAN; m * 72];
    dense_gemm_with(kernel, w, &x, m, &mut y).unwrap();
    assert_exact_product(&values, &x, &y, (m, 72, 40), "bf16 72 rows");
    assert!(compared > 300_000, "{compared}");
}

/// A row-major dense matrix (f32, f16, bf16) streams up to
/// [`DENSE_ROWS_STREAM_MAX_ROWS`] activation rows past each weight row: every row of
/// such a batch gives the bits it gives alone, whatever the thread count and wherever
/// the rows lie (on 64-byte lines or off them: those are copied onto lines when `k`
/// allows), on every kernel this CPU has; one row more takes the packed GEMM, still
/// within f32 rounding.
#[test]
fn row_major_batches_up_to_the_stream_limit_give_each_row_its_own_bits() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut compared = 0usize;
    for kernel in available_kernels() {
        // Shapes: an odd row count (the AVX-512 kernel takes weight rows in pairs,
        // the last alone), k with every tail (32s, a 16, an 8, single values), and k
        // a multiple of 16 (rows that can start on 64-byte lines).
        for (dtype, (n_out, k)) in ["f32", "f16", "bf16"]
            .into_iter()
            .flat_map(|d| [(72, 100), (37, 123), (37, 160)].map(|s| (d, s)))
        {
            let (wd, owned) = dense_case(dtype, n_out, k, 51);
            let w = DenseMatrix::new(owned.data(), n_out, k).unwrap();
            let m = DENSE_ROWS_STREAM_MAX_ROWS + 1;
            let x = Rng(52).vec(m * k);
            let run = |x: &[f32], m: usize, threads: usize| {
                let mut y = vec![f32::NAN; m * n_out];
                pool(threads)
                    .install(|| dense_gemm_with(kernel, w, x, m, &mut y))
                    .unwrap();
                y
            };
            let alone: Vec<Vec<u32>> = (0..m)
                .map(|r| bits(&run(&x[r * k..(r + 1) * k], 1, 1)))
                .collect();
            // The same rows at a 64-byte line and four bytes past one.
            let mut room = vec![0.0f32; m * k + 32];
            let line = room.as_ptr().addr().next_multiple_of(64) - room.as_ptr().addr();
            let first = line / 4;
            for shift in [0, 1] {
                let at = first + shift;
                room[at..at + m * k].copy_from_slice(&x);
                let placed = &room[at..at + m * k];
                assert_eq!(placed.as_ptr().addr() % 64, 4 * shift);
                for rows in [2, 3, 4, 5, 8, 12, DENSE_ROWS_STREAM_MAX_ROWS] {
                    for threads in [1, 2] {
                        let y = run(&placed[..rows * k], rows, threads);
                        for (r, one) in alone.iter().enumerate().take(rows) {
                            assert_eq!(
                                &bits(&y[r * n_out..(r + 1) * n_out]),
                                one,
                                "{kernel} {dtype} k={k} {rows} rows t={threads} \
                                 {shift} floats past a line: row {r}"
                            );
                            compared += n_out;
                        }
                    }
                }
            }
            let y = run(&x, m, 2);
            assert_exact_product(
                &wd,
                &x,
                &y,
                (m, n_out, k),
                &format!("{kernel} {dtype} m={m}"),
            );
        }
    }
    assert!(compared > 10_000, "{compared}");
}

/// Coded panels keep every f32 bit for bit (zeros of both signs, subnormals, the
/// largest and smallest normals, infinities, NaN payloads, and matrices where most
/// exponents are escaped), the SIMD decoders rebuild the scalar decoder's bits, every
/// kernel gives the plain panels' bits over them, and `Auto` codes a trained-looking
/// matrix only where the AVX-512 kernel runs and never one of scattered exponents.
#[test]
fn coded_panels_keep_every_bit_and_give_the_plain_panels_results() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let specials = [
        0.0f32,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE / 3.0,
        f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x7FC0_1234),
        f32::from_bits(0xFFA0_0001),
        1.0,
        -2.5e-30,
    ];
    // Weights like a trained layer's (most exponents in a narrow band, with zeros
    // and specials), and ones whose exponents are spread over 40 binades.
    let trained = |n: usize, seed: u64| -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|i| match i % 997 {
                0..=12 => specials[i % 997],
                _ => rng.f32() * 0.05,
            })
            .collect()
    };
    let scattered = |n: usize, seed: u64| -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|_| rng.f32() * 2f32.powi((rng.next_u64() % 40) as i32 - 20))
            .collect()
    };
    let mut decoded = 0usize;
    for (n_out, k, spread) in [
        (64, 1, false),
        (64, 33, true),
        (128, 576, false),
        (192, 100, true),
    ] {
        let w = if spread {
            scattered(n_out * k, k as u64)
        } else {
            trained(n_out * k, k as u64)
        };
        let plain = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Plain).unwrap();
        let coded = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Exponents).unwrap();
        assert_eq!(coded.coding(), PanelCoding::Exponents);
        let what = format!("{n_out}x{k} spread={spread}");
        assert_eq!(bits(&coded.to_rows()), bits(&w), "{what}: to_rows");
        for c in [0, 1, 31, 32, 63, n_out - 1] {
            let mut row = vec![f32::NAN; k];
            coded.row(c, &mut row).unwrap();
            assert_eq!(bits(&row), bits(&w[c * k..(c + 1) * k]), "{what}: row {c}");
        }
        let DenseData::F32Coded(c) = coded.matrix().data() else {
            panic!("{what}: coded panels give a coded matrix");
        };
        if spread {
            assert!(
                c.escapes() * 4 > n_out * k,
                "{what}: {} escapes",
                c.escapes()
            );
        }
        // The SIMD decoders against the scalar one, panel by panel.
        for p in 0..n_out / 64 {
            let mut want = vec![0.0f32; 64 * k];
            c.decode_panel_scalar(p, &mut want);
            for kernel in available_kernels() {
                let mut got = vec![f32::NAN; 64 * k];
                // SAFETY: the CPU has the kernel's features.
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { coded::simd::decode_panel::<false>(c, p, &mut got) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Vnni => unsafe {
                        coded::simd::decode_panel::<true>(c, p, &mut got)
                    },
                    _ => continue,
                }
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{what}: {kernel} decoder, panel {p}"
                );
                decoded += got.len();
            }
        }
        // Finite values only for products (a NaN or an infinity makes every result
        // NaN or infinite and compares nothing).
        let w: Vec<f32> = w
            .iter()
            .map(|v| {
                if v.is_finite() && v.abs() < 1e30 {
                    *v
                } else {
                    0.5
                }
            })
            .collect();
        let plain = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Plain).unwrap_or(plain);
        let coded = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Exponents).unwrap();
        for m in [1, 2, 3, 4, 5, 9] {
            let x = Rng(700 + m as u64).vec(m * k);
            for kernel in available_kernels() {
                for threads in [1, 2] {
                    let run = |mat| {
                        let mut y = vec![f32::NAN; m * n_out];
                        pool(threads)
                            .install(|| dense_gemm_with(kernel, mat, &x, m, &mut y))
                            .unwrap();
                        y
                    };
                    assert_eq!(
                        bits(&run(coded.matrix())),
                        bits(&run(plain.matrix())),
                        "{what}: {kernel} m={m} t={threads}, coded vs plain"
                    );
                }
            }
        }
    }
    assert!(decoded > 0 || available_kernels() == [Kernel::Scalar]);
    #[cfg(target_arch = "x86_64")]
    coded_avx512_variants_agree();
    // Auto: a trained-looking matrix is coded where the AVX-512 kernel runs (and
    // decoded in a decode step's registers), plain elsewhere; scattered exponents
    // (a quarter of the values escaped) stay plain.
    let (n_out, k) = (128, 512);
    let typical: Vec<f32> = Rng(1).vec(n_out * k).iter().map(|v| v * 0.05).collect();
    let auto = DensePanels::from_rows(&typical, n_out, k).unwrap();
    let fused = Kernel::detect() == Kernel::Avx512Vnni;
    let expected = if fused {
        PanelCoding::Exponents
    } else {
        PanelCoding::Plain
    };
    assert_eq!(auto.coding(), expected);
    let auto = DensePanels::from_rows(&scattered(n_out * k, 2), n_out, k).unwrap();
    assert_eq!(auto.coding(), PanelCoding::Plain);
    report_kernel_coverage("coded panels");
}

/// Both AVX-512 builds of the coded decoders (with `vpermb` where the CPU has
/// AVX512_VBMI, and with `vpermd` + `vpshufb` for AVX-512 CPUs without it) rebuild the
/// scalar decoder's values, and a decode step's micro-kernel of each gives the plain
/// panels' bits for one to four rows. Says which it could not run here.
#[cfg(target_arch = "x86_64")]
fn coded_avx512_variants_agree() {
    use coded::simd::{bw, has_vbmi, vbmi};
    if !Kernel::Avx512Vnni.is_available() {
        println!("coded panels: no AVX-512 here, so its decoders were NOT TESTED");
        return;
    }
    if !has_vbmi() {
        println!("coded panels: no AVX512_VBMI here, so the vpermb decoder was NOT TESTED");
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (n_out, k) = (192, 300);
    let mut rng = Rng(77);
    // A tenth of the values scattered over 37 binades far below the others: many
    // escapes, in most records.
    let w: Vec<f32> = (0..n_out * k)
        .map(|i| {
            let scale = if i % 10 == 0 {
                2f32.powi(-40 - (i % 37) as i32)
            } else {
                0.05
            };
            rng.f32() * scale
        })
        .collect();
    let plain = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Plain).unwrap();
    let coded = DensePanels::from_rows_coded(&w, n_out, k, PanelCoding::Exponents).unwrap();
    let DenseData::F32Coded(c) = coded.matrix().data() else {
        panic!("coded panels give a coded matrix");
    };
    assert!(c.escapes() > n_out * k / 20, "{} escapes", c.escapes());
    type Micro = unsafe fn(
        *const u8,
        &[coded::Escape],
        &[u32; 16],
        usize,
        &[f32],
        usize,
        &mut [f32],
        usize,
        usize,
    );
    let builds: Vec<(&str, [Micro; 4])> = [
        (
            "bw",
            [
                bw::micro::<1, true> as Micro,
                bw::micro::<2, true>,
                bw::micro::<3, true>,
                bw::micro::<4, true>,
            ],
        ),
        (
            "vbmi",
            [
                vbmi::micro::<1, true> as Micro,
                vbmi::micro::<2, true>,
                vbmi::micro::<3, true>,
                vbmi::micro::<4, true>,
            ],
        ),
    ]
    .into_iter()
    .filter(|(name, _)| *name == "bw" || has_vbmi())
    .collect();
    for p in 0..n_out / 64 {
        let mut want = vec![0.0f32; 64 * k];
        c.decode_panel_scalar(p, &mut want);
        let mut got = vec![f32::NAN; 64 * k];
        // SAFETY: the CPU has AVX-512F/BW; got holds 64 floats per record.
        unsafe { bw::decode_records_512(c.panel(p), c.table(), &mut got) };
        coded::patch(c.panel_escapes(p), &mut got);
        assert_eq!(bits(&got), bits(&want), "bw decoder, panel {p}");
        if has_vbmi() {
            let mut got = vec![f32::NAN; 64 * k];
            // SAFETY: as above, and the CPU has AVX512_VBMI.
            unsafe { vbmi::decode_records_512(c.panel(p), c.table(), &mut got) };
            coded::patch(c.panel_escapes(p), &mut got);
            assert_eq!(bits(&got), bits(&want), "vbmi decoder, panel {p}");
        }
    }
    let x = Rng(78).vec(4 * k);
    for mr in 1..=4 {
        let xs = &x[..mr * k];
        let mut want = vec![0.0f32; mr * n_out];
        dense_gemm_with(Kernel::Avx512Vnni, plain.matrix(), xs, mr, &mut want).unwrap();
        for (name, micros) in &builds {
            let mut y = vec![f32::NAN; mr * n_out];
            for p in 0..n_out / 64 {
                let (recs, escapes) = (c.panel(p).as_ptr(), c.panel_escapes(p));
                // SAFETY: the CPU has this build's features; the panel holds k
                // records; xs holds mr rows of k; y holds mr rows of n_out.
                unsafe {
                    micros[mr - 1](recs, escapes, c.table(), k, xs, 0, &mut y, n_out, p * 64)
                };
            }
            assert_eq!(bits(&y), bits(&want), "{name} micro-kernel, {mr} rows");
        }
    }
}

/// A prompt through the dense packed GEMM gives the same bits with AVX-512 (64-column
/// panels six rows at a time, then sixteen columns twelve rows at a time) as with AVX2
/// (two vectors, six rows): the same FMA chain per output, for every dtype, with
/// 8-column panels and row-kernel columns after the last 16 and every row count of a
/// tile.
#[test]
fn dense_avx512_packed_equals_avx2_packed_bit_for_bit() {
    if !Kernel::Avx512Vnni.is_available() {
        println!(
            "dense_avx512_packed_equals_avx2_packed_bit_for_bit: NOT TESTED on this CPU (it \
             lacks AVX-512)"
        );
        return;
    }
    let mut compared = 0usize;
    for dtype in ["f32", "f16", "bf16"] {
        for (n_out, k) in [(16, 40), (29, 96), (64, 576), (40, 1536), (150, 96)] {
            let (_, owned) = dense_case(dtype, n_out, k, 3);
            let w = DenseMatrix::new(owned.data(), n_out, k).unwrap();
            // Rows past the stream limit: the packed GEMMs.
            for m in (DENSE_ROWS_STREAM_MAX_ROWS + 1..=DENSE_ROWS_STREAM_MAX_ROWS + 22).chain([70])
            {
                let x = Rng(m as u64).vec(m * k);
                let run = |kernel, threads| {
                    let mut y = vec![f32::NAN; m * n_out];
                    pool(threads)
                        .install(|| dense_gemm_with(kernel, w, &x, m, &mut y))
                        .unwrap();
                    y
                };
                let avx2 = run(Kernel::Avx2, 1);
                for threads in [1, 2] {
                    let zmm = run(Kernel::Avx512Vnni, threads);
                    for (i, (a, z)) in avx2.iter().zip(&zmm).enumerate() {
                        if i % n_out >= n_out / 8 * 8 {
                            continue; // past the last panel: each kernel's row code
                        }
                        assert_eq!(
                            a.to_bits(),
                            z.to_bits(),
                            "{dtype} {n_out}x{k} m={m} t={threads} [{i}]: avx2 {a} vs \
                             avx512 {z}"
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 20_000, "{compared}");
}

/// An f32 matrix whose values are all bf16s (or f16s) gives the same bits through
/// every dense kernel as the 16-bit matrix itself, for decode rows and prompts and any
/// thread count: what lets a layer keep such a weight at half the bytes.
#[test]
fn dense_f32_of_16_bit_values_equals_the_16_bit_matrix_bit_for_bit() {
    let mut compared = 0usize;
    for kernel in available_kernels() {
        for narrow in ["f16", "bf16"] {
            for (i, &(n_out, k, m)) in [
                (40, 17, 1),
                (96, 576, 1),
                (48, 1536, 3),
                (70, 100, 4),
                (45, 64, 9),
                (150, 96, 70),
            ]
            .iter()
            .enumerate()
            {
                let (values, owned) = dense_case(narrow, n_out, k, 30 + i as u64);
                let wide = DenseMatrix::new(DenseData::F32(&values), n_out, k).unwrap();
                let w16 = DenseMatrix::new(owned.data(), n_out, k).unwrap();
                let x = Rng(40 + i as u64).vec(m * k);
                for threads in [1, 2] {
                    let run = |w| {
                        let mut y = vec![f32::NAN; m * n_out];
                        pool(threads)
                            .install(|| dense_gemm_with(kernel, w, &x, m, &mut y))
                            .unwrap();
                        y
                    };
                    let (a, b) = (run(wide), run(w16));
                    for (j, (a, b)) in a.iter().zip(&b).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{kernel} {narrow} {n_out}x{k} m={m} t={threads} [{j}]: f32 {a} \
                             vs {narrow} {b}"
                        );
                    }
                    compared += a.len();
                }
            }
        }
    }
    assert!(compared > 10_000, "{compared}");
    report_kernel_coverage("dense f32 of 16-bit values");
}

#[test]
fn dense_results_do_not_depend_on_the_thread_count() {
    // A decode batch (row kernel), a small batch and a prompt (packed GEMM; the prompt
    // splits its rows across threads, the others their columns).
    for (n_out, k, m) in [(300, 200, 3), (300, 200, 9), (100, 200, 70)] {
        for kernel in available_kernels() {
            let (_, owned) = dense_case("f16", n_out, k, 5);
            let w = DenseMatrix::new(owned.data(), n_out, k).unwrap();
            let x = Rng(9).vec(m * k);
            let run = |threads| {
                let mut y = vec![0.0f32; m * n_out];
                pool(threads)
                    .install(|| dense_gemm_with(kernel, w, &x, m, &mut y))
                    .unwrap();
                y
            };
            let one = run(1);
            assert_eq!(one, run(2), "{kernel} m={m}");
            assert_eq!(one, run(4), "{kernel} m={m}");
        }
    }
    report_kernel_coverage("dense thread independence");
}

/// `x · W_iᵀ` for each matrix by separate calls, then all in one call to
/// [`dense_gemm_many_with`], on a pool of `threads`.
fn separate_and_together(
    kernel: Kernel,
    mats: &[DenseMatrix<'_>],
    x: &[f32],
    m: usize,
    threads: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let separate: Vec<Vec<f32>> = mats
        .iter()
        .map(|w| {
            let mut y = vec![f32::NAN; m * w.n_out()];
            pool(threads)
                .install(|| dense_gemm_with(kernel, *w, x, m, &mut y))
                .unwrap();
            y
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = mats.iter().map(|w| vec![f32::NAN; m * w.n_out()]).collect();
    let mut items: Vec<(DenseMatrix<'_>, &mut [f32])> = mats
        .iter()
        .zip(ys.iter_mut())
        .map(|(w, y)| (*w, y.as_mut_slice()))
        .collect();
    pool(threads)
        .install(|| dense_gemm_many_with(kernel, &mut items, x, m))
        .unwrap();
    (separate, ys)
}

/// q, k and v (or gate and up) as one parallel region give exactly what separate
/// calls give, for one row and a batched step's few (split across threads as one
/// region) and a prompt's (run one after another), every dtype and kernel; a shape
/// that does not fit is an error.
#[test]
fn dense_products_of_several_matrices_equal_separate_calls_bit_for_bit() {
    // Output widths below, at and above a task, with k as in a model.
    let shapes = [(576, 576), (192, 576), (40, 576)];
    let mut compared = 0usize;
    for kernel in available_kernels() {
        for dtype in ["f32", "f16", "bf16"] {
            let owned: Vec<DenseOwned> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(n, k))| dense_case(dtype, n, k, 60 + i as u64).1)
                .collect();
            let mats: Vec<DenseMatrix<'_>> = owned
                .iter()
                .zip(shapes)
                .map(|(o, (n, k))| DenseMatrix::new(o.data(), n, k).unwrap())
                .collect();
            for m in [1, 3, 9, 70] {
                let x = Rng(70 + m as u64).vec(m * 576);
                for threads in [1, 2, 3] {
                    let (separate, ys) = separate_and_together(kernel, &mats, &x, m, threads);
                    for (i, (a, b)) in separate.iter().zip(&ys).enumerate() {
                        assert!(
                            a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{kernel} {dtype} m={m} t={threads}: matrix {i} differs"
                        );
                        compared += a.len();
                    }
                }
            }
        }
    }
    assert!(compared > 50_000, "{compared}");
    // An output of the wrong length is an error, whichever matrix it belongs to.
    let w = vec![0.0f32; 12];
    let m = DenseMatrix::new(DenseData::F32(&w), 4, 3).unwrap();
    let (mut good, mut bad) = (vec![0.0f32; 4], vec![0.0f32; 3]);
    let mut items = [(m, good.as_mut_slice()), (m, bad.as_mut_slice())];
    assert!(matches!(
        dense_gemm_many(&mut items, &[0.0; 3], 1),
        Err(Error::LengthMismatch { .. })
    ));
    report_kernel_coverage("dense products of several matrices");
}

#[test]
fn dense_shapes_are_checked() {
    let w = vec![0.0f32; 12];
    assert!(matches!(
        DenseMatrix::new(DenseData::F32(&w), 5, 3),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        DenseMatrix::new(DenseData::F32(&w), 0, 3),
        Err(Error::EmptyDimension { .. })
    ));
    let m = DenseMatrix::new(DenseData::F32(&w), 4, 3).unwrap();
    assert_eq!(m.bytes(), 48);
    let mut y = vec![0.0f32; 4];
    assert!(matches!(
        dense_gemm(m, &[0.0; 4], 1, &mut y),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        dense_gemm(m, &[0.0; 3], 1, &mut [0.0; 3]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        dense_gemm(m, &[], 0, &mut []),
        Err(Error::EmptyDimension { .. })
    ));
    for kernel in Kernel::ALL {
        if !kernel.is_available() {
            assert!(matches!(
                dense_gemm_with(kernel, m, &[0.0; 3], 1, &mut y),
                Err(Error::KernelUnavailable { .. })
            ));
        }
    }
}

/// Panels of sixteen rows hold the same blocks: back to GGUF's row-major bytes
/// exactly, the same dequantized rows, and only the kernels that read them (AVX-512
/// VNNI every format, AVX2 the 4-bit ones) get them.
#[test]
fn panels_hold_the_same_blocks_as_rows() {
    for dtype in WeightDType::ALL {
        for (n_out, k) in [(16, 32), (32, 576), (48, 1536 + 32)] {
            let rows = GgmlWeights::from_qtensor(&qtensor(dtype, n_out, k, 3)).unwrap();
            let panels = rows.clone().into_panels().unwrap();
            assert!(panels.in_panels() && panels.matrix().in_panels() && !rows.in_panels());
            assert_eq!(
                panels.bytes().len(),
                rows.bytes().len(),
                "{dtype}: same size"
            );
            assert_ne!(panels.bytes(), rows.bytes(), "{dtype}: reordered");
            assert_eq!(&*panels.row_major_bytes().unwrap(), rows.bytes(), "{dtype}");
            assert_eq!(
                panels.dequantize().unwrap(),
                rows.dequantize().unwrap(),
                "{dtype}"
            );
            let mut a = vec![0.0f32; k];
            let mut b = vec![0.0f32; k];
            for r in [0, 5, n_out - 1] {
                panels.matrix().dequantize_row(r, &mut a).unwrap();
                rows.matrix().dequantize_row(r, &mut b).unwrap();
                assert_eq!(a, b, "{dtype} row {r}");
            }
            assert!(panels.matrix().dequantize_row(n_out, &mut a).is_err());
            // Already in panels: unchanged.
            let again = panels.clone().into_panels().unwrap();
            assert_eq!(again.bytes(), panels.bytes());
            // Only the kernels that read panels get them: AVX-512 VNNI every format,
            // AVX2 Q4_0 and Q4_1 (a Q8_0 quant plus 128 would saturate vpmaddubsw).
            let avx2_reads = dtype != WeightDType::Q8_0;
            assert!(!rows.clone().for_kernel(Kernel::Scalar).unwrap().in_panels());
            assert_eq!(
                rows.clone().for_kernel(Kernel::Avx2).unwrap().in_panels(),
                avx2_reads,
                "{dtype}"
            );
            assert!(
                rows.clone()
                    .for_kernel(Kernel::Avx512Vnni)
                    .unwrap()
                    .in_panels()
            );
            let acts = QuantizedActs::quantize(&vec![0.5; k], 1, k).unwrap();
            let mut y = vec![0.0; n_out];
            let refused: &[Kernel] = if avx2_reads {
                &[Kernel::Scalar]
            } else {
                &[Kernel::Scalar, Kernel::Avx2]
            };
            for &kernel in refused {
                let err = gemm_with(kernel, panels.matrix(), &acts, &mut y);
                assert!(
                    matches!(
                        err,
                        Err(Error::PanelsUnreadable { .. }) | Err(Error::KernelUnavailable { .. })
                    ),
                    "{kernel}: {err:?}"
                );
            }
        }
        // Rows that do not fill whole panels stay row-major.
        let odd = GgmlWeights::from_qtensor(&qtensor(dtype, 17, 64, 3)).unwrap();
        assert!(odd.clone().into_panels().is_err());
        assert!(!odd.for_kernel(Kernel::Avx512Vnni).unwrap().in_panels());
    }
}

/// The panel kernels (AVX-512 VNNI for every format, AVX2 for Q4_0 and Q4_1) against
/// the exact product and the scalar kernel on row-major bytes, for one row (decode),
/// batches and prompts, on one to three threads (the same bits); each row of a batch
/// equals that row alone bit for bit, whatever the batch; and the largest quants do
/// not overflow.
#[test]
fn panel_kernel_matches_reference_and_each_row_alone() {
    let mut tested = 0;
    for kernel in [Kernel::Avx2, Kernel::Avx512Vnni] {
        if kernel.is_available() {
            panel_kernel_checks(kernel);
            tested += 1;
        } else {
            println!(
                "panel_kernel_matches_reference_and_each_row_alone: {kernel} NOT TESTED on \
                 this CPU (it lacks it)"
            );
        }
    }
    println!("panel kernels tested: {tested}");
}

/// The checks a panel kernel passes on one batch (`acts`, quantized from `x`, `k`
/// columns): each output within `bound + slack` of the exact product and within
/// `slack` of the scalar kernel's (`refs` holds `(exact, bound, slack)` per output);
/// two and three threads bit-identical to one; independent rows bit-identical; rows 0,
/// `m / 2` and `m - 1` alone bit-identical to their row of the batch. `run(acts,
/// threads)` runs the kernel. Returns the batch's output and the outputs checked.
pub(super) fn check_panel_batch(
    what: &str,
    x: &[f32],
    n_out: usize,
    acts: &mut QuantizedActs,
    refs: &[(f64, f64, f64)],
    scalar: &[f32],
    run: impl Fn(&QuantizedActs, usize) -> Vec<f32>,
) -> (Vec<f32>, usize) {
    let (m, k) = (acts.m(), acts.k());
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
    let y = run(acts, 1);
    let mut checked = 0;
    for (i, ((&got, &(exact, bound, slack)), &s)) in y.iter().zip(refs).zip(scalar).enumerate() {
        let err = (f64::from(got) - exact).abs();
        assert!(err <= bound + slack, "{what} [{i}]: {got} vs exact {exact}");
        assert!(
            (f64::from(got) - f64::from(s)).abs() <= slack,
            "{what} [{i}]: {got} vs scalar {s}"
        );
        checked += 1;
    }
    for threads in [2, 3] {
        assert!(
            same(&y, &run(acts, threads)),
            "{what}: {threads} threads differ from one"
        );
    }
    acts.set_independent_rows(true);
    assert!(same(&y, &run(acts, 2)), "{what}: independent rows");
    for r in [0, m / 2, m - 1] {
        let one = QuantizedActs::quantize(&x[r * k..(r + 1) * k], 1, k).unwrap();
        assert!(
            same(&run(&one, 1), &y[r * n_out..(r + 1) * n_out]),
            "{what}: row {r} alone differs from the batch"
        );
    }
    (y, checked)
}

fn panel_kernel_checks(kernel: Kernel) {
    let mut rng = Rng(123);
    let mut checked = 0usize;
    for dtype in WeightDType::ALL {
        if !panels::readable_by(kernel, dtype) {
            continue;
        }
        for (n_out, k) in [(16, 32), (32, 64), (192, 576), (576, 1536), (48, 4096 + 32)] {
            let rows = GgmlWeights::from_qtensor(&qtensor(dtype, n_out, k, 17)).unwrap();
            let panels = rows.clone().into_panels().unwrap();
            let wd = rows.dequantize().unwrap();
            for m in [1, 2, 3, 4, 5, 8, 17, 64, 70] {
                let x = rng.vec(m * k);
                let refs = reference(&wd, &x, m, n_out, k);
                let mut acts = QuantizedActs::quantize(&x, m, k).unwrap();
                let mut scalar = vec![0.0f32; m * n_out];
                gemm_with(Kernel::Scalar, rows.matrix(), &acts, &mut scalar).unwrap();
                let run = |acts: &QuantizedActs, threads| {
                    let mut y = vec![f32::NAN; acts.m() * n_out];
                    pool(threads)
                        .install(|| gemm_with(kernel, panels.matrix(), acts, &mut y))
                        .unwrap();
                    y
                };
                let refs: Vec<(f64, f64, f64)> = refs
                    .iter()
                    .map(|&(exact, bound, mag)| (exact, bound, 1e-4 * mag + 1e-6))
                    .collect();
                let what = format!("{dtype} m={m} n_out={n_out} k={k}");
                checked += check_panel_batch(&what, &x, n_out, &mut acts, &refs, &scalar, run).1;
            }
        }
        // Extreme quants (Q8_0 -128 and 127, nibbles 15) against activations at +-127.
        let (n_out, k) = (32, 1536);
        let rows = extreme_weights(dtype, n_out, k);
        let panels = rows.clone().into_panels().unwrap();
        for m in [1, 9] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| if (i / 32) % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let acts = QuantizedActs::quantize(&x, m, k).unwrap();
            let mut scalar = vec![0.0f32; m * n_out];
            gemm_with(Kernel::Scalar, rows.matrix(), &acts, &mut scalar).unwrap();
            let mut y = vec![f32::NAN; m * n_out];
            gemm_with(kernel, panels.matrix(), &acts, &mut y).unwrap();
            for (i, (got, s)) in y.iter().zip(&scalar).enumerate() {
                assert!(
                    (got - s).abs() <= 1e-5 * s.abs() + 1e-3,
                    "extreme {kernel} {dtype} m={m} [{i}]: {got} vs scalar {s}"
                );
            }
        }
    }
    assert!(checked > 30_000, "{kernel}: {checked}");
}

/// The AVX2 panel kernel computes every output of Q4_0 and Q4_1 panels bit for bit as
/// the AVX-512 VNNI one does (the same integer sum per block, the scales in the same
/// order), for decode rows, batches and prompts, at the largest quants too.
#[test]
fn avx2_panels_equal_vnni_panels_bit_for_bit() {
    if !Kernel::Avx512Vnni.is_available() {
        println!(
            "avx2_panels_equal_vnni_panels_bit_for_bit: NOT TESTED on this CPU (it lacks \
             AVX-512 VNNI)"
        );
        return;
    }
    let mut rng = Rng(7);
    for dtype in [WeightDType::Q4_0, WeightDType::Q4_1] {
        for (n_out, k) in [(16, 32), (64, 576), (48, 1536 + 32)] {
            for panels in [
                GgmlWeights::from_qtensor(&qtensor(dtype, n_out, k, 5))
                    .unwrap()
                    .into_panels()
                    .unwrap(),
                extreme_weights(dtype, n_out, k).into_panels().unwrap(),
            ] {
                for m in [1, 3, 4, 5, 9, 64] {
                    let x = rng.vec(m * k);
                    let acts = QuantizedActs::quantize(&x, m, k).unwrap();
                    let mut a = vec![f32::NAN; m * n_out];
                    let mut b = vec![f32::NAN; m * n_out];
                    gemm_with(Kernel::Avx2, panels.matrix(), &acts, &mut a).unwrap();
                    gemm_with(Kernel::Avx512Vnni, panels.matrix(), &acts, &mut b).unwrap();
                    assert!(
                        a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{dtype} m={m} n_out={n_out} k={k}"
                    );
                }
            }
        }
    }
}

/// The AMX tile kernel gives every output of the VNNI panel kernel bit for bit, for
/// Q4_0, Q4_1, Q8_0 and int8 panels (typical and largest quants), full and partial
/// tiles of rows, whole and partial column ranges.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_tiles_equal_vnni_panels_bit_for_bit() {
    use driver::{F_I8, F_Q4_0, F_Q4_1, F_Q8_0};
    if !amx_available() {
        println!(
            "amx_tiles_equal_vnni_panels_bit_for_bit: NOT TESTED on this CPU (no AMX-INT8 \
             tiles granted, or no AVX-512 VNNI)"
        );
        return;
    }
    let mut rng = Rng(41);
    let mut compared = 0usize;
    type Columns = unsafe fn(
        panels::PanelRows<'_>,
        acts::ActsView<'_>,
        usize,
        std::ops::Range<usize>,
        &mut [f32],
        usize,
    );
    let mut check =
        |what: &str, w: panels::PanelRows<'_>, n_out: usize, vnni: Columns, tiles: Columns| {
            let k = w.nb * 32;
            for m in [16, 17, 31, 33, 64, 100] {
                let x = rng.vec(m * k);
                let acts = QuantizedActs::quantize(&x, m, k).unwrap();
                for cols in [0..n_out, 16..n_out.min(48)] {
                    if cols.is_empty() {
                        continue;
                    }
                    let ld = cols.len() + 3;
                    let mut a = vec![f32::NAN; m * ld];
                    let mut b = vec![f32::NAN; m * ld];
                    // SAFETY: AVX-512 VNNI and the tiles are available (checked above); the
                    // panels hold n_out rows of nb blocks, the activations m rows of k, the
                    // outputs m rows of ld.
                    unsafe {
                        vnni(w, acts.view(), m, cols.clone(), &mut a, ld);
                        tiles(w, acts.view(), m, cols.clone(), &mut b, ld);
                    }
                    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                        if i % ld < cols.len() {
                            assert_eq!(
                                p.to_bits(),
                                q.to_bits(),
                                "{what} m={m} cols={cols:?} [{i}]: vnni {p} amx {q}"
                            );
                            compared += 1;
                        } else {
                            assert!(q.is_nan(), "{what}: wrote past its columns at [{i}]");
                        }
                    }
                }
            }
        };
    for dtype in WeightDType::ALL {
        let (vnni, tiles): (Columns, Columns) = match dtype {
            WeightDType::Q4_0 => (panels::vnni_columns::<F_Q4_0>, amx::columns::<F_Q4_0>),
            WeightDType::Q4_1 => (panels::vnni_columns::<F_Q4_1>, amx::columns::<F_Q4_1>),
            _ => (panels::vnni_columns::<F_Q8_0>, amx::columns::<F_Q8_0>),
        };
        for (n_out, k) in [(16, 32), (64, 576), (48, 1536 + 32)] {
            for w in [
                GgmlWeights::from_qtensor(&qtensor(dtype, n_out, k, 9))
                    .unwrap()
                    .into_panels()
                    .unwrap(),
                extreme_weights(dtype, n_out, k).into_panels().unwrap(),
            ] {
                let rows = panels::PanelRows {
                    bytes: w.bytes(),
                    nb: w.matrix().blocks_per_row(),
                    rb: w.matrix().row_bytes(),
                    scales: None,
                };
                check(&format!("{dtype} {n_out}x{k}"), rows, n_out, vnni, tiles);
            }
        }
    }
    let mut int_rng = Rng(43);
    for (n_out, k) in [(16, 32), (64, 576)] {
        let quants: Vec<u8> = (0..n_out * k)
            .map(|i| match i % 7 {
                0 => 0x80,
                1 => 0x7F,
                _ => (int_rng.next_u64() >> 24) as u8,
            })
            .collect();
        let scales = int_rng.vec(n_out);
        let bytes = panels::from_rows_vec(panels::PanelFormat::Int8, n_out, k, &quants).unwrap();
        let rows = panels::PanelRows {
            bytes: &bytes,
            nb: k / 32,
            rb: k,
            scales: Some(&scales),
        };
        check(
            &format!("int8 {n_out}x{k}"),
            rows,
            n_out,
            panels::vnni_columns::<F_I8>,
            amx::columns::<F_I8>,
        );
    }
    println!("amx_tiles_equal_vnni_panels_bit_for_bit: {compared} outputs compared");
    assert!(compared > 100_000, "{compared}");
}

/// The packed kernel (prompts over row-major GGML matrices and int4) runs whole tiles
/// of sixteen rows on AMX tiles where the CPU has them: a prompt's rows 0-14 and 16-30
/// equal, bit for bit, the same rows run as a call of fifteen (the VNNI packed kernel).
#[cfg(target_arch = "x86_64")]
#[test]
fn packed_rows_on_amx_tiles_equal_the_vnni_packed_kernel() {
    if !amx_available() {
        println!(
            "packed_rows_on_amx_tiles_equal_the_vnni_packed_kernel: NOT TESTED on this CPU \
             (no AMX-INT8 tiles granted, or no AVX-512 VNNI)"
        );
        return;
    }
    let (m, k) = (40, 576);
    let mut rng = Rng(77);
    let x = rng.vec(m * k);
    let acts = QuantizedActs::quantize(&x, m, k).unwrap();
    let mut compared = 0usize;
    let mut check = |what: &str, n_out: usize, run: &dyn Fn(&QuantizedActs, &mut [f32])| {
        let mut full = vec![f32::NAN; m * n_out];
        run(&acts, &mut full);
        for r0 in [0, 16] {
            let part = QuantizedActs::quantize(&x[r0 * k..(r0 + 15) * k], 15, k).unwrap();
            let mut y = vec![f32::NAN; 15 * n_out];
            run(&part, &mut y);
            for (i, (p, q)) in y.iter().zip(&full[r0 * n_out..]).enumerate() {
                assert_eq!(
                    p.to_bits(),
                    q.to_bits(),
                    "{what} row {r0} + [{i}]: {p} vs {q}"
                );
                compared += 1;
            }
        }
    };
    for dtype in WeightDType::ALL {
        // 72 rows: not panels of sixteen, so row-major and the packed kernel.
        let w = GgmlWeights::from_qtensor(&qtensor(dtype, 72, k, 21)).unwrap();
        assert!(!w.in_panels());
        check(&format!("{dtype}"), 72, &|a, y| {
            gemm_with(Kernel::Avx512Vnni, w.matrix(), a, y).unwrap()
        });
    }
    let wf = rng.vec(64 * k);
    for format in [
        IntFormat::Int4 {
            group: 32,
            asymmetric: false,
        },
        IntFormat::Int4 {
            group: 64,
            asymmetric: true,
        },
    ] {
        let w = IntWeights::quantize(format, &wf, 64, k).unwrap();
        check(&format!("{format}"), 64, &|a, y| {
            gemm_int_with(Kernel::Avx512Vnni, &w, a, y).unwrap()
        });
    }
    println!("packed_rows_on_amx_tiles_equal_the_vnni_packed_kernel: {compared} outputs compared");
    assert!(compared >= 2 * 15 * (3 * 72 + 2 * 64));
}

/// Once a kernel is chosen, a later cap is refused and changes nothing: the choice is
/// made once per process.
#[test]
fn a_cap_after_the_choice_is_refused() {
    let chosen = Kernel::detect();
    assert!(!limit_kernels(Kernel::Scalar));
    assert_eq!(Kernel::detect(), chosen);
    assert_eq!(kernel_limit(), Kernel::Avx512Vnni);
    assert!(chosen.is_available());
}

#[test]
fn output_buffers_are_zeros_of_the_length_asked_on_any_pool() {
    // Below and above the size filled by the pool's threads, and an empty one.
    for n in [
        0,
        1,
        1000,
        PAR_ZERO_MIN - 1,
        PAR_ZERO_MIN,
        3 * PAR_ZERO_MIN + 5,
    ] {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let v = pool.install(|| zeroed(n));
            assert_eq!(v.len(), n, "{threads} threads");
            assert!(v.iter().all(|x| x.to_bits() == 0), "n={n}: not all +0.0");
        }
    }
}
