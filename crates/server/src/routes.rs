//! The HTTP routes: the OpenAI endpoints, `/health`, `/metrics`, the dashboard.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use afo_runtime::engine::{GenerateOptions, LoadedModel, SamplingParams};
use afo_runtime::guard::{MemoryKind, Reservation, StatusBadge, badge};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::error::ApiError;
use crate::logprobs::TokenLogprob;
use crate::metrics::Gauges;
use crate::openai::{Endpoint, ParsedRequest, PromptInput, Usage, parse_chat, parse_completion};
use crate::state::Shared;
use crate::vision::{self, Planned};
use crate::worker::{Event, Job, Served};

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The router over `shared`.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(crate::embeddings::embeddings))
        .route("/v1/responses", post(crate::responses::responses))
        .route("/v1/models", get(models))
        .route("/api/runs", get(runs))
        .route("/api/history", get(history))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&shared), auth));
    let anthropic = Router::new()
        .route("/v1/messages", post(crate::anthropic::messages))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            crate::anthropic::auth,
        ));
    let metrics_route = Router::new().route("/metrics", get(metrics));
    let metrics_route = if shared.config.public_metrics {
        metrics_route
    } else {
        metrics_route.route_layer(middleware::from_fn_with_state(Arc::clone(&shared), auth))
    };
    Router::new()
        .merge(api)
        .merge(anthropic)
        .merge(metrics_route)
        .route("/", get(dashboard))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), count))
        .with_state(shared)
}

/// Counts every response by route and status.
async fn count(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    s.metrics.http(&route, response.status().as_u16());
    response
}

/// Checks the bearer token of `/v1/*`, `/api/runs`, `/api/history` and `/metrics`
/// when the server has one.
async fn auth(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if !authorized(&s, request.headers()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

/// Whether `headers` carry the server's key (always, when it has none), as
/// `Authorization: Bearer <key>` or `x-api-key: <key>`. The scheme name `Bearer` is
/// matched without regard to case (RFC 7235).
pub(crate) fn authorized(s: &Shared, headers: &axum::http::HeaderMap) -> bool {
    let Some(key) = &s.config.api_key else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        });
    // Anthropic's clients send the key as `x-api-key`.
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    [bearer, x_api_key]
        .into_iter()
        .flatten()
        .any(|g| constant_time_eq(g.as_bytes(), key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {} {}", request.method(), request.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
        retry_after_s: None,
    }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
        retry_after_s: None,
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    let created = unix_now();
    let mut data: Vec<Value> = s
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": created, "owned_by": "afo"}))
        .collect();
    data.push(json!({"id": "auto", "object": "model", "created": created, "owned_by": "afo"}));
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The badge's level, for the metrics gauge.
fn badge_level(b: StatusBadge) -> u8 {
    match b {
        StatusBadge::Safe => 0,
        StatusBadge::Warn => 1,
        _ => 2,
    }
}

/// The `/health` body.
fn health_value(s: &Shared) -> Result<Value, ApiError> {
    let h = s
        .runtime
        .health()
        .map_err(|e| ApiError::internal(format!("reading the memory probe: {e}")))?;
    let budget = s.runtime.budget();
    let workers = s.workers();
    let models: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            let w = workers.iter().find(|w| w.id == m.id);
            let queued = w.map_or(0, |w| w.queued.load(Ordering::SeqCst));
            let running = w.map_or(0, |w| w.running.load(Ordering::SeqCst));
            json!({
                "id": m.id,
                "path": m.path.display().to_string(),
                "scheme": m.scheme.map(|s| s.to_string()),
                "loaded": w.is_some(),
                "running": running,
                "waiting": queued.saturating_sub(running),
            })
        })
        .collect();
    let loaded: Vec<Value> = h
        .loaded_models
        .iter()
        .map(|m| json!({"key": m.key, "bytes": m.bytes, "in_use": m.in_use, "pinned": m.pinned}))
        .collect();
    let ledger = &h.ledger;
    let by_kind: serde_json::Map<String, Value> = ledger
        .reserved
        .iter()
        .map(|(k, b)| (k.to_string(), json!(b)))
        .collect();
    let status = if !s.accepting.load(Ordering::SeqCst) {
        "shutting_down"
    } else if h.badge == StatusBadge::OverCutline {
        "over_cutline"
    } else {
        "ok"
    };
    Ok(json!({
        "status": status,
        "badge": h.badge,
        "health_score": h.health_score,
        "memory": {
            "resident_bytes": h.rss_bytes,
            "cutline_bytes": h.cutline_bytes,
            "warn_bytes": budget.warn_bytes(),
            "reserved_bytes": ledger.reserved_total(),
            "reserved_by_kind": by_kind,
            "unaccounted_bytes": ledger.unaccounted,
            "margin_bytes": ledger.margin,
            "available_bytes": ledger.available(),
            "runs_in_flight": ledger.runs,
        },
        "models": models,
        "loaded_models": loaded,
        "model_cache_hit_rate": h.cache_hit_rate,
        "uptime_s": s.started.elapsed().as_secs_f64(),
        "ssot_log": s.runtime.ssot_log_path().map(|p| p.display().to_string()),
    }))
}

