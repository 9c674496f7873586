//! [`PostgresStore`]: progress on a shared PostgreSQL database. Current state lives in
//! `upgrades` and `tasks`, history in `events` keyed by the store-wide `seq`, like the SQLite
//! backend; the differences are how `seq` is assigned and how writers share rows.
//!
//! - Each command locks its upgrade's row first (`SELECT ... FOR UPDATE`), so commands on one
//!   upgrade run one at a time whatever replica sends them, and commands on different upgrades
//!   run in parallel.
//! - Events are staged while the transaction runs; its last statement takes the one-row
//!   counter (`UPDATE seq_counter SET seq = seq + n RETURNING seq`) and writes the staged events
//!   (`INSERT ... SELECT FROM UNNEST`) with their `seq`s (see `assign_with`; notifications,
//!   when there are any, in one more statement), then it commits.
//!   The counter's row lock is held only from there to `COMMIT`, and makes `seq` order commit
//!   order.
//! - A deadlock or serialization failure retries the whole transaction.
//! - A commit that appends events sends `NOTIFY eua_events` with its last `seq`, a wake-up
//!   for followers on other replicas (which still poll), while some replica's streams have
//!   clients (`stream_followers`, see `listen.rs`): a notification wakes every listening
//!   backend and replica, and its commits queue behind one lock, for nobody otherwise.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::{Client, GenericClient, Row};
use r2d2_postgres::r2d2;
use uuid::Uuid;

pub(crate) use super::connect::{Conn, Db, Manager, Tx};
pub use super::connect::{PostgresOptions, parse_url, redact};
use super::import::import_upgrade;
use super::tasks::Batch;
use crate::error::{Error, Result};
use crate::model::{
    EventKind, JsonMap, ProgressEvent, ProgressStatus, StatusChange, Task, TaskType, Upgrade,
};
use crate::store::domain::command::Command;
use crate::store::domain::machine;
pub(super) use crate::store::domain::tasks::{TaskRow, UpgradeDelta};
use crate::store::{Committed, EventQuery, ProgressStore};

/// The channel commits notify (payload: the last `seq` committed).
pub const EVENTS_CHANNEL: &str = "eua_events";

/// The PostgreSQL backend. Cheap to share behind an `Arc`; every replica opens its own.
pub struct PostgresStore {
    /// Dropped off any async runtime (see [`super::connect::Pool`]).
    pool: super::connect::Pool,
    url: String,
    /// This store's name in work leases (outbox deliveries): unique per open.
    instance: String,
    /// Where and how it connects (for connections outside the pool: `listen`).
    target: super::connect::Target,
    /// Takes of a connection that found none idle, and the time they waited (µs).
    waits: std::sync::atomic::AtomicU64,
    waited_us: std::sync::atomic::AtomicU64,
    /// How long claims on work last (see [`PostgresOptions::lease`]).
    lease: Duration,
    /// See [`PostgresOptions::copy_lock_timeout`].
    pub(super) copy_lock_timeout: Duration,
    /// Added to this replica's clock (µs; tests: a replica whose clock is wrong).
    skew_us: std::sync::atomic::AtomicI64,
    /// The database's clock minus this replica's, for retry due-times (`clock.rs`).
    clock_offset: super::clock::ClockOffset,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .finish()
    }
}

/// Figures of the connection pool (for `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open.
    pub connections: u32,
    /// Of which idle.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
    /// Times a connection was taken when none was idle (it waited, or one was opened).
    pub waits: u64,
    /// The time those takes waited, in total.
    pub waited: Duration,
}

impl PostgresStore {
    /// Connects to the database at `url` and brings its schema up to date.
    pub fn open(url: &str, options: &PostgresOptions) -> Result<PostgresStore> {
        Self::open_with_limits(url, options, &SessionLimits::default())
    }

    /// [`open`](Self::open) with other session limits (tests).
    pub(crate) fn open_with_limits(
        url: &str,
        options: &PostgresOptions,
        limits: &SessionLimits,
    ) -> Result<PostgresStore> {
        let super::connect::Target { mut config, tls } = super::connect::parse_target(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        limits.apply(&mut config);
        let shown = redact(url);
        let target = super::connect::Target { config, tls };
        let manager = Manager::new(target.config.clone(), target.tls.clone());
        let last_error = std::sync::Arc::clone(&manager.last_error);
        let pool = super::connect::Pool::new(
            r2d2::Pool::builder()
                .max_size(options.pool_size.max(1))
                .min_idle(Some(1))
                .connection_timeout(options.connect_timeout)
                .build_unchecked(manager),
        );
        // Wait for the first connection here, so a failure says why (the pool's own error
        // keeps only the outermost message).
        pool.get().map_err(|e| {
            let cause = last_error
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .unwrap_or_else(|| e.to_string());
            let hint = super::connect::connect_hint(&cause);
            Error::backend(format!("cannot connect to {shown}: {cause}{hint}"), e)
        })?;
        let store = PostgresStore {
            pool,
            url: shown,
            instance: Uuid::now_v7().to_string(),
            target,
            waits: Default::default(),
            waited_us: Default::default(),
            lease: options.lease.max(Duration::from_millis(100)),
            copy_lock_timeout: options.copy_lock_timeout,
            skew_us: std::sync::atomic::AtomicI64::new(0),
            clock_offset: Default::default(),
        };
        store.with_conn(|conn| super::schema::migrate(&mut conn.client))?;
        Ok(store)
    }

    /// How long claims on work last.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// This replica's clock (for what it stamps; never for judging a lease or a retry time,
    /// which the database's clock does: see `lease.rs`, `clock.rs`).
    pub(crate) fn clock(&self) -> DateTime<Utc> {
        let skew = self.skew_us.load(std::sync::atomic::Ordering::Relaxed);
        Utc::now() + chrono::Duration::microseconds(skew)
    }

    /// The offset of the database's clock from this replica's (`clock.rs`).
    pub(super) fn clock_offset(&self) -> &super::clock::ClockOffset {
        &self.clock_offset
    }

    /// The same store with its clock `skew` off (tests).
    #[cfg(test)]
    pub(crate) fn with_clock_skew(self, skew: chrono::Duration) -> Self {
        self.set_clock_skew(skew);
        self
    }

    /// Steps this store's clock to `skew` off (tests: a replica whose clock is stepped).
    #[cfg(test)]
    pub(crate) fn set_clock_skew(&self, skew: chrono::Duration) {
        let us = skew.num_microseconds().unwrap_or(0);
        self.skew_us.store(us, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where and how it connects.
    pub(crate) fn target(&self) -> &super::connect::Target {
        &self.target
    }

    /// This store's name in work leases.
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// The database URL, password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Pool figures.
    pub fn pool_stats(&self) -> PoolStats {
        let s = self.pool.state();
        PoolStats {
            connections: s.connections,
            idle: s.idle_connections,
            max: self.pool.max_size(),
            waits: self.waits.load(std::sync::atomic::Ordering::Relaxed),
            waited: Duration::from_micros(
                self.waited_us.load(std::sync::atomic::Ordering::Relaxed),
            ),
        }
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64> {
        self.with_conn(|c| super::schema::version(&mut c.client))
    }

    /// Checks that the database answers (`/healthz`).
    pub fn ping(&self) -> Result<()> {
        self.with_conn(|c| {
            c.client.simple_query("SELECT 1")?;
            Ok(())
        })
    }

    /// Number of rows in each table, by name (`store info`): the tables `store copy` copies,
    /// the same list on both backends.
    pub fn counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|db| {
            let mut out = Vec::new();
            for table in crate::store::copy::table_names() {
                let n: i64 = db
                    .one(&format!("SELECT count(*) FROM {table}"), &[])?
                    .get(0);
                out.push((table.to_owned(), n as u64));
            }
            Ok(out)
        })
    }

    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut conn = match self.pool.try_get() {
            Some(conn) => conn,
            None => {
                let began = std::time::Instant::now();
                let conn = self.pool.get().map_err(|e| {
                    Error::backend(format!("no database connection to {}", self.url), e)
                });
                use std::sync::atomic::Ordering::Relaxed;
                self.waits.fetch_add(1, Relaxed);
                self.waited_us
                    .fetch_add(began.elapsed().as_micros() as u64, Relaxed);
                conn?
            }
        };
        f(&mut conn)
    }

    /// Runs `f` outside a transaction (each statement sees the latest commits).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&mut Db<'_, Client>) -> Result<T>) -> Result<T> {
        self.with_conn(|conn| {
            let Conn { client, stmts } = conn;
            f(&mut Db { c: client, stmts })
        })
    }

