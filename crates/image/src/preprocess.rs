//! The whole pipeline for one image.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::decode::{self, ImageInfo};
use crate::{DecodeLimits, ImageFormat, PixelLayout, PreprocessorConfig, Result, patchify, resize};

/// One image ready for a Qwen-VL vision encoder.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Preprocessed {
    /// `[patches, 3 * frames * P * P]` f32 on the CPU, patches in Qwen2-VL
    /// merge-window order; each row holds channel, frame, patch row, patch column. In
    /// the full layout (`frames == temporal_patch_size`) exactly as the reference
    /// processor flattens them; in the compact layout (`frames == 1`) frame 0 only,
    /// the other `temporal_patch_size - 1` frames being equal to it.
    pub pixel_values: Tensor,
    /// Which layout [`pixel_values`](Self::pixel_values) has.
    pub layout: PixelLayout,
    /// Frames stored per row: `temporal_patch_size` (full layout) or 1 (compact).
    pub frames: usize,
    /// The vision encoder's temporal patch size T, the frames a full row holds.
    pub temporal_patch_size: usize,
    /// `[t, h / P, w / P]`: temporal patches (1 for a still image, whose frame is
    /// repeated `temporal_patch_size` times) and the patch grid.
    pub grid_thw: [usize; 3],
    /// Displayed size of the input, `(width, height)`, after EXIF orientation.
    pub original: (u32, u32),
    /// Size fed to the encoder, `(width, height)`.
    pub resized: (u32, u32),
    /// Pixels after resizing (`resized.0 * resized.1`).
    pub image_pixels: u64,
    /// Pixels of the input (`original.0 * original.1`).
    pub original_pixels: u64,
    /// The spatial merge size the patches were laid out for.
    pub merge_size: usize,
    /// The input's format.
    pub format: ImageFormat,
    /// Size of the encoded input, in bytes.
    pub input_bytes: u64,
}

impl Preprocessed {
    /// Image tokens the language model sees after the merger:
    /// `t * h * w / merge_size²`.
    pub fn num_image_tokens(&self) -> usize {
        let [t, h, w] = self.grid_thw;
        t * h * w / (self.merge_size * self.merge_size).max(1)
    }

    /// Rows of `pixel_values`: `t * h * w`.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// The same image in the full (reference) layout: a compact tensor's frame
    /// repeated `temporal_patch_size` times in every row; a full one is returned as is.
    pub fn to_full_layout(&self) -> Result<Preprocessed> {
        if self.frames == self.temporal_patch_size {
            return Ok(Preprocessed {
                layout: PixelLayout::Full,
                ..self.clone()
            });
        }
        let (rows, dim) = self.pixel_values.dims2()?;
        let t = self.temporal_patch_size;
        let plane = dim / (3 * self.frames).max(1);
        let pixel_values = self
            .pixel_values
            .reshape((rows, 3, 1, self.frames * plane))?
            .broadcast_as((rows, 3, t, plane))?
            .contiguous()?
            .reshape((rows, 3 * t * plane))?;
        Ok(Preprocessed {
            pixel_values,
            layout: PixelLayout::Full,
            frames: t,
            ..self.clone()
        })
    }
}

/// An image decoded and resized in u8, before normalisation: what
/// [`Prepared::to_preprocessed`] turns into model input and
/// [`Prepared::encode`](crate::Prepared::encode) re-encodes for storage.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Prepared {
    /// The resized image, RGB8.
    pub image: RgbImage,
    /// What the input's header said (format, displayed size, byte sizes).
    pub info: ImageInfo,
}

/// Decodes `bytes` within `limits` and resizes to the `smart_resize` size in u8
/// (downscaling early: a JPEG far over the budget is decoded at reduced scale).
pub fn prepare(
    bytes: &[u8],
    config: &PreprocessorConfig,
    limits: &DecodeLimits,
) -> Result<Prepared> {
    config.validate()?;
    let target = |w: u32, h: u32| -> Result<(u32, u32)> { target_size(w, h, config) };
    let reduce = config.do_resize && config.reduced_jpeg_decode;
    let target: &dyn Fn(u32, u32) -> Result<(u32, u32)> = &target;
    let decoded = decode::decode_rgb8(bytes, limits, reduce.then_some(target))?;
    let (w, h) = decoded.rgb.dimensions();
    let (tw, th) = if config.do_resize {
        target_size(decoded.info.width, decoded.info.height, config)?
    } else {
        (w, h)
    };
    let image = resize::resample_rgb8(decoded.rgb, tw, th, config.resample, config.resampler)?;
    Ok(Prepared {
        image,
        info: decoded.info,
    })
}

/// The resized `(width, height)` for a displayed size.
fn target_size(w: u32, h: u32, config: &PreprocessorConfig) -> Result<(u32, u32)> {
    let (rh, rw) = resize::smart_resize(
        h as usize,
        w as usize,
        config.factor(),
        config.min_pixels,
        config.max_pixels,
    )?;
    let side = |v: usize| {
        u32::try_from(v).map_err(|_| crate::Error::Resize {
            height: h as usize,
            width: w as usize,
            factor: config.factor(),
            reason: "the result does not fit in u32",
        })
    };
    Ok((side(rw)?, side(rh)?))
}

impl Prepared {
    /// Normalises and patchifies into model input.
    pub fn to_preprocessed(&self, config: &PreprocessorConfig) -> Result<Preprocessed> {
        config.validate()?;
        let (values, [gh, gw]) = patchify::patchify(&self.image, config)?;
        let rows = gh * gw;
        let pixel_values = Tensor::from_vec(values, (rows, config.row_dim()), &Device::Cpu)?;
        let (w, h) = self.image.dimensions();
        Ok(Preprocessed {
            pixel_values,
            layout: config.pixel_layout,
            frames: config.frames(),
            temporal_patch_size: config.temporal_patch_size,
            grid_thw: [1, gh, gw],
            original: (self.info.width, self.info.height),
            resized: (w, h),
            image_pixels: u64::from(w) * u64::from(h),
            original_pixels: self.info.pixels(),
            merge_size: config.merge_size,
            format: self.info.format,
            input_bytes: self.info.input_bytes,
        })
    }
}

/// Decodes, resizes, normalises and patchifies one encoded image (JPEG, PNG, WebP,
/// GIF or BMP) for a Qwen-VL vision encoder.
///
/// The image is decoded within `limits`, EXIF-oriented, converted to RGB8 (alpha on
/// white), resized in u8 to the `smart_resize` size with the configured filter, then
/// normalised straight into the output buffer; no full-size float image is made.
pub fn preprocess(
    bytes: &[u8],
    config: &PreprocessorConfig,
    limits: &DecodeLimits,
) -> Result<Preprocessed> {
    prepare(bytes, config, limits)?.to_preprocessed(config)
}
