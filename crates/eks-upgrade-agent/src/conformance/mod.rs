//! The `ProgressStore` conformance suite. Every backend runs it through [`run`] with a factory
//! that returns a fresh, empty store; differences between backends are parameters, never copies
//! of the suite.

use std::sync::Arc;

use serde_json::json;

use crate::error::Error;
use crate::model::{EventKind, JsonMap, ProgressEvent, ProgressStatus, Task, TaskType, Upgrade};
use crate::progress::tracker::ProgressTracker;
use crate::store::domain::command::{Command, NewTask};
use crate::store::{EventQuery, ProgressStore};

mod batches;
use batches::{
    a_batch_ends_where_its_commands_one_by_one_end, a_task_command_carries_its_task_as_it_left_it,
    no_command_carries_a_task,
};

pub type Factory<'a> = &'a dyn Fn() -> Box<dyn ProgressStore>;
type Case = (&'static str, fn(ProgressTracker));

/// What a backend's answers carry that another's may not: a parameter of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// `Committed::task` is filled (every store but `RemoteStore`: the store protocol leaves
    /// it out, and the suite then checks that it is `None`).
    pub committed_task: bool,
}

/// Runs every case against fresh stores from `factory`.
pub fn run(factory: Factory<'_>) {
    run_with(
        factory,
        Expect {
            committed_task: true,
        },
    );
}

/// [`run`], with what this backend's answers carry.
pub fn run_with(factory: Factory<'_>, expect: Expect) {
    let carried: fn(ProgressTracker) = if expect.committed_task {
        a_task_command_carries_its_task_as_it_left_it
    } else {
        no_command_carries_a_task
    };
    let cases: [Case; 18] = [
        ("upgrade_lifecycle", upgrade_lifecycle),
        ("unknown_and_duplicate_ids", unknown_and_duplicate_ids),
        (
            "seq_is_store_wide_and_strictly_increasing",
            seq_is_store_wide,
        ),
        ("task_state_machine", task_state_machine),
        (
            "rejected_commands_change_nothing",
            rejected_commands_change_nothing,
        ),
        ("rollup_weighted_and_nested", rollup_weighted_and_nested),
        ("steps_set_percentage", steps_set_percentage),
        ("summary_counters", summary_counters),
        ("recent_events_newest_first", recent_events_newest_first),
        (
            "batch_commits_good_and_skips_bad",
            batch_commits_good_and_skips_bad,
        ),
        ("add_many_is_all_or_nothing", add_many_is_all_or_nothing),
        ("latest_events_of_an_upgrade", latest_events_of_an_upgrade),
        (
            "hierarchy_statuses_follow_children",
            hierarchy_statuses_follow_children,
        ),
        ("pages_of_upgrades_and_tasks", pages_of_upgrades_and_tasks),
        (
            "hostile_imports_are_refused_whole",
            hostile_imports_are_refused_whole,
        ),
        (
            "completions_and_imports_feed_the_history",
            completions_and_imports_feed_the_history,
        ),
        (
            "a_batch_ends_where_its_commands_one_by_one_end",
            a_batch_ends_where_its_commands_one_by_one_end,
        ),
        ("a_task_command_carries_its_task_as_it_left_it", carried),
    ];
    for (name, case) in cases {
        let store: Arc<dyn ProgressStore> = Arc::from(factory());
        eprintln!("conformance: {name}");
        case(ProgressTracker::new(store));
    }
}

fn setup(t: &ProgressTracker, u: &str) {
    t.create_upgrade(u, "plan", "cluster", JsonMap::new())
        .unwrap();
}

fn add(t: &ProgressTracker, u: &str, id: &str, parent: Option<&str>, weight: f64) {
    let mut task = NewTask::new(id, id.to_uppercase(), TaskType::UpgradeStep).weight(weight);
    task.parent_task_id = parent.map(Into::into);
    t.add_task(u, task).unwrap();
}

fn pct(t: &ProgressTracker, u: &str, id: &str) -> f64 {
    t.task_detail(u, id).unwrap().task.percentage
}

fn upgrade_lifecycle(t: ProgressTracker) {
    let mut meta = JsonMap::new();
    meta.insert("team".into(), json!("platform"));
    t.create_upgrade("u1", "p1", "prod", meta.clone()).unwrap();
    let u = t.upgrade("u1").unwrap();
    assert_eq!(u.status, ProgressStatus::NotStarted);
    assert_eq!(u.metadata, meta);
    t.start_upgrade("u1", Some("plan")).unwrap();
    t.set_phase("u1", "control-plane").unwrap();
    let s = t.summary("u1").unwrap();
    assert_eq!(s.status, ProgressStatus::InProgress);
    assert_eq!(s.current_phase.as_deref(), Some("control-plane"));
    assert!(s.started_at.is_some());
    let err = t.start_upgrade("u1", None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTransition {
                from: ProgressStatus::InProgress,
                ..
            }
        ),
        "{err}"
    );
    t.fail_upgrade("u1", "control plane timed out").unwrap();
    let s = t.summary("u1").unwrap();
    assert_eq!(s.status, ProgressStatus::Failed);
    assert_eq!(s.error_message.as_deref(), Some("control plane timed out"));
    assert!(s.completed_at.is_some());
    assert!(t.complete_upgrade("u1").is_err());
    assert!(t.set_phase("u1", "again").is_err());

    t.create_upgrade("u2", "p1", "prod", JsonMap::new())
        .unwrap();
    assert!(matches!(
        t.complete_upgrade("u2"),
        Err(Error::InvalidTransition { .. })
    ));
    t.start_upgrade("u2", None).unwrap();
    t.complete_upgrade("u2").unwrap();
    let ids: Vec<_> = t
        .list_upgrades()
        .unwrap()
        .into_iter()
        .map(|u| u.upgrade_id)
        .collect();
    assert_eq!(ids, ["u1", "u2"]);
    let kinds: Vec<_> = t
        .events_since(Some("u1"), 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EventKind::UpgradeCreated,
            EventKind::UpgradeStarted,
            EventKind::UpgradePhaseChanged,
            EventKind::UpgradeFailed
        ]
    );
}