    /// Runs `f` in a transaction, again from the start (at most a few times) when PostgreSQL
    /// aborts it for a deadlock or a serialization failure.
    pub(crate) fn write<T>(&self, mut f: impl FnMut(&mut Tx<'_, '_>) -> Result<T>) -> Result<T> {
        self.transaction(false, |tx| f(tx).map(|t| (t, true)))
    }

    /// [`write`](Self::write) where `f` also says whether to commit (`false`: roll back and
    /// still return its value); with `generic`, the transaction's statements run with generic
    /// plans (see `ProgressStore::execute`).
    fn transaction<T>(
        &self,
        generic: bool,
        mut f: impl FnMut(&mut Tx<'_, '_>) -> Result<(T, bool)>,
    ) -> Result<T> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.with_conn(|conn| {
                let Conn { client, stmts } = conn;
                let mut tx = client.transaction()?;
                if generic {
                    tx.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")?;
                }
                let (out, commit) = f(&mut Db { c: &mut tx, stmts })?;
                if commit {
                    tx.commit()?;
                } else {
                    tx.rollback()?;
                }
                Ok(out)
            });
            match result {
                Err(e) if attempt < 5 && retryable(&e) => {
                    std::thread::sleep(Duration::from_millis(2 * attempt));
                    continue;
                }
                other => return other,
            }
        }
    }
}

/// Limits the server enforces on each of our sessions, so that a replica that freezes (or
/// loses its network) inside a transaction cannot hold an upgrade's row or the `seq` counter,
/// and so every other replica's commits, for longer than `idle_in_transaction`: the server ends
/// such a session and rolls its transaction back. `statement` bounds any one statement
/// (a lock wait included). Options of the database URL's `options` naming the same settings
/// win.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub(crate) idle_in_transaction: Duration,
    pub(crate) statement: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            idle_in_transaction: Duration::from_secs(15),
            statement: Duration::from_secs(60),
        }
    }
}

impl SessionLimits {
    fn apply(&self, config: &mut postgres::Config) {
        let mut options = config.get_options().unwrap_or_default().to_owned();
        for (name, value) in [
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction,
            ),
            ("statement_timeout", self.statement),
        ] {
            if !options.contains(name) {
                options.push_str(&format!(" -c {name}={}", value.as_millis().max(1)));
            }
        }
        config.options(options.trim());
    }
}

/// Whether `e` is a transient conflict worth running the transaction again for.
fn retryable(e: &Error) -> bool {
    let Error::Backend {
        source: Some(source),
        ..
    } = e
    else {
        return false;
    };
    source
        .downcast_ref::<postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| {
            *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                || *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
        })
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

pub(super) fn status_from(code: i64) -> Result<ProgressStatus> {
    ProgressStatus::ALL
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad_column(format!("unknown status code {code}")))
}

pub(super) fn type_code(t: TaskType) -> i64 {
    TaskType::ALL.iter().position(|x| *x == t).unwrap_or(0) as i64
}

fn type_from(code: i64) -> Result<TaskType> {
    TaskType::ALL
        .get(code as usize)
        .copied()
        .ok_or_else(|| bad_column(format!("unknown task type code {code}")))
}

