//! Progress: upgrades, tasks, progress events and the summary (reference `ProgressStatus`,
//! `TaskType`, `ProgressEvent`, `TaskProgress`, `UpgradeProgress`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;

/// Free-form JSON object attached to upgrades, tasks and events.
pub type JsonMap = Map<String, Value>;

/// Status of an upgrade or a task (reference `ProgressStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ProgressStatus {
    /// Created, not yet started.
    NotStarted,
    /// Running.
    InProgress,
    /// Finished successfully (terminal).
    Completed,
    /// Finished with an error; a task can be retried.
    Failed,
    /// Temporarily stopped; resume continues it.
    Paused,
    /// Abandoned; a task can be retried.
    Cancelled,
}

impl ProgressStatus {
    /// Every status, in declaration order.
    pub const ALL: [ProgressStatus; 6] = [
        ProgressStatus::NotStarted,
        ProgressStatus::InProgress,
        ProgressStatus::Completed,
        ProgressStatus::Failed,
        ProgressStatus::Paused,
        ProgressStatus::Cancelled,
    ];

    /// The wire name, e.g. `in_progress`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProgressStatus::NotStarted => "not_started",
            ProgressStatus::InProgress => "in_progress",
            ProgressStatus::Completed => "completed",
            ProgressStatus::Failed => "failed",
            ProgressStatus::Paused => "paused",
            ProgressStatus::Cancelled => "cancelled",
        }
    }

    /// True for statuses that end the work (`completed`, `failed`, `cancelled`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ProgressStatus::Completed | ProgressStatus::Failed | ProgressStatus::Cancelled
        )
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ProgressStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProgressStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        ProgressStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "invalid status {s:?}: expected one of {}",
                    names(ProgressStatus::ALL.iter().map(|s| s.as_str()))
                ))
            })
    }
}

/// Kind of task (reference `TaskType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// Planning the upgrade.
    UpgradePlan,
    /// A step that changes the cluster.
    UpgradeStep,
    /// Checks that the cluster is healthy.
    Validation,
    /// Undoing a step.
    Rollback,
    /// Removing what the upgrade left behind.
    Cleanup,
}

impl TaskType {
    /// Every task type, in declaration order.
    pub const ALL: [TaskType; 5] = [
        TaskType::UpgradePlan,
        TaskType::UpgradeStep,
        TaskType::Validation,
        TaskType::Rollback,
        TaskType::Cleanup,
    ];

    /// The wire name, e.g. `upgrade_step`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::UpgradePlan => "upgrade_plan",
            TaskType::UpgradeStep => "upgrade_step",
            TaskType::Validation => "validation",
            TaskType::Rollback => "rollback",
            TaskType::Cleanup => "cleanup",
        }
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        TaskType::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "invalid task type {s:?}: expected one of {}",
                    names(TaskType::ALL.iter().map(|s| s.as_str()))
                ))
            })
    }
}

pub(crate) fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

