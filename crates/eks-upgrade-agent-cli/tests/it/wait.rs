//! `progress wait` and `progress watch --exit-status`: the exit code tells the outcome (0 the
//! condition was reached, 3 the upgrade ended otherwise, 4 timed out), and both follow writes by
//! other processes, locally and through `--server`.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Env, serve};

/// Starts `args` in the background (output piped).
fn spawn(env: &Env, args: &[&str]) -> Child {
    env.command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Asserts the child is still waiting (has not exited), then lets it run.
fn still_waiting(child: &mut Child) {
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before the upgrade changed"
    );
}

/// The child's exit code and output, killing it after 20 s (so a hang fails, never blocks).
fn finish(mut child: Child) -> (i32, String, String) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn started() -> Env {
    let env = Env::with_task();
    env.ok(&["progress", "upgrade", "start", "u", "--phase", "planning"]);
    env
}

#[test]
fn wait_exits_0_when_another_process_completes_the_upgrade() {
    let env = started();
    let mut child = spawn(&env, &["progress", "wait", "u", "--interval-ms", "20"]);
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "complete", "u"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("upgrade u: completed"), "{out}");
}

#[test]
fn wait_exits_3_when_the_upgrade_fails_instead() {
    let env = started();
    let mut child = spawn(&env, &["progress", "wait", "u", "--interval-ms", "20"]);
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "fail", "u", "--error", "nodes stuck"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains("upgrade u failed without reaching completed: nodes stuck"),
        "{err}"
    );
    // An ended upgrade answers at once, with the same code.
    env.fails(3, &["progress", "wait", "u", "--for", "phase=validation"]);
}

#[test]
fn wait_exits_4_on_timeout_and_says_where_the_upgrade_is() {
    let env = started();
    let start = Instant::now();
    let err = env.fails(4, &["progress", "wait", "u", "--timeout", "1s"]);
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains(
            "timed out after 1.0s: upgrade u is in_progress, phase planning, not yet completed"
        ),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(
        &env.run(&["-o", "json", "progress", "wait", "u", "--timeout", "1s"])
            .stdout,
    )
    .unwrap();
    assert_eq!(v["outcome"], "timeout");
    assert_eq!(v["summary"]["status"], "in_progress");
}

#[test]
fn wait_for_started_and_for_a_phase() {
    let env = Env::with_task();
    let mut child = spawn(
        &env,
        &[
            "progress",
            "wait",
            "u",
            "--for",
            "started",
            "--interval-ms",
            "20",
        ],
    );
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "start", "u", "--phase", "planning"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");

    let mut child = spawn(
        &env,
        &[
            "progress",
            "wait",
            "u",
            "--for",
            "phase=nodes",
            "--interval-ms",
            "20",
        ],
    );
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "phase", "u", "nodes"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("phase=nodes"), "{out}");

    // A phase entered and left before the wait began still counts; one never entered does not.
    env.ok(&["progress", "upgrade", "phase", "u", "validation"]);
    env.ok(&[
        "progress",
        "wait",
        "u",
        "--for",
        "phase=nodes",
        "--timeout",
        "5s",
    ]);
    env.ok(&["progress", "upgrade", "complete", "u"]);
    env.ok(&["progress", "wait", "u", "--for", "started"]);
    let err = env.fails(3, &["progress", "wait", "u", "--for", "phase=rollback"]);
    assert!(
        err.contains("completed without reaching phase=rollback"),
        "{err}"
    );
}

#[test]
fn wait_refuses_bad_input() {
    let env = started();
    let err = env.fails(2, &["progress", "wait", "u", "--for", "done"]);
    assert!(
        err.contains("expected completed, started or phase=NAME"),
        "{err}"
    );
    let err = env.fails(2, &["progress", "wait", "u", "--timeout", "soon"]);
    assert!(err.contains("invalid duration"), "{err}");
    let err = env.fails(1, &["progress", "wait", "nope", "--timeout", "1s"]);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn watch_exit_status_tells_the_outcome() {
    let env = started();
    let mut child = spawn(
        &env,
        &[
            "progress",
            "watch",
            "u",
            "--exit-status",
            "--interval-ms",
            "20",
        ],
    );
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "fail", "u", "--error", "boom"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 3, "{out}{err}");
    // Without --exit-status, watch exits 0 however the upgrade ended.
    env.ok(&["progress", "watch", "u"]);

    let env = started();
    let mut child = spawn(
        &env,
        &[
            "progress",
            "watch",
            "u",
            "--exit-status",
            "--interval-ms",
            "20",
        ],
    );
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "complete", "u"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
}

/// `watch --timeout` gives up when the upgrade has not ended in time (exit 4, said on stderr);
/// an upgrade that ends first keeps its `--exit-status` code.
#[test]
fn watch_timeout_exits_4_when_the_upgrade_has_not_ended() {
    let env = started();
    let start = Instant::now();
    let child = spawn(
        &env,
        &[
            "progress",
            "watch",
            "u",
            "--exit-status",
            "--timeout",
            "1s",
            "--interval-ms",
            "20",
        ],
    );
    let (code, out, err) = finish(child);
    let took = start.elapsed();
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("timed out after 1.0s: upgrade u has not ended"),
        "{err}"
    );
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // Without --exit-status too: a timeout is not a success.
    let (code, _, err) = finish(spawn(&env, &["progress", "watch", "u", "--timeout", "1s"]));
    assert_eq!(code, 4, "{err}");

    let mut child = spawn(
        &env,
        &[
            "progress",
            "watch",
            "u",
            "--exit-status",
            "--timeout",
            "30s",
            "--interval-ms",
            "20",
        ],
    );
    still_waiting(&mut child);
    env.ok(&["progress", "upgrade", "fail", "u", "--error", "boom"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 3, "{out}{err}");
    let out = env
        .command()
        .args(["progress", "watch", "u", "--timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
}

#[test]
fn wait_and_watch_follow_a_server() {
    const TOKEN: &str = "wait-test-write-token-0001";
    let server_env = started();
    let served = serve(&server_env, &[("EUA_TOKENS", &format!("{TOKEN}:write"))]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let remote = |args: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--server".into(),
            url.clone(),
            "--token".into(),
            TOKEN.into(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        a
    };
    let args = remote(&[
        "progress",
        "wait",
        "u",
        "--for",
        "phase=nodes",
        "--interval-ms",
        "20",
    ]);
    let mut wait = spawn(
        &client,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let args = remote(&[
        "progress",
        "watch",
        "u",
        "--exit-status",
        "--interval-ms",
        "20",
    ]);
    let mut watch = spawn(
        &client,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    still_waiting(&mut wait);
    assert!(watch.try_wait().unwrap().is_none());
    // Another process writes to the server.
    let other = Env::new();
    let args = remote(&["progress", "upgrade", "phase", "u", "nodes"]);
    other.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, out, err) = finish(wait);
    assert_eq!(code, 0, "{out}{err}");
    assert!(watch.try_wait().unwrap().is_none());
    let args = remote(&["progress", "upgrade", "fail", "u", "--error", "x"]);
    other.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, out, err) = finish(watch);
    assert_eq!(code, 3, "{out}{err}");
    // Nothing was written to the client's data dir.
    assert!(
        std::fs::read_dir(client.data_dir())
            .unwrap()
            .next()
            .is_none()
    );
}