pub(super) fn bad_column(msg: String) -> Error {
    Error::Backend {
        message: format!("corrupt row in the database: {msg}"),
        source: None,
    }
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

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

const UPGRADE_COLS: &str = "ukey, upgrade_id, plan_id, cluster_name, status, current_phase, \
    created_at, started_at, completed_at, error_message, metadata, top_weight, top_sum, \
    c0, c1, c2, c3, c4, c5, last_seq";

pub(super) struct UpgradeRow {
    pub(super) ukey: i64,
    pub(super) upgrade: Upgrade,
}

fn upgrade_row(r: &Row) -> Result<UpgradeRow> {
    let top_weight: f64 = r.get(11);
    let top_sum: f64 = r.get(12);
    let mut counts = [0u64; 6];
    for (i, c) in counts.iter_mut().enumerate() {
        *c = r.get::<_, i64>(13 + i) as u64;
    }
    Ok(UpgradeRow {
        ukey: r.get(0),
        upgrade: Upgrade {
            upgrade_id: r.get(1),
            plan_id: r.get(2),
            cluster_name: r.get(3),
            status: status_from(r.get(4))?,
            current_phase: r.get(5),
            created_at: from_micros(r.get(6)),
            started_at: opt_time(r.get(7)),
            completed_at: opt_time(r.get(8)),
            error_message: r.get(9),
            metadata: json_map(r.get(10)),
            overall_percentage: if top_weight > 0.0 {
                machine::clamp_pct(top_sum / top_weight)
            } else {
                0.0
            },
            task_counts: counts,
            last_seq: r.get::<_, i64>(19) as u64,
        },
    })
}

/// Number of columns in [`TASK_COLS`].
pub(super) const TASK_COL_COUNT: usize = 30;

pub(super) const TASK_COLS: &str = "tkey, parent_tkey, depth, child_weight, child_sum, \
    task_id, name, task_type, parent_task_id, status, percentage, current_step, total_steps, \
    completed_steps, weight, children, error_message, retry_count, last_message, created_at, \
    started_at, completed_at, duration, metadata, k0, k1, k2, k3, k4, k5";

pub(super) fn task_row(r: &Row, upgrade_id: &str) -> Result<TaskRow> {
    let mut child_counts = [0u32; 6];
    for (i, c) in child_counts.iter_mut().enumerate() {
        *c = u32_of(r.get(24 + i));
    }
    Ok(TaskRow {
        child_counts,
        tkey: r.get(0),
        parent_tkey: r.get(1),
        depth: u32_of(r.get(2)),
        child_weight: r.get(3),
        child_sum: r.get(4),
        last_event_seq: 0,
        task: Task {
            upgrade_id: upgrade_id.to_owned(),
            task_id: r.get(5),
            name: r.get(6),
            task_type: type_from(r.get(7))?,
            parent_task_id: r.get(8),
            status: status_from(r.get(9))?,
            percentage: r.get(10),
            current_step: r.get(11),
            total_steps: r.get::<_, Option<i64>>(12).map(u32_of),
            completed_steps: u32_of(r.get(13)),
            weight: r.get(14),
            children: u32_of(r.get(15)),
            error_message: r.get(16),
            retry_count: u32_of(r.get(17)),
            last_message: r.get(18),
            created_at: from_micros(r.get(19)),
            started_at: opt_time(r.get(20)),
            completed_at: opt_time(r.get(21)),
            duration: r.get(22),
            metadata: json_map(r.get(23)),
        },
    })
}

const EVENT_SELECT: &str = "SELECT e.seq, e.event_id, u.upgrade_id, e.ts, t.task_id, t.task_type, \
    e.kind, e.status, e.message, e.details, e.percentage \
    FROM events e JOIN upgrades u ON u.ukey = e.ukey LEFT JOIN tasks t ON t.tkey = e.tkey";

fn event_row(r: &Row) -> Result<ProgressEvent> {
    let id: Uuid = r.get(1);
    let kind: i64 = r.get(6);
    Ok(ProgressEvent {
        seq: r.get::<_, i64>(0) as u64,
        event_id: id.to_string(),
        upgrade_id: r.get(2),
        timestamp: from_micros(r.get(3)),
        task_id: r.get(4),
        task_type: r.get::<_, Option<i64>>(5).map(type_from).transpose()?,
        kind: EventKind::from_code(kind)
            .ok_or_else(|| bad_column(format!("unknown event kind {kind}")))?,
        status: status_from(r.get(7))?,
        message: r.get(8),
        details: json_map(r.get(9)),
        percentage: r.get(10),
    })
}

fn events_of(rows: Vec<Row>) -> Result<Vec<ProgressEvent>> {
    rows.iter().map(event_row).collect()
}

fn upgrade_not_found(upgrade_id: &str) -> Error {
    Error::not_found(format!("upgrade {upgrade_id:?}"))
}

pub(super) fn task_not_found(upgrade_id: &str, task_id: &str) -> Error {
    Error::not_found(format!("task {task_id:?} of upgrade {upgrade_id:?}"))
}

// ---------------------------------------------------------------------------------------------
// Writes

/// Statements to run later as one, each a data-modifying `WITH` part of the statement that
/// takes the `seq` counter (see [`assign`]): the end of a transaction is one round trip, not
/// one per table, while it holds its upgrades' rows.
#[derive(Default)]
pub(super) struct Writes {
    parts: Vec<String>,
    params: Vec<Box<dyn postgres::types::ToSql + Sync>>,
}

impl Writes {
    /// Adds `sql` (parameters `$1`.. are `params`).
    pub(super) fn add(&mut self, sql: &str, params: Vec<Box<dyn postgres::types::ToSql + Sync>>) {
        self.parts.push(renumber(sql, self.params.len()));
        self.params.extend(params);
    }

    /// The parts as the start of a `WITH` clause (each part `wI AS (...)`, then a comma, ready
    /// for more parts), and their parameters.
    fn before_counter(&self) -> (String, Vec<&(dyn postgres::types::ToSql + Sync)>) {
        let mut sql = String::from("WITH");
        for (i, part) in self.parts.iter().enumerate() {
            sql.push_str(&format!(" w{i} AS ({part} RETURNING 1),"));
        }
        let params = self.params.iter().map(|p| p.as_ref() as _).collect();
        (sql, params)
    }

    /// The condition of the counter's `UPDATE` in a statement that starts with
    /// [`before_counter`](Self::before_counter): it reads every part's `RETURNING`, so the
    /// parts run to their end before the counter row is locked (unreferenced parts would run
    /// after the main statement, with the counter held, every replica waiting for it, while
    /// they wait for rows).
    fn counter_condition(&self) -> String {
        if self.parts.is_empty() {
            return "true".into();
        }
        let reads: Vec<String> = (0..self.parts.len())
            .map(|i| format!("(SELECT count(*) FROM w{i})"))
            .collect();
        format!("{} >= 0", reads.join(" + "))
    }

    /// Runs the parts now: one statement (nothing if there are none).
    pub(super) fn run(self, tx: &mut Tx<'_, '_>) -> Result<()> {
        let Some((last, rest)) = self.parts.split_last() else {
            return Ok(());
        };
        // The last part is the main statement (its parameters already numbered after the
        // others').
        let mut sql = String::new();
        for (i, part) in rest.iter().enumerate() {
            sql.push_str(if i == 0 { "WITH " } else { ", " });
            sql.push_str(&format!("w{i} AS ({part})"));
        }
        sql.push(' ');
        sql.push_str(last);
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
            self.params.iter().map(|p| p.as_ref()).collect();
        tx.exec(&sql, &params)?;
        Ok(())
    }
}

/// `sql` with each parameter `$n` renumbered `$(n + by)`.
fn renumber(sql: &str, by: usize) -> String {
    if by == 0 {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut n = String::new();
        while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
            n.push(d);
            chars.next();
        }
        match n.parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&n),
        }
    }
    out
}

/// Adds to `w` the write of what commands changed on upgrade rows' counters (per upgrade
/// key): one statement (nothing if no counter changed).
pub(super) fn deltas_into(w: &mut Writes, deltas: &HashMap<i64, UpgradeDelta>) {
    let deltas: Vec<(i64, &UpgradeDelta)> = deltas
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(k, d)| (*k, d))
        .collect();
    if deltas.is_empty() {
        return;
    }
    let keys: Vec<i64> = deltas.iter().map(|(k, _)| *k).collect();
    let count = |i: usize| -> Vec<i64> { deltas.iter().map(|(_, d)| d.counts[i]).collect() };
    let (c0, c1, c2, c3, c4, c5) = (count(0), count(1), count(2), count(3), count(4), count(5));
    let weights: Vec<f64> = deltas.iter().map(|(_, d)| d.top_weight).collect();
    let sums: Vec<f64> = deltas.iter().map(|(_, d)| d.top_sum).collect();
    w.add(
        "UPDATE upgrades u SET c0 = u.c0 + x.c0, c1 = u.c1 + x.c1, c2 = u.c2 + x.c2, \
         c3 = u.c3 + x.c3, c4 = u.c4 + x.c4, c5 = u.c5 + x.c5, \
         top_weight = u.top_weight + x.w, top_sum = u.top_sum + x.s \
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
         $6::bigint[], $7::bigint[], $8::float8[], $9::float8[]) \
         AS x(k, c0, c1, c2, c3, c4, c5, w, s) WHERE u.ukey = x.k",
        vec![
            Box::new(keys),
            Box::new(c0),
            Box::new(c1),
            Box::new(c2),
            Box::new(c3),
            Box::new(c4),
            Box::new(c5),
            Box::new(weights),
            Box::new(sums),
        ],
    );
}

/// A notification to write once its event has a `seq`.
pub(super) struct Note {
    /// Index of its event in the command's events.
    pub(super) event: usize,
    pub(super) from: Option<ProgressStatus>,
    pub(super) cluster: String,
    pub(super) upgrade: Option<Upgrade>,
    pub(super) task: Option<Task>,
}

/// What one command wrote, its events still without `seq`: `committed.events[i].seq` and the
/// status changes' `seq` hold the index of the event in the command (from 1) until
/// [`assign`] numbers them.
#[derive(Default)]
pub(super) struct Staged {
    pub(super) committed: Committed,
    /// Row keys of each event (upgrade, task).
    pub(super) keys: Vec<(i64, Option<i64>)>,
    pub(super) notes: Vec<Note>,
    /// Duration samples of the completions (and imported tasks) to add to the history.
    pub(super) samples: Vec<super::history::Sample>,
}

