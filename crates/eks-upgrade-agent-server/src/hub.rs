//! One poller per server reads new events from the store and fans them out to every stream
//! client through a bounded broadcast ring.
//!
//! - Events committed by this process wake the poller at once (a tracker callback); events of
//!   other processes on the same data dir are found by polling every [`POLL`] (well inside the
//!   250 ms promise). On a database, other replicas' commits wake it through
//!   [`Hub::waker`] (PostgreSQL `LISTEN`), and [`Hub::follow_wakeups`] slows the polling to a
//!   safety net while that works.
//! - Each event is serialized once, as the reference `progress_event` message; clients share the
//!   bytes.
//! - The ring holds [`RING`] events and nobody waits for a slow client. A client that falls out
//!   of the ring catches up from the store, page by page at its own pace (no gap); one that is
//!   more than [`MAX_LAG`] events behind is told to `resync` and skips ahead (see
//!   [`Subscription`]). Slow clients never delay others, and memory does not grow with them.
//! - A [`Subscription`] starting at `since` replays older events from the store page by page,
//!   then continues from the ring, skipping what it already sent: no gap, no duplicate.
//! - While no client is connected the poller reads nothing (on a database every replica would
//!   otherwise read every commit of every replica for nobody). The first client to join an
//!   idle hub reads the store's last seq and the poller continues from there, so a client
//!   that joins without `since` gets every event committed after it joined, and one with
//!   `since` replays from the store as before (see `Cursor`). On a database the hub also
//!   says whether it has clients ([`Hub::on_following`]): commits notify only while some
//!   replica's hub does.
//!   A `since` beyond the store's last seq (a restored data dir) gets a [`Item::Resync`] to
//!   the store's last seq first, then live events.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::json;
use tokio::sync::{Notify, broadcast};

use eks_upgrade_agent::model::ProgressEvent;
use eks_upgrade_agent::progress::ProgressTracker;

use crate::error::{ApiResult, blocking};

/// How often the poller looks for events written by other processes.
pub const POLL: Duration = Duration::from_millis(50);
/// Events kept in the broadcast ring; a client further behind catches up from the store.
pub const RING: usize = 4096;
/// A client further behind than this many events gets `resync` instead of a catch-up.
pub const MAX_LAG: u64 = 50_000;
/// Events read from the store per page (poller and replays).
const PAGE: usize = 1000;

/// One published event.
#[derive(Debug)]
pub struct HubEvent {
    /// Its seq.
    pub seq: u64,
    /// Its upgrade.
    pub upgrade_id: String,
    /// `{"type":"progress_event","seq":N,"data":{...}}`.
    pub text: Utf8Bytes,
}

impl HubEvent {
    fn new(e: &ProgressEvent) -> HubEvent {
        let mut text = json!({"type": "progress_event", "seq": e.seq, "data": e}).to_string();
        // The bytes keep the string's allocation: without this a replay page or the ring
        // holds up to twice the text.
        text.shrink_to_fit();
        HubEvent {
            seq: e.seq,
            upgrade_id: e.upgrade_id.clone(),
            text: text.into(),
        }
    }
}

/// The fan-out point; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tracker: Arc<ProgressTracker>,
    tx: broadcast::Sender<Arc<HubEvent>>,
    /// Highest seq published.
    published: AtomicU64,
    /// Held by the poller while it sends events to the ring and raises `published`, and by a
    /// subscription reading `published` for its position: so an event is either in the ring
    /// of a subscription that joined before, or at or below its position, never neither (it
    /// was sent before the subscription joined the ring and `published` raised after the
    /// subscription read it: a gap for a client that starts from its summary's `seq`).
    publishing: Mutex<()>,
    wake: Arc<Notify>,
    started: AtomicBool,
    /// Clients counted ([`Joined`]); shared with the poller, which never holds the hub on a
    /// runtime thread.
    clients: Arc<AtomicUsize>,
    /// Reading nothing, for lack of clients (see [`Cursor`]); shared like `clients`.
    idle: Arc<AtomicBool>,
    /// Events published since start (metrics).
    events: AtomicU64,
    max_lag: u64,
    /// External wake-ups and how long to wait for them (see [`Hub::follow_wakeups`]).
    follow: std::sync::OnceLock<Follow>,
    /// Where the poller reads from; see [`Cursor`].
    cursor: Mutex<Cursor>,
    /// Told when the hub gets clients and when it has none (see [`Hub::on_following`]).
    following: std::sync::OnceLock<Following>,
}

