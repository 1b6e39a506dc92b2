//! Intel AMX tiles for prompts over weights in panels (Q4_0, Q4_1, Q8_0 and afo's int8)
//! and for the packed kernel's panels (int4, and GGML matrices whose rows do not fill
//! panels), where the CPU has AMX-INT8 and the operating system lets the process use
//! its tile registers (Linux 5.16 and later, asked once with `arch_prctl`).
//!
//! A panel's block is already what a tile multiplies: its quants are eight 64-byte
//! vectors, vector `g` holding quants `4g..4g + 4` of the sixteen weight rows, which is
//! the layout `tdpbsud` takes for its second operand (8 rows of 16 x 4 bytes, `k` = 32).
//! Q8_0 and int8 blocks are read in place; Q4_0 and Q4_1 blocks are split into their
//! nibbles once per panel and call (the same two masks and shift as the VNNI kernel).
//! Sixteen activation rows of one block are the first operand (16 rows x 32 bytes, read
//! in place from [`QuantizedActs`](super::QuantizedActs)), so one `tdpbsud` gives the
//! 16 x 16 integer dot products of a block that the VNNI kernel builds with eight
//! `vpdpbusd` per row. The packed kernel's per-call panels ([`super::packed_vnni`]) have
//! the same layout, so its whole tiles of sixteen rows run the same pipeline
//! ([`packed_rows`]) with its own scale steps.
//!
//! # Arithmetic
//!
//! A tile's sums are exact integers, the same the VNNI kernel forms (signed activation
//! bytes times unsigned weight bytes, no saturation), and each block's sum then takes
//! the VNNI kernel's steps in its order: the offset taken back (`8 x sum(q_x)` for
//! Q4_0, `128 x sum(q_x)` for Q8_0 and int8, Q4_1's minimum as a separate sum), one
//! `fma` by `d_w x d_x` into the row's accumulator. So every output is the VNNI
//! kernel's bit for bit (tested), whichever kernel a call takes.
//!
//! # Speed
//!
//! One `tdpbsud` does a block's 16 x 16 x 32 products; the vector units then spend four
//! instructions per row on its sums (the offset, broadcast from a per-call array; the
//! conversion; the scale; the FMA), and that work, not the tile unit, bounds the kernel:
//! a 1536 x 576 Q8_0 matrix times 256 rows on one thread runs about 1.3x the VNNI
//! kernel's rate (215-231 against 162-174 GMAC/s, alternated in one process). The next
//! block's product is queued before this block's sums are scaled, in the other of two
//! tile sets; scaling one block behind its store measured the same. Rows after the last
//! whole tile of sixteen take the VNNI kernel.
//!
//! # Scratch
//!
//! Per call and thread, freed when it returns: Q4 panels' split tiles (`nb x 512`
//! bytes, 24 KiB at `k` = 1536), the offsets (four bytes per block and row: 96 KiB for
//! 512 rows at `k` = 1536) and two 1 KiB buffers of sums: temporaries of the size of the
//! quantized activations' own per-block sums, within the estimator's allowance for
//! temporaries.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Kernel;
use super::acts::ActsView;
use super::driver::{F_I8, F_Q4_0, F_Q4_1, F_Q8_0};
use super::panels::{PANEL_ROWS, PanelRows, format_of, header_bytes};

/// Activation rows from which a product over weights in panels takes the AMX tiles
/// (where [`amx_available`]): fewer take the VNNI kernel's eight-row register tiles.
/// A call's rows are taken in whole tiles of sixteen; the rows after the last whole tile
/// take the VNNI kernel (the same bits).
pub const AMX_MIN_ROWS: usize = 16;

/// How far ahead of its reads a panel's first row tile prefetches weight bytes.
const PREFETCH: usize = 8192;

/// Bytes of one block's quants in a panel: eight 64-byte vectors.
const BLOCK_TILE_BYTES: usize = 8 * 64;

/// Set by [`disable_amx`].
static OFF: AtomicBool = AtomicBool::new(false);

/// Whether the OS granted this process the tile registers (asked once).
static GRANTED: OnceLock<bool> = OnceLock::new();

/// Keeps the panel kernels on AVX-512 VNNI even where AMX tiles are available (for
/// timing one against the other: `afo --no-amx`). Takes effect for every call after it.
pub fn disable_amx() {
    OFF.store(true, Ordering::Relaxed);
}

