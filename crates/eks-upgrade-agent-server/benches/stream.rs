//! `cargo bench -p eks-upgrade-agent-server --bench stream`
//!
//! Prints one figure per line:
//! - `stream_p99_ms clients=1000 writer=W`: 1,000 WebSocket clients on loopback watch one upgrade
//!   while a writer commits 1,000 task updates per second for 10 s; the latency of an event is
//!   from just before its write to its arrival at a client (every client, every event); also
//!   `stream_p50_ms` and `stream_max_ms`. `writer=in-process`: the server's own tracker calls
//!   `update_task` (the server is woken by its own commit); `writer=http-process`: another
//!   process POSTs the updates to the REST API over one keep-alive connection, as an agent
//!   would (times are taken with the system clock, shared by both processes);
//! - `stream_gaps clients=1000 writer=W`: events a client missed or got twice (summed over
//!   clients);
//! - `probe_stream_p99_ms clients=1000 server=bare-broadcast`: the same client harness and
//!   writer rate against a minimal fan-out server in this process (one broadcast channel, each
//!   client writing what is there in one flush, as ours does; no store, no replay, no
//!   catch-up): about what this machine can do, to read the figures above against;
//! - `other_writer_p50_ms`, `_p99_ms`, `_max_ms`: latency to a WebSocket client of events written
//!   through a second, independent store handle on the same data dir (what another process, the
//!   CLI or `apply`, does): the server sees them only by polling the database every 50 ms; 200
//!   events at 20/s;
//! - `http_updates_per_s concurrency=16`: `POST .../tasks/{t}/update` through the REST API over
//!   keep-alive HTTP/1.1 connections, 16 at a time, each acknowledged (committed) before the next.
//!
//! Server, clients and writer share this process and the machine's cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::TaskType;
use eks_upgrade_agent::progress::NewTask;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};
use eks_upgrade_agent_server::AppState;

const CLIENTS: usize = 1000;
const RATE: u64 = 1000;
const SECONDS: u64 = 10;
const HTTP_CONCURRENCY: usize = 16;

fn main() {
    if let Ok(spec) = std::env::var(HTTP_WRITER_ENV) {
        http_writer(&spec);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(stream_bench());
    runtime.block_on(other_writer_bench());
    runtime.block_on(http_bench());
}

fn tracker(dir: &std::path::Path, tasks: usize) -> Arc<ProgressTracker> {
    let t = ProgressTracker::new(Arc::new(
        SqliteStore::open(dir, &SqliteOptions::default()).unwrap(),
    ));
    t.create_upgrade("bench", "plan", "cluster", Default::default())
        .unwrap();
    t.start_upgrade("bench", Some("nodes")).unwrap();
    let new = (0..tasks)
        .map(|i| NewTask::new(format!("t{i}"), format!("task {i}"), TaskType::UpgradeStep))
        .collect();
    t.add_tasks("bench", new).unwrap();
    for i in 0..tasks {
        t.start_task("bench", &format!("t{i}"), None).unwrap();
    }
    Arc::new(t)
}

async fn start(state: AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(eks_upgrade_agent_server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    addr
}

/// `{"type":"progress_event","seq":N,...`: the seq without parsing the whole message.
fn seq_of(text: &str) -> Option<u64> {
    let rest = text.strip_prefix(r#"{"type":"progress_event","seq":"#)?;
    let end = rest.find(',')?;
    rest[..end].parse().ok()
}

/// Microseconds on the system clock: comparable across processes on this machine.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// What one client saw: the arrival time of each event (by index; `u64::MAX` when it never came)
/// and how many it missed or got twice.
struct ClientResult {
    arrivals_us: Vec<u64>,
    gaps: u64,
}

/// Connects `CLIENTS` WebSocket clients to `url` (each waits for its first message, the
/// summary), then runs `write` (which returns the submit time of each event, by index) and
/// prints the latency figures under `label`.
async fn measure(
    name: &str,
    params: &str,
    url: String,
    first_seq: u64,
    write: impl FnOnce() -> Vec<u64> + Send + 'static,
) {
    let total = RATE * SECONDS;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(CLIENTS);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(CLIENTS);
    for _ in 0..CLIENTS {
        let (url, ready) = (url.clone(), ready_tx.clone());
        clients.push(tokio::spawn(async move {
            // A small read buffer, as a browser's: tungstenite zero-fills its 128 KiB default
            // before every read.
            let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
                .await
                .unwrap();
            // The summary comes first: from then on the client is subscribed.
            let _ = ws.next().await;
            ready.send(()).await.unwrap();
            let mut result = ClientResult {
                arrivals_us: vec![u64::MAX; total as usize],
                gaps: 0,
            };
            let mut expected = first_seq;
            let last = first_seq + total - 1;
            // One deadline for the whole run (a timer per message would cost as much as the
            // message).
            let deadline = tokio::time::sleep(Duration::from_secs(SECONDS + 30));
            tokio::pin!(deadline);
            while expected <= last {
                let msg = tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(m)) => m,
                        _ => break,
                    },
                    () = &mut deadline => break,
                };
                let Message::Text(text) = msg else { continue };
                let Some(seq) = seq_of(text.as_str()) else {
                    continue;
                };
                let now = now_us();
                if seq != expected {
                    // Missed (seq ahead) or duplicated/out of order (seq behind).
                    result.gaps += seq.abs_diff(expected);
                    if seq < expected {
                        continue;
                    }
                }
                expected = seq + 1;
                if let Some(slot) = result.arrivals_us.get_mut((seq - first_seq) as usize) {
                    *slot = now;
                }
            }
            if expected <= last {
                result.gaps += last + 1 - expected; // never arrived
            }
            result
        }));
    }
    drop(ready_tx);
    for _ in 0..CLIENTS {
        ready_rx.recv().await.unwrap();
    }
    eprintln!(
        "{name} {params}: {CLIENTS} clients connected in {:?}",
        started.elapsed()
    );
    let writer = tokio::task::spawn_blocking(write);
    let submitted = writer.await.unwrap();
    assert_eq!(submitted.len() as u64, total);
    let mut all: Vec<u32> = Vec::with_capacity(CLIENTS * total as usize);
    let mut gaps = 0;
    for c in clients {
        let r = c.await.unwrap();
        gaps += r.gaps;
        for (i, at) in r.arrivals_us.iter().enumerate() {
            if *at != u64::MAX {
                all.push(at.saturating_sub(submitted[i]) as u32);
            }
        }
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |us| f64::from(*us) / 1000.0)
    };
    eprintln!(
        "{name} {params}: {} deliveries of {total} events",
        all.len()
    );
    println!("{name}_p50_ms {params}: {:.2}", pct(0.50));
    println!("{name}_p99_ms {params}: {:.2}", pct(0.99));
    println!("{name}_max_ms {params}: {:.2}", pct(1.0));
    println!("{name}_gaps {params}: {gaps}");
}