/// `/health`: everything with the key (or on a server without one); without it,
/// only the status, the badge and the memory figures (no paths, no models).
async fn health(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    s.sample_history();
    let full = authorized(&s, &headers);
    match health_value(&s).map(|v| if full { v } else { public_health(v) }) {
        Ok(v) => (
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            axum::Json(v),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// The part of `/health` anyone may see.
fn public_health(mut full: Value) -> Value {
    let mut public = serde_json::Map::new();
    for key in ["status", "badge", "health_score", "memory", "uptime_s"] {
        if let Some(v) = full.get_mut(key) {
            public.insert(key.to_owned(), v.take());
        }
    }
    Value::Object(public)
}

async fn runs(State(s): State<Arc<Shared>>) -> Response {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(json!({"runs": s.recent()})),
    )
        .into_response()
}

/// `/api/history`: the health samples kept, oldest first (only those taken after
/// `?since=MS`, milliseconds since the Unix epoch, when given).
async fn history(State(s): State<Arc<Shared>>, request: Request) -> Response {
    let since = match since_param(request.uri().query()) {
        Ok(since) => since,
        Err(e) => return e.into_response(),
    };
    s.sample_history();
    let models: Vec<&str> = s.models.iter().map(|m| m.id.as_str()).collect();
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(json!({
            "interval_ms": u64::try_from(s.history.interval().as_millis()).unwrap_or(u64::MAX),
            "capacity": s.history.capacity(),
            "models": models,
            "samples": s.history.since(since),
        })),
    )
        .into_response()
}

/// The `since` parameter of a query string, if any.
fn since_param(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("since="))
    else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|_| {
        ApiError::invalid(format!(
            "`since` must be milliseconds since the Unix epoch, not `{value}`"
        ))
        .param("since")
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let budget = s.runtime.budget();
    let h = s.runtime.health().ok();
    let rss = h.as_ref().map_or(0, |h| h.rss_bytes);
    let g = Gauges {
        resident_bytes: rss,
        cutline_bytes: budget.cutline(),
        warn_bytes: budget.warn_bytes(),
        reserved_bytes: h.as_ref().map_or(0, |h| h.ledger.reserved_total()),
        unaccounted_bytes: h.as_ref().map_or(0, |h| h.ledger.unaccounted),
        health_score: h.as_ref().map_or(0.0, |h| h.health_score),
        badge_level: badge_level(badge(rss, budget)),
        kv_cache_usage: h.as_ref().map_or(0.0, |h| h.ledger.kv_cache_usage()),
        model_cache_hit_rate: h.and_then(|h| h.cache_hit_rate),
        models: s
            .workers()
            .iter()
            .map(|w| {
                let running = w.running.load(Ordering::SeqCst);
                (
                    w.id.clone(),
                    running,
                    w.queued.load(Ordering::SeqCst).saturating_sub(running),
                )
            })
            .collect(),
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics.render(&g),
    )
        .into_response()
}

/// Reads a request's body: at most `max_body_bytes` (413 past it), within the
/// header timeout (408 past it: a client trickling its body does not hold a
/// connection).
pub(crate) async fn read_body(s: &Shared, request: Request) -> Result<Bytes, ApiError> {
    let limit = s.config.max_body_bytes;
    let timeout = s.config.connections.header_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(request.into_body(), limit)).await {
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after_s: None,
        }),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::invalid(format!(
                    "the request body could not be read: {e}"
                )))
            }
        }
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// A run a worker has started, handed to the wire format that answers it.
#[derive(Debug)]
pub(crate) struct Started {
    meta: Meta,
    /// The run's events, after [`Event::Started`]; dropping it cancels the run.
    pub rx: UnboundedReceiver<Event>,
    /// With `n` > 1: the events of choices 1 to n - 1 (each a run of its own).
    pub more: Vec<UnboundedReceiver<Event>>,
    /// The request asked for a stream.
    pub stream: bool,
    /// The run's id (in its SSOT record).
    pub run_id: String,
    /// The model's id, as the API names it.
    pub model: String,
    /// Seconds since the Unix epoch when the run started.
    pub created: u64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The stop strings, which [`FinishReason::Stop`](afo_runtime::engine::FinishReason::Stop) indexes.
    pub stop: Vec<String>,
}

