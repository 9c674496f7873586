//! [`Dispatcher`]: moves notifications from the outbox to the sinks. At least once; per
//! upgrade in `seq` order; batches bounded by each sink's count and byte limits; only failed
//! entries are resent, after a capped exponential backoff with jitter; entries that can never
//! succeed, or that run out of attempts or age, are marked dead and kept.
//!
//! Ordering note: when an entry of a batch fails, the later entries of the same upgrade in that
//! batch are resent after it (with the same ids), so the last copy a consumer receives is in
//! order; consumers deduplicate on the id.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{EntryResult, EventSink, Notification};
use crate::error::Result;
use crate::store::{DeliveryOutcome, Outbox};

/// Tuning of a [`Dispatcher`].
#[derive(Debug, Clone)]
pub struct DispatcherOptions {
    /// Attempts before an entry is marked dead.
    pub max_attempts: u32,
    /// Age after which a failing entry is marked dead.
    pub max_age: Duration,
    /// First retry delay.
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How often the background loop looks for work.
    pub poll: Duration,
}

impl Default for DispatcherOptions {
    fn default() -> Self {
        DispatcherOptions {
            max_attempts: 25,
            max_age: Duration::from_secs(24 * 3600),
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
            poll: Duration::from_millis(200),
        }
    }
}

/// Delivery state of one sink.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SinkStatus {
    /// The sink.
    pub sink: String,
    /// Notifications in the outbox.
    pub total: u64,
    /// Not yet delivered (including never tried).
    pub pending: u64,
    /// Delivered.
    pub delivered: u64,
    /// Given up on (kept in the outbox).
    pub dead: u64,
    /// The latest error.
    pub last_error: Option<String>,
    /// The earliest scheduled retry.
    pub next_retry: Option<DateTime<Utc>>,
}

/// Totals of delivery passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    /// Entries delivered.
    pub delivered: u64,
    /// Entries that failed and will be retried.
    pub retried: u64,
    /// Entries marked dead.
    pub dead: u64,
    /// Sink calls made.
    pub calls: u64,
}

impl std::ops::AddAssign for PassReport {
    fn add_assign(&mut self, o: PassReport) {
        self.delivered += o.delivered;
        self.retried += o.retried;
        self.dead += o.dead;
        self.calls += o.calls;
    }
}

/// Delivers the outbox to sinks.
pub struct Dispatcher {
    outbox: Arc<dyn Outbox>,
    sinks: Vec<Arc<dyn EventSink>>,
    options: DispatcherOptions,
    /// One pass at a time in this process (the background thread and a `flush` would otherwise
    /// both send the same due entries).
    pass: Mutex<()>,
    /// Passes the background thread ([`Dispatcher::spawn`]) has ended, for tests to wait on
    /// (test builds only: a release build neither keeps nor signals it).
    #[cfg(test)]
    passes_ended: (Mutex<u64>, Condvar),
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("sinks", &self.sinks)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Pseudo-random fraction in [0, 1) for jitter (no need for a cryptographic source).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x % 10_000) as f64 / 10_000.0
}

impl Dispatcher {
    /// A dispatcher over `outbox` for `sinks`.
    pub fn new(
        outbox: Arc<dyn Outbox>,
        sinks: Vec<Arc<dyn EventSink>>,
        options: DispatcherOptions,
    ) -> Dispatcher {
        Dispatcher {
            outbox,
            sinks,
            options,
            pass: Mutex::new(()),
            #[cfg(test)]
            passes_ended: (Mutex::new(0), Condvar::new()),
        }
    }

    /// Waits until the background thread has ended `n` passes, at most `limit`; true if it
    /// has. Tests use it instead of sleeping.
    #[cfg(test)]
    pub(crate) fn wait_for_passes(&self, n: u64, limit: Duration) -> bool {
        let (lock, cvar) = &self.passes_ended;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cvar
            .wait_timeout_while(guard, limit, |ended| *ended < n)
            .unwrap_or_else(|p| p.into_inner());
        *guard >= n
    }

    /// The configured sinks.
    pub fn sinks(&self) -> &[Arc<dyn EventSink>] {
        &self.sinks
    }

