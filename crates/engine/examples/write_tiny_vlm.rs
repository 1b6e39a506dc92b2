//! Writes the tiny seeded Qwen3-VL checkpoint (`TinyVlm`) into a directory, for
//! trying the vision path or comparing it with another implementation.
//!
//! `cargo run -p afo-engine --example write_tiny_vlm -- DIR [SEED]`

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: write_tiny_vlm DIR [SEED]"))?;
    let mut tiny = afo_engine::TinyVlm::default();
    if let Some(seed) = args.next() {
        tiny.seed = seed.parse()?;
    }
    tiny.write(std::path::Path::new(&dir))?;
    println!("tiny Qwen3-VL written to {dir}");
    Ok(())
}
