//! The preprocessor configuration: the file as written (`preprocessor_config.json`)
//! and the resolved values the pipeline uses.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The CLIP mean used by Qwen2-VL and Qwen2.5-VL (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// The CLIP standard deviation used by Qwen2-VL and Qwen2.5-VL (`OPENAI_CLIP_STD`).
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// `preprocessor_config.json` as a Hugging Face checkpoint ships it: every field
/// optional, unknown fields ignored. Turn it into a [`PreprocessorConfig`] with
/// [`resolve`](Self::resolve).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreprocessorConfigFile {
    /// `image_processor_type`, for example `Qwen2VLImageProcessor`.
    pub image_processor_type: Option<String>,
    /// `processor_class`, for example `Qwen3VLProcessor`.
    pub processor_class: Option<String>,
    /// Whether to resize (`smart_resize`).
    pub do_resize: Option<bool>,
    /// PIL resampling filter code (0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic, 4 box,
    /// 5 Hamming).
    pub resample: Option<u8>,
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: Option<bool>,
    /// The rescale factor, normally `1/255`.
    pub rescale_factor: Option<f64>,
    /// Whether to normalise with `image_mean` / `image_std`.
    pub do_normalize: Option<bool>,
    /// Per-channel mean (one value is repeated over the three channels).
    pub image_mean: Option<Vec<f64>>,
    /// Per-channel standard deviation (one value is repeated over the three channels).
    pub image_std: Option<Vec<f64>>,
    /// Whether to convert to RGB (always done here; kept for round trips).
    pub do_convert_rgb: Option<bool>,
    /// Lower pixel bound (older configs; overrides `size.shortest_edge`).
    pub min_pixels: Option<u64>,
    /// Upper pixel bound (older configs; overrides `size.longest_edge`).
    pub max_pixels: Option<u64>,
    /// Pixel bounds in the newer form.
    pub size: Option<SizeFile>,
    /// Spatial patch size of the vision encoder.
    pub patch_size: Option<u64>,
    /// Temporal patch size (frames per patch).
    pub temporal_patch_size: Option<u64>,
    /// Spatial merge size (patches merged per side into one token).
    pub merge_size: Option<u64>,
}

/// The `size` object of a preprocessor config: pixel bounds, despite the names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SizeFile {
    /// The minimum number of pixels.
    pub shortest_edge: Option<u64>,
    /// The maximum number of pixels.
    pub longest_edge: Option<u64>,
    /// Older spelling of the minimum.
    pub min_pixels: Option<u64>,
    /// Older spelling of the maximum.
    pub max_pixels: Option<u64>,
}

/// A resampling filter, numbered as PIL numbers them in `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resample {
    /// Nearest neighbour (PIL 0).
    Nearest,
    /// Lanczos with three lobes (PIL 1).
    Lanczos,
    /// Bilinear / triangle (PIL 2).
    Bilinear,
    /// Bicubic with a = -0.5, Catmull-Rom (PIL 3); what Qwen-VL uses.
    Bicubic,
    /// Box (PIL 4).
    Box,
    /// Hamming (PIL 5).
    Hamming,
}

impl Resample {
    /// The filter for a PIL resampling code.
    pub fn from_pil(code: u8) -> Result<Self> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => {
                return Err(Error::Config {
                    field: "resample",
                    reason: format!("{code} is not a PIL resampling code (0-5)"),
                });
            }
        })
    }
}

impl fmt::Display for Resample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nearest => "nearest",
            Self::Lanczos => "lanczos",
            Self::Bilinear => "bilinear",
            Self::Bicubic => "bicubic",
            Self::Box => "box",
            Self::Hamming => "hamming",
        })
    }
}

impl FromStr for Resample {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "nearest" => Self::Nearest,
            "lanczos" => Self::Lanczos,
            "bilinear" => Self::Bilinear,
            "bicubic" => Self::Bicubic,
            "box" => Self::Box,
            "hamming" => Self::Hamming,
            _ => {
                return Err(Error::Config {
                    field: "resample",
                    reason: format!(
                        "`{s}` is not one of nearest, lanczos, bilinear, bicubic, box, hamming"
                    ),
                });
            }
        })
    }
}

