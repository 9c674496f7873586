//! Work leases shared by the queues replicas claim from (outbox deliveries, uploads): the SQL
//! conditions of a row's claim, kept in one place so both queues judge a lease alike.
//!
//! A claim is an owner (a store instance, or an upload run) and the end of its lease. A row is
//! free for a claimer when nobody holds it, the claimer already does, or the lease has run
//! out (its owner died or stalled); an outcome is recorded only while the row is still the
//! recorder's, so a claimer that lost its lease to another changes nothing.
//!
//! Leases are judged on the database's clock ([`DB_NOW`]), never a replica's: a claim ends
//! lease-length after the database's clock when it was made (or renewed), and a row is free
//! once the database's clock passes that end. A replica whose clock runs ahead therefore
//! cannot take a live lease, nor one whose clock runs behind keep a dead one; only the lease's
//! length comes from the replica (a duration, which no skew changes).

use chrono::{DateTime, Utc};

/// SQL: the database's clock now, in microseconds since the epoch (the unit of the lease
/// columns). `clock_timestamp()`, not the transaction's start: a claim that waited for a lock
/// judges by the time it runs.
pub(super) const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

/// The length of a lease from `from` to `until` (a replica's clock at both ends), in
/// microseconds, within 0 and a century (so `DB_NOW + span` cannot overflow).
pub(super) fn span(from: DateTime<Utc>, until: DateTime<Utc>) -> i64 {
    const CENTURY_US: i64 = 100 * 366 * 24 * 3600 * 1_000_000;
    (until - from)
        .num_microseconds()
        .unwrap_or(CENTURY_US)
        .clamp(0, CENTURY_US)
}

/// SQL: the row whose claim is in columns `owner` and `until` is free for the claimer `me` (an
/// SQL expression, e.g. a parameter) now, by the database's clock.
pub(super) fn free(owner: &str, until: &str, me: &str) -> String {
    format!("({owner} IS NULL OR {owner} = {me} OR {until} <= {DB_NOW})")
}

/// SQL: the row whose claim is in column `owner` may take the outcome of `me`: only while `me`
/// holds it. An unclaimed row is not `me`'s: another may have taken it over and settled or
/// rescheduled it meanwhile (which clears the claim), and a late outcome must not undo that.
pub(super) fn ours(owner: &str, me: &str) -> String {
    format!("({owner} = {me})")
}
