//! Group commit for the REST API: one thread takes the progress commands of concurrent requests
//! and commits whatever has queued up meanwhile in one transaction (`execute_batch`, as
//! `progress apply` does), then answers each request with its own result. A failing command
//! fails alone (the batch rolls it back to its savepoint); nothing is answered before it is
//! durable.
//!
//! Writers that wait for their answers come back all at once only in theory: right after a
//! commit, the queue holds the few that came back first. So when the last group had more than
//! one command and fewer are queued now, the thread waits for as many as the last group had,
//! at most [`GROUP_WAIT`] (`serve --group-wait`): a lone writer never waits, and concurrent
//! writers share one transaction instead of a few each (issue #13, G6: on PostgreSQL, 5.2
//! updates per transaction instead of 2.6 with 16 writers on 3 replicas, each transaction
//! being five round trips).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use eks_upgrade_agent::progress::{Command, ProgressTracker};
use eks_upgrade_agent::store::Committed;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use crate::error::{ApiError, ApiResult};

/// Most commands committed in one transaction.
const MAX_GROUP: usize = 256;

/// Default of the longest wait for a group as large as the last one (see the module).
pub const GROUP_WAIT: Duration = Duration::from_millis(2);

type Job = (Command, Reply);
type Reply = oneshot::Sender<eks_upgrade_agent::Result<Committed>>;

/// The committer thread's inbox; the thread ends when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Committer {
    tx: mpsc::Sender<Job>,
    /// The group wait, in microseconds (0: none).
    wait: Arc<AtomicU64>,
}

impl Committer {
    /// `commits` counts the transactions (`/metrics`: `eua_progress_commits`).
    pub(crate) fn new(tracker: Arc<ProgressTracker>, commits: Counter) -> Committer {
        let (tx, rx) = mpsc::channel::<Job>();
        let wait = Arc::new(AtomicU64::new(GROUP_WAIT.as_micros() as u64));
        let group_wait = Arc::clone(&wait);
        std::thread::Builder::new()
            .name("eua-committer".into())
            .spawn(move || {
                let mut last = 0;
                while let Some(jobs) = next_group(&rx, last, &group_wait) {
                    last = jobs.len();
                    let (commands, replies): (Vec<Command>, Vec<Reply>) = jobs.into_iter().unzip();
                    commits.inc();
                    match tracker.execute_batch(&commands) {
                        Ok(results) => {
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(result); // the client may have gone
                            }
                        }
                        Err(e) => {
                            // The transaction itself failed: nothing of it committed.
                            tracing::error!(error = %e, "group commit failed");
                            let message = e.to_string();
                            for reply in replies {
                                let _ = reply.send(Err(eks_upgrade_agent::Error::Backend {
                                    message: message.clone(),
                                    source: None,
                                }));
                            }
                        }
                    }
                }
            })
            .expect("cannot start the committer thread");
        Committer { tx, wait }
    }

    /// Sets the group wait (zero: commit what is queued at once).
    pub(crate) fn set_wait(&self, wait: Duration) {
        self.wait.store(
            u64::try_from(wait.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Commits `command` (with whatever other requests are committing now).
    pub(crate) async fn execute(&self, command: Command) -> ApiResult<Committed> {
        let gone = || {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        };
        let (tx, rx) = oneshot::channel();
        self.tx.send((command, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(ApiError::from)
    }
}

/// The next group: the first command to come, what is queued behind it and, when the last
/// group had `last` > 1 commands, what comes within the wait until there are `last` of them.
/// `None` once every sender is gone.
fn next_group(rx: &mpsc::Receiver<Job>, last: usize, wait: &AtomicU64) -> Option<Vec<Job>> {
    let mut jobs = vec![rx.recv().ok()?];
    let take_queued = |jobs: &mut Vec<Job>| {
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
    };
    take_queued(&mut jobs);
    let wait = Duration::from_micros(wait.load(Ordering::Relaxed));
    let want = last.min(MAX_GROUP);
    if want > 1 && !wait.is_zero() {
        let deadline = Instant::now() + wait;
        while jobs.len() < want {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match rx.recv_timeout(left) {
                Ok(job) => {
                    jobs.push(job);
                    take_queued(&mut jobs);
                }
                Err(_) => break,
            }
        }
    }
    Some(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: usize) -> Job {
        let c = Command::TaskUpdate {
            upgrade_id: "u".into(),
            task_id: format!("t{n}"),
            percentage: 1.0,
            message: None,
            details: Default::default(),
        };
        (c, oneshot::channel().0)
    }

    fn micros(d: Duration) -> AtomicU64 {
        AtomicU64::new(d.as_micros() as u64)
    }

    #[test]
    fn a_lone_writer_never_waits() {
        let (tx, rx) = mpsc::channel();
        tx.send(job(0)).unwrap();
        let start = Instant::now();
        // The last group had one command: no wait, with 5 s allowed.
        let group = next_group(&rx, 1, &micros(Duration::from_secs(5))).unwrap();
        assert_eq!(group.len(), 1);
        assert!(start.elapsed() < Duration::from_millis(2500));
    }

    #[test]
    fn a_group_waits_for_as_many_as_the_last_one_had_then_goes() {
        let (tx, rx) = mpsc::channel();
        tx.send(job(0)).unwrap();
        let late = tx.clone();
        let sender = std::thread::spawn(move || {
            for n in 1..3 {
                std::thread::sleep(Duration::from_millis(20));
                late.send(job(n)).unwrap();
            }
        });
        let group = next_group(&rx, 3, &micros(Duration::from_secs(3600))).unwrap();
        assert_eq!(group.len(), 3, "waited for the three the last group had");
        sender.join().unwrap();
        // One that comes after the group left goes into the next one.
        tx.send(job(3)).unwrap();
        let next = next_group(&rx, 1, &micros(Duration::from_secs(3600))).unwrap();
        assert_eq!(next.len(), 1);
    }

    #[test]
    fn the_wait_is_bounded_and_zero_turns_it_off() {
        let (tx, rx) = mpsc::channel();
        tx.send(job(0)).unwrap();
        let start = Instant::now();
        let group = next_group(&rx, 5, &micros(Duration::from_millis(50))).unwrap();
        assert_eq!(group.len(), 1, "nobody else came");
        assert!(start.elapsed() >= Duration::from_millis(50));
        // Zero: what is queued goes at once, one coming 100 ms later goes next.
        tx.send(job(1)).unwrap();
        let late = tx.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            late.send(job(2)).unwrap();
        });
        let group = next_group(&rx, 5, &micros(Duration::ZERO)).unwrap();
        assert_eq!(group.len(), 1, "zero waits for nobody");
        sender.join().unwrap();
        assert_eq!(
            next_group(&rx, 1, &micros(Duration::ZERO)).unwrap().len(),
            1
        );
        drop(tx);
        assert!(next_group(&rx, 5, &micros(Duration::ZERO)).is_none());
    }
}
