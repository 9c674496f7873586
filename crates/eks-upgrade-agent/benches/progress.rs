//! `cargo bench -p eks-upgrade-agent --bench progress`
//!
//! Prints one figure per line, each label saying what it measures:
//! - `progress_updates_per_s tasks=N txn=1`: `ProgressTracker::update_task` calls per second,
//!   each one its own acknowledged transaction at the default durability, round-robin over N
//!   tasks;
//! - `notified_calls_per_s tasks=1000 txn=1 sinks=S`: start and complete calls (each notified,
//!   each its own transaction) per second, with no sink, with an EventBridge sink whose endpoint
//!   refuses connections (`eventbridge-down`), and with a webhook that accepts the connection
//!   and never answers (`webhook-hang`), both delivering in the background all along; the
//!   ratios to no sink show whether an outage slows progress calls;
//! - `progress_updates_per_s tasks=1000 sinks=S`: acknowledged calls per second, round-robin
//!   `update_task` over 1,000 running tasks where every 50th update also completes the oldest
//!   task and starts a fresh one (2 notified calls, so spans end all along), with no sink and
//!   with an OTLP sink exporting to a loopback receiver in the background (`otlp`; the
//!   receiver decodes the spans, their count is printed); each the median of 3 rounds run
//!   alternately (none, otlp, none, ...) on copies of one store, each round's pair printed;
//!   `otlp_ratio` is the ratio of the medians. Run only these rows with
//!   `cargo bench -p eks-upgrade-agent --bench progress -- otlp`;
//! - `-- completions` runs only the rows whose calls complete tasks (`progress_updates_per_s
//!   tasks=1000 sinks=none` and `notified_calls_per_s ... sinks=none`), for before/after
//!   comparisons of the completion path;
//! - `apply_updates_per_s tasks=1000 group=1` and `group<=1024`: JSON Lines through the
//!   `progress apply` engine, acknowledged lines per second, one transaction per line and with
//!   group commit (lines already buffered share a transaction, up to 1,024);
//! - `reopen_ms events=1000000`: open a store holding 1M events and compute a summary, in a fresh
//!   process, median of 5, with the page cache warm (`warm`) and with the database and WAL
//!   dropped from the page cache first (`cold`, `posix_fadvise(DONTNEED)` after an fsync), and
//!   the process's peak RSS (`reopen_peak_rss_kib`), beside the same on a store with 1,000
//!   events.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::{JsonMap, TaskType};
use eks_upgrade_agent::notify::{
    Dispatcher, DispatcherOptions, EventBridgeSink, Format, WebhookSink,
};
use eks_upgrade_agent::progress::apply::{self, ApplyOptions};
use eks_upgrade_agent::progress::{Command, NewTask};
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

const REOPEN_ENV: &str = "EUA_BENCH_REOPEN";

/// Rounds of each `sinks=S` measurement.
const SINK_ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Set (with the AWS variables) in the child process that measures with a dead sink.
const SINK_ENV: &str = "EUA_BENCH_SINK_DOWN";

/// A sink for the notified-calls measurement.
#[derive(Clone, Copy, PartialEq)]
enum Sink {
    None,
    EventBridgeDown,
    WebhookHang,
}

fn tracker(dir: &Path) -> ProgressTracker {
    ProgressTracker::new(Arc::new(
        SqliteStore::open(dir, &SqliteOptions::default()).expect("open store"),
    ))
}

fn setup(t: &ProgressTracker, tasks: usize) {
    t.create_upgrade("bench", "plan", "cluster", JsonMap::new())
        .unwrap();
    t.start_upgrade("bench", Some("nodes")).unwrap();
    let new: Vec<_> = (0..tasks)
        .map(|i| {
            NewTask::new(
                format!("task-{i}"),
                format!("Task {i}"),
                TaskType::UpgradeStep,
            )
        })
        .collect();
    t.add_tasks("bench", new).unwrap();
}

