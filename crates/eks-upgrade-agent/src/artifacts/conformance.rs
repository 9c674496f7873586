//! The artifact index and upload queue conformance suite. Every backend runs it through [`run`]
//! with a factory that returns a fresh, empty store as a [`Backend`] (its `ArtifactIndex`, its
//! `UploadQueue` and the `ProgressStore` in the same database, whose failed upgrades retention
//! keeps longer); the cases drive it through a [`TestArtifactsManager`] over local blobs in a
//! temporary directory. Differences between backends are parameters, never copies of the suite.

use std::fs;
use std::sync::Arc;

use chrono::Utc;
use serde_json::json;

use super::*;
use crate::blob::{BlobStore, LocalBlobStore};
use crate::model::{ArtifactStatus, JsonMap};
use crate::progress::ProgressTracker;
use crate::store::{
    ArtifactIndex, Durability, IdKind, ProgressStore, UploadOutcome, UploadQueue, UploadSelector,
};

/// One fresh store: its artifact index, its upload queue and its progress store (one database).
#[derive(Debug, Clone)]
pub struct Backend {
    /// The artifact index.
    pub index: Arc<dyn ArtifactIndex>,
    /// The upload queue (kept with the index).
    pub uploads: Arc<dyn UploadQueue>,
    /// Progress in the same database (retention reads the upgrade's status).
    pub progress: Arc<dyn ProgressStore>,
    /// Test runs in the same database (`gc` removes the reports of runs never recorded).
    pub results: Arc<dyn crate::store::TestResultStore>,
}

/// Returns a fresh, empty store.
pub type Factory<'a> = &'a dyn Fn() -> Backend;
type Case = (&'static str, fn(Fixture));

/// Runs every case against fresh stores from `factory`.
pub fn run(factory: Factory<'_>) {
    let cases: [Case; 20] = [
        ("sessions_and_collections", sessions_and_collections),
        (
            "add_files_directories_and_bytes",
            add_files_directories_and_bytes,
        ),
        (
            "same_name_same_bytes_is_idempotent_and_different_bytes_keep_both",
            same_name_same_bytes_is_idempotent_and_different_bytes_keep_both,
        ),
        ("bad_input_changes_nothing", bad_input_changes_nothing),
        ("search_by_every_filter", search_by_every_filter),
        (
            "search_pages_follow_the_cursor",
            search_pages_follow_the_cursor,
        ),
        (
            "name_search_finds_every_row_of_large_batches",
            name_search_finds_every_row_of_large_batches,
        ),
        ("abbreviated_ids_resolve", abbreviated_ids_resolve),
        (
            "retention_removes_expired_sessions_and_their_unshared_blobs",
            retention_removes_expired_sessions_and_their_unshared_blobs,
        ),
        (
            "retention_keeps_30_days_and_90_for_failed_upgrades",
            retention_keeps_30_days_and_90_for_failed_upgrades,
        ),
        (
            "cleanup_and_delete_never_take_a_blob_from_a_concurrent_add",
            cleanup_and_delete_never_take_a_blob_from_a_concurrent_add,
        ),
        (
            "imported_sessions_keep_their_ids",
            imported_sessions_keep_their_ids,
        ),
        (
            "upload_claims_exclude_others_until_the_lease_expires",
            upload_claims_exclude_others_until_the_lease_expires,
        ),
        (
            "upload_queue_selects_records_and_retries",
            upload_queue_selects_records_and_retries,
        ),
        (
            "a_late_upload_outcome_from_a_lost_lease_changes_nothing",
            a_late_upload_outcome_from_a_lost_lease_changes_nothing,
        ),
        (
            "a_deleted_artifact_leaves_the_upload_queue",
            a_deleted_artifact_leaves_the_upload_queue,
        ),
        (
            "a_session_is_removed_only_when_empty",
            a_session_is_removed_only_when_empty,
        ),
        (
            "an_upgrades_first_session_is_created_once",
            an_upgrades_first_session_is_created_once,
        ),
        (
            "gc_removes_the_reports_of_runs_never_recorded",
            gc_removes_the_reports_of_runs_never_recorded,
        ),
        (
            "an_artifact_row_is_committed_only_after_its_blob_exists",
            an_artifact_row_is_committed_only_after_its_blob_exists,
        ),
    ];
    for (name, case) in cases {
        eprintln!("artifacts conformance: {name}");
        case(Fixture::new(factory()));
    }
}

/// A fresh store with a manager over it and local blobs.
struct Fixture {
    dir: tempfile::TempDir,
    backend: Backend,
    blobs: Arc<LocalBlobStore>,
    m: TestArtifactsManager,
    index: Arc<dyn ArtifactIndex>,
    uploads: Arc<dyn UploadQueue>,
    tracker: ProgressTracker,
}

impl Fixture {
    fn new(backend: Backend) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(
            LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap(),
        );
        let m = TestArtifactsManager::new(
            backend.index.clone(),
            blobs.clone(),
            ArtifactsOptions::default(),
        );
        Fixture {
            dir,
            index: backend.index.clone(),
            uploads: backend.uploads.clone(),
            tracker: ProgressTracker::new(backend.progress.clone()),
            backend,
            blobs,
            m,
        }
    }

    /// The same store and blobs, with a manager of other options.
    fn with_options(mut self, options: ArtifactsOptions) -> Fixture {
        self.m = TestArtifactsManager::new(self.backend.index.clone(), self.blobs.clone(), options);
        self
    }
}

fn session(f: &Fixture, upgrade: &str) -> (TestSession, ArtifactCollection) {
    let s =
        f.m.create_session(NewSession {
            upgrade_id: upgrade.into(),
            cluster_name: "prod".into(),
            ..NewSession::default()
        })
        .unwrap();
    let c =
        f.m.create_collection(&s.session_id, "Upgrade Logs", None, None)
            .unwrap();
    (s, c)
}

fn opts(ty: ArtifactType, tags: &[&str]) -> AddOptions {
    AddOptions {
        artifact_type: Some(ty),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..AddOptions::default()
    }
}

