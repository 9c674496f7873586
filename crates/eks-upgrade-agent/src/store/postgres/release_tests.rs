//! Blob releases on a shared database (G105): a release's S3 delete runs outside any
//! transaction under a committed mark, so a delete that lands late never removes the bytes of
//! an artifact another replica added meanwhile; stale marks are taken over and finished.
//! Real PostgreSQL (`PgCluster`) and real S3 (moto).

use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::progress::{PostgresOptions, PostgresStore, SessionLimits};
use crate::artifacts::{AddOptions, ArtifactsOptions, NewSession, TestArtifactsManager};
use crate::blob::{
    BlobInfo, BlobMeta, BlobStore, CachedBlobStore, Digest, LocalBlobStore, S3BlobStore, S3Options,
};
use crate::error::Result;
use crate::model::{ArtifactCollection, ArtifactStatus, TestSession};
use crate::store::Durability;
use crate::test_support::{Moto, PgCluster};

/// An S3 store whose deletes, once armed, check the blob's age and then wait for the test to
/// let them through: a DELETE that S3 receives late, after its age check passed.
#[derive(Debug)]
struct Held {
    inner: Arc<S3BlobStore>,
    armed: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    /// Deletes fail (S3 answering 503).
    fail: std::sync::atomic::AtomicBool,
}

impl Held {
    /// Arms the next delete: returns (entered, let through).
    fn arm(&self) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered_rx) = channel();
        let (go_tx, go_rx) = channel();
        *self.armed.lock().unwrap() = Some((entered_tx, go_rx));
        (entered_rx, go_tx)
    }

    fn modified(&self, d: &Digest) -> Result<Option<SystemTime>> {
        let mut found = None;
        self.inner.list(&mut |m| {
            if m.digest == *d {
                found = m.modified;
            }
            Ok(())
        })?;
        Ok(found)
    }
}

impl BlobStore for Held {
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
        self.inner.put(reader, progress)
    }
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        self.inner.open(digest)
    }
    fn exists(&self, digest: &Digest) -> Result<bool> {
        self.inner.exists(digest)
    }
    fn size(&self, digest: &Digest) -> Result<u64> {
        self.inner.size(digest)
    }
    fn delete(&self, digest: &Digest) -> Result<bool> {
        self.inner.delete(digest)
    }
    fn list(&self, f: &mut dyn FnMut(BlobMeta) -> Result<()>) -> Result<()> {
        self.inner.list(f)
    }
    fn delete_if_older(&self, digest: &Digest, cutoff: SystemTime) -> Result<bool> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::Error::Backend {
                message: "cannot delete s3://blobs/...: 503 SlowDown".into(),
                source: None,
            });
        }
        let armed = self.armed.lock().unwrap().take();
        let Some((entered, go)) = armed else {
            return self.inner.delete_if_older(digest, cutoff);
        };
        // The age check, as S3BlobStore makes it; then the delete, held.
        if self.modified(digest)?.is_none_or(|m| m > cutoff) {
            return Ok(false);
        }
        entered.send(()).unwrap();
        go.recv_timeout(Duration::from_secs(60)).unwrap();
        self.inner.delete(digest)
    }
}

fn s3(moto: &Moto) -> Arc<S3BlobStore> {
    Arc::new(
        S3BlobStore::new(&S3Options {
            bucket: "blobs".into(),
            prefix: String::new(),
            endpoint: Some(moto.url.clone()),
            region: Some("us-east-1".into()),
            credentials: Some(("testing".into(), "testing".into())),
        })
        .unwrap(),
    )
}

/// A replica: its own store (pool) on the database and its own blob cache over `shared`.
fn replica(
    store: PostgresStore,
    shared: Arc<dyn BlobStore>,
    cache: &Path,
    gc_grace: Duration,
) -> TestArtifactsManager {
    let cache = LocalBlobStore::open(cache, Durability::default()).unwrap();
    let blobs = CachedBlobStore::new(shared, cache, 1 << 30).unwrap();
    TestArtifactsManager::new(
        Arc::new(store),
        Arc::new(blobs),
        ArtifactsOptions {
            gc_grace,
            ..ArtifactsOptions::default()
        },
    )
}

