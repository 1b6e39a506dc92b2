//! The catalog: the model cards a selector chooses from.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::card::ModelCard;
use crate::error::{Error, Result};

/// The default registration floor: cards scoring below 95 are listed but never
/// chosen (the original system's threshold).
pub const DEFAULT_MIN_SCORE: f32 = 95.0;

/// Whether a card may be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Eligibility {
    /// The card's trinity score reaches the catalog's floor.
    Eligible,
    /// The card's trinity score is below the floor: it is listed, never chosen.
    BelowMinScore {
        /// The card's trinity score.
        score: f32,
        /// The catalog's floor.
        min_score: f32,
    },
}

impl Eligibility {
    /// Whether the card may be chosen.
    pub fn is_eligible(self) -> bool {
        matches!(self, Eligibility::Eligible)
    }
}

/// The model cards to choose from, with a registration floor
/// ([`Catalog::min_score`], default [`DEFAULT_MIN_SCORE`]): a card whose trinity score
/// is below it stays listed and is reported as ineligible, but routing and the
/// fallback ladder never choose it.
///
/// Ids are unique. A card's `variant_of`, when given, names a card of the same family
/// in the catalog.
///
/// A catalog file holds an optional `min_score` and a list of `models` (see
/// [`ModelCard`] for a card's fields), in TOML:
///
/// ```toml
/// min_score = 95.0
///
/// [[models]]
/// id = "smollm2-135m-f32"
/// family = "smollm2-135m"
/// params = 134515008
/// quant = "f32"
/// trinity_score = 97.0
/// context_length = 8192
/// estimated_bytes = "790MB"
/// ```
///
/// or in JSON: `{"min_score": 95.0, "models": [{"id": "smollm2-135m-f32", ...}]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Catalog {
    min_score: f32,
    models: Vec<ModelCard>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    min_score: Option<f32>,
    #[serde(default, alias = "model")]
    models: Vec<ModelCard>,
}

impl Catalog {
    /// An empty catalog with the default floor.
    pub fn new() -> Self {
        Self {
            min_score: DEFAULT_MIN_SCORE,
            models: Vec::new(),
        }
    }

    /// A builder.
    pub fn builder() -> CatalogBuilder {
        CatalogBuilder::default()
    }

