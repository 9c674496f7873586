//! `cargo bench -p eks-upgrade-agent --bench progress`
//!
//! Prints one figure per line:
//! - `progress_updates_per_s tasks=N`: `ProgressTracker::update_task` calls per second, each one
//!   its own acknowledged transaction at the default durability, round-robin over N tasks;
//! - `apply_updates_per_s tasks=1000`: JSON Lines through the `progress apply` engine,
//!   acknowledged lines per second;
//! - `reopen_ms events=1000000`: open a store holding 1M events and compute a summary, in a fresh
//!   process, with that process's peak RSS (`reopen_peak_rss_kib`) and, for comparison, the peak
//!   RSS of the same on a store with 1,000 events.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::{JsonMap, TaskType};
use eks_upgrade_agent::notify::{Dispatcher, DispatcherOptions, EventBridgeSink, Format};
use eks_upgrade_agent::progress::apply::{self, ApplyOptions};
use eks_upgrade_agent::progress::{Command, NewTask};
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

const REOPEN_ENV: &str = "EUA_BENCH_REOPEN";

/// Set (with the AWS variables) in the child process that measures with a dead sink.
const SINK_ENV: &str = "EUA_BENCH_SINK_DOWN";

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

/// Like `updates_per_s`, after starting every task (one `task.started` notification each); with
/// `eventbridge_down`, an EventBridge sink pointed at a port where nothing listens is delivering
/// (and failing) on a background dispatcher the whole time.
fn updates_with_sink(tasks: usize, eventbridge_down: bool) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let t = ProgressTracker::new(store.clone());
    setup(&t, tasks);
    let starts: Vec<Command> = (0..tasks)
        .map(|i| Command::TaskStart {
            upgrade_id: "bench".into(),
            task_id: format!("task-{i}"),
            message: None,
        })
        .collect();
    for r in t.execute_batch(&starts).unwrap() {
        r.unwrap();
    }
    let dispatcher = eventbridge_down.then(|| {
        let sink = EventBridgeSink::from_env(
            "bench",
            "eks-upgrade-agent",
            Format::Reference,
            Some("us-east-1"),
            Duration::from_secs(2),
        )
        .unwrap();
        Arc::new(Dispatcher::new(
            store.clone(),
            vec![Arc::new(sink)],
            DispatcherOptions::default(),
        ))
    });
    let handle = dispatcher.clone().map(|d| d.spawn());
    let rate = measure(&t, tasks);
    drop(handle);
    let pending = dispatcher
        .map(|d| d.status().unwrap()[0].pending)
        .unwrap_or(0);
    (rate, pending)
}

fn apply_updates_per_s(tasks: usize, lines: usize) -> f64 {
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
    let stats = apply::run(&t, Cursor::new(input), &mut out, &ApplyOptions::default()).unwrap();
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

fn reopen(events: usize) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), events);
    let mut best = (f64::MAX, 0);
    for _ in 0..3 {
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
        if ms < best.0 {
            best = (ms, rss);
        }
    }
    best
}

fn main() {
    if let Ok(dir) = std::env::var(REOPEN_ENV) {
        reopen_child(&dir);
        return;
    }
    if std::env::var(SINK_ENV).is_ok() {
        let (rate, pending) = updates_with_sink(1000, true);
        println!("{rate:.1} {pending}");
        return;
    }
    // `cargo bench` passes `--bench`; accept and ignore libtest-style arguments.
    let quick = std::env::args().any(|a| a == "quick");
    for tasks in [10, 1000, 10_000] {
        println!(
            "progress_updates_per_s tasks={tasks}: {:.0}",
            updates_per_s(tasks)
        );
    }
    if quick {
        return;
    }
    let (base, _) = updates_with_sink(1000, false);
    // The dead sink is measured in a child process whose AWS settings point at a loopback port
    // where nothing listens (dummy credentials, no metadata service).
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
    assert!(pending > 0, "the sink must really be down");
    println!("progress_updates_per_s tasks=1000 sinks=none: {base:.0}");
    println!("progress_updates_per_s tasks=1000 sinks=eventbridge-down: {down:.0}");
    println!("eventbridge_down_ratio: {:.2}", down / base);
    println!(
        "apply_updates_per_s tasks=1000: {:.0}",
        apply_updates_per_s(1000, 300_000)
    );
    let (ms_small, rss_small) = reopen(1000);
    let (ms, rss) = reopen(1_000_000);
    println!("reopen_ms events=1000000: {ms:.1}");
    println!("reopen_peak_rss_kib events=1000000: {rss}");
    println!("reopen_ms events=1000: {ms_small:.1}");
    println!("reopen_peak_rss_kib events=1000: {rss_small}");
}
