//! Retry due-times on the database's clock (`deliveries.next_at`, `artifacts.upload_next_at`).
//!
//! A retry time reaches the store as a time on the caller's clock (the dispatcher's or the
//! uploader's "try again at T"), and a claim asks what is due at a time on the claimer's clock.
//! Replicas' clocks differ; the database's is one. So the store keeps the offset of the
//! database's clock from this replica's ([`ClockOffset`]) and moves every retry time onto the
//! database's clock when it writes one, and every "due at" when it compares: a retry set by a
//! replica whose clock runs an hour ahead is due, for every replica, when its delay has passed
//! on the database's clock, neither an hour late nor an hour early.
//!
//! One offset for both ends, not a fresh `clock_timestamp()` per statement: a retry set for T
//! and a claim asked at T (the same replica, the same T) must agree that it is due, which two
//! separate readings of two clocks, each taken a little apart, cannot promise. The offset is
//! measured again every [`REMEASURE`] and replaced only when it moved by more than
//! [`TOLERANCE`] (a clock stepped), so it stays one value between steps. Leases are not judged
//! this way: they compare with the database's clock itself (`lease.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lease::DB_NOW;
use super::progress::{PostgresStore, micros};
use crate::error::Result;

/// How often the offset is measured again.
pub(super) const REMEASURE: Duration = Duration::from_secs(10);
/// How far a new measurement must be from the kept offset to replace it (µs): more than the
/// error of a measurement (half a round trip), far less than a retry delay matters.
pub(super) const TOLERANCE: i64 = 100_000;

/// The offset of the database's clock from this replica's (µs, database minus replica), and
/// when it was last measured.
#[derive(Debug, Default)]
pub(crate) struct ClockOffset(Mutex<Option<(Instant, i64)>>);

impl PostgresStore {
    /// The database's clock minus this replica's (µs), measured at most every [`REMEASURE`].
    pub(super) fn db_clock_offset(&self) -> Result<i64> {
        let cell = &self.clock_offset().0;
        if let Some((at, us)) = *cell.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < REMEASURE
        {
            return Ok(us);
        }
        let measured = self.read(|db| {
            let before = micros(self.clock());
            let db_now: i64 = db.one(&format!("SELECT {DB_NOW}"), &[])?.get(0);
            let after = micros(self.clock());
            Ok(db_now - before / 2 - after / 2)
        })?;
        let mut kept = cell.lock().unwrap_or_else(|e| e.into_inner());
        let us = match *kept {
            Some((_, old)) if (measured - old).abs() <= TOLERANCE => old,
            _ => measured,
        };
        *kept = Some((Instant::now(), us));
        Ok(us)
    }
}
