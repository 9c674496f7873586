//! Task duration history and what is estimated from it (issue #12, "ETA from history"): the
//! samples a completed task leaves, their percentiles, the remaining time of an unfinished task,
//! the estimated end of an upgrade and whether a running task is stalled. Pure functions: the
//! backends store the samples (in the same transaction as the completion) and the tracker reads
//! them back for the summary.
//!
//! - A sample is the duration of one completed leaf task (a task without subtasks) that was
//!   started before it completed (`task.complete` straight from `not_started` times nothing).
//!   Steps are counted (`total_steps`, `task.step`), not timed one by one, so a stepped task's
//!   per-step time is its duration ÷ `total_steps`.
//! - Samples are kept per task id at two scopes, the upgrade's cluster and every cluster: the
//!   last [`MAX_SAMPLES`] of each, oldest first, as little-endian `f32` seconds
//!   ([`push_sample`], [`samples`]).
//! - Percentiles interpolate linearly between the closest ranks ([`quantile`]).
//! - An estimate uses the narrowest scope with at least [`MIN_SAMPLES`] samples
//!   ([`TaskHistory::pick`]).

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{ProgressStatus, Task, seconds_between};

/// Samples kept per (scope, task id): the most recent ones.
pub const MAX_SAMPLES: usize = 50;
/// Fewest samples a scope needs before its statistics are used.
pub const MIN_SAMPLES: u32 = 3;
/// Most unfinished tasks an upgrade may have for its estimate to come from history (beyond,
/// the summary falls back to the rate, so a summary reads at most this many tasks).
pub const MAX_ETA_TASKS: u64 = 1_000;
/// How long a running task past its history's p90 must go without an event to be stalled.
pub const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Percentiles of one set of samples, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Number of samples.
    pub samples: u32,
    /// 25th percentile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
    /// 90th percentile.
    pub p90: f64,
}

impl Quantiles {
    /// The percentiles of `samples` (in any order); `None` when there are none (NaNs are
    /// ignored).
    pub fn of(samples: &[f64]) -> Option<Quantiles> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(Quantiles {
            samples: sorted.len() as u32,
            p25: quantile(&sorted, 0.25),
            p50: quantile(&sorted, 0.50),
            p75: quantile(&sorted, 0.75),
            p90: quantile(&sorted, 0.90),
        })
    }
}

/// The `q` quantile (0..=1) of sorted, non-empty `sorted`, interpolating linearly between the
/// two closest ranks (the "type 7" of R and numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// The statistics of one task id at one scope.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    /// Whole durations.
    pub duration: Quantiles,
    /// Per-step durations (duration ÷ total steps), from the samples of stepped runs.
    pub per_step: Option<Quantiles>,
}

impl TaskStats {
    /// Statistics from stored sample blobs (see [`samples`]); `None` without duration samples.
    pub fn from_blobs(durations: &[u8], per_step: &[u8]) -> Option<TaskStats> {
        Some(TaskStats {
            duration: Quantiles::of(&samples(durations))?,
            per_step: Quantiles::of(&samples(per_step)),
        })
    }
}

/// What the history holds for one task id: its statistics on the upgrade's cluster and on
/// every cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskHistory {
    /// On the upgrade's cluster.
    pub cluster: Option<TaskStats>,
    /// On every cluster.
    pub global: Option<TaskStats>,
}

impl TaskHistory {
    /// The narrowest scope with at least [`MIN_SAMPLES`] samples.
    pub fn pick(&self) -> Option<&TaskStats> {
        [&self.cluster, &self.global]
            .into_iter()
            .flatten()
            .find(|s| s.duration.samples >= MIN_SAMPLES)
    }
}

/// `blob` (samples as little-endian `f32`, oldest first) with `value` appended, keeping the
/// last [`MAX_SAMPLES`]. A trailing partial sample (a damaged blob) is dropped.
pub fn push_sample(blob: &[u8], value: f64) -> Vec<u8> {
    let whole = blob.len() / 4 * 4;
    let keep = whole.min((MAX_SAMPLES - 1) * 4);
    let mut out = Vec::with_capacity(keep + 4);
    out.extend_from_slice(&blob[whole - keep..whole]);
    out.extend_from_slice(&(value as f32).to_le_bytes());
    out
}

