//! Tests of `TestArtifactsManager` over the SQLite index and local blobs that depend on the
//! local blob store (corruption, repair, gc and its races, export to disk). What every index
//! backend must do is the suite in `conformance.rs`, run by each backend.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::*;
use crate::blob::{BlobStore, LocalBlobStore};
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
