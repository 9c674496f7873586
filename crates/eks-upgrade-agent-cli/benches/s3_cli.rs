//! `cargo bench -p eks-upgrade-agent-cli --bench s3_cli`
//!
//! Our CLI against the AWS CLI, both timed the same way: as whole processes (start-up, config,
//! credentials, the upload), uploading the same 256 MiB file to the same local S3 server
//! (s3s-fs on 127.0.0.1, on PATH: `.ci/run` installs it), median of 5 runs each:
//! - `cli_upload_MBps size=256MiB median_of=5 process=eks-upgrade-agent`: `eks-upgrade-agent
//!   artifacts upload` of a session holding the file (added beforehand, not timed: the add is
//!   the local store's job, measured by the library's `artifacts` bench);
//! - `cli_upload_MBps size=256MiB median_of=5 process=aws`: `aws s3 cp` (needs `aws` from
//!   `pip install awscli`; reported as unavailable otherwise).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_eks-upgrade-agent");
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

/// The environment both CLIs get: the server, static credentials, no metadata service.
fn aws_env<'a>(cmd: &'a mut Command, url: &str) -> &'a mut Command {
    cmd.env("AWS_ENDPOINT_URL", url)
        .env("AWS_ACCESS_KEY_ID", KEY.0)
        .env("AWS_SECRET_ACCESS_KEY", KEY.1)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("EUA_CONFIG")
        .env_remove("EUA_SERVER")
}

fn ours(dir: &Path, args: &[&str], url: &str) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir").arg(dir).args(args);
    let out = aws_env(&mut cmd, url)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let _ = std::fs::read(&big); // page-cache the source for both

    let mut runs = Vec::new();
    for run in 0..5 {
        // A fresh data dir and prefix each run, so every run really uploads.
        let dir = work.path().join(format!("data-{run}"));
        let prefix = format!("run-{run}");
        let session = ours(
            &dir,
            &[
                "-o",
                "json",
                "artifacts",
                "session",
                "create",
                "--upgrade",
                "bench",
                "--cluster",
                "c",
            ],
            &url,
        );
        let session: serde_json::Value = serde_json::from_str(&session).unwrap();
        let session = session["session_id"].as_str().unwrap().to_owned();
        let collection = ours(
            &dir,
            &[
                "-o",
                "json",
                "artifacts",
                "collection",
                "create",
                &session,
                "--name",
                "big",
            ],
            &url,
        );
        let collection: serde_json::Value = serde_json::from_str(&collection).unwrap();
        let collection = collection["collection_id"].as_str().unwrap().to_owned();
        ours(
            &dir,
            // Queued for upload as it is added; the timed upload below sends it.
            &[
                "--s3-bucket",
                "bench",
                "--s3-prefix",
                &prefix,
                "--auto-upload",
                "artifacts",
                "add",
                &session,
                &collection,
                big.to_str().unwrap(),
            ],
            &url,
        );
        let start = Instant::now();
        let report = ours(
            &dir,
            &[
                "-o",
                "json",
                "--s3-bucket",
                "bench",
                "--s3-prefix",
                &prefix,
                "artifacts",
                "upload",
            ],
            &url,
        );
        let secs = start.elapsed().as_secs_f64();
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["uploaded"], 1, "{report}");
        runs.push(size / secs / 1e6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!(
        "cli_upload_MBps size=256MiB median_of=5 process=eks-upgrade-agent: {:.0}",
        median(runs)
    );

    let mut runs = Vec::new();
    for run in 0..5 {
        let start = Instant::now();
        let mut cmd = Command::new("aws");
        cmd.args(["s3", "cp", "--quiet"])
            .arg(&big)
            .arg(format!("s3://bench/awscli/{run}/big.bin"));
        match aws_env(&mut cmd, &url).status() {
            Ok(st) if st.success() => runs.push(size / start.elapsed().as_secs_f64() / 1e6),
            Ok(st) => {
                println!("cli_upload_MBps size=256MiB process=aws: failed ({st})");
                return;
            }
            Err(e) => {
                println!(
                    "cli_upload_MBps size=256MiB process=aws: unavailable ({e}; pip install awscli)"
                );
                return;
            }
        }
    }
    println!(
        "cli_upload_MBps size=256MiB median_of=5 process=aws: {:.0}",
        median(runs)
    );
}
