//! [`TraceSource`] over the SQLite store: what the OTLP sink reads when it delivers a span.
//! A task's history is its `prev_task_seq` chain (one primary-key read per event, newest
//! first, from the ending event back to the task's first); the upgrade's own events are an
//! index range of `events_by_upgrade`. Only events with `seq <= upto` count, so the answer for
//! a committed ending event never changes.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension};

use super::progress::{
    SqliteStore, TaskRow, event_row, from_micros, load_task, load_upgrade, type_code, upgrade_key,
};
use super::test_results::{RUN_COLUMNS, run_row, status_of};
use crate::error::{Error, Result};
use crate::model::{
    EventKind, ProgressEvent, SuiteWindow, Task, TestResult, TestRun, TestStatus, Upgrade,
};
use crate::notify::otlp::{
    MAX_EVENT_DETAILS, RunFacts, SpanAsk, SpanFacts, SpanHistory, TraceSource, cut, sample_indices,
};
use crate::store::ProgressStore;

impl TraceSource for SqliteStore {
    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade> {
        ProgressStore::upgrade(self, upgrade_id)
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
        self.read(|c| {
            let ukey = upgrade_key(c, upgrade_id)?;
            let row = match task_id {
                Some(t) => Some(load_task(c, ukey, upgrade_id, t)?),
                None => None,
            };
            history(c, ukey, upgrade_id, row.as_ref(), upto, max_events)
        })
    }

    /// The whole batch in one read transaction: one snapshot, and a page cache that stays warm
    /// from one statement to the next (outside a transaction each statement is its own, and
    /// SQLite drops the reader's cache whenever a commit came in between, which progress calls
    /// make all the time); each upgrade is read once.
    fn span_facts(&self, asks: &[SpanAsk<'_>], max_events: usize) -> Vec<Result<SpanFacts>> {
        let answered = self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let mut upgrades: HashMap<&str, (i64, Upgrade)> = HashMap::new();
            let mut out = Vec::with_capacity(asks.len());
            for a in asks {
                out.push(span_facts(&tx, &mut upgrades, a, max_events));
            }
            // Read only: ending it either way keeps nothing.
            tx.commit()?;
            Ok(out)
        });
        match answered {
            Ok(out) => out,
            Err(e) => {
                let message = e.to_string();
                asks.iter()
                    .map(|_| {
                        Err(Error::Backend {
                            message: message.clone(),
                            source: None,
                        })
                    })
                    .collect()
            }
        }
    }

    fn test_run(&self, run_id: &str, max_events: usize) -> Result<Option<RunFacts>> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let found = tx
                .prepare_cached(&format!(
                    "SELECT {RUN_COLUMNS}, rkey FROM test_runs WHERE run_id = ?1"
                ))?
                .query_row([run_id], |r| Ok((r.get::<_, i64>(15)?, run_row(r)?)))
                .optional()?;
            let Some((rkey, run)) = found else {
                return Err(Error::not_found(format!("test run {run_id:?}")));
            };
            let out = run_facts(&tx, rkey, run, max_events)?;
            tx.commit()?;
            Ok(Some(out))
        })
    }
}