fn unknown_and_duplicate_ids(t: ProgressTracker) {
    assert!(matches!(t.summary("nope"), Err(Error::NotFound { .. })));
    assert!(matches!(
        t.start_upgrade("nope", None),
        Err(Error::NotFound { .. })
    ));
    setup(&t, "u");
    assert!(matches!(
        t.create_upgrade("u", "p", "c", JsonMap::new()),
        Err(Error::AlreadyExists { .. })
    ));
    add(&t, "u", "a", None, 1.0);
    let err = t
        .add_task("u", NewTask::new("a", "A", TaskType::Cleanup))
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    let err = t
        .add_task(
            "u",
            NewTask::new("b", "B", TaskType::Cleanup).parent("ghost"),
        )
        .unwrap_err();
    assert!(err.to_string().contains("parent task \"ghost\""), "{err}");
    let err = t.start_task("u", "ghost", None).unwrap_err();
    assert_eq!(err.to_string(), "task \"ghost\" of upgrade \"u\" not found");
    assert!(matches!(
        t.task_detail("u", "ghost"),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        t.events_since(Some("ghost"), 0, 10),
        Err(Error::NotFound { .. })
    ));
    // Same task id in another upgrade is fine.
    setup(&t, "v");
    add(&t, "v", "a", None, 1.0);
}

fn latest_events_of_an_upgrade(t: ProgressTracker) {
    setup(&t, "a");
    setup(&t, "b");
    add(&t, "a", "t", None, 1.0);
    add(&t, "b", "t", None, 1.0);
    for i in 0..10 {
        let u = if i % 2 == 0 { "a" } else { "b" };
        t.update_task(u, "t", f64::from(i) * 5.0, None, JsonMap::new())
            .unwrap();
    }
    let a = t.events_since(Some("a"), 0, 1000).unwrap();
    let latest = t.store().latest_events("a", 3).unwrap();
    assert_eq!(latest, a[a.len() - 3..], "the newest three, oldest first");
    assert_eq!(t.store().latest_events("a", 1000).unwrap(), a);
    assert!(t.store().latest_events("a", 0).unwrap().is_empty());
    assert!(matches!(
        t.store().latest_events("nope", 3),
        Err(Error::NotFound { .. })
    ));
}

fn seq_is_store_wide(t: ProgressTracker) {
    setup(&t, "a");
    setup(&t, "b");
    add(&t, "a", "t", None, 1.0);
    add(&t, "b", "t", None, 1.0);
    for i in 0..10 {
        let u = if i % 2 == 0 { "a" } else { "b" };
        t.update_task(u, "t", f64::from(i) * 5.0, None, JsonMap::new())
            .unwrap();
    }
    let all = t.events_since(None, 0, 1000).unwrap();
    assert_eq!(all.len(), 14);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(t.store().last_seq().unwrap(), all.last().unwrap().seq);
    let a = t.events_since(Some("a"), 0, 1000).unwrap();
    assert_eq!(a.len(), 7);
    assert!(a.iter().all(|e| e.upgrade_id == "a"));
    // `since` is strictly greater; limit caps.
    let after = t.events_since(None, all[5].seq, 3).unwrap();
    assert_eq!(
        after.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [all[6].seq, all[7].seq, all[8].seq]
    );
    assert!(
        t.events_since(None, all.last().unwrap().seq, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(t.upgrade("a").unwrap().last_seq, a.last().unwrap().seq);
    let ids: std::collections::HashSet<_> = all.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(ids.len(), all.len(), "event ids are unique");
}

fn task_state_machine(t: ProgressTracker) {
    setup(&t, "u");
    add(&t, "u", "t", None, 1.0);
    t.start_task("u", "t", Some("go")).unwrap();
    t.update_task("u", "t", 30.0, Some("30"), JsonMap::new())
        .unwrap();
    t.pause_task("u", "t", None).unwrap();
    let err = t
        .update_task("u", "t", 40.0, None, JsonMap::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTransition {
                from: ProgressStatus::Paused,
                ..
            }
        ),
        "{err}"
    );
    t.resume_task("u", "t", None).unwrap();
    t.fail_task("u", "t", "drain timed out").unwrap();
    let d = t.task_detail("u", "t").unwrap().task;
    assert_eq!(
        (d.status, d.error_message.as_deref()),
        (ProgressStatus::Failed, Some("drain timed out"))
    );
    assert!(d.duration.is_some());
    assert!(t.update_task("u", "t", 50.0, None, JsonMap::new()).is_err());
    t.retry_task("u", "t", None).unwrap();
    let d = t.task_detail("u", "t").unwrap().task;
    assert_eq!(
        (d.status, d.retry_count, d.percentage),
        (ProgressStatus::InProgress, 1, 0.0)
    );
    assert_eq!(d.error_message, None);
    t.cancel_task("u", "t", None).unwrap();
    t.retry_task("u", "t", None).unwrap();
    t.complete_task("u", "t", Some("done")).unwrap();
    let d = t.task_detail("u", "t").unwrap().task;
    assert_eq!(
        (d.status, d.retry_count, d.percentage),
        (ProgressStatus::Completed, 2, 100.0)
    );
    assert_eq!(d.last_message.as_deref(), Some("done"));
    for err in [
        t.update_task("u", "t", 1.0, None, JsonMap::new())
            .unwrap_err(),
        t.retry_task("u", "t", None).unwrap_err(),
        t.cancel_task("u", "t", None).unwrap_err(),
        t.start_task("u", "t", None).unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                Error::InvalidTransition {
                    from: ProgressStatus::Completed,
                    ..
                }
            ),
            "{err}"
        );
    }
    // Update of a task not started starts it.
    add(&t, "u", "t2", None, 1.0);
    t.update_task("u", "t2", 10.0, None, JsonMap::new())
        .unwrap();
    let d = t.task_detail("u", "t2").unwrap().task;
    assert_eq!(d.status, ProgressStatus::InProgress);
    assert!(d.started_at.is_some());
}

