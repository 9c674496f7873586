//! The server on PostgreSQL (team mode): streams woken by `LISTEN` for other replicas'
//! commits, polling while that connection is down; `/healthz` and `/metrics` on the database.

use std::sync::Arc;
use std::time::Duration;

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::store::postgres::listen::LISTEN_APPLICATION;
use eks_upgrade_agent::store::postgres::{ListenOptions, PostgresOptions, PostgresStore};
use eks_upgrade_agent::test_support::PgCluster;
use eks_upgrade_agent_server::AppState;
use eks_upgrade_agent_server::hub::{HubEvent, Item, Subscription};

/// The tests are synchronous (the store is: opening one in the runtime would block it); the
/// hub's parts run on `rt`.
///
/// Longer than any test: a stream that gets an event did not get it from its timer.
const NEVER: Duration = Duration::from_secs(3600);

fn store(url: &str) -> Arc<PostgresStore> {
    let options = PostgresOptions {
        pool_size: 4,
        ..PostgresOptions::default()
    };
    Arc::new(PostgresStore::open(url, &options).unwrap())
}

/// A replica's state on the database at `url`, its streams polling every `quiet` while
/// `LISTEN` works.
fn replica(url: &str, listen: ListenOptions, quiet: Duration) -> AppState {
    let db = store(url);
    AppState::new(Arc::new(ProgressTracker::new(db.clone())))
        .with_database(db, listen, quiet)
        .unwrap()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within 30 s");
}

fn next_event(rt: &tokio::runtime::Runtime, sub: &mut Subscription) -> Arc<HubEvent> {
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(30), sub.next_live()).await {
            Ok(Some(Item::Event(e))) => e,
            Ok(other) => panic!("expected an event, got {other:?}"),
            Err(_) => panic!("no event within 30 s"),
        }
    })
}

/// Creates upgrade `id` through another replica's store (another pool, no tracker shared).
fn create_elsewhere(other: &Arc<PostgresStore>, id: &str) {
    ProgressTracker::new(other.clone())
        .create_upgrade(id, "plan", "prod", Default::default())
        .unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn subscribe(rt: &tokio::runtime::Runtime, state: &AppState) -> Subscription {
    rt.block_on(state.hub.subscribe(None, None)).unwrap()
}

#[test]
fn a_commit_on_another_replica_wakes_the_stream_through_listen() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let rt = runtime();
    let state = replica(&url, ListenOptions::default(), NEVER);
    let listen = Arc::clone(&state.database.as_ref().unwrap().listen);
    wait_until("listening", || listen.connected());
    let mut sub = subscribe(&rt, &state);
    let other = store(&url);
    for id in ["u1", "u2"] {
        create_elsewhere(&other, id);
        // The poller waits an hour between reads: only the notification can wake it.
        assert_eq!(next_event(&rt, &mut sub).upgrade_id, id);
    }
    assert!(listen.notifications() >= 2, "{}", listen.notifications());
    assert_eq!(listen.connects(), 1);
}

#[test]
fn streams_poll_while_the_listening_connection_is_down() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let rt = runtime();
    // Never reconnects within the test: events can only come from polling.
    let state = replica(
        &url,
        ListenOptions {
            reconnect_after: NEVER,
        },
        NEVER,
    );
    let listen = Arc::clone(&state.database.as_ref().unwrap().listen);
    wait_until("listening", || listen.connected());
    let mut sub = subscribe(&rt, &state);
    assert_eq!(pg.terminate_connections(LISTEN_APPLICATION), 1);
    wait_until("the drop noticed", || !listen.connected());
    let heard = listen.notifications();
    let other = store(&url);
    create_elsewhere(&other, "u1");
    assert_eq!(next_event(&rt, &mut sub).upgrade_id, "u1");
    assert_eq!(listen.notifications(), heard, "the listener is down");
    assert_eq!(listen.connects(), 1);
}

