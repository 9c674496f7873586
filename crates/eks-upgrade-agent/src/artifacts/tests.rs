//! Tests of `TestArtifactsManager` on the real backends (SQLite index, local blobs).

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::*;
use crate::blob::{BlobStore, LocalBlobStore};
use crate::model::{ArtifactStatus, JsonMap};
use crate::progress::ProgressTracker;
use crate::store::Durability;
use crate::store::sqlite::{SqliteOptions, SqliteStore};

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    m: TestArtifactsManager,
}

fn fixture_with(options: ArtifactsOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(&dir.path().join("data"), &SqliteOptions::default()).unwrap());
    let blobs = Arc::new(
        LocalBlobStore::open(&dir.path().join("data/blobs"), Durability::default()).unwrap(),
    );
    let m = TestArtifactsManager::new(store.clone(), blobs, options);
    Fixture { dir, store, m }
}

fn fixture() -> Fixture {
    fixture_with(ArtifactsOptions::default())
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

#[test]
fn sessions_and_collections() {
    let f = fixture();
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

#[test]
fn add_files_directories_and_bytes() {
    let f = fixture();
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

#[test]
fn same_name_same_bytes_is_idempotent_and_different_bytes_keep_both() {
    let f = fixture();
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

#[test]
fn bad_input_changes_nothing() {
    let f = fixture();
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

#[test]
fn search_by_every_filter() {
    let f = fixture();
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

#[test]
fn corrupt_and_missing_blobs_are_reported() {
    let f = fixture();
    let (s, c) = session(&f, "u1");
    let a =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"good bytes",
            "a.log",
            &AddOptions::default(),
        )
        .unwrap();
    let b =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"other bytes",
            "b.log",
            &AddOptions::default(),
        )
        .unwrap();
    assert!(f.m.verify(&mut |_| {}).unwrap().ok());
    let blobs =
        LocalBlobStore::open(&f.dir.path().join("data/blobs"), Durability::default()).unwrap();
    blobs.corrupt_for_tests(&a.file_hash.parse().unwrap());
    assert!(blobs.delete(&b.file_hash.parse().unwrap()).unwrap());
    let err = f.m.read(&a.artifact_id).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    let out = f.dir.path().join("out.log");
    assert!(f.m.write_to(&a.artifact_id, &out).is_err());
    assert!(!out.exists(), "no file is left behind for corrupt content");
    let err = f.m.read(&b.artifact_id).unwrap_err();
    assert!(err.to_string().contains("content of artifact"), "{err}");
    let report = f.m.verify(&mut |_| {}).unwrap();
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].0, a.artifact_id);
    assert_eq!(
        report.missing,
        [(b.artifact_id.clone(), "b.log".to_owned())]
    );
}

/// An export meets a corrupt blob: that artifact is reported as a failure and leaves no file
/// (not even a partial one); the others are exported whole.
#[test]
fn export_of_a_corrupt_blob_fails_it_and_leaves_no_file() {
    let f = fixture();
    let (s, c) = session(&f, "u1");
    let o = AddOptions::default();
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let bad =
        f.m.add_bytes(&s.session_id, &c.collection_id, &big, "bad.bin", &o)
            .unwrap();
    f.m.add_bytes(&s.session_id, &c.collection_id, b"fine", "good.log", &o)
        .unwrap();
    let blobs =
        LocalBlobStore::open(&f.dir.path().join("data/blobs"), Durability::default()).unwrap();
    blobs.corrupt_for_tests(&bad.file_hash.parse().unwrap());
    let out = f.dir.path().join("export");
    let report =
        f.m.export_session(&s.session_id, &out, false, &mut |_| {})
            .unwrap();
    assert_eq!(report.files, 1, "{report:?}");
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert_eq!(report.failures[0].0, bad.artifact_id, "{report:?}");
    assert_eq!(
        fs::read(out.join("Upgrade Logs/good.log")).unwrap(),
        b"fine"
    );
    let left: Vec<_> = fs::read_dir(out.join("Upgrade Logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["good.log"],
        "no file, partial or temporary, for the corrupt one"
    );
}

#[test]
fn export_writes_collections_and_never_escapes() {
    let f = fixture();
    let (s, c) = session(&f, "u1");
    let c2 =
        f.m.create_collection(&s.session_id, "../../outside", None, None)
            .unwrap();
    let o = AddOptions::default();
    f.m.add_bytes(&s.session_id, &c.collection_id, b"one", "nodes/a.log", &o)
        .unwrap();
    f.m.add_bytes(&s.session_id, &c.collection_id, b"two", "nodes/a.log", &o)
        .unwrap();
    f.m.add_bytes(&s.session_id, &c2.collection_id, b"three", "x.log", &o)
        .unwrap();
    let out = f.dir.path().join("export");
    let report =
        f.m.export_session(&s.session_id, &out, false, &mut |_| {})
            .unwrap();
    assert_eq!((report.files, report.bytes), (3, 11));
    assert!(report.failures.is_empty());
    assert_eq!(
        fs::read(out.join("Upgrade Logs/nodes/a.log")).unwrap(),
        b"one"
    );
    assert_eq!(
        fs::read(out.join("Upgrade Logs/nodes/a~2.log")).unwrap(),
        b"two"
    );
    assert_eq!(fs::read(out.join(".._.._outside/x.log")).unwrap(), b"three");
    assert!(!f.dir.path().join("outside").exists());
    let err =
        f.m.export_session(&s.session_id, &out, false, &mut |_| {})
            .unwrap_err();
    assert!(err.to_string().contains("not empty; use --force"), "{err}");
    // With --force, a planted symlink pointing outside is refused, not followed.
    fs::remove_dir_all(out.join("Upgrade Logs/nodes")).unwrap();
    let elsewhere = f.dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("Upgrade Logs/nodes")).unwrap();
    let report =
        f.m.export_session(&s.session_id, &out, true, &mut |_| {})
            .unwrap();
    assert_eq!(report.failures.len(), 2, "{report:?}");
    assert!(report.failures[0].1.contains("leads outside"), "{report:?}");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn retention_removes_expired_sessions_and_their_unshared_blobs() {
    let f = fixture();
    let tracker = ProgressTracker::new(f.store.clone());
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
        s1.clone().with_completion(&f),
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
#[test]
fn retention_keeps_30_days_and_90_for_failed_upgrades() {
    let f = fixture();
    let tracker = ProgressTracker::new(f.store.clone());
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

impl TestSession {
    fn with_completion(mut self, f: &Fixture) -> TestSession {
        self.completed_at = f.m.session(&self.session_id).unwrap().completed_at;
        self
    }
}

#[test]
fn gc_removes_orphans_but_not_referenced_or_young_blobs() {
    let f = fixture_with(ArtifactsOptions {
        gc_grace: Duration::ZERO,
        ..ArtifactsOptions::default()
    });
    let (s, c) = session(&f, "u1");
    let kept =
        f.m.add_bytes(
            &s.session_id,
            &c.collection_id,
            b"kept",
            "k.log",
            &AddOptions::default(),
        )
        .unwrap();
    // An orphan: stored, never indexed (as after a kill between the two steps).
    f.m.blobs().put(&mut &b"orphan!"[..], &mut |_| {}).unwrap();
    fs::write(f.dir.path().join("data/blobs/tmp/dead.part"), b"half").unwrap();
    let report = f.m.gc().unwrap();
    assert_eq!(
        (
            report.incomplete_removed,
            report.blobs_removed,
            report.bytes_freed
        ),
        (1, 1, 7)
    );
    assert_eq!(f.m.read(&kept.artifact_id).unwrap(), b"kept");
    // With the default grace period a fresh orphan is left alone.
    let g = fixture();
    g.m.blobs()
        .put(&mut &b"fresh orphan"[..], &mut |_| {})
        .unwrap();
    let report = g.m.gc().unwrap();
    assert_eq!((report.blobs_removed, report.blobs_in_grace), (0, 1));
}

/// Issue #10, item 9: a session with a retention beyond the calendar (an old store, a hand
/// edit) never panics `cleanup`; it simply never expires. Every way in refuses such values.
#[test]
fn cleanup_saturates_huge_retentions_and_every_way_in_bounds_them() {
    let f = fixture_with(ArtifactsOptions {
        failed_retention_factor: u32::MAX,
        ..ArtifactsOptions::default()
    });
    let (s, _) = session(&f, "u1");
    f.m.complete_session(&s.session_id).unwrap();
    f.store
        .write(|tx| {
            tx.execute("UPDATE sessions SET retention_days = 4294967295", [])?;
            Ok(())
        })
        .unwrap();
    for as_of in [Utc::now(), chrono::DateTime::<Utc>::MAX_UTC] {
        let r = f.m.cleanup(true, Some(as_of)).unwrap();
        assert!(
            r.sessions
                .iter()
                .all(|e| e.expired_at == chrono::DateTime::<Utc>::MAX_UTC),
            "{r:?}"
        );
    }
    assert!(f.m.cleanup(false, None).unwrap().sessions.is_empty());
    // The library, and the index below it, refuse retentions outside 1..=36500.
    for days in [0, 36_501, u32::MAX] {
        let err =
            f.m.create_session(NewSession {
                upgrade_id: "u2".into(),
                cluster_name: "c".into(),
                retention_days: Some(days),
                ..NewSession::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("1..=36500"), "{err}");
        let mut bad = s.clone();
        bad.session_id = format!("direct-{days}");
        bad.retention_days = days;
        let err = f.m.index().create_session(&bad).unwrap_err();
        assert!(err.to_string().contains("1..=36500"), "{err}");
    }
}

/// Issue #10, item 15: corrupt a blob on disk, add the same bytes again: the add repairs the
/// blob instead of pointing a new artifact at the corrupt copy (small inline and file blobs).
#[test]
fn re_adding_good_bytes_repairs_a_corrupt_blob() {
    let f = fixture();
    let (s, c) = session(&f, "u1");
    let blobs =
        LocalBlobStore::open(&f.dir.path().join("data/blobs"), Durability::default()).unwrap();
    for (i, data) in [vec![5u8; 100], vec![6u8; 100_000]].into_iter().enumerate() {
        let first =
            f.m.add_bytes(
                &s.session_id,
                &c.collection_id,
                &data,
                &format!("f{i}.log"),
                &AddOptions::default(),
            )
            .unwrap();
        blobs.corrupt_for_tests(&first.file_hash.parse().unwrap());
        assert!(!f.m.verify(&mut |_| {}).unwrap().ok());
        let second =
            f.m.add_bytes(
                &s.session_id,
                &c.collection_id,
                &data,
                &format!("g{i}.log"),
                &AddOptions::default(),
            )
            .unwrap();
        assert_eq!(second.file_hash, first.file_hash);
        assert!(f.m.verify(&mut |_| {}).unwrap().ok(), "repaired");
        assert!(f.m.read(&first.artifact_id).unwrap() == data);
        assert!(f.m.read(&second.artifact_id).unwrap() == data);
    }
}

/// Issue #10, item 17: gc racing a re-add of an old orphan blob. The add's put refreshes the
/// blob before the index transaction, and gc re-checks the age at deletion under the same
/// lock, so the add never finds its blob gone. Many rounds, both sides released by a barrier.
#[test]
fn gc_never_deletes_a_blob_a_concurrent_add_is_about_to_index() {
    let f = fixture_with(ArtifactsOptions {
        gc_grace: Duration::from_secs(60),
        ..ArtifactsOptions::default()
    });
    let (s, c) = session(&f, "u1");
    let blobs =
        LocalBlobStore::open(&f.dir.path().join("data/blobs"), Durability::default()).unwrap();
    let small_db = f.dir.path().join("data/blobs/small.sqlite3");
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    for round in 0..60u32 {
        // An orphan, aged past the grace period (alternately inline and a file).
        let size = if round % 2 == 0 { 1000 } else { 40_000 };
        let data: Vec<u8> = (0..size).map(|i| (i as u32 ^ round) as u8).collect();
        let info = f.m.blobs().put(&mut data.as_slice(), &mut |_| {}).unwrap();
        if size > crate::blob::local::INLINE_MAX {
            fs::File::open(blobs.path_of(&info.digest))
                .unwrap()
                .set_modified(old)
                .unwrap();
        } else {
            rusqlite::Connection::open(&small_db)
                .unwrap()
                .execute("UPDATE blobs SET created_at = 0", [])
                .unwrap();
        }
        let barrier = std::sync::Barrier::new(2);
        let (added, gc) = std::thread::scope(|scope| {
            let gc = scope.spawn(|| {
                barrier.wait();
                f.m.gc()
            });
            barrier.wait();
            let added = f.m.add_bytes(
                &s.session_id,
                &c.collection_id,
                &data,
                &format!("r{round}.bin"),
                &AddOptions::default(),
            );
            (added, gc.join().unwrap())
        });
        let added = added.unwrap_or_else(|e| panic!("round {round}: {e}"));
        gc.unwrap();
        assert!(
            f.m.read(&added.artifact_id).unwrap() == data,
            "round {round}"
        );
    }
    assert!(f.m.verify(&mut |_| {}).unwrap().ok());
}

/// Like gc, retention and delete never take a blob from under a concurrent add of the same
/// bytes: they delete only blobs last put before they began, at deletion time under the
/// blob store's lock. Many rounds, each side released by a barrier.
#[test]
fn cleanup_and_delete_never_take_a_blob_from_a_concurrent_add() {
    let f = fixture();
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
#[test]
fn upload_claims_exclude_others_until_the_lease_expires() {
    use crate::store::{UploadOutcome, UploadQueue};
    let f = fixture_with(ArtifactsOptions {
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
    let q: &dyn UploadQueue = f.store.as_ref();
    let now = Utc::now();
    let lease = now + chrono::Duration::minutes(30);
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
    let renewed = lease + chrono::Duration::minutes(30);
    q.renew_upload_claims("A", renewed).unwrap();
    let between = lease + chrono::Duration::seconds(1);
    let taken = ids(q.claim_uploads("C", between, renewed, 10).unwrap());
    assert_eq!(taken.len(), 2, "only B's lapsed claims");
    assert!(taken.iter().all(|x| b.contains(x)));
    for id in &taken {
        q.record_upload(
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
        &a[0],
        &UploadOutcome::Uploaded {
            bucket: "b".into(),
            key: "k".into(),
            at: now,
        },
    )
    .unwrap();
    let before_expiry = renewed - chrono::Duration::seconds(1);
    assert!(
        q.claim_uploads("C", before_expiry, renewed, 10)
            .unwrap()
            .is_empty()
    );
    let after = renewed + chrono::Duration::seconds(1);
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
#[test]
fn an_artifact_row_is_committed_only_after_its_blob_exists() {
    use crate::store::{ArtifactIndex, NewArtifact};
    let f = fixture();
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
        .store
        .insert_artifacts(std::slice::from_ref(&row), &present)
        .unwrap_err()
        .to_string();
    assert!(err.contains("disappeared before it was indexed"), "{err}");
    let summary = f.m.session_summary(&s.session_id).unwrap();
    assert_eq!(summary.total_artifacts, 0, "{summary:?}");
    // With its blob in the store, the same row is indexed.
    f.m.blobs().put(&mut data.as_slice(), &mut |_| {}).unwrap();
    let added = f.store.insert_artifacts(&[row], &present).unwrap();
    assert_eq!(added.len(), 1);
    assert_eq!(f.m.read(&added[0].artifact_id).unwrap(), data);
}
