//! Operations that change progress state. A [`Command`] is what a store executes in one
//! transaction; its JSON form (tagged by `op`, the model's field names) is also the wire format
//! of `progress apply` and of the HTTP API's request bodies.
//!
//! [`Command::validate`] checks everything that can be checked without the store (ids, names,
//! percentages, sizes), so a bad input is rejected before any write.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{JsonMap, ProgressEvent, Task, TaskType, Upgrade};

/// Longest id (upgrade, plan, task), in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest name (task name, cluster name, phase), in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest message or error message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;
/// Largest `details` or `metadata` object, serialized, in bytes.
pub const MAX_JSON_LEN: usize = 64 * 1024;
/// Deepest task tree (a top-level task has depth 0).
pub const MAX_DEPTH: u32 = 32;
/// Most tasks one `task.add_many` may add, and most tasks of one imported upgrade.
pub const MAX_BATCH_TASKS: usize = 100_000;
/// Longest task duration a store accepts, in seconds (100 years).
pub const MAX_DURATION_SECS: f64 = 100.0 * 365.25 * 86_400.0;

/// A task to add: the fields a caller chooses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Id, unique within the upgrade.
    pub task_id: String,
    /// Display name (`task_name`, the reference's name for it, is accepted too).
    #[serde(alias = "task_name")]
    pub name: String,
    /// Kind of task.
    pub task_type: TaskType,
    /// Parent task, which must exist (or come earlier in the same batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<String>,
    /// Number of steps, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u32>,
    /// Weight in the parent's mean (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Caller metadata.
    #[serde(default, skip_serializing_if = "JsonMap::is_empty")]
    pub metadata: JsonMap,
}

impl NewTask {
    /// A task with default weight, no parent and no steps.
    pub fn new(task_id: impl Into<String>, name: impl Into<String>, task_type: TaskType) -> Self {
        NewTask {
            task_id: task_id.into(),
            name: name.into(),
            task_type,
            parent_task_id: None,
            total_steps: None,
            weight: None,
            metadata: JsonMap::new(),
        }
    }

    /// Sets the parent.
    pub fn parent(mut self, parent: impl Into<String>) -> Self {
        self.parent_task_id = Some(parent.into());
        self
    }

    /// Sets the number of steps.
    pub fn steps(mut self, total: u32) -> Self {
        self.total_steps = Some(total);
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: f64) -> Self {
        self.weight = Some(weight);
        self
    }

    fn validate(&self) -> Result<()> {
        check_id("task_id", &self.task_id)?;
        check_name("name", &self.name)?;
        if let Some(p) = &self.parent_task_id {
            check_id("parent_task_id", p)?;
            if *p == self.task_id {
                return Err(Error::invalid(format!(
                    "task {:?} cannot be its own parent",
                    self.task_id
                )));
            }
        }
        if let Some(w) = self.weight
            && !(w.is_finite() && w > 0.0 && w <= 1e6)
        {
            return Err(Error::invalid(format!(
                "weight of task {:?} must be a number in (0, 1000000], got {w}",
                self.task_id
            )));
        }
        if self.total_steps == Some(0) {
            return Err(Error::invalid(format!(
                "total_steps of task {:?} must be at least 1",
                self.task_id
            )));
        }
        check_json("metadata", &self.metadata)
    }
}

