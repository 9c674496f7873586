//! The task write path every backend runs, one copy: a task command's own row and event, then
//! the walk up the tree (percentages, child status counters, derived parent statuses with their
//! own events and notifications), commands on a parent, and adding tasks. The rules are the pure
//! functions of [`machine`]; this file applies them to rows that a backend reads and writes
//! through [`TaskRows`] (SQL, row caches and event numbering stay in the backend).

use chrono::{DateTime, Utc};

use super::command::{Command, MAX_DEPTH, MAX_MESSAGE_LEN, NewTask, TaskOp};
use super::{history, machine};
use crate::error::{Error, Result};
use crate::model::{EventKind, JsonMap, ProgressStatus, Task};

/// One task row as the write path sees it: the task and its place in the tree.
#[derive(Debug, Clone)]
pub(crate) struct TaskRow {
    pub(crate) tkey: i64,
    pub(crate) parent_tkey: Option<i64>,
    pub(crate) depth: u32,
    /// Sum of the children's weights.
    pub(crate) child_weight: f64,
    /// Weighted sum of the children's effective percentages.
    pub(crate) child_sum: f64,
    /// `seq` of the task's last event, where the backend keeps the per-task chain (0: none).
    pub(crate) last_event_seq: i64,
    /// Children per status, indexed like `ProgressStatus::ALL`.
    pub(crate) child_counts: [u32; 6],
    pub(crate) task: Task,
}

/// The event of a change to a task, as [`TaskRows::task_event`] gets it; the status and
/// percentage are the row's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskEvent<'a> {
    pub(crate) kind: EventKind,
    pub(crate) ts: DateTime<Utc>,
    pub(crate) message: Option<&'a str>,
    pub(crate) details: Option<&'a JsonMap>,
}

/// Row access of one command on one upgrade, implemented by each backend. Reads see the
/// command's own writes.
pub(crate) trait TaskRows {
    /// The row of task `tkey` (a task of this upgrade).
    fn task(&mut self, tkey: i64) -> Result<TaskRow>;
    /// The row of task `task_id` of this upgrade, if there is one.
    fn task_by_id(&mut self, task_id: &str) -> Result<Option<TaskRow>>;
    /// Writes `row` back (status, percentage, steps, times, rollups, counters).
    fn save(&mut self, row: &TaskRow) -> Result<()>;
    /// The children of `parent` (key, number of children, status), in the order they were added.
    fn children(&mut self, parent: i64) -> Result<Vec<(i64, u32, ProgressStatus)>>;
    /// Id and error message of the first failed child of `parent`.
    fn first_failed_child(&mut self, parent: i64) -> Result<Option<(String, Option<String>)>>;
    /// Ids of the first `limit` children of `parent` neither completed nor cancelled.
    fn unfinished_children(&mut self, parent: i64, limit: usize) -> Result<Vec<String>>;
    /// Inserts a new task (not started, 0 %) under `parent` with its `task.added` event at
    /// `now`; returns its key.
    fn insert_task(
        &mut self,
        task: &NewTask,
        parent: Option<i64>,
        depth: u32,
        weight: f64,
        now: DateTime<Utc>,
    ) -> Result<i64>;
    /// Appends (or stages) `event` of `row`, whose status was `from`: with a status change
    /// when `from` differs from the row's status, and a notification when the event's kind and
    /// change call for one (`notify::detail_type`).
    /// Keeps `row.last_event_seq` where the backend chains a task's events (the caller saves
    /// the row).
    fn task_event(
        &mut self,
        row: &mut TaskRow,
        from: ProgressStatus,
        event: TaskEvent<'_>,
    ) -> Result<()>;
    /// Appends one duration sample of the completed leaf task `task_id` to its history.
    fn history_sample(&mut self, task_id: &str, secs: f64, per_step: Option<f64>) -> Result<()>;
}

/// What one command changes on its upgrade row's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct UpgradeDelta {
    /// Tasks per status, indexed like `ProgressStatus::ALL`.
    pub(crate) counts: [i64; 6],
    pub(crate) top_weight: f64,
    pub(crate) top_sum: f64,
}

impl UpgradeDelta {
    /// A task went from `from` (`None`: a new task) to `to`.
    pub(crate) fn status(&mut self, from: Option<ProgressStatus>, to: ProgressStatus) {
        if let Some(f) = from {
            self.counts[f.index()] -= 1;
        }
        self.counts[to.index()] += 1;
    }

    /// Adds `other` to this.
    pub(crate) fn add(&mut self, other: &UpgradeDelta) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.top_weight += other.top_weight;
        self.top_sum += other.top_sum;
    }

    /// Whether nothing changes.
    pub(crate) fn is_empty(&self) -> bool {
        self.counts == [0; 6] && self.top_weight == 0.0 && self.top_sum == 0.0
    }
}

