//! Test fixtures shared by the library's tests: a moto server (S3, EventBridge, SQS) on
//! 127.0.0.1, started per test and killed on drop. moto is installed by `.ci/run`; a missing
//! `moto_server` fails the test, it never skips it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server.
pub(crate) struct Moto {
    child: Child,
    pub(crate) url: String,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): install it with pip install \"moto[server]\" (.ci/run does)")
            });
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto_server did not start on {url}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, url }
    }

    /// Creates a bucket (with boto3, which moto's server install brings).
    pub(crate) fn create_bucket(&self, name: &str) {
        let script = format!(
            "import boto3\nboto3.client('s3', endpoint_url={:?}, region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing').create_bucket(Bucket={name:?})",
            self.url
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running s3s-fs server (a second S3 implementation, which checks SigV4 signatures), with
/// one bucket; killed on drop. Installed by `.ci/run` (`cargo install s3s-fs --features binary`).
pub(crate) struct S3sFs {
    child: Child,
    pub(crate) url: String,
    _root: tempfile::TempDir,
}

/// Credentials s3s-fs is started with.
pub(crate) const S3S_KEY: (&str, &str) = ("eua-access-key", "eua-secret-key");

impl S3sFs {
    pub(crate) fn start(bucket: &str) -> S3sFs {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3S_KEY.0, "--secret-key", S3S_KEY.1])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start s3s-fs ({e}): install it with cargo install s3s-fs@0.14.1 --features binary (.ci/run does)")
            });
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "s3s-fs did not start on {url}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3sFs {
            child,
            url,
            _root: root,
        }
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
