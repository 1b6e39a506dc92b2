//! Image preprocessing for afo vision-language models.
//!
//! `afo-image` turns encoded images into the input of a Qwen2-VL / Qwen3-VL vision
//! encoder, the way the Hugging Face image processor does, in less memory and time:
//!
//! 1. **decode within limits** ([`DecodeLimits`]): input bytes, width and height, and
//!    the decoded allocation are checked from the header before any pixel is decoded,
//!    so bombs, truncated files and lying headers end in an [`Error`] that names the
//!    reason; JPEG, PNG, WebP, GIF (first frame) and BMP ([`ImageFormat`]); EXIF
//!    orientation applied; alpha composited on white; grey, CMYK and 16-bit become RGB8;
//!    baseline JPEGs are decoded as libjpeg-turbo (PIL's decoder) decodes them, to the
//!    same 8-bit levels, and the rest with the `image` crate's decoders;
//! 2. **resize** to the pixel budget with [`smart_resize`] (exactly the reference
//!    algorithm, Python rounding included), resampled in u8 with SIMD (bicubic as PIL
//!    does it); a JPEG far over the budget is decoded at 1/2, 1/4 or 1/8 scale first,
//!    so a 24-megapixel photo never becomes a full-size float buffer;
//! 3. **normalise and patchify** straight into [`Preprocessed::pixel_values`], a
//!    `[patches, 3 * T * P * P]` candle tensor in Qwen2-VL merge-window order, with
//!    its `grid_thw`; or, with [`PixelLayout::Compact`], `[patches, 3 * P * P]`: the
//!    still image's frame once instead of T times, for an encoder that folds its
//!    patch-embedding kernel over time;
//! 4. **batch** ([`preprocess_batch`]) in parallel under a byte budget, and
//!    **re-encode** ([`Prepared::encode`]) as JPEG or lossless WebP with a
//!    [`compression_ratio`](Encoded::compression_ratio).
//!
//! Model constants come from a [`PreprocessorConfig`]: the reference defaults
//! ([`PreprocessorConfig::qwen2_vl`], [`PreprocessorConfig::qwen3_vl`]) or a
//! checkpoint's `preprocessor_config.json` ([`PreprocessorConfig::from_file`]).
//!
//! # Example
//!
//! ```
//! use afo_image::{DecodeLimits, PreprocessorConfig, preprocess};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A 300x200 PNG, made here; real callers read a file.
//! let mut png = Vec::new();
//! image::RgbImage::from_pixel(300, 200, image::Rgb([200, 100, 50]))
//!     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
//!
//! let config = PreprocessorConfig::qwen3_vl();
//! let out = preprocess(&png, &config, &DecodeLimits::default())?;
//! assert_eq!(out.resized, (320, 224)); // multiples of 32, at least 65,536 pixels
//! assert_eq!(out.grid_thw, [1, 14, 20]);
//! assert_eq!(out.pixel_values.dims(), &[280, 3 * 2 * 16 * 16]);
//! assert_eq!(out.num_image_tokens(), 70);
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! None: everything is pure CPU and always built.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod batch;
mod config;
mod decode;
mod encode;
mod error;
mod jpeg;
mod patchify;
mod pil;
mod preprocess;
mod resize;

pub use batch::{BatchOptions, estimate_peak_bytes, preprocess_batch};
pub use config::{
    CLIP_MEAN, CLIP_STD, PixelLayout, PreprocessorConfig, PreprocessorConfigFile, Resample,
    Resampler, SizeFile,
};
pub use decode::{DecodeLimits, ImageFormat, ImageInfo, probe};
pub use encode::{Encoded, Encoding, encode_rgb8};
pub use error::{Error, Result};
pub use preprocess::{Prepared, Preprocessed, prepare, preprocess};
pub use resize::smart_resize;
