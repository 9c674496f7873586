//! The upload queue on PostgreSQL, in the artifact rows as on SQLite (`upload_state`: 0 not
//! queued, 1 queued, 2 uploaded, 3 failed and retried after `upload_next_at`, on the database's
//! clock: `clock.rs`), shared by every replica's uploader: a claim takes due rows with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers on any replica skip each other's rows
//! instead of waiting for them, and marks them with the claimer and its lease (`lease.rs`); an
//! expired lease is free to take over, and an outcome counts only while the row is still the
//! recorder's.

use chrono::{DateTime, Utc};

use super::artifacts::{ARTIFACT_SELECT, artifact_row, load_artifact};
use super::lease;
use super::progress::{PostgresStore, micros};
use crate::error::{Error, Result};
use crate::model::{ArtifactStatus, TestArtifact};
use crate::store::{UploadOutcome, UploadQueue, UploadSelector};

impl UploadQueue for PostgresStore {
    fn queue_uploads(&self, selector: &UploadSelector, retry_failed: bool) -> Result<u64> {
        let states = if retry_failed { "(0, 3)" } else { "(0)" };
        let deleted = ArtifactStatus::Deleted.code();
        self.write(|tx| {
            let (clause, key): (&str, Option<i64>) = match selector {
                UploadSelector::All => ("true", None),
                UploadSelector::Failed => ("upload_state = 3", None),
                UploadSelector::Session(id) => {
                    let k = tx
                        .opt("SELECT skey FROM sessions WHERE session_id = $1", &[id])?
                        .map(|r| r.get::<_, i64>(0))
                        .ok_or_else(|| Error::not_found(format!("session {id:?}")))?;
                    ("skey = $1", Some(k))
                }
                UploadSelector::Artifact(id) => {
                    let k = tx
                        .opt("SELECT akey FROM artifacts WHERE artifact_id = $1", &[id])?
                        .map(|r| r.get::<_, i64>(0))
                        .ok_or_else(|| Error::not_found(format!("artifact {id:?}")))?;
                    ("akey = $1", Some(k))
                }
            };
            let sql = format!(
                "UPDATE artifacts SET upload_state = 1, upload_next_at = 0 \
                 WHERE {clause} AND upload_state IN {states} AND status != {deleted}"
            );
            match key {
                Some(k) => tx.exec(&sql, &[&k]),
                None => tx.exec(&sql, &[]),
            }
        })
    }

    fn claim_uploads(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(TestArtifact, u32)>> {
        // Due and free by the database's clock (the retry time and `now` moved onto it:
        // `clock.rs`); the lease ends its length after the database's clock.
        let sql = format!(
            "WITH due AS (SELECT akey FROM artifacts \
             WHERE upload_state IN (1, 3) AND upload_next_at <= $1 AND {} \
             ORDER BY akey LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE artifacts a SET upload_claimed_by = $3, upload_lease_until = {} + $4 \
             FROM due WHERE a.akey = due.akey RETURNING a.akey",
            lease::free("upload_claimed_by", "upload_lease_until", "$3"),
            lease::DB_NOW
        );
        let until = lease::span(now, lease_until);
        let now = micros(now).saturating_add(self.db_clock_offset()?);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.write(|tx| {
            let keys: Vec<i64> = tx
                .query(&sql, &[&now, &limit, &owner, &until])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(
                &format!("{ARTIFACT_SELECT} WHERE a.akey = ANY($1) ORDER BY a.akey"),
                &[&keys],
            )?
            .iter()
            .map(|r| {
                Ok((
                    artifact_row(r)?,
                    u32::try_from(r.get::<_, i64>(21)).unwrap_or(u32::MAX),
                ))
            })
            .collect()
        })
    }

    fn renew_upload_claims(&self, owner: &str, lease_until: DateTime<Utc>) -> Result<Vec<String>> {
        let span = lease::span(Utc::now(), lease_until);
        self.write(|tx| {
            Ok(tx
                .query(
                    &format!(
                        "UPDATE artifacts SET upload_lease_until = {} + $2 \
                         WHERE upload_claimed_by = $1 AND upload_state IN (1, 3) \
                         RETURNING artifact_id",
                        lease::DB_NOW
                    ),
                    &[&owner, &span],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn claimed_by_others(&self, owner: &str, now: DateTime<Utc>) -> Result<u64> {
        let now = micros(now).saturating_add(self.db_clock_offset()?);
        self.read(|db| {
            Ok(db
                .one(
                    &format!(
                        "SELECT count(*) FROM artifacts WHERE upload_state IN (1, 3) \
                         AND upload_next_at <= $1 AND upload_claimed_by IS NOT NULL \
                         AND upload_claimed_by != $2 AND upload_lease_until > {}",
                        lease::DB_NOW
                    ),
                    &[&now, &owner],
                )?
                .get::<_, i64>(0) as u64)
        })
    }

    fn pending_uploads(&self) -> Result<(u64, u64)> {
        self.read(|db| {
            let r = db.one(
                "SELECT count(*), coalesce(sum(file_size), 0)::BIGINT FROM artifacts \
                 WHERE upload_state = 1",
                &[],
            )?;
            Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
        })
    }

    fn record_upload(
        &self,
        owner: &str,
        artifact_id: &str,
        outcome: &UploadOutcome,
    ) -> Result<TestArtifact> {
        // The claim is the fencing token: only its holder's outcome counts.
        let ours = "upload_claimed_by = $2";
        // A retry time goes onto the database's clock (`clock.rs`).
        let offset = match outcome {
            UploadOutcome::Failed {
                next_at: Some(_), ..
            } => self.db_clock_offset()?,
            _ => 0,
        };
        self.write(|tx| {
            let recorded = match outcome {
                UploadOutcome::Uploaded { bucket, key, at } => tx.exec(
                    &format!(
                        "UPDATE artifacts SET upload_state = 2, status = $3, s3_bucket = $4, \
                         s3_key = $5, s3_url = $6, uploaded_at = $7, upload_error = NULL, \
                         upload_claimed_by = NULL, upload_lease_until = 0 \
                         WHERE artifact_id = $1 AND upload_state IN (1, 3) AND {ours}"
                    ),
                    &[
                        &artifact_id,
                        &owner,
                        &ArtifactStatus::Uploaded.code(),
                        bucket,
                        key,
                        &format!("s3://{bucket}/{key}"),
                        &micros(*at),
                    ],
                )?,
                UploadOutcome::Failed { error, next_at } => tx.exec(
                    &format!(
                        "UPDATE artifacts SET upload_state = 3, status = $3, \
                         upload_attempts = upload_attempts + 1, upload_next_at = $4, \
                         upload_error = $5, upload_claimed_by = NULL, upload_lease_until = 0 \
                         WHERE artifact_id = $1 AND upload_state IN (1, 3) AND {ours}"
                    ),
                    &[
                        &artifact_id,
                        &owner,
                        &ArtifactStatus::Failed.code(),
                        &next_at.map_or(0, |t| micros(t).saturating_add(offset)),
                        error,
                    ],
                )?,
            };
            if recorded == 0 {
                tracing::debug!(
                    artifact = artifact_id,
                    owner,
                    "upload outcome ignored: the claim was lost or the entry is settled"
                );
            }
            load_artifact(tx, artifact_id)
        })
    }
}
