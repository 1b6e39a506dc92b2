//! The machine, build, date and command that results are recorded with.

use super::results::{BenchFile, BenchResult, Machine};

/// Extensions that decide which kernels run, as `/proc/cpuinfo` names them.
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_features() -> Vec<String> {
    let detected = [
        ("sse4_2", std::is_x86_feature_detected!("sse4.2")),
        ("avx", std::is_x86_feature_detected!("avx")),
        ("avx2", std::is_x86_feature_detected!("avx2")),
        ("fma", std::is_x86_feature_detected!("fma")),
        ("f16c", std::is_x86_feature_detected!("f16c")),
        ("avx_vnni", std::is_x86_feature_detected!("avxvnni")),
        ("avx512f", std::is_x86_feature_detected!("avx512f")),
        ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
        ("avx512vl", std::is_x86_feature_detected!("avx512vl")),
        ("avx512_vnni", std::is_x86_feature_detected!("avx512vnni")),
        ("avx512_bf16", std::is_x86_feature_detected!("avx512bf16")),
        ("amx_int8", afo_runtime::quant::kernels::has_amx_int8()),
        ("amx_bf16", afo_runtime::quant::kernels::has_amx_bf16()),
    ];
    detected
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name.to_owned())
        .collect()
}

#[cfg(target_arch = "aarch64")]
pub(crate) fn cpu_features() -> Vec<String> {
    let detected = [
        ("neon", std::arch::is_aarch64_feature_detected!("neon")),
        (
            "dotprod",
            std::arch::is_aarch64_feature_detected!("dotprod"),
        ),
        ("i8mm", std::arch::is_aarch64_feature_detected!("i8mm")),
        ("sve", std::arch::is_aarch64_feature_detected!("sve")),
    ];
    detected
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name.to_owned())
        .collect()
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) fn cpu_features() -> Vec<String> {
    Vec::new()
}

/// The value of the first `key : value` line of `text` (`/proc/cpuinfo`'s form) with
/// this key.
fn cpuinfo_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// The CPU as `/proc/cpuinfo` (`text`) names it: its model name with its family and
/// model numbers (a virtual machine may cut the name to its vendor's line, `AMD EPYC`,
/// and the numbers still say which generation it is), or `Model` (Arm), or `unknown`.
fn cpu_name(text: &str) -> String {
    let Some(name) = cpuinfo_field(text, "model name") else {
        return cpuinfo_field(text, "Model").unwrap_or_else(|| "unknown".into());
    };
    match (
        cpuinfo_field(text, "cpu family"),
        cpuinfo_field(text, "model"),
    ) {
        (Some(family), Some(model)) => format!("{name} (family {family}, model {model})"),
        _ => name,
    }
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn os() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|k| k.trim().to_owned());
    let mut s = format!("{} {}", std::env::consts::OS, std::env::consts::ARCH);
    if let Some(p) = pretty {
        s.push_str(&format!(", {p}"));
    }
    if let Some(k) = kernel {
        s.push_str(&format!(", kernel {k}"));
    }
    s
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// This machine.
pub(crate) fn machine() -> Machine {
    Machine {
        host: host(),
        cpu: cpu_name(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
        cpu_features: cpu_features(),
        kernel: afo_runtime::quant::kernels::Kernel::detect().to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads: super::rayon_threads(),
        memory_bytes: memory_bytes(),
        os: os(),
    }
}

/// `git rev-parse HEAD` in the current folder, or `unknown`.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The command line as typed, arguments with spaces or quotes single-quoted.
pub(crate) fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The results with this machine, build, date and command.
pub(crate) fn bench_file(results: Vec<BenchResult>) -> BenchFile {
    BenchFile {
        afo_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: git_commit(),
        date: now(),
        command: command_line(),
        machine: machine(),
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_name;

    #[test]
    fn the_cpu_is_named_with_its_family_and_model() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n\
                   model\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n\
                   processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\n";
        assert_eq!(cpu_name(x86), "AMD EPYC (family 26, model 2)");
        assert_eq!(cpu_name("model name\t: Some CPU\n"), "Some CPU");
        assert_eq!(
            cpu_name("processor\t: 0\nModel\t\t: Raspberry Pi 5\n"),
            "Raspberry Pi 5"
        );
        assert_eq!(cpu_name(""), "unknown");
    }
}
