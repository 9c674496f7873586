//! [`TestArtifactsManager`] (reference `TestArtifactsManager`): sessions, collections and
//! artifacts over an [`ArtifactIndex`] and a [`BlobStore`].
//!
//! Adding a file streams it once into the blob store (hashing as it copies), then indexes it.
//! Bytes are stored once per digest. Within a collection, adding the same name with the same
//! bytes returns the existing artifact (idempotent); the same name with different bytes keeps
//! both: a new artifact id, the same `name`, and a distinct `export_name` (`stem~2.ext`, ...)
//! used on disk and in S3. Nothing ever overwrites another artifact's bytes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::blob::{BlobStore, Digest};
use crate::error::{Error, Result};
use crate::model::{
    ArtifactCollection, ArtifactQuery, ArtifactStats, ArtifactType, JsonMap, SessionSummary,
    TestArtifact, TestSession,
};
use crate::store::domain::command::{check_id, check_json, check_name, check_text};
use crate::store::{ArtifactIndex, ExpiredSession, NewArtifact};

#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
pub mod conformance;
#[cfg(feature = "aws")]
mod export;
pub mod manifest;
pub mod names;
#[cfg(feature = "aws")]
pub mod upload;

pub use export::{ExportSource, export_session_from, write_atomically};

/// Default days a completed session is kept.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;
/// Files indexed per transaction when adding a directory.
const INDEX_BATCH: usize = 256;
/// How many times an add stores a blob again after concurrent releases of it (G105).
const RESTORES: u32 = 3;
/// How long an add waits for a concurrent release of one of its blobs to end.
const RELEASE_WAIT: Duration = Duration::from_secs(30);
/// Most tags per artifact, and longest tag.
pub const MAX_TAGS: usize = 64;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 128;

/// Settings of a [`TestArtifactsManager`].
#[derive(Debug, Clone)]
pub struct ArtifactsOptions {
    /// Retention of new sessions unless given.
    pub default_retention_days: u32,
    /// Sessions of failed upgrades are kept this many times longer.
    pub failed_retention_factor: u32,
    /// `gc` leaves unreferenced blobs younger than this alone (an add may be about to index
    /// them).
    pub gc_grace: Duration,
    /// Queue every added artifact for upload to S3 (reference `auto_upload`).
    pub auto_upload: bool,
    /// `gc` removes the reports of ingests whose run was never recorded (`test_result`
    /// artifacts whose `metadata.run_id` names no run) once they are this old; younger ones
    /// may belong to an ingest still in progress.
    pub orphan_report_age: Duration,
}

impl Default for ArtifactsOptions {
    fn default() -> Self {
        ArtifactsOptions {
            default_retention_days: DEFAULT_RETENTION_DAYS,
            failed_retention_factor: 3,
            gc_grace: Duration::from_secs(600),
            auto_upload: false,
            orphan_report_age: ORPHAN_REPORT_AGE,
        }
    }
}

/// Default [`ArtifactsOptions::orphan_report_age`]: an hour.
pub const ORPHAN_REPORT_AGE: Duration = Duration::from_secs(3600);

/// A session to create.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// The upgrade.
    pub upgrade_id: String,
    /// The cluster.
    pub cluster_name: String,
    /// Name [default: `upgrade-{upgrade_id}-{YYYYmmdd-HHMMSS}`].
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Retention [default: the manager's].
    pub retention_days: Option<u32>,
}

/// Options of an add.
#[derive(Debug, Clone, Default)]
pub struct AddOptions {
    /// Type [default: `log_file`, as in the reference].
    pub artifact_type: Option<ArtifactType>,
    /// Name [default: the file name; for a directory, a prefix for the relative paths].
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Task id.
    pub task_id: Option<String>,
    /// Step id.
    pub step_id: Option<String>,
    /// Metadata.
    pub metadata: JsonMap,
}

/// Progress of a long add or export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Files done.
    pub files_done: u64,
    /// Files in all.
    pub files_total: u64,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes in all.
    pub bytes_total: u64,
}

/// What [`TestArtifactsManager::export_session`] did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportReport {
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Artifacts that could not be exported (id, reason).
    pub failures: Vec<(String, String)>,
}

/// What [`TestArtifactsManager::verify`] found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Blobs read and hashed.
    pub blobs_checked: u64,
    /// Bytes read.
    pub bytes_checked: u64,
    /// Artifacts checked.
    pub artifacts_checked: u64,
    /// Artifacts whose blob is corrupt (id, name, reason).
    pub corrupt: Vec<(String, String, String)>,
    /// Artifacts whose blob is missing (id, name).
    pub missing: Vec<(String, String)>,
}

impl VerifyReport {
    /// True when nothing is corrupt or missing.
    pub fn ok(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

/// What [`TestArtifactsManager::cleanup`] removed (or would remove, in a dry run).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CleanupReport {
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// The time retention was judged at.
    pub as_of: Option<DateTime<Utc>>,
    /// Expired sessions.
    pub sessions: Vec<ExpiredSession>,
    /// Blobs removed (none in a dry run).
    pub blobs_removed: u64,
    /// Bytes freed (none in a dry run).
    pub bytes_freed: u64,
}

/// What [`TestArtifactsManager::gc`] removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// Temp files of interrupted adds removed.
    pub incomplete_removed: u64,
    /// Unreferenced blobs removed.
    pub blobs_removed: u64,
    /// Bytes freed by them.
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub blobs_in_grace: u64,
    /// Reports of ingests whose run was never recorded (older than
    /// [`ArtifactsOptions::orphan_report_age`]) deleted.
    #[serde(default)]
    pub orphan_reports_removed: u64,
}

