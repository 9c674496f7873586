//! Moving over from the Python agent: import files shaped as the reference wrote them, and
//! round-trip our own exports.

use serde_json::json;

use crate::util::Env;

/// A progress file as the reference `ProgressTracker` wrote it (`json.dump(default=str)`, its
/// field names: `overall_percentage`, task and event `percentage`).
const PYTHON_FILE: &str = r#"{
  "upgrade_id": "upgrade-123",
  "plan_id": "plan-456",
  "cluster_name": "my-cluster",
  "status": "in_progress",
  "current_phase": "Initialization",
  "overall_percentage": 50.0,
  "duration": "0:00:01.500000",
  "started_at": "2025-10-20 05:25:00.869209+00:00",
  "completed_at": null,
  "estimated_completion": null,
  "tasks": {
    "task-1": {
      "task_id": "task-1",
      "task_name": "Deploy Infrastructure",
      "task_type": "upgrade_step",
      "status": "completed",
      "percentage": 100.0,
      "current_step": null,
      "total_steps": null,
      "completed_steps": 0,
      "started_at": "2025-10-20 05:25:00.870001+00:00",
      "completed_at": "2025-10-20 05:25:00.870781+00:00",
      "duration": "0:00:00.000780",
      "error_message": null,
      "retry_count": 0,
      "parent_task_id": null,
      "events": [
        {"event_id": "0b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d11", "timestamp": "2025-10-20 05:25:00.870001+00:00",
         "task_id": "task-1", "task_type": "upgrade_step", "status": "in_progress",
         "message": "Starting infrastructure deployment", "details": {}, "percentage": 0.0},
        {"event_id": "1b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d12", "timestamp": "2025-10-20 05:25:00.870500+00:00",
         "task_id": "task-1", "task_type": "upgrade_step", "status": "in_progress",
         "message": "Half way complete", "details": {"nodes": 3}, "percentage": 50.0},
        {"event_id": "2b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d13", "timestamp": "2025-10-20T05:25:00.870781",
         "task_id": "task-1", "task_type": "upgrade_step", "status": "completed",
         "message": "Infrastructure deployed successfully", "details": null, "percentage": 100.0}
      ],
      "metadata": {}
    },
    "task-2": {
      "task_id": "task-2",
      "task_name": "Validate",
      "task_type": "validation",
      "status": "not_started",
      "percentage": 0.0,
      "started_at": null,
      "completed_at": null,
      "duration": null,
      "error_message": null,
      "retry_count": 0,
      "parent_task_id": null,
      "events": [],
      "metadata": {"owner": "sre"}
    },
    "task-2a": {
      "task_id": "task-2a",
      "task_name": "Smoke tests",
      "task_type": "validation",
      "status": "failed",
      "percentage": 30.0,
      "error_message": "coredns not ready",
      "retry_count": 2,
      "parent_task_id": "task-2",
      "duration": "1 day, 0:00:01.5",
      "events": []
    }
  },
  "metadata": {"requested_by": "ops"}
}"#;

/// The same file with the names our exports used before (`overall_progress`, task and event
/// `progress_percentage`, `name`): still read alike.
fn old_names_file() -> String {
    PYTHON_FILE
        .replace("\"overall_percentage\"", "\"overall_progress\"")
        .replace("\"percentage\"", "\"progress_percentage\"")
        .replace("\"task_name\"", "\"name\"")
}

#[test]
fn imports_a_file_the_python_agent_wrote() {
    for text in [PYTHON_FILE.to_owned(), old_names_file()] {
        imports_the_python_file(&text);
    }
}

