//! Perplexity, scored as llama.cpp's perplexity tool does.

use candle_core::{D, Tensor};

use crate::error::{Error, Result};
use crate::model::{Logits, Model};

/// The result of [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// `exp(mean negative log-likelihood)`.
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll: f64,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Windows run.
    pub windows: usize,
}

/// Perplexity of `model` on `tokens`, in non-overlapping windows of `ctx` tokens.
///
/// Each window runs from an empty cache; only the second half of each window is
/// scored (each scored token sees at least `ctx / 2` tokens of context), as llama.cpp's
/// `perplexity` tool does. A trailing part shorter than `ctx` is not used.
/// `on_window` is called after each window with (windows done, windows in all,
/// running perplexity).
///
/// # Errors
/// [`Error::InvalidConfig`] when `ctx < 2` or the text is shorter than one window,
/// and the model's errors.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    mut on_window: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    if ctx < 2 {
        return Err(Error::InvalidConfig {
            reason: format!("perplexity context {ctx} is too small (at least 2)"),
        });
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(Error::InvalidConfig {
            reason: format!(
                "the text has {} tokens, fewer than one window of {ctx}",
                tokens.len()
            ),
        });
    }
    let first = ctx / 2;
    let (mut nll_sum, mut scored) = (0f64, 0usize);
    for w in 0..windows {
        let chunk = &tokens[w * ctx..(w + 1) * ctx];
        let mut cache = model.new_cache(ctx);
        let logits = model.forward(chunk, &mut cache, Logits::All)?;
        // Position i predicts token i + 1; score positions first-1 .. ctx-2.
        let logits = logits.narrow(0, first - 1, ctx - first)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&chunk[first..], logits.device())?.unsqueeze(1)?;
        let picked: Vec<f32> = log_probs.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
        nll_sum -= picked.iter().map(|&x| f64::from(x)).sum::<f64>();
        scored += picked.len();
        on_window(w + 1, windows, (nll_sum / scored as f64).exp());
    }
    let nll = nll_sum / scored as f64;
    Ok(Perplexity {
        ppl: nll.exp(),
        nll,
        tokens_scored: scored,
        windows,
    })
}

/// Perplexity of `model` on `tokens` read as one long sequence through `cache` (which
/// may prune itself), `chunk` tokens per forward pass; every token after the first is
/// scored. Comparing a pruned cache's result with a full cache's measures what the
/// pruning loses.
///
/// # Errors
/// [`Error::InvalidConfig`] for fewer than 2 tokens or a zero chunk, and the model's
/// and the cache's errors.
pub fn streaming_perplexity(
    model: &Model,
    tokens: &[u32],
    chunk: usize,
    cache: &mut afo_kvcache::KvCache,
) -> Result<Perplexity> {
    if tokens.len() < 2 || chunk == 0 {
        return Err(Error::InvalidConfig {
            reason: format!(
                "streaming perplexity needs at least 2 tokens and a chunk of at least 1 (got {} and {chunk})",
                tokens.len()
            ),
        });
    }
    let (mut nll_sum, mut scored) = (0f64, 0usize);
    let mut start = 0;
    while start < tokens.len() - 1 {
        let end = (start + chunk).min(tokens.len() - 1);
        let logits = model.forward(&tokens[start..end], cache, Logits::All)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&tokens[start + 1..=end], logits.device())?.unsqueeze(1)?;
        let picked: Vec<f32> = log_probs.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
        nll_sum -= picked.iter().map(|&x| f64::from(x)).sum::<f64>();
        scored += picked.len();
        start = end;
    }
    let nll = nll_sum / scored as f64;
    Ok(Perplexity {
        ppl: nll.exp(),
        nll,
        tokens_scored: scored,
        windows: 1,
    })
}

/// How closely one model's next-token distributions follow another's: the result of
/// [`compare_models`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Fraction of positions where both models' most likely next token is the same.
    pub top1: f64,
    /// Mean `KL(p_reference || p_other)` over positions, in nats.
    pub mean_kl: f64,
    /// Largest KL divergence at one position.
    pub max_kl: f64,
    /// Positions compared.
    pub positions: usize,
}

/// Compares `other` against `reference` on every position of every sequence (one
/// forward pass each, all positions' logits): top-1 agreement and the KL divergence
/// of the next-token distributions, in f64.
///
/// # Errors
/// [`Error::InvalidConfig`] when the vocabularies differ or nothing is compared, and
/// the models' errors.
pub fn compare_models(
    reference: &Model,
    other: &Model,
    sequences: &[Vec<u32>],
) -> Result<Agreement> {
    let (mut same, mut kl_sum, mut kl_max, mut n) = (0usize, 0f64, 0f64, 0usize);
    for seq in sequences.iter().filter(|s| !s.is_empty()) {
        let logits = |m: &Model| -> Result<Vec<Vec<f32>>> {
            let mut cache = m.new_cache(seq.len());
            Ok(m.forward(seq, &mut cache, Logits::All)?.to_vec2::<f32>()?)
        };
        let (a, b) = (logits(reference)?, logits(other)?);
        for (ra, rb) in a.iter().zip(&b) {
            if ra.len() != rb.len() {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "cannot compare models with different vocabularies: {} vs {}",
                        ra.len(),
                        rb.len()
                    ),
                });
            }
            let (pa, pb) = (log_softmax64(ra), log_softmax64(rb));
            let kl: f64 = pa
                .iter()
                .zip(&pb)
                .map(|(la, lb)| la.exp() * (la - lb))
                .sum();
            kl_sum += kl.max(0.0);
            kl_max = kl_max.max(kl);
            same += usize::from(argmax(ra) == argmax(rb));
            n += 1;
        }
    }
    if n == 0 {
        return Err(Error::InvalidConfig {
            reason: "no positions to compare: every sequence is empty".into(),
        });
    }
    Ok(Agreement {
        top1: same as f64 / n as f64,
        mean_kl: kl_sum / n as f64,
        max_kl: kl_max,
        positions: n,
    })
}

