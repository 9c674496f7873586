//! Group commit for the REST API: one thread takes the progress commands of concurrent requests
//! and commits whatever has queued up meanwhile in one transaction (`execute_batch`, as
//! `progress apply` does), then answers each request with its own result. A failing command
//! fails alone (the batch rolls it back to its savepoint); nothing is answered before it is
//! durable.

use std::sync::Arc;
use std::sync::mpsc;

use axum::http::StatusCode;
use eks_upgrade_agent::progress::{Command, ProgressTracker};
use eks_upgrade_agent::store::Committed;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use crate::error::{ApiError, ApiResult};

/// Most commands committed in one transaction.
const MAX_GROUP: usize = 256;

type Reply = oneshot::Sender<eks_upgrade_agent::Result<Committed>>;

/// The committer thread's inbox; the thread ends when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Committer {
    tx: mpsc::Sender<(Command, Reply)>,
}

impl Committer {
    /// `commits` counts the transactions (`/metrics`: `eua_progress_commits`).
    pub(crate) fn new(tracker: Arc<ProgressTracker>, commits: Counter) -> Committer {
        let (tx, rx) = mpsc::channel::<(Command, Reply)>();
        std::thread::Builder::new()
            .name("eua-committer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
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
        Committer { tx }
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
