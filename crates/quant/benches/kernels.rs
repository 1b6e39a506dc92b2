//! GEMV / GEMM with GGML block weights: each of our kernels against candle's `QMatMul`
//! on the same bytes, for SmolLM2-135M's shapes.
//!
//! Throughput is the weight bytes read per call, so criterion's rate is the effective
//! weight bandwidth. The thread count is `RAYON_NUM_THREADS` (default: all cores); set
//! it explicitly so that candle's pool uses the same count:
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p afo-quant --bench kernels -- --warm-up-time 1 --measurement-time 3
//! ```

#![allow(clippy::expect_used)]

use std::hint::black_box;

use afo_quant::kernels::{self, GgmlWeights, Kernel, QuantizedActs, WeightDType};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
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
        let qmm = QMatMul::from_qtensor(qt).expect("qmatmul");
        for m in [1usize, 64] {
            let mut group = c.benchmark_group(format!("{dtype}_k{k}_n{n_out}_m{m}"));
            group.throughput(Throughput::Bytes(weights.bytes().len() as u64));
            if m * n_out * k > 100_000_000 {
                group.sample_size(10);
            }
            let x = data(m * k, 2);
            let mut y = vec![0.0f32; m * n_out];
            for kernel in kernels::available_kernels() {
                if kernel == Kernel::Scalar && m * n_out * k > 100_000_000 {
                    continue;
                }
                group.bench_function(BenchmarkId::new(kernel.to_string(), format!("t{t}")), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let acts = QuantizedActs::quantize(black_box(&x), m, k).expect("acts");
                            kernels::gemm_with(kernel, weights.matrix(), &acts, &mut y)
                                .expect("gemm");
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

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
