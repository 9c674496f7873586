//! Maintenance of the server's data dir, for the remote CLI (`artifacts verify|cleanup|gc|
//! upload|pull` with `--server`); write role. They run to completion before answering (a
//! `verify` of a large store takes as long as reading it).
//!
//! A client that sends `Accept: application/x-ndjson` (the CLI does) gets progress lines
//! instead, so that it can tell a server at work from a dead one (a black-holed connection, a
//! stopped process) by a limit on silence: once the request is taken (its body checked), `200`
//! at once, then `{"working": SECONDS}` each heartbeat interval (`AppState::with_heartbeat`,
//! 15 s) while the work runs, and last `{"ok": ANSWER}` or `{"status": HTTP_STATUS, "error":
//! {...}}` (the error object every route answers with), with `X-Accel-Buffering: no` and
//! `Cache-Control: no-cache` so that proxies pass each line on. Other clients (or an `Accept`
//! with `q=0` for it) get the answer as before.
//!
//! - `POST /api/v1/maintenance/verify` -> `VerifyReport`
//! - `POST /api/v1/maintenance/cleanup` `{"dry_run": bool, "as_of": RFC 3339?}` -> `CleanupReport`
//! - `POST /api/v1/maintenance/gc` -> `GcReport`
//! - `POST /api/v1/maintenance/upload` `{"session"?, "artifact"?, "all", "retry_failed",
//!   "multipart_threshold"?}` -> `{"bucket", "report": UploadReport}` (the server's bucket)
//! - `POST /api/v1/maintenance/pull` `{"session_id", "bucket", "prefix"?, "eager"}` ->
//!   `PullReport` (into the server's data dir)

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderName};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking};

/// The media type of an answer in progress lines (see the module docs).
const PROGRESS_LINES: &str = "application/x-ndjson";

/// Runs `work` on the blocking pool; answers with its result, in progress lines when the
/// client asks for them (see the module docs).
async fn answer<F>(s: &AppState, headers: &HeaderMap, work: F) -> Response
where
    F: FnOnce() -> eks_upgrade_agent::Result<Value> + Send + 'static,
{
    // Asked for: a media range `application/x-ndjson` without `q=0`.
    let lines = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            parts.next() == Some(PROGRESS_LINES)
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0))
                })
        });
    if !lines {
        return match blocking(work).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let every = s.heartbeat.max(std::time::Duration::from_millis(1));
    let began = tokio::time::Instant::now();
    let task = tokio::task::spawn_blocking(work);
    let line = |v: Value| Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\n")));
    let stream = futures_util::stream::unfold(Some(task), move |task| async move {
        let mut task = task?;
        tokio::select! {
            done = &mut task => {
                let e = match done {
                    Ok(Ok(v)) => return Some((line(json!({ "ok": v })), None)),
                    Ok(Err(e)) => ApiError::from(e),
                    Err(e) => {
                        tracing::error!(error = %e, "blocking task failed");
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
                    }
                };
                let mut v = e.to_json();
                v["status"] = json!(e.status().as_u16());
                Some((line(v), None))
            }
            _ = tokio::time::sleep(every) => {
                let working = json!({ "working": began.elapsed().as_secs() });
                Some((line(working), Some(task)))
            }
        }
    });
    // Proxies must pass each line on as it comes (nginx buffers unless told not to).
    (
        [
            (CONTENT_TYPE, PROGRESS_LINES),
            (CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A JSON object body whose fields all have defaults; empty means `{}`.
fn body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            format!("invalid body: {e}"),
        )
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

pub(crate) async fn verify(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let m = crate::artifacts_api::manager(&s)?;
    Ok(answer(&s, &headers, move || {
        m.verify(&mut |_| {}).map(|r| to_json(&r))
    })
    .await)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CleanupBody {
    dry_run: bool,
    as_of: Option<DateTime<Utc>>,
}

pub(crate) async fn cleanup(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b: CleanupBody = body(b)?;
    let m = crate::artifacts_api::manager(&s)?;
    let work = move || m.cleanup(b.dry_run, b.as_of).map(|r| to_json(&r));
    Ok(answer(&s, &headers, work).await)
}

pub(crate) async fn gc(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let m = crate::artifacts_api::manager(&s)?;
    Ok(answer(&s, &headers, move || m.gc().map(|r| to_json(&r))).await)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct UploadBody {
    session: Option<String>,
    artifact: Option<String>,
    all: bool,
    retry_failed: bool,
    multipart_threshold: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PullBody {
    session_id: String,
    bucket: String,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    eager: bool,
}

#[cfg(feature = "aws")]
pub(crate) async fn upload(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    use eks_upgrade_agent::artifacts::upload::UploadOptions;
    use eks_upgrade_agent::store::UploadSelector;
    let b: UploadBody = body(b)?;
    let m = crate::artifacts_api::manager(&s)?;
    let (Some(s3), Some(queue)) = (s.s3.clone(), s.uploads.clone()) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            "the server has no S3 bucket configured (serve with --s3-bucket or EUA_S3_BUCKET)",
        ));
    };
    let mut options = UploadOptions::default();
    if let Some(t) = b.multipart_threshold {
        if t < 5 * 1024 * 1024 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                format!(
                    "--multipart-threshold must be at least 5MiB (the smallest S3 part), got {t}"
                ),
            ));
        }
        options.multipart_threshold = t;
    }
    let selector = match (b.session, b.artifact, b.all) {
        (Some(s), _, _) => Some(UploadSelector::Session(s)),
        (_, Some(a), _) => Some(UploadSelector::Artifact(a)),
        (_, _, true) => Some(UploadSelector::All),
        _ => None,
    };
    let bucket = s3.bucket().to_owned();
    let work = move || {
        let report = m.upload(
            queue.as_ref(),
            &s3,
            &options,
            selector.as_ref(),
            b.retry_failed,
            &mut |_| {},
        )?;
        Ok(json!({"bucket": bucket, "report": to_json(&report)}))
    };
    Ok(answer(&s, &headers, work).await)
}

#[cfg(feature = "aws")]
pub(crate) async fn pull(
    State(s): State<AppState>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b: PullBody = body(b)?;
    let m = crate::artifacts_api::manager(&s)?;
    let work = move || {
        let prefix = b
            .prefix
            .unwrap_or_else(|| eks_upgrade_agent::artifacts::upload::DEFAULT_PREFIX.to_owned());
        let s3 = eks_upgrade_agent::blob::S3BlobStore::from_env(&b.bucket, &prefix)?;
        m.pull(&s3, &b.session_id, b.eager, &mut |_| {})
            .map(|r| to_json(&r))
    };
    Ok(answer(&s, &headers, work).await)
}

#[cfg(not(feature = "aws"))]
pub(crate) async fn upload(State(_): State<AppState>) -> ApiResult<Json<Value>> {
    Err(no_s3())
}

#[cfg(not(feature = "aws"))]
pub(crate) async fn pull(State(_): State<AppState>) -> ApiResult<Json<Value>> {
    Err(no_s3())
}

#[cfg(not(feature = "aws"))]
fn no_s3() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_input",
        "this server was built without S3 support (feature `aws`)",
    )
}
