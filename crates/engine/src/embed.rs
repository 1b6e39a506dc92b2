//! Embeddings from a decoder: an input's final hidden states (after the final norm,
//! before the LM head, [`Model::forward_hidden`]) pooled over its tokens and
//! L2-normalised.
//!
//! - **Pooling** ([`Pooling`]): `last`, the last token's state (a causal decoder's
//!   last position has seen the whole input; decoder embedding models such as
//!   Qwen3-Embedding and e5-mistral are trained with it; the default), or `mean`, the
//!   average over every token of the input. Each input runs alone and unpadded, so
//!   every token pooled is a real token of the input.
//! - **Normalisation**: the pooled vector is divided by its L2 norm (a vector of
//!   zeros stays zeros), so a dot product of two embeddings is their cosine.
//! - **`dimensions`**: keep the first `n` values, then normalise again, as
//!   Matryoshka representation learning does. This only makes sense for models
//!   trained that way (their leading values carry the most); for any other model it
//!   is a plain truncation that loses information. More than the hidden size is
//!   refused.
//! - **Long inputs** run through the model in chunks of [`PREFILL_CHUNK`] tokens, as
//!   the decoder's prefill does (one pass's attention scores are `chunk x input`, not
//!   `input x input`); an input longer than the model's context is refused
//!   ([`Error::InputTooLong`]).

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::generate::PREFILL_CHUNK;
use crate::model::{Logits, Model};

/// How an input's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Pooling {
    /// The last token's hidden state (the default).
    #[default]
    Last,
    /// The mean of every token's hidden state.
    Mean,
}

impl Pooling {
    /// Every pooling, by name.
    pub const ALL: [Pooling; 2] = [Pooling::Last, Pooling::Mean];

    /// Its name: `last` or `mean`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Last => "last",
            Pooling::Mean => "mean",
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pooling {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Pooling::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| Error::InvalidEmbedOption {
                name: "pooling",
                value: format!("`{s}`"),
                expected: "`last` or `mean`".to_owned(),
            })
    }
}

/// How [`embed`] pools and sizes a vector. The default: [`Pooling::Last`], every
/// dimension of the hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EmbedOptions {
    /// How the hidden states are pooled.
    pub pooling: Pooling,
    /// Keep only the first `n` values (then normalise again); `None` keeps the hidden
    /// size. Meaningful only for models trained for it (see the module docs).
    pub dimensions: Option<usize>,
}

impl EmbedOptions {
    /// The length of the vectors these options give on a model of `hidden` values
    /// per hidden state.
    ///
    /// # Errors
    /// [`Error::InvalidEmbedOption`] for `dimensions` of 0 or above `hidden`.
    pub fn output_len(&self, hidden: usize) -> Result<usize> {
        match self.dimensions {
            None => Ok(hidden),
            Some(n) if n >= 1 && n <= hidden => Ok(n),
            Some(n) => Err(Error::InvalidEmbedOption {
                name: "dimensions",
                value: n.to_string(),
                expected: format!("between 1 and the model's hidden size, {hidden}"),
            }),
        }
    }
}

/// The embedding of `tokens` on `model`: the final hidden states pooled as
/// `options` say, truncated to `options.dimensions`, L2-normalised.
///
/// # Errors
/// [`Error::EmptyPrompt`] for no tokens, [`Error::InputTooLong`] for more tokens
/// than the model's context, [`Error::InvalidEmbedOption`] for bad `dimensions`, a
/// token id out of range.
pub fn embed(model: &Model, tokens: &[u32], options: &EmbedOptions) -> Result<Vec<f32>> {
    embed_in_chunks(model, tokens, options, PREFILL_CHUNK)
}

/// [`embed`], running at most `chunk` tokens through the model per pass.
fn embed_in_chunks(
    model: &Model,
    tokens: &[u32],
    options: &EmbedOptions,
    chunk: usize,
) -> Result<Vec<f32>> {
    let config = model.config();
    let len = options.output_len(config.hidden_size)?;
    if tokens.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if tokens.len() > config.max_position {
        return Err(Error::InputTooLong {
            tokens: tokens.len(),
            context: config.max_position,
        });
    }
    let mut cache = model.new_cache(tokens.len());
    let rows = match options.pooling {
        Pooling::Last => Logits::Last,
        Pooling::Mean => Logits::All,
    };
    let mut pooled: Option<Tensor> = None;
    for chunk in tokens.chunks(chunk.max(1)) {
        let h = model.forward_hidden(chunk, &mut cache, rows)?;
        pooled = Some(match (options.pooling, pooled) {
            (Pooling::Last, _) | (Pooling::Mean, None) => h.sum(0)?,
            (Pooling::Mean, Some(sum)) => (sum + h.sum(0)?)?,
        });
    }
    let pooled = pooled.ok_or(Error::EmptyPrompt)?;
    let mut v = pooled.to_vec1::<f32>()?;
    if options.pooling == Pooling::Mean {
        let n = tokens.len() as f32;
        v.iter_mut().for_each(|x| *x /= n);
    }
    v.truncate(len);
    normalize(&mut v);
    Ok(v)
}

