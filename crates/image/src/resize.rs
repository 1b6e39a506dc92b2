//! `smart_resize` (the Qwen-VL pixel budget) and the u8 resampler.

use fast_image_resize as fr;
use image::RgbImage;

use crate::{Error, Resample, Resampler, Result};

/// The largest aspect ratio the reference accepts.
const MAX_ASPECT_RATIO: f64 = 200.0;

/// The Qwen2-VL / Qwen3-VL `smart_resize`: the `(height, width)` closest to the input
/// whose sides are multiples of `factor`, with `min_pixels <= h * w <= max_pixels`
/// and the aspect ratio kept as well as those allow.
///
/// Follows the reference exactly, in the same floating-point operations: each side is
/// rounded to the nearest multiple of `factor` with Python's `round` (halves to even);
/// over `max_pixels` both sides shrink by `beta = sqrt(h * w / max_pixels)` and are
/// floored to a multiple (at least `factor`); under `min_pixels` they grow by
/// `beta = sqrt(min_pixels / (h * w))` and are ceiled to a multiple.
///
/// Errors: a zero side or factor, an aspect ratio over 200 (as the reference), or a
/// result with a zero side (possible only with `min_pixels` 0).
///
/// ```
/// // Qwen3-VL: factor 32, 65,536..=16,777,216 pixels.
/// let (h, w) = afo_image::smart_resize(1080, 1920, 32, 65_536, 16_777_216)?;
/// assert_eq!((h, w), (1088, 1920));
/// # Ok::<(), afo_image::Error>(())
/// ```
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let err = |reason| Error::Resize {
        height,
        width,
        factor,
        reason,
    };
    if height == 0 || width == 0 {
        return Err(err("a side is zero"));
    }
    if factor == 0 {
        return Err(err("the factor is zero"));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return Err(err("the aspect ratio is over 200"));
    }
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    let pixels = (height as f64) * (width as f64);
    if (h_bar as f64) * (w_bar as f64) > max_pixels as f64 {
        let beta = (pixels / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if ((h_bar as f64) * (w_bar as f64)) < min_pixels as f64 {
        let beta = (min_pixels as f64 / pixels).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(err("the result has a zero side (min_pixels is 0?)"));
    }
    Ok((h_bar, w_bar))
}

fn filter(resample: Resample) -> fr::ResizeAlg {
    use fr::FilterType as F;
    match resample {
        Resample::Nearest => fr::ResizeAlg::Nearest,
        Resample::Lanczos => fr::ResizeAlg::Convolution(F::Lanczos3),
        Resample::Bilinear => fr::ResizeAlg::Convolution(F::Bilinear),
        Resample::Bicubic => fr::ResizeAlg::Convolution(F::CatmullRom),
        Resample::Box => fr::ResizeAlg::Convolution(F::Box),
        Resample::Hamming => fr::ResizeAlg::Convolution(F::Hamming),
    }
}

/// Resamples an RGB8 image to `width x height` in u8 (as PIL: the filter's support
/// widens with the downscale ratio). Returns the input unchanged when the size already
/// matches.
pub(crate) fn resample_rgb8(
    src: RgbImage,
    width: u32,
    height: u32,
    resample: Resample,
    resampler: Resampler,
) -> Result<RgbImage> {
    if src.dimensions() == (width, height) {
        return Ok(src);
    }
    let (sw, sh) = src.dimensions();
    if resampler == Resampler::Exact {
        return crate::pil::resize(src, width, height, resample).ok_or_else(|| Error::Resample {
            from_width: sw,
            from_height: sh,
            to_width: width,
            to_height: height,
            reason: "resampler returned a buffer of the wrong size".into(),
        });
    }
    let err = |reason: String| Error::Resample {
        from_width: sw,
        from_height: sh,
        to_width: width,
        to_height: height,
        reason,
    };
    let view = fr::images::ImageRef::new(sw, sh, src.as_raw(), fr::PixelType::U8x3)
        .map_err(|e| err(e.to_string()))?;
    let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(filter(resample));
    fr::Resizer::new()
        .resize(&view, &mut dst, &options)
        .map_err(|e| err(e.to_string()))?;
    drop(src);
    RgbImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| err("resampler returned a buffer of the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_cases() -> Result<()> {
        // Qwen3-VL: factor 32, 65,536..=16,777,216.
        let q3 = |h, w| smart_resize(h, w, 32, 65_536, 16_777_216);
        assert_eq!(q3(1080, 1920)?, (1088, 1920));
        assert_eq!(q3(10, 10)?, (256, 256));
        // 6000x4000 (24 MP) is over the budget: beta = sqrt(24e6 / 16777216).
        assert_eq!(q3(4000, 6000)?, (3328, 4992));
        assert_eq!(q3(3000, 4000)?, (3008, 4000));
        // Qwen2-VL class defaults: factor 28, 3,136..=1,003,520.
        let q2 = |h, w| smart_resize(h, w, 28, 3136, 1_003_520);
        assert_eq!(q2(1080, 1920)?, (728, 1316));
        assert_eq!(q2(100, 100)?, (112, 112));
        Ok(())
    }

    #[test]
    fn python_round_halves_to_even() -> Result<()> {
        // 48 / 32 = 1.5 rounds to 2; 80 / 32 = 2.5 rounds to 2 (not 3).
        assert_eq!(smart_resize(48, 80, 32, 1, 1 << 30)?, (64, 64));
        // 112 / 32 = 3.5 rounds to 4.
        assert_eq!(smart_resize(112, 112, 32, 1, 1 << 30)?, (128, 128));
        Ok(())
    }

    #[test]
    fn invalid_inputs_are_errors() {
        assert!(smart_resize(0, 10, 32, 1, 100).is_err());
        assert!(smart_resize(10, 10, 0, 1, 100).is_err());
        assert!(smart_resize(1, 201, 32, 1, 1 << 20).is_err());
        assert!(smart_resize(1, 200, 32, 1, 1 << 20).is_ok());
        assert!(smart_resize(10, 10, 32, 0, 1 << 20).is_err());
    }

    #[test]
    fn results_respect_the_budget_and_the_factor() -> Result<()> {
        for h in (1..3000).step_by(37) {
            for w in (1..3000).step_by(53) {
                if h.max(w) as f64 / h.min(w) as f64 > 200.0 {
                    continue;
                }
                let (rh, rw) = smart_resize(h, w, 28, 3136, 1_003_520)?;
                assert_eq!((rh % 28, rw % 28), (0, 0), "{h}x{w}");
                assert!(rh * rw <= 1_003_520, "{h}x{w} -> {rh}x{rw}");
                assert!(rh * rw >= 3136, "{h}x{w} -> {rh}x{rw}");
            }
        }
        Ok(())
    }

    #[test]
    fn resample_keeps_a_flat_image_flat() -> Result<()> {
        let src = RgbImage::from_pixel(97, 61, image::Rgb([10, 200, 77]));
        for r in [Resampler::Exact, Resampler::Simd] {
            let out = resample_rgb8(src.clone(), 32, 64, Resample::Bicubic, r)?;
            assert_eq!(out.dimensions(), (32, 64));
            assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
        }
        Ok(())
    }
}
