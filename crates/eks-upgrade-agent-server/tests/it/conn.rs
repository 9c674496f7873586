//! The connection loop: a client sending half its headers is cut off after the header-read
//! timeout (slowloris), connections over the cap wait until one closes, and shutdown finishes
//! the requests in flight.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use eks_upgrade_agent_server::ServeOptions;

use crate::util::*;

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// Reads one response head and its (small, Content-Length) body.
async fn response(tcp: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut buf = vec![0u8; 4096];
    let mut text = String::new();
    while !(text.contains("\r\n\r\n") && text.ends_with('}')) {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

#[tokio::test]
async fn half_sent_headers_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let server = Server::start(state(dir.path()).with_serve_options(options)).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the server closes a half-open request within 5 s");
    // Closed (EOF or reset), perhaps after a 408.
    if let Ok(n) = read
        && n > 0
    {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(start.elapsed() >= Duration::from_millis(200));
    // Whole requests are still answered.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(HEALTH).await.unwrap();
    assert!(response(&mut tcp).await.starts_with("HTTP/1.1 200"));
}

/// README "Server": the header-read limit is also the keep-alive idle limit: a connection that
/// got its answer and then sends nothing is closed after it.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    // The documented defaults: 30 s for headers (and idle keep-alive), 10 s of shutdown grace.
    let defaults = ServeOptions::default();
    assert_eq!(defaults.header_read_timeout, Duration::from_secs(30));
    assert_eq!(defaults.shutdown_grace, Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let server = Server::start(state(dir.path()).with_serve_options(options)).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    // Two requests on one connection: it is kept alive while used.
    for _ in 0..2 {
        tcp.write_all(HEALTH).await.unwrap();
        let text = response(&mut tcp).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    let idle = Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the server closes an idle keep-alive connection within 5 s");
    // Closed: EOF or reset, perhaps after a 408.
    if let Ok(n) = read
        && n > 0
    {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(
        idle.elapsed() >= Duration::from_millis(200),
        "{:?}",
        idle.elapsed()
    );
}

/// A body that stops arriving is cut off too (a slow body once held its connection forever),
/// while a body that keeps coming, however slowly, is read whole.
#[tokio::test]
async fn a_stalled_request_body_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        body_idle_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let server = Server::start(state(dir.path()).with_serve_options(options)).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        b"POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), response(&mut tcp))
        .await
        .expect("the server answers a stalled body within 5 s");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("stalled"), "{answer}");
    assert!(start.elapsed() >= Duration::from_millis(200));
    // Slow but steady: one byte every 100 ms, under the 300 ms limit.
    let body = br#"{"upgrade_id":"slow","plan_id":"p","cluster_name":"c"}"#;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for chunk in body.chunks(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tcp.write_all(chunk).await.unwrap();
    }
    let answer = response(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let options = ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    };
    let server = Server::start(s.with_serve_options(options)).await;
    // A WebSocket and a keep-alive connection take both slots.
    let mut ws = ws_connect(&server.ws_url("/api/v1/ws")).await;
    next_json(&mut ws).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first.write_all(HEALTH).await.unwrap();
    assert!(response(&mut first).await.starts_with("HTTP/1.1 200"));
    // A third client is not served while they stay open...
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(HEALTH).await.unwrap();
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "over the cap: no answer yet"
    );
    // ...nor when only the keep-alive one closes (the WebSocket still holds its slot)...
    drop(first);
    let got = tokio::time::timeout(Duration::from_secs(5), response(&mut third))
        .await
        .expect("served once a slot is free");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // ...and the WebSocket's slot comes back when it closes.
    let mut fourth = TcpStream::connect(server.addr).await.unwrap();
    fourth.write_all(HEALTH).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), fourth.read(&mut buf))
            .await
            .is_err(),
        "the WebSocket and the third client hold both slots"
    );
    drop(ws);
    let got = tokio::time::timeout(Duration::from_secs(5), response(&mut fourth))
        .await
        .expect("served once the WebSocket closed");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// README "Server": streams may stay open and quiet as long as their clients like, past the
