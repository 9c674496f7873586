//! WebSocket and SSE streams over real TCP: summary on connect, ping/pong, get_summary, live
//! events, `since` replay without gap or duplicate, heartbeats, resync of a slow client that
//! never delays a fast one, events written through another store handle (as another process
//! would), and bad requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eks_upgrade_agent::progress::Command;

use crate::util::*;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn update(t: &eks_upgrade_agent::ProgressTracker, pct: f64) -> u64 {
    t.update_task("u1", "a", pct, Some("working"), Default::default())
        .unwrap()
        .last_seq()
}

#[tokio::test]
async fn websocket_speaks_the_reference_messages() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    let mut ws = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "progress_summary");
    assert_eq!(first["data"]["upgrade_id"], "u1");
    assert_eq!(first["data"]["total_tasks"], 1);

    ws_send(&mut ws, r#"{"type":"ping"}"#).await;
    let (_, pong) = until_type(&mut ws, "pong").await;
    assert_eq!(pong, serde_json::json!({"type": "pong"}));

    let t = Arc::clone(&s.tracker);
    let seq = blocking(move || update(&t, 40.0)).await;
    let (_, ev) = until_type(&mut ws, "progress_event").await;
    assert_eq!(ev["seq"], seq);
    assert_eq!(ev["data"]["seq"], seq);
    assert_eq!(ev["data"]["task_id"], "a");
    assert_eq!(ev["data"]["percentage"], 40.0);

    ws_send(&mut ws, r#"{"type":"get_summary"}"#).await;
    let (_, sum) = until_type(&mut ws, "progress_summary").await;
    assert_eq!(sum["data"]["active_tasks"], 1);
    assert!(sum["data"]["overall_percentage"].as_f64().unwrap() > 0.0);

    ws_send(&mut ws, r#"{"type":"dance"}"#).await;
    let (_, err) = until_type(&mut ws, "error").await;
    assert!(err["message"].as_str().unwrap().contains("dance"), "{err}");
    ws_send(&mut ws, "not json").await;
    let (_, err) = until_type(&mut ws, "error").await;
    assert!(
        err["message"].as_str().unwrap().contains("malformed"),
        "{err}"
    );

    // The all-upgrades socket summarises every upgrade.
    let t = Arc::clone(&s.tracker);
    blocking(move || seed(&t, "u2")).await;
    let mut all = ws_connect(&server.ws_url("/api/v1/ws")).await;
    let first = next_json(&mut all).await;
    assert_eq!(first["type"], "progress_summary");
    let ids: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["upgrade_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{first}");
    assert!(ids.contains(&"u1") && ids.contains(&"u2"));
}

#[tokio::test]
async fn since_replays_without_gap_or_duplicate_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    seed(&s.tracker, "other");
    let t = Arc::clone(&s.tracker);
    // More than one replay page (1,000) of history, interleaved with another upgrade's events.
    let mine: Vec<u64> = blocking(move || {
        let mut mine = Vec::new();
        for i in 0..2500 {
            mine.push(update(&t, f64::from(i % 100)));
            t.update_task("other", "a", 1.0, None, Default::default())
                .unwrap();
        }
        mine
    })
    .await;
    let all_mine: Vec<u64> = s
        .tracker
        .events_since(Some("u1"), 0, 100_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    let server = Server::start(s.clone()).await;
    let since = mine[10];
    let mut ws = ws_connect(&server.ws_url(&format!("/api/v1/upgrades/u1/ws?since={since}"))).await;
    assert_eq!(next_json(&mut ws).await["type"], "progress_summary");
    let mut got = Vec::new();
    while got.len() < mine.len() - 11 {
        let m = next_json(&mut ws).await;
        assert_eq!(m["type"], "progress_event", "{m}");
        assert_eq!(m["data"]["upgrade_id"], "u1");
        got.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(got, mine[11..], "replay is exactly the events after since");
    // Then live, continuing with no duplicate.
    let t = Arc::clone(&s.tracker);
    let live = blocking(move || update(&t, 99.0)).await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["seq"], live, "{m}");
    // since=0 replays the whole history of the upgrade.
    let mut ws = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws?since=0")).await;
    next_json(&mut ws).await;
    let mut got = Vec::new();
    while got.len() < all_mine.len() + 1 {
        got.push(next_json(&mut ws).await["seq"].as_u64().unwrap());
    }
    let mut want = all_mine.clone();
    want.push(live);
    assert_eq!(got, want);
}

#[tokio::test]
async fn idle_streams_send_heartbeats_with_the_latest_seq() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).with_heartbeat(Duration::from_millis(200));
    seed(&s.tracker, "u1");
    seed(&s.tracker, "u2");
    let server = Server::start(s.clone()).await;
    let mut ws = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    next_json(&mut ws).await;
    // Another upgrade's event moves the position of this stream too (it has nothing to miss).
    let t = Arc::clone(&s.tracker);
    let last = blocking(move || {
        t.update_task("u2", "a", 5.0, None, Default::default())
            .unwrap()
            .last_seq()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (skipped, hb) = until_type(&mut ws, "heartbeat").await;
        assert!(seqs(&skipped).is_empty(), "no u2 event on the u1 stream");
        if hb["seq"] == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "heartbeat never reached seq {last}: {hb}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_resynced_and_never_delays_a_fast_one() {
    let dir = tempfile::tempdir().unwrap();
    // A small ring: bursts of 500 overrun it, so the fast client catches up from the store
    // (no gap); the slow one falls more than 8,000 behind and is resynced.
    let s = state(dir.path()).with_stream_limits(256, 8000);
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    let mut slow = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    let mut fast = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    assert_eq!(next_json(&mut slow).await["type"], "progress_summary");
    assert_eq!(next_json(&mut fast).await["type"], "progress_summary");
    // Far more than the lag limit plus what socket buffers absorb; the slow client reads
    // nothing meanwhile.
    let n = 40_000;
    let t = Arc::clone(&s.tracker);
    let writer = tokio::task::spawn_blocking(move || {
        let cmds: Vec<Command> = (0..n)
            .map(|i| Command::TaskUpdate {
                upgrade_id: "u1".into(),
                task_id: "a".into(),
                percentage: (i % 100) as f64,
                message: Some(format!("update {i} {}", "x".repeat(1000))),
                details: Default::default(),
            })
            .collect();
        let mut last = 0;
        for chunk in cmds.chunks(500) {
            for r in t.execute_batch(chunk).unwrap() {
                last = r.unwrap().last_seq();
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        last
    });
    // The fast client gets every event, in order, while the slow one sleeps.
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let m = next_json(&mut fast).await;
        assert_eq!(
            m["type"], "progress_event",
            "the fast client is never resynced: {m}"
        );
        got.push(m["seq"].as_u64().unwrap());
    }
    let last = writer.await.unwrap();
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap, no duplicate"
    );
    assert_eq!(*got.last().unwrap(), last);
    // The slow client: what it gets is in order; it is told to resync (with a fresh summary)
    // and then continues up to the last event.
    let mut prev = 0;
    let mut resyncs = 0;
    loop {
        let m = next_json(&mut slow).await;
        let seq = m["seq"].as_u64().unwrap();
        assert!(seq >= prev, "in order: {prev} then {m}");
        match m["type"].as_str().unwrap() {
            "resync" => {
                resyncs += 1;
                assert_eq!(m["data"]["upgrade_id"], "u1", "{m}");
            }
            "progress_event" => assert!(seq > prev, "no duplicate"),
            other => panic!("unexpected {other}: {m}"),
        }
        prev = seq;
        if seq == last {
            break;
        }
    }
    assert!(
        resyncs >= 1,
        "the slow client fell behind by {n} events and was resynced"
    );
}

#[tokio::test]
async fn events_of_another_writer_reach_streams() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    let mut ws = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    next_json(&mut ws).await;
    // A second, independent store handle on the same data dir: the server's tracker sees
    // nothing of its writes except through the database, as with another process.
    let other = tracker(dir.path());
    let seq = blocking(move || {
        other
            .update_task("u1", "a", 12.0, Some("from elsewhere"), Default::default())
            .unwrap()
            .last_seq()
    })
    .await;
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("progress_event"), Some(seq))
    );
    assert_eq!(m["data"]["message"], "from elsewhere");
}

