//! [`Server`] and its builder.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use afo_runtime::Runtime;
use afo_runtime::quant::QuantScheme;

use crate::error::{Error, Result};
use crate::openai::ParseLimits;
use crate::state::{Config, ModelSpec, Shared};

/// Builds a [`Server`]. See each setter for its default.
#[derive(Debug)]
pub struct ServerBuilder {
    runtime: Arc<Runtime>,
    models: Vec<ModelSpec>,
    config: Config,
}

impl ServerBuilder {
    /// Serves the model at `path` (a GGUF file or a Hugging Face folder) as stored,
    /// under the id of its file name without extension.
    pub fn model(self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let id = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        self.model_as(id, path, None)
    }

    /// Serves the model at `path` under `id`, quantized to `scheme` while loading
    /// when one is given.
    pub fn model_as(
        mut self,
        id: impl Into<String>,
        path: impl Into<PathBuf>,
        scheme: Option<QuantScheme>,
    ) -> Self {
        self.models.push(ModelSpec {
            id: id.into(),
            path: path.into(),
            scheme,
        });
        self
    }

    /// Require `Authorization: Bearer <key>` on `/v1/*`. Default: no key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.config.api_key = Some(key.into());
        self
    }

    /// The largest request body, in bytes (413 above). Default 16 MiB.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.config.max_body_bytes = bytes;
        self
    }

    /// The largest decoded image, in bytes (400 above). Default 8 MiB.
    pub fn max_image_bytes(mut self, bytes: usize) -> Self {
        self.config.limits.max_image_bytes = bytes;
        self
    }

    /// The most requests one model holds, waiting and running (429 above).
    /// Default 64.
    pub fn max_queue(mut self, requests: usize) -> Self {
        self.config.max_queue = requests;
        self
    }

    /// The most requests one model decodes together. Default 8.
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.config.max_batch = requests;
        self
    }

    /// The longest a request may take from arrival to its last token; past it the
    /// run is cancelled (504, or an error event in a stream). Default 10 minutes.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// The longest a request waits in its model's queue before it starts. Past it
    /// the request is refused: 429 with `Retry-After` when it waited behind other
    /// requests, 503 with the ledger's numbers when memory under the cutline was what
    /// held it back. Default 30 s.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.config.queue_timeout = timeout;
        self
    }

    /// The most prompt tokens a model's worker runs between two decode steps of the
    /// requests already generating (and between two checks for cancellation and
    /// time limits). Default [`afo_runtime::engine::DEFAULT_PREFILL_CHUNK`].
    pub fn prefill_chunk(mut self, tokens: usize) -> Self {
        self.config.prefill_chunk = tokens;
        self
    }

    /// How long a client has to send a request's head (and, once it has, its body),
    /// counted from when the connection opens or its previous response ends: past it
    /// the connection is closed. Default 10 s.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.config.connections.header_timeout = timeout;
        self
    }

    /// How long a connection may stay open with no request in flight and nothing
    /// sent (a kept-alive or a silent connection); past it the server closes it.
    /// Default 5 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.connections.idle_timeout = timeout;
        self
    }

    /// The most connections held open at once (also kept below the process's
    /// open-file limit). At the cap a new connection takes the place of the longest
    /// idle one; when every connection has a request in flight, it is answered 503
    /// and closed. Default 512.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.config.connections.max_connections = connections;
        self
    }

    /// How long a shutdown waits for the requests in flight: past it they are
    /// cancelled (each still gets its SSOT record) and every connection is closed.
    /// Default 10 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.connections.shutdown_grace = grace;
        self
    }

    /// Serve `/metrics` without the API key (for a scraper) when one is set. By
    /// default, with a key, `/metrics`, `/api/runs` and the details of `/health` need
    /// it.
    pub fn public_metrics(mut self, public: bool) -> Self {
        self.config.public_metrics = public;
        self
    }

    /// How long a model's worker waits with no request before it lets go of the
    /// model (which stays loaded, idle, until a load or a run needs its bytes).
    /// Default 500 ms.
    pub fn worker_idle(mut self, idle: Duration) -> Self {
        self.config.worker_idle = idle;
        self
    }

    /// `max_tokens` of a chat request that gives none (cut to the context left).
    /// Default 256.
    pub fn default_max_tokens(mut self, tokens: usize) -> Self {
        self.config.default_max_tokens = tokens;
        self
    }

    /// How many recent runs `/api/runs` and the dashboard show. Default 50.
    pub fn recent_runs(mut self, runs: usize) -> Self {
        self.config.recent_runs = runs;
        self
    }

    /// How many health samples `/api/history` and the dashboard's charts keep (the
    /// oldest is dropped past it). Default 600: ten minutes at the default interval.
    pub fn history_samples(mut self, samples: usize) -> Self {
        self.config.history_samples = samples;
        self
    }

    /// How often a health sample is taken for `/api/history` (while serving, and on
    /// `/health` and `/api/history` calls, at most once per interval). Default 1 s;
    /// at least 1 ms.
    pub fn history_interval(mut self, interval: Duration) -> Self {
        self.config.history_interval = interval;
        self
    }

    /// Checks the settings and builds the server. Models load on their first request
    /// (or at [`Server::preload`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero limit or an empty API key,
    /// [`Error::DuplicateModel`] for two models under one id.
    pub fn build(self) -> Result<Server> {
        let c = &self.config;
        let zero = |name: &'static str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(Error::InvalidConfig {
                    name,
                    value: v.to_string(),
                    reason: "must be at least 1",
                });
            }
            Ok(())
        };
        zero("max_body_bytes", c.max_body_bytes)?;
        zero("max_image_bytes", c.limits.max_image_bytes)?;
        zero("max_queue", c.max_queue)?;
        zero("max_batch", c.max_batch)?;
        zero("default_max_tokens", c.default_max_tokens)?;
        zero("prefill_chunk", c.prefill_chunk)?;
        zero("max_connections", c.connections.max_connections)?;
        zero("history_samples", c.history_samples)?;
        if c.history_interval < Duration::from_millis(1) {
            return Err(Error::InvalidConfig {
                name: "history_interval",
                value: format!("{:?}", c.history_interval),
                reason: "must be at least 1 ms",
            });
        }
        if c.api_key.as_deref().is_some_and(str::is_empty) {
            return Err(Error::InvalidConfig {
                name: "api_key",
                value: String::new(),
                reason: "an empty key would let anyone in; give none or a real one",
            });
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.id == "auto" {
                return Err(Error::InvalidConfig {
                    name: "model id",
                    value: m.id.clone(),
                    reason: "`auto` is reserved for routing through the selector",
                });
            }
            if let Some(first) = self.models[..i].iter().find(|o| o.id == m.id) {
                return Err(Error::DuplicateModel {
                    id: m.id.clone(),
                    first: first.path.clone(),
                    second: m.path.clone(),
                });
            }
        }
        Ok(Server {
            shared: Arc::new(Shared::new(self.runtime, self.config, self.models)),
        })
    }
}

