//! Weight quantization for afo: the linear layer every decoder calls, and its kernels.
//!
//! [`QLinear`] is one linear type for every storage scheme ([`QuantScheme`]): dense
//! f32/f16/bf16 weights, afo's int8 per-channel and int4 grouped weight-only formats
//! ([`kernels::IntWeights`], TorchAO semantics), and the GGML block formats of GGUF
//! files. The int formats and Q4_0, Q4_1 and Q8_0 run on this crate's own [`kernels`]
//! (integer dot products with AVX-512 VNNI, AVX2 or portable code chosen at run time,
//! split across threads by output rows); the other GGML types run on candle's
//! quantized matmul. [`QLinear::quantize`] and [`QLinear::requantize`] convert weights
//! between schemes (a block of rows at a time, in parallel), [`QuantPolicy`] picks the
//! scheme of each weight by its [`TensorRole`], [`QLinear::rows`] is the embedding
//! lookup that dequantizes only the rows asked for, and [`QLinear::bytes`] /
//! [`QuantScheme::matrix_bytes`] the byte accounting the memory guard's estimator uses.
//!
//! # Example
//!
//! ```
//! use afo_quant::{QLinear, QuantScheme};
//! use candle_core::quantized::{GgmlDType, QTensor};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let w = Tensor::randn(0f32, 1.0, (64, 128), &Device::Cpu)?;
//! let layer = QLinear::from_qtensor("w", QTensor::quantize(&w, GgmlDType::Q8_0)?, None)?;
//! assert_eq!(layer.scheme(), QuantScheme::Ggml(GgmlDType::Q8_0));
//! let y = layer.forward(&Tensor::ones((3, 128), candle_core::DType::F32, &Device::Cpu)?)?;
//! assert_eq!(y.dims(), [3, 64]);
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! None yet; the kernels pick their instruction set at run time.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

mod error;
pub mod kernels;
mod linear;
mod policy;
mod scheme;
pub mod team;

pub use error::{Error, Result};
pub use linear::{KernelChoice, QLinear, WeightData, has_fast_kernel, in_place, read_f32};
pub use policy::{QuantPolicy, TensorRole};
pub use scheme::QuantScheme;
