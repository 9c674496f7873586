//! Every `progress` operation through the CLI, and every bad input: a clear message naming the
//! problem, a non-zero exit, and no change to the store.

use serde_json::{Value, json};

use crate::util::{Env, http, serve, webhook_receiver};

fn setup() -> Env {
    let env = Env::new();
    env.ok(&[
        "progress",
        "upgrade",
        "create",
        "u1",
        "--plan",
        "p1",
        "--cluster",
        "prod-eu",
        "--meta",
        "from=1.29",
        "--meta",
        "to=1.30",
        "--meta-json",
        "nodes=12",
    ]);
    env.ok(&["progress", "upgrade", "start", "u1", "--phase", "planning"]);
    env.ok(&[
        "progress",
        "task",
        "add",
        "u1",
        "plan",
        "--name",
        "Plan",
        "--type",
        "upgrade_plan",
    ]);
    env.ok(&[
        "progress",
        "task",
        "add",
        "u1",
        "nodes",
        "--name",
        "Node groups",
        "--type",
        "upgrade_step",
        "--weight",
        "3",
    ]);
    env.ok(&[
        "progress",
        "task",
        "add",
        "u1",
        "ng1",
        "--name",
        "ng-1",
        "--type",
        "upgrade_step",
        "--parent",
        "nodes",
        "--total-steps",
        "4",
    ]);
    env
}