/// A change of one child's status, carried up the tree: `from` is `None` for a new child.
#[derive(Clone, Copy)]
struct ChildChange {
    from: Option<ProgressStatus>,
    to: ProgressStatus,
}

/// One command's task writes on one upgrade: rows through `rows`, the upgrade's counters
/// gathered in [`delta`](Self::delta) for the backend to write once.
pub(crate) struct TaskWrite<'a, R: TaskRows + ?Sized> {
    rows: &'a mut R,
    upgrade_id: &'a str,
    now: DateTime<Utc>,
    pub(crate) delta: UpgradeDelta,
}

impl<'a, R: TaskRows + ?Sized> TaskWrite<'a, R> {
    pub(crate) fn new(rows: &'a mut R, upgrade_id: &'a str, now: DateTime<Utc>) -> Self {
        TaskWrite {
            rows,
            upgrade_id,
            now,
            delta: UpgradeDelta::default(),
        }
    }

    /// Executes a task command on `row`, a leaf or a parent.
    pub(crate) fn execute(&mut self, row: TaskRow, command: &Command) -> Result<()> {
        if row.task.children > 0 {
            self.parent_op(row, command)
        } else {
            self.task_op(row, command)
        }
    }

    /// Appends the event of a change to `row` (whose status was `from`).
    fn record(
        &mut self,
        row: &mut TaskRow,
        from: ProgressStatus,
        effect: &machine::TaskEffect,
        details: Option<&JsonMap>,
    ) -> Result<()> {
        let to = row.task.status;
        if from != to {
            self.delta.status(Some(from), to);
        }
        let event = TaskEvent {
            kind: effect.kind,
            ts: self.now,
            message: effect.message.as_deref(),
            details,
        };
        self.rows.task_event(row, from, event)
    }

    /// Carries a change of a child of `parent` upwards: `d_sum` (weighted percentage), `d_weight`
    /// and `d_children` to the children sums, `change` to the status counts. Each ancestor
    /// recomputes its percentage and derived status; a derived status change appends the
    /// ancestor's own event (and notification) and travels further up. Stops as soon as a
    /// level does not change; what reaches the top goes to the upgrade's mean.
    fn propagate(
        &mut self,
        mut parent: Option<i64>,
        mut d_sum: f64,
        mut d_weight: f64,
        mut d_children: u32,
        mut change: Option<ChildChange>,
        mut cause: Option<String>,
    ) -> Result<()> {
        while let Some(pkey) = parent {
            if d_sum == 0.0 && d_weight == 0.0 && d_children == 0 && change.is_none() {
                return Ok(());
            }
            let mut row = self.rows.task(pkey)?;
            row.child_weight += d_weight;
            row.child_sum += d_sum;
            row.task.children += d_children;
            if let Some(c) = change {
                if let Some(f) = c.from {
                    row.child_counts[f.index()] = row.child_counts[f.index()].saturating_sub(1);
                }
                row.child_counts[c.to.index()] += 1;
            }
            let old_pct = row.task.percentage;
            let old_status = row.task.status;
            let derived = machine::derived_status(row.child_counts, row.task.started_at.is_some());
            let mut effect = None;
            if derived != old_status {
                if derived == ProgressStatus::Failed && cause.is_none() {
                    cause = self
                        .rows
                        .first_failed_child(pkey)?
                        .map(|(id, error)| failure_cause(&id, error.as_deref()));
                }
                effect = Some(machine::derive_parent(
                    &mut row.task,
                    derived,
                    cause.as_deref(),
                    self.now,
                )?);
            }
            let new_pct = machine::effective_percentage(
                row.task.status,
                old_pct,
                row.child_weight,
                row.child_sum,
            );
            row.task.percentage = new_pct;
            if let Some(effect) = &effect {
                self.record(&mut row, old_status, effect, None)?;
            }
            self.rows.save(&row)?;
            d_sum = row.task.weight * (new_pct - old_pct);
            d_weight = 0.0;
            d_children = 0;
            change = (derived != old_status).then_some(ChildChange {
                from: Some(old_status),
                to: derived,
            });
            if derived != ProgressStatus::Failed {
                cause = None;
            }
            parent = row.parent_tkey;
        }
        self.delta.top_sum += d_sum;
        self.delta.top_weight += d_weight;
        Ok(())
    }

