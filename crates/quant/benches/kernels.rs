//! GEMV / GEMM with quantized weights, for SmolLM2-135M's shapes.
//!
//! - Groups `Q4_1_…`, `Q8_0_…`: each of our GGML kernels against candle's `QMatMul` on
//!   the same bytes.
//! - Groups `int_k…_n…_m…`: afo's integer formats (`int8`, `int4-g32`, and asymmetric
//!   int4 with the largest group of 128, 64, 32 that divides `k`) with each kernel,
//!   next to candle's Q8_0 `QMatMul` of the same matrix.
//! - Groups `dense_…`: f32, f16 and bf16 weights through our dense kernels
//!   ([`kernels::dense_gemm_with`]) against candle's matmul of the same tensor (what a
//!   dense layer ran before), for decode (m = 1), a batch of 4 and a 512-row prompt
//!   (the packed GEMM).
//! - Groups `prefill_…`: a 512-row prompt through the FFN matrices in every GGML
//!   format, ours against candle's `QMatMul`; the rate is multiply-adds per second.
//!
//! Throughput is the weight bytes read per call (quants, scales, minimums), so
//! criterion's rate is the effective weight bandwidth of each format. Every timed call
//! quantizes its activations, ours and candle's alike. IDs name the format, the kernel
//! and the threads (`int8/avx2/t1`). The thread count is `RAYON_NUM_THREADS` (default:
//! all cores); set it explicitly so that candle's pool uses the same count:
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p afo-quant --bench kernels -- --warm-up-time 1 --measurement-time 3
//! RAYON_NUM_THREADS=1 cargo bench -p afo-quant --bench kernels -- int_ --warm-up-time 1 --measurement-time 3
//! ```

#![allow(clippy::expect_used)]

use std::hint::black_box;

use afo_quant::kernels::{
    self, DenseData, DenseMatrix, GgmlWeights, IntFormat, IntWeights, Kernel, QuantizedActs,
    WeightDType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// `(format, k, n_out)`: FFN up/gate, FFN down, tied LM head.
const SHAPES: [(WeightDType, usize, usize); 3] = [
    (WeightDType::Q4_1, 576, 1536),
    (WeightDType::Q4_1, 1536, 576),
    (WeightDType::Q8_0, 576, 49152),
];

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// What to time on a GGML matrix: every kernel this CPU runs on the row-major weights,
/// then (`avx512vnni-panels`, `avx2-panels`) each kernel that reads this format in
/// panels on the weights in panels, the layout the runtime loads for it.
fn ggml_variants<'a>(
    rows: &'a GgmlWeights,
    panels: Option<&'a GgmlWeights>,
) -> Vec<(String, Kernel, &'a GgmlWeights)> {
    let mut v: Vec<(String, Kernel, &GgmlWeights)> = kernels::available_kernels()
        .into_iter()
        .map(|k| (k.to_string(), k, rows))
        .collect();
    if let Some(p) = panels {
        for k in kernels::available_kernels() {
            let reads = rows.clone().for_kernel(k).is_ok_and(|w| w.in_panels());
            if reads {
                v.push((format!("{k}-panels"), k, p));
            }
        }
    }
    v
}

/// The weights in panels of sixteen rows, where some kernel of this CPU reads them.
fn panels_of(weights: &GgmlWeights) -> Option<GgmlWeights> {
    let read = kernels::available_kernels()
        .into_iter()
        .any(|k| weights.clone().for_kernel(k).is_ok_and(|w| w.in_panels()));
    read.then(|| weights.clone().into_panels().expect("panels"))
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn bench_kernels(c: &mut Criterion) {
    let t = threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .expect("thread pool");
    for (dtype, k, n_out) in SHAPES {
        let w = Tensor::from_vec(data(n_out * k, 1), (n_out, k), &Device::Cpu).expect("tensor");
        let qt = QTensor::quantize(&w, dtype.to_ggml()).expect("quantize");
        let weights = GgmlWeights::from_qtensor(&qt).expect("weights");
        // The layout the runtime loads for the kernels that read panels.
        let panels = panels_of(&weights);
        let qmm = QMatMul::from_qtensor(qt).expect("qmatmul");
        for m in [1usize, 4, 64] {
            let mut group = c.benchmark_group(format!("{dtype}_k{k}_n{n_out}_m{m}"));
            group.throughput(Throughput::Bytes(weights.bytes().len() as u64));
            if m * n_out * k > 100_000_000 {
                group.sample_size(10);
            }
            let x = data(m * k, 2);
            let mut y = vec![0.0f32; m * n_out];
            for (name, kernel, w) in ggml_variants(&weights, panels.as_ref()) {
                if kernel == Kernel::Scalar && m * n_out * k > 100_000_000 {
                    continue;
                }
                group.bench_function(BenchmarkId::new(name, format!("t{t}")), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let acts = QuantizedActs::quantize(black_box(&x), m, k).expect("acts");
                            kernels::gemm_with(kernel, w.matrix(), &acts, &mut y).expect("gemm");
                        });
                        black_box(&y);
                    })
                });
            }
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
            group.bench_function(BenchmarkId::new("candle", format!("t{t}")), |b| {
                b.iter(|| black_box(qmm.forward(black_box(&xt)).expect("forward")))
            });
            group.finish();
        }
    }
}

