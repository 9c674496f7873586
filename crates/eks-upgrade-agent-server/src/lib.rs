//! The HTTP API of the EKS Upgrade Agent: `router(state)` builds the axum router,
//! `serve(listener, state, shutdown)` runs it; tests bind `127.0.0.1:0`.
//!
//! Request bodies use the model's field names, the same as `progress apply` (a task operation's
//! body is the `apply` line without `op`, `upgrade_id` and `task_id`, which come from the path).
//! Errors have one JSON shape, `{"error": {"code": "...", "message": "..."}}`: 400 malformed JSON
//! or query, 401 missing or wrong token, 403 read token on a write route or a host or origin
//! that is not allowed ([`guard`]), 404 unknown upgrade, task or route, 405 a method the route
//! does not take, 409 already exists or invalid transition, 413 body too large, 415 a body
//! that is not `application/json`, 422 invalid values; 5xx say "internal error" and the detail
//! goes to the log. axum's own rejections (a path segment that is not UTF-8, a missing
//! WebSocket upgrade) get the same shape.
//!
//! The library is synchronous (SQLite); handlers call it on the blocking pool. Live streams
//! (WebSocket and SSE) are fed by one [`hub::Hub`] per state.
//!
//! ```
//! use std::sync::Arc;
//! use eks_upgrade_agent::{ProgressTracker, SqliteStore, store::sqlite::SqliteOptions};
//! use eks_upgrade_agent_server::{AppState, router};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let store = SqliteStore::open(dir.path(), &SqliteOptions::default())?;
//! let app = router(AppState::new(Arc::new(ProgressTracker::new(Arc::new(store)))));
//! # let _ = app;
//! # Ok::<(), eks_upgrade_agent::Error>(())
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::notify::Dispatcher;
use eks_upgrade_agent::progress::ProgressTracker;
use eks_upgrade_agent::store::UploadQueue;
use eks_upgrade_agent::store::postgres::{ListenOptions, ListenStats, Listener, PostgresStore};

mod artifacts_api;
pub mod auth;
mod committer;
mod conn;
mod dashboard;
mod drain;
mod error;
pub mod guard;
pub mod hub;
mod maintenance;
mod metrics;
mod openapi;
mod progress_api;
pub mod request_spans;
mod store_api;
mod stream;
mod tests_api;

pub use committer::GROUP_WAIT;
pub use conn::{DEFAULT_MAX_INGEST_BYTES, ServeOptions};
pub use metrics::Metrics;

pub use auth::{Auth, Role};
pub use error::ApiError;
pub use guard::Guard;

/// Largest JSON body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most events one `GET .../events` (or store protocol list) returns; a larger `limit` or
/// `latest` is a 400 naming it (the next page is `?since=<last seq>`).
pub const MAX_EVENTS: usize = 10_000;
/// Largest `POST /api/v1/store/execute` body (the library's `RemoteStore` splits its batches
/// below it).
pub const MAX_EXECUTE_BODY: usize = 4 * 1024 * 1024;
/// Largest `POST /api/v1/store/import` body.
pub const MAX_IMPORT_BODY: usize = 16 * 1024 * 1024;
/// Largest WebSocket message or frame a client may send (clients send small control
/// messages); a larger one closes the connection.
pub const MAX_WS_MESSAGE: usize = 64 * 1024;
/// Default idle time before a stream sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// What handlers share; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The tracker over the store.
    pub tracker: Arc<ProgressTracker>,
    /// Fan-out of new events to stream clients.
    pub hub: hub::Hub,
    /// Tokens (none: everything allowed).
    pub auth: Arc<Auth>,
    /// Hosts and origins allowed beyond loopback (see [`guard`]).
    pub guard: Arc<Guard>,
    /// Idle time before a stream sends a heartbeat.
    pub heartbeat: Duration,
    /// Artifacts (none: the artifact routes answer 404).
    pub artifacts: Option<Arc<TestArtifactsManager>>,
    /// Test results (none: the `/api/v1/tests` routes answer 404).
    pub tests: Option<Arc<eks_upgrade_agent::TestResults>>,
    /// The upload queue, for `/metrics`.
    pub uploads: Option<Arc<dyn UploadQueue>>,
    /// The notification dispatcher, for `/metrics`.
    pub dispatcher: Option<Arc<Dispatcher>>,
    /// Counters and latencies.
    pub metrics: Arc<Metrics>,
    /// The configured S3 store (upload runs through the API).
    #[cfg(feature = "aws")]
    pub s3: Option<Arc<eks_upgrade_agent::blob::S3BlobStore>>,
    /// Header-read timeout and connection cap of [`serve`].
    pub serve_options: ServeOptions,
    /// Group commit of the REST API's progress writes.
    committer: Arc<committer::Committer>,
    /// The shared database (team mode), for `/healthz` and `/metrics`, with the connection
    /// that wakes streams on other replicas' commits.
    pub database: Option<Database>,
    /// Request spans to an OTLP endpoint (none: not traced).
    pub request_spans: Option<Arc<request_spans::RequestSpans>>,
}

