//! `cargo bench -p eks-upgrade-agent --bench s3`
//!
//! Against a local S3 server (s3s-fs on 127.0.0.1, which must be on PATH: `.ci/run` installs it),
//! prints:
//! - `s3_upload_MBps size=256MiB`: one 256 MiB artifact uploaded by `artifacts upload` (multipart,
//!   parts in flight, streamed from the local blob);
//!   (in process: the library's figure; `eks-upgrade-agent-cli`'s `s3_cli` bench compares our
//!   CLI with `aws s3 cp`, both as processes);
//! - `s3_upload_files_per_s n=1000 size=4KiB`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::artifacts::upload::UploadOptions;
use eks_upgrade_agent::artifacts::{AddOptions, ArtifactsOptions, NewSession};
use eks_upgrade_agent::blob::{LocalBlobStore, S3BlobStore, S3Options};
use eks_upgrade_agent::store::Durability;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

const KEY: (&str, &str) = ("bench-access", "bench-secret");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(root: &Path) -> (Server, String) {
    std::fs::create_dir_all(root.join("bench")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", KEY.0, "--secret-key", KEY.1])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs on PATH (cargo install s3s-fs@0.14.1 --features binary)");
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "s3s-fs did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Server(child), url)
}

fn manager(dir: &Path, url: &str) -> (TestArtifactsManager, Arc<SqliteStore>, S3BlobStore) {
    let store = Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap());
    let blobs = Arc::new(LocalBlobStore::open(&dir.join("blobs"), Durability::default()).unwrap());
    let s3 = || {
        S3BlobStore::new(&S3Options {
            bucket: "bench".into(),
            prefix: "eks-upgrade-agent/artifacts".into(),
            endpoint: Some(url.to_owned()),
            region: Some("us-east-1".into()),
            credentials: Some((KEY.0.into(), KEY.1.into())),
        })
        .unwrap()
    };
    let m = TestArtifactsManager::new(
        store.clone(),
        blobs,
        ArtifactsOptions {
            auto_upload: true,
            ..ArtifactsOptions::default()
        },
    )
    .with_s3(Arc::new(s3()));
    (m, store, s3())
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let (_server, url) = start_server(&work.path().join("s3"));
    let big = work.path().join("big.bin");
    {
        let mut chunk = vec![0u8; 1 << 20];
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        for _ in 0..256 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
    }
    let size = std::fs::metadata(&big).unwrap().len() as f64;

    // Ours.
    let (m, store, s3) = manager(&work.path().join("data"), &url);
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
    m.add_path(
        &s.session_id,
        &c.collection_id,
        &big,
        &AddOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let start = Instant::now();
    let r = m
        .upload(
            store.as_ref(),
            &s3,
            &UploadOptions::default(),
            None,
            false,
            &mut |_| {},
        )
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r.uploaded, 1, "{r:?}");
    println!("s3_upload_MBps size=256MiB: {:.0}", size / secs / 1e6);

    // The comparison with `aws s3 cp` times both as processes: the CLI crate's `s3_cli` bench.

    // Many small files.
    let small: Vec<(String, Vec<u8>, AddOptions)> = (0..1000)
        .map(|i| {
            let mut v = format!("file {i} ").into_bytes();
            v.resize(4096, b'z');
            (format!("small/{i}.log"), v, AddOptions::default())
        })
        .collect();
    let c2 = m
        .create_collection(&s.session_id, "small", None, None)
        .unwrap();
    m.add_many_bytes(&s.session_id, &c2.collection_id, &small)
        .unwrap();
    let start = Instant::now();
    let r = m
        .upload(
            store.as_ref(),
            &s3,
            &UploadOptions::default(),
            None,
            false,
            &mut |_| {},
        )
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r.uploaded, 1000, "{r:?}");
    println!(
        "s3_upload_files_per_s n=1000 size=4KiB: {:.0}",
        1000.0 / secs
    );
}
