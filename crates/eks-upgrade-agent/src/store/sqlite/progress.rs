//! [`SqliteStore`]: the embedded default backend, one SQLite database in WAL mode inside the
//! data directory. Current state lives in `upgrades` and `tasks`; history in `events`, whose
//! rowid is the store-wide `seq`.
//!
//! Cost of one task update: one event insert, one task row update, one row update per ancestor,
//! one upgrade row update: O(depth), whatever the number of tasks or events. Per-task history
//! is a linked list (`events.prev_task_seq`, `tasks.last_event_seq`) so the recent events of a
//! task cost O(limit) without a second index on the events table.
//!
//! Concurrency: one writer connection per process, `BEGIN IMMEDIATE` transactions and a busy
//! timeout, so several processes can write the same file; a second connection serves reads,
//! which WAL lets run while a write is in flight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use uuid::Uuid;

use super::import::import_upgrade;
use super::tasks::{add_tasks, task_command};
use crate::error::{Error, Result};
use crate::model::{
    EventKind, JsonMap, ProgressEvent, ProgressStatus, StatusChange, Task, TaskType, Upgrade,
};
use crate::store::domain::command::Command;
use crate::store::domain::machine;
pub(super) use crate::store::domain::tasks::{TaskRow, UpgradeDelta};
use crate::store::{Committed, Durability, EventQuery, ProgressStore};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "eks-upgrade-agent.sqlite3";

const PAGE_SIZE: i64 = 1024;
const WRITER_CACHE_KIB: i64 = 2_000;
const READER_CACHE_KIB: i64 = 32_000;
const WAL_CHECKPOINT_PAGES: i64 = 65_536;

/// Options for opening a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Commit durability; see [`Durability`].
    pub durability: Durability,
    /// How long a write waits for another process holding the write lock.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::default(),
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The embedded SQLite backend. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    /// Row keys of upgrades, by id (see `cached_upgrade_key`); locked with the writer.
    upgrade_keys: Mutex<HashMap<String, i64>>,
    reader: Mutex<Connection>,
    _checkpointer: Checkpointer,
}

/// Moves WAL checkpoints (page copies and their fsync) off the writer's path: a thread with
/// its own connection runs a passive checkpoint every [`CHECKPOINT_EVERY`]. The writers'
/// automatic checkpoint stays on, at a high mark, as a backstop for short-lived processes.
#[derive(Debug)]
struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);