/// The PostgreSQL side of a replica (see [`AppState::with_database`]).
#[derive(Debug, Clone)]
pub struct Database {
    /// The store.
    pub store: Arc<PostgresStore>,
    /// Its `LISTEN` connection's figures.
    pub listen: Arc<ListenStats>,
    /// `/healthz` answers 503 when a session has held the `seq` counter longer than this.
    pub stall_after: Duration,
    /// Keeps the listening thread running.
    _listener: Arc<Listener>,
    /// Pool, lease and listener figures.
    metrics: Arc<metrics::DatabaseMetrics>,
}

/// `/healthz` on a database: 503 when a session has held the `seq` counter longer than this.
pub const COUNTER_STALL: Duration = Duration::from_secs(10);

/// How often streams on a database read it while `LISTEN` works (a safety net: notifications
/// wake them at once); while it does not, they poll every [`hub::POLL`].
pub const DATABASE_QUIET_POLL: Duration = Duration::from_secs(1);

impl AppState {
    /// A state over `tracker`, no tokens, default heartbeat.
    pub fn new(tracker: Arc<ProgressTracker>) -> AppState {
        let metrics = Arc::new(Metrics::default());
        AppState {
            hub: hub::Hub::new(Arc::clone(&tracker)),
            committer: Arc::new(committer::Committer::new(
                Arc::clone(&tracker),
                metrics.commits.clone(),
            )),
            tracker,
            auth: Arc::new(Auth::open()),
            guard: Arc::new(Guard::new()),
            serve_options: ServeOptions::default(),
            heartbeat: HEARTBEAT,
            artifacts: None,
            tests: None,
            uploads: None,
            dispatcher: None,
            metrics,
            #[cfg(feature = "aws")]
            s3: None,
            database: None,
            request_spans: None,
        }
    }

    /// On the shared database `store` (team mode): a `LISTEN` connection wakes the streams
    /// for every commit (any replica's; commits notify while some replica's streams have
    /// clients, which the hub tells the database); streams read the database every `quiet` while it
    /// works and every [`hub::POLL`] while it does not. `/healthz` and `/metrics` report on the
    /// database. Call after [`with_stream_limits`](Self::with_stream_limits).
    pub fn with_database(
        mut self,
        store: Arc<PostgresStore>,
        listen: ListenOptions,
        quiet: Duration,
    ) -> std::io::Result<AppState> {
        let listener = store.listen(listen, self.hub.waker())?;
        let stats = listener.stats();
        let up = Arc::clone(&stats);
        self.hub.follow_wakeups(move || up.connected(), quiet);
        // Commits notify only while some replica's streams have clients.
        let marks = Arc::clone(&store);
        self.hub.on_following(
            move |on| marks.set_following(on),
            eks_upgrade_agent::store::postgres::listen::FOLLOW_RENEW,
        );
        self.database = Some(Database {
            store,
            listen: stats,
            stall_after: COUNTER_STALL,
            _listener: Arc::new(listener),
            metrics: Arc::new(metrics::DatabaseMetrics::default()),
        });
        Ok(self)
    }

    /// With another limit for the `seq` counter's hold before `/healthz` says 503 (after
    /// [`with_database`](Self::with_database); default [`COUNTER_STALL`]).
    pub fn with_counter_stall(mut self, after: Duration) -> AppState {
        if let Some(db) = &mut self.database {
            db.stall_after = after;
        }
        self
    }

    /// With request spans (see [`request_spans`]).
    pub fn with_request_spans(mut self, spans: request_spans::RequestSpans) -> AppState {
        self.request_spans = Some(Arc::new(spans));
        self
    }

    /// With the configured S3 store (for `POST /api/v1/maintenance/upload`).
    #[cfg(feature = "aws")]
    pub fn with_s3(mut self, s3: Arc<eks_upgrade_agent::blob::S3BlobStore>) -> AppState {
        self.s3 = Some(s3);
        self
    }