/// A hook told whether the hub has clients, and how often to tell it again while it has.
struct Following {
    mark: Box<dyn Fn(bool) -> eks_upgrade_agent::Result<()> + Send + Sync>,
    renew: Duration,
}

impl std::fmt::Debug for Following {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Following")
            .field("renew", &self.renew)
            .finish()
    }
}

/// The poller's position, held by the poller around each read and idle change, and by a client
/// joining an idle hub.
///
/// A hub starts idle (`Inner::idle`), and the poller makes it idle again (reading nothing) when
/// it finds no client. A client is counted first, then looks at `idle`; the poller sets `idle`,
/// then looks at the count again and takes it back if a client came (both sequentially
/// consistent): so either the poller sees the client and stays busy, or the client sees the
/// hub idle and joins it the slow way, under the lock. That way, the first client to join an
/// idle hub tells the [`Following`] hook, then moves `last` (and `published`) to the store's
/// last seq before the poller reads again: the events in between were committed before any
/// client joined, and none is skipped for a client that joined earlier, as there is none. A
/// client joining a busy hub takes no lock (it never waits for a read). The hook is told under
/// the lock, so its `true` and `false` come in the order the hub gained and lost its clients.
#[derive(Debug)]
struct Cursor {
    /// Every event with `seq <= last` was published (or skipped while idle).
    last: u64,
    /// When the [`Following`] hook was last told `true` (successfully or not), and whether it
    /// took it; `None` after `false`.
    marked: Option<(std::time::Instant, bool)>,
    /// When joining an idle hub last failed, and why: for a second, joins fail at once
    /// with the same error instead of queueing on an unreachable store.
    failed: Option<(std::time::Instant, String)>,
}

/// How long joins of an idle hub fail at once after one failed.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// How long an idle poller sleeps when nothing wakes it (it does nothing on waking).
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// One counted client: dropping it takes the count back (and wakes the poller when it was
/// the last, so the hub goes idle at once).
#[derive(Debug)]
struct Joined {
    clients: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

impl Joined {
    fn new(clients: &Arc<AtomicUsize>, wake: &Arc<Notify>) -> Joined {
        clients.fetch_add(1, Ordering::SeqCst);
        Joined {
            clients: Arc::clone(clients),
            wake: Arc::clone(wake),
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if self.clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.wake.notify_one();
        }
    }
}

/// An external source of wake-ups: while `up()` the poller waits up to `quiet` between reads.
struct Follow {
    up: Box<dyn Fn() -> bool + Send + Sync>,
    quiet: Duration,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("up", &(self.up)())
            .field("quiet", &self.quiet)
            .finish()
    }
}

impl Hub {
    /// A hub over `tracker`; events this tracker commits wake it immediately.
    pub fn new(tracker: Arc<ProgressTracker>) -> Hub {
        Hub::with_limits(tracker, RING, MAX_LAG)
    }

    /// A hub with another ring size and resync threshold (tests use small ones).
    pub fn with_limits(tracker: Arc<ProgressTracker>, ring: usize, max_lag: u64) -> Hub {
        let (tx, _) = broadcast::channel(ring.max(1));
        let inner = Arc::new(Inner {
            tracker: Arc::clone(&tracker),
            tx,
            published: AtomicU64::new(0),
            publishing: Mutex::new(()),
            wake: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            clients: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(AtomicBool::new(true)),
            events: AtomicU64::new(0),
            max_lag,
            follow: std::sync::OnceLock::new(),
            cursor: Mutex::new(Cursor {
                last: 0,
                marked: None,
                failed: None,
            }),
            following: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&inner);
        tracker.on_event(move |_| {
            if let Some(inner) = weak.upgrade() {
                inner.wake.notify_one();
            }
        });
        Hub { inner }
    }

    /// A function that wakes the poller (for another process's commits: PostgreSQL
    /// `LISTEN`); it holds no reference to the hub.
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let weak = Arc::downgrade(&self.inner);
        move || {
            if let Some(inner) = weak.upgrade() {
                inner.wake.notify_one();
            }
        }
    }

    /// While `up()` says the [`waker`](Self::waker) is fed, the poller reads only when woken
    /// or every `quiet`; otherwise it polls every [`POLL`]. Set once (later calls are ignored).
    pub fn follow_wakeups(&self, up: impl Fn() -> bool + Send + Sync + 'static, quiet: Duration) {
        let _ = self.inner.follow.set(Follow {
            up: Box::new(up),
            quiet,
        });
    }

