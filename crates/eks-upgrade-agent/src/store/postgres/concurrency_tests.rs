//! Ordering across replicas, proven on a real PostgreSQL: many writers on several pools (as
//! several server replicas would be) while a reader follows `seq`; the reader never skips an
//! event, and what it saw is exactly the final event log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::progress::{PostgresOptions, PostgresStore};
use crate::model::{JsonMap, TaskType};
use crate::progress::ProgressTracker;
use crate::store::domain::command::NewTask;
use crate::store::{EventQuery, ProgressStore};
use crate::test_support::PgCluster;

const REPLICAS: usize = 3;
const WRITERS: usize = 12;
const UPDATES: usize = 150;

#[test]
fn a_reader_following_seq_never_skips_an_event_that_commits_later() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let options = PostgresOptions {
        pool_size: 6,
        ..PostgresOptions::default()
    };
    let stores: Vec<Arc<PostgresStore>> = (0..REPLICAS)
        .map(|_| Arc::new(PostgresStore::open(&url, &options).unwrap()))
        .collect();
    let setup = ProgressTracker::new(stores[0].clone());
    // Half the writers share one upgrade (row locks), the others have their own (parallel).
    setup
        .create_upgrade("shared", "p", "c", JsonMap::new())
        .unwrap();
    for w in 0..WRITERS {
        let u = format!("u{w}");
        setup.create_upgrade(&u, "p", "c", JsonMap::new()).unwrap();
        let (upgrade, task) = if w % 2 == 0 {
            ("shared".to_owned(), format!("t{w}"))
        } else {
            (u, "t".to_owned())
        };
        setup
            .add_task(&upgrade, NewTask::new(&task, "T", TaskType::UpgradeStep))
            .unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = stores[REPLICAS - 1].clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen: Vec<u64> = Vec::new();
            let mut last = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store
                    .events(&EventQuery {
                        upgrade_id: None,
                        since: last,
                        limit: 500,
                    })
                    .unwrap();
                for e in &page {
                    assert_eq!(
                        e.seq,
                        last + 1,
                        "the reader skipped from seq {last} to {}: an event committed after a later one",
                        e.seq
                    );
                    last = e.seq;
                    seen.push(e.seq);
                }
                if finished && page.is_empty() {
                    return seen;
                }
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let tracker = ProgressTracker::new(stores[w % REPLICAS].clone());
            std::thread::spawn(move || {
                let (upgrade, task) = if w % 2 == 0 {
                    ("shared".to_owned(), format!("t{w}"))
                } else {
                    (format!("u{w}"), "t".to_owned())
                };
                for i in 0..UPDATES {
                    let pct = (i as f64 * 100.0 / UPDATES as f64).min(99.0);
                    tracker
                        .update_task(&upgrade, &task, pct, None, JsonMap::new())
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.join().unwrap();
    let all: Vec<u64> = stores[0]
        .events(&EventQuery {
            upgrade_id: None,
            since: 0,
            limit: usize::MAX >> 1,
        })
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    let expected = 1 + WRITERS * 2 + WRITERS * UPDATES;
    assert_eq!(all.len(), expected);
    assert_eq!(
        all,
        (1..=expected as u64).collect::<Vec<_>>(),
        "seq has gaps"
    );
    assert_eq!(
        seen, all,
        "the reader's sequence differs from the final log"
    );
    // Every upgrade's rollup saw every update (nothing lost under the row locks).
    let shared = stores[1].tasks("shared").unwrap();
    assert_eq!(shared.len(), WRITERS / 2);
    assert!(shared.iter().all(|t| t.percentage == 99.0), "{shared:?}");
}

/// A post run failing the gate puts `upgrade.validation_failed` in the outbox in its own
/// transaction. Held open between that insert and its commit (a deferred trigger waits on an
/// advisory lock the test holds), a progress write that notifies meanwhile must not commit a
/// later `nid` first: the outbox's cursor (`nid > upto`) would pass the run's and never deliver
/// it. The run's transaction holds the counter row, so the progress write waits for it.
#[test]
fn a_gate_notification_committing_late_is_still_delivered() {
    use crate::model::{RunPhase, TestStatus};
    run_committing_late_is_still_delivered(
        RunPhase::Post,
        TestStatus::Failed,
        "upgrade.validation_failed",
        crate::notify::Kinds::Events,
    );
}

/// The same for a run's trace-only entry (`trace.test_run`, written by every run, here a
/// passing pre run): its transaction takes the counter row too.
#[test]
fn a_run_trace_entry_committing_late_is_still_delivered() {
    use crate::model::{RunPhase, TestStatus};
    run_committing_late_is_still_delivered(
        RunPhase::Pre,
        TestStatus::Passed,
        crate::notify::TEST_RUN_TRACE,
        crate::notify::Kinds::All,
    );
}

fn run_committing_late_is_still_delivered(
    late_phase: crate::model::RunPhase,
    late_status: crate::model::TestStatus,
    held: &str,
    kinds: crate::notify::Kinds,
) {
    use crate::model::{CaseAttempt, NewRun, RunPhase, TestStatus};
    use crate::store::{Outbox, TestResultStore};
    use chrono::Utc;

    let pg = PgCluster::start();
    let url = pg.create_database();
    let store = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let tracker = ProgressTracker::new(store.clone());
    for u in ["u1", "u2"] {
        tracker.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
    }
    let attempt = |status| CaseAttempt {
        framework: "pytest".into(),
        suite: "s".into(),
        classname: "k".into(),
        name: "a".into(),
        status,
        duration: 1.0,
        message: None,
        suite_window: None,
    };
    let run = |id: &str, phase| NewRun {
        run_id: id.into(),
        upgrade_id: "u1".into(),
        cluster_name: "c".into(),
        phase,
        created_at: Utc::now(),
        files: vec!["r.xml".into()],
        artifact_ids: Vec::new(),
    };
    store
        .record_run(&run("pre", RunPhase::Pre), &mut |sink| {
            sink(attempt(TestStatus::Passed))
        })
        .unwrap();
    store.ingest("sink", kinds).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER hold AFTER INSERT ON notifications \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
             WHEN (NEW.detail_type = '{held}') EXECUTE FUNCTION hold_commit();"
        ))
        .unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    holder
        .execute("SELECT pg_advisory_lock(4242)", &[])
        .unwrap();
    let waiting = |admin: &mut postgres::Client, advisory: bool| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND (wait_event = 'advisory') = $1",
                &[&advisory],
            )
            .unwrap()
            .get(0)
    };
    let post = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.record_run(&run("late", late_phase), &mut |sink| {
                sink(attempt(late_status))
            })
        })
    };
    // The run's transaction sits at its commit, its notification inserted.
    while waiting(&mut admin, true) == 0 {
        assert!(!post.is_finished(), "{:?}", post.join());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let progress = {
        let tracker = ProgressTracker::new(store.clone());
        std::thread::spawn(move || tracker.start_upgrade("u2", None).map(|_| ()))
    };
    // The progress write either committed (the bug) or waits for the counter row.
    while !progress.is_finished() && waiting(&mut admin, false) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    store.ingest("sink", kinds).unwrap();
    holder
        .execute("SELECT pg_advisory_unlock(4242)", &[])
        .unwrap();
    post.join().unwrap().unwrap();
    progress.join().unwrap().unwrap();
    store.ingest("sink", kinds).unwrap();
    let due = store.due("sink", Utc::now(), 1000).unwrap();
    let kinds: Vec<&str> = due.iter().map(|(n, _)| n.detail_type.as_str()).collect();
    // Every entry of that kind (the earlier pre run's trace entry too) is due, the late one included.
    let written: i64 = admin
        .query_one(
            "SELECT count(*) FROM notifications WHERE detail_type = $1",
            &[&held],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        kinds.iter().filter(|k| **k == held).count() as i64,
        written,
        "the run's notification was skipped by the outbox: {kinds:?}"
    );
    assert!(kinds.contains(&"upgrade.started"), "{kinds:?}");
}

