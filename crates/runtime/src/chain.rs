//! The image-analysis -> summary chain: a vision-language model describes the images,
//! a text model summarises the description; one call, one SSOT record.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use afo_engine::{
    GenerateOptions, Generation, Message, VisionInput, VisionLanguageModel, generate,
};
use afo_guard::{HealthInputs, MemoryKind, PeakTracker, PlanOption, badge, health_score};
use afo_image::{DecodeLimits, Encoding, PixelLayout, PreprocessorConfig};
use afo_ssot::{AdmissionRecord, Stage, StatusBadge};

use crate::error::{Error, Result};
use crate::run::RunReport;
use crate::runtime::Runtime;

/// The summary stage's default instruction; the analysis follows it.
pub const DEFAULT_SUMMARY_PROMPT: &str =
    "Summarise the following description of one or more images in two sentences.";

/// One input image: a name for reports and errors, and its encoded bytes.
#[derive(Debug, Clone)]
pub struct ChainImage {
    /// A name (usually the file name).
    pub name: String,
    /// The encoded file (JPEG, PNG, WebP, GIF, BMP).
    pub bytes: Vec<u8>,
}

/// A chain request. [`ChainRequest::new`] sets the defaults each field names.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChainRequest {
    /// The vision-language model's directory.
    pub vlm: PathBuf,
    /// The summary model (GGUF file or directory). `None`, or the VLM's own
    /// directory: the VLM's language model writes the summary, on the same loaded
    /// instance.
    pub llm: Option<PathBuf>,
    /// The images.
    pub images: Vec<ChainImage>,
    /// What the VLM is asked about the images.
    pub instruction: String,
    /// What the summary model is asked (the analysis follows it). Default:
    /// [`DEFAULT_SUMMARY_PROMPT`].
    pub summary_prompt: String,
    /// Generation options of the analysis. Default: 128 tokens, greedy.
    pub analysis: GenerateOptions,
    /// Generation options of the summary. Default: 96 tokens, greedy.
    pub summary: GenerateOptions,
    /// Re-encode each resized image for storage (its `compression_ratio` is
    /// recorded); `None` skips it. Default: JPEG at quality 85.
    pub storage: Option<Encoding>,
    /// Decoding limits for the images. Default: [`DecodeLimits::default`].
    pub limits: DecodeLimits,
}

impl ChainRequest {
    /// A request with the defaults.
    pub fn new(
        vlm: impl Into<PathBuf>,
        images: Vec<ChainImage>,
        instruction: impl Into<String>,
    ) -> Self {
        let greedy = |max_tokens| GenerateOptions {
            max_tokens,
            sampling: afo_engine::SamplingParams::greedy(),
            ..Default::default()
        };
        Self {
            vlm: vlm.into(),
            llm: None,
            images,
            instruction: instruction.into(),
            summary_prompt: DEFAULT_SUMMARY_PROMPT.to_owned(),
            analysis: greedy(128),
            summary: greedy(96),
            storage: Some(Encoding::Jpeg { quality: 85 }),
            limits: DecodeLimits::default(),
        }
    }
}

/// What the chain did with one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageReport {
    /// The image's name.
    pub name: String,
    /// Displayed size of the input, `(width, height)`.
    pub original: (u32, u32),
    /// Size fed to the encoder, `(width, height)`.
    pub resized: (u32, u32),
    /// `[t, h, w]` in patches.
    pub grid_thw: [usize; 3],
    /// Language-model tokens the image became.
    pub image_tokens: usize,
    /// Input bytes / re-encoded bytes, when re-encoded.
    pub compression_ratio: Option<f64>,
}

/// A stage's token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TokenCounts {
    /// Prompt tokens (image tokens included).
    pub prompt: usize,
    /// Generated tokens.
    pub generated: usize,
}

