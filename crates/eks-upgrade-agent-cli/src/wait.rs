//! `progress wait` and `progress watch --exit-status`: scripts wait on an upgrade and learn the
//! outcome from the exit code (as `kubectl wait` does). Both poll the store (local or a server's),
//! so writes by other processes are seen.
//!
//! Exit codes: [`REACHED`] (0) the condition holds; [`ENDED_OTHERWISE`] (3) the upgrade ended
//! (failed or cancelled) without reaching it; [`TIMED_OUT`] (4) `--timeout` passed first.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::{EventKind, ProgressStatus, ProgressSummary};

/// The condition was reached.
pub(crate) const REACHED: u8 = 0;
/// The upgrade ended (failed or cancelled) without reaching the condition.
pub(crate) const ENDED_OTHERWISE: u8 = 3;
/// `--timeout` passed before either.
pub(crate) const TIMED_OUT: u8 = 4;

/// What `progress wait --for` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Condition {
    /// The upgrade completed.
    Completed,
    /// The upgrade started (it may have ended since).
    Started,
    /// The upgrade entered this phase (it may have left it since).
    Phase(String),
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::Completed => f.write_str("completed"),
            Condition::Started => f.write_str("started"),
            Condition::Phase(p) => write!(f, "phase={p}"),
        }
    }
}

/// `completed`, `started` or `phase=NAME`.
pub(crate) fn parse_condition(s: &str) -> Result<Condition, String> {
    match s {
        "completed" => Ok(Condition::Completed),
        "started" => Ok(Condition::Started),
        _ => match s.strip_prefix("phase=") {
            Some(p) if !p.is_empty() => Ok(Condition::Phase(p.to_owned())),
            _ => Err(format!(
                "invalid condition {s:?}: expected completed, started or phase=NAME"
            )),
        },
    }
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Reached,
    EndedOtherwise,
    TimedOut,
}

impl Outcome {
    pub(crate) fn code(self) -> u8 {
        match self {
            Outcome::Reached => REACHED,
            Outcome::EndedOtherwise => ENDED_OTHERWISE,
            Outcome::TimedOut => TIMED_OUT,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Reached => "reached",
            Outcome::EndedOtherwise => "ended",
            Outcome::TimedOut => "timeout",
        }
    }

    pub(crate) fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

/// The exit status `watch --exit-status` ends with, once the upgrade has ended.
pub(crate) fn ended_status(status: ProgressStatus) -> Outcome {
    if status == ProgressStatus::Completed {
        Outcome::Reached
    } else {
        Outcome::EndedOtherwise
    }
}

/// Polls `upgrade` every `interval` until `condition` holds, the upgrade ends otherwise, or
/// `timeout` passes. Returns the outcome and the last summary read.
pub(crate) fn wait(
    tracker: &ProgressTracker,
    upgrade: &str,
    condition: &Condition,
    timeout: Option<Duration>,
    interval: Duration,
) -> anyhow::Result<(Outcome, ProgressSummary)> {
    let deadline = timeout.map(|t| Instant::now() + t);
    // For a phase: the phase events seen so far (a phase entered and left between two polls,
    // or before the wait began, still counts).
    let mut since = 0u64;
    loop {
        let summary = tracker.summary(upgrade)?;
        let mut reached = match condition {
            Condition::Completed => summary.status == ProgressStatus::Completed,
            Condition::Started => {
                summary.started_at.is_some()
                    || matches!(
                        summary.status,
                        ProgressStatus::InProgress
                            | ProgressStatus::Paused
                            | ProgressStatus::Completed
                    )
            }
            Condition::Phase(p) => summary.current_phase.as_deref() == Some(p.as_str()),
        };
        if let Condition::Phase(p) = condition {
            while !reached {
                let page = tracker.events_since(Some(upgrade), since, 1000)?;
                for e in &page {
                    since = e.seq;
                    reached |= matches!(
                        e.kind,
                        EventKind::UpgradeStarted | EventKind::UpgradePhaseChanged
                    ) && e.message.as_deref() == Some(p.as_str());
                }
                if page.len() < 1000 {
                    break;
                }
            }
        }
        if reached {
            return Ok((Outcome::Reached, summary));
        }
        if summary.status.is_terminal() {
            return Ok((Outcome::EndedOtherwise, summary));
        }
        let mut pause = interval;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok((Outcome::TimedOut, summary));
            }
            pause = pause.min(left);
        }
        std::thread::sleep(pause);
    }
}