    /// Parses a catalog from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::parse_toml(text, None)
    }

    /// Parses a catalog from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse_json(text, None)
    }

    /// Loads a catalog file, TOML or JSON by its extension (`.toml`, `.json`). Every
    /// error names the file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let text = match ext.as_deref() {
            Some("toml" | "json") => std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })?,
            _ => {
                return Err(Error::UnknownFormat {
                    path: path.to_owned(),
                });
            }
        };
        if ext.as_deref() == Some("toml") {
            Self::parse_toml(&text, Some(path))
        } else {
            Self::parse_json(&text, Some(path))
        }
    }

    fn parse_toml(text: &str, path: Option<&Path>) -> Result<Self> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| Error::Toml {
            path: path.map(Path::to_owned),
            source: Box::new(e),
        })?;
        Self::from_file(file, path)
    }

    fn parse_json(text: &str, path: Option<&Path>) -> Result<Self> {
        let file: CatalogFile = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.map(Path::to_owned),
            source: e,
        })?;
        Self::from_file(file, path)
    }

    fn from_file(file: CatalogFile, path: Option<&Path>) -> Result<Self> {
        let mut b = Catalog::builder().cards(file.models);
        if let Some(m) = file.min_score {
            b = b.min_score(m);
        }
        b.path = path.map(Path::to_owned);
        b.build()
    }

    /// The registration floor: cards whose trinity score is below it are not chosen.
    pub fn min_score(&self) -> f32 {
        self.min_score
    }

    /// Sets the registration floor (0 to 100).
    pub fn set_min_score(&mut self, min_score: f32) -> Result<()> {
        check_min_score(min_score)?;
        self.min_score = min_score;
        Ok(())
    }

    /// Adds a card. Its id must be new ([`Error::DuplicateId`]) and its `variant_of`,
    /// when given, must name a card already in the catalog of the same family
    /// ([`Error::BadVariant`]).
    pub fn push(&mut self, card: ModelCard) -> Result<()> {
        if self.get(card.id()).is_some() {
            return Err(Error::DuplicateId {
                id: card.id().to_owned(),
                path: None,
            });
        }
        check_variant(&card, |id| self.get(id))?;
        self.models.push(card);
        Ok(())
    }

    /// The number of cards, eligible or not.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether the catalog has no card.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Every card, eligible or not, in the order given.
    pub fn iter(&self) -> std::slice::Iter<'_, ModelCard> {
        self.models.iter()
    }

    /// The card `id`, if any.
    pub fn get(&self, id: &str) -> Option<&ModelCard> {
        self.models.iter().find(|c| c.id() == id)
    }

    /// The card `id`, or [`Error::UnknownModel`] listing the ids there are.
    pub fn card(&self, id: &str) -> Result<&ModelCard> {
        self.get(id).ok_or_else(|| Error::UnknownModel {
            id: id.to_owned(),
            known: self.models.iter().map(|c| c.id().to_owned()).collect(),
        })
    }

    /// Whether `card` may be chosen under this catalog's floor.
    pub fn eligibility(&self, card: &ModelCard) -> Eligibility {
        if card.trinity_score() >= self.min_score {
            Eligibility::Eligible
        } else {
            Eligibility::BelowMinScore {
                score: card.trinity_score(),
                min_score: self.min_score,
            }
        }
    }

    /// Every card with its eligibility, in the order given.
    pub fn entries(&self) -> impl Iterator<Item = (&ModelCard, Eligibility)> {
        self.models.iter().map(|c| (c, self.eligibility(c)))
    }

    /// The cards that may be chosen.
    pub fn eligible(&self) -> impl Iterator<Item = &ModelCard> {
        self.entries()
            .filter(|(_, e)| e.is_eligible())
            .map(|(c, _)| c)
    }

    /// The cards listed but never chosen (below the floor).
    pub fn ineligible(&self) -> impl Iterator<Item = &ModelCard> {
        self.entries()
            .filter(|(_, e)| !e.is_eligible())
            .map(|(c, _)| c)
    }
}

impl<'a> IntoIterator for &'a Catalog {
    type Item = &'a ModelCard;
    type IntoIter = std::slice::Iter<'a, ModelCard>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Builds a [`Catalog`] from code; [`build`](CatalogBuilder::build) checks ids and
/// variants once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CatalogBuilder {
    min_score: Option<f32>,
    cards: Vec<ModelCard>,
    path: Option<PathBuf>,
}

impl CatalogBuilder {
    /// A builder with no card.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registration floor, 0 to 100. Default [`DEFAULT_MIN_SCORE`] (95).
    pub fn min_score(mut self, min_score: f32) -> Self {
        self.min_score = Some(min_score);
        self
    }

    /// Adds a card.
    pub fn card(mut self, card: ModelCard) -> Self {
        self.cards.push(card);
        self
    }

    /// Adds cards.
    pub fn cards(mut self, cards: impl IntoIterator<Item = ModelCard>) -> Self {
        self.cards.extend(cards);
        self
    }

    /// The catalog, or the first duplicate id, bad `variant_of` or bad floor.
    pub fn build(self) -> Result<Catalog> {
        let min_score = self.min_score.unwrap_or(DEFAULT_MIN_SCORE);
        check_min_score(min_score)?;
        let mut seen = HashSet::new();
        for card in &self.cards {
            if !seen.insert(card.id()) {
                return Err(Error::DuplicateId {
                    id: card.id().to_owned(),
                    path: self.path,
                });
            }
        }
        for card in &self.cards {
            check_variant(card, |id| self.cards.iter().find(|c| c.id() == id))?;
        }
        Ok(Catalog {
            min_score,
            models: self.cards,
        })
    }
}

fn check_min_score(min_score: f32) -> Result<()> {
    if min_score.is_finite() && (0.0..=100.0).contains(&min_score) {
        Ok(())
    } else {
        Err(Error::InvalidSetting {
            setting: "min_score",
            value: min_score.to_string(),
            reason: "must be within 0..=100",
        })
    }
}