impl Started {
    /// The reader of the run's output (reasoning, content, tool calls), once; a
    /// plain-text reader when the run is not a chat.
    pub(crate) fn take_output(&mut self) -> afo_runtime::engine::ChatOutputParser {
        self.meta
            .output
            .take()
            .unwrap_or_else(|| afo_runtime::engine::ChatOutputParser::new(false, None))
    }
}

/// The future of an answer to a started run.
pub(crate) type Answer =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, ApiError>> + Send>>;

/// The wire format a route speaks: how it answers a started run, and how it writes
/// an error (the request's checks, admission and the run all share one path).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialect {
    pub answer: fn(Started) -> Answer,
    pub error: fn(ApiError) -> Response,
}

/// OpenAI's chat and completion objects and chunks, and its error bodies.
const OPENAI: Dialect = Dialect {
    answer: openai_answer,
    error: IntoResponse::into_response,
};

fn openai_answer(run: Started) -> Answer {
    Box::pin(async move {
        let mut choices = vec![(run.meta.clone(), run.rx)];
        for (i, rx) in run.more.into_iter().enumerate() {
            let mut meta = run.meta.clone();
            meta.index = i + 1;
            choices.push((meta, rx));
        }
        if run.stream {
            Ok(stream_choices(choices))
        } else {
            collect_response(choices).await
        }
    })
}

/// Reads and parses a request (off the async threads: a body of megabytes takes a
/// while to parse), then runs it and answers in `dialect`; a request refused before
/// a worker took it leaves its record here.
pub(crate) async fn handle(
    s: Arc<Shared>,
    request: Request,
    parse: fn(&[u8], &crate::openai::ParseLimits) -> Result<ParsedRequest, ApiError>,
    dialect: Dialect,
) -> Response {
    let received = Instant::now();
    // Until a worker takes the request or an answer is ready, a client that goes away
    // (the connection closes and this future is dropped) still leaves a record.
    let mut pending = Unanswered {
        s: Arc::clone(&s),
        model: None,
        received,
        settled: false,
        held: None,
    };
    let parsed = match read_body(&s, request).await {
        Ok(body) => {
            // The body and what is parsed from it are in the ledger until the request
            // is planned (then its own reservation counts what it keeps).
            let len = body.len() as u64;
            pending.held = Some(s.runtime.hold(MemoryKind::Workspace, 2 * len));
            let limits = s.config.limits;
            let parsed = tokio::task::spawn_blocking(move || parse(&body, &limits))
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(format!("parsing failed: {e}"))));
            if let Some(held) = &mut pending.held {
                held.shrink_to(MemoryKind::Workspace, len);
            }
            parsed
        }
        Err(e) => Err(e),
    };
    let result = match parsed {
        Ok(req) => {
            pending.model = Some(req.model.clone());
            generate(s, req, received, &mut pending, dialect).await
        }
        Err(e) => {
            pending.settled = true;
            s.record_rejection(None, &e, received);
            Err(e)
        }
    };
    result.unwrap_or_else(dialect.error)
}

/// A request no worker has taken and no answer has settled: dropped so (the client
/// went away while it was read, parsed or planned), it writes the request's record.
struct Unanswered {
    s: Arc<Shared>,
    model: Option<String>,
    received: Instant,
    /// Set once the request's record is somebody else's to write (a worker took
    /// it) or has been written.
    settled: bool,
    /// The ledger's hold on the request's body and parsed text, until it is planned.
    held: Option<Reservation>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.settled {
            let e = ApiError {
                status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                message: "cancelled: the client went away before the request started".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("client_closed"),
                retry_after_s: None,
            };
            self.s
                .record_rejection(self.model.as_deref(), &e, self.received);
        }
    }
}

