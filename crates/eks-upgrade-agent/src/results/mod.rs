//! Test results as data (issue #12). [`TestResults`] turns JUnit XML reports into a recorded
//! *run* (upgrade, cluster, phase `pre|post|adhoc`) of per-test results, keeps the report files
//! as `test_result` artifacts, and answers the questions an upgrade asks of them: what the
//! upgrade broke ([`TestResults::compare`], with its [`Gate`]), how a test behaved over time
//! ([`TestResults::history`]) and which tests are flaky ([`TestResults::flaky`]).
//!
//! Layers: [`junit`] reads reports (streaming); storage is the [`TestResultStore`] trait
//! (`SqliteStore` implements it in `store/sqlite/test_results.rs`); the comparison is a pure
//! function of two runs' results plus the durations and flaky set the store answers by index.
//!
//! ```
//! use std::sync::Arc;
//! use eks_upgrade_agent::{SqliteStore, store::sqlite::SqliteOptions};
//! use eks_upgrade_agent::model::RunPhase;
//! use eks_upgrade_agent::results::{Ingest, TestResults};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let results = TestResults::new(Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default())?));
//! let report = dir.path().join("pre.xml");
//! std::fs::write(&report, r#"<testsuite name="smoke"><testcase classname="api" name="health"/></testsuite>"#)?;
//! let pre = results.ingest(&[report.clone()], &Ingest::new("u1", "prod-eu", RunPhase::Pre), None)?;
//! let post = results.ingest(&[report], &Ingest::new("u1", "prod-eu", RunPhase::Post), None)?;
//! let cmp = results.compare(&pre.run_id, &post.run_id)?;
//! assert!(cmp.gate.passed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Duration as ChronoDuration;
use uuid::Uuid;

use crate::artifacts::{AddOptions, TestArtifactsManager};
use crate::error::{Error, Result};
use crate::model::{
    ArtifactType, CaseAttempt, ComparedTest, Comparison, DEFAULT_FLAKY_DAYS, FlakyTest, Gate,
    HistoryEntry, NewRun, RunPhase, RunQuery, TestResult, TestRun, TestStatus,
};
use crate::store::TestResultStore;

mod bounded;
#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
pub mod conformance;
pub mod junit;
mod spool;

pub use junit::{ParseOptions, ParseSummary};

/// Name of the collection that keeps report files when none is given.
pub const VALIDATION_COLLECTION: &str = "validation";
/// Most files per ingest.
pub const MAX_FILES: usize = 1000;
/// Earlier passing results a duration is judged against.
pub const DURATION_HISTORY: usize = 20;
/// A duration regression is at least this many times the median...
pub const DURATION_FACTOR: f64 = 1.5;
/// ...and at least this many seconds slower.
pub const DURATION_MIN_SLOWER: f64 = 5.0;

/// What a run is of.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    /// The upgrade.
    pub upgrade_id: String,
    /// Its cluster.
    pub cluster_name: String,
    /// Phase.
    pub phase: RunPhase,
    /// Suite name for every case (default: each `<testsuite name>`).
    pub suite: Option<String>,
    /// Framework [default: detected from the report].
    pub framework: Option<String>,
    /// The files' names in messages and in the run, one per file [default: the paths as
    /// given] (a server names an uploaded report, not its temporary file).
    pub labels: Vec<String>,
}

impl Ingest {
    /// A run of `upgrade_id` on `cluster_name` in `phase`.
    pub fn new(upgrade_id: &str, cluster_name: &str, phase: RunPhase) -> Ingest {
        Ingest {
            upgrade_id: upgrade_id.to_owned(),
            cluster_name: cluster_name.to_owned(),
            phase,
            suite: None,
            framework: None,
            labels: Vec::new(),
        }
    }

    fn label(&self, i: usize, path: &Path) -> String {
        self.labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| path.display().to_string())
    }
}

