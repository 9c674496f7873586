//! The PostgreSQL outbox's claims, across two stores on one database (as two replicas).

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;

use super::progress::{PostgresOptions, PostgresStore};
use crate::model::{JsonMap, TaskType};
use crate::progress::ProgressTracker;
use crate::store::domain::command::NewTask;
use crate::store::{DeliveryOutcome, Outbox};
use crate::test_support::PgCluster;

/// Two replicas claiming one sink's deliveries never get the same entry; per-upgrade order
/// holds (an upgrade whose earlier entry the other holds is skipped whole); a settled entry
/// is never claimed again; an expired lease (its replica died) is claimed by the other.
#[test]
fn replicas_claim_disjoint_deliveries_and_take_over_expired_leases() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let t = ProgressTracker::new(a.clone());
    for u in ["u1", "u2", "u3"] {
        t.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
        t.start_upgrade(u, None).unwrap();
        t.add_task(u, NewTask::new("x", "X", TaskType::UpgradeStep))
            .unwrap();
        t.start_task(u, "x", None).unwrap();
        t.complete_task(u, "x", None).unwrap();
    }
    assert!(a.ingest("hook", crate::notify::Kinds::Events).unwrap() >= 6);
    assert_eq!(
        b.ingest("hook", crate::notify::Kinds::Events).unwrap(),
        0,
        "ingest is idempotent"
    );
    let now = Utc::now();
    // A takes one entry: u1's first. B must skip all of u1 (order) and take u2, u3.
    let first = a.due("hook", now, 1).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0.upgrade_id, "u1");
    let second = b.due("hook", now, 100).unwrap();
    assert!(!second.is_empty());
    assert!(
        second.iter().all(|(n, _)| n.upgrade_id != "u1"),
        "B took an entry of u1 while A holds an earlier one: {second:?}"
    );
    let nids_a: HashSet<u64> = first.iter().map(|(n, _)| n.nid).collect();
    let nids_b: HashSet<u64> = second.iter().map(|(n, _)| n.nid).collect();
    assert!(nids_a.is_disjoint(&nids_b));
    // Nothing left for A but its own claim (u1's later entries are behind it).
    let again = a.due("hook", now, 100).unwrap();
    assert!(
        again.iter().all(|(n, _)| !nids_b.contains(&n.nid)),
        "{again:?}"
    );
    // B settles its entries: they are never handed out again.
    let outcomes: Vec<_> = second
        .iter()
        .map(|(n, _)| (n.nid, DeliveryOutcome::Delivered))
        .collect();
    b.record("hook", &outcomes).unwrap();
    // A dies holding u1's entry: once its lease expires, B takes u1 over.
    assert!(b.due("hook", now, 100).unwrap().is_empty());
    a.write(|tx| {
        tx.exec(
            "UPDATE deliveries SET lease_until = 1 WHERE lease_until > 0",
            &[],
        )?;
        Ok(())
    })
    .unwrap();
    let taken = b.due("hook", now, 100).unwrap();
    assert!(!taken.is_empty());
    assert!(taken.iter().all(|(n, _)| n.upgrade_id == "u1"), "{taken:?}");
    assert!(taken.iter().any(|(n, _)| nids_a.contains(&n.nid)));
    let status = a.sink_status("hook", crate::notify::Kinds::Events).unwrap();
    assert_eq!(status.delivered as usize, second.len());
    // B delivers what it took over; A, waking up late, reports a retry for its old claim:
    // the entry stays delivered (a late outcome of a lost lease is ignored), and nothing is
    // handed out again.
    let outcomes: Vec<_> = taken
        .iter()
        .map(|(n, _)| (n.nid, DeliveryOutcome::Delivered))
        .collect();
    b.record("hook", &outcomes).unwrap();
    let late: Vec<_> = first
        .iter()
        .map(|(n, _)| {
            (
                n.nid,
                DeliveryOutcome::Retry {
                    next_at: Utc::now(),
                    error: "timed out".into(),
                },
            )
        })
        .collect();
    a.record("hook", &late).unwrap();
    let status = a.sink_status("hook", crate::notify::Kinds::Events).unwrap();
    assert_eq!(
        status.delivered as usize,
        second.len() + taken.len(),
        "{status:?}"
    );
    assert_eq!(status.pending, 0, "{status:?}");
    assert!(a.due("hook", Utc::now(), 100).unwrap().is_empty());
    assert!(b.due("hook", Utc::now(), 100).unwrap().is_empty());
}

