//! Re-encoding a prepared image for storage or transfer.

use std::fmt;
use std::str::FromStr;

use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;

use crate::{Error, Prepared, Result};

/// How to re-encode an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Encoding {
    /// Baseline JPEG at a quality from 1 to 100.
    Jpeg {
        /// 1 (smallest) to 100 (best).
        quality: u8,
    },
    /// Lossless WebP.
    WebpLossless,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jpeg { quality } => write!(f, "jpeg:{quality}"),
            Self::WebpLossless => f.write_str("webp-lossless"),
        }
    }
}

impl FromStr for Encoding {
    type Err = Error;

    /// `jpeg` (quality 85), `jpeg:Q`, or `webp-lossless` / `webp`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Config {
            field: "encoding",
            reason: format!("`{s}` is not jpeg, jpeg:QUALITY (1-100) or webp-lossless"),
        };
        match s.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Ok(Self::Jpeg { quality: 85 }),
            "webp" | "webp-lossless" => Ok(Self::WebpLossless),
            other => {
                let q = other
                    .strip_prefix("jpeg:")
                    .or_else(|| other.strip_prefix("jpg:"))
                    .ok_or_else(bad)?;
                let quality: u8 = q.parse().map_err(|_| bad())?;
                if (1..=100).contains(&quality) {
                    Ok(Self::Jpeg { quality })
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// A re-encoded image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Encoded {
    /// The encoded file.
    pub bytes: Vec<u8>,
    /// How it was encoded.
    pub encoding: Encoding,
    /// `original input bytes / re-encoded bytes`: above 1 the stored copy is smaller
    /// than the file that came in (the usual case, since it is also resized).
    pub compression_ratio: f64,
}

/// Encodes an RGB8 image.
pub fn encode_rgb8(image: &RgbImage, encoding: Encoding) -> Result<Vec<u8>> {
    let (width, height) = image.dimensions();
    let err = |e: image::ImageError| Error::Encode {
        encoding,
        width,
        height,
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    match encoding {
        Encoding::Jpeg { quality } => {
            let q = quality.clamp(1, 100);
            JpegEncoder::new_with_quality(&mut out, q)
                .encode_image(image)
                .map_err(err)?;
        }
        Encoding::WebpLossless => {
            WebPEncoder::new_lossless(&mut out)
                .encode(
                    image.as_raw(),
                    width,
                    height,
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(err)?;
        }
    }
    Ok(out)
}

impl Prepared {
    /// Re-encodes the resized image; `compression_ratio` compares with the input.
    pub fn encode(&self, encoding: Encoding) -> Result<Encoded> {
        let bytes = encode_rgb8(&self.image, encoding)?;
        let compression_ratio = self.info.input_bytes as f64 / bytes.len().max(1) as f64;
        Ok(Encoded {
            bytes,
            encoding,
            compression_ratio,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_parse() -> Result<()> {
        assert_eq!("jpeg".parse::<Encoding>()?, Encoding::Jpeg { quality: 85 });
        assert_eq!(
            "jpeg:40".parse::<Encoding>()?,
            Encoding::Jpeg { quality: 40 }
        );
        assert_eq!("webp".parse::<Encoding>()?, Encoding::WebpLossless);
        assert!("jpeg:0".parse::<Encoding>().is_err());
        assert!("gif".parse::<Encoding>().is_err());
        let e = Encoding::Jpeg { quality: 7 };
        assert_eq!(e.to_string().parse::<Encoding>()?, e);
        Ok(())
    }

    #[test]
    fn webp_lossless_round_trips_exactly() -> Result<()> {
        let img = RgbImage::from_fn(33, 17, |x, y| image::Rgb([x as u8 * 7, y as u8 * 13, 99]));
        let bytes = encode_rgb8(&img, Encoding::WebpLossless)?;
        let back = image::load_from_memory(&bytes)
            .map_err(|e| Error::Decode {
                format: crate::ImageFormat::WebP,
                reason: e.to_string(),
            })?
            .into_rgb8();
        assert_eq!(back, img);
        Ok(())
    }
}