/// `(n_out, k)`: FFN up/gate, FFN down, tied LM head.
const INT_SHAPES: [(usize, usize); 3] = [(1536, 576), (576, 1536), (49152, 576)];

/// The integer formats benchmarked for a row of `k` elements.
fn int_formats(k: usize) -> [IntFormat; 3] {
    let group = [128, 64, 32]
        .into_iter()
        .find(|g| k.is_multiple_of(*g))
        .unwrap_or(32);
    [
        IntFormat::Int8,
        IntFormat::Int4 {
            group: 32,
            asymmetric: false,
        },
        IntFormat::Int4 {
            group,
            asymmetric: true,
        },
    ]
}

fn bench_int(c: &mut Criterion) {
    // The global pool, which reads RAYON_NUM_THREADS as candle's does: no `install`
    // hop from the bench thread into another pool in the timed calls.
    let t = threads();
    for (n_out, k) in INT_SHAPES {
        let wf = data(n_out * k, 1);
        let formats = int_formats(k);
        let weights: Vec<IntWeights> = formats
            .iter()
            .map(|&f| IntWeights::quantize(f, &wf, n_out, k).expect("quantize"))
            .collect();
        let w = Tensor::from_vec(wf, (n_out, k), &Device::Cpu).expect("tensor");
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        let q8_bytes = (n_out * k / 32 * 34) as u64;
        let qmm = QMatMul::from_qtensor(qt).expect("qmatmul");
        for m in [1usize, 64] {
            let mut group = c.benchmark_group(format!("int_k{k}_n{n_out}_m{m}"));
            let big = m * n_out * k > 100_000_000;
            if big {
                group.sample_size(10);
            }
            let x = data(m * k, 2);
            let mut y = vec![0.0f32; m * n_out];
            for (f, w) in formats.iter().zip(&weights) {
                group.throughput(Throughput::Bytes(w.bytes() as u64));
                for kernel in kernels::available_kernels() {
                    if kernel == Kernel::Scalar && (big || m > 1) {
                        continue;
                    }
                    let id = BenchmarkId::new(format!("{f}/{kernel}"), format!("t{t}"));
                    group.bench_function(id, |b| {
                        b.iter(|| {
                            let acts = QuantizedActs::quantize(black_box(&x), m, k).expect("acts");
                            kernels::gemm_int_with(kernel, w, &acts, &mut y).expect("gemm");
                            black_box(&y);
                        })
                    });
                }
            }
            group.throughput(Throughput::Bytes(q8_bytes));
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
            let id = BenchmarkId::new("candle-q8_0", format!("t{t}"));
            group.bench_function(id, |b| {
                b.iter(|| black_box(qmm.forward(black_box(&xt)).expect("forward")))
            });
            group.finish();
        }
    }
}