fn updates_per_s(tasks: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path());
    setup(&t, tasks);
    measure(&t, tasks)
}

/// Acknowledged `update_task` calls per second, round-robin over the tasks.
fn measure(t: &ProgressTracker, tasks: usize) -> f64 {
    let ids: Vec<String> = (0..tasks).map(|i| format!("task-{i}")).collect();
    // Warm up, then measure for a fixed time.
    let mut n = 0usize;
    let mut run = |limit: Duration| {
        let start = Instant::now();
        let mut count = 0usize;
        while start.elapsed() < limit {
            for _ in 0..1000 {
                let pct = ((n / tasks) % 100) as f64;
                t.update_task(
                    "bench",
                    &ids[n % tasks],
                    pct,
                    Some("working"),
                    JsonMap::new(),
                )
                .unwrap();
                n += 1;
                count += 1;
            }
        }
        count as f64 / start.elapsed().as_secs_f64()
    };
    run(Duration::from_millis(500));
    run(Duration::from_secs(3))
}

/// Start and complete calls per second (every one notified), over fresh tasks, while `sink`
/// delivers in the background. Returns the rate and what the sink still had pending at the end
/// (proof that it was really down or hanging).
fn notified_calls_per_s(sink: Sink) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let t = ProgressTracker::new(store.clone());
    // Enough fresh tasks for the whole run (a started task cannot start again).
    let tasks = 400_000;
    t.create_upgrade("bench", "plan", "cluster", JsonMap::new())
        .unwrap();
    t.start_upgrade("bench", Some("nodes")).unwrap();
    for chunk in 0..tasks / 50_000 {
        let new: Vec<_> = (chunk * 50_000..(chunk + 1) * 50_000)
            .map(|i| {
                NewTask::new(
                    format!("task-{i}"),
                    format!("Task {i}"),
                    TaskType::UpgradeStep,
                )
            })
            .collect();
        t.add_tasks("bench", new).unwrap();
    }
    let _hold: Option<std::net::TcpListener>;
    let sinks: Vec<Arc<dyn eks_upgrade_agent::notify::EventSink>> = match sink {
        Sink::None => {
            _hold = None;
            Vec::new()
        }
        Sink::EventBridgeDown => {
            _hold = None;
            vec![Arc::new(
                EventBridgeSink::from_env(
                    "bench",
                    "eks-upgrade-agent",
                    Format::Reference,
                    Some("us-east-1"),
                    Duration::from_secs(2),
                )
                .unwrap(),
            )]
        }
        Sink::WebhookHang => {
            // Accepts connections (the kernel's backlog) and never answers.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/hook", listener.local_addr().unwrap());
            _hold = Some(listener);
            vec![Arc::new(
                WebhookSink::new(
                    &url,
                    None,
                    Format::Reference,
                    "eks-upgrade-agent",
                    Duration::from_secs(30),
                )
                .unwrap(),
            )]
        }
    };
    let dispatcher = (!sinks.is_empty()).then(|| {
        Arc::new(Dispatcher::new(
            store.clone(),
            sinks,
            DispatcherOptions::default(),
        ))
    });
    let handle = dispatcher.clone().map(|d| d.spawn());
    let mut next = 0usize;
    let mut run = |limit: Duration| {
        let start = Instant::now();
        let mut calls = 0usize;
        while start.elapsed() < limit && next + 100 < tasks {
            for _ in 0..100 {
                let id = format!("task-{next}");
                t.start_task("bench", &id, None).unwrap();
                t.complete_task("bench", &id, None).unwrap();
                next += 1;
                calls += 2;
            }
        }
        calls as f64 / start.elapsed().as_secs_f64()
    };
    run(Duration::from_millis(500));
    let rate = run(Duration::from_secs(3));
    let pending = dispatcher
        .as_ref()
        .map(|d| d.status().unwrap()[0].pending)
        .unwrap_or(0);
    // A hanging delivery would hold the join for its timeout: let it go with the process.
    std::mem::forget(handle);
    (rate, pending)
}

