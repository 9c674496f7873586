//! `cargo bench -p eks-upgrade-agent-cli --bench postgres`
//!
//! Team mode on a throwaway PostgreSQL cluster (Debian's packages, fsync on, on this machine):
//! - `pg_apply_updates_per_s tasks=1000 group<=1024`: task updates as JSON Lines through the
//!   `progress apply` engine on the database, acknowledged lines per second;
//! - `pg_updates_per_s writers=16 replicas=3`: acknowledged task updates through the HTTP API
//!   of three `serve` replicas on one database, 16 writers (each on its own task of one
//!   upgrade, spread over the replicas, each reading every answer on a kept-alive
//!   connection), per second; below it, the replicas' commits per second and updates per
//!   commit (their `/metrics`);
//! - `pg_updates_per_s writers=16 replicas=3 upgrades=16`: the same with each writer on the
//!   one task of its own upgrade (a team upgrading several clusters at once: no upgrade row
//!   shared, only the `seq` counter);
//! - `cross_replica_stream_p99_ms clients=300`: a task update written through one replica,
//!   received by each of 300 WebSocket clients of another replica (woken by `LISTEN`): the
//!   99th percentile of the delay from sending the update to each client's receipt.
//!
//! `cargo bench -p eks-upgrade-agent-cli --bench postgres -- http` runs only the figures whose
//! name contains `http` (also `apply`, `stream`); `followers=1` runs with `http`:
//! - `pg_updates_per_s writers=16 replicas=3 followers=1`: the first figure with a WebSocket
//!   client of every event on the first replica (a dashboard open): commits then notify, and
//!   every replica's stream hub reads them (without clients, none does: guarantee G125).
//!
//! Measured 2026-11-30 (seventh session) on this machine, 2 cores, fsync on, nothing else
//! running (`pg_test_fsync`: fdatasync 0.1 ms), 6 runs: 32,288 / 5,101-5,717 (about 1,050
//! commits/s, 5.3 updates per commit) / 4,967-6,234 (`upgrades=16`) / 3,186-4,320
//! (`followers=1`) / 10.4 ms. From 1,485 at the session's start: the answer's task comes from
//! the commit, the stream hubs read nothing without clients and commits notify only while some
//! replica has stream clients, the group commit's statements run with generic plans, and the
//! committer waits up to 2 ms for a group as large as its last. The writers read each answer
//! on a kept-alive connection (unread, ureq closes it: a TCP connect per update). With one
//! upgrade, what bounds the figure is its row: the 3 replicas' transactions take turns on it.
//! See guarantee G6.

use std::io::Cursor;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::{JsonMap, TaskType};
use eks_upgrade_agent::progress::NewTask;
use eks_upgrade_agent::progress::apply::{self, ApplyOptions};
use eks_upgrade_agent::store::domain::command::Command as Cmd;
use eks_upgrade_agent::store::postgres::{PostgresOptions, PostgresStore};
use eks_upgrade_agent::test_support::PgCluster;

const BIN: &str = env!("CARGO_BIN_EXE_eks-upgrade-agent");

