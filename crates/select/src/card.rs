//! A model card: what the selector knows about one model.

use std::collections::BTreeMap;
use std::fmt;

use afo_guard::{ByteSize, Estimator, ModelShape, RunPlan, Weights};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::capability::Capabilities;
use crate::error::{Error, Result};
use crate::scheme::QuantScheme;
use crate::task::Task;

/// Prompt tokens of the reference run that [`estimate_bytes`] sizes: 2048.
pub const REFERENCE_CONTEXT_TOKENS: u64 = 2048;

/// One model as the selector sees it: identity, size, precision, capabilities, quality
/// and context. Every card is valid: [`ModelCardBuilder::build`] and deserialisation
/// both check it.
///
/// In a catalog file a card reads (TOML; JSON has the same fields):
///
/// ```toml
/// [[models]]
/// id = "smollm2-135m-int8"
/// family = "smollm2-135m"
/// params = 134515008
/// quant = "int8"
/// capabilities = ["text"]          # default ["text"]
/// trinity_score = 96.0             # 0..=100
/// task_scores = { chat = 96.5, summary = 95.0 }   # optional
/// context_length = 8192
/// estimated_bytes = "340MB"        # or a number of bytes
/// tokens_per_s = 180.0             # optional, measured
/// source = "models/smollm2-135m-int8.gguf"        # optional
/// variant_of = "smollm2-135m-f32"  # optional: the base model of a ladder
/// ```
///
/// The size routing compares against the memory headroom is always
/// [`ModelCard::estimated_bytes`], never read from a name such as `-4b` or `-int4`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    id: String,
    family: String,
    params: u64,
    quant: QuantScheme,
    capabilities: Capabilities,
    trinity_score: f32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    task_scores: BTreeMap<Task, f32>,
    context_length: u64,
    #[serde(serialize_with = "serialize_bytes")]
    estimated_bytes: ByteSize,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant_of: Option<String>,
}

impl ModelCard {
    /// A builder for the card `id` of the model family `family` (for example
    /// `qwen3-vl`: the cards of one family form a fallback ladder).
    pub fn builder(id: impl Into<String>, family: impl Into<String>) -> ModelCardBuilder {
        ModelCardBuilder::new(id, family)
    }

    /// The id, unique in a catalog.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The family; the cards of one family are each other's fallbacks.
    pub fn family(&self) -> &str {
        &self.family
    }

    /// Parameters.
    pub fn params(&self) -> u64 {
        self.params
    }

    /// The weights' quantization scheme.
    pub fn quant(&self) -> QuantScheme {
        self.quant
    }

    /// What the model takes as input.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The overall quality ("trinity") score, 0 to 100.
    pub fn trinity_score(&self) -> f32 {
        self.trinity_score
    }

    /// Per-task scores, 0 to 100, where measured.
    pub fn task_scores(&self) -> &BTreeMap<Task, f32> {
        &self.task_scores
    }

    /// The score for `task`: its per-task score when the card has one, the overall
    /// trinity score otherwise.
    pub fn score_for(&self, task: Task) -> f32 {
        self.task_scores
            .get(&task)
            .copied()
            .unwrap_or(self.trinity_score)
    }

    /// The longest sequence (prompt and output) the model takes, in tokens.
    pub fn context_length(&self) -> u64 {
        self.context_length
    }

    /// The memory the model needs to run, as routing compares it with the headroom.
    pub fn estimated_bytes(&self) -> ByteSize {
        self.estimated_bytes
    }

    /// Measured decoding speed, tokens per second, when known.
    pub fn tokens_per_s(&self) -> Option<f32> {
        self.tokens_per_s
    }

    /// Where the runtime loads the model from (a path, `ORG/NAME`, ...), when given.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The id of the model this card is a variant of (a quantization or a smaller
    /// size of it), when given.
    pub fn variant_of(&self) -> Option<&str> {
        self.variant_of.as_deref()
    }
}

/// The peak bytes [`Estimator`] predicts for one run of a model of `params`
/// parameters stored in `quant`, of shape `shape`, over `context_tokens` prompt tokens
/// (use [`REFERENCE_CONTEXT_TOKENS`] when in doubt): weights from
/// [`QuantScheme::bits_per_param`], an f32 KV cache, batch 1, prefill chunks of 512,
/// no images.
///
/// A card stores bytes, not a shape; this helper computes them for a caller that has
/// the shape (from `config.json` or GGUF metadata).
pub fn estimate_bytes(
    estimator: &Estimator,
    params: u64,
    quant: QuantScheme,
    shape: ModelShape,
    context_tokens: u64,
) -> ByteSize {
    let plan = RunPlan {
        weights: Weights::Params {
            count: params,
            bits_per_param: quant.bits_per_param(),
        },
        shape,
        prompt_tokens: context_tokens,
        max_new_tokens: 0,
        batch: 1,
        // The engine's caches hold keys and values in the default format.
        kv_bytes_per_token: shape.kv_bytes_per_token(afo_guard::KvFormat::default()),
        prefill_chunk: 512,
        image_pixels: Vec::new(),
        vision_tokens: 0,
        output: afo_guard::RunOutput::Logits,
        // ... and attend with the fused kernel on the CPU.
        attention: afo_guard::AttentionMemory::Fused,
    };
    ByteSize(estimator.estimate(&plan).total)
}

