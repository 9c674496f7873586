//! Wake-ups for followers: one connection per replica `LISTEN`s on
//! `EVENTS_CHANNEL` (see `store/postgres/progress.rs`), which every commit that appends events
//! notifies. A notification only says "read from your `seq`": followers still read the events
//! themselves, so a lost notification costs latency, never an event. While the connection is
//! down followers poll (see [`ListenStats::connected`]); it is made again after a pause, and a
//! fresh connection wakes followers once (notifications sent meanwhile are lost).
//!
//! Commits notify only while some replica says its streams have clients
//! ([`PostgresStore::set_following`], table `stream_followers`, schema 12): a notification
//! costs every listening backend and replica a wake-up, and PostgreSQL queues the commits that
//! notify behind one lock (with 16 writers on 3 replicas, a third of the throughput for
//! nobody). A replica marks itself before its first client reads, so a commit whose
//! statement starts after that notifies; one that started before is found by the next poll.
//! The mark is a lease ([`FOLLOW_LEASE`], on the database's clock): a replica renews it while
//! it has clients and removes it when the last leaves; a dead replica's mark runs out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use super::connect::Target;
use super::progress::{EVENTS_CHANNEL, PostgresStore};

/// The `application_name` of listening connections (seen in `pg_stat_activity`).
pub const LISTEN_APPLICATION: &str = "eks-upgrade-agent-listen";

/// Options of [`PostgresStore::listen`].
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// Pause before connecting again after the connection dropped or could not be made.
    pub reconnect_after: Duration,
    /// How often a quiet listening connection is probed with an empty query (and how long it
    /// stays idle before TCP keepalives start, at least 1 s): a connection that died silently
    /// (a NAT timeout, a failover without a reset) is found within about this long, not after
    /// the kernel's hours. Default [`DEFAULT_PROBE`].
    pub probe: Duration,
}

/// Default of [`ListenOptions::probe`]: 30 s.
pub const DEFAULT_PROBE: Duration = Duration::from_secs(30);

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            reconnect_after: Duration::from_secs(1),
            probe: DEFAULT_PROBE,
        }
    }
}

/// How long a replica's mark in `stream_followers` lasts unless renewed (replicas renew it
/// every [`FOLLOW_RENEW`] while their streams have clients).
pub const FOLLOW_LEASE: Duration = Duration::from_secs(60);

/// How often a replica with stream clients renews its mark.
pub const FOLLOW_RENEW: Duration = Duration::from_secs(15);

/// Figures of a [`Listener`].
#[derive(Debug, Default)]
pub struct ListenStats {
    connected: AtomicBool,
    notifications: AtomicU64,
    connects: AtomicU64,
}

impl ListenStats {
    /// Whether the listening connection is up now (when it is not, followers poll).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Notifications received.
    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }

    /// Connections made (1 + reconnects).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}

