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
