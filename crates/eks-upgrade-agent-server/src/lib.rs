//! The HTTP API of the EKS Upgrade Agent: `router(state)` builds the axum router,
//! `serve(listener, state, shutdown)` runs it; tests bind `127.0.0.1:0`.
//!
//! Request bodies use the model's field names, the same as `progress apply` (a task operation's
//! body is the `apply` line without `op`, `upgrade_id` and `task_id`, which come from the path).
//! Errors have one JSON shape, `{"error": {"code": "...", "message": "..."}}`: 400 malformed JSON
//! or query, 401 missing or wrong token, 403 read token on a write route, 404 unknown upgrade,
//! task or route, 409 already exists or invalid transition, 413 body too large, 422 invalid
//! values; 5xx say "internal error" and the detail goes to the log.
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

use eks_upgrade_agent::progress::ProgressTracker;

pub mod auth;
mod error;
pub mod hub;
mod progress_api;
mod stream;

pub use auth::{Auth, Role};
pub use error::ApiError;

/// Largest JSON body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most events one `GET .../events` returns.
pub const MAX_EVENTS: usize = 10_000;
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
    /// Idle time before a stream sends a heartbeat.
    pub heartbeat: Duration,
}

impl AppState {
    /// A state over `tracker`, no tokens, default heartbeat.
    pub fn new(tracker: Arc<ProgressTracker>) -> AppState {
        AppState {
            hub: hub::Hub::new(Arc::clone(&tracker)),
            tracker,
            auth: Arc::new(Auth::open()),
            heartbeat: HEARTBEAT,
        }
    }

    /// With tokens.
    pub fn with_auth(mut self, auth: Auth) -> AppState {
        self.auth = Arc::new(auth);
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
    use progress_api as p;
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
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
        .route("/api/v1/ws", get(stream::all_ws))
        .route("/api/v1/events/stream", get(stream::all_sse))
        .route("/api/v1/upgrades/{upgrade}/tasks", post(p::add_tasks))
        .route("/api/v1/upgrades/{upgrade}/tasks/{task}", get(p::show_task))
        .route(
            "/api/v1/upgrades/{upgrade}/tasks/{task}/{op}",
            post(p::task_op),
        )
        .route("/api/v1/upgrades/{upgrade}/{op}", post(p::upgrade_op))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