impl Checkpointer {
    fn start(path: &Path, options: &SqliteOptions) -> Result<Checkpointer> {
        let conn = open_connection(path, options, WRITER_CACHE_KIB)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("eua-checkpoint".into())
            .spawn(move || {
                let (lock, cvar) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let (guard, _) = cvar
                        .wait_timeout(stopped, CHECKPOINT_EVERY)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, "background checkpoint skipped");
                    }
                }
            })
            .map_err(|e| Error::backend("cannot start the checkpoint thread", e))?;
        Ok(Checkpointer {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cvar.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path, options: &SqliteOptions) -> Result<SqliteStore> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            Error::backend(
                format!("cannot create data directory {}", data_dir.display()),
                e,
            )
        })?;
        let path = data_dir.join(DB_FILE);
        let writer = open_connection(&path, options, WRITER_CACHE_KIB)?;
        super::schema::migrate(&writer)?;
        let reader = open_connection(&path, options, READER_CACHE_KIB)?;
        reader.pragma_update(None, "query_only", true)?;
        let checkpointer = Checkpointer::start(&path, options)?;
        Ok(SqliteStore {
            path,
            writer: Mutex::new(writer),
            upgrade_keys: Mutex::new(HashMap::new()),
            reader: Mutex::new(reader),
            _checkpointer: checkpointer,
        })
    }

    /// Opens the store in `data_dir` only if it exists there; creates nothing. A directory
    /// without a store (or no directory at all) is `NotFound`, naming it.
    pub fn open_existing(data_dir: &Path, options: &SqliteOptions) -> Result<SqliteStore> {
        if !data_dir.join(DB_FILE).is_file() {
            return Err(Error::not_found(format!(
                "store in {} (no {DB_FILE} there)",
                data_dir.display()
            )));
        }
        SqliteStore::open(data_dir, options)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the database (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64> {
        self.read(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
    }

    /// Number of rows in each table, by name (`store info`): the tables `store copy` copies,
    /// the same list on both backends.
    pub fn counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|c| {
            let mut out = Vec::new();
            for table in crate::store::copy::table_names() {
                let n: i64 =
                    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
                out.push((table.to_owned(), n as u64));
            }
            Ok(out)
        })
    }

    pub(super) fn writer(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the read connection.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        f(&self.reader())
    }

    /// Runs `f` in a write transaction on the writer connection. Other modules of the library
    /// (artifacts, outbox) use this to share the database and its transactions.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

fn open_connection(path: &Path, options: &SqliteOptions, cache_kib: i64) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| Error::backend(format!("cannot open {}", path.display()), e))?;
    conn.busy_timeout(options.busy_timeout)?;
    // Small pages: a commit writes every page it touched to the WAL, and ours touch 4-6 pages
    // holding small rows. Only takes effect when the database is created.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Backend {
            message: format!("{} cannot use WAL mode (got {mode})", path.display()),
            source: None,
        });
    }
    let sync = match options.durability {
        Durability::ProcessCrash => "NORMAL",
        Durability::PowerLoss => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // The writer gets a small page cache on purpose: SQLite walks its page-cache hash at the end
    // of every write transaction, so a large cache makes each commit slower as the database grows
    // (measured: 16 MiB cost 15% of artifact adds at 100,000 artifacts; a memory map cost more).
    // The reader gets a larger one for searches.
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    // Checkpoint every WAL_CHECKPOINT_PAGES pages rather than 1000: hot pages are rewritten many
    // times between checkpoints, and each checkpoint costs an fsync.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

// ---------------------------------------------------------------------------------------------
// Conversions

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn from_micros(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(v).unwrap_or_default()
}

pub(super) fn opt_time(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_micros)
}

pub(super) fn status_code(s: ProgressStatus) -> i64 {
    s.index() as i64
}

pub(super) fn status_from(code: i64) -> rusqlite::Result<ProgressStatus> {
    ProgressStatus::ALL
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad_column(format!("unknown status code {code}")))
}

pub(super) fn type_code(t: TaskType) -> i64 {
    TaskType::ALL.iter().position(|x| *x == t).unwrap_or(0) as i64
}

fn type_from(code: i64) -> rusqlite::Result<TaskType> {
    TaskType::ALL
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad_column(format!("unknown task type code {code}")))
}

pub(super) fn bad_column(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Integer,
        Box::new(Error::invalid(msg)),
    )
}

pub(super) fn json_text(map: &JsonMap) -> Option<String> {
    if map.is_empty() {
        None
    } else {
        serde_json::to_string(map).ok()
    }
}