/// What an upload run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadReport {
    /// Artifacts newly queued by this run.
    pub queued: u64,
    /// Objects sent.
    pub uploaded: u64,
    /// Artifacts whose object was already there with the same hash (not sent again).
    pub already_there: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Failures (artifact id, error); they stay queued for a retry.
    pub failed: Vec<(String, String)>,
    /// Uploads given up because their lease was lost (another uploader took them over after
    /// this run stalled past the lease): stopped, their outcome not recorded.
    #[serde(default)]
    pub lost: u64,
    /// Session manifests written.
    pub manifests: u64,
}

/// What [`TestArtifactsManager::pull`] did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullReport {
    /// The session pulled.
    pub session_id: String,
    /// Artifacts indexed.
    pub artifacts: u64,
    /// Artifacts downloaded (eager pulls).
    pub downloaded: u64,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// Organises, stores, finds and verifies test artifacts.
pub struct TestArtifactsManager {
    index: Arc<dyn ArtifactIndex>,
    blobs: Arc<dyn BlobStore>,
    options: ArtifactsOptions,
    #[cfg(feature = "aws")]
    s3: Option<Arc<crate::blob::S3BlobStore>>,
}

impl fmt::Debug for TestArtifactsManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestArtifactsManager")
            .field("index", &self.index)
            .field("blobs", &self.blobs)
            .field("options", &self.options)
            .finish()
    }
}

/// Longest retention, in days (100 years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// Checks a retention: 1..=[`MAX_RETENTION_DAYS`] days.
pub fn check_retention_days(days: u32) -> Result<()> {
    if days == 0 || days > MAX_RETENTION_DAYS {
        return Err(Error::invalid(format!(
            "retention_days must be in 1..={MAX_RETENTION_DAYS}, got {days}"
        )));
    }
    Ok(())
}

/// Refuses user metadata carrying a reserved key ([`crate::store::PENDING_RUN_KEY`], the mark
/// of an ingest's reports that `gc` deletes when their run was never recorded).
pub(crate) fn check_reserved(metadata: &JsonMap) -> Result<()> {
    let key = crate::store::PENDING_RUN_KEY;
    if metadata.contains_key(key) {
        return Err(Error::invalid(format!(
            "metadata key {key:?} is reserved (the ingest marks its reports with it, and gc \
             deletes the ones it marks whose run was never recorded): remove it or use another \
             key; nothing was stored"
        )));
    }
    Ok(())
}

fn check_tags(tags: &[String]) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(format!(
            "{} tags given; the limit is {MAX_TAGS}",
            tags.len()
        )));
    }
    for t in tags {
        if t.trim().is_empty() {
            return Err(Error::invalid("tags must not be empty"));
        }
        if t.len() > MAX_TAG_BYTES || t.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "invalid tag {t:?}: at most {MAX_TAG_BYTES} bytes, no control characters"
            )));
        }
    }
    Ok(())
}

fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid(format!("{} has no file name", path.display())))
}

/// A file being added; remembers a read error so it can be told apart from a store error.
struct Source {
    file: File,
    error: Option<io::Error>,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf).inspect_err(|e| {
            self.error = Some(io::Error::new(e.kind(), e.to_string()));
        })
    }
}

fn open_source(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::not_found(format!("file {}", path.display())),
        io::ErrorKind::PermissionDenied => {
            Error::invalid(format!("cannot read {}: permission denied", path.display()))
        }
        _ => Error::invalid(format!("cannot read {}: {e}", path.display())),
    })
}

impl TestArtifactsManager {
    /// A manager over `index` and `blobs`.
    pub fn new(
        index: Arc<dyn ArtifactIndex>,
        blobs: Arc<dyn BlobStore>,
        options: ArtifactsOptions,
    ) -> TestArtifactsManager {
        TestArtifactsManager {
            index,
            blobs,
            options,
            #[cfg(feature = "aws")]
            s3: None,
        }
    }

    /// Uses `s3` as the shared store: uploads go there and reads fall back to it when the local
    /// blob is gone.
    #[cfg(feature = "aws")]
    pub fn with_s3(mut self, s3: Arc<crate::blob::S3BlobStore>) -> Self {
        self.s3 = Some(s3);
        self
    }

