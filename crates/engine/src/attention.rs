//! Fused causal attention on the CPU (flash-attention style): the decoder's
//! `softmax(q k^T * scale + mask) v` without materialising the score matrix.
//!
//! # Inputs and semantics
//!
//! `q` is `[1, heads, t, head_dim]` f32, `k` and `v` are `[1, kv_heads, len, width]`
//! in any of the KV cache's formats ([`afo_kvcache::KvFormat`]): f32, f16 or bf16 rows
//! (`width = head_dim`), or Q8_0 blocks as `u8` (`width = head_dim / 32 x 34`), all on
//! the CPU. They are read in place through their layouts (start offset, head and row
//! strides; the last dimension must be contiguous), so the KV cache's narrowed views of
//! its larger buffers are never copied; rows not held in f32 are decoded as a chunk is
//! visited (a key row before its transpose, the chunk's value rows into scratch; f16
//! rows are widened in registers as the transpose and the accumulation load them,
//! where the CPU has F16C: no scratch, 1.05-1.11x a batched step of 8 sequences over
//! an f16 cache, 1.13-1.21x one sequence at 2,048 cached tokens; Q8_0 blocks likewise
//! dequantized with AVX2, 1.01-1.18x 8 sequences at 512), so the result is the one of
//! the decoded rows in f32, bit for bit (tested). Query head `h` reads kv head
//! `h / n_rep` (`n_rep = heads / kv_heads`, grouped-query attention). Query row `i`
//! stands at key index `p = len - t + i` and sees key `j` iff `j <= p` and
//! `p - j < window` (`usize::MAX`: no window). The scores are `(q . k) * s` with
//! `s = 1 / sqrt(head_dim)` rounded to f32, as candle's `affine` rounds it. The
//! result is `[t, heads * head_dim]`, row `i` the concatenation of the heads.
//! [`full_attention_many`] is the same computation without the mask (every query sees
//! every key: a vision encoder's patches within a frame).
//!
//! # Algorithm
//!
//! Online softmax. The work is split into tasks, one per kv head and block of query
//! positions of each call (the frames of [`full_attention_many`] are calls whose
//! tasks share one parallel region): a block holds
//! `B = max(1, TASK_ROWS / n_rep)` positions, so a task has `R = n_rep * min(t, B)`
//! query rows (every query head of the kv head at every position of the block,
//! position-major), and the keys and values it reads serve all of them. A task walks
//! the keys that any of its rows can see (from the window's start for its first
//! position to its last position: fully masked key chunks are never visited) in chunks
//! of [`KEY_CHUNK`] aligned to multiples of [`KEY_CHUNK`]. Each chunk of keys is
//! transposed once into scratch, shared by all the task's rows. For each group of four
//! query rows:
//!
//! 1. a micro-kernel computes the scores of the columns the group sees (a small GEMM
//!    against the transposed chunk; each score sums over `head_dim` in order);
//! 2. each row scales its visible scores, keeps a running maximum `m` and sum `l`,
//!    turns the scores into `exp(score - m)` (a vectorised Cephes `exp` in the AVX2
//!    and AVX-512 paths, `f32::exp` in the portable one) and rescales its accumulator and sum by
//!    `exp(m_old - m)` when the maximum grows; the columns a row does not see get
//!    probability 0;
//! 3. a second micro-kernel adds the probabilities times the value rows (read in
//!    place) to the group's accumulators.
//!
//! Ahead of the chunk it computes, a task asks the CPU to fetch the key and value rows
//! of the next [`PREFETCH_BYTES`] (32 KiB: at a head size of 64, 128 keys of an f16
//! cache and 64 of an f32 one), a key's two rows after one another: a decode step
//! spends little arithmetic per key, and without the hints its reads of a cache that
//! the weights pushed out of the caches waited on memory a line or two at a time.
//!
//! Every [`SEGMENT`] keys (256, aligned) a row's state starts afresh, and the segments'
//! states are merged in key order by one function (`State::merge`: both rescaled to the
//! larger maximum; a segment the row sees nothing of changes nothing). A task over many
//! segments merges them as it goes. When the tasks would leave threads idle (fewer than
//! two per thread, counting every call's: a decode step of one sequence has one per kv
//! head), each segment of each kv head is a task of its own and the call merges their
//! states in the same order — flash-decoding, with the same result as one task. At the
//! end each row is divided by its sum and copied into the output.
//!
//! A row's arithmetic does not depend on the other rows computed with it nor on how
//! its keys are split among tasks: the chunks and segments are aligned, each score
//! and each accumulator lane is its own chain of operations, the columns a row does
//! not see add exact zeros, and segments merge in one order. So a position's output
//! is the same bit for bit whether it comes from a prefill or from a decode step over
//! the same keys and values, with any number of threads (tested).
//!
//! The micro-kernels exist three times: AVX-512F and AVX2 + FMA intrinsics, the best
//! the CPU runs chosen at run time, and portable Rust (the AVX-512 path keeps the AVX2
//! key transpose). Tasks run on the rayon pool (on the calling thread when the work is
//! small); each task's arithmetic is sequential and does not depend on which thread
//! runs it, so the result does not depend on the number of threads.
//!
//! # Memory
//!
//! With `R` as above, `hd = head_dim` and `C =` [`KEY_CHUNK`] (64), a task works in
//!
//! ```text
//! scratch_bytes(R) = 4 * (3 * R * hd + 4 * R + 4 * C + hd * C)
//! ```
//!
//! its query rows and the accumulators of its current segment and of its merged state
//! (`R * hd` each), their maxima and sums (`R` each), one group's scores (`4 * C`) and
//! the transposed key chunk (`hd * C`), plus `4 * (8 * hd + C * hd)` for a cache not
//! held in f32 (eight decoded key rows and a chunk of decoded values). At most one task
//! per thread runs at a time, and each thread keeps these buffers from one task to the
//! next (the largest `R` it has run: tens of KiB). The state of each finished task
//! (`4 * (R * hd + 2 * R)` bytes) is kept until all tasks are done and then merged into
//! the output tensor (a batch of decode steps whose keys are not split has one task
//! per call and kv head, and each writes its heads of the output itself), so a call
//! holds at most
//!
//! ```text
//! threads * scratch_bytes(R) + 2 * 4 * t * heads * hd + S
//! ```
//!
//! bytes (the second term: the tasks' results and the output, summed over the calls of
//! a batch), where `S` is the segment states of a split call,
//! `4 * kv_heads * ceil(len / SEGMENT) * (R * hd + 2 * R)`: the only part that grows
//! with `len`, 77 KB for a SmolLM2 decode step at 8,192 keys (under the estimator's
//! base overhead). A batch splits only when all its calls have fewer than `2 * threads`
//! tasks in all, so its segment states stay within `S` for `2 * threads` kv heads,
//! whatever the number of sequences. For SmolLM2-135M (`n_rep` 3, `hd` 64, so `B` 21):
//! prefill `R` 63, 66,800 bytes per task; decode `R` 3, 19,760 bytes per task. The
//! materialised path held at least `4 * heads * t * len` bytes of scores per layer (9.4
//! MB for a 512-token prefill), several copies of it.

use std::ops::Range;

use candle_core::{DType, Layout, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};

pub(crate) use crate::activation::Kernel;
use crate::error::{Error, Result};

/// Query rows a task aims for: a block holds `max(1, TASK_ROWS / n_rep)` query
/// positions.
pub(crate) const TASK_ROWS: usize = 64;
/// Keys per step of the online softmax (a multiple of [`COLS`]).
pub(crate) const KEY_CHUNK: usize = 64;
/// Keys per segment: each row's online softmax starts afresh every `SEGMENT` keys
/// (a multiple of [`KEY_CHUNK`]) and the segments' states are merged in order, so a
/// decode step can run its segments as parallel tasks with the same result.
pub(crate) const SEGMENT: usize = 256;
/// Bytes of key and value rows ahead of the chunk being computed that a task asks the
/// CPU to fetch ([`prefetch_rows`]), in whole chunks of keys, at least one: a decode
/// step's few query rows take little time per key, so its reads of the cache are
/// otherwise waits on memory one line after another. At a head size of 64, two chunks
/// of an f16 cache or one of an f32 cache: within a core's first-level cache.
pub(crate) const PREFETCH_BYTES: usize = 32 << 10;
/// Query rows per micro-kernel call.
const GROUP: usize = 4;
/// Score columns per micro-kernel step (two AVX2 vectors, one AVX-512 vector).
const COLS: usize = 16;
/// Below this many multiply-adds (`heads * t * len * head_dim`), the tasks run on the
/// calling thread.
const PARALLEL_WORK: usize = 1 << 15;

/// Causal (optionally sliding-window) grouped-query attention of `q` over `k` and `v`;
/// see the [module docs](self) for the shapes and the semantics. Returns
/// `[t, heads * head_dim]`.
///
/// # Errors
/// [`Error::TensorShape`] for shapes that do not fit together, and
/// [`Error::AttentionInput`] for a tensor that is not f32 on the CPU, a layout whose
/// last dimension is not contiguous or that reaches past its storage, or a window of
/// 0.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
) -> Result<Tensor> {
    attention_with(q, k, v, window, Kernel::best())
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n_rep: usize,
    t: usize,
    len: usize,
    head_dim: usize,
    window: usize,
    scale: f32,
    /// Query positions per task.
    block: usize,
    /// Whether a query sees only the keys up to its own position; otherwise every
    /// query sees every key (an image's patches).
    causal: bool,
}

impl Dims {
    /// The keys the rows of block `b` visit: from the chunk where the window of its
    /// first position starts, to its last position.
    fn keys(&self, b: usize) -> (usize, usize) {
        if !self.causal {
            return (0, self.len);
        }
        let past = self.len - self.t;
        let i0 = b * self.block;
        let i1 = (i0 + self.block).min(self.t);
        let lo = (past + i0 + 1).saturating_sub(self.window) / KEY_CHUNK * KEY_CHUNK;
        (lo, past + i1)
    }
}

/// Attention of every query over every key (no mask: the patches of an image), with
/// the shapes of [`causal_attention`] and its kernels: no score matrix is
/// materialised. Takes several independent calls (the frames of a request's images)
/// and runs their tasks in one parallel region (each result the one its call gives
/// alone, bit for bit); each call's window is not used. Returns one `[t, heads *
/// head_dim]` tensor per call.
///
/// # Errors
/// As [`causal_attention`], for the first call that fails its checks.
pub(crate) fn full_attention_many(calls: &[Call<'_>]) -> Result<Vec<Tensor>> {
    attention_calls(calls, Kernel::best(), false)
}

/// [`causal_attention`] with a chosen kernel (the portable one when `kernel` is not
/// available).
pub(crate) fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
    kernel: Kernel,
) -> Result<Tensor> {
    attention_impl(q, k, v, window, kernel, true, true)
}

/// One call's attention ([`attention_calls_on`]).
fn attention_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
    kernel: Kernel,
    causal: bool,
    pool: bool,
) -> Result<Tensor> {
    let mut out = attention_calls_on(&[Call { q, k, v, window }], kernel, causal, pool)?;
    out.pop()
        .ok_or_else(|| input_error("queries", "gave no result".to_string()))
}

/// The inputs of one attention: queries, keys and values as [`causal_attention`]
/// takes them, and the window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'t> {
    pub(crate) q: &'t Tensor,
    pub(crate) k: &'t Tensor,
    pub(crate) v: &'t Tensor,
    pub(crate) window: usize,
}

/// [`causal_attention`] on the calling thread alone: no parallel region, its tasks
/// one after another, its keys never split into segments (the same bits: a row's
/// arithmetic does not depend on how its keys are split among tasks). For a caller
/// that is itself one of many parallel jobs: a batched decode step runs each
/// sequence's heads, cache append and attention as one job, so a layer's sequences
/// fork and join once, and each attention reads the keys and values its job has just
/// appended.
///
/// # Errors
/// As [`causal_attention`].
pub(crate) fn causal_attention_here(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
) -> Result<Tensor> {
    attention_impl(q, k, v, window, Kernel::best(), true, false)
}