impl Staged {
    /// Stages `event` (its `seq` is ignored); returns its index.
    pub(super) fn push(&mut self, ukey: i64, tkey: Option<i64>, mut event: ProgressEvent) -> u64 {
        self.keys.push((ukey, tkey));
        let local = self.keys.len() as u64;
        event.seq = local;
        self.committed.events.push(event);
        local
    }

    pub(super) fn status_change(
        &mut self,
        local: u64,
        upgrade_id: &str,
        task_id: Option<&str>,
        from: ProgressStatus,
        to: ProgressStatus,
    ) {
        self.committed.status_changes.push(StatusChange {
            seq: local,
            upgrade_id: upgrade_id.to_owned(),
            task_id: task_id.map(str::to_owned),
            from,
            to,
        });
    }
}

/// A new event (seq assigned later): every field of the event but its id and `seq`.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_event(
    upgrade_id: &str,
    task: Option<(&str, TaskType)>,
    kind: EventKind,
    status: ProgressStatus,
    ts: DateTime<Utc>,
    message: Option<&str>,
    details: Option<&JsonMap>,
    percentage: f64,
) -> ProgressEvent {
    ProgressEvent {
        seq: 0,
        event_id: Uuid::now_v7().to_string(),
        kind,
        upgrade_id: upgrade_id.to_owned(),
        timestamp: ts,
        task_id: task.map(|(t, _)| t.to_owned()),
        task_type: task.map(|(_, ty)| ty),
        status,
        message: message.map(str::to_owned),
        details: details.cloned().unwrap_or_default(),
        percentage,
    }
}

/// The notifications of a transaction, column by column (event id, seq, upgrade, detail type,
/// time, detail), for one `INSERT ... SELECT FROM UNNEST`.
#[derive(Default)]
struct NoteColumns(
    Vec<String>,
    Vec<i64>,
    Vec<String>,
    Vec<String>,
    Vec<i64>,
    Vec<String>,
);

/// The last statements of a writing transaction: takes `seq`s for every staged event from the
/// counter, writes the events, their notifications and each upgrade's `last_seq`, and notifies
/// followers. Numbers the staged events in place; returns the last `seq` (0: nothing staged).
pub(super) fn assign(tx: &mut Tx<'_, '_>, staged: &mut [&mut Staged]) -> Result<u64> {
    assign_with(tx, Writes::default(), &HashMap::new(), staged)
}

/// [`assign`], running `pending` (the transaction's last row writes) before the counter, and
/// adding `deltas` (what commands owe the upgrade rows' counters, per upgrade key) with each
/// upgrade's `last_seq`, all in the statement that takes the counter: one round trip from the
/// end of the commands to `COMMIT` (a second one only for notifications, whose detail holds
/// the `seq`). Every upgrade in `deltas` or `staged` must be locked by this transaction already
/// (or created by it): its row is written after the counter's lock is taken, where waiting for
/// a row lock would hold up every replica's commits.
pub(super) fn assign_with(
    tx: &mut Tx<'_, '_>,
    mut pending: Writes,
    deltas: &HashMap<i64, UpgradeDelta>,
    staged: &mut [&mut Staged],
) -> Result<u64> {
    let samples: Vec<super::history::Sample> = staged
        .iter_mut()
        .flat_map(|s| std::mem::take(&mut s.samples))
        .collect();
    super::history::record_into(&mut pending, &samples);
    let n: i64 = staged.iter().map(|s| s.keys.len() as i64).sum();
    if n == 0 {
        deltas_into(&mut pending, deltas);
        pending.run(tx)?;
        return Ok(0);
    }
    // Each event's place in the transaction (from 1): its `seq` is the counter's value before
    // this transaction plus that.
    let mut locals = Vec::with_capacity(n as usize);
    let mut ids = Vec::with_capacity(n as usize);
    let mut ukeys = Vec::with_capacity(n as usize);
    let mut tkeys: Vec<Option<i64>> = Vec::with_capacity(n as usize);
    let mut kinds = Vec::with_capacity(n as usize);
    let mut statuses = Vec::with_capacity(n as usize);
    let mut tss = Vec::with_capacity(n as usize);
    let mut messages: Vec<Option<String>> = Vec::with_capacity(n as usize);
    let mut details: Vec<Option<String>> = Vec::with_capacity(n as usize);
    let mut pcts = Vec::with_capacity(n as usize);
    // Per upgrade: what it is owed and the place of its last event.
    let mut upgrades: HashMap<i64, (UpgradeDelta, i64)> = deltas
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(k, d)| (*k, (*d, 0)))
        .collect();
    let mut local = 0i64;
    for s in staged.iter() {
        for (e, (ukey, tkey)) in s.committed.events.iter().zip(&s.keys) {
            local += 1;
            locals.push(local);
            ids.push(Uuid::parse_str(&e.event_id).unwrap_or_else(|_| Uuid::now_v7()));
            ukeys.push(*ukey);
            tkeys.push(*tkey);
            kinds.push(e.kind.code());
            statuses.push(status_code(e.status));
            tss.push(micros(e.timestamp));
            messages.push(e.message.clone());
            details.push(json_text(&e.details));
            pcts.push(e.percentage);
            upgrades.entry(*ukey).or_default().1 = local;
        }
    }
    let mut u = UpgradeColumns::default();
    for (k, (d, l)) in &upgrades {
        u.key.push(*k);
        for (c, v) in u.counts.iter_mut().zip(d.counts) {
            c.push(v);
        }
        u.weight.push(d.top_weight);
        u.sum.push(d.top_sum);
        u.last.push(*l);
    }
    let [c0, c1, c2, c3, c4, c5] = &u.counts;
    let (mut sql, mut params) = pending.before_counter();
    let at = params.len();
    sql.push_str(&format!(
        " c AS (UPDATE seq_counter SET seq = seq + ${n} WHERE {cond} RETURNING seq - ${n} AS base, seq), \
         e AS (INSERT INTO events (seq, event_id, ukey, tkey, kind, status, ts, message, details, \
         percentage) SELECT c.base + x.o, x.id, x.u, x.t, x.k, x.st, x.ts, x.m, x.d, x.p FROM c, \
         UNNEST(${p1}::bigint[], ${p2}::uuid[], ${p3}::bigint[], ${p4}::bigint[], ${p5}::bigint[], \
         ${p6}::bigint[], ${p7}::bigint[], ${p8}::text[], ${p9}::text[], ${p10}::float8[]) \
         AS x(o, id, u, t, k, st, ts, m, d, p)), \
         l AS (UPDATE upgrades u SET c0 = u.c0 + x.c0, c1 = u.c1 + x.c1, c2 = u.c2 + x.c2, \
         c3 = u.c3 + x.c3, c4 = u.c4 + x.c4, c5 = u.c5 + x.c5, \
         top_weight = u.top_weight + x.w, top_sum = u.top_sum + x.s, \
         last_seq = CASE WHEN x.l > 0 THEN c.base + x.l ELSE u.last_seq END \
         FROM c, UNNEST(${p11}::bigint[], ${p12}::bigint[], ${p13}::bigint[], ${p14}::bigint[], \
         ${p15}::bigint[], ${p16}::bigint[], ${p17}::bigint[], ${p18}::float8[], ${p19}::float8[], \
         ${p20}::bigint[]) AS x(k, c0, c1, c2, c3, c4, c5, w, s, l) WHERE u.ukey = x.k) \
         SELECT c.seq, CASE WHEN EXISTS (SELECT 1 FROM stream_followers WHERE until > {now}) \
         THEN pg_notify(${p21}, c.seq::text) END FROM c",
        now = super::lease::DB_NOW,
        n = at + 1,
        cond = pending.counter_condition(),
        p1 = at + 2,
        p2 = at + 3,
        p3 = at + 4,
        p4 = at + 5,
        p5 = at + 6,
        p6 = at + 7,
        p7 = at + 8,
        p8 = at + 9,
        p9 = at + 10,
        p10 = at + 11,
        p11 = at + 12,
        p12 = at + 13,
        p13 = at + 14,
        p14 = at + 15,
        p15 = at + 16,
        p16 = at + 17,
        p17 = at + 18,
        p18 = at + 19,
        p19 = at + 20,
        p20 = at + 21,
        p21 = at + 22,
    ));
    params.extend([
        &n as &(dyn postgres::types::ToSql + Sync),
        &locals,
        &ids,
        &ukeys,
        &tkeys,
        &kinds,
        &statuses,
        &tss,
        &messages,
        &details,
        &pcts,
        &u.key,
        c0,
        c1,
        c2,
        c3,
        c4,
        c5,
        &u.weight,
        &u.sum,
        &u.last,
        &EVENTS_CHANNEL,
    ]);
    let last: i64 = tx.one(&sql, &params)?.get(0);
    let mut next = last - n;
    let mut notes = NoteColumns::default();
    for s in staged.iter_mut() {
        let base = next;
        for e in s.committed.events.iter_mut() {
            next += 1;
            e.seq = next as u64;
        }
        for c in &mut s.committed.status_changes {
            c.seq += base as u64;
        }
        for note in &s.notes {
            let event = &s.committed.events[note.event];
            if let Some((kind, d)) = crate::store::notification::detail(
                event,
                note.from,
                &note.cluster,
                note.upgrade.as_ref(),
                note.task.as_ref(),
            ) {
                notes.0.push(event.event_id.clone());
                notes.1.push(event.seq as i64);
                notes.2.push(event.upgrade_id.clone());
                notes.3.push(kind.to_owned());
                notes.4.push(micros(event.timestamp));
                notes.5.push(serde_json::to_string(&d).unwrap_or_default());
            }
        }
    }
    if !notes.0.is_empty() {
        tx.exec(
            "INSERT INTO notifications (event_id, seq, upgrade_id, detail_type, time, detail) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], \
             $5::bigint[], $6::text[])",
            &[&notes.0, &notes.1, &notes.2, &notes.3, &notes.4, &notes.5],
        )?;
    }
    Ok(last as u64)
}

