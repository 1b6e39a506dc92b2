//! The linear layer every decoder calls, for every storage scheme.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Module, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{
    self, DenseData, DenseMatrix, DensePanels, GgmlWeights, IntFormat, IntWeights, PanelCoding,
    QuantizedActs, WeightDType,
};
use crate::scheme::QuantScheme;

/// Which matmul runs GGML-quantized weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KernelChoice {
    /// This crate's kernels where they exist (Q4_0, Q4_1, Q8_0), candle's otherwise.
    #[default]
    Fastest,
    /// candle's quantized matmul for every GGML type: the reference arithmetic.
    Candle,
}

/// `y = x · Wᵀ (+ b)` with `W` stored dense or quantized.
///
/// - Dense f32/f16/bf16 weights use this crate's dense kernels ([`kernels::dense_gemm`]);
///   an f32 weight whose every value is exactly a bf16 or an f16 (an upcast 16-bit
///   checkpoint) is kept in that type, half the bytes, with bit-identical products.
/// - GGML Q4_0, Q4_1 and Q8_0 weights use this crate's [`kernels`] (integer dot
///   products with run-time SIMD dispatch), straight from the GGUF bytes.
/// - Other GGML types (the k-quants) use candle's quantized matmul.
/// - afo's int8 per-channel and int4 grouped weights ([`IntWeights`]) use this crate's
///   integer kernels ([`kernels::gemm_int`]).
///
/// Inputs are `[..., in_features]` f32 tensors; outputs `[..., out_features]` f32.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

/// Output elements per parallel task of a bias addition.
const BIAS_TASK: usize = 1 << 14;

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// A declared-f32 weight held in the 16-bit dtype that stores every value exactly
    /// ([`exact_narrowing`]); computes as f32.
    Narrowed(Tensor),
    /// An f32 weight in the packed GEMM's panels ([`DensePanels`]), where this crate's
    /// dense kernels run every row count and the rows fill whole panels.
    Panels(DensePanels),
    Fast(GgmlWeights),
    Candle(QMatMul, GgmlDType),
    Int(IntWeights),
}