    /// Calls `mark(true)` when the hub gets its first client (before it reads for it), again
    /// every `renew` while it has clients, and `mark(false)` once the last has gone. `mark`
    /// blocks (it runs on the blocking pool); a failure is logged and tried again a `renew`
    /// later. Set once (later calls are ignored). On a database: `PostgresStore::
    /// set_following`, so that commits notify only while some replica has stream clients.
    pub fn on_following(
        &self,
        mark: impl Fn(bool) -> eks_upgrade_agent::Result<()> + Send + Sync + 'static,
        renew: Duration,
    ) {
        let _ = self.inner.following.set(Following {
            mark: Box::new(mark),
            renew,
        });
    }

    /// The tracker.
    pub fn tracker(&self) -> &Arc<ProgressTracker> {
        &self.inner.tracker
    }

    /// Starts the poller if it is not running (needs a tokio runtime); subscribing does too.
    pub async fn start(&self) -> ApiResult<()> {
        if self.inner.started.load(Ordering::Acquire) {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        // On the blocking pool: the cursor's lock may be held by a join's store read, and the
        // hub may be dropped there.
        blocking(move || {
            let last = inner.tracker.store().last_seq()?;
            if inner
                .started
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // A client may have joined first and moved both further.
                let mut cursor = inner.cursor();
                cursor.last = cursor.last.max(last);
                inner.published.fetch_max(cursor.last, Ordering::AcqRel);
                drop(cursor);
                tokio::spawn(poll(Arc::downgrade(&inner)));
            }
            Ok(())
        })
        .await
    }

    /// Highest seq published so far.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Acquire)
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.inner.clients.load(Ordering::Relaxed)
    }

    /// Events published since the server started (read while clients were connected).
    pub fn events_published(&self) -> u64 {
        self.inner.events.load(Ordering::Relaxed)
    }

    /// True while the poller reads nothing, no client being connected:
    /// [`published`](Self::published) may then lag the store.
    pub fn idle(&self) -> bool {
        self.inner.idle.load(Ordering::SeqCst)
    }

    /// A subscription to `upgrade_id`'s events (or all), from `since` when given (replayed from
    /// the store), else from now.
    pub async fn subscribe(
        &self,
        upgrade_id: Option<String>,
        since: Option<u64>,
    ) -> ApiResult<Subscription> {
        self.start().await?;
        // Subscribe before reading `published`: whatever is published later is in the ring.
        let rx = self.inner.tx.subscribe();
        // Counted from here: the guard takes the count back however this ends.
        let joined = Joined::new(&self.inner.clients, &self.inner.wake);
        if self.inner.idle.load(Ordering::SeqCst) {
            let inner = Arc::clone(&self.inner);
            blocking(move || inner.wake_up()).await?;
        }
        let published = {
            let _publishing = self.inner.publishing();
            self.published()
        };
        // A `since` beyond the store's last seq (a restored data dir, another server's seq)
        // would wait for events that never come: answer with a resync to the store's position.
        let ahead = match since {
            Some(s) if s > published => {
                let tracker = Arc::clone(&self.inner.tracker);
                let last = blocking(move || tracker.store().last_seq()).await?;
                (s > last).then_some(last)
            }
            _ => None,
        };
        let (position, replay) = match (since, ahead) {
            (_, Some(last)) => (last, true),
            (Some(s), None) if s < published => (s, true),
            (Some(s), None) => (s, false),
            (None, _) => (published, false),
        };
        Ok(Subscription {
            hub: self.clone(),
            rx,
            upgrade_id,
            position,
            replaying: replay,
            ahead: ahead.is_some(),
            queue: VecDeque::new(),
            _joined: joined,
        })
    }
}

