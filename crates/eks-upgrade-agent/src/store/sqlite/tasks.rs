//! Task rows of [`SqliteStore`](super::SqliteStore) for the write path of `store/domain/tasks.rs`
//! ([`TaskRows`]): reads and writes go straight to the transaction, an event is inserted (and
//! numbered) at once and chained to the task's previous one, its notification enqueued in the
//! outbox, a completion's duration sample written to `task_history`.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{EventKind, ProgressStatus, StatusChange};
use crate::store::Committed;
use crate::store::domain::command::NewTask;
use crate::store::domain::tasks::{TaskEvent, TaskRow, TaskRows, TaskWrite, UpgradeDelta};

/// One command's rows on one upgrade, and what it appended.
pub(super) struct SqliteRows<'a, 't> {
    tx: &'a Transaction<'t>,
    ukey: i64,
    upgrade_id: &'a str,
    committed: Committed,
    last_seq: i64,
    cluster: Option<String>,
    /// The task a task command names (its key), and its row as last saved.
    named: Option<(i64, Option<TaskRow>)>,
}

impl<'a, 't> SqliteRows<'a, 't> {
    pub(super) fn new(tx: &'a Transaction<'t>, ukey: i64, upgrade_id: &'a str) -> Self {
        SqliteRows {
            tx,
            ukey,
            upgrade_id,
            committed: Committed::default(),
            last_seq: 0,
            cluster: None,
            named: None,
        }
    }

    /// Writes the upgrade row's counters and `last_seq`; returns what was appended.
    pub(super) fn finish(self, delta: &UpgradeDelta) -> Result<Committed> {
        flush_delta(self.tx, self.ukey, delta, self.last_seq)?;
        Ok(self.committed)
    }

    /// The upgrade's cluster name, read once per command.
    fn cluster(&mut self) -> Result<&str> {
        if self.cluster.is_none() {
            self.cluster = Some(
                self.tx
                    .prepare_cached("SELECT cluster_name FROM upgrades WHERE ukey = ?1")?
                    .query_row([self.ukey], |r| r.get(0))?,
            );
        }
        Ok(self.cluster.as_deref().unwrap_or_default())
    }
}

impl TaskRows for SqliteRows<'_, '_> {
    fn task(&mut self, tkey: i64) -> Result<TaskRow> {
        Ok(self
            .tx
            .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = ?1"))?
            .query_row([tkey], |r| task_row(r, self.upgrade_id))?)
    }