    /// Executes a task command on `row`: the state machine, the event, the history sample of a
    /// timed leaf completion, the rollups.
    pub(crate) fn task_op(&mut self, mut row: TaskRow, command: &Command) -> Result<()> {
        let from = row.task.status;
        let old_pct = row.task.percentage;
        let effect = machine::apply_task(&mut row.task, command, self.now)?;
        if row.task.children > 0 {
            // start and step on a parent: its status still comes from its children.
            row.task.status =
                machine::derived_status(row.child_counts, row.task.started_at.is_some());
        }
        let to = row.task.status;
        row.task.percentage =
            machine::effective_percentage(to, row.task.percentage, row.child_weight, row.child_sum);
        let details = match command {
            Command::TaskUpdate { details, .. } => Some(details),
            _ => None,
        };
        self.record(&mut row, from, &effect, details)?;
        self.rows.save(&row)?;
        // A timed leaf completion feeds the duration history, in this transaction.
        if let Some((secs, per_step)) =
            history::sample_of(&row.task, from != ProgressStatus::NotStarted)
        {
            self.rows
                .history_sample(&row.task.task_id, secs, per_step)?;
        }
        let d_sum = row.task.weight * (row.task.percentage - old_pct);
        let cause = (to == ProgressStatus::Failed)
            .then(|| failure_cause(&row.task.task_id, row.task.error_message.as_deref()));
        let change = (from != to).then_some(ChildChange {
            from: Some(from),
            to,
        });
        self.propagate(row.parent_tkey, d_sum, 0.0, 0, change, cause)
    }

    /// A task command on a task with children (see the table in `store/domain/machine.rs`).
    pub(crate) fn parent_op(&mut self, row: TaskRow, command: &Command) -> Result<()> {
        let Some((_, op)) = command.task_op() else {
            return Err(Error::invalid("not a task operation"));
        };
        let upgrade_id = self.upgrade_id;
        let what = || format!("task {:?} of upgrade {upgrade_id:?}", row.task.task_id);
        match op {
            TaskOp::Start | TaskOp::Step | TaskOp::Update => self.task_op(row, command),
            TaskOp::Complete => {
                let finished = row.child_counts[ProgressStatus::Completed.index()]
                    + row.child_counts[ProgressStatus::Cancelled.index()];
                let unfinished = row.task.children.saturating_sub(finished);
                if unfinished > 0 {
                    let names = self.rows.unfinished_children(row.tkey, 5)?;
                    let more = if unfinished as usize > names.len() {
                        ", ..."
                    } else {
                        ""
                    };
                    return Err(Error::InvalidTransition {
                        what: format!(
                            "{} ({unfinished} unfinished subtask{}: {}{more})",
                            what(),
                            if unfinished == 1 { "" } else { "s" },
                            names.join(", ")
                        ),
                        from: row.task.status,
                        to: ProgressStatus::Completed,
                    });
                }
                if row.task.status == ProgressStatus::Completed {
                    // Completed already, with its last child: nothing to do.
                    return Ok(());
                }
                Err(Error::InvalidTransition {
                    what: what(),
                    from: row.task.status,
                    to: ProgressStatus::Completed,
                })
            }
            TaskOp::Fail | TaskOp::Cancel | TaskOp::Pause | TaskOp::Resume | TaskOp::Retry => {
                let to = machine::task_transition(&row.task, op)?;
                let what = what();
                let mut eligible = Vec::new();
                for leaf in self.leaves_below(row.tkey)? {
                    let leaf = self.rows.task(leaf)?;
                    if machine::task_transition(&leaf.task, op).is_ok() {
                        eligible.push(leaf);
                    }
                }
                // Retrying a group retries what failed; only a group with no failure (a
                // cancelled one) has its cancelled leaves retried.
                if op == TaskOp::Retry
                    && eligible
                        .iter()
                        .any(|l| l.task.status == ProgressStatus::Failed)
                {
                    eligible.retain(|l| l.task.status == ProgressStatus::Failed);
                }
                let applied = eligible.len();
                for leaf in eligible {
                    let c = command.for_task(&leaf.task.task_id);
                    self.task_op(leaf, &c)?;
                }
                if applied == 0 {
                    return Err(Error::InvalidTransition {
                        what: format!("{what} (no subtask to {})", command.op_name()),
                        from: row.task.status,
                        to,
                    });
                }
                Ok(())
            }
        }
    }

    /// Leaf tasks below `tkey`, in the order they were added, skipping completed subtrees
    /// (nothing below a completed task can change).
    fn leaves_below(&mut self, tkey: i64) -> Result<Vec<i64>> {
        let mut leaves = Vec::new();
        let mut stack = vec![tkey];
        while let Some(k) = stack.pop() {
            for (child, grandkids, status) in self.rows.children(k)?.into_iter().rev() {
                if grandkids == 0 {
                    leaves.push(child);
                } else if status != ProgressStatus::Completed {
                    stack.push(child);
                }
            }
        }
        // In the order they were added.
        leaves.sort_unstable();
        Ok(leaves)
    }

