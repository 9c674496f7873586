//! [`LocalBlobStore`]: blobs as read-only files under `{root}/sha256/ab/cdef...`.
//!
//! A put streams into `{root}/tmp/<uuid>.part` (exclusively locked while it is written), hashing
//! in the same pass: the calling thread reads and writes while a second thread hashes the
//! previous chunk, so a large file costs about one SHA-256 pass. The temp file is then renamed
//! onto its digest's path, atomically. At the `power_loss` durability level the file and its
//! directory are fsynced first. Temp files left by killed processes are unlocked and are removed
//! by [`BlobStore::sweep_incomplete`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use super::{BlobInfo, BlobMeta, BlobStore, Digest, VerifyingReader};
use crate::error::{Error, Result};
use crate::store::Durability;

/// Bytes read per chunk.
const CHUNK: usize = 1024 * 1024;
/// Chunks in flight between the reader and the hasher (bounds memory to 4 MiB per put).
const IN_FLIGHT: usize = 4;

/// Blobs up to this size are kept in `small.sqlite3` instead of a file each: most artifacts
/// (logs of a step, JUnit files, configs) are small, and a file per blob costs an inode and a
/// 4 KiB block, which dominates the time and space of adding them.
pub const INLINE_MAX: usize = 16 * 1024;

/// Blobs in a directory of the local file system.
#[derive(Debug)]
pub struct LocalBlobStore {
    root: PathBuf,
    durability: Durability,
    small: Mutex<Connection>,
}