/// What happened in a [`ProgressEvent`]. Notifications and streams key on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// An upgrade was created.
    #[serde(rename = "upgrade.created")]
    UpgradeCreated,
    /// An upgrade started.
    #[serde(rename = "upgrade.started")]
    UpgradeStarted,
    /// An upgrade entered a new phase.
    #[serde(rename = "upgrade.phase_changed")]
    UpgradePhaseChanged,
    /// An upgrade completed.
    #[serde(rename = "upgrade.completed")]
    UpgradeCompleted,
    /// An upgrade failed.
    #[serde(rename = "upgrade.failed")]
    UpgradeFailed,
    /// A task was added.
    #[serde(rename = "task.added")]
    TaskAdded,
    /// A task started.
    #[serde(rename = "task.started")]
    TaskStarted,
    /// A task reported a percentage.
    #[serde(rename = "task.progress")]
    TaskProgress,
    /// A task reported a step.
    #[serde(rename = "task.step")]
    TaskStep,
    /// A task completed.
    #[serde(rename = "task.completed")]
    TaskCompleted,
    /// A task failed.
    #[serde(rename = "task.failed")]
    TaskFailed,
    /// A task was paused.
    #[serde(rename = "task.paused")]
    TaskPaused,
    /// A paused task resumed.
    #[serde(rename = "task.resumed")]
    TaskResumed,
    /// A task was cancelled.
    #[serde(rename = "task.cancelled")]
    TaskCancelled,
    /// A failed or cancelled task was retried.
    #[serde(rename = "task.retried")]
    TaskRetried,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 15] = [
        EventKind::UpgradeCreated,
        EventKind::UpgradeStarted,
        EventKind::UpgradePhaseChanged,
        EventKind::UpgradeCompleted,
        EventKind::UpgradeFailed,
        EventKind::TaskAdded,
        EventKind::TaskStarted,
        EventKind::TaskProgress,
        EventKind::TaskStep,
        EventKind::TaskCompleted,
        EventKind::TaskFailed,
        EventKind::TaskPaused,
        EventKind::TaskResumed,
        EventKind::TaskCancelled,
        EventKind::TaskRetried,
    ];

    /// The wire name, e.g. `task.failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UpgradeCreated => "upgrade.created",
            EventKind::UpgradeStarted => "upgrade.started",
            EventKind::UpgradePhaseChanged => "upgrade.phase_changed",
            EventKind::UpgradeCompleted => "upgrade.completed",
            EventKind::UpgradeFailed => "upgrade.failed",
            EventKind::TaskAdded => "task.added",
            EventKind::TaskStarted => "task.started",
            EventKind::TaskProgress => "task.progress",
            EventKind::TaskStep => "task.step",
            EventKind::TaskCompleted => "task.completed",
            EventKind::TaskFailed => "task.failed",
            EventKind::TaskPaused => "task.paused",
            EventKind::TaskResumed => "task.resumed",
            EventKind::TaskCancelled => "task.cancelled",
            EventKind::TaskRetried => "task.retried",
        }
    }

    pub(crate) fn code(self) -> i64 {
        self as i64
    }

    pub(crate) fn from_code(code: i64) -> Option<EventKind> {
        EventKind::ALL.get(usize::try_from(code).ok()?).copied()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the append-only history (reference `ProgressEvent`, plus `seq`, `upgrade_id`
/// and `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// Store-wide, strictly increasing sequence number; streams resume from it.
    pub seq: u64,
    /// Stable unique id (UUID v7), used by consumers to deduplicate.
    pub event_id: String,
    /// What happened.
    pub kind: EventKind,
    /// The upgrade the event belongs to.
    pub upgrade_id: String,
    /// When the change was committed.
    pub timestamp: DateTime<Utc>,
    /// The task, for task events.
    pub task_id: Option<String>,
    /// The task's type, for task events.
    pub task_type: Option<TaskType>,
    /// Status of the task (task events) or the upgrade (upgrade events) after the change.
    pub status: ProgressStatus,
    /// Human-readable message.
    pub message: Option<String>,
    /// Structured details given by the reporter.
    pub details: JsonMap,
    /// Percentage of the task (task events) or the upgrade's overall percentage.
    pub percentage: f64,
}

/// An upgrade: the root of a task tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upgrade {
    /// Caller-chosen id.
    pub upgrade_id: String,
    /// The upgrade plan this run executes.
    pub plan_id: String,
    /// The EKS cluster being upgraded.
    pub cluster_name: String,
    /// Current status.
    pub status: ProgressStatus,
    /// Current phase, free text.
    pub current_phase: Option<String>,
    /// Weighted mean of the top-level tasks' percentages.
    pub overall_percentage: f64,
    /// When the upgrade was created.
    pub created_at: DateTime<Utc>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// Error of a failed upgrade.
    pub error_message: Option<String>,
    /// Caller metadata.
    pub metadata: JsonMap,
    /// Number of tasks in each status, indexed like [`ProgressStatus::ALL`].
    pub task_counts: [u64; 6],
    /// Seq of the upgrade's latest event.
    pub last_seq: u64,
}

