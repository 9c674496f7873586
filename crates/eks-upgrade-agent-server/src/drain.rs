//! Answers that come before the request body was read, delivered.
//!
//! A handler (or a middleware: auth, the guard, a query check) may answer a request without
//! reading its body: an upload refused on its query, an unknown session, a bad token. If the
//! server then closes the socket with the body's bytes still arriving, the kernel resets the
//! connection and a client still sending (ureq streams uploads) sees "broken pipe" or
//! "connection reset" instead of the answer. [`drain_unread`] wraps every request body; when
//! the answer is ready and the body is neither finished nor failed, it reads and discards what
//! is left, up to [`DRAIN_LIMIT`] bytes within [`DRAIN_TIME`], so a small body is consumed
//! whole and the client reads the answer on a connection that stays open. A larger one (or a
//! declared `Content-Length` above the limit) is left unread and the answer says
//! `Connection: close`; the CLI's streaming client then reads the answer after its write fails.
//!
//! Requests that ask `Expect: 100-continue` are left alone: their client waits for the answer
//! before sending the body, and reading it here would invite it to send.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Bytes, Frame, SizeHint};

/// Most bytes of an unread body read and discarded after the answer.
pub(crate) const DRAIN_LIMIT: u64 = 1024 * 1024;

/// Longest time spent discarding an unread body after the answer.
pub(crate) const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Where a request body stands.
#[derive(Debug, Default)]
struct Shared {
    /// The body; taken back once the answer is ready.
    body: Option<Body>,
    /// It reached its end or failed: nothing is left to drain.
    done: bool,
}

/// The body the handler reads: the shared one, until the answer takes it back.
struct Tracked(Arc<Mutex<Shared>>);

fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut s = lock(&self.0);
        let Some(body) = s.body.as_mut() else {
            // Never a clean end: a reader still running after the answer must not take a
            // truncated body for a whole one.
            return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::other(
                "the request was already answered",
            )))));
        };
        let frame = Pin::new(body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            s.done = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.0);
        s.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.0)
            .body
            .as_ref()
            .map(HttpBody::size_hint)
            .unwrap_or_default()
    }
}

/// The middleware: runs the request, then drains what its body still holds (see the module
/// docs).
pub(crate) async fn drain_unread(req: Request, next: Next) -> Response {
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if req.body().size_hint().exact() == Some(0) || expects_continue {
        return next.run(req).await;
    }
    // The declared length (the body's own size hint is lost under the idle limit of conn.rs).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let req = req.map(|body| {
        lock(&shared).body = Some(body);
        Body::new(Tracked(Arc::clone(&shared)))
    });
    let mut resp = next.run(req).await;
    let left = {
        let mut s = lock(&shared);
        if s.done { None } else { s.body.take() }
    };
    if let Some(body) = left
        && (declared.is_some_and(|n| n > DRAIN_LIMIT)
            || !drain(body, DRAIN_LIMIT, DRAIN_TIME).await)
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Reads and discards `body` to its end; false when that would take more than `limit` bytes
/// or `time` (or the body fails).
async fn drain(body: Body, limit: u64, time: Duration) -> bool {
    use futures_util::StreamExt;
    let mut read = 0u64;
    let mut data = body.into_data_stream();
    let drained = tokio::time::timeout(time, async {
        while let Some(chunk) = data.next().await {
            let Ok(chunk) = chunk else { return false };
            read += chunk.len() as u64;
            if read > limit {
                return false;
            }
        }
        true
    })
    .await;
    let drained = drained.unwrap_or(false);
    tracing::debug!(bytes = read, drained, "drained an unread request body");
    drained
}
