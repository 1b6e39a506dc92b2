//! F32 panels with their exponents coded in four bits: the same values, bit for bit,
//! in 28 bits each instead of 32.
//!
//! A decode step of an f32 model reads every weight from memory once, so it runs at
//! the speed memory delivers 4 bytes a weight. The weights of a trained layer use few
//! of the 256 exponents: in SmolLM2-135M's f32 weights, the fifteen most common
//! exponents of each matrix cover all but 0.023% of the values. [`CodedPanels`]
//! keeps each value's sign and 23 mantissa bits as they are (three bytes) and its
//! exponent as a four-bit code into the matrix's fifteen most common exponents; the
//! sixteenth code ([`ESCAPE`]) sends the rare others to a short list kept beside the
//! panels ([`Escape`], in order). A decode step reads 224 bytes per 64 weights
//! instead of 256 (12.5% fewer) and rebuilds each f32 exactly in registers; nothing
//! is rounded, so every product is the one the plain panels give.
//!
//! The layout is that of [`DensePanels`](super::DensePanels): panels of 64 output
//! rows, element `kk` of the panel's 64 rows together. Each element of `k` is one
//! record of [`RECORD`] bytes:
//!
//! - bytes `0..192`: value `j`'s three bytes at `3 j`: its low 16 bits
//!   (little-endian), then bits 16-22 with its sign in bit 7;
//! - bytes `192..224`: the exponent codes, value `j`'s in byte `j % 32`, low nibble
//!   for `j < 32`, high nibble after (a zero-extending load of 16 bytes gives sixteen
//!   lanes whose low four bits are the codes of one group, `>> 4` those of another).
//!
//! With AVX512_VBMI, one `vpermb` spreads sixteen values' 48 bytes into 32-bit lanes
//! (the third byte twice, so the sign lands in bit 31), one `vpermd` looks the
//! exponents up in the sixteen-entry table and one `vpternlogd` joins them; without
//! it a `vpermd` and an in-lane `vpshufb` do the spreading; AVX2 uses `vpshufb` and two
//! eight-entry permutes (it decodes panels into a buffer, for tests and forced
//! kernels: [`PanelCoding::Auto`](super::PanelCoding) codes only where the AVX-512
//! kernel runs). A decode step prefetches the records into L2 8 KiB ahead.

use rayon::prelude::*;

use super::error::{Error, Result};

/// Output rows per panel (that of [`DensePanels`](super::DensePanels)).
pub(crate) const ROWS: usize = 64;

/// Bytes per element of `k` of a panel: 64 values of 28 bits.
pub(crate) const RECORD: usize = 224;

/// Offset of the exponent codes.
const CODES: usize = 192;

/// The exponent code that means "not among the fifteen": the exponent is in the
/// matrix's list of [`Escape`]s.
pub(crate) const ESCAPE: u8 = 15;

/// The sign and mantissa bits a record keeps (the exponent comes from the code).
const KEEP: u32 = 0x807F_FFFF;

/// Sixty-four bytes on a 64-byte line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct ByteLine([u8; 64]);

/// An element whose exponent is not among the matrix's fifteen: where it is in its
/// panel and its exponent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Escape {
    /// Element of `k`.
    pub kk: u32,
    /// Row within the panel (below 64).
    pub col: u8,
    /// The exponent (bits 23-30 of the f32).
    pub exp: u8,
}

/// An f32 `[n_out, k]` matrix (`n_out` a multiple of 64) in panels of 64 rows with
/// four-bit exponent codes: each value keeps its sign and 23 mantissa bits (three
/// bytes) and a code into the matrix's fifteen most common exponents; the sixteenth
/// code sends the rare others to a list beside the panels. 224 bytes per 64 values
/// instead of 256, every value rebuilt exactly. Built by
/// [`DensePanels`](super::DensePanels) ([`PanelCoding`](super::PanelCoding)), which
/// decides when coding pays.
pub struct CodedPanels {
    lines: Vec<ByteLine>,
    /// The exponent field (`exp << 23`) of each code; [`ESCAPE`]'s is zero.
    table: [u32; 16],
    /// Every escaped element, panel by panel, in `(kk, col)` order within a panel.
    escapes: Vec<Escape>,
    /// Where each panel's escapes start in `escapes` (one more entry than panels).
    starts: Vec<usize>,
    n_out: usize,
    k: usize,
}

