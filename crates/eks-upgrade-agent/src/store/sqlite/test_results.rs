//! The `TestResultStore` in the progress database (schema 9, 11).
//!
//! - `test_runs`: one row per run, with its counts; indexed by upgrade and by cluster, newest
//!   first. Schema 11 adds `started_at`/`ended_at` (microseconds): the earliest suite
//!   timestamp and the latest suite end of the run's reports, `NULL` when none gives one.
//! - `test_cases`: the identity dictionary (test id → framework, suite, class name, name), so a
//!   result row holds an integer key; indexed by name for `history`.
//! - `test_results`: one row per (run, test), attempts folded in place by an upsert as records
//!   stream in (memory stays flat whatever the report's size); indexed by (test, cluster, run),
//!   so a test's history on a cluster and its earlier passing durations are index walks.
//! - `test_stats`: per (cluster, test), the last pass, the last failure, the passes in a row
//!   since, and `both_at` (the older of the two), indexed, so the flaky tests of a window are a
//!   range of that index, not a scan of results; and the same three as they were before the
//!   latest run (`prev_*`), so a comparison can ask "flaky before this run?" without counting
//!   the run it judges.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde_json::json;

use super::progress::{SqliteStore, from_micros, micros};
use crate::error::{Error, Result};
use crate::model::{
    CaseAttempt, FLAKY_CLEARED_AFTER, FlakyTest, Gate, HistoryEntry, JsonMap, NewRun, RunCounts,
    RunPhase, RunQuery, SuiteWindow, TestResult, TestRun, TestStatus,
};
use crate::store::{AttemptSink, MAX_PAGE, TestResultStore};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS test_runs (
    rkey          INTEGER PRIMARY KEY,
    run_id        TEXT NOT NULL UNIQUE,
    upgrade_id    TEXT NOT NULL,
    cluster_name  TEXT NOT NULL,
    phase         INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    suites        TEXT NOT NULL,
    files         TEXT NOT NULL,
    artifact_ids  TEXT NOT NULL,
    tests         INTEGER NOT NULL DEFAULT 0,
    passed        INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    errors        INTEGER NOT NULL DEFAULT 0,
    skipped       INTEGER NOT NULL DEFAULT 0,
    flaky         INTEGER NOT NULL DEFAULT 0,
    duration      REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS test_runs_by_upgrade ON test_runs (upgrade_id, phase, rkey);
CREATE INDEX IF NOT EXISTS test_runs_by_cluster ON test_runs (cluster_name, rkey);
CREATE TABLE IF NOT EXISTS test_cases (
    ckey      INTEGER PRIMARY KEY,
    test_id   TEXT NOT NULL UNIQUE,
    framework TEXT NOT NULL,
    suite     TEXT NOT NULL,
    classname TEXT NOT NULL,
    name      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS test_cases_by_name ON test_cases (name);
CREATE TABLE IF NOT EXISTS test_results (
    rkey     INTEGER NOT NULL,
    ckey     INTEGER NOT NULL,
    cluster  TEXT NOT NULL,
    status   INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    fails    INTEGER NOT NULL,
    duration REAL NOT NULL,
    message  TEXT,
    PRIMARY KEY (rkey, ckey)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS test_results_by_test ON test_results (ckey, cluster, rkey);
CREATE TABLE IF NOT EXISTS test_stats (
    cluster      TEXT NOT NULL,
    ckey         INTEGER NOT NULL,
    last_pass_at INTEGER,
    last_fail_at INTEGER,
    pass_streak  INTEGER NOT NULL,
    message      TEXT,
    both_at      INTEGER,
    prev_pass_at INTEGER,
    prev_fail_at INTEGER,
    prev_streak  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, ckey)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS test_stats_flaky ON test_stats (cluster, both_at)
    WHERE both_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS test_stats_flaky_all ON test_stats (both_at)
    WHERE both_at IS NOT NULL;
"#;

/// Schema 11: the suite times of a run (N27). Each column is added unless the table has it
/// (as the `IF NOT EXISTS` of the earlier versions' DDL: a store whose version was set back
/// migrates again).
pub(super) fn schema_11(conn: &Connection) -> Result<()> {
    for column in ["started_at", "ended_at"] {
        let has: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('test_runs') WHERE name = ?1)",
            [column],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(&format!(
                "ALTER TABLE test_runs ADD COLUMN {column} INTEGER"
            ))?;
        }
    }
    Ok(())
}

pub(super) const RUN_COLUMNS: &str = "run_id, upgrade_id, cluster_name, phase, created_at, suites, files, \
                           artifact_ids, tests, passed, failed, errors, skipped, flaky, duration";

fn strings(text: String) -> Vec<String> {
    serde_json::from_str(&text).unwrap_or_default()
}

pub(super) fn run_row(r: &Row<'_>) -> rusqlite::Result<TestRun> {
    Ok(TestRun {
        run_id: r.get(0)?,
        upgrade_id: r.get(1)?,
        cluster_name: r.get(2)?,
        phase: RunPhase::from_code(r.get(3)?).unwrap_or(RunPhase::Adhoc),
        created_at: from_micros(r.get(4)?),
        suites: strings(r.get(5)?),
        files: strings(r.get(6)?),
        artifact_ids: strings(r.get(7)?),
        counts: RunCounts {
            tests: r.get::<_, i64>(8)? as u64,
            passed: r.get::<_, i64>(9)? as u64,
            failed: r.get::<_, i64>(10)? as u64,
            errors: r.get::<_, i64>(11)? as u64,
            skipped: r.get::<_, i64>(12)? as u64,
            flaky: r.get::<_, i64>(13)? as u64,
            duration: r.get(14)?,
        },
    })
}

pub(super) fn status_of(code: i64) -> TestStatus {
    TestStatus::from_code(code).unwrap_or(TestStatus::Error)
}

fn run_key(c: &Connection, run_id: &str) -> Result<(i64, TestRun)> {
    c.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS}, rkey FROM test_runs WHERE run_id = ?1"
    ))?
    .query_row([run_id], |r| Ok((r.get::<_, i64>(15)?, run_row(r)?)))
    .optional()?
    .ok_or_else(|| Error::not_found(format!("test run {run_id:?}")))
}

