//! Task duration history of [`PostgresStore`](super::PostgresStore) (schema 2), as the SQLite
//! backend keeps it: one row per (scope, task id) holding its last samples
//! (`store/domain/history.rs` has the encoding and the math). The samples a transaction adds
//! are gathered per row and written by one upsert, just before its events get their `seq`;
//! a summary reads every row it needs in one query by primary key.

use std::collections::HashMap;

use postgres::GenericClient;

use super::connect::Db;
use crate::error::Result;
use crate::store::domain::history::{MAX_SAMPLES, TaskHistory, TaskStats};

/// The scope of every cluster (cluster names are never empty).
const GLOBAL: &str = "";

/// Schema 2: `cluster` is the cluster's name, or `''` for every cluster; `samples` and
/// `step_samples` the last 50 durations and per-step durations (little-endian `f32` seconds,
/// oldest first); `total` how many samples were ever recorded.
pub(super) const SCHEMA_2: &str = r#"
CREATE TABLE task_history (
    task_id      TEXT NOT NULL,
    cluster      TEXT NOT NULL,
    total        BIGINT NOT NULL,
    samples      BYTEA NOT NULL,
    step_samples BYTEA NOT NULL,
    PRIMARY KEY (task_id, cluster)
);
"#;

/// One duration sample of a completed leaf task on a cluster.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sample {
    pub(super) cluster: String,
    pub(super) task_id: String,
    pub(super) secs: f64,
    pub(super) per_step: Option<f64>,
}

/// The upsert of [`record`]: appends each row's new samples (oldest first) to the ones it
/// keeps and keeps the last `MAX_SAMPLES` (200 bytes; a test checks they agree).
const RECORD_SQL: &str = "INSERT INTO task_history AS h (task_id, cluster, total, samples, \
     step_samples) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bytea[], \
     $5::bytea[]) ON CONFLICT (task_id, cluster) DO UPDATE SET total = h.total + excluded.total, \
     samples = substring(h.samples || excluded.samples \
     from greatest(length(h.samples || excluded.samples) - 199, 1)), \
     step_samples = substring(h.step_samples || excluded.step_samples \
     from greatest(length(h.step_samples || excluded.step_samples) - 199, 1))";

/// Appends `samples` (in order) on their cluster and on every cluster: one statement, whatever
/// their number; nothing without samples.
pub(super) fn record(db: &mut Db<'_, impl GenericClient>, samples: &[Sample]) -> Result<()> {
    let Some((ids, scopes, totals, durations, steps)) = columns(samples) else {
        return Ok(());
    };
    db.exec(RECORD_SQL, &[&ids, &scopes, &totals, &durations, &steps])?;
    Ok(())
}

/// Adds the statement of [`record`] to `w` (nothing without samples).
pub(super) fn record_into(w: &mut super::progress::Writes, samples: &[Sample]) {
    if let Some((ids, scopes, totals, durations, steps)) = columns(samples) {
        let owned = |v: Vec<&str>| -> Vec<String> { v.into_iter().map(str::to_owned).collect() };
        w.add(
            RECORD_SQL,
            vec![
                Box::new(owned(ids)),
                Box::new(owned(scopes)),
                Box::new(totals),
                Box::new(durations),
                Box::new(steps),
            ],
        );
    }
}

