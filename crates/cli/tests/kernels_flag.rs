//! `afo --kernels`: capping the kernels a run chooses, as `afo bench` reports them, on
//! the real model.

#![allow(clippy::unwrap_used)]

mod common;

use common::smollm2;

use std::process::{Command, Output};

fn bench(kernels: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
    if let Some(k) = kernels {
        c.args(["--kernels", k]);
    }
    c.args(["--threads", "2", "bench", "--model"])
        .arg(smollm2())
        .args(["--rounds", "1", "--prompt", "8", "--generate", "4"]);
    c.output().unwrap()
}

/// The `decode kernels:` line of a bench run, after checking that it succeeded.
fn decode_line(out: &Output) -> String {
    kernels_line(out, "decode")
}

/// The `{which} kernels:` line (`decode`, `prefill`) of a bench run, after checking
/// that it succeeded.
fn kernels_line(out: &Output, which: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("{which} kernels:");
    let line = stdout.lines().find(|l| l.starts_with(&prefix));
    assert!(line.is_some(), "no {prefix} line in:\n{stdout}");
    line.unwrap().to_owned()
}

#[test]
fn the_cap_chooses_the_kernels_and_the_default_takes_the_best() {
    let scalar = decode_line(&bench(Some("scalar")));
    assert!(scalar.contains("q4_1 scalar"), "{scalar}");
    let best = decode_line(&bench(None));
    let have_avx2 = std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    let have_vnni = have_avx2
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni");
    if have_avx2 {
        let avx2 = decode_line(&bench(Some("avx2")));
        // SmolLM2's row counts are multiples of 16: AVX2 reads Q4_1 in panels.
        assert!(avx2.contains("q4_1 avx2 panels"), "{avx2}");
        assert!(!avx2.contains("avx512"), "{avx2}");
    } else {
        println!("--kernels avx2: NOT TESTED on this CPU (it lacks AVX2, FMA or F16C)");
    }
    let expected = if have_vnni {
        "q4_1 avx512vnni panels"
    } else if have_avx2 {
        "q4_1 avx2 panels"
    } else {
        "q4_1 scalar"
    };
    assert!(best.contains(expected), "{best}");
}

#[test]
fn an_unknown_kernel_is_a_clear_error() {
    let out = bench(Some("neon"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--kernels") && stderr.contains("neon"),
        "{stderr}"
    );
}

/// `afo --no-amx` keeps prompts off the AMX tiles where the CPU has them (the bench's
/// prefill kernels say which ran), and a chat answers with the same greedy text
/// either way: the tiles give the VNNI kernel's bits.
#[test]
fn no_amx_keeps_prompts_off_the_tiles_and_the_text_is_the_same() {
    let afo = |no_amx: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
        if no_amx {
            c.arg("--no-amx");
        }
        c.args(["--threads", "2"]);
        c
    };
    let prefill = |no_amx: bool| {
        let out = afo(no_amx)
            .args(["bench", "--model"])
            .arg(smollm2())
            .args(["--rounds", "1", "--prompt", "48", "--generate", "2"])
            .output()
            .unwrap();
        kernels_line(&out, "prefill")
    };
    let generate = |no_amx: bool| {
        let out = afo(no_amx)
            .args(["generate", "--model"])
            .arg(smollm2())
            .args(["--max-tokens", "24"])
            .arg(
                "Name the planets of the solar system in order from the sun, and say in \
                 one sentence what makes each of them different from the others.",
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tiles = afo_runtime::quant::kernels::amx_available();
    let (with, without) = (prefill(false), prefill(true));
    assert_eq!(with.contains("amx tiles"), tiles, "{with}");
    assert!(!without.contains("amx tiles"), "{without}");
    if !tiles {
        println!("AMX tiles: NOT TESTED on this CPU (no AMX-INT8, or the OS does not grant it)");
    }
    let text = generate(false);
    assert!(!text.trim().is_empty());
    assert_eq!(text, generate(true));
}
