//! Notifications that are never lost. A change that deserves a notification writes it to the
//! outbox (`notifications` table) in the same transaction as the change (see
//! [`crate::store::sqlite`]); a [`Dispatcher`] later delivers it to every configured
//! [`EventSink`], at least once, in `seq` order per upgrade, with a stable id for deduplication.
//!
//! Notification types: the reference seven (`upgrade.started`, `upgrade.completed`,
//! `upgrade.failed`, `upgrade.phase_changed`, `task.started`, `task.completed`, `task.failed`)
//! plus `task.paused`, `task.cancelled` and `task.retried`, and `upgrade.validation_failed` (a
//! post-upgrade test run failed its gate; written by the run's transaction, see
//! [`crate::store::TestResultStore`]). Percentage updates are not notified.
//!
//! Trace-only types start with [`TRACE_ONLY_PREFIX`]: only sinks that take [`Kinds::All`] (the
//! OTLP sink) ever see them; for the others they are not in the outbox at all (not ingested,
//! not counted by `notify status`). One so far: [`TEST_RUN_TRACE`], written by every recorded
//! test run (any phase, any result, whenever recorded) in the run's transaction.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::Result;
use crate::model::{EventKind, JsonMap, ProgressStatus};

pub mod dispatcher;
#[cfg(feature = "aws")]
pub mod eventbridge;
pub mod memory;
pub mod otlp;
pub mod webhook;

pub use dispatcher::{Dispatcher, DispatcherOptions, SinkStatus};
#[cfg(feature = "aws")]
pub use eventbridge::EventBridgeSink;
pub use memory::InMemoryEventSink;
pub use otlp::OtlpSink;
pub use webhook::WebhookSink;

/// Default `Source` of EventBridge entries and CloudEvents.
pub const DEFAULT_SOURCE: &str = "eks-upgrade-agent";

/// The prefix of trace-only notification types (see the module documentation).
pub const TRACE_ONLY_PREFIX: &str = "trace.";
/// A test run was recorded (the detail names it by `run_id`): trace-only.
pub const TEST_RUN_TRACE: &str = "trace.test_run";

/// Which notifications a sink takes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kinds {
    /// Every type but the trace-only ones (EventBridge, webhooks).
    #[default]
    Events,
    /// Every type (the OTLP sink).
    All,
}

impl Kinds {
    /// Whether a sink of these kinds takes notifications of `detail_type`.
    pub fn takes(self, detail_type: &str) -> bool {
        self == Kinds::All || !detail_type.starts_with(TRACE_ONLY_PREFIX)
    }
}

/// The notification type of an event, if it deserves one. `from` is the status before the event
/// (an update that implicitly starts a task is a `task.started`).
pub fn detail_type(kind: EventKind, from: Option<ProgressStatus>) -> Option<&'static str> {
    Some(match kind {
        EventKind::UpgradeStarted => "upgrade.started",
        EventKind::UpgradeCompleted => "upgrade.completed",
        EventKind::UpgradeFailed => "upgrade.failed",
        EventKind::UpgradePhaseChanged => "upgrade.phase_changed",
        EventKind::TaskStarted => "task.started",
        EventKind::TaskProgress | EventKind::TaskStep
            if from == Some(ProgressStatus::NotStarted) =>
        {
            "task.started"
        }
        EventKind::TaskCompleted => "task.completed",
        EventKind::TaskFailed => "task.failed",
        EventKind::TaskPaused => "task.paused",
        EventKind::TaskCancelled => "task.cancelled",
        EventKind::TaskRetried => "task.retried",
        _ => return None,
    })
}

/// One notification from the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Outbox row id (delivery order).
    pub nid: u64,
    /// Stable id (the event's id): consumers deduplicate on it.
    pub event_id: String,
    /// The event's seq.
    pub seq: u64,
    /// The upgrade.
    pub upgrade_id: String,
    /// E.g. `task.failed`.
    pub detail_type: String,
    /// When the change was committed.
    pub time: DateTime<Utc>,
    /// The reference `Detail` fields plus `event_id` and `seq`.
    pub detail: JsonMap,
}

/// How a sink encodes notifications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The reference envelope: `Source`, `DetailType`, `Detail` (JSON).
    #[default]
    Reference,
    /// CloudEvents 1.0 structured JSON.
    Cloudevents,
}