/// A chain's results and costs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChainResponse {
    /// The run's id (also in the SSOT record).
    pub run_id: String,
    /// The VLM's description of the images.
    pub analysis: String,
    /// The summary.
    pub summary: String,
    /// The VLM's id.
    pub vlm_id: String,
    /// The summary model's id.
    pub llm_id: String,
    /// Whether one loaded instance served both stages.
    pub shared_instance: bool,
    /// The stages in order: `preprocess`, `vision_encode`, `image_analysis`,
    /// `summary`, each with its wall time.
    pub stages: Vec<Stage>,
    /// Per image.
    pub images: Vec<ImageReport>,
    /// Pixels fed to the encoder, all images.
    pub image_pixels: u64,
    /// Pixels of the inputs, all images.
    pub original_pixels: u64,
    /// Input bytes / re-encoded bytes over all images, when re-encoded.
    pub compression_ratio: Option<f64>,
    /// Analysis prompt tokens (image tokens included) and generated tokens.
    pub analysis_tokens: TokenCounts,
    /// Summary prompt tokens and generated tokens.
    pub summary_tokens: TokenCounts,
    /// How the ledger admitted each stage (analysis, then summary).
    pub admissions: Vec<AdmissionRecord>,
    /// The peak predicted before the run, in bytes.
    pub predicted_peak_bytes: u64,
    /// The measured peak resident memory, in bytes.
    pub peak_memory_bytes: u64,
    /// The cutline in force, in bytes.
    pub cutline_bytes: u64,
    /// The badge of the measured peak.
    pub badge: StatusBadge,
    /// The health score, 0-100.
    pub health_score: f64,
    /// Wall time of the whole call, in milliseconds.
    pub latency_ms: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn stage(name: &str, model_id: Option<&str>, since: Instant, tokens: Option<TokenCounts>) -> Stage {
    Stage {
        name: name.to_owned(),
        model_id: model_id.map(str::to_owned),
        latency_ms: ms(since),
        tokens_in: tokens.map(|t| t.prompt as u64),
        tokens_out: tokens.map(|t| t.generated as u64),
    }
}

