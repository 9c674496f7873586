//! Task writes of [`PostgresStore`](super::PostgresStore), the same steps as the SQLite
//! backend's: a task command's own row and event, then the rollups up the tree (percentages,
//! child status counters, derived parent statuses with their own events and notifications), and
//! adding tasks. Events and notifications are staged ([`Staged`]) and get their `seq` at the end
//! of the transaction. The hierarchy rules are pure functions in `store/domain/machine.rs`.

use chrono::{DateTime, Utc};

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{EventKind, JsonMap, ProgressStatus};
use crate::store::domain::command::{Command, MAX_DEPTH, NewTask, TaskOp};
use crate::store::domain::machine;

/// What one task command writes beyond its own row: the events it appends (its own and its
/// ancestors'), the status changes, and the upgrade row's delta.
pub(super) struct TaskWrite<'a, 'b, 'c> {
    tx: &'a mut Tx<'b, 'c>,
    staged: &'a mut Staged,
    ukey: i64,
    upgrade_id: &'a str,
    now: DateTime<Utc>,
    delta: UpgradeDelta,
    cluster: Option<String>,
}

/// A change of one child's status, carried up the tree: `from` is `None` for a new child.
#[derive(Clone, Copy)]
struct ChildChange {
    from: Option<ProgressStatus>,
    to: ProgressStatus,
}

impl<'a, 'b, 'c> TaskWrite<'a, 'b, 'c> {
    pub(super) fn new(
        tx: &'a mut Tx<'b, 'c>,
        staged: &'a mut Staged,
        ukey: i64,
        upgrade_id: &'a str,
        now: DateTime<Utc>,
    ) -> Self {
        TaskWrite {
            tx,
            staged,
            ukey,
            upgrade_id,
            now,
            delta: UpgradeDelta::default(),
            cluster: None,
        }
    }

    pub(super) fn finish(self) -> Result<()> {
        self.delta.flush(self.tx, self.ukey)
    }

