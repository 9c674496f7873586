//! Artifact routes: sessions, collections, streamed upload, verified download with ETag and
//! ranges, search, stats, delete, bad input, a corrupt blob, and `/metrics`.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use eks_upgrade_agent_server::{AppState, router};

use crate::util::*;

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn req(s: &AppState, method: &str, uri: &str, headers: &[(&str, &str)], body: Body) -> Resp {
    let mut r = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = router(s.clone())
        .oneshot(r.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

async fn post_json(s: &AppState, uri: &str, json: &str) -> Resp {
    req(
        s,
        "POST",
        uri,
        &[("content-type", "application/json")],
        Body::from(json.to_owned()),
    )
    .await
}

async fn get(s: &AppState, uri: &str) -> Resp {
    req(s, "GET", uri, &[], Body::empty()).await
}

/// A session and a collection; returns their ids.
async fn session(s: &AppState) -> (String, String) {
    let r = post_json(
        s,
        "/api/v1/sessions",
        r#"{"upgrade_id":"u1","cluster_name":"prod","name":"run 1"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    let r = post_json(
        s,
        &format!("/api/v1/sessions/{sid}/collections"),
        r#"{"name":"logs"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    (sid, r.json()["collection_id"].as_str().unwrap().to_owned())
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn upload_download_search_stats_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (sid, cid) = session(&s).await;
    let bytes = content(3 * 1024 * 1024 + 17);
    // The body arrives as a stream of chunks, as from a client sending a large file.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(100_000).map(|c| Ok(c.to_vec())).collect();
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let up = req(
        &s,
        "POST",
        &format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts?name=kubelet.log&type=log_file&tag=node&tag=drain&task_id=t1"),
        &[],
        body,
    )
    .await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", up.json());
    let a = up.json();
    let hash = hex::encode(Sha256::digest(&bytes));
    assert_eq!(a["file_hash"], hash);
    assert_eq!(a["file_size"], bytes.len());
    assert_eq!(a["tags"], serde_json::json!(["node", "drain"]));
    let id = a["artifact_id"].as_str().unwrap().to_owned();
    let small = req(
        &s,
        "POST",
        &format!(
            "/api/v1/sessions/{sid}/collections/{cid}/artifacts?name=junit.xml&type=test_result"
        ),
        &[],
        Body::from("<testsuite/>"),
    )
    .await;
    assert_eq!(small.status, StatusCode::CREATED);

    // Download: verified bytes, length, ETag, type, disposition.
    let d = get(&s, &format!("/api/v1/artifacts/{id}/content")).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.body, bytes);
    assert_eq!(
        d.headers["content-length"],
        bytes.len().to_string().as_str()
    );
    let etag = format!("\"{hash}\"");
    assert_eq!(d.headers["etag"], etag.as_str());
    assert_eq!(d.headers["accept-ranges"], "bytes");
    assert!(
        d.headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("kubelet.log")
    );
    let r = req(
        &s,
        "GET",
        &format!("/api/v1/artifacts/{id}/content"),
        &[("if-none-match", &etag)],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    // Ranges.
    for (range, lo, hi) in [
        ("bytes=10-19", 10, 19),
        ("bytes=-5", bytes.len() - 5, bytes.len() - 1),
        ("bytes=3000000-", 3_000_000, bytes.len() - 1),
    ] {
        let r = req(
            &s,
            "GET",
            &format!("/api/v1/artifacts/{id}/content"),
            &[("range", range)],
            Body::empty(),
        )
        .await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(r.body, bytes[lo..=hi], "{range}");
        assert_eq!(
            r.headers["content-range"],
            format!("bytes {lo}-{hi}/{}", bytes.len()).as_str()
        );
        assert_eq!(
            r.headers["content-length"],
            (hi - lo + 1).to_string().as_str()
        );
    }
    let r = req(
        &s,
        "GET",
        &format!("/api/v1/artifacts/{id}/content"),
        &[("range", "bytes=99999999-")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.headers["content-range"],
        format!("bytes */{}", bytes.len()).as_str()
    );

    // Search with the CLI's filters; stats.
    let found = get(
        &s,
        &format!("/api/v1/artifacts?session={sid}&tag=node&tag=drain&type=log_file"),
    )
    .await;
    assert_eq!(found.status, StatusCode::OK);
    let found = found.json();
    let ids: Vec<&str> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["artifact_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let found = get(
        &s,
        "/api/v1/artifacts?name=junit&min_size=1&max_size=1KiB&since=1h",
    )
    .await;
    assert_eq!(
        found.json().as_array().unwrap().len(),
        1,
        "{}",
        found.json()
    );
    assert_eq!(found.json()[0]["name"], "junit.xml");
    let found = get(&s, "/api/v1/artifacts?tag=nothing").await;
    assert_eq!(found.json(), serde_json::json!([]));
    let st = get(&s, &format!("/api/v1/artifacts/stats?session={sid}")).await;
    assert_eq!(st.status, StatusCode::OK);
    assert_eq!(st.json()["total_artifacts"], 2, "{}", st.json());
    let sess = get(&s, &format!("/api/v1/sessions/{sid}")).await.json();
    assert_eq!(sess["collections"][0]["name"], "logs");
    let list = get(&s, "/api/v1/sessions?upgrade_id=u1").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let done = post_json(&s, &format!("/api/v1/sessions/{sid}/complete"), "").await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.json());

    // Delete: gone for reads.
    let del = req(
        &s,
        "DELETE",
        &format!("/api/v1/artifacts/{id}"),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(del.status, StatusCode::OK, "{}", del.json());
    assert_eq!(del.json()["status"], "deleted");
    let gone = get(&s, &format!("/api/v1/artifacts/{id}/content")).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_artifact_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (sid, cid) = session(&s).await;
    let up = |q: &str| format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts{q}");
    for (uri, status, code, needle) in [
        (up(""), 422, "invalid_input", "name is required"),
        (up("?name=a.log&type=movie"), 422, "invalid_input", "movie"),
        (up("?name=a.log&colour=red"), 400, "invalid_query", "colour"),
        (up("?name=a.log&name=b.log"), 422, "invalid_input", "once"),
        (
            up("?name=a.log&metadata=[1]"),
            422,
            "invalid_input",
            "metadata",
        ),
        (up("?name=../../etc/passwd"), 422, "invalid_input", ""),
        // The ingest's mark is reserved (G121).
        (
            up("?name=a.log&metadata=%7B%22eua_pending_run%22%3A%22x%22%7D"),
            422,
            "invalid_input",
            "\"eua_pending_run\" is reserved",
        ),
        (
            up("?name=r.xml&type=test_result&phase=pre\
                &metadata=%7B%22eua_pending_run%22%3A%22x%22%7D"),
            422,
            "invalid_input",
            "\"eua_pending_run\" is reserved",
        ),
        (
            format!("/api/v1/sessions/nope/collections/{cid}/artifacts?name=a.log"),
            404,
            "not_found",
            "nope",
        ),
    ] {
        // A report where a phase asks for an ingest.
        let body = if uri.contains("phase=") {
            r#"<testsuite name="s" tests="1"><testcase name="t"/></testsuite>"#
        } else {
            "data"
        };
        let r = req(&s, "POST", &uri, &[], Body::from(body)).await;
        assert_eq!(r.status.as_u16(), status, "{uri}: {}", r.json());
        assert_eq!(r.json()["error"]["code"], code, "{uri}: {}", r.json());
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{uri}: {}",
            r.json()
        );
    }
    for (uri, status) in [
        ("/api/v1/artifacts?limit=0", 422),
        ("/api/v1/artifacts?since=soon", 422),
        ("/api/v1/artifacts?min_size=lots", 422),
        ("/api/v1/artifacts?status=lost", 422),
        ("/api/v1/artifacts?sort=name", 400),
        ("/api/v1/artifacts/nope", 404),
        ("/api/v1/artifacts/nope/content", 404),
        ("/api/v1/artifacts/stats?session=nope", 404),
        ("/api/v1/sessions/nope", 404),
    ] {
        let r = get(&s, uri).await;
        assert_eq!(r.status.as_u16(), status, "{uri}: {}", r.json());
        assert!(r.json()["error"]["message"].is_string(), "{uri}");
    }
    for (body, status) in [
        ("{", 400),
        (r#"{"upgrade_id":"u"}"#, 422),
        (r#"{"upgrade_id":"u","cluster_name":"c","colour":1}"#, 422),
    ] {
        let r = post_json(&s, "/api/v1/sessions", body).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", r.json());
    }
    // Nothing was stored by any of those.
    let found = get(&s, "/api/v1/artifacts").await.json();
    assert_eq!(found, serde_json::json!([]));
    assert_eq!(
        get(&s, "/api/v1/sessions")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_corrupt_blob_never_ends_in_a_complete_response() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (sid, cid) = session(&s).await;
    let bytes = content(1024 * 1024);
    let up = req(
        &s,
        "POST",
        &format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts?name=big.bin"),
        &[],
        Body::from(bytes.clone()),
    )
    .await;
    let hash = up.json()["file_hash"].as_str().unwrap().to_owned();
    let id = up.json()["artifact_id"].as_str().unwrap().to_owned();
    let path = dir
        .path()
        .join("blobs/sha256")
        .join(&hash[..2])
        .join(&hash[2..]);
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&path, perm).unwrap();
    let mut tampered = bytes.clone();
    tampered[bytes.len() - 1] ^= 1;
    std::fs::write(&path, &tampered).unwrap();
    // Full and ranged: the body fails instead of completing.
    for range in [None, Some("bytes=0-9")] {
        let mut r = Request::builder().uri(format!("/api/v1/artifacts/{id}/content"));
        if let Some(v) = range {
            r = r.header("range", v);
        }
        let resp = router(s.clone())
            .oneshot(r.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let body = resp.into_body().collect().await;
        assert!(
            body.is_err(),
            "{range:?}: a corrupt blob must not give a complete body"
        );
    }
}

#[tokio::test]
async fn metrics_are_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let r = post_json(
        &s,
        "/api/v1/upgrades/u1/tasks/a/update",
        r#"{"percentage":10}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    session(&s).await;
    let m = get(&s, "/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    let text = String::from_utf8(m.body).unwrap();
    for needle in [
        "eua_progress_updates_total 1",
        r#"eua_http_request_duration_seconds_count{method="POST",route="/api/v1/upgrades/{upgrade}/tasks/{task}/{op}",status="200"} 1"#,
        "eua_stream_clients 0",
        "eua_uploads_queued 0",
        "# EOF",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[tokio::test]
async fn an_upload_cut_short_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (sid, cid) = session(&s).await;
    // 2 MiB arrive, then the connection breaks.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(content(1024 * 1024)),
        Ok(content(1024 * 1024)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ];
    let r = req(
        &s,
        "POST",
        &format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts?name=cut.bin"),
        &[],
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
    .await;
    // The client's fault: a 400 in the JSON error shape (issue #10, item 8), not a 500.
    assert_eq!(r.status, 400, "{}", r.json());
    assert_eq!(r.json()["error"]["code"], "incomplete_body", "{}", r.json());
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("ended early after 2097152 bytes")
            && message.contains("nothing was stored"),
        "{message}"
    );
    assert_eq!(
        get(&s, "/api/v1/artifacts").await.json(),
        serde_json::json!([])
    );
    // No blob file was left behind either: under the blob root (which must exist), only the
    // store's own files (the inline-blob database and the gc lock) and empty dirs.
    let files: Vec<_> = walk(&dir.path().join("blobs"))
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !(name.starts_with("small.sqlite3") || name == "gc.lock")
        })
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

/// Every file under `dir`, which must exist (a missing directory is a failure, not "no files").
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{} cannot be read: {e}", dir.display()));
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Labels come from fixed sets (a 5,000-character method was once a label) and sinks are shown
/// without their secrets (a webhook URL's path).
#[tokio::test]
async fn metrics_labels_are_bounded_and_hold_no_secrets() {
    use eks_upgrade_agent::notify::{Dispatcher, DispatcherOptions, Format, WebhookSink};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        eks_upgrade_agent::config::Config::new(dir.path())
            .open_store()
            .unwrap(),
    );
    let sink = WebhookSink::new(
        "http://user:pw@127.0.0.1:9/hooks/T0ps3cr3t",
        None,
        Format::Reference,
        "eua",
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let d = Arc::new(Dispatcher::new(
        store,
        vec![Arc::new(sink)],
        DispatcherOptions::default(),
    ));
    let s = state(dir.path()).with_dispatcher(d);
    let long = "X".repeat(5000);
    for method in ["FOOBAR", long.as_str(), "GET"] {
        req(&s, method, "/api/v1/upgrades", &[], Body::empty()).await;
        req(&s, method, "/no/such/route/1", &[], Body::empty()).await;
        req(&s, method, "/no/such/route/2", &[], Body::empty()).await;
    }
    let text = String::from_utf8(get(&s, "/metrics").await.body).unwrap();
    assert!(!text.contains("FOOBAR") && !text.contains("XXXX"), "{text}");
    assert!(
        text.contains(r#"method="other",route="/api/v1/upgrades""#),
        "{text}"
    );
    assert!(!text.contains("/no/such"), "{text}");
    assert!(text.contains(r#"route="unmatched""#), "{text}");
    assert!(
        text.contains("eua_notifications_pending{sink=\"webhook:127.0.0.1:9#"),
        "{text}"
    );
    for secret in ["T0ps3cr3t", "hooks", "user", "pw@"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// Issue #10, items 3 and 14: a search page holds at most 10,000 (a larger `limit` is a 400
/// naming the maximum); `X-Next-Cursor` leads to the next page until the last, which has none.
#[tokio::test]
async fn search_pages_are_capped_and_linked_by_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let (sid, cid) = session(&s).await;
    for i in 0..5 {
        let r = req(
            &s,
            "POST",
            &format!("/api/v1/sessions/{sid}/collections/{cid}/artifacts?name=f{i}.log"),
            &[],
            Body::from(format!("content {i}")),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    }
    for bad in ["10001", "1000000", "99999999999999999999"] {
        let r = get(&s, &format!("/api/v1/artifacts?limit={bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.json());
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("maximum of 10000"), "{message}");
    }
    let mut names = Vec::new();
    let mut uri = "/api/v1/artifacts?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let r = get(&s, &uri).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json());
        pages += 1;
        for a in r.json().as_array().unwrap() {
            names.push(a["name"].as_str().unwrap().to_owned());
        }
        match r.headers.get("x-next-cursor") {
            Some(c) => uri = format!("/api/v1/artifacts?limit=2&cursor={}", c.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["f4.log", "f3.log", "f2.log", "f1.log", "f0.log"]);
    let r = get(&s, "/api/v1/artifacts?cursor=x").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.json());
}

/// Issue #10, item 9: retention_days outside 1..=36500 is refused at the HTTP way in too.
#[tokio::test]
async fn sessions_with_a_retention_outside_the_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    for days in ["0", "36501", "4294967295", "4294967296", "-1"] {
        let r = post_json(
            &s,
            "/api/v1/sessions",
            &format!(r#"{{"upgrade_id":"u1","cluster_name":"prod","retention_days":{days}}}"#),
        )
        .await;
        assert!(r.status.is_client_error(), "{days}: {}", r.json());
        assert!(
            r.json()["error"]["message"].is_string(),
            "{days}: {}",
            r.json()
        );
    }
    let r = get(&s, "/api/v1/sessions").await;
    assert_eq!(r.json(), serde_json::json!([]), "nothing stored");
}

/// A maintenance call whose client asks for progress lines (`Accept: application/x-ndjson`,
/// the CLI) is answered `200` at once, then gets `{"working": s}` each heartbeat while the
/// server works, then `{"ok": ...}`: a client can tell a server at work from a dead one by a
/// limit on silence. A client that does not ask gets the answer as before.
#[tokio::test]
async fn maintenance_answers_in_progress_lines_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = eks_upgrade_agent::config::Config::new(dir.path());
    let store = std::sync::Arc::new(cfg.open_store().unwrap());
    let m = std::sync::Arc::new(cfg.artifacts_manager(store.clone()).unwrap());
    let s = m
        .create_session(eks_upgrade_agent::artifacts::NewSession {
            upgrade_id: "u1".into(),
            cluster_name: "prod".into(),
            ..Default::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "logs", None, None)
        .unwrap();
    for i in 0..8 {
        let mut body = content(512 * 1024);
        body[0] = i;
        m.add_bytes(
            &s.session_id,
            &c.collection_id,
            &body,
            &format!("f{i}.log"),
            &Default::default(),
        )
        .unwrap();
    }
    let tracker = std::sync::Arc::new(eks_upgrade_agent::ProgressTracker::new(store.clone()));
    let state = AppState::new(tracker)
        .with_artifacts(m, Some(store))
        .with_heartbeat(std::time::Duration::from_millis(1));
    let r = req(
        &state,
        "POST",
        "/api/v1/maintenance/verify",
        &[("accept", "application/x-ndjson")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    assert_eq!(r.headers["x-accel-buffering"], "no");
    let lines: Vec<Value> = r
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let (last, working) = lines.split_last().unwrap();
    assert!(!working.is_empty(), "no progress line: {lines:?}");
    assert!(working.iter().all(|l| l["working"].is_u64()), "{lines:?}");
    assert_eq!(last["ok"]["artifacts_checked"], 8, "{last}");
    // Without the header (or refusing lines): one JSON answer, as before.
    for accept in [None, Some("application/json, application/x-ndjson;q=0")] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let r = req(
            &state,
            "POST",
            "/api/v1/maintenance/verify",
            &headers,
            Body::empty(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["artifacts_checked"], 8, "{accept:?}: {}", r.json());
    }
    // A request refused before the work begins is refused as before.
    let r = req(
        &state,
        "POST",
        "/api/v1/maintenance/cleanup",
        &[
            ("accept", "application/x-ndjson"),
            ("content-type", "application/json"),
        ],
        Body::from("{\"dry_run\": 3}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.json());
}
