//! `eks-upgrade-agent serve`: the HTTP API, streams and dashboard over the data dir, with the
//! notification dispatcher running meanwhile.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use eks_upgrade_agent::store::UploadQueue;
use eks_upgrade_agent::store::postgres::PostgresStore;
use eks_upgrade_agent::store::sqlite::SqliteStore;
use eks_upgrade_agent_server::{AppState, Auth, Guard};

use crate::{Ctx, notify};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on; anything but loopback needs tokens (or --insecure-no-auth)
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub(crate) listen: SocketAddr,
    /// Listen on a non-loopback address without tokens (anyone who can reach it may change
    /// progress and artifacts)
    #[arg(long)]
    pub(crate) insecure_no_auth: bool,
    /// Tokens from a file, one TOKEN:ROLE per line, `#` comments (unlike --token, not shown in
    /// the process list)
    #[arg(long, value_name = "PATH", env = "EUA_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// The URL people and clients reach this server under (a DNS name, a proxy): its host is
    /// accepted in `Host` and its origin may make changes (repeatable; env EUA_PUBLIC_URL,
    /// comma-separated). Loopback names and the listen address are always accepted
    #[arg(
        long = "public-url",
        value_name = "URL",
        env = "EUA_PUBLIC_URL",
        value_delimiter = ','
    )]
    pub(crate) public_urls: Vec<String>,
    /// Another name this server answers to in `Host`, HOST or HOST:PORT (repeatable; env
    /// EUA_ALLOWED_HOSTS, comma-separated)
    #[arg(
        long = "allowed-host",
        value_name = "HOST[:PORT]",
        env = "EUA_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub(crate) allowed_hosts: Vec<String>,
    /// A web page origin (scheme://host[:port]) allowed to make changes and open WebSockets
    /// (repeatable; env EUA_ALLOWED_ORIGINS, comma-separated)
    #[arg(
        long = "allowed-origin",
        value_name = "ORIGIN",
        env = "EUA_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub(crate) allowed_origins: Vec<String>,
    /// Connections served at once, WebSockets included; more wait until one closes
    #[arg(
        long,
        value_name = "N",
        env = "EUA_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) max_connections: u32,
    /// Largest JUnit report one ingest takes (POST /api/v1/tests/ingest, or an artifact
    /// upload with a phase), bytes; a larger one is refused (413) and nothing is stored
    #[arg(
        long,
        value_name = "BYTES",
        env = "EUA_MAX_INGEST_BYTES",
        default_value_t = eks_upgrade_agent_server::DEFAULT_MAX_INGEST_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) max_ingest_bytes: u64,
    /// Longest wait, in milliseconds, for concurrent progress writes to share a transaction:
    /// when the last one took more than one request and fewer are queued, the server waits
    /// up to this long for as many (a lone writer never waits; 0: never wait)
    #[arg(
        long = "group-wait",
        value_name = "MS",
        env = "EUA_GROUP_WAIT_MS",
        default_value_t = eks_upgrade_agent_server::GROUP_WAIT.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(0..=1000)
    )]
    pub(crate) group_wait_ms: u64,
}

