//! `progress apply`: one acknowledgement per line, bad lines reported and skipped, and two
//! processes writing the same store at once; `--ack-events`; `artifacts apply`; errors as JSON
//! for programs (`EUA_ERROR_FORMAT=json`).

use std::io::Write;
use std::process::Stdio;

use serde_json::Value;

use crate::util::Env;

fn apply(env: &Env, input: &str) -> (Option<i32>, Vec<Value>, String) {
    apply_with(env, &["progress", "apply"], input)
}

fn apply_with(env: &Env, args: &[&str], input: &str) -> (Option<i32>, Vec<Value>, String) {
    let mut child = env
        .command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let acks = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.code(),
        acks,
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn every_line_is_acknowledged_and_bad_lines_do_not_stop_the_stream() {
    let env = Env::new();
    let input = [
        r#"{"op":"upgrade.create","upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#,
        r#"{"op":"upgrade.start","upgrade_id":"u1","phase":"nodes"}"#,
        r#"{"op":"task.add","upgrade_id":"u1","task_id":"t1","name":"T1","task_type":"upgrade_step","total_steps":4}"#,
        "",
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"t1","percentage":42.0,"message":"m","details":{"k":1}}"#,
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"t1","percentage":"lots"}"#,
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"t1","percentage":142}"#,
        r#"this is not json"#,
        r#"{"op":"task.launch","upgrade_id":"u1","task_id":"t1"}"#,
        r#"{"op":"task.step","upgrade_id":"u1","task_id":"t1","completed_steps":3,"current_step":"replace ip-3"}"#,
        r#"{"op":"task.complete","upgrade_id":"u1","task_id":"t1"}"#,
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"t1","percentage":10}"#,
        r#"{"op":"task.add","upgrade_id":"u1","task_id":"t2","name":"T2","task_type":"cleanup""#,
    ]
    .join("\n");
    let (code, acks, stderr) = apply(&env, &input);
    assert_eq!(code, Some(1), "some lines were rejected: {stderr}");
    assert!(stderr.contains("6 of 12 lines rejected"), "{stderr}");
    let ok: Vec<bool> = acks.iter().map(|a| a["ok"].as_bool().unwrap()).collect();
    assert_eq!(
        ok,
        [
            true, true, true, true, false, false, false, false, true, true, false, false
        ],
        "{acks:#?}"
    );
    let seqs: Vec<u64> = acks.iter().filter_map(|a| a["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let errors: Vec<&str> = acks.iter().filter_map(|a| a["error"].as_str()).collect();
    assert!(
        errors[0].contains("invalid type: string \"lots\""),
        "{errors:?}"
    );
    assert!(errors[1].contains("got 142"), "{errors:?}");
    assert!(errors[2].starts_with("malformed command"), "{errors:?}");
    assert!(errors[3].contains("task.launch"), "{errors:?}");
    assert!(errors[4].contains("completed -> in_progress"), "{errors:?}");
    assert!(errors[5].contains("EOF"), "truncated last line: {errors:?}");
    assert_eq!(acks[5]["line"], 7, "line numbers count blank lines");
    assert_eq!(acks[10]["code"], "invalid_transition");

    let show = env.json(&["progress", "task", "show", "u1", "t1"]);
    assert_eq!(show["status"], "completed");
    assert_eq!(show["current_step"], "replace ip-3");
    assert_eq!(env.events("u1").len(), 6);
    assert_eq!(
        env.events("u1").last().unwrap()["seq"].as_u64(),
        seqs.last().copied()
    );
}

#[test]
fn two_processes_write_the_same_store_at_once() {
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
    for t in ["a", "b"] {
        env.ok(&[
            "progress",
            "task",
            "add",
            "u",
            t,
            "--name",
            t,
            "--type",
            "upgrade_step",
        ]);
    }
    let n = 3000;
    let lines = |task: &str| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"{task}\",\"percentage\":{}}}\n",
                    f64::from(i) * 100.0 / f64::from(n - 1)
                )
            })
            .collect()
    };
    let spawn = || {
        let mut child = env
            .command()
            .args(["progress", "apply", "--max-batch", "7"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        (child, stdin, stdout)
    };
    let (mut a, mut a_in, mut a_out) = spawn();
    let (mut b, mut b_in, mut b_out) = spawn();
    // Overlap, shown rather than hoped for: each process acknowledges a first line while the
    // other is running with its input still open; only then do both get the rest at once.
    let first = |input: &mut std::process::ChildStdin,
                 output: &mut std::io::BufReader<std::process::ChildStdout>,
                 task: &str| {
        writeln!(
            input,
            "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"{task}\",\"percentage\":0}}"
        )
        .unwrap();
        input.flush().unwrap();
        let mut ack = String::new();
        std::io::BufRead::read_line(output, &mut ack).unwrap();
        let v: Value = serde_json::from_str(&ack).unwrap();
        assert_eq!(v["ok"], true, "{ack}");
        v["seq"].as_u64().unwrap()
    };
    let mut seqs = vec![
        first(&mut a_in, &mut a_out, "a"),
        first(&mut b_in, &mut b_out, "b"),
    ];
    assert!(a.try_wait().unwrap().is_none() && b.try_wait().unwrap().is_none());
    let wa = std::thread::spawn({
        let input = lines("a");
        move || a_in.write_all(input.as_bytes()).unwrap()
    });
    let wb = std::thread::spawn({
        let input = lines("b");
        move || b_in.write_all(input.as_bytes()).unwrap()
    });
    let read_all = |out: std::io::BufReader<std::process::ChildStdout>| {
        std::thread::spawn(move || {
            std::io::BufRead::lines(out)
                .map(|l| {
                    let l = l.unwrap();
                    let v: Value = serde_json::from_str(&l).unwrap();
                    assert_eq!(v["ok"], true, "{l}");
                    v["seq"].as_u64().unwrap()
                })
                .collect::<Vec<u64>>()
        })
    };
    let (ra, rb) = (read_all(a_out), read_all(b_out));
    wa.join().unwrap();
    wb.join().unwrap();
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    seqs.extend(ra.join().unwrap());
    seqs.extend(rb.join().unwrap());
    let n = n + 1;
    assert_eq!(seqs.len(), 2 * n as usize);
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 2 * n as usize, "every seq is unique");
    let events = env.events("u");
    assert_eq!(
        events.len(),
        1 + 2 + 2 * n as usize,
        "nothing lost, nothing doubled"
    );
    let show = env.json(&["progress", "upgrade", "show", "u"]);
    assert_eq!(show["overall_percentage"], 100.0, "both tasks ended at 100");
    assert_eq!(show["active_tasks"], 2);
}

