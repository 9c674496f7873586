//! Progress made for people: the summary block, the task tree with bars, event lines, and the
//! live `watch` view (indicatif bars on a terminal, event lines otherwise). The generic helpers
//! (escaping, widths, sizes, durations) are in [`crate::output`].

use std::collections::HashMap;
use std::io::{self, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::{
    EtaSource, ProgressEvent, ProgressStatus, ProgressSummary, Task, TaskDetail,
};

use crate::Ctx;
use crate::output::{
    bar, duration, eta, fit, print_json, printable, stdout_is_terminal, time, truncate, width,
};

/// [`printable`] for an optional string, `-` when absent.
fn opt(text: Option<&str>) -> std::borrow::Cow<'_, str> {
    text.map_or(std::borrow::Cow::Borrowed("-"), printable)
}

/// A JSON object as one printable line.
fn json_line(map: &eks_upgrade_agent::model::JsonMap) -> String {
    printable(&serde_json::Value::Object(map.clone()).to_string()).into_owned()
}

pub(crate) fn summary(out: &mut impl Write, s: &ProgressSummary) -> io::Result<()> {
    writeln!(
        out,
        "upgrade {}  cluster {}  plan {}",
        printable(&s.upgrade_id),
        printable(&s.cluster_name),
        printable(&s.plan_id)
    )?;
    writeln!(
        out,
        "status {}  phase {}  progress {} {:.1}%",
        s.status,
        opt(s.current_phase.as_deref()),
        bar(s.overall_percentage, 20),
        s.overall_percentage
    )?;
    writeln!(
        out,
        "tasks {} total: {} completed, {} in progress, {} failed, {} paused, {} cancelled, {} not started",
        s.total_tasks,
        s.completed_tasks,
        s.active_tasks,
        s.failed_tasks,
        s.paused_tasks,
        s.cancelled_tasks,
        s.not_started_tasks
    )?;
    writeln!(
        out,
        "started {}  completed {}  duration {}  eta {}{}",
        time(s.started_at),
        time(s.completed_at),
        duration(s.duration),
        eta(s.estimated_completion),
        eta_source(s)
    )?;
    if !s.stalled_task_names.is_empty() {
        writeln!(out, "stalled {}: {}", s.stalled_tasks, stalled_names(s))?;
    }
    if let Some(c) = &s.current_task {
        writeln!(
            out,
            "current task {} ({}) {} {:.1}%",
            printable(&c.task_name),
            printable(&c.task_id),
            c.status,
            c.percentage
        )?;
    }
    if let Some(e) = &s.error_message {
        writeln!(out, "error: {}", printable(e))?;
    }
    if !s.metadata.is_empty() {
        writeln!(out, "metadata {}", json_line(&s.metadata))?;
    }
    Ok(())
}

/// ` (history, 10m–14m)` or ` (rate)` after an estimate; empty without one.
fn eta_source(s: &ProgressSummary) -> String {
    let short = |t| {
        let e = eta(Some(t));
        e.strip_prefix("in ").map(str::to_owned).unwrap_or(e)
    };
    match (s.eta_source, s.eta_range) {
        (Some(EtaSource::History), Some([low, high])) => {
            format!(" (history, {}–{})", short(low), short(high))
        }
        (Some(EtaSource::History), None) => " (history)".into(),
        (Some(EtaSource::Rate), _) => " (rate)".into(),
        (None, _) => String::new(),
    }
}

