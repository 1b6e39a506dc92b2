//! Constrained decoding on the real SmolLM2 model: a JSON schema, any JSON object, a
//! Lark grammar and a regex each shape the output, alone and in the batching
//! scheduler beside an unconstrained request (which is unaffected), and a bad
//! constraint is a clear error.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::ops::ControlFlow;

use afo_engine::{
    Constraint, Error, FinishReason, GenerateOptions, Generation, LoadedModel, Message,
    SamplingParams, Scheduler, generate,
};
use serde_json::{Value, json};

fn load() -> LoadedModel {
    LoadedModel::load(common::smollm2_path()).unwrap()
}

fn chat(loaded: &LoadedModel, question: &str) -> Vec<u32> {
    loaded
        .encode_chat(&[Message::new("user", question)])
        .unwrap()
}

fn options(max_tokens: usize, constraint: Option<Constraint>) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        constraint,
        ..GenerateOptions::default()
    }
}

fn run(loaded: &LoadedModel, prompt: &[u32], options: &GenerateOptions) -> Generation {
    let mut cache = loaded.model().new_cache(prompt.len() + options.max_tokens);
    generate(
        loaded.model(),
        loaded.tokenizer(),
        prompt,
        options,
        &mut cache,
        |_| ControlFlow::Continue(()),
    )
    .unwrap()
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "mood": {"enum": ["happy", "sad", "calm"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 3
            }
        },
        "required": ["name", "age", "mood", "address", "tags"],
        "additionalProperties": false
    })
}

/// Checks `v` against [`person_schema`] by hand.
fn assert_person(v: &Value) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    assert_eq!(keys, ["name", "age", "mood", "address", "tags"], "{v}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 24, "{v}");
    let age = o["age"].as_i64().unwrap_or_else(|| panic!("age: {v}"));
    assert!((0..=120).contains(&age), "{v}");
    assert!(
        ["happy", "sad", "calm"].contains(&o["mood"].as_str().unwrap()),
        "{v}"
    );
    let address = o["address"].as_object().unwrap();
    assert_eq!(address.len(), 2, "{v}");
    assert!(
        address["city"].as_str().unwrap().chars().count() <= 20,
        "{v}"
    );
    let zip = address["zip"].as_str().unwrap();
    assert!(
        zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()),
        "{v}"
    );
    let tags = o["tags"].as_array().unwrap();
    assert!((1..=3).contains(&tags.len()), "{v}");
    assert!(
        tags.iter()
            .all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 12)),
        "{v}"
    );
}

#[test]
fn a_json_schema_shapes_the_output_greedy_and_sampled() {
    let loaded = load();
    let prompt = chat(
        &loaded,
        "Describe a person called Ada who lives in Paris, as JSON.",
    );
    let constraint = Constraint::json_schema(person_schema());
    let g = run(&loaded, &prompt, &options(160, Some(constraint.clone())));
    assert_eq!(g.finish, FinishReason::Eos, "{:?}", g.text);
    let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
    assert_person(&v);
    // Compact layout: one line, `", "` and `": "` only.
    assert!(!g.text.contains('\n'), "{}", g.text);
    assert!(g.text.starts_with("{\"name\": \""), "{}", g.text);

    // Sampling at temperature 1 cannot leave the schema either.
    for seed in 0..3 {
        let o = GenerateOptions {
            sampling: SamplingParams::builder()
                .temperature(1.0)
                .seed(seed)
                .build()
                .unwrap(),
            ..options(160, Some(constraint.clone()))
        };
        let g = run(&loaded, &prompt, &o);
        assert_eq!(g.finish, FinishReason::Eos, "seed {seed}: {:?}", g.text);
        let v: Value = serde_json::from_str(&g.text)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", g.text));
        assert_person(&v);
    }
}

#[test]
fn a_json_object_and_an_unfinished_output() {
    let loaded = load();
    let prompt = chat(&loaded, "Give me a JSON object about cats.");
    let g = run(
        &loaded,
        &prompt,
        &options(200, Some(Constraint::json_object())),
    );
    if g.finish == FinishReason::Eos {
        let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
        assert!(v.is_object(), "{v}");
    } else {
        assert_eq!(g.finish, FinishReason::Length);
        assert!(g.text.starts_with('{'), "{}", g.text);
    }
    // Too few tokens to finish: the output stops at `max_tokens`, as a prefix of
    // valid JSON.
    let g = run(
        &loaded,
        &prompt,
        &options(3, Some(Constraint::json_schema(person_schema()))),
    );
    assert_eq!(g.finish, FinishReason::Length);
    assert_eq!(g.tokens.len(), 3);
    assert!(g.text.starts_with("{\"name"), "{}", g.text);
}

