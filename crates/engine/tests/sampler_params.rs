//! The sampler: greedy, filters, penalties, bias, reproducibility and the
//! distribution of temperature sampling.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use afo_engine::{Sampler, SamplingParams};

fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from((l - max) / t).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn counts(sampler: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
    let mut c = vec![0; logits.len()];
    for _ in 0..n {
        c[sampler.sample(logits, &[]).unwrap() as usize] += 1;
    }
    c
}

#[test]
fn greedy_is_argmax() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]).unwrap(), 1);
    // Ties go to the lowest id.
    assert_eq!(s.sample(&[3.0, 1.0, 3.0], &[]).unwrap(), 0);
    let big: Vec<f32> = (0..49152).map(|i| ((i * 7919) % 10007) as f32).collect();
    let argmax = big
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .unwrap()
        .0;
    assert_eq!(s.sample(&big, &[]).unwrap() as usize, argmax);
}

#[test]
fn top_k_one_is_greedy() {
    let params = SamplingParams::builder()
        .temperature(1.5)
        .top_k(1)
        .seed(7)
        .build()
        .unwrap();
    let mut s = Sampler::new(params);
    for _ in 0..50 {
        assert_eq!(s.sample(&[0.0, 0.5, 0.4, -2.0], &[]).unwrap(), 1);
    }
}

#[test]
fn same_seed_same_tokens() {
    let params = SamplingParams::builder()
        .temperature(0.9)
        .top_p(0.95)
        .top_k(40)
        .seed(1234)
        .build()
        .unwrap();
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 31) % 97) as f32 / 10.0).collect();
    let run = |p: &SamplingParams| {
        let mut s = Sampler::new(p.clone());
        (0..100)
            .map(|_| s.sample(&logits, &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(&params), run(&params));
    let other = SamplingParams::builder()
        .temperature(0.9)
        .top_p(0.95)
        .top_k(40)
        .seed(1235)
        .build()
        .unwrap();
    assert_ne!(run(&params), run(&other));
}

#[test]
fn temperature_sampling_follows_the_softmax() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0];
    for t in [1.0f32, 0.7] {
        let params = SamplingParams::builder()
            .temperature(t)
            .seed(42)
            .build()
            .unwrap();
        let mut s = Sampler::new(params);
        let n = 40_000;
        let c = counts(&mut s, &logits, n);
        let p = softmax(&logits, t);
        // Pearson's chi-square with 5 degrees of freedom; 25 is far in the tail
        // (p < 0.001), so a correct sampler fails this with a fixed seed essentially
        // never, and a wrong distribution is caught.
        let chi2: f64 = c
            .iter()
            .zip(&p)
            .map(|(&o, &pi)| {
                let e = pi * n as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 25.0, "t={t}: chi2 {chi2}, counts {c:?}, p {p:?}");
    }
}

#[test]
fn top_k_and_top_p_restrict_the_support() {
    let logits = [3.0f32, 2.9, 2.8, 0.0, -1.0, -5.0];
    let params = SamplingParams::builder().top_k(3).seed(1).build().unwrap();
    let c = counts(&mut Sampler::new(params), &logits, 3000);
    assert!(c[3..].iter().all(|&x| x == 0), "{c:?}");
    assert!(c[..3].iter().all(|&x| x > 0), "{c:?}");

    // p = softmax: the first three hold ~0.96 of the mass, the first two ~0.66.
    let p = softmax(&logits, 1.0);
    assert!(p[0] + p[1] < 0.7 && p[0] + p[1] + p[2] > 0.9);
    let params = SamplingParams::builder()
        .top_p(0.7)
        .seed(1)
        .build()
        .unwrap();
    let c = counts(&mut Sampler::new(params), &logits, 3000);
    assert!(c[3..].iter().all(|&x| x == 0), "{c:?}");
    assert!(c[2] > 0, "{c:?}");
    let params = SamplingParams::builder()
        .top_p(0.5)
        .seed(1)
        .build()
        .unwrap();
    let c = counts(&mut Sampler::new(params), &logits, 3000);
    assert!(c[2..].iter().all(|&x| x == 0) && c[1] > 0, "{c:?}");
}