/// The stalled tasks' names, printable, comma-separated.
fn stalled_names(s: &ProgressSummary) -> String {
    s.stalled_task_names
        .iter()
        .map(|n| printable(n).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The task tree, children under their parents, in the order tasks were added. Iterative and
/// O(tasks): however deep a tree (an old store or a hand-made file), no recursion and no
/// quadratic walk; indentation stops growing past [`MAX_INDENT`] levels.
pub(crate) fn task_tree(
    out: &mut impl Write,
    tasks: &[Task],
    artifacts: &HashMap<String, u64>,
) -> io::Result<()> {
    if tasks.is_empty() {
        return writeln!(out, "no tasks");
    }
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.task_id.as_str(), i))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    let mut roots = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        match t.parent_task_id.as_deref().and_then(|p| index.get(p)) {
            Some(&p) if p != i => children[p].push(i),
            _ => roots.push(i),
        }
    }
    // Depths, parents first (an explicit stack, never recursion).
    let mut depth = vec![0usize; tasks.len()];
    let mut stack: Vec<usize> = roots.clone();
    while let Some(i) = stack.pop() {
        for &k in &children[i] {
            depth[k] = depth[i] + 1;
            stack.push(k);
        }
    }
    let name_width = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| printable(&t.name).chars().count() + 3 * depth[i].min(MAX_INDENT + 1))
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    let w = width();
    let header = format!(
        "{:<name_width$}  {:<12}   {:<10}  {:<30}  {:>7}  {:>9}",
        "TASK", "TYPE", "STATUS", "PROGRESS", "STEPS", "DURATION"
    );
    writeln!(out, "{}", fit(&header, w))?;
    // (task, prefix of its line, last among its siblings, top level), in print order.
    let mut todo: Vec<(usize, String, bool, bool)> = roots
        .iter()
        .rev()
        .map(|&r| (r, String::new(), true, true))
        .collect();
    while let Some((i, prefix, last, top)) = todo.pop() {
        let t = &tasks[i];
        let deep = depth[i] > MAX_INDENT;
        let branch = if top {
            String::new()
        } else if deep {
            format!("{prefix}·  ")
        } else if last {
            format!("{prefix}└─ ")
        } else {
            format!("{prefix}├─ ")
        };
        let label: String = format!("{branch}{}", printable(&t.name))
            .chars()
            .take(name_width)
            .collect();
        let steps = match t.total_steps {
            Some(n) => format!("{}/{n}", t.completed_steps),
            None if t.completed_steps > 0 => t.completed_steps.to_string(),
            None => "-".into(),
        };
        let mark = if is_bad(t.status) { "!" } else { " " };
        let line = format!(
            "{label:<name_width$}  {:<12}  {mark}{:<10}  {} {:>6.1}%  {steps:>7}  {:>9}{}",
            t.task_type.as_str(),
            t.status.as_str(),
            bar(t.percentage, 20),
            t.percentage,
            duration(t.duration),
            match t.retry_count {
                0 => String::new(),
                1 => "  retried once".into(),
                n => format!("  retried {n} times"),
            } + &match artifacts.get(&t.task_id) {
                None | Some(0) => String::new(),
                Some(1) => "  1 artifact".into(),
                Some(n) => format!("  {n} artifacts"),
            }
        );
        writeln!(out, "{}", fit(&line, w))?;
        let pad = if top || deep {
            prefix
        } else if last {
            format!("{prefix}   ")
        } else {
            format!("{prefix}│  ")
        };
        if let Some(e) = &t.error_message {
            writeln!(
                out,
                "{}",
                fit(&format!("{pad}   error: {}", printable(e)), w)
            )?;
        } else if let Some(step) = t
            .current_step
            .as_ref()
            .filter(|_| t.status == ProgressStatus::InProgress)
        {
            writeln!(
                out,
                "{}",
                fit(&format!("{pad}   now: {}", printable(step)), w)
            )?;
        }
        let kids = &children[i];
        for (n, &k) in kids.iter().enumerate().rev() {
            todo.push((k, pad.clone(), n + 1 == kids.len(), false));
        }
    }
    Ok(())
}

/// Statuses the table renderer marks as failures.
fn is_bad(s: ProgressStatus) -> bool {
    matches!(s, ProgressStatus::Failed | ProgressStatus::Cancelled)
}

/// Deepest level the tree indents; deeper tasks are drawn at this level, marked `·`.
const MAX_INDENT: usize = 12;