#[test]
fn the_listening_connection_comes_back_and_wakes_streams_again() {
    let mut pg = PgCluster::start();
    let url = pg.create_database();
    let rt = runtime();
    let state = replica(
        &url,
        ListenOptions {
            reconnect_after: Duration::from_millis(100),
        },
        NEVER,
    );
    let listen = Arc::clone(&state.database.as_ref().unwrap().listen);
    wait_until("listening", || listen.connected());
    let mut sub = subscribe(&rt, &state);
    assert_eq!(pg.terminate_connections(LISTEN_APPLICATION), 1);
    wait_until("reconnected", || {
        listen.connects() == 2 && listen.connected()
    });
    let other = store(&url);
    create_elsewhere(&other, "u1");
    let first = next_event(&rt, &mut sub);
    assert_eq!(first.upgrade_id, "u1");
    // A database restart mid-stream: the listener comes back with it, and the stream goes on
    // from where it was, without a gap.
    drop(other);
    pg.restart();
    wait_until("reconnected after a restart", || {
        listen.connects() >= 3 && listen.connected()
    });
    let before = listen.notifications();
    let other = store(&url);
    create_elsewhere(&other, "u2");
    let second = next_event(&rt, &mut sub);
    assert_eq!(second.upgrade_id, "u2");
    assert_eq!(second.seq, first.seq + 1, "a gap across the restart");
    assert!(listen.notifications() > before);
}

/// `GET path` on `state`'s router: status and body.
fn get(rt: &tokio::runtime::Runtime, state: &AppState, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let app = eks_upgrade_agent_server::router(state.clone());
    rt.block_on(async {
        let req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    })
}

#[test]
fn healthz_reports_a_session_that_holds_the_seq_counter() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let rt = runtime();
    let state = replica(&url, ListenOptions::default(), NEVER)
        .with_counter_stall(Duration::from_millis(500));
    assert_eq!(get(&rt, &state, "/healthz").0, 200);
    // A session takes the counter and sits on it (as a stuck writer would).
    let mut stuck = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    stuck
        .batch_execute("BEGIN; UPDATE seq_counter SET seq = seq")
        .unwrap();
    let pid: i32 = stuck
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut answer = (200, String::new());
    for _ in 0..600 {
        answer = get(&rt, &state, "/healthz");
        if answer.1.contains("degraded") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still ready (a 503 would take every replica out of the Service: the counter is shared),
    // but saying why writes wait.
    let (status, body) = answer;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"degraded""#), "{body}");
    assert!(
        body.contains(&format!(
            "the seq counter is held by database session {pid}"
        )),
        "{body}"
    );
    assert!(body.contains("pg_terminate_backend"), "{body}");
    // Released: healthy again.
    stuck.batch_execute("ROLLBACK").unwrap();
    let (status, body) = get(&rt, &state, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"ok""#), "{body}");
}

/// The value of the sample `name` (without labels) in an OpenMetrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_show_the_pool_the_listener_and_the_outbox_leases() {
    use eks_upgrade_agent::store::Outbox;
    let pg = PgCluster::start();
    let url = pg.create_database();
    let rt = runtime();
    let state = replica(&url, ListenOptions::default(), NEVER);
    let listen = Arc::clone(&state.database.as_ref().unwrap().listen);
    wait_until("listening", || listen.connected());
    let t = &state.tracker;
    for u in ["u1", "u2"] {
        t.create_upgrade(u, "p", "c", Default::default()).unwrap();
        t.start_upgrade(u, None).unwrap();
    }
    let (status, text) = get(&rt, &state, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "eua_db_pool_max"), 4.0);
    let open = sample(&text, "eua_db_pool_connections");
    assert!(open >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "eua_db_pool_idle") + sample(&text, "eua_db_pool_in_use"),
        open
    );
    sample(&text, "eua_db_pool_waits_total");
    sample(&text, "eua_db_pool_wait_seconds_total");
    assert_eq!(sample(&text, "eua_db_listening"), 1.0);
    assert_eq!(sample(&text, "eua_db_outbox_leases_held"), 0.0);
    assert_eq!(sample(&text, "eua_db_outbox_leases_expired"), 0.0);
    // Another replica claims deliveries: leases held; then they run out (it died).
    let other = store(&url);
    other
        .ingest("hook", eks_upgrade_agent::notify::Kinds::Events)
        .unwrap();
    let claimed = other.due("hook", chrono::Utc::now(), 100).unwrap().len();
    assert!(claimed >= 2, "{claimed}");
    let text = get(&rt, &state, "/metrics").1;
    assert_eq!(sample(&text, "eua_db_outbox_leases_held"), claimed as f64);
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute("UPDATE deliveries SET lease_until = 1 WHERE lease_owner IS NOT NULL")
        .unwrap();
    let text = get(&rt, &state, "/metrics").1;
    assert_eq!(sample(&text, "eua_db_outbox_leases_held"), 0.0);
    assert_eq!(
        sample(&text, "eua_db_outbox_leases_expired"),
        claimed as f64
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    // A replica on SQLite has none of these.
    let dir = tempfile::tempdir().unwrap();
    let text = get(&rt, &crate::util::state(dir.path()), "/metrics").1;
    assert!(!text.contains("eua_db_"), "{text}");
}
