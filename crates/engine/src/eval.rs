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
    fn too_short_texts_and_contexts_are_errors() {
        let m = model(0.0);
        let err = perplexity(&m, &tokens(10), 16, |_, _, _| {}).unwrap_err();
        assert!(err.to_string().contains("10 tokens"), "{err}");
        assert!(perplexity(&m, &tokens(10), 1, |_, _, _| {}).is_err());
    }
}
