//! Test results as data: a *run* (one ingest of one or more JUnit files for an upgrade, a cluster
//! and a phase) of *results* (one per test identity, attempts folded), and what is read back
//! from them: run summaries, the pre/post [`Comparison`] and its [`Gate`], per-test history and
//! flaky tests. Plain data; parsing lives in [`crate::results`], storage behind
//! [`crate::store::TestResultStore`].

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// The outcome of one test (or one attempt of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    /// Passed.
    Passed,
    /// An assertion failed (`<failure>`).
    Failed,
    /// The test could not run to its end (`<error>`).
    Error,
    /// Skipped (`<skipped>`, ginkgo `status="skipped|pending"`).
    Skipped,
}

impl TestStatus {
    /// Every status, in code order.
    pub const ALL: [TestStatus; 4] = [
        TestStatus::Passed,
        TestStatus::Failed,
        TestStatus::Error,
        TestStatus::Skipped,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TestStatus::Passed => "passed",
            TestStatus::Failed => "failed",
            TestStatus::Error => "error",
            TestStatus::Skipped => "skipped",
        }
    }

    /// Failed or error.
    pub fn is_failure(self) -> bool {
        matches!(self, TestStatus::Failed | TestStatus::Error)
    }

    pub(crate) fn code(self) -> i64 {
        self as i64
    }

    pub(crate) fn from_code(code: i64) -> Option<TestStatus> {
        TestStatus::ALL.get(usize::try_from(code).ok()?).copied()
    }
}

impl fmt::Display for TestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a run was taken relative to the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    /// Before the upgrade (the baseline).
    Pre,
    /// After the upgrade (what the gate judges).
    Post,
    /// Any other time.
    Adhoc,
}

impl RunPhase {
    /// Every phase, in code order.
    pub const ALL: [RunPhase; 3] = [RunPhase::Pre, RunPhase::Post, RunPhase::Adhoc];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Pre => "pre",
            RunPhase::Post => "post",
            RunPhase::Adhoc => "adhoc",
        }
    }

    pub(crate) fn code(self) -> i64 {
        self as i64
    }

    pub(crate) fn from_code(code: i64) -> Option<RunPhase> {
        RunPhase::ALL.get(usize::try_from(code).ok()?).copied()
    }
}

impl fmt::Display for RunPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunPhase {
    type Err = Error;
    fn from_str(s: &str) -> Result<RunPhase, Error> {
        RunPhase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!("invalid phase {s:?}: expected pre, post or adhoc"))
            })
    }
}

/// The stable identity of a test: the first 16 bytes of SHA-256 over framework, suite,
/// classname and name (each length-prefixed, so no two tuples collide by concatenation), in hex.
pub fn test_id(framework: &str, suite: &str, classname: &str, name: &str) -> String {
    let mut h = Sha256::new();
    for part in [framework, suite, classname, name] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// One attempt of one test as read from a report (before folding).
#[derive(Debug, Clone, PartialEq)]
pub struct CaseAttempt {
    /// Framework (`pytest`, `surefire`, `ginkgo`, `jest`, `go`, `junit`).
    pub framework: String,
    /// Suite (the `<testsuite name>`, or the `--suite` override).
    pub suite: String,
    /// Class name (may be empty).
    pub classname: String,
    /// Test name.
    pub name: String,
    /// Outcome of this attempt.
    pub status: TestStatus,
    /// Seconds.
    pub duration: f64,
    /// The failure, error or skip message (bounded, see [`MAX_MESSAGE_BYTES`]).
    pub message: Option<String>,
    /// When the attempt's suite ran, from its `<testsuite timestamp>` and `time` (`None`
    /// when the report gives no readable timestamp).
    pub suite_window: Option<SuiteWindow>,
}

/// When a suite ran: from its `<testsuite timestamp>` (ISO 8601; one without a zone is taken
/// as UTC) to that time plus its `time` attribute (without one, plus its cases' times). A run's span in the trace
/// lasts from its suites' earliest start to their latest end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuiteWindow {
    /// The suite's `timestamp`.
    pub start: DateTime<Utc>,
    /// `start` plus the suite's `time`.
    pub end: DateTime<Utc>,
}