/// An outcome is taken only from the entry's current claimer: a stalled replica's late
/// `Dead`, after another took the entry over and scheduled a retry (which leaves it
/// unclaimed), changes nothing.
#[test]
fn a_late_outcome_of_a_lost_lease_does_not_overwrite_the_takeovers_retry() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let t = ProgressTracker::new(a.clone());
    t.create_upgrade("u1", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u1", None).unwrap();
    assert!(a.ingest("hook", crate::notify::Kinds::Events).unwrap() >= 1);
    let first = a.due("hook", Utc::now(), 1).unwrap();
    assert_eq!(first.len(), 1);
    let nid = first[0].0.nid;
    // A stalls: its lease runs out and B takes the entry over, then schedules a retry.
    a.write(|tx| {
        tx.exec(
            "UPDATE deliveries SET lease_until = 1 WHERE lease_until > 0",
            &[],
        )?;
        Ok(())
    })
    .unwrap();
    let taken = b.due("hook", Utc::now(), 1).unwrap();
    assert_eq!(taken[0].0.nid, nid);
    let retry_at = Utc::now() + chrono::Duration::hours(1);
    b.record(
        "hook",
        &[(
            nid,
            DeliveryOutcome::Retry {
                next_at: retry_at,
                error: "503".into(),
            },
        )],
    )
    .unwrap();
    a.record(
        "hook",
        &[(
            nid,
            DeliveryOutcome::Dead {
                error: "gave up".into(),
            },
        )],
    )
    .unwrap();
    let status = a.sink_status("hook", crate::notify::Kinds::Events).unwrap();
    assert_eq!(
        status.dead, 0,
        "the stalled replica's late outcome was taken: {status:?}"
    );
    assert_eq!(status.last_error.as_deref(), Some("503"), "{status:?}");
}

/// A pass longer than the lease renews its claims: another replica asking meanwhile gets none
/// of them, so nothing is sent twice; the pass's outcomes still count.
#[test]
fn a_long_pass_renews_its_leases_so_no_other_replica_sends_them() {
    use crate::notify::{Dispatcher, DispatcherOptions, EntryResult, EventSink, Notification};
    use std::sync::Mutex;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Blocks in its first delivery until told to go on.
    #[derive(Debug)]
    struct Stuck {
        entered: Mutex<Option<mpsc::Sender<()>>>,
        go: Mutex<mpsc::Receiver<()>>,
        sent: Mutex<Vec<u64>>,
    }
    impl EventSink for Stuck {
        fn name(&self) -> &str {
            "hook"
        }
        fn deliver(&self, batch: &[Notification]) -> Vec<EntryResult> {
            if let Some(entered) = self.entered.lock().unwrap().take() {
                entered.send(()).unwrap();
                self.go.lock().unwrap().recv().unwrap();
            }
            self.sent
                .lock()
                .unwrap()
                .extend(batch.iter().map(|n| n.nid));
            batch.iter().map(|_| EntryResult::Delivered).collect()
        }
    }

    let lease = Duration::from_millis(1500);
    let options = PostgresOptions {
        pool_size: 4,
        lease,
        ..PostgresOptions::default()
    };
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &options).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &options).unwrap());
    let t = ProgressTracker::new(a.clone());
    for u in ["u1", "u2"] {
        t.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
        t.start_upgrade(u, None).unwrap();
    }
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let sink = Arc::new(Stuck {
        entered: Mutex::new(Some(entered_tx)),
        go: Mutex::new(go_rx),
        sent: Mutex::new(Vec::new()),
    });
    let d = Dispatcher::new(a.clone(), vec![sink.clone()], DispatcherOptions::default());
    let pass = std::thread::spawn(move || d.run_once().unwrap());
    entered.recv().unwrap();
    // The pass holds its claims for several leases; B keeps asking for work meanwhile.
    let began = Instant::now();
    b.ingest("hook", crate::notify::Kinds::Events).unwrap();
    while began.elapsed() < lease * 4 {
        let taken = b.due("hook", Utc::now(), 100).unwrap();
        assert!(
            taken.is_empty(),
            "B took claimed entries after {:?}: {taken:?}",
            began.elapsed()
        );
        std::thread::sleep(lease / 6);
    }
    go.send(()).unwrap();
    let report = pass.join().unwrap();
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(report.delivered as usize, sent.len());
    assert!(sent.len() >= 2, "{sent:?}");
    let unique: HashSet<u64> = sent.iter().copied().collect();
    assert_eq!(unique.len(), sent.len(), "sent twice: {sent:?}");
    assert_eq!(
        a.sink_status("hook", crate::notify::Kinds::Events)
            .unwrap()
            .delivered,
        sent.len() as u64
    );
    assert!(b.due("hook", Utc::now(), 100).unwrap().is_empty());
}