/// One checked call: its sizes and its tensors read in place.
struct Prepared<'a> {
    dims: Dims,
    heads: usize,
    kv_heads: usize,
    q: View<'a, f32>,
    k: Rows<'a>,
    v: Rows<'a>,
}

/// Checks one call's shapes and returns its sizes, `(dims, heads, kv_heads)`.
fn check_call(call: &Call<'_>, causal: bool) -> Result<(Dims, usize, usize)> {
    let Call { q, k, v, window } = *call;
    let (heads, t, head_dim) = match *q.dims() {
        [1, heads, t, d] => (heads, t, d),
        _ => return Err(shape_error("attention queries", q, &[1, 0, 0, 0])),
    };
    let width = stored_width(k.dtype(), head_dim);
    let (kv_heads, len) = match *k.dims() {
        [1, kv, len, w] if w == width => (kv, len),
        _ => return Err(shape_error("attention keys", k, &[1, 0, 0, width])),
    };
    if v.dims() != k.dims() {
        return Err(shape_error("attention values", v, k.dims()));
    }
    if v.dtype() != k.dtype() {
        return Err(input_error(
            "values",
            format!("are {:?}, the keys {:?}", v.dtype(), k.dtype()),
        ));
    }
    if k.dtype() == DType::U8 && !head_dim.is_multiple_of(32) {
        return Err(input_error(
            "keys",
            format!(
                "are Q8_0 blocks, which need a head size that is a multiple of 32, not {head_dim}"
            ),
        ));
    }
    if kv_heads == 0 || heads % kv_heads != 0 || t == 0 || t > len || head_dim == 0 {
        return Err(input_error(
            "queries",
            format!(
                "{:?} do not fit keys {:?}: the query heads must be a non-zero multiple \
                 of the kv heads, and the queries (at least one) at most the keys",
                q.dims(),
                k.dims()
            ),
        ));
    }
    if window == 0 {
        return Err(input_error(
            "window",
            "is 0: every query must see at least its own key".to_string(),
        ));
    }
    let n_rep = heads / kv_heads;
    let dims = Dims {
        n_rep,
        t,
        len,
        head_dim,
        // Without the causal mask every query sees every key.
        window: if causal { window } else { usize::MAX },
        scale: (1.0 / (head_dim as f64).sqrt()) as f32,
        block: (TASK_ROWS / n_rep).max(1),
        causal,
    };
    Ok((dims, heads, kv_heads))
}

/// The calls' attentions, their tasks in one parallel region on the current pool.
fn attention_calls(calls: &[Call<'_>], kernel: Kernel, causal: bool) -> Result<Vec<Tensor>> {
    attention_calls_on(calls, kernel, causal, true)
}

/// [`attention_calls`]; with `pool` false on the calling thread alone, with no key
/// split ([`causal_attention_here`]).
fn attention_calls_on(
    calls: &[Call<'_>],
    kernel: Kernel,
    causal: bool,
    pool: bool,
) -> Result<Vec<Tensor>> {
    let kernel = if kernel.is_available() {
        kernel
    } else {
        Kernel::Portable
    };
    let sizes = calls
        .iter()
        .map(|c| check_call(c, causal))
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = calls
        .iter()
        .map(|c| {
            [
                c.q.storage_and_layout(),
                c.k.storage_and_layout(),
                c.v.storage_and_layout(),
            ]
        })
        .collect();
    let mut prepared = Vec::with_capacity(calls.len());
    for ((call, &(dims, heads, kv_heads)), [(qs, ql), (ks, kl), (vs, vl)]) in
        calls.iter().zip(&sizes).zip(&guards)
    {
        let hd = dims.head_dim;
        prepared.push(Prepared {
            dims,
            heads,
            kv_heads,
            q: View::new("queries", cpu_f32("queries", call.q.dtype(), qs)?, ql)?,
            k: Rows::new("keys", call.k.dtype(), ks, kl, hd)?,
            v: Rows::new("values", call.v.dtype(), vs, vl, hd)?,
        });
    }

    // One task per call, kv head and block: every query head of the kv head shares
    // the task's reads of the keys and values. When that leaves threads idle (a
    // decode step: one block per kv head), each segment of keys is a task of its own
    // and the segments' states are merged below, in order, as a whole-range task
    // merges them: the result is the same either way. (Splitting per query head
    // instead read the cache three times and was 12-15% slower at 2,048 positions.)
    let whole: usize = prepared
        .iter()
        .map(|p| p.kv_heads * p.dims.t.div_ceil(p.dims.block))
        .sum();
    let split = pool && whole < 2 * rayon::current_num_threads();
    let mut tasks: Vec<Task> = Vec::new();
    for (call, p) in prepared.iter().enumerate() {
        let d = p.dims;
        for g in 0..p.kv_heads {
            for b in 0..d.t.div_ceil(d.block) {
                let (lo, hi) = d.keys(b);
                let mut push = |keys| {
                    tasks.push(Task {
                        call,
                        g,
                        b,
                        reps: 0..d.n_rep,
                        keys,
                        then: None,
                    })
                };
                if split {
                    for s in lo / SEGMENT..hi.div_ceil(SEGMENT) {
                        push(s * SEGMENT..(s + 1) * SEGMENT);
                    }
                } else {
                    push(0..d.len);
                }
            }
        }
    }
    let work = prepared.iter().fold(0usize, |w, p| {
        let d = &p.dims;
        w.saturating_add(
            p.heads
                .saturating_mul(d.t)
                .saturating_mul(d.len)
                .saturating_mul(d.head_dim),
        )
    });
    let parallel = pool && tasks.len() > 1 && work >= PARALLEL_WORK;
    let mut outs: Vec<Vec<f32>> = prepared
        .iter()
        .map(|p| afo_quant::kernels::zeroed(p.dims.t * p.heads * p.dims.head_dim))
        .collect();
    if !split && prepared.iter().all(|p| p.dims.t == 1) {
        // Decode steps: one task per call and kv head, over all its keys, and its rows
        // are that kv head's query heads, side by side in the call's one output row.
        // Each task divides its state by the sums straight into them (the merge below
        // would take the one state as it is: the same bits).
        if !parallel {
            // One thread runs the tasks in order: each one's last chunks ask for the
            // first rows of the next kv head of its call, so that the reads of the
            // cache do not stop and start again at every head.
            for i in 1..tasks.len() {
                if tasks[i].call == tasks[i - 1].call {
                    tasks[i - 1].then = Some(tasks[i].g);
                }
            }
        }
        let mut heads = outs
            .iter_mut()
            .zip(&prepared)
            .flat_map(|(o, p)| o.chunks_mut(p.dims.n_rep * p.dims.head_dim));
        let mut jobs = Vec::with_capacity(tasks.len());
        for task in &tasks {
            match heads.next() {
                Some(out) => jobs.push((task, out)),
                None => break,
            }
        }
        if jobs.len() != tasks.len() {
            // Unreachable: a decode call has one task per kv head.
            return Err(input_error(
                "queries",
                "of a decode step do not fill their heads".into(),
            ));
        }
        let run = |(task, out): (&Task, &mut [f32])| {
            if let Some(p) = prepared.get(task.call) {
                run_task(p, task, kernel, |total| divide(total, p.dims.head_dim, out));
            }
        };
        if parallel {
            afo_quant::team::for_each_mut(&mut jobs, |(task, out)| run((task, out)));
        } else {
            jobs.into_iter().for_each(run);
        }
    } else {
        let run = |task: &Task| match prepared.get(task.call) {
            Some(p) => run_task(p, task, kernel, State::clone),
            None => State::empty(0, 0), // Unreachable: tasks index `prepared`.
        };
        let results: Vec<State> = if parallel {
            let mut slots: Vec<(&Task, State)> =
                tasks.iter().map(|t| (t, State::default())).collect();
            afo_quant::team::for_each_mut(&mut slots, |(task, state)| *state = run(task));
            slots.into_iter().map(|(_, state)| state).collect()
        } else {
            tasks.iter().map(run).collect()
        };
        let mut i = 0;
        while i < tasks.len() {
            // The tasks of one call, kv head and block, in key order.
            let (call, g, b) = (tasks[i].call, tasks[i].g, tasks[i].b);
            let (Some(p), Some(out)) = (prepared.get(call), outs.get_mut(call)) else {
                break; // Unreachable: tasks index `prepared`.
            };
            let (d, hd) = (&p.dims, p.dims.head_dim);
            let width = p.heads * hd;
            let mut total = State::empty(results[i].max.len(), hd);
            while i < tasks.len() && (tasks[i].call, tasks[i].g, tasks[i].b) == (call, g, b) {
                total.merge(&results[i], hd);
                i += 1;
            }
            let i0 = b * d.block;
            for r in 0..total.max.len() {
                let pos = i0 + r / d.n_rep;
                let h = g * d.n_rep + r % d.n_rep;
                let at = pos * width + h * hd;
                if let Some(dst) = out.get_mut(at..at + hd) {
                    divide_row(&total, r, hd, dst);
                }
            }
        }
    }
    outs.into_iter()
        .zip(prepared.iter().zip(calls))
        .map(|(out, (p, c))| {
            let shape = (p.dims.t, p.heads * p.dims.head_dim);
            Ok(Tensor::from_vec(out, shape, c.q.device())?)
        })
        .collect()
}

fn shape_error(name: &str, got: &Tensor, expected: &[usize]) -> Error {
    Error::TensorShape {
        name: name.to_string(),
        expected: expected.to_vec(),
        got: got.dims().to_vec(),
    }
}

fn input_error(tensor: &'static str, reason: String) -> Error {
    Error::AttentionInput { tensor, reason }
}

/// The f32 elements of a CPU tensor's storage.
fn cpu_f32<'a>(name: &'static str, dtype: DType, storage: &'a Storage) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) if dtype == DType::F32 => Ok(cpu.as_slice::<f32>()?),
        Storage::Cpu(_) => Err(input_error(
            name,
            format!("are {dtype:?}, the kernel reads f32"),
        )),
        _ => Err(input_error(name, "are not on the CPU device".to_string())),
    }
}

/// Elements per stored row of keys or values of `head_dim`: `head_dim` floats, or
/// for `u8` (Q8_0 blocks) `head_dim / 32 x 34` bytes.
fn stored_width(dtype: DType, head_dim: usize) -> usize {
    if dtype == DType::U8 {
        afo_kvcache::KvFormat::Q8_0.row_bytes(head_dim as u64) as usize
    } else {
        head_dim
    }
}