/// A borrowed view of a layer's stored weight, for writing it to a file.
#[derive(Debug)]
pub enum WeightData<'a> {
    /// Dense f32, f16 or bf16 `[out, in]`.
    Dense(&'a Tensor),
    /// A dense f32 `[out, in]` weight in the packed GEMM's panels: its rows come back
    /// with [`DensePanels::row`], the whole matrix with [`DensePanels::to_rows`].
    Panels(&'a DensePanels),
    /// A dense f32 `[out, in]` weight held in the 16-bit dtype that stores every one
    /// of its values exactly (bf16 or f16): its f32 values are `tensor.to_dtype(F32)`.
    Narrowed(&'a Tensor),
    /// GGML blocks, as in a GGUF file.
    Ggml {
        /// The GGML type.
        dtype: GgmlDType,
        /// The blocks, row-major.
        bytes: Cow<'a, [u8]>,
    },
    /// afo's integer formats.
    Int(&'a IntWeights),
}

/// Rows per task when quantizing in parallel.
const QUANTIZE_ROWS_PER_TASK: usize = 64;

/// Rows per block when converting a layer from one scheme to another.
const REQUANTIZE_ROWS: usize = 512;

fn shape_err(name: &str, reason: String) -> Error {
    Error::Shape {
        name: name.to_owned(),
        reason,
    }
}

impl QLinear {
    /// A layer over a dense `[out_features, in_features]` weight (f32, f16 or bf16).
    ///
    /// # Errors
    /// [`Error::Shape`] when the weight is not 2-D, has another dtype, or the bias
    /// does not match.
    pub fn dense(name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::dense_as(name, weight, bias, true)
    }

    /// [`QLinear::dense`]; with `layout` unset an f32 weight stays row-major instead
    /// of going into panels ([`DensePanels`]).
    fn dense_as(name: &str, weight: Tensor, bias: Option<Tensor>, layout: bool) -> Result<Self> {
        let (out_features, in_features) = weight
            .dims2()
            .map_err(|_| shape_err(name, format!("expected 2 dims, got {:?}", weight.dims())))?;
        if QuantScheme::from_dtype(weight.dtype()).is_none() {
            return Err(shape_err(
                name,
                format!("dtype {:?} is not f32, f16 or bf16", weight.dtype()),
            ));
        }
        Self::check_bias(name, bias.as_ref(), out_features)?;
        let weight = match exact_narrowing(&weight)? {
            Some(narrow) => Weight::Narrowed(narrow),
            None if layout && weight.dtype() == DType::F32 && panels_wanted(out_features) => {
                // A tensor not contiguous on the CPU stays as it is.
                match in_place(&weight, |v: &[f32]| {
                    DensePanels::from_rows(v, out_features, in_features)
                }) {
                    Ok(panels) => Weight::Panels(panels?),
                    Err(_) => Weight::Dense(weight),
                }
            }
            None => Weight::Dense(weight),
        };
        Ok(Self {
            weight,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            in_features,
            out_features,
        })
    }

    /// A layer over a quantized `[out_features, in_features]` weight from a GGUF file.
    /// F32/F16/BF16 "quantized" tensors become dense weights.
    ///
    /// # Errors
    /// [`Error::Shape`] when the tensor is not 2-D or the bias does not match.
    pub fn from_qtensor(name: &str, qtensor: QTensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_qtensor_with(name, qtensor, bias, KernelChoice::Fastest)
    }

    /// As [`QLinear::from_qtensor`], choosing which matmul runs quantized weights:
    /// [`KernelChoice::Candle`] makes every GGML type use candle's quantized matmul
    /// (the reference arithmetic of candle-transformers' models).
    ///
    /// # Errors
    /// As [`QLinear::from_qtensor`].
    pub fn from_qtensor_with(
        name: &str,
        qtensor: QTensor,
        bias: Option<Tensor>,
        kernels: KernelChoice,
    ) -> Result<Self> {
        let (out_features, in_features) = qtensor
            .shape()
            .dims2()
            .map_err(|_| shape_err(name, format!("expected 2 dims, got {:?}", qtensor.shape())))?;
        Self::check_bias(name, bias.as_ref(), out_features)?;
        let dtype = qtensor.dtype();
        let weight = match dtype {
            GgmlDType::F32 => match exact_narrowing_of(&qtensor, out_features, in_features)? {
                Some(narrow) => Weight::Narrowed(narrow),
                None if kernels == KernelChoice::Fastest
                    && qtensor.device().is_cpu()
                    && panels_wanted(out_features) =>
                {
                    Weight::Panels(DensePanels::from_le_bytes(
                        &qtensor.data()?,
                        out_features,
                        in_features,
                    )?)
                }
                None => Weight::Dense(qtensor.dequantize(&candle_core::Device::Cpu)?),
            },
            GgmlDType::F16 => Weight::Dense(
                qtensor
                    .dequantize(&candle_core::Device::Cpu)?
                    .to_dtype(DType::F16)?,
            ),
            GgmlDType::BF16 => Weight::Dense(
                qtensor
                    .dequantize(&candle_core::Device::Cpu)?
                    .to_dtype(DType::BF16)?,
            ),
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0
                if qtensor.device().is_cpu() && kernels == KernelChoice::Fastest =>
            {
                // Panels of sixteen rows where the AVX-512 VNNI kernel runs.
                Weight::Fast(GgmlWeights::from_qtensor_for(
                    &qtensor,
                    kernels::Kernel::detect(),
                )?)
            }
            other => Weight::Candle(QMatMul::from_qtensor(qtensor)?, other),
        };
        Ok(Self {
            weight,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            in_features,
            out_features,
        })
    }

    /// A layer over integer weights (a saved int8/int4 model).
    ///
    /// # Errors
    /// [`Error::Shape`] when the bias does not match.
    pub fn from_int(name: &str, weight: IntWeights, bias: Option<Tensor>) -> Result<Self> {
        Self::from_int_as(name, weight, bias, true)
    }

    /// [`QLinear::from_int`]; with `layout` unset the weights stay row-major instead of
    /// taking the layout the detected kernel reads fastest.
    fn from_int_as(
        name: &str,
        weight: IntWeights,
        bias: Option<Tensor>,
        layout: bool,
    ) -> Result<Self> {
        Self::check_bias(name, bias.as_ref(), weight.n_out())?;
        // Int8 in panels of sixteen rows where the AVX-512 VNNI kernel runs.
        let weight = if layout {
            weight.for_kernel(kernels::Kernel::detect())?
        } else {
            weight
        };
        Ok(Self {
            in_features: weight.k(),
            out_features: weight.n_out(),
            weight: Weight::Int(weight),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        })
    }

    /// Quantizes a dense `[out_features, in_features]` weight (any float dtype) into
    /// `scheme`, rows in parallel on the current rayon pool. Dense schemes convert the
    /// dtype; GGML types use candle's quantizer; int8/int4 use [`IntWeights::quantize`].
    ///
    /// # Errors
    /// [`Error::CannotQuantize`] naming the tensor when its row length does not fit the
    /// scheme's blocks or groups or it holds NaN or infinite values; [`Error::Shape`]
    /// for a weight that is not 2-D or a bias that does not match.
    pub fn quantize(
        name: &str,
        weight: &Tensor,
        bias: Option<Tensor>,
        scheme: QuantScheme,
    ) -> Result<Self> {
        Self::quantize_as(name, weight, bias, scheme, true)
    }

    /// [`QLinear::quantize`]; with `layout` unset, GGML and integer weights stay
    /// row-major (in candle's `QMatMul` for GGML types): for the blocks of rows
    /// [`requantize`](Self::requantize) joins, which are read back, never multiplied.
    fn quantize_as(
        name: &str,
        weight: &Tensor,
        bias: Option<Tensor>,
        scheme: QuantScheme,
        layout: bool,
    ) -> Result<Self> {
        let (n_out, k) = weight
            .dims2()
            .map_err(|_| shape_err(name, format!("expected 2 dims, got {:?}", weight.dims())))?;
        let cannot = |reason: String| Error::CannotQuantize {
            name: name.to_owned(),
            scheme,
            reason,
        };
        match scheme {
            QuantScheme::F32 => Self::dense_as(name, weight.to_dtype(DType::F32)?, bias, layout),
            QuantScheme::F16 => Self::dense_as(name, weight.to_dtype(DType::F16)?, bias, layout),
            QuantScheme::BF16 => Self::dense_as(name, weight.to_dtype(DType::BF16)?, bias, layout),
            QuantScheme::Ggml(t) => {
                if !k.is_multiple_of(t.block_size()) {
                    return Err(cannot(format!(
                        "its {k} columns are not a multiple of the {} block size {}",
                        scheme,
                        t.block_size()
                    )));
                }
                let q = QTensor::quantize(&weight.to_dtype(DType::F32)?, t)
                    .map_err(|e| cannot(e.to_string()))?;
                let kernels = if layout {
                    KernelChoice::Fastest
                } else {
                    KernelChoice::Candle
                };
                Self::from_qtensor_with(name, q, bias, kernels)
            }
            QuantScheme::Int(format) => {
                let w = weight
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let q = quantize_rows(format, &w, n_out, k).map_err(|e| cannot(e.to_string()))?;
                Self::from_int_as(name, q, bias, layout)
            }
        }
    }

    /// This layer's weight stored in another scheme, converted a block of rows at a
    /// time (in parallel on the current rayon pool): besides the source and the result,
    /// only the f32 rows of the blocks in flight are held, never the whole matrix in
    /// f32. Returns a clone when the scheme is already `scheme`.
    ///
    /// # Errors
    /// As [`QLinear::quantize`].
    pub fn requantize(&self, name: &str, scheme: QuantScheme) -> Result<Self> {
        if self.scheme() == scheme {
            return Ok(self.clone());
        }
        let (n_out, k) = (self.out_features, self.in_features);
        let bias = self.bias.clone();
        let chunks: Vec<std::ops::Range<usize>> = (0..n_out)
            .step_by(REQUANTIZE_ROWS)
            .map(|r| r..(r + REQUANTIZE_ROWS).min(n_out))
            .collect();
        let cannot = |reason: String| Error::CannotQuantize {
            name: name.to_owned(),
            scheme,
            reason,
        };
        // Blocks of rows converted in parallel, a batch of one block per thread at a
        // time, each batch appended to the result in the target's layout: the f32
        // rows in flight are at most one batch.
        let batch = rayon::current_num_threads().max(1);
        let mut dense = DenseRows::default();
        let mut bytes: Vec<u8> = Vec::new();
        let (mut quants, mut scales, mut mins) = (Vec::new(), Vec::new(), Vec::new());
        if let QuantScheme::Ggml(_) = scheme {
            bytes.reserve_exact(scheme.matrix_bytes(n_out, k) as usize);
        }
        for group in chunks.chunks(batch) {
            let parts = group
                .par_iter()
                .map(|rows| {
                    let ids: Vec<u32> = rows.clone().map(|r| r as u32).collect();
                    let w = self.rows(&ids)?;
                    Self::quantize_as(name, &w, None, scheme, false)
                })
                .collect::<Result<Vec<_>>>()?;
            for p in parts {
                match (&p.weight, p.weight_data()?) {
                    (Weight::Int(w), _) => {
                        quants.extend_from_slice(&w.quants()?);
                        scales.extend_from_slice(w.scales());
                        mins.extend_from_slice(w.mins());
                    }
                    (_, WeightData::Dense(t)) => dense.push(t)?,
                    (_, WeightData::Panels(p)) => dense.push(&Tensor::from_vec(
                        p.to_rows(),
                        (p.n_out(), p.k()),
                        &candle_core::Device::Cpu,
                    )?)?,
                    (_, WeightData::Narrowed(t)) => dense.push(&t.to_dtype(DType::F32)?)?,
                    (_, WeightData::Ggml { bytes: b, .. }) => bytes.extend_from_slice(&b),
                    (_, WeightData::Int(_)) => {
                        return Err(cannot("a block of rows was not converted".into()));
                    }
                }
            }
        }
        match scheme {
            QuantScheme::F32 | QuantScheme::F16 | QuantScheme::BF16 => {
                Self::dense(name, dense.into_tensor(n_out, k)?, bias)
            }
            QuantScheme::Ggml(dtype) => {
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &bytes,
                    vec![n_out, k],
                    &candle_core::Device::Cpu,
                )?;
                drop(bytes);
                Self::from_qtensor(name, q, bias)
            }
            QuantScheme::Int(format) => {
                let w = IntWeights::from_parts(format, n_out, k, quants, scales, mins)
                    .map_err(|e| cannot(e.to_string()))?;
                Self::from_int(name, w, bias)
            }
        }
    }

    /// The stored weight, borrowed where it can be.
    ///
    /// # Errors
    /// When candle cannot hand out a quantized tensor's bytes.
    pub fn weight_data(&self) -> Result<WeightData<'_>> {
        Ok(match &self.weight {
            Weight::Dense(w) => WeightData::Dense(w),
            Weight::Narrowed(w) => WeightData::Narrowed(w),
            Weight::Panels(p) => WeightData::Panels(p),
            Weight::Fast(w) => WeightData::Ggml {
                dtype: w.dtype().to_ggml(),
                bytes: w.row_major_bytes()?,
            },
            Weight::Candle(QMatMul::QTensor(t), dtype) => WeightData::Ggml {
                dtype: *dtype,
                bytes: Cow::Owned(t.data()?.into_owned()),
            },
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w), _) => WeightData::Dense(w),
            Weight::Int(w) => WeightData::Int(w),
        })
    }

    /// The bias, f32, when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn check_bias(name: &str, bias: Option<&Tensor>, out: usize) -> Result<()> {
        match bias {
            Some(b) if b.dims() != [out] => Err(shape_err(
                name,
                format!("bias has shape {:?}, expected [{out}]", b.dims()),
            )),
            _ => Ok(()),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The weight's storage scheme.
    pub fn scheme(&self) -> QuantScheme {
        match &self.weight {
            Weight::Dense(w) => QuantScheme::from_dtype(w.dtype()).unwrap_or(QuantScheme::F32),
            Weight::Narrowed(_) | Weight::Panels(_) => QuantScheme::F32,
            Weight::Fast(w) => QuantScheme::Ggml(w.dtype().to_ggml()),
            Weight::Candle(_, t) => QuantScheme::Ggml(*t),
            Weight::Int(w) => QuantScheme::Int(w.format()),
        }
    }

    /// Which code multiplies this layer's weight by `rows` activation rows, as a
    /// `bench` output names it: the format, then the kernel (`q8_0 avx2`, `q8_0 avx2
    /// packed` for a prompt, `f16 dense avx512vnni`, `f32 dense packed avx2`, `f32
    /// candle gemm` on CPUs without AVX2, `Q4K candle qmatmul`, `int8 avx2`, `q4_0
    /// avx512vnni panels`, and `q4_0 avx512vnni panels, amx tiles` for a prompt where
    /// the CPU has AMX tiles, [`kernels::amx_available`]; `f32 dense avx512vnni panels,
    /// amx bf16x6` where an f32 prompt runs on AMX-BF16 tiles). Int4's decode steps run the
    /// AVX2 code on AVX-512 machines, and say so; int8 there is in panels.
    pub fn kernel_path(&self, rows: usize) -> String {
        let best = kernels::Kernel::detect();
        match &self.weight {
            Weight::Fast(w) if w.in_panels() => {
                format!("{} {best} panels{}", w.dtype(), amx_tiles(rows))
            }
            Weight::Panels(p) if p.coding() == PanelCoding::Exponents => {
                format!("f32 dense {best} coded panels{}", bf16_tiles(rows))
            }
            Weight::Panels(_) => format!("f32 dense {best} panels{}", bf16_tiles(rows)),
            Weight::Fast(w) => with_packed(format!("{} {best}", w.dtype()), best, rows),
            Weight::Dense(w) if rows <= kernels::DENSE_ROWS_STREAM_MAX_ROWS => {
                format!("{} dense {best}", w.dtype().as_str())
            }
            Weight::Narrowed(w) if rows <= kernels::DENSE_ROWS_STREAM_MAX_ROWS => {
                format!("f32 as {} dense {best}", w.dtype().as_str())
            }
            Weight::Dense(w) if kernels::dense_packed_available() => {
                format!(
                    "{} dense packed {best}{}",
                    w.dtype().as_str(),
                    half_tiles(w, rows)
                )
            }
            Weight::Narrowed(w) => format!(
                "f32 as {} dense packed {best}{}",
                w.dtype().as_str(),
                half_tiles(w, rows)
            ),
            Weight::Dense(w) => format!("{} candle gemm", w.dtype().as_str()),
            Weight::Candle(_, t) => format!("{t:?} candle qmatmul"),
            Weight::Int(w) if w.in_panels() => {
                format!("{} {best} panels{}", w.format(), amx_tiles(rows))
            }
            Weight::Int(w) if kernels::prompt_runs_packed(best, rows) => {
                format!("{} {best} packed{}", w.format(), amx_tiles(rows))
            }
            Weight::Int(w) => format!("{} {}", w.format(), kernels::int_kernel_for(best)),
        }
    }

    /// Bytes the weight and bias keep resident.
    pub fn bytes(&self) -> u64 {
        let weight = match &self.weight {
            Weight::Dense(w) | Weight::Narrowed(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Panels(p) => p.bytes(),
            Weight::Fast(w) => w.bytes().len(),
            Weight::Candle(_, t) => {
                self.in_features * self.out_features / t.block_size() * t.type_size()
            }
            Weight::Int(w) => w.bytes(),
        };
        let bias = self.bias.as_ref().map_or(0, |b| b.elem_count() * 4);
        (weight + bias) as u64
    }

    /// Applies the layer to `[..., in_features]` f32 input.
    ///
    /// # Errors
    /// When the input's last dimension is not `in_features`, or a kernel fails.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_rows(x, false)
    }

    /// As [`QLinear::forward`], for rows that are independent sequences (a batched
    /// decode step): with GGML weights each row's result is bit-identical to
    /// forwarding that row alone ([`QuantizedActs::set_independent_rows`]), so batching
    /// never changes what a sequence generates. The integer formats keep the register
    /// tiles too, but their one-row loops sum in another order, and row-major dense
    /// weights beyond [`kernels::DENSE_ROWS_STREAM_MAX_ROWS`] rows run the packed GEMM:
    /// there a batch and one row may differ by f32 rounding (f32 panels run the same
    /// tiles for every row count, but for prompts on AMX-BF16 tiles).
    ///
    /// # Errors
    /// As [`QLinear::forward`].
    pub fn forward_sequences(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_rows(x, true)
    }

    fn forward_rows(&self, x: &Tensor, independent: bool) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(shape_err("input", "a scalar is not a matrix".into()));
        };
        if last != self.in_features {
            return Err(shape_err(
                "input",
                format!(
                    "last dimension is {last}, the layer takes {}",
                    self.in_features
                ),
            ));
        }
        let m: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features);
        let y = match &self.weight {
            Weight::Fast(w) => {
                let mut acts = with_f32(x, |xs| {
                    Ok(QuantizedActs::quantize(xs, m, self.in_features)?)
                })?;
                acts.set_independent_rows(independent);
                let mut ys = kernels::zeroed(m * self.out_features);
                kernels::gemm_quantized(w.matrix(), &acts, &mut ys)?;
                Tensor::from_vec(ys, out_dims, x.device())?
            }
            Weight::Dense(w) | Weight::Narrowed(w) => {
                match dense_gemv(w, x, m, self.out_features, self.in_features)? {
                    Some(ys) => Tensor::from_vec(ys, out_dims, x.device())?,
                    None => {
                        // candle multiplies in the weight's dtype: a narrowed weight
                        // is widened back, so that its products stay f32 ones.
                        let w = match &self.weight {
                            Weight::Narrowed(w) => Cow::Owned(w.to_dtype(DType::F32)?),
                            _ => Cow::Borrowed(w),
                        };
                        let x2 = x.reshape((m, self.in_features))?.to_dtype(w.dtype())?;
                        x2.matmul(&w.t()?)?
                            .to_dtype(DType::F32)?
                            .reshape(out_dims)?
                    }
                }
            }
            Weight::Panels(p) => {
                Tensor::from_vec(dense_rows(p.matrix(), x, m)?, out_dims, x.device())?
            }
            Weight::Candle(q, _) => {
                let x2 = x.reshape((m, self.in_features))?.to_dtype(DType::F32)?;
                q.forward(&x2)?.reshape(out_dims)?
            }
            Weight::Int(w) => {
                let mut acts = with_f32(x, |xs| {
                    Ok(QuantizedActs::quantize(xs, m, self.in_features)?)
                })?;
                acts.set_independent_rows(independent);
                let mut ys = kernels::zeroed(m * self.out_features);
                kernels::gemm_int(w, &acts, &mut ys)?;
                Tensor::from_vec(ys, out_dims, x.device())?
            }
        };
        self.add_bias(y)
    }

    /// `y` plus the bias, when the layer has one: on the current rayon pool for an
    /// f32 output and bias (candle's broadcast addition otherwise; the same bits).
    /// Candle runs an addition of 64K elements or more on a pool of its own, one
    /// thread per core whatever pool the caller runs on, whose threads spin after
    /// each call.
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        let Some(b) = &self.bias else {
            return Ok(y);
        };
        let pass = |ys: &[f32], bs: &[f32]| -> Option<Vec<f32>> {
            if bs.is_empty() || !ys.len().is_multiple_of(bs.len()) {
                return None;
            }
            let rows_per_task = (BIAS_TASK / bs.len()).max(1);
            let add_rows = |out: &mut [f32], src: &[f32]| {
                for (o, (x, c)) in out.iter_mut().zip(src.iter().zip(bs.iter().cycle())) {
                    *o = x + c;
                }
            };
            let mut out = kernels::zeroed(ys.len());
            if ys.len() <= BIAS_TASK {
                add_rows(&mut out, ys);
            } else {
                let task = rows_per_task * bs.len();
                out.par_chunks_mut(task)
                    .zip(ys.par_chunks(task))
                    .for_each(|(o, x)| add_rows(o, x));
            }
            Some(out)
        };
        let last = y.dims().last().copied();
        if last == Some(b.elem_count())
            && let Ok(Some(out)) = in_place(&y, |ys| in_place(b, |bs| pass(ys, bs)).ok().flatten())
        {
            return Ok(Tensor::from_vec(out, y.shape(), y.device())?);
        }
        Ok(y.broadcast_add(b)?)
    }

    /// Applies several layers to the same `[..., in_features]` input (a decoder
    /// layer's q, k and v, or gate and up): the same results as calling
    /// [`QLinear::forward`] on each, but when every weight is in a GGML block format
    /// (or every one in an integer format) the activations are quantized once, and
    /// when the input is one row or a batched decode step's few (up to
    /// [`kernels::DENSE_MANY_MAX_ROWS`]) the matrices run in one parallel region
    /// ([`kernels::gemm_quantized_many`], [`kernels::gemm_int_many`]; dense f32, f16
    /// and bf16 weights through [`kernels::dense_gemm_many`]).
    ///
    /// # Errors
    /// As [`QLinear::forward`].
    pub fn forward_many<const N: usize>(layers: [&QLinear; N], x: &Tensor) -> Result<[Tensor; N]> {
        Self::forward_many_rows(layers, x, false)
    }

    /// As [`QLinear::forward_many`], for rows that are independent sequences (see
    /// [`QLinear::forward_sequences`]).
    ///
    /// # Errors
    /// As [`QLinear::forward`].
    pub fn forward_many_sequences<const N: usize>(
        layers: [&QLinear; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        Self::forward_many_rows(layers, x, true)
    }

    fn forward_many_rows<const N: usize>(
        layers: [&QLinear; N],
        x: &Tensor,
        independent: bool,
    ) -> Result<[Tensor; N]> {
        Self::forward_slice(&layers, x, independent)?
            .try_into()
            .map_err(|v: Vec<Tensor>| {
                shape_err(
                    "forward_many",
                    format!("{} outputs for {N} layers", v.len()),
                )
            })
    }

    fn forward_slice(layers: &[&QLinear], x: &Tensor, independent: bool) -> Result<Vec<Tensor>> {
        let dims = x.dims();
        let k = dims.last().copied();
        // Every weight in a GGML block format, or every one in an integer format, over
        // the input's last dimension.
        let ggml: Option<Vec<&GgmlWeights>> = layers
            .iter()
            .map(|l| match &l.weight {
                Weight::Fast(w) if Some(l.in_features) == k => Some(w),
                _ => None,
            })
            .collect();
        let int: Option<Vec<&IntWeights>> = layers
            .iter()
            .map(|l| match &l.weight {
                Weight::Int(w) if Some(l.in_features) == k => Some(w),
                _ => None,
            })
            .collect();
        let output = |l: &QLinear, y: Vec<f32>| -> Result<Tensor> {
            let mut out_dims = dims.to_vec();
            if let Some(last) = out_dims.last_mut() {
                *last = l.out_features;
            }
            l.add_bias(Tensor::from_vec(y, out_dims, x.device())?)
        };
        if let (Some(k), Some((_, lead))) = (k, dims.split_last())
            && let Some(ys) = dense_many(layers, x, k, lead.iter().product())?
        {
            return layers.iter().zip(ys).map(|(l, y)| output(l, y)).collect();
        }
        let (Some(k), Some((_, lead)), true, true) = (
            k,
            dims.split_last(),
            x.device().is_cpu(),
            ggml.is_some() || int.is_some(),
        ) else {
            return layers
                .iter()
                .map(|l| l.forward_rows(x, independent))
                .collect();
        };
        let m: usize = lead.iter().product();
        let mut acts = with_f32(x, |xs| Ok(QuantizedActs::quantize(xs, m, k)?))?;
        acts.set_independent_rows(independent);
        let mut ys: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| kernels::zeroed(m * l.out_features))
            .collect();
        if let Some(weights) = ggml {
            let mut items: Vec<(kernels::GgmlMatrix<'_>, &mut [f32])> = weights
                .iter()
                .zip(ys.iter_mut())
                .map(|(w, y)| (w.matrix(), y.as_mut_slice()))
                .collect();
            kernels::gemm_quantized_many(&mut items, &acts)?;
        } else if let Some(weights) = int {
            let mut items: Vec<(&IntWeights, &mut [f32])> = weights
                .into_iter()
                .zip(ys.iter_mut())
                .map(|(w, y)| (w, y.as_mut_slice()))
                .collect();
            kernels::gemm_int_many(&mut items, &acts)?;
        }
        layers.iter().zip(ys).map(|(l, y)| output(l, y)).collect()
    }

    /// The rows `ids` of the weight as f32 `[ids.len(), in_features]`: an embedding
    /// lookup that dequantizes only the rows asked for.
    ///
    /// # Errors
    /// When an id is out of range.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.out_features) {
            return Err(shape_err(
                "embedding",
                format!(
                    "token id {bad} is out of range (vocabulary {})",
                    self.out_features
                ),
            ));
        }
        let device = candle_core::Device::Cpu;
        match &self.weight {
            Weight::Fast(w) => {
                let m = w.matrix();
                let mut out = vec![0f32; ids.len() * self.in_features];
                for (row, chunk) in ids.iter().zip(out.chunks_exact_mut(self.in_features)) {
                    m.dequantize_row(*row as usize, chunk)?;
                }
                Ok(Tensor::from_vec(
                    out,
                    (ids.len(), self.in_features),
                    &device,
                )?)
            }
            Weight::Dense(w) | Weight::Narrowed(w) => {
                let idx = Tensor::new(ids, w.device())?;
                Ok(w.index_select(&idx, 0)?.to_dtype(DType::F32)?)
            }
            Weight::Panels(p) => {
                let mut out = vec![0f32; ids.len() * self.in_features];
                for (&id, chunk) in ids.iter().zip(out.chunks_exact_mut(self.in_features)) {
                    p.row(id as usize, chunk)?;
                }
                Ok(Tensor::from_vec(
                    out,
                    (ids.len(), self.in_features),
                    &device,
                )?)
            }
            Weight::Candle(QMatMul::QTensor(t), dtype) => {
                // Gather the rows' blocks and dequantize only those.
                let row_bytes = self.in_features / dtype.block_size() * dtype.type_size();
                let data = t.data()?;
                let mut picked = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let start = id as usize * row_bytes;
                    let row = data.get(start..start + row_bytes).ok_or_else(|| {
                        shape_err(
                            "embedding",
                            format!("row {id} lies outside the weight's {} bytes", data.len()),
                        )
                    })?;
                    picked.extend_from_slice(row);
                }
                let rows = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    *dtype,
                    &picked,
                    vec![ids.len(), self.in_features],
                    &device,
                )?;
                Ok(rows.dequantize(&device)?)
            }
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w), _) => {
                let idx = Tensor::new(ids, w.device())?;
                Ok(w.index_select(&idx, 0)?.to_dtype(DType::F32)?)
            }
            Weight::Int(w) => {
                let mut out = vec![0f32; ids.len() * self.in_features];
                for (&id, chunk) in ids.iter().zip(out.chunks_exact_mut(self.in_features)) {
                    let r = id as usize;
                    w.dequantize_rows(r..r + 1, chunk)?;
                }
                Ok(Tensor::from_vec(
                    out,
                    (ids.len(), self.in_features),
                    &device,
                )?)
            }
        }
    }

    /// The whole weight as dense f32 `[out_features, in_features]`.
    ///
    /// # Errors
    /// When dequantization fails.
    pub fn dequantize(&self) -> Result<Tensor> {
        let device = candle_core::Device::Cpu;
        Ok(match &self.weight {
            Weight::Dense(w) | Weight::Narrowed(w) => w.to_dtype(DType::F32)?,
            Weight::Panels(p) => {
                Tensor::from_vec(p.to_rows(), (self.out_features, self.in_features), &device)?
            }
            Weight::Fast(w) => Tensor::from_vec(
                w.dequantize()?,
                (self.out_features, self.in_features),
                &device,
            )?,
            Weight::Candle(QMatMul::QTensor(t), _) => t.dequantize(&device)?,
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t), _) => {
                t.to_dtype(DType::F32)?
            }
            Weight::Int(w) => Tensor::from_vec(
                w.dequantize(),
                (self.out_features, self.in_features),
                &device,
            )?,
        })
    }
}