    /// With artifacts (and their upload queue, for metrics).
    pub fn with_artifacts(
        mut self,
        artifacts: Arc<TestArtifactsManager>,
        uploads: Option<Arc<dyn UploadQueue>>,
    ) -> AppState {
        self.artifacts = Some(artifacts);
        self.uploads = uploads;
        self
    }

    /// With test results (`/api/v1/tests/...`).
    pub fn with_test_results(mut self, tests: Arc<eks_upgrade_agent::TestResults>) -> AppState {
        self.tests = Some(tests);
        self
    }

    /// With the notification dispatcher (for metrics).
    pub fn with_dispatcher(mut self, dispatcher: Arc<Dispatcher>) -> AppState {
        self.dispatcher = Some(dispatcher);
        self
    }

    /// With tokens.
    pub fn with_auth(mut self, auth: Auth) -> AppState {
        self.auth = Arc::new(auth);
        self
    }

    /// With the hosts and origins allowed beyond loopback (`serve` adds its listen address).
    pub fn with_guard(mut self, guard: Guard) -> AppState {
        self.guard = Arc::new(guard);
        self
    }

    /// With another header-read timeout or connection cap for [`serve`].
    pub fn with_serve_options(mut self, options: ServeOptions) -> AppState {
        self.serve_options = options;
        self
    }

    /// With another group-commit wait for the progress writes of concurrent requests (default
    /// [`GROUP_WAIT`]; zero commits what is queued at once): when the last transaction took
    /// more than one request and fewer are queued now, the committer waits up to this long
    /// for as many. A lone writer never waits.
    pub fn with_group_wait(self, wait: Duration) -> AppState {
        self.committer.set_wait(wait);
        self
    }

    /// With another broadcast ring size and resync threshold (see [`hub`]).
    pub fn with_stream_limits(mut self, ring: usize, max_lag: u64) -> AppState {
        self.hub = hub::Hub::with_limits(Arc::clone(&self.tracker), ring, max_lag);
        self
    }

    /// With another heartbeat interval.
    pub fn with_heartbeat(mut self, every: Duration) -> AppState {
        self.heartbeat = every;
        self
    }
}

