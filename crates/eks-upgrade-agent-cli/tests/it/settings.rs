//! Where settings come from, as the README states it: flags, then `EUA_*` variables, then the
//! configuration file (`--config`, `EUA_CONFIG`, or the default location), then defaults. Each
//! test sets a value in one place only, or in two places that disagree, and checks which one is
//! used.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::util::{BIN, Env, http, serve};

/// The binary with no `--data-dir` flag and a hermetic environment: no `EUA_*` variable, the
/// default configuration file looked up under `home`.
fn bare(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("EUA_") {
            c.env_remove(k);
        }
    }
    c.env("XDG_CONFIG_HOME", home.join("config-home"))
        .env("XDG_DATA_HOME", home.join("data-home"))
        .env("HOME", home)
        .stdin(Stdio::null());
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The upgrade ids stored in `data_dir` (read with an explicit `--data-dir`).
fn upgrades_in(data_dir: &Path) -> Vec<String> {
    let home = tempfile::tempdir().unwrap();
    let mut c = bare(home.path());
    c.args(["--data-dir", data_dir.to_str().unwrap(), "-o", "json"])
        .args(["progress", "upgrade", "list"]);
    if !data_dir.join("eks-upgrade-agent.sqlite3").exists() {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&ok(c)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|u| u["upgrade_id"].as_str().unwrap().to_owned())
        .collect()
}

fn create(mut c: Command, id: &str) -> String {
    c.args(["progress", "upgrade", "create", id, "--plan", "p"])
        .args(["--cluster", "c"]);
    ok(c)
}

#[test]
fn data_dir_and_output_come_from_the_environment() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("from-env");
    let mut c = bare(home.path());
    c.env("EUA_DATA_DIR", &dir).env("EUA_OUTPUT", "json");
    let out = create(c, "u-env");
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("EUA_OUTPUT=json did not give JSON ({e}): {out}"));
    assert_eq!(v["upgrade_id"], "u-env", "{v}");
    assert_eq!(upgrades_in(&dir), ["u-env"]);
    // The flag wins over the variable.
    let flag_dir = home.path().join("from-flag");
    let mut c = bare(home.path());
    c.env("EUA_DATA_DIR", &dir)
        .args(["--data-dir", flag_dir.to_str().unwrap()]);
    let out = create(c, "u-flag");
    assert!(
        serde_json::from_str::<Value>(&out).is_err(),
        "table by default: {out}"
    );
    assert_eq!(upgrades_in(&flag_dir), ["u-flag"]);
    assert_eq!(upgrades_in(&dir), ["u-env"]);
    // Neither: $XDG_DATA_HOME/eks-upgrade-agent.
    create(bare(home.path()), "u-default");
    assert_eq!(
        upgrades_in(&home.path().join("data-home/eks-upgrade-agent")),
        ["u-default"]
    );
}

#[test]
fn the_configuration_file_is_found_and_variables_and_flags_win_over_it() {
    let home = tempfile::tempdir().unwrap();
    let write = |path: &Path, dir: &str| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            format!("data_dir = {:?}\n", home.path().join(dir).to_str().unwrap()),
        )
        .unwrap();
    };
    // The default location: $XDG_CONFIG_HOME/eks-upgrade-agent/config.toml.
    write(
        &home
            .path()
            .join("config-home/eks-upgrade-agent/config.toml"),
        "default-file",
    );
    create(bare(home.path()), "u1");
    assert_eq!(upgrades_in(&home.path().join("default-file")), ["u1"]);
    // EUA_CONFIG names another file, which replaces the default one.
    let named = home.path().join("named.toml");
    write(&named, "named-file");
    let mut c = bare(home.path());
    c.env("EUA_CONFIG", &named);
    create(c, "u2");
    assert_eq!(upgrades_in(&home.path().join("named-file")), ["u2"]);
    // An EUA_* variable wins over the file.
    let mut c = bare(home.path());
    c.env("EUA_CONFIG", &named)
        .env("EUA_DATA_DIR", home.path().join("variable"));
    create(c, "u3");
    assert_eq!(upgrades_in(&home.path().join("variable")), ["u3"]);
    assert_eq!(upgrades_in(&home.path().join("named-file")), ["u2"]);
    // A named file that does not exist is an error, not a silent default.
    let mut c = bare(home.path());
    c.env("EUA_CONFIG", home.path().join("missing.toml"))
        .args(["progress", "upgrade", "list"]);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the configuration file") && err.contains("missing.toml"),
        "{err}"
    );
}