    /// The index.
    pub fn index(&self) -> &Arc<dyn ArtifactIndex> {
        &self.index
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    // --- sessions and collections ---------------------------------------------------------

    /// Creates a session.
    pub fn create_session(&self, new: NewSession) -> Result<TestSession> {
        let session = self.new_session(new)?;
        self.index.create_session(&session)?;
        Ok(session)
    }

    /// The upgrade's latest session, or a session created from `new` when the upgrade has
    /// none, and whether it was created here. Concurrent callers for one upgrade (ingests on
    /// several replicas) end with one session, all of them using it
    /// ([`ArtifactIndex::create_first_session`]).
    pub fn latest_session_or_create(&self, new: NewSession) -> Result<(TestSession, bool)> {
        let session = self.new_session(new)?;
        let latest = self.index.create_first_session(&session)?;
        let created = latest.session_id == session.session_id;
        Ok((latest, created))
    }

    /// A new session's row, checked.
    fn new_session(&self, new: NewSession) -> Result<TestSession> {
        check_id("upgrade_id", &new.upgrade_id)?;
        check_name("cluster_name", &new.cluster_name)?;
        let now = crate::model::now();
        let name = match new.name {
            Some(n) => n,
            None => format!("upgrade-{}-{}", new.upgrade_id, now.format("%Y%m%d-%H%M%S")),
        };
        check_name("name", &name)?;
        if let Some(d) = &new.description {
            check_text("description", d)?;
        }
        let retention_days = new
            .retention_days
            .unwrap_or(self.options.default_retention_days);
        check_retention_days(retention_days)?;
        let session = TestSession {
            session_id: Uuid::now_v7().to_string(),
            upgrade_id: new.upgrade_id,
            cluster_name: new.cluster_name,
            name,
            description: new.description,
            started_at: now,
            completed_at: None,
            retention_days,
        };
        Ok(session)
    }

    /// One session.
    pub fn session(&self, session_id: &str) -> Result<TestSession> {
        self.index.session(session_id)
    }

    /// Sessions, oldest first, optionally of one upgrade.
    pub fn sessions(&self, upgrade_id: Option<&str>) -> Result<Vec<TestSession>> {
        self.index.sessions(upgrade_id)
    }

    /// Marks a session completed; its retention starts then. With S3, the session's manifest is
    /// refreshed (best effort: a failure is logged, the completion stands).
    pub fn complete_session(&self, session_id: &str) -> Result<TestSession> {
        let s = self
            .index
            .complete_session(session_id, crate::model::now())?;
        #[cfg(feature = "aws")]
        if let Some(s3) = &self.s3
            && !self
                .index
                .search(&ArtifactQuery {
                    session_id: Some(session_id.to_owned()),
                    status: Some(crate::model::ArtifactStatus::Uploaded),
                    limit: 1,
                    ..ArtifactQuery::default()
                })?
                .artifacts
                .is_empty()
            && let Err(e) = self.write_manifest(s3, session_id)
        {
            tracing::warn!(session = session_id, error = %e, "cannot write the session manifest");
        }
        Ok(s)
    }

    /// The reference session summary.
    pub fn session_summary(&self, session_id: &str) -> Result<SessionSummary> {
        self.index.session_summary(session_id)
    }

    /// Creates a collection in a session.
    pub fn create_collection(
        &self,
        session_id: &str,
        name: &str,
        description: Option<&str>,
        task_id: Option<&str>,
    ) -> Result<ArtifactCollection> {
        check_name("collection name", name)?;
        if let Some(d) = description {
            check_text("description", d)?;
        }
        if let Some(t) = task_id {
            check_id("task_id", t)?;
        }
        let c = ArtifactCollection {
            collection_id: Uuid::now_v7().to_string(),
            session_id: session_id.to_owned(),
            name: name.to_owned(),
            description: description.map(str::to_owned),
            task_id: task_id.map(str::to_owned),
            created_at: crate::model::now(),
        };
        self.index.create_collection(&c)?;
        Ok(c)
    }

    /// The collections of a session.
    pub fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>> {
        self.index.collections(session_id)
    }

    // --- adding ---------------------------------------------------------------------------

    fn check_target(&self, session_id: &str, collection_id: &str) -> Result<ArtifactCollection> {
        let c = self.index.collection(collection_id)?;
        if c.session_id != session_id {
            self.index.session(session_id)?;
            return Err(Error::invalid(format!(
                "collection {collection_id:?} belongs to session {:?}, not {session_id:?}",
                c.session_id
            )));
        }
        Ok(c)
    }

    /// Checks a user's options (every public add goes through here): the metadata may not
    /// carry a reserved key. The ingest, which marks its reports with
    /// [`crate::store::PENDING_RUN_KEY`], adds through [`Self::check_ingest_options`].
    fn check_options(opts: &AddOptions) -> Result<()> {
        check_reserved(&opts.metadata)?;
        Self::check_ingest_options(opts)
    }

    /// [`Self::check_options`] without the reserved keys' check: the ingest's own adds.
    fn check_ingest_options(opts: &AddOptions) -> Result<()> {
        check_tags(&opts.tags)?;
        if let Some(t) = &opts.task_id {
            check_id("task_id", t)?;
        }
        if let Some(s) = &opts.step_id {
            check_id("step_id", s)?;
        }
        if let Some(d) = &opts.description {
            check_text("description", d)?;
        }
        check_json("metadata", &opts.metadata)
    }

    fn new_artifact(
        &self,
        collection_id: &str,
        name: String,
        opts: &AddOptions,
        digest: Digest,
        size: u64,
    ) -> NewArtifact {
        NewArtifact {
            artifact_id: Uuid::now_v7().to_string(),
            collection_id: collection_id.to_owned(),
            name,
            description: opts.description.clone(),
            artifact_type: opts.artifact_type.unwrap_or(ArtifactType::LogFile),
            file_size: size,
            digest,
            task_id: opts.task_id.clone(),
            step_id: opts.step_id.clone(),
            tags: opts.tags.clone(),
            metadata: opts.metadata.clone(),
            created_at: crate::model::now(),
            queue_upload: self.options.auto_upload,
        }
    }

    /// Indexes a batch whose bytes are stored. When a concurrent release (another replica's
    /// gc, cleanup or delete) of one of its digests is in progress, or deleted the bytes after
    /// they were stored, the index refuses ([`crate::store::BlobReleased`]): the add waits for
    /// the release to end, stores the bytes again (from the local copy) and indexes again, so
    /// no artifact is indexed trusting bytes a release removes (G105).
    fn index_batch(&self, batch: &[NewArtifact]) -> Result<Vec<TestArtifact>> {
        // Times each digest was stored again (a batch may meet several releases).
        let mut restored: HashMap<Digest, u32> = HashMap::new();
        loop {
            let blobs = Arc::clone(&self.blobs);
            let err = match self
                .index
                .insert_artifacts(batch, &move |d: &Digest| blobs.exists(d))
            {
                Ok(added) => return Ok(added),
                Err(e) => e,
            };
            let Some(d) = crate::store::BlobReleased::of(&err) else {
                return Err(err);
            };
            let n = restored.entry(d).or_insert(0);
            if *n == RESTORES {
                return Err(err);
            }
            *n += 1;
            self.index.await_blob_release(&d, RELEASE_WAIT)?;
            // The release kept the bytes (the put made them younger than its cutoff): index
            // again (the index checks again). Else store them again from the local copy.
            if !self.blobs.exists(&d)? && !self.blobs.restore(&d)? {
                return Err(Error::Backend {
                    message: format!(
                        "blob sha256:{d} was deleted by a concurrent release (another \
                         replica's gc, cleanup or delete) before this add indexed it, and no \
                         local copy is left to store again: add it again"
                    ),
                    source: None,
                });
            }
        }
    }

    /// Adds the bytes of `reader` as one artifact named `name`.
    pub fn add_reader(
        &self,
        session_id: &str,
        collection_id: &str,
        reader: &mut dyn Read,
        name: &str,
        opts: &AddOptions,
    ) -> Result<TestArtifact> {
        self.add_reader_as(session_id, collection_id, reader, name, opts, false)
    }

    /// [`add_reader`](Self::add_reader); `ingest`: the ingest's own add, whose metadata may
    /// carry its mark ([`crate::store::PENDING_RUN_KEY`]), refused in a user's.
    pub(crate) fn add_reader_as(
        &self,
        session_id: &str,
        collection_id: &str,
        reader: &mut dyn Read,
        name: &str,
        opts: &AddOptions,
        ingest: bool,
    ) -> Result<TestArtifact> {
        self.check_target(session_id, collection_id)?;
        if ingest {
            Self::check_ingest_options(opts)?;
        } else {
            Self::check_options(opts)?;
        }
        let name = names::sanitize_name(name)?;
        let info = self.blobs.put(reader, &mut |_| {})?;
        let new = self.new_artifact(collection_id, name, opts, info.digest, info.size);
        Ok(self.index_batch(std::slice::from_ref(&new))?.remove(0))
    }

    /// Adds in-memory bytes as one artifact.
    pub fn add_bytes(
        &self,
        session_id: &str,
        collection_id: &str,
        bytes: &[u8],
        name: &str,
        opts: &AddOptions,
    ) -> Result<TestArtifact> {
        self.add_reader(session_id, collection_id, &mut &bytes[..], name, opts)
    }

    /// Adds a file, or every regular file under a directory (names relative to it, prefixed
    /// by `opts.name` when given). Checks everything before storing anything; indexes in
    /// batches. `progress` is called as bytes are stored.
    pub fn add_path(
        &self,
        session_id: &str,
        collection_id: &str,
        path: &Path,
        opts: &AddOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<TestArtifact>> {
        self.add_paths(
            session_id,
            collection_id,
            &[path.to_path_buf()],
            opts,
            progress,
        )
    }

    /// [`add_path`](Self::add_path) for several paths at once.
    pub fn add_paths(
        &self,
        session_id: &str,
        collection_id: &str,
        paths: &[PathBuf],
        opts: &AddOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<TestArtifact>> {
        let mut out = Vec::new();
        self.add_paths_into(
            session_id,
            collection_id,
            paths,
            opts,
            progress,
            &mut out,
            false,
        )?;
        Ok(out)
    }

    /// [`add_paths`](Self::add_paths) that pushes each indexed artifact to `out` as its batch
    /// commits, so that a caller undoing a failed add knows what was committed before the
    /// failure (a later batch's error leaves the earlier batches in `out`). `ingest`: as in
    /// [`add_reader_as`](Self::add_reader_as).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_paths_into(
        &self,
        session_id: &str,
        collection_id: &str,
        paths: &[PathBuf],
        opts: &AddOptions,
        progress: &mut dyn FnMut(Progress),
        out: &mut Vec<TestArtifact>,
        ingest: bool,
    ) -> Result<()> {
        self.check_target(session_id, collection_id)?;
        if ingest {
            Self::check_ingest_options(opts)?;
        } else {
            Self::check_options(opts)?;
        }
        // Plan: every file and its name, checked before anything is stored.
        let plan: Vec<(PathBuf, String, u64)> = plan_paths(paths, opts)?
            .into_iter()
            .map(|f| (f.path, f.name, f.size))
            .collect();
        let mut p = Progress {
            files_total: plan.len() as u64,
            bytes_total: plan.iter().map(|(_, _, s)| s).sum(),
            ..Progress::default()
        };
        progress(p);
        out.reserve(plan.len());
        let mut batch = Vec::with_capacity(INDEX_BATCH.min(plan.len()));
        for (path, name, _) in plan {
            let mut source = Source {
                file: open_source(&path)?,
                error: None,
            };
            let base = p.bytes_done;
            let info = self
                .blobs
                .put(&mut source, &mut |b| {
                    progress(Progress {
                        bytes_done: base + b,
                        ..p
                    })
                })
                .map_err(|e| match source.error.take() {
                    // The source failed, not the store: say which file.
                    Some(why) => Error::invalid(format!("cannot read {}: {why}", path.display())),
                    None => e,
                })?;
            p.bytes_done = base + info.size;
            p.files_done += 1;
            progress(p);
            batch.push(self.new_artifact(collection_id, name, opts, info.digest, info.size));
            if batch.len() == INDEX_BATCH {
                out.extend(self.index_batch(&batch)?);
                batch.clear();
            }
        }
        if !batch.is_empty() {
            out.extend(self.index_batch(&batch)?);
        }
        Ok(())
    }

    /// Stores many in-memory items and indexes them in one transaction (bulk loads).
    pub fn add_many_bytes(
        &self,
        session_id: &str,
        collection_id: &str,
        items: &[(String, Vec<u8>, AddOptions)],
    ) -> Result<Vec<TestArtifact>> {
        self.check_target(session_id, collection_id)?;
        let mut batch = Vec::with_capacity(items.len());
        for (name, bytes, opts) in items {
            Self::check_options(opts)?;
            let name = names::sanitize_name(name)?;
            let info = self.blobs.put(&mut bytes.as_slice(), &mut |_| {})?;
            batch.push(self.new_artifact(collection_id, name, opts, info.digest, info.size));
        }
        self.index_batch(&batch)
    }

    // --- reading --------------------------------------------------------------------------

    /// The full id that `abbrev` names (the id, a unique prefix, or a unique suffix of at least
    /// six characters); see [`crate::store::ArtifactIndex::resolve_id`].
    pub fn resolve_id(&self, kind: crate::store::IdKind, abbrev: &str) -> Result<String> {
        self.index.resolve_id(kind, abbrev)
    }

    /// The shortest abbreviation of `id` that [`resolve_id`](Self::resolve_id) takes back to
    /// it, for tables.
    pub fn abbreviate(&self, kind: crate::store::IdKind, id: &str) -> Result<String> {
        self.index.abbreviate(kind, id)
    }

    /// One artifact.
    pub fn artifact(&self, artifact_id: &str) -> Result<TestArtifact> {
        self.index.artifact(artifact_id)
    }

    /// A reader of the artifact's bytes that fails with [`Error::Corrupt`] on a digest mismatch.
    pub fn open(&self, artifact_id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)> {
        self.open_with(artifact_id, true)
    }

    /// [`open`](Self::open); without `cache`, a blob store with a cache does not keep what it
    /// reads (see [`BlobStore::open_uncached`]).
    pub(crate) fn open_with(
        &self,
        artifact_id: &str,
        cache: bool,
    ) -> Result<(TestArtifact, Box<dyn Read + Send>)> {
        let a = self.index.artifact(artifact_id)?;
        if a.status == crate::model::ArtifactStatus::Deleted {
            return Err(Error::not_found(format!(
                "artifact {artifact_id:?} (deleted)"
            )));
        }
        let digest: Digest = a.file_hash.parse()?;
        #[cfg(feature = "aws")]
        if let Some(key) = &a.s3_key
            && !self.blobs.exists(&digest)?
        {
            // The local copy is gone (or was never pulled): read the uploaded object, verified
            // against the digest, from the configured store or else the artifact's own bucket.
            let reader = match (&self.s3, &a.s3_bucket) {
                (Some(s3), Some(b)) if s3.bucket() == b => s3.open_object(key, &digest)?,
                (_, Some(b)) => {
                    crate::blob::S3BlobStore::from_env(b, "")?.open_object(key, &digest)?
                }
                (Some(s3), None) => s3.open_object(key, &digest)?,
                (None, None) => {
                    return Err(Error::not_found(format!(
                        "the content of artifact {artifact_id:?} (no local copy, no bucket)"
                    )));
                }
            };
            return Ok((a, reader));
        }
        let opened = if cache {
            self.blobs.open(&digest)
        } else {
            self.blobs.open_uncached(&digest)
        };
        let reader = opened.map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found(format!(
                "the content of artifact {artifact_id:?} (blob sha256:{digest})"
            )),
            other => other,
        })?;
        Ok((a, reader))
    }

