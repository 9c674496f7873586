//! Artifacts: test sessions, collections and the artifacts in them (reference `TestSession`,
//! `ArtifactCollection`, `TestArtifact`, `ArtifactType`, `ArtifactStatus`), the session summary
//! and statistics.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::progress::{JsonMap, names};
use crate::error::Error;

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $wire:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }

            pub(crate) fn code(self) -> i64 {
                self as i64
            }

            pub(crate) fn from_code(code: i64) -> Option<$name> {
                $name::ALL.get(usize::try_from(code).ok()?).copied()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    Error::invalid(format!(
                        "invalid {} {s:?}: expected one of {}",
                        stringify!($name).to_lowercase().replace("artifact", "artifact "),
                        names($name::ALL.iter().map(|v| v.as_str()))
                    ))
                })
            }
        }
    };
}

wire_enum! {
    /// What an artifact holds (reference `ArtifactType`).
    ArtifactType {
        /// A log file (the default).
        LogFile => "log_file",
        /// Test results, e.g. JUnit XML.
        TestResult => "test_result",
        /// A configuration file.
        Configuration => "configuration",
        /// A screenshot.
        Screenshot => "screenshot",
        /// Metrics dump.
        MetricsData => "metrics_data",
        /// A backup.
        Backup => "backup",
        /// A report.
        Report => "report",
        /// Diagnostic bundle.
        Diagnostic => "diagnostic",
    }
}

wire_enum! {
    /// Where an artifact stands (reference `ArtifactStatus`).
    ArtifactStatus {
        /// Stored locally.
        Created => "created",
        /// Also stored in S3.
        Uploaded => "uploaded",
        /// Archived.
        Archived => "archived",
        /// Deleted (the index row is kept as a record).
        Deleted => "deleted",
        /// Upload failed.
        Failed => "failed",
    }
}

/// A test session: the artifacts of one upgrade run (reference `TestSession`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestSession {
    /// Session id (UUID v7).
    pub session_id: String,
    /// The upgrade the session belongs to.
    pub upgrade_id: String,
    /// Cluster name.
    pub cluster_name: String,
    /// Display name (default `upgrade-{upgrade_id}-{YYYYmmdd-HHMMSS}`).
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// When the session was created.
    pub started_at: DateTime<Utc>,
    /// When it was completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// Days to keep the session after completion.
    pub retention_days: u32,
}

/// A group of related artifacts in a session (reference `ArtifactCollection`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactCollection {
    /// Collection id (UUID v7).
    pub collection_id: String,
    /// The session.
    pub session_id: String,
    /// Name, unique within the session.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// The task the collection belongs to, if any.
    pub task_id: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// One stored file (reference `TestArtifact`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestArtifact {
    /// Artifact id (UUID v7).
    pub artifact_id: String,
    /// The session.
    pub session_id: String,
    /// The collection.
    pub collection_id: String,
    /// Name as given (sanitised; may contain `/` for files added from a directory).
    pub name: String,
    /// Name used on disk and in S3, unique within the collection: `name`, or `stem~N.ext` when
    /// another artifact with different bytes already has `name`.
    pub export_name: String,
    /// Description.
    pub description: Option<String>,
    /// What it holds.
    pub artifact_type: ArtifactType,
    /// Size in bytes.
    pub file_size: u64,
    /// Hex SHA-256 of the content.
    pub file_hash: String,
    /// Status.
    pub status: ArtifactStatus,
    /// S3 bucket, once uploaded.
    pub s3_bucket: Option<String>,
    /// S3 key, once uploaded.
    pub s3_key: Option<String>,
    /// `s3://bucket/key`, once uploaded.
    pub s3_url: Option<String>,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// When it was uploaded.
    pub uploaded_at: Option<DateTime<Utc>>,
    /// Task that produced it.
    pub task_id: Option<String>,
    /// Step that produced it.
    pub step_id: Option<String>,
    /// The upgrade (from the session).
    pub upgrade_id: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Caller metadata.
    pub metadata: JsonMap,
}

/// The reference session summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// The session.
    #[serde(flatten)]
    pub session: TestSession,
    /// Number of collections.
    pub collections_count: u64,
    /// Number of artifacts.
    pub total_artifacts: u64,
    /// Sum of artifact sizes.
    pub total_size_bytes: u64,
    /// Artifacts with status `uploaded`.
    pub uploaded_artifacts: u64,
    /// Artifact count per type.
    pub artifact_types: BTreeMap<ArtifactType, u64>,
}

/// Statistics over one session or all (reference `get_artifact_statistics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactStats {
    /// Number of artifacts.
    pub total_artifacts: u64,
    /// Sum of sizes.
    pub total_size_bytes: u64,
    /// Mean size (0 when empty).
    pub average_size_bytes: f64,
    /// Count per type.
    pub type_distribution: BTreeMap<ArtifactType, u64>,
    /// Count per status.
    pub status_distribution: BTreeMap<ArtifactStatus, u64>,
    /// Bytes per type.
    pub type_bytes: BTreeMap<ArtifactType, u64>,
    /// Number of sessions the statistics cover.
    pub sessions_searched: u64,
}

/// Search criteria; every field narrows the result (all of them must match).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArtifactQuery {
    /// Only this session.
    pub session_id: Option<String>,
    /// Only this collection.
    pub collection_id: Option<String>,
    /// Only this upgrade.
    pub upgrade_id: Option<String>,
    /// Only this type.
    pub artifact_type: Option<ArtifactType>,
    /// Only artifacts carrying all of these tags.
    pub tags: Vec<String>,
    /// Only this task.
    pub task_id: Option<String>,
    /// Only this status.
    pub status: Option<ArtifactStatus>,
    /// Case-insensitive substring of the name; with `*` or `?` a glob over the whole name.
    pub name: Option<String>,
    /// At least this many bytes.
    pub min_size: Option<u64>,
    /// At most this many bytes.
    pub max_size: Option<u64>,
    /// Added at or after this time.
    pub created_since: Option<DateTime<Utc>>,
    /// At most this many results (newest first); 0 means the default of
    /// [`DEFAULT_SEARCH_LIMIT`]; more than [`MAX_SEARCH_LIMIT`] is refused.
    pub limit: usize,
    /// Continue after this point: the `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Results per search page unless a limit is given.
pub const DEFAULT_SEARCH_LIMIT: usize = 100;
/// Most results per search page.
pub const MAX_SEARCH_LIMIT: usize = 10_000;

/// One page of search results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArtifactPage {
    /// The artifacts, newest first.
    pub artifacts: Vec<TestArtifact>,
    /// Where the next page starts (pass it as [`ArtifactQuery::cursor`]); `None` when this page
    /// holds the last match.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for t in ArtifactType::ALL {
            assert_eq!(t.as_str().parse::<ArtifactType>().unwrap(), *t);
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
            assert_eq!(ArtifactType::from_code(t.code()), Some(*t));
        }
        for s in ArtifactStatus::ALL {
            assert_eq!(s.as_str().parse::<ArtifactStatus>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let err = "logs".parse::<ArtifactType>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid artifact type \"logs\": expected one of log_file, test_result, configuration, \
             screenshot, metrics_data, backup, report, diagnostic"
        );
        let err = "gone".parse::<ArtifactStatus>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid artifact status \"gone\": expected one of created, uploaded, archived, \
             deleted, failed"
        );
    }
}
