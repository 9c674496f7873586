//! The HTTP API of the EKS Upgrade Agent (first slice: progress). `router(state)` builds the
//! axum router, `serve(listener, state, shutdown)` runs it; tests bind `127.0.0.1:0`.
//!
//! Request bodies use the model's field names, the same as `progress apply` (a task operation's
//! body is the `apply` line without `op`, `upgrade_id` and `task_id`, which come from the path).
//! Errors have one JSON shape, `{"error": {"code": "...", "message": "..."}}`: 400 malformed JSON,
//! 404 unknown upgrade or task (or route), 409 already exists or invalid transition, 413 body too
//! large, 422 invalid values; 5xx say "internal error" and the detail goes to the log.
//!
//! The library is synchronous (SQLite); handlers call it on the blocking pool.
//!
//! ```
//! use std::sync::Arc;
//! use eks_upgrade_agent::{ProgressTracker, SqliteStore, store::sqlite::SqliteOptions};
//! use eks_upgrade_agent_server::{AppState, router};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let store = SqliteStore::open(dir.path(), &SqliteOptions::default())?;
//! let app = router(AppState { tracker: Arc::new(ProgressTracker::new(Arc::new(store))) });
//! # let _ = app;
//! # Ok::<(), eks_upgrade_agent::Error>(())
//! ```

use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use eks_upgrade_agent::model::ProgressSummary;
use eks_upgrade_agent::progress::{Command, ProgressTracker};
use eks_upgrade_agent::store::Committed;

/// Largest JSON body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most events one `GET .../events` returns.
pub const MAX_EVENTS: usize = 10_000;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The tracker over the store.
    pub tracker: Arc<ProgressTracker>,
}

/// The one error type of the API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
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
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
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
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs library work on the blocking pool.
async fn blocking<T: Send + 'static>(
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

/// The router over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/api/v1/upgrades", get(list_upgrades).post(create_upgrade))
        .route("/api/v1/upgrades/{upgrade}", get(show_upgrade))
        .route("/api/v1/upgrades/{upgrade}/events", get(events))
        .route(
            "/api/v1/upgrades/{upgrade}/events/stream",
            get(event_stream),
        )
        .route("/api/v1/upgrades/{upgrade}/tasks", post(add_tasks))
        .route("/api/v1/upgrades/{upgrade}/tasks/{task}", get(show_task))
        .route(
            "/api/v1/upgrades/{upgrade}/tasks/{task}/{op}",
            post(task_op),
        )
        .route("/api/v1/upgrades/{upgrade}/{op}", post(upgrade_op))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An optional JSON body: empty means none.
fn optional_json(body: Result<Bytes, BytesRejection>) -> ApiResult<Option<Json<Value>>> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "malformed_json"
        };
        ApiError::new(status, code, r.body_text())
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(|v| Some(Json(v)))
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("malformed JSON body: {e}"),
            )
        })
}

/// A JSON object body; an absent body is an empty object.
fn object(body: Option<Json<Value>>) -> ApiResult<Map<String, Value>> {
    match body.map(|Json(v)| v) {
        None => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            "the body must be a JSON object",
        )),
    }
}

/// Builds a command from a body and the path's ids, with `apply`'s field names.
fn command(mut body: Map<String, Value>, op: &str, ids: &[(&str, &str)]) -> ApiResult<Command> {
    for (k, _) in ids {
        if body.contains_key(*k) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                format!("{k} comes from the URL; remove it from the body"),
            ));
        }
    }
    body.insert("op".into(), json!(op));
    for (k, v) in ids {
        body.insert((*k).into(), json!(v));
    }
    serde_json::from_value(Value::Object(body)).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            e.to_string(),
        )
    })
}

async fn execute(state: &AppState, c: Command) -> ApiResult<Committed> {
    let tracker = Arc::clone(&state.tracker);
    blocking(move || tracker.execute(c)).await
}

async fn list_upgrades(State(s): State<AppState>) -> ApiResult<Json<Vec<ProgressSummary>>> {
    let tracker = Arc::clone(&s.tracker);
    let list = blocking(move || tracker.list_upgrades()).await?;
    let now = eks_upgrade_agent::model::now();
    Ok(Json(
        list.iter().map(|u| ProgressSummary::of(u, now)).collect(),
    ))
}

async fn create_upgrade(
    State(s): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let body = object(Some(body?))?;
    let c = command(body, "upgrade.create", &[])?;
    let id = c.upgrade_id().to_owned();
    let committed = execute(&s, c).await?;
    Ok((
        StatusCode::CREATED,
        Json(summary_json(&s, &id, committed.last_seq()).await?),
    ))
}

async fn summary_json(s: &AppState, upgrade: &str, seq: u64) -> ApiResult<Value> {
    let tracker = Arc::clone(&s.tracker);
    let id = upgrade.to_owned();
    let summary = blocking(move || tracker.summary(&id)).await?;
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    v["seq"] = json!(seq);
    Ok(v)
}