/// The 16-bit copy of an f32 weight that holds every one of its values exactly, where
/// this crate's dense kernels run every row count (AVX2, FMA and F16C:
/// [`kernels::dense_packed_available`]); `None` for any other weight, or where a
/// prompt would go to candle's GEMM, which would multiply in the narrow dtype.
///
/// A bf16 is the top half of an f32, so an f32 whose low 16 bits are all zero is a
/// bf16 (a checkpoint published in bf16 and converted to f32, as most are); otherwise
/// every value must come back from f16 with the same bits. The dense kernels widen
/// each element to that same f32 before the same FMA chain, so every product, and
/// every output, is bit-identical to the f32 weight's (tested), at half the bytes per
/// decode step. The scan stops at the first value that does not fit.
///
/// # Errors
/// When candle cannot build the narrowed tensor.
fn exact_narrowing(w: &Tensor) -> Result<Option<Tensor>> {
    if w.dtype() != DType::F32 {
        return Ok(None);
    }
    let Ok((n_out, k)) = w.dims2() else {
        return Ok(None);
    };
    match in_place(w, |v: &[f32]| narrowed_rows(v, |x| x.to_bits())) {
        Ok(Some(rows)) => Ok(Some(rows.into_tensor(n_out, k)?)),
        Ok(None) | Err(_) => Ok(None),
    }
}

