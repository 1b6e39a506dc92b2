//! What a long-running server needs from the runtime beyond one call: a model held
//! loaded, the shared memory guard, the SSOT log, and routing without running.

use std::path::{Path, PathBuf};

use afo_engine::{Acquired, LoadedModel, VisionLanguageModel};
use afo_guard::{Guard, Probe, RunPlan, Weights};
use afo_quant::QuantScheme;
use afo_select::{Query, RouteContext, fallback};
use afo_ssot::Record;

use crate::error::{Error, Result};
use crate::runtime::Runtime;

/// Where [`Runtime::route`] sends a query: the model to load and how it was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// The catalog card's id.
    pub card_id: String,
    /// The model file or directory (the card's `source`).
    pub path: PathBuf,
    /// The scheme to quantize to while loading; `None` runs the file as stored.
    pub scheme: Option<QuantScheme>,
    /// The selection, as the SSOT record writes it.
    pub selection: afo_ssot::Selection,
}

impl Runtime {
    /// Loads a model into the lazy cache (or finds it there) and hands out the shared
    /// model. While the returned [`Acquired::model`] is held the cache never evicts
    /// it, so a server holds it for as long as it serves the model.
    ///
    /// # Errors
    /// Loading errors, or a model too large for the cutline.
    pub fn acquire_model(
        &self,
        model: &Path,
        scheme: Option<QuantScheme>,
    ) -> Result<Acquired<LoadedModel>> {
        self.acquire(model, scheme, None)
    }

    /// Loads a vision-language model directory into the runtime's VLM cache (or finds
    /// it there) and hands out the shared model, held loaded while the returned
    /// [`Acquired::model`] lives (the server's counterpart of
    /// [`Runtime::acquire_model`] for [`VisionLanguageModel::is_vlm_dir`] folders).
    ///
    /// # Errors
    /// Loading errors, or a model too large for the cutline.
    pub fn acquire_vision_model(&self, dir: &Path) -> Result<Acquired<VisionLanguageModel>> {
        self.acquire_vlm(dir)
    }

    /// The bytes one VLM request adds while it runs, by the runtime's estimator (as
    /// the image chain admits its analysis): the preprocessed images and the vision
    /// encoder's states (`image_pixels` per image, `vision_tokens` patches in all),
    /// the KV cache for `prompt_tokens + max_new_tokens`, activations and logits, plus
    /// the estimator's overhead allowance. The weights are resident already and not
    /// counted.
    pub fn vision_run_bytes(
        &self,
        vlm: &VisionLanguageModel,
        prompt_tokens: usize,
        max_new_tokens: usize,
        image_pixels: Vec<u64>,
        vision_tokens: usize,
    ) -> u64 {
        let c = vlm.text_model().config();
        let plan = RunPlan {
            weights: Weights::Bytes(vlm.weight_bytes()),
            shape: crate::runtime::model_shape(c),
            prompt_tokens: prompt_tokens as u64,
            max_new_tokens: max_new_tokens as u64,
            batch: 1,
            kv_dtype_bytes: 4,
            prefill_chunk: afo_engine::PREFILL_CHUNK as u64,
            image_pixels,
            vision_tokens: vision_tokens as u64,
        };
        let e = self.estimator.estimate(&plan);
        ((e.kv_cache + e.activations + e.logits + e.images) as f64
            * (1.0 + self.estimator.overhead_fraction)) as u64
    }

    /// The memory guard every run of this runtime reserves its bytes with. Clones
    /// share its ledger, so runs admitted through a clone and runs of
    /// [`Runtime::generate`] can never together pass the cutline.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The process's resident memory now, in bytes.
    ///
    /// # Errors
    /// When the memory probe fails.
    pub fn resident_bytes(&self) -> Result<u64> {
        Ok(self.probe.snapshot()?.rss_bytes)
    }

    /// Appends `record` to the SSOT log. Returns `false` (and writes nothing) when
    /// the runtime has no log.
    ///
    /// # Errors
    /// An invalid record or a failed write ([`Error::Ssot`]).
    pub fn append_record(&self, record: &Record) -> Result<bool> {
        match &self.log {
            Some(log) => {
                log.append(record)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The SSOT log's path, when the runtime has a log.
    pub fn ssot_log_path(&self) -> Option<&Path> {
        self.log.as_ref().map(|l| l.path())
    }

    /// Whether the runtime has a model catalog to route over.
    pub fn has_catalog(&self) -> bool {
        self.catalog.is_some()
    }

    /// Chooses the catalog model for a query of `text` with `images` attached, as
    /// [`Runtime::query`] does (stepping down the fallback ladder while the chosen
    /// model is not loaded and does not fit the memory left under the cutline), but
    /// runs nothing: the caller loads [`Routed::path`] and generates.
    ///
    /// # Errors
    /// [`Error::NoCatalog`], [`Error::Select`] when no card qualifies or no smaller
    /// variant fits, [`Error::CardNotLoadable`].
    pub fn route(&self, text: &str, images: usize) -> Result<Routed> {
        let catalog = self.catalog.as_ref().ok_or(Error::NoCatalog)?;
        let headroom = self.budget().cutline().saturating_sub(self.rss_bytes()?);
        let query = Query::new(text.to_owned()).images(images);
        let mut selection = self
            .router
            .route(&query, catalog, &RouteContext::new(headroom))?;
        loop {
            let card = catalog.card(&selection.model_id)?;
            let path = PathBuf::from(card.source().ok_or_else(|| Error::CardNotLoadable {
                id: card.id().to_owned(),
                reason: "the card has no `source` file".into(),
            })?);
            let name = card.quant().to_string();
            let scheme: QuantScheme = name.parse().map_err(|_| Error::CardNotLoadable {
                id: card.id().to_owned(),
                reason: format!("scheme `{name}` is not one the runtime loads"),
            })?;
            let scheme = Some(scheme).filter(|&s| self.stored_scheme(&path) != Some(s));
            if !self.is_loaded(&path, scheme) && card.estimated_bytes().0 > headroom {
                let step = fallback(catalog, card.id(), headroom.into())?;
                selection.apply_fallback(step);
                continue;
            }
            let summary = selection.summary();
            return Ok(Routed {
                card_id: card.id().to_owned(),
                path,
                scheme,
                selection: afo_ssot::Selection {
                    model_id: summary.model_id,
                    reason: summary.reason,
                    fallback_from: summary.fallback_from,
                    trinity_score: summary.trinity_score,
                },
            });
        }
    }
}