/// Where the report files are kept as `test_result` artifacts.
#[derive(Debug, Clone, Copy)]
pub struct KeepFiles<'a> {
    /// The artifacts manager.
    pub artifacts: &'a TestArtifactsManager,
    /// The session [default: the upgrade's latest session, created when it has none].
    pub session_id: Option<&'a str>,
    /// The collection [default: the session's `validation` collection, created when missing].
    pub collection_id: Option<&'a str>,
    /// Name, description, tags, task and metadata of the artifacts (the type is always
    /// `test_result`; the phase is added as a tag, the run id and phase to the metadata).
    pub options: Option<&'a AddOptions>,
}

/// The artifact options of a run's files: the caller's, typed `test_result`, tagged with the
/// phase, the run id and phase in the metadata.
fn keep_options(keep: KeepFiles<'_>, ingest: &Ingest, run_id: &str) -> AddOptions {
    let mut opts = keep.options.cloned().unwrap_or_default();
    opts.artifact_type = Some(ArtifactType::TestResult);
    if !opts.tags.iter().any(|t| t == ingest.phase.as_str()) {
        opts.tags.push(ingest.phase.as_str().to_owned());
    }
    opts.metadata
        .insert("run_id".to_owned(), serde_json::json!(run_id));
    opts.metadata
        .insert("phase".to_owned(), serde_json::json!(ingest.phase));
    // Until the run is recorded: what `gc` finds when neither the record nor the undo could
    // be written.
    opts.metadata.insert(
        crate::store::PENDING_RUN_KEY.to_owned(),
        serde_json::json!(run_id),
    );
    opts
}

/// `name` with `.run-<the end of run_id>` before its extension: the name a run's report gets
/// when the same name and bytes are already an earlier run's artifact.
fn run_name(name: &str, run_id: &str) -> String {
    let tag = format!("run-{}", &run_id[run_id.len().saturating_sub(12)..]);
    let base = name.rfind('/').map_or(0, |i| i + 1);
    match name[base..].rfind('.') {
        Some(dot) if dot > 0 => format!("{}.{tag}{}", &name[..base + dot], &name[base + dot..]),
        _ => format!("{name}.{tag}"),
    }
}

/// What an ingest stored before recording its run, to remove when recording fails.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    pub(crate) session: Option<String>,
    pub(crate) artifacts: Vec<String>,
}

impl Kept {
    /// Deletes this ingest's artifacts (their rows stay as `deleted` records and their blobs
    /// are released), then the session when this ingest created it and no artifact of it is
    /// live (checked in the deleting transaction: a concurrent ingest's files in the session
    /// keep it). Best effort: the caller returns the error that made it undo.
    pub(crate) fn undo(&self, artifacts: &TestArtifactsManager) {
        for id in &self.artifacts {
            if let Err(e) = artifacts.delete_artifact(id) {
                tracing::warn!(artifact_id = %id, error = %e, "cannot remove the artifact of a test run that was not recorded");
            }
        }
        if let Some(s) = &self.session
            && let Err(e) = artifacts.index().delete_session_if_empty(s)
        {
            tracing::warn!(session_id = %s, error = %e, "cannot remove the session of a test run that was not recorded");
        }
    }
}

/// Creates the session's `validation` collection; when a concurrent ingest (another replica)
/// created it since this one looked, that collection is the answer (both ingests keep their
/// reports in it, neither fails on the name).
pub(crate) fn create_validation(a: &TestArtifactsManager, session_id: &str) -> Result<String> {
    match a.create_collection(
        session_id,
        VALIDATION_COLLECTION,
        Some("test reports (JUnit XML) of the upgrade's validation runs"),
        None,
    ) {
        Ok(c) => Ok(c.collection_id),
        Err(Error::AlreadyExists { .. }) => a
            .collections(session_id)?
            .into_iter()
            .find(|c| c.name == VALIDATION_COLLECTION)
            .map(|c| c.collection_id)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "collection {VALIDATION_COLLECTION:?} of session {session_id:?}"
                ))
            }),
        Err(e) => Err(e),
    }
}