async fn chat(State(s): State<Arc<Shared>>, request: Request) -> Response {
    handle(s, request, parse_chat, OPENAI).await
}

async fn completions(State(s): State<Arc<Shared>>, request: Request) -> Response {
    handle(s, request, |body, _| parse_completion(body), OPENAI).await
}

/// The sampling parameters of choice `choice` (its seed is the request's plus
/// `choice`, so that choices differ and a repeat returns the same ones).
fn sampling(req: &ParsedRequest, choice: usize) -> Result<SamplingParams, ApiError> {
    let p = &req.sampling;
    // OpenAI's defaults: temperature 1, top_p 1, no penalties.
    let mut b = SamplingParams::builder()
        .temperature(p.temperature.unwrap_or(1.0))
        .top_p(p.top_p.unwrap_or(1.0))
        .presence_penalty(p.presence_penalty.unwrap_or(0.0))
        .frequency_penalty(p.frequency_penalty.unwrap_or(0.0));
    if let Some(seed) = p.seed {
        b = b.seed(seed.wrapping_add(choice as u64));
    }
    for &(id, bias) in &p.logit_bias {
        b = b.logit_bias(id, bias);
    }
    if let Some(k) = p.top_k {
        b = b.top_k(k);
    }
    b.build()
        .map_err(|e| ApiError::invalid(format!("sampling parameters: {e}")))
}

/// Encodes a text model's prompt, checks it against the context and predicts its
/// bytes.
fn plan_text(
    loaded: &LoadedModel,
    model_id: &str,
    prompt: &PromptInput,
    chat: &crate::tools::ChatControls,
    max_tokens: Option<usize>,
    s: &Shared,
) -> Result<(Planned, crate::tools::Reading), ApiError> {
    let mut reading = crate::tools::Reading::plain(chat.format.clone());
    let context = loaded.model().config().max_position;
    // Before any token is made: a text longer than the context could hold even at the
    // longest token's length is refused on its bytes.
    let bytes = match prompt {
        PromptInput::Chat(messages) => messages.iter().map(|m| m.text.len()).sum(),
        PromptInput::Text(t) => t.len(),
    };
    let most = context.saturating_mul(loaded.tokenizer().max_token_bytes());
    if bytes > most {
        let param = match prompt {
            PromptInput::Chat(_) => "messages",
            PromptInput::Text(_) => "prompt",
        };
        return Err(ApiError::invalid(format!(
            "the prompt has {bytes} bytes; model `{model_id}` takes at most {context} tokens of at most {} bytes each ({most} bytes)",
            loaded.tokenizer().max_token_bytes()
        ))
        .param(param)
        .code("context_length_exceeded"));
    }
    let prompt = match prompt {
        PromptInput::Chat(messages) => {
            let (encoded, r) = crate::tools::encode_chat(loaded, messages, chat)?;
            reading = r;
            Ok(encoded)
        }
        PromptInput::Text(t) => loaded.encode_text(t),
    }
    .map_err(|e| ApiError::invalid(format!("the prompt could not be encoded: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt encodes to no tokens"));
    }
    if prompt.len() >= context {
        return Err(ApiError::invalid(format!(
            "the prompt has {} tokens; model `{model_id}` takes at most {context} in all",
            prompt.len(),
        ))
        .code("context_length_exceeded"));
    }
    let max_tokens = max_tokens
        .unwrap_or(s.config.default_max_tokens)
        .min(context - prompt.len());
    let estimate = s
        .runtime
        .estimate_text(loaded.model(), prompt.len(), max_tokens, None);
    let planned = Planned {
        prompt_tokens: prompt.len(),
        parts: estimate.parts,
        held: None,
        prompt,
        max_tokens,
        vision: None,
        image_pixels: 0,
        original_pixels: 0,
    };
    Ok((planned, reading))
}

/// Runs a checked request (see [`generate_inner`]); a request that ends before a
/// worker took it (refused, invalid for the model) leaves its SSOT record here, one
/// that a worker took leaves it there.
async fn generate(
    s: Arc<Shared>,
    req: ParsedRequest,
    received: Instant,
    pending: &mut Unanswered,
    dialect: Dialect,
) -> Result<Response, ApiError> {
    let model = req.model.clone();
    let held = pending.held.take();
    let result = generate_inner(
        Arc::clone(&s),
        req,
        received,
        &mut pending.settled,
        held,
        dialect,
    )
    .await;
    if let Err(e) = &result
        && !pending.settled
    {
        s.record_rejection(Some(&model), e, received);
    }
    pending.settled = true;
    result
}

