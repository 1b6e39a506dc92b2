//! Qwen3-VL's vision encoder on candle-core ops: patch embedding, interpolated learned
//! positions, 2-D rotary attention within each image, the 2 x 2 patch merger, and the
//! DeepStack features taken from intermediate blocks.
//!
//! Input is the preprocessed `pixel_values` (`[patches, C x T x P x P]`, patches in
//! merge-window order, as `afo-image` and the Hugging Face processor lay them out) and
//! each image's grid `[t, h, w]` in patches. Output is one row per merged token
//! (`[patches / merge², out_hidden]`) plus one such matrix per DeepStack block.

use afo_quant::QLinear;
use candle_core::op::{Gelu, GeluErf, Silu};
use candle_core::{DType, Device, Tensor};

use super::config::{VisionActivation, VisionConfig};
use crate::activation::{add, unary};
use crate::error::{Error, Result};
use crate::hf::SafetensorsDir;

/// Layer norm weight and bias.
#[derive(Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            1e-6,
        )?)
    }
}

#[derive(Debug)]
struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: QLinear,
    proj: QLinear,
    fc1: QLinear,
    fc2: QLinear,
}

/// Merges `merge²` neighbouring patches into one language-model token.
#[derive(Debug)]
struct Merger {
    norm: Norm,
    /// Normalize after the patches are concatenated (DeepStack mergers) rather than
    /// each patch before.
    postshuffle: bool,
    fc1: QLinear,
    fc2: QLinear,
}

/// The vision encoder.
#[derive(Debug)]
pub struct VisionEncoder {
    config: VisionConfig,
    patch_embed: QLinear,
    /// The patch kernel summed over its frames: a still image's patch rows may hold one
    /// frame (`C x P x P`), the other frames being the same.
    still_embed: QLinear,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<Merger>,
    inv_freq: Vec<f32>,
}

/// Reads the weights under `prefix` (e.g. `model.visual.`).
struct Weights<'a> {
    dir: &'a SafetensorsDir,
    prefix: &'a str,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self
            .dir
            .checked_hf(&format!("{}{name}", self.prefix), shape)?
            .to_dtype(DType::F32)?)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<QLinear> {
        let weight = self.get(&format!("{name}.weight"), &[out, inp])?;
        let bias = self.get(&format!("{name}.bias"), &[out])?;
        Ok(QLinear::dense(
            &format!("{}{name}.weight", self.prefix),
            weight,
            Some(bias),
        )?)
    }

    fn norm(&self, name: &str, dim: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.get(&format!("{name}.weight"), &[dim])?,
            bias: self.get(&format!("{name}.bias"), &[dim])?,
        })
    }

    fn merger(&self, name: &str, c: &VisionConfig, postshuffle: bool) -> Result<Merger> {
        let merged = c.hidden_size * c.merge_size * c.merge_size;
        Ok(Merger {
            norm: self.norm(
                &format!("{name}.norm"),
                if postshuffle { merged } else { c.hidden_size },
            )?,
            postshuffle,
            fc1: self.linear(&format!("{name}.linear_fc1"), merged, merged)?,
            fc2: self.linear(&format!("{name}.linear_fc2"), c.out_hidden_size, merged)?,
        })
    }
}