/// A run's failing tests, sampled: one pass over them in (suite, class name, name) order,
/// keeping only the sampled ones (memory stays flat whatever the count), messages cut.
fn run_facts(c: &Connection, rkey: i64, run: TestRun, max_events: usize) -> Result<RunFacts> {
    let total = run.counts.failed.saturating_add(run.counts.errors);
    let keep = sample_indices(usize::try_from(total).unwrap_or(usize::MAX), max_events);
    let mut failures = Vec::with_capacity(keep.len());
    if !keep.is_empty() {
        let mut stmt = c.prepare_cached(
            "SELECT c.test_id, c.framework, c.suite, c.classname, c.name, r.status, \
             r.attempts, r.duration, substr(r.message, 1, ?4) \
             FROM test_results r JOIN test_cases c ON c.ckey = r.ckey \
             WHERE r.rkey = ?1 AND r.status IN (?2, ?3) \
             ORDER BY c.suite, c.classname, c.name",
        )?;
        let mut rows = stmt.query(rusqlite::params![
            rkey,
            TestStatus::Failed.code(),
            TestStatus::Error.code(),
            MAX_EVENT_DETAILS as i64 + 1
        ])?;
        let mut wanted = keep.iter().copied().peekable();
        let mut i = 0usize;
        while let Some(r) = rows.next()? {
            let Some(&next) = wanted.peek() else { break };
            if i == next {
                wanted.next();
                let message: Option<String> = r.get(8)?;
                failures.push(TestResult {
                    test_id: r.get(0)?,
                    framework: r.get(1)?,
                    suite: r.get(2)?,
                    classname: r.get(3)?,
                    name: r.get(4)?,
                    status: status_of(r.get(5)?),
                    attempts: r.get::<_, i64>(6)?.clamp(0, i64::from(u32::MAX)) as u32,
                    flaky: false,
                    duration: r.get(7)?,
                    message: message.map(cut),
                });
            }
            i += 1;
        }
    }
    // The longest suite's total time: suites may run in parallel.
    let lasted: f64 = c
        .prepare_cached(
            "SELECT coalesce(max(t), 0.0) FROM (SELECT total(r.duration) AS t \
             FROM test_results r JOIN test_cases c ON c.ckey = r.ckey \
             WHERE r.rkey = ?1 GROUP BY c.suite)",
        )?
        .query_row([rkey], |r| r.get(0))?;
    let window = c
        .prepare_cached("SELECT started_at, ended_at FROM test_runs WHERE rkey = ?1")?
        .query_row([rkey], |r| {
            Ok(
                match (r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?) {
                    (Some(start), Some(end)) => Some(SuiteWindow {
                        start: from_micros(start),
                        end: from_micros(end),
                    }),
                    _ => None,
                },
            )
        })?;
    Ok(RunFacts {
        run,
        failures,
        total_failures: total,
        lasted,
        window,
    })
}

/// [`TraceSource::span_facts`] of one ask, on `c` (inside the batch's read transaction).
fn span_facts<'a>(
    c: &Connection,
    upgrades: &mut HashMap<&'a str, (i64, Upgrade)>,
    a: &SpanAsk<'a>,
    max_events: usize,
) -> Result<SpanFacts> {
    let (ukey, upgrade) = match upgrades.get(a.upgrade_id) {
        Some(known) => known.clone(),
        None => {
            let row = load_upgrade(c, a.upgrade_id)?;
            upgrades.insert(a.upgrade_id, (row.ukey, row.upgrade.clone()));
            (row.ukey, row.upgrade)
        }
    };
    let row = match a.task_id {
        Some(t) => Some(load_task(c, ukey, a.upgrade_id, t)?),
        None => None,
    };
    let history = history(c, ukey, a.upgrade_id, row.as_ref(), a.upto, max_events)?;
    let task = row.map(|r| r.task);
    let parent_attempt = match task.as_ref().and_then(|t| t.parent_task_id.as_deref()) {
        Some(p) => Some(task_attempt(c, ukey, a.upgrade_id, p, clamp(a.upto))?.0),
        None => None,
    };
    Ok(SpanFacts {
        upgrade,
        task,
        history,
        parent_attempt,
    })
}

fn clamp(upto: u64) -> i64 {
    i64::try_from(upto).unwrap_or(i64::MAX)
}

/// One event read by seq without a join: [`event_row`]'s columns with the upgrade id, task id
/// and task type code bound as `?2..?4` (the caller knows them), then `tkey` and
/// `prev_task_seq`. The walk of a task's chain reads each event once with it.
const LEAN_EVENT: &str = "SELECT seq, event_id, ?2, ts, ?3, ?4, kind, status, message, details, \
     percentage, tkey, prev_task_seq FROM events WHERE seq = ?1";

