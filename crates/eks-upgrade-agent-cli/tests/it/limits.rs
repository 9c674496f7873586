//! The documented limits (README "Limits"), each at its boundary: the last value allowed is
//! accepted, the next is refused with a message naming the limit, and nothing changes. Plus the
//! documented exit code on a closed stdout.

use std::io::BufRead;
use std::process::Stdio;

use serde_json::json;

use crate::util::Env;

const KIB: usize = 1024;

#[test]
fn message_and_details_limits_hold_at_their_boundary() {
    let env = Env::with_task();
    let at = "m".repeat(16 * KIB);
    let over = "m".repeat(16 * KIB + 1);
    env.ok(&[
        "progress",
        "task",
        "update",
        "u",
        "t",
        "--percent",
        "1",
        "-m",
        &at,
    ]);
    let err = env.fails(
        1,
        &[
            "progress",
            "task",
            "update",
            "u",
            "t",
            "--percent",
            "2",
            "-m",
            &over,
        ],
    );
    assert!(err.contains("limit is 16384"), "{err}");
    let err = env.fails(1, &["progress", "task", "fail", "u", "t", "--error", &over]);
    assert!(err.contains("limit is 16384"), "{err}");
    // details: {"k":"..."} is 8 bytes plus the value.
    let at = format!("k={}", "d".repeat(64 * KIB - 8));
    let over = format!("k={}", "d".repeat(64 * KIB - 7));
    env.ok(&[
        "progress",
        "task",
        "update",
        "u",
        "t",
        "--percent",
        "3",
        "--detail",
        &at,
    ]);
    let err = env.fails(
        1,
        &[
            "progress",
            "task",
            "update",
            "u",
            "t",
            "--percent",
            "4",
            "--detail",
            &over,
        ],
    );
    assert!(err.contains("limit is 65536"), "{err}");
    let err = env.fails(
        1,
        &[
            "progress",
            "upgrade",
            "create",
            "u2",
            "--plan",
            "p",
            "--cluster",
            "c",
            "--meta",
            &over,
        ],
    );
    assert!(err.contains("limit is 65536"), "{err}");
    let pcts: Vec<f64> = env
        .events("u")
        .iter()
        .filter_map(|e| e["percentage"].as_f64())
        .collect();
    assert_eq!(
        pcts.last(),
        Some(&3.0),
        "only the allowed updates were recorded"
    );
}

#[test]
fn task_trees_are_32_levels_deep_and_no_deeper() {
    let env = Env::with_task();
    // t is depth 0; d1..d32 are depths 1..32; d33 would be 33.
    let mut input = String::new();
    for i in 1..=33 {
        let parent = if i == 1 {
            "t".to_owned()
        } else {
            format!("d{}", i - 1)
        };
        input.push_str(
            &json!({"op": "task.add", "upgrade_id": "u", "task_id": format!("d{i}"),
                    "name": "D", "task_type": "upgrade_step", "parent_task_id": parent})
            .to_string(),
        );
        input.push('\n');
    }
    let acks = env.apply(&input);
    assert_eq!(acks.len(), 33);
    assert!(acks[..32].iter().all(|a| a["ok"] == true), "{acks:?}");
    assert_eq!(acks[32]["ok"], false);
    assert!(
        acks[32]["error"]
            .as_str()
            .unwrap()
            .contains("the limit is 32"),
        "{}",
        acks[32]
    );
    env.fails(1, &["progress", "task", "show", "u", "d33"]);
}

#[test]
fn apply_lines_are_one_mib_and_no_longer() {
    let env = Env::with_task();
    let line = |len: usize, pct: u32| {
        let mut l =
            json!({"op": "task.update", "upgrade_id": "u", "task_id": "t", "percentage": pct})
                .to_string();
        // JSON allows trailing whitespace: pad to exactly `len` bytes before the newline.
        l.push_str(&" ".repeat(len - l.len()));
        l.push('\n');
        l
    };
    let acks = env.apply(&(line(KIB * KIB, 10) + &line(KIB * KIB + 1, 20) + &line(100, 30)));
    assert_eq!(acks.len(), 3, "{acks:?}");
    assert_eq!(acks[0]["ok"], true);
    assert_eq!(acks[1]["ok"], false);
    assert!(
        acks[1]["error"]
            .as_str()
            .unwrap()
            .contains("longer than 1048576"),
        "{}",
        acks[1]
    );
    assert_eq!(
        acks[2]["ok"], true,
        "the stream goes on after an oversize line"
    );
    let pcts: Vec<f64> = env
        .events("u")
        .iter()
        .filter_map(|e| e["percentage"].as_f64())
        .collect();
    assert_eq!(&pcts[pcts.len() - 2..], [10.0, 30.0]);
}

/// `| head` closes stdout early: the command exits 0, quietly (README, main.rs exit codes).
#[test]
fn a_closed_stdout_exits_zero_quietly() {
    let env = Env::with_task();
    let input: String = (0..20_000)
        .map(|i| {
            format!(
                "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"t\",\"percentage\":{}}}\n",
                i % 100
            )
        })
        .collect();
    assert_eq!(env.apply(&input).len(), 20_000);
    let mut child = env
        .command()
        .args(["progress", "events", "u"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("SEQ"), "the header row: {first}");
    first.clear();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("upgrade.created"), "{first}");
    drop(out);
    let done = child.wait_with_output().unwrap();
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        done.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
}
