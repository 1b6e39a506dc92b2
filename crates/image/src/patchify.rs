//! Normalisation and the Qwen-VL patch layout.

use image::RgbImage;

use crate::{Error, PreprocessorConfig, Result};

/// Per-channel lookup table: u8 value -> normalised f32, computed in f64 as the
/// reference does (`(v * rescale - mean) / std`).
fn lut(config: &PreprocessorConfig) -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, table) in t.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            let mut x = v as f64;
            if config.do_rescale {
                x *= config.rescale_factor;
            }
            if config.do_normalize {
                x = (x - config.image_mean[c]) / config.image_std[c];
            }
            *out = x as f32;
        }
    }
    t
}

/// Normalises an RGB8 image and lays it out as Qwen-VL `pixel_values` rows: one row
/// per patch of `P x P` pixels, patches ordered by merge window (window row, window
/// column, then the `M x M` patches inside a window row-major), each row holding
/// channel, then frame (the image repeated `config.frames()` times: `T` in the full
/// layout, once in the compact one), then patch row and column.
/// Returns the flat buffer and `[grid_h, grid_w]` in patches.
pub(crate) fn patchify(
    rgb: &RgbImage,
    config: &PreprocessorConfig,
) -> Result<(Vec<f32>, [usize; 2])> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (p, m, t) = (config.patch_size, config.merge_size, config.frames());
    let factor = p * m;
    if w == 0 || h == 0 || w % factor != 0 || h % factor != 0 {
        return Err(Error::Config {
            field: "do_resize",
            reason: format!(
                "an image of {w}x{h} cannot be cut into {p}-pixel patches merged {m} x {m}: \
                 its sides must be multiples of {factor}"
            ),
        });
    }
    let (gh, gw) = (h / p, w / p);
    let dim = 3 * t * p * p;
    let lut = lut(config);
    let src = rgb.as_raw();
    let mut out = vec![0f32; gh * gw * dim];
    let mut rows = out.chunks_exact_mut(dim);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let Some(row) = rows.next() else {
                        continue;
                    };
                    let y0 = (bh * m + mh) * p;
                    let x0 = (bw * m + mw) * p;
                    // Frame 0 of every channel first, then copies for the other frames.
                    for (c, table) in lut.iter().enumerate() {
                        let base = c * t * p * p;
                        for py in 0..p {
                            let line = ((y0 + py) * w + x0) * 3;
                            let dst = &mut row[base + py * p..base + (py + 1) * p];
                            for (px, d) in dst.iter_mut().enumerate() {
                                *d = table[usize::from(src[line + px * 3 + c])];
                            }
                        }
                        let (frame0, rest) = row[base..base + t * p * p].split_at_mut(p * p);
                        for frame in rest.chunks_exact_mut(p * p) {
                            frame.copy_from_slice(frame0);
                        }
                    }
                }
            }
        }
    }
    Ok((out, [gh, gw]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference layout, written as the numpy reshape/transpose it is.
    fn reference(rgb: &RgbImage, c: &PreprocessorConfig) -> Vec<f32> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        let lut = lut(c);
        let mut out = Vec::new();
        // (bh, bw, mh, mw, ch, t, py, px)
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        for (ch, table) in lut.iter().enumerate() {
                            for _ in 0..t {
                                for py in 0..p {
                                    for px in 0..p {
                                        let y = (bh * m + mh) * p + py;
                                        let x = (bw * m + mw) * p + px;
                                        let v = rgb.get_pixel(x as u32, y as u32).0[ch];
                                        out.push(table[usize::from(v)]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn layout_matches_the_reference_reshape() -> Result<()> {
        let mut c = PreprocessorConfig::qwen2_vl();
        c.patch_size = 2;
        c.temporal_patch_size = 3;
        let rgb = RgbImage::from_fn(12, 8, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 11 + x * 3) as u8, (x * y) as u8])
        });
        let (got, grid) = patchify(&rgb, &c)?;
        assert_eq!(grid, [4, 6]);
        assert_eq!(got.len(), 24 * 3 * 3 * 2 * 2);
        assert_eq!(got, reference(&rgb, &c));
        Ok(())
    }

    #[test]
    fn normalisation_uses_mean_and_std() -> Result<()> {
        let c = PreprocessorConfig::qwen3_vl();
        let rgb = RgbImage::from_pixel(32, 32, image::Rgb([0, 255, 51]));
        let (v, _) = patchify(&rgb, &c)?;
        // Channel 0 (first 2*16*16 values) is (0 - 0.5) / 0.5 = -1, channel 1 is 1.
        assert!(v[..512].iter().all(|&x| x == -1.0));
        assert!(v[512..1024].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(
            v[1024..1536]
                .iter()
                .all(|&x| (x - (0.2 - 0.5) / 0.5).abs() < 1e-6)
        );
        Ok(())
    }

    #[test]
    fn sides_not_multiple_of_the_factor_are_refused() {
        let c = PreprocessorConfig::qwen3_vl();
        let rgb = RgbImage::new(48, 32);
        assert!(patchify(&rgb, &c).is_err());
    }
}
