//! [`TraceSource`] over the PostgreSQL store (the OTLP sink of `serve --database-url`). A
//! task's events are a range of the `events_by_task (tkey, seq)` index: the attempt running at
//! `upto` is the number of its `task.retried` events up to there, and its events those from
//! the last of them to `upto` (`task.added` left out); the upgrade's own events are a range of
//! `events_by_upgrade` with no task. Only events with `seq <= upto` count, so the answer for a
//! committed ending event never changes (the same answers as the SQLite store's walk of
//! `prev_task_seq`, see `store/sqlite/trace.rs`).

use uuid::Uuid;

use super::progress::{PostgresStore, from_micros, json_map, load_task, status_from, upgrade_key};
use crate::error::{Error, Result};
use crate::model::{EventKind, ProgressEvent, Task, TaskType, Upgrade};
use crate::notify::otlp::{RunFacts, SpanHistory, TraceSource, sample_indices};
use crate::store::ProgressStore;

/// The columns of one event, in [`event`]'s order.
const COLS: &str = "seq, event_id, ts, kind, status, message, details, percentage";

impl TraceSource for PostgresStore {
    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade> {
        ProgressStore::upgrade(self, upgrade_id)
    }

    fn test_run(&self, run_id: &str, max_events: usize) -> Result<Option<RunFacts>> {
        self.read(|db| super::test_results::trace_run(db, run_id, max_events).map(Some))
    }

    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task> {
        ProgressStore::task(self, upgrade_id, task_id)
    }

    fn span_history(
        &self,
        upgrade_id: &str,
        task_id: Option<&str>,
        upto: u64,
        max_events: usize,
    ) -> Result<SpanHistory> {
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        self.read(|db| {
            let ukey = upgrade_key(db, upgrade_id)?;
            // Which events: the task's attempt (`$1` its key, from `$2`), or the upgrade's own
            // (`$1` its key); up to `$3`.
            let (attempt, key, from, task, filter) = match task_id {
                Some(t) => {
                    let row = load_task(db, ukey, upgrade_id, t)?;
                    let r = db.one(
                        "SELECT count(*), coalesce(max(seq), 0) FROM events \
                         WHERE tkey = $1 AND seq <= $2 AND kind = $3",
                        &[&row.tkey, &upto, &EventKind::TaskRetried.code()],
                    )?;
                    let attempt = u32::try_from(r.get::<_, i64>(0)).unwrap_or(u32::MAX);
                    (
                        attempt,
                        row.tkey,
                        r.get::<_, i64>(1),
                        Some((row.task.task_id, row.task.task_type)),
                        format!(
                            "tkey = $1 AND seq >= $2 AND seq <= $3 AND kind <> {}",
                            EventKind::TaskAdded.code()
                        ),
                    )
                }
                None => (
                    0,
                    ukey,
                    0,
                    None,
                    "ukey = $1 AND tkey IS NULL AND seq >= $2 AND seq <= $3".to_owned(),
                ),
            };
            let total: i64 = db
                .one(
                    &format!("SELECT count(*) FROM events WHERE {filter}"),
                    &[&key, &from, &upto],
                )?
                .get(0);
            let total = usize::try_from(total).unwrap_or(0);
            let keep: Vec<i64> = sample_indices(total, max_events)
                .into_iter()
                .map(|i| i as i64)
                .collect();
            let rows = if keep.len() == total {
                db.query(
                    &format!("SELECT {COLS} FROM events WHERE {filter} ORDER BY seq"),
                    &[&key, &from, &upto],
                )?
            } else {
                db.query(
                    &format!(
                        "SELECT {COLS} FROM (SELECT {COLS}, row_number() OVER (ORDER BY seq) - 1 \
                         AS i FROM events WHERE {filter}) x WHERE i = ANY($4) ORDER BY seq"
                    ),
                    &[&key, &from, &upto, &keep],
                )?
            };
            let ids = (upgrade_id, task.as_ref().map(|(id, ty)| (id.as_str(), *ty)));
            let events = rows
                .iter()
                .map(|r| event(r, ids))
                .collect::<Result<Vec<_>>>()?;
            let start = if keep.first() == Some(&0) {
                events.first().map(|e| e.timestamp)
            } else {
                db.opt(
                    &format!("SELECT ts FROM events WHERE {filter} ORDER BY seq LIMIT 1"),
                    &[&key, &from, &upto],
                )?
                .map(|r| from_micros(r.get(0)))
            };
            Ok(SpanHistory {
                attempt,
                start,
                events,
                total_events: total as u64,
            })
        })
    }
}