#[test]
fn a_lark_grammar_and_a_regex() {
    let loaded = load();
    let prompt = chat(&loaded, "Is the sky blue? Answer.");
    let lark = Constraint::lark(
        r#"
start: answer "." 
answer: "The answer is " ("yes" | "no") ", because " REASON
REASON: /[a-z ]{1,30}/
"#,
    );
    let g = run(&loaded, &prompt, &options(40, Some(lark)));
    assert_eq!(g.finish, FinishReason::Eos, "{:?}", g.text);
    let rest = g
        .text
        .strip_prefix("The answer is yes, because ")
        .or_else(|| g.text.strip_prefix("The answer is no, because "))
        .unwrap_or_else(|| panic!("{:?}", g.text));
    let reason = rest
        .strip_suffix('.')
        .unwrap_or_else(|| panic!("{:?}", g.text));
    assert!(
        (1..=30).contains(&reason.len())
            && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b' '),
        "{:?}",
        g.text
    );

    // Lark with an embedded JSON schema, as tool-call grammars use.
    let tool = Constraint::lark(
        r#"
start: "<tool_call>" call "</tool_call>"
call: %json {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"], "additionalProperties": false}}, "required": ["name", "arguments"], "additionalProperties": false}
"#,
    );
    let prompt = chat(&loaded, "What is the weather in Paris? Call a tool.");
    let g = run(&loaded, &prompt, &options(60, Some(tool)));
    assert_eq!(g.finish, FinishReason::Eos, "{:?}", g.text);
    let body = g
        .text
        .strip_prefix("<tool_call>")
        .and_then(|t| t.strip_suffix("</tool_call>"))
        .unwrap_or_else(|| panic!("{:?}", g.text));
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["name"], "get_weather");
    assert!(v["arguments"]["city"].is_string(), "{v}");

    let prompt = chat(&loaded, "Give me a phone number.");
    let g = run(
        &loaded,
        &prompt,
        &options(20, Some(Constraint::regex(r"\+1 [0-9]{3}-[0-9]{4}"))),
    );
    assert_eq!(g.finish, FinishReason::Eos, "{:?}", g.text);
    let b = g.text.as_bytes();
    assert!(
        g.text.len() == 11
            && g.text.starts_with("+1 ")
            && b[3..6].iter().all(u8::is_ascii_digit)
            && b[6] == b'-'
            && b[7..].iter().all(u8::is_ascii_digit),
        "{:?}",
        g.text
    );
}

#[test]
fn constrained_and_unconstrained_requests_batch_together() {
    let loaded = load();
    let (model, tok) = (loaded.model(), loaded.tokenizer());
    let json_prompt = chat(
        &loaded,
        "Describe a person called Bob who lives in Rome, as JSON.",
    );
    let plain_prompt = chat(&loaded, "Write a sentence about the sea.");
    let constraint = Constraint::json_schema(person_schema());
    let json_options = options(160, Some(constraint));
    let plain_options = options(32, None);
    let json_alone = run(&loaded, &json_prompt, &json_options);
    let plain_alone = run(&loaded, &plain_prompt, &plain_options);

    let mut s = Scheduler::new(model, tok, 4);
    let a = s.add_request(json_prompt, json_options).unwrap();
    let b = s.add_request(plain_prompt, plain_options).unwrap();
    let (mut texts, mut finish) = ([String::new(), String::new()], [None, None]);
    while s.has_unfinished() {
        for o in s.step().unwrap() {
            let k = usize::from(o.id == b);
            assert!(o.id == a || o.id == b);
            texts[k].push_str(&o.text);
            if o.finish.is_some() {
                finish[k] = o.finish;
            }
        }
    }
    // The unconstrained request is exactly what it is alone; the constrained one too
    // (same greedy choices under the same mask), and it validates.
    assert_eq!(texts[1], plain_alone.text);
    assert_eq!(finish[1], Some(plain_alone.finish));
    assert_eq!(texts[0], json_alone.text);
    assert_eq!(finish[0], Some(FinishReason::Eos));
    assert_person(&serde_json::from_str(&texts[0]).unwrap());
}

#[test]
fn a_bad_constraint_is_a_clear_error() {
    let loaded = load();
    let prompt = chat(&loaded, "Hi");
    let bad = Constraint::json_schema(json!({
        "type": "object",
        "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}},
        "required": ["a"]
    }));
    assert!(bad.check().is_err());
    let mut cache = loaded.model().new_cache(64);
    let e = generate(
        loaded.model(),
        loaded.tokenizer(),
        &prompt,
        &options(8, Some(bad.clone())),
        &mut cache,
        |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Constraint {
                kind: "JSON schema",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("JSON schema constraint: "), "{e}");

    // The scheduler refuses it when it is queued, not in a later step.
    let mut s = Scheduler::new(loaded.model(), loaded.tokenizer(), 2);
    let e = s
        .add_request(prompt.clone(), options(8, Some(bad)))
        .unwrap_err();
    assert!(matches!(e, Error::Constraint { .. }), "{e:?}");
    assert!(!s.has_unfinished());

    let e = Constraint::json_schema(json!({"type": "strnig"}))
        .check()
        .unwrap_err();
    assert!(e.to_string().contains("strnig"), "{e}");
    let e = Constraint::lark("start: foo").check().unwrap_err();
    assert!(
        e.to_string().starts_with("Lark grammar constraint: "),
        "{e}"
    );
    let e = Constraint::lark("start: <|no_such_token|>");
    assert!(
        matches!(
            s.add_request(prompt, options(8, Some(e))),
            Err(Error::Constraint { .. })
        ),
        "a special token the vocabulary lacks"
    );
}