fn imports_the_python_file(text: &str) {
    let env = Env::new();
    let file = env.dir.path().join("upgrade_upgrade-123.json");
    std::fs::write(&file, text).unwrap();
    let out = env.ok(&["progress", "import", file.to_str().unwrap()]);
    assert!(
        out.contains("imported upgrade upgrade-123 (3 tasks"),
        "{out}"
    );
    let show = env.json(&["progress", "upgrade", "show", "upgrade-123"]);
    assert_eq!(show["status"], "in_progress");
    assert_eq!(show["current_phase"], "Initialization");
    assert_eq!(show["started_at"], "2025-10-20T05:25:00.869209Z");
    assert_eq!(show["metadata"], json!({"requested_by": "ops"}));
    assert_eq!(
        (
            show["completed_tasks"].as_u64(),
            show["failed_tasks"].as_u64()
        ),
        (Some(1), Some(2)),
        "task-2 takes the status of its failed child (hierarchy rules)"
    );
    // task-2 shows its child's 30%; the upgrade shows (100 + 30) / 2.
    assert_eq!(show["overall_percentage"], 65.0);
    let t1 = env.json(&["progress", "task", "show", "upgrade-123", "task-1"]);
    assert_eq!(t1["duration"], 0.00078);
    assert_eq!(t1["task_name"], "Deploy Infrastructure");
    assert_eq!(t1["percentage"], 100.0);
    let recent = t1["recent_events"].as_array().unwrap();
    assert_eq!(recent.len(), 3);
    assert_eq!(recent[1]["percentage"], 50.0, "event percentages are read");
    assert_eq!(recent[0]["message"], "Infrastructure deployed successfully");
    assert_eq!(recent[0]["kind"], "task.completed");
    assert_eq!(recent[1]["details"], json!({"nodes": 3}));
    assert_eq!(
        recent[2]["event_id"],
        "0b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d11"
    );
    let t2a = env.json(&["progress", "task", "show", "upgrade-123", "task-2a"]);
    assert_eq!(t2a["duration"], 86_401.5);
    assert_eq!(t2a["retry_count"], 2);
    assert_eq!(t2a["parent_task_id"], "task-2");
    // The imported history continues: new updates append after it.
    env.ok(&["progress", "task", "retry", "upgrade-123", "task-2a"]);
    assert_eq!(
        env.json(&["progress", "task", "show", "upgrade-123", "task-2a"])["retry_count"],
        3
    );

    // Importing the same upgrade twice is refused and changes nothing.
    let before = env.events("upgrade-123");
    let err = env.fails(1, &["progress", "import", file.to_str().unwrap()]);
    assert!(
        err.contains("upgrade \"upgrade-123\" already exists"),
        "{err}"
    );
    assert_eq!(env.events("upgrade-123"), before);
}

#[test]
fn export_then_import_round_trips() {
    let env = Env::new();
    env.json(&["demo", "--speed", "500", "--upgrade-id", "d1"]);
    let file = env.dir.path().join("upgrade_d1.json");
    env.ok(&["progress", "export", "d1", "--out", file.to_str().unwrap()]);
    let other = Env::new();
    other.ok(&["progress", "import", file.to_str().unwrap()]);
    let a = env.json(&["progress", "upgrade", "show", "d1"]);
    let b = other.json(&["progress", "upgrade", "show", "d1"]);
    for key in [
        "status",
        "current_phase",
        "overall_percentage",
        "total_tasks",
        "completed_tasks",
        "started_at",
        "completed_at",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    let strip = |v: serde_json::Value| -> Vec<serde_json::Value> {
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let mut t = t.clone();
                t.as_object_mut().unwrap().remove("last_message");
                t
            })
            .collect()
    };
    assert_eq!(strip(a), strip(b));
    assert_eq!(env.events("d1").len(), other.events("d1").len());
}

