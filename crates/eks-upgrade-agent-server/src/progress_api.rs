//! Progress routes: upgrades, tasks, events.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use eks_upgrade_agent::model::ProgressSummary;
use eks_upgrade_agent::progress::Command;
use eks_upgrade_agent::store::Committed;

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking, page_limit};

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

pub(crate) async fn list_upgrades(
    State(s): State<AppState>,
) -> ApiResult<Json<Vec<ProgressSummary>>> {
    let tracker = Arc::clone(&s.tracker);
    let list = blocking(move || tracker.list_upgrades()).await?;
    let now = eks_upgrade_agent::model::now();
    Ok(Json(
        list.iter().map(|u| ProgressSummary::of(u, now)).collect(),
    ))
}

pub(crate) async fn create_upgrade(
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

pub(crate) async fn summary_json(s: &AppState, upgrade: &str, seq: u64) -> ApiResult<Value> {
    let tracker = Arc::clone(&s.tracker);
    let id = upgrade.to_owned();
    let summary = blocking(move || tracker.summary(&id)).await?;
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    v["seq"] = json!(seq);
    Ok(v)
}

pub(crate) async fn show_upgrade(
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
    let committed = execute(&s, c).await?;
    let tracker = Arc::clone(&s.tracker);
    let detail = blocking(move || tracker.task_detail(&upgrade, &task)).await?;
    let mut v = serde_json::to_value(detail.task).unwrap_or_default();
    v["seq"] = json!(committed.last_seq());
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
