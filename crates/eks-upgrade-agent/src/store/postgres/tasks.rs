//! Task rows of [`PostgresStore`](super::PostgresStore) for the write path of
//! `store/domain/tasks.rs` ([`TaskRows`]), through the batch's row cache ([`Batch`]): a
//! batch (one transaction) locks its upgrades in key order, then reads the rows its task
//! commands name (a statement of its own, started once the locks are held); commands change
//! the cached rows, and the changed rows are written back in one statement (before any query that reads across rows, and at the end).
//! Events and notifications are staged ([`Staged`]) and get their `seq` at the end of the
//! transaction. A task command that fails puts back the rows it changed (its undo log); other
//! commands of a batch (adding tasks, upgrade commands) run under a savepoint.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::history::Sample;
use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{EventKind, ProgressStatus};
use crate::store::domain::command::{Command, NewTask};
use crate::store::domain::tasks::{TaskEvent, TaskRow, TaskRows, TaskWrite, UpgradeDelta};

/// The rows one batch has read or changed, and what it owes the upgrade rows.
#[derive(Default)]
pub(super) struct Batch {
    /// Upgrades locked by this transaction: id -> (key, cluster name).
    upgrades: HashMap<String, (i64, String)>,
    /// The ids of `upgrades` locked by [`upgrade`](Self::upgrade), in order (those locked
    /// inside a savepoint are its tail, forgotten when it is rolled back to).
    locked: Vec<String>,
    rows: HashMap<i64, TaskRow>,
    /// (upgrade key, task id) -> task key, for the cached rows.
    by_id: HashMap<(i64, String), i64>,
    /// Rows changed since they were last written, in key order.
    dirty: BTreeSet<i64>,
    /// The current command's undo log: each row it changed, as it was before (and whether it
    /// was waiting to be written then).
    undo: Vec<TaskRow>,
    undone: BTreeSet<i64>,
    /// The upgrade rows' counters, per upgrade key.
    deltas: HashMap<i64, UpgradeDelta>,
}

impl Batch {
    /// Locks every upgrade `commands` name, in key order (so batches on several upgrades
    /// cannot deadlock each other), then reads the task rows their task commands name: one
    /// round trip (the function `eua_lock_and_read` of schema 11), two statements inside it,
    /// and they must stay two. At READ COMMITTED a statement sees the snapshot taken when it
    /// started; a lock it waits for re-reads only the locked row, so task rows read by the
    /// statement that waited would be as they were before the holder committed (and written
    /// back over its changes). The second statement starts after the locks are ours.
    pub(super) fn prepare(&mut self, tx: &mut Tx<'_, '_>, commands: &[Command]) -> Result<()> {
        let mut ids: Vec<&str> = commands.iter().map(|c| c.upgrade_id()).collect();
        ids.sort_unstable();
        ids.dedup();
        let (mut task_upgrades, mut task_ids): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for c in commands {
            if let Some((task_id, _)) = c.task_op() {
                task_upgrades.push(c.upgrade_id());
                task_ids.push(task_id);
            }
        }
        let cols: Vec<String> = TASK_COLS
            .split(',')
            .map(|c| format!("(lk_task).{}", c.trim()))
            .collect();
        let rows = tx.query(
            &format!(
                "SELECT {}, lk_ukey, lk_upgrade, lk_cluster FROM eua_lock_and_read($1, $2, $3)",
                cols.join(", ")
            ),
            &[&ids, &task_upgrades, &task_ids],
        )?;
        for r in &rows {
            let ukey: i64 = r.get(TASK_COL_COUNT);
            match r.get::<_, Option<String>>(TASK_COL_COUNT + 2) {
                Some(cluster) => {
                    self.upgrades
                        .insert(r.get(TASK_COL_COUNT + 1), (ukey, cluster));
                }
                // The upgrade id is filled in when a command reads the row. Only rows of
                // upgrades this batch holds (the upgrade rows come first): a row of another
                // would be read before its lock (the function reads none).
                None if self.holds(ukey) => self.cache(ukey, task_row(r, "")?),
                None => {}
            }
        }
        Ok(())
    }

    /// Whether this batch holds the lock of the upgrade with key `ukey`.
    pub(super) fn holds(&self, ukey: i64) -> bool {
        self.upgrades.values().any(|(k, _)| *k == ukey)
    }

    fn cache(&mut self, ukey: i64, row: TaskRow) {
        self.by_id
            .insert((ukey, row.task.task_id.clone()), row.tkey);
        self.rows.insert(row.tkey, row);
    }

