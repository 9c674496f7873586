//! `cargo bench -p eks-upgrade-agent-server --bench stream`
//!
//! Prints one figure per line:
//! - `stream_p99_ms clients=1000`: 1,000 WebSocket clients on loopback watch one upgrade while a
//!   writer commits 1,000 task updates per second for 10 s; the latency of an event is from just
//!   before its `update_task` call to its arrival at a client (every client, every event); also
//!   `stream_p50_ms` and `stream_max_ms`;
//! - `stream_gaps clients=1000`: events a client missed or got twice (summed over clients);
//! - `other_writer_p99_ms`: latency to a WebSocket client of events written through a second,
//!   independent store handle on the same data dir (what another process, the CLI or `apply`,
//!   does): the server sees them only by polling the database; 200 events at 20/s;
//! - `http_updates_per_s concurrency=16`: `POST .../tasks/{t}/update` through the REST API over
//!   keep-alive HTTP/1.1 connections, 16 at a time, each acknowledged (committed) before the next.
//!
//! Server, clients and writer share this process and the machine's cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

struct ClientResult {
    latencies_us: Vec<u32>,
    gaps: u64,
}

async fn stream_bench() {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(dir.path(), 10);
    let first_seq = t.store().last_seq().unwrap() + 1;
    let total = RATE * SECONDS;
    let addr = start(AppState::new(Arc::clone(&t))).await;
    let epoch = Instant::now();
    // Submit time of each event, by seq - first_seq, in microseconds since `epoch`.
    let submitted: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::with_capacity(CLIENTS);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(CLIENTS);
    for _ in 0..CLIENTS {
        let url = format!("ws://{addr}/api/v1/upgrades/bench/ws");
        let (submitted, done, ready) =
            (Arc::clone(&submitted), Arc::clone(&done), ready_tx.clone());
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
                latencies_us: Vec::with_capacity(total as usize),
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
                let now = epoch.elapsed().as_micros() as u64;
                if seq != expected {
                    // Missed (seq ahead) or duplicated/out of order (seq behind).
                    result.gaps += seq.abs_diff(expected);
                    if seq < expected {
                        continue;
                    }
                }
                expected = seq + 1;
                let sent = submitted[(seq - first_seq) as usize].load(Ordering::Acquire);
                result.latencies_us.push(now.saturating_sub(sent) as u32);
            }
            if expected <= last {
                result.gaps += last + 1 - expected; // never arrived
            }
            let _ = done.load(Ordering::Relaxed);
            result
        }));
    }
    drop(ready_tx);
    for _ in 0..CLIENTS {
        ready_rx.recv().await.unwrap();
    }
    eprintln!("{CLIENTS} clients connected in {:?}", epoch.elapsed());

    // The writer: RATE updates per second on absolute deadlines.
    let writer = {
        let (t, submitted) = (Arc::clone(&t), Arc::clone(&submitted));
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..total {
                let due = start + Duration::from_micros(i * 1_000_000 / RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let us = epoch.elapsed().as_micros() as u64;
                // Recorded before the call: the seq is known to be the next one (sole writer).
                submitted[i as usize].store(us, Ordering::Release);
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
            start.elapsed()
        })
    };
    let took = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    done.store(true, Ordering::Relaxed);
    let mut all = Vec::with_capacity(CLIENTS * total as usize);
    let mut gaps = 0;
    for c in clients {
        let r = c.await.unwrap();
        gaps += r.gaps;
        all.extend(r.latencies_us);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |us| f64::from(*us) / 1000.0)
    };
    eprintln!("wrote {total} events in {took:?}; {} deliveries", all.len());
    println!("stream_p50_ms clients={CLIENTS}: {:.2}", pct(0.50));
    println!("stream_p99_ms clients={CLIENTS}: {:.2}", pct(0.99));
    println!("stream_max_ms clients={CLIENTS}: {:.2}", pct(1.0));
    println!("stream_gaps clients={CLIENTS}: {gaps}");
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
