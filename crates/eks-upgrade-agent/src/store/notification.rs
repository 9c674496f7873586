//! The detail of a notification (what sinks deliver), built from the event that caused it: shared
//! by every backend's outbox, free of SQL.

use serde_json::json;

use crate::model::{JsonMap, ProgressEvent, ProgressStatus, Task, TestRun, Upgrade};
use crate::notify::detail_type;

/// The detail type and detail of the notification `event` deserves (`None`: it deserves none).
/// `from` is the status before the change; `upgrade` or `task` is the changed object.
pub(crate) fn detail(
    event: &ProgressEvent,
    from: Option<ProgressStatus>,
    cluster_name: &str,
    upgrade: Option<&Upgrade>,
    task: Option<&Task>,
) -> Option<(&'static str, JsonMap)> {
    let kind = detail_type(event.kind, from)?;
    let mut d = JsonMap::new();
    d.insert("event_id".into(), json!(event.event_id));
    d.insert("seq".into(), json!(event.seq));
    d.insert("upgrade_id".into(), json!(event.upgrade_id));
    d.insert("cluster_name".into(), json!(cluster_name));
    d.insert("status".into(), json!(event.status));
    d.insert("timestamp".into(), json!(event.timestamp));
    if let Some(u) = upgrade {
        d.insert("plan_id".into(), json!(u.plan_id));
        if let Some(p) = &u.current_phase {
            d.insert("phase".into(), json!(p));
        }
        if let (Some(s), Some(e)) = (u.started_at, u.completed_at) {
            d.insert(
                "duration".into(),
                json!(crate::model::seconds_between(s, e)),
            );
        }
        if let Some(e) = &u.error_message {
            d.insert("error_message".into(), json!(e));
        }
    }
    if let Some(t) = task {
        d.insert("task_id".into(), json!(t.task_id));
        d.insert("task_name".into(), json!(t.name));
        d.insert("task_type".into(), json!(t.task_type));
        d.insert("retry_count".into(), json!(t.retry_count));
        if let Some(x) = t.duration {
            d.insert("duration".into(), json!(x));
        }
        if let Some(e) = &t.error_message {
            d.insert("error_message".into(), json!(e));
        }
    }
    if let Some(m) = &event.message {
        d.insert("message".into(), json!(m));
    }
    Some((kind, d))
}

/// The event id and detail of the trace-only [`TEST_RUN_TRACE`](crate::notify::TEST_RUN_TRACE)
/// notification of a recorded run (written in the run's transaction; `seq` the upgrade's last
/// event's, 0 when the progress store does not track it).
pub(crate) fn run_trace(run: &TestRun, seq: i64) -> (String, JsonMap) {
    let mut d = JsonMap::new();
    let event_id = format!("{}/trace", run.run_id);
    d.insert("event_id".into(), json!(event_id));
    d.insert("seq".into(), json!(seq));
    d.insert("upgrade_id".into(), json!(run.upgrade_id));
    d.insert("cluster_name".into(), json!(run.cluster_name));
    d.insert("run_id".into(), json!(run.run_id));
    d.insert("phase".into(), json!(run.phase.as_str()));
    d.insert("timestamp".into(), json!(run.created_at));
    (event_id, d)
}