    /// Reads the artifact's verified bytes into memory (for small artifacts).
    pub fn read(&self, artifact_id: &str) -> Result<Vec<u8>> {
        let (_, mut r) = self.open(artifact_id)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Writes the artifact's verified bytes to `path` (temp file, then rename: a corrupt blob
    /// never leaves a file behind).
    pub fn write_to(&self, artifact_id: &str, path: &Path) -> Result<u64> {
        let (_, mut r) = self.open(artifact_id)?;
        write_atomically(path, &mut r)
    }

    /// The first page of the artifacts matching `query` (`query.limit`, 100 by default),
    /// newest first; see [`search_page`](Self::search_page) for the rest.
    pub fn search(&self, query: &ArtifactQuery) -> Result<Vec<TestArtifact>> {
        Ok(self.search_page(query)?.artifacts)
    }

    /// One page of the artifacts matching `query`, newest first, from `query.cursor` on, and
    /// the cursor of the next page when more match. A page holds at most
    /// [`MAX_SEARCH_LIMIT`](crate::model::MAX_SEARCH_LIMIT) results; a larger limit is refused.
    /// Index-backed: a page costs its own rows, whatever page it is.
    pub fn search_page(&self, query: &ArtifactQuery) -> Result<crate::model::ArtifactPage> {
        if query.limit > crate::model::MAX_SEARCH_LIMIT {
            return Err(Error::invalid(format!(
                "limit {} is above the maximum of {} per page; use the cursor for more",
                query.limit,
                crate::model::MAX_SEARCH_LIMIT
            )));
        }
        if let Some(n) = &query.name
            && n.len() > names::MAX_NAME_BYTES
        {
            return Err(Error::invalid("name filter is longer than 512 bytes"));
        }
        // No stored text holds a NUL byte, and neither backend takes one in a pattern.
        let texts = [
            &query.session_id,
            &query.collection_id,
            &query.upgrade_id,
            &query.task_id,
            &query.name,
            &query.cursor,
        ];
        if texts
            .into_iter()
            .flatten()
            .chain(&query.tags)
            .any(|t| t.contains('\0'))
        {
            return Err(Error::invalid(
                "a search filter holds a NUL byte: remove it (no name, id or tag has one)",
            ));
        }
        if let (Some(a), Some(b)) = (query.min_size, query.max_size)
            && a > b
        {
            return Err(Error::invalid(format!(
                "min size {a} is larger than max size {b}"
            )));
        }
        self.index.search(query)
    }

    /// Statistics over one session or all.
    pub fn stats(&self, session_id: Option<&str>) -> Result<ArtifactStats> {
        self.index.stats(session_id)
    }

    /// Artifacts per task of an upgrade.
    pub fn counts_by_task(&self, upgrade_id: &str) -> Result<HashMap<String, u64>> {
        self.index.artifact_counts_by_task(upgrade_id)
    }

    // --- export and verification ----------------------------------------------------------

    /// Writes a session's artifacts (verified) to `dir/{collection}/{export_name}`; see
    /// [`export_session_from`].
    pub fn export_session(
        &self,
        session_id: &str,
        dir: &Path,
        force: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ExportReport> {
        export_session_from(self, session_id, dir, force, progress)
    }

    /// Reads every blob once and checks its digest, then checks every artifact's blob is
    /// there. Memory stays flat: only corrupt digests are remembered.
    pub fn verify(&self, progress: &mut dyn FnMut(Progress)) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut corrupt: HashMap<Digest, String> = HashMap::new();
        let mut p = Progress::default();
        self.blobs.list(&mut |m| {
            let result = self
                .blobs
                .open(&m.digest)
                .and_then(|mut r| crate::blob::drain_verified(&mut r));
            match result {
                Ok(n) => report.bytes_checked += n,
                Err(e) => {
                    corrupt.insert(m.digest, e.to_string());
                }
            }
            report.blobs_checked += 1;
            p.files_done += 1;
            p.bytes_done += m.size;
            progress(p);
            Ok(())
        })?;
        self.index.for_each_artifact(None, &mut |a| {
            if a.status == crate::model::ArtifactStatus::Deleted {
                return Ok(());
            }
            report.artifacts_checked += 1;
            let digest: Digest = a.file_hash.parse()?;
            if let Some(reason) = corrupt.get(&digest) {
                report.corrupt.push((a.artifact_id, a.name, reason.clone()));
            } else if !self.blobs.exists(&digest)? {
                report.missing.push((a.artifact_id, a.name));
            }
            Ok(())
        })?;
        Ok(report)
    }

    // --- retention and garbage collection -------------------------------------------------

    /// Removes completed sessions whose retention has passed at `as_of` (now by default):
    /// their rows, then the blobs no other artifact uses. A dry run only reports.
    pub fn cleanup(&self, dry_run: bool, as_of: Option<DateTime<Utc>>) -> Result<CleanupReport> {
        // Blobs put after this instant (a concurrent re-add of the same bytes) are kept.
        let started = SystemTime::now();
        let as_of = as_of.unwrap_or_else(crate::model::now);
        let sessions = self
            .index
            .expired_sessions(as_of, self.options.failed_retention_factor)?;
        let mut report = CleanupReport {
            dry_run,
            as_of: Some(as_of),
            ..CleanupReport::default()
        };
        if !dry_run {
            for s in &sessions {
                // Shared copies go first: if S3 cannot delete them, the session stays whole.
                self.delete_uploaded_objects(&s.session.session_id)?;
                let digests = self.index.delete_session(&s.session.session_id)?;
                let (n, bytes) = self.delete_blobs_older(&digests, Some(started))?;
                report.blobs_removed += n;
                report.bytes_freed += bytes;
                tracing::info!(session = %s.session.session_id, blobs = n, bytes, "session removed by retention");
            }
        }
        report.sessions = sessions;
        Ok(report)
    }

    /// Removes the S3 objects of a session's uploaded artifacts (no-op without S3).
    fn delete_uploaded_objects(&self, session_id: &str) -> Result<u64> {
        #[cfg(feature = "aws")]
        if let Some(s3) = &self.s3 {
            // Only keys derived from the layout, in the configured bucket: a recorded key that
            // is anything else is left alone (it may be somebody else's object).
            let mut keys = Vec::new();
            self.index.for_each_artifact(Some(session_id), &mut |a| {
                match upload::owned_key(s3, &a) {
                    Some(k) => keys.push(k),
                    None if a.s3_key.is_some() => tracing::warn!(
                        artifact = %a.artifact_id,
                        bucket = a.s3_bucket.as_deref().unwrap_or("?"),
                        key = a.s3_key.as_deref().unwrap_or("?"),
                        "not deleting an S3 object outside this store's bucket and layout"
                    ),
                    None => {}
                }
                Ok(())
            })?;
            for k in &keys {
                s3.delete_object(k)?;
            }
            s3.delete_object(&upload::manifest_key(s3.prefix(), session_id))?;
            return Ok(keys.len() as u64);
        }
        let _ = session_id;
        Ok(0)
    }

    /// Deletes an artifact: its S3 object (when uploaded), then marks it `deleted` (the row is
    /// kept as a record), then releases its local blob if nothing else uses it.
    pub fn delete_artifact(&self, artifact_id: &str) -> Result<TestArtifact> {
        let started = SystemTime::now();
        let a = self.index.artifact(artifact_id)?;
        if a.status == crate::model::ArtifactStatus::Deleted {
            return Ok(a);
        }
        #[cfg(feature = "aws")]
        if let Some(key) = &a.s3_key {
            // The key deleted is derived from the layout, never taken from the row as is.
            match self
                .s3
                .as_ref()
                .and_then(|s3| Some((s3, upload::owned_key(s3, &a)?)))
            {
                Some((s3, owned)) => s3.delete_object(&owned)?,
                None => {
                    return Err(Error::invalid(format!(
                        "artifact {artifact_id:?} is in s3://{}/{key}; configure that bucket \
                         (and key prefix) to delete it",
                        a.s3_bucket.as_deref().unwrap_or("?")
                    )));
                }
            }
        }
        let deleted = self
            .index
            .set_artifact_status(artifact_id, crate::model::ArtifactStatus::Deleted)?;
        let digest: Digest = a.file_hash.parse()?;
        self.delete_blobs_older(&[digest], Some(started))?;
        Ok(deleted)
    }

    /// Whether the artifact's content can be read: locally, or from S3 when it was uploaded.
    pub fn exists(&self, artifact_id: &str) -> Result<bool> {
        let a = self.index.artifact(artifact_id)?;
        if a.status == crate::model::ArtifactStatus::Deleted {
            return Ok(false);
        }
        let digest: Digest = a.file_hash.parse()?;
        if self.blobs.exists(&digest)? {
            return Ok(true);
        }
        #[cfg(feature = "aws")]
        if let (Some(s3), Some(key)) = (&self.s3, &a.s3_key) {
            return Ok(s3.object_hash(key)?.is_some());
        }
        Ok(false)
    }

    /// Deletes the unreferenced blobs of `digests` through the index (inside its write
    /// transaction on SQLite; under a committed release mark, outside any transaction, on a
    /// database: [`crate::store::ArtifactIndex::delete_unreferenced`]); with a
    /// `cutoff`, only those last put before it (checked at deletion, atomically with respect to
    /// puts: a re-add of the same bytes refreshes the blob before it is indexed, so it is kept).
    /// gc passes its grace period; `cleanup` and `delete_artifact` the instant they began, so
    /// none of them can take a blob from under a concurrent add.
    fn delete_blobs_older(
        &self,
        digests: &[Digest],
        cutoff: Option<SystemTime>,
    ) -> Result<(u64, u64)> {
        let (mut n, mut bytes) = (0, 0);
        for chunk in digests.chunks(1000) {
            let sizes: HashMap<Digest, u64> = chunk
                .iter()
                .filter_map(|d| self.blobs.size(d).ok().map(|s| (*d, s)))
                .collect();
            let blobs = Arc::clone(&self.blobs);
            let deleted =
                self.index
                    .delete_unreferenced(chunk, &move |d: &Digest| match cutoff {
                        Some(c) => blobs.delete_if_older(d, c),
                        None => blobs.delete(d),
                    })?;
            n += deleted.len() as u64;
            bytes += deleted.iter().filter_map(|d| sizes.get(d)).sum::<u64>();
        }
        Ok((n, bytes))
    }

    /// Deletes the reports of ingests whose run was never recorded (the record and its undo
    /// both failed), once older than [`ArtifactsOptions::orphan_report_age`], as
    /// [`delete_artifact`](Self::delete_artifact) does (the row kept as a `deleted` record,
    /// the blob released; an S3 copy under the session's layout is left alone). An ingest still in progress loses nothing
    /// silently: the index marks a report deleted only if its run is not recorded, under a
    /// lock that recording the run takes too, so either the run committed first (and the
    /// report is kept) or the run is refused and the ingest fails, removing what it kept.
    fn delete_orphan_reports(&self) -> Result<u64> {
        let started = SystemTime::now();
        let cutoff = crate::model::now()
            - chrono::Duration::from_std(self.options.orphan_report_age)
                .unwrap_or(chrono::Duration::MAX);
        let mut removed = 0;
        loop {
            let batch = self.index.delete_orphan_reports(cutoff, 1000)?;
            removed += batch.len() as u64;
            let mut digests = Vec::with_capacity(batch.len());
            for a in &batch {
                // Its S3 object under the session's layout (if the upload queue sent it)
                // is left alone: this row was found by inference, and deleting objects in a
                // shared bucket is kept to explicit `delete` and `cleanup`.
                tracing::info!(artifact_id = %a.artifact_id, run_id = ?a.metadata.get(crate::store::PENDING_RUN_KEY), "deleted the report of a test run that was never recorded");
                if let Ok(d) = a.file_hash.parse::<Digest>() {
                    digests.push(d);
                }
            }
            self.delete_blobs_older(&digests, Some(started))?;
            if batch.len() < 1000 {
                return Ok(removed);
            }
        }
    }

    /// Removes leftovers of interrupted adds and blobs that no artifact references (older
    /// than the grace period), and the reports of ingests whose run was never recorded.
    pub fn gc(&self) -> Result<GcReport> {
        let mut report = GcReport {
            orphan_reports_removed: self.delete_orphan_reports()?,
            incomplete_removed: self.blobs.sweep_incomplete()?,
            ..GcReport::default()
        };
        let cutoff = SystemTime::now()
            .checked_sub(self.options.gc_grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut candidates = Vec::new();
        let mut young = Vec::new();
        self.blobs.list(&mut |m| {
            if m.modified.is_some_and(|t| t > cutoff) {
                young.push(m.digest);
            } else {
                candidates.push(m.digest);
            }
            if candidates.len() >= 1000 {
                let (n, b) = self.delete_blobs_older(&candidates, Some(cutoff))?;
                report.blobs_removed += n;
                report.bytes_freed += b;
                candidates.clear();
            }
            Ok(())
        })?;
        let (n, b) = self.delete_blobs_older(&candidates, Some(cutoff))?;
        report.blobs_removed += n;
        report.bytes_freed += b;
        // Count the young ones that are unreferenced, without deleting them.
        for chunk in young.chunks(1000) {
            report.blobs_in_grace += self.index.unreferenced(chunk)?.len() as u64;
        }
        // Releases a deleter left unfinished (it stopped, or its delete failed): deleted
        // again (when unreferenced and past the grace period) and their marks removed.
        let stale = self.index.stale_blob_releases()?;
        let (n, b) = self.delete_blobs_older(&stale, Some(cutoff))?;
        report.blobs_removed += n;
        report.bytes_freed += b;
        Ok(report)
    }
}

/// A file an add would store, and the name it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// The file.
    pub path: PathBuf,
    /// Its sanitised artifact name.
    pub name: String,
    /// Its size when planned.
    pub size: u64,
}

/// What an add of `paths` skips: the symbolic links (never followed, whether they point
/// inside the directory or out of it) and special files (sockets, FIFOs, devices) found
/// below the directories among `paths`. Callers tell the user about them.
pub fn skipped_entries(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if !fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        for e in walkdir::WalkDir::new(path).sort_by_file_name() {
            let e = e.map_err(|e| {
                Error::invalid(format!("cannot read directory {}: {e}", path.display()))
            })?;
            let t = e.file_type();
            if e.depth() > 0 && !t.is_file() && !t.is_dir() {
                out.push(e.into_path());
            }
        }
    }
    Ok(out)
}

