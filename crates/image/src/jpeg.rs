//! A baseline JPEG decoder that reproduces libjpeg-turbo's default output (the
//! decoder behind PIL, and so behind the reference processor): the accurate integer
//! IDCT (`jpeg_idct_islow`), "fancy" triangle upsampling of subsampled chroma
//! (`h2v1`, `h1v2`, `h2v2`, with edge rows and columns replicated as libjpeg's context
//! rows do) and libjpeg's fixed-point YCbCr -> RGB tables.
//!
//! It handles what most photos are: 8-bit baseline or extended Huffman-coded
//! sequential JPEG, one (grey) or three (YCbCr) components, sampling factors of 1 or 2
//! relative to the largest, restart intervals. Anything else (progressive, arithmetic,
//! lossless, 12-bit, CMYK, Adobe-transformed or RGB-coded files, and streams it cannot
//! decode) returns `None`, and the caller decodes with the general decoder instead.
//! It never panics on malformed input.

use image::RgbImage;

/// Natural (row-major) index of the `k`-th coefficient in zigzag order.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

const LOOKUP_BITS: u32 = 9;

/// A Huffman table: a 9-bit lookup for short codes, canonical-code bounds for longer.
#[derive(Clone)]
struct Huffman {
    /// `len << 8 | value`, or 0 where the code is longer than `LOOKUP_BITS`.
    lookup: Vec<u16>,
    maxcode: [i32; 17],
    mincode: [i32; 17],
    valptr: [usize; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Option<Self> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total > 256 || total != values.len() {
            return None;
        }
        let mut lookup = vec![0u16; 1 << LOOKUP_BITS];
        let mut maxcode = [-1i32; 17];
        let mut mincode = [0i32; 17];
        let mut valptr = [0usize; 17];
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            valptr[len] = k;
            mincode[len] = code;
            for _ in 0..n {
                if code >= 1 << len {
                    return None;
                }
                if len as u32 <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - len as u32;
                    let first = (code as usize) << shift;
                    let entry = (len as u16) << 8 | u16::from(*values.get(k)?);
                    for slot in lookup.get_mut(first..first + (1 << shift))? {
                        *slot = entry;
                    }
                }
                code += 1;
                k += 1;
            }
            if n > 0 {
                maxcode[len] = code - 1;
            }
            code <<= 1;
        }
        Some(Self {
            lookup,
            maxcode,
            mincode,
            valptr,
            values,
        })
    }
}

/// The entropy-coded bit stream of a scan, with byte stuffing removed; reads zeros
/// once a marker is reached.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    at_marker: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            n: 0,
            at_marker: false,
        }
    }

    fn fill(&mut self) {
        while self.n <= 56 {
            let mut byte = 0u8;
            if !self.at_marker {
                match self.data.get(self.pos) {
                    Some(&0xFF) => {
                        if self.data.get(self.pos + 1) == Some(&0) {
                            self.pos += 2;
                            byte = 0xFF;
                        } else {
                            self.at_marker = true;
                        }
                    }
                    Some(&b) => {
                        self.pos += 1;
                        byte = b;
                    }
                    None => self.at_marker = true,
                }
            }
            self.acc |= u64::from(byte) << (56 - self.n);
            self.n += 8;
        }
    }

    fn peek(&self, bits: u32) -> u32 {
        (self.acc >> (64 - bits)) as u32
    }

    fn consume(&mut self, bits: u32) {
        self.acc <<= bits;
        self.n -= bits;
    }

    fn huffman(&mut self, h: &Huffman) -> Option<u8> {
        self.fill();
        let entry = *h.lookup.get(self.peek(LOOKUP_BITS) as usize)?;
        if entry != 0 {
            self.consume(u32::from(entry >> 8));
            return Some(entry as u8);
        }
        for len in LOOKUP_BITS as usize + 1..=16 {
            let code = self.peek(len as u32) as i32;
            if code <= h.maxcode[len] {
                self.consume(len as u32);
                let i = h.valptr[len] + (code - h.mincode[len]) as usize;
                return h.values.get(i).copied();
            }
        }
        None
    }

    /// Reads `s` bits (s <= 16) and sign-extends them as JPEG's `EXTEND`.
    fn receive_extend(&mut self, s: u8) -> Option<i32> {
        if s == 0 {
            return Some(0);
        }
        if s > 16 {
            return None;
        }
        self.fill();
        let s = u32::from(s);
        let v = self.peek(s) as i32;
        self.consume(s);
        Some(if v < 1 << (s - 1) {
            v - (1 << s) + 1
        } else {
            v
        })
    }

    /// At a restart point: drops the buffered bits and steps over the next RSTn marker.
    fn restart(&mut self) -> Option<()> {
        self.acc = 0;
        self.n = 0;
        self.at_marker = false;
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[self.pos + 1]) {
                self.pos += 2;
                return Some(());
            }
            self.pos += 1;
        }
        None
    }
}