    /// Delay before attempt `attempts + 1`: exponential, capped, with jitter in [50%, 100%].
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = self
            .options
            .base_backoff
            .saturating_mul(1u32 << attempts.min(20))
            .min(self.options.max_backoff);
        exp.mul_f64(0.5 + 0.5 * jitter())
    }

    /// One pass over every sink: take in new notifications and deliver what is due, batch by
    /// batch, until nothing is due.
    pub fn run_once(&self) -> Result<PassReport> {
        let _pass = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = PassReport::default();
        for sink in &self.sinks {
            total += self.run_sink(sink.as_ref())?;
        }
        Ok(total)
    }

    fn run_sink(&self, sink: &dyn EventSink) -> Result<PassReport> {
        let mut report = PassReport::default();
        self.outbox.ingest(sink.name(), sink.kinds())?;
        loop {
            let due = self
                .outbox
                .due(sink.name(), Utc::now(), sink.max_batch().max(1) * 10)?;
            if due.is_empty() {
                return Ok(report);
            }
            // Claims last a lease (team mode): renew them while this pass delivers, so a pass
            // longer than the lease never lets another replica send the same entries.
            let held = Mutex::new(due.iter().map(|(n, _)| n.nid).collect::<Vec<u64>>());
            let again = std::thread::scope(|scope| {
                let (stop, stopped) = mpsc::channel::<()>();
                if let Some(lease) = self.outbox.lease() {
                    let (outbox, held) = (self.outbox.as_ref(), &held);
                    let (name, label) = (sink.name(), sink.label());
                    scope.spawn(move || renew_claims(outbox, name, label, held, lease, &stopped));
                }
                let again = self.deliver_claimed(sink, &due, &mut report, &held);
                drop(stop);
                again
            })?;
            if !again {
                return Ok(report);
            }
        }
    }

    /// Delivers claimed entries in batches, recording outcomes; false: stop this pass.
    fn deliver_claimed(
        &self,
        sink: &dyn EventSink,
        due: &[(Notification, u32)],
        report: &mut PassReport,
        held: &Mutex<Vec<u64>>,
    ) -> Result<bool> {
        let mut sent_any = false;
        let mut i = 0;
        while i < due.len() {
            // Fill a batch within the sink's count and byte limits.
            let mut batch: Vec<(Notification, u32)> = Vec::new();
            let mut bytes = 0;
            let mut outcomes = Vec::new();
            while i < due.len() && batch.len() < sink.max_batch() {
                let size = serde_json::to_vec(&due[i].0.detail)
                    .map(|v| v.len())
                    .unwrap_or(0)
                    + 256;
                if size > sink.max_batch_bytes() {
                    outcomes.push((
                        due[i].0.nid,
                        DeliveryOutcome::Dead {
                            error: format!(
                                "entry is {size} bytes; {} accepts at most {}",
                                sink.label(),
                                sink.max_batch_bytes()
                            ),
                        },
                    ));
                    report.dead += 1;
                    i += 1;
                    continue;
                }
                if bytes + size > sink.max_batch_bytes() && !batch.is_empty() {
                    break;
                }
                bytes += size;
                batch.push(due[i].clone());
                i += 1;
            }
            if !batch.is_empty() {
                let notes: Vec<Notification> = batch.iter().map(|(n, _)| n.clone()).collect();
                let results = sink.deliver(&notes);
                report.calls += 1;
                sent_any = true;
                let mut failed_upgrades: HashSet<&str> = HashSet::new();
                for (k, (n, attempts)) in batch.iter().enumerate() {
                    let result = results
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| EntryResult::Retry("sink returned no result".into()));
                    // A sink's error is kept per entry and shown by `notify status`: at most
                    // 1 KiB of it (an SDK's dump of a whole request was once 10 KB a row).
                    let result = match result {
                        EntryResult::Retry(e) => EntryResult::Retry(clip(e)),
                        EntryResult::Reject(e) => EntryResult::Reject(clip(e)),
                        other => other,
                    };
                    let result = match result {
                        EntryResult::Delivered
                            if failed_upgrades.contains(n.upgrade_id.as_str()) =>
                        {
                            EntryResult::Retry(
                                "resent to keep order after an earlier entry failed".into(),
                            )
                        }
                        other => other,
                    };
                    let outcome = match result {
                        EntryResult::Delivered => {
                            report.delivered += 1;
                            DeliveryOutcome::Delivered
                        }
                        EntryResult::Reject(error) => {
                            report.dead += 1;
                            DeliveryOutcome::Dead { error }
                        }
                        EntryResult::Retry(error) => {
                            failed_upgrades.insert(&n.upgrade_id);
                            let age = (Utc::now() - n.time).to_std().unwrap_or_default();
                            if attempts + 1 >= self.options.max_attempts
                                || age > self.options.max_age
                            {
                                report.dead += 1;
                                DeliveryOutcome::Dead {
                                    error: format!(
                                        "gave up after {} attempts: {error}",
                                        attempts + 1
                                    ),
                                }
                            } else {
                                report.retried += 1;
                                let delay = chrono::Duration::from_std(self.backoff(*attempts))
                                    .unwrap_or_default();
                                DeliveryOutcome::Retry {
                                    next_at: Utc::now() + delay,
                                    error,
                                }
                            }
                        }
                    };
                    outcomes.push((n.nid, outcome));
                }
            }
            if !outcomes.is_empty() {
                self.outbox.record(sink.name(), &outcomes)?;
                if let Ok(mut held) = held.lock() {
                    held.retain(|nid| !outcomes.iter().any(|(n, _)| n == nid));
                }
            }
            if report.retried > 0 {
                // Something is failing: stop this pass, let the backoff work.
                return Ok(false);
            }
        }
        Ok(sent_any)
    }

    /// Delivers what is pending, for at most `limit`; returns what was done. Stops early when
    /// nothing is due.
    pub fn flush(&self, limit: Duration) -> Result<PassReport> {
        let start = Instant::now();
        let mut total = PassReport::default();
        loop {
            let pass = self.run_once()?;
            total += pass;
            let pending: u64 = self.status()?.iter().map(|s| s.pending).sum();
            if pending == 0 || start.elapsed() >= limit {
                return Ok(total);
            }
            if pass.calls == 0 && pass.dead == 0 {
                // Everything left waits for a backoff: wait a little, within the limit.
                let left = limit.saturating_sub(start.elapsed());
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
        }
    }

    /// Delivery state per sink.
    pub fn status(&self) -> Result<Vec<SinkStatus>> {
        self.sinks
            .iter()
            .map(|s| {
                // Shown to people (notify status, /metrics): the label, not the key.
                let mut st = self.outbox.sink_status(s.name(), s.kinds())?;
                st.sink = s.label().to_owned();
                Ok(st)
            })
            .collect()
    }

    /// Runs passes on a background thread until the handle is dropped (or
    /// [`finish`](DispatcherHandle::finish)ed).
    pub fn spawn(self: Arc<Self>) -> DispatcherHandle {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let wake = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicBool::new(false));
        let (s, w, l) = (Arc::clone(&stop), Arc::clone(&wake), Arc::clone(&last));
        let (done_tx, done) = mpsc::channel::<()>();
        let this = Arc::clone(&self);
        let handle = std::thread::Builder::new()
            .name("eua-notify".into())
            .spawn(move || {
                let (lock, cvar) = &*s;
                loop {
                    if let Err(e) = this.run_once() {
                        tracing::warn!(error = %e, "notification pass failed");
                    }
                    #[cfg(test)]
                    {
                        let (ended, cvar) = &this.passes_ended;
                        *ended.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                        cvar.notify_all();
                    }
                    let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                    if *guard {
                        break;
                    }
                    if !w.swap(false, Ordering::SeqCst) {
                        let (guard, _) = cvar
                            .wait_timeout(guard, this.options.poll)
                            .unwrap_or_else(|p| p.into_inner());
                        if *guard {
                            break;
                        }
                    }
                }
                // `finish`: one more pass for what the last changes committed.
                if l.load(Ordering::SeqCst)
                    && let Err(e) = this.run_once()
                {
                    tracing::warn!(error = %e, "notification pass failed");
                }
                drop(done_tx);
            })
            .expect("spawn the notification thread");
        DispatcherHandle {
            stop,
            wake,
            last,
            handle: Some((handle, done)),
            dispatcher: self,
        }
    }
}

