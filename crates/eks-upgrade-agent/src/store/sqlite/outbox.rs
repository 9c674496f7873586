//! The notification outbox in the progress database. `enqueue` runs inside the transaction of the
//! change that caused the notification; delivery state is kept per sink (`deliveries`), fed from
//! `notifications` by a per-sink cursor.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};

use super::progress::{SqliteStore, from_micros, json_map, micros};
use crate::error::Result;
use crate::model::{JsonMap, ProgressEvent, ProgressStatus, Task, Upgrade};
use crate::notify::{Kinds, Notification, SinkStatus};
use crate::store::{DeliveryOutcome, Outbox};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS notifications (
    nid         INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    upgrade_id  TEXT NOT NULL,
    detail_type TEXT NOT NULL,
    time        INTEGER NOT NULL,
    detail      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sink_cursors (
    sink TEXT PRIMARY KEY,
    upto INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    sink         TEXT NOT NULL,
    nid          INTEGER NOT NULL,
    status       INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    next_at      INTEGER NOT NULL,
    last_error   TEXT,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (sink, nid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_status ON deliveries (sink, status, nid);
"#;

const PENDING: i64 = 0;
const DELIVERED: i64 = 1;
const DEAD: i64 = 2;

/// Writes the notification of `event` (if it deserves one) in the caller's transaction.
pub(super) fn enqueue(
    tx: &Transaction<'_>,
    event: &ProgressEvent,
    from: Option<ProgressStatus>,
    cluster_name: &str,
    upgrade: Option<&Upgrade>,
    task: Option<&Task>,
) -> Result<()> {
    let Some((kind, d)) =
        crate::store::notification::detail(event, from, cluster_name, upgrade, task)
    else {
        return Ok(());
    };
    tx.prepare_cached(
        "INSERT INTO notifications (event_id, seq, upgrade_id, detail_type, time, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        event.event_id,
        event.seq as i64,
        event.upgrade_id,
        kind,
        micros(event.timestamp),
        serde_json::to_string(&d).unwrap_or_default()
    ])?;
    Ok(())
}

/// Writes a notification that is not a progress event's (e.g. `upgrade.validation_failed`) in
/// the caller's transaction. `event_id` is its stable id; `seq` the upgrade's last event's.
pub(super) fn enqueue_detail(
    tx: &Transaction<'_>,
    event_id: &str,
    seq: i64,
    upgrade_id: &str,
    detail_type: &str,
    time: DateTime<Utc>,
    detail: &JsonMap,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO notifications (event_id, seq, upgrade_id, detail_type, time, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        event_id,
        seq,
        upgrade_id,
        detail_type,
        micros(time),
        serde_json::to_string(detail).unwrap_or_default()
    ])?;
    Ok(())
}

impl Outbox for SqliteStore {
    fn ingest(&self, sink: &str, kinds: Kinds) -> Result<u64> {
        self.write(|tx| {
            let upto: i64 = tx
                .prepare_cached("SELECT upto FROM sink_cursors WHERE sink = ?1")?
                .query_row([sink], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            // The window of unseen notifications taken in now; the cursor passes all of it,
            // the kinds this sink does not take included.
            let Some(end): Option<i64> = tx
                .prepare_cached(
                    "SELECT max(nid) FROM (SELECT nid FROM notifications WHERE nid > ?1 \
                     ORDER BY nid LIMIT 10000)",
                )?
                .query_row([upto], |r| r.get(0))?
            else {
                return Ok(0);
            };
            let now = micros(Utc::now());
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO deliveries (sink, nid, status, attempts, next_at, updated_at) \
                     SELECT ?1, nid, 0, 0, 0, ?3 FROM notifications WHERE nid > ?2 AND nid <= ?4 \
                     AND (?5 OR detail_type NOT LIKE 'trace.%') ORDER BY nid",
                )?
                .execute(params![sink, upto, now, end, kinds == Kinds::All])?;
            tx.prepare_cached(
                "INSERT INTO sink_cursors (sink, upto) VALUES (?1, ?2) \
                 ON CONFLICT (sink) DO UPDATE SET upto = excluded.upto",
            )?
            .execute(params![sink, end])?;
            Ok(n as u64)
        })
    }

    fn due(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(Notification, u32)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT n.nid, n.event_id, n.seq, n.upgrade_id, n.detail_type, n.time, n.detail, \
                 d.attempts, d.next_at FROM deliveries d JOIN notifications n ON n.nid = d.nid \
                 WHERE d.sink = ?1 AND d.status = 0 ORDER BY d.nid LIMIT 1000",
            )?;
            let mut rows = stmt.query([sink])?;
            let mut blocked: HashSet<String> = HashSet::new();
            let mut out = Vec::new();
            let now = micros(now);
            while let Some(r) = rows.next()? {
                let upgrade_id: String = r.get(3)?;
                if blocked.contains(&upgrade_id) {
                    continue;
                }
                let next_at: i64 = r.get(8)?;
                if next_at > now {
                    // Keep per-upgrade order: later notifications wait for this one.
                    blocked.insert(upgrade_id);
                    continue;
                }
                out.push((
                    Notification {
                        nid: r.get::<_, i64>(0)? as u64,
                        event_id: r.get(1)?,
                        seq: r.get::<_, i64>(2)? as u64,
                        upgrade_id,
                        detail_type: r.get(4)?,
                        time: from_micros(r.get(5)?),
                        detail: json_map(r.get(6)?),
                    },
                    r.get::<_, i64>(7)? as u32,
                ));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn record(&self, sink: &str, outcomes: &[(u64, DeliveryOutcome)]) -> Result<()> {
        self.write(|tx| {
            let now = micros(Utc::now());
            let mut stmt = tx.prepare_cached(
                "UPDATE deliveries SET status = ?3, attempts = attempts + 1, next_at = ?4, \
                 last_error = ?5, updated_at = ?6 WHERE sink = ?1 AND nid = ?2",
            )?;
            for (nid, outcome) in outcomes {
                let (status, next_at, error) = match outcome {
                    DeliveryOutcome::Delivered => (DELIVERED, 0, None),
                    DeliveryOutcome::Retry { next_at, error } => {
                        (PENDING, micros(*next_at), Some(error.as_str()))
                    }
                    DeliveryOutcome::Dead { error } => (DEAD, 0, Some(error.as_str())),
                };
                stmt.execute(params![sink, *nid as i64, status, next_at, error, now])?;
            }
            Ok(())
        })
    }

    fn sink_status(&self, sink: &str, kinds: Kinds) -> Result<SinkStatus> {
        let all = kinds == Kinds::All;
        self.read(|c| {
            let mut status = SinkStatus {
                sink: sink.to_owned(),
                ..SinkStatus::default()
            };
            let total: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM notifications WHERE ?1 OR detail_type NOT LIKE 'trace.%'",
                )?
                .query_row([all], |r| r.get(0))?;
            let upto: i64 = c
                .prepare_cached("SELECT upto FROM sink_cursors WHERE sink = ?1")?
                .query_row([sink], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let unseen: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM notifications WHERE nid > ?1 \
                     AND (?2 OR detail_type NOT LIKE 'trace.%')",
                )?
                .query_row(params![upto, all], |r| r.get(0))?;
            let mut stmt = c.prepare_cached(
                "SELECT status, count(*) FROM deliveries WHERE sink = ?1 GROUP BY status",
            )?;
            let mut rows = stmt.query([sink])?;
            while let Some(r) = rows.next()? {
                let n = r.get::<_, i64>(1)? as u64;
                match r.get::<_, i64>(0)? {
                    PENDING => status.pending += n,
                    DELIVERED => status.delivered += n,
                    _ => status.dead += n,
                }
            }
            status.pending += unseen as u64;
            status.total = total as u64;
            status.last_error = c
                .prepare_cached(
                    "SELECT last_error FROM deliveries WHERE sink = ?1 AND last_error IS NOT NULL \
                     ORDER BY updated_at DESC LIMIT 1",
                )?
                .query_row([sink], |r| r.get(0))
                .optional()?;
            status.next_retry = c
                .prepare_cached(
                    "SELECT min(next_at) FROM deliveries WHERE sink = ?1 AND status = 0 AND next_at > 0",
                )?
                .query_row([sink], |r| r.get::<_, Option<i64>>(0))?
                .map(from_micros);
            Ok(status)
        })
    }
}