/// The upgrade rows' part of [`assign_with`]'s statement, column by column.
#[derive(Default)]
struct UpgradeColumns {
    key: Vec<i64>,
    counts: [Vec<i64>; 6],
    weight: Vec<f64>,
    sum: Vec<f64>,
    last: Vec<i64>,
}

fn load_upgrade(
    db: &mut Db<'_, impl GenericClient>,
    upgrade_id: &str,
    lock: bool,
) -> Result<UpgradeRow> {
    let sql = if lock {
        "SELECT ukey, upgrade_id, plan_id, cluster_name, status, current_phase, created_at, \
         started_at, completed_at, error_message, metadata, top_weight, top_sum, c0, c1, c2, c3, \
         c4, c5, last_seq FROM upgrades WHERE upgrade_id = $1 FOR UPDATE"
    } else {
        "SELECT ukey, upgrade_id, plan_id, cluster_name, status, current_phase, created_at, \
         started_at, completed_at, error_message, metadata, top_weight, top_sum, c0, c1, c2, c3, \
         c4, c5, last_seq FROM upgrades WHERE upgrade_id = $1"
    };
    let row = db
        .opt(sql, &[&upgrade_id])?
        .ok_or_else(|| upgrade_not_found(upgrade_id))?;
    upgrade_row(&row)
}

pub(super) fn upgrade_key(db: &mut Db<'_, impl GenericClient>, upgrade_id: &str) -> Result<i64> {
    Ok(db
        .opt(
            "SELECT ukey FROM upgrades WHERE upgrade_id = $1",
            &[&upgrade_id],
        )?
        .ok_or_else(|| upgrade_not_found(upgrade_id))?
        .get(0))
}

/// Locks the upgrade's row for the rest of the transaction (commands on one upgrade run one at
/// a time); returns its key.
pub(super) fn lock_upgrade(tx: &mut Tx<'_, '_>, upgrade_id: &str) -> Result<i64> {
    Ok(tx
        .opt(
            "SELECT ukey FROM upgrades WHERE upgrade_id = $1 FOR UPDATE",
            &[&upgrade_id],
        )?
        .ok_or_else(|| upgrade_not_found(upgrade_id))?
        .get(0))
}

pub(super) fn load_task(
    db: &mut Db<'_, impl GenericClient>,
    ukey: i64,
    upgrade_id: &str,
    task_id: &str,
) -> Result<TaskRow> {
    let row = db
        .opt(
            &format!("SELECT {TASK_COLS} FROM tasks WHERE ukey = $1 AND task_id = $2"),
            &[&ukey, &task_id],
        )?
        .ok_or_else(|| task_not_found(upgrade_id, task_id))?;
    task_row(&row, upgrade_id)
}

/// Adds to `w` the write of `rows` back (every column a command may change): one statement
/// (nothing without rows).
pub(super) fn save_tasks_into<'r>(w: &mut Writes, rows: impl Iterator<Item = &'r TaskRow>) {
    let mut c = TaskColumns::default();
    for row in rows {
        let t = &row.task;
        c.tkey.push(row.tkey);
        c.status.push(status_code(t.status));
        c.percentage.push(t.percentage);
        c.current_step.push(t.current_step.clone());
        c.completed_steps.push(i64::from(t.completed_steps));
        c.error_message.push(t.error_message.clone());
        c.retry_count.push(i64::from(t.retry_count));
        c.last_message.push(t.last_message.clone());
        c.started_at.push(t.started_at.map(micros));
        c.completed_at.push(t.completed_at.map(micros));
        c.duration.push(t.duration);
        c.children.push(i64::from(t.children));
        c.child_weight.push(row.child_weight);
        c.child_sum.push(row.child_sum);
        for (k, n) in c.k.iter_mut().zip(row.child_counts) {
            k.push(i64::from(n));
        }
    }
    if c.tkey.is_empty() {
        return;
    }
    let [k0, k1, k2, k3, k4, k5] = c.k;
    w.add(
        "UPDATE tasks t SET status = x.status, percentage = x.percentage, \
         current_step = x.current_step, completed_steps = x.completed_steps, \
         error_message = x.error_message, retry_count = x.retry_count, \
         last_message = x.last_message, started_at = x.started_at, \
         completed_at = x.completed_at, duration = x.duration, children = x.children, \
         child_weight = x.child_weight, child_sum = x.child_sum, k0 = x.k0, k1 = x.k1, \
         k2 = x.k2, k3 = x.k3, k4 = x.k4, k5 = x.k5 \
         FROM UNNEST($1::bigint[], $2::bigint[], $3::float8[], $4::text[], $5::bigint[], \
         $6::text[], $7::bigint[], $8::text[], $9::bigint[], $10::bigint[], $11::float8[], \
         $12::bigint[], $13::float8[], $14::float8[], $15::bigint[], $16::bigint[], \
         $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[]) \
         AS x(tkey, status, percentage, current_step, completed_steps, error_message, \
         retry_count, last_message, started_at, completed_at, duration, children, \
         child_weight, child_sum, k0, k1, k2, k3, k4, k5) WHERE t.tkey = x.tkey",
        vec![
            Box::new(c.tkey),
            Box::new(c.status),
            Box::new(c.percentage),
            Box::new(c.current_step),
            Box::new(c.completed_steps),
            Box::new(c.error_message),
            Box::new(c.retry_count),
            Box::new(c.last_message),
            Box::new(c.started_at),
            Box::new(c.completed_at),
            Box::new(c.duration),
            Box::new(c.children),
            Box::new(c.child_weight),
            Box::new(c.child_sum),
            Box::new(k0),
            Box::new(k1),
            Box::new(k2),
            Box::new(k3),
            Box::new(k4),
            Box::new(k5),
        ],
    );
}