impl VisionEncoder {
    /// Loads the encoder's weights (Hugging Face names under `prefix`).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] or [`Error::TensorShape`] naming the tensor.
    pub(crate) fn load(config: VisionConfig, dir: &SafetensorsDir, prefix: &str) -> Result<Self> {
        let w = Weights { dir, prefix };
        let c = &config;
        let h = c.hidden_size;
        let conv = w.get(
            "patch_embed.proj.weight",
            &[
                h,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
        )?;
        // A convolution whose kernel and stride are the patch, over exactly one patch,
        // is a matrix product with the flattened kernel (same C, T, P, P order).
        let bias = w.get("patch_embed.proj.bias", &[h])?;
        let patch_embed = QLinear::dense(
            &format!("{prefix}patch_embed.proj.weight"),
            conv.reshape((h, c.patch_values()))?,
            Some(bias.clone()),
        )?;
        // T identical frames through the kernel: one frame through the kernel's sum
        // over T.
        let still_embed = QLinear::dense(
            &format!("{prefix}patch_embed.proj.weight (summed over frames)"),
            conv.sum(2)?
                .reshape((h, c.in_channels * c.patch_size * c.patch_size))?,
            Some(bias),
        )?;
        let pos_embed = w.get("pos_embed.weight", &[c.num_position_embeddings, h])?;
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let p = |s: &str| format!("blocks.{i}.{s}");
            blocks.push(Block {
                norm1: w.norm(&p("norm1"), h)?,
                norm2: w.norm(&p("norm2"), h)?,
                qkv: w.linear(&p("attn.qkv"), 3 * h, h)?,
                proj: w.linear(&p("attn.proj"), h, h)?,
                fc1: w.linear(&p("mlp.linear_fc1"), c.intermediate_size, h)?,
                fc2: w.linear(&p("mlp.linear_fc2"), h, c.intermediate_size)?,
            });
        }
        let merger = w.merger("merger", c, false)?;
        let deepstack = (0..c.deepstack_indexes.len())
            .map(|k| w.merger(&format!("deepstack_merger_list.{k}"), c, true))
            .collect::<Result<Vec<_>>>()?;
        // 2-D rotary: a quarter of each head's dimensions per axis.
        let rot_dim = h / c.num_heads / 2;
        let inv_freq = (0..rot_dim)
            .step_by(2)
            .map(|i| 1.0 / 10_000f32.powf(i as f32 / rot_dim as f32))
            .collect();
        Ok(Self {
            config,
            patch_embed,
            still_embed,
            pos_embed,
            blocks,
            merger,
            deepstack,
            inv_freq,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Bytes the weights hold.
    pub fn weight_bytes(&self) -> u64 {
        let t = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let n = |n: &Norm| t(&n.weight) + t(&n.bias);
        let m = |m: &Merger| n(&m.norm) + m.fc1.bytes() + m.fc2.bytes();
        self.patch_embed.bytes()
            + self.still_embed.bytes()
            + t(&self.pos_embed)
            + self
                .blocks
                .iter()
                .map(|b| {
                    n(&b.norm1)
                        + n(&b.norm2)
                        + b.qkv.bytes()
                        + b.proj.bytes()
                        + b.fc1.bytes()
                        + b.fc2.bytes()
                })
                .sum::<u64>()
            + m(&self.merger)
            + self.deepstack.iter().map(m).sum::<u64>()
    }

    /// Checks `pixel_values` against the grids: one row of `C x T x P x P` values per
    /// patch (or `C x P x P`: a still image's one frame), `t x h x w` patches per
    /// image, `h` and `w` multiples of the merge size. Returns whether the rows hold
    /// one frame.
    fn check_inputs(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<bool> {
        let c = &self.config;
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        let (rows, cols) = pixel_values.dims2().map_err(|_| Error::InvalidConfig {
            reason: format!(
                "pixel_values have shape {:?}, not [patches, {}]",
                pixel_values.dims(),
                c.patch_values()
            ),
        })?;
        let one_frame = c.in_channels * c.patch_size * c.patch_size;
        if cols != c.patch_values() && cols != one_frame {
            return bad(format!(
                "pixel_values rows hold {cols} values; this encoder takes {} (channels {} x frames {} x patch {}²) or {one_frame} (one frame of a still image)",
                c.patch_values(),
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size
            ));
        }
        let mut total = 0usize;
        for (i, g) in grids.iter().enumerate() {
            if g.contains(&0) || g[1] % c.merge_size != 0 || g[2] % c.merge_size != 0 {
                return bad(format!(
                    "image {i}: grid {g:?} is empty or not a multiple of the merge size {}",
                    c.merge_size
                ));
            }
            total = total.saturating_add(g[0].saturating_mul(g[1]).saturating_mul(g[2]));
        }
        if total != rows {
            return bad(format!(
                "pixel_values hold {rows} patches but the grids {grids:?} describe {total}"
            ));
        }
        Ok(cols != c.patch_values())
    }

    /// Encodes images: returns the merged features `[patches / merge², out_hidden]`
    /// and the DeepStack features (same shape, one per DeepStack block).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `pixel_values` and `grids` disagree with each
    /// other or with the encoder; tensor errors.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let one_frame = self.check_inputs(pixel_values, grids)?;
        let device = pixel_values.device();
        let embed = if one_frame {
            &self.still_embed
        } else {
            &self.patch_embed
        };
        let x = embed.forward(&pixel_values.to_dtype(DType::F32)?)?;
        let mut x = add(&x, &self.position_embeddings(grids, device)?)?;
        let (cos, sin) = self.rotary(grids, device)?;
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block(block, &x, grids, &cos, &sin)?;
            if let Some(k) = self.config.deepstack_indexes.iter().position(|&d| d == i) {
                deepstack.push(self.merge(&self.deepstack[k], &x)?);
            }
        }
        Ok((self.merge(&self.merger, &x)?, deepstack))
    }

    fn block(
        &self,
        b: &Block,
        x: &Tensor,
        grids: &[[usize; 3]],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let h = b.norm1.forward(x)?;
        let attn = self.attention(b, &h, grids, cos, sin)?;
        let x = add(x, &attn)?;
        let h = b.norm2.forward(&x)?;
        let h = b.fc1.forward(&h)?;
        let h = match self.config.activation {
            VisionActivation::GeluTanh => unary::<Gelu>(&h, Tensor::gelu)?,
            VisionActivation::Gelu => unary::<GeluErf>(&h, Tensor::gelu_erf)?,
            VisionActivation::Silu => unary::<Silu>(&h, Tensor::silu)?,
        };
        add(&x, &b.fc2.forward(&h)?)
    }

    /// Full (non-causal) attention within each frame of each image.
    fn attention(
        &self,
        b: &Block,
        x: &Tensor,
        grids: &[[usize; 3]],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = x.dim(0)?;
        let heads = c.num_heads;
        let hd = c.hidden_size / heads;
        let qkv = b.qkv.forward(x)?.reshape((n, 3, heads, hd))?;
        // [1, heads, n, hd] each, views of `qkv`: RoPE takes contiguous copies of q and
        // k; the attention kernel reads v in place through its strides.
        let part = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, i, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .unsqueeze(0)?)
        };
        let q = candle_nn::rotary_emb::rope(&part(0)?.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&part(1)?.contiguous()?, cos, sin)?;
        let v = part(2)?;
        // Each frame's patches attend to each other, through the fused kernel: no
        // score matrix (`heads x patches x patches`) is materialised.
        // Every frame of every image in one parallel region.
        let mut frames = Vec::new();
        let mut start = 0usize;
        for g in grids {
            let frame = g[1] * g[2];
            for _ in 0..g[0] {
                let f = |x: &Tensor| x.narrow(2, start, frame);
                frames.push([f(&q)?, f(&k)?, f(&v)?]);
                start += frame;
            }
        }
        let calls: Vec<_> = frames
            .iter()
            .map(|[q, k, v]| crate::attention::Call {
                q,
                k,
                v,
                window: usize::MAX,
            })
            .collect();
        let mut outputs = crate::attention::full_attention_many(&calls)?;
        let out = match outputs.len() {
            1 => outputs.swap_remove(0),
            _ => Tensor::cat(&outputs, 0)?,
        };
        Ok(b.proj.forward(&out)?)
    }