/// Picks the model, checks that the request could fit under the cutline, queues it
/// on the model's worker (whose admission reserves its bytes in the runtime's
/// ledger), and answers with a completion object or an SSE stream.
async fn generate_inner(
    s: Arc<Shared>,
    mut req: ParsedRequest,
    received: Instant,
    submitted: &mut bool,
    held: Option<Reservation>,
    dialect: Dialect,
) -> Result<Response, ApiError> {
    if !s.accepting.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable(
            "the server is shutting down",
            "shutting_down",
            5,
        ));
    }
    let images = req.prompt.images().count();
    let text = req.prompt.routing_text().to_owned();
    let s2 = Arc::clone(&s);
    let model = req.model.clone();
    let (target, (worker, served)) = tokio::task::spawn_blocking(move || {
        let target = s2.resolve(&model, &text, images)?;
        let worker = s2.worker(&target.spec)?;
        Ok::<_, ApiError>((target, worker))
    })
    .await
    .map_err(|e| ApiError::internal(format!("model task failed: {e}")))??;
    if images > 0 && !worker.accepts_images() {
        return Err(ApiError::invalid(format!(
            "model `{}` does not accept images; send text only, or ask for a vision-language model",
            worker.id
        ))
        .param("messages")
        .code("model_not_vision"));
    }
    let n = req.sampling.n.max(1);
    if worker.accepts_images() && (n > 1 || req.sampling.logprobs.is_some()) {
        let param = if n > 1 { "n" } else { "logprobs" };
        return Err(ApiError::invalid(format!(
            "model `{}` is a vision-language model; `{param}` is served for text models only",
            worker.id
        ))
        .param(param));
    }
    if let Some(&(id, _)) = req.sampling.logit_bias.last() {
        let vocab = match &served {
            Served::Text(loaded) => loaded.model().config().vocab_size,
            Served::Vision { model, .. } => model.tokenizer().vocab_size(),
        };
        if id as usize >= vocab {
            return Err(ApiError::invalid(format!(
                "`logit_bias` names token {id}; model `{}` has {vocab} tokens",
                worker.id
            ))
            .param("logit_bias"));
        }
    }
    // Admission, first the queue limit (before the prompt is even encoded, so that
    // refusals stay cheap under load). Each of `n` choices is a job of its own.
    if worker.queued.load(Ordering::SeqCst) + n > s.config.max_queue {
        s.metrics.rejected("queue_full");
        return Err(ApiError::busy(
            format!(
                "model `{}` has {} requests queued (the limit); retry shortly",
                worker.id, s.config.max_queue
            ),
            "queue_full",
            1,
        ));
    }
    let first_sampling = sampling(&req, 0)?;
    let (planned, mut reading) = match &served {
        Served::Text(loaded) => {
            // Templating and tokenizing off the async threads.
            let (s2, loaded, id) = (Arc::clone(&s), Arc::clone(loaded), worker.id.clone());
            let prompt = std::mem::replace(&mut req.prompt, PromptInput::Text(String::new()));
            let max_tokens = req.sampling.max_tokens;
            let chat = req.chat.clone();
            tokio::task::spawn_blocking(move || {
                plan_text(&loaded, &id, &prompt, &chat, max_tokens, &s2)
            })
            .await
            .map_err(|e| ApiError::internal(format!("prompt task failed: {e}")))??
        }
        Served::Vision { model, pre } => {
            let (s2, model, pre, id) = (
                Arc::clone(&s),
                Arc::clone(model),
                Arc::clone(pre),
                worker.id.clone(),
            );
            let prompt = std::mem::replace(&mut req.prompt, PromptInput::Text(String::new()));
            let max_tokens = req.sampling.max_tokens;
            if !req.chat.tools.is_empty() {
                return Err(ApiError::invalid(format!(
                    "model `{id}` is a vision-language model; tools are offered to text models only"
                ))
                .param("tools"));
            }
            if req.chat.format.is_some() {
                return Err(ApiError::invalid(format!(
                    "model `{id}` is a vision-language model; `response_format` is enforced for text models only"
                ))
                .param("response_format"));
            }
            let planned = tokio::task::spawn_blocking(move || {
                vision::plan(
                    &s2.runtime,
                    &model,
                    &pre,
                    &id,
                    &prompt,
                    max_tokens,
                    &s2.config,
                )
            })
            .await
            .map_err(|e| ApiError::internal(format!("image task failed: {e}")))??;
            (planned, crate::tools::Reading::plain(None))
        }
    };
    // The model is not held while the request waits: a retired worker's model can go.
    drop(served);
    // Planned: the request's text is tokens now, counted by its own estimate.
    drop(held);
    let options = GenerateOptions {
        constraint: reading.constraint.take(),
        reasoning_budget: reading.budget,
        max_tokens: planned.max_tokens,
        stop: req.sampling.stop.clone(),
        sampling: first_sampling,
        ignore_eos: false,
        logprobs: req.sampling.logprobs,
    };
    // Then memory, before anything is queued: a request that could never fit (even
    // with every idle model evicted and the runs in flight ended) is refused now;
    // one that fits later waits in the queue for the worker's admission.
    if let Err(refusal) =
        s.runtime
            .check_admissible(&target.spec.path, target.spec.scheme, planned.parts.total())
    {
        s.metrics.rejected("memory");
        return Err(ApiError::unavailable(
            format!("the request cannot fit under the cutline: {refusal}"),
            "memory_unavailable",
            10,
        ));
    }
    let prompt_tokens = planned.prompt_tokens;
    let vision_worker = worker.accepts_images();
    let (mut held, mut vision_job) = (planned.held, planned.vision);
    let mut worker = worker;
    // Each choice is a job of its own: admitted on the ledger by the worker like any
    // request, with its own SSOT record.
    let mut runs = Vec::with_capacity(n);
    for choice in 0..n {
        let run_id = s.next_run_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut options = options.clone();
        if choice > 0 {
            options.sampling = sampling(&req, choice)?;
        }
        let mut job = Job {
            run_id: run_id.clone(),
            endpoint: req.endpoint,
            prompt: planned.prompt.clone(),
            options,
            events: tx,
            received,
            deadline: received + s.config.request_timeout,
            admit_by: received + s.config.queue_timeout,
            parts: planned.parts,
            held: held.take(),
            selection: target.selection.clone(),
            vision: vision_job.take(),
            image_pixels: vision_worker.then_some(planned.image_pixels),
            original_pixels: vision_worker.then_some(planned.original_pixels),
        };
        loop {
            match worker.submit(job) {
                Ok(()) => break,
                Err(back) => {
                    // The worker retired (idle) or the server is stopping: a new worker
                    // takes it, or the request is refused.
                    job = *back;
                    let (s2, spec) = (Arc::clone(&s), target.spec.clone());
                    worker = tokio::task::spawn_blocking(move || s2.worker(&spec))
                        .await
                        .map_err(|e| ApiError::internal(format!("model task failed: {e}")))??
                        .0;
                }
            }
        }
        *submitted = true;
        runs.push((run_id, rx));
    }
    // The first event decides the status: an error before the first token is still
    // an HTTP error, not a broken stream.
    for (_, rx) in &mut runs {
        match rx.recv().await {
            Some(Event::Started) => {}
            Some(Event::Failed(e)) => return Err(e),
            Some(other) => {
                return Err(ApiError::internal(format!(
                    "the worker sent {other:?} before starting"
                )));
            }
            None => return Err(ApiError::internal("the worker went away")),
        }
    }
    let mut runs = runs.into_iter();
    let Some((run_id, rx)) = runs.next() else {
        return Err(ApiError::internal("no choice ran"));
    };
    let more: Vec<UnboundedReceiver<Event>> = runs.map(|(_, rx)| rx).collect();
    let meta = Meta {
        id: match req.endpoint {
            Endpoint::Chat => format!("chatcmpl-{run_id}"),
            Endpoint::Completion => format!("cmpl-{run_id}"),
        },
        created: unix_now(),
        model: worker.id.clone(),
        endpoint: req.endpoint,
        include_usage: req.include_usage,
        prompt_tokens,
        output: (req.endpoint == Endpoint::Chat).then_some(reading.parser),
        calls: 0,
        index: 0,
        logprobs: req.sampling.logprobs.map(|_| Vec::new()),
        text_offset: 0,
        tally: None,
    };
    let run = Started {
        stream: req.stream,
        run_id,
        model: meta.model.clone(),
        created: meta.created,
        prompt_tokens,
        stop: req.sampling.stop.clone(),
        meta,
        rx,
        more,
    };
    (dialect.answer)(run).await
}