#[test]
fn ack_events_returns_what_each_line_committed() {
    let env = Env::new();
    let input = [
        r#"{"op":"upgrade.create","upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#,
        r#"{"op":"task.add","upgrade_id":"u1","task_id":"g","task_name":"Group","task_type":"upgrade_step"}"#,
        r#"{"op":"task.add","upgrade_id":"u1","task_id":"t","name":"T","task_type":"upgrade_step","parent_task_id":"g"}"#,
        r#"{"op":"task.start","upgrade_id":"u1","task_id":"t","message":"go"}"#,
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"t","percentage":40.0,"message":"m","details":{"k":1}}"#,
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"nope","percentage":1}"#,
    ]
    .join("\n");
    let (code, acks, stderr) = apply_with(&env, &["progress", "apply", "--ack-events"], &input);
    assert_eq!(code, Some(1), "{stderr}");
    let start = &acks[3];
    assert_eq!(start["ok"], true);
    let events = start["events"].as_array().unwrap();
    // The task's own event first, then the parent it set running.
    assert_eq!(events[0]["task_id"], "t");
    assert_eq!(events[0]["kind"], "task.started");
    assert_eq!(events[0]["message"], "go");
    assert!(
        events
            .iter()
            .any(|e| e["task_id"] == "g" && e["status"] == "in_progress")
    );
    assert_eq!(start["seq"], events.last().unwrap()["seq"]);
    let changes = start["status_changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["task_id"] == "t" && c["to"] == "in_progress")
    );
    let update = &acks[4]["events"][0];
    assert_eq!(update["percentage"], 40.0);
    assert_eq!(update["details"], serde_json::json!({"k": 1}));
    assert_eq!(acks[5]["code"], "not_found");
    // task_name (the reference's name) was accepted for task.add.
    assert_eq!(
        env.json(&["progress", "task", "show", "u1", "g"])["task_name"],
        "Group"
    );
    // Without the flag, acknowledgements stay small.
    let (_, plain, _) = apply(
        &env,
        r#"{"op":"task.update","upgrade_id":"u1","task_id":"t","percentage":50}"#,
    );
    assert!(plain[0].get("events").is_none(), "{plain:?}");
}

