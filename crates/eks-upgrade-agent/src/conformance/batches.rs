//! Cases of the suite on batches and on what a command's answer carries: a batch ends where
//! its commands one by one end, and `Committed::task` (see [`Expect`](super::Expect)).

use serde_json::json;

use super::{add, setup};
use crate::model::{Task, TaskType};
use crate::progress::tracker::ProgressTracker;
use crate::store::domain::command::{Command, NewTask};

/// Guarantee G10: a batch (one transaction; a backend may keep the rows it changes in memory
/// until the end, or until a query reads across rows) ends in the state the same commands
/// reach one by one, failing commands included: the same statuses, percentages, counters,
/// errors and events, over a tree where parents derive their status and parent commands walk
/// their leaves; batches may touch several upgrades and the same task several times.
pub(super) fn a_batch_ends_where_its_commands_one_by_one_end(t: ProgressTracker) {
    let script = |u: &str| -> Vec<Command> {
        let c = |v: serde_json::Value| -> Command {
            let mut v = v;
            v["upgrade_id"] = json!(u);
            serde_json::from_value(v).unwrap()
        };
        vec![
            c(json!({"op": "task.start", "task_id": "a"})),
            c(json!({"op": "task.update", "task_id": "a", "percentage": 40.0})),
            c(json!({"op": "task.update", "task_id": "a", "percentage": 60.0})),
            c(json!({"op": "task.start", "task_id": "c1"})),
            c(json!({"op": "task.fail", "task_id": "c1", "error_message": "boom"})),
            c(json!({"op": "task.complete", "task_id": "ghost"})),
            c(json!({"op": "task.complete", "task_id": "a"})),
            c(json!({"op": "task.complete", "task_id": "c1"})),
            c(json!({"op": "task.retry", "task_id": "b"})),
            c(json!({"op": "task.start", "task_id": "c1"})),
            c(json!({"op": "task.start", "task_id": "c2"})),
            c(json!({"op": "task.pause", "task_id": "g"})),
            c(json!({"op": "task.resume", "task_id": "g"})),
            c(json!({"op": "task.step", "task_id": "c2", "completed_steps": 1})),
            c(json!({"op": "task.complete", "task_id": "c1"})),
            c(json!({"op": "task.cancel", "task_id": "c2"})),
            c(json!({"op": "task.complete", "task_id": "b"})),
            c(json!({"op": "task.complete", "task_id": "g"})),
        ]
    };
    let tree = |u: &str| {
        setup(&t, u);
        t.start_upgrade(u, None).unwrap();
        add(&t, u, "g", None, 1.0);
        add(&t, u, "a", Some("g"), 1.0);
        add(&t, u, "b", Some("g"), 3.0);
        add(&t, u, "c1", Some("b"), 1.0);
        t.add_task(
            u,
            NewTask::new("c2", "C2", TaskType::UpgradeStep)
                .parent("b")
                .steps(4),
        )
        .unwrap();
        add(&t, u, "z", None, 2.0);
    };
    for u in ["one", "batch1", "batch2"] {
        tree(u);
    }
    let one: Vec<bool> = script("one")
        .iter()
        .map(|c| t.execute_batch(std::slice::from_ref(c)).unwrap()[0].is_ok())
        .collect();
    // Two upgrades' scripts interleaved in one batch.
    let mut both = Vec::new();
    for (x, y) in script("batch1").into_iter().zip(script("batch2")) {
        both.push(x);
        both.push(y);
    }
    let batch: Vec<bool> = t
        .execute_batch(&both)
        .unwrap()
        .iter()
        .map(|r| r.is_ok())
        .collect();
    assert!(
        one.iter().any(|ok| !ok) && one.iter().filter(|ok| **ok).count() > 10,
        "{one:?}"
    );
    for u in ["batch1", "batch2"] {
        let mine: Vec<bool> = batch
            .iter()
            .skip(usize::from(u == "batch2"))
            .step_by(2)
            .copied()
            .collect();
        assert_eq!(mine, one, "{u}");
        let view = |u: &str| {
            let tasks: Vec<_> = t
                .store()
                .tasks(u)
                .unwrap()
                .into_iter()
                .map(|x| {
                    (
                        x.task_id,
                        x.status,
                        x.percentage,
                        x.children,
                        x.error_message,
                        x.retry_count,
                        x.completed_steps,
                        x.started_at.is_some(),
                        x.completed_at.is_some(),
                    )
                })
                .collect();
            let up = t.store().upgrade(u).unwrap();
            let events: Vec<_> = t
                .events_since(Some(u), 0, 10_000)
                .unwrap()
                .into_iter()
                .map(|e| (e.kind, e.task_id, e.status, e.message, e.percentage))
                .collect();
            (
                tasks,
                up.task_counts,
                up.overall_percentage,
                up.status,
                events,
            )
        };
        assert_eq!(view(u), view("one"), "{u}");
    }
}

