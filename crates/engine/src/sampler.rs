//! Sampling the next token from logits.
//!
//! [`Sampler::sample`] applies, in order:
//!
//! 1. the logit bias (`-inf` bans a token);
//! 2. penalties over the history (the last `penalty_last_n` ids, or all): the
//!    repetition penalty as in Hugging Face and llama.cpp (a positive logit is divided
//!    by it, a negative one multiplied, once per distinct token), then OpenAI's
//!    presence and frequency penalties (`logit -= presence * [count > 0] + frequency *
//!    count`);
//! 3. with temperature 0 (or `top_k == 1`), the arg-max (lowest id on ties);
//! 4. otherwise temperature, then top-k, top-p and min-p, as `transformers` orders
//!    them, and a draw from what is left.
//!
//! Min-p keeps the tokens whose probability is at least `min_p` times the best one's;
//! it keeps a head of the sorted order, as top-p does, so it is applied first, as a
//! logit floor, and top-p is then measured against the mass before min-p, which gives
//! the same result as top-p followed by min-p.
//!
//! The work is about one pass over the vocabulary and allocation-free after the first
//! call: top-k is a bounded heap (most logits fail one comparison with its root), and
//! top-p sorts only a head of the most likely tokens, growing it until it holds the
//! requested mass.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Sampling parameters, validated. Build with [`SamplingParamsBuilder`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    penalty_last_n: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Plain sampling from the softmax: temperature 1, no filter, no penalty.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: None,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// A builder with the defaults of [`SamplingParams::default`].
    pub fn builder() -> SamplingParamsBuilder {
        SamplingParamsBuilder::new()
    }

    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// The temperature; 0 means greedy.
    pub fn temperature(&self) -> f32 {
        self.temperature
    }
    /// Top-k; 0 means disabled.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// Top-p (nucleus); 1 means disabled.
    pub fn top_p(&self) -> f32 {
        self.top_p
    }
    /// Min-p; 0 means disabled.
    pub fn min_p(&self) -> f32 {
        self.min_p
    }
    /// The repetition penalty; 1 means none.
    pub fn repetition_penalty(&self) -> f32 {
        self.repetition_penalty
    }
    /// The presence penalty; 0 means none.
    pub fn presence_penalty(&self) -> f32 {
        self.presence_penalty
    }
    /// The frequency penalty; 0 means none.
    pub fn frequency_penalty(&self) -> f32 {
        self.frequency_penalty
    }
    /// How many of the latest history ids the penalties look at; `None` is all.
    pub fn penalty_last_n(&self) -> Option<usize> {
        self.penalty_last_n
    }
    /// The logit bias, one entry per token id, sorted by id.
    pub fn logit_bias(&self) -> &[(u32, f32)] {
        &self.logit_bias
    }
    /// The random seed; `None` seeds from the operating system.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }
    /// Whether sampling always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// Builds [`SamplingParams`]; [`SamplingParamsBuilder::build`] checks every value.
#[derive(Debug, Clone, Default)]
pub struct SamplingParamsBuilder {
    params: SamplingParams,
}