/// Test runs over a [`TestResultStore`].
#[derive(Debug, Clone)]
pub struct TestResults {
    store: Arc<dyn TestResultStore>,
}

fn check_label(what: &str, v: &str) -> Result<()> {
    if v.trim().is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "invalid {what} {v:?}: give 1 to 256 characters without control characters"
        )));
    }
    Ok(())
}

impl TestResults {
    /// Over `store`.
    pub fn new(store: Arc<dyn TestResultStore>) -> TestResults {
        TestResults { store }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TestResultStore> {
        &self.store
    }

    /// Records one run from `files` (JUnit XML). In this order, so that a failure stores
    /// nothing: the artifacts' names and options are checked; every file is read once, into a
    /// spool on disk (a malformed file is [`Error::InvalidInput`] naming the file and the
    /// line); with `keep`, the files are kept as `test_result` artifacts (and checked to be the
    /// bytes that were read); then one write transaction records the run from the spool (no
    /// XML is parsed while the store's write lock is held). When keeping or recording fails,
    /// what was kept is removed again: the artifacts are deleted, and the session when this
    /// ingest created it.
    pub fn ingest(
        &self,
        files: &[PathBuf],
        ingest: &Ingest,
        keep: Option<KeepFiles<'_>>,
    ) -> Result<TestRun> {
        if files.is_empty() {
            return Err(Error::invalid(
                "no report files: give one or more JUnit XML files",
            ));
        }
        if files.len() > MAX_FILES {
            return Err(Error::invalid(format!(
                "{} report files: give at most {MAX_FILES} per run",
                files.len()
            )));
        }
        check_label("upgrade_id", &ingest.upgrade_id)?;
        check_label("cluster_name", &ingest.cluster_name)?;
        if let Some(s) = &ingest.suite {
            check_label("suite", s)?;
        }
        if let Some(f) = &ingest.framework {
            check_label("framework", f)?;
        }
        let options = ParseOptions {
            suite: ingest.suite.clone(),
            framework: ingest.framework.clone(),
        };
        if !ingest.labels.is_empty() && ingest.labels.len() != files.len() {
            return Err(Error::invalid("give one label per report file"));
        }
        if let Some(o) = keep.and_then(|k| k.options) {
            // The caller's metadata may not carry the mark the ingest adds.
            crate::artifacts::check_reserved(&o.metadata)?;
        }
        let run_id = Uuid::now_v7().to_string();
        let keep = keep.map(|k| (k, keep_options(k, ingest, &run_id)));
        if let Some((_, opts)) = &keep {
            crate::artifacts::plan_paths(files, opts)?;
        }
        let mut spool = spool::Spool::new()?;
        let mut digests = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            digests.push(spool.parse_file(f, &ingest.label(i, f), &options)?.0);
        }
        let mut kept = Kept::default();
        let mut run_artifacts = Vec::with_capacity(files.len());
        let recorded = (|| {
            if let Some((k, opts)) = &keep {
                let (session, collection) = self.target(*k, ingest, &mut kept)?;
                let mut added = Vec::with_capacity(files.len());
                let adding = k.artifacts.add_paths_into(
                    &session,
                    &collection,
                    files,
                    opts,
                    &mut |_| {},
                    &mut added,
                    true,
                );
                // Every row of this run that committed is undone on any failure below (or of
                // a later batch of the add); an earlier run's artifact (same name and bytes)
                // is not ours to delete.
                kept.artifacts.extend(
                    added
                        .iter()
                        .filter(|a| a.metadata.get("run_id") == Some(&serde_json::json!(run_id)))
                        .map(|a| a.artifact_id.clone()),
                );
                adding?;
                for (i, a) in added.into_iter().enumerate() {
                    let ours = a.metadata.get("run_id") == Some(&serde_json::json!(run_id));
                    let a = if ours {
                        a
                    } else {
                        // The same name and bytes are an earlier run's artifact in this
                        // collection (an add of them is that artifact): these bytes are kept
                        // again, as this run's, under a name of this run.
                        let mut file = std::fs::File::open(&files[i]).map_err(|e| {
                            Error::invalid(format!(
                                "cannot read {}: {e}",
                                ingest.label(i, &files[i])
                            ))
                        })?;
                        k.artifacts.add_reader_as(
                            &session,
                            &collection,
                            &mut file,
                            &run_name(&a.name, &run_id),
                            opts,
                            true,
                        )?
                    };
                    if !ours {
                        kept.artifacts.push(a.artifact_id.clone());
                    }
                    run_artifacts.push(a.artifact_id.clone());
                    let d = &digests[i];
                    if a.file_hash.parse::<crate::blob::Digest>().ok().as_ref() != Some(d) {
                        return Err(Error::invalid(format!(
                            "{} changed while it was being ingested; nothing was stored: \
                             ingest it again once it is complete",
                            ingest.label(i, &files[i])
                        )));
                    }
                }
            }
            let new = NewRun {
                run_id: run_id.clone(),
                upgrade_id: ingest.upgrade_id.clone(),
                cluster_name: ingest.cluster_name.clone(),
                phase: ingest.phase,
                created_at: crate::model::now(),
                files: files
                    .iter()
                    .enumerate()
                    .map(|(i, f)| ingest.label(i, f))
                    .collect(),
                artifact_ids: run_artifacts.clone(),
            };
            self.store.record_run(&new, &mut |sink| spool.replay(sink))
        })();
        if recorded.is_err()
            && let Some((k, _)) = &keep
        {
            kept.undo(k.artifacts);
        }
        recorded
    }

