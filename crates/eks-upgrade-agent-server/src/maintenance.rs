//! Maintenance of the server's data dir, for the remote CLI (`artifacts verify|cleanup|gc|
//! upload|pull` with `--server`); write role. They run to completion before answering (a
//! `verify` of a large store takes as long as reading it).
//!
//! - `POST /api/v1/maintenance/verify` -> `VerifyReport`
//! - `POST /api/v1/maintenance/cleanup` `{"dry_run": bool, "as_of": RFC 3339?}` -> `CleanupReport`
//! - `POST /api/v1/maintenance/gc` -> `GcReport`
//! - `POST /api/v1/maintenance/upload` `{"session"?, "artifact"?, "all", "retry_failed",
//!   "multipart_threshold"?}` -> `{"bucket", "report": UploadReport}` (the server's bucket)
//! - `POST /api/v1/maintenance/pull` `{"session_id", "bucket", "prefix"?, "eager"}` ->
//!   `PullReport` (into the server's data dir)

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking};

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

pub(crate) async fn verify(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let m = crate::artifacts_api::manager(&s)?;
    let r = blocking(move || m.verify(&mut |_| {})).await?;
    Ok(Json(to_json(&r)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CleanupBody {
    dry_run: bool,
    as_of: Option<DateTime<Utc>>,
}

pub(crate) async fn cleanup(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: CleanupBody = body(b)?;
    let m = crate::artifacts_api::manager(&s)?;
    let r = blocking(move || m.cleanup(b.dry_run, b.as_of)).await?;
    Ok(Json(to_json(&r)))
}

pub(crate) async fn gc(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let m = crate::artifacts_api::manager(&s)?;
    let r = blocking(move || m.gc()).await?;
    Ok(Json(to_json(&r)))
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
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
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
    let report = blocking(move || {
        m.upload(
            queue.as_ref(),
            &s3,
            &options,
            selector.as_ref(),
            b.retry_failed,
            &mut |_| {},
        )
    })
    .await?;
    Ok(Json(
        serde_json::json!({"bucket": bucket, "report": to_json(&report)}),
    ))
}

#[cfg(feature = "aws")]
pub(crate) async fn pull(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: PullBody = body(b)?;
    let m = crate::artifacts_api::manager(&s)?;
    let report = blocking(move || {
        let prefix = b
            .prefix
            .unwrap_or_else(|| eks_upgrade_agent::artifacts::upload::DEFAULT_PREFIX.to_owned());
        let s3 = eks_upgrade_agent::blob::S3BlobStore::from_env(&b.bucket, &prefix)?;
        m.pull(&s3, &b.session_id, b.eager, &mut |_| {})
    })
    .await?;
    Ok(Json(to_json(&report)))
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