/// The samples in a blob written by [`push_sample`], oldest first.
pub fn samples(blob: &[u8]) -> Vec<f64> {
    blob.chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

/// What a completed task contributes to the history: its duration and, for a stepped task, its
/// per-step time. `None` for tasks that are not timed samples: not completed, with subtasks,
/// completed without having been started (`was_started`), or without a sane duration.
pub fn sample_of(task: &Task, was_started: bool) -> Option<(f64, Option<f64>)> {
    if task.status != ProgressStatus::Completed || task.children > 0 || !was_started {
        return None;
    }
    let d = task.duration?;
    if !(d.is_finite() && d >= 0.0) {
        return None;
    }
    let per_step = task
        .total_steps
        .filter(|n| *n > 0)
        .map(|n| d / f64::from(n));
    Some((d, per_step))
}

/// Remaining seconds of one unfinished task: (estimate, low, high) from the median, p25 and
/// p75.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remaining {
    /// From the median.
    pub median: f64,
    /// From p25.
    pub low: f64,
    /// From p75.
    pub high: f64,
}

/// Seconds `task` has run by `now` (0 when it has not started).
pub fn spent(task: &Task, now: DateTime<Utc>) -> f64 {
    task.started_at
        .map_or(0.0, |s| seconds_between(s, now).max(0.0))
}

/// The remaining time of an unfinished leaf task from its statistics: a stepped task with
/// per-step history takes the per-step percentile × the steps left, less the time it has already
/// spent on its current step (at most one step's worth); any other task the percentile of whole
/// durations less the time it has run. Never negative.
pub fn remaining(task: &Task, stats: &TaskStats, now: DateTime<Utc>) -> Remaining {
    let spent = spent(task, now);
    let stepped = task.total_steps.zip(stats.per_step);
    let one = |whole: f64, step: Option<f64>| -> f64 {
        match (stepped, step) {
            (Some((total, _)), Some(step)) => {
                let done = task.completed_steps.min(total);
                let left = f64::from(total - done);
                let on_current = (spent - step * f64::from(done)).clamp(0.0, step);
                (step * left - on_current).max(0.0)
            }
            _ => (whole - spent).max(0.0),
        }
    };
    let per = stats.per_step;
    Remaining {
        median: one(stats.duration.p50, per.map(|q| q.p50)),
        low: one(stats.duration.p25, per.map(|q| q.p25)),
        high: one(stats.duration.p75, per.map(|q| q.p75)),
    }
}

/// Where an estimate of the end came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtaFrom {
    /// Every unfinished task has history.
    History {
        /// The estimated end.
        at: DateTime<Utc>,
        /// From p25 and p75: `[earliest, latest]`.
        range: [DateTime<Utc>; 2],
    },
    /// Some unfinished task has too little history (or there are too many to read): the caller
    /// keeps the linear estimate from the current rate.
    Rate,
}

/// The end of an upgrade estimated from the history of its unfinished leaf tasks: `now` + the
/// sum of their remaining times ([`remaining`]; tasks are taken to run one after another).
/// [`EtaFrom::Rate`] unless every one has [`MIN_SAMPLES`] samples at some scope.
pub fn estimate(unfinished: &[(&Task, &TaskHistory)], now: DateTime<Utc>) -> EtaFrom {
    let (mut median, mut low, mut high) = (0.0, 0.0, 0.0);
    for (task, history) in unfinished {
        let Some(stats) = history.pick() else {
            return EtaFrom::Rate;
        };
        let r = remaining(task, stats, now);
        median += r.median;
        low += r.low;
        high += r.high;
    }
    let at = |secs: f64| -> Option<DateTime<Utc>> {
        let max = crate::model::MAX_ETA_YEARS * 365.25 * 86_400.0;
        if !(secs.is_finite() && secs <= max) {
            return None;
        }
        now.checked_add_signed(TimeDelta::microseconds((secs * 1e6) as i64))
    };
    match (at(median), at(low), at(high)) {
        (Some(at), Some(low), Some(high)) => EtaFrom::History {
            at,
            range: [low.min(at), high.max(at)],
        },
        _ => EtaFrom::Rate,
    }
}

/// Whether a running leaf task is stalled at `now`: it has run longer than the p90 of its
/// history (narrowest scope with enough samples) and its latest event is at least `quiet` old.
pub fn is_stalled(
    task: &Task,
    history: &TaskHistory,
    last_event_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    quiet: std::time::Duration,
) -> bool {
    task.status == ProgressStatus::InProgress
        && task.children == 0
        && history
            .pick()
            .is_some_and(|s| spent(task, now) > s.duration.p90)
        && last_event_at.is_some_and(|t| seconds_between(t, now) >= quiet.as_secs_f64())
}