    /// Records a run from attempts already read (e.g. by another parser).
    pub fn record(
        &self,
        ingest: &Ingest,
        files: Vec<String>,
        artifact_ids: Vec<String>,
        attempts: &mut dyn Iterator<Item = CaseAttempt>,
    ) -> Result<TestRun> {
        let new = NewRun {
            run_id: Uuid::now_v7().to_string(),
            upgrade_id: ingest.upgrade_id.clone(),
            cluster_name: ingest.cluster_name.clone(),
            phase: ingest.phase,
            created_at: crate::model::now(),
            files,
            artifact_ids,
        };
        self.store.record_run(&new, &mut |sink| {
            for a in &mut *attempts {
                sink(a)?;
            }
            Ok(())
        })
    }

    /// The session and collection the files of a run go to.
    fn target(
        &self,
        keep: KeepFiles<'_>,
        ingest: &Ingest,
        kept: &mut Kept,
    ) -> Result<(String, String)> {
        let a = keep.artifacts;
        let session = match keep.session_id {
            Some(s) => a.session(s)?,
            None => match a.sessions(Some(&ingest.upgrade_id))?.pop() {
                Some(s) => s,
                None => {
                    // Created only if still none (a concurrent ingest, maybe on another
                    // replica, may have created it since): that session is the answer then,
                    // and not this ingest's to remove on undo.
                    let (s, created) =
                        a.latest_session_or_create(crate::artifacts::NewSession {
                            upgrade_id: ingest.upgrade_id.clone(),
                            cluster_name: ingest.cluster_name.clone(),
                            ..Default::default()
                        })?;
                    if created {
                        kept.session = Some(s.session_id.clone());
                    }
                    s
                }
            },
        };
        let collection = match keep.collection_id {
            Some(c) => c.to_owned(),
            None => match a
                .collections(&session.session_id)?
                .into_iter()
                .find(|c| c.name == VALIDATION_COLLECTION)
            {
                Some(c) => c.collection_id,
                None => create_validation(a, &session.session_id)?,
            },
        };
        Ok((session.session_id, collection))
    }

