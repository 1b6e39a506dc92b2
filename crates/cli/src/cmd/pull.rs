//! `afo pull`: download a model from a Hugging Face compatible hub into the standard
//! Hugging Face cache, where `afo --model ORG/NAME` (and other tools) find it.
//!
//! The client speaks the hub's documented endpoints: `GET
//! {endpoint}/api/models/{repo}/revision/{rev}` for the commit and the file list, then
//! per file a `HEAD {endpoint}/{repo}/resolve/{rev}/{file}` (not followed: its
//! `X-Linked-Etag` / `ETag` name the content, `X-Linked-Size` its size) and a `GET` of
//! the same address (redirects followed). Bytes go to `blobs/<etag>.incomplete`,
//! resumed with `Range` on a rerun, checked against the etag, then moved to
//! `blobs/<etag>` and linked from `snapshots/<commit>/<file>`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use afo_runtime::engine::HfCache;
use afo_runtime::guard::ByteSize;
use anyhow::{Context, bail};

/// The files of a safetensors model that a pull without `:FILE` takes, besides the
/// `*.safetensors` weights, when the repository has them.
const MODEL_FILES: [&str; 9] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "model.safetensors.index.json",
];

/// Arguments of `afo pull`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Without :FILE, a repository with safetensors weights gives \
    config.json, the tokenizer files, generation_config.json, the safetensors index and \
    every *.safetensors file; a repository of GGUF files gives its GGUF file when it holds \
    exactly one, and otherwise asks for one by name (ORG/NAME:FILE), listing them.\n\n\
    The files go to the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else \
    ~/.cache/huggingface/hub). HF_TOKEN, when set, is sent as a bearer token. A rerun \
    resumes an interrupted download. Each file is checked against the hub's hash (sha256 \
    for large files, the git blob sha1 for the others)."
)]
pub(crate) struct Args {
    /// The repository, `ORG/NAME`, or one file of it, `ORG/NAME:FILE`.
    model: String,
    /// The hub's address (default: `$HF_ENDPOINT`, else `https://huggingface.co`).
    #[arg(long)]
    endpoint: Option<String>,
    /// The branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Use no network: succeed when the files are in the cache already (also
    /// HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let (repo, file) = match args.model.split_once(':') {
        Some((repo, file)) => (repo, Some(file)),
        None => (args.model.as_str(), None),
    };
    anyhow::ensure!(
        super::is_repo_id(repo),
        "`{repo}` is not a repository id: write ORG/NAME or ORG/NAME:FILE"
    );
    if let Some(f) = file {
        check_file_name(f)?;
    }
    check_plain(&args.revision, "revision", "/._-")?;
    let cache = super::hf_cache().context(
        "no Hugging Face cache folder: set HF_HUB_CACHE, HF_HOME or HOME to say where it is",
    )?;
    let offline = args.offline
        || std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
    if offline {
        return offline_pull(&cache, repo, file, &args.revision);
    }
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()))
        .unwrap_or_else(|| "https://huggingface.co".to_owned());
    let hub = Hub::new(endpoint.trim_end_matches('/'));
    let info = hub.revision(repo, &args.revision)?;
    let files = match file {
        Some(f) => {
            if !info.files.iter().any(|s| s == f) {
                bail!(
                    "`{f}` is not a file of {repo} at `{}` (it holds: {})",
                    args.revision,
                    info.files.join(", ")
                );
            }
            vec![f.to_owned()]
        }
        None => model_files(repo, &info.files)?,
    };
    let snapshot = cache.snapshot_path(repo, &info.commit);
    // Every blob is fetched and checked before the snapshot links any of them, so a
    // failed pull leaves no partial snapshot.
    let (mut new_bytes, mut fetched) = (0, 0);
    let mut etags = Vec::with_capacity(files.len());
    for f in &files {
        let (etag, downloaded) = fetch_blob(&hub, &cache, repo, &args.revision, f)?;
        if let Some(bytes) = downloaded {
            new_bytes += bytes;
            fetched += 1;
        }
        etags.push(etag);
    }
    for (f, etag) in files.iter().zip(&etags) {
        link_blob(&cache, repo, &info.commit, f, etag)?;
    }
    if args.revision != info.commit {
        let refs = cache.ref_path(repo, &args.revision);
        create_parent(&refs)?;
        fs::write(&refs, &info.commit).with_context(|| format!("writing {}", refs.display()))?;
    }
    let model = match file {
        Some(f) => snapshot.join(f),
        None => afo_runtime::engine::model_file_in(&snapshot),
    };
    out!(
        "{repo} at {}: {} files ({fetched} downloaded, {}) in {}",
        short(&info.commit),
        files.len(),
        ByteSize(new_bytes),
        model.display()
    );
    Ok(())
}

