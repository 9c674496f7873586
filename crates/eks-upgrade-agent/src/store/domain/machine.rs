//! The state machine: which operation is allowed from which status, and what it does to a task
//! or an upgrade. Pure functions over the model, shared by every storage backend, so the rules
//! are written once and a second backend cannot drift.
//!
//! Tasks:
//!
//! | operation | allowed from                          | to            |
//! |-----------|---------------------------------------|---------------|
//! | start     | not_started                           | in_progress   |
//! | update    | not_started, in_progress              | in_progress   |
//! | step      | not_started, in_progress              | in_progress   |
//! | complete  | not_started, in_progress              | completed     |
//! | fail      | not_started, in_progress, paused      | failed        |
//! | pause     | in_progress                           | paused        |
//! | resume    | paused                                | in_progress   |
//! | cancel    | not_started, in_progress, paused      | cancelled     |
//! | retry     | failed, cancelled                     | in_progress   |
//!
//! So an update to a completed, failed, paused or cancelled task is rejected, and only retry
//! leaves `failed` or `cancelled`. `completed` is final.
//!
//! Upgrades:
//!
//! | operation | allowed from             | to          |
//! |-----------|--------------------------|-------------|
//! | start     | not_started              | in_progress |
//! | phase     | not_started, in_progress | (unchanged) |
//! | complete  | in_progress              | completed   |
//! | fail      | not_started, in_progress | failed      |
//!
//! Percentages roll up: a task with children shows the weighted mean of its children (100 once
//! it is completed); the upgrade shows the weighted mean of its top-level tasks. Stores keep, per
//! parent, the sum of weights and of weighted percentages of its children, so a change costs
//! O(depth), never O(tasks).
//!
//! Statuses roll up too (`derived_status`): a task with children takes its status from them.
//! Stores keep, per parent, the number of children in each status, so deriving costs O(1) per
//! level. Operations on a task with children:
//!
//! | operation | on a task with children                                                  |
//! |-----------|--------------------------------------------------------------------------|
//! | start     | marks it started (as for a leaf)                                         |
//! | update    | refused: its percentage is its children's                                |
//! | complete  | refused while a subtask is unfinished (naming them); a no-op once done   |
//! | fail      | fails every unfinished leaf below it                                     |
//! | cancel    | cancels every unfinished leaf below it                                   |
//! | pause     | pauses every running leaf below it                                       |
//! | resume    | resumes every paused leaf below it                                       |
//! | retry     | retries every failed leaf below it (the cancelled ones when none failed) |
//!
//! A change below a completed task that would reopen it (a retried subtask) is refused:
//! `completed` stays final at every level. A subtask cannot be added where it would change its
//! parent's status (under a finished task, or a paused one with no subtasks yet). The
//! upgrade's own status stays explicit.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::model::{EventKind, ProgressStatus, Task, Upgrade, seconds_between};
use crate::store::domain::command::{Command, TaskOp};

use ProgressStatus::*;

/// Target status of a task operation, or the `InvalidTransition` error.
pub(crate) fn task_transition(task: &Task, op: TaskOp) -> Result<ProgressStatus> {
    let (allowed, to): (&[ProgressStatus], ProgressStatus) = match op {
        TaskOp::Start => (&[NotStarted], InProgress),
        TaskOp::Update | TaskOp::Step => (&[NotStarted, InProgress], InProgress),
        TaskOp::Complete => (&[NotStarted, InProgress], Completed),
        TaskOp::Fail => (&[NotStarted, InProgress, Paused], Failed),
        TaskOp::Pause => (&[InProgress], Paused),
        TaskOp::Resume => (&[Paused], InProgress),
        TaskOp::Cancel => (&[NotStarted, InProgress, Paused], Cancelled),
        TaskOp::Retry => (&[Failed, Cancelled], InProgress),
    };
    if allowed.contains(&task.status) {
        Ok(to)
    } else {
        Err(Error::InvalidTransition {
            what: format!("task {:?} of upgrade {:?}", task.task_id, task.upgrade_id),
            from: task.status,
            to,
        })
    }
}