fn rejected_commands_change_nothing(t: ProgressTracker) {
    setup(&t, "u");
    add(&t, "u", "t", None, 1.0);
    t.update_task("u", "t", 40.0, None, JsonMap::new()).unwrap();
    let before_task = t.task_detail("u", "t").unwrap();
    let before_upgrade = t.upgrade("u").unwrap();
    let before_seq = t.store().last_seq().unwrap();
    let bad = [
        Command::TaskUpdate {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            percentage: f64::NAN,
            message: None,
            details: JsonMap::new(),
        },
        Command::TaskUpdate {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            percentage: 101.0,
            message: None,
            details: JsonMap::new(),
        },
        Command::TaskResume {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            message: None,
        },
        Command::TaskStep {
            upgrade_id: "u".into(),
            task_id: "ghost".into(),
            completed_steps: 1,
            current_step: None,
            message: None,
        },
        Command::TaskStart {
            upgrade_id: "u".into(),
            task_id: "bad\nid".into(),
            message: None,
        },
    ];
    for c in bad {
        assert!(t.execute(c.clone()).is_err(), "{c:?} must fail");
    }
    assert_eq!(t.task_detail("u", "t").unwrap(), before_task);
    assert_eq!(t.upgrade("u").unwrap(), before_upgrade);
    assert_eq!(t.store().last_seq().unwrap(), before_seq);
}

fn rollup_weighted_and_nested(t: ProgressTracker) {
    setup(&t, "u");
    add(&t, "u", "plan", None, 1.0);
    add(&t, "u", "nodes", None, 1.0);
    add(&t, "u", "ng1", Some("nodes"), 1.0);
    add(&t, "u", "ng2", Some("nodes"), 3.0);
    add(&t, "u", "n1", Some("ng1"), 1.0);
    add(&t, "u", "n2", Some("ng1"), 1.0);
    t.update_task("u", "n1", 100.0, None, JsonMap::new())
        .unwrap();
    assert_eq!(pct(&t, "u", "ng1"), 50.0);
    assert_eq!(pct(&t, "u", "nodes"), 12.5); // (1*50 + 3*0) / 4
    assert_eq!(t.summary("u").unwrap().overall_percentage, 6.25);
    t.update_task("u", "ng2", 50.0, None, JsonMap::new())
        .unwrap();
    assert_eq!(pct(&t, "u", "nodes"), 50.0); // (50 + 150) / 4
    let err = t
        .update_task("u", "ng1", 10.0, None, JsonMap::new())
        .unwrap_err();
    assert!(err.to_string().contains("rolled up"), "{err}");
    t.complete_task("u", "plan", None).unwrap();
    assert_eq!(t.summary("u").unwrap().overall_percentage, 75.0);
    // A parent with unfinished children cannot be completed; the error names them.
    let err = t.complete_task("u", "ng1", None).unwrap_err();
    assert!(
        matches!(err, Error::InvalidTransition { .. }) && err.to_string().contains("n1, n2"),
        "{err}"
    );
    t.complete_task("u", "n1", None).unwrap();
    t.complete_task("u", "n2", None).unwrap();
    // ...and completes with its last child.
    assert_eq!(status(&t, "u", "ng1"), ProgressStatus::Completed);
    assert_eq!(pct(&t, "u", "ng1"), 100.0);
    assert_eq!(pct(&t, "u", "nodes"), 62.5); // (100 + 150) / 4
    // Adding a child dilutes its parent.
    add(&t, "u", "ng3", Some("nodes"), 4.0);
    assert_eq!(pct(&t, "u", "nodes"), 31.25); // 250 / 8
    assert_eq!(t.task_detail("u", "nodes").unwrap().task.children, 3);
    for id in ["ng2", "ng3"] {
        t.complete_task("u", id, None).unwrap();
    }
    assert_eq!(pct(&t, "u", "nodes"), 100.0);
    assert_eq!(status(&t, "u", "nodes"), ProgressStatus::Completed);
    // Completing it again is a no-op, not an error (agents complete the group after its
    // children, as the reference did).
    let seq = t.store().last_seq().unwrap();
    t.complete_task("u", "nodes", None).unwrap();
    assert_eq!(t.store().last_seq().unwrap(), seq);
    assert_eq!(t.summary("u").unwrap().overall_percentage, 100.0);
}

