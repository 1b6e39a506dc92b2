//! `afo inspect`: what a model file holds.

use std::path::PathBuf;

use afo_runtime::engine::{GgufFile, Tokenizer};
use afo_runtime::guard::ByteSize;

/// Arguments of `afo inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The model: a GGUF file.
    model: PathBuf,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let gguf = GgufFile::open(&args.model)?;
    let d = gguf.describe();
    out!(
        "file          {} ({})",
        d.path.display(),
        ByteSize(d.file_bytes)
    );
    if let Some(name) = &d.name {
        out!("name          {name}");
    }
    out!("architecture  {}", d.architecture.as_deref().unwrap_or("-"));
    out!(
        "parameters    {} ({:.1} M) in {} tensors",
        d.parameters,
        d.parameters as f64 / 1e6,
        d.tensors
    );
    for t in &d.by_type {
        out!(
            "  {:<6} {:>4} tensors {:>12} params {:>12}",
            t.scheme,
            t.tensors,
            t.parameters,
            ByteSize(t.bytes).to_string()
        );
    }
    match gguf.config() {
        Ok(c) => out!(
            "config        {} layers, hidden {}, ffn {}, {} heads / {} kv heads x {}, vocab {}, \
             context {}, rope base {}, rms eps {:e}",
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.max_position,
            c.rope_theta,
            c.rms_norm_eps
        ),
        Err(e) => out!("config        not runnable here: {e}"),
    }
    match Tokenizer::from_gguf(gguf.content()) {
        Ok(t) => {
            let name = |id: Option<u32>| {
                id.and_then(|i| t.id_to_token(i).map(|s| format!("{i} {s}")))
                    .unwrap_or_else(|| "-".into())
            };
            out!(
                "tokenizer     {} tokens, bos {}, eos {:?}, add_bos {}, chat template {}",
                t.vocab_size(),
                name(t.bos_id()),
                t.eos_ids(),
                t.add_bos_token(),
                if t.chat_template().is_some() {
                    "yes"
                } else {
                    "no (ChatML fallback)"
                }
            );
        }
        Err(e) => out!("tokenizer     unavailable: {e}"),
    }
    Ok(())
}
