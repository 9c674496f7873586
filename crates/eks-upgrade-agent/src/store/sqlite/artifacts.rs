//! The artifact index in the same SQLite database as progress: sessions, collections, artifacts,
//! tags and an FTS5 trigram index over names.
//!
//! Every search filter has an index: single-column indexes on artifacts (which, in SQLite,
//! end with the rowid, so "newest first" is an index walk), `artifact_tags (tag, akey)` for tags,
//! and the contentless trigram table `artifact_names` for case-insensitive substrings of three
//! characters or more (shorter substrings fall back to a scan narrowed by the other filters).
//!
//! Names enter the trigram index in batches of [`FTS_BATCH`]: each FTS5 transaction writes a new
//! segment, so indexing one name per add cost a fifth of the add. Rows above the indexed mark
//! (`artifact_meta.fts_upto`, at most `FTS_BATCH - 1` of them) are matched by a scan of that
//! rowid range in the same statement, so a search never misses a name.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params, params_from_iter};

use super::progress::{
    SqliteStore, bad_column, from_micros, json_map, json_text, micros, opt_time,
};
use crate::blob::Digest;
use crate::error::{Error, Result};
use crate::model::{
    ArtifactCollection, ArtifactPage, ArtifactQuery, ArtifactStats, ArtifactStatus, ArtifactType,
    ProgressStatus, SessionSummary, TestArtifact, TestSession,
};
use crate::store::{
    ArtifactIndex, ExpiredSession, IdKind, MAX_CANDIDATES, MIN_PREFIX, MIN_SUFFIX, NewArtifact,
};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sessions (
    skey           INTEGER PRIMARY KEY,
    session_id     TEXT NOT NULL UNIQUE,
    upgrade_id     TEXT NOT NULL,
    cluster_name   TEXT NOT NULL,
    name           TEXT NOT NULL,
    description    TEXT,
    started_at     INTEGER NOT NULL,
    completed_at   INTEGER,
    retention_days INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_upgrade ON sessions (upgrade_id);
CREATE INDEX IF NOT EXISTS sessions_by_completion ON sessions (completed_at);
CREATE TABLE IF NOT EXISTS collections (
    ckey          INTEGER PRIMARY KEY,
    collection_id TEXT NOT NULL UNIQUE,
    skey          INTEGER NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT,
    task_id       TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (skey, name)
);
CREATE TABLE IF NOT EXISTS artifacts (
    akey          INTEGER PRIMARY KEY,
    artifact_id   TEXT NOT NULL UNIQUE,
    skey          INTEGER NOT NULL,
    ckey          INTEGER NOT NULL,
    name          TEXT NOT NULL,
    export_name   TEXT NOT NULL,
    description   TEXT,
    artifact_type INTEGER NOT NULL,
    file_size     INTEGER NOT NULL,
    file_hash     TEXT NOT NULL,
    status        INTEGER NOT NULL,
    s3_bucket     TEXT,
    s3_key        TEXT,
    s3_url        TEXT,
    created_at    INTEGER NOT NULL,
    uploaded_at   INTEGER,
    task_id       TEXT,
    step_id       TEXT,
    upgrade_id    TEXT NOT NULL,
    tags          TEXT,
    metadata      TEXT,
    UNIQUE (ckey, export_name)
);
CREATE INDEX IF NOT EXISTS artifacts_by_name ON artifacts (ckey, name);
CREATE INDEX IF NOT EXISTS artifacts_by_session ON artifacts (skey);
CREATE INDEX IF NOT EXISTS artifacts_by_upgrade ON artifacts (upgrade_id, task_id);
CREATE INDEX IF NOT EXISTS artifacts_by_type ON artifacts (artifact_type);
CREATE INDEX IF NOT EXISTS artifacts_by_task ON artifacts (task_id);
CREATE INDEX IF NOT EXISTS artifacts_by_status ON artifacts (status);
CREATE INDEX IF NOT EXISTS artifacts_by_created ON artifacts (created_at);
CREATE INDEX IF NOT EXISTS artifacts_by_hash ON artifacts (file_hash);
CREATE INDEX IF NOT EXISTS artifacts_by_size ON artifacts (file_size);
CREATE TABLE IF NOT EXISTS artifact_tags (
    tag  TEXT NOT NULL,
    akey INTEGER NOT NULL,
    PRIMARY KEY (tag, akey)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS artifact_tags_by_artifact ON artifact_tags (akey);
CREATE VIRTUAL TABLE IF NOT EXISTS artifact_names USING fts5 (
    name, content = '', contentless_delete = 1, tokenize = 'trigram'
);
CREATE TABLE IF NOT EXISTS artifact_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO artifact_meta (key, value) VALUES ('fts_upto', 0);
"#;

/// The durable upload queue (schema 4): an artifact's upload state lives in its row.
/// `upload_state`: 0 not queued, 1 queued, 2 uploaded, 3 failed (retried after `upload_next_at`).
pub(super) const UPLOAD_SCHEMA: &str = r#"
ALTER TABLE artifacts ADD COLUMN upload_state INTEGER NOT NULL DEFAULT 0;
ALTER TABLE artifacts ADD COLUMN upload_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE artifacts ADD COLUMN upload_next_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE artifacts ADD COLUMN upload_error TEXT;
CREATE INDEX IF NOT EXISTS artifacts_upload_queue ON artifacts (upload_state, upload_next_at);
"#;

/// Claims of the upload queue (schema 6): the uploader that holds an artifact and until when.
/// A claim whose lease has passed (a crashed uploader) is free to take over.
pub(super) const UPLOAD_CLAIM_SCHEMA: &str = r#"
ALTER TABLE artifacts ADD COLUMN upload_claimed_by TEXT;
ALTER TABLE artifacts ADD COLUMN upload_lease_until INTEGER NOT NULL DEFAULT 0;
"#;

/// Names indexed per FTS5 transaction.
const FTS_BATCH: i64 = 256;

/// Indexes the names of rows above the mark when `force` or a full batch is waiting.
pub(super) fn index_names(tx: &Transaction<'_>, force: bool) -> Result<()> {
    let upto: i64 = tx
        .prepare_cached("SELECT value FROM artifact_meta WHERE key = 'fts_upto'")?
        .query_row([], |r| r.get(0))?;
    let max: i64 = tx
        .prepare_cached("SELECT coalesce(max(akey), 0) FROM artifacts")?
        .query_row([], |r| r.get(0))?;
    if max - upto < FTS_BATCH && !(force && max > upto) {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT INTO artifact_names (rowid, name) SELECT akey, name FROM artifacts \
         WHERE akey > ?1 AND akey <= ?2",
    )?
    .execute(params![upto, max])?;
    tx.prepare_cached("UPDATE artifact_meta SET value = ?1 WHERE key = 'fts_upto'")?
        .execute([max])?;
    Ok(())
}

/// Default number of search results.
/// Page size of [`ArtifactIndex::for_each_artifact`].
const PAGE: i64 = 1000;

const SESSION_COLS: &str = "s.session_id, s.upgrade_id, s.cluster_name, s.name, s.description, \
    s.started_at, s.completed_at, s.retention_days";

fn session_row(r: &Row<'_>) -> rusqlite::Result<TestSession> {
    Ok(TestSession {
        session_id: r.get(0)?,
        upgrade_id: r.get(1)?,
        cluster_name: r.get(2)?,
        name: r.get(3)?,
        description: r.get(4)?,
        started_at: from_micros(r.get(5)?),
        completed_at: opt_time(r.get(6)?),
        retention_days: r.get(7)?,
    })
}

const COLLECTION_COLS: &str =
    "c.collection_id, s.session_id, c.name, c.description, c.task_id, c.created_at";

fn collection_row(r: &Row<'_>) -> rusqlite::Result<ArtifactCollection> {
    Ok(ArtifactCollection {
        collection_id: r.get(0)?,
        session_id: r.get(1)?,
        name: r.get(2)?,
        description: r.get(3)?,
        task_id: r.get(4)?,
        created_at: from_micros(r.get(5)?),
    })
}

const ARTIFACT_SELECT: &str = "SELECT a.artifact_id, s.session_id, c.collection_id, a.name, a.export_name, \
    a.description, a.artifact_type, a.file_size, a.file_hash, a.status, a.s3_bucket, a.s3_key, \
    a.s3_url, a.created_at, a.uploaded_at, a.task_id, a.step_id, a.upgrade_id, a.tags, a.metadata, a.akey \
    FROM artifacts a JOIN sessions s ON s.skey = a.skey JOIN collections c ON c.ckey = a.ckey";

fn artifact_row(r: &Row<'_>) -> rusqlite::Result<TestArtifact> {
    let ty: i64 = r.get(6)?;
    let st: i64 = r.get(9)?;
    let tags: Option<String> = r.get(18)?;
    Ok(TestArtifact {
        artifact_id: r.get(0)?,
        session_id: r.get(1)?,
        collection_id: r.get(2)?,
        name: r.get(3)?,
        export_name: r.get(4)?,
        description: r.get(5)?,
        artifact_type: ArtifactType::from_code(ty)
            .ok_or_else(|| bad_column(format!("unknown artifact type code {ty}")))?,
        file_size: r.get::<_, i64>(7)? as u64,
        file_hash: r.get(8)?,
        status: ArtifactStatus::from_code(st)
            .ok_or_else(|| bad_column(format!("unknown artifact status code {st}")))?,
        s3_bucket: r.get(10)?,
        s3_key: r.get(11)?,
        s3_url: r.get(12)?,
        created_at: from_micros(r.get(13)?),
        uploaded_at: opt_time(r.get(14)?),
        task_id: r.get(15)?,
        step_id: r.get(16)?,
        upgrade_id: r.get(17)?,
        tags: tags
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        metadata: json_map(r.get(19)?),
    })
}

fn session_not_found(id: &str) -> Error {
    Error::not_found(format!("session {id:?}"))
}

/// Removes a session's rows (artifacts, names, tags, collections); returns the digests its
/// artifacts used.
fn remove_session(tx: &Transaction<'_>, skey: i64) -> Result<Vec<Digest>> {
    let mut digests = Vec::new();
    {
        let mut stmt =
            tx.prepare_cached("SELECT DISTINCT file_hash FROM artifacts WHERE skey = ?1")?;
        let mut rows = stmt.query([skey])?;
        while let Some(r) = rows.next()? {
            let h: String = r.get(0)?;
            if let Ok(d) = h.parse::<Digest>() {
                digests.push(d);
            }
        }
    }
    // Index everything first, so every row to delete has its entry in the index.
    index_names(tx, true)?;
    tx.execute(
        "DELETE FROM artifact_names WHERE rowid IN (SELECT akey FROM artifacts WHERE skey = ?1)",
        [skey],
    )?;
    tx.execute(
        "DELETE FROM artifact_tags WHERE akey IN (SELECT akey FROM artifacts WHERE skey = ?1)",
        [skey],
    )?;
    tx.execute("DELETE FROM artifacts WHERE skey = ?1", [skey])?;
    tx.execute("DELETE FROM collections WHERE skey = ?1", [skey])?;
    tx.execute("DELETE FROM sessions WHERE skey = ?1", [skey])?;
    Ok(digests)
}

fn session_key(conn: &Connection, id: &str) -> Result<i64> {
    conn.prepare_cached("SELECT skey FROM sessions WHERE session_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| session_not_found(id))
}

fn collection_key(conn: &Connection, id: &str) -> Result<(i64, i64, String)> {
    conn.prepare_cached(
        "SELECT c.ckey, c.skey, s.upgrade_id FROM collections c JOIN sessions s ON s.skey = c.skey \
         WHERE c.collection_id = ?1",
    )?
    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    .optional()?
    .ok_or_else(|| Error::not_found(format!("collection {id:?}")))
}

fn load_session(conn: &Connection, id: &str) -> Result<TestSession> {
    conn.prepare_cached(&format!(
        "SELECT {SESSION_COLS} FROM sessions s WHERE s.session_id = ?1"
    ))?
    .query_row([id], session_row)
    .optional()?
    .ok_or_else(|| session_not_found(id))
}

fn load_artifact(conn: &Connection, id: &str) -> Result<TestArtifact> {
    conn.prepare_cached(&format!("{ARTIFACT_SELECT} WHERE a.artifact_id = ?1"))?
        .query_row([id], artifact_row)
        .optional()?
        .ok_or_else(|| Error::not_found(format!("artifact {id:?}")))
}

/// `name` if free in the collection, else `stem~2.ext`, `stem~3.ext`, ...
fn free_export_name(tx: &Transaction<'_>, ckey: i64, name: &str) -> Result<String> {
    let mut stmt =
        tx.prepare_cached("SELECT 1 FROM artifacts WHERE ckey = ?1 AND export_name = ?2")?;
    if !stmt.exists(params![ckey, name])? {
        return Ok(name.to_owned());
    }
    let (dir, file) = match name.rsplit_once('/') {
        Some((d, f)) => (format!("{d}/"), f),
        None => (String::new(), name),
    };
    let (stem, ext) = match file.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (file, String::new()),
    };
    for n in 2u64.. {
        let candidate = format!("{dir}{stem}~{n}{ext}");
        if !stmt.exists(params![ckey, candidate])? {
            return Ok(candidate);
        }
    }
    unreachable!("an unbounded counter finds a free name")
}

/// Builds the WHERE clause and parameters of a search.
pub(super) fn search_sql(conn: &Connection, q: &ArtifactQuery) -> Result<(String, Vec<SqlValue>)> {
    let mut sql = String::from(ARTIFACT_SELECT);
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<SqlValue> = Vec::new();
    let arg = |v: SqlValue, args: &mut Vec<SqlValue>| -> String {
        args.push(v);
        format!("?{}", args.len())
    };
    if let Some(c) = &q.cursor {
        // The cursor is the row key of the last artifact of the previous page.
        let after = c.parse::<i64>().ok().filter(|k| *k > 0).ok_or_else(|| {
            Error::invalid(format!(
                "invalid cursor {c:?}: use the next_cursor of a previous page"
            ))
        })?;
        clauses.push(format!("a.akey < {}", arg(after.into(), &mut args)));
    }
    if let Some(id) = &q.session_id {
        let k = session_key(conn, id)?;
        clauses.push(format!("a.skey = {}", arg(k.into(), &mut args)));
    }
    if let Some(id) = &q.collection_id {
        let (k, _, _) = collection_key(conn, id)?;
        clauses.push(format!("a.ckey = {}", arg(k.into(), &mut args)));
    }
    if let Some(u) = &q.upgrade_id {
        clauses.push(format!(
            "a.upgrade_id = {}",
            arg(u.clone().into(), &mut args)
        ));
    }
    if let Some(t) = q.artifact_type {
        clauses.push(format!(
            "a.artifact_type = {}",
            arg(t.code().into(), &mut args)
        ));
    }
    if let Some(t) = &q.task_id {
        clauses.push(format!("a.task_id = {}", arg(t.clone().into(), &mut args)));
    }
    if let Some(s) = q.status {
        clauses.push(format!("a.status = {}", arg(s.code().into(), &mut args)));
    }
    if let Some(min) = q.min_size {
        clauses.push(format!(
            "a.file_size >= {}",
            arg((min as i64).into(), &mut args)
        ));
    }
    if let Some(max) = q.max_size {
        clauses.push(format!(
            "a.file_size <= {}",
            arg((max.min(i64::MAX as u64) as i64).into(), &mut args)
        ));
    }
    if let Some(since) = q.created_since {
        clauses.push(format!(
            "a.created_at >= {}",
            arg(micros(since).into(), &mut args)
        ));
    }
    for tag in &q.tags {
        clauses.push(format!(
            "a.akey IN (SELECT akey FROM artifact_tags WHERE tag = {})",
            arg(tag.clone().into(), &mut args)
        ));
    }
    if let Some(name) = q.name.as_deref().filter(|n| !n.is_empty()) {
        let is_glob = name.contains(['*', '?']);
        // The longest literal run feeds the trigram index when it has three characters.
        let literal = if is_glob {
            name.split(['*', '?', '[', ']'])
                .max_by_key(|s| s.chars().count())
                .unwrap_or("")
        } else {
            name
        };
        if literal.chars().count() >= 3 {
            let phrase = format!("\"{}\"", literal.replace('"', "\"\""));
            let like = format!(
                "%{}%",
                literal
                    .to_lowercase()
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            );
            // Indexed names, plus the few rows above the indexed mark (same snapshot).
            clauses.push(format!(
                "a.akey IN (SELECT rowid FROM artifact_names WHERE artifact_names MATCH {} \
                 UNION ALL SELECT akey FROM artifacts WHERE akey > \
                 (SELECT value FROM artifact_meta WHERE key = 'fts_upto') \
                 AND lower(name) LIKE {} ESCAPE '\\')",
                arg(phrase.into(), &mut args),
                arg(like.into(), &mut args)
            ));
        }
        if is_glob {
            clauses.push(format!(
                "lower(a.name) GLOB {}",
                arg(name.to_lowercase().into(), &mut args)
            ));
        } else if literal.chars().count() < 3 {
            let escaped = name
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            clauses.push(format!(
                "lower(a.name) LIKE {} ESCAPE '\\'",
                arg(format!("%{escaped}%").into(), &mut args)
            ));
        }
    }
    if !clauses.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
    }
    // One row more than the page, to know whether another page follows.
    sql.push_str(&format!(
        " ORDER BY a.akey DESC LIMIT {}",
        page_limit(q) + 1
    ));
    Ok((sql, args))
}

/// The page size of a query: its limit, the default for 0, never above the maximum.
fn page_limit(q: &ArtifactQuery) -> usize {
    match q.limit {
        0 => crate::model::DEFAULT_SEARCH_LIMIT,
        n => n.min(crate::model::MAX_SEARCH_LIMIT),
    }
}

fn sessions_in(conn: &Connection, session_id: Option<&str>) -> Result<Option<i64>> {
    session_id.map(|id| session_key(conn, id)).transpose()
}

/// The table and column of a kind of id.
fn id_column(kind: IdKind) -> (&'static str, &'static str) {
    match kind {
        IdKind::Session => ("sessions", "session_id"),
        IdKind::Collection => ("collections", "collection_id"),
        IdKind::Artifact => ("artifacts", "artifact_id"),
    }
}

impl ArtifactIndex for SqliteStore {
    fn abbreviate(&self, kind: IdKind, id: &str) -> Result<String> {
        let (table, col) = id_column(kind);
        let chars: Vec<char> = id.chars().collect();
        let common = |a: &[char], b: &str| {
            a.iter()
                .zip(b.chars())
                .take_while(|(x, y)| **x == *y)
                .count()
        };
        self.read(|c| {
            // Prefix: longer than what it shares with its neighbours in the unique index.
            let mut need = MIN_PREFIX;
            for sql in [
                format!("SELECT max({col}) FROM {table} WHERE {col} < ?1"),
                format!("SELECT min({col}) FROM {table} WHERE {col} > ?1"),
            ] {
                let next: Option<String> = c.prepare_cached(&sql)?.query_row([id], |r| r.get(0))?;
                if let Some(n) = next {
                    need = need.max(common(&chars, &n) + 1);
                }
            }
            let prefix: String = chars.iter().take(need).collect();
            // Suffix: longer than what it shares with the ids of the same last six characters,
            // and no id's prefix (a prefix match wins when resolving).
            if chars.len() > MIN_SUFFIX {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {col} FROM {table} WHERE substr({col}, -6) = substr(?1, -6) AND {col} <> ?1 LIMIT 100"
                ))?;
                let others: Vec<String> = stmt.query_map([id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                let rev: Vec<char> = chars.iter().rev().copied().collect();
                let mut s = MIN_SUFFIX;
                for o in &others {
                    let o: String = o.chars().rev().collect();
                    s = s.max(common(&rev, &o) + 1);
                }
                if s < need && s < chars.len() {
                    let suffix: String = chars[chars.len() - s..].iter().collect();
                    let prefix_of_some: Option<String> = c
                        .prepare_cached(&format!(
                            "SELECT {col} FROM {table} WHERE {col} >= ?1 AND {col} < ?1 || char(1114111) LIMIT 1"
                        ))?
                        .query_row([&suffix], |r| r.get(0))
                        .optional()?;
                    if prefix_of_some.is_none() {
                        return Ok(suffix);
                    }
                }
            }
            Ok(prefix)
        })
    }

    fn resolve_id(&self, kind: IdKind, abbrev: &str) -> Result<String> {
        let (table, col) = id_column(kind);
        let what = kind.as_str();
        if abbrev.is_empty() {
            return Err(Error::invalid(format!("empty {what} id")));
        }
        let limit = (MAX_CANDIDATES + 1) as i64;
        self.read(|c| {
            // Exact, then prefix: a range on the unique index of ids.
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {col} FROM {table} WHERE {col} >= ?1 AND {col} < ?1 || char(1114111) \
                 ORDER BY {col} LIMIT ?2"
            ))?;
            let mut found: Vec<String> = stmt
                .query_map(params![abbrev, limit], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            if found.iter().any(|f| f == abbrev) {
                return Ok(abbrev.to_owned());
            }
            if found.is_empty() && abbrev.chars().count() >= MIN_SUFFIX {
                // Suffix: a seek on the index of the ids' last six characters.
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {col} FROM {table} WHERE substr({col}, -6) = substr(?1, -6) \
                     AND substr({col}, -length(?1)) = ?1 ORDER BY {col} LIMIT ?2"
                ))?;
                found = stmt
                    .query_map(params![abbrev, limit], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            super::super::one_match(what, abbrev, found)
        })
    }

    fn create_session(&self, s: &TestSession) -> Result<()> {
        crate::artifacts::check_retention_days(s.retention_days)?;
        self.write(|tx| {
            insert_session(tx, s).map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Error::AlreadyExists {
                        what: format!("session {:?}", s.session_id),
                    }
                }
                other => other.into(),
            })?;
            Ok(())
        })
    }

    fn create_first_session(&self, s: &TestSession) -> Result<TestSession> {
        crate::artifacts::check_retention_days(s.retention_days)?;
        // `BEGIN IMMEDIATE`: the read below runs under the write lock, so no other writer
        // (thread or process) creates a session between it and the insert.
        self.write(|tx| {
            let latest = tx
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLS} FROM sessions s WHERE s.upgrade_id = ?1 \
                     ORDER BY s.skey DESC LIMIT 1"
                ))?
                .query_row([&s.upgrade_id], session_row)
                .optional()?;
            if let Some(latest) = latest {
                return Ok(latest);
            }
            insert_session(tx, s)?;
            Ok(s.clone())
        })
    }

    fn session(&self, session_id: &str) -> Result<TestSession> {
        self.read(|c| load_session(c, session_id))
    }

    fn sessions(&self, upgrade_id: Option<&str>) -> Result<Vec<TestSession>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions s WHERE ?1 IS NULL OR s.upgrade_id = ?1 ORDER BY s.skey"
            ))?;
            let rows = stmt.query_map([upgrade_id], session_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn complete_session(&self, session_id: &str, at: DateTime<Utc>) -> Result<TestSession> {
        self.write(|tx| {
            session_key(tx, session_id)?;
            tx.prepare_cached(
                "UPDATE sessions SET completed_at = coalesce(completed_at, ?2) WHERE session_id = ?1",
            )?
            .execute(params![session_id, micros(at)])?;
            load_session(tx, session_id)
        })
    }

    fn session_summary(&self, session_id: &str) -> Result<SessionSummary> {
        self.read(|c| {
            let session = load_session(c, session_id)?;
            let skey = session_key(c, session_id)?;
            let collections_count: i64 = c
                .prepare_cached("SELECT count(*) FROM collections WHERE skey = ?1")?
                .query_row([skey], |r| r.get(0))?;
            let mut artifact_types = BTreeMap::new();
            let (mut total, mut bytes, mut uploaded) = (0u64, 0u64, 0u64);
            let mut stmt = c.prepare_cached(
                "SELECT artifact_type, status, count(*), coalesce(sum(file_size), 0) FROM artifacts \
                 WHERE skey = ?1 AND status != ?2 GROUP BY artifact_type, status",
            )?;
            let mut rows = stmt.query(params![skey, ArtifactStatus::Deleted.code()])?;
            while let Some(r) = rows.next()? {
                let ty = ArtifactType::from_code(r.get(0)?).unwrap_or(ArtifactType::LogFile);
                let status = ArtifactStatus::from_code(r.get(1)?);
                let n = r.get::<_, i64>(2)? as u64;
                total += n;
                bytes += r.get::<_, i64>(3)? as u64;
                if status == Some(ArtifactStatus::Uploaded) {
                    uploaded += n;
                }
                *artifact_types.entry(ty).or_insert(0) += n;
            }
            Ok(SessionSummary {
                session,
                collections_count: collections_count as u64,
                total_artifacts: total,
                total_size_bytes: bytes,
                uploaded_artifacts: uploaded,
                artifact_types,
            })
        })
    }

    fn create_collection(&self, c: &ArtifactCollection) -> Result<()> {
        self.write(|tx| {
            let skey = session_key(tx, &c.session_id)?;
            let taken = tx
                .prepare_cached("SELECT 1 FROM collections WHERE skey = ?1 AND name = ?2")?
                .exists(params![skey, c.name])?;
            if taken {
                return Err(Error::AlreadyExists {
                    what: format!("collection {:?} in session {:?}", c.name, c.session_id),
                });
            }
            insert_collection(tx, skey, c)?;
            Ok(())
        })
    }

    fn collection(&self, collection_id: &str) -> Result<ArtifactCollection> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {COLLECTION_COLS} FROM collections c JOIN sessions s ON s.skey = c.skey \
                 WHERE c.collection_id = ?1"
            ))?
            .query_row([collection_id], collection_row)
            .optional()?
            .ok_or_else(|| Error::not_found(format!("collection {collection_id:?}")))
        })
    }

    fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>> {
        self.read(|c| {
            let skey = session_key(c, session_id)?;
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLLECTION_COLS} FROM collections c JOIN sessions s ON s.skey = c.skey \
                 WHERE c.skey = ?1 ORDER BY c.ckey"
            ))?;
            let rows = stmt.query_map([skey], collection_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn insert_artifacts(
        &self,
        artifacts: &[NewArtifact],
        blob_present: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<TestArtifact>> {
        self.write(|tx| {
            let mut out = Vec::with_capacity(artifacts.len());
            for a in artifacts {
                let (ckey, skey, upgrade_id) = collection_key(tx, &a.collection_id)?;
                let hash = a.digest.to_hex();
                let existing: Option<String> = tx
                    .prepare_cached(
                        "SELECT artifact_id FROM artifacts WHERE ckey = ?1 AND name = ?2 AND file_hash = ?3 \
                         AND status != ?4",
                    )?
                    .query_row(
                        params![ckey, a.name, hash, ArtifactStatus::Deleted.code()],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(id) = existing {
                    out.push(load_artifact(tx, &id)?);
                    continue;
                }
                if !blob_present(&a.digest)? {
                    return Err(Error::Backend {
                        message: format!(
                            "the blob of {:?} (sha256:{hash}) disappeared before it was indexed \
                             (a concurrent gc?); add it again",
                            a.name
                        ),
                        source: None,
                    });
                }
                let export_name = free_export_name(tx, ckey, &a.name)?;
                let tags = if a.tags.is_empty() {
                    None
                } else {
                    serde_json::to_string(&a.tags).ok()
                };
                tx.prepare_cached(
                    "INSERT INTO artifacts (artifact_id, skey, ckey, name, export_name, description, \
                     artifact_type, file_size, file_hash, status, created_at, task_id, step_id, \
                     upgrade_id, tags, metadata, upload_state) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                )?
                .execute(params![
                    a.artifact_id,
                    skey,
                    ckey,
                    a.name,
                    export_name,
                    a.description,
                    a.artifact_type.code(),
                    a.file_size as i64,
                    hash,
                    ArtifactStatus::Created.code(),
                    micros(a.created_at),
                    a.task_id,
                    a.step_id,
                    upgrade_id,
                    tags,
                    json_text(&a.metadata),
                    i64::from(a.queue_upload)
                ])?;
                insert_tags(tx, tx.last_insert_rowid(), &a.tags)?;
                out.push(load_artifact(tx, &a.artifact_id)?);
            }
            index_names(tx, false)?;
            Ok(out)
        })
    }

    fn artifact(&self, artifact_id: &str) -> Result<TestArtifact> {
        self.read(|c| load_artifact(c, artifact_id))
    }

    fn search(&self, q: &ArtifactQuery) -> Result<ArtifactPage> {
        self.read(|c| {
            let (sql, args) = search_sql(c, q)?;
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args), |r| {
                Ok((r.get::<_, i64>(20)?, artifact_row(r)?))
            })?;
            let mut rows: Vec<(i64, TestArtifact)> = rows.collect::<rusqlite::Result<_>>()?;
            let limit = page_limit(q);
            let more = rows.len() > limit;
            rows.truncate(limit);
            let next_cursor = if more {
                rows.last().map(|(k, _)| k.to_string())
            } else {
                None
            };
            Ok(ArtifactPage {
                artifacts: rows.into_iter().map(|(_, a)| a).collect(),
                next_cursor,
            })
        })
    }

    fn stats(&self, session_id: Option<&str>) -> Result<ArtifactStats> {
        self.read(|c| {
            let skey = sessions_in(c, session_id)?;
            let mut stats = ArtifactStats {
                total_artifacts: 0,
                total_size_bytes: 0,
                average_size_bytes: 0.0,
                type_distribution: BTreeMap::new(),
                status_distribution: BTreeMap::new(),
                type_bytes: BTreeMap::new(),
                sessions_searched: 0,
            };
            let mut stmt = c.prepare_cached(
                "SELECT artifact_type, status, count(*), coalesce(sum(file_size), 0) FROM artifacts \
                 WHERE ?1 IS NULL OR skey = ?1 GROUP BY artifact_type, status",
            )?;
            let mut rows = stmt.query([skey])?;
            while let Some(r) = rows.next()? {
                let ty = ArtifactType::from_code(r.get(0)?).unwrap_or(ArtifactType::LogFile);
                let st = ArtifactStatus::from_code(r.get(1)?).unwrap_or(ArtifactStatus::Created);
                let n = r.get::<_, i64>(2)? as u64;
                let bytes = r.get::<_, i64>(3)? as u64;
                stats.total_artifacts += n;
                stats.total_size_bytes += bytes;
                *stats.type_distribution.entry(ty).or_insert(0) += n;
                *stats.type_bytes.entry(ty).or_insert(0) += bytes;
                *stats.status_distribution.entry(st).or_insert(0) += n;
            }
            if stats.total_artifacts > 0 {
                stats.average_size_bytes = stats.total_size_bytes as f64 / stats.total_artifacts as f64;
            }
            stats.sessions_searched = match skey {
                Some(_) => 1,
                None => c
                    .prepare_cached("SELECT count(*) FROM sessions")?
                    .query_row([], |r| r.get::<_, i64>(0))? as u64,
            };
            Ok(stats)
        })
    }

    fn for_each_artifact(
        &self,
        session_id: Option<&str>,
        f: &mut dyn FnMut(TestArtifact) -> Result<()>,
    ) -> Result<()> {
        let skey = self.read(|c| sessions_in(c, session_id))?;
        let mut after = 0i64;
        loop {
            // One page per read, so no lock is held while `f` runs.
            let page: Vec<(i64, TestArtifact)> = self.read(|c| {
                let mut stmt = c.prepare_cached(&format!(
                    "{ARTIFACT_SELECT} WHERE a.akey > ?1 AND (?2 IS NULL OR a.skey = ?2) ORDER BY a.akey LIMIT ?3"
                ))?;
                let rows = stmt.query_map(params![after, skey, PAGE], |r| {
                    Ok((r.get::<_, i64>(20)?, artifact_row(r)?))
                })?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })?;
            let Some(&(last, _)) = page.last() else {
                return Ok(());
            };
            after = last;
            for (_, a) in page {
                f(a)?;
            }
        }
    }

    fn expired_sessions(
        &self,
        as_of: DateTime<Utc>,
        failed_factor: u32,
    ) -> Result<Vec<ExpiredSession>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SESSION_COLS}, coalesce(u.status = ?1, 0), \
                 (SELECT count(*) FROM artifacts a WHERE a.skey = s.skey), \
                 (SELECT coalesce(sum(file_size), 0) FROM artifacts a WHERE a.skey = s.skey) \
                 FROM sessions s LEFT JOIN upgrades u ON u.upgrade_id = s.upgrade_id \
                 WHERE s.completed_at IS NOT NULL ORDER BY s.completed_at"
            ))?;
            let mut rows = stmt.query([ProgressStatus::Failed.index() as i64])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let session = session_row(r)?;
                let failed: bool = r.get(8)?;
                let days = i64::from(session.retention_days).saturating_mul(if failed {
                    i64::from(failed_factor.max(1))
                } else {
                    1
                });
                let completed = session.completed_at.expect("filtered on completed_at");
                // Saturating: a retention beyond the calendar never expires (and never panics).
                let expired_at = chrono::TimeDelta::try_days(days)
                    .and_then(|d| completed.checked_add_signed(d))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                if expired_at <= as_of {
                    out.push(ExpiredSession {
                        session,
                        expired_at,
                        upgrade_failed: failed,
                        artifacts: r.get::<_, i64>(9)? as u64,
                        bytes: r.get::<_, i64>(10)? as u64,
                    });
                }
            }
            Ok(out)
        })
    }

    fn delete_session(&self, session_id: &str) -> Result<Vec<Digest>> {
        self.write(|tx| {
            let skey = session_key(tx, session_id)?;
            remove_session(tx, skey)
        })
    }

    fn delete_session_if_empty(&self, session_id: &str) -> Result<Option<Vec<Digest>>> {
        self.write(|tx| {
            let skey = session_key(tx, session_id)?;
            let live = tx
                .prepare_cached("SELECT 1 FROM artifacts WHERE skey = ?1 AND status != ?2 LIMIT 1")?
                .exists(params![skey, ArtifactStatus::Deleted.code()])?;
            if live {
                return Ok(None);
            }
            remove_session(tx, skey).map(Some)
        })
    }

    fn delete_unreferenced(
        &self,
        digests: &[Digest],
        delete: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<Digest>> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT 1 FROM artifacts WHERE file_hash = ?1 AND status != ?2 LIMIT 1",
            )?;
            let mut deleted = Vec::new();
            for d in digests {
                if !stmt.exists(params![d.to_hex(), ArtifactStatus::Deleted.code()])? && delete(d)?
                {
                    deleted.push(*d);
                }
            }
            Ok(deleted)
        })
    }

    fn artifact_counts_by_task(&self, upgrade_id: &str) -> Result<HashMap<String, u64>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT task_id, count(*) FROM artifacts WHERE upgrade_id = ?1 AND task_id IS NOT NULL \
                 AND status != ?2 GROUP BY task_id",
            )?;
            let rows = stmt.query_map(params![upgrade_id, ArtifactStatus::Deleted.code()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn import_session(
        &self,
        session: &TestSession,
        collections: &[ArtifactCollection],
        artifacts: &[TestArtifact],
    ) -> Result<()> {
        crate::artifacts::check_retention_days(session.retention_days)?;
        self.write(|tx| import_session_tx(tx, session, collections, artifacts))
    }

    fn delete_orphan_reports(
        &self,
        created_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TestArtifact>> {
        // Under the write lock: no run is recorded between the look-up and the update.
        self.write(|tx| {
            let found: Vec<TestArtifact> = tx
                .prepare_cached(&format!(
                    "{ARTIFACT_SELECT} WHERE a.artifact_type = ?1 AND a.status != ?2 \
                     AND a.created_at < ?3 AND json_valid(a.metadata) \
                     AND json_type(a.metadata, '$.' || ?5) = 'text' \
                     AND NOT EXISTS (SELECT 1 FROM test_runs r \
                       WHERE r.run_id = json_extract(a.metadata, '$.' || ?5)) \
                     ORDER BY a.akey LIMIT ?4"
                ))?
                .query_map(
                    params![
                        ArtifactType::TestResult.code(),
                        ArtifactStatus::Deleted.code(),
                        micros(created_before),
                        limit as i64,
                        crate::store::PENDING_RUN_KEY
                    ],
                    artifact_row,
                )?
                .collect::<rusqlite::Result<_>>()?;
            let mut stmt = tx.prepare_cached(
                "UPDATE artifacts SET status = ?2, upload_state = CASE WHEN upload_state IN (1, 3) \
                 THEN 0 ELSE upload_state END WHERE artifact_id = ?1",
            )?;
            for a in &found {
                stmt.execute(params![a.artifact_id, ArtifactStatus::Deleted.code()])?;
            }
            Ok(found)
        })
    }

    fn set_artifact_status(
        &self,
        artifact_id: &str,
        status: ArtifactStatus,
    ) -> Result<TestArtifact> {
        self.write(|tx| {
            let n = tx
                // A deleted artifact leaves the upload queue: no claim takes it and an
                // uploader's late outcome finds no queued row to settle.
                .prepare_cached(
                    "UPDATE artifacts SET status = ?2, \
                     upload_state = CASE WHEN ?3 AND upload_state IN (1, 3) THEN 0 \
                     ELSE upload_state END WHERE artifact_id = ?1",
                )?
                .execute(params![
                    artifact_id,
                    status.code(),
                    status == ArtifactStatus::Deleted
                ])?;
            if n == 0 {
                return Err(Error::not_found(format!("artifact {artifact_id:?}")));
            }
            load_artifact(tx, artifact_id)
        })
    }
}

/// Inserts a collection row; returns its key.
fn insert_collection(
    tx: &Transaction<'_>,
    skey: i64,
    c: &ArtifactCollection,
) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "INSERT INTO collections (collection_id, skey, name, description, task_id, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        c.collection_id,
        skey,
        c.name,
        c.description,
        c.task_id,
        micros(c.created_at)
    ])?;
    Ok(tx.last_insert_rowid())
}