fn sessions_and_collections(f: Fixture) {
    let (s, c) = session(&f, "u1");
    assert!(s.name.starts_with("upgrade-u1-"), "{}", s.name);
    assert_eq!(s.name.len(), "upgrade-u1-20260101-000000".len());
    assert_eq!(s.retention_days, DEFAULT_RETENTION_DAYS);
    let err =
        f.m.create_collection(&s.session_id, "Upgrade Logs", None, None)
            .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    let err = f.m.create_collection("nope", "x", None, None).unwrap_err();
    assert_eq!(err.to_string(), "session \"nope\" not found");
    f.m.create_collection(
        &s.session_id,
        "JUnit",
        Some("test results"),
        Some("validate"),
    )
    .unwrap();
    let names: Vec<_> =
        f.m.collections(&s.session_id)
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
    assert_eq!(names, ["Upgrade Logs", "JUnit"]);
    session(&f, "u2");
    assert_eq!(f.m.sessions(Some("u1")).unwrap().len(), 1);
    assert_eq!(f.m.sessions(None).unwrap().len(), 2);
    f.m.add_bytes(
        &s.session_id,
        &c.collection_id,
        b"abc",
        "a.log",
        &AddOptions::default(),
    )
    .unwrap();
    let done = f.m.complete_session(&s.session_id).unwrap();
    assert!(done.completed_at.is_some());
    let again = f.m.complete_session(&s.session_id).unwrap();
    assert_eq!(
        again.completed_at, done.completed_at,
        "completion time is kept"
    );
    let sum = f.m.session_summary(&s.session_id).unwrap();
    assert_eq!(
        (
            sum.collections_count,
            sum.total_artifacts,
            sum.total_size_bytes
        ),
        (2, 1, 3)
    );
    assert_eq!(sum.artifact_types.get(&ArtifactType::LogFile), Some(&1));
    assert_eq!(sum.uploaded_artifacts, 0);
    for bad in [0, 40_000] {
        let err =
            f.m.create_session(NewSession {
                upgrade_id: "u".into(),
                cluster_name: "c".into(),
                retention_days: Some(bad),
                ..NewSession::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("retention_days"), "{err}");
    }
}
fn add_files_directories_and_bytes(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let src = f.dir.path().join("src");
    fs::create_dir_all(src.join("nodes/ip-1")).unwrap();
    fs::write(src.join("nodes/ip-1/kubelet.log"), b"kubelet").unwrap();
    fs::write(src.join("nodes/containerd.log"), b"containerd").unwrap();
    fs::write(src.join("summary.txt"), b"ok").unwrap();
    let mut calls = Vec::new();
    let added =
        f.m.add_path(
            &s.session_id,
            &c.collection_id,
            &src,
            &AddOptions::default(),
            &mut |p| calls.push(p),
        )
        .unwrap();
    let names: Vec<_> = added.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "nodes/containerd.log",
            "nodes/ip-1/kubelet.log",
            "summary.txt"
        ]
    );
    assert!(
        added.iter().all(
            |a| a.artifact_type == ArtifactType::LogFile && a.status == ArtifactStatus::Created
        )
    );
    assert_eq!(added[0].upgrade_id, "u1");
    let last = calls.last().unwrap();
    assert_eq!(
        (
            last.files_done,
            last.files_total,
            last.bytes_done,
            last.bytes_total
        ),
        (3, 3, 19, 19)
    );

    let one =
        f.m.add_path(
            &s.session_id,
            &c.collection_id,
            &src.join("summary.txt"),
            &AddOptions {
                name: Some("reports/summary.txt".into()),
                artifact_type: Some(ArtifactType::Report),
                description: Some("d".into()),
                tags: vec!["final".into()],
                task_id: Some("t1".into()),
                step_id: Some("s1".into()),
                metadata: JsonMap::from_iter([("k".to_owned(), json!(1))]),
            },
            &mut |_| {},
        )
        .unwrap();
    let a = &one[0];
    assert_eq!(
        (a.name.as_str(), a.artifact_type, a.task_id.as_deref()),
        ("reports/summary.txt", ArtifactType::Report, Some("t1"))
    );
    assert_eq!(a.file_hash, Digest::of(b"ok").to_hex());
    assert_eq!(f.m.artifact(&a.artifact_id).unwrap(), *a);
    assert_eq!(f.m.read(&a.artifact_id).unwrap(), b"ok");

    let b =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"streamed",
            "stream.log",
            &AddOptions::default(),
        )
        .unwrap();
    assert_eq!(b.file_size, 8);
}
fn same_name_same_bytes_is_idempotent_and_different_bytes_keep_both(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let o = AddOptions::default();
    let a =
        f.m.add_bytes(&s.session_id, &c.collection_id, b"v1", "report.xml", &o)
            .unwrap();
    let again =
        f.m.add_bytes(&s.session_id, &c.collection_id, b"v1", "report.xml", &o)
            .unwrap();
    assert_eq!(a.artifact_id, again.artifact_id);
    let b =
        f.m.add_bytes(&s.session_id, &c.collection_id, b"v2", "report.xml", &o)
            .unwrap();
    let d =
        f.m.add_bytes(&s.session_id, &c.collection_id, b"v3", "report.xml", &o)
            .unwrap();
    assert_ne!(a.artifact_id, b.artifact_id);
    assert_eq!(
        (
            a.export_name.as_str(),
            b.export_name.as_str(),
            d.export_name.as_str()
        ),
        ("report.xml", "report~2.xml", "report~3.xml")
    );
    assert_eq!(b.name, "report.xml");
    assert_eq!(
        f.m.read(&a.artifact_id).unwrap(),
        b"v1",
        "the first artifact's bytes are untouched"
    );
    assert_eq!(f.m.read(&b.artifact_id).unwrap(), b"v2");
    // Same bytes under another name: one blob, two artifacts.
    let e =
        f.m.add_bytes(&s.session_id, &c.collection_id, b"v1", "copy.xml", &o)
            .unwrap();
    assert_eq!(e.file_hash, a.file_hash);
    let mut blobs = 0;
    f.m.blobs()
        .list(&mut |_| {
            blobs += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(blobs, 3);
    // The same name in another collection is independent.
    let c2 =
        f.m.create_collection(&s.session_id, "Other", None, None)
            .unwrap();
    let g =
        f.m.add_bytes(&s.session_id, &c2.collection_id, b"v2", "report.xml", &o)
            .unwrap();
    assert_eq!(g.export_name, "report.xml");
}
fn bad_input_changes_nothing(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let (s2, _) = session(&f, "u2");
    let o = AddOptions::default();
    let missing = f.dir.path().join("missing.log");
    let cases: Vec<(Error, &str)> = vec![
        (
            f.m.add_path(&s.session_id, &c.collection_id, &missing, &o, &mut |_| {})
                .unwrap_err(),
            "missing.log not found",
        ),
        (
            f.m.add_bytes("nope", &c.collection_id, b"x", "a", &o)
                .unwrap_err(),
            "\"nope\" not found",
        ),
        (
            f.m.add_bytes(&s2.session_id, &c.collection_id, b"x", "a", &o)
                .unwrap_err(),
            "belongs to session",
        ),
        (
            f.m.add_bytes(&s.session_id, "nope", b"x", "a", &o)
                .unwrap_err(),
            "collection \"nope\" not found",
        ),
        (
            f.m.add_bytes(&s.session_id, &c.collection_id, b"x", "../escape", &o)
                .unwrap_err(),
            "'..'",
        ),
        (
            f.m.add_bytes(&s.session_id, &c.collection_id, b"x", "/etc/passwd", &o)
                .unwrap_err(),
            "relative",
        ),
        (
            f.m.add_bytes(&s.session_id, &c.collection_id, b"x", "a\u{0}b", &o)
                .unwrap_err(),
            "control",
        ),
        (
            f.m.add_bytes(
                &s.session_id,
                &c.collection_id,
                b"x",
                "a",
                &opts(ArtifactType::Backup, &[""]),
            )
            .unwrap_err(),
            "tags must not be empty",
        ),
        (
            f.m.artifact("nope").unwrap_err(),
            "artifact \"nope\" not found",
        ),
        (
            f.m.search(&ArtifactQuery {
                session_id: Some("nope".into()),
                ..ArtifactQuery::default()
            })
            .unwrap_err(),
            "session \"nope\" not found",
        ),
        (
            f.m.search(&ArtifactQuery {
                min_size: Some(10),
                max_size: Some(1),
                ..ArtifactQuery::default()
            })
            .unwrap_err(),
            "larger than max",
        ),
    ];
    for (err, needle) in cases {
        let text = err.to_string();
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert_eq!(f.m.stats(None).unwrap().total_artifacts, 0);
    let mut blobs = 0;
    f.m.blobs()
        .list(&mut |_| {
            blobs += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(blobs, 0, "nothing was stored");
}
fn search_by_every_filter(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let (s2, c2) = session(&f, "u2");
    let add =
        |sid: &str, cid: &str, name: &str, bytes: usize, ty, tags: &[&str], task: Option<&str>| {
            let mut o = opts(ty, tags);
            o.task_id = task.map(Into::into);
            f.m.add_bytes(sid, cid, &vec![b'x'; bytes], name, &o)
                .unwrap()
        };
    let a = add(
        &s.session_id,
        &c.collection_id,
        "Kubelet-ip-1.log",
        100,
        ArtifactType::LogFile,
        &["node", "kubelet"],
        Some("ng1"),
    );
    let b = add(
        &s.session_id,
        &c.collection_id,
        "junit-smoke.xml",
        2000,
        ArtifactType::TestResult,
        &["smoke"],
        Some("validate"),
    );
    let d = add(
        &s2.session_id,
        &c2.collection_id,
        "kubelet-ip-2.log",
        300,
        ArtifactType::LogFile,
        &["node"],
        Some("ng1"),
    );
    let e = add(
        &s2.session_id,
        &c2.collection_id,
        "ab.log",
        5,
        ArtifactType::Diagnostic,
        &["node", "kubelet"],
        None,
    );
    let ids = |q: ArtifactQuery| -> Vec<String> {
        f.m.search(&q)
            .unwrap()
            .into_iter()
            .map(|a| a.artifact_id)
            .collect()
    };
    let q = ArtifactQuery::default;
    assert_eq!(
        ids(q()),
        [
            e.artifact_id.clone(),
            d.artifact_id.clone(),
            b.artifact_id.clone(),
            a.artifact_id.clone()
        ],
        "newest first"
    );
    assert_eq!(
        ids(ArtifactQuery {
            session_id: Some(s.session_id.clone()),
            ..q()
        }),
        [b.artifact_id.clone(), a.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            collection_id: Some(c2.collection_id.clone()),
            ..q()
        }),
        [e.artifact_id.clone(), d.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            upgrade_id: Some("u2".into()),
            ..q()
        }),
        [e.artifact_id.clone(), d.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            artifact_type: Some(ArtifactType::TestResult),
            ..q()
        }),
        vec![b.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            tags: vec!["node".into(), "kubelet".into()],
            ..q()
        }),
        [e.artifact_id.clone(), a.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            task_id: Some("ng1".into()),
            ..q()
        }),
        [d.artifact_id.clone(), a.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            status: Some(ArtifactStatus::Uploaded),
            ..q()
        }),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(ArtifactQuery {
            name: Some("KUBELET".into()),
            ..q()
        }),
        [d.artifact_id.clone(), a.artifact_id.clone()],
        "case-insensitive"
    );
    assert_eq!(
        ids(ArtifactQuery {
            name: Some("ip-".into()),
            ..q()
        }),
        [d.artifact_id.clone(), a.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            name: Some("b.".into()),
            ..q()
        }),
        vec![e.artifact_id.clone()],
        "short substrings scan"
    );
    assert_eq!(
        ids(ArtifactQuery {
            name: Some("*.xml".into()),
            ..q()
        }),
        vec![b.artifact_id.clone()],
        "glob"
    );
    assert_eq!(
        ids(ArtifactQuery {
            name: Some("kubelet-ip-?.log".into()),
            ..q()
        }),
        [d.artifact_id.clone(), a.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            name: Some("50%_\"x".into()),
            ..q()
        }),
        Vec::<String>::new(),
        "special characters are literal"
    );
    // Hostile patterns and ids: no match or a clear InvalidInput, never a backend failure.
    for hostile in ["[z-a]*", "a\0b", "[!z-a]", "\\"] {
        let found = f.m.search(&ArtifactQuery {
            name: Some(hostile.into()),
            ..q()
        });
        match found {
            Ok(v) => assert!(v.is_empty(), "{hostile:?}: {v:?}"),
            Err(crate::Error::InvalidInput(_)) => {}
            Err(e) => panic!("{hostile:?}: {e:?}"),
        }
    }
    match f.m.artifact("a\0b") {
        Err(crate::Error::NotFound { .. } | crate::Error::InvalidInput(_)) => {}
        other => panic!("an id with a NUL byte: {other:?}"),
    }
    assert_eq!(
        ids(ArtifactQuery {
            min_size: Some(200),
            max_size: Some(2000),
            ..q()
        }),
        [d.artifact_id.clone(), b.artifact_id.clone()]
    );
    assert_eq!(
        ids(ArtifactQuery {
            created_since: Some(Utc::now() + chrono::Duration::hours(1)),
            ..q()
        }),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(ArtifactQuery {
            created_since: Some(Utc::now() - chrono::Duration::hours(1)),
            limit: 2,
            ..q()
        })
        .len(),
        2
    );
    assert_eq!(
        ids(ArtifactQuery {
            session_id: Some(s2.session_id.clone()),
            artifact_type: Some(ArtifactType::LogFile),
            tags: vec!["node".into()],
            name: Some("kubelet".into()),
            max_size: Some(1000),
            ..q()
        }),
        vec![d.artifact_id.clone()]
    );

    let st = f.m.stats(None).unwrap();
    assert_eq!(
        (
            st.total_artifacts,
            st.total_size_bytes,
            st.sessions_searched
        ),
        (4, 2405, 2)
    );
    assert_eq!(st.average_size_bytes, 2405.0 / 4.0);
    assert_eq!(st.type_distribution.get(&ArtifactType::LogFile), Some(&2));
    assert_eq!(
        st.status_distribution.get(&ArtifactStatus::Created),
        Some(&4)
    );
    let st = f.m.stats(Some(&s.session_id)).unwrap();
    assert_eq!((st.total_artifacts, st.sessions_searched), (2, 1));
    let counts = f.m.counts_by_task("u1").unwrap();
    assert_eq!(counts.get("ng1"), Some(&1));
    assert_eq!(counts.get("validate"), Some(&1));
}
fn retention_removes_expired_sessions_and_their_unshared_blobs(f: Fixture) {
    let tracker = &f.tracker;
    tracker
        .create_upgrade("failed-up", "p", "c", JsonMap::new())
        .unwrap();
    tracker.fail_upgrade("failed-up", "boom").unwrap();
    let (s1, c1) = session(&f, "ok-up");
    let (s2, c2) = session(&f, "failed-up");
    let (s3, c3) = session(&f, "ok-up");
    let o = AddOptions::default();
    f.m.add_bytes(
        &s1.session_id,
        &c1.collection_id,
        b"only in s1",
        "a.log",
        &o,
    )
    .unwrap();
    f.m.add_bytes(&s1.session_id, &c1.collection_id, b"shared", "b.log", &o)
        .unwrap();
    f.m.add_bytes(&s2.session_id, &c2.collection_id, b"evidence", "c.log", &o)
        .unwrap();
    f.m.add_bytes(&s3.session_id, &c3.collection_id, b"shared", "d.log", &o)
        .unwrap();
    for s in [&s1, &s2] {
        f.m.complete_session(&s.session_id).unwrap();
    }
    // s3 is not completed: never removed by default.
    let in_40_days = Utc::now() + chrono::Duration::days(40);
    let plan = f.m.cleanup(true, Some(in_40_days)).unwrap();
    let ids: Vec<_> = plan
        .sessions
        .iter()
        .map(|e| e.session.session_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [s1.session_id.as_str()],
        "the failed upgrade's session is kept 3x longer"
    );
    assert_eq!(
        (plan.sessions[0].artifacts, plan.sessions[0].bytes),
        (2, 16)
    );
    assert_eq!(
        f.m.session(&s1.session_id).unwrap(),
        with_completion(s1.clone(), &f),
        "dry run changes nothing"
    );
    assert!(
        f.m.cleanup(true, Some(Utc::now()))
            .unwrap()
            .sessions
            .is_empty()
    );

    let done = f.m.cleanup(false, Some(in_40_days)).unwrap();
    assert_eq!(
        (done.blobs_removed, done.bytes_freed),
        (1, 10),
        "the shared blob stays"
    );
    assert!(matches!(
        f.m.session(&s1.session_id),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(f.m.search(&ArtifactQuery::default()).unwrap().len(), 2);
    assert!(
        f.m.verify(&mut |_| {}).unwrap().ok(),
        "remaining artifacts intact"
    );
    let in_100_days = Utc::now() + chrono::Duration::days(100);
    let done = f.m.cleanup(false, Some(in_100_days)).unwrap();
    assert_eq!(done.sessions.len(), 1);
    assert!(done.sessions[0].upgrade_failed);
}
/// The retention boundaries: 30 days after completion (90 for a failed upgrade's session),
/// not a day before or after: at 29 and 89 days nothing goes, at 31 the normal session goes,
/// at 91 the failed upgrade's too (a 40/100-day check passes with 35- or 60-day rules).
fn retention_keeps_30_days_and_90_for_failed_upgrades(f: Fixture) {
    let tracker = &f.tracker;
    tracker
        .create_upgrade("bad", "p", "c", JsonMap::new())
        .unwrap();
    tracker.fail_upgrade("bad", "boom").unwrap();
    let (ok, _) = session(&f, "good");
    let (failed, _) = session(&f, "bad");
    let done = |id: &str| f.m.complete_session(id).unwrap().completed_at.unwrap();
    let t_ok = done(&ok.session_id);
    let t_failed = done(&failed.session_id);
    let plan = |at: chrono::DateTime<Utc>| -> Vec<String> {
        let mut ids: Vec<String> =
            f.m.cleanup(true, Some(at))
                .unwrap()
                .sessions
                .into_iter()
                .map(|e| e.session.session_id)
                .collect();
        ids.sort();
        ids
    };
    let day = chrono::Duration::days(1);
    assert!(plan(t_ok + day * 29).is_empty());
    assert_eq!(plan(t_ok + day * 31), std::slice::from_ref(&ok.session_id));
    assert_eq!(
        plan(t_failed + day * 89),
        std::slice::from_ref(&ok.session_id)
    );
    let mut both = vec![ok.session_id.clone(), failed.session_id.clone()];
    both.sort();
    assert_eq!(plan(t_failed + day * 91), both);
}
/// `s` with the completion time the store holds.
fn with_completion(mut s: TestSession, f: &Fixture) -> TestSession {
    s.completed_at = f.m.session(&s.session_id).unwrap().completed_at;
    s
}
/// Like gc, retention and delete never take a blob from under a concurrent add of the same
/// bytes: they delete only blobs last put before they began, at deletion time under the
/// blob store's lock. Many rounds, each side released by a barrier.
fn cleanup_and_delete_never_take_a_blob_from_a_concurrent_add(f: Fixture) {
    let (live, c) = session(&f, "live");
    for round in 0..40u32 {
        let size = if round % 2 == 0 { 1000 } else { 40_000 };
        let data: Vec<u8> = (0..size).map(|i| (i as u32 ^ round) as u8).collect();
        let (old, oc) = session(&f, &format!("old{round}"));
        let gone =
            f.m.add_bytes(
                &old.session_id,
                &oc.collection_id,
                &data,
                "x.bin",
                &AddOptions::default(),
            )
            .unwrap();
        f.m.complete_session(&old.session_id).unwrap();
        let far = Utc::now() + chrono::Duration::days(10_000);
        let barrier = std::sync::Barrier::new(2);
        let (added, removed) = std::thread::scope(|scope| {
            let remover = scope.spawn(|| {
                barrier.wait();
                if round % 4 < 2 {
                    f.m.cleanup(false, Some(far)).map(drop)
                } else {
                    f.m.delete_artifact(&gone.artifact_id).map(drop)
                }
            });
            barrier.wait();
            let added = f.m.add_bytes(
                &live.session_id,
                &c.collection_id,
                &data,
                &format!("r{round}.bin"),
                &AddOptions::default(),
            );
            (added, remover.join().unwrap())
        });
        removed.unwrap();
        let added = added.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            f.m.read(&added.artifact_id).unwrap() == data,
            "round {round}"
        );
    }
    assert!(f.m.verify(&mut |_| {}).unwrap().ok());
}
/// Issue #10, item 16: uploaders claim queue entries with a lease; a live lease keeps others
/// off, an expired one (a crashed uploader) is taken over, and recording releases the claim.
fn upload_claims_exclude_others_until_the_lease_expires(f: Fixture) {
    use crate::store::{UploadOutcome, UploadQueue};
    let f = f.with_options(ArtifactsOptions {
        auto_upload: true,
        ..ArtifactsOptions::default()
    });
    let (s, c) = session(&f, "u1");
    for i in 0..5 {
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            format!("content {i}").as_bytes(),
            &format!("f{i}.log"),
            &AddOptions::default(),
        )
        .unwrap();
    }
    let q: &dyn UploadQueue = f.uploads.as_ref();
    // Real time, short leases: a backend may judge leases on its own clock (PostgreSQL judges
    // them on the database's), so expiry is waited for, not simulated with a later `now`.
    let ms = chrono::Duration::milliseconds;
    let wait = |d: chrono::Duration| std::thread::sleep(d.to_std().unwrap());
    let now = Utc::now();
    // Leases long enough for the statements before the wait on a busy machine; only the
    // waits for expiry are bounded below.
    let lease = now + ms(2000);
    let ids = |v: Vec<(TestArtifact, u32)>| -> Vec<String> {
        v.into_iter().map(|(a, _)| a.artifact_id).collect()
    };
    let a = ids(q.claim_uploads("A", now, lease, 3).unwrap());
    let b = ids(q.claim_uploads("B", now, lease, 10).unwrap());
    assert_eq!((a.len(), b.len()), (3, 2));
    assert!(a.iter().all(|x| !b.contains(x)), "disjoint claims");
    assert!(q.claim_uploads("C", now, lease, 10).unwrap().is_empty());
    assert_eq!(q.claimed_by_others("C", now).unwrap(), 5);
    assert_eq!(q.claimed_by_others("A", now).unwrap(), 2);
    // A live uploader's heartbeat keeps its claims past the first lease; B's lapse.
    let mut renewed_ids = q
        .renew_upload_claims("A", Utc::now() + chrono::Duration::minutes(30))
        .unwrap();
    renewed_ids.sort();
    let mut held = a.clone();
    held.sort();
    assert_eq!(renewed_ids, held, "a renewal names the claims it extended");
    wait(ms(2300));
    let between = Utc::now();
    let renewed = between + chrono::Duration::minutes(30);
    let taken = ids(q.claim_uploads("C", between, renewed, 10).unwrap());
    assert_eq!(taken.len(), 2, "only B's lapsed claims");
    assert!(taken.iter().all(|x| b.contains(x)));
    for id in &taken {
        q.record_upload(
            "C",
            id,
            &UploadOutcome::Uploaded {
                bucket: "b".into(),
                key: "k".into(),
                at: now,
            },
        )
        .unwrap();
    }
    // A records one and crashes; after its (renewed) lease the other two are C's.
    q.record_upload(
        "A",
        &a[0],
        &UploadOutcome::Uploaded {
            bucket: "b".into(),
            key: "k".into(),
            at: now,
        },
    )
    .unwrap();
    let before_expiry = Utc::now();
    assert!(
        q.claim_uploads("C", before_expiry, renewed, 10)
            .unwrap()
            .is_empty()
    );
    // A's last heartbeat: a short lease, which then runs out.
    q.renew_upload_claims("A", Utc::now() + ms(1000)).unwrap();
    wait(ms(1300));
    let after = Utc::now();
    let mut c_ids = ids(q
        .claim_uploads("C", after, after + chrono::Duration::minutes(30), 10)
        .unwrap());
    c_ids.sort();
    let mut expected = [a[1].clone(), a[2].clone()];
    expected.sort();
    assert_eq!(
        c_ids, expected,
        "an expired lease (a crashed uploader) is taken over"
    );
    assert_eq!(q.claimed_by_others("A", after).unwrap(), 2);
}
/// ARCHITECTURE "Blobs are immutable": an artifact row is committed only after its blob
/// exists, checked inside the index transaction. Indexing a digest whose blob is not in the
/// blob store is refused, and no row is left; the same row with its blob present is indexed.
fn an_artifact_row_is_committed_only_after_its_blob_exists(f: Fixture) {
    use crate::store::NewArtifact;
    let (s, c) = session(&f, "u1");
    let data = b"bytes that were never put".to_vec();
    let digest = crate::blob::Digest::of(&data);
    let row = NewArtifact {
        artifact_id: uuid::Uuid::now_v7().to_string(),
        collection_id: c.collection_id.clone(),
        name: "ghost.log".into(),
        description: None,
        artifact_type: ArtifactType::LogFile,
        file_size: data.len() as u64,
        digest,
        task_id: None,
        step_id: None,
        tags: Vec::new(),
        metadata: JsonMap::new(),
        created_at: Utc::now(),
        queue_upload: false,
    };
    let blobs = f.m.blobs().clone();
    let present = move |d: &crate::blob::Digest| blobs.exists(d);
    let err = f
        .index
        .insert_artifacts(std::slice::from_ref(&row), &present)
        .unwrap_err()
        .to_string();
    assert!(err.contains("disappeared before it was indexed"), "{err}");
    let summary = f.m.session_summary(&s.session_id).unwrap();
    assert_eq!(summary.total_artifacts, 0, "{summary:?}");
    // With its blob in the store, the same row is indexed.
    f.m.blobs().put(&mut data.as_slice(), &mut |_| {}).unwrap();
    let added = f.index.insert_artifacts(&[row], &present).unwrap();
    assert_eq!(added.len(), 1);
    assert_eq!(f.m.read(&added[0].artifact_id).unwrap(), data);
}

