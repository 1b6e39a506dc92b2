//! The generation loop over a scripted model and the real SmolLM2 tokenizer: stop
//! strings, end-of-sequence, `max_tokens`, cancellation, seeded sampling.

#![allow(clippy::unwrap_used)]

mod common;

use std::ops::ControlFlow;

use afo_engine::{
    Decode, Error, FinishReason, GenerateOptions, ReasoningBudget, ReasoningParser, Result,
    SamplingParams, Tokenizer, generate,
};

use common::smollm2_tokenizer as tokenizer;

/// A model that predicts a fixed script of tokens, one-hot, whatever the input.
struct Scripted {
    script: Vec<u32>,
    vocab: usize,
}

impl Decode for Scripted {
    type State = usize;

    fn new_state(&self) -> usize {
        0
    }

    fn decode(&self, tokens: &[u32], state: &mut usize) -> Result<Vec<f32>> {
        let step = *state;
        *state += 1;
        let _ = tokens;
        let mut logits = vec![0.0; self.vocab];
        let next = self.script.get(step).copied().unwrap_or(0);
        logits[next as usize] = 100.0;
        Ok(logits)
    }
}

fn scripted(tok: &Tokenizer, text: &str, then_eos: bool) -> Scripted {
    let mut script = tok.encode(text, false).unwrap();
    if then_eos {
        script.push(tok.eos_ids()[0]);
    }
    Scripted {
        script,
        vocab: tok.vocab_size(),
    }
}

fn greedy(max_tokens: usize, stop: &[&str]) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        sampling: SamplingParams::greedy(),
        ignore_eos: false,
        ..GenerateOptions::default()
    }
}

#[test]
fn streams_the_whole_text_and_stops_at_eos() {
    let tok = tokenizer();
    let model = scripted(&tok, "Hello world, 안녕하세요 🌍!", true);
    let prompt = tok.encode("Say hi", false).unwrap();
    let mut deltas = Vec::new();
    let mut state = model.new_state();
    let out = generate(&model, &tok, &prompt, &greedy(100, &[]), &mut state, |d| {
        deltas.push(d.to_owned());
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(out.finish, FinishReason::Eos);
    assert_eq!(out.text, "Hello world, 안녕하세요 🌍!");
    assert_eq!(deltas.concat(), out.text);
    assert!(deltas.len() > 3, "text arrives in pieces: {deltas:?}");
    assert_eq!(out.prompt_tokens, prompt.len());
    assert!(out.timings.ttft_ms.is_some());
    assert_eq!(
        out.tokens.len(),
        model.script.len() - 1,
        "EOS is not a text token"
    );
}

#[test]
fn cuts_at_a_stop_string_spanning_tokens() {
    let tok = tokenizer();
    let model = scripted(&tok, "one two three END four five", true);
    let prompt = tok.encode("count", false).unwrap();
    let mut state = model.new_state();
    let mut shown = String::new();
    let out = generate(
        &model,
        &tok,
        &prompt,
        &greedy(100, &["nope", " END"]),
        &mut state,
        |d| {
            shown.push_str(d);
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(out.finish, FinishReason::Stop(1));
    assert_eq!(out.text, "one two three");
    assert_eq!(shown, "one two three");
    assert!(!out.text.contains("four"));
}

#[test]
fn max_tokens_limits_the_output() {
    let tok = tokenizer();
    let model = scripted(&tok, "a b c d e f g h i j k l m n o p", false);
    let prompt = tok.encode("letters", false).unwrap();
    let mut state = model.new_state();
    let out = generate(&model, &tok, &prompt, &greedy(5, &[]), &mut state, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(out.tokens.len(), 5);
    assert_eq!(out.text, tok.decode(&out.tokens, true).unwrap());
    // Prefill plus one forward per token but the last: the model ran 5 times.
    assert_eq!(state, 5);
}

#[test]
fn the_callback_cancels() {
    let tok = tokenizer();
    let model = scripted(&tok, "a b c d e f g h i j k l m n o p", false);
    let prompt = tok.encode("letters", false).unwrap();
    let mut state = model.new_state();
    let mut calls = 0;
    let out = generate(&model, &tok, &prompt, &greedy(50, &[]), &mut state, |_| {
        calls += 1;
        if calls == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert_eq!(calls, 3);
    assert!(out.tokens.len() < 10);
}

#[test]
fn an_empty_prompt_is_an_error() {
    let tok = tokenizer();
    let model = scripted(&tok, "x", true);
    let mut state = model.new_state();
    let err = generate(&model, &tok, &[], &greedy(5, &[]), &mut state, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(err, Error::EmptyPrompt), "{err}");
}

/// A model whose logits are a fixed, flat-ish distribution: sampling decides.
struct Flat(usize);

impl Decode for Flat {
    type State = ();
    fn new_state(&self) {}
    fn decode(&self, _: &[u32], _: &mut ()) -> Result<Vec<f32>> {
        Ok((0..self.0)
            .map(|i| ((i * 7919) % 13) as f32 * 0.1)
            .collect())
    }
}

#[test]
fn the_same_seed_gives_the_same_output() {
    let tok = tokenizer();
    let model = Flat(tok.vocab_size());
    let prompt = tok.encode("random", false).unwrap();
    let run = |seed| {
        let options = GenerateOptions {
            max_tokens: 20,
            sampling: SamplingParams::builder()
                .temperature(1.0)
                .seed(seed)
                .build()
                .unwrap(),
            ignore_eos: true,
            ..GenerateOptions::default()
        };
        generate(&model, &tok, &prompt, &options, &mut (), |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .tokens
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn a_reasoning_budget_closes_the_block_with_forced_tokens() {
    let tok = tokenizer();
    let model = scripted(
        &tok,
        " one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
        false,
    );
    let close = tok.encode("</think>", false).unwrap();
    let prompt = tok.encode("<think>", false).unwrap();
    let options = |budget: Option<ReasoningBudget>| GenerateOptions {
        reasoning_budget: budget,
        ..greedy(12, &[])
    };
    // The prompt opened the block; three tokens of reasoning, then `</think>` in place
    // of what the model would have said, then the model again.
    let mut state = model.new_state();
    let out = generate(
        &model,
        &tok,
        &prompt,
        &options(Some(ReasoningBudget::new(3, true))),
        &mut state,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(out.tokens[..3], model.script[..3]);
    assert_eq!(out.tokens[3..3 + close.len()], close[..]);
    assert_eq!(
        out.tokens[3 + close.len()..],
        model.script[3 + close.len()..12]
    );
    let split = ReasoningParser::split(true, &out.text);
    assert_eq!(split.reasoning.as_deref(), Some("one two three"));
    assert!(
        !split.content.is_empty() && !split.content.contains("think"),
        "{split:?}"
    );

    // A budget larger than the output, or none: nothing is forced.
    for budget in [Some(ReasoningBudget::new(50, true)), None] {
        let mut state = model.new_state();
        let out = generate(&model, &tok, &prompt, &options(budget), &mut state, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(out.tokens, model.script[..12], "{budget:?}");
    }
}