pub(super) fn json_map(text: Option<String>) -> JsonMap {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

const UPGRADE_COLS: &str = "ukey, upgrade_id, plan_id, cluster_name, status, current_phase, \
    created_at, started_at, completed_at, error_message, metadata, top_weight, top_sum, \
    c0, c1, c2, c3, c4, c5, last_seq";

pub(super) struct UpgradeRow {
    pub(super) ukey: i64,
    pub(super) upgrade: Upgrade,
}

fn upgrade_row(r: &Row<'_>) -> rusqlite::Result<UpgradeRow> {
    let top_weight: f64 = r.get(11)?;
    let top_sum: f64 = r.get(12)?;
    let mut counts = [0u64; 6];
    for (i, c) in counts.iter_mut().enumerate() {
        *c = r.get::<_, i64>(13 + i)? as u64;
    }
    Ok(UpgradeRow {
        ukey: r.get(0)?,
        upgrade: Upgrade {
            upgrade_id: r.get(1)?,
            plan_id: r.get(2)?,
            cluster_name: r.get(3)?,
            status: status_from(r.get(4)?)?,
            current_phase: r.get(5)?,
            created_at: from_micros(r.get(6)?),
            started_at: opt_time(r.get(7)?),
            completed_at: opt_time(r.get(8)?),
            error_message: r.get(9)?,
            metadata: json_map(r.get(10)?),
            overall_percentage: overall(top_weight, top_sum),
            task_counts: counts,
            last_seq: r.get::<_, i64>(19)? as u64,
        },
    })
}

fn overall(top_weight: f64, top_sum: f64) -> f64 {
    if top_weight > 0.0 {
        machine::clamp_pct(top_sum / top_weight)
    } else {
        0.0
    }
}

pub(super) const TASK_COLS: &str = "tkey, parent_tkey, depth, child_weight, child_sum, last_event_seq, \
    task_id, name, task_type, parent_task_id, status, percentage, current_step, total_steps, \
    completed_steps, weight, children, error_message, retry_count, last_message, created_at, \
    started_at, completed_at, duration, metadata, k0, k1, k2, k3, k4, k5";

pub(super) fn task_row(r: &Row<'_>, upgrade_id: &str) -> rusqlite::Result<TaskRow> {
    let mut child_counts = [0u32; 6];
    for (i, c) in child_counts.iter_mut().enumerate() {
        *c = r.get(25 + i)?;
    }
    Ok(TaskRow {
        child_counts,
        tkey: r.get(0)?,
        parent_tkey: r.get(1)?,
        depth: r.get(2)?,
        child_weight: r.get(3)?,
        child_sum: r.get(4)?,
        last_event_seq: r.get(5)?,
        task: Task {
            upgrade_id: upgrade_id.to_owned(),
            task_id: r.get(6)?,
            name: r.get(7)?,
            task_type: type_from(r.get(8)?)?,
            parent_task_id: r.get(9)?,
            status: status_from(r.get(10)?)?,
            percentage: r.get(11)?,
            current_step: r.get(12)?,
            total_steps: r.get(13)?,
            completed_steps: r.get(14)?,
            weight: r.get(15)?,
            children: r.get(16)?,
            error_message: r.get(17)?,
            retry_count: r.get(18)?,
            last_message: r.get(19)?,
            created_at: from_micros(r.get(20)?),
            started_at: opt_time(r.get(21)?),
            completed_at: opt_time(r.get(22)?),
            duration: r.get(23)?,
            metadata: json_map(r.get(24)?),
        },
    })
}

pub(super) const EVENT_SELECT: &str = "SELECT e.seq, e.event_id, u.upgrade_id, e.ts, t.task_id, t.task_type, \
    e.kind, e.status, e.message, e.details, e.percentage \
    FROM events e JOIN upgrades u ON u.ukey = e.ukey LEFT JOIN tasks t ON t.tkey = e.tkey";

pub(super) fn event_row(r: &Row<'_>) -> rusqlite::Result<ProgressEvent> {
    let id: Vec<u8> = r.get(1)?;
    let event_id = Uuid::from_slice(&id)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| String::from_utf8_lossy(&id).into_owned());
    let kind: i64 = r.get(6)?;
    Ok(ProgressEvent {
        seq: r.get::<_, i64>(0)? as u64,
        event_id,
        upgrade_id: r.get(2)?,
        timestamp: from_micros(r.get(3)?),
        task_id: r.get(4)?,
        task_type: r.get::<_, Option<i64>>(5)?.map(type_from).transpose()?,
        kind: EventKind::from_code(kind)
            .ok_or_else(|| bad_column(format!("unknown event kind {kind}")))?,
        status: status_from(r.get(7)?)?,
        message: r.get(8)?,
        details: json_map(r.get(9)?),
        percentage: r.get(10)?,
    })
}

fn upgrade_not_found(upgrade_id: &str) -> Error {
    Error::not_found(format!("upgrade {upgrade_id:?}"))
}

