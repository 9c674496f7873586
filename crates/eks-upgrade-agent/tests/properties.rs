//! Property tests through the public API (issue #10, "Tests that keep it so"):
//!
//! - random command sequences against a reference model of the state machine, the hierarchy
//!   rules and the rollups, written here independently of `store/domain/machine.rs`: after every
//!   step the store's statuses, percentages and counters equal the model's, a rejected command
//!   changes nothing, and nothing is NaN;
//! - random and hostile `progress apply` lines: one acknowledgement per line, never a panic;
//! - random and hostile reference JSON: an import is refused whole or stores something that
//!   exports and imports again.
//!
//! Case counts: `PROPTEST_CASES` (default 10,000 for the model, the others as set below).

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};

use eks_upgrade_agent::model::{JsonMap, ProgressStatus, TaskType};
use eks_upgrade_agent::progress::apply::{self, ApplyOptions};
use eks_upgrade_agent::progress::{NewTask, reference};
use eks_upgrade_agent::store::sqlite::SqliteOptions;
use eks_upgrade_agent::{ProgressTracker, SqliteStore};

use ProgressStatus::*;

// ------------------------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Copy)]
enum Op {
    Add {
        parent: Option<u8>,
        weight: u8,
        steps: Option<u8>,
    },
    Start(u8),
    Update(u8, u8),
    Step(u8, u8),
    Complete(u8),
    Fail(u8),
    Pause(u8),
    Resume(u8),
    Cancel(u8),
    Retry(u8),
}

const WEIGHTS: [f64; 4] = [1.0, 2.0, 3.0, 0.5];
const PERCENTS: [f64; 8] = [0.0, 12.5, 33.3, 50.0, 99.9, 100.0, -1.0, f64::NAN];

#[derive(Debug, Clone)]
struct MTask {
    parent: Option<usize>,
    children: Vec<usize>,
    weight: f64,
    total_steps: Option<u32>,
    completed_steps: u32,
    status: ProgressStatus,
    own: f64,
    started: bool,
}

#[derive(Debug, Clone, Default)]
struct Model {
    tasks: Vec<MTask>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Start,
    Update(f64),
    Step(u32),
    Complete,
    Fail,
    Pause,
    Resume,
    Cancel,
    Retry,
}

/// The leaf state machine, as documented in README/`machine.rs`, written out again.
fn leaf_target(from: ProgressStatus, kind: Kind) -> Option<ProgressStatus> {
    let ok = |allowed: &[ProgressStatus], to| allowed.contains(&from).then_some(to);
    match kind {
        Kind::Start => ok(&[NotStarted], InProgress),
        Kind::Update(_) | Kind::Step(_) => ok(&[NotStarted, InProgress], InProgress),
        Kind::Complete => ok(&[NotStarted, InProgress], Completed),
        Kind::Fail => ok(&[NotStarted, InProgress, Paused], Failed),
        Kind::Pause => ok(&[InProgress], Paused),
        Kind::Resume => ok(&[Paused], InProgress),
        Kind::Cancel => ok(&[NotStarted, InProgress, Paused], Cancelled),
        Kind::Retry => ok(&[Failed, Cancelled], InProgress),
    }
}

impl Model {
    fn effective(&self, i: usize) -> f64 {
        let t = &self.tasks[i];
        if t.status == Completed {
            100.0
        } else if t.children.is_empty() {
            t.own
        } else {
            let w: f64 = t.children.iter().map(|&c| self.tasks[c].weight).sum();
            let s: f64 = t
                .children
                .iter()
                .map(|&c| self.tasks[c].weight * self.effective(c))
                .sum();
            s / w
        }
    }

    fn overall(&self) -> f64 {
        let top: Vec<usize> = (0..self.tasks.len())
            .filter(|&i| self.tasks[i].parent.is_none())
            .collect();
        let w: f64 = top.iter().map(|&i| self.tasks[i].weight).sum();
        if w == 0.0 {
            return 0.0;
        }
        top.iter()
            .map(|&i| self.tasks[i].weight * self.effective(i))
            .sum::<f64>()
            / w
    }

