//! The `TestResultStore` on PostgreSQL (schema 5, 8): the tables, indexes and statements of the
//! SQLite backend's (`store/sqlite/test_results.rs`), so a replica answers the same.
//!
//! Differences: a run's attempts are folded in batches of [`BATCH`] (folded in memory first,
//! then one `INSERT ... SELECT FROM UNNEST ... ON CONFLICT` each), not one statement per
//! attempt, since every statement is a round trip; test identities are upserted
//! (`ON CONFLICT (test_id) DO NOTHING`), so replicas recording the same new tests at once do not
//! collide; the flaky statistics are upserted in key order, so two runs of one cluster do not
//! deadlock. `record_run` runs once (no retry), since its source may not be replayable.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use postgres::{GenericClient, Row};
use serde_json::json;

use super::progress::{Conn, Db, PostgresStore, Tx, from_micros, micros};
use crate::error::{Error, Result};
use crate::model::{
    CaseAttempt, FLAKY_CLEARED_AFTER, FlakyTest, Gate, HistoryEntry, JsonMap, NewRun, RunCounts,
    RunPhase, RunQuery, SuiteWindow, TestResult, TestRun, TestStatus,
};
use crate::notify::otlp::{MAX_EVENT_DETAILS, RunFacts, cut, sample_indices};
use crate::store::{AttemptSink, MAX_PAGE, TestResultStore};

/// Attempts folded per statement.
const BATCH: usize = 1000;

pub(super) const SCHEMA_5: &str = r#"
CREATE TABLE test_runs (
    rkey          BIGSERIAL PRIMARY KEY,
    run_id        TEXT NOT NULL UNIQUE,
    upgrade_id    TEXT NOT NULL,
    cluster_name  TEXT NOT NULL,
    phase         BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    suites        TEXT NOT NULL,
    files         TEXT NOT NULL,
    artifact_ids  TEXT NOT NULL,
    tests         BIGINT NOT NULL DEFAULT 0,
    passed        BIGINT NOT NULL DEFAULT 0,
    failed        BIGINT NOT NULL DEFAULT 0,
    errors        BIGINT NOT NULL DEFAULT 0,
    skipped       BIGINT NOT NULL DEFAULT 0,
    flaky         BIGINT NOT NULL DEFAULT 0,
    duration      DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX test_runs_by_upgrade ON test_runs (upgrade_id, phase, rkey);
CREATE INDEX test_runs_by_cluster ON test_runs (cluster_name, rkey);
CREATE TABLE test_cases (
    ckey      BIGSERIAL PRIMARY KEY,
    test_id   TEXT NOT NULL UNIQUE,
    framework TEXT NOT NULL,
    suite     TEXT NOT NULL,
    classname TEXT NOT NULL,
    name      TEXT NOT NULL
);
CREATE INDEX test_cases_by_name ON test_cases (name);
CREATE TABLE test_results (
    rkey     BIGINT NOT NULL,
    ckey     BIGINT NOT NULL,
    cluster  TEXT NOT NULL,
    status   BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    fails    BIGINT NOT NULL,
    duration DOUBLE PRECISION NOT NULL,
    message  TEXT,
    PRIMARY KEY (rkey, ckey)
);
CREATE INDEX test_results_by_test ON test_results (ckey, cluster, rkey);
CREATE TABLE test_stats (
    cluster      TEXT NOT NULL,
    ckey         BIGINT NOT NULL,
    last_pass_at BIGINT,
    last_fail_at BIGINT,
    pass_streak  BIGINT NOT NULL,
    message      TEXT,
    both_at      BIGINT,
    prev_pass_at BIGINT,
    prev_fail_at BIGINT,
    prev_streak  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, ckey)
);
CREATE INDEX test_stats_flaky ON test_stats (cluster, both_at) WHERE both_at IS NOT NULL;
CREATE INDEX test_stats_flaky_all ON test_stats (both_at) WHERE both_at IS NOT NULL;
"#;

/// Schema 8: the suite times of a run (N27), as SQLite's schema 11.
pub(super) const SCHEMA_8: &str = r#"
ALTER TABLE test_runs ADD COLUMN started_at BIGINT;
ALTER TABLE test_runs ADD COLUMN ended_at BIGINT;
"#;

