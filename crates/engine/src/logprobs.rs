//! Log-probabilities of sampled tokens, for the OpenAI `logprobs` field.
//!
//! [`token_logprobs`] reports a sampled token's log-probability and the most likely
//! alternatives under the model's own distribution at that step: the log-softmax of
//! the raw logits, before the logit bias, the penalties, the temperature and the
//! top-k / top-p / min-p filters (vLLM's default, `raw_logprobs`). A token that the
//! sampler could only pick because of a bias therefore shows how unlikely the model
//! found it. With a constraint (`GenerateOptions::constraint`) the logits
//! are those after its mask: the distribution over the tokens the grammar allows.
//! The work is one pass over the vocabulary for the normaliser and, with
//! alternatives, one bounded heap; nothing runs unless a request asks for it
//! ([`crate::GenerateOptions::logprobs`]).

use crate::error::{Error, Result};
use crate::sampler::top_m;

/// The most alternatives one token may report (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability and the most likely tokens at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token.
    pub token: u32,
    /// Its natural-log probability under the model's raw distribution (`<= 0`).
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first (ties by
    /// lower id); as many as were asked for, at most the vocabulary.
    pub top: Vec<(u32, f32)>,
}

/// Checks a requested number of alternatives.
///
/// # Errors
/// [`Error::InvalidSamplingParam`] (`top_logprobs`) above [`MAX_TOP_LOGPROBS`].
pub(crate) fn check_top(top: usize) -> Result<()> {
    if top > MAX_TOP_LOGPROBS {
        return Err(Error::InvalidSamplingParam {
            name: "top_logprobs",
            value: top.to_string(),
            expected: "at most 20",
        });
    }
    Ok(())
}

/// The log-probability of `token` under the log-softmax of `logits` (one per
/// vocabulary entry, raw from the model), and the `top` most likely tokens.
///
/// # Errors
/// [`Error::InvalidLogits`] when `logits` is empty, holds a NaN or no finite value,
/// or `token` is past it; [`Error::InvalidSamplingParam`] when `top` is above
/// [`MAX_TOP_LOGPROBS`].
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> Result<TokenLogprobs> {
    check_top(top)?;
    let invalid = |reason: String| Error::InvalidLogits {
        reason,
        vocab_size: logits.len(),
    };
    let chosen = *logits
        .get(token as usize)
        .ok_or_else(|| invalid(format!("token {token} is past the vocabulary")))?;
    let mut max = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            return Err(invalid(format!("logit {i} is NaN")));
        }
        max = max.max(l);
    }
    if !max.is_finite() {
        return Err(invalid(format!("the largest logit is {max}")));
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    // The log-probabilities are reported as f32, as the logits are.
    #[allow(clippy::cast_possible_truncation)]
    let logprob = |l: f32| (f64::from(l) - log_z) as f32;
    let mut best = Vec::with_capacity(top);
    top_m(logits, f32::NEG_INFINITY, top, &mut best);
    for c in &mut best {
        c.1 = logprob(c.1);
    }
    Ok(TokenLogprobs {
        token,
        logprob: logprob(chosen),
        top: best,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn matches_a_direct_log_softmax() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let want = |i: usize| (f64::from(logits[i]) - z.ln()) as f32;
        let t = token_logprobs(&logits, 4, 3).unwrap();
        assert!((t.logprob - want(4)).abs() < 1e-6, "{t:?}");
        // Ties by lower id: 1 before 3.
        let ids: Vec<u32> = t.top.iter().map(|c| c.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        for &(id, lp) in &t.top {
            assert!((lp - want(id as usize)).abs() < 1e-6, "{id}: {lp}");
        }
        let total: f64 = (0..5).map(|i| f64::from(want(i)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(token_logprobs(&[], 0, 0).is_err());
        assert!(token_logprobs(&[0.0, 1.0], 2, 0).is_err());
        assert!(token_logprobs(&[0.0, f32::NAN], 0, 0).is_err());
        assert!(token_logprobs(&[f32::NEG_INFINITY; 3], 0, 0).is_err());
        assert!(token_logprobs(&[0.0, 1.0], 0, 21).is_err());
        // More alternatives than tokens: all of them.
        assert_eq!(token_logprobs(&[0.0, 1.0], 0, 5).unwrap().top.len(), 2);
    }
}