/// idle limit of a keep-alive connection, and each holds a connection slot all along.
#[tokio::test]
async fn a_quiet_stream_outlives_the_idle_limit_and_keeps_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    seed(&s.tracker, "u1");
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 1,
        ..ServeOptions::default()
    };
    let server = Server::start(s.with_serve_options(options)).await;
    let mut ws = ws_connect(&server.ws_url("/api/v1/ws")).await;
    assert_eq!(next_json(&mut ws).await["type"], "progress_summary");
    // Quiet for over three idle limits...
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // ...and still open: it answers.
    ws_send(&mut ws, r#"{"type":"ping"}"#).await;
    until_type(&mut ws, "pong").await;
    // All along it holds the only slot: another client waits until it closes.
    let mut other = TcpStream::connect(server.addr).await.unwrap();
    other.write_all(HEALTH).await.unwrap();
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other.read(&mut buf))
            .await
            .is_err(),
        "the quiet stream holds the only slot"
    );
    drop(ws);
    let got = tokio::time::timeout(Duration::from_secs(5), response(&mut other))
        .await
        .expect("served once the stream closed");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(eks_upgrade_agent_server::serve(
        listener,
        state(dir.path()),
        async {
            let _ = rx.await;
        },
    ));
    // Headers sent, body still on its way when shutdown starts.
    let body = r#"{"upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.is_finished(), "waits for the request in flight");
    tcp.write_all(&body.as_bytes()[10..]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), response(&mut tcp))
        .await
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 201"), "{got}");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns once the request is done")
        .unwrap()
        .unwrap();
    // New connections are no longer accepted.
    assert!(TcpStream::connect(addr).await.is_err());
}

/// A live SSE stream never finishes: shutdown closes it after the grace period instead of
/// waiting forever (`serve` did not return on SIGTERM while a stream was open).
#[tokio::test]
async fn shutdown_closes_streams_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        shutdown_grace: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(eks_upgrade_agent_server::serve(
        listener,
        state(dir.path()).with_serve_options(options),
        async {
            let _ = rx.await;
        },
    ));
    let mut sse = TcpStream::connect(addr).await.unwrap();
    sse.write_all(b"GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = sse.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tx.send(()).unwrap();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns after the grace period")
        .unwrap()
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(250));
    // The stream's socket is closed.
    let eof = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sse.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "the SSE socket is closed");
}

/// TR2: an answer given before the body was read (here a refused query) drains a body of up
/// to 1 MiB, so a client that sends it all reads the answer and the connection serves its next
/// request; a body declared larger is answered at once with `Connection: close`.
#[tokio::test]
async fn a_refused_small_body_is_drained_and_a_large_one_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(state(dir.path())).await;
    let head = |len: usize| {
        format!(
            "POST /api/v1/tests/ingest?upgrade=u&phase=bogus HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/xml\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let body = vec![b'x'; 1024 * 1024];
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(head(body.len()).as_bytes()).await.unwrap();
    tcp.write_all(&body)
        .await
        .expect("the server reads the refused body");
    let answer = response(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(answer.contains("phase"), "{answer}");
    assert!(
        !answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    // The same connection answers the next request.
    tcp.write_all(HEALTH).await.unwrap();
    let next = response(&mut tcp).await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");

    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(head(64 * 1024 * 1024).as_bytes())
        .await
        .unwrap();
    tcp.write_all(&body[..1024]).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), response(&mut tcp))
        .await
        .expect("a large refused body is answered at once");
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
}

/// TR2 with chunked bodies (the CLI's uploads are all chunked: it never sets a length): a
/// small one is drained and the connection serves the next request; one over 1 MiB is answered
/// with `Connection: close`; a trickled one that never ends is answered within the 2 s budget.
#[tokio::test]
async fn refused_chunked_bodies_are_drained_up_to_the_limit_and_the_time_budget() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(state(dir.path())).await;
    const HEAD: &[u8] = b"POST /api/v1/tests/ingest?upgrade=u&phase=bogus HTTP/1.1\r\n\
        Host: 127.0.0.1\r\nContent-Type: application/xml\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = |n: usize| {
        let mut c = format!("{n:x}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(b'x', n));
        c.extend_from_slice(b"\r\n");
        c
    };

    // 512 KiB in 64 KiB chunks: drained, the connection stays.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(HEAD).await.unwrap();
    for _ in 0..8 {
        tcp.write_all(&chunk(64 * 1024)).await.unwrap();
    }
    tcp.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = response(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(
        !answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    tcp.write_all(HEALTH).await.unwrap();
    let next = response(&mut tcp).await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");

    // 4 MiB: more than the limit, answered with Connection: close.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(HEAD).await;
        for _ in 0..64 {
            if wr.write_all(&chunk(64 * 1024)).await.is_err() {
                break;
            }
        }
        wr
    });
    let answer = tokio::time::timeout(Duration::from_secs(5), response(&mut rd))
        .await
        .expect("a large refused chunked body is answered");
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    drop(writer.await);

    // A trickle that never ends: answered once the 2 s budget is spent, not never.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(HEAD).await.unwrap();
    tcp.write_all(&chunk(1024)).await.unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(6), response(&mut tcp))
        .await
        .expect("a trickled refused body is answered within the drain budget");
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
