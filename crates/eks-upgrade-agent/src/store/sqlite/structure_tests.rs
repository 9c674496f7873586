//! Tests of how the SQLite store does its work, not only of what it returns (ARCHITECTURE
//! "O(depth) updates", "Per-task history without an index", "Searches use indexes"): every
//! statement a call runs is traced with SQLite's own counters (`sqlite3_stmt_status`: virtual
//! machine steps and full-scan steps), and the search plans are read with `EXPLAIN QUERY PLAN`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::trace::{TraceEvent, TraceEventCodes};
use rusqlite::{Connection, StatementStatus};

use super::*;
use crate::progress::ProgressTracker;
use crate::store::domain::command::NewTask;
use crate::store::domain::history;

/// One run of one statement: its SQL, and the virtual machine steps and full-scan steps it took.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    sql: String,
    vm_steps: i64,
    fullscan_steps: i64,
}

/// Records every statement run on `conn` until the returned guard is dropped.
fn trace(conn: &Mutex<Connection>) -> Arc<Mutex<Vec<Run>>> {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&runs);
    let mut started: HashMap<String, (i64, i64)> = HashMap::new();
    conn.lock()
        .unwrap()
        .trace_v2(
            TraceEventCodes::SQLITE_TRACE_STMT | TraceEventCodes::SQLITE_TRACE_PROFILE,
            Some(move |event: TraceEvent<'_>| match event {
                TraceEvent::Stmt(stmt, text) if !text.starts_with("--") => {
                    started.insert(
                        stmt.sql().into_owned(),
                        (
                            stmt.get_status(StatementStatus::VmStep).into(),
                            stmt.get_status(StatementStatus::FullscanStep).into(),
                        ),
                    );
                }
                TraceEvent::Profile(stmt, _) => {
                    let sql = stmt.sql().into_owned();
                    let (vm0, scan0) = started.remove(&sql).unwrap_or_default();
                    let vm: i64 = stmt.get_status(StatementStatus::VmStep).into();
                    let scan: i64 = stmt.get_status(StatementStatus::FullscanStep).into();
                    sink.lock().unwrap().push(Run {
                        sql,
                        vm_steps: vm - vm0,
                        fullscan_steps: scan - scan0,
                    });
                }
                _ => {}
            }),
        )
        .unwrap();
    runs
}