fn session(m: &TestArtifactsManager) -> (TestSession, ArtifactCollection) {
    let s = m
        .create_session(NewSession {
            upgrade_id: "u".into(),
            cluster_name: "prod".into(),
            ..NewSession::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "logs", None, None)
        .unwrap();
    (s, c)
}

fn options() -> PostgresOptions {
    PostgresOptions {
        pool_size: 4,
        ..PostgresOptions::default()
    }
}

fn marks(url: &str) -> Vec<(String, String)> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query(
        "SELECT digest, token FROM blob_releases WHERE finished_at IS NULL ORDER BY digest",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn psql(url: &str, sql: &str) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.batch_execute(sql).unwrap();
}

/// Guarantee G105: replica A releases a blob (its artifact deleted) and its S3 delete is held
/// after the age check, for longer than A's `idle_in_transaction_session_timeout`; replica B
/// adds the same bytes meanwhile; then A's delete lands. B's artifact still downloads,
/// verified, on a third replica (with an empty cache), and no mark is left. With the delete
/// inside A's transaction, A's session ends at its idle limit, B commits trusting its put, and
/// the late delete removes B's bytes.
#[test]
fn a_late_release_never_removes_the_bytes_of_a_later_add() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let moto = Moto::start();
    moto.create_bucket("blobs");
    let shared = s3(&moto);
    let dir = tempfile::tempdir().unwrap();
    // A's sessions end after 1 s idle inside a transaction (15 s in production).
    let a_store = PostgresStore::open_with_limits(
        &url,
        &options(),
        &SessionLimits {
            idle_in_transaction: Duration::from_secs(1),
            statement: Duration::from_secs(30),
        },
    )
    .unwrap();
    let held = Arc::new(Held {
        inner: shared.clone(),
        armed: Mutex::new(None),
        fail: Default::default(),
    });
    let grace = ArtifactsOptions::default().gc_grace;
    let a = replica(a_store, held.clone(), &dir.path().join("a"), grace);
    let b = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("b"),
        grace,
    );
    let bytes = b"the same bytes, added on two replicas\n".repeat(200);
    let (sa, ca) = session(&a);
    let first = a
        .add_bytes(
            &sa.session_id,
            &ca.collection_id,
            &bytes,
            "one.log",
            &AddOptions::default(),
        )
        .unwrap();
    // S3 keeps modification times to the second: the delete's cutoff (the instant it began)
    // must be past the put's.
    std::thread::sleep(Duration::from_millis(1100));
    let (sb, cb) = session(&b);
    let (entered, go) = held.arm();
    let (deleted, added) = std::thread::scope(|scope| {
        let deleter = scope.spawn(|| a.delete_artifact(&first.artifact_id));
        entered
            .recv_timeout(Duration::from_secs(30))
            .expect("A's delete reached S3");
        let adder = scope.spawn(|| {
            b.add_bytes(
                &sb.session_id,
                &cb.collection_id,
                &bytes,
                "two.log",
                &AddOptions::default(),
            )
        });
        // Longer than A's idle limit: a transaction held open by the delete is ended by now.
        std::thread::sleep(Duration::from_millis(2500));
        go.send(()).unwrap();
        (deleter.join().unwrap(), adder.join().unwrap())
    });
    let added = added.expect("B's add");
    let c = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("c"),
        grace,
    );
    let read = c.read(&added.artifact_id);
    assert!(
        matches!(&read, Ok(got) if *got == bytes),
        "B's artifact lost its bytes to A's late delete: {:?}",
        read.map(|b| b.len())
    );
    assert!(shared.exists(&Digest::of(&bytes)).unwrap());
    let deleted = deleted.expect("A's delete");
    assert_eq!(deleted.status, ArtifactStatus::Deleted);
    assert_eq!(marks(&url), Vec::new(), "a release mark was left behind");
}