#[test]
fn artifacts_apply_answers_each_request() {
    let env = Env::new();
    let file = env.dir.path().join("kubelet.log");
    std::fs::write(&file, b"kubelet started\n").unwrap();
    let (code, acks, stderr) = apply_with(
        &env,
        &["artifacts", "apply"],
        r#"{"op":"session.create","upgrade_id":"u1","cluster_name":"prod","name":"s1","retention_days":7}"#,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let session = acks[0]["result"]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(acks[0]["result"]["retention_days"], 7);
    let lines = [
        format!(
            r#"{{"op":"collection.create","session_id":"{session}","name":"logs","task_id":"t1"}}"#
        ),
        format!(r#"{{"op":"session.get","session_id":"{session}"}}"#),
        r#"{"op":"session.get","session_id":"nope"}"#.to_owned(),
        "not json".to_owned(),
        String::new(),
        r#"{"op":"artifact.fly"}"#.to_owned(),
    ];
    let (code, acks, stderr) = apply_with(&env, &["artifacts", "apply"], &lines.join("\n"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("3 of 5 lines rejected"), "{stderr}");
    assert_eq!(
        acks.len(),
        5,
        "one acknowledgement per non-blank line: {acks:?}"
    );
    let collection = acks[0]["result"]["collection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(acks[1]["result"]["collections"][0]["name"], "logs");
    assert_eq!(acks[1]["result"]["total_artifacts"], 0);
    assert_eq!(
        (&acks[2]["code"], &acks[2]["line"]),
        (&"not_found".into(), &3.into())
    );
    assert!(
        acks[3]["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request")
    );
    assert!(acks[4]["error"].as_str().unwrap().contains("artifact.fly"));

    let add = |extra: &str| {
        format!(
            r#"{{"op":"artifact.add","session_id":"{session}","collection_id":"{collection}","path":{:?}{extra}}}"#,
            file.to_str().unwrap()
        )
    };
    let lines = [
        add(r#","tags":["node"],"task_id":"t1","metadata":{"n":1}"#),
        add(r#","name":"other.log","artifact_type":"diagnostic""#),
        format!(
            r#"{{"op":"artifact.add","session_id":"{session}","collection_id":"nope","path":"/etc/hostname"}}"#
        ),
        format!(r#"{{"op":"artifact.search","session_id":"{session}","tags":["node"]}}"#),
        format!(r#"{{"op":"stats","session_id":"{session}"}}"#),
    ];
    let (_, acks, _) = apply_with(&env, &["artifacts", "apply"], &lines.join("\n"));
    let a = &acks[0]["result"][0];
    assert_eq!(a["name"], "kubelet.log");
    assert_eq!(a["file_size"], 16);
    assert_eq!(a["metadata"], serde_json::json!({"n": 1}));
    assert_eq!(acks[1]["result"][0]["artifact_type"], "diagnostic");
    assert_eq!(acks[2]["code"], "not_found");
    let found = acks[3]["result"]["artifacts"].as_array().unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["artifact_id"], a["artifact_id"]);
    assert_eq!(acks[4]["result"]["total_artifacts"], 2);
    // What apply added, the other commands see.
    let listed = env.json(&["artifacts", "search", "--session", &session]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
}

#[test]
fn errors_as_json_for_programs() {
    let env = Env::with_task();
    let out = env
        .command()
        .env("EUA_ERROR_FORMAT", "json")
        .args(["progress", "task", "show", "u", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("\"nope\""),
        "{v}"
    );
    // Without it, the usual line.
    let err = env.fails(1, &["progress", "task", "show", "u", "nope"]);
    assert!(err.starts_with("error: "), "{err}");
}

#[test]
fn an_id_on_a_request_comes_back_on_its_acknowledgement() {
    let env = Env::new();
    let input = [
        r#"{"id":1,"op":"upgrade.create","upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#,
        r#"{"op":"task.add","upgrade_id":"u1","task_id":"t","name":"T","task_type":"upgrade_step","id":"two"}"#,
        r#"{"id":3,"op":"task.update","upgrade_id":"u1","task_id":"nope","percentage":1}"#,
        r#"{"id":4,"op":"task.fly","upgrade_id":"u1"}"#,
        r#"{"op":"task.start","upgrade_id":"u1","task_id":"t"}"#,
    ]
    .join("\n");
    for args in [
        &["progress", "apply"][..],
        &["progress", "apply", "--ack-events"][..],
    ] {
        let env = if args.len() == 2 { &env } else { &Env::new() };
        let (code, acks, stderr) = apply_with(env, args, &input);
        assert_eq!(code, Some(1), "{stderr}");
        let ids: Vec<&Value> = acks.iter().map(|a| &a["id"]).collect();
        assert_eq!(
            ids,
            [&1.into(), &"two".into(), &3.into(), &4.into(), &Value::Null],
            "{acks:?}"
        );
        assert_eq!(acks[1]["ok"], true);
        assert_eq!(acks[2]["code"], "not_found");
        assert_eq!(acks[3]["code"], "invalid_input");
        assert!(acks[4]["seq"].as_u64().unwrap() > 0, "{acks:?}");
    }

    let (_, acks, stderr) = apply_with(
        &env,
        &["artifacts", "apply"],
        &[
            r#"{"id":7,"op":"session.create","upgrade_id":"u1","cluster_name":"prod"}"#,
            r#"{"op":"session.get","session_id":"nope","id":[8]}"#,
            r#"{"op":"session.get","session_id":"nope"}"#,
        ]
        .join("\n"),
    );
    assert_eq!(acks[0]["id"], 7, "{stderr}");
    assert_eq!(acks[0]["ok"], true);
    assert_eq!(acks[1]["id"], serde_json::json!([8]));
    assert_eq!(acks[1]["code"], "not_found");
    assert!(acks[2].get("id").is_none(), "{acks:?}");
}
