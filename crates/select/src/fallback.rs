//! The fallback ladder: cheaper variants of a model for when memory is short.

use std::cmp::Ordering;

use afo_guard::ByteSize;
use serde::{Deserialize, Serialize};

use crate::card::ModelCard;
use crate::catalog::Catalog;
use crate::error::{Error, Result};

/// What a fallback gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The same size in a lower precision, e.g. int8 -> int4 (`lower_precision`).
    LowerPrecision,
    /// A smaller model in the same precision, e.g. 4B -> 2B (`smaller_model`).
    SmallerModel,
    /// Both smaller and lower precision (`smaller_and_lower_precision`).
    SmallerAndLowerPrecision,
    /// Another cheaper variant of the family, e.g. a bigger model in a much lower
    /// precision (`cheaper_variant`).
    CheaperVariant,
}

named_enum!(FallbackReason, "fallback reason", {
    LowerPrecision => "lower_precision",
    SmallerModel => "smaller_model",
    SmallerAndLowerPrecision => "smaller_and_lower_precision",
    CheaperVariant => "cheaper_variant",
});

impl FallbackReason {
    fn between(from: &ModelCard, to: &ModelCard) -> Self {
        let smaller = to.params() < from.params();
        let same_size = to.params() == from.params();
        let from_bits = from.quant().bits_per_param();
        let to_bits = to.quant().bits_per_param();
        let lower = to_bits < from_bits;
        let same_precision = to_bits == from_bits;
        match (smaller, same_size, lower, same_precision) {
            (_, true, true, _) => FallbackReason::LowerPrecision,
            (true, _, _, true) => FallbackReason::SmallerModel,
            (true, _, true, _) => FallbackReason::SmallerAndLowerPrecision,
            _ => FallbackReason::CheaperVariant,
        }
    }
}

/// A step down the ladder, as recorded in the run's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fallback {
    /// The card fallen back to.
    pub to: String,
    /// The card given up.
    pub fallback_from: String,
    /// What was given up.
    pub reason: FallbackReason,
    /// Why, in words, with the sizes.
    pub reason_text: String,
    /// The new card's trinity score.
    pub to_score: f32,
    /// The new card's bytes.
    pub to_bytes: u64,
    /// The old card's bytes.
    pub from_bytes: u64,
    /// The memory that was available.
    pub available_bytes: u64,
}

/// The cheaper variants of the card `from_id`, most expensive first: the eligible
/// cards of its family that keep every capability it has and need fewer
/// [`ModelCard::estimated_bytes`]. Ordered by bytes (descending), then score
/// (descending), then id, so the ladder goes from a big model to smaller ones and from
/// high precision to lower (4B f16 -> 4B int8 -> 2B int8 -> 2B int4).
///
/// Sizes come from the cards, never from their names. [`Error::UnknownModel`] when
/// `from_id` is not in the catalog.
pub fn fallback_ladder<'c>(catalog: &'c Catalog, from_id: &str) -> Result<Vec<&'c ModelCard>> {
    let from = catalog.card(from_id)?;
    let mut ladder: Vec<&ModelCard> = catalog
        .eligible()
        .filter(|c| {
            c.id() != from.id()
                && c.family() == from.family()
                && c.capabilities().contains(from.capabilities())
                && c.estimated_bytes() < from.estimated_bytes()
        })
        .collect();
    ladder.sort_by(|a, b| {
        b.estimated_bytes()
            .cmp(&a.estimated_bytes())
            .then_with(|| b.trinity_score().total_cmp(&a.trinity_score()))
            .then_with(|| a.id().cmp(b.id()))
    });
    Ok(ladder)
}