/// Keys or values as the KV cache holds them, read in place: f32 rows, f16 or bf16
/// rows, or Q8_0 blocks (`u8`, GGML's layout, 34 bytes per 32 elements).
#[derive(Debug, Clone, Copy)]
enum Rows<'a> {
    F32(View<'a, f32>),
    F16(View<'a, f16>),
    Bf16(View<'a, bf16>),
    Q8_0(View<'a, u8>),
}

impl<'a> Rows<'a> {
    fn new(
        name: &'static str,
        dtype: DType,
        storage: &'a Storage,
        layout: &Layout,
        head_dim: usize,
    ) -> Result<Self> {
        let Storage::Cpu(cpu) = storage else {
            return Err(input_error(name, "are not on the CPU device".to_string()));
        };
        Ok(match dtype {
            DType::F32 => Rows::F32(View::new(name, cpu.as_slice::<f32>()?, layout)?),
            DType::F16 => Rows::F16(View::new(name, cpu.as_slice::<f16>()?, layout)?),
            DType::BF16 => Rows::Bf16(View::new(name, cpu.as_slice::<bf16>()?, layout)?),
            DType::U8
                if stored_width(dtype, head_dim) == layout.dims().last().copied().unwrap_or(0) =>
            {
                Rows::Q8_0(View::new(name, cpu.as_slice::<u8>()?, layout)?)
            }
            other => {
                return Err(input_error(
                    name,
                    format!("are {other:?}; the kernel reads f32, f16, bf16 or Q8_0 (u8) rows"),
                ));
            }
        })
    }

    /// The f32 rows of head `h` in place (`row_stride` apart), for f32 storage.
    fn f32_head(&self, h: usize) -> Option<(&'a [f32], usize)> {
        match self {
            Rows::F32(v) => Some((v.head(h), v.row_stride)),
            _ => None,
        }
    }

    /// The value rows of head `h` as [`accumulate`] reads them in place with `kernel`
    /// (`row_stride` apart): f32 rows always, f16 rows and Q8_0 blocks where it widens
    /// or dequantizes them as it loads them; `None` for rows to decode first.
    fn values_in_place(&self, h: usize, kernel: Kernel, hd: usize) -> Option<(Values<'a>, usize)> {
        match self {
            Rows::F32(v) => Some((Values::F32(v.head(h)), v.row_stride)),
            Rows::F16(v) if f16_values_direct(kernel, hd) => {
                Some((Values::F16(v.head(h)), v.row_stride))
            }
            Rows::Q8_0(v) if q8_values_direct(kernel, hd) => {
                Some((Values::Q8(v.head(h)), v.row_stride))
            }
            _ => None,
        }
    }

    /// The f16 rows of head `h` in place (`row_stride` apart), for f16 storage.
    fn f16_head(&self, h: usize) -> Option<(&'a [f16], usize)> {
        match self {
            Rows::F16(v) => Some((v.head(h), v.row_stride)),
            _ => None,
        }
    }

    /// The Q8_0 rows of head `h` in place (`row_stride` bytes apart), for Q8_0 storage.
    fn q8_head(&self, h: usize) -> Option<(&'a [u8], usize)> {
        match self {
            Rows::Q8_0(v) => Some((v.head(h), v.row_stride)),
            _ => None,
        }
    }

    /// The bytes of one row of `head_dim` values in this format.
    fn row_bytes(&self, head_dim: usize) -> usize {
        match self {
            Rows::F32(_) => 4 * head_dim,
            Rows::F16(_) | Rows::Bf16(_) => 2 * head_dim,
            Rows::Q8_0(_) => stored_width(DType::U8, head_dim),
        }
    }

    /// Where rows `keys` of head `h` (`head_dim` values each, in this format) lie, in
    /// bytes: the first row's address, the bytes from one row to the next and a row's
    /// bytes; `None` when one of them lies outside the head.
    fn byte_rows(
        &self,
        h: usize,
        keys: Range<usize>,
        head_dim: usize,
    ) -> Option<(*const u8, usize, usize)> {
        match self {
            Rows::F32(v) => v.byte_rows(h, keys, head_dim),
            Rows::F16(v) => v.byte_rows(h, keys, head_dim),
            Rows::Bf16(v) => v.byte_rows(h, keys, head_dim),
            Rows::Q8_0(v) => v.byte_rows(h, keys, stored_width(DType::U8, head_dim)),
        }
    }

    /// Decodes row `j` of head `h` into `out` (`head_dim` floats). The layout was
    /// checked by [`View::new`]; a row out of range leaves `out` as it is.
    fn decode(&self, h: usize, j: usize, out: &mut [f32]) {
        let hd = out.len();
        match self {
            Rows::F32(v) => {
                if let Some(r) = v.head(h).get(j * v.row_stride..j * v.row_stride + hd) {
                    out.copy_from_slice(r);
                }
            }
            // Exact conversions, vectorised where the CPU can (F16C for f16).
            Rows::F16(v) => {
                if let Some(r) = v.head(h).get(j * v.row_stride..j * v.row_stride + hd) {
                    r.convert_to_f32_slice(out);
                }
            }
            Rows::Bf16(v) => {
                if let Some(r) = v.head(h).get(j * v.row_stride..j * v.row_stride + hd) {
                    r.convert_to_f32_slice(out);
                }
            }
            Rows::Q8_0(v) => {
                let width = stored_width(DType::U8, hd);
                if let Some(r) = v.head(h).get(j * v.row_stride..j * v.row_stride + width) {
                    // Lengths match by construction (`stored_width`).
                    let _ = afo_quant::kernels::dequantize_q8_0(r, out);
                }
            }
        }
    }
}

/// Value rows [`accumulate`] reads in place, from a chunk's first key: f32 rows (held
/// so, or decoded into scratch), f16 rows or Q8_0 blocks (`u8`).
#[derive(Debug, Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8(&'a [u8]),
}

impl<'a> Values<'a> {
    /// The rows from element (byte, for Q8_0) `at` on.
    fn from(self, at: usize) -> Option<Self> {
        Some(match self {
            Values::F32(v) => Values::F32(v.get(at..)?),
            Values::F16(v) => Values::F16(v.get(at..)?),
            Values::Q8(v) => Values::Q8(v.get(at..)?),
        })
    }
}

/// A `[1, heads, rows, width]` tensor read in place.
#[derive(Debug, Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    head_stride: usize,
    row_stride: usize,
}

impl<'a, T> View<'a, T> {
    /// Checks that every element the layout addresses lies in `data`, and that rows
    /// are contiguous.
    fn new(name: &'static str, data: &'a [T], layout: &Layout) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let (&[_, heads, rows, hd], &[_, hs, rs, es]) = (dims, stride) else {
            return Err(input_error(
                name,
                format!("have {} dimensions, expected 4", dims.len()),
            ));
        };
        if es != 1 && hd > 1 {
            return Err(input_error(
                name,
                format!("have element stride {es}: rows must be contiguous"),
            ));
        }
        let start = layout.start_offset();
        let end = heads
            .checked_sub(1)
            .and_then(|h| h.checked_mul(hs))
            .zip(rows.checked_sub(1).and_then(|r| r.checked_mul(rs)))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|x| x.checked_add(start))
            .and_then(|x| x.checked_add(hd));
        match end {
            Some(end) if end <= data.len() => Ok(Self {
                data,
                start,
                head_stride: hs,
                row_stride: rs,
            }),
            _ => Err(input_error(
                name,
                format!(
                    "have a layout (start {start}, dims {dims:?}, strides {stride:?}) that \
                     reaches past the end of their storage ({} elements)",
                    data.len()
                ),
            )),
        }
    }

    /// [`Rows::byte_rows`] for rows `keys` of head `h`, `width` elements each.
    fn byte_rows(
        &self,
        h: usize,
        keys: Range<usize>,
        width: usize,
    ) -> Option<(*const u8, usize, usize)> {
        let head = self.head(h);
        let last = keys.end.checked_sub(1)? * self.row_stride;
        head.get(last..last + width)?;
        let first = head.get(keys.start * self.row_stride..)?;
        let size = std::mem::size_of::<T>();
        Some((first.as_ptr().cast(), self.row_stride * size, width * size))
    }

    /// The elements from head `h`'s first row on (rows `row_stride` apart).
    fn head(&self, h: usize) -> &'a [T] {
        self.data
            .get(self.start + h * self.head_stride..)
            .unwrap_or_default()
    }
}

/// Asks the CPU to fetch the key and the value rows of `keys` of kv head `g`
/// ([`afo_quant::kernels::prefetch_bytes`]), a key's two rows one after the other (the order the task
/// reads them in, chunk by chunk); the rows' addresses are found once for the range.
fn prefetch_rows(k: &Rows<'_>, v: &Rows<'_>, g: usize, keys: Range<usize>, head_dim: usize) {
    let n = keys.len();
    if n == 0 {
        return;
    }
    let (Some((kp, ks, kb)), Some((vp, vs, vb))) = (
        k.byte_rows(g, keys.clone(), head_dim),
        v.byte_rows(g, keys, head_dim),
    ) else {
        return;
    };
    for i in 0..n {
        afo_quant::kernels::prefetch_bytes(kp.wrapping_add(i * ks), kb);
        afo_quant::kernels::prefetch_bytes(vp.wrapping_add(i * vs), vb);
    }
}

/// One task: the query heads `g * n_rep + reps` (of kv head `g`) at the positions of
/// block `b`, over the keys in `keys` (a whole number of [`SEGMENT`]s, or all).
#[derive(Debug, Clone)]
struct Task {
    /// The call (of [`attention_calls`]) the task belongs to.
    call: usize,
    g: usize,
    b: usize,
    reps: Range<usize>,
    keys: Range<usize>,
    /// The kv head of the task that runs next on the same thread over the same call's
    /// cache, when known: its first rows are asked for as this task ends.
    then: Option<usize>,
}

/// The online softmax's state of a task's rows: running maxima, sums, and the
/// unnormalised accumulators (`rows x head_dim`).
#[derive(Debug, Clone, Default)]
struct State {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl State {
    fn empty(rows: usize, hd: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            acc: vec![0.0; rows * hd],
        }
    }

    /// Folds `seg`, the state of the keys that follow this state's, into this one, row
    /// by row: a row that saw no key in `seg` is left as it is, a row that saw none
    /// before takes `seg`'s state as it is, and otherwise both are rescaled to the
    /// larger maximum. The one merge of the module: whole-range tasks merge their
    /// segments with it, and the caller merges segment tasks with it.
    fn merge(&mut self, seg: &State, hd: usize) {
        for r in 0..self.max.len().min(seg.max.len()) {
            let sm = seg.max[r];
            if sm == f32::NEG_INFINITY {
                continue;
            }
            let (dst, src) = (
                &mut self.acc[r * hd..(r + 1) * hd],
                &seg.acc[r * hd..(r + 1) * hd],
            );
            let tm = self.max[r];
            if tm == f32::NEG_INFINITY {
                self.max[r] = sm;
                self.sum[r] = seg.sum[r];
                dst.copy_from_slice(src);
                continue;
            }
            let m = tm.max(sm);
            let (a, b) = ((tm - m).exp(), (sm - m).exp());
            self.max[r] = m;
            self.sum[r] = self.sum[r] * a + seg.sum[r] * b;
            for (x, y) in dst.iter_mut().zip(src) {
                *x = *x * a + *y * b;
            }
        }
    }

    fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.acc.fill(0.0);
    }

    /// [`State::empty`] in place: `rows` rows of `hd`, reusing the buffers.
    fn resize(&mut self, rows: usize, hd: usize) {
        self.max.resize(rows, 0.0);
        self.sum.resize(rows, 0.0);
        self.acc.resize(rows * hd, 0.0);
        self.reset();
    }
}

/// Row `r` of `state`'s accumulators divided by its sum, into `out` (`hd` floats).
fn divide_row(state: &State, r: usize, hd: usize, out: &mut [f32]) {
    if let (Some(acc), Some(l)) = (state.acc.get(r * hd..(r + 1) * hd), state.sum.get(r)) {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a / l;
        }
    }
}

/// Every row of `state` divided by its sum, into `out` (its rows side by side).
fn divide(state: &State, hd: usize, out: &mut [f32]) {
    for (r, dst) in out.chunks_exact_mut(hd).enumerate().take(state.max.len()) {
        divide_row(state, r, hd, dst);
    }
}

/// The keys of a chunk starting at key `c0` with `n` keys that the query at key index
/// `p` sees, relative to `c0` (empty when none).
fn visible(p: usize, c0: usize, n: usize, window: usize) -> Range<usize> {
    let a = (p + 1).saturating_sub(window).max(c0) - c0;
    let b = (p + 1).min(c0 + n).saturating_sub(c0);
    a.min(b)..b
}

/// One task: query positions of block `b` for the query heads `reps` of kv head `g`,
/// over the task's keys. `finish` gets the rows' state (position-major, `[positions,
/// reps]`), its segments merged in order, and divides by the sums or keeps it for the
/// merge of a split call.
fn run_task<R>(
    p: &Prepared<'_>,
    task: &Task,
    kernel: Kernel,
    finish: impl FnOnce(&State) -> R,
) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
    }
    let run = |scratch: &mut Scratch| {
        run_task_in(&p.dims, &p.q, &p.k, &p.v, task, kernel, scratch);
        finish(&scratch.total)
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => run(&mut scratch),
        // Unreachable (a task runs no other task), but a fresh scratch is as good.
        Err(_) => run(&mut Scratch::default()),
    })
}

