//! Routing with a catalog, and the fallback ladder under a small cutline:
//! `cargo run --example query`.
//!
//! The catalog lists SmolLM2 three times: as f32 (best score, most memory), int8 and
//! int4 (each quantized from the same file while loading). Under a 2 GiB cutline a
//! hard query routes to the cheapest card meeting the quality floor of its
//! complexity; then a second runtime with a 400 MB cutline asks for the f32 card by
//! name, and the runtime steps down the fallback ladder to a variant that fits.
//! Each answer says which card ran and why, and the SSOT record carries the same.

use afo_runtime::select::Catalog;
use afo_runtime::{QueryRequest, Runtime};

fn catalog() -> anyhow::Result<Catalog> {
    let source = afo_examples::smollm2()?
        .display()
        .to_string()
        .replace('\\', "/");
    let toml = format!(
        r#"
        min_score = 90.0

        [[models]]
        id = "smollm2-f32"
        family = "smollm2-135m"
        params = 134515008
        quant = "f32"
        trinity_score = 97.5
        context_length = 8192
        estimated_bytes = "700MB"
        source = "{source}"

        [[models]]
        id = "smollm2-int8"
        family = "smollm2-135m"
        params = 134515008
        quant = "int8"
        trinity_score = 97.0
        context_length = 8192
        estimated_bytes = "420MB"
        source = "{source}"
        variant_of = "smollm2-f32"

        [[models]]
        id = "smollm2-int4"
        family = "smollm2-135m"
        params = 134515008
        quant = "int4"
        trinity_score = 96.0
        context_length = 8192
        estimated_bytes = "160MB"
        source = "{source}"
        variant_of = "smollm2-int8"
        "#
    );
    Ok(Catalog::from_toml_str(&toml)?)
}

fn ask(runtime: &Runtime, request: &QueryRequest) -> anyhow::Result<String> {
    let answer = runtime.query(request)?;
    let selection = &answer.selection;
    println!("query: {:?}", request.text);
    println!(
        "  complexity {} (score {:.2}), task {}",
        selection.complexity.level, selection.complexity.score, selection.task
    );
    for c in &selection.candidates {
        let why: Vec<String> = c.rejected.iter().map(ToString::to_string).collect();
        println!(
            "  candidate {:<14} score {:>5.1}  {}",
            c.id,
            c.score,
            if why.is_empty() {
                "ok".to_owned()
            } else {
                why.join("; ")
            }
        );
    }
    println!("  chosen {}: {}", answer.model_id(), selection.reason_text);
    if let Some(step) = &selection.fallback {
        println!(
            "  fallback from {}: {}",
            step.fallback_from, step.reason_text
        );
    }
    println!(
        "  budget {} tokens ({}); answer: {}",
        answer.budget.max_tokens,
        answer.budget.bound,
        answer.response.text.trim().replace('\n', " ")
    );
    println!(
        "  peak {:.0} MiB under a {:.0} MiB cutline ({})\n",
        answer.response.peak_memory_bytes as f64 / 1048576.0,
        answer.response.cutline_bytes as f64 / 1048576.0,
        answer.response.badge
    );
    Ok(answer.model_id().to_owned())
}

fn main() -> anyhow::Result<()> {
    let log = afo_examples::examples_log();
    let roomy = Runtime::builder()
        .cutline("2GiB".parse()?)
        .catalog(catalog()?)
        .ssot_log(&log)
        .build()?;
    let mut hard = QueryRequest::new(
        "Explain step by step why the borrow checker rejects two mutable references \
         to the same vector, then compare it with how C++ handles aliasing.",
    );
    hard.max_tokens = Some(24);
    ask(&roomy, &hard)?;
    drop(roomy);

    // A small cutline: f32 does not fit, the ladder steps down.
    let tight = Runtime::builder()
        .cutline("400MB".parse()?)
        .catalog(catalog()?)
        .ssot_log(&log)
        .build()?;
    let mut explicit = QueryRequest::new("What is the capital of France?");
    explicit.model = Some("smollm2-f32".into());
    explicit.max_tokens = Some(16);
    let ran = ask(&tight, &explicit)?;
    anyhow::ensure!(
        ran != "smollm2-f32",
        "expected a step down the fallback ladder under 400 MB, but f32 ran"
    );
    Ok(())
}
