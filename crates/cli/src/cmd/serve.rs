//! `afo serve`: the OpenAI-compatible server with `/health`, `/metrics` and the
//! dashboard, until Ctrl-C or SIGTERM (then a graceful shutdown).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use afo_runtime::Runtime;
use afo_runtime::guard::ByteSize;
use afo_server::Server;

/// Arguments of `afo serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A model to serve (a GGUF file, a Hugging Face folder, or `ORG/NAME` in the
    /// Hugging Face cache); repeat for several. Its id is the file name without
    /// extension; `auto` routes through the selector. A Qwen3-VL folder is served as
    /// a vision-language model that takes `image_url` parts. Default: every model
    /// found in `$AFO_MODEL_DIR` (default `models`) and the Hugging Face cache.
    #[arg(long = "model")]
    models: Vec<PathBuf>,
    /// The address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// The port (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer TOKEN` on `/v1/*` (also read from
    /// `AFO_API_KEY`).
    #[arg(long)]
    api_key: Option<String>,
    /// How the KV cache holds keys and values: f32, f16, bf16 or q8_0 (8.5 bits per
    /// element, 26.6% of f32; memory estimates count the format's bytes).
    #[arg(long, default_value_t = afo_runtime::kvcache::KvFormat::default())]
    kv_cache: afo_runtime::kvcache::KvFormat,
    /// The memory cutline, e.g. 8GiB.
    #[arg(long, default_value = "20GiB")]
    cutline: ByteSize,
    /// The warn fraction of the cutline.
    #[arg(long)]
    warn_fraction: Option<f64>,
    /// Append one SSOT record per request to this JSONL log.
    #[arg(long)]
    log: Option<PathBuf>,
    /// A model catalog (TOML or JSON) for model `auto`.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Quantize the served models' weights to this scheme while loading.
    #[arg(long)]
    quantize: Option<afo_runtime::quant::QuantScheme>,
    /// The most requests one model decodes together.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// The most requests one model holds, waiting and running (429 above).
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// The longest one request may take, in seconds (checked between prefill chunks
    /// and decode steps).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The longest a request waits in its model's queue before it starts, in
    /// seconds: past it, 429 with Retry-After when it waited behind other requests,
    /// 503 with the ledger's numbers when memory was what held it back.
    #[arg(long, default_value_t = 30)]
    queue_timeout: u64,
    /// Seconds a client has to send a request's head (and again its body), counted
    /// from when the connection opens or its last response ends.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a connection may stay open with no request in flight and nothing
    /// sent before the server closes it.
    #[arg(long, default_value_t = 5)]
    idle_timeout: u64,
    /// The most connections held at once (also kept below the open-file limit). At
    /// the cap a new connection replaces the longest idle one, or gets 503.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a shutdown waits for requests in flight before cancelling them.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// The most prompt tokens a worker runs between two decode steps of the requests
    /// already generating (and between two checks for cancellation).
    #[arg(long, default_value_t = afo_runtime::engine::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Serve /metrics without the API key (for a scraper). With --api-key, /metrics,
    /// /api/runs and the details of /health need the key by default.
    #[arg(long)]
    public_metrics: bool,
    /// `max_tokens` of a request that gives none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Load models on their first request instead of at start.
    #[arg(long)]
    lazy: bool,
    /// Keep this model loaded once it is (by id, or `all`): never evicted to make
    /// room for another; repeat for several. Other models stay loaded while idle and
    /// are evicted, least recently used first, only when a load or a run needs their
    /// bytes.
    #[arg(long = "pin")]
    pins: Vec<String>,
    /// The most bytes each model's prefix cache may hold (its blocks are reserved in
    /// the memory ledger and dropped when a run or a load needs the room). Default:
    /// an eighth of the cutline, at most 256 MiB; 0 turns prefix reuse off.
    #[arg(long)]
    prefix_cache: Option<ByteSize>,
    /// The replica of a deployment this server is (a Ray Serve replica, a pod),
    /// written as `replica_id` in every SSOT record. Default: `AFO_REPLICA_ID`, else none.
    #[arg(long)]
    replica_id: Option<String>,
    /// The node this server runs on, written as `node_id` in every SSOT record.
    /// Default: `AFO_NODE_ID`, else none.
    #[arg(long)]
    node_id: Option<String>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let mut builder = Runtime::builder()
        .cutline(args.cutline)
        .kv_format(args.kv_cache);
    if let Some(w) = args.warn_fraction {
        builder = builder.warn_fraction(w);
    }
    if let Some(log) = &args.log {
        builder = builder.ssot_log(log);
    }
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(id) = args
        .replica_id
        .clone()
        .or_else(|| from_env("AFO_REPLICA_ID"))
    {
        builder = builder.replica_id(id);
    }
    if let Some(id) = args.node_id.clone().or_else(|| from_env("AFO_NODE_ID")) {
        builder = builder.node_id(id);
    }
    if let Some(catalog) = &args.catalog {
        builder = builder.catalog(afo_runtime::select::Catalog::from_path(catalog)?);
    }
    if let Some(bytes) = args.prefix_cache {
        builder = builder.prefix_cache(afo_runtime::kvcache::PrefixCacheConfig {
            budget_bytes: bytes.bytes(),
            ..afo_runtime::kvcache::PrefixCacheConfig::default()
        });
    }
    let runtime = Arc::new(builder.build()?);
    let mut server = Server::builder(Arc::clone(&runtime))
        .max_batch(args.max_batch)
        .max_queue(args.max_queue)
        .request_timeout(Duration::from_secs(args.timeout))
        .queue_timeout(Duration::from_secs(args.queue_timeout))
        .header_timeout(Duration::from_secs(args.header_timeout))
        .idle_timeout(Duration::from_secs(args.idle_timeout))
        .max_connections(args.max_connections)
        .shutdown_grace(Duration::from_secs(args.shutdown_grace))
        .prefill_chunk(args.prefill_chunk)
        .public_metrics(args.public_metrics)
        .default_max_tokens(args.default_max_tokens);
    let served: Vec<(String, PathBuf)> = if args.models.is_empty() {
        let (found, places) = super::found_models()?;
        let ids: Vec<&str> = found.iter().map(|m| m.id.as_str()).collect();
        eprintln!(
            "no --model: serving the {} models found in {places}: {}",
            found.len(),
            ids.join(", ")
        );
        found.into_iter().map(|m| (m.id, m.path)).collect()
    } else {
        args.models
            .iter()
            .map(|spec| {
                let id = spec.file_stem().map_or_else(
                    || spec.display().to_string(),
                    |s| s.to_string_lossy().into_owned(),
                );
                Ok((id, super::resolve_model(spec)?))
            })
            .collect::<anyhow::Result<_>>()?
    };
    for (id, path) in &served {
        if args.pins.iter().any(|p| p == id || p == "all") {
            runtime.pin(path, args.quantize);
        }
        server = server.model_as(id.clone(), path.clone(), args.quantize);
    }
    for pin in &args.pins {
        let known = pin == "all" || served.iter().any(|(id, _)| id == pin);
        anyhow::ensure!(known, "--pin {pin}: no model with that id is served");
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("AFO_API_KEY").ok().filter(|k| !k.is_empty()));
    if let Some(key) = api_key {
        server = server.api_key(key);
    } else if !args.host.is_loopback() {
        eprintln!(
            "warning: serving on {} without --api-key: anyone who reaches it can use it",
            args.host
        );
    }
    let server = server.build()?;
    if !args.lazy {
        let spinner = super::spinner(format!("loading {}", server.model_ids().join(", ")));
        let loaded = server.preload();
        spinner.finish_and_clear();
        loaded?;
    }
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    tokio.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host, args.port)).await?;
        let addr = listener.local_addr()?;
        eprintln!(
            "afo serve: listening on http://{addr} (models: {}, auto; cutline {}; dashboard at /)",
            server.model_ids().join(", "),
            ByteSize(runtime.budget().cutline()),
        );
        server.serve(listener, shutdown_signal()).await?;
        eprintln!("afo serve: stopped");
        anyhow::Ok(())
    })
}

/// Completes at Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("afo serve: shutting down (finishing requests in flight)");
}
