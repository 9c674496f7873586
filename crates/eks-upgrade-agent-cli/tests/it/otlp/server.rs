//! The server's own request spans: exported when an OTLP endpoint is set, linked to the
//! upgrade trace, flushed at a graceful stop within its bound, never slowing requests.

use super::*;

/// The spans of `scope` received so far.
fn scope_spans(got: &Exports, scope: &str) -> Vec<Span> {
    let mut out = Vec::new();
    for e in got.lock().unwrap().iter() {
        for rs in &e.request.resource_spans {
            for ss in &rs.scope_spans {
                if ss.scope.as_ref().map(|s| s.name.as_str()) == Some(scope) {
                    out.extend(ss.spans.iter().cloned());
                }
            }
        }
    }
    out
}

/// Waits (at most 20 s) until `done` holds of what the receiver got.
fn wait_until(got: &Exports, what: &str, done: impl Fn(&Exports) -> bool) {
    let start = Instant::now();
    while !done(got) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post(port: u16, path: &str, extra: &str) -> String {
    crate::util::http(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        ),
    )
}

fn get(port: u16, path: &str, extra: &str) -> String {
    crate::util::http(
        port,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n"
        ),
    )
}

/// A GET whose answer must come within `limit` (a request that waits fails, not hangs).
fn get_within(port: u16, path: &str, limit: Duration) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    if let Err(e) = stream.read_to_string(&mut resp) {
        panic!("{path}: no answer within {limit:?}: {e}");
    }
    resp
}

