//! Importing a whole upgrade into [`SqliteStore`](super::SqliteStore) (`ProgressStore::import`):
//! the rollups and derived statuses rebuilt bottom-up, then tasks and events written with new
//! `seq`s. The input was checked by `check_import` first.

use std::collections::HashMap;

use rusqlite::{Transaction, params};
use uuid::Uuid;

use super::progress::*;
use crate::error::{Error, Result};
use crate::model::{ProgressEvent, ProgressStatus, Task, Upgrade};
use crate::store::domain::{history, machine};

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
        top_w,
        top_s,
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        counts[5]
    ])?;
    let ukey = tx.last_insert_rowid();
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
        let (children, cw, cs) = child[i];
        let pct = effective[i];
        let k = child_counts[i];
        // A parent whose derived status is not terminal has no end yet.
        let (completed_at, duration) = if status[i].is_terminal() || children == 0 {
            (t.completed_at, t.duration)
        } else {
            (None, None)
        };
        tx.prepare_cached(
            "INSERT INTO tasks (ukey, task_id, name, task_type, parent_tkey, parent_task_id, depth, \
             status, percentage, current_step, total_steps, completed_steps, weight, children, \
             child_weight, child_sum, error_message, retry_count, last_message, created_at, \
             started_at, completed_at, duration, metadata, k0, k1, k2, k3, k4, k5) VALUES (?1, ?2, \
             ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, \
             ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)",
        )
        .map_err(Error::from)
        .and_then(|mut s| {
            s.execute(params![
                ukey,
                t.task_id,
                t.name,
                type_code(t.task_type),
                parent_tkey,
                t.parent_task_id,
                depth,
                status_code(status[i]),
                pct,
                t.current_step,
                t.total_steps,
                t.completed_steps,
                t.weight,
                children,
                cw,
                cs,
                t.error_message,
                t.retry_count,
                t.last_message,
                micros(t.created_at),
                t.started_at.map(micros),
                completed_at.map(micros),
                duration,
                json_text(&t.metadata),
                k[0],
                k[1],
                k[2],
                k[3],
                k[4],
                k[5]
            ])
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Error::invalid(format!("task {:?} appears twice", t.task_id))
                }
                other => other.into(),
            })
        })?;
        tkeys.insert(&t.task_id, (tx.last_insert_rowid(), depth));
    }
    let mut last_seq = 0;
    let mut last_task_seq: HashMap<i64, i64> = HashMap::new();
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
    // Imported history counts: each timed, completed leaf task is a sample, oldest first. A
    // task that ended at the instant it started (completed straight from not_started) is not
    // timed.
    let mut timed: Vec<(&Task, f64, Option<f64>)> = tasks
        .iter()
        .enumerate()
        .filter(|(i, _)| child[*i].0 == 0)
        .filter_map(|(_, t)| {
            let started = matches!((t.started_at, t.completed_at), (Some(s), Some(c)) if c > s);
            history::sample_of(t, started).map(|(d, s)| (t, d, s))
        })
        .collect();
    timed.sort_by_key(|(t, _, _)| t.completed_at);
    for (t, secs, per_step) in timed {
        super::history::record(tx, &upgrade.cluster_name, &t.task_id, secs, per_step)?;
    }
    Ok(last_seq as u64)
}