    /// The key and cluster of upgrade `upgrade_id`, locking its row if this batch has not.
    fn upgrade(&mut self, tx: &mut Tx<'_, '_>, upgrade_id: &str) -> Result<(i64, String)> {
        if let Some(u) = self.upgrades.get(upgrade_id) {
            return Ok(u.clone());
        }
        let ukey = lock_upgrade(tx, upgrade_id)?;
        let cluster: String = tx
            .one(
                "SELECT cluster_name FROM upgrades WHERE ukey = $1",
                &[&ukey],
            )?
            .get(0);
        self.upgrades
            .insert(upgrade_id.to_owned(), (ukey, cluster.clone()));
        self.locked.push(upgrade_id.to_owned());
        Ok((ukey, cluster))
    }

    /// Writes the changed rows and the upgrade counters owed so far.
    pub(super) fn flush(&mut self, tx: &mut Tx<'_, '_>) -> Result<()> {
        self.pending().run(tx)
    }

    /// The writes of [`flush`](Self::flush), to run later (with the `seq` counter's
    /// statement, at the end of the batch).
    pub(super) fn pending(&mut self) -> Writes {
        let mut w = Writes::default();
        let dirty = std::mem::take(&mut self.dirty);
        save_tasks_into(&mut w, dirty.iter().filter_map(|k| self.rows.get(k)));
        let deltas = std::mem::take(&mut self.deltas);
        deltas_into(&mut w, &deltas);
        w
    }

    /// The writes of [`pending`](Self::pending) but the upgrade counters owed, and those
    /// apart ([`assign_with`] writes them with each upgrade's `last_seq`, in one statement).
    pub(super) fn last_writes(&mut self) -> (Writes, HashMap<i64, UpgradeDelta>) {
        let mut w = Writes::default();
        let dirty = std::mem::take(&mut self.dirty);
        save_tasks_into(&mut w, dirty.iter().filter_map(|k| self.rows.get(k)));
        (w, std::mem::take(&mut self.deltas))
    }

    /// Starts a command: an empty undo log.
    fn begin(&mut self) {
        self.undo.clear();
        self.undone.clear();
    }

    /// Ends a command that failed: its changed rows as they were before it (written again at
    /// the next flush, in case a flush wrote them meanwhile).
    fn roll_back(&mut self) {
        for row in self.undo.drain(..) {
            self.dirty.insert(row.tkey);
            self.rows.insert(row.tkey, row);
        }
        self.undone.clear();
    }

    /// Forgets every cached row (after a rollback to a savepoint: the database is right, the
    /// cache may not be). Nothing may be waiting to be written.
    fn forget(&mut self) {
        debug_assert!(self.dirty.is_empty());
        self.rows.clear();
        self.by_id.clear();
        self.undo.clear();
        self.undone.clear();
    }

    /// Executes a task command (a leaf's or a parent's) through the cache.
    pub(super) fn task_command(
        &mut self,
        tx: &mut Tx<'_, '_>,
        staged: &mut Staged,
        command: &Command,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.begin();
        let result = self.task_command_inner(tx, staged, command, now);
        if result.is_err() {
            self.roll_back();
        }
        result
    }

    fn task_command_inner(
        &mut self,
        tx: &mut Tx<'_, '_>,
        staged: &mut Staged,
        command: &Command,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let upgrade_id = command.upgrade_id();
        let (task_id, _) = command.task_op().expect("remaining commands are task ops");
        let (ukey, cluster) = self.upgrade(tx, upgrade_id)?;
        let mut rows = PgRows {
            tx,
            batch: self,
            staged,
            ukey,
            upgrade_id,
            cluster,
        };
        let row = rows
            .task_by_id(task_id)?
            .ok_or_else(|| task_not_found(upgrade_id, task_id))?;
        let tkey = row.tkey;
        let mut w = TaskWrite::new(&mut rows, upgrade_id, now);
        w.execute(row, command)?;
        let delta = w.delta;
        // The task as this command left it (in the cache: every row a command reads or
        // changes is).
        let mut task = rows.task(tkey)?.task;
        task.upgrade_id = upgrade_id.to_owned();
        staged.committed.task = Some(task);
        self.owe(ukey, &delta);
        Ok(())
    }

