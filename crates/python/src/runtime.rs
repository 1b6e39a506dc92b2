//! `afo.Runtime`: the Rust `Runtime` behind a Python class, its arguments checked and
//! converted once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
use afo_runtime::guard::ByteSize;
use afo_runtime::quant::QuantScheme;
use afo_runtime::{ChainImage, ChainRequest, GenerateRequest, Prompt, QueryRequest};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::error::{to_py, value_error};
use crate::results::{ChainResult, GenerateResult, QueryResult};
use crate::run::{Run, Stream, on_thread};

/// A byte size from Python: an int (bytes) or a string such as "8GiB" or "512 MB".
fn byte_size(value: &Bound<'_, PyAny>) -> PyResult<ByteSize> {
    if let Ok(n) = value.extract::<u64>() {
        return Ok(ByteSize(n));
    }
    let text: String = value
        .extract()
        .map_err(|_| value_error("cutline: expected an int (bytes) or a str such as \"8GiB\""))?;
    text.parse()
        .map_err(|e| value_error(format!("cutline: {e}")))
}

/// Sets the compute thread count before the first run: rayon and candle read
/// `RAYON_NUM_THREADS` when their pools start. Set through `os.environ`, so that
/// Python's view of the environment agrees.
fn set_threads(py: Python<'_>, threads: usize) -> PyResult<()> {
    if threads == 0 {
        return Err(value_error("threads: must be at least 1"));
    }
    py.import("os")?
        .getattr("environ")?
        .set_item("RAYON_NUM_THREADS", threads.to_string())?;
    Ok(())
}

/// A `messages` list: dicts with "role" and "content".
fn messages(list: &Bound<'_, PyAny>) -> PyResult<Vec<Message>> {
    let mut out = Vec::new();
    for (i, item) in list.try_iter()?.enumerate() {
        let item = item?;
        let dict = item.cast::<PyDict>().map_err(|_| {
            value_error(format!(
                "messages[{i}]: expected a dict with \"role\" and \"content\""
            ))
        })?;
        let field = |name: &str| -> PyResult<String> {
            dict.get_item(name)?
                .ok_or_else(|| value_error(format!("messages[{i}]: no \"{name}\"")))?
                .extract()
                .map_err(|_| value_error(format!("messages[{i}][\"{name}\"]: expected a str")))
        };
        out.push(Message::new(field("role")?, field("content")?));
    }
    if out.is_empty() {
        return Err(value_error("messages: the list is empty"));
    }
    Ok(out)
}

/// One chain image: bytes (named `image-N`), or a path read here.
fn image(i: usize, item: &Bound<'_, PyAny>) -> PyResult<ChainImage> {
    if let Ok(bytes) = item.cast::<PyBytes>() {
        return Ok(ChainImage {
            name: format!("image-{i}"),
            bytes: bytes.as_bytes().to_vec(),
        });
    }
    let path: PathBuf = item.extract().map_err(|_| {
        value_error(format!(
            "images[{i}]: expected a path (str or os.PathLike) or bytes"
        ))
    })?;
    let bytes = std::fs::read(&path).map_err(|e| {
        pyo3::exceptions::PyFileNotFoundError::new_err(format!(
            "images[{i}]: cannot read `{}`: {e}",
            path.display()
        ))
    })?;
    Ok(ChainImage {
        name: path.display().to_string(),
        bytes,
    })
}

/// The generation arguments shared by `generate` and `stream`.
#[allow(clippy::too_many_arguments)]
fn request(
    model: PathBuf,
    prompt: Option<String>,
    messages_list: Option<&Bound<'_, PyAny>>,
    max_tokens: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    repetition_penalty: f32,
    seed: Option<u64>,
    stop: Option<&Bound<'_, PyAny>>,
    scheme: Option<&str>,
    ignore_eos: bool,
) -> PyResult<GenerateRequest> {
    let prompt = match (prompt, messages_list) {
        (Some(_), Some(_)) => {
            return Err(value_error("give either prompt or messages, not both"));
        }
        (None, None) => return Err(value_error("give a prompt or messages")),
        (Some(text), None) => Prompt::Text(text),
        (None, Some(list)) => Prompt::Chat(messages(list)?),
    };
    let stop = match stop {
        None => Vec::new(),
        Some(s) => match s.extract::<String>() {
            Ok(one) => vec![one],
            Err(_) => s
                .extract::<Vec<String>>()
                .map_err(|_| value_error("stop: expected a str or a list of str"))?,
        },
    };
    let mut sampling = SamplingParams::builder()
        .temperature(temperature)
        .top_p(top_p)
        .top_k(top_k)
        .repetition_penalty(repetition_penalty);
    if let Some(seed) = seed {
        sampling = sampling.seed(seed);
    }
    let sampling = sampling.build().map_err(|e| value_error(e.to_string()))?;
    let mut request = GenerateRequest::new(model, prompt).with_options(GenerateOptions {
        max_tokens,
        stop,
        sampling,
        ignore_eos,
        ..GenerateOptions::default()
    });
    if let Some(s) = scheme {
        let scheme: QuantScheme = s.parse().map_err(|e| value_error(format!("scheme: {e}")))?;
        request = request.with_scheme(scheme);
    }
    Ok(request)
}