#[tokio::test]
async fn bad_stream_requests_are_http_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s).await;
    use tokio_tungstenite::tungstenite::Error;
    for (path, status) in [
        ("/api/v1/upgrades/nope/ws", 404),
        ("/api/v1/upgrades/u1/ws?since=abc", 400),
        ("/api/v1/ws?since=-1", 400),
    ] {
        match tokio_tungstenite::connect_async(server.ws_url(path)).await {
            Err(Error::Http(resp)) => {
                assert_eq!(resp.status(), status, "{path}");
                let body: serde_json::Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert!(body["error"]["message"].is_string(), "{path}: {body}");
            }
            other => panic!("{path}: expected HTTP {status}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_burst_larger_than_one_write_batch_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    let mut ws = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    next_json(&mut ws).await;
    // One transaction of 1,000 events: the poller publishes them at once and the client's
    // task finds far more ready than it writes per flush.
    let t = Arc::clone(&s.tracker);
    let seqs_written: Vec<u64> = blocking(move || {
        let cmds: Vec<Command> = (0..1000)
            .map(|i| Command::TaskUpdate {
                upgrade_id: "u1".into(),
                task_id: "a".into(),
                percentage: f64::from(i % 100),
                message: None,
                details: Default::default(),
            })
            .collect();
        t.execute_batch(&cmds)
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().last_seq())
            .collect()
    })
    .await;
    let mut got = Vec::new();
    while got.len() < seqs_written.len() {
        let m = next_json(&mut ws).await;
        assert_eq!(m["type"], "progress_event", "{m}");
        got.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(got, seqs_written);
}

/// A `since` beyond the store's last seq (a restored data dir) is answered with a `resync` to
/// the last seq, then live events flow (before: the client waited silently for seqs that never
/// came).
#[tokio::test]
async fn a_since_beyond_the_last_seq_gets_a_resync_then_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    for path in ["/api/v1/upgrades/u1/ws?since=1000", "/api/v1/ws?since=1000"] {
        let last = s.tracker.store().last_seq().unwrap();
        let mut ws = ws_connect(&server.ws_url(path)).await;
        let (_, resync) = until_type(&mut ws, "resync").await;
        assert_eq!(resync["seq"].as_u64(), Some(last), "{path}: {resync}");
        assert!(
            resync["data"].is_object() || resync["data"].is_array(),
            "{resync}"
        );
        let t = Arc::clone(&s.tracker);
        let seq = blocking(move || update(&t, 5.0)).await;
        let (_, ev) = until_type(&mut ws, "progress_event").await;
        assert_eq!(ev["seq"].as_u64(), Some(seq), "{path}");
    }

    // SSE, with `?since=` and with `Last-Event-ID`.
    for (path, header) in [
        ("/api/v1/upgrades/u1/events/stream?since=1000", None),
        ("/api/v1/events/stream", Some("1000")),
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let last = s.tracker.store().last_seq().unwrap();
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let extra = header.map_or_else(String::new, |h| format!("Last-Event-ID: {h}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let mut read_until = async |text: &mut String, want: &str| {
            while !text.contains(want) {
                let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("{path}: no {want:?} within 10 s in {text}"))
                    .unwrap();
                assert!(n > 0, "{path}: closed: {text}");
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        };
        read_until(&mut text, "event: resync").await;
        let want = format!("\"type\":\"resync\",\"seq\":{last}");
        read_until(&mut text, &want).await;
        let t = Arc::clone(&s.tracker);
        let seq = blocking(move || update(&t, 6.0)).await;
        read_until(&mut text, &format!("id: {seq}\nevent: progress_event")).await;
    }
}

/// Clients send small control messages: a message (or frame) over 64 KiB closes the connection
/// instead of being buffered, and the server keeps serving others.
#[tokio::test]
async fn an_oversized_websocket_message_closes_the_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s).await;
    // A message of exactly `MAX_WS_MESSAGE` bytes is answered; one byte more, or 100 KiB,
    // closes the connection.
    assert_eq!(eks_upgrade_agent_server::MAX_WS_MESSAGE, 64 * 1024);
    let ping_of = |len: usize| {
        let frame = r#"{"type":"ping","pad":""}"#;
        format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(len - frame.len())
        )
    };
    for (len, closes) in [
        (eks_upgrade_agent_server::MAX_WS_MESSAGE, false),
        (eks_upgrade_agent_server::MAX_WS_MESSAGE + 1, true),
        (100 * 1024, true),
    ] {
        let mut ws = ws_connect(&server.ws_url("/api/v1/ws")).await;
        assert_eq!(next_json(&mut ws).await["type"], "progress_summary");
        let message = ping_of(len);
        assert_eq!(message.len(), len);
        // Either the send fails or the server answers with a close (or drops the socket).
        let _ = ws.send(Message::Text(message.into())).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                    Some(Ok(Message::Text(t))) if t.contains("pong") => return false,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
        .expect("the server reacts within 10 s");
        assert_eq!(closed, closes, "a message of {len} bytes");
    }
    // The server still serves.
    let mut ws = ws_connect(&server.ws_url("/api/v1/ws")).await;
    assert_eq!(next_json(&mut ws).await["type"], "progress_summary");
    ws_send(&mut ws, r#"{"type":"ping"}"#).await;
    until_type(&mut ws, "pong").await;
}

