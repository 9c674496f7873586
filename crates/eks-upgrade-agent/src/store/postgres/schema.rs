//! The PostgreSQL schema and its versioned migrations: each version's DDL, applied in order in
//! one transaction at open, under an advisory lock so replicas starting together migrate once;
//! a database written by a newer build is refused.

use postgres::Client;

use crate::error::{Error, Result};

/// The schema version this build writes (`schema_version.version`).
pub(crate) const SCHEMA_VERSION: i64 = 12;

/// Key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x6575_615f_6d69_6772;

const SCHEMA_1: &str = r#"
CREATE TABLE seq_counter (
    id  BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    seq BIGINT NOT NULL
);
INSERT INTO seq_counter (id, seq) VALUES (true, 0);
CREATE TABLE upgrades (
    ukey          BIGSERIAL PRIMARY KEY,
    upgrade_id    TEXT NOT NULL UNIQUE,
    plan_id       TEXT NOT NULL,
    cluster_name  TEXT NOT NULL,
    status        BIGINT NOT NULL,
    current_phase TEXT,
    created_at    BIGINT NOT NULL,
    started_at    BIGINT,
    completed_at  BIGINT,
    error_message TEXT,
    metadata      TEXT,
    top_weight    DOUBLE PRECISION NOT NULL DEFAULT 0,
    top_sum       DOUBLE PRECISION NOT NULL DEFAULT 0,
    c0 BIGINT NOT NULL DEFAULT 0, c1 BIGINT NOT NULL DEFAULT 0, c2 BIGINT NOT NULL DEFAULT 0,
    c3 BIGINT NOT NULL DEFAULT 0, c4 BIGINT NOT NULL DEFAULT 0, c5 BIGINT NOT NULL DEFAULT 0,
    last_seq      BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    tkey            BIGSERIAL PRIMARY KEY,
    ukey            BIGINT NOT NULL REFERENCES upgrades (ukey),
    task_id         TEXT NOT NULL,
    name            TEXT NOT NULL,
    task_type       BIGINT NOT NULL,
    parent_tkey     BIGINT,
    parent_task_id  TEXT,
    depth           BIGINT NOT NULL,
    status          BIGINT NOT NULL,
    percentage      DOUBLE PRECISION NOT NULL,
    current_step    TEXT,
    total_steps     BIGINT,
    completed_steps BIGINT NOT NULL,
    weight          DOUBLE PRECISION NOT NULL,
    children        BIGINT NOT NULL DEFAULT 0,
    child_weight    DOUBLE PRECISION NOT NULL DEFAULT 0,
    child_sum       DOUBLE PRECISION NOT NULL DEFAULT 0,
    error_message   TEXT,
    retry_count     BIGINT NOT NULL DEFAULT 0,
    last_message    TEXT,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    completed_at    BIGINT,
    duration        DOUBLE PRECISION,
    metadata        TEXT,
    k0 BIGINT NOT NULL DEFAULT 0, k1 BIGINT NOT NULL DEFAULT 0, k2 BIGINT NOT NULL DEFAULT 0,
    k3 BIGINT NOT NULL DEFAULT 0, k4 BIGINT NOT NULL DEFAULT 0, k5 BIGINT NOT NULL DEFAULT 0,
    UNIQUE (ukey, task_id)
);
CREATE INDEX tasks_by_parent_status ON tasks (parent_tkey, status) WHERE parent_tkey IS NOT NULL;
CREATE INDEX tasks_by_status ON tasks (ukey, status, tkey);
CREATE TABLE events (
    seq        BIGINT PRIMARY KEY,
    event_id   UUID NOT NULL,
    ukey       BIGINT NOT NULL,
    tkey       BIGINT,
    kind       BIGINT NOT NULL,
    status     BIGINT NOT NULL,
    ts         BIGINT NOT NULL,
    message    TEXT,
    details    TEXT,
    percentage DOUBLE PRECISION NOT NULL
);
CREATE INDEX events_by_upgrade ON events (ukey, seq);
CREATE INDEX events_by_task ON events (tkey, seq) WHERE tkey IS NOT NULL;
CREATE TABLE notifications (
    nid         BIGSERIAL PRIMARY KEY,
    event_id    TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    upgrade_id  TEXT NOT NULL,
    detail_type TEXT NOT NULL,
    time        BIGINT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE TABLE sink_cursors (
    sink TEXT PRIMARY KEY,
    upto BIGINT NOT NULL
);
CREATE TABLE deliveries (
    sink        TEXT NOT NULL,
    nid         BIGINT NOT NULL,
    status      BIGINT NOT NULL,
    attempts    BIGINT NOT NULL,
    next_at     BIGINT NOT NULL,
    last_error  TEXT,
    updated_at  BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (sink, nid)
);
CREATE INDEX deliveries_by_status ON deliveries (sink, status, nid);
"#;

/// Schema 3: the artifact index and its upload queue (`artifacts.rs`, `uploads.rs`), the
/// SQLite backend's tables with PostgreSQL's indexes: ids compare bytewise (`COLLATE "C"`), so
/// a prefix is a range of the unique index, and a suffix a seek on `right(id, 6)`; names are
/// found by trigrams (`pg_trgm`, a trusted extension) on `lower(name)`; the queue's due rows
/// by a partial index.
const SCHEMA_3: &str = r#"
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE TABLE sessions (
    skey           BIGSERIAL PRIMARY KEY,
    session_id     TEXT COLLATE "C" NOT NULL UNIQUE,
    upgrade_id     TEXT NOT NULL,
    cluster_name   TEXT NOT NULL,
    name           TEXT NOT NULL,
    description    TEXT,
    started_at     BIGINT NOT NULL,
    completed_at   BIGINT,
    retention_days BIGINT NOT NULL
);
CREATE INDEX sessions_by_upgrade ON sessions (upgrade_id, skey);
CREATE INDEX sessions_by_completion ON sessions (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX sessions_by_id_tail ON sessions (right(session_id, 6));
CREATE TABLE collections (
    ckey          BIGSERIAL PRIMARY KEY,
    collection_id TEXT COLLATE "C" NOT NULL UNIQUE,
    skey          BIGINT NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    description   TEXT,
    task_id       TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (skey, name)
);
CREATE INDEX collections_by_id_tail ON collections (right(collection_id, 6));
CREATE TABLE artifacts (
    akey               BIGSERIAL PRIMARY KEY,
    artifact_id        TEXT COLLATE "C" NOT NULL UNIQUE,
    skey               BIGINT NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
    ckey               BIGINT NOT NULL REFERENCES collections (ckey) ON DELETE CASCADE,
    name               TEXT NOT NULL,
    export_name        TEXT NOT NULL,
    description        TEXT,
    artifact_type      BIGINT NOT NULL,
    file_size          BIGINT NOT NULL,
    file_hash          TEXT NOT NULL,
    status             BIGINT NOT NULL,
    s3_bucket          TEXT,
    s3_key             TEXT,
    s3_url             TEXT,
    created_at         BIGINT NOT NULL,
    uploaded_at        BIGINT,
    task_id            TEXT,
    step_id            TEXT,
    upgrade_id         TEXT NOT NULL,
    tags               TEXT,
    metadata           TEXT,
    upload_state       BIGINT NOT NULL DEFAULT 0,
    upload_attempts    BIGINT NOT NULL DEFAULT 0,
    upload_next_at     BIGINT NOT NULL DEFAULT 0,
    upload_error       TEXT,
    upload_claimed_by  TEXT,
    upload_lease_until BIGINT NOT NULL DEFAULT 0,
    UNIQUE (ckey, export_name)
);
CREATE INDEX artifacts_by_name ON artifacts (ckey, name);
CREATE INDEX artifacts_by_session ON artifacts (skey, akey);
CREATE INDEX artifacts_by_upgrade ON artifacts (upgrade_id, task_id);
CREATE INDEX artifacts_by_type ON artifacts (artifact_type, akey);
CREATE INDEX artifacts_by_task ON artifacts (task_id, akey);
CREATE INDEX artifacts_by_status ON artifacts (status, akey);
CREATE INDEX artifacts_by_created ON artifacts (created_at);
CREATE INDEX artifacts_by_hash ON artifacts (file_hash);
CREATE INDEX artifacts_by_size ON artifacts (file_size);
CREATE INDEX artifacts_by_id_tail ON artifacts (right(artifact_id, 6));
CREATE INDEX artifacts_name_trigrams ON artifacts USING gin (lower(name) gin_trgm_ops);
CREATE INDEX artifacts_upload_queue ON artifacts (upload_next_at, akey)
    WHERE upload_state IN (1, 3);
CREATE TABLE artifact_tags (
    tag  TEXT NOT NULL,
    akey BIGINT NOT NULL REFERENCES artifacts (akey) ON DELETE CASCADE,
    PRIMARY KEY (tag, akey)
);
CREATE INDEX artifact_tags_by_artifact ON artifact_tags (akey);
"#;

/// Locks the upgrades named `ids` (in key order), then reads the tasks named by the pairs
/// (`task_upgrades[i]`, `task_ids[i]`): one round trip for a writing transaction's first step.
/// The task read is a statement of its own inside the function, so at READ COMMITTED it takes
/// its snapshot once the locks are held and sees what a transaction that held one committed
/// (a single `SELECT` that waited for a lock would read the tasks as they were before: G91).
/// It must stay VOLATILE (a STABLE function's statements share the caller's snapshot).
/// Rows: the upgrades locked (`lk_cluster` set, `lk_task` null), then the tasks of those
/// (`lk_cluster` null).
const SCHEMA_11: &str = r#"
CREATE OR REPLACE FUNCTION eua_lock_and_read(ids TEXT[], task_upgrades TEXT[], task_ids TEXT[])
RETURNS TABLE (lk_ukey BIGINT, lk_upgrade TEXT, lk_cluster TEXT, lk_task tasks)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    locked BIGINT[];
    keys BIGINT[];
BEGIN
    SELECT array_agg(l.ukey) INTO locked FROM (SELECT u.ukey FROM upgrades u
        WHERE u.upgrade_id = ANY (ids) ORDER BY u.ukey FOR UPDATE) AS l;
    RETURN QUERY SELECT u.ukey, u.upgrade_id, u.cluster_name, NULL::tasks FROM upgrades u
        WHERE u.ukey = ANY (locked);
    -- Only the tasks of upgrades locked above (an upgrade created while the lock statement
    -- waited is visible from here on, but not locked: its tasks are read after its lock),
    -- by (upgrade key, task id), so the read is an index lookup per task whatever the plan
    -- (joined on the upgrade id, the plan may use only the task id).
    keys := ARRAY(SELECT (SELECT u.ukey FROM upgrades u
            WHERE u.upgrade_id = x.u AND u.ukey = ANY (locked))
        FROM UNNEST(task_upgrades) WITH ORDINALITY AS x (u, n) ORDER BY x.n);
    RETURN QUERY SELECT t.ukey, NULL::TEXT, NULL::TEXT, t
        FROM UNNEST(keys, task_ids) AS x (k, id)
        JOIN tasks t ON t.ukey = x.k AND t.task_id = x.id;
END
$fn$;
"#;

/// Replicas whose streams have clients (`listen.rs`: [`PostgresStore::set_following`]
/// (super::PostgresStore::set_following)): a commit notifies `LISTEN`ers only while one is
/// here. `until`: the end of the mark's lease, µs on the database's clock.
///
/// The children of a parent by status in `tkey` order: progress writes run with generic plans
/// (`ProgressStore::execute`), and with `(parent_tkey, status)` only, the generic plan of
/// "the first failed child" walked the primary key filtering every row when the statuses are
/// skewed (checked with `EXPLAIN EXECUTE`: 20,000 tasks, a parent of 10,000).
const SCHEMA_12: &str = r#"
CREATE TABLE stream_followers (
    replica TEXT PRIMARY KEY,
    until   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_parent_status_tkey ON tasks (parent_tkey, status, tkey)
    WHERE parent_tkey IS NOT NULL;
DROP INDEX IF EXISTS tasks_by_parent_status;
"#;

/// The schema version of the database `client` is connected to (0: empty).
pub(crate) fn version(client: &mut Client) -> Result<i64> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = 'schema_version')",
            &[],
        )?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_opt("SELECT version FROM schema_version", &[])?
        .map_or(0, |r| r.get(0)))
}

