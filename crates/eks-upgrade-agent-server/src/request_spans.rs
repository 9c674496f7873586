//! Request spans: with an OTLP endpoint configured, one OpenTelemetry span per HTTP request
//! (kind `SERVER`, named `METHOD ROUTE`; `http.request.method`, `http.route`,
//! `http.response.status_code`, `url.path` without the query, `url.scheme`, `server.address`
//! and `server.port` from `Host`; status `ERROR` for a 5xx), sent in batches by a background
//! thread through the OTLP sink's transport ([`OtlpExporter`]), off the request path: a request
//! only pushes its span into a bounded queue and never waits (a full queue drops the span and
//! counts it; an export that fails is logged, not retried: these spans are best effort, the
//! upgrade's own trace goes through the outbox). At a graceful stop, [`RequestSpans::shutdown`]
//! sends what is queued and waits for the thread, within a bound, so the spans of the last
//! requests reach the collector.
//!
//! A write (`POST`, `PUT`, `PATCH`, `DELETE`) under `/api/v1/upgrades/{upgrade}/...` carries
//! `eks.upgrade.id` and a link to the upgrade's root span (the sink's deterministic ids), so a
//! collector shows which requests drove an upgrade. So do the writes that name their upgrades in
//! the body (`POST /api/v1/upgrades`, `POST /api/v1/store/execute`): their handlers put the
//! upgrades they committed to in the response's extensions ([`UpgradesWritten`]); a batch
//! naming several gets a link to each (at most [`MAX_LINKS`]), and `eks.upgrade.id` only when
//! it names one. A W3C `traceparent` header makes the span a
//! child of the caller's; otherwise each request starts its own trace.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use eks_upgrade_agent::notify::EntryResult;
use eks_upgrade_agent::notify::otlp::{self, OtlpExporter};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status, span, status};
use sha2::{Digest as _, Sha256};

use crate::AppState;

/// Spans waiting for the exporter at most; beyond, new ones are dropped.
pub const QUEUE: usize = 4096;
/// Most spans per export.
pub const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for others.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// The instrumentation scope of the request spans.
pub const SCOPE: &str = "eks-upgrade-agent-server";

/// Most links to upgrade traces on one request span.
pub const MAX_LINKS: usize = 32;

/// The upgrades a request changed, when its path does not name them (the handler puts this in
/// the response's extensions, in order, without repeats): read by the request span middleware.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradesWritten(pub Vec<String>);

impl UpgradesWritten {
    /// The distinct upgrades of `ids`, in first-seen order, at most [`MAX_LINKS`] + 1 of them
    /// (enough to link [`MAX_LINKS`] and to tell one upgrade from several): a batch of many
    /// commands costs at most that many comparisons per command.
    pub fn of<'a>(ids: impl IntoIterator<Item = &'a str>) -> UpgradesWritten {
        let mut out: Vec<String> = Vec::new();
        for id in ids {
            if !out.iter().any(|x| x == id) {
                if out.len() > MAX_LINKS {
                    break;
                }
                out.push(id.to_owned());
            }
        }
        UpgradesWritten(out)
    }
}

/// What the exporting thread receives.
enum Msg {
    Span(Box<Span>),
    /// Send what is batched and stop ([`RequestSpans::shutdown`]).
    Close,
}

/// The queue of request spans and its exporting thread (which ends at
/// [`shutdown`](RequestSpans::shutdown), or when the last clone of the state holding this is
/// dropped, after sending what is queued).
pub struct RequestSpans {
    tx: SyncSender<Msg>,
    label: String,
    dropped: AtomicU64,
    ids: IdSource,
    /// The thread, and what it drops when it ends.
    thread: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
}

impl fmt::Debug for RequestSpans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSpans")
            .field("exporter", &self.label)
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RequestSpans {
    /// Starts the exporting thread over `exporter`.
    pub fn start(exporter: OtlpExporter) -> std::io::Result<RequestSpans> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let label = exporter.label().to_owned();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("eua-request-spans".into())
            .spawn(move || {
                export_loop(&exporter, &rx);
                drop(done_tx);
            })?;
        Ok(RequestSpans {
            tx,
            label,
            dropped: AtomicU64::new(0),
            ids: IdSource::new(),
            thread: Mutex::new(Some((handle, done_rx))),
        })
    }

    /// At a graceful stop, once no request runs: the thread sends what is queued (without
    /// waiting for a batch to fill) and ends; waits for it at most `wait`. True when it ended
    /// in time (false: the collector did not answer in time; the thread is left behind).
    pub fn shutdown(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut msg = Msg::Close;
        loop {
            match self.tx.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let Some((handle, done)) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return true;
        };
        match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                true
            }
        }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn push(&self, span: Span) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        exporter = %self.label,
                        "request spans are being dropped: the OTLP endpoint does not keep up"
                    );
                }
            }
        }
    }
}

