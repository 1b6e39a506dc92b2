//! F32 prompts on AMX-BF16 tiles: each f32 product as six bf16 products, where the CPU
//! has AMX-BF16 and the OS grants the tiles ([`bf16x6_available`]), for calls of
//! [`DENSE_BF16X6_MIN_ROWS`](super::DENSE_BF16X6_MIN_ROWS) rows or more; over f16 or
//! bf16 weights, the passes their values need: five or three.
//!
//! # Arithmetic
//!
//! Every f32 value `v` is split into three bf16 values, `v = hi + mid + lo` exactly (a
//! float's 24 significant bits in three pieces of 8): `hi` is `v` rounded to nearest
//! (`|v - hi| <= 2^-8 |v|`), `mid` the next eight bits, `lo` the rest (`|lo| < 2^-15
//! |v|`). `x · w` is taken as the six products `hi·hi + hi·mid + mid·hi + mid·mid +
//! hi·lo + lo·hi`; what is dropped (`mid·lo + lo·mid + lo·lo`) is below 2^-22 of
//! `|x||w|`, a few times f32's own rounding of one product (2^-24). `tdpbf16ps` forms
//! each bf16 product exactly and adds it into an f32 accumulator, rounding to nearest,
//! so a dot product keeps f32's accuracy: tested within the FMA kernel's tolerance of
//! the exact f64 product for every shape, one product alone within eight units of
//! 2^-24 (a scheme of three passes misses both by far). It is the six-pass scheme
//! accelerators use for full-precision f32 products on bf16 units. Values below f32's
//! normal range count as zero (the tile unit's rule for its inputs): 2^-126 and
//! smaller, which no weight or activation reaches in a sum that matters. An infinite
//! input makes its row's outputs NaN (the FMA chains give infinities): not a number a
//! model can use either way, and no other row is touched (tested).
//!
//! Weights of f16 values split into `hi` and `mid` exactly (eleven significant bits;
//! `lo` is zero) and bf16 values are their own `hi`: the passes with a zero weight part
//! are skipped (five passes for f16, three for bf16), which changes no bit of the sums
//! (the same values in f32 panels give the same results, tested).
//!
//! A row's outputs depend on that row alone (a tile's sixteen rows are independent dot
//! products, padded with zero rows; a part's sums are stored and loaded as f32, so a
//! row takes the same operations however the call's rows are cut), so a prompt's rows
//! do not depend on the thread count or on the rows beside them; they are not the FMA
//! kernel's bits, which a decode step (one row, at the memory's pace) keeps.
//!
//! # Layout
//!
//! A thread takes its rows in chunks of up to [`ROW_CHUNK`] and `k` in parts of up to
//! [`K_PART`] values (whole blocks of 32; fewer where a chunk's activation planes would
//! pass [`PLANES_BYTES`], about a core's L2 beside one panel's weight tiles). Per part:
//! the chunk's activations are converted once into three bf16 planes, stored as tiles
//! (16 rows x 32 values each, the padding rows and values zero); then each panel of 64
//! columns ([`DensePanels`]'s layout, value `kk` of column `j` at `[kk * 64 + j]`;
//! coded panels decode the part first; f16 and bf16 rows, 64 of them a panel, are read
//! a pair of values of sixteen rows at a time, one gather) is converted into the tiles
//! `tdpbf16ps` takes for its second operand: per group of 16 columns, block of 32
//! values and plane, 16 rows of 16 pairs (values `2r` and `2r + 1` of each column side
//! by side). The kernel
//! holds a 2 x 2 block of sums (32 rows x 32 columns) in four tiles and runs the six
//! passes per block with two activation and two weight tiles, keeping whichever operand
//! the next pass shares.
//!
//! # Speed
//!
//! The FMA tiles run at about 80 GMAC/s a thread here (near the two FMA units' peak);
//! the tiles' products run about twice that, and converting each panel's weights once
//! per chunk (every thread converts every panel: a prompt splits its rows across
//! threads; splitting the columns instead ran 30-45% slower) costs about a quarter of
//! it: one 1536 x 576 matrix times 512 rows on two threads runs 1.2-1.35x the FMA
//! tiles, 576 x 1536 1.15x; a 512-token f32 prompt +16-20% in one process. Below about
//! 256 rows the conversion is not repaid (0.55x at 16 rows, 0.74-0.80x at 64).
//!
//! # Scratch
//!
//! Per call and thread, freed when it returns: the activation planes of a part (at most
//! [`PLANES_BYTES`], 1.5 MiB), one panel's weight tiles for a part (`384` bytes a value
//! of `k`, at most 384 KiB) and, for coded panels, the part decoded (at most 256 KiB): a
//! fixed size per thread within the runtime's base overhead, like the packed GEMM's
//! panel buffers.
//!
//! [`DensePanels`]: super::DensePanels

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use super::amx::{Tiles, amx_available, has_amx_bf16};

