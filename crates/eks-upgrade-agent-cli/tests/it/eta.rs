//! ETA from history and stalled tasks (issue #12): completed tasks of earlier upgrades (live or
//! imported) feed per-task duration statistics; the summary's `estimated_completion` comes from
//! them (`eta_source` `history`, with `eta_range`), falls back to the rate, is null for ended or
//! paused upgrades; running tasks past their p90 with no event for 5 minutes are stalled, in
//! `show` and in `watch`.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};

use crate::util::Env;

fn ago(secs: i64) -> String {
    (Utc::now() - TimeDelta::seconds(secs)).to_rfc3339()
}

/// A completed task that ran `secs` seconds, ending `ended_ago` seconds ago.
fn done(id: &str, secs: i64, ended_ago: i64) -> Value {
    json!({
        "task_id": id, "task_name": format!("Task {id}"), "task_type": "upgrade_step",
        "status": "completed", "percentage": 100.0,
        "started_at": ago(ended_ago + secs), "completed_at": ago(ended_ago), "duration": secs,
        "events": []
    })
}

/// A reference progress file of upgrade `id` on `cluster` holding `tasks`.
fn upgrade_file(env: &Env, id: &str, cluster: &str, status: &str, tasks: Vec<Value>) {
    let file = json!({
        "upgrade_id": id, "plan_id": "p", "cluster_name": cluster, "status": status,
        "started_at": ago(7200),
        "completed_at": if status == "completed" { json!(ago(10)) } else { Value::Null },
        "tasks": tasks,
    });
    let path = env.dir.path().join(format!("upgrade_{id}.json"));
    std::fs::write(&path, file.to_string()).unwrap();
    env.ok(&["progress", "import", path.to_str().unwrap()]);
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {v}"))
        .parse()
        .unwrap()
}

/// Asserts `t` is `secs` after some instant between `before` and `after`.
fn about(t: DateTime<Utc>, before: DateTime<Utc>, after: DateTime<Utc>, secs: i64, what: &str) {
    let d = TimeDelta::seconds(secs);
    // One second of slack each way: stored times keep microseconds, the f32 samples a few
    // significant digits.
    assert!(
        t >= before + d - TimeDelta::seconds(1) && t <= after + d + TimeDelta::seconds(1),
        "{what}: {t} not {secs}s after [{before}, {after}]"
    );
}

fn apply_ok(env: &Env, lines: &[Value]) {
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let acks = env.apply(&input);
    assert_eq!(acks.len(), lines.len());
    for (ack, line) in acks.iter().zip(lines) {
        assert_eq!(ack["ok"], true, "{line}: {ack}");
    }
}

fn show(env: &Env, id: &str) -> (Value, DateTime<Utc>, DateTime<Utc>) {
    let before = Utc::now();
    let s = env.json(&["progress", "upgrade", "show", id]);
    (s, before, Utc::now())
}

/// A started upgrade `id` on `cluster` with `tasks` (ids) not started.
fn started(id: &str, cluster: &str, tasks: &[&str]) -> Vec<Value> {
    let mut lines = vec![
        json!({"op": "upgrade.create", "upgrade_id": id, "plan_id": "p", "cluster_name": cluster}),
        json!({"op": "upgrade.start", "upgrade_id": id}),
    ];
    lines.push(
        json!({"op": "task.add_many", "upgrade_id": id, "tasks": tasks.iter().map(|t| json!({
        "task_id": t, "name": format!("Task {t}"), "task_type": "upgrade_step"
    })).collect::<Vec<_>>()}),
    );
    lines
}

/// Guarantee E1, E4, E5: history at the narrowest scope with 3 samples gives the estimate (the
/// medians of the unfinished tasks summed) and its range (p25-p75); imported upgrades seed it.
#[test]
fn the_estimate_comes_from_imported_history_at_the_narrowest_scope() {
    let env = Env::new();
    // Cluster c: a and b took 60, 100 and 140 s (median 100, p25 80, p75 120); "two" has only
    // two samples anywhere.
    for (i, secs) in [60, 100, 140].into_iter().enumerate() {
        let mut tasks = vec![done("a", secs, 100), done("b", secs, 100)];
        if i < 2 {
            tasks.push(done("two", 30, 100));
        }
        upgrade_file(&env, &format!("h{i}"), "c", "completed", tasks);
    }
    // Cluster other: a took 1000 s (ignored on c, which has 3 samples of its own); z took 30,
    // 60 and 90 s (median 60, p25 45, p75 75) and only there, so c uses every cluster's.
    for (i, secs) in [30, 60, 90].into_iter().enumerate() {
        let tasks = vec![done("a", 1000, 100), done("z", secs, 100)];
        upgrade_file(&env, &format!("o{i}"), "other", "completed", tasks);
    }

    apply_ok(&env, &started("now", "c", &["a", "b", "z"]));
    let (s, before, after) = show(&env, "now");
    assert_eq!(s["eta_source"], "history", "{s}");
    about(
        time(&s["estimated_completion"]),
        before,
        after,
        100 + 100 + 60,
        "median",
    );
    let range = s["eta_range"].as_array().unwrap();
    assert_eq!(range.len(), 2, "{s}");
    about(time(&range[0]), before, after, 80 + 80 + 45, "p25");
    about(time(&range[1]), before, after, 120 + 120 + 75, "p75");
    let text = env.ok(&["progress", "upgrade", "show", "now"]);
    assert!(text.contains("(history, 3m–5m)"), "{text}");

    // A running task counts what it has left: a has run ~0 s of its 100.
    apply_ok(
        &env,
        &[json!({"op": "task.start", "upgrade_id": "now", "task_id": "a"})],
    );
    let (s, before, after) = show(&env, "now");
    about(
        time(&s["estimated_completion"]),
        before,
        after,
        260,
        "a running",
    );

    // Fewer than 3 samples for one unfinished task: the rate, and no range.
    apply_ok(&env, &started("few", "c", &["a", "two"]));
    apply_ok(
        &env,
        &[json!({"op": "task.update", "upgrade_id": "few", "task_id": "a", "percentage": 50.0})],
    );
    let (s, _, _) = show(&env, "few");
    assert_eq!(s["eta_source"], "rate", "{s}");
    assert!(s["estimated_completion"].is_string(), "{s}");
    assert_eq!(s["eta_range"], Value::Null, "{s}");
    let text = env.ok(&["progress", "upgrade", "show", "few"]);
    assert!(text.contains("(rate)"), "{text}");
}