/// The columns of [`RECORD_SQL`] for `samples` (`None` without samples).
#[allow(clippy::type_complexity)]
fn columns(
    samples: &[Sample],
) -> Option<(Vec<&str>, Vec<&str>, Vec<i64>, Vec<Vec<u8>>, Vec<Vec<u8>>)> {
    if samples.is_empty() {
        return None;
    }
    // (task id, scope, count, duration blob, per-step blob), in the order first seen.
    type Row<'s> = (&'s str, &'s str, i64, Vec<u8>, Vec<u8>);
    let mut rows: Vec<Row<'_>> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for s in samples {
        for scope in [s.cluster.as_str(), GLOBAL] {
            let i = *index.entry((&s.task_id, scope)).or_insert_with(|| {
                rows.push((&s.task_id, scope, 0, Vec::new(), Vec::new()));
                rows.len() - 1
            });
            let row = &mut rows[i];
            row.2 += 1;
            row.3.extend_from_slice(&(s.secs as f32).to_le_bytes());
            if let Some(p) = s.per_step {
                row.4.extend_from_slice(&(p as f32).to_le_bytes());
            }
        }
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut scopes = Vec::with_capacity(rows.len());
    let mut totals = Vec::with_capacity(rows.len());
    let mut durations = Vec::with_capacity(rows.len());
    let mut steps = Vec::with_capacity(rows.len());
    for (id, scope, n, d, s) in rows {
        ids.push(id);
        scopes.push(scope);
        totals.push(n);
        durations.push(keep_last(d));
        steps.push(keep_last(s));
    }
    Some((ids, scopes, totals, durations, steps))
}

/// The last `MAX_SAMPLES` samples of a blob.
fn keep_last(mut blob: Vec<u8>) -> Vec<u8> {
    let max = MAX_SAMPLES * 4;
    if blob.len() > max {
        blob.drain(..blob.len() - max);
    }
    blob
}

/// The history of each of `task_ids` on `cluster` and on every cluster, in one query.
pub(super) fn read(
    db: &mut Db<'_, impl GenericClient>,
    cluster: &str,
    task_ids: &[&str],
) -> Result<Vec<TaskHistory>> {
    if task_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = db.query(
        "SELECT task_id, cluster, samples, step_samples FROM task_history \
         WHERE task_id = ANY($1) AND cluster IN ($2, '')",
        &[&task_ids, &cluster],
    )?;
    let mut found: HashMap<(String, bool), TaskStats> = HashMap::new();
    for r in &rows {
        let (id, scope): (String, String) = (r.get(0), r.get(1));
        let (d, s): (Vec<u8>, Vec<u8>) = (r.get(2), r.get(3));
        if let Some(stats) = TaskStats::from_blobs(&d, &s) {
            found.insert((id, scope == GLOBAL), stats);
        }
    }
    Ok(task_ids
        .iter()
        .map(|id| TaskHistory {
            cluster: found.get(&((*id).to_owned(), false)).copied(),
            global: found.get(&((*id).to_owned(), true)).copied(),
        })
        .collect())
}

/// Seeds the history from the completed leaf tasks a store already holds (the migration to
/// schema 2), oldest completion first. A task completed at the instant it started is not
/// timed.
pub(super) fn seed(db: &mut Db<'_, impl GenericClient>) -> Result<()> {
    let rows = db.query(
        "SELECT u.cluster_name, t.task_id, t.duration, t.total_steps FROM tasks t \
         JOIN upgrades u ON u.ukey = t.ukey \
         WHERE t.status = $1 AND t.children = 0 AND t.duration IS NOT NULL \
         AND t.completed_at > t.started_at ORDER BY t.completed_at, t.tkey",
        &[&super::progress::status_code(
            crate::model::ProgressStatus::Completed,
        )],
    )?;
    let samples: Vec<Sample> = rows
        .iter()
        .filter_map(|r| {
            let secs: f64 = r.get(2);
            let steps: Option<i64> = r.get(3);
            (secs.is_finite() && secs >= 0.0).then(|| Sample {
                cluster: r.get(0),
                task_id: r.get(1),
                secs,
                per_step: steps.filter(|n| *n > 0).map(|n| secs / n as f64),
            })
        })
        .collect();
    record(db, &samples)
}

#[cfg(test)]
#[test]
fn the_upsert_keeps_max_samples() {
    assert_eq!(MAX_SAMPLES * 4, 200);
    assert_eq!(RECORD_SQL.matches("- 199, 1)").count(), 2);
    let blob: Vec<u8> = (0..MAX_SAMPLES as u32 + 3)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let kept = crate::store::domain::history::samples(&keep_last(blob));
    assert_eq!(kept.len(), MAX_SAMPLES);
    assert_eq!(kept[0], 3.0);
}