impl Upgrade {
    /// Total number of tasks.
    pub fn total_tasks(&self) -> u64 {
        self.task_counts.iter().sum()
    }

    /// Number of tasks in `status`.
    pub fn count(&self, status: ProgressStatus) -> u64 {
        self.task_counts[status.index()]
    }

    /// Seconds between start and completion (or `now` while running).
    pub fn duration_seconds(&self, now: DateTime<Utc>) -> Option<f64> {
        let start = self.started_at?;
        let end = self.completed_at.unwrap_or(now);
        // Never negative, whatever the clocks or an old store say.
        Some(seconds_between(start, end).max(0.0))
    }

    /// Linear estimate of when the upgrade will end, from elapsed time and overall percentage.
    /// `None` unless the upgrade runs, has made some progress and is not wholly paused (no task
    /// running, some paused); `None` too when the estimate lies more than [`MAX_ETA_YEARS`]
    /// years ahead (an upgrade at 0.000001% has no meaningful end). Never panics: the
    /// arithmetic saturates, whatever the stored times and percentages.
    pub fn estimated_completion(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.status != ProgressStatus::InProgress {
            return None;
        }
        if self.count(ProgressStatus::InProgress) == 0 && self.count(ProgressStatus::Paused) > 0 {
            return None;
        }
        let start = self.started_at?;
        let pct = self.overall_percentage;
        if !(pct > 0.0 && pct.is_finite()) {
            return None;
        }
        let elapsed = seconds_between(start, now).max(0.0);
        let remaining = elapsed * (100.0 - pct.min(100.0)) / pct;
        if !remaining.is_finite() || remaining > MAX_ETA_YEARS * 365.25 * 86_400.0 {
            return None;
        }
        // At most MAX_ETA_YEARS years in microseconds: fits an i64 with room to spare.
        now.checked_add_signed(chrono::TimeDelta::microseconds((remaining * 1e6) as i64))
    }
}

/// Estimates further ahead than this many years are no estimate at all (see
/// [`Upgrade::estimated_completion`]).
pub const MAX_ETA_YEARS: f64 = 10.0;

/// Progress of one task (reference `TaskProgress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The upgrade this task belongs to.
    pub upgrade_id: String,
    /// Caller-chosen id, unique within the upgrade.
    pub task_id: String,
    /// Display name (`task_name` on the wire, as in the reference; `name` is read too).
    #[serde(rename = "task_name", alias = "name")]
    pub name: String,
    /// Kind of task.
    pub task_type: TaskType,
    /// Parent in the task tree.
    pub parent_task_id: Option<String>,
    /// Current status.
    pub status: ProgressStatus,
    /// 0..=100; for a task with children, the weighted mean of the children.
    pub percentage: f64,
    /// Name of the step now running.
    pub current_step: Option<String>,
    /// Number of steps, when known; `step` then sets the percentage.
    pub total_steps: Option<u32>,
    /// Steps done.
    pub completed_steps: u32,
    /// Weight of this task in its parent's (or the upgrade's) mean.
    pub weight: f64,
    /// Number of direct children.
    pub children: u32,
    /// Error of a failed task.
    pub error_message: Option<String>,
    /// How many times the task was retried.
    pub retry_count: u32,
    /// Latest message reported.
    pub last_message: Option<String>,
    /// When the task was added.
    pub created_at: DateTime<Utc>,
    /// When it (last) started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed, failed or was cancelled.
    pub completed_at: Option<DateTime<Utc>>,
    /// Seconds from start to completion.
    pub duration: Option<f64>,
    /// Caller metadata.
    pub metadata: JsonMap,
}

/// A task with its most recent events (newest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDetail {
    /// The task.
    #[serde(flatten)]
    pub task: Task,
    /// The task's most recent events, newest first.
    pub recent_events: Vec<ProgressEvent>,
}