    fn merge(&self, m: &Merger, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let unit = c.merge_size * c.merge_size;
        let n = x.dim(0)?;
        let merged = c.hidden_size * unit;
        let h = if m.postshuffle {
            m.norm.forward(&x.reshape((n / unit, merged))?)?
        } else {
            m.norm.forward(x)?.reshape((n / unit, merged))?
        };
        let h = unary::<GeluErf>(&m.fc1.forward(&h)?, Tensor::gelu_erf)?;
        Ok(m.fc2.forward(&h)?)
    }

    /// The learned positions, bilinearly interpolated from their square grid to each
    /// image's grid, in merge-window order.
    fn position_embeddings(&self, grids: &[[usize; 3]], device: &Device) -> Result<Tensor> {
        let c = &self.config;
        let side = c.position_grid_side();
        let m = c.merge_size;
        let points = |steps: usize| -> Vec<f32> {
            if steps == 1 {
                return vec![0.0];
            }
            let step = (side - 1) as f32 / (steps - 1) as f32;
            (0..steps).map(|i| i as f32 * step).collect()
        };
        let mut idx: [Vec<u32>; 4] = Default::default();
        let mut weights: [Vec<f32>; 4] = Default::default();
        for g in grids {
            let (h, w) = (g[1], g[2]);
            let (hs, ws) = (points(h), points(w));
            // Row-major over the patch grid, then reordered into merge windows.
            let mut order = Vec::with_capacity(h * w);
            for br in 0..h / m {
                for bc in 0..w / m {
                    for ir in 0..m {
                        for ic in 0..m {
                            order.push(((br * m + ir), (bc * m + ic)));
                        }
                    }
                }
            }
            for _ in 0..g[0] {
                for &(r, col) in &order {
                    let (hv, wv) = (hs[r], ws[col]);
                    let (hf, wf) = (hv.floor() as usize, wv.floor() as usize);
                    let (hc, wc) = ((hf + 1).min(side - 1), (wf + 1).min(side - 1));
                    let (dh, dw) = (hv - hf as f32, wv - wf as f32);
                    let corners = [
                        (hf * side + wf, (1.0 - dh) * (1.0 - dw)),
                        (hf * side + wc, (1.0 - dh) * dw),
                        (hc * side + wf, dh * (1.0 - dw)),
                        (hc * side + wc, dh * dw),
                    ];
                    for (k, (i, wt)) in corners.into_iter().enumerate() {
                        idx[k].push(i as u32);
                        weights[k].push(wt);
                    }
                }
            }
        }
        let mut total: Option<Tensor> = None;
        for (i, w) in idx.into_iter().zip(weights) {
            let n = i.len();
            let rows = self
                .pos_embed
                .index_select(&Tensor::from_vec(i, n, device)?, 0)?;
            let part = scale_rows(&rows, w)?;
            total = Some(match total {
                Some(t) => add(&t, &part)?,
                None => part,
            });
        }
        total.ok_or_else(|| Error::InvalidConfig {
            reason: "no image to encode".into(),
        })
    }

