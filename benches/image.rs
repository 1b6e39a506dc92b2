//! Image preprocessing of a 12 MP photo (4000x3000 JPEG) as the image -> summary
//! chain and the server run it: bounded decode, Qwen3-VL `smart_resize`, normalise
//! and patchify, with the default exact (PIL-compatible) resampler and the SIMD one.
//! The per-resampler kernel benches are in `crates/image/benches`.
//!
//! `cargo bench -p afo-benches --bench image`.

#![allow(clippy::panic)] // a bench aborts when its inputs are broken

use afo_runtime::image::{DecodeLimits, PreprocessorConfig, Resampler, preprocess};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let photo = afo_benches::photo(4000, 3000).unwrap_or_else(|e| panic!("{e}"));
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("preprocess-12mp");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for (name, config) in [
        ("qwen3-vl/exact", PreprocessorConfig::qwen3_vl()),
        (
            "qwen3-vl/simd",
            PreprocessorConfig::qwen3_vl().with_resampler(Resampler::Simd),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                preprocess(&photo, &config, &limits)
                    .map(|p| p.num_patches())
                    .unwrap_or_else(|e| panic!("{e}"))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