impl SamplingParamsBuilder {
    /// A builder with the defaults of [`SamplingParams::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Temperature, finite and `>= 0`; 0 is greedy. Default 1.
    pub fn temperature(mut self, t: f32) -> Self {
        self.params.temperature = t;
        self
    }
    /// Keep only the `k` most likely tokens; 0 disables. Default 0.
    pub fn top_k(mut self, k: usize) -> Self {
        self.params.top_k = k;
        self
    }
    /// Keep the smallest set of most likely tokens whose probability reaches `p`, in
    /// `(0, 1]`; 1 disables. Default 1.
    pub fn top_p(mut self, p: f32) -> Self {
        self.params.top_p = p;
        self
    }
    /// Drop tokens less likely than `p` times the most likely one, in `[0, 1]`; 0
    /// disables. Default 0.
    pub fn min_p(mut self, p: f32) -> Self {
        self.params.min_p = p;
        self
    }
    /// Repetition penalty, finite and `> 0`; 1 disables. Default 1.
    pub fn repetition_penalty(mut self, p: f32) -> Self {
        self.params.repetition_penalty = p;
        self
    }
    /// Presence penalty in `[-2, 2]` (OpenAI's range). Default 0.
    pub fn presence_penalty(mut self, p: f32) -> Self {
        self.params.presence_penalty = p;
        self
    }
    /// Frequency penalty in `[-2, 2]` (OpenAI's range). Default 0.
    pub fn frequency_penalty(mut self, p: f32) -> Self {
        self.params.frequency_penalty = p;
        self
    }
    /// Penalise only the last `n` ids of the history. Default: the whole history.
    pub fn penalty_last_n(mut self, n: usize) -> Self {
        self.params.penalty_last_n = Some(n);
        self
    }
    /// Adds `bias` to token `id`'s logit (finite, or `-inf` to ban it); a second bias
    /// for the same id replaces the first. Default: none.
    pub fn logit_bias(mut self, id: u32, bias: f32) -> Self {
        match self.params.logit_bias.iter_mut().find(|(t, _)| *t == id) {
            Some(entry) => entry.1 = bias,
            None => self.params.logit_bias.push((id, bias)),
        }
        self
    }
    /// Sets the whole logit bias map, replacing earlier entries.
    pub fn logit_bias_map(mut self, map: &HashMap<u32, f32>) -> Self {
        self.params.logit_bias = map.iter().map(|(&k, &v)| (k, v)).collect();
        self
    }
    /// Seed for reproducible draws. Default: seeded from the operating system.
    pub fn seed(mut self, seed: u64) -> Self {
        self.params.seed = Some(seed);
        self
    }

    /// Checks every value and returns the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidSamplingParam`] naming the first bad value.
    pub fn build(self) -> Result<SamplingParams> {
        let mut p = self.params;
        let bad = |name: &'static str, value: f32, expected: &'static str| {
            Err(Error::InvalidSamplingParam {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return bad("temperature", p.temperature, "a finite number >= 0");
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad("top_p", p.top_p, "a number in (0, 1]");
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return bad("min_p", p.min_p, "a number in [0, 1]");
        }
        if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                p.repetition_penalty,
                "a finite number > 0",
            );
        }
        if !(-2.0..=2.0).contains(&p.presence_penalty) {
            return bad(
                "presence_penalty",
                p.presence_penalty,
                "a number in [-2, 2]",
            );
        }
        if !(-2.0..=2.0).contains(&p.frequency_penalty) {
            return bad(
                "frequency_penalty",
                p.frequency_penalty,
                "a number in [-2, 2]",
            );
        }
        for &(id, bias) in &p.logit_bias {
            if !(bias.is_finite() || bias == f32::NEG_INFINITY) {
                return Err(Error::InvalidSamplingParam {
                    name: "logit_bias",
                    value: format!("{bias} for token {id}"),
                    expected: "a finite number, or -inf to ban the token",
                });
            }
        }
        p.logit_bias.sort_by_key(|&(id, _)| id);
        Ok(p)
    }
}