/// The first rung of [`fallback_ladder`] that fits in `available` bytes: the largest
/// cheaper variant that fits. The caller asks for it when the guard finds that
/// `from_id` does not fit; `from_id` itself is never returned.
///
/// [`Error::NoFallback`] names every rung tried and its size when none fits (or says
/// that the model has no cheaper variant).
///
/// ```
/// use afo_select::{fallback, Catalog, FallbackReason, ModelCard, QuantScheme};
///
/// let card = |id: &str, quant, bytes: u64| {
///     ModelCard::builder(id, "smollm2-135m").params(134_515_008).quant(quant)
///         .trinity_score(96.0).context_length(8192).estimated_bytes(bytes).build()
/// };
/// let catalog = Catalog::builder()
///     .card(card("f32", QuantScheme::F32, 800_000_000)?)
///     .card(card("int8", QuantScheme::Int8, 300_000_000)?)
///     .card(card("int4", QuantScheme::Int4, 200_000_000)?)
///     .build()?;
/// let fb = fallback(&catalog, "int8", 250_000_000u64.into())?;
/// assert_eq!((fb.to.as_str(), fb.fallback_from.as_str()), ("int4", "int8"));
/// assert_eq!(fb.reason, FallbackReason::LowerPrecision);
/// assert!(fallback(&catalog, "int8", 100_000_000u64.into()).is_err());
/// # Ok::<(), afo_select::Error>(())
/// ```
pub fn fallback(catalog: &Catalog, from_id: &str, available: ByteSize) -> Result<Fallback> {
    let from = catalog.card(from_id)?;
    let ladder = fallback_ladder(catalog, from_id)?;
    let Some(to) = ladder
        .iter()
        .copied()
        .find(|c| c.estimated_bytes() <= available)
    else {
        return Err(Error::NoFallback {
            from: from_id.to_owned(),
            available,
            tried: ladder
                .iter()
                .map(|c| (c.id().to_owned(), c.estimated_bytes()))
                .collect(),
        });
    };
    let reason = FallbackReason::between(from, to);
    let what = match reason {
        FallbackReason::LowerPrecision => {
            format!("lower precision, {} -> {}", from.quant(), to.quant())
        }
        FallbackReason::SmallerModel => format!(
            "smaller model, {} -> {} parameters",
            params_text(from.params()),
            params_text(to.params())
        ),
        FallbackReason::SmallerAndLowerPrecision => format!(
            "smaller model in lower precision, {} {} -> {} {}",
            params_text(from.params()),
            from.quant(),
            params_text(to.params()),
            to.quant()
        ),
        FallbackReason::CheaperVariant => format!(
            "cheaper variant, {} {} -> {} {}",
            params_text(from.params()),
            from.quant(),
            params_text(to.params()),
            to.quant()
        ),
    };
    let reason_text = format!(
        "`{}` needs {} but {} is available; fell back to `{}` ({what}, {})",
        from.id(),
        from.estimated_bytes(),
        available,
        to.id(),
        to.estimated_bytes()
    );
    tracing::debug!(from = from.id(), to = to.id(), %reason, "fallback");
    Ok(Fallback {
        to: to.id().to_owned(),
        fallback_from: from.id().to_owned(),
        reason,
        reason_text,
        to_score: to.trinity_score(),
        to_bytes: to.estimated_bytes().bytes(),
        from_bytes: from.estimated_bytes().bytes(),
        available_bytes: available.bytes(),
    })
}

/// `4B`, `1.7B`, `135M`, `950K`.
fn params_text(params: u64) -> String {
    let (value, unit) = match params.cmp(&1_000_000_000) {
        Ordering::Less if params >= 1_000_000 => (params as f64 / 1e6, "M"),
        Ordering::Less if params >= 1_000 => (params as f64 / 1e3, "K"),
        Ordering::Less => return params.to_string(),
        _ => (params as f64 / 1e9, "B"),
    };
    let text = if value >= 100.0 || value.fract() < 0.05 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    };
    format!("{text}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_in_words() {
        assert_eq!(params_text(4_000_000_000), "4B");
        assert_eq!(params_text(1_700_000_000), "1.7B");
        assert_eq!(params_text(134_515_008), "135M");
        assert_eq!(params_text(950_000), "950K");
        assert_eq!(params_text(12), "12");
    }

    #[test]
    fn reason_names() {
        for &r in FallbackReason::ALL {
            assert_eq!(r.as_str().parse::<FallbackReason>().unwrap(), r);
        }
    }
}