struct Served(Child, u16);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(db: &str) -> Served {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("EUA_DATABASE_URL", db)
        .env_remove("EUA_CONFIG")
        .env("XDG_CONFIG_HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Served(child, port)
}

fn tracker(db: &str) -> ProgressTracker {
    let store = PostgresStore::open(db, &PostgresOptions::default()).unwrap();
    ProgressTracker::new(Arc::new(store))
}

fn setup(t: &ProgressTracker, tasks: usize) {
    t.create_upgrade("bench", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("bench", None).unwrap();
    let all: Vec<NewTask> = (0..tasks)
        .map(|i| NewTask::new(format!("task-{i}"), "T", TaskType::UpgradeStep))
        .collect();
    t.add_tasks("bench", all).unwrap();
}

fn pg_apply_updates_per_s(pg: &PgCluster, tasks: usize, lines: usize) -> f64 {
    let db = pg.create_database();
    let t = tracker(&db);
    setup(&t, tasks);
    let mut input = Vec::with_capacity(lines * 120);
    for n in 0..lines {
        let c = Cmd::TaskUpdate {
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
            max_batch: 1024,
            ..Default::default()
        },
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(stats.ok as usize, lines, "every line acknowledged ok");
    stats.ok as f64 / secs
}

/// `upgrades` 1: every writer updates its own task of one upgrade; `upgrades` = `writers`:
/// each writer updates the one task of its own upgrade.
fn pg_updates_per_s(
    pg: &PgCluster,
    writers: usize,
    replicas: usize,
    upgrades: usize,
    followers: usize,
    secs: f64,
) -> f64 {
    let db = pg.create_database();
    let paths: Vec<String> = if upgrades == 1 {
        setup(&tracker(&db), writers);
        (0..writers)
            .map(|w| format!("bench/tasks/task-{w}"))
            .collect()
    } else {
        assert_eq!(upgrades, writers, "one upgrade per writer");
        let t = tracker(&db);
        for w in 0..writers {
            let id = format!("bench-{w}");
            t.create_upgrade(&id, "p", &format!("c{w}"), JsonMap::new())
                .unwrap();
            t.start_upgrade(&id, None).unwrap();
            t.add_tasks(
                &id,
                vec![NewTask::new("task-0", "T", TaskType::UpgradeStep)],
            )
            .unwrap();
        }
        (0..writers)
            .map(|w| format!("bench-{w}/tasks/task-0"))
            .collect()
    };
    let servers: Vec<Served> = (0..replicas).map(|_| serve(&db)).collect();
    // WebSocket clients of every event on the first replica (a dashboard open): commits
    // then notify, and each replica's stream hub reads them.
    let followed = follow(servers[0].1, followers);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let port = servers[w % replicas].1;
            let path = paths[w].clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(true)
                    .build()
                    .into();
                let url = format!("http://127.0.0.1:{port}/api/v1/upgrades/{path}/update");
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let body = format!("{{\"percentage\": {}}}", n % 100);
                    // The answer read to its end, as clients do (the connection is kept
                    // alive for the next request; unread, ureq closes it).
                    let answer = agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.as_str())
                        .unwrap()
                        .into_body()
                        .read_to_string()
                        .unwrap();
                    assert!(answer.contains("\"seq\""), "{answer}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    // Where the time goes: the replicas' group commits (`/metrics`).
    let commits: f64 = servers
        .iter()
        .map(|s| counter(s.1, "eua_progress_commits"))
        .sum();
    println!(
        "  ({total} updates in {secs:.1} s; {commits:.0} commits: {:.0} commits/s, {:.2} updates per commit)",
        commits / secs,
        total as f64 / commits.max(1.0)
    );
    if let Some((stop, clients)) = followed {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let events: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
        println!("  ({followers} stream client(s) received {events} events)");
        assert!(events > 0, "the stream clients received nothing");
    }
    total as f64 / secs
}

type Followers = (
    Arc<std::sync::atomic::AtomicBool>,
    Vec<std::thread::JoinHandle<u64>>,
);

/// `n` WebSocket clients of every event of the server on `port`, connected when this returns,
/// each counting the events it receives until told to stop.
fn follow(port: u16, n: usize) -> Option<Followers> {
    use futures_util::StreamExt;
    if n == 0 {
        return None;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (connected_tx, connected) = std::sync::mpsc::channel::<()>();
    let clients = (0..n)
        .map(|_| {
            let (stop, connected) = (Arc::clone(&stop), connected_tx.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let url = format!("ws://127.0.0.1:{port}/api/v1/ws");
                    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                        .await
                        .unwrap();
                    connected.send(()).unwrap();
                    let mut events = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
                            Ok(Some(Ok(m)))
                                if m.to_text().is_ok_and(|t| t.contains("progress_event")) =>
                            {
                                events += 1
                            }
                            Ok(Some(Ok(_))) | Err(_) => {}
                            Ok(_) => break,
                        }
                    }
                    events
                })
            })
        })
        .collect();
    for _ in 0..n {
        connected.recv().unwrap();
    }
    Some((stop, clients))
}

