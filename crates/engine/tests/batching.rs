//! Continuous batching on the real SmolLM2 model: batched requests produce what each
//! would alone, requests wait for room in the KV budget, cancellation ends one cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use afo_engine::{
    FinishReason, GenerateOptions, LoadedModel, SamplingParams, Scheduler, Ticket, generate,
};
use afo_guard::{KindBytes, Ledger, MemoryKind};

fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    }
}

#[test]
fn batched_requests_match_their_single_runs_and_respect_the_budget() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let (model, tok) = (loaded.model(), loaded.tokenizer());
    let prompts = [
        "The capital of France is",
        "List three colors:",
        "def square(x):",
        "Once upon a time",
    ];
    let lens = [12, 20, 8, 16];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| loaded.encode_text(p).unwrap())
        .collect();
    let alone: Vec<String> = ids
        .iter()
        .zip(lens)
        .map(|(p, n)| {
            let mut cache = model.new_cache(p.len() + n);
            generate(model, tok, p, &options(n), &mut cache, |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap()
            .text
        })
        .collect();

    // A ledger with room for three requests' KV at a time, and a batch of at most
    // four: the ledger is what holds the fourth back.
    let per_token = model.kv_bytes_per_token();
    assert_eq!(per_token, 30 * 2 * 3 * 64 * 4);
    let needs: Vec<u64> = ids
        .iter()
        .zip(lens)
        .map(|(p, n)| (p.len() + n) as u64 * per_token)
        .collect();
    // One byte short of all four together: at most three at once.
    let budget = needs.iter().sum::<u64>() - 1;
    let ledger = Ledger::with_min_margin(budget, 0);
    let mut s = Scheduler::new(model, tok, 4);
    {
        let ledger = ledger.clone();
        s.set_admission(move |q| {
            let kv = (q.prompt_tokens + q.max_tokens) as u64 * per_token;
            ledger
                .try_reserve(MemoryKind::KvCache, kv)
                .map(|reservation| Ticket {
                    reservation,
                    workspace_after_prefill: 0,
                    predicted_peak_bytes: 0,
                })
        });
    }
    let mut texts: HashMap<u64, String> = HashMap::new();
    let mut finish: HashMap<u64, FinishReason> = HashMap::new();
    let rid: Vec<u64> = ids
        .iter()
        .zip(lens)
        .map(|(p, n)| s.add_request(p.clone(), options(n)).unwrap())
        .collect();
    let mut steps = 0;
    while s.has_unfinished() {
        for o in s.step().unwrap() {
            texts.entry(o.id).or_default().push_str(&o.text);
            if let Some(f) = o.finish {
                finish.insert(o.id, f);
            }
        }
        assert!(s.running() <= 3 && s.reserved_bytes() <= budget);
        assert_eq!(s.reserved_bytes(), ledger.reserved());
        steps += 1;
        assert!(steps < 200);
    }
    for (i, id) in rid.iter().enumerate() {
        assert_eq!(texts[id], alone[i], "request {i}");
        assert!(matches!(
            finish[id],
            FinishReason::Length | FinishReason::Eos
        ));
    }
    assert_eq!(ledger.reserved(), 0, "every request's bytes came back");
}

