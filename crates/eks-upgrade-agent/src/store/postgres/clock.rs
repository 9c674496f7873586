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
//! measured again every [`REMEASURE`], and at once when this replica's clock stepped (its
//! wall clock moved more than [`TOLERANCE`] away from the monotonic clock since the last
//! measurement); it is replaced only when it moved by more than [`TOLERANCE`], so it stays one
//! value between steps. A step of the database's clock is seen within [`REMEASURE`]. Leases
//! are not judged this way: they compare with the database's clock itself (`lease.rs`).

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

/// A measurement of the offset: when (monotonic, and this replica's wall clock, µs) and the
/// offset (µs, database minus replica).
#[derive(Debug, Clone, Copy)]
struct Measured {
    at: Instant,
    wall: i64,
    offset: i64,
}

/// The offset of the database's clock from this replica's, as last measured.
#[derive(Debug, Default)]
pub(crate) struct ClockOffset(Mutex<Option<Measured>>);

impl PostgresStore {
    /// The database's clock minus this replica's (µs), measured at most every [`REMEASURE`]
    /// unless this replica's clock stepped.
    pub(super) fn db_clock_offset(&self) -> Result<i64> {
        let cell = &self.clock_offset().0;
        let last = *cell.lock().unwrap_or_else(|e| e.into_inner());
        let mut stepped = false;
        if let Some(m) = last {
            let monotonic = i64::try_from(m.at.elapsed().as_micros()).unwrap_or(i64::MAX);
            let wall = micros(self.clock()).saturating_sub(m.wall);
            stepped = (wall - monotonic).abs() > TOLERANCE;
            if !stepped && m.at.elapsed() < REMEASURE {
                return Ok(m.offset);
            }
        }
        let sql = format!("SELECT {DB_NOW}");
        let (wall, measured) = self.read(|db| {
            // Prepared first, so the clock is read in the one round trip timed below.
            db.one(&sql, &[])?;
            let before = micros(self.clock());
            let db_now: i64 = db.one(&sql, &[])?.get(0);
            let after = micros(self.clock());
            Ok(((Instant::now(), after), db_now - before / 2 - after / 2))
        })?;
        let mut kept = cell.lock().unwrap_or_else(|e| e.into_inner());
        let offset = match *kept {
            Some(m) if !stepped && (measured - m.offset).abs() <= TOLERANCE => m.offset,
            _ => measured,
        };
        let (at, wall) = wall;
        *kept = Some(Measured { at, wall, offset });
        Ok(offset)
    }
}