impl LocalBlobStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path, durability: Durability) -> Result<LocalBlobStore> {
        for dir in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(|e| {
                Error::backend(format!("cannot create blob directory {}", dir.display()), e)
            })?;
        }
        let small = open_small(&root.join("small.sqlite3"), durability)?;
        Ok(LocalBlobStore {
            root: root.to_path_buf(),
            durability,
            small: Mutex::new(small),
        })
    }

    fn small(&self) -> MutexGuard<'_, Connection> {
        self.small.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn small_get(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        use rusqlite::types::Value;
        let value: Option<Value> = self
            .small()
            .prepare_cached("SELECT data FROM blobs WHERE digest = ?1")?
            .query_row([digest.0.as_slice()], |r| r.get(0))
            .optional()?;
        // Whatever the column holds is returned as bytes; the verifying reader judges them.
        Ok(value.map(|v| match v {
            Value::Blob(b) => b,
            Value::Text(t) => t.into_bytes(),
            Value::Integer(i) => i.to_string().into_bytes(),
            Value::Real(f) => f.to_string().into_bytes(),
            Value::Null => Vec::new(),
        }))
    }

    /// Stores `data` (which hashes to `digest`) inline. An existing row is never trusted: it
    /// gets these bytes (repairing a corrupt copy) and a fresh `created_at` (what gc's grace
    /// period judges). Returns whether the row is new.
    fn small_put(&self, digest: &Digest, data: &[u8]) -> Result<bool> {
        let conn = self.small();
        let stored: Option<bool> = conn
            .prepare_cached("SELECT data = ?2 FROM blobs WHERE digest = ?1")?
            .query_row(params![digest.0.as_slice(), data], |r| r.get(0))
            .optional()?;
        if stored == Some(false) {
            tracing::warn!(digest = %digest, "replacing a corrupt inline blob with good bytes");
        }
        conn.prepare_cached(
            "INSERT INTO blobs (digest, data, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (digest) DO UPDATE SET data = excluded.data, created_at = excluded.created_at",
        )?
        .execute(params![
            digest.0.as_slice(),
            data,
            chrono::Utc::now().timestamp_micros()
        ])?;
        Ok(stored.is_none())
    }

    /// A new temp file for a put, locked (the lock tells `sweep_incomplete` this put is alive;
    /// it ends with the process). Creating and locking are two steps: a sweep in between may
    /// remove the file, so once locked it must still be the file at its path, else try again.
    fn locked_temp(&self) -> Result<(PathBuf, File)> {
        use std::os::unix::fs::MetadataExt;
        for _ in 0..8 {
            let tmp = self
                .root
                .join("tmp")
                .join(format!("{}.part", Uuid::now_v7()));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| Error::backend(format!("cannot create {}", tmp.display()), e))?;
            file.lock()?;
            let ours = file.metadata()?.ino();
            if fs::metadata(&tmp).is_ok_and(|m| m.ino() == ours) {
                return Ok((tmp, file));
            }
        }
        Err(Error::Backend {
            message: format!(
                "cannot keep a temp file in {} (removed as soon as created)",
                self.root.join("tmp").display()
            ),
            source: None,
        })
    }

    /// The lock that orders the final rename of a put (shared) against a gc deletion
    /// (exclusive), across processes.
    fn gc_lock(&self) -> Result<File> {
        let path = self.root.join("gc.lock");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::backend(format!("cannot open {}", path.display()), e))
    }

    fn file_exists(&self, digest: &Digest) -> Result<bool> {
        match fs::metadata(self.path_of(digest)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Damages a stored blob in place, for tests of corruption detection.
    #[cfg(test)]
    pub(crate) fn corrupt_for_tests(&self, digest: &Digest) {
        if let Some(mut data) = self.small_get(digest).unwrap() {
            data.push(b'!');
            self.small()
                .execute(
                    "UPDATE blobs SET data = ?2 WHERE digest = ?1",
                    params![digest.0.as_slice(), data],
                )
                .unwrap();
            return;
        }
        let path = self.path_of(digest);
        let mut perms = fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(&path, perms).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 0xff;
        fs::write(&path, bytes).unwrap();
    }

    /// Where the blob with `digest` lives.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("sha256").join(&hex[..2]).join(&hex[2..])
    }

    fn not_found(digest: &Digest) -> Error {
        Error::not_found(format!("blob sha256:{digest}"))
    }

    /// Writes `head` and the rest of `reader` to `file`, hashing in the same pass.
    fn write_stream(
        &self,
        head: Vec<u8>,
        reader: &mut dyn Read,
        file: &mut File,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(Digest, u64)> {
        let mut first = head;
        let filled = first.len();
        first.resize(CHUNK.max(filled), 0);
        let n = filled + fill(reader, &mut first[filled..])?;
        if n < CHUNK {
            // Fits in one chunk: hash inline, no thread.
            file.write_all(&first[..n])?;
            progress(n as u64);
            return Ok((Digest(Sha256::digest(&first[..n]).into()), n as u64));
        }
        // Large content: this thread reads and writes chunk k+1 while a helper hashes chunk k.
        let (to_hash, hash_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(IN_FLIGHT);
        let (give_back, free) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|scope| -> Result<(Digest, u64)> {
            let hasher = scope.spawn(move || {
                let mut h = Sha256::new();
                for (buf, len) in hash_rx {
                    h.update(&buf[..len]);
                    // The reader may have stopped; then the buffer is simply dropped.
                    let _ = give_back.send(buf);
                }
                Digest(h.finalize().into())
            });
            let mut total = 0u64;
            let mut allocated = 1;
            let mut buf = first;
            let mut len = n;
            let result = loop {
                if let Err(e) = file.write_all(&buf[..len]) {
                    break Err(e.into());
                }
                total += len as u64;
                progress(total);
                if to_hash.send((buf, len)).is_err() {
                    break Err(Error::Backend {
                        message: "hashing thread stopped".into(),
                        source: None,
                    });
                }
                buf = match free.try_recv() {
                    Ok(b) => b,
                    Err(_) if allocated < IN_FLIGHT => {
                        allocated += 1;
                        vec![0u8; CHUNK]
                    }
                    Err(_) => match free.recv() {
                        Ok(b) => b,
                        Err(_) => {
                            break Err(Error::Backend {
                                message: "hashing thread stopped".into(),
                                source: None,
                            });
                        }
                    },
                };
                len = match fill(reader, &mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) => break Err(e.into()),
                };
            };
            drop(to_hash);
            let digest = hasher.join().map_err(|_| Error::Backend {
                message: "hashing thread panicked".into(),
                source: None,
            })?;
            result.map(|()| (digest, total))
        })
    }
}