/// Brings the schema to [`SCHEMA_VERSION`]; returns the version found before.
pub(crate) fn migrate(client: &mut Client) -> Result<i64> {
    let found = version(client)?;
    if found > SCHEMA_VERSION {
        return Err(newer_schema(found));
    }
    if found == SCHEMA_VERSION {
        return Ok(found);
    }
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let version: i64 = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map_or(0, |r| r.get(0));
    if version > SCHEMA_VERSION {
        return Err(newer_schema(version));
    }
    if version < 1 {
        tx.batch_execute(SCHEMA_1)?;
    }
    if version < 2 {
        // Task duration history, seeded from the tasks the store holds.
        tx.batch_execute(super::history::SCHEMA_2)?;
        let mut stmts = std::collections::HashMap::new();
        super::history::seed(&mut super::connect::Db {
            c: &mut tx,
            stmts: &mut stmts,
        })?;
    }
    if version < 3 {
        tx.batch_execute(SCHEMA_3)?;
    }
    if version < 5 {
        // Test results (issue #12).
        tx.batch_execute(super::test_results::SCHEMA_5)?;
    }
    if version < 7 {
        // No DDL: runs write `trace.test_run` outbox entries (issue #14), which a build of
        // schema 5 would hand to EventBridge and webhooks and mark delivered unexported; the
        // version makes such a build refuse the database during a rolling deploy.
    }
    if version < 8 {
        // A run's suite times (issue #14, N27).
        tx.batch_execute(super::test_results::SCHEMA_8)?;
    }
    if version < 9 {
        // Blob releases in progress (G105).
        tx.batch_execute(super::releases::SCHEMA_9)?;
    }
    if version < 11 {
        // The write path's first statement (`store/postgres/tasks.rs`: `Batch::prepare`).
        tx.batch_execute(SCHEMA_11)?;
    }
    if version < 12 {
        // Commits notify only while a replica's streams have clients (issue #13, G6).
        tx.batch_execute(SCHEMA_12)?;
    }
    tx.execute("DELETE FROM schema_version", &[])?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES ($1)",
        &[&SCHEMA_VERSION],
    )?;
    tx.commit()?;
    Ok(found)
}

fn newer_schema(version: i64) -> Error {
    Error::Backend {
        message: format!(
            "the database was written by a newer version (schema {version}, this build knows {SCHEMA_VERSION}): upgrade eks-upgrade-agent"
        ),
        source: None,
    }
}