fn bench_dense(c: &mut Criterion) {
    let t = threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .expect("thread pool");
    for (n_out, k) in INT_SHAPES {
        let w = Tensor::from_vec(data(n_out * k, 1), (n_out, k), &Device::Cpu).expect("tensor");
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let wt = w.to_dtype(dtype).expect("dtype");
            let (f32s, f16s, bf16s) = match dtype {
                DType::F32 => (
                    wt.flatten_all().and_then(|v| v.to_vec1()).expect("f32"),
                    vec![],
                    vec![],
                ),
                DType::F16 => (
                    vec![],
                    wt.flatten_all().and_then(|v| v.to_vec1()).expect("f16"),
                    vec![],
                ),
                _ => (
                    vec![],
                    vec![],
                    wt.flatten_all().and_then(|v| v.to_vec1()).expect("bf16"),
                ),
            };
            let data_ref = match dtype {
                DType::F32 => DenseData::F32(&f32s),
                DType::F16 => DenseData::F16(&f16s),
                _ => DenseData::BF16(&bf16s),
            };
            let matrix = DenseMatrix::new(data_ref, n_out, k).expect("matrix");
            let wt_t = wt.t().expect("transpose");
            // A 512-row prompt through the FFN shapes: the packed GEMM against candle's.
            let ms: &[usize] = if n_out > 10_000 {
                &[1, 4]
            } else {
                &[1, 4, 512]
            };
            for &m in ms {
                let mut group =
                    c.benchmark_group(format!("dense_{}_k{k}_n{n_out}_m{m}", matrix.dtype_name()));
                if m > 4 {
                    group.sample_size(10);
                }
                group.throughput(Throughput::Bytes(matrix.bytes() as u64));
                let x = data(m * k, 2);
                let mut y = vec![0.0f32; m * n_out];
                for kernel in kernels::available_kernels() {
                    if kernel == Kernel::Scalar && (n_out * k > 1_000_000 || m > 4) {
                        continue;
                    }
                    group.bench_function(
                        BenchmarkId::new(kernel.to_string(), format!("t{t}")),
                        |b| {
                            b.iter(|| {
                                pool.install(|| {
                                    kernels::dense_gemm_with(
                                        kernel,
                                        matrix,
                                        black_box(&x),
                                        m,
                                        &mut y,
                                    )
                                    .expect("dense gemm")
                                });
                                black_box(&y);
                            })
                        },
                    );
                }
                // What a dense layer ran before: the activations converted to the weight's
                // dtype, candle's matmul against the transposed weight, back to f32.
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
                group.bench_function(BenchmarkId::new("candle", format!("t{t}")), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let y = xt
                                .to_dtype(dtype)
                                .and_then(|x| x.matmul(&wt_t))
                                .and_then(|y| y.to_dtype(DType::F32))
                                .expect("matmul");
                            black_box(y)
                        })
                    })
                });
                group.finish();
            }
        }
    }
}

/// Prefill: a 512-row prompt through the FFN matrices of every GGML format, our
/// kernels against candle's `QMatMul`. Throughput is multiply-adds (`m x n_out x k`),
/// so criterion's rate is the kernel's MAC rate.
fn bench_prefill(c: &mut Criterion) {
    let t = threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .expect("thread pool");
    let m = 512;
    for dtype in [WeightDType::Q8_0, WeightDType::Q4_0, WeightDType::Q4_1] {
        for (k, n_out) in [(576usize, 1536usize), (1536, 576)] {
            let w = Tensor::from_vec(data(n_out * k, 1), (n_out, k), &Device::Cpu).expect("tensor");
            let qt = QTensor::quantize(&w, dtype.to_ggml()).expect("quantize");
            let weights = GgmlWeights::from_qtensor(&qt).expect("weights");
            let panels = panels_of(&weights);
            let qmm = QMatMul::from_qtensor(qt).expect("qmatmul");
            let mut group = c.benchmark_group(format!("prefill_{dtype}_k{k}_n{n_out}_m{m}"));
            group.throughput(Throughput::Elements((m * n_out * k) as u64));
            group.sample_size(10);
            let x = data(m * k, 2);
            let mut y = vec![0.0f32; m * n_out];
            for (name, kernel, w) in ggml_variants(&weights, panels.as_ref()) {
                if kernel == Kernel::Scalar {
                    continue;
                }
                group.bench_function(BenchmarkId::new(name, format!("t{t}")), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let acts = QuantizedActs::quantize(black_box(&x), m, k).expect("acts");
                            kernels::gemm_with(kernel, w.matrix(), &acts, &mut y).expect("gemm");
                        });
                        black_box(&y);
                    })
                });
            }
            if dtype == WeightDType::Q8_0 {
                // afo's int8 (per-row scale) on the same source weights.
                let wf = data(n_out * k, 1);
                let int8 = IntWeights::quantize(IntFormat::Int8, &wf, n_out, k).expect("int8");
                for kernel in [Kernel::Avx2, Kernel::Avx512Vnni] {
                    if !kernel.is_available() {
                        continue;
                    }
                    let id = BenchmarkId::new(format!("int8-{kernel}"), format!("t{t}"));
                    group.bench_function(id, |b| {
                        b.iter(|| {
                            pool.install(|| {
                                let acts =
                                    QuantizedActs::quantize(black_box(&x), m, k).expect("acts");
                                kernels::gemm_int_with(kernel, &int8, &acts, &mut y).expect("gemm");
                            });
                            black_box(&y);
                        })
                    });
                }
            }
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
            group.bench_function(BenchmarkId::new("candle", format!("t{t}")), |b| {
                b.iter(|| black_box(qmm.forward(black_box(&xt)).expect("forward")))
            });
            group.finish();
        }
    }
}

criterion_group!(
    benches,
    bench_kernels,
    bench_int,
    bench_dense,
    bench_prefill
);
criterion_main!(benches);