fn open_small(path: &Path, durability: Durability) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| Error::backend(format!("cannot open {}", path.display()), e))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        },
    )?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS blobs (
            digest     BLOB PRIMARY KEY,
            data       BLOB NOT NULL,
            created_at INTEGER NOT NULL
        )",
    )?;
    Ok(conn)
}

/// Reads until `buf` is full or the stream ends.
pub(super) fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn remove_blob_file(path: &Path) -> io::Result<()> {
    fs::remove_file(path)
}

/// Microseconds since the epoch (saturating), as `small.sqlite3` keeps `created_at`.
fn micros_of(t: SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

/// Refuses content that hashes to `got` (`size` bytes) when `expected` is another digest.
fn check_expected(expected: Option<&Digest>, got: &Digest, size: u64) -> Result<()> {
    match expected {
        Some(e) if e != got => Err(Error::Corrupt {
            what: format!(
                "blob sha256:{e}: the {size} bytes received hash to sha256:{got} \
                 (a corrupt or truncated copy)"
            ),
        }),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BlobStore for LocalBlobStore {
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
        self.put_checked(reader, progress, None)
    }

    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        if let Some(data) = self.small_get(digest)? {
            return Ok(Box::new(VerifyingReader::new(
                io::Cursor::new(data),
                *digest,
            )));
        }
        match File::open(self.path_of(digest)) {
            Ok(f) => Ok(Box::new(VerifyingReader::new(
                io::BufReader::with_capacity(256 * 1024, f),
                *digest,
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Self::not_found(digest)),
            Err(e) => Err(Error::backend(
                format!("cannot open blob sha256:{digest}"),
                e,
            )),
        }
    }

    fn exists(&self, digest: &Digest) -> Result<bool> {
        let small = self
            .small()
            .prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1")?
            .exists([digest.0.as_slice()])?;
        Ok(small || self.file_exists(digest)?)
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        let small: Option<i64> = self
            .small()
            .prepare_cached("SELECT length(data) FROM blobs WHERE digest = ?1")?
            .query_row([digest.0.as_slice()], |r| r.get(0))
            .optional()?;
        if let Some(n) = small {
            return Ok(n as u64);
        }
        match fs::metadata(self.path_of(digest)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Self::not_found(digest)),
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        let small = self
            .small()
            .prepare_cached("DELETE FROM blobs WHERE digest = ?1")?
            .execute([digest.0.as_slice()])?
            > 0;
        match fs::remove_file(self.path_of(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(small),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, f: &mut dyn FnMut(BlobMeta) -> Result<()>) -> Result<()> {
        for entry in walkdir::WalkDir::new(self.root.join("sha256"))
            .min_depth(2)
            .max_depth(2)
        {
            let entry = entry.map_err(|e| Error::backend("cannot list blobs", e))?;
            if !entry.file_type().is_file() {
                continue;
            }
            let prefix = entry
                .path()
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or("");
            let Some(rest) = entry.file_name().to_str() else {
                continue;
            };
            let Ok(digest) = format!("{prefix}{rest}").parse::<Digest>() else {
                continue;
            };
            let meta = entry
                .metadata()
                .map_err(|e| Error::backend("cannot stat blob", e))?;
            f(BlobMeta {
                digest,
                size: meta.len(),
                modified: meta.modified().ok(),
            })?;
        }
        // Small blobs, a page at a time so `f` may call back into the store.
        let mut after: Vec<u8> = Vec::new();
        loop {
            let page: Vec<(Vec<u8>, i64, i64)> = {
                let conn = self.small();
                let mut stmt = conn.prepare_cached(
                    "SELECT digest, length(data), created_at FROM blobs WHERE digest > ?1 \
                     ORDER BY digest LIMIT 1000",
                )?;
                let rows = stmt.query_map([after.as_slice()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let Some(last) = page.last() else { break };
            after = last.0.clone();
            for (d, size, created) in page {
                let Ok(bytes) = <[u8; 32]>::try_from(d.as_slice()) else {
                    continue;
                };
                f(BlobMeta {
                    digest: Digest(bytes),
                    size: size as u64,
                    modified: Some(
                        std::time::UNIX_EPOCH + Duration::from_micros(created.max(0) as u64),
                    ),
                })?;
            }
        }
        Ok(())
    }

    fn delete_if_older(&self, digest: &Digest, cutoff: SystemTime) -> Result<bool> {
        let small = self
            .small()
            .prepare_cached("DELETE FROM blobs WHERE digest = ?1 AND created_at <= ?2")?
            .execute(params![digest.0.as_slice(), micros_of(cutoff)])?
            > 0;
        let path = self.path_of(digest);
        let lock = self.gc_lock()?;
        lock.lock()?;
        let modified = match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(small),
            Err(e) => return Err(e.into()),
        };
        if modified > cutoff {
            return Ok(small);
        }
        match remove_blob_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(small),
            Err(e) => Err(e.into()),
        }
    }

    fn sweep_incomplete(&self) -> Result<u64> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let path = entry?.path();
            let Ok(file) = OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            // A live put holds the lock; a killed one released it with its process. The file
            // goes while the lock is held, so a put that creates it and locks it a moment
            // later either keeps it or sees it gone (see `locked_temp`).
            if file.try_lock().is_ok() && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
            drop(file);
        }
        Ok(removed)
    }
}

impl LocalBlobStore {
    /// [`put`](BlobStore::put), refused (nothing stored, nothing visible) unless the bytes hash
    /// to `expected`: a read-through cache fills itself with this, so a corrupt or truncated
    /// download never becomes a cached blob, under its digest or any other.
    pub(crate) fn put_expecting(
        &self,
        reader: &mut dyn Read,
        expected: &Digest,
    ) -> Result<BlobInfo> {
        self.put_checked(reader, &mut |_| {}, Some(expected))
    }

    fn put_checked(
        &self,
        reader: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
        expected: Option<&Digest>,
    ) -> Result<BlobInfo> {
        let mut head = vec![0u8; INLINE_MAX + 1];
        let n = fill(reader, &mut head)?;
        if n <= INLINE_MAX {
            head.truncate(n);
            let digest = Digest::of(&head);
            check_expected(expected, &digest, n as u64)?;
            progress(n as u64);
            let created = self.small_put(&digest, &head)?;
            // A file copy of small content (older layouts) is superseded by the inline one,
            // which open() reads first.
            let created = if self.file_exists(&digest)? {
                let lock = self.gc_lock()?;
                lock.lock()?;
                let _ = remove_blob_file(&self.path_of(&digest));
                false
            } else {
                created
            };
            return Ok(BlobInfo {
                digest,
                size: n as u64,
                created,
            });
        }
        head.truncate(n);
        let (tmp, mut file) = self.locked_temp()?;
        let written = self
            .write_stream(head, reader, &mut file, progress)
            .and_then(|r| {
                if self.durability == Durability::PowerLoss {
                    file.sync_all()?;
                }
                Ok(r)
            });
        let written = written.and_then(|(d, n)| check_expected(expected, &d, n).map(|()| (d, n)));
        let (digest, size) = match written {
            Ok(r) => r,
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let path = self.path_of(&digest);
        // The stored copy, if any, is not trusted: the new file, which hashes to the digest,
        // replaces it atomically (repairing a corrupt copy, refreshing the modification time gc
        // judges). The shared lock keeps a gc deletion from landing between the two.
        let lock = self.gc_lock()?;
        lock.lock_shared()?;
        let existed = path.exists();
        let dir = path.parent().expect("blob paths have a parent");
        let finish = || -> io::Result<()> {
            fs::create_dir_all(dir)?;
            let mut perms = file.metadata()?.permissions();
            perms.set_readonly(true);
            file.set_permissions(perms)?;
            // The age gc and removals judge, from the precise clock: the kernel stamps writes
            // with its coarse one (a few ms behind), which could date this put before a removal
            // that began after it.
            file.set_modified(SystemTime::now())?;
            fs::rename(&tmp, &path)?;
            if self.durability == Durability::PowerLoss {
                sync_dir(dir)?;
            }
            Ok(())
        };
        if let Err(e) = finish() {
            drop(file);
            let _ = fs::remove_file(&tmp);
            return Err(Error::backend(
                format!("cannot store blob {}", path.display()),
                e,
            ));
        }
        drop(lock);
        Ok(BlobInfo {
            digest,
            size,
            created: !existed,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let make = || {
            let root = dir.path().join(Uuid::now_v7().to_string());
            LocalBlobStore::open(&root, Durability::default()).unwrap()
        };
        super::super::conformance::run(&|| {
            let store = make();
            let store = Arc::new(store);
            let handle = Arc::clone(&store);
            let corrupt: Box<dyn Fn(&Digest)> =
                Box::new(move |d: &Digest| handle.corrupt_for_tests(d));
            (Box::new(store) as Box<dyn BlobStore>, corrupt)
        });
    }

    #[test]
    fn power_loss_level_works_and_blobs_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path(), Durability::PowerLoss).unwrap();
        let big = vec![7u8; INLINE_MAX + 1];
        let info = store.put(&mut big.as_slice(), &mut |_| {}).unwrap();
        let meta = fs::metadata(store.path_of(&info.digest)).unwrap();
        assert!(meta.permissions().readonly());
    }

    /// The boundary of `small.sqlite3`: exactly `INLINE_MAX` bytes is a row and no file;
    /// one byte more is a file and no row. Both read back whole.
    #[test]
    fn blobs_up_to_16_kib_are_rows_and_larger_ones_files() {
        assert_eq!(INLINE_MAX, 16 * 1024);
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path(), Durability::default()).unwrap();
        let rows = |d: &Digest| -> i64 {
            let conn = Connection::open(dir.path().join("small.sqlite3")).unwrap();
            conn.query_row(
                "SELECT count(*) FROM blobs WHERE digest = ?1",
                [d.0.as_slice()],
                |r| r.get(0),
            )
            .unwrap()
        };
        for (len, inline) in [(INLINE_MAX, true), (INLINE_MAX + 1, false)] {
            let data = vec![b'x'; len];
            let info = store.put(&mut data.as_slice(), &mut |_| {}).unwrap();
            assert_eq!(info.size, len as u64);
            assert_eq!(store.path_of(&info.digest).exists(), !inline, "{len} bytes");
            assert_eq!(rows(&info.digest), i64::from(inline), "{len} bytes");
            let mut back = Vec::new();
            store
                .open(&info.digest)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len} bytes");
        }
    }

    #[test]
    fn sweep_removes_abandoned_temp_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path(), Durability::default()).unwrap();
        let abandoned = dir.path().join("tmp").join("dead.part");
        fs::write(&abandoned, b"half").unwrap();
        let live = dir.path().join("tmp").join("live.part");
        let held = File::create(&live).unwrap();
        held.lock().unwrap();
        // Another open file description (as another process would have) cannot take the lock.
        assert_eq!(store.sweep_incomplete().unwrap(), 1);
        assert!(!abandoned.exists());
        assert!(live.exists());
        drop(held);
        assert_eq!(store.sweep_incomplete().unwrap(), 1);
    }
}
