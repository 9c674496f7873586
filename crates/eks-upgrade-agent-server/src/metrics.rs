//! `/metrics` in the OpenMetrics text format (which Prometheus scrapes): request latencies by
//! method (standard ones, else `other`), route template (`unmatched` for unknown paths) and
//! status, progress updates through the API and the transactions they took, events seen by the stream hub, stream clients,
//! artifact uploads and downloads, queued S3 uploads and pending notifications (the last two
//! read from the store at scrape time, so they include other processes' work); on a database
//! (team mode) also `eua_db_*`: the connection pool, the outbox's leases, the `LISTEN`
//! connection.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::AppState;
use crate::error::{ApiResult, blocking};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Histogram>,
    /// Progress commands committed through the API.
    pub(crate) updates: Counter,
    pub(crate) commits: Counter,
    /// Artifacts uploaded through the API.
    pub(crate) uploads: Counter,
    /// Artifact downloads started through the API.
    pub(crate) downloads: Counter,
    events: Counter<u64, AtomicU64>,
    /// Two scrapes at once must not both add the same hub events to `events`.
    events_sync: std::sync::Mutex<()>,
    clients: Gauge,
    last_seq: Gauge,
    queued_uploads: Gauge,
    queued_upload_bytes: Gauge,
    pending_notifications: Family<SinkLabels, Gauge>,
    request_spans: Gauge,
    request_spans_dropped: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eua");
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method, route and status",
            requests.clone(),
        );
        let m = Metrics {
            requests,
            updates: Counter::default(),
            commits: Counter::default(),
            uploads: Counter::default(),
            downloads: Counter::default(),
            events: Counter::default(),
            events_sync: std::sync::Mutex::new(()),
            clients: Gauge::default(),
            last_seq: Gauge::default(),
            queued_uploads: Gauge::default(),
            queued_upload_bytes: Gauge::default(),
            pending_notifications: Family::default(),
            request_spans: Gauge::default(),
            request_spans_dropped: Counter::default(),
            registry,
        };
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "progress_updates",
            "Progress commands committed through the API",
            m.updates.clone(),
        );
        r.register(
            "progress_commits",
            "Transactions the API's progress commands were committed in (group commit: concurrent \
             requests share one)",
            m.commits.clone(),
        );
        r.register(
            "artifact_uploads",
            "Artifacts uploaded through the API",
            m.uploads.clone(),
        );
        r.register(
            "artifact_downloads",
            "Artifact downloads served",
            m.downloads.clone(),
        );
        r.register(
            "events",
            "Progress events (any writer's) the stream hub read for its clients since start; it \
             reads none while no client is connected",
            m.events.clone(),
        );
        r.register(
            "stream_clients",
            "Connected WebSocket and SSE clients",
            m.clients.clone(),
        );
        r.register(
            "last_seq",
            "Highest event seq published to streams (the store's, while no client is connected)",
            m.last_seq.clone(),
        );
        r.register(
            "uploads_queued",
            "Artifacts queued for upload to S3",
            m.queued_uploads.clone(),
        );
        r.register(
            "uploads_queued_bytes",
            "Bytes of artifacts queued for upload to S3",
            m.queued_upload_bytes.clone(),
        );
        r.register(
            "notifications_pending",
            "Notifications not yet delivered, by sink",
            m.pending_notifications.clone(),
        );
        r.register(
            "request_spans_exporting",
            "1 when request spans are exported (an OTLP endpoint is configured), else 0",
            m.request_spans.clone(),
        );
        r.register(
            "request_spans_dropped",
            "Request spans dropped because the export queue was full",
            m.request_spans_dropped.clone(),
        );
        m
    }
}

/// Records the latency of every request under its route template.
pub(crate) async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Labels come from fixed sets: a client must not be able to mint time series.
    let method = method_label(req.method()).to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// The method as a label: one of the standard methods, else `other`.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *m {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// Team mode's figures: the database pool, the outbox leases, the `LISTEN` connection.
#[derive(Debug)]
pub(crate) struct DatabaseMetrics {
    registry: Registry,
    connections: Gauge,
    idle: Gauge,
    in_use: Gauge,
    max: Gauge,
    waits: Counter<u64, AtomicU64>,
    waited: Counter<f64, std::sync::atomic::AtomicU64>,
    leases_held: Gauge,
    leases_expired: Gauge,
    listening: Gauge,
    notifications: Counter<u64, AtomicU64>,
    /// Two scrapes at once must not both add the same amounts to the counters.
    sync: std::sync::Mutex<()>,
}