/// Pages of a search follow `next_cursor`, newest first, without a gap or a repeat; a cursor
/// that is not one is refused.
fn search_pages_follow_the_cursor(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let items: Vec<(String, Vec<u8>, AddOptions)> = (0..7)
        .map(|i| {
            (
                format!("f{i}.log"),
                vec![i as u8; 10],
                AddOptions::default(),
            )
        })
        .collect();
    let added =
        f.m.add_many_bytes(&s.session_id, &c.collection_id, &items)
            .unwrap();
    let mut want: Vec<String> = added.iter().map(|a| a.artifact_id.clone()).collect();
    want.reverse();
    let mut q = ArtifactQuery {
        limit: 3,
        ..ArtifactQuery::default()
    };
    let mut got = Vec::new();
    let mut pages = 0;
    loop {
        let page = f.m.search_page(&q).unwrap();
        pages += 1;
        got.extend(page.artifacts.into_iter().map(|a| a.artifact_id));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(got, want);
    assert_eq!(pages, 3);
    for bad in ["x", "-1", "0"] {
        let err =
            f.m.search_page(&ArtifactQuery {
                cursor: Some(bad.into()),
                ..ArtifactQuery::default()
            })
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{bad}: {err}");
        assert!(err.to_string().contains("next_cursor"), "{err}");
    }
}

/// Name searches see every row, however the backend batches its name index (600 rows: more
/// than SQLite's batch of 256 and its unindexed tail), and a later delete leaves no ghost.
fn name_search_finds_every_row_of_large_batches(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let items: Vec<(String, Vec<u8>, AddOptions)> = (0..600)
        .map(|i| {
            let name = if i % 100 == 7 {
                format!("needle-{i}.log")
            } else {
                format!("hay-{i}.log")
            };
            (name, format!("{i}").into_bytes(), AddOptions::default())
        })
        .collect();
    f.m.add_many_bytes(&s.session_id, &c.collection_id, &items)
        .unwrap();
    let names = |q: &str| -> Vec<String> {
        f.m.search(&ArtifactQuery {
            name: Some(q.into()),
            limit: 1000,
            ..ArtifactQuery::default()
        })
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect()
    };
    let found = names("NEEDLE");
    assert_eq!(found.len(), 6, "{found:?}");
    assert_eq!(found[0], "needle-507.log", "newest first");
    assert_eq!(names("needle-5*").len(), 1);
    assert_eq!(names("hay-").len(), 594);
    let one =
        f.m.search(&ArtifactQuery {
            name: Some("needle-107".into()),
            ..ArtifactQuery::default()
        })
        .unwrap();
    f.m.delete_artifact(&one[0].artifact_id).unwrap();
    assert_eq!(
        f.m.search(&ArtifactQuery {
            name: Some("needle".into()),
            status: Some(ArtifactStatus::Deleted),
            ..ArtifactQuery::default()
        })
        .unwrap()
        .len(),
        1,
        "a deleted artifact keeps its row, with status deleted"
    );
    f.m.delete_artifact(&one[0].artifact_id).unwrap();
    assert_eq!(f.m.stats(None).unwrap().total_artifacts, 600);
}

/// Abbreviated ids: the id itself, a unique prefix, a unique suffix of six characters or more;
/// an ambiguous one lists the candidates (ten at most, then "..."), an unknown one is not
/// found; `abbreviate` gives the shortest form that resolves back.
fn abbreviated_ids_resolve(f: Fixture) {
    let base = |id: &str| TestSession {
        session_id: id.into(),
        upgrade_id: "u".into(),
        cluster_name: "c".into(),
        name: "n".into(),
        description: None,
        started_at: Utc::now(),
        completed_at: None,
        retention_days: 30,
    };
    for i in 0..12u32 {
        f.index
            .create_session(&base(&format!(
                "0193aaaa-{i:04}-7000-8000-{:012x}",
                i * 7919
            )))
            .unwrap();
    }
    let b = "0193bbbb-0000-7000-8000-00000000beef";
    let c = "0193bbbc-0000-7000-8000-00111100beef";
    f.index.create_session(&base(b)).unwrap();
    f.index.create_session(&base(c)).unwrap();
    let r = |a: &str| f.index.resolve_id(IdKind::Session, a);
    assert_eq!(r(b).unwrap(), b);
    assert_eq!(r("0193bbbb").unwrap(), b);
    assert_eq!(r("111100beef").unwrap(), c);
    let err = r("0193bbb").unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "session id \"0193bbb\" is ambiguous: it matches {b}, {c}"
        )),
        "{err}"
    );
    assert!(r("00beef").unwrap_err().to_string().contains("ambiguous"));
    assert!(matches!(r("beef"), Err(Error::NotFound { .. })));
    assert!(matches!(
        f.index.resolve_id(IdKind::Artifact, "0193bbbb"),
        Err(Error::NotFound { .. })
    ));
    let err = r("0193aaaa").unwrap_err();
    assert!(
        err.to_string().ends_with(", ...; give more characters"),
        "{err}"
    );
    let third = format!("0193aaaa-0003-7000-8000-{:012x}", 3 * 7919);
    for id in [b, c, third.as_str()] {
        let short = f.index.abbreviate(IdKind::Session, id).unwrap();
        assert!(short.len() < id.len(), "{short}");
        assert_eq!(r(&short).unwrap(), id, "{short}");
    }
}