/// What every response object of one request repeats.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
    prompt_tokens: usize,
    /// Reads a chat's output into reasoning, content and tool calls.
    output: Option<afo_runtime::engine::ChatOutputParser>,
    /// Tool calls streamed so far.
    calls: usize,
    /// The choice's index (`n` > 1).
    index: usize,
    /// With `logprobs`: the tokens' log-probabilities not yet sent.
    logprobs: Option<Vec<TokenLogprob>>,
    /// The characters of the choice's text sent so far (completions' `text_offset`).
    text_offset: usize,
    /// With `n` > 1 in a stream: where the choice adds its completion tokens (the
    /// usage chunk and `[DONE]` come after every choice has ended).
    tally: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// The answer of every choice: the choices run side by side in the worker, so
/// reading them one after another waits only for the slowest.
async fn collect_response(
    choices: Vec<(Meta, UnboundedReceiver<Event>)>,
) -> Result<Response, ApiError> {
    let Some(meta) = choices.first().map(|c| c.0.clone()) else {
        return Err(ApiError::internal("no choice ran"));
    };
    let mut out = Vec::with_capacity(choices.len());
    let mut completion_tokens = 0u64;
    for (meta, rx) in choices {
        let (choice, tokens) = collect_choice(meta, rx).await?;
        out.push(choice);
        completion_tokens += tokens;
    }
    let usage = Usage::new(meta.prompt_tokens as u64, completion_tokens);
    let object = match meta.endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completion => "text_completion",
    };
    let body = json!({
        "id": meta.id, "object": object, "created": meta.created,
        "model": meta.model, "system_fingerprint": null,
        "choices": out, "usage": usage,
    });
    Ok(axum::Json(body).into_response())
}