impl std::str::FromStr for Format {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "reference" => Ok(Format::Reference),
            "cloudevents" => Ok(Format::Cloudevents),
            _ => Err(crate::Error::invalid(format!(
                "invalid event format {s:?}: expected reference or cloudevents"
            ))),
        }
    }
}

impl Notification {
    /// The reference envelope as JSON (`Source`, `DetailType`, `Detail` as an object, `Time`,
    /// `Id`).
    pub fn reference(&self, source: &str) -> Value {
        json!({
            "Id": self.event_id,
            "Source": source,
            "DetailType": self.detail_type,
            "Time": self.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "Detail": self.detail,
        })
    }

    /// The CloudEvents 1.0 structured form.
    pub fn cloudevent(&self, source: &str) -> Value {
        json!({
            "specversion": "1.0",
            "id": self.event_id,
            "source": source,
            "type": format!("com.{source}.{}.v1", self.detail_type),
            "time": self.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "subject": match self.detail.get("task_id").and_then(Value::as_str) {
                Some(t) => format!("upgrades/{}/tasks/{t}", self.upgrade_id),
                None => format!("upgrades/{}", self.upgrade_id),
            },
            "datacontenttype": "application/json",
            "data": self.detail,
        })
    }

    /// Encodes in `format`.
    pub fn encode(&self, format: Format, source: &str) -> Value {
        match format {
            Format::Reference => self.reference(source),
            Format::Cloudevents => self.cloudevent(source),
        }
    }
}

/// The outcome of delivering one notification of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    /// Delivered.
    Delivered,
    /// Not delivered; worth retrying (throttling, outage, timeout).
    Retry(String),
    /// Not delivered and never will be (malformed, too large): dead-letter it.
    Reject(String),
}

/// Somewhere notifications go.
///
/// Contract: [`deliver`](EventSink::deliver) returns one result per notification, in order;
/// an error of the whole call (endpoint down) is reported as `Retry` for every entry. Sinks
/// never drop silently: anything not `Delivered` stays in the outbox.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// A stable name for this sink (delivery state is kept per name). It may hold secrets (a
    /// webhook's URL): show [`label`](EventSink::label) instead.
    fn name(&self) -> &str;
    /// The sink's name as shown to people (status, metrics, logs, error messages): no secrets.
    fn label(&self) -> &str {
        self.name()
    }
    /// Which notifications this sink takes in (trace-only types only with [`Kinds::All`]).
    fn kinds(&self) -> Kinds {
        Kinds::Events
    }
    /// Most notifications per call.
    fn max_batch(&self) -> usize {
        10
    }
    /// Most bytes per call (encoded).
    fn max_batch_bytes(&self) -> usize {
        256 * 1024
    }
    /// Delivers a batch.
    fn deliver(&self, batch: &[Notification]) -> Vec<EntryResult>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Notification {
        let mut detail = JsonMap::new();
        detail.insert("task_id".into(), json!("t1"));
        Notification {
            nid: 1,
            event_id: "e1".into(),
            seq: 7,
            upgrade_id: "u1".into(),
            detail_type: "task.failed".into(),
            time: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            detail,
        }
    }

    #[test]
    fn formats() {
        let r = n().reference("eks-upgrade-agent");
        assert_eq!(r["DetailType"], "task.failed");
        assert_eq!(r["Source"], "eks-upgrade-agent");
        assert_eq!(r["Detail"]["task_id"], "t1");
        let c = n().cloudevent("eks-upgrade-agent");
        assert_eq!(c["type"], "com.eks-upgrade-agent.task.failed.v1");
        assert_eq!(c["specversion"], "1.0");
        assert_eq!(c["subject"], "upgrades/u1/tasks/t1");
        assert_eq!(c["time"], "2026-01-01T00:00:00.000000Z");
        assert!("xml".parse::<Format>().is_err());
    }

    #[test]
    fn which_events_notify() {
        use EventKind::*;
        assert_eq!(
            detail_type(TaskProgress, Some(ProgressStatus::InProgress)),
            None
        );
        assert_eq!(
            detail_type(TaskProgress, Some(ProgressStatus::NotStarted)),
            Some("task.started")
        );
        assert_eq!(detail_type(TaskAdded, None), None);
        assert_eq!(detail_type(UpgradeCreated, None), None);
        assert_eq!(
            detail_type(UpgradePhaseChanged, None),
            Some("upgrade.phase_changed")
        );
        assert_eq!(detail_type(TaskRetried, None), Some("task.retried"));
    }
}

#[cfg(test)]
mod dispatch_tests;
