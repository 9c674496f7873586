//! Blob releases on PostgreSQL (schema 9, G105): deleting a blob's shared (S3) copy with no
//! network call inside a transaction that others wait for.
//!
//! A deletion inside the transaction holding the digest's lock is unsafe on a shared database:
//! if S3 answers after `idle_in_transaction_session_timeout`, PostgreSQL ends the session and
//! frees the lock, another replica stores the same bytes and commits its row, and the late
//! delete then removes them. So a release runs in three steps, none of which waits for S3
//! while holding anything:
//!
//! 1. under the digest's lock, if no live artifact references the digest, commit a mark
//!    (`blob_releases`: the digest, the deleter's token, the database time it was set);
//! 2. delete the S3 object, outside any transaction, unless the mark has grown older (by the
//!    deleter's own clock) than [`SEND_BUDGET`];
//! 3. mark the release finished if the mark is still the deleter's.
//!
//! A finished release keeps its row ([`KEEP_FINISHED`]) with the time it finished. An add of
//! the digest checks that its bytes are in S3 before its index transaction (no S3 call inside
//! either), then, under the same lock in that transaction, that no release is in progress and
//! none finished since the check began; otherwise it refuses ([`BlobReleased`]), and the add
//! waits for the release to end ([`ArtifactIndex::await_blob_release`]), stores the bytes
//! again and indexes again. So an add commits only when every release that began before it
//! finished before its check (its delete landed before the check saw the bytes) and every
//! later one sees the add's row. A mark older than [`STALE`] belongs to a deleter that stopped (or whose delete
//! failed): its delete can no longer land (it sends none after [`SEND_BUDGET`], and S3
//! requests time out well within the rest), so an add may take it over and a deleter (`gc`)
//! finishes it.
//!
//! [`ArtifactIndex::await_blob_release`]: crate::store::ArtifactIndex::await_blob_release

use std::time::{Duration, Instant};

use super::artifacts::lock_digest;
use super::progress::{Db, PostgresStore, Tx};
use crate::blob::Digest;
use crate::error::{Error, Result};
use crate::model::ArtifactStatus;
use crate::store::BlobReleased;

/// Schema 9: the marks of releases in progress.
pub(super) const SCHEMA_9: &str = r#"
CREATE TABLE blob_releases (
    digest      TEXT PRIMARY KEY,
    token       TEXT NOT NULL,
    marked_at   TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ
);
"#;

/// A deleter sends no delete once its mark is older than this (by its own monotonic clock,
/// started before the mark was set).
pub(crate) const SEND_BUDGET: Duration = Duration::from_secs(60);

/// A mark older than this (by the database's clock) is a stopped deleter's: longer than
/// [`SEND_BUDGET`] plus the longest an S3 delete can take (`S3BlobStore`: up to three
/// requests of at most 300 s each, retries within 20 s), so its delete can no longer land.
pub(crate) const STALE: Duration = Duration::from_secs(30 * 60);

/// A mark whose delete failed goes stale this long after the failure: longer than S3 takes to
/// carry out a request it received before the client gave up on it.
pub(crate) const FAILED_GRACE: Duration = Duration::from_secs(20);

/// A finished release is kept this long (by the database's clock), so that an add that
/// checked its bytes before the release finished, and is indexed after, knows to check again.
/// An add whose check is older than this checks again.
pub(crate) const KEEP_FINISHED: Duration = Duration::from_secs(10 * 60);

/// How often a waiting add looks at a mark again.
const POLL: Duration = Duration::from_millis(50);

/// Whether a live artifact references `d`.
fn used<C: postgres::GenericClient>(db: &mut Db<'_, C>, d: &Digest) -> Result<bool> {
    Ok(db
        .opt(
            "SELECT 1 FROM artifacts WHERE file_hash = $1 AND status != $2 LIMIT 1",
            &[&d.to_hex(), &ArtifactStatus::Deleted.code()],
        )?
        .is_some())
}

