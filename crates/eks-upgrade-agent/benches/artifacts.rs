//! `cargo bench -p eks-upgrade-agent --bench artifacts`
//!
//! Prints one figure per line:
//! - `artifact_adds_per_s n=N size=512B`: 512-byte files with distinct content, added one per
//!   call (`add_path`, each its own blob write and index transaction) into one collection; such
//!   small blobs go to the inline small-blob table;
//! - `artifact_adds_per_s n=1000 size=64KiB|1MiB`: the same with larger files, which take the
//!   file path (temp file, hash, rename, fsync policy);
//! - `search_ms artifacts=N query=tag+type|name`: median of repeated searches (limit 100);
//!   the store is grown to 1,000,000 artifacts with batched adds between the two sizes;
//! - `ingest_MBps size=512MiB median_of=5`: one 512 MiB page-cached file added, median of 5
//!   fresh processes; `sha256_MBps`: raw SHA-256 of an in-memory buffer in the same run, median
//!   of 5; `ingest_peak_rss_MiB size=512MiB`: the largest peak RSS of those processes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::artifacts::{AddOptions, ArtifactsOptions, NewSession};
use eks_upgrade_agent::blob::LocalBlobStore;
use eks_upgrade_agent::model::{ArtifactQuery, ArtifactType};
use eks_upgrade_agent::store::Durability;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};
use sha2::{Digest, Sha256};

const INGEST_ENV: &str = "EUA_BENCH_INGEST";

fn manager(dir: &Path) -> TestArtifactsManager {
    let store = Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap());
    let blobs = Arc::new(LocalBlobStore::open(&dir.join("blobs"), Durability::default()).unwrap());
    TestArtifactsManager::new(store, blobs, ArtifactsOptions::default())
}

fn options(i: usize) -> AddOptions {
    AddOptions {
        artifact_type: Some(ArtifactType::ALL[i % ArtifactType::ALL.len()]),
        tags: vec![format!("t{}", i % 10), format!("group-{}", i % 100)],
        task_id: Some(format!("task-{}", i % 50)),
        ..AddOptions::default()
    }
}

fn name(i: usize) -> String {
    format!("node-{:05}/kubelet-{:04}.log", i % 100_000, i % 1000)
}

/// Writes `n` distinct files of `size` bytes.
fn make_files(dir: &Path, first: usize, n: usize, size: usize) -> Vec<PathBuf> {
    fs::create_dir_all(dir).unwrap();
    (first..first + n)
        .map(|i| {
            let p = dir.join(format!("f{i}.log"));
            let mut content = format!("line {i} ").into_bytes();
            content.resize(size, b'x');
            fs::write(&p, content).unwrap();
            p
        })
        .collect()
}

fn median_ms(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    runs[runs.len() / 2]
}

fn search_ms(m: &TestArtifactsManager, make: impl Fn(usize) -> ArtifactQuery) -> (f64, usize) {
    let mut runs = Vec::new();
    let mut hits = 0;
    for i in 0..41 {
        let q = make(i);
        let start = Instant::now();
        let r = m.search(&q).unwrap();
        runs.push(start.elapsed().as_secs_f64() * 1000.0);
        hits += r.len();
    }
    (median_ms(runs), hits)
}

fn tag_type(i: usize) -> ArtifactQuery {
    ArtifactQuery {
        artifact_type: Some(ArtifactType::ALL[i % ArtifactType::ALL.len()]),
        tags: vec![format!("t{}", (i * 3) % 10)],
        limit: 100,
        ..ArtifactQuery::default()
    }
}

fn name_query(i: usize) -> ArtifactQuery {
    ArtifactQuery {
        name: Some(format!("kubelet-{:04}", (i * 37) % 1000)),
        limit: 100,
        ..ArtifactQuery::default()
    }
}