impl Inner {
    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held for microseconds, never across a read or an await.
    fn publishing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.publishing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes an idle hub busy for a client already counted (see [`Cursor`]): tells the
    /// [`Following`] hook, then moves the poller to the store's last seq, and wakes it. On a
    /// failed read the hub stays idle (and the hook is told `false` again if it took `true`),
    /// and joins in the next [`JOIN_RETRY`] fail at once. Blocks: call on the blocking pool.
    fn wake_up(&self) -> eks_upgrade_agent::Result<()> {
        let mut cursor = self.cursor();
        if !self.idle.load(Ordering::SeqCst) {
            return Ok(()); // another client did it, or the poller saw this one
        }
        if let Some((at, why)) = &cursor.failed
            && at.elapsed() < JOIN_RETRY
        {
            return Err(eks_upgrade_agent::Error::Backend {
                message: why.clone(),
                source: None,
            });
        }
        self.mark(&mut cursor, true);
        let last = match self.tracker.store().last_seq() {
            Ok(last) => last,
            Err(e) => {
                if cursor.marked.is_some_and(|(_, took)| took) {
                    self.mark(&mut cursor, false);
                }
                cursor.failed = Some((std::time::Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        cursor.failed = None;
        cursor.last = cursor.last.max(last);
        self.published.fetch_max(cursor.last, Ordering::AcqRel);
        self.idle.store(false, Ordering::SeqCst);
        self.wake.notify_one();
        Ok(())
    }

    /// Tells the [`Following`] hook, if any, `on` (a failure is logged: until the next try
    /// streams wait for their poll, not for a notification).
    fn mark(&self, cursor: &mut Cursor, on: bool) {
        let Some(f) = self.following.get() else {
            return;
        };
        let took = match (f.mark)(on) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, following = on,
                    "cannot tell the store whether this server's streams have clients");
                false
            }
        };
        cursor.marked = on.then(|| (std::time::Instant::now(), took));
    }

    /// How long the poller waits for a wake-up.
    fn wait(&self) -> Duration {
        match self.follow.get() {
            Some(f) if (f.up)() => f.quiet,
            _ => POLL,
        }
    }
}

/// The poller. It holds the hub only on the blocking pool, while it reads and publishes a
/// page: the last reference to a store may be dropped there, never on a runtime thread (a
/// PostgreSQL client blocks when it closes).
async fn poll(inner: Weak<Inner>) {
    let Some((wake, clients, idle)) = inner.upgrade().map(|hub| {
        (
            Arc::clone(&hub.wake),
            Arc::clone(&hub.clients),
            Arc::clone(&hub.idle),
        )
    }) else {
        return;
    };
    loop {
        // Idle with no client: no read, not even a hop to the blocking pool.
        if idle.load(Ordering::SeqCst) && clients.load(Ordering::SeqCst) == 0 {
            let _ = tokio::time::timeout(IDLE_WAIT, wake.notified()).await;
            continue;
        }
        let weak = Weak::clone(&inner);
        let read = tokio::task::spawn_blocking(move || {
            let hub = weak.upgrade()?;
            let wait = hub.wait();
            let mut cursor = hub.cursor();
            if hub.idle.load(Ordering::SeqCst) {
                // A client is making it busy (`wake_up`, which wakes this loop again).
                return Some((false, wait));
            }
            if hub.clients.load(Ordering::SeqCst) == 0 {
                // The last client left: idle from here on, unless one came meanwhile (it
                // counted itself before looking at `idle`: see `Cursor`).
                hub.idle.store(true, Ordering::SeqCst);
                if hub.clients.load(Ordering::SeqCst) > 0 {
                    hub.idle.store(false, Ordering::SeqCst);
                } else {
                    if cursor.marked.is_some_and(|(_, took)| took) {
                        hub.mark(&mut cursor, false);
                    }
                    cursor.marked = None;
                    return Some((false, wait));
                }
            }
            if let Some(f) = hub.following.get()
                && cursor.marked.is_none_or(|(at, _)| at.elapsed() >= f.renew)
            {
                hub.mark(&mut cursor, true);
            }
            let full = match hub.tracker.events_since(None, cursor.last, PAGE) {
                Ok(page) => {
                    let full = page.len() == PAGE;
                    let events: Vec<Arc<HubEvent>> =
                        page.iter().map(|e| Arc::new(HubEvent::new(e))).collect();
                    let _publishing = hub.publishing();
                    for e in events {
                        cursor.last = e.seq;
                        let seq = e.seq;
                        // No receivers is fine: nobody is watching.
                        let _ = hub.tx.send(e);
                        hub.published.store(seq, Ordering::Release);
                    }
                    hub.events.fetch_add(page.len() as u64, Ordering::Relaxed);
                    full
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event poller: store read failed");
                    false
                }
            };
            Some((full, wait))
        })
        .await;
        let Ok(Some((full, wait))) = read else {
            return;
        };
        if full {
            continue;
        }
        let _ = tokio::time::timeout(wait, wake.notified()).await;
    }
}

/// What a subscription yields.
#[derive(Debug)]
pub enum Item {
    /// The next event for this client.
    Event(Arc<HubEvent>),
    /// The client fell out of the ring: the next events come from the store
    /// ([`Subscription::replaying`] is true; call [`Subscription::replay_page`]).
    CatchUp,
    /// The client fell further behind than the ring; events up to `seq` were skipped. The
    /// client should take a fresh summary and may fetch the skipped events with
    /// `GET .../events?since=`.
    Resync {
        /// Events continue after this seq.
        seq: u64,
    },
}

/// One client's view of the hub.
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    rx: broadcast::Receiver<Arc<HubEvent>>,
    upgrade_id: Option<String>,
    /// Every event with seq <= position has been delivered or filtered out.
    position: u64,
    replaying: bool,
    /// `since` was beyond the store's last seq: the first item is a resync to `position`.
    ahead: bool,
    queue: VecDeque<Arc<HubEvent>>,
    /// Counts this client while it lives.
    _joined: Joined,
}

