//! GGML block formats (Q4_0, Q4_1, Q8_0) and the weight matrix that holds them.
//!
//! The byte layouts are GGML's, so the bytes of a GGUF tensor are used as they are:
//!
//! | format | bytes | layout | element `j` of the block |
//! | --- | --- | --- | --- |
//! | Q4_0 | 18 | `d: f16`, `qs: [u8; 16]` | `d * (nibble(j) - 8)` |
//! | Q4_1 | 20 | `d: f16`, `m: f16`, `qs: [u8; 16]` | `d * nibble(j) + m` |
//! | Q8_0 | 34 | `d: f16`, `qs: [i8; 32]` | `d * qs[j]` |
//!
//! where `nibble(j)` is the low nibble of `qs[j]` for `j < 16` and the high nibble of
//! `qs[j - 16]` for `j >= 16`. All `f16` are little-endian.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::Kernel;
use super::error::{Error, Result};

/// Number of elements in one block of every supported format.
pub const BLOCK_ELEMS: usize = 32;

/// A GGML block format the kernels handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum WeightDType {
    /// 4-bit, one `f16` scale per block, nibbles offset by 8.
    Q4_0,
    /// 4-bit, one `f16` scale and one `f16` minimum per block.
    Q4_1,
    /// 8-bit, one `f16` scale per block.
    Q8_0,
}

impl WeightDType {
    /// All supported formats.
    pub const ALL: [WeightDType; 3] = [WeightDType::Q4_0, WeightDType::Q4_1, WeightDType::Q8_0];

    /// Size in bytes of one block of [`BLOCK_ELEMS`] elements.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightDType::Q4_0 => 18,
            WeightDType::Q4_1 => 20,
            WeightDType::Q8_0 => 34,
        }
    }

    /// The matching candle type.
    pub const fn to_ggml(self) -> GgmlDType {
        match self {
            WeightDType::Q4_0 => GgmlDType::Q4_0,
            WeightDType::Q4_1 => GgmlDType::Q4_1,
            WeightDType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// The format for a candle type, or [`Error::UnsupportedDType`].
    pub fn from_ggml(dtype: GgmlDType) -> Result<Self> {
        match dtype {
            GgmlDType::Q4_0 => Ok(WeightDType::Q4_0),
            GgmlDType::Q4_1 => Ok(WeightDType::Q4_1),
            GgmlDType::Q8_0 => Ok(WeightDType::Q8_0),
            other => Err(Error::UnsupportedDType { dtype: other }),
        }
    }

    /// Decodes one block (exactly [`block_bytes`](Self::block_bytes) bytes) into 32 floats.
    pub fn dequantize_block(self, block: &[u8], out: &mut [f32; BLOCK_ELEMS]) -> Result<()> {
        if block.len() != self.block_bytes() {
            return Err(Error::LengthMismatch {
                what: "block",
                expected: self.block_bytes(),
                actual: block.len(),
                unit: "bytes",
            });
        }
        let (d, rest) = read_f16(block)?;
        match self {
            WeightDType::Q4_0 => {
                let qs = nibbles(rest)?;
                for (j, q) in qs.iter().enumerate() {
                    out[j] = d * (f32::from(q & 0x0F) - 8.0);
                    out[j + 16] = d * (f32::from(q >> 4) - 8.0);
                }
            }
            WeightDType::Q4_1 => {
                let (m, rest) = read_f16(rest)?;
                let qs = nibbles(rest)?;
                for (j, q) in qs.iter().enumerate() {
                    out[j] = d * f32::from(q & 0x0F) + m;
                    out[j + 16] = d * f32::from(q >> 4) + m;
                }
            }
            WeightDType::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(rest) {
                    *o = d * f32::from(q as i8);
                }
            }
        }
        Ok(())
    }
}