/// Whether [`is_stalled`] could hold for `task` before its last event is read (so the event is
/// read only for these).
pub fn past_p90(task: &Task, history: &TaskHistory, now: DateTime<Utc>) -> bool {
    task.status == ProgressStatus::InProgress
        && task.children == 0
        && history
            .pick()
            .is_some_and(|s| spent(task, now) > s.duration.p90)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JsonMap, TaskType};

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn task(status: ProgressStatus, started_secs_ago: Option<i64>, now: DateTime<Utc>) -> Task {
        Task {
            upgrade_id: "u".into(),
            task_id: "t".into(),
            name: "T".into(),
            task_type: TaskType::UpgradeStep,
            parent_task_id: None,
            status,
            percentage: 0.0,
            current_step: None,
            total_steps: None,
            completed_steps: 0,
            weight: 1.0,
            children: 0,
            error_message: None,
            retry_count: 0,
            last_message: None,
            created_at: now,
            started_at: started_secs_ago.map(|s| now - TimeDelta::seconds(s)),
            completed_at: None,
            duration: None,
            metadata: JsonMap::new(),
        }
    }

    fn stats(durations: &[f64], per_step: &[f64]) -> TaskStats {
        TaskStats {
            duration: Quantiles::of(durations).unwrap(),
            per_step: Quantiles::of(per_step),
        }
    }

    #[test]
    fn quantiles_interpolate_between_ranks() {
        let q = Quantiles::of(&[40.0, 10.0, 30.0, 20.0, 50.0]).unwrap();
        assert_eq!(
            (q.samples, q.p25, q.p50, q.p75, q.p90),
            (5, 20.0, 30.0, 40.0, 46.0)
        );
        let q = Quantiles::of(&[10.0, 20.0, 30.0, 40.0]).unwrap();
        assert_eq!((q.p25, q.p50, q.p75), (17.5, 25.0, 32.5));
        assert!((q.p90 - 37.0).abs() < 1e-9, "{}", q.p90);
        let q = Quantiles::of(&[7.0]).unwrap();
        assert_eq!((q.p25, q.p50, q.p90), (7.0, 7.0, 7.0));
        assert_eq!(Quantiles::of(&[]), None);
        assert_eq!(Quantiles::of(&[f64::NAN]), None);
        assert_eq!(Quantiles::of(&[f64::NAN, 3.0]).unwrap().samples, 1);
    }

    #[test]
    fn the_sample_blob_keeps_the_last_fifty_oldest_first() {
        let mut blob = Vec::new();
        for i in 0..120 {
            blob = push_sample(&blob, f64::from(i));
            assert!(blob.len() <= MAX_SAMPLES * 4);
        }
        let s = samples(&blob);
        assert_eq!(s.len(), MAX_SAMPLES);
        assert_eq!(s[0], 70.0);
        assert_eq!(s[MAX_SAMPLES - 1], 119.0);
        // A damaged blob (a partial sample) is repaired, not misread.
        let s = samples(&push_sample(&[0, 0, 128, 63, 1, 2], 2.0));
        assert_eq!(s, [1.0, 2.0]);
    }

    #[test]
    fn only_timed_completed_leaves_are_samples() {
        let now = t0();
        let mut t = task(ProgressStatus::Completed, Some(60), now);
        t.duration = Some(60.0);
        assert_eq!(sample_of(&t, true), Some((60.0, None)));
        assert_eq!(sample_of(&t, false), None, "never started: not timed");
        t.total_steps = Some(4);
        assert_eq!(sample_of(&t, true), Some((60.0, Some(15.0))));
        t.children = 2;
        assert_eq!(sample_of(&t, true), None, "a parent");
        t.children = 0;
        t.status = ProgressStatus::Failed;
        assert_eq!(sample_of(&t, true), None, "failed");
        t.status = ProgressStatus::Completed;
        t.duration = Some(f64::NAN);
        assert_eq!(sample_of(&t, true), None);
    }

    #[test]
    fn the_narrowest_scope_with_three_samples_is_used() {
        let two = stats(&[1.0, 2.0], &[]);
        let three = stats(&[10.0, 20.0, 30.0], &[]);
        let h = TaskHistory {
            cluster: Some(three),
            global: Some(stats(&[100.0, 200.0, 300.0], &[])),
        };
        assert_eq!(h.pick(), Some(&three));
        let h = TaskHistory {
            cluster: Some(two),
            global: Some(three),
        };
        assert_eq!(h.pick(), Some(&three), "cluster has too few");
        let h = TaskHistory {
            cluster: Some(two),
            global: Some(two),
        };
        assert_eq!(h.pick(), None);
        assert_eq!(TaskHistory::default().pick(), None);
    }

    #[test]
    fn remaining_time_is_the_percentile_less_the_time_spent() {
        let now = t0();
        let s = stats(&[60.0, 100.0, 140.0], &[]); // p25 80, p50 100, p75 120
        let waiting = task(ProgressStatus::NotStarted, None, now);
        assert_eq!(
            remaining(&waiting, &s, now),
            Remaining {
                median: 100.0,
                low: 80.0,
                high: 120.0
            }
        );
        let running = task(ProgressStatus::InProgress, Some(90), now);
        assert_eq!(
            remaining(&running, &s, now),
            Remaining {
                median: 10.0,
                low: 0.0,
                high: 30.0
            }
        );
        let late = task(ProgressStatus::InProgress, Some(500), now);
        assert_eq!(remaining(&late, &s, now).median, 0.0, "never negative");
    }

    #[test]
    fn stepped_tasks_use_the_per_step_time_times_the_steps_left() {
        let now = t0();
        // 10 steps of 10 s (p50), 8 s (p25) and 12 s (p75).
        let s = stats(&[80.0, 100.0, 120.0], &[8.0, 10.0, 12.0]);
        let mut t = task(ProgressStatus::InProgress, Some(43), now);
        t.total_steps = Some(10);
        t.completed_steps = 4;
        // 6 steps left; 43 s spent, 40 s of them on the 4 steps done: 3 s into the fifth.
        assert_eq!(remaining(&t, &s, now).median, 57.0);
        // Time spent on the current step counts at most one step's worth.
        t.started_at = Some(now - TimeDelta::seconds(400));
        assert_eq!(remaining(&t, &s, now).median, 50.0);
        // Faster than history so far: nothing spent on the current step yet.
        t.started_at = Some(now - TimeDelta::seconds(5));
        assert_eq!(remaining(&t, &s, now).median, 60.0);
        // Without per-step history, the whole duration is used.
        let whole = stats(&[80.0, 100.0, 120.0], &[]);
        assert_eq!(remaining(&t, &whole, now).median, 95.0);
    }

    #[test]
    fn the_estimate_sums_remaining_times_or_falls_back_to_the_rate() {
        let now = t0();
        let h = TaskHistory {
            cluster: Some(stats(&[60.0, 100.0, 140.0], &[])),
            global: None,
        };
        let a = task(ProgressStatus::InProgress, Some(40), now);
        let b = task(ProgressStatus::NotStarted, None, now);
        let got = estimate(&[(&a, &h), (&b, &h)], now);
        assert_eq!(
            got,
            EtaFrom::History {
                at: now + TimeDelta::seconds(160),
                range: [now + TimeDelta::seconds(120), now + TimeDelta::seconds(200)],
            }
        );
        let none = TaskHistory::default();
        assert_eq!(estimate(&[(&a, &h), (&b, &none)], now), EtaFrom::Rate);
        // Nothing left to do: the end is now.
        assert_eq!(
            estimate(&[], now),
            EtaFrom::History {
                at: now,
                range: [now, now]
            }
        );
        // Absurd history is no estimate.
        let huge = TaskHistory {
            cluster: Some(stats(&[1e12, 1e12, 1e12], &[])),
            global: None,
        };
        assert_eq!(estimate(&[(&b, &huge)], now), EtaFrom::Rate);
    }

    #[test]
    fn a_task_is_stalled_past_its_p90_with_no_recent_event() {
        let now = t0();
        let h = TaskHistory {
            cluster: None,
            global: Some(stats(&[60.0, 60.0, 60.0, 60.0, 600.0], &[])), // p90 384
        };
        let quiet = STALL_AFTER;
        let old = Some(now - TimeDelta::minutes(6));
        let recent = Some(now - TimeDelta::minutes(4));
        let long = task(ProgressStatus::InProgress, Some(400), now);
        assert!(is_stalled(&long, &h, old, now, quiet));
        assert!(past_p90(&long, &h, now));
        assert!(
            !is_stalled(&long, &h, recent, now, quiet),
            "an event 4 min ago"
        );
        assert!(!is_stalled(&long, &h, None, now, quiet));
        let short = task(ProgressStatus::InProgress, Some(300), now);
        assert!(!is_stalled(&short, &h, old, now, quiet), "within p90");
        assert!(!past_p90(&short, &h, now));
        assert!(
            !is_stalled(&long, &TaskHistory::default(), old, now, quiet),
            "no history"
        );
        let paused = task(ProgressStatus::Paused, Some(400), now);
        assert!(!is_stalled(&paused, &h, old, now, quiet), "paused");
        assert!(is_stalled(
            &long,
            &h,
            recent,
            now,
            std::time::Duration::from_secs(60)
        ));
    }
}
