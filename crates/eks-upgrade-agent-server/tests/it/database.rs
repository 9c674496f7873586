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
    assert_eq!(next_event(&rt, &mut sub).upgrade_id, "u1");
    // A database restart: the listener comes back with it.
    drop(other);
    pg.restart();
    wait_until("reconnected after a restart", || {
        listen.connects() >= 3 && listen.connected()
    });
    let before = listen.notifications();
    let other = store(&url);
    create_elsewhere(&other, "u2");
    assert_eq!(next_event(&rt, &mut sub).upgrade_id, "u2");
    assert!(listen.notifications() > before);
}