/// Divides `v` by its L2 norm (a vector of zeros stays zeros).
fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        v.iter_mut()
            .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn pooling_names_round_trip() {
        for p in Pooling::ALL {
            assert_eq!(p.to_string().parse::<Pooling>().unwrap(), p);
        }
        let err = "cls".parse::<Pooling>().unwrap_err().to_string();
        assert!(err.contains("pooling") && err.contains("`cls`"), "{err}");
    }

    #[test]
    fn vectors_are_normalised_and_truncated_then_renormalised() {
        let m = testing::model(0.5);
        let ids = testing::tokens(9);
        for pooling in Pooling::ALL {
            let full = embed(
                &m,
                &ids,
                &EmbedOptions {
                    pooling,
                    dimensions: None,
                },
            )
            .unwrap();
            assert_eq!(full.len(), 32);
            assert!((dot(&full, &full) - 1.0).abs() < 1e-5);
            let opts = EmbedOptions {
                pooling,
                dimensions: Some(8),
            };
            let short = embed(&m, &ids, &opts).unwrap();
            assert_eq!(short.len(), 8);
            assert!((dot(&short, &short) - 1.0).abs() < 1e-5);
            // The same direction as the first 8 values of the full vector.
            let head = &full[..8];
            let cos = dot(head, &short) / dot(head, head).sqrt();
            assert!((cos - 1.0).abs() < 1e-5, "{cos}");
        }
    }

    #[test]
    fn last_pooling_is_the_last_hidden_state_and_mean_differs() {
        let m = testing::model(0.5);
        let ids = testing::tokens(7);
        let mut cache = m.new_cache(ids.len());
        let all: Vec<Vec<f32>> = m
            .forward_hidden(&ids, &mut cache, Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut last = all[6].clone();
        normalize(&mut last);
        let got = embed(&m, &ids, &EmbedOptions::default()).unwrap();
        assert!(dot(&got, &last) > 0.99999);
        let mut mean: Vec<f32> = (0..32)
            .map(|j| all.iter().map(|r| r[j]).sum::<f32>() / 7.0)
            .collect();
        normalize(&mut mean);
        let opts = EmbedOptions {
            pooling: Pooling::Mean,
            dimensions: None,
        };
        let got_mean = embed(&m, &ids, &opts).unwrap();
        assert!(dot(&got_mean, &mean) > 0.99999);
        assert!(dot(&got_mean, &got) < 0.999);
    }

    #[test]
    fn bad_inputs_are_refused_by_name() {
        let m = testing::model(0.5);
        let too_many = EmbedOptions {
            pooling: Pooling::Last,
            dimensions: Some(33),
        };
        let err = embed(&m, &[1, 2], &too_many).unwrap_err().to_string();
        assert!(err.contains("dimensions") && err.contains("32"), "{err}");
        let zero = EmbedOptions {
            dimensions: Some(0),
            ..too_many
        };
        assert!(embed(&m, &[1, 2], &zero).is_err());
        assert!(matches!(
            embed(&m, &[], &EmbedOptions::default()),
            Err(Error::EmptyPrompt)
        ));
        let long = testing::tokens(257);
        assert!(matches!(
            embed(&m, &long, &EmbedOptions::default()),
            Err(Error::InputTooLong {
                tokens: 257,
                context: 256
            })
        ));
        assert!(embed(&m, &[testing::VOCAB as u32], &EmbedOptions::default()).is_err());
    }

    #[test]
    fn chunks_give_the_vector_of_one_pass() {
        let m = testing::model(0.5);
        let ids = testing::tokens(23);
        for pooling in Pooling::ALL {
            let opts = EmbedOptions {
                pooling,
                dimensions: None,
            };
            let whole = embed(&m, &ids, &opts).unwrap();
            let chunked = embed_in_chunks(&m, &ids, &opts, 5).unwrap();
            assert!(dot(&whole, &chunked) > 0.99999, "{pooling}");
        }
    }

    #[test]
    fn a_zero_vector_stays_zero() {
        let mut v = vec![0.0f32; 4];
        normalize(&mut v);
        assert_eq!(v, [0.0; 4]);
    }
}
