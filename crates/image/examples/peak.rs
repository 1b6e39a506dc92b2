//! Peak memory of one preprocessing run, ours or the naive path, read from the
//! process's high-water mark (`VmHWM` in `/proc/self/status`). Run each in its own
//! process:
//!
//! ```sh
//! cargo run --release -p afo-image --example peak -- ours    PHOTO.jpg [qwen3-vl|qwen2-vl]
//! cargo run --release -p afo-image --example peak -- compact PHOTO.jpg [qwen3-vl|qwen2-vl]
//! cargo run --release -p afo-image --example peak -- naive PHOTO.jpg [qwen3-vl|qwen2-vl] [MAX_PIXELS]
//! ```
//!
//! The naive path is what a straightforward port of the reference does: decode at full
//! size, convert the whole image to f32, resize in f32 (the same SIMD resizer, in
//! float), then normalise and patchify. Ours decodes (at reduced scale where a JPEG
//! allows), resizes in u8 and writes floats only into the output tensor. `compact` is
//! ours with [`PixelLayout::Compact`]: the still image's frame stored once instead of
//! `temporal_patch_size` times.

use std::time::Instant;

use afo_image::{DecodeLimits, PixelLayout, PreprocessorConfig, preprocess, smart_resize};
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use fast_image_resize as fr;

fn vm_hwm() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb * 1024)
}

/// Decode full size -> f32 -> resize in f32 -> normalise into a new buffer ->
/// patchify into the output.
fn naive(bytes: &[u8], c: &PreprocessorConfig) -> Result<(Tensor, [usize; 3])> {
    let img = image::load_from_memory(bytes)?;
    let (w, h) = (img.width(), img.height());
    let rgb = img.into_rgb8();
    // The full-size float image, in [0, 1].
    let full: Vec<fr::pixels::F32x3> = rgb
        .pixels()
        .map(|p| fr::pixels::F32x3::new(p.0.map(|v| f32::from(v) / 255.0)))
        .collect();
    drop(rgb);
    let (th, tw) = smart_resize(
        h as usize,
        w as usize,
        c.factor(),
        c.min_pixels,
        c.max_pixels,
    )?;
    let src = fr::images::ImageRef::from_pixels(w, h, &full)?;
    let mut dst = fr::images::Image::new(tw as u32, th as u32, fr::PixelType::F32x3);
    fr::Resizer::new().resize(
        &src,
        &mut dst,
        &fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom)),
    )?;
    drop(full);
    let resized = dst.buffer();
    let sample = |i: usize| {
        let b = &resized[i * 4..i * 4 + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    // `(x - mean) / std` over the whole image, as array code writes it.
    let norm: Vec<f32> = (0..tw * th * 3)
        .map(|i| ((f64::from(sample(i)) - c.image_mean[i % 3]) / c.image_std[i % 3]) as f32)
        .collect();
    drop(dst);
    let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
    let (gh, gw) = (th / p, tw / p);
    let mut out = Vec::with_capacity(gh * gw * 3 * t * p * p);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    for ch in 0..3 {
                        for _ in 0..t {
                            for py in 0..p {
                                for px in 0..p {
                                    let y = (bh * m + mh) * p + py;
                                    let x = (bw * m + mw) * p + px;
                                    out.push(norm[(y * tw + x) * 3 + ch]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    drop(norm);
    let dim = 3 * t * p * p;
    Ok((
        Tensor::from_vec(out, (gh * gw, dim), &Device::Cpu)?,
        [1, gh, gw],
    ))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: peak naive|ours|compact FILE [qwen3-vl|qwen2-vl] [MAX_PIXELS]");
    }
    let mut config = match args.get(3).map(String::as_str) {
        None | Some("qwen3-vl") => PreprocessorConfig::qwen3_vl(),
        Some("qwen2-vl") => PreprocessorConfig::qwen2_vl(),
        Some(other) => bail!("unknown config {other}"),
    };
    if let Some(max) = args.get(4) {
        config.max_pixels = max.parse()?;
    }
    let bytes = std::fs::read(&args[2])?;
    let before = vm_hwm()?;
    let start = Instant::now();
    let (rows, grid) = match args[1].as_str() {
        "ours" => {
            let p = preprocess(&bytes, &config, &DecodeLimits::default())?;
            (p.pixel_values.dims()[0], p.grid_thw)
        }
        "compact" => {
            let config = config.clone().with_pixel_layout(PixelLayout::Compact);
            let p = preprocess(&bytes, &config, &DecodeLimits::default())?;
            (p.pixel_values.dims()[0], p.grid_thw)
        }
        "naive" => {
            let (t, g) = naive(&bytes, &config)?;
            (t.dims()[0], g)
        }
        other => bail!("unknown path {other}: naive, ours or compact"),
    };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let peak = vm_hwm()?;
    println!(
        "path={} file={} grid_thw={grid:?} patches={rows} time_ms={ms:.0} peak_mib={:.1} before_mib={:.1}",
        args[1],
        args[2],
        peak as f64 / (1 << 20) as f64,
        before as f64 / (1 << 20) as f64,
    );
    Ok(())
}
