//! Live memory probes: this process's RSS and peak RSS, the system's available
//! memory, and the cgroup limit.

use std::path::Path;

use crate::cgroup::{CgroupMemory, CgroupProbe};
use crate::error::{Error, Result};

/// Memory facts at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySnapshot {
    /// This process's resident set size (`VmRSS`), in bytes.
    pub rss_bytes: u64,
    /// This process's peak resident set size (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
    /// Memory the system can still give out without swapping, in bytes.
    pub system_available_bytes: u64,
    /// The system's total memory, in bytes.
    pub system_total_bytes: u64,
    /// The cgroup's view, when the process runs in one with a memory controller.
    pub cgroup: Option<CgroupMemory>,
}

impl MemorySnapshot {
    /// The cgroup memory limit, when there is one.
    pub fn cgroup_limit(&self) -> Option<u64> {
        self.cgroup.and_then(|c| c.limit)
    }
}

/// A source of [`MemorySnapshot`]s.
pub trait Probe: Send + Sync + std::fmt::Debug {
    /// Takes a snapshot.
    ///
    /// # Errors
    /// When a source cannot be read or parsed.
    fn snapshot(&self) -> Result<MemorySnapshot>;
}

/// The real probe: `/proc/self/status`, the system's memory (through `sysinfo`) and the
/// cgroup files.
#[derive(Debug, Default)]
pub struct SystemProbe {
    cgroup: CgroupProbe,
}

impl SystemProbe {
    /// A probe of this process and system.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Probe for SystemProbe {
    fn snapshot(&self) -> Result<MemorySnapshot> {
        let (rss_bytes, peak_rss_bytes) = process_rss()?;
        let mut sys = sysinfo::System::new().map_err(|e| Error::System(e.to_string()))?;
        sys.refresh_memory();
        Ok(MemorySnapshot {
            rss_bytes,
            peak_rss_bytes,
            system_available_bytes: sys.available_memory(),
            system_total_bytes: sys.total_memory(),
            cgroup: self.cgroup.read()?,
        })
    }
}

/// This process's `(rss, peak_rss)` in bytes, from `/proc/self/status`; where that file
/// does not exist (not Linux), both come from `sysinfo`'s RSS.
///
/// # Errors
/// When the file exists but lacks the fields.
pub fn process_rss() -> Result<(u64, u64)> {
    let path = Path::new("/proc/self/status");
    match std::fs::read_to_string(path) {
        Ok(text) => parse_proc_status(&text).ok_or_else(|| Error::Parse {
            path: path.to_path_buf(),
            reason: "no VmRSS/VmHWM lines".into(),
        }),
        Err(_) => {
            let mut sys = sysinfo::System::new().map_err(|e| Error::System(e.to_string()))?;
            let pid = sysinfo::get_current_pid().map_err(|e| Error::System(e.to_string()))?;
            sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
            let rss = sys.process(pid).map_or(0, sysinfo::Process::memory);
            Ok((rss, rss))
        }
    }
}

/// Parses `VmRSS` and `VmHWM` (in kB) from the text of `/proc/<pid>/status`, in bytes.
pub fn parse_proc_status(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let rss = field("VmRSS:")?;
    let hwm = field("VmHWM:").unwrap_or(rss);
    Some((rss, hwm.max(rss)))
}

/// A probe that returns a fixed snapshot: for tests and simulations.
#[derive(Debug, Clone, Copy)]
pub struct FixedProbe(pub MemorySnapshot);

impl Probe for FixedProbe {
    fn snapshot(&self) -> Result<MemorySnapshot> {
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let text = "Name:\tafo\nVmPeak:\t  900000 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(parse_proc_status(text), Some((10240 * 1024, 20480 * 1024)));
        assert_eq!(parse_proc_status("Name: x\n"), None);
    }

    #[test]
    fn the_real_probe_sees_this_process() {
        let s = SystemProbe::new().snapshot().unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.peak_rss_bytes >= s.rss_bytes);
        assert!(s.system_total_bytes >= s.system_available_bytes);
        assert!(s.system_total_bytes > 0);
    }
}