pub(crate) fn upgrade_list(out: &mut impl Write, list: &[ProgressSummary]) -> io::Result<()> {
    if list.is_empty() {
        return writeln!(out, "no upgrades");
    }
    let w = width();
    // Below 100 columns: narrower id, cluster and phase columns and no bar (the percentage
    // stays), so a row fits 80; then any line still too long is cut with `…`.
    let narrow = w.is_some_and(|n| n < 100);
    let (id_max, cluster_max, phase_width) = if narrow { (16, 12, 10) } else { (24, 20, 16) };
    let id_width = list
        .iter()
        .map(|s| printable(&s.upgrade_id).chars().count())
        .max()
        .unwrap_or(7)
        .clamp(7, id_max);
    let cluster_width = list
        .iter()
        .map(|s| printable(&s.cluster_name).chars().count())
        .max()
        .unwrap_or(7)
        .clamp(7, cluster_max);
    let progress_width = if narrow { 6 } else { 29 };
    let header = format!(
        "{:<id_width$}  {:<cluster_width$}  {:<11}  {:<phase_width$}  {:<progress_width$}  {:>5}  ETA",
        "UPGRADE", "CLUSTER", "STATUS", "PHASE", "PROGRESS", "TASKS",
    );
    writeln!(out, "{}", fit(&header, w))?;
    for s in list {
        let progress = if narrow {
            format!("{:>5.1}%", s.overall_percentage)
        } else {
            format!(
                "{} {:>6.1}%",
                bar(s.overall_percentage, 20),
                s.overall_percentage
            )
        };
        let line = format!(
            "{:<id_width$}  {:<cluster_width$}  {:<11}  {:<phase_width$}  {progress:<progress_width$}  {:>5}  {}",
            cut(&printable(&s.upgrade_id), id_width),
            cut(&printable(&s.cluster_name), cluster_width),
            s.status.as_str(),
            cut(&opt(s.current_phase.as_deref()), phase_width),
            s.total_tasks,
            if s.status.is_terminal() {
                "-".into()
            } else {
                eta(s.estimated_completion)
            }
        );
        writeln!(out, "{}", fit(&line, w))?;
    }
    Ok(())
}

/// `s` cut to `n` characters with `…`.
fn cut(s: &str, n: usize) -> String {
    truncate(s, n)
}

pub(crate) fn task_detail(out: &mut impl Write, d: &TaskDetail) -> io::Result<()> {
    let t = &d.task;
    writeln!(
        out,
        "task {} ({})  upgrade {}",
        printable(&t.task_id),
        printable(&t.name),
        printable(&t.upgrade_id)
    )?;
    writeln!(
        out,
        "type {}  status {}  progress {} {:.1}%  weight {}",
        t.task_type,
        t.status,
        bar(t.percentage, 20),
        t.percentage,
        t.weight
    )?;
    writeln!(
        out,
        "parent {}  children {}  steps {}/{}  current step {}  retries {}",
        opt(t.parent_task_id.as_deref()),
        t.children,
        t.completed_steps,
        t.total_steps.map_or("-".into(), |n| n.to_string()),
        opt(t.current_step.as_deref()),
        t.retry_count
    )?;
    writeln!(
        out,
        "started {}  completed {}  duration {}",
        time(t.started_at),
        time(t.completed_at),
        duration(t.duration)
    )?;
    if let Some(e) = &t.error_message {
        writeln!(out, "error: {}", printable(e))?;
    }
    writeln!(out, "recent events:")?;
    for e in &d.recent_events {
        event_line(out, e)?;
    }
    Ok(())
}

/// The header row of [`event_line`]s.
pub(crate) fn event_header(out: &mut impl Write) -> io::Result<()> {
    let line = format!(
        "{:>8}  {:<24}  {:<21}  {:<24}  {:<11}  {:>6}  MESSAGE",
        "SEQ", "TIME", "KIND", "TASK", "STATUS", "PCT"
    );
    writeln!(out, "{}", fit(&line, width()))
}

/// One event on one line, with its date and time (UTC): what `events`, and `watch` and `demo`
/// when not on a terminal (CI logs), print.
pub(crate) fn event_line(out: &mut impl Write, e: &ProgressEvent) -> io::Result<()> {
    let mut line = format!(
        "{:>8}  {}  {:<21}  {:<24}  {:<11}  {:>5.1}%",
        e.seq,
        e.timestamp.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        e.kind.as_str(),
        opt(e.task_id.as_deref()),
        e.status.as_str(),
        e.percentage
    );
    if let Some(m) = &e.message {
        line.push_str(&format!("  {}", printable(m)));
    }
    if !e.details.is_empty() {
        line.push_str(&format!("  {}", json_line(&e.details)));
    }
    writeln!(out, "{}", fit(&line, width()))
}