/// The afo runtime: a memory guard with a cutline, a cache of loaded models, and one
/// SSOT record per run.
///
/// - cutline: the memory cutline, an int (bytes) or a str ("8GiB", "512MiB").
///   Lowered to the container's limit less a reserve when that is lower.
/// - ssot_log: path of the JSONL log each run appends one record to (None: no log).
/// - keep_alive: drop models idle for this many seconds (None: keep them).
/// - threads: compute threads (None: RAYON_NUM_THREADS, else every core). Takes
///   effect only before the first run of the process.
/// - replica_id, node_id: written in every SSOT record (a Ray Serve replica, a node).
/// - catalog: path of a model catalog (TOML or JSON) for `query`.
/// - kv_cache: how every model's KV cache holds keys and values: "f32", "f16" (the
///   default), "bf16" or "q8_0" (26.6% of the f32 bytes); estimates and reservations
///   count the chosen format.
///
/// Methods release the GIL while the runtime works, so Python threads can run
/// generations side by side. One Runtime per process is the intended use: it owns
/// the process's memory ledger.
#[pyclass(module = "afo", name = "Runtime", frozen)]
#[derive(Debug)]
pub struct PyRuntime {
    inner: Arc<afo_runtime::Runtime>,
    cutline_bytes: u64,
}