/// Values of `k` one tile row holds (64 bytes of bf16).
const KB: usize = 32;
/// Rows of a tile.
const TR: usize = 16;
/// Columns of a panel ([`super::DENSE_PANEL_ROWS`]).
const PANEL: usize = 64;
/// Tiles of 16 columns in a panel.
const GROUPS: usize = PANEL / TR;
/// Planes of a split value.
const PLANES: usize = 3;
/// Activation rows a thread converts at once: a call's rows are cut into even chunks
/// of at most this many, and each panel's weight tiles are converted once per chunk.
const ROW_CHUNK: usize = 512;

/// Most values of `k` in one part: the coded panels' decode buffer holds this many
/// values of a panel's 64 columns.
pub(super) const K_PART: usize = 1024;

/// Bytes of activation planes a part may take (about the L2 a thread has beside one
/// panel's weight tiles, 2 MiB a core where this was measured).
const PLANES_BYTES: usize = 3 << 19;

/// Values of `k` in a part for a chunk of `rows` rows: as many whole blocks as keep its
/// planes within [`PLANES_BYTES`], at least one, at most [`K_PART`].
fn k_part(rows: usize) -> usize {
    let per_value = 2 * PLANES * rows.next_multiple_of(TR);
    (PLANES_BYTES / per_value / KB * KB).clamp(KB, K_PART)
}

/// The six passes, as (activation plane, weight plane), 0 = hi, 1 = mid, 2 = lo, in an
/// order where one operand's tiles stay loaded from each pass to the next but the
/// last (16 tile loads per block and 2 x 2 tiles; ordered from the smallest products
/// to `hi·hi`, 20 loads, and 8% slower). The passes after `hi·hi` are each rounded at
/// its size, which the bound of one product alone (eight units of 2^-24) allows for.
const PASSES: [(usize, usize); 6] = [(0, 2), (0, 1), (0, 0), (1, 0), (2, 0), (1, 1)];

/// Whether a dense f32 prompt over panels runs on AMX-BF16 tiles: [`amx_available`]
/// (the CPU has the tiles, the OS grants them, `--no-amx` was not given) and the CPU
/// has AMX-BF16.
pub(super) fn bf16x6_available() -> bool {
    amx_available() && has_amx_bf16()
}

/// One tile's 1 KiB on cache lines.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile1K([u16; 512]);

const ZERO_TILE: Tile1K = Tile1K([0; 512]);

/// `v` rounded to the nearest bf16 (ties to even), as f32 bits with the low 16 zero.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bf16(v: __m512i) -> __m512i {
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(v, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32))
}

