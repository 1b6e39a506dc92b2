//! Decoding with limits: format sniffing, header checks, EXIF orientation, reduced-scale
//! JPEG decode, and conversion to RGB8 (alpha composited on white).

use std::fmt;
use std::io::Cursor;
use std::str::FromStr;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::{Error, Result};

/// The image formats this crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFormat {
    /// JPEG (baseline and progressive).
    Jpeg,
    /// PNG (8/16-bit, grey, RGB, palette, alpha).
    Png,
    /// WebP (lossy and lossless).
    WebP,
    /// GIF (the first frame).
    Gif,
    /// BMP.
    Bmp,
}

impl ImageFormat {
    fn from_image(f: image::ImageFormat) -> Result<Self> {
        Ok(match f {
            image::ImageFormat::Jpeg => Self::Jpeg,
            image::ImageFormat::Png => Self::Png,
            image::ImageFormat::WebP => Self::WebP,
            image::ImageFormat::Gif => Self::Gif,
            image::ImageFormat::Bmp => Self::Bmp,
            other => {
                return Err(Error::UnsupportedFormat {
                    format: format!("{other:?}"),
                });
            }
        })
    }

    fn to_image(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::WebP => image::ImageFormat::WebP,
            Self::Gif => image::ImageFormat::Gif,
            Self::Bmp => image::ImageFormat::Bmp,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
            Self::WebP => "WebP",
            Self::Gif => "GIF",
            Self::Bmp => "BMP",
        })
    }
}

impl FromStr for ImageFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Self::Jpeg,
            "png" => Self::Png,
            "webp" => Self::WebP,
            "gif" => Self::Gif,
            "bmp" => Self::Bmp,
            _ => {
                return Err(Error::UnsupportedFormat {
                    format: s.to_string(),
                });
            }
        })
    }
}

/// Limits applied before and during decoding, so that a hostile or broken file is
/// refused with an error instead of exhausting memory.
///
/// ```
/// let limits = afo_image::DecodeLimits::default()
///     .with_max_input_bytes(16 << 20)
///     .with_max_dimensions(8192, 8192);
/// assert_eq!(limits.max_input_bytes, 16 << 20);
/// assert_eq!(limits.max_alloc_bytes, 512 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodeLimits {
    /// Largest accepted input, in bytes. Default 64 MiB.
    pub max_input_bytes: u64,
    /// Largest accepted width, in pixels. Default 16,384.
    pub max_width: u32,
    /// Largest accepted height, in pixels. Default 16,384.
    pub max_height: u32,
    /// Largest decoded buffer, in bytes (width x height x bytes per pixel as the file
    /// declares them), also handed to the decoders as their allocation limit.
    /// Default 512 MiB (about 178 MP of RGB8, 67 MP of 16-bit RGBA).
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_input_bytes: 64 << 20,
            max_width: 16_384,
            max_height: 16_384,
            max_alloc_bytes: 512 << 20,
        }
    }
}

impl DecodeLimits {
    /// Sets [`max_input_bytes`](Self::max_input_bytes).
    pub fn with_max_input_bytes(mut self, bytes: u64) -> Self {
        self.max_input_bytes = bytes;
        self
    }

    /// Sets [`max_width`](Self::max_width) and [`max_height`](Self::max_height).
    pub fn with_max_dimensions(mut self, width: u32, height: u32) -> Self {
        self.max_width = width;
        self.max_height = height;
        self
    }

    /// Sets [`max_alloc_bytes`](Self::max_alloc_bytes).
    pub fn with_max_alloc_bytes(mut self, bytes: u64) -> Self {
        self.max_alloc_bytes = bytes;
        self
    }

    fn image_limits(&self) -> image::Limits {
        let mut l = image::Limits::default();
        l.max_image_width = Some(self.max_width);
        l.max_image_height = Some(self.max_height);
        l.max_alloc = Some(self.max_alloc_bytes);
        l
    }
}

/// What the header of an image says, read without decoding its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The format.
    pub format: ImageFormat,
    /// Width as displayed (after EXIF orientation).
    pub width: u32,
    /// Height as displayed (after EXIF orientation).
    pub height: u32,
    /// Bytes of the full-size decoded buffer as the decoder would allocate it.
    pub decoded_bytes: u64,
    /// Size of the encoded input.
    pub input_bytes: u64,
}

