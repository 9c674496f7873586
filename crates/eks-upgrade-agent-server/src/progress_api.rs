//! Progress routes: upgrades, tasks, events.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use eks_upgrade_agent::model::{EventKind, ProgressSummary};
use eks_upgrade_agent::progress::Command;
use eks_upgrade_agent::store::{Committed, MAX_PAGE};

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking, limit_with, page_limit};
use crate::request_spans::UpgradesWritten;

/// An optional JSON body: empty means none.
fn optional_json(body: Result<Bytes, BytesRejection>) -> ApiResult<Option<Json<Value>>> {
    let bytes = body?;
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
    // Group commit with the other requests committing now (see `committer`).
    let committed = state.committer.execute(c).await?;
    state.metrics.updates.inc();
    Ok(committed)
}

/// `?limit=` (at most [`MAX_PAGE`], the default) and `?cursor=` (from `X-Next-Cursor`) of a
/// paged listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// Accepted for browser clients (see `auth`).
    #[serde(rename = "access_token")]
    _access_token: Option<String>,
}

impl PageQuery {
    fn limit(&self) -> ApiResult<usize> {
        limit_with(
            "limit",
            self.limit.unwrap_or(MAX_PAGE),
            "read the next page with cursor=<its X-Next-Cursor>",
        )
    }
}

/// A JSON array answer, with `X-Next-Cursor` when the page is full (there may be more).
fn paged<T: serde::Serialize>(items: &[T], limit: usize, cursor: Option<&str>) -> Response {
    let mut resp = Json(serde_json::to_value(items).unwrap_or_default()).into_response();
    if items.len() >= limit
        && let Some(c) = cursor.and_then(|c| HeaderValue::from_str(c).ok())
    {
        resp.headers_mut().insert("x-next-cursor", c);
    }
    resp
}

pub(crate) async fn list_upgrades(
    State(s): State<AppState>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit()?;
    let tracker = Arc::clone(&s.tracker);
    let summaries: Vec<ProgressSummary> = blocking(move || {
        tracker
            .upgrades_page(q.cursor.as_deref(), limit)?
            .iter()
            .map(|u| tracker.summary_of(u))
            .collect()
    })
    .await?;
    let last = summaries.last().map(|u| u.upgrade_id.as_str());
    Ok(paged(&summaries, limit, last))
}

/// `GET /api/v1/upgrades/{u}/tasks`: the tasks, a page at a time.
pub(crate) async fn list_tasks(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit()?;
    let tracker = Arc::clone(&s.tracker);
    let tasks = blocking(move || tracker.tasks_page(&upgrade, q.cursor.as_deref(), limit)).await?;
    let last = tasks.last().map(|t| t.task_id.as_str());
    Ok(paged(&tasks, limit, last))
}

pub(crate) async fn create_upgrade(
    State(s): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Extension<UpgradesWritten>, Json<Value>)> {
    let body = object(Some(body?))?;
    let c = command(body, "upgrade.create", &[])?;
    let id = c.upgrade_id().to_owned();
    let committed = execute(&s, c).await?;
    Ok((
        StatusCode::CREATED,
        // The request span's link to the new upgrade's trace (the path does not name it).
        Extension(UpgradesWritten::of([id.as_str()])),
        Json(summary_json(&s, &id, committed.last_seq()).await?),
    ))
}

pub(crate) async fn summary_json(s: &AppState, upgrade: &str, seq: u64) -> ApiResult<Value> {
    let tracker = Arc::clone(&s.tracker);
    let id = upgrade.to_owned();
    let summary = blocking(move || tracker.summary(&id)).await?;
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    v["seq"] = json!(seq);
    Ok(v)
}

/// The summary with the first [`MAX_PAGE`] tasks; when there are more, `tasks_next_cursor`
/// (and `X-Next-Cursor`) leads to `GET .../tasks?cursor=`.
pub(crate) async fn show_upgrade(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
) -> ApiResult<Response> {
    let tracker = Arc::clone(&s.tracker);
    let (summary, tasks) = blocking(move || {
        Ok((
            tracker.summary(&upgrade)?,
            tracker.tasks_page(&upgrade, None, MAX_PAGE)?,
        ))
    })
    .await?;
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    let next = (tasks.len() >= MAX_PAGE)
        .then(|| tasks.last().map(|t| t.task_id.clone()))
        .flatten();
    v["tasks"] = serde_json::to_value(tasks).unwrap_or_default();
    if let Some(c) = &next {
        v["tasks_next_cursor"] = json!(c);
    }
    let mut resp = Json(v).into_response();
    if let Some(c) = next.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("x-next-cursor", c);
    }
    Ok(resp)
}

