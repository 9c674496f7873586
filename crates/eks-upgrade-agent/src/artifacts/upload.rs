//! Uploading artifacts to S3 under the reference layout
//! `{prefix}/{session_id}/{collection_id}/{export_name}` with the reference user metadata
//! (`artifact-id`, `artifact-type`, `upgrade-id`, `task-id`, `file-hash`).
//!
//! The queue is durable (see [`UploadQueue`]): an artifact is `created` and queued, then
//! `uploaded` (with `s3_bucket`, `s3_key`, `s3_url`, `uploaded_at`) or `failed` (error kept,
//! retried after a capped exponential backoff with jitter, or at once with `retry_failed`). An
//! object already in the bucket with the same `file-hash` is never sent again.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

pub use super::{PullReport, UploadReport};

use super::{Progress, TestArtifactsManager};
use crate::blob::S3BlobStore;
use crate::error::{Error, Result};
use crate::model::{ArtifactCollection, TestArtifact, TestSession};
use crate::store::{UploadOutcome, UploadQueue, UploadSelector};

/// Default key prefix (reference).
pub const DEFAULT_PREFIX: &str = "eks-upgrade-agent/artifacts";
/// Default size above which uploads are multipart.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Longest S3 key.
pub const MAX_KEY_BYTES: usize = 1024;

/// Settings of an upload run (the key prefix is the S3 store's).
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Size above which uploads are multipart.
    pub multipart_threshold: u64,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long a claim on queue entries (a batch of [`CLAIM_BATCH`]) lasts unless renewed; a
    /// live run renews its claims every quarter of it, so another run takes them over only
    /// when their run was killed, at most this long after.
    pub lease: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            max_backoff: Duration::from_secs(600),
            lease: Duration::from_secs(10),
        }
    }
}

/// Artifacts an upload run claims at a time.
pub const CLAIM_BATCH: usize = 8;

/// What `{prefix}/{session_id}/manifest.json` holds: enough to rebuild the session's index on
/// another machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionManifest {
    /// Format version (1).
    pub format: u32,
    /// The session.
    pub session: TestSession,
    /// Its collections.
    pub collections: Vec<ArtifactCollection>,
    /// Its artifacts, with digests, keys, tags and metadata.
    pub artifacts: Vec<TestArtifact>,
}

/// Largest manifest `pull` reads.
pub const MAX_MANIFEST_BYTES: u64 = 256 * 1024 * 1024;

/// Latest timestamp a manifest may carry, relative to now (clock skew between machines).
const MAX_CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::days(1);

