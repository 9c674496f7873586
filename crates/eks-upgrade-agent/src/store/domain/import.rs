//! What importing a whole upgrade writes, computed once for every backend: each task's place in
//! the tree, the rollups and derived statuses rebuilt bottom-up, the upgrade's counters, and the
//! duration samples the import adds to the history. The backend only writes the rows.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{history, machine};
use crate::error::{Error, Result};
use crate::model::{ProgressStatus, Task};

/// One imported task's stored values beyond the task itself.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImportRow {
    /// Index of its parent among the tasks (always an earlier one).
    pub(crate) parent: Option<usize>,
    pub(crate) depth: u32,
    /// Derived from its children for a parent.
    pub(crate) status: ProgressStatus,
    /// Effective percentage.
    pub(crate) percentage: f64,
    pub(crate) children: u32,
    pub(crate) child_weight: f64,
    pub(crate) child_sum: f64,
    pub(crate) child_counts: [u32; 6],
    /// None for a parent whose derived status is not terminal (it has no end yet).
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) duration: Option<f64>,
}

/// Everything an import writes besides the input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImportPlan {
    /// One per task, in the input's order.
    pub(crate) rows: Vec<ImportRow>,
    /// The upgrade's tasks per status.
    pub(crate) counts: [i64; 6],
    pub(crate) top_weight: f64,
    pub(crate) top_sum: f64,
    /// History samples (task index, seconds, per-step seconds): each timed, completed leaf
    /// task, oldest completion first. A task that ended at the instant it started (completed
    /// straight from not_started) is not timed.
    pub(crate) samples: Vec<(usize, f64, Option<f64>)>,
}

/// Plans the import of `tasks` (parents before children, as `check_import` requires): a parent
/// that is not among the tasks before its child, or an id given twice, is `InvalidInput`.
pub(crate) fn plan(tasks: &[Task]) -> Result<ImportPlan> {
    let mut seen: HashMap<&str, (usize, u32)> = HashMap::with_capacity(tasks.len());
    let mut rows = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        let (parent, depth) = match &t.parent_task_id {
            None => (None, 0),
            Some(p) => {
                let (k, d) = seen.get(p.as_str()).copied().ok_or_else(|| {
                    Error::invalid(format!(
                        "task {:?} names parent {p:?}, which is not among the tasks before it",
                        t.task_id
                    ))
                })?;
                (Some(k), d + 1)
            }
        };
        if seen.insert(&t.task_id, (i, depth)).is_some() {
            return Err(Error::invalid(format!(
                "task {:?} appears twice",
                t.task_id
            )));
        }
        rows.push(ImportRow {
            parent,
            depth,
            status: t.status,
            percentage: 0.0,
            children: 0,
            child_weight: 0.0,
            child_sum: 0.0,
            child_counts: [0; 6],
            completed_at: t.completed_at,
            duration: t.duration,
        });
    }
    // Rebuild the rollup sums and the derived statuses bottom-up (parents come first, so walk
    // backwards): a parent's effective percentage and status depend on its children's.
    let mut counts = [0i64; 6];
    let (mut top_weight, mut top_sum) = (0.0, 0.0);
    for (i, t) in tasks.iter().enumerate().rev() {
        let r = &mut rows[i];
        if r.children > 0 {
            r.status = machine::derived_status(r.child_counts, t.started_at.is_some());
            if !r.status.is_terminal() {
                r.completed_at = None;
                r.duration = None;
            }
        }
        counts[r.status.index()] += 1;
        r.percentage =
            machine::effective_percentage(r.status, t.percentage, r.child_weight, r.child_sum);
        let (status, pct) = (r.status, r.percentage);
        match r.parent {
            Some(p) => {
                let p = &mut rows[p];
                p.children += 1;
                p.child_weight += t.weight;
                p.child_sum += t.weight * pct;
                p.child_counts[status.index()] += 1;
            }
            None => {
                top_weight += t.weight;
                top_sum += t.weight * pct;
            }
        }
    }
    let mut samples: Vec<(usize, f64, Option<f64>)> = tasks
        .iter()
        .enumerate()
        .filter(|(i, _)| rows[*i].children == 0)
        .filter_map(|(i, t)| {
            let started = matches!((t.started_at, t.completed_at), (Some(s), Some(c)) if c > s);
            history::sample_of(t, started).map(|(d, s)| (i, d, s))
        })
        .collect();
    samples.sort_by_key(|(i, _, _)| tasks[*i].completed_at);
    Ok(ImportPlan {
        rows,
        counts,
        top_weight,
        top_sum,
        samples,
    })
}