/// The listening thread; dropping it stops the thread and closes its connection.
#[derive(Debug)]
pub struct Listener {
    stats: Arc<ListenStats>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Its figures, shared (followers read [`ListenStats::connected`]).
    pub fn stats(&self) -> Arc<ListenStats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PostgresStore {
    /// Marks this store's replica as one whose streams have clients (`true`: for
    /// [`FOLLOW_LEASE`] from now on the database's clock; call again within it to renew) or
    /// none (`false`). While any replica is marked, commits that append events notify
    /// [`EVENTS_CHANNEL`]. Marks whose lease ran out are removed on the way.
    pub fn set_following(&self, following: bool) -> crate::Result<()> {
        let me = self.instance().to_owned();
        let lease = i64::try_from(FOLLOW_LEASE.as_micros()).unwrap_or(i64::MAX);
        self.write(|tx| {
            let now = super::lease::DB_NOW;
            tx.exec(
                &format!("DELETE FROM stream_followers WHERE replica = $1 OR until <= {now}"),
                &[&me],
            )?;
            if following {
                tx.exec(
                    &format!(
                        "INSERT INTO stream_followers (replica, until) VALUES ($1, {now} + $2)"
                    ),
                    &[&me, &lease],
                )?;
            }
            Ok(())
        })
    }

    /// Starts a thread that calls `wake` whenever another commit (of any replica) appended
    /// events, and once each time its connection is made.
    pub fn listen(
        &self,
        options: ListenOptions,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<Listener> {
        let stats = Arc::new(ListenStats::default());
        let (stop_tx, stop_rx) = mpsc::channel();
        let mut target = self.target().clone();
        target.config.application_name(LISTEN_APPLICATION);
        let thread_stats = Arc::clone(&stats);
        let url = self.url().to_owned();
        let thread = std::thread::Builder::new()
            .name("eua-pg-listen".into())
            .spawn(move || run(&target, &url, options, &thread_stats, &stop_rx, &wake))?;
        Ok(Listener {
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// How often the thread looks at its stop channel while waiting for notifications.
const CHECK_STOP: Duration = Duration::from_millis(200);

fn run(
    target: &Target,
    url: &str,
    options: ListenOptions,
    stats: &ListenStats,
    stop: &mpsc::Receiver<()>,
    wake: &dyn Fn(),
) {
    let stopped = |wait: Duration| {
        !matches!(
            stop.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    };
    let mut config = target.config.clone();
    config
        .keepalives(true)
        .keepalives_idle(options.probe.max(Duration::from_secs(1)));
    loop {
        let mut client = match target.tls.connect(&config).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {EVENTS_CHANNEL}"))?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(database = %url, error = %super::connect::chain(&e),
                    "cannot listen for new events; streams poll until it works");
                if stopped(options.reconnect_after) {
                    return;
                }
                continue;
            }
        };
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.connected.store(true, Ordering::Release);
        // Whatever was committed while no one listened.
        wake();
        let mut probed = std::time::Instant::now();
        let error = loop {
            if stopped(Duration::ZERO) {
                stats.connected.store(false, Ordering::Release);
                return;
            }
            use postgres::fallible_iterator::FallibleIterator;
            let began = std::time::Instant::now();
            let (first, queued) = {
                let mut notifications = client.notifications();
                let first = notifications.timeout_iter(CHECK_STOP).next();
                // Drain what else is queued: one wake-up is enough.
                let mut queued = 0;
                if matches!(first, Ok(Some(_))) {
                    let mut rest = notifications.iter();
                    while let Ok(Some(_)) = rest.next() {
                        queued += 1;
                    }
                }
                (first, queued)
            };
            match first {
                Ok(Some(_)) => {
                    stats.notifications.fetch_add(1 + queued, Ordering::Relaxed);
                    wake();
                }
                // Nothing within the wait, or the connection ended: an early return is
                // checked with an empty query (an error there means it is gone).
                Ok(None)
                    if began.elapsed() < CHECK_STOP / 2
                        || client.is_closed()
                        || probed.elapsed() >= options.probe =>
                {
                    probed = std::time::Instant::now();
                    if let Err(e) = client.simple_query("") {
                        break e;
                    }
                }
                Ok(None) => {}
                Err(e) => break e,
            }
        };
        stats.connected.store(false, Ordering::Release);
        // Followers read once now, then poll until the connection is back.
        wake();
        tracing::warn!(database = %url, error = %super::connect::chain(&error),
            "the listening connection dropped; streams poll until it is back");
        if stopped(options.reconnect_after) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use postgres::fallible_iterator::FallibleIterator;

    use super::*;
    use crate::progress::ProgressTracker;
    use crate::store::postgres::PostgresOptions;
    use crate::test_support::PgCluster;

    /// Notifications on `EVENTS_CHANNEL` that reach `listener` within `wait`.
    fn received(listener: &mut postgres::Client, wait: Duration) -> usize {
        let mut n = listener.notifications();
        let mut it = n.timeout_iter(wait);
        let mut got = 0;
        while let Ok(Some(note)) = it.next() {
            assert_eq!(note.channel(), EVENTS_CHANNEL);
            got += 1;
        }
        got
    }

    /// Schema 12: a commit notifies `LISTEN`ers only while some replica's mark is there and
    /// its lease runs (the mark of another store instance counts, one that ran out does not).
    #[test]
    fn commits_notify_only_while_a_replica_follows() {
        let pg = PgCluster::start();
        let url = pg.create_database();
        let open = || Arc::new(PostgresStore::open(&url, &PostgresOptions::default()).unwrap());
        let (writer, follower) = (open(), open());
        let t = ProgressTracker::new(writer);
        let mut listener = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        listener
            .batch_execute(&format!("LISTEN {EVENTS_CHANNEL}"))
            .unwrap();
        let quiet = Duration::from_millis(300);
        let create = |id: &str| {
            t.create_upgrade(id, "p", "c", Default::default()).unwrap();
        };

        create("nobody-follows");
        assert_eq!(
            received(&mut listener, quiet),
            0,
            "a notification for nobody"
        );

        follower.set_following(true).unwrap();
        create("followed");
        assert_eq!(received(&mut listener, Duration::from_secs(5)), 1);
        // Renewing keeps one mark per replica.
        follower.set_following(true).unwrap();
        let marks: i64 = listener
            .query_one("SELECT count(*) FROM stream_followers", &[])
            .unwrap()
            .get(0);
        assert_eq!(marks, 1);

        follower.set_following(false).unwrap();
        create("unfollowed");
        assert_eq!(received(&mut listener, quiet), 0);

        // A replica that died with its mark: the mark's lease ends it.
        follower.set_following(true).unwrap();
        listener
            .batch_execute("UPDATE stream_followers SET until = 0")
            .unwrap();
        create("lease-ran-out");
        assert_eq!(received(&mut listener, quiet), 0);
        // The next mark removes the dead one.
        t.store(); // (the writer marks nothing itself)
        let other = open();
        other.set_following(true).unwrap();
        let replicas: Vec<String> = listener
            .query("SELECT replica FROM stream_followers", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(replicas, vec![other.instance().to_owned()]);
    }
}
