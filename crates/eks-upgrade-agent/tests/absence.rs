//! ARCHITECTURE "Absence", checked in a process of its own (no test harness, so no other test
//! has set a tracing subscriber or started threads): the library sets no global tracing
//! subscriber, holds no global state, and starts only the documented threads, each gone when
//! its owner is dropped.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eks_upgrade_agent::blob::{BlobStore, LocalBlobStore};
use eks_upgrade_agent::notify::{Dispatcher, DispatcherOptions, InMemoryEventSink};
use eks_upgrade_agent::store::Durability;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

/// The names of this process's threads, sorted.
fn threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|t| {
            std::fs::read_to_string(t.unwrap().path().join("comm"))
                .unwrap()
                .trim_end()
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

/// `base` plus `extra`, sorted.
fn with(base: &[String], extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = base.to_vec();
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v.sort();
    v
}

/// Threads take a moment to name themselves after they start, and to exit after their owner is
/// dropped: waits up to 2 s for exactly `expected`.
fn settle(expected: &[String]) {
    for _ in 0..100 {
        if threads() == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threads(), expected);
}

/// 8 MiB, sampling the thread list half-way through.
struct Sampling {
    left: usize,
    seen: Arc<Mutex<Option<Vec<String>>>>,
}

impl Read for Sampling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left <= 4 << 20 && self.seen.lock().unwrap().is_none() {
            *self.seen.lock().unwrap() = Some(threads());
        }
        let n = buf.len().min(self.left).min(64 * 1024);
        buf[..n].fill(b'x');
        self.left -= n;
        Ok(n)
    }
}

fn main() {
    let base = threads();
    assert_eq!(base.len(), 1, "{base:?}");
    let dir = tempfile::tempdir().unwrap();

    // An open store: its checkpointer.
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
    let with_store = with(&base, &["eua-checkpoint"]);
    settle(&with_store);

    // A large put: one hasher while it runs, gone after.
    let blobs = LocalBlobStore::open(&dir.path().join("blobs"), Durability::default()).unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut reader = Sampling {
        left: 8 << 20,
        seen: seen.clone(),
    };
    blobs.put(&mut reader, &mut |_| {}).unwrap();
    let during = seen.lock().unwrap().take().unwrap();
    assert_eq!(during.len(), with_store.len() + 1, "{during:?}");
    settle(&with_store);

    // A spawned dispatcher: one thread until its handle is dropped.
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    let d = Arc::new(Dispatcher::new(
        store.clone(),
        vec![sink],
        DispatcherOptions::default(),
    ));
    let handle = d.spawn();
    settle(&with(&with_store, &["eua-notify"]));
    drop(handle);
    settle(&with_store);

    // S3: the two workers of the store's own runtime, gone with it.
    #[cfg(feature = "aws")]
    {
        use eks_upgrade_agent::blob::{S3BlobStore, S3Options};
        let s3 = S3BlobStore::new(&S3Options {
            bucket: "b".into(),
            prefix: "p".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            credentials: Some(("k".into(), "s".into())),
        })
        .unwrap();
        settle(&with(&with_store, &["eua-s3", "eua-s3"]));
        drop(s3);
        settle(&with_store);
    }

    // No global tracing subscriber was installed by any of it.
    assert!(!tracing::dispatcher::has_been_set());
    drop(store);
    settle(&base);

    // No global state: no `static` items with interior state in the library's source.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.unwrap();
        if entry.path().extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for (i, line) in text.lines().enumerate() {
            let l = line.trim_start();
            let global = l.starts_with("static ")
                || l.starts_with("pub static ")
                || l.starts_with("pub(crate) static ")
                || l.contains("thread_local!")
                || l.contains("lazy_static!")
                || l.contains("OnceLock")
                || l.contains("LazyLock")
                || l.contains("set_global_default");
            if global {
                offenders.push(format!("{}:{}: {l}", entry.path().display(), i + 1));
            }
        }
    }
    assert!(offenders.is_empty(), "global state: {offenders:#?}");
    println!("absence: ok");
}
