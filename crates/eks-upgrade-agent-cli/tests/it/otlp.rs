//! The OTLP sink end to end: a scripted upgrade (nested tasks, a failure, a retry) run by the
//! binary, exported to a test OTLP/HTTP receiver on loopback that decodes the protobuf with the
//! official definitions (`opentelemetry-proto`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span, status::StatusCode};
use prost::Message as _;
use serde_json::Value;

use eks_upgrade_agent_server::request_spans;

use crate::util::Env;

/// One request the receiver got.
struct Export {
    path: String,
    /// Header names lowercased.
    headers: HashMap<String, String>,
    request: ExportTraceServiceRequest,
    /// Answered 200 (else 503: refused, to be re-sent).
    accepted: bool,
}

type Exports = Arc<Mutex<Vec<Export>>>;

/// An OTLP/HTTP receiver on `listener` answering 200; returns the exports it decoded.
fn receiver_on(listener: TcpListener) -> Exports {
    receiver_refusing(listener, Arc::new(AtomicUsize::new(0)))
}

/// [`receiver_on`] answering 503 to as many requests as `refuse` holds (counted down), which it
/// decodes and keeps too (`accepted` false).
fn receiver_refusing(listener: TcpListener, refuse: Arc<AtomicUsize>) -> Exports {
    let got: Exports = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).unwrap_or(0) == 0 {
                continue;
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut headers = HashMap::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let len: usize = headers
                .get("content-length")
                .map_or(0, |l| l.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            if headers.get("content-encoding").map(String::as_str) == Some("gzip") {
                let mut plain = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut plain)
                    .unwrap();
                body = plain;
            }
            let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
            let accepted = refuse
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err();
            g.lock().unwrap().push(Export {
                path,
                headers,
                request,
                accepted,
            });
            let status = if accepted {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    got
}

/// Every span accepted, the last copy of each span id (delivery is at least once).
fn spans(got: &Exports) -> HashMap<Vec<u8>, Span> {
    let mut out = HashMap::new();
    for e in got.lock().unwrap().iter().filter(|e| e.accepted) {
        for rs in &e.request.resource_spans {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.insert(s.span_id.clone(), s.clone());
                }
            }
        }
    }
    out
}