/// README "Using it": a parent's derived status change is an event of its own, so streams see
/// it: a subtask fails, and the WebSocket receives the parent's `task.failed` after the
/// subtask's, naming the cause.
#[tokio::test]
async fn a_parents_derived_change_reaches_the_stream() {
    use eks_upgrade_agent::model::TaskType;
    use eks_upgrade_agent::progress::NewTask;
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    s.tracker
        .add_tasks(
            "u1",
            vec![
                NewTask::new("p", "Node groups", TaskType::UpgradeStep),
                NewTask::new("c", "ng-1", TaskType::UpgradeStep).parent("p"),
            ],
        )
        .unwrap();
    s.tracker.start_task("u1", "c", None).unwrap();
    let server = Server::start(s.clone()).await;
    let mut ws = ws_connect(&server.ws_url("/api/v1/upgrades/u1/ws")).await;
    until_type(&mut ws, "progress_summary").await;
    let t = s.tracker.clone();
    blocking(move || {
        t.fail_task("u1", "c", "drain timed out").unwrap();
    })
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = next_json(&mut ws).await;
        if m["type"] == "progress_event" {
            got.push(m["data"].clone());
        }
    }
    let brief: Vec<_> = got
        .iter()
        .map(|d| (d["task_id"].clone(), d["kind"].clone(), d["status"].clone()))
        .collect();
    assert_eq!(
        brief,
        [
            (json!("c"), json!("task.failed"), json!("failed")),
            (json!("p"), json!("task.failed"), json!("failed")),
        ]
    );
    assert_eq!(got[1]["message"], "subtask \"c\" failed: drain timed out");
}