/// Inserts the tag rows of an artifact.
fn insert_tags(tx: &Transaction<'_>, akey: i64, tags: &[String]) -> rusqlite::Result<()> {
    let mut stmt =
        tx.prepare_cached("INSERT OR IGNORE INTO artifact_tags (tag, akey) VALUES (?1, ?2)")?;
    for t in tags {
        stmt.execute(params![t, akey])?;
    }
    Ok(())
}

/// Inserts a session row; returns its key.
fn insert_session(tx: &Transaction<'_>, s: &TestSession) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "INSERT INTO sessions (session_id, upgrade_id, cluster_name, name, description, \
         started_at, completed_at, retention_days) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        s.session_id,
        s.upgrade_id,
        s.cluster_name,
        s.name,
        s.description,
        micros(s.started_at),
        s.completed_at.map(micros),
        s.retention_days
    ])?;
    Ok(tx.last_insert_rowid())
}

fn import_session_tx(
    tx: &Transaction<'_>,
    s: &TestSession,
    collections: &[ArtifactCollection],
    artifacts: &[TestArtifact],
) -> Result<()> {
    if session_key(tx, &s.session_id).is_ok() {
        return Err(Error::AlreadyExists {
            what: format!("session {:?}", s.session_id),
        });
    }
    let skey = insert_session(tx, s)?;
    let mut ckeys = HashMap::new();
    for c in collections {
        ckeys.insert(c.collection_id.as_str(), insert_collection(tx, skey, c)?);
    }
    for a in artifacts {
        let ckey = *ckeys.get(a.collection_id.as_str()).ok_or_else(|| {
            Error::invalid(format!(
                "artifact {:?} names collection {:?}, which the manifest does not have",
                a.artifact_id, a.collection_id
            ))
        })?;
        a.file_hash.parse::<Digest>()?;
        tx.prepare_cached(
            "INSERT INTO artifacts (artifact_id, skey, ckey, name, export_name, description, \
             artifact_type, file_size, file_hash, status, s3_bucket, s3_key, s3_url, created_at, \
             uploaded_at, task_id, step_id, upgrade_id, tags, metadata, upload_state) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
        )?
        .execute(params![
            a.artifact_id,
            skey,
            ckey,
            a.name,
            a.export_name,
            a.description,
            a.artifact_type.code(),
            a.file_size as i64,
            a.file_hash,
            a.status.code(),
            a.s3_bucket,
            a.s3_key,
            a.s3_url,
            micros(a.created_at),
            a.uploaded_at.map(micros),
            a.task_id,
            a.step_id,
            a.upgrade_id,
            (!a.tags.is_empty()).then(|| serde_json::to_string(&a.tags).unwrap_or_default()),
            json_text(&a.metadata),
            if a.s3_key.is_some() { 2 } else { 0 }
        ])?;
        insert_tags(tx, tx.last_insert_rowid(), &a.tags)?;
    }
    index_names(tx, false)?;
    Ok(())
}