    /// Stages the event of a change to `row` (whose status was `from`), with its status change
    /// and notification (the caller saves the row).
    fn record(
        &mut self,
        row: &mut TaskRow,
        from: ProgressStatus,
        effect: &machine::TaskEffect,
        details: Option<&JsonMap>,
    ) -> Result<()> {
        let event = new_event(
            self.upgrade_id,
            Some((&row.task.task_id, row.task.task_type)),
            effect.kind,
            row.task.status,
            self.now,
            effect.message.as_deref(),
            details,
            row.task.percentage,
        );
        let local = self.staged.push(self.ukey, Some(row.tkey), event);
        let to = row.task.status;
        if from != to {
            self.delta.status(Some(from), to);
            self.staged
                .status_change(local, self.upgrade_id, Some(&row.task.task_id), from, to);
        }
        if crate::notify::detail_type(effect.kind, Some(from)).is_some() {
            if self.cluster.is_none() {
                self.cluster = Some(
                    self.tx
                        .one(
                            "SELECT cluster_name FROM upgrades WHERE ukey = $1",
                            &[&self.ukey],
                        )?
                        .get(0),
                );
            }
            self.staged.notes.push(Note {
                event: local as usize - 1,
                from: Some(from),
                cluster: self.cluster.clone().unwrap_or_default(),
                upgrade: None,
                task: Some(row.task.clone()),
            });
        }
        Ok(())
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
            let mut row = task_row(
                &self.tx.one(
                    &format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = $1"),
                    &[&pkey],
                )?,
                self.upgrade_id,
            )?;
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
                    cause = self.failed_child(pkey)?;
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
            save_task(self.tx, &row)?;
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

    /// "subtask "x" failed: error" for the first failed child of `parent`.
    fn failed_child(&mut self, parent: i64) -> Result<Option<String>> {
        Ok(self
            .tx
            .opt(
                "SELECT task_id, error_message FROM tasks WHERE parent_tkey = $1 AND status = $2 \
                 ORDER BY tkey LIMIT 1",
                &[&parent, &status_code(ProgressStatus::Failed)],
            )?
            .map(|r| {
                failure_cause(
                    &r.get::<_, String>(0),
                    r.get::<_, Option<String>>(1).as_deref(),
                )
            }))
    }

    /// Executes a task command on `row`: the state machine, the event, the rollups.
    pub(super) fn task_op(&mut self, mut row: TaskRow, command: &Command) -> Result<()> {
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
        save_task(self.tx, &row)?;
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
    pub(super) fn parent_op(&mut self, row: TaskRow, command: &Command) -> Result<()> {
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
                    let names: Vec<String> = self
                        .tx
                        .query(
                            "SELECT task_id FROM tasks WHERE parent_tkey = $1 \
                             AND status NOT IN ($2, $3) ORDER BY tkey LIMIT 5",
                            &[
                                &row.tkey,
                                &status_code(ProgressStatus::Completed),
                                &status_code(ProgressStatus::Cancelled),
                            ],
                        )?
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect();
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
                    let leaf = task_row(
                        &self.tx.one(
                            &format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = $1"),
                            &[&leaf],
                        )?,
                        self.upgrade_id,
                    )?;
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

    /// Leaf tasks below `tkey`, in the order they were added, skipping completed subtrees (nothing below a
    /// completed task can change).
    fn leaves_below(&mut self, tkey: i64) -> Result<Vec<i64>> {
        let mut leaves = Vec::new();
        let mut stack = vec![tkey];
        while let Some(k) = stack.pop() {
            let kids: Vec<(i64, i64, i64)> = self
                .tx
                .query(
                    "SELECT tkey, children, status FROM tasks WHERE parent_tkey = $1 ORDER BY tkey",
                    &[&k],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            for (child, grandkids, status) in kids.into_iter().rev() {
                if grandkids == 0 {
                    leaves.push(child);
                } else if status != status_code(ProgressStatus::Completed) {
                    stack.push(child);
                }
            }
        }
        // In the order they were added.
        leaves.sort_unstable();
        Ok(leaves)
    }
}

/// The error a parent shows when its child `task_id` failed with `error`, within the message
/// limit.
fn failure_cause(task_id: &str, error: Option<&str>) -> String {
    let mut text = format!(
        "subtask {task_id:?} failed: {}",
        error.unwrap_or("no error given")
    );
    if text.len() > crate::store::domain::command::MAX_MESSAGE_LEN {
        let mut end = crate::store::domain::command::MAX_MESSAGE_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Orders a batch so that parents come before children, and rejects duplicates and cycles.
fn order_batch(tasks: &[NewTask]) -> Result<Vec<usize>> {
    let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    let parents: Vec<Option<&str>> = tasks.iter().map(|t| t.parent_task_id.as_deref()).collect();
    machine::parents_first(&ids, &parents)
}

pub(super) fn add_tasks(
    tx: &mut Tx<'_, '_>,
    staged: &mut Staged,
    upgrade_id: &str,
    tasks: &[NewTask],
    now: DateTime<Utc>,
) -> Result<()> {
    let ukey = lock_upgrade(tx, upgrade_id)?;
    let order = order_batch(tasks)?;
    let mut w = TaskWrite::new(tx, staged, ukey, upgrade_id, now);
    for i in order {
        let t = &tasks[i];
        let exists = w.tx.opt(
            "SELECT tkey FROM tasks WHERE ukey = $1 AND task_id = $2",
            &[&ukey, &t.task_id],
        )?;
        if exists.is_some() {
            return Err(Error::AlreadyExists {
                what: format!("task {:?} of upgrade {upgrade_id:?}", t.task_id),
            });
        }
        let (parent_tkey, depth) = match &t.parent_task_id {
            None => (None, 0),
            Some(p) => {
                let parent = load_task(w.tx, ukey, upgrade_id, p).map_err(|e| match e {
                    Error::NotFound { .. } => Error::not_found(format!(
                        "parent task {p:?} of task {:?} in upgrade {upgrade_id:?}",
                        t.task_id
                    )),
                    other => other,
                })?;
                if parent.depth + 1 > MAX_DEPTH {
                    return Err(Error::invalid(format!(
                        "task {:?} would be {} levels deep; the limit is {MAX_DEPTH}",
                        t.task_id,
                        parent.depth + 1
                    )));
                }
                // A new, unstarted child must not change its parent's status: it would reopen
                // a finished task, or resume a paused one behind the operator's back.
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
        let tkey: i64 =
            w.tx.one(
                "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, \
                 depth, status, percentage, total_steps, completed_steps, weight, created_at, \
                 metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, 0, $10, $11, $12) \
                 RETURNING tkey",
                &[
                    &ukey,
                    &t.task_id,
                    &t.name,
                    &type_code(t.task_type),
                    &parent_tkey,
                    &t.parent_task_id,
                    &i64::from(depth),
                    &status_code(ProgressStatus::NotStarted),
                    &t.total_steps.map(i64::from),
                    &weight,
                    &micros(now),
                    &json_text(&t.metadata),
                ],
            )?
            .get(0);
        w.staged.push(
            ukey,
            Some(tkey),
            new_event(
                upgrade_id,
                Some((&t.task_id, t.task_type)),
                EventKind::TaskAdded,
                ProgressStatus::NotStarted,
                now,
                Some(&t.name),
                None,
                0.0,
            ),
        );
        w.delta.status(None, ProgressStatus::NotStarted);
        let change = ChildChange {
            from: None,
            to: ProgressStatus::NotStarted,
        };
        w.propagate(parent_tkey, 0.0, weight, 1, Some(change), None)?;
    }
    w.finish()
}
