//! Shared fixtures: a temporary data dir and helpers to run the binary in it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_eks-upgrade-agent");

pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
}

impl Env {
    pub(crate) fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--data-dir").arg(self.dir.path());
        // Hermetic: no user configuration file, no sinks from the environment.
        c.env_remove("EUA_DATA_DIR")
            .env_remove("EUA_OUTPUT")
            .env_remove("EUA_CONFIG")
            .env_remove("EUA_WEBHOOK_URL")
            .env_remove("EUA_EVENTBRIDGE_BUS_NAME")
            .env_remove("EUA_TOKENS")
            .env_remove("EUA_SERVER")
            .env_remove("EUA_DATABASE_URL")
            .env_remove("EUA_TOKEN")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_HEADERS")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .env_remove("OTEL_EXPORTER_OTLP_COMPRESSION")
            .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .env("XDG_CONFIG_HOME", self.dir.path().join("config-home"));
        c.stdin(Stdio::null());
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs with `-o json` and parses stdout.
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let text = self.ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Runs, asserts the exit code, returns stderr.
    pub(crate) fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// A fresh data dir holding upgrade `u` (plan `p`, cluster `c`) with one task `t`.
    pub(crate) fn with_task() -> Env {
        let env = Env::new();
        env.ok(&[
            "progress",
            "upgrade",
            "create",
            "u",
            "--plan",
            "p",
            "--cluster",
            "c",
        ]);
        env.ok(&[
            "progress",
            "task",
            "add",
            "u",
            "t",
            "--name",
            "T",
            "--type",
            "upgrade_step",
        ]);
        env
    }

    /// Runs `progress apply` on `input` (written while the acknowledgements are read); returns
    /// them, one JSON object per line.
    pub(crate) fn apply(&self, input: &str) -> Vec<Value> {
        use std::io::Write;
        let mut child = self
            .command()
            .args(["progress", "apply"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_owned();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every event of an upgrade, as JSON.
    pub(crate) fn events(&self, upgrade: &str) -> Vec<Value> {
        self.json(&["progress", "events", upgrade])
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A moto server on a free loopback port, killed on drop.
pub(crate) struct Moto {
    child: Child,
    pub(crate) url: String,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        Moto::start_on(
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        )
    }

    /// Stops the server (as an outage would).
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn start_on(port: u16) -> Moto {
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

    /// Runs a boto3 snippet against this server; `out` is what it prints as JSON.
    pub(crate) fn python(&self, code: &str) -> Value {
        let script = format!(
            "import boto3, json\n\
             kw = dict(endpoint_url={url:?}, region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
             events = boto3.client('events', **kw)\n\
             sqs = boto3.client('sqs', **kw)\n\
             {code}\n",
            url = self.url
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A snippet that prints nothing gives null; anything else must be JSON (a stray print
        // or a traceback on stdout is a failure, not null).
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "python printed something that is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve` on a free loopback port (extra env, e.g. tokens); killed on drop.
pub(crate) struct Served {
    pub(crate) child: std::process::Child,
    pub(crate) port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn serve(env: &Env, vars: &[(&str, &str)]) -> Served {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = env.command();
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let served = Served {
        child: cmd.spawn().unwrap(),
        port,
    };
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    served
}

/// A raw HTTP/1.1 request; returns the response's head and body as text.
pub(crate) fn http(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    resp
}

/// Bodies a webhook receiver got (each prefixed by its signature header line, if any).
pub(crate) type Received = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// An HTTP receiver on 127.0.0.1 answering 200; returns its URL and the bodies it got.
pub(crate) fn webhook_receiver() -> (String, Received) {
    webhook_receiver_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
}

/// [`webhook_receiver`] on a given listener (e.g. a port a sink was down on before).
pub(crate) fn webhook_receiver_on(listener: std::net::TcpListener) -> (String, Received) {
    webhook_receiver_slow(listener, Duration::ZERO)
}

/// [`webhook_receiver_on`] answering each request only after `delay` (a slow sink, so that
/// several senders' deliveries overlap).
pub(crate) fn webhook_receiver_slow(
    listener: std::net::TcpListener,
    delay: Duration,
) -> (String, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            let mut sig = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if lower.starts_with("x-eua-signature:") {
                    sig = line.trim().to_owned();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            std::thread::sleep(delay);
            g.lock()
                .unwrap()
                .push(format!("{sig}\n{}", String::from_utf8_lossy(&body)));
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

/// Waits up to 20 s until `got` holds a body containing `needle`.
pub(crate) fn wait_for_body(got: &Received, needle: &str) {
    let start = Instant::now();
    loop {
        if got.lock().unwrap().iter().any(|b| b.contains(needle)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no delivery containing {needle:?}: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
