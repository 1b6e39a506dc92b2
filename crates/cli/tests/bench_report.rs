//! `afo bench report` as a user runs it: rendering saved results (and llama.cpp's) into
//! one self-contained HTML page, clear errors for bad inputs, and the whole suite on
//! the real model.

#![allow(clippy::unwrap_used)]

mod common;

use common::smollm2;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn afo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
    c.env("TMPDIR", std::env::temp_dir());
    c
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bench")
        .join(name)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The HTML between each `<section` and the next.
fn sections(html: &str) -> Vec<&str> {
    html.split("<section").skip(1).collect()
}

fn report_from(from: &[&Path], reference: Option<&Path>, out: &Path) -> Output {
    let mut c = afo();
    c.args(["bench", "report", "--out"]).arg(out).arg("--from");
    c.args(from);
    if let Some(r) = reference {
        c.arg("--reference").arg(r);
    }
    c.output().unwrap()
}

#[test]
fn saved_results_and_a_reference_render_one_self_contained_page() {
    let dir = tempfile::tempdir().unwrap();
    // The results come from a folder (two files, read in name order).
    let results = dir.path().join("results");
    std::fs::create_dir(&results).unwrap();
    for name in ["speed.json", "rest.json"] {
        std::fs::copy(fixture(name), results.join(name)).unwrap();
    }
    let out = dir.path().join("out/report.html");
    let run = report_from(&[&results], Some(&fixture("llama-bench.json")), &out);
    assert!(run.status.success(), "{}", text(&run));
    let html = std::fs::read_to_string(&out).unwrap();

    // The machine header, with text from the inputs escaped.
    assert!(html.contains("AMD EPYC &lt;test &amp; co&gt;"), "{html}");
    assert!(!html.contains("<test & co>"));
    assert!(html.contains("avx512_vnni"));
    assert!(html.contains("0123456789abcdef0123456789abcdef01234567"));
    assert!(html.contains("2026-12-01T10:00:00Z"));
    assert!(html.contains("bench speed --model SmolLM2.gguf --json speed.json"));
    assert!(html.contains("Command: <code>"));
    assert!(html.contains("bench report --out"));

    // One section per kind of result, each with its chart.
    let s = sections(&html);
    assert_eq!(s.len(), 6, "{html}");
    for (section, id) in s
        .iter()
        .zip(["speed", "batching", "memory", "kv", "image", "prefix"])
    {
        assert!(section.starts_with(&format!(" id=\"{id}\"")), "{section}");
        assert!(section.contains("<svg"), "{id} has no chart");
    }
    // The image section has two charts (time, peak), the others one.
    assert_eq!(html.matches("<svg").count(), 7);

    // Ratios computed from the inputs: Q4_1 prefill 210 / 200, decode 110 / 100.
    assert!(html.contains(">1.05x<"), "{}", s[0]);
    assert!(html.contains(">1.10x<"), "{}", s[0]);
    assert!(html.contains("200.0 ± 3.8 (pp512)"), "{}", s[0]);
    // The roofline from the int8 result's own fields: 21 GB/s over 150 MB a step is
    // 140 tok/s, of which 69.3 is 50%; the Q4_1 result (an older file) has none.
    assert!(s[0].contains(">50% of 140.0<"), "{}", s[0]);
    assert!(s[0].contains(">int8 avx2, f16 dense avx2<"), "{}", s[0]);
    assert_eq!(s[0].matches("% of ").count(), 1, "{}", s[0]);
    // int8 has no reference: its bars carry no ratio.
    assert!(!s[0].contains("int8 pp512</text><text"), "{}", s[0]);
    // The memory error and the KV policy's loss against the full cache.
    assert!(s[2].contains("-0.6%"), "{}", s[2]);
    assert!(s[3].contains("+3.39%"), "{}", s[3]);
    assert!(s[2].contains("y = x"));

    // Self-contained: no scripts, nothing fetched.
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("<script"));
    assert!(!html.contains(" src="));
    // Rendering only: no results file written.
    assert!(!dir.path().join("out/report.json").exists());
}

#[test]
fn without_a_reference_the_speed_section_says_so_and_prints_no_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.html");
    let run = report_from(&[&fixture("speed.json")], None, &out);
    assert!(run.status.success(), "{}", text(&run));
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(sections(&html).len(), 2, "{html}");
    assert!(html.contains("no reference given"));
    assert!(!html.contains("1.05x"));
}