#[test]
fn top_p_over_a_large_vocabulary() {
    // A long flat tail: the nucleus needs more than the first sorted block.
    let mut logits = vec![0.0f32; 49152];
    logits[10] = 5.0;
    let params = SamplingParams::builder()
        .top_p(0.9)
        .seed(3)
        .build()
        .unwrap();
    let mut s = Sampler::new(params);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        seen.insert(s.sample(&logits, &[]).unwrap());
    }
    assert!(seen.contains(&10));
    assert!(seen.len() > 200, "{}", seen.len());
}

#[test]
fn min_p_filters_unlikely_tokens() {
    // p relative to the best: 1, e^-1 = 0.37, e^-2 = 0.14, e^-3 = 0.05.
    let logits = [0.0f32, -1.0, -2.0, -3.0];
    let params = SamplingParams::builder()
        .min_p(0.2)
        .seed(5)
        .build()
        .unwrap();
    let c = counts(&mut Sampler::new(params), &logits, 5000);
    assert!(c[0] > 0 && c[1] > 0, "{c:?}");
    assert_eq!(c[2] + c[3], 0, "{c:?}");
}

#[test]
fn logit_bias_bans_and_boosts() {
    let logits = [5.0f32, 1.0, 0.0];
    let params = SamplingParams::builder()
        .temperature(0.0)
        .logit_bias(0, f32::NEG_INFINITY)
        .build()
        .unwrap();
    assert_eq!(Sampler::new(params).sample(&logits, &[]).unwrap(), 1);

    let params = SamplingParams::builder()
        .logit_bias(0, f32::NEG_INFINITY)
        .seed(9)
        .build()
        .unwrap();
    let c = counts(&mut Sampler::new(params), &logits, 2000);
    assert_eq!(c[0], 0);

    let params = SamplingParams::builder()
        .temperature(0.0)
        .logit_bias(2, 10.0)
        .build()
        .unwrap();
    assert_eq!(Sampler::new(params).sample(&logits, &[]).unwrap(), 2);

    // Banning everything is an error, not a panic.
    let params = SamplingParams::builder()
        .logit_bias(0, f32::NEG_INFINITY)
        .logit_bias(1, f32::NEG_INFINITY)
        .logit_bias(2, f32::NEG_INFINITY)
        .build()
        .unwrap();
    assert!(Sampler::new(params).sample(&logits, &[]).is_err());
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    // Token 0: logit 2.0 -> 2.0 / 2 = 1.0; token 1: 1.5 untouched; token 2: -0.1 ->
    // -0.2. So after penalising 0 and 2, greedy picks 1.
    let logits = [2.0f32, 1.5, -0.1];
    let params = SamplingParams::builder()
        .temperature(0.0)
        .repetition_penalty(2.0)
        .build()
        .unwrap();
    let mut s = Sampler::new(params);
    assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
    assert_eq!(s.sample(&logits, &[0, 2]).unwrap(), 1);
    // Once per distinct token: repeating 0 does not penalise it twice (1.0 vs 0.9).
    let logits = [2.0f32, 0.9];
    assert_eq!(s.sample(&logits, &[0, 0, 0]).unwrap(), 0);
    // A negative logit becomes more negative: -1 -> -2 falls below -1.5.
    let logits = [-1.0f32, -1.5];
    assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
    assert_eq!(s.sample(&logits, &[0]).unwrap(), 1);
}

