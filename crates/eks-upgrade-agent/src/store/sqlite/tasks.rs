//! Task writes of [`SqliteStore`](super::SqliteStore): a task command's own row and event,
//! then the rollups up the tree (percentages, child status counters, derived parent statuses
//! with their own events and notifications), and adding tasks. The hierarchy rules themselves
//! are pure functions in `store/domain/machine.rs`; this file applies them to the rows.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{EventKind, JsonMap, ProgressStatus, StatusChange};
use crate::store::Committed;
use crate::store::domain::command::{Command, MAX_DEPTH, NewTask, TaskOp};
use crate::store::domain::{history, machine};

/// What one task command writes beyond its own row: the events it appends (its own and its
/// ancestors'), the status changes, and the upgrade row's delta.
pub(super) struct TaskWrite<'a, 't> {
    tx: &'a Transaction<'t>,
    ukey: i64,
    upgrade_id: &'a str,
    now: DateTime<Utc>,
    delta: UpgradeDelta,
    committed: Committed,
    cluster: Option<String>,
}

/// A change of one child's status, carried up the tree: `from` is `None` for a new child.
#[derive(Clone, Copy)]
struct ChildChange {
    from: Option<ProgressStatus>,
    to: ProgressStatus,
}

impl<'a, 't> TaskWrite<'a, 't> {
    pub(super) fn new(
        tx: &'a Transaction<'t>,
        ukey: i64,
        upgrade_id: &'a str,
        now: DateTime<Utc>,
    ) -> Self {
        TaskWrite {
            tx,
            ukey,
            upgrade_id,
            now,
            delta: UpgradeDelta::default(),
            committed: Committed::default(),
            cluster: None,
        }
    }

    pub(super) fn finish(self) -> Result<Committed> {
        self.delta.flush(self.tx, self.ukey)?;
        Ok(self.committed)
    }

    /// Appends the event of a change to `row` (whose status was `from`), with its status
    /// change and notification; sets the row's `last_event_seq` (the caller saves the row).
    fn record(
        &mut self,
        row: &mut TaskRow,
        from: ProgressStatus,
        effect: &machine::TaskEffect,
        details: Option<&JsonMap>,
    ) -> Result<()> {
        let event = NewEvent {
            ukey: self.ukey,
            tkey: Some(row.tkey),
            prev_task_seq: Some(row.last_event_seq).filter(|s| *s > 0),
            kind: effect.kind,
            status: row.task.status,
            ts: self.now,
            message: effect.message.as_deref(),
            details,
            percentage: row.task.percentage,
            event_id: None,
        };
        let (seq, id) = insert_event(self.tx, &event)?;
        row.last_event_seq = seq;
        self.delta.last_seq = seq;
        let to = row.task.status;
        if from != to {
            self.delta.status(Some(from), to);
            self.committed.status_changes.push(StatusChange {
                seq: seq as u64,
                upgrade_id: self.upgrade_id.to_owned(),
                task_id: Some(row.task.task_id.clone()),
                from,
                to,
            });
        }
        let committed_event = to_event(
            &event,
            seq,
            id,
            self.upgrade_id,
            Some((&row.task.task_id, row.task.task_type)),
        );
        if crate::notify::detail_type(effect.kind, Some(from)).is_some() {
            self.load_cluster()?;
            super::outbox::enqueue(
                self.tx,
                &committed_event,
                Some(from),
                self.cluster.as_deref().unwrap_or_default(),
                None,
                Some(&row.task),
            )?;
        }
        self.committed.events.push(committed_event);
        Ok(())
    }

