//! Progress tracking and test artifacts for the EKS Upgrade Agent.
//!
//! An EKS upgrade is a long tree of tasks. [`ProgressTracker`] records every change to it as one
//! durable transaction: an event with a store-wide, strictly increasing `seq` is appended and the
//! current state (task percentages rolled up the tree, per-status counters) is updated in place,
//! so updates cost O(depth) however large the upgrade and its history grow. Storage sits behind
//! the [`store::ProgressStore`] trait; [`SqliteStore`] (SQLite in WAL mode) is the embedded
//! default and survives `kill -9` after every acknowledged call.
//!
//! ```
//! use std::sync::Arc;
//! use eks_upgrade_agent::{ProgressTracker, SqliteStore, store::sqlite::SqliteOptions};
//! use eks_upgrade_agent::model::TaskType;
//! use eks_upgrade_agent::progress::NewTask;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let tracker = ProgressTracker::new(Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default())?));
//! tracker.create_upgrade("u1", "plan-1", "prod-eu", Default::default())?;
//! tracker.start_upgrade("u1", Some("control-plane"))?;
//! tracker.add_tasks("u1", vec![
//!     NewTask::new("nodes", "Node groups", TaskType::UpgradeStep),
//!     NewTask::new("ng-1", "ng-1", TaskType::UpgradeStep).parent("nodes"),
//!     NewTask::new("ng-2", "ng-2", TaskType::UpgradeStep).parent("nodes"),
//! ])?;
//! tracker.update_task("u1", "ng-1", 50.0, Some("draining"), Default::default())?;
//! assert_eq!(tracker.task_detail("u1", "nodes")?.task.percentage, 25.0);
//! assert_eq!(tracker.summary("u1")?.overall_percentage, 25.0);
//! # Ok::<(), eks_upgrade_agent::Error>(())
//! ```
//!
//! The crate knows nothing about HTTP, command lines or AWS SDK types: the server and CLI crates
//! convert to and from its types.

pub mod artifacts;
pub mod blob;
pub mod config;
#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
pub mod conformance;
pub mod error;
pub mod model;
pub mod net;
pub mod notify;
pub mod progress;
pub mod results;
pub mod store;
pub mod units;

#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
#[cfg_attr(not(test), allow(dead_code))]
pub mod test_support;

pub use artifacts::TestArtifactsManager;
pub use error::{Error, Result};
pub use progress::ProgressTracker;
pub use results::TestResults;
pub use store::SqliteStore;