#[test]
fn presence_and_frequency_penalties_follow_openai() {
    // logit -= presence * [count > 0] + frequency * count.
    let params = SamplingParams::builder()
        .temperature(0.0)
        .presence_penalty(0.5)
        .build()
        .unwrap();
    let mut s = Sampler::new(params);
    // 1.0 - 0.5 = 0.5 < 0.6, regardless of the count.
    assert_eq!(s.sample(&[1.0, 0.6], &[0]).unwrap(), 1);
    assert_eq!(s.sample(&[1.0, 0.4], &[0, 0, 0, 0]).unwrap(), 0);

    let params = SamplingParams::builder()
        .temperature(0.0)
        .frequency_penalty(0.25)
        .build()
        .unwrap();
    let mut s = Sampler::new(params);
    // Three occurrences: 1.0 - 0.75 = 0.25: above 0.2, below 0.3.
    assert_eq!(s.sample(&[1.0, 0.2], &[0, 0, 0]).unwrap(), 0);
    assert_eq!(s.sample(&[1.0, 0.3], &[0, 0, 0]).unwrap(), 1);

    // penalty_last_n limits the window.
    let params = SamplingParams::builder()
        .temperature(0.0)
        .frequency_penalty(1.0)
        .penalty_last_n(2)
        .build()
        .unwrap();
    let mut s = Sampler::new(params);
    assert_eq!(s.sample(&[1.0, 0.5], &[0, 0, 0, 1, 1]).unwrap(), 0);
    assert_eq!(s.sample(&[1.0, 0.5], &[1, 1, 0, 0]).unwrap(), 1);
}

#[test]
fn bad_parameters_are_rejected() {
    let b = SamplingParams::builder;
    for (name, result) in [
        ("temperature", b().temperature(-0.1).build()),
        ("temperature", b().temperature(f32::NAN).build()),
        ("top_p", b().top_p(0.0).build()),
        ("top_p", b().top_p(1.5).build()),
        ("min_p", b().min_p(-0.1).build()),
        ("repetition_penalty", b().repetition_penalty(0.0).build()),
        ("presence_penalty", b().presence_penalty(3.0).build()),
        ("frequency_penalty", b().frequency_penalty(f32::NAN).build()),
        ("logit_bias", b().logit_bias(3, f32::INFINITY).build()),
    ] {
        let err = result.unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
}

#[test]
fn bad_logits_are_errors() {
    let mut s = Sampler::new(SamplingParams::default());
    assert!(s.sample(&[], &[]).is_err());
    let err = s.sample(&[0.0, f32::NAN], &[]).unwrap_err().to_string();
    assert!(err.contains("logit 1 is NaN"), "{err}");
    let params = SamplingParams::builder()
        .logit_bias(10, 1.0)
        .build()
        .unwrap();
    let err = Sampler::new(params)
        .sample(&[0.0, 1.0], &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("token 10"), "{err}");
    let params = SamplingParams::builder()
        .repetition_penalty(1.1)
        .build()
        .unwrap();
    assert!(Sampler::new(params).sample(&[0.0, 1.0], &[7]).is_err());
}

#[test]
fn min_p_and_top_p_together_keep_the_intersection() {
    // Normalised p = [0.644, 0.237, 0.087, 0.032]; min_p 0.2 keeps {0, 1}.
    let logits = [0.0f32, -1.0, -2.0, -3.0];
    for top_k in [0, 3] {
        // top_p 0.5 keeps {0}: the intersection is {0}.
        let params = SamplingParams::builder()
            .min_p(0.2)
            .top_p(0.5)
            .top_k(top_k)
            .seed(11)
            .build()
            .unwrap();
        let c = counts(&mut Sampler::new(params), &logits, 500);
        assert_eq!(c, [500, 0, 0, 0], "top_k {top_k}");
        // top_p 0.95 keeps {0, 1, 2}: the intersection is {0, 1}.
        let params = SamplingParams::builder()
            .min_p(0.2)
            .top_p(0.95)
            .top_k(top_k)
            .seed(11)
            .build()
            .unwrap();
        let c = counts(&mut Sampler::new(params), &logits, 2000);
        assert!(
            c[0] > 0 && c[1] > 0 && c[2] + c[3] == 0,
            "top_k {top_k}: {c:?}"
        );
    }
}
