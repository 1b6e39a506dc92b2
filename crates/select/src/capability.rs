//! What a model can take as input.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One input modality a model handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// Text in, text out (`text`).
    Text,
    /// Images in (`vision`, alias `image`).
    Vision,
}

named_enum!(Capability, "capability", {
    Text => "text",
    Vision => "vision" | "image" | "images",
});

impl Capability {
    const fn bit(self) -> u8 {
        match self {
            Capability::Text => 1,
            Capability::Vision => 2,
        }
    }
}

/// A set of [`Capability`]s, like a small bitflags type. Serialised as a list of
/// names (`["text", "vision"]`) and shown as `text+vision`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u8);

impl Capabilities {
    /// No capability.
    pub const NONE: Capabilities = Capabilities(0);
    /// Text only.
    pub const TEXT: Capabilities = Capabilities(1);
    /// Text and images.
    pub const TEXT_VISION: Capabilities = Capabilities(3);

    /// The set holding one capability.
    pub const fn only(c: Capability) -> Self {
        Capabilities(c.bit())
    }

    /// Whether `c` is in the set.
    pub const fn has(self, c: Capability) -> bool {
        self.0 & c.bit() != 0
    }

    /// Whether every capability of `other` is in the set.
    pub const fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// The set with `c` added.
    #[must_use]
    pub const fn with(self, c: Capability) -> Self {
        Capabilities(self.0 | c.bit())
    }

    /// The capabilities of `self` that `other` lacks.
    #[must_use]
    pub const fn missing_from(self, other: Capabilities) -> Self {
        Capabilities(self.0 & !other.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The capabilities in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL
            .iter()
            .copied()
            .filter(move |c| self.has(*c))
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        iter.into_iter()
            .fold(Capabilities::NONE, Capabilities::with)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.iter().map(Capability::as_str).collect();
        f.write_str(&names.join("+"))
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Capabilities({self})")
    }
}

impl Serialize for Capabilities {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Capabilities {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<Capability>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let tv: Capabilities = [Capability::Text, Capability::Vision].into_iter().collect();
        assert_eq!(tv, Capabilities::TEXT_VISION);
        assert!(tv.contains(Capabilities::TEXT));
        assert!(!Capabilities::TEXT.contains(tv));
        assert_eq!(
            tv.missing_from(Capabilities::TEXT),
            Capabilities::only(Capability::Vision)
        );
        assert_eq!(tv.to_string(), "text+vision");
        assert_eq!(Capabilities::NONE.to_string(), "none");
    }

    #[test]
    fn serde_as_list() {
        let json = serde_json::to_string(&Capabilities::TEXT_VISION).unwrap();
        assert_eq!(json, r#"["text","vision"]"#);
        let back: Capabilities = serde_json::from_str(r#"["Image","text"]"#).unwrap();
        assert_eq!(back, Capabilities::TEXT_VISION);
        assert!(serde_json::from_str::<Capabilities>(r#"["smell"]"#).is_err());
    }
}
