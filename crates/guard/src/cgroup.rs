//! The cgroup memory limit, usage and peak (cgroup v2 and v1).
//!
//! The process's cgroup comes from `/proc/self/cgroup`: a `0::/path` line for v2, a
//! `N:memory:/path` (or `N:...,memory,...:/path`) line for v1. For v2 the files are
//! `/sys/fs/cgroup/<path>/memory.max` (`max` = unlimited), `memory.current` and
//! `memory.peak`; the tightest limit on the way up to the root applies. For v1 they are
//! `/sys/fs/cgroup/memory/<path>/memory.limit_in_bytes` (a value of 2^62 or more means
//! unlimited), `memory.usage_in_bytes` and `memory.max_usage_in_bytes`. Inside a
//! container the path is often `/` and the files sit at the mount's root.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Which cgroup hierarchy answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupVersion {
    /// The legacy hierarchy's memory controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// What the cgroup says of this process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The hierarchy.
    pub version: CgroupVersion,
    /// The memory limit in bytes; `None` when unlimited.
    pub limit: Option<u64>,
    /// Memory charged to the cgroup now, in bytes.
    pub usage: Option<u64>,
    /// The highest usage recorded, in bytes, when the kernel reports it.
    pub peak: Option<u64>,
}

/// Reads the cgroup memory files under a filesystem root (`/` for the real system; a
/// fixture folder in tests).
#[derive(Debug, Clone)]
pub struct CgroupProbe {
    root: PathBuf,
}

impl Default for CgroupProbe {
    fn default() -> Self {
        Self::with_root("/")
    }
}

impl CgroupProbe {
    /// A probe reading `<root>/proc/self/cgroup` and `<root>/sys/fs/cgroup/...`.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The process's cgroup memory facts; `Ok(None)` when no cgroup memory controller
    /// is visible (not Linux, or not mounted).
    ///
    /// # Errors
    /// When a cgroup file exists but holds something that is not a number.
    pub fn read(&self) -> Result<Option<CgroupMemory>> {
        let membership = self.root.join("proc/self/cgroup");
        let Ok(text) = std::fs::read_to_string(&membership) else {
            return Ok(None);
        };
        let mut v1_path = None;
        let mut v2_path = None;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                v2_path = Some(path.to_owned());
            } else if controllers.split(',').any(|c| c == "memory") {
                v1_path = Some(path.to_owned());
            }
        }
        if let Some(path) = v1_path {
            let dir = self.root.join("sys/fs/cgroup/memory").join(relative(&path));
            if dir.join("memory.limit_in_bytes").is_file() {
                let limit =
                    read_u64(&dir.join("memory.limit_in_bytes"))?.filter(|&l| l < (1u64 << 62));
                return Ok(Some(CgroupMemory {
                    version: CgroupVersion::V1,
                    limit,
                    usage: read_u64(&dir.join("memory.usage_in_bytes"))?,
                    peak: read_u64(&dir.join("memory.max_usage_in_bytes"))?,
                }));
            }
        }
        if let Some(path) = v2_path {
            let base = self.root.join("sys/fs/cgroup");
            let leaf = base.join(relative(&path));
            if !leaf.join("memory.current").is_file() && !leaf.join("memory.max").is_file() {
                return Ok(None);
            }
            // The tightest `memory.max` from the leaf up to the root.
            let mut limit: Option<u64> = None;
            let mut dir = leaf.clone();
            loop {
                if let Some(l) = read_u64(&dir.join("memory.max"))? {
                    limit = Some(limit.map_or(l, |m| m.min(l)));
                }
                if dir == base || !dir.pop() || !dir.starts_with(&base) {
                    break;
                }
            }
            return Ok(Some(CgroupMemory {
                version: CgroupVersion::V2,
                limit,
                usage: read_u64(&leaf.join("memory.current"))?,
                peak: read_u64(&leaf.join("memory.peak"))?,
            }));
        }
        Ok(None)
    }
}

fn relative(path: &str) -> &Path {
    Path::new(path.trim_start_matches('/'))
}

/// Reads a number from a cgroup file: `Ok(None)` when the file is missing or says
/// `max`.
fn read_u64(path: &Path) -> Result<Option<u64>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let text = text.trim();
    if text == "max" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| Error::Parse {
        path: path.to_path_buf(),
        reason: format!("expected a byte count or `max`, found `{text}`"),
    })
}