/// Whether two paths name the same file or directory.
fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Bytes of a directory's safetensors files (the weights a VLM load maps).
fn safetensors_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Runtime {
    /// Runs the chain: preprocesses the images (bounded decode, smart resize in u8,
    /// re-encode for storage), has the VLM describe them, releases the analysis KV
    /// cache, then has the summary model summarise the description. Admission goes
    /// through the memory guard before any model runs; one SSOT v2 record is
    /// appended (chain `image_summary`, per-stage timings, image pixels, compression
    /// ratio, predicted and measured peak), also when the run fails.
    ///
    /// # Errors
    /// [`Error::Image`] naming the image that could not be read, [`Error::Refused`]
    /// when the run does not fit under the cutline, and engine errors.
    pub fn chain(&self, request: &ChainRequest) -> Result<ChainResponse> {
        let start = Instant::now();
        let run_id = self.next_run_id();
        let tracker = PeakTracker::start(Some(self.ledger.clone()));
        let mut admissions = Vec::new();
        let result = self.run_chain(request, &run_id, &mut admissions);
        let peak = tracker.finish();
        afo_guard::release_free_memory();
        let cutline = self.budget().cutline();
        match result {
            Ok(mut r) => {
                r.peak_memory_bytes = peak;
                r.badge = badge(peak, self.budget());
                r.health_score = health_score(HealthInputs {
                    peak_bytes: peak,
                    cutline_bytes: cutline,
                    error: false,
                    fallback: false,
                });
                r.latency_ms = ms(start);
                self.log_chain(&r)?;
                Ok(r)
            }
            Err(err) => {
                let id = request
                    .vlm
                    .file_name()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                let mut report = RunReport::new(&run_id, "image_summary", id);
                report.error = Some(err.to_string());
                report.latency_ms = ms(start);
                report.peak_memory_bytes = peak;
                report.admission = err.admission_record().or(admissions.pop());
                self.record(&report)?;
                Err(err)
            }
        }
    }

    /// Loads (or finds) a VLM in the runtime's model cache; its bytes are reserved in
    /// the ledger before the load, as a text model's are.
    pub(crate) fn acquire_vlm(
        &self,
        dir: &Path,
    ) -> Result<afo_engine::Acquired<VisionLanguageModel>> {
        let key = crate::runtime::cache_key(dir, None);
        loop {
            let result = self.vlm_cache.acquire(&key, safetensors_bytes(dir), || {
                let mut vlm = VisionLanguageModel::load(dir)?;
                vlm.set_kv_format(self.kv_format)?;
                Ok(vlm)
            });
            match result {
                Err(afo_engine::Error::ModelTooLarge { .. }) if self.make_room() => continue,
                other => {
                    let acquired = other?;
                    if !acquired.hit {
                        let chunk = self.estimate_vision(
                            &acquired.model,
                            afo_engine::PREFILL_CHUNK,
                            0,
                            Vec::new(),
                            0,
                        );
                        afo_guard::reuse_workspace(chunk.estimate.activations);
                    }
                    return Ok(acquired);
                }
            }
        }
    }

    fn run_chain(
        &self,
        request: &ChainRequest,
        run_id: &str,
        admissions: &mut Vec<AdmissionRecord>,
    ) -> Result<ChainResponse> {
        if request.images.is_empty() {
            return Err(Error::NoImages);
        }
        let acquired = self.acquire_vlm(&request.vlm)?;
        let vlm = &acquired.model;
        let mut stages = Vec::new();

        // Preprocess: decode within limits, resize in u8, re-encode, normalise.
        let t = Instant::now();
        let config_path = request.vlm.join("preprocessor_config.json");
        let pre = if config_path.is_file() {
            PreprocessorConfig::from_file(&config_path).map_err(|source| Error::Image {
                name: config_path.display().to_string(),
                source,
            })?
        } else {
            PreprocessorConfig::qwen3_vl()
        }
        // A still image's frames are identical: keep one per patch row (half the
        // pixel values at T = 2); the encoder folds its kernel over the frames.
        .with_pixel_layout(PixelLayout::Compact);
        let mut inputs = Vec::with_capacity(request.images.len());
        let mut reports = Vec::with_capacity(request.images.len());
        let (mut in_bytes, mut out_bytes) = (0u64, 0u64);
        for img in &request.images {
            let wrap = |source| Error::Image {
                name: img.name.clone(),
                source,
            };
            let prepared = afo_image::prepare(&img.bytes, &pre, &request.limits).map_err(wrap)?;
            let ratio = match request.storage {
                Some(e) => {
                    let enc = prepared.encode(e).map_err(wrap)?;
                    in_bytes += img.bytes.len() as u64;
                    out_bytes += enc.bytes.len() as u64;
                    Some(enc.compression_ratio)
                }
                None => None,
            };
            let p = prepared.to_preprocessed(&pre).map_err(wrap)?;
            reports.push(ImageReport {
                name: img.name.clone(),
                original: p.original,
                resized: p.resized,
                grid_thw: p.grid_thw,
                image_tokens: p.num_image_tokens(),
                compression_ratio: ratio,
            });
            inputs.push(VisionInput {
                pixel_values: p.pixel_values,
                grid_thw: p.grid_thw,
            });
        }
        stages.push(stage("preprocess", None, t, None));
        let image_pixels: u64 = reports
            .iter()
            .map(|r| u64::from(r.resized.0) * u64::from(r.resized.1))
            .sum();
        let original_pixels: u64 = reports
            .iter()
            .map(|r| u64::from(r.original.0) * u64::from(r.original.1))
            .sum();

        // The preprocessed pixels exist now: they are in the ledger until encoded.
        let pixel_bytes: u64 = inputs
            .iter()
            .map(|i| (i.pixel_values.elem_count() * i.pixel_values.dtype().size_in_bytes()) as u64)
            .sum();
        let held_pixels = self
            .ledger
            .reserve_existing(MemoryKind::Images, pixel_bytes);

        // Admission for the analysis: the VLM is resident; the run adds the vision
        // encoder's states, the KV cache, activations and logits.
        let text = vlm.text_model();
        let image_tokens: usize = reports.iter().map(|r| r.image_tokens).sum();
        let patches: usize = inputs
            .iter()
            .map(|i| i.grid_thw.iter().product::<usize>())
            .sum();
        let pixels_per_image = reports
            .iter()
            .map(|r| u64::from(r.resized.0) * u64::from(r.resized.1))
            .collect();
        // The instruction and the chat template: a small allowance beside the images.
        let prompt_tokens = image_tokens + 64;
        let estimate = self.estimate_vision(
            vlm,
            prompt_tokens,
            request.analysis.max_tokens,
            pixels_per_image,
            patches,
        );
        let admitted = self
            .admit(&[PlanOption::new("as asked", estimate.parts)])
            .map_err(|(refusal, tried)| Error::Refused { refusal, tried })?;
        let mut predicted_peak = admitted.predicted_peak_bytes;
        admissions.push(admitted.record.clone());
        let reservation = admitted.reservation;
        tracing::debug!(run_bytes = reservation.bytes(), run_id, "chain admitted");
        let shared = request
            .llm
            .as_deref()
            .is_none_or(|l| same_path(l, &request.vlm));

        // Analysis.
        let t = Instant::now();
        let prompt = vlm.prepare(&request.instruction, &inputs)?;
        drop(inputs);
        drop(held_pixels);
        stages.push(Stage {
            name: "vision_encode".to_owned(),
            model_id: Some(vlm.id().to_owned()),
            latency_ms: prompt.vision_ms,
            tokens_in: None,
            tokens_out: Some(prompt.image_tokens as u64),
        });
        let analysis: Generation = {
            let decoder = vlm.decoder(&prompt);
            let mut cache = text.new_cache(prompt.tokens.len() + request.analysis.max_tokens);
            generate(
                &decoder,
                vlm.tokenizer(),
                &prompt.tokens,
                &request.analysis,
                &mut cache,
                |_| ControlFlow::Continue(()),
            )?
            // The analysis KV cache is dropped here, before the summary runs.
        };
        let analysis_tokens = TokenCounts {
            prompt: prompt.tokens.len(),
            generated: analysis.tokens.len(),
        };
        drop(prompt);
        stages.push(stage(
            "image_analysis",
            Some(vlm.id()),
            t,
            Some(analysis_tokens),
        ));
        drop(reservation);

        // Summary: on the VLM's own language model, or on another model.
        let t = Instant::now();
        let messages = [Message::user(format!(
            "{}\n\n{}",
            request.summary_prompt, analysis.text
        ))];
        // The summary model: the VLM's own language model, or another model, whose
        // load is admitted on the ledger like any other.
        let llm = match (shared, request.llm.as_deref()) {
            (false, Some(path)) => Some(self.acquire(path, None, None)?),
            _ => None,
        };
        let (model, tokenizer, llm_id) = match &llm {
            Some(l) => (
                l.model.model(),
                l.model.tokenizer(),
                l.model.id().to_owned(),
            ),
            None => (text, vlm.tokenizer(), vlm.id().to_owned()),
        };
        let tokens = match &llm {
            Some(l) => l.model.encode_chat(&messages)?,
            None => vlm.encode_chat(&messages)?,
        };
        let (plan, admitted) =
            self.admit_text(model, tokens.len(), request.summary.max_tokens, None)?;
        predicted_peak = predicted_peak.max(admitted.predicted_peak_bytes);
        admissions.push(admitted.record.clone());
        let mut summary_options = request.summary.clone();
        summary_options.max_tokens = plan.max_tokens;
        let mut kv = plan.new_cache(model, tokens.len());
        let summary = generate(model, tokenizer, &tokens, &summary_options, &mut kv, |_| {
            ControlFlow::Continue(())
        })?;
        drop(kv);
        drop(admitted);
        let summary_tokens = TokenCounts {
            prompt: summary.prompt_tokens,
            generated: summary.tokens.len(),
        };
        stages.push(stage("summary", Some(&llm_id), t, Some(summary_tokens)));

        Ok(ChainResponse {
            run_id: run_id.to_owned(),
            analysis: analysis.text,
            summary: summary.text,
            vlm_id: vlm.id().to_owned(),
            llm_id,
            shared_instance: shared,
            stages,
            images: reports,
            image_pixels,
            original_pixels,
            compression_ratio: (out_bytes > 0).then(|| in_bytes as f64 / out_bytes as f64),
            analysis_tokens,
            summary_tokens,
            admissions: admissions.clone(),
            predicted_peak_bytes: predicted_peak,
            peak_memory_bytes: 0,
            cutline_bytes: self.budget().cutline(),
            badge: StatusBadge::Safe,
            health_score: 0.0,
            latency_ms: 0.0,
        })
    }

    fn log_chain(&self, r: &ChainResponse) -> Result<()> {
        let mut report = RunReport::new(&r.run_id, "image_summary", &r.vlm_id);
        report.latency_ms = r.latency_ms;
        report.peak_memory_bytes = r.peak_memory_bytes;
        report.tokens_in = (r.analysis_tokens.prompt + r.summary_tokens.prompt) as u64;
        report.tokens_out = (r.analysis_tokens.generated + r.summary_tokens.generated) as u64;
        let generating_ms: f64 = r
            .stages
            .iter()
            .filter(|s| s.name == "image_analysis" || s.name == "summary")
            .map(|s| s.latency_ms)
            .sum();
        report.tokens_per_s =
            (generating_ms > 0.0).then(|| report.tokens_out as f64 / (generating_ms / 1e3));
        report.image_pixels = Some(r.image_pixels);
        report.original_pixels = Some(r.original_pixels);
        report.compression_ratio = r.compression_ratio;
        report.predicted_peak_bytes = Some(r.predicted_peak_bytes);
        report.stages = Some(r.stages.clone());
        // The stage that came closest to the cutline stands for the chain.
        report.admission = r
            .admissions
            .iter()
            .max_by_key(|a| a.reserved_bytes + a.run_bytes + a.unaccounted_bytes)
            .cloned();
        self.record(&report)?;
        Ok(())
    }
}
