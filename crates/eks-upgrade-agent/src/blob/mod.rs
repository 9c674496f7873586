//! Content-addressed blob stores. Bytes are stored once per SHA-256 digest and are immutable;
//! artifact names, tags and metadata live in the index and point at digests.
//!
//! [`BlobStore`] is the boundary; [`LocalBlobStore`] keeps blobs in the data directory. Every
//! read goes through a [`VerifyingReader`], which fails with [`Error::Corrupt`] at the end of the
//! stream when the bytes do not hash to their digest.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

pub mod cached;
pub mod local;
#[cfg(feature = "aws")]
pub mod s3;

#[cfg(test)]
pub(crate) mod conformance;

pub use cached::CachedBlobStore;
pub use local::LocalBlobStore;
#[cfg(feature = "aws")]
pub use s3::{S3BlobStore, S3Options};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| {
            Error::invalid(format!("invalid digest {s:?}: expected 64 hex characters"))
        })?;
        Ok(Digest(out))
    }
}

/// What [`BlobStore::put`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Digest of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// False when a blob with this digest was already there (nothing was written).
    pub created: bool,
}

/// One stored blob, as listed by [`BlobStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobMeta {
    /// Digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, when the backend knows it.
    pub modified: Option<SystemTime>,
}

/// Content-addressed storage.
///
/// Contract for implementations:
/// - [`put`](BlobStore::put) reads the stream once, hashing while it stores, and makes the blob
///   visible atomically (never a partial blob under its digest). Putting a digest that exists
///   is a no-op returning `created: false`.
/// - [`open`](BlobStore::open) returns a reader that verifies the digest; a mismatch is an
///   [`Error::Corrupt`] error (as an `io::Error` from `read`). A missing blob is
///   [`Error::NotFound`].
/// - [`delete`](BlobStore::delete) is idempotent.
/// - A put of bytes whose blob exists never trusts the stored copy: it replaces (or verifies)
///   it, so re-adding good bytes repairs a corrupt blob, and it refreshes the blob's
///   modification time, which [`delete_if_older`](BlobStore::delete_if_older) judges.
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Stores the bytes of `reader`; `progress` is called with the bytes stored so far.
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo>;

    /// A verifying reader over a blob.
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>>;

    /// [`open`](BlobStore::open) for one pass over a blob that is not worth caching (an upload
    /// run copying it elsewhere): a store with a cache reads a blob it lacks without keeping it.
    fn open_uncached(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        self.open(digest)
    }

    /// Whether the blob exists.
    fn exists(&self, digest: &Digest) -> Result<bool>;

    /// Size of the blob.
    fn size(&self, digest: &Digest) -> Result<u64>;

    /// Removes the blob; `Ok(false)` if it was not there.
    fn delete(&self, digest: &Digest) -> Result<bool>;

    /// Calls `f` for every blob, without holding the list in memory.
    fn list(&self, f: &mut dyn FnMut(BlobMeta) -> Result<()>) -> Result<()>;

    /// Removes the blob only if it was last put before `cutoff`, deciding atomically with
    /// respect to concurrent puts (a put that refreshed the blob keeps it); `Ok(false)` if it
    /// is younger or absent. What `gc` uses, so it never deletes a blob an add is about to
    /// index.
    fn delete_if_older(&self, digest: &Digest, cutoff: SystemTime) -> Result<bool>;

    /// Puts `digest` into the shared store again from a copy this store keeps locally (team
    /// mode: an add whose bytes a concurrent release deleted from S3 before the add was
    /// indexed); `Ok(false)` when there is no such copy (the add must be given the bytes
    /// again). A store that is its own truth has no shared store behind it: `Ok(false)`.
    fn restore(&self, digest: &Digest) -> Result<bool> {
        let _ = digest;
        Ok(false)
    }

    /// Removes leftovers of interrupted puts (e.g. temp files of killed processes); returns how
    /// many were removed. Never touches a put in progress.
    fn sweep_incomplete(&self) -> Result<u64> {
        Ok(0)
    }
}

/// A shared store is a store (tests and callers can keep a handle next to the owner).
impl<T: BlobStore + ?Sized> BlobStore for std::sync::Arc<T> {
    fn put(&self, reader: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<BlobInfo> {
        (**self).put(reader, progress)
    }
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        (**self).open(digest)
    }
    fn open_uncached(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        (**self).open_uncached(digest)
    }
    fn exists(&self, digest: &Digest) -> Result<bool> {
        (**self).exists(digest)
    }
    fn size(&self, digest: &Digest) -> Result<u64> {
        (**self).size(digest)
    }
    fn delete(&self, digest: &Digest) -> Result<bool> {
        (**self).delete(digest)
    }
    fn list(&self, f: &mut dyn FnMut(BlobMeta) -> Result<()>) -> Result<()> {
        (**self).list(f)
    }
    fn delete_if_older(&self, digest: &Digest, cutoff: SystemTime) -> Result<bool> {
        (**self).delete_if_older(digest, cutoff)
    }
    fn restore(&self, digest: &Digest) -> Result<bool> {
        (**self).restore(digest)
    }
    fn sweep_incomplete(&self) -> Result<u64> {
        (**self).sweep_incomplete()
    }
}

/// Reads a blob and checks its digest at the end of the stream.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    done: bool,
}

impl<R> fmt::Debug for VerifyingReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingReader")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, which should yield the bytes of `expected`.
    pub fn new(inner: R, expected: Digest) -> Self {
        VerifyingReader {
            inner,
            hasher: Sha256::new(),
            expected,
            done: false,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        if !self.done {
            self.done = true;
            let got = Digest(std::mem::take(&mut self.hasher).finalize().into());
            if got != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    Error::Corrupt {
                        what: format!(
                            "blob sha256:{} is corrupt: its content hashes to sha256:{}",
                            self.expected, got
                        ),
                    },
                ));
            }
        }
        Ok(0)
    }
}

/// Reads `reader` to the end and returns the verified bytes' count (a full verification pass).
pub fn drain_verified(reader: &mut dyn Read) -> Result<u64> {
    Ok(io::copy(reader, &mut io::sink())?)
}