#[derive(Debug, Clone, PartialEq)]
enum BytesSpec {
    Given(ByteSize),
    Shape {
        estimator: Estimator,
        shape: ModelShape,
        context_tokens: u64,
    },
}

/// Builds a [`ModelCard`]; [`build`](ModelCardBuilder::build) validates it.
///
/// `params`, `trinity_score`, `context_length` and the bytes (`estimated_bytes` or
/// `bytes_from_shape`) are required.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCardBuilder {
    id: String,
    family: String,
    params: Option<u64>,
    quant: QuantScheme,
    capabilities: Capabilities,
    trinity_score: Option<f32>,
    task_scores: BTreeMap<Task, f32>,
    context_length: Option<u64>,
    bytes: Option<BytesSpec>,
    tokens_per_s: Option<f32>,
    source: Option<String>,
    variant_of: Option<String>,
}

impl ModelCardBuilder {
    /// A builder for the card `id` of the family `family`.
    pub fn new(id: impl Into<String>, family: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            family: family.into(),
            params: None,
            quant: QuantScheme::F32,
            capabilities: Capabilities::TEXT,
            trinity_score: None,
            task_scores: BTreeMap::new(),
            context_length: None,
            bytes: None,
            tokens_per_s: None,
            source: None,
            variant_of: None,
        }
    }

    /// Parameters (required, more than 0).
    pub fn params(mut self, params: u64) -> Self {
        self.params = Some(params);
        self
    }

    /// Quantization scheme. Default [`QuantScheme::F32`].
    pub fn quant(mut self, quant: QuantScheme) -> Self {
        self.quant = quant;
        self
    }

    /// Capabilities (not empty). Default [`Capabilities::TEXT`].
    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// The overall trinity score (required, 0 to 100).
    pub fn trinity_score(mut self, score: f32) -> Self {
        self.trinity_score = Some(score);
        self
    }

    /// The score for one task (0 to 100). Default: none, the overall score counts.
    pub fn task_score(mut self, task: Task, score: f32) -> Self {
        self.task_scores.insert(task, score);
        self
    }

    /// Context length in tokens (required, more than 0).
    pub fn context_length(mut self, tokens: u64) -> Self {
        self.context_length = Some(tokens);
        self
    }

    /// The memory the model needs (required unless
    /// [`bytes_from_shape`](Self::bytes_from_shape) is given; more than 0).
    pub fn estimated_bytes(mut self, bytes: impl Into<ByteSize>) -> Self {
        self.bytes = Some(BytesSpec::Given(bytes.into()));
        self
    }

    /// Computes the bytes at build time with [`estimate_bytes`] from the card's
    /// parameters and scheme and this shape.
    pub fn bytes_from_shape(
        mut self,
        estimator: Estimator,
        shape: ModelShape,
        context_tokens: u64,
    ) -> Self {
        self.bytes = Some(BytesSpec::Shape {
            estimator,
            shape,
            context_tokens,
        });
        self
    }

    /// Measured decoding speed in tokens per second (more than 0). Default: unknown.
    pub fn tokens_per_s(mut self, tokens_per_s: f32) -> Self {
        self.tokens_per_s = Some(tokens_per_s);
        self
    }

    /// Where the runtime loads the model from. Default: none.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The id of the base model this card is a variant of. Default: none.
    pub fn variant_of(mut self, base: impl Into<String>) -> Self {
        self.variant_of = Some(base.into());
        self
    }

    /// The card, or [`Error::InvalidCard`] naming the first bad field.
    pub fn build(self) -> Result<ModelCard> {
        let id = self.id;
        let bad = |field: &'static str, reason: String| Error::InvalidCard {
            id: id.clone(),
            field,
            reason,
        };
        check_name(&id).map_err(|r| bad("id", r))?;
        check_name(&self.family).map_err(|r| bad("family", r))?;
        let params = match self.params {
            None => return Err(bad("params", "is required".into())),
            Some(0) => return Err(bad("params", "must be more than 0".into())),
            Some(p) => p,
        };
        if self.capabilities.is_empty() {
            return Err(bad("capabilities", "must name at least one".into()));
        }
        let trinity_score = self
            .trinity_score
            .ok_or_else(|| bad("trinity_score", "is required".into()))?;
        check_score(trinity_score).map_err(|r| bad("trinity_score", r))?;
        for (task, score) in &self.task_scores {
            check_score(*score).map_err(|r| bad("task_scores", format!("for `{task}`: {r}")))?;
        }
        let context_length = match self.context_length {
            None => return Err(bad("context_length", "is required".into())),
            Some(0) => return Err(bad("context_length", "must be more than 0".into())),
            Some(c) => c,
        };
        let estimated_bytes = match self.bytes {
            None => return Err(bad("estimated_bytes", "is required".into())),
            Some(BytesSpec::Given(b)) => b,
            Some(BytesSpec::Shape {
                estimator,
                shape,
                context_tokens,
            }) => estimate_bytes(&estimator, params, self.quant, shape, context_tokens),
        };
        if estimated_bytes.bytes() == 0 {
            return Err(bad("estimated_bytes", "must be more than 0".into()));
        }
        if let Some(t) = self.tokens_per_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(bad("tokens_per_s", format!("= {t}: must be more than 0")));
        }
        if let Some(s) = &self.source
            && s.trim().is_empty()
        {
            return Err(bad("source", "must not be empty when given".into()));
        }
        if let Some(base) = &self.variant_of {
            check_name(base).map_err(|r| bad("variant_of", r))?;
            if *base == id {
                return Err(bad("variant_of", "names the card itself".into()));
            }
        }
        Ok(ModelCard {
            id,
            family: self.family,
            params,
            quant: self.quant,
            capabilities: self.capabilities,
            trinity_score,
            task_scores: self.task_scores,
            context_length,
            estimated_bytes,
            tokens_per_s: self.tokens_per_s,
            source: self.source,
            variant_of: self.variant_of,
        })
    }
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        Err("must not be empty".into())
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "= `{name}`: must not contain spaces or control characters"
        ))
    } else {
        Ok(())
    }
}