/// The files `add_paths` would store for `paths` (directories walked in name order, symbolic
/// links and special files below them skipped: see [`skipped_entries`]) and their names, all
/// checked; nothing is read or stored. Remote clients use it to add the same way.
pub fn plan_paths(paths: &[PathBuf], opts: &AddOptions) -> Result<Vec<PlannedFile>> {
    let mut plan: Vec<PlannedFile> = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                Error::not_found(format!("file or directory {}", path.display()))
            }
            _ => Error::invalid(format!("cannot read {}: {e}", path.display())),
        })?;
        if meta.is_dir() {
            let prefix = opts.name.clone().unwrap_or_default();
            let mut entries: Vec<_> = walkdir::WalkDir::new(path)
                .sort_by_file_name()
                .into_iter()
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| {
                    Error::invalid(format!("cannot read directory {}: {e}", path.display()))
                })?;
            entries.retain(|e| e.file_type().is_file());
            for e in entries {
                let rel = e
                    .path()
                    .strip_prefix(path)
                    .unwrap_or(e.path())
                    .to_string_lossy()
                    .into_owned();
                let name = if prefix.is_empty() {
                    names::sanitize_name(&rel)?
                } else {
                    names::sanitize_name(&format!("{prefix}/{rel}"))?
                };
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                plan.push(PlannedFile {
                    path: e.into_path(),
                    name,
                    size,
                });
            }
        } else if meta.is_file() {
            let name = match (&opts.name, paths.len()) {
                (Some(n), 1) => n.clone(),
                (Some(_), _) => {
                    return Err(Error::invalid(
                        "a name can only be given when adding a single file",
                    ));
                }
                (None, _) => file_name_of(path)?,
            };
            plan.push(PlannedFile {
                path: path.clone(),
                name: names::sanitize_name(&name)?,
                size: meta.len(),
            });
        } else {
            return Err(Error::invalid(format!(
                "{} is neither a file nor a directory",
                path.display()
            )));
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests;