#[test]
fn every_operation_through_the_cli() {
    let env = setup();
    let v = env.json(&["progress", "task", "start", "u1", "plan", "-m", "planning"]);
    assert_eq!(v["status"], "in_progress");
    let v = env.json(&[
        "progress",
        "task",
        "update",
        "u1",
        "plan",
        "--percent",
        "50",
        "-m",
        "half",
        "--detail-json",
        "checked=3",
        "--detail",
        "az=eu-west-1a",
    ]);
    assert_eq!(v["percentage"], 50.0);
    let v = env.json(&[
        "progress",
        "task",
        "step",
        "u1",
        "ng1",
        "--completed",
        "1",
        "--name",
        "drain ip-1",
    ]);
    assert_eq!(
        (v["percentage"].as_f64(), v["current_step"].as_str()),
        (Some(25.0), Some("drain ip-1"))
    );
    env.ok(&["progress", "task", "pause", "u1", "ng1"]);
    env.ok(&["progress", "task", "resume", "u1", "ng1"]);
    env.ok(&[
        "progress",
        "task",
        "fail",
        "u1",
        "ng1",
        "--error",
        "PDB blocks eviction",
    ]);
    let v = env.json(&["progress", "task", "retry", "u1", "ng1"]);
    assert_eq!(
        (v["retry_count"].as_u64(), v["status"].as_str()),
        (Some(1), Some("in_progress"))
    );
    env.ok(&[
        "progress",
        "task",
        "cancel",
        "u1",
        "ng1",
        "-m",
        "operator stopped",
    ]);
    env.ok(&["progress", "task", "retry", "u1", "ng1"]);
    env.ok(&["progress", "task", "complete", "u1", "ng1"]);
    env.ok(&["progress", "task", "complete", "u1", "plan"]);
    env.ok(&["progress", "upgrade", "phase", "u1", "node-groups"]);

    let detail = env.json(&["progress", "task", "show", "u1", "plan"]);
    let recent = detail["recent_events"].as_array().unwrap();
    assert_eq!(recent.len(), 4, "add, start, update, complete");
    assert_eq!(recent[0]["kind"], "task.completed");
    assert_eq!(
        recent[1]["details"],
        json!({"checked": 3, "az": "eu-west-1a"})
    );

    let show = env.json(&["progress", "upgrade", "show", "u1"]);
    assert_eq!(show["current_phase"], "node-groups");
    // --meta values are strings (Kubernetes versions: "1.30" must not become 1.3);
    // --meta-json keeps JSON types.
    assert_eq!(
        show["metadata"],
        json!({"from": "1.29", "to": "1.30", "nodes": 12})
    );
    assert_eq!(show["total_tasks"], 3);
    // plan, ng1, and nodes, completed with its only child.
    assert_eq!(show["completed_tasks"], 3);
    // plan 100 (w1) + nodes (w3) = mean of its one child, 100.
    assert_eq!(show["overall_percentage"], 100.0);
    assert_eq!(show["tasks"].as_array().unwrap().len(), 3);

    let table = env.ok(&["progress", "upgrade", "show", "u1"]);
    assert!(table.contains("└─ ng-1"), "{table}");
    assert!(
        table.contains("retried twice") || table.contains("retried 2 times"),
        "{table}"
    );

    env.ok(&["progress", "upgrade", "complete", "u1"]);
    env.ok(&[
        "progress",
        "upgrade",
        "create",
        "u2",
        "--plan",
        "p",
        "--cluster",
        "c",
    ]);
    env.ok(&[
        "progress",
        "upgrade",
        "fail",
        "u2",
        "--error",
        "quota exceeded",
    ]);
    let list = env.json(&["progress", "upgrade", "list"]);
    let rows: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["upgrade_id"].as_str().unwrap(),
                u["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [("u1", "completed"), ("u2", "failed")]);
    assert_eq!(list[1]["error_message"], "quota exceeded");

    let events = env.events("u1");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let since = env.json(&["progress", "events", "u1", "--since", &seqs[3].to_string()]);
    assert_eq!(since.as_array().unwrap().len(), events.len() - 4);
    // `events --follow` ends once the upgrade has ended and prints JSON Lines.
    let follow = env.ok(&["-o", "json", "progress", "events", "u1", "--follow"]);
    assert_eq!(follow.lines().count(), events.len());
    // `watch` without a terminal prints event lines and ends with the summary.
    let watch = env.ok(&["progress", "watch", "u1"]);
    assert!(
        watch.contains("upgrade.completed") && watch.contains("status completed"),
        "{watch}"
    );
}

/// Runs a failing command and checks that the store did not change.
fn rejected(env: &Env, code: i32, args: &[&str], needle: &str) {
    let before = env.events("u1");
    let before_show = env.json(&["progress", "upgrade", "show", "u1"]);
    let err = env.fails(code, args);
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err:?}"
    );
    // One message, said once, with the documented prefix.
    assert!(err.starts_with("error: "), "{args:?}: {err:?}");
    if code == 1 {
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(env.events("u1"), before, "{args:?} changed the event log");
    let mut after_show = env.json(&["progress", "upgrade", "show", "u1"]);
    // Duration and ETA move with the clock; everything else must be identical.
    after_show["duration"] = before_show["duration"].clone();
    after_show["estimated_completion"] = before_show["estimated_completion"].clone();
    assert_eq!(after_show, before_show, "{args:?} changed the state");
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let env = setup();
    env.ok(&["progress", "task", "complete", "u1", "plan"]);
    env.ok(&[
        "progress",
        "upgrade",
        "create",
        "u3",
        "--plan",
        "p",
        "--cluster",
        "c",
    ]);
    let long = "x".repeat(200);
    let long_name = "n".repeat(300);
    let cases: Vec<(i32, Vec<&str>, &str)> = vec![
        (
            1,
            vec!["progress", "task", "start", "nope", "plan"],
            "upgrade \"nope\" not found",
        ),
        (
            1,
            vec!["progress", "task", "start", "u1", "ghost"],
            "task \"ghost\" of upgrade \"u1\" not found",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "plan", "--name", "P", "--type", "cleanup",
            ],
            "already exists",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "x", "--name", "X", "--type", "cleanup",
                "--parent", "ghost",
            ],
            "parent task \"ghost\"",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "x", "--name", "X", "--type", "cleanup",
                "--parent", "x",
            ],
            "own parent",
        ),
        (
            2,
            vec![
                "progress", "task", "add", "u1", "x", "--name", "X", "--type", "deploy",
            ],
            "invalid task type \"deploy\"",
        ),
        (
            1,
            vec![
                "progress",
                "task",
                "update",
                "u1",
                "nodes",
                "--percent",
                "50",
            ],
            "rolled up",
        ),
        (
            1,
            vec!["progress", "task", "update", "u1", "ng1", "--percent", "-1"],
            "percentage must be in 0..=100, got -1",
        ),
        (
            1,
            vec![
                "progress",
                "task",
                "update",
                "u1",
                "ng1",
                "--percent",
                "100.5",
            ],
            "got 100.5",
        ),
        (
            1,
            vec![
                "progress",
                "task",
                "update",
                "u1",
                "ng1",
                "--percent",
                "NaN",
            ],
            "NaN",
        ),
        (
            2,
            vec![
                "progress",
                "task",
                "update",
                "u1",
                "ng1",
                "--percent",
                "lots",
            ],
            "invalid value 'lots'",
        ),
        (
            1,
            vec![
                "progress",
                "task",
                "update",
                "u1",
                "plan",
                "--percent",
                "10",
            ],
            "completed -> in_progress",
        ),
        (
            1,
            vec!["progress", "task", "resume", "u1", "ng1"],
            "not_started -> in_progress",
        ),
        (
            1,
            vec!["progress", "task", "retry", "u1", "plan"],
            "completed -> in_progress",
        ),
        (
            1,
            vec!["progress", "upgrade", "complete", "u3"],
            "upgrade \"u3\": not_started -> completed",
        ),
        (
            1,
            vec!["progress", "upgrade", "start", "u1"],
            "in_progress -> in_progress",
        ),
        (
            1,
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
            "upgrade \"u1\" already exists",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "", "--name", "X", "--type", "cleanup",
            ],
            "task_id must not be empty",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", &long, "--name", "X", "--type", "cleanup",
            ],
            "limit is 128",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "a\u{1b}b", "--name", "X", "--type", "cleanup",
            ],
            "control characters",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "ok", "--name", "", "--type", "cleanup",
            ],
            "name must not be empty",
        ),
        (
            1,
            vec![
                "progress", "task", "add", "u1", "ok", "--name", &long_name, "--type", "cleanup",
            ],
            "limit is 256",
        ),
        (
            1,
            vec!["progress", "upgrade", "phase", "u1", "bad\nphase"],
            "control character",
        ),
        (
            2,
            vec![
                "progress",
                "task",
                "update",
                "u1",
                "ng1",
                "--percent",
                "5",
                "--detail",
                "oops",
            ],
            "expected KEY=VALUE",
        ),
        (
            2,
            vec![
                "progress",
                "upgrade",
                "create",
                "u9",
                "--plan",
                "p",
                "--cluster",
                "c",
                "--meta",
                "=1",
            ],
            "empty key",
        ),
        (
            1,
            vec!["progress", "task", "step", "u1", "ng1", "--completed", "5"],
            "exceeds total_steps 4",
        ),
        (
            1,
            vec!["progress", "task", "fail", "u1", "ng1", "--error", " "],
            "error_message must not be empty",
        ),
        (
            2,
            vec!["progress", "task", "explode", "u1", "ng1"],
            "unrecognized subcommand",
        ),
    ];
    for (code, args, needle) in cases {
        rejected(&env, code, &args, needle);
    }
    // u9 was never created by the rejected --meta case.
    env.fails(1, &["progress", "upgrade", "show", "u9"]);
}