    /// The full id of a run (a prefix of 4+ characters works).
    pub fn resolve_run(&self, abbrev: &str) -> Result<String> {
        self.store.resolve_run(abbrev)
    }

    /// One run.
    pub fn run(&self, run_id: &str) -> Result<TestRun> {
        self.store.run(&self.resolve_run(run_id)?)
    }

    /// Runs, newest first.
    pub fn runs(&self, query: &RunQuery) -> Result<Vec<TestRun>> {
        self.store.runs(query)
    }

    /// A run's results.
    pub fn results(&self, run_id: &str, failing_only: bool) -> Result<Vec<TestResult>> {
        self.store.results(&self.resolve_run(run_id)?, failing_only)
    }

    /// A test's history, newest first.
    pub fn history(
        &self,
        name: &str,
        cluster_name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>> {
        if name.is_empty() {
            return Err(Error::invalid(
                "give a test name (or a test id) to show the history of",
            ));
        }
        self.store.history(name, cluster_name, limit)
    }

    /// Flaky tests of the last `days` days (default [`DEFAULT_FLAKY_DAYS`]).
    pub fn flaky(&self, cluster_name: Option<&str>, days: Option<u32>) -> Result<Vec<FlakyTest>> {
        let days = days.unwrap_or(DEFAULT_FLAKY_DAYS);
        if days == 0 || days > 3650 {
            return Err(Error::invalid(format!(
                "invalid window of {days} days: give 1 to 3650"
            )));
        }
        self.store.flaky(
            cluster_name,
            crate::model::now() - ChronoDuration::days(i64::from(days)),
        )
    }

    /// The latest `pre` run of an upgrade against its latest `post` run.
    pub fn compare_upgrade(&self, upgrade_id: &str) -> Result<Comparison> {
        let pre = self
            .store
            .latest_run(upgrade_id, RunPhase::Pre)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "pre-upgrade test run of upgrade {upgrade_id:?} (ingest one with --phase pre)"
                ))
            })?;
        let post = self
            .store
            .latest_run(upgrade_id, RunPhase::Post)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "post-upgrade test run of upgrade {upgrade_id:?} (ingest one with --phase post)"
                ))
            })?;
        self.compare_runs(pre, post)
    }

    /// Run `a` (before) against run `b` (after).
    pub fn compare(&self, run_a: &str, run_b: &str) -> Result<Comparison> {
        let a = self.run(run_a)?;
        let b = self.run(run_b)?;
        self.compare_runs(a, b)
    }

    fn compare_runs(&self, a: TestRun, b: TestRun) -> Result<Comparison> {
        let before = self.store.results(&a.run_id, false)?;
        let after = self.store.results(&b.run_id, false)?;
        let flaky = self.store.flaky_before(
            &b.run_id,
            b.created_at - ChronoDuration::days(i64::from(DEFAULT_FLAKY_DAYS)),
        )?;
        let candidates: Vec<&str> = after
            .iter()
            .filter(|r| r.status == TestStatus::Passed && r.duration >= DURATION_MIN_SLOWER)
            .map(|r| r.test_id.as_str())
            .collect();
        let durations = if candidates.is_empty() {
            HashMap::new()
        } else {
            self.store.passing_durations(
                &b.cluster_name,
                &b.run_id,
                &candidates,
                DURATION_HISTORY,
            )?
        };
        Ok(classify(a, b, before, after, &flaky, &durations))
    }
}

/// The median and whether the samples are too erratic to judge by (fewer than 3, or an
/// interquartile range above half the median).
pub fn baseline(samples: &[f64]) -> Option<f64> {
    if samples.len() < 3 {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let i = p * (s.len() - 1) as f64;
        let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (i - lo as f64)
    };
    let median = q(0.5);
    if q(0.75) - q(0.25) > 0.5 * median {
        return None;
    }
    Some(median)
}