/// Whether prompts over weights in panels run on AMX tiles: the CPU has AMX-INT8, the
/// OS grants the tile registers, the kernels in use are AVX-512 VNNI ([`Kernel::detect`],
/// so `--kernels avx2` has no tiles) and [`disable_amx`] was not called.
pub fn amx_available() -> bool {
    !OFF.load(Ordering::Relaxed)
        && Kernel::detect() == Kernel::Avx512Vnni
        && *GRANTED.get_or_init(request_tiles)
}

/// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25),
/// whether or not the OS grants the tiles.
pub fn has_amx_int8() -> bool {
    if __cpuid(0).eax < 7 {
        return false;
    }
    let leaf = __cpuid_count(7, 0);
    (leaf.edx >> 24) & 3 == 3
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22).
pub fn has_amx_bf16() -> bool {
    if __cpuid(0).eax < 7 {
        return false;
    }
    let leaf = __cpuid_count(7, 0);
    (leaf.edx >> 24) & 1 == 1 && (leaf.edx >> 22) & 1 == 1
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`): granted once for the whole process.
#[cfg(target_os = "linux")]
fn request_tiles() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    if !Kernel::Avx512Vnni.is_available() || !has_amx_int8() {
        return false;
    }
    let ret: i64;
    // SAFETY: a system call that only changes which register states this process may
    // use; it reads and writes no memory of ours. `syscall` clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tiles() -> bool {
    false
}

/// A tile configuration (`ldtilecfg`'s 64 bytes): palette 1; tiles 0 and 1 hold the
/// sums (16 x 16 int32), 2 and 3 the activations (16 rows x 32 bytes), 4 and 5 the
/// weights (8 x 64 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let rows = PANEL_ROWS as u8;
        Self::with([
            (0, rows, 64),
            (1, rows, 64),
            (2, rows, 32),
            (3, rows, 32),
            (4, 8, 64),
            (5, 8, 64),
        ])
    }

    /// The configuration of the bf16 kernel ([`super::amx_f32`]): all eight tiles 16
    /// rows of 64 bytes (sums in 0-3, activations in 4 and 5, weights in 6 and 7).
    fn bf16() -> Self {
        Self::with((0..8).map(|tile| (tile, PANEL_ROWS as u8, 64)))
    }

    /// Palette 1 with each `(tile, rows, bytes a row)`; the other tiles unused.
    fn with(shapes: impl IntoIterator<Item = (usize, u8, u16)>) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (tile, tile_rows, colsb) in shapes {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&colsb.to_le_bytes());
            c[48 + tile] = tile_rows;
        }
        TileConfig(c)
    }

    /// Loads this configuration (zeroing every tile).
    ///
    /// # Safety
    /// The OS granted the tile registers ([`amx_available`]).
    unsafe fn load(&self) {
        // SAFETY: reads the 64 bytes of `self`; the caller's grant.
        unsafe { asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly)) };
    }
}

/// The tile registers configured for this thread's kernel call ([`TileConfig`]);
/// released when dropped (so a context switch no longer saves them).
pub(super) struct Tiles(());

impl Tiles {
    /// Loads the configuration.
    ///
    /// # Safety
    /// The OS granted the tile registers ([`amx_available`] held).
    pub(super) unsafe fn acquire() -> Tiles {
        // SAFETY: the caller's grant.
        unsafe { TileConfig::new().load() };
        Tiles(())
    }

    /// Loads the bf16 kernel's configuration ([`TileConfig::bf16`]).
    ///
    /// # Safety
    /// The OS granted the tile registers ([`amx_available`] held).
    pub(super) unsafe fn acquire_bf16() -> Tiles {
        // SAFETY: the caller's grant.
        unsafe { TileConfig::bf16().load() };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after the grant (`acquire`).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Each block's `offset x sum(q_x)` for the first `rows` rows of `a` (what offset
/// weights add to a block's integer sum), computed once per call so that the scaling
/// broadcasts it from memory.
pub(super) fn offsets(a: &ActsView<'_>, rows: usize, offset: i32) -> Vec<i32> {
    a.sums
        .iter()
        .take(rows * a.stride)
        .map(|&s| offset * s)
        .collect()
}

/// Expands `$step!(i)` for each of a tile's sixteen rows, `i` a literal: constant
/// indices keep the rows' accumulators in registers (a loop left them on the stack).
macro_rules! for_each_row {
    ($step:ident) => {
        $step!(0);
        $step!(1);
        $step!(2);
        $step!(3);
        $step!(4);
        $step!(5);
        $step!(6);
        $step!(7);
        $step!(8);
        $step!(9);
        $step!(10);
        $step!(11);
        $step!(12);
        $step!(13);
        $step!(14);
        $step!(15);
    };
}

/// One block's tile product into tile set `$t` (sums in tile `$t`, activations in
/// `2 + $t`, weights in `4 + $t`), and the store of that set's sums.
macro_rules! tile_set {
    ($issue:ident, $store:ident, $c:literal, $a:literal, $b:literal) => {
        /// Zeroes the sums and multiplies the activation rows at `x` (`stride` bytes
        /// apart, as many as the configuration's rows, 32 bytes each) by the weight
        /// block at `w` (512 bytes).
        ///
        /// # Safety
        /// A configuration is loaded; the bytes lie in memory we may read.
        #[inline(always)]
        unsafe fn $issue(x: *const i8, stride: usize, w: *const u8) {
            // SAFETY: the caller's.
            unsafe {
                asm!(
                    concat!("tilezero tmm", $c),
                    concat!("tileloadd tmm", $a, ", [{x} + {sx}*1]"),
                    concat!("tileloadd tmm", $b, ", [{w} + {sw}*1]"),
                    concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
                    x = in(reg) x,
                    sx = in(reg) stride,
                    w = in(reg) w,
                    sw = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }

        /// Stores the set's sums, 64 bytes a row, at `out`.
        ///
        /// # Safety
        /// A configuration is loaded; `out` holds as many 64-byte rows.
        #[inline(always)]
        unsafe fn $store(out: *mut i32) {
            // SAFETY: the caller's.
            unsafe {
                asm!(
                    concat!("tilestored [{o} + {so}*1], tmm", $c),
                    o = in(reg) out,
                    so = in(reg) 64usize,
                    options(nostack),
                );
            }
        }
    };
}

tile_set!(issue0, store0, "0", "2", "4");
tile_set!(issue1, store1, "1", "3", "5");

/// Sixteen rows of sixteen sums, on cache lines.
#[repr(C, align(64))]
pub(super) struct Sums([i32; PANEL_ROWS * PANEL_ROWS]);

impl Sums {
    /// The two buffers of the two tile sets.
    pub(super) fn pair() -> [Sums; 2] {
        [
            Sums([0; PANEL_ROWS * PANEL_ROWS]),
            Sums([0; PANEL_ROWS * PANEL_ROWS]),
        ]
    }
}

/// One block's weight quants for a tile, on cache lines.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct WeightTile([u8; BLOCK_TILE_BYTES]);

/// The panel kernels' `columns` on AMX tiles: the panels of `cols` of `w` for activation
/// rows `0..m`, sixteen at a time; with `w.scales` (int8), each column times its row's
/// scale. The same results as the VNNI kernel, bit for bit.
///
/// # Safety
/// [`amx_available`] held; the CPU has the features enabled here; the panels of `cols`
/// lie in `w.bytes`, `w.scales` (if any) holds their rows, and the activation and output
/// bounds of the panel kernels hold (rows `0..m` of `a` with `nb` blocks, `out` holding
/// `m` rows of `ld` with `cols.len()` columns).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn columns<const F: u8>(
    w: PanelRows<'_>,
    a: ActsView<'_>,
    m: usize,
    cols: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let PanelRows {
        bytes,
        nb,
        rb,
        scales,
    } = w;
    let wt = format_of(F);
    let chunk = PANEL_ROWS * wt.block_bytes();
    let hb = header_bytes(wt);
    let nibbles = F == F_Q4_0 || F == F_Q4_1;
    let mut split = vec![WeightTile([0; BLOCK_TILE_BYTES]); if nibbles { nb } else { 0 }];
    let mut sums = Sums::pair();
    // Whole tiles of sixteen rows here; the rows after the last whole tile take the
    // VNNI kernel (the same bits).
    let tiled = m - m % PANEL_ROWS;
    // What each block's sum takes back for the weights' offset (Q4_0's 8 and Q8_0's and
    // int8's 128 times the activations' sum), once per call: a broadcast from memory
    // then costs the vector units nothing.
    let offsets = match F {
        F_Q4_0 => offsets(&a, tiled, 8),
        F_Q8_0 | F_I8 => offsets(&a, tiled, 128),
        // Q4_1 takes its minimums instead.
        _ => Vec::new(),
    };
    let base = bytes.as_ptr();
    // SAFETY: `amx_available` held (the caller's).
    let tiles_held = (tiled > 0).then(|| unsafe { Tiles::acquire() });
    let mut c = cols.start;
    while c < cols.end && tiled > 0 {
        // SAFETY: rows c..c + 16 are within the matrix (the caller's bounds).
        let p = unsafe { base.add(c * rb) };
        let sc = match scales.map(|s| s.get(c..c + PANEL_ROWS)) {
            // SAFETY: sixteen floats.
            Some(Some(s)) => Some(unsafe { _mm512_loadu_ps(s.as_ptr()) }),
            Some(None) => break,
            None => None,
        };
        if nibbles {
            for (b, tile) in split.iter_mut().enumerate() {
                // SAFETY: block b of the panel holds four 64-byte vectors of nibbles
                // after its header.
                unsafe { unpack_nibbles(p.add(b * chunk + hb), tile) };
            }
        }
        let tiles = nibbles.then_some(split.as_slice());
        let cc = c - cols.start;
        for r in (0..tiled).step_by(PANEL_ROWS) {
            // SAFETY: rows r..r + 16 of `a` hold nb blocks, the panel nb blocks (the
            // caller's bounds), `split` one tile per block when it is used.
            let acc =
                unsafe { tile_rows::<F>(p, chunk, hb, tiles, &a, &offsets, r, nb, &mut sums) };
            for (i, v) in acc.iter().enumerate() {
                let v = match sc {
                    Some(s) => _mm512_mul_ps(*v, s),
                    None => *v,
                };
                let at = (r + i) * ld + cc;
                if let Some(dst) = out.get_mut(at..at + PANEL_ROWS) {
                    // SAFETY: `dst` holds sixteen floats.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) };
                }
            }
        }
        c += PANEL_ROWS;
    }
    drop(tiles_held);
    if tiled < m
        && let Some(rest) = out.get_mut(tiled * ld..)
    {
        // SAFETY: the caller's bounds, for rows tiled..m.
        unsafe {
            super::panels::vnni_columns::<F>(w, a.rows_from(tiled), m - tiled, cols, rest, ld)
        };
    }
}

/// Splits a Q4 block's four vectors of nibble bytes into the eight vectors of one byte
/// per quant that a tile takes: vector `g` the low nibbles of vector `g`, vector `g + 4`
/// the high ones (the VNNI kernel's `wv`).
///
/// # Safety
/// `q` points to 256 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_nibbles(q: *const u8, out: &mut WeightTile) {
    let low = _mm512_set1_epi8(0x0F);
    let dst = out.0.as_mut_ptr();
    for g in 0..4 {
        // SAFETY: four 64-byte vectors at `q`; eight in `out`.
        unsafe {
            let raw = _mm512_loadu_si512(q.add(64 * g).cast());
            _mm512_store_si512(dst.add(64 * g).cast(), _mm512_and_si512(raw, low));
            _mm512_store_si512(
                dst.add(64 * (g + 4)).cast(),
                _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low),
            );
        }
    }
}

/// The tile products of activation rows `r0..r0 + 16` of `a` with weight tiles
/// `weights(b)` (512 bytes each), blocks `0..nb`: each block's product is queued on the
/// tile unit before the previous block's sums are handed to `scale` (with the sixteen
/// accumulators) on the vector units, in two tile sets; `before(b)` runs at the start
/// of block `b`'s step.
///
/// # Safety
/// The tiles are configured ([`Tiles`]); rows `r0..r0 + 16` of `a` hold `nb` blocks and
/// `weights(b)` points to 512 readable bytes for every `b < nb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pipeline(
    a: &ActsView<'_>,
    r0: usize,
    nb: usize,
    sums: &mut [Sums; 2],
    weights: impl Fn(usize) -> *const u8,
    mut before: impl FnMut(usize),
    mut scale: impl FnMut(usize, &Sums, &mut [__m512; PANEL_ROWS]),
) -> [__m512; PANEL_ROWS] {
    let stride = a.stride * super::blocks::BLOCK_ELEMS;
    let mut acc = [_mm512_setzero_ps(); PANEL_ROWS];
    if nb == 0 {
        return acc;
    }
    // SAFETY (of every issue below): block b of rows r0.. and the weight tile exist.
    unsafe { issue0(a.block_ptr(r0, 0), stride, weights(0)) };
    for b in 0..nb {
        before(b);
        if b + 1 < nb {
            let (x, w) = (a.block_ptr(r0, b + 1), weights(b + 1));
            // SAFETY: as above.
            unsafe {
                if b % 2 == 0 {
                    issue1(x, stride, w);
                } else {
                    issue0(x, stride, w);
                }
            }
        }
        let s = &mut sums[b % 2];
        // SAFETY: sixteen rows of 64 bytes.
        unsafe {
            if b % 2 == 0 {
                store0(s.0.as_mut_ptr());
            } else {
                store1(s.0.as_mut_ptr());
            }
        }
        scale(b, s, &mut acc);
    }
    acc
}

/// The sixteen dot products of the panel at `p` with activation rows `r0..r0 + 16`,
/// `nb` blocks each. Block `b`'s
/// tile of quants is `tiles[b]` (split nibbles) or the panel's own, `hb` bytes into the
/// block.
///
/// # Safety
/// The configuration is loaded; `p` points to a whole panel of `nb` blocks of
/// format `F` (`chunk` bytes each), `tiles` (if any) holds `nb` tiles; rows
/// `r0..r0 + 16` of `a` exist with at least `nb` blocks, scales and sums; `offsets` is
/// indexed as `a`'s sums.
#[allow(clippy::too_many_arguments)] // the panel, its tiles and the rows
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_rows<const F: u8>(
    p: *const u8,
    chunk: usize,
    hb: usize,
    tiles: Option<&[WeightTile]>,
    a: &ActsView<'_>,
    offsets: &[i32],
    r0: usize,
    nb: usize,
    sums: &mut [Sums; 2],
) -> [__m512; PANEL_ROWS] {
    let weights = |b: usize| -> *const u8 {
        match tiles {
            // SAFETY (of the reads): `nb` tiles.
            Some(t) => unsafe { t.get_unchecked(b).0.as_ptr() },
            // The panel's block b, its quants after the header.
            None => p.wrapping_add(b * chunk + hb),
        }
    };
    // The first rows of a panel ask for the bytes PREFETCH ahead (the next panels when
    // this one ends), as the VNNI kernel does: a batch of few rows streams the weights
    // once.
    let prefetch = |b: usize| {
        if r0 == 0 {
            let blk = p.wrapping_add(b * chunk + PREFETCH);
            for at in (0..chunk).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(at).cast());
            }
        }
    };
    // SAFETY: block b of the panel is inside it (b < nb), rows r0..r0 + 16 hold block b,
    // the tiles and `offsets` are the caller's.
    let scale = |b: usize, s: &Sums, acc: &mut [__m512; PANEL_ROWS]| unsafe {
        scale_block::<F>(p.add(b * chunk), s, a, offsets, r0, b, acc)
    };
    // SAFETY: the caller's.
    let mut acc = unsafe { pipeline(a, r0, nb, sums, weights, prefetch, scale) };
    if F == F_Q4_1 {
        // Q4_1's minimums times the activations' sums: a chain of its own per row in
        // the VNNI kernel, summed here after the tiles' (the same operations in the
        // same order, and the registers stay free for the tiles' accumulators).
        let mut accm = [_mm512_setzero_ps(); PANEL_ROWS];
        for b in 0..nb {
            // SAFETY: block b's header holds sixteen f16 minimums after the scales.
            let mins = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.add(b * chunk + 32).cast()) });
            for (i, m) in accm.iter_mut().enumerate() {
                // SAFETY: row r0 + i's block b exists (the caller's).
                let dsx = unsafe { *a.ds.get_unchecked((r0 + i) * a.stride + b) };
                *m = _mm512_fmadd_ps(mins, _mm512_set1_ps(dsx), *m);
            }
        }
        for (v, m) in acc.iter_mut().zip(accm) {
            *v = _mm512_add_ps(*v, m);
        }
    }
    acc
}