/// Sleeps until the `i`-th event is due (RATE per second from `start`, absolute deadlines).
fn pace(start: Instant, i: u64) {
    let due = start + Duration::from_micros(i * 1_000_000 / RATE);
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

async fn stream_bench() {
    let total = RATE * SECONDS;
    // The server's own tracker writes.
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path(), 10);
    let first_seq = t.store().last_seq().unwrap() + 1;
    let addr = start(AppState::new(Arc::clone(&t))).await;
    let url = format!("ws://{addr}/api/v1/upgrades/bench/ws");
    measure(
        "stream",
        &format!("clients={CLIENTS} writer=in-process"),
        url,
        first_seq,
        move || {
            let start = Instant::now();
            let mut submitted = Vec::with_capacity(total as usize);
            for i in 0..total {
                pace(start, i);
                // Recorded before the call: the seq is known to be the next one (sole writer).
                submitted.push(now_us());
                let c = t
                    .update_task(
                        "bench",
                        &format!("t{}", i % 10),
                        (i % 100) as f64,
                        None,
                        Default::default(),
                    )
                    .unwrap();
                assert_eq!(c.last_seq(), first_seq + i, "sole writer");
            }
            submitted
        },
    )
    .await;

    // Another process writes through the REST API.
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path(), 10);
    let first_seq = t.store().last_seq().unwrap() + 1;
    let addr = start(AppState::new(Arc::clone(&t))).await;
    let url = format!("ws://{addr}/api/v1/upgrades/bench/ws");
    measure(
        "stream",
        &format!("clients={CLIENTS} writer=http-process"),
        url,
        first_seq,
        move || {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env(HTTP_WRITER_ENV, format!("{addr}|{first_seq}|{total}"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout)
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        },
    )
    .await;

    // What this machine can do: the same harness against a bare fan-out server.
    let (tx, _) = tokio::sync::broadcast::channel::<axum::extract::ws::Utf8Bytes>(4096);
    let probe = {
        use axum::extract::ws::{Message as Msg, WebSocketUpgrade};
        let tx = tx.clone();
        axum::Router::new().route(
            "/ws",
            axum::routing::get(move |ws: WebSocketUpgrade| {
                let mut rx = tx.subscribe();
                async move {
                    ws.on_upgrade(move |mut socket| async move {
                        use futures_util::SinkExt;
                        if socket
                            .send(Msg::Text("{\"type\":\"progress_summary\"}".into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        // Everything already there in one write, as the real server does.
                        while let Ok(text) = rx.recv().await {
                            if socket.feed(Msg::Text(text)).await.is_err() {
                                return;
                            }
                            while let Ok(more) = rx.try_recv() {
                                if socket.feed(Msg::Text(more)).await.is_err() {
                                    return;
                                }
                            }
                            if socket.flush().await.is_err() {
                                return;
                            }
                        }
                    })
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, probe).await });
    measure(
        "probe_stream",
        &format!("clients={CLIENTS} server=bare-broadcast"),
        format!("ws://{addr}/ws"),
        1,
        move || {
            let start = Instant::now();
            let mut submitted = Vec::with_capacity(total as usize);
            for i in 0..total {
                pace(start, i);
                submitted.push(now_us());
                // About the size of a real progress_event message.
                let text = format!(
                    r#"{{"type":"progress_event","seq":{},"data":{{"seq":{},"event_id":"0194a0c2-8f6e-7c3a-9d41-5b2e1f0a7c11","kind":"task.progress","upgrade_id":"bench","timestamp":"2026-11-30T02:00:00.000000Z","task_id":"t{}","task_type":"upgrade_step","status":"in_progress","message":null,"details":{{}},"percentage":{}}}}}"#,
                    i + 1,
                    i + 1,
                    i % 10,
                    i % 100
                );
                let _ = tx.send(text.into());
            }
            submitted
        },
    )
    .await;
}

/// Set in the child process that writes through the REST API: `addr|first_seq|total`.
const HTTP_WRITER_ENV: &str = "EUA_BENCH_HTTP_WRITER";

/// The child: `total` task updates at RATE over one keep-alive connection; prints the submit
/// time of each (system clock, microseconds), in order.
fn http_writer(spec: &str) {
    use std::io::{Read, Write};
    let mut parts = spec.split('|');
    let addr = parts.next().unwrap();
    let first_seq: u64 = parts.next().unwrap().parse().unwrap();
    let total: u64 = parts.next().unwrap().parse().unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut submitted = Vec::with_capacity(total as usize);
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    for i in 0..total {
        pace(start, i);
        let body = format!(r#"{{"percentage":{}}}"#, i % 100);
        let req = format!(
            "POST /api/v1/upgrades/bench/tasks/t{}/update HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            i % 10,
            body.len()
        );
        submitted.push(now_us());
        conn.write_all(req.as_bytes()).unwrap();
        // Read the whole answer (headers, then Content-Length bytes).
        let mut got = Vec::new();
        let (head_end, len) = loop {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            got.extend_from_slice(&buf[..n]);
            if let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..h]).to_string();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                break (h, len);
            }
        };
        while got.len() < head_end + 4 + len {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        let body: serde_json::Value = serde_json::from_slice(&got[head_end + 4..]).unwrap();
        assert_eq!(body["seq"].as_u64(), Some(first_seq + i), "sole writer");
    }
    let mut out = String::with_capacity(submitted.len() * 18);
    for us in submitted {
        out.push_str(&us.to_string());
        out.push('\n');
    }
    print!("{out}");
}

async fn other_writer_bench() {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path(), 1);
    let addr = start(AppState::new(t)).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/v1/upgrades/bench/ws"))
            .await
            .unwrap();
    let _ = ws.next().await; // the summary
    let other = Arc::new(ProgressTracker::new(Arc::new(
        SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap(),
    )));
    const N: u64 = 200;
    let writer = std::thread::spawn(move || {
        let mut sent = Vec::with_capacity(N as usize);
        for i in 0..N {
            std::thread::sleep(Duration::from_millis(50));
            let at = Instant::now();
            let c = other
                .update_task("bench", "t0", (i % 100) as f64, None, Default::default())
                .unwrap();
            sent.push((c.last_seq(), at));
        }
        sent
    });
    let mut received = std::collections::HashMap::new();
    while (received.len() as u64) < N {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = msg
            && let Some(seq) = seq_of(text.as_str())
        {
            received.insert(seq, Instant::now());
        }
    }
    let sent = writer.join().unwrap();
    let mut lat: Vec<f64> = sent
        .iter()
        .map(|(seq, at)| received[seq].duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    println!("other_writer_p50_ms: {:.1}", lat[lat.len() / 2]);
    println!("other_writer_p99_ms: {:.1}", lat[lat.len() * 99 / 100]);
    println!("other_writer_max_ms: {:.1}", lat[lat.len() - 1]);
}

/// One keep-alive HTTP/1.1 POST; returns the status.
async fn post(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, path: &str, body: &str) -> u16 {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    buf.clear();
    loop {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..head_end]).unwrap().to_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < head_end + 4 + len {
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
            return head[9..12].parse().unwrap();
        }
    }
}

async fn http_bench() {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path(), HTTP_CONCURRENCY);
    let addr = start(AppState::new(t)).await;
    let duration = Duration::from_secs(5);
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..HTTP_CONCURRENCY)
        .map(|w| {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
                conn.set_nodelay(true).unwrap();
                let mut buf = Vec::new();
                let path = format!("/api/v1/upgrades/bench/tasks/t{w}/update");
                let mut i = 0u64;
                while start.elapsed() < duration {
                    let body = format!(r#"{{"percentage":{}}}"#, i % 100);
                    let status = post(&mut conn, &mut buf, &path, &body).await;
                    assert_eq!(status, 200);
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("http_updates_per_s concurrency={HTTP_CONCURRENCY}: {rate:.0}");
}