fn status(t: &ProgressTracker, u: &str, id: &str) -> ProgressStatus {
    t.task_detail(u, id).unwrap().task.status
}

/// DESIGN.md "Hierarchy semantics": a task with children takes its status from them, in every
/// backend, with the parent's own events, status changes and notifications.
fn hierarchy_statuses_follow_children(t: ProgressTracker) {
    use ProgressStatus::*;
    setup(&t, "u");
    t.start_upgrade("u", None).unwrap();
    add(&t, "u", "nodes", None, 1.0);
    add(&t, "u", "ng1", Some("nodes"), 1.0);
    add(&t, "u", "ng2", Some("nodes"), 1.0);
    add(&t, "u", "n1", Some("ng1"), 1.0);
    add(&t, "u", "n2", Some("ng1"), 1.0);
    let all = |t: &ProgressTracker| -> Vec<ProgressStatus> {
        ["nodes", "ng1", "ng2", "n1", "n2"]
            .iter()
            .map(|id| status(t, "u", id))
            .collect()
    };
    assert_eq!(all(&t), [NotStarted; 5]);

    // A child starting starts every ancestor, each with its own event and status change.
    let c = t.start_task("u", "n1", None).unwrap();
    let kinds: Vec<_> = c
        .events
        .iter()
        .map(|e| (e.task_id.clone().unwrap(), e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("n1".into(), EventKind::TaskStarted),
            ("ng1".into(), EventKind::TaskStarted),
            ("nodes".into(), EventKind::TaskStarted)
        ]
    );
    assert_eq!(c.status_changes.len(), 3);
    assert_eq!(
        all(&t),
        [InProgress, InProgress, NotStarted, InProgress, NotStarted]
    );
    let s = t.summary("u").unwrap();
    assert_eq!((s.active_tasks, s.not_started_tasks), (3, 2));

    // A failed child fails its parent (while nothing else runs there), with the cause.
    t.fail_task("u", "n1", "PDB blocks eviction").unwrap();
    assert_eq!(all(&t), [Failed, Failed, NotStarted, Failed, NotStarted]);
    let ng1 = t.task_detail("u", "ng1").unwrap();
    assert_eq!(
        ng1.task.error_message.as_deref(),
        Some("subtask \"n1\" failed: PDB blocks eviction")
    );
    assert_eq!(ng1.recent_events[0].kind, EventKind::TaskFailed);
    assert_eq!(t.summary("u").unwrap().failed_tasks, 3);
    // A retry of the child reopens its ancestors.
    t.retry_task("u", "n1", None).unwrap();
    assert_eq!(
        all(&t),
        [InProgress, InProgress, NotStarted, InProgress, NotStarted]
    );
    assert_eq!(t.task_detail("u", "ng1").unwrap().task.error_message, None);

    // Completing a parent with unfinished children is refused and changes nothing.
    let seq = t.store().last_seq().unwrap();
    let err = t.complete_task("u", "nodes", None).unwrap_err();
    assert!(err.to_string().contains("ng1, ng2"), "{err}");
    assert_eq!(t.store().last_seq().unwrap(), seq);

    // Pausing a parent pauses its running leaves; resuming resumes them.
    t.start_task("u", "ng2", None).unwrap();
    t.pause_task("u", "nodes", Some("maintenance window"))
        .unwrap();
    assert_eq!(all(&t), [Paused, Paused, Paused, Paused, NotStarted]);
    t.resume_task("u", "nodes", None).unwrap();
    assert_eq!(
        all(&t),
        [InProgress, InProgress, InProgress, InProgress, NotStarted]
    );
    let err = t.resume_task("u", "nodes", None).unwrap_err();
    assert!(matches!(err, Error::InvalidTransition { .. }), "{err}");

    // Failing a parent fails its unfinished leaves.
    t.fail_task("u", "ng1", "node group unhealthy").unwrap();
    assert_eq!(status(&t, "u", "n1"), Failed);
    assert_eq!(status(&t, "u", "n2"), Failed);
    assert_eq!(status(&t, "u", "ng1"), Failed);
    assert_eq!(status(&t, "u", "nodes"), InProgress, "ng2 still runs");
    // Retrying it retries them.
    t.retry_task("u", "ng1", None).unwrap();
    assert_eq!(status(&t, "u", "n1"), InProgress);
    assert_eq!(status(&t, "u", "n2"), InProgress);

    // Cancelling a parent cancels its unfinished leaves; with one completed, it completes.
    t.complete_task("u", "n1", None).unwrap();
    t.cancel_task("u", "ng1", None).unwrap();
    assert_eq!(status(&t, "u", "n2"), Cancelled);
    assert_eq!(status(&t, "u", "ng1"), Completed);
    // Nothing below a completed task may reopen it, nor can it get a new child.
    let seq = t.store().last_seq().unwrap();
    let err = t.retry_task("u", "n2", None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTransition {
                from: Completed,
                ..
            }
        ),
        "{err}"
    );
    let task = NewTask::new("n3", "N3", TaskType::UpgradeStep).parent("ng1");
    let err = t.add_task("u", task).unwrap_err();
    assert!(matches!(err, Error::InvalidTransition { .. }), "{err}");
    assert_eq!(t.store().last_seq().unwrap(), seq);

    // The last child completing completes the group; percentages and counters agree.
    t.complete_task("u", "ng2", None).unwrap();
    assert_eq!(status(&t, "u", "nodes"), Completed);
    let s = t.summary("u").unwrap();
    assert_eq!(s.overall_percentage, 100.0);
    assert_eq!(
        (s.completed_tasks, s.cancelled_tasks, s.total_tasks),
        (4, 1, 5)
    );
    // A group's retry retries what failed, not what was cancelled on purpose; a paused task
    // without subtasks takes none (it would be resumed behind the operator's back).
    add(&t, "u", "grp", None, 1.0);
    for id in ["g1", "g2"] {
        add(&t, "u", id, Some("grp"), 1.0);
    }
    t.cancel_task("u", "g1", None).unwrap();
    t.fail_task("u", "g2", "boom").unwrap();
    t.retry_task("u", "grp", None).unwrap();
    assert_eq!(status(&t, "u", "g1"), Cancelled);
    assert_eq!(status(&t, "u", "g2"), InProgress);
    t.pause_task("u", "g2", None).unwrap();
    let err = t
        .add_task(
            "u",
            NewTask::new("g2a", "G2A", TaskType::UpgradeStep).parent("g2"),
        )
        .unwrap_err();
    assert!(err.to_string().contains("resume it first"), "{err}");
    assert_eq!(status(&t, "u", "g2"), Paused);
    // Every task's stored counters agree with a recount.
    let tasks = t.tasks("u").unwrap();
    let mut counts = [0u64; 6];
    for task in &tasks {
        counts[ProgressStatus::ALL
            .iter()
            .position(|x| *x == task.status)
            .unwrap()] += 1;
    }
    assert_eq!(t.upgrade("u").unwrap().task_counts, counts);
}

