//! Issue #10's defects seen through the CLI: every test here failed on the code before its fix.

use std::process::Command;

use serde_json::{Value, json};

use crate::util::{BIN, Env, http, serve};

fn create(env: &Env, upgrade: &str) {
    env.ok(&[
        "progress",
        "upgrade",
        "create",
        upgrade,
        "--plan",
        "p",
        "--cluster",
        "c",
    ]);
}

#[test]
fn reads_never_create_a_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nonexistent/x/y");
    let reads: [&[&str]; 11] = [
        &["progress", "upgrade", "list"],
        // Changes to what is not there fail alike, creating nothing.
        &["progress", "upgrade", "start", "u1"],
        &[
            "progress",
            "task",
            "add",
            "u1",
            "t",
            "--name",
            "n",
            "--type",
            "upgrade_step",
        ],
        &["progress", "task", "update", "u1", "t", "--percent", "5"],
        &["progress", "upgrade", "show", "u1"],
        &["progress", "task", "show", "u1", "t1"],
        &["progress", "events", "u1"],
        &["progress", "watch", "u1"],
        &["progress", "export", "u1", "--out", "-"],
        &["notify", "status"],
        &["-o", "json", "progress", "upgrade", "list"],
    ];
    for args in reads {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(&missing)
            .args(args)
            .env_remove("EUA_SERVER")
            .env("XDG_CONFIG_HOME", root.path().join("config"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no store in") && stderr.contains(&*missing.to_string_lossy()),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            !root.path().join("nonexistent").exists(),
            "{args:?} created it"
        );
    }
    let artifact_reads: [&[&str]; 9] = [
        &["artifacts", "search"],
        &["artifacts", "stats"],
        &["artifacts", "session", "list"],
        &["artifacts", "session", "show", "s"],
        &["artifacts", "collection", "list", "s"],
        &["artifacts", "show", "a"],
        &["artifacts", "verify"],
        &["artifacts", "gc"],
        &["artifacts", "cleanup", "--dry-run"],
    ];
    for args in artifact_reads {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(&missing)
            .args(args)
            .env_remove("EUA_SERVER")
            .env("XDG_CONFIG_HOME", root.path().join("config"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("no store in"), "{args:?}: {stderr}");
        assert!(
            !root.path().join("nonexistent").exists(),
            "{args:?} created it"
        );
    }
    // A command that writes creates it.
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(&missing)
        .args([
            "progress",
            "upgrade",
            "create",
            "u1",
            "--plan",
            "p",
            "--cluster",
            "c",
        ])
        .env("XDG_CONFIG_HOME", root.path().join("config"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(missing.is_dir());
}

#[test]
fn events_lists_everything_by_default_and_a_limit_says_what_it_left_out() {
    let env = Env::new();
    create(&env, "u1");
    let mut input = String::from(
        r#"{"op":"upgrade.start","upgrade_id":"u1"}
{"op":"task.add","upgrade_id":"u1","task_id":"t","name":"T","task_type":"upgrade_step"}
"#,
    );
    for i in 0..10_100 {
        let pct = f64::from(i % 100);
        input.push_str(&format!(
            "{{\"op\":\"task.update\",\"upgrade_id\":\"u1\",\"task_id\":\"t\",\"percentage\":{pct}}}\n"
        ));
    }
    let acks = env.apply(&input);
    assert!(
        acks.iter().all(|a| a["ok"] == true),
        "every line acknowledged"
    );
    let total = 10_100 + 3;
    let all = env.json(&["progress", "events", "u1"]);
    assert_eq!(all.as_array().unwrap().len(), total, "JSON: every event");
    let table = env.ok(&["progress", "events", "u1"]);
    assert_eq!(
        table.lines().count(),
        total + 1,
        "table: a header row and every event"
    );

    let out = env.run(&["-o", "json", "progress", "events", "u1", "--limit", "100"]);
    assert!(out.status.success());
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 100);
    let last = page[99]["seq"].as_u64().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{} more left out", total - 100))
            && stderr.contains(&format!("--since {last}")),
        "{stderr}"
    );
    // A limit that covers everything says nothing.
    let out = env.run(&["progress", "events", "u1", "--limit", "20000"]);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let empty = env.json(&["progress", "events", "u1", "--since", "999999"]);
    assert_eq!(empty, json!([]));
}

/// An in-progress upgrade started in 1970 at 0.01%: its ETA is millions of years away, which
/// once panicked every listing (CLI and HTTP) until the upgrade ended.
#[test]
fn an_absurd_eta_does_not_take_listings_down() {
    let env = Env::new();
    let file = env.data_dir().join("upgrade_old.json");
    std::fs::write(
        &file,
        json!({
            "upgrade_id": "old",
            "plan_id": "p",
            "cluster_name": "c",
            "status": "in_progress",
            "started_at": "1970-01-01 00:00:01+00:00",
            "tasks": {"t": {"task_id": "t", "task_name": "T", "task_type": "upgrade_step",
                            "status": "in_progress", "progress_percentage": 0.01,
                            "started_at": "1970-01-01 00:00:01+00:00"}}
        })
        .to_string(),
    )
    .unwrap();
    env.ok(&["progress", "import", file.to_str().unwrap()]);
    create(&env, "slow");
    env.ok(&["progress", "upgrade", "start", "slow"]);
    env.ok(&[
        "progress",
        "task",
        "add",
        "slow",
        "t",
        "--name",
        "T",
        "--type",
        "upgrade_step",
    ]);
    env.ok(&[
        "progress",
        "task",
        "update",
        "slow",
        "t",
        "--percent",
        "0.000000001",
    ]);
    let list = env.json(&["progress", "upgrade", "list"]);
    assert_eq!(list[0]["upgrade_id"], "old");
    assert_eq!(list[0]["estimated_completion"], Value::Null);
    assert!(env.ok(&["progress", "upgrade", "list"]).contains("old"));
    assert!(
        env.ok(&["progress", "upgrade", "show", "old"])
            .contains("eta -")
    );
    let served = serve(&env, &[]);
    let resp = http(
        served.port,
        &format!(
            "GET /api/v1/upgrades HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            served.port
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("\"old\"") && resp.contains("\"slow\""),
        "{resp}"
    );
    // A failed upgrade has no ETA (the dashboard said "any moment").
    env.ok(&["progress", "upgrade", "fail", "slow", "--error", "gave up"]);
    let s = env.json(&["progress", "upgrade", "show", "slow"]);
    assert_eq!(s["estimated_completion"], Value::Null);
}

#[test]
fn control_characters_are_refused_and_never_printed_raw() {
    let env = Env::new();
    create(&env, "u1");
    env.ok(&[
        "progress",
        "task",
        "add",
        "u1",
        "t",
        "--name",
        "T",
        "--type",
        "upgrade_step",
    ]);
    for args in [
        &[
            "progress",
            "task",
            "fail",
            "u1",
            "t",
            "--error",
            "boom\u{1b}[2J",
        ][..],
        &[
            "progress",
            "task",
            "start",
            "u1",
            "t",
            "-m",
            "csi \u{9b}31m red",
        ],
        &["progress", "task", "start", "u1", "t", "-m", "bell\u{7}"],
        &["progress", "upgrade", "phase", "u1", "x\u{1b}]0;title\u{7}"],
        &[
            "progress",
            "upgrade",
            "fail",
            "u1",
            "--error",
            "cr\roverwrite",
        ],
    ] {
        let err = env.fails(1, args);
        assert!(err.contains("control character"), "{args:?}: {err}");
    }
    let before = env.events("u1").len();
    assert_eq!(before, 2, "nothing was recorded");
    // Details are JSON and may hold anything; what is printed is escaped.
    env.ok(&[
        "progress",
        "task",
        "update",
        "u1",
        "t",
        "--percent",
        "5",
        "-m",
        "two\nlines\tand a tab",
        "--detail",
        "k=\u{1b}]0;pwned\u{7}\u{9b}2J\u{202e}",
    ]);
    for args in [
        &["progress", "events", "u1"][..],
        &["progress", "task", "show", "u1", "t"],
        &["progress", "upgrade", "show", "u1"],
    ] {
        let out = env.ok(args);
        for bad in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}', '\r'] {
            assert!(!out.contains(bad), "{args:?} printed {bad:?} raw: {out:?}");
        }
    }
    let events = env.ok(&["progress", "events", "u1"]);
    assert!(events.contains(r"two\nlines\tand a tab"), "{events}");
    assert!(events.contains(r"\u{9b}2J"), "{events}");
    // An import is checked like a command.
    let file = env.data_dir().join("upgrade_esc.json");
    std::fs::write(
        &file,
        json!({"upgrade_id": "esc", "cluster_name": "c", "status": "failed",
               "error_message": "\u{1b}[31mred"})
        .to_string(),
    )
    .unwrap();
    let err = env.fails(1, &["progress", "import", file.to_str().unwrap()]);
    assert!(err.contains("control character"), "{err}");
    let list = env.json(&["progress", "upgrade", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "nothing imported");

    // Artifacts: descriptions are text like messages; what tables print is escaped.
    let err = env.fails(
        1,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "c",
            "--description",
            "\u{1b}[2Jgone",
        ],
    );
    assert!(err.contains("control character"), "{err}");
    let s = env.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "c",
    ]);
    let s = s["session_id"].as_str().unwrap().to_owned();
    let c = env.json(&["artifacts", "collection", "create", &s, "--name", "logs"]);
    let c = c["collection_id"].as_str().unwrap().to_owned();
    let file = env.data_dir().join("k.log");
    std::fs::write(&file, "log").unwrap();
    let added = env.json(&[
        "artifacts",
        "add",
        &s,
        &c,
        file.to_str().unwrap(),
        "--meta",
        "k=\u{9b}2J\u{1b}]0;x\u{7}",
    ]);
    let id = added[0]["artifact_id"].as_str().unwrap().to_owned();
    let show = env.ok(&["artifacts", "show", &id]);
    for bad in ['\u{1b}', '\u{7}', '\u{9b}'] {
        assert!(!show.contains(bad), "printed {bad:?} raw: {show:?}");
    }
    assert!(show.contains(r"\u{9b}2J"), "{show}");
}