/// What stops an add of `d` whose bytes were found in the shared store at `checked` (the
/// database's clock, seconds since the epoch): `Some(true)`, a release in progress;
/// `Some(false)`, a release that finished since (its delete may have landed after the
/// check), or a check too old to judge; `None`, nothing. Call it holding the digest's lock.
pub(super) fn conflict(tx: &mut Tx<'_, '_>, d: &Digest, checked: f64) -> Result<Option<bool>> {
    let row = tx.one(
        "SELECT (SELECT finished_at IS NULL FROM blob_releases WHERE digest = $1 \
         AND (finished_at IS NULL OR extract(epoch FROM finished_at)::float8 >= $2)), \
         extract(epoch FROM clock_timestamp())::float8 - $2 > $3",
        &[&d.to_hex(), &checked, &KEEP_FINISHED.as_secs_f64()],
    )?;
    let release: Option<bool> = row.get(0);
    let too_old: bool = row.get(1);
    Ok(release.or(too_old.then_some(false)))
}

/// Whether a release of `d` is in progress (call it holding the digest's lock).
pub(super) fn in_progress(tx: &mut Tx<'_, '_>, d: &Digest) -> Result<bool> {
    Ok(tx
        .opt(
            "SELECT 1 FROM blob_releases WHERE digest = $1 AND finished_at IS NULL",
            &[&d.to_hex()],
        )?
        .is_some())
}

/// The refusal of an add whose blob a release holds or removed.
pub(super) fn refused(name: &str, d: &Digest, marked: bool) -> Error {
    let why = if marked {
        "is being released by another replica (its gc, cleanup or delete)"
    } else {
        "disappeared before it was indexed (a concurrent gc, cleanup or delete released it)"
    };
    Error::Backend {
        message: format!("the blob of {name:?} (sha256:{d}) {why}; add it again"),
        source: Some(Box::new(BlobReleased(*d))),
    }
}

fn stale_secs() -> f64 {
    STALE.as_secs_f64()
}