/// One row of [`COLS`] as the event of `ids` (the upgrade, and the task with its type).
fn event(r: &postgres::Row, ids: (&str, Option<(&str, TaskType)>)) -> Result<ProgressEvent> {
    let id: Uuid = r.get(1);
    let kind: i64 = r.get(3);
    Ok(ProgressEvent {
        seq: r.get::<_, i64>(0) as u64,
        event_id: id.to_string(),
        upgrade_id: ids.0.to_owned(),
        timestamp: from_micros(r.get(2)),
        task_id: ids.1.map(|(t, _)| t.to_owned()),
        task_type: ids.1.map(|(_, ty)| ty),
        kind: EventKind::from_code(kind)
            .ok_or_else(|| Error::invalid(format!("unknown event kind {kind}")))?,
        status: status_from(r.get(4))?,
        message: r.get(5),
        details: json_map(r.get(6)),
        percentage: r.get(7),
    })
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use std::sync::Arc;

    use super::*;
    use crate::ProgressTracker;
    use crate::model::JsonMap;
    use crate::store::domain::command::NewTask;
    use crate::store::postgres::PostgresOptions;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};
    use crate::test_support::PgCluster;

    /// The same script on both stores: a parent whose child fails, is retried and completes
    /// after 300 updates; then the upgrade completes.
    fn script(t: &ProgressTracker) -> Vec<(Option<&'static str>, u64)> {
        t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
        t.start_upgrade("u", None).unwrap();
        t.add_tasks(
            "u",
            vec![
                NewTask::new("p", "P", TaskType::UpgradeStep),
                NewTask::new("c", "C", TaskType::Validation).parent("p"),
            ],
        )
        .unwrap();
        let mut asks = Vec::new();
        t.start_task("u", "c", None).unwrap();
        t.update_task("u", "c", 10.0, Some("first"), JsonMap::new())
            .unwrap();
        asks.push((Some("c"), t.fail_task("u", "c", "boom").unwrap().last_seq()));
        t.retry_task("u", "c", None).unwrap();
        for i in 0..300 {
            t.update_task(
                "u",
                "c",
                f64::from(i % 100),
                Some("working"),
                JsonMap::new(),
            )
            .unwrap();
        }
        let done = t.complete_task("u", "c", None).unwrap().last_seq();
        asks.push((Some("c"), done));
        asks.push((Some("p"), done));
        asks.push((None, t.complete_upgrade("u").unwrap().last_seq()));
        asks
    }

    /// An event as both stores must answer it: seq, kind, message.
    type Seen = (u64, EventKind, Option<String>);

    /// What two stores' answers share (event ids and times differ between runs).
    fn shape(h: &SpanHistory) -> (u32, u64, Vec<Seen>, bool) {
        (
            h.attempt,
            h.total_events,
            h.events
                .iter()
                .map(|e| (e.seq, e.kind, e.message.clone()))
                .collect(),
            h.start.is_some(),
        )
    }

    /// PostgreSQL answers as SQLite does, ask by ask (each attempt of a retried task, its
    /// parent, the root; sampled to 128 and whole), and its answer never counts what came
    /// after `upto`.
    #[test]
    fn postgres_answers_as_sqlite_does() {
        let pg = PgCluster::start();
        let url = pg.create_database();
        let pg_store = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let lite = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let asks = script(&ProgressTracker::new(pg_store.clone()));
        assert_eq!(
            asks,
            script(&ProgressTracker::new(lite.clone())),
            "same seqs"
        );
        for (task, upto) in asks {
            for max in [128, 3, 0] {
                let a = pg_store.span_history("u", task, upto, max).unwrap();
                let b = lite.span_history("u", task, upto, max).unwrap();
                assert_eq!(shape(&a), shape(&b), "{task:?} at {upto}, {max} events");
            }
        }
        let failed = pg_store.span_history("u", Some("c"), asks_first(&pg_store), 128);
        let failed = failed.unwrap();
        assert_eq!(failed.attempt, 0);
        assert_eq!(failed.events.last().unwrap().kind, EventKind::TaskFailed);
        assert_eq!(
            failed.events[0].task_type,
            Some(TaskType::Validation),
            "events carry their task"
        );
        assert!(matches!(
            pg_store.span_history("u", Some("nope"), 1, 128),
            Err(Error::NotFound { .. })
        ));
    }

    /// N23 on PostgreSQL: the test runs the OTLP sink exports are read from the PostgreSQL
    /// test-result tables with the same answers as from SQLite's: their counts, the failing
    /// tests sampled in byte order of (suite, class name, name) with their messages cut, at
    /// several event limits; `NotFound` for an unknown id.
    #[test]
    fn postgres_reads_test_runs_as_sqlite_does() {
        use crate::model::{CaseAttempt, NewRun, RunPhase, SuiteWindow, TestStatus};
        use crate::store::TestResultStore;
        let pg = PgCluster::start();
        let url = pg.create_database();
        let pg_store = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lite = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let case =
            |suite: &str, name: String, status: TestStatus, message: Option<String>| CaseAttempt {
                framework: "pytest".into(),
                suite: suite.into(),
                classname: "tests.api".into(),
                name,
                status,
                duration: 0.5,
                message,
                suite_window: None,
            };
        let mut big = Vec::new();
        for i in 0..300 {
            let suite = ["alpha", "Zeta", "Émile", "beta"][i % 4];
            let (status, message) = match i % 3 {
                0 => (TestStatus::Passed, None),
                1 => (TestStatus::Failed, Some(format!("é{}", "x".repeat(5000)))),
                _ => (TestStatus::Error, Some(format!("t{i:03} errored"))),
            };
            big.push(case(suite, format!("T{i:03}"), status, message));
        }
        let runs = [
            ("r1", "u", 10, big),
            (
                "r2",
                "u",
                20,
                vec![case("s", "ok".into(), TestStatus::Passed, None)],
            ),
            (
                "r3",
                "u",
                30,
                vec![case("s", "late".into(), TestStatus::Failed, None)],
            ),
            (
                "other",
                "v",
                15,
                vec![case("s", "x".into(), TestStatus::Failed, None)],
            ),
            // N27: suite times (one suite without), stored and read back alike.
            ("timed", "u", 40, {
                let timed = |suite: &str, from: i64, to: i64| CaseAttempt {
                    suite_window: Some(SuiteWindow {
                        start: at(from),
                        end: at(to),
                    }),
                    ..case(suite, format!("{suite}1"), TestStatus::Passed, None)
                };
                vec![
                    timed("b", 3, 9),
                    case("none", "n".into(), TestStatus::Passed, None),
                    timed("a", 1, 4),
                    timed("a", 1, 4),
                ]
            }),
        ];
        for store in [&pg_store as &dyn TestResultStore, &lite] {
            for (id, upgrade, when, cases) in &runs {
                let run = NewRun {
                    run_id: (*id).into(),
                    upgrade_id: (*upgrade).into(),
                    cluster_name: "prod".into(),
                    phase: RunPhase::Post,
                    created_at: at(*when),
                    files: vec!["r.xml".into()],
                    artifact_ids: Vec::new(),
                };
                store
                    .record_run(&run, &mut |sink| {
                        for c in cases.clone() {
                            sink(c)?;
                        }
                        Ok(())
                    })
                    .unwrap();
            }
        }
        for id in ["r1", "r2", "r3", "other", "timed"] {
            for max in [128, 3, 0] {
                assert_eq!(
                    pg_store.test_run(id, max).unwrap(),
                    lite.test_run(id, max).unwrap(),
                    "{id}, {max} events"
                );
            }
        }
        let timed = pg_store.test_run("timed", 128).unwrap().unwrap();
        assert_eq!(
            timed.window,
            Some(SuiteWindow {
                start: at(1),
                end: at(9)
            })
        );
        assert_eq!(pg_store.test_run("r2", 128).unwrap().unwrap().window, None);
        let r1 = pg_store.test_run("r1", 128).unwrap().unwrap();
        assert_eq!(r1.failures.len(), 128);
        assert_eq!(r1.total_failures, 200);
        assert!(matches!(
            pg_store.test_run("nope", 128),
            Err(Error::NotFound { .. })
        ));
    }

    /// The seq of the child's `task.failed`.
    fn asks_first(s: &PostgresStore) -> u64 {
        ProgressStore::events(s, &crate::store::EventQuery::upgrade("u", 0, 10_000))
            .unwrap()
            .into_iter()
            .find(|e| e.kind == EventKind::TaskFailed && e.task_id.as_deref() == Some("c"))
            .unwrap()
            .seq
    }
}
