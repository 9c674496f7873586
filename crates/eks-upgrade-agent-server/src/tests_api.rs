//! `/api/v1/tests/...` and `GET /api/v1/upgrades/{u}/tests/compare`: test results as data
//! (issue #12) over [`TestResults`]. `POST /api/v1/tests/ingest` takes one JUnit XML report as
//! the raw body (streamed to a temporary file, then read twice: checked, then recorded), keeps
//! it as a `test_result` artifact when artifacts are enabled and answers the run (201). A
//! comparison answers 200 whatever its gate says (`gate.passed` tells).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use futures_util::TryStreamExt;
use serde_json::{Value, json};

use eks_upgrade_agent::model::{RunPhase, RunQuery};
use eks_upgrade_agent::results::{Ingest, KeepFiles, TestResults};

use crate::AppState;
use crate::error::{ApiError, ApiResult, blocking};

fn results(s: &AppState) -> ApiResult<Arc<TestResults>> {
    s.tests.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "test results are not enabled on this server",
        )
    })
}

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", m)
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn phase(q: &HashMap<String, String>) -> ApiResult<Option<RunPhase>> {
    q.get("phase")
        .map(|p| p.parse::<RunPhase>().map_err(|e| invalid(e.to_string())))
        .transpose()
}

fn number<T: std::str::FromStr>(q: &HashMap<String, String>, key: &str) -> ApiResult<Option<T>> {
    q.get(key)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| invalid(format!("invalid {key} {v:?}: give a whole number")))
        })
        .transpose()
}

async fn answer<T: serde::Serialize + Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&TestResults) -> eks_upgrade_agent::Result<T> + Send + 'static,
) -> ApiResult<Json<Value>> {
    let r = results(s)?;
    let v = blocking(move || f(&r)).await?;
    Ok(Json(to_json(&v)))
}

/// `GET /api/v1/tests/runs?upgrade=&cluster=&phase=&limit=`: runs, newest first.
pub(crate) async fn runs(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let query = RunQuery {
        upgrade_id: q.get("upgrade").cloned(),
        cluster_name: q.get("cluster").cloned(),
        phase: phase(&q)?,
        limit: number(&q, "limit")?.unwrap_or(0),
    };
    answer(&s, move |r| r.runs(&query)).await
}

/// `GET /api/v1/tests/runs/{run}`: the run and its failures (with messages).
pub(crate) async fn show_run(
    State(s): State<AppState>,
    Path(run): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |r| {
        let run = r.run(&run)?;
        let failures = r.results(&run.run_id, true)?;
        Ok(json!({ "run": run, "failures": failures }))
    })
    .await
}

/// `GET /api/v1/tests/runs/{run}/results?failing=true`: every result of a run.
pub(crate) async fn run_results(
    State(s): State<AppState>,
    Path(run): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let failing = match q.get("failing").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(invalid(format!(
                "invalid failing {v:?}: give true or false"
            )));
        }
    };
    answer(&s, move |r| r.results(&run, failing)).await
}

/// `GET /api/v1/tests/compare?a=RUN&b=RUN`.
pub(crate) async fn compare(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let (Some(a), Some(b)) = (q.get("a").cloned(), q.get("b").cloned()) else {
        return Err(invalid("give the two runs to compare: ?a=RUN&b=RUN"));
    };
    answer(&s, move |r| r.compare(&a, &b)).await
}

/// `GET /api/v1/upgrades/{upgrade}/tests/compare`: the upgrade's latest pre run against its
/// latest post run.
pub(crate) async fn compare_upgrade(
    State(s): State<AppState>,
    Path(upgrade): Path<String>,
) -> ApiResult<Json<Value>> {
    answer(&s, move |r| r.compare_upgrade(&upgrade)).await
}

/// `GET /api/v1/tests/history?name=&cluster=&limit=`.
pub(crate) async fn history(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let Some(name) = q.get("name").cloned() else {
        return Err(invalid(
            "give the test: ?name=NAME (a test name or test id)",
        ));
    };
    let cluster = q.get("cluster").cloned();
    let limit = number(&q, "limit")?.unwrap_or(0);
    answer(&s, move |r| r.history(&name, cluster.as_deref(), limit)).await
}

/// `GET /api/v1/tests/flaky?cluster=&days=`.
pub(crate) async fn flaky(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let cluster = q.get("cluster").cloned();
    let days = number(&q, "days")?;
    answer(&s, move |r| r.flaky(cluster.as_deref(), days)).await
}

/// `POST /api/v1/tests/ingest?upgrade=U&phase=P[&suite=][&framework=][&name=FILE]`, the body
/// one JUnit XML report.
pub(crate) async fn ingest(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Query(q) = q?;
    let r = results(&s)?;
    let Some(upgrade) = q.get("upgrade").cloned() else {
        return Err(invalid("give the upgrade: ?upgrade=U&phase=pre|post|adhoc"));
    };
    let Some(phase) = phase(&q)? else {
        return Err(invalid("give the phase: ?phase=pre|post|adhoc"));
    };
    let name = q.get("name").cloned().unwrap_or_else(|| "junit.xml".into());
    if name.is_empty() || name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "invalid file name {name:?}: give a plain file name such as junit.xml"
        )));
    }
    let suite = q.get("suite").cloned();
    let framework = q.get("framework").cloned();
    let tracker = Arc::clone(&s.tracker);
    let artifacts = s.artifacts.clone();
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::StreamReader::new(stream);
    let run = blocking(move || {
        let cluster = tracker.upgrade(&upgrade)?.cluster_name;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(&name);
        {
            let mut file = std::fs::File::create(&path)?;
            let mut body = tokio_util::io::SyncIoBridge::new(reader);
            std::io::copy(&mut body, &mut file).map_err(|e| {
                eks_upgrade_agent::Error::InvalidInput(format!(
                    "the request body ended early ({e}); nothing was stored: send the report again"
                ))
            })?;
            file.flush()?;
        }
        let ingest = Ingest {
            upgrade_id: upgrade,
            cluster_name: cluster,
            phase,
            suite,
            framework,
            labels: vec![name],
        };
        let keep = artifacts.as_deref().map(|a| KeepFiles {
            artifacts: a,
            session_id: None,
            collection_id: None,
            options: None,
        });
        r.ingest(&[path], &ingest, keep)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(to_json(&run))))
}
