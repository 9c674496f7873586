//! The connection loop behind [`crate::serve`]: HTTP/1.1 (with upgrades for WebSockets) over
//! hyper, with what `axum::serve` lacks against slow or many clients:
//!
//! - a **header-read timeout**: a client must send a request's headers within
//!   [`ServeOptions::header_read_timeout`] (this also ends idle keep-alive connections), so a
//!   connection with half-sent headers (slowloris) is closed instead of kept forever;
//! - a **connection cap**: at most [`ServeOptions::max_connections`] connections are served at
//!   once, WebSockets included (the permit lives with the socket); further clients wait in the
//!   listen backlog until one closes.
//!
//! Every socket gets TCP_NODELAY. On shutdown the loop stops accepting, asks every connection to
//! finish its request in flight, and returns when they have, or after
//! [`ServeOptions::shutdown_grace`] (a live SSE stream never finishes: `axum::serve` waited for
//! it forever).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// How [`crate::serve`] treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// A client must send a request's headers within this time after the server starts
    /// waiting for them (also the idle limit of a keep-alive connection).
    pub header_read_timeout: Duration,
    /// Connections served at once (WebSockets included); more wait until one closes.
    pub max_connections: usize,
    /// On shutdown, how long requests in flight may take to finish; connections still busy
    /// after it (a live SSE stream never finishes) are closed.
    pub shutdown_grace: Duration,
    /// A request body that sends nothing for this long fails (400): a slow body cannot hold
    /// a connection forever. Long uploads are fine as long as bytes keep coming.
    pub body_idle_timeout: Duration,
    /// Largest JUnit report `POST /api/v1/tests/ingest` (and an artifact upload with a
    /// `phase`) takes, in bytes; a larger one is a 413 naming the limit, and nothing is stored.
    pub max_ingest_bytes: u64,
}

/// Default of [`ServeOptions::max_ingest_bytes`]: 256 MiB.
pub const DEFAULT_MAX_INGEST_BYTES: u64 = 256 * 1024 * 1024;

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_ingest_bytes: DEFAULT_MAX_INGEST_BYTES,
        }
    }
}

/// A socket that holds its connection permit until it is dropped (also after a WebSocket
/// upgrade took it over).
struct Permitted {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Permitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// An accept error that concerns one connection only (the loop goes on at once).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves `app` on `listener` until `shutdown` completes.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let idle = options.body_idle_timeout;
    let app = app.layer(axum::middleware::map_request(
        move |req: axum::extract::Request| async move { idle_limited(req, idle) },
    ));
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // Connections watch `stop`; `closed` completes when every connection task has ended.
    let (stop_tx, stop_rx) = watch::channel(());
    let (kill_tx, kill_rx) = watch::channel(());
    let (closed_tx, closed_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Streams send small messages: no Nagle delay behind a delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let io = TokioIo::new(Permitted {
            tcp,
            _permit: permit,
        });
        let conn = http
            .serve_connection(io, TowerToHyperService::new(app.clone()))
            .with_upgrades();
        let (mut stop, mut kill) = (stop_rx.clone(), kill_rx.clone());
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        // Past the grace period: dropping the connection closes the socket.
                        _ = kill.changed() => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(closed);
        });
    }
    drop(listener);
    drop((stop_rx, kill_rx));
    let _ = stop_tx.send(());
    drop(closed_rx);
    if tokio::time::timeout(options.shutdown_grace, closed_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = closed_tx.receiver_count(),
            grace = ?options.shutdown_grace,
            "connections still busy after the shutdown grace period; closing them"
        );
        let _ = kill_tx.send(());
        closed_tx.closed().await;
    }
    Ok(())
}

/// `req` with a body that fails once it sends nothing for `idle` (requests without a body are
/// left alone: a WebSocket or SSE client may be quiet for as long as it likes after its
/// request).
fn idle_limited(req: axum::extract::Request, idle: Duration) -> axum::extract::Request {
    use futures_util::StreamExt;
    // An empty body keeps its exact (zero) size, which the guard reads to tell a body from
    // none.
    use axum::body::HttpBody;
    if req.body().size_hint().exact() == Some(0) {
        return req;
    }
    req.map(|body| {
        let stream = body.into_data_stream();
        axum::body::Body::from_stream(futures_util::stream::unfold(
            Some(stream),
            move |state| async move {
                let mut s = state?;
                match tokio::time::timeout(idle, s.next()).await {
                    Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(s))),
                    Ok(Some(Err(e))) => Some((Err(io::Error::other(e)), None)),
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the request body stalled: nothing arrived for {} s",
                                idle.as_secs_f64()
                            ),
                        )),
                        None,
                    )),
                }
            },
        ))
    })
}