    /// Adds `tasks` (parents first, whatever their order in the batch): each checked against
    /// the tree (no duplicate id, an existing parent that can take a new child, the depth
    /// limit), inserted with its event, and counted up the tree.
    pub(crate) fn add_tasks(&mut self, tasks: &[NewTask]) -> Result<()> {
        let upgrade_id = self.upgrade_id;
        for i in order_batch(tasks)? {
            let t = &tasks[i];
            if self.rows.task_by_id(&t.task_id)?.is_some() {
                return Err(Error::AlreadyExists {
                    what: format!("task {:?} of upgrade {upgrade_id:?}", t.task_id),
                });
            }
            let (parent_tkey, depth) = match &t.parent_task_id {
                None => (None, 0),
                Some(p) => {
                    let parent = self.rows.task_by_id(p)?.ok_or_else(|| {
                        Error::not_found(format!(
                            "parent task {p:?} of task {:?} in upgrade {upgrade_id:?}",
                            t.task_id
                        ))
                    })?;
                    if parent.depth + 1 > MAX_DEPTH {
                        return Err(Error::invalid(format!(
                            "task {:?} would be {} levels deep; the limit is {MAX_DEPTH}",
                            t.task_id,
                            parent.depth + 1
                        )));
                    }
                    // A new, unstarted child must not change its parent's status: it would
                    // reopen a finished task, or resume a paused one behind the operator's back.
                    let refuse = match parent.task.status {
                        ProgressStatus::Completed => Some("completed, which is final"),
                        ProgressStatus::Failed | ProgressStatus::Cancelled => {
                            Some("finished; retry it first")
                        }
                        ProgressStatus::Paused if parent.task.children == 0 => {
                            Some("paused; resume it first")
                        }
                        _ => None,
                    };
                    if let Some(why) = refuse {
                        return Err(Error::InvalidTransition {
                            what: format!(
                                "task {p:?} of upgrade {upgrade_id:?} (it is {why}: subtask {:?} cannot be added)",
                                t.task_id
                            ),
                            from: parent.task.status,
                            to: ProgressStatus::InProgress,
                        });
                    }
                    (Some(parent.tkey), parent.depth + 1)
                }
            };
            let weight = t.weight.unwrap_or(1.0);
            self.rows
                .insert_task(t, parent_tkey, depth, weight, self.now)?;
            self.delta.status(None, ProgressStatus::NotStarted);
            let change = ChildChange {
                from: None,
                to: ProgressStatus::NotStarted,
            };
            self.propagate(parent_tkey, 0.0, weight, 1, Some(change), None)?;
        }
        Ok(())
    }
}

/// The error a parent shows when its child `task_id` failed with `error`, within the message
/// limit.
fn failure_cause(task_id: &str, error: Option<&str>) -> String {
    let mut text = format!(
        "subtask {task_id:?} failed: {}",
        error.unwrap_or("no error given")
    );
    if text.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Orders a batch so that parents come before children, and rejects duplicates and cycles.
pub(crate) fn order_batch(tasks: &[NewTask]) -> Result<Vec<usize>> {
    let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    let parents: Vec<Option<&str>> = tasks.iter().map(|t| t.parent_task_id.as_deref()).collect();
    machine::parents_first(&ids, &parents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskType;

    #[test]
    fn batch_order_puts_parents_first_and_finds_cycles() {
        let tasks = vec![
            NewTask::new("c", "C", TaskType::UpgradeStep).parent("b"),
            NewTask::new("b", "B", TaskType::UpgradeStep).parent("a"),
            NewTask::new("a", "A", TaskType::UpgradeStep),
        ];
        let order = order_batch(&tasks).unwrap();
        let ids: Vec<_> = order.iter().map(|i| tasks[*i].task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);

        let cyclic = vec![
            NewTask::new("a", "A", TaskType::UpgradeStep).parent("b"),
            NewTask::new("b", "B", TaskType::UpgradeStep).parent("a"),
        ];
        let err = order_batch(&cyclic).unwrap_err().to_string();
        assert!(err.starts_with("parent cycle: a -> b -> a"), "{err}");

        let dup = vec![
            NewTask::new("a", "A", TaskType::UpgradeStep),
            NewTask::new("a", "A2", TaskType::UpgradeStep),
        ];
        assert!(order_batch(&dup).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn failure_causes_stay_within_the_message_limit() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let text = failure_cause("t", Some(&long));
        assert!(text.len() <= MAX_MESSAGE_LEN);
        assert!(text.starts_with("subtask \"t\" failed: é"));
        assert_eq!(
            failure_cause("t", None),
            "subtask \"t\" failed: no error given"
        );
    }
}