fn task_not_found(upgrade_id: &str, task_id: &str) -> Error {
    Error::not_found(format!("task {task_id:?} of upgrade {upgrade_id:?}"))
}

// ---------------------------------------------------------------------------------------------
// Writes

/// Writes everything one command changed on the upgrade row, in one statement at the end: its
/// counters and `last_seq` (at least `last_seq`).
pub(super) fn flush_delta(
    tx: &Transaction<'_>,
    ukey: i64,
    delta: &UpgradeDelta,
    last_seq: i64,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE upgrades SET c0 = c0 + ?2, c1 = c1 + ?3, c2 = c2 + ?4, c3 = c3 + ?5, \
         c4 = c4 + ?6, c5 = c5 + ?7, top_weight = top_weight + ?8, top_sum = top_sum + ?9, \
         last_seq = max(last_seq, ?10) WHERE ukey = ?1",
    )?
    .execute(params![
        ukey,
        delta.counts[0],
        delta.counts[1],
        delta.counts[2],
        delta.counts[3],
        delta.counts[4],
        delta.counts[5],
        delta.top_weight,
        delta.top_sum,
        last_seq
    ])?;
    Ok(())
}

pub(super) struct NewEvent<'a> {
    pub(super) ukey: i64,
    pub(super) tkey: Option<i64>,
    pub(super) prev_task_seq: Option<i64>,
    pub(super) kind: EventKind,
    pub(super) status: ProgressStatus,
    pub(super) ts: DateTime<Utc>,
    pub(super) message: Option<&'a str>,
    pub(super) details: Option<&'a JsonMap>,
    pub(super) percentage: f64,
    pub(super) event_id: Option<Uuid>,
}

pub(super) fn insert_event(tx: &Transaction<'_>, e: &NewEvent<'_>) -> Result<(i64, Uuid)> {
    let id = e.event_id.unwrap_or_else(Uuid::now_v7);
    tx.prepare_cached(
        "INSERT INTO events (event_id, ukey, tkey, prev_task_seq, kind, status, ts, message, \
         details, percentage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        id.as_bytes().as_slice(),
        e.ukey,
        e.tkey,
        e.prev_task_seq,
        e.kind.code(),
        status_code(e.status),
        micros(e.ts),
        e.message,
        e.details.and_then(json_text),
        e.percentage
    ])?;
    Ok((tx.last_insert_rowid(), id))
}

pub(super) fn load_upgrade(tx: &Connection, upgrade_id: &str) -> Result<UpgradeRow> {
    tx.prepare_cached(&format!(
        "SELECT {UPGRADE_COLS} FROM upgrades WHERE upgrade_id = ?1"
    ))?
    .query_row([upgrade_id], upgrade_row)
    .optional()?
    .ok_or_else(|| upgrade_not_found(upgrade_id))
}

