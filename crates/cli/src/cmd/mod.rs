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
pub(crate) mod pull;
pub(crate) mod quantize;
pub(crate) mod route;
pub(crate) mod schema;
pub(crate) mod serve;
pub(crate) mod ssot;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A progress bar on stderr for `len` steps (bytes, weights; unknown when `None`),
/// drawn only when stderr is a terminal: piped or redirected, it draws nothing.
pub(crate) fn progress_bar(len: Option<u64>, message: impl Into<String>) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    let template = if len.is_some() {
        "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta} {msg}"
    } else {
        "{spinner} {bytes} {bytes_per_sec} {msg}"
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.with_message(message.into())
}

/// A spinner on stderr for a long step (a model load, an evaluation), ticking on its
/// own, drawn only when stderr is a terminal; when it is not, `message` is printed
/// once as a plain line instead. Finish it with `finish_and_clear`.
pub(crate) fn spinner(message: impl Into<String>) -> indicatif::ProgressBar {
    let message = message.into();
    let spinner = indicatif::ProgressBar::new_spinner().with_message(message.clone());
    if spinner.is_hidden() {
        eprintln!("{message} ...");
    } else {
        spinner.enable_steady_tick(Duration::from_millis(80));
    }
    spinner
}

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

/// The models found where `afo` looks when no model or catalog is given: the folder
/// `$AFO_MODEL_DIR` (default `models`) and the Hugging Face cache, with a phrase saying
/// where that was.
///
/// # Errors
/// None found: the error says where it looked and how to get a model.
pub(crate) fn found_models() -> anyhow::Result<(Vec<afo_runtime::FoundModel>, String)> {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("models"), PathBuf::from);
    let cache = hf_cache();
    let found = afo_runtime::find_models(std::slice::from_ref(&dir), cache.as_ref());
    let places = match &cache {
        Some(c) => format!(
            "{} and the Hugging Face cache {}",
            dir.display(),
            c.root().display()
        ),
        None => dir.display().to_string(),
    };
    anyhow::ensure!(
        !found.is_empty(),
        "no models found in {places}: download one with `afo pull ORG/NAME` (for example \
         `afo pull HuggingFaceTB/SmolLM2-135M-Instruct`), or run scripts/fetch-models.sh, or \
         set AFO_MODEL_DIR"
    );
    Ok((found, places))
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
