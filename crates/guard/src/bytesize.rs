//! Byte sizes as people write them: `20GiB`, `20GB`, `512MiB`, `1.5GB`, `1073741824`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A number of bytes, parsed from and shown in human units.
///
/// Decimal units are powers of 1000 (`KB`, `MB`, `GB`, `TB`), binary units powers of
/// 1024 (`KiB`, `MiB`, `GiB`, `TiB`); `K`, `M`, `G`, `T` alone are binary, as in most
/// memory settings. Case and spaces do not matter; a plain number is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl From<u64> for ByteSize {
    fn from(bytes: u64) -> Self {
        ByteSize(bytes)
    }
}

impl FromStr for ByteSize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let err = |reason| Error::ByteSize {
            input: s.to_owned(),
            reason,
        };
        let text: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(err("no number"));
        }
        let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            _ => return Err(err("unknown unit")),
        };
        if let Ok(n) = number.parse::<u64>() {
            return n
                .checked_mul(multiplier)
                .map(Self)
                .ok_or_else(|| err("too large"));
        }
        let n: f64 = number.parse().map_err(|_| err("not a number"))?;
        let bytes = (n * multiplier as f64).round();
        if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
            return Err(err("too large"));
        }
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    /// Binary units with two decimals (`20.00 GiB`), bytes below 1 KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut unit = "B";
        for u in UNITS {
            if value < 1024.0 {
                break;
            }
            value /= 1024.0;
            unit = u;
        }
        write!(f, "{value:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_binary_and_plain() {
        let p = |s: &str| s.parse::<ByteSize>().unwrap().0;
        assert_eq!(p("20GiB"), 20 << 30);
        assert_eq!(p("20GB"), 20_000_000_000);
        assert_eq!(p("20 gib"), 20 << 30);
        assert_eq!(p("512MiB"), 512 << 20);
        assert_eq!(p("1.5GB"), 1_500_000_000);
        assert_eq!(p("0.5GiB"), 1 << 29);
        assert_eq!(p("1073741824"), 1 << 30);
        assert_eq!(p("8G"), 8 << 30);
        assert_eq!(p("100b"), 100);
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "GB",
            "12XB",
            "1.2.3GB",
            "-5GB",
            "99999999999999999999TB",
        ] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn displays_binary_units() {
        assert_eq!(ByteSize::gib(20).to_string(), "20.00 GiB");
        assert_eq!(ByteSize(1536).to_string(), "1.50 KiB");
        assert_eq!(ByteSize(12).to_string(), "12 B");
    }
}
