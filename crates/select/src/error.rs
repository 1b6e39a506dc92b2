//! The crate's error type.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use afo_guard::ByteSize;

use crate::complexity::Complexity;
use crate::policy::Candidate;

/// Everything that can go wrong in model selection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model card field is missing or out of range.
    #[error("model card `{id}`: field `{field}` {reason}")]
    InvalidCard {
        /// The card's id (empty when the id itself is the problem).
        id: String,
        /// The field.
        field: &'static str,
        /// What is wrong with it, with the value given.
        reason: String,
    },
    /// Two cards share an id.
    #[error("duplicate model id `{id}` in catalog {}", origin(path.as_deref()))]
    DuplicateId {
        /// The id seen twice.
        id: String,
        /// The catalog file, when the catalog came from one.
        path: Option<PathBuf>,
    },
    /// A card names a base model (`variant_of`) that the catalog lacks or that is in
    /// another family.
    #[error("model card `{id}`: `variant_of` = `{base}`: {reason}")]
    BadVariant {
        /// The card.
        id: String,
        /// The base it names.
        base: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A catalog file could not be read.
    #[error("cannot read catalog `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A catalog file is not valid TOML or does not hold a catalog.
    #[error("catalog {}: {source}", origin(path.as_deref()))]
    Toml {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// The parser's error, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A catalog file is not valid JSON or does not hold a catalog.
    #[error("catalog {}: {source}", origin(path.as_deref()))]
    Json {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A catalog file's extension is neither `.toml` nor `.json`.
    #[error("catalog `{}`: unknown format (expected a `.toml` or `.json` file)", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A model id is not in the catalog.
    #[error("unknown model `{id}` (the catalog has {})", list(known))]
    UnknownModel {
        /// The id asked for.
        id: String,
        /// The ids the catalog has.
        known: Vec<String>,
    },
    /// A name (complexity, task, capability, quantization scheme, ...) could not be
    /// parsed.
    #[error("invalid {what} `{input}` (expected one of: {expected})")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// The text given.
        input: String,
        /// The accepted names.
        expected: String,
    },
    /// A policy setting is out of range.
    #[error("invalid setting `{setting}` = {value}: {reason}")]
    InvalidSetting {
        /// The setting.
        setting: &'static str,
        /// The value given.
        value: String,
        /// The allowed range.
        reason: &'static str,
    },
    /// Routing found no model that can serve the query at all.
    #[error(
        "no model can serve this {complexity} query: {}",
        rejections(candidates)
    )]
    NoModel {
        /// The query's complexity.
        complexity: Complexity,
        /// Every card looked at, with why it was rejected.
        candidates: Vec<Candidate>,
    },
    /// No cheaper variant of a model fits in the memory available.
    #[error("no fallback for `{from}` fits in {available}: {}", tried_list(tried))]
    NoFallback {
        /// The model that does not fit.
        from: String,
        /// The memory available.
        available: ByteSize,
        /// The ladder's rungs, with their sizes (empty when the model has no cheaper
        /// variant).
        tried: Vec<(String, ByteSize)>,
    },
    /// There is no room for even one generated token.
    #[error(
        "no room for output tokens: {input_tokens} input tokens, context length \
         {context_length}, KV headroom {} tokens", kv_tokens.map_or_else(|| "unbounded".to_owned(), |t| t.to_string())
    )]
    NoTokenRoom {
        /// Tokens of the input.
        input_tokens: u64,
        /// The model's context length.
        context_length: u64,
        /// Tokens the KV cache has room for, when bounded.
        kv_tokens: Option<u64>,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn origin(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("`{}`", p.display()),
        None => "(from a string)".to_owned(),
    }
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        return "no models".to_owned();
    }
    ids.iter()
        .map(|id| format!("`{id}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rejections(candidates: &[Candidate]) -> String {
    if candidates.is_empty() {
        return "the catalog is empty".to_owned();
    }
    let mut out = String::new();
    for (i, c) in candidates.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let reasons: Vec<String> = c.rejected.iter().map(ToString::to_string).collect();
        let _ = write!(out, "`{}` ({})", c.id, reasons.join(", "));
    }
    out
}

fn tried_list(tried: &[(String, ByteSize)]) -> String {
    if tried.is_empty() {
        return "it has no cheaper variant in its family".to_owned();
    }
    let rungs: Vec<String> = tried
        .iter()
        .map(|(id, bytes)| format!("`{id}` needs {bytes}"))
        .collect();
    format!("tried {}", rungs.join(", "))
}