/// Encodes `x` (a whole number of 32-float blocks) as GGML Q8_0 blocks into `out`
/// (34 bytes per block): per block `d = max|x| / 127` stored as a little-endian `f16`
/// and quants `round(x / d)` in `-127..=127` (the activation quantizer's rule, NaN to
/// 0). Decoding gives back each element within `d / 2` plus the `f16` rounding of `d`
/// (relative `2^-11`). The KV cache stores its Q8_0 keys and values with it.
///
/// # Errors
/// [`Error::KNotMultipleOfBlock`] when `x` is not whole blocks,
/// [`Error::LengthMismatch`] when `out` is not 34 bytes per block.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) -> Result<()> {
    let nb = blocks_per_row(x.len())?;
    let bb = WeightDType::Q8_0.block_bytes();
    if out.len() != nb * bb {
        return Err(Error::LengthMismatch {
            what: "Q8_0 bytes",
            expected: nb * bb,
            actual: out.len(),
            unit: "bytes",
        });
    }
    let mut q = [0i8; BLOCK_ELEMS];
    for (xb, ob) in x.chunks_exact(BLOCK_ELEMS).zip(out.chunks_exact_mut(bb)) {
        #[cfg(target_arch = "x86_64")]
        let (d, _) = super::acts::quantize_block_avx2(xb, &mut q);
        #[cfg(not(target_arch = "x86_64"))]
        let (d, _) = super::acts::quantize_block(xb, &mut q);
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (o, v) in ob[2..].iter_mut().zip(q) {
            *o = v as u8;
        }
    }
    Ok(())
}

/// Decodes GGML Q8_0 blocks (`bytes`, 34 per block) into `out` (32 floats per block).
///
/// # Errors
/// [`Error::LengthMismatch`] when the lengths do not match.
pub fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let bb = WeightDType::Q8_0.block_bytes();
    let nb = out.len() / BLOCK_ELEMS;
    if !out.len().is_multiple_of(BLOCK_ELEMS) || bytes.len() != nb * bb {
        return Err(Error::LengthMismatch {
            what: "Q8_0 bytes",
            expected: nb * bb,
            actual: bytes.len(),
            unit: "bytes",
        });
    }
    for (ob, block) in out
        .chunks_exact_mut(BLOCK_ELEMS)
        .zip(bytes.chunks_exact(bb))
    {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (o, &q) in ob.iter_mut().zip(&block[2..]) {
            *o = d * f32::from(q as i8);
        }
    }
    Ok(())
}

fn read_f16(bytes: &[u8]) -> Result<(f32, &[u8])> {
    match bytes.split_first_chunk::<2>() {
        Some((h, rest)) => Ok((f16::from_le_bytes(*h).to_f32(), rest)),
        None => Err(Error::LengthMismatch {
            what: "block header",
            expected: 2,
            actual: bytes.len(),
            unit: "bytes",
        }),
    }
}

fn nibbles(bytes: &[u8]) -> Result<&[u8; 16]> {
    bytes.try_into().map_err(|_| Error::LengthMismatch {
        what: "block nibbles",
        expected: 16,
        actual: bytes.len(),
        unit: "bytes",
    })
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDType::Q4_0 => "q4_0",
            WeightDType::Q4_1 => "q4_1",
            WeightDType::Q8_0 => "q8_0",
        })
    }
}

impl FromStr for WeightDType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(WeightDType::Q4_0),
            "q4_1" => Ok(WeightDType::Q4_1),
            "q8_0" => Ok(WeightDType::Q8_0),
            _ => Err(Error::UnknownName {
                what: "weight format",
                name: s.to_owned(),
            }),
        }
    }
}

/// A borrowed, validated `[n_out, k]` matrix of GGML blocks: row-major as stored in
/// GGUF, or repacked in panels of sixteen rows ([`GgmlWeights::into_panels`]).
///
/// Row-major, row `r` (output feature `r`) is `k / 32` consecutive blocks. Build it over
/// bytes that live elsewhere (a memory map, a candle `QTensor`) with
/// [`GgmlMatrix::new`].
#[derive(Clone, Copy)]
pub struct GgmlMatrix<'a> {
    dtype: WeightDType,
    n_out: usize,
    k: usize,
    bytes: &'a [u8],
    panels: bool,
}

impl fmt::Debug for GgmlMatrix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgmlMatrix")
            .field("dtype", &self.dtype)
            .field("n_out", &self.n_out)
            .field("k", &self.k)
            .field("bytes", &self.bytes.len())
            .field("panels", &self.panels)
            .finish()
    }
}

/// Checks `k` and returns the number of blocks per row.
pub(crate) fn blocks_per_row(k: usize) -> Result<usize> {
    if k == 0 {
        return Err(Error::EmptyDimension { what: "k" });
    }
    if !k.is_multiple_of(BLOCK_ELEMS) {
        return Err(Error::KNotMultipleOfBlock {
            k,
            block: BLOCK_ELEMS,
        });
    }
    Ok(k / BLOCK_ELEMS)
}