fn compared(a: Option<&TestResult>, b: Option<&TestResult>) -> ComparedTest {
    let any = b.or(a).expect("one side");
    ComparedTest {
        test_id: any.test_id.clone(),
        name: any.name.clone(),
        classname: any.classname.clone(),
        suite: any.suite.clone(),
        framework: any.framework.clone(),
        before: a.map(|r| r.status),
        after: b.map(|r| r.status),
        duration_before: a.map(|r| r.duration),
        duration_after: b.map(|r| r.duration),
        message: b
            .and_then(|r| r.message.clone())
            .or_else(|| a.and_then(|r| r.message.clone())),
        baseline_duration: None,
    }
}

/// Classifies run `a` → run `b` (pure): see [`Comparison`]. `flaky` is the cluster's flaky set
/// by history; `durations` the earlier passing durations of `b`'s slow passing tests.
pub fn classify(
    run_a: TestRun,
    run_b: TestRun,
    before: Vec<TestResult>,
    after: Vec<TestResult>,
    flaky: &HashSet<String>,
    durations: &HashMap<String, Vec<f64>>,
) -> Comparison {
    use TestStatus::*;
    let mut c = Comparison {
        run_a,
        run_b,
        new_failures: Vec::new(),
        new_errors: Vec::new(),
        still_failing: Vec::new(),
        fixed: Vec::new(),
        newly_skipped: Vec::new(),
        added: Vec::new(),
        missing: Vec::new(),
        flaky: Vec::new(),
        duration_regressions: Vec::new(),
        gate: Gate::judge(0, 0, 0),
    };
    let by_id: HashMap<&str, &TestResult> =
        before.iter().map(|r| (r.test_id.as_str(), r)).collect();
    let mut seen: HashSet<&str> = HashSet::with_capacity(after.len());
    for b in &after {
        seen.insert(b.test_id.as_str());
        let a = by_id.get(b.test_id.as_str()).copied();
        let t = compared(a, Some(b));
        if a.is_some_and(|a| a.flaky) || b.flaky || flaky.contains(&b.test_id) {
            c.flaky.push(t.clone());
        }
        if b.status == Passed
            && let Some(median) = durations.get(&b.test_id).and_then(|d| baseline(d))
            && b.duration >= DURATION_FACTOR * median
            && b.duration - median >= DURATION_MIN_SLOWER
        {
            let mut t = t.clone();
            t.baseline_duration = Some(median);
            c.duration_regressions.push(t);
        }
        // A test skipped before has no result to compare with: it is added to what ran.
        let Some(a) = a.filter(|a| a.status != Skipped || b.status == Skipped) else {
            c.added.push(t);
            continue;
        };
        match (a.status, b.status) {
            (Passed, Failed) => c.new_failures.push(t),
            (Passed, Error) => c.new_errors.push(t),
            (Failed | Error, Failed | Error) => c.still_failing.push(t),
            (Failed | Error, Passed) => c.fixed.push(t),
            (Passed | Failed | Error, Skipped) => c.newly_skipped.push(t),
            _ => {}
        }
    }
    for a in &before {
        if !seen.contains(a.test_id.as_str()) {
            let t = compared(Some(a), None);
            if a.flaky || flaky.contains(&a.test_id) {
                c.flaky.push(t.clone());
            }
            c.missing.push(t);
        }
    }
    for list in [
        &mut c.new_failures,
        &mut c.new_errors,
        &mut c.still_failing,
        &mut c.fixed,
        &mut c.newly_skipped,
        &mut c.added,
        &mut c.missing,
        &mut c.flaky,
        &mut c.duration_regressions,
    ] {
        list.sort_by(|x, y| {
            (&x.suite, &x.classname, &x.name).cmp(&(&y.suite, &y.classname, &y.name))
        });
    }
    c.gate = Gate::judge(
        c.new_failures.len() as u64,
        c.new_errors.len() as u64,
        c.missing.len() as u64,
    );
    c
}