/// [`TraceSource::span_history`] on `c`: of the task whose row is `task`, or of the upgrade.
fn history(
    c: &Connection,
    ukey: i64,
    upgrade_id: &str,
    task: Option<&TaskRow>,
    upto: u64,
    max_events: usize,
) -> Result<SpanHistory> {
    let upto = clamp(upto);
    let mut stmt = c.prepare_cached(LEAN_EVENT)?;
    let task_id = task.map(|t| t.task.task_id.as_str());
    let task_type = task.map(|t| type_code(t.task.task_type));
    let Some(row) = task else {
        let seqs = c
            .prepare_cached(
                "SELECT seq FROM events WHERE ukey = ?1 AND seq <= ?2 AND tkey IS NULL \
                 ORDER BY seq",
            )?
            .query_map([ukey, upto], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        return sampled(
            &mut stmt,
            (upgrade_id, task_id, task_type),
            0,
            &seqs,
            max_events,
        );
    };
    // The task's chain, newest first, from `upto` when it is this task's event (the usual
    // case: its ending event), else from the task's latest event, skipping what came after
    // `upto`. The attempt's events are built as they are read while they fit in
    // `max_events` (the usual case: one read per event); past that only their seqs are kept
    // and the sampled ones read again.
    let retried = EventKind::TaskRetried.code();
    let added = EventKind::TaskAdded.code();
    let first: Option<i64> = c
        .prepare_cached("SELECT tkey FROM events WHERE seq = ?1")?
        .query_row([upto], |r| r.get(0))
        .optional()?
        .flatten();
    let mut next = if first == Some(row.tkey) {
        Some(upto)
    } else {
        Some(row.last_event_seq).filter(|s| *s > 0)
    };
    let (mut seqs, mut kept) = (Vec::new(), Vec::new());
    let (mut attempt, mut in_attempt, mut overflow) = (0u32, true, false);
    while let Some(seq) = next {
        let wanted = seq <= upto && in_attempt && !overflow;
        let (kind, prev, event) = stmt.query_row(
            rusqlite::params![seq, upgrade_id, task_id, task_type],
            |r| {
                let kind: i64 = r.get(6)?;
                let event = if wanted && kind != added {
                    Some(event_row(r)?)
                } else {
                    None
                };
                Ok((kind, r.get::<_, Option<i64>>(12)?, event))
            },
        )?;
        next = prev;
        if seq > upto {
            continue;
        }
        if in_attempt && kind != added {
            seqs.push(seq);
            if let Some(e) = event {
                if kept.len() < max_events {
                    kept.push(e);
                } else {
                    overflow = true;
                    kept = Vec::new();
                }
            }
        }
        if kind == retried {
            attempt += 1;
            in_attempt = false;
        }
    }
    seqs.reverse();
    if overflow {
        return sampled(
            &mut stmt,
            (upgrade_id, task_id, task_type),
            attempt,
            &seqs,
            max_events,
        );
    }
    kept.reverse();
    Ok(SpanHistory {
        attempt,
        start: kept.first().map(|e| e.timestamp),
        total_events: seqs.len() as u64,
        events: kept,
    })
}

/// The history of the events `seqs` (oldest first): the first one's time, the sampled ones
/// read with `stmt` ([`LEAN_EVENT`]) under `ids`.
fn sampled(
    stmt: &mut rusqlite::CachedStatement<'_>,
    ids: (&str, Option<&str>, Option<i64>),
    attempt: u32,
    seqs: &[i64],
    max_events: usize,
) -> Result<SpanHistory> {
    let (upgrade_id, task_id, task_type) = ids;
    let mut read = |seq: i64| -> Result<ProgressEvent> {
        Ok(stmt.query_row(
            rusqlite::params![seq, upgrade_id, task_id, task_type],
            event_row,
        )?)
    };
    let start = match seqs.first() {
        Some(first) => Some(read(*first)?.timestamp),
        None => None,
    };
    let events = sample_indices(seqs.len(), max_events)
        .into_iter()
        .map(|i| read(seqs[i]))
        .collect::<Result<Vec<_>>>()?;
    Ok(SpanHistory {
        attempt,
        start,
        events,
        total_events: seqs.len() as u64,
    })
}

/// The attempt of task `task_id` running at `upto` (its `task.retried` events up to there) and
/// the seqs of that attempt's events, oldest first (`task.added` left out).
fn task_attempt(
    c: &Connection,
    ukey: i64,
    upgrade_id: &str,
    task_id: &str,
    upto: i64,
) -> Result<(u32, Vec<i64>)> {
    let row = load_task(c, ukey, upgrade_id, task_id)?;
    let mut link =
        c.prepare_cached("SELECT tkey, kind, prev_task_seq FROM events WHERE seq = ?1")?;
    // Start at `upto` when it is this task's event (the usual case: its ending event), else
    // at the task's latest event, skipping what came after `upto`.
    let at_upto: Option<(Option<i64>, i64, Option<i64>)> = link
        .query_row([upto], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let mut next = match at_upto {
        Some((Some(tkey), _, _)) if tkey == row.tkey => Some(upto),
        _ => Some(row.last_event_seq).filter(|s| *s > 0),
    };
    let retried = EventKind::TaskRetried.code();
    let added = EventKind::TaskAdded.code();
    let mut seqs = Vec::new();
    let mut attempt = 0u32;
    let mut in_attempt = true;
    while let Some(seq) = next {
        let (kind, prev): (i64, Option<i64>) =
            link.query_row([seq], |r| Ok((r.get(1)?, r.get(2)?)))?;
        next = prev;
        if seq > upto {
            continue;
        }
        if in_attempt && kind != added {
            seqs.push(seq);
        }
        if kind == retried {
            attempt += 1;
            in_attempt = false;
        }
    }
    seqs.reverse();
    Ok((attempt, seqs))
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use std::sync::Arc;

    use super::*;
    use crate::ProgressTracker;
    use crate::model::TaskType;
    use crate::store::domain::command::NewTask;
    use crate::store::sqlite::SqliteOptions;

    /// A task with 300 updates in its second attempt: the span gets 128 events, the attempt's
    /// first and last among them, evenly spaced, and the count of all; the first attempt's
    /// events stay out; the attempt is the number of retries before `upto`.
    #[test]
    fn long_attempts_are_sampled_and_attempts_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let t = ProgressTracker::new(store.clone());
        t.create_upgrade("u", "p", "c", Default::default()).unwrap();
        t.start_upgrade("u", None).unwrap();
        t.add_tasks("u", vec![NewTask::new("t", "T", TaskType::UpgradeStep)])
            .unwrap();
        t.start_task("u", "t", None).unwrap();
        let failed = t.fail_task("u", "t", "boom").unwrap().last_seq();
        t.retry_task("u", "t", None).unwrap();
        for i in 0..300 {
            t.update_task("u", "t", f64::from(i % 100), None, Default::default())
                .unwrap();
        }
        let done = t.complete_task("u", "t", None).unwrap().last_seq();
        let h = store.span_history("u", Some("t"), done, 128).unwrap();
        assert_eq!(h.attempt, 1);
        assert_eq!(h.total_events, 302, "retried + 300 updates + completed");
        assert_eq!(h.events.len(), 128);
        assert_eq!(h.events[0].kind, EventKind::TaskRetried);
        assert_eq!(h.events[127].kind, EventKind::TaskCompleted);
        assert_eq!(h.start, Some(h.events[0].timestamp));
        assert!(h.events.windows(2).all(|w| w[0].seq < w[1].seq));
        // The failed attempt, asked for later: still attempt 0, its own two events.
        let h = store.span_history("u", Some("t"), failed, 128).unwrap();
        assert_eq!(h.attempt, 0);
        let kinds: Vec<EventKind> = h.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::TaskStarted, EventKind::TaskFailed]);
    }

    /// Test runs for the trace, by id: a run's failing tests (failed and error, not passed,
    /// skipped or flaky) sampled to 128 in name order, the first and the last among them, all
    /// counted; long messages cut on a character boundary; an unknown id is `NotFound`.
    #[test]
    fn test_runs_are_read_with_their_failures_sampled() {
        use crate::model::{CaseAttempt, NewRun, RunPhase};
        use crate::store::TestResultStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let record = |id: &str, upgrade: &str, when: i64, cases: Vec<CaseAttempt>| {
            let run = NewRun {
                run_id: id.into(),
                upgrade_id: upgrade.into(),
                cluster_name: "prod".into(),
                phase: RunPhase::Post,
                created_at: at(when),
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
        };
        let case = |name: String, status: TestStatus, message: Option<String>| CaseAttempt {
            framework: "pytest".into(),
            suite: "smoke".into(),
            classname: "tests.api".into(),
            name,
            status,
            duration: 0.5,
            message,
            suite_window: None,
        };
        let mut cases = Vec::new();
        for i in 0..300 {
            let (status, message) = match i % 3 {
                0 => (TestStatus::Passed, None),
                1 => (TestStatus::Failed, Some(format!("é{}", "x".repeat(5000)))),
                _ => (TestStatus::Error, Some(format!("t{i:03} errored"))),
            };
            cases.push(case(format!("t{i:03}"), status, message));
        }
        cases.push(case(
            "t999".into(),
            TestStatus::Skipped,
            Some("skip".into()),
        ));
        record("r1", "u", 10, cases);
        record(
            "r2",
            "u",
            20,
            vec![case("ok".into(), TestStatus::Passed, None)],
        );
        record(
            "r3",
            "u",
            30,
            vec![case("late".into(), TestStatus::Failed, None)],
        );
        record(
            "other",
            "v",
            15,
            vec![case("x".into(), TestStatus::Failed, None)],
        );
        let runs = [
            store.test_run("r1", 128).unwrap().unwrap(),
            store.test_run("r2", 128).unwrap().unwrap(),
        ];
        assert_eq!(runs[0].run.run_id, "r1");
        let r1 = &runs[0];
        assert_eq!(r1.total_failures, 200);
        assert_eq!(r1.failures.len(), 128);
        assert_eq!(r1.failures[0].name, "t001");
        assert_eq!(r1.failures[127].name, "t299");
        assert!(r1.failures.windows(2).all(|w| w[0].name < w[1].name));
        assert!(r1.failures.iter().all(|t| t.status.is_failure()));
        let long = r1.failures[0].message.as_deref().unwrap();
        assert!(
            long.len() <= MAX_EVENT_DETAILS && long.ends_with('…'),
            "{long}"
        );
        assert!(long.starts_with("éxxx"));
        assert_eq!(
            r1.failures[127].message.as_deref(),
            Some("t299 errored"),
            "short messages whole"
        );
        assert_eq!(runs[1].total_failures, 0);
        assert!(runs[1].failures.is_empty());
        // One run by id; an unknown id is NotFound.
        let r3 = store.test_run("r3", 128).unwrap().unwrap();
        assert_eq!(r3.failures.len(), 1);
        assert!(matches!(
            store.test_run("nope", 128),
            Err(Error::NotFound { .. })
        ));
    }

    /// The batch answer (one read transaction) is what the single calls answer, ask by ask:
    /// a subtask under the second attempt of its parent, the parent, the root, and an ask for
    /// a task that does not exist (its own `NotFound`, the others unharmed).
    #[test]
    fn a_batch_answers_as_the_single_calls_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let t = ProgressTracker::new(store.clone());
        t.create_upgrade("u", "p", "c", Default::default()).unwrap();
        t.start_upgrade("u", None).unwrap();
        t.add_tasks(
            "u",
            vec![
                NewTask::new("p", "P", TaskType::UpgradeStep),
                NewTask::new("c", "C", TaskType::UpgradeStep).parent("p"),
            ],
        )
        .unwrap();
        t.start_task("u", "p", None).unwrap();
        t.fail_task("u", "p", "boom").unwrap();
        t.retry_task("u", "p", None).unwrap();
        if TraceSource::task(&*store, "u", "c").unwrap().status
            != crate::model::ProgressStatus::InProgress
        {
            t.start_task("u", "c", None).unwrap();
        }
        t.update_task("u", "c", 50.0, Some("half"), Default::default())
            .unwrap();
        let c_done = t.complete_task("u", "c", None).unwrap().last_seq();
        // The parent completes with its only child (its rollup).
        let u_done = t.complete_upgrade("u").unwrap().last_seq();
        let asks = [
            SpanAsk {
                upgrade_id: "u",
                task_id: Some("c"),
                upto: c_done,
            },
            SpanAsk {
                upgrade_id: "u",
                task_id: Some("nope"),
                upto: c_done,
            },
            SpanAsk {
                upgrade_id: "u",
                task_id: Some("p"),
                upto: u_done,
            },
            SpanAsk {
                upgrade_id: "u",
                task_id: None,
                upto: u_done,
            },
        ];
        let got = store.span_facts(&asks, 128);
        assert_eq!(got.len(), 4);
        assert!(
            matches!(got[1], Err(Error::NotFound { .. })),
            "{:?}",
            got[1]
        );
        let single = |a: &SpanAsk<'_>| SpanFacts {
            upgrade: TraceSource::upgrade(&*store, a.upgrade_id).unwrap(),
            task: a
                .task_id
                .map(|id| TraceSource::task(&*store, "u", id).unwrap()),
            history: store.span_history("u", a.task_id, a.upto, 128).unwrap(),
            parent_attempt: a
                .task_id
                .and_then(|id| TraceSource::task(&*store, "u", id).unwrap().parent_task_id)
                .map(|p| {
                    store
                        .span_history("u", Some(&p), a.upto, 0)
                        .unwrap()
                        .attempt
                }),
        };
        for i in [0, 2, 3] {
            assert_eq!(got[i].as_ref().unwrap(), &single(&asks[i]), "ask {i}");
        }
        let child = got[0].as_ref().unwrap();
        assert_eq!(
            child.parent_attempt,
            Some(1),
            "under the parent's second attempt"
        );
        let kinds: Vec<EventKind> = child.history.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds.last(), Some(&EventKind::TaskCompleted), "{kinds:?}");
        assert!(kinds.contains(&EventKind::TaskProgress), "{kinds:?}");
        let h = &got[2].as_ref().unwrap().history;
        let kinds: Vec<(u64, EventKind)> = h.events.iter().map(|e| (e.seq, e.kind)).collect();
        assert_eq!(h.attempt, 1, "{kinds:?}");
        assert_eq!(
            kinds.last().map(|k| k.1),
            Some(EventKind::TaskCompleted),
            "{kinds:?}"
        );
    }
}
