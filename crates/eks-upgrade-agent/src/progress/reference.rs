//! Import and export of the reference design's progress file (`upgrade_<id>.json`), so users of
//! the Python implementation can move their history over and tools that read those files keep
//! working.
//!
//! The reference wrote pydantic models with `json.dump(..., default=str)`: timestamps as Python
//! `str(datetime)` (`2025-10-20 05:25:00.869209+00:00`), durations as `str(timedelta)`
//! (`0:00:00.000780`), enums by value, `null` for missing fields, tasks as an object keyed by
//! task id, each task with its own `events`. Export writes every reference field under its
//! reference name (`overall_percentage`, task and event `percentage`, `duration` as
//! `str(timedelta)`), plus a few of ours (`created_at`, `weight`, `subtasks`, `metadata`, the event's
//! `event_type` and `seq`, upgrade-level `events`) that the reference's models ignore. Import
//! also takes ISO 8601 / RFC 3339 timestamps, durations in seconds, tasks as a list, and the
//! older spellings (`name` for `task_name`, `progress_percentage` for `percentage`, `phase` for
//! `current_phase`).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::{EventKind, JsonMap, ProgressEvent, ProgressStatus, Task, TaskType, Upgrade};
use crate::progress::tracker::ProgressTracker;
use crate::store::domain::command::{check_id, check_name, check_percentage};

/// The reference file name of an upgrade: `upgrade_<id>.json`.
pub fn file_name(upgrade_id: &str) -> String {
    format!("upgrade_{upgrade_id}.json")
}

/// Formats a time the way Python's `str(datetime)` does.
pub fn py_datetime(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string()
}

/// Formats seconds the way Python's `str(timedelta)` does (`H:MM:SS[.ffffff]`, with days).
/// Out-of-range values (not finite, negative, beyond a century) are clamped into
/// `0..=100 years` so the output always parses back.
pub fn py_timedelta(seconds: f64) -> String {
    let seconds = if seconds.is_finite() {
        seconds.clamp(0.0, crate::store::domain::command::MAX_DURATION_SECS)
    } else {
        0.0
    };
    let micros = (seconds * 1e6).round() as i64;
    let (sign, micros) = if micros < 0 {
        ("-", -micros)
    } else {
        ("", micros)
    };
    let days = micros / 86_400_000_000;
    let rest = micros % 86_400_000_000;
    let (h, m, s, us) = (
        rest / 3_600_000_000,
        rest / 60_000_000 % 60,
        rest / 1_000_000 % 60,
        rest % 1_000_000,
    );
    let mut out = String::from(sign);
    if days > 0 {
        out.push_str(&format!("{days} day{}, ", if days == 1 { "" } else { "s" }));
    }
    out.push_str(&format!("{h}:{m:02}:{s:02}"));
    if us > 0 {
        out.push_str(&format!(".{us:06}"));
    }
    out
}

/// Parses a Python `str(datetime)`, ISO 8601 or RFC 3339 time; naive times are taken as UTC.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    Err(Error::invalid(format!(
        "invalid time {s:?}: expected e.g. 2025-10-20 05:25:00.869209+00:00 or 2025-10-20T05:25:00Z"
    )))
}

/// Parses a Python `str(timedelta)` (`0:00:00.000780`, `2 days, 1:00:00`) into seconds.
pub fn parse_timedelta(s: &str) -> Result<f64> {
    let bad = || {
        Error::invalid(format!(
            "invalid duration {s:?}: expected e.g. 0:00:00.000780 or 1 day, 2:03:04"
        ))
    };
    let s = s.trim();
    let (days, clock) = match s.split_once(',') {
        Some((d, rest)) => {
            let d = d.trim();
            let n = d
                .strip_suffix(" days")
                .or_else(|| d.strip_suffix(" day"))
                .ok_or_else(bad)?;
            (n.trim().parse::<f64>().map_err(|_| bad())?, rest.trim())
        }
        None => (0.0, s),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let [h, m, sec] = parts.as_slice() else {
        return Err(bad());
    };
    let h: f64 = h.parse().map_err(|_| bad())?;
    let m: f64 = m.parse().map_err(|_| bad())?;
    let sec: f64 = sec.parse().map_err(|_| bad())?;
    Ok(days * 86_400.0 + h * 3600.0 + m * 60.0 + sec)
}

fn time_value(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(py_datetime(t)))
}