/// The reference `get_progress_summary` keys (with the same names and meanings; `status` in
/// lower case, `duration` in seconds), plus the counts of the other statuses, the end and
/// estimated end, the failed upgrade's error, its metadata and its latest seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressSummary {
    /// Upgrade id.
    pub upgrade_id: String,
    /// Plan id.
    pub plan_id: String,
    /// Cluster name.
    pub cluster_name: String,
    /// Upgrade status.
    pub status: ProgressStatus,
    /// Current phase.
    pub current_phase: Option<String>,
    /// Overall percentage, 0..=100 (the weighted mean of the top-level tasks).
    pub overall_percentage: f64,
    /// The same value as `overall_percentage` (the reference keeps both).
    pub progress_percentage: f64,
    /// The first running task, else the most recently added failed one, else `None`.
    pub current_task: Option<CurrentTask>,
    /// Number of tasks.
    pub total_tasks: u64,
    /// Tasks running (`in_progress`).
    pub active_tasks: u64,
    /// Tasks completed.
    pub completed_tasks: u64,
    /// Tasks failed.
    pub failed_tasks: u64,
    /// Tasks paused.
    pub paused_tasks: u64,
    /// Tasks cancelled.
    pub cancelled_tasks: u64,
    /// Tasks not started.
    pub not_started_tasks: u64,
    /// Names of the running tasks, in the order they were added (at most [`MAX_NAMES`]).
    pub active_task_names: Vec<String>,
    /// Names of the failed tasks, in the order they were added (at most [`MAX_NAMES`]).
    pub failed_task_names: Vec<String>,
    /// Start time.
    pub started_at: Option<DateTime<Utc>>,
    /// End time.
    pub completed_at: Option<DateTime<Utc>>,
    /// Seconds since start (until end).
    pub duration: Option<f64>,
    /// Estimated end: from the duration history of the unfinished tasks when every one has
    /// some (`eta_source` `history`), else linear in elapsed time (`rate`); `None` for ended,
    /// failed or wholly paused upgrades and before any progress.
    pub estimated_completion: Option<DateTime<Utc>>,
    /// Where `estimated_completion` came from; `None` when there is no estimate.
    #[serde(default)]
    pub eta_source: Option<EtaSource>,
    /// With a `history` estimate: `[earliest, latest]`, from the p25 and p75 of the history.
    #[serde(default)]
    pub eta_range: Option<[DateTime<Utc>; 2]>,
    /// Running tasks past the p90 of their history with no event for 5 minutes.
    #[serde(default)]
    pub stalled_tasks: u64,
    /// Names of the stalled tasks, in the order they were added.
    #[serde(default)]
    pub stalled_task_names: Vec<String>,
    /// Error of a failed upgrade.
    pub error_message: Option<String>,
    /// Upgrade metadata.
    pub metadata: JsonMap,
    /// Seq of the upgrade's latest event.
    pub last_seq: u64,
    /// When the upgrade was created (lists show the newest first).
    #[serde(default = "epoch")]
    pub created_at: DateTime<Utc>,
}

fn epoch() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH
}

/// Where a summary's `estimated_completion` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EtaSource {
    /// The medians of the unfinished tasks' past durations.
    History,
    /// The current rate: elapsed time and overall percentage.
    Rate,
}

/// The most names [`ProgressSummary::active_task_names`] and
/// [`ProgressSummary::failed_task_names`] hold (the counts are always exact).
pub const MAX_NAMES: usize = 10_000;

/// The reference summary's `current_task`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentTask {
    /// Task id.
    pub task_id: String,
    /// Task name.
    pub task_name: String,
    /// Task status.
    pub status: ProgressStatus,
    /// Task percentage.
    pub percentage: f64,
}

impl CurrentTask {
    fn of(t: &Task) -> CurrentTask {
        CurrentTask {
            task_id: t.task_id.clone(),
            task_name: t.name.clone(),
            status: t.status,
            percentage: t.percentage,
        }
    }
}