/// A state change, executed atomically by a [`crate::store::ProgressStore`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
#[non_exhaustive]
pub enum Command {
    /// Create an upgrade (status `not_started`).
    #[serde(rename = "upgrade.create")]
    UpgradeCreate {
        /// New upgrade id.
        upgrade_id: String,
        /// Plan id.
        plan_id: String,
        /// Cluster name.
        cluster_name: String,
        /// Caller metadata.
        #[serde(default, skip_serializing_if = "JsonMap::is_empty")]
        metadata: JsonMap,
    },
    /// Start an upgrade, optionally entering a phase.
    #[serde(rename = "upgrade.start")]
    UpgradeStart {
        /// Upgrade id.
        upgrade_id: String,
        /// Initial phase.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phase: Option<String>,
    },
    /// Enter a new phase.
    #[serde(rename = "upgrade.phase")]
    UpgradePhase {
        /// Upgrade id.
        upgrade_id: String,
        /// Phase name.
        phase: String,
    },
    /// Complete an upgrade.
    #[serde(rename = "upgrade.complete")]
    UpgradeComplete {
        /// Upgrade id.
        upgrade_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Fail an upgrade.
    #[serde(rename = "upgrade.fail")]
    UpgradeFail {
        /// Upgrade id.
        upgrade_id: String,
        /// What went wrong.
        error_message: String,
    },
    /// Add one task (the fields of [`NewTask`]).
    #[serde(rename = "task.add")]
    TaskAdd {
        /// Upgrade id.
        upgrade_id: String,
        /// Id, unique within the upgrade.
        task_id: String,
        /// Display name (`task_name`, the reference's name for it, is accepted too).
        #[serde(alias = "task_name")]
        name: String,
        /// Kind of task.
        task_type: TaskType,
        /// Parent task, which must exist.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_task_id: Option<String>,
        /// Number of steps, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_steps: Option<u32>,
        /// Weight in the parent's mean (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<f64>,
        /// Caller metadata.
        #[serde(default, skip_serializing_if = "JsonMap::is_empty")]
        metadata: JsonMap,
    },
    /// Add many tasks at once (parents may come earlier in the same list).
    #[serde(rename = "task.add_many")]
    TaskAddMany {
        /// Upgrade id.
        upgrade_id: String,
        /// The tasks.
        tasks: Vec<NewTask>,
    },
    /// Start a task.
    #[serde(rename = "task.start")]
    TaskStart {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Report a percentage (starts a task that had not started).
    #[serde(rename = "task.update")]
    TaskUpdate {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// 0..=100.
        percentage: f64,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// Structured details.
        #[serde(default, skip_serializing_if = "JsonMap::is_empty")]
        details: JsonMap,
    },
    /// Report steps done; the percentage follows when the task has `total_steps`.
    #[serde(rename = "task.step")]
    TaskStep {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Steps done so far.
        completed_steps: u32,
        /// Name of the step now running.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_step: Option<String>,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Complete a task (percentage becomes 100).
    #[serde(rename = "task.complete")]
    TaskComplete {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Fail a task.
    #[serde(rename = "task.fail")]
    TaskFail {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// What went wrong.
        error_message: String,
    },
    /// Pause a running task.
    #[serde(rename = "task.pause")]
    TaskPause {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Resume a paused task.
    #[serde(rename = "task.resume")]
    TaskResume {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Cancel a task.
    #[serde(rename = "task.cancel")]
    TaskCancel {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Retry a failed or cancelled task (`retry_count` + 1, back to `in_progress`).
    #[serde(rename = "task.retry")]
    TaskRetry {
        /// Upgrade id.
        upgrade_id: String,
        /// Task id.
        task_id: String,
        /// Optional message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

/// The task operations that go through the state machine, without their payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskOp {
    Start,
    Update,
    Step,
    Complete,
    Fail,
    Pause,
    Resume,
    Cancel,
    Retry,
}

impl Command {
    /// The upgrade this command changes.
    pub fn upgrade_id(&self) -> &str {
        match self {
            Command::UpgradeCreate { upgrade_id, .. }
            | Command::UpgradeStart { upgrade_id, .. }
            | Command::UpgradePhase { upgrade_id, .. }
            | Command::UpgradeComplete { upgrade_id, .. }
            | Command::UpgradeFail { upgrade_id, .. }
            | Command::TaskAdd { upgrade_id, .. }
            | Command::TaskAddMany { upgrade_id, .. }
            | Command::TaskStart { upgrade_id, .. }
            | Command::TaskUpdate { upgrade_id, .. }
            | Command::TaskStep { upgrade_id, .. }
            | Command::TaskComplete { upgrade_id, .. }
            | Command::TaskFail { upgrade_id, .. }
            | Command::TaskPause { upgrade_id, .. }
            | Command::TaskResume { upgrade_id, .. }
            | Command::TaskCancel { upgrade_id, .. }
            | Command::TaskRetry { upgrade_id, .. } => upgrade_id,
        }
    }

    /// The wire name of the operation, e.g. `task.update`.
    pub fn op_name(&self) -> &'static str {
        match self {
            Command::UpgradeCreate { .. } => "upgrade.create",
            Command::UpgradeStart { .. } => "upgrade.start",
            Command::UpgradePhase { .. } => "upgrade.phase",
            Command::UpgradeComplete { .. } => "upgrade.complete",
            Command::UpgradeFail { .. } => "upgrade.fail",
            Command::TaskAdd { .. } => "task.add",
            Command::TaskAddMany { .. } => "task.add_many",
            Command::TaskStart { .. } => "task.start",
            Command::TaskUpdate { .. } => "task.update",
            Command::TaskStep { .. } => "task.step",
            Command::TaskComplete { .. } => "task.complete",
            Command::TaskFail { .. } => "task.fail",
            Command::TaskPause { .. } => "task.pause",
            Command::TaskResume { .. } => "task.resume",
            Command::TaskCancel { .. } => "task.cancel",
            Command::TaskRetry { .. } => "task.retry",
        }
    }

    /// For task state-machine commands: the task id and the operation.
    pub(crate) fn task_op(&self) -> Option<(&str, TaskOp)> {
        Some(match self {
            Command::TaskStart { task_id, .. } => (task_id, TaskOp::Start),
            Command::TaskUpdate { task_id, .. } => (task_id, TaskOp::Update),
            Command::TaskStep { task_id, .. } => (task_id, TaskOp::Step),
            Command::TaskComplete { task_id, .. } => (task_id, TaskOp::Complete),
            Command::TaskFail { task_id, .. } => (task_id, TaskOp::Fail),
            Command::TaskPause { task_id, .. } => (task_id, TaskOp::Pause),
            Command::TaskResume { task_id, .. } => (task_id, TaskOp::Resume),
            Command::TaskCancel { task_id, .. } => (task_id, TaskOp::Cancel),
            Command::TaskRetry { task_id, .. } => (task_id, TaskOp::Retry),
            _ => return None,
        })
    }

    /// The same task command for another task of the same upgrade (a parent's operation
    /// applied to its children). Other commands are returned unchanged.
    pub(crate) fn for_task(&self, other: &str) -> Command {
        let mut c = self.clone();
        match &mut c {
            Command::TaskStart { task_id, .. }
            | Command::TaskUpdate { task_id, .. }
            | Command::TaskStep { task_id, .. }
            | Command::TaskComplete { task_id, .. }
            | Command::TaskFail { task_id, .. }
            | Command::TaskPause { task_id, .. }
            | Command::TaskResume { task_id, .. }
            | Command::TaskCancel { task_id, .. }
            | Command::TaskRetry { task_id, .. } => other.clone_into(task_id),
            _ => {}
        }
        c
    }

    /// Builds the command that adds `task` to `upgrade_id`.
    pub fn add_task(upgrade_id: impl Into<String>, task: NewTask) -> Command {
        Command::TaskAdd {
            upgrade_id: upgrade_id.into(),
            task_id: task.task_id,
            name: task.name,
            task_type: task.task_type,
            parent_task_id: task.parent_task_id,
            total_steps: task.total_steps,
            weight: task.weight,
            metadata: task.metadata,
        }
    }

    /// The tasks a `task.add` or `task.add_many` adds (empty for other commands).
    pub(crate) fn new_tasks(&self) -> Cow<'_, [NewTask]> {
        match self {
            Command::TaskAdd {
                task_id,
                name,
                task_type,
                parent_task_id,
                total_steps,
                weight,
                metadata,
                ..
            } => Cow::Owned(vec![NewTask {
                task_id: task_id.clone(),
                name: name.clone(),
                task_type: *task_type,
                parent_task_id: parent_task_id.clone(),
                total_steps: *total_steps,
                weight: *weight,
                metadata: metadata.clone(),
            }]),
            Command::TaskAddMany { tasks, .. } => Cow::Borrowed(tasks),
            _ => Cow::Borrowed(&[]),
        }
    }

    /// Checks everything that does not need the store. Errors name the field and the fix.
    pub fn validate(&self) -> Result<()> {
        check_id("upgrade_id", self.upgrade_id())?;
        match self {
            Command::UpgradeCreate {
                plan_id,
                cluster_name,
                metadata,
                ..
            } => {
                check_id("plan_id", plan_id)?;
                check_name("cluster_name", cluster_name)?;
                check_json("metadata", metadata)
            }
            Command::UpgradeStart { phase, .. } => {
                if let Some(p) = phase {
                    check_name("phase", p)?;
                }
                Ok(())
            }
            Command::UpgradePhase { phase, .. } => check_name("phase", phase),
            Command::UpgradeComplete { message, .. } => check_message("message", message),
            Command::UpgradeFail { error_message, .. } => check_error(error_message),
            Command::TaskAdd { .. } => self.new_tasks().iter().try_for_each(NewTask::validate),
            Command::TaskAddMany { tasks, .. } => {
                if tasks.is_empty() {
                    return Err(Error::invalid("tasks must not be empty"));
                }
                if tasks.len() > MAX_BATCH_TASKS {
                    return Err(Error::invalid(format!(
                        "at most {MAX_BATCH_TASKS} tasks can be added at once, got {}",
                        tasks.len()
                    )));
                }
                tasks.iter().try_for_each(NewTask::validate)
            }
            Command::TaskStart {
                task_id, message, ..
            }
            | Command::TaskComplete {
                task_id, message, ..
            }
            | Command::TaskPause {
                task_id, message, ..
            }
            | Command::TaskResume {
                task_id, message, ..
            }
            | Command::TaskCancel {
                task_id, message, ..
            }
            | Command::TaskRetry {
                task_id, message, ..
            } => {
                check_id("task_id", task_id)?;
                check_message("message", message)
            }
            Command::TaskUpdate {
                task_id,
                percentage,
                message,
                details,
                ..
            } => {
                check_id("task_id", task_id)?;
                check_percentage(*percentage)?;
                check_message("message", message)?;
                check_json("details", details)
            }
            Command::TaskStep {
                task_id,
                current_step,
                message,
                ..
            } => {
                check_id("task_id", task_id)?;
                if let Some(s) = current_step {
                    check_name("current_step", s)?;
                }
                check_message("message", message)
            }
            Command::TaskFail {
                task_id,
                error_message,
                ..
            } => {
                check_id("task_id", task_id)?;
                check_error(error_message)
            }
        }
    }
}

/// Checks an upgrade taken from elsewhere (a reference file, the store protocol, a copy) as
/// the commands that would have built it are checked: ids, names, text, JSON sizes, finite
/// and bounded numbers, steps within totals, parents known and listed before their children,
/// no duplicate, depth at most [`MAX_DEPTH`], events naming tasks of the upgrade. Every
/// import path runs it before writing anything.
pub fn check_import(upgrade: &Upgrade, tasks: &[Task], events: &[ProgressEvent]) -> Result<()> {
    // Times lie between 1970 and a day from now (clocks drift), and an end never precedes its
    // start: a start in 9999 once showed a duration of minus 250 billion seconds.
    let latest = crate::model::now() + chrono::TimeDelta::days(1);
    let check_time = |what: &str, t: Option<chrono::DateTime<chrono::Utc>>| -> Result<()> {
        match t {
            Some(t) if t.timestamp() < 0 || t > latest => Err(Error::invalid(format!(
                "{what} {t} is not between 1970 and now"
            ))),
            _ => Ok(()),
        }
    };
    let check_span = |what: &str,
                      created: chrono::DateTime<chrono::Utc>,
                      started: Option<chrono::DateTime<chrono::Utc>>,
                      completed: Option<chrono::DateTime<chrono::Utc>>|
     -> Result<()> {
        check_time(&format!("{what}: created_at"), Some(created))?;
        check_time(&format!("{what}: started_at"), started)?;
        check_time(&format!("{what}: completed_at"), completed)?;
        if let (Some(s), Some(c)) = (started, completed)
            && c < s
        {
            return Err(Error::invalid(format!(
                "{what}: completed_at {c} is before started_at {s}"
            )));
        }
        Ok(())
    };
    check_span(
        &format!("upgrade {:?}", upgrade.upgrade_id),
        upgrade.created_at,
        upgrade.started_at,
        upgrade.completed_at,
    )?;
    check_id("upgrade_id", &upgrade.upgrade_id)?;
    check_id("plan_id", &upgrade.plan_id)?;
    check_name("cluster_name", &upgrade.cluster_name)?;
    if let Some(p) = &upgrade.current_phase {
        check_name("current_phase", p)?;
    }
    if let Some(e) = &upgrade.error_message {
        check_text("error_message", e)?;
    }
    check_json("metadata", &upgrade.metadata)?;
    if tasks.len() > MAX_BATCH_TASKS {
        return Err(Error::invalid(format!(
            "an upgrade may have at most {MAX_BATCH_TASKS} tasks, got {}",
            tasks.len()
        )));
    }
    let mut depth: std::collections::HashMap<&str, u32> =
        std::collections::HashMap::with_capacity(tasks.len());
    for t in tasks {
        let what = |e: Error| match e {
            Error::InvalidInput(m) => Error::invalid(format!("task {:?}: {m}", t.task_id)),
            other => other,
        };
        check_id("task_id", &t.task_id)?;
        if t.upgrade_id != upgrade.upgrade_id {
            return Err(Error::invalid(format!(
                "task {:?} belongs to upgrade {:?}, not {:?}",
                t.task_id, t.upgrade_id, upgrade.upgrade_id
            )));
        }
        check_name("name", &t.name).map_err(what)?;
        check_percentage(t.percentage).map_err(what)?;
        if !(t.weight.is_finite() && t.weight > 0.0 && t.weight <= 1e6) {
            return Err(Error::invalid(format!(
                "task {:?}: weight must be a number in (0, 1000000], got {}",
                t.task_id, t.weight
            )));
        }
        match t.total_steps {
            Some(0) => {
                return Err(Error::invalid(format!(
                    "task {:?}: total_steps must be at least 1",
                    t.task_id
                )));
            }
            Some(total) if t.completed_steps > total => {
                return Err(Error::invalid(format!(
                    "task {:?}: completed_steps {} exceeds total_steps {total}",
                    t.task_id, t.completed_steps
                )));
            }
            _ => {}
        }
        if let Some(s) = &t.current_step {
            check_name("current_step", s).map_err(what)?;
        }
        if let Some(e) = &t.error_message {
            check_text("error_message", e).map_err(what)?;
        }
        if let Some(m) = &t.last_message {
            check_text("last_message", m).map_err(what)?;
        }
        if let Some(d) = t.duration
            && !(d.is_finite() && (0.0..=MAX_DURATION_SECS).contains(&d))
        {
            return Err(Error::invalid(format!(
                "task {:?}: duration must be between 0 and {MAX_DURATION_SECS} seconds (100 years), got {d}",
                t.task_id
            )));
        }
        check_json("metadata", &t.metadata).map_err(what)?;
        check_span(
            &format!("task {:?}", t.task_id),
            t.created_at,
            t.started_at,
            t.completed_at,
        )?;
        let d = match &t.parent_task_id {
            None => 0,
            Some(p) => {
                check_id("parent_task_id", p).map_err(what)?;
                let parent = depth.get(p.as_str()).copied().ok_or_else(|| {
                    Error::invalid(format!(
                        "task {:?} names parent {p:?}, which is not among the tasks before it",
                        t.task_id
                    ))
                })?;
                parent + 1
            }
        };
        if d > MAX_DEPTH {
            return Err(Error::invalid(format!(
                "task {:?} is {d} levels deep; the limit is {MAX_DEPTH}",
                t.task_id
            )));
        }
        if depth.insert(&t.task_id, d).is_some() {
            return Err(Error::invalid(format!(
                "task {:?} appears twice",
                t.task_id
            )));
        }
    }
    for e in events {
        if e.upgrade_id != upgrade.upgrade_id {
            return Err(Error::invalid(format!(
                "event {} belongs to upgrade {:?}, not {:?}",
                e.event_id, e.upgrade_id, upgrade.upgrade_id
            )));
        }
        if let Some(t) = &e.task_id
            && !depth.contains_key(t.as_str())
        {
            return Err(Error::invalid(format!(
                "event {} names unknown task {t:?}",
                e.event_id
            )));
        }
        let what = |err: Error| match err {
            Error::InvalidInput(m) => Error::invalid(format!("event {}: {m}", e.event_id)),
            other => other,
        };
        if let Some(m) = &e.message {
            check_text("message", m).map_err(what)?;
        }
        check_json("details", &e.details).map_err(what)?;
        check_percentage(e.percentage).map_err(what)?;
        check_time(
            &format!("event {}: timestamp", e.event_id),
            Some(e.timestamp),
        )?;
    }
    Ok(())
}

/// Checks a percentage: a finite number in 0..=100.
pub fn check_percentage(p: f64) -> Result<()> {
    if p.is_nan() {
        return Err(Error::invalid(
            "percentage must be a number in 0..=100, got NaN",
        ));
    }
    if !(0.0..=100.0).contains(&p) {
        return Err(Error::invalid(format!(
            "percentage must be in 0..=100, got {p}"
        )));
    }
    Ok(())
}

/// Checks an id: 1..=128 bytes, no control characters, no whitespace, no `/` or `\`, not `.`
/// or `..` (ids appear in file names, URLs and S3 keys).
pub fn check_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{field} must not be empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(format!(
            "{field} is {} bytes long; the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || *c == '/' || *c == '\\')
    {
        return Err(Error::invalid(format!(
            "{field} {id:?} contains {c:?}; ids may not contain whitespace, control characters, '/' or '\\'"
        )));
    }
    if id == "." || id == ".." {
        return Err(Error::invalid(format!("{field} may not be {id:?}")));
    }
    Ok(())
}

/// Checks a display name: 1..=256 bytes, no control characters.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::invalid(format!("{field} must not be empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{field} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "{field} {name:?} contains the control character {c:?}"
        )));
    }
    Ok(())
}

fn check_message(field: &str, message: &Option<String>) -> Result<()> {
    match message {
        Some(m) => check_text(field, m),
        None => Ok(()),
    }
}

/// Checks free text (messages, error messages): at most [`MAX_MESSAGE_LEN`] bytes, and no
/// control characters but `\n` and `\t` (an escape sequence stored here would reach every
/// terminal that prints it).
pub fn check_text(field: &str, text: &str) -> Result<()> {
    if text.len() > MAX_MESSAGE_LEN {
        return Err(Error::invalid(format!(
            "{field} is {} bytes long; the limit is {MAX_MESSAGE_LEN}",
            text.len()
        )));
    }
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() && *c != '\n' && *c != '\t')
    {
        return Err(Error::invalid(format!(
            "{field} contains the control character {c:?}; only newlines and tabs are allowed"
        )));
    }
    Ok(())
}

fn check_error(error_message: &str) -> Result<()> {
    if error_message.trim().is_empty() {
        return Err(Error::invalid("error_message must not be empty"));
    }
    check_text("error_message", error_message)
}

/// Checks a details or metadata object against [`MAX_JSON_LEN`].
pub fn check_json(field: &str, map: &JsonMap) -> Result<()> {
    if map.is_empty() {
        return Ok(());
    }
    let len = serde_json::to_vec(map)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if len > MAX_JSON_LEN {
        return Err(Error::invalid(format!(
            "{field} is {len} bytes as JSON; the limit is {MAX_JSON_LEN}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(p: f64) -> Command {
        Command::TaskUpdate {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            percentage: p,
            message: None,
            details: JsonMap::new(),
        }
    }

    #[test]
    fn percentages_outside_range_or_nan_are_rejected() {
        for p in [-0.1, 100.01, f64::NAN, f64::INFINITY] {
            let err = update(p).validate().unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{p}: {err}");
            assert!(err.to_string().contains("percentage"), "{err}");
        }
        for p in [0.0, 42.5, 100.0] {
            update(p).validate().unwrap();
        }
    }

    #[test]
    fn ids_are_checked() {
        for (id, needle) in [
            ("", "must not be empty"),
            ("a b", "whitespace"),
            ("a/b", "'/'"),
            ("a\u{7}", "control"),
            ("..", "may not be"),
        ] {
            let err = check_id("task_id", id).unwrap_err().to_string();
            assert!(err.contains(needle), "{id:?}: {err}");
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert!(
            check_id("task_id", &long)
                .unwrap_err()
                .to_string()
                .contains("limit is 128")
        );
        check_id("task_id", "node-group.ng-1:drain@ip-10-0-0-1").unwrap();
        // README "Limits": no `\`, named as the character found (the message's fixed tail
        // names it too, so match the part that quotes the id and the character).
        let err = check_id("task_id", "a\\b").unwrap_err().to_string();
        assert!(
            err.starts_with("task_id \"a\\\\b\" contains '\\\\';"),
            "{err}"
        );
        for (id, needle) in [("a\tb", "'\\t'"), ("a\u{a0}b", "'\\u{a0}'")] {
            let err = check_id("task_id", id).unwrap_err().to_string();
            assert!(
                err.contains(&format!("contains {needle};")),
                "{id:?}: {err}"
            );
        }
        // 1 to 128 bytes, counted in bytes: 128 ASCII bytes pass, 65 two-byte characters do not.
        check_id("task_id", &"x".repeat(MAX_ID_LEN)).unwrap();
        check_id("task_id", "x").unwrap();
        let wide = "é".repeat(65);
        assert!(
            check_id("task_id", &wide)
                .unwrap_err()
                .to_string()
                .contains("is 130 bytes long; the limit is 128")
        );
    }

    #[test]
    fn json_lines_parse_with_model_field_names() {
        let c: Command = serde_json::from_str(
            r#"{"op":"task.update","upgrade_id":"u1","task_id":"t1","percentage":42.0,"message":"m","details":{"k":1}}"#,
        )
        .unwrap();
        assert_eq!(c.op_name(), "task.update");
        let c: Command = serde_json::from_str(
            r#"{"op":"task.add","upgrade_id":"u1","task_id":"t2","name":"n","task_type":"validation","parent_task_id":"t1","total_steps":3,"weight":2}"#,
        )
        .unwrap();
        let tasks = c.new_tasks();
        assert_eq!(tasks[0].parent_task_id.as_deref(), Some("t1"));
        assert_eq!(tasks[0].weight, Some(2.0));
        assert_eq!(tasks[0].total_steps, Some(3));
        let err = serde_json::from_str::<Command>(
            r#"{"op":"task.update","upgrade_id":"u1","task_id":"t1","percent":4}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("percent"), "{err}");
        let err = serde_json::from_str::<Command>(r#"{"op":"task.explode","upgrade_id":"u1"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("task.explode"), "{err}");
    }

    #[test]
    fn control_characters_are_refused_in_every_text_field() {
        let hostile = [
            "\u{1b}[2J",
            "bell\u{7}",
            "csi\u{9b}31m",
            "cr\roverwrite",
            "nul\0",
        ];
        for bad in hostile {
            let cmds = [
                Command::TaskFail {
                    upgrade_id: "u".into(),
                    task_id: "t".into(),
                    error_message: format!("boom {bad}"),
                },
                Command::TaskStart {
                    upgrade_id: "u".into(),
                    task_id: "t".into(),
                    message: Some(bad.into()),
                },
                Command::UpgradePhase {
                    upgrade_id: "u".into(),
                    phase: bad.into(),
                },
                Command::UpgradeFail {
                    upgrade_id: "u".into(),
                    error_message: bad.into(),
                },
                Command::add_task("u", NewTask::new("t", bad, TaskType::Cleanup)),
            ];
            for c in cmds {
                let err = c.validate().unwrap_err();
                assert!(
                    err.to_string().contains("control character"),
                    "{bad:?}: {err}"
                );
            }
        }
        Command::TaskStart {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            message: Some("line 1\n\tline 2".into()),
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn self_parent_and_bad_weights_are_rejected() {
        let t = NewTask::new("a", "A", TaskType::Cleanup).parent("a");
        assert!(t.validate().unwrap_err().to_string().contains("own parent"));
        for w in [0.0, -1.0, f64::NAN] {
            let t = NewTask::new("a", "A", TaskType::Cleanup).weight(w);
            assert!(t.validate().unwrap_err().to_string().contains("weight"));
        }
    }
}
