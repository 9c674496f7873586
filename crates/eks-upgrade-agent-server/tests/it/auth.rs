//! Bearer tokens: missing, wrong, read token on a write route, query-string tokens for
//! browsers, open paths.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use eks_upgrade_agent_server::{AppState, Auth, router};

use crate::util::*;

const READ: &str = "read-token-0123456789";
const WRITE: &str = "write-token-0123456789";

fn secured(dir: &std::path::Path) -> AppState {
    let auth = Auth::from_specs(&[format!("{READ}:read"), format!("{WRITE}:write")]).unwrap();
    state(dir).with_auth(auth)
}

async fn call(
    s: &AppState,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value, Option<String>) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = router(s.clone())
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        www,
    )
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path());
    let create = r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#;

    let (st, v, www) = call(&s, "GET", "/api/v1/upgrades", None, "").await;
    assert_eq!(
        (st, www.as_deref()),
        (StatusCode::UNAUTHORIZED, Some("Bearer"))
    );
    assert_eq!(v["error"]["code"], "unauthorized");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("Bearer"),
        "{v}"
    );

    let (st, v, _) = call(
        &s,
        "GET",
        "/api/v1/upgrades",
        Some("wrong-token-0123456789"),
        "",
    )
    .await;
    assert_eq!(
        (st, v["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid token"))
    );

    let (st, v, _) = call(&s, "POST", "/api/v1/upgrades", Some(READ), create).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    let (st, v, _) = call(&s, "GET", "/api/v1/upgrades", Some(READ), "").await;
    assert_eq!(
        (st, v.as_array().map(Vec::len)),
        (StatusCode::OK, Some(0)),
        "the refused write changed nothing"
    );

    let (st, _, _) = call(&s, "POST", "/api/v1/upgrades", Some(WRITE), create).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, v, _) = call(&s, "GET", "/api/v1/upgrades/u1", Some(READ), "").await;
    assert_eq!((st, v["upgrade_id"].as_str()), (StatusCode::OK, Some("u1")));
    // The scheme is case-insensitive; a token in the query string works where headers cannot
    // be set (browser WebSockets, download links).
    let req = Request::builder()
        .uri("/api/v1/upgrades/u1")
        .header("authorization", format!("bearer {READ}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        router(s.clone()).oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    let (st, _, _) = call(
        &s,
        "GET",
        &format!("/api/v1/upgrades/u1?access_token={READ}"),
        None,
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(&s, "GET", "/api/v1/upgrades/u1?access_token=nope", None, "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Unknown routes need a token too (no probing without one).
    let (st, _, _) = call(&s, "GET", "/api/v1/nothing", None, "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Health is open.
    let (st, _, _) = call(&s, "GET", "/healthz", None, "").await;
    assert_eq!(st, StatusCode::OK);
    // HEAD is a read; DELETE is a write, refused to a read token before anything happens.
    let (st, _, _) = call(&s, "HEAD", "/api/v1/upgrades/u1", Some(READ), "").await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(&s, "HEAD", "/api/v1/upgrades/u1", None, "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v, _) = call(&s, "DELETE", "/api/v1/artifacts/anything", Some(READ), "").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, v, _) = call(&s, "DELETE", "/api/v1/artifacts/anything", Some(WRITE), "").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "past the role check: {v}");
}

#[tokio::test]
async fn websockets_take_the_token_from_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s).await;
    match tokio_tungstenite::connect_async(server.ws_url("/api/v1/upgrades/u1/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let mut ws =
        ws_connect(&server.ws_url(&format!("/api/v1/upgrades/u1/ws?access_token={READ}"))).await;
    assert_eq!(next_json(&mut ws).await["type"], "progress_summary");
}
