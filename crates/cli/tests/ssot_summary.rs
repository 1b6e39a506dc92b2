//! `afo ssot summary` over several logs: the overall summary, a part per log or
//! replica, skipped lines named with their log.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn afo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afo"))
}

/// One v2 line: a run of `latency_ms`, with a badge and an optional replica.
fn line(run: &str, latency_ms: f64, badge: &str, replica: Option<&str>, error: bool) -> String {
    let mut v = serde_json::json!({
        "schema_version": 2,
        "ts": "2026-11-23T22:41:07Z",
        "run_id": run,
        "chain": "generate",
        "model_id": "SmolLM2-135M-Instruct",
        "status": if error { "error" } else { "ok" },
        "error": if error { Some("boom") } else { None },
        "latency_ms": latency_ms,
        "peak_memory_bytes": 300_000_000u64,
        "cutline_bytes": 1_000_000_000u64,
        "tokens_in": 5,
        "tokens_out": 10,
        "tokens_per_s": 50.0,
        "status_badge": badge,
    });
    if let Some(r) = replica {
        v["replica_id"] = r.into();
        v["node_id"] = "node-a".into();
    }
    v.to_string()
}

fn write(path: &Path, lines: &[String], tail: &str) {
    let mut text = lines.join("\n");
    text.push('\n');
    text.push_str(tail);
    std::fs::write(path, text).unwrap();
}

#[test]
fn two_logs_are_summarised_together_with_a_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    // a: 10, 20, 30 ms, one error, SAFE; b: 100, 200 ms, WARN, a malformed line
    // and a torn last line.
    write(
        &a,
        &[
            line("a1", 10.0, "SAFE", None, false),
            line("a2", 20.0, "SAFE", None, true),
            line("a3", 30.0, "SAFE", None, false),
        ],
        "",
    );
    write(
        &b,
        &[
            line("b1", 100.0, "WARN", None, false),
            "not json".to_owned(),
            line("b2", 200.0, "SAFE", None, false),
        ],
        "{\"schema_version\": 2, \"ts\"",
    );

    let out = afo()
        .args(["ssot", "summary", "--json"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Each skipped line is named with its log.
    assert!(
        stderr.contains(&format!("{}:2: skipped", b.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:4: skipped (torn last line)", b.display())),
        "{stderr}"
    );
    assert!(!stderr.contains(&a.display().to_string()), "{stderr}");

    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["count"], 5);
    assert_eq!(json["errors"], 1);
    assert_eq!(json["skipped_lines"], 2);
    assert_eq!(json["worst_badge"], "WARN");
    // Nearest rank over 10, 20, 30, 100, 200: the 3rd, then the 5th.
    assert_eq!(json["latency_ms"]["p50"], 30.0);
    assert_eq!(json["latency_ms"]["p99"], 200.0);
    let parts = json["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["by"], "log");
    assert_eq!(parts[0]["id"], a.display().to_string());
    assert_eq!(parts[0]["count"], 3);
    assert_eq!(parts[0]["worst_badge"], "SAFE");
    assert_eq!(parts[1]["id"], b.display().to_string());
    assert_eq!(parts[1]["count"], 2);
    assert_eq!(parts[1]["skipped_lines"], 2);
    assert_eq!(json["skipped"].as_array().unwrap().len(), 2);
    assert_eq!(json["skipped"][1]["torn"], true);

    let out = afo()
        .args(["ssot", "summary"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("records        5 (v1 0, v2 5), 2 line(s) skipped"),
        "{text}"
    );
    assert!(text.contains("worst badge    WARN"), "{text}");
    assert!(
        text.contains(&format!("log {}: 3 record(s), 1 error(s)", a.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("log {}: 2 record(s), 0 error(s)", b.display())),
        "{text}"
    );
}

#[test]
fn records_naming_their_replica_are_summarised_per_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    write(
        &a,
        &[
            line("a1", 10.0, "SAFE", Some("replica-0"), false),
            line("a2", 20.0, "OVER_CUTLINE", Some("replica-0"), false),
        ],
        "",
    );
    write(
        &b,
        &[line("b1", 30.0, "SAFE", Some("replica-1"), false)],
        "",
    );
    let out = afo()
        .args(["ssot", "summary", "--json"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["worst_badge"], "OVER_CUTLINE");
    let parts: Vec<(String, String, u64)> = json["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["by"].as_str().unwrap().to_owned(),
                p["id"].as_str().unwrap().to_owned(),
                p["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            ("replica".to_owned(), "replica-0".to_owned(), 2),
            ("replica".to_owned(), "replica-1".to_owned(), 1),
        ]
    );
}

#[test]
fn a_missing_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    write(&a, &[line("a1", 10.0, "SAFE", None, false)], "");
    let missing = dir.path().join("missing.jsonl");
    let out = afo()
        .args(["ssot", "summary"])
        .arg(&a)
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}