fn event_value(e: &ProgressEvent) -> Value {
    json!({
        "event_id": e.event_id,
        "timestamp": py_datetime(e.timestamp),
        "task_id": e.task_id,
        "task_type": e.task_type,
        "status": e.status,
        "message": e.message,
        "details": e.details,
        "percentage": e.percentage,
        "event_type": e.kind,
        "seq": e.seq,
    })
}

/// Builds the reference JSON of one upgrade. Each task carries its events (oldest first);
/// upgrade-level events are in the top-level `events` list.
pub fn export(tracker: &ProgressTracker, upgrade_id: &str) -> Result<Value> {
    let upgrade = tracker.upgrade(upgrade_id)?;
    let tasks = tracker.tasks(upgrade_id)?;
    let mut per_task: HashMap<String, Vec<Value>> = HashMap::new();
    let mut upgrade_events = Vec::new();
    let mut since = 0;
    loop {
        let page = tracker.events_since(Some(upgrade_id), since, 10_000)?;
        let Some(last) = page.last() else { break };
        since = last.seq;
        for e in &page {
            match &e.task_id {
                Some(t) => per_task.entry(t.clone()).or_default().push(event_value(e)),
                None => upgrade_events.push(event_value(e)),
            }
        }
    }
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for t in &tasks {
        if let Some(p) = &t.parent_task_id {
            children.entry(p).or_default().push(&t.task_id);
        }
    }
    let mut task_map = Map::new();
    for t in &tasks {
        task_map.insert(
            t.task_id.clone(),
            json!({
                "task_id": t.task_id,
                "task_name": t.name,
                "task_type": t.task_type,
                "status": t.status,
                "created_at": py_datetime(t.created_at),
                "percentage": t.percentage,
                "current_step": t.current_step,
                "total_steps": t.total_steps,
                "completed_steps": t.completed_steps,
                "started_at": time_value(t.started_at),
                "completed_at": time_value(t.completed_at),
                "duration": t.duration.map(py_timedelta),
                "error_message": t.error_message,
                "retry_count": t.retry_count,
                "parent_task_id": t.parent_task_id,
                "subtasks": children.get(t.task_id.as_str()).cloned().unwrap_or_default(),
                "weight": t.weight,
                "events": per_task.remove(&t.task_id).unwrap_or_default(),
                "metadata": t.metadata,
            }),
        );
    }
    let now = Utc::now();
    Ok(json!({
        "upgrade_id": upgrade.upgrade_id,
        "plan_id": upgrade.plan_id,
        "cluster_name": upgrade.cluster_name,
        "status": upgrade.status,
        "current_phase": upgrade.current_phase,
        "overall_percentage": upgrade.overall_percentage,
        "created_at": py_datetime(upgrade.created_at),
        "started_at": time_value(upgrade.started_at),
        "completed_at": time_value(upgrade.completed_at),
        "duration": upgrade.duration_seconds(now).map(py_timedelta),
        "estimated_completion": time_value(upgrade.estimated_completion(now)),
        "error_message": upgrade.error_message,
        "tasks": Value::Object(task_map),
        "events": upgrade_events,
        "metadata": upgrade.metadata,
    }))
}

// --- import ---------------------------------------------------------------------------------

