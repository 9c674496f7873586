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

/// E9: a report over the server's ingest limit is a 413 naming the limit, and nothing is
/// stored: whether `Content-Length` says so or a streamed body (no length) runs over. The
/// limit is `ServeOptions::max_ingest_bytes` (`serve --max-ingest-bytes`).
#[tokio::test]
async fn an_ingest_over_the_limit_is_413_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).with_serve_options(eks_upgrade_agent_server::ServeOptions {
        max_ingest_bytes: 1000,
        ..Default::default()
    });
    seed(&s.tracker, "u1");
    let big = xml(&(0..40).map(|_| ("a", true)).collect::<Vec<_>>());
    assert!(big.len() > 1000);
    let (st, e) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=u1&phase=pre",
        Some(("application/xml", &big)),
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    assert_eq!(e["error"]["code"], "too_large");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("ingest limit of 1000 bytes"), "{m}");
    assert!(m.contains("--max-ingest-bytes"), "{m}");
    // Streamed, without a length: refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(300).map(|c| Ok(c.to_vec())).collect();
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/tests/ingest?upgrade=u1&phase=pre")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // What the query alone refuses is refused before the body is read (not a 413 after it).
    let (st, e) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=u1&phase=pre&collection=c1",
        Some(("application/xml", &big)),
    )
    .await;
    assert_eq!(e["error"]["code"], "invalid_input", "{st} {e}");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("add ?session=S"), "{m}");
    let (_, runs) = send(&s, "GET", "/api/v1/tests/runs", None).await;
    assert_eq!(runs, serde_json::json!([]));
    let (_, found) = send(&s, "GET", "/api/v1/artifacts", None).await;
    assert_eq!(found, serde_json::json!([]), "nothing kept");
    // Under the limit it ingests.
    let (st, run) = send(
        &s,
        "POST",
        "/api/v1/tests/ingest?upgrade=u1&phase=pre",
        Some(("application/xml", &xml(&[("a", true)]))),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{run}");
}

/// E10: an artifact upload with `type=test_result&phase=P` whose body is JUnit XML is kept and
/// recorded as a run of the session's upgrade (the artifact answers with its `test_run`); a
/// broken `.xml` body is a 422 naming the line and stores nothing; a phase without
/// `type=test_result` is refused; another body is only kept.
#[tokio::test]
async fn an_artifact_upload_with_a_phase_ingests_junit() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let cluster = s.tracker.upgrade("u1").unwrap().cluster_name;
    let (st, sess) = send(
        &s,
        "POST",
        "/api/v1/sessions",
        Some((
            "application/json",
            &serde_json::json!({"upgrade_id": "u1", "cluster_name": cluster}).to_string(),
        )),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sess}");
    let sid = sess["session_id"].as_str().unwrap().to_owned();
    let (st, col) = send(
        &s,
        "POST",
        &format!("/api/v1/sessions/{sid}/collections"),
        Some(("application/json", r#"{"name":"smoke"}"#)),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{col}");
    let cid = col["collection_id"].as_str().unwrap().to_owned();
    let url = |q: &str| format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts?{q}");
    let (st, a) = send(
        &s,
        "POST",
        &url("name=pre.xml&type=test_result&phase=pre&tag=nightly"),
        Some(("application/xml", &xml(&[("a", true), ("b", false)]))),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    assert_eq!(a["name"], "pre.xml");
    assert_eq!(a["artifact_type"], "test_result");
    assert_eq!(a["tags"], serde_json::json!(["nightly", "pre"]));
    let run = &a["test_run"];
    assert_eq!(run["upgrade_id"], "u1");
    assert_eq!(run["phase"], "pre");
    assert_eq!((&run["tests"], &run["failed"]), (&2.into(), &1.into()));
    assert_eq!(run["artifact_ids"], serde_json::json!([a["artifact_id"]]));
    let (_, runs) = send(&s, "GET", "/api/v1/tests/runs?upgrade=u1", None).await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    // A broken report: 422 with the line, nothing stored.
    let (st, e) = send(
        &s,
        "POST",
        &url("name=post.xml&type=test_result&phase=post"),
        Some(("application/xml", "<testsuite>\n<testcase name=\"a\">\n")),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("post.xml:"),
        "{e}"
    );
    // A phase needs type=test_result.
    let (st, e) = send(
        &s,
        "POST",
        &url("name=x.xml&type=log_file&phase=post"),
        Some(("application/xml", &xml(&[("a", true)]))),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("type=test_result")
    );
    // Not XML: only kept.
    let (st, a) = send(
        &s,
        "POST",
        &url("name=notes.txt&type=test_result&phase=post"),
        Some(("text/plain", "the suite crashed")),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    assert!(a.get("test_run").is_none(), "{a}");
    let (_, runs) = send(&s, "GET", "/api/v1/tests/runs?upgrade=u1", None).await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    let (_, found) = send(&s, "GET", &format!("/api/v1/artifacts?session={sid}"), None).await;
    assert_eq!(found.as_array().unwrap().len(), 2, "{found}");
}
