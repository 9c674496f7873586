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

pub use super::{PullReport, UploadReport};

pub use super::manifest::{MAX_MANIFEST_BYTES, SessionManifest, manifest_key, object_key};
use super::{Progress, TestArtifactsManager};
use crate::blob::S3BlobStore;
use crate::error::{Error, Result};
use crate::model::{ArtifactStatus, TestArtifact};
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

/// The key of `a` in `s3` when it was uploaded there under the layout; `None` for an artifact
/// recorded in another bucket or under a key that is not its layout key (never deleted).
pub(crate) fn owned_key(s3: &S3BlobStore, a: &TestArtifact) -> Option<String> {
    let key = a.s3_key.as_deref()?;
    let expected = object_key(s3.prefix(), a);
    (a.s3_bucket.as_deref().is_none_or(|b| b == s3.bucket()) && key == expected).then_some(expected)
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
        crate::store::domain::command::check_id("session_id", session_id)?;
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
        // A report whose run the origin never recorded is not this store's to sweep.
        let mut artifacts = m.artifacts;
        for a in &mut artifacts {
            a.metadata.remove(crate::store::PENDING_RUN_KEY);
        }
        self.index()
            .import_session(&m.session, &m.collections, &artifacts)?;
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
        let claims = Claims::default();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let beat = (options.lease / 4).max(Duration::from_millis(50));
                let mut last = std::time::Instant::now();
                // The last renewal that reached the store: a run that cannot renew for a whole
                // lease (the store unreachable from here) may have lost every claim to another.
                let mut renewed_at = std::time::Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50).min(beat));
                    if last.elapsed() >= beat {
                        last = std::time::Instant::now();
                        // Judged: what was held before the renewal began (a claim made
                        // meanwhile may not be seen by it).
                        let before = claims.held();
                        let asked = std::time::Instant::now();
                        match queue.renew_upload_claims(&owner, lease_end(Utc::now())) {
                            Ok(renewed) => {
                                // The lease runs from when it was asked for, at the latest.
                                renewed_at = asked;
                                claims.lost_unless(&before, &renewed);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot renew the upload leases");
                                // Given up a beat before the lease ends (beats come every
                                // quarter lease), so no other takes over while this one sends.
                                if renewed_at.elapsed() + beat >= options.lease {
                                    claims.lost_unless(&before, &[]);
                                }
                            }
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
                &claims,
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
        claims: &Claims,
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
            claims.hold(due.iter().map(|(a, _)| a.artifact_id.clone()));
            for (a, attempts) in due {
                tried.insert(a.artifact_id.clone());
                let key = object_key(s3.prefix(), &a);
                let base = p.bytes_done;
                let current = *p;
                let id = a.artifact_id.as_str();
                let result = if claims.is_lost(id) {
                    Err(lease_lost(id))
                } else {
                    self.upload_one(s3, options, &a, &key, &|| claims.is_lost(id), &mut |b| {
                        progress(Progress {
                            bytes_done: base + b,
                            ..current
                        })
                    })
                };
                // Lost to another uploader (this run stalled past its lease): stopped, and
                // its outcome is not ours to record.
                if claims.is_lost(id) {
                    tracing::warn!(artifact = id, "upload lease lost: stopped, outcome dropped");
                    claims.release(id);
                    report.lost += 1;
                    p.files_done += 1;
                    p.bytes_done = base + a.file_size;
                    progress(*p);
                    continue;
                }
                let mut sent = None;
                let outcome = match result {
                    Ok(s) => {
                        sent = Some(s);
                        UploadOutcome::Uploaded {
                            bucket: s3.bucket().to_owned(),
                            key: key.clone(),
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
                let row = queue.record_upload(owner, &a.artifact_id, &outcome)?;
                if let Some(sent) = sent {
                    // Counted only if the store took it: it refuses the outcome of a claim
                    // lost before the heartbeat noticed (another took the entry over).
                    if row.status != ArtifactStatus::Uploaded
                        || row.s3_key.as_deref() != Some(key.as_str())
                    {
                        tracing::warn!(artifact = id, "upload lease lost: outcome refused");
                        report.lost += 1;
                    } else if sent {
                        sessions.insert(a.session_id.clone());
                        report.uploaded += 1;
                        report.bytes += a.file_size;
                    } else {
                        sessions.insert(a.session_id.clone());
                        report.already_there += 1;
                    }
                }
                claims.release(id);
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
        lost: &(dyn Fn() -> bool + Sync),
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
        // One pass: a replica's blob cache does not keep what it uploads for others.
        let (_, reader) = self.open_with(&a.artifact_id, false)?;
        // Stops sending as soon as the heartbeat finds the lease lost.
        let mut reader = Fenced {
            inner: reader,
            lost,
            id: &a.artifact_id,
        };
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

/// The claims of an upload run, as its heartbeat sees them: the artifacts it holds, and those
/// whose lease a renewal found lost.
#[derive(Debug, Default)]
struct Claims {
    held: std::sync::Mutex<HashSet<String>>,
    lost: std::sync::Mutex<HashSet<String>>,
}

impl Claims {
    fn held(&self) -> HashSet<String> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn hold(&self, ids: impl Iterator<Item = String>) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
    }

    fn release(&self, id: &str) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// After a renewal that extended `renewed`: what was held before it and still is, but
    /// was not renewed, is lost.
    fn lost_unless(&self, before: &HashSet<String>, renewed: &[String]) {
        let renewed: HashSet<&str> = renewed.iter().map(String::as_str).collect();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        for id in before {
            if held.contains(id) && !renewed.contains(id.as_str()) {
                lost.insert(id.clone());
            }
        }
    }

    fn is_lost(&self, id: &str) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }
}

fn lease_lost(id: &str) -> Error {
    Error::Backend {
        message: format!("the upload lease of artifact {id} was lost to another uploader"),
        source: None,
    }
}

/// A reader that fails once `lost` says the upload's lease is gone.
struct Fenced<'a, R> {
    inner: R,
    lost: &'a (dyn Fn() -> bool + Sync),
    id: &'a str,
}

impl<R: std::io::Read> std::io::Read for Fenced<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.lost)() {
            return Err(std::io::Error::other(lease_lost(self.id)));
        }
        self.inner.read(buf)
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

    /// A live run keeps its claims for as long as it runs, however short the lease: a second
    /// run started meanwhile takes none of them (it waits, then finds nothing left). Without the
    /// heartbeat, the second run takes over after one lease and sends the objects again.
    #[test]
    fn a_live_run_keeps_its_claims_beyond_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        live_run_keeps_its_claims(store.clone(), store.as_ref());
    }

    /// Guarantee G92: the heartbeat on PostgreSQL (leases judged on the database's clock): a
    /// run longer than its lease keeps its claims through renewals.
    #[test]
    fn a_live_run_keeps_its_claims_beyond_its_lease_on_postgresql() {
        use crate::store::postgres::{PostgresOptions, PostgresStore};
        let pg = crate::test_support::PgCluster::start();
        let store = Arc::new(
            PostgresStore::open(&pg.create_database(), &PostgresOptions::default()).unwrap(),
        );
        live_run_keeps_its_claims(store.clone(), store.as_ref());
    }

    fn live_run_keeps_its_claims(
        index: Arc<dyn crate::store::ArtifactIndex>,
        queue: &dyn UploadQueue,
    ) {
        let store = queue;
        let moto = Moto::start();
        moto.create_bucket("team");
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(
            LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap(),
        );
        let target = s3(&moto.url);
        let m = TestArtifactsManager::new(
            index,
            blobs,
            ArtifactsOptions {
                auto_upload: true,
                ..ArtifactsOptions::default()
            },
        );
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
        for i in 0..4 {
            m.add_bytes(
                &s.session_id,
                &c.collection_id,
                format!("log {i}").as_bytes(),
                &format!("f{i}.log"),
                &AddOptions::default(),
            )
            .unwrap();
        }
        let options = UploadOptions {
            lease: Duration::from_millis(200),
            ..UploadOptions::default()
        };
        let started = std::sync::Barrier::new(2);
        let (first, second) = std::thread::scope(|scope| {
            let first = scope.spawn(|| {
                let mut told = false;
                m.upload(store, &target, &options, None, false, &mut |p| {
                    // The first report after the start: the run holds its claims.
                    if !told && (p.bytes_done > 0 || p.files_done > 0) {
                        told = true;
                        started.wait();
                    }
                    // A slow run: every progress report takes 300 ms, so the run lasts
                    // many leases.
                    std::thread::sleep(Duration::from_millis(300));
                })
                .unwrap()
            });
            started.wait();
            let second = m
                .upload(store, &target, &options, None, false, &mut |_| {})
                .unwrap();
            (first.join().unwrap(), second)
        });
        assert_eq!(first.uploaded, 4, "{first:?}");
        assert_eq!(
            (second.uploaded, second.already_there, second.failed.len()),
            (0, 0, 0),
            "the second run took over a live run's claims: {second:?}"
        );
    }

    /// What [`lost_to_a_takeover`] saw of the lost run's sending.
    struct Sent {
        /// The most bytes the run reported sent while it was sending.
        bytes: u64,
        /// Whether the object is in S3 after the run.
        in_s3: bool,
        /// Multipart uploads left open in the bucket (parts S3 would keep and bill).
        open_multipart: usize,
    }

    /// A run whose artifact (`body`, sent in one request up to `multipart_threshold`, else in
    /// parts of 8 MiB) another uploader takes over (and fails) while the run's progress
    /// callback stalls for `stall` at the first report of bytes sent: the run counts it lost,
    /// records nothing, and the row keeps the other's failure.
    fn lost_to_a_takeover(
        lease: Duration,
        stall: Duration,
        body: &[u8],
        multipart_threshold: u64,
    ) -> Sent {
        let moto = Moto::start();
        moto.create_bucket("team");
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let blobs = Arc::new(
            LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap(),
        );
        let target = s3(&moto.url);
        let m = TestArtifactsManager::new(
            store.clone(),
            blobs,
            ArtifactsOptions {
                auto_upload: true,
                ..ArtifactsOptions::default()
            },
        );
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
                body,
                "a.log",
                &AddOptions::default(),
            )
            .unwrap();
        let options = UploadOptions {
            lease,
            multipart_threshold,
            ..UploadOptions::default()
        };
        let mut stolen = false;
        let mut bytes = 0;
        let report = m
            .upload(store.as_ref(), &target, &options, None, false, &mut |p| {
                if p.files_done == 0 {
                    // While sending (the file counts done, sent or not, once it ends).
                    bytes = bytes.max(p.bytes_done);
                }
                if stolen || p.bytes_done == 0 {
                    return;
                }
                stolen = true;
                // The run stalls here past its lease; another uploader (whose claim is judged
                // an hour later) takes the artifact over, fails, and records that.
                let later = Utc::now() + chrono::Duration::hours(1);
                let taken = store
                    .claim_uploads("other", later, later + chrono::Duration::minutes(1), 10)
                    .unwrap();
                assert_eq!(taken.len(), 1);
                store
                    .record_upload(
                        "other",
                        &a.artifact_id,
                        &UploadOutcome::Failed {
                            error: "other failed".into(),
                            next_at: Some(later + chrono::Duration::hours(1)),
                        },
                    )
                    .unwrap();
                std::thread::sleep(stall);
            })
            .unwrap();
        assert!(stolen);
        assert_eq!(
            (report.uploaded, report.lost, report.failed.len()),
            (0, 1, 0),
            "{report:?}"
        );
        let row = m.artifact(&a.artifact_id).unwrap();
        assert_eq!(row.status, ArtifactStatus::Failed, "{row:?}");
        assert_eq!(
            row.s3_key, None,
            "the lost run's outcome was recorded: {row:?}"
        );
        let key = object_key(target.prefix(), &a);
        let listing = ureq::get(format!("{}/team?uploads", moto.url))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap();
        assert!(listing.contains("ListMultipartUploadsResult"), "{listing}");
        Sent {
            bytes,
            in_s3: target.object_hash(&key).unwrap().is_some(),
            open_multipart: listing.matches("<Upload>").count(),
        }
    }

    /// Guarantee G92: a run that stalls past its lease while another uploader takes the
    /// artifact over finds out at its next heartbeat (the renewal no longer names it): it
    /// stops, and its outcome is not recorded, even after the other recorded a failure (the
    /// claim is the fencing token).
    #[test]
    fn a_run_that_lost_its_lease_stops_and_records_nothing() {
        // Found at the next heartbeat: the lease (0.2 s) ends during the stall.
        lost_to_a_takeover(
            Duration::from_millis(200),
            Duration::from_millis(400),
            b"a log",
            DEFAULT_MULTIPART_THRESHOLD,
        );
    }

    /// Guarantee G92: a run that finds its lease lost in the middle of an object's body stops
    /// sending it: the rest of the body is not read, the multipart upload is abandoned (no
    /// object in S3), and nothing is recorded.
    #[test]
    fn a_run_that_loses_its_lease_mid_body_stops_sending() {
        // 20 MiB in parts of 8 MiB: the stall comes after the first part.
        let body = vec![b'x'; 20 * 1024 * 1024];
        let sent = lost_to_a_takeover(
            Duration::from_millis(200),
            Duration::from_millis(400),
            &body,
            1024 * 1024,
        );
        assert!(
            sent.bytes < body.len() as u64,
            "the whole body was sent after the lease was lost ({} bytes)",
            sent.bytes
        );
        assert!(
            !sent.in_s3,
            "the object was completed after the lease was lost"
        );
        assert_eq!(sent.open_multipart, 0, "the multipart upload was left open");
    }

    /// Guarantee G92: when the store refuses a run's outcome (another took the artifact over
    /// before the run's heartbeat noticed), the report counts it lost, not uploaded.
    #[test]
    fn an_outcome_the_store_refuses_is_not_counted_uploaded() {
        // The lease outlives the run: only the store's refusal of the outcome tells.
        lost_to_a_takeover(
            Duration::from_secs(600),
            Duration::ZERO,
            b"a log",
            DEFAULT_MULTIPART_THRESHOLD,
        );
    }

    /// An upload queue whose renewals fail (the store unreachable from this replica).
    #[derive(Debug)]
    struct NoRenewals(Arc<SqliteStore>);

    impl UploadQueue for NoRenewals {
        fn queue_uploads(&self, selector: &UploadSelector, retry_failed: bool) -> Result<u64> {
            self.0.queue_uploads(selector, retry_failed)
        }
        fn claim_uploads(
            &self,
            owner: &str,
            now: chrono::DateTime<Utc>,
            lease_until: chrono::DateTime<Utc>,
            limit: usize,
        ) -> Result<Vec<(TestArtifact, u32)>> {
            self.0.claim_uploads(owner, now, lease_until, limit)
        }
        fn renew_upload_claims(&self, _: &str, _: chrono::DateTime<Utc>) -> Result<Vec<String>> {
            Err(Error::Backend {
                message: "the database is unreachable".into(),
                source: None,
            })
        }
        fn claimed_by_others(&self, owner: &str, now: chrono::DateTime<Utc>) -> Result<u64> {
            self.0.claimed_by_others(owner, now)
        }
        fn pending_uploads(&self) -> Result<(u64, u64)> {
            self.0.pending_uploads()
        }
        fn record_upload(
            &self,
            owner: &str,
            artifact_id: &str,
            outcome: &UploadOutcome,
        ) -> Result<TestArtifact> {
            self.0.record_upload(owner, artifact_id, outcome)
        }
    }

    /// Guarantee G92: a run whose renewals fail for a whole lease (the store unreachable from
    /// here, S3 reachable) counts its claims lost and stops sending: another uploader may
    /// hold them by now.
    #[test]
    fn a_run_that_cannot_renew_for_a_lease_stops_sending() {
        let moto = Moto::start();
        moto.create_bucket("team");
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let blobs = Arc::new(
            LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap(),
        );
        let target = s3(&moto.url);
        let m = TestArtifactsManager::new(
            store.clone(),
            blobs,
            ArtifactsOptions {
                auto_upload: true,
                ..ArtifactsOptions::default()
            },
        );
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
                &vec![b'x'; 20 * 1024 * 1024],
                "a.log",
                &AddOptions::default(),
            )
            .unwrap();
        let options = UploadOptions {
            lease: Duration::from_millis(200),
            multipart_threshold: 1024 * 1024,
            ..UploadOptions::default()
        };
        let mut stalled = false;
        let report = m
            .upload(
                &NoRenewals(store.clone()),
                &target,
                &options,
                None,
                false,
                &mut |p| {
                    if !stalled && p.bytes_done > 0 {
                        stalled = true;
                        std::thread::sleep(Duration::from_millis(600));
                    }
                },
            )
            .unwrap();
        assert_eq!(
            (report.uploaded, report.lost),
            (0, 1),
            "a run that could not renew its lease kept sending: {report:?}"
        );
        let key = object_key(target.prefix(), &a);
        assert!(target.object_hash(&key).unwrap().is_none());
    }

    /// README "Sharing artifacts through S3": a failed upload is retried after a capped
    /// exponential backoff with jitter: 10 s doubled per attempt, each draw in [50%, 100%] of
    /// it, never above the cap, and draws differ.
    #[test]
    fn the_upload_retry_delay_grows_exponentially_up_to_the_cap_with_jitter() {
        let cap = Duration::from_secs(600);
        for attempt in 0..40u32 {
            let full = Duration::from_secs(10)
                .saturating_mul(1 << attempt.min(16))
                .min(cap);
            for _ in 0..20 {
                let delay = backoff(attempt, cap);
                assert!(
                    delay >= full / 2 && delay <= full,
                    "attempt {attempt}: {delay:?} not within [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
        assert!(backoff(3, cap) >= Duration::from_secs(40));
        assert!(backoff(u32::MAX, cap) <= cap);
        assert!(backoff(u32::MAX, Duration::MAX) >= Duration::from_secs(10 << 15));
        let draws: std::collections::HashSet<Duration> =
            (0..100).map(|_| backoff(2, cap)).collect();
        assert!(draws.len() > 20, "{} distinct delays of 100", draws.len());
    }

    /// A pull drops the ingest's mark ([`crate::store::PENDING_RUN_KEY`]) that an uploaded
    /// report of a run not yet recorded carries in its manifest: the pulled report has no
    /// such key, and the puller's `gc` (whose store holds no run of it) keeps it (G121).
    #[test]
    fn a_pulled_report_loses_the_ingest_mark_and_gc_keeps_it() {
        let key = crate::store::PENDING_RUN_KEY;
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
            .create_collection(&s.session_id, "validation", None, None)
            .unwrap();
        // What an ingest leaves while (or when never) recording its run.
        let report = m
            .add_reader_as(
                &s.session_id,
                &c.collection_id,
                &mut &b"<testsuite/>"[..],
                "r.xml",
                &AddOptions {
                    artifact_type: Some(crate::model::ArtifactType::TestResult),
                    metadata: serde_json::from_value(serde_json::json!({
                        "run_id": "r-elsewhere",
                        "phase": "pre",
                        key: "r-elsewhere",
                    }))
                    .unwrap(),
                    ..AddOptions::default()
                },
                true,
            )
            .unwrap();
        m.upload(
            store.as_ref(),
            &target,
            &UploadOptions::default(),
            None,
            false,
            &mut |_| {},
        )
        .unwrap();
        let mut manifest = String::new();
        std::io::Read::read_to_string(
            &mut target
                .open_object_unverified(&manifest_key(target.prefix(), &s.session_id))
                .unwrap(),
            &mut manifest,
        )
        .unwrap();
        assert!(manifest.contains(key), "the manifest carries the mark");

        let dir2 = tempfile::tempdir().unwrap();
        let store2 = Arc::new(SqliteStore::open(dir2.path(), &SqliteOptions::default()).unwrap());
        let blobs2 = Arc::new(
            LocalBlobStore::open(&dir2.path().join("blobs"), Durability::default()).unwrap(),
        );
        let m2 = TestArtifactsManager::new(
            store2,
            blobs2,
            ArtifactsOptions {
                orphan_report_age: Duration::ZERO,
                ..ArtifactsOptions::default()
            },
        )
        .with_s3(target.clone());
        m2.pull(&target, &s.session_id, true, &mut |_| {}).unwrap();
        let pulled = m2.artifact(&report.artifact_id).unwrap();
        assert!(!pulled.metadata.contains_key(key), "{:?}", pulled.metadata);
        assert_eq!(pulled.metadata.get("run_id"), Some(&"r-elsewhere".into()));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(m2.gc().unwrap().orphan_reports_removed, 0);
        assert_ne!(
            m2.artifact(&report.artifact_id).unwrap().status,
            ArtifactStatus::Deleted
        );
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
}
