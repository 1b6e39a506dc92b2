//! Embeddings through the runtime on the real SmolLM2 model: admitted on the ledger,
//! recorded once, deterministic, normalised, and closer for similar texts.

#![allow(clippy::unwrap_used)]

mod common;

use afo_runtime::engine::{EmbedOptions, Pooling};
use afo_runtime::ssot::{LogReader, ReadMode, RecordV2, RunStatus};
use afo_runtime::{EmbedInput, EmbedRequest, Error, Runtime};

/// Every record of a log, strictly parsed.
fn records(log: &std::path::Path) -> Vec<RecordV2> {
    LogReader::open(log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap()
        .into_iter()
        .map(|e| e.record.into_v2())
        .collect()
}

fn text(s: &str) -> EmbedInput {
    EmbedInput::Text(s.to_owned())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn smollm2_embeddings_are_deterministic_normalised_and_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let runtime = Runtime::builder()
        .cutline("4GiB".parse().unwrap())
        .ssot_log(&log)
        .build()
        .unwrap();
    let inputs = vec![
        text("The cat sat on the mat."),
        text("A cat was sitting on the mat."),
        text("Quarterly revenue rose by three percent in Europe."),
        text("The dog slept on the rug."),
        text("Profits grew by two percent in the last quarter."),
    ];
    let mut first_tokens = None;
    for pooling in Pooling::ALL {
        let options = EmbedOptions {
            pooling,
            dimensions: None,
        };
        let request = EmbedRequest::new(common::smollm2(), inputs.clone()).with_options(options);
        let r = runtime.embed(&request).unwrap();
        assert_eq!(r.embeddings.len(), 5);
        for v in &r.embeddings {
            assert_eq!(v.len(), 576);
            assert!((dot(v, v) - 1.0).abs() < 1e-4);
        }
        assert!(r.input_tokens.iter().all(|&n| n > 3));
        assert!(r.predicted_peak_bytes > 0);
        assert_eq!(r.admission.decision, "admitted");
        first_tokens.get_or_insert(r.prompt_tokens() as u64);
        let e = &r.embeddings;
        let (cat, cat2, revenue, dog, profits) = (&e[0], &e[1], &e[2], &e[3], &e[4]);
        eprintln!(
            "{pooling}: cat~cat2 {} cat~revenue {} revenue~profits {} cat~profits {} cat~dog {}",
            dot(cat, cat2),
            dot(cat, revenue),
            dot(revenue, profits),
            dot(cat, profits),
            dot(cat, dog)
        );
        assert!(dot(cat, cat2) > dot(cat, revenue), "{pooling}");
        assert!(dot(revenue, profits) > dot(cat, profits), "{pooling}");
        // The same input again gives the same vector, alone or in a batch.
        let again = runtime
            .embed(
                &EmbedRequest::new(common::smollm2(), vec![inputs[2].clone()])
                    .with_options(options),
            )
            .unwrap();
        assert_eq!(again.embeddings[0], r.embeddings[2]);
    }
    // Token ids and text agree; dimensions truncate and renormalise.
    let ids = vec![504, 3575, 282, 4649, 314];
    let options = EmbedOptions {
        pooling: Pooling::Mean,
        dimensions: Some(64),
    };
    let by_ids = runtime
        .embed(
            &EmbedRequest::new(common::smollm2(), vec![EmbedInput::Tokens(ids)])
                .with_options(options),
        )
        .unwrap();
    let by_text = runtime
        .embed(
            &EmbedRequest::new(common::smollm2(), vec![text("The capital of France is")])
                .with_options(options),
        )
        .unwrap();
    assert_eq!(by_ids.embeddings, by_text.embeddings);
    assert_eq!(by_ids.embeddings[0].len(), 64);
    assert_eq!(by_ids.input_tokens, [5]);
    // One record per call, refused and failed ones too.
    let records = records(&log);
    assert_eq!(records.len(), 6);
    assert!(records.iter().all(|r| r.base.chain == "embeddings"));
    assert!(records.iter().all(|r| r.base.status == RunStatus::Ok));
    assert_eq!(Some(records[0].base.tokens_in), first_tokens);
    assert_eq!(records[0].base.tokens_out, 0);
}

#[test]
fn bad_inputs_and_a_tight_cutline_are_refused_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let runtime = Runtime::builder()
        .cutline("4GiB".parse().unwrap())
        .ssot_log(&log)
        .build()
        .unwrap();
    let model = common::smollm2();
    let err = |inputs: Vec<EmbedInput>| {
        runtime
            .embed(&EmbedRequest::new(&model, inputs))
            .unwrap_err()
    };
    assert!(matches!(
        err(vec![text("fine"), EmbedInput::Tokens(vec![1, 49_152])]),
        Error::EmbedInput { index: 1, .. }
    ));
    assert!(matches!(
        err(vec![EmbedInput::Tokens(vec![7; 8193])]),
        Error::EmbedInput { index: 0, .. }
    ));
    assert!(matches!(
        err(vec![EmbedInput::Tokens(Vec::new())]),
        Error::EmbedInput { index: 0, .. }
    ));
    let limited = EmbedRequest::new(
        &model,
        vec![
            EmbedInput::Tokens(vec![7; 6]),
            EmbedInput::Tokens(vec![7; 6]),
        ],
    )
    .with_max_total_tokens(10);
    assert!(matches!(
        runtime.embed(&limited).unwrap_err(),
        Error::EmbedTooManyTokens {
            tokens: 12,
            limit: 10
        }
    ));
    let wide = EmbedRequest::new(&model, vec![text("x")]).with_options(EmbedOptions {
        pooling: Pooling::Last,
        dimensions: Some(577),
    });
    let e = runtime.embed(&wide).unwrap_err().to_string();
    assert!(e.contains("dimensions") && e.contains("576"), "{e}");
    let written = records(&log);
    assert_eq!(written.len(), 5);
    assert!(written.iter().all(|r| r.base.status == RunStatus::Error));
    // A cutline the model fits under but an 8,000-token input's activations do not.
    let tight = Runtime::builder()
        .cutline("450MiB".parse().unwrap())
        .ssot_log(&log)
        .build()
        .unwrap();
    let long = EmbedRequest::new(&model, vec![EmbedInput::Tokens(vec![7; 8000])]);
    let refused = tight.embed(&long).unwrap_err();
    assert!(refused.is_refusal(), "{refused}");
    let written = records(&log);
    let last = written.last().unwrap();
    assert_eq!(last.base.chain, "embeddings");
    assert_eq!(last.admission.as_ref().unwrap().decision, "refused");
}
