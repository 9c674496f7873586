//! Importing a whole upgrade into [`SqliteStore`](super::SqliteStore) (`ProgressStore::import`):
//! the rows of the plan of `store/domain/import.rs` (rollups and derived statuses rebuilt
//! bottom-up, history samples), then the events with new `seq`s. The input was checked by
//! `check_import` first.

use std::collections::HashMap;

use rusqlite::{Transaction, params};
use uuid::Uuid;

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{ProgressEvent, Task, Upgrade};
use crate::store::domain::import;

pub(super) fn import_upgrade(
    tx: &Transaction<'_>,
    upgrade: &Upgrade,
    tasks: &[Task],
    events: &[ProgressEvent],
) -> Result<u64> {
    if upgrade_key(tx, &upgrade.upgrade_id).is_ok() {
        return Err(Error::AlreadyExists {
            what: format!("upgrade {:?}", upgrade.upgrade_id),
        });
    }
    let plan = import::plan(tasks)?;
    tx.prepare_cached(
        "INSERT INTO upgrades (upgrade_id, plan_id, cluster_name, status, current_phase, created_at, \
         started_at, completed_at, error_message, metadata, top_weight, top_sum, \
         c0, c1, c2, c3, c4, c5) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )?
    .execute(params![
        upgrade.upgrade_id,
        upgrade.plan_id,
        upgrade.cluster_name,
        status_code(upgrade.status),
        upgrade.current_phase,
        micros(upgrade.created_at),
        upgrade.started_at.map(micros),
        upgrade.completed_at.map(micros),
        upgrade.error_message,
        json_text(&upgrade.metadata),
        plan.top_weight,
        plan.top_sum,
        plan.counts[0],
        plan.counts[1],
        plan.counts[2],
        plan.counts[3],
        plan.counts[4],
        plan.counts[5]
    ])?;
    let ukey = tx.last_insert_rowid();
    let mut tkeys: Vec<i64> = Vec::with_capacity(tasks.len());
    for (t, r) in tasks.iter().zip(&plan.rows) {
        let parent_tkey = r.parent.map(|p| tkeys[p]);
        let k = r.child_counts;
        tx.prepare_cached(
            "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, depth, \
             status, percentage, current_step, total_steps, completed_steps, weight, children, \
             child_weight, child_sum, error_message, retry_count, last_message, created_at, \
             started_at, completed_at, duration, metadata, k0, k1, k2, k3, k4, k5) VALUES (?1, ?2, \
             ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, \
             ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)",
        )?
        .execute(params![
                ukey,
                t.task_id,
                t.name,
                type_code(t.task_type),
                parent_tkey,
                t.parent_task_id,
                r.depth,
                status_code(r.status),
                r.percentage,
                t.current_step,
                t.total_steps,
                t.completed_steps,
                t.weight,
                r.children,
                r.child_weight,
                r.child_sum,
                t.error_message,
                t.retry_count,
                t.last_message,
                micros(t.created_at),
                t.started_at.map(micros),
                r.completed_at.map(micros),
                r.duration,
                json_text(&t.metadata),
                k[0],
                k[1],
                k[2],
                k[3],
                k[4],
                k[5]
            ])?;
        tkeys.push(tx.last_insert_rowid());
    }
    let tkey_of: HashMap<&str, i64> = tasks
        .iter()
        .zip(&tkeys)
        .map(|(t, k)| (t.task_id.as_str(), *k))
        .collect();
    let mut last_seq = 0;
    let mut last_task_seq: HashMap<i64, i64> = HashMap::new();
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
        let prev = tkey.and_then(|k| last_task_seq.get(&k).copied());
        let event_id = Uuid::parse_str(&e.event_id).ok();
        let (seq, _) = insert_event(
            tx,
            &NewEvent {
                ukey,
                tkey,
                prev_task_seq: prev,
                kind: e.kind,
                status: e.status,
                ts: e.timestamp,
                message: e.message.as_deref(),
                details: Some(&e.details),
                percentage: e.percentage,
                event_id,
            },
        )?;
        if let Some(k) = tkey {
            last_task_seq.insert(k, seq);
        }
        last_seq = seq;
    }
    for (tkey, seq) in &last_task_seq {
        tx.prepare_cached("UPDATE tasks SET last_event_seq = ?2 WHERE tkey = ?1")?
            .execute(params![tkey, seq])?;
    }
    tx.prepare_cached("UPDATE upgrades SET last_seq = ?2 WHERE ukey = ?1")?
        .execute(params![ukey, last_seq])?;
    // Imported history counts: each timed, completed leaf task is a sample, oldest first.
    for (i, secs, per_step) in plan.samples {
        let task_id = &tasks[i].task_id;
        super::history::record(tx, &upgrade.cluster_name, task_id, secs, per_step)?;
    }
    Ok(last_seq as u64)
}