/// A session taken from elsewhere (a pulled manifest) keeps its ids; a second import is
/// `AlreadyExists`; an artifact naming a collection the session lacks refuses the whole
/// import; an imported artifact already in S3 is not queued for upload.
fn imported_sessions_keep_their_ids(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let a =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"abc",
            "a.log",
            &opts(ArtifactType::Report, &["t"]),
        )
        .unwrap();
    let mut session = s.clone();
    session.session_id = "0193cccc-0000-7000-8000-000000000001".into();
    let mut coll = c.clone();
    coll.collection_id = "0193cccc-0000-7000-8000-000000000002".into();
    coll.session_id = session.session_id.clone();
    let mut art = a.clone();
    art.artifact_id = "0193cccc-0000-7000-8000-000000000003".into();
    art.session_id = session.session_id.clone();
    art.collection_id = coll.collection_id.clone();
    art.status = ArtifactStatus::Uploaded;
    art.s3_bucket = Some("b".into());
    art.s3_key = Some("k".into());
    let mut stray = art.clone();
    stray.artifact_id = "0193cccc-0000-7000-8000-000000000004".into();
    stray.collection_id = "0193cccc-0000-7000-8000-00000000dead".into();
    let err = f
        .index
        .import_session(&session, std::slice::from_ref(&coll), &[art.clone(), stray])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(matches!(
        f.m.session(&session.session_id),
        Err(Error::NotFound { .. })
    ));
    f.index
        .import_session(
            &session,
            std::slice::from_ref(&coll),
            std::slice::from_ref(&art),
        )
        .unwrap();
    let got = f.m.artifact(&art.artifact_id).unwrap();
    assert_eq!(got, art);
    assert_eq!(
        f.m.collections(&session.session_id).unwrap(),
        [coll.clone()]
    );
    assert_eq!(f.m.session(&session.session_id).unwrap(), session);
    let err = f
        .index
        .import_session(&session, &[coll], &[art])
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(
        f.uploads
            .queue_uploads(&UploadSelector::All, false)
            .unwrap(),
        1,
        "only the local artifact is queued, not the one already in S3"
    );
}

