//! Keys in commit order where a client pages by key. A `BIGSERIAL` key is taken when a row is
//! inserted, not when it commits: a transaction holding a smaller key can commit after a page
//! past it was served, and a client continuing from that page's last key never sees its row.
//!
//! - Upgrades (`upgrades_page`, `GET /api/v1/upgrades?cursor=`, oldest first): creating one
//!   (a command or an import) first takes [`lock_upgrade_keys`], held to the commit, so upgrade
//!   keys commit in order. Creating upgrades is rare; the lock serializes only creations.
//! - Tasks (`tasks_page`): every task write locks its upgrade's row to the commit (`Batch`), so
//!   an upgrade's task keys already commit in order.
//! - Events and notifications follow `seq`/`nid`, taken from the one-row counter at the commit.
//! - Artifact searches (`?cursor=`, newest first) and session passes (`for_each_artifact`:
//!   upload, export) are listings as of each page: an artifact committing meanwhile in another
//!   collection with a key inside the pages already read is not in them (adds to one collection
//!   lock its row, so within a collection keys commit in order). Search again to see it.
//! - Test runs have no cursor (the newest `limit` runs).

use super::connect::Tx;
use crate::error::Result;

/// The advisory lock (`pg_advisory_xact_lock`) that creating an upgrade holds to its commit:
/// "eua-upgr".
const UPGRADE_KEYS: i64 = 0x6575_612d_7570_6772;

/// Makes this transaction's new upgrade keys commit in key order: waits for any other
/// transaction creating an upgrade to end, and holds the lock until this one ends.
pub(super) fn lock_upgrade_keys(tx: &mut Tx<'_, '_>) -> Result<()> {
    tx.query("SELECT pg_advisory_xact_lock($1)", &[&UPGRADE_KEYS])?;
    Ok(())
}
