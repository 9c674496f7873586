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

/// Guarantee G90: upload leases are judged on the database's clock, not the claimer's. A
/// claimer whose clock runs an hour ahead cannot take an upload another holds, nor counts it as
/// free; one whose clock runs an hour behind takes over a lease that ran out by the database's
/// clock.
#[test]
fn upload_leases_are_judged_on_the_database_clock() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let a = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
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
    for i in 0..2 {
        m.add_bytes(
            &s.session_id,
            &c.collection_id,
            format!("{i}").as_bytes(),
            &format!("f{i}.log"),
            &AddOptions::default(),
        )
        .unwrap();
    }
    let now = Utc::now();
    let held = a
        .claim_uploads("held", now, now + chrono::Duration::minutes(10), 1)
        .unwrap();
    assert_eq!(held.len(), 1);
    let short = a
        .claim_uploads("dies", now, now + chrono::Duration::milliseconds(400), 1)
        .unwrap();
    assert_eq!(short.len(), 1);
    // An hour ahead: both leases look over to that claimer's clock; the 10 min one is not.
    let ahead = Utc::now() + chrono::Duration::hours(1);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let stolen = a
        .claim_uploads("ahead", ahead, ahead + chrono::Duration::minutes(10), 10)
        .unwrap();
    let stolen: Vec<&str> = stolen.iter().map(|(t, _)| t.artifact_id.as_str()).collect();
    assert!(
        !stolen.contains(&held[0].0.artifact_id.as_str()),
        "a claimer with its clock ahead stole a live lease"
    );
    assert_eq!(
        stolen,
        [short[0].0.artifact_id.as_str()],
        "only the lapsed lease is taken"
    );
    assert_eq!(a.claimed_by_others("other", ahead).unwrap(), 2);
    // An hour behind: a lease that ran out by the database's clock is free.
    let at = Utc::now();
    let lapsed = a
        .claim_uploads("lapses", at, at + chrono::Duration::milliseconds(300), 1)
        .unwrap();
    assert!(lapsed.is_empty(), "every upload is held");
    a.record_upload(
        "ahead",
        &short[0].0.artifact_id,
        &UploadOutcome::Failed {
            error: "x".into(),
            next_at: Some(now - chrono::Duration::hours(2)),
        },
    )
    .unwrap();
    let at = Utc::now();
    let quick = a
        .claim_uploads("quick", at, at + chrono::Duration::milliseconds(300), 1)
        .unwrap();
    assert_eq!(quick.len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(700));
    let behind = Utc::now() - chrono::Duration::hours(1);
    let taken = a
        .claim_uploads("behind", behind, behind + chrono::Duration::minutes(10), 10)
        .unwrap();
    assert_eq!(
        taken.len(),
        1,
        "a lease past its end by the database's clock is free to a claimer whose clock is behind"
    );
    assert_eq!(taken[0].0.artifact_id, quick[0].0.artifact_id);
    assert_eq!(a.claimed_by_others("other", behind).unwrap(), 2);
}

/// Guarantee G90: an upload's retry time is judged on the database's clock (whose own clock is
/// off the machine's here), whichever uploader set it and whichever claims: a retry in 2 s set
/// by an uploader whose clock runs an hour ahead is due for the others after 2 s (not an hour
/// late), and a retry in 10 minutes set by one whose clock runs an hour behind is neither due nor
/// waited for by the others at once (not 50 minutes early).
#[test]
fn upload_retry_times_are_judged_on_the_database_clock() {
    let pg = PgCluster::start();
    let url = pg.create_database_with_clock_offset(1800);
    let b = Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
    let ahead = PostgresStore::open(&url, &PostgresOptions::default())
        .unwrap()
        .with_clock_skew(chrono::Duration::hours(1));
    let behind = PostgresStore::open(&url, &PostgresOptions::default())
        .unwrap()
        .with_clock_skew(chrono::Duration::hours(-1));
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(LocalBlobStore::open(dir.path(), Durability::default()).unwrap());
    let m = TestArtifactsManager::new(
        b.clone(),
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
    let art = m
        .add_bytes(
            &s.session_id,
            &c.collection_id,
            b"x",
            "x.log",
            &AddOptions::default(),
        )
        .unwrap();
    let fail = |store: &PostgresStore, owner: &str, delay: chrono::Duration| {
        let now = store.clock();
        let claimed = store
            .claim_uploads(owner, now, now + chrono::Duration::minutes(1), 10)
            .unwrap();
        assert_eq!(claimed.len(), 1, "{owner} claims it");
        store
            .record_upload(
                owner,
                &art.artifact_id,
                &UploadOutcome::Failed {
                    error: "503".into(),
                    next_at: Some(now + delay),
                },
            )
            .unwrap();
    };
    fail(&ahead, "ahead", chrono::Duration::seconds(2));
    let now = Utc::now();
    assert!(
        b.claim_uploads("b", now, now + chrono::Duration::minutes(1), 10)
            .unwrap()
            .is_empty(),
        "due before its retry time"
    );
    std::thread::sleep(std::time::Duration::from_millis(3000));
    // Due now for B (it would wait an hour if the retry time were the ahead clock's).
    fail(&b, "b", chrono::Duration::zero());
    fail(&behind, "behind", chrono::Duration::minutes(10));
    let now = Utc::now();
    let early = b
        .claim_uploads("b", now, now + chrono::Duration::minutes(1), 10)
        .unwrap();
    assert!(
        early.is_empty(),
        "a retry set by an uploader whose clock runs behind came early: {early:?}"
    );
    assert_eq!(b.claimed_by_others("b", now).unwrap(), 0);
    let now = ahead.clock();
    assert!(
        ahead
            .claim_uploads("ahead", now, now + chrono::Duration::minutes(1), 10)
            .unwrap()
            .is_empty()
    );
}