fn check_score(score: f32) -> std::result::Result<(), String> {
    if score.is_finite() && (0.0..=100.0).contains(&score) {
        Ok(())
    } else {
        Err(format!("= {score}: must be within 0..=100"))
    }
}

/// A card as written in a catalog file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardFile {
    id: String,
    family: String,
    #[serde(alias = "parameters")]
    params: u64,
    #[serde(alias = "quant_scheme")]
    quant: QuantScheme,
    #[serde(default)]
    capabilities: Option<Capabilities>,
    #[serde(alias = "score")]
    trinity_score: f32,
    #[serde(default)]
    task_scores: BTreeMap<Task, f32>,
    context_length: u64,
    #[serde(alias = "bytes", deserialize_with = "deserialize_bytes")]
    estimated_bytes: ByteSize,
    #[serde(default)]
    tokens_per_s: Option<f32>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    variant_of: Option<String>,
}

impl<'de> Deserialize<'de> for ModelCard {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let f = CardFile::deserialize(d)?;
        let mut b = ModelCardBuilder::new(f.id, f.family)
            .params(f.params)
            .quant(f.quant)
            .trinity_score(f.trinity_score)
            .context_length(f.context_length)
            .estimated_bytes(f.estimated_bytes);
        b.capabilities = f.capabilities.unwrap_or(Capabilities::TEXT);
        b.task_scores = f.task_scores;
        b.tokens_per_s = f.tokens_per_s;
        b.source = f.source;
        b.variant_of = f.variant_of;
        b.build().map_err(de::Error::custom)
    }
}

fn serialize_bytes<S: Serializer>(b: &ByteSize, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(b.bytes())
}

