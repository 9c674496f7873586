//! `/api/v1/tests/...` and `GET /api/v1/upgrades/{u}/tests/compare` through the router.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use eks_upgrade_agent_server::{AppState, router};

use crate::util::{seed, state};

async fn send(
    s: &AppState,
    method: &str,
    uri: &str,
    body: Option<(&str, &str)>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some((ct, _)) = body {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(body.map_or_else(Body::empty, |(_, b)| Body::from(b.to_owned())))
        .unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn xml(cases: &[(&str, bool)]) -> String {
    let mut x = String::from("<testsuite name=\"smoke\">\n");
    for (name, ok) in cases {
        if *ok {
            x.push_str(&format!(
                "<testcase classname=\"api\" name=\"{name}\" time=\"1\"/>\n"
            ));
        } else {
            x.push_str(&format!(
                "<testcase classname=\"api\" name=\"{name}\" time=\"1\"><failure message=\"{name} broke\"/></testcase>\n"
            ));
        }
    }
    x + "</testsuite>\n"
}

#[tokio::test]
async fn ingest_compare_history_and_flaky_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let cluster = s.tracker.upgrade("u1").unwrap().cluster_name;
    let (st, pre) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=u1&phase=pre&name=pre.xml",
        Some(("application/xml", &xml(&[("a", true), ("b", true)]))),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{pre}");
    assert_eq!((&pre["tests"], &pre["passed"]), (&2.into(), &2.into()));
    assert_eq!(pre["files"], serde_json::json!(["pre.xml"]));
    assert_eq!(pre["cluster_name"], cluster.as_str());
    assert_eq!(
        pre["artifact_ids"].as_array().unwrap().len(),
        1,
        "kept as an artifact"
    );
    let (st, post) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=u1&phase=post&name=post.xml",
        Some(("text/xml", &xml(&[("a", false), ("b", true)]))),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{post}");

    let (st, c) = send(&s, "GET", "/api/v1/upgrades/u1/tests/compare", None).await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_eq!(c["gate"]["passed"], false);
    assert_eq!(c["gate"]["reasons"], serde_json::json!(["1 new failure"]));
    assert_eq!(c["new_failures"][0]["name"], "a");
    assert_eq!(c["new_failures"][0]["message"], "a broke");
    let uri = format!(
        "/api/v1/tests/compare?a={}&b={}",
        pre["run_id"].as_str().unwrap(),
        post["run_id"].as_str().unwrap()
    );
    let (st, c2) = send(&s, "GET", &uri, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(c2["new_failures"], c["new_failures"]);

    let (st, runs) = send(&s, "GET", "/api/v1/tests/runs?upgrade=u1&phase=post", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(runs.as_array().unwrap().len(), 1);
    let uri = format!("/api/v1/tests/runs/{}", post["run_id"].as_str().unwrap());
    let (st, show) = send(&s, "GET", &uri, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(show["failures"][0]["name"], "a");
    let (st, all) = send(&s, "GET", &format!("{uri}/results"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (st, h) = send(&s, "GET", "/api/v1/tests/history?name=a", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        h.as_array()
            .unwrap()
            .iter()
            .map(|e| e["status"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["failed", "passed"]
    );
    let (st, f) = send(
        &s,
        "GET",
        &format!("/api/v1/tests/flaky?cluster={cluster}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(f[0]["name"], "a");
}

#[tokio::test]
async fn bad_requests_get_the_error_shape_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let (st, e) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=u1&phase=pre&name=r.xml",
        Some((
            "application/xml",
            "<testsuite name=\"s\">\n<testcase name=\"a\">\n</testsuit>",
        )),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["code"], "invalid_input", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("r.xml:3: invalid JUnit XML"), "{msg}");
    let (_, runs) = send(&s, "GET", "/api/v1/tests/runs", None).await;
    assert_eq!(runs, serde_json::json!([]));
    let (_, found) = send(&s, "GET", "/api/v1/artifacts", None).await;
    assert_eq!(
        found["artifacts"].as_array().map_or(0, Vec::len),
        0,
        "{found}"
    );
    for (uri, needle) in [
        ("/api/v1/tests/ingest?phase=pre", "give the upgrade"),
        ("/api/v1/tests/ingest?upgrade=u1", "give the phase"),
        (
            "/api/v1/tests/ingest?upgrade=u1&phase=later",
            "expected pre, post or adhoc",
        ),
        (
            "/api/v1/tests/ingest?upgrade=u1&phase=pre&name=../x.xml",
            "plain file name",
        ),
    ] {
        let (st, e) = send(&s, "POST", uri, Some(("application/xml", "<testsuite/>"))).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{uri}: {e}"
        );
    }
    let (st, e) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=ghost&phase=pre",
        Some(("application/xml", "<testsuite/>")),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    for uri in [
        "/api/v1/tests/runs/nope",
        "/api/v1/upgrades/u1/tests/compare",
        "/api/v1/tests/compare?a=x&b=y",
    ] {
        let (st, e) = send(&s, "GET", uri, None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{uri}: {e}");
        assert_eq!(e["error"]["code"], "not_found");
    }
    for uri in [
        "/api/v1/tests/compare?a=x",
        "/api/v1/tests/history",
        "/api/v1/tests/flaky?days=0",
        "/api/v1/tests/runs?limit=many",
    ] {
        let (st, e) = send(&s, "GET", uri, None).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {e}");
    }
}