/// A running background dispatcher; stops (after its current pass) when dropped.
#[derive(Debug)]
pub struct DispatcherHandle {
    stop: Arc<(Mutex<bool>, Condvar)>,
    wake: Arc<AtomicBool>,
    last: Arc<AtomicBool>,
    handle: Option<(JoinHandle<()>, mpsc::Receiver<()>)>,
    dispatcher: Arc<Dispatcher>,
}

impl DispatcherHandle {
    /// Asks for a pass now (e.g. after a commit).
    pub fn wake(&self) {
        self.wake.store(true, Ordering::SeqCst);
        self.stop.1.notify_all();
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// At a graceful stop: the thread finishes its pass, makes one more (for what the last
    /// changes committed) and ends; waits for it at most `wait`. True when it ended in time
    /// (false: a sink did not answer in time; the thread is left behind, its entries stay in
    /// the outbox).
    pub fn finish(mut self, wait: Duration) -> bool {
        self.last.store(true, Ordering::SeqCst);
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        let Some((handle, done)) = self.handle.take() else {
            return true;
        };
        match done.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                true
            }
        }
    }
}

impl Drop for DispatcherHandle {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some((h, _)) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Longest sink error kept per entry, in bytes.
const MAX_ERROR: usize = 1024;

/// `error` cut to [`MAX_ERROR`] bytes (on a character boundary), marked when cut.
/// Renews the claims in `held` every third of `lease` until `stop` is dropped. `sink` is the
/// sink's name (the outbox key; a webhook's or OTLP endpoint's full URL, credentials included),
/// `label` what a log may show of it.
fn renew_claims(
    outbox: &dyn Outbox,
    sink: &str,
    label: &str,
    held: &Mutex<Vec<u64>>,
    lease: Duration,
    stop: &mpsc::Receiver<()>,
) {
    let every = (lease / 3).max(Duration::from_millis(10));
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        let nids = held.lock().map(|h| h.clone()).unwrap_or_default();
        if let Err(e) = outbox.renew(sink, &nids) {
            tracing::warn!(sink = label, error = %e, "cannot renew the claims on notifications");
        }
    }
}

