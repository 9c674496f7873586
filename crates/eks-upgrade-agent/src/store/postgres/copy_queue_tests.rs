//! `store copy` of the work queues between databases: uploads queued or claimed, and
//! notification deliveries claimed, on the source are claimable on the target (leases are not
//! copied: they belong to the source's processes), not stuck behind a claim no one renews.

use std::sync::Arc;

use chrono::{Duration, Utc};

use super::progress::{PostgresOptions, PostgresStore};
use crate::artifacts::{ArtifactsOptions, NewSession, TestArtifactsManager};
use crate::blob::{BlobStore, LocalBlobStore};
use crate::model::JsonMap;
use crate::progress::ProgressTracker;
use crate::store::copy::{Blobs, NoProgress, copy};
use crate::store::{Durability, Outbox, UploadQueue};
use crate::test_support::PgCluster;

/// G124: a database whose upload queue holds a pending entry and two claimed by a live
/// lease, and whose outbox deliveries are claimed by another replica, copied to another
/// database: there, one claim takes every upload and every delivery at once.
#[test]
fn queued_and_leased_work_copied_between_databases_is_claimable_on_the_target() {
    let pg = PgCluster::start();
    let (from_url, to_url) = (pg.create_database(), pg.create_database());
    let options = PostgresOptions::default();
    let from = Arc::new(PostgresStore::open(&from_url, &options).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let from_blobs: Arc<dyn BlobStore> =
        Arc::new(LocalBlobStore::open(&dir.path().join("a"), Durability::default()).unwrap());
    let to_blobs: Arc<dyn BlobStore> =
        Arc::new(LocalBlobStore::open(&dir.path().join("b"), Durability::default()).unwrap());
    let m = TestArtifactsManager::new(
        from.clone(),
        from_blobs.clone(),
        ArtifactsOptions {
            auto_upload: true,
            ..ArtifactsOptions::default()
        },
    );
    let s = m
        .create_session(NewSession {
            upgrade_id: "u1".into(),
            cluster_name: "c".into(),
            ..NewSession::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "logs", None, None)
        .unwrap();
    for i in 0..3 {
        m.add_bytes(
            &s.session_id,
            &c.collection_id,
            format!("bytes {i}").as_bytes(),
            &format!("f{i}.log"),
            &Default::default(),
        )
        .unwrap();
    }
    let now = Utc::now();
    let leased = from
        .claim_uploads("replica-a", now, now + Duration::minutes(30), 2)
        .unwrap();
    assert_eq!(leased.len(), 2);
    let tracker = ProgressTracker::new(from.clone());
    tracker
        .create_upgrade("u1", "p", "c", JsonMap::new())
        .unwrap();
    tracker.start_upgrade("u1", None).unwrap();
    tracker.complete_upgrade("u1").unwrap();
    from.ingest("hook", crate::notify::Kinds::Events).unwrap();
    let claimed = from.due("hook", Utc::now(), 100).unwrap();
    assert!(claimed.len() >= 2, "{claimed:?}");
    // On the source, another replica finds the claimed work taken.
    let other = PostgresStore::open(&from_url, &options).unwrap();
    assert!(other.due("hook", Utc::now(), 100).unwrap().is_empty());
    let now = Utc::now();
    assert_eq!(
        other
            .claim_uploads("replica-b", now, now + Duration::minutes(1), 100)
            .unwrap()
            .len(),
        1
    );

    let to = PostgresStore::open(&to_url, &options).unwrap();
    let blobs = Blobs {
        from: Ok(from_blobs),
        to: Ok(to_blobs),
    };
    copy(&*from, &to, &blobs, &mut NoProgress).unwrap();
    assert_eq!(to.pending_uploads().unwrap().0, 3);
    let now = Utc::now();
    let uploads = to
        .claim_uploads("replica-c", now, now + Duration::minutes(1), 100)
        .unwrap();
    assert_eq!(uploads.len(), 3, "every upload is claimable on the copy");
    let due = to.due("hook", Utc::now(), 100).unwrap();
    let ids = |v: &[(crate::notify::Notification, u32)]| {
        let mut ids: Vec<String> = v.iter().map(|(n, _)| n.event_id.clone()).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(&due),
        ids(&claimed),
        "every claimed delivery is due on the copy"
    );
}
