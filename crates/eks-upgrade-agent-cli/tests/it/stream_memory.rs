//! Streams never wait for a client, and a client that never reads costs the server a cursor,
//! one replay page at most and its socket buffers (ARCHITECTURE "Streams never wait for a
//! client"): many idle WebSocket and SSE clients, live and replaying, on a `serve` process
//! (its own process, so nothing else moves its memory) while many large events are written.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::util::{Env, serve};

/// Idle clients of each kind: live WebSocket, WebSocket replaying from `since=0`, live SSE,
/// SSE replaying from `Last-Event-ID: 0`.
const PER_KIND: usize = 25;
const CLIENTS: usize = 4 * PER_KIND;
/// Events written before the clients connect (what the replaying clients start from) and
/// after.
const BEFORE: usize = 2_000;
const AFTER: usize = 20_000;
/// Each event's message; its serialized form (~1.3 KB) is larger.
const MESSAGE: usize = 1_000;
/// The claim's cost per client: one replay page (1,000 events of ~1.3 KB), its socket buffers
/// (tungstenite's 128 KiB write buffer, hyper's write queue, 4 KiB read buffer) and its task.
const PER_CLIENT_BOUND_KIB: u64 = 2 * 1024;

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// `count` `task.update` lines with `MESSAGE`-byte messages; returns the last acknowledged seq.
fn write_events(env: &Env, first: usize, count: usize) -> u64 {
    let pad = "x".repeat(MESSAGE - 8);
    let mut input = String::new();
    for k in first..first + count {
        input.push_str(&format!(
            "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"t\",\"percentage\":{},\"message\":\"{k:08}{pad}\"}}\n",
            k % 100
        ));
    }
    let acks = env.apply(&input);
    assert_eq!(acks.len(), count);
    assert!(acks.iter().all(|a| a["ok"] == true), "{:?}", acks.last());
    acks.last().unwrap()["seq"].as_u64().unwrap()
}

/// Sends `request` and reads the response head only; the body is never read.
fn connect(port: u16, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 101") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    s
}

fn metric(port: u16, name: &str) -> u64 {
    let resp = crate::util::http(
        port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    resp.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {resp}"))
        .trim()
        .parse()
        .unwrap()
}

/// The server's heap is its anonymous resident memory (`RssAnon`): `VmRSS` also counts the
/// binary's pages and SQLite's memory map of the database file, which are shared page cache
/// that grows with the store, not with clients.
#[test]
fn idle_clients_that_never_read_cost_a_bounded_amount_each() {
    let env = Env::with_task();
    write_events(&env, 0, BEFORE);
    let served = serve(&env, &[]);
    let (port, pid) = (served.port, served.child.id());
    // One stream client starts the hub; then the server is at rest.
    drop(connect(
        port,
        &format!("GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    ));
    std::thread::sleep(Duration::from_millis(300));
    let baseline = status_kib(pid, "RssAnon:");

    let ws = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let sse = |extra: &str| {
        format!("GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n")
    };
    let mut idle = Vec::new();
    for _ in 0..PER_KIND {
        idle.push(connect(port, &ws("/api/v1/ws")));
        idle.push(connect(port, &ws("/api/v1/upgrades/u/ws?since=0")));
        idle.push(connect(port, &sse("")));
        idle.push(connect(port, &sse("Last-Event-ID: 0\r\n")));
    }
    // A client that reads: it gets every event while the others sit on theirs.
    let mut reader = BufReader::new(connect(port, &sse("")));

    // The peak of the heap while events flow, sampled every 10 ms.
    let (done, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(status_kib(pid, "RssAnon:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = Instant::now();
    let last = write_events(&env, BEFORE, AFTER);
    let needle = format!("id: {last}");
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the reading client's stream ended"
        );
        if line.trim_end() == needle {
            break;
        }
    }
    let took = started.elapsed();
    // Every idle client is still connected: none was dropped to save memory.
    assert_eq!(metric(port, "eua_stream_clients") as usize, CLIENTS + 1);
    // Stuck clients' tasks have had time to fill whatever they would buffer.
    std::thread::sleep(Duration::from_millis(1_000));
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak
        .load(Ordering::Relaxed)
        .max(status_kib(pid, "RssAnon:"));

    // What unbounded per-client queues would hold: every event after the client's start (the
    // replaying half also the BEFORE ones), counting only the MESSAGE bytes of each.
    // 100 clients x 21,000 events x 1,000 B = ~2.0 GiB; the bound is 200 MiB.
    let unbounded_kib = (CLIENTS * (AFTER + BEFORE / 2) * MESSAGE / 1024) as u64;
    let bound_kib = CLIENTS as u64 * PER_CLIENT_BOUND_KIB;
    assert!(
        bound_kib * 10 <= unbounded_kib,
        "the bound must be far below unbounded queues"
    );
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "{CLIENTS} idle clients, {AFTER} events of {MESSAGE} B streamed in {took:?}: heap {baseline} KiB -> peak {peak} KiB, \
         {} KiB per client (bound {PER_CLIENT_BOUND_KIB} KiB; unbounded queues: {} KiB per client); VmHWM {} KiB",
        growth / CLIENTS as u64,
        unbounded_kib / CLIENTS as u64,
        status_kib(pid, "VmHWM:")
    );
    assert!(
        growth < bound_kib,
        "the server's heap grew by {growth} KiB for {CLIENTS} idle clients (bound {bound_kib} KiB)"
    );
    drop(idle);
}