#[test]
fn export_writes_the_reference_shape_atomically() {
    let env = setup();
    env.ok(&[
        "progress",
        "task",
        "update",
        "u1",
        "plan",
        "--percent",
        "40",
    ]);
    let out = env.dir.path().join("exports");
    std::fs::create_dir(&out).unwrap();
    let file = out.join("upgrade_u1.json");
    env.ok(&["progress", "export", "u1", "--out", file.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["upgrade_id"], "u1");
    let plan = &v["tasks"]["plan"];
    assert_eq!(plan["task_name"], "Plan");
    assert_eq!(plan["percentage"], 40.0);
    assert_eq!(plan["events"].as_array().unwrap().len(), 2);
    assert_eq!(v["tasks"]["nodes"]["subtasks"], json!(["ng1"]));
    // Python str(datetime): space separator, microseconds, +00:00.
    let started = v["started_at"].as_str().unwrap();
    assert!(
        started.len() == 32 && &started[10..11] == " " && started.ends_with("+00:00"),
        "{started}"
    );
    // Only the export is in the directory: no temp file left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    let err = env.fails(1, &["progress", "export", "nope", "--out", "-"]);
    assert!(err.contains("upgrade \"nope\" not found"), "{err}");
}

#[test]
fn demo_runs_a_full_upgrade_with_a_retried_failure() {
    let env = Env::new();
    let v = env.json(&["demo", "--speed", "200", "--upgrade-id", "demo-1"]);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["overall_percentage"], 100.0);
    assert_eq!(v["completed_tasks"], v["total_tasks"]);
    let tasks = v["tasks"].as_array().unwrap();
    assert!(tasks.len() >= 12, "{}", tasks.len());
    let retried: Vec<_> = tasks.iter().filter(|t| t["retry_count"] == 1).collect();
    assert_eq!(retried.len(), 1);
    let arts = &v["artifacts_session"];
    assert_eq!(arts["upgrade_id"], "demo-1");
    assert!(arts["completed_at"].is_string(), "the session is completed");
    for ty in [
        "log_file",
        "test_result",
        "configuration",
        "metrics_data",
        "screenshot",
        "diagnostic",
    ] {
        assert!(
            arts["artifact_types"][ty].as_u64() >= Some(1),
            "no {ty} in {arts}"
        );
    }
    let junit = env.json(&[
        "artifacts",
        "search",
        "--upgrade",
        "demo-1",
        "--type",
        "test_result",
    ]);
    let id = junit
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "junit/validation.xml")
        .unwrap()["artifact_id"]
        .as_str()
        .unwrap();
    assert!(
        env.ok(&["artifacts", "get", id])
            .contains("<testsuite name=\"validate-nodes\"")
    );
    let show = env.ok(&["progress", "upgrade", "show", "demo-1"]);
    assert!(show.contains("2 artifacts"), "{show}");
    let events = env.events("demo-1");
    let phases: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "upgrade.phase_changed")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "control-plane",
            "add-ons",
            "node-groups",
            "validation",
            "cleanup"
        ]
    );
    assert!(events.iter().any(|e| e["kind"] == "task.failed"));
    let err = env.fails(1, &["demo", "--speed", "0"]);
    assert!(err.contains("--speed"), "{err}");
}