impl<'a> GgmlMatrix<'a> {
    /// Views GGML block bytes as a `[n_out, k]` matrix.
    ///
    /// Fails when `k` is not a multiple of 32, a dimension is zero, or `bytes` is not
    /// exactly `n_out * k / 32 * dtype.block_bytes()` long.
    pub fn new(dtype: WeightDType, n_out: usize, k: usize, bytes: &'a [u8]) -> Result<Self> {
        if n_out == 0 {
            return Err(Error::EmptyDimension { what: "n_out" });
        }
        let nb = blocks_per_row(k)?;
        let expected = nb
            .checked_mul(dtype.block_bytes())
            .and_then(|row| row.checked_mul(n_out))
            .ok_or(Error::Overflow {
                what: "weight bytes",
            })?;
        if bytes.len() != expected {
            return Err(Error::LengthMismatch {
                what: "weight bytes",
                expected,
                actual: bytes.len(),
                unit: "bytes",
            });
        }
        Ok(Self {
            dtype,
            n_out,
            k,
            bytes,
            panels: false,
        })
    }

    /// Whether the bytes are in panels of sixteen rows (read by the AVX-512 VNNI
    /// kernel, and for Q4_0 and Q4_1 by the AVX2 one) rather than row-major.
    pub fn in_panels(&self) -> bool {
        self.panels
    }

    /// The block format.
    pub fn dtype(&self) -> WeightDType {
        self.dtype
    }

    /// Number of output features (rows).
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Inner dimension (elements per row).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The bytes as stored: GGML blocks row-major, or in panels when
    /// [`in_panels`](Self::in_panels); exactly `n_out * row_bytes()` long either way.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Blocks per row (`k / 32`).
    pub fn blocks_per_row(&self) -> usize {
        self.k / BLOCK_ELEMS
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.blocks_per_row() * self.dtype.block_bytes()
    }

    /// Decodes row `row` into `out` (`k` floats).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if out.len() != self.k {
            return Err(Error::LengthMismatch {
                what: "dequantized row",
                expected: self.k,
                actual: out.len(),
                unit: "elements",
            });
        }
        if row >= self.n_out {
            return Err(Error::LengthMismatch {
                what: "weight rows (n_out)",
                expected: self.n_out,
                actual: row + 1,
                unit: "rows",
            });
        }
        let bb = self.dtype.block_bytes();
        let mut block = [0u8; WeightDType::Q8_0.block_bytes()];
        let mut tmp = [0.0f32; BLOCK_ELEMS];
        for (b, o) in out.chunks_exact_mut(BLOCK_ELEMS).enumerate() {
            let bytes = if self.panels {
                super::panels::block(
                    self.dtype,
                    self.n_out,
                    self.k,
                    self.bytes,
                    row,
                    b,
                    &mut block[..bb],
                )?;
                &block[..bb]
            } else {
                let at = (row * self.blocks_per_row() + b) * bb;
                self.bytes.get(at..at + bb).ok_or(Error::LengthMismatch {
                    what: "weight bytes",
                    expected: self.n_out * self.row_bytes(),
                    actual: self.bytes.len(),
                    unit: "bytes",
                })?
            };
            self.dtype.dequantize_block(bytes, &mut tmp)?;
            o.copy_from_slice(&tmp);
        }
        Ok(())
    }

    /// Decodes the whole matrix into `n_out * k` floats, row-major.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.n_out * self.k];
        for (row, o) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(row, o)?;
        }
        Ok(out)
    }
}

/// An owned `[n_out, k]` matrix of GGML blocks (shared bytes, cheap to clone).
///
/// [`matrix`](Self::matrix) borrows it as a [`GgmlMatrix`] for the kernels. Built
/// row-major; [`into_panels`](Self::into_panels) repacks it for the AVX-512 VNNI
/// kernel (same size, every number of activation rows).
#[derive(Clone)]
pub struct GgmlWeights {
    dtype: WeightDType,
    n_out: usize,
    k: usize,
    bytes: Arc<[u8]>,
    panels: bool,
}

impl fmt::Debug for GgmlWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.matrix().fmt(f)
    }
}

impl GgmlWeights {
    /// Takes GGML block bytes of a `[n_out, k]` matrix; validated as in [`GgmlMatrix::new`].
    pub fn new(
        dtype: WeightDType,
        n_out: usize,
        k: usize,
        bytes: impl Into<Arc<[u8]>>,
    ) -> Result<Self> {
        let bytes = bytes.into();
        GgmlMatrix::new(dtype, n_out, k, &bytes)?;
        Ok(Self {
            dtype,
            n_out,
            k,
            bytes,
            panels: false,
        })
    }