/// One colour component and its decoded samples.
#[derive(Clone)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    dc: usize,
    ac: usize,
    pred: i32,
    /// Samples per plane row (whole blocks of whole MCUs).
    stride: usize,
    /// Plane rows.
    rows: usize,
    plane: Vec<u8>,
}

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// One 1-D pass of libjpeg's `jpeg_idct_islow` over eight inputs; returns the eight
/// outputs before descaling.
fn idct_1d(i: [i64; 8]) -> [i64; 8] {
    let z1 = (i[2] + i[6]) * FIX_0_541196100;
    let tmp2 = z1 + i[6] * -FIX_1_847759065;
    let tmp3 = z1 + i[2] * FIX_0_765366865;
    let tmp0 = (i[0] + i[4]) << CONST_BITS;
    let tmp1 = (i[0] - i[4]) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
    let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);

    let (mut t0, mut t1, mut t2, mut t3) = (i[7], i[5], i[3], i[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    t0 *= FIX_0_298631336;
    t1 *= FIX_2_053119869;
    t2 *= FIX_3_072711026;
    t3 *= FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    t0 += z1 + z3;
    t1 += z2 + z4;
    t2 += z2 + z3;
    t3 += z1 + z4;
    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

/// The level of a block whose only nonzero coefficient is its dequantised DC.
fn dc_level(dc: i32) -> u8 {
    (descale(i64::from(dc) << PASS1_BITS, PASS1_BITS + 3) + 128).clamp(0, 255) as u8
}

/// libjpeg's accurate integer IDCT of a dequantised block (natural order), written
/// as 8x8 samples at `out[row * stride + col]`.
fn idct_islow(coef: &[i32; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let c = |r: usize| i64::from(coef[r * 8 + col]);
        if (1..8).all(|r| c(r) == 0) {
            let dc = c(0) << PASS1_BITS;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let o = idct_1d([c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7)]);
        for r in 0..8 {
            ws[r * 8 + col] = descale(o[r], CONST_BITS - PASS1_BITS);
        }
    }
    for row in 0..8 {
        let w = &ws[row * 8..row * 8 + 8];
        let Some(dst) = out.get_mut(row * stride..row * stride + 8) else {
            return;
        };
        if w[1..].iter().all(|&v| v == 0) {
            let v = (descale(w[0], PASS1_BITS + 3) + 128).clamp(0, 255) as u8;
            dst.fill(v);
            continue;
        }
        let o = idct_1d([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        for (d, v) in dst.iter_mut().zip(o) {
            *d = (descale(v, CONST_BITS + PASS1_BITS + 3) + 128).clamp(0, 255) as u8;
        }
    }
}

/// Everything read from the markers so far.
struct State {
    qt: [[u16; 64]; 4],
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    restart_interval: usize,
    width: usize,
    height: usize,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcus_x: usize,
    mcus_y: usize,
}

fn be16(data: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *data.get(at)?,
        *data.get(at + 1)?,
    ])))
}

