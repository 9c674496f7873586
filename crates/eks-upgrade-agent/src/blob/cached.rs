//! [`CachedBlobStore`]: a shared blob store (S3 in team mode) with a local read-through cache of
//! bounded size.
//!
//! The shared store is the truth: a put is in it before the put returns (so before any index
//! row that points at the digest commits), and `exists`, `list` and deletions ask it. The local
//! store only caches: a put keeps its bytes there too (it hashed them there first), a read of a
//! blob the cache lacks downloads it, verified, into the cache and reads it from there: one
//! download however many readers ask at once (single flight: the others wait for it and read
//! the cached copy), streamed to a temporary file and checked against the digest before the
//! file is renamed into the cache (a corrupt or truncated download is never cached). The
//! readers that waited share the download's outcome (G93): its error (a corrupt or missing blob
//! as such, any other as a backend error, with its text, naming the blob; none of them
//! downloads again), or the downloaded blob, which stays in the
//! cache until the last of them has opened it (pinned against eviction; a blob larger than the
//! cap is kept outside the recency list, so it evicts nothing, and removed then: its open
//! readers keep working, and the disk holds at most one copy per blob in flight). After each
//! put and download the least recently used blobs are evicted until the cache holds at most
//! its cap. Recency is this process's: at open, the cache's blobs are ranked by their
//! modification times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use super::{BlobInfo, BlobMeta, BlobStore, Digest, LocalBlobStore};
use crate::error::{Error, Result};

/// Default cap of the local cache: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1024 * 1024 * 1024;

/// A shared blob store with a bounded local cache; see the module docs.
pub struct CachedBlobStore {
    shared: Arc<dyn BlobStore>,
    cache: LocalBlobStore,
    cap: u64,
    lru: Mutex<Lru>,
    /// Downloads in flight, by digest: a reader of a blob being downloaded waits for that
    /// download and shares its outcome instead of starting its own.
    filling: Mutex<HashMap<Digest, Arc<Flight>>>,
}

impl std::fmt::Debug for CachedBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedBlobStore")
            .field("shared", &self.shared)
            .field("cache", &self.cache)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

/// Which cached blobs were used when, and their total size.
#[derive(Debug, Default)]
struct Lru {
    tick: u64,
    by_digest: HashMap<Digest, (u64, u64)>,
    by_tick: BTreeMap<u64, Digest>,
    bytes: u64,
    /// Blobs a download's readers are still to open: never evicted.
    pinned: HashSet<Digest>,
}

impl Lru {
    /// Marks `d` (of `size` bytes) used now.
    fn touch(&mut self, d: Digest, size: u64) {
        self.tick += 1;
        if let Some((old, old_size)) = self.by_digest.insert(d, (self.tick, size)) {
            self.by_tick.remove(&old);
            self.bytes -= old_size;
        }
        self.by_tick.insert(self.tick, d);
        self.bytes += size;
    }

    fn forget(&mut self, d: &Digest) {
        if let Some((t, size)) = self.by_digest.remove(d) {
            self.by_tick.remove(&t);
            self.bytes -= size;
        }
    }

    /// The least recently used blob while more than `cap` bytes are cached.
    fn over(&self, cap: u64) -> Option<Digest> {
        (self.bytes > cap)
            .then(|| {
                self.by_tick
                    .values()
                    .find(|d| !self.pinned.contains(d))
                    .copied()
            })
            .flatten()
    }
}

/// One download of a blob and the readers waiting for it.
#[derive(Debug, Default)]
struct Flight {
    /// `None` while it runs; then whether the blob is larger than the cap (kept outside the
    /// recency list), or the download's error.
    outcome: Mutex<Option<std::result::Result<bool, SharedError>>>,
    done: Condvar,
}

impl Flight {
    fn finish(&self, outcome: std::result::Result<bool, SharedError>) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.done.notify_all();
    }

    fn wait(&self) -> std::result::Result<bool, SharedError> {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(o) = outcome.as_ref() {
                return o.clone();
            }
            outcome = self.done.wait(outcome).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether the blob is outside the recency list (`None`: the download failed or runs).
    fn transient(&self) -> Option<bool> {
        match *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(t)) => Some(t),
            _ => None,
        }
    }
}