/// Guarantee G105: a mark older than the stale bound (a deleter that stopped) is taken over:
/// an add of its digest stores its bytes and is indexed (instead of waiting for a mark that
/// never goes); `gc` finishes a stale release whose delete had landed (removes the mark) and
/// one whose delete had not (deletes the unreferenced blob, removes the mark); a fresh mark
/// holds an add until it goes.
#[test]
fn stale_release_marks_are_taken_over_and_finished_by_gc() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let moto = Moto::start();
    moto.create_bucket("blobs");
    let shared = s3(&moto);
    let dir = tempfile::tempdir().unwrap();
    let m = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("a"),
        Duration::ZERO,
    );
    let (s, c) = session(&m);
    let add = |name: &str, bytes: &[u8]| {
        m.add_bytes(
            &s.session_id,
            &c.collection_id,
            bytes,
            name,
            &AddOptions::default(),
        )
    };
    let stale = |d: &Digest| {
        psql(
            &url,
            &format!(
                "INSERT INTO blob_releases (digest, token, marked_at) VALUES ('{}', 'dead', \
                 clock_timestamp() - interval '31 minutes')",
                d.to_hex()
            ),
        )
    };
    // An add of a digest a stopped deleter marked.
    let y = b"bytes a stopped deleter had marked".to_vec();
    let dy = Digest::of(&y);
    stale(&dy);
    let started = std::time::Instant::now();
    let added = add("y.log", &y).expect("an add takes a stale mark over");
    assert!(started.elapsed() < Duration::from_secs(10), "it waited");
    assert_eq!(m.read(&added.artifact_id).unwrap(), y);
    assert_eq!(marks(&url), Vec::new());

    // Two released blobs whose deleters stopped: one after its delete landed, one before.
    let landed = b"released, delete landed".to_vec();
    let pending = b"released, delete not sent".to_vec();
    let (dl, dp) = (Digest::of(&landed), Digest::of(&pending));
    for (name, bytes) in [("l.log", &landed), ("p.log", &pending)] {
        let a = add(name, bytes).unwrap();
        m.index()
            .set_artifact_status(&a.artifact_id, ArtifactStatus::Deleted)
            .unwrap();
    }
    shared.delete(&dl).unwrap();
    stale(&dl);
    stale(&dp);
    std::thread::sleep(Duration::from_millis(1100));
    let report = m.gc().unwrap();
    assert_eq!(marks(&url), Vec::new(), "gc left stale marks: {report:?}");
    assert!(
        !shared.exists(&dp).unwrap(),
        "the pending release was finished"
    );
    assert!(
        shared.exists(&dy).unwrap(),
        "a live artifact's blob is kept"
    );

    // A fresh mark (a deleter at work) holds an add until it goes; then the add stores its
    // bytes again and is indexed.
    let z = b"bytes being released right now".to_vec();
    let dz = Digest::of(&z);
    psql(
        &url,
        &format!(
            "INSERT INTO blob_releases (digest, token, marked_at) VALUES ('{}', 'busy', \
             clock_timestamp())",
            dz.to_hex()
        ),
    );
    let added = std::thread::scope(|scope| {
        let adder = scope.spawn(|| add("z.log", &z));
        std::thread::sleep(Duration::from_millis(800));
        assert!(!adder.is_finished(), "the add did not wait for the release");
        // The deleter's delete lands, then its mark goes.
        shared.delete(&dz).unwrap();
        psql(
            &url,
            "UPDATE blob_releases SET finished_at = clock_timestamp() WHERE token = 'busy'",
        );
        adder.join().unwrap()
    })
    .expect("the add after the release");
    let other = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("b"),
        Duration::ZERO,
    );
    assert_eq!(other.read(&added.artifact_id).unwrap(), z);
}

