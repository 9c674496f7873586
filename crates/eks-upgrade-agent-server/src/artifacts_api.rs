//! Artifact routes: sessions, collections, streamed uploads, verified downloads, search, stats.
//!
//! - `POST /api/v1/sessions/{s}/collections/{c}/artifacts?name=N&type=T&tag=A&tag=B&task_id=..`
//!   takes the file as the raw request body and streams it into the blob store (never whole in
//!   memory); a body cut short stores nothing.
//! - `GET /api/v1/artifacts/{id}/content` streams the verified bytes with `Content-Length`,
//!   `ETag` = the SHA-256 digest, `If-None-Match` and single `Range` requests. The response's
//!   last chunk is held back until the whole blob has been read and verified (a range request
//!   reads the whole blob for that), so a corrupt blob never ends in a complete response: the
//!   connection is cut instead.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::Value;

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::artifacts::{AddOptions, NewSession};
use eks_upgrade_agent::model::{ArtifactQuery, ArtifactStatus, ArtifactType};

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking};

/// Bytes per chunk of a download.
const CHUNK: usize = 64 * 1024;

pub(crate) fn manager(s: &AppState) -> ApiResult<Arc<TestArtifactsManager>> {
    s.artifacts.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "artifacts are not enabled on this server",
        )
    })
}

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", m)
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// Runs `f` on the manager on the blocking pool and answers its result as JSON.
async fn answer<T: serde::Serialize + Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&TestArtifactsManager) -> eks_upgrade_agent::Result<T> + Send + 'static,
) -> ApiResult<Json<Value>> {
    let m = manager(s)?;
    let v = blocking(move || f(&m)).await?;
    Ok(Json(to_json(&v)))
}

// --- sessions and collections ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSessionBody {
    upgrade_id: String,
    cluster_name: String,
    name: Option<String>,
    description: Option<String>,
    retention_days: Option<u32>,
}

