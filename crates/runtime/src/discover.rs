//! Models found on disk, and their cards: the catalog a caller gets with no catalog
//! file of its own.

use std::path::{Path, PathBuf};

use afo_engine::{GgufFile, HfCache, HfConfig, SafetensorsDir, VisionLanguageModel, VlmFileConfig};
use afo_guard::Estimator;
use afo_select::{Capabilities, Catalog, ModelCard, QuantScheme, REFERENCE_CONTEXT_TOKENS};

use crate::error::Result;

/// The trinity score of a card built from a model file, which says nothing of its
/// quality: the catalog's registration floor ([`afo_select::DEFAULT_MIN_SCORE`]), so
/// every such card may be chosen and, all scoring the same, routing comes down to
/// what fits the memory and is cheapest.
pub const UNSCORED_TRINITY_SCORE: f32 = afo_select::DEFAULT_MIN_SCORE;

/// A model found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModel {
    /// Its id: a GGUF file's name without extension, a model folder's name, or the
    /// `NAME` of a Hugging Face cache repository `ORG/NAME` holding a model folder.
    pub id: String,
    /// What a loader takes: the GGUF file or the model folder.
    pub path: PathBuf,
}

/// The models in `dirs` (each `*.gguf` file, and each sub-folder with a
/// `config.json`) and in the Hugging Face `cache` (each repository's `main` snapshot:
/// its model folder, or its GGUF files), in that order. An id seen before is skipped,
/// so the first place wins; folders that do not exist are skipped.
pub fn find_models(dirs: &[PathBuf], cache: Option<&HfCache>) -> Vec<FoundModel> {
    let mut found: Vec<FoundModel> = Vec::new();
    let mut push = |id: String, path: PathBuf| {
        if !found.iter().any(|f| f.id == id) {
            found.push(FoundModel { id, path });
        }
    };
    for dir in dirs {
        for path in sorted_entries(dir) {
            if is_gguf(&path) {
                push(stem(&path), path);
            } else if path.join("config.json").is_file() {
                push(file_name(&path), path);
            }
        }
    }
    if let Some(cache) = cache {
        for repo in cache.repos() {
            let Ok(snapshot) = cache.snapshot(&repo, None) else {
                continue;
            };
            if snapshot.join("config.json").is_file() {
                let name = repo.rsplit('/').next().unwrap_or(&repo).to_owned();
                push(name, snapshot);
            } else {
                for path in sorted_entries(&snapshot).into_iter().filter(|p| is_gguf(p)) {
                    push(stem(&path), path);
                }
            }
        }
    }
    found
}

/// A card for the model at `path` (a GGUF file or a Hugging Face model folder), read
/// from its header and configuration: parameters, the scheme of its weights, text or
/// text and vision, context length, and the bytes [`afo_select::estimate_bytes`] gives
/// for a run of [`REFERENCE_CONTEXT_TOKENS`]. Its trinity score is
/// [`UNSCORED_TRINITY_SCORE`], its family its id, its source the path.
///
/// # Errors
/// The engine's errors reading the file or its configuration, and
/// [`afo_select::Error::InvalidCard`] for an id that is not a card id.
pub fn card_from_model(id: &str, path: &Path) -> Result<ModelCard> {
    let (params, quant, capabilities, config) = if path.is_dir() {
        let weights = SafetensorsDir::open(path)?;
        let config_path = path.join("config.json");
        let (capabilities, config) = if VisionLanguageModel::is_vlm_dir(path) {
            let text = VlmFileConfig::read(&config_path)?.resolve()?.text;
            (Capabilities::TEXT_VISION, text)
        } else {
            (Capabilities::TEXT, HfConfig::read(&config_path)?.resolve()?)
        };
        let quant = weights
            .names()
            .find(|n| n.ends_with("self_attn.q_proj.weight"))
            .and_then(|n| weights.dtype(n))
            .and_then(afo_quant::QuantScheme::from_dtype)
            .map_or(QuantScheme::F32, select_scheme);
        (weights.parameters(), quant, capabilities, config)
    } else {
        let gguf = GgufFile::open(path)?;
        let quant = gguf
            .content()
            .tensor_infos
            .get("blk.0.attn_q.weight")
            .map_or(QuantScheme::F32, |i| {
                select_scheme(afo_quant::QuantScheme::from_ggml(i.ggml_dtype))
            });
        (
            gguf.describe().parameters,
            quant,
            Capabilities::TEXT,
            gguf.config()?,
        )
    };
    let card = ModelCard::builder(id, id)
        .params(params)
        .quant(quant)
        .capabilities(capabilities)
        .trinity_score(UNSCORED_TRINITY_SCORE)
        .context_length(config.max_position as u64)
        .bytes_from_shape(
            Estimator::default(),
            crate::run::model_shape(&config),
            REFERENCE_CONTEXT_TOKENS.min(config.max_position as u64),
        )
        .source(path.display().to_string())
        .build()?;
    Ok(card)
}