fn untrace(conn: &Mutex<Connection>) {
    conn.lock()
        .unwrap()
        .trace_v2(TraceEventCodes::empty(), None::<fn(TraceEvent<'_>)>)
        .unwrap();
}

/// The statements `f` runs on the store's writer connection.
fn writes(store: &SqliteStore, f: impl FnOnce()) -> Vec<Run> {
    let runs = trace(&store.writer);
    f();
    untrace(&store.writer);
    std::mem::take(&mut *runs.lock().unwrap())
}

/// The statements `f` runs on both of the store's connections, the writer's first: a write
/// that also read through the reader is checked as well.
fn both(store: &SqliteStore, f: impl FnOnce()) -> Vec<Run> {
    let mut on_reader = Vec::new();
    let mut runs = writes(store, || on_reader = reads(store, f));
    runs.append(&mut on_reader);
    runs
}

/// The statements `f` runs on the store's reader connection.
fn reads(store: &SqliteStore, f: impl FnOnce()) -> Vec<Run> {
    let runs = trace(&store.reader);
    f();
    untrace(&store.reader);
    std::mem::take(&mut *runs.lock().unwrap())
}

fn total(runs: &[Run]) -> i64 {
    runs.iter().map(|r| r.vm_steps).sum()
}

/// An upgrade whose tree is three levels deep (`root` > `mid` > `x`, `y`), with `fillers`
/// further tasks spread over every level: beside `x` and `y` under `mid`, under `root`, and at
/// the top. `y` is added last of `mid`'s children, so anything that looks for it among its
/// siblings walks them all.
fn tree(fillers: usize) -> (tempfile::TempDir, Arc<SqliteStore>, ProgressTracker) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let t = ProgressTracker::new(store.clone());
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    let mut tasks = vec![
        NewTask::new("root", "Root", TaskType::UpgradePlan),
        NewTask::new("mid", "Mid", TaskType::UpgradeStep).parent("root"),
        NewTask::new("x", "X", TaskType::UpgradeStep).parent("mid"),
    ];
    for i in 0..fillers {
        let task = NewTask::new(format!("f{i}"), "Filler", TaskType::Validation);
        tasks.push(match i % 3 {
            0 => task.parent("mid"),
            1 => task.parent("root"),
            _ => task,
        });
    }
    tasks.push(NewTask::new("y", "Y", TaskType::UpgradeStep).parent("mid"));
    t.add_tasks("u", tasks).unwrap();
    assert_eq!(t.tasks("u").unwrap().len(), fillers + 4);
    (dir, store, t)
}

/// The statements of each step of a task's life, a few of its neighbours' and a summary read.
fn costs(fillers: usize) -> Vec<(&'static str, Vec<Run>)> {
    let (_dir, store, t) = tree(fillers);
    let s = store.as_ref();
    let mut out = Vec::new();
    let mut step = |name: &'static str, f: &dyn Fn()| out.push((name, both(s, f)));
    step("update (implicit start)", &|| {
        t.update_task("u", "x", 10.0, None, JsonMap::new()).unwrap();
    });
    step("update", &|| {
        t.update_task("u", "x", 50.0, Some("half"), JsonMap::new())
            .unwrap();
    });
    step("fail", &|| {
        t.fail_task("u", "x", "boom").unwrap();
    });
    step("retry", &|| {
        t.retry_task("u", "x", None).unwrap();
    });
    step("pause", &|| {
        t.pause_task("u", "x", None).unwrap();
    });
    step("resume", &|| {
        t.resume_task("u", "x", None).unwrap();
    });
    step("add a subtask", &|| {
        t.add_task(
            "u",
            NewTask::new("z", "Z", TaskType::UpgradeStep).parent("mid"),
        )
        .unwrap();
    });
    step("cancel", &|| {
        t.cancel_task("u", "z", None).unwrap();
    });
    step("a sibling fails", &|| {
        t.fail_task("u", "y", "elsewhere").unwrap();
    });
    // `x` stops running while `y` is failed: `mid` turns failed and must name `y` as the cause.
    step("complete beside a failed sibling", &|| {
        t.complete_task("u", "x", None).unwrap();
    });
    out.push(("summary", reads(s, || drop(t.summary("u").unwrap()))));
    out.push(("upgrade", reads(s, || drop(t.upgrade("u").unwrap()))));
    out
}

/// ARCHITECTURE "O(depth) updates": the same operations in trees of 10 and 10,000 tasks of the
/// same depth run the same statements with the same number of SQLite virtual machine steps (a
/// statement that walked tasks or events would take thousands more), and none scans a table.
#[test]
fn updates_cost_the_same_in_a_tree_of_ten_and_of_ten_thousand_tasks() {
    let small = costs(6);
    let large = costs(9_996);
    for ((name, s), (_, l)) in small.iter().zip(&large) {
        let sql = |runs: &[Run]| runs.iter().map(|r| r.sql.clone()).collect::<Vec<_>>();
        if *name == "summary" {
            // The history part of a summary reads the unfinished tasks only up to
            // MAX_ETA_TASKS (see `history_reads_of_a_summary_are_bounded_key_lookups`): the
            // large tree is past it, so its summary runs a subset of the small one's.
            assert!(
                sql(l).iter().all(|q| sql(s).contains(q)),
                "{name}: {l:#?} vs {s:#?}"
            );
            assert!(l.iter().all(|r| r.fullscan_steps == 0), "{l:#?}");
            continue;
        }
        assert_eq!(sql(s), sql(l), "{name}: different statements");
        for (a, b) in s.iter().zip(l) {
            assert!(
                b.vm_steps <= a.vm_steps + 2,
                "{name}: {} took {} VM steps with 10,000 tasks, {} with 10",
                b.sql,
                b.vm_steps,
                a.vm_steps
            );
            assert_eq!(b.fullscan_steps, 0, "{name}: {} scans a table", b.sql);
        }
        assert!(total(s) > 0, "{name}: nothing traced");
    }
    // A summary's counters are one upgrade row read; its running and failed tasks (reference
    // names) are an index walk by status, whose cost does not grow with the tree (checked above).
    for name in ["summary", "upgrade"] {
        let (_, runs) = large.iter().find(|(n, _)| *n == name).unwrap();
        let rows: Vec<_> = runs
            .iter()
            .filter(|r| r.sql.starts_with("SELECT ukey, upgrade_id"))
            .collect();
        assert_eq!(rows.len(), 1, "{name}: {runs:#?}");
        assert!(rows[0].vm_steps < 60, "{name}: {runs:#?}");
        for r in runs.iter().filter(|r| r.sql.contains(" FROM tasks")) {
            assert!(
                r.sql.contains("INDEXED BY tasks_by_status"),
                "{name}: {runs:#?}"
            );
        }
    }
}

/// ARCHITECTURE "Per-task history without an index": `events (ukey, seq)` is the event log's
/// only secondary index, and a task's five most recent events are five primary-key reads of
/// the log, whatever the length of the task's history or of the log.
#[test]
fn a_tasks_recent_events_are_five_primary_key_reads() {
    let (_dir, store, t) = tree(50);
    for i in 0..40 {
        t.update_task("u", "x", f64::from(i), None, JsonMap::new())
            .unwrap();
        t.update_task("u", "y", f64::from(i), None, JsonMap::new())
            .unwrap();
    }
    let conn = store.reader();
    let indexes: Vec<(String, String)> = conn
        .prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        indexes,
        [(
            "events_by_upgrade".to_owned(),
            "CREATE INDEX events_by_upgrade ON events (ukey, seq)".to_owned()
        )]
    );
    drop(conn);

    let mut got = Vec::new();
    let runs = reads(&store, || {
        got = store.recent_task_events("u", "x", 5).unwrap();
    });
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 5);
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );
    let on_events: Vec<&Run> = runs.iter().filter(|r| r.sql.contains("events")).collect();
    assert_eq!(on_events.len(), 5, "one read per event: {runs:#?}");
    let conn = store.reader();
    for run in on_events {
        let plan = query_plan(&conn, &run.sql);
        assert!(
            plan.iter()
                .all(|p| p.contains("USING INTEGER PRIMARY KEY (rowid=?)")),
            "{}: {plan:?}",
            run.sql
        );
        assert!(run.vm_steps < 60, "{run:?}");
    }
}