/// Issue #14 "the server can also export its own request spans ... linked to the upgrade trace
/// for progress writes": `serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` sends one `SERVER` span per
/// request (method, route, status, path without the query, server address and port); a progress
/// write carries a link to the root span of the upgrade's trace, the very span the OTLP sink
/// exports when the upgrade ends; a read has no link; a `traceparent` header makes the span a
/// child of the caller's.
#[test]
fn the_server_exports_request_spans_linked_to_the_upgrade_trace() {
    let env = Env::with_task();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let served = crate::util::serve(&env, &[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]);
    let port = served.port;
    for path in [
        "/api/v1/upgrades/u/start?token=s3cr3t",
        "/api/v1/upgrades/u/tasks/t/start",
        "/api/v1/upgrades/u/tasks/t/complete",
        "/api/v1/upgrades/u/complete",
    ] {
        let resp = post(port, path, "");
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
    }
    let resp = get(
        port,
        "/api/v1/upgrades/u",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    wait_until(&got, "5 request spans and the root span", |g| {
        scope_spans(g, "eks-upgrade-agent-server").len() >= 5
            && spans(g).values().any(|s| s.name == "eks upgrade c")
    });
    let requests = scope_spans(&got, "eks-upgrade-agent-server");
    let root = spans(&got)
        .into_values()
        .find(|s| s.name == "eks upgrade c")
        .unwrap();
    let by_path = |p: &str| -> &Span {
        requests
            .iter()
            .find(|s| value(&s.attributes, "url.path").as_deref() == Some(p))
            .unwrap_or_else(|| panic!("no span for {p}"))
    };
    let start = by_path("/api/v1/upgrades/u/start");
    assert_eq!(start.name, "POST /api/v1/upgrades/{upgrade}/{op}");
    assert_eq!(start.kind, span::SpanKind::Server as i32);
    assert_eq!(attr(start, "http.request.method"), "POST");
    assert_eq!(attr(start, "http.route"), "/api/v1/upgrades/{upgrade}/{op}");
    assert_eq!(attr(start, "http.response.status_code"), "200");
    assert_eq!(attr(start, "server.address"), "127.0.0.1");
    assert_eq!(attr(start, "server.port"), port.to_string());
    assert_eq!(attr(start, "eks.upgrade.id"), "u");
    assert!(start.start_time_unix_nano <= start.end_time_unix_nano);
    for s in &requests {
        let text = format!("{s:?}");
        assert!(
            !text.contains("s3cr3t"),
            "the query is never exported: {text}"
        );
    }
    // Every write is linked to the upgrade's root span, the one the sink exported.
    for p in [
        "/api/v1/upgrades/u/start",
        "/api/v1/upgrades/u/tasks/t/start",
        "/api/v1/upgrades/u/tasks/t/complete",
        "/api/v1/upgrades/u/complete",
    ] {
        let s = by_path(p);
        assert_eq!(s.links.len(), 1, "{p}");
        assert_eq!(s.links[0].trace_id, root.trace_id, "{p}");
        assert_eq!(s.links[0].span_id, root.span_id, "{p}");
        assert_ne!(s.trace_id, root.trace_id, "{p}: a request is its own trace");
    }
    assert_eq!(
        by_path("/api/v1/upgrades/u/tasks/t/start").name,
        "POST /api/v1/upgrades/{upgrade}/tasks/{task}/{op}"
    );
    // A read: no link; the caller's trace context is followed.
    let read = by_path("/api/v1/upgrades/u");
    assert!(read.links.is_empty());
    let hexed = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hexed(&read.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hexed(&read.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(attr(read, "http.request.method"), "GET");
    // Requests of one trace each otherwise, with distinct ids.
    let mut ids: Vec<&Vec<u8>> = requests.iter().map(|s| &s.span_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), requests.len());
    let resource = got.lock().unwrap()[0].request.resource_spans[0]
        .resource
        .clone()
        .unwrap();
    assert_eq!(
        value(&resource.attributes, "service.name").as_deref(),
        Some("eks-upgrade-agent")
    );
}

/// A POST of `body` (JSON) to a served port; the response's head and body.
fn post_json(port: u16, path: &str, body: &str) -> String {
    crate::util::http(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The progress writes whose path does not name the upgrade are linked to its trace too:
/// `POST /api/v1/upgrades` (create) to the new upgrade's root span, and
/// `POST /api/v1/store/execute` (the CLI's `--server` path) to the root span of each upgrade
/// whose command committed (a command that failed links nothing; `eks.upgrade.id` only when
/// the batch names one upgrade).
#[test]
fn creates_and_store_batches_are_linked_to_the_upgrade_trace() {
    use eks_upgrade_agent::notify::otlp::{span_id, trace_id};
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let served = crate::util::serve(&env, &[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]);
    let port = served.port;
    let server = format!("http://127.0.0.1:{port}");
    let created = post_json(
        port,
        "/api/v1/upgrades",
        r#"{"upgrade_id":"n1","plan_id":"p","cluster_name":"c"}"#,
    );
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    // Through the CLI: `--server` sends its commands to /api/v1/store/execute.
    env.ok(&["--server", &server, "progress", "upgrade", "start", "n1"]);
    // A batch naming two upgrades (one created by it), and one naming only an unknown one.
    let both = post_json(
        port,
        "/api/v1/store/execute",
        r#"[{"op":"upgrade.create","upgrade_id":"n2","plan_id":"p","cluster_name":"c"},
            {"op":"upgrade.start","upgrade_id":"n2"},
            {"op":"upgrade.phase","upgrade_id":"n1","phase":"nodes"}]"#,
    );
    assert!(both.starts_with("HTTP/1.1 200"), "{both}");
    assert!(!both.contains("\"error\""), "{both}");
    let failed = post_json(
        port,
        "/api/v1/store/execute",
        r#"[{"op":"upgrade.start","upgrade_id":"nope"}]"#,
    );
    assert!(failed.starts_with("HTTP/1.1 200"), "{failed}");
    assert!(failed.contains("\"error\""), "{failed}");
    // Other requests (a readiness probe) have spans too: wait for these four by name.
    wait_until(&got, "the create's and the 3 batches' spans", |g| {
        let spans = scope_spans(g, "eks-upgrade-agent-server");
        let named = |n: &str| spans.iter().filter(|s| s.name == n).count();
        named("POST /api/v1/upgrades") == 1 && named("POST /api/v1/store/execute") >= 3
    });
    let requests = scope_spans(&got, "eks-upgrade-agent-server");
    let root = |u: &str| (trace_id(u).to_vec(), span_id(u, None).to_vec());
    let linked = |s: &Span| -> Vec<(Vec<u8>, Vec<u8>)> {
        s.links
            .iter()
            .map(|l| (l.trace_id.clone(), l.span_id.clone()))
            .collect()
    };
    let create = requests
        .iter()
        .find(|s| s.name == "POST /api/v1/upgrades")
        .expect("the create's span");
    assert_eq!(linked(create), [root("n1")]);
    assert_eq!(attr(create, "eks.upgrade.id"), "n1");
    let mut batches: Vec<&Span> = requests
        .iter()
        .filter(|s| s.name == "POST /api/v1/store/execute")
        .collect();
    batches.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(batches.len(), 3, "{requests:?}");
    assert_eq!(linked(batches[0]), [root("n1")], "the CLI's start");
    assert_eq!(attr(batches[0], "eks.upgrade.id"), "n1");
    assert_eq!(linked(batches[1]), [root("n2"), root("n1")]);
    assert_eq!(value(&batches[1].attributes, "eks.upgrade.id"), None);
    assert!(linked(batches[2]).is_empty(), "nothing committed");
    assert_eq!(value(&batches[2].attributes, "eks.upgrade.id"), None);
    for s in &batches {
        assert!(
            s.links
                .iter()
                .all(|l| attr_of(&l.attributes, "eks.link") == "upgrade")
        );
    }
}

fn attr_of(kvs: &[KeyValue], key: &str) -> String {
    value(kvs, key).unwrap_or_else(|| panic!("no {key}"))
}

/// A graceful stop (SIGTERM) right after a request still exports the request's span: the
/// exporter sends what is queued without waiting for its batch to fill, and `serve` waits for it
/// (bounded) before exiting.
#[test]
fn a_request_span_reaches_the_collector_across_sigterm() {
    let env = Env::with_task();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let mut served = crate::util::serve(&env, &[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]);
    let resp = post(served.port, "/api/v1/upgrades/u/start", "");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = served.child.wait().unwrap();
    assert!(
        status.success(),
        "serve exits cleanly on SIGTERM: {status:?}"
    );
    // Exited: whatever it exported is in.
    let requests = scope_spans(&got, "eks-upgrade-agent-server");
    assert!(
        requests.iter().any(
            |s| value(&s.attributes, "url.path").as_deref() == Some("/api/v1/upgrades/u/start")
        ),
        "the last request's span was lost at the stop: {requests:?}"
    );
}

/// N26's bound: with a collector that accepts connections and never answers (exports wait for
/// a 10 min timeout), a graceful stop waits for the request span exporter and for the
/// notification thread's last pass at most 5 s each (`EXPORT_GRACE`), says so, and exits 0:
/// SIGTERM while both exporters hang ends `serve` after both waits (at least 9 s) and well
/// before the exports' timeout (under 14 s).
#[test]
fn a_hung_collector_delays_a_graceful_stop_by_the_bound_only() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Accept and hold every connection, reading nothing back.
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            h.lock().unwrap().push(stream);
        }
    });
    let env = Env::with_task();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = env
        .command()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "600000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed on drop, whatever happens below.
    let mut served = crate::util::Served { child, port };
    // Its log, read as it comes (a full pipe would block it).
    let mut err = served.child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for path in [
        "/api/v1/upgrades/u/tasks/t/start",
        "/api/v1/upgrades/u/tasks/t/complete",
    ] {
        let resp = post(port, path, "");
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
    }
    // Both exporters are stuck: the sink in the task's span, the request spans in their batch.
    let start = Instant::now();
    while held.lock().unwrap().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the exporters did not reach the collector"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        // Far past the bound, far before the exports' timeout.
        assert!(
            stopping.elapsed() < Duration::from_secs(60),
            "serve did not exit 60 s after SIGTERM: the stop waits for the hung collector"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = stopping.elapsed();
    let stderr = log.join().unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(14),
        "stopped in {took:?}: {stderr}"
    );
    assert!(
        stderr.contains("request spans still queued were not exported")
            && stderr.contains("notifications still pending stay in the outbox"),
        "{stderr}"
    );
}