/// `x` split into three bf16 planes (f32 bits, low 16 zero): `x = hi + mid + lo`
/// exactly. `hi` is `x` rounded to nearest (`|x - hi| <= 2^-8 |x|`), `mid` the rest cut
/// to eight bits, `lo` the remainder, at most eight bits (`|lo| < 2^-15 |x|`); an
/// infinity's `mid` and `lo` are NaN.
#[inline]
#[target_feature(enable = "avx512f")]
fn split3(x: __m512) -> [__m512i; PLANES] {
    let hi = round_bf16(_mm512_castps_si512(x));
    let r1 = _mm512_sub_ps(x, _mm512_castsi512_ps(hi));
    let mid = _mm512_and_si512(
        _mm512_castps_si512(r1),
        _mm512_set1_epi32(0xFFFF_0000u32 as i32),
    );
    let lo = _mm512_sub_ps(r1, _mm512_castsi512_ps(mid));
    [hi, mid, _mm512_castps_si512(lo)]
}

/// A row block's activations over a part of `k` in three bf16 planes, as tiles: per
/// tile of 16 rows (the block padded with zero rows), block of 32 values and plane,
/// 16 rows of 32 values.
struct Planes {
    v: Vec<Tile1K>,
    /// Blocks of 32 values in the part converted last.
    nkb: usize,
}

impl Planes {
    /// Room for `rows` rows and `nkb` blocks.
    fn new(rows: usize, nkb: usize) -> Self {
        let tiles = rows.div_ceil(TR) * nkb * PLANES;
        Planes {
            v: vec![ZERO_TILE; tiles],
            nkb,
        }
    }

    /// Converts values `kk` (`kk.start` a multiple of 32) of rows `r0..r0 + n` of `x`
    /// (`k` floats each) into rows `0..n`, and zeroes the rows after `n` in its last
    /// tile.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW; `x` holds rows `r0..r0 + n` of `k` floats; `kk` lies in
    /// `0..k`; the planes have room for `n` rows and `kk.len()` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fill(&mut self, x: &[f32], k: usize, r0: usize, n: usize, kk: Range<usize>) {
        let nkb = kk.len().div_ceil(KB);
        self.nkb = nkb;
        let dst = self.v.as_mut_ptr().cast::<u16>();
        // Word i of the result: the high half of dword i of the pair (a, b).
        let idx = _mm512_set_epi16(
            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21,
            19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
        );
        for i in 0..n.next_multiple_of(TR) {
            for kb in 0..nkb {
                let mut planes = [[_mm512_setzero_si512(); PLANES]; 2];
                if i < n {
                    for (h, plane) in planes.iter_mut().enumerate() {
                        let from = kk.start + kb * KB + 16 * h;
                        let len = kk.end.saturating_sub(from).min(16);
                        let mask: __mmask16 = ((1u32 << len) - 1) as u16;
                        // SAFETY: `len` floats of row r0 + i from `from` exist (the
                        // caller's bounds); the mask reads no others.
                        let v = unsafe {
                            _mm512_maskz_loadu_ps(
                                mask,
                                x.as_ptr().wrapping_add((r0 + i) * k + from),
                            )
                        };
                        *plane = split3(v);
                    }
                }
                let [low, high] = planes;
                for (p, (a, b)) in low.iter().zip(&high).enumerate() {
                    let words = _mm512_permutex2var_epi16(*a, idx, *b);
                    let tile = ((i / TR * nkb + kb) * PLANES + p) * 512;
                    // SAFETY: room for the part's tiles (the caller's); row i % 16 of
                    // this one is 32 words.
                    unsafe { _mm512_store_si512(dst.add(tile + 32 * (i % TR)).cast(), words) };
                }
            }
        }
    }

    /// The tile of rows `r..r + 16` (`r` a multiple of 16), block `kb`, plane `p`.
    fn tile(&self, p: usize, r: usize, kb: usize) -> *const u16 {
        self.v
            .as_ptr()
            .wrapping_add((r / TR * self.nkb + kb) * PLANES + p)
            .cast()
    }
}

/// One panel's weights over a part of `k` as tiles: per group of 16 columns, block of
/// 32 values and plane, 16 rows of 16 pairs.
struct WeightTiles {
    v: Vec<Tile1K>,
    /// Blocks of 32 values in the part converted last.
    nkb: usize,
    /// Planes that part holds (the rest are zero and not stored): 3 for f32 values, 2
    /// for f16 values (11 significant bits: `lo` is zero), 1 for bf16 values.
    planes: usize,
}