fn uploaded(at: chrono::DateTime<Utc>) -> UploadOutcome {
    UploadOutcome::Uploaded {
        bucket: "bucket".into(),
        key: "prefix/key".into(),
        at,
    }
}

/// The queue: selectors (all, a session, an artifact, failed ones), what is pending, an
/// upload's record, a failure's retry time and `retry_failed`; deleted artifacts are never
/// queued; unknown ids are `NotFound`.
fn upload_queue_selects_records_and_retries(f: Fixture) {
    let q = f.uploads.as_ref();
    let (s1, c1) = session(&f, "u1");
    let (s2, c2) = session(&f, "u2");
    let add = |s: &TestSession, c: &ArtifactCollection, name: &str, bytes: &[u8]| {
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            bytes,
            name,
            &AddOptions::default(),
        )
        .unwrap()
    };
    let a = add(&s1, &c1, "a.log", b"aaaa");
    let b = add(&s1, &c1, "b.log", b"bb");
    let d = add(&s2, &c2, "d.log", b"d");
    let gone = add(&s2, &c2, "gone.log", b"gone");
    f.m.delete_artifact(&gone.artifact_id).unwrap();
    assert_eq!(q.pending_uploads().unwrap(), (0, 0), "nothing queued yet");
    assert!(matches!(
        q.queue_uploads(&UploadSelector::Artifact("nope".into()), false),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        q.queue_uploads(&UploadSelector::Session("nope".into()), false),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        q.queue_uploads(&UploadSelector::Artifact(d.artifact_id.clone()), false)
            .unwrap(),
        1
    );
    assert_eq!(
        q.queue_uploads(&UploadSelector::Session(s1.session_id.clone()), false)
            .unwrap(),
        2
    );
    assert_eq!(
        q.queue_uploads(&UploadSelector::All, false).unwrap(),
        0,
        "deleted ones stay out"
    );
    assert_eq!(q.pending_uploads().unwrap(), (3, 7));
    let now = Utc::now();
    let lease = now + chrono::Duration::minutes(1);
    let claimed = q.claim_uploads("me", now, lease, 10).unwrap();
    let ids: Vec<&str> = claimed
        .iter()
        .map(|(a, _)| a.artifact_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [&a.artifact_id, &b.artifact_id, &d.artifact_id],
        "oldest first"
    );
    assert!(claimed.iter().all(|(_, n)| *n == 0));
    let rec = q
        .record_upload("me", &a.artifact_id, &uploaded(now))
        .unwrap();
    assert_eq!(rec.status, ArtifactStatus::Uploaded);
    assert_eq!(rec.s3_bucket.as_deref(), Some("bucket"));
    assert_eq!(rec.s3_key.as_deref(), Some("prefix/key"));
    assert_eq!(rec.s3_url.as_deref(), Some("s3://bucket/prefix/key"));
    assert!(rec.uploaded_at.is_some());
    let later = now + chrono::Duration::hours(1);
    let rec = q
        .record_upload(
            "me",
            &b.artifact_id,
            &UploadOutcome::Failed {
                error: "slow down".into(),
                next_at: Some(later),
            },
        )
        .unwrap();
    assert_eq!(rec.status, ArtifactStatus::Failed);
    q.record_upload(
        "me",
        &d.artifact_id,
        &UploadOutcome::Failed {
            error: "denied".into(),
            next_at: Some(now + chrono::Duration::days(365)),
        },
    )
    .unwrap();
    assert_eq!(q.pending_uploads().unwrap(), (0, 0));
    // A failure waits for its retry time (or `retry_failed`).
    assert!(q.claim_uploads("me", now, lease, 10).unwrap().is_empty());
    let retried = q
        .claim_uploads("me", later, later + chrono::Duration::minutes(1), 10)
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].0.artifact_id, b.artifact_id);
    assert_eq!(retried[0].1, 1, "one attempt so far");
    q.record_upload("me", &b.artifact_id, &uploaded(later))
        .unwrap();
    assert_eq!(q.queue_uploads(&UploadSelector::All, false).unwrap(), 0);
    assert_eq!(q.queue_uploads(&UploadSelector::Failed, true).unwrap(), 1);
    let again = q.claim_uploads("me", now, lease, 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0.artifact_id, d.artifact_id);
    assert_eq!(
        f.m.stats(None)
            .unwrap()
            .status_distribution
            .get(&ArtifactStatus::Uploaded),
        Some(&2)
    );
}