/// Stores one attempt, folding it into the run's result for its test.
fn fold_attempt(tx: &Transaction<'_>, rkey: i64, cluster: &str, a: &CaseAttempt) -> Result<()> {
    let id = a.test_id();
    let found: Option<i64> = tx
        .prepare_cached("SELECT ckey FROM test_cases WHERE test_id = ?1")?
        .query_row([&id], |r| r.get(0))
        .optional()?;
    let ckey = match found {
        Some(k) => k,
        None => {
            tx.prepare_cached(
                "INSERT INTO test_cases (test_id, framework, suite, classname, name) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, a.framework, a.suite, a.classname, a.name])?;
            tx.last_insert_rowid()
        }
    };
    tx.prepare_cached(
        "INSERT INTO test_results (rkey, ckey, cluster, status, attempts, fails, duration, message) \
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7) \
         ON CONFLICT (rkey, ckey) DO UPDATE SET status = excluded.status, \
         attempts = attempts + 1, fails = fails + excluded.fails, duration = excluded.duration, \
         message = coalesce(excluded.message, message)",
    )?
    .execute(params![
        rkey,
        ckey,
        cluster,
        a.status.code(),
        a.status.is_failure() as i64,
        a.duration,
        a.message
    ])?;
    Ok(())
}

/// Counts of a post run against a pre run, as the gate judges them.
fn gate_counts(tx: &Transaction<'_>, pre: i64, post: i64) -> Result<(u64, u64, u64)> {
    let changed = |to: TestStatus| -> Result<u64> {
        Ok(tx
            .prepare_cached(
                "SELECT count(*) FROM test_results a JOIN test_results b \
                 ON b.rkey = ?2 AND b.ckey = a.ckey \
                 WHERE a.rkey = ?1 AND a.status = ?3 AND b.status = ?4",
            )?
            .query_row(
                params![pre, post, TestStatus::Passed.code(), to.code()],
                |r| r.get::<_, i64>(0),
            )? as u64)
    };
    let missing = tx
        .prepare_cached(
            "SELECT count(*) FROM test_results a WHERE a.rkey = ?1 AND NOT EXISTS \
             (SELECT 1 FROM test_results b WHERE b.rkey = ?2 AND b.ckey = a.ckey)",
        )?
        .query_row(params![pre, post], |r| r.get::<_, i64>(0))? as u64;
    Ok((
        changed(TestStatus::Failed)?,
        changed(TestStatus::Error)?,
        missing,
    ))
}

fn check_new_run(run: &NewRun) -> Result<()> {
    for (what, v) in [
        ("run_id", &run.run_id),
        ("upgrade_id", &run.upgrade_id),
        ("cluster_name", &run.cluster_name),
    ] {
        if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "invalid {what} {v:?}: give 1 to 256 characters without control characters"
            )));
        }
    }
    Ok(())
}

/// Refuses a run naming a `deleted` artifact: its report was removed (as an orphan, by `gc`)
/// while the run was ingested. Read under the write lock, so no removal commits in between.
fn reports_live(tx: &Transaction<'_>, artifact_ids: &[String]) -> Result<()> {
    let mut stmt = tx.prepare_cached("SELECT status FROM artifacts WHERE artifact_id = ?1")?;
    let mut unmark = tx.prepare_cached(
        "UPDATE artifacts SET metadata = json_remove(metadata, '$.' || ?2) \
         WHERE artifact_id = ?1 AND json_valid(metadata) \
         AND json_type(metadata, '$.' || ?2) IS NOT NULL",
    )?;
    for id in artifact_ids {
        let status: Option<i64> = stmt.query_row([id], |r| r.get(0)).optional()?;
        if status == Some(crate::model::ArtifactStatus::Deleted.code()) {
            return Err(crate::store::report_deleted(id));
        }
        unmark.execute(params![id, crate::store::PENDING_RUN_KEY])?;
    }
    Ok(())
}

impl TestResultStore for SqliteStore {
    fn record_run(
        &self,
        run: &NewRun,
        source: &mut dyn FnMut(&mut AttemptSink<'_>) -> Result<()>,
    ) -> Result<TestRun> {
        check_new_run(run)?;
        let out = self.write(|tx| {
            let taken: bool = tx
                .prepare_cached("SELECT 1 FROM test_runs WHERE run_id = ?1")?
                .query_row([&run.run_id], |_| Ok(true))
                .optional()?
                .unwrap_or(false);
            if taken {
                return Err(Error::AlreadyExists {
                    what: format!("test run {:?}", run.run_id),
                });
            }
            reports_live(tx, &run.artifact_ids)?;
            let at = micros(run.created_at);
            tx.prepare_cached(
                "INSERT INTO test_runs (run_id, upgrade_id, cluster_name, phase, created_at, \
                 suites, files, artifact_ids) VALUES (?1, ?2, ?3, ?4, ?5, '[]', ?6, ?7)",
            )?
            .execute(params![
                run.run_id,
                run.upgrade_id,
                run.cluster_name,
                run.phase.code(),
                at,
                serde_json::to_string(&run.files).unwrap_or_default(),
                serde_json::to_string(&run.artifact_ids).unwrap_or_default(),
            ])?;
            let rkey = tx.last_insert_rowid();
            let mut suites = BTreeSet::new();
            let mut window: Option<SuiteWindow> = None;
            source(&mut |a: CaseAttempt| {
                if !suites.contains(&a.suite) {
                    suites.insert(a.suite.clone());
                }
                if let Some(w) = a.suite_window {
                    window = Some(window.map_or(w, |x| x.union(w)));
                }
                fold_attempt(tx, rkey, &run.cluster_name, &a)
            })?;
            tx.prepare_cached(
                "UPDATE test_runs SET suites = ?2, started_at = ?3, ended_at = ?4, (tests, passed, failed, errors, skipped, flaky, \
                 duration) = (SELECT count(*), coalesce(sum(status = 0), 0), \
                 coalesce(sum(status = 1), 0), coalesce(sum(status = 2), 0), \
                 coalesce(sum(status = 3), 0), coalesce(sum(status = 0 AND fails > 0), 0), \
                 total(duration) FROM test_results WHERE rkey = ?1) WHERE rkey = ?1",
            )?
            .execute(params![
                rkey,
                serde_json::to_string(&suites).unwrap_or_default(),
                window.map(|w| micros(w.start)),
                window.map(|w| micros(w.end)),
            ])?;
            // Per-cluster flaky statistics: a pass extends the streak; a failure, or a pass
            // only on a retry, resets it and counts as failing.
            tx.prepare_cached(
                "INSERT INTO test_stats (cluster, ckey, last_pass_at, last_fail_at, pass_streak, \
                 message, both_at) \
                 SELECT ?2, ckey, \
                   CASE WHEN status = 0 THEN ?3 END, \
                   CASE WHEN status IN (1, 2) OR fails > 0 THEN ?3 END, \
                   CASE WHEN status = 0 AND fails = 0 THEN 1 ELSE 0 END, \
                   CASE WHEN status IN (1, 2) OR fails > 0 THEN message END, \
                   CASE WHEN status = 0 AND fails > 0 THEN ?3 END \
                 FROM test_results WHERE rkey = ?1 AND status != 3 \
                 ON CONFLICT (cluster, ckey) DO UPDATE SET \
                   prev_pass_at = CASE WHEN excluded.last_pass_at IS NULL THEN prev_pass_at \
                                  ELSE last_pass_at END, \
                   prev_fail_at = CASE WHEN excluded.last_fail_at IS NULL THEN prev_fail_at \
                                  ELSE last_fail_at END, \
                   prev_streak = pass_streak, \
                   last_pass_at = coalesce(excluded.last_pass_at, last_pass_at), \
                   last_fail_at = coalesce(excluded.last_fail_at, last_fail_at), \
                   pass_streak = CASE WHEN excluded.pass_streak = 1 THEN pass_streak + 1 ELSE 0 END, \
                   message = coalesce(excluded.message, message), \
                   both_at = min(coalesce(excluded.last_pass_at, last_pass_at), \
                                 coalesce(excluded.last_fail_at, last_fail_at))",
            )?
            .execute(params![rkey, run.cluster_name, at])?;
            let (_, stored) = run_key(tx, &run.run_id)?;
            if run.phase == RunPhase::Post {
                notify_gate(tx, rkey, &stored)?;
            }
            notify_trace(tx, &stored)?;
            Ok(stored)
        })?;
        Ok(out)
    }

    fn resolve_run(&self, abbrev: &str) -> Result<String> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT run_id FROM test_runs WHERE run_id >= ?1 ORDER BY run_id LIMIT 11",
            )?;
            let ids: Vec<String> = stmt
                .query_map([abbrev], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<_>>()?;
            if ids.first().is_some_and(|i| i == abbrev) {
                return Ok(abbrev.to_owned());
            }
            let matching: Vec<&String> = ids.iter().filter(|i| i.starts_with(abbrev)).collect();
            match matching.as_slice() {
                [one] if abbrev.len() >= 4 => Ok((*one).clone()),
                [] | [_] => Err(Error::not_found(format!("test run {abbrev:?}"))),
                many => Err(Error::invalid(format!(
                    "test run {abbrev:?} is ambiguous: it starts {}; give more characters",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        })
    }

    fn run(&self, run_id: &str) -> Result<TestRun> {
        self.read(|c| Ok(run_key(c, run_id)?.1))
    }

    fn runs(&self, q: &RunQuery) -> Result<Vec<TestRun>> {
        let limit = match q.limit {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(Error::invalid(format!(
                    "limit {n} is too large: give at most {MAX_PAGE}"
                )));
            }
            n => n,
        };
        self.read(|c| {
            let phase = q.phase.map(|p| p.code());
            let (sql, key) = match (&q.upgrade_id, &q.cluster_name) {
                (Some(u), _) => (
                    "FROM test_runs INDEXED BY test_runs_by_upgrade WHERE upgrade_id = ?1 \
                     AND (?2 IS NULL OR cluster_name = ?2)",
                    Some(u.clone()),
                ),
                (None, Some(cl)) => (
                    "FROM test_runs INDEXED BY test_runs_by_cluster WHERE cluster_name = ?1 \
                     AND (?2 IS NULL OR ?2 = ?1)",
                    Some(cl.clone()),
                ),
                (None, None) => ("FROM test_runs WHERE ?1 IS NULL AND ?2 IS NULL", None),
            };
            let sql = format!(
                "SELECT {RUN_COLUMNS} {sql} AND (?3 IS NULL OR phase = ?3) ORDER BY rkey DESC LIMIT ?4"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(
                    params![
                        key,
                        if q.upgrade_id.is_some() {
                            q.cluster_name.clone()
                        } else {
                            None
                        },
                        phase,
                        limit as i64
                    ],
                    run_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn latest_run(&self, upgrade_id: &str, phase: RunPhase) -> Result<Option<TestRun>> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM test_runs WHERE upgrade_id = ?1 AND phase = ?2 \
                 ORDER BY rkey DESC LIMIT 1"
            ))?
            .query_row(params![upgrade_id, phase.code()], run_row)
            .optional()?)
        })
    }