fn steps_set_percentage(t: ProgressTracker) {
    setup(&t, "u");
    t.add_task("u", NewTask::new("s", "S", TaskType::UpgradeStep).steps(8))
        .unwrap();
    t.step_task("u", "s", 2, Some("drain ip-1")).unwrap();
    let d = t.task_detail("u", "s").unwrap().task;
    assert_eq!((d.completed_steps, d.percentage), (2, 25.0));
    assert_eq!(d.current_step.as_deref(), Some("drain ip-1"));
    assert!(
        t.step_task("u", "s", 9, None)
            .unwrap_err()
            .to_string()
            .contains("exceeds")
    );
    // Without total_steps the percentage is left alone.
    add(&t, "u", "free", None, 1.0);
    t.update_task("u", "free", 10.0, None, JsonMap::new())
        .unwrap();
    t.step_task("u", "free", 3, Some("x")).unwrap();
    assert_eq!(pct(&t, "u", "free"), 10.0);
}

fn summary_counters(t: ProgressTracker) {
    setup(&t, "u");
    t.start_upgrade("u", None).unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|i| NewTask::new(format!("t{i}"), format!("T{i}"), TaskType::Validation))
        .collect();
    t.add_tasks("u", tasks).unwrap();
    t.start_task("u", "t0", None).unwrap();
    t.complete_task("u", "t1", None).unwrap();
    t.fail_task("u", "t2", "x").unwrap();
    t.start_task("u", "t3", None).unwrap();
    t.pause_task("u", "t3", None).unwrap();
    t.cancel_task("u", "t4", None).unwrap();
    let s = t.summary("u").unwrap();
    assert_eq!(
        (
            s.total_tasks,
            s.active_tasks,
            s.completed_tasks,
            s.failed_tasks,
            s.paused_tasks,
            s.cancelled_tasks,
            s.not_started_tasks
        ),
        (6, 1, 1, 1, 1, 1, 1)
    );
    t.retry_task("u", "t2", None).unwrap();
    let s = t.summary("u").unwrap();
    assert_eq!((s.active_tasks, s.failed_tasks), (2, 0));
    assert!(s.estimated_completion.is_some(), "progress was made");
}

fn recent_events_newest_first(t: ProgressTracker) {
    setup(&t, "u");
    add(&t, "u", "a", None, 1.0);
    add(&t, "u", "b", None, 1.0);
    for i in 1..=8 {
        t.update_task(
            "u",
            "a",
            f64::from(i),
            Some(&format!("a{i}")),
            JsonMap::new(),
        )
        .unwrap();
        t.update_task(
            "u",
            "b",
            f64::from(i),
            Some(&format!("b{i}")),
            JsonMap::new(),
        )
        .unwrap();
    }
    let d = t.task_detail("u", "a").unwrap();
    let msgs: Vec<_> = d
        .recent_events
        .iter()
        .map(|e| e.message.clone().unwrap())
        .collect();
    assert_eq!(msgs, ["a8", "a7", "a6", "a5", "a4"]);
    assert!(
        d.recent_events
            .iter()
            .all(|e| e.task_id.as_deref() == Some("a"))
    );
    assert_eq!(d.recent_events[0].task_type, Some(TaskType::UpgradeStep));
    let all = t.store().recent_task_events("u", "b", 100).unwrap();
    assert_eq!(all.len(), 9, "8 updates and the add");
    assert_eq!(all.last().unwrap().kind, EventKind::TaskAdded);
}