/// The OpenAI-compatible server over one [`Runtime`]. Cloning shares it.
///
/// [`Server::router`] is an [`axum::Router`] another program can mount or nest;
/// [`Server::serve`] runs it on a listener until a shutdown signal.
#[derive(Debug, Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A builder over `runtime`.
    pub fn builder(runtime: Arc<Runtime>) -> ServerBuilder {
        ServerBuilder {
            runtime,
            models: Vec::new(),
            config: Config {
                api_key: None,
                max_body_bytes: 16 << 20,
                limits: ParseLimits::default(),
                max_queue: 64,
                max_batch: 8,
                request_timeout: Duration::from_secs(600),
                queue_timeout: Duration::from_secs(30),
                worker_idle: Duration::from_millis(500),
                default_max_tokens: 256,
                recent_runs: 50,
                prefill_chunk: afo_runtime::engine::DEFAULT_PREFILL_CHUNK,
                connections: crate::conn::ConnLimits::default(),
                public_metrics: false,
                history_samples: crate::history::DEFAULT_SAMPLES,
                history_interval: crate::history::DEFAULT_INTERVAL,
            },
        }
    }

    /// The runtime the server runs on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.runtime
    }

    /// The ids of the models served (besides `auto`).
    pub fn model_ids(&self) -> Vec<String> {
        self.shared.models.iter().map(|m| m.id.clone()).collect()
    }

    /// The routes: `POST /v1/chat/completions`, `POST /v1/completions`,
    /// `GET /v1/models`, `GET /health`, `GET /metrics`, `GET /api/runs`,
    /// `GET /api/history` and the dashboard at `GET /`. Mounted without
    /// [`Server::serve`], the history is sampled only when `/health` or
    /// `/api/history` is called (the dashboard calls them every second).
    pub fn router(&self) -> axum::Router {
        crate::routes::router(Arc::clone(&self.shared))
    }

    /// Loads every model and starts its worker now rather than at its first
    /// request. Blocks while the models load.
    ///
    /// # Errors
    /// [`Error::Load`] naming the first model that fails to load.
    pub fn preload(&self) -> Result<()> {
        for m in &self.shared.models {
            self.shared.worker(m).map(drop).map_err(|e| Error::Load {
                model: m.id.clone(),
                path: m.path.clone(),
                reason: e.message,
            })?;
        }
        Ok(())
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down gracefully:
    /// stops accepting connections, closes idle ones, lets in-flight requests finish
    /// within the shutdown grace ([`ServerBuilder::shutdown_grace`]; past it they are
    /// cancelled), closes every connection, stops the model workers (every record is
    /// in the SSOT log by then). Connections are held to the limits of
    /// [`ServerBuilder::header_timeout`], [`ServerBuilder::idle_timeout`] and
    /// [`ServerBuilder::max_connections`].
    ///
    /// # Errors
    /// [`Error::Serve`] when the listener's address cannot be read.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let addr = listener.local_addr().map_err(|source| Error::Serve {
            addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        tracing::debug!(%addr, "serving");
        // One health sample per interval for `/api/history`, whether or not anybody
        // is looking.
        let sampled = Arc::clone(&self.shared);
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(sampled.history.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sampled.sample_history();
            }
        });
        let shared = Arc::clone(&self.shared);
        let aborting = Arc::clone(&self.shared);
        crate::conn::serve(
            listener,
            self.router(),
            shared.config.connections,
            async move {
                shutdown.await;
                // No new request is taken from here on.
                shared
                    .accepting
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            },
            move || aborting.abort(),
        )
        .await;
        sampler.abort();
        let shared = Arc::clone(&self.shared);
        // Joining the workers blocks: off the async threads.
        let _ = tokio::task::spawn_blocking(move || shared.stop_workers()).await;
        Ok(())
    }

    /// Stops the model workers after they finish the jobs they hold; new requests
    /// get 503. [`Server::serve`] calls it after its shutdown signal.
    pub fn shutdown(&self) {
        self.shared.stop_workers();
    }
}