    fn results(&self, run_id: &str, failing_only: bool) -> Result<Vec<TestResult>> {
        self.read(|c| {
            let (rkey, _) = run_key(c, run_id)?;
            let mut stmt = c.prepare_cached(
                "SELECT c.test_id, c.framework, c.suite, c.classname, c.name, r.status, \
                 r.attempts, r.fails, r.duration, r.message \
                 FROM test_results r JOIN test_cases c ON c.ckey = r.ckey \
                 WHERE r.rkey = ?1 AND (?2 = 0 OR r.status IN (1, 2)) \
                 ORDER BY c.suite, c.classname, c.name",
            )?;
            let rows = stmt
                .query_map(params![rkey, failing_only as i64], |r| {
                    let status = status_of(r.get(5)?);
                    Ok(TestResult {
                        test_id: r.get(0)?,
                        framework: r.get(1)?,
                        suite: r.get(2)?,
                        classname: r.get(3)?,
                        name: r.get(4)?,
                        status,
                        attempts: r.get::<_, i64>(6)? as u32,
                        flaky: status == TestStatus::Passed && r.get::<_, i64>(7)? > 0,
                        duration: r.get(8)?,
                        message: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn history(
        &self,
        name: &str,
        cluster_name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        let limit = match limit {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(Error::invalid(format!(
                    "limit {n} is too large: give at most {MAX_PAGE}"
                )));
            }
            n => n,
        };
        self.read(|c| {
            // With a cluster, the seek is on (test, cluster) of the index, not a filter of
            // every result of the test.
            let on = match cluster_name {
                Some(_) => "r.ckey = c.ckey AND r.cluster = ?2",
                None => "r.ckey = c.ckey AND ?2 IS NULL",
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT u.run_id, u.upgrade_id, u.cluster_name, u.phase, u.created_at, c.test_id, \
                 c.suite, c.classname, c.name, r.status, r.attempts, r.fails, r.duration, r.message \
                 FROM test_cases c \
                 JOIN test_results r INDEXED BY test_results_by_test ON {on} \
                 JOIN test_runs u ON u.rkey = r.rkey \
                 WHERE c.ckey IN (SELECT ckey FROM test_cases WHERE name = ?1 \
                                  UNION SELECT ckey FROM test_cases WHERE test_id = ?1) \
                 ORDER BY r.rkey DESC LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![name, cluster_name, limit as i64], |r| {
                    let status = status_of(r.get(9)?);
                    Ok(HistoryEntry {
                        run_id: r.get(0)?,
                        upgrade_id: r.get(1)?,
                        cluster_name: r.get(2)?,
                        phase: RunPhase::from_code(r.get(3)?).unwrap_or(RunPhase::Adhoc),
                        created_at: from_micros(r.get(4)?),
                        test_id: r.get(5)?,
                        suite: r.get(6)?,
                        classname: r.get(7)?,
                        name: r.get(8)?,
                        status,
                        attempts: r.get::<_, i64>(10)? as u32,
                        flaky: status == TestStatus::Passed && r.get::<_, i64>(11)? > 0,
                        duration: r.get(12)?,
                        message: r.get(13)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn flaky(&self, cluster_name: Option<&str>, since: DateTime<Utc>) -> Result<Vec<FlakyTest>> {
        self.read(|c| {
            let from = match cluster_name {
                Some(_) => {
                    "FROM test_stats s INDEXED BY test_stats_flaky \
                     JOIN test_cases c ON c.ckey = s.ckey WHERE s.cluster = ?1"
                }
                None => {
                    "FROM test_stats s INDEXED BY test_stats_flaky_all \
                     JOIN test_cases c ON c.ckey = s.ckey WHERE ?1 IS NULL"
                }
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT s.cluster, c.test_id, c.framework, c.suite, c.classname, c.name, \
                 s.last_pass_at, s.last_fail_at, s.pass_streak, s.message {from} \
                 AND s.both_at IS NOT NULL AND s.both_at >= ?2 AND s.pass_streak < ?3 \
                 ORDER BY s.cluster, c.suite, c.classname, c.name"
            ))?;
            let rows = stmt
                .query_map(
                    params![cluster_name, micros(since), FLAKY_CLEARED_AFTER as i64],
                    |r| {
                        Ok(FlakyTest {
                            cluster_name: r.get(0)?,
                            test_id: r.get(1)?,
                            framework: r.get(2)?,
                            suite: r.get(3)?,
                            classname: r.get(4)?,
                            name: r.get(5)?,
                            last_passed_at: from_micros(r.get(6)?),
                            last_failed_at: from_micros(r.get(7)?),
                            passes_since: r.get::<_, i64>(8)? as u32,
                            message: r.get(9)?,
                        })
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn flaky_before(&self, run_id: &str, since: DateTime<Utc>) -> Result<HashSet<String>> {
        self.read(|c| {
            let (_, run) = run_key(c, run_id)?;
            let at = micros(run.created_at);
            let mut stmt = c.prepare_cached(
                "SELECT c.test_id FROM test_stats s INDEXED BY test_stats_flaky \
                 JOIN test_cases c ON c.ckey = s.ckey \
                 WHERE s.cluster = ?1 AND s.both_at IS NOT NULL AND s.both_at >= ?2 \
                 AND (CASE WHEN s.last_pass_at = ?3 THEN s.prev_pass_at ELSE s.last_pass_at END) >= ?2 \
                 AND (CASE WHEN s.last_fail_at = ?3 THEN s.prev_fail_at ELSE s.last_fail_at END) >= ?2 \
                 AND (CASE WHEN s.last_pass_at = ?3 OR s.last_fail_at = ?3 THEN s.prev_streak \
                      ELSE s.pass_streak END) < ?4",
            )?;
            let ids = stmt
                .query_map(
                    params![run.cluster_name, micros(since), at, FLAKY_CLEARED_AFTER as i64],
                    |r| r.get::<_, String>(0),
                )?
                .collect::<rusqlite::Result<HashSet<_>>>()?;
            Ok(ids)
        })
    }

    fn passing_durations(
        &self,
        cluster_name: &str,
        before_run: &str,
        test_ids: &[&str],
        limit: usize,
    ) -> Result<HashMap<String, Vec<f64>>> {
        self.read(|c| {
            let (rkey, _) = run_key(c, before_run)?;
            let mut stmt = c.prepare_cached(
                "SELECT r.duration FROM test_cases c \
                 JOIN test_results r INDEXED BY test_results_by_test \
                   ON r.ckey = c.ckey AND r.cluster = ?2 AND r.rkey < ?3 \
                 WHERE c.test_id = ?1 AND r.status = 0 ORDER BY r.rkey DESC LIMIT ?4",
            )?;
            let mut out = HashMap::new();
            for id in test_ids {
                let d: Vec<f64> = stmt
                    .query_map(params![id, cluster_name, rkey, limit as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                out.insert((*id).to_owned(), d);
            }
            Ok(out)
        })
    }
}

/// In every run's transaction: the trace-only notification of the run (its span, for the OTLP
/// sink), whatever its phase and result, whenever recorded.
fn notify_trace(tx: &Transaction<'_>, run: &TestRun) -> Result<()> {
    let seq: i64 = tx
        .prepare_cached("SELECT last_seq FROM upgrades WHERE upgrade_id = ?1")?
        .query_row([&run.upgrade_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let (event_id, d) = crate::store::notification::run_trace(run, seq);
    super::outbox::enqueue_detail(
        tx,
        &event_id,
        seq,
        &run.upgrade_id,
        crate::notify::TEST_RUN_TRACE,
        run.created_at,
        &d,
    )
}

/// In a post run's transaction: when it fails the gate against the upgrade's latest pre run,
/// the `upgrade.validation_failed` notification goes to the outbox.
fn notify_gate(tx: &Transaction<'_>, post: i64, run: &TestRun) -> Result<()> {
    let pre: Option<(i64, String)> = tx
        .prepare_cached(
            "SELECT rkey, run_id FROM test_runs WHERE upgrade_id = ?1 AND phase = ?2 \
             AND rkey < ?3 ORDER BY rkey DESC LIMIT 1",
        )?
        .query_row(params![run.upgrade_id, RunPhase::Pre.code(), post], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((pre, pre_id)) = pre else {
        return Ok(());
    };
    let (new_failures, new_errors, missing) = gate_counts(tx, pre, post)?;
    let gate = Gate::judge(new_failures, new_errors, missing);
    if gate.passed {
        return Ok(());
    }
    let seq: i64 = tx
        .prepare_cached("SELECT last_seq FROM upgrades WHERE upgrade_id = ?1")?
        .query_row([&run.upgrade_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let mut d = JsonMap::new();
    d.insert("event_id".into(), json!(run.run_id));
    d.insert("seq".into(), json!(seq));
    d.insert("upgrade_id".into(), json!(run.upgrade_id));
    d.insert("cluster_name".into(), json!(run.cluster_name));
    d.insert("run_id".into(), json!(run.run_id));
    d.insert("pre_run_id".into(), json!(pre_id));
    d.insert("new_failures".into(), json!(new_failures));
    d.insert("new_errors".into(), json!(new_errors));
    d.insert("missing".into(), json!(missing));
    d.insert("reasons".into(), json!(gate.reasons));
    d.insert("tests".into(), json!(run.counts.tests));
    d.insert("failed".into(), json!(run.counts.failed));
    d.insert("errors".into(), json!(run.counts.errors));
    d.insert("timestamp".into(), json!(run.created_at));
    super::outbox::enqueue_detail(
        tx,
        &run.run_id,
        seq,
        &run.upgrade_id,
        "upgrade.validation_failed",
        run.created_at,
        &d,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::TestArtifactsManager;
    use crate::model::RunPhase;
    use crate::results::conformance::attempt;
    use crate::results::{Ingest, KeepFiles, TestResults};
    use crate::store::sqlite::SqliteOptions;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::results::conformance::run(&|| {
            let sub = dir.path().join(uuid::Uuid::now_v7().to_string());
            let store = Arc::new(SqliteStore::open(&sub, &SqliteOptions::default()).unwrap());
            (store.clone(), Some(store))
        });
    }

    /// A store of schema 8 (before test results) gets the schema 9 tables when opened, and
    /// keeps what it held.
    #[test]
    fn schema_8_store_migrates() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
            store
                .writer()
                .execute_batch(
                    "DROP TABLE test_runs; DROP TABLE test_cases; DROP TABLE test_results; \
                     DROP TABLE test_stats; DROP TABLE task_history; PRAGMA user_version = 8;",
                )
                .unwrap();
        }
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let v: i64 = store
            .reader()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, super::super::schema::SCHEMA_VERSION);
        let r = TestResults::new(store);
        let run = r
            .record(
                &Ingest::new("u", "c", RunPhase::Pre),
                vec![],
                vec![],
                &mut vec![attempt("a", TestStatus::Passed, 1.0)].into_iter(),
            )
            .unwrap();
        assert_eq!(run.counts.tests, 1);
    }

    /// N27: a store of schema 10 (runs without suite times) gets the suite time columns when
    /// opened; its runs keep their rows (no times: their spans fall back to the test times), a
    /// new run stores its suites' window, and both read back through the trace source.
    #[test]
    fn schema_10_store_migrates() {
        use crate::model::SuiteWindow;
        use crate::notify::otlp::TraceSource;
        let dir = tempfile::tempdir().unwrap();
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        {
            let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
            store
                .writer()
                .execute_batch(
                    "ALTER TABLE test_runs DROP COLUMN started_at; \
                     ALTER TABLE test_runs DROP COLUMN ended_at; PRAGMA user_version = 10;",
                )
                .unwrap();
            store
                .writer()
                .execute_batch(
                    "INSERT INTO test_runs (run_id, upgrade_id, cluster_name, phase, created_at, \
                     suites, files, artifact_ids, tests, passed) \
                     VALUES ('old', 'u', 'c', 0, 1800000010000000, '[\"smoke\"]', '[]', '[]', 1, 1)",
                )
                .unwrap();
        }
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let v: i64 = store
            .reader()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, super::super::schema::SCHEMA_VERSION);
        let old = store.test_run("old", 128).unwrap().unwrap();
        assert_eq!((old.run.counts.tests, old.window), (1, None));
        let window = SuiteWindow {
            start: at(1),
            end: at(5),
        };
        store
            .record_run(
                &NewRun {
                    run_id: "new".into(),
                    upgrade_id: "u".into(),
                    cluster_name: "c".into(),
                    phase: RunPhase::Post,
                    created_at: at(10),
                    files: Vec::new(),
                    artifact_ids: Vec::new(),
                },
                &mut |sink| {
                    sink(CaseAttempt {
                        suite_window: Some(window),
                        ..attempt("a", TestStatus::Passed, 2.0)
                    })
                },
            )
            .unwrap();
        assert_eq!(
            store.test_run("new", 128).unwrap().unwrap().window,
            Some(window)
        );
    }

    /// N28: a store that recorded a run (and so wrote a `trace.test_run` outbox entry) is at
    /// schema 11 or later, which builds of schema 10 and older refuse (as this build refuses a
    /// newer one), so they never hand those entries to EventBridge or webhooks after a
    /// downgrade.
    #[test]
    fn a_store_with_trace_entries_is_refused_by_older_builds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
            TestResults::new(store.clone())
                .record(
                    &Ingest::new("u", "c", RunPhase::Pre),
                    vec![],
                    vec![],
                    &mut vec![attempt("a", TestStatus::Passed, 1.0)].into_iter(),
                )
                .unwrap();
            let entries: i64 = store
                .reader()
                .query_row(
                    "SELECT count(*) FROM notifications WHERE detail_type = 'trace.test_run'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(entries, 1);
            let v: i64 = store
                .reader()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert!(v >= 11, "schema {v}: a build of schema 10 would open it");
            store
                .writer()
                .pragma_update(None, "user_version", v + 1)
                .unwrap();
        }
        let err = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap_err();
        let newer = super::super::schema::SCHEMA_VERSION + 1;
        assert!(
            err.to_string()
                .contains(&format!("newer version (schema {newer}")),
            "{err}"
        );
    }

    /// A store, its artifacts manager and test results over it.
    fn kept_store(dir: &std::path::Path) -> (Arc<SqliteStore>, TestArtifactsManager, TestResults) {
        let store = Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap());
        let blobs = Arc::new(
            crate::blob::LocalBlobStore::open(&dir.join("blobs"), Default::default()).unwrap(),
        );
        let m = TestArtifactsManager::new(store.clone(), blobs, Default::default());
        (store.clone(), m, TestResults::new(store))
    }

    fn keep(m: &TestArtifactsManager) -> KeepFiles<'_> {
        KeepFiles {
            artifacts: m,
            session_id: None,
            collection_id: None,
            options: None,
        }
    }

    /// T13: undoing a failed ingest deletes only its own artifacts; the session it created
    /// goes only when nothing live is left in it (a concurrent ingest's acknowledged file in
    /// the same session keeps the session and the file).
    #[test]
    fn undoing_an_ingest_keeps_a_concurrent_ingests_files() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, m, _r) = kept_store(dir.path());
        let s = m
            .create_session(crate::artifacts::NewSession {
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                ..Default::default()
            })
            .unwrap();
        let c = m
            .create_collection(&s.session_id, "validation", None, None)
            .unwrap();
        let add = |name: &str| {
            m.add_bytes(
                &s.session_id,
                &c.collection_id,
                name.as_bytes(),
                name,
                &Default::default(),
            )
            .unwrap()
            .artifact_id
        };
        let mine = add("mine.xml");
        let theirs = add("theirs.xml");
        let kept = crate::results::Kept {
            session: Some(s.session_id.clone()),
            artifacts: vec![mine.clone()],
        };
        kept.undo(&m);
        assert!(
            !m.exists(&mine).unwrap(),
            "the failed ingest's file is left"
        );
        assert!(
            m.exists(&theirs).unwrap(),
            "the concurrent ingest's file was deleted"
        );
        assert_eq!(
            m.sessions(None).unwrap().len(),
            1,
            "the session was deleted"
        );
        // Once nothing live is left, the session goes.
        crate::results::Kept {
            session: Some(s.session_id.clone()),
            artifacts: vec![theirs],
        }
        .undo(&m);
        assert!(
            m.sessions(None).unwrap().is_empty(),
            "the empty session was left"
        );
    }

    const REPORT: &str =
        r#"<testsuite name="smoke"><testcase classname="api" name="health"/></testsuite>"#;

    /// T13: an ingest whose artifact cannot be named (a control character in the file name,
    /// refused by `sanitize_name`) fails before anything is stored: no session, no collection,
    /// no artifact, no run.
    #[test]
    fn a_refused_file_name_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, m, r) = kept_store(dir.path());
        let report = dir.path().join("smoke\u{1}.xml");
        std::fs::write(&report, REPORT).unwrap();
        let e = r
            .ingest(
                &[report],
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
        assert!(e.to_string().contains("control character"), "{e}");
        assert!(
            m.sessions(None).unwrap().is_empty(),
            "a session was created"
        );
        assert!(r.runs(&RunQuery::default()).unwrap().is_empty());
    }

    /// G121: the ingest's mark is reserved: a user's add (every public add of the manager,
    /// which the CLI, the HTTP API and the Python package go through) or an ingest whose
    /// options carry it is refused, naming the key, and stores nothing; the ingest's own
    /// mark is still set (and removed when its run is recorded).
    #[test]
    fn a_users_metadata_may_not_carry_the_ingest_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, m, r) = kept_store(dir.path());
        let key = crate::store::PENDING_RUN_KEY;
        let opts = crate::artifacts::AddOptions {
            metadata: serde_json::from_value(serde_json::json!({ key: "x" })).unwrap(),
            ..Default::default()
        };
        let refused = |e: Error| {
            assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
            assert!(e.to_string().contains(key), "{e}");
            assert!(e.to_string().contains("reserved"), "{e}");
        };
        let report = dir.path().join("r.xml");
        std::fs::write(&report, REPORT).unwrap();
        refused(
            r.ingest(
                std::slice::from_ref(&report),
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(KeepFiles {
                    options: Some(&opts),
                    ..keep(&m)
                }),
            )
            .unwrap_err(),
        );
        assert!(
            m.sessions(None).unwrap().is_empty(),
            "a session was created"
        );
        assert!(r.runs(&RunQuery::default()).unwrap().is_empty());

        let s = m
            .create_session(crate::artifacts::NewSession {
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                ..Default::default()
            })
            .unwrap();
        let c = m
            .create_collection(&s.session_id, "logs", None, None)
            .unwrap();
        let (sid, cid) = (&s.session_id, &c.collection_id);
        refused(m.add_bytes(sid, cid, b"x", "a.log", &opts).unwrap_err());
        refused(
            m.add_path(sid, cid, &report, &opts, &mut |_| {})
                .unwrap_err(),
        );
        refused(
            m.add_many_bytes(sid, cid, &[("b.log".into(), b"y".to_vec(), opts.clone())])
                .unwrap_err(),
        );
        assert_eq!(m.session_summary(sid).unwrap().total_artifacts, 0);

        // The ingest still marks its reports until the run is recorded.
        let run = r
            .ingest(
                std::slice::from_ref(&report),
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap();
        let a = m.artifact(&run.artifact_ids[0]).unwrap();
        assert!(!a.metadata.contains_key(key), "{:?}", a.metadata);
    }

    /// T13: when recording the run fails after the files were kept (a store error), the kept
    /// files are removed again: the artifacts are deleted (their blobs released) and the
    /// session the ingest created is gone; with a session that existed, its artifacts are all
    /// `deleted`.
    #[test]
    fn a_failed_record_removes_the_kept_files() {
        let dir = tempfile::tempdir().unwrap();
        let (store, m, r) = kept_store(dir.path());
        let report = dir.path().join("smoke.xml");
        std::fs::write(&report, REPORT).unwrap();
        store
            .writer()
            .execute_batch(
                "CREATE TRIGGER boom BEFORE INSERT ON test_runs \
                 BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END",
            )
            .unwrap();
        let e = r
            .ingest(
                std::slice::from_ref(&report),
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap_err();
        assert!(format!("{e:?}").contains("disk full (test)"), "{e:?}");
        assert!(m.sessions(None).unwrap().is_empty(), "the session was left");
        let s = m
            .create_session(crate::artifacts::NewSession {
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                ..Default::default()
            })
            .unwrap();
        r.ingest(
            std::slice::from_ref(&report),
            &Ingest::new("u1", "prod", RunPhase::Pre),
            Some(keep(&m)),
        )
        .unwrap_err();
        let left = m
            .search(&crate::model::ArtifactQuery {
                session_id: Some(s.session_id.clone()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(
            left.iter()
                .all(|a| a.status == crate::model::ArtifactStatus::Deleted),
            "{left:?}"
        );
        assert!(!m.exists(&left[0].artifact_id).unwrap());
        assert!(r.runs(&RunQuery::default()).unwrap().is_empty());
        // Once the store works again the same ingest succeeds.
        store.writer().execute_batch("DROP TRIGGER boom").unwrap();
        let run = r
            .ingest(
                &[report],
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap();
        assert_eq!(run.artifact_ids.len(), 1);
        assert!(m.exists(&run.artifact_ids[0]).unwrap());
    }

    /// A blob store whose puts fail from the `fail_at`-th on (1-based).
    #[derive(Debug)]
    struct FailingPuts {
        inner: crate::blob::LocalBlobStore,
        puts: std::sync::atomic::AtomicUsize,
        fail_at: usize,
    }

    impl crate::blob::BlobStore for FailingPuts {
        fn put(
            &self,
            reader: &mut dyn std::io::Read,
            progress: &mut dyn FnMut(u64),
        ) -> Result<crate::blob::BlobInfo> {
            let n = 1 + self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n >= self.fail_at {
                return Err(Error::Backend {
                    message: "the bucket is unreachable (test)".into(),
                    source: None,
                });
            }
            self.inner.put(reader, progress)
        }
        fn open(&self, d: &crate::blob::Digest) -> Result<Box<dyn std::io::Read + Send>> {
            self.inner.open(d)
        }
        fn exists(&self, d: &crate::blob::Digest) -> Result<bool> {
            self.inner.exists(d)
        }
        fn size(&self, d: &crate::blob::Digest) -> Result<u64> {
            self.inner.size(d)
        }
        fn delete(&self, d: &crate::blob::Digest) -> Result<bool> {
            self.inner.delete(d)
        }
        fn list(&self, f: &mut dyn FnMut(crate::blob::BlobMeta) -> Result<()>) -> Result<()> {
            self.inner.list(f)
        }
        fn delete_if_older(
            &self,
            d: &crate::blob::Digest,
            cutoff: std::time::SystemTime,
        ) -> Result<bool> {
            self.inner.delete_if_older(d, cutoff)
        }
    }

    /// A store whose artifacts manager's puts fail from the `fail_at`-th on.
    fn failing_store(dir: &std::path::Path, fail_at: usize) -> (TestArtifactsManager, TestResults) {
        let store = Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap());
        let blobs = Arc::new(FailingPuts {
            inner: crate::blob::LocalBlobStore::open(&dir.join("blobs"), Default::default())
                .unwrap(),
            puts: Default::default(),
            fail_at,
        });
        let m = TestArtifactsManager::new(store.clone(), blobs, Default::default());
        (m, TestResults::new(store))
    }

    /// The artifacts of the store that are live.
    fn live(m: &TestArtifactsManager) -> Vec<crate::model::TestArtifact> {
        m.search(&crate::model::ArtifactQuery {
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .filter(|a| a.status != crate::model::ArtifactStatus::Deleted)
        .collect()
    }

    /// T13: a failure after some of a run's files were indexed undoes every one of them: (1)
    /// the second of two files is indexed and the first, an earlier run's name and bytes, cannot
    /// be kept again under this run's name; (2) 257 files, the first batch of 256 indexed,
    /// the last put fails. Nothing of the failed ingest stays live, no run is recorded.
    #[test]
    fn a_failure_after_some_files_were_indexed_leaves_none_live() {
        let dir = tempfile::tempdir().unwrap();
        let (m, r) = failing_store(dir.path(), 4);
        let (a, b) = (dir.path().join("a.xml"), dir.path().join("b.xml"));
        std::fs::write(&a, REPORT).unwrap();
        std::fs::write(&b, REPORT.replace("health", "ready")).unwrap();
        let first = r
            .ingest(
                std::slice::from_ref(&a),
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap();
        // Puts 2 and 3 index a (the earlier run's artifact) and b; put 4, a kept again as this
        // run's, fails.
        let e = r
            .ingest(
                &[a, b],
                &Ingest::new("u1", "prod", RunPhase::Post),
                Some(keep(&m)),
            )
            .unwrap_err();
        assert!(e.to_string().contains("unreachable (test)"), "{e}");
        let left: Vec<String> = live(&m).into_iter().map(|a| a.artifact_id).collect();
        assert_eq!(
            left, first.artifact_ids,
            "a file of the failed ingest is live"
        );
        assert_eq!(r.runs(&RunQuery::default()).unwrap().len(), 1);

        let dir = tempfile::tempdir().unwrap();
        let (m, r) = failing_store(dir.path(), 257);
        let files: Vec<_> = (0..257)
            .map(|i| {
                let f = dir.path().join(format!("r{i}.xml"));
                std::fs::write(&f, REPORT.replace("health", &format!("t{i}"))).unwrap();
                f
            })
            .collect();
        let e = r
            .ingest(
                &files,
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap_err();
        assert!(e.to_string().contains("unreachable (test)"), "{e}");
        assert!(live(&m).is_empty(), "the first batch is live");
        assert!(m.sessions(None).unwrap().is_empty(), "the session was left");
        assert!(r.runs(&RunQuery::default()).unwrap().is_empty());
    }

    /// T13: two ingests into one session that both find no `validation` collection both
    /// create it; the one whose create loses (the name is taken) uses the other's collection
    /// instead of failing.
    #[test]
    fn a_lost_race_to_create_the_validation_collection_uses_the_winners() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, m, _r) = kept_store(dir.path());
        let s = m
            .create_session(crate::artifacts::NewSession {
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                ..Default::default()
            })
            .unwrap();
        let won = crate::results::create_validation(&m, &s.session_id).unwrap();
        let lost = crate::results::create_validation(&m, &s.session_id).unwrap();
        assert_eq!(lost, won);
        assert_eq!(m.collections(&s.session_id).unwrap().len(), 1);
    }

    /// G120: two first ingests of an upgrade (two stores on one data dir, as two processes)
    /// that both find no session end with one session, both runs' reports in it. A third
    /// connection holds the write lock until both stores' reader connections have run a
    /// statement (the look for the upgrade's sessions, outside the write lock: with the old
    /// create both then found none and both created one).
    #[test]
    fn two_first_ingests_of_an_upgrade_share_one_session() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ma, ra) = kept_store(dir.path());
        let (b, mb, rb) = kept_store(dir.path());
        let looked: Vec<Arc<std::sync::atomic::AtomicBool>> = [&a, &b]
            .into_iter()
            .map(|store| {
                let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let seen = flag.clone();
                store
                    .reader()
                    .progress_handler(
                        1,
                        Some(move || {
                            seen.store(true, std::sync::atomic::Ordering::SeqCst);
                            false
                        }),
                    )
                    .unwrap();
                flag
            })
            .collect();
        let report = dir.path().join("junit.xml");
        std::fs::write(
            &report,
            r#"<testsuite name="s"><testcase classname="api" name="health"/></testsuite>"#,
        )
        .unwrap();
        let holder = rusqlite::Connection::open(dir.path().join(super::super::DB_FILE)).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let runs = std::thread::scope(|scope| {
            let ingests: Vec<_> = [(&ma, &ra), (&mb, &rb)]
                .into_iter()
                .map(|(m, r)| {
                    let report = &report;
                    scope.spawn(move || {
                        r.ingest(
                            std::slice::from_ref(report),
                            &Ingest::new("u1", "prod", RunPhase::Pre),
                            Some(keep(m)),
                        )
                    })
                })
                .collect();
            // Both have looked for the upgrade's session (reads do not wait for the writer)
            // and wait for the write lock (the busy timeout is 10 s).
            // (Their first statement on the reader: `target` lists the upgrade's sessions.)
            let start = std::time::Instant::now();
            while !looked
                .iter()
                .all(|l| l.load(std::sync::atomic::Ordering::SeqCst))
            {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(60),
                    "both ingests did not look for a session within a minute"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            holder.execute_batch("COMMIT").unwrap();
            ingests
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        let sessions = ma.sessions(Some("u1")).unwrap();
        assert_eq!(sessions.len(), 1, "{sessions:#?}");
        let collections = ma.collections(&sessions[0].session_id).unwrap();
        assert_eq!(collections.len(), 1, "{collections:#?}");
        for run in &runs {
            let a = ma.artifact(&run.artifact_ids[0]).unwrap();
            assert_eq!(a.session_id, sessions[0].session_id);
            assert_eq!(a.collection_id, collections[0].collection_id);
        }
    }

    /// G120: an ingest that lost the race for an upgrade's first session (it found none, then
    /// the other's session committed before its own create) and then fails to record its run
    /// leaves that session (and removes only its own report): the session is not its own.
    #[test]
    fn a_lost_race_for_the_first_session_leaves_the_winners_session_on_undo() {
        let dir = tempfile::tempdir().unwrap();
        let (store, m, r) = kept_store(dir.path());
        let looked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = looked.clone();
        store
            .reader()
            .progress_handler(
                1,
                Some(move || {
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    false
                }),
            )
            .unwrap();
        let report = dir.path().join("junit.xml");
        std::fs::write(
            &report,
            r#"<testsuite name="s"><testcase classname="api" name="health"/></testsuite>"#,
        )
        .unwrap();
        let winner = rusqlite::Connection::open(dir.path().join(super::super::DB_FILE)).unwrap();
        winner
            .execute_batch(
                "CREATE TRIGGER no_runs BEFORE INSERT ON test_runs \
                 BEGIN SELECT RAISE(ABORT, 'no runs today'); END; \
                 BEGIN IMMEDIATE; \
                 INSERT INTO sessions (session_id, upgrade_id, cluster_name, name, started_at, \
                 retention_days) VALUES ('winner', 'u1', 'prod', 'w', 0, 30);",
            )
            .unwrap();
        let failed = std::thread::scope(|scope| {
            let ingest = scope.spawn(|| {
                r.ingest(
                    std::slice::from_ref(&report),
                    &Ingest::new("u1", "prod", RunPhase::Pre),
                    Some(keep(&m)),
                )
            });
            let start = std::time::Instant::now();
            while !looked.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(start.elapsed() < std::time::Duration::from_secs(60));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            winner.execute_batch("COMMIT").unwrap();
            ingest.join().unwrap()
        });
        let err = format!("{:?}", failed.unwrap_err());
        assert!(err.contains("no runs today"), "{err}");
        let sessions = m.sessions(Some("u1")).unwrap();
        assert_eq!(sessions.len(), 1, "{sessions:#?}");
        assert_eq!(sessions[0].session_id, "winner");
        let page = m.search(&crate::model::ArtifactQuery::default()).unwrap();
        assert!(
            page.iter()
                .all(|a| a.status == crate::model::ArtifactStatus::Deleted),
            "{page:#?}"
        );
    }

    /// T14: a suite without a name is the empty suite, never the file's path: the same report
    /// written to another path (another name) holds the same tests.
    #[test]
    fn unnamed_suites_are_the_same_tests_at_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, m, r) = kept_store(dir.path());
        let text = r#"<testsuites><testsuite><testcase classname="api" name="health"/></testsuite></testsuites>"#;
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("junit.xml"), text).unwrap();
        std::fs::write(b.join("report-2.xml"), text).unwrap();
        let pre = r
            .ingest(
                &[a.join("junit.xml")],
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap();
        let post = r
            .ingest(
                &[b.join("report-2.xml")],
                &Ingest::new("u1", "prod", RunPhase::Post),
                Some(keep(&m)),
            )
            .unwrap();
        let c = r.compare(&pre.run_id, &post.run_id).unwrap();
        assert!(c.added.is_empty() && c.missing.is_empty(), "{c:#?}");
        assert!(c.gate.passed);
        assert_eq!(r.results(&post.run_id, false).unwrap()[0].suite, "");
    }

    /// T16: ingesting the same bytes again records a new run with its own artifact, tagged
    /// with its own phase and naming its own run (a pre and a post run of one unchanged report
    /// are two runs).
    #[test]
    fn identical_bytes_make_a_new_run_with_its_own_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, m, r) = kept_store(dir.path());
        let report = dir.path().join("smoke.xml");
        std::fs::write(&report, REPORT).unwrap();
        let pre = r
            .ingest(
                std::slice::from_ref(&report),
                &Ingest::new("u1", "prod", RunPhase::Pre),
                Some(keep(&m)),
            )
            .unwrap();
        let post = r
            .ingest(
                &[report],
                &Ingest::new("u1", "prod", RunPhase::Post),
                Some(keep(&m)),
            )
            .unwrap();
        assert_ne!(pre.run_id, post.run_id);
        assert_eq!(r.runs(&RunQuery::default()).unwrap().len(), 2);
        for (run, phase) in [(&pre, "pre"), (&post, "post")] {
            assert_eq!(run.artifact_ids.len(), 1);
            let a = m.artifact(&run.artifact_ids[0]).unwrap();
            assert_eq!(a.tags, [phase]);
            assert_eq!(a.metadata["run_id"], run.run_id.as_str());
        }
        assert_ne!(pre.artifact_ids, post.artifact_ids);
        let names: Vec<String> = [&pre, &post]
            .iter()
            .map(|run| m.artifact(&run.artifact_ids[0]).unwrap().name)
            .collect();
        assert_eq!(names[0], "smoke.xml");
        let tail = &post.run_id[post.run_id.len() - 12..];
        assert_eq!(names[1], format!("smoke.run-{tail}.xml"));
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

    /// ARCHITECTURE "Test results are indexed": every statement the reads run (traced, so
    /// these are the statements themselves) reaches `test_results`, `test_stats`, `test_runs`
    /// and `test_cases` by a seek on an index or the primary key, never by a scan of a table or
    /// of a whole index (listing every run, newest first, is the one rowid walk).
    #[test]
    fn reads_walk_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let r = TestResults::new(store.clone());
        let mut runs = Vec::new();
        for (i, status) in [TestStatus::Passed, TestStatus::Failed, TestStatus::Passed]
            .into_iter()
            .enumerate()
        {
            let run = r
                .record(
                    &Ingest::new(&format!("u{i}"), "prod", RunPhase::Post),
                    vec![],
                    vec![],
                    &mut (0..50)
                        .map(|j| attempt(&format!("t{j}"), status, 6.0 + i as f64))
                        .collect::<Vec<_>>()
                        .into_iter(),
                )
                .unwrap();
            runs.push(run.run_id);
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&seen);
        store
            .reader()
            .trace_v2(
                rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT,
                Some(move |e: rusqlite::trace::TraceEvent<'_>| {
                    if let rusqlite::trace::TraceEvent::Stmt(stmt, _) = e {
                        sink.lock().unwrap().push(stmt.sql().into_owned());
                    }
                }),
            )
            .unwrap();
        r.history("t1", Some("prod"), 10).unwrap();
        r.history("t1", None, 10).unwrap();
        r.flaky(Some("prod"), None).unwrap();
        r.flaky(None, None).unwrap();
        r.compare(&runs[0], &runs[2]).unwrap();
        r.runs(&RunQuery {
            upgrade_id: Some("u1".into()),
            ..RunQuery::default()
        })
        .unwrap();
        r.runs(&RunQuery {
            cluster_name: Some("prod".into()),
            ..RunQuery::default()
        })
        .unwrap();
        store
            .reader()
            .trace_v2(
                rusqlite::trace::TraceEventCodes::empty(),
                None::<fn(rusqlite::trace::TraceEvent<'_>)>,
            )
            .unwrap();
        let statements = seen.lock().unwrap().clone();
        assert!(statements.len() >= 8, "{statements:#?}");
        let conn = store.reader();
        // T18: `history NAME --cluster C` seeks the results of the test on that cluster (both
        // columns of the index), it does not read every result of the test and filter.
        let history = statements
            .iter()
            .find(|s| s.contains("r.cluster = ?2"))
            .expect("the history statement with a cluster");
        let plan = query_plan(&conn, history);
        assert!(
            plan.iter()
                .any(|p| p.contains("test_results_by_test (ckey=? AND cluster=?)")),
            "{plan:#?}"
        );
        for sql in statements {
            if sql.contains("FROM test_runs WHERE ?1 IS NULL")
                || sql.contains("SELECT run_id FROM test_runs WHERE run_id >=")
            {
                // Every run, newest first (rowid walk), or the id's own unique index.
                continue;
            }
            for step in query_plan(&conn, &sql) {
                // A SCAN walks a whole table or index; every read here must SEARCH (seek).
                let scan = step.starts_with("SCAN") && !step.starts_with("SCAN CONSTANT ROW");
                assert!(!scan, "{sql}\n  scans: {step}");
            }
        }
    }
}