impl PostgresStore {
    /// [`ArtifactIndex::delete_unreferenced`](crate::store::ArtifactIndex::delete_unreferenced)
    /// on the database: mark, delete outside any transaction, unmark (see the module docs).
    /// A delete that fails leaves its mark (finished by `gc` once stale) and fails the call.
    pub(super) fn release_blobs(
        &self,
        digests: &[Digest],
        delete: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<Digest>> {
        let mut deleted = Vec::new();
        for d in digests {
            let hex = d.to_hex();
            let token = uuid::Uuid::now_v7().to_string();
            let began = Instant::now();
            let marked = self.write(|tx| {
                // An add of this digest either committed before (its row is seen now) or
                // checks for the mark after we commit.
                lock_digest(tx, d)?;
                if used(tx, d)? {
                    // A stale mark on a digest in use (an import committed rows meanwhile)
                    // is finished, so `gc` does not find it again.
                    tx.exec(
                        "UPDATE blob_releases SET finished_at = clock_timestamp() \
                         WHERE digest = $1 AND finished_at IS NULL \
                         AND marked_at < clock_timestamp() - make_interval(secs => $2)",
                        &[&hex, &stale_secs()],
                    )?;
                    return Ok(false);
                }
                // A fresh mark is another deleter's, at work: left to it. A stale one is
                // taken over.
                let n = tx.exec(
                    "INSERT INTO blob_releases (digest, token, marked_at) \
                     VALUES ($1, $2, clock_timestamp()) \
                     ON CONFLICT (digest) DO UPDATE SET token = excluded.token, \
                     marked_at = excluded.marked_at, finished_at = NULL \
                     WHERE blob_releases.finished_at IS NOT NULL \
                     OR blob_releases.marked_at < clock_timestamp() - make_interval(secs => $3)",
                    &[&hex, &token, &stale_secs()],
                )?;
                Ok(n == 1)
            })?;
            if !marked {
                continue;
            }
            if began.elapsed() > SEND_BUDGET {
                // Too late to send: the mark could be taken for stale before the delete
                // lands. Nothing was sent, so nothing can land: finished at once.
                self.finish_release(&hex, &token)?;
                continue;
            }
            let gone = match delete(d) {
                Ok(gone) => gone,
                Err(e) => {
                    // The call is over (S3 answered with an error, or the client gave up and
                    // dropped its request): a request S3 received lands within moments or not
                    // at all. The mark goes stale after `FAILED_GRACE` instead of `STALE`, so
                    // adds of the digest are held seconds, not half an hour; `gc` finishes it.
                    self.write(|tx| {
                        tx.exec(
                            "UPDATE blob_releases SET marked_at = clock_timestamp() \
                             - make_interval(secs => $3) \
                             WHERE digest = $1 AND token = $2 AND finished_at IS NULL",
                            &[
                                &hex,
                                &token,
                                &(STALE.as_secs_f64() - FAILED_GRACE.as_secs_f64()),
                            ],
                        )
                    })?;
                    return Err(e);
                }
            };
            self.finish_release(&hex, &token)?;
            if gone {
                deleted.push(*d);
            }
        }
        Ok(deleted)
    }

    /// Marks a release finished if the mark is still `token`'s (kept a while, for adds that
    /// checked their bytes before now), and forgets releases finished long ago.
    fn finish_release(&self, hex: &str, token: &str) -> Result<()> {
        self.write(|tx| {
            // Kept a while as finished, for adds that checked their bytes before now.
            tx.exec(
                "UPDATE blob_releases SET finished_at = clock_timestamp() \
                     WHERE digest = $1 AND token = $2 AND finished_at IS NULL",
                &[&hex, &token],
            )?;
            tx.exec(
                "DELETE FROM blob_releases WHERE finished_at < clock_timestamp() \
                     - make_interval(secs => $1)",
                &[&KEEP_FINISHED.as_secs_f64()],
            )
        })?;
        Ok(())
    }

    /// The database's clock, in seconds since the epoch.
    pub(super) fn db_clock(&self) -> Result<f64> {
        self.read(|db| {
            Ok(db
                .one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])?
                .get(0))
        })
    }

    /// The digests of `digests` no live artifact references (one read each).
    pub(super) fn unreferenced_digests(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.read(|db| {
            let mut out = Vec::new();
            for d in digests {
                if !used(db, d)? {
                    out.push(*d);
                }
            }
            Ok(out)
        })
    }

    /// Waits until no release of `digest` is marked, taking over (removing) a stale mark;
    /// fails after `timeout` with an error naming the blob.
    pub(super) fn await_release(&self, digest: &Digest, timeout: Duration) -> Result<()> {
        let hex = digest.to_hex();
        let began = Instant::now();
        loop {
            // Short transactions, nothing but SQL inside.
            let age: Option<f64> = self.write(|tx| {
                lock_digest(tx, digest)?;
                let age: Option<f64> = tx
                    .opt(
                        "SELECT extract(epoch FROM clock_timestamp() - marked_at)::float8 \
                         FROM blob_releases WHERE digest = $1 AND finished_at IS NULL",
                        &[&hex],
                    )?
                    .map(|r| r.get(0));
                if age.is_some_and(|a| a > stale_secs()) {
                    // Its delete can no longer land: finished now (adds that checked their
                    // bytes before now check again).
                    tx.exec(
                        "UPDATE blob_releases SET finished_at = clock_timestamp() \
                         WHERE digest = $1",
                        &[&hex],
                    )?;
                    return Ok(None);
                }
                Ok(age)
            })?;
            let Some(age) = age else {
                return Ok(());
            };
            if began.elapsed() >= timeout {
                return Err(Error::Backend {
                    message: format!(
                        "blob sha256:{digest} is still being released by another replica \
                         (marked {age:.0} s ago; its gc, cleanup or delete is waiting for S3): \
                         add it again later (a release left unfinished is taken over after {} \
                         min)",
                        STALE.as_secs() / 60
                    ),
                    source: None,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Digests whose mark is stale (at most 1,000 at a time).
    pub(super) fn stale_releases(&self) -> Result<Vec<Digest>> {
        self.read(|db| {
            Ok(db
                .query(
                    "SELECT digest FROM blob_releases WHERE finished_at IS NULL \
                     AND marked_at < clock_timestamp() - make_interval(secs => $1) \
                     ORDER BY digest LIMIT 1000",
                    &[&stale_secs()],
                )?
                .iter()
                .filter_map(|r| r.get::<_, String>(0).parse::<Digest>().ok())
                .collect())
        })
    }
}
