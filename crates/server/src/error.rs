//! The crate's error type, and the OpenAI-style error bodies the API answers with.

use std::net::SocketAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What can go wrong building or running a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The runtime failed (loading a model at start-up, probing memory).
    #[error(transparent)]
    Runtime(#[from] afo_runtime::Error),
    /// A server setting is out of range.
    #[error("server setting `{name}` = {value} is invalid: {reason}")]
    InvalidConfig {
        /// The setting.
        name: &'static str,
        /// Its value, as given.
        value: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// Two models were given the same id.
    #[error("model id `{id}` is given twice (by {first} and {second})")]
    DuplicateModel {
        /// The id.
        id: String,
        /// The first model's path.
        first: std::path::PathBuf,
        /// The second model's path.
        second: std::path::PathBuf,
    },
    /// A model could not be loaded or started.
    #[error("model `{model}` ({path}): {reason}")]
    Load {
        /// The model's id.
        model: String,
        /// Its path.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// The listening socket failed.
    #[error("serving on {addr}: {source}")]
    Serve {
        /// The address served.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// A model worker thread could not be started.
    #[error("starting the worker thread of model `{model}`: {source}")]
    Worker {
        /// The model's id.
        model: String,
        /// The system's error.
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error as the API answers it: an HTTP status and an OpenAI-style body
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`,
    /// `not_found_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `queue_full`, ...).
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        )
    }

    /// 401: a missing or wrong bearer token.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid API key: send `Authorization: Bearer <key>`",
        )
        .code("invalid_api_key")
    }

    /// 404: no such model.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{model}` does not exist or is not served here"),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 413: the body is larger than the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .code("request_too_large")
    }

    /// 429: come back later (the queue is full, or memory is reserved by runs in
    /// flight).
    pub fn busy(message: impl Into<String>, code: &'static str, retry_after_s: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            message.into(),
        )
        .code(code);
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// 503: the server cannot run the request now (memory, shutting down).
    pub fn unavailable(message: impl Into<String>, code: &'static str, retry_after_s: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            message.into(),
        )
        .code(code);
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// 504: the request ran past the server's time limit.
    pub fn timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!(
                "the request ran past the time limit of {} s",
                limit.as_secs_f64()
            ),
        )
        .code("timeout")
    }

    /// 500: something failed inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message.into(),
        )
    }

    /// Names the request field at fault.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets the machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn body(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_else(|_| {
            String::from(
                r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#,
            )
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body(),
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