/// A task's working buffers, kept per thread from one task to the next (a batched
/// decode step runs hundreds of small tasks; allocating and zeroing their buffers
/// each time cost more than some of their arithmetic). Every buffer is written
/// before it is read.
#[derive(Debug, Default)]
struct Scratch {
    /// The task's result: its segments' states merged in order.
    total: State,
    /// The task's query rows.
    qs: Vec<f32>,
    /// The state of the current segment.
    seg: State,
    /// The transposed key chunk.
    kt: Vec<f32>,
    /// One group's scores.
    s: Vec<f32>,
    /// Decoded key rows (caches not in f32).
    kdec: Vec<f32>,
    /// Decoded value rows (caches not in f32).
    vdec: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run_task_in(
    d: &Dims,
    q: &View<'_, f32>,
    k: &Rows<'_>,
    v: &Rows<'_>,
    task: &Task,
    kernel: Kernel,
    scratch: &mut Scratch,
) {
    let Scratch {
        total,
        qs,
        seg,
        kt,
        s,
        kdec,
        vdec,
    } = scratch;
    let (g, b) = (task.g, task.b);
    let nrep = task.reps.len();
    let hd = d.head_dim;
    let i0 = b * d.block;
    let i1 = (i0 + d.block).min(d.t);
    let rows = (i1 - i0) * nrep;
    qs.clear();
    for i in i0..i1 {
        for h in g * d.n_rep + task.reps.start..g * d.n_rep + task.reps.end {
            let head = q.head(h);
            if let Some(row) = head.get(i * q.row_stride..i * q.row_stride + hd) {
                qs.extend_from_slice(row);
            }
        }
    }
    total.resize(rows, hd);
    if qs.len() != rows * hd {
        return; // Unreachable: `View::new` checked the layout.
    }
    let past = d.len - d.t;
    // Without the causal mask every row stands after the last key.
    let position = |r: usize| {
        if d.causal {
            past + i0 + r / nrep
        } else {
            d.len - 1
        }
    };
    // Chunks aligned to multiples of KEY_CHUNK, whatever the block, and a fresh state
    // per SEGMENT of keys: a row's sums do not depend on which rows it is computed
    // with, nor on how the keys are split among tasks.
    let (lo, hi) = d.keys(b);
    let (lo, hi) = (lo.max(task.keys.start), hi.min(task.keys.end));
    // The first `ahead` keys' rows now, then each chunk's as the chunk `ahead` keys
    // before it starts.
    let key_bytes = 2 * k.row_bytes(hd);
    let ahead = (PREFETCH_BYTES / key_bytes.max(1) / KEY_CHUNK).max(1) * KEY_CHUNK;
    prefetch_rows(k, v, g, lo..hi.min(lo + ahead), hd);
    seg.resize(rows, hd);
    kt.resize(hd * KEY_CHUNK, 0.0);
    s.resize(GROUP * KEY_CHUNK, 0.0);
    // Rows not held in f32 are decoded: eight key rows at a time before their
    // transpose, a chunk of value rows at a time.
    if k.f32_head(g).is_none() {
        kdec.resize(8 * hd, 0.0);
    }
    let values = v.values_in_place(g, kernel, hd);
    if values.is_none() {
        vdec.resize(KEY_CHUNK * hd, 0.0);
    }

    let mut c0 = lo;
    while c0 < hi {
        if c0.is_multiple_of(SEGMENT) && c0 != lo {
            total.merge(seg, hd);
            seg.reset();
        }
        let State { max, sum, acc } = &mut *seg;
        let n = (hi - c0).min(KEY_CHUNK);
        let next = c0 + ahead;
        prefetch_rows(k, v, g, next.min(hi)..(next + n).min(hi), hd);
        if let Some(g2) = task.then
            && next + n > hi
        {
            // The next task's keys are this one's (a decode step's kv heads see the
            // same positions): its first `ahead`, as this task's first were asked for.
            let (a, b, end) = (next.max(hi) - hi, next + n - hi, ahead.min(hi - lo));
            prefetch_rows(k, v, g2, lo + a.min(end)..lo + b.min(end), hd);
        }
        transpose_keys(kernel, k, g, c0, n, hd, kt, kdec);
        let (vchunk, vrs) = match values {
            Some((vh, vrs)) => match vh.from(c0 * vrs) {
                Some(chunk) => (chunk, vrs),
                None => break, // Unreachable: `View::new` checked the layout.
            },
            None => {
                for (c, out) in vdec.chunks_exact_mut(hd).take(n).enumerate() {
                    v.decode(g, c0 + c, out);
                }
                (Values::F32(&vdec[..]), hd)
            }
        };
        for r0 in (0..rows).step_by(GROUP) {
            let nr = GROUP.min(rows - r0);
            let ranges: [Range<usize>; GROUP] =
                std::array::from_fn(|j| visible(position(r0 + j.min(nr - 1)), c0, n, d.window));
            let cols = ranges[..nr].iter().filter(|r| !r.is_empty()).fold(
                None,
                |u: Option<Range<usize>>, r| {
                    Some(u.map_or(r.clone(), |u| u.start.min(r.start)..u.end.max(r.end)))
                },
            );
            let Some(cols) = cols else { continue };
            let qg = &qs[r0 * hd..(r0 + nr) * hd];
            let padded = cols.start / COLS * COLS..cols.end.div_ceil(COLS) * COLS;
            scores(kernel, qg, hd, kt, s, nr, padded);
            for (j, range) in ranges[..nr].iter().enumerate() {
                let r = r0 + j;
                let srow = &mut s[j * KEY_CHUNK..(j + 1) * KEY_CHUNK];
                let arow = &mut acc[r * hd..(r + 1) * hd];
                if range.is_empty() {
                    srow[cols.clone()].fill(0.0);
                    continue;
                }
                let (m, chunk_sum) =
                    softmax_step(kernel, &mut srow[range.clone()], d.scale, max[r]);
                let alpha = (max[r] - m).exp();
                srow[cols.start..range.start].fill(0.0);
                srow[range.end..cols.end].fill(0.0);
                sum[r] = sum[r] * alpha + chunk_sum;
                max[r] = m;
                if alpha != 1.0 {
                    arow.iter_mut().for_each(|a| *a *= alpha);
                }
            }
            let ag = &mut acc[r0 * hd..(r0 + nr) * hd];
            accumulate(kernel, s, vchunk, vrs, ag, nr, hd, cols);
        }
        c0 += n;
    }
    total.merge(seg, hd);
}

/// Writes keys `c0..c0 + n` of kv head `g` transposed into `kt` (`[hd, KEY_CHUNK]`:
/// element `dd` of key `c0 + c` at `kt[dd * KEY_CHUNK + c]`), eight keys at a time
/// (decoded into `kdec`, `8 x hd` floats, when the cache is not f32, but f16 rows
/// widened as the AVX2 path loads them); the AVX2 path moves 8 x 8 blocks with
/// [`afo_quant::kernels::transpose8_avx2`]. Plain copies and exact conversions: the
/// result does not depend on the path.
#[allow(clippy::too_many_arguments)]
fn transpose_keys(
    kernel: Kernel,
    k: &Rows<'_>,
    g: usize,
    c0: usize,
    n: usize,
    hd: usize,
    kt: &mut [f32],
    kdec: &mut [f32],
) {
    let in_place = k.f32_head(g);
    // f16 keys widened as the transpose loads them, eight whole rows at a time.
    #[cfg(target_arch = "x86_64")]
    let f16_rows = k.f16_head(g).filter(|_| {
        kernel.has_avx2()
            && is_x86_feature_detected!("f16c")
            && hd.is_multiple_of(8)
            && kt.len() >= hd * KEY_CHUNK
    });
    // Q8_0 keys dequantized as the transpose loads them.
    #[cfg(target_arch = "x86_64")]
    let q8_rows = k
        .q8_head(g)
        .filter(|_| kernel.has_avx2() && hd.is_multiple_of(32) && kt.len() >= hd * KEY_CHUNK);
    let mut c = 0;
    while c < n {
        let group = (n - c).min(8);
        #[cfg(target_arch = "x86_64")]
        if let Some((kh, krs)) = q8_rows
            && group == 8
            && c + 8 <= KEY_CHUNK
            && let Some(rows) = eight_rows(kh, c0 + c, krs, stored_width(DType::U8, hd))
        {
            // SAFETY: the CPU has AVX2 (checked); every row holds `hd / 32` whole
            // blocks, and `kt` holds `hd` rows of KEY_CHUNK with columns c..c + 8
            // inside (checked).
            unsafe { avx2::transpose_keys_q8(&rows, hd, kt, c) };
            c += 8;
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some((kh, krs)) = f16_rows
            && group == 8
            && c + 8 <= KEY_CHUNK
            && let Some(rows) = eight_rows(kh, c0 + c, krs, hd)
        {
            let rows: [&[u16]; 8] = rows.map(|r| r.reinterpret_cast());
            // SAFETY: the CPU has AVX2 and F16C (checked); every row holds `hd` halves,
            // a multiple of 8, and `kt` holds `hd` rows of KEY_CHUNK with columns
            // c..c + 8 inside (checked).
            unsafe { avx2::transpose_keys_h(&rows, hd, kt, c) };
            c += 8;
            continue;
        }
        // The group's rows: in place for f32, decoded otherwise.
        let mut rows: [&[f32]; 8] = [&[]; 8];
        // How many rows of the group hold `hd` floats, counted as they are taken (not
        // read back from `rows`: that read of eight just-stored lengths stalled).
        let mut full = 0;
        match in_place {
            Some((kh, krs)) => {
                for (j, row) in rows.iter_mut().enumerate().take(group) {
                    let at = (c0 + c + j) * krs;
                    if let Some(r) = kh.get(at..at + hd) {
                        *row = r;
                        full += 1;
                    }
                }
            }
            None => {
                for (j, out) in kdec.chunks_exact_mut(hd).enumerate().take(group) {
                    k.decode(g, c0 + c + j, out);
                }
                for (j, row) in rows.iter_mut().enumerate().take(group) {
                    if let Some(r) = kdec.get(j * hd..(j + 1) * hd) {
                        *row = r;
                        full += 1;
                    }
                }
            }
        }
        let whole = full == 8 && hd.is_multiple_of(8);
        #[cfg(target_arch = "x86_64")]
        if whole && kernel.has_avx2() && kt.len() >= hd * KEY_CHUNK && c + 8 <= KEY_CHUNK {
            // SAFETY: the CPU has AVX2 (checked); every row holds `hd` floats, a
            // multiple of 8, and `kt` holds `hd` rows of KEY_CHUNK with columns
            // c..c + 8 inside (checked).
            unsafe { avx2::transpose_keys(&rows, hd, kt, c) };
            c += 8;
            continue;
        }
        let _ = (whole, kernel);
        for (j, row) in rows.iter().enumerate().take(group) {
            for (dd, x) in row.iter().enumerate() {
                if let Some(slot) = kt.get_mut(dd * KEY_CHUNK + c + j) {
                    *slot = *x;
                }
            }
        }
        c += group;
    }
}

/// Rows `first..first + 8` of a head (`stride` elements apart, `len` each), or `None`
/// when one lies outside it.
fn eight_rows<T>(head: &[T], first: usize, stride: usize, len: usize) -> Option<[&[T]; 8]> {
    let rows: [Option<&[T]>; 8] = std::array::from_fn(|j| {
        let at = (first + j) * stride;
        head.get(at..at + len)
    });
    rows.iter()
        .all(Option::is_some)
        .then(|| rows.map(Option::unwrap_or_default))
}

/// Calls `f::<R>(args)` for `R` = `nr` (1 to 3, or 4 for any other count): the
/// micro-kernels' row count as a const generic.
macro_rules! by_rows {
    ($nr:expr, $($f:ident)::+($($arg:expr),* $(,)?)) => {
        match $nr {
            1 => $($f)::+::<1>($($arg),*),
            2 => $($f)::+::<2>($($arg),*),
            3 => $($f)::+::<3>($($arg),*),
            _ => $($f)::+::<4>($($arg),*),
        }
    };
}

/// `s[r][c] = q[r] . kt[.][c]` for the `nr` rows of `q` (`[nr, hd]`) and the columns
/// `cols` (multiples of [`COLS`]) of the transposed key chunk `kt` (`[hd, KEY_CHUNK]`);
/// `s` is `[GROUP, KEY_CHUNK]`.
fn scores(
    kernel: Kernel,
    q: &[f32],
    hd: usize,
    kt: &[f32],
    s: &mut [f32],
    nr: usize,
    cols: Range<usize>,
) {
    let fits = (1..=GROUP).contains(&nr)
        && q.len() >= nr * hd
        && kt.len() >= hd * KEY_CHUNK
        && s.len() >= nr * KEY_CHUNK
        && cols.start.is_multiple_of(COLS)
        && cols.end.is_multiple_of(COLS)
        && cols.start <= cols.end
        && cols.end <= KEY_CHUNK;
    if !fits {
        debug_assert!(false, "attention scores called out of bounds");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 && kernel.is_available() {
        // SAFETY: the CPU has AVX-512F (checked), and the bounds hold (checked above),
        // as for the AVX2 kernel below.
        unsafe { by_rows!(nr, avx512::scores(q, hd, kt, s, cols)) }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 && kernel.is_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked), and the bounds hold (checked
        // above): every row `r < nr` of `q` has `hd` elements, every column
        // `c < cols.end <= KEY_CHUNK` of `kt` has `hd` rows, `s` has `nr` rows of
        // `KEY_CHUNK`.
        unsafe { by_rows!(nr, avx2::scores(q, hd, kt, s, cols)) }
        return;
    }
    let _ = kernel;
    for r in 0..nr {
        let out = &mut s[r * KEY_CHUNK + cols.start..r * KEY_CHUNK + cols.end];
        out.fill(0.0);
        for (dd, &qv) in q[r * hd..(r + 1) * hd].iter().enumerate() {
            let krow = &kt[dd * KEY_CHUNK + cols.start..dd * KEY_CHUNK + cols.end];
            for (o, &kk) in out.iter_mut().zip(krow) {
                *o += qv * kk;
            }
        }
    }
}

/// One row's online-softmax step over the visible scores `x` of a chunk: scales them
/// by `scale`, and with `m = max(prev_max, max(x))` replaces each by `exp(x - m)`.
/// Returns `m` and the sum of the new values.
fn softmax_step(kernel: Kernel, x: &mut [f32], scale: f32, prev_max: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 && kernel.is_available() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { avx512::softmax_step(x, scale, prev_max) };
    }
    #[cfg(target_arch = "x86_64")]
    if kernel.has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { avx2::softmax_step(x, scale, prev_max) };
    }
    let _ = kernel;
    let mut m = prev_max;
    for v in x.iter_mut() {
        *v *= scale;
        m = m.max(*v);
    }
    let mut total = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        total += *v;
    }
    (m, total)
}