impl ServeArgs {
    /// The hosts and origins allowed beyond loopback and the listen address: flags (or their
    /// variables), else the config file's lists.
    fn guard(&self, ctx: &Ctx) -> anyhow::Result<Guard> {
        let pick = |flag: &Vec<String>, file: &Vec<String>| -> Vec<String> {
            let flag: Vec<String> = flag
                .iter()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            if flag.is_empty() { file.clone() } else { flag }
        };
        let f = &ctx.file_guard;
        Guard::from_specs(
            &pick(&self.public_urls, &f.public_urls),
            &pick(&self.allowed_hosts, &f.allowed_hosts),
            &pick(&self.allowed_origins, &f.allowed_origins),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The tokens from `--token TOKEN:ROLE` and `--token-file`, else `EUA_TOKENS`, else the
    /// config file's `tokens`.
    fn auth(&self, ctx: &Ctx) -> anyhow::Result<Auth> {
        let env: Vec<String> = std::env::var("EUA_TOKENS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        let mut given = ctx.tokens.clone();
        if let Some(path) = &self.token_file {
            given.extend(read_token_file(path)?);
        }
        let specs = if !given.is_empty() {
            &given
        } else if !env.is_empty() {
            &env
        } else {
            &ctx.file_tokens
        };
        Auth::from_specs(specs).map_err(|e| anyhow::anyhow!("invalid token: {e}"))
    }
}

/// `TOKEN:ROLE` lines of `path`; blank lines and `#` comments are skipped.
fn read_token_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let specs: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if specs.is_empty() {
        anyhow::bail!(
            "the token file {} holds no token: write one TOKEN:ROLE per line",
            path.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            eprintln!(
                "warning: the token file {} is readable by other users (chmod 600 it)",
                path.display()
            );
        }
    }
    Ok(specs)
}

/// Checks the listen address against the auth settings.
fn check_exposure(listen: SocketAddr, auth: &Auth, insecure: bool) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() && !auth.enabled() && !insecure {
        anyhow::bail!(
            "refusing to listen on {listen} without authentication: give tokens with --token TOKEN:ROLE (or EUA_TOKENS), listen on loopback (e.g. 127.0.0.1:8080), or pass --insecure-no-auth"
        );
    }
    Ok(())
}

/// The server's state over `store`.
pub(crate) fn state(ctx: &Ctx, store: Arc<SqliteStore>, auth: Auth) -> anyhow::Result<AppState> {
    let artifacts = Arc::new(ctx.artifacts_on(Arc::clone(&store))?);
    let dispatcher = notify::dispatcher_or_warn(ctx, &store);
    let tracker = Arc::new(eks_upgrade_agent::ProgressTracker::new(store.clone()));
    let tests = Arc::new(eks_upgrade_agent::TestResults::new(store.clone()));
    let mut state = AppState::new(tracker)
        .with_artifacts(artifacts, Some(store))
        .with_test_results(tests)
        .with_auth(auth);
    if let Some(d) = dispatcher {
        state = state.with_dispatcher(d);
    }
    if let Some(spans) = request_spans(ctx) {
        state = state.with_request_spans(spans);
    }
    #[cfg(feature = "aws")]
    if let Some(s3) = ctx.config.s3_store()? {
        state = state.with_s3(Arc::new(s3));
    }
    Ok(state)
}

pub(crate) fn run(ctx: &Ctx, args: ServeArgs) -> anyhow::Result<ExitCode> {
    if ctx.server.is_some() {
        anyhow::bail!(
            "serve runs on a data dir or a database; --server (EUA_SERVER) is for the client commands"
        );
    }
    let auth = args.auth(ctx)?;
    let guard = args.guard(ctx)?;
    check_exposure(args.listen, &auth, args.insecure_no_auth)?;
    if let Some(db) = ctx.database(DATABASE_POOL)? {
        return run_on_database(ctx, args, db, auth, guard);
    }
    let store = ctx.store()?;
    let options = eks_upgrade_agent_server::ServeOptions {
        max_connections: args.max_connections as usize,
        max_ingest_bytes: args.max_ingest_bytes,
        ..Default::default()
    };
    let state = state(ctx, store.clone(), auth)?
        .with_guard(guard)
        .with_serve_options(options)
        .with_group_wait(std::time::Duration::from_millis(args.group_wait_ms));
    let notifier = state.dispatcher.clone().map(|d| d.spawn());
    let spans = state.request_spans.clone();
    let _uploader = spawn_uploader(ctx, store.clone(), &state)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the server runtime")?;
    let served = runtime.block_on(async {
        let listener = bind(args.listen).await?;
        eprintln!(
            "serving http://{}/ (API under /api/v1; Ctrl-C to stop)",
            listener.local_addr()?
        );
        eks_upgrade_agent_server::serve(listener, state, stop_signal())
            .await
            .context("server failed")
    });
    // Also when the server failed (a port in use): the exporters end bounded, not at drop.
    finish_exports(notifier, spans);
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Connections each `serve` replica keeps to the database at most.
const DATABASE_POOL: u32 = 32;

/// `serve` on PostgreSQL (team mode): progress, streams, notifications and artifacts from the
/// shared database, so any number of replicas serve the same upgrades. Streams wake for other
/// replicas' events on a `LISTEN` connection (polling every `hub::POLL` while it is down).
/// Artifact bytes are in S3 (required) before their rows commit, so any replica serves any
/// artifact; each replica's data dir keeps a capped cache of them. Every replica runs the
/// uploader: the queue's leases share the work.
fn run_on_database(
    ctx: &Ctx,
    args: ServeArgs,
    db: Arc<PostgresStore>,
    auth: Auth,
    guard: Guard,
) -> anyhow::Result<ExitCode> {
    let tracker = Arc::new(eks_upgrade_agent::ProgressTracker::new(db.clone()));
    let options = eks_upgrade_agent_server::ServeOptions {
        max_connections: args.max_connections as usize,
        max_ingest_bytes: args.max_ingest_bytes,
        ..Default::default()
    };
    let mut state = AppState::new(tracker)
        .with_auth(auth)
        .with_guard(guard)
        .with_serve_options(options)
        .with_group_wait(std::time::Duration::from_millis(args.group_wait_ms))
        .with_test_results(Arc::new(eks_upgrade_agent::TestResults::new(db.clone())))
        .with_database(
            db.clone(),
            eks_upgrade_agent::store::postgres::ListenOptions::default(),
            eks_upgrade_agent_server::DATABASE_QUIET_POLL,
        )
        .context("cannot start listening for other replicas' events")?;
    if !ctx.config.notify.is_empty() {
        let sinks = ctx
            .config
            .notify
            .sinks(db.clone())
            .context("cannot set up notification sinks")?;
        let outbox: Arc<dyn eks_upgrade_agent::store::Outbox> = db.clone();
        state = state.with_dispatcher(Arc::new(eks_upgrade_agent::notify::Dispatcher::new(
            outbox,
            sinks,
            eks_upgrade_agent::notify::DispatcherOptions::default(),
        )));
    }
    if let Some(spans) = request_spans(ctx) {
        state = state.with_request_spans(spans);
    }
    if ctx.config.s3.s3_bucket.is_some() {
        let artifacts = Arc::new(ctx.team_artifacts(db.clone())?);
        state = state.with_artifacts(artifacts, Some(db.clone()));
    } else {
        eprintln!(
            "warning: artifacts are off: with --database-url they are kept in S3; set --s3-bucket \
             (or EUA_S3_BUCKET, or s3_bucket in the config file) to serve them"
        );
    }
    #[cfg(feature = "aws")]
    if let Some(s3) = ctx.config.s3_store()? {
        state = state.with_s3(Arc::new(s3));
    }
    let notifier = state.dispatcher.clone().map(|d| d.spawn());
    let spans = state.request_spans.clone();
    let _uploader = spawn_uploader(ctx, db.clone(), &state)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the server runtime")?;
    let served = runtime.block_on(async {
        let listener = bind(args.listen).await?;
        eprintln!(
            "serving http://{}/ on the database {} (API under /api/v1; Ctrl-C to stop)",
            listener.local_addr()?,
            db.url()
        );
        eks_upgrade_agent_server::serve(listener, state, stop_signal())
            .await
            .context("server failed")
    });
    // Also when the server failed (a port in use): the exporters end bounded, not at drop.
    finish_exports(notifier, spans);
    served?;
    Ok(ExitCode::SUCCESS)
}

/// How long a graceful stop waits for each exporter (the notification thread's last pass, the
/// request spans still queued).
const EXPORT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// After the server stopped gracefully (no request runs any more): the notification thread
/// makes a last pass and the request span exporter sends what is queued, each waited for at
/// most [`EXPORT_GRACE`]; what a sink did not take stays in the outbox.
pub(crate) fn finish_exports(
    notifier: Option<eks_upgrade_agent::notify::dispatcher::DispatcherHandle>,
    spans: Option<Arc<eks_upgrade_agent_server::request_spans::RequestSpans>>,
) {
    if let Some(s) = spans
        && !s.shutdown(EXPORT_GRACE)
    {
        eprintln!(
            "warning: request spans still queued were not exported (the collector did not answer in time)"
        );
    }
    if let Some(n) = notifier
        && !n.finish(EXPORT_GRACE)
    {
        eprintln!("warning: notifications still pending stay in the outbox for the next start");
    }
}

/// With an OTLP endpoint (the sink's settings): the server's own request spans. Settings the
/// sink refused were already reported by its setup (`dispatcher_or_warn`): none then.
fn request_spans(ctx: &Ctx) -> Option<eks_upgrade_agent_server::request_spans::RequestSpans> {
    let settings = &ctx.config.notify.otlp;
    settings.endpoint.as_ref()?;
    let timeout = ctx
        .config
        .notify
        .timeout
        .unwrap_or(std::time::Duration::from_secs(10));
    let exporter = eks_upgrade_agent::notify::otlp::OtlpExporter::new(settings, timeout).ok()?;
    match eks_upgrade_agent_server::request_spans::RequestSpans::start(exporter) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: request spans are off: cannot start their exporter: {e}");
            None
        }
    }
}