impl Subscription {
    /// Every event with `seq <= position()` was delivered to this client (or is not its
    /// upgrade's): what an idle heartbeat reports and what a reconnect passes as `since`.
    pub fn position(&self) -> u64 {
        self.position
    }

    fn wanted(&self, e: &HubEvent) -> bool {
        self.upgrade_id.as_ref().is_none_or(|u| *u == e.upgrade_id)
    }

    /// True while older events are still being read from the store.
    pub fn replaying(&self) -> bool {
        self.replaying || !self.queue.is_empty()
    }

    /// Reads the next page of the replay (not cancel-safe: call it outside `select!`). Returns
    /// a [`Item::Resync`] instead when the client is more than the lag limit behind.
    pub async fn replay_page(&mut self) -> ApiResult<Option<Item>> {
        if !self.replaying {
            return Ok(None);
        }
        if self.ahead {
            self.ahead = false;
            self.replaying = false;
            return Ok(Some(Item::Resync { seq: self.position }));
        }
        let published = self.hub.published();
        if published.saturating_sub(self.position) > self.hub.inner.max_lag {
            self.replaying = false;
            self.queue.clear();
            self.rx = self.rx.resubscribe();
            self.position = published;
            return Ok(Some(Item::Resync { seq: published }));
        }
        let tracker = Arc::clone(&self.hub.inner.tracker);
        let (u, since) = (self.upgrade_id.clone(), self.position);
        let page = blocking(move || tracker.events_since(u.as_deref(), since, PAGE)).await?;
        if page.len() < PAGE {
            self.replaying = false;
        }
        for e in &page {
            self.queue.push_back(Arc::new(HubEvent::new(e)));
        }
        Ok(None)
    }

    /// Next queued replay event, if any.
    pub fn next_replayed(&mut self) -> Option<Arc<HubEvent>> {
        let e = self.queue.pop_front()?;
        self.position = self.position.max(e.seq);
        Some(e)
    }

    /// The next live item (cancel-safe). Call after the replay is done.
    pub async fn next_live(&mut self) -> Option<Item> {
        loop {
            match self.rx.recv().await {
                Ok(e) => {
                    if let Some(item) = self.accept(e) {
                        return Some(item);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return Some(self.lagged()),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next live item if one is ready now.
    pub fn try_next_live(&mut self) -> Option<Item> {
        loop {
            match self.rx.try_recv() {
                Ok(e) => {
                    if let Some(item) = self.accept(e) {
                        return Some(item);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => return Some(self.lagged()),
                Err(_) => return None,
            }
        }
    }

    fn accept(&mut self, e: Arc<HubEvent>) -> Option<Item> {
        if e.seq <= self.position {
            return None; // already replayed from the store
        }
        self.position = e.seq;
        self.wanted(&e).then_some(Item::Event(e))
    }

    fn lagged(&mut self) -> Item {
        // Continue with new events only; older ones come from the store or are skipped.
        self.rx = self.rx.resubscribe();
        let published = self.hub.published();
        if published.saturating_sub(self.position) <= self.hub.inner.max_lag {
            self.replaying = true;
            return Item::CatchUp;
        }
        self.position = self.position.max(published);
        Item::Resync { seq: self.position }
    }

    /// The latest seq this client is up to date with when nothing is pending (heartbeats).
    pub fn idle_position(&mut self) -> u64 {
        // Read `published` first: the poller sends to the ring before it raises `published`,
        // so an empty ring afterwards means every event up to it was received.
        let published = self.hub.published();
        if self.rx.is_empty() && !self.replaying() {
            self.position = self.position.max(published);
        }
        self.position
    }
}