#[test]
fn follow_and_watch_see_other_processes_and_end_with_the_upgrade() {
    use std::io::BufRead;
    use std::sync::mpsc;
    let env = setup();
    let history = env.events("u1").len();
    // Each follower's stdout, line by line, through a channel.
    let spawn = |args: &[&str]| {
        let mut child = env
            .command()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    };
    let take = |rx: &mpsc::Receiver<String>, n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(20))
                    .expect("follower printed a line")
            })
            .collect()
    };
    let (mut follow, follow_rx) = spawn(&["-o", "json", "progress", "events", "u1", "--follow"]);
    let (mut watch, watch_rx) = spawn(&["progress", "watch", "u1", "--interval-ms", "20"]);
    // Both have printed the whole history before anything new is written: what follows can
    // only reach them by following.
    let mut follow_lines = take(&follow_rx, history);
    let mut watch_lines = take(&watch_rx, history);
    assert!(follow_rx.try_recv().is_err() && watch_rx.try_recv().is_err());
    env.ok(&[
        "progress",
        "task",
        "update",
        "u1",
        "plan",
        "--percent",
        "33",
        "-m",
        "from another process",
    ]);
    let live = take(&follow_rx, 1);
    assert!(live[0].contains("from another process"), "{live:?}");
    let live_watch = take(&watch_rx, 1);
    assert!(
        live_watch[0].contains("from another process"),
        "{live_watch:?}"
    );
    follow_lines.extend(live);
    watch_lines.extend(live_watch);
    env.ok(&["progress", "task", "complete", "u1", "plan"]);
    env.ok(&["progress", "upgrade", "complete", "u1"]);
    assert!(follow.wait().unwrap().success());
    follow_lines.extend(follow_rx.iter());
    let lines: Vec<Value> = follow_lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), env.events("u1").len());
    assert_eq!(lines.last().unwrap()["kind"], "upgrade.completed");
    assert!(watch.wait().unwrap().success());
    watch_lines.extend(watch_rx.iter());
    let text = watch_lines.join("\n");
    assert!(text.contains("upgrade.completed"), "{text}");
    assert!(text.contains("status completed"), "{text}");
}

#[test]
fn config_file_sets_data_dir_and_sinks_and_bad_files_are_reported() {
    let env = Env::new();
    let (url, got) = webhook_receiver();
    let data = env.dir.path().join("from-config");
    let file = env.dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nwebhook_url = {url:?}\nwebhook_secret = \"k\"\nwebhook_format = \"cloudevents\"\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::util::BIN)
            .arg("--config")
            .arg(&file)
            .args(args)
            .env_remove("EUA_DATA_DIR")
            .env_remove("EUA_WEBHOOK_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&[
        "progress",
        "upgrade",
        "create",
        "u",
        "--plan",
        "p",
        "--cluster",
        "c",
    ]);
    run(&["progress", "upgrade", "start", "u"]);
    assert!(
        data.join("eks-upgrade-agent.sqlite3").exists(),
        "data_dir from the file is used"
    );
    let bodies = got.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(
        bodies[0].contains("X-EUA-Signature: sha256=")
            || bodies[0].contains("x-eua-signature: sha256="),
        "{}",
        bodies[0]
    );
    assert!(
        bodies[0].contains("com.eks-upgrade-agent.upgrade.started.v1"),
        "{}",
        bodies[0]
    );
    let status = run(&["-o", "json", "notify", "status"]);
    let v: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        (v[0]["delivered"].as_u64(), v[0]["pending"].as_u64()),
        (Some(1), Some(0))
    );

    for (text, needle) in [
        ("eventbridge_bus = \"x\"", "unknown field `eventbridge_bus`"),
        ("durability = \"sometimes\"", "unknown variant `sometimes`"),
        ("data_dir = [", "invalid configuration file"),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(crate::util::BIN)
            .arg("--config")
            .arg(&file)
            .args(["progress", "upgrade", "list"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && err.contains("config.toml"),
            "{text}: {err}"
        );
    }
    let err = env.fails(
        1,
        &[
            "--config",
            "/nonexistent/eua.toml",
            "progress",
            "upgrade",
            "list",
        ],
    );
    assert!(
        err.contains("cannot read the configuration file /nonexistent/eua.toml"),
        "{err}"
    );
}