fn batch_commits_good_and_skips_bad(t: ProgressTracker) {
    setup(&t, "u");
    let cmds: Vec<Command> = serde_json::from_value(json!([
        {"op":"task.add","upgrade_id":"u","task_id":"t","name":"T","task_type":"upgrade_step"},
        {"op":"task.update","upgrade_id":"u","task_id":"t","percentage":20.0},
        {"op":"task.update","upgrade_id":"u","task_id":"ghost","percentage":20.0},
        {"op":"task.pause","upgrade_id":"u","task_id":"t"},
        {"op":"task.update","upgrade_id":"u","task_id":"t","percentage":30.0},
        {"op":"task.resume","upgrade_id":"u","task_id":"t"},
        {"op":"task.update","upgrade_id":"u","task_id":"t","percentage":40.0,"details":{"nodes":3}}
    ]))
    .unwrap();
    let results = t.execute_batch(&cmds).unwrap();
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, true, false, true, false, true, true]);
    let d = t.task_detail("u", "t").unwrap();
    assert_eq!(d.task.percentage, 40.0);
    assert_eq!(d.recent_events[0].details.get("nodes"), Some(&json!(3)));
    let seqs: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|c| c.last_seq())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(t.events_since(Some("u"), 0, 100).unwrap().len(), 6);
}

fn add_many_is_all_or_nothing(t: ProgressTracker) {
    setup(&t, "u");
    let err = t
        .add_tasks(
            "u",
            vec![
                NewTask::new("a", "A", TaskType::UpgradeStep),
                NewTask::new("b", "B", TaskType::UpgradeStep).parent("a"),
                NewTask::new("c", "C", TaskType::UpgradeStep).parent("missing"),
            ],
        )
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(t.tasks("u").unwrap().is_empty());
    assert_eq!(t.upgrade("u").unwrap().total_tasks(), 0);
    let err = t
        .add_tasks(
            "u",
            vec![
                NewTask::new("x", "X", TaskType::UpgradeStep).parent("y"),
                NewTask::new("y", "Y", TaskType::UpgradeStep).parent("x"),
            ],
        )
        .unwrap_err();
    assert!(err.to_string().contains("parent cycle"), "{err}");
    // Children may come before their parents in a batch.
    let c = t
        .add_tasks(
            "u",
            vec![
                NewTask::new("child", "C", TaskType::UpgradeStep).parent("root"),
                NewTask::new("root", "R", TaskType::UpgradeStep),
            ],
        )
        .unwrap();
    assert_eq!(c.events.len(), 2);
    assert_eq!(t.upgrade("u").unwrap().total_tasks(), 2);
    assert_eq!(t.task_detail("u", "root").unwrap().task.children, 1);
    let q = EventQuery::upgrade("u", 0, 10);
    assert_eq!(t.store().events(&q).unwrap().len(), 3);
}

/// A small, valid upgrade to import: `a` with child `b`, one event each.
fn importable() -> (Upgrade, Vec<Task>, Vec<ProgressEvent>) {
    let now = crate::model::now();
    let upgrade = Upgrade {
        upgrade_id: "imp".into(),
        plan_id: "p".into(),
        cluster_name: "c".into(),
        status: ProgressStatus::InProgress,
        current_phase: Some("nodes".into()),
        overall_percentage: 0.0,
        created_at: now,
        started_at: Some(now),
        completed_at: None,
        error_message: None,
        metadata: JsonMap::new(),
        task_counts: [0; 6],
        last_seq: 0,
    };
    let task = |id: &str, parent: Option<&str>| Task {
        upgrade_id: "imp".into(),
        task_id: id.into(),
        name: id.to_uppercase(),
        task_type: TaskType::UpgradeStep,
        parent_task_id: parent.map(Into::into),
        status: ProgressStatus::InProgress,
        percentage: 10.0,
        current_step: None,
        total_steps: Some(4),
        completed_steps: 1,
        weight: 1.0,
        children: 0,
        error_message: None,
        retry_count: 0,
        last_message: None,
        created_at: now,
        started_at: Some(now),
        completed_at: None,
        duration: Some(1.5),
        metadata: JsonMap::new(),
    };
    let event = |task: Option<&str>| ProgressEvent {
        seq: 0,
        event_id: uuid::Uuid::now_v7().to_string(),
        kind: EventKind::TaskProgress,
        upgrade_id: "imp".into(),
        timestamp: now,
        task_id: task.map(Into::into),
        task_type: task.map(|_| TaskType::UpgradeStep),
        status: ProgressStatus::InProgress,
        message: Some("m".into()),
        details: JsonMap::new(),
        percentage: 10.0,
    };
    (
        upgrade,
        vec![task("a", None), task("b", Some("a"))],
        vec![event(Some("a")), event(Some("b")), event(None)],
    )
}