impl ProgressSummary {
    /// Builds the summary of `upgrade` as seen at `now`, from its running tasks and its failed
    /// tasks (each in the order they were added; the lists may be cut at [`MAX_NAMES`], but
    /// `last_failed` is the most recently added failed task).
    pub fn of(
        upgrade: &Upgrade,
        now: DateTime<Utc>,
        active: &[Task],
        failed: &[Task],
        last_failed: Option<&Task>,
    ) -> ProgressSummary {
        let current_task = active.first().or(last_failed).map(CurrentTask::of);
        let names = |ts: &[Task]| ts.iter().take(MAX_NAMES).map(|t| t.name.clone()).collect();
        ProgressSummary {
            upgrade_id: upgrade.upgrade_id.clone(),
            plan_id: upgrade.plan_id.clone(),
            cluster_name: upgrade.cluster_name.clone(),
            status: upgrade.status,
            current_phase: upgrade.current_phase.clone(),
            overall_percentage: upgrade.overall_percentage,
            progress_percentage: upgrade.overall_percentage,
            current_task,
            total_tasks: upgrade.total_tasks(),
            active_tasks: upgrade.count(ProgressStatus::InProgress),
            completed_tasks: upgrade.count(ProgressStatus::Completed),
            failed_tasks: upgrade.count(ProgressStatus::Failed),
            paused_tasks: upgrade.count(ProgressStatus::Paused),
            cancelled_tasks: upgrade.count(ProgressStatus::Cancelled),
            not_started_tasks: upgrade.count(ProgressStatus::NotStarted),
            active_task_names: names(active),
            failed_task_names: names(failed),
            started_at: upgrade.started_at,
            completed_at: upgrade.completed_at,
            duration: upgrade.duration_seconds(now),
            estimated_completion: upgrade.estimated_completion(now),
            eta_source: upgrade.estimated_completion(now).map(|_| EtaSource::Rate),
            eta_range: None,
            stalled_tasks: 0,
            stalled_task_names: Vec::new(),
            error_message: upgrade.error_message.clone(),
            metadata: upgrade.metadata.clone(),
            last_seq: upgrade.last_seq,
            created_at: upgrade.created_at,
        }
    }
}

