//! `afo pull` against a local hub that speaks the Hugging Face endpoints: the cache
//! layout it writes, resuming, checksums, offline mode, errors, and a pulled model that
//! `afo generate --model ORG/NAME` then runs.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use common::smollm2;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn afo(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
    c.env("TMPDIR", std::env::temp_dir())
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT");
    c
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn git_sha1(bytes: &[u8]) -> String {
    use sha1::Digest;
    let mut d = sha1::Sha1::new();
    d.update(format!("blob {}\0", bytes.len()).as_bytes());
    d.update(bytes);
    hex(&d.finalize())
}

/// One file of the served repository; a large (LFS) file is named by its sha256 and
/// redirected to `/cdn/`, a small one by its git blob sha1 and served in place.
struct HubFile {
    name: String,
    bytes: Arc<Vec<u8>>,
    lfs: bool,
}

impl HubFile {
    fn etag(&self) -> String {
        if self.lfs {
            sha256(&self.bytes)
        } else {
            git_sha1(&self.bytes)
        }
    }
}

/// One request as the hub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct State {
    repo: String,
    files: Vec<HubFile>,
    /// Cut the connection after this many bytes of this file, once.
    cut_once: Option<(String, usize)>,
    /// Serve this file with one byte changed.
    corrupt: Option<String>,
    /// Answer 401 to requests without this bearer token.
    token: Option<String>,
    seen: Vec<Seen>,
}