#[test]
fn a_cancelled_request_ends_and_the_others_go_on() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let mut s = Scheduler::new(loaded.model(), loaded.tokenizer(), 4);
    // An admission hook over a ledger with room for two requests at once, each
    // reserving 100 bytes of KV and 50 of workspace, of which it keeps 10 after its
    // prefill.
    let ledger = Ledger::with_min_margin(300, 0);
    let l = ledger.clone();
    s.set_admission(move |_q| {
        l.try_reserve_parts(KindBytes::of(MemoryKind::KvCache, 100).with(MemoryKind::Workspace, 50))
            .map(|reservation| Ticket {
                reservation,
                workspace_after_prefill: 10,
                predicted_peak_bytes: 0,
            })
    });
    let c = s
        .add_request(loaded.encode_text("Third").unwrap(), options(3))
        .unwrap();
    let a = s
        .add_request(loaded.encode_text("Hello").unwrap(), options(10))
        .unwrap();
    let b = s
        .add_request(loaded.encode_text("Rust is").unwrap(), options(10))
        .unwrap();
    s.step().unwrap();
    // Two started (and ran their prompts: their workspace shrank), one waits.
    assert_eq!((s.running(), s.waiting()), (2, 1));
    assert_eq!(ledger.reserved(), 2 * 110);
    assert!(s.cancel(a));
    assert!(!s.cancel(a));
    let mut ended = HashMap::new();
    while s.has_unfinished() {
        for o in s.step().unwrap() {
            if let Some(f) = o.finish {
                ended.insert(o.id, f);
            }
        }
    }
    assert_eq!(ended[&a], FinishReason::Cancelled);
    // The third waited for a ticket, then ran; every ticket came back.
    assert!(matches!(
        ended[&c],
        FinishReason::Length | FinishReason::Eos
    ));
    assert_eq!(ledger.reserved(), 0);
    assert!(matches!(
        ended[&b],
        FinishReason::Length | FinishReason::Eos
    ));
    assert_eq!(s.reserved_bytes(), 0);
}

#[test]
fn a_long_prompt_runs_in_chunks_between_decode_steps_and_can_be_cancelled_midway() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let (model, tok) = (loaded.model(), loaded.tokenizer());
    let mut s = Scheduler::new(model, tok, 4);
    s.set_prefill_chunk(32);
    let short = loaded.encode_text("Once upon a time").unwrap();
    let long = loaded
        .encode_text(&"The quick brown fox jumps over the lazy dog. ".repeat(30))
        .unwrap();
    assert!(long.len() > 200, "{} tokens", long.len());
    let a = s.add_request(short.clone(), options(40)).unwrap();
    // The short request starts and emits its first token.
    let first = s.step().unwrap();
    assert!(first.iter().any(|o| o.id == a && o.token.is_some()));
    let b = s.add_request(long.clone(), options(4)).unwrap();
    // While the long prompt runs 32 tokens a step, the short one gets a token every
    // step, and the long one is counted as prefilling.
    let chunks = long.len().div_ceil(32);
    for step in 0..chunks - 1 {
        let out = s.step().unwrap();
        assert!(
            out.iter().any(|o| o.id == a && o.token.is_some()),
            "step {step}: the decoding request stalled"
        );
        assert!(out.iter().all(|o| o.id != b), "step {step}: {out:?}");
        assert_eq!((s.prefilling(), s.running()), (1, 1), "step {step}");
    }
    // Cancelled between two chunks: it ends at once, without a token.
    let c = s.add_request(long.clone(), options(4)).unwrap();
    let out = s.step().unwrap();
    assert!(
        out.iter().any(|o| o.id == b && o.token.is_some()),
        "b's last chunk ran: {out:?}"
    );
    assert_eq!(s.prefilling(), 1, "c is prefilling");
    assert!(s.cancel(c));
    let out = s.step().unwrap();
    let ended = out.iter().find(|o| o.id == c).unwrap();
    assert_eq!(
        (ended.finish, ended.token),
        (Some(FinishReason::Cancelled), None)
    );
    assert_eq!(s.prefilling(), 0);

    // The chunked request generates what it would alone.
    let mut s2 = Scheduler::new(model, tok, 1);
    s2.set_prefill_chunk(32);
    let id = s2.add_request(long.clone(), options(4)).unwrap();
    let mut chunked = String::new();
    while s2.has_unfinished() {
        for o in s2.step().unwrap() {
            assert_eq!(o.id, id);
            chunked.push_str(&o.text);
        }
    }
    let mut cache = model.new_cache(long.len() + 4);
    let alone = generate(model, tok, &long, &options(4), &mut cache, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap()
    .text;
    assert_eq!(chunked, alone);
}