/// Every way in is validated alike: what a command may not do, an import may not either
/// (weights of 1e308 once made the overall NaN, a 25,000-deep chain overflowed the renderer,
/// ids with `/` wrote exports elsewhere). A refused import writes nothing.
fn hostile_imports_are_refused_whole(t: ProgressTracker) {
    type Mutation = fn(&mut Upgrade, &mut Vec<Task>, &mut Vec<ProgressEvent>);
    let cases: [(&str, Mutation); 19] = [
        ("not between 1970 and now", |u, _, _| {
            u.started_at = chrono::DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z")
                .ok()
                .map(|t| t.to_utc())
        }),
        ("is before started_at", |_, t, _| {
            t[0].completed_at = t[0].started_at.map(|s| s - chrono::TimeDelta::hours(1))
        }),
        ("not between 1970 and now", |_, _, e| {
            e[1].timestamp = chrono::DateTime::<chrono::Utc>::MIN_UTC
        }),
        ("weight", |_, t, _| t[1].weight = 1e308),
        ("weight", |_, t, _| t[0].weight = 0.0),
        ("completed_steps", |_, t, _| t[0].completed_steps = 5),
        ("total_steps", |_, t, _| t[0].total_steps = Some(0)),
        ("duration", |_, t, _| t[1].duration = Some(1e300)),
        ("duration", |_, t, _| t[1].duration = Some(-3.0)),
        ("upgrade_id", |u, t, e| {
            u.upgrade_id = "../escape".into();
            t.iter_mut().for_each(|t| t.upgrade_id = "../escape".into());
            e.iter_mut().for_each(|e| e.upgrade_id = "../escape".into());
        }),
        ("task_id", |_, t, e| {
            t[1].task_id = "a/b".into();
            e[1].task_id = Some("a/b".into());
        }),
        ("current_phase", |u, _, _| {
            u.current_phase = Some("p".repeat(100_000))
        }),
        ("control character", |u, _, _| {
            u.error_message = Some("\u{1b}[2J".into())
        }),
        ("control character", |_, _, e| {
            e[0].message = Some("\u{9b}1m".into())
        }),
        ("percentage", |_, t, _| t[0].percentage = 100.5),
        ("unknown task", |_, _, e| {
            e[0].task_id = Some("ghost".into())
        }),
        ("appears twice", |_, t, _| {
            let dup = t[0].clone();
            t.push(dup);
        }),
        ("levels deep", |_, t, _| {
            for i in 0..40 {
                let mut x = t[1].clone();
                x.task_id = format!("d{i}");
                x.parent_task_id = Some(if i == 0 {
                    "b".into()
                } else {
                    format!("d{}", i - 1)
                });
                t.push(x);
            }
        }),
        ("not among the tasks before it", |_, t, _| t.swap(0, 1)),
    ];
    let before = t.store().last_seq().unwrap();
    for (needle, mutate) in cases {
        let (mut u, mut tasks, mut events) = importable();
        mutate(&mut u, &mut tasks, &mut events);
        let err = t.store().import(&u, &tasks, &events).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput(_)) && err.to_string().contains(needle),
            "{needle}: {err}"
        );
        assert!(t.list_upgrades().unwrap().is_empty(), "{needle}: wrote");
        assert_eq!(t.store().last_seq().unwrap(), before, "{needle}");
    }
    let (u, tasks, events) = importable();
    t.store().import(&u, &tasks, &events).unwrap();
    let s = t.summary("imp").unwrap();
    assert_eq!(s.total_tasks, 2);
    assert!(s.overall_percentage.is_finite());
}

/// Listings come a page at a time, in creation order, each page after the last id of the one
/// before; an unknown cursor is `NotFound`.
fn pages_of_upgrades_and_tasks(t: ProgressTracker) {
    for i in 0..5 {
        setup(&t, &format!("u{i}"));
    }
    let ids = |v: Vec<crate::model::Upgrade>| -> Vec<String> {
        v.into_iter().map(|u| u.upgrade_id).collect()
    };
    assert_eq!(ids(t.upgrades_page(None, 2).unwrap()), ["u0", "u1"]);
    assert_eq!(ids(t.upgrades_page(Some("u1"), 2).unwrap()), ["u2", "u3"]);
    assert_eq!(ids(t.upgrades_page(Some("u3"), 2).unwrap()), ["u4"]);
    assert!(t.upgrades_page(Some("u4"), 2).unwrap().is_empty());
    assert!(matches!(
        t.upgrades_page(Some("ghost"), 2).unwrap_err(),
        Error::NotFound { .. }
    ));
    assert_eq!(ids(t.list_upgrades().unwrap()).len(), 5);
    for i in 0..5 {
        add(&t, "u2", &format!("t{i}"), None, 1.0);
    }
    let tids = |v: Vec<Task>| -> Vec<String> { v.into_iter().map(|t| t.task_id).collect() };
    assert_eq!(
        tids(t.tasks_page("u2", None, 3).unwrap()),
        ["t0", "t1", "t2"]
    );
    assert_eq!(
        tids(t.tasks_page("u2", Some("t2"), 3).unwrap()),
        ["t3", "t4"]
    );
    assert!(matches!(
        t.tasks_page("u2", Some("ghost"), 3).unwrap_err(),
        Error::NotFound { .. }
    ));
    assert!(matches!(
        t.tasks_page("ghost", None, 3).unwrap_err(),
        Error::NotFound { .. }
    ));
    assert!(t.tasks_page("u1", None, 3).unwrap().is_empty());
}