#[test]
fn export_without_out_writes_the_reference_file_name_in_the_working_directory() {
    let env = Env::with_task();
    let cwd = tempfile::tempdir().unwrap();
    let out = env
        .command()
        .current_dir(cwd.path())
        .args(["progress", "export", "u"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = cwd.path().join("upgrade_u.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(v["upgrade_id"], "u");
    assert!(v["tasks"]["t"].is_object(), "{v}");
}

/// GET /api/v1/upgrades with a bearer token; returns the status line.
fn status_with(port: u16, host: &str, token: &str) -> String {
    let resp = http(
        port,
        &format!(
            "GET /api/v1/upgrades HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    );
    resp.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn serve_takes_tokens_from_flags_then_the_environment_then_the_file() {
    const FILE: &str = "token-from-the-config-file";
    const ENV: &str = "token-from-the-environment";
    const FLAG: &str = "token-from-the-command-line";
    let env = Env::with_task();
    let config = env.dir.path().join("config.toml");
    std::fs::write(&config, format!("tokens = [\"{FILE}:read\"]\n")).unwrap();
    let config = config.to_str().unwrap();

    // Only the file: its token is the one accepted.
    let served = serve(&env, &[("EUA_CONFIG", config)]);
    assert!(status_with(served.port, "127.0.0.1", FILE).contains(" 200 "));
    assert!(status_with(served.port, "127.0.0.1", ENV).contains(" 401 "));
    drop(served);

    // The variable replaces the file.
    let served = serve(
        &env,
        &[
            ("EUA_CONFIG", config),
            ("EUA_TOKENS", &format!("{ENV}:read")),
        ],
    );
    assert!(status_with(served.port, "127.0.0.1", ENV).contains(" 200 "));
    assert!(status_with(served.port, "127.0.0.1", FILE).contains(" 401 "));
    drop(served);

    // The flag replaces both.
    let port = free_port();
    let mut c = env.command();
    c.env("EUA_CONFIG", config)
        .env("EUA_TOKENS", format!("{ENV}:read"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--token", &format!("{FLAG}:read")])
        .stderr(Stdio::null());
    let served = crate::util::Served {
        child: c.spawn().unwrap(),
        port,
    };
    wait_listening(port);
    assert!(status_with(served.port, "127.0.0.1", FLAG).contains(" 200 "));
    for other in [ENV, FILE] {
        assert!(status_with(served.port, "127.0.0.1", other).contains(" 401 "));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// POST a new upgrade with `origin`; returns the status code.
fn post_with_origin(port: u16, host: &str, origin: &str, id: &str) -> u16 {
    let body = format!(r#"{{"upgrade_id":"{id}","plan_id":"p","cluster_name":"c"}}"#);
    let resp = http(
        port,
        &format!(
            "POST /api/v1/upgrades HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    resp[9..12].parse().unwrap()
}

fn get_status(port: u16, host: &str) -> u16 {
    let resp = http(
        port,
        &format!("GET /api/v1/upgrades HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    resp[9..12].parse().unwrap()
}

#[test]
fn serve_takes_its_names_and_origins_from_the_file_and_the_environment() {
    let env = Env::with_task();
    // From the configuration file.
    let config = env.dir.path().join("config.toml");
    std::fs::write(
        &config,
        "public_urls = [\"https://eua.example.com\"]\n\
         allowed_hosts = [\"upgrade-box:8080\"]\n\
         allowed_origins = [\"https://tools.example.com\"]\n",
    )
    .unwrap();
    let served = serve(&env, &[("EUA_CONFIG", config.to_str().unwrap())]);
    let p = served.port;
    assert_eq!(get_status(p, "eua.example.com"), 200);
    assert_eq!(get_status(p, "upgrade-box:8080"), 200);
    assert_eq!(get_status(p, "other-box:8080"), 403);
    assert_eq!(
        post_with_origin(p, "127.0.0.1", "https://eua.example.com", "a"),
        201
    );
    assert_eq!(
        post_with_origin(p, "127.0.0.1", "https://tools.example.com", "b"),
        201
    );
    assert_eq!(
        post_with_origin(p, "127.0.0.1", "https://evil.example", "c"),
        403
    );
    drop(served);
    // From the environment (comma-separated lists).
    let served = serve(
        &env,
        &[
            ("EUA_ALLOWED_HOSTS", "box-a:1,box-b:2"),
            (
                "EUA_ALLOWED_ORIGINS",
                "https://one.example,https://two.example",
            ),
        ],
    );
    let p = served.port;
    for host in ["box-a:1", "box-b:2"] {
        assert_eq!(get_status(p, host), 200, "{host}");
    }
    assert_eq!(get_status(p, "eua.example.com"), 403);
    for (i, origin) in ["https://one.example", "https://two.example"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            post_with_origin(p, "127.0.0.1", origin, &format!("e{i}")),
            201
        );
    }
    assert_eq!(
        post_with_origin(p, "127.0.0.1", "https://tools.example.com", "f"),
        403
    );
}

/// Several tokens at once: `--token` repeated, and `EUA_TOKENS` comma-separated; a read token
/// is refused on the maintenance routes (they change things), a write token is not.
#[test]
fn several_tokens_from_the_flag_and_the_environment_with_their_roles() {
    const R: &str = "a-read-token-for-tests-1";
    const W: &str = "a-write-token-for-tests-1";
    let env = Env::with_task();
    let served = serve(&env, &[("EUA_TOKENS", &format!("{R}:read,{W}:write"))]);
    let post = |port: u16, token: &str| {
        let resp = http(
            port,
            &format!(
                "POST /api/v1/maintenance/verify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        resp[9..12].parse::<u16>().unwrap()
    };
    assert!(status_with(served.port, "127.0.0.1", R).contains(" 200 "));
    assert!(status_with(served.port, "127.0.0.1", W).contains(" 200 "));
    assert_eq!(
        post(served.port, R),
        403,
        "a read token may not run maintenance"
    );
    assert_eq!(post(served.port, W), 200);
    drop(served);

    let port = free_port();
    let mut c = env.command();
    c.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--token",
            &format!("{R}:read"),
            "--token",
            &format!("{W}:write"),
        ])
        .stderr(Stdio::null());
    let served = crate::util::Served {
        child: c.spawn().unwrap(),
        port,
    };
    wait_listening(port);
    assert!(status_with(served.port, "127.0.0.1", R).contains(" 200 "));
    assert!(status_with(served.port, "127.0.0.1", W).contains(" 200 "));
    assert_eq!(post(served.port, R), 403);
    assert_eq!(post(served.port, W), 200);
}

/// `EUA_SERVER` and `EUA_TOKEN` stand in for `--server` and `--token`: the CLI reads and writes
/// through the server, not the data dir it was given.
#[test]
fn server_and_token_come_from_the_environment() {
    const W: &str = "a-write-token-for-tests-2";
    let served_env = Env::with_task();
    let served = serve(&served_env, &[("EUA_TOKENS", &format!("{W}:write"))]);
    let elsewhere = Env::new();
    let url = format!("http://127.0.0.1:{}", served.port);
    let out = elsewhere
        .command()
        .env("EUA_SERVER", &url)
        .env("EUA_TOKEN", W)
        .args([
            "-o",
            "json",
            "progress",
            "task",
            "update",
            "u",
            "t",
            "--percent",
            "25",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = served_env.json(&["progress", "task", "show", "u", "t"]);
    assert_eq!(shown["percentage"], 25.0, "{shown}");
    assert!(
        !elsewhere
            .data_dir()
            .join("eks-upgrade-agent.sqlite3")
            .exists(),
        "the local data dir was used"
    );
    // Without the token: refused by the server, said clearly.
    let out = elsewhere
        .command()
        .env("EUA_SERVER", &url)
        .args(["progress", "upgrade", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") || err.contains("token"), "{err}");
}

/// Without `XDG_CONFIG_HOME`, the default configuration file is
/// `~/.config/eks-upgrade-agent/config.toml`.
#[test]
fn without_xdg_config_home_the_file_is_under_dot_config() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join(".config/eks-upgrade-agent/config.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let dir = home.path().join("from-dot-config");
    std::fs::write(&file, format!("data_dir = {:?}\n", dir.to_str().unwrap())).unwrap();
    let mut c = bare(home.path());
    c.env_remove("XDG_CONFIG_HOME");
    create(c, "u1");
    assert_eq!(upgrades_in(&dir), ["u1"]);
    // With XDG_CONFIG_HOME set (to a folder without the file), that file is not read.
    create(bare(home.path()), "u2");
    assert_eq!(upgrades_in(&dir), ["u1"]);
    assert_eq!(
        upgrades_in(&home.path().join("data-home/eks-upgrade-agent")),
        ["u2"]
    );
}

/// `EUA_MAX_CONNECTIONS` reaches the server: with a cap of 1, a kept-alive connection holds
/// the only slot and a second client is answered only once it closes.
#[test]
fn the_connection_cap_comes_from_the_variable() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let env = Env::new();
    let served = serve(&env, &[("EUA_MAX_CONNECTIONS", "1")]);
    let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let answered = |s: &mut std::net::TcpStream, wait: Duration| -> bool {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 12];
        matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    };
    // The probe connection of `serve` may still hold the slot for a moment.
    let mut first = std::net::TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    first.write_all(request.as_bytes()).unwrap();
    assert!(answered(&mut first, Duration::from_secs(10)));
    let mut second = std::net::TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    second.write_all(request.as_bytes()).unwrap();
    assert!(
        !answered(&mut second, Duration::from_millis(700)),
        "a second connection is served while the first holds the only slot"
    );
    drop(first);
    assert!(
        answered(&mut second, Duration::from_secs(10)),
        "the second connection is served once the first closes"
    );
}

/// ARCHITECTURE "conn.rs": every accepted connection gets `TCP_NODELAY` (small responses and
/// stream frames leave at once instead of waiting on the client's delayed ACK). Seen with
/// strace attached to a running `serve`: a `setsockopt(..., TCP_NODELAY, [1], ...)` per
/// accepted connection. (strace attaches to the server rather than starting it, so killing
/// the server is killing the process the test started.)
#[test]
fn serve_sets_tcp_nodelay_on_every_connection() {
    use std::io::BufRead;
    let env = Env::new();
    let served = serve(&env, &[]);
    let trace = env.dir.path().join("strace.out");
    let mut strace = Command::new("strace")
        .args(["-f", "-e", "trace=setsockopt", "-o"])
        .arg(&trace)
        .args(["-p", &served.child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run strace ({e}): scripts/test installs it (apt-get install strace)")
        });
    // strace says on stderr when it has attached (to each thread).
    let mut err = std::io::BufReader::new(strace.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("attached"), "strace: {line}");
    for _ in 0..3 {
        let got = http(
            served.port,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }
    drop(served);
    let _ = strace.kill();
    strace.wait().unwrap();
    let text = std::fs::read_to_string(&trace).unwrap();
    let nodelay = text
        .lines()
        .filter(|l| l.contains("TCP_NODELAY, [1]"))
        .count();
    assert!(nodelay >= 3, "{nodelay} TCP_NODELAY calls:\n{text}");
}