    /// cos and sin of the 2-D rotary angles, `[patches, head_dim / 2]`: the first half
    /// of the frequencies turn with the patch's row, the second with its column.
    fn rotary(&self, grids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let m = self.config.merge_size;
        let f = &self.inv_freq;
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for g in grids {
            for _ in 0..g[0] {
                for br in 0..g[1] / m {
                    for bc in 0..g[2] / m {
                        for ir in 0..m {
                            for ic in 0..m {
                                let (r, col) = ((br * m + ir) as f32, (bc * m + ic) as f32);
                                for pos in [r, col] {
                                    for fr in f {
                                        let a = pos * fr;
                                        cos.push(a.cos());
                                        sin.push(a.sin());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let width = 2 * f.len();
        let n = cos.len() / width.max(1);
        Ok((
            Tensor::from_vec(cos, (n, width), device)?,
            Tensor::from_vec(sin, (n, width), device)?,
        ))
    }
}

/// Row `i` of `rows` (`[n, width]`) times `w[i]`: candle's broadcast product, the same
/// bits, computed here for f32 rows so that it does not start candle's pool for
/// element-wise operations (see [`crate::activation::unary`]).
fn scale_rows(rows: &Tensor, w: Vec<f32>) -> Result<Tensor> {
    let width = rows.elem_count() / w.len().max(1);
    let scaled = afo_quant::in_place(rows, |r: &[f32]| -> Vec<f32> {
        r.chunks_exact(width.max(1))
            .zip(&w)
            .flat_map(|(row, &s)| row.iter().map(move |v| v * s))
            .collect()
    });
    Ok(match scaled {
        Ok(v) if v.len() == rows.elem_count() => Tensor::from_vec(v, rows.shape(), rows.device())?,
        _ => {
            let n = w.len();
            let w = Tensor::from_vec(w, (n, 1), rows.device())?.to_dtype(rows.dtype())?;
            rows.broadcast_mul(&w)?
        }
    })
}

/// The number of language-model tokens an image of grid `[t, h, w]` becomes.
pub fn image_tokens(grid: [usize; 3], merge_size: usize) -> usize {
    grid[0] * grid[1] * grid[2] / (merge_size * merge_size).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_rows_are_candles_broadcast_product_bit_for_bit() {
        let dev = Device::Cpu;
        let (n, width) = (5, 7);
        let values: Vec<f32> = (0..n * width)
            .map(|i| (i as f32 * 0.73).sin() * 3.1)
            .collect();
        let w: Vec<f32> = (0..n).map(|i| 0.1 + i as f32 / 3.0).collect();
        let rows = Tensor::from_vec(values, (n, width), &dev).unwrap();
        let want: Vec<Vec<f32>> = rows
            .broadcast_mul(&Tensor::from_vec(w.clone(), (n, 1), &dev).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let got = scale_rows(&rows, w.clone()).unwrap();
        assert_eq!(got.dims(), &[n, width]);
        let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
        for (g, e) in got.iter().flatten().zip(want.iter().flatten()) {
            assert_eq!(g.to_bits(), e.to_bits());
        }
        // Rows in another dtype take candle's product, in that dtype.
        let half = rows.to_dtype(DType::F16).unwrap();
        let got = scale_rows(&half, w.clone()).unwrap();
        let w16 = Tensor::from_vec(w, (n, 1), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert_eq!(got.dtype(), DType::F16);
        assert_eq!(
            got.to_vec2::<half::f16>().unwrap(),
            half.broadcast_mul(&w16)
                .unwrap()
                .to_vec2::<half::f16>()
                .unwrap()
        );
    }
}