/// `GET /metrics` of a served port, the body.
fn metrics_text(port: u16) -> String {
    let text = get(port, "/metrics", "");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the sample `name` (no labels) in a `/metrics` text.
fn sample(text: &str, name: &str) -> u64 {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in /metrics: {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Without an OTLP endpoint the server exports nothing, not even to the usual default
/// collector address (`localhost:4318`, which SDKs fall back to): no request span exporter
/// and no OTLP sink exist (`/metrics`), so nothing could be sent anywhere.
#[test]
fn without_the_variable_the_server_exports_nothing() {
    let env = Env::with_task();
    let served = crate::util::serve(&env, &[]);
    for path in [
        "/api/v1/upgrades/u/tasks/t/start",
        "/api/v1/upgrades/u/start",
    ] {
        let resp = post(served.port, path, "");
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
    }
    let text = metrics_text(served.port);
    assert_eq!(sample(&text, "eua_request_spans_exporting"), 0, "{text}");
    assert!(!text.contains("sink=\"otlp"), "an OTLP sink exists: {text}");
    // The same server with an endpoint has both (what the metric tells apart).
    drop(served);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let _got = receiver_on(listener);
    let served = crate::util::serve(&env, &[("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str())]);
    let text = metrics_text(served.port);
    assert_eq!(sample(&text, "eua_request_spans_exporting"), 1, "{text}");
    assert!(text.contains("sink=\"otlp"), "no OTLP sink: {text}");
}

/// A collector that accepts connections and never answers (its exports wait for the 10 min
/// timeout) never slows or fails a request: 5,000 requests, more than the span queue holds,
/// all answered while the exporter is stuck in its first export. Proven without a clock: the
/// queue overflowed (`eua_request_spans_dropped` counts the spans dropped) while every request
/// was answered, so no request waited for room in the queue or for the export.
#[test]
fn a_hung_collector_never_slows_or_fails_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Accept and hold every connection, reading nothing back.
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            h.lock().unwrap().push(stream);
        }
    });
    let env = Env::with_task();
    let served = crate::util::serve(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "600000"),
        ],
    );
    let resp = post(served.port, "/api/v1/upgrades/u/tasks/t/start", "");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let requests = request_spans::QUEUE + 2 * request_spans::MAX_BATCH;
    for i in 0..requests {
        // The limit only keeps a broken server from hanging the test.
        let resp = get_within(served.port, "/favicon.ico", Duration::from_secs(60));
        assert!(resp.starts_with("HTTP/1.1 204"), "request {i}: {resp}");
    }
    assert!(
        !held.lock().unwrap().is_empty(),
        "the exporter reached the collector"
    );
    let text = metrics_text(served.port);
    assert_eq!(sample(&text, "eua_request_spans_exporting"), 1, "{text}");
    // At most one batch left the queue (the export that hangs): the rest was dropped.
    let dropped = sample(&text, "eua_request_spans_dropped_total");
    assert!(
        dropped >= (requests - request_spans::QUEUE - request_spans::MAX_BATCH) as u64,
        "{dropped} spans dropped of {requests}: {text}"
    );
}