impl std::fmt::Debug for CodedPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodedPanels")
            .field("n_out", &self.n_out)
            .field("k", &self.k)
            .field("escapes", &self.escapes.len())
            .finish_non_exhaustive()
    }
}

/// The bytes of `lines`, in order.
fn bytes_of(lines: &[ByteLine]) -> &[u8] {
    // SAFETY: `ByteLine` is `repr(C)` over `[u8; 64]` with no padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), lines.len() * 64) }
}

/// The bytes of `lines`, in order, writable.
fn bytes_of_mut(lines: &mut [ByteLine]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, with the one mutable borrow of the lines.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64) }
}

/// The exponent of an f32's bits.
fn exponent(bits: u32) -> u8 {
    ((bits >> 23) & 0xFF) as u8
}

/// The three kept bytes of a value: its low 16 bits and bits 16-22 with the sign.
fn kept(bits: u32) -> (u16, u8) {
    (
        (bits & 0xFFFF) as u16,
        (((bits >> 16) & 0x7F) | ((bits >> 31) << 7)) as u8,
    )
}

impl CodedPanels {
    /// Codes the `[n_out, k]` matrix whose row-major element `i` is `get(i)`, in
    /// parallel on the current rayon pool: `None` when more than `max_escapes` of its
    /// values have an exponent outside the fifteen most common (`None` for no limit).
    ///
    /// # Errors
    /// [`Error::NotMultiple`] unless `n_out` is a multiple of 64, [`Error::EmptyDimension`]
    /// for a zero dimension, [`Error::Overflow`] when the size overflows.
    pub(crate) fn encode(
        n_out: usize,
        k: usize,
        get: impl Fn(usize) -> f32 + Sync,
        max_escapes: Option<usize>,
    ) -> Result<Option<Self>> {
        if n_out == 0 {
            return Err(Error::EmptyDimension { what: "n_out" });
        }
        if k == 0 {
            return Err(Error::EmptyDimension { what: "k" });
        }
        if !n_out.is_multiple_of(ROWS) {
            return Err(Error::NotMultiple {
                what: "rows of a matrix in panels",
                n: n_out,
                multiple: ROWS,
            });
        }
        let n = n_out
            .checked_mul(k)
            .ok_or(Error::Overflow { what: "n_out * k" })?;
        let k32 = u32::try_from(k).map_err(|_| Error::Overflow { what: "k (u32)" })?;
        // One histogram per chunk of values, counted in a plain loop (a per-value `fold`
        // moved its 2 KiB accumulator at every value: 4.6 s of an f32 SmolLM2's load).
        const CHUNK: usize = 1 << 16;
        let counts = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let mut h = [0usize; 256];
                for i in c * CHUNK..n.min((c + 1) * CHUNK) {
                    h[usize::from(exponent(get(i).to_bits()))] += 1;
                }
                h
            })
            .reduce(
                || [0usize; 256],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        // The fifteen most common exponents, most common first (ties: the lower).
        let mut order: Vec<usize> = (0..256).collect();
        order.sort_by_key(|&e| (std::cmp::Reverse(counts[e]), e));
        let mut code_of = [ESCAPE; 256];
        let mut table = [0u32; 16];
        let mut covered = 0;
        for (code, &e) in order.iter().take(usize::from(ESCAPE)).enumerate() {
            if counts[e] == 0 {
                break;
            }
            code_of[e] = code as u8;
            table[code] = (e as u32) << 23;
            covered += counts[e];
        }
        if max_escapes.is_some_and(|max| n - covered > max) {
            return Ok(None);
        }
        let panel_bytes = k * RECORD;
        let mut lines = vec![ByteLine([0; 64]); (n_out / ROWS * panel_bytes).div_ceil(64)];
        let per_panel: Vec<Vec<Escape>> = bytes_of_mut(&mut lines)
            .par_chunks_mut(panel_bytes)
            .take(n_out / ROWS)
            .enumerate()
            .map(|(p, panel)| {
                let mut escapes = Vec::new();
                for j in 0..ROWS {
                    let row = (p * ROWS + j) * k;
                    for (kk, rec) in (0..k32).zip(panel.chunks_exact_mut(RECORD)) {
                        let bits = get(row + kk as usize).to_bits();
                        let (lo, hi) = kept(bits);
                        let e = exponent(bits);
                        let code = code_of[usize::from(e)];
                        if code == ESCAPE {
                            escapes.push(Escape {
                                kk,
                                col: j as u8,
                                exp: e,
                            });
                        }
                        rec[3 * j..3 * j + 2].copy_from_slice(&lo.to_le_bytes());
                        rec[3 * j + 2] = hi;
                        rec[CODES + j % 32] |= code << (4 * (j / 32));
                    }
                }
                escapes.sort_unstable_by_key(|e| (e.kk, e.col));
                escapes
            })
            .collect();
        let mut starts = Vec::with_capacity(per_panel.len() + 1);
        let mut escapes = Vec::with_capacity(n - covered);
        for list in per_panel {
            starts.push(escapes.len());
            escapes.extend(list);
        }
        starts.push(escapes.len());
        Ok(Some(Self {
            lines,
            table,
            escapes,
            starts,
            n_out,
            k,
        }))
    }

    /// Output rows.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Values whose exponent is kept in the list beside the panels.
    pub fn escapes(&self) -> usize {
        self.escapes.len()
    }

    /// Bytes held: the records, the list of escaped exponents and its index.
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
            + self.escapes.len() * std::mem::size_of::<Escape>()
            + self.starts.len() * std::mem::size_of::<usize>()
            + std::mem::size_of_val(&self.table)
    }

    /// The exponent fields of the codes.
    pub(crate) fn table(&self) -> &[u32; 16] {
        &self.table
    }

    /// The records of panel `p` (`k * RECORD` bytes).
    pub(crate) fn panel(&self, p: usize) -> &[u8] {
        let len = self.k * RECORD;
        bytes_of(&self.lines)
            .get(p * len..(p + 1) * len)
            .unwrap_or(&[])
    }

    /// The escaped elements of panel `p`, in `(kk, col)` order.
    pub(crate) fn panel_escapes(&self, p: usize) -> &[Escape] {
        match (self.starts.get(p), self.starts.get(p + 1)) {
            (Some(&a), Some(&b)) => self.escapes.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Value `j` of the record `rec` (an escaped one with the table's zero exponent
    /// field: [`patch`] puts its own in).
    fn value(&self, rec: &[u8], j: usize) -> f32 {
        let byte = |i: usize| u32::from(rec.get(i).copied().unwrap_or(0));
        let code = (byte(CODES + j % 32) >> (4 * (j / 32))) & 0xF;
        let exp_field = self.table.get(code as usize).copied().unwrap_or(0);
        let hi = byte(3 * j + 2);
        let bits = byte(3 * j) | byte(3 * j + 1) << 8 | (hi & 0x7F) << 16 | (hi >> 7) << 31;
        f32::from_bits(bits | exp_field)
    }

    /// Panel `p` decoded into `out` as plain panels hold it (element `kk` of its row
    /// `j` at `out[kk * 64 + j]`), one value at a time: the reference the SIMD
    /// decoders are tested against.
    pub(crate) fn decode_panel_scalar(&self, p: usize, out: &mut [f32]) {
        for (rec, dst) in self
            .panel(p)
            .chunks_exact(RECORD)
            .zip(out.chunks_exact_mut(ROWS))
        {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = self.value(rec, j);
            }
        }
        patch(self.panel_escapes(p), out);
    }

    /// Row `c` into `out` (`k` floats); the caller checked `c < n_out` and the length.
    pub(crate) fn row(&self, c: usize, out: &mut [f32]) {
        let (p, j) = (c / ROWS, c % ROWS);
        for (rec, o) in self.panel(p).chunks_exact(RECORD).zip(out.iter_mut()) {
            *o = self.value(rec, j);
        }
        for e in self
            .panel_escapes(p)
            .iter()
            .filter(|e| usize::from(e.col) == j)
        {
            if let Some(o) = out.get_mut(e.kk as usize) {
                *o = with_exponent(*o, e.exp);
            }
        }
    }
}

/// `v` with its exponent replaced by `exp`.
fn with_exponent(v: f32, exp: u8) -> f32 {
    f32::from_bits((v.to_bits() & KEEP) | (u32::from(exp) << 23))
}

/// Puts the escaped exponents of a decoded panel (`out` as plain panels, from element
/// 0) in place.
pub(crate) fn patch(escapes: &[Escape], out: &mut [f32]) {
    for e in escapes {
        if let Some(v) = out.get_mut(e.kk as usize * ROWS + usize::from(e.col)) {
            *v = with_exponent(*v, e.exp);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    //! The decoders: a panel into a buffer (AVX2, AVX-512F) and a decode step's rows
    //! straight from the records (AVX-512F).

    use std::arch::x86_64::*;

    use super::{CODES, CodedPanels, Escape, KEEP, RECORD, ROWS, patch};

    /// How far ahead of its loads a decode step prefetches the records.
    const PREFETCH: usize = 8192;

    /// Whether the CPU has AVX512_VBMI (`vpermb`): the decoders then spread each
    /// value's three bytes with one byte permute instead of a dword permute and an
    /// in-lane byte shuffle.
    pub(crate) fn has_vbmi() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512vbmi"))
    }

    /// Byte `i` of lane `l` (four bytes a lane) takes source byte `3 l + min(i, 2)`:
    /// a value's three bytes, the third twice (its sign lands in bit 31).
    const fn spread_bytes() -> [u8; 64] {
        let mut idx = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let b = if i % 4 == 3 { 2 } else { i % 4 };
            idx[i] = (3 * (i / 4) + b) as u8;
            i += 1;
        }
        idx
    }

    /// [`spread_bytes`] within each 16-byte lane, for 4 values of 12 bytes at the
    /// start of the lane.
    const fn spread_lane_bytes() -> [u8; 64] {
        let mut idx = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let b = if i % 4 == 3 { 2 } else { i % 4 };
            idx[i] = (3 * ((i % 16) / 4) + b) as u8;
            i += 1;
        }
        idx
    }

    const SPREAD: [u8; 64] = spread_bytes();
    const SPREAD_LANE: [u8; 64] = spread_lane_bytes();
    /// Dwords `3 l..3 l + 3` of 48 bytes to the start of 16-byte lane `l`.
    const LANE_DWORDS: [i32; 16] = [0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0];

    /// The eight values `8 h..8 h + 8` of the record at `rec`.
    ///
    /// # Safety
    /// The CPU has AVX2; `rec` points to a whole record; `h < 8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode8(rec: *const u8, h: usize, tab_lo: __m256i, tab_hi: __m256i) -> __m256 {
        // SAFETY: the record holds 224 bytes; h < 8, so the 16 bytes from 24 h + 12
        // and the 8 code bytes are inside it; the table holds 32 bytes.
        let (raw, codes, spread) = unsafe {
            (
                _mm256_loadu2_m128i(rec.add(24 * h + 12).cast(), rec.add(24 * h).cast()),
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(rec.add(CODES + 8 * (h % 4)).cast())),
                _mm256_loadu_si256(SPREAD_LANE.as_ptr().cast()),
            )
        };
        let bytes = _mm256_shuffle_epi8(raw, spread);
        let idx = if h >= 4 {
            _mm256_srli_epi32::<4>(codes)
        } else {
            codes
        };
        // Sixteen entries from two eight-entry permutes, chosen by bit 3.
        let exp = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(tab_lo, idx)),
            _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(tab_hi, idx)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)),
        ));
        let kept = _mm256_and_si256(bytes, _mm256_set1_epi32(KEEP as i32));
        _mm256_castsi256_ps(_mm256_or_si256(kept, exp))
    }

    /// Panel `p` of `c` decoded into `out` (`k * 64` floats, as plain panels), with
    /// AVX-512F (`ZMM`) or AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (and AVX-512F/BW/VL with `ZMM`).
    pub(crate) unsafe fn decode_panel<const ZMM: bool>(c: &CodedPanels, p: usize, out: &mut [f32]) {
        let recs = c.panel(p);
        let n = recs.len() / RECORD;
        if out.len() < n * ROWS {
            debug_assert!(false, "coded panel decoded into a short buffer");
            return;
        }
        if ZMM {
            // SAFETY: the caller's CPU (AVX-512F/BW/VL with ZMM).
            return unsafe { decode_panel_part(c, p, 0..n, out) };
        }
        // SAFETY: the caller's CPU; out holds a float per value of the n records.
        unsafe { decode_records_256(recs, c.table(), out) };
        patch(c.panel_escapes(p), out);
    }

    /// Records `kk` of panel `p` of `c` (values `kk` of its 64 columns) decoded into
    /// `out` (`kk.len() * 64` floats, value `kk.start + i` of column `j` at
    /// `out[i * 64 + j]`) with AVX-512F; an empty or out-of-range `kk` decodes nothing.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and AVX-512F/BW/VL.
    pub(crate) unsafe fn decode_panel_part(
        c: &CodedPanels,
        p: usize,
        kk: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let Some(recs) = c.panel(p).get(kk.start * RECORD..kk.end * RECORD) else {
            debug_assert!(false, "coded panel part out of range");
            return;
        };
        if out.len() < kk.len() * ROWS {
            debug_assert!(false, "coded panel part decoded into a short buffer");
            return;
        }
        // SAFETY: the caller's CPU; out holds a float per value of the records.
        unsafe {
            if has_vbmi() {
                vbmi::decode_records_512(recs, c.table(), out);
            } else {
                bw::decode_records_512(recs, c.table(), out);
            }
        }
        for e in c.panel_escapes(p) {
            let at = (e.kk as usize)
                .checked_sub(kk.start)
                .filter(|&i| i < kk.len());
            if let Some(v) = at.and_then(|i| out.get_mut(i * ROWS + usize::from(e.col))) {
                *v = super::with_exponent(*v, e.exp);
            }
        }
    }

    /// The records `recs` decoded into `out` with AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2; `out` holds 64 floats per whole record.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_records_256(recs: &[u8], table: &[u32; 16], out: &mut [f32]) {
        // SAFETY: the table holds sixteen u32s.
        let (tab_lo, tab_hi) = unsafe {
            (
                _mm256_loadu_si256(table.as_ptr().cast()),
                _mm256_loadu_si256(table.as_ptr().add(8).cast()),
            )
        };
        for (rec, d) in recs.chunks_exact(RECORD).zip(out.chunks_exact_mut(ROWS)) {
            for h in 0..8 {
                // SAFETY: the record is whole; d holds 64 floats.
                unsafe {
                    let v = decode8(rec.as_ptr(), h, tab_lo, tab_hi);
                    _mm256_storeu_ps(d.as_mut_ptr().add(8 * h), v);
                }
            }
        }
    }

    /// Spreads 48 bytes (16 values of three bytes) to 16 lanes with `vpermb`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and AVX512_VBMI.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")]
    unsafe fn spread_vbmi(raw: __m512i) -> __m512i {
        // SAFETY: SPREAD holds 64 bytes.
        unsafe { _mm512_permutexvar_epi8(_mm512_loadu_si512(SPREAD.as_ptr().cast()), raw) }
    }

    /// As [`spread_vbmi`] without AVX512_VBMI: each four values' twelve bytes to the
    /// start of their 16-byte lane (`vpermd`), then an in-lane byte shuffle.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn spread_bw(raw: __m512i) -> __m512i {
        // SAFETY: the tables hold 16 dwords / 64 bytes.
        unsafe {
            let lanes =
                _mm512_permutexvar_epi32(_mm512_loadu_si512(LANE_DWORDS.as_ptr().cast()), raw);
            _mm512_shuffle_epi8(lanes, _mm512_loadu_si512(SPREAD_LANE.as_ptr().cast()))
        }
    }

    /// The AVX-512 decoders and the decode step's micro-kernel, compiled for one set
    /// of features (with or without AVX512_VBMI) and its way of spreading bytes.
    macro_rules! zmm_paths {
        ($m:ident, $features:literal, $spread:ident) => {
            pub(crate) mod $m {
                use std::arch::x86_64::*;

                use super::super::{CODES, Escape, KEEP, RECORD, ROWS};
                use super::{PREFETCH, patch_record, $spread};

                /// The sixteen values `16 g..16 g + 16` of the record at `rec`, with the codes of
                /// values `16 (g % 2)..` in `codes` (bits 4-7 for `g >= 2`).
                ///
                /// # Safety
                /// The CPU has AVX-512F/BW (and AVX512_VBMI with `VBMI`); `rec` points to a whole
                /// record; `g < 4`.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn decode16(
                    rec: *const u8,
                    g: usize,
                    codes: __m512i,
                    table: __m512i,
                ) -> __m512 {
                    // SAFETY: the record holds 224 bytes, so 64 from 48 g (g < 4) are inside it.
                    let raw = unsafe { _mm512_loadu_si512(rec.add(48 * g).cast()) };
                    // SAFETY: the CPU has the features of this module.
                    let bytes = unsafe { $spread(raw) };
                    let idx = if g >= 2 {
                        _mm512_srli_epi32::<4>(codes)
                    } else {
                        codes
                    };
                    // vpermd reads the low four bits of each index.
                    let exp = _mm512_permutexvar_epi32(idx, table);
                    // KEEP ? bytes : exp.
                    let keep = _mm512_set1_epi32(KEEP as i32);
                    _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xE4>(bytes, exp, keep))
                }

                /// The 64 values of the record at `rec`.
                ///
                /// # Safety
                /// As [`decode16`].
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn decode64(rec: *const u8, table: __m512i) -> [__m512; 4] {
                    // SAFETY: the record holds its 32 bytes of codes.
                    let (ca, cb) = unsafe {
                        (
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(rec.add(CODES).cast())),
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(rec.add(CODES + 16).cast())),
                        )
                    };
                    // SAFETY: the caller's record and CPU.
                    unsafe {
                        [
                            decode16(rec, 0, ca, table),
                            decode16(rec, 1, cb, table),
                            decode16(rec, 2, ca, table),
                            decode16(rec, 3, cb, table),
                        ]
                    }
                }

                /// The records `recs` decoded into `out` with AVX-512F/BW (and AVX512_VBMI with
                /// `VBMI`).
                ///
                /// # Safety
                /// The CPU has AVX-512F/BW/VL (and AVX512_VBMI with `VBMI`); `out` holds 64
                /// floats per whole record.
                #[target_feature(enable = $features)]
                pub(crate) unsafe fn decode_records_512(
                    recs: &[u8],
                    table: &[u32; 16],
                    out: &mut [f32],
                ) {
                    // SAFETY: the table holds sixteen u32s.
                    let tab = unsafe { _mm512_loadu_si512(table.as_ptr().cast()) };
                    for (rec, d) in recs.chunks_exact(RECORD).zip(out.chunks_exact_mut(ROWS)) {
                        // SAFETY: the record is whole; d holds 64 floats.
                        unsafe {
                            for (g, v) in decode64(rec.as_ptr(), tab).into_iter().enumerate() {
                                _mm512_storeu_ps(d.as_mut_ptr().add(16 * g), v);
                            }
                        }
                    }
                }

                /// A decode step's micro-kernel: `MR` activation rows from `r0` times the 64
                /// columns of one coded panel (`recs`, its `escapes`), each value rebuilt in
                /// registers and multiplied at once, in the FMA chains of the plain panels' tile
                /// (one per output, in element order): the same bits. `PF`: fetch the records
                /// [`PREFETCH`] bytes ahead.
                ///
                /// # Safety
                /// The CPU has AVX-512F/BW/VL (and AVX512_VBMI with `VBMI`); `recs` holds `k`
                /// records; rows `r0..r0 + MR` of `x`
                /// (`k` floats each) exist; `out` holds `(r0 + MR - 1) * ld + cc + 64` floats.
                #[allow(clippy::too_many_arguments)] // the panel, the rows and the output window
                #[inline]
                #[target_feature(enable = $features)]
                #[allow(clippy::needless_range_loop)] // i and v index the tile
                pub(crate) unsafe fn micro<const MR: usize, const PF: bool>(
                    recs: *const u8,
                    escapes: &[Escape],
                    table: &[u32; 16],
                    k: usize,
                    x: &[f32],
                    r0: usize,
                    out: &mut [f32],
                    ld: usize,
                    cc: usize,
                ) {
                    // SAFETY: the table holds sixteen u32s.
                    let tab = unsafe { _mm512_loadu_si512(table.as_ptr().cast()) };
                    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
                    let xp = x.as_ptr();
                    let mut next = 0;
                    let mut next_kk = escapes.first().map_or(usize::MAX, |e| e.kk as usize);
                    for kk in 0..k {
                        let rec = recs.wrapping_add(kk * RECORD);
                        if PF {
                            // Into L2 (T1): into L1 (T0) a decode step ran 13% slower
                            // (SmolLM2 F32, one process, both alternated).
                            for l in 0..4 {
                                let ahead = rec.wrapping_add(PREFETCH + 64 * l);
                                _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                            }
                        }
                        // SAFETY: kk < k, so the record is whole.
                        let mut b = unsafe { decode64(rec, tab) };
                        if kk == next_kk {
                            (b, next) = patch_record(b, escapes, next, kk);
                            next_kk = escapes.get(next).map_or(usize::MAX, |e| e.kk as usize);
                        }
                        for i in 0..MR {
                            // SAFETY: row r0 + i of x holds element kk.
                            let a = _mm512_set1_ps(unsafe { *xp.add((r0 + i) * k + kk) });
                            for v in 0..4 {
                                acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
                            }
                        }
                    }
                    for i in 0..MR {
                        for v in 0..4 {
                            let at = (r0 + i) * ld + cc + 16 * v;
                            if let Some(dst) = out.get_mut(at..at + 16) {
                                // SAFETY: dst holds sixteen floats.
                                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), acc[i][v]) };
                            }
                        }
                    }
                }
            }
        };
    }

    zmm_paths!(
        vbmi,
        "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c",
        spread_vbmi
    );
    zmm_paths!(bw, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", spread_bw);

    /// Puts the exponents of the escapes of element `kk` (from `escapes[next]`) into
    /// its decoded values `b`; returns them and the index of the first escape after
    /// them. Rare (about one record in seventy on SmolLM2), so kept out of the loop.
    /// It takes and returns the values: given a reference, the compiler kept them in
    /// memory throughout the loop, every record's values stored and each row's FMAs
    /// loading them again.
    #[cold]
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) fn patch_record(
        mut b: [__m512; 4],
        escapes: &[Escape],
        mut next: usize,
        kk: usize,
    ) -> ([__m512; 4], usize) {
        let mut vals = [0.0f32; ROWS];
        for (g, v) in b.iter().enumerate() {
            // SAFETY: vals holds 64 floats.
            unsafe { _mm512_storeu_ps(vals.as_mut_ptr().add(16 * g), *v) };
        }
        while let Some(e) = escapes.get(next).filter(|e| e.kk as usize == kk) {
            if let Some(v) = vals.get_mut(usize::from(e.col)) {
                *v = super::with_exponent(*v, e.exp);
            }
            next += 1;
        }
        for (g, v) in b.iter_mut().enumerate() {
            // SAFETY: vals holds 64 floats.
            *v = unsafe { _mm512_loadu_ps(vals.as_ptr().add(16 * g)) };
        }
        (b, next)
    }
}
