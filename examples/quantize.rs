//! Quantize a model, export it as GGUF, then load and run the export:
//! `cargo run --example quantize [SCHEME]` (default `int8`; `int4`, `q8_0`, ...).
//!
//! The attention and MLP weights are quantized while the file loads (one tensor at a
//! time), the embedding and head at least as precisely; the export keeps the source
//! file's metadata and tokenizer, so any GGUF reader can open it and the runtime
//! runs it as stored, without quantizing again. The test model is stored in Q4_1, so
//! an int8 export is larger than its source and `int4` smaller; from an f16 or f32
//! checkpoint both shrink it.

use afo_runtime::engine::GgufFile;
use afo_runtime::engine::{GenerateOptions, LoadedModel, Message, SamplingParams, save_gguf};
use afo_runtime::quant::{QuantPolicy, QuantScheme};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

fn main() -> anyhow::Result<()> {
    let scheme: QuantScheme = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "int8".to_owned())
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let source_path = afo_examples::smollm2()?;
    let out_dir = std::env::temp_dir().join(format!("afo-example-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("SmolLM2-135M-Instruct.{scheme}.gguf"));

    // 1. Quantize while loading, by a policy.
    let policy = QuantPolicy::new(scheme);
    let loaded = LoadedModel::load_quantized(&source_path, policy, |p| {
        if p.done == p.total {
            println!("quantized {} weights", p.total);
        }
    })?;
    println!(
        "weights in memory: {:.1} MiB ({policy})",
        loaded.model().weight_bytes() as f64 / 1048576.0
    );

    // 2. Export: the quantized weights plus the source's metadata and tokenizer.
    let mut source = GgufFile::open(&source_path)?;
    let report = save_gguf(loaded.model(), &mut source, Some(&policy), &out)?;
    println!(
        "wrote {} ({:.1} MiB, {} tensors; the source is {:.1} MiB)",
        report.path.display(),
        report.file_bytes as f64 / 1048576.0,
        report.tensors,
        std::fs::metadata(&source_path)?.len() as f64 / 1048576.0
    );
    drop(loaded);

    // 3. Load the export and run it, as any other model file.
    let runtime = Runtime::builder()
        .ssot_log(afo_examples::examples_log())
        .build()?;
    let request = GenerateRequest::new(
        &out,
        Prompt::Chat(vec![Message::user("What is the capital of France?")]),
    )
    .with_options(GenerateOptions {
        max_tokens: 24,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    });
    let result = runtime.generate(&request);
    let _ = std::fs::remove_dir_all(&out_dir);
    let response = result?;
    println!(
        "the export answers: {} ({} tokens, {:.1} tok/s)",
        response.text.trim(),
        response.completion_tokens,
        response.tokens_per_s.unwrap_or(0.0)
    );
    anyhow::ensure!(
        response.completion_tokens > 0,
        "the export generated nothing"
    );
    Ok(())
}