/// Which implementation resamples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Resampler {
    /// PIL's algorithm reproduced bit for bit (its windows, 22-bit fixed-point weights,
    /// 8-bit intermediate): the same pixels as the reference processor. The default.
    #[default]
    Exact,
    /// `fast_image_resize`'s SIMD convolution: the same filters, faster, within a few
    /// 8-bit levels of PIL (up to about 5 near image borders and clipped highlights).
    Simd,
}

impl fmt::Display for Resampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exact => "exact",
            Self::Simd => "simd",
        })
    }
}

impl FromStr for Resampler {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "exact" | "pil" => Ok(Self::Exact),
            "simd" | "fast" => Ok(Self::Simd),
            _ => Err(Error::Config {
                field: "resampler",
                reason: format!("`{s}` is not exact or simd"),
            }),
        }
    }
}

/// How a still image's frames are stored in `pixel_values`.
///
/// The reference processor repeats a still image `temporal_patch_size` (T) times, so
/// each row holds `3 x T x P x P` values (channel, frame, patch row, patch column) of
/// which the T frames are equal. The compact layout stores one frame: rows of
/// `3 x P x P` values (channel, patch row, patch column), the other frames implied
/// identical. A vision encoder whose patch embedding is a convolution over T frames
/// gets the same result from the compact row with its kernel summed over the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum PixelLayout {
    /// `[patches, 3 * T * P * P]`, exactly as the reference processor. The default.
    #[default]
    Full,
    /// `[patches, 3 * P * P]`: frame 0 only, 1/T of the memory.
    Compact,
}

impl fmt::Display for PixelLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Compact => "compact",
        })
    }
}

impl FromStr for PixelLayout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "compact" => Ok(Self::Compact),
            _ => Err(Error::Config {
                field: "pixel_layout",
                reason: format!("`{s}` is not full or compact"),
            }),
        }
    }
}

/// The resolved preprocessing parameters of a Qwen-VL style image processor.
///
/// Build one with [`qwen2_vl`](Self::qwen2_vl), [`qwen3_vl`](Self::qwen3_vl), or from
/// a checkpoint's file with [`from_file`](Self::from_file); fields missing from a file
/// take the reference processor's class defaults (those of [`qwen2_vl`](Self::qwen2_vl)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PreprocessorConfig {
    /// Spatial patch size P of the vision encoder (14 for Qwen2-VL, 16 for Qwen3-VL).
    pub patch_size: usize,
    /// Temporal patch size T: a still image is repeated to T frames (2).
    pub temporal_patch_size: usize,
    /// Spatial merge size M: M x M patches become one language-model token (2).
    pub merge_size: usize,
    /// Lower bound on resized pixels (`size.shortest_edge`).
    pub min_pixels: usize,
    /// Upper bound on resized pixels (`size.longest_edge`).
    pub max_pixels: usize,
    /// Whether to resize with `smart_resize`; when false the image's sides must already
    /// be multiples of `patch_size * merge_size`.
    pub do_resize: bool,
    /// Resampling filter (bicubic for Qwen-VL).
    pub resample: Resample,
    /// Resampling implementation (not part of the file). Default [`Resampler::Exact`].
    pub resampler: Resampler,
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Rescale factor (1/255).
    pub rescale_factor: f64,
    /// Whether to normalise with `image_mean` and `image_std`.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation.
    pub image_std: [f64; 3],
    /// Decode a large JPEG at 1/2, 1/4 or 1/8 scale (in the DCT) when the resized image
    /// still fits inside the reduced one, before the bicubic resize. Much less memory and
    /// time for photos far above the pixel budget; pixel values then differ slightly
    /// from a full-size decode (the reference processor always decodes at full size).
    /// Default true; has no effect when no such reduction fits.
    pub reduced_jpeg_decode: bool,
    /// How still-image frames are stored in `pixel_values` (not part of the file).
    /// Default [`PixelLayout::Full`], the reference layout.
    pub pixel_layout: PixelLayout,
}

impl PreprocessorConfig {
    /// Qwen2-VL / Qwen2.5-VL: patch 14, merge 2 (factor 28), temporal patch 2, CLIP
    /// mean/std, bicubic, `min_pixels` 3,136 and the processor class's `max_pixels`
    /// 1,003,520 (28 x 28 x 1280). Published checkpoints often raise `max_pixels` to
    /// 12,845,056; read their file with [`from_file`](Self::from_file) or set it.
    pub fn qwen2_vl() -> Self {
        Self {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            do_resize: true,
            resample: Resample::Bicubic,
            resampler: Resampler::Exact,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            reduced_jpeg_decode: true,
            pixel_layout: PixelLayout::Full,
        }
    }