/// [`exact_narrowing`] of a GGUF f32 tensor, read from its bytes in place (no f32 copy
/// of the matrix first).
fn exact_narrowing_of(q: &QTensor, n_out: usize, k: usize) -> Result<Option<Tensor>> {
    if q.dtype() != GgmlDType::F32 || !q.device().is_cpu() {
        return Ok(None);
    }
    let data = q.data()?;
    let (words, rest) = data.as_chunks::<4>();
    if !rest.is_empty() || words.len() != n_out * k {
        return Ok(None);
    }
    match narrowed_rows(words, |b| u32::from_ne_bytes(*b)) {
        Some(rows) => Ok(Some(rows.into_tensor(n_out, k)?)),
        None => Ok(None),
    }
}

/// The values of `v` (f32s, as their bits) in bf16 or f16 when that type holds every
/// one exactly, where the dense kernels run every row count; `None` otherwise. Parallel,
/// and the scan stops at the first value that does not fit.
fn narrowed_rows<T: Sync>(v: &[T], bits: impl Fn(&T) -> u32 + Sync) -> Option<DenseRows> {
    const CHUNK: usize = 1 << 16;
    if !kernels::dense_packed_available() {
        return None;
    }
    let f32_of = |x: &T| f32::from_bits(bits(x));
    let is_bf16 = |x: &T| bits(x) & 0xffff == 0;
    let is_f16 = |x: &T| {
        let f = f32_of(x);
        half::f16::from_f32(f).to_f32().to_bits() == f.to_bits()
    };
    if v.par_chunks(CHUNK).all(|c| c.iter().all(is_bf16)) {
        let top = |x: &T| half::bf16::from_bits((bits(x) >> 16) as u16);
        Some(DenseRows::BF16(v.par_iter().map(top).collect()))
    } else if v.par_chunks(CHUNK).all(|c| c.iter().all(is_f16)) {
        let f16 = |x: &T| half::f16::from_f32(f32_of(x));
        Some(DenseRows::F16(v.par_iter().map(f16).collect()))
    } else {
        None
    }
}

/// Whether an f32 weight of `n_out` rows goes into panels ([`DensePanels`]): its rows
/// fill whole panels and this crate's dense kernels run every row count here
/// ([`kernels::dense_packed_available`]; elsewhere a prompt goes to candle's GEMM,
/// which reads row-major tensors).
fn panels_wanted(n_out: usize) -> bool {
    DensePanels::fits(n_out) && kernels::dense_packed_available()
}

/// `path`, with ` packed` when a prompt of `rows` through `kernel` takes the packed
/// kernel ([`kernels::prompt_runs_packed`]).
fn with_packed(path: String, kernel: kernels::Kernel, rows: usize) -> String {
    if kernels::prompt_runs_packed(kernel, rows) {
        format!("{path} packed{}", amx_tiles(rows))
    } else {
        path
    }
}

/// What a kernel path adds when products of `rows` rows over panels (loaded, or packed
/// per call) run on AMX tiles.
fn amx_tiles(rows: usize) -> &'static str {
    if rows >= kernels::AMX_MIN_ROWS && kernels::amx_available() {
        ", amx tiles"
    } else {
        ""
    }
}

/// What a kernel path adds when a prompt of `rows` rows over f32 panels runs on
/// AMX-BF16 tiles, six bf16 products per f32 product ([`kernels::dense_runs_bf16x6`]).
fn bf16_tiles(rows: usize) -> &'static str {
    if kernels::dense_runs_bf16x6(rows) {
        ", amx bf16x6"
    } else {
        ""
    }
}

/// What a kernel path adds for a dense f16 or bf16 weight whose prompt of `rows` rows
/// runs on AMX-BF16 tiles ([`kernels::dense_rows_run_bf16_tiles`]): five passes for
/// f16, three for bf16; nothing for other types.
fn half_tiles(w: &Tensor, rows: usize) -> String {
    let passes = match w.dtype() {
        DType::F16 => 5,
        DType::BF16 => 3,
        _ => return String::new(),
    };
    match w.dims2() {
        Ok((n_out, k)) if kernels::dense_rows_run_bf16_tiles(n_out, k, rows) => {
            format!(", amx bf16x{passes}")
        }
        _ => String::new(),
    }
}

