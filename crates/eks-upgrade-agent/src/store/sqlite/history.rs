//! Task duration history of [`SqliteStore`](super::SqliteStore) (schema 10): one row per
//! (scope, task id) holding its last samples (`store/domain/history.rs` has the encoding and the
//! math). A completion upserts its two rows (the upgrade's cluster, every cluster) by primary
//! key in one statement, in the completion's transaction: O(1) whatever the number of events,
//! tasks or samples; a summary reads one row per unfinished task and scope.

use rusqlite::{Connection, OptionalExtension, params};

use super::progress::status_code;
use crate::error::Result;
use crate::model::ProgressStatus;
use crate::store::domain::history::{TaskHistory, TaskStats};

/// The scope of every cluster (cluster names are never empty).
const GLOBAL: &str = "";

/// Schema 10: `cluster` is the cluster's name, or `''` for every cluster; `samples` and
/// `step_samples` the last 50 durations and per-step durations (little-endian `f32` seconds,
/// oldest first); `total` how many samples were ever recorded. Keyed by task id first, so a
/// completion's two rows are neighbours (usually one page written, not two).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS task_history (
    cluster      TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    total        INTEGER NOT NULL,
    samples      BLOB NOT NULL,
    step_samples BLOB NOT NULL,
    PRIMARY KEY (task_id, cluster)
) WITHOUT ROWID;
"#;

/// Appends one sample of `task_id` (its duration and, when stepped, its per-step time) on
/// `cluster` and on every cluster: one statement, an upsert of both rows that appends the
/// 4-byte sample to the last 49 kept (the encoding of `history::push_sample`, done in SQL so a
/// completion costs one statement and no read round trip). `substr` of an empty blob is NULL,
/// hence the `coalesce`: a task's first stepped run after unstepped ones.
pub(super) fn record(
    conn: &Connection,
    cluster: &str,
    task_id: &str,
    secs: f64,
    per_step: Option<f64>,
) -> Result<()> {
    let sample = (secs as f32).to_le_bytes();
    let step = per_step.map(|s| (s as f32).to_le_bytes());
    conn.prepare_cached(RECORD_SQL)?.execute(params![
        cluster,
        GLOBAL,
        task_id,
        sample.as_slice(),
        step.as_ref().map(|s| s.as_slice())
    ])?;
    Ok(())
}

/// The upsert of [`record`] (a constant: no formatting on the completion path). A row keeps the
/// last `MAX_SAMPLES - 1` samples (196 bytes) before appending one; a test checks they agree.
const RECORD_SQL: &str = "INSERT INTO task_history (cluster, task_id, total, samples, step_samples) \
     VALUES (?1, ?3, 1, ?4, coalesce(?5, x'')), (?2, ?3, 1, ?4, coalesce(?5, x'')) \
     ON CONFLICT (task_id, cluster) DO UPDATE SET total = total + 1, \
     samples = CAST(coalesce(substr(samples, -196), x'') || excluded.samples AS BLOB), \
     step_samples = CASE WHEN length(excluded.step_samples) = 0 THEN step_samples \
     ELSE CAST(coalesce(substr(step_samples, -196), x'') || excluded.step_samples AS BLOB) END";

#[cfg(test)]
#[test]
fn the_upsert_keeps_max_samples_minus_one() {
    assert_eq!((crate::store::domain::history::MAX_SAMPLES - 1) * 4, 196);
    assert_eq!(RECORD_SQL.matches("-196)").count(), 2);
}

/// The history of each of `task_ids` on `cluster` and on every cluster.
pub(super) fn read(
    conn: &Connection,
    cluster: &str,
    task_ids: &[&str],
) -> Result<Vec<TaskHistory>> {
    let mut stmt = conn.prepare_cached(
        "SELECT samples, step_samples FROM task_history WHERE cluster = ?1 AND task_id = ?2",
    )?;
    let mut one = |scope: &str, id: &str| -> Result<Option<TaskStats>> {
        Ok(stmt
            .query_row(params![scope, id], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?
            .and_then(|(d, s)| TaskStats::from_blobs(&d, &s)))
    };
    task_ids
        .iter()
        .map(|id| {
            Ok(TaskHistory {
                cluster: one(cluster, id)?,
                global: one(GLOBAL, id)?,
            })
        })
        .collect()
}

/// Seeds the history from the completed leaf tasks already in a store that predates it (the
/// migration to schema 10), oldest completion first, one row at a time. A task completed at the
/// instant it started (`task.complete` straight from `not_started`) is not timed.
pub(super) fn seed(conn: &Connection) -> Result<()> {
    let mut stmt = conn.prepare(
        "SELECT u.cluster_name, t.task_id, t.duration, t.total_steps FROM tasks t \
         JOIN upgrades u ON u.ukey = t.ukey \
         WHERE t.status = ?1 AND t.children = 0 AND t.duration IS NOT NULL \
         AND t.completed_at > t.started_at ORDER BY t.completed_at",
    )?;
    let mut rows = stmt.query([status_code(ProgressStatus::Completed)])?;
    while let Some(r) = rows.next()? {
        let cluster: String = r.get(0)?;
        let task_id: String = r.get(1)?;
        let secs: f64 = r.get(2)?;
        let steps: Option<u32> = r.get(3)?;
        if !(secs.is_finite() && secs >= 0.0) {
            continue;
        }
        let per_step = steps.filter(|n| *n > 0).map(|n| secs / f64::from(n));
        record(conn, &cluster, &task_id, secs, per_step)?;
    }
    Ok(())
}