/// The columns [`save_tasks_into`] writes, one array each.
#[derive(Default)]
struct TaskColumns {
    tkey: Vec<i64>,
    status: Vec<i64>,
    percentage: Vec<f64>,
    current_step: Vec<Option<String>>,
    completed_steps: Vec<i64>,
    error_message: Vec<Option<String>>,
    retry_count: Vec<i64>,
    last_message: Vec<Option<String>>,
    started_at: Vec<Option<i64>>,
    completed_at: Vec<Option<i64>>,
    duration: Vec<Option<f64>>,
    children: Vec<i64>,
    child_weight: Vec<f64>,
    child_sum: Vec<f64>,
    k: [Vec<i64>; 6],
}

/// Executes `commands` in one transaction through one row cache (see `tasks.rs`); says
/// whether there is anything to commit.
fn execute_batch(
    tx: &mut Tx<'_, '_>,
    commands: &[Command],
) -> Result<(Vec<Result<Committed>>, bool)> {
    let now = crate::model::now();
    let mut batch = Batch::default();
    // Before any row lock (the lock order every transaction keeps): upgrade keys commit in
    // key order, for clients paging the upgrade list (`order.rs`).
    if commands
        .iter()
        .any(|c| matches!(c, Command::UpgradeCreate { .. }))
    {
        super::order::lock_upgrade_keys(tx)?;
    }
    batch.prepare(tx, commands)?;
    let mut results: Vec<Result<Staged>> = Vec::with_capacity(commands.len());
    // One command needs no savepoint: a failure rolls the transaction back.
    let savepoints = commands.len() > 1;
    for command in commands {
        match execute_one(tx, &mut batch, command, now, savepoints) {
            Ok(s) => results.push(Ok(s)),
            Err(e @ Error::Backend { .. }) => return Err(e),
            Err(e) => results.push(Err(e)),
        }
    }
    let mut staged: Vec<&mut Staged> = results.iter_mut().filter_map(|r| r.as_mut().ok()).collect();
    let commit = !staged.is_empty();
    if commit {
        // The batch's row writes go with the counter's statement: one round trip.
        let (pending, deltas) = batch.last_writes();
        debug_assert!(
            deltas.keys().all(|k| batch.holds(*k)),
            "upgrade counters owed to an upgrade the batch has not locked"
        );
        assign_with(tx, pending, &deltas, &mut staged)?;
    }
    let results = results
        .into_iter()
        .map(|r| r.map(|s| s.committed))
        .collect();
    Ok((results, commit))
}

fn execute_one(
    tx: &mut Tx<'_, '_>,
    batch: &mut Batch,
    command: &Command,
    now: DateTime<Utc>,
    savepoint: bool,
) -> Result<Staged> {
    command.validate()?;
    let mut staged = Staged::default();
    match command {
        Command::TaskAdd { upgrade_id, .. } | Command::TaskAddMany { upgrade_id, .. } => {
            let tasks = command.new_tasks();
            batch.isolated(tx, savepoint, |b, tx| {
                b.add_tasks(tx, &mut staged, upgrade_id, &tasks, now)
            })?;
            Ok(staged)
        }
        Command::UpgradeCreate { .. }
        | Command::UpgradeStart { .. }
        | Command::UpgradePhase { .. }
        | Command::UpgradeComplete { .. }
        | Command::UpgradeFail { .. } => {
            batch.isolated(tx, savepoint, |_, tx| upgrade_command(tx, command, now))
        }
        _ => {
            batch.task_command(tx, &mut staged, command, now)?;
            Ok(staged)
        }
    }
}

/// Executes an upgrade command (create, start, phase, complete, fail).
fn upgrade_command(tx: &mut Tx<'_, '_>, command: &Command, now: DateTime<Utc>) -> Result<Staged> {
    let mut staged = Staged::default();
    match command {
        Command::UpgradeCreate {
            upgrade_id,
            plan_id,
            cluster_name,
            metadata,
        } => {
            let row = tx.opt(
                "INSERT INTO upgrades (upgrade_id, plan_id, cluster_name, status, created_at, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (upgrade_id) DO NOTHING RETURNING ukey",
                &[
                    upgrade_id,
                    plan_id,
                    cluster_name,
                    &status_code(ProgressStatus::NotStarted),
                    &micros(now),
                    &json_text(metadata),
                ],
            )?;
            let Some(row) = row else {
                return Err(Error::AlreadyExists {
                    what: format!("upgrade {upgrade_id:?}"),
                });
            };
            let ukey: i64 = row.get(0);
            staged.push(
                ukey,
                None,
                new_event(
                    upgrade_id,
                    None,
                    EventKind::UpgradeCreated,
                    ProgressStatus::NotStarted,
                    now,
                    None,
                    None,
                    0.0,
                ),
            );
            Ok(staged)
        }
        Command::UpgradeStart { upgrade_id, .. }
        | Command::UpgradePhase { upgrade_id, .. }
        | Command::UpgradeComplete { upgrade_id, .. }
        | Command::UpgradeFail { upgrade_id, .. } => {
            let row = load_upgrade(tx, upgrade_id, true)?;
            let mut u = row.upgrade;
            let (from, effect) = machine::apply_upgrade(&mut u, command, now)?;
            let (to, kind, message) = (u.status, effect.kind, effect.message);
            tx.exec(
                "UPDATE upgrades SET status = $2, current_phase = $3, started_at = $4, \
                 completed_at = $5, error_message = $6 WHERE ukey = $1",
                &[
                    &row.ukey,
                    &status_code(to),
                    &u.current_phase,
                    &u.started_at.map(micros),
                    &u.completed_at.map(micros),
                    &u.error_message,
                ],
            )?;
            let local = staged.push(
                row.ukey,
                None,
                new_event(
                    upgrade_id,
                    None,
                    kind,
                    to,
                    now,
                    message.as_deref(),
                    None,
                    u.overall_percentage,
                ),
            );
            if from != to {
                staged.status_change(local, upgrade_id, None, from, to);
            }
            staged.notes.push(Note {
                event: local as usize - 1,
                from: Some(from),
                cluster: u.cluster_name.clone(),
                upgrade: Some(u),
                task: None,
            });
            Ok(staged)
        }
        _ => Err(Error::invalid("not an upgrade operation")),
    }
}

// ---------------------------------------------------------------------------------------------