impl crate::store::UploadQueue for SqliteStore {
    fn queue_uploads(
        &self,
        selector: &crate::store::UploadSelector,
        retry_failed: bool,
    ) -> Result<u64> {
        use crate::store::UploadSelector;
        self.write(|tx| {
            let states = if retry_failed { "(0, 3)" } else { "(0)" };
            let (clause, arg): (&str, Option<i64>) = match selector {
                UploadSelector::All => ("1 = 1", None),
                UploadSelector::Failed => ("upload_state = 3", None),
                UploadSelector::Session(id) => ("skey = ?1", Some(session_key(tx, id)?)),
                UploadSelector::Artifact(id) => {
                    let k: i64 = tx
                        .prepare_cached("SELECT akey FROM artifacts WHERE artifact_id = ?1")?
                        .query_row([id], |r| r.get(0))
                        .optional()?
                        .ok_or_else(|| Error::not_found(format!("artifact {id:?}")))?;
                    ("akey = ?1", Some(k))
                }
            };
            let sql = format!(
                "UPDATE artifacts SET upload_state = 1, upload_next_at = 0 \
                 WHERE {clause} AND upload_state IN {states} AND status != {}",
                ArtifactStatus::Deleted.code()
            );
            let n = match arg {
                Some(a) => tx.execute(&sql, [a])?,
                None => tx.execute(&sql, [])?,
            };
            Ok(n as u64)
        })
    }