/// The consistency checks of an upgrade after a race: the upgrade's counters are the count of
/// its task rows by status, and a parent's percentage is the weighted mean of its children's.
fn assert_consistent(store: &Arc<PostgresStore>, upgrade_id: &str) {
    use crate::model::ProgressStatus;
    let tasks = store.tasks(upgrade_id).unwrap();
    let upgrade = ProgressTracker::new(store.clone())
        .upgrade(upgrade_id)
        .unwrap();
    let mut counts = [0u64; 6];
    for t in &tasks {
        counts[ProgressStatus::ALL
            .iter()
            .position(|s| *s == t.status)
            .unwrap()] += 1;
    }
    assert_eq!(
        upgrade.task_counts, counts,
        "the upgrade's counters disagree with its task rows: {tasks:#?}"
    );
    for parent in tasks.iter().filter(|t| t.children > 0) {
        let children: Vec<_> = tasks
            .iter()
            .filter(|t| t.parent_task_id.as_deref() == Some(&parent.task_id))
            .collect();
        let weight: f64 = children.iter().map(|c| c.weight).sum();
        let mean = children
            .iter()
            .map(|c| c.weight * c.percentage)
            .sum::<f64>()
            / weight;
        assert!(
            (parent.percentage - mean).abs() < 1e-6,
            "parent {} at {} but its children's mean is {mean}: {children:#?}",
            parent.task_id,
            parent.percentage
        );
    }
}