/// A catalog of `models`' cards ([`card_from_model`]); a model whose card cannot be
/// read is left out and returned with the reason.
pub fn catalog_of(models: &[FoundModel]) -> (Catalog, Vec<(FoundModel, crate::Error)>) {
    let mut catalog = Catalog::new();
    let mut skipped = Vec::new();
    for m in models {
        match card_from_model(&m.id, &m.path).and_then(|c| Ok(catalog.push(c)?)) {
            Ok(()) => {}
            Err(e) => skipped.push((m.clone(), e)),
        }
    }
    (catalog, skipped)
}

/// The selector's name for a weight scheme (the two crates name the same schemes).
fn select_scheme(scheme: afo_quant::QuantScheme) -> QuantScheme {
    scheme.to_string().parse().unwrap_or(QuantScheme::F32)
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        && path.is_file()
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn finds_gguf_files_folders_and_cache_repos_once_each() {
        let models = tempfile::tempdir().unwrap();
        std::fs::write(models.path().join("a.gguf"), b"GGUF").unwrap();
        std::fs::write(models.path().join("notes.txt"), b"").unwrap();
        std::fs::create_dir(models.path().join("folder")).unwrap();
        std::fs::write(models.path().join("folder/config.json"), b"{}").unwrap();
        std::fs::create_dir(models.path().join("empty")).unwrap();
        let root = tempfile::tempdir().unwrap();
        let cache = HfCache::new(root.path());
        let snap = cache.snapshot_path("Org/Repo", "c1");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), b"{}").unwrap();
        let ggufs = cache.snapshot_path("Org/Ggufs", "c2");
        std::fs::create_dir_all(&ggufs).unwrap();
        std::fs::write(ggufs.join("a.gguf"), b"GGUF").unwrap();
        std::fs::write(ggufs.join("b.gguf"), b"GGUF").unwrap();
        for (repo, commit) in [("Org/Repo", "c1"), ("Org/Ggufs", "c2")] {
            let refs = cache.ref_path(repo, "main");
            std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
            std::fs::write(refs, commit).unwrap();
        }
        let found = find_models(
            &[models.path().to_path_buf(), PathBuf::from("/nonexistent")],
            Some(&cache),
        );
        let ids: Vec<&str> = found.iter().map(|f| f.id.as_str()).collect();
        // `a` in the cache is the same id as `a` in the folder: the folder's wins.
        assert_eq!(ids, ["a", "folder", "b", "Repo"]);
        assert_eq!(found[0].path, models.path().join("a.gguf"));
        assert_eq!(found[3].path, snap);
    }

    #[test]
    fn a_card_from_a_gguf_reads_its_header() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let path = std::env::var_os("AFO_MODEL_DIR")
            .map_or(dir, PathBuf::from)
            .join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-models.sh",
            path.display()
        );
        let card = card_from_model("smol", &path).unwrap();
        assert_eq!(card.id(), "smol");
        assert_eq!(card.quant(), QuantScheme::Q4_1);
        assert!(
            (130_000_000..140_000_000).contains(&card.params()),
            "{}",
            card.params()
        );
        assert_eq!(card.context_length(), 8192);
        assert_eq!(card.capabilities(), Capabilities::TEXT);
        assert_eq!(card.trinity_score(), UNSCORED_TRINITY_SCORE);
        // Q4_1 weights (about 85 MB) and a KV cache of 2048 tokens: more than the
        // weights, well under a gigabyte.
        let bytes = card.estimated_bytes().bytes();
        assert!((85_000_000..1_000_000_000).contains(&bytes), "{bytes}");
        let (catalog, skipped) = catalog_of(&[
            FoundModel {
                id: "smol".into(),
                path: path.clone(),
            },
            FoundModel {
                id: "broken".into(),
                path: path.with_file_name("missing.gguf"),
            },
        ]);
        assert_eq!(catalog.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0.id, "broken");
    }
}