fn check_variant<'a>(
    card: &ModelCard,
    lookup: impl Fn(&str) -> Option<&'a ModelCard>,
) -> Result<()> {
    let Some(base) = card.variant_of() else {
        return Ok(());
    };
    let bad = |reason| Error::BadVariant {
        id: card.id().to_owned(),
        base: base.to_owned(),
        reason,
    };
    match lookup(base) {
        None => Err(bad("no card has this id")),
        Some(b) if b.family() != card.family() => Err(bad("the base is in another family")),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use afo_guard::ByteSize;

    fn card(id: &str, score: f32) -> ModelCard {
        ModelCard::builder(id, "fam")
            .params(100)
            .trinity_score(score)
            .context_length(512)
            .estimated_bytes(ByteSize::mib(1))
            .build()
            .unwrap()
    }

    #[test]
    fn duplicates_are_rejected_by_name() {
        let err = Catalog::builder()
            .card(card("a", 96.0))
            .card(card("a", 97.0))
            .build()
            .unwrap_err();
        assert!(matches!(&err, Error::DuplicateId { id, .. } if id == "a"));
        assert!(err.to_string().contains("duplicate model id `a`"), "{err}");
        let mut cat = Catalog::new();
        cat.push(card("a", 96.0)).unwrap();
        let err = cat.push(card("a", 96.0)).unwrap_err();
        assert!(err.to_string().contains("`a`"), "{err}");
    }

    #[test]
    fn floor_marks_cards_ineligible_but_keeps_them() {
        let cat = Catalog::builder()
            .card(card("good", 96.0))
            .card(card("weak", 90.0))
            .build()
            .unwrap();
        assert_eq!(cat.len(), 2);
        assert_eq!(
            cat.eligible().map(ModelCard::id).collect::<Vec<_>>(),
            ["good"]
        );
        assert_eq!(
            cat.ineligible().map(ModelCard::id).collect::<Vec<_>>(),
            ["weak"]
        );
        let weak = cat.card("weak").unwrap();
        assert_eq!(
            cat.eligibility(weak),
            Eligibility::BelowMinScore {
                score: 90.0,
                min_score: 95.0
            }
        );
        let mut lowered = cat.clone();
        lowered.set_min_score(80.0).unwrap();
        assert_eq!(lowered.eligible().count(), 2);
        assert!(lowered.set_min_score(101.0).is_err());
        assert!(Catalog::builder().min_score(-1.0).build().is_err());
    }

    #[test]
    fn variants_must_exist_in_the_family() {
        let variant = ModelCard::builder("b", "fam")
            .params(50)
            .trinity_score(96.0)
            .context_length(512)
            .estimated_bytes(1000u64)
            .variant_of("a")
            .build()
            .unwrap();
        let err = Catalog::builder()
            .card(variant.clone())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("`variant_of` = `a`"), "{err}");
        // In a builder the order does not matter.
        Catalog::builder()
            .card(variant.clone())
            .card(card("a", 97.0))
            .build()
            .unwrap();
        let mut cat = Catalog::new();
        assert!(cat.push(variant.clone()).is_err());
        cat.push(card("a", 97.0)).unwrap();
        cat.push(variant).unwrap();
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let cat = Catalog::builder().card(card("a", 96.0)).build().unwrap();
        let err = cat.card("zz").unwrap_err().to_string();
        assert!(
            err.contains("unknown model `zz`") && err.contains("`a`"),
            "{err}"
        );
    }

    #[test]
    fn strings_round_trip() {
        let cat = Catalog::builder()
            .min_score(90.0)
            .card(card("a", 96.0))
            .build()
            .unwrap();
        let toml_text = toml::to_string(&cat).unwrap();
        assert_eq!(Catalog::from_toml_str(&toml_text).unwrap(), cat);
        let json = serde_json::to_string(&cat).unwrap();
        assert_eq!(Catalog::from_json_str(&json).unwrap(), cat);
        let err = Catalog::from_toml_str("models = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("catalog (from a string)"), "{err}");
    }
}