/// A loopback OTLP/HTTP receiver answering 200, keeping connections open as collectors do;
/// counts the spans it decodes.
fn otlp_receiver() -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = spans.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            // One request after the other on this connection, until the client closes it.
            'requests: loop {
                let mut len = 0;
                let mut head = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break 'requests;
                    }
                    if line.trim().is_empty() {
                        if head == 0 {
                            continue;
                        }
                        break;
                    }
                    head += 1;
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
                let n: usize = req
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len())
                    .sum();
                count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_err() {
                    break;
                }
            }
        }
    });
    (url, spans)
}

/// Running tasks of the `sinks=S` rows, and tasks in all.
const SINK_LIVE: usize = 1000;
const SINK_TASKS: usize = 200_000;

/// The store every `sinks=S` round starts from (an upgrade of [`SINK_TASKS`] tasks, the first
/// [`SINK_LIVE`] running), built once and copied per round.
fn sink_template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path());
    t.create_upgrade("bench", "plan", "cluster", JsonMap::new())
        .unwrap();
    t.start_upgrade("bench", Some("nodes")).unwrap();
    for chunk in 0..SINK_TASKS / 50_000 {
        let new: Vec<_> = (chunk * 50_000..(chunk + 1) * 50_000)
            .map(|i| {
                NewTask::new(
                    format!("task-{i}"),
                    format!("Task {i}"),
                    TaskType::UpgradeStep,
                )
            })
            .collect();
        t.add_tasks("bench", new).unwrap();
    }
    for i in 0..SINK_LIVE {
        t.start_task("bench", &format!("task-{i}"), None).unwrap();
    }
    // Closing the last connection checkpoints the WAL into the database file.
    drop(t);
    dir
}

/// See `progress_updates_per_s tasks=1000 sinks=S` in the header: one round, on a copy of
/// `template`. Returns the rate and the spans the receiver decoded (0 without the sink).
fn updates_with_sink_per_s(template: &Path, otlp: bool) -> (f64, u64) {
    use eks_upgrade_agent::notify::OtlpSink;
    use eks_upgrade_agent::notify::otlp::OtlpSettings;
    use eks_upgrade_agent::store::sqlite::DB_FILE;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(template.join(DB_FILE), dir.path().join(DB_FILE)).unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let t = ProgressTracker::new(store.clone());
    let (live, tasks) = (SINK_LIVE, SINK_TASKS);
    let mut slots: Vec<usize> = (0..live).collect();
    let (dispatcher, spans) = if otlp {
        let (url, spans) = otlp_receiver();
        let sink = OtlpSink::new(
            &OtlpSettings {
                endpoint: Some(format!("{url}/v1/traces")),
                ..OtlpSettings::default()
            },
            store.clone(),
            Duration::from_secs(10),
        )
        .unwrap();
        let d = Arc::new(Dispatcher::new(
            store.clone(),
            vec![Arc::new(sink)],
            DispatcherOptions::default(),
        ));
        (Some(d), Some(spans))
    } else {
        (None, None)
    };
    let handle = dispatcher.clone().map(|d| d.spawn());
    let mut next = live;
    let mut n = 0usize;
    let mut run = |limit: Duration| {
        let start = Instant::now();
        let mut calls = 0usize;
        while start.elapsed() < limit && next + 100 < tasks {
            for _ in 0..1000 {
                let slot = n % live;
                let pct = ((n / live) % 100) as f64;
                t.update_task(
                    "bench",
                    &format!("task-{}", slots[slot]),
                    pct,
                    Some("working"),
                    JsonMap::new(),
                )
                .unwrap();
                n += 1;
                calls += 1;
                if n.is_multiple_of(50) {
                    let old = (n / 50) % live;
                    t.complete_task("bench", &format!("task-{}", slots[old]), None)
                        .unwrap();
                    slots[old] = next;
                    t.start_task("bench", &format!("task-{next}"), None)
                        .unwrap();
                    next += 1;
                    calls += 2;
                }
            }
        }
        calls as f64 / start.elapsed().as_secs_f64()
    };
    run(Duration::from_millis(500));
    let rate = run(Duration::from_secs(3));
    drop(handle);
    let delivered = match (&dispatcher, &spans) {
        (Some(d), Some(spans)) => {
            d.flush(Duration::from_secs(30)).unwrap();
            let st = &d.status().unwrap()[0];
            assert_eq!(
                (st.pending, st.dead),
                (0, 0),
                "the OTLP sink delivered everything"
            );
            spans.load(std::sync::atomic::Ordering::Relaxed)
        }
        _ => 0,
    };
    (rate, delivered)
}