impl ImageInfo {
    /// Pixels of the image as stored.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

fn magic_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn sniff(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageFormat> {
    if bytes.is_empty() {
        return Err(Error::Empty);
    }
    let len = bytes.len() as u64;
    if len > limits.max_input_bytes {
        return Err(Error::InputTooLarge {
            bytes: len,
            max: limits.max_input_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| Error::UnknownFormat {
        magic: magic_hex(bytes),
    })?;
    ImageFormat::from_image(format)
}

fn decode_err(format: ImageFormat) -> impl Fn(image::ImageError) -> Error {
    move |e| match e {
        image::ImageError::Limits(l) => Error::Decode {
            format,
            reason: format!("decoder limit exceeded: {l}"),
        },
        other => Error::Decode {
            format,
            reason: other.to_string(),
        },
    }
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Whether a JPEG's marker structure reaches its end-of-image marker: segments are
/// followed by their lengths and entropy-coded scans skipped to the next marker. The
/// decoder itself fills a truncated scan with grey instead of failing.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let n = bytes.len();
    let mut i = 2;
    while i + 1 < n {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1,
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => {
                if i + 3 >= n {
                    return false;
                }
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                i += 2 + len;
                if marker == 0xDA {
                    // Entropy-coded data: up to the next marker that is not a stuffed
                    // 0xFF00 or a restart marker.
                    while i + 1 < n {
                        if bytes[i] == 0xFF
                            && bytes[i + 1] != 0
                            && !(0xD0..=0xD7).contains(&bytes[i + 1])
                        {
                            break;
                        }
                        i += 1;
                    }
                }
            }
        }
    }
    false
}

/// Opens a decoder, checks the declared size against the limits, and reads the
/// orientation.
fn open<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<(impl ImageDecoder + 'a, ImageInfo, Orientation)> {
    let format = sniff(bytes, limits)?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(Error::Decode {
            format,
            reason: format!(
                "no end-of-image marker in {} bytes (the file is cut short)",
                bytes.len()
            ),
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_image());
    reader.limits(limits.image_limits());
    let mut decoder = reader.into_decoder().map_err(|e| {
        // The decoder checks the limits on its header; name the sizes ourselves when
        // we can, by reading them without limits.
        if let image::ImageError::Limits(_) = e
            && let Some(err) = declared_size_error(bytes, format, limits)
        {
            return err;
        }
        decode_err(format)(e)
    })?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::ZeroSize {
            format,
            width: w,
            height: h,
        });
    }
    if w > limits.max_width || h > limits.max_height {
        return Err(Error::DimensionsTooLarge {
            format,
            width: w,
            height: h,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }
    let decoded = decoder.total_bytes();
    if decoded > limits.max_alloc_bytes {
        return Err(Error::AllocationTooLarge {
            format,
            width: w,
            height: h,
            bytes: decoded,
            max: limits.max_alloc_bytes,
        });
    }
    let orientation = decoder.orientation().unwrap_or_else(|e| {
        tracing::debug!(%format, error = %e, "unreadable orientation metadata, ignored");
        Orientation::NoTransforms
    });
    let (width, height) = if swaps_sides(orientation) {
        (h, w)
    } else {
        (w, h)
    };
    let info = ImageInfo {
        format,
        width,
        height,
        decoded_bytes: decoded,
        input_bytes: bytes.len() as u64,
    };
    Ok((decoder, info, orientation))
}

/// When the decoder refused a header for its limits, the error that names the sizes.
fn declared_size_error(bytes: &[u8], format: ImageFormat, limits: &DecodeLimits) -> Option<Error> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_image());
    reader.no_limits();
    let decoder = reader.into_decoder().ok()?;
    let (width, height) = decoder.dimensions();
    if width > limits.max_width || height > limits.max_height {
        return Some(Error::DimensionsTooLarge {
            format,
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }
    let bytes = decoder.total_bytes();
    (bytes > limits.max_alloc_bytes).then_some(Error::AllocationTooLarge {
        format,
        width,
        height,
        bytes,
        max: limits.max_alloc_bytes,
    })
}

/// Reads an image's header (format, displayed size, decoded size) and checks it
/// against the limits, without decoding the pixels.
pub fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageInfo> {
    open(bytes, limits).map(|(_, info, _)| info)
}

/// A decoded image in RGB8 as displayed, with what its header said.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    pub(crate) rgb: RgbImage,
    pub(crate) info: ImageInfo,
}

/// Maps a displayed `(width, height)` to the size it will be resized to.
pub(crate) type TargetFn<'a> = &'a dyn Fn(u32, u32) -> Result<(u32, u32)>;

/// Decodes to RGB8 with the orientation applied. `target`, given the displayed
/// `(width, height)`, returns the size the image will be resized to; a JPEG whose
/// reduced-scale decode still covers that size is decoded at 1/2, 1/4 or 1/8 scale.
pub(crate) fn decode_rgb8(
    bytes: &[u8],
    limits: &DecodeLimits,
    target: Option<TargetFn<'_>>,
) -> Result<Decoded> {
    let (decoder, info, orientation) = open(bytes, limits)?;
    if let (ImageFormat::Jpeg, Some(target)) = (info.format, target) {
        let (tw, th) = target(info.width, info.height)?;
        // The request in stored orientation.
        let (rw, rh) = if swaps_sides(orientation) {
            (th, tw)
        } else {
            (tw, th)
        };
        if let Some(rgb) = reduced_jpeg(bytes, &info, orientation, rw, rh, limits)? {
            return Ok(Decoded { rgb, info });
        }
    }
    if info.format == ImageFormat::Jpeg
        && let Some(rgb) = crate::jpeg::decode(bytes)
    {
        let mut image = DynamicImage::ImageRgb8(rgb);
        image.apply_orientation(orientation);
        return Ok(Decoded {
            rgb: image.into_rgb8(),
            info,
        });
    }
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_err(info.format))?;
    image.apply_orientation(orientation);
    Ok(Decoded {
        rgb: to_rgb8(image),
        info,
    })
}

/// The smallest JPEG DCT scale (in eighths) whose output still covers `rw x rh`.
fn jpeg_scale(w: u32, h: u32, rw: u32, rh: u32) -> u32 {
    let scaled = |len: u32, s: u32| (len * s).div_ceil(8);
    [1, 2, 4]
        .into_iter()
        .find(|&s| scaled(w, s) >= rw && scaled(h, s) >= rh)
        .unwrap_or(8)
}

/// Decodes a JPEG at reduced scale when that is at least a halving; `None` when the
/// full-size path should run instead (no useful reduction, or a pixel format the
/// reduced path does not convert).
fn reduced_jpeg(
    bytes: &[u8],
    info: &ImageInfo,
    orientation: Orientation,
    rw: u32,
    rh: u32,
    limits: &DecodeLimits,
) -> Result<Option<RgbImage>> {
    let (w, h) = if swaps_sides(orientation) {
        (info.height, info.width)
    } else {
        (info.width, info.height)
    };
    let eighths = jpeg_scale(w, h, rw, rh);
    if eighths == 8 {
        return Ok(None);
    }
    let err = |e: jpeg_decoder::Error| Error::Decode {
        format: ImageFormat::Jpeg,
        reason: e.to_string(),
    };
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.set_max_decoding_buffer_size(
        usize::try_from(limits.max_alloc_bytes).unwrap_or(usize::MAX),
    );
    let req = |len: u32| u16::try_from((len * eighths).div_ceil(8)).unwrap_or(u16::MAX);
    let (ow, oh) = decoder.scale(req(w), req(h)).map_err(err)?;
    let (ow, oh) = (u32::from(ow), u32::from(oh));
    if ow < rw || oh < rh {
        return Ok(None);
    }
    let pixels = decoder.decode().map_err(err)?;
    let format = decoder.info().map(|i| i.pixel_format);
    let rgb = match format {
        Some(jpeg_decoder::PixelFormat::RGB24) => RgbImage::from_raw(ow, oh, pixels),
        Some(jpeg_decoder::PixelFormat::L8) => {
            let mut out = Vec::with_capacity(pixels.len() * 3);
            for &v in &pixels {
                out.extend_from_slice(&[v, v, v]);
            }
            RgbImage::from_raw(ow, oh, out)
        }
        _ => return Ok(None),
    };
    let Some(rgb) = rgb else {
        return Ok(None);
    };
    tracing::debug!(w, h, ow, oh, eighths, "reduced-scale JPEG decode");
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    Ok(Some(image.into_rgb8()))
}

/// Composites `v` with alpha `a` over white, rounding as PIL's `alpha_composite`.
fn over_white(v: u8, a: u8) -> u8 {
    let (v, a) = (u32::from(v), u32::from(a));
    ((v * a + 255 * (255 - a) + 127) / 255) as u8
}

/// Converts any decoded image to RGB8: alpha composited on white, grey expanded,
/// 16-bit and float rounded to 8 bits.
fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other if other.color().has_alpha() => {
            let rgba = other.into_rgba8();
            let (w, h) = rgba.dimensions();
            let mut out = Vec::with_capacity(w as usize * h as usize * 3);
            for p in rgba.pixels() {
                let [r, g, b, a] = p.0;
                out.extend_from_slice(&[over_white(r, a), over_white(g, a), over_white(b, a)]);
            }
            RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
        }
        other => other.into_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_on_white() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(100, 255), 100);
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn jpeg_scale_covers_the_target() {
        assert_eq!(jpeg_scale(4000, 3000, 4000, 3008), 8);
        assert_eq!(jpeg_scale(4000, 3000, 1000, 750), 2);
        assert_eq!(jpeg_scale(4000, 3000, 1001, 750), 4);
        assert_eq!(jpeg_scale(6000, 4000, 1316, 728), 2);
        assert_eq!(jpeg_scale(6000, 4000, 5000, 3000), 8);
    }

    #[test]
    fn formats_parse_and_print() -> Result<()> {
        for f in [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::WebP,
            ImageFormat::Gif,
            ImageFormat::Bmp,
        ] {
            assert_eq!(f.to_string().parse::<ImageFormat>()?, f);
        }
        assert!("tiff".parse::<ImageFormat>().is_err());
        Ok(())
    }
}