/// The SIMD accumulations' last elements, `d..hd` of each row (fewer than a vector),
/// one fused multiply-add each (as the vector lanes compute them).
#[allow(clippy::too_many_arguments)]
fn accumulate_tail(
    p: &[f32],
    v: &[f32],
    vrs: usize,
    acc: &mut [f32],
    nr: usize,
    hd: usize,
    cols: Range<usize>,
    d: usize,
) {
    if d >= hd {
        return;
    }
    for (r, arow) in acc.chunks_exact_mut(hd).take(nr).enumerate() {
        for c in cols.clone() {
            let (Some(&pc), Some(vrow)) = (p.get(r * KEY_CHUNK + c), v.get(c * vrs..c * vrs + hd))
            else {
                continue;
            };
            for (a, &x) in arow[d..].iter_mut().zip(&vrow[d..]) {
                *a = pc.mul_add(x, *a);
            }
        }
    }
}

/// The bounds every accumulation relies on (`cols` not empty): `nr` rows (1 to
/// [`GROUP`]) of `KEY_CHUNK` probabilities and of `hd` accumulators, and value rows
/// `c < cols.end` of `row_len` elements from `c * vrs` inside the values; `lens` are the
/// lengths of the probabilities, the accumulators and the values.
fn accumulate_fits(
    (p_len, acc_len, v_len): (usize, usize, usize),
    nr: usize,
    hd: usize,
    cols: &Range<usize>,
    vrs: usize,
    row_len: usize,
) -> bool {
    (1..=GROUP).contains(&nr)
        && p_len >= nr * KEY_CHUNK
        && acc_len >= nr * hd
        && cols.end <= KEY_CHUNK
        && cols
            .end
            .checked_sub(1)
            .and_then(|c| c.checked_mul(vrs))
            .and_then(|x| x.checked_add(row_len))
            .is_some_and(|end| end <= v_len)
}

/// Whether [`accumulate`] reads f16 value rows of `hd` elements in place with
/// `kernel`: AVX-512F for a multiple of 64, AVX2 with F16C for a multiple of 16.
fn f16_values_direct(kernel: Kernel, hd: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (kernel == Kernel::Avx512 && kernel.is_available() && hd.is_multiple_of(64))
            || (kernel.has_avx2() && is_x86_feature_detected!("f16c") && hd.is_multiple_of(16))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, hd);
        false
    }
}

/// Whether [`accumulate`] reads Q8_0 value rows of `hd` elements (a multiple of
/// 32: whole blocks) in place with `kernel`: AVX-512F, or AVX2.
fn q8_values_direct(kernel: Kernel, hd: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        hd.is_multiple_of(32) && kernel.has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, hd);
        false
    }
}