fn log_softmax64(x: &[f32]) -> Vec<f64> {
    let max = x
        .iter()
        .fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
    let lse = x
        .iter()
        .map(|&v| (f64::from(v) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    x.iter().map(|&v| f64::from(v) - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{VOCAB, model, tokens};

    #[test]
    fn a_model_that_knows_nothing_has_the_vocabulary_as_perplexity() {
        // Zero weights: uniform next-token distributions.
        let mut calls = Vec::new();
        let p = perplexity(&model(0.0), &tokens(70), 16, |done, all, _| {
            calls.push((done, all))
        })
        .unwrap();
        assert_eq!((p.windows, p.tokens_scored), (4, 4 * 8));
        assert!((p.ppl - VOCAB as f64).abs() < 1e-3, "{p:?}");
        assert!((p.nll - (VOCAB as f64).ln()).abs() < 1e-5, "{p:?}");
        assert_eq!(calls, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    }

    #[test]
    fn scores_the_second_half_of_each_window() {
        // The same score computed another way: token by token through the cache,
        // log-softmax in f64.
        let m = model(0.3);
        let (ids, ctx) = (tokens(2 * 12 + 5), 12);
        let p = perplexity(&m, &ids, ctx, |_, _, _| {}).unwrap();
        let mut nll = 0f64;
        for chunk in ids.chunks_exact(ctx) {
            let mut cache = m.new_cache(ctx);
            for i in 0..ctx - 1 {
                let logits: Vec<f32> = m
                    .forward(&chunk[i..=i], &mut cache, Logits::Last)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                if i + 1 >= ctx / 2 {
                    let max = logits.iter().fold(f64::MIN, |a, &b| a.max(f64::from(b)));
                    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
                    let target = f64::from(logits[chunk[i + 1] as usize]);
                    nll -= target - max - sum.ln();
                }
            }
        }
        let want = nll / (2 * ctx / 2) as f64;
        assert_eq!(p.tokens_scored, 12);
        assert!((p.nll - want).abs() < 1e-4, "{} vs {want}", p.nll);
        assert!(p.ppl > 1.0 && p.ppl < 10.0 * VOCAB as f64, "{p:?}");
    }

    #[test]
    fn a_model_agrees_with_itself_and_not_with_a_blank_one() {
        let (m, blank) = (model(0.5), model(0.0));
        let seqs = vec![tokens(9), tokens(4)];
        let same = compare_models(&m, &m, &seqs).unwrap();
        assert_eq!((same.top1, same.positions), (1.0, 13));
        assert!(same.mean_kl.abs() < 1e-9, "{same:?}");
        let other = compare_models(&m, &blank, &seqs).unwrap();
        // The blank model is uniform: KL = ln(V) - H(p) > 0, and its argmax is token 0.
        assert!(
            other.mean_kl > 0.01 && other.max_kl >= other.mean_kl,
            "{other:?}"
        );
        assert!(other.top1 < 1.0, "{other:?}");
        assert!(compare_models(&m, &m, &[vec![]]).is_err());
    }

    #[test]
    fn streaming_perplexity_of_a_full_cache_matches_token_by_token_scoring() {
        let m = model(0.3);
        let ids = tokens(30);
        let full = |chunk| {
            let mut cache = m.new_cache(64);
            streaming_perplexity(&m, &ids, chunk, &mut cache).unwrap()
        };
        let (a, b) = (full(1), full(7));
        assert_eq!(a.tokens_scored, 29);
        assert!((a.nll - b.nll).abs() < 1e-4, "{a:?} {b:?}");
        // A pruned cache loses context: a different (here: any) score, same count.
        let mut small = m.new_pruned_cache(
            64,
            Some(8),
            afo_kvcache::PrunePolicy::SlidingWindow { window: 8 },
        );
        let p = streaming_perplexity(&m, &ids, 2, &mut small).unwrap();
        assert_eq!(p.tokens_scored, 29);
        assert!((p.nll - a.nll).abs() > 1e-6, "{p:?} {a:?}");
        assert!(small.len() <= 8);
    }

    #[test]
    fn too_short_texts_and_contexts_are_errors() {
        let m = model(0.0);
        let err = perplexity(&m, &tokens(10), 16, |_, _, _| {}).unwrap_err();
        assert!(err.to_string().contains("10 tokens"), "{err}");
        assert!(perplexity(&m, &tokens(10), 1, |_, _, _| {}).is_err());
    }
}
