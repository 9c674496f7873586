//! Keyset pages on a real PostgreSQL against rows that commit late: a transaction that took a
//! smaller key commits after a page past that key was served. The upgrade list (oldest first,
//! `?cursor=` the last upgrade id) and an upgrade's tasks must still show such a row on a later
//! page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::progress::{PostgresOptions, PostgresStore};
use crate::model::{JsonMap, TaskType};
use crate::progress::ProgressTracker;
use crate::store::ProgressStore;
use crate::store::domain::command::NewTask;
use crate::test_support::PgCluster;

/// Lock waits of every session but those holding them.
fn waiting(admin: &mut postgres::Client) -> i64 {
    admin
        .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
        .unwrap()
        .get(0)
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// P1: upgrade `late` takes the smaller key and is held before its commit (a trigger waits on
/// an advisory lock the test holds); upgrade `early` is created meanwhile. A client that read a
/// page then and continues from its last upgrade still gets `late`: creating upgrades takes a
/// lock held to the commit, so a larger key never commits before a smaller one. Without that
/// lock `early` commits first, the page ends with it, and `late` is on no page. Both ways of
/// creating an upgrade: a command, and an import (`progress import`, `store copy`).
#[test]
fn an_upgrade_committing_after_a_page_with_a_smaller_key_is_on_the_next_page() {
    late_upgrade(|store, id| {
        ProgressTracker::new(store)
            .create_upgrade(id, "p", "c", JsonMap::new())
            .map(|_| ())
    });
    late_upgrade(|store, id| {
        let mut u = store.upgrade("template")?;
        u.upgrade_id = id.to_owned();
        store.import(&u, &[], &[]).map(|_| ())
    });
}

fn late_upgrade(create: fn(Arc<PostgresStore>, &str) -> crate::Result<()>) {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let store = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let tracker = ProgressTracker::new(store.clone());
    for id in ["template", "first"] {
        tracker
            .create_upgrade(id, "p", "c", JsonMap::new())
            .unwrap();
    }
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$; \
             CREATE TRIGGER hold AFTER INSERT ON upgrades FOR EACH ROW \
             WHEN (NEW.upgrade_id = 'late') EXECUTE FUNCTION hold(); \
             SELECT pg_advisory_lock(4242);",
        )
        .unwrap();
    let spawn = |id: &'static str| {
        let store = store.clone();
        std::thread::spawn(move || create(store, id))
    };
    let late = spawn("late");
    until("the late upgrade never waited before its commit", || {
        waiting(&mut admin) >= 1
    });
    let early = spawn("early");
    until("the early upgrade neither committed nor waited", || {
        early.is_finished() || waiting(&mut admin) >= 2
    });
    let ids = |page: Vec<crate::model::Upgrade>| -> Vec<String> {
        page.into_iter().map(|u| u.upgrade_id).collect()
    };
    let first_page = ids(store.upgrades_page(None, 100).unwrap());
    admin
        .execute("SELECT pg_advisory_unlock(4242)", &[])
        .unwrap();
    late.join().unwrap().unwrap();
    early.join().unwrap().unwrap();
    let keys: Vec<String> = admin
        .query("SELECT upgrade_id FROM upgrades ORDER BY ukey", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        keys,
        ["template", "first", "late", "early"],
        "the case is not the one meant"
    );
    let cursor = first_page
        .last()
        .expect("the first upgrades are on the first page");
    let next_page = ids(store.upgrades_page(Some(cursor), 100).unwrap());
    let mut seen = [first_page.clone(), next_page.clone()].concat();
    seen.sort();
    assert_eq!(
        seen,
        ["early", "first", "late", "template"],
        "pages {first_page:?} then {next_page:?}"
    );
}

/// P2: the same for an upgrade's tasks: task `late` takes the smaller key and is held before
/// its commit; adding task `early` waits for it (task writes lock their upgrade's row), so a
/// page read meanwhile ends before both and the next page has them.
#[test]
fn a_task_committing_after_a_page_with_a_smaller_key_is_on_the_next_page() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let store = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let tracker = ProgressTracker::new(store.clone());
    tracker
        .create_upgrade("u", "p", "c", JsonMap::new())
        .unwrap();
    tracker
        .add_task("u", NewTask::new("first", "T", TaskType::UpgradeStep))
        .unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$; \
             CREATE TRIGGER hold AFTER INSERT ON tasks FOR EACH ROW \
             WHEN (NEW.task_id = 'late') EXECUTE FUNCTION hold(); \
             SELECT pg_advisory_lock(4242);",
        )
        .unwrap();
    let add = |id: &'static str| {
        let t = ProgressTracker::new(store.clone());
        std::thread::spawn(move || {
            t.add_task("u", NewTask::new(id, "T", TaskType::UpgradeStep))
                .map(|_| ())
        })
    };
    let late = add("late");
    until("the late task never waited before its commit", || {
        waiting(&mut admin) >= 1
    });
    let early = add("early");
    until("the early task neither committed nor waited", || {
        early.is_finished() || waiting(&mut admin) >= 2
    });
    let ids = |page: Vec<crate::model::Task>| -> Vec<String> {
        page.into_iter().map(|t| t.task_id).collect()
    };
    let first_page = ids(store.tasks_page("u", None, 100).unwrap());
    admin
        .execute("SELECT pg_advisory_unlock(4242)", &[])
        .unwrap();
    late.join().unwrap().unwrap();
    early.join().unwrap().unwrap();
    let order: Vec<String> = admin
        .query("SELECT task_id FROM tasks ORDER BY tkey", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        order,
        ["first", "late", "early"],
        "the case is not the one meant"
    );
    let cursor = first_page
        .last()
        .expect("the first task is on the first page");
    let next_page = ids(store.tasks_page("u", Some(cursor), 100).unwrap());
    let mut seen = [first_page.clone(), next_page.clone()].concat();
    seen.sort();
    assert_eq!(
        seen,
        ["early", "first", "late"],
        "pages {first_page:?} then {next_page:?}"
    );
}