/// The value of counter `name` in the `/metrics` of the server on `port`.
fn counter(port: u16, name: &str) -> f64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

fn cross_replica_stream_p99_ms(pg: &PgCluster, clients: usize, events: usize) -> f64 {
    use futures_util::StreamExt;
    let db = pg.create_database();
    setup(&tracker(&db), 1);
    let (writer, reader) = (serve(&db), serve(&db));
    let base = Instant::now();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (connected_tx, connected) = std::sync::mpsc::channel::<()>();
    let delays: Vec<tokio::task::JoinHandle<Vec<f64>>> = (0..clients)
        .map(|_| {
            let url = format!("ws://127.0.0.1:{}/api/v1/upgrades/bench/ws", reader.1);
            let connected = connected_tx.clone();
            rt.spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .unwrap();
                connected.send(()).unwrap();
                let mut out = Vec::with_capacity(events);
                while out.len() < events {
                    let Some(Ok(msg)) = ws.next().await else {
                        break;
                    };
                    let Ok(text) = msg.to_text() else { continue };
                    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                    let sent = v["data"]["message"]
                        .as_str()
                        .and_then(|m| m.strip_prefix("t="))
                        .and_then(|m| m.parse::<f64>().ok());
                    if let Some(sent) = sent {
                        out.push(base.elapsed().as_secs_f64() * 1000.0 - sent);
                    }
                }
                out
            })
        })
        .collect();
    for _ in 0..clients {
        connected.recv().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(true)
        .build()
        .into();
    let url = format!(
        "http://127.0.0.1:{}/api/v1/upgrades/bench/tasks/task-0/update",
        writer.1
    );
    for n in 0..events {
        let sent = base.elapsed().as_secs_f64() * 1000.0;
        let body = format!(r#"{{"percentage": {}, "message": "t={sent:.3}"}}"#, n % 100);
        agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body.as_str())
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut all: Vec<f64> = rt.block_on(async {
        let mut all = Vec::new();
        for d in delays {
            let got = tokio::time::timeout(Duration::from_secs(30), d)
                .await
                .expect("a client missed events")
                .unwrap();
            all.extend(got);
        }
        all
    });
    assert_eq!(all.len(), clients * events, "every client got every event");
    all.sort_by(f64::total_cmp);
    all[(all.len() * 99 / 100).min(all.len() - 1)]
}

/// The figures named on the command line (`cargo bench ... -- http`: `apply`, `http`,
/// `stream`), or all of them.
fn wanted(figure: &str) -> bool {
    let names = figure_names();
    names.is_empty() || names.iter().any(|n| figure.contains(n.as_str()))
}

const FIGURES: [&str; 3] = ["apply", "http", "stream"];

/// The names given on the command line; panics on one that names no figure.
fn figure_names() -> Vec<String> {
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for n in &names {
        assert!(
            FIGURES.iter().any(|f| f.contains(n.as_str())),
            "no figure named {n:?}: name one of {}",
            FIGURES.join(", ")
        );
    }
    names
}

fn main() {
    let pg = PgCluster::start_durable();
    if wanted("apply") {
        println!(
            "pg_apply_updates_per_s tasks=1000 group<=1024: {:.0}",
            pg_apply_updates_per_s(&pg, 1000, 100_000)
        );
    }
    if wanted("http") {
        println!(
            "pg_updates_per_s writers=16 replicas=3: {:.0}",
            pg_updates_per_s(&pg, 16, 3, 1, 0, 5.0)
        );
        println!(
            "pg_updates_per_s writers=16 replicas=3 upgrades=16: {:.0}",
            pg_updates_per_s(&pg, 16, 3, 16, 0, 5.0)
        );
        println!(
            "pg_updates_per_s writers=16 replicas=3 followers=1: {:.0}",
            pg_updates_per_s(&pg, 16, 3, 1, 1, 5.0)
        );
    }
    if wanted("stream") {
        println!(
            "cross_replica_stream_p99_ms clients=300: {:.1}",
            cross_replica_stream_p99_ms(&pg, 300, 200)
        );
    }
}
