//! The SQLite schema and its versioned migrations: each version's DDL, applied in order inside
//! one `BEGIN IMMEDIATE` at open; a store written by a newer build is refused.

use rusqlite::Connection;

use crate::error::{Error, Result};

/// The schema version this build writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 11;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS upgrades (
    ukey          INTEGER PRIMARY KEY,
    upgrade_id    TEXT NOT NULL UNIQUE,
    plan_id       TEXT NOT NULL,
    cluster_name  TEXT NOT NULL,
    status        INTEGER NOT NULL,
    current_phase TEXT,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    completed_at  INTEGER,
    error_message TEXT,
    metadata      TEXT,
    top_weight    REAL NOT NULL DEFAULT 0,
    top_sum       REAL NOT NULL DEFAULT 0,
    c0 INTEGER NOT NULL DEFAULT 0, c1 INTEGER NOT NULL DEFAULT 0, c2 INTEGER NOT NULL DEFAULT 0,
    c3 INTEGER NOT NULL DEFAULT 0, c4 INTEGER NOT NULL DEFAULT 0, c5 INTEGER NOT NULL DEFAULT 0,
    last_seq      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    tkey            INTEGER PRIMARY KEY,
    ukey            INTEGER NOT NULL,
    task_id         TEXT NOT NULL,
    name            TEXT NOT NULL,
    task_type       INTEGER NOT NULL,
    parent_tkey     INTEGER,
    parent_task_id  TEXT,
    depth           INTEGER NOT NULL,
    status          INTEGER NOT NULL,
    percentage      REAL NOT NULL,
    current_step    TEXT,
    total_steps     INTEGER,
    completed_steps INTEGER NOT NULL,
    weight          REAL NOT NULL,
    children        INTEGER NOT NULL DEFAULT 0,
    child_weight    REAL NOT NULL DEFAULT 0,
    child_sum       REAL NOT NULL DEFAULT 0,
    error_message   TEXT,
    retry_count     INTEGER NOT NULL DEFAULT 0,
    last_message    TEXT,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    completed_at    INTEGER,
    duration        REAL,
    metadata        TEXT,
    last_event_seq  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (ukey, task_id)
);
CREATE TABLE IF NOT EXISTS events (
    seq           INTEGER PRIMARY KEY,
    event_id      BLOB NOT NULL,
    ukey          INTEGER NOT NULL,
    tkey          INTEGER,
    prev_task_seq INTEGER,
    kind          INTEGER NOT NULL,
    status        INTEGER NOT NULL,
    ts            INTEGER NOT NULL,
    message       TEXT,
    details       TEXT,
    percentage    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_upgrade ON events (ukey, seq);
"#;

/// Schema 5: per parent, the number of children in each status (`k0`..`k5`, indexed like
/// `ProgressStatus::ALL`), so a parent's derived status costs O(1) per level; and an index of
/// children by parent for the operations that walk a subtree (fail, cancel, pause, resume or
/// retry a parent) or name unfinished children. Existing rows get their counts; their stored
/// statuses are left as they were.
const HIERARCHY_SCHEMA: &str = r#"
ALTER TABLE tasks ADD COLUMN k0 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN k1 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN k2 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN k3 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN k4 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN k5 INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS tasks_by_parent ON tasks (parent_tkey) WHERE parent_tkey IS NOT NULL;
UPDATE tasks SET
    k0 = (SELECT count(*) FROM tasks c WHERE c.parent_tkey = tasks.tkey AND c.status = 0),
    k1 = (SELECT count(*) FROM tasks c WHERE c.parent_tkey = tasks.tkey AND c.status = 1),
    k2 = (SELECT count(*) FROM tasks c WHERE c.parent_tkey = tasks.tkey AND c.status = 2),
    k3 = (SELECT count(*) FROM tasks c WHERE c.parent_tkey = tasks.tkey AND c.status = 3),
    k4 = (SELECT count(*) FROM tasks c WHERE c.parent_tkey = tasks.tkey AND c.status = 4),
    k5 = (SELECT count(*) FROM tasks c WHERE c.parent_tkey = tasks.tkey AND c.status = 5)
WHERE children > 0;
"#;

/// Schema 7: children indexed by parent and status, so the failed child that a parent names as
/// its cause is one index seek, not a walk over its siblings (a parent turns failed when its last
/// running child stops while another is failed). Tasks by status, so the summary's running and
/// failed tasks (reference `active_task_names`, `failed_task_names`, `current_task`) are an
/// index walk (only status changes touch it; percentage updates do not). Artifacts indexed by
/// collection and by upgrade alone, so a search on either walks its index newest first instead
/// of sorting every match (the older indexes on `(ckey, name)` and `(upgrade_id, task_id)` end
/// in another column).
const SCHEMA_7: &str = r#"
DROP INDEX IF EXISTS tasks_by_parent;
CREATE INDEX IF NOT EXISTS tasks_by_parent_status ON tasks (parent_tkey, status)
    WHERE parent_tkey IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (ukey, status, tkey);
CREATE INDEX IF NOT EXISTS artifacts_by_collection ON artifacts (ckey);
CREATE INDEX IF NOT EXISTS artifacts_by_upgrade_newest ON artifacts (upgrade_id);
"#;

/// Schema 8: session, collection and artifact ids indexed by their last six characters, so an
/// id abbreviated to a suffix (UUIDv7 ids made in the same minute share their leading time
/// bits: the tail is what people copy) is one index seek; prefixes use the ids' unique indexes.
const SCHEMA_8: &str = r#"
CREATE INDEX IF NOT EXISTS sessions_by_id_tail ON sessions (substr(session_id, -6));
CREATE INDEX IF NOT EXISTS collections_by_id_tail ON collections (substr(collection_id, -6));
CREATE INDEX IF NOT EXISTS artifacts_by_id_tail ON artifacts (substr(artifact_id, -6));
"#;

pub(super) fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(newer_schema(version));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    // Re-read the version under the write lock: another process may be migrating too.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let run = || -> Result<()> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(newer_schema(version));
        }
        if version < 1 {
            conn.execute_batch(SCHEMA)?;
        }
        if version < 2 {
            conn.execute_batch(super::artifacts::SCHEMA)?;
        }
        if version < 3 {
            conn.execute_batch(super::outbox::SCHEMA)?;
        }
        if version < 4 {
            conn.execute_batch(super::artifacts::UPLOAD_SCHEMA)?;
        }
        if version < 5 {
            conn.execute_batch(HIERARCHY_SCHEMA)?;
        }
        if version < 6 {
            conn.execute_batch(super::artifacts::UPLOAD_CLAIM_SCHEMA)?;
        }
        if version < 7 {
            conn.execute_batch(SCHEMA_7)?;
        }
        if version < 8 {
            conn.execute_batch(SCHEMA_8)?;
        }
        if version < 9 {
            // Schema 9: test runs, results, the test identity dictionary and flaky statistics.
            conn.execute_batch(super::test_results::SCHEMA)?;
        }
        if version < 10 {
            conn.execute_batch(super::history::SCHEMA)?;
            super::history::seed(conn)?;
        }
        if version < 11 {
            // Schema 11: a run's suite times (issue #14, N27). The version also makes builds
            // of schema 10 and older, which would hand the `trace.test_run` outbox entries
            // runs write to EventBridge and webhooks, refuse a store this build wrote (N28).
            super::test_results::schema_11(conn)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    };
    match run() {
        Ok(()) => Ok(conn.execute_batch("COMMIT")?),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn newer_schema(version: i64) -> Error {
    Error::Backend {
        message: format!(
            "the store was written by a newer version (schema {version}, this build knows {SCHEMA_VERSION})"
        ),
        source: None,
    }
}