async fn show_upgrade(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
) -> ApiResult<Json<Value>> {
    let tracker = Arc::clone(&s.tracker);
    let (summary, tasks) =
        blocking(move || Ok((tracker.summary(&upgrade)?, tracker.tasks(&upgrade)?))).await?;
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    v["tasks"] = serde_json::to_value(tasks).unwrap_or_default();
    Ok(Json(v))
}

async fn upgrade_op(
    State(s): State<AppState>,
    Path((upgrade, op)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let op = match op.as_str() {
        "start" | "phase" | "complete" | "fail" => format!("upgrade.{op}"),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "unknown upgrade operation {op:?}: expected start, phase, complete or fail"
                ),
            ));
        }
    };
    let body = object(optional_json(body)?)?;
    let c = command(body, &op, &[("upgrade_id", &upgrade)])?;
    let committed = execute(&s, c).await?;
    Ok(Json(
        summary_json(&s, &upgrade, committed.last_seq()).await?,
    ))
}

async fn add_tasks(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(body) = body?;
    // One task (an object) or many (an array of objects).
    let c = match body {
        Value::Array(tasks) => command(
            Map::from_iter([("tasks".to_owned(), Value::Array(tasks))]),
            "task.add_many",
            &[("upgrade_id", &upgrade)],
        )?,
        other => command(
            object(Some(Json(other)))?,
            "task.add",
            &[("upgrade_id", &upgrade)],
        )?,
    };
    let committed = execute(&s, c).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"seq": committed.last_seq(), "events": committed.events})),
    ))
}

async fn show_task(
    State(s): State<AppState>,
    Path((upgrade, task)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let tracker = Arc::clone(&s.tracker);
    let detail = blocking(move || tracker.task_detail(&upgrade, &task)).await?;
    Ok(Json(serde_json::to_value(detail).unwrap_or_default()))
}

async fn task_op(
    State(s): State<AppState>,
    Path((upgrade, task, op)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    const OPS: [&str; 9] = [
        "start", "update", "step", "complete", "fail", "pause", "resume", "cancel", "retry",
    ];
    if !OPS.contains(&op.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "unknown task operation {op:?}: expected one of {}",
                OPS.join(", ")
            ),
        ));
    }
    let body = object(optional_json(body)?)?;
    let c = command(
        body,
        &format!("task.{op}"),
        &[("upgrade_id", &upgrade), ("task_id", &task)],
    )?;
    let committed = execute(&s, c).await?;
    let tracker = Arc::clone(&s.tracker);
    let detail = blocking(move || tracker.task_detail(&upgrade, &task)).await?;
    let mut v = serde_json::to_value(detail.task).unwrap_or_default();
    v["seq"] = json!(committed.last_seq());
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

async fn events(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(1000).min(MAX_EVENTS);
    let tracker = Arc::clone(&s.tracker);
    let events = blocking(move || tracker.events_since(Some(&upgrade), q.since, limit)).await?;
    Ok(Json(serde_json::to_value(events).unwrap_or_default()))
}

/// How often a stream looks for new events (they may come from other processes).
const STREAM_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// SSE: every event of the upgrade after `Last-Event-ID` (or `?since=`), as `progress_event`s
/// with `id: seq`, then new ones as they are committed (by any process); comments keep idle
/// connections alive. A reconnecting client resumes with no gap and no duplicate.
async fn event_stream(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<
    axum::response::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let since = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_input",
                    "Last-Event-ID must be a seq (a non-negative integer)",
                )
            })?,
        None => q.since,
    };
    // Unknown upgrades are a 404 before the stream starts.
    let tracker = Arc::clone(&s.tracker);
    let id = upgrade.clone();
    blocking(move || tracker.upgrade(&id)).await?;
    let tracker = Arc::clone(&s.tracker);
    let stream = futures_util::stream::unfold(
        (tracker, upgrade, since, std::collections::VecDeque::new()),
        |(tracker, upgrade, mut since, mut queue)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    let e: eks_upgrade_agent::model::ProgressEvent = e;
                    since = e.seq;
                    let data = json!({"type": "progress_event", "seq": e.seq, "data": e});
                    let event = Event::default()
                        .id(e.seq.to_string())
                        .event("progress_event")
                        .data(data.to_string());
                    return Some((Ok(event), (tracker, upgrade, since, queue)));
                }
                let t = Arc::clone(&tracker);
                let u = upgrade.clone();
                match tokio::task::spawn_blocking(move || t.events_since(Some(&u), since, 1000))
                    .await
                {
                    Ok(Ok(page)) if !page.is_empty() => queue.extend(page),
                    Ok(Ok(_)) => tokio::time::sleep(STREAM_POLL).await,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "event stream read failed");
                        tokio::time::sleep(STREAM_POLL).await;
                    }
                    Err(_) => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15))))
}