    fn claim_uploads(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(TestArtifact, u32)>> {
        self.write(|tx| {
            let select = ARTIFACT_SELECT
                .replace(" FROM artifacts a", ", a.upload_attempts FROM artifacts a");
            let due: Vec<(TestArtifact, u32)> = {
                let mut stmt = tx.prepare_cached(&format!(
                    "{select} WHERE a.upload_state IN (1, 3) AND a.upload_next_at <= ?1 \
                     AND (a.upload_claimed_by IS NULL OR a.upload_claimed_by = ?3 \
                          OR a.upload_lease_until <= ?1) \
                     ORDER BY a.akey LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![micros(now), limit as i64, owner], |r| {
                    Ok((artifact_row(r)?, r.get::<_, i64>(21)? as u32))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut claim = tx.prepare_cached(
                "UPDATE artifacts SET upload_claimed_by = ?2, upload_lease_until = ?3 \
                 WHERE artifact_id = ?1",
            )?;
            for (a, _) in &due {
                claim.execute(params![a.artifact_id, owner, micros(lease_until)])?;
            }
            Ok(due)
        })
    }

    fn renew_upload_claims(&self, owner: &str, lease_until: DateTime<Utc>) -> Result<Vec<String>> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "UPDATE artifacts SET upload_lease_until = ?2 \
                 WHERE upload_claimed_by = ?1 AND upload_state IN (1, 3) RETURNING artifact_id",
            )?;
            let ids = stmt
                .query_map(params![owner, micros(lease_until)], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
    }

    fn claimed_by_others(&self, owner: &str, now: DateTime<Utc>) -> Result<u64> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT count(*) FROM artifacts WHERE upload_state IN (1, 3) \
                 AND upload_next_at <= ?1 AND upload_claimed_by IS NOT NULL \
                 AND upload_claimed_by != ?2 AND upload_lease_until > ?1",
            )?
            .query_row(params![micros(now), owner], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    fn pending_uploads(&self) -> Result<(u64, u64)> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT count(*), coalesce(sum(file_size), 0) FROM artifacts WHERE upload_state = 1",
            )?
            .query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))?)
        })
    }

    fn record_upload(
        &self,
        owner: &str,
        artifact_id: &str,
        outcome: &crate::store::UploadOutcome,
    ) -> Result<TestArtifact> {
        use crate::store::UploadOutcome;
        self.write(|tx| {
            match outcome {
                UploadOutcome::Uploaded { bucket, key, at } => {
                    tx.prepare_cached(
                        "UPDATE artifacts SET upload_state = 2, status = ?2, s3_bucket = ?3, s3_key = ?4, \
                         s3_url = ?5, uploaded_at = ?6, upload_error = NULL, \
                         upload_claimed_by = NULL, upload_lease_until = 0 WHERE artifact_id = ?1 \
                         AND upload_state IN (1, 3) AND upload_claimed_by = ?7",
                    )?
                    .execute(params![
                        artifact_id,
                        ArtifactStatus::Uploaded.code(),
                        bucket,
                        key,
                        format!("s3://{bucket}/{key}"),
                        micros(*at),
                        owner
                    ])?;
                }
                UploadOutcome::Failed { error, next_at } => {
                    tx.prepare_cached(
                        "UPDATE artifacts SET upload_state = 3, status = ?2, upload_attempts = upload_attempts + 1, \
                         upload_next_at = ?3, upload_error = ?4, upload_claimed_by = NULL, \
                         upload_lease_until = 0 WHERE artifact_id = ?1 AND upload_state IN (1, 3) \
                         AND upload_claimed_by = ?5",
                    )?
                    .execute(params![
                        artifact_id,
                        ArtifactStatus::Failed.code(),
                        next_at.map_or(0, micros),
                        error,
                        owner
                    ])?;
                }
            }
            load_artifact(tx, artifact_id)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::sqlite::SqliteOptions;

    /// The artifact index and upload queue suite on SQLite.
    #[test]
    fn conformance() {
        let dirs = std::sync::Mutex::new(Vec::new());
        crate::artifacts::conformance::run(&|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap());
            dirs.lock().unwrap().push(dir);
            crate::artifacts::conformance::Backend {
                index: store.clone(),
                uploads: store.clone(),
                results: store.clone(),
                progress: store,
            }
        });
    }
}