/// `acc[r] += sum over c in cols of p[r][c] * v[c]` for the `nr` rows of `acc`
/// (`[nr, hd]`), where `p` is `[GROUP, KEY_CHUNK]` and value row `c` starts at element
/// (byte, for Q8_0) `c * vrs` of `v`. f16 rows are widened and Q8_0 blocks dequantized
/// (`d * q` in f32, as [`afo_quant::kernels::dequantize_q8_0`] computes it) as they are
/// loaded, where [`f16_values_direct`] and [`q8_values_direct`] say so: exactly the
/// products over the decoded rows, without writing them out first (8 sequences over an
/// f16 cache, Zen 5: 1.04-1.09x a batched step).
#[allow(clippy::too_many_arguments)]
fn accumulate(
    kernel: Kernel,
    p: &[f32],
    v: Values<'_>,
    vrs: usize,
    acc: &mut [f32],
    nr: usize,
    hd: usize,
    cols: Range<usize>,
) {
    if cols.is_empty() {
        return;
    }
    let (v_len, row_len, direct) = match v {
        Values::F32(x) => (x.len(), hd, true),
        Values::F16(x) => (x.len(), hd, f16_values_direct(kernel, hd)),
        Values::Q8(x) => (
            x.len(),
            stored_width(DType::U8, hd),
            q8_values_direct(kernel, hd),
        ),
    };
    if !direct || !accumulate_fits((p.len(), acc.len(), v_len), nr, hd, &cols, vrs, row_len) {
        debug_assert!(
            false,
            "attention accumulate without its kernel or out of bounds"
        );
        return;
    }
    let avx512 = kernel == Kernel::Avx512 && kernel.is_available();
    match v {
        #[cfg(target_arch = "x86_64")]
        Values::F32(v) if avx512 => {
            // SAFETY: the CPU has AVX-512F (checked), and the bounds hold (checked
            // above): value rows `c < cols.end` lie in `v`, `p` has `nr` rows of
            // `KEY_CHUNK`, `acc` has `nr` rows of `hd`.
            unsafe { by_rows!(nr, avx512::accumulate(p, v, vrs, acc, hd, cols)) }
        }
        #[cfg(target_arch = "x86_64")]
        Values::F32(v) if kernel == Kernel::Avx2 && kernel.is_available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked), and the bounds hold (above).
            unsafe { by_rows!(nr, avx2::accumulate(p, v, vrs, acc, hd, cols)) }
        }
        Values::F32(v) => {
            for r in 0..nr {
                let arow = &mut acc[r * hd..(r + 1) * hd];
                for c in cols.clone() {
                    let pc = p[r * KEY_CHUNK + c];
                    let vrow = &v[c * vrs..c * vrs + hd];
                    for (a, &x) in arow.iter_mut().zip(vrow) {
                        *a += pc * x;
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Values::F16(v) => {
            let v: &[u16] = v.reinterpret_cast();
            if avx512 && hd.is_multiple_of(64) {
                // SAFETY: AVX-512F is available and the bounds hold (both checked).
                unsafe { by_rows!(nr, avx512::accumulate_h(p, v, vrs, acc, hd, cols)) }
            } else {
                // SAFETY: AVX2, FMA and F16C are available, `hd` a multiple of 16
                // (`f16_values_direct`), and the bounds hold (checked above).
                unsafe { by_rows!(nr, avx2::accumulate_h(p, v, vrs, acc, hd, cols)) }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Values::Q8(v) => {
            if avx512 {
                // SAFETY: AVX-512F is available and the bounds hold (both checked).
                unsafe { by_rows!(nr, avx512::accumulate_q8(p, v, vrs, acc, hd, cols)) }
            } else {
                // SAFETY: AVX2 and FMA are available (`q8_values_direct`), and the
                // bounds hold (checked above).
                unsafe { by_rows!(nr, avx2::accumulate_q8(p, v, vrs, acc, hd, cols)) }
            }
        }
        // Not built here: `f16_values_direct` and `q8_values_direct` refuse them.
        #[cfg(not(target_arch = "x86_64"))]
        Values::F16(_) | Values::Q8(_) => {}
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The micro-kernels in AVX2 + FMA intrinsics.

    use std::arch::x86_64::{
        __m256, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_loadl_epi64, _mm_loadu_si128,
        _mm_movehl_ps, _mm_shuffle_ps, _mm256_add_ps, _mm256_castps256_ps128, _mm256_cvtepi8_epi32,
        _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_max_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps,
        _mm256_storeu_ps, _mm256_sub_ps,
    };
    use std::ops::Range;

    use super::{COLS, KEY_CHUNK};

    /// [`super::transpose_keys`] for eight rows of `hd` floats (a multiple of 8):
    /// 8 x 8 blocks, each stored as eight vectors at `kt[(dd + i) * KEY_CHUNK + c..]`.
    ///
    /// # Safety
    /// AVX2 is available; every row holds `hd` floats; `kt` holds `hd * KEY_CHUNK`
    /// floats and `c + 8 <= KEY_CHUNK`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn transpose_keys(rows: &[&[f32]; 8], hd: usize, kt: &mut [f32], c: usize) {
        let dst = kt.as_mut_ptr();
        for dd in (0..hd).step_by(8) {
            // SAFETY: dd + 8 <= hd, the length of every row.
            let v: [__m256; 8] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(rows[j].as_ptr().add(dd)) });
            let t = afo_quant::kernels::transpose8_avx2(v);
            for (i, ti) in t.iter().enumerate() {
                // SAFETY: (dd + i) * KEY_CHUNK + c + 8 <= hd * KEY_CHUNK.
                unsafe { _mm256_storeu_ps(dst.add((dd + i) * KEY_CHUNK + c), *ti) };
            }
        }
    }

    /// [`transpose_keys`] for eight rows of `hd` f16 values (their bits; `hd` a
    /// multiple of 8), each widened in registers as it is loaded.
    ///
    /// # Safety
    /// AVX2 and F16C are available; every row holds `hd` halves; `kt` holds
    /// `hd * KEY_CHUNK` floats and `c + 8 <= KEY_CHUNK`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn transpose_keys_h(rows: &[&[u16]; 8], hd: usize, kt: &mut [f32], c: usize) {
        let dst = kt.as_mut_ptr();
        for dd in (0..hd).step_by(8) {
            // SAFETY: dd + 8 <= hd, the length of every row.
            let v: [__m256; 8] = std::array::from_fn(|j| unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(rows[j].as_ptr().add(dd).cast()))
            });
            let t = afo_quant::kernels::transpose8_avx2(v);
            for (i, ti) in t.iter().enumerate() {
                // SAFETY: (dd + i) * KEY_CHUNK + c + 8 <= hd * KEY_CHUNK.
                unsafe { _mm256_storeu_ps(dst.add((dd + i) * KEY_CHUNK + c), *ti) };
            }
        }
    }

    /// [`transpose_keys`] for eight rows of `hd / 32` Q8_0 blocks each (`hd` a
    /// multiple of 32): each block's quants times its scale (`d * q`, as the scalar
    /// dequantization computes it) as the transpose loads them.
    ///
    /// # Safety
    /// AVX2 is available; every row holds `hd / 32` blocks of 34 bytes; `kt` holds
    /// `hd * KEY_CHUNK` floats and `c + 8 <= KEY_CHUNK`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn transpose_keys_q8(rows: &[&[u8]; 8], hd: usize, kt: &mut [f32], c: usize) {
        let dst = kt.as_mut_ptr();
        for b in 0..hd / 32 {
            // SAFETY (whole block): block b's 34 bytes lie in every row.
            let scales: [__m256; 8] = std::array::from_fn(|j| {
                let h =
                    unsafe { std::ptr::read_unaligned(rows[j].as_ptr().add(b * 34).cast::<u16>()) };
                _mm256_set1_ps(half::f16::from_bits(u16::from_le(h)).to_f32())
            });
            for part in 0..4 {
                let v: [__m256; 8] = std::array::from_fn(|j| unsafe {
                    let q = rows[j].as_ptr().add(b * 34 + 2 + 8 * part);
                    let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast())));
                    _mm256_mul_ps(scales[j], q)
                });
                let t = afo_quant::kernels::transpose8_avx2(v);
                let dd = b * 32 + 8 * part;
                for (i, ti) in t.iter().enumerate() {
                    // SAFETY: (dd + i) * KEY_CHUNK + c + 8 <= hd * KEY_CHUNK.
                    unsafe { _mm256_storeu_ps(dst.add((dd + i) * KEY_CHUNK + c), *ti) };
                }
            }
        }
    }

    /// [`super::scores`] for `R` rows.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `q` holds `R * hd` elements, `kt` `hd * KEY_CHUNK`,
    /// `s` `R * KEY_CHUNK`; `cols` are multiples of [`COLS`] up to `KEY_CHUNK`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores<const R: usize>(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        s: &mut [f32],
        cols: Range<usize>,
    ) {
        let (qp, kp, sp) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
        let mut c = cols.start;
        while c + COLS <= cols.end {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for d in 0..hd {
                // SAFETY: `d < hd` and `c + 16 <= KEY_CHUNK`, so both loads lie in
                // `kt`; `r * hd + d < R * hd`, in `q`.
                unsafe {
                    let k0 = _mm256_loadu_ps(kp.add(d * KEY_CHUNK + c));
                    let k1 = _mm256_loadu_ps(kp.add(d * KEY_CHUNK + c + 8));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qb = _mm256_set1_ps(*qp.add(r * hd + d));
                        a[0] = _mm256_fmadd_ps(qb, k0, a[0]);
                        a[1] = _mm256_fmadd_ps(qb, k1, a[1]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: `r * KEY_CHUNK + c + 16 <= R * KEY_CHUNK`, in `s`.
                unsafe {
                    _mm256_storeu_ps(sp.add(r * KEY_CHUNK + c), a[0]);
                    _mm256_storeu_ps(sp.add(r * KEY_CHUNK + c + 8), a[1]);
                }
            }
            c += COLS;
        }
    }

    /// [`super::softmax_step`].
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_step(x: &mut [f32], scale: f32, prev_max: f32) -> (f32, f32) {
        let n = x.len();
        let body = n / 8 * 8;
        let p = x.as_mut_ptr();
        let vs = _mm256_set1_ps(scale);
        let mut vm = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= n`.
            unsafe {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vs);
                _mm256_storeu_ps(p.add(i), v);
                vm = _mm256_max_ps(vm, v);
            }
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight elements.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vm) };
        let mut m = lanes.iter().fold(prev_max, |a, &b| a.max(b));
        for v in &mut x[body..] {
            *v *= scale;
            m = m.max(*v);
        }
        let vmax = _mm256_set1_ps(m);
        let mut vsum = _mm256_setzero_ps();
        let p = x.as_mut_ptr();
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= n`.
            unsafe {
                let e = crate::activation::exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
                _mm256_storeu_ps(p.add(i), e);
                vsum = _mm256_add_ps(vsum, e);
            }
        }
        let mut total = sum1(vsum);
        for v in &mut x[body..] {
            *v = (*v - m).exp();
            total += *v;
        }
        (m, total)
    }

    /// The sum of the eight lanes of `a`.
    #[target_feature(enable = "avx2,fma")]
    fn sum1(a: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_shuffle_ps::<1>(x, x));
        _mm_cvtss_f32(x)
    }

    /// The accumulation's loop over `8 V` elements at a time from element `d0`, while
    /// they fit in `hd`: `load(c, d)` gives value row `c`'s elements `d..d + 8 V` as f32.
    /// Returns the first element it did not reach.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `acc` holds `R * hd` floats and `p` `R * KEY_CHUNK`;
    /// `load` reads only inside the values for `c` in `cols`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate_by<const R: usize, const V: usize>(
        p: &[f32],
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
        d0: usize,
        load: impl Fn(usize, usize) -> [__m256; V],
    ) -> usize {
        let (pp, ap) = (p.as_ptr(), acc.as_mut_ptr());
        let mut d = d0;
        while d + 8 * V <= hd {
            // SAFETY: `r * hd + d + 8 V <= R * hd` (in `acc`); `r * KEY_CHUNK + c <
            // R * KEY_CHUNK` (in `p`); `load` is the caller's.
            unsafe {
                let mut a: [[__m256; V]; R] = [[_mm256_setzero_ps(); V]; R];
                for (r, a) in a.iter_mut().enumerate() {
                    for (j, x) in a.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(ap.add(r * hd + d + 8 * j));
                    }
                }
                for c in cols.clone() {
                    let vv = load(c, d);
                    for (r, a) in a.iter_mut().enumerate() {
                        let pb = _mm256_set1_ps(*pp.add(r * KEY_CHUNK + c));
                        for (x, y) in a.iter_mut().zip(vv) {
                            *x = _mm256_fmadd_ps(pb, y, *x);
                        }
                    }
                }
                for (r, a) in a.iter().enumerate() {
                    for (j, x) in a.iter().enumerate() {
                        _mm256_storeu_ps(ap.add(r * hd + d + 8 * j), *x);
                    }
                }
            }
            d += 8 * V;
        }
        d
    }

    /// [`super::accumulate`] for `R` rows.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `p` holds `R * KEY_CHUNK` elements, `acc` `R * hd`;
    /// `cols` is not empty, `cols.end <= KEY_CHUNK` and
    /// `(cols.end - 1) * vrs + hd <= v.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate<const R: usize>(
        p: &[f32],
        v: &[f32],
        vrs: usize,
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
    ) {
        let vp = v.as_ptr();
        // SAFETY: the caller's bounds: value row `c` has `hd` elements from `c * vrs`.
        let d = unsafe {
            let d = accumulate_by::<R, 2>(p, acc, hd, cols.clone(), 0, |c, d| {
                let row = vp.add(c * vrs + d);
                [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))]
            });
            accumulate_by::<R, 1>(p, acc, hd, cols.clone(), d, |c, d| {
                [_mm256_loadu_ps(vp.add(c * vrs + d))]
            })
        };
        super::accumulate_tail(p, v, vrs, acc, R, hd, cols, d);
    }

    /// [`accumulate`] over f16 value rows (their bits), each widened in registers as
    /// it is loaded; `hd` a multiple of 16.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; the bounds of [`super::accumulate`] hold.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn accumulate_h<const R: usize>(
        p: &[f32],
        v: &[u16],
        vrs: usize,
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
    ) {
        let vp = v.as_ptr();
        // SAFETY: value row `c`'s `hd` halves lie from `c * vrs` (the caller's).
        unsafe {
            accumulate_by::<R, 2>(p, acc, hd, cols, 0, |c, d| {
                let row = vp.add(c * vrs + d);
                std::array::from_fn(|j| _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * j).cast())))
            });
        }
    }

    /// [`super::accumulate`] over Q8_0 value rows (`vrs` bytes apart), each block's
    /// quants times its scale as they are loaded; `hd` a multiple of 32.
    ///
    /// # Safety
    /// AVX2 and FMA are available; the bounds of [`super::accumulate`] hold.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn accumulate_q8<const R: usize>(
        p: &[f32],
        v: &[u8],
        vrs: usize,
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
    ) {
        let vp = v.as_ptr();
        // SAFETY: block `d / 32` of value row `c` lies at `c * vrs + 34 (d / 32)` (the
        // caller's bounds).
        unsafe {
            accumulate_by::<R, 4>(p, acc, hd, cols, 0, |c, d| {
                let blk = vp.add(c * vrs + d / 32 * 34);
                let h = u16::from_le(std::ptr::read_unaligned(blk.cast::<u16>()));
                let scale = _mm256_set1_ps(half::f16::from_bits(h).to_f32());
                std::array::from_fn(|j| {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * j).cast()));
                    _mm256_mul_ps(scale, _mm256_cvtepi32_ps(q))
                })
            });
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The score and accumulation micro-kernels in AVX-512F intrinsics: sixteen lanes,
    //! the same products as the AVX2 ones in the same order per element.

    use std::arch::x86_64::{
        __m512, _mm_loadu_si128, _mm256_loadu_si256, _mm512_add_ps, _mm512_cvtepi8_epi32,
        _mm512_cvtepi32_ps, _mm512_cvtph_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_max_ps,
        _mm512_mul_ps, _mm512_reduce_add_ps, _mm512_reduce_max_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_storeu_ps, _mm512_sub_ps,
    };
    use std::ops::Range;

    use super::{COLS, KEY_CHUNK};

    /// [`super::softmax_step`] in sixteen lanes (the tail after the last sixteen as
    /// the portable step does it).
    ///
    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_step(x: &mut [f32], scale: f32, prev_max: f32) -> (f32, f32) {
        let n = x.len();
        let body = n / 16 * 16;
        let p = x.as_mut_ptr();
        let vs = _mm512_set1_ps(scale);
        let mut vm = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(16) {
            // SAFETY: `i + 16 <= n`.
            unsafe {
                let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), vs);
                _mm512_storeu_ps(p.add(i), v);
                vm = _mm512_max_ps(vm, v);
            }
        }
        let mut m = prev_max.max(_mm512_reduce_max_ps(vm));
        for v in &mut x[body..] {
            *v *= scale;
            m = m.max(*v);
        }
        let vmax = _mm512_set1_ps(m);
        let mut vsum = _mm512_setzero_ps();
        let p = x.as_mut_ptr();
        for i in (0..body).step_by(16) {
            // SAFETY: `i + 16 <= n`.
            unsafe {
                let e = crate::activation::exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vmax));
                _mm512_storeu_ps(p.add(i), e);
                vsum = _mm512_add_ps(vsum, e);
            }
        }
        let mut total = _mm512_reduce_add_ps(vsum);
        for v in &mut x[body..] {
            *v = (*v - m).exp();
            total += *v;
        }
        (m, total)
    }

    /// [`super::scores`] for `R` rows: 32 columns per step (two registers a row),
    /// then 16.
    ///
    /// # Safety
    /// AVX-512F is available; `q` holds `R * hd` elements, `kt` `hd * KEY_CHUNK`,
    /// `s` `R * KEY_CHUNK`; `cols` are multiples of [`COLS`] up to `KEY_CHUNK`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores<const R: usize>(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        s: &mut [f32],
        cols: Range<usize>,
    ) {
        let (qp, kp, sp) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
        let mut c = cols.start;
        while c + 2 * COLS <= cols.end {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for d in 0..hd {
                // SAFETY: `d < hd` and `c + 32 <= KEY_CHUNK`, so both loads lie in
                // `kt`; `r * hd + d < R * hd`, in `q`.
                unsafe {
                    let k0 = _mm512_loadu_ps(kp.add(d * KEY_CHUNK + c));
                    let k1 = _mm512_loadu_ps(kp.add(d * KEY_CHUNK + c + 16));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qb = _mm512_set1_ps(*qp.add(r * hd + d));
                        a[0] = _mm512_fmadd_ps(qb, k0, a[0]);
                        a[1] = _mm512_fmadd_ps(qb, k1, a[1]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: `r * KEY_CHUNK + c + 32 <= R * KEY_CHUNK`, in `s`.
                unsafe {
                    _mm512_storeu_ps(sp.add(r * KEY_CHUNK + c), a[0]);
                    _mm512_storeu_ps(sp.add(r * KEY_CHUNK + c + 16), a[1]);
                }
            }
            c += 2 * COLS;
        }
        if c + COLS <= cols.end {
            let mut acc = [_mm512_setzero_ps(); R];
            for d in 0..hd {
                // SAFETY: as above, with 16 columns.
                unsafe {
                    let k0 = _mm512_loadu_ps(kp.add(d * KEY_CHUNK + c));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(r * hd + d)), k0, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: as above, with 16 columns.
                unsafe { _mm512_storeu_ps(sp.add(r * KEY_CHUNK + c), *a) };
            }
        }
    }

    /// The accumulation's loop over `16 V` elements at a time from element `d0`, while
    /// they fit in `hd`: `load(c, d)` gives value row `c`'s elements `d..d + 16 V` as
    /// f32. Returns the first element it did not reach.
    ///
    /// # Safety
    /// AVX-512F is available; `acc` holds `R * hd` floats and `p` `R * KEY_CHUNK`;
    /// `load` reads only inside the values for `c` in `cols`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate_by<const R: usize, const V: usize>(
        p: &[f32],
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
        d0: usize,
        load: impl Fn(usize, usize) -> [__m512; V],
    ) -> usize {
        let (pp, ap) = (p.as_ptr(), acc.as_mut_ptr());
        let mut d = d0;
        while d + 16 * V <= hd {
            // SAFETY: `r * hd + d + 16 V <= R * hd` (in `acc`); `r * KEY_CHUNK + c <
            // R * KEY_CHUNK` (in `p`); `load` is the caller's.
            unsafe {
                let mut a: [[__m512; V]; R] = [[_mm512_setzero_ps(); V]; R];
                for (r, a) in a.iter_mut().enumerate() {
                    for (j, x) in a.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(ap.add(r * hd + d + 16 * j));
                    }
                }
                for c in cols.clone() {
                    let vv = load(c, d);
                    for (r, a) in a.iter_mut().enumerate() {
                        let pb = _mm512_set1_ps(*pp.add(r * KEY_CHUNK + c));
                        for (x, y) in a.iter_mut().zip(vv) {
                            *x = _mm512_fmadd_ps(pb, y, *x);
                        }
                    }
                }
                for (r, a) in a.iter().enumerate() {
                    for (j, x) in a.iter().enumerate() {
                        _mm512_storeu_ps(ap.add(r * hd + d + 16 * j), *x);
                    }
                }
            }
            d += 16 * V;
        }
        d
    }

    /// [`super::accumulate`] for `R` rows: 64 elements of each row per pass over the
    /// columns (four registers a row), then 16 at a time, then one by one.
    ///
    /// # Safety
    /// AVX-512F is available; `p` holds `R * KEY_CHUNK` elements, `acc` `R * hd`;
    /// `cols` is not empty, `cols.end <= KEY_CHUNK` and
    /// `(cols.end - 1) * vrs + hd <= v.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate<const R: usize>(
        p: &[f32],
        v: &[f32],
        vrs: usize,
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
    ) {
        let vp = v.as_ptr();
        // SAFETY: the caller's bounds: value row `c` has `hd` elements from `c * vrs`.
        let d = unsafe {
            let d = accumulate_by::<R, 4>(p, acc, hd, cols.clone(), 0, |c, d| {
                let row = vp.add(c * vrs + d);
                std::array::from_fn(|j| _mm512_loadu_ps(row.add(16 * j)))
            });
            accumulate_by::<R, 1>(p, acc, hd, cols.clone(), d, |c, d| {
                [_mm512_loadu_ps(vp.add(c * vrs + d))]
            })
        };
        super::accumulate_tail(p, v, vrs, acc, R, hd, cols, d);
    }

    /// [`accumulate`] over f16 value rows (their bits), each widened in registers as
    /// it is loaded; `hd` a multiple of 64.
    ///
    /// # Safety
    /// AVX-512F is available; the bounds of [`super::accumulate`] hold.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate_h<const R: usize>(
        p: &[f32],
        v: &[u16],
        vrs: usize,
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
    ) {
        let vp = v.as_ptr();
        // SAFETY: value row `c`'s `hd` halves lie from `c * vrs` (the caller's).
        unsafe {
            accumulate_by::<R, 4>(p, acc, hd, cols, 0, |c, d| {
                let row = vp.add(c * vrs + d);
                std::array::from_fn(|j| _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * j).cast())))
            });
        }
    }

    /// [`super::accumulate`] over Q8_0 value rows (`vrs` bytes apart), each block's
    /// quants times its scale as they are loaded; `hd` a multiple of 32.
    ///
    /// # Safety
    /// AVX-512F is available; the bounds of [`super::accumulate`] hold.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate_q8<const R: usize>(
        p: &[f32],
        v: &[u8],
        vrs: usize,
        acc: &mut [f32],
        hd: usize,
        cols: Range<usize>,
    ) {
        let vp = v.as_ptr();
        // SAFETY: block `d / 32` of value row `c` lies at `c * vrs + 34 (d / 32)` (the
        // caller's bounds).
        unsafe {
            accumulate_by::<R, 2>(p, acc, hd, cols, 0, |c, d| {
                let blk = vp.add(c * vrs + d / 32 * 34);
                let h = u16::from_le(std::ptr::read_unaligned(blk.cast::<u16>()));
                let scale = _mm512_set1_ps(half::f16::from_bits(h).to_f32());
                std::array::from_fn(|j| {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2 + 16 * j).cast()));
                    _mm512_mul_ps(scale, _mm512_cvtepi32_ps(q))
                })
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The materialised computation `Model::attend` ran before this kernel: causal
    /// within `window`, or with no mask at all for `None`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Tensor {
        let (_, heads, t, hd) = q.dims4().unwrap();
        let (_, kv, len, _) = k.dims4().unwrap();
        let n_rep = heads / kv;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = q
            .contiguous()
            .unwrap()
            .reshape((1, kv, n_rep * t, hd))
            .unwrap();
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(window) = window {
            let mask = crate::model::causal_mask(t, len - t, window, &Device::Cpu).unwrap();
            scores = scores
                .reshape((1, kv, n_rep, t, len))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap()
                .reshape((1, kv, n_rep * t, len))
                .unwrap();
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((1, heads, t, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((t, heads * hd))
            .unwrap()
    }

    /// Seeded values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    struct Case {
        heads: usize,
        kv: usize,
        hd: usize,
        t: usize,
        past: usize,
        window: usize,
    }

    /// Queries (contiguous or a transposed view) and keys and values narrowed from
    /// larger buffers, as the KV cache hands them out.
    fn inputs(c: &Case, seed: u64, transposed_q: bool) -> (Tensor, Tensor, Tensor) {
        let len = c.past + c.t;
        let cap = len + 9;
        let dev = Device::Cpu;
        let q = if transposed_q {
            Tensor::from_vec(
                values(c.t * c.heads * c.hd, seed, 2.0),
                (1, c.t, c.heads, c.hd),
                &dev,
            )
            .unwrap()
            .transpose(1, 2)
            .unwrap()
        } else {
            Tensor::from_vec(
                values(c.heads * c.t * c.hd, seed, 2.0),
                (1, c.heads, c.t, c.hd),
                &dev,
            )
            .unwrap()
        };
        let buf = |s| {
            Tensor::from_vec(
                values(c.kv * cap * c.hd, s, 1.5),
                (1, c.kv, cap, c.hd),
                &dev,
            )
            .unwrap()
        };
        // Keys from the start of their buffer, values from an offset: both strided.
        let k = buf(seed + 1).narrow(2, 0, len).unwrap();
        let v = buf(seed + 2).narrow(2, 4, len).unwrap();
        (q, k, v)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }

    fn kernels() -> Vec<Kernel> {
        let all = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];
        let have: Vec<Kernel> = all.into_iter().filter(|k| k.is_available()).collect();
        println!("attention kernels run: {have:?}");
        have
    }

    #[test]
    fn matches_the_materialised_computation() {
        let kernels = kernels();
        let mut seed = 1;
        let mut checked = 0;
        for &(heads, kv) in &[(9, 3), (4, 4), (8, 2)] {
            for &hd in &[64, 32, 80] {
                for &t in &[1, 2, 7, 64, 130] {
                    for &past in &[0, 5, 200] {
                        for &window in &[usize::MAX, 16, 100] {
                            let c = Case {
                                heads,
                                kv,
                                hd,
                                t,
                                past,
                                window,
                            };
                            seed += 1;
                            let (q, k, v) = inputs(&c, seed, seed % 2 == 0);
                            let want = reference(&q, &k, &v, Some(c.window));
                            for &kernel in &kernels {
                                let got = attention_with(&q, &k, &v, c.window, kernel).unwrap();
                                let diff = max_rel_diff(&got, &want);
                                assert!(
                                    diff < 1e-5,
                                    "{kernel:?} heads {heads}/{kv} hd {hd} t {t} past {past} \
                                     window {window}: {diff}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked >= 405);
    }

    /// Attention without the mask (an image's patches): every kernel against the
    /// materialised product with no mask, long enough to split into several blocks,
    /// chunks and segments; and not the causal result.
    #[test]
    fn full_attention_matches_the_unmasked_computation() {
        let kernels = kernels();
        let mut checked = 0;
        for (i, &(heads, kv, hd, t, past)) in [
            (2, 2, 64, 300, 0),
            (4, 2, 40, 70, 0),
            (3, 1, 13, 9, 0),
            (2, 1, 64, 5, 200),
            (16, 16, 64, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let c = Case {
                heads,
                kv,
                hd,
                t,
                past,
                window: usize::MAX,
            };
            let (q, k, v) = inputs(&c, 500 + i as u64, i % 2 == 1);
            let len = past + t;
            let want = reference(&q, &k, &v, None);
            for &kernel in &kernels {
                let got = attention_impl(&q, &k, &v, usize::MAX, kernel, false, true).unwrap();
                let diff = max_rel_diff(&got, &want);
                assert!(
                    diff < 1e-5,
                    "{kernel:?} {heads}/{kv} hd {hd} t {t} len {len}: {diff}"
                );
                if t > 1 && past == 0 {
                    let causal = attention_with(&q, &k, &v, usize::MAX, kernel).unwrap();
                    assert!(max_rel_diff(&causal, &want) > 1e-3, "{kernel:?}: masked");
                }
                checked += 1;
            }
        }
        assert!(checked >= 5);
        // The public entry takes the best kernel and checks shapes as the causal one.
        let c = Case {
            heads: 2,
            kv: 2,
            hd: 16,
            t: 4,
            past: 0,
            window: usize::MAX,
        };
        let (q, k, v) = inputs(&c, 9, false);
        let one = |k: &Tensor| {
            full_attention_many(&[Call {
                q: &q,
                k,
                v: &v,
                window: 1,
            }])
        };
        let got = one(&k).unwrap();
        assert_eq!(got[0].dims(), &[4, 32]);
        // The window does not apply without the mask.
        let want = attention_impl(&q, &k, &v, usize::MAX, Kernel::best(), false, true).unwrap();
        assert_eq!(max_rel_diff(&got[0], &want), 0.0);
        assert!(one(&k.narrow(3, 0, 8).unwrap()).is_err());
    }

    #[test]
    fn odd_sizes_match_too() {
        // Head sizes that are not a multiple of 8, one query head per kv head, tiny
        // windows.
        for &(heads, kv, hd, t, past, window) in &[
            (3, 1, 13, 5, 3, 1),
            (3, 1, 13, 2, 30, 9),
            (2, 1, 21, 1, 40, usize::MAX),
            (2, 2, 8, 9, 0, 2),
            (6, 2, 24, 33, 70, 5),
            (1, 1, 1, 3, 2, usize::MAX),
        ] {
            let c = Case {
                heads,
                kv,
                hd,
                t,
                past,
                window,
            };
            let (q, k, v) = inputs(&c, 77, false);
            let want = reference(&q, &k, &v, Some(c.window));
            for kernel in kernels() {
                let got = attention_with(&q, &k, &v, c.window, kernel).unwrap();
                assert!(max_rel_diff(&got, &want) < 1e-5, "{kernel:?} hd {hd} t {t}");
            }
        }
    }

    #[test]
    fn the_thread_count_does_not_change_the_result() {
        // A prefill, and decode steps over several segments of keys (with one thread
        // each kv head is one task; with more, each segment is).
        for (t, past, window) in [(130, 200, 100), (1, 1000, usize::MAX), (3, 700, 300)] {
            the_thread_count_does_not_change(t, past, window);
        }
    }

    fn the_thread_count_does_not_change(t: usize, past: usize, window: usize) {
        let c = Case {
            heads: 9,
            kv: 3,
            hd: 64,
            t,
            past,
            window,
        };
        let (q, k, v) = inputs(&c, 5, false);
        for kernel in kernels() {
            let run = |threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let out = pool.install(|| attention_with(&q, &k, &v, c.window, kernel).unwrap());
                out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let one = run(1);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&run(2)), "{kernel:?}");
            assert_eq!(bits(&one), bits(&run(3)), "{kernel:?}");
        }
    }

    #[test]
    fn a_position_is_the_same_in_a_prefill_and_a_decode_step() {
        // Row i of a prefill over the keys 0..len equals a one-query step over the
        // keys 0..=p (p = len - t + i), bit for bit, whether the step's segments of
        // keys run as one task or several.
        for (past, window) in [
            (70, usize::MAX),
            (70, 16),
            (70, 100),
            (600, usize::MAX),
            (600, 300),
        ] {
            let c = Case {
                heads: 9,
                kv: 3,
                hd: 64,
                t: 130,
                past,
                window,
            };
            let (q, k, v) = inputs(&c, 9, false);
            // One thread: a decode step is one task per kv head; four: one per segment.
            let pools: Vec<rayon::ThreadPool> = [1, 4]
                .iter()
                .map(|&n| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(n)
                        .build()
                        .unwrap()
                })
                .collect();
            for kernel in kernels() {
                let all = attention_with(&q, &k, &v, window, kernel).unwrap();
                for (i, pool) in [0, 1, 20, 21, 63, 64, 129]
                    .into_iter()
                    .flat_map(|i| pools.iter().map(move |p| (i, p)))
                {
                    let p = c.past + i;
                    let qi = q.narrow(2, i, 1).unwrap();
                    let (ki, vi) = (
                        k.narrow(2, 0, p + 1).unwrap(),
                        v.narrow(2, 0, p + 1).unwrap(),
                    );
                    let one = pool
                        .install(|| attention_with(&qi, &ki, &vi, window, kernel))
                        .unwrap();
                    let want: Vec<u32> = all
                        .get(i)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect();
                    let got: Vec<u32> = one
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect();
                    assert_eq!(got, want, "{kernel:?} window {window} row {i}");
                }
            }
        }
    }

    #[test]
    fn every_cache_format_is_read_as_its_decoded_rows() {
        use afo_kvcache::{KvCacheConfig, KvFormat};
        // Head sizes: a multiple of 64 (f16 values read in place by either kernel), of
        // 16 only (in place by AVX2's), of 8 only (decoded first; keys still widened in
        // the transpose); Q8_0 rows are whole blocks of 32, read in place by both.
        let cases = [(1, 150, usize::MAX), (70, 30, usize::MAX), (9, 80, 40)];
        for (format, hd) in [
            (KvFormat::F16, 64),
            (KvFormat::F16, 80),
            (KvFormat::F16, 40),
            (KvFormat::BF16, 64),
            (KvFormat::BF16, 40),
            (KvFormat::Q8_0, 64),
            (KvFormat::Q8_0, 96),
        ] {
            for &(t, past, window) in &cases {
                let c = Case {
                    heads: 9,
                    kv: 3,
                    hd,
                    t,
                    past,
                    window,
                };
                let (q, k, v) = inputs(&c, 31 + t as u64, false);
                let config = KvCacheConfig {
                    layers: 1,
                    kv_heads: 3,
                    head_dim: hd,
                    max_tokens: 1 << 12,
                    block_tokens: 64,
                    format,
                    budget_tokens: None,
                    policy: Default::default(),
                };
                // Encoded into a larger buffer and narrowed, as the cache hands it out.
                let stored = |x: &Tensor| {
                    let pad = Tensor::zeros_like(&x.narrow(2, 0, 5).unwrap()).unwrap();
                    let full = Tensor::cat(&[x, &pad], 2).unwrap();
                    config
                        .encode(&full)
                        .unwrap()
                        .narrow(2, 0, x.dim(2).unwrap())
                        .unwrap()
                };
                let (ks, vs) = (stored(&k), stored(&v));
                let (kd, vd) = (config.decode(&ks).unwrap(), config.decode(&vs).unwrap());
                let want = reference(&q, &kd, &vd, Some(window));
                for kernel in kernels() {
                    let got = attention_with(&q, &ks, &vs, window, kernel).unwrap();
                    let diff = max_rel_diff(&got, &want);
                    assert!(
                        diff < 1e-5,
                        "{format} hd {hd} {kernel:?} t {t} past {past}: {diff}"
                    );
                    // And the decoded rows in f32 give the same bits: decoding is the
                    // only difference between the formats.
                    let f32_rows = attention_with(&q, &kd, &vd, window, kernel).unwrap();
                    assert_eq!(
                        max_rel_diff(&got, &f32_rows),
                        0.0,
                        "{format} hd {hd} {kernel:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn many_calls_give_each_call_its_own_bits() {
        use afo_kvcache::{KvCacheConfig, KvFormat};
        // The sequences of a batched step: different lengths, windows, head counts
        // and cache formats, decode steps and a short prefill, in one parallel region
        // (two calls of one kv head in a row: their tasks must not merge).
        let case = |heads, kv, hd, t, past, window| Case {
            heads,
            kv,
            hd,
            t,
            past,
            window,
        };
        let all = usize::MAX;
        let cases = [
            (case(2, 1, 32, 1, 40, all), KvFormat::F32),
            (case(2, 1, 32, 1, 300, all), KvFormat::F32),
            (case(9, 3, 64, 1, 150, all), KvFormat::F32),
            (case(9, 3, 64, 1, 700, 300), KvFormat::F16),
            (case(9, 3, 64, 9, 80, all), KvFormat::Q8_0),
            (case(4, 4, 32, 1, 10, 4), KvFormat::BF16),
            (case(9, 3, 64, 1, 0, all), KvFormat::F32),
        ];
        let tensors: Vec<(Tensor, Tensor, Tensor)> = cases
            .iter()
            .enumerate()
            .map(|(i, (c, format))| {
                let (q, k, v) = inputs(c, 70 + i as u64, i % 2 == 1);
                let config = KvCacheConfig {
                    layers: 1,
                    kv_heads: c.kv,
                    head_dim: c.hd,
                    max_tokens: 1 << 12,
                    block_tokens: 64,
                    format: *format,
                    budget_tokens: None,
                    policy: Default::default(),
                };
                (q, config.encode(&k).unwrap(), config.encode(&v).unwrap())
            })
            .collect();
        let calls: Vec<Call<'_>> = tensors
            .iter()
            .zip(&cases)
            .map(|((q, k, v), (c, _))| Call {
                q,
                k,
                v,
                window: c.window,
            })
            .collect();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        for kernel in kernels() {
            let alone: Vec<Vec<u32>> = calls
                .iter()
                .map(|c| bits(&attention_with(c.q, c.k, c.v, c.window, kernel).unwrap()))
                .collect();
            // The whole batch, and its decode steps alone (one query position per
            // call: each task writes its heads of the output itself). One thread: one
            // task per kv head; more: the segments of keys split (a call alone on
            // two threads or more splits them too).
            let decode: Vec<usize> = (0..calls.len()).filter(|&i| cases[i].0.t == 1).collect();
            assert!(decode.len() > 1 && decode.len() < calls.len());
            for subset in [(0..calls.len()).collect(), decode] {
                let batch: Vec<Call<'_>> = subset.iter().map(|&i| calls[i]).collect();
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let many = pool
                        .install(|| attention_calls(&batch, kernel, true))
                        .unwrap();
                    assert_eq!(many.len(), batch.len());
                    for (m, &i) in many.iter().zip(&subset) {
                        let (c, _) = &cases[i];
                        assert_eq!(m.dims(), &[c.t, c.heads * c.hd]);
                        assert_eq!(bits(m), alone[i], "{kernel:?} call {i}, {threads} threads");
                    }
                }
            }
            // Each call on the calling thread alone, its keys never split (a batched
            // step's sequence in its own job), with the best kernel.
            if kernel == Kernel::best() {
                for (i, c) in calls.iter().enumerate() {
                    let here = causal_attention_here(c.q, c.k, c.v, c.window).unwrap();
                    assert_eq!(bits(&here), alone[i], "call {i} on the calling thread");
                }
            }
        }
        assert!(
            attention_calls(&[], Kernel::best(), true)
                .unwrap()
                .is_empty()
        );
        // A call that fails its checks fails the whole batch, and says which tensor.
        let (q, k, _) = &tensors[0];
        let short = k.narrow(2, 0, 10).unwrap();
        let mut bad = calls.clone();
        bad.insert(
            1,
            Call {
                q,
                k,
                v: &short,
                window: 9,
            },
        );
        assert!(matches!(
            attention_calls(&bad, Kernel::best(), true),
            Err(Error::TensorShape { .. })
        ));
    }

    #[test]
    fn softmax_steps_agree_across_kernels() {
        // Scores spread over the whole range exp is evaluated on (down to -100).
        let scores: Vec<f32> = (0..203).map(|i| 3.0 - i as f32 * 0.5).collect();
        let mut want = scores.clone();
        let (m, total) = softmax_step(Kernel::Portable, &mut want, 0.9, 1.0);
        for kernel in kernels() {
            let mut got = scores.clone();
            let (gm, gtotal) = softmax_step(kernel, &mut got, 0.9, 1.0);
            assert_eq!(m, gm);
            assert!(
                (total - gtotal).abs() <= 1e-6 * total,
                "{kernel:?}: {total} {gtotal}"
            );
            for (w, g) in want.iter().zip(&got) {
                // Relative to the value, or absolute where it underflows.
                assert!((w - g).abs() <= 4e-7 * w + 1e-37, "{kernel:?}: {w} {g}");
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
        assert!(causal_attention(&q, &k, &k, 0).is_err());
        assert!(causal_attention(&q, &k, &k.narrow(2, 0, 4).unwrap(), 9).is_err());
        let k3 = Tensor::zeros((1, 3, 5, 8), DType::F32, &dev).unwrap();
        assert!(causal_attention(&q, &k3, &k3, 9).is_err());
        let short = Tensor::zeros((1, 2, 1, 8), DType::F32, &dev).unwrap();
        assert!(causal_attention(&q, &short, &short, 9).is_err());
        // Keys and values must share a format; u8 rows are Q8_0 blocks, which need
        // whole blocks per head (head_dim 8 is not).
        let f16 = k.to_dtype(DType::F16).unwrap();
        assert!(matches!(
            causal_attention(&q, &f16, &k, 9),
            Err(Error::AttentionInput { .. })
        ));
        let u8s = Tensor::zeros((1, 2, 5, 34), DType::U8, &dev).unwrap();
        assert!(causal_attention(&q, &u8s, &u8s, 9).is_err());
        let i64s = k.to_dtype(DType::I64).unwrap();
        assert!(matches!(
            causal_attention(&q, &i64s, &i64s, 9),
            Err(Error::AttentionInput { .. })
        ));
        // Keys whose last dimension is not contiguous.
        let kt = Tensor::zeros((1, 2, 8, 5), DType::F32, &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        assert!(causal_attention(&q, &kt, &kt, 9).is_err());
        assert!(causal_attention(&q, &k, &k, 9).is_ok());
    }
}