fn apply_updates_per_s(tasks: usize, lines: usize, max_batch: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path());
    setup(&t, tasks);
    let mut input = Vec::with_capacity(lines * 120);
    for n in 0..lines {
        let c = Command::TaskUpdate {
            upgrade_id: "bench".into(),
            task_id: format!("task-{}", n % tasks),
            percentage: ((n / tasks) % 100) as f64,
            message: Some("working".into()),
            details: JsonMap::new(),
        };
        serde_json::to_writer(&mut input, &c).unwrap();
        input.push(b'\n');
    }
    let mut out = Vec::with_capacity(lines * 24);
    let start = Instant::now();
    let stats = apply::run(
        &t,
        Cursor::new(input),
        &mut out,
        &ApplyOptions {
            max_batch,
            ..Default::default()
        },
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(stats.ok as usize, lines, "every line acknowledged ok");
    stats.ok as f64 / secs
}

/// Fills a store with about `events` events through batched commands.
fn fill(dir: &Path, events: usize) {
    let t = tracker(dir);
    let tasks = 1000;
    setup(&t, tasks);
    let mut done = tasks + 2;
    let mut n = 0usize;
    while done < events {
        let batch: Vec<Command> = (0..5000.min(events - done))
            .map(|_| {
                n += 1;
                Command::TaskUpdate {
                    upgrade_id: "bench".into(),
                    task_id: format!("task-{}", n % tasks),
                    percentage: ((n / tasks) % 100) as f64,
                    message: Some("working".into()),
                    details: JsonMap::new(),
                }
            })
            .collect();
        done += batch.len();
        for r in t.execute_batch(&batch).unwrap() {
            r.unwrap();
        }
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// In a fresh process: open, summarize, print `ms rss_kib`.
fn reopen_child(dir: &str) {
    let start = Instant::now();
    let t = tracker(Path::new(dir));
    let s = t.summary("bench").unwrap();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    assert!(s.total_tasks > 0);
    println!("{ms:.2} {}", peak_rss_kib());
}

/// Drops the store's files from the page cache (after an fsync, so no page is dirty).
fn drop_from_page_cache(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let f = std::fs::File::open(&path).unwrap();
            f.sync_all().unwrap();
            rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        }
    }
}