impl ProgressStore for PostgresStore {
    fn execute(&self, commands: &[Command]) -> Result<Vec<Result<Committed>>> {
        // Generic plans: the group commit's statements are planned once per connection, not
        // at each execution. Left to choose, PostgreSQL keeps custom plans for them (it knows
        // their arrays' lengths then) and plans them again each time: a fifth of its CPU
        // under many writers (issue #13, G6). Each statement of this path finds its rows by
        // key, whatever the parameters (the children of a parent through
        // `tasks_by_parent_status_tkey`, schema 12); other transactions keep custom plans.
        self.transaction(true, |tx| execute_batch(tx, commands))
    }

    fn import(&self, upgrade: &Upgrade, tasks: &[Task], events: &[ProgressEvent]) -> Result<u64> {
        crate::store::domain::command::check_import(upgrade, tasks, events)?;
        self.write(|tx| import_upgrade(tx, upgrade, tasks, events))
    }

    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade> {
        self.read(|db| Ok(load_upgrade(db, upgrade_id, false)?.upgrade))
    }

    fn upgrades_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Upgrade>> {
        self.read(|db| {
            let from = match after {
                Some(id) => upgrade_key(db, id)?,
                None => 0,
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            db.query(
                &format!(
                    "SELECT {UPGRADE_COLS} FROM upgrades WHERE ukey > $1 ORDER BY ukey LIMIT $2"
                ),
                &[&from, &limit],
            )?
            .iter()
            .map(|r| upgrade_row(r).map(|u| u.upgrade))
            .collect()
        })
    }

    fn tasks_page(&self, upgrade_id: &str, after: Option<&str>, limit: usize) -> Result<Vec<Task>> {
        self.read(|db| {
            let ukey = upgrade_key(db, upgrade_id)?;
            let from = match after {
                Some(id) => load_task(db, ukey, upgrade_id, id)?.tkey,
                None => 0,
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            db.query(
                &format!(
                    "SELECT {TASK_COLS} FROM tasks WHERE ukey = $1 AND tkey > $2 ORDER BY tkey LIMIT $3"
                ),
                &[&ukey, &from, &limit],
            )?
            .iter()
            .map(|r| task_row(r, upgrade_id).map(|t| t.task))
            .collect()
        })
    }

    fn tasks_in_status(
        &self,
        upgrade_id: &str,
        status: ProgressStatus,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Task>> {
        self.read(|db| {
            let ukey = upgrade_key(db, upgrade_id)?;
            let order = if newest_first { "DESC" } else { "ASC" };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            db.query(
                &format!(
                    "SELECT {TASK_COLS} FROM tasks WHERE ukey = $1 AND status = $2 \
                     ORDER BY tkey {order} LIMIT $3"
                ),
                &[&ukey, &status_code(status), &limit],
            )?
            .iter()
            .map(|r| task_row(r, upgrade_id).map(|t| t.task))
            .collect()
        })
    }

    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task> {
        self.read(|db| {
            // One round trip (every acknowledged update over HTTP answers with its task); the
            // upgrade is looked up apart only to say which of the two is missing.
            let row = db.opt(
                &format!(
                    "SELECT {TASK_COLS} FROM tasks WHERE task_id = $2 \
                     AND ukey = (SELECT ukey FROM upgrades WHERE upgrade_id = $1)"
                ),
                &[&upgrade_id, &task_id],
            )?;
            match row {
                Some(r) => Ok(task_row(&r, upgrade_id)?.task),
                None => {
                    upgrade_key(db, upgrade_id)?;
                    Err(task_not_found(upgrade_id, task_id))
                }
            }
        })
    }

    fn recent_task_events(
        &self,
        upgrade_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<ProgressEvent>> {
        self.read(|db| {
            let ukey = upgrade_key(db, upgrade_id)?;
            let row = load_task(db, ukey, upgrade_id, task_id)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            events_of(db.query(
                &format!("{EVENT_SELECT} WHERE e.tkey = $1 ORDER BY e.seq DESC LIMIT $2"),
                &[&row.tkey, &limit],
            )?)
        })
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<ProgressEvent>> {
        self.read(|db| {
            let since = i64::try_from(query.since).unwrap_or(i64::MAX);
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            match &query.upgrade_id {
                Some(upgrade_id) => {
                    let ukey = upgrade_key(db, upgrade_id)?;
                    events_of(db.query(
                        &format!(
                            "{EVENT_SELECT} WHERE e.ukey = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3"
                        ),
                        &[&ukey, &since, &limit],
                    )?)
                }
                None => events_of(db.query(
                    &format!("{EVENT_SELECT} WHERE e.seq > $1 ORDER BY e.seq LIMIT $2"),
                    &[&since, &limit],
                )?),
            }
        })
    }

    fn latest_events(&self, upgrade_id: &str, limit: usize) -> Result<Vec<ProgressEvent>> {
        self.read(|db| {
            let ukey = upgrade_key(db, upgrade_id)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut out = events_of(db.query(
                &format!("{EVENT_SELECT} WHERE e.ukey = $1 ORDER BY e.seq DESC LIMIT $2"),
                &[&ukey, &limit],
            )?)?;
            out.reverse();
            Ok(out)
        })
    }

    fn last_seq(&self) -> Result<u64> {
        self.read(|db| {
            let seq: Option<i64> = db.one("SELECT max(seq) FROM events", &[])?.get(0);
            Ok(seq.unwrap_or(0) as u64)
        })
    }

    fn task_history(
        &self,
        cluster_name: &str,
        task_ids: &[&str],
    ) -> Result<Vec<crate::store::domain::history::TaskHistory>> {
        self.read(|db| super::history::read(db, cluster_name, task_ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::PgCluster;

    #[test]
    fn conformance() {
        let pg = PgCluster::start();
        let options = PostgresOptions {
            pool_size: 4,
            ..PostgresOptions::default()
        };
        crate::conformance::run(&|| {
            Box::new(PostgresStore::open(&pg.create_database(), &options).unwrap())
        });
    }

    #[test]
    fn newer_schema_is_refused_and_migrations_run_once() {
        let pg = PgCluster::start();
        let url = pg.create_database();
        let store = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            super::super::schema::SCHEMA_VERSION
        );
        // Builds of schema 5 and older do not know `trace.test_run` entries: they must refuse.
        assert!(store.schema_version().unwrap() >= 7);
        drop(store);
        // Opening again migrates nothing.
        let store = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
        store
            .with_conn(|c| {
                Ok(c.client
                    .batch_execute("UPDATE schema_version SET version = 99")?)
            })
            .unwrap();
        drop(store);
        let err = PostgresStore::open(&url, &PostgresOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("newer version (schema 99"),
            "{err}"
        );
    }

    /// Guarantee E5 on PostgreSQL: a database of schema 1 (no history) gets its history seeded
    /// from its completed tasks when it migrates to schema 2, as the completions wrote it.
    #[test]
    fn schema_1_databases_get_the_history_seeded_from_their_tasks() {
        use crate::model::TaskType;
        use crate::progress::ProgressTracker;
        use crate::store::domain::command::NewTask;
        let pg = PgCluster::start();
        let url = pg.create_database();
        let store =
            std::sync::Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
        let t = ProgressTracker::new(store.clone());
        for (i, cluster) in ["c", "c", "d"].iter().enumerate() {
            let u = format!("u{i}");
            t.create_upgrade(&u, "p", cluster, JsonMap::new()).unwrap();
            t.add_task(&u, NewTask::new("a", "A", TaskType::UpgradeStep).steps(2))
                .unwrap();
            t.start_task(&u, "a", None).unwrap();
            std::thread::sleep(Duration::from_millis(3));
            t.complete_task(&u, "a", None).unwrap();
        }
        let written = store.task_history("c", &["a"]).unwrap();
        assert_eq!(written[0].global.unwrap().duration.samples, 3);
        // Back to schema 1: every table a later migration made goes (whatever those are).
        let schema_1 = [
            "schema_version",
            "upgrades",
            "tasks",
            "events",
            "seq_counter",
            "notifications",
            "deliveries",
            "sink_cursors",
        ];
        store
            .with_conn(|c| {
                let later: Vec<String> = c
                    .client
                    .query(
                        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
                        &[],
                    )?
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .filter(|t| !schema_1.contains(&t.as_str()))
                    .collect();
                assert!(later.iter().any(|t| t == "task_history"), "{later:?}");
                Ok(c.client.batch_execute(&format!(
                    "DROP TABLE {} CASCADE; UPDATE schema_version SET version = 1",
                    later.join(", ")
                ))?)
            })
            .unwrap();
        drop(t);
        drop(store);
        let store = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            super::super::schema::SCHEMA_VERSION
        );
        assert_eq!(store.task_history("c", &["a"]).unwrap(), written);
    }

    /// Guarantee G11: a replica frozen inside a transaction that holds the `seq` counter (so
    /// every commit waits for it) loses it after `idle_in_transaction_session_timeout`: another
    /// replica's command, blocked meanwhile, then commits; the frozen one's commit fails. Our
    /// sessions carry the limits.
    #[test]
    fn a_frozen_replica_cannot_hold_the_counter() {
        use std::time::Instant;
        let pg = PgCluster::start();
        let url = pg.create_database();
        let options = PostgresOptions {
            pool_size: 2,
            ..PostgresOptions::default()
        };
        let defaults = PostgresStore::open(&url, &options).unwrap();
        defaults
            .with_conn(|c| {
                let show = |c: &mut Conn, name: &str| -> String {
                    c.client
                        .query_one(&format!("SHOW {name}"), &[])
                        .unwrap()
                        .get(0)
                };
                assert_eq!(show(c, "idle_in_transaction_session_timeout"), "15s");
                assert_eq!(show(c, "statement_timeout"), "1min");
                Ok(())
            })
            .unwrap();
        let frozen = PostgresStore::open_with_limits(
            &url,
            &options,
            &SessionLimits {
                idle_in_transaction: Duration::from_millis(700),
                statement: Duration::from_secs(30),
            },
        )
        .unwrap();
        // The live replica gives up on a statement after 8 s (so this test fails, not hangs,
        // without the limit).
        let live = PostgresStore::open_with_limits(
            &url,
            &options,
            &SessionLimits {
                idle_in_transaction: Duration::from_secs(15),
                statement: Duration::from_secs(8),
            },
        )
        .unwrap();
        let create = Command::UpgradeCreate {
            upgrade_id: "u".into(),
            plan_id: "p".into(),
            cluster_name: "c".into(),
            metadata: JsonMap::new(),
        };
        live.execute(&[create]).unwrap().remove(0).unwrap();
        frozen
            .with_conn(|c| {
                c.client
                    .batch_execute("BEGIN; UPDATE seq_counter SET seq = seq")?;
                // Frozen from here: the live replica's command waits for the counter.
                let start = Instant::now();
                let phase = Command::UpgradePhase {
                    upgrade_id: "u".into(),
                    phase: "nodes".into(),
                };
                let result =
                    std::thread::scope(|s| s.spawn(|| live.execute(&[phase])).join().unwrap());
                let waited = start.elapsed();
                let committed = result.unwrap().remove(0);
                assert!(committed.is_ok(), "{committed:?}");
                assert!(
                    waited >= Duration::from_millis(500) && waited < Duration::from_secs(6),
                    "{waited:?}"
                );
                assert!(c.client.batch_execute("COMMIT").is_err());
                Ok(())
            })
            .unwrap();
        assert_eq!(live.last_seq().unwrap(), 2);
    }

    /// Guarantee G12: batches that touch several upgrades lock them in one order (by key), so
    /// replicas writing batches in opposite orders never deadlock (PostgreSQL's own count of
    /// deadlocks stays 0), and every command commits.
    #[test]
    fn batches_in_opposite_orders_do_not_deadlock() {
        let pg = PgCluster::start();
        let url = pg.create_database();
        let options = PostgresOptions {
            pool_size: 2,
            ..PostgresOptions::default()
        };
        let a = PostgresStore::open(&url, &options).unwrap();
        let b = PostgresStore::open(&url, &options).unwrap();
        let ids = ["u1", "u2", "u3"];
        for u in ids {
            let setup = [
                Command::UpgradeCreate {
                    upgrade_id: u.into(),
                    plan_id: "p".into(),
                    cluster_name: "c".into(),
                    metadata: JsonMap::new(),
                },
                Command::TaskAddMany {
                    upgrade_id: u.into(),
                    tasks: vec![crate::store::domain::command::NewTask::new(
                        "t",
                        "T",
                        crate::model::TaskType::UpgradeStep,
                    )],
                },
            ];
            for r in a.execute(&setup).unwrap() {
                r.unwrap();
            }
        }
        let update = |u: &str, n: usize| Command::TaskUpdate {
            upgrade_id: u.into(),
            task_id: "t".into(),
            percentage: (n % 100) as f64,
            message: None,
            details: JsonMap::new(),
        };
        const ROUNDS: usize = 150;
        std::thread::scope(|s| {
            for (store, forward) in [(&a, true), (&b, false)] {
                s.spawn(move || {
                    for n in 0..ROUNDS {
                        let mut order = ids.to_vec();
                        if !forward {
                            order.reverse();
                        }
                        let batch: Vec<Command> = order.iter().map(|u| update(u, n)).collect();
                        for r in store.execute(&batch).unwrap() {
                            r.unwrap();
                        }
                    }
                });
            }
        });
        // Each backend reports its statistics within a second of going idle.
        std::thread::sleep(Duration::from_millis(1500));
        let deadlocks: i64 = a
            .read(|db| {
                db.batch("SELECT pg_stat_clear_snapshot()")?;
                Ok(db
                    .one(
                        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
                        &[],
                    )?
                    .get(0))
            })
            .unwrap();
        assert_eq!(deadlocks, 0);
        // Create + add per upgrade, then 2 x ROUNDS updates of each.
        assert_eq!(
            a.last_seq().unwrap(),
            (ids.len() * 2 + 2 * ROUNDS * ids.len()) as u64
        );
    }

    #[test]
    fn bad_urls_say_what_to_fix() {
        for url in ["mysql://x", "postgres://h:notaport/db"] {
            let err = PostgresStore::open(url, &PostgresOptions::default()).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{url}: {err}");
            assert!(err.to_string().contains("postgres://"), "{err}");
        }
        let err = parse_url("postgres://u:secret@h/db?sslmode=bogus").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        // The password as a query option is hidden too, wherever the URL is shown.
        let err = parse_url("postgres://u@h/db?password=s3cret&sslmode=bogus").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let shown = redact("postgres://u@h/db?application_name=eua&password=s3cret");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("application_name=eua"), "{shown}");
    }
}
