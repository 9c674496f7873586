//! Handler tests through `router(...).oneshot(...)` on a real SQLite store, and one end-to-end
//! request over TCP on 127.0.0.1.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};
use eks_upgrade_agent_server::{AppState, router};

fn state(dir: &std::path::Path) -> AppState {
    let store = SqliteStore::open(dir, &SqliteOptions::default()).unwrap();
    AppState {
        tracker: Arc::new(ProgressTracker::new(Arc::new(store))),
    }
}

async fn call(s: &AppState, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

#[tokio::test]
async fn progress_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (st, v) = call(
        &s,
        "POST",
        "/api/v1/upgrades",
        Some(r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"prod","metadata":{"to":"1.30"}}"#),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "not_started");
    let (st, _) = call(
        &s,
        "POST",
        "/api/v1/upgrades/u1/start",
        Some(r#"{"phase":"plan"}"#),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = call(
        &s,
        "POST",
        "/api/v1/upgrades/u1/tasks",
        Some(r#"[{"task_id":"a","name":"A","task_type":"upgrade_step"},{"task_id":"b","name":"B","task_type":"validation","parent_task_id":"a"}]"#),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 2);
    let (st, v) = call(
        &s,
        "POST",
        "/api/v1/upgrades/u1/tasks/b/update",
        Some(r#"{"percentage":40,"message":"m","details":{"k":1}}"#),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["percentage"].as_f64(), v["status"].as_str()),
        (Some(40.0), Some("in_progress"))
    );
    let (st, _) = call(&s, "POST", "/api/v1/upgrades/u1/tasks/b/complete", None).await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = call(&s, "GET", "/api/v1/upgrades/u1", None).await;
    assert_eq!(v["current_phase"], "plan");
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(v["overall_progress"], 100.0);
    let (_, v) = call(&s, "GET", "/api/v1/upgrades/u1/tasks/b", None).await;
    assert_eq!(v["recent_events"][0]["kind"], "task.completed");
    let (_, all) = call(&s, "GET", "/api/v1/upgrades/u1/events", None).await;
    let seqs: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let (_, after) = call(
        &s,
        "GET",
        &format!("/api/v1/upgrades/u1/events?since={}&limit=2", seqs[1]),
        None,
    )
    .await;
    let after: Vec<u64> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(after, seqs[2..4]);
    let (_, list) = call(&s, "GET", "/api/v1/upgrades", None).await;
    assert_eq!(list[0]["upgrade_id"], "u1");
    let (st, v) = call(&s, "GET", "/healthz", None).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
}

#[tokio::test]
async fn bad_requests_say_what_to_fix_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    call(
        &s,
        "POST",
        "/api/v1/upgrades",
        Some(r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#),
    )
    .await;
    call(
        &s,
        "POST",
        "/api/v1/upgrades/u1/tasks",
        Some(r#"{"task_id":"a","name":"A","task_type":"cleanup"}"#),
    )
    .await;
    let (_, before) = call(&s, "GET", "/api/v1/upgrades/u1/events", None).await;
    let big = format!(
        r#"{{"percentage":1,"message":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let cases: Vec<(&str, String, Option<String>, StatusCode, &str)> = vec![
        (
            "POST",
            "/api/v1/upgrades".into(),
            Some("{not json".into()),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "POST",
            "/api/v1/upgrades".into(),
            Some(r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#.into()),
            StatusCode::CONFLICT,
            "already_exists",
        ),
        (
            "POST",
            "/api/v1/upgrades/nope/start".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/ghost/start".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/a/update".into(),
            Some(r#"{"percentage":101}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/a/update".into(),
            Some(r#"{"percentage":"half"}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/a/update".into(),
            Some(r#"{"percentage":5,"task_id":"b"}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/a/resume".into(),
            None,
            StatusCode::CONFLICT,
            "invalid_transition",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/a/explode".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/complete".into(),
            None,
            StatusCode::CONFLICT,
            "invalid_transition",
        ),
        (
            "POST",
            "/api/v1/upgrades/u1/tasks/a/update".into(),
            Some(big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            "GET",
            "/api/v1/nothing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (method, uri, body, want, code) in cases {
        let (st, v) = call(&s, method, &uri, body.as_deref()).await;
        assert_eq!(st, want, "{method} {uri}: {v}");
        assert_eq!(v["error"]["code"], code, "{method} {uri}: {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{v}"
        );
    }
    let (_, after) = call(&s, "GET", "/api/v1/upgrades/u1/events", None).await;
    assert_eq!(after, before, "rejected requests changed nothing");
    let _ = json!(null);
}

#[tokio::test]
async fn serves_over_tcp_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(eks_upgrade_agent_server::serve(listener, s, async {
        let _ = rx.await;
    }));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(r#"{"status":"ok"}"#), "{resp}");
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
