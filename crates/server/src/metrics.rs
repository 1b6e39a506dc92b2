//! Prometheus text metrics, named after the OpenTelemetry GenAI semantic conventions
//! where they exist (`gen_ai.server.time_to_first_token` becomes
//! `gen_ai_server_time_to_first_token_seconds`, and so on).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Bucket bounds (seconds) of the duration histograms, as the GenAI conventions
/// advise for `gen_ai.server.request.duration`.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Bucket bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Bucket bounds (seconds) of the time-per-output-token histogram.
const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// Bucket bounds (tokens) of the token usage histogram.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Escapes a label value for the Prometheus text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Debug, Default)]
struct Inner {
    /// `(route, code)` -> count.
    http: BTreeMap<(String, u16), u64>,
    /// `(model, operation)` -> histograms.
    duration: BTreeMap<(String, &'static str), Histogram>,
    ttft: BTreeMap<(String, &'static str), Histogram>,
    tpot: BTreeMap<(String, &'static str), Histogram>,
    /// `(model, operation, token type)` -> histogram.
    tokens: BTreeMap<(String, &'static str, &'static str), Histogram>,
    /// `(model, token type)` -> total.
    token_totals: BTreeMap<(String, &'static str), u64>,
    /// `(model, outcome)` -> count.
    runs: BTreeMap<(String, &'static str), u64>,
    /// reason -> count.
    rejected: BTreeMap<&'static str, u64>,
}

/// The server's counters and histograms.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
}

/// One finished run, as the metrics record it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunObservation<'a> {
    /// The model's id.
    pub(crate) model: &'a str,
    /// `chat` or `text_completion`.
    pub(crate) operation: &'static str,
    /// `ok`, `cancelled` or `error`.
    pub(crate) outcome: &'static str,
    /// Seconds from the request to its end.
    pub(crate) duration_s: f64,
    /// Seconds from the request to the first token.
    pub(crate) ttft_s: Option<f64>,
    /// Seconds per generated token after the first.
    pub(crate) tpot_s: Option<f64>,
    /// Prompt tokens.
    pub(crate) input_tokens: u64,
    /// Generated tokens.
    pub(crate) output_tokens: u64,
}

/// Gauges read at scrape time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gauges {
    /// Resident memory.
    pub(crate) resident_bytes: u64,
    /// The cutline.
    pub(crate) cutline_bytes: u64,
    /// The warn threshold.
    pub(crate) warn_bytes: u64,
    /// Bytes reserved in the ledger (weights, KV caches, workspace, images, prefix
    /// blocks, the runtime).
    pub(crate) reserved_bytes: u64,
    /// Resident memory the ledger does not explain.
    pub(crate) unaccounted_bytes: u64,
    /// Health score, 0-100.
    pub(crate) health_score: f64,
    /// The badge's level: 0 SAFE, 1 WARN, 2 OVER_CUTLINE.
    pub(crate) badge_level: u8,
    /// Lazy model cache hit rate.
    pub(crate) model_cache_hit_rate: Option<f64>,
    /// Per model: `(id, running, waiting)`.
    pub(crate) models: Vec<(String, usize, usize)>,
    /// The KV caches' share of the memory they may have, 0 to 1
    /// ([`afo_runtime::guard::LedgerSnapshot::kv_cache_usage`]).
    pub(crate) kv_cache_usage: f64,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one HTTP response.
    pub(crate) fn http(&self, route: &str, code: u16) {
        *self
            .lock()
            .http
            .entry((route.to_owned(), code))
            .or_default() += 1;
    }

    /// Counts a request turned away before it ran (`queue_full`, `memory`, ...).
    pub(crate) fn rejected(&self, reason: &'static str) {
        *self.lock().rejected.entry(reason).or_default() += 1;
    }

    /// Records a finished run.
    pub(crate) fn run(&self, o: &RunObservation<'_>) {
        let mut m = self.lock();
        let key = (o.model.to_owned(), o.operation);
        *m.runs.entry((o.model.to_owned(), o.outcome)).or_default() += 1;
        m.duration
            .entry(key.clone())
            .or_insert_with(|| Histogram::new(DURATION_BUCKETS))
            .observe(o.duration_s);
        if let Some(t) = o.ttft_s {
            m.ttft
                .entry(key.clone())
                .or_insert_with(|| Histogram::new(TTFT_BUCKETS))
                .observe(t);
        }
        if let Some(t) = o.tpot_s {
            m.tpot
                .entry(key.clone())
                .or_insert_with(|| Histogram::new(TPOT_BUCKETS))
                .observe(t);
        }
        for (kind, n) in [("input", o.input_tokens), ("output", o.output_tokens)] {
            m.tokens
                .entry((o.model.to_owned(), o.operation, kind))
                .or_insert_with(|| Histogram::new(TOKEN_BUCKETS))
                .observe(n as f64);
            *m.token_totals
                .entry((o.model.to_owned(), kind))
                .or_default() += n;
        }
    }

    /// The Prometheus text exposition of everything, with `gauges` read now.
    pub(crate) fn render(&self, g: &Gauges) -> String {
        let m = self.lock();
        let mut out = String::with_capacity(8192);
        let model_op = |model: &str, op: &str| {
            format!(
                "gen_ai_request_model=\"{}\",gen_ai_operation_name=\"{op}\",gen_ai_system=\"afo\"",
                escape(model)
            )
        };
        out.push_str("# HELP gen_ai_server_request_duration_seconds Time from a generation request to its end.\n# TYPE gen_ai_server_request_duration_seconds histogram\n");
        for ((model, op), h) in &m.duration {
            h.write(
                &mut out,
                "gen_ai_server_request_duration_seconds",
                &model_op(model, op),
            );
        }
        out.push_str("# HELP gen_ai_server_time_to_first_token_seconds Time from a request to its first generated token.\n# TYPE gen_ai_server_time_to_first_token_seconds histogram\n");
        for ((model, op), h) in &m.ttft {
            h.write(
                &mut out,
                "gen_ai_server_time_to_first_token_seconds",
                &model_op(model, op),
            );
        }
        out.push_str("# HELP gen_ai_server_time_per_output_token_seconds Time per generated token after the first.\n# TYPE gen_ai_server_time_per_output_token_seconds histogram\n");
        for ((model, op), h) in &m.tpot {
            h.write(
                &mut out,
                "gen_ai_server_time_per_output_token_seconds",
                &model_op(model, op),
            );
        }
        out.push_str("# HELP gen_ai_client_token_usage Tokens per request, by type (input or output).\n# TYPE gen_ai_client_token_usage histogram\n");
        for ((model, op, kind), h) in &m.tokens {
            let labels = format!("{},gen_ai_token_type=\"{kind}\"", model_op(model, op));
            h.write(&mut out, "gen_ai_client_token_usage", &labels);
        }
        out.push_str(
            "# HELP afo_tokens_total Tokens processed, by type.\n# TYPE afo_tokens_total counter\n",
        );
        for ((model, kind), n) in &m.token_totals {
            let _ = writeln!(
                out,
                "afo_tokens_total{{gen_ai_request_model=\"{}\",gen_ai_token_type=\"{kind}\"}} {n}",
                escape(model)
            );
        }
        out.push_str("# HELP afo_runs_total Generation runs that reached a model, by outcome.\n# TYPE afo_runs_total counter\n");
        for ((model, outcome), n) in &m.runs {
            let _ = writeln!(
                out,
                "afo_runs_total{{gen_ai_request_model=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(model)
            );
        }
        out.push_str("# HELP afo_http_requests_total HTTP responses, by route and status code.\n# TYPE afo_http_requests_total counter\n");
        for ((route, code), n) in &m.http {
            let _ = writeln!(
                out,
                "afo_http_requests_total{{http_route=\"{}\",http_response_status_code=\"{code}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP afo_requests_rejected_total Requests turned away before running, by reason.\n# TYPE afo_requests_rejected_total counter\n");
        for (reason, n) in &m.rejected {
            let _ = writeln!(
                out,
                "afo_requests_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        drop(m);
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "afo_memory_resident_bytes",
            "Resident memory of the process.",
            g.resident_bytes as f64,
        );
        gauge(
            &mut out,
            "afo_memory_cutline_bytes",
            "The memory cutline.",
            g.cutline_bytes as f64,
        );
        gauge(
            &mut out,
            "afo_memory_warn_bytes",
            "The warn threshold.",
            g.warn_bytes as f64,
        );
        gauge(
            &mut out,
            "afo_memory_reserved_bytes",
            "Bytes reserved in the memory ledger.",
            g.reserved_bytes as f64,
        );
        gauge(
            &mut out,
            "afo_memory_unaccounted_bytes",
            "Resident memory the ledger does not explain (resident less reserved).",
            g.unaccounted_bytes as f64,
        );
        gauge(
            &mut out,
            "afo_health_score",
            "Health score of the resident memory, 0-100.",
            g.health_score,
        );
        gauge(
            &mut out,
            "afo_health_badge",
            "Badge level: 0 SAFE, 1 WARN, 2 OVER_CUTLINE.",
            f64::from(g.badge_level),
        );
        if let Some(r) = g.model_cache_hit_rate {
            gauge(
                &mut out,
                "afo_model_cache_hit_ratio",
                "Lazy model cache hits over acquires.",
                r,
            );
        }
        out.push_str("# HELP afo_scheduler_requests Requests in a model's batching scheduler, by state.\n# TYPE afo_scheduler_requests gauge\n");
        for (model, running, waiting) in &g.models {
            let model = escape(model);
            let _ = writeln!(
                out,
                "afo_scheduler_requests{{gen_ai_request_model=\"{model}\",state=\"running\"}} {running}"
            );
            let _ = writeln!(
                out,
                "afo_scheduler_requests{{gen_ai_request_model=\"{model}\",state=\"waiting\"}} {waiting}"
            );
        }
        router_gauges(&mut out, g);
        out
    }
}

/// The gauges cluster routers read from a model server (the Gateway API Inference
/// Extension's model server protocol, llm-d): requests waiting, requests running and
/// KV-cache utilisation, under afo's names (process totals) and under the vLLM names
/// the endpoint picker reads by default (per model, labelled `model_name`, the KV
/// fraction being the process's, shared by its models). One set of values, two sets
/// of names.
fn router_gauges(out: &mut String, g: &Gauges) {
    let (running, waiting) = g
        .models
        .iter()
        .fold((0usize, 0usize), |(r, w), m| (r + m.1, w + m.2));
    let total = |out: &mut String, name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    total(
        out,
        "afo_requests_waiting",
        "Requests queued and not yet running, all models.",
        waiting as f64,
    );
    total(
        out,
        "afo_requests_running",
        "Requests running (prefill or decode), all models.",
        running as f64,
    );
    total(
        out,
        "afo_kv_cache_usage_ratio",
        "KV-cache bytes reserved over the bytes KV caches may have under the cutline, 0-1.",
        g.kv_cache_usage,
    );
    let per_model = |out: &mut String,
                     name: &str,
                     help: &str,
                     value: &dyn Fn(&(String, usize, usize)) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for m in &g.models {
            let _ = writeln!(
                out,
                "{name}{{model_name=\"{}\"}} {}",
                escape(&m.0),
                value(m)
            );
        }
    };
    per_model(
        out,
        "vllm:num_requests_waiting",
        "Requests waiting to be processed (afo_requests_waiting, per model).",
        &|m| m.2 as f64,
    );
    per_model(
        out,
        "vllm:num_requests_running",
        "Requests running (afo_requests_running, per model).",
        &|m| m.1 as f64,
    );
    for name in ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"] {
        per_model(
            out,
            name,
            "KV-cache usage, 1 is full (afo_kv_cache_usage_ratio, shared by the process's models).",
            &|_| g.kv_cache_usage,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        for d in [0.005, 0.05, 3.0] {
            m.run(&RunObservation {
                model: "m",
                operation: "chat",
                outcome: "ok",
                duration_s: d,
                ttft_s: Some(d / 2.0),
                tpot_s: None,
                input_tokens: 10,
                output_tokens: 3,
            });
        }
        let text = m.render(&Gauges::default());
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let l = "gen_ai_request_model=\"m\",gen_ai_operation_name=\"chat\",gen_ai_system=\"afo\"";
        assert_eq!(
            line(&format!(
                "gen_ai_server_request_duration_seconds_bucket{{{l},le=\"0.01\"}}"
            )),
            "1"
        );
        assert_eq!(
            line(&format!(
                "gen_ai_server_request_duration_seconds_bucket{{{l},le=\"0.08\"}}"
            )),
            "2"
        );
        assert_eq!(
            line(&format!(
                "gen_ai_server_request_duration_seconds_bucket{{{l},le=\"+Inf\"}}"
            )),
            "3"
        );
        assert_eq!(
            line(&format!(
                "gen_ai_server_request_duration_seconds_count{{{l}}}"
            )),
            "3"
        );
        assert_eq!(
            line("afo_tokens_total{gen_ai_request_model=\"m\",gen_ai_token_type=\"output\"}"),
            "9"
        );
        assert!(text.contains("# TYPE gen_ai_server_time_to_first_token_seconds histogram"));
    }

    #[test]
    fn router_gauges_carry_the_same_values_under_both_names() {
        let g = Gauges {
            models: vec![("a".into(), 2, 3), ("b\"x".into(), 1, 0)],
            kv_cache_usage: 0.25,
            ..Gauges::default()
        };
        let text = Metrics::default().render(&g);
        for line in [
            "afo_requests_waiting 3",
            "afo_requests_running 3",
            "afo_kv_cache_usage_ratio 0.25",
            "vllm:num_requests_waiting{model_name=\"a\"} 3",
            "vllm:num_requests_waiting{model_name=\"b\\\"x\"} 0",
            "vllm:num_requests_running{model_name=\"a\"} 2",
            "vllm:num_requests_running{model_name=\"b\\\"x\"} 1",
            "vllm:kv_cache_usage_perc{model_name=\"a\"} 0.25",
            "vllm:gpu_cache_usage_perc{model_name=\"b\\\"x\"} 0.25",
            "# TYPE vllm:num_requests_waiting gauge",
            "# TYPE afo_kv_cache_usage_ratio gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
