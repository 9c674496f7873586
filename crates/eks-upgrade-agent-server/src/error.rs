//! The one error shape of the API: `{"error": {"code": "...", "message": "..."}}`. Errors of
//! the library also carry their parts (`what`, and `from`/`to` for an invalid transition), so
//! a remote store can rebuild the same error.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The one error type of the API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// What went wrong, for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: serde_json::Map::new(),
        }
    }

    /// The HTTP status it answers with.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The error as the JSON body says it.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut e = self.fields.clone();
        e.insert("code".into(), json!(self.code));
        e.insert("message".into(), json!(self.message));
        json!({ "error": e })
    }
}

impl From<eks_upgrade_agent::Error> for ApiError {
    fn from(e: eks_upgrade_agent::Error) -> Self {
        use eks_upgrade_agent::Error as E;
        let status = match &e {
            E::NotFound { .. } => StatusCode::NOT_FOUND,
            E::AlreadyExists { .. } | E::InvalidTransition { .. } => StatusCode::CONFLICT,
            E::InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
            return ApiError::new(status, e.code(), "internal error");
        }
        let mut err = ApiError::new(status, e.code(), e.to_string());
        match e {
            E::NotFound { what } | E::AlreadyExists { what } => {
                err.fields.insert("what".into(), json!(what));
            }
            E::InvalidTransition { what, from, to } => {
                err.fields.insert("what".into(), json!(what));
                err.fields.insert("from".into(), json!(from));
                err.fields.insert("to".into(), json!(to));
            }
            _ => {}
        }
        err
    }
}

/// 413 naming the route's limit.
pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "the body is larger than this route's limit of {limit} bytes ({} MiB); send less per request",
            limit / (1024 * 1024)
        ),
    )
}

/// A JSON body, with the route's body limit named when it is too large.
pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>, limit: usize) -> ApiResult<T> {
    match body {
        Ok(Json(v)) => Ok(v),
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large(limit)),
        Err(r) => Err(r.into()),
    }
}

/// `limit` if it is at most [`crate::MAX_EVENTS`], else 400 naming the maximum.
pub(crate) fn page_limit(name: &str, limit: usize) -> ApiResult<usize> {
    limit_with(
        name,
        limit,
        "read the next page with since=<the last seq you got>",
    )
}

/// `limit` if it is at most [`crate::MAX_EVENTS`] (one page), else 400 naming the maximum and
/// `next`, how to read on.
pub(crate) fn limit_with(name: &str, limit: usize, next: &str) -> ApiResult<usize> {
    if limit > crate::MAX_EVENTS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "{name} must be at most {} (got {limit}); {next}",
                crate::MAX_EVENTS
            ),
        ));
    }
    Ok(limit)
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large(crate::MAX_BODY);
        }
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "malformed_json",
        };
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            // Well-formed JSON with wrong fields or types.
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            status
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.to_json())).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Runs library work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> eks_upgrade_agent::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "blocking task failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        })?
        .map_err(ApiError::from)
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large(crate::MAX_BODY);
        }
        let code = "bad_request";
        ApiError::new(status, code, r.body_text())
    }
}

/// Most bytes of an error body read back to rewrite it (rejection messages are short).
const MAX_REWRITTEN: usize = 16 * 1024;

/// Gives every error response the one JSON shape: axum's own rejections (a path segment that is
/// not UTF-8, a request that is not a WebSocket upgrade, a method the route does not take, ...)
/// answer in `text/plain` or with no body at all.
pub(crate) async fn json_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_REWRITTEN)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_input",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let message = if status.is_server_error() {
        tracing::error!(status = %status, detail = %text, "request failed");
        "internal error".to_owned()
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = parts
            .headers
            .get(axum::http::header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        format!("this route does not take this method (it takes {allow})")
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_lowercase()
    } else {
        // axum's messages start with a capital: the house style is lower case.
        let mut c = text.chars();
        c.next()
            .map(|f| f.to_lowercase().chain(c).collect())
            .unwrap_or_default()
    };
    let mut resp = ApiError::new(status, code, message).into_response();
    for (k, v) in &parts.headers {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
    }
    resp
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}
