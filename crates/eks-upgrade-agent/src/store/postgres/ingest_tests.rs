//! Test-result ingests on PostgreSQL across replicas: the first session of an upgrade.

use std::sync::Arc;

use super::progress::{PostgresOptions, PostgresStore};
use crate::artifacts::{ArtifactsOptions, TestArtifactsManager};
use crate::blob::LocalBlobStore;
use crate::model::RunPhase;
use crate::results::{Ingest, KeepFiles, TestResults};
use crate::store::Durability;
use crate::test_support::PgCluster;

/// Two replicas (two pools), each with its manager and test results, on one blob directory
/// (standing in for S3).
fn replicas(url: &str, blobs: &std::path::Path) -> Vec<(TestArtifactsManager, TestResults)> {
    let blobs = Arc::new(LocalBlobStore::open(blobs, Durability::default()).unwrap());
    (0..2)
        .map(|_| {
            let store = Arc::new(PostgresStore::open(url, &PostgresOptions::default()).unwrap());
            (
                TestArtifactsManager::new(
                    store.clone(),
                    blobs.clone(),
                    ArtifactsOptions::default(),
                ),
                TestResults::new(store),
            )
        })
        .collect()
}

fn keep(m: &TestArtifactsManager) -> KeepFiles<'_> {
    KeepFiles {
        artifacts: m,
        session_id: None,
        collection_id: None,
        options: None,
    }
}

/// G120: two first ingests of an upgrade on two replicas end with one session, both runs'
/// reports in it. Deterministic: another session holds `sessions` in EXCLUSIVE mode (reads
/// pass, inserts wait) until both ingests wait on a lock; before the fix both had found no
/// session and both inserted one.
#[test]
fn two_first_ingests_on_two_replicas_share_one_session() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(&url, &dir.path().join("blobs"));
    let report = dir.path().join("junit.xml");
    std::fs::write(
        &report,
        r#"<testsuite name="s"><testcase classname="api" name="health"/></testsuite>"#,
    )
    .unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut lock = holder.transaction().unwrap();
    lock.batch_execute("LOCK TABLE sessions IN EXCLUSIVE MODE")
        .unwrap();
    let runs = std::thread::scope(|scope| {
        let ingests: Vec<_> = replicas
            .iter()
            .map(|(m, r)| {
                let report = &report;
                scope.spawn(move || {
                    r.ingest(
                        std::slice::from_ref(report),
                        &Ingest::new("u1", "prod", RunPhase::Pre),
                        Some(keep(m)),
                    )
                })
            })
            .collect();
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting == 2 {
                break;
            }
            for h in &ingests {
                assert!(!h.is_finished(), "an ingest ended while the table was held");
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the ingests did not both wait on a lock within a minute"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        lock.rollback().unwrap();
        ingests
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect::<Vec<_>>()
    });
    let m = &replicas[0].0;
    let sessions = m.sessions(Some("u1")).unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    let collections = m.collections(&sessions[0].session_id).unwrap();
    assert_eq!(collections.len(), 1, "{collections:#?}");
    for run in &runs {
        let a = m.artifact(&run.artifact_ids[0]).unwrap();
        assert_eq!(a.session_id, sessions[0].session_id);
        assert_eq!(a.collection_id, collections[0].collection_id);
    }
}

/// G121: a `gc` on one replica while another records the run of a report older than
/// `orphan_report_age` (a slow ingest) keeps the report: the run's transaction holds the
/// report's row (`FOR SHARE`) while it folds its records, so the sweep's `FOR UPDATE` waits and
/// then sees the run. Deterministic: the run's source blocks until the sweep waits on the
/// lock (without the run's lock the sweep deleted the report under the run being recorded).
#[test]
fn a_sweep_waits_for_a_run_being_recorded_and_keeps_its_report() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(&url, &dir.path().join("blobs"));
    let (m, r) = &replicas[0];
    let (s, _) = m
        .latest_session_or_create(crate::artifacts::NewSession {
            upgrade_id: "u1".into(),
            cluster_name: "c".into(),
            ..Default::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "validation", None, None)
        .unwrap();
    let report = m
        .add_reader_as(
            &s.session_id,
            &c.collection_id,
            &mut &b"<testsuite/>"[..],
            "r.xml",
            &crate::artifacts::AddOptions {
                artifact_type: Some(crate::model::ArtifactType::TestResult),
                metadata: serde_json::from_value(serde_json::json!({
                    "run_id": "r-slow",
                    "phase": "pre",
                    crate::store::PENDING_RUN_KEY: "r-slow",
                }))
                .unwrap(),
                ..Default::default()
            },
            true,
        )
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let sweeper = TestArtifactsManager::new(
        m.index().clone(),
        m.blobs().clone(),
        ArtifactsOptions {
            orphan_report_age: std::time::Duration::ZERO,
            ..ArtifactsOptions::default()
        },
    );
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let (in_source, source_entered) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let report = &report;
        let recording = scope.spawn(move || {
            let run = crate::model::NewRun {
                run_id: "r-slow".into(),
                upgrade_id: "u1".into(),
                cluster_name: "c".into(),
                phase: RunPhase::Pre,
                created_at: chrono::Utc::now(),
                files: vec!["r.xml".into()],
                artifact_ids: vec![report.artifact_id.clone()],
            };
            r.store().record_run(&run, &mut |_| {
                in_source.send(()).unwrap();
                released.recv().unwrap();
                Ok(())
            })
        });
        source_entered.recv().unwrap();
        let sweeping = scope.spawn(|| sweeper.gc());
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting == 1 || sweeping.is_finished() {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the sweep neither waited on a lock nor ended within a minute"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        release.send(()).unwrap();
        recording.join().unwrap().unwrap();
        assert_eq!(sweeping.join().unwrap().unwrap().orphan_reports_removed, 0);
    });
    assert_eq!(
        m.artifact(&report.artifact_id).unwrap().status,
        crate::model::ArtifactStatus::Created
    );
    assert_eq!(r.run("r-slow").unwrap().artifact_ids, [report.artifact_id]);
}
