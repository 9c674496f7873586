//! Test fixtures shared by the library's tests: a moto server (S3, EventBridge, SQS) on
//! 127.0.0.1, started per test and killed on drop. moto is installed by `.ci/run`; a missing
//! `moto_server` fails the test, it never skips it. [`PgCluster`]: a throwaway PostgreSQL
//! cluster from Debian's packages (installed by `scripts/test`), one per test (no global
//! state), with a fresh database per store ([`PgCluster::create_database`]). Public under the
//! `conformance` feature, so the server and CLI tests use the same fixtures.

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

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// The bin directory of Debian's PostgreSQL packages (`/usr/lib/postgresql/<major>/bin`, the
/// newest), or `None` when they are not installed.
pub fn postgres_bin_dir() -> Option<std::path::PathBuf> {
    postgres_bin_dir_in(std::path::Path::new("/usr/lib/postgresql"))
}

/// The newest `<root>/<major>/bin` holding `initdb`.
fn postgres_bin_dir_in(root: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A throwaway PostgreSQL cluster on a free 127.0.0.1 port, in a temporary directory, with
/// `trust` authentication for the `postgres` user. As root, `initdb` and `postgres` run as the
/// `postgres` user through `runuser`. The server is stopped and its directory removed on drop,
/// and also when the test process exits without dropping it (a watchdog shell beside the server
/// waits for this process to go), so no server outlives its tests. Missing packages fail the
/// test, saying how to install them (`scripts/test` does).
#[derive(Debug)]
pub struct PgCluster {
    child: Option<Child>,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    as_postgres: bool,
    /// fsync on (benchmarks); tests run with fsync off.
    durable: bool,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The process whose exit stops the server (this one, but in the watchdog's test).
    watch: u32,
}

/// Fails unless a new session on `url` reads `clock_timestamp()` `offset_s` seconds off the
/// real one (the override took), so an offset test cannot pass on an unmoved clock.
fn assert_clock_offset(url: &str, offset_s: i64) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let off: f64 = c
        .query_one(
            "SELECT extract(epoch FROM clock_timestamp() - pg_catalog.clock_timestamp())::float8",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        (off - offset_s as f64).abs() < 5.0,
        "the database's clock is {off} s off, not {offset_s} s"
    );
}

impl PgCluster {
    /// Initialises and starts a cluster with fsync off (tests); panics (never skips) when
    /// PostgreSQL is missing.
    pub fn start() -> PgCluster {
        PgCluster::start_with(false)
    }

    /// [`start`](Self::start) with PostgreSQL's default durability (fsync on: benchmarks).
    pub fn start_durable() -> PgCluster {
        PgCluster::start_with(true)
    }

    fn start_with(durable: bool) -> PgCluster {
        PgCluster::start_from(
            std::path::Path::new("/usr/lib/postgresql"),
            durable,
            std::process::id(),
        )
    }

    /// A cluster from the packages under `root`, stopped when process `watch` exits.
    fn start_from(root: &std::path::Path, durable: bool, watch: u32) -> PgCluster {
        let bin = postgres_bin_dir_in(root).unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed (no {}/*/bin/initdb): run scripts/test, \
                 which installs Debian's postgresql package with apt-get",
                root.display()
            )
        });
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let dir = std::env::temp_dir().join(format!("eua-pg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        if root {
            let pg = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .unwrap();
            let gid = Command::new("id")
                .args(["-g", "postgres"])
                .output()
                .unwrap();
            assert!(pg.status.success(), "no postgres user: run scripts/test");
            let uid: u32 = String::from_utf8_lossy(&pg.stdout).trim().parse().unwrap();
            let gid: u32 = String::from_utf8_lossy(&gid.stdout).trim().parse().unwrap();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let mut cluster = PgCluster {
            child: None,
            dir,
            bin,
            as_postgres: root,
            durable,
            port: 0,
            watch,
        };
        let data = cluster.dir.join("data");
        let out = cluster
            .command("initdb")
            .args(["-D", data.to_str().unwrap()])
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C.UTF-8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.run_server();
        cluster
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts the server (on a new free port the first time, the same port after a stop) and
    /// waits until it accepts connections.
    fn run_server(&mut self) {
        if self.port == 0 {
            self.port = free_port();
        }
        let data = self.dir.join("data");
        let me = self.watch;
        let script = format!(
            "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
             -c fsync={sync} -c full_page_writes={sync} -c max_connections=400 \
             -c shared_buffers=64MB >{dir}/log 2>&1 & pid=$!; \
             while [ -d /proc/{me} ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done; \
             kill -INT $pid 2>/dev/null; wait $pid; \
             [ -d /proc/{me} ] || rm -rf {dir}",
            postgres = self.bin.join("postgres").display(),
            data = data.display(),
            port = self.port,
            dir = self.dir.display(),
            sync = if self.durable { "on" } else { "off" },
        );
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            match postgres::Client::connect(&self.url("postgres"), postgres::NoTls) {
                Ok(_) => return,
                // Still starting up (it answers, but takes no connection yet): wait.
                Err(e) if e.code() == Some(&postgres::error::SqlState::CANNOT_CONNECT_NOW) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The server answers (it refuses connections without TLS).
                Err(e) if e.as_db_error().is_some() => return,
                Err(e) => {
                    if start.elapsed() > Duration::from_secs(60) {
                        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                        panic!("PostgreSQL did not start on port {}: {e}\n{log}", self.port);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database with a fresh name; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t{}", uuid::Uuid::now_v7().simple());
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        self.url(&name)
    }

    /// Turns TLS on with this certificate and key (PEM) and restarts the server; `only_tls`:
    /// connections without TLS are refused (`hostnossl ... reject` in `pg_hba.conf`).
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str, only_tls: bool) {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.join("data");
        let owner = std::fs::metadata(data.join("PG_VERSION")).unwrap();
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if self.as_postgres {
                use std::os::unix::fs::MetadataExt;
                std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
        )
        .unwrap();
        if only_tls {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(&hba, format!("hostnossl all all all reject\n{old}")).unwrap();
        }
        self.restart();
    }

    /// Creates an empty database whose clock runs `offset_s` seconds off the machine's (the
    /// replicas'): its `clock_timestamp()` is a function that adds the offset kept in the table
    /// `eua_test_clock.skew` (change it with [`set_clock_offset`](Self::set_clock_offset)),
    /// found before `pg_catalog`'s by the database's `search_path` (tables still go to
    /// `public`). Returns its URL; open stores after this, so their sessions take the path.
    pub fn create_database_with_clock_offset(&self, offset_s: i64) -> String {
        let url = self.create_database();
        let name = url.rsplit('/').next().unwrap().to_owned();
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA eua_test_clock; \
             CREATE TABLE eua_test_clock.skew (off interval NOT NULL); \
             INSERT INTO eua_test_clock.skew VALUES (make_interval(secs => {offset_s})); \
             CREATE FUNCTION eua_test_clock.clock_timestamp() RETURNS timestamptz \
             LANGUAGE sql VOLATILE AS \
             'SELECT pg_catalog.clock_timestamp() + (SELECT off FROM eua_test_clock.skew)'; \
             ALTER DATABASE {name} SET search_path = public, eua_test_clock, pg_catalog;"
        ))
        .unwrap();
        assert_clock_offset(&url, offset_s);
        url
    }

    /// Moves the clock of a database made by
    /// [`create_database_with_clock_offset`](Self::create_database_with_clock_offset) to
    /// `offset_s` seconds off the machine's.
    pub fn set_clock_offset(&self, url: &str, offset_s: i64) {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.execute(
            "UPDATE eua_test_clock.skew SET off = make_interval(secs => $1)",
            &[&(offset_s as f64)],
        )
        .unwrap();
        assert_clock_offset(url, offset_s);
    }

    /// Ends every connection whose `application_name` is `app` (as a network failure would);
    /// returns how many.
    pub fn terminate_connections(&self, app: &str) -> u64 {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .len() as u64
    }

    /// Stops the server (fast shutdown: open connections are cut) and waits for it.
    pub fn stop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "stop", "-m", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port (or stops and
    /// starts it).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.run_server();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        if self.as_postgres {
            let _ = Command::new("rm").arg("-rf").arg(&self.dir).status();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throwaway_cluster_serves_fresh_databases_and_is_gone_after_drop() {
        let cluster = PgCluster::start();
        let port = cluster.port;
        let dir = cluster.dir.clone();
        let (a, b) = (cluster.create_database(), cluster.create_database());
        assert_ne!(a, b);
        let mut c = postgres::Client::connect(&a, postgres::NoTls).unwrap();
        let one: i32 = c.query_one("SELECT 1", &[]).unwrap().get(0);
        assert_eq!(one, 1);
        drop(c);
        drop(cluster);
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server still listens after drop"
        );
        assert!(!dir.exists(), "{} is left behind", dir.display());
    }

    /// The watchdog: when the process the cluster watches exits without dropping it (a test
    /// process killed, or `exit`ing), the server stops and its directory goes.
    #[test]
    fn the_server_stops_and_is_removed_when_its_process_exits_without_dropping_it() {
        let mut watched = Command::new("sleep").arg("600").spawn().unwrap();
        let cluster = PgCluster::start_from(
            std::path::Path::new("/usr/lib/postgresql"),
            false,
            watched.id(),
        );
        let (port, dir) = (cluster.port, cluster.dir.clone());
        postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls).unwrap();
        // As if the process had died: nobody drops the cluster.
        std::mem::forget(cluster);
        watched.kill().unwrap();
        watched.wait().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || dir.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the server on port {port} outlived its process (dir {} exists: {})",
                dir.display(),
                dir.exists()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Without the packages the test fails (never skips), naming what installs them.
    #[test]
    fn missing_packages_fail_the_test_naming_scripts_test() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(postgres_bin_dir_in(empty.path()), None);
        let root = empty.path().to_path_buf();
        let panic = std::panic::catch_unwind(move || {
            PgCluster::start_from(&root, false, std::process::id())
        })
        .unwrap_err();
        let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("PostgreSQL is not installed"), "{msg}");
        assert!(msg.contains("run scripts/test"), "{msg}");
        assert!(msg.contains("apt-get"), "{msg}");
        // A version directory without initdb does not count.
        std::fs::create_dir_all(empty.path().join("15/bin")).unwrap();
        assert_eq!(postgres_bin_dir_in(empty.path()), None);
    }
}