    /// Re-derives every parent's status, children first; `false` if that would reopen a
    /// completed task.
    fn derive(&mut self) -> bool {
        for i in (0..self.tasks.len()).rev() {
            if self.tasks[i].children.is_empty() {
                continue;
            }
            let count = |s| {
                self.tasks[i]
                    .children
                    .iter()
                    .filter(|&&c| self.tasks[c].status == s)
                    .count()
            };
            let n = self.tasks[i].children.len();
            let finished = count(Completed) + count(Cancelled);
            let derived = if count(InProgress) > 0 {
                InProgress
            } else if count(Failed) > 0 {
                Failed
            } else if count(Paused) > 0 {
                Paused
            } else if finished == n {
                if count(Completed) > 0 {
                    Completed
                } else {
                    Cancelled
                }
            } else if self.tasks[i].started || finished > 0 {
                InProgress
            } else {
                NotStarted
            };
            let t = &mut self.tasks[i];
            if t.status == Completed && derived != Completed {
                return false;
            }
            if derived == InProgress {
                t.started = true;
            }
            if derived == Completed && t.status != Completed {
                // Like completing a leaf: every step is done.
                if let Some(total) = t.total_steps {
                    t.completed_steps = total;
                }
            }
            t.status = derived;
        }
        true
    }

    fn leaf_op(&mut self, i: usize, kind: Kind) -> bool {
        let Some(to) = leaf_target(self.tasks[i].status, kind) else {
            return false;
        };
        let t = &mut self.tasks[i];
        match kind {
            Kind::Update(p) => t.own = p,
            Kind::Step(n) => {
                if let Some(total) = t.total_steps {
                    if n > total {
                        return false;
                    }
                    t.own = f64::from(n) * 100.0 / f64::from(total);
                }
                t.completed_steps = n;
            }
            Kind::Complete => {
                t.own = 100.0;
                if let Some(total) = t.total_steps {
                    t.completed_steps = total;
                }
            }
            Kind::Retry => {
                t.own = 0.0;
                t.completed_steps = 0;
                t.started = true;
            }
            _ => {}
        }
        if matches!(
            kind,
            Kind::Start | Kind::Update(_) | Kind::Step(_) | Kind::Complete
        ) {
            t.started = true;
        }
        t.status = to;
        true
    }

    fn leaves_below(&self, i: usize, out: &mut Vec<usize>) {
        for &c in &self.tasks[i].children {
            if self.tasks[c].children.is_empty() {
                out.push(c);
            } else if self.tasks[c].status != Completed {
                self.leaves_below(c, out);
            }
        }
    }

    /// Applies `kind` to task `i`; `false` (state untouched) when the store must refuse it.
    fn task_op(&mut self, i: usize, kind: Kind) -> bool {
        if let Kind::Update(p) = kind
            && !(0.0..=100.0).contains(&p)
        {
            return false;
        }
        let saved = self.clone();
        let ok = if self.tasks[i].children.is_empty() {
            self.leaf_op(i, kind)
        } else {
            self.parent_op(i, kind)
        };
        if ok && self.derive() {
            true
        } else {
            *self = saved;
            false
        }
    }

    fn parent_op(&mut self, i: usize, kind: Kind) -> bool {
        let status = self.tasks[i].status;
        match kind {
            Kind::Update(_) => false,
            Kind::Start | Kind::Step(_) => {
                if leaf_target(status, kind).is_none() {
                    return false;
                }
                if let Kind::Step(n) = kind {
                    let t = &mut self.tasks[i];
                    if t.total_steps.is_some_and(|total| n > total) {
                        return false;
                    }
                    t.completed_steps = n;
                }
                self.tasks[i].started = true;
                true
            }
            Kind::Complete => {
                let unfinished = self.tasks[i]
                    .children
                    .iter()
                    .any(|&c| !matches!(self.tasks[c].status, Completed | Cancelled));
                !unfinished && status == Completed
            }
            _ => {
                if leaf_target(status, kind).is_none() {
                    return false;
                }
                let mut leaves = Vec::new();
                self.leaves_below(i, &mut leaves);
                leaves.sort_unstable();
                leaves.retain(|&l| leaf_target(self.tasks[l].status, kind).is_some());
                // A group's retry retries what failed; cancelled leaves only when none failed.
                if kind == Kind::Retry && leaves.iter().any(|&l| self.tasks[l].status == Failed) {
                    leaves.retain(|&l| self.tasks[l].status == Failed);
                }
                for &leaf in &leaves {
                    assert!(self.leaf_op(leaf, kind));
                }
                !leaves.is_empty()
            }
        }
    }

