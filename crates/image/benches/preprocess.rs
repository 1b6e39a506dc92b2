//! Criterion benches of the preprocessing pipeline on synthetic photos made in memory
//! (a gradient plus noise, JPEG quality 90): decode + resize + normalise + patchify,
//! per resampler and pixel budget, one thread.

#![allow(clippy::panic)] // a bench aborts on a broken input it made itself

use std::io::Cursor;

use afo_image::{DecodeLimits, PreprocessorConfig, Resampler, preprocess};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn photo(w: u32, h: u32) -> Vec<u8> {
    let mut s = 0x9e37_79b9_u32;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let n = (s % 9) as i32 - 4;
        let c = |v: u32| (v as i32 + n).clamp(0, 255) as u8;
        image::Rgb([
            c(40 + 180 * x / w),
            c(30 + 200 * y / h),
            c(128 + (x + y) % 64),
        ])
    });
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut out), 90);
    if let Err(e) = img.write_with_encoder(encoder) {
        panic!("encoding the bench photo: {e}");
    }
    out
}

fn bench(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("preprocess/cpu-1thread");
    group.sample_size(10);
    for (w, h) in [(1920, 1080), (4000, 3000)] {
        let bytes = photo(w, h);
        group.throughput(Throughput::Elements(1));
        for (name, config) in [
            ("qwen3-vl/exact", PreprocessorConfig::qwen3_vl()),
            (
                "qwen3-vl/simd",
                PreprocessorConfig::qwen3_vl().with_resampler(Resampler::Simd),
            ),
            (
                "qwen3-vl-1MP/exact",
                PreprocessorConfig::qwen3_vl().with_pixels(65_536, 1 << 20),
            ),
        ] {
            group.bench_with_input(
                BenchmarkId::new(name, format!("{w}x{h}")),
                &bytes,
                |b, bytes| b.iter(|| preprocess(bytes, &config, &limits).map(|p| p.num_patches())),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