impl Default for DatabaseMetrics {
    fn default() -> Self {
        let mut m = DatabaseMetrics {
            registry: Registry::with_prefix("eua_db"),
            connections: Gauge::default(),
            idle: Gauge::default(),
            in_use: Gauge::default(),
            max: Gauge::default(),
            waits: Counter::default(),
            waited: Counter::default(),
            leases_held: Gauge::default(),
            leases_expired: Gauge::default(),
            listening: Gauge::default(),
            notifications: Counter::default(),
            sync: std::sync::Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register(
            "pool_connections",
            "Database connections open (pool size now)",
            m.connections.clone(),
        );
        r.register("pool_idle", "Open connections idle", m.idle.clone());
        r.register("pool_in_use", "Open connections in use", m.in_use.clone());
        r.register("pool_max", "Most connections the pool opens", m.max.clone());
        r.register(
            "pool_waits",
            "Times a request found no idle connection (it waited, or one was opened)",
            m.waits.clone(),
        );
        r.register(
            "pool_wait_seconds",
            "Time requests waited for a connection",
            m.waited.clone(),
        );
        r.register(
            "outbox_leases_held",
            "Notification deliveries claimed by a replica, lease running",
            m.leases_held.clone(),
        );
        r.register(
            "outbox_leases_expired",
            "Notification deliveries whose replica's lease ran out (another takes them over)",
            m.leases_expired.clone(),
        );
        r.register(
            "listening",
            "1 while the LISTEN connection that wakes streams is up (else streams poll)",
            m.listening.clone(),
        );
        r.register(
            "notifications",
            "Commit notifications received on the LISTEN connection",
            m.notifications.clone(),
        );
        m
    }
}

fn gauge(g: &Gauge, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// Reads the database figures (blocking) into `db`'s metrics.
fn database_figures(db: &crate::Database) -> eks_upgrade_agent::Result<()> {
    let m = &db.metrics;
    let pool = db.store.pool_stats();
    let leases = db.store.lease_counts()?;
    let _sync = m.sync.lock().unwrap_or_else(|e| e.into_inner());
    gauge(&m.connections, pool.connections.into());
    gauge(&m.idle, pool.idle.into());
    gauge(&m.in_use, pool.connections.saturating_sub(pool.idle).into());
    gauge(&m.max, pool.max.into());
    m.waits.inc_by(pool.waits.saturating_sub(m.waits.get()));
    m.waited
        .inc_by((pool.waited.as_secs_f64() - m.waited.get()).max(0.0));
    gauge(&m.leases_held, leases.held);
    gauge(&m.leases_expired, leases.expired);
    m.listening.set(i64::from(db.listen.connected()));
    m.notifications.inc_by(
        db.listen
            .notifications()
            .saturating_sub(m.notifications.get()),
    );
    Ok(())
}

/// `GET /metrics`
pub(crate) async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    let m = Arc::clone(&s.metrics);
    {
        let _sync = m.events_sync.lock().unwrap_or_else(|e| e.into_inner());
        let published = s.hub.events_published();
        m.events.inc_by(published.saturating_sub(m.events.get()));
        let dropped = s.request_spans.as_ref().map_or(0, |r| r.dropped());
        m.request_spans_dropped
            .inc_by(dropped.saturating_sub(m.request_spans_dropped.get()));
    }
    m.request_spans.set(i64::from(s.request_spans.is_some()));
    m.clients
        .set(i64::try_from(s.hub.clients()).unwrap_or(i64::MAX));
    let (queue, dispatcher) = (s.uploads.clone(), s.dispatcher.clone());
    let db = s.database.clone();
    let hub = s.hub.clone();
    let (pending_uploads, sinks, last_seq) = blocking(move || {
        // An idle hub (no stream client) reads nothing: the store says where it is.
        let last_seq = if hub.idle() {
            hub.tracker().store().last_seq()?.max(hub.published())
        } else {
            hub.published()
        };
        let uploads = queue.map(|q| q.pending_uploads()).transpose()?;
        let sinks = dispatcher.map(|d| d.status()).transpose()?;
        if let Some(db) = &db {
            database_figures(db)?;
        }
        Ok((uploads, sinks, last_seq))
    })
    .await?;
    m.last_seq.set(i64::try_from(last_seq).unwrap_or(i64::MAX));
    let (n, bytes) = pending_uploads.unwrap_or((0, 0));
    m.queued_uploads.set(i64::try_from(n).unwrap_or(i64::MAX));
    m.queued_upload_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    for sink in sinks.unwrap_or_default() {
        m.pending_notifications
            .get_or_create(&SinkLabels { sink: sink.sink })
            .set(i64::try_from(sink.pending).unwrap_or(i64::MAX));
    }
    let mut text = String::new();
    let encoded = (|| {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        encode_registry(&mut text, &m.registry)?;
        if let Some(db) = &s.database {
            encode_registry(&mut text, &db.metrics.registry)?;
        }
        encode_eof(&mut text)
    })();
    encoded.map_err(|e| eks_upgrade_agent::Error::InvalidInput(format!("metrics: {e}")))?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}