/// Orders candidates by probability (or logit), highest first, ties by lower id, so
/// that the order, and therefore the draw, is reproducible.
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Draws token ids from logits. Reuses its buffers across calls.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    logits: Vec<f32>,
    candidates: Vec<(u32, f32)>,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for `params`, seeded from [`SamplingParams::seed`].
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            logits: Vec::new(),
            candidates: Vec::new(),
            counts: HashMap::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Restarts the random sequence from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Picks the next token from `logits` (one per vocabulary entry), given the ids
    /// generated so far (and the prompt, if it should be penalised too) in `history`.
    ///
    /// # Errors
    /// [`Error::InvalidLogits`] when `logits` is empty, holds a NaN, has every token
    /// banned, or is shorter than a biased or history id.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let n = logits.len();
        let invalid = |reason: String| Error::InvalidLogits {
            reason,
            vocab_size: n,
        };
        if n == 0 {
            return Err(invalid("no logits".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(invalid("more than 2^32 logits".into()));
        }
        // Greedy with nothing to add to the logits: the arg-max of the logits as they
        // are, without copying them (the greedy return below ends the call).
        let as_given = self.params.is_greedy()
            && self.params.logit_bias.is_empty()
            && !self.params.has_penalties();
        if !as_given {
            self.logits.clear();
            self.logits.extend_from_slice(logits);
        }

        for &(id, bias) in &self.params.logit_bias {
            let slot = self.logits.get_mut(id as usize).ok_or_else(|| {
                invalid(format!("logit bias names token {id}, past the vocabulary"))
            })?;
            *slot += bias;
        }

        if self.params.has_penalties() {
            let window = match self.params.penalty_last_n {
                Some(last) => &history[history.len().saturating_sub(last)..],
                None => history,
            };
            self.counts.clear();
            for &id in window {
                *self.counts.entry(id).or_insert(0) += 1;
            }
            let p = &self.params;
            for (&id, &count) in &self.counts {
                let slot = self.logits.get_mut(id as usize).ok_or_else(|| {
                    invalid(format!("history holds token {id}, past the vocabulary"))
                })?;
                if p.repetition_penalty != 1.0 {
                    *slot = if *slot > 0.0 {
                        *slot / p.repetition_penalty
                    } else {
                        *slot * p.repetition_penalty
                    };
                }
                // Exact for any realistic count (< 2^24).
                #[allow(clippy::cast_precision_loss)]
                let c = count as f32;
                *slot -= p.presence_penalty + p.frequency_penalty * c;
            }
        }

        let scored: &[f32] = if as_given { logits } else { &self.logits };
        let (best, best_logit) =
            argmax(scored).map_err(|i| invalid(format!("logit {i} is NaN")))?;
        if best_logit == f32::NEG_INFINITY {
            return Err(invalid(
                "every token is banned (all logits are -inf)".into(),
            ));
        }
        let best = u32::try_from(best).map_err(|_| invalid("index overflow".into()))?;
        if self.params.is_greedy() || best_logit == f32::INFINITY {
            return Ok(best);
        }

        let temperature = self.params.temperature;
        let inv_t = 1.0 / temperature;
        // Min-p in logit space: p / p_max >= min_p  <=>  l >= best + T ln(min_p). Tokens
        // below the floor are never exponentiated.
        let floor = if self.params.min_p > 0.0 {
            best_logit + temperature * self.params.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let top_k = self.params.top_k;
        let top_p = self.params.top_p;

        // Top-p is measured against the mass before min-p (see the module docs), so
        // with top-p every kept logit is exponentiated; without it, only those above
        // the min-p floor.
        let use_top_p = top_p < 1.0;
        if top_k == 0 || top_k >= n {
            // Softmax numerators in place (0 below the floor); the best token gets 1.
            let mut total = 0.0f64;
            let mut kept = 0.0f64;
            for l in &mut self.logits {
                if *l == f32::NEG_INFINITY || (*l < floor && !use_top_p) {
                    *l = 0.0;
                    continue;
                }
                let p = ((*l - best_logit) * inv_t).exp();
                total += f64::from(p);
                *l = if *l >= floor { p } else { 0.0 };
                kept += f64::from(*l);
            }
            if !use_top_p {
                return Ok(draw(
                    &mut self.rng,
                    self.logits.iter().enumerate().map(|(i, &p)| (i, p)),
                    kept,
                    best as usize,
                ));
            }
            // Top-p: sort only a head of the most likely tokens, growing it until it
            // holds the mass.
            let target = f64::from(top_p) * total;
            let mut m = 64usize;
            loop {
                top_m(&self.logits, 0.0, m, &mut self.candidates);
                let cut = cumulative_cut(&self.candidates, target);
                if cut.is_some() || self.candidates.len() < m || m >= n {
                    let cut = cut.unwrap_or(self.candidates.len());
                    self.candidates.truncate(cut);
                    break;
                }
                m = m.saturating_mul(8);
            }
        } else {
            // Top-k: a bounded heap over the logits, then probabilities for k tokens.
            let above = if floor > f32::NEG_INFINITY && !use_top_p {
                // `top_m` keeps values strictly above its floor.
                floor.next_down()
            } else {
                f32::NEG_INFINITY
            };
            top_m(&self.logits, above, top_k, &mut self.candidates);
            let mut total = 0.0f64;
            for c in &mut self.candidates {
                let l = c.1;
                c.1 = ((l - best_logit) * inv_t).exp();
                total += f64::from(c.1);
                if l < floor {
                    c.1 = 0.0;
                }
            }
            if use_top_p {
                // Min-p zeroed a tail of the sorted list; the cut cannot pass it.
                let kept = self.candidates.iter().take_while(|c| c.1 > 0.0).count();
                let cut = cumulative_cut(&self.candidates, f64::from(top_p) * total);
                self.candidates.truncate(cut.unwrap_or(kept).min(kept));
            }
        }

        let mass: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        Ok(draw(
            &mut self.rng,
            self.candidates.iter().map(|&(id, p)| (id as usize, p)),
            mass,
            best as usize,
        ))
    }
}

/// Draws an index with probability proportional to its weight; `mass` is the sum of
/// the weights. Returns `fallback` only if every weight is zero.
fn draw(
    rng: &mut StdRng,
    weights: impl Iterator<Item = (usize, f32)>,
    mass: f64,
    fallback: usize,
) -> u32 {
    let mut r = rng.random::<f64>() * mass;
    let mut last = fallback;
    for (i, p) in weights {
        if p <= 0.0 {
            continue;
        }
        last = i;
        r -= f64::from(p);
        if r < 0.0 {
            break;
        }
    }
    // Rounding can leave a sliver past the end: the last positive weight takes it.
    u32::try_from(last).unwrap_or(u32::MAX)
}

/// The length of the shortest head of `sorted` (highest first) whose mass reaches
/// `target`, or `None` when the whole list falls short.
fn cumulative_cut(sorted: &[(u32, f32)], target: f64) -> Option<usize> {
    let mut cumulative = 0.0f64;
    for (i, c) in sorted.iter().enumerate() {
        cumulative += f64::from(c.1);
        if cumulative >= target {
            return Some(i + 1);
        }
    }
    None
}

/// Puts in `out` the `m` largest values above `floor` (with their ids), highest first,
/// ties by lower id. A bounded min-heap: most values fail one comparison with the
/// heap's root, so the cost is about one pass over `values`.
pub(crate) fn top_m(values: &[f32], floor: f32, m: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if m == 0 {
        return;
    }
    // `worse(a, b)`: a sorts after b.
    let worse = |a: &(u32, f32), b: &(u32, f32)| by_value_desc(a, b).is_gt();
    for (i, &v) in values.iter().enumerate() {
        if v <= floor || v.is_nan() {
            continue;
        }
        let Ok(id) = u32::try_from(i) else {
            break;
        };
        let item = (id, v);
        if out.len() < m {
            out.push(item);
            // Sift up: the root is the worst element kept.
            let mut child = out.len() - 1;
            while child > 0 {
                let parent = (child - 1) / 2;
                if worse(&out[child], &out[parent]) {
                    out.swap(child, parent);
                    child = parent;
                } else {
                    break;
                }
            }
        } else if worse(&out[0], &item) {
            out[0] = item;
            let len = out.len();
            let mut parent = 0;
            loop {
                let left = 2 * parent + 1;
                if left >= len {
                    break;
                }
                let right = left + 1;
                let mut worst = left;
                if right < len && worse(&out[right], &out[left]) {
                    worst = right;
                }
                if worse(&out[worst], &out[parent]) {
                    out.swap(worst, parent);
                    parent = worst;
                } else {
                    break;
                }
            }
        }
    }
    out.sort_unstable_by(by_value_desc);
}

/// The first index of the largest of `xs` and its value (index 0 and `-inf` when every
/// value is `-inf` or there is none), or `Err` with the index of the first NaN. Sixteen
/// lanes keep running maxima and NaN flags (a loop the compiler vectorises; a maximum
/// does not depend on the order it is taken in), then the first index holding the
/// maximum is looked up: the index a sequential scan keeping the first of equal values
/// finds.
fn argmax(xs: &[f32]) -> std::result::Result<(usize, f32), usize> {
    const LANES: usize = 16;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            max[j] = if c[j] > max[j] { c[j] } else { max[j] };
            nan[j] |= c[j].is_nan();
        }
    }
    let mut m = f32::NEG_INFINITY;
    for x in max.into_iter().chain(tail.iter().copied()) {
        if x > m {
            m = x;
        }
    }
    if nan.contains(&true) || tail.iter().any(|x| x.is_nan()) {
        return Err(xs.iter().position(|x| x.is_nan()).unwrap_or(0));
    }
    match xs.iter().position(|&x| x == m) {
        Some(i) => Ok((i, xs.get(i).copied().unwrap_or(m))),
        None => Ok((0, f32::NEG_INFINITY)),
    }
}

