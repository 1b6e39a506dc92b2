//! The Hugging Face hub cache layout, shared by what reads it (model resolution) and
//! what writes it (a download client):
//!
//! ```text
//! ROOT/models--ORG--NAME/
//!     blobs/<etag>                        the files' bytes, named by their hash
//!     snapshots/<commit>/<file>           symlinks to ../../blobs/<etag>
//!     refs/<revision>                     the commit a branch or tag points at
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The Hugging Face hub cache.
#[derive(Debug, Clone)]
pub struct HfCache {
    root: PathBuf,
}

impl HfCache {
    /// A cache rooted at `root` (the folder holding `models--ORG--NAME`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache root from the usual environment values, passed in by the binary:
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `HOME/.cache/huggingface/hub`.
    pub fn from_env_values(
        hf_hub_cache: Option<&str>,
        hf_home: Option<&str>,
        home: Option<&str>,
    ) -> Option<Self> {
        hf_hub_cache
            .map(PathBuf::from)
            .or_else(|| hf_home.map(|h| Path::new(h).join("hub")))
            .or_else(|| home.map(|h| Path::new(h).join(".cache/huggingface/hub")))
            .map(Self::new)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of `repo` (`ORG/NAME`): `ROOT/models--ORG--NAME`.
    pub fn repo_folder(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// Where the bytes of a file of `repo` with this etag lie: `blobs/<etag>`.
    pub fn blob_path(&self, repo: &str, etag: &str) -> PathBuf {
        self.repo_folder(repo).join("blobs").join(etag)
    }

    /// The snapshot folder of `repo` at `commit`: `snapshots/<commit>`.
    pub fn snapshot_path(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_folder(repo).join("snapshots").join(commit)
    }

    /// The file naming the commit of `revision` (a branch or tag): `refs/<revision>`.
    pub fn ref_path(&self, repo: &str, revision: &str) -> PathBuf {
        self.repo_folder(repo).join("refs").join(revision)
    }

    /// The snapshot folder of `repo` (`ORG/NAME`) at `revision` (a ref such as `main`,
    /// or a commit hash; default `main`).
    ///
    /// # Errors
    /// [`Error::ModelNotCached`] naming what was looked for and where.
    pub fn snapshot(&self, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
        let not_cached = |reason: String| Error::ModelNotCached {
            repo: repo.to_owned(),
            reason,
        };
        let folder = self.repo_folder(repo);
        if !folder.is_dir() {
            return Err(not_cached(format!("{} does not exist", folder.display())));
        }
        let revision = revision.unwrap_or("main");
        let ref_file = self.ref_path(repo, revision);
        let commit = if ref_file.is_file() {
            std::fs::read_to_string(&ref_file)
                .map_err(|source| Error::Io {
                    path: ref_file.clone(),
                    source,
                })?
                .trim()
                .to_owned()
        } else {
            revision.to_owned()
        };
        let snapshot = self.snapshot_path(repo, &commit);
        if !snapshot.is_dir() {
            return Err(not_cached(format!(
                "no snapshot {} (revision `{revision}`)",
                snapshot.display()
            )));
        }
        Ok(snapshot)
    }

    /// The model of `repo` at `revision` (default `main`) as a path a loader takes:
    /// the snapshot folder, or the one GGUF file in it ([`model_file_in`]).
    ///
    /// # Errors
    /// As [`HfCache::snapshot`].
    pub fn resolve(&self, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
        Ok(model_file_in(&self.snapshot(repo, revision)?))
    }

    /// The repositories in the cache (`ORG/NAME`, sorted), read from the
    /// `models--ORG--NAME` folder names; none when the root does not exist.
    pub fn repos(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut repos: Vec<String> = entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let (org, rest) = name.strip_prefix("models--")?.split_once("--")?;
                Some(format!("{org}/{rest}"))
            })
            .collect();
        repos.sort();
        repos
    }
}

/// The model a folder holds, as a loader takes it: the folder itself when it has a
/// `config.json` (a Hugging Face model folder), else its one `.gguf` file when it holds
/// exactly one (a repository of a single GGUF), else the folder.
pub fn model_file_in(dir: &Path) -> PathBuf {
    if dir.join("config.json").exists() {
        return dir.to_path_buf();
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return dir.to_path_buf();
    };
    let ggufs: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                && p.is_file()
        })
        .collect();
    match ggufs.as_slice() {
        [one] => one.clone(),
        _ => dir.to_path_buf(),
    }
}