fn value(kvs: &[KeyValue], key: &str) -> Option<String> {
    let v = kvs
        .iter()
        .find(|k| k.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match v {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn attr(span: &Span, key: &str) -> String {
    value(&span.attributes, key).unwrap_or_else(|| panic!("{} has no {key}", span.name))
}

fn nanos(ts: &Value) -> u64 {
    chrono::DateTime::parse_from_rfc3339(ts.as_str().unwrap())
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap() as u64
}

/// The scripted upgrade: `nodes` holds `ng-1` and `ng-2`; `addons` stands alone; `ng-1` fails
/// (and with it `nodes`), is retried and completes; then the upgrade completes.
fn script(env: &Env, flags: &[&str]) {
    let run = |args: &[&str]| {
        let mut a: Vec<&str> = flags.to_vec();
        a.extend_from_slice(args);
        env.ok(&a);
    };
    run(&[
        "progress",
        "upgrade",
        "create",
        "u1",
        "--plan",
        "p1",
        "--cluster",
        "prod",
        "--meta",
        "team=platform",
    ]);
    run(&["progress", "upgrade", "start", "u1"]);
    for (id, parent) in [
        ("nodes", None),
        ("ng-1", Some("nodes")),
        ("ng-2", Some("nodes")),
        ("addons", None),
    ] {
        let mut a = vec!["progress", "task", "add", "u1", id, "--name", id];
        a.extend(["--type", "upgrade_step"]);
        if let Some(p) = parent {
            a.extend(["--parent", p]);
        }
        if id == "ng-2" {
            a.extend(["--total-steps", "2"]);
        }
        run(&a);
    }
    run(&["progress", "task", "start", "u1", "addons"]);
    run(&[
        "progress",
        "task",
        "update",
        "u1",
        "addons",
        "--percent",
        "50",
        "-m",
        "half",
    ]);
    run(&["progress", "task", "complete", "u1", "addons"]);
    run(&["progress", "task", "start", "u1", "ng-1"]);
    run(&[
        "progress",
        "task",
        "update",
        "u1",
        "ng-1",
        "--percent",
        "40",
        "-m",
        "draining",
    ]);
    run(&[
        "progress",
        "task",
        "fail",
        "u1",
        "ng-1",
        "--error",
        "drain timed out",
    ]);
    run(&["progress", "task", "retry", "u1", "ng-1"]);
    run(&["progress", "task", "complete", "u1", "ng-1"]);
    run(&["progress", "task", "start", "u1", "ng-2"]);
    run(&[
        "progress",
        "task",
        "step",
        "u1",
        "ng-2",
        "--completed",
        "1",
        "--name",
        "cordon",
    ]);
    run(&["progress", "task", "complete", "u1", "ng-2"]);
    run(&["progress", "upgrade", "complete", "u1"]);
}

/// Checks the trace of [`script`] against the store's own events.
fn check_trace(env: &Env, spans: &HashMap<Vec<u8>, Span>, service: &str, got: &Exports) {
    let events = env.events("u1");
    // The timestamp of the n-th (0-based) event of `kind` for `task`.
    let at = |kind: &str, task: Option<&str>, n: usize| -> u64 {
        let e = events
            .iter()
            .filter(|e| e["kind"] == kind && e["task_id"].as_str() == task)
            .nth(n)
            .unwrap_or_else(|| panic!("no {kind} #{n} of {task:?}"));
        nanos(&e["timestamp"])
    };
    assert_eq!(
        spans.len(),
        7,
        "{:?}",
        spans.values().map(|s| &s.name).collect::<Vec<_>>()
    );
    let trace = &spans.values().next().unwrap().trace_id;
    assert_eq!(trace.len(), 16);
    assert!(spans.values().all(|s| &s.trace_id == trace), "one trace");
    let by = |name: &str, attempt: &str| -> &Span {
        spans
            .values()
            .find(|s| {
                s.name == name
                    && (attempt.is_empty()
                        || value(&s.attributes, "eks.task.attempt").as_deref() == Some(attempt))
            })
            .unwrap_or_else(|| panic!("no span {name} attempt {attempt}"))
    };
    let root = by("eks upgrade prod", "");
    assert!(root.parent_span_id.is_empty());
    assert_eq!(root.status.as_ref().unwrap().code, StatusCode::Ok as i32);
    assert_eq!(attr(root, "cicd.pipeline.result"), "success");
    assert_eq!(attr(root, "cicd.pipeline.run.id"), "u1");
    assert_eq!(attr(root, "cicd.pipeline.name"), "eks upgrade prod");
    assert_eq!(attr(root, "eks.upgrade.id"), "u1");
    assert_eq!(attr(root, "eks.cluster.name"), "prod");
    assert_eq!(attr(root, "eks.plan.id"), "p1");
    assert_eq!(attr(root, "eks.meta.team"), "platform");
    assert_eq!(root.start_time_unix_nano, at("upgrade.started", None, 0));
    assert_eq!(root.end_time_unix_nano, at("upgrade.completed", None, 0));
    assert!(root.events.iter().any(|e| e.name == "upgrade.started"));

    let addons = by("addons", "0");
    let nodes0 = by("nodes", "0");
    let nodes1 = by("nodes", "1");
    let ng1_0 = by("ng-1", "0");
    let ng1_1 = by("ng-1", "1");
    let ng2 = by("ng-2", "0");
    // Parents: top-level tasks under the root; each attempt of a subtask under the attempt of
    // its parent that was running.
    for (child, parent) in [
        (addons, root),
        (nodes0, root),
        (nodes1, root),
        (ng1_0, nodes0),
        (ng1_1, nodes1),
        (ng2, nodes1),
    ] {
        assert_eq!(
            child.parent_span_id, parent.span_id,
            "{} under {}",
            child.name, parent.name
        );
        assert!(
            child.start_time_unix_nano >= parent.start_time_unix_nano,
            "{}",
            child.name
        );
        assert!(
            child.end_time_unix_nano <= parent.end_time_unix_nano,
            "{}",
            child.name
        );
        assert!(child.start_time_unix_nano <= child.end_time_unix_nano);
        for key in [
            "eks.upgrade.id",
            "eks.cluster.name",
            "eks.plan.id",
            "eks.meta.team",
        ] {
            assert_eq!(attr(child, key), attr(root, key), "{key} of {}", child.name);
        }
        assert_eq!(attr(child, "eks.task.type"), "upgrade_step");
        assert_eq!(attr(child, "eks.task.id"), child.name);
        assert_eq!(attr(child, "cicd.pipeline.task.name"), child.name);
        assert_eq!(attr(child, "cicd.pipeline.run.id"), "u1");
    }
    // Statuses: the failed attempt and its group are errors with the message.
    for (s, message) in [
        (ng1_0, "drain timed out"),
        (nodes0, "subtask \"ng-1\" failed: drain timed out"),
    ] {
        let st = s.status.as_ref().unwrap();
        assert_eq!(st.code, StatusCode::Error as i32, "{}", s.name);
        assert_eq!(st.message, message, "{}", s.name);
        assert_eq!(attr(s, "cicd.pipeline.task.run.result"), "failure");
    }
    for s in [addons, nodes1, ng1_1, ng2] {
        assert_eq!(
            s.status.as_ref().unwrap().code,
            StatusCode::Ok as i32,
            "{}",
            s.name
        );
        assert_eq!(attr(s, "cicd.pipeline.task.run.result"), "success");
    }
    // A retry is a new span linked to the failed attempt's span.
    assert_ne!(ng1_0.span_id, ng1_1.span_id);
    assert_eq!(ng1_1.links.len(), 1);
    assert_eq!(ng1_1.links[0].span_id, ng1_0.span_id);
    assert_eq!(&ng1_1.links[0].trace_id, trace);
    assert_eq!(nodes1.links[0].span_id, nodes0.span_id);
    assert!(ng1_0.links.is_empty() && addons.links.is_empty());
    assert_ne!(
        attr(ng1_0, "cicd.pipeline.task.run.id"),
        attr(ng1_1, "cicd.pipeline.task.run.id")
    );
    // Timings: each attempt from its first event to its ending event.
    assert_eq!(
        addons.start_time_unix_nano,
        at("task.started", Some("addons"), 0)
    );
    assert_eq!(
        addons.end_time_unix_nano,
        at("task.completed", Some("addons"), 0)
    );
    assert_eq!(
        ng1_0.start_time_unix_nano,
        at("task.started", Some("ng-1"), 0)
    );
    assert_eq!(ng1_0.end_time_unix_nano, at("task.failed", Some("ng-1"), 0));
    assert_eq!(
        ng1_1.start_time_unix_nano,
        at("task.retried", Some("ng-1"), 0)
    );
    assert_eq!(
        ng1_1.end_time_unix_nano,
        at("task.completed", Some("ng-1"), 0)
    );
    assert_eq!(
        nodes0.start_time_unix_nano,
        at("task.started", Some("nodes"), 0)
    );
    assert_eq!(
        nodes1.start_time_unix_nano,
        at("task.retried", Some("nodes"), 0)
    );
    assert_eq!(
        nodes1.end_time_unix_nano,
        at("task.completed", Some("nodes"), 0)
    );
    // Span events: progress updates and steps of that attempt, in order, with their messages.
    let names = |s: &Span| s.events.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(addons),
        ["task.started", "task.progress", "task.completed"]
    );
    assert_eq!(
        value(&addons.events[1].attributes, "eks.message").as_deref(),
        Some("half")
    );
    assert_eq!(
        value(&addons.events[1].attributes, "eks.percentage").as_deref(),
        Some("50")
    );
    assert_eq!(
        names(ng1_0),
        ["task.started", "task.progress", "task.failed"]
    );
    assert_eq!(names(ng1_1), ["task.retried", "task.completed"]);
    assert_eq!(names(ng2), ["task.started", "task.step", "task.completed"]);
    assert!(spans.values().all(|s| s.dropped_events_count == 0));
    // Resource and transport.
    for e in got.lock().unwrap().iter() {
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.headers["content-type"], "application/x-protobuf");
        let resource = e.request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(
            value(&resource.attributes, "service.name").as_deref(),
            Some(service)
        );
    }
}

#[test]
fn a_scripted_upgrade_is_one_trace_with_its_headers() {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let flags = [
        "--otlp-endpoint",
        base.as_str(),
        "--otlp-header",
        "x-team=ops",
    ];
    let run = |args: &[&str]| {
        let mut a = flags.to_vec();
        a.extend_from_slice(args);
        env.ok(&a)
    };
    script(&env, &flags);
    let flushed = run(&["notify", "flush", "--timeout", "20"]);
    assert!(flushed.contains("0 still pending"), "{flushed}");
    let spans = spans(&got);
    check_trace(&env, &spans, "eks-upgrade-agent", &got);
    let exports = got.lock().unwrap();
    assert!(exports.iter().all(|e| e.headers["x-team"] == "ops"));
    assert!(
        exports
            .iter()
            .all(|e| !e.headers.contains_key("content-encoding"))
    );
    drop(exports);
    let status: Value = serde_json::from_str(&run(&["-o", "json", "notify", "status"])).unwrap();
    let otlp = &status.as_array().unwrap()[0];
    assert!(
        otlp["sink"]
            .as_str()
            .unwrap()
            .starts_with("otlp:127.0.0.1:"),
        "{otlp}"
    );
    assert_eq!(otlp["pending"], 0, "{otlp}");
    assert_eq!(otlp["dead"], 0, "{otlp}");
}

#[test]
fn the_variable_s_headers_reach_the_receiver() {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let mut c = env.command();
    c.env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20t0k,x-team=env",
        )
        .args(["--otlp-header", "x-team=flag"]);
    c.args([
        "progress",
        "upgrade",
        "create",
        "u",
        "--plan",
        "p",
        "--cluster",
        "c",
    ]);
    assert!(c.output().unwrap().status.success());
    for args in [
        ["progress", "upgrade", "start", "u"],
        ["progress", "upgrade", "fail", "u"],
    ] {
        let mut c = env.command();
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", &base)
            .env(
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20t0k,x-team=env",
            )
            .args(["--otlp-header", "x-team=flag"])
            .args(args);
        if args[2] == "fail" {
            c.args(["--error", "control plane stuck"]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let exports = got.lock().unwrap();
    assert_eq!(exports.len(), 1, "one span: the failed upgrade");
    assert_eq!(exports[0].headers["authorization"], "Bearer t0k");
    assert_eq!(
        exports[0].headers["x-team"], "flag",
        "the flag wins over the variable"
    );
    let span = &exports[0].request.resource_spans[0].scope_spans[0].spans[0];
    let st = span.status.as_ref().unwrap();
    assert_eq!(st.code, StatusCode::Error as i32);
    assert_eq!(st.message, "control plane stuck");
    assert_eq!(attr(span, "cicd.pipeline.result"), "failure");
}

#[test]
fn a_receiver_down_for_seconds_loses_nothing_and_gzip_decodes() {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    // Endpoint from the standard variable, compression and resource from the file.
    let config = env.data_dir().join("config.toml");
    std::fs::write(
        &config,
        "otlp_compression = \"gzip\"\notlp_resource_attributes = [\"deployment.environment=prod\"]\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let base = format!("http://{addr}");
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", base.as_str()),
        ("OTEL_SERVICE_NAME", "upgrader"),
        ("EUA_CONFIG", config.as_str()),
    ];
    let run = |args: &[&str]| {
        let mut c = env.command();
        c.envs(vars).args(args);
        c.output().unwrap()
    };
    let down_since = Instant::now();
    // The whole script runs while the receiver is down: every command still succeeds.
    {
        // `script` uses `env.ok` (no variables): give it the endpoint as a flag, the rest comes
        // from the flush below.
        let flag = ["--otlp-endpoint", base.as_str()];
        script(&env, &flag);
    }
    let status = run(&["-o", "json", "notify", "status"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(status[0]["pending"].as_u64().unwrap() > 0, "{status}");
    assert!(
        status[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("Connection refused"),
        "{status}"
    );
    // Up again after 4 s.
    let up = std::thread::spawn(move || {
        let wait = Duration::from_secs(4).saturating_sub(down_since.elapsed());
        std::thread::sleep(wait);
        receiver_on(TcpListener::bind(addr).unwrap())
    });
    let out = run(&["notify", "flush", "--timeout", "40"]);
    let got = up.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(down_since.elapsed() >= Duration::from_secs(4));
    let spans = spans(&got);
    check_trace(&env, &spans, "upgrader", &got);
    for e in got.lock().unwrap().iter() {
        assert_eq!(e.headers["content-encoding"], "gzip");
        let resource = e.request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(
            value(&resource.attributes, "deployment.environment").as_deref(),
            Some("prod")
        );
    }
}

#[test]
fn plain_http_goes_only_to_loopback() {
    let env = Env::with_task();
    let out = env
        .command()
        .args([
            "--otlp-endpoint",
            "http://collector.example:4318",
            "notify",
            "status",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing plain http to the OTLP endpoint"),
        "{err}"
    );
    let err = env.fails(1, &["--otlp-header", "novalue", "notify", "status"]);
    assert!(
        err.contains("invalid --otlp-header entry \"novalue\": expected key=value"),
        "{err}"
    );
}

/// Row N21, `/metrics`: `serve` with the OTLP sink (down, its URL holding a secret path and a
/// query token, a header holding an API key; credentials in a plain-http URL are refused) shows it in
/// `eua_notifications_pending` by its label `otlp:HOST:PORT#xxxxxx` only, with the span that
/// waits for it counted.
#[test]
fn metrics_show_the_otlp_sink_by_its_label_only() {
    let env = Env::with_task();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/private/v1/traces?token=s3cr3t");
    let secrets = ["private", "v1/traces", "s3cr3t", "hdr-key"];
    let served = crate::util::serve(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.as_str()),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=hdr-key"),
        ],
    );
    for action in ["start", "complete"] {
        let resp = crate::util::http(
            served.port,
            &format!(
                "POST /api/v1/upgrades/u/tasks/t/{action} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            ),
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    let text = crate::util::http(
        served.port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let prefix = format!("eua_notifications_pending{{sink=\"otlp:127.0.0.1:{port}#");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no OTLP sink in /metrics: {text}"));
    // `otlp:127.0.0.1:PORT#` and six hex digits, then the value.
    let (label, value) = line[prefix.len()..].split_once("\"} ").unwrap();
    assert!(
        label.len() == 6 && label.chars().all(|c| c.is_ascii_hexdigit()),
        "{line}"
    );
    let pending: u64 = value.trim().parse().unwrap();
    assert!(pending >= 1, "the task's span waits for the sink: {line}");
    for s in secrets {
        assert!(!text.contains(s), "{s:?} shown in /metrics: {text}");
    }
}

/// Rows N21 and N13 for the OTLP sink: a one-shot command's stderr, with the library's logs at
/// their most verbose (-vvv), names the sink by its label only, whether the export fails (the
/// collector is down) or the sink cannot be set up (credentials over plain http).
#[test]
fn one_shot_stderr_holds_no_otlp_secret() {
    let env = Env::with_task();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let secrets = ["alice", "hunter2", "private", "s3cr3t", "hdr-key"];
    env.ok(&[
        "progress",
        "task",
        "add",
        "u",
        "t2",
        "--name",
        "T2",
        "--type",
        "upgrade_step",
    ]);
    for (task, url, expect) in [
        (
            "t",
            format!("http://127.0.0.1:{port}/private/v1/traces?token=s3cr3t"),
            "not delivered yet",
        ),
        (
            "t2",
            // Loopback is judged on the host alone: credentials over plain http are refused
            // beyond this machine.
            format!("http://alice:hunter2@collector.invalid:{port}/private/v1/traces?token=s3cr3t"),
            "refusing plain http to the OTLP endpoint otlp:collector.invalid:",
        ),
    ] {
        for action in ["start", "complete"] {
            let out = env
                .command()
                .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url)
                .env("OTEL_EXPORTER_OTLP_HEADERS", "api-key=hdr-key")
                .args(["-vvv", "progress", "task", action, "u", task])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if action == "start" {
                assert!(out.status.success(), "{out:?}");
                continue;
            }
            // The completion ends a span: it is what the sink tries to export.
            assert!(out.status.success(), "{out:?}");
            assert!(stderr.contains(expect), "{stderr}");
            for s in secrets {
                assert!(!stderr.contains(s), "{s:?} shown on stderr: {stderr}");
            }
        }
    }
}

/// A JUnit report of suite `smoke`: `(name, outcome)`, outcome `pass`, `fail`, `error` or
/// `skip`, one second each.
fn junit(env: &Env, file: &str, cases: &[(&str, &str)]) -> String {
    let mut xml = String::from("<?xml version=\"1.0\"?>\n<testsuite name=\"smoke\">\n");
    for (name, outcome) in cases {
        let inner = match *outcome {
            "pass" => String::new(),
            "fail" => format!("<failure message=\"{name} broke\">trace</failure>"),
            "error" => format!("<error message=\"{name} errored\"/>"),
            "skip" => "<skipped/>".into(),
            other => panic!("{other}"),
        };
        xml.push_str(&format!(
            "  <testcase classname=\"tests.api\" name=\"{name}\" time=\"1.0\">{inner}</testcase>\n"
        ));
    }
    xml.push_str("</testsuite>\n");
    let path = env.data_dir().join(file);
    std::fs::write(&path, xml).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Issue #14 "a validation run as a span with one event per failed test": every test run of
/// the upgrade is a span under its root span (name with phase and suite, from the run's start
/// to its recording, the counts as attributes, `ERROR` when tests failed, one event per failing
/// test with its name and message), exported once, when recorded, whatever its phase and
/// result, before or after the upgrade's end; a re-sent span is the same bytes.
#[test]
fn test_runs_are_spans_of_the_upgrade_trace() {
    use eks_upgrade_agent::notify::otlp::{run_span_id, trace_id};
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let refuse = Arc::new(AtomicUsize::new(0));
    let got = receiver_refusing(listener, refuse.clone());
    let flags = ["--otlp-endpoint", base.as_str()];
    let run = |args: &[&str]| {
        let mut a = flags.to_vec();
        a.extend_from_slice(args);
        env.ok(&a)
    };
    let ingest = |file: &str, phase: &str| -> Value {
        let mut a = flags.to_vec();
        a.extend(["tests", "ingest", file, "--upgrade", "u1"]);
        a.extend(["--phase", phase]);
        env.json(&a)
    };
    run(&[
        "progress",
        "upgrade",
        "create",
        "u1",
        "--plan",
        "p1",
        "--cluster",
        "prod",
        "--meta",
        "team=platform",
    ]);
    run(&["progress", "upgrade", "start", "u1"]);
    let pre = junit(
        &env,
        "pre.xml",
        &[("health", "pass"), ("pods", "pass"), ("dns", "pass")],
    );
    let pre = ingest(&pre, "pre");
    let post = junit(
        &env,
        "post.xml",
        &[
            ("health", "pass"),
            ("pods", "fail"),
            ("dns", "error"),
            ("later", "skip"),
        ],
    );
    let post = ingest(&post, "post");
    // Both runs are exported when recorded, before the upgrade ends.
    let id_of = |r: &Value| r["run_id"].as_str().unwrap().to_owned();
    let find = |run_id: &str| -> Option<Span> {
        spans(&got)
            .into_values()
            .find(|s| value(&s.attributes, "eks.test_run.id").as_deref() == Some(run_id))
    };
    assert!(find(&id_of(&pre)).is_some(), "the pre run at once");
    assert!(
        find(&id_of(&post)).is_some(),
        "the failing post run at once"
    );
    run(&["progress", "upgrade", "complete", "u1"]);
    // After the end: a failing post run, then a passing post run whose first export the
    // collector refuses (re-sent by the flush), then a pre run.
    let late = junit(&env, "late.xml", &[("health", "fail"), ("pods", "pass")]);
    let late = ingest(&late, "post");
    refuse.store(1, Ordering::SeqCst);
    let passing = junit(&env, "passing.xml", &[("health", "pass")]);
    let passing = ingest(&passing, "post");
    let late_pre = junit(&env, "late-pre.xml", &[("health", "pass"), ("dns", "skip")]);
    let late_pre = ingest(&late_pre, "pre");
    let flushed = run(&["notify", "flush", "--timeout", "20"]);
    assert!(flushed.contains("0 still pending"), "{flushed}");
    assert_eq!(refuse.load(Ordering::SeqCst), 0, "an export was refused");

    let all = spans(&got);
    let root = all
        .values()
        .find(|s| s.name == "eks upgrade prod")
        .expect("the root span");
    assert_eq!(all.len(), 6, "the root and five runs");
    for (r, name, phase, status, message) in [
        (&pre, "tests pre: smoke", "pre", StatusCode::Ok, ""),
        (
            &post,
            "tests post: smoke",
            "post",
            StatusCode::Error,
            "2 of 4 tests failed",
        ),
        (
            &late,
            "tests post: smoke",
            "post",
            StatusCode::Error,
            "1 of 2 tests failed",
        ),
        (&passing, "tests post: smoke", "post", StatusCode::Ok, ""),
        (&late_pre, "tests pre: smoke", "pre", StatusCode::Ok, ""),
    ] {
        let id = id_of(r);
        let s = find(&id).unwrap_or_else(|| panic!("no span for run {id}"));
        assert_eq!(s.name, name);
        assert_eq!(s.trace_id, root.trace_id);
        assert_eq!(s.trace_id, trace_id("u1"));
        assert_eq!(s.span_id, run_span_id("u1", &id), "the run's own id");
        assert_eq!(s.parent_span_id, root.span_id, "{name} under the root");
        let st = s.status.as_ref().unwrap();
        assert_eq!((st.code, st.message.as_str()), (status as i32, message));
        assert_eq!(attr(&s, "eks.test_run.phase"), phase);
        assert_eq!(attr(&s, "cicd.pipeline.task.type"), "test");
        assert_eq!(attr(&s, "cicd.pipeline.task.run.id"), id);
        assert_eq!(attr(&s, "test.suite.name"), "smoke");
        for key in [
            "eks.upgrade.id",
            "eks.cluster.name",
            "eks.plan.id",
            "eks.meta.team",
            "cicd.pipeline.name",
            "cicd.pipeline.run.id",
        ] {
            assert_eq!(attr(&s, key), attr(root, key), "{key} of {name}");
        }
        for key in ["tests", "passed", "failed", "errors", "skipped"] {
            assert_eq!(
                attr(
                    &s,
                    &format!("eks.tests.{}", if key == "tests" { "total" } else { key })
                ),
                r[key].to_string(),
                "{key} of {name}"
            );
        }
        // From the run's start (its recording less its tests' time) to its recording.
        assert_eq!(s.end_time_unix_nano, nanos(&r["created_at"]));
        let secs = r["duration"].as_f64().unwrap();
        assert_eq!(
            s.end_time_unix_nano - s.start_time_unix_nano,
            (secs * 1e9) as u64
        );
    }
    let post = find(&id_of(&post)).unwrap();
    let events: Vec<(String, String, String)> = post
        .events
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                value(&e.attributes, "test.case.name").unwrap(),
                value(&e.attributes, "eks.message").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            (
                "test.error".to_owned(),
                "tests.api.dns".to_owned(),
                "dns errored".to_owned()
            ),
            (
                "test.failed".to_owned(),
                "tests.api.pods".to_owned(),
                "pods broke".to_owned()
            ),
        ]
    );
    assert_eq!(post.dropped_events_count, 0);
    assert!(
        post.events
            .iter()
            .all(|e| e.time_unix_nano == post.end_time_unix_nano)
    );
    assert!(find(&id_of(&pre)).unwrap().events.is_empty());
    // Once each, accepted; the refused export's copy is the re-sent one, byte for byte.
    let mut copies: HashMap<Vec<u8>, Vec<(bool, Vec<u8>)>> = HashMap::new();
    for e in got.lock().unwrap().iter() {
        for s in &e.request.resource_spans[0].scope_spans[0].spans {
            copies
                .entry(s.span_id.clone())
                .or_default()
                .push((e.accepted, s.encode_to_vec()));
        }
    }
    for (id, c) in &copies {
        assert_eq!(c.iter().filter(|(ok, _)| *ok).count(), 1, "{id:?} once");
        assert!(c.windows(2).all(|w| w[0].1 == w[1].1), "copies differ");
    }
    let resent = &copies[&run_span_id("u1", &id_of(&passing)).to_vec()];
    assert_eq!(
        resent.iter().map(|(ok, _)| *ok).collect::<Vec<_>>(),
        [false, true],
        "the passing post run refused, then re-sent"
    );
}

/// The run an ingest of `xml` records for a new upgrade, and its span as the sink exports it.
fn run_span_of(xml: &str) -> (Value, Span, String) {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let got = receiver_on(listener);
    let flags = ["--otlp-endpoint", base.as_str()];
    let mut a = flags.to_vec();
    a.extend([
        "progress",
        "upgrade",
        "create",
        "u1",
        "--plan",
        "p",
        "--cluster",
        "c",
    ]);
    env.ok(&a);
    let path = env.data_dir().join("two.xml");
    std::fs::write(&path, xml).unwrap();
    let mut a = vec!["-o", "json"];
    a.extend(flags);
    a.extend(["tests", "ingest", path.to_str().unwrap(), "--upgrade", "u1"]);
    a.extend(["--phase", "adhoc"]);
    let out = env.run(&a);
    assert!(out.status.success(), "{out:?}");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = run["run_id"].as_str().unwrap();
    let span = spans(&got)
        .into_values()
        .find(|s| value(&s.attributes, "eks.test_run.id").as_deref() == Some(id))
        .expect("the run's span");
    (run, span, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A run's span lasts its longest suite's total time, not the sum over suites (which may run in
/// parallel): suites of 2 s and 3 s without timestamps give a 3 s span ending at the recording.
#[test]
fn a_run_span_lasts_its_longest_suite() {
    let (run, span, _) = run_span_of(
        r#"<?xml version="1.0"?>
<testsuites>
  <testsuite name="alpha">
    <testcase classname="t" name="a1" time="1.0"/>
    <testcase classname="t" name="a2" time="1.0"/>
  </testsuite>
  <testsuite name="beta">
    <testcase classname="t" name="b1" time="3.0"/>
  </testsuite>
</testsuites>
"#,
    );
    assert_eq!(run["duration"].as_f64(), Some(5.0), "{run}");
    assert_eq!(span.end_time_unix_nano, nanos(&run["created_at"]));
    assert_eq!(
        span.end_time_unix_nano - span.start_time_unix_nano,
        3_000_000_000
    );
}

/// N27: with `<testsuite timestamp>`s, a run's span starts at the earliest suite timestamp and
/// ends at the latest suite end (timestamp + `time`), whatever the recording time: a zone-less
/// timestamp is UTC, an offset is honoured, fractions kept; a suite without a timestamp counts
/// for nothing; an unreadable timestamp is ignored with a warning, the report still taken.
#[test]
fn a_run_span_runs_from_its_suites_timestamps() {
    let (run, span, stderr) = run_span_of(
        r#"<?xml version="1.0"?>
<testsuites>
  <testsuite name="alpha" timestamp="2026-01-01T00:00:10.5" time="2.0">
    <testcase classname="t" name="a1" time="1.0"/>
    <testcase classname="t" name="a2" time="1.0"/>
  </testsuite>
  <testsuite name="beta" timestamp="2026-01-01T01:00:20+01:00" time="7">
    <testcase classname="t" name="b1" time="3.0"/>
  </testsuite>
  <testsuite name="gamma" time="500">
    <testcase classname="t" name="c1" time="500"/>
  </testsuite>
  <testsuite name="delta" timestamp="the day before" time="900">
    <testcase classname="t" name="d1" time="1"/>
  </testsuite>
</testsuites>
"#,
    );
    assert_eq!(run["tests"].as_u64(), Some(5), "{run}");
    let at = |s: &str| nanos(&Value::String(s.into()));
    assert_eq!(span.start_time_unix_nano, at("2026-01-01T00:00:10.500Z"));
    assert_eq!(span.end_time_unix_nano, at("2026-01-01T00:00:27Z"));
    // Without the colours of a terminal's log.
    let mut plain = String::new();
    let mut rest = stderr.as_str();
    while let Some(i) = rest.find('\x1b') {
        plain.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |m| &rest[i + m + 1..]);
    }
    plain.push_str(rest);
    assert!(
        plain.contains("ignoring a <testsuite> timestamp")
            && plain.contains("timestamp=the day before")
            && plain.contains("two.xml\" line=13"),
        "{plain}"
    );
}

/// N27: suite times that end after the run was recorded (more than 5 min: a zone-less local
/// time east of UTC read as UTC) are not used: the span falls back to ending at the recording
/// and lasting its longest suite's test time.
#[test]
fn suite_times_after_the_recording_are_not_used() {
    let later = (chrono::Utc::now() + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let (run, span, _) = run_span_of(&format!(
        r#"<testsuite name="east" timestamp="{later}" time="60">
  <testcase classname="t" name="e1" time="2.0"/>
</testsuite>"#
    ));
    assert_eq!(span.end_time_unix_nano, nanos(&run["created_at"]));
    assert_eq!(
        span.end_time_unix_nano - span.start_time_unix_nano,
        2_000_000_000
    );
}

/// A report with many unreadable suite timestamps warns about the first five, each with its
/// line, and counts the rest in one warning (a log line per suite would flood the log).
#[test]
fn unreadable_timestamps_warn_a_few_times_then_count() {
    let suites: String = (0..8)
        .map(|i| {
            format!(
                "<testsuite name=\"s{i}\" timestamp=\"bad{i}\"><testcase name=\"t\"/></testsuite>\n"
            )
        })
        .collect();
    let (run, _, stderr) = run_span_of(&format!("<testsuites>\n{suites}</testsuites>"));
    assert_eq!(run["tests"].as_u64(), Some(8), "{run}");
    assert_eq!(
        stderr.matches("ignoring a <testsuite> timestamp").count(),
        5,
        "{stderr}"
    );
    assert!(
        stderr.contains("ignoring more <testsuite> timestamps") && stderr.contains("3"),
        "{stderr}"
    );
}

mod server;
