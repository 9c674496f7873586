//! Storage backends for progress. [`ProgressStore`] is the boundary: every backend executes
//! [`Command`]s atomically (event appended with a store-wide increasing `seq`, current state
//! updated, in one transaction) and answers the read queries. [`SqliteStore`] is the embedded
//! default; `conformance` holds the suite every backend must pass.

use std::fmt;

use crate::error::Result;
use crate::model::{ProgressEvent, StatusChange, Task, Upgrade};
use crate::progress::command::Command;

pub mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

pub use sqlite::SqliteStore;

/// How hard a commit tries to survive failures. Both levels keep every acknowledged change when
/// the process is killed (`kill -9`) at any instant; they differ on power loss or an OS crash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// SQLite WAL with `synchronous=NORMAL`: a commit is in the OS page cache before it is
    /// acknowledged. Survives the process being killed; the last commits may be lost (never
    /// corrupted) on power loss. The default.
    #[default]
    ProcessCrash,
    /// SQLite WAL with `synchronous=FULL`: the WAL is fsynced on every commit (blob files too).
    /// Survives power loss, at the cost of one fsync per commit.
    PowerLoss,
}

impl std::str::FromStr for Durability {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "process_crash" | "process-crash" | "normal" => Ok(Durability::ProcessCrash),
            "power_loss" | "power-loss" | "full" => Ok(Durability::PowerLoss),
            _ => Err(crate::Error::invalid(format!(
                "invalid durability {s:?}: expected process_crash or power_loss"
            ))),
        }
    }
}

/// What one successfully executed command committed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Committed {
    /// The events appended, in `seq` order.
    pub events: Vec<ProgressEvent>,
    /// Status changes of tasks and upgrades the command caused.
    pub status_changes: Vec<StatusChange>,
}

impl Committed {
    /// The `seq` of the last event appended (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(0, |e| e.seq)
    }
}

/// Which events to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this upgrade's events (all upgrades when `None`).
    pub upgrade_id: Option<String>,
    /// Only events with `seq` strictly greater than this.
    pub since: u64,
    /// At most this many events, oldest first.
    pub limit: usize,
}

impl EventQuery {
    /// Events of one upgrade after `since`, at most `limit`.
    pub fn upgrade(upgrade_id: impl Into<String>, since: u64, limit: usize) -> Self {
        EventQuery {
            upgrade_id: Some(upgrade_id.into()),
            since,
            limit,
        }
    }
}

/// Current state and history of every upgrade.
///
/// Contract for implementations:
/// - [`execute`](ProgressStore::execute) runs each command atomically: a command that fails
///   changes nothing; one that succeeds appends its events with store-wide, strictly increasing
///   `seq` and updates the current state in the same transaction. All commands of one call
///   become durable together (group commit) before the call returns `Ok`; the returned vector
///   has one result per command, in order.
/// - Several processes may open the same store; writes never get lost or interleave mid-command.
/// - Reads never observe uncommitted state.
/// - Missing upgrades or tasks are [`Error::NotFound`](crate::Error::NotFound).
pub trait ProgressStore: Send + Sync + fmt::Debug {
    /// Executes `commands` in one durable transaction; see the trait docs.
    fn execute(&self, commands: &[Command]) -> Result<Vec<Result<Committed>>>;

    /// Writes a whole upgrade taken from elsewhere (import): the upgrade, its tasks (parents
    /// before children) and its history, which gets new `seq`s but keeps ids and timestamps.
    /// Fails with `AlreadyExists` if the upgrade exists.
    fn import(&self, upgrade: &Upgrade, tasks: &[Task], events: &[ProgressEvent]) -> Result<u64>;

    /// One upgrade.
    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade>;

    /// Every upgrade, oldest first.
    fn list_upgrades(&self) -> Result<Vec<Upgrade>>;

    /// The tasks of an upgrade, in the order they were added.
    fn tasks(&self, upgrade_id: &str) -> Result<Vec<Task>>;

    /// One task.
    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task>;

    /// The `limit` most recent events of a task, newest first. Costs O(limit).
    fn recent_task_events(
        &self,
        upgrade_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<ProgressEvent>>;

    /// Events matching `query`, oldest first.
    fn events(&self, query: &EventQuery) -> Result<Vec<ProgressEvent>>;

    /// The highest `seq` in the store (0 when empty).
    fn last_seq(&self) -> Result<u64>;
}
