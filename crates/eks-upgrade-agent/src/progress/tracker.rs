//! [`ProgressTracker`]: the API an upgrade agent calls (reference `ProgressTracker`), on top of
//! any [`ProgressStore`]. Each call is one durable transaction; callbacks (reference
//! `CallbackManager`) run after the commit, in `seq` order.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::Utc;

use crate::error::Result;
use crate::model::{
    EtaSource, JsonMap, MAX_NAMES, ProgressEvent, ProgressStatus, ProgressSummary, StatusChange,
    Task, TaskDetail, Upgrade,
};
use crate::store::domain::command::{Command, NewTask};
use crate::store::domain::history;
use crate::store::{Committed, EventQuery, ProgressStore};

/// How many events [`ProgressTracker::task_detail`] returns.
pub const RECENT_EVENTS: usize = 5;

type EventCallback = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;
type StatusCallback = Arc<dyn Fn(&StatusChange) + Send + Sync>;

#[derive(Default)]
struct Callbacks {
    events: Vec<EventCallback>,
    status: Vec<StatusCallback>,
}

/// Tracks progress of upgrades and their tasks in a [`ProgressStore`].
///
/// ```
/// use eks_upgrade_agent::{ProgressTracker, SqliteStore, store::sqlite::SqliteOptions};
/// use eks_upgrade_agent::model::{ProgressStatus, TaskType};
/// use eks_upgrade_agent::progress::NewTask;
/// # let dir = tempfile::tempdir().unwrap();
/// let store = SqliteStore::open(dir.path(), &SqliteOptions::default())?;
/// let tracker = ProgressTracker::new(std::sync::Arc::new(store));
/// tracker.create_upgrade("upgrade-123", "plan-456", "my-cluster", Default::default())?;
/// tracker.start_upgrade("upgrade-123", Some("Initialization"))?;
/// tracker.add_task("upgrade-123", NewTask::new("task-1", "Deploy Infrastructure", TaskType::UpgradeStep))?;
/// tracker.start_task("upgrade-123", "task-1", Some("Starting"))?;
/// tracker.update_task("upgrade-123", "task-1", 50.0, Some("Half way"), Default::default())?;
/// tracker.complete_task("upgrade-123", "task-1", None)?;
/// tracker.complete_upgrade("upgrade-123")?;
/// let summary = tracker.summary("upgrade-123")?;
/// assert_eq!(summary.status, ProgressStatus::Completed);
/// assert_eq!(summary.overall_percentage, 100.0);
/// # Ok::<(), eks_upgrade_agent::Error>(())
/// ```
pub struct ProgressTracker {
    store: Arc<dyn ProgressStore>,
    callbacks: RwLock<Callbacks>,
    /// Committed events waiting for their callbacks, in seq order.
    pending: Mutex<VecDeque<(ProgressEvent, Vec<StatusChange>)>>,
    /// Held by the thread that runs callbacks, so they run one at a time, in order.
    draining: Mutex<()>,
    /// Held around commit + enqueue while callbacks exist, so the queue is in seq order.
    ordering: Mutex<()>,
    /// How long a running task past its history's p90 must go without an event to be stalled.
    stall_after: Duration,
}

