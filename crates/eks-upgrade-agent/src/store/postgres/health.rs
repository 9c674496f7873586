//! Health of the shared database beyond "it answers": a session that holds the `seq` counter
//! row stalls every writer of every replica (commits take it last, for microseconds).

use std::time::Duration;

use super::progress::PostgresStore;
use crate::error::Result;

impl PostgresStore {
    /// `Some(reason)` when another session has held the `seq` counter for more than `after`
    /// (a transaction that took it and neither committed nor rolled back), naming it.
    ///
    /// Read from `pg_locks` without taking the lock: a session that wrote the counter holds
    /// a lock on its table until it ends, and its last statement changed state at most that
    /// long ago (commits take the counter as their last statement).
    pub fn counter_stall(&self, after: Duration) -> Result<Option<String>> {
        let secs = after.as_secs_f64();
        self.read(|db| {
            let row = db.opt(
                "SELECT a.pid, extract(epoch FROM clock_timestamp() - a.state_change)::float8, \
                 coalesce(a.application_name, ''), coalesce(a.state, '') \
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'relation' AND l.relation = 'seq_counter'::regclass \
                 AND l.granted AND l.mode IN ('RowExclusiveLock', 'RowShareLock') \
                 AND a.pid <> pg_backend_pid() \
                 AND clock_timestamp() - a.state_change > make_interval(secs => $1) \
                 ORDER BY a.state_change LIMIT 1",
                &[&secs],
            )?;
            Ok(row.map(|r| {
                let (pid, held, app, state): (i32, f64, String, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                format!(
                    "the seq counter is held by database session {pid} ({app}, {state}) for \
                     {held:.0} s: every write waits for it; end that session \
                     (SELECT pg_terminate_backend({pid}))"
                )
            }))
        })
    }
}