/// The router over `state`.
pub fn router(state: AppState) -> Router {
    use artifacts_api as a;
    use progress_api as p;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/", get(dashboard::index))
        .route("/assets/app.js", get(dashboard::app_js))
        .route("/assets/app.css", get(dashboard::app_css))
        .route("/favicon.ico", get(dashboard::favicon))
        .route(
            "/api/v1/upgrades",
            get(p::list_upgrades).post(p::create_upgrade),
        )
        .route("/api/v1/upgrades/{upgrade}", get(p::show_upgrade))
        .route("/api/v1/upgrades/{upgrade}/events", get(p::events))
        .route(
            "/api/v1/upgrades/{upgrade}/events/stream",
            get(stream::upgrade_sse),
        )
        .route("/api/v1/upgrades/{upgrade}/ws", get(stream::upgrade_ws))
        .route(
            "/api/v1/upgrades/{upgrade}/tests/compare",
            get(tests_api::compare_upgrade),
        )
        .route("/api/v1/tests/runs", get(tests_api::runs))
        .route("/api/v1/tests/runs/{run}", get(tests_api::show_run))
        .route(
            "/api/v1/tests/runs/{run}/results",
            get(tests_api::run_results),
        )
        .route("/api/v1/tests/compare", get(tests_api::compare))
        .route("/api/v1/tests/history", get(tests_api::history))
        .route("/api/v1/tests/flaky", get(tests_api::flaky))
        .route("/api/v1/tests/ingest", post(tests_api::ingest))
        .route("/api/v1/ws", get(stream::all_ws))
        .route("/api/v1/events/stream", get(stream::all_sse))
        .route(
            "/api/v1/upgrades/{upgrade}/tasks",
            get(p::list_tasks).post(p::add_tasks),
        )
        .route("/api/v1/upgrades/{upgrade}/tasks/{task}", get(p::show_task))
        .route(
            "/api/v1/upgrades/{upgrade}/tasks/{task}/events",
            get(p::task_events),
        )
        .route(
            "/api/v1/upgrades/{upgrade}/tasks/{task}/{op}",
            post(p::task_op),
        )
        .route("/api/v1/upgrades/{upgrade}/{op}", post(p::upgrade_op))
        .route(
            "/api/v1/sessions",
            get(a::list_sessions).post(a::create_session),
        )
        .route("/api/v1/ids/{kind}", get(a::shortest_ids))
        .route("/api/v1/ids/{kind}/{abbrev}", get(a::resolve_id))
        .route("/api/v1/sessions/{session}", get(a::show_session))
        .route(
            "/api/v1/sessions/{session}/complete",
            post(a::complete_session),
        )
        .route(
            "/api/v1/sessions/{session}/collections",
            get(a::list_collections).post(a::create_collection),
        )
        .route(
            "/api/v1/sessions/{session}/collections/{collection}/artifacts",
            post(a::upload),
        )
        .route("/api/v1/artifacts", get(a::search))
        .route("/api/v1/artifacts/stats", get(a::stats))
        .route(
            "/api/v1/artifacts/{artifact}",
            get(a::show_artifact).delete(a::delete_artifact),
        )
        .route("/api/v1/artifacts/{artifact}/content", get(a::download))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/openapi.json", get(openapi::openapi))
        .route("/api/v1/maintenance/verify", post(maintenance::verify))
        .route("/api/v1/maintenance/cleanup", post(maintenance::cleanup))
        .route("/api/v1/maintenance/gc", post(maintenance::gc))
        .route("/api/v1/maintenance/upload", post(maintenance::upload))
        .route("/api/v1/maintenance/pull", post(maintenance::pull))
        .route(
            "/api/v1/store/execute",
            post(store_api::execute).layer(DefaultBodyLimit::max(MAX_EXECUTE_BODY)),
        )
        .route(
            "/api/v1/store/import",
            post(store_api::import).layer(DefaultBodyLimit::max(MAX_IMPORT_BODY)),
        )
        .route("/api/v1/store/upgrades", get(store_api::upgrades))
        .route("/api/v1/store/upgrades/{upgrade}", get(store_api::upgrade))
        .route(
            "/api/v1/store/upgrades/{upgrade}/tasks",
            get(store_api::tasks),
        )
        .route(
            "/api/v1/store/upgrades/{upgrade}/tasks/{task}",
            get(store_api::task),
        )
        .route(
            "/api/v1/store/upgrades/{upgrade}/tasks/{task}/recent",
            get(store_api::recent),
        )
        .route(
            "/api/v1/store/upgrades/{upgrade}/latest",
            get(store_api::latest),
        )
        .route("/api/v1/store/events", get(store_api::events))
        .route("/api/v1/store/last_seq", get(store_api::last_seq))
        .route("/api/v1/store/task_history", get(store_api::task_history))
        .route(
            "/api/v1/upgrades/{upgrade}/artifact_counts",
            get(artifacts_api::counts_by_task),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check,
        ))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn(drain::drain_unread))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_spans::record,
        ))
        .with_state(state)
}

/// `GET /healthz`: 200 `{"status":"ok","last_seq":N}` when the store answers, else 503; on a
/// database, 200 `{"status":"degraded",...,"warning":...}` naming the session that has held the
/// `seq` counter too long (every write waits for it, reads do not).
async fn healthz(
    axum::extract::State(s): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let tracker = Arc::clone(&s.tracker);
    let db = s.database.clone();
    let checked = error::blocking(move || {
        let seq = tracker.store().last_seq()?;
        let stall = match &db {
            Some(db) => db.store.counter_stall(db.stall_after)?,
            None => None,
        };
        Ok((seq, stall))
    })
    .await;
    match checked {
        Ok((seq, None)) => Json(json!({"status": "ok", "last_seq": seq})).into_response(),
        // Still ready: reads and streams work while writes wait, and the counter is shared,
        // so a 503 here would take every replica out of its Service at once.
        Ok((seq, Some(reason))) => {
            Json(json!({"status": "degraded", "last_seq": seq, "warning": reason})).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": e.message()})),
        )
            .into_response(),
    }
}

/// Serves `router(state)` on `listener` until `shutdown` completes, then finishes the requests
/// in flight. Connections get TCP_NODELAY, a header-read timeout and a cap on their number
/// (`state.serve_options`, see [`ServeOptions`]); the listen address joins the allowed hosts.
pub async fn serve(
    listener: TcpListener,
    mut state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut guard = (*state.guard).clone();
    guard.allow_listen_addr(listener.local_addr()?);
    state.guard = Arc::new(guard);
    // Start following the store now, so metrics count events from the start.
    if let Err(e) = state.hub.start().await {
        tracing::warn!(error = %e, "cannot read the store's last seq; streams start on demand");
    }
    let options = state.serve_options;
    conn::run(listener, router(state), options, shutdown).await
}