#[cfg(test)]
mod tests {
    use super::{argmax, by_value_desc, top_m};

    /// The sequential scan `argmax` replaces: the first index of a value greater than
    /// every one before it, failing at the first NaN.
    fn scan(xs: &[f32]) -> Result<(usize, f32), usize> {
        let (mut best, mut best_logit) = (0, f32::NEG_INFINITY);
        for (i, &l) in xs.iter().enumerate() {
            if l.is_nan() {
                return Err(i);
            }
            if l > best_logit {
                (best, best_logit) = (i, l);
            }
        }
        Ok((best, best_logit))
    }

    #[test]
    fn argmax_is_the_sequential_scan() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut cases = 0;
        for len in [0usize, 1, 5, 15, 16, 17, 31, 48, 100, 49_152] {
            for kind in 0..6 {
                // Few distinct values (ties), signed zeros, -inf and +inf, a NaN in a
                // lane or in the tail.
                let mut xs: Vec<f32> = (0..len)
                    .map(|_| match next() % 8 {
                        0 => -0.0,
                        1 => 0.0,
                        2 => f32::NEG_INFINITY,
                        _ if kind == 1 => (next() % 4) as f32,
                        _ => (next() >> 40) as f32 / 1e6 - 5.0,
                    })
                    .collect();
                match kind {
                    2 if len > 0 => xs.fill(f32::NEG_INFINITY),
                    3 if len > 3 => xs[len / 2] = f32::INFINITY,
                    4 if len > 0 => xs[(next() as usize) % len] = f32::NAN,
                    5 if len > 0 => xs[len - 1] = f32::NAN,
                    _ => {}
                }
                let (got, want) = (argmax(&xs), scan(&xs));
                match (got, want) {
                    (Ok((i, v)), Ok((j, w))) => {
                        assert_eq!(i, j, "len {len} kind {kind}");
                        assert_eq!(v.to_bits(), w.to_bits(), "len {len} kind {kind}");
                    }
                    (g, w) => assert_eq!(g, w, "len {len} kind {kind}"),
                }
                cases += 1;
            }
        }
        assert_eq!(cases, 60);
    }

    #[test]
    fn top_m_matches_a_full_sort() {
        let values: Vec<f32> = (0..5000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 16) % 1000) as f32 / 10.0)
            .collect();
        let mut all: Vec<(u32, f32)> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        all.sort_by(by_value_desc);
        let mut out = Vec::new();
        for m in [1, 7, 64, 1000, 5000, 9000] {
            top_m(&values, f32::NEG_INFINITY, m, &mut out);
            assert_eq!(out, all[..m.min(all.len())], "m = {m}");
        }
        top_m(&values, 50.0, 10_000, &mut out);
        assert!(out.iter().all(|c| c.1 > 50.0));
        assert_eq!(out.len(), all.iter().filter(|c| c.1 > 50.0).count());
    }
}