/// Target status of an upgrade operation (`None` for commands that are not upgrade
/// transitions), or the `InvalidTransition` error.
pub(crate) fn upgrade_transition(
    upgrade_id: &str,
    from: ProgressStatus,
    command: &Command,
) -> Result<Option<ProgressStatus>> {
    let (allowed, to): (&[ProgressStatus], ProgressStatus) = match command {
        Command::UpgradeStart { .. } => (&[NotStarted], InProgress),
        Command::UpgradePhase { .. } => (&[NotStarted, InProgress], from),
        Command::UpgradeComplete { .. } => (&[InProgress], Completed),
        Command::UpgradeFail { .. } => (&[NotStarted, InProgress], Failed),
        _ => return Ok(None),
    };
    if allowed.contains(&from) {
        Ok(Some(to))
    } else {
        let to = if to == from { InProgress } else { to };
        Err(Error::InvalidTransition {
            what: format!("upgrade {upgrade_id:?}"),
            from,
            to,
        })
    }
}

/// Applies an upgrade command (start, phase, complete, fail) to `u`: the transition (an
/// `InvalidTransition` error), the times, phase, error and status. Returns the status it had
/// and the event to append (its percentage is the upgrade's overall percentage).
pub(crate) fn apply_upgrade(
    u: &mut Upgrade,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<(ProgressStatus, TaskEffect)> {
    let from = u.status;
    let to = upgrade_transition(&u.upgrade_id, from, command)?.unwrap_or(from);
    let (kind, message) = match command {
        Command::UpgradeStart { phase, .. } => {
            u.started_at = Some(now);
            if phase.is_some() {
                u.current_phase.clone_from(phase);
            }
            (EventKind::UpgradeStarted, phase.clone())
        }
        Command::UpgradePhase { phase, .. } => {
            u.current_phase = Some(phase.clone());
            (EventKind::UpgradePhaseChanged, Some(phase.clone()))
        }
        Command::UpgradeComplete { message, .. } => {
            u.completed_at = Some(now);
            (EventKind::UpgradeCompleted, message.clone())
        }
        Command::UpgradeFail { error_message, .. } => {
            u.completed_at = Some(now);
            u.error_message = Some(error_message.clone());
            (EventKind::UpgradeFailed, Some(error_message.clone()))
        }
        _ => return Err(Error::invalid("not an upgrade operation")),
    };
    u.status = to;
    Ok((from, TaskEffect { kind, message }))
}

/// What a task command did, for the event the store appends.
#[derive(Debug)]
pub(crate) struct TaskEffect {
    pub(crate) kind: EventKind,
    pub(crate) message: Option<String>,
}

/// Applies a task command to `task` (whose `percentage` is its effective percentage and
/// `children` its number of children). Returns the event to append. The caller recomputes the
/// effective percentage of a parent with [`effective_percentage`] and propagates the change.
pub(crate) fn apply_task(
    task: &mut Task,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<TaskEffect> {
    let (_, op) = command
        .task_op()
        .ok_or_else(|| Error::invalid(format!("{} is not a task operation", command.op_name())))?;
    let to = task_transition(task, op)?;
    let was_started = task.status != NotStarted;
    let finish = |task: &mut Task| {
        task.completed_at = Some(now);
        task.duration = task.started_at.map(|s| seconds_between(s, now));
    };
    let start = |task: &mut Task| {
        if !was_started {
            task.started_at = Some(now);
        }
    };
    let (kind, message) = match command {
        Command::TaskStart { message, .. } => {
            start(task);
            (EventKind::TaskStarted, message.clone())
        }
        Command::TaskUpdate {
            percentage,
            message,
            ..
        } => {
            if task.children > 0 {
                return Err(Error::invalid(format!(
                    "the percentage of task {:?} is rolled up from its {} subtasks; update those instead",
                    task.task_id, task.children
                )));
            }
            start(task);
            task.percentage = *percentage;
            (EventKind::TaskProgress, message.clone())
        }
        Command::TaskStep {
            completed_steps,
            current_step,
            message,
            ..
        } => {
            if let Some(total) = task.total_steps {
                if *completed_steps > total {
                    return Err(Error::invalid(format!(
                        "completed_steps {completed_steps} exceeds total_steps {total} of task {:?}",
                        task.task_id
                    )));
                }
                if task.children == 0 {
                    task.percentage = f64::from(*completed_steps) * 100.0 / f64::from(total);
                }
            }
            start(task);
            task.completed_steps = *completed_steps;
            if current_step.is_some() {
                task.current_step.clone_from(current_step);
            }
            (EventKind::TaskStep, message.clone())
        }
        Command::TaskComplete { message, .. } => {
            start(task);
            task.percentage = 100.0;
            if let Some(total) = task.total_steps {
                task.completed_steps = total;
            }
            finish(task);
            (EventKind::TaskCompleted, message.clone())
        }
        Command::TaskFail { error_message, .. } => {
            task.error_message = Some(error_message.clone());
            finish(task);
            (EventKind::TaskFailed, Some(error_message.clone()))
        }
        Command::TaskPause { message, .. } => (EventKind::TaskPaused, message.clone()),
        Command::TaskResume { message, .. } => (EventKind::TaskResumed, message.clone()),
        Command::TaskCancel { message, .. } => {
            finish(task);
            (EventKind::TaskCancelled, message.clone())
        }
        Command::TaskRetry { message, .. } => {
            task.retry_count += 1;
            task.error_message = None;
            task.completed_at = None;
            task.duration = None;
            task.started_at = Some(now);
            task.completed_steps = 0;
            task.current_step = None;
            if task.children == 0 {
                task.percentage = 0.0;
            }
            (EventKind::TaskRetried, message.clone())
        }
        _ => unreachable!("task_op() returned Some for a non-task command"),
    };
    task.status = to;
    if message.is_some() {
        task.last_message.clone_from(&message);
    }
    Ok(TaskEffect { kind, message })
}

/// The percentage a task shows: 100 when completed; the weighted mean of its children when it
/// has any; its own reported percentage otherwise.
pub(crate) fn effective_percentage(
    status: ProgressStatus,
    own: f64,
    child_weight: f64,
    child_sum: f64,
) -> f64 {
    if status == Completed {
        100.0
    } else if child_weight > 0.0 {
        clamp_pct(child_sum / child_weight)
    } else {
        own
    }
}

/// The status of a task with children, from the number of children in each status (indexed
/// like [`ProgressStatus::ALL`]) and whether the task itself was started: any child running ->
/// `in_progress`; else any failed -> `failed`; else any paused -> `paused`; else all completed
/// or cancelled -> `completed` when at least one completed, `cancelled` otherwise; else (some
/// not started) `in_progress` when work under it has begun (a child finished, or the task was
/// started itself), `not_started` otherwise.
///
/// The last rule refines DESIGN.md's "else `not_started`": a group whose first child completed
/// and whose second has not started yet is under way, not unstarted.
pub(crate) fn derived_status(children: [u32; 6], started: bool) -> ProgressStatus {
    let n = |s: ProgressStatus| children[s.index()];
    let total: u32 = children.iter().sum();
    let finished = n(Completed) + n(Cancelled);
    if n(InProgress) > 0 {
        InProgress
    } else if n(Failed) > 0 {
        Failed
    } else if n(Paused) > 0 {
        Paused
    } else if total > 0 && finished == total {
        if n(Completed) > 0 {
            Completed
        } else {
            Cancelled
        }
    } else if started || finished > 0 {
        InProgress
    } else {
        NotStarted
    }
}

/// Moves a task with children to `to` (its newly derived status): timestamps, error and the
/// event to append. `cause` is the error of the failed child that made it fail, if any.
/// Refuses to reopen a completed task.
pub(crate) fn derive_parent(
    task: &mut Task,
    to: ProgressStatus,
    cause: Option<&str>,
    now: DateTime<Utc>,
) -> Result<TaskEffect> {
    let from = task.status;
    if from == Completed {
        return Err(Error::InvalidTransition {
            what: format!(
                "task {:?} of upgrade {:?} (completed; a change below it would reopen it)",
                task.task_id, task.upgrade_id
            ),
            from,
            to,
        });
    }
    let finish = |task: &mut Task| {
        task.completed_at = Some(now);
        task.duration = task.started_at.map(|s| seconds_between(s, now));
    };
    let (kind, message) = match to {
        InProgress => {
            if task.started_at.is_none() {
                task.started_at = Some(now);
            }
            task.completed_at = None;
            task.duration = None;
            task.error_message = None;
            let kind = match from {
                NotStarted => EventKind::TaskStarted,
                Paused => EventKind::TaskResumed,
                _ => EventKind::TaskRetried,
            };
            (kind, "subtasks running")
        }
        Completed => {
            if let Some(total) = task.total_steps {
                task.completed_steps = total;
            }
            finish(task);
            (EventKind::TaskCompleted, "all subtasks finished")
        }
        Failed => {
            task.error_message = Some(cause.unwrap_or("a subtask failed").to_owned());
            finish(task);
            (EventKind::TaskFailed, "a subtask failed")
        }
        Paused => (EventKind::TaskPaused, "subtasks paused"),
        Cancelled => {
            finish(task);
            (EventKind::TaskCancelled, "all subtasks cancelled")
        }
        NotStarted => (EventKind::TaskProgress, "no subtask started"),
    };
    task.status = to;
    let message = match (to, &task.error_message) {
        (Failed, Some(e)) => e.clone(),
        _ => message.to_owned(),
    };
    task.last_message = Some(message.clone());
    Ok(TaskEffect {
        kind,
        message: Some(message),
    })
}

/// Orders tasks so every parent comes before its children, otherwise keeping the given order.
/// `parents[i]` is the parent id of `ids[i]`; parents not among `ids` are ignored (the caller
/// checks them). Rejects duplicate ids and parent cycles.
pub(crate) fn parents_first(ids: &[&str], parents: &[Option<&str>]) -> Result<Vec<usize>> {
    let mut index: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        if index.insert(id, i).is_some() {
            return Err(Error::invalid(format!("task {id:?} appears twice")));
        }
    }
    // 0 = unvisited, 1 = on the current chain, 2 = placed.
    let mut state = vec![0u8; ids.len()];
    let mut order = Vec::with_capacity(ids.len());
    for start in 0..ids.len() {
        let mut chain = Vec::new();
        let mut cur = Some(start);
        while let Some(i) = cur {
            match state[i] {
                2 => break,
                1 => {
                    let pos = chain.iter().position(|x| *x == i).unwrap_or(0);
                    let cycle: Vec<&str> = chain[pos..].iter().map(|j: &usize| ids[*j]).collect();
                    return Err(Error::invalid(format!(
                        "parent cycle: {} -> {}",
                        cycle.join(" -> "),
                        ids[i]
                    )));
                }
                _ => {}
            }
            state[i] = 1;
            chain.push(i);
            cur = parents[i].and_then(|p| index.get(p).copied());
        }
        for i in chain.into_iter().rev() {
            state[i] = 2;
            order.push(i);
        }
    }
    Ok(order)
}

/// Clamps to 0..=100 and rounds away float noise from incremental sums.
pub(crate) fn clamp_pct(p: f64) -> f64 {
    let p = (p * 1e9).round() / 1e9;
    p.clamp(0.0, 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JsonMap, TaskType};

    fn task(status: ProgressStatus) -> Task {
        Task {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            name: "T".into(),
            task_type: TaskType::UpgradeStep,
            parent_task_id: None,
            status,
            percentage: 0.0,
            current_step: None,
            total_steps: Some(4),
            completed_steps: 0,
            weight: 1.0,
            children: 0,
            error_message: None,
            retry_count: 0,
            last_message: None,
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            duration: None,
            metadata: JsonMap::new(),
        }
    }

    const OPS: [TaskOp; 9] = [
        TaskOp::Start,
        TaskOp::Update,
        TaskOp::Step,
        TaskOp::Complete,
        TaskOp::Fail,
        TaskOp::Pause,
        TaskOp::Resume,
        TaskOp::Cancel,
        TaskOp::Retry,
    ];

    #[test]
    fn transition_table_is_as_documented() {
        // One row per status: the operations allowed from it.
        let expected: [(ProgressStatus, &[TaskOp]); 6] = [
            (
                NotStarted,
                &[
                    TaskOp::Start,
                    TaskOp::Update,
                    TaskOp::Step,
                    TaskOp::Complete,
                    TaskOp::Fail,
                    TaskOp::Cancel,
                ],
            ),
            (
                InProgress,
                &[
                    TaskOp::Update,
                    TaskOp::Step,
                    TaskOp::Complete,
                    TaskOp::Fail,
                    TaskOp::Pause,
                    TaskOp::Cancel,
                ],
            ),
            (Completed, &[]),
            (Failed, &[TaskOp::Retry]),
            (Paused, &[TaskOp::Fail, TaskOp::Resume, TaskOp::Cancel]),
            (Cancelled, &[TaskOp::Retry]),
        ];
        for (status, allowed) in expected {
            for op in OPS {
                let got = task_transition(&task(status), op);
                assert_eq!(
                    got.is_ok(),
                    allowed.contains(&op),
                    "{status} {op:?}: {got:?}"
                );
                if let Err(e) = got {
                    assert!(
                        matches!(e, Error::InvalidTransition { from, .. } if from == status),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn steps_drive_percentage_and_retry_resets() {
        let now = Utc::now();
        let mut t = task(NotStarted);
        let step = |n| Command::TaskStep {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            completed_steps: n,
            current_step: Some("drain".into()),
            message: None,
        };
        apply_task(&mut t, &step(1), now).unwrap();
        assert_eq!(
            (t.status, t.percentage, t.completed_steps),
            (InProgress, 25.0, 1)
        );
        assert!(t.started_at.is_some());
        let err = apply_task(&mut t, &step(5), now).unwrap_err();
        assert!(err.to_string().contains("exceeds total_steps 4"), "{err}");
        let fail = Command::TaskFail {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            error_message: "boom".into(),
        };
        apply_task(&mut t, &fail, now).unwrap();
        assert_eq!(t.error_message.as_deref(), Some("boom"));
        let retry = Command::TaskRetry {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            message: None,
        };
        apply_task(&mut t, &retry, now).unwrap();
        assert_eq!(
            (t.status, t.percentage, t.retry_count),
            (InProgress, 0.0, 1)
        );
        assert_eq!(t.error_message, None);
    }

    #[test]
    fn effective_percentage_rules() {
        assert_eq!(effective_percentage(Completed, 10.0, 2.0, 50.0), 100.0);
        assert_eq!(effective_percentage(InProgress, 10.0, 2.0, 50.0), 25.0);
        assert_eq!(effective_percentage(InProgress, 10.0, 0.0, 0.0), 10.0);
        assert_eq!(clamp_pct(100.000000000001), 100.0);
        assert_eq!(clamp_pct(-1e-12), 0.0);
    }

    #[test]
    fn derived_status_rules() {
        // Counts indexed like ProgressStatus::ALL:
        // [not_started, in_progress, completed, failed, paused, cancelled].
        let cases: [([u32; 6], bool, ProgressStatus); 12] = [
            ([2, 0, 0, 0, 0, 0], false, NotStarted),
            ([2, 0, 0, 0, 0, 0], true, InProgress),
            ([1, 1, 0, 0, 0, 0], false, InProgress),
            ([0, 1, 0, 1, 1, 0], false, InProgress),
            ([1, 0, 1, 1, 1, 0], false, Failed),
            ([1, 0, 1, 0, 1, 0], false, Paused),
            ([0, 0, 2, 0, 0, 1], false, Completed),
            ([0, 0, 0, 0, 0, 3], false, Cancelled),
            ([0, 0, 0, 0, 0, 3], true, Cancelled),
            ([1, 0, 1, 0, 0, 0], false, InProgress),
            ([1, 0, 0, 0, 0, 1], false, InProgress),
            ([0, 0, 1, 0, 0, 0], false, Completed),
        ];
        for (counts, started, expected) in cases {
            assert_eq!(
                derived_status(counts, started),
                expected,
                "{counts:?} {started}"
            );
        }
    }

    #[test]
    fn a_derived_change_never_reopens_a_completed_task() {
        let now = Utc::now();
        let mut t = task(Completed);
        let err = derive_parent(&mut t, InProgress, None, now).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidTransition {
                    from: Completed,
                    ..
                }
            ),
            "{err}"
        );
        let mut t = task(InProgress);
        t.started_at = Some(now);
        let e = derive_parent(&mut t, Failed, Some("subtask \"a\" failed: boom"), now).unwrap();
        assert_eq!(e.kind, EventKind::TaskFailed);
        assert_eq!(
            t.error_message.as_deref(),
            Some("subtask \"a\" failed: boom")
        );
        assert!(t.completed_at.is_some());
        let e = derive_parent(&mut t, InProgress, None, now).unwrap();
        assert_eq!(e.kind, EventKind::TaskRetried);
        assert_eq!((t.error_message.as_deref(), t.completed_at), (None, None));
    }

    #[test]
    fn upgrade_transitions() {
        let start = Command::UpgradeStart {
            upgrade_id: "u".into(),
            phase: None,
        };
        assert_eq!(
            upgrade_transition("u", NotStarted, &start).unwrap(),
            Some(InProgress)
        );
        let err = upgrade_transition("u", Completed, &start).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transition for upgrade \"u\": completed -> in_progress"
        );
        let phase = Command::UpgradePhase {
            upgrade_id: "u".into(),
            phase: "x".into(),
        };
        assert!(upgrade_transition("u", Failed, &phase).is_err());
        assert_eq!(
            upgrade_transition("u", InProgress, &phase).unwrap(),
            Some(InProgress)
        );
    }
}