/// A claimer that lost its lease (it stalled past it and another took the entry over) and
/// reports late changes nothing: neither while the other holds the entry, nor after the other
/// recorded it (an uploaded artifact is never reopened as failed).
fn a_late_upload_outcome_from_a_lost_lease_changes_nothing(f: Fixture) {
    let q = f.uploads.as_ref();
    let (s, c) = session(&f, "u1");
    let a =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"x",
            "x.log",
            &AddOptions::default(),
        )
        .unwrap();
    q.queue_uploads(&UploadSelector::All, false).unwrap();
    let now = Utc::now();
    let first = q
        .claim_uploads("slow", now, now + chrono::Duration::milliseconds(300), 10)
        .unwrap();
    assert_eq!(first.len(), 1);
    // Real time (a backend may judge leases on its own clock): slow's lease runs out.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let after = Utc::now();
    let taken = q
        .claim_uploads("fast", after, after + chrono::Duration::seconds(10), 10)
        .unwrap();
    assert_eq!(taken.len(), 1, "an expired lease is taken over");
    let failed = UploadOutcome::Failed {
        error: "timed out".into(),
        next_at: Some(after),
    };
    q.record_upload("slow", &a.artifact_id, &failed).unwrap();
    let row = f.m.artifact(&a.artifact_id).unwrap();
    assert_eq!(row.status, ArtifactStatus::Created, "{row:?}");
    assert_eq!(
        q.claimed_by_others("slow", after).unwrap(),
        1,
        "still fast's"
    );
    q.record_upload("fast", &a.artifact_id, &uploaded(after))
        .unwrap();
    q.record_upload("slow", &a.artifact_id, &failed).unwrap();
    let row = f.m.artifact(&a.artifact_id).unwrap();
    assert_eq!(row.status, ArtifactStatus::Uploaded, "{row:?}");
    assert_eq!(row.s3_key.as_deref(), Some("prefix/key"));
    let later = after + chrono::Duration::hours(2);
    assert!(
        q.claim_uploads("any", later, later, 10).unwrap().is_empty(),
        "nothing is handed out again"
    );
    // Guarantee G92: the claim is the fencing token. The one who took the entry over records
    // a failure (the entry is unclaimed again); the late success of the one who lost its
    // lease is still not recorded, and a renewal does not bring the claim back.
    let b =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"y",
            "y.log",
            &AddOptions::default(),
        )
        .unwrap();
    q.queue_uploads(&UploadSelector::All, false).unwrap();
    let now = Utc::now();
    let first = q
        .claim_uploads("slow", now, now + chrono::Duration::milliseconds(300), 10)
        .unwrap();
    assert_eq!(first.len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let now = Utc::now();
    let taken = q
        .claim_uploads("fast", now, now + chrono::Duration::seconds(10), 10)
        .unwrap();
    assert_eq!(taken.len(), 1);
    q.record_upload(
        "fast",
        &b.artifact_id,
        &UploadOutcome::Failed {
            error: "fast failed".into(),
            next_at: Some(now + chrono::Duration::hours(1)),
        },
    )
    .unwrap();
    assert!(
        q.renew_upload_claims("slow", now + chrono::Duration::seconds(10))
            .unwrap()
            .is_empty(),
        "a lost claim is not renewed"
    );
    q.record_upload("slow", &b.artifact_id, &uploaded(now))
        .unwrap();
    let row = f.m.artifact(&b.artifact_id).unwrap();
    assert_eq!(row.status, ArtifactStatus::Failed, "{row:?}");
    assert_eq!(row.s3_key, None, "{row:?}");
}