impl WeightTiles {
    /// Room for `nkb` blocks.
    fn new(nkb: usize) -> Self {
        WeightTiles {
            v: vec![ZERO_TILE; nkb * GROUPS * PLANES],
            nkb,
            planes: PLANES,
        }
    }

    /// Converts `len` values of a panel's 64 columns from `part` (value `i` of column
    /// `j` at `part[i * 64 + j]`); the rest of the last block is zeros.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `part` holds `len x 64` floats; the tiles have room for
    /// `len` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn fill(&mut self, part: *const f32, len: usize) {
        let load = |i: usize, g: usize| {
            if i < len {
                // SAFETY: value i of columns 16g..16g + 16 lies in the part.
                split3(unsafe { _mm512_loadu_ps(part.add(i * PANEL + TR * g)) })
            } else {
                [_mm512_setzero_si512(); PLANES]
            }
        };
        let nkb = len.div_ceil(KB);
        self.nkb = nkb;
        self.planes = PLANES;
        for t in 0..nkb {
            for r in 0..TR {
                let i = t * KB + 2 * r;
                // Values i and i + 1 of the panel's 64 columns: two lines each.
                for g in 0..GROUPS {
                    let (a, b) = (load(i, g), load(i + 1, g));
                    // SAFETY: room for the part's tiles.
                    unsafe { self.store_pairs(t, r, g, &a, &b) };
                }
            }
        }
    }

    /// Converts values `kk` of the 64 rows of a row-major matrix of bf16 values (`f16`:
    /// f16 values) that start at `w`, `k` values a row: row `j` is the panel's column
    /// `j`. Only the planes the type fills are stored: bf16 values are their own `hi`;
    /// an f16 value's `hi` and `mid` hold it exactly.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW; `w` holds 64 rows of `k` values, `k` within
    /// [`ROWS_MAX_K`] (the gather's offsets); `kk` lies in `0..k`; the tiles have room
    /// for `kk.len()` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fill_rows(&mut self, w: *const u16, k: usize, kk: Range<usize>, f16: bool) {
        let len = kk.len();
        let nkb = len.div_ceil(KB);
        self.nkb = nkb;
        self.planes = if f16 { 2 } else { 1 };
        // Byte offsets of sixteen rows' same value.
        let rows = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((2 * k) as i32),
        );
        for t in 0..nkb {
            for r in 0..TR {
                let i = t * KB + 2 * r;
                for g in 0..GROUPS {
                    let first = w.wrapping_add((TR * g) * k + kk.start + i);
                    // Values i and i + 1 of the group's 16 rows, as one dword each (the
                    // value i in the low half).
                    let v = if i + 1 < len {
                        // SAFETY: both values of the 16 rows lie in the part.
                        unsafe { _mm512_i32gather_epi32::<1>(rows, first.cast()) }
                    } else if i < len {
                        // The part's last value of an odd length: the next may lie past
                        // the matrix, so each row's one value is read alone.
                        let mut one = [0u32; TR];
                        for (j, o) in one.iter_mut().enumerate() {
                            // SAFETY: value i of row j lies in the part.
                            *o = u32::from(unsafe { *first.add(j * k) });
                        }
                        // SAFETY: sixteen dwords.
                        unsafe { _mm512_loadu_si512(one.as_ptr().cast()) }
                    } else {
                        _mm512_setzero_si512()
                    };
                    let (a, b) = if f16 {
                        let widen = |h: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
                        (split3(widen(v)), split3(widen(_mm512_srli_epi32::<16>(v))))
                    } else {
                        let mut a = [_mm512_setzero_si512(); PLANES];
                        let mut b = a;
                        a[0] = _mm512_slli_epi32::<16>(v);
                        b[0] = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
                        (a, b)
                    };
                    // SAFETY: room for the part's tiles.
                    unsafe { self.store_pairs(t, r, g, &a, &b) };
                }
            }
        }
    }

    /// Stores row `r` of block `t`, group `g`, of the planes this part holds: the
    /// values `a` (value `2r`) and `b` (value `2r + 1`) of the group's 16 columns, as
    /// f32 bits with the low 16 zero, side by side per column.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the tiles have room for block `t`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_pairs(
        &mut self,
        t: usize,
        r: usize,
        g: usize,
        a: &[__m512i; PLANES],
        b: &[__m512i; PLANES],
    ) {
        let dst = self.v.as_mut_ptr();
        for p in 0..self.planes {
            let pair = _mm512_or_si512(_mm512_srli_epi32::<16>(a[p]), b[p]);
            let tile = (g * self.nkb + t) * PLANES + p;
            // SAFETY: the caller's room; row r of this tile is 32 words.
            unsafe { _mm512_store_si512(dst.add(tile).cast::<u16>().add(32 * r).cast(), pair) };
        }
    }

    fn tile(&self, kb: usize, g: usize, p: usize) -> *const u16 {
        self.v
            .as_ptr()
            .wrapping_add((g * self.nkb + kb) * PLANES + p)
            .cast()
    }
}