fn export_loop(exporter: &OtlpExporter, rx: &Receiver<Msg>) {
    while let Ok(Msg::Span(first)) = rx.recv() {
        let mut batch = vec![*first];
        let deadline = Instant::now() + BATCH_DELAY;
        let mut closed = false;
        while batch.len() < MAX_BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Msg::Span(s)) => batch.push(*s),
                Err(RecvTimeoutError::Timeout) => break,
                Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let n = batch.len();
        match exporter.send(&exporter.request(SCOPE, batch)) {
            EntryResult::Delivered => {}
            EntryResult::Retry(e) | EntryResult::Reject(e) => {
                tracing::debug!(spans = n, error = %e, "request spans not exported");
            }
        }
        if closed {
            return;
        }
    }
}

/// Random trace and span ids: SHA-256 over a per-process random seed and a counter.
struct IdSource {
    seed: [u8; 32],
    next: AtomicU64,
}

impl IdSource {
    fn new() -> IdSource {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut h = Sha256::new();
        // `RandomState` keys come from the operating system's random source.
        for _ in 0..2 {
            h.update(RandomState::new().hash_one(now).to_le_bytes());
        }
        h.update(now.to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        IdSource {
            seed: h.finalize().into(),
            next: AtomicU64::new(0),
        }
    }

    fn bytes(&self) -> [u8; 32] {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(self.seed);
        h.update(n.to_le_bytes());
        h.finalize().into()
    }

    /// A fresh trace id and span id (never all zero).
    fn trace_and_span(&self) -> ([u8; 16], [u8; 8]) {
        let b = self.bytes();
        let mut t = [0u8; 16];
        let mut s = [0u8; 8];
        t.copy_from_slice(&b[..16]);
        s.copy_from_slice(&b[16..24]);
        if t == [0; 16] {
            t[15] = 1;
        }
        if s == [0; 8] {
            s[7] = 1;
        }
        (t, s)
    }
}

/// The middleware: a span for the request, pushed once the response is ready.
pub(crate) async fn record(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(spans) = s.request_spans.clone() else {
        return next.run(req).await;
    };
    let start = unix_nanos();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let path = req.uri().path().to_owned();
    let host = host_and_port(req.headers());
    let parent = traceparent(req.headers());
    let resp = next.run(req).await;
    let end = unix_nanos();
    let status = resp.status().as_u16();
    let (own_trace, span_id) = spans.ids.trace_and_span();
    let (trace_id, parent_span_id) = match parent {
        Some((t, p)) => (t.to_vec(), p.to_vec()),
        None => (own_trace.to_vec(), Vec::new()),
    };
    let method_name = method_attr(&method);
    let name = match &route {
        Some(r) => format!("{method_name} {r}"),
        None => method_name.to_owned(),
    };
    let mut attributes = vec![
        s_kv("http.request.method", method_name),
        kv(
            "http.response.status_code",
            any_value::Value::IntValue(status.into()),
        ),
        s_kv("url.path", path.clone()),
        s_kv("url.scheme", "http"),
    ];
    if let Some(r) = &route {
        attributes.push(s_kv("http.route", r.clone()));
    }
    if let Some((h, port)) = host {
        attributes.push(s_kv("server.address", h));
        if let Some(p) = port {
            attributes.push(kv("server.port", any_value::Value::IntValue(p.into())));
        }
    }
    let upgrades = match upgrade_written(&method, route.as_deref(), &path) {
        Some(u) => vec![u],
        None => resp
            .extensions()
            .get::<UpgradesWritten>()
            .map(|w| w.0.clone())
            .unwrap_or_default(),
    };
    let links = upgrades
        .iter()
        .take(MAX_LINKS)
        .map(|upgrade| span::Link {
            trace_id: otlp::trace_id(upgrade).to_vec(),
            span_id: otlp::span_id(upgrade, None).to_vec(),
            attributes: vec![s_kv("eks.link", "upgrade")],
            ..span::Link::default()
        })
        .collect();
    if let [upgrade] = upgrades.as_slice() {
        attributes.push(s_kv("eks.upgrade.id", upgrade.clone()));
    }
    spans.push(Span {
        trace_id,
        span_id: span_id.to_vec(),
        parent_span_id,
        name,
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end.max(start),
        attributes,
        links,
        status: (status >= 500).then(|| Status {
            code: status::StatusCode::Error as i32,
            message: String::new(),
        }),
        ..Span::default()
    });
    resp
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn s_kv(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

/// `http.request.method`: a known method, else `_OTHER` (semantic conventions).
fn method_attr(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// `server.address` and `server.port` from the `Host` header.
fn host_and_port(h: &HeaderMap) -> Option<(String, Option<u16>)> {
    let host = h.get(header::HOST)?.to_str().ok()?.trim();
    if host.is_empty() {
        return None;
    }
    let uri: axum::http::uri::Authority = host.parse().ok()?;
    Some((
        uri.host().trim_matches(['[', ']']).to_owned(),
        uri.port_u16(),
    ))
}

/// The caller's trace id and span id from a W3C `traceparent` header
/// (`00-<32 hex>-<16 hex>-<2 hex>`, neither id all zero).
fn traceparent(h: &HeaderMap) -> Option<([u8; 16], [u8; 8])> {
    let v = h.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = v.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let mut t = [0u8; 16];
    let mut p = [0u8; 8];
    hex::decode_to_slice(trace, &mut t).ok()?;
    hex::decode_to_slice(parent, &mut p).ok()?;
    hex::decode(flags).ok()?;
    if t == [0; 16] || p == [0; 8] {
        return None;
    }
    Some((t, p))
}

/// The upgrade a write under `/api/v1/upgrades/{upgrade}/...` changes.
fn upgrade_written(method: &Method, route: Option<&str>, path: &str) -> Option<String> {
    if !matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) || !route?.starts_with("/api/v1/upgrades/{upgrade}/")
    {
        return None;
    }
    let segment = path.strip_prefix("/api/v1/upgrades/")?.split('/').next()?;
    let decoded = url_decode(segment)?;
    (!decoded.is_empty()).then_some(decoded)
}

/// Percent-decoding of one path segment (`None` when not UTF-8).
fn url_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|x| u8::from_str_radix(x, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let (t, p) = traceparent(&h).unwrap();
        assert_eq!(hex::encode(t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(p), "00f067aa0ba902b7");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            h.insert("traceparent", bad.parse().unwrap());
            assert_eq!(traceparent(&h), None, "{bad}");
        }
    }

    #[test]
    fn only_writes_under_an_upgrade_are_linked() {
        let r = Some("/api/v1/upgrades/{upgrade}/tasks/{task}/{op}");
        assert_eq!(
            upgrade_written(&Method::POST, r, "/api/v1/upgrades/u%201/tasks/t/start").as_deref(),
            Some("u 1")
        );
        assert_eq!(
            upgrade_written(&Method::GET, r, "/api/v1/upgrades/u/tasks/t/start"),
            None
        );
        assert_eq!(
            upgrade_written(&Method::POST, Some("/api/v1/upgrades"), "/api/v1/upgrades"),
            None
        );
        assert_eq!(
            upgrade_written(&Method::POST, None, "/api/v1/upgrades/u/x"),
            None
        );
    }

    #[test]
    fn upgrades_written_are_distinct_in_order() {
        assert_eq!(
            UpgradesWritten::of(["b", "a", "b", "c", "a"]).0,
            ["b", "a", "c"]
        );
    }

    #[test]
    fn upgrades_written_stop_past_the_links_kept() {
        // 50,000 distinct upgrades would be 1.25e9 comparisons on a tokio worker if all were kept.
        let ids: Vec<String> = (0..50_000).map(|i| format!("u{i}")).collect();
        let w = UpgradesWritten::of(ids.iter().map(String::as_str));
        assert_eq!(w.0.len(), MAX_LINKS + 1);
        assert_eq!(w.0[..], ids[..=MAX_LINKS]);
    }

    #[test]
    fn ids_are_fresh() {
        let ids = IdSource::new();
        let (t1, s1) = ids.trace_and_span();
        let (t2, s2) = ids.trace_and_span();
        assert_ne!(t1, t2);
        assert_ne!(s1, s2);
        assert_ne!(IdSource::new().seed, ids.seed);
    }
}