/// With a bucket configured: a thread that uploads queued artifacts (those added with
/// `auto_upload`, through the API or by anyone on the data dir) every few seconds, retrying
/// failures with the queue's backoff. Ends with the process.
#[cfg(feature = "aws")]
fn spawn_uploader(
    ctx: &Ctx,
    store: Arc<dyn UploadQueue>,
    state: &AppState,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    let Some(s3) = ctx.config.s3_store()? else {
        return Ok(None);
    };
    let Some(artifacts) = state.artifacts.clone() else {
        return Ok(None);
    };
    let options = eks_upgrade_agent::artifacts::upload::UploadOptions::default();
    let handle = std::thread::Builder::new()
        .name("eua-uploader".into())
        .spawn(move || {
            // A normal run (not `--retry-failed`): failed uploads wait for the queue's backoff.
            let pass = || match artifacts.upload(store.as_ref(), &s3, &options, None, false, &mut |_| {}) {
                Ok(r) => {
                    for (id, e) in &r.failed {
                        tracing::warn!(artifact = %id, error = %e, "upload failed; it stays queued");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "upload run failed"),
            };
            every(UPLOAD_EVERY, pass, |d| {
                std::thread::sleep(d);
                std::ops::ControlFlow::Continue(())
            });
        })
        .context("cannot start the upload thread")?;
    eprintln!(
        "uploading queued artifacts to s3://{}",
        ctx.config.s3.s3_bucket.as_deref().unwrap_or_default()
    );
    Ok(Some(handle))
}

#[cfg(not(feature = "aws"))]
fn spawn_uploader(
    _: &Ctx,
    _: Arc<dyn UploadQueue>,
    _: &AppState,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    Ok(None)
}

/// How often `serve` looks for queued uploads.
const UPLOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The uploader's schedule: `pass`, then `sleep(period)`, again and again until `sleep` says
/// stop (the uploader's never does). The clock is `sleep`'s, so a test counts passes without
/// waiting.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
fn every(
    period: std::time::Duration,
    mut pass: impl FnMut(),
    mut sleep: impl FnMut(std::time::Duration) -> std::ops::ControlFlow<()>,
) {
    loop {
        pass();
        if sleep(period).is_break() {
            return;
        }
    }
}

/// Ctrl-C, or SIGTERM (what a container runtime sends to stop the server).
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("stopping: finishing requests in flight");
}