    /// Adds `tasks` to the upgrade `upgrade_id` (under a savepoint when in a batch: see
    /// [`forget`](Self::forget)).
    pub(super) fn add_tasks(
        &mut self,
        tx: &mut Tx<'_, '_>,
        staged: &mut Staged,
        upgrade_id: &str,
        tasks: &[NewTask],
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.begin();
        let (ukey, cluster) = self.upgrade(tx, upgrade_id)?;
        let mut rows = PgRows {
            tx,
            batch: self,
            staged,
            ukey,
            upgrade_id,
            cluster,
        };
        let mut w = TaskWrite::new(&mut rows, upgrade_id, now);
        w.add_tasks(tasks)?;
        let delta = w.delta;
        self.owe(ukey, &delta);
        Ok(())
    }

    fn owe(&mut self, ukey: i64, delta: &UpgradeDelta) {
        if !delta.is_empty() {
            self.deltas.entry(ukey).or_default().add(delta);
        }
    }

    /// Runs `f` (a command that writes to the database itself) under a savepoint when
    /// `savepoint`: everything owed is written first, and a failure rolls back to it.
    pub(super) fn isolated<T>(
        &mut self,
        tx: &mut Tx<'_, '_>,
        savepoint: bool,
        f: impl FnOnce(&mut Batch, &mut Tx<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        self.flush(tx)?;
        if !savepoint {
            return f(self, tx);
        }
        tx.batch("SAVEPOINT cmd")?;
        // Rolled back to the savepoint, PostgreSQL releases the row locks taken since it: the
        // batch must forget the upgrades it locked since (the next command on one locks it
        // again), or it would write their tasks and counters unlocked (issue #13).
        let mark = self.locked.len();
        match f(self, tx) {
            Ok(out) => {
                tx.batch("RELEASE cmd")?;
                Ok(out)
            }
            Err(e @ Error::Backend { .. }) => Err(e),
            Err(e) => {
                tx.batch("ROLLBACK TO cmd; RELEASE cmd")?;
                self.dirty.clear();
                self.deltas.clear();
                for id in self.locked.drain(mark..) {
                    self.upgrades.remove(&id);
                }
                self.forget();
                Err(e)
            }
        }
    }
}

/// One command's rows on one upgrade, and the events it staged.
pub(super) struct PgRows<'a, 'b, 'c> {
    tx: &'a mut Tx<'b, 'c>,
    batch: &'a mut Batch,
    staged: &'a mut Staged,
    ukey: i64,
    upgrade_id: &'a str,
    cluster: String,
}

impl PgRows<'_, '_, '_> {
    /// `row` from the cache (or the database), with its upgrade id.
    fn cached(&mut self, tkey: i64) -> Option<TaskRow> {
        self.batch.rows.get(&tkey).map(|r| {
            let mut r = r.clone();
            r.task.upgrade_id = self.upgrade_id.to_owned();
            r
        })
    }

    /// Writes the changed rows before a query that reads across rows.
    fn sync(&mut self) -> Result<()> {
        self.batch.flush(self.tx)
    }
}

impl TaskRows for PgRows<'_, '_, '_> {
    fn task(&mut self, tkey: i64) -> Result<TaskRow> {
        if let Some(row) = self.cached(tkey) {
            return Ok(row);
        }
        let row = task_row(
            &self.tx.one(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE tkey = $1"),
                &[&tkey],
            )?,
            self.upgrade_id,
        )?;
        self.batch.cache(self.ukey, row.clone());
        Ok(row)
    }

    fn task_by_id(&mut self, task_id: &str) -> Result<Option<TaskRow>> {
        if let Some(k) = self
            .batch
            .by_id
            .get(&(self.ukey, task_id.to_owned()))
            .copied()
        {
            return Ok(self.cached(k));
        }
        match load_task(self.tx, self.ukey, self.upgrade_id, task_id) {
            Ok(row) => {
                self.batch.cache(self.ukey, row.clone());
                Ok(Some(row))
            }
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, row: &TaskRow) -> Result<()> {
        let b = &mut *self.batch;
        if b.undone.insert(row.tkey)
            && let Some(old) = b.rows.get(&row.tkey)
        {
            b.undo.push(old.clone());
        }
        b.dirty.insert(row.tkey);
        b.rows.insert(row.tkey, row.clone());
        Ok(())
    }

    fn children(&mut self, parent: i64) -> Result<Vec<(i64, u32, ProgressStatus)>> {
        self.sync()?;
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
        self.sync()?;
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
        self.sync()?;
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
            let cluster = self.cluster.clone();
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
        let cluster = self.cluster.clone();
        self.staged.samples.push(Sample {
            cluster,
            task_id: task_id.to_owned(),
            secs,
            per_step,
        });
        Ok(())
    }
}
