//! One module per subcommand family.

/// `println!` that returns an error instead of panicking when stdout is closed (a
/// reader such as `head` went away); `main` ends quietly on that error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub(crate) mod bench;
pub(crate) mod chain;
pub(crate) mod eval;
pub(crate) mod generate;
pub(crate) mod image;
pub(crate) mod inspect;
pub(crate) mod quantize;
pub(crate) mod route;
pub(crate) mod schema;
pub(crate) mod serve;
pub(crate) mod ssot;

use std::path::{Path, PathBuf};

/// The Hugging Face cache named by `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`; none when none of those variables is set.
pub(crate) fn hf_cache() -> Option<afo_runtime::engine::HfCache> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (hub, hf_home, home) = (var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME"));
    afo_runtime::engine::HfCache::from_env_values(
        hub.as_deref(),
        hf_home.as_deref(),
        home.as_deref(),
    )
}

/// Whether `text` reads as a Hugging Face repository id, `ORG/NAME`.
pub(crate) fn is_repo_id(text: &str) -> bool {
    text.matches('/').count() == 1
        && !text.starts_with(['.', '/'])
        && !text.ends_with('/')
        && !text.contains("..")
}

/// A model argument as a path: an existing file or folder, or a Hugging Face id
/// (`ORG/NAME`) found offline in the cache named by `HF_HUB_CACHE` / `HF_HOME` / `HOME`
/// (a snapshot of one GGUF file resolves to that file).
pub(crate) fn resolve_model(spec: &Path) -> anyhow::Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    if is_repo_id(&text)
        && let Some(cache) = hf_cache()
    {
        return Ok(cache.resolve(&text, None)?);
    }
    anyhow::bail!(
        "model `{}` is neither a file, a folder, nor a model in the Hugging Face cache",
        spec.display()
    )
}