const RUN_COLUMNS: &str = "run_id, upgrade_id, cluster_name, phase, created_at, suites, files, \
                           artifact_ids, tests, passed, failed, errors, skipped, flaky, duration";

fn strings(text: String) -> Vec<String> {
    serde_json::from_str(&text).unwrap_or_default()
}

fn run_row(r: &Row) -> TestRun {
    let n = |i: usize| r.get::<_, i64>(i) as u64;
    TestRun {
        run_id: r.get(0),
        upgrade_id: r.get(1),
        cluster_name: r.get(2),
        phase: RunPhase::from_code(r.get(3)).unwrap_or(RunPhase::Adhoc),
        created_at: from_micros(r.get(4)),
        suites: strings(r.get(5)),
        files: strings(r.get(6)),
        artifact_ids: strings(r.get(7)),
        counts: RunCounts {
            tests: n(8),
            passed: n(9),
            failed: n(10),
            errors: n(11),
            skipped: n(12),
            flaky: n(13),
            duration: r.get(14),
        },
    }
}

fn status_of(code: i64) -> TestStatus {
    TestStatus::from_code(code).unwrap_or(TestStatus::Error)
}

fn run_key(db: &mut Db<'_, impl GenericClient>, run_id: &str) -> Result<(i64, TestRun)> {
    let row = db
        .opt(
            &format!("SELECT {RUN_COLUMNS}, rkey FROM test_runs WHERE run_id = $1"),
            &[&run_id],
        )?
        .ok_or_else(|| Error::not_found(format!("test run {run_id:?}")))?;
    Ok((row.get(15), run_row(&row)))
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

/// One test's attempts of a batch, folded as the store folds them.
struct Folded {
    a: CaseAttempt,
    attempts: i64,
    fails: i64,
}

/// Folds a batch of attempts into the run's results (see the module).
fn fold_batch(tx: &mut Tx<'_, '_>, rkey: i64, cluster: &str, batch: &[CaseAttempt]) -> Result<()> {
    let mut order: Vec<String> = Vec::new();
    let mut folded: HashMap<String, Folded> = HashMap::new();
    for a in batch {
        let id = a.test_id();
        match folded.get_mut(&id) {
            Some(f) => {
                f.attempts += 1;
                f.fails += i64::from(a.status.is_failure());
                f.a.status = a.status;
                f.a.duration = a.duration;
                if a.message.is_some() {
                    f.a.message = a.message.clone();
                }
            }
            None => {
                order.push(id.clone());
                folded.insert(
                    id,
                    Folded {
                        a: a.clone(),
                        attempts: 1,
                        fails: i64::from(a.status.is_failure()),
                    },
                );
            }
        }
    }
    order.sort();
    let col = |f: &dyn Fn(&Folded) -> String| -> Vec<String> {
        order.iter().map(|id| f(&folded[id])).collect()
    };
    let frameworks = col(&|f| f.a.framework.clone());
    let suites = col(&|f| f.a.suite.clone());
    let classnames = col(&|f| f.a.classname.clone());
    let names = col(&|f| f.a.name.clone());
    tx.exec(
        "INSERT INTO test_cases (test_id, framework, suite, classname, name) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
         ON CONFLICT (test_id) DO NOTHING",
        &[&order, &frameworks, &suites, &classnames, &names],
    )?;
    let keys: HashMap<String, i64> = tx
        .query(
            "SELECT test_id, ckey FROM test_cases WHERE test_id = ANY($1)",
            &[&order],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut ckeys = Vec::with_capacity(order.len());
    for id in &order {
        ckeys.push(*keys.get(id).ok_or_else(|| Error::Backend {
            message: format!("test case {id} vanished while its run was recorded"),
            source: None,
        })?);
    }
    let statuses: Vec<i64> = order.iter().map(|id| folded[id].a.status.code()).collect();
    let attempts: Vec<i64> = order.iter().map(|id| folded[id].attempts).collect();
    let fails: Vec<i64> = order.iter().map(|id| folded[id].fails).collect();
    let durations: Vec<f64> = order.iter().map(|id| folded[id].a.duration).collect();
    let messages: Vec<Option<String>> = order
        .iter()
        .map(|id| folded[id].a.message.clone())
        .collect();
    tx.exec(
        "INSERT INTO test_results (rkey, ckey, cluster, status, attempts, fails, duration, message) \
         SELECT $1, x.* FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], \
         $6::bigint[], $7::float8[], $8::text[]) AS x \
         ON CONFLICT (rkey, ckey) DO UPDATE SET status = excluded.status, \
         attempts = test_results.attempts + excluded.attempts, \
         fails = test_results.fails + excluded.fails, duration = excluded.duration, \
         message = coalesce(excluded.message, test_results.message)",
        &[
            &rkey,
            &ckeys,
            &vec![cluster.to_owned(); order.len()],
            &statuses,
            &attempts,
            &fails,
            &durations,
            &messages,
        ],
    )?;
    Ok(())
}

/// Counts of a post run against a pre run, as the gate judges them.
fn gate_counts(tx: &mut Tx<'_, '_>, pre: i64, post: i64) -> Result<(u64, u64, u64)> {
    let mut changed = |to: TestStatus| -> Result<u64> {
        Ok(tx
            .one(
                "SELECT count(*) FROM test_results a JOIN test_results b \
                 ON b.rkey = $2 AND b.ckey = a.ckey \
                 WHERE a.rkey = $1 AND a.status = $3 AND b.status = $4",
                &[&pre, &post, &TestStatus::Passed.code(), &to.code()],
            )?
            .get::<_, i64>(0) as u64)
    };
    let failed = changed(TestStatus::Failed)?;
    let errored = changed(TestStatus::Error)?;
    let missing = tx
        .one(
            "SELECT count(*) FROM test_results a WHERE a.rkey = $1 AND NOT EXISTS \
             (SELECT 1 FROM test_results b WHERE b.rkey = $2 AND b.ckey = a.ckey)",
            &[&pre, &post],
        )?
        .get::<_, i64>(0) as u64;
    Ok((failed, errored, missing))
}

/// In every run's transaction: the trace-only notification of the run (its span, for the OTLP
/// sink), whatever its phase and result, whenever recorded.
fn notify_trace(tx: &mut Tx<'_, '_>, run: &TestRun) -> Result<()> {
    // The counter's row lock, held to COMMIT, as `notify_gate` takes it: `nid`s in commit order.
    tx.exec("UPDATE seq_counter SET seq = seq", &[])?;
    let seq: i64 = tx
        .opt(
            "SELECT last_seq FROM upgrades WHERE upgrade_id = $1",
            &[&run.upgrade_id],
        )?
        .map_or(0, |r| r.get(0));
    let (event_id, d) = crate::store::notification::run_trace(run, seq);
    tx.exec(
        "INSERT INTO notifications (event_id, seq, upgrade_id, detail_type, time, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &event_id,
            &seq,
            &run.upgrade_id,
            &crate::notify::TEST_RUN_TRACE,
            &micros(run.created_at),
            &serde_json::to_string(&d).unwrap_or_default(),
        ],
    )?;
    Ok(())
}

/// In a post run's transaction: when it fails the gate against the upgrade's latest pre run,
/// the `upgrade.validation_failed` notification goes to the outbox.
fn notify_gate(tx: &mut Tx<'_, '_>, post: i64, run: &TestRun) -> Result<()> {
    let Some(pre) = tx.opt(
        "SELECT rkey, run_id FROM test_runs WHERE upgrade_id = $1 AND phase = $2 \
         AND rkey < $3 ORDER BY rkey DESC LIMIT 1",
        &[&run.upgrade_id, &RunPhase::Pre.code(), &post],
    )?
    else {
        return Ok(());
    };
    let (pre, pre_id): (i64, String) = (pre.get(0), pre.get(1));
    let (new_failures, new_errors, missing) = gate_counts(tx, pre, post)?;
    let gate = Gate::judge(new_failures, new_errors, missing);
    if gate.passed {
        return Ok(());
    }
    // The counter's row lock, as progress writes take it, held to COMMIT: notification `nid`s
    // are then handed out in commit order, which the outbox's cursor (`nid > upto`) relies on.
    // A notification inserted without it could commit after a later `nid` was read, and be
    // skipped for good.
    tx.exec("UPDATE seq_counter SET seq = seq", &[])?;
    let seq: i64 = tx
        .opt(
            "SELECT last_seq FROM upgrades WHERE upgrade_id = $1",
            &[&run.upgrade_id],
        )?
        .map_or(0, |r| r.get(0));
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
    tx.exec(
        "INSERT INTO notifications (event_id, seq, upgrade_id, detail_type, time, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &run.run_id,
            &seq,
            &run.upgrade_id,
            &"upgrade.validation_failed",
            &micros(run.created_at),
            &serde_json::to_string(&d).unwrap_or_default(),
        ],
    )?;
    Ok(())
}