fn peak_rss_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// In a fresh process: ingest the file, print `MBps rss_kib`.
fn ingest_child(spec: &str) {
    let (dir, file) = spec.split_once('|').unwrap();
    let m = manager(Path::new(dir));
    let s = m
        .create_session(NewSession {
            upgrade_id: "bench".into(),
            cluster_name: "c".into(),
            ..NewSession::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "big", None, None)
        .unwrap();
    let size = fs::metadata(file).unwrap().len() as f64;
    let start = Instant::now();
    m.add_path(
        &s.session_id,
        &c.collection_id,
        Path::new(file),
        &AddOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!("{:.1} {}", size / secs / 1e6, peak_rss_kib());
}

fn main() {
    if let Ok(spec) = std::env::var(INGEST_ENV) {
        ingest_child(&spec);
        return;
    }
    let work = tempfile::tempdir().unwrap();
    // `-- adds` measures only the adds.
    let adds_only = std::env::args().any(|a| a == "adds");

    // Adds: one file per call, store growing from 0 to 100,000.
    let data = work.path().join("data");
    let m = manager(&data);
    let s = m
        .create_session(NewSession {
            upgrade_id: "bench".into(),
            cluster_name: "c".into(),
            ..NewSession::default()
        })
        .unwrap();
    let c = m
        .create_collection(&s.session_id, "logs", None, None)
        .unwrap();
    let mut added = 0usize;
    for target in [1_000usize, 10_000, 100_000] {
        let n = target - added;
        let files = make_files(&work.path().join(format!("src-{target}")), added, n, 512);
        let start = Instant::now();
        for (k, path) in files.iter().enumerate() {
            let i = added + k;
            let mut o = options(i);
            o.name = Some(name(i));
            m.add_path(&s.session_id, &c.collection_id, path, &o, &mut |_| {})
                .unwrap();
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        added = target;
        println!("artifact_adds_per_s n={target} size=512B: {rate:.0}");
        fs::remove_dir_all(work.path().join(format!("src-{target}"))).unwrap();
    }
    // Larger files take the blob file path: 1,000 adds each, into a fresh store.
    for (size, label) in [(64 << 10, "64KiB"), (1 << 20, "1MiB")] {
        let data = work.path().join(format!("data-{label}"));
        let m = manager(&data);
        let s = m
            .create_session(NewSession {
                upgrade_id: "bench".into(),
                cluster_name: "c".into(),
                ..NewSession::default()
            })
            .unwrap();
        let c = m
            .create_collection(&s.session_id, "logs", None, None)
            .unwrap();
        let src = work.path().join(format!("src-{label}"));
        let files = make_files(&src, 0, 1000, size);
        let start = Instant::now();
        for (i, path) in files.iter().enumerate() {
            let mut o = options(i);
            o.name = Some(name(i));
            m.add_path(&s.session_id, &c.collection_id, path, &o, &mut |_| {})
                .unwrap();
        }
        let rate = files.len() as f64 / start.elapsed().as_secs_f64();
        println!("artifact_adds_per_s n=1000 size={label}: {rate:.0}");
        drop(m);
        fs::remove_dir_all(&src).unwrap();
        fs::remove_dir_all(&data).unwrap();
    }

    if adds_only {
        return;
    }
    let (ms, hits) = search_ms(&m, tag_type);
    assert!(hits > 0);
    println!("search_ms artifacts=100000 query=tag+type: {ms:.2}");

    // Grow to 1,000,000 with batched adds (content from a pool of 1,000 blobs).
    let pool: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let mut v = format!("pooled {i} ").into_bytes();
            v.resize(512, b'y');
            v
        })
        .collect();
    let mut i = added;
    while i < 1_000_000 {
        let batch: Vec<(String, Vec<u8>, AddOptions)> = (i..(i + 256).min(1_000_000))
            .map(|k| (name(k), pool[k % 1000].clone(), options(k)))
            .collect();
        i += batch.len();
        m.add_many_bytes(&s.session_id, &c.collection_id, &batch)
            .unwrap();
    }
    let (ms, hits) = search_ms(&m, tag_type);
    assert!(hits > 0);
    println!("search_ms artifacts=1000000 query=tag+type: {ms:.2}");
    let (ms, hits) = search_ms(&m, name_query);
    assert!(hits > 0);
    println!("search_ms artifacts=1000000 query=name: {ms:.2}");
    drop(m);
    fs::remove_dir_all(&data).unwrap();

    // Ingest of one 512 MiB file, in a fresh process for a clean peak RSS.
    let big = work.path().join("big.bin");
    {
        let mut chunk = vec![0u8; 1 << 20];
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut f = std::io::BufWriter::new(fs::File::create(&big).unwrap());
        for _ in 0..512 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
    }
    let _ = fs::read(&big).map(|v| v.len()); // page-cache the source
    let mut runs = Vec::new();
    let mut peak = 0u64;
    for run in 0..5 {
        let dir = work.path().join(format!("ingest-{run}"));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(INGEST_ENV, format!("{}|{}", dir.display(), big.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut parts = text.split_whitespace();
        let mbps: f64 = parts.next().unwrap().parse().unwrap();
        let rss: u64 = parts.next().unwrap().parse().unwrap();
        runs.push(mbps);
        peak = peak.max(rss);
        fs::remove_dir_all(&dir).unwrap();
    }
    runs.sort_by(f64::total_cmp);
    // Raw SHA-256 of an in-memory buffer, same run.
    let buf = vec![0x5au8; 256 << 20];
    let mut sha = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let d = Sha256::digest(&buf);
        std::hint::black_box(d);
        sha.push(buf.len() as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    sha.sort_by(f64::total_cmp);
    println!("ingest_MBps size=512MiB median_of=5: {:.0}", runs[2]);
    println!("sha256_MBps median_of=5: {:.0}", sha[2]);
    println!(
        "ingest_peak_rss_MiB size=512MiB: {:.1}",
        peak as f64 / 1024.0
    );
}