/// Where the passes' results go: sum tile `t` (0-3) of rows `first..first + rows` of a
/// chunk, 16 columns at `at` in the output.
struct SumTile {
    t: usize,
    at: usize,
    rows: usize,
}

/// The longest rows [`Weights::Rows`] takes: sixteen rows' byte offsets, `2k` apart,
/// are the gather's 32-bit indices.
pub(super) const ROWS_MAX_K: usize = i32::MAX as usize / (2 * TR);

/// Where [`gemm`] finds a panel's weights.
pub(super) enum Weights<'a> {
    /// f32 values: `panel(i, kk)` returns values `kk` of panel `i` (`kk.len() x 64`
    /// floats, value `kk.start + v` of column `j` at `[v * 64 + j]`, valid until its
    /// next call; parts are at most [`K_PART`] values long, so a decoder needs at most
    /// that many x 64 floats of its own). Six passes.
    F32(&'a mut dyn FnMut(usize, Range<usize>) -> *const f32),
    /// A row-major matrix of f16 values (`f16`) or bf16 values, `k` a row, its row
    /// `64 i + j` column `j` of panel `i`. Five passes for f16 (`lo` of an f16 value is
    /// zero), three for bf16 (a bf16 value is its own `hi`).
    Rows { w: *const u16, f16: bool },
}

