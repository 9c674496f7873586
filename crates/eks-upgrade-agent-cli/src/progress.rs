//! `eks-upgrade-agent progress ...`: every progress operation of the library, one subcommand
//! each, plus `events`, `watch`, `export`, `import` and `apply`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::TaskType;
use eks_upgrade_agent::progress::apply::{self, ApplyOptions};
use eks_upgrade_agent::progress::{Command, NewTask, reference};
use eks_upgrade_agent::store::Committed;

use crate::kv::{parse_kv, parse_kv_json, to_map};
use crate::output::print_json;
use crate::render;
use crate::{Access, Backend, Ctx, Output};

#[derive(Debug, Subcommand)]
pub(crate) enum ProgressCmd {
    /// Create, start, move through phases, complete or fail upgrades
    #[command(subcommand)]
    Upgrade(UpgradeCmd),
    /// Add tasks and report their progress
    #[command(subcommand)]
    Task(TaskCmd),
    /// Print an upgrade's events (oldest first), optionally following new ones
    Events {
        /// Upgrade id
        upgrade: String,
        /// Only events with seq greater than this
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing new events (also those written by other processes); with -o json,
        /// prints one JSON object per line
        #[arg(long)]
        follow: bool,
        /// Print at most this many events (without --follow) and say on stderr how many more
        /// there are [default: all, streamed]
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show live progress bars until the upgrade ends
    Watch {
        /// Upgrade id
        upgrade: String,
        /// How often to look for changes, in milliseconds
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Exit 0 if the upgrade completed, 3 if it failed or was cancelled
        #[arg(long)]
        exit_status: bool,
        /// Stop watching after this long (e.g. 45s, 30m, 2h) and exit 4 if the upgrade has not
        /// ended [default: until it ends]
        #[arg(long, value_name = "DURATION", value_parser = eks_upgrade_agent::units::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Wait until an upgrade reaches a condition; the exit code tells the outcome
    ///
    /// Exit 0 when the condition is reached, 3 when the upgrade ended otherwise (failed or
    /// cancelled), 4 on timeout, 1 when the upgrade does not exist. Sees changes made by other
    /// processes and, with --server, on the server.
    Wait {
        /// Upgrade id
        upgrade: String,
        /// completed, started or phase=NAME (reached if the upgrade entered that phase)
        #[arg(long = "for", value_name = "CONDITION", default_value = "completed", value_parser = crate::wait::parse_condition)]
        condition: crate::wait::Condition,
        /// Give up after this long (e.g. 45s, 30m, 2h) and exit 4 [default: wait forever]
        #[arg(long, value_name = "DURATION", value_parser = eks_upgrade_agent::units::parse_duration)]
        timeout: Option<Duration>,
        /// How often to look for changes, in milliseconds
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
    /// Write the reference JSON (upgrade_<id>.json) of an upgrade
    Export {
        /// Upgrade id
        upgrade: String,
        /// Output file; `-` for stdout [default: upgrade_<id>.json]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Import a reference progress file (as written by the Python agent or by export)
    Import {
        /// The upgrade_<id>.json file
        file: PathBuf,
    },
    /// Read JSON Lines commands on stdin; acknowledge each line on stdout once durable
    ///
    /// One object per line, e.g.
    /// {"op":"task.update","upgrade_id":"u1","task_id":"t1","percentage":42.0,"message":"m"}.
    /// Ops: upgrade.create|start|phase|complete|fail, task.add|add_many|start|update|step|
    /// complete|fail|pause|resume|cancel|retry, with the model's field names. Each line gets
    /// {"ok":true,"seq":N} or {"ok":false,"line":L,"code":"...","error":"..."}; bad lines do
    /// not stop the stream. Exits 1 if any line was rejected.
    Apply {
        /// Most lines committed in one transaction
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        max_batch: u64,
        /// Add to each success the events and status changes it committed:
        /// {"ok":true,"seq":N,"events":[...],"status_changes":[...]}
        #[arg(long)]
        ack_events: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UpgradeCmd {
    /// Create an upgrade
    Create {
        /// New upgrade id
        upgrade: String,
        /// Plan id
        #[arg(long)]
        plan: String,
        /// Cluster name
        #[arg(long)]
        cluster: String,
        /// Metadata KEY=VALUE, the value a string (repeatable)
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_kv)]
        meta: Vec<(String, Value)>,
        /// Metadata KEY=JSON, the value a JSON number, bool, array or object (repeatable)
        #[arg(long = "meta-json", value_name = "KEY=JSON", value_parser = parse_kv_json)]
        meta_json: Vec<(String, Value)>,
    },
    /// Start an upgrade
    Start {
        /// Upgrade id
        upgrade: String,
        /// Initial phase
        #[arg(long)]
        phase: Option<String>,
    },
    /// Enter a new phase
    Phase {
        /// Upgrade id
        upgrade: String,
        /// Phase name
        name: String,
    },
    /// Complete an upgrade
    Complete {
        /// Upgrade id
        upgrade: String,
    },
    /// Fail an upgrade
    Fail {
        /// Upgrade id
        upgrade: String,
        /// What went wrong
        #[arg(long)]
        error: String,
    },
    /// Summary (reference fields) and task tree
    Show {
        /// Upgrade id
        upgrade: String,
    },
    /// List upgrades
    List,
}

#[derive(Debug, Args)]
pub(crate) struct TaskRef {
    /// Upgrade id
    upgrade: String,
    /// Task id
    task: String,
}

#[derive(Debug, Args)]
pub(crate) struct TaskMsg {
    #[command(flatten)]
    r: TaskRef,
    /// Message recorded with the event
    #[arg(long, short)]
    message: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TaskCmd {
    /// Add a task
    Add {
        #[command(flatten)]
        r: TaskRef,
        /// Display name
        #[arg(long)]
        name: String,
        /// upgrade_plan, upgrade_step, validation, rollback or cleanup
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
        task_type: TaskType,
        /// Parent task
        #[arg(long)]
        parent: Option<String>,
        /// Number of steps (then `step` sets the percentage)
        #[arg(long)]
        total_steps: Option<u32>,
        /// Weight in the parent's percentage (default 1)
        #[arg(long)]
        weight: Option<f64>,
        /// Metadata KEY=VALUE, the value a string (repeatable)
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_kv)]
        meta: Vec<(String, Value)>,
        /// Metadata KEY=JSON, the value a JSON number, bool, array or object (repeatable)
        #[arg(long = "meta-json", value_name = "KEY=JSON", value_parser = parse_kv_json)]
        meta_json: Vec<(String, Value)>,
    },
    /// Start a task
    Start(TaskMsg),
    /// Report a percentage
    Update {
        #[command(flatten)]
        r: TaskRef,
        /// 0..=100
        #[arg(long, allow_negative_numbers = true)]
        percent: f64,
        /// Message recorded with the event
        #[arg(long, short)]
        message: Option<String>,
        /// Details KEY=VALUE, the value a string (repeatable)
        #[arg(long = "detail", value_name = "KEY=VALUE", value_parser = parse_kv)]
        detail: Vec<(String, Value)>,
        /// Details KEY=JSON, the value a JSON number, bool, array or object (repeatable)
        #[arg(long = "detail-json", value_name = "KEY=JSON", value_parser = parse_kv_json)]
        detail_json: Vec<(String, Value)>,
    },
    /// Report steps done
    Step {
        #[command(flatten)]
        r: TaskRef,
        /// Steps done so far
        #[arg(long)]
        completed: u32,
        /// Name of the step now running
        #[arg(long)]
        name: Option<String>,
        /// Message recorded with the event
        #[arg(long, short)]
        message: Option<String>,
    },
    /// Complete a task
    Complete(TaskMsg),
    /// Fail a task
    Fail {
        #[command(flatten)]
        r: TaskRef,
        /// What went wrong
        #[arg(long)]
        error: String,
    },
    /// Pause a running task
    Pause(TaskMsg),
    /// Resume a paused task
    Resume(TaskMsg),
    /// Cancel a task
    Cancel(TaskMsg),
    /// Retry a failed or cancelled task
    Retry(TaskMsg),
    /// Show a task with its five most recent events
    Show(TaskRef),
}

fn parse_type(s: &str) -> Result<TaskType, String> {
    s.parse()
        .map_err(|e: eks_upgrade_agent::Error| e.to_string())
}

pub(crate) fn run(ctx: &Ctx, cmd: ProgressCmd) -> anyhow::Result<ExitCode> {
    // Only what creates an upgrade may create the store: anything else on a missing store
    // fails naming the directory and leaves nothing behind.
    let access = match &cmd {
        ProgressCmd::Upgrade(UpgradeCmd::Create { .. })
        | ProgressCmd::Import { .. }
        | ProgressCmd::Apply { .. } => Access::Create,
        _ => Access::Existing,
    };
    let backend = ctx.progress_backend(access)?;
    let tracker = &backend.tracker;
    match cmd {
        ProgressCmd::Upgrade(c) => {
            let mutates = !matches!(c, UpgradeCmd::Show { .. } | UpgradeCmd::List);
            let code = upgrade(ctx, &backend, c)?;
            if mutates {
                backend.after_commit(ctx);
            }
            Ok(code)
        }
        ProgressCmd::Task(c) => {
            let mutates = !matches!(c, TaskCmd::Show(_));
            let code = task(ctx, tracker, c)?;
            if mutates {
                backend.after_commit(ctx);
            }
            Ok(code)
        }
        ProgressCmd::Events {
            upgrade,
            since,
            follow,
            limit,
        } => events(ctx, tracker, &upgrade, since, follow, limit),
        ProgressCmd::Wait {
            upgrade,
            condition,
            timeout,
            interval_ms,
        } => wait(
            ctx,
            tracker,
            &upgrade,
            &condition,
            timeout,
            Duration::from_millis(interval_ms.max(10)),
        ),
        ProgressCmd::Watch {
            upgrade,
            interval_ms,
            exit_status,
            timeout,
        } => {
            // While it watches, it delivers what is pending (its own data dir; a server
            // delivers its own).
            let _notifier = backend
                .local
                .as_ref()
                .and_then(|store| crate::notify::dispatcher_or_warn(ctx, store))
                .map(|d| d.spawn());
            let ended = render::watch(
                ctx,
                tracker,
                &upgrade,
                Duration::from_millis(interval_ms.max(10)),
                timeout,
            )?;
            let Some(status) = ended else {
                eprintln!(
                    "timed out after {}: upgrade {} has not ended",
                    crate::output::duration(timeout.map(|t| t.as_secs_f64())),
                    crate::output::printable(&upgrade)
                );
                return Ok(crate::wait::Outcome::TimedOut.exit_code());
            };
            Ok(if exit_status {
                crate::wait::ended_status(status).exit_code()
            } else {
                ExitCode::SUCCESS
            })
        }
        ProgressCmd::Export { upgrade, out } => export(ctx, tracker, &upgrade, out),
        ProgressCmd::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let id = reference::import(tracker, &text)
                .with_context(|| format!("cannot import {}", file.display()))?;
            backend.after_commit(ctx);
            let summary = tracker.summary(&id)?;
            if ctx.json() {
                print_json(&summary)?;
            } else {
                println!(
                    "imported upgrade {id} ({} tasks, last seq {})",
                    summary.total_tasks, summary.last_seq
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ProgressCmd::Apply {
            max_batch,
            ack_events,
        } => {
            let notifier = backend
                .local
                .as_ref()
                .and_then(|store| crate::notify::dispatcher_or_warn(ctx, store))
                .map(|d| d.spawn());
            let stdin = io::stdin().lock();
            let stdout = io::stdout().lock();
            let stats = apply::run(
                tracker,
                stdin,
                stdout,
                &ApplyOptions {
                    max_batch: max_batch as usize,
                    ack_events,
                },
            )?;
            drop(notifier);
            backend.after_commit(ctx);
            if stats.failed > 0 {
                eprintln!("apply: {} of {} lines rejected", stats.failed, stats.lines);
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints the outcome of a mutation: the upgrade's summary or the task, with the seq.
fn mutated(
    ctx: &Ctx,
    tracker: &ProgressTracker,
    upgrade_id: &str,
    task_id: Option<&str>,
    committed: Committed,
) -> anyhow::Result<ExitCode> {
    let seq = committed.last_seq();
    match (ctx.output, task_id) {
        (Output::Json, None) => {
            let mut v = serde_json::to_value(tracker.summary(upgrade_id)?)?;
            v["seq"] = json!(seq);
            print_json(&v)?;
        }
        (Output::Json, Some(t)) => {
            let mut v = serde_json::to_value(tracker.task_detail(upgrade_id, t)?.task)?;
            v["seq"] = json!(seq);
            print_json(&v)?;
        }
        (Output::Table, None) => {
            let s = tracker.summary(upgrade_id)?;
            println!(
                "upgrade {upgrade_id}: {}{} {:.1}% (seq {seq})",
                s.status,
                s.current_phase
                    .map(|p| format!(", phase {p}"))
                    .unwrap_or_default(),
                s.overall_percentage
            );
        }
        (Output::Table, Some(t)) => {
            let d = tracker.task_detail(upgrade_id, t)?.task;
            println!("task {t}: {} {:.1}% (seq {seq})", d.status, d.percentage);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn upgrade(ctx: &Ctx, backend: &Backend, cmd: UpgradeCmd) -> anyhow::Result<ExitCode> {
    let tracker = &backend.tracker;
    let (id, committed) = match cmd {
        UpgradeCmd::Create {
            upgrade,
            plan,
            cluster,
            meta,
            meta_json,
        } => {
            let c = tracker.create_upgrade(&upgrade, &plan, &cluster, to_map(meta, meta_json))?;
            (upgrade, c)
        }
        UpgradeCmd::Start { upgrade, phase } => {
            let c = tracker.start_upgrade(&upgrade, phase.as_deref())?;
            (upgrade, c)
        }
        UpgradeCmd::Phase { upgrade, name } => {
            let c = tracker.set_phase(&upgrade, &name)?;
            (upgrade, c)
        }
        UpgradeCmd::Complete { upgrade } => {
            let c = tracker.complete_upgrade(&upgrade)?;
            (upgrade, c)
        }
        UpgradeCmd::Fail { upgrade, error } => {
            let c = tracker.fail_upgrade(&upgrade, &error)?;
            (upgrade, c)
        }
        UpgradeCmd::Show { upgrade } => {
            let summary = tracker.summary(&upgrade)?;
            let tasks = tracker.tasks(&upgrade)?;
            if ctx.json() {
                let mut v = serde_json::to_value(&summary)?;
                v["tasks"] = serde_json::to_value(&tasks)?;
                print_json(&v)?;
            } else {
                let mut out = io::stdout().lock();
                render::summary(&mut out, &summary)?;
                writeln!(out)?;
                let counts = backend.artifact_counts(ctx, &upgrade)?;
                render::task_tree(&mut out, &tasks, &counts)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        UpgradeCmd::List => {
            let summaries = tracker
                .list_upgrades()?
                .iter()
                .map(|u| tracker.summary_of(u))
                .collect::<Result<Vec<_>, _>>()?;
            if ctx.json() {
                print_json(&summaries)?;
            } else {
                render::upgrade_list(&mut io::stdout().lock(), &summaries)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    mutated(ctx, tracker, &id, None, committed)
}

fn task(ctx: &Ctx, tracker: &ProgressTracker, cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    let (r, command) = match cmd {
        TaskCmd::Add {
            r,
            name,
            task_type,
            parent,
            total_steps,
            weight,
            meta,
            meta_json,
        } => {
            let mut t = NewTask::new(r.task.clone(), name, task_type);
            t.parent_task_id = parent;
            t.total_steps = total_steps;
            t.weight = weight;
            t.metadata = to_map(meta, meta_json);
            let c = Command::add_task(r.upgrade.clone(), t);
            (r, c)
        }
        TaskCmd::Start(m) => m.into_command(|upgrade_id, task_id, message| Command::TaskStart {
            upgrade_id,
            task_id,
            message,
        }),
        TaskCmd::Update {
            r,
            percent,
            message,
            detail,
            detail_json,
        } => {
            let c = Command::TaskUpdate {
                upgrade_id: r.upgrade.clone(),
                task_id: r.task.clone(),
                percentage: percent,
                message,
                details: to_map(detail, detail_json),
            };
            (r, c)
        }
        TaskCmd::Step {
            r,
            completed,
            name,
            message,
        } => {
            let c = Command::TaskStep {
                upgrade_id: r.upgrade.clone(),
                task_id: r.task.clone(),
                completed_steps: completed,
                current_step: name,
                message,
            };
            (r, c)
        }
        TaskCmd::Complete(m) => {
            m.into_command(|upgrade_id, task_id, message| Command::TaskComplete {
                upgrade_id,
                task_id,
                message,
            })
        }
        TaskCmd::Fail { r, error } => {
            let c = Command::TaskFail {
                upgrade_id: r.upgrade.clone(),
                task_id: r.task.clone(),
                error_message: error,
            };
            (r, c)
        }
        TaskCmd::Pause(m) => m.into_command(|upgrade_id, task_id, message| Command::TaskPause {
            upgrade_id,
            task_id,
            message,
        }),
        TaskCmd::Resume(m) => m.into_command(|upgrade_id, task_id, message| Command::TaskResume {
            upgrade_id,
            task_id,
            message,
        }),
        TaskCmd::Cancel(m) => m.into_command(|upgrade_id, task_id, message| Command::TaskCancel {
            upgrade_id,
            task_id,
            message,
        }),
        TaskCmd::Retry(m) => m.into_command(|upgrade_id, task_id, message| Command::TaskRetry {
            upgrade_id,
            task_id,
            message,
        }),
        TaskCmd::Show(r) => {
            let detail = tracker.task_detail(&r.upgrade, &r.task)?;
            if ctx.json() {
                print_json(&detail)?;
            } else {
                render::task_detail(&mut io::stdout().lock(), &detail)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let committed = tracker.execute(command)?;
    mutated(ctx, tracker, &r.upgrade, Some(&r.task), committed)
}

impl TaskMsg {
    /// The task reference and the command `make` builds from (upgrade, task, message).
    fn into_command(
        self,
        make: impl FnOnce(String, String, Option<String>) -> Command,
    ) -> (TaskRef, Command) {
        let command = make(self.r.upgrade.clone(), self.r.task.clone(), self.message);
        (self.r, command)
    }
}

fn events(
    ctx: &Ctx,
    tracker: &ProgressTracker,
    upgrade: &str,
    since: u64,
    follow: bool,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    if !follow {
        return print_events(ctx, tracker, upgrade, since, limit);
    }
    // Follow: poll the store, so events written by other processes show up too.
    let mut since = since;
    let mut out = io::stdout().lock();
    if !ctx.json() {
        render::event_header(&mut out)?;
    }
    loop {
        let page = tracker.events_since(Some(upgrade), since, 1000)?;
        for e in &page {
            if ctx.json() {
                serde_json::to_writer(&mut out, e)?;
                writeln!(out)?;
            } else {
                render::event_line(&mut out, e)?;
            }
            since = e.seq;
        }
        out.flush()?;
        if page.len() < 1000 {
            let u = tracker.upgrade(upgrade)?;
            if u.status.is_terminal() && u.last_seq <= since {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Events read per store call when listing.
const EVENT_PAGE: usize = 1000;

/// Prints an upgrade's events after `since`, page by page (memory stays flat): all of them, or
/// the first `limit` with a note on stderr saying how many more there are and how to get them.
fn print_events(
    ctx: &Ctx,
    tracker: &ProgressTracker,
    upgrade: &str,
    mut since: u64,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut printed = 0usize;
    if ctx.json() {
        out.write_all(b"[")?;
    } else {
        render::event_header(&mut out)?;
    }
    let mut remaining = limit.unwrap_or(usize::MAX);
    while remaining > 0 {
        let want = remaining.min(EVENT_PAGE);
        let page = tracker.events_since(Some(upgrade), since, want)?;
        for e in &page {
            if ctx.json() {
                out.write_all(if printed == 0 { b"\n  " } else { b",\n  " })?;
                serde_json::to_writer(&mut out, e)?;
            } else {
                render::event_line(&mut out, e)?;
            }
            printed += 1;
            since = e.seq;
        }
        remaining -= page.len();
        if page.len() < want {
            break;
        }
    }
    if ctx.json() {
        out.write_all(if printed == 0 { b"]\n" } else { b"\n]\n" })?;
    }
    out.flush()?;
    if limit.is_some_and(|l| printed == l) {
        // Count what was left out, page by page (bounded: this is a hint, not a scan of a
        // huge log).
        let mut more = 0usize;
        let mut after = since;
        while more < 100_000 {
            let page = tracker.events_since(Some(upgrade), after, EVENT_PAGE)?;
            more += page.len();
            match page.last() {
                Some(e) if page.len() == EVENT_PAGE => after = e.seq,
                _ => break,
            }
        }
        if more > 0 {
            let count = if more >= 100_000 {
                format!("at least {more}")
            } else {
                more.to_string()
            };
            eprintln!(
                "note: {printed} events shown, {count} more left out: continue with --since {since}, or drop --limit for all"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `progress wait`: the outcome on stdout (reached) or stderr (not), and as the exit code.
fn wait(
    ctx: &Ctx,
    tracker: &ProgressTracker,
    upgrade: &str,
    condition: &crate::wait::Condition,
    timeout: Option<Duration>,
    interval: Duration,
) -> anyhow::Result<ExitCode> {
    use crate::wait::Outcome;
    let (outcome, s) = crate::wait::wait(tracker, upgrade, condition, timeout, interval)?;
    if ctx.json() {
        print_json(&json!({
            "upgrade_id": upgrade,
            "for": condition.to_string(),
            "outcome": outcome.as_str(),
            "summary": s,
        }))?;
        return Ok(outcome.exit_code());
    }
    let id = crate::output::printable(upgrade);
    let phase = s
        .current_phase
        .as_deref()
        .map(|p| format!(", phase {}", crate::output::printable(p)))
        .unwrap_or_default();
    match outcome {
        Outcome::Reached => println!("upgrade {id}: {condition} ({}{phase})", s.status),
        Outcome::EndedOtherwise => eprintln!(
            "upgrade {id} {} without reaching {condition}{}",
            s.status,
            s.error_message
                .as_deref()
                .map(|e| format!(": {}", crate::output::printable(e)))
                .unwrap_or_default()
        ),
        Outcome::TimedOut => eprintln!(
            "timed out after {}: upgrade {id} is {}{phase}, not yet {condition}",
            crate::output::duration(timeout.map(|t| t.as_secs_f64())),
            s.status
        ),
    }
    Ok(outcome.exit_code())
}

fn export(
    ctx: &Ctx,
    tracker: &ProgressTracker,
    upgrade: &str,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let value = reference::export(tracker, upgrade)?;
    let path = out.unwrap_or_else(|| PathBuf::from(reference::file_name(upgrade)));
    if path.as_os_str() == "-" {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Write a temp file beside the target, then rename: never a half-written export.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("export"),
        std::process::id()
    ));
    let write = || -> anyhow::Result<()> {
        let mut f = io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer_pretty(&mut f, &value)?;
        f.write_all(b"\n")?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    if ctx.json() {
        print_json(&json!({"upgrade_id": upgrade, "path": path}))?;
    } else {
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