struct Obj<'a> {
    what: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(what: String, v: &'a Value) -> Result<Obj<'a>> {
        match v {
            Value::Object(map) => Ok(Obj { what, map }),
            other => Err(Error::invalid(format!(
                "{what} must be a JSON object, got {}",
                kind(other)
            ))),
        }
    }

    fn get(&self, names: &[&str]) -> Option<&'a Value> {
        names
            .iter()
            .find_map(|n| self.map.get(*n))
            .filter(|v| !v.is_null())
    }

    fn string(&self, names: &[&str]) -> Result<Option<String>> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Error::invalid(format!(
                "{}: field {} must be a string, got {}",
                self.what,
                names[0],
                kind(other)
            ))),
        }
    }

    fn required(&self, names: &[&str]) -> Result<String> {
        self.string(names)?
            .ok_or_else(|| Error::invalid(format!("{}: missing field {}", self.what, names[0])))
    }

    fn number(&self, names: &[&str]) -> Result<Option<f64>> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(Error::invalid(format!(
                "{}: field {} must be a number, got {}",
                self.what,
                names[0],
                kind(other)
            ))),
        }
    }

    fn uint(&self, names: &[&str]) -> Result<Option<u32>> {
        match self.number(names)? {
            None => Ok(None),
            Some(n) if n >= 0.0 && n <= f64::from(u32::MAX) && n.fract() == 0.0 => {
                Ok(Some(n as u32))
            }
            Some(n) => Err(Error::invalid(format!(
                "{}: field {} must be a non-negative integer, got {n}",
                self.what, names[0]
            ))),
        }
    }

    fn time(&self, names: &[&str]) -> Result<Option<DateTime<Utc>>> {
        self.string(names)?
            .map(|s| {
                parse_time(&s)
                    .map_err(|e| Error::invalid(format!("{}: {}: {e}", self.what, names[0])))
            })
            .transpose()
    }

    fn duration(&self, names: &[&str]) -> Result<Option<f64>> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) => parse_timedelta(s)
                .map(Some)
                .map_err(|e| Error::invalid(format!("{}: {}: {e}", self.what, names[0]))),
            Some(other) => Err(Error::invalid(format!(
                "{}: field {} must be a duration, got {}",
                self.what,
                names[0],
                kind(other)
            ))),
        }
    }

    fn map(&self, names: &[&str]) -> Result<JsonMap> {
        match self.get(names) {
            None => Ok(JsonMap::new()),
            Some(Value::Object(m)) => Ok(m.clone()),
            Some(other) => Err(Error::invalid(format!(
                "{}: field {} must be an object, got {}",
                self.what,
                names[0],
                kind(other)
            ))),
        }
    }

    fn status(&self, names: &[&str]) -> Result<Option<ProgressStatus>> {
        self.string(names)?
            .map(|s| {
                enum_value(&s)
                    .parse()
                    .map_err(|e| Error::invalid(format!("{}: {e}", self.what)))
            })
            .transpose()
    }

    fn task_type(&self, names: &[&str]) -> Result<Option<TaskType>> {
        self.string(names)?
            .map(|s| {
                enum_value(&s)
                    .parse()
                    .map_err(|e| Error::invalid(format!("{}: {e}", self.what)))
            })
            .transpose()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `ProgressStatus.IN_PROGRESS` / `IN_PROGRESS` / `in_progress` -> `in_progress`.
fn enum_value(s: &str) -> String {
    s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase()
}

/// What an import produced, before it is written.
#[derive(Debug)]
pub struct Imported {
    /// The upgrade.
    pub upgrade: Upgrade,
    /// Its tasks, parents before children.
    pub tasks: Vec<Task>,
    /// Its history, oldest first.
    pub events: Vec<ProgressEvent>,
}

/// Parses a reference progress file. Nothing is written; see [`import`].
pub fn parse(text: &str) -> Result<Imported> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| Error::invalid(format!("malformed JSON: {e}")))?;
    let u = Obj::new("upgrade".into(), &root)?;
    let upgrade_id = u.required(&["upgrade_id"])?;
    check_id("upgrade_id", &upgrade_id)?;
    let plan_id = u.string(&["plan_id"])?.unwrap_or_else(|| "unknown".into());
    check_id("plan_id", &plan_id)?;
    let cluster_name = u.required(&["cluster_name"])?;
    check_name("cluster_name", &cluster_name)?;
    let started_at = u.time(&["started_at"])?;
    let created_at = u
        .time(&["created_at"])?
        .or(started_at)
        .unwrap_or_else(Utc::now);

    let mut tasks = Vec::new();
    let mut events = Vec::new();
    let task_values: Vec<(Option<&String>, &Value)> = match u.get(&["tasks"]) {
        None => Vec::new(),
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (Some(k), v)).collect(),
        Some(Value::Array(a)) => a.iter().map(|v| (None, v)).collect(),
        Some(other) => {
            return Err(Error::invalid(format!(
                "upgrade: field tasks must be an object or an array, got {}",
                kind(other)
            )));
        }
    };
    for (key, v) in task_values {
        let what = format!("task {}", key.map_or("?", |k| k.as_str()));
        let t = Obj::new(what, v)?;
        let task_id = match t.string(&["task_id", "id"])? {
            Some(id) => id,
            None => key
                .cloned()
                .ok_or_else(|| Error::invalid(format!("{}: missing field task_id", t.what)))?,
        };
        check_id("task_id", &task_id)?;
        let name = t
            .string(&["task_name", "name"])?
            .unwrap_or_else(|| task_id.clone());
        check_name("task_name", &name)?;
        let percentage = t
            .number(&["percentage", "progress_percentage", "progress"])?
            .unwrap_or(0.0);
        check_percentage(percentage)
            .map_err(|e| Error::invalid(format!("task {task_id:?}: {e}")))?;
        let parent_task_id = t.string(&["parent_task_id", "parent_id"])?;
        if let Some(p) = &parent_task_id {
            check_id("parent_task_id", p)?;
        }
        let task = Task {
            upgrade_id: upgrade_id.clone(),
            task_type: t
                .task_type(&["task_type", "type"])?
                .unwrap_or(TaskType::UpgradeStep),
            parent_task_id,
            status: t.status(&["status"])?.unwrap_or(ProgressStatus::NotStarted),
            percentage,
            current_step: t.string(&["current_step"])?,
            total_steps: t.uint(&["total_steps"])?,
            completed_steps: t.uint(&["completed_steps"])?.unwrap_or(0),
            weight: t
                .number(&["weight"])?
                .filter(|w| w.is_finite() && *w > 0.0)
                .unwrap_or(1.0),
            children: 0,
            error_message: t.string(&["error_message"])?,
            retry_count: t.uint(&["retry_count"])?.unwrap_or(0),
            last_message: None,
            created_at: t
                .time(&["created_at"])?
                .or(t.time(&["started_at"])?)
                .unwrap_or(created_at),
            started_at: t.time(&["started_at"])?,
            completed_at: t.time(&["completed_at"])?,
            duration: t.duration(&["duration"])?,
            metadata: t.map(&["metadata"])?,
            name,
            task_id,
        };
        if let Some(Value::Array(evs)) = t.get(&["events"]) {
            for (i, ev) in evs.iter().enumerate() {
                events.push(parse_event(
                    &format!("task {:?} event {i}", task.task_id),
                    ev,
                    &upgrade_id,
                    Some(&task),
                )?);
            }
        }
        tasks.push(task);
    }
    if let Some(Value::Array(evs)) = u.get(&["events"]) {
        for (i, ev) in evs.iter().enumerate() {
            events.push(parse_event(&format!("event {i}"), ev, &upgrade_id, None)?);
        }
    }
    let tasks = order_tasks(tasks)?;
    // Every task event must name a task of this file.
    events.sort_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.seq.cmp(&b.seq)));
    let status = u.status(&["status"])?.unwrap_or(ProgressStatus::NotStarted);
    let mut counts = [0u64; 6];
    for t in &tasks {
        counts[t.status.index()] += 1;
    }
    let upgrade = Upgrade {
        upgrade_id,
        plan_id,
        cluster_name,
        status,
        current_phase: u.string(&["current_phase", "phase"])?,
        overall_percentage: 0.0,
        created_at,
        started_at,
        completed_at: u.time(&["completed_at"])?,
        error_message: u.string(&["error_message"])?,
        metadata: u.map(&["metadata"])?,
        task_counts: counts,
        last_seq: 0,
    };
    Ok(Imported {
        upgrade,
        tasks,
        events,
    })
}

