//! The store protocol under `/api/v1/store`: the `ProgressStore` trait over HTTP, one route per
//! method, with the library's own types as JSON. `eks_upgrade_agent::store::remote::RemoteStore`
//! speaks it, so a `ProgressTracker` (and every `progress` command of the CLI with `--server`)
//! works against a server exactly as against a local store; the store conformance suite runs
//! against it.
//!
//! - `POST /api/v1/store/execute`: a JSON array of commands (the `apply` format), committed as
//!   one group; the answer has one entry per command, `{"ok": Committed}` or `{"error": {...}}`.
//!   At most [`MAX_EXECUTE_BODY`] bytes (`RemoteStore` splits larger batches).
//! - `POST /api/v1/store/import`: `{"upgrade", "tasks", "events"}` -> `{"last_seq"}`; at most
//!   [`MAX_IMPORT_BODY`] bytes.
//! - Event lists take `limit` up to [`crate::MAX_EVENTS`] (400 above); the upgrade and task
//!   lists are pages too (`?after=ID&limit=N`, at most 10,000), which `RemoteStore` follows.
//! - `GET /api/v1/store/upgrades[/{u}[/tasks[/{t}[/recent?limit=]]]]`, `GET .../events?
//!   upgrade_id=&since=&limit=`, `GET .../last_seq`, `GET .../task_history?cluster=&task_ids=`
//!   (ids space-separated, at most [`MAX_HISTORY_IDS`]).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use eks_upgrade_agent::model::{ProgressEvent, Task, Upgrade};
use eks_upgrade_agent::progress::Command;
use eks_upgrade_agent::store::domain::history::TaskHistory;
use eks_upgrade_agent::store::{EventQuery, MAX_PAGE};

use crate::error::{ApiError, ApiResult, blocking, json_body, limit_with, page_limit};
use crate::request_spans::UpgradesWritten;
use crate::{AppState, MAX_EXECUTE_BODY, MAX_IMPORT_BODY};

pub(crate) async fn execute(
    State(s): State<AppState>,
    body: Result<Json<Vec<Command>>, JsonRejection>,
) -> ApiResult<(Extension<UpgradesWritten>, Json<Vec<Value>>)> {
    let commands = json_body(body, MAX_EXECUTE_BODY)?;
    let upgrades: Vec<String> = commands.iter().map(|c| c.upgrade_id().to_owned()).collect();
    let tracker = Arc::clone(&s.tracker);
    let n = commands.len() as u64;
    // Through the tracker, so this server's callbacks (the stream hub) see the events at once.
    let results = blocking(move || tracker.execute_batch(&commands)).await?;
    s.metrics.updates.inc_by(n);
    // The request span's links: the upgrades of the commands that committed.
    let written = UpgradesWritten::of(
        upgrades
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(u, _)| u.as_str()),
    );
    Ok((
        Extension(written),
        Json(
            results
                .into_iter()
                .map(|r| match r {
                    Ok(c) => json!({ "ok": c }),
                    Err(e) => ApiError::from(e).to_json(),
                })
                .collect(),
        ),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportBody {
    upgrade: Upgrade,
    tasks: Vec<Task>,
    events: Vec<ProgressEvent>,
}

pub(crate) async fn import(
    State(s): State<AppState>,
    body: Result<Json<ImportBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let b = json_body(body, MAX_IMPORT_BODY)?;
    let tracker = Arc::clone(&s.tracker);
    let last = blocking(move || tracker.store().import(&b.upgrade, &b.tasks, &b.events)).await?;
    Ok(Json(json!({ "last_seq": last })))
}

/// `?after=` (an id) and `?limit=` (at most `MAX_PAGE`, the default) of the store's pages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

impl Page {
    fn limit(&self) -> ApiResult<usize> {
        limit_with(
            "limit",
            self.limit.unwrap_or(MAX_PAGE),
            "read the next page with after=<the last id you got>",
        )
    }
}

pub(crate) async fn upgrades(
    State(s): State<AppState>,
    q: Result<Query<Page>, QueryRejection>,
) -> ApiResult<Json<Vec<Upgrade>>> {
    let Query(q) = q?;
    let limit = q.limit()?;
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(
        blocking(move || tracker.store().upgrades_page(q.after.as_deref(), limit)).await?,
    ))
}

pub(crate) async fn upgrade(
    State(s): State<AppState>,
    Path(u): Path<String>,
) -> ApiResult<Json<Upgrade>> {
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(blocking(move || tracker.store().upgrade(&u)).await?))
}

pub(crate) async fn tasks(
    State(s): State<AppState>,
    Path(u): Path<String>,
    q: Result<Query<Page>, QueryRejection>,
) -> ApiResult<Json<Vec<Task>>> {
    let Query(q) = q?;
    let limit = q.limit()?;
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(
        blocking(move || tracker.store().tasks_page(&u, q.after.as_deref(), limit)).await?,
    ))
}

pub(crate) async fn task(
    State(s): State<AppState>,
    Path((u, t)): Path<(String, String)>,
) -> ApiResult<Json<Task>> {
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(blocking(move || tracker.store().task(&u, &t)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitQuery {
    limit: usize,
}

pub(crate) async fn recent(
    State(s): State<AppState>,
    Path((u, t)): Path<(String, String)>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<ProgressEvent>>> {
    let Query(q) = q?;
    let limit = page_limit("limit", q.limit)?;
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(
        blocking(move || tracker.store().recent_task_events(&u, &t, limit)).await?,
    ))
}

/// `?cluster=` and `?task_ids=` (space-separated: ids hold no whitespace) of `task_history`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    cluster: String,
    task_ids: String,
}

/// Most task ids one `task_history` request may name (`RemoteStore` sends them in chunks).
pub(crate) const MAX_HISTORY_IDS: usize = 1_000;

pub(crate) async fn task_history(
    State(s): State<AppState>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<TaskHistory>>> {
    let Query(q) = q?;
    let ids: Vec<String> = q.task_ids.split_whitespace().map(str::to_owned).collect();
    if ids.len() > MAX_HISTORY_IDS {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "task_ids names {} tasks; ask for at most {MAX_HISTORY_IDS} at a time",
                ids.len()
            ),
        ));
    }
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(
        blocking(move || {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            tracker.store().task_history(&q.cluster, &refs)
        })
        .await?,
    ))
}

pub(crate) async fn latest(
    State(s): State<AppState>,
    Path(u): Path<String>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<ProgressEvent>>> {
    let Query(q) = q?;
    let limit = page_limit("limit", q.limit)?;
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(
        blocking(move || tracker.store().latest_events(&u, limit)).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    upgrade_id: Option<String>,
    #[serde(default)]
    since: u64,
    limit: usize,
}

pub(crate) async fn events(
    State(s): State<AppState>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<ProgressEvent>>> {
    let Query(q) = q?;
    let query = EventQuery {
        upgrade_id: q.upgrade_id,
        since: q.since,
        limit: page_limit("limit", q.limit)?,
    };
    let tracker = Arc::clone(&s.tracker);
    Ok(Json(
        blocking(move || tracker.store().events(&query)).await?,
    ))
}

pub(crate) async fn last_seq(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let tracker = Arc::clone(&s.tracker);
    let last = blocking(move || tracker.store().last_seq()).await?;
    Ok(Json(json!({ "last_seq": last })))
}