/// Guarantees E2, E5, G9: each timed completion of a leaf task is one duration sample (and a
/// per-step one when stepped) on its upgrade's cluster and on every cluster, written with the
/// completion: a command of a batch that fails adds none; failed, cancelled and untimed
/// completions add none; an import adds its timed completed leaf tasks; the last 50 are kept.
fn completions_and_imports_feed_the_history(t: ProgressTracker) {
    use crate::store::domain::history::{MAX_SAMPLES, TaskHistory};
    let store = t.store().clone();
    let run = |u: &str, cluster: &str| {
        t.create_upgrade(u, "p", cluster, JsonMap::new()).unwrap();
        t.start_upgrade(u, None).unwrap();
        t.add_task(u, NewTask::new("a", "A", TaskType::UpgradeStep).steps(4))
            .unwrap();
        t.start_task(u, "a", None).unwrap();
    };
    for (i, cluster) in ["c", "c", "d"].iter().enumerate() {
        run(&format!("done{i}"), cluster);
    }
    std::thread::sleep(std::time::Duration::from_millis(4));
    // The three completions in one batch, with a failing command between them.
    let complete = |u: &str, task: &str| Command::TaskComplete {
        upgrade_id: u.into(),
        task_id: task.into(),
        message: None,
    };
    let results = t
        .execute_batch(&[
            complete("done0", "a"),
            complete("done1", "a"),
            complete("done1", "ghost"),
            complete("done2", "a"),
        ])
        .unwrap();
    assert!(results[2].is_err());
    assert!(results.iter().filter(|r| r.is_ok()).count() == 3);
    let h = store.task_history("c", &["a", "b"]).unwrap();
    assert_eq!(h.len(), 2);
    let c = h[0].cluster.unwrap();
    let g = h[0].global.unwrap();
    assert_eq!((c.duration.samples, g.duration.samples), (2, 3));
    assert!(c.duration.p50 >= 0.004, "{c:?}");
    let step = c.per_step.unwrap();
    assert!((step.p50 - c.duration.p50 / 4.0).abs() < 1e-6, "{c:?}");
    assert_eq!(h[1], TaskHistory::default());
    assert_eq!(
        store.task_history("d", &["a"]).unwrap()[0]
            .cluster
            .unwrap()
            .duration
            .samples,
        1
    );
    // A task that failed, was cancelled or completed untimed is no sample.
    run("live", "c");
    t.fail_task("live", "a", "x").unwrap();
    t.create_upgrade("untimed", "p", "c", JsonMap::new())
        .unwrap();
    t.add_tasks(
        "untimed",
        vec![
            NewTask::new("a", "A", TaskType::UpgradeStep),
            NewTask::new("x", "X", TaskType::UpgradeStep),
        ],
    )
    .unwrap();
    t.complete_task("untimed", "a", None).unwrap();
    t.start_task("untimed", "x", None).unwrap();
    t.cancel_task("untimed", "x", None).unwrap();
    let h = store.task_history("c", &["a", "x"]).unwrap();
    assert_eq!(h[0].global.unwrap().duration.samples, 3);
    assert_eq!(h[1], TaskHistory::default());
    // A task id's first stepped run after an unstepped one.
    for (u, steps) in [("plain", None), ("stepped", Some(2))] {
        t.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
        let mut task = NewTask::new("m", "M", TaskType::UpgradeStep);
        task.total_steps = steps;
        t.add_task(u, task).unwrap();
        t.start_task(u, "m", None).unwrap();
        t.complete_task(u, "m", None).unwrap();
    }
    let m = store.task_history("c", &["m"]).unwrap()[0].cluster.unwrap();
    assert_eq!(m.duration.samples, 2);
    assert_eq!(m.per_step.unwrap().samples, 1);
    // Imports: a timed completed leaf is a sample (of its duration), a parent is not; past
    // 50 samples the oldest go.
    for i in 0..MAX_SAMPLES + 2 {
        let (mut u, mut tasks, mut events) = importable();
        u.upgrade_id = format!("imp{i}");
        u.cluster_name = "e".into();
        for task in &mut tasks {
            task.upgrade_id = u.upgrade_id.clone();
            task.status = ProgressStatus::Completed;
            task.percentage = 100.0;
            task.completed_steps = 4;
            task.duration = Some(if i < 2 { 1000.0 } else { 10.0 + i as f64 });
            task.completed_at = task
                .started_at
                .map(|s| s + chrono::TimeDelta::milliseconds(i as i64 + 1));
        }
        for e in &mut events {
            e.upgrade_id = u.upgrade_id.clone();
        }
        t.store().import(&u, &tasks, &events).unwrap();
    }
    let h = store.task_history("e", &["a", "b"]).unwrap();
    assert_eq!(h[0].cluster, None, "a parent is no sample");
    assert_eq!(h[0].global.unwrap().duration.samples, 3);
    let b = h[1].cluster.unwrap();
    assert_eq!(b.duration.samples as usize, MAX_SAMPLES);
    assert!(b.duration.p90 < 1000.0, "the two oldest are gone: {b:?}");
    assert!((b.duration.p50 - 36.5).abs() < 1e-3, "{b:?}");
    assert!((b.per_step.unwrap().p50 - 36.5 / 4.0).abs() < 1e-3, "{b:?}");
}