impl SuiteWindow {
    /// The window covering both.
    pub fn union(self, other: SuiteWindow) -> SuiteWindow {
        SuiteWindow {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

impl CaseAttempt {
    /// [`test_id`] of this attempt's test.
    pub fn test_id(&self) -> String {
        test_id(&self.framework, &self.suite, &self.classname, &self.name)
    }
}

/// Longest message kept per result; longer ones are cut at a character boundary and end in `…`.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// One test's result in a run: its attempts folded, the last one deciding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// [`test_id`].
    pub test_id: String,
    /// Framework.
    pub framework: String,
    /// Suite.
    pub suite: String,
    /// Class name.
    pub classname: String,
    /// Name.
    pub name: String,
    /// The last attempt's status.
    pub status: TestStatus,
    /// How many records of this test the run held.
    pub attempts: u32,
    /// The last attempt passed after an earlier one failed.
    pub flaky: bool,
    /// The last attempt's duration, seconds.
    pub duration: f64,
    /// The last failure message (of the last attempt, or of the failure a flaky test recovered
    /// from), or the skip message.
    pub message: Option<String>,
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Distinct tests.
    pub tests: u64,
    /// Passed (flaky ones included).
    pub passed: u64,
    /// Failed.
    pub failed: u64,
    /// Errors.
    pub errors: u64,
    /// Skipped.
    pub skipped: u64,
    /// Passed after a failed attempt.
    pub flaky: u64,
    /// Sum of the tests' durations, seconds.
    pub duration: f64,
}

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRun {
    /// Run id (UUID v7).
    pub run_id: String,
    /// The upgrade.
    pub upgrade_id: String,
    /// The upgrade's cluster.
    pub cluster_name: String,
    /// Phase.
    pub phase: RunPhase,
    /// Suites seen, sorted.
    pub suites: Vec<String>,
    /// Counts.
    #[serde(flatten)]
    pub counts: RunCounts,
    /// When the run was recorded.
    pub created_at: DateTime<Utc>,
    /// The report files (their names as given).
    pub files: Vec<String>,
    /// The `test_result` artifacts keeping the files, when kept.
    pub artifact_ids: Vec<String>,
}

/// A run to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// Run id (UUID v7).
    pub run_id: String,
    /// The upgrade.
    pub upgrade_id: String,
    /// Its cluster.
    pub cluster_name: String,
    /// Phase.
    pub phase: RunPhase,
    /// When.
    pub created_at: DateTime<Utc>,
    /// File names.
    pub files: Vec<String>,
    /// Artifact ids.
    pub artifact_ids: Vec<String>,
}

/// Which runs to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunQuery {
    /// Only this upgrade's.
    pub upgrade_id: Option<String>,
    /// Only this cluster's.
    pub cluster_name: Option<String>,
    /// Only this phase.
    pub phase: Option<RunPhase>,
    /// At most this many (1..=10,000; 0 means 100).
    pub limit: usize,
}

/// One result of a test in its history (newest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The run.
    pub run_id: String,
    /// Its upgrade.
    pub upgrade_id: String,
    /// Its cluster.
    pub cluster_name: String,
    /// Its phase.
    pub phase: RunPhase,
    /// When the run was recorded.
    pub created_at: DateTime<Utc>,
    /// The test.
    pub test_id: String,
    /// Suite.
    pub suite: String,
    /// Class name.
    pub classname: String,
    /// Name.
    pub name: String,
    /// Status.
    pub status: TestStatus,
    /// Attempts.
    pub attempts: u32,
    /// Flaky in that run.
    pub flaky: bool,
    /// Seconds.
    pub duration: f64,
    /// Message.
    pub message: Option<String>,
}