fn page(limit: usize) -> Result<i64> {
    Ok(match limit {
        0 => 100,
        n if n > MAX_PAGE => {
            return Err(Error::invalid(format!(
                "limit {n} is too large: give at most {MAX_PAGE}"
            )));
        }
        n => n as i64,
    })
}

fn record(
    tx: &mut Tx<'_, '_>,
    run: &NewRun,
    source: &mut dyn FnMut(&mut AttemptSink<'_>) -> Result<()>,
) -> Result<TestRun> {
    if tx
        .opt("SELECT 1 FROM test_runs WHERE run_id = $1", &[&run.run_id])?
        .is_some()
    {
        return Err(Error::AlreadyExists {
            what: format!("test run {:?}", run.run_id),
        });
    }
    if !run.artifact_ids.is_empty() {
        // Locked to the commit: `delete_orphan_reports` (which locks them FOR UPDATE) either
        // committed before (the report is seen deleted here) or waits, then sees this run.
        for r in tx.query(
            "SELECT artifact_id, status FROM artifacts WHERE artifact_id = ANY($1) \
             ORDER BY akey FOR SHARE",
            &[&run.artifact_ids],
        )? {
            if r.get::<_, i64>(1) == crate::model::ArtifactStatus::Deleted.code() {
                return Err(crate::store::report_deleted(r.get(0)));
            }
        }
        tx.exec(
            "UPDATE artifacts SET metadata = (metadata::jsonb - $2::text)::text \
             WHERE artifact_id = ANY($1) AND strpos(metadata, $2) > 0",
            &[&run.artifact_ids, &crate::store::PENDING_RUN_KEY],
        )?;
    }
    let at = micros(run.created_at);
    let rkey: i64 = tx
        .one(
            "INSERT INTO test_runs (run_id, upgrade_id, cluster_name, phase, created_at, suites, \
             files, artifact_ids) VALUES ($1, $2, $3, $4, $5, '[]', $6, $7) RETURNING rkey",
            &[
                &run.run_id,
                &run.upgrade_id,
                &run.cluster_name,
                &run.phase.code(),
                &at,
                &serde_json::to_string(&run.files).unwrap_or_default(),
                &serde_json::to_string(&run.artifact_ids).unwrap_or_default(),
            ],
        )?
        .get(0);
    let mut suites = BTreeSet::new();
    let mut window: Option<SuiteWindow> = None;
    let mut batch: Vec<CaseAttempt> = Vec::with_capacity(BATCH);
    source(&mut |a: CaseAttempt| {
        if !suites.contains(&a.suite) {
            suites.insert(a.suite.clone());
        }
        if let Some(w) = a.suite_window {
            window = Some(window.map_or(w, |x| x.union(w)));
        }
        batch.push(a);
        if batch.len() >= BATCH {
            fold_batch(tx, rkey, &run.cluster_name, &batch)?;
            batch.clear();
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        fold_batch(tx, rkey, &run.cluster_name, &batch)?;
    }
    tx.exec(
        "UPDATE test_runs SET suites = $2, started_at = $3, ended_at = $4, (tests, passed, failed, errors, skipped, flaky, \
         duration) = (SELECT count(*), count(*) FILTER (WHERE status = 0), \
         count(*) FILTER (WHERE status = 1), count(*) FILTER (WHERE status = 2), \
         count(*) FILTER (WHERE status = 3), count(*) FILTER (WHERE status = 0 AND fails > 0), \
         coalesce(sum(duration), 0) FROM test_results WHERE rkey = $1) WHERE rkey = $1",
        &[
            &rkey,
            &serde_json::to_string(&suites).unwrap_or_default(),
            &window.map(|w| micros(w.start)),
            &window.map(|w| micros(w.end)),
        ],
    )?;
    // Per-cluster flaky statistics, as the SQLite backend keeps them (in key order).
    tx.exec(
        "INSERT INTO test_stats (cluster, ckey, last_pass_at, last_fail_at, pass_streak, \
         message, both_at) \
         SELECT $2::text, ckey, \
           CASE WHEN status = 0 THEN $3::bigint END, \
           CASE WHEN status IN (1, 2) OR fails > 0 THEN $3::bigint END, \
           CASE WHEN status = 0 AND fails = 0 THEN 1 ELSE 0 END, \
           CASE WHEN status IN (1, 2) OR fails > 0 THEN message END, \
           CASE WHEN status = 0 AND fails > 0 THEN $3::bigint END \
         FROM test_results WHERE rkey = $1 AND status != 3 ORDER BY ckey \
         ON CONFLICT (cluster, ckey) DO UPDATE SET \
           prev_pass_at = CASE WHEN excluded.last_pass_at IS NULL THEN test_stats.prev_pass_at \
                          ELSE test_stats.last_pass_at END, \
           prev_fail_at = CASE WHEN excluded.last_fail_at IS NULL THEN test_stats.prev_fail_at \
                          ELSE test_stats.last_fail_at END, \
           prev_streak = test_stats.pass_streak, \
           last_pass_at = coalesce(excluded.last_pass_at, test_stats.last_pass_at), \
           last_fail_at = coalesce(excluded.last_fail_at, test_stats.last_fail_at), \
           pass_streak = CASE WHEN excluded.pass_streak = 1 THEN test_stats.pass_streak + 1 \
                         ELSE 0 END, \
           message = coalesce(excluded.message, test_stats.message), \
           both_at = CASE WHEN coalesce(excluded.last_pass_at, test_stats.last_pass_at) IS NULL \
                       OR coalesce(excluded.last_fail_at, test_stats.last_fail_at) IS NULL \
                     THEN NULL \
                     ELSE least(coalesce(excluded.last_pass_at, test_stats.last_pass_at), \
                                coalesce(excluded.last_fail_at, test_stats.last_fail_at)) END",
        &[&rkey, &run.cluster_name, &at],
    )?;
    let (_, stored) = run_key(tx, &run.run_id)?;
    if run.phase == RunPhase::Post {
        notify_gate(tx, rkey, &stored)?;
    }
    notify_trace(tx, &stored)?;
    Ok(stored)
}

fn result_row(r: &Row) -> TestResult {
    let status = status_of(r.get(5));
    TestResult {
        test_id: r.get(0),
        framework: r.get(1),
        suite: r.get(2),
        classname: r.get(3),
        name: r.get(4),
        status,
        attempts: r.get::<_, i64>(6) as u32,
        flaky: status == TestStatus::Passed && r.get::<_, i64>(7) > 0,
        duration: r.get(8),
        message: r.get(9),
    }
}

impl TestResultStore for PostgresStore {
    fn record_run(
        &self,
        run: &NewRun,
        source: &mut dyn FnMut(&mut AttemptSink<'_>) -> Result<()>,
    ) -> Result<TestRun> {
        check_new_run(run)?;
        // Once, without the retry of `write`: the source may not be replayable.
        self.with_conn(|conn| {
            let Conn { client, stmts } = conn;
            let mut t = client.transaction()?;
            let stored = record(&mut Db { c: &mut t, stmts }, run, source)?;
            t.commit()?;
            Ok(stored)
        })
    }

    fn resolve_run(&self, abbrev: &str) -> Result<String> {
        self.read(|db| {
            let ids: Vec<String> = db
                .query(
                    "SELECT run_id FROM test_runs WHERE run_id >= $1 ORDER BY run_id LIMIT 11",
                    &[&abbrev],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
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
        self.read(|db| Ok(run_key(db, run_id)?.1))
    }

    fn runs(&self, q: &RunQuery) -> Result<Vec<TestRun>> {
        let limit = page(q.limit)?;
        let phase = q.phase.map(|p| p.code());
        self.read(|db| {
            let rows = match (&q.upgrade_id, &q.cluster_name) {
                (Some(u), cluster) => db.query(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM test_runs WHERE upgrade_id = $1 \
                         AND ($2::text IS NULL OR cluster_name = $2) \
                         AND ($3::bigint IS NULL OR phase = $3) ORDER BY rkey DESC LIMIT $4"
                    ),
                    &[u, cluster, &phase, &limit],
                )?,
                (None, Some(cl)) => db.query(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM test_runs WHERE cluster_name = $1 \
                         AND ($2::bigint IS NULL OR phase = $2) ORDER BY rkey DESC LIMIT $3"
                    ),
                    &[cl, &phase, &limit],
                )?,
                (None, None) => db.query(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM test_runs \
                         WHERE ($1::bigint IS NULL OR phase = $1) ORDER BY rkey DESC LIMIT $2"
                    ),
                    &[&phase, &limit],
                )?,
            };
            Ok(rows.iter().map(run_row).collect())
        })
    }

    fn latest_run(&self, upgrade_id: &str, phase: RunPhase) -> Result<Option<TestRun>> {
        self.read(|db| {
            Ok(db
                .opt(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM test_runs WHERE upgrade_id = $1 AND phase = $2 \
                         ORDER BY rkey DESC LIMIT 1"
                    ),
                    &[&upgrade_id, &phase.code()],
                )?
                .map(|r| run_row(&r)))
        })
    }

    fn results(&self, run_id: &str, failing_only: bool) -> Result<Vec<TestResult>> {
        self.read(|db| {
            let (rkey, _) = run_key(db, run_id)?;
            let rows = db.query(
                "SELECT c.test_id, c.framework, c.suite, c.classname, c.name, r.status, \
                 r.attempts, r.fails, r.duration, r.message \
                 FROM test_results r JOIN test_cases c ON c.ckey = r.ckey \
                 WHERE r.rkey = $1 AND (NOT $2 OR r.status IN (1, 2)) \
                 ORDER BY c.suite COLLATE \"C\", c.classname COLLATE \"C\", c.name COLLATE \"C\"",
                &[&rkey, &failing_only],
            )?;
            Ok(rows.iter().map(result_row).collect())
        })
    }

    fn history(
        &self,
        name: &str,
        cluster_name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        let limit = page(limit)?;
        self.read(|db| {
            // With a cluster, the seek is on (test, cluster) of the index.
            let on = match cluster_name {
                Some(_) => "r.ckey = c.ckey AND r.cluster = $2",
                None => "r.ckey = c.ckey AND $2::text IS NULL",
            };
            let rows = db.query(
                &format!(
                    "SELECT u.run_id, u.upgrade_id, u.cluster_name, u.phase, u.created_at, \
                     c.test_id, c.suite, c.classname, c.name, r.status, r.attempts, r.fails, \
                     r.duration, r.message \
                     FROM test_cases c JOIN test_results r ON {on} \
                     JOIN test_runs u ON u.rkey = r.rkey \
                     WHERE c.name = $1 OR c.test_id = $1 \
                     ORDER BY r.rkey DESC LIMIT $3"
                ),
                &[&name, &cluster_name, &limit],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    let status = status_of(r.get(9));
                    HistoryEntry {
                        run_id: r.get(0),
                        upgrade_id: r.get(1),
                        cluster_name: r.get(2),
                        phase: RunPhase::from_code(r.get(3)).unwrap_or(RunPhase::Adhoc),
                        created_at: from_micros(r.get(4)),
                        test_id: r.get(5),
                        suite: r.get(6),
                        classname: r.get(7),
                        name: r.get(8),
                        status,
                        attempts: r.get::<_, i64>(10) as u32,
                        flaky: status == TestStatus::Passed && r.get::<_, i64>(11) > 0,
                        duration: r.get(12),
                        message: r.get(13),
                    }
                })
                .collect())
        })
    }

    fn flaky(&self, cluster_name: Option<&str>, since: DateTime<Utc>) -> Result<Vec<FlakyTest>> {
        self.read(|db| {
            let rows = db.query(
                "SELECT s.cluster, c.test_id, c.framework, c.suite, c.classname, c.name, \
                 s.last_pass_at, s.last_fail_at, s.pass_streak, s.message \
                 FROM test_stats s JOIN test_cases c ON c.ckey = s.ckey \
                 WHERE ($1::text IS NULL OR s.cluster = $1) \
                 AND s.both_at IS NOT NULL AND s.both_at >= $2 AND s.pass_streak < $3 \
                 ORDER BY s.cluster COLLATE \"C\", c.suite COLLATE \"C\", \
                 c.classname COLLATE \"C\", c.name COLLATE \"C\"",
                &[
                    &cluster_name,
                    &micros(since),
                    &i64::from(FLAKY_CLEARED_AFTER),
                ],
            )?;
            Ok(rows
                .iter()
                .map(|r| FlakyTest {
                    cluster_name: r.get(0),
                    test_id: r.get(1),
                    framework: r.get(2),
                    suite: r.get(3),
                    classname: r.get(4),
                    name: r.get(5),
                    last_passed_at: from_micros(r.get(6)),
                    last_failed_at: from_micros(r.get(7)),
                    passes_since: r.get::<_, i64>(8) as u32,
                    message: r.get(9),
                })
                .collect())
        })
    }

    fn flaky_before(&self, run_id: &str, since: DateTime<Utc>) -> Result<HashSet<String>> {
        self.read(|db| {
            let (_, run) = run_key(db, run_id)?;
            let at = micros(run.created_at);
            let rows = db.query(
                "SELECT c.test_id FROM test_stats s JOIN test_cases c ON c.ckey = s.ckey \
                 WHERE s.cluster = $1 AND s.both_at IS NOT NULL AND s.both_at >= $2 \
                 AND (CASE WHEN s.last_pass_at = $3 THEN s.prev_pass_at ELSE s.last_pass_at END) >= $2 \
                 AND (CASE WHEN s.last_fail_at = $3 THEN s.prev_fail_at ELSE s.last_fail_at END) >= $2 \
                 AND (CASE WHEN s.last_pass_at = $3 OR s.last_fail_at = $3 THEN s.prev_streak \
                      ELSE s.pass_streak END) < $4",
                &[
                    &run.cluster_name,
                    &micros(since),
                    &at,
                    &i64::from(FLAKY_CLEARED_AFTER),
                ],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn passing_durations(
        &self,
        cluster_name: &str,
        before_run: &str,
        test_ids: &[&str],
        limit: usize,
    ) -> Result<HashMap<String, Vec<f64>>> {
        self.read(|db| {
            let (rkey, _) = run_key(db, before_run)?;
            let ids: Vec<String> = test_ids.iter().map(|s| (*s).to_owned()).collect();
            // Each test's newest `limit` passing results, by its (test, cluster) index range.
            let rows = db.query(
                "SELECT c.test_id, d.duration FROM test_cases c CROSS JOIN LATERAL \
                 (SELECT r.duration FROM test_results r WHERE r.ckey = c.ckey \
                  AND r.cluster = $2 AND r.rkey < $3 AND r.status = 0 \
                  ORDER BY r.rkey DESC LIMIT $4) d \
                 WHERE c.test_id = ANY($1)",
                &[&ids, &cluster_name, &rkey, &(limit as i64)],
            )?;
            let mut out: HashMap<String, Vec<f64>> =
                ids.iter().map(|i| (i.clone(), Vec::new())).collect();
            for r in &rows {
                out.entry(r.get(0)).or_default().push(r.get(1));
            }
            Ok(out)
        })
    }
}

/// One run for the OTLP sink (`store/postgres/trace.rs`), the same answer as the SQLite
/// store's (`store/sqlite/trace.rs`), its failing tests sampled; `NotFound` when there is none.
pub(super) fn trace_run(
    db: &mut Db<'_, impl GenericClient>,
    run_id: &str,
    max_events: usize,
) -> Result<RunFacts> {
    let (rkey, run) = run_key(db, run_id)?;
    run_facts(db, rkey, run, max_events)
}

/// A run's failing tests in (suite, class name, name) byte order, only the sampled ones read
/// (numbered in the query, so memory stays flat whatever the count), messages cut.
fn run_facts(
    db: &mut Db<'_, impl GenericClient>,
    rkey: i64,
    run: TestRun,
    max_events: usize,
) -> Result<RunFacts> {
    let total = run.counts.failed.saturating_add(run.counts.errors);
    let keep: Vec<i64> = sample_indices(usize::try_from(total).unwrap_or(usize::MAX), max_events)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let mut failures = Vec::with_capacity(keep.len());
    if !keep.is_empty() {
        let rows = db.query(
            "SELECT test_id, framework, suite, classname, name, status, attempts, duration, \
             message FROM (SELECT c.test_id, c.framework, c.suite, c.classname, c.name, \
             r.status, r.attempts, r.duration, left(r.message, $5) AS message, \
             row_number() OVER (ORDER BY c.suite COLLATE \"C\", c.classname COLLATE \"C\", \
             c.name COLLATE \"C\") - 1 AS i \
             FROM test_results r JOIN test_cases c ON c.ckey = r.ckey \
             WHERE r.rkey = $1 AND r.status IN ($3, $4)) f WHERE i = ANY($2) ORDER BY i",
            &[
                &rkey,
                &keep,
                &TestStatus::Failed.code(),
                &TestStatus::Error.code(),
                &(MAX_EVENT_DETAILS as i32 + 1),
            ],
        )?;
        for r in rows {
            let message: Option<String> = r.get(8);
            failures.push(TestResult {
                test_id: r.get(0),
                framework: r.get(1),
                suite: r.get(2),
                classname: r.get(3),
                name: r.get(4),
                status: status_of(r.get(5)),
                attempts: r.get::<_, i64>(6).clamp(0, i64::from(u32::MAX)) as u32,
                flaky: false,
                duration: r.get(7),
                message: message.map(cut),
            });
        }
    }
    // The longest suite's total time: suites may run in parallel.
    let lasted: f64 = db
        .one(
            "SELECT coalesce(max(t), 0)::float8 FROM (SELECT sum(r.duration) AS t \
             FROM test_results r JOIN test_cases c ON c.ckey = r.ckey \
             WHERE r.rkey = $1 GROUP BY c.suite) s",
            &[&rkey],
        )?
        .get(0);
    let times = db.one(
        "SELECT started_at, ended_at FROM test_runs WHERE rkey = $1",
        &[&rkey],
    )?;
    let window = match (
        times.get::<_, Option<i64>>(0),
        times.get::<_, Option<i64>>(1),
    ) {
        (Some(start), Some(end)) => Some(SuiteWindow {
            start: from_micros(start),
            end: from_micros(end),
        }),
        _ => None,
    };
    Ok(RunFacts {
        run,
        failures,
        total_failures: total,
        lasted,
        window,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::progress::PostgresOptions;
    use super::*;
    use crate::test_support::PgCluster;

    /// G60: the test results conformance suite (the one the SQLite backend passes) on
    /// PostgreSQL, outbox included.
    #[test]
    fn conformance() {
        let pg = PgCluster::start();
        let options = PostgresOptions {
            pool_size: 4,
            ..PostgresOptions::default()
        };
        crate::results::conformance::run(&|| {
            let store = Arc::new(PostgresStore::open(&pg.create_database(), &options).unwrap());
            (store.clone(), Some(store))
        });
    }

    /// N27 on PostgreSQL: a database of schema 7 holding a run (no suite time columns) opens
    /// at the current schema; the old run has no window, a new run stores its own, both read
    /// back through the trace source.
    #[test]
    fn schema_7_database_gets_the_suite_times() {
        use crate::model::SuiteWindow;
        use crate::notify::otlp::TraceSource;
        let pg = PgCluster::start();
        let url = pg.create_database();
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let run = |id: &str| NewRun {
            run_id: id.into(),
            upgrade_id: "u".into(),
            cluster_name: "c".into(),
            phase: RunPhase::Pre,
            created_at: at(10),
            files: Vec::new(),
            artifact_ids: Vec::new(),
        };
        {
            let store = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
            store
                .record_run(&run("old"), &mut |sink| {
                    sink(crate::results::conformance::attempt(
                        "a",
                        TestStatus::Passed,
                        2.0,
                    ))
                })
                .unwrap();
            store
                .with_conn(|c| {
                    Ok(c.client.batch_execute(
                        "ALTER TABLE test_runs DROP COLUMN started_at, DROP COLUMN ended_at; \
                         DROP TABLE blob_releases; DROP TABLE stream_followers; \
                         UPDATE schema_version SET version = 7",
                    )?)
                })
                .unwrap();
        }
        let store = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            super::super::schema::SCHEMA_VERSION
        );
        let old = store.test_run("old", 128).unwrap().unwrap();
        assert_eq!((old.run.counts.tests, old.window), (1, None));
        let window = SuiteWindow {
            start: at(1),
            end: at(5),
        };
        store
            .record_run(&run("new"), &mut |sink| {
                sink(CaseAttempt {
                    suite_window: Some(window),
                    ..crate::results::conformance::attempt("a", TestStatus::Passed, 2.0)
                })
            })
            .unwrap();
        assert_eq!(
            store.test_run("new", 128).unwrap().unwrap().window,
            Some(window)
        );
    }
}