/// Waits (at most 10 s) until the hub is idle or not, as `idle` says.
async fn hub_idle(s: &eks_upgrade_agent_server::AppState, idle: bool) {
    let start = Instant::now();
    while s.hub.idle() != idle {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the hub never became {}",
            if idle { "idle" } else { "busy" }
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_hub_reads_nothing_while_no_client_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    hub_idle(&s, true).await;
    // The hub starts at the store's last seq (and idle: it has no client yet).
    let before = s.tracker.store().last_seq().unwrap();
    let start = Instant::now();
    while s.hub.published() != before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the hub never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Arc::clone(&s.tracker);
    let last = blocking(move || (0..8).fold(0, |_, n| update(&t, f64::from(n)))).await;
    // Every commit wakes the poller; none makes it read while nobody listens.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.hub.events_published(), 0, "events read for nobody");
    assert_eq!(s.hub.published(), before);
    let text = crate::api::metrics_text(&s).await;
    assert!(
        text.contains(&format!("eua_last_seq {last}\n")),
        "the scrape reads the store's last seq:\n{text}"
    );

    // A client without `since` gets what is committed after it joined, from the next seq.
    let mut live = ws_connect(&server.ws_url("/api/v1/ws")).await;
    assert_eq!(next_json(&mut live).await["type"], "progress_summary");
    assert!(!s.hub.idle());
    let t = Arc::clone(&s.tracker);
    let next = blocking(move || update(&t, 50.0)).await;
    let (skipped, ev) = until_type(&mut live, "progress_event").await;
    assert!(seqs(&skipped).is_empty());
    assert_eq!(ev["seq"], last + 1);
    // One with `since` replays the events the hub did not read, then goes live.
    let mut replay = ws_connect(&server.ws_url("/api/v1/ws?since=0")).await;
    let mut got = Vec::new();
    while got.last() != Some(&next) {
        let m = next_json(&mut replay).await;
        if m["type"] == "progress_event" {
            got.push(m["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(got, (1..=next).collect::<Vec<_>>());
    assert_eq!(
        s.hub.events_published(),
        next - last,
        "only the events after the join"
    );

    // Every client gone: idle again.
    drop((live, replay));
    hub_idle(&s, true).await;
    let t = Arc::clone(&s.tracker);
    blocking(move || update(&t, 60.0)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.hub.events_published(), next - last);
}

#[tokio::test]
async fn clients_joining_and_leaving_an_idle_hub_miss_nothing_committed_after_they_joined() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let server = Server::start(s.clone()).await;
    // A writer that never stops while clients come and go (the hub going idle in between);
    // stopped when this test ends, a failed assertion included (the runtime waits for it).
    struct Stop(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop = Stop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let (t, halt) = (Arc::clone(&s.tracker), Arc::clone(&stop.0));
    let writer = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            update(&t, (n % 100) as f64);
            n += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    for round in 0..20 {
        let mut ws = ws_connect(&server.ws_url("/api/v1/ws")).await;
        let summary = next_json(&mut ws).await;
        assert_eq!(summary["type"], "progress_summary");
        // Joined at the summary's seq: from there on every committed event reaches it, in
        // order, once.
        let at = summary["seq"].as_u64().expect("the summary's seq");
        let t = Arc::clone(&s.tracker);
        let joined = blocking(move || t.store().last_seq().unwrap()).await;
        assert!(at <= joined);
        let mut seen: Vec<u64> = Vec::new();
        let began = Instant::now();
        while seen.last().is_none_or(|l| *l < joined + 20) {
            // Heartbeats keep coming when events do not: bound the round, and say why.
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "round {round}: {} events after {at} in 30 s: {seen:?}; writer done: {}; \
                 hub idle: {}, clients: {}, published: {}, store at {}",
                seen.len(),
                writer.is_finished(),
                s.hub.idle(),
                s.hub.clients(),
                s.hub.published(),
                s.tracker.store().last_seq().unwrap()
            );
            let m = next_json(&mut ws).await;
            if m["type"] == "progress_event" {
                seen.push(m["seq"].as_u64().unwrap());
            }
        }
        assert_eq!(
            seen[0],
            at + 1,
            "round {round}: events after {at} skipped: {seen:?}"
        );
        assert!(
            seen.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: a gap or a duplicate: {seen:?}"
        );
        drop(ws);
        if round % 2 == 0 {
            hub_idle(&s, true).await;
        }
    }
    drop(stop);
    writer.await.unwrap();
}

/// A subscription given up while it joins (a client gone mid-handshake, a failed read) is not
/// left counted: the hub goes idle again, and its mark would not be renewed for nobody.
#[tokio::test]
async fn a_subscription_given_up_while_joining_is_not_left_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    // A following hook (a database's mark) that takes 300 ms, and what it was told.
    let told = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&told);
    s.hub.on_following(
        move |on| {
            std::thread::sleep(Duration::from_millis(300));
            log.lock().unwrap().push(on);
            Ok(())
        },
        Duration::from_secs(3600),
    );
    let _server = Server::start(s.clone()).await;
    s.hub.start().await.unwrap();
    hub_idle(&s, true).await;
    // Counted, then waiting for the hook: given up after its first poll.
    let gone = tokio::time::timeout(Duration::from_millis(50), s.hub.subscribe(None, None)).await;
    assert!(gone.is_err(), "the join waits for the hook");
    assert_eq!(s.hub.clients(), 0);
    // The join still made the hub busy; with nobody counted, it goes idle again.
    let start = Instant::now();
    while told.lock().unwrap().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            told.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*told.lock().unwrap(), vec![true, false]);
    hub_idle(&s, true).await;
    assert_eq!(s.hub.clients(), 0);
}