/// Adds block `b`'s sums (`s`, sixteen rows of sixteen) to the rows' accumulators, the
/// VNNI kernel's steps in its order.
///
/// # Safety
/// `blk` points to the panel's block `b` (its header first); rows `r0..r0 + 16` of `a`
/// hold block `b`.
#[allow(clippy::too_many_arguments)] // the block, its sums and the rows' accumulators
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scale_block<const F: u8>(
    blk: *const u8,
    s: &Sums,
    a: &ActsView<'_>,
    offsets: &[i32],
    r0: usize,
    b: usize,
    acc: &mut [__m512; PANEL_ROWS],
) {
    // SAFETY: the block's header's sixteen f16 scales (and Q4_1's minimums after them)
    // are its first bytes.
    let d = if F == F_I8 {
        _mm512_set1_ps(1.0)
    } else {
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.cast()) })
    };
    // One row's step, written out for each row by `for_each_row`.
    macro_rules! row {
        ($i:literal) => {{
            let idx = (r0 + $i) * a.stride + b;
            // SAFETY: row r0 + i's block b exists (the caller's); the sums row i holds
            // sixteen int32.
            let dx = unsafe { *a.d.get_unchecked(idx) };
            let mut v = unsafe { _mm512_load_si512(s.0.as_ptr().add(PANEL_ROWS * $i).cast()) };
            if F != F_Q4_1 {
                // SAFETY: `offsets` is indexed as the sums.
                let off = unsafe { *offsets.get_unchecked(idx) };
                v = _mm512_sub_epi32(v, _mm512_set1_epi32(off));
            }
            let scale = if F == F_I8 {
                _mm512_set1_ps(dx)
            } else {
                _mm512_mul_ps(d, _mm512_set1_ps(dx))
            };
            acc[$i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), scale, acc[$i]);
        }};
    }
    for_each_row!(row);
}