/// `out[r * ld + 64 i + j] = x_r · w_(64 i + j)` for rows `0..m` of `x` (`k` floats each)
/// and the `npanels` panels of `weights`.
///
/// Rows are taken in chunks of up to [`ROW_CHUNK`] and `k` in parts of up to [`K_PART`]
/// values (fewer where a chunk's planes would pass [`PLANES_BYTES`]), whole blocks of 32
/// but the last: the sums of a part are stored as f32 and loaded again for the next, so
/// each output takes the same operations in the same order however the rows are cut.
///
/// # Safety
/// [`bf16x6_available`] held; `x` holds `m x k` floats; every pointer a `Weights::F32`
/// closure returns holds the values asked for, a row-major matrix `64 npanels` rows of
/// `k` values; `out` holds `(m - 1) * ld + 64 * npanels` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn gemm(
    mut weights_of: Weights<'_>,
    npanels: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let chunk = m.div_ceil(m.div_ceil(ROW_CHUNK)).next_multiple_of(2 * TR);
    let part = k.div_ceil(k.div_ceil(k_part(chunk))).next_multiple_of(KB);
    let mut planes = Planes::new(chunk, part / KB);
    let mut weights = WeightTiles::new(part / KB);
    let mut spill = Tile1K([0; 512]);
    // SAFETY: the caller's grant.
    let tiles = unsafe { Tiles::acquire_bf16() };
    let mut r0 = 0;
    while r0 < m {
        let n = (m - r0).min(chunk);
        for k0 in (0..k).step_by(part) {
            let kk = k0..(k0 + part).min(k);
            // SAFETY: the caller's CPU; x holds rows r0..r0 + n; room for n rows and
            // the part.
            unsafe { planes.fill(x, k, r0, n, kk.clone()) };
            for i in 0..npanels {
                // SAFETY: the caller's: the part of the panel lies where it says.
                unsafe {
                    match &mut weights_of {
                        Weights::F32(panel) => weights.fill(panel(i, kk.clone()), kk.len()),
                        Weights::Rows { w, f16 } => {
                            weights.fill_rows(w.wrapping_add(i * PANEL * k), k, kk.clone(), *f16)
                        }
                    }
                };
                for t in (0..n).step_by(2 * TR) {
                    let pair = t + TR < n;
                    for g in (0..GROUPS).step_by(2) {
                        let col = PANEL * i + TR * g;
                        let sum_tiles = (0..if pair { 4 } else { 2 }).map(|s| {
                            let first = t + TR * (s / 2);
                            SumTile {
                                t: s,
                                at: (r0 + first) * ld + col + TR * (s % 2),
                                rows: (n - first).min(TR),
                            }
                        });
                        // SAFETY (all below): the tiles are configured; the output
                        // holds the sum tiles' rows (the caller's bounds): loaded and
                        // stored in place when all 16 rows are the call's, else
                        // through the spill, row by row; the planes hold rows t..t + 32
                        // (padded), the weights groups g and g + 1, the part's blocks.
                        unsafe {
                            if k0 == 0 {
                                zero_sums();
                            } else {
                                for st in sum_tiles.clone() {
                                    move_sums::<true>(&st, out, ld, &mut spill);
                                }
                            }
                            sums(&planes, &weights, t, g, pair);
                            for st in sum_tiles {
                                move_sums::<false>(&st, out, ld, &mut spill);
                            }
                        }
                    }
                }
            }
        }
        r0 += n;
    }
    drop(tiles);
}

/// Loads (`LOAD`) or stores sum tile `st.t` from or to its rows of `out`: in place when
/// all 16 are rows of the call, else through `spill`.
///
/// # Safety
/// The bf16 configuration is loaded; `out` holds `st.rows` rows of 16 floats at `st.at`,
/// `ld` apart.
#[inline(always)]
unsafe fn move_sums<const LOAD: bool>(
    st: &SumTile,
    out: &mut [f32],
    ld: usize,
    spill: &mut Tile1K,
) {
    let o = out.as_mut_ptr().wrapping_add(st.at);
    let f = spill.0.as_mut_ptr().cast::<f32>();
    // SAFETY: the caller's; the spill holds 16 rows of 16 floats.
    unsafe {
        if st.rows == TR {
            tile_io::<LOAD>(st.t, o, 4 * ld);
        } else if LOAD {
            for row in 0..st.rows {
                _mm512_store_ps(f.add(TR * row), _mm512_loadu_ps(o.add(row * ld)));
            }
            tile_io::<true>(st.t, f, 64);
        } else {
            tile_io::<false>(st.t, f, 64);
            for row in 0..st.rows {
                _mm512_storeu_ps(o.add(row * ld), _mm512_load_ps(f.add(TR * row)));
            }
        }
    }
}