/// One choice's object and its completion tokens.
async fn collect_choice(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
) -> Result<(Value, u64), ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Logprob(lp)) => logprobs.push(lp),
            Some(Event::Started) => {}
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the worker went away")),
            Some(Event::Done(d)) => {
                let finish = d.finish.as_openai();
                let lp = match (&meta.logprobs, meta.endpoint) {
                    (None, _) => Value::Null,
                    (Some(_), Endpoint::Chat) => crate::logprobs::chat(&logprobs),
                    (Some(_), Endpoint::Completion) => crate::logprobs::completion(&logprobs, 0),
                };
                let choice = match meta.endpoint {
                    Endpoint::Chat => {
                        let (message, finish) = match meta.output.clone() {
                            Some(parser) => crate::tools::message(parser, &text, finish),
                            None => (json!({"role": "assistant", "content": text}), finish),
                        };
                        json!({"index": meta.index, "message": message,
                               "logprobs": lp, "finish_reason": finish})
                    }
                    Endpoint::Completion => json!({"index": meta.index, "text": text,
                                                   "logprobs": lp, "finish_reason": finish}),
                };
                return Ok((choice, d.completion_tokens as u64));
            }
        }
    }
}

impl Meta {
    /// One chunk object with one choice (this choice's index, and the
    /// log-probabilities of the tokens since the last chunk when asked for); `usage:
    /// null` when usage was asked for.
    fn chunk(&mut self, mut choice: Value) -> String {
        choice["index"] = json!(self.index);
        if let Some(pending) = self.logprobs.as_mut().filter(|p| !p.is_empty()) {
            let entries = std::mem::take(pending);
            choice["logprobs"] = match self.endpoint {
                Endpoint::Chat => crate::logprobs::chat(&entries),
                Endpoint::Completion => {
                    let v = crate::logprobs::completion(&entries, self.text_offset);
                    self.text_offset += entries
                        .iter()
                        .map(|e| e.chosen.token.chars().count())
                        .sum::<usize>();
                    v
                }
            };
        }
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": null, "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }

    /// A chat chunk with one delta (`content`, `reasoning_content` or `tool_calls`).
    fn delta_chunk(&mut self, delta: Value) -> String {
        self.chunk(json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}))
    }

    fn text_chunk(&mut self, text: &str, finish: Option<&str>) -> String {
        match self.endpoint {
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                self.chunk(
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
                )
            }
            Endpoint::Completion => self.chunk(
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            ),
        }
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        sse(&json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": null, "choices": [], "usage": usage,
        }))
    }
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

struct StreamState {
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    queue: VecDeque<String>,
    ended: bool,
}

