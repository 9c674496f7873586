//! Storage backends for progress. [`ProgressStore`] is the boundary: every backend executes
//! [`Command`]s atomically (event appended with a store-wide increasing `seq`, current state
//! updated, in one transaction) and answers the read queries. [`SqliteStore`] is the embedded
//! default; `crate::conformance` holds the suite every backend must pass.
//!
//! Layers: [`domain`] is the pure logic every backend executes (commands, the state machine,
//! rollup math); each backend lives in its own folder and depends only on `domain`, the traits
//! here and the model. Nothing in `store` imports from `progress`, which sits on top.

use std::fmt;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::blob::Digest;
use crate::error::Result;
use crate::model::{
    ArtifactCollection, ArtifactPage, ArtifactQuery, ArtifactStats, ArtifactStatus, ArtifactType,
    CaseAttempt, FlakyTest, HistoryEntry, JsonMap, NewRun, ProgressEvent, ProgressStatus, RunPhase,
    RunQuery, SessionSummary, StatusChange, Task, TestArtifact, TestResult, TestRun, TestSession,
    Upgrade,
};
use crate::store::domain::command::Command;
use crate::store::domain::history::TaskHistory;

pub mod copy;
pub mod domain;
pub(crate) mod notification;
pub mod postgres;
pub mod remote;
pub mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Kinds of generated ids that can be abbreviated ([`ArtifactIndex::resolve_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// A test session.
    Session,
    /// An artifact collection.
    Collection,
    /// An artifact.
    Artifact,
}

impl IdKind {
    /// `session`, `collection`, `artifact`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::Session => "session",
            IdKind::Collection => "collection",
            IdKind::Artifact => "artifact",
        }
    }
}

/// Fewest characters tables abbreviate an id to as a prefix.
pub const MIN_PREFIX: usize = 4;
/// Fewest characters of a suffix abbreviation (a prefix may be shorter).
pub const MIN_SUFFIX: usize = 6;
/// Most candidates an ambiguous abbreviation lists.
pub const MAX_CANDIDATES: usize = 10;

/// The answer to an abbreviated id, from the ids it matched (at most [`MAX_CANDIDATES`] + 1,
/// in the order to show): the one id, not found, or ambiguous listing the candidates. Both
/// backends answer through it.
pub(crate) fn one_match(what: &str, abbrev: &str, mut found: Vec<String>) -> Result<String> {
    use crate::error::Error;
    match found.len() {
        0 => Err(Error::not_found(format!("{what} {abbrev:?}"))),
        1 => Ok(found.pop().expect("one")),
        n => {
            let more = if n > MAX_CANDIDATES {
                found.truncate(MAX_CANDIDATES);
                ", ..."
            } else {
                ""
            };
            Err(Error::invalid(format!(
                "{what} id {abbrev:?} is ambiguous: it matches {}{more}; give more characters",
                found.join(", ")
            )))
        }
    }
}

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
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    /// The events appended, in `seq` order.
    pub events: Vec<ProgressEvent>,
    /// Status changes of tasks and upgrades the command caused.
    pub status_changes: Vec<StatusChange>,
    /// The task a task command names (`None` for other commands), as this command left it:
    /// what the API answers, with no read after the commit (which could see a later
    /// command's change). Not in the store protocol (`/api/v1/store/execute`): answers there
    /// stay as small as the events, and `RemoteStore` gives `None`.
    #[serde(skip)]
    pub task: Option<crate::model::Task>,
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
    /// Fails with `AlreadyExists` if the upgrade exists, and with `InvalidInput` (nothing
    /// written) unless it passes [`check_import`](crate::store::domain::command::check_import),
    /// which every implementation runs first.
    fn import(&self, upgrade: &Upgrade, tasks: &[Task], events: &[ProgressEvent]) -> Result<u64>;

    /// One upgrade.
    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade>;

    /// Every upgrade, oldest first (all pages of [`upgrades_page`](Self::upgrades_page)).
    fn list_upgrades(&self) -> Result<Vec<Upgrade>> {
        all_pages(
            |after| self.upgrades_page(after, MAX_PAGE),
            |u| &u.upgrade_id,
        )
    }

    /// At most `limit` upgrades, oldest first, after the upgrade `after` (from the first when
    /// `None`; `NotFound` when `after` names no upgrade). Costs O(limit).
    fn upgrades_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Upgrade>>;

    /// The tasks of an upgrade, in the order they were added (all pages of
    /// [`tasks_page`](Self::tasks_page)).
    fn tasks(&self, upgrade_id: &str) -> Result<Vec<Task>> {
        all_pages(
            |after| self.tasks_page(upgrade_id, after, MAX_PAGE),
            |t| &t.task_id,
        )
    }

    /// At most `limit` tasks of an upgrade, in the order they were added, after task `after`
    /// (from the first when `None`; `NotFound` when `after` names no task of it). Costs
    /// O(limit).
    fn tasks_page(&self, upgrade_id: &str, after: Option<&str>, limit: usize) -> Result<Vec<Task>>;

    /// One task.
    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task>;

    /// At most `limit` tasks of an upgrade in `status`, in the order they were added (the most
    /// recently added first when `newest_first`). The default pages through every task; a
    /// backend with an index on status answers in O(limit).
    fn tasks_in_status(
        &self,
        upgrade_id: &str,
        status: ProgressStatus,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Task>> {
        let mut out: Vec<Task> = self
            .tasks(upgrade_id)?
            .into_iter()
            .filter(|t| t.status == status)
            .collect();
        if newest_first {
            out.reverse();
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The `limit` most recent events of a task, newest first. Costs O(limit).
    fn recent_task_events(
        &self,
        upgrade_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<ProgressEvent>>;

    /// Events matching `query`, oldest first.
    fn events(&self, query: &EventQuery) -> Result<Vec<ProgressEvent>>;

    /// The `limit` most recent events of an upgrade, oldest first (timelines). Costs O(limit).
    fn latest_events(&self, upgrade_id: &str, limit: usize) -> Result<Vec<ProgressEvent>>;

    /// The highest `seq` in the store (0 when empty).
    fn last_seq(&self) -> Result<u64>;

    /// The duration history of `task_ids` on `cluster_name` and on every cluster, one entry per
    /// id, in order (ETA from history, stalled tasks; see [`domain::history`]). A backend that
    /// records history appends a sample in the same transaction as each completion of a timed
    /// leaf task, and for each completed leaf task of an import; reads cost one key lookup per
    /// id and scope. The default has no history, so estimates fall back to the rate.
    fn task_history(&self, cluster_name: &str, task_ids: &[&str]) -> Result<Vec<TaskHistory>> {
        let _ = cluster_name;
        Ok(vec![TaskHistory::default(); task_ids.len()])
    }
}

/// The most items one page of a listing holds (upgrades, tasks, events over HTTP): what one
/// request can make a server hold.
pub const MAX_PAGE: usize = 10_000;

/// Concatenates pages: `page(after)` returns the page after the item with that id.
fn all_pages<T>(
    mut page: impl FnMut(Option<&str>) -> Result<Vec<T>>,
    id: impl Fn(&T) -> &String,
) -> Result<Vec<T>> {
    let mut out: Vec<T> = Vec::new();
    loop {
        let after = out.last().map(|x| id(x).clone());
        let next = page(after.as_deref())?;
        let full = next.len() >= MAX_PAGE;
        out.extend(next);
        if !full {
            return Ok(out);
        }
    }
}

/// Why [`ArtifactIndex::insert_artifacts`] refused to index a digest (the source of its
/// [`Error::Backend`](crate::Error::Backend)): a release of the blob (another replica's gc,
/// cleanup or delete) is in progress, or finished after this add stored the bytes. The bytes
/// the add stored may be gone: it waits for the release
/// ([`ArtifactIndex::await_blob_release`]), stores them again and indexes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobReleased(pub Digest);

impl fmt::Display for BlobReleased {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blob sha256:{} was released by a concurrent deletion",
            self.0
        )
    }
}

impl std::error::Error for BlobReleased {}

impl BlobReleased {
    /// The digest `e` says was released, if it is that refusal.
    pub fn of(e: &crate::Error) -> Option<Digest> {
        match e {
            crate::Error::Backend {
                source: Some(s), ..
            } => s.downcast_ref::<BlobReleased>().map(|b| b.0),
            _ => None,
        }
    }
}

/// An artifact to index; its blob is already stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewArtifact {
    /// New artifact id.
    pub artifact_id: String,
    /// The collection it goes into.
    pub collection_id: String,
    /// Sanitised name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Type.
    pub artifact_type: ArtifactType,
    /// Size.
    pub file_size: u64,
    /// Digest of the stored blob.
    pub digest: Digest,
    /// Task id.
    pub task_id: Option<String>,
    /// Step id.
    pub step_id: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub metadata: JsonMap,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// Queue it for upload right away (`auto_upload`).
    pub queue_upload: bool,
}

/// A session due for removal, as planned by [`ArtifactIndex::expired_sessions`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpiredSession {
    /// The session.
    pub session: TestSession,
    /// When its retention ended.
    pub expired_at: DateTime<Utc>,
    /// Whether its upgrade failed (retention was multiplied).
    pub upgrade_failed: bool,
    /// Its artifacts.
    pub artifacts: u64,
    /// Their total size.
    pub bytes: u64,
}

/// The artifact index: sessions, collections, artifacts, tags and the name index.
///
/// Contract: every mutation is one transaction; lookups of unknown ids are `NotFound`;
/// [`insert_artifacts`](ArtifactIndex::insert_artifacts) is idempotent for the same
/// (collection, name, digest) and never reuses another artifact's `export_name`; searches are
/// served by indexes and return newest first.
pub trait ArtifactIndex: Send + Sync + fmt::Debug {
    /// The full id that `abbrev` names: the id itself, else the one id it is a prefix of, else
    /// (6 characters or more) the one id it is a suffix of. An abbreviation of several ids is
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) listing them (at most [`MAX_CANDIDATES`]); of none,
    /// [`Error::NotFound`](crate::Error::NotFound). Backends without abbreviations take ids only in full.
    fn resolve_id(&self, kind: IdKind, abbrev: &str) -> Result<String> {
        let _ = kind;
        Ok(abbrev.to_owned())
    }
    /// The shortest abbreviation of `id` that [`resolve_id`](Self::resolve_id) resolves to it
    /// (a prefix of at least [`MIN_PREFIX`] characters, or a suffix of at least [`MIN_SUFFIX`]),
    /// for tables. Backends without abbreviations return the id.
    fn abbreviate(&self, kind: IdKind, id: &str) -> Result<String> {
        let _ = kind;
        Ok(id.to_owned())
    }
    /// Creates a session.
    fn create_session(&self, session: &TestSession) -> Result<()>;
    /// Creates `session` unless its upgrade has a session already, and returns the upgrade's
    /// latest session (`session` itself when it was created). One write transaction,
    /// serialized per upgrade (SQLite: the single writer; PostgreSQL: an advisory lock of the
    /// upgrade id held to the commit, taken before the upgrade's sessions are read), so
    /// callers racing for an upgrade's first session (ingests on several replicas) end with
    /// one session, all of them using it.
    fn create_first_session(&self, session: &TestSession) -> Result<TestSession>;
    /// One session.
    fn session(&self, session_id: &str) -> Result<TestSession>;
    /// Sessions, oldest first, optionally of one upgrade.
    fn sessions(&self, upgrade_id: Option<&str>) -> Result<Vec<TestSession>>;
    /// Marks a session completed (idempotent: keeps the first completion time).
    fn complete_session(&self, session_id: &str, at: DateTime<Utc>) -> Result<TestSession>;
    /// The reference session summary.
    fn session_summary(&self, session_id: &str) -> Result<SessionSummary>;
    /// Creates a collection; its name must be unique in the session.
    fn create_collection(&self, collection: &ArtifactCollection) -> Result<()>;
    /// One collection.
    fn collection(&self, collection_id: &str) -> Result<ArtifactCollection>;
    /// The collections of a session, oldest first.
    fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>>;
    /// Indexes artifacts in one transaction. `blob_present` is asked whether each digest is
    /// stored, so a concurrent garbage collection cannot race the add: inside the transaction
    /// on SQLite; before it on a shared database (no S3 call inside a transaction), which then
    /// refuses ([`BlobReleased`]) a digest whose release is in progress or finished after the
    /// check began.
    fn insert_artifacts(
        &self,
        artifacts: &[NewArtifact],
        blob_present: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<TestArtifact>>;
    /// One artifact.
    fn artifact(&self, artifact_id: &str) -> Result<TestArtifact>;
    /// One page of the artifacts matching `query`, newest first, from `query.cursor` on.
    fn search(&self, query: &ArtifactQuery) -> Result<ArtifactPage>;
    /// Statistics over one session or all.
    fn stats(&self, session_id: Option<&str>) -> Result<ArtifactStats>;
    /// Calls `f` for every artifact (of one session, or all), oldest first, a page at a time.
    fn for_each_artifact(
        &self,
        session_id: Option<&str>,
        f: &mut dyn FnMut(TestArtifact) -> Result<()>,
    ) -> Result<()>;
    /// Completed sessions whose retention has passed at `as_of`; sessions of failed upgrades
    /// are kept `failed_factor` times longer.
    fn expired_sessions(
        &self,
        as_of: DateTime<Utc>,
        failed_factor: u32,
    ) -> Result<Vec<ExpiredSession>>;
    /// Removes a session's rows; returns the digests its artifacts used.
    fn delete_session(&self, session_id: &str) -> Result<Vec<Digest>>;
    /// [`delete_session`](Self::delete_session) when no artifact of the session is live
    /// (all are `deleted` records), checked in the same write transaction; `None` (nothing
    /// removed) when one is.
    fn delete_session_if_empty(&self, session_id: &str) -> Result<Option<Vec<Digest>>>;
    /// Marks `deleted`, in one write transaction, up to `limit` reports of ingests whose run
    /// was never recorded: live `test_result` artifacts created before `created_before` whose
    /// metadata still has [`PENDING_RUN_KEY`] naming no test run (what an ingest leaves when
    /// both its record and its undo fail). Returns them as they were, for the caller to
    /// release their bytes. Each is locked before its run is looked up, and
    /// [`TestResultStore::record_run`] checks its artifacts are live under the same lock
    /// (refusing the run otherwise), so a run and the removal of its report never both commit.
    fn delete_orphan_reports(
        &self,
        created_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TestArtifact>>;
    /// Calls `delete` for each digest no live artifact references, so that no add of the
    /// digest can be indexed trusting bytes the deletion removes; returns the digests deleted.
    /// SQLite calls it inside its one write transaction (one process owns the data dir). A
    /// shared database never calls it inside a transaction: it commits a release mark first,
    /// which adds of the digest wait for (see `store/postgres/releases.rs`, G105).
    fn delete_unreferenced(
        &self,
        digests: &[Digest],
        delete: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<Digest>>;
    /// The digests of `digests` that no live artifact references now (what `gc` counts
    /// without deleting).
    fn unreferenced(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.delete_unreferenced(digests, &|_| Ok(true))
    }
    /// Waits (at most `timeout`) until no release of `digest` is in progress, taking over
    /// the mark of a deleter that stopped before it finished (older than the bound after which
    /// its delete can no longer land). An add whose index transaction failed with
    /// [`BlobReleased`] calls it, then stores the bytes again and indexes again. Backends
    /// whose deletions run inside their write transaction return at once.
    fn await_blob_release(&self, digest: &Digest, timeout: std::time::Duration) -> Result<()> {
        let _ = (digest, timeout);
        Ok(())
    }
    /// Digests whose release a deleter left unfinished (it stopped, or its delete failed)
    /// and that nobody can be finishing now; `gc` finishes them.
    fn stale_blob_releases(&self) -> Result<Vec<Digest>> {
        Ok(Vec::new())
    }
    /// Number of artifacts per task of an upgrade.
    fn artifact_counts_by_task(&self, upgrade_id: &str) -> Result<HashMap<String, u64>>;
    /// Sets an artifact's status.
    fn set_artifact_status(
        &self,
        artifact_id: &str,
        status: ArtifactStatus,
    ) -> Result<TestArtifact>;
    /// Writes a whole session taken from elsewhere (a pulled manifest), keeping its ids, in one
    /// transaction; `AlreadyExists` if the session is there.
    fn import_session(
        &self,
        session: &TestSession,
        collections: &[ArtifactCollection],
        artifacts: &[TestArtifact],
    ) -> Result<()>;
}

/// What happened to one notification at one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Delivered.
    Delivered,
    /// Failed; try again at `next_at`.
    Retry {
        /// When to try again.
        next_at: DateTime<Utc>,
        /// Why it failed.
        error: String,
    },
    /// Given up (rejected as undeliverable, or out of attempts); kept, never dropped.
    Dead {
        /// Why.
        error: String,
    },
}

/// The notification outbox, written by the same transactions as the changes it reports.
///
/// Contract: delivery state is per sink name; [`due`](Outbox::due) returns pending entries in
/// outbox order, skipping every later entry of an upgrade whose earlier entry is waiting for a
/// retry (so each upgrade's notifications arrive in `seq` order).
pub trait Outbox: Send + Sync + fmt::Debug {
    /// Makes notifications this sink has not seen yet, of the `kinds` it takes, pending for
    /// it; returns how many (the others are passed over for good).
    fn ingest(&self, sink: &str, kinds: crate::notify::Kinds) -> Result<u64>;
    /// Entries due at `now`, at most `limit`, with their attempt counts.
    fn due(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(crate::notify::Notification, u32)>>;
    /// Records outcomes.
    fn record(&self, sink: &str, outcomes: &[(u64, DeliveryOutcome)]) -> Result<()>;
    /// Counts and last error for a sink (of the notifications of the `kinds` it takes).
    fn sink_status(
        &self,
        sink: &str,
        kinds: crate::notify::Kinds,
    ) -> Result<crate::notify::SinkStatus>;
    /// How long a claim of [`due`](Outbox::due) lasts before another process may take the
    /// entry (none: claims do not expire; one process delivers). A deliverer whose pass may
    /// last longer [`renew`](Outbox::renew)s its claims meanwhile.
    fn lease(&self) -> Option<std::time::Duration> {
        None
    }
    /// Extends this store's claims on `nids` (still pending) by another lease; returns how
    /// many it still held.
    fn renew(&self, _sink: &str, _nids: &[u64]) -> Result<u64> {
        Ok(0)
    }
}

/// Which artifacts `artifacts upload` queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadSelector {
    /// Every artifact.
    All,
    /// One session's.
    Session(String),
    /// One artifact.
    Artifact(String),
    /// Failed uploads only (what `--retry-failed` alone retries).
    Failed,
}

/// The result of one upload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Stored in S3.
    Uploaded {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Failed; retried automatically at `next_at` (`None`: only with `--retry-failed`).
    Failed {
        /// Why.
        error: String,
        /// When to retry.
        next_at: Option<DateTime<Utc>>,
    },
}

/// The durable upload queue: upload state is kept in the index, so a crash or a kill loses
/// nothing and the next run finishes what was pending.
pub trait UploadQueue: Send + Sync + fmt::Debug {
    /// Queues artifacts not yet uploaded (and failed ones with `retry_failed`); returns how many.
    fn queue_uploads(&self, selector: &UploadSelector, retry_failed: bool) -> Result<u64>;
    /// Claims up to `limit` due uploads for `owner` until `lease_until`, atomically: queued
    /// artifacts and failed ones whose retry time has come, that no other uploader holds a
    /// live lease on (an expired lease, left by a crashed uploader, is taken over). Oldest
    /// first, with the number of attempts so far. Two concurrent uploaders never claim the
    /// same artifact while a lease lasts.
    fn claim_uploads(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(TestArtifact, u32)>>;
    /// Extends every claim of `owner` on a queued entry to `lease_until` (the heartbeat of a
    /// live uploader); returns the artifacts whose claims it extended. An entry the uploader
    /// claimed that is not among them was lost (its lease ran out and another took it over, or
    /// it was settled or deleted): the uploader stops working on it.
    fn renew_upload_claims(&self, owner: &str, lease_until: DateTime<Utc>) -> Result<Vec<String>>;
    /// Due artifacts that other uploaders hold a live lease on at `now`.
    fn claimed_by_others(&self, owner: &str, now: DateTime<Utc>) -> Result<u64>;
    /// Number and bytes of queued artifacts.
    fn pending_uploads(&self) -> Result<(u64, u64)>;
    /// Records an attempt of `owner` (and releases its claim); returns the artifact as it now
    /// is. Only while the entry is still queued and claimed by `owner` (the claim is the
    /// fencing token): a late outcome from an uploader that lost its lease changes nothing,
    /// whether another uploader holds the entry now or already recorded a failure of its own,
    /// and a recorded upload is never reopened.
    fn record_upload(
        &self,
        owner: &str,
        artifact_id: &str,
        outcome: &UploadOutcome,
    ) -> Result<TestArtifact>;
}

/// The metadata key an ingest marks the reports it keeps with, naming its run until the run
/// is recorded ([`TestResultStore::record_run`] removes it in the run's transaction): a
/// report still marked long after is one whose run and undo both failed, which
/// [`ArtifactIndex::delete_orphan_reports`] removes. Reserved: not for users' metadata.
pub const PENDING_RUN_KEY: &str = "eua_pending_run";

/// The error of a run whose report was deleted before the run was recorded.
pub(crate) fn report_deleted(id: &str) -> crate::Error {
    crate::Error::invalid(format!(
        "report artifact {id:?} was deleted before its run was recorded (gc removes the reports \
         of ingests whose run was not recorded after an hour): ingest the report again"
    ))
}

/// What [`TestResultStore::record_run`]'s source feeds attempts to.
pub type AttemptSink<'a> = dyn FnMut(CaseAttempt) -> Result<()> + 'a;

/// Test runs and their results (issue #12): a run is one ingest of JUnit reports for an
/// upgrade, its cluster and a phase; each test's records fold into one result.
///
/// Contract: [`record_run`](TestResultStore::record_run) is one transaction: it calls `source`
/// once with a sink that takes the attempts in order (streamed: a backend keeps no more than
/// one in memory), and stores nothing when `source` or the sink fails (the error is returned as
/// is); records
/// of one test (same [`test_id`](crate::model::test_id)) fold into one result whose status is
/// the last attempt's, `attempts` their count and `flaky` "passed after a failed attempt". The
/// same transaction updates the cluster's per-test flaky statistics and, for a `post` run that
/// fails [`Gate::judge`](crate::model::Gate::judge) against the upgrade's latest `pre` run,
/// writes an `upgrade.validation_failed` notification to the outbox. Unknown run ids are
/// `NotFound`. A run naming an artifact (`artifact_ids`) of the same store that is `deleted`
/// (removed by [`ArtifactIndex::delete_orphan_reports`] while the run was being ingested) is
/// refused (`InvalidInput`), the artifact's row locked while it is checked; the run's
/// artifacts lose their [`PENDING_RUN_KEY`] in the same transaction. History, flaky
/// tests and the durations behind duration regressions are index walks, never scans of all
/// results.
pub trait TestResultStore: Send + Sync + fmt::Debug {
    /// Records a run; see the trait's contract.
    fn record_run(
        &self,
        run: &NewRun,
        source: &mut dyn FnMut(&mut AttemptSink<'_>) -> Result<()>,
    ) -> Result<TestRun>;
    /// The full id of the run `abbrev` names (the id, or the one id it is a prefix of, 4+
    /// characters).
    fn resolve_run(&self, abbrev: &str) -> Result<String>;
    /// One run.
    fn run(&self, run_id: &str) -> Result<TestRun>;
    /// Runs, newest first.
    fn runs(&self, query: &RunQuery) -> Result<Vec<TestRun>>;
    /// The latest run of an upgrade in a phase.
    fn latest_run(&self, upgrade_id: &str, phase: RunPhase) -> Result<Option<TestRun>>;
    /// A run's results (only failed and error ones with `failing_only`), sorted by suite,
    /// class name and name.
    fn results(&self, run_id: &str, failing_only: bool) -> Result<Vec<TestResult>>;
    /// Results of the tests named `name` (exact name, or a test id), newest first, at most
    /// `limit`, of one cluster when given.
    fn history(
        &self,
        name: &str,
        cluster_name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>>;
    /// Tests that passed and failed on a cluster (every cluster when `None`) since `since`, and
    /// have not passed [`FLAKY_CLEARED_AFTER`](crate::model::FLAKY_CLEARED_AFTER) times in a row
    /// since; sorted by cluster, suite, class name and name.
    fn flaky(&self, cluster_name: Option<&str>, since: DateTime<Utc>) -> Result<Vec<FlakyTest>>;
    /// The tests of `run_id`'s cluster that were flaky (as [`flaky`](TestResultStore::flaky)
    /// says) before that run: its own results are not counted when it is the cluster's latest.
    fn flaky_before(&self, run_id: &str, since: DateTime<Utc>) -> Result<HashSet<String>>;
    /// For each of `test_ids`: the durations of its passing results on `cluster_name` in runs
    /// recorded before `before_run`, newest first, at most `limit` each.
    fn passing_durations(
        &self,
        cluster_name: &str,
        before_run: &str,
        test_ids: &[&str],
        limit: usize,
    ) -> Result<HashMap<String, Vec<f64>>>;
}

#[cfg(test)]
mod layering {
    //! The store layers, read from the sources: nothing in `store` imports from `progress`
    //! (which sits on top), and `domain` imports only `model`, `error` and itself. Test code
    //! (`*tests.rs` files, a file's `#[cfg(test)] mod tests`) may drive a backend through the
    //! tracker and is not counted.

    use std::path::Path;

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && !path.to_str().unwrap().ends_with("tests.rs")
            {
                out.push(path);
            }
        }
    }

    /// The top-level modules of the crate a source text names (`crate::x`, `crate::{x, y}`).
    fn crate_modules(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + 7..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                out.extend(
                    group
                        .split(',')
                        .map(|s| s.trim().split("::").next().unwrap().to_owned()),
                );
            } else {
                let name = rest
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap();
                out.push(name.to_owned());
            }
        }
        out
    }

    #[test]
    fn store_depends_only_downward() {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/store"));
        let mut all = Vec::new();
        files(root, &mut all);
        assert!(all.len() >= 10, "{all:?}");
        let mut bad = Vec::new();
        for path in &all {
            let text = std::fs::read_to_string(path).unwrap();
            // A file's own test module may drive the backend through the tracker.
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let in_domain = path.starts_with(root.join("domain"));
            for m in crate_modules(text) {
                let allowed = if in_domain {
                    matches!(m.as_str(), "model" | "error" | "store")
                } else {
                    m != "progress"
                };
                if !allowed {
                    bad.push(format!("{} imports crate::{m}", path.display()));
                }
            }
            if in_domain && text.contains("crate::store::") {
                for (i, _) in text.match_indices("crate::store::") {
                    if !text[i..].starts_with("crate::store::domain")
                        && !text[i..].starts_with("crate::store::ProgressStore")
                    {
                        bad.push(format!("{} reaches into a backend", path.display()));
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{bad:#?}");
    }
}
