//! Work leases shared by the queues replicas claim from (outbox deliveries, uploads): the SQL
//! conditions of a row's claim, kept in one place so both queues judge a lease alike.
//!
//! A claim is an owner (a store instance, or an upload run) and the end of its lease. A row is
//! free for a claimer when nobody holds it, the claimer already does, or the lease has run
//! out (its owner died or stalled); an outcome is recorded only while the row is still the
//! recorder's (or nobody's), so a claimer that lost its lease to another changes nothing.

/// SQL: the row whose claim is in columns `owner` and `until` is free for the claimer `me` at
/// `now` (both SQL expressions, e.g. parameters).
pub(super) fn free(owner: &str, until: &str, me: &str, now: &str) -> String {
    format!("({owner} IS NULL OR {owner} = {me} OR {until} <= {now})")
}

/// SQL: the row whose claim is in column `owner` may take the outcome of `me`.
pub(super) fn ours(owner: &str, me: &str) -> String {
    format!("({owner} = {me} OR {owner} IS NULL)")
}
