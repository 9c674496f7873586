//! The remote CLI: `--server URL --token T` makes `progress` and `artifacts` commands talk to a
//! served data dir. The same commands run locally and remotely print the same JSON (volatile
//! fields aside) and fail with the same messages; nothing is written to the local data dir.

use serde_json::Value;

use crate::util::{Env, serve};

const WRITE: &str = "remote-cli-write-token-01";
const READ: &str = "remote-cli-read-token-001";

/// `args` with `--server URL --token TOKEN` in front.
fn on<'a>(url: &'a str, token: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--server", url, "--token", token];
    a.extend_from_slice(args);
    a
}

/// Drops fields that differ between two runs (times, generated ids).
fn stable(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for k in [
                    "timestamp",
                    "created_at",
                    "started_at",
                    "completed_at",
                    "duration",
                    "estimated_completion",
                    "event_id",
                    "session_id",
                    "collection_id",
                    "artifact_id",
                    "uploaded_at",
                    "name_of_session",
                    "expires_at",
                ] {
                    m.remove(k);
                }
                if m.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.starts_with("upgrade-u1-"))
                {
                    m.remove("name"); // default session names carry the time
                }
                m.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

#[test]
fn remote_commands_match_local_ones() {
    let server_env = Env::new();
    let served = serve(
        &server_env,
        &[("EUA_TOKENS", &format!("{WRITE}:write,{READ}:read"))],
    );
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let local = Env::new();
    let both = |args: &[&str]| -> Value {
        let l = local.json(args);
        let r = client.json(&on(&url, WRITE, args));
        assert_eq!(stable(l.clone()), stable(r.clone()), "{args:?}");
        r
    };
    both(&[
        "progress",
        "upgrade",
        "create",
        "u1",
        "--plan",
        "p1",
        "--cluster",
        "prod",
        "--meta",
        "to=1.30",
    ]);
    both(&["progress", "upgrade", "start", "u1", "--phase", "nodes"]);
    both(&[
        "progress",
        "task",
        "add",
        "u1",
        "ng",
        "--name",
        "Node groups",
        "--type",
        "upgrade_step",
        "--total-steps",
        "4",
    ]);
    both(&[
        "progress",
        "task",
        "add",
        "u1",
        "ng-1",
        "--name",
        "ng-1",
        "--type",
        "upgrade_step",
        "--parent",
        "ng",
    ]);
    both(&[
        "progress",
        "task",
        "update",
        "u1",
        "ng-1",
        "--percent",
        "40",
        "-m",
        "draining",
        "--detail",
        "pods=3",
    ]);
    both(&[
        "progress",
        "task",
        "step",
        "u1",
        "ng",
        "--completed",
        "1",
        "--name",
        "drain",
    ]);
    both(&["progress", "task", "complete", "u1", "ng-1"]);
    both(&["progress", "task", "show", "u1", "ng-1"]);
    both(&["progress", "upgrade", "show", "u1"]);
    both(&["progress", "upgrade", "list"]);
    both(&["progress", "events", "u1", "--since", "2"]);

    // Errors: the same message and exit code.
    for args in [
        vec![
            "progress",
            "task",
            "update",
            "u1",
            "ng-1",
            "--percent",
            "50",
        ],
        vec!["progress", "task", "show", "u1", "nope"],
        vec![
            "progress",
            "upgrade",
            "create",
            "u1",
            "--plan",
            "p",
            "--cluster",
            "c",
        ],
    ] {
        let l = local.fails(1, &args);
        let r = client.fails(1, &on(&url, WRITE, &args));
        assert_eq!(l, r, "{args:?}");
    }

    // Artifacts.
    let files = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(files.path().join("logs/node")).unwrap();
    std::fs::write(
        files.path().join("logs/node/kubelet.log"),
        "kubelet\n".repeat(5000),
    )
    .unwrap();
    std::fs::write(files.path().join("logs/app.log"), "app started\n").unwrap();
    let logs = files.path().join("logs");
    let logs = logs.to_str().unwrap();
    let ids = |v: &Value, k: &str| v[k].as_str().unwrap().to_owned();
    let ls = local.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "prod",
    ]);
    let rs = client.json(&on(
        &url,
        WRITE,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "prod",
        ],
    ));
    assert_eq!(stable(ls.clone()), stable(rs.clone()));
    let (ls, rs) = (ids(&ls, "session_id"), ids(&rs, "session_id"));
    let lc = local.json(&["artifacts", "collection", "create", &ls, "--name", "logs"]);
    let rc = client.json(&on(
        &url,
        WRITE,
        &["artifacts", "collection", "create", &rs, "--name", "logs"],
    ));
    let (lc, rc) = (ids(&lc, "collection_id"), ids(&rc, "collection_id"));
    let la = local.json(&[
        "artifacts",
        "add",
        &ls,
        &lc,
        logs,
        "--tag",
        "node",
        "--type",
        "log_file",
        "--meta",
        "k=v",
    ]);
    let ra = client.json(&on(
        &url,
        WRITE,
        &[
            "artifacts",
            "add",
            &rs,
            &rc,
            logs,
            "--tag",
            "node",
            "--type",
            "log_file",
            "--meta",
            "k=v",
        ],
    ));
    assert_eq!(stable(la.clone()), stable(ra.clone()));
    assert_eq!(ra.as_array().unwrap().len(), 2);
    let search = [
        "artifacts",
        "search",
        "--tag",
        "node",
        "--name",
        "kubelet",
        "--min-size",
        "1KiB",
        "--since",
        "1h",
    ];
    assert_eq!(
        stable(local.json(&search)),
        stable(client.json(&on(&url, WRITE, &search)))
    );
    let stats = ["artifacts", "stats"];
    assert_eq!(
        stable(local.json(&stats)),
        stable(client.json(&on(&url, WRITE, &stats)))
    );
    // Export: the same tree of verified files.
    let (lx, rx) = (
        files.path().join("local-export"),
        files.path().join("remote-export"),
    );
    local.ok(&["artifacts", "export", &ls, lx.to_str().unwrap()]);
    client.ok(&on(
        &url,
        WRITE,
        &["artifacts", "export", &rs, rx.to_str().unwrap()],
    ));
    let tree = |root: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    out.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    };
    let exported = tree(&rx);
    assert_eq!(
        exported.len(),
        2,
        "{:?}",
        exported.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert_eq!(tree(&lx), exported);
    // Maintenance runs on the server's data dir and reports the same as on a local one.
    for args in [
        vec!["artifacts", "verify"],
        vec!["artifacts", "gc"],
        vec![
            "artifacts",
            "cleanup",
            "--dry-run",
            "--as-of",
            "2099-01-01T00:00:00Z",
        ],
    ] {
        let l = local.json(&args);
        let r = client.json(&on(&url, WRITE, &args));
        assert_eq!(stable(l), stable(r), "{args:?}");
    }
    let v = client.json(&on(&url, WRITE, &["artifacts", "verify"]));
    assert_eq!(v["artifacts_checked"], 2, "{v}");
    let e = client.fails(1, &on(&url, WRITE, &["artifacts", "upload", "--all"]));
    assert!(e.contains("the server has no S3 bucket configured"), "{e}");
    // Verified download.
    let kubelet = ra
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "node/kubelet.log")
        .unwrap();
    let out = files.path().join("got.log");
    client.ok(&on(
        &url,
        WRITE,
        &[
            "artifacts",
            "get",
            kubelet["artifact_id"].as_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "kubelet\n".repeat(5000)
    );
    let del = client.json(&on(
        &url,
        WRITE,
        &[
            "artifacts",
            "delete",
            kubelet["artifact_id"].as_str().unwrap(),
        ],
    ));
    assert_eq!(del["status"], "deleted");
    // Tokens: a read token reads but does not write; nothing local was ever created.
    client.json(&on(&url, READ, &["progress", "upgrade", "show", "u1"]));
    let e = client.fails(
        1,
        &on(&url, READ, &["progress", "task", "start", "u1", "ng"]),
    );
    assert!(e.contains("may only read"), "{e}");
    let e = client.fails(1, &["--server", &url, "progress", "upgrade", "list"]);
    assert!(e.contains("missing token"), "{e}");
    let e = client.fails(
        1,
        &[
            "--server",
            "http://127.0.0.1:9",
            "--token",
            WRITE,
            "progress",
            "upgrade",
            "list",
        ],
    );
    assert!(
        e.contains("cannot reach the server at http://127.0.0.1:9"),
        "{e}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(client.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers.iter().all(|n| n == "config-home"),
        "the client's data dir stays empty: {leftovers:?}"
    );
}

/// A TCP proxy to `port` that replaces `from` with `to` (same length) in what the server
/// sends back: content corrupted on the wire, headers and framing intact.
fn tampering_proxy(port: u16, from: &'static [u8], to: &'static [u8]) -> String {
    use std::io::{Read, Write};
    assert_eq!(from.len(), to.len());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let mut server = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    if let Some(i) = chunk.windows(from.len()).position(|w| w == from) {
                        chunk[i..i + from.len()].copy_from_slice(to);
                    }
                    if client.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    url
}

/// Downloads through `--server` are verified on arrival: bytes changed on the way make `get`
/// fail naming the corruption, and leave no output file.
#[test]
fn remote_downloads_are_verified_on_arrival() {
    let env = Env::new();
    let served = serve(&env, &[("EUA_TOKENS", &format!("{WRITE}:write"))]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let s = client.json(&on(
        &url,
        WRITE,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "c",
        ],
    ));
    let s = s["session_id"].as_str().unwrap().to_owned();
    let c = client.json(&on(
        &url,
        WRITE,
        &["artifacts", "collection", "create", &s, "--name", "logs"],
    ));
    let c = c["collection_id"].as_str().unwrap().to_owned();
    let file = client.data_dir().join("k.log");
    std::fs::write(&file, "kubelet says MARKER-AAAA and more\n").unwrap();
    let added = client.json(&on(
        &url,
        WRITE,
        &["artifacts", "add", &s, &c, file.to_str().unwrap()],
    ));
    let id = added[0]["artifact_id"].as_str().unwrap().to_owned();
    // Straight from the server: intact.
    let good = client.data_dir().join("good.log");
    client.ok(&on(
        &url,
        WRITE,
        &["artifacts", "get", &id, "--out", good.to_str().unwrap()],
    ));
    assert_eq!(
        std::fs::read_to_string(&good).unwrap(),
        "kubelet says MARKER-AAAA and more\n"
    );
    // Through a proxy that changes four bytes of the content.
    let bad_url = tampering_proxy(served.port, b"MARKER-AAAA", b"MARKER-BBBB");
    let bad = client.data_dir().join("bad.log");
    let err = client.fails(
        1,
        &on(
            &bad_url,
            WRITE,
            &["artifacts", "get", &id, "--out", bad.to_str().unwrap()],
        ),
    );
    assert!(
        err.to_lowercase().contains("corrupt") || err.contains("digest"),
        "{err}"
    );
    assert!(!bad.exists(), "no file is left for corrupt content");
}

/// TR9: the files of one `artifacts add --server` go over one connection while the server
/// keeps it open (keep-alive): counted by a proxy in front of `serve`, 6 files take at most 2
/// connections (one for the uploads, one for the other calls); every request of a streamed
/// upload opened a connection of its own before.
#[test]
fn the_files_of_one_add_share_a_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = Env::new();
    let served = serve(&env, &[("EUA_TOKENS", &format!("{WRITE}:write"))]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let s = client.json(&on(
        &url,
        WRITE,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "c",
        ],
    ));
    let s = s["session_id"].as_str().unwrap().to_owned();
    let c = client.json(&on(
        &url,
        WRITE,
        &["artifacts", "collection", "create", &s, "--name", "logs"],
    ));
    let c = c["collection_id"].as_str().unwrap().to_owned();
    // A proxy that counts the connections it is given.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://127.0.0.1:{}", proxy.local_addr().unwrap().port());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let port = served.port;
    std::thread::spawn(move || {
        for conn in proxy.incoming() {
            let Ok(down) = conn else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut d2, &mut u2);
                let _ = u2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut up, mut down) = (up, down);
                let _ = std::io::copy(&mut up, &mut down);
                let _ = down.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let files: Vec<String> = (0..6)
        .map(|i| {
            let f = client.data_dir().join(format!("f{i}.log"));
            std::fs::write(&f, format!("file {i}\n").repeat(1000)).unwrap();
            f.to_str().unwrap().to_owned()
        })
        .collect();
    let mut args = vec!["artifacts", "add", &s, &c];
    args.extend(files.iter().map(String::as_str));
    let added = client.json(&on(&proxy_url, WRITE, &args));
    assert_eq!(added.as_array().unwrap().len(), 6, "{added}");
    let n = accepted.load(Ordering::SeqCst);
    assert!(n <= 2, "{n} connections for 6 files");
}

/// TR11: the CLI's `EUA_ALLOW_PLAIN_HTTP` end to end. `http://0.0.0.0:PORT` is not a loopback
/// URL to the rule (only `localhost`, 127.0.0.0/8 and `::1` are), yet on Linux it reaches the
/// server listening on 127.0.0.1, so no packet leaves the machine: a token over it is refused
/// (nothing sent), and sent with `EUA_ALLOW_PLAIN_HTTP=1`; a value other than 1/0 is refused.
#[test]
fn a_token_over_plain_http_beyond_loopback_needs_the_opt_out() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = env.command();
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--allowed-host", &format!("0.0.0.0:{port}")])
        .env("EUA_TOKENS", format!("{WRITE}:write"))
        .stderr(std::process::Stdio::null());
    let _served = crate::util::Served {
        child: cmd.spawn().unwrap(),
        port,
    };
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Refused before anything is sent: a listener behind the refused URL is never called.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("http://0.0.0.0:{}", trap.local_addr().unwrap().port());
    let client = Env::new();
    let e = client.fails(1, &on(&trap_url, WRITE, &["progress", "upgrade", "list"]));
    assert!(e.contains("refusing to send the token (EUA_TOKEN)"), "{e}");
    assert!(
        trap.accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused request connected"
    );
    let url = format!("http://0.0.0.0:{port}");
    let args = on(&url, WRITE, &["progress", "upgrade", "list"]);
    let e = client.fails(1, &args);
    assert!(
        e.contains("refusing to send the token (EUA_TOKEN)")
            && e.contains("use https://")
            && e.contains("EUA_ALLOW_PLAIN_HTTP=1"),
        "{e}"
    );
    let run = |value: &str| {
        client
            .command()
            .env("EUA_ALLOW_PLAIN_HTTP", value)
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run("1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("0");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to send the token"));
    let out = run("yes");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("EUA_ALLOW_PLAIN_HTTP must be 1 or 0"), "{e}");
}