/// Decodes a JPEG as libjpeg-turbo does by default, or returns `None` when the file is
/// outside what this decoder handles (see the module documentation).
pub(crate) fn decode(data: &[u8]) -> Option<RgbImage> {
    if data.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut st = State {
        qt: [[0; 64]; 4],
        dc: [None, None, None, None],
        ac: [None, None, None, None],
        restart_interval: 0,
        width: 0,
        height: 0,
        comps: Vec::new(),
        hmax: 1,
        vmax: 1,
        mcus_x: 0,
        mcus_y: 0,
    };
    let mut pos = 2;
    let mut scans = 0usize;
    loop {
        // Next marker, skipping fill bytes.
        while *data.get(pos)? != 0xFF {
            pos += 1;
        }
        while *data.get(pos + 1)? == 0xFF {
            pos += 1;
        }
        let marker = *data.get(pos + 1)?;
        pos += 2;
        match marker {
            0xD9 => break,
            0xD8 | 0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let len = be16(data, pos)?;
        if len < 2 {
            return None;
        }
        let seg = data.get(pos + 2..pos + len)?;
        pos += len;
        match marker {
            0xC0 | 0xC1 => read_frame(&mut st, seg)?,
            // Progressive, lossless, hierarchical, arithmetic: not handled here.
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            0xC4 => read_huffman(&mut st, seg)?,
            0xDB => read_quant(&mut st, seg)?,
            0xDD => st.restart_interval = be16(seg, 0)?,
            // Adobe: the transform may be none (RGB) or CMYK/YCCK; leave those aside.
            0xEE if seg.starts_with(b"Adobe") => return None,
            0xDA => {
                // A sequential file codes each component once: at most one scan per
                // component (more would only repeat work, a cost an attacker picks).
                scans += 1;
                if scans > st.comps.len() {
                    return None;
                }
                pos = read_scan(&mut st, seg, data, pos)?;
            }
            _ => {}
        }
    }
    if scans == 0 {
        return None;
    }
    to_rgb(&st)
}

fn read_frame(st: &mut State, seg: &[u8]) -> Option<()> {
    if !st.comps.is_empty() || *seg.first()? != 8 {
        return None;
    }
    st.height = be16(seg, 1)?;
    st.width = be16(seg, 3)?;
    let n = usize::from(*seg.get(5)?);
    if st.width == 0 || st.height == 0 || !(n == 1 || n == 3) {
        return None;
    }
    for i in 0..n {
        let c = seg.get(6 + 3 * i..9 + 3 * i)?;
        let (h, v, tq) = (
            usize::from(c[1] >> 4),
            usize::from(c[1] & 15),
            usize::from(c[2]),
        );
        if !(1..=2).contains(&h) || !(1..=2).contains(&v) || tq > 3 {
            return None;
        }
        st.comps.push(Component {
            id: c[0],
            h,
            v,
            tq,
            dc: 0,
            ac: 0,
            pred: 0,
            stride: 0,
            rows: 0,
            plane: Vec::new(),
        });
    }
    // libjpeg reads three components with the IDs 'R', 'G', 'B' as RGB.
    if n == 3 && st.comps.iter().map(|c| c.id).eq(*b"RGB") {
        return None;
    }
    if n == 1 {
        // A single-component image has one block per MCU whatever its factors.
        st.comps[0].h = 1;
        st.comps[0].v = 1;
    }
    st.hmax = st.comps.iter().map(|c| c.h).max()?;
    st.vmax = st.comps.iter().map(|c| c.v).max()?;
    st.mcus_x = st.width.div_ceil(8 * st.hmax);
    st.mcus_y = st.height.div_ceil(8 * st.vmax);
    for c in &mut st.comps {
        c.stride = st.mcus_x * c.h * 8;
        c.rows = st.mcus_y * c.v * 8;
        c.plane = vec![0; c.stride * c.rows];
    }
    Some(())
}

fn read_huffman(st: &mut State, mut seg: &[u8]) -> Option<()> {
    while !seg.is_empty() {
        let tc_th = seg[0];
        let (class, id) = (tc_th >> 4, usize::from(tc_th & 15));
        let counts: [u8; 16] = seg.get(1..17)?.try_into().ok()?;
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let values = seg.get(17..17 + total)?.to_vec();
        let table = Huffman::new(&counts, values)?;
        match (class, id) {
            (0, 0..=3) => st.dc[id] = Some(table),
            (1, 0..=3) => st.ac[id] = Some(table),
            _ => return None,
        }
        seg = seg.get(17 + total..)?;
    }
    Some(())
}

fn read_quant(st: &mut State, mut seg: &[u8]) -> Option<()> {
    while !seg.is_empty() {
        let (pq, id) = (seg[0] >> 4, usize::from(seg[0] & 15));
        if id > 3 || pq > 1 {
            return None;
        }
        let size = if pq == 0 { 64 } else { 128 };
        let body = seg.get(1..1 + size)?;
        for (k, &nat) in ZIGZAG.iter().enumerate() {
            st.qt[id][nat] = if pq == 0 {
                u16::from(body[k])
            } else {
                u16::from_be_bytes([body[2 * k], body[2 * k + 1]])
            };
        }
        seg = seg.get(1 + size..)?;
    }
    Some(())
}

/// Decodes one scan; returns the position after its entropy-coded data.
fn read_scan(st: &mut State, seg: &[u8], data: &[u8], pos: usize) -> Option<usize> {
    let ns = usize::from(*seg.first()?);
    if ns == 0 || ns > st.comps.len() {
        return None;
    }
    let mut members = Vec::with_capacity(ns);
    for i in 0..ns {
        let cs = *seg.get(1 + 2 * i)?;
        let t = *seg.get(2 + 2 * i)?;
        let ci = st.comps.iter().position(|c| c.id == cs)?;
        let (dc, ac) = (usize::from(t >> 4), usize::from(t & 15));
        if dc > 3 || ac > 3 || st.dc[dc].is_none() || st.ac[ac].is_none() {
            return None;
        }
        st.comps[ci].dc = dc;
        st.comps[ci].ac = ac;
        st.comps[ci].pred = 0;
        members.push(ci);
    }
    let tail = seg.get(1 + 2 * ns..4 + 2 * ns)?;
    if tail != [0, 63, 0] {
        return None;
    }
    let qt = st.qt;
    let (dcs, acs) = (st.dc.clone(), st.ac.clone());
    let mut bits = Bits::new(data, pos);
    // The MCUs of the scan, and for each the blocks of each member component.
    let (mx, my) = if ns == 1 {
        let c = &st.comps[members[0]];
        let w = (st.width * c.h).div_ceil(st.hmax);
        let h = (st.height * c.v).div_ceil(st.vmax);
        (w.div_ceil(8), h.div_ceil(8))
    } else {
        (st.mcus_x, st.mcus_y)
    };
    let mut coef = [0i32; 64];
    let mut count = 0usize;
    for mcu_y in 0..my {
        for mcu_x in 0..mx {
            if st.restart_interval > 0 && count > 0 && count.is_multiple_of(st.restart_interval) {
                bits.restart()?;
                for &ci in &members {
                    st.comps[ci].pred = 0;
                }
            }
            count += 1;
            for &ci in &members {
                let c = &mut st.comps[ci];
                let (bh, bv) = if ns == 1 { (1, 1) } else { (c.h, c.v) };
                let dc = dcs[c.dc].as_ref()?;
                let ac = acs[c.ac].as_ref()?;
                let q = &qt[c.tq];
                for by in 0..bv {
                    for bx in 0..bh {
                        coef.fill(0);
                        let s = bits.huffman(dc)?;
                        if s > 11 {
                            return None;
                        }
                        c.pred = c.pred.checked_add(bits.receive_extend(s)?)?;
                        coef[0] = c.pred.checked_mul(i32::from(q[0]))?;
                        let mut k = 1;
                        let mut any_ac = false;
                        while k < 64 {
                            let rs = bits.huffman(ac)?;
                            let (r, s) = (usize::from(rs >> 4), rs & 15);
                            if s == 0 {
                                if r == 15 {
                                    k += 16;
                                    continue;
                                }
                                break;
                            }
                            k += r;
                            let nat = *ZIGZAG.get(k)?;
                            coef[nat] = bits.receive_extend(s)?.checked_mul(i32::from(q[nat]))?;
                            any_ac = true;
                            k += 1;
                        }
                        let row = (mcu_y * bv + by) * 8;
                        let col = (mcu_x * bh + bx) * 8;
                        let start = row * c.stride + col;
                        let out = c.plane.get_mut(start..)?;
                        if any_ac {
                            idct_islow(&coef, out, c.stride);
                        } else {
                            // Both IDCT passes take their all-zero shortcut: a flat block.
                            let v = dc_level(coef[0]);
                            for r in 0..8 {
                                out.get_mut(r * c.stride..r * c.stride + 8)?.fill(v);
                            }
                        }
                    }
                }
            }
        }
    }
    // Step to the next marker that is not a restart marker.
    let mut p = bits.pos;
    while p + 1 < data.len() {
        if data[p] == 0xFF && data[p + 1] != 0 && !(0xD0..=0xD7).contains(&data[p + 1]) {
            return Some(p);
        }
        p += 1;
    }
    None
}

/// Horizontal 2x fancy upsampling of `sums` (each `3 * near + far` for `h2v2`, or
/// plain samples scaled by 4 for `h2v1`), as libjpeg's `h2v2_fancy_upsample` and
/// `h2v1_fancy_upsample` round: `out[2i] = (3 s[i] + s[i-1] + b0) >> shift`,
/// `out[2i+1] = (3 s[i] + s[i+1] + b1) >> shift`, edge samples repeated.
fn fancy_h2(sums: &[u16], out: &mut [u8], b0: u16, b1: u16, shift: u32) -> Option<()> {
    let n = sums.len();
    let out = out.get_mut(..2 * n)?;
    if n < 2 {
        return None;
    }
    out[0] = ((sums[0] * 4 + b0) >> shift) as u8;
    for (o, w) in out[1..2 * n - 1].chunks_exact_mut(2).zip(sums.windows(2)) {
        let (a, b) = (w[0] * 3, w[1] * 3);
        o[0] = ((a + w[1] + b1) >> shift) as u8;
        o[1] = ((b + w[0] + b0) >> shift) as u8;
    }
    out[2 * n - 1] = ((sums[n - 1] * 4 + b1) >> shift) as u8;
    Some(())
}

/// One output row of a component at full resolution, upsampled as libjpeg's fancy
/// upsamplers do (`y` is the output row): the plane's own row when the component is
/// not subsampled, else written into `out`, with `sums` as scratch.
fn upsample_row<'a>(
    c: &'a Component,
    st: &State,
    y: usize,
    out: &'a mut [u8],
    sums: &mut [u16],
) -> Option<&'a [u8]> {
    let (fh, fv) = (st.hmax / c.h, st.vmax / c.v);
    let dw = (st.width * c.h).div_ceil(st.hmax);
    let dh = (st.height * c.v).div_ceil(st.vmax);
    let row = |r: usize| c.plane.get(r * c.stride..r * c.stride + dw);
    let inrow = y / fv;
    let near = row(inrow)?;
    let sums = sums.get_mut(..dw)?;
    match (fh, fv) {
        (1, 1) => return Some(near),
        (2, 1) => {
            // h2v1: (3 s[i] + s[i-1] + 1) >> 2 and (3 s[i] + s[i+1] + 2) >> 2; the edge
            // outputs are the samples themselves ((4 s + 1) >> 2 == s).
            for (d, &v) in sums.iter_mut().zip(near) {
                *d = u16::from(v);
            }
            fancy_h2(sums, out, 1, 2, 2)?;
        }
        (_, 2) => {
            let upper = y.is_multiple_of(2);
            let far = if upper {
                row(inrow.saturating_sub(1))?
            } else {
                row((inrow + 1).min(dh.saturating_sub(1)))?
            };
            for ((d, &a), &b) in sums.iter_mut().zip(near).zip(far) {
                *d = u16::from(a) * 3 + u16::from(b);
            }
            if fh == 1 {
                let bias = if upper { 1 } else { 2 };
                for (o, &v) in out.get_mut(..dw)?.iter_mut().zip(sums.iter()) {
                    *o = ((v + bias) >> 2) as u8;
                }
            } else {
                fancy_h2(sums, out, 8, 7, 4)?;
            }
        }
        _ => return None,
    }
    Some(out)
}