/// Deleting a queued artifact takes it out of the upload queue: no claim hands it out, and the
/// late outcome of an upload that was running never brings it back as failed or uploaded.
fn a_deleted_artifact_leaves_the_upload_queue(f: Fixture) {
    let q = f.uploads.as_ref();
    let (s, c) = session(&f, "u1");
    let add = |name: &str| {
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            name.as_bytes(),
            name,
            &AddOptions::default(),
        )
        .unwrap()
    };
    let (queued, running) = (add("queued.log"), add("running.log"));
    q.queue_uploads(&UploadSelector::All, false).unwrap();
    let now = Utc::now();
    let until = now + chrono::Duration::seconds(10);
    let claimed = q.claim_uploads("up", now, until, 1).unwrap();
    assert_eq!(claimed.len(), 1);
    let (running, queued) = if claimed[0].0.artifact_id == running.artifact_id {
        (running, queued)
    } else {
        (queued, running)
    };
    f.m.delete_artifact(&queued.artifact_id).unwrap();
    f.m.delete_artifact(&running.artifact_id).unwrap();
    let later = now + chrono::Duration::hours(2);
    assert!(
        q.claim_uploads("other", later, later, 10)
            .unwrap()
            .is_empty(),
        "a deleted artifact is never handed out"
    );
    q.record_upload("up", &running.artifact_id, &uploaded(now))
        .unwrap();
    let failed = UploadOutcome::Failed {
        error: "gone".into(),
        next_at: Some(now),
    };
    q.record_upload("up", &running.artifact_id, &failed)
        .unwrap();
    for a in [&queued, &running] {
        let row = f.m.artifact(&a.artifact_id).unwrap();
        assert_eq!(row.status, ArtifactStatus::Deleted, "{row:?}");
        assert_eq!(row.s3_key, None, "{row:?}");
    }
}

