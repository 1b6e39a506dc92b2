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

/// A model argument as a path: an existing file or folder, or a Hugging Face id
/// (`ORG/NAME`) found offline in the cache named by `HF_HUB_CACHE` / `HF_HOME` / `HOME`.
pub(crate) fn resolve_model(spec: &Path) -> anyhow::Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    if text.matches('/').count() == 1 && !text.starts_with('.') && !text.starts_with('/') {
        let var = |k: &str| std::env::var(k).ok();
        let (hub, hf_home, home) = (var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME"));
        if let Some(cache) = afo_runtime::engine::HfCache::from_env_values(
            hub.as_deref(),
            hf_home.as_deref(),
            home.as_deref(),
        ) {
            return Ok(cache.resolve(&text, None)?);
        }
    }
    anyhow::bail!(
        "model `{}` is neither a file, a folder, nor a model in the Hugging Face cache",
        spec.display()
    )
}
