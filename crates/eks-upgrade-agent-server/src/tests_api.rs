//! `/api/v1/tests/...` and `GET /api/v1/upgrades/{u}/tests/compare`: test results as data
//! (issue #12) over [`TestResults`]. `POST /api/v1/tests/ingest` takes one JUnit XML report as
//! the raw body (streamed to a temporary file, then read twice: checked, then recorded), keeps
//! it as a `test_result` artifact when artifacts are enabled (on a data dir always, on a
//! database when S3 is configured) and answers the run (201). A
//! comparison answers 200 whatever its gate says (`gate.passed` tells).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::TryStreamExt;
use serde_json::{Value, json};

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::artifacts::AddOptions;
use eks_upgrade_agent::model::{ArtifactType, RunPhase, RunQuery};
use eks_upgrade_agent::results::{Ingest, KeepFiles, TestResults, junit};
use eks_upgrade_agent::store::IdKind;

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

/// A request body that fails once more than `left` bytes came, remembering that it did.
struct Capped<R> {
    inner: R,
    left: u64,
    over: Arc<AtomicBool>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = usize::try_from(self.left.saturating_add(1))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..room])?;
        if n as u64 > self.left {
            self.over.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("the report is over the ingest limit"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// 413: the report is over the server's ingest limit.
fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "the report is larger than this server's ingest limit of {limit} bytes ({} MiB); \
             nothing was stored: split the report, or raise the server's --max-ingest-bytes",
            limit / (1024 * 1024)
        ),
    )
}

/// A report body received into a temporary directory (removed on drop).
pub(crate) struct Received {
    _dir: tempfile::TempDir,
    /// The file.
    pub(crate) path: std::path::PathBuf,
}

/// Streams `body` to a temporary file named `file_name`, refusing (413) more than the
/// server's `max_ingest_bytes` (at once when `Content-Length` says so); `then` runs on the
/// file in the same blocking task.
pub(crate) async fn receive<T: Send + 'static>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    file_name: &str,
    then: impl FnOnce(&Received) -> eks_upgrade_agent::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let limit = s.serve_options.max_ingest_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::StreamReader::new(stream);
    let over = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&over);
    let file_name = file_name.to_owned();
    let out = blocking(move || {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(&file_name);
        {
            let mut file = std::fs::File::create(&path)?;
            let mut body = Capped {
                inner: tokio_util::io::SyncIoBridge::new(reader),
                left: limit,
                over: seen,
            };
            std::io::copy(&mut body, &mut file).map_err(|e| {
                eks_upgrade_agent::Error::InvalidInput(format!(
                    "the request body ended early ({e}); nothing was stored: send the report again"
                ))
            })?;
            file.flush()?;
        }
        then(&Received { _dir: dir, path })
    })
    .await;
    if over.load(Ordering::SeqCst) {
        return Err(too_large(limit));
    }
    out
}

/// `POST /api/v1/tests/ingest?upgrade=U&phase=P[&suite=][&framework=][&name=FILE]`, the body
/// one JUnit XML report (at most the server's `max_ingest_bytes`, else 413).
pub(crate) async fn ingest(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
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
    let given = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let (session, collection) = (given("session"), given("collection"));
    let cluster = given("cluster");
    let label = name.clone();
    // A collection without its session is refused from the query, before the body is spooled
    // (up to the ingest limit); the CLI never sends it (it refuses --collection without
    // --session), and the server's layer draining unread bodies lets a streaming client read it.
    if collection.is_some() && session.is_none() {
        return Err(invalid(
            "a collection is given with its session: add ?session=S, or drop ?collection",
        ));
    }
    // The upgrade, session and collection are looked up once the body is in: a refusal sent
    // while the client still writes would reach it as a broken pipe, not as this answer.
    let run = receive(&s, &headers, body, &name, move |file| {
        // Refused once the body is in until the server drains an unread body before answering
        // (a CLI streaming its report got a broken pipe instead of this answer).
        if artifacts.is_none() && session.is_some() {
            return Err(eks_upgrade_agent::Error::InvalidInput(
                "artifacts are off on this server (on a database they are kept in S3: start \
                 it with --s3-bucket), so the report cannot be kept in a session: drop \
                 ?session and ?collection to record the run without keeping the report"
                    .into(),
            ));
        }
        let cluster = match cluster {
            Some(c) => c,
            None => tracker.upgrade(&upgrade)?.cluster_name,
        };
        // The session and collection as given (ids or their prefixes), resolved as the CLI does.
        let (session, collection) = match (&artifacts, session) {
            (Some(a), Some(sid)) => {
                let s = a.resolve_id(IdKind::Session, &sid)?;
                let c = collection
                    .map(|c| a.resolve_id(IdKind::Collection, &c))
                    .transpose()?;
                (Some(s), c)
            }
            _ => (None, None),
        };
        let ingest = Ingest {
            upgrade_id: upgrade,
            cluster_name: cluster,
            phase,
            suite,
            framework,
            labels: vec![label],
        };
        let keep = artifacts.as_deref().map(|a| KeepFiles {
            artifacts: a,
            session_id: session.as_deref(),
            collection_id: collection.as_deref(),
            options: None,
        });
        r.ingest(std::slice::from_ref(&file.path), &ingest, keep)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(to_json(&run))))
}

/// `POST .../artifacts?name=FILE&type=test_result&phase=P...`: an upload with a phase. A JUnit
/// XML body is kept and recorded as a run of the session's upgrade, as `artifacts add --phase`
/// does (201: the artifact, with the run as `test_run`); an `.xml` body that is not a report
/// is a 422 naming the line and nothing is stored; any other body is only kept.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn upload_with_phase(
    s: &AppState,
    m: Arc<TestArtifactsManager>,
    session: String,
    collection: String,
    name: String,
    mut opts: AddOptions,
    phase: RunPhase,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if opts.artifact_type != Some(ArtifactType::TestResult) {
        return Err(invalid(
            "phase records test results: give it with type=test_result",
        ));
    }
    let r = results(s)?;
    let label = name.clone();
    let (artifact, run) = receive(s, headers, body, "report", move |file| {
        let path = &file.path;
        if junit::is_junit(path)? {
            let sess = m.session(&session)?;
            opts.name = Some(label.clone());
            let ingest = Ingest {
                upgrade_id: sess.upgrade_id.clone(),
                cluster_name: sess.cluster_name.clone(),
                phase,
                suite: None,
                framework: None,
                labels: vec![label],
            };
            let run = r.ingest(
                std::slice::from_ref(path),
                &ingest,
                Some(KeepFiles {
                    artifacts: &m,
                    session_id: Some(&session),
                    collection_id: Some(&collection),
                    options: Some(&opts),
                }),
            )?;
            let artifact = m.artifact(&run.artifact_ids[0])?;
            return Ok((artifact, Some(run)));
        }
        if label.to_ascii_lowercase().ends_with(".xml") {
            junit::parse_file(path, &label, &Default::default(), &mut |_| Ok(()))?;
            return Err(eks_upgrade_agent::Error::InvalidInput(format!(
                "{label}: not a JUnit XML report (its root is not <testsuites> or <testsuite>); \
                 nothing was stored"
            )));
        }
        let mut f = std::fs::File::open(path)?;
        Ok((
            m.add_reader(&session, &collection, &mut f, &label, &opts)?,
            None,
        ))
    })
    .await?;
    let mut v = to_json(&artifact);
    if let (Some(run), Value::Object(o)) = (run, &mut v) {
        o.insert("test_run".into(), to_json(&run));
    }
    Ok((StatusCode::CREATED, Json(v)))
}
