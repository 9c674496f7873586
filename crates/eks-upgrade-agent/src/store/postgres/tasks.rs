//! Task rows of [`PostgresStore`](super::PostgresStore) for the write path of
//! `store/domain/tasks.rs` ([`TaskRows`]): reads and writes go to the transaction; events and
//! notifications are staged ([`Staged`]) and get their `seq` at the end of the transaction.

use chrono::{DateTime, Utc};

use super::history::Sample;
use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{EventKind, ProgressStatus};
use crate::store::domain::command::{Command, NewTask};
use crate::store::domain::tasks::{TaskEvent, TaskRow, TaskRows, TaskWrite};

/// One command's rows on one upgrade, and the events it staged.
pub(super) struct PgRows<'a, 'b, 'c> {
    tx: &'a mut Tx<'b, 'c>,
    staged: &'a mut Staged,
    ukey: i64,
    upgrade_id: &'a str,
    cluster: Option<String>,
}

impl<'a, 'b, 'c> PgRows<'a, 'b, 'c> {
    pub(super) fn new(
        tx: &'a mut Tx<'b, 'c>,
        staged: &'a mut Staged,
        ukey: i64,
        upgrade_id: &'a str,
    ) -> Self {
        PgRows {
            tx,
            staged,
            ukey,
            upgrade_id,
            cluster: None,
        }
    }

    /// The upgrade's cluster name, read once per command.
    fn cluster(&mut self) -> Result<String> {
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
        Ok(self.cluster.clone().unwrap_or_default())
    }
}

impl TaskRows for PgRows<'_, '_, '_> {
    fn task(&mut self, tkey: i64) -> Result<TaskRow> {
        task_row(
            &self.tx.one(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = $1"),
                &[&tkey],
            )?,
            self.upgrade_id,
        )
    }

    fn task_by_id(&mut self, task_id: &str) -> Result<Option<TaskRow>> {
        match load_task(self.tx, self.ukey, self.upgrade_id, task_id) {
            Ok(row) => Ok(Some(row)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, row: &TaskRow) -> Result<()> {
        save_task(self.tx, row)
    }

    fn children(&mut self, parent: i64) -> Result<Vec<(i64, u32, ProgressStatus)>> {
        self.tx
            .query(
                "SELECT tkey, children, status FROM tasks WHERE parent_tkey = $1 ORDER BY tkey",
                &[&parent],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.get(0),
                    u32::try_from(r.get::<_, i64>(1)).unwrap_or(u32::MAX),
                    status_from(r.get(2))?,
                ))
            })
            .collect()
    }

    fn first_failed_child(&mut self, parent: i64) -> Result<Option<(String, Option<String>)>> {
        Ok(self
            .tx
            .opt(
                "SELECT task_id, error_message FROM tasks WHERE parent_tkey = $1 AND status = $2 \
                 ORDER BY tkey LIMIT 1",
                &[&parent, &status_code(ProgressStatus::Failed)],
            )?
            .map(|r| (r.get(0), r.get(1))))
    }

    fn unfinished_children(&mut self, parent: i64, limit: usize) -> Result<Vec<String>> {
        Ok(self
            .tx
            .query(
                "SELECT task_id FROM tasks WHERE parent_tkey = $1 \
                 AND status NOT IN ($2, $3) ORDER BY tkey LIMIT $4",
                &[
                    &parent,
                    &status_code(ProgressStatus::Completed),
                    &status_code(ProgressStatus::Cancelled),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
    }

    fn insert_task(
        &mut self,
        t: &NewTask,
        parent: Option<i64>,
        depth: u32,
        weight: f64,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        let tkey: i64 = self
            .tx
            .one(
                "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, \
                 depth, status, percentage, total_steps, completed_steps, weight, created_at, \
                 metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, 0, $10, $11, $12) \
                 RETURNING tkey",
                &[
                    &self.ukey,
                    &t.task_id,
                    &t.name,
                    &type_code(t.task_type),
                    &parent,
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
        self.staged.push(
            self.ukey,
            Some(tkey),
            new_event(
                self.upgrade_id,
                Some((&t.task_id, t.task_type)),
                EventKind::TaskAdded,
                ProgressStatus::NotStarted,
                now,
                Some(&t.name),
                None,
                0.0,
            ),
        );
        Ok(tkey)
    }

    fn task_event(
        &mut self,
        row: &mut TaskRow,
        from: ProgressStatus,
        e: TaskEvent<'_>,
    ) -> Result<()> {
        let event = new_event(
            self.upgrade_id,
            Some((&row.task.task_id, row.task.task_type)),
            e.kind,
            row.task.status,
            e.ts,
            e.message,
            e.details,
            row.task.percentage,
        );
        let local = self.staged.push(self.ukey, Some(row.tkey), event);
        let to = row.task.status;
        if from != to {
            self.staged
                .status_change(local, self.upgrade_id, Some(&row.task.task_id), from, to);
        }
        if crate::notify::detail_type(e.kind, Some(from)).is_some() {
            let cluster = self.cluster()?;
            self.staged.notes.push(Note {
                event: local as usize - 1,
                from: Some(from),
                cluster,
                upgrade: None,
                task: Some(row.task.clone()),
            });
        }
        Ok(())
    }

    fn history_sample(&mut self, task_id: &str, secs: f64, per_step: Option<f64>) -> Result<()> {
        let cluster = self.cluster()?;
        self.staged.samples.push(Sample {
            cluster,
            task_id: task_id.to_owned(),
            secs,
            per_step,
        });
        Ok(())
    }
}

/// Executes a task command on task `task_id` of the upgrade `upgrade_id`.
pub(super) fn task_command(
    tx: &mut Tx<'_, '_>,
    staged: &mut Staged,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<()> {
    let upgrade_id = command.upgrade_id();
    let (task_id, _) = command.task_op().expect("remaining commands are task ops");
    let ukey = lock_upgrade(tx, upgrade_id)?;
    let row = load_task(tx, ukey, upgrade_id, task_id)?;
    let mut rows = PgRows::new(tx, staged, ukey, upgrade_id);
    let mut w = TaskWrite::new(&mut rows, upgrade_id, now);
    w.execute(row, command)?;
    let delta = w.delta;
    flush_delta(tx, ukey, &delta)
}

/// Adds `tasks` to the upgrade `upgrade_id`.
pub(super) fn add_tasks(
    tx: &mut Tx<'_, '_>,
    staged: &mut Staged,
    upgrade_id: &str,
    tasks: &[NewTask],
    now: DateTime<Utc>,
) -> Result<()> {
    let ukey = lock_upgrade(tx, upgrade_id)?;
    let mut rows = PgRows::new(tx, staged, ukey, upgrade_id);
    let mut w = TaskWrite::new(&mut rows, upgrade_id, now);
    w.add_tasks(tasks)?;
    let delta = w.delta;
    flush_delta(tx, ukey, &delta)
}