fn to_rgb(st: &State) -> Option<RgbImage> {
    let (w, h) = (st.width, st.height);
    let mut rgb = vec![0u8; w.checked_mul(h)?.checked_mul(3)?];
    if st.comps.len() == 1 {
        let c = &st.comps[0];
        for (y, line) in rgb.chunks_exact_mut(w * 3).enumerate() {
            let src = c.plane.get(y * c.stride..y * c.stride + w)?;
            for (px, &v) in line.chunks_exact_mut(3).zip(src) {
                px.fill(v);
            }
        }
        return RgbImage::from_raw(u32::try_from(w).ok()?, u32::try_from(h).ok()?, rgb);
    }
    for c in &st.comps {
        let dw = (w * c.h).div_ceil(st.hmax);
        // libjpeg upsamples by replication below three samples; not reproduced here.
        if st.hmax / c.h == 2 && dw <= 2 {
            return None;
        }
    }
    // libjpeg's jdcolor.c tables: 16-bit fixed point, rounded.
    const ONE_HALF: i32 = 1 << 15;
    let fix = |x: f64| (x * 65536.0 + 0.5) as i32;
    let mut cr_r = [0i32; 256];
    let mut cb_b = [0i32; 256];
    let mut cr_g = [0i32; 256];
    let mut cb_g = [0i32; 256];
    for i in 0..256 {
        let x = i as i32 - 128;
        cr_r[i] = (fix(1.40200) * x + ONE_HALF) >> 16;
        cb_b[i] = (fix(1.77200) * x + ONE_HALF) >> 16;
        cr_g[i] = -fix(0.71414) * x;
        cb_g[i] = -fix(0.34414) * x + ONE_HALF;
    }
    let [c0, c1, c2] = st.comps.as_slice() else {
        return None;
    };
    let mut bufs = [
        vec![0u8; 2 * w + 16],
        vec![0u8; 2 * w + 16],
        vec![0u8; 2 * w + 16],
    ];
    let mut sums = vec![0u16; w + 16];
    let [b0, b1, b2] = &mut bufs;
    for (y, line) in rgb.chunks_exact_mut(w * 3).enumerate() {
        let ys = upsample_row(c0, st, y, b0, &mut sums)?;
        let cbs = upsample_row(c1, st, y, b1, &mut sums)?;
        let crs = upsample_row(c2, st, y, b2, &mut sums)?;
        for (((px, &yv), &cb), &cr) in line.chunks_exact_mut(3).zip(ys).zip(cbs).zip(crs) {
            let yv = i32::from(yv);
            let (cb, cr) = (usize::from(cb), usize::from(cr));
            let g = (cb_g[cb] + cr_g[cr]) >> 16;
            px[0] = (yv + cr_r[cr]).clamp(0, 255) as u8;
            px[1] = (yv + g).clamp(0, 255) as u8;
            px[2] = (yv + cb_b[cb]).clamp(0, 255) as u8;
        }
    }
    RgbImage::from_raw(u32::try_from(w).ok()?, u32::try_from(h).ok()?, rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idct_of_a_dc_block_is_flat() {
        for dc in [80, -3, 4, -1100, 1100, 12, -12] {
            let mut coef = [0i32; 64];
            coef[0] = dc;
            let mut out = [0u8; 64];
            idct_islow(&coef, &mut out, 8);
            assert!(out.iter().all(|&v| v == dc_level(dc)), "{dc}: {out:?}");
        }
        // Dequantised DC 80: mean level 128 + 80 / 8 = 138.
        assert_eq!(dc_level(80), 138);
        assert_eq!(dc_level(-1100), 0);
        assert_eq!(dc_level(1100), 255);
    }

    #[test]
    fn huffman_codes_are_canonical() -> Result<(), &'static str> {
        // Two codes of length 2 (00, 01), one of length 3 (100).
        let mut counts = [0u8; 16];
        counts[1] = 2;
        counts[2] = 1;
        let h = Huffman::new(&counts, vec![7, 8, 9]).ok_or("table")?;
        let data = [0b0110_0000u8, 0, 0];
        let mut bits = Bits::new(&data, 0);
        assert_eq!(bits.huffman(&h), Some(8));
        assert_eq!(bits.huffman(&h), Some(9));
        assert_eq!(bits.huffman(&h), Some(7));
        // Too many codes for their length.
        let mut bad = [0u8; 16];
        bad[0] = 3;
        assert!(Huffman::new(&bad, vec![1, 2, 3]).is_none());
        Ok(())
    }

    fn encoded(img: image::DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 88);
        assert!(img.write_with_encoder(enc).is_ok());
        out
    }

    fn pattern(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x * 7 + y * 3) % 256) as u8,
            ])
        })
    }

    /// Against the general decoder (zune-jpeg), which differs from libjpeg by a few
    /// levels: a wrong Huffman, IDCT, upsampling or colour step would differ by far more.
    #[test]
    fn decodes_what_the_general_decoder_decodes() -> Result<(), Box<dyn std::error::Error>> {
        for (w, h) in [(64, 48), (283, 199), (17, 9)] {
            for img in [
                image::DynamicImage::ImageRgb8(pattern(w, h)),
                image::DynamicImage::ImageLuma8(
                    image::DynamicImage::ImageRgb8(pattern(w, h)).into_luma8(),
                ),
            ] {
                let grey = img.color() == image::ColorType::L8;
                let bytes = encoded(img);
                let ours = decode(&bytes).ok_or("declined")?;
                let theirs = image::load_from_memory(&bytes)?.into_rgb8();
                assert_eq!(ours.dimensions(), (w, h));
                let diffs: Vec<i32> = ours
                    .as_raw()
                    .iter()
                    .zip(theirs.as_raw())
                    .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
                    .collect();
                let max = diffs.iter().copied().max().unwrap_or(0);
                let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
                assert!(
                    max <= 6 && mean < 1.0,
                    "{w}x{h} grey {grey}: max {max}, mean {mean}"
                );
                if grey {
                    assert!(ours.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
                }
                // Cut short anywhere: declined or decoded, never a panic.
                for cut in (2..bytes.len()).step_by(97) {
                    let _ = decode(&bytes[..cut]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn malformed_input_is_declined_without_panicking() {
        assert!(decode(b"").is_none());
        assert!(decode(b"\xFF\xD8").is_none());
        assert!(decode(b"\xFF\xD8\xFF\xC0\x00\x02").is_none());
        let mut junk = vec![0xFF, 0xD8];
        junk.extend((0..4000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        assert!(decode(&junk).is_none());
    }
}