/// Replica A completes a task while replica B's update of it waits for the upgrade's row
/// lock (held here by a third connection, so the order is sure: A queued first). B must read
/// the task as A left it (completed, which is final: its update is refused), not as it was
/// when B's statement started: a stale read would write the task back as running.
#[test]
fn a_write_waiting_for_the_upgrade_lock_reads_the_tasks_as_the_holder_left_them() {
    use crate::model::ProgressStatus;
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let setup = ProgressTracker::new(a.clone());
    setup.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    setup
        .add_task("u", NewTask::new("p", "P", TaskType::UpgradeStep))
        .unwrap();
    for c in ["c1", "c2"] {
        setup
            .add_task("u", NewTask::new(c, "C", TaskType::UpgradeStep).parent("p"))
            .unwrap();
    }
    setup.start_task("u", "c1", None).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = holder.transaction().unwrap();
    hold.execute(
        "SELECT 1 FROM upgrades WHERE upgrade_id = 'u' FOR UPDATE",
        &[],
    )
    .unwrap();
    let waiting = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let complete = {
        let t = ProgressTracker::new(a.clone());
        std::thread::spawn(move || t.complete_task("u", "c1", None).map(|_| ()))
    };
    while waiting(&mut admin) < 1 {
        assert!(!complete.is_finished(), "{:?}", complete.join());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let update = {
        let t = ProgressTracker::new(b.clone());
        std::thread::spawn(move || {
            t.update_task("u", "c1", 50.0, None, JsonMap::new())
                .map(|_| ())
        })
    };
    while waiting(&mut admin) < 2 {
        assert!(!update.is_finished(), "{:?}", update.join());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    hold.commit().unwrap();
    complete.join().unwrap().unwrap();
    let updated = update.join().unwrap();
    let c1 = b
        .tasks("u")
        .unwrap()
        .into_iter()
        .find(|t| t.task_id == "c1")
        .unwrap();
    assert_eq!(
        c1.status,
        ProgressStatus::Completed,
        "replica B wrote back the task it read before A's commit: {c1:?}"
    );
    assert!(
        updated.is_err(),
        "the update of a completed task was accepted"
    );
    assert_consistent(&b, "u");
}

/// Replica B's batch names upgrades x and u; u does not exist yet when B's lock statement
/// starts (it waits for x's lock, held here). Meanwhile u is created with a task, and a third
/// connection locks u and changes the task. B must read u's task only once u's lock is its
/// own: read with x's lock (the snapshot after the wait sees u), it would write the task back
/// over the third connection's change (review finding on schema 11).
#[test]
fn a_batch_does_not_read_the_tasks_of_an_upgrade_it_has_not_locked() {
    use crate::store::domain::command::Command;
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let setup = ProgressTracker::new(a.clone());
    setup.create_upgrade("x", "p", "c", JsonMap::new()).unwrap();
    setup
        .add_task("x", NewTask::new("t", "T", TaskType::UpgradeStep))
        .unwrap();
    setup.start_task("x", "t", None).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let waiting_on = |admin: &mut postgres::Client, like: &str| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE $1",
                &[&like],
            )
            .unwrap()
            .get(0)
    };
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = holder.transaction().unwrap();
    hold.execute(
        "SELECT 1 FROM upgrades WHERE upgrade_id = 'x' FOR UPDATE",
        &[],
    )
    .unwrap();
    let update = |u: &str, pct: f64| Command::TaskUpdate {
        upgrade_id: u.into(),
        task_id: "t".into(),
        percentage: pct,
        message: Some("from B".into()),
        details: JsonMap::new(),
    };
    let batch = {
        let b = b.clone();
        let commands = vec![update("x", 10.0), update("u", 20.0)];
        std::thread::spawn(move || b.execute(&commands))
    };
    while waiting_on(&mut admin, "%eua_lock_and_read%") < 1 {
        assert!(!batch.is_finished(), "{:?}", batch.join());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    setup.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    setup
        .add_task("u", NewTask::new("t", "T", TaskType::UpgradeStep))
        .unwrap();
    setup.start_task("u", "t", None).unwrap();
    let mut third = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut change = third.transaction().unwrap();
    change
        .execute(
            "SELECT 1 FROM upgrades WHERE upgrade_id = 'u' FOR UPDATE",
            &[],
        )
        .unwrap();
    change
        .execute(
            "UPDATE tasks SET current_step = 'from the third' WHERE task_id = 't' \
             AND ukey = (SELECT ukey FROM upgrades WHERE upgrade_id = 'u')",
            &[],
        )
        .unwrap();
    hold.commit().unwrap();
    // B now holds x and waits for u's lock (taken apart, as u was not locked with x).
    while waiting_on(
        &mut admin,
        "SELECT ukey FROM upgrades WHERE upgrade_id = $1 FOR UPDATE",
    ) < 1
    {
        assert!(!batch.is_finished(), "{:?}", batch.join());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    change.commit().unwrap();
    for r in batch.join().unwrap().unwrap() {
        r.unwrap();
    }
    let t = b.task("u", "t").unwrap();
    assert_eq!(
        t.current_step.as_deref(),
        Some("from the third"),
        "replica B wrote back a task it read before holding its upgrade's lock: {t:?}"
    );
    assert_eq!(t.percentage, 20.0);
    assert_consistent(&b, "u");
}

/// Two replicas race on the same tasks: one starts and completes each, the other updates them
/// all the while. Whatever the interleaving, every task ends completed and the counters and the
/// parent's rollup agree with the task rows.
#[test]
fn two_replicas_racing_on_the_same_tasks_lose_no_update() {
    use crate::model::ProgressStatus;
    const TASKS: usize = 30;
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let setup = ProgressTracker::new(a.clone());
    setup.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    setup
        .add_task("u", NewTask::new("p", "P", TaskType::UpgradeStep))
        .unwrap();
    for i in 0..TASKS {
        setup
            .add_task(
                "u",
                NewTask::new(format!("c{i}"), "C", TaskType::UpgradeStep).parent("p"),
            )
            .unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    let updaters: Vec<_> = (0..3)
        .map(|k| {
            let t = ProgressTracker::new(b.clone());
            let done = done.clone();
            std::thread::spawn(move || {
                let mut i = k;
                while !done.load(Ordering::SeqCst) {
                    // Refused on a completed task (and it starts a pending one).
                    let _ =
                        t.update_task("u", &format!("c{}", i % TASKS), 50.0, None, JsonMap::new());
                    i += 1;
                }
            })
        })
        .collect();
    let finisher = ProgressTracker::new(a.clone());
    for i in 0..TASKS {
        let id = format!("c{i}");
        // Refused when an update started it already.
        let _ = finisher.start_task("u", &id, None);
        finisher.complete_task("u", &id, None).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for u in updaters {
        u.join().unwrap();
    }
    let tasks = b.tasks("u").unwrap();
    let stale: Vec<_> = tasks
        .iter()
        .filter(|t| t.status != ProgressStatus::Completed)
        .collect();
    assert!(
        stale.is_empty(),
        "tasks written back after completion: {stale:#?}"
    );
    assert_consistent(&b, "u");
}

/// The `seq` counter is the transaction's last lock: every replica's writes wait for it, so
/// nothing else may be waited for while it is held. A task write held up on its row (locked
/// here by another connection) must not hold the counter meanwhile.
#[test]
fn a_write_waiting_for_a_task_row_does_not_hold_the_seq_counter() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let store = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let tracker = ProgressTracker::new(store.clone());
    tracker
        .create_upgrade("u", "p", "c", JsonMap::new())
        .unwrap();
    tracker
        .add_task("u", NewTask::new("t", "T", TaskType::UpgradeStep))
        .unwrap();
    tracker.start_task("u", "t", None).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = holder.transaction().unwrap();
    hold.execute("SELECT 1 FROM tasks WHERE task_id = 't' FOR UPDATE", &[])
        .unwrap();
    let update = std::thread::spawn(move || {
        tracker
            .update_task("u", "t", 40.0, None, JsonMap::new())
            .map(|_| ())
    });
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(!update.is_finished(), "{:?}", update.join());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut probe = admin.transaction().unwrap();
    let counter = probe.query("SELECT seq FROM seq_counter FOR UPDATE NOWAIT", &[]);
    probe.rollback().unwrap();
    hold.commit().unwrap();
    update.join().unwrap().unwrap();
    assert!(
        counter.is_ok(),
        "the seq counter was held while the write waited for a task row: {counter:?}"
    );
}

/// A command of a batch runs under a savepoint; rolled back to it, PostgreSQL releases the row
/// locks taken since. An upgrade first locked inside a failed command (it did not exist when
/// the batch locked its upgrades) must be locked again by the next command on it: without, that
/// command writes u's tasks and counters without u's lock (another replica may change them
/// meanwhile, and u's row is written after the `seq` counter is taken). Batch B waits for x's
/// lock while u is created; its failed `task.add` on u locks u, its `task.update` on u follows.
/// Held at its commit (the `seq` counter locked here), B must still hold u (issue #13).
#[test]
fn a_failed_command_of_a_batch_does_not_leave_its_upgrade_unlocked_for_the_next() {
    use crate::store::domain::command::Command;
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let setup = ProgressTracker::new(a.clone());
    setup.create_upgrade("x", "p", "c", JsonMap::new()).unwrap();
    setup
        .add_task("x", NewTask::new("t", "T", TaskType::UpgradeStep))
        .unwrap();
    setup.start_task("x", "t", None).unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = holder.transaction().unwrap();
    hold.execute(
        "SELECT 1 FROM upgrades WHERE upgrade_id = 'x' FOR UPDATE",
        &[],
    )
    .unwrap();
    let update = |u: &str, pct: f64| Command::TaskUpdate {
        upgrade_id: u.into(),
        task_id: "t".into(),
        percentage: pct,
        message: None,
        details: JsonMap::new(),
    };
    let add_again = Command::TaskAdd {
        upgrade_id: "u".into(),
        task_id: "t".into(),
        name: "T".into(),
        task_type: TaskType::UpgradeStep,
        parent_task_id: None,
        total_steps: None,
        weight: None,
        metadata: JsonMap::new(),
    };
    let batch = {
        let b = b.clone();
        let commands = vec![update("x", 10.0), add_again, update("u", 20.0)];
        std::thread::spawn(move || b.execute(&commands))
    };
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%eua_lock_and_read%'",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(!batch.is_finished(), "{:?}", batch.join());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    setup.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    setup
        .add_task("u", NewTask::new("t", "T", TaskType::UpgradeStep))
        .unwrap();
    setup.start_task("u", "t", None).unwrap();
    // The gate holds the `seq` counter: B stops at its last statement.
    let mut gater = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut gate = gater.transaction().unwrap();
    let gate_pid: i32 = gate
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    gate.execute("SELECT seq FROM seq_counter FOR UPDATE", &[])
        .unwrap();
    hold.commit().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&gate_pid],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(!batch.is_finished(), "{:?}", batch.join());
        assert!(
            std::time::Instant::now() < deadline,
            "batch B never reached the seq counter"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut probe = admin.transaction().unwrap();
    let taken = probe.query(
        "SELECT 1 FROM upgrades WHERE upgrade_id = 'u' FOR UPDATE NOWAIT",
        &[],
    );
    probe.rollback().unwrap();
    gate.rollback().unwrap();
    let results = batch.join().unwrap().unwrap();
    assert!(results[0].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(crate::error::Error::AlreadyExists { .. })),
        "{results:?}"
    );
    assert!(results[2].is_ok(), "{results:?}");
    assert!(
        taken.is_err(),
        "another session locked upgrade u while batch B, about to write u's task and counters, \
         believed it held u's lock (lost at the failed command's rollback to its savepoint)"
    );
    let t = b.task("u", "t").unwrap();
    assert_eq!(t.percentage, 20.0);
    assert_consistent(&b, "u");
}