/// Live view until the upgrade ends, or `timeout` passes. Polls the store, so changes by other
/// processes show. Returns the status the upgrade ended with, `None` on timeout.
pub(crate) fn watch(
    ctx: &Ctx,
    tracker: &ProgressTracker,
    upgrade: &str,
    interval: Duration,
    timeout: Option<Duration>,
) -> anyhow::Result<Option<ProgressStatus>> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut watcher = Watcher::new(tracker, upgrade, !ctx.json() && stdout_is_terminal())?;
    loop {
        if watcher.poll(ctx)? {
            break;
        }
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if left == Some(Duration::ZERO) {
            watcher.finish(ctx)?;
            return Ok(None);
        }
        std::thread::sleep(left.map_or(interval, |l| l.min(interval)));
    }
    Ok(Some(watcher.finish(ctx)?.status))
}

/// Incremental renderer shared by `watch` and `demo`.
pub(crate) struct Watcher<'a> {
    tracker: &'a ProgressTracker,
    upgrade: String,
    since: u64,
    bars: Option<Bars>,
    /// The stalled tasks last shown.
    stalled: Vec<String>,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    tasks: HashMap<String, ProgressBar>,
    names: HashMap<String, String>,
}

impl<'a> Watcher<'a> {
    pub(crate) fn new(
        tracker: &'a ProgressTracker,
        upgrade: &str,
        live: bool,
    ) -> anyhow::Result<Self> {
        let summary = tracker.summary(upgrade)?;
        let bars = live.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
            let overall = multi.add(ProgressBar::new(1000));
            overall.set_style(
                ProgressStyle::with_template("{prefix:.bold} [{wide_bar:.cyan/blue}] {msg}")
                    .expect("valid template")
                    .progress_chars("##-"),
            );
            overall.set_prefix(truncate(&printable(&summary.upgrade_id), 16));
            Bars {
                multi,
                overall,
                tasks: HashMap::new(),
                names: HashMap::new(),
            }
        });
        Ok(Watcher {
            tracker,
            upgrade: upgrade.to_owned(),
            since: 0,
            bars,
            stalled: Vec::new(),
        })
    }

    /// Applies new events; returns true once the upgrade has ended and every event is shown.
    pub(crate) fn poll(&mut self, ctx: &Ctx) -> anyhow::Result<bool> {
        let mut changed = false;
        loop {
            let page = self
                .tracker
                .events_since(Some(&self.upgrade), self.since, 1000)?;
            for e in &page {
                self.since = e.seq;
                self.event(ctx, e)?;
            }
            changed |= !page.is_empty();
            if page.len() < 1000 {
                break;
            }
        }
        if changed && let Some(b) = &self.bars {
            // A parent's percentage moves with its children's updates, which are not its own
            // events: take every running task's figure from the store.
            refresh_bars(&b.tasks, &self.tracker.tasks(&self.upgrade)?);
        }
        let s = self.tracker.summary(&self.upgrade)?;
        if let Some(b) = &self.bars {
            b.overall
                .set_position((s.overall_percentage * 10.0).round() as u64);
            b.overall.set_message(watch_header(&s));
        }
        if s.stalled_task_names != self.stalled && !ctx.json() {
            // Said once each time the set changes (live: above the bars; else a log line).
            let line = if s.stalled_task_names.is_empty() {
                "no task stalled".to_owned()
            } else {
                format!("stalled {}: {}", s.stalled_tasks, stalled_names(&s))
            };
            match &self.bars {
                Some(b) => b.multi.println(format!("⚠ {line}"))?,
                None => writeln!(io::stdout().lock(), "{}", fit(&line, width()))?,
            }
        }
        self.stalled = s.stalled_task_names.clone();
        Ok(s.status.is_terminal() && s.last_seq <= self.since)
    }

    fn event(&mut self, ctx: &Ctx, e: &ProgressEvent) -> anyhow::Result<()> {
        let Some(bars) = &mut self.bars else {
            let mut out = io::stdout().lock();
            if ctx.json() {
                serde_json::to_writer(&mut out, e)?;
                writeln!(out)?;
            } else {
                event_line(&mut out, e)?;
            }
            return Ok(());
        };
        let Some(task_id) = &e.task_id else {
            if let Some(m) = &e.message {
                bars.multi
                    .println(format!("» {}: {}", e.kind, printable(m)))?;
            }
            return Ok(());
        };
        if e.kind == eks_upgrade_agent::model::EventKind::TaskAdded {
            if let Some(name) = &e.message {
                bars.names
                    .insert(task_id.clone(), printable(name).into_owned());
            }
            return Ok(());
        }
        let name = bars
            .names
            .get(task_id)
            .cloned()
            .unwrap_or_else(|| printable(task_id).into_owned());
        match e.status {
            ProgressStatus::InProgress | ProgressStatus::Paused => {
                let bar = bars.tasks.entry(task_id.clone()).or_insert_with(|| {
                    let b = bars.multi.add(ProgressBar::new(1000));
                    b.set_style(
                        ProgressStyle::with_template("  {prefix:<32} [{bar:30.green/white}] {msg}")
                            .expect("valid template")
                            .progress_chars("=>-"),
                    );
                    b.set_prefix(truncate(&name, 32));
                    b
                });
                bar.set_position((e.percentage * 10.0).round() as u64);
                let msg = printable(e.message.as_deref().unwrap_or(""));
                bar.set_message(format!("{:>5.1}% {}", e.percentage, truncate(&msg, 60)));
            }
            status => {
                if let Some(b) = bars.tasks.remove(task_id) {
                    b.finish_and_clear();
                    bars.multi.remove(&b);
                }
                let mark = match status {
                    ProgressStatus::Completed => "✔",
                    ProgressStatus::Failed => "✘",
                    ProgressStatus::Cancelled => "⊘",
                    _ => "·",
                };
                let tail = e
                    .message
                    .as_deref()
                    .map(|m| format!(": {}", printable(m)))
                    .unwrap_or_default();
                bars.multi
                    .println(format!("{mark} {name} {status}{tail}"))?;
            }
        }
        Ok(())
    }

    /// Leaves the bars in their final state.
    pub(crate) fn close(self) {
        if let Some(b) = self.bars {
            for (_, bar) in b.tasks {
                bar.finish_and_clear();
            }
            b.overall.finish();
        }
    }

    /// Closes the bars and prints the final summary, which it returns.
    pub(crate) fn finish(self, ctx: &Ctx) -> anyhow::Result<ProgressSummary> {
        let (tracker, upgrade) = (self.tracker, self.upgrade.clone());
        self.close();
        let s = tracker.summary(&upgrade)?;
        if ctx.json() {
            print_json(&s)?;
        } else {
            let mut out = io::stdout().lock();
            writeln!(out)?;
            summary(&mut out, &s)?;
        }
        Ok(s)
    }
}

