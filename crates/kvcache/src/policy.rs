//! Which tokens a full cache keeps: the pruning policies.

use crate::error::{Error, Result};

/// Which tokens a full cache keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PrunePolicy {
    /// Never prune.
    #[default]
    None,
    /// The most recent `window` tokens.
    SlidingWindow {
        /// Tokens kept.
        window: usize,
    },
    /// The first `sink_tokens` tokens and the most recent `window` (StreamingLLM).
    Sinks {
        /// Initial tokens always kept.
        sink_tokens: usize,
        /// Recent tokens kept.
        window: usize,
    },
    /// The `budget - recent` tokens with the largest attention received so far, and
    /// the `recent` most recent ones (H2O), chosen per layer.
    HeavyHitters {
        /// Tokens kept in all.
        budget: usize,
        /// Recent tokens always kept.
        recent: usize,
    },
}

impl PrunePolicy {
    /// Tokens the policy keeps at most.
    pub fn kept(&self) -> Option<usize> {
        match *self {
            PrunePolicy::None => None,
            PrunePolicy::SlidingWindow { window } => Some(window),
            PrunePolicy::Sinks {
                sink_tokens,
                window,
            } => Some(sink_tokens + window),
            PrunePolicy::HeavyHitters { budget, .. } => Some(budget),
        }
    }

    /// Whether the forward pass must report attention weights ([`crate::KvCache::observe`]).
    pub fn needs_attention(&self) -> bool {
        matches!(self, PrunePolicy::HeavyHitters { .. })
    }
}

impl std::fmt::Display for PrunePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            PrunePolicy::None => f.write_str("none"),
            PrunePolicy::SlidingWindow { window } => write!(f, "window:{window}"),
            PrunePolicy::Sinks {
                sink_tokens,
                window,
            } => write!(f, "sinks:{sink_tokens}+{window}"),
            PrunePolicy::HeavyHitters { budget, recent } => write!(f, "h2o:{budget}/{recent}"),
        }
    }
}

impl std::str::FromStr for PrunePolicy {
    type Err = Error;

    /// `none`, `window:N`, `sinks:S+N`, `h2o:BUDGET/RECENT`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Policy { text: s.to_owned() };
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
        let lower = s.trim().to_ascii_lowercase();
        let (name, args) = lower.split_once(':').unwrap_or((lower.as_str(), ""));
        match name {
            "none" => Ok(PrunePolicy::None),
            "window" => Ok(PrunePolicy::SlidingWindow { window: num(args)? }),
            "sinks" => {
                let (a, b) = args.split_once('+').ok_or_else(bad)?;
                Ok(PrunePolicy::Sinks {
                    sink_tokens: num(a)?,
                    window: num(b)?,
                })
            }
            "h2o" => {
                let (a, b) = args.split_once('/').ok_or_else(bad)?;
                let (budget, recent) = (num(a)?, num(b)?);
                if recent > budget {
                    return Err(bad());
                }
                Ok(PrunePolicy::HeavyHitters { budget, recent })
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        for text in ["none", "window:512", "sinks:4+508", "h2o:512/128"] {
            let p: PrunePolicy = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
        }
        assert!("h2o:10/20".parse::<PrunePolicy>().is_err());
        assert!("lru:5".parse::<PrunePolicy>().is_err());
    }
}
