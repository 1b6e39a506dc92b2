//! `afo route` without `--catalog` and `afo serve` without `--model`: both use the
//! models found in `$AFO_MODEL_DIR` and the Hugging Face cache.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set AFO_MODEL_DIR)",
        path.display()
    );
    path.canonicalize().unwrap()
}

fn afo(models: &Path, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
    c.env("TMPDIR", std::env::temp_dir())
        .env("AFO_MODEL_DIR", models)
        .env("HF_HUB_CACHE", cache)
        .args(["--threads", "2"]);
    c
}

/// A Hugging Face cache holding `ORG/NAME` as one GGUF file (a symlinked blob).
fn cache_with_gguf(root: &Path, repo: &str) {
    let folder = root.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::create_dir_all(folder.join("snapshots/abc123")).unwrap();
    std::os::unix::fs::symlink(model_path(), folder.join("blobs/feed")).unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/feed",
        folder.join("snapshots/abc123").join(MODEL),
    )
    .unwrap();
    std::fs::write(folder.join("refs/main"), "abc123").unwrap();
}

#[test]
fn route_without_a_catalog_uses_the_models_found() {
    let models = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(model_path(), models.path().join("smol.gguf")).unwrap();
    cache_with_gguf(cache.path(), "TestOrg/Smol-GGUF");
    let out = afo(models.path(), cache.path())
        .args(["route", "What is the capital of France?"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout.lines().next().unwrap();
    assert!(
        first.starts_with("no --catalog: a catalog of 2 models found in")
            && first.contains(&models.path().display().to_string())
            && first.contains(&cache.path().display().to_string()),
        "{first}"
    );
    // Both score the same and have the same size: the id breaks the tie.
    assert!(
        stdout.contains(&format!("  {}", MODEL.trim_end_matches(".gguf"))),
        "{stdout}"
    );
    assert!(stdout.contains("chosen: "), "{stdout}");
    assert!(stdout.contains("would run: "), "{stdout}");
}

#[test]
fn route_with_nothing_found_says_where_it_looked() {
    let models = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = afo(models.path(), cache.path())
        .args(["route", "hello"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        models.path().display().to_string(),
        cache.path().display().to_string(),
        "afo pull".into(),
        "scripts/fetch-models.sh".into(),
    ] {
        assert!(stderr.contains(&part), "`{part}` not in {stderr}");
    }
}

#[test]
fn serve_without_a_model_serves_the_models_found() {
    let models = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    cache_with_gguf(cache.path(), "TestOrg/Smol-GGUF");
    let mut child = afo(models.path(), cache.path())
        .args(["serve", "--port", "0", "--lazy"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("serve ended before listening: {seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.contains("no --model: serving the 1 models found in")
            && seen.contains(&cache.path().display().to_string()),
        "{seen}"
    );
    let id = MODEL.trim_end_matches(".gguf");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains(&format!("\"id\":\"{id}\"")), "{body}");
}
