//! Moving over from the Python agent: import files shaped as the reference wrote them, and
//! round-trip our own exports.

use serde_json::json;

use crate::util::Env;

/// A progress file as the reference `ProgressTracker` wrote it (`json.dump(default=str)`).
const PYTHON_FILE: &str = r#"{
  "upgrade_id": "upgrade-123",
  "plan_id": "plan-456",
  "cluster_name": "my-cluster",
  "status": "in_progress",
  "current_phase": "Initialization",
  "overall_progress": 50.0,
  "started_at": "2025-10-20 05:25:00.869209+00:00",
  "completed_at": null,
  "estimated_completion": null,
  "tasks": {
    "task-1": {
      "task_id": "task-1",
      "task_name": "Deploy Infrastructure",
      "task_type": "upgrade_step",
      "status": "completed",
      "progress_percentage": 100.0,
      "current_step": null,
      "total_steps": null,
      "completed_steps": 0,
      "started_at": "2025-10-20 05:25:00.870001+00:00",
      "completed_at": "2025-10-20 05:25:00.870781+00:00",
      "duration": "0:00:00.000780",
      "error_message": null,
      "retry_count": 0,
      "parent_task_id": null,
      "subtasks": [],
      "events": [
        {"event_id": "0b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d11", "timestamp": "2025-10-20 05:25:00.870001+00:00",
         "task_id": "task-1", "task_type": "upgrade_step", "status": "in_progress",
         "message": "Starting infrastructure deployment", "details": {}, "progress_percentage": 0.0},
        {"event_id": "1b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d12", "timestamp": "2025-10-20 05:25:00.870500+00:00",
         "task_id": "task-1", "task_type": "upgrade_step", "status": "in_progress",
         "message": "Half way complete", "details": {"nodes": 3}, "progress_percentage": 50.0},
        {"event_id": "2b7c1c52-9f1e-4a57-b7a8-0a4f3f0d9d13", "timestamp": "2025-10-20T05:25:00.870781",
         "task_id": "task-1", "task_type": "upgrade_step", "status": "completed",
         "message": "Infrastructure deployed successfully", "details": null, "progress_percentage": 100.0}
      ],
      "metadata": {}
    },
    "task-2": {
      "task_id": "task-2",
      "task_name": "Validate",
      "task_type": "validation",
      "status": "not_started",
      "progress_percentage": 0.0,
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
      "progress_percentage": 30.0,
      "error_message": "coredns not ready",
      "retry_count": 2,
      "parent_task_id": "task-2",
      "duration": "1 day, 0:00:01.5",
      "events": []
    }
  },
  "metadata": {"requested_by": "ops"}
}"#;

#[test]
fn imports_a_file_the_python_agent_wrote() {
    let env = Env::new();
    let file = env.dir.path().join("upgrade_upgrade-123.json");
    std::fs::write(&file, PYTHON_FILE).unwrap();
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
    assert_eq!(show["overall_progress"], 65.0);
    let t1 = env.json(&["progress", "task", "show", "upgrade-123", "task-1"]);
    assert_eq!(t1["duration"], 0.00078);
    assert_eq!(t1["name"], "Deploy Infrastructure");
    let recent = t1["recent_events"].as_array().unwrap();
    assert_eq!(recent.len(), 3);
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
        "overall_progress",
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