/// `gc` deletes the reports an ingest left when neither its run nor its undo could be written
/// (`test_result` artifacts still marked with [`crate::store::PENDING_RUN_KEY`] naming no
/// run) once older than `orphan_report_age`, releasing their blobs, and nothing else (a
/// report with a `run_id` and a `phase` of a run this store does not hold, as a pulled session
/// or a user's metadata has, stays); recording a run unmarks its reports; a run naming a
/// report deleted so is refused and stores nothing (G121).
fn gc_removes_the_reports_of_runs_never_recorded(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let add = |name: &str, ty: ArtifactType, meta: serde_json::Value| {
        let metadata: JsonMap = serde_json::from_value(meta).unwrap();
        // As the ingest adds (a user's metadata may not carry its mark).
        f.m.add_reader_as(
            &s.session_id,
            &c.collection_id,
            &mut name.as_bytes(),
            name,
            &AddOptions {
                artifact_type: Some(ty),
                metadata,
                ..AddOptions::default()
            },
            true,
        )
        .unwrap()
    };
    let report = ArtifactType::TestResult;
    let key = crate::store::PENDING_RUN_KEY;
    let orphan = add(
        "orphan.xml",
        report,
        json!({"run_id": "r-gone", "phase": "pre", key: "r-gone"}),
    );
    let recorded = add(
        "recorded.xml",
        report,
        json!({"run_id": "r-kept", "phase": "pre", key: "r-kept"}),
    );
    let run = |id: &str, artifact: &str| crate::model::NewRun {
        run_id: id.into(),
        upgrade_id: "u1".into(),
        cluster_name: "c".into(),
        phase: crate::model::RunPhase::Pre,
        created_at: Utc::now(),
        files: vec!["r.xml".into()],
        artifact_ids: vec![artifact.into()],
    };
    f.backend
        .results
        .record_run(&run("r-kept", &recorded.artifact_id), &mut |_| Ok(()))
        .unwrap();
    assert!(
        !f.m.artifact(&recorded.artifact_id)
            .unwrap()
            .metadata
            .contains_key(key),
        "recording the run unmarks its report"
    );
    // Not a report of an unrecorded ingest here: a pulled report (or a user's metadata) of a
    // run this store does not hold, another type, a mark that is not a run id.
    let others = [
        add(
            "pulled.xml",
            report,
            json!({"run_id": "r-gone", "phase": "pre"}),
        ),
        add("log.txt", ArtifactType::LogFile, json!({key: "r-gone"})),
        add("odd.xml", report, json!({key: 7})),
    ];
    assert_eq!(
        f.m.gc().unwrap().orphan_reports_removed,
        0,
        "younger than an hour"
    );
    assert_eq!(
        f.m.artifact(&orphan.artifact_id).unwrap().status,
        ArtifactStatus::Created
    );
    let f = f.with_options(ArtifactsOptions {
        orphan_report_age: std::time::Duration::ZERO,
        ..ArtifactsOptions::default()
    });
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(f.m.gc().unwrap().orphan_reports_removed, 1);
    assert_eq!(
        f.m.artifact(&orphan.artifact_id).unwrap().status,
        ArtifactStatus::Deleted
    );
    let digest: crate::blob::Digest = orphan.file_hash.parse().unwrap();
    assert!(
        !f.blobs.exists(&digest).unwrap(),
        "the orphan's blob is released"
    );
    for a in others.iter().chain([&recorded]) {
        assert_ne!(
            f.m.artifact(&a.artifact_id).unwrap().status,
            ArtifactStatus::Deleted,
            "{a:?}"
        );
    }
    assert_eq!(f.m.gc().unwrap().orphan_reports_removed, 0);
    // The late run of the deleted report is refused whole.
    let late = f
        .backend
        .results
        .record_run(&run("r-gone", &orphan.artifact_id), &mut |_| Ok(()));
    match late {
        Err(Error::InvalidInput(m)) => assert!(m.contains("ingest the report again"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        f.backend.results.run("r-gone"),
        Err(Error::NotFound { .. })
    ));
}

/// `latest_session_or_create` creates a session only for an upgrade that has none, and
/// otherwise answers the upgrade's latest session (G120).
fn an_upgrades_first_session_is_created_once(f: Fixture) {
    let new = |u: &str| NewSession {
        upgrade_id: u.into(),
        cluster_name: "c".into(),
        ..NewSession::default()
    };
    let (first, created) = f.m.latest_session_or_create(new("u1")).unwrap();
    assert!(created);
    let (again, created) = f.m.latest_session_or_create(new("u1")).unwrap();
    assert!(!created);
    assert_eq!(again, first);
    let later = f.m.create_session(new("u1")).unwrap();
    let (latest, created) = f.m.latest_session_or_create(new("u1")).unwrap();
    assert!(!created);
    assert_eq!(latest, later);
    let (other, created) = f.m.latest_session_or_create(new("u2")).unwrap();
    assert!(created);
    assert_eq!(other.upgrade_id, "u2");
    assert_eq!(f.m.sessions(None).unwrap().len(), 3);
}

/// `delete_session_if_empty` keeps a session that has a live artifact, and removes it (rows
/// and all, returning its digests) once every artifact is a `deleted` record.
fn a_session_is_removed_only_when_empty(f: Fixture) {
    let (s, c) = session(&f, "u1");
    let a =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"kept",
            "kept.log",
            &AddOptions::default(),
        )
        .unwrap();
    assert_eq!(
        f.index.delete_session_if_empty(&s.session_id).unwrap(),
        None
    );
    assert!(
        f.m.artifact(&a.artifact_id).is_ok(),
        "a live artifact keeps its session"
    );
    f.m.delete_artifact(&a.artifact_id).unwrap();
    let digests = f
        .index
        .delete_session_if_empty(&s.session_id)
        .unwrap()
        .expect("removed once only deleted records are left");
    assert_eq!(digests.len(), 1);
    assert!(matches!(
        f.index.delete_session_if_empty(&s.session_id),
        Err(crate::Error::NotFound { .. })
    ));
}
