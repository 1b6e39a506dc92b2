//! Broken and hostile inputs end in a clear error, never a panic.

#![allow(clippy::panic)] // a test fails by panicking

use std::io::Cursor;

use afo_image::{DecodeLimits, Error, PreprocessorConfig, preprocess, probe};
use proptest::prelude::*;

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = img.write_to(&mut Cursor::new(&mut out), format) {
        panic!("encoding a test image as {format:?}: {e}");
    }
    out
}

fn photo(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, (x ^ y) as u8])
    })
}

fn run(bytes: &[u8]) -> Result<afo_image::Preprocessed, Error> {
    preprocess(
        bytes,
        &PreprocessorConfig::qwen3_vl(),
        &DecodeLimits::default(),
    )
}

/// A PNG whose IHDR declares `width x height`, with a valid CRC and a tiny IDAT.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(&photo(4, 4), image::ImageFormat::Png);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn empty_input() {
    let e = run(&[]);
    assert!(matches!(e, Err(Error::Empty)), "{e:?}");
    assert_eq!(Error::Empty.to_string(), "image input is empty (0 bytes)");
}

#[test]
fn random_bytes_are_not_an_image() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let e = run(&bytes);
    assert!(matches!(e, Err(Error::UnknownFormat { .. })), "{e:?}");
    let text = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains("not an image"), "{text}");
}

#[test]
fn unsupported_format_is_named() {
    // A TIFF header (little endian): a format the sniffer knows, this crate refuses.
    let e = run(b"II*\0\x08\0\0\0\0\0\0\0\0\0\0\0");
    match e {
        Err(Error::UnsupportedFormat { format }) => assert_eq!(format, "Tiff"),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

#[test]
fn truncated_jpeg() {
    let jpeg = encode(&photo(200, 150), image::ImageFormat::Jpeg);
    for cut in [jpeg.len() / 2, 200, 20] {
        let e = run(&jpeg[..cut]);
        assert!(
            matches!(e, Err(Error::Decode { .. })),
            "cut at {cut}: {e:?}"
        );
        let text = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with("JPEG image is truncated or corrupt"),
            "{text}"
        );
    }
}

#[test]
fn truncated_png() {
    let png = encode(&photo(200, 150), image::ImageFormat::Png);
    let e = run(&png[..png.len() / 2]);
    assert!(matches!(e, Err(Error::Decode { .. })), "{e:?}");
}

#[test]
fn png_header_claiming_100000_squared_is_a_bomb() {
    let png = png_claiming(100_000, 100_000);
    let e = run(&png);
    match &e {
        Err(Error::DimensionsTooLarge { width, height, .. }) => {
            assert_eq!((*width, *height), (100_000, 100_000));
        }
        other => panic!("expected DimensionsTooLarge, got {other:?}"),
    }
    let text = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains("100000x100000") && text.contains("decompression bomb"),
        "{text}"
    );
    assert!(probe(&png, &DecodeLimits::default()).is_err());
}

#[test]
fn header_within_dimensions_but_over_the_allocation_limit() {
    let png = png_claiming(12_000, 12_000); // 432 MB of RGB8 > 64 MiB
    let limits = DecodeLimits::default().with_max_alloc_bytes(64 << 20);
    let e = preprocess(&png, &PreprocessorConfig::qwen3_vl(), &limits);
    assert!(matches!(e, Err(Error::AllocationTooLarge { .. })), "{e:?}");
}

#[test]
fn lying_header_with_too_little_data() {
    // Declares 3000x2000 (within every limit) but holds the data of 4x4 pixels.
    let e = run(&png_claiming(3000, 2000));
    assert!(matches!(e, Err(Error::Decode { .. })), "{e:?}");
}

#[test]
fn input_over_the_byte_limit() {
    let png = encode(&photo(64, 64), image::ImageFormat::Png);
    let limits = DecodeLimits::default().with_max_input_bytes(100);
    let e = preprocess(&png, &PreprocessorConfig::qwen3_vl(), &limits);
    assert!(
        matches!(e, Err(Error::InputTooLarge { max: 100, .. })),
        "{e:?}"
    );
}

#[test]
fn extreme_aspect_ratio_is_refused_like_the_reference() {
    let png = encode(&photo(2010, 10), image::ImageFormat::Png);
    let e = run(&png);
    assert!(matches!(e, Err(Error::Resize { .. })), "{e:?}");
}

#[test]
fn every_supported_format_decodes() -> Result<(), Error> {
    let img = photo(123, 77);
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::WebP,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
    ] {
        let out = run(&encode(&img, format))?;
        assert_eq!(out.original, (123, 77), "{format:?}");
        assert_eq!(out.grid_thw[0], 1);
        assert_eq!(
            out.image_pixels,
            u64::from(out.resized.0) * u64::from(out.resized.1)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = run(&bytes);
    }

    #[test]
    fn corrupted_images_never_panic(seed in any::<u64>(), flips in 1usize..16) {
        let mut png = encode(&photo(40, 30), image::ImageFormat::Png);
        let mut jpeg = encode(&photo(40, 30), image::ImageFormat::Jpeg);
        let mut s = seed;
        for buf in [&mut png, &mut jpeg] {
            for _ in 0..flips {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let i = (s >> 33) as usize % buf.len();
                buf[i] ^= (s >> 24) as u8 | 1;
            }
            let _ = run(buf);
        }
    }
}