    /// Qwen3-VL: patch 16, merge 2 (factor 32), temporal patch 2, mean = std = 0.5,
    /// bicubic, `min_pixels` 65,536 and `max_pixels` 16,777,216, as its published
    /// `preprocessor_config.json` sets them.
    pub fn qwen3_vl() -> Self {
        Self {
            patch_size: 16,
            min_pixels: 65_536,
            max_pixels: 16_777_216,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            ..Self::qwen2_vl()
        }
    }

    /// Reads and resolves a `preprocessor_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file: PreprocessorConfigFile =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        file.resolve()
    }

    /// Parses and resolves the text of a `preprocessor_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let file: PreprocessorConfigFile =
            serde_json::from_str(text).map_err(|source| Error::Json {
                path: Default::default(),
                source,
            })?;
        file.resolve()
    }

    /// Sets the pixel bounds (builder style).
    pub fn with_pixels(mut self, min_pixels: usize, max_pixels: usize) -> Self {
        self.min_pixels = min_pixels;
        self.max_pixels = max_pixels;
        self
    }

    /// Sets [`resampler`](Self::resampler) (builder style).
    pub fn with_resampler(mut self, resampler: Resampler) -> Self {
        self.resampler = resampler;
        self
    }

    /// Sets [`reduced_jpeg_decode`](Self::reduced_jpeg_decode) (builder style).
    pub fn with_reduced_jpeg_decode(mut self, on: bool) -> Self {
        self.reduced_jpeg_decode = on;
        self
    }

    /// Sets [`pixel_layout`](Self::pixel_layout) (builder style).
    pub fn with_pixel_layout(mut self, layout: PixelLayout) -> Self {
        self.pixel_layout = layout;
        self
    }

    /// Frames stored per `pixel_values` row: `temporal_patch_size` in the full layout,
    /// 1 in the compact one.
    pub fn frames(&self) -> usize {
        match self.pixel_layout {
            PixelLayout::Full => self.temporal_patch_size,
            PixelLayout::Compact => 1,
        }
    }

    /// Values per row of `pixel_values` in the configured layout:
    /// `3 * frames() * patch_size²` (equal to [`patch_dim`](Self::patch_dim) in the full
    /// layout).
    pub fn row_dim(&self) -> usize {
        3 * self.frames() * self.patch_size * self.patch_size
    }

    /// The side multiple of resized images: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per patch row of the full (reference) layout:
    /// `3 * temporal_patch_size * patch_size²`, the vision encoder's patch input.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Checks that every value is usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.patch_size == 0 || self.patch_size > 1024 {
            return bad(
                "patch_size",
                format!("{} is not in 1..=1024", self.patch_size),
            );
        }
        if self.merge_size == 0 || self.merge_size > 64 {
            return bad(
                "merge_size",
                format!("{} is not in 1..=64", self.merge_size),
            );
        }
        if self.temporal_patch_size == 0 || self.temporal_patch_size > 64 {
            return bad(
                "temporal_patch_size",
                format!("{} is not in 1..=64", self.temporal_patch_size),
            );
        }
        if self.max_pixels == 0 || self.min_pixels > self.max_pixels {
            return bad(
                "size",
                format!(
                    "min_pixels {} and max_pixels {} are not an interval with max > 0",
                    self.min_pixels, self.max_pixels
                ),
            );
        }
        if !self.rescale_factor.is_finite() {
            return bad(
                "rescale_factor",
                format!("{} is not finite", self.rescale_factor),
            );
        }
        for (i, &s) in self.image_std.iter().enumerate() {
            if !(s.is_finite() && s != 0.0) {
                return bad(
                    "image_std",
                    format!("channel {i}: {s} is not finite and nonzero"),
                );
            }
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return bad("image_mean", format!("{:?} is not finite", self.image_mean));
        }
        Ok(())
    }
}

impl Default for PreprocessorConfig {
    /// [`PreprocessorConfig::qwen3_vl`].
    fn default() -> Self {
        Self::qwen3_vl()
    }
}

fn to_usize(field: &'static str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Config {
        field,
        reason: format!("{v} does not fit this platform's usize"),
    })
}

fn channels(field: &'static str, v: &[f64]) -> Result<[f64; 3]> {
    match *v {
        [x] => Ok([x; 3]),
        [r, g, b] => Ok([r, g, b]),
        _ => Err(Error::Config {
            field,
            reason: format!("has {} values; expected 1 or 3", v.len()),
        }),
    }
}