/// Issue #14 on PostgreSQL (team mode): `serve --database-url` with an OTLP endpoint exports
/// the upgrade's trace from the shared database (the PostgreSQL `TraceSource`): a task's failed
/// attempt and its retry (linked), under the root span, each with its own events.
#[test]
fn serve_on_a_database_exports_the_upgrade_trace() {
    let pg = eks_upgrade_agent::test_support::PgCluster::start();
    let db = pg.create_database();
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let served = crate::util::serve(
        &env,
        &[
            ("EUA_DATABASE_URL", db.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
        ],
    );
    let server = format!("http://127.0.0.1:{}", served.port);
    for args in [
        &[
            "progress",
            "upgrade",
            "create",
            "u",
            "--plan",
            "p",
            "--cluster",
            "team",
        ][..],
        &["progress", "upgrade", "start", "u"],
        &[
            "progress",
            "task",
            "add",
            "u",
            "t",
            "--name",
            "T",
            "--type",
            "upgrade_step",
        ],
        &["progress", "task", "start", "u", "t"],
        &[
            "progress",
            "task",
            "update",
            "u",
            "t",
            "--percent",
            "30",
            "-m",
            "draining",
        ],
        &[
            "progress",
            "task",
            "fail",
            "u",
            "t",
            "--error",
            "drain timed out",
        ],
        &["progress", "task", "retry", "u", "t"],
        &["progress", "task", "complete", "u", "t"],
        &["progress", "upgrade", "complete", "u"],
    ] {
        let mut a = vec!["--server", server.as_str()];
        a.extend_from_slice(args);
        env.ok(&a);
    }
    wait_until(&got, "the upgrade's three spans", |g| {
        scope_spans(g, "eks-upgrade-agent")
            .iter()
            .any(|s| s.name == "eks upgrade team")
    });
    let mut by_id: HashMap<Vec<u8>, Span> = HashMap::new();
    for s in scope_spans(&got, "eks-upgrade-agent") {
        by_id.insert(s.span_id.clone(), s);
    }
    assert_eq!(
        by_id.len(),
        3,
        "{:?}",
        by_id.values().map(|s| &s.name).collect::<Vec<_>>()
    );
    let root = by_id
        .values()
        .find(|s| s.name == "eks upgrade team")
        .unwrap();
    let attempt = |n: &str| {
        by_id
            .values()
            .find(|s| s.name == "T" && attr(s, "eks.task.attempt") == n)
            .unwrap_or_else(|| panic!("no attempt {n}"))
    };
    let (first, second) = (attempt("0"), attempt("1"));
    for s in [first, second] {
        assert_eq!(s.parent_span_id, root.span_id);
        assert_eq!(s.trace_id, root.trace_id);
    }
    let st = first.status.as_ref().unwrap();
    assert_eq!(
        (st.code, st.message.as_str()),
        (StatusCode::Error as i32, "drain timed out")
    );
    let names = |s: &Span| s.events.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(first),
        ["task.started", "task.progress", "task.failed"]
    );
    assert_eq!(names(second), ["task.retried", "task.completed"]);
    assert_eq!(second.links[0].span_id, first.span_id);
    assert_eq!(root.status.as_ref().unwrap().code, StatusCode::Ok as i32);
}