    fn add(&mut self, parent: Option<usize>, weight: f64, steps: Option<u32>) -> bool {
        if let Some(p) = parent {
            let t = &self.tasks[p];
            if matches!(t.status, Completed | Failed | Cancelled)
                || (t.status == Paused && t.children.is_empty())
            {
                return false;
            }
        }
        let depth = {
            let mut d = 0;
            let mut cur = parent;
            while let Some(p) = cur {
                d += 1;
                cur = self.tasks[p].parent;
            }
            d
        };
        if depth > 32 {
            return false;
        }
        let i = self.tasks.len();
        self.tasks.push(MTask {
            parent,
            children: Vec::new(),
            weight,
            total_steps: steps,
            completed_steps: 0,
            status: NotStarted,
            own: 0.0,
            started: false,
        });
        if let Some(p) = parent {
            self.tasks[p].children.push(i);
        }
        assert!(
            self.derive(),
            "adding to an unfinished parent never reopens"
        );
        true
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let i = 0u8..12;
    prop_oneof![
        3 => (proptest::option::of(0u8..12), 0u8..4, proptest::option::of(1u8..5))
            .prop_map(|(parent, weight, steps)| Op::Add { parent, weight, steps }),
        2 => i.clone().prop_map(Op::Start),
        3 => (i.clone(), 0u8..8).prop_map(|(t, p)| Op::Update(t, p)),
        2 => (i.clone(), 0u8..6).prop_map(|(t, n)| Op::Step(t, n)),
        2 => i.clone().prop_map(Op::Complete),
        1 => i.clone().prop_map(Op::Fail),
        1 => i.clone().prop_map(Op::Pause),
        1 => i.clone().prop_map(Op::Resume),
        1 => i.clone().prop_map(Op::Cancel),
        1 => i.prop_map(Op::Retry),
    ]
}

fn open_store(dir: &std::path::Path) -> ProgressTracker {
    let store = SqliteStore::open(dir, &SqliteOptions::default()).unwrap();
    ProgressTracker::new(Arc::new(store))
}

/// Compares everything the store shows with the model.
fn check(t: &ProgressTracker, u: &str, m: &Model, step: usize) -> Result<(), TestCaseError> {
    let tasks = t.tasks(u).unwrap();
    prop_assert_eq!(tasks.len(), m.tasks.len());
    let mut counts = [0u64; 6];
    for (i, (got, want)) in tasks.iter().zip(&m.tasks).enumerate() {
        prop_assert_eq!(got.status, want.status, "step {}: task t{}", step, i);
        let pct = m.effective(i);
        prop_assert!(got.percentage.is_finite());
        prop_assert!(
            (got.percentage - pct).abs() < 1e-6,
            "step {}: task t{} {} vs model {}",
            step,
            i,
            got.percentage,
            pct
        );
        prop_assert_eq!(got.children as usize, want.children.len());
        prop_assert_eq!(got.completed_steps, want.completed_steps);
        counts[ProgressStatus::ALL
            .iter()
            .position(|s| *s == want.status)
            .unwrap()] += 1;
    }
    let upgrade = t.upgrade(u).unwrap();
    prop_assert_eq!(upgrade.task_counts, counts, "step {}", step);
    prop_assert!(upgrade.overall_percentage.is_finite());
    prop_assert!(
        (upgrade.overall_percentage - m.overall()).abs() < 1e-6,
        "step {}: overall {} vs model {}",
        step,
        upgrade.overall_percentage,
        m.overall()
    );
    let summary = t.summary(u).unwrap();
    prop_assert_eq!(summary.total_tasks, m.tasks.len() as u64);
    Ok(())
}

fn run_model(t: &ProgressTracker, u: &str, ops: &[Op]) -> Result<(), TestCaseError> {
    t.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade(u, None).unwrap();
    let mut m = Model::default();
    let mut history = t.events_since(Some(u), 0, usize::MAX).unwrap().len();
    for (step, op) in ops.iter().enumerate() {
        let before_seq = t.store().last_seq().unwrap();
        let pick = |i: u8| (!m.tasks.is_empty()).then(|| usize::from(i) % m.tasks.len());
        let (store_ok, model_ok) = match *op {
            Op::Add {
                parent,
                weight,
                steps,
            } => {
                let parent = parent.and_then(pick);
                let id = format!("t{}", m.tasks.len());
                let mut task = NewTask::new(&id, &id, TaskType::UpgradeStep)
                    .weight(WEIGHTS[usize::from(weight)]);
                task.parent_task_id = parent.map(|p| format!("t{p}"));
                task.total_steps = steps.map(u32::from);
                let store_ok = t.add_task(u, task).is_ok();
                let model_ok = m.add(parent, WEIGHTS[usize::from(weight)], steps.map(u32::from));
                (store_ok, model_ok)
            }
            other => {
                let (raw, kind) = match other {
                    Op::Start(i) => (i, Kind::Start),
                    Op::Update(i, p) => (i, Kind::Update(PERCENTS[usize::from(p)])),
                    Op::Step(i, n) => (i, Kind::Step(u32::from(n))),
                    Op::Complete(i) => (i, Kind::Complete),
                    Op::Fail(i) => (i, Kind::Fail),
                    Op::Pause(i) => (i, Kind::Pause),
                    Op::Resume(i) => (i, Kind::Resume),
                    Op::Cancel(i) => (i, Kind::Cancel),
                    Op::Retry(i) => (i, Kind::Retry),
                    Op::Add { .. } => unreachable!(),
                };
                let Some(i) = pick(raw) else { continue };
                let id = format!("t{i}");
                let result = match kind {
                    Kind::Start => t.start_task(u, &id, None),
                    Kind::Update(p) => t.update_task(u, &id, p, None, JsonMap::new()),
                    Kind::Step(n) => t.step_task(u, &id, n, None),
                    Kind::Complete => t.complete_task(u, &id, None),
                    Kind::Fail => t.fail_task(u, &id, "boom"),
                    Kind::Pause => t.pause_task(u, &id, None),
                    Kind::Resume => t.resume_task(u, &id, None),
                    Kind::Cancel => t.cancel_task(u, &id, None),
                    Kind::Retry => t.retry_task(u, &id, None),
                };
                (result.is_ok(), m.task_op(i, kind))
            }
        };
        prop_assert_eq!(store_ok, model_ok, "step {}: {:?}", step, op);
        if !store_ok {
            prop_assert_eq!(t.store().last_seq().unwrap(), before_seq, "a refusal wrote");
        }
        // Events are never deleted and seq never goes back: the log only grows, at its end.
        let events = t.events_since(Some(u), 0, usize::MAX).unwrap();
        prop_assert!(events.len() >= history, "step {}: the log shrank", step);
        prop_assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        prop_assert!(t.store().last_seq().unwrap() >= before_seq);
        history = events.len();
        check(t, u, &m, step)?;
    }
    Ok(())
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_command_sequences_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = open_store(dir.path());
    let n = std::sync::atomic::AtomicU64::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(10_000),
        failure_persistence: None,
        // ChaCha in an unoptimised build was most of the run time.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op_strategy(), 1..30), |ops| {
            let u = format!("u{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            run_model(&tracker, &u, &ops)
        })
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// Hostile `apply` lines.

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(1e308),
            Just(-0.0),
            Just(100.0),
            Just(1e-300),
            any::<f64>().prop_filter("finite", |f| f.is_finite())
        ]
        .prop_map(|f| json!(f)),
        "[ -~\u{1b}\u{7}\u{9b}\u{202e}/\\\\]{0,12}".prop_map(Value::from),
        prop_oneof![Just("u1"), Just("t1"), Just("t2"), Just("")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const OPS: [&str; 17] = [
    "upgrade.create",
    "upgrade.start",
    "upgrade.phase",
    "upgrade.complete",
    "upgrade.fail",
    "task.add",
    "task.add_many",
    "task.start",
    "task.update",
    "task.step",
    "task.complete",
    "task.fail",
    "task.pause",
    "task.resume",
    "task.cancel",
    "task.retry",
    "task.explode",
];

fn apply_line() -> impl Strategy<Value = String> {
    let fields = proptest::collection::btree_map(
        prop_oneof![
            Just("upgrade_id"),
            Just("task_id"),
            Just("plan_id"),
            Just("cluster_name"),
            Just("name"),
            Just("task_type"),
            Just("parent_task_id"),
            Just("percentage"),
            Just("completed_steps"),
            Just("total_steps"),
            Just("weight"),
            Just("message"),
            Just("error_message"),
            Just("phase"),
            Just("details"),
            Just("metadata"),
            Just("tasks"),
        ],
        json_value(),
        0..7,
    );
    prop_oneof![
        // Structured: an op with random fields (sometimes well-formed).
        4 => (0..OPS.len(), fields).prop_map(|(op, fields)| {
            let mut v = json!({"op": OPS[op]});
            for (k, x) in fields {
                v[k] = x;
            }
            v.to_string()
        }),
        // Anything at all.
        1 => "[ -~\u{1b}\u{0}\u{9b}]{0,60}",
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

#[test]
fn hostile_apply_lines_get_one_answer_each_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = open_store(dir.path());
    let setup = [
        r#"{"op":"upgrade.create","upgrade_id":"u1","plan_id":"p","cluster_name":"c"}"#,
        r#"{"op":"task.add","upgrade_id":"u1","task_id":"t1","name":"T","task_type":"upgrade_step"}"#,
    ];
    let mut input = setup.join("\n");
    input.push('\n');
    let mut out = Vec::new();
    apply::run(
        &tracker,
        input.as_bytes(),
        &mut out,
        &ApplyOptions::default(),
    )
    .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(10_000),
        failure_persistence: None,
        // ChaCha in an unoptimised build was most of the run time.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(apply_line(), 1..20), |lines| {
            let input: String = lines.iter().map(|l| l.replace('\n', " ") + "\n").collect();
            let mut out = Vec::new();
            let stats = apply::run(
                &tracker,
                input.as_bytes(),
                &mut out,
                &ApplyOptions {
                    max_batch: 7,
                    ..Default::default()
                },
            )
            .unwrap();
            let acks: Vec<Value> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            prop_assert_eq!(acks.len() as u64, stats.lines);
            prop_assert_eq!(stats.ok + stats.failed, stats.lines);
            for a in &acks {
                prop_assert!(a["ok"].is_boolean(), "{}", a);
            }
            Ok(())
        })
        .unwrap();
    // Whatever was accepted is valid (checked once at the end: what any case stored stays).
    for up in tracker.list_upgrades().unwrap() {
        assert!(up.overall_percentage.is_finite(), "{up:?}");
        for t in tracker.tasks(&up.upgrade_id).unwrap() {
            assert!(t.percentage.is_finite() && (0.0..=100.0).contains(&t.percentage));
            assert!(t.weight.is_finite() && t.weight > 0.0 && t.weight <= 1e6);
            for text in [&t.name, t.last_message.as_deref().unwrap_or("")] {
                assert!(
                    !text
                        .chars()
                        .any(|c| c.is_control() && c != '\n' && c != '\t'),
                    "{text:?}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Hostile reference files.

fn reference_file() -> impl Strategy<Value = String> {
    let task = proptest::collection::btree_map(
        prop_oneof![
            Just("task_id"),
            Just("task_name"),
            Just("task_type"),
            Just("status"),
            Just("progress_percentage"),
            Just("parent_task_id"),
            Just("weight"),
            Just("total_steps"),
            Just("completed_steps"),
            Just("duration"),
            Just("started_at"),
            Just("completed_at"),
            Just("error_message"),
            Just("retry_count"),
            Just("events"),
            Just("metadata"),
        ],
        prop_oneof![
            json_value(),
            Just(json!("upgrade_step")),
            Just(json!("completed")),
            Just(json!("in_progress")),
            Just(json!("1970-01-01 00:00:00+00:00")),
            Just(json!("9999-12-31 23:59:59+00:00")),
            Just(json!("1e308 days, 0:00:00")),
            Just(json!("0:00:01.5")),
            Just(json!("t0")),
            Just(json!("t1")),
        ],
        0..8,
    );
    (
        proptest::collection::vec(task, 0..6),
        proptest::option::of(json_value()),
        prop_oneof![
            Just("in_progress"),
            Just("completed"),
            Just("failed"),
            Just("??")
        ],
    )
        .prop_map(|(tasks, phase, status)| {
            let tasks: serde_json::Map<String, Value> = tasks
                .into_iter()
                .enumerate()
                .map(|(i, fields)| {
                    let mut v = json!({});
                    for (k, x) in fields {
                        v[k] = x;
                    }
                    (format!("t{i}"), v)
                })
                .collect();
            json!({
                "upgrade_id": "ref",
                "plan_id": "p",
                "cluster_name": "c",
                "status": status,
                "current_phase": phase,
                "started_at": "2025-10-20 05:25:00.869209+00:00",
                "tasks": tasks,
            })
            .to_string()
        })
}

#[test]
fn hostile_reference_files_are_refused_or_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = open_store(dir.path());
    let n = std::sync::atomic::AtomicU64::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(10_000),
        failure_persistence: None,
        // ChaCha in an unoptimised build was most of the run time.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    });
    runner
        .run(&reference_file(), |text| {
            // One store per accepted file would be slow: every file goes to a fresh id.
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let text = text.replace("\"ref\"", &format!("\"ref{k}\""));
            if let Ok(id) = reference::import(&tracker, &text) {
                let s = tracker.summary(&id).unwrap();
                prop_assert!(s.overall_percentage.is_finite());
                let exported = reference::export(&tracker, &id).unwrap().to_string();
                // What we accepted and wrote, we (and so the Python agent) can read back.
                let again = exported.replace(&format!("\"{id}\""), &format!("\"{id}-again\""));
                let back = reference::import(&tracker, &again);
                prop_assert!(back.is_ok(), "{:?}\n{}", back, exported);
            }
            Ok(())
        })
        .unwrap();
}