/// Guarantee G105: an add checks its bytes in S3 before its index transaction (no S3 call
/// inside one); a release that runs to its end between that check and the transaction refuses
/// the add ([`crate::store::BlobReleased`]) and nothing is indexed; the manager's add then
/// stores the bytes again and is indexed, readable.
#[test]
fn a_release_finishing_after_an_adds_check_refuses_the_add() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let moto = Moto::start();
    moto.create_bucket("blobs");
    let shared = s3(&moto);
    let dir = tempfile::tempdir().unwrap();
    let m = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("a"),
        Duration::ZERO,
    );
    let (s, c) = session(&m);
    let bytes = b"checked, then released, then indexed".to_vec();
    let d = Digest::of(&bytes);
    let first = m
        .add_bytes(
            &s.session_id,
            &c.collection_id,
            &bytes,
            "first.log",
            &AddOptions::default(),
        )
        .unwrap();
    m.index()
        .set_artifact_status(&first.artifact_id, ArtifactStatus::Deleted)
        .unwrap();
    let row = crate::store::NewArtifact {
        artifact_id: uuid::Uuid::now_v7().to_string(),
        collection_id: c.collection_id.clone(),
        name: "second.log".into(),
        description: None,
        artifact_type: crate::model::ArtifactType::LogFile,
        file_size: bytes.len() as u64,
        digest: d,
        task_id: None,
        step_id: None,
        tags: Vec::new(),
        metadata: Default::default(),
        created_at: chrono::Utc::now(),
        queue_upload: false,
    };
    let index = m.index().clone();
    let present = |digest: &Digest| {
        let there = shared.exists(digest)?;
        // Meanwhile another replica releases the blob, to the end.
        let released = index.delete_unreferenced(&[*digest], &|x: &Digest| shared.delete(x))?;
        assert_eq!(released, vec![*digest]);
        Ok(there)
    };
    let err = index
        .insert_artifacts(std::slice::from_ref(&row), &present)
        .expect_err("indexed trusting bytes a release removed");
    assert_eq!(crate::store::BlobReleased::of(&err), Some(d), "{err}");
    assert!(!shared.exists(&d).unwrap());
    assert_eq!(m.session_summary(&s.session_id).unwrap().total_artifacts, 0);
    // The manager's add: refused the same way if need be, stores the bytes again.
    let again = m
        .add_bytes(
            &s.session_id,
            &c.collection_id,
            &bytes,
            "second.log",
            &AddOptions::default(),
        )
        .unwrap();
    let other = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("b"),
        Duration::ZERO,
    );
    assert_eq!(other.read(&again.artifact_id).unwrap(), bytes);
}

/// A release whose S3 delete fails leaves its mark to go stale within
/// [`super::releases::FAILED_GRACE`] (not the 30 min of a deleter that stopped): the call is
/// over, so no request of it can land later; past that, an add of the digest takes the mark
/// over at once and is indexed, readable.
#[test]
fn a_failed_release_holds_adds_for_seconds_not_half_an_hour() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let moto = Moto::start();
    moto.create_bucket("blobs");
    let shared = s3(&moto);
    let dir = tempfile::tempdir().unwrap();
    let held = Arc::new(Held {
        inner: shared.clone(),
        armed: Mutex::new(None),
        fail: std::sync::atomic::AtomicBool::new(true),
    });
    let a = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        held,
        &dir.path().join("a"),
        Duration::ZERO,
    );
    let (s, c) = session(&a);
    let bytes = b"released while S3 answers 503".to_vec();
    let first = a
        .add_bytes(
            &s.session_id,
            &c.collection_id,
            &bytes,
            "x.log",
            &AddOptions::default(),
        )
        .unwrap();
    a.index()
        .set_artifact_status(&first.artifact_id, ArtifactStatus::Deleted)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let err = a.gc().expect_err("the delete fails");
    assert!(err.to_string().contains("503"), "{err}");
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let stale_in: f64 = db
        .query_one(
            "SELECT extract(epoch FROM marked_at + make_interval(secs => $1) \
             - clock_timestamp())::float8 FROM blob_releases WHERE finished_at IS NULL",
            &[&super::releases::STALE.as_secs_f64()],
        )
        .unwrap()
        .get(0);
    assert!(
        stale_in <= super::releases::FAILED_GRACE.as_secs_f64(),
        "a failed release holds adds for {stale_in:.0} s"
    );
    // Once the grace is over (moved back here rather than waited for), an add takes over.
    psql(
        &url,
        "UPDATE blob_releases SET marked_at = marked_at - interval '30 seconds'",
    );
    let b = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("b"),
        Duration::ZERO,
    );
    let started = std::time::Instant::now();
    let again = b
        .add_bytes(
            &s.session_id,
            &c.collection_id,
            &bytes,
            "y.log",
            &AddOptions::default(),
        )
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "it waited");
    assert_eq!(b.read(&again.artifact_id).unwrap(), bytes);
    assert_eq!(marks(&url), Vec::new());
}