/// A test that both passed and failed on one cluster within a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlakyTest {
    /// The cluster.
    pub cluster_name: String,
    /// The test.
    pub test_id: String,
    /// Framework.
    pub framework: String,
    /// Suite.
    pub suite: String,
    /// Class name.
    pub classname: String,
    /// Name.
    pub name: String,
    /// Last time it passed.
    pub last_passed_at: DateTime<Utc>,
    /// Last time it failed (or passed only on a retry).
    pub last_failed_at: DateTime<Utc>,
    /// Passes in a row since then (it stops being flaky at [`FLAKY_CLEARED_AFTER`]).
    pub passes_since: u32,
    /// The last failure message.
    pub message: Option<String>,
}

/// Passes in a row that clear a test's flakiness.
pub const FLAKY_CLEARED_AFTER: u32 = 5;
/// Default window of `flaky`, days.
pub const DEFAULT_FLAKY_DAYS: u32 = 14;

/// A test in a comparison, with both sides' results when present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparedTest {
    /// The test.
    pub test_id: String,
    /// Name.
    pub name: String,
    /// Class name.
    pub classname: String,
    /// Suite.
    pub suite: String,
    /// Framework.
    pub framework: String,
    /// Status in the first (pre) run.
    pub before: Option<TestStatus>,
    /// Status in the second (post) run.
    pub after: Option<TestStatus>,
    /// Duration in the first run, seconds.
    pub duration_before: Option<f64>,
    /// Duration in the second run, seconds.
    pub duration_after: Option<f64>,
    /// The message of the second run's result (else the first's).
    pub message: Option<String>,
    /// For duration regressions: the median of the earlier passing durations it is judged by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_duration: Option<f64>,
}

/// Whether a post run may go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// No new failure, new error or missing test.
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reasons: Vec<String>,
}

impl Gate {
    /// The gate over the counts it judges: it fails on new failures, new errors or missing
    /// tests. Every backend and the comparison use this one definition.
    pub fn judge(new_failures: u64, new_errors: u64, missing: u64) -> Gate {
        let mut reasons = Vec::new();
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        if new_failures > 0 {
            reasons.push(plural(new_failures, "new failure", "new failures"));
        }
        if new_errors > 0 {
            reasons.push(plural(new_errors, "new error", "new errors"));
        }
        if missing > 0 {
            reasons.push(plural(missing, "missing test", "missing tests"));
        }
        Gate {
            passed: reasons.is_empty(),
            reasons,
        }
    }
}

/// Pre → post, classified. Every list is sorted by suite, class name and name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The first run (pre).
    pub run_a: TestRun,
    /// The second run (post).
    pub run_b: TestRun,
    /// Passed → failed.
    pub new_failures: Vec<ComparedTest>,
    /// Passed → error.
    pub new_errors: Vec<ComparedTest>,
    /// Failed or error in both.
    pub still_failing: Vec<ComparedTest>,
    /// Failed or error → passed.
    pub fixed: Vec<ComparedTest>,
    /// Passed or failing → skipped.
    pub newly_skipped: Vec<ComparedTest>,
    /// Run in the second run and not in the first: absent from it, or skipped there (a test
    /// skipped before and failing now is not a new failure: there was no result to break).
    pub added: Vec<ComparedTest>,
    /// In the first run, not in the second (usually a suite that crashed).
    pub missing: Vec<ComparedTest>,
    /// Flaky in either run (passed on a retry), or flaky on the cluster by history before the
    /// second run (passed and failed within the last 14 days, not cleared by 5 passes in a
    /// row), so a failure the upgrade caused is not called flaky for itself.
    pub flaky: Vec<ComparedTest>,
    /// Passing in the second run at least 1.5× the median of up to 20 earlier passing runs on
    /// the cluster and at least 5 s slower (not when that history is erratic).
    pub duration_regressions: Vec<ComparedTest>,
    /// The gate.
    pub gate: Gate,
}