/// `EXPLAIN QUERY PLAN` of `sql` with every parameter bound to NULL: one line per step.
fn query_plan(conn: &Connection, sql: &str) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let n = stmt.parameter_count();
    stmt.query_map(
        rusqlite::params_from_iter(vec![rusqlite::types::Null; n]),
        |r| r.get::<_, String>(3),
    )
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

/// ARCHITECTURE "Searches use indexes": each equality filter walks its own index newest first
/// (no table scan, no sort of the matches), tags go through `artifact_tags (tag, akey)`, names
/// of three or more characters through the FTS5 trigram index plus the rows above its mark;
/// range filters (sizes, `since`) and shorter names walk the table newest first and stop at a
/// full page.
#[test]
fn searches_walk_an_index_newest_first() {
    use crate::artifacts::{AddOptions, NewSession, TestArtifactsManager};
    use crate::blob::local::LocalBlobStore;
    use crate::model::{ArtifactQuery, ArtifactStatus, ArtifactType};
    use crate::store::ArtifactIndex;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let blobs =
        Arc::new(LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap());
    let m = TestArtifactsManager::new(store.clone(), blobs, Default::default());
    let s = m
        .create_session(NewSession {
            upgrade_id: "u".into(),
            cluster_name: "c".into(),
            ..NewSession::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "logs", None, None)
        .unwrap();
    // The names' index is filled in batches: whatever the count, at most 255 rows lie above
    // its mark (the tail a name search reads from the table).
    for i in 0..300 {
        m.add_bytes(
            &s.session_id,
            &c.collection_id,
            format!("{i}").as_bytes(),
            &format!("node-{i}.log"),
            &AddOptions::default(),
        )
        .unwrap();
        let tail: i64 = store
            .reader()
            .query_row(
                "SELECT count(*) FROM artifacts WHERE akey > \
                 (SELECT value FROM artifact_meta WHERE key = 'fts_upto')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(tail <= 255, "{tail} names unindexed after {} adds", i + 1);
    }

    let q = ArtifactQuery::default;
    let indexed = [
        (
            "session",
            ArtifactQuery {
                session_id: Some(s.session_id.clone()),
                ..q()
            },
            "artifacts_by_session (skey=?)",
        ),
        (
            "collection",
            ArtifactQuery {
                collection_id: Some(c.collection_id.clone()),
                ..q()
            },
            "artifacts_by_collection (ckey=?)",
        ),
        (
            "upgrade",
            ArtifactQuery {
                upgrade_id: Some("u".into()),
                ..q()
            },
            "artifacts_by_upgrade_newest (upgrade_id=?)",
        ),
        (
            "type",
            ArtifactQuery {
                artifact_type: Some(ArtifactType::Report),
                ..q()
            },
            "artifacts_by_type (artifact_type=?)",
        ),
        (
            "task",
            ArtifactQuery {
                task_id: Some("t".into()),
                ..q()
            },
            "artifacts_by_task (task_id=?)",
        ),
        (
            "status",
            ArtifactQuery {
                status: Some(ArtifactStatus::Uploaded),
                ..q()
            },
            "artifacts_by_status (status=?)",
        ),
    ];
    let by_key = [
        (
            "tag",
            ArtifactQuery {
                tags: vec!["node".into()],
                ..q()
            },
            "SEARCH artifact_tags USING PRIMARY KEY (tag=?)",
        ),
        (
            "name",
            ArtifactQuery {
                name: Some("kubelet".into()),
                ..q()
            },
            "SCAN artifact_names VIRTUAL TABLE INDEX 0:M",
        ),
        (
            "glob",
            ArtifactQuery {
                name: Some("node-*.log".into()),
                ..q()
            },
            "SCAN artifact_names VIRTUAL TABLE INDEX 0:M",
        ),
    ];
    let walks = [
        ("none", q()),
        (
            "short name",
            ArtifactQuery {
                name: Some("ab".into()),
                ..q()
            },
        ),
        (
            "min size",
            ArtifactQuery {
                min_size: Some(5),
                ..q()
            },
        ),
        (
            "max size",
            ArtifactQuery {
                max_size: Some(5),
                ..q()
            },
        ),
        (
            "since",
            ArtifactQuery {
                created_since: Some(chrono::Utc::now()),
                ..q()
            },
        ),
    ];
    let conn = store.reader();
    let plan = |query: &ArtifactQuery| {
        let (sql, _) = super::super::artifacts::search_sql(&conn, query).unwrap();
        let plan = query_plan(&conn, &sql);
        assert!(
            !plan.iter().any(|p| p.contains("TEMP B-TREE")),
            "newest first must be an index walk, not a sort: {plan:#?}"
        );
        plan
    };
    for (name, query, index) in &indexed {
        let plan = plan(query);
        assert!(
            plan.contains(&format!("SEARCH a USING INDEX {index}")),
            "{name}: {plan:#?}"
        );
    }
    for (name, query, lookup) in &by_key {
        let plan = plan(query);
        assert!(
            plan.contains(&"SEARCH a USING INTEGER PRIMARY KEY (rowid=?)".to_owned())
                && plan.iter().any(|p| p.starts_with(lookup)),
            "{name}: {plan:#?}"
        );
        if name.starts_with("name") || name.starts_with("glob") {
            // The tail above the mark is read by primary key, never a table scan.
            assert!(
                plan.contains(&"SEARCH artifacts USING INTEGER PRIMARY KEY (rowid>?)".to_owned()),
                "{name}: {plan:#?}"
            );
        }
    }
    for (name, query) in &walks {
        let plan = plan(query);
        assert_eq!(plan[0], "SCAN a", "{name}: {plan:#?}");
    }
    drop(conn);
    // Every search with a page's worth of matches stops at the page: a walk newest first.
    let runs = reads(&store, || {
        let page = store
            .search(&ArtifactQuery {
                min_size: Some(1),
                limit: 10,
                ..q()
            })
            .unwrap();
        assert_eq!(page.artifacts.len(), 10);
    });
    let search = runs
        .iter()
        .find(|r| r.sql.contains("FROM artifacts a"))
        .unwrap();
    assert!(search.fullscan_steps <= 11, "{search:?}");
}

/// A store of schema 6 gets the indexes of schema 7 when opened (and loses the one it replaces).
#[test]
fn schema_6_stores_get_the_new_indexes() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute_batch(
        "DROP INDEX tasks_by_parent_status; DROP INDEX artifacts_by_collection; \
         DROP INDEX artifacts_by_upgrade_newest; \
         CREATE INDEX tasks_by_parent ON tasks (parent_tkey) WHERE parent_tkey IS NOT NULL; \
         PRAGMA user_version = 6;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
    let names: Vec<String> = store
        .reader()
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    for index in [
        "tasks_by_parent_status",
        "artifacts_by_collection",
        "artifacts_by_upgrade_newest",
    ] {
        assert!(names.iter().any(|n| n == index), "{index}: {names:?}");
    }
    assert!(!names.iter().any(|n| n == "tasks_by_parent"), "{names:?}");
}

/// Abbreviated ids (ARCHITECTURE "Searches use indexes"): a prefix is a range on the ids'
/// unique index, a suffix a seek on the index of their last six characters; with 3,000
/// sessions, neither scans the table. And what they resolve to: the one id, or an error that
/// lists the candidates.
#[test]
fn abbreviated_ids_resolve_through_indexes() {
    use crate::store::{ArtifactIndex, IdKind};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
    store
        .write(|tx| {
            let mut stmt = tx.prepare(
                "INSERT INTO sessions (session_id, upgrade_id, cluster_name, name, started_at, \
                 retention_days) VALUES (?1, 'u', 'c', 'n', 0, 30)",
            )?;
            for i in 0..3000u32 {
                stmt.execute([format!("0193aaaa-{i:04}-7000-8000-{:012x}", i * 7919)])?;
            }
            stmt.execute(["0193bbbb-0000-7000-8000-00000000beef"])?;
            stmt.execute(["0193bbbc-0000-7000-8000-00111100beef"])?;
            Ok(())
        })
        .unwrap();
    let runs = reads(&store, || {
        let prefix = store.resolve_id(IdKind::Session, "0193bbbb").unwrap();
        assert_eq!(prefix, "0193bbbb-0000-7000-8000-00000000beef");
        let suffix = store.resolve_id(IdKind::Session, "111100beef").unwrap();
        assert_eq!(suffix, "0193bbbc-0000-7000-8000-00111100beef");
    });
    assert_eq!(runs.len(), 3, "{runs:?}");
    for run in &runs {
        assert_eq!(run.fullscan_steps, 0, "{run:?}");
        assert!(run.vm_steps < 200, "{run:?}");
    }
    // Ambiguous: the candidates are listed.
    let err = store.resolve_id(IdKind::Session, "0193bbb").unwrap_err();
    assert!(
        err.to_string().contains(
            "session id \"0193bbb\" is ambiguous: it matches 0193bbbb-0000-7000-8000-00000000beef, 0193bbbc-0000-7000-8000-00111100beef"
        ),
        "{err}"
    );
    let err = store.resolve_id(IdKind::Session, "00beef").unwrap_err();
    assert!(err.to_string().contains("ambiguous"), "{err}");
    // A suffix needs six characters; an unknown id is not found.
    assert!(matches!(
        store.resolve_id(IdKind::Session, "beef"),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.resolve_id(IdKind::Artifact, "0193bbbb"),
        Err(Error::NotFound { .. })
    ));
    // Many matches: ten listed, then "...".
    let err = store.resolve_id(IdKind::Session, "0193aaaa").unwrap_err();
    assert!(
        err.to_string().ends_with(", ...; give more characters"),
        "{err}"
    );
}

/// A store of schema 7 gets the id-tail indexes of schema 8 when opened.
#[test]
fn schema_7_stores_get_the_id_tail_indexes() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute_batch(
        "DROP INDEX sessions_by_id_tail; DROP INDEX collections_by_id_tail; \
         DROP INDEX artifacts_by_id_tail; PRAGMA user_version = 7;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
    let names: Vec<String> = store
        .reader()
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    for index in [
        "sessions_by_id_tail",
        "collections_by_id_tail",
        "artifacts_by_id_tail",
    ] {
        assert!(names.iter().any(|n| n == index), "{index}: {names:?}");
    }
}

/// ETA from history (guarantee E7): a completion appends its samples by primary key in its own
/// transaction — one upsert of its two `task_history` rows, never a read of `events` — and
/// costs the same for the 5th sample of a task as for the 120th (the row keeps the last 50).
#[test]
fn a_completion_updates_the_history_by_key_without_reading_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let t = ProgressTracker::new(store.clone());
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    let tasks = (0..501)
        .map(|i| NewTask::new(format!("t{i}"), "T", TaskType::UpgradeStep))
        .collect();
    t.add_tasks("u", tasks).unwrap();
    // Each task a different upgrade's "same" task: one history row, growing.
    let complete = |i: usize| {
        let id = format!("t{i}");
        t.start_task("u", &id, None).unwrap();
        writes(&store, || {
            t.complete_task("u", &id, None).unwrap();
        })
    };
    let first = complete(0);
    for i in 1..500 {
        t.start_task("u", &format!("t{i}"), None).unwrap();
        t.complete_task("u", &format!("t{i}"), None).unwrap();
    }
    let last = complete(500);
    let sql = |runs: &[Run]| runs.iter().map(|r| r.sql.clone()).collect::<Vec<_>>();
    // Different task ids: same statements, same cost (no row of history grows).
    assert_eq!(sql(&first), sql(&last));
    let history: Vec<&Run> = last
        .iter()
        .filter(|r| r.sql.contains("task_history"))
        .collect();
    assert_eq!(history.len(), 1, "one upsert of both scopes: {last:#?}");
    assert!(history[0].sql.starts_with("INSERT INTO task_history"));
    let conn = store.reader();
    for r in &history {
        assert_eq!(r.fullscan_steps, 0, "{r:?}");
        if r.sql.starts_with("SELECT") {
            let plan = query_plan(&conn, &r.sql);
            assert!(
                plan.iter().all(|p| p.contains("USING PRIMARY KEY")),
                "{}: {plan:?}",
                r.sql
            );
        }
    }
    for r in &last {
        assert_eq!(r.fullscan_steps, 0, "{r:?}");
        if r.sql.contains("events") {
            assert!(
                r.sql.starts_with("INSERT INTO events"),
                "reads events: {r:?}"
            );
        }
    }
    drop(conn);
    // The same task id again and again: the row holds 50 samples, the cost stays flat.
    let same = |prefix: &str, n: usize| {
        let mut runs = Vec::new();
        for i in 0..n {
            let u = format!("{prefix}{i}");
            t.create_upgrade(&u, "p", "c", JsonMap::new()).unwrap();
            t.add_task(&u, NewTask::new("x", "X", TaskType::UpgradeStep))
                .unwrap();
            t.start_task(&u, "x", None).unwrap();
            runs = writes(&store, || {
                t.complete_task(&u, "x", None).unwrap();
            });
        }
        runs
    };
    let after_few = same("a", 5);
    let after_many = same("b", 115);
    assert_eq!(sql(&after_few), sql(&after_many));
    assert!(
        total(&after_many) <= total(&after_few) + 20,
        "{} VM steps for the 120th sample, {} for the 5th",
        total(&after_many),
        total(&after_few)
    );
    // The SQL append keeps what `push_sample` keeps: the last 50 durations, oldest first.
    let durations: Vec<f64> = (0..120)
        .map(|i| {
            let u = if i < 5 {
                format!("a{i}")
            } else {
                format!("b{}", i - 5)
            };
            store.task(&u, "x").unwrap().duration.unwrap()
        })
        .collect();
    let expected = durations
        .iter()
        .fold(Vec::new(), |blob, d| history::push_sample(&blob, *d));
    let blob: Vec<u8> = store
        .reader()
        .query_row(
            "SELECT samples FROM task_history WHERE cluster = 'c' AND task_id = 'x'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(blob, expected);
    assert_eq!(history::samples(&blob).len(), 50);
    let h = store.task_history("c", &["x"]).unwrap();
    assert_eq!(h[0].cluster.unwrap().duration.samples, 50);
}

/// ETA from history (guarantee E7): a summary reads each unfinished task through the status
/// index and its history by primary key, at most MAX_ETA_TASKS of them: past that it reads no
/// history (the estimate falls back to the rate).
#[test]
fn history_reads_of_a_summary_are_bounded_key_lookups() {
    use crate::store::domain::history::MAX_ETA_TASKS;
    let n = MAX_ETA_TASKS as usize;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let t = ProgressTracker::new(store.clone());
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    let tasks = (0..n)
        .map(|i| NewTask::new(format!("t{i}"), "T", TaskType::UpgradeStep))
        .collect();
    t.add_tasks("u", tasks).unwrap();
    let runs = reads(&store, || drop(t.summary("u").unwrap()));
    let lookups = runs
        .iter()
        .filter(|r| r.sql.contains("task_history"))
        .count();
    assert_eq!(lookups, 2 * n, "one per task and scope");
    let conn = store.reader();
    for r in &runs {
        assert_eq!(r.fullscan_steps, 0, "{r:?}");
        if r.sql.contains(" FROM tasks") {
            assert!(r.sql.contains("INDEXED BY tasks_by_status"), "{r:?}");
        }
        if r.sql.contains("task_history") {
            let plan = query_plan(&conn, &r.sql);
            assert!(
                plan.iter().all(|p| p.contains("USING PRIMARY KEY")),
                "{plan:?}"
            );
        }
    }
    drop(conn);
    t.add_task("u", NewTask::new("one-more", "T", TaskType::UpgradeStep))
        .unwrap();
    let runs = reads(&store, || drop(t.summary("u").unwrap()));
    assert!(
        !runs.iter().any(|r| r.sql.contains("task_history")),
        "{runs:#?}"
    );
    assert!(runs.len() < 10, "{runs:#?}");
}

/// A store of schema 8 gets the history table of schema 10 when opened, seeded from the
/// completed leaf tasks it already holds (guarantee E5).
#[test]
fn schema_8_stores_get_the_history_seeded_from_their_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
    let t = ProgressTracker::new(Arc::new(store));
    for i in 0..3 {
        let u = format!("u{i}");
        t.create_upgrade(&u, "p", "c", JsonMap::new()).unwrap();
        t.add_task(&u, NewTask::new("a", "A", TaskType::UpgradeStep))
            .unwrap();
        t.start_task(&u, "a", None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.complete_task(&u, "a", None).unwrap();
    }
    drop(t);
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute_batch("DROP TABLE task_history; PRAGMA user_version = 8;")
        .unwrap();
    drop(conn);
    let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
    let h = store.task_history("c", &["a"]).unwrap();
    let c = h[0].cluster.unwrap();
    assert_eq!(c.duration.samples, 3);
    assert!(c.duration.p50 > 0.0, "{c:?}");
    assert_eq!(h[0].global.unwrap().duration.samples, 3);
}