/// The current time at the precision stores keep (microseconds), so values returned at creation
/// equal values read back.
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Seconds from `a` to `b`, with microsecond precision.
pub fn seconds_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// A status change of a task or an upgrade, as given to status callbacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// Seq of the event that changed the status.
    pub seq: u64,
    /// The upgrade.
    pub upgrade_id: String,
    /// The task, or `None` for the upgrade itself.
    pub task_id: Option<String>,
    /// Status before.
    pub from: ProgressStatus,
    /// Status after.
    pub to: ProgressStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_their_wire_names() {
        for s in ProgressStatus::ALL {
            assert_eq!(s.as_str().parse::<ProgressStatus>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for t in TaskType::ALL {
            assert_eq!(t.as_str().parse::<TaskType>().unwrap(), t);
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        for (i, k) in EventKind::ALL.iter().enumerate() {
            assert_eq!(EventKind::from_code(i as i64), Some(*k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(EventKind::from_code(99), None);
    }

    /// The lists README "Using it" documents, copied literally (guarantee P2).
    #[test]
    fn the_documented_types_and_statuses_are_exactly_these() {
        let statuses: Vec<&str> = ProgressStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            statuses,
            [
                "not_started",
                "in_progress",
                "completed",
                "failed",
                "paused",
                "cancelled"
            ]
        );
        let types: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "upgrade_plan",
                "upgrade_step",
                "validation",
                "rollback",
                "cleanup"
            ]
        );
        let err = "x".parse::<ProgressStatus>().unwrap_err().to_string();
        assert!(
            err.ends_with(
                "expected one of not_started, in_progress, completed, failed, paused, cancelled"
            ),
            "{err}"
        );
        let err = "x".parse::<TaskType>().unwrap_err().to_string();
        assert!(
            err.ends_with(
                "expected one of upgrade_plan, upgrade_step, validation, rollback, cleanup"
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_enum_names_say_what_is_allowed() {
        let err = "done".parse::<ProgressStatus>().unwrap_err().to_string();
        assert!(
            err.contains("\"done\"") && err.contains("in_progress"),
            "{err}"
        );
        let err = "step".parse::<TaskType>().unwrap_err().to_string();
        assert!(err.contains("upgrade_step"), "{err}");
    }

    #[test]
    fn estimate_is_linear_in_elapsed_time() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let now = start + chrono::Duration::seconds(60);
        let mut u = Upgrade {
            upgrade_id: "u".into(),
            plan_id: "p".into(),
            cluster_name: "c".into(),
            status: ProgressStatus::InProgress,
            current_phase: None,
            overall_percentage: 25.0,
            created_at: start,
            started_at: Some(start),
            completed_at: None,
            error_message: None,
            metadata: JsonMap::new(),
            task_counts: [0; 6],
            last_seq: 0,
        };
        assert_eq!(
            u.estimated_completion(now),
            Some(start + chrono::Duration::seconds(240))
        );
        u.overall_percentage = 0.0;
        assert_eq!(u.estimated_completion(now), None);
    }

    #[test]
    fn estimate_never_panics_and_is_absent_when_meaningless() {
        let start = DateTime::parse_from_rfc3339("1970-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut u = Upgrade {
            upgrade_id: "u".into(),
            plan_id: "p".into(),
            cluster_name: "c".into(),
            status: ProgressStatus::InProgress,
            current_phase: None,
            overall_percentage: 0.01,
            created_at: start,
            started_at: Some(start),
            completed_at: None,
            error_message: None,
            metadata: JsonMap::new(),
            task_counts: [0, 1, 0, 0, 0, 0],
            last_seq: 0,
        };
        let now = Utc::now();
        // Started in 1970 at 0.01%: millions of years ahead, once a panic.
        assert_eq!(u.estimated_completion(now), None);
        for pct in [1e-9, f64::MIN_POSITIVE, 1e-300, 5e-324] {
            u.overall_percentage = pct;
            u.started_at = Some(now - chrono::Duration::seconds(90));
            assert_eq!(u.estimated_completion(now), None, "{pct}");
        }
        for (start, end) in [
            (DateTime::<Utc>::MIN_UTC, now),
            (now, DateTime::<Utc>::MAX_UTC),
            (DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC),
        ] {
            u.started_at = Some(start);
            u.overall_percentage = 50.0;
            let _ = u.estimated_completion(end);
            let _ = u.duration_seconds(end);
        }
        // The 10-year bound: at 50%, the remaining time equals the elapsed time, so an
        // upgrade started 9.9 years ago has an estimate and one started 10.1 years ago none.
        assert_eq!(MAX_ETA_YEARS, 10.0);
        let year = 365.25 * 86_400.0;
        u.task_counts = [0, 1, 0, 0, 0, 0];
        u.overall_percentage = 50.0;
        for (years, some) in [(9.9, true), (10.1, false)] {
            u.started_at = Some(now - chrono::Duration::seconds((years * year) as i64));
            let eta = u.estimated_completion(now);
            assert_eq!(eta.is_some(), some, "{years} years: {eta:?}");
            if let Some(eta) = eta {
                let ahead = seconds_between(now, eta) / year;
                assert!((ahead - years).abs() < 0.01, "{ahead}");
            }
        }
        // Ended, failed or wholly paused upgrades have no estimate.
        u.started_at = Some(now - chrono::Duration::seconds(60));
        u.overall_percentage = 50.0;
        assert!(u.estimated_completion(now).is_some());
        u.task_counts = [0, 0, 0, 0, 1, 0];
        assert_eq!(u.estimated_completion(now), None, "paused");
        u.task_counts = [0, 1, 0, 0, 1, 0];
        for status in [ProgressStatus::Completed, ProgressStatus::Failed] {
            u.status = status;
            u.completed_at = Some(now);
            assert_eq!(u.estimated_completion(now), None, "{status}");
        }
    }
}