pub(crate) async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_needs_tokens_or_an_explicit_opt_out() {
        let open = Auth::open();
        let tokens = Auth::from_specs(&["0123456789abcdef:read"]).unwrap();
        let lan: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let lo6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert!(check_exposure(lo, &open, false).is_ok());
        assert!(check_exposure(lo6, &open, false).is_ok());
        let e = check_exposure(lan, &open, false).unwrap_err().to_string();
        assert!(
            e.contains("--token") && e.contains("--insecure-no-auth"),
            "{e}"
        );
        assert!(check_exposure(lan, &tokens, false).is_ok());
        assert!(check_exposure(lan, &open, true).is_ok());
    }

    /// Row H23: the uploader runs a pass every 2 s: over 60 s of a mocked clock, 30 passes,
    /// each followed by a 2 s sleep, the first pass at once.
    #[test]
    fn the_uploader_runs_a_pass_every_two_seconds() {
        use std::cell::RefCell;
        use std::ops::ControlFlow;
        use std::time::Duration;
        assert_eq!(UPLOAD_EVERY, Duration::from_secs(2));
        let clock = RefCell::new(Duration::ZERO);
        let passes = RefCell::new(Vec::new());
        every(
            UPLOAD_EVERY,
            || passes.borrow_mut().push(*clock.borrow()),
            |d| {
                *clock.borrow_mut() += d;
                if *clock.borrow() >= Duration::from_secs(60) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        let passes = passes.into_inner();
        assert_eq!(passes.len(), 30, "{passes:?}");
        for (i, at) in passes.iter().enumerate() {
            assert_eq!(*at, Duration::from_secs(2 * i as u64), "pass {i}");
        }
    }
}
