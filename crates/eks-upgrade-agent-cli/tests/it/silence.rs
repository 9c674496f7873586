//! `--server` maintenance calls (`artifacts verify|cleanup|gc|upload|pull`) and a server that
//! stops answering: the CLI gives up after its limit on silence (`EUA_SERVER_IDLE_LIMIT`) with
//! a clear error, whether the server is a black hole (it accepts and then never reads or
//! writes), a paused process (`SIGSTOP`: the kernel still accepts), or a server that went quiet
//! in the middle of its answer; a server at work, which sends a progress line now and then, is
//! waited for however long it works.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::{Env, serve};

/// Runs `args` against `url` with a limit on silence of `limit` seconds; a run that lasts past
/// `bound` is killed and fails the test (the CLI hung).
fn run_bounded(url: &str, limit: &str, args: &[&str], bound: Duration) -> (Output, Duration) {
    let env = Env::new();
    let mut cmd = env.command();
    cmd.env("EUA_SERVER_IDLE_LIMIT", limit)
        .args(["--server", url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let began = Instant::now();
    let mut child = cmd.spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the CLI still waited after {bound:?}: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), began.elapsed())
}

/// A fake server on 127.0.0.1 that hands each connection to `serve_one` (on its own thread)
/// until dropped.
struct Fake {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Fake {
    fn start(serve_one: impl Fn(TcpStream) + Send + Sync + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let serve_one = Arc::new(serve_one);
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let serve_one = serve_one.clone();
                        std::thread::spawn(move || serve_one(s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Fake { port, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Asserts a run failed with the clear message within a few idle limits.
fn assert_cut(out: &Output, took: Duration) {
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("stopped answering: nothing received or sent for 1 s")
            && e.contains("check that the server is running and reachable"),
        "unclear error: {e}"
    );
    assert!(took < Duration::from_secs(8), "cut after {took:?}");
}

/// TR8: a black hole (accepts, never reads or writes) and a paused server end a maintenance
/// call with a clear error after the limit on silence (it waited forever before: no read
/// limit at all on these calls). TR10: every artifact call words it alike.
#[test]
fn maintenance_on_a_silent_server_ends_with_a_clear_error() {
    let hole = Fake::start(|s| {
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    // The other artifact calls (here a search) say it in the same words (they said "cannot
    // reach the server at URL: timeout: per read" before).
    for args in [
        &["artifacts", "verify"][..],
        &["artifacts", "gc"],
        &["artifacts", "cleanup", "--dry-run"],
        &["artifacts", "search", "--upgrade", "u1"],
    ] {
        let (out, took) = run_bounded(&hole.url(), "1", args, Duration::from_secs(20));
        assert_cut(&out, took);
    }
    // A real server, paused: the kernel still completes the connection.
    let served = serve(&Env::new(), &[]);
    let pid = served.child.id().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let url = format!("http://127.0.0.1:{}", served.port);
    let result = std::panic::catch_unwind(|| {
        run_bounded(&url, "1", &["artifacts", "verify"], Duration::from_secs(20))
    });
    signal("-CONT");
    let (out, took) = result.unwrap();
    assert_cut(&out, took);
}

/// A fake maintenance answer: `200` in progress lines, a `{"working": n}` line every `every`,
/// `lines` of them, then `last` (none: the server goes quiet and holds the connection).
fn answer_in_lines(s: TcpStream, every: Duration, lines: u32, last: Option<&str>) {
    let mut s = s;
    let mut head = [0u8; 4096];
    // The request is small: its head and body come in the first reads.
    let _ = std::io::Read::read(&mut s, &mut head);
    let _ = s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
    );
    for i in 0..lines {
        std::thread::sleep(every);
        if s.write_all(format!("{{\"working\":{i}}}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
    match last {
        Some(last) => {
            let _ = s.write_all(format!("{last}\n").as_bytes());
        }
        None => std::thread::sleep(Duration::from_secs(30)),
    }
}

/// TR8: a server at work that sends a progress line every 0.3 s is waited for past several
/// idle limits (1 s) and its result printed; one that goes quiet after a line is cut with the
/// clear error; an error line is the server's error, as a plain answer would be.
#[test]
fn maintenance_waits_for_a_server_that_sends_progress_lines() {
    let verify = serde_json::json!({
        "blobs_checked": 3,
        "bytes_checked": 12345,
        "artifacts_checked": 4,
        "corrupt": [],
        "missing": [],
    });
    let ok = serde_json::json!({ "ok": verify }).to_string();
    let working = Fake::start(move |s| {
        answer_in_lines(s, Duration::from_millis(300), 10, Some(&ok));
    });
    let (out, took) = run_bounded(
        &working.url(),
        "1",
        &["-o", "json", "artifacts", "verify"],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, verify);
    let quiet = Fake::start(|s| answer_in_lines(s, Duration::from_millis(100), 2, None));
    let (out, took) = run_bounded(
        &quiet.url(),
        "1",
        &["artifacts", "verify"],
        Duration::from_secs(20),
    );
    assert_cut(&out, took);
    let failing = Fake::start(|s| {
        answer_in_lines(
            s,
            Duration::from_millis(100),
            2,
            Some(
                r#"{"status":422,"error":{"code":"invalid_input","message":"the server has no S3 bucket configured"}}"#,
            ),
        )
    });
    let (out, _) = run_bounded(
        &failing.url(),
        "1",
        &["artifacts", "verify"],
        Duration::from_secs(20),
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("the server has no S3 bucket configured"), "{e}");
}