/// A hub on 127.0.0.1 serving one repository.
struct Hub {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Hub {
    fn start(repo: &str, files: Vec<HubFile>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repo: repo.to_owned(),
            files,
            ..State::default()
        }));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = serve(stream, &state);
                });
            }
        });
        Self { url, state }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let (mut range, mut auth) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_owned()),
                "authorization" => auth = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    let mut out = stream;
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        auth: auth.clone(),
    });
    let head = method == "HEAD";
    let respond = |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        if !headers.iter().any(|(k, _)| k == "Content-Length") {
            text.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        text.push_str("\r\n");
        out.write_all(text.as_bytes())?;
        if !head {
            out.write_all(body)?;
        }
        out.flush()
    };
    // The content store's redirected addresses are signed, not authorised.
    if let Some(token) = &st.token
        && !path.starts_with("/cdn/")
        && auth.as_deref() != Some(&format!("Bearer {token}"))
    {
        return respond(&mut out, "401 Unauthorized", &[], b"");
    }
    let repo = st.repo.clone();
    if let Some(rest) = path.strip_prefix("/api/models/") {
        if rest != format!("{repo}/revision/main") {
            return respond(&mut out, "404 Not Found", &[], b"{\"error\":\"not found\"}");
        }
        let siblings: Vec<String> = st
            .files
            .iter()
            .map(|f| format!("{{\"rfilename\":\"{}\"}}", f.name))
            .collect();
        let body = format!(
            "{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return respond(&mut out, "200 OK", &[], body.as_bytes());
    }
    let (cdn, name) = if let Some(name) = path.strip_prefix("/cdn/") {
        (true, name.to_owned())
    } else if let Some(name) = path.strip_prefix(&format!("/{repo}/resolve/main/")) {
        (false, name.to_owned())
    } else {
        return respond(&mut out, "404 Not Found", &[], b"");
    };
    let Some(file) = st.files.iter().find(|f| f.name == name) else {
        return respond(&mut out, "404 Not Found", &[], b"Entry not found");
    };
    let etag = file.etag();
    let bytes = Arc::clone(&file.bytes);
    if !cdn && file.lfs {
        // The hub redirects a large file to its content store; the redirect carries
        // the content's hash and size.
        let headers = [
            ("Location".to_owned(), format!("/cdn/{name}")),
            ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
            ("ETag".to_owned(), "\"not-the-content-hash\"".to_owned()),
            ("X-Linked-Etag".to_owned(), format!("\"{etag}\"")),
            ("X-Linked-Size".to_owned(), bytes.len().to_string()),
        ];
        return respond(&mut out, "302 Found", &headers, b"");
    }
    let mut body: Vec<u8> = bytes.to_vec();
    if st.corrupt.as_deref() == Some(name.as_str()) {
        body[0] ^= 0xff;
    }
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or(0);
    let mut headers = vec![
        ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
        ("ETag".to_owned(), format!("\"{etag}\"")),
    ];
    let status = if start > 0 {
        headers.push((
            "Content-Range".to_owned(),
            format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let body = &body[start..];
    let cut = match &st.cut_once {
        Some((f, n)) if *f == name && !head => Some(*n),
        _ => None,
    };
    if let Some(n) = cut {
        st.cut_once = None;
        drop(st);
        headers.push(("Content-Length".to_owned(), body.len().to_string()));
        let mut text = "HTTP/1.1 200 OK\r\nConnection: close\r\n".to_owned();
        for (k, v) in &headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        out.write_all(text.as_bytes())?;
        out.write_all(&body[..n])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    drop(st);
    respond(&mut out, status, &headers, body)
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn small(name: &str, bytes: &[u8], lfs: bool) -> HubFile {
    HubFile {
        name: name.to_owned(),
        bytes: Arc::new(bytes.to_vec()),
        lfs,
    }
}

#[test]
fn a_cut_download_resumes_and_the_pulled_gguf_generates() {
    let gguf = std::fs::read(smollm2()).unwrap();
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let repo = "TestOrg/SmolLM2-GGUF";
    let hub = Hub::start(
        repo,
        vec![
            HubFile {
                name: name.to_owned(),
                bytes: Arc::new(gguf.clone()),
                lfs: true,
            },
            small("README.md", b"# a test model\n", false),
        ],
    );
    let cut = 10 << 20;
    hub.state.lock().unwrap().cut_once = Some((name.to_owned(), cut));
    let cache = tempfile::tempdir().unwrap();
    let spec = format!("{repo}:{name}");
    let pull = || {
        let mut c = afo(cache.path());
        c.args(["pull", &spec, "--endpoint", &hub.url]);
        c
    };

    let (out, _, stderr) = run(&mut pull());
    assert!(
        !out.status.success(),
        "the cut download must fail: {stderr}"
    );
    assert!(stderr.contains("resume"), "{stderr}");
    let sha = sha256(&gguf);
    let repo_dir = cache.path().join("models--TestOrg--SmolLM2-GGUF");
    let part = repo_dir.join("blobs").join(format!("{sha}.incomplete"));
    let have = std::fs::metadata(&part).unwrap().len();
    assert!(have > 0 && have <= cut as u64, "{have} bytes kept");
    assert!(!repo_dir.join("snapshots").join(COMMIT).join(name).exists());

    let (out, stdout, stderr) = run(&mut pull());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Piped: no progress bar redraws.
    assert!(!stderr.contains('\r'), "{stderr:?}");
    let gets: Vec<Seen> = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[1].range, Some(format!("bytes={have}-")));
    let link = repo_dir.join("snapshots").join(COMMIT).join(name);
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("../../blobs").join(&sha)
    );
    assert!(
        std::fs::read(&link).unwrap() == gguf,
        "the pulled file differs"
    );
    assert!(!part.exists());
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(stdout.contains(&link.display().to_string()), "{stdout}");

    // The pulled repository is a model by its id.
    let (out, stdout, stderr) = run(afo(cache.path()).args([
        "--threads",
        "2",
        "generate",
        "--model",
        repo,
        "--max-tokens",
        "4",
        "Say hello.",
    ]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.trim().is_empty(), "no text: {stderr}");
    assert!(stderr.contains("generated tokens"), "{stderr}");

    // Offline: found in the cache without a hub, by flag or by variable.
    let (out, stdout, stderr) = run(afo(cache.path()).args([
        "pull",
        &spec,
        "--offline",
        "--endpoint",
        "http://127.0.0.1:9",
    ]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&link.display().to_string()), "{stdout}");
    let before = hub.seen().len();
    let (out, stdout, stderr) = run(afo(cache.path())
        .args(["pull", repo])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", &hub.url));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(hub.seen().len(), before, "offline mode reached the hub");
    let (out, _, stderr) = run(afo(cache.path()).args(["pull", "Other/Missing", "--offline"]));
    assert!(!out.status.success());
    assert!(
        stderr.contains("offline") && stderr.contains("Other/Missing"),
        "{stderr}"
    );
}

#[test]
fn a_wrong_checksum_fails_naming_the_file_and_leaves_nothing_in_the_snapshot() {
    let weights: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let config = br#"{"model_type": "llama"}"#;
    let repo = "TestOrg/Tiny";
    let hub = Hub::start(
        repo,
        vec![
            small("config.json", config, false),
            small("model.safetensors", &weights, true),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("models--TestOrg--Tiny");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    let pull = || {
        let mut c = afo(cache.path());
        c.args(["pull", repo]).env("HF_ENDPOINT", &hub.url);
        c
    };
    for (file, kind, expected) in [
        ("config.json", "git blob sha1", git_sha1(config)),
        // config.json is right this time (and its blob is kept), the weights are not.
        ("model.safetensors", "sha256", sha256(&weights)),
    ] {
        hub.state.lock().unwrap().corrupt = Some(file.to_owned());
        let (out, _, stderr) = run(&mut pull());
        assert!(!out.status.success(), "{stderr}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "{stderr}");
        assert!(
            line.contains("checksum mismatch")
                && line.contains(file)
                && line.contains(kind)
                && line.contains(&expected),
            "{stderr}"
        );
        assert!(!snapshot.exists(), "a failed pull left a snapshot");
        let leftovers: Vec<_> = std::fs::read_dir(repo_dir.join("blobs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    // Served right, the same pull succeeds and checks both files.
    hub.state.lock().unwrap().corrupt = None;
    let (out, stdout, stderr) = run(&mut pull());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(std::fs::read(snapshot.join("config.json")).unwrap(), config);
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        weights
    );
}

#[test]
fn a_pull_takes_the_files_a_model_needs_and_sends_the_token() {
    let repo = "TestOrg/Folder";
    let hub = Hub::start(
        repo,
        vec![
            small("README.md", b"readme", false),
            small("config.json", b"{}", false),
            small("tokenizer.json", b"{\"tok\": 1}", false),
            small("model.safetensors", b"weights", true),
            small("pytorch_model.bin", b"pickle", true),
        ],
    );
    hub.state.lock().unwrap().token = Some("secret".to_owned());
    let cache = tempfile::tempdir().unwrap();
    let (out, _, stderr) = run(afo(cache.path()).args(["pull", repo, "--endpoint", &hub.url]));
    assert!(!out.status.success());
    assert!(
        stderr.contains("401") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );

    let (out, stdout, stderr) = run(afo(cache.path())
        .args(["pull", repo, "--endpoint", &hub.url])
        .env("HF_TOKEN", "secret"));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let snapshot = cache
        .path()
        .join("models--TestOrg--Folder/snapshots")
        .join(COMMIT);
    let mut files: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let seen = hub.seen();
    let to_hub: Vec<&Seen> = seen
        .iter()
        .filter(|s| !s.path.starts_with("/cdn/"))
        .collect();
    assert!(
        to_hub
            .iter()
            .rev()
            .take(4)
            .all(|s| s.auth.as_deref() == Some("Bearer secret")),
        "{to_hub:?}"
    );
}

#[test]
fn hub_errors_are_one_clear_line() {
    let hub = Hub::start("TestOrg/There", vec![small("config.json", b"{}", false)]);
    let cache = tempfile::tempdir().unwrap();
    let case = |spec: &str, endpoint: &str, expect: &[&str]| {
        let (out, _, stderr) = run(afo(cache.path()).args(["pull", spec, "--endpoint", endpoint]));
        assert!(!out.status.success(), "{spec}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{spec}: `{e}` not in {stderr}");
        }
    };
    case(
        "TestOrg/Gone",
        &hub.url,
        &["404", "no repository TestOrg/Gone"],
    );
    case(
        "TestOrg/There:weights.gguf",
        &hub.url,
        &[
            "`weights.gguf` is not a file of TestOrg/There",
            "config.json",
        ],
    );
    case(
        "TestOrg/There:../../etc/passwd",
        &hub.url,
        &["not a file name"],
    );
    case(
        "TestOrg/There",
        "http://127.0.0.1:9",
        &[
            "network error",
            "http://127.0.0.1:9/api/models/TestOrg/There",
        ],
    );
}

#[test]
fn a_server_that_ignores_range_restarts_the_file() {
    // The first answer is cut; the hub below then ignores Range (200, whole file).
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let repo = "TestOrg/NoRange";
    let hub = Hub::start(repo, vec![small("m.gguf", &bytes, true)]);
    hub.state.lock().unwrap().cut_once = Some(("m.gguf".to_owned(), 100_000));
    let cache = tempfile::tempdir().unwrap();
    let (out, _, _) = run(afo(cache.path()).args(["pull", repo, "--endpoint", &hub.url]));
    assert!(!out.status.success());
    // Make the partial file longer than what a resume would append to: a server
    // answering 200 must make the client start over, not append.
    let part = cache
        .path()
        .join("models--TestOrg--NoRange/blobs")
        .join(format!("{}.incomplete", sha256(&bytes)));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&part)
        .unwrap();
    f.write_all(b"garbage").unwrap();
    drop(f);
    let kept = std::fs::metadata(&part).unwrap().len();
    // Ranges from here on are answered with the whole file.
    let proxy = ignore_range_proxy(&hub.url);
    let (out, stdout, stderr) = run(afo(cache.path()).args(["pull", repo, "--endpoint", &proxy]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let file = cache
        .path()
        .join("models--TestOrg--NoRange/snapshots")
        .join(COMMIT)
        .join("m.gguf");
    let got = std::fs::read(file).unwrap();
    assert!(got.len() as u64 != kept + bytes.len() as u64, "appended");
    assert!(got == bytes, "the restarted file differs");
}

/// A proxy that drops the `Range` header of every request it forwards.
fn ignore_range_proxy(upstream: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if !line.to_ascii_lowercase().starts_with("range:") {
                        head.push_str(&line);
                    }
                }
                head.push_str("\r\n");
                let mut server = TcpStream::connect(&upstream).unwrap();
                server.write_all(head.as_bytes()).unwrap();
                let mut answer = Vec::new();
                server.read_to_end(&mut answer).unwrap();
                let mut client = client;
                let _ = client.write_all(&answer);
            });
        }
    });
    url
}