/// Held by a download's leader: if it unwinds (a panic) before the outcome is known, its
/// waiters get an error instead of waiting forever, and the next reader starts a new download.
struct Lead<'a>(&'a CachedBlobStore, &'a Arc<Flight>, Digest);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let Lead(store, flight, digest) = self;
        let mut outcome = flight.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if outcome.is_some() {
            return;
        }
        *outcome = Some(Err(SharedError::Other(format!(
            "the download of blob sha256:{digest} was abandoned (the reader doing it failed); \
             read it again"
        ))));
        flight.done.notify_all();
        drop(outcome);
        store
            .lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pinned
            .remove(digest);
        let mut filling = store.filling.lock().unwrap_or_else(|e| e.into_inner());
        if filling.get(digest).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            filling.remove(digest);
        }
    }
}

/// `e` naming the blob (a shared store's error may name only its key).
fn name_blob(digest: &Digest, e: Error) -> Error {
    match e {
        Error::Backend { message, source } if !message.contains(&digest.to_hex()) => {
            Error::Backend {
                message: format!(
                    "cannot read blob sha256:{digest} from the shared store: {message}"
                ),
                source,
            }
        }
        other => other,
    }
}

/// A download's error, as each of its waiting readers gets it: the same kind and text,
/// naming the blob.
#[derive(Debug, Clone)]
enum SharedError {
    Corrupt(String),
    NotFound(String),
    Other(String),
}

impl SharedError {
    fn of(digest: &Digest, e: &Error) -> SharedError {
        match e {
            Error::Corrupt { what } => SharedError::Corrupt(what.clone()),
            Error::NotFound { what } => SharedError::NotFound(what.clone()),
            other => {
                let mut text = other.to_string();
                let mut source = std::error::Error::source(other);
                while let Some(s) = source {
                    text.push_str(&format!(": {s}"));
                    source = s.source();
                }
                if !text.contains(&digest.to_hex()) {
                    text =
                        format!("cannot read blob sha256:{digest} from the shared store: {text}");
                }
                SharedError::Other(text)
            }
        }
    }

    fn error(&self) -> Error {
        match self {
            SharedError::Corrupt(what) => Error::Corrupt { what: what.clone() },
            SharedError::NotFound(what) => Error::NotFound { what: what.clone() },
            SharedError::Other(message) => Error::Backend {
                message: message.clone(),
                source: None,
            },
        }
    }
}

impl CachedBlobStore {
    /// `shared` with `cache` in front of it, holding at most `cap` bytes.
    pub fn new(shared: Arc<dyn BlobStore>, cache: LocalBlobStore, cap: u64) -> Result<Self> {
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        cache.list(&mut |m| {
            found.push((
                m.modified.unwrap_or(SystemTime::UNIX_EPOCH),
                m.digest,
                m.size,
            ));
            Ok(())
        })?;
        found.sort();
        let mut lru = Lru::default();
        for (_, d, size) in found {
            lru.touch(d, size);
        }
        let store = CachedBlobStore {
            shared,
            cache,
            cap,
            lru: Mutex::new(lru),
            filling: Mutex::new(HashMap::new()),
        };
        store.evict()?;
        Ok(store)
    }

