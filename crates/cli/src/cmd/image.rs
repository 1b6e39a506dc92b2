//! `afo image`: preprocess images for a vision-language model and report, per image,
//! the sizes, the patch grid, the pixels, the re-encoded compression ratio, the time
//! and the peak memory.

use std::path::PathBuf;
use std::time::Instant;

use afo_runtime::guard::{ByteSize, PeakTracker};
use afo_runtime::image::{DecodeLimits, Encoding, PreprocessorConfig, Resampler, prepare};

/// Arguments of `afo image`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The images (JPEG, PNG, WebP, GIF, BMP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// The model's preprocessing defaults: `qwen3-vl` or `qwen2-vl`.
    #[arg(long, default_value = "qwen3-vl", conflicts_with = "config")]
    model: String,
    /// A checkpoint's `preprocessor_config.json` (instead of --model).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the lower pixel bound.
    #[arg(long)]
    min_pixels: Option<usize>,
    /// Override the upper pixel bound.
    #[arg(long)]
    max_pixels: Option<usize>,
    /// Re-encoding for `compression_ratio`: `jpeg`, `jpeg:QUALITY` or `webp-lossless`.
    #[arg(long, default_value = "jpeg:85")]
    encode: Encoding,
    /// Resampler: `exact` (PIL's pixels) or `simd` (faster, within a few levels).
    #[arg(long, default_value = "exact")]
    resampler: Resampler,
    /// Decode large JPEGs at full size even when a reduced-scale decode would do.
    #[arg(long)]
    full_decode: bool,
    /// Largest accepted file.
    #[arg(long, default_value = "64MiB")]
    max_input: ByteSize,
}

fn config(args: &Args) -> anyhow::Result<PreprocessorConfig> {
    let mut c = match &args.config {
        Some(path) => PreprocessorConfig::from_file(path)?,
        None => match args.model.to_ascii_lowercase().as_str() {
            "qwen3-vl" | "qwen3_vl" => PreprocessorConfig::qwen3_vl(),
            "qwen2-vl" | "qwen2_vl" | "qwen2.5-vl" => PreprocessorConfig::qwen2_vl(),
            other => anyhow::bail!("--model `{other}`: expected qwen3-vl or qwen2-vl"),
        },
    };
    if let Some(min) = args.min_pixels {
        c.min_pixels = min;
    }
    if let Some(max) = args.max_pixels {
        c.max_pixels = max;
    }
    c = c
        .with_resampler(args.resampler)
        .with_reduced_jpeg_decode(!args.full_decode);
    c.validate()?;
    Ok(c)
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let config = config(args)?;
    let limits = DecodeLimits::default().with_max_input_bytes(args.max_input.0);
    let mut failed = 0usize;
    for path in &args.images {
        let peak = PeakTracker::start(None);
        let start = Instant::now();
        let result = std::fs::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| {
                let prepared = prepare(&bytes, &config, &limits)?;
                let encoded = prepared.encode(args.encode)?;
                let out = prepared.to_preprocessed(&config)?;
                Ok((out, encoded.compression_ratio))
            });
        let elapsed = start.elapsed();
        let peak = peak.finish();
        match result {
            Ok((p, ratio)) => {
                out!(
                    "{}: {} {}x{} -> {}x{}  grid_thw {:?}  tokens {}  image_pixels {} (original {})  \
                     compression_ratio {ratio:.2} ({})  {:.1} ms  peak {}",
                    path.display(),
                    p.format,
                    p.original.0,
                    p.original.1,
                    p.resized.0,
                    p.resized.1,
                    p.grid_thw,
                    p.num_image_tokens(),
                    p.image_pixels,
                    p.original_pixels,
                    args.encode,
                    elapsed.as_secs_f64() * 1e3,
                    ByteSize(peak),
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("afo image: {}: {e}", path.display());
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images failed", args.images.len());
    }
    Ok(())
}