pub(crate) async fn create_session(
    State(s): State<AppState>,
    body: Result<Json<NewSessionBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(b) = body?;
    let m = manager(&s)?;
    let session = blocking(move || {
        m.create_session(NewSession {
            upgrade_id: b.upgrade_id,
            cluster_name: b.cluster_name,
            name: b.name,
            description: b.description,
            retention_days: b.retention_days,
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(to_json(&session))))
}

#[derive(Debug, Deserialize)]
pub(crate) struct SessionsQuery {
    upgrade_id: Option<String>,
}

pub(crate) async fn list_sessions(
    State(s): State<AppState>,
    q: Result<Query<SessionsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    answer(&s, move |m| m.sessions(q.upgrade_id.as_deref())).await
}

/// Most ids one `GET /api/v1/ids/{kind}?shortest=` takes.
pub(crate) const MAX_SHORTEST: usize = 100;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShortestQuery {
    shortest: String,
}

/// `GET /api/v1/ids/{kind}?shortest=ID,ID,...`: the shortest unambiguous form of each id (at
/// most [`MAX_SHORTEST`]), in order, as `{"shortest": [...]}`, as tables show them.
pub(crate) async fn shortest_ids(
    State(s): State<AppState>,
    Path(kind): Path<String>,
    q: Result<Query<ShortestQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let kind = id_kind(&kind)?;
    let ids: Vec<String> = q
        .shortest
        .split(',')
        .filter(|i| !i.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.len() > MAX_SHORTEST {
        return Err(eks_upgrade_agent::Error::InvalidInput(format!(
            "at most {MAX_SHORTEST} ids per request, got {}",
            ids.len()
        ))
        .into());
    }
    let m = manager(&s)?;
    let shortest = blocking(move || {
        ids.iter()
            .map(|id| m.abbreviate(kind, id))
            .collect::<eks_upgrade_agent::Result<Vec<_>>>()
    })
    .await?;
    Ok(Json(serde_json::json!({ "shortest": shortest })))
}

fn id_kind(kind: &str) -> Result<eks_upgrade_agent::store::IdKind, eks_upgrade_agent::Error> {
    use eks_upgrade_agent::store::IdKind;
    match kind {
        "session" => Ok(IdKind::Session),
        "collection" => Ok(IdKind::Collection),
        "artifact" => Ok(IdKind::Artifact),
        other => Err(eks_upgrade_agent::Error::InvalidInput(format!(
            "unknown id kind {other:?}: expected session, collection or artifact"
        ))),
    }
}

/// `GET /api/v1/ids/{kind}/{abbrev}`: the full session, collection or artifact id that an
/// abbreviation (a unique prefix, or a unique suffix of at least six characters) names, as
/// `{"id": ...}`; an ambiguous one is `invalid_input` listing the candidates.
pub(crate) async fn resolve_id(
    State(s): State<AppState>,
    Path((kind, abbrev)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = id_kind(&kind)?;
    let m = manager(&s)?;
    let id = blocking(move || m.resolve_id(kind, &abbrev)).await?;
    Ok(Json(serde_json::json!({ "id": id })))
}

pub(crate) async fn show_session(
    State(s): State<AppState>,
    Path(session): Path<String>,
) -> ApiResult<Json<Value>> {
    let m = manager(&s)?;
    let (sess, summary, collections) = blocking(move || {
        Ok((
            m.session(&session)?,
            m.session_summary(&session)?,
            m.collections(&session)?,
        ))
    })
    .await?;
    let mut v = to_json(&sess);
    v["summary"] = to_json(&summary);
    v["collections"] = to_json(&collections);
    Ok(Json(v))
}

pub(crate) async fn complete_session(
    State(s): State<AppState>,
    Path(session): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |m| m.complete_session(&session)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewCollectionBody {
    name: String,
    description: Option<String>,
    task_id: Option<String>,
}

pub(crate) async fn create_collection(
    State(s): State<AppState>,
    Path(session): Path<String>,
    body: Result<Json<NewCollectionBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(b) = body?;
    let m = manager(&s)?;
    let c = blocking(move || {
        m.session(&session)?;
        m.create_collection(
            &session,
            &b.name,
            b.description.as_deref(),
            b.task_id.as_deref(),
        )
    })
    .await?;
    Ok((StatusCode::CREATED, Json(to_json(&c))))
}

pub(crate) async fn list_collections(
    State(s): State<AppState>,
    Path(session): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |m| {
        m.session(&session)?;
        m.collections(&session)
    })
    .await
}

// --- upload ---------------------------------------------------------------------------------

/// Query parameters as a list, so repeated keys (`tag=a&tag=b`) are kept.
type Pairs = Vec<(String, String)>;

fn one<'a>(pairs: &'a Pairs, key: &str) -> ApiResult<Option<&'a str>> {
    let mut it = pairs.iter().filter(|(k, _)| k == key);
    let first = it.next().map(|(_, v)| v.as_str());
    if it.next().is_some() {
        return Err(invalid(format!("{key} may be given once")));
    }
    Ok(first)
}

fn check_keys(pairs: &Pairs, allowed: &[&str]) -> ApiResult<()> {
    for (k, _) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!(
                    "unknown query parameter {k:?}: expected one of {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn artifact_type(v: &str) -> ApiResult<ArtifactType> {
    v.parse()
        .map_err(|e: eks_upgrade_agent::Error| invalid(e.to_string()))
}

pub(crate) async fn upload(
    State(s): State<AppState>,
    Path((session, collection)): Path<(String, String)>,
    q: Result<Query<Pairs>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Query(q) = q?;
    check_keys(
        &q,
        &[
            "name",
            "type",
            "phase",
            "tag",
            "task_id",
            "step_id",
            "description",
            "metadata",
            "access_token",
        ],
    )?;
    let name = one(&q, "name")?
        .ok_or_else(|| invalid("name is required: ?name=FILE_NAME"))?
        .to_owned();
    let metadata = match one(&q, "metadata")? {
        None => Default::default(),
        Some(m) => match serde_json::from_str::<Value>(m) {
            Ok(Value::Object(o)) => o,
            _ => return Err(invalid("metadata must be a JSON object")),
        },
    };
    let opts = AddOptions {
        artifact_type: one(&q, "type")?.map(artifact_type).transpose()?,
        name: None,
        description: one(&q, "description")?.map(str::to_owned),
        tags: q
            .iter()
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| v.clone())
            .collect(),
        task_id: one(&q, "task_id")?.map(str::to_owned),
        step_id: one(&q, "step_id")?.map(str::to_owned),
        metadata,
    };
    let m = manager(&s)?;
    if let Some(phase) = one(&q, "phase")? {
        let phase = phase
            .parse::<eks_upgrade_agent::model::RunPhase>()
            .map_err(|e| invalid(e.to_string()))?;
        return crate::tests_api::upload_with_phase(
            &s, m, session, collection, name, opts, phase, &headers, body,
        )
        .await;
    }
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(format!("request body: {e}")));
    let reader = tokio_util::io::StreamReader::new(stream);
    let body_error = Arc::new(std::sync::Mutex::new(None::<(String, u64)>));
    let seen = Arc::clone(&body_error);
    let result = blocking(move || {
        let mut reader = BodyReader {
            inner: tokio_util::io::SyncIoBridge::new(reader),
            received: 0,
            error: seen,
        };
        m.add_reader(&session, &collection, &mut reader, &name, &opts)
    })
    .await;
    let a = match result {
        Ok(a) => a,
        Err(e) => {
            // The client's body failed (cut short, too large): its fault, not ours.
            let failed = body_error.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((why, received)) = failed {
                tracing::debug!(error = %why, received, "upload body ended early");
                return Err(if why.contains("length limit") {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        "the request body is larger than this server accepts; nothing was stored",
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "incomplete_body",
                        format!(
                            "the request body ended early after {received} bytes ({why}); \
                             nothing was stored: send the file again"
                        ),
                    )
                });
            }
            return Err(e);
        }
    };
    s.metrics.uploads.inc();
    Ok((StatusCode::CREATED, Json(to_json(&a))))
}