impl PreprocessorConfigFile {
    /// Resolves the file into a [`PreprocessorConfig`]: missing fields take the
    /// reference class defaults ([`PreprocessorConfig::qwen2_vl`]); `min_pixels` /
    /// `max_pixels` override `size`, as in the reference processor; then validates.
    pub fn resolve(&self) -> Result<PreprocessorConfig> {
        let d = PreprocessorConfig::qwen2_vl();
        let size = self.size.clone().unwrap_or_default();
        let min = self
            .min_pixels
            .or(size.shortest_edge)
            .or(size.min_pixels)
            .map(|v| to_usize("min_pixels", v))
            .transpose()?
            .unwrap_or(d.min_pixels);
        let max = self
            .max_pixels
            .or(size.longest_edge)
            .or(size.max_pixels)
            .map(|v| to_usize("max_pixels", v))
            .transpose()?
            .unwrap_or(d.max_pixels);
        let opt = |field, v: Option<u64>, default| -> Result<usize> {
            v.map(|v| to_usize(field, v))
                .transpose()
                .map(|v| v.unwrap_or(default))
        };
        let config = PreprocessorConfig {
            patch_size: opt("patch_size", self.patch_size, d.patch_size)?,
            temporal_patch_size: opt(
                "temporal_patch_size",
                self.temporal_patch_size,
                d.temporal_patch_size,
            )?,
            merge_size: opt("merge_size", self.merge_size, d.merge_size)?,
            min_pixels: min,
            max_pixels: max,
            do_resize: self.do_resize.unwrap_or(d.do_resize),
            resample: self
                .resample
                .map(Resample::from_pil)
                .transpose()?
                .unwrap_or(d.resample),
            do_rescale: self.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: self.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: self.do_normalize.unwrap_or(d.do_normalize),
            image_mean: self
                .image_mean
                .as_deref()
                .map(|v| channels("image_mean", v))
                .transpose()?
                .unwrap_or(d.image_mean),
            image_std: self
                .image_std
                .as_deref()
                .map(|v| channels("image_std", v))
                .transpose()?
                .unwrap_or(d.image_std),
            resampler: d.resampler,
            reduced_jpeg_decode: d.reduced_jpeg_decode,
            pixel_layout: d.pixel_layout,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_vl_published_file_resolves_to_the_constructor() -> Result<()> {
        let text = r#"{
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast"
        }"#;
        assert_eq!(
            PreprocessorConfig::from_json(text)?,
            PreprocessorConfig::qwen3_vl()
        );
        Ok(())
    }

    #[test]
    fn min_max_pixels_override_size_and_defaults_fill_the_rest() -> Result<()> {
        let c = PreprocessorConfig::from_json(
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 1, "longest_edge": 2}}"#,
        )?;
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 12_845_056));
        assert_eq!(c.patch_size, 14);
        assert_eq!(c.image_mean, CLIP_MEAN);
        assert_eq!(c.factor(), 28);
        assert_eq!(c.patch_dim(), 3 * 2 * 14 * 14);
        Ok(())
    }

    #[test]
    fn bad_values_are_refused_with_the_field_name() {
        let e = PreprocessorConfig::from_json(r#"{"image_std": [0.5, 0.0, 0.5]}"#);
        assert!(
            matches!(
                e,
                Err(Error::Config {
                    field: "image_std",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = PreprocessorConfig::from_json(r#"{"image_mean": [0.5, 0.5]}"#);
        assert!(
            matches!(
                e,
                Err(Error::Config {
                    field: "image_mean",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = PreprocessorConfig::from_json(r#"{"resample": 9}"#);
        assert!(
            matches!(
                e,
                Err(Error::Config {
                    field: "resample",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = PreprocessorConfig::from_json(r#"{"patch_size": 0}"#);
        assert!(
            matches!(
                e,
                Err(Error::Config {
                    field: "patch_size",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = PreprocessorConfig::from_json("not json");
        assert!(matches!(e, Err(Error::Json { .. })), "{e:?}");
    }

    #[test]
    fn resample_names_round_trip() -> Result<()> {
        for code in 0..=5 {
            let r = Resample::from_pil(code)?;
            assert_eq!(r.to_string().parse::<Resample>()?, r);
        }
        Ok(())
    }
}
