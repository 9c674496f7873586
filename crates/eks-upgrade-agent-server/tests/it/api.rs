//! Handler tests through `router(...).oneshot(...)` on a real SQLite store, and one end-to-end
//! request over TCP on 127.0.0.1.

use crate::util::state;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use eks_upgrade_agent_server::{AppState, router};

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

/// The `/metrics` page.
pub(crate) async fn metrics_text(s: &AppState) -> String {
    let req = Request::get("/metrics").body(Body::empty()).unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
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
    assert_eq!(v["overall_percentage"], 100.0);
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

/// README "Server": `/metrics` counts the events the streams see (any writer) and the last seq.
#[tokio::test]
async fn metrics_count_the_events_streams_see() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let server = crate::util::Server::start(s.clone()).await;
    // Once `/healthz` answers over TCP, the hub follows the store.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let counter = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(counter(&metrics_text(&s).await, "eua_events_total"), 0);
    // The hub reads for its clients: one is connected (see `stream.rs` for the idle hub).
    let mut ws = crate::util::ws_connect(&server.ws_url("/api/v1/ws")).await;
    crate::util::next_json(&mut ws).await;
    crate::util::seed(&s.tracker, "u1");
    for p in [10, 20, 30, 40, 50] {
        s.tracker
            .update_task("u1", "a", f64::from(p), None, Default::default())
            .unwrap();
    }
    let last = s.tracker.store().last_seq().unwrap();
    assert_eq!(last, 8);
    let start = std::time::Instant::now();
    loop {
        let text = metrics_text(&s).await;
        if counter(&text, "eua_last_seq") == last {
            assert_eq!(counter(&text, "eua_events_total"), last, "{text}");
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the hub never published seq {last}:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
    assert!(resp.contains(r#"{"status":"ok","last_seq":0}"#), "{resp}");
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Reads SSE frames from `body` until `n` events arrived; returns their ids.
async fn read_events(body: &mut Body, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut text = String::new();
    while ids.len() < n {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
            .await
            .expect("an event within 10 s")
            .expect("the stream stays open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: ")) {
                    assert!(block.contains("event: progress_event"), "{block}");
                    assert!(block.contains("\"type\":\"progress_event\""), "{block}");
                    ids.push(id.parse().unwrap());
                }
            }
        }
    }
    ids
}

#[tokio::test]
async fn sse_replays_follows_and_resumes_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    call(
        &s,
        "POST",
        "/api/v1/upgrades",
        Some(r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#),
    )
    .await;
    call(&s, "POST", "/api/v1/upgrades/u1/start", None).await;
    call(
        &s,
        "POST",
        "/api/v1/upgrades/u1/tasks",
        Some(r#"{"task_id":"a","name":"A","task_type":"cleanup"}"#),
    )
    .await;
    let open = |last: Option<u64>| {
        let mut req = Request::builder().uri("/api/v1/upgrades/u1/events/stream");
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        router(s.clone()).oneshot(req.body(Body::empty()).unwrap())
    };
    let resp = open(None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = read_events(&mut body, 3).await;
    // A change committed now (another process would do the same) arrives live.
    let tracker = s.tracker.clone();
    tokio::task::spawn_blocking(move || {
        tracker
            .update_task("u1", "a", 10.0, Some("live"), Default::default())
            .unwrap()
    })
    .await
    .unwrap();
    let live = read_events(&mut body, 1).await;
    assert!(live[0] > first[2]);
    drop(body);
    // Resume after the second event: exactly the rest, no gap, no duplicate.
    let mut body = open(Some(first[1])).await.unwrap().into_body();
    let resumed = read_events(&mut body, 2).await;
    assert_eq!(resumed, [first[2], live[0]]);
    // Bad Last-Event-ID and unknown upgrades are errors, not streams.
    let req = Request::builder()
        .uri("/api/v1/upgrades/u1/events/stream")
        .header("last-event-id", "yesterday")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        router(s.clone()).oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let (st, v) = call(&s, "GET", "/api/v1/upgrades/nope/events/stream", None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn openapi_describes_every_served_route() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (st, doc) = call(&s, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{}", paths.len());
    let mut operations = 0;
    for (path, item) in paths {
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let uri = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "x" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            let resp = router(s.clone()).oneshot(req).await.unwrap();
            if resp
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "text/event-stream")
            {
                continue; // a live stream: served, and it never ends
            }
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("no such route"),
                "{method} {path} is described but not served"
            );
        }
    }
    assert!(operations >= 25, "{operations}");
    // Routes that are not described are not served either.
    let (st, v) = call(&s, "GET", "/api/v1/undocumented", None).await;
    assert_eq!(
        (st, v["error"]["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("no such route"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_grouped_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    crate::util::seed(&s.tracker, "u1");
    let before = s.tracker.store().last_seq().unwrap();
    // 64 concurrent updates; every fourth is invalid and must fail without taking others along.
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let pct = if i % 4 == 3 { 150 } else { i };
                let body = format!(r#"{{"percentage":{pct}}}"#);
                call(
                    &s,
                    "POST",
                    "/api/v1/upgrades/u1/tasks/a/update",
                    Some(&body),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for (i, c) in calls.into_iter().enumerate() {
        let (st, v) = c.await.unwrap();
        if i % 4 == 3 {
            assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
            assert_eq!(v["error"]["code"], "invalid_input");
        } else {
            assert_eq!(st, StatusCode::OK, "{v}");
            ok += 1;
        }
    }
    let events = s.tracker.events_since(Some("u1"), before, 1000).unwrap();
    assert_eq!(
        events.len(),
        ok,
        "one event per accepted update, none for the rejected ones"
    );
    // Grouped: the 64 commands took fewer transactions than requests (`/metrics` counts both).
    let text = metrics_text(&s).await;
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(counter("eua_progress_updates_total"), ok as u64);
    let commits = counter("eua_progress_commits_total");
    assert!(
        (1..64).contains(&commits),
        "64 concurrent updates took {commits} transactions"
    );
}

#[tokio::test]
async fn events_latest_gives_the_newest_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    crate::util::seed(&s.tracker, "u1");
    for p in [10, 20, 30] {
        let body = format!(r#"{{"percentage":{p}}}"#);
        call(
            &s,
            "POST",
            "/api/v1/upgrades/u1/tasks/a/update",
            Some(&body),
        )
        .await;
    }
    let (_, all) = call(&s, "GET", "/api/v1/upgrades/u1/events", None).await;
    let all = all.as_array().unwrap().clone();
    let (st, latest) = call(&s, "GET", "/api/v1/upgrades/u1/events?latest=2", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(latest.as_array().unwrap()[..], all[all.len() - 2..]);
    let (st, v) = call(
        &s,
        "GET",
        "/api/v1/upgrades/u1/events?latest=2&since=1",
        None,
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    let (st, _) = call(&s, "GET", "/api/v1/upgrades/nope/events?latest=2", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Bodies and pages are bounded: the store protocol's execute (4 MiB) and import (16 MiB)
/// refuse larger bodies with 413 naming the limit; event pages above 10,000 are a 400 naming the
/// maximum (they were silently cut before).
#[tokio::test]
async fn bodies_and_pages_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    crate::util::seed(&s.tracker, "u1");
    for (uri, size, limit) in [
        ("/api/v1/store/execute", 5 * 1024 * 1024, "4194304"),
        ("/api/v1/store/import", 17 * 1024 * 1024, "16777216"),
        ("/api/v1/upgrades", 2 * 1024 * 1024, "1048576"),
    ] {
        let body = format!("[\"{}\"]", "x".repeat(size));
        let (st, v) = call(&s, "POST", uri, Some(&body)).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {v}");
        assert_eq!(v["error"]["code"], "too_large");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(limit), "{uri}: {msg}");
    }
    for uri in [
        "/api/v1/upgrades/u1/events?limit=10001",
        "/api/v1/upgrades/u1/events?latest=10001",
        "/api/v1/store/events?limit=10001",
        "/api/v1/store/upgrades/u1/latest?limit=10001",
        "/api/v1/store/upgrades/u1/tasks/a/recent?limit=10001",
    ] {
        let (st, v) = call(&s, "GET", uri, None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("at most 10000") && msg.contains("since="),
            "{uri}: {msg}"
        );
    }
    let (st, v) = call(&s, "GET", "/api/v1/upgrades/u1/events?limit=10000", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 3);
}

/// Every error has the one JSON shape, including axum's own rejections (they were
/// `text/plain` or empty).
#[tokio::test]
async fn every_rejection_has_the_json_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    crate::util::seed(&s.tracker, "u1");
    for (method, uri, status) in [
        ("GET", "/api/v1/upgrades/%FF", 400),
        ("GET", "/api/v1/upgrades/u1/tasks/%FF%FE", 400),
        ("POST", "/api/v1/upgrades/u1/tasks/%C3%28/start", 400),
        ("GET", "/api/v1/artifacts/%FF", 400),
        ("GET", "/api/v1/ws", 400),
        ("GET", "/api/v1/upgrades/u1/ws", 400),
        ("PUT", "/api/v1/upgrades", 405),
        ("DELETE", "/api/v1/upgrades/u1", 405),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let resp = router(s.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {uri}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{method} {uri}"
        );
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !msg.is_empty() && v["error"]["code"].is_string(),
            "{uri}: {v}"
        );
        assert!(!msg.starts_with(char::is_uppercase), "{uri}: {msg}");
    }
}

/// Listings of upgrades and tasks are pages of at most 10,000, linked by `X-Next-Cursor`; an
/// upgrade's summary carries its first 10,000 tasks and a `tasks_next_cursor` (they were whole
/// lists, as large as the store).
#[tokio::test]
async fn upgrade_and_task_listings_are_pages() {
    use eks_upgrade_agent::model::TaskType;
    use eks_upgrade_agent::progress::NewTask;
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    for i in 0..3 {
        crate::util::seed(&s.tracker, &format!("u{i}"));
    }
    let get = |uri: String| {
        let s = s.clone();
        async move {
            let req = Request::builder().uri(&uri).body(Body::empty()).unwrap();
            let resp = router(s).oneshot(req).await.unwrap();
            let status = resp.status();
            let next = resp
                .headers()
                .get("x-next-cursor")
                .map(|v| v.to_str().unwrap().to_owned());
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                next,
                serde_json::from_slice::<Value>(&bytes).unwrap(),
            )
        }
    };
    let (st, next, v) = get("/api/v1/upgrades?limit=2".into()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 2);
    let next = next.expect("a full page names the next");
    let (_, after, v) = get(format!("/api/v1/upgrades?limit=2&cursor={next}")).await;
    assert_eq!(v[0]["upgrade_id"], "u2");
    assert_eq!(after, None, "the last page names none");
    for (uri, next) in [
        ("/api/v1/upgrades?limit=10001", "cursor="),
        ("/api/v1/upgrades/u0/tasks?limit=10001", "cursor="),
        ("/api/v1/store/upgrades?limit=10001", "after="),
        ("/api/v1/store/upgrades/u0/tasks?limit=10001", "after="),
    ] {
        let (st, _, v) = get(uri.into()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("10000") && msg.contains(next), "{uri}: {msg}");
    }
    let (st, _, v) = get("/api/v1/upgrades?cursor=ghost".into()).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");

    let tasks: Vec<NewTask> = (0..10_005)
        .map(|i| NewTask::new(format!("x{i}"), "X", TaskType::UpgradeStep))
        .collect();
    s.tracker.add_tasks("u1", tasks).unwrap();
    let (st, next, v) = get("/api/v1/upgrades/u1".into()).await;
    assert_eq!(st, StatusCode::OK);
    let first = v["tasks"].as_array().unwrap().len();
    assert_eq!(first, 10_000);
    let cursor = v["tasks_next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(next.as_deref(), Some(cursor.as_str()));
    let (_, _, rest) = get(format!("/api/v1/upgrades/u1/tasks?cursor={cursor}")).await;
    let total = v["total_tasks"].as_u64().unwrap() as usize;
    assert_eq!(first + rest.as_array().unwrap().len(), total);
}

/// `/healthz` reads the store: 503 with the reason when it does not answer (here a store
/// whose server is gone), 200 with the last seq when it does.
#[tokio::test]
async fn healthz_is_503_when_the_store_does_not_answer() {
    use std::sync::Arc;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let store = eks_upgrade_agent::store::remote::RemoteStore::new(&dead, None).unwrap();
    let s = AppState::new(Arc::new(eks_upgrade_agent::ProgressTracker::new(Arc::new(
        store,
    ))));
    let (st, v) = call(&s, "GET", "/healthz", None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["status"], "unavailable");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    let dir = tempfile::tempdir().unwrap();
    let (st, v) = call(&state(dir.path()), "GET", "/healthz", None).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
}

/// A task's events, newest first, filtered by kind: the dashboard's retry history. Each failed
/// attempt keeps its error and time after the retry; bad kinds and limits are 400s.
#[tokio::test]
async fn task_events_keep_every_failed_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let post = |uri: &'static str, body: &'static str| {
        let s = s.clone();
        async move {
            let (st, v) = call(&s, "POST", uri, Some(body)).await;
            assert!(st.is_success(), "{uri}: {st} {v}");
        }
    };
    post(
        "/api/v1/upgrades",
        r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#,
    )
    .await;
    post(
        "/api/v1/upgrades/u1/tasks",
        r#"[{"task_id":"t","name":"T","task_type":"upgrade_step"},{"task_id":"o","name":"O","task_type":"upgrade_step"}]"#,
    )
    .await;
    post("/api/v1/upgrades/u1/tasks/t/update", r#"{"percentage":10}"#).await;
    post(
        "/api/v1/upgrades/u1/tasks/t/fail",
        r#"{"error_message":"first"}"#,
    )
    .await;
    post("/api/v1/upgrades/u1/tasks/t/retry", "{}").await;
    post(
        "/api/v1/upgrades/u1/tasks/o/fail",
        r#"{"error_message":"other"}"#,
    )
    .await;
    for _ in 0..10 {
        post("/api/v1/upgrades/u1/tasks/t/update", r#"{"percentage":20}"#).await;
    }
    post(
        "/api/v1/upgrades/u1/tasks/t/fail",
        r#"{"error_message":"second"}"#,
    )
    .await;

    let (st, v) = call(
        &s,
        "GET",
        "/api/v1/upgrades/u1/tasks/t/events?kind=task.failed,task.retried",
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let got: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["task_id"], "t");
            assert!(e["timestamp"].is_string(), "{e}");
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want = [
        ("task.failed", "second"),
        ("task.retried", ""),
        ("task.failed", "first"),
    ];
    assert_eq!(
        got,
        want.map(|(k, m)| (k.to_owned(), m.to_owned())),
        "newest first, only the task's failures and retries"
    );
    // All kinds, newest first, with a limit.
    let (st, v) = call(
        &s,
        "GET",
        "/api/v1/upgrades/u1/tasks/t/events?limit=2",
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let kinds: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert_eq!(kinds, [json!("task.failed"), json!("task.progress")]);
    let (st, v) = call(&s, "GET", "/api/v1/upgrades/u1/tasks/t/events", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 15, "{v}");

    for (uri, status, says) in [
        (
            "/api/v1/upgrades/u1/tasks/t/events?kind=task.exploded",
            StatusCode::BAD_REQUEST,
            "unknown event kind \"task.exploded\"",
        ),
        (
            "/api/v1/upgrades/u1/tasks/t/events?limit=10001",
            StatusCode::BAD_REQUEST,
            "10000",
        ),
        (
            "/api/v1/upgrades/u1/tasks/nope/events",
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            "/api/v1/upgrades/nope/tasks/t/events",
            StatusCode::NOT_FOUND,
            "nope",
        ),
    ] {
        let (st, v) = call(&s, "GET", uri, None).await;
        assert_eq!(st, status, "{uri}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{uri}: {v}");
    }
}