/// Review L1: a session import (`artifacts pull`) that would commit live rows of a digest
/// whose release is in progress is refused (nothing imported), as an add is; once the release
/// is over it imports.
#[test]
fn an_import_is_refused_while_a_release_of_its_blob_is_in_progress() {
    let pg = PgCluster::start();
    let url = pg.create_database();
    let moto = Moto::start();
    moto.create_bucket("blobs");
    let shared = s3(&moto);
    let dir = tempfile::tempdir().unwrap();
    let m = replica(
        PostgresStore::open(&url, &options()).unwrap(),
        shared.clone(),
        &dir.path().join("a"),
        Duration::ZERO,
    );
    let (s, c) = session(&m);
    let bytes = b"pulled while being released".to_vec();
    let a = m
        .add_bytes(
            &s.session_id,
            &c.collection_id,
            &bytes,
            "p.log",
            &AddOptions::default(),
        )
        .unwrap();
    let (session, collection) = (
        m.session(&s.session_id).unwrap(),
        m.index().collection(&c.collection_id).unwrap(),
    );
    m.index().delete_session(&s.session_id).unwrap();
    psql(
        &url,
        &format!(
            "INSERT INTO blob_releases (digest, token, marked_at) VALUES ('{}', 'busy', \
             clock_timestamp())",
            Digest::of(&bytes).to_hex()
        ),
    );
    let import = || {
        m.index().import_session(
            &session,
            std::slice::from_ref(&collection),
            std::slice::from_ref(&a),
        )
    };
    let err = import().expect_err("imported during a release");
    assert_eq!(
        crate::store::BlobReleased::of(&err),
        Some(Digest::of(&bytes)),
        "{err}"
    );
    assert!(m.session(&s.session_id).is_err(), "nothing imported");
    psql(
        &url,
        "UPDATE blob_releases SET finished_at = clock_timestamp() WHERE token = 'busy'",
    );
    import().unwrap();
    assert_eq!(m.session(&s.session_id).unwrap().session_id, s.session_id);
}

/// Guarantee G110's bound: a mark is stale only after its deleter's delete can no longer land
/// (it sends none after the send budget, and each of its S3 requests ends within the
/// client's timeouts), with `S3BlobStore`'s own settings.
#[test]
fn a_mark_goes_stale_only_after_its_delete_can_no_longer_land() {
    use super::releases::{SEND_BUDGET, STALE};
    use crate::blob::s3::{DELETE_REQUESTS, REQUEST_TIMEOUT, RETRY_TIMEOUT};
    let longest_delete = (REQUEST_TIMEOUT + RETRY_TIMEOUT) * DELETE_REQUESTS;
    assert!(
        STALE > SEND_BUDGET + longest_delete,
        "STALE {STALE:?} <= {SEND_BUDGET:?} + {longest_delete:?}"
    );
}
