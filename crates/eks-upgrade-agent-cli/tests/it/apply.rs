//! `progress apply`: one acknowledgement per line, bad lines reported and skipped, and two
//! processes writing the same store at once.

use std::io::Write;
use std::process::Stdio;

use serde_json::Value;

use crate::util::Env;

fn apply(env: &Env, input: &str) -> (Option<i32>, Vec<Value>, String) {
    let mut child = env
        .command()
        .args(["progress", "apply"])
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
    let spawn = |input: String| {
        let mut child = env
            .command()
            .args(["progress", "apply", "--max-batch", "7"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
        (child, writer)
    };
    let (a, wa) = spawn(lines("a"));
    let (b, wb) = spawn(lines("b"));
    wa.join().unwrap();
    wb.join().unwrap();
    let mut seqs = Vec::new();
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        for l in String::from_utf8(out.stdout).unwrap().lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["ok"], true, "{l}");
            seqs.push(v["seq"].as_u64().unwrap());
        }
    }
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
    assert_eq!(show["overall_progress"], 100.0, "both tasks ended at 100");
    assert_eq!(show["in_progress_tasks"], 2);
}
