//! Names for the crate's unit enums: one table per enum gives `as_str`, `ALL`,
//! `Display`, `FromStr` (case-insensitive, with aliases) and serde as the name.

/// Implements the name traits for a unit enum from a table of
/// `Variant => "name" | "alias" ...`.
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal $(| $alias:literal)*),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The canonical name, as written in files and logs.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = crate::error::Error;

            /// Parses the canonical name or an alias, ignoring ASCII case and
            /// surrounding spaces.
            fn from_str(s: &str) -> crate::error::Result<Self> {
                let key = s.trim().to_ascii_lowercase();
                $(
                    if key == $name $(|| key == $alias)* {
                        return Ok($ty::$variant);
                    }
                )+
                Err(crate::error::Error::Parse {
                    what: $what,
                    input: s.to_owned(),
                    expected: [$($name),+].join(", "),
                })
            }
        }

        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let text = <String as ::serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}