fn parse_event(
    what: &str,
    v: &Value,
    upgrade_id: &str,
    task: Option<&Task>,
) -> Result<ProgressEvent> {
    let e = Obj::new(what.to_owned(), v)?;
    let task_id = e
        .string(&["task_id"])?
        .or_else(|| task.map(|t| t.task_id.clone()));
    let status = e
        .status(&["status"])?
        .unwrap_or(task.map_or(ProgressStatus::InProgress, |t| t.status));
    let kind = match e.string(&["event_type", "kind"])? {
        Some(k) => EventKind::ALL
            .into_iter()
            .find(|x| x.as_str() == k)
            .ok_or_else(|| Error::invalid(format!("{what}: unknown event_type {k:?}")))?,
        None if task_id.is_none() => EventKind::UpgradePhaseChanged,
        None => match status {
            ProgressStatus::Completed => EventKind::TaskCompleted,
            ProgressStatus::Failed => EventKind::TaskFailed,
            ProgressStatus::Paused => EventKind::TaskPaused,
            ProgressStatus::Cancelled => EventKind::TaskCancelled,
            ProgressStatus::NotStarted => EventKind::TaskAdded,
            ProgressStatus::InProgress => EventKind::TaskProgress,
        },
    };
    let percentage = e
        .number(&["percentage", "progress_percentage"])?
        .unwrap_or(0.0)
        .clamp(0.0, 100.0);
    Ok(ProgressEvent {
        seq: 0,
        event_id: e
            .string(&["event_id"])?
            .unwrap_or_else(|| Uuid::now_v7().to_string()),
        kind,
        upgrade_id: upgrade_id.to_owned(),
        timestamp: e
            .time(&["timestamp"])?
            .ok_or_else(|| Error::invalid(format!("{what}: missing field timestamp")))?,
        task_type: e.task_type(&["task_type"])?.or(task.map(|t| t.task_type)),
        task_id,
        status,
        message: e.string(&["message"])?,
        details: e.map(&["details"])?,
        percentage,
    })
}