/// The packed kernel's sixteen-column panel ([`super::packed_vnni`]: `q` holds `nb x 8`
/// vectors, block `b`'s eight at `8b`, the tile layout; `d` and `min` one vector of the
/// sixteen rows' scales and minimums per block) times activation rows `r0..r0 + 16` on
/// tiles: the packed VNNI kernel's results bit for bit (its integer sums, then per block
/// and row `acc = fma(sum, d_w x d_x, acc)` and, but for Q8_0, `acc = fma(min, d_x x
/// sum(q_x), acc)`). `offsets` holds `128 x sum(q_x)` per block (Q8_0).
///
/// # Safety
/// The tiles are configured ([`Tiles`]); `q`, `d` and `min` hold `nb` blocks; rows
/// `r0..r0 + 16` of `a` exist with at least `nb` blocks; `offsets` is indexed as `a`'s
/// sums (for Q8_0).
#[allow(clippy::too_many_arguments)] // the panel's three parts and the rows
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn packed_rows<const F: u8>(
    q: &[__m512i],
    d: &[__m512],
    min: &[__m512],
    a: &ActsView<'_>,
    offsets: &[i32],
    r0: usize,
    nb: usize,
    sums: &mut [Sums; 2],
) -> [__m512; PANEL_ROWS] {
    let weights = |b: usize| q.as_ptr().wrapping_add(8 * b).cast::<u8>();
    let scale = |b: usize, s: &Sums, acc: &mut [__m512; PANEL_ROWS]| {
        let (Some(&dw), Some(&mw)) = (d.get(b), min.get(b)) else {
            return;
        };
        macro_rules! row {
            ($i:literal) => {{
                let idx = (r0 + $i) * a.stride + b;
                // SAFETY: row r0 + i's block b exists (the caller's); the sums row i
                // holds sixteen int32.
                let (dx, dsx) = unsafe { (*a.d.get_unchecked(idx), *a.ds.get_unchecked(idx)) };
                let mut v = unsafe { _mm512_load_si512(s.0.as_ptr().add(PANEL_ROWS * $i).cast()) };
                if F == F_Q8_0 {
                    // SAFETY: `offsets` is indexed as the sums.
                    let off = unsafe { *offsets.get_unchecked(idx) };
                    v = _mm512_sub_epi32(v, _mm512_set1_epi32(off));
                }
                acc[$i] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(v),
                    _mm512_mul_ps(dw, _mm512_set1_ps(dx)),
                    acc[$i],
                );
                if F != F_Q8_0 {
                    acc[$i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsx), acc[$i]);
                }
            }};
        }
        for_each_row!(row);
    };
    // SAFETY: the caller's.
    unsafe { pipeline(a, r0, nb, sums, weights, |_| {}, scale) }
}