fn clip(mut error: String) -> String {
    if error.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push_str("… (cut)");
    }
    error
}

#[cfg(test)]
mod clip_tests {
    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        assert_eq!(super::clip("short".into()), "short");
        let long = "é".repeat(2000);
        let cut = super::clip(long);
        assert!(
            cut.len() <= super::MAX_ERROR + "… (cut)".len(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with("… (cut)"));
    }
}

#[cfg(test)]
mod log_tests {
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use crate::error::{Error, Result};
    use crate::store::{DeliveryOutcome, Outbox};

    /// An outbox whose renewals fail (a database blip).
    #[derive(Debug)]
    struct Blip;
    impl Outbox for Blip {
        fn ingest(&self, _: &str, _: crate::notify::Kinds) -> Result<u64> {
            Ok(0)
        }
        fn due(
            &self,
            _: &str,
            _: DateTime<Utc>,
            _: usize,
        ) -> Result<Vec<(crate::notify::Notification, u32)>> {
            Ok(Vec::new())
        }
        fn record(&self, _: &str, _: &[(u64, DeliveryOutcome)]) -> Result<()> {
            Ok(())
        }
        fn sink_status(
            &self,
            _: &str,
            _: crate::notify::Kinds,
        ) -> Result<crate::notify::SinkStatus> {
            Err(Error::invalid("unused"))
        }
        fn renew(&self, _: &str, _: &[u64]) -> Result<u64> {
            Err(Error::invalid("connection lost"))
        }
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A failed renewal logs the sink's label, never its name (a webhook's full URL, with its
    /// password and secret path).
    #[test]
    fn a_failed_renewal_logs_the_label_not_the_url() {
        let sink = crate::notify::WebhookSink::new(
            "https://user:s3cr3t@hooks.example.com/secret-path",
            None,
            crate::notify::Format::default(),
            "test",
            Duration::from_secs(1),
        )
        .unwrap();
        use crate::notify::EventSink as _;
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let (stop, stopped) = mpsc::channel::<()>();
            let held = Mutex::new(vec![1u64]);
            // The subscriber is this thread's: renew here, stop from another thread.
            let stopper = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                drop(stop);
            });
            super::renew_claims(
                &Blip,
                sink.name(),
                sink.label(),
                &held,
                Duration::from_millis(30),
                &stopped,
            );
            stopper.join().unwrap();
        });
        let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("cannot renew the claims"), "{log}");
        assert!(log.contains(sink.label()), "{log}");
        assert!(!log.contains("s3cr3t"), "{log}");
        assert!(!log.contains("secret-path"), "{log}");
    }
}