pub(super) fn upgrade_key(tx: &Connection, upgrade_id: &str) -> Result<i64> {
    tx.prepare_cached("SELECT ukey FROM upgrades WHERE upgrade_id = ?1")?
        .query_row([upgrade_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| upgrade_not_found(upgrade_id))
}

pub(super) fn load_task(
    tx: &Connection,
    ukey: i64,
    upgrade_id: &str,
    task_id: &str,
) -> Result<TaskRow> {
    tx.prepare_cached(&format!(
        "SELECT {TASK_COLS} FROM tasks WHERE ukey = ?1 AND task_id = ?2"
    ))?
    .query_row(params![ukey, task_id], |r| task_row(r, upgrade_id))
    .optional()?
    .ok_or_else(|| task_not_found(upgrade_id, task_id))
}

pub(super) fn save_task(tx: &Transaction<'_>, row: &TaskRow) -> Result<()> {
    let t = &row.task;
    tx.prepare_cached(
        "UPDATE tasks SET status = ?2, percentage = ?3, current_step = ?4, completed_steps = ?5, \
         error_message = ?6, retry_count = ?7, last_message = ?8, started_at = ?9, \
         completed_at = ?10, duration = ?11, last_event_seq = ?12, children = ?13, \
         child_weight = ?14, child_sum = ?15, k0 = ?16, k1 = ?17, k2 = ?18, k3 = ?19, k4 = ?20, \
         k5 = ?21 WHERE tkey = ?1",
    )?
    .execute(params![
        row.tkey,
        status_code(t.status),
        t.percentage,
        t.current_step,
        t.completed_steps,
        t.error_message,
        t.retry_count,
        t.last_message,
        t.started_at.map(micros),
        t.completed_at.map(micros),
        t.duration,
        row.last_event_seq,
        t.children,
        row.child_weight,
        row.child_sum,
        row.child_counts[0],
        row.child_counts[1],
        row.child_counts[2],
        row.child_counts[3],
        row.child_counts[4],
        row.child_counts[5]
    ])?;
    Ok(())
}

fn execute_batch(
    conn: &mut Connection,
    keys: &mut HashMap<String, i64>,
    commands: &[Command],
) -> Result<Vec<Result<Committed>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = crate::model::now();
    let mut results = Vec::with_capacity(commands.len());
    if let [command] = commands {
        // One command: no savepoint needed, a failure rolls the transaction back.
        match execute_one(&tx, keys, command, now) {
            Ok(c) => {
                tx.commit()?;
                return Ok(vec![Ok(c)]);
            }
            Err(e @ Error::Backend { .. }) => return Err(e),
            Err(e) => return Ok(vec![Err(e)]),
        }
    }
    for command in commands {
        tx.execute_batch("SAVEPOINT cmd")?;
        match execute_one(&tx, keys, command, now) {
            Ok(c) => {
                tx.execute_batch("RELEASE cmd")?;
                results.push(Ok(c));
            }
            Err(e @ Error::Backend { .. }) => return Err(e),
            Err(e) => {
                tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
                results.push(Err(e));
            }
        }
    }
    tx.commit()?;
    Ok(results)
}

/// The upgrade's row key, from `keys` when known. Upgrades are never deleted and keys never
/// change, so a key read from the database stays right; the caller clears `keys` when a
/// transaction that read one fails to commit.
fn cached_upgrade_key(
    tx: &Connection,
    keys: &mut HashMap<String, i64>,
    upgrade_id: &str,
) -> Result<i64> {
    if let Some(k) = keys.get(upgrade_id) {
        return Ok(*k);
    }
    let k = upgrade_key(tx, upgrade_id)?;
    if keys.len() >= 10_000 {
        keys.clear();
    }
    keys.insert(upgrade_id.to_owned(), k);
    Ok(k)
}