/// Orders tasks parents first, otherwise keeping file order; rejects unknown parents,
/// duplicates and cycles.
fn order_tasks(tasks: Vec<Task>) -> Result<Vec<Task>> {
    let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    let parents: Vec<Option<&str>> = tasks.iter().map(|t| t.parent_task_id.as_deref()).collect();
    let order = crate::store::domain::machine::parents_first(&ids, &parents)?;
    let known: std::collections::HashSet<&str> = ids.iter().copied().collect();
    for t in &tasks {
        if let Some(p) = &t.parent_task_id
            && !known.contains(p.as_str())
        {
            return Err(Error::invalid(format!(
                "task {:?} names unknown parent {p:?}",
                t.task_id
            )));
        }
    }
    let mut children: HashMap<&str, u32> = HashMap::new();
    for t in &tasks {
        if let Some(p) = &t.parent_task_id {
            *children.entry(p.as_str()).or_default() += 1;
        }
    }
    let counts: Vec<u32> = tasks
        .iter()
        .map(|t| children.get(t.task_id.as_str()).copied().unwrap_or(0))
        .collect();
    let mut slots: Vec<Option<Task>> = tasks.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .filter_map(|i| {
            let mut t = slots[i].take()?;
            t.children = counts[i];
            Some(t)
        })
        .collect())
}