/// `Committed::task`: the named task as its command left it (what the API answers without a
/// read), on leaves and parents, alone and in a batch; `None` for other commands.
pub(super) fn a_task_command_carries_its_task_as_it_left_it(t: ProgressTracker) {
    let ops = |u: &str| -> Vec<Command> {
        [
            json!({"op": "task.start", "task_id": "a"}),
            json!({"op": "task.update", "task_id": "a", "percentage": 40.0, "message": "m"}),
            json!({"op": "task.start", "task_id": "c"}),
            json!({"op": "task.step", "task_id": "c", "completed_steps": 1}),
            json!({"op": "task.pause", "task_id": "p"}),
            json!({"op": "task.resume", "task_id": "p"}),
            json!({"op": "task.fail", "task_id": "a", "error_message": "boom"}),
            json!({"op": "task.retry", "task_id": "a"}),
            json!({"op": "task.complete", "task_id": "c"}),
            json!({"op": "task.update", "task_id": "a", "percentage": 70.0}),
        ]
        .into_iter()
        .map(|mut v| {
            v["upgrade_id"] = json!(u);
            serde_json::from_value(v).unwrap()
        })
        .collect()
    };
    let view = |x: &Task| {
        (
            x.task_id.clone(),
            x.status,
            x.percentage,
            x.completed_steps,
            x.error_message.clone(),
            x.retry_count,
        )
    };
    let mut alone = Vec::new();
    for u in ["one", "batch"] {
        setup(&t, u);
        t.start_upgrade(u, None).unwrap();
        add(&t, u, "p", None, 1.0);
        add(&t, u, "a", Some("p"), 1.0);
        t.add_task(
            u,
            NewTask::new("c", "C", TaskType::UpgradeStep)
                .parent("p")
                .steps(4),
        )
        .unwrap();
    }
    for c in ops("one") {
        let committed = t.execute(c.clone()).unwrap();
        let (task_id, _) = c.task_op().unwrap();
        let read = t.store().task("one", task_id).unwrap();
        assert_eq!(committed.task.as_ref(), Some(&read), "{c:?}");
        alone.push(view(&read));
    }
    // In a batch, each command's task is as that command left it (a later command of the
    // batch changes the same task again).
    let batch: Vec<_> = t
        .execute_batch(&ops("batch"))
        .unwrap()
        .into_iter()
        .map(|r| {
            let task = r.unwrap().task.expect("a task command carries its task");
            assert_eq!(task.upgrade_id, "batch");
            view(&task)
        })
        .collect();
    assert_eq!(batch, alone);
    let last = t.execute_batch(&ops("batch")[9..]).unwrap();
    let read = t.store().task("batch", "a").unwrap();
    assert_eq!(last[0].as_ref().unwrap().task.as_ref(), Some(&read));
    // Other commands carry none.
    let added = t
        .add_task("one", NewTask::new("n", "N", TaskType::UpgradeStep))
        .unwrap();
    assert_eq!(added.task, None);
    assert_eq!(t.set_phase("one", "later").unwrap().task, None);
}

/// Over the store protocol: no answer carries a task.
pub(super) fn no_command_carries_a_task(t: ProgressTracker) {
    setup(&t, "u");
    t.start_upgrade("u", None).unwrap();
    assert_eq!(
        t.add_task("u", NewTask::new("a", "A", TaskType::UpgradeStep))
            .unwrap()
            .task,
        None
    );
    assert_eq!(t.start_task("u", "a", None).unwrap().task, None);
}
