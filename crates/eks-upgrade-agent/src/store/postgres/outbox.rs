//! The notification outbox in the database (the same tables as the SQLite backend's, filled by
//! the transactions of the changes they report): delivery state per sink (`deliveries`), fed from
//! `notifications` by a per-sink cursor.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::lease;
use super::progress::{PostgresStore, from_micros, json_map, micros};
use crate::error::Result;
use crate::notify::{Kinds, Notification, SinkStatus};
use crate::store::{DeliveryOutcome, Outbox};

/// How long a replica holds the notifications it claimed before another may deliver them
/// (the default of [`PostgresOptions::lease`](super::PostgresOptions::lease)); the dispatcher
/// renews its claims while a pass lasts.
pub(crate) const LEASE: std::time::Duration = std::time::Duration::from_secs(15);

const PENDING: i64 = 0;
const DELIVERED: i64 = 1;
const DEAD: i64 = 2;

/// Notification deliveries claimed by a replica and not yet settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseCounts {
    /// Whose lease runs.
    pub held: u64,
    /// Whose lease ran out (their replica died or stalled): another replica takes them over.
    pub expired: u64,
}

impl PostgresStore {
    /// The outbox's leases now (`/metrics`).
    pub fn lease_counts(&self) -> Result<LeaseCounts> {
        self.read(|db| {
            let r = db.one(
                &format!(
                    "SELECT count(*) FILTER (WHERE lease_until > {now}), \
                     count(*) FILTER (WHERE lease_until <= {now}) FROM deliveries \
                     WHERE status = 0 AND lease_owner IS NOT NULL",
                    now = lease::DB_NOW
                ),
                &[],
            )?;
            Ok(LeaseCounts {
                held: r.get::<_, i64>(0) as u64,
                expired: r.get::<_, i64>(1) as u64,
            })
        })
    }
}

impl Outbox for PostgresStore {
    fn ingest(&self, sink: &str, kinds: Kinds) -> Result<u64> {
        self.write(|tx| {
            // One ingester per sink at a time: the cursor row is locked (created if missing).
            tx.exec(
                "INSERT INTO sink_cursors (sink, upto) VALUES ($1, 0) ON CONFLICT (sink) DO NOTHING",
                &[&sink],
            )?;
            let upto: i64 = tx
                .one(
                    "SELECT upto FROM sink_cursors WHERE sink = $1 FOR UPDATE",
                    &[&sink],
                )?
                .get(0);
            // The window of unseen notifications taken in now; the cursor passes all of it,
            // the kinds this sink does not take included.
            let end: Option<i64> = tx
                .one(
                    "SELECT max(nid) FROM (SELECT nid FROM notifications WHERE nid > $1 \
                     ORDER BY nid LIMIT 10000) w",
                    &[&upto],
                )?
                .get(0);
            let Some(end) = end else {
                return Ok(0);
            };
            let now = micros(self.clock());
            let n = tx.exec(
                "INSERT INTO deliveries (sink, nid, status, attempts, next_at, updated_at) \
                 SELECT $1, nid, 0, 0, 0, $3 FROM notifications WHERE nid > $2 AND nid <= $4 \
                 AND ($5 OR detail_type NOT LIKE 'trace.%') ORDER BY nid ON CONFLICT DO NOTHING",
                &[&sink, &upto, &now, &end, &(kinds == Kinds::All)],
            )?;
            tx.exec(
                "UPDATE sink_cursors SET upto = $2 WHERE sink = $1",
                &[&sink, &end],
            )?;
            Ok(n)
        })
    }