/// Guarantee G90: delivery leases are judged on the database's clock, not the replica's. A
/// replica whose clock runs an hour ahead cannot take a delivery another replica holds (by its
/// own clock that lease ran out long ago), and a replica whose clock runs an hour behind takes
/// over a lease that ran out by the database's clock (by its own it still has an hour to go).
/// The database's own clock is off the machine's too (by an hour, either way), and a lease a
/// peer wrote on it (the lease columns are on the database's clock) is honoured: a store that
/// judged leases on its machine's wall clock (as before issue #13) takes the live one and
/// leaves the ended one.
#[test]
fn delivery_leases_are_judged_on_the_database_clock() {
    use std::time::Duration;
    let pg = PgCluster::start();
    let url = pg.create_database_with_clock_offset(-3600);
    let short = PostgresOptions {
        lease: Duration::from_millis(400),
        ..PostgresOptions::default()
    };
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let ahead = PostgresStore::open(&url, &PostgresOptions::default())
        .unwrap()
        .with_clock_skew(chrono::Duration::hours(1));
    let behind = PostgresStore::open(&url, &PostgresOptions::default())
        .unwrap()
        .with_clock_skew(chrono::Duration::hours(-1));
    let dies = PostgresStore::open(&url, &short).unwrap();
    let t = ProgressTracker::new(a.clone());
    for u in ["u1", "u2"] {
        t.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
        t.start_upgrade(u, None).unwrap();
        t.add_task(u, NewTask::new("x", "X", TaskType::UpgradeStep))
            .unwrap();
        t.start_task(u, "x", None).unwrap();
        t.complete_task(u, "x", None).unwrap();
    }
    assert!(a.ingest("hook", crate::notify::Kinds::Events).unwrap() >= 4);
    // A holds u1 (a 15 s lease); the replica an hour ahead gets only u2.
    let held = a.due("hook", Utc::now(), 1).unwrap();
    assert_eq!(held[0].0.upgrade_id, "u1");
    let later = Utc::now() + chrono::Duration::hours(1);
    let got = ahead.due("hook", later, 100).unwrap();
    assert!(
        got.iter().all(|(n, _)| n.upgrade_id != "u1"),
        "a replica with its clock ahead stole a live lease: {got:?}"
    );
    let settled: Vec<_> = got
        .iter()
        .chain(&held)
        .map(|(n, _)| (n.nid, DeliveryOutcome::Delivered))
        .collect();
    ahead.record("hook", &settled).unwrap();
    a.record("hook", &settled).unwrap();
    // A replica holding 400 ms leases dies with u1's rest; after the lease (by the database's
    // clock), the replica an hour behind takes them over.
    let dead = dies.due("hook", Utc::now(), 100).unwrap();
    assert!(!dead.is_empty(), "u1 has more entries");
    drop(dies);
    std::thread::sleep(Duration::from_millis(800));
    let earlier = Utc::now() - chrono::Duration::hours(1);
    let taken = behind.due("hook", earlier, 100).unwrap();
    let taken: HashSet<u64> = taken.iter().map(|(n, _)| n.nid).collect();
    assert!(
        dead.iter().all(|(n, _)| taken.contains(&n.nid)),
        "a lease past its end by the database's clock was not taken over by a replica whose \
         clock is behind: {taken:?}"
    );
    let counts = a.lease_counts().unwrap();
    assert_eq!(counts.held as usize, taken.len(), "{counts:?}");

    // A peer's leases, written on the database's clock (an hour behind the machine's): one
    // with 10 minutes to go is honoured.
    t.create_upgrade("u3", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u3", None).unwrap();
    assert!(a.ingest("hook", crate::notify::Kinds::Events).unwrap() >= 1);
    let peer_lease = |until: &str| {
        a.write(|tx| {
            tx.exec(
                &format!(
                    "UPDATE deliveries SET lease_owner = 'peer', lease_until = {} + {until} \
                     WHERE nid IN (SELECT nid FROM notifications WHERE upgrade_id = 'u3')",
                    super::lease::DB_NOW
                ),
                &[],
            )
        })
        .unwrap()
    };
    assert!(peer_lease("600000000") >= 1);
    let got = a.due("hook", Utc::now(), 100).unwrap();
    assert!(
        got.iter().all(|(n, _)| n.upgrade_id != "u3"),
        "a live lease (by the database's clock) was taken: {got:?}"
    );
    assert_eq!(a.lease_counts().unwrap().held as usize, taken.len() + 1);
    // The database's clock an hour ahead of the machine's: a peer lease that ended a second
    // ago by it is free (by the machine's clock it has an hour to go).
    pg.set_clock_offset(&url, 3600);
    peer_lease("-1000000");
    let got = a.due("hook", Utc::now(), 100).unwrap();
    assert!(
        got.iter().any(|(n, _)| n.upgrade_id == "u3"),
        "a lease that ended by the database's clock was not taken over: {got:?}"
    );
}

/// Guarantee G90: a delivery's retry time is judged on the database's clock (whose own clock
/// is off the machine's here), whichever replica set it and whichever asks: a retry in 2 s set
/// by a replica whose clock runs an hour ahead is due for the others after 2 s (not an hour
/// late), and a retry in 10 minutes set by one whose clock runs an hour behind is not due for
/// the others at once (not 50 minutes early); `next_retry` shows it on the asker's clock. A
/// replica whose clock steps an hour (NTP) after it measured the database's offset sees the
/// step at once: its next retry time is not an hour off.
#[test]
fn delivery_retry_times_are_judged_on_the_database_clock() {
    use std::time::Duration;
    let pg = PgCluster::start();
    let url = pg.create_database_with_clock_offset(1800);
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let ahead = PostgresStore::open(&url, &PostgresOptions::default())
        .unwrap()
        .with_clock_skew(chrono::Duration::hours(1));
    let behind = PostgresStore::open(&url, &PostgresOptions::default())
        .unwrap()
        .with_clock_skew(chrono::Duration::hours(-1));
    let t = ProgressTracker::new(b.clone());
    t.create_upgrade("u1", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u1", None).unwrap();
    assert!(b.ingest("hook", crate::notify::Kinds::Events).unwrap() >= 1);
    let retry = |store: &PostgresStore, nid: u64, delay: chrono::Duration| {
        store
            .record(
                "hook",
                &[(
                    nid,
                    DeliveryOutcome::Retry {
                        next_at: store.clock() + delay,
                        error: "503".into(),
                    },
                )],
            )
            .unwrap();
    };
    // The replica an hour ahead fails the first delivery: retry in 2 s, by its clock.
    let first = ahead.due("hook", ahead.clock(), 1).unwrap();
    assert_eq!(first.len(), 1);
    let nid = first[0].0.nid;
    retry(&ahead, nid, chrono::Duration::seconds(2));
    assert!(
        b.due("hook", Utc::now(), 100).unwrap().is_empty(),
        "due before its retry time"
    );
    std::thread::sleep(Duration::from_millis(3000));
    let again = b.due("hook", Utc::now(), 100).unwrap();
    assert_eq!(
        again.first().map(|(n, _)| n.nid),
        Some(nid),
        "a retry set by a replica whose clock runs ahead came late: {again:?}"
    );
    // B fails it too (retry at once: a second ago, as B's measured offset to the database's
    // clock may be a few milliseconds off); the replica an hour behind takes it and fails it:
    // retry in 10 minutes by its clock.
    b.record(
        "hook",
        &[(
            nid,
            DeliveryOutcome::Retry {
                next_at: Utc::now() - chrono::Duration::seconds(1),
                error: "503".into(),
            },
        )],
    )
    .unwrap();
    let taken = behind.due("hook", behind.clock(), 1).unwrap();
    assert_eq!(taken.first().map(|(n, _)| n.nid), Some(nid));
    retry(&behind, nid, chrono::Duration::minutes(10));
    let early = b.due("hook", Utc::now(), 100).unwrap();
    assert!(
        early.is_empty(),
        "a retry set by a replica whose clock runs behind came early: {early:?}"
    );
    assert!(ahead.due("hook", ahead.clock(), 100).unwrap().is_empty());
    let shown = b
        .sink_status("hook", crate::notify::Kinds::Events)
        .unwrap()
        .next_retry
        .expect("a retry is pending");
    let in_10 = Utc::now() + chrono::Duration::minutes(10);
    assert!(
        (shown - in_10).num_seconds().abs() <= 5,
        "next retry {shown}, expected about {in_10}"
    );
    // B's clock steps an hour ahead; its retry in 1 s (by its new clock) is due after 1 s.
    t.create_upgrade("u2", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u2", None).unwrap();
    assert!(b.ingest("hook", crate::notify::Kinds::Events).unwrap() >= 1);
    let u2 = b.due("hook", b.clock(), 100).unwrap();
    assert_eq!(u2.len(), 1, "{u2:?}");
    b.set_clock_skew(chrono::Duration::hours(1));
    retry(&b, u2[0].0.nid, chrono::Duration::seconds(1));
    std::thread::sleep(Duration::from_millis(2000));
    let c = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
    let again = c.due("hook", Utc::now(), 100).unwrap();
    assert!(
        again.iter().any(|(n, _)| n.nid == u2[0].0.nid),
        "a retry set right after the replica's clock stepped came late: {again:?}"
    );
}
