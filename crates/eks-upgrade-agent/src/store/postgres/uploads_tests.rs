//! The PostgreSQL upload queue's claims, across two stores on one database (as two replicas).

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;

use super::progress::{PostgresOptions, PostgresStore};
use crate::artifacts::{AddOptions, ArtifactsOptions, NewSession, TestArtifactsManager};
use crate::blob::LocalBlobStore;
use crate::store::{Durability, UploadOutcome, UploadQueue};
use crate::test_support::PgCluster;

/// Two replicas (two pools) claiming the upload queue at once, in small batches, never get the
/// same artifact; together they take every queued artifact exactly once.
#[test]
fn two_replicas_never_claim_the_same_upload() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let options = PostgresOptions {
        pool_size: 4,
        ..PostgresOptions::default()
    };
    let a = Arc::new(PostgresStore::open(&url, &options).unwrap());
    let b = Arc::new(PostgresStore::open(&url, &options).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(LocalBlobStore::open(dir.path(), Durability::default()).unwrap());
    let m = TestArtifactsManager::new(
        a.clone(),
        blobs,
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
    const N: usize = 400;
    let items: Vec<(String, Vec<u8>, AddOptions)> = (0..N)
        .map(|i| {
            (
                format!("f{i}.log"),
                format!("{i}").into_bytes(),
                AddOptions::default(),
            )
        })
        .collect();
    m.add_many_bytes(&s.session_id, &c.collection_id, &items)
        .unwrap();
    assert_eq!(a.pending_uploads().unwrap().0, N as u64);
    let barrier = std::sync::Barrier::new(4);
    let claimed: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = [(&a, "a1"), (&a, "a2"), (&b, "b1"), (&b, "b2")]
            .into_iter()
            .map(|(store, owner)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let mut mine = Vec::new();
                    loop {
                        let now = Utc::now();
                        let batch = store
                            .claim_uploads(owner, now, now + chrono::Duration::minutes(10), 8)
                            .unwrap();
                        if batch.is_empty() {
                            return mine;
                        }
                        for (art, _) in batch {
                            // The claim holds until recorded: the others skip it meanwhile.
                            mine.push(art.artifact_id.clone());
                            store
                                .record_upload(
                                    owner,
                                    &art.artifact_id,
                                    &UploadOutcome::Uploaded {
                                        bucket: "b".into(),
                                        key: art.artifact_id.clone(),
                                        at: now,
                                    },
                                )
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: usize = claimed.iter().map(Vec::len).sum();
    let distinct: HashSet<&String> = claimed.iter().flatten().collect();
    assert_eq!(distinct.len(), N, "every queued artifact claimed");
    assert_eq!(
        total,
        N,
        "no artifact claimed twice: {:?}",
        claimed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(
        claimed.iter().filter(|c| !c.is_empty()).count() >= 2,
        "both replicas took part: {:?}",
        claimed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(b.pending_uploads().unwrap(), (0, 0));
    assert!(
        b.claim_uploads("late", Utc::now(), Utc::now(), 10)
            .unwrap()
            .is_empty()
    );
}