    /// The cap of the local cache, in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes in the local cache (as this process knows it).
    pub fn cached_bytes(&self) -> u64 {
        self.lru.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Whether `digest` is in the local cache.
    pub fn is_cached(&self, digest: &Digest) -> Result<bool> {
        self.cache.exists(digest)
    }

    fn touch(&self, d: Digest, size: u64) {
        self.lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .touch(d, size);
    }

    /// Evicts least recently used blobs until the cache holds at most the cap.
    fn evict(&self) -> Result<()> {
        loop {
            let victim = {
                let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
                let Some(d) = lru.over(self.cap) else {
                    return Ok(());
                };
                lru.forget(&d);
                d
            };
            self.cache.delete(&victim)?;
        }
    }
}

impl BlobStore for CachedBlobStore {
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
        // Hashed into the cache first; then into the shared store, from the cached copy.
        let local = self.cache.put(reader, progress)?;
        // Counted at once, so a copy left behind by a failed shared put is still under the cap.
        self.touch(local.digest, local.size);
        let shared = self
            .shared
            .put(&mut self.cache.open(&local.digest)?, &mut |_| {})?;
        if shared.digest != local.digest {
            return Err(Error::Corrupt {
                what: format!(
                    "blob sha256:{} changed while it was copied to the shared store",
                    local.digest
                ),
            });
        }
        self.evict()?;
        Ok(BlobInfo {
            created: shared.created,
            ..local
        })
    }

    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        if let Some(r) = self.open_cached(digest)? {
            return Ok(r);
        }
        // Single flight: the first reader of a blob the cache lacks downloads it; whoever
        // arrives meanwhile waits for that download and gets its outcome (G93).
        let (flight, leader) = {
            let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
            match filling.get(digest) {
                Some(f) => (Arc::clone(f), false),
                None => {
                    let f = Arc::new(Flight::default());
                    filling.insert(*digest, Arc::clone(&f));
                    (f, true)
                }
            }
        };
        let result = if leader {
            let _lead = Lead(self, &flight, *digest);
            let result = match self.open_cached(digest) {
                Ok(Some(r)) => {
                    self.pin(digest);
                    Ok((r, false))
                }
                Ok(None) => self.fill(digest),
                Err(e) => Err(e),
            }
            .map_err(|e| name_blob(digest, e));
            flight.finish(match &result {
                Ok((_, transient)) => Ok(*transient),
                Err(e) => Err(SharedError::of(digest, e)),
            });
            result.map(|(r, _)| r)
        } else {
            match flight.wait() {
                // Kept in the cache until the last reader of the download is out: pinned in
                // the recency list, or (larger than the cap) outside it.
                Ok(_) => self.cache.open(digest),
                Err(e) => Err(e.error()),
            }
        };
        let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        // Handles are taken and dropped only under the map's lock, so the count is exact:
        // the last reader out (only the map's handle left) removes the entry, and then lets
        // the blob go (each reader has it open).
        let transient = flight.transient();
        drop(flight);
        if filling
            .get(digest)
            .is_some_and(|g| Arc::strong_count(g) == 1)
        {
            filling.remove(digest);
            drop(filling);
            if transient == Some(true) {
                self.drop_cached(digest)?;
            } else {
                self.lru
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pinned
                    .remove(digest);
                self.evict()?;
            }
        }
        result
    }

    fn open_uncached(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        match self.cache.open(digest) {
            Err(Error::NotFound { .. }) => self.shared.open(digest),
            other => other,
        }
    }

    fn exists(&self, digest: &Digest) -> Result<bool> {
        self.shared.exists(digest)
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        match self.cache.size(digest) {
            Ok(n) => Ok(n),
            Err(Error::NotFound { .. }) => self.shared.size(digest),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        self.drop_cached(digest)?;
        self.shared.delete(digest)
    }

    fn list(&self, f: &mut dyn FnMut(BlobMeta) -> Result<()>) -> Result<()> {
        self.shared.list(f)
    }

    fn delete_if_older(&self, digest: &Digest, cutoff: SystemTime) -> Result<bool> {
        let deleted = self.shared.delete_if_older(digest, cutoff)?;
        // The cached copy goes by the same rule: one an add of this replica put after the
        // cutoff stays, so that add can store it again if the shared copy was deleted.
        if deleted && self.cache.delete_if_older(digest, cutoff)? {
            self.lru
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .forget(digest);
        }
        Ok(deleted)
    }

    fn restore(&self, digest: &Digest) -> Result<bool> {
        let mut local = match self.cache.open(digest) {
            Ok(r) => r,
            Err(Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Verified as it is read: a corrupt cached copy fails here and is not put.
        self.shared.put(&mut local, &mut |_| {})?;
        Ok(true)
    }

    fn sweep_incomplete(&self) -> Result<u64> {
        Ok(self.cache.sweep_incomplete()? + self.shared.sweep_incomplete()?)
    }
}

impl CachedBlobStore {
    /// The cached copy of `digest`, if the cache has it (marked used).
    fn open_cached(&self, digest: &Digest) -> Result<Option<Box<dyn Read + Send>>> {
        match self.cache.open(digest) {
            Ok(r) => {
                // A blob larger than the cap (a download's, until its readers are out) is
                // kept out of the recency list: counted, it would evict every other blob.
                if let Ok(size) = self.cache.size(digest)
                    && size <= self.cap
                {
                    self.touch(*digest, size);
                }
                Ok(Some(r))
            }
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Downloads `digest` from the shared store into the cache (streamed to a temporary file,
    /// checked against the digest before it is renamed in) and opens the cached copy; pinned
    /// in the recency list until the download's last reader is out, or, larger than the cap,
    /// kept outside it until then (`true`: then removed, without evicting the others).
    fn fill(&self, digest: &Digest) -> Result<(Box<dyn Read + Send>, bool)> {
        let mut remote = self.shared.open(digest)?;
        let info = self
            .cache
            .put_expecting(&mut remote, digest)
            .map_err(|e| match e {
                Error::Corrupt { what } => Error::Corrupt {
                    what: format!(
                        "the shared store's copy of blob sha256:{digest} is corrupt or \
                         truncated; it was not cached: {what}"
                    ),
                },
                other => other,
            })?;
        let reader = self.cache.open(digest)?;
        if info.size > self.cap {
            return Ok((reader, true));
        }
        self.touch(*digest, info.size);
        self.pin(digest);
        self.evict()?;
        Ok((reader, false))
    }

    fn pin(&self, digest: &Digest) {
        self.lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pinned
            .insert(*digest);
    }

    fn drop_cached(&self, digest: &Digest) -> Result<()> {
        self.lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(digest);
        self.cache.delete(digest)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    fn stores(cap: u64) -> (tempfile::TempDir, Arc<LocalBlobStore>, CachedBlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(
            LocalBlobStore::open(&dir.path().join("shared"), Durability::default()).unwrap(),
        );
        let cache = LocalBlobStore::open(&dir.path().join("cache"), Durability::default()).unwrap();
        let store = CachedBlobStore::new(shared.clone(), cache, cap).unwrap();
        (dir, shared, store)
    }

    fn blob(i: u8, size: usize) -> Vec<u8> {
        (0..size).map(|j| (j as u8).wrapping_mul(31) ^ i).collect()
    }

    fn read(s: &dyn BlobStore, d: &Digest) -> Vec<u8> {
        let mut out = Vec::new();
        s.open(d).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    /// The blob conformance suite passes over a cache in front of a shared store.
    #[test]
    fn conformance() {
        let dirs = Mutex::new(Vec::new());
        crate::blob::conformance::run(&|| {
            let (dir, shared, store) = stores(DEFAULT_CACHE_BYTES);
            dirs.lock().unwrap().push(dir);
            let store = Arc::new(store);
            let handle = Arc::clone(&store);
            // Both copies: the cached one is what a read sees first.
            let corrupt: Box<dyn Fn(&Digest)> = Box::new(move |d: &Digest| {
                if handle.cache.exists(d).unwrap() {
                    handle.cache.corrupt_for_tests(d);
                }
                shared.corrupt_for_tests(d);
            });
            (Box::new(store) as Box<dyn BlobStore>, corrupt)
        });
    }

    /// A put is in the shared store when it returns; another process's cache (an empty one)
    /// reads it through, verified, and keeps it; the least recently used blobs go first when
    /// the cap is passed, and what was evicted is read through again.
    #[test]
    fn puts_reach_the_shared_store_and_the_cache_keeps_the_most_recent_within_its_cap() {
        let (dir, shared, a) = stores(200_000);
        let blobs: Vec<Vec<u8>> = (0..4).map(|i| blob(i, 60_000)).collect();
        let digests: Vec<Digest> = blobs
            .iter()
            .map(|b| a.put(&mut b.as_slice(), &mut |_| {}).unwrap().digest)
            .collect();
        for d in &digests {
            assert!(shared.exists(d).unwrap(), "in the shared store");
        }
        // 4 x 60,000 > 200,000: the oldest went.
        assert!(!a.is_cached(&digests[0]).unwrap());
        assert!(digests[1..].iter().all(|d| a.is_cached(d).unwrap()));
        assert!(a.cached_bytes() <= 200_000);
        // Reading blob 1 makes it recent: the next put evicts blob 2, not 1.
        assert_eq!(read(&a, &digests[1]), blobs[1]);
        let e = a.put(&mut blob(9, 60_000).as_slice(), &mut |_| {}).unwrap();
        assert!(a.is_cached(&digests[1]).unwrap());
        assert!(!a.is_cached(&digests[2]).unwrap(), "least recently used");
        assert!(a.is_cached(&e.digest).unwrap());
        // An evicted blob reads through again.
        assert_eq!(read(&a, &digests[0]), blobs[0]);
        assert!(a.is_cached(&digests[0]).unwrap());
        assert!(a.cached_bytes() <= 200_000);
        // A second "replica" with its own empty cache, over the same shared store.
        let other = CachedBlobStore::new(
            shared.clone(),
            LocalBlobStore::open(&dir.path().join("cache2"), Durability::default()).unwrap(),
            200_000,
        )
        .unwrap();
        assert!(!other.is_cached(&digests[3]).unwrap());
        assert_eq!(read(&other, &digests[3]), blobs[3]);
        assert!(other.is_cached(&digests[3]).unwrap(), "read through");
        // One pass that is not worth caching (an upload run) leaves no copy.
        let (d4, b4) = (digests[3], &blobs[3]);
        let third = CachedBlobStore::new(
            shared.clone(),
            LocalBlobStore::open(&dir.path().join("cache3"), Durability::default()).unwrap(),
            200_000,
        )
        .unwrap();
        let mut out = Vec::new();
        third
            .open_uncached(&d4)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == *b4);
        assert!(!third.is_cached(&d4).unwrap());
        // `exists` asks the shared store: bytes only in a cache are not there (so no index row
        // commits before the shared copy exists).
        let only_local = blob(7, 1000);
        let info = third
            .cache
            .put(&mut only_local.as_slice(), &mut |_| {})
            .unwrap();
        assert!(!third.exists(&info.digest).unwrap());
        // A corrupt shared copy is refused, and not cached.
        shared.corrupt_for_tests(&digests[2]);
        let mut out = Vec::new();
        let err = other
            .open(&digests[2])
            .and_then(|mut r| Ok(r.read_to_end(&mut out)?))
            .unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(!other.is_cached(&digests[2]).unwrap());
        // Reopened, a cache is ranked by age and trimmed to its cap.
        drop(other);
        let small = CachedBlobStore::new(
            shared,
            LocalBlobStore::open(&dir.path().join("cache2"), Durability::default()).unwrap(),
            10,
        )
        .unwrap();
        assert_eq!(small.cached_bytes(), 0);
        assert!(!small.is_cached(&digests[3]).unwrap());
    }

    /// A shared store that counts its reads, makes each slow (so concurrent readers overlap),
    /// and can serve a truncated copy.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<dyn BlobStore>,
        opens: std::sync::atomic::AtomicUsize,
        truncate: std::sync::atomic::AtomicBool,
        fail: std::sync::atomic::AtomicBool,
        panic: std::sync::atomic::AtomicBool,
        /// While set, reads wait (at most 20 s) before they start: the test lets them go once
        /// every reader joined the download.
        held: Mutex<bool>,
        let_go: Condvar,
    }

    impl Counting {
        fn hold(&self) {
            *self.held.lock().unwrap() = true;
        }

        fn release(&self) {
            *self.held.lock().unwrap() = false;
            self.let_go.notify_all();
        }
    }

    /// Waits until `readers` readers take part in the download of `d` (the map holds one more
    /// handle), then lets the shared store answer.
    fn release_when_joined(store: &CachedBlobStore, shared: &Counting, d: &Digest, readers: usize) {
        let began = std::time::Instant::now();
        while store
            .filling
            .lock()
            .unwrap()
            .get(d)
            .map_or(0, Arc::strong_count)
            != readers + 1
        {
            assert!(
                began.elapsed() < std::time::Duration::from_secs(20),
                "the readers did not all join the download"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        shared.release();
    }

    impl BlobStore for Counting {
        fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
            self.inner.put(reader, progress)
        }
        fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
            use std::sync::atomic::Ordering::SeqCst;
            self.opens.fetch_add(1, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(200));
            let held = self.held.lock().unwrap();
            drop(
                self.let_go
                    .wait_timeout_while(held, std::time::Duration::from_secs(20), |h| *h)
                    .unwrap(),
            );
            if self.panic.swap(false, SeqCst) {
                panic!("a shared store that panics once");
            }
            if self.fail.load(SeqCst) {
                return Err(Error::Backend {
                    message: "cannot read s3://bucket/blob: service unavailable".into(),
                    source: None,
                });
            }
            let size = self.inner.size(digest)?;
            let r = self.inner.open(digest)?;
            Ok(if self.truncate.load(SeqCst) {
                Box::new(r.take(size / 2))
            } else {
                r
            })
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
            self.inner.delete_if_older(digest, cutoff)
        }
    }

    fn counting(dir: &std::path::Path) -> (Arc<Counting>, CachedBlobStore) {
        counting_with_cap(dir, DEFAULT_CACHE_BYTES)
    }

    fn counting_with_cap(dir: &std::path::Path, cap: u64) -> (Arc<Counting>, CachedBlobStore) {
        let shared = Arc::new(Counting {
            inner: Arc::new(
                LocalBlobStore::open(&dir.join("shared"), Durability::default()).unwrap(),
            ),
            opens: Default::default(),
            truncate: Default::default(),
            fail: Default::default(),
            panic: Default::default(),
            held: Default::default(),
            let_go: Default::default(),
        });
        let cache = LocalBlobStore::open(&dir.join("cache"), Durability::default()).unwrap();
        let store = CachedBlobStore::new(shared.clone(), cache, cap).unwrap();
        (shared, store)
    }

    /// `readers` concurrent reads of `d`, each to the end: their results.
    fn concurrent_reads(
        store: &CachedBlobStore,
        shared: &Counting,
        d: &Digest,
        readers: usize,
    ) -> Vec<Result<Vec<u8>>> {
        let barrier = std::sync::Barrier::new(readers);
        shared.hold();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..readers)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let mut out = Vec::new();
                        store
                            .open(d)
                            .and_then(|mut r| Ok(r.read_to_end(&mut out).map(|_| out)?))
                    })
                })
                .collect();
            release_when_joined(store, shared, d, readers);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Guarantee G93: when the download that concurrent cold readers share fails (a
    /// truncated object, an S3 error), every reader gets its error, naming the blob, and none
    /// downloads again; the next read tries again.
    #[test]
    fn waiters_share_a_failed_download() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (shared, store) = counting(dir.path());
        let bytes = blob(5, 300_000);
        let d = shared
            .put(&mut bytes.as_slice(), &mut |_| {})
            .unwrap()
            .digest;
        for (flag, corrupt) in [(&shared.truncate, true), (&shared.fail, false)] {
            flag.store(true, SeqCst);
            shared.opens.store(0, SeqCst);
            let results = concurrent_reads(&store, &shared, &d, 6);
            assert_eq!(
                shared.opens.load(SeqCst),
                1,
                "6 readers of a failing download downloaded it more than once"
            );
            for r in results {
                let err = r.unwrap_err();
                assert_eq!(matches!(err, Error::Corrupt { .. }), corrupt, "{err}");
                assert!(err.to_string().contains(&d.to_hex()), "{err}");
            }
            assert!(!store.is_cached(&d).unwrap());
            assert!(store.filling.lock().unwrap().is_empty(), "no download left");
            flag.store(false, SeqCst);
            assert!(read(&store, &d) == bytes, "the next read tries again");
            store.drop_cached(&d).unwrap();
        }
    }

    /// Review L2: a release that deletes the shared copy keeps this replica's cached copy when
    /// it was put after the release's cutoff (an add of this replica), so the add can store it
    /// again; one put before the cutoff goes.
    #[test]
    fn a_release_keeps_a_cached_copy_put_after_its_cutoff() {
        let (_dir, shared, store) = stores(DEFAULT_CACHE_BYTES);
        let (young, old) = (blob(1, 30_000), blob(2, 30_000));
        let dy = shared
            .put(&mut young.as_slice(), &mut |_| {})
            .unwrap()
            .digest;
        let d_old = store.put(&mut old.as_slice(), &mut |_| {}).unwrap().digest;
        std::thread::sleep(std::time::Duration::from_millis(20));
        let cutoff = SystemTime::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // An add on this replica stores the bytes in its cache after the cutoff.
        store.cache.put(&mut young.as_slice(), &mut |_| {}).unwrap();
        assert!(
            store.delete_if_older(&dy, cutoff).unwrap(),
            "the shared copy goes"
        );
        assert!(!shared.exists(&dy).unwrap());
        assert!(store.is_cached(&dy).unwrap(), "the add's cached copy stays");
        assert!(store.restore(&dy).unwrap(), "and is stored again");
        assert!(shared.exists(&dy).unwrap());
        assert!(store.delete_if_older(&d_old, cutoff).unwrap());
        assert!(
            !store.is_cached(&d_old).unwrap(),
            "a copy older than the cutoff goes"
        );
    }

    /// Guarantee G93: a download whose reader panics ends its waiters' wait with an error
    /// naming the blob (they do not wait forever); the next read downloads it.
    #[test]
    fn waiters_of_an_abandoned_download_get_an_error() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (shared, store) = counting(dir.path());
        let store = Arc::new(store);
        let bytes = blob(6, 5000);
        let d = shared
            .put(&mut bytes.as_slice(), &mut |_| {})
            .unwrap()
            .digest;
        shared.panic.store(true, SeqCst);
        // Threads of their own, so that a waiter that never wakes fails the test, not hangs it.
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let (tx, rx) = std::sync::mpsc::channel();
        shared.hold();
        for _ in 0..4 {
            let (store, barrier, tx) = (Arc::clone(&store), Arc::clone(&barrier), tx.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    store.open(&d).map(drop)
                }));
                let _ = tx.send(r);
            });
        }
        release_when_joined(&store, &shared, &d, 4);
        let (mut panics, mut errors) = (0, Vec::new());
        for _ in 0..4 {
            match rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("a reader still waits for the abandoned download")
            {
                Err(_) => panics += 1,
                Ok(r) => errors.push(r.unwrap_err()),
            }
        }
        assert_eq!(panics, 1, "the leader panics, once");
        for e in &errors {
            let text = e.to_string();
            assert!(
                text.contains(&d.to_hex()) && text.contains("abandoned"),
                "{text}"
            );
        }
        assert_eq!(shared.opens.load(SeqCst), 1);
        assert!(read(&*store, &d) == bytes, "the next read downloads it");
        assert!(store.filling.lock().unwrap().is_empty());
    }

    /// Guarantee G93: concurrent cold readers of a blob larger than the cache's cap download
    /// it once and each read it whole; it evicts nothing else and is gone from the cache once
    /// they are done.
    #[test]
    fn waiters_share_a_download_larger_than_the_cap() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (shared, store) = counting_with_cap(dir.path(), 100_000);
        let small = blob(1, 50_000);
        let ds = store
            .put(&mut small.as_slice(), &mut |_| {})
            .unwrap()
            .digest;
        let big = blob(2, 300_000);
        let d = shared.put(&mut big.as_slice(), &mut |_| {}).unwrap().digest;
        shared.opens.store(0, SeqCst);
        for r in concurrent_reads(&store, &shared, &d, 6) {
            assert!(r.unwrap() == big, "a reader got other bytes");
        }
        assert_eq!(
            shared.opens.load(SeqCst),
            1,
            "6 readers of a blob larger than the cap downloaded it more than once"
        );
        assert!(
            !store.is_cached(&d).unwrap(),
            "larger than the cap: not kept"
        );
        assert!(
            store.is_cached(&ds).unwrap(),
            "it evicted a blob within the cap"
        );
        assert_eq!(store.cached_bytes(), 50_000);
        assert!(store.filling.lock().unwrap().is_empty(), "no download left");
        assert!(store.lru.lock().unwrap().pinned.is_empty(), "no pin left");
    }

    /// Guarantee G93: N concurrent reads of one blob the cache lacks fetch it from the shared
    /// store once (single flight); every reader gets the whole blob, from the cached copy.
    #[test]
    fn concurrent_cold_reads_fetch_a_blob_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (shared, store) = counting(dir.path());
        for (size, readers) in [(300_000, 8), (1000, 6)] {
            let bytes = blob(size as u8, size);
            let d = shared
                .put(&mut bytes.as_slice(), &mut |_| {})
                .unwrap()
                .digest;
            shared.opens.store(0, SeqCst);
            let barrier = std::sync::Barrier::new(readers);
            std::thread::scope(|scope| {
                for _ in 0..readers {
                    scope.spawn(|| {
                        barrier.wait();
                        assert!(read(&store, &d) == bytes, "a reader got other bytes");
                    });
                }
            });
            assert_eq!(
                shared.opens.load(SeqCst),
                1,
                "{readers} concurrent cold reads of a {size}-byte blob fetched it more than once"
            );
            assert!(store.is_cached(&d).unwrap());
            assert!(store.filling.lock().unwrap().is_empty(), "no download left");
        }
    }

    /// The single-flight entry of a blob goes once its last reader is out, however their
    /// ends interleave (two readers ending together must not each leave it to the other).
    #[test]
    fn the_last_reader_out_removes_the_download_entry() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(
            LocalBlobStore::open(&dir.path().join("shared"), Durability::default()).unwrap(),
        );
        let cache = LocalBlobStore::open(&dir.path().join("cache"), Durability::default()).unwrap();
        let store = CachedBlobStore::new(shared.clone(), cache, DEFAULT_CACHE_BYTES).unwrap();
        for i in 0..200u32 {
            let bytes = i.to_le_bytes().repeat(64);
            let d = shared
                .put(&mut bytes.as_slice(), &mut |_| {})
                .unwrap()
                .digest;
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        barrier.wait();
                        assert!(read(&store, &d) == bytes);
                    });
                }
            });
            assert!(
                store.filling.lock().unwrap().is_empty(),
                "a download entry was left behind (round {i})"
            );
        }
    }

    /// Guarantee G93: a truncated copy in the shared store is refused with a clear error and
    /// leaves nothing in the cache (under its digest or any other); the next read tries again.
    #[test]
    fn a_truncated_shared_copy_is_refused_and_not_cached() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (shared, store) = counting(dir.path());
        for size in [300_000, 1000] {
            let bytes = blob(3, size);
            let d = shared
                .put(&mut bytes.as_slice(), &mut |_| {})
                .unwrap()
                .digest;
            shared.truncate.store(true, SeqCst);
            let err = match store.open(&d) {
                Ok(mut r) => r
                    .read_to_end(&mut Vec::new())
                    .map(|_| ())
                    .map_err(Error::from),
                Err(e) => Err(e),
            }
            .unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("sha256:{d}")) && text.contains("truncated"),
                "{text}"
            );
            assert!(!store.is_cached(&d).unwrap());
            let mut cached = 0;
            store
                .cache
                .list(&mut |_| {
                    cached += 1;
                    Ok(())
                })
                .unwrap();
            assert_eq!(cached, 0, "a truncated download left a blob in the cache");
            assert_eq!(store.cached_bytes(), 0);
            shared.truncate.store(false, SeqCst);
            assert!(read(&store, &d) == bytes);
            assert!(store.is_cached(&d).unwrap());
            store.drop_cached(&d).unwrap();
        }
    }
}