    /// The weights in the layout `kernel` reads fastest: repacked into panels of
    /// sixteen rows when `n_out` is a multiple of 16 and the kernel reads this format
    /// in panels ([`Kernel::Avx512Vnni`] every format, [`Kernel::Avx2`] Q4_0 and Q4_1;
    /// the same bytes, reordered: see [`GgmlMatrix::in_panels`]), otherwise unchanged.
    /// [`gemm_with`](super::gemm_with) with a kernel that does not read them refuses
    /// panels.
    ///
    /// # Errors
    /// Only on a broken invariant of the stored bytes (their length).
    pub fn for_kernel(self, kernel: Kernel) -> Result<Self> {
        if self.panels || !super::panels::chosen_for(kernel, self.dtype, self.n_out) {
            return Ok(self);
        }
        self.into_panels()
    }

    /// Repacks row-major weights into panels of sixteen rows (a no-op when they are
    /// already); see [`GgmlMatrix::in_panels`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `n_out` is not a multiple of 16.
    pub fn into_panels(self) -> Result<Self> {
        if self.panels {
            return Ok(self);
        }
        let bytes = super::panels::from_rows(self.dtype, self.n_out, self.k, &self.bytes)?;
        Ok(Self {
            bytes,
            panels: true,
            ..self
        })
    }

    /// Whether the bytes are in panels ([`into_panels`](Self::into_panels)).
    pub fn in_panels(&self) -> bool {
        self.panels
    }

    /// The GGML bytes row-major, as a GGUF file stores them (borrowed unless the
    /// weights are in panels).
    ///
    /// # Errors
    /// Only on a broken invariant of the stored bytes (their length).
    pub fn row_major_bytes(&self) -> Result<Cow<'_, [u8]>> {
        if self.panels {
            Ok(Cow::Owned(super::panels::to_rows(
                self.dtype,
                self.n_out,
                self.k,
                &self.bytes,
            )?))
        } else {
            Ok(Cow::Borrowed(&self.bytes))
        }
    }

    /// Copies the bytes of a CPU candle `QTensor` of shape `[n_out, k]`.
    pub fn from_qtensor(qtensor: &QTensor) -> Result<Self> {
        Self::from_qtensor_for(qtensor, Kernel::Scalar)
    }

    /// As [`from_qtensor`](Self::from_qtensor), in the layout `kernel` reads fastest
    /// ([`for_kernel`](Self::for_kernel)), repacked straight from the tensor's bytes.
    ///
    /// # Errors
    /// As [`from_qtensor`](Self::from_qtensor).
    pub fn from_qtensor_for(qtensor: &QTensor, kernel: Kernel) -> Result<Self> {
        let dtype = WeightDType::from_ggml(qtensor.dtype())?;
        let dims = qtensor.shape().dims();
        let &[n_out, k] = dims else {
            return Err(Error::NotAMatrix {
                dims: dims.to_vec(),
            });
        };
        let data = qtensor.data()?;
        GgmlMatrix::new(dtype, n_out, k, &data)?;
        if super::panels::chosen_for(kernel, dtype, n_out) {
            let bytes = super::panels::from_rows(dtype, n_out, k, &data)?;
            return Ok(Self {
                dtype,
                n_out,
                k,
                bytes,
                panels: true,
            });
        }
        Self::new(dtype, n_out, k, Arc::<[u8]>::from(&*data))
    }

    /// Borrows the matrix for the kernels.
    pub fn matrix(&self) -> GgmlMatrix<'_> {
        GgmlMatrix {
            dtype: self.dtype,
            n_out: self.n_out,
            k: self.k,
            bytes: &self.bytes,
            panels: self.panels,
        }
    }

    /// The block format.
    pub fn dtype(&self) -> WeightDType {
        self.dtype
    }

    /// Number of output features (rows).
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Inner dimension (elements per row).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The bytes as stored (row-major, or in panels when
    /// [`in_panels`](Self::in_panels); [`row_major_bytes`](Self::row_major_bytes) gives
    /// GGUF's order).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Decodes the whole matrix into `n_out * k` floats, row-major.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        self.matrix().dequantize()
    }
}