#[pymethods]
impl PyRuntime {
    #[new]
    #[pyo3(
        text_signature = "(cutline='8GiB', ssot_log=None, keep_alive=None, threads=None, replica_id=None, node_id=None, catalog=None, kv_cache='f16')"
    )]
    #[pyo3(signature = (cutline=None, ssot_log=None, keep_alive=None, threads=None, replica_id=None, node_id=None, catalog=None, kv_cache=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        cutline: Option<&Bound<'_, PyAny>>,
        ssot_log: Option<PathBuf>,
        keep_alive: Option<f64>,
        threads: Option<usize>,
        replica_id: Option<String>,
        node_id: Option<String>,
        catalog: Option<PathBuf>,
        kv_cache: Option<&str>,
    ) -> PyResult<Self> {
        let cutline = match cutline {
            Some(c) => byte_size(c)?,
            None => ByteSize::gib(8),
        };
        if let Some(n) = threads {
            set_threads(py, n)?;
        }
        let mut builder = afo_runtime::Runtime::builder().cutline(cutline);
        if let Some(path) = ssot_log {
            builder = builder.ssot_log(path);
        }
        if let Some(seconds) = keep_alive {
            let d = Duration::try_from_secs_f64(seconds).map_err(|_| {
                value_error(format!(
                    "keep_alive: {seconds} is not a number of seconds >= 0"
                ))
            })?;
            builder = builder.keep_alive(d);
        }
        if let Some(id) = replica_id {
            builder = builder.replica_id(id);
        }
        if let Some(id) = node_id {
            builder = builder.node_id(id);
        }
        if let Some(path) = catalog {
            let c = afo_runtime::select::Catalog::from_path(&path)
                .map_err(|e| to_py(py, &afo_runtime::Error::from(e)))?;
            builder = builder.catalog(c);
        }
        if let Some(name) = kv_cache {
            let format: afo_runtime::kvcache::KvFormat = name
                .parse()
                .map_err(|e| value_error(format!("kv_cache: {e}")))?;
            builder = builder.kv_format(format);
        }
        let runtime = py.detach(|| builder.build()).map_err(|e| to_py(py, &e))?;
        let cutline_bytes = runtime.budget().cutline();
        Ok(Self {
            inner: Arc::new(runtime),
            cutline_bytes,
        })
    }

    /// Generates from `model` (a GGUF file or a Hugging Face model folder) given a
    /// `prompt` (plain text, continued as it is) or `messages` (a list of
    /// {"role", "content"} dicts, rendered with the model's chat template), not both.
    ///
    /// temperature 0 is greedy; top_k 0 keeps every token; `stop` is a str or a list
    /// of str (the text ends before the first one); `scheme` quantizes the weights
    /// while loading ("q8_0", "q4_1", ...). The run is admitted on the memory ledger
    /// first: RefusedError when nothing fits under the cutline. Ctrl-C cancels the
    /// run and raises KeyboardInterrupt; its SSOT record is written either way.
    #[pyo3(signature = (model, prompt=None, messages=None, *, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None, stop=None, scheme=None, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        model: PathBuf,
        prompt: Option<String>,
        messages: Option<&Bound<'_, PyAny>>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        repetition_penalty: f32,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        scheme: Option<&str>,
        ignore_eos: bool,
    ) -> PyResult<GenerateResult> {
        let request = request(
            model,
            prompt,
            messages,
            max_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
            stop,
            scheme,
            ignore_eos,
        )?;
        Run::start(Arc::clone(&self.inner), request, false)?.wait(py)
    }

    /// Same arguments as `generate`. Returns an iterator of text deltas; once it is
    /// exhausted its `result` is the GenerateResult. Breaking out of the loop (and
    /// dropping the iterator) or `close()` cancels the run.
    #[pyo3(signature = (model, prompt=None, messages=None, *, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None, stop=None, scheme=None, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        model: PathBuf,
        prompt: Option<String>,
        messages: Option<&Bound<'_, PyAny>>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        repetition_penalty: f32,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        scheme: Option<&str>,
        ignore_eos: bool,
    ) -> PyResult<Stream> {
        let request = request(
            model,
            prompt,
            messages,
            max_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
            stop,
            scheme,
            ignore_eos,
        )?;
        Ok(Stream::new(Run::start(
            Arc::clone(&self.inner),
            request,
            true,
        )?))
    }

    /// The image-analysis -> summary chain: the vision-language model in the folder
    /// `vlm` describes the `images` (paths or bytes: JPEG, PNG, WebP, GIF, BMP) as
    /// `instruction` asks, then `llm` (a GGUF file or folder; None: the VLM's own
    /// language model) summarises the description. Both stages are greedy. One SSOT
    /// record carries both stages.
    #[pyo3(signature = (vlm, images, instruction="Describe the image.".to_owned(), llm=None, *, analysis_tokens=128, summary_tokens=96, summary_prompt=None))]
    #[allow(clippy::too_many_arguments)]
    fn chain(
        &self,
        py: Python<'_>,
        vlm: PathBuf,
        images: &Bound<'_, PyAny>,
        instruction: String,
        llm: Option<PathBuf>,
        analysis_tokens: usize,
        summary_tokens: usize,
        summary_prompt: Option<String>,
    ) -> PyResult<ChainResult> {
        if images.is_instance_of::<PyBytes>() || images.extract::<String>().is_ok() {
            return Err(value_error("images: expected a list of paths or bytes"));
        }
        let mut list = Vec::new();
        for (i, item) in images.try_iter()?.enumerate() {
            list.push(image(i, &item?)?);
        }
        let mut request = ChainRequest::new(vlm, list, instruction);
        request.llm = llm;
        request.analysis.max_tokens = analysis_tokens;
        request.summary.max_tokens = summary_tokens;
        if let Some(p) = summary_prompt {
            request.summary_prompt = p;
        }
        let runtime = Arc::clone(&self.inner);
        on_thread(py, "chain", move || runtime.chain(&request))?
            .map(|inner| ChainResult { inner })
            .map_err(|e| to_py(py, &e))
    }

    /// Answers `text` with the model the router picks from the runtime's catalog
    /// (the cheapest that meets the quality floor and fits under the cutline,
    /// stepping down to a smaller one when memory is short). `model` names a card
    /// and bypasses routing; `max_tokens` and `temperature` override the task's
    /// budget. Needs `catalog=` when the Runtime is made.
    #[pyo3(signature = (text, max_tokens=None, *, temperature=None, seed=None, model=None, images=0))]
    #[allow(clippy::too_many_arguments)]
    fn query(
        &self,
        py: Python<'_>,
        text: String,
        max_tokens: Option<usize>,
        temperature: Option<f32>,
        seed: Option<u64>,
        model: Option<String>,
        images: usize,
    ) -> PyResult<QueryResult> {
        let mut request = QueryRequest::new(text);
        request.max_tokens = max_tokens;
        request.temperature = temperature;
        request.seed = seed;
        request.model = model;
        request.images = images;
        let runtime = Arc::clone(&self.inner);
        on_thread(py, "query", move || runtime.query(&request))?
            .map(|inner| QueryResult { inner })
            .map_err(|e| to_py(py, &e))
    }

    /// The process's health now: {"badge", "health_score", "rss_bytes",
    /// "cutline_bytes", "ledger" (dict: cutline, margin, reserved (by kind),
    /// reserved_total, available, unaccounted, rss, peak_reserved, runs,
    /// kv_cache_usage), "loaded_models" (list of {"key", "bytes", "in_use",
    /// "pinned"}), "cache_hit_rate"}.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let runtime = Arc::clone(&self.inner);
        let h = py
            .detach(move || runtime.health())
            .map_err(|e| to_py(py, &e))?;
        let d = PyDict::new(py);
        d.set_item("badge", h.badge.as_str())?;
        d.set_item("health_score", h.health_score)?;
        d.set_item("rss_bytes", h.rss_bytes)?;
        d.set_item("cutline_bytes", h.cutline_bytes)?;
        let l = &h.ledger;
        let ledger = PyDict::new(py);
        ledger.set_item("cutline", l.cutline)?;
        ledger.set_item("min_margin", l.min_margin)?;
        ledger.set_item("margin", l.margin)?;
        let reserved = PyDict::new(py);
        for (kind, bytes) in l.reserved.iter() {
            reserved.set_item(kind.as_str(), bytes)?;
        }
        ledger.set_item("reserved", reserved)?;
        ledger.set_item("reserved_total", l.reserved_total())?;
        ledger.set_item("available", l.available())?;
        ledger.set_item("unaccounted", l.unaccounted)?;
        ledger.set_item("rss", l.rss)?;
        ledger.set_item("peak_reserved", l.peak_reserved)?;
        ledger.set_item("runs", l.runs)?;
        ledger.set_item("kv_cache_usage", l.kv_cache_usage())?;
        d.set_item("ledger", ledger)?;
        let models = PyList::empty(py);
        for m in &h.loaded_models {
            let e = PyDict::new(py);
            e.set_item("key", &m.key)?;
            e.set_item("bytes", m.bytes)?;
            e.set_item("in_use", m.in_use)?;
            e.set_item("pinned", m.pinned)?;
            models.append(e)?;
        }
        d.set_item("loaded_models", models)?;
        d.set_item("cache_hit_rate", h.cache_hit_rate)?;
        Ok(d)
    }

    /// Loads `model` into the cache now (or finds it there), so that the first run
    /// does not pay the load: {"hit" (was loaded already), "acquire_ms"}. Raises
    /// RefusedError when it does not fit under the cutline even with every idle
    /// model evicted.
    fn preload<'py>(&self, py: Python<'py>, model: PathBuf) -> PyResult<Bound<'py, PyDict>> {
        let runtime = Arc::clone(&self.inner);
        let p = on_thread(py, "preload", move || runtime.preload(&model))?
            .map_err(|e| to_py(py, &e))?;
        let d = PyDict::new(py);
        d.set_item("hit", p.hit)?;
        d.set_item("acquire_ms", p.acquire_ms)?;
        Ok(d)
    }

    /// Drops every idle model (not in use by a run) and every prefix-cache block,
    /// returns the memory to the system, and returns how many models went.
    fn evict(&self, py: Python<'_>) -> usize {
        let runtime = Arc::clone(&self.inner);
        py.detach(move || runtime.evict_idle())
    }

    /// The cutline in force, in bytes (lowered to the container's limit when lower).
    #[getter]
    fn cutline_bytes(&self) -> u64 {
        self.cutline_bytes
    }

    /// The replica id written in every record, or None.
    #[getter]
    fn replica_id(&self) -> Option<String> {
        self.inner.replica_id().map(str::to_owned)
    }

    /// The node id written in every record, or None.
    #[getter]
    fn node_id(&self) -> Option<String> {
        self.inner.node_id().map(str::to_owned)
    }

    fn __repr__(&self) -> String {
        format!(
            "Runtime(cutline_bytes={}, replica_id={:?}, node_id={:?})",
            self.cutline_bytes,
            self.inner.replica_id(),
            self.inner.node_id()
        )
    }
}