impl fmt::Debug for ProgressTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgressTracker")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ProgressTracker {
    /// A tracker over `store`.
    pub fn new(store: Arc<dyn ProgressStore>) -> ProgressTracker {
        ProgressTracker {
            store,
            callbacks: RwLock::new(Callbacks::default()),
            pending: Mutex::new(VecDeque::new()),
            draining: Mutex::new(()),
            ordering: Mutex::new(()),
            stall_after: history::STALL_AFTER,
        }
    }

    /// Sets how long a running task past the p90 of its history must go without an event to be
    /// listed as stalled (default [`STALL_AFTER`](history::STALL_AFTER), 5 minutes).
    pub fn with_stall_after(mut self, quiet: Duration) -> ProgressTracker {
        self.stall_after = quiet;
        self
    }

    /// The store behind this tracker.
    pub fn store(&self) -> &Arc<dyn ProgressStore> {
        &self.store
    }

    /// Registers a callback run for every event this tracker commits, after the commit, in
    /// `seq` order. A panicking callback is logged and does not affect the others.
    pub fn on_event(&self, f: impl Fn(&ProgressEvent) + Send + Sync + 'static) {
        self.callbacks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .push(Arc::new(f));
    }

    /// Registers a callback run for every status change of a task or upgrade.
    pub fn on_status_change(&self, f: impl Fn(&StatusChange) + Send + Sync + 'static) {
        self.callbacks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .push(Arc::new(f));
    }

    /// Executes one command; returns what it committed.
    pub fn execute(&self, command: Command) -> Result<Committed> {
        let mut results = self.execute_batch(std::slice::from_ref(&command))?;
        results.pop().expect("one result per command")
    }

    /// Executes several commands in one durable transaction (group commit); each succeeds or
    /// fails on its own. `Err` only when the store itself failed (nothing was committed).
    pub fn execute_batch(&self, commands: &[Command]) -> Result<Vec<Result<Committed>>> {
        if !self.has_callbacks() {
            return self.store.execute(commands);
        }
        let results = {
            // The store serializes writers of this process anyway; holding this lock across the
            // commit and the enqueue keeps the queue in commit (seq) order.
            let _order = self.ordering.lock().unwrap_or_else(|p| p.into_inner());
            let results = self.store.execute(commands)?;
            self.enqueue(results.iter().filter_map(|r| r.as_ref().ok()));
            results
        };
        self.drain();
        Ok(results)
    }

    fn has_callbacks(&self) -> bool {
        let cb = self.callbacks.read().unwrap_or_else(|p| p.into_inner());
        !cb.events.is_empty() || !cb.status.is_empty()
    }

    fn enqueue<'a>(&self, committed: impl Iterator<Item = &'a Committed>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for c in committed {
            for e in &c.events {
                let changes = c
                    .status_changes
                    .iter()
                    .filter(|s| s.seq == e.seq)
                    .cloned()
                    .collect();
                pending.push_back((e.clone(), changes));
            }
        }
    }

    /// Runs callbacks for pending events unless another thread (or an outer frame of this
    /// one, when a callback calls back into the tracker) is already doing it.
    fn drain(&self) {
        loop {
            let Ok(_guard) = self.draining.try_lock() else {
                return;
            };
            loop {
                let next = self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                let Some((event, changes)) = next else { break };
                let (events, status) = {
                    let cb = self.callbacks.read().unwrap_or_else(|p| p.into_inner());
                    (cb.events.clone(), cb.status.clone())
                };
                for f in &events {
                    if catch_unwind(AssertUnwindSafe(|| f(&event))).is_err() {
                        tracing::error!(seq = event.seq, "event callback panicked");
                    }
                }
                for change in &changes {
                    for f in &status {
                        if catch_unwind(AssertUnwindSafe(|| f(change))).is_err() {
                            tracing::error!(seq = change.seq, "status callback panicked");
                        }
                    }
                }
            }
            drop(_guard);
            // An event may have been queued between the last pop and the unlock.
            if self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return;
            }
        }
    }

    // --- upgrades -----------------------------------------------------------------------------

    /// Creates an upgrade (`not_started`).
    pub fn create_upgrade(
        &self,
        upgrade_id: &str,
        plan_id: &str,
        cluster_name: &str,
        metadata: JsonMap,
    ) -> Result<Committed> {
        self.execute(Command::UpgradeCreate {
            upgrade_id: upgrade_id.into(),
            plan_id: plan_id.into(),
            cluster_name: cluster_name.into(),
            metadata,
        })
    }

    /// Starts an upgrade, optionally entering a phase.
    pub fn start_upgrade(&self, upgrade_id: &str, phase: Option<&str>) -> Result<Committed> {
        self.execute(Command::UpgradeStart {
            upgrade_id: upgrade_id.into(),
            phase: phase.map(Into::into),
        })
    }

    /// Enters a new phase.
    pub fn set_phase(&self, upgrade_id: &str, phase: &str) -> Result<Committed> {
        self.execute(Command::UpgradePhase {
            upgrade_id: upgrade_id.into(),
            phase: phase.into(),
        })
    }

    /// Completes an upgrade.
    pub fn complete_upgrade(&self, upgrade_id: &str) -> Result<Committed> {
        self.execute(Command::UpgradeComplete {
            upgrade_id: upgrade_id.into(),
            message: None,
        })
    }

    /// Fails an upgrade.
    pub fn fail_upgrade(&self, upgrade_id: &str, error_message: &str) -> Result<Committed> {
        self.execute(Command::UpgradeFail {
            upgrade_id: upgrade_id.into(),
            error_message: error_message.into(),
        })
    }

    // --- tasks --------------------------------------------------------------------------------

    /// Adds one task.
    pub fn add_task(&self, upgrade_id: &str, task: NewTask) -> Result<Committed> {
        self.execute(Command::add_task(upgrade_id, task))
    }

    /// Adds many tasks atomically (all or none); parents may come earlier in the list.
    pub fn add_tasks(&self, upgrade_id: &str, tasks: Vec<NewTask>) -> Result<Committed> {
        self.execute(Command::TaskAddMany {
            upgrade_id: upgrade_id.into(),
            tasks,
        })
    }

    /// Starts a task.
    pub fn start_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        message: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskStart {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            message: message.map(Into::into),
        })
    }

    /// Reports a task's percentage (0..=100), with a message and details.
    pub fn update_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        percentage: f64,
        message: Option<&str>,
        details: JsonMap,
    ) -> Result<Committed> {
        self.execute(Command::TaskUpdate {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            percentage,
            message: message.map(Into::into),
            details,
        })
    }

    /// Reports the steps a task has done and the step now running.
    pub fn step_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        completed_steps: u32,
        current_step: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskStep {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            completed_steps,
            current_step: current_step.map(Into::into),
            message: None,
        })
    }

    /// Completes a task.
    pub fn complete_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        message: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskComplete {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            message: message.map(Into::into),
        })
    }

    /// Fails a task.
    pub fn fail_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        error_message: &str,
    ) -> Result<Committed> {
        self.execute(Command::TaskFail {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            error_message: error_message.into(),
        })
    }

    /// Pauses a running task.
    pub fn pause_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        message: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskPause {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            message: message.map(Into::into),
        })
    }

    /// Resumes a paused task.
    pub fn resume_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        message: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskResume {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            message: message.map(Into::into),
        })
    }

    /// Cancels a task.
    pub fn cancel_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        message: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskCancel {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            message: message.map(Into::into),
        })
    }

    /// Retries a failed or cancelled task.
    pub fn retry_task(
        &self,
        upgrade_id: &str,
        task_id: &str,
        message: Option<&str>,
    ) -> Result<Committed> {
        self.execute(Command::TaskRetry {
            upgrade_id: upgrade_id.into(),
            task_id: task_id.into(),
            message: message.map(Into::into),
        })
    }

    // --- reads --------------------------------------------------------------------------------

    /// One upgrade.
    pub fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade> {
        self.store.upgrade(upgrade_id)
    }

    /// The reference `get_progress_summary`. Counters are kept up to date; the running and
    /// failed tasks are read by status (an index walk in SQLite), only when there are some.
    pub fn summary(&self, upgrade_id: &str) -> Result<ProgressSummary> {
        self.summary_of(&self.store.upgrade(upgrade_id)?)
    }

    /// The summary of an upgrade already read (listings): [`summary`](Self::summary) without
    /// reading the upgrade row again.
    pub fn summary_of(&self, upgrade: &Upgrade) -> Result<ProgressSummary> {
        let id = upgrade.upgrade_id.as_str();
        let read = |status: ProgressStatus, limit: usize, newest_first: bool| {
            if upgrade.count(status) == 0 {
                Ok(Vec::new())
            } else {
                self.store.tasks_in_status(id, status, limit, newest_first)
            }
        };
        let active = read(ProgressStatus::InProgress, MAX_NAMES, false)?;
        let failed = read(ProgressStatus::Failed, MAX_NAMES, false)?;
        let last_failed =
            if active.is_empty() && upgrade.count(ProgressStatus::Failed) as usize > failed.len() {
                read(ProgressStatus::Failed, 1, true)?.pop()
            } else {
                failed.last().cloned()
            };
        let now = crate::model::now();
        let mut summary = ProgressSummary::of(upgrade, now, &active, &failed, last_failed.as_ref());
        self.add_history(upgrade, &active, now, &mut summary)?;
        Ok(summary)
    }

    /// The parts of a summary that come from the task duration history (see
    /// [`history`](crate::store::domain::history)): the estimate (when every unfinished leaf
    /// task has enough history) and the stalled tasks. Only for upgrades in progress with at
    /// most [`MAX_ETA_TASKS`](history::MAX_ETA_TASKS) unfinished tasks, so a summary reads at
    /// most that many tasks and history rows.
    fn add_history(
        &self,
        upgrade: &Upgrade,
        active: &[Task],
        now: chrono::DateTime<Utc>,
        summary: &mut ProgressSummary,
    ) -> Result<()> {
        use ProgressStatus::{InProgress, NotStarted, Paused};
        let unfinished: u64 = [NotStarted, InProgress, Paused]
            .iter()
            .map(|s| upgrade.count(*s))
            .sum();
        if upgrade.status != InProgress || unfinished == 0 || unfinished > history::MAX_ETA_TASKS {
            return Ok(());
        }
        let id = upgrade.upgrade_id.as_str();
        let limit = history::MAX_ETA_TASKS as usize;
        let mut tasks: Vec<Task> = active.iter().take(limit).cloned().collect();
        for status in [NotStarted, Paused] {
            if upgrade.count(status) > 0 {
                tasks.extend(self.store.tasks_in_status(id, status, limit, false)?);
            }
        }
        tasks.retain(|t| t.children == 0);
        if tasks.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        let stats = self.store.task_history(&upgrade.cluster_name, &ids)?;
        let Some(stats) = (stats.len() == tasks.len()).then_some(stats) else {
            return Ok(());
        };
        let wholly_paused = upgrade.count(InProgress) == 0 && upgrade.count(Paused) > 0;
        let pairs: Vec<(&Task, &history::TaskHistory)> = tasks.iter().zip(&stats).collect();
        if !wholly_paused
            && let history::EtaFrom::History { at, range } = history::estimate(&pairs, now)
        {
            summary.estimated_completion = Some(at);
            summary.eta_source = Some(EtaSource::History);
            summary.eta_range = Some(range);
        }
        let quiet = self.stall_after;
        for (task, h) in pairs {
            if !history::past_p90(task, h, now) {
                continue;
            }
            let last = self
                .store
                .recent_task_events(id, &task.task_id, 1)?
                .first()
                .map(|e| e.timestamp);
            if history::is_stalled(task, h, last, now, quiet) {
                summary.stalled_task_names.push(task.name.clone());
            }
        }
        summary.stalled_tasks = summary.stalled_task_names.len() as u64;
        Ok(())
    }

    /// Every upgrade, oldest first.
    pub fn list_upgrades(&self) -> Result<Vec<Upgrade>> {
        self.store.list_upgrades()
    }

    /// At most `limit` upgrades, oldest first, after the upgrade `after`.
    pub fn upgrades_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Upgrade>> {
        self.store.upgrades_page(after, limit)
    }

    /// At most `limit` tasks of an upgrade, in the order they were added, after task `after`.
    pub fn tasks_page(
        &self,
        upgrade_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Task>> {
        self.store.tasks_page(upgrade_id, after, limit)
    }

    /// The tasks of an upgrade, in the order they were added.
    pub fn tasks(&self, upgrade_id: &str) -> Result<Vec<Task>> {
        self.store.tasks(upgrade_id)
    }

    /// A task with its five most recent events.
    pub fn task_detail(&self, upgrade_id: &str, task_id: &str) -> Result<TaskDetail> {
        let task = self.store.task(upgrade_id, task_id)?;
        let recent_events = self
            .store
            .recent_task_events(upgrade_id, task_id, RECENT_EVENTS)?;
        Ok(TaskDetail {
            task,
            recent_events,
        })
    }

    /// Events of one upgrade (or all) with `seq` strictly greater than `since`, oldest first.
    pub fn events_since(
        &self,
        upgrade_id: Option<&str>,
        since: u64,
        limit: usize,
    ) -> Result<Vec<ProgressEvent>> {
        self.store.events(&EventQuery {
            upgrade_id: upgrade_id.map(Into::into),
            since,
            limit,
        })
    }

    /// The summary's estimate of the upgrade's end (from history, else the current rate).
    pub fn estimated_completion(&self, upgrade_id: &str) -> Result<Option<chrono::DateTime<Utc>>> {
        Ok(self.summary(upgrade_id)?.estimated_completion)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::{ProgressStatus, TaskType};
    use crate::store::sqlite::{SqliteOptions, SqliteStore};

    fn tracker(dir: &std::path::Path) -> Arc<ProgressTracker> {
        Arc::new(ProgressTracker::new(Arc::new(
            SqliteStore::open(dir, &SqliteOptions::default()).unwrap(),
        )))
    }

    #[test]
    fn callbacks_see_committed_events_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        t.on_event(move |e| s.lock().unwrap().push((e.seq, e.kind)));
        let c = Arc::clone(&changes);
        t.on_status_change(move |ch| {
            c.lock().unwrap().push((ch.task_id.clone(), ch.from, ch.to));
        });
        // A panicking callback is contained and does not stop the others.
        t.on_event(|e| {
            if e.kind == crate::model::EventKind::TaskProgress {
                panic!("callback bug");
            }
        });
        t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
        t.start_upgrade("u", None).unwrap();
        t.add_task("u", NewTask::new("a", "A", TaskType::Validation))
            .unwrap();
        t.update_task("u", "a", 10.0, None, JsonMap::new()).unwrap();
        assert!(
            t.update_task("u", "a", 200.0, None, JsonMap::new())
                .is_err()
        );
        t.complete_task("u", "a", None).unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 5, "rejected commands publish nothing: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
        let stored: Vec<u64> = t
            .events_since(None, 0, 100)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), stored);
        assert_eq!(
            *changes.lock().unwrap(),
            [
                (None, ProgressStatus::NotStarted, ProgressStatus::InProgress),
                (
                    Some("a".to_owned()),
                    ProgressStatus::NotStarted,
                    ProgressStatus::InProgress
                ),
                (
                    Some("a".to_owned()),
                    ProgressStatus::InProgress,
                    ProgressStatus::Completed
                ),
            ]
        );
    }

    /// Guarantee E2 (library): each timed completion is one sample at the cluster's scope and
    /// every cluster's, read back by `task_history`; the third gives a `history` estimate; the
    /// stall threshold is the tracker's parameter.
    #[test]
    fn completions_feed_the_history_and_the_stall_threshold_is_a_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
        let run = |t: &ProgressTracker, u: &str, cluster: &str| {
            t.create_upgrade(u, "p", cluster, JsonMap::new()).unwrap();
            t.start_upgrade(u, None).unwrap();
            t.add_task(u, NewTask::new("a", "A", TaskType::UpgradeStep).steps(4))
                .unwrap();
            t.start_task(u, "a", None).unwrap();
        };
        let t = ProgressTracker::new(store.clone());
        for (i, cluster) in ["c", "c", "d"].iter().enumerate() {
            let u = format!("done{i}");
            run(&t, &u, cluster);
            std::thread::sleep(std::time::Duration::from_millis(4));
            t.complete_task(&u, "a", None).unwrap();
        }
        let h = store.task_history("c", &["a", "b"]).unwrap();
        assert_eq!(h.len(), 2);
        let c = h[0].cluster.unwrap();
        let g = h[0].global.unwrap();
        assert_eq!((c.duration.samples, g.duration.samples), (2, 3));
        assert!(c.duration.p50 >= 0.004, "{c:?}");
        let step = c.per_step.unwrap();
        assert!((step.p50 - c.duration.p50 / 4.0).abs() < 1e-6, "{c:?}");
        assert_eq!(h[1], history::TaskHistory::default());
        // Cluster c has 2 samples, every cluster 3: the estimate comes from history.
        run(&t, "live", "c");
        let s = t.summary("live").unwrap();
        assert_eq!(s.eta_source, Some(EtaSource::History), "{s:?}");
        let [low, high] = s.eta_range.unwrap();
        let at = s.estimated_completion.unwrap();
        assert!(low <= at && at <= high, "{s:?}");
        assert!(s.stalled_task_names.is_empty(), "quiet for 5 minutes first");
        // Past its p90 (milliseconds) and quiet for 0 s: stalled.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let eager = ProgressTracker::new(store.clone()).with_stall_after(Duration::ZERO);
        let s = eager.summary("live").unwrap();
        assert_eq!(s.stalled_task_names, ["A"], "{s:?}");
        assert_eq!(s.stalled_tasks, 1);
        // A task that failed, was cancelled or completed untimed is no sample.
        t.fail_task("live", "a", "x").unwrap();
        t.create_upgrade("untimed", "p", "c", JsonMap::new())
            .unwrap();
        t.add_task("untimed", NewTask::new("a", "A", TaskType::UpgradeStep))
            .unwrap();
        t.complete_task("untimed", "a", None).unwrap();
        let h = store.task_history("c", &["a"]).unwrap();
        assert_eq!(h[0].global.unwrap().duration.samples, 3);
        // A task id's first stepped run after an unstepped one (once refused by SQLite: the
        // empty per-step blob's substr is NULL).
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
    }

    #[test]
    fn callbacks_may_call_back_into_the_tracker() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
        t.add_tasks(
            "u",
            vec![
                NewTask::new("a", "A", TaskType::UpgradeStep),
                NewTask::new("b", "B", TaskType::UpgradeStep),
            ],
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let weak = Arc::downgrade(&t);
        let s = Arc::clone(&seen);
        t.on_event(move |e| {
            s.lock().unwrap().push(e.seq);
            // Completing `a` starts `b` from inside the callback.
            if e.task_id.as_deref() == Some("a")
                && e.kind == crate::model::EventKind::TaskCompleted
                && let Some(t) = weak.upgrade()
            {
                t.start_task("u", "b", Some("chained")).unwrap();
            }
        });
        t.complete_task("u", "a", None).unwrap();
        assert_eq!(
            t.task_detail("u", "b").unwrap().task.status,
            ProgressStatus::InProgress
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0] < seen[1]);
    }

    #[test]
    fn callbacks_from_many_threads_stay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
        let tasks = (0..4)
            .map(|i| NewTask::new(format!("t{i}"), "T", TaskType::UpgradeStep))
            .collect();
        t.add_tasks("u", tasks).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        t.on_event(move |e| s.lock().unwrap().push(e.seq));
        std::thread::scope(|scope| {
            for i in 0..4 {
                let t = &t;
                scope.spawn(move || {
                    for p in 0..100 {
                        t.update_task("u", &format!("t{i}"), f64::from(p), None, JsonMap::new())
                            .unwrap();
                    }
                });
            }
        });
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 400);
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "callbacks ran out of seq order"
        );
    }
}