/// The request body as a blocking reader that remembers why it failed (and how much came).
struct BodyReader<R> {
    inner: R,
    received: u64,
    error: Arc<std::sync::Mutex<Option<(String, u64)>>>,
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.received += n as u64;
                Ok(n)
            }
            Err(e) => {
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((e.to_string(), self.received));
                Err(e)
            }
        }
    }
}

// --- reading --------------------------------------------------------------------------------

pub(crate) async fn show_artifact(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |m| m.artifact(&id)).await
}

pub(crate) async fn delete_artifact(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |m| m.delete_artifact(&id)).await
}

/// A parsed single `Range: bytes=...` header: the inclusive range, or `None` for the whole.
fn range_of(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let Some(spec) = v
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None); // other units are ignored (RFC 9110 14.2)
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: send the whole representation
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        (start, end)
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

pub(crate) async fn download(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let m = manager(&s)?;
    let (a, reader) = blocking(move || m.open(&id)).await?;
    let etag = format!("\"{}\"", a.file_hash);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let size = a.file_size;
    let range = match range_of(&headers, size) {
        Ok(r) => r,
        Err(()) => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the range is outside the artifact's {size} bytes"),
            )
            .into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Ok(r);
        }
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || send_verified(reader, start, len, &tx));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&a.name)),
    );
    let disposition = format!(
        "attachment; filename=\"{}\"",
        a.export_name.replace(['"', '\\'], "_")
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ascii"),
        );
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    s.metrics.downloads.inc();
    Ok(resp)
}

/// Reads the whole verified blob, sends bytes `start..start+len`, and holds the last chunk
/// back until the digest has been checked at the end.
fn send_verified(
    mut reader: Box<dyn Read + Send>,
    start: u64,
    len: u64,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    let end = start + len;
    let mut pos = 0u64;
    let mut pending: Option<Bytes> = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "download aborted");
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let (a, b) = (pos, pos + n as u64);
        pos = b;
        let (lo, hi) = (a.max(start), b.min(end));
        if lo < hi {
            if let Some(p) = pending.take()
                && tx.blocking_send(Ok(p)).is_err()
            {
                return; // the client went away
            }
            pending = Some(Bytes::copy_from_slice(
                &buf[(lo - a) as usize..(hi - a) as usize],
            ));
        }
    }
    if let Some(p) = pending {
        let _ = tx.blocking_send(Ok(p));
    }
}

fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("json") => "application/json",
        Some("xml") => "application/xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("svg") => "image/svg+xml",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("log" | "txt" | "yaml" | "yml" | "toml" | "csv" | "md") => "text/plain; charset=utf-8",
        Some("gz" | "tgz") => "application/gzip",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    }
}