/// `--offline`: the files must be in the cache already.
fn offline_pull(
    cache: &HfCache,
    repo: &str,
    file: Option<&str>,
    revision: &str,
) -> anyhow::Result<()> {
    let snapshot = cache.snapshot(repo, Some(revision)).with_context(|| {
        format!(
            "offline (--offline or HF_HUB_OFFLINE): {repo} is not in the Hugging Face cache \
             at {}",
            cache.root().display()
        )
    })?;
    let model = match file {
        Some(f) => snapshot.join(f),
        None => afo_runtime::engine::model_file_in(&snapshot),
    };
    anyhow::ensure!(
        model.exists(),
        "offline (--offline or HF_HUB_OFFLINE): {} is not in the Hugging Face cache",
        model.display()
    );
    out!("offline: {repo} is in the cache at {}", model.display());
    Ok(())
}

/// What a pull without `:FILE` takes from a repository's file list.
fn model_files(repo: &str, all: &[String]) -> anyhow::Result<Vec<String>> {
    let top: Vec<&String> = all.iter().filter(|f| !f.contains('/')).collect();
    let weights: Vec<String> = top
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .map(|f| (*f).clone())
        .collect();
    if !weights.is_empty() {
        anyhow::ensure!(
            top.iter().any(|f| *f == "config.json"),
            "{repo} has safetensors weights but no config.json"
        );
        let mut files: Vec<String> = MODEL_FILES
            .iter()
            .filter(|name| top.iter().any(|f| f == *name))
            .map(|name| (*name).to_owned())
            .collect();
        files.extend(weights);
        return Ok(files);
    }
    let ggufs: Vec<&String> = top
        .iter()
        .copied()
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(vec![(*one).clone()]),
        [] => bail!(
            "{repo} has neither safetensors weights nor a GGUF file (it holds: {})",
            all.join(", ")
        ),
        many => bail!(
            "{repo} holds {} GGUF files; name one: afo pull {repo}:FILE ({})",
            many.len(),
            many.iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Downloads one file's blob into the cache unless it is there. Returns its etag and
/// the bytes downloaded, or `None` when the blob was cached.
fn fetch_blob(
    hub: &Hub,
    cache: &HfCache,
    repo: &str,
    revision: &str,
    file: &str,
) -> anyhow::Result<(String, Option<u64>)> {
    check_file_name(file)?;
    let url = format!(
        "{}/{repo}/resolve/{}/{file}",
        hub.endpoint,
        encode(revision)
    );
    let meta = hub.head(&url, repo, file)?;
    let blob = cache.blob_path(repo, &meta.etag);
    if blob.is_file() {
        return Ok((meta.etag, None));
    }
    let part = blob.with_file_name(format!("{}.incomplete", meta.etag));
    create_parent(&part)?;
    hub.download(&url, &part, meta.size, file)?;
    verify(&part, file, &meta.etag)?;
    fs::rename(&part, &blob).with_context(|| format!("moving to {}", blob.display()))?;
    let bytes = fs::metadata(&blob).map_or(0, |m| m.len());
    Ok((meta.etag, Some(bytes)))
}

/// Links `snapshots/<commit>/<file>` to `../../blobs/<etag>` (one more `..` per folder
/// in the file's name), replacing an older link.
fn link_blob(
    cache: &HfCache,
    repo: &str,
    commit: &str,
    file: &str,
    etag: &str,
) -> anyhow::Result<()> {
    let link = cache.snapshot_path(repo, commit).join(file);
    create_parent(&link)?;
    let depth = 2 + file.matches('/').count();
    let target: PathBuf = std::iter::repeat_n("..", depth)
        .collect::<PathBuf>()
        .join("blobs")
        .join(etag);
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
    }
    link_or_copy(&target, &cache.blob_path(repo, etag), &link)
}

#[cfg(unix)]
fn link_or_copy(target: &Path, _blob: &Path, link: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

#[cfg(not(unix))]
fn link_or_copy(_target: &Path, blob: &Path, link: &Path) -> anyhow::Result<()> {
    fs::copy(blob, link)
        .map(drop)
        .with_context(|| format!("copying {} to {}", blob.display(), link.display()))
}

/// Checks the downloaded bytes against the etag: a 64-hex etag is the sha256 of the
/// content (large files), a 40-hex one the git blob sha1; others are not hashes and
/// are not checked. A mismatch deletes the file.
fn verify(part: &Path, file: &str, etag: &str) -> anyhow::Result<()> {
    use sha1::Digest as _;
    let is_hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
    let (kind, got) = match etag.len() {
        64 if is_hex => ("sha256", hash_file(part, sha2::Sha256::new(), None)?),
        40 if is_hex => {
            let len = fs::metadata(part)
                .with_context(|| format!("reading {}", part.display()))?
                .len();
            let header = format!("blob {len}\0");
            (
                "git blob sha1",
                hash_file(part, sha1::Sha1::new(), Some(header.as_bytes()))?,
            )
        }
        _ => return Ok(()),
    };
    if !got.eq_ignore_ascii_case(etag) {
        // A corrupt download must not be resumed; the next run starts over.
        let _ = fs::remove_file(part);
        bail!("checksum mismatch for `{file}`: expected {kind} {etag}, got {got}");
    }
    Ok(())
}

fn hash_file<D: sha1::Digest>(
    path: &Path,
    mut digest: D,
    prefix: Option<&[u8]>,
) -> anyhow::Result<String> {
    if let Some(p) = prefix {
        digest.update(p);
    }
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    Ok(digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A hub client over the documented endpoints.
struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

/// The revision API's answer, as used.
#[derive(serde::Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

/// A commit and its file names.
struct RepoRevision {
    commit: String,
    files: Vec<String>,
}

/// What the HEAD of a file says.
struct FileMeta {
    etag: String,
    size: Option<u64>,
}

impl Hub {
    fn new(endpoint: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("afo/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            agent,
            endpoint: endpoint.to_owned(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        }
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => request.header("Authorization", format!("Bearer {t}")),
            None => request,
        }
    }

    /// The commit and files of `repo` at `revision`.
    fn revision(&self, repo: &str, revision: &str) -> anyhow::Result<RepoRevision> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint,
            encode(revision)
        );
        let mut response = self
            .auth(self.agent.get(&url))
            .call()
            .map_err(|e| network(&url, &e))?;
        self.check(response.status().as_u16(), &url, repo, None, revision)?;
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| network(&url, &e))?;
        let info: RevisionInfo = serde_json::from_str(&text)
            .with_context(|| format!("{url}: the answer is not the hub's revision JSON"))?;
        check_plain(&info.sha, "commit", "")?;
        Ok(RepoRevision {
            commit: info.sha,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        })
    }

    /// The etag and size of a file, from a HEAD that does not follow redirects (the
    /// hub's redirect of a large file carries its `X-Linked-*` headers).
    fn head(&self, url: &str, repo: &str, file: &str) -> anyhow::Result<FileMeta> {
        let response = self
            .auth(self.agent.head(url))
            .config()
            .max_redirects(0)
            .build()
            .call()
            .map_err(|e| network(url, &e))?;
        let status = response.status().as_u16();
        if !(200..400).contains(&status) {
            self.check(status, url, repo, Some(file), "")?;
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
            .with_context(|| format!("{url}: the hub sent no ETag for `{file}`"))?;
        check_plain(&etag, "ETag", "-")?;
        let size = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|s| s.parse().ok());
        Ok(FileMeta { etag, size })
    }

    /// Downloads `url` into `part`, resuming from the bytes already there.
    fn download(
        &self,
        url: &str,
        part: &Path,
        size: Option<u64>,
        file: &str,
    ) -> anyhow::Result<()> {
        let mut have = fs::metadata(part).map_or(0, |m| m.len());
        if size.is_some_and(|s| have > s) {
            have = 0;
        }
        if size.is_some_and(|s| s > 0 && have == s) {
            return Ok(());
        }
        let mut request = self.auth(self.agent.get(url));
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(|e| network(url, &e))?;
        let status = response.status().as_u16();
        let mut out = match status {
            206 if have > 0 => OpenOptions::new().append(true).open(part),
            200 => {
                // A server that ignores Range sends the whole file: start over.
                have = 0;
                File::create(part)
            }
            416 => {
                let _ = fs::remove_file(part);
                bail!(
                    "{url}: the server refused to resume `{file}` at byte {have}; the partial \
                     file is deleted, run `afo pull` again to start over"
                );
            }
            _ => {
                self.check(status, url, "", Some(file), "")?;
                bail!("{url}: HTTP {status}")
            }
        }
        .with_context(|| format!("writing {}", part.display()))?;
        let total = size.or_else(|| {
            let len: u64 = response
                .headers()
                .get("content-length")?
                .to_str()
                .ok()?
                .parse()
                .ok()?;
            Some(have + len)
        });
        let bar = super::progress_bar(total, file);
        bar.set_position(have);
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = have;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bar.abandon();
                    bail!(
                        "network error reading {url} after {done} bytes: {e}; run `afo pull` \
                         again to resume"
                    );
                }
            };
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", part.display()))?;
            done += n as u64;
            bar.set_position(done);
        }
        bar.finish_and_clear();
        if let Some(total) = total {
            anyhow::ensure!(
                done == total,
                "{url}: `{file}` ended at byte {done} of {total}; run `afo pull` again to resume"
            );
        }
        Ok(())
    }

    /// Turns an error status into one clear line.
    fn check(
        &self,
        status: u16,
        url: &str,
        repo: &str,
        file: Option<&str>,
        revision: &str,
    ) -> anyhow::Result<()> {
        match (status, file) {
            (200..=299, _) => Ok(()),
            (401 | 403, _) if self.token.is_none() => bail!(
                "{url}: HTTP {status}: the hub wants a token; set HF_TOKEN (the model may be \
                 gated or private)"
            ),
            (401 | 403, _) => bail!(
                "{url}: HTTP {status}: HF_TOKEN is not accepted for this model (gated: accept \
                 its terms on the hub; or the token lacks read access)"
            ),
            (404, None) => bail!(
                "{url}: HTTP 404: no repository {repo} at revision `{revision}` on {}",
                self.endpoint
            ),
            (404, Some(f)) => bail!("{url}: HTTP 404: `{f}` is not in the repository"),
            _ => bail!("{url}: HTTP {status}"),
        }
    }
}

