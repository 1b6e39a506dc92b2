//! `afo chain` and `afo image` as a user runs them: the binary, its output and exit
//! status.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn afo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
    c.env("TMPDIR", std::env::temp_dir());
    c
}

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/sample.jpg")
}

#[test]
fn chain_runs_with_its_defaults_and_says_what_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let out = afo()
        .args([
            "--threads",
            "2",
            "chain",
            "--analysis-tokens",
            "8",
            "--summary-tokens",
            "8",
        ])
        .arg("--log")
        .arg(&log)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("shipped test image"), "{stdout}");
    assert!(stdout.contains("tiny test VLM"), "{stdout}");
    assert!(stdout.contains("480x320 -> "), "{stdout}");
    for stage in ["preprocess", "vision_encode", "image_analysis", "summary"] {
        assert!(
            stdout.contains(&format!("stage {stage}")),
            "{stage}: {stdout}"
        );
    }
    assert!(stdout.contains("same instance"), "{stdout}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.lines().count(), 1);
    assert!(log.contains("\"chain\":\"image_summary\""), "{log}");
}

#[test]
fn a_bad_image_fails_the_chain_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-an-image.jpg");
    std::fs::write(&bad, b"hello, this is text").unwrap();
    let out = afo().arg("chain").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not-an-image.jpg"), "{stderr}");
}

#[test]
fn image_reports_each_file_and_names_the_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("truncated.jpg");
    let bytes = std::fs::read(sample()).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out = afo().arg("image").arg(sample()).arg(&bad).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The good image still goes through; the bad one gets one line; the exit says so.
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("sample.jpg"), "{stdout}");
    assert!(
        stdout.contains("grid_thw") || stdout.contains("grid"),
        "{stdout}"
    );
    let bad_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("truncated.jpg"))
        .collect();
    assert_eq!(bad_lines.len(), 1, "{stderr}");
}
