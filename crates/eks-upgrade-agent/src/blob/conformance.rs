//! The `BlobStore` conformance suite. A backend runs it through [`run`] with a factory returning
//! a fresh store and a function that corrupts a stored blob in place (how is backend-specific).

use std::io::Read;

use super::{BlobStore, Digest};
use crate::error::Error;

type Corrupt = Box<dyn Fn(&Digest)>;
type Factory<'a> = &'a dyn Fn() -> (Box<dyn BlobStore>, Corrupt);

fn read_all(store: &dyn BlobStore, d: &Digest) -> crate::Result<Vec<u8>> {
    let mut out = Vec::new();
    store.open(d)?.read_to_end(&mut out)?;
    Ok(out)
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(crate) fn run(factory: Factory<'_>) {
    // Round trip, small and multi-chunk, and empty.
    let (store, _) = factory();
    for (n, seed) in [(0usize, 1u64), (1, 2), (4096, 3), (3 * 1024 * 1024 + 17, 4)] {
        let data = bytes(n, seed);
        let mut seen = 0;
        let info = store.put(&mut data.as_slice(), &mut |b| seen = b).unwrap();
        assert_eq!(info.digest, Digest::of(&data), "size {n}");
        assert_eq!(info.size, n as u64);
        assert!(info.created);
        assert_eq!(seen, n as u64, "progress reports every byte");
        assert_eq!(
            read_all(store.as_ref(), &info.digest).unwrap(),
            data,
            "size {n}"
        );
        assert!(store.exists(&info.digest).unwrap());
        assert_eq!(store.size(&info.digest).unwrap(), n as u64);
    }

    // Dedupe: the same content twice is one blob.
    let (store, _) = factory();
    let a = store.put(&mut &b"same bytes"[..], &mut |_| {}).unwrap();
    let b = store.put(&mut &b"same bytes"[..], &mut |_| {}).unwrap();
    assert_eq!(a.digest, b.digest);
    assert!(a.created && !b.created);
    let mut listed = Vec::new();
    store
        .list(&mut |m| {
            listed.push(m);
            Ok(())
        })
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].digest, listed[0].size), (a.digest, 10));

    // Missing blobs are NotFound; delete is idempotent.
    let missing = Digest::of(b"never stored");
    assert!(matches!(store.open(&missing), Err(Error::NotFound { .. })));
    assert!(matches!(store.size(&missing), Err(Error::NotFound { .. })));
    assert!(!store.exists(&missing).unwrap());
    assert!(store.delete(&a.digest).unwrap());
    assert!(!store.delete(&a.digest).unwrap());
    assert!(!store.exists(&a.digest).unwrap());

    // Corruption is detected on read, loudly.
    let (store, corrupt) = factory();
    let data = bytes(100_000, 9);
    let info = store.put(&mut data.as_slice(), &mut |_| {}).unwrap();
    corrupt(&info.digest);
    let err = read_all(store.as_ref(), &info.digest).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&info.digest.to_hex()), "{err}");

    // A put of bytes whose blob is corrupt repairs it (small and large content): the stored
    // copy is never trusted (issue #10, item 15).
    let (store, corrupt) = factory();
    for (n, seed) in [(100usize, 11u64), (100_000, 12)] {
        let data = bytes(n, seed);
        let info = store.put(&mut data.as_slice(), &mut |_| {}).unwrap();
        corrupt(&info.digest);
        assert!(read_all(store.as_ref(), &info.digest).is_err(), "size {n}");
        let again = store.put(&mut data.as_slice(), &mut |_| {}).unwrap();
        assert_eq!(again.digest, info.digest);
        assert!(!again.created, "size {n}");
        assert_eq!(
            read_all(store.as_ref(), &info.digest).unwrap(),
            data,
            "size {n}: re-adding good bytes repairs the blob"
        );
    }

    // delete_if_older keeps a blob put after the cutoff and removes one put before it.
    let (store, _) = factory();
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for (n, seed) in [(10usize, 21u64), (100_000, 22)] {
        let info = store
            .put(&mut bytes(n, seed).as_slice(), &mut |_| {})
            .unwrap();
        assert!(
            !store.delete_if_older(&info.digest, before).unwrap(),
            "size {n}"
        );
        assert!(store.exists(&info.digest).unwrap(), "size {n}");
        let after = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(
            store.delete_if_older(&info.digest, after).unwrap(),
            "size {n}"
        );
        assert!(!store.exists(&info.digest).unwrap(), "size {n}");
        assert!(
            !store.delete_if_older(&info.digest, after).unwrap(),
            "size {n}"
        );
    }

    // A failing reader stores nothing.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let (store, _) = factory();
    for n in [10, 2 * 1024 * 1024 + 5] {
        let err = store.put(&mut Failing(n), &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("i/o") || format!("{err:?}").contains("disk on fire"),
            "{err:?}"
        );
    }
    let mut count = 0;
    store
        .list(&mut |_| {
            count += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(count, 0, "no partial blob is visible");
    assert_eq!(
        store.sweep_incomplete().unwrap(),
        0,
        "failed puts clean up after themselves"
    );
}