impl SessionManifest {
    /// Checks a manifest read from `s3://{bucket}/{prefix}/{session_id}/manifest.json` as the
    /// untrusted input it is, and returns what may be stored: every field passes the rules the
    /// commands apply (ids, names, tags, metadata and description sizes, retention in
    /// 1..=36,500 days, timestamps between 1970 and now), every artifact belongs to the
    /// session and one of its collections, names are already in their normal form, ids and
    /// export names are unique, `file_hash` is normalised to 64 lower-case hex digits, and every
    /// `s3_key` is exactly the layout key `{prefix}/{session}/{collection}/{export name}`
    /// (refused otherwise). Bucket and URL are not taken from the manifest: an uploaded
    /// artifact is recorded in `bucket`, the one the manifest was read from. Pure: no I/O.
    pub fn validate(
        &self,
        bucket: &str,
        prefix: &str,
        session_id: &str,
    ) -> Result<SessionManifest> {
        use crate::progress::command::{check_id, check_json, check_name};
        use std::collections::HashSet;

        let now = Utc::now();
        let latest = now.checked_add_signed(MAX_CLOCK_SKEW).unwrap_or(now);
        let check_time = |field: &str, t: &chrono::DateTime<Utc>| -> Result<()> {
            if t.timestamp() < 0 || *t > latest {
                return Err(Error::invalid(format!(
                    "{field} {t} is not between 1970 and now"
                )));
            }
            Ok(())
        };
        let check_description = |field: &str, d: &Option<String>| -> Result<()> {
            match d {
                Some(d) => crate::progress::command::check_text(field, d),
                None => Ok(()),
            }
        };
        let in_manifest =
            |e: Error| Error::invalid(format!("manifest of session {session_id:?}: {e}"));

        if self.format != 1 {
            return Err(Error::invalid(format!(
                "manifest of session {session_id:?} has format {}; this version reads format 1",
                self.format
            )));
        }
        check_id("session_id", session_id)?;
        let s = &self.session;
        if s.session_id != session_id {
            return Err(Error::invalid(format!(
                "the manifest of session {session_id:?} describes session {:?}",
                s.session_id
            )));
        }
        (|| -> Result<()> {
            check_id("upgrade_id", &s.upgrade_id)?;
            check_name("cluster_name", &s.cluster_name)?;
            check_name("session name", &s.name)?;
            check_description("session description", &s.description)?;
            super::check_retention_days(s.retention_days)?;
            check_time("started_at", &s.started_at)?;
            if let Some(c) = &s.completed_at {
                check_time("completed_at", c)?;
                if *c < s.started_at {
                    return Err(Error::invalid(format!(
                        "completed_at {c} is before started_at {}",
                        s.started_at
                    )));
                }
            }
            Ok(())
        })()
        .map_err(in_manifest)?;

        let mut collection_ids = HashSet::new();
        let mut collection_names = HashSet::new();
        for c in &self.collections {
            (|| -> Result<()> {
                check_id("collection_id", &c.collection_id)?;
                if c.session_id != session_id {
                    return Err(Error::invalid(format!(
                        "collection {:?} belongs to session {:?}",
                        c.collection_id, c.session_id
                    )));
                }
                check_name("collection name", &c.name)?;
                check_description("collection description", &c.description)?;
                if let Some(t) = &c.task_id {
                    check_id("task_id", t)?;
                }
                check_time("collection created_at", &c.created_at)?;
                if !collection_ids.insert(c.collection_id.as_str()) {
                    return Err(Error::invalid(format!(
                        "collection {:?} appears twice",
                        c.collection_id
                    )));
                }
                if !collection_names.insert(c.name.as_str()) {
                    return Err(Error::invalid(format!(
                        "two collections are named {:?}",
                        c.name
                    )));
                }
                Ok(())
            })()
            .map_err(in_manifest)?;
        }

        let mut artifact_ids = HashSet::new();
        let mut export_names = HashSet::new();
        let mut artifacts = Vec::with_capacity(self.artifacts.len());
        for a in &self.artifacts {
            let checked = (|| -> Result<TestArtifact> {
                check_id("artifact_id", &a.artifact_id)?;
                let what = format!("artifact {:?}", a.artifact_id);
                if a.session_id != session_id {
                    return Err(Error::invalid(format!(
                        "{what} belongs to session {:?}",
                        a.session_id
                    )));
                }
                if !collection_ids.contains(a.collection_id.as_str()) {
                    return Err(Error::invalid(format!(
                        "{what} names collection {:?}, which the manifest does not have",
                        a.collection_id
                    )));
                }
                if a.upgrade_id != s.upgrade_id {
                    return Err(Error::invalid(format!(
                        "{what} belongs to upgrade {:?}, the session to {:?}",
                        a.upgrade_id, s.upgrade_id
                    )));
                }
                for (field, name) in [("name", &a.name), ("export_name", &a.export_name)] {
                    let normal = super::names::sanitize_name(name)?;
                    if normal != *name {
                        return Err(Error::invalid(format!(
                            "{what}: {field} {name:?} is not in normal form ({normal:?})"
                        )));
                    }
                }
                check_description("description", &a.description)?;
                if a.file_size > i64::MAX as u64 {
                    return Err(Error::invalid(format!(
                        "{what}: file_size {} is too large",
                        a.file_size
                    )));
                }
                let hash = a.file_hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::invalid(format!(
                        "{what}: file_hash {:?} is not 64 hex digits",
                        a.file_hash
                    )));
                }
                if let Some(t) = &a.task_id {
                    check_id("task_id", t)?;
                }
                if let Some(t) = &a.step_id {
                    check_id("step_id", t)?;
                }
                super::check_tags(&a.tags)?;
                check_json("metadata", &a.metadata)?;
                check_time("created_at", &a.created_at)?;
                if let Some(t) = &a.uploaded_at {
                    check_time("uploaded_at", t)?;
                }
                if !artifact_ids.insert(a.artifact_id.as_str()) {
                    return Err(Error::invalid(format!("{what} appears twice")));
                }
                if !export_names.insert((a.collection_id.as_str(), a.export_name.as_str())) {
                    return Err(Error::invalid(format!(
                        "two artifacts of collection {:?} export as {:?}",
                        a.collection_id, a.export_name
                    )));
                }
                let mut out = a.clone();
                out.file_hash = hash;
                match &a.s3_key {
                    Some(key) => {
                        let expected = object_key(prefix, a);
                        if *key != expected {
                            return Err(Error::invalid(format!(
                                "{what} claims S3 key {key:?}; its key in this bucket is {expected:?}"
                            )));
                        }
                        out.s3_bucket = Some(bucket.to_owned());
                        out.s3_url = Some(format!("s3://{bucket}/{expected}"));
                        out.s3_key = Some(expected);
                    }
                    None => {
                        if a.status == crate::model::ArtifactStatus::Uploaded {
                            return Err(Error::invalid(format!("{what} is uploaded but has no S3 key")));
                        }
                        out.s3_bucket = None;
                        out.s3_url = None;
                    }
                }
                Ok(out)
            })()
            .map_err(in_manifest)?;
            artifacts.push(checked);
        }
        Ok(SessionManifest {
            format: 1,
            session: s.clone(),
            collections: self.collections.clone(),
            artifacts,
        })
    }
}

/// The key of `a` in `s3` when it was uploaded there under the layout; `None` for an artifact
/// recorded in another bucket or under a key that is not its layout key (never deleted).
pub(crate) fn owned_key(s3: &S3BlobStore, a: &TestArtifact) -> Option<String> {
    let key = a.s3_key.as_deref()?;
    let expected = object_key(s3.prefix(), a);
    (a.s3_bucket.as_deref().is_none_or(|b| b == s3.bucket()) && key == expected).then_some(expected)
}

