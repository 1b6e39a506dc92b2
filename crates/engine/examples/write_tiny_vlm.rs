//! Writes the tiny seeded Qwen3-VL checkpoint (`TinyVlm`) into a directory, for
//! trying the vision path, measuring it, or comparing it with another implementation.
//!
//! `cargo run -p afo-engine --example write_tiny_vlm -- DIR [--seed N] [--hidden N]
//! [--layers N] [--intermediate N] [--text-only]`
//!
//! `--text-only` writes the language model alone as a Qwen3 checkpoint (the same
//! weights): a separate copy, to compare a chain that shares one instance with one
//! that loads two.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut tiny = afo_engine::TinyVlm::default();
    let mut text_only = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            Ok(args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
                .parse()?)
        };
        match arg.as_str() {
            "--seed" => tiny.seed = value("--seed")? as u64,
            "--hidden" => tiny.hidden = value("--hidden")?,
            "--layers" => tiny.layers = value("--layers")?,
            "--intermediate" => tiny.intermediate = value("--intermediate")?,
            "--text-only" => text_only = true,
            other if !other.starts_with('-') && dir.is_none() => dir = Some(other.to_owned()),
            other => anyhow::bail!("unknown argument `{other}`"),
        }
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("usage: write_tiny_vlm DIR [options]"))?;
    let path = std::path::Path::new(&dir);
    if text_only {
        tiny.write_language_model(path)?;
        println!("tiny Qwen3-VL language model (text only) written to {dir}");
    } else {
        tiny.write(path)?;
        println!("tiny Qwen3-VL written to {dir}");
    }
    Ok(())
}
