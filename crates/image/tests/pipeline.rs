//! The pipeline's public API: reduced-scale JPEG decode, batching, re-encoding,
//! colour conversions.

#![allow(clippy::panic)] // a test fails by panicking

use std::io::Cursor;

use afo_image::{
    BatchOptions, DecodeLimits, Encoding, Error, PixelLayout, PreprocessorConfig, prepare,
    preprocess, preprocess_batch,
};
use anyhow::Result;

fn photo(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (40 + 180 * x / w) as u8,
            (30 + 200 * y / h) as u8,
            ((x / 7 + y / 5) % 200) as u8,
        ])
    })
}

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format)?;
    Ok(out)
}

fn values(p: &afo_image::Preprocessed) -> Result<Vec<f32>> {
    Ok(p.pixel_values.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn reduced_jpeg_decode_stays_close_to_the_full_decode() -> Result<()> {
    let jpeg = encode(&photo(1600, 1200).into(), image::ImageFormat::Jpeg)?;
    let config = PreprocessorConfig::qwen3_vl().with_pixels(65_536, 100_000);
    let limits = DecodeLimits::default();
    let fast = preprocess(&jpeg, &config, &limits)?;
    let full = preprocess(
        &jpeg,
        &config.clone().with_reduced_jpeg_decode(false),
        &limits,
    )?;
    assert_eq!(fast.grid_thw, full.grid_thw);
    assert_eq!(fast.original, (1600, 1200));
    assert_eq!(fast.resized, full.resized);
    let (a, b) = (values(&fast)?, values(&full)?);
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    assert!(mean < 0.02, "mean |diff| {mean}");
    Ok(())
}

#[test]
fn batch_keeps_order_and_separate_errors() -> Result<()> {
    let good = encode(&photo(300, 200).into(), image::ImageFormat::Png)?;
    let other = encode(&photo(100, 400).into(), image::ImageFormat::Jpeg)?;
    let inputs: Vec<Vec<u8>> = vec![good.clone(), b"not an image".to_vec(), other, vec![], good];
    let config = PreprocessorConfig::qwen2_vl();
    // A budget smaller than any image: they run one at a time, and all finish.
    let options = BatchOptions::default().with_max_in_flight_bytes(1);
    let out = preprocess_batch(&inputs, &config, &DecodeLimits::default(), &options);
    assert_eq!(out.len(), 5);
    assert_eq!(out[0].as_ref().map(|p| p.original).ok(), Some((300, 200)));
    assert!(matches!(out[1], Err(Error::UnknownFormat { .. })));
    assert_eq!(out[2].as_ref().map(|p| p.original).ok(), Some((100, 400)));
    assert!(matches!(out[3], Err(Error::Empty)));
    let (a, b) = (out[0].as_ref(), out[4].as_ref());
    match (a, b) {
        (Ok(a), Ok(b)) => assert_eq!(values(a)?, values(b)?),
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn re_encoding_reports_the_compression_ratio() -> Result<()> {
    let png = encode(&photo(640, 480).into(), image::ImageFormat::Png)?;
    let config = PreprocessorConfig::qwen3_vl().with_pixels(65_536, 200_000);
    let prepared = prepare(&png, &config, &DecodeLimits::default())?;
    let webp = prepared.encode(Encoding::WebpLossless)?;
    assert_eq!(
        webp.compression_ratio,
        png.len() as f64 / webp.bytes.len() as f64
    );
    let back = image::load_from_memory(&webp.bytes)?.into_rgb8();
    assert_eq!(
        back, prepared.image,
        "lossless WebP must round-trip the resized image"
    );
    let jpeg = prepared.encode(Encoding::Jpeg { quality: 50 })?;
    assert_eq!(
        jpeg.compression_ratio,
        png.len() as f64 / jpeg.bytes.len() as f64
    );
    let back = image::load_from_memory(&jpeg.bytes)?;
    assert_eq!((back.width(), back.height()), prepared.image.dimensions());
    Ok(())
}

#[test]
fn grey_16_bit_and_alpha_become_rgb8() -> Result<()> {
    let grey16 = image::DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(64, 64, |x, _| {
        image::Luma([(x * 1000) as u16])
    }));
    let p = preprocess(
        &encode(&grey16, image::ImageFormat::Png)?,
        &PreprocessorConfig::qwen3_vl(),
        &DecodeLimits::default(),
    )?;
    assert_eq!(p.original, (64, 64));
    // Fully transparent black becomes white: +1 after Qwen3-VL normalisation.
    let clear = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
        64,
        64,
        image::Rgba([0, 0, 0, 0]),
    ));
    let p = preprocess(
        &encode(&clear, image::ImageFormat::Png)?,
        &PreprocessorConfig::qwen3_vl(),
        &DecodeLimits::default(),
    )?;
    assert!(values(&p)?.iter().all(|&v| v == 1.0));
    Ok(())
}

#[test]
fn preprocessor_config_reads_from_a_file() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("afo-image-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("preprocessor_config.json");
    std::fs::write(
        &path,
        r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
            "temporal_patch_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}"#,
    )?;
    let c = PreprocessorConfig::from_file(&path)?;
    std::fs::remove_dir_all(&dir)?;
    assert_eq!(c.max_pixels, 12_845_056);
    assert_eq!(c.factor(), 28);
    let missing = PreprocessorConfig::from_file(dir.join("absent.json"));
    assert!(matches!(missing, Err(Error::Io { .. })));
    Ok(())
}

#[test]
fn simd_resampler_stays_within_a_few_levels_of_the_exact_one() -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let limits = DecodeLimits::default();
    let mut worst = 0u8;
    for name in ["odd.png", "photo.jpg", "lossless.webp"] {
        let bytes = std::fs::read(dir.join(name))?;
        for config in [
            PreprocessorConfig::qwen3_vl(),
            PreprocessorConfig::qwen2_vl().with_pixels(3136, 12_544),
        ] {
            let exact = prepare(&bytes, &config, &limits)?;
            let simd = prepare(
                &bytes,
                &config.clone().with_resampler(afo_image::Resampler::Simd),
                &limits,
            )?;
            assert_eq!(exact.image.dimensions(), simd.image.dimensions());
            let max = exact
                .image
                .as_raw()
                .iter()
                .zip(simd.image.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            worst = worst.max(max);
        }
    }
    eprintln!("simd vs exact: max {worst} levels");
    assert!(worst <= 8, "simd differs from exact by {worst} levels");
    Ok(())
}

/// The compact still-image layout: each row is frame 0 of the full row (whose layout is
/// channel, frame, patch row, patch column), and expanding it gives the full tensor.
#[test]
fn compact_layout_rows_are_frame_zero_of_the_full_rows() -> Result<()> {
    let png = encode(&photo(333, 250).into(), image::ImageFormat::Png)?;
    let limits = DecodeLimits::default();
    for (full_config, t) in [
        (PreprocessorConfig::qwen3_vl(), 2),
        (PreprocessorConfig::qwen2_vl(), 2),
        (
            {
                let mut c = PreprocessorConfig::qwen2_vl();
                c.temporal_patch_size = 3;
                c
            },
            3,
        ),
    ] {
        let compact_config = full_config.clone().with_pixel_layout(PixelLayout::Compact);
        let full = preprocess(&png, &full_config, &limits)?;
        let compact = preprocess(&png, &compact_config, &limits)?;
        let p = full_config.patch_size;
        let (rows, dim) = full.pixel_values.dims2()?;
        assert_eq!(dim, 3 * t * p * p);
        assert_eq!(compact.pixel_values.dims(), &[rows, 3 * p * p]);
        assert_eq!((full.layout, full.frames), (PixelLayout::Full, t));
        assert_eq!((compact.layout, compact.frames), (PixelLayout::Compact, 1));
        assert_eq!(compact.temporal_patch_size, t);
        assert_eq!(compact.grid_thw, full.grid_thw);
        assert_eq!(compact.num_image_tokens(), full.num_image_tokens());
        assert_eq!(compact_config.row_dim(), 3 * p * p);
        assert_eq!(compact_config.patch_dim(), dim);

        let (fv, cv) = (values(&full)?, values(&compact)?);
        let pp = p * p;
        for (r, (frow, crow)) in fv
            .chunks_exact(dim)
            .zip(cv.chunks_exact(3 * pp))
            .enumerate()
        {
            for ch in 0..3 {
                let plane = &crow[ch * pp..(ch + 1) * pp];
                for f in 0..t {
                    let start = (ch * t + f) * pp;
                    assert_eq!(
                        &frow[start..start + pp],
                        plane,
                        "row {r}, channel {ch}, frame {f}"
                    );
                }
            }
        }
        // Not merely a prefix: with T > 1, the full row's second third/half starts
        // with channel 0's frame 1, not channel 1.
        assert_ne!(&fv[..3 * pp], &cv[..3 * pp]);

        let expanded = compact.to_full_layout()?;
        assert_eq!(expanded.layout, PixelLayout::Full);
        assert_eq!(expanded.frames, t);
        assert_eq!(expanded.pixel_values.dims(), full.pixel_values.dims());
        assert_eq!(values(&expanded)?, fv);
    }
    Ok(())
}

#[test]
fn pixel_layout_names_parse() -> Result<()> {
    for l in [PixelLayout::Full, PixelLayout::Compact] {
        assert_eq!(l.to_string().parse::<PixelLayout>()?, l);
    }
    assert!("half".parse::<PixelLayout>().is_err());
    assert_eq!(
        PreprocessorConfig::default().pixel_layout,
        PixelLayout::Full
    );
    Ok(())
}