fn execute_one(
    tx: &Transaction<'_>,
    keys: &mut HashMap<String, i64>,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<Committed> {
    command.validate()?;
    match command {
        Command::UpgradeCreate {
            upgrade_id,
            plan_id,
            cluster_name,
            metadata,
        } => {
            if upgrade_key(tx, upgrade_id).is_ok() {
                return Err(Error::AlreadyExists {
                    what: format!("upgrade {upgrade_id:?}"),
                });
            }
            tx.prepare_cached(
                "INSERT INTO upgrades (upgrade_id, plan_id, cluster_name, status, created_at, metadata) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                upgrade_id,
                plan_id,
                cluster_name,
                status_code(ProgressStatus::NotStarted),
                micros(now),
                json_text(metadata)
            ])?;
            let ukey = tx.last_insert_rowid();
            let event = NewEvent {
                ukey,
                tkey: None,
                prev_task_seq: None,
                kind: EventKind::UpgradeCreated,
                status: ProgressStatus::NotStarted,
                ts: now,
                message: None,
                details: None,
                percentage: 0.0,
                event_id: None,
            };
            let (seq, id) = insert_event(tx, &event)?;
            flush_delta(tx, ukey, &UpgradeDelta::default(), seq)?;
            Ok(Committed {
                events: vec![to_event(&event, seq, id, upgrade_id, None)],
                ..Committed::default()
            })
        }
        Command::UpgradeStart { upgrade_id, .. }
        | Command::UpgradePhase { upgrade_id, .. }
        | Command::UpgradeComplete { upgrade_id, .. }
        | Command::UpgradeFail { upgrade_id, .. } => {
            let row = load_upgrade(tx, upgrade_id)?;
            let mut u = row.upgrade;
            let (from, effect) = machine::apply_upgrade(&mut u, command, now)?;
            let (to, kind, message) = (u.status, effect.kind, effect.message);
            let event = NewEvent {
                ukey: row.ukey,
                tkey: None,
                prev_task_seq: None,
                kind,
                status: to,
                ts: now,
                message: message.as_deref(),
                details: None,
                percentage: u.overall_percentage,
                event_id: None,
            };
            let (seq, id) = insert_event(tx, &event)?;
            tx.prepare_cached(
                "UPDATE upgrades SET status = ?2, current_phase = ?3, started_at = ?4, \
                 completed_at = ?5, error_message = ?6, last_seq = ?7 WHERE ukey = ?1",
            )?
            .execute(params![
                row.ukey,
                status_code(to),
                u.current_phase,
                u.started_at.map(micros),
                u.completed_at.map(micros),
                u.error_message,
                seq
            ])?;
            let mut status_changes = Vec::new();
            if from != to {
                status_changes.push(StatusChange {
                    seq: seq as u64,
                    upgrade_id: upgrade_id.clone(),
                    task_id: None,
                    from,
                    to,
                });
            }
            let committed_event = to_event(&event, seq, id, upgrade_id, None);
            super::outbox::enqueue(
                tx,
                &committed_event,
                Some(from),
                &u.cluster_name,
                Some(&u),
                None,
            )?;
            Ok(Committed {
                events: vec![committed_event],
                status_changes,
                ..Committed::default()
            })
        }
        Command::TaskAdd { upgrade_id, .. } | Command::TaskAddMany { upgrade_id, .. } => {
            let tasks = command.new_tasks();
            add_tasks(tx, upgrade_id, &tasks, now)
        }
        _ => {
            let upgrade_id = command.upgrade_id();
            let (task_id, _) = command.task_op().expect("remaining commands are task ops");
            let ukey = cached_upgrade_key(tx, keys, upgrade_id)?;
            task_command(tx, ukey, upgrade_id, task_id, command, now)
        }
    }
}

pub(super) fn to_event(
    e: &NewEvent<'_>,
    seq: i64,
    id: Uuid,
    upgrade_id: &str,
    task: Option<(&str, TaskType)>,
) -> ProgressEvent {
    ProgressEvent {
        seq: seq as u64,
        event_id: id.to_string(),
        kind: e.kind,
        upgrade_id: upgrade_id.to_owned(),
        timestamp: e.ts,
        task_id: task.map(|(t, _)| t.to_owned()),
        task_type: task.map(|(_, ty)| ty),
        status: e.status,
        message: e.message.map(str::to_owned),
        details: e.details.cloned().unwrap_or_default(),
        percentage: e.percentage,
    }
}

// ---------------------------------------------------------------------------------------------

impl ProgressStore for SqliteStore {
    fn execute(&self, commands: &[Command]) -> Result<Vec<Result<Committed>>> {
        let mut conn = self.writer();
        let mut keys = self.upgrade_keys.lock().unwrap_or_else(|p| p.into_inner());
        let result = execute_batch(&mut conn, &mut keys, commands);
        if result.is_err() {
            // Nothing was committed: forget keys this transaction may have looked up.
            keys.clear();
        }
        result
    }

    fn import(&self, upgrade: &Upgrade, tasks: &[Task], events: &[ProgressEvent]) -> Result<u64> {
        crate::store::domain::command::check_import(upgrade, tasks, events)?;
        self.write(|tx| import_upgrade(tx, upgrade, tasks, events))
    }

    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade> {
        Ok(load_upgrade(&self.reader(), upgrade_id)?.upgrade)
    }

