//! The weight storage schemes a linear layer can hold.

use std::fmt;
use std::str::FromStr;

use candle_core::DType;
use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};
use crate::kernels::IntFormat;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuantScheme {
    /// Dense f32.
    F32,
    /// Dense f16.
    F16,
    /// Dense bf16.
    BF16,
    /// A GGML block format, as stored in GGUF files.
    Ggml(GgmlDType),
    /// afo's int8 per-channel or int4 grouped weight-only format (TorchAO semantics).
    Int(IntFormat),
}

impl QuantScheme {
    /// The scheme of a dense dtype, when it is one of the supported ones.
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(QuantScheme::F32),
            DType::F16 => Some(QuantScheme::F16),
            DType::BF16 => Some(QuantScheme::BF16),
            _ => None,
        }
    }

    /// The scheme of a GGML type (`F32`/`F16`/`BF16` map to the dense schemes).
    pub fn from_ggml(dtype: GgmlDType) -> Self {
        match dtype {
            GgmlDType::F32 => QuantScheme::F32,
            GgmlDType::F16 => QuantScheme::F16,
            GgmlDType::BF16 => QuantScheme::BF16,
            other => QuantScheme::Ggml(other),
        }
    }

    /// The int8 per-channel scheme.
    pub const INT8: QuantScheme = QuantScheme::Int(IntFormat::Int8);

    /// Bits per weight, scales included (int8: the per-row scale is left out, as it
    /// depends on the row length; see [`matrix_bytes`](Self::matrix_bytes)).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            QuantScheme::F32 => 32.0,
            QuantScheme::F16 | QuantScheme::BF16 => 16.0,
            QuantScheme::Ggml(t) => t.type_size() as f64 * 8.0 / t.block_size() as f64,
            QuantScheme::Int(IntFormat::Int8) => 8.0,
            QuantScheme::Int(f @ IntFormat::Int4 { group, .. }) => {
                4.0 + 32.0 * (1.0 + f64::from(u8::from(f.has_mins()))) / group as f64
            }
        }
    }

    /// Bytes a `[n_out, k]` weight matrix takes in this scheme (rounded up to whole
    /// blocks for the GGML formats): the byte accounting of the memory estimator.
    pub fn matrix_bytes(self, n_out: usize, k: usize) -> u64 {
        let n = n_out as u64 * k as u64;
        match self {
            QuantScheme::F32 => 4 * n,
            QuantScheme::F16 | QuantScheme::BF16 => 2 * n,
            QuantScheme::Ggml(t) => {
                n_out as u64 * k.div_ceil(t.block_size()) as u64 * t.type_size() as u64
            }
            QuantScheme::Int(f) => f.matrix_bytes(n_out, k) as u64,
        }
    }

    /// Whether weights of this scheme are dense floats.
    pub fn is_dense(self) -> bool {
        matches!(
            self,
            QuantScheme::F32 | QuantScheme::F16 | QuantScheme::BF16
        )
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantScheme::F32 => f.write_str("F32"),
            QuantScheme::F16 => f.write_str("F16"),
            QuantScheme::BF16 => f.write_str("BF16"),
            QuantScheme::Ggml(t) => f.write_str(match t {
                GgmlDType::Q4_0 => "Q4_0",
                GgmlDType::Q4_1 => "Q4_1",
                GgmlDType::Q5_0 => "Q5_0",
                GgmlDType::Q5_1 => "Q5_1",
                GgmlDType::Q8_0 => "Q8_0",
                GgmlDType::Q8_1 => "Q8_1",
                GgmlDType::Q2K => "Q2_K",
                GgmlDType::Q3K => "Q3_K",
                GgmlDType::Q4K => "Q4_K",
                GgmlDType::Q5K => "Q5_K",
                GgmlDType::Q6K => "Q6_K",
                GgmlDType::Q8K => "Q8_K",
                GgmlDType::F32 => "F32",
                GgmlDType::F16 => "F16",
                GgmlDType::BF16 => "BF16",
            }),
            QuantScheme::Int(format) => format.fmt(f),
        }
    }
}

impl FromStr for QuantScheme {
    type Err = Error;

    /// `f32`, `f16`, `bf16`, `int8`, `int4`, `int4-g128`, `int4-g64-asym`, or a GGML
    /// type (`q8_0`, `q4_k`, ...), in any case.
    fn from_str(s: &str) -> Result<Self> {
        if s.trim().to_ascii_lowercase().starts_with("int") {
            return s
                .parse::<IntFormat>()
                .map(QuantScheme::Int)
                .map_err(|_| Error::UnknownScheme(s.to_owned()));
        }
        let t = match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "F32" => return Ok(QuantScheme::F32),
            "F16" => return Ok(QuantScheme::F16),
            "BF16" => return Ok(QuantScheme::BF16),
            "Q4_0" => GgmlDType::Q4_0,
            "Q4_1" => GgmlDType::Q4_1,
            "Q5_0" => GgmlDType::Q5_0,
            "Q5_1" => GgmlDType::Q5_1,
            "Q8_0" => GgmlDType::Q8_0,
            "Q2_K" | "Q2K" => GgmlDType::Q2K,
            "Q3_K" | "Q3K" => GgmlDType::Q3K,
            "Q4_K" | "Q4K" => GgmlDType::Q4K,
            "Q5_K" | "Q5K" => GgmlDType::Q5K,
            "Q6_K" | "Q6K" => GgmlDType::Q6K,
            "Q8_K" | "Q8K" => GgmlDType::Q8K,
            _ => return Err(Error::UnknownScheme(s.to_owned())),
        };
        Ok(QuantScheme::Ggml(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"] {
            assert_eq!(name.parse::<QuantScheme>().unwrap().to_string(), name);
        }
        for name in ["int8", "int4-g32", "int4-g128-asym"] {
            assert_eq!(name.parse::<QuantScheme>().unwrap().to_string(), name);
        }
        assert!("int4-g100".parse::<QuantScheme>().is_err());
        assert_eq!("INT8".parse::<QuantScheme>().unwrap(), QuantScheme::INT8);
        assert_eq!(QuantScheme::INT8.matrix_bytes(2, 64), 2 * 64 + 8);
        assert_eq!(
            "int4-g64-asym"
                .parse::<QuantScheme>()
                .unwrap()
                .bits_per_weight(),
            5.0
        );
        assert_eq!(
            QuantScheme::Ggml(GgmlDType::Q8_0).matrix_bytes(3, 64),
            3 * 2 * 34
        );
        assert!("Q9".parse::<QuantScheme>().is_err());
        assert_eq!(QuantScheme::Ggml(GgmlDType::Q4_1).bits_per_weight(), 5.0);
        assert_eq!(QuantScheme::Ggml(GgmlDType::Q8_0).bits_per_weight(), 8.5);
    }
}