fn network(url: &str, e: &ureq::Error) -> anyhow::Error {
    anyhow::anyhow!("network error reaching {url}: {e}")
}

/// A revision as one URL path segment (`refs/pr/1` -> `refs%2Fpr%2F1`).
fn encode(revision: &str) -> String {
    revision.replace('/', "%2F")
}

/// The first 12 characters of a commit.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// A value the hub sent (or the user gave) that becomes part of a path: letters,
/// digits and the `extra` characters only.
fn check_plain(value: &str, what: &str, extra: &str) -> anyhow::Result<()> {
    let ok = !value.is_empty()
        && value != "."
        && !value.contains("..")
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    anyhow::ensure!(ok, "{what} `{value}` is not a plain name or hash");
    Ok(())
}

/// A file name of a repository: relative, without `..` or backslashes.
fn check_file_name(file: &str) -> anyhow::Result<()> {
    let ok = !file.is_empty()
        && !file.starts_with('/')
        && !file.contains('\\')
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    anyhow::ensure!(ok, "`{file}` is not a file name inside a repository");
    Ok(())
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_safetensors_repo_gives_the_files_a_model_needs() {
        let all = names(&[
            "README.md",
            ".gitattributes",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "onnx/model.safetensors",
        ]);
        let files = model_files("o/n", &all).unwrap_or_default();
        assert_eq!(
            files,
            names(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ])
        );
    }

    #[test]
    fn gguf_repos_give_their_one_file_or_ask_for_a_name() {
        let one = names(&["README.md", "m.Q4_1.gguf"]);
        assert_eq!(model_files("o/n", &one).ok(), Some(names(&["m.Q4_1.gguf"])));
        let two = names(&["m.Q4_1.gguf", "m.Q8_0.gguf"]);
        let err = model_files("o/n", &two).map_err(|e| e.to_string());
        assert!(
            err.as_ref()
                .is_err_and(|e| e.contains("o/n:FILE") && e.contains("m.Q8_0.gguf")),
            "{err:?}"
        );
        assert!(model_files("o/n", &names(&["README.md"])).is_err());
    }

    #[test]
    fn names_that_leave_the_cache_are_refused() {
        assert!(check_file_name("a/b.json").is_ok());
        for bad in ["../x", "a/../b", "/etc/passwd", "a\\b", "", "a//b"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        assert!(check_plain("0123abcdef", "commit", "").is_ok());
        assert!(check_plain("../../x", "ETag", "-").is_err());
        assert!(check_plain("a/b", "ETag", "-").is_err());
    }
}