/// The key of a session's manifest.
pub fn manifest_key(prefix: &str, session_id: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("{session_id}/manifest.json")
    } else {
        format!("{prefix}/{session_id}/manifest.json")
    }
}

/// The object key of an artifact.
pub fn object_key(prefix: &str, a: &TestArtifact) -> String {
    let prefix = prefix.trim_matches('/');
    let rest = format!("{}/{}/{}", a.session_id, a.collection_id, a.export_name);
    if prefix.is_empty() {
        rest
    } else {
        format!("{prefix}/{rest}")
    }
}

fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(10)
        .saturating_mul(1u32 << attempt.min(16))
        .min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + 0.5 * f64::from(nanos % 1000) / 1000.0)
}

impl TestArtifactsManager {
    /// Writes the session's manifest next to its objects; returns its key.
    pub fn write_manifest(&self, s3: &S3BlobStore, session_id: &str) -> Result<String> {
        let session = self.session(session_id)?;
        let collections = self.collections(session_id)?;
        let mut artifacts = Vec::new();
        self.index().for_each_artifact(Some(session_id), &mut |a| {
            artifacts.push(a);
            Ok(())
        })?;
        let manifest = SessionManifest {
            format: 1,
            session,
            collections,
            artifacts,
        };
        let body = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::invalid(format!("cannot encode the manifest: {e}")))?;
        let key = manifest_key(s3.prefix(), session_id);
        s3.upload_object(
            &key,
            &mut body.as_slice(),
            body.len() as u64,
            &[],
            u64::MAX,
            &mut |_| {},
        )?;
        Ok(key)
    }

    /// Rebuilds a session from its manifest in `s3` (into a store that does not have it).
    /// Lazy: artifact contents are read from S3 when needed; eager: every object is
    /// downloaded now, verified, into the local blob store.
    pub fn pull(
        &self,
        s3: &S3BlobStore,
        session_id: &str,
        eager: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<PullReport> {
        crate::progress::command::check_id("session_id", session_id)?;
        let key = manifest_key(s3.prefix(), session_id);
        let mut text = Vec::new();
        // The manifest has no digest of its own: read it unverified.
        let mut reader = s3.open_object_unverified(&key).map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found(format!(
                "manifest s3://{}/{key} (is the session uploaded?)",
                s3.bucket()
            )),
            other => other,
        })?;
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut reader, MAX_MANIFEST_BYTES + 1),
            &mut text,
        )?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::invalid(format!(
                "manifest s3://{}/{key} is larger than {MAX_MANIFEST_BYTES} bytes",
                s3.bucket()
            )));
        }
        let m: SessionManifest = serde_json::from_slice(&text).map_err(|e| {
            Error::invalid(format!(
                "malformed manifest s3://{}/{key}: {e}",
                s3.bucket()
            ))
        })?;
        drop(text);
        // Untrusted: nothing from it is used or stored before it is checked.
        let m = m
            .validate(s3.bucket(), s3.prefix(), session_id)
            .map_err(|e| {
                Error::invalid(format!("refusing manifest s3://{}/{key}: {e}", s3.bucket()))
            })?;
        let mut report = PullReport {
            session_id: session_id.to_owned(),
            artifacts: m.artifacts.len() as u64,
            ..PullReport::default()
        };
        if eager {
            let mut p = Progress {
                files_total: m.artifacts.len() as u64,
                bytes_total: m
                    .artifacts
                    .iter()
                    .fold(0u64, |n, a| n.saturating_add(a.file_size)),
                ..Progress::default()
            };
            for a in &m.artifacts {
                // Checked: the layout key in this bucket.
                let Some(key) = &a.s3_key else { continue };
                let digest: crate::blob::Digest = a.file_hash.parse()?;
                if !self.blobs().exists(&digest)? {
                    let mut r = s3.open_object(key, &digest)?;
                    let info = self.blobs().put(&mut r, &mut |_| {})?;
                    if info.digest != digest {
                        return Err(Error::Corrupt {
                            what: format!("s3://{}/{key} does not hash to {digest}", s3.bucket()),
                        });
                    }
                    report.downloaded += 1;
                    report.bytes += info.size;
                }
                p.files_done += 1;
                p.bytes_done = p.bytes_done.saturating_add(a.file_size);
                progress(p);
            }
        }
        self.index()
            .import_session(&m.session, &m.collections, &m.artifacts)?;
        Ok(report)
    }

    /// Queues what `selector` names (if given), then uploads every due artifact once.
    pub fn upload(
        &self,
        queue: &dyn UploadQueue,
        s3: &S3BlobStore,
        options: &UploadOptions,
        selector: Option<&UploadSelector>,
        retry_failed: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<UploadReport> {
        let mut report = UploadReport::default();
        match (selector, retry_failed) {
            (Some(sel), _) => report.queued = queue.queue_uploads(sel, retry_failed)?,
            // --retry-failed alone: every failed upload, now.
            (None, true) => report.queued = queue.queue_uploads(&UploadSelector::Failed, true)?,
            (None, false) => {}
        }
        let (files_total, bytes_total) = queue.pending_uploads()?;
        let mut p = Progress {
            files_total,
            bytes_total,
            ..Progress::default()
        };
        progress(p);
        // Concurrent runs (other processes too) claim disjoint batches with a lease, so no
        // object is sent twice; the lease of a crashed run expires and its batch is retaken.
        // A live run renews its leases (a heartbeat thread); a killed one stops renewing, and
        // its claims are taken over once its lease runs out.
        let owner = uuid::Uuid::now_v7().to_string();
        let lease_end = |now: chrono::DateTime<Utc>| {
            chrono::Duration::from_std(options.lease)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC)
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let beat = (options.lease / 4).max(Duration::from_millis(50));
                let mut last = std::time::Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50).min(beat));
                    if last.elapsed() >= beat {
                        last = std::time::Instant::now();
                        if let Err(e) = queue.renew_upload_claims(&owner, lease_end(Utc::now())) {
                            tracing::warn!(error = %e, "cannot renew the upload leases");
                        }
                    }
                }
            });
            let result = self.upload_claimed(
                queue,
                s3,
                options,
                &owner,
                &lease_end,
                &mut report,
                &mut p,
                progress,
            );
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        })?;
        Ok(report)
    }

    /// The claim-upload-record loop of [`upload`](Self::upload).
    #[allow(clippy::too_many_arguments)]
    fn upload_claimed(
        &self,
        queue: &dyn UploadQueue,
        s3: &S3BlobStore,
        options: &UploadOptions,
        owner: &str,
        lease_end: &dyn Fn(chrono::DateTime<Utc>) -> chrono::DateTime<Utc>,
        report: &mut UploadReport,
        p: &mut Progress,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let mut tried: HashSet<String> = HashSet::new();
        let mut sessions: HashSet<String> = HashSet::new();
        loop {
            let now = Utc::now();
            let due: Vec<(TestArtifact, u32)> = queue
                .claim_uploads(owner, now, lease_end(now), CLAIM_BATCH)?
                .into_iter()
                .filter(|(a, _)| !tried.contains(&a.artifact_id))
                .collect();
            if due.is_empty() {
                // Another run holds the rest: wait until it records them, or its lease ends
                // (killed) and they are ours to take over.
                if queue.claimed_by_others(owner, now)? > 0 {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                // Every session that got objects gets an up-to-date manifest.
                for sid in &sessions {
                    self.write_manifest(s3, sid)?;
                    report.manifests += 1;
                }
                return Ok(());
            }
            for (a, attempts) in due {
                tried.insert(a.artifact_id.clone());
                let key = object_key(s3.prefix(), &a);
                let base = p.bytes_done;
                let current = *p;
                let result = self.upload_one(s3, options, &a, &key, &mut |b| {
                    progress(Progress {
                        bytes_done: base + b,
                        ..current
                    })
                });
                let outcome = match result {
                    Ok(sent) => {
                        sessions.insert(a.session_id.clone());
                        if sent {
                            report.uploaded += 1;
                            report.bytes += a.file_size;
                        } else {
                            report.already_there += 1;
                        }
                        UploadOutcome::Uploaded {
                            bucket: s3.bucket().to_owned(),
                            key,
                            at: crate::model::now(),
                        }
                    }
                    Err(e) => {
                        let error = e.to_string();
                        report.failed.push((a.artifact_id.clone(), error.clone()));
                        // Saturating: a huge max_backoff means "much later", never a panic.
                        let now = Utc::now();
                        let next_at =
                            chrono::Duration::from_std(backoff(attempts, options.max_backoff))
                                .ok()
                                .and_then(|d| now.checked_add_signed(d))
                                .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
                        UploadOutcome::Failed {
                            error,
                            next_at: Some(next_at),
                        }
                    }
                };
                queue.record_upload(&a.artifact_id, &outcome)?;
                p.files_done += 1;
                p.bytes_done = base + a.file_size;
                progress(*p);
            }
        }
    }

    /// Uploads one artifact; `Ok(false)` when the object was already there with its hash.
    fn upload_one(
        &self,
        s3: &S3BlobStore,
        options: &UploadOptions,
        a: &TestArtifact,
        key: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<bool> {
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::invalid(format!(
                "the S3 key of {:?} would be {} bytes; S3 allows {MAX_KEY_BYTES}",
                a.name,
                key.len()
            )));
        }
        // An object already there counts only when its bytes verify against the digest: the
        // `file-hash` metadata alone is a claim anybody with write access can make.
        if s3.object_hash(key)?.as_deref() == Some(a.file_hash.as_str()) {
            let digest: crate::blob::Digest = a.file_hash.parse()?;
            let verified = s3
                .open_object(key, &digest)
                .and_then(|mut r| crate::blob::drain_verified(&mut r));
            match verified {
                Ok(_) => return Ok(false),
                Err(e) => {
                    tracing::warn!(key, error = %e, "the object in S3 does not match its file-hash; uploading again");
                }
            }
        }
        let (_, mut reader) = self.open(&a.artifact_id)?;
        let mut metadata = vec![
            ("artifact-id", a.artifact_id.clone()),
            ("artifact-type", a.artifact_type.as_str().to_owned()),
            ("upgrade-id", a.upgrade_id.clone()),
            ("file-hash", a.file_hash.clone()),
        ];
        if let Some(t) = &a.task_id {
            metadata.push(("task-id", t.clone()));
        }
        s3.upload_object(
            key,
            &mut reader,
            a.file_size,
            &metadata,
            options.multipart_threshold,
            progress,
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::artifacts::{AddOptions, ArtifactsOptions, NewSession};
    use crate::blob::{BlobStore, Digest, LocalBlobStore, S3Options};
    use crate::model::ArtifactStatus;
    use crate::store::Durability;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};
    use crate::test_support::Moto;

    fn s3(endpoint: &str) -> S3BlobStore {
        S3BlobStore::new(&S3Options {
            bucket: "team".into(),
            prefix: DEFAULT_PREFIX.into(),
            endpoint: Some(endpoint.to_owned()),
            region: Some("us-east-1".into()),
            credentials: Some(("testing".into(), "testing".into())),
        })
        .unwrap()
    }

    #[test]
    fn uploads_use_the_reference_layout_survive_outages_and_back_reads() {
        let moto = Moto::start();
        moto.create_bucket("team");
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let blobs = Arc::new(
            LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap(),
        );
        let target = Arc::new(s3(&moto.url));
        let m = TestArtifactsManager::new(
            store.clone(),
            blobs.clone(),
            ArtifactsOptions {
                auto_upload: true,
                ..ArtifactsOptions::default()
            },
        )
        .with_s3(target.clone());
        let s = m
            .create_session(NewSession {
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                ..NewSession::default()
            })
            .unwrap();
        let c = m
            .create_collection(&s.session_id, "logs", None, Some("ng1"))
            .unwrap();
        let opts = AddOptions {
            task_id: Some("ng1".into()),
            ..AddOptions::default()
        };
        let small = m
            .add_bytes(
                &s.session_id,
                &c.collection_id,
                b"kubelet ok",
                "nodes/kubelet.log",
                &opts,
            )
            .unwrap();
        let big_bytes: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let big = m
            .add_bytes(
                &s.session_id,
                &c.collection_id,
                &big_bytes,
                "dump.bin",
                &opts,
            )
            .unwrap();
        let options = UploadOptions {
            multipart_threshold: 1024 * 1024,
            ..UploadOptions::default()
        };

        // S3 down: both fail, stay queued as `failed` with the error; nothing is lost.
        let down = s3(&format!(
            "http://127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        ));
        let r = m
            .upload(store.as_ref(), &down, &options, None, false, &mut |_| {})
            .unwrap();
        assert_eq!((r.uploaded, r.failed.len()), (0, 2));
        let a = m.artifact(&small.artifact_id).unwrap();
        assert_eq!(a.status, ArtifactStatus::Failed);
        // Not due yet (backoff): a normal run does nothing; --retry-failed forces it.
        let r = m
            .upload(store.as_ref(), &target, &options, None, false, &mut |_| {})
            .unwrap();
        assert_eq!(r.uploaded, 0);
        let r = m
            .upload(
                store.as_ref(),
                &target,
                &options,
                Some(&UploadSelector::All),
                true,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            (r.queued, r.uploaded, r.bytes),
            (2, 2, 10 + big_bytes.len() as u64),
            "{r:?}"
        );
        let a = m.artifact(&small.artifact_id).unwrap();
        let key = format!(
            "eks-upgrade-agent/artifacts/{}/{}/nodes/kubelet.log",
            s.session_id, c.collection_id
        );
        assert_eq!(a.status, ArtifactStatus::Uploaded);
        assert_eq!(a.s3_key.as_deref(), Some(key.as_str()));
        assert_eq!(
            a.s3_url.as_deref(),
            Some(format!("s3://team/{key}").as_str())
        );
        assert!(a.uploaded_at.is_some());
        assert_eq!(
            target.object_hash(&key).unwrap().as_deref(),
            Some(a.file_hash.as_str())
        );

        // Uploading again sends nothing; an object already there with the same hash (e.g. after
        // a crash between the upload and its record) is not re-sent.
        let r = m
            .upload(
                store.as_ref(),
                &target,
                &options,
                Some(&UploadSelector::All),
                true,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!((r.queued, r.uploaded), (0, 0));
        store
            .write(|tx| {
                tx.execute("UPDATE artifacts SET upload_state = 1", [])?;
                Ok(())
            })
            .unwrap();
        let r = m
            .upload(store.as_ref(), &target, &options, None, false, &mut |_| {})
            .unwrap();
        assert_eq!((r.uploaded, r.already_there), (0, 2));

        // The local copy is gone: reads come from S3, verified.
        for a in [&small, &big] {
            let d: Digest = a.file_hash.parse().unwrap();
            assert!(blobs.delete(&d).unwrap());
        }
        assert_eq!(m.read(&small.artifact_id).unwrap(), b"kubelet ok");
        assert!(m.read(&big.artifact_id).unwrap() == big_bytes);
        // Another machine pulls the session from its manifest: lazily, then eagerly.
        let manifest = manifest_key(target.prefix(), &s.session_id);
        assert!(
            target.object_hash(&manifest).unwrap().is_some(),
            "upload wrote the manifest"
        );
        for eager in [false, true] {
            let dir2 = tempfile::tempdir().unwrap();
            let store2 =
                Arc::new(SqliteStore::open(dir2.path(), &SqliteOptions::default()).unwrap());
            let blobs2 = Arc::new(
                LocalBlobStore::open(&dir2.path().join("blobs"), Durability::default()).unwrap(),
            );
            let m2 = TestArtifactsManager::new(store2, blobs2.clone(), ArtifactsOptions::default())
                .with_s3(Arc::new(s3(&moto.url)));
            let r = m2.pull(&target, &s.session_id, eager, &mut |_| {}).unwrap();
            assert_eq!(
                (r.artifacts, r.downloaded),
                (2, if eager { 2 } else { 0 }),
                "{r:?}"
            );
            assert_eq!(
                m2.session(&s.session_id).unwrap(),
                m.session(&s.session_id).unwrap()
            );
            assert_eq!(
                m2.artifact(&big.artifact_id).unwrap(),
                m.artifact(&big.artifact_id).unwrap()
            );
            let d: Digest = big.file_hash.parse().unwrap();
            assert_eq!(blobs2.exists(&d).unwrap(), eager);
            assert!(m2.read(&big.artifact_id).unwrap() == big_bytes);
            let err = m2
                .pull(&target, &s.session_id, eager, &mut |_| {})
                .unwrap_err();
            assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        }
        let err = m
            .pull(&target, "no-such-session", false, &mut |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");

        // A tampered object is caught on the way back.
        target
            .upload_object(&key, &mut &b"tampered"[..], 8, &[], 1 << 20, &mut |_| {})
            .unwrap();
        let err = m.read(&small.artifact_id).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");

        // Delete: the object goes, the row stays as `deleted`.
        let big_key = m.artifact(&big.artifact_id).unwrap().s3_key.unwrap();
        assert!(m.exists(&big.artifact_id).unwrap());
        let d = m.delete_artifact(&big.artifact_id).unwrap();
        assert_eq!(d.status, ArtifactStatus::Deleted);
        assert_eq!(target.object_hash(&big_key).unwrap(), None);
        assert!(!m.exists(&big.artifact_id).unwrap());
        assert!(m.read(&big.artifact_id).is_err());
        // Retention removes the session's objects too.
        m.complete_session(&s.session_id).unwrap();
        let in_40_days = Utc::now() + chrono::Duration::days(40);
        let report = m.cleanup(false, Some(in_40_days)).unwrap();
        assert_eq!(report.sessions.len(), 1);
        assert_eq!(target.object_hash(&key).unwrap(), None);
        assert_eq!(target.object_hash(&manifest).unwrap(), None);
    }

    /// Issue #10, item 15: an object with the right `file-hash` metadata but other bytes is
    /// not trusted as "already there": the upload replaces it.
    #[test]
    fn an_object_with_a_matching_file_hash_but_wrong_bytes_is_uploaded_again() {
        let moto = Moto::start();
        moto.create_bucket("team");
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let blobs = Arc::new(
            LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap(),
        );
        let target = Arc::new(s3(&moto.url));
        let m = TestArtifactsManager::new(
            store.clone(),
            blobs,
            ArtifactsOptions {
                auto_upload: true,
                ..ArtifactsOptions::default()
            },
        )
        .with_s3(target.clone());
        let s = m
            .create_session(NewSession {
                upgrade_id: "u1".into(),
                cluster_name: "prod".into(),
                ..NewSession::default()
            })
            .unwrap();
        let c = m
            .create_collection(&s.session_id, "logs", None, None)
            .unwrap();
        let a = m
            .add_bytes(
                &s.session_id,
                &c.collection_id,
                b"the real bytes",
                "r.log",
                &AddOptions::default(),
            )
            .unwrap();
        let key = object_key(target.prefix(), &a);
        target
            .upload_object(
                &key,
                &mut &b"forged"[..],
                6,
                &[("file-hash", a.file_hash.clone())],
                1 << 20,
                &mut |_| {},
            )
            .unwrap();
        let r = m
            .upload(
                store.as_ref(),
                &target,
                &UploadOptions::default(),
                None,
                false,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!((r.uploaded, r.already_there), (1, 0), "{r:?}");
        let digest: Digest = a.file_hash.parse().unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut target.open_object(&key, &digest).unwrap(), &mut back)
            .unwrap();
        assert_eq!(back, b"the real bytes");
    }

    mod manifest_properties {
        use proptest::prelude::*;

        use super::super::*;
        use crate::model::{ArtifactStatus, ArtifactType, JsonMap};

        const PREFIX: &str = "eks-upgrade-agent/artifacts";

        fn hostile() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                Just(" ".to_owned()),
                Just("..".to_owned()),
                Just("../../etc/passwd".to_owned()),
                Just("/abs".to_owned()),
                Just("a/b".to_owned()),
                Just("a\\b".to_owned()),
                Just("a//b/".to_owned()),
                Just("x\u{1b}[31m".to_owned()),
                Just("S1".to_owned()),
                Just("c2".to_owned()),
                Just("other-team/secret-backup.tar".to_owned()),
                Just("x".repeat(600)),
                "[a-zA-Z0-9/._ \\\\-]{0,12}",
                ".{0,6}",
            ]
        }

        /// `valid` most of the time, else something hostile.
        fn field(valid: &'static str) -> impl Strategy<Value = String> {
            prop_oneof![4 => Just(valid.to_owned()), 1 => hostile()]
        }

        fn time() -> impl Strategy<Value = chrono::DateTime<Utc>> {
            prop_oneof![
                4 => Just(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
                1 => any::<i32>().prop_map(|s| chrono::DateTime::from_timestamp(i64::from(s) * 1000, 0).unwrap()),
                1 => Just(chrono::DateTime::<Utc>::MAX_UTC),
                1 => Just(chrono::DateTime::<Utc>::MIN_UTC),
            ]
        }

        #[derive(Debug, Clone)]
        enum KeyChoice {
            None,
            Layout,
            OtherPrefix,
            Given(String),
        }

        fn artifact() -> impl Strategy<Value = (TestArtifact, KeyChoice)> {
            let ids = (field("a1"), field("S1"), field("c1"), field("u1"));
            let names = (field("logs/kubelet.log"), field("logs/kubelet.log"));
            let hash = prop_oneof![
                3 => Just("ab".repeat(32)),
                1 => Just("AB".repeat(32)),
                1 => "[0-9a-fA-Fg]{0,70}",
                1 => hostile(),
            ];
            let key = prop_oneof![
                2 => Just(KeyChoice::Layout),
                1 => Just(KeyChoice::None),
                1 => Just(KeyChoice::OtherPrefix),
                1 => hostile().prop_map(KeyChoice::Given),
            ];
            let bucket = prop_oneof![
                Just(None),
                Just(Some("team".to_owned())),
                Just(Some("other".to_owned()))
            ];
            let tags = prop::collection::vec(field("smoke"), 0..3);
            let misc = (
                any::<u64>(),
                prop::sample::select(ArtifactStatus::ALL),
                prop::sample::select(ArtifactType::ALL),
                time(),
                prop::option::of(field("t1")),
                prop_oneof![4 => Just(0usize), 1 => Just(70_000usize)],
            );
            (ids, names, hash, key, bucket, tags, misc).prop_map(
                |(
                    (id, sid, cid, uid),
                    (name, export),
                    hash,
                    key,
                    bucket,
                    tags,
                    (size, status, ty, at, task, meta),
                )| {
                    let mut metadata = JsonMap::new();
                    if meta > 0 {
                        metadata.insert("big".into(), "x".repeat(meta).into());
                    }
                    (
                        TestArtifact {
                            artifact_id: id,
                            session_id: sid,
                            collection_id: cid,
                            name,
                            export_name: export,
                            description: None,
                            artifact_type: ty,
                            file_size: size,
                            file_hash: hash,
                            status,
                            s3_bucket: bucket,
                            s3_key: None,
                            s3_url: Some("s3://other/x".into()),
                            created_at: at,
                            uploaded_at: None,
                            task_id: task,
                            step_id: None,
                            upgrade_id: uid,
                            tags,
                            metadata,
                        },
                        key,
                    )
                },
            )
        }

        fn manifest() -> impl Strategy<Value = SessionManifest> {
            let session = (
                (field("S1"), field("u1"), field("prod"), field("nightly")),
                prop_oneof![4 => Just(30u32), 1 => any::<u32>()],
                time(),
                prop::option::of(time()),
                prop_oneof![9 => Just(1u32), 1 => any::<u32>()],
            );
            let collections =
                prop::collection::vec((field("c1"), field("S1"), field("logs"), time()), 0..3);
            (
                session,
                collections,
                prop::collection::vec(artifact(), 0..4),
            )
                .prop_map(
                    |(
                        ((sid, uid, cluster, name), retention, started, completed, format),
                        cols,
                        arts,
                    )| {
                        let artifacts = arts
                            .into_iter()
                            .map(|(mut a, key)| {
                                a.s3_key = match key {
                                    KeyChoice::None => None,
                                    KeyChoice::Layout => Some(object_key(PREFIX, &a)),
                                    KeyChoice::OtherPrefix => Some(object_key("elsewhere", &a)),
                                    KeyChoice::Given(k) => Some(k),
                                };
                                a
                            })
                            .collect();
                        SessionManifest {
                            format,
                            session: TestSession {
                                session_id: sid,
                                upgrade_id: uid,
                                cluster_name: cluster,
                                name,
                                description: None,
                                started_at: started,
                                completed_at: completed,
                                retention_days: retention,
                            },
                            collections: cols
                                .into_iter()
                                .map(|(id, sid, name, at)| ArtifactCollection {
                                    collection_id: id,
                                    session_id: sid,
                                    name,
                                    description: None,
                                    task_id: None,
                                    created_at: at,
                                })
                                .collect(),
                            artifacts,
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Whatever a manifest holds, validation never panics, and what it accepts is only
            /// ever valid fields and layout keys in the bucket pulled from.
            #[test]
            fn hostile_manifests_never_yield_a_key_outside_the_layout(m in manifest()) {
                let Ok(v) = m.validate("team", PREFIX, "S1") else { return Ok(()) };
                prop_assert_eq!(&v.session.session_id, "S1");
                prop_assert!((1..=36_500).contains(&v.session.retention_days));
                crate::progress::command::check_id("upgrade_id", &v.session.upgrade_id).unwrap();
                let cols: std::collections::HashSet<&str> =
                    v.collections.iter().map(|c| c.collection_id.as_str()).collect();
                for c in &v.collections {
                    prop_assert_eq!(&c.session_id, "S1");
                    crate::progress::command::check_id("collection_id", &c.collection_id).unwrap();
                }
                for a in &v.artifacts {
                    prop_assert_eq!(&a.session_id, "S1");
                    prop_assert!(cols.contains(a.collection_id.as_str()));
                    prop_assert_eq!(&a.upgrade_id, &v.session.upgrade_id);
                    prop_assert_eq!(crate::artifacts::names::sanitize_name(&a.name).unwrap(), a.name.clone());
                    prop_assert_eq!(crate::artifacts::names::sanitize_name(&a.export_name).unwrap(), a.export_name.clone());
                    prop_assert!(a.file_hash.len() == 64
                        && a.file_hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                    prop_assert!(a.file_size <= i64::MAX as u64);
                    match &a.s3_key {
                        Some(k) => {
                            prop_assert_eq!(k, &object_key(PREFIX, a));
                            let dir = format!("{}/S1/{}/", PREFIX, a.collection_id);
                            prop_assert!(k.starts_with(&dir));
                            prop_assert!(!k.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                            prop_assert_eq!(a.s3_bucket.as_deref(), Some("team"));
                            prop_assert_eq!(a.s3_url.clone(), Some(format!("s3://team/{k}")));
                        }
                        None => prop_assert!(a.s3_bucket.is_none() && a.s3_url.is_none()),
                    }
                }
                // Validation is idempotent: what it returns passes again unchanged.
                prop_assert_eq!(v.validate("team", PREFIX, "S1").unwrap(), v);
            }
        }

        #[test]
        fn a_valid_manifest_passes_and_a_wrong_key_is_named() {
            let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
            let mut a = TestArtifact {
                artifact_id: "a1".into(),
                session_id: "S1".into(),
                collection_id: "c1".into(),
                name: "r.xml".into(),
                export_name: "r.xml".into(),
                description: None,
                artifact_type: ArtifactType::TestResult,
                file_size: 3,
                file_hash: "AB".repeat(32),
                status: ArtifactStatus::Uploaded,
                s3_bucket: Some("other".into()),
                s3_key: None,
                s3_url: None,
                created_at: at,
                uploaded_at: Some(at),
                task_id: None,
                step_id: None,
                upgrade_id: "u1".into(),
                tags: vec![],
                metadata: JsonMap::new(),
            };
            a.s3_key = Some(object_key(PREFIX, &a));
            let mut m = SessionManifest {
                format: 1,
                session: TestSession {
                    session_id: "S1".into(),
                    upgrade_id: "u1".into(),
                    cluster_name: "prod".into(),
                    name: "n".into(),
                    description: None,
                    started_at: at,
                    completed_at: Some(at),
                    retention_days: 30,
                },
                collections: vec![ArtifactCollection {
                    collection_id: "c1".into(),
                    session_id: "S1".into(),
                    name: "logs".into(),
                    description: None,
                    task_id: None,
                    created_at: at,
                }],
                artifacts: vec![a],
            };
            let v = m.validate("team", PREFIX, "S1").unwrap();
            assert_eq!(v.artifacts[0].s3_bucket.as_deref(), Some("team"));
            assert_eq!(v.artifacts[0].file_hash, "ab".repeat(32));
            m.artifacts[0].s3_key = Some("eks-upgrade-agent/artifacts/VICTIM/c1/r.xml".into());
            let err = m.validate("team", PREFIX, "S1").unwrap_err().to_string();
            assert!(
                err.contains("claims S3 key") && err.contains("S1/c1/r.xml"),
                "{err}"
            );
            m.artifacts[0].s3_key = Some(object_key(PREFIX, &m.artifacts[0]));
            m.session.retention_days = u32::MAX;
            let err = m.validate("team", PREFIX, "S1").unwrap_err().to_string();
            assert!(err.contains("retention_days must be in 1..=36500"), "{err}");
        }
    }
}