pub(crate) async fn upgrade_op(
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

pub(crate) async fn add_tasks(
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

pub(crate) async fn show_task(
    State(s): State<AppState>,
    Path((upgrade, task)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let tracker = Arc::clone(&s.tracker);
    let detail = blocking(move || tracker.task_detail(&upgrade, &task)).await?;
    Ok(Json(serde_json::to_value(detail).unwrap_or_default()))
}

/// `?kind=` (comma-separated wire names) and `?limit=` of a task's events.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskEventsQuery {
    kind: Option<String>,
    limit: Option<usize>,
    /// Accepted for browser clients (see `auth`).
    #[serde(rename = "access_token")]
    _access_token: Option<String>,
}

/// `GET /api/v1/upgrades/{u}/tasks/{t}/events`: the task's events, newest first (at most
/// `limit`, 1000 by default), only the kinds in `kind` when given. The dashboard reads a task's
/// retry history here (`kind=task.failed,task.retried`). The task's newest [`MAX_PAGE`] events
/// are read.
pub(crate) async fn task_events(
    State(s): State<AppState>,
    Path((upgrade, task)): Path<(String, String)>,
    q: Result<Query<TaskEventsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let limit = limit_with(
        "limit",
        q.limit.unwrap_or(1000),
        "the newest events come first; filter with kind=",
    )?;
    let kinds = match q.kind.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|k| {
                    let k = k.trim();
                    EventKind::ALL
                        .into_iter()
                        .find(|e| e.as_str() == k)
                        .ok_or_else(|| {
                            ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "invalid_query",
                                format!(
                                    "unknown event kind {k:?}: expected one of {}",
                                    EventKind::ALL.map(EventKind::as_str).join(", ")
                                ),
                            )
                        })
                })
                .collect::<ApiResult<Vec<_>>>()?,
        ),
    };
    let tracker = Arc::clone(&s.tracker);
    let events = blocking(move || {
        let all = tracker
            .store()
            .recent_task_events(&upgrade, &task, MAX_PAGE)?;
        Ok(all
            .into_iter()
            .filter(|e| kinds.as_ref().is_none_or(|k| k.contains(&e.kind)))
            .take(limit)
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(serde_json::to_value(events).unwrap_or_default()))
}

pub(crate) async fn task_op(
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
    let mut committed = execute(&s, c).await?;
    // The task alone (its recent events are not part of this answer), as the command left
    // it; read only from a store that does not say (none of ours).
    let task = match committed.task.take() {
        Some(t) => t,
        None => {
            let tracker = Arc::clone(&s.tracker);
            blocking(move || tracker.store().task(&upgrade, &task)).await?
        }
    };
    let mut v = serde_json::to_value(task).unwrap_or_default();
    v["seq"] = json!(committed.last_seq());
    // What the operation committed (the task's own event first, then its ancestors'), as
    // `progress apply --ack-events` acknowledges it.
    v["events"] = serde_json::to_value(&committed.events).unwrap_or_default();
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
    latest: Option<usize>,
}

pub(crate) async fn events(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let tracker = Arc::clone(&s.tracker);
    let events = match q.latest {
        Some(_) if q.since != 0 || q.limit.is_some() => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "latest=N cannot be combined with since or limit",
            ));
        }
        Some(n) => {
            let n = page_limit("latest", n)?;
            blocking(move || tracker.store().latest_events(&upgrade, n)).await?
        }
        None => {
            let limit = page_limit("limit", q.limit.unwrap_or(1000))?;
            blocking(move || tracker.events_since(Some(&upgrade), q.since, limit)).await?
        }
    };
    Ok(Json(serde_json::to_value(events).unwrap_or_default()))
}
