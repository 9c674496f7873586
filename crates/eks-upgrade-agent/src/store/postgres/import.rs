//! Importing a whole upgrade into [`PostgresStore`](super::PostgresStore)
//! (`ProgressStore::import`), as the SQLite backend does: the rows of the plan of
//! `store/domain/import.rs` (rollups and derived statuses rebuilt bottom-up), then the events
//! staged for new `seq`s. The input was checked by `check_import` first.

use std::collections::HashMap;

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{ProgressEvent, Task, Upgrade};
use crate::store::domain::import;

pub(super) fn import_upgrade(
    tx: &mut Tx<'_, '_>,
    upgrade: &Upgrade,
    tasks: &[Task],
    events: &[ProgressEvent],
) -> Result<u64> {
    super::order::lock_upgrade_keys(tx)?;
    if upgrade_key(tx, &upgrade.upgrade_id).is_ok() {
        return Err(Error::AlreadyExists {
            what: format!("upgrade {:?}", upgrade.upgrade_id),
        });
    }
    let plan = import::plan(tasks)?;
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
            &plan.top_weight,
            &plan.top_sum,
            &plan.counts[0],
            &plan.counts[1],
            &plan.counts[2],
            &plan.counts[3],
            &plan.counts[4],
            &plan.counts[5],
        ],
    )? {
        Some(r) => r.get(0),
        None => {
            return Err(Error::AlreadyExists {
                what: format!("upgrade {:?}", upgrade.upgrade_id),
            });
        }
    };
    let mut tkeys: Vec<i64> = Vec::with_capacity(tasks.len());
    for (t, r) in tasks.iter().zip(&plan.rows) {
        let parent_tkey = r.parent.map(|p| tkeys[p]);
        let k: Vec<i64> = r.child_counts.iter().map(|c| i64::from(*c)).collect();
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
                    &i64::from(r.depth),
                    &status_code(r.status),
                    &r.percentage,
                    &t.current_step,
                    &t.total_steps.map(i64::from),
                    &i64::from(t.completed_steps),
                    &t.weight,
                    &i64::from(r.children),
                    &r.child_weight,
                    &r.child_sum,
                    &t.error_message,
                    &i64::from(t.retry_count),
                    &t.last_message,
                    &micros(t.created_at),
                    &t.started_at.map(micros),
                    &r.completed_at.map(micros),
                    &r.duration,
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
        tkeys.push(tkey);
    }
    let tkey_of: HashMap<&str, i64> = tasks
        .iter()
        .zip(&tkeys)
        .map(|(t, k)| (t.task_id.as_str(), *k))
        .collect();
    let mut staged = Staged::default();
    // Imported history counts: each timed, completed leaf task is a sample, oldest first.
    for (i, secs, per_step) in plan.samples {
        staged.samples.push(super::history::Sample {
            cluster: upgrade.cluster_name.clone(),
            task_id: tasks[i].task_id.clone(),
            secs,
            per_step,
        });
    }
    for e in events {
        let tkey = match &e.task_id {
            Some(t) => Some(
                tkey_of
                    .get(t.as_str())
                    .copied()
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