/// The sums of activation rows `t..t + 32` (`t..t + 16` without `pair`) and the panel's
/// columns `16 g..16 g + 32` over the part's blocks, added into tiles 0-3 (0 and 1 for
/// the first 16 rows).
///
/// # Safety
/// The bf16 configuration is loaded; the planes hold rows `t..t + 32` (or 16), the
/// weights groups `g` and `g + 1`, both the same blocks.
#[inline(always)]
unsafe fn sums(planes: &Planes, weights: &WeightTiles, t: usize, g: usize, pair: bool) {
    // SAFETY: the caller's (all below).
    unsafe {
        for kb in 0..weights.nkb {
            let mut last: Option<(usize, usize)> = None;
            for (pa, pw) in PASSES.into_iter().filter(|&(_, w)| w < weights.planes) {
                if last.is_none_or(|(a, _)| a != pa) {
                    load_acts(planes.tile(pa, t, kb), planes.tile(pa, t + TR, kb), pair);
                }
                if last.is_none_or(|(_, w)| w != pw) {
                    load_weights(weights.tile(kb, g, pw), weights.tile(kb, g + 1, pw));
                }
                if pair {
                    mul2x2();
                } else {
                    mul1x2();
                }
                last = Some((pa, pw));
            }
        }
    }
}

/// Zeroes the four sums (tiles 0-3).
///
/// # Safety
/// The bf16 tile configuration is loaded.
#[inline(always)]
unsafe fn zero_sums() {
    // SAFETY: the caller's.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        )
    };
}

/// Loads activation tiles 4 (from `a0`) and, with `pair`, 5 (from `a1`).
///
/// # Safety
/// The bf16 configuration is loaded; the tiles lie in memory we may read.
#[inline(always)]
unsafe fn load_acts(a0: *const u16, a1: *const u16, pair: bool) {
    // SAFETY: the caller's.
    unsafe {
        asm!("tileloadd tmm4, [{a} + {s}*1]", a = in(reg) a0, s = in(reg) 64usize, options(nostack, readonly));
        if pair {
            asm!("tileloadd tmm5, [{a} + {s}*1]", a = in(reg) a1, s = in(reg) 64usize, options(nostack, readonly));
        }
    }
}

/// Loads weight tiles 6 (from `w0`) and 7 (from `w1`).
///
/// # Safety
/// As [`load_acts`].
#[inline(always)]
unsafe fn load_weights(w0: *const u16, w1: *const u16) {
    // SAFETY: the caller's.
    unsafe {
        asm!(
            "tileloadd tmm6, [{w0} + {s}*1]",
            "tileloadd tmm7, [{w1} + {s}*1]",
            w0 = in(reg) w0,
            w1 = in(reg) w1,
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
}

/// Sums 0-3 += activations 4, 5 times weights 6, 7.
///
/// # Safety
/// The bf16 configuration is loaded.
#[inline(always)]
unsafe fn mul2x2() {
    // SAFETY: the caller's.
    unsafe {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
    }
}

/// Sums 0, 1 += activations 4 times weights 6, 7.
///
/// # Safety
/// The bf16 configuration is loaded.
#[inline(always)]
unsafe fn mul1x2() {
    // SAFETY: the caller's.
    unsafe {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            options(nostack, nomem),
        );
    }
}

/// Loads (`LOAD`) or stores sum tile `t` (0-3) from or at `p`, `stride` bytes a row.
///
/// # Safety
/// The bf16 tile configuration is loaded; `p` holds 16 rows of 64 bytes `stride` apart.
#[inline(always)]
unsafe fn tile_io<const LOAD: bool>(t: usize, p: *mut f32, stride: usize) {
    macro_rules! io {
        ($load:literal, $store:literal) => {
            if LOAD {
                asm!($load, p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
            } else {
                asm!($store, p = in(reg) p, s = in(reg) stride, options(nostack))
            }
        };
    }
    // SAFETY: the caller's.
    unsafe {
        match t {
            0 => io!(
                "tileloadd tmm0, [{p} + {s}*1]",
                "tilestored [{p} + {s}*1], tmm0"
            ),
            1 => io!(
                "tileloadd tmm1, [{p} + {s}*1]",
                "tilestored [{p} + {s}*1], tmm1"
            ),
            2 => io!(
                "tileloadd tmm2, [{p} + {s}*1]",
                "tilestored [{p} + {s}*1], tmm2"
            ),
            _ => io!(
                "tileloadd tmm3, [{p} + {s}*1]",
                "tilestored [{p} + {s}*1], tmm3"
            ),
        }
    }
}
