//! What a long-running server needs from the runtime beyond one call: a model held
//! loaded, the shared memory guard, the SSOT log, and routing without running.

use std::path::{Path, PathBuf};

use afo_engine::{Acquired, AdmitQuery, LoadedModel, Ticket, VisionLanguageModel};
use afo_guard::PlanOption;
use afo_quant::QuantScheme;
use afo_select::{Query, RouteContext, fallback};

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

    /// The admission hook of a batching scheduler over `model`
    /// ([`afo_engine::Scheduler::set_admission`]): each request is estimated by the
    /// runtime's estimator and admitted on its ledger as the runtime's own runs are
    /// (room is made the same way); a request that does not fit waits, and the
    /// ledger's refusal says why. The ticket's
    /// `predicted_peak_bytes` is the resident memory the ledger predicts.
    pub fn batch_admission<'a>(
        &'a self,
        model: &'a afo_engine::Model,
    ) -> impl FnMut(&AdmitQuery) -> std::result::Result<Ticket, afo_guard::Refusal> + 'a {
        move |q| {
            let e = self.estimate_text(model, q.prompt_tokens, q.max_tokens, None);
            let plan = [PlanOption::new("as asked", e.parts)];
            let admitted = self.admit(&plan).map_err(|(refusal, _)| refusal)?;
            Ok(Ticket {
                reservation: admitted.reservation,
                workspace_after_prefill: e.decode_workspace,
                predicted_peak_bytes: admitted.predicted_peak_bytes,
            })
        }
    }

    /// Records in the ledger `bytes` of `kind` that exist already (a queued request's
    /// decoded images), held until the returned reservation is dropped, so that
    /// admissions see them.
    pub fn hold(&self, kind: afo_guard::MemoryKind, bytes: u64) -> afo_guard::Reservation {
        self.ledger.reserve_existing(kind, bytes)
    }

    /// The SSOT log's path, when the runtime has a log.
    pub fn ssot_log_path(&self) -> Option<&Path> {
        self.log.as_ref().map(|l| l.path())
    }

    /// Whether the runtime has a model catalog to route over.
    pub fn has_catalog(&self) -> bool {
        self.catalog.is_some()
    }

    /// The bytes a new model could take now: what the ledger has left under the
    /// cutline, plus what idle models and prefix blocks would give back.
    pub(crate) fn headroom(&self) -> u64 {
        self.observe_memory();
        let s = self.ledger.snapshot();
        let idle = self.loaded_bytes(|e| !e.in_use && !e.pinned);
        s.available()
            .saturating_add(idle)
            .saturating_add(s.reserved.get(afo_guard::MemoryKind::PrefixCache))
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
        let headroom = self.headroom();
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
