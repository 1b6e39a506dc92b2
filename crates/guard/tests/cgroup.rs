//! The cgroup probe over fixture trees: v2 (nested limits, `max`), v1, none.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use afo_guard::{CgroupProbe, CgroupVersion, MemoryBudget};

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn v2_takes_the_tightest_limit_up_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
    write(root, "sys/fs/cgroup/kubepods/memory.max", "max\n");
    write(
        root,
        "sys/fs/cgroup/kubepods/pod1/memory.max",
        "4294967296\n",
    );
    write(root, "sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n");
    write(
        root,
        "sys/fs/cgroup/kubepods/pod1/ctr/memory.current",
        "123456789\n",
    );
    write(
        root,
        "sys/fs/cgroup/kubepods/pod1/ctr/memory.peak",
        "223456789\n",
    );
    let m = CgroupProbe::with_root(root).read().unwrap().unwrap();
    assert_eq!(m.version, CgroupVersion::V2);
    assert_eq!(m.limit, Some(4 << 30));
    assert_eq!(m.usage, Some(123_456_789));
    assert_eq!(m.peak, Some(223_456_789));
    let budget = MemoryBudget::default();
    assert_eq!(
        budget.effective_cutline(m.limit),
        (4u64 << 30) - (4u64 << 30) / 20
    );
}

#[test]
fn v2_unlimited_at_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "proc/self/cgroup", "0::/\n");
    write(root, "sys/fs/cgroup/memory.max", "max\n");
    write(root, "sys/fs/cgroup/memory.current", "1000\n");
    let m = CgroupProbe::with_root(root).read().unwrap().unwrap();
    assert_eq!(m.limit, None);
    assert_eq!(m.usage, Some(1000));
    assert_eq!(m.peak, None);
}

#[test]
fn v1_memory_controller() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "proc/self/cgroup",
        "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n1:name=systemd:/docker/abc\n",
    );
    write(
        root,
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
        "2147483648\n",
    );
    write(
        root,
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes",
        "1048576\n",
    );
    write(
        root,
        "sys/fs/cgroup/memory/docker/abc/memory.max_usage_in_bytes",
        "2097152\n",
    );
    let m = CgroupProbe::with_root(root).read().unwrap().unwrap();
    assert_eq!(m.version, CgroupVersion::V1);
    assert_eq!(m.limit, Some(2 << 30));
    assert_eq!(m.peak, Some(2 << 20));
}

#[test]
fn v1_huge_limit_means_unlimited() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "proc/self/cgroup", "4:memory:/\n");
    write(
        root,
        "sys/fs/cgroup/memory/memory.limit_in_bytes",
        "9223372036854771712\n",
    );
    let m = CgroupProbe::with_root(root).read().unwrap().unwrap();
    assert_eq!(m.limit, None);
}

#[test]
fn no_cgroup_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(CgroupProbe::with_root(dir.path()).read().unwrap(), None);
    write(dir.path(), "proc/self/cgroup", "0::/\n");
    write(dir.path(), "sys/fs/cgroup/memory.max", "lots\n");
    let err = CgroupProbe::with_root(dir.path()).read().unwrap_err();
    assert!(err.to_string().contains("memory.max"), "{err}");
    assert!(err.to_string().contains("lots"), "{err}");
}
