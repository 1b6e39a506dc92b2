//! How a model's weights are stored.

/// A weight quantization scheme: the precision a card's weights are stored in.
///
/// [`QuantScheme::bits_per_param`] gives the bits one parameter takes, block scales
/// included; the fallback ladder uses it to tell a precision step (int8 -> int4) from
/// a size step (4B -> 2B), and [`estimate_bytes`](crate::estimate_bytes) to size the
/// weights. Names are case-insensitive (`Q4_1`, `q4_1`, `BF16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuantScheme {
    /// 32-bit floats (`f32`).
    F32,
    /// 16-bit IEEE floats (`f16`).
    F16,
    /// 16-bit brain floats (`bf16`).
    Bf16,
    /// GGML Q8_0: blocks of 32 int8 values with an f16 scale (`q8_0`).
    Q8_0,
    /// Weight-only int8 with per-channel scales (`int8`).
    Int8,
    /// GGML Q6_K (`q6_k`).
    Q6K,
    /// GGML Q5_K (`q5_k`, `q5_k_m`, `q5_k_s`).
    Q5K,
    /// GGML Q4_1: blocks of 32 4-bit values with an f16 scale and minimum (`q4_1`).
    Q4_1,
    /// GGML Q4_0: blocks of 32 4-bit values with an f16 scale (`q4_0`).
    Q4_0,
    /// GGML Q4_K (`q4_k`, `q4_k_m`, `q4_k_s`).
    Q4K,
    /// Grouped int4 with an f16 scale per group of 32 (`int4`).
    Int4,
    /// GGML Q3_K (`q3_k`, `q3_k_m`, ...).
    Q3K,
    /// GGML Q2_K (`q2_k`).
    Q2K,
}

named_enum!(QuantScheme, "quantization scheme", {
    F32 => "f32" | "fp32" | "float32",
    F16 => "f16" | "fp16" | "float16",
    Bf16 => "bf16" | "bfloat16",
    Q8_0 => "q8_0",
    Int8 => "int8" | "i8",
    Q6K => "q6_k",
    Q5K => "q5_k" | "q5_k_m" | "q5_k_s",
    Q4_1 => "q4_1",
    Q4_0 => "q4_0",
    Q4K => "q4_k" | "q4_k_m" | "q4_k_s",
    Int4 => "int4" | "i4",
    Q3K => "q3_k" | "q3_k_m" | "q3_k_s" | "q3_k_l",
    Q2K => "q2_k",
});

impl QuantScheme {
    /// Bits one parameter takes, scales included (the GGML block layouts' figures;
    /// int8 counts its per-channel scales as negligible).
    pub const fn bits_per_param(self) -> f64 {
        match self {
            QuantScheme::F32 => 32.0,
            QuantScheme::F16 | QuantScheme::Bf16 => 16.0,
            QuantScheme::Q8_0 => 8.5,
            QuantScheme::Int8 => 8.0,
            QuantScheme::Q6K => 6.5625,
            QuantScheme::Q5K => 5.5,
            QuantScheme::Q4_1 => 5.0,
            QuantScheme::Q4_0 | QuantScheme::Q4K | QuantScheme::Int4 => 4.5,
            QuantScheme::Q3K => 3.4375,
            QuantScheme::Q2K => 2.625,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        for &q in QuantScheme::ALL {
            assert_eq!(q.as_str().parse::<QuantScheme>().unwrap(), q);
        }
        assert_eq!("Q4_1".parse::<QuantScheme>().unwrap(), QuantScheme::Q4_1);
        assert_eq!("BF16".parse::<QuantScheme>().unwrap(), QuantScheme::Bf16);
        assert_eq!("q4_k_m".parse::<QuantScheme>().unwrap(), QuantScheme::Q4K);
        assert!("q9".parse::<QuantScheme>().is_err());
    }

    #[test]
    fn precision_order() {
        use QuantScheme::*;
        let chain = [F32, F16, Q8_0, Int8, Q4_1, Int4, Q2K];
        for pair in chain.windows(2) {
            assert!(
                pair[0].bits_per_param() > pair[1].bits_per_param(),
                "{pair:?}"
            );
        }
    }
}
