//! Who delivers notifications, as the README says: `apply`, `watch` and `serve` deliver in the
//! background while they run (no flush, no exit needed); a webhook is only ever shown as
//! `webhook:HOST#xxxxxx`.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use crate::util::{Env, http, serve, wait_for_body, webhook_receiver, webhook_receiver_on};

#[test]
fn apply_delivers_while_it_runs() {
    let env = Env::with_task();
    let (url, got) = webhook_receiver();
    let mut child = KillOnDrop(
        env.command()
            .env("EUA_WEBHOOK_URL", &url)
            .args(["progress", "apply"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    let mut acks = BufReader::new(child.0.stdout.take().unwrap()).lines();
    writeln!(
        stdin,
        r#"{{"op":"task.start","upgrade_id":"u","task_id":"t","message":"go"}}"#
    )
    .unwrap();
    let ack = acks.next().unwrap().unwrap();
    assert!(ack.contains("\"ok\":true"), "{ack}");
    // stdin stays open: the process is still running when the notification arrives.
    wait_for_body(&got, "task.started");
    assert!(child.0.try_wait().unwrap().is_none(), "apply ended early");
    drop(stdin);
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn watch_delivers_what_other_processes_left_pending() {
    let env = Env::with_task();
    // The sink is down when the change is made: the one attempt fails, the entry stays.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/hook");
    let out = env
        .command()
        .env("EUA_WEBHOOK_URL", &url)
        .args(["progress", "task", "start", "u", "t"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not delivered yet"), "{err}");
    // The sink is back; `watch` (which only reads the upgrade) delivers it while it runs.
    let (_, got) = webhook_receiver_on(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let mut watch = KillOnDrop(
        env.command()
            .env("EUA_WEBHOOK_URL", &url)
            .args(["progress", "watch", "u"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_body(&got, "task.started");
    assert!(watch.0.try_wait().unwrap().is_none(), "watch ended early");
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_delivers_api_writes_without_a_flush() {
    let env = Env::with_task();
    let (url, got) = webhook_receiver();
    let served = serve(&env, &[("EUA_WEBHOOK_URL", &url)]);
    let body = r#"{"message":"from the API"}"#;
    let resp = http(
        served.port,
        &format!(
            "POST /api/v1/upgrades/u/tasks/t/start HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    wait_for_body(&got, "task.started");
}

#[test]
fn a_webhook_is_shown_only_by_its_host_and_a_hash() {
    let env = Env::with_task();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    // Down, with credentials, a secret path and a token in the query.
    let url = format!("http://alice:hunter2@127.0.0.1:{port}/private/T0KEN-PATH?token=s3cr3t");
    let secrets = ["alice", "hunter2", "private", "T0KEN-PATH", "s3cr3t"];
    let label_prefix = format!("webhook:127.0.0.1:{port}#");
    // The one-shot command's delivery attempt fails; its stderr, with the library's logs at
    // their most verbose (-vvv), holds none of the secrets either.
    let out = env
        .command()
        .env("EUA_WEBHOOK_URL", &url)
        .args(["-vvv", "progress", "task", "start", "u", "t"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not delivered yet"), "{stderr}");
    assert!(stderr.contains("DEBUG"), "the library logs: {stderr}");
    for s in secrets {
        assert!(!stderr.contains(s), "{s:?} shown on stderr: {stderr}");
    }
    let status = env
        .command()
        .env("EUA_WEBHOOK_URL", &url)
        .args(["notify", "status"])
        .output()
        .unwrap();
    let status_json = env
        .command()
        .env("EUA_WEBHOOK_URL", &url)
        .args(["-o", "json", "notify", "status"])
        .output()
        .unwrap();
    // The table shows the last error, which names the sink.
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(table.contains("Connection refused"), "{table}");
    for text in [
        table,
        String::from_utf8_lossy(&status_json.stdout).into_owned(),
    ] {
        assert!(text.contains(&label_prefix), "no label in {text}");
        for s in secrets {
            assert!(!text.contains(s), "{s:?} shown in {text}");
        }
    }
}

#[test]
fn the_webhook_format_flag_sends_cloudevents() {
    let env = Env::with_task();
    let (url, got) = webhook_receiver();
    let out = env
        .command()
        .args(["--webhook-url", &url, "--webhook-format", "cloudevents"])
        .args(["progress", "task", "start", "u", "t"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for_body(&got, "task.started");
    let body = got.lock().unwrap()[0].clone();
    assert!(body.contains("\"specversion\":\"1.0\""), "{body}");
}