/// Runs `report --from` on a results file written from `results` and a reference
/// written from `reference`; returns the failed run's stderr and the two paths.
fn fails(results: &str, reference: &str) -> (String, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (r, l) = (dir.join("my-results.json"), dir.join("my-llama.json"));
    std::fs::write(&r, results).unwrap();
    std::fs::write(&l, reference).unwrap();
    let run = report_from(&[&r], Some(&l), &dir.join("r.html"));
    assert!(!run.status.success(), "{}", text(&run));
    assert!(!dir.join("r.html").exists());
    (String::from_utf8_lossy(&run.stderr).into_owned(), r, l)
}

#[test]
fn a_bad_results_or_reference_file_is_named_with_the_problem() {
    let good = std::fs::read_to_string(fixture("speed.json")).unwrap();
    let reference = std::fs::read_to_string(fixture("llama-bench.json")).unwrap();

    // A result without one of its fields.
    let missing = good.replacen("\"decode_tok_s\": 110.0,", "", 1);
    assert_ne!(missing, good);
    let (err, file, _) = fails(&missing, &reference);
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("missing field `decode_tok_s`"), "{err}");

    // Not JSON at all.
    let (err, file, _) = fails("{\"results\": [", &reference);
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("line 1"), "{err}");

    // An unknown kind of result.
    let (err, _, _) = fails(
        &good.replacen("\"kind\": \"batching\"", "\"kind\": \"juggling\"", 1),
        &reference,
    );
    assert!(err.contains("juggling"), "{err}");

    // A reference test without `avg_ts`.
    let (err, _, file) = fails(&good, &reference.replacen("\"avg_ts\": 100.0,", "", 1));
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("test 1: missing field `avg_ts`"), "{err}");

    // A reference whose `n_prompt` is text.
    let (err, _, _) = fails(
        &good,
        &reference.replacen("\"n_prompt\": 512", "\"n_prompt\": \"512\"", 1),
    );
    assert!(
        err.contains("test 0: field `n_prompt` is not a non-negative integer"),
        "{err}"
    );

    // A reference that is not llama-bench's array.
    let (err, _, file) = fails(&good, "{\"avg_ts\": 1}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("expected an array"), "{err}");
}

#[test]
fn the_quick_suite_on_the_real_model_writes_the_page_and_its_results() {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("site/index.html");
    let start = std::time::Instant::now();
    let run = afo()
        .args(["--threads", "2", "bench", "report", "--quick", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    eprintln!("quick suite: {:.1} s", start.elapsed().as_secs_f64());

    let html = std::fs::read_to_string(&out).unwrap();
    let s = sections(&html);
    assert_eq!(s.len(), 6, "{html}");
    assert!(s.iter().all(|s| s.contains("<svg")));
    assert!(html.contains("Command: <code>"));
    assert!(html.contains("--quick"));
    assert!(!html.contains("http://") && !html.contains("https://"));

    // The results beside the page, one per benchmark, with plausible figures.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!json["git_commit"].as_str().unwrap().is_empty());
    let results = json["results"].as_array().unwrap();
    let kinds: Vec<&str> = results
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "memory", "image", "speed", "speed", "speed", "batching", "prefix", "kv"
        ]
    );
    let speed: Vec<&serde_json::Value> = results.iter().filter(|r| r["kind"] == "speed").collect();
    assert_eq!(speed[0]["format"], "Q4_1");
    assert_eq!(speed[1]["format"], "int8");
    for r in &speed {
        assert!(r["decode_tok_s"].as_f64().unwrap() > 1.0, "{r}");
        assert!(r["prefill_tok_s"].as_f64().unwrap() > 1.0, "{r}");
    }
    // Batching times decode steps only: the 16-token prompts and first tokens run
    // before the clock starts.
    let batching = results.iter().find(|r| r["kind"] == "batching").unwrap();
    assert_eq!(batching["prompt_tokens"], 16, "{batching}");
    let points = batching["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "{batching}");
    for p in points {
        assert!(p["tok_s"].as_f64().unwrap() > 1.0, "{batching}");
    }
    let kv = results.iter().find(|r| r["kind"] == "kv").unwrap();
    assert_eq!(kv["rows"].as_array().unwrap().len(), 4, "{kv}");
    let full = &kv["rows"][0];
    assert_eq!(full["policy"], "full");
    assert!(full["perplexity"].as_f64().unwrap() > 1.0);
    // The same results render again from the saved file alone.
    let again = dir.path().join("again.html");
    let run = report_from(&[&out.with_extension("json")], None, &again);
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(sections(&std::fs::read_to_string(&again).unwrap()).len(), 6);
}