pub(crate) async fn counts_by_task(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |m| m.counts_by_task(&upgrade)).await
}

// --- search and stats -----------------------------------------------------------------------

pub(crate) async fn search(
    State(s): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    check_keys(
        &q,
        &[
            "session",
            "collection",
            "upgrade",
            "type",
            "tag",
            "task_id",
            "status",
            "name",
            "min_size",
            "max_size",
            "since",
            "limit",
            "cursor",
            "access_token",
        ],
    )?;
    let size = |k: &str| -> ApiResult<Option<u64>> {
        one(&q, k)?
            .map(|v| eks_upgrade_agent::units::parse_size(v).map_err(invalid))
            .transpose()
    };
    let created_since = match one(&q, "since")? {
        None => None,
        Some(v) => {
            let d = eks_upgrade_agent::units::parse_duration(v).map_err(invalid)?;
            let d = chrono::Duration::from_std(d).map_err(|_| invalid("since is too long"))?;
            Some(eks_upgrade_agent::model::now() - d)
        }
    };
    let max = eks_upgrade_agent::model::MAX_SEARCH_LIMIT;
    let limit = match one(&q, "limit")? {
        None => eks_upgrade_agent::model::DEFAULT_SEARCH_LIMIT,
        // Any number above the maximum (however many digits) names the maximum.
        Some(v) => match v.parse::<u64>().or_else(|e| {
            if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                Ok(u64::MAX)
            } else {
                Err(e)
            }
        }) {
            Ok(n) if n > max as u64 => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!(
                        "limit {v} is above the maximum of {max} per page; follow the \
                         X-Next-Cursor header (?cursor=) for more"
                    ),
                ));
            }
            Ok(n) if n >= 1 => n as usize,
            _ => return Err(invalid(format!("limit must be in 1..={max}, got {v:?}"))),
        },
    };
    let query = ArtifactQuery {
        session_id: one(&q, "session")?.map(str::to_owned),
        collection_id: one(&q, "collection")?.map(str::to_owned),
        upgrade_id: one(&q, "upgrade")?.map(str::to_owned),
        artifact_type: one(&q, "type")?.map(artifact_type).transpose()?,
        tags: q
            .iter()
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| v.clone())
            .collect(),
        task_id: one(&q, "task_id")?.map(str::to_owned),
        status: one(&q, "status")?
            .map(|v| {
                v.parse::<ArtifactStatus>()
                    .map_err(|e: eks_upgrade_agent::Error| invalid(e.to_string()))
            })
            .transpose()?,
        name: one(&q, "name")?.map(str::to_owned),
        min_size: size("min_size")?,
        max_size: size("max_size")?,
        created_since,
        limit,
        cursor: one(&q, "cursor")?.map(str::to_owned),
    };
    let m = manager(&s)?;
    let page = blocking(move || m.search_page(&query)).await?;
    let mut resp = Json(to_json(&page.artifacts)).into_response();
    // The body stays a plain array; the next page is announced in headers.
    if let Some(c) = &page.next_cursor
        && let Ok(v) = HeaderValue::from_str(c)
    {
        resp.headers_mut().insert("x-next-cursor", v);
    }
    Ok(resp)
}

pub(crate) async fn stats(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let session = q.get("session").cloned();
    answer(&s, move |m| {
        if let Some(id) = &session {
            m.session(id)?;
        }
        m.stats(session.as_deref())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn ranges() {
        assert_eq!(range_of(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(range_of(&h("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(range_of(&h("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(range_of(&h("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(range_of(&h("bytes=-30"), 10), Ok(Some((0, 9))));
        assert_eq!(range_of(&h("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(range_of(&h("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(range_of(&h("items=0-1"), 10), Ok(None));
        assert_eq!(range_of(&h("bytes=10-"), 10), Err(()));
        assert_eq!(range_of(&h("bytes=5-2"), 10), Err(()));
        assert_eq!(range_of(&h("bytes=x-2"), 10), Err(()));
        assert_eq!(range_of(&h("bytes=-0"), 10), Err(()));
        assert_eq!(range_of(&h("bytes=0-"), 0), Err(()));
    }
}