/// Guarantee E2: live completions of the same task in earlier upgrades of the cluster feed the
/// history (two are not enough; the third is).
#[test]
fn live_completions_in_earlier_upgrades_feed_the_history() {
    let env = Env::new();
    let run = |id: &str| {
        let mut lines = started(id, "c", &["drain"]);
        lines.push(json!({"op": "task.start", "upgrade_id": id, "task_id": "drain"}));
        lines.push(json!({"op": "task.complete", "upgrade_id": id, "task_id": "drain"}));
        lines.push(json!({"op": "upgrade.complete", "upgrade_id": id}));
        apply_ok(&env, &lines);
    };
    run("u1");
    run("u2");
    let mut probe = started("probe", "c", &["drain", "other"]);
    probe.push(
        json!({"op": "task.update", "upgrade_id": "probe", "task_id": "other", "percentage": 50.0}),
    );
    apply_ok(&env, &probe);
    let (s, _, _) = show(&env, "probe");
    assert_eq!(s["eta_source"], "rate", "two samples: {s}");
    // Completed straight from not_started: not timed, not a sample.
    let mut untimed = started("u0", "c", &["drain"]);
    untimed.push(json!({"op": "task.complete", "upgrade_id": "u0", "task_id": "drain"}));
    apply_ok(&env, &untimed);
    let (s, _, _) = show(&env, "probe");
    assert_eq!(s["eta_source"], "rate", "an untimed completion: {s}");
    run("u3");
    // drain has 3 samples now, but other (running, never seen before) has none: finishing it
    // leaves drain alone.
    apply_ok(
        &env,
        &[json!({"op": "task.complete", "upgrade_id": "probe", "task_id": "other"})],
    );
    let (s, before, after) = show(&env, "probe");
    assert_eq!(s["eta_source"], "history", "{s}");
    // drain took milliseconds each time.
    about(time(&s["estimated_completion"]), before, after, 0, "ms");
}

/// Guarantee E3: no estimate for a wholly paused, completed or failed upgrade, history or not.
#[test]
fn no_estimate_for_paused_completed_or_failed_upgrades() {
    let env = Env::new();
    for i in 0..3 {
        upgrade_file(
            &env,
            &format!("h{i}"),
            "c",
            "completed",
            vec![done("a", 100, 100)],
        );
    }
    let mut lines = started("p", "c", &["a"]);
    lines.push(json!({"op": "task.start", "upgrade_id": "p", "task_id": "a"}));
    apply_ok(&env, &lines);
    assert_eq!(show(&env, "p").0["eta_source"], "history");
    apply_ok(
        &env,
        &[json!({"op": "task.pause", "upgrade_id": "p", "task_id": "a"})],
    );
    let (s, _, _) = show(&env, "p");
    assert_eq!(
        (
            &s["estimated_completion"],
            &s["eta_source"],
            &s["eta_range"]
        ),
        (&Value::Null, &Value::Null, &Value::Null),
        "paused: {s}"
    );
    apply_ok(
        &env,
        &[
            json!({"op": "task.resume", "upgrade_id": "p", "task_id": "a"}),
            json!({"op": "task.complete", "upgrade_id": "p", "task_id": "a"}),
            json!({"op": "upgrade.complete", "upgrade_id": "p"}),
        ],
    );
    let (s, _, _) = show(&env, "p");
    assert_eq!(s["status"], "completed");
    assert_eq!(
        (
            &s["estimated_completion"],
            &s["eta_source"],
            &s["eta_range"]
        ),
        (&Value::Null, &Value::Null, &Value::Null),
        "completed: {s}"
    );
    let mut lines = started("f", "c", &["a"]);
    lines.push(json!({"op": "upgrade.fail", "upgrade_id": "f", "error_message": "boom"}));
    apply_ok(&env, &lines);
    let (s, _, _) = show(&env, "f");
    assert_eq!(
        (
            &s["estimated_completion"],
            &s["eta_source"],
            &s["eta_range"]
        ),
        (&Value::Null, &Value::Null, &Value::Null),
        "failed: {s}"
    );
}