    /// Claims what it returns: each entry gets a 15 s lease for this store, so other
    /// replicas skip it until [`record`](Outbox::record) settles it or the lease expires (its
    /// replica died). Claims of one sink run one at a time (the sink's cursor row is locked), so
    /// per-upgrade order holds across replicas: an upgrade whose earlier entry another replica
    /// holds, or that waits for a retry, is skipped whole.
    fn due(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(Notification, u32)>> {
        let owner = self.instance();
        // Retry times are on the database's clock (`clock.rs`): so is `now`.
        let now_us = micros(now).saturating_add(self.db_clock_offset()?);
        self.write(|tx| {
            tx.exec(
                "INSERT INTO sink_cursors (sink, upto) VALUES ($1, 0) ON CONFLICT (sink) DO NOTHING",
                &[&sink],
            )?;
            tx.exec(
                "SELECT 1 FROM sink_cursors WHERE sink = $1 FOR UPDATE",
                &[&sink],
            )?;
            // Whether a lease runs is the database clock's call (`lease.rs`).
            let rows = tx.query(
                &format!(
                    "SELECT n.nid, n.event_id, n.seq, n.upgrade_id, n.detail_type, n.time, \
                     n.detail, d.attempts, d.next_at, d.lease_owner, d.lease_until > {} \
                     FROM deliveries d JOIN notifications n ON n.nid = d.nid \
                     WHERE d.sink = $1 AND d.status = 0 ORDER BY d.nid LIMIT 1000",
                    lease::DB_NOW
                ),
                &[&sink],
            )?;
            let mut blocked: HashSet<String> = HashSet::new();
            let mut out = Vec::new();
            for r in rows {
                let upgrade_id: String = r.get(3);
                if blocked.contains(&upgrade_id) {
                    continue;
                }
                let next_at: i64 = r.get(8);
                let lease_owner: Option<String> = r.get(9);
                let running: bool = r.get(10);
                let held = running && lease_owner.as_deref() != Some(owner);
                if next_at > now_us || held {
                    // Keep per-upgrade order: later notifications wait for this one.
                    blocked.insert(upgrade_id);
                    continue;
                }
                out.push((
                    Notification {
                        nid: r.get::<_, i64>(0) as u64,
                        event_id: r.get(1),
                        seq: r.get::<_, i64>(2) as u64,
                        upgrade_id,
                        detail_type: r.get(4),
                        time: from_micros(r.get(5)),
                        detail: json_map(r.get(6)),
                    },
                    r.get::<_, i64>(7) as u32,
                ));
                if out.len() >= limit {
                    break;
                }
            }
            let nids: Vec<i64> = out.iter().map(|(n, _)| n.nid as i64).collect();
            let span = self.lease().as_micros() as i64;
            tx.exec(
                &format!(
                    "UPDATE deliveries SET lease_owner = $2, lease_until = {} + $3 \
                     WHERE sink = $1 AND nid = ANY($4)",
                    lease::DB_NOW
                ),
                &[&sink, &owner, &span, &nids],
            )?;
            Ok(out)
        })
    }

    fn record(&self, sink: &str, outcomes: &[(u64, DeliveryOutcome)]) -> Result<()> {
        let owner = self.instance();
        // Only while the entry is still ours and pending: a replica that took it over after
        // our lease ran out decides it, and a settled entry stays settled (a late retry never
        // reopens a delivered one).
        let sql = format!(
            "UPDATE deliveries SET status = $3, attempts = attempts + 1, next_at = $4, \
             last_error = $5, updated_at = $6, lease_owner = NULL, lease_until = 0 \
             WHERE sink = $1 AND nid = $2 AND status = 0 AND {}",
            lease::ours("lease_owner", "$7")
        );
        // A retry time goes onto the database's clock (`clock.rs`).
        let offset = self.db_clock_offset()?;
        self.write(|tx| {
            let now = micros(self.clock());
            for (nid, outcome) in outcomes {
                let (status, next_at, error) = match outcome {
                    DeliveryOutcome::Delivered => (DELIVERED, 0, None),
                    DeliveryOutcome::Retry { next_at, error } => (
                        PENDING,
                        micros(*next_at).saturating_add(offset),
                        Some(error.as_str()),
                    ),
                    DeliveryOutcome::Dead { error } => (DEAD, 0, Some(error.as_str())),
                };
                tx.exec(
                    &sql,
                    &[
                        &sink,
                        &(*nid as i64),
                        &status,
                        &next_at,
                        &error,
                        &now,
                        &owner,
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn lease(&self) -> Option<std::time::Duration> {
        Some(PostgresStore::lease(self))
    }

    fn renew(&self, sink: &str, nids: &[u64]) -> Result<u64> {
        if nids.is_empty() {
            return Ok(0);
        }
        let owner = self.instance();
        let nids: Vec<i64> = nids.iter().map(|n| *n as i64).collect();
        let span = self.lease().as_micros() as i64;
        self.write(|tx| {
            tx.exec(
                &format!(
                    "UPDATE deliveries SET lease_until = {} + $3 \
                     WHERE sink = $1 AND nid = ANY($2) AND status = 0 AND lease_owner = $4",
                    lease::DB_NOW
                ),
                &[&sink, &nids, &span, &owner],
            )
        })
    }

    fn sink_status(&self, sink: &str, kinds: Kinds) -> Result<SinkStatus> {
        let all = kinds == Kinds::All;
        // The next retry is shown on this replica's clock (stored on the database's).
        let offset = self.db_clock_offset()?;
        self.read(|db| {
            let mut status = SinkStatus {
                sink: sink.to_owned(),
                ..SinkStatus::default()
            };
            let total: i64 = db
                .one(
                    "SELECT count(*) FROM notifications WHERE $1 OR detail_type NOT LIKE 'trace.%'",
                    &[&all],
                )?
                .get(0);
            let upto: i64 = db
                .opt("SELECT upto FROM sink_cursors WHERE sink = $1", &[&sink])?
                .map_or(0, |r| r.get(0));
            let unseen: i64 = db
                .one(
                    "SELECT count(*) FROM notifications WHERE nid > $1 \
                     AND ($2 OR detail_type NOT LIKE 'trace.%')",
                    &[&upto, &all],
                )?
                .get(0);
            for r in db.query(
                "SELECT status, count(*) FROM deliveries WHERE sink = $1 GROUP BY status",
                &[&sink],
            )? {
                let n = r.get::<_, i64>(1) as u64;
                match r.get::<_, i64>(0) {
                    PENDING => status.pending += n,
                    DELIVERED => status.delivered += n,
                    _ => status.dead += n,
                }
            }
            status.pending += unseen as u64;
            status.total = total as u64;
            status.last_error = db
                .opt(
                    "SELECT last_error FROM deliveries WHERE sink = $1 AND last_error IS NOT NULL \
                     ORDER BY updated_at DESC LIMIT 1",
                    &[&sink],
                )?
                .map(|r| r.get(0));
            status.next_retry = db
                .one(
                    "SELECT min(next_at) FROM deliveries WHERE sink = $1 AND status = 0 AND next_at > 0",
                    &[&sink],
                )?
                .get::<_, Option<i64>>(0)
                .map(|t| from_micros(t.saturating_sub(offset)));
            Ok(status)
        })
    }
}