    fn task_by_id(&mut self, task_id: &str) -> Result<Option<TaskRow>> {
        match load_task(self.tx, self.ukey, self.upgrade_id, task_id) {
            Ok(row) => Ok(Some(row)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, row: &TaskRow) -> Result<()> {
        if let Some((tkey, saved)) = &mut self.named
            && *tkey == row.tkey
        {
            *saved = Some(row.clone());
        }
        save_task(self.tx, row)
    }

    fn children(&mut self, parent: i64) -> Result<Vec<(i64, u32, ProgressStatus)>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT tkey, children, status FROM tasks WHERE parent_tkey = ?1 ORDER BY tkey",
        )?;
        let rows = stmt.query_map([parent], |r| {
            Ok((r.get(0)?, r.get(1)?, status_from(r.get(2)?)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn first_failed_child(&mut self, parent: i64) -> Result<Option<(String, Option<String>)>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT task_id, error_message FROM tasks WHERE parent_tkey = ?1 AND status = ?2 \
                 ORDER BY tkey LIMIT 1",
            )?
            .query_row(params![parent, status_code(ProgressStatus::Failed)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    fn unfinished_children(&mut self, parent: i64, limit: usize) -> Result<Vec<String>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT task_id FROM tasks WHERE parent_tkey = ?1 \
             AND status NOT IN (?2, ?3) ORDER BY tkey LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![
                parent,
                status_code(ProgressStatus::Completed),
                status_code(ProgressStatus::Cancelled),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| r.get::<_, String>(0),
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn insert_task(
        &mut self,
        t: &NewTask,
        parent: Option<i64>,
        depth: u32,
        weight: f64,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        self.tx
            .prepare_cached(
                "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, \
                 depth, status, percentage, total_steps, completed_steps, weight, created_at, \
                 metadata) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, 0, ?10, ?11, ?12)",
            )?
            .execute(params![
                self.ukey,
                t.task_id,
                t.name,
                type_code(t.task_type),
                parent,
                t.parent_task_id,
                depth,
                status_code(ProgressStatus::NotStarted),
                t.total_steps,
                weight,
                micros(now),
                json_text(&t.metadata)
            ])?;
        let tkey = self.tx.last_insert_rowid();
        let event = NewEvent {
            ukey: self.ukey,
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
        let (seq, id) = insert_event(self.tx, &event)?;
        self.tx
            .prepare_cached("UPDATE tasks SET last_event_seq = ?2 WHERE tkey = ?1")?
            .execute(params![tkey, seq])?;
        self.last_seq = seq;
        self.committed.events.push(to_event(
            &event,
            seq,
            id,
            self.upgrade_id,
            Some((&t.task_id, t.task_type)),
        ));
        Ok(tkey)
    }

    fn task_event(
        &mut self,
        row: &mut TaskRow,
        from: ProgressStatus,
        e: TaskEvent<'_>,
    ) -> Result<()> {
        let event = NewEvent {
            ukey: self.ukey,
            tkey: Some(row.tkey),
            prev_task_seq: Some(row.last_event_seq).filter(|s| *s > 0),
            kind: e.kind,
            status: row.task.status,
            ts: e.ts,
            message: e.message,
            details: e.details,
            percentage: row.task.percentage,
            event_id: None,
        };
        let (seq, id) = insert_event(self.tx, &event)?;
        row.last_event_seq = seq;
        self.last_seq = seq;
        let to = row.task.status;
        if from != to {
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
        if crate::notify::detail_type(e.kind, Some(from)).is_some() {
            let tx = self.tx;
            let cluster = self.cluster()?;
            super::outbox::enqueue(
                tx,
                &committed_event,
                Some(from),
                cluster,
                None,
                Some(&row.task),
            )?;
        }
        self.committed.events.push(committed_event);
        Ok(())
    }

    fn history_sample(&mut self, task_id: &str, secs: f64, per_step: Option<f64>) -> Result<()> {
        let tx = self.tx;
        let cluster = self.cluster()?;
        super::history::record(tx, cluster, task_id, secs, per_step)
    }
}

/// Executes a task command on task `task_id` of the upgrade `ukey`.
pub(super) fn task_command(
    tx: &Transaction<'_>,
    ukey: i64,
    upgrade_id: &str,
    task_id: &str,
    command: &crate::store::domain::command::Command,
    now: DateTime<Utc>,
) -> Result<Committed> {
    let row = load_task(tx, ukey, upgrade_id, task_id)?;
    let mut rows = SqliteRows::new(tx, ukey, upgrade_id);
    rows.named = Some((row.tkey, None));
    let mut w = TaskWrite::new(&mut rows, upgrade_id, now);
    w.execute(row, command)?;
    let delta = w.delta;
    // The task as this command left it: as it last saved it (every task command saves it).
    let saved = rows.named.take().and_then(|(_, saved)| saved);
    let mut committed = rows.finish(&delta)?;
    committed.task = match saved {
        Some(row) => Some(row.task),
        None => Some(load_task(tx, ukey, upgrade_id, task_id)?.task),
    };
    Ok(committed)
}

/// Adds `tasks` to the upgrade `upgrade_id`.
pub(super) fn add_tasks(
    tx: &Transaction<'_>,
    upgrade_id: &str,
    tasks: &[NewTask],
    now: DateTime<Utc>,
) -> Result<Committed> {
    let ukey = upgrade_key(tx, upgrade_id)?;
    let mut rows = SqliteRows::new(tx, ukey, upgrade_id);
    let mut w = TaskWrite::new(&mut rows, upgrade_id, now);
    w.add_tasks(tasks)?;
    let delta = w.delta;
    rows.finish(&delta)
}
