//! Random and hostile requests (methods, percent-encoded path bytes, query strings, bodies and
//! content types, Host and Origin headers): the server never panics or answers 5xx, and every
//! error has the one JSON shape.

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::Value;
use tower::ServiceExt;

use eks_upgrade_agent_server::router;

use crate::util::*;

const ROUTES: &[&str] = &[
    "/api/v1/upgrades",
    "/api/v1/upgrades/u1",
    "/api/v1/upgrades/u1/events",
    "/api/v1/upgrades/u1/tasks",
    "/api/v1/upgrades/u1/tasks/a",
    "/api/v1/upgrades/u1/tasks/a/update",
    "/api/v1/upgrades/u1/start",
    "/api/v1/upgrades/u1/ws",
    "/api/v1/ws",
    "/api/v1/store/execute",
    "/api/v1/store/import",
    "/api/v1/store/events",
    "/api/v1/store/upgrades/u1/latest",
    "/api/v1/sessions",
    "/api/v1/maintenance/cleanup",
    "/metrics",
    "/nowhere",
];

fn request() -> impl Strategy<Value = (String, String, Vec<(String, String)>, Vec<u8>)> {
    let method = prop::sample::select(vec![
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FOO", "G E T",
    ]);
    let route = prop::sample::select(ROUTES.to_vec());
    let segment = prop::collection::vec(any::<u8>(), 0..6)
        .prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect::<String>());
    let query = prop::sample::select(vec![
        "",
        "?limit=5",
        "?limit=99999999999999999999",
        "?latest=20000",
        "?since=-1",
        "?since=abc",
        "?limit=%FF",
        "?a=1&a=2",
    ]);
    let header = prop::sample::select(vec![
        ("host", "evil.example"),
        ("host", "127.0.0.1:1"),
        ("host", "%%%"),
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("content-type", "application/json"),
        ("content-type", "text/plain"),
        ("content-type", "application/json; charset=\u{7f}"),
        ("upgrade", "websocket"),
        ("last-event-id", "x"),
    ]);
    let body = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
        Just(br#"{"upgrade_id":"u2","plan_id":"p","cluster_name":"c"}"#.to_vec()),
        Just(b"[{\"op\":\"task.update\"}]".to_vec()),
    ];
    (
        method,
        route,
        segment,
        query,
        prop::collection::vec(header, 0..3),
        body,
    )
        .prop_map(|(m, r, seg, q, h, b)| {
            let path = if seg.is_empty() {
                format!("{r}{q}")
            } else {
                format!("{r}/{seg}{q}")
            };
            let headers = h
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            (m.to_owned(), path, headers, b)
        })
}

#[test]
fn hostile_requests_get_json_errors_and_never_5xx() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let app = router(s);
    let config = ProptestConfig {
        cases: 500,
        ..ProptestConfig::default()
    };
    proptest!(config, |((method, path, headers, body) in request())| {
        let mut req = Request::builder().method(method.as_str()).uri(path.as_str());
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let Ok(req) = req.body(Body::from(body)) else {
            return Ok(()); // not a request http can even build
        };
        let (status, content_type, bytes) = runtime.block_on(async {
            let resp = app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let ct = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, ct, bytes)
        });
        prop_assert!(!status.is_server_error(), "{method} {path} {headers:?}: {status}");
        // (HEAD answers carry no body.)
        if status.is_client_error() && method != "HEAD" {
            prop_assert_eq!(content_type.as_deref(), Some("application/json"), "{} {}", method, path);
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            prop_assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "{method} {path}: {v}"
            );
        }
    });
}