/// Median open-and-summarize time of 5 fresh processes, and the median run's peak RSS.
fn reopen(events: usize, cold: bool) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), events);
    let mut runs = Vec::new();
    for _ in 0..5 {
        if cold {
            drop_from_page_cache(dir.path());
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(REOPEN_ENV, dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut parts = text.split_whitespace();
        let ms: f64 = parts.next().unwrap().parse().unwrap();
        let rss: u64 = parts.next().unwrap().parse().unwrap();
        runs.push((ms, rss));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}

fn main() {
    if let Ok(dir) = std::env::var(REOPEN_ENV) {
        reopen_child(&dir);
        return;
    }
    if std::env::var(SINK_ENV).is_ok() {
        let (rate, pending) = notified_calls_per_s(Sink::EventBridgeDown);
        println!("{rate:.1} {pending}");
        return;
    }
    // `cargo bench` passes `--bench`; accept and ignore libtest-style arguments.
    if std::env::args().any(|a| a == "completions") {
        // Only the rows whose calls complete tasks (each completion feeds the duration
        // history): for before/after comparisons.
        let template = sink_template();
        let (none, _) = updates_with_sink_per_s(template.path(), false);
        println!("progress_updates_per_s tasks=1000 sinks=none: {none:.0}");
        let (base, _) = notified_calls_per_s(Sink::None);
        println!("notified_calls_per_s tasks=1000 txn=1 sinks=none: {base:.0}");
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    let only_otlp = std::env::args().any(|a| a == "otlp");
    if !only_otlp {
        for tasks in [10, 1000, 10_000] {
            println!(
                "progress_updates_per_s tasks={tasks} txn=1: {:.0}",
                updates_per_s(tasks)
            );
        }
    }
    if quick {
        return;
    }
    // Rounds alternate between no sink and the OTLP sink, so that a burst of load from
    // elsewhere on the machine weighs on both; the medians are compared.
    let template = sink_template();
    let (mut none, mut otlp, mut spans) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SINK_ROUNDS {
        none.push(updates_with_sink_per_s(template.path(), false).0);
        let (rate, n) = updates_with_sink_per_s(template.path(), true);
        assert!(n > 0, "the OTLP receiver must have decoded spans");
        otlp.push(rate);
        spans.push(n);
    }
    let rounds: Vec<String> = none
        .iter()
        .zip(&otlp)
        .map(|(a, b)| format!("{a:.0}/{b:.0}"))
        .collect();
    let (none, otlp) = (median(none), median(otlp));
    println!(
        "progress_updates_per_s tasks=1000 sinks=none: {none:.0} (median of {SINK_ROUNDS} rounds)"
    );
    println!(
        "progress_updates_per_s tasks=1000 sinks=otlp: {otlp:.0} (median of {SINK_ROUNDS} rounds; \
         spans exported per round: {spans:?})"
    );
    println!("otlp_rounds none/otlp: {}", rounds.join(" "));
    println!("otlp_ratio: {:.3}", otlp / none);
    if only_otlp {
        return;
    }
    let (base, _) = notified_calls_per_s(Sink::None);
    // The dead EventBridge sink is measured in a child process whose AWS settings point at a
    // loopback port where nothing listens (dummy credentials, no metadata service).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(SINK_ENV, "1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut parts = text.split_whitespace();
    let down: f64 = parts.next().unwrap().parse().unwrap();
    let pending: u64 = parts.next().unwrap().parse().unwrap();
    assert!(pending > 0, "the EventBridge sink must really be down");
    let (hang, pending) = notified_calls_per_s(Sink::WebhookHang);
    assert!(pending > 0, "the webhook must really hang");
    println!("notified_calls_per_s tasks=1000 txn=1 sinks=none: {base:.0}");
    println!("notified_calls_per_s tasks=1000 txn=1 sinks=eventbridge-down: {down:.0}");
    println!("notified_calls_per_s tasks=1000 txn=1 sinks=webhook-hang: {hang:.0}");
    println!("eventbridge_down_ratio: {:.2}", down / base);
    println!("webhook_hang_ratio: {:.2}", hang / base);
    println!(
        "apply_updates_per_s tasks=1000 group=1: {:.0}",
        apply_updates_per_s(1000, 100_000, 1)
    );
    println!(
        "apply_updates_per_s tasks=1000 group<=1024: {:.0}",
        apply_updates_per_s(1000, 300_000, 1024)
    );
    for cold in [false, true] {
        let label = if cold { "cold" } else { "warm" };
        let (ms_small, rss_small) = reopen(1000, cold);
        let (ms, rss) = reopen(1_000_000, cold);
        println!("reopen_ms events=1000000 cache={label} median_of=5: {ms:.1}");
        println!("reopen_peak_rss_kib events=1000000 cache={label}: {rss}");
        println!("reopen_ms events=1000 cache={label} median_of=5: {ms_small:.1}");
        println!("reopen_peak_rss_kib events=1000 cache={label}: {rss_small}");
    }
}
