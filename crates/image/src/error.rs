//! The crate's error type.

use std::path::PathBuf;

use crate::ImageFormat;

/// Everything that can go wrong while preprocessing an image.
///
/// Each message names the image format (when known), the sizes involved and the limit
/// that was hit, so a one-line report is enough to see why an image was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input holds no bytes at all.
    #[error("image input is empty (0 bytes)")]
    Empty,
    /// The input is larger than [`DecodeLimits::max_input_bytes`](crate::DecodeLimits).
    #[error("image input is {bytes} bytes, over the limit of {max} bytes")]
    InputTooLarge {
        /// Size of the input.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The first bytes match no image format the decoder knows.
    #[error("not an image: the first bytes ({magic}) match no known image format")]
    UnknownFormat {
        /// The first bytes of the input, in hex.
        magic: String,
    },
    /// The format is an image format, but not one this crate decodes.
    #[error("image format {format} is not supported (supported: JPEG, PNG, WebP, GIF, BMP)")]
    UnsupportedFormat {
        /// The format's name as the `image` crate reports it.
        format: String,
    },
    /// The header declares a zero width or height.
    #[error("{format} image declares a zero size ({width}x{height})")]
    ZeroSize {
        /// The format.
        format: ImageFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// The header declares a width or height over the limits.
    #[error(
        "{format} image declares {width}x{height} pixels, over the limit of {max_width}x{max_height} \
         (a decompression bomb or a lying header)"
    )]
    DimensionsTooLarge {
        /// The format.
        format: ImageFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Width limit.
        max_width: u32,
        /// Height limit.
        max_height: u32,
    },
    /// Decoding at the declared size would allocate more than the limit.
    #[error(
        "{format} image {width}x{height} would take {bytes} bytes decoded, over the limit of \
         {max} bytes (a decompression bomb or a lying header)"
    )]
    AllocationTooLarge {
        /// The format.
        format: ImageFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Bytes the decoded image would take.
        bytes: u64,
        /// The allocation limit.
        max: u64,
    },
    /// The decoder failed: a truncated file, corrupt data, or a header that lies about
    /// the data behind it.
    #[error("{format} image is truncated or corrupt: {reason}")]
    Decode {
        /// The format.
        format: ImageFormat,
        /// The decoder's own message.
        reason: String,
    },
    /// `smart_resize` was given a size it cannot handle.
    #[error("smart_resize of {height}x{width} (h x w), factor {factor}: {reason}")]
    Resize {
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
        /// The resize factor (patch size x merge size).
        factor: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The resampler failed.
    #[error("resampling {from_width}x{from_height} to {to_width}x{to_height}: {reason}")]
    Resample {
        /// Source width.
        from_width: u32,
        /// Source height.
        from_height: u32,
        /// Target width.
        to_width: u32,
        /// Target height.
        to_height: u32,
        /// The resampler's message.
        reason: String,
    },
    /// A preprocessor configuration value is out of range.
    #[error("preprocessor config: `{field}` {reason}")]
    Config {
        /// The field, as named in `preprocessor_config.json`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A preprocessor config file could not be read.
    #[error("reading preprocessor config {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A preprocessor config file is not valid JSON for the schema.
    #[error("parsing preprocessor config {}: {source}", path.display())]
    Json {
        /// The file (empty for in-memory text).
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Re-encoding failed.
    #[error("encoding a {width}x{height} image as {encoding}: {reason}")]
    Encode {
        /// The target encoding.
        encoding: crate::Encoding,
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The encoder's message.
        reason: String,
    },
    /// Building the output tensor failed.
    #[error("building the pixel_values tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