    /// Reads the upgrade's cluster name once per command.
    fn load_cluster(&mut self) -> Result<()> {
        if self.cluster.is_none() {
            self.cluster = Some(
                self.tx
                    .prepare_cached("SELECT cluster_name FROM upgrades WHERE ukey = ?1")?
                    .query_row([self.ukey], |r| r.get(0))?,
            );
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
            let mut row = self
                .tx
                .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = ?1"))?
                .query_row([pkey], |r| task_row(r, self.upgrade_id))?;
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
    fn failed_child(&self, parent: i64) -> Result<Option<String>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT task_id, error_message FROM tasks WHERE parent_tkey = ?1 AND status = ?2 \
                 ORDER BY tkey LIMIT 1",
            )?
            .query_row(params![parent, status_code(ProgressStatus::Failed)], |r| {
                Ok(failure_cause(
                    &r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?.as_deref(),
                ))
            })
            .optional()?)
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
        // A timed leaf completion feeds the duration history, in this transaction.
        if let Some((secs, per_step)) =
            history::sample_of(&row.task, from != ProgressStatus::NotStarted)
        {
            self.load_cluster()?;
            super::history::record(
                self.tx,
                self.cluster.as_deref().unwrap_or_default(),
                &row.task.task_id,
                secs,
                per_step,
            )?;
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
                        .prepare_cached(
                            "SELECT task_id FROM tasks WHERE parent_tkey = ?1 \
                             AND status NOT IN (?2, ?3) ORDER BY tkey LIMIT 5",
                        )?
                        .query_map(
                            params![
                                row.tkey,
                                status_code(ProgressStatus::Completed),
                                status_code(ProgressStatus::Cancelled)
                            ],
                            |r| r.get::<_, String>(0),
                        )?
                        .collect::<rusqlite::Result<_>>()?;
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
                    let leaf = self
                        .tx
                        .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = ?1"))?
                        .query_row([leaf], |r| task_row(r, self.upgrade_id))?;
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
    fn leaves_below(&self, tkey: i64) -> Result<Vec<i64>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT tkey, children, status FROM tasks WHERE parent_tkey = ?1 ORDER BY tkey",
        )?;
        let mut leaves = Vec::new();
        let mut stack = vec![tkey];
        while let Some(k) = stack.pop() {
            let kids: Vec<(i64, u32, i64)> = stmt
                .query_map([k], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
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
pub(super) fn order_batch(tasks: &[NewTask]) -> Result<Vec<usize>> {
    let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    let parents: Vec<Option<&str>> = tasks.iter().map(|t| t.parent_task_id.as_deref()).collect();
    machine::parents_first(&ids, &parents)
}

pub(super) fn add_tasks(
    tx: &Transaction<'_>,
    upgrade_id: &str,
    tasks: &[NewTask],
    now: DateTime<Utc>,
) -> Result<Committed> {
    let ukey = upgrade_key(tx, upgrade_id)?;
    let order = order_batch(tasks)?;
    let mut w = TaskWrite::new(tx, ukey, upgrade_id, now);
    for i in order {
        let t = &tasks[i];
        let exists: Option<i64> = tx
            .prepare_cached("SELECT tkey FROM tasks WHERE ukey = ?1 AND task_id = ?2")?
            .query_row(params![ukey, t.task_id], |r| r.get(0))
            .optional()?;
        if exists.is_some() {
            return Err(Error::AlreadyExists {
                what: format!("task {:?} of upgrade {upgrade_id:?}", t.task_id),
            });
        }
        let (parent_tkey, depth) = match &t.parent_task_id {
            None => (None, 0),
            Some(p) => {
                let parent = load_task(tx, ukey, upgrade_id, p).map_err(|e| match e {
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
        tx.prepare_cached(
            "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, depth, \
             status, percentage, total_steps, completed_steps, weight, created_at, metadata) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, 0, ?10, ?11, ?12)",
        )?
        .execute(params![
            ukey,
            t.task_id,
            t.name,
            type_code(t.task_type),
            parent_tkey,
            t.parent_task_id,
            depth,
            status_code(ProgressStatus::NotStarted),
            t.total_steps,
            weight,
            micros(now),
            json_text(&t.metadata)
        ])?;
        let tkey = tx.last_insert_rowid();
        let event = NewEvent {
            ukey,
            tkey: Some(tkey),
            prev_task_seq: None,
            kind: EventKind::TaskAdded,
            status: ProgressStatus::NotStarted,
            ts: now,
            message: Some(&t.name),
            details: None,
            percentage: 0.0,
            event_id: None,
        };
        let (seq, id) = insert_event(tx, &event)?;
        tx.prepare_cached("UPDATE tasks SET last_event_seq = ?2 WHERE tkey = ?1")?
            .execute(params![tkey, seq])?;
        w.delta.status(None, ProgressStatus::NotStarted);
        w.delta.last_seq = seq;
        w.committed.events.push(to_event(
            &event,
            seq,
            id,
            upgrade_id,
            Some((&t.task_id, t.task_type)),
        ));
        let change = ChildChange {
            from: None,
            to: ProgressStatus::NotStarted,
        };
        w.propagate(parent_tkey, 0.0, weight, 1, Some(change), None)?;
    }
    w.finish()
}