    fn list_upgrades(&self) -> Result<Vec<Upgrade>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {UPGRADE_COLS} FROM upgrades ORDER BY ukey"
        ))?;
        let rows = stmt.query_map([], |r| upgrade_row(r).map(|u| u.upgrade))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn upgrades_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Upgrade>> {
        let conn = self.reader();
        let from = match after {
            Some(id) => upgrade_key(&conn, id)?,
            None => 0,
        };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {UPGRADE_COLS} FROM upgrades WHERE ukey > ?1 ORDER BY ukey LIMIT ?2"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![from, limit], |r| upgrade_row(r).map(|u| u.upgrade))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn tasks(&self, upgrade_id: &str) -> Result<Vec<Task>> {
        let conn = self.reader();
        let ukey = upgrade_key(&conn, upgrade_id)?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE ukey = ?1 ORDER BY tkey"
        ))?;
        let rows = stmt.query_map([ukey], |r| task_row(r, upgrade_id).map(|t| t.task))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn tasks_page(&self, upgrade_id: &str, after: Option<&str>, limit: usize) -> Result<Vec<Task>> {
        let conn = self.reader();
        let ukey = upgrade_key(&conn, upgrade_id)?;
        let from = match after {
            Some(id) => load_task(&conn, ukey, upgrade_id, id)?.tkey,
            None => 0,
        };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE ukey = ?1 AND tkey > ?2 ORDER BY tkey LIMIT ?3"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![ukey, from, limit], |r| {
            task_row(r, upgrade_id).map(|t| t.task)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn tasks_in_status(
        &self,
        upgrade_id: &str,
        status: ProgressStatus,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Task>> {
        let conn = self.reader();
        let ukey = upgrade_key(&conn, upgrade_id)?;
        let order = if newest_first { "DESC" } else { "ASC" };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks INDEXED BY tasks_by_status \
             WHERE ukey = ?1 AND status = ?2 ORDER BY tkey {order} LIMIT ?3"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![ukey, status_code(status), limit], |r| {
            task_row(r, upgrade_id).map(|t| t.task)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task> {
        let conn = self.reader();
        let ukey = upgrade_key(&conn, upgrade_id)?;
        Ok(load_task(&conn, ukey, upgrade_id, task_id)?.task)
    }

    fn recent_task_events(
        &self,
        upgrade_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<ProgressEvent>> {
        let conn = self.reader();
        let ukey = upgrade_key(&conn, upgrade_id)?;
        let row = load_task(&conn, ukey, upgrade_id, task_id)?;
        let mut out = Vec::with_capacity(limit.min(64));
        let mut next = Some(row.last_event_seq).filter(|s| *s > 0);
        // One primary-key read per event: the event and the link to the task's previous one.
        let sql = EVENT_SELECT.replacen(" FROM ", ", e.prev_task_seq FROM ", 1);
        let mut stmt = conn.prepare_cached(&format!("{sql} WHERE e.seq = ?1"))?;
        while let Some(seq) = next {
            if out.len() >= limit {
                break;
            }
            let (event, prev) =
                stmt.query_row([seq], |r| Ok((event_row(r)?, r.get::<_, Option<i64>>(11)?)))?;
            out.push(event);
            next = prev;
        }
        Ok(out)
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<ProgressEvent>> {
        let conn = self.reader();
        let since = i64::try_from(query.since).unwrap_or(i64::MAX);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        match &query.upgrade_id {
            Some(upgrade_id) => {
                let ukey = upgrade_key(&conn, upgrade_id)?;
                let mut stmt = conn.prepare_cached(&format!(
                    "{EVENT_SELECT} WHERE e.ukey = ?1 AND e.seq > ?2 ORDER BY e.seq LIMIT ?3"
                ))?;
                let rows = stmt.query_map(params![ukey, since, limit], event_row)?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!(
                    "{EVENT_SELECT} WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![since, limit], event_row)?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            }
        }
    }

    fn latest_events(&self, upgrade_id: &str, limit: usize) -> Result<Vec<ProgressEvent>> {
        let conn = self.reader();
        let ukey = upgrade_key(&conn, upgrade_id)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = conn.prepare_cached(&format!(
            "{EVENT_SELECT} WHERE e.ukey = ?1 ORDER BY e.seq DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![ukey, limit], event_row)?;
        let mut out: Vec<ProgressEvent> = rows.collect::<rusqlite::Result<_>>()?;
        out.reverse();
        Ok(out)
    }

    fn last_seq(&self) -> Result<u64> {
        let conn = self.reader();
        let seq: Option<i64> = conn
            .prepare_cached("SELECT max(seq) FROM events")?
            .query_row([], |r| r.get(0))?;
        Ok(seq.unwrap_or(0) as u64)
    }

    fn task_history(
        &self,
        cluster_name: &str,
        task_ids: &[&str],
    ) -> Result<Vec<crate::store::domain::history::TaskHistory>> {
        super::history::read(&self.reader(), cluster_name, task_ids)
    }
}

#[cfg(test)]
#[path = "structure_tests.rs"]
mod structure_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run(&|| {
            let sub = dir.path().join(Uuid::now_v7().to_string());
            Box::new(SqliteStore::open(&sub, &SqliteOptions::default()).unwrap())
        });
    }

    /// ARCHITECTURE "Performance": 1 KiB pages, and checkpoints on a background thread. The
    /// database file's header says 1,024; after a burst of commits (far below the writers'
    /// automatic checkpoint mark), the WAL's frames get copied back (`nBackfill` reaches
    /// `mxFrame` in the wal-index, read from the `-shm` file as https://www.sqlite.org/walformat.html
    /// lays it out) with no checkpoint asked for by this test or the writer.
    #[test]
    fn pages_are_1_kib_and_a_background_thread_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
        let run = |c: Command| store.execute(&[c]).unwrap().remove(0).unwrap();
        run(Command::UpgradeCreate {
            upgrade_id: "u".into(),
            plan_id: "p".into(),
            cluster_name: "c".into(),
            metadata: JsonMap::new(),
        });
        for i in 0..50 {
            run(Command::UpgradePhase {
                upgrade_id: "u".into(),
                phase: format!("phase-{i}"),
            });
        }
        let header = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        assert_eq!(u16::from_be_bytes([header[16], header[17]]), 1024);
        let autocheckpoint: i64 = store
            .writer()
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(autocheckpoint, WAL_CHECKPOINT_PAGES);
        let shm = dir.path().join(format!("{DB_FILE}-shm"));
        let frames = || {
            let b = std::fs::read(&shm).unwrap();
            let at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
            // WalIndexHdr.mxFrame at 16; WalCkptInfo.nBackfill at 96.
            (at(16), at(96))
        };
        let (written, _) = frames();
        assert!(
            written > 50 && (written as i64) < WAL_CHECKPOINT_PAGES,
            "{written} WAL frames"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (max, backfilled) = frames();
            if max > 0 && backfilled == max {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint: {backfilled} of {max} frames copied back after 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn durability_levels_set_sqlite_synchronous() {
        for (durability, expected) in [(Durability::ProcessCrash, 1), (Durability::PowerLoss, 2)] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(
                dir.path(),
                &SqliteOptions {
                    durability,
                    ..SqliteOptions::default()
                },
            )
            .unwrap();
            let sync: i64 = store
                .writer()
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap();
            assert_eq!(sync, expected, "{durability:?}");
            let mode: String = store
                .writer()
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        assert_eq!(
            "power_loss".parse::<Durability>().unwrap(),
            Durability::PowerLoss
        );
        assert!(
            "sometimes"
                .parse::<Durability>()
                .unwrap_err()
                .to_string()
                .contains("process_crash")
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap_err();
        assert!(err.to_string().contains("newer version"), "{err}");
    }
}