/// The SSE response: a first chunk with the role, one chunk per text delta, a last
/// chunk with `finish_reason`, a usage chunk when asked for, then `data: [DONE]`.
/// Dropping the body (the client went away) drops the receiver, which the worker
/// sees and cancels the request.
fn stream_response(meta: Meta, rx: UnboundedReceiver<Event>) -> Response {
    sse_response(choice_stream(meta, rx))
}

/// The SSE response of one or more choices: with `n` > 1 each choice's chunks carry
/// its index, interleaved as they come; the usage chunk (completion tokens summed
/// over the choices) and `data: [DONE]` come after every choice has ended.
fn stream_choices(mut choices: Vec<(Meta, UnboundedReceiver<Event>)>) -> Response {
    use futures_util::StreamExt as _;
    if choices.len() == 1
        && let Some((meta, rx)) = choices.pop()
    {
        return stream_response(meta, rx);
    }
    let Some(first) = choices.first().map(|c| c.0.clone()) else {
        return ApiError::internal("no choice ran").into_response();
    };
    let tally = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let streams: Vec<_> = choices
        .into_iter()
        .map(|(mut meta, rx)| {
            meta.tally = Some(Arc::clone(&tally));
            Box::pin(choice_stream(meta, rx))
        })
        .collect();
    let tail = futures_util::stream::once(async move {
        let mut end = String::new();
        if first.include_usage {
            let tokens = tally.load(Ordering::SeqCst);
            end.push_str(&first.usage_chunk(Usage::new(first.prompt_tokens as u64, tokens)));
        }
        end.push_str("data: [DONE]\n\n");
        Ok::<_, Infallible>(end)
    });
    sse_response(futures_util::stream::select_all(streams).chain(tail))
}

/// One choice's chunks (see [`stream_response`]).
fn choice_stream(
    mut meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> impl futures_util::Stream<Item = Result<String, Infallible>> + Send {
    let mut queue = VecDeque::new();
    if meta.endpoint == Endpoint::Chat {
        queue.push_back(meta.chunk(json!({
            "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null
        })));
    }
    let state = StreamState {
        meta,
        rx,
        queue,
        ended: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(chunk) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(chunk), st));
            }
            if st.ended {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Started) => {}
                Some(Event::Logprob(lp)) => {
                    if let Some(pending) = st.meta.logprobs.as_mut() {
                        pending.push(lp);
                    }
                }
                Some(Event::Text(t)) => {
                    if let Some(p) = st.meta.output.as_mut() {
                        let deltas = crate::tools::deltas(p.push(&t), &mut st.meta.calls);
                        for d in deltas {
                            let c = st.meta.delta_chunk(d);
                            st.queue.push_back(c);
                        }
                    } else {
                        let c = st.meta.text_chunk(&t, None);
                        st.queue.push_back(c);
                    }
                }
                Some(Event::Done(d)) => {
                    if let Some(p) = st.meta.output.as_mut() {
                        let deltas = crate::tools::deltas(p.finish(), &mut st.meta.calls);
                        for d in deltas {
                            let c = st.meta.delta_chunk(d);
                            st.queue.push_back(c);
                        }
                    }
                    let finish =
                        crate::tools::finish_reason(st.meta.calls > 0, d.finish.as_openai());
                    let c = st.meta.text_chunk("", Some(finish));
                    st.queue.push_back(c);
                    if let Some(tally) = &st.meta.tally {
                        tally.fetch_add(d.completion_tokens as u64, Ordering::SeqCst);
                        st.ended = true;
                        continue;
                    }
                    if st.meta.include_usage {
                        let u =
                            Usage::new(st.meta.prompt_tokens as u64, d.completion_tokens as u64);
                        let c = st.meta.usage_chunk(u);
                        st.queue.push_back(c);
                    }
                    st.queue.push_back("data: [DONE]\n\n".to_owned());
                    st.ended = true;
                }
                Some(Event::Failed(e)) => {
                    st.queue.push_back(format!("data: {}\n\n", e.body()));
                    st.ended = true;
                }
                None => {
                    let e = ApiError::internal("the worker went away");
                    st.queue.push_back(format!("data: {}\n\n", e.body()));
                    st.ended = true;
                }
            }
        }
    })
}

fn sse_response(
    stream: impl futures_util::Stream<Item = Result<String, Infallible>> + Send + 'static,
) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::internal("building the stream response").into_response())
}