/// `x · wᵀ` for a dense CPU weight through [`kernels::dense_gemm`]: its row kernel up
/// to [`kernels::DENSE_ROWS_STREAM_MAX_ROWS`] rows (a decode step, a batch), its packed
/// GEMM beyond (where the CPU has AVX2); `None` where candle's GEMM runs it instead
/// (more than [`kernels::DENSE_GEMV_MAX_ROWS`] rows without AVX2, a weight not
/// contiguous in CPU memory).
fn dense_gemv(
    w: &Tensor,
    x: &Tensor,
    m: usize,
    n_out: usize,
    k: usize,
) -> Result<Option<Vec<f32>>> {
    if !dense_rows_ok(m) || !x.device().is_cpu() {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some(data) = dense_data(&storage, layout) else {
        return Ok(None);
    };
    Ok(Some(dense_rows(DenseMatrix::new(data, n_out, k)?, x, m)?))
}

/// Whether afo's dense kernels take `m` rows: a few always, more where the packed
/// GEMM runs ([`kernels::dense_packed_available`]; otherwise candle multiplies them).
fn dense_rows_ok(m: usize) -> bool {
    m <= kernels::DENSE_GEMV_MAX_ROWS || kernels::dense_packed_available()
}

/// `x · wᵀ` for `m` rows through [`kernels::dense_gemm`].
fn dense_rows(w: DenseMatrix<'_>, x: &Tensor, m: usize) -> Result<Vec<f32>> {
    let mut ys = kernels::zeroed(m * w.n_out());
    with_f32(x, |xs| Ok(kernels::dense_gemm(w, xs, m, &mut ys)?))?;
    Ok(ys)
}

/// The elements of a dense weight's storage as this crate's kernels read them: a
/// contiguous f32, f16 or bf16 CPU buffer; `None` for anything else.
fn dense_data<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<DenseData<'a>> {
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (storage, layout.contiguous_offsets())
    else {
        return None;
    };
    match cpu {
        CpuStorage::F32(v) => v.get(start..end).map(DenseData::F32),
        CpuStorage::F16(v) => v.get(start..end).map(DenseData::F16),
        CpuStorage::BF16(v) => v.get(start..end).map(DenseData::BF16),
        _ => None,
    }
}

/// A few activation rows (one, or a batched decode step's) times several dense layers
/// as one parallel region ([`kernels::dense_gemm_many`]); `None` when a layer is not a
/// dense CPU weight over `k` inputs, or `x` is a prompt's rows or not on the CPU (the
/// caller then runs the layers one by one).
fn dense_many(
    layers: &[&QLinear],
    x: &Tensor,
    k: usize,
    m: usize,
) -> Result<Option<Vec<Vec<f32>>>> {
    if m == 0 || m > kernels::DENSE_MANY_MAX_ROWS || !dense_rows_ok(m) || !x.device().is_cpu() {
        return Ok(None);
    }
    if layers.iter().any(|l| l.in_features != k) {
        return Ok(None);
    }
    // Each tensor's storage stays borrowed while its matrix is read.
    let guards: Vec<_> = layers
        .iter()
        .map(|l| match &l.weight {
            Weight::Dense(w) | Weight::Narrowed(w) => Some(w.storage_and_layout()),
            _ => None,
        })
        .collect();
    let mut matrices = Vec::with_capacity(layers.len());
    for (guard, l) in guards.iter().zip(layers) {
        let matrix = match (guard, &l.weight) {
            (Some((storage, layout)), _) => match dense_data(storage, layout) {
                Some(data) => DenseMatrix::new(data, l.out_features, k)?,
                None => return Ok(None),
            },
            (None, Weight::Panels(p)) => p.matrix(),
            _ => return Ok(None),
        };
        matrices.push(matrix);
    }
    let mut ys: Vec<Vec<f32>> = layers
        .iter()
        .map(|l| kernels::zeroed(m * l.out_features))
        .collect();
    let mut items: Vec<(DenseMatrix<'_>, &mut [f32])> = matrices
        .into_iter()
        .zip(ys.iter_mut())
        .map(|(w, y)| (w, y.as_mut_slice()))
        .collect();
    with_f32(x, |xs| Ok(kernels::dense_gemm_many(&mut items, xs, m)?))?;
    Ok(Some(ys))
}

/// Runs `f` over all of `x`'s elements as one f32 slice: read in place when `x` is a
/// contiguous f32 CPU tensor (a layer's input, most of the time), otherwise through a
/// converted copy.
///
/// # Errors
/// The conversion's, for a tensor not read in place.
pub fn read_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    match in_place(x, f) {
        Ok(r) => Ok(r),
        Err(f) => Ok(f(&x
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)),
    }
}

/// [`read_f32`] for an `f` that can fail.
fn with_f32<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    read_f32(x, f)?
}

/// Runs `f` over all of `x`'s elements in place, as one slice of `T`, when `x` is a
/// contiguous CPU tensor of `T`; otherwise gives `f` back uncalled. The one way afo
/// reads a tensor's buffer without copying it.
///
/// # Errors
/// `Err(f)` for a tensor not on the CPU, not of type `T`, or not contiguous.
pub fn in_place<T, R, F>(x: &Tensor, f: F) -> std::result::Result<R, F>
where
    T: candle_core::WithDType,
    F: FnOnce(&[T]) -> R,
{
    let (storage, layout) = x.storage_and_layout();
    let slice = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            cpu.as_slice::<T>().ok().and_then(|v| v.get(start..end))
        }
        _ => None,
    };
    match slice {
        Some(xs) => Ok(f(xs)),
        None => Err(f),
    }
}

