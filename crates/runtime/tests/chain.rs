//! The image-analysis -> summary chain end to end: the tiny seeded Qwen3-VL (a real
//! checkpoint directory written by the test) describes images, the real SmolLM2
//! summarises; one SSOT record with per-stage timings, image pixels, compression
//! ratio and predicted and measured peak. Also the shared-instance path, bad images,
//! and refusal under a tiny cutline.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::smollm2;

use afo_runtime::engine::TinyVlm;
use afo_runtime::guard::ByteSize;
use afo_runtime::ssot::{LogReader, ReadMode, Record, RunStatus};
use afo_runtime::{ChainImage, ChainRequest, Error, Runtime};

/// Every record of a log, strictly parsed.
fn records(log: &std::path::Path) -> Vec<Record> {
    LogReader::open(log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap()
        .into_iter()
        .map(|e| e.record)
        .collect()
}

fn sample() -> ChainImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cli/assets/sample.jpg");
    ChainImage {
        name: "sample.jpg".into(),
        bytes: std::fs::read(&path).unwrap(),
    }
}

/// A PNG of the given size (a gradient), encoded in memory.
fn png(w: u32, h: u32) -> ChainImage {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    ChainImage {
        name: format!("{w}x{h}.png"),
        bytes,
    }
}

#[test]
fn tiny_vlm_then_smollm2_gives_both_texts_and_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("tiny-vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let log = dir.path().join("runs.jsonl");
    let rt = Runtime::builder().ssot_log(&log).build().unwrap();
    let mut request =
        ChainRequest::new(&vlm, vec![sample(), png(300, 200)], "Describe the images.");
    request.llm = Some(smollm2());
    request.analysis.max_tokens = 16;
    request.summary.max_tokens = 24;
    let r = rt.chain(&request).unwrap();

    assert!(!r.shared_instance);
    assert_eq!(r.llm_id, "SmolLM2-135M-Instruct.Q4_1");
    assert!(
        (1..=16).contains(&r.analysis_tokens.generated),
        "{:?}",
        r.analysis_tokens
    );
    assert!(r.analysis_tokens.prompt > r.images[0].image_tokens);
    assert!(!r.summary.trim().is_empty(), "empty summary");
    let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["preprocess", "vision_encode", "image_analysis", "summary"]
    );
    // The sample is 480x320: resized to multiples of 32 inside the tiny model's
    // pixel budget, its tokens a quarter of its patches.
    let first = &r.images[0];
    assert_eq!(first.original, (480, 320));
    assert_eq!(first.resized.0 % 32, 0);
    assert_eq!(first.resized.1 % 32, 0);
    assert_eq!(
        first.image_tokens,
        first.grid_thw.iter().product::<usize>() / 4
    );
    assert!(first.compression_ratio.unwrap() > 0.0);
    assert_eq!(
        r.image_pixels,
        r.images
            .iter()
            .map(|i| u64::from(i.resized.0) * u64::from(i.resized.1))
            .sum::<u64>()
    );
    assert_eq!(r.original_pixels, 480 * 320 + 300 * 200);
    assert!(r.peak_memory_bytes > 0);
    // The summary model loads inside the call: its weights are in the prediction.
    let file = std::fs::metadata(smollm2()).unwrap().len();
    assert!(
        r.predicted_peak_bytes > file,
        "{} <= {file}",
        r.predicted_peak_bytes
    );

    let records = records(&log);
    assert_eq!(records.len(), 1);
    let Record::V2(rec) = &records[0] else {
        panic!("not a v2 record")
    };
    assert_eq!(rec.base.chain, "image_summary");
    assert_eq!(rec.base.status, RunStatus::Ok);
    assert_eq!(rec.image_pixels, Some(r.image_pixels));
    assert_eq!(rec.original_pixels, Some(r.original_pixels));
    assert_eq!(rec.compression_ratio, r.compression_ratio);
    assert_eq!(rec.predicted_peak_bytes, Some(r.predicted_peak_bytes));
    assert_eq!(rec.base.peak_memory_bytes, r.peak_memory_bytes);
    assert_eq!(rec.stages.as_ref().map(Vec::len), Some(4));
}

#[test]
fn one_instance_serves_both_stages_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("tiny-vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let rt = Runtime::builder().build().unwrap();
    let mut request = ChainRequest::new(&vlm, vec![sample()], "What is in the picture?");
    request.analysis.max_tokens = 8;
    request.summary.max_tokens = 8;
    let r = rt.chain(&request).unwrap();
    assert!(r.shared_instance);
    assert_eq!(r.llm_id, r.vlm_id);
    assert!(
        (1..=8).contains(&r.summary_tokens.generated),
        "{:?}",
        r.summary_tokens
    );
    // The same VLM directory named as the summary model is the same instance too.
    request.llm = Some(vlm.clone());
    let again = rt.chain(&request).unwrap();
    assert!(again.shared_instance);
    // Greedy and deterministic: the same answer twice.
    assert_eq!(again.analysis, r.analysis);
    assert_eq!(again.summary, r.summary);
}

#[test]
fn a_bad_image_is_named_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("tiny-vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let log = dir.path().join("runs.jsonl");
    let rt = Runtime::builder().ssot_log(&log).build().unwrap();
    let mut truncated = sample();
    truncated.bytes.truncate(600);
    truncated.name = "cut.jpg".into();
    let request = ChainRequest::new(&vlm, vec![png(64, 64), truncated], "Describe.");
    let err = rt.chain(&request).unwrap_err();
    assert!(
        matches!(err, Error::Image { ref name, .. } if name == "cut.jpg"),
        "{err}"
    );
    assert!(err.to_string().contains("cut.jpg"));
    let none = ChainRequest::new(&vlm, vec![], "Describe.");
    assert!(matches!(rt.chain(&none), Err(Error::NoImages)));
    let records = records(&log);
    assert_eq!(records.len(), 2);
    for r in &records {
        let Record::V2(r) = r else {
            panic!("not a v2 record")
        };
        assert_eq!(r.base.status, RunStatus::Error);
        assert_eq!(r.base.chain, "image_summary");
    }
}

#[test]
fn a_cutline_below_the_run_refuses_it_before_any_model_runs() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("tiny-vlm");
    TinyVlm::default().write(&vlm).unwrap();
    // Far below what the process already holds.
    let rt = Runtime::builder()
        .cutline(ByteSize::mib(8))
        .build()
        .unwrap();
    let request = ChainRequest::new(&vlm, vec![sample()], "Describe.");
    let err = rt.chain(&request).unwrap_err();
    assert!(err.is_refusal(), "{err}");
}
