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

/// A replica marks itself in `stream_followers` (so commits notify) as its streams get their
/// first client, before the client reads, and removes the mark once the last has gone.
#[test]
fn a_replica_marks_itself_while_its_streams_have_clients() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let rt = runtime();
    let state = replica(&url, ListenOptions::default(), NEVER);
    let c = std::sync::Mutex::new(postgres::Client::connect(&url, postgres::NoTls).unwrap());
    let marks = || -> i64 {
        c.lock()
            .unwrap()
            .query_one("SELECT count(*) FROM stream_followers", &[])
            .unwrap()
            .get(0)
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(marks(), 0, "no client, no mark");
    let first = subscribe(&rt, &state);
    assert_eq!(marks(), 1, "marked by the time the first client joined");
    let second = subscribe(&rt, &state);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(marks(), 1, "a client is still there");
    drop(second);
    wait_until("the mark removed", || marks() == 0);
    assert!(state.hub.idle());
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
            ..ListenOptions::default()
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
            ..ListenOptions::default()
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

/// The last holders of a store (the server's state with its hub and listener, the store
/// itself) dropped on a runtime thread: the postgres client owns a runtime of its own, which
/// may not be dropped there. Everything else runs on the blocking pool, as the server does.
async fn drop_the_last_store_in_async_code() {
    let (pg, url) = tokio::task::spawn_blocking(|| {
        let pg = PgCluster::start();
        let url = pg.create_database();
        (pg, url)
    })
    .await
    .unwrap();
    let u = url.clone();
    let (state, db) = tokio::task::spawn_blocking(move || {
        let state = replica(&u, ListenOptions::default(), NEVER);
        let db = store(&u);
        create_elsewhere(&db, "u1");
        assert!(state.tracker.store().last_seq().unwrap() >= 1);
        (state, db)
    })
    .await
    .unwrap();
    // Several clones, the last one dropped here.
    let clones: Vec<_> = (0..3).map(|_| Arc::clone(&db)).collect();
    drop(db);
    drop(state);
    drop(clones);
    // The connections were closed by then: the database can be dropped at once.
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&pg.url("postgres"), postgres::NoTls).unwrap();
        let name = url.rsplit('/').next().unwrap().to_owned();
        c.batch_execute(&format!("DROP DATABASE {name}")).unwrap();
        drop(c);
        drop(pg);
    })
    .await
    .unwrap();
}

/// TR5: on a current-thread runtime (a `#[tokio::test]`, `serve`'s CLI runtime alike).
#[tokio::test(flavor = "current_thread")]
async fn the_last_store_dropped_on_a_current_thread_runtime_does_not_panic() {
    drop_the_last_store_in_async_code().await;
}

/// TR5: on a worker of a multi-thread runtime (the server's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_store_dropped_on_a_multi_thread_runtime_does_not_panic() {
    drop_the_last_store_in_async_code().await;
}

/// A TCP proxy to PostgreSQL whose listening connections (told apart by their startup
/// message's `application_name`) can die silently: their server side ends, while the client's
/// socket stays open and nothing arrives on it, as after a NAT timeout or a failover without a
/// reset; the first bytes the client sends then get its socket closed. Other connections, and
/// those made later, pass through.
struct SilentProxy {
    port: u16,
    listeners: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
}

impl SilentProxy {
    fn start(upstream: u16) -> SilentProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        let accept = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = accept.local_addr().unwrap().port();
        let listeners: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let all = Arc::clone(&listeners);
        // Ends with the test process (blocked in accept).
        std::thread::spawn(move || {
            for client in accept.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let dead = Arc::new(AtomicBool::new(false));
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (all, d) = (Arc::clone(&all), Arc::clone(&dead));
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    // The startup message comes first, or after an SSL request.
                    let mut early_reads = 3;
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if early_reads > 0 {
                            early_reads -= 1;
                            let needle = LISTEN_APPLICATION.as_bytes();
                            if buf[..n].windows(needle.len()).any(|w| w == needle) {
                                all.lock().unwrap().push(Arc::clone(&d));
                                early_reads = 0;
                            }
                        }
                        if d.load(Ordering::Acquire) {
                            // The peer is gone: whatever is sent now meets a closed socket.
                            let _ = c_in.shutdown(Shutdown::Both);
                            break;
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Both);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if dead.load(Ordering::Acquire) {
                            continue; // lost on the way
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    if !dead.load(Ordering::Acquire) {
                        let _ = c_out.shutdown(Shutdown::Both);
                    }
                    // A dead connection's client socket stays open: silence, no end.
                    drop(c_out);
                });
            }
        });
        SilentProxy { port, listeners }
    }

    /// From now on, the listening connections open so far hear nothing more.
    fn silence_listeners(&self) -> usize {
        let all = self.listeners.lock().unwrap();
        for d in all.iter() {
            d.store(true, std::sync::atomic::Ordering::Release);
        }
        all.len()
    }
}

fn next_event_within(
    rt: &tokio::runtime::Runtime,
    sub: &mut Subscription,
    within: Duration,
) -> Arc<HubEvent> {
    rt.block_on(async {
        match tokio::time::timeout(within, sub.next_live()).await {
            Ok(Some(Item::Event(e))) => e,
            Ok(other) => panic!("expected an event, got {other:?}"),
            Err(_) => panic!("no event within {within:?}"),
        }
    })
}

/// TR6: a listening connection that dies silently (its backend terminated, nothing reaching
/// the client: no error, no end of stream) is found by the probe (set to 300 ms here; 30 s
/// by default): the stream, which polls hourly while `LISTEN` looks up, gets the next event
/// within seconds by polling, and the listener connects again and wakes it by notification.
#[test]
fn a_listening_connection_that_died_silently_is_found_by_the_probe() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .unwrap();
    let proxy = SilentProxy::start(port);
    let proxied = url.replacen(&format!(":{port}/"), &format!(":{}/", proxy.port), 1);
    let rt = runtime();
    let state = replica(
        &proxied,
        ListenOptions {
            reconnect_after: Duration::from_secs(2),
            probe: Duration::from_millis(300),
        },
        NEVER,
    );
    let listen = Arc::clone(&state.database.as_ref().unwrap().listen);
    wait_until("listening", || listen.connected());
    let mut sub = subscribe(&rt, &state);
    let other = store(&url);
    create_elsewhere(&other, "u1");
    assert_eq!(next_event(&rt, &mut sub).upgrade_id, "u1");
    assert_eq!(proxy.silence_listeners(), 1);
    assert_eq!(pg.terminate_connections(LISTEN_APPLICATION), 1);
    let heard = listen.notifications();
    create_elsewhere(&other, "u2");
    // No notification comes and the connection looks alive: only the probe can tell.
    let e = next_event_within(&rt, &mut sub, Duration::from_secs(5));
    assert_eq!(e.upgrade_id, "u2");
    assert_eq!(
        listen.notifications(),
        heard,
        "nothing was heard on the dead connection"
    );
    wait_until("listening again", || {
        listen.connects() == 2 && listen.connected()
    });
    create_elsewhere(&other, "u3");
    assert_eq!(next_event(&rt, &mut sub).upgrade_id, "u3");
    assert!(
        listen.notifications() > heard,
        "woken by notification again"
    );
}