#[test]
fn serve_listens_on_loopback_only_and_answers() {
    let env = setup();
    let err = env.fails(1, &["serve", "--listen", "0.0.0.0:0"]);
    assert!(err.contains("without authentication"), "{err}");
    assert!(err.contains("--insecure-no-auth"), "{err}");
    let err = env.fails(1, &["serve", "--token", "short:read"]);
    assert!(err.contains("at least 16"), "{err}");
    let served = serve(&env, &[]);
    let resp = http(
        served.port,
        "GET /api/v1/upgrades/u1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"cluster_name\":\"prod-eu\""), "{resp}");
}

#[test]
fn serve_with_tokens_from_the_environment() {
    let env = setup();
    let token = "a-read-token-for-tests";
    let served = serve(&env, &[("EUA_TOKENS", &format!("{token}:read"))]);
    let get = |auth: &str| {
        http(
            served.port,
            &format!(
                "GET /api/v1/upgrades/u1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
            ),
        )
    };
    let resp = get("");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let resp = get(&format!("Authorization: Bearer {token}\r\n"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let resp = http(
        served.port,
        &format!(
            "POST /api/v1/upgrades/u1/complete HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
}

#[test]
fn serve_takes_tokens_from_a_file_and_answers_only_to_its_names() {
    let env = setup();
    let token = "a-write-token-from-a-file";
    let file = env.dir.path().join("tokens");
    std::fs::write(&file, format!("# the team's tokens\n\n  {token}:write\n")).unwrap();
    let err = env.fails(1, &["serve", "--token-file", "/nonexistent/tokens"]);
    assert!(
        err.contains("cannot read the token file /nonexistent/tokens"),
        "{err}"
    );
    let empty = env.dir.path().join("empty");
    std::fs::write(&empty, "# nothing\n").unwrap();
    let err = env.fails(1, &["serve", "--token-file", empty.to_str().unwrap()]);
    assert!(err.contains("holds no token"), "{err}");
    let err = env.fails(1, &["serve", "--public-url", "ftp://x"]);
    assert!(err.contains("invalid public URL"), "{err}");
    let served = serve(
        &env,
        &[
            ("EUA_TOKEN_FILE", file.to_str().unwrap()),
            ("EUA_PUBLIC_URL", "https://eua.example.com"),
        ],
    );
    let get = |host: &str, auth: &str| {
        http(
            served.port,
            &format!(
                "GET /api/v1/upgrades/u1 HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
            ),
        )
    };
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let resp = get("127.0.0.1", "");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    for host in ["127.0.0.1", "localhost:1", "eua.example.com"] {
        let resp = get(host, &bearer);
        assert!(resp.starts_with("HTTP/1.1 200"), "{host}: {resp}");
    }
    let resp = get("evil.example", &bearer);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("--allowed-host evil.example"), "{resp}");
}

#[test]
fn a_cli_write_reaches_the_servers_stream() {
    use std::io::{BufRead, BufReader, Write};
    let env = setup();
    let served = serve(&env, &[]);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    stream
        .write_all(b"GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    // The head first, so the subscription exists before the write.
    for line in lines.by_ref() {
        if line.unwrap().is_empty() {
            break;
        }
    }
    env.ok(&[
        "progress",
        "task",
        "update",
        "u1",
        "plan",
        "--percent",
        "55",
        "-m",
        "from another process",
    ]);
    let found = lines
        .map(Result::unwrap)
        .find(|l| l.contains("from another process"));
    let line = found.expect("the event reached the stream");
    assert!(line.contains("\"type\":\"progress_event\""), "{line}");
}

#[test]
fn demo_serve_shows_the_run_and_keeps_serving() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let err = env.fails(1, &["demo", "--serve", "0.0.0.0:0"]);
    assert!(err.contains("loopback only"), "{err}");
    let mut child = env
        .command()
        .args([
            "demo",
            "--speed",
            "50",
            "--upgrade-id",
            "d1",
            "--serve",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("dashboard: ").map(str::to_owned))
        .expect("the dashboard URL is printed");
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let page = http(
        port,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>EKS Upgrade Agent</title>"), "{page}");
    // Its files come from the binary itself (no CDN, nothing on disk): every asset the page
    // names is served.
    for asset in ["/assets/app.css", "/assets/app.js"] {
        assert!(page.contains(asset), "{page}");
        let got = http(
            port,
            &format!("GET {asset} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        );
        assert!(got.starts_with("HTTP/1.1 200"), "{asset}: {got}");
        assert!(got.len() > 1000, "{asset}: {got}");
    }
    assert!(
        !page.contains("https://") && !page.contains("//cdn"),
        "{page}"
    );
    // The demo ends; the server stays up and shows the finished upgrade.
    lines
        .by_ref()
        .map(Result::unwrap)
        .find(|l| l.starts_with("demo finished; still serving"))
        .expect("the demo finishes and says it keeps serving");
    let resp = http(
        port,
        "GET /api/v1/upgrades/d1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"status\":\"completed\""), "{resp}");
}

/// N26 for `demo --serve`: a change written through the dashboard's API after the demo
/// finished (an upgrade created and started) is delivered by the time a SIGTERM stop ends the process (the notification
/// thread's last pass), and the stop exits 0.
#[test]
fn demo_serve_delivers_what_was_written_while_serving_by_its_stop() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let (hook, got) = webhook_receiver();
    let child = env
        .command()
        .args([
            "demo",
            "--speed",
            "50",
            "--upgrade-id",
            "d1",
            "--serve",
            "127.0.0.1:0",
        ])
        .env("EUA_WEBHOOK_URL", &hook)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed on drop, whatever fails below.
    let mut served = crate::util::Served { child, port: 0 };
    let mut lines = BufReader::new(served.child.stderr.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("dashboard: ").map(str::to_owned))
        .expect("the dashboard URL is printed");
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    lines
        .by_ref()
        .map(Result::unwrap)
        .find(|l| l.starts_with("demo finished; still serving"))
        .expect("the demo finishes and says it keeps serving");
    // The rest of its log, read as it comes (a full pipe would block it).
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    let body = r#"{"upgrade_id":"late","plan_id":"p","cluster_name":"c"}"#;
    let resp = http(
        port,
        &format!(
            "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(
        resp.starts_with("HTTP/1.1 201") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    let resp = http(
        port,
        "POST /api/v1/upgrades/late/start HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: \
         application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "demo --serve did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let rest = rest.join().unwrap();
    assert!(status.success(), "{status:?}: {rest:?}");
    let bodies = got.lock().unwrap();
    assert!(
        bodies.iter().any(|b| b.contains("\"late\"")),
        "the upgrade started while serving was not delivered: {rest:?} {} bodies: {}",
        bodies.len(),
        bodies
            .iter()
            .map(|b| &b[..b.len().min(300)])
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm_and_sigint_finishing_a_request_in_flight() {
    for signal in ["-TERM", "-INT"] {
        let env = setup();
        let mut served = serve(&env, &[]);
        let health = http(
            served.port,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        assert!(health.contains(r#""status":"ok""#), "{health}");
        // A request in flight when the signal comes: half its body is sent before, half after.
        use std::io::{Read, Write};
        let body = r#"{"upgrade_id":"late","plan_id":"p","cluster_name":"c"}"#;
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", served.port)).unwrap();
        write!(
            tcp,
            "POST /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..10]
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pid = served.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            served.child.try_wait().unwrap().is_none(),
            "{signal}: serve must wait for the request in flight"
        );
        tcp.write_all(&body.as_bytes()[10..]).unwrap();
        let mut resp = String::new();
        tcp.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 201"), "{signal}: {resp}");
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = served.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "serve did not stop on {signal}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "{signal}: graceful stop exits 0: {status:?}"
        );
        // The request finished: its upgrade is in the store.
        env.ok(&["progress", "upgrade", "show", "late"]);
    }
}