/// Guarantee E6: a running task past its history's p90 whose last event is over 5 minutes old
/// is stalled: listed in the summary (JSON and table) and said by `watch`; one with a recent
/// event is not.
#[test]
fn stalled_tasks_are_listed_and_watched() {
    let env = Env::new();
    for i in 0..3 {
        upgrade_file(
            &env,
            &format!("h{i}"),
            "c",
            "completed",
            vec![done("a", 60, 100), done("b", 60, 100)],
        );
    }
    // Both have run an hour (p90 is 60 s); a said nothing for an hour, b a minute ago.
    let running = |id: &str, last: i64| {
        json!({
            "task_id": id, "task_name": format!("Task {id}"), "task_type": "upgrade_step",
            "status": "in_progress", "percentage": 10.0, "started_at": ago(3600),
            "events": [{
                "event_id": uuid(id), "timestamp": ago(last), "task_id": id,
                "task_type": "upgrade_step", "status": "in_progress", "message": "working",
                "details": {}, "percentage": 10.0
            }]
        })
    };
    upgrade_file(
        &env,
        "s",
        "c",
        "in_progress",
        vec![running("a", 3600), running("b", 60)],
    );
    let (s, _, _) = show(&env, "s");
    assert_eq!(s["stalled_tasks"], 1, "{s}");
    assert_eq!(s["stalled_task_names"], json!(["Task a"]), "{s}");
    let text = env.ok(&["progress", "upgrade", "show", "s"]);
    assert!(text.contains("stalled 1: Task a"), "{text}");
    // Another cluster's upgrade, no history there or anywhere for its task: never stalled.
    upgrade_file(&env, "q", "c2", "in_progress", vec![running("q1", 3600)]);
    assert_eq!(show(&env, "q").0["stalled_tasks"], 0);

    // watch (not on a terminal: log lines) says it, then that it cleared once a reports.
    let mut child = env
        .command()
        .args(["progress", "watch", "s", "--interval-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(line) => seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
        Err(format!("no {needle:?} in {seen:#?}"))
    };
    let result = wait_for("stalled 1: Task a").and_then(|()| {
        apply_ok(
            &env,
            &[json!({"op": "task.update", "upgrade_id": "s", "task_id": "a", "percentage": 20.0})],
        );
        wait_for("no task stalled")
    });
    // End the upgrade so watch exits by itself; kill it whatever happened.
    apply_ok(
        &env,
        &[
            json!({"op": "task.complete", "upgrade_id": "s", "task_id": "a"}),
            json!({"op": "task.complete", "upgrade_id": "s", "task_id": "b"}),
            json!({"op": "upgrade.complete", "upgrade_id": "s"}),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(rx);
    reader.join().unwrap();
    result.unwrap();
    assert!(status.is_some_and(|s| s.success()), "watch: {status:?}");
}

/// A fixed event id per task (UUID form).
fn uuid(task: &str) -> String {
    let n: u32 = task.bytes().map(u32::from).sum();
    format!("0193aaaa-0000-7000-8000-{n:012x}")
}

/// Guarantee E8: with `--server` (a read token), the CLI's summary reads the server's history
/// through the store protocol and gives the same estimate as the server's own API.
#[test]
fn the_remote_cli_estimates_from_the_servers_history() {
    let env = Env::new();
    for i in 0..3 {
        upgrade_file(
            &env,
            &format!("h{i}"),
            "c",
            "completed",
            vec![done("a", 100, 100)],
        );
    }
    apply_ok(&env, &started("now", "c", &["a"]));
    let served = crate::util::serve(&env, &[("EUA_TOKENS", "eta-read-token-0001:read")]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let before = Utc::now();
    let s = client.json(&[
        "--server",
        &url,
        "--token",
        "eta-read-token-0001",
        "progress",
        "upgrade",
        "show",
        "now",
    ]);
    let after = Utc::now();
    assert_eq!(s["eta_source"], "history", "{s}");
    about(
        time(&s["estimated_completion"]),
        before,
        after,
        100,
        "remote",
    );
    let resp = crate::util::http(
        served.port,
        &format!(
            "GET /api/v1/store/task_history?cluster=c&task_ids=a%20zz HTTP/1.1\r\n\
             Host: 127.0.0.1:{}\r\nAuthorization: Bearer eta-read-token-0001\r\n\
             Connection: close\r\n\r\n",
            served.port
        ),
    );
    let body: Value = serde_json::from_str(&resp[resp.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(body[0]["cluster"]["duration"]["samples"], 3, "{body}");
    assert_eq!(body[0]["cluster"]["duration"]["p50"], 100.0, "{body}");
    assert_eq!(body[1], json!({"cluster": null, "global": null}), "{body}");
}