/// The message of `watch`'s top line (`45% in_progress planning 3/10 1✘ in 12m`): at most
/// [`WATCH_HEADER_MAX`] characters, so that with the id (16) and a bar of 10 the line fits 80
/// columns; the bar takes what the terminal has left.
fn watch_header(s: &ProgressSummary) -> String {
    let text = format!(
        "{:.0}% {} {} {}/{}{}{} {}",
        s.overall_percentage,
        s.status,
        truncate(&opt(s.current_phase.as_deref()), 10),
        s.completed_tasks,
        s.total_tasks,
        if s.failed_tasks > 0 {
            format!(" {}✘", s.failed_tasks)
        } else {
            String::new()
        },
        if s.stalled_tasks > 0 {
            format!(" {} stalled", s.stalled_tasks)
        } else {
            String::new()
        },
        eta(s.estimated_completion)
    );
    truncate(&text, WATCH_HEADER_MAX)
}

/// Longest `watch` header message.
const WATCH_HEADER_MAX: usize = 50;

/// Sets each task bar to its task's current (rolled-up) percentage.
fn refresh_bars(bars: &HashMap<String, ProgressBar>, tasks: &[Task]) {
    for t in tasks {
        if let Some(bar) = bars.get(&t.task_id) {
            let position = (t.percentage * 10.0).round() as u64;
            if bar.position() != position {
                bar.set_position(position);
                let msg = printable(t.last_message.as_deref().unwrap_or(""));
                bar.set_message(format!("{:>5.1}% {}", t.percentage, truncate(&msg, 60)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn a_deep_chain_renders_in_linear_time_without_recursion() {
        use eks_upgrade_agent::model::{JsonMap, TaskType};
        let n = 25_000;
        let tasks: Vec<Task> = (0..n)
            .map(|i| Task {
                upgrade_id: "u".into(),
                task_id: format!("t{i}"),
                name: format!("task {i}"),
                task_type: TaskType::UpgradeStep,
                parent_task_id: (i > 0).then(|| format!("t{}", i - 1)),
                status: ProgressStatus::InProgress,
                percentage: 0.0,
                current_step: None,
                total_steps: None,
                completed_steps: 0,
                weight: 1.0,
                children: u32::from(i + 1 < n),
                error_message: None,
                retry_count: 0,
                last_message: None,
                created_at: Utc::now(),
                started_at: None,
                completed_at: None,
                duration: None,
                metadata: JsonMap::new(),
            })
            .collect();
        // On a small stack: the old recursive walk overflowed it.
        let text = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut out = Vec::new();
                task_tree(&mut out, &tasks, &HashMap::new()).unwrap();
                String::from_utf8(out).unwrap()
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(text.lines().count(), n as usize + 1);
        assert!(
            text.lines().nth(2).unwrap().starts_with("└─ task 1"),
            "{}",
            &text[..300]
        );
        let last = text.lines().last().unwrap();
        assert!(last.contains("·  task 24999"), "{last}");
        assert!(last.len() < 300, "indentation is bounded: {}", last.len());
    }

    #[test]
    fn parent_bars_follow_the_rolled_up_percentage() {
        use eks_upgrade_agent::model::{JsonMap, TaskType};
        let task = |id: &str, pct: f64| Task {
            upgrade_id: "u".into(),
            task_id: id.into(),
            name: id.into(),
            task_type: TaskType::UpgradeStep,
            parent_task_id: None,
            status: ProgressStatus::InProgress,
            percentage: pct,
            current_step: None,
            total_steps: None,
            completed_steps: 0,
            weight: 1.0,
            children: 2,
            error_message: None,
            retry_count: 0,
            last_message: Some("draining".into()),
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            duration: None,
            metadata: JsonMap::new(),
        };
        let bars: HashMap<String, ProgressBar> = [("nodes".to_owned(), ProgressBar::hidden())]
            .into_iter()
            .collect();
        bars["nodes"].set_length(1000);
        refresh_bars(&bars, &[task("nodes", 65.0), task("other", 10.0)]);
        assert_eq!(bars["nodes"].position(), 650);
        assert!(bars["nodes"].message().contains("65.0%"));
    }

    /// "The watch header fits one line at 80 columns": id (16) + ` [` + bar (10) + `] ` +
    /// message, for the widest message there can be.
    #[test]
    fn the_watch_header_fits_80_columns() {
        use eks_upgrade_agent::model::JsonMap;
        let s = ProgressSummary {
            upgrade_id: "u".repeat(128),
            plan_id: "p".into(),
            cluster_name: "c".repeat(100),
            status: ProgressStatus::InProgress,
            current_phase: Some("a-very-long-phase-name".into()),
            overall_percentage: 100.0,
            total_tasks: 100_000,
            completed_tasks: 99_999,
            failed_tasks: 99_999,
            active_tasks: 0,
            paused_tasks: 0,
            cancelled_tasks: 0,
            not_started_tasks: 0,
            started_at: None,
            completed_at: None,
            duration: None,
            estimated_completion: Some(Utc::now() + chrono::Duration::days(3000)),
            error_message: None,
            current_task: None,
            metadata: JsonMap::new(),
            last_seq: 0,
            created_at: Utc::now(),
            progress_percentage: 100.0,
            active_task_names: Vec::new(),
            failed_task_names: Vec::new(),
            eta_source: Some(EtaSource::History),
            eta_range: None,
            stalled_tasks: 99_999,
            stalled_task_names: Vec::new(),
        };
        let msg = watch_header(&s);
        let line = 16 + 2 + 10 + 2 + msg.chars().count();
        assert!(line <= 80, "{line}: {msg}");
    }
}