/// Dense rows appended in their dtype, to become one tensor without another copy.
#[derive(Default)]
enum DenseRows {
    #[default]
    Empty,
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl DenseRows {
    fn push(&mut self, t: &Tensor) -> Result<()> {
        let flat = t.flatten_all()?;
        match (&mut *self, t.dtype()) {
            (DenseRows::F32(v), DType::F32) => v.extend(flat.to_vec1::<f32>()?),
            (DenseRows::F16(v), DType::F16) => v.extend(flat.to_vec1::<half::f16>()?),
            (DenseRows::BF16(v), DType::BF16) => v.extend(flat.to_vec1::<half::bf16>()?),
            (DenseRows::Empty, DType::F16) => *self = DenseRows::F16(flat.to_vec1()?),
            (DenseRows::Empty, DType::BF16) => *self = DenseRows::BF16(flat.to_vec1()?),
            (DenseRows::Empty, _) => *self = DenseRows::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
            (_, other) => {
                return Err(shape_err(
                    "requantize",
                    format!("blocks of rows came back as {other:?} and another dtype"),
                ));
            }
        }
        Ok(())
    }

    fn into_tensor(self, n_out: usize, k: usize) -> Result<Tensor> {
        let dev = candle_core::Device::Cpu;
        Ok(match self {
            DenseRows::F32(v) => Tensor::from_vec(v, (n_out, k), &dev)?,
            DenseRows::F16(v) => Tensor::from_vec(v, (n_out, k), &dev)?,
            DenseRows::BF16(v) => Tensor::from_vec(v, (n_out, k), &dev)?,
            DenseRows::Empty => Tensor::zeros((n_out, k), DType::F32, &dev)?,
        })
    }
}

/// [`IntWeights::quantize`] over blocks of rows in parallel, the parts joined.
fn quantize_rows(
    format: IntFormat,
    w: &[f32],
    n_out: usize,
    k: usize,
) -> std::result::Result<IntWeights, kernels::Error> {
    if n_out <= QUANTIZE_ROWS_PER_TASK || k == 0 {
        return IntWeights::quantize(format, w, n_out, k);
    }
    let parts = w
        .par_chunks(QUANTIZE_ROWS_PER_TASK * k)
        .enumerate()
        .map(|(i, rows)| {
            IntWeights::quantize(format, rows, rows.len() / k, k).map_err(|e| match e {
                kernels::Error::NonFinite { row, col } => kernels::Error::NonFinite {
                    row: row + i * QUANTIZE_ROWS_PER_TASK,
                    col,
                },
                e => e,
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let (mut quants, mut scales, mut mins) = (Vec::new(), Vec::new(), Vec::new());
    for p in &parts {
        quants.extend_from_slice(&p.quants()?);
        scales.extend_from_slice(p.scales());
        mins.extend_from_slice(p.mins());
    }
    drop(parts);
    IntWeights::from_parts(format, n_out, k, quants, scales, mins)
}

/// Whether this crate's own kernels run a GGML type.
pub fn has_fast_kernel(dtype: GgmlDType) -> bool {
    WeightDType::from_ggml(dtype).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((x >> 8) % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn reference(w: &Tensor, x: &Tensor) -> Vec<f32> {
        x.matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn every_scheme_matches_dequantize_then_matmul() {
        let dev = Device::Cpu;
        for (out, inp, m) in [(17, 64, 1), (3, 96, 5), (192, 576, 2), (1, 32, 3)] {
            let w = Tensor::from_vec(data(out * inp, 1), (out, inp), &dev).unwrap();
            let x = Tensor::from_vec(data(m * inp, 7), (m, inp), &dev).unwrap();
            for t in [
                GgmlDType::F32,
                GgmlDType::F16,
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
            ] {
                let q = QTensor::quantize(&w, t).unwrap();
                let deq = q.dequantize(&dev).unwrap();
                let layer = QLinear::from_qtensor("w", q, None).unwrap();
                assert_eq!(layer.in_features(), inp);
                assert_eq!(layer.scheme(), QuantScheme::from_ggml(t));
                let y: Vec<f32> = layer
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = reference(&deq, &x);
                // Activation quantization (8 bits per block of 32) bounds the error.
                let tol = 0.02 * (inp as f32).sqrt();
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= tol, "{t:?} {out}x{inp} m={m}: {a} vs {b}");
                }
            }
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The bias is added on the caller's pool with candle's bits: rows past a task
    /// (split among threads) and a short output, dense and GGML weights.
    #[test]
    fn the_bias_is_candles_broadcast_addition_bit_for_bit_on_any_pool() {
        let dev = Device::Cpu;
        let (inp, out) = (64, 96);
        let w = Tensor::from_vec(data(out * inp, 1), (out, inp), &dev).unwrap();
        let bias = Tensor::from_vec(data(out, 2), out, &dev).unwrap();
        let layers = [
            (
                QLinear::quantize("d", &w, Some(bias.clone()), QuantScheme::F32).unwrap(),
                QLinear::quantize("d", &w, None, QuantScheme::F32).unwrap(),
            ),
            (
                QLinear::from_qtensor(
                    "q",
                    QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(),
                    Some(bias.clone()),
                )
                .unwrap(),
                QLinear::from_qtensor("q", QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), None)
                    .unwrap(),
            ),
        ];
        for (with, without) in &layers {
            for m in [1, 3 * (BIAS_TASK / out) + 5] {
                let x = Tensor::from_vec(data(m * inp, 3), (m, inp), &dev).unwrap();
                let want = values(&without.forward(&x).unwrap().broadcast_add(&bias).unwrap());
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let got = values(&pool.install(|| with.forward(&x)).unwrap());
                    assert_eq!(got.len(), m * out);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "m={m}, {threads} threads: not candle's sums"
                    );
                }
            }
        }
    }

    #[test]
    fn forward_many_equals_separate_forwards() {
        let dev = Device::Cpu;
        let (inp, outs) = (128, [96, 32, 40]);
        let layers: Vec<QLinear> = outs
            .iter()
            .zip([GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0])
            .enumerate()
            .map(|(i, (&out, t))| {
                let w = Tensor::from_vec(data(out * inp, i as u32), (out, inp), &dev).unwrap();
                let bias = Tensor::from_vec(data(out, 9), out, &dev).unwrap();
                QLinear::from_qtensor("w", QTensor::quantize(&w, t).unwrap(), Some(bias)).unwrap()
            })
            .collect();
        let refs = [&layers[0], &layers[1], &layers[2]];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for m in [1, 3] {
            let x = Tensor::from_vec(data(m * inp, 4), (m, inp), &dev).unwrap();
            let fused = pool.install(|| QLinear::forward_many(refs, &x)).unwrap();
            assert_eq!(fused.len(), 3);
            for (l, y) in layers.iter().zip(&fused) {
                assert_eq!(y.dims(), &[m, l.out_features()]);
                assert_eq!(values(y), values(&l.forward(&x).unwrap()), "m = {m}");
            }
        }
        // Integer formats: int8 for all three, then int4 groups beside int8 (mixed
        // formats run one by one), the same results as separate forwards.
        let x = Tensor::from_vec(data(inp, 6), (1, inp), &dev).unwrap();
        for schemes in [
            ["int8", "int8", "int8"],
            ["int4-g32", "int8", "int4-g32-asym"],
        ] {
            let ints: Vec<QLinear> = schemes
                .iter()
                .zip(outs)
                .map(|(name, out)| {
                    let w = Tensor::from_vec(data(out * inp, 2), (out, inp), &dev).unwrap();
                    QLinear::quantize("w", &w, None, name.parse().unwrap()).unwrap()
                })
                .collect();
            let fused = pool
                .install(|| QLinear::forward_many([&ints[0], &ints[1], &ints[2]], &x))
                .unwrap();
            for (l, y) in ints.iter().zip(&fused) {
                assert_eq!(values(y), values(&l.forward(&x).unwrap()), "{schemes:?}");
            }
        }
        // Dense layers (f32, f16, bf16, with and without a bias): one row in one
        // parallel region, more rows one by one, the same results as separate
        // forwards.
        for scheme in [QuantScheme::F32, QuantScheme::F16, QuantScheme::BF16] {
            let dense: Vec<QLinear> = outs
                .iter()
                .enumerate()
                .map(|(i, &out)| {
                    let w =
                        Tensor::from_vec(data(out * inp, 20 + i as u32), (out, inp), &dev).unwrap();
                    let bias = (i == 1).then(|| Tensor::from_vec(data(out, 8), out, &dev).unwrap());
                    QLinear::quantize("w", &w, bias, scheme).unwrap()
                })
                .collect();
            for m in [1, 3] {
                let x = Tensor::from_vec(data(m * inp, 7), (m, inp), &dev).unwrap();
                let fused = pool
                    .install(|| QLinear::forward_many([&dense[0], &dense[1], &dense[2]], &x))
                    .unwrap();
                for (l, y) in dense.iter().zip(&fused) {
                    assert_eq!(y.dims(), &[m, l.out_features()]);
                    assert_eq!(
                        values(y),
                        values(&l.forward(&x).unwrap()),
                        "{scheme:?} m = {m}"
                    );
                }
            }
            let bad = Tensor::zeros((1, 64), DType::F32, &dev).unwrap();
            assert!(QLinear::forward_many([&dense[0], &dense[1]], &bad).is_err());
        }
        // A wrong inner dimension is the same error as a single forward's.
        let bad = Tensor::zeros((1, 64), DType::F32, &dev).unwrap();
        assert!(QLinear::forward_many(refs, &bad).is_err());
        // Mixed with a dense layer: each runs on its own, same results.
        let dense = QLinear::quantize(
            "d",
            &Tensor::from_vec(data(8 * inp, 3), (8, inp), &dev).unwrap(),
            None,
            QuantScheme::F32,
        )
        .unwrap();
        let x = Tensor::from_vec(data(inp, 5), (1, inp), &dev).unwrap();
        let mixed = QLinear::forward_many([&layers[0], &dense], &x).unwrap();
        assert_eq!(values(&mixed[1]), values(&dense.forward(&x).unwrap()));
    }

    #[test]
    fn quantized_layers_match_their_dequantized_weights() {
        let dev = Device::Cpu;
        for (out, inp, m) in [(130, 128, 1), (7, 256, 4), (200, 64, 2)] {
            let w = Tensor::from_vec(data(out * inp, 5), (out, inp), &dev).unwrap();
            let x = Tensor::from_vec(data(m * inp, 8), (m, inp), &dev).unwrap();
            for name in [
                "int8",
                "int4-g32",
                "int4-g64-asym",
                "q8_0",
                "q4_k",
                "f16",
                "bf16",
            ] {
                let scheme: QuantScheme = name.parse().unwrap();
                if let QuantScheme::Int(IntFormat::Int4 { group, .. }) = scheme
                    && inp % group != 0
                {
                    continue;
                }
                if scheme == QuantScheme::Ggml(GgmlDType::Q4K) && inp % 256 != 0 {
                    continue;
                }
                let layer = QLinear::quantize("w", &w, None, scheme).unwrap();
                assert_eq!(layer.scheme(), scheme, "{name}");
                assert_eq!(
                    layer.bytes(),
                    scheme.matrix_bytes(out, inp),
                    "{name}: bytes"
                );
                let deq = layer.dequantize().unwrap();
                // The stored weights are close to the originals...
                let werr = (&deq - &w)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let step = match scheme {
                    QuantScheme::Int(IntFormat::Int8) => 1.0 / 127.0,
                    QuantScheme::F16 | QuantScheme::BF16 => 1.0 / 128.0,
                    QuantScheme::Ggml(GgmlDType::Q8_0) => 1.0 / 127.0,
                    _ => 2.0 / 15.0,
                };
                assert!(werr <= step * 0.55 + 1e-6, "{name}: weight error {werr}");
                // ...and the layer computes with exactly those.
                let y: Vec<f32> = layer
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = reference(&deq, &x);
                let tol = 0.02 * (inp as f32).sqrt();
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= tol, "{name} {out}x{inp} m={m}: {a} vs {b}");
                }
                let rows = layer.rows(&[3, 0]).unwrap();
                let picked = deq
                    .index_select(&Tensor::new(&[3u32, 0], &dev).unwrap(), 0)
                    .unwrap();
                let diff = (rows - picked)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{name}: rows");
                assert!(matches!(
                    (layer.weight_data().unwrap(), scheme.is_dense()),
                    (WeightData::Dense(_), true)
                        | (WeightData::Ggml { .. } | WeightData::Int(_), false)
                ));
            }
        }
    }

    #[test]
    fn requantizing_equals_quantizing_the_dequantized_weight() {
        let dev = Device::Cpu;
        // More rows than one block, and a last block that is not full.
        let (out, inp) = (1100, 64);
        let w = Tensor::from_vec(data(out * inp, 4), (out, inp), &dev).unwrap();
        let b = Tensor::from_vec(data(out, 6), out, &dev).unwrap();
        let src = QLinear::quantize("w", &w, Some(b), "q4_1".parse().unwrap()).unwrap();
        let deq = src.dequantize().unwrap();
        for name in ["int8", "int4-g64-asym", "q8_0", "f16", "f32"] {
            let scheme: QuantScheme = name.parse().unwrap();
            let direct = QLinear::quantize("w", &deq, None, scheme).unwrap();
            let re = src.requantize("w", scheme).unwrap();
            assert_eq!(re.scheme(), scheme);
            assert_eq!(re.bytes(), direct.bytes() + out as u64 * 4, "{name}");
            let (a, b) = (re.dequantize().unwrap(), direct.dequantize().unwrap());
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
            assert!(re.bias().is_some());
        }
    }

    #[test]
    fn tensors_that_do_not_fit_a_scheme_are_named_errors() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(data(4 * 96, 1), (4, 96), &dev).unwrap();
        let err = QLinear::quantize("blk.0.ffn_up.weight", &w, None, "int4-g64".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blk.0.ffn_up.weight") && err.contains("64"),
            "{err}"
        );
        let small = Tensor::from_vec(data(4 * 8, 1), (4, 8), &dev).unwrap();
        let err = QLinear::quantize("tiny", &small, None, QuantScheme::INT8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tiny") && err.contains("32"), "{err}");
        let err = QLinear::quantize("tiny", &small, None, "q8_0".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tiny"), "{err}");
        let mut v = data(200 * 64, 2);
        v[130 * 64 + 3] = f32::INFINITY;
        let bad = Tensor::from_vec(v, (200, 64), &dev).unwrap();
        let err = QLinear::quantize("inf", &bad, None, QuantScheme::INT8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 130, column 3"), "{err}");
    }

    #[test]
    fn k_quants_use_candle_and_match() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(data(8 * 256, 3), (8, 256), &dev).unwrap();
        let x = Tensor::from_vec(data(2 * 256, 5), (2, 256), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let deq = q.dequantize(&dev).unwrap();
        let layer = QLinear::from_qtensor("w", q, None).unwrap();
        let y: Vec<f32> = layer
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in y.iter().zip(reference(&deq, &x)) {
            assert!((a - b).abs() < 0.5, "{a} vs {b}");
        }
        let rows = layer.rows(&[7, 1, 7]).unwrap();
        let idx = Tensor::new(&[7u32, 1, 7], &dev).unwrap();
        let want = deq.index_select(&idx, 0).unwrap();
        let diff = (rows - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        // candle's kernels for a type we also run: the same rows.
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let deq8 = q8.dequantize(&dev).unwrap();
        let layer = QLinear::from_qtensor_with("w", q8, None, KernelChoice::Candle).unwrap();
        let diff = (layer.rows(&[7, 1, 7]).unwrap() - deq8.index_select(&idx, 0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn rows_dequantize_only_what_is_asked() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(data(10 * 64, 9), (10, 64), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let deq = q.dequantize(&dev).unwrap();
        let layer = QLinear::from_qtensor("emb", q, None).unwrap();
        let rows = layer.rows(&[3, 0, 3]).unwrap();
        let want = deq
            .index_select(&Tensor::new(&[3u32, 0, 3], &dev).unwrap(), 0)
            .unwrap();
        let diff = (rows - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        let err = layer.rows(&[10]).unwrap_err();
        assert!(err.to_string().contains("token id 10"), "{err}");
    }

    #[test]
    fn bias_and_shape_errors() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(data(4 * 8, 1), (4, 8), &dev).unwrap();
        let b = Tensor::new(&[1f32, 2., 3., 4.], &dev).unwrap();
        let layer = QLinear::dense("w", w.clone(), Some(b)).unwrap();
        let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), [2, 3, 4]);
        assert_eq!(y.i_last(), vec![1., 2., 3., 4.]);
        let bad = Tensor::zeros((2, 7), DType::F32, &dev).unwrap();
        assert!(
            layer
                .forward(&bad)
                .unwrap_err()
                .to_string()
                .contains("takes 8")
        );
        let wrong_bias = Tensor::new(&[1f32, 2.], &dev).unwrap();
        assert!(QLinear::dense("w", w, Some(wrong_bias)).is_err());
    }

    trait LastRow {
        fn i_last(&self) -> Vec<f32>;
    }
    impl LastRow for Tensor {
        fn i_last(&self) -> Vec<f32> {
            let v: Vec<f32> = self.flatten_all().unwrap().to_vec1().unwrap();
            v[v.len() - 4..].to_vec()
        }
    }

    /// Dense f16 and bf16 layers whose rows fill whole panels name the AMX-BF16 tiles
    /// for prompts that take them (five passes for f16, three for bf16); rows that do
    /// not fill panels, and fewer rows, keep the packed GEMM; a layer's output is the
    /// kernel's, as a direct call gives it.
    #[test]
    fn half_layers_name_the_bf16_tiles_for_prompts_that_take_them() {
        let dev = Device::Cpu;
        if !kernels::dense_packed_available() {
            println!(
                "half_layers_name_the_bf16_tiles_for_prompts_that_take_them: NOT TESTED (no \
                 dense packed kernels on this CPU)"
            );
            return;
        }
        let best = kernels::Kernel::detect();
        let (inp, m) = (40, kernels::DENSE_BF16X6_MIN_ROWS);
        let xs = data(m * inp, 4);
        let x = Tensor::from_vec(xs.clone(), (m, inp), &dev).unwrap();
        for (scheme, name, passes) in [(QuantScheme::F16, "f16", 5), (QuantScheme::BF16, "bf16", 3)]
        {
            for out in [128, 72] {
                let w = Tensor::from_vec(data(out * inp, 3), (out, inp), &dev).unwrap();
                let layer = QLinear::quantize("w", &w, None, scheme).unwrap();
                let tiles = kernels::dense_runs_bf16x6(m) && out % 64 == 0;
                let suffix = if tiles {
                    format!(", amx bf16x{passes}")
                } else {
                    String::new()
                };
                let path = format!("{name} dense packed {best}");
                assert_eq!(layer.kernel_path(m), format!("{path}{suffix}"));
                assert_eq!(layer.kernel_path(64), path);
                let stream = kernels::DENSE_ROWS_STREAM_MAX_ROWS;
                assert_eq!(layer.kernel_path(stream), format!("{name} dense {best}"));
                assert_eq!(layer.kernel_path(stream + 1), path);
                let y = values(&layer.forward(&x).unwrap());
                let mut want = vec![0f32; m * out];
                let flat = w.flatten_all().unwrap();
                let (h, b);
                let data = if passes == 5 {
                    h = flat
                        .to_dtype(DType::F16)
                        .unwrap()
                        .to_vec1::<half::f16>()
                        .unwrap();
                    DenseData::F16(&h)
                } else {
                    b = flat
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_vec1::<half::bf16>()
                        .unwrap();
                    DenseData::BF16(&b)
                };
                let matrix = DenseMatrix::new(data, out, inp).unwrap();
                kernels::dense_gemm(matrix, &xs, m, &mut want).unwrap();
                assert_eq!(y, want, "{name} {out} rows");
            }
        }
    }

    #[test]
    fn kernel_path_names_the_packed_kernel_for_prompts_only() {
        let dev = Device::Cpu;
        let best = kernels::Kernel::detect();
        // Prompts over panels name the AMX tiles where they run.
        let tiles = amx_tiles(512);
        assert_eq!(tiles.is_empty(), !kernels::amx_available());
        assert_eq!(amx_tiles(kernels::AMX_MIN_ROWS - 1), "");
        // 64 rows fill panels of sixteen (AVX-512 VNNI: one kernel for every row
        // count); 72 do not (AVX2's packed panels for prompts, tiles for decode).
        for n_out in [64, 72] {
            let w = Tensor::from_vec(data(n_out * 64, 3), (n_out, 64), &dev).unwrap();
            let layer =
                QLinear::from_qtensor("w", QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), None)
                    .unwrap();
            let panels = best == kernels::Kernel::Avx512Vnni && n_out % 16 == 0;
            if panels {
                assert_eq!(layer.kernel_path(1), format!("q8_0 {best} panels"));
                assert_eq!(
                    layer.kernel_path(kernels::AMX_MIN_ROWS - 1),
                    format!("q8_0 {best} panels")
                );
                assert_eq!(layer.kernel_path(512), format!("q8_0 {best} panels{tiles}"));
                continue;
            }
            assert_eq!(layer.kernel_path(1), format!("q8_0 {best}"));
            let prompt = layer.kernel_path(512);
            let packed = matches!(best, kernels::Kernel::Avx2 | kernels::Kernel::Avx512Vnni);
            if packed {
                assert_eq!(prompt, format!("q8_0 {best} packed{tiles}"));
            } else {
                assert!(!prompt.contains("packed"), "{prompt}");
            }
        }
        // Int8: panels with AVX-512 VNNI (every row count), else the AVX2 code for
        // decode and the packed kernel for prompts; int4 never in panels.
        for n_out in [64, 72] {
            let w = Tensor::from_vec(data(n_out * 64, 5), (n_out, 64), &dev).unwrap();
            let int8 = QuantScheme::Int(IntFormat::Int8);
            let layer = QLinear::quantize("w", &w, None, int8).unwrap();
            if best == kernels::Kernel::Avx512Vnni && n_out % 16 == 0 {
                assert_eq!(layer.kernel_path(1), format!("int8 {best} panels"));
                assert_eq!(layer.kernel_path(512), format!("int8 {best} panels{tiles}"));
            } else {
                let decode = kernels::int_kernel_for(best);
                assert_eq!(layer.kernel_path(1), format!("int8 {decode}"));
            }
            let int4 = QuantScheme::Int(IntFormat::Int4 {
                group: 32,
                asymmetric: false,
            });
            let layer = QLinear::quantize("w", &w, None, int4).unwrap();
            assert!(!layer.kernel_path(1).ends_with("panels"));
            if best == kernels::Kernel::Avx512Vnni {
                assert_eq!(
                    layer.kernel_path(512),
                    format!("int4-g32 {best} packed{tiles}")
                );
            }
        }
    }

    /// An f32 weight whose values are all bf16s (or f16s) is kept in that type: half
    /// the bytes, still an f32 layer to every reader (scheme, rows, dequantize, the
    /// data a file is written from), and the same bits out of `forward` as the dense
    /// kernels give the f32 values. Any other f32 weight stays f32.
    #[test]
    fn an_f32_weight_of_16_bit_values_is_kept_narrow_with_the_same_results() {
        let dev = Device::Cpu;
        let (out, inp) = (96, 576);
        let raw = data(out * inp, 5);
        let narrow = kernels::dense_packed_available();
        if !narrow {
            println!(
                "an_f32_weight_of_16_bit_values_is_kept_narrow: this CPU lacks AVX2/FMA/F16C, \
                 so weights stay f32 (checked); the narrowed path is NOT TESTED here"
            );
        }
        let cases: [(&str, Vec<f32>); 3] = [
            (
                "bf16",
                raw.iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect(),
            ),
            (
                "f16",
                raw.iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect(),
            ),
            ("f32", raw.clone()),
        ];
        let best = kernels::Kernel::detect();
        for (held, vals) in cases {
            let held = if narrow { held } else { "f32" };
            let w = Tensor::from_vec(vals.clone(), (out, inp), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::F32).unwrap();
            for layer in [
                QLinear::dense("w", w.clone(), None).unwrap(),
                QLinear::from_qtensor("w", q, None).unwrap(),
            ] {
                assert_eq!(layer.scheme(), QuantScheme::F32, "{held}");
                let per = if held == "f32" { 4 } else { 2 };
                assert_eq!(layer.bytes(), (out * inp * per) as u64, "{held}");
                let path = layer.kernel_path(1);
                if held == "f32" {
                    assert!(path.starts_with("f32 dense") || path.starts_with("f32 candle"));
                } else {
                    assert_eq!(path, format!("f32 as {held} dense {best}"));
                }
                match layer.weight_data().unwrap() {
                    WeightData::Narrowed(t) => assert_eq!(t.dtype().as_str(), held),
                    WeightData::Dense(t) => {
                        assert_eq!((t.dtype(), held), (DType::F32, "f32"));
                    }
                    _ => panic!("{held}: not dense"),
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&values(&layer.dequantize().unwrap())), bits(&vals));
                let rows = values(&layer.rows(&[3, 0]).unwrap());
                let want: Vec<f32> = [3, 0]
                    .iter()
                    .flat_map(|&r| vals[r * inp..(r + 1) * inp].to_vec())
                    .collect();
                assert_eq!(bits(&rows), bits(&want), "{held}: rows");
                if !narrow {
                    continue;
                }
                // A decode row, a small batch and a prompt (the packed GEMM).
                for m in [1, 3, 70] {
                    let xs = data(m * inp, 11);
                    let x = Tensor::from_vec(xs.clone(), (m, inp), &dev).unwrap();
                    let y = values(&layer.forward(&x).unwrap());
                    let mut want = vec![0f32; m * out];
                    let wide = DenseMatrix::new(DenseData::F32(&vals), out, inp).unwrap();
                    kernels::dense_gemm(wide, &xs, m, &mut want).unwrap();
                    assert_eq!(bits(&y), bits(&want), "{held} m={m}");
                }
            }
        }
    }

    /// An f32 weight whose rows fill panels of 64 is held in panels where the dense
    /// kernels run every row count: the same bytes, still an f32 layer to every
    /// reader (scheme, rows, dequantize, the data a file is written from, conversion
    /// to another scheme), and `forward` gives the packed GEMM's bits; a layer made
    /// for candle's arithmetic, or of rows that do not fill panels, stays row-major.
    #[test]
    fn an_f32_weight_of_whole_panels_is_held_in_panels_with_the_same_results() {
        let dev = Device::Cpu;
        let (out, inp) = (192, 576);
        let vals = data(out * inp, 9);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let w = Tensor::from_vec(vals.clone(), (out, inp), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::F32).unwrap();
        let best = kernels::Kernel::detect();
        let here = kernels::dense_packed_available();
        if !here {
            println!(
                "an_f32_weight_of_whole_panels: this CPU lacks AVX2/FMA/F16C, so weights stay \
                 row-major (checked); panels in a layer are NOT TESTED here"
            );
        }
        for layer in [
            QLinear::dense("w", w.clone(), None).unwrap(),
            QLinear::from_qtensor("w", q, None).unwrap(),
        ] {
            assert_eq!(layer.scheme(), QuantScheme::F32);
            let panels = match layer.weight_data().unwrap() {
                WeightData::Panels(p) => Some(p.clone()),
                _ => None,
            };
            assert_eq!(panels.is_some(), here);
            let Some(panels) = panels else {
                assert_eq!(layer.bytes(), (out * inp * 4) as u64);
                continue;
            };
            // Coded exponents where the AVX-512 kernel rebuilds them in registers:
            // 28 bits a value (these values have few escaped exponents).
            let coded = best == kernels::Kernel::Avx512Vnni;
            let (coding, path) = if coded {
                (
                    PanelCoding::Exponents,
                    format!("f32 dense {best} coded panels"),
                )
            } else {
                (PanelCoding::Plain, format!("f32 dense {best} panels"))
            };
            println!("an_f32_weight_of_whole_panels: {coding:?} on this CPU ({best})");
            assert_eq!(panels.coding(), coding);
            assert_eq!(layer.bytes(), panels.bytes() as u64);
            let plain = (out * inp * 4) as u64;
            if coded {
                assert!(layer.bytes() < plain * 9 / 10, "{}", layer.bytes());
            } else {
                assert_eq!(layer.bytes(), plain);
            }
            assert_eq!(layer.kernel_path(1), path);
            let tiles = kernels::dense_runs_bf16x6(512);
            let prompt = format!("{path}{}", if tiles { ", amx bf16x6" } else { "" });
            assert_eq!(layer.kernel_path(512), prompt);
            assert_eq!(bits(&values(&layer.dequantize().unwrap())), bits(&vals));
            let rows = values(&layer.rows(&[191, 0, 64]).unwrap());
            let want: Vec<f32> = [191, 0, 64]
                .iter()
                .flat_map(|&r| vals[r * inp..(r + 1) * inp].to_vec())
                .collect();
            assert_eq!(bits(&rows), bits(&want));
            assert!(layer.rows(&[192]).is_err());
            for m in [1, 3, 70] {
                let xs = data(m * inp, 11);
                let x = Tensor::from_vec(xs.clone(), (m, inp), &dev).unwrap();
                let y = values(&layer.forward(&x).unwrap());
                let mut want = vec![0f32; m * out];
                let p = DensePanels::from_rows(&vals, out, inp).unwrap();
                kernels::dense_gemm(p.matrix(), &xs, m, &mut want).unwrap();
                assert_eq!(bits(&y), bits(&want), "m={m}");
                if m > kernels::DENSE_GEMV_MAX_ROWS && !kernels::dense_runs_bf16x6(m) {
                    // A prompt: the packed GEMM over the row-major matrix.
                    let rows = DenseMatrix::new(DenseData::F32(&vals), out, inp).unwrap();
                    kernels::dense_gemm(rows, &xs, m, &mut want).unwrap();
                    assert_eq!(bits(&y), bits(&want), "m={m}: vs row-major");
                }
            }
            // Another scheme from the panels equals it from the values.
            let q8 = QuantScheme::Ggml(GgmlDType::Q8_0);
            let from_panels = layer.requantize("w", q8).unwrap();
            let direct = QLinear::quantize("w", &w, None, q8).unwrap();
            assert_eq!(
                bits(&values(&from_panels.dequantize().unwrap())),
                bits(&values(&direct.dequantize().unwrap()))
            );
            let back = from_panels.requantize("w", QuantScheme::F32).unwrap();
            assert!(matches!(back.weight_data().unwrap(), WeightData::Panels(_)));
        }
        // Candle's arithmetic keeps the row-major tensor; so do rows that do not fill
        // panels.
        let q = QTensor::quantize(&w, GgmlDType::F32).unwrap();
        let candle = QLinear::from_qtensor_with("w", q, None, KernelChoice::Candle).unwrap();
        assert!(matches!(
            candle.weight_data().unwrap(),
            WeightData::Dense(_)
        ));
        let odd = Tensor::from_vec(data(96 * inp, 3), (96, inp), &dev).unwrap();
        let layer = QLinear::dense("w", odd, None).unwrap();
        assert!(matches!(layer.weight_data().unwrap(), WeightData::Dense(_)));
    }

    #[test]
    fn layers_are_shareable_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<QLinear>();
    }
}

#[cfg(test)]
mod row_consistency {
    use super::*;
    use candle_core::Device;

    /// A row's result must not depend on how many rows are multiplied with it.
    #[test]
    fn one_row_equals_the_same_row_in_a_batch() {
        let dev = Device::Cpu;
        for (t, n_out, k, m) in [
            (GgmlDType::Q4_0, 64, 576, 9),
            (GgmlDType::Q4_1, 1536, 576, 40),
            (GgmlDType::Q4_1, 576, 1536, 40),
            (GgmlDType::Q4_1, 192, 576, 2),
            (GgmlDType::Q8_0, 49152, 576, 40),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n_out, k), &dev).unwrap();
            // Hidden states have a few huge channels: make some.
            let mut xv: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for r in 0..m {
                xv[r * k + 5] = 300.0;
                xv[r * k + 400] = -150.0;
            }
            let x = Tensor::from_vec(xv, (m, k), &dev).unwrap();
            let layer =
                QLinear::from_qtensor("w", QTensor::quantize(&w, t).unwrap(), None).unwrap();
            let all: Vec<Vec<f32>> = layer.forward(&x).unwrap().to_vec2().unwrap();
            let seqs: Vec<Vec<f32>> = layer.forward_sequences(&x).unwrap().to_vec2().unwrap();
            for (i, want) in all.iter().enumerate() {
                let one: Vec<Vec<f32>> = layer
                    .forward(&x.narrow(0, i, 1).unwrap())
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                let diff = one[0]
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // A batch runs the packed kernel, one row the streaming one: the same
                // integer products, summed in another order, so they may differ by
                // f32 rounding (a few ulps of the largest output), nothing more.
                let largest = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(
                    diff <= 4e-6 * largest.max(1.0),
                    "{t:?} row {i}: {diff} (largest {largest})"
                );
                // Declared independent sequences, a batch gives every row's bits.
                assert_eq!(one[0], seqs[i], "{t:?} row {i} as a sequence");
            }
        }
    }
}