#[test]
fn malformed_files_are_rejected_and_change_nothing() {
    let env = Env::new();
    let cases = [
        (r#"{"upgrade_id": "u", "cluster_na"#, "malformed JSON: EOF"),
        (r#"[1, 2]"#, "must be a JSON object"),
        (r#"{"cluster_name": "c"}"#, "missing field upgrade_id"),
        (
            r#"{"upgrade_id": "u", "cluster_name": "c", "started_at": "yesterday"}"#,
            "invalid time \"yesterday\"",
        ),
        (
            r#"{"upgrade_id": "u", "cluster_name": "c", "status": "exploded"}"#,
            "invalid status \"exploded\"",
        ),
        (
            r#"{"upgrade_id": "u", "cluster_name": "c", "tasks": {"a": {"task_type": "upgrade_step", "parent_task_id": "b"}, "b": {"task_type": "upgrade_step", "parent_task_id": "a"}}}"#,
            "parent cycle",
        ),
        (
            r#"{"upgrade_id": "u", "cluster_name": "c", "tasks": {"a": {"task_type": "upgrade_step", "parent_task_id": "zz"}}}"#,
            "unknown parent \"zz\"",
        ),
        (
            r#"{"upgrade_id": "u", "cluster_name": "c", "tasks": {"a": {"progress_percentage": 180}}}"#,
            "got 180",
        ),
        (r#"{"upgrade_id": "../etc", "cluster_name": "c"}"#, "'/'"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let file = env.dir.path().join(format!("bad{i}.json"));
        std::fs::write(&file, text).unwrap();
        let err = env.fails(1, &["progress", "import", file.to_str().unwrap()]);
        assert!(
            err.contains(needle),
            "case {i}: expected {needle:?} in {err}"
        );
    }
    let err = env.fails(1, &["progress", "import", "/nonexistent/upgrade_x.json"]);
    assert!(
        err.contains("cannot read /nonexistent/upgrade_x.json"),
        "{err}"
    );
    assert_eq!(env.json(&["progress", "upgrade", "list"]), json!([]));
}

/// Every key of an object, recursively: names the old spellings wherever they hide.
fn keys(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                out.insert(k.clone());
                keys(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
        _ => {}
    }
}

#[test]
fn export_writes_the_reference_names() {
    let env = Env::new();
    env.json(&["demo", "--speed", "500", "--upgrade-id", "d1"]);
    let file = env.dir.path().join("upgrade_d1.json");
    env.ok(&["progress", "export", "d1", "--out", file.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for key in [
        "upgrade_id",
        "plan_id",
        "cluster_name",
        "status",
        "started_at",
        "completed_at",
        "duration",
        "overall_percentage",
        "current_phase",
        "tasks",
        "metadata",
    ] {
        assert!(v.get(key).is_some(), "upgrade key {key} missing");
    }
    assert_eq!(v["overall_percentage"], 100.0);
    let duration = v["duration"].as_str().expect("duration as str(timedelta)");
    assert!(duration.starts_with("0:00:"), "{duration}");
    let tasks = v["tasks"].as_object().unwrap();
    assert!(!tasks.is_empty());
    for (id, t) in tasks {
        for key in [
            "task_id",
            "task_name",
            "task_type",
            "parent_task_id",
            "status",
            "started_at",
            "completed_at",
            "duration",
            "percentage",
            "current_step",
            "total_steps",
            "completed_steps",
            "error_message",
            "retry_count",
            "events",
        ] {
            assert!(t.get(key).is_some(), "task {id}: key {key} missing");
        }
        for e in t["events"].as_array().unwrap() {
            for key in [
                "event_id",
                "timestamp",
                "task_id",
                "task_type",
                "status",
                "message",
                "details",
                "percentage",
            ] {
                assert!(e.get(key).is_some(), "task {id} event: key {key} missing");
            }
        }
    }
    let completed = tasks.values().find(|t| t["status"] == "completed").unwrap();
    assert!(completed["duration"].as_str().unwrap().starts_with("0:00:"));
    let mut all = std::collections::BTreeSet::new();
    keys(&v, &mut all);
    for old in ["overall_progress", "progress_percentage", "name"] {
        assert!(!all.contains(old), "export still writes {old}");
    }
}

#[test]
fn summary_and_task_detail_carry_the_reference_keys() {
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
    env.ok(&["progress", "upgrade", "start", "u", "--phase", "nodes"]);
    for (id, name) in [
        ("a", "Alpha"),
        ("b", "Beta"),
        ("c", "Gamma"),
        ("d", "Delta"),
    ] {
        env.ok(&[
            "progress",
            "task",
            "add",
            "u",
            id,
            "--name",
            name,
            "--type",
            "upgrade_step",
        ]);
    }
    env.ok(&["progress", "task", "start", "u", "b"]);
    env.ok(&["progress", "task", "update", "u", "b", "--percent", "40"]);
    env.ok(&["progress", "task", "start", "u", "c"]);
    env.ok(&["progress", "task", "start", "u", "a"]);
    env.ok(&["progress", "task", "fail", "u", "a", "--error", "boom"]);
    env.ok(&["progress", "task", "start", "u", "d"]);
    env.ok(&["progress", "task", "fail", "u", "d", "--error", "bang"]);
    let s = env.json(&["progress", "upgrade", "show", "u"]);
    assert_eq!(s["overall_percentage"], 10.0);
    assert_eq!(s["progress_percentage"], 10.0);
    assert_eq!(s["active_tasks"], 2);
    assert_eq!(s["failed_tasks"], 2);
    assert_eq!(s["completed_tasks"], 0);
    assert_eq!(s["total_tasks"], 4);
    assert_eq!(s["active_task_names"], json!(["Beta", "Gamma"]));
    assert_eq!(s["failed_task_names"], json!(["Alpha", "Delta"]));
    assert_eq!(
        s["current_task"],
        json!({"task_id": "b", "task_name": "Beta", "status": "in_progress", "percentage": 40.0})
    );
    assert_eq!(s["current_phase"], "nodes");
    assert!(s["started_at"].is_string());
    assert!(s["duration"].as_f64().unwrap() >= 0.0);
    for old in ["overall_progress", "in_progress_tasks"] {
        assert!(s.get(old).is_none(), "summary still has {old}");
    }
    // No task running: the most recently added failed one.
    env.ok(&["progress", "task", "complete", "u", "b"]);
    env.ok(&["progress", "task", "complete", "u", "c"]);
    let s = env.json(&["progress", "upgrade", "show", "u"]);
    assert_eq!(s["active_task_names"], json!([]));
    assert_eq!(s["current_task"]["task_id"], "d");
    assert_eq!(s["current_task"]["status"], "failed");
    // A retry runs the task again: it is the current task once more.
    env.ok(&["progress", "task", "retry", "u", "d"]);
    let s = env.json(&["progress", "upgrade", "show", "u"]);
    assert_eq!(s["current_task"]["task_id"], "d");
    assert_eq!(s["failed_task_names"], json!(["Alpha"]));
    env.ok(&["progress", "task", "complete", "u", "d"]);
    env.ok(&["progress", "task", "retry", "u", "a"]);
    env.ok(&["progress", "task", "complete", "u", "a"]);
    let s = env.json(&["progress", "upgrade", "show", "u"]);
    assert_eq!(s["current_task"], serde_json::Value::Null);
    assert_eq!(s["failed_task_names"], json!([]));

    let t = env.json(&["progress", "task", "show", "u", "b"]);
    for key in [
        "task_id",
        "task_name",
        "task_type",
        "status",
        "percentage",
        "current_step",
        "completed_steps",
        "total_steps",
        "started_at",
        "duration",
        "error_message",
        "recent_events",
    ] {
        assert!(t.get(key).is_some(), "task detail key {key} missing");
    }
    assert!(t.get("name").is_none());
    let e = &t["recent_events"][0];
    for key in ["timestamp", "status", "message", "percentage"] {
        assert!(e.get(key).is_some(), "recent event key {key} missing");
    }
    assert_eq!(e["percentage"], 100.0);
}
