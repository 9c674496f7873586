//! Importing a whole upgrade into [`PostgresStore`](super::PostgresStore)
//! (`ProgressStore::import`), as the SQLite backend does: the rollups and derived statuses
//! rebuilt bottom-up, then tasks written and the events staged for new `seq`s. The input was
//! checked by `check_import` first.

use std::collections::HashMap;

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{ProgressEvent, ProgressStatus, Task, Upgrade};
use crate::store::domain::machine;

pub(super) fn import_upgrade(
    tx: &mut Tx<'_, '_>,
    upgrade: &Upgrade,
    tasks: &[Task],
    events: &[ProgressEvent],
) -> Result<u64> {
    // Rebuild the rollup sums and the derived statuses bottom-up (tasks come parents first, so
    // walk them backwards): a parent's effective percentage and status depend on its
    // children's.
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.task_id.as_str(), i))
        .collect();
    let mut child = vec![(0u32, 0.0f64, 0.0f64); tasks.len()];
    let mut child_counts = vec![[0u32; 6]; tasks.len()];
    let mut status: Vec<ProgressStatus> = tasks.iter().map(|t| t.status).collect();
    let mut effective = vec![0.0f64; tasks.len()];
    let mut counts = [0i64; 6];
    let (mut top_w, mut top_s) = (0.0, 0.0);
    for (i, t) in tasks.iter().enumerate().rev() {
        let (n, cw, cs) = child[i];
        if n > 0 {
            status[i] = machine::derived_status(child_counts[i], t.started_at.is_some());
        }
        counts[status[i].index()] += 1;
        effective[i] = machine::effective_percentage(status[i], t.percentage, cw, cs);
        match t.parent_task_id.as_deref().and_then(|p| index.get(p)) {
            Some(&p) => {
                child[p].0 += 1;
                child[p].1 += t.weight;
                child[p].2 += t.weight * effective[i];
                child_counts[p][status[i].index()] += 1;
            }
            None => {
                top_w += t.weight;
                top_s += t.weight * effective[i];
            }
        }
    }
    let ukey: i64 = match tx.opt(
        "INSERT INTO upgrades (upgrade_id, plan_id, cluster_name, status, current_phase, \
         created_at, started_at, completed_at, error_message, metadata, top_weight, top_sum, \
         c0, c1, c2, c3, c4, c5) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         $13, $14, $15, $16, $17, $18) ON CONFLICT (upgrade_id) DO NOTHING RETURNING ukey",
        &[
            &upgrade.upgrade_id,
            &upgrade.plan_id,
            &upgrade.cluster_name,
            &status_code(upgrade.status),
            &upgrade.current_phase,
            &micros(upgrade.created_at),
            &upgrade.started_at.map(micros),
            &upgrade.completed_at.map(micros),
            &upgrade.error_message,
            &json_text(&upgrade.metadata),
            &top_w,
            &top_s,
            &counts[0],
            &counts[1],
            &counts[2],
            &counts[3],
            &counts[4],
            &counts[5],
        ],
    )? {
        Some(r) => r.get(0),
        None => {
            return Err(Error::AlreadyExists {
                what: format!("upgrade {:?}", upgrade.upgrade_id),
            });
        }
    };
    let mut tkeys: HashMap<&str, (i64, u32)> = HashMap::new();
    for (i, t) in tasks.iter().enumerate() {
        let (parent_tkey, depth) = match &t.parent_task_id {
            None => (None, 0),
            Some(p) => {
                let (k, d) = tkeys.get(p.as_str()).copied().ok_or_else(|| {
                    Error::invalid(format!(
                        "task {:?} names parent {p:?}, which is not among the tasks before it",
                        t.task_id
                    ))
                })?;
                (Some(k), d + 1)
            }
        };
        if tkeys.contains_key(t.task_id.as_str()) {
            return Err(Error::invalid(format!(
                "task {:?} appears twice",
                t.task_id
            )));
        }
        let (children, cw, cs) = child[i];
        let pct = effective[i];
        let k: Vec<i64> = child_counts[i].iter().map(|c| i64::from(*c)).collect();
        // A parent whose derived status is not terminal has no end yet.
        let (completed_at, duration) = if status[i].is_terminal() || children == 0 {
            (t.completed_at, t.duration)
        } else {
            (None, None)
        };
        let tkey: i64 = tx
            .one(
                "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, \
                 depth, status, percentage, current_step, total_steps, completed_steps, weight, \
                 children, child_weight, child_sum, error_message, retry_count, last_message, \
                 created_at, started_at, completed_at, duration, metadata, k0, k1, k2, k3, k4, \
                 k5) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30) \
                 RETURNING tkey",
                &[
                    &ukey,
                    &t.task_id,
                    &t.name,
                    &type_code(t.task_type),
                    &parent_tkey,
                    &t.parent_task_id,
                    &i64::from(depth),
                    &status_code(status[i]),
                    &pct,
                    &t.current_step,
                    &t.total_steps.map(i64::from),
                    &i64::from(t.completed_steps),
                    &t.weight,
                    &i64::from(children),
                    &cw,
                    &cs,
                    &t.error_message,
                    &i64::from(t.retry_count),
                    &t.last_message,
                    &micros(t.created_at),
                    &t.started_at.map(micros),
                    &completed_at.map(micros),
                    &duration,
                    &json_text(&t.metadata),
                    &k[0],
                    &k[1],
                    &k[2],
                    &k[3],
                    &k[4],
                    &k[5],
                ],
            )?
            .get(0);
        tkeys.insert(&t.task_id, (tkey, depth));
    }
    let mut staged = Staged::default();
    for e in events {
        let tkey = match &e.task_id {
            Some(t) => Some(
                tkeys
                    .get(t.as_str())
                    .map(|(k, _)| *k)
                    .ok_or_else(|| Error::invalid(format!("event names unknown task {t:?}")))?,
            ),
            None => None,
        };
        let mut event = e.clone();
        if uuid::Uuid::parse_str(&event.event_id).is_err() {
            event.event_id = uuid::Uuid::now_v7().to_string();
        }
        staged.push(ukey, tkey, event);
    }
    assign(tx, &mut [&mut staged])
}