/// Bytes as a number or as text (`"540MB"`, `"1.5GiB"`).
fn deserialize_bytes<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<ByteSize, D::Error> {
    struct BytesVisitor;

    impl Visitor<'_> for BytesVisitor {
        type Value = ByteSize;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes or a size such as \"540MB\" or \"1.5GiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<ByteSize, E> {
            Ok(ByteSize(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<ByteSize, E> {
            u64::try_from(v)
                .map(ByteSize)
                .map_err(|_| E::custom(format!("{v} bytes: must not be negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<ByteSize, E> {
            v.parse().map_err(E::custom)
        }
    }

    d.deserialize_any(BytesVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::Capability;

    fn smollm2_shape() -> ModelShape {
        ModelShape {
            layers: 30,
            hidden: 576,
            intermediate: 1536,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
        }
    }

    fn base() -> ModelCardBuilder {
        ModelCard::builder("m", "fam")
            .params(1000)
            .trinity_score(96.0)
            .context_length(2048)
            .estimated_bytes(ByteSize::mib(10))
    }

    #[test]
    fn builds_and_reads_back() {
        let card = base()
            .quant(QuantScheme::Int8)
            .capabilities(Capabilities::TEXT_VISION)
            .task_score(Task::Code, 90.0)
            .tokens_per_s(50.0)
            .source("m.gguf")
            .variant_of("m-f32")
            .build()
            .unwrap();
        assert_eq!(card.id(), "m");
        assert_eq!(card.score_for(Task::Code), 90.0);
        assert_eq!(card.score_for(Task::Chat), 96.0);
        assert!(card.capabilities().has(Capability::Vision));
        assert_eq!(card.variant_of(), Some("m-f32"));
        let json = serde_json::to_string(&card).unwrap();
        let back: ModelCard = serde_json::from_str(&json).unwrap();
        assert_eq!(back, card);
    }

    #[test]
    fn errors_name_card_and_field() {
        let cases: Vec<(ModelCardBuilder, &str)> = vec![
            (base().trinity_score(101.0), "trinity_score"),
            (base().trinity_score(f32::NAN), "trinity_score"),
            (base().task_score(Task::Chat, -1.0), "task_scores"),
            (base().estimated_bytes(0u64), "estimated_bytes"),
            (base().params(0), "params"),
            (base().context_length(0), "context_length"),
            (base().tokens_per_s(0.0), "tokens_per_s"),
            (base().capabilities(Capabilities::NONE), "capabilities"),
            (base().variant_of("m"), "variant_of"),
            (base().source(" "), "source"),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            match &err {
                Error::InvalidCard { id, field: f, .. } => {
                    assert_eq!(id, "m");
                    assert_eq!(*f, field);
                }
                other => panic!("{other}"),
            }
            let text = err.to_string();
            assert!(text.contains("`m`") && text.contains(field), "{text}");
        }
        let err = ModelCard::builder("", "fam").build().unwrap_err();
        assert!(
            err.to_string().contains("field `id` must not be empty"),
            "{err}"
        );
        let err = ModelCard::builder("a b", "fam").build().unwrap_err();
        assert!(err.to_string().contains("spaces"), "{err}");
        let err = ModelCard::builder("x", "fam").build().unwrap_err();
        assert!(err.to_string().contains("`params` is required"), "{err}");
    }

    #[test]
    fn bytes_from_shape_uses_the_guard_estimator() {
        let est = Estimator::default();
        let card = base()
            .params(134_515_008)
            .quant(QuantScheme::Int8)
            .bytes_from_shape(est, smollm2_shape(), REFERENCE_CONTEXT_TOKENS)
            .build()
            .unwrap();
        let expected = estimate_bytes(
            &est,
            134_515_008,
            QuantScheme::Int8,
            smollm2_shape(),
            REFERENCE_CONTEXT_TOKENS,
        );
        assert_eq!(card.estimated_bytes(), expected);
        // Weights 134.5 MB at 8 bits plus KV, activations and overhead.
        assert!(expected.bytes() > 134_515_008 && expected.bytes() < 400_000_000);
        let f32_bytes = estimate_bytes(
            &est,
            134_515_008,
            QuantScheme::F32,
            smollm2_shape(),
            REFERENCE_CONTEXT_TOKENS,
        );
        assert!(f32_bytes > expected);
    }

    #[test]
    fn file_form_accepts_sizes_as_text_and_checks_fields() {
        let card: ModelCard = serde_json::from_str(
            r#"{"id":"a","family":"f","params":10,"quant":"Q4_1","trinity_score":97,
                "context_length":100,"bytes":"1.5GB","task_scores":{"code":91}}"#,
        )
        .unwrap();
        assert_eq!(card.estimated_bytes(), ByteSize(1_500_000_000));
        assert_eq!(card.capabilities(), Capabilities::TEXT);
        assert_eq!(card.quant(), QuantScheme::Q4_1);
        let err = serde_json::from_str::<ModelCard>(
            r#"{"id":"a","family":"f","params":10,"quant":"f16","trinity_score":120,
                "context_length":100,"bytes":5}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("model card `a`: field `trinity_score`"),
            "{err}"
        );
        let err = serde_json::from_str::<ModelCard>(
            r#"{"id":"a","family":"f","params":10,"quant":"f16","trinity_score":99,
                "context_length":100,"bytes":5,"colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = serde_json::from_str::<ModelCard>(
            r#"{"id":"a","family":"f","params":10,"quant":"f16","trinity_score":99,
                "context_length":100,"bytes":"lots"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("lots"), "{err}");
    }
}
