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
use std::sync::mpsc;

use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use super::{BlobInfo, BlobMeta, BlobStore, Digest, VerifyingReader};
use crate::error::{Error, Result};
use crate::store::Durability;

/// Bytes read per chunk.
const CHUNK: usize = 1024 * 1024;
/// Chunks in flight between the reader and the hasher (bounds memory to 4 MiB per put).
const IN_FLIGHT: usize = 4;

/// Blobs in a directory of the local file system.
#[derive(Debug)]
pub struct LocalBlobStore {
    root: PathBuf,
    durability: Durability,
}

impl LocalBlobStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path, durability: Durability) -> Result<LocalBlobStore> {
        for dir in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(|e| {
                Error::backend(format!("cannot create blob directory {}", dir.display()), e)
            })?;
        }
        Ok(LocalBlobStore {
            root: root.to_path_buf(),
            durability,
        })
    }

    /// Where the blob with `digest` lives.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("sha256").join(&hex[..2]).join(&hex[2..])
    }

    fn not_found(digest: &Digest) -> Error {
        Error::not_found(format!("blob sha256:{digest}"))
    }

    fn write_stream(
        &self,
        reader: &mut dyn Read,
        file: &mut File,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(Digest, u64)> {
        let mut first = vec![0u8; CHUNK];
        let n = fill(reader, &mut first)?;
        if n < CHUNK {
            // Small content: hash inline, no thread.
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

/// Reads until `buf` is full or the stream ends.
fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BlobStore for LocalBlobStore {
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.part", Uuid::now_v7()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::backend(format!("cannot create {}", tmp.display()), e))?;
        // The lock tells sweep_incomplete that this put is alive; it ends with the process.
        file.lock()?;
        let written = self
            .write_stream(reader, &mut file, progress)
            .and_then(|r| {
                if self.durability == Durability::PowerLoss {
                    file.sync_all()?;
                }
                Ok(r)
            });
        let (digest, size) = match written {
            Ok(r) => r,
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let path = self.path_of(&digest);
        if path.exists() {
            drop(file);
            let _ = fs::remove_file(&tmp);
            return Ok(BlobInfo {
                digest,
                size,
                created: false,
            });
        }
        let dir = path.parent().expect("blob paths have a parent");
        let finish = || -> io::Result<()> {
            fs::create_dir_all(dir)?;
            let mut perms = file.metadata()?.permissions();
            perms.set_readonly(true);
            file.set_permissions(perms)?;
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
        Ok(BlobInfo {
            digest,
            size,
            created: true,
        })
    }

    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
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
        match fs::metadata(self.path_of(digest)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        match fs::metadata(self.path_of(digest)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Self::not_found(digest)),
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        match fs::remove_file(self.path_of(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
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
        Ok(())
    }

    fn sweep_incomplete(&self) -> Result<u64> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let path = entry?.path();
            let Ok(file) = OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            // A live put holds the lock; a killed one released it with its process.
            if file.try_lock().is_ok() {
                drop(file);
                if fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
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
            let root = store.root.clone();
            let corrupt: Box<dyn Fn(&Digest)> = Box::new(move |d: &Digest| {
                let hex = d.to_hex();
                let path = root.join("sha256").join(&hex[..2]).join(&hex[2..]);
                let mut perms = fs::metadata(&path).unwrap().permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                perms.set_readonly(false);
                fs::set_permissions(&path, perms).unwrap();
                let mut bytes = fs::read(&path).unwrap();
                bytes[0] ^= 0xff;
                fs::write(&path, bytes).unwrap();
            });
            (Box::new(store) as Box<dyn BlobStore>, corrupt)
        });
    }

    #[test]
    fn power_loss_level_works_and_blobs_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path(), Durability::PowerLoss).unwrap();
        let info = store.put(&mut &b"durable"[..], &mut |_| {}).unwrap();
        let meta = fs::metadata(store.path_of(&info.digest)).unwrap();
        assert!(meta.permissions().readonly());
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
