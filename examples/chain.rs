//! The image -> summary chain: a vision-language model describes images, a text model
//! summarises the description, and one SSOT record carries both stages:
//! `cargo run --example chain [IMAGE...] [-- --vlm DIR]`.
//!
//! With no `--vlm`, a tiny Qwen3-VL with seeded random weights is written to a
//! temporary folder and stands in for a real checkpoint (its description is noise;
//! the pipeline, the timings and the memory figures are real). SmolLM2 writes the
//! summary. With no image, the small landscape shipped with afo is used.

use afo_runtime::engine::TinyVlm;
use afo_runtime::{ChainImage, ChainRequest, Runtime};

const SAMPLE_JPEG: &[u8] = include_bytes!("../crates/cli/assets/sample.jpg");

fn main() -> anyhow::Result<()> {
    let mut vlm = None;
    let mut images = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--vlm" {
            vlm = Some(std::path::PathBuf::from(
                args.next()
                    .ok_or_else(|| anyhow::anyhow!("--vlm needs a folder"))?,
            ));
        } else {
            let bytes = std::fs::read(&arg).map_err(|e| anyhow::anyhow!("{arg}: {e}"))?;
            images.push(ChainImage { name: arg, bytes });
        }
    }
    if images.is_empty() {
        images.push(ChainImage {
            name: "sample.jpg".into(),
            bytes: SAMPLE_JPEG.to_vec(),
        });
    }
    // The tiny test model, unless a real Qwen3-VL folder was given.
    let scratch = std::env::temp_dir().join(format!("afo-example-chain-{}", std::process::id()));
    let vlm = match vlm {
        Some(dir) => dir,
        None => {
            let dir = scratch.join("tiny-qwen3-vl");
            TinyVlm::default().write(&dir)?;
            dir
        }
    };

    let mut request = ChainRequest::new(&vlm, images, "Describe the image in detail.");
    request.llm = Some(afo_examples::smollm2()?);
    request.analysis.max_tokens = 32;
    request.summary.max_tokens = 48;
    let runtime = Runtime::builder()
        .cutline("4GiB".parse()?)
        .ssot_log(afo_examples::examples_log())
        .build()?;
    let result = runtime.chain(&request);
    let _ = std::fs::remove_dir_all(&scratch);
    let r = result?;

    for image in &r.images {
        println!(
            "{}: {}x{} -> {}x{}, {} image tokens",
            image.name,
            image.original.0,
            image.original.1,
            image.resized.0,
            image.resized.1,
            image.image_tokens
        );
    }
    // The tiny model's analysis is noise, often empty; a real checkpoint describes.
    println!("analysis ({}): {}", r.vlm_id, r.analysis.trim());
    println!("summary ({}): {}", r.llm_id, r.summary.trim());
    for stage in &r.stages {
        println!(
            "  stage {:<16} {:>8.0} ms  tokens in {:?}, out {:?}",
            stage.name, stage.latency_ms, stage.tokens_in, stage.tokens_out
        );
    }
    println!(
        "peak {:.1} MiB (predicted {:.1} MiB), {}, {:.0} ms",
        r.peak_memory_bytes as f64 / 1048576.0,
        r.predicted_peak_bytes as f64 / 1048576.0,
        r.badge,
        r.latency_ms
    );
    anyhow::ensure!(r.summary_tokens.generated > 0, "the summary is empty");
    Ok(())
}