/// Parents follow their children (DESIGN.md "Hierarchy semantics"): completing a parent while
/// a child runs once succeeded (100% with children at 0%), and a parent stayed `in_progress`
/// after its child and the upgrade failed.
#[test]
fn parents_follow_their_children() {
    let env = Env::new();
    create(&env, "u1");
    env.ok(&["progress", "upgrade", "start", "u1"]);
    for (id, parent) in [
        ("nodes", None),
        ("ng-1", Some("nodes")),
        ("ng-2", Some("nodes")),
    ] {
        let mut args = vec![
            "progress",
            "task",
            "add",
            "u1",
            id,
            "--name",
            id,
            "--type",
            "upgrade_step",
        ];
        if let Some(p) = parent {
            args.extend(["--parent", p]);
        }
        env.ok(&args);
    }
    env.ok(&[
        "progress",
        "task",
        "update",
        "u1",
        "ng-1",
        "--percent",
        "30",
    ]);
    let err = env.fails(1, &["progress", "task", "complete", "u1", "nodes"]);
    assert!(
        err.contains("unfinished") && err.contains("ng-1, ng-2"),
        "{err}"
    );
    let nodes = env.json(&["progress", "task", "show", "u1", "nodes"]);
    assert_eq!(nodes["status"], "in_progress");
    assert_eq!(nodes["percentage"], 15.0);

    env.ok(&[
        "progress",
        "task",
        "fail",
        "u1",
        "ng-1",
        "--error",
        "PDB blocks eviction",
    ]);
    env.ok(&[
        "progress",
        "upgrade",
        "fail",
        "u1",
        "--error",
        "node groups failed",
    ]);
    let nodes = env.json(&["progress", "task", "show", "u1", "nodes"]);
    assert_eq!(nodes["status"], "failed");
    assert_eq!(
        nodes["error_message"],
        "subtask \"ng-1\" failed: PDB blocks eviction"
    );
    // The parent's own events are in the log (and so in streams, watch and notifications).
    let events = env.events("u1");
    assert!(
        events
            .iter()
            .any(|e| e["task_id"] == "nodes" && e["kind"] == "task.failed"),
        "{events:?}"
    );
    // The export says the same.
    let export = env.json(&["progress", "export", "u1", "--out", "-"]);
    assert_eq!(export["tasks"]["nodes"]["status"], "failed");
    // `watch` (no terminal: event lines) shows the parent's changes too.
    let watch = env.ok(&["progress", "watch", "u1"]);
    assert!(
        watch
            .lines()
            .any(|l| l.contains("task.failed") && l.contains("nodes")),
        "{watch}"
    );
}