/// Parses and writes a reference progress file in one transaction; returns the upgrade id.
pub fn import(tracker: &ProgressTracker, text: &str) -> Result<String> {
    let imported = parse(text)?;
    for e in &imported.events {
        if let Some(t) = &e.task_id
            && !imported.tasks.iter().any(|x| &x.task_id == t)
        {
            return Err(Error::invalid(format!(
                "event {} names unknown task {t:?}",
                e.event_id
            )));
        }
    }
    tracker
        .store()
        .import(&imported.upgrade, &imported.tasks, &imported.events)?;
    Ok(imported.upgrade.upgrade_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_time_formats() {
        let t = parse_time("2025-10-20 05:25:00.869209+00:00").unwrap();
        assert_eq!(t.timestamp_micros() % 1_000_000, 869_209);
        assert_eq!(py_datetime(t), "2025-10-20 05:25:00.869209+00:00");
        assert_eq!(
            parse_time("2025-10-20T05:25:00Z").unwrap().timestamp(),
            t.timestamp()
        );
        assert_eq!(
            parse_time("2025-10-20T07:25:00+02:00").unwrap().timestamp(),
            t.timestamp()
        );
        assert_eq!(
            parse_time("2025-10-20 05:25:00").unwrap().timestamp(),
            t.timestamp()
        );
        assert!(
            parse_time("yesterday")
                .unwrap_err()
                .to_string()
                .contains("\"yesterday\"")
        );
    }

    #[test]
    fn python_timedelta_formats() {
        assert_eq!(parse_timedelta("0:00:00.000780").unwrap(), 0.00078);
        assert_eq!(parse_timedelta("1:02:03").unwrap(), 3723.0);
        assert_eq!(parse_timedelta("2 days, 0:00:01").unwrap(), 172_801.0);
        assert_eq!(py_timedelta(0.00078), "0:00:00.000780");
        assert_eq!(py_timedelta(3723.0), "1:02:03");
        assert_eq!(py_timedelta(90_000.0), "1 day, 1:00:00");
        assert!(parse_timedelta("soon").is_err());
    }

    #[test]
    fn task_order_and_cycles() {
        let text = r#"{"upgrade_id":"u","cluster_name":"c","tasks":{
            "b":{"task_name":"B","task_type":"upgrade_step","parent_task_id":"a"},
            "a":{"task_name":"A","task_type":"upgrade_step","parent_task_id":"c"},
            "c":{"task_name":"C","task_type":"upgrade_step","parent_task_id":"b"}}}"#;
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("parent cycle:"), "{err}");
        let text = r#"{"upgrade_id":"u","cluster_name":"c","tasks":{
            "b":{"task_name":"B","task_type":"ProgressStatus.X","parent_task_id":"a"}}}"#;
        assert!(parse(text).is_err());
        let text = r#"{"upgrade_id":"u","cluster_name":"c","tasks":{
            "b":{"task_name":"B","task_type":"UPGRADE_STEP","parent_task_id":"a"},
            "a":{"task_name":"A","task_type":"TaskType.VALIDATION"}}}"#;
        let imp = parse(text).unwrap();
        let ids: Vec<_> = imp.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(imp.tasks[0].task_type, TaskType::Validation);
        assert_eq!(imp.tasks[0].children, 1);
    }

    /// The issue's hostile reference files: each refused, nothing written.
    #[test]
    fn hostile_files_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::SqliteStore::open(dir.path(), &Default::default()).unwrap();
        let tracker = ProgressTracker::new(std::sync::Arc::new(store));
        let file = |tasks: Value, extra: Value| {
            let mut v = json!({"upgrade_id": "u", "cluster_name": "c", "status": "in_progress",
                               "tasks": tasks});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v.to_string()
        };
        let t = |extra: Value| {
            let mut v = json!({"task_name": "T", "task_type": "upgrade_step"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let chain: serde_json::Map<String, Value> = (0..25_000)
            .map(|i| {
                let parent = if i == 0 {
                    Value::Null
                } else {
                    json!(format!("t{}", i - 1))
                };
                (format!("t{i}"), t(json!({"parent_task_id": parent})))
            })
            .collect();
        let cases = [
            (
                "weight",
                file(json!({"a": t(json!({"weight": 1e308}))}), json!({})),
            ),
            ("levels deep", file(Value::Object(chain), json!({}))),
            (
                "exceeds total_steps",
                file(
                    json!({"a": t(json!({"total_steps": 2, "completed_steps": 9}))}),
                    json!({}),
                ),
            ),
            (
                "duration",
                file(
                    json!({"a": t(json!({"duration": "1e308 days, 0:00:00"}))}),
                    json!({}),
                ),
            ),
            (
                "upgrade_id",
                json!({"upgrade_id": "../../etc/x", "cluster_name": "c"}).to_string(),
            ),
            ("task_id", file(json!({"a/b": t(json!({}))}), json!({}))),
            (
                "current_phase",
                file(json!({}), json!({"current_phase": "p".repeat(100_000)})),
            ),
        ];
        for (needle, text) in cases {
            let err = import(&tracker, &text).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
            assert!(tracker.list_upgrades().unwrap().is_empty(), "{needle}");
        }
        assert_eq!(py_timedelta(f64::INFINITY), "0:00:00");
        assert_eq!(py_timedelta(-5.0), "0:00:00");
        assert!(parse_timedelta(&py_timedelta(1e300)).unwrap() <= 100.0 * 365.25 * 86_400.0);
    }

    #[test]
    fn truncated_json_is_reported() {
        let err = parse(r#"{"upgrade_id":"u","cluster_na"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("malformed JSON: EOF"), "{err}");
    }
}
