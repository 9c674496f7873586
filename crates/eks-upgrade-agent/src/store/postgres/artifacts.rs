//! The artifact index on PostgreSQL (team mode), mirroring `store/sqlite/artifacts.rs`:
//! sessions, collections, artifacts and tags in the same database as progress, so any replica
//! serves any artifact. Schema 3 (`schema.rs`) gives every search filter an index; names are
//! matched by trigrams on `lower(name)` (substrings of three characters or more, and globs,
//! turned into regular expressions the trigram index serves).
//!
//! Writers on several replicas: adds to one collection are serialized on its row (`FOR
//! UPDATE`), so the idempotent re-add and the free `export_name` are decided one add at a time;
//! an add and a blob release of the same digest are serialized on a per-digest advisory lock,
//! and a release deletes the S3 object outside any transaction under a committed mark that
//! adds wait for (`releases.rs`), so `gc`, `cleanup` and `delete` never take a blob from under
//! an add being indexed on another replica (what SQLite's single writer gives).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use postgres::types::ToSql;
use postgres::{GenericClient, Row};

use super::progress::{
    Db, PostgresStore, Tx, bad_column, from_micros, json_map, json_text, micros, opt_time,
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

/// Page size of [`ArtifactIndex::for_each_artifact`].
const PAGE: i64 = 1000;

/// One parameter of a statement built at run time.
type Param = Box<dyn ToSql + Sync>;

const SESSION_COLS: &str = "s.session_id, s.upgrade_id, s.cluster_name, s.name, s.description, \
    s.started_at, s.completed_at, s.retention_days";

fn session_row(r: &Row) -> TestSession {
    TestSession {
        session_id: r.get(0),
        upgrade_id: r.get(1),
        cluster_name: r.get(2),
        name: r.get(3),
        description: r.get(4),
        started_at: from_micros(r.get(5)),
        completed_at: opt_time(r.get(6)),
        retention_days: u32::try_from(r.get::<_, i64>(7)).unwrap_or(u32::MAX),
    }
}

const COLLECTION_COLS: &str =
    "c.collection_id, s.session_id, c.name, c.description, c.task_id, c.created_at";

fn collection_row(r: &Row) -> ArtifactCollection {
    ArtifactCollection {
        collection_id: r.get(0),
        session_id: r.get(1),
        name: r.get(2),
        description: r.get(3),
        task_id: r.get(4),
        created_at: from_micros(r.get(5)),
    }
}

/// Selects an artifact (columns 0-19), its key (20) and its upload attempts (21).
pub(super) const ARTIFACT_SELECT: &str = "SELECT a.artifact_id, s.session_id, c.collection_id, \
    a.name, a.export_name, a.description, a.artifact_type, a.file_size, a.file_hash, a.status, \
    a.s3_bucket, a.s3_key, a.s3_url, a.created_at, a.uploaded_at, a.task_id, a.step_id, \
    a.upgrade_id, a.tags, a.metadata, a.akey, a.upload_attempts \
    FROM artifacts a JOIN sessions s ON s.skey = a.skey JOIN collections c ON c.ckey = a.ckey";

pub(super) fn artifact_row(r: &Row) -> Result<TestArtifact> {
    let ty: i64 = r.get(6);
    let st: i64 = r.get(9);
    let tags: Option<String> = r.get(18);
    Ok(TestArtifact {
        artifact_id: r.get(0),
        session_id: r.get(1),
        collection_id: r.get(2),
        name: r.get(3),
        export_name: r.get(4),
        description: r.get(5),
        artifact_type: ArtifactType::from_code(ty)
            .ok_or_else(|| bad_column(format!("unknown artifact type code {ty}")))?,
        file_size: r.get::<_, i64>(7) as u64,
        file_hash: r.get(8),
        status: ArtifactStatus::from_code(st)
            .ok_or_else(|| bad_column(format!("unknown artifact status code {st}")))?,
        s3_bucket: r.get(10),
        s3_key: r.get(11),
        s3_url: r.get(12),
        created_at: from_micros(r.get(13)),
        uploaded_at: opt_time(r.get(14)),
        task_id: r.get(15),
        step_id: r.get(16),
        upgrade_id: r.get(17),
        tags: tags
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        metadata: json_map(r.get(19)),
    })
}

fn session_not_found(id: &str) -> Error {
    Error::not_found(format!("session {id:?}"))
}

fn session_key<C: GenericClient>(db: &mut Db<'_, C>, id: &str) -> Result<i64> {
    db.opt("SELECT skey FROM sessions WHERE session_id = $1", &[&id])?
        .map(|r| r.get(0))
        .ok_or_else(|| session_not_found(id))
}

/// A collection's key, its session's key and upgrade; with `lock`, the collection's row is
/// locked to the end of the transaction (adds to one collection, one at a time).
fn collection_key<C: GenericClient>(
    db: &mut Db<'_, C>,
    id: &str,
    lock: bool,
) -> Result<(i64, i64, String)> {
    let sql = if lock {
        "SELECT c.ckey, c.skey, s.upgrade_id FROM collections c JOIN sessions s ON s.skey = c.skey \
         WHERE c.collection_id = $1 FOR UPDATE OF c"
    } else {
        "SELECT c.ckey, c.skey, s.upgrade_id FROM collections c JOIN sessions s ON s.skey = c.skey \
         WHERE c.collection_id = $1"
    };
    db.opt(sql, &[&id])?
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .ok_or_else(|| Error::not_found(format!("collection {id:?}")))
}

fn load_session<C: GenericClient>(db: &mut Db<'_, C>, id: &str) -> Result<TestSession> {
    db.opt(
        &format!("SELECT {SESSION_COLS} FROM sessions s WHERE s.session_id = $1"),
        &[&id],
    )?
    .map(|r| session_row(&r))
    .ok_or_else(|| session_not_found(id))
}

pub(super) fn load_artifact<C: GenericClient>(
    db: &mut Db<'_, C>,
    id: &str,
) -> Result<TestArtifact> {
    match db.opt(
        &format!("{ARTIFACT_SELECT} WHERE a.artifact_id = $1"),
        &[&id],
    )? {
        Some(r) => artifact_row(&r),
        None => Err(Error::not_found(format!("artifact {id:?}"))),
    }
}

/// Whether `e` is PostgreSQL refusing a duplicate key.
fn unique_violation(e: &Error) -> bool {
    let Error::Backend {
        source: Some(source),
        ..
    } = e
    else {
        return false;
    };
    source
        .downcast_ref::<postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| *c == postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Class of the digest advisory locks (two-key locks: a space apart from the one-key
/// migration lock); the second key is the digest's first four bytes.
const DIGEST_LOCK_CLASS: i32 = 0x4555_4131;

/// Class of the advisory locks of an upgrade's first session (two-key locks); the second
/// key is `hashtext(upgrade_id)`.
const FIRST_SESSION_LOCK_CLASS: i32 = 0x4555_4132;

/// Holds the digest's advisory lock to the end of the transaction.
pub(super) fn lock_digest(tx: &mut Tx<'_, '_>, d: &Digest) -> Result<()> {
    let key = i32::from_be_bytes([d.0[0], d.0[1], d.0[2], d.0[3]]);
    tx.exec(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&DIGEST_LOCK_CLASS, &key],
    )?;
    Ok(())
}

/// `name` if free in the collection, else `stem~2.ext`, `stem~3.ext`, ...
fn free_export_name(tx: &mut Tx<'_, '_>, ckey: i64, name: &str) -> Result<String> {
    let taken = |tx: &mut Tx<'_, '_>, n: &str| -> Result<bool> {
        Ok(tx
            .opt(
                "SELECT 1 FROM artifacts WHERE ckey = $1 AND export_name = $2",
                &[&ckey, &n],
            )?
            .is_some())
    };
    if !taken(tx, name)? {
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
        if !taken(tx, &candidate)? {
            return Ok(candidate);
        }
    }
    unreachable!("an unbounded counter finds a free name")
}

/// `s` with `\`, `%` and `_` escaped for `LIKE ... ESCAPE '\'`.
fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// A glob (`*`, `?`, `[...]`, `[!...]`, as SQLite's `GLOB`) as an anchored regular expression.
fn glob_regex(glob: &str) -> String {
    let mut out = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' if glob_class_closes(chars.clone()) => {
                out.push('[');
                if chars.peek() == Some(&'!') {
                    chars.next();
                    out.push('^');
                }
                // A `]` first is a member, as in SQLite.
                if chars.peek() == Some(&']') {
                    chars.next();
                    out.push_str("\\]");
                }
                for c in chars.by_ref() {
                    match c {
                        ']' => break,
                        '\\' | '[' | '^' => {
                            out.push('\\');
                            out.push(c);
                        }
                        c => out.push(c),
                    }
                }
                out.push(']');
            }
            c if c.is_alphanumeric() || c == ' ' => out.push(c),
            c => {
                out.push('\\');
                out.push(c);
            }
        }
    }
    out.push('$');
    out
}

/// Whether a `[` starts a class that a later `]` closes.
fn glob_class_closes(rest: impl Iterator<Item = char>) -> bool {
    let mut first = true;
    let mut negated = false;
    for c in rest {
        if first && c == '!' && !negated {
            negated = true;
            continue;
        }
        if c == ']' && !first {
            return true;
        }
        first = false;
    }
    false
}

/// Builds a search: its SQL and parameters.
fn search_sql<C: GenericClient>(
    db: &mut Db<'_, C>,
    q: &ArtifactQuery,
) -> Result<(String, Vec<Param>)> {
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Param> = Vec::new();
    let mut arg = |v: Param| -> String {
        args.push(v);
        format!("${}", args.len())
    };
    if let Some(c) = &q.cursor {
        // The cursor is the row key of the last artifact of the previous page.
        let after = c.parse::<i64>().ok().filter(|k| *k > 0).ok_or_else(|| {
            Error::invalid(format!(
                "invalid cursor {c:?}: use the next_cursor of a previous page"
            ))
        })?;
        clauses.push(format!("a.akey < {}", arg(Box::new(after))));
    }
    if let Some(id) = &q.session_id {
        let k = session_key(db, id)?;
        clauses.push(format!("a.skey = {}", arg(Box::new(k))));
    }
    if let Some(id) = &q.collection_id {
        let (k, _, _) = collection_key(db, id, false)?;
        clauses.push(format!("a.ckey = {}", arg(Box::new(k))));
    }
    if let Some(u) = &q.upgrade_id {
        clauses.push(format!("a.upgrade_id = {}", arg(Box::new(u.clone()))));
    }
    if let Some(t) = q.artifact_type {
        clauses.push(format!("a.artifact_type = {}", arg(Box::new(t.code()))));
    }
    if let Some(t) = &q.task_id {
        clauses.push(format!("a.task_id = {}", arg(Box::new(t.clone()))));
    }
    if let Some(s) = q.status {
        clauses.push(format!("a.status = {}", arg(Box::new(s.code()))));
    }
    if let Some(min) = q.min_size {
        let min = min.min(i64::MAX as u64) as i64;
        clauses.push(format!("a.file_size >= {}", arg(Box::new(min))));
    }
    if let Some(max) = q.max_size {
        let max = max.min(i64::MAX as u64) as i64;
        clauses.push(format!("a.file_size <= {}", arg(Box::new(max))));
    }
    if let Some(since) = q.created_since {
        clauses.push(format!("a.created_at >= {}", arg(Box::new(micros(since)))));
    }
    for tag in &q.tags {
        clauses.push(format!(
            "a.akey IN (SELECT akey FROM artifact_tags WHERE tag = {})",
            arg(Box::new(tag.clone()))
        ));
    }
    if let Some(name) = q.name.as_deref().filter(|n| !n.is_empty()) {
        let lower = name.to_lowercase();
        if name.contains(['*', '?']) {
            clauses.push(format!(
                "lower(a.name) ~ {}",
                arg(Box::new(glob_regex(&lower)))
            ));
        } else {
            clauses.push(format!(
                "lower(a.name) LIKE {} ESCAPE '\\'",
                arg(Box::new(format!("%{}%", like_escape(&lower))))
            ));
        }
    }
    let mut sql = String::from(ARTIFACT_SELECT);
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

/// The table and column of a kind of id.
fn id_column(kind: IdKind) -> (&'static str, &'static str) {
    match kind {
        IdKind::Session => ("sessions", "session_id"),
        IdKind::Collection => ("collections", "collection_id"),
        IdKind::Artifact => ("artifacts", "artifact_id"),
    }
}

/// The end of the range of ids that start with a prefix.
const PREFIX_END: &str = "chr(1114111)";

impl ArtifactIndex for PostgresStore {
    fn abbreviate(&self, kind: IdKind, id: &str) -> Result<String> {
        let (table, col) = id_column(kind);
        let chars: Vec<char> = id.chars().collect();
        let common = |a: &[char], b: &str| {
            a.iter()
                .zip(b.chars())
                .take_while(|(x, y)| **x == *y)
                .count()
        };
        self.read(|db| {
            // Prefix: longer than what it shares with its neighbours in the unique index.
            let mut need = MIN_PREFIX;
            for sql in [
                format!("SELECT max({col}) FROM {table} WHERE {col} < $1"),
                format!("SELECT min({col}) FROM {table} WHERE {col} > $1"),
            ] {
                let next: Option<String> = db.one(&sql, &[&id])?.get(0);
                if let Some(n) = next {
                    need = need.max(common(&chars, &n) + 1);
                }
            }
            let prefix: String = chars.iter().take(need).collect();
            // Suffix: longer than what it shares with the ids of the same last six characters,
            // and no id's prefix (a prefix match wins when resolving).
            if chars.len() > MIN_SUFFIX {
                let others: Vec<String> = db
                    .query(
                        &format!(
                            "SELECT {col} FROM {table} WHERE right({col}, 6) = right($1, 6) \
                             AND {col} <> $1 LIMIT 100"
                        ),
                        &[&id],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let rev: Vec<char> = chars.iter().rev().copied().collect();
                let mut s = MIN_SUFFIX;
                for o in &others {
                    let o: String = o.chars().rev().collect();
                    s = s.max(common(&rev, &o) + 1);
                }
                if s < need && s < chars.len() {
                    let suffix: String = chars[chars.len() - s..].iter().collect();
                    let prefix_of_some = db
                        .opt(
                            &format!(
                                "SELECT {col} FROM {table} WHERE {col} >= $1 \
                                 AND {col} < $1 || {PREFIX_END} LIMIT 1"
                            ),
                            &[&suffix],
                        )?
                        .is_some();
                    if !prefix_of_some {
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
        self.read(|db| {
            // Exact, then prefix: a range on the unique index of ids.
            let mut found: Vec<String> = db
                .query(
                    &format!(
                        "SELECT {col} FROM {table} WHERE {col} >= $1 AND {col} < $1 || {PREFIX_END} \
                         ORDER BY {col} LIMIT $2"
                    ),
                    &[&abbrev, &limit],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if found.iter().any(|f| f == abbrev) {
                return Ok(abbrev.to_owned());
            }
            if found.is_empty() && abbrev.chars().count() >= MIN_SUFFIX {
                // Suffix: a seek on the index of the ids' last six characters.
                found = db
                    .query(
                        &format!(
                            "SELECT {col} FROM {table} WHERE right({col}, 6) = right($1, 6) \
                             AND right({col}, length($1)) = $1 ORDER BY {col} LIMIT $2"
                        ),
                        &[&abbrev, &limit],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            }
            super::super::one_match(what, abbrev, found)
        })
    }

    fn create_session(&self, s: &TestSession) -> Result<()> {
        crate::artifacts::check_retention_days(s.retention_days)?;
        self.write(|tx| insert_session(tx, s).map(drop))
            .map_err(|e| {
                if unique_violation(&e) {
                    Error::AlreadyExists {
                        what: format!("session {:?}", s.session_id),
                    }
                } else {
                    e
                }
            })
    }

    fn create_first_session(&self, s: &TestSession) -> Result<TestSession> {
        crate::artifacts::check_retention_days(s.retention_days)?;
        self.write(|tx| {
            // Held to the commit, before the read: a concurrent caller for the same upgrade
            // waits here, then (READ COMMITTED: a new statement, a new snapshot) reads the
            // session this one committed.
            tx.exec(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&FIRST_SESSION_LOCK_CLASS, &s.upgrade_id],
            )?;
            let latest = tx
                .opt(
                    &format!(
                        "SELECT {SESSION_COLS} FROM sessions s WHERE s.upgrade_id = $1 \
                         ORDER BY s.skey DESC LIMIT 1"
                    ),
                    &[&s.upgrade_id],
                )?
                .map(|r| session_row(&r));
            if let Some(latest) = latest {
                return Ok(latest);
            }
            insert_session(tx, s)?;
            Ok(s.clone())
        })
    }

    fn session(&self, session_id: &str) -> Result<TestSession> {
        self.read(|db| load_session(db, session_id))
    }

    fn sessions(&self, upgrade_id: Option<&str>) -> Result<Vec<TestSession>> {
        self.read(|db| {
            let rows = match upgrade_id {
                Some(u) => db.query(
                    &format!(
                        "SELECT {SESSION_COLS} FROM sessions s WHERE s.upgrade_id = $1 ORDER BY s.skey"
                    ),
                    &[&u],
                )?,
                None => db.query(
                    &format!("SELECT {SESSION_COLS} FROM sessions s ORDER BY s.skey"),
                    &[],
                )?,
            };
            Ok(rows.iter().map(session_row).collect())
        })
    }

    fn complete_session(&self, session_id: &str, at: DateTime<Utc>) -> Result<TestSession> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE sessions SET completed_at = coalesce(completed_at, $2) WHERE session_id = $1",
                &[&session_id, &micros(at)],
            )?;
            if n == 0 {
                return Err(session_not_found(session_id));
            }
            load_session(tx, session_id)
        })
    }

    fn session_summary(&self, session_id: &str) -> Result<SessionSummary> {
        self.read(|db| {
            let session = load_session(db, session_id)?;
            let skey = session_key(db, session_id)?;
            let collections_count: i64 = db
                .one("SELECT count(*) FROM collections WHERE skey = $1", &[&skey])?
                .get(0);
            let mut artifact_types = BTreeMap::new();
            let (mut total, mut bytes, mut uploaded) = (0u64, 0u64, 0u64);
            for r in db.query(
                "SELECT artifact_type, status, count(*), coalesce(sum(file_size), 0)::BIGINT \
                 FROM artifacts WHERE skey = $1 AND status != $2 GROUP BY artifact_type, status",
                &[&skey, &ArtifactStatus::Deleted.code()],
            )? {
                let ty = ArtifactType::from_code(r.get(0)).unwrap_or(ArtifactType::LogFile);
                let status = ArtifactStatus::from_code(r.get(1));
                let n = r.get::<_, i64>(2) as u64;
                total += n;
                bytes += r.get::<_, i64>(3) as u64;
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
        let taken = || Error::AlreadyExists {
            what: format!("collection {:?} in session {:?}", c.name, c.session_id),
        };
        self.write(|tx| {
            let skey = session_key(tx, &c.session_id)?;
            if tx
                .opt(
                    "SELECT 1 FROM collections WHERE skey = $1 AND name = $2",
                    &[&skey, &c.name],
                )?
                .is_some()
            {
                return Err(taken());
            }
            insert_collection(tx, skey, c).map(drop)
        })
        .map_err(|e| if unique_violation(&e) { taken() } else { e })
    }

    fn collection(&self, collection_id: &str) -> Result<ArtifactCollection> {
        self.read(|db| {
            db.opt(
                &format!(
                    "SELECT {COLLECTION_COLS} FROM collections c JOIN sessions s ON s.skey = c.skey \
                     WHERE c.collection_id = $1"
                ),
                &[&collection_id],
            )?
            .map(|r| collection_row(&r))
            .ok_or_else(|| Error::not_found(format!("collection {collection_id:?}")))
        })
    }

    fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>> {
        self.read(|db| {
            let skey = session_key(db, session_id)?;
            Ok(db
                .query(
                    &format!(
                        "SELECT {COLLECTION_COLS} FROM collections c JOIN sessions s ON s.skey = c.skey \
                         WHERE c.skey = $1 ORDER BY c.ckey"
                    ),
                    &[&skey],
                )?
                .iter()
                .map(collection_row)
                .collect())
        })
    }

    fn insert_artifacts(
        &self,
        artifacts: &[NewArtifact],
        blob_present: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<TestArtifact>> {
        // The bytes are checked before the transaction (no S3 call inside one); a release
        // that finished since the check began refuses the add inside it.
        let checked = self.db_clock()?;
        let mut seen = std::collections::HashSet::new();
        for a in artifacts {
            if seen.insert(a.digest) && !blob_present(&a.digest)? {
                return Err(super::releases::refused(&a.name, &a.digest, false));
            }
        }
        self.write(|tx| {
            let mut out = Vec::with_capacity(artifacts.len());
            let mut locked: HashMap<&str, (i64, i64, String)> = HashMap::new();
            for a in artifacts {
                let (ckey, skey, upgrade_id) = match locked.get(a.collection_id.as_str()) {
                    Some(k) => k.clone(),
                    None => {
                        let k = collection_key(tx, &a.collection_id, true)?;
                        locked.insert(&a.collection_id, k.clone());
                        k
                    }
                };
                let hash = a.digest.to_hex();
                let existing = tx.opt(
                    "SELECT artifact_id FROM artifacts WHERE ckey = $1 AND name = $2 \
                     AND file_hash = $3 AND status != $4",
                    &[&ckey, &a.name, &hash, &ArtifactStatus::Deleted.code()],
                )?;
                if let Some(r) = existing {
                    let id: String = r.get(0);
                    out.push(load_artifact(tx, &id)?);
                    continue;
                }
                // Serialized with any release of this digest until we commit: one in
                // progress, or one that finished after the bytes were checked, is a refusal
                // the add answers by storing them again (G105).
                lock_digest(tx, &a.digest)?;
                if let Some(pending) = super::releases::conflict(tx, &a.digest, checked)? {
                    return Err(super::releases::refused(&a.name, &a.digest, pending));
                }
                let export_name = free_export_name(tx, ckey, &a.name)?;
                let tags = if a.tags.is_empty() {
                    None
                } else {
                    serde_json::to_string(&a.tags).ok()
                };
                let akey: i64 = tx
                    .one(
                        "INSERT INTO artifacts (artifact_id, skey, ckey, name, export_name, description, \
                         artifact_type, file_size, file_hash, status, created_at, task_id, step_id, \
                         upgrade_id, tags, metadata, upload_state) VALUES ($1, $2, $3, $4, $5, $6, \
                         $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) RETURNING akey",
                        &[
                            &a.artifact_id,
                            &skey,
                            &ckey,
                            &a.name,
                            &export_name,
                            &a.description,
                            &a.artifact_type.code(),
                            &(a.file_size.min(i64::MAX as u64) as i64),
                            &hash,
                            &ArtifactStatus::Created.code(),
                            &micros(a.created_at),
                            &a.task_id,
                            &a.step_id,
                            &upgrade_id,
                            &tags,
                            &json_text(&a.metadata),
                            &i64::from(a.queue_upload),
                        ],
                    )?
                    .get(0);
                insert_tags(tx, akey, &a.tags)?;
                out.push(load_artifact(tx, &a.artifact_id)?);
            }
            Ok(out)
        })
    }

    fn artifact(&self, artifact_id: &str) -> Result<TestArtifact> {
        self.read(|db| load_artifact(db, artifact_id))
    }

    fn search(&self, q: &ArtifactQuery) -> Result<ArtifactPage> {
        self.read(|db| {
            let (sql, args) = search_sql(db, q)?;
            let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref()).collect();
            let rows = db.query(&sql, &refs)?;
            let limit = page_limit(q);
            let more = rows.len() > limit;
            let mut out = Vec::with_capacity(rows.len().min(limit));
            let mut last = 0i64;
            for r in rows.iter().take(limit) {
                last = r.get(20);
                out.push(artifact_row(r)?);
            }
            Ok(ArtifactPage {
                artifacts: out,
                next_cursor: more.then(|| last.to_string()),
            })
        })
    }

    fn stats(&self, session_id: Option<&str>) -> Result<ArtifactStats> {
        self.read(|db| {
            let skey = session_id.map(|id| session_key(db, id)).transpose()?;
            let mut stats = ArtifactStats {
                total_artifacts: 0,
                total_size_bytes: 0,
                average_size_bytes: 0.0,
                type_distribution: BTreeMap::new(),
                status_distribution: BTreeMap::new(),
                type_bytes: BTreeMap::new(),
                sessions_searched: 0,
            };
            for r in db.query(
                "SELECT artifact_type, status, count(*), coalesce(sum(file_size), 0)::BIGINT \
                 FROM artifacts WHERE $1::BIGINT IS NULL OR skey = $1 GROUP BY artifact_type, status",
                &[&skey],
            )? {
                let ty = ArtifactType::from_code(r.get(0)).unwrap_or(ArtifactType::LogFile);
                let st = ArtifactStatus::from_code(r.get(1)).unwrap_or(ArtifactStatus::Created);
                let n = r.get::<_, i64>(2) as u64;
                let bytes = r.get::<_, i64>(3) as u64;
                stats.total_artifacts += n;
                stats.total_size_bytes += bytes;
                *stats.type_distribution.entry(ty).or_insert(0) += n;
                *stats.type_bytes.entry(ty).or_insert(0) += bytes;
                *stats.status_distribution.entry(st).or_insert(0) += n;
            }
            if stats.total_artifacts > 0 {
                stats.average_size_bytes =
                    stats.total_size_bytes as f64 / stats.total_artifacts as f64;
            }
            stats.sessions_searched = match skey {
                Some(_) => 1,
                None => db.one("SELECT count(*) FROM sessions", &[])?.get::<_, i64>(0) as u64,
            };
            Ok(stats)
        })
    }

    fn for_each_artifact(
        &self,
        session_id: Option<&str>,
        f: &mut dyn FnMut(TestArtifact) -> Result<()>,
    ) -> Result<()> {
        let skey = self.read(|db| session_id.map(|id| session_key(db, id)).transpose())?;
        let mut after = 0i64;
        loop {
            // One page per statement, so nothing is held while `f` runs.
            let page: Vec<(i64, TestArtifact)> = self.read(|db| {
                db.query(
                    &format!(
                        "{ARTIFACT_SELECT} WHERE a.akey > $1 AND ($2::BIGINT IS NULL OR a.skey = $2) \
                         ORDER BY a.akey LIMIT $3"
                    ),
                    &[&after, &skey, &PAGE],
                )?
                .iter()
                .map(|r| Ok((r.get(20), artifact_row(r)?)))
                .collect()
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
        self.read(|db| {
            let rows = db.query(
                &format!(
                    "SELECT {SESSION_COLS}, coalesce(u.status = $1, false), \
                     (SELECT count(*) FROM artifacts a WHERE a.skey = s.skey), \
                     (SELECT coalesce(sum(file_size), 0)::BIGINT FROM artifacts a WHERE a.skey = s.skey) \
                     FROM sessions s LEFT JOIN upgrades u ON u.upgrade_id = s.upgrade_id \
                     WHERE s.completed_at IS NOT NULL ORDER BY s.completed_at"
                ),
                &[&(ProgressStatus::Failed.index() as i64)],
            )?;
            let mut out = Vec::new();
            for r in &rows {
                let session = session_row(r);
                let failed: bool = r.get(8);
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
                        artifacts: r.get::<_, i64>(9) as u64,
                        bytes: r.get::<_, i64>(10) as u64,
                    });
                }
            }
            Ok(out)
        })
    }

    fn delete_session(&self, session_id: &str) -> Result<Vec<Digest>> {
        self.write(|tx| {
            let skey = session_key(tx, session_id)?;
            let digests = tx
                .query(
                    "SELECT DISTINCT file_hash FROM artifacts WHERE skey = $1",
                    &[&skey],
                )?
                .iter()
                .filter_map(|r| r.get::<_, String>(0).parse::<Digest>().ok())
                .collect();
            // Tags, artifacts and collections go with the session (ON DELETE CASCADE).
            tx.exec("DELETE FROM sessions WHERE skey = $1", &[&skey])?;
            Ok(digests)
        })
    }

    fn delete_session_if_empty(&self, session_id: &str) -> Result<Option<Vec<Digest>>> {
        self.write(|tx| {
            let skey = session_key(tx, session_id)?;
            // Adds lock their collection's row: once we hold them all, an add either
            // committed before (its row is seen below) or waits and then finds no collection.
            tx.query(
                "SELECT 1 FROM collections WHERE skey = $1 ORDER BY ckey FOR UPDATE",
                &[&skey],
            )?;
            let live = tx
                .opt(
                    "SELECT 1 FROM artifacts WHERE skey = $1 AND status != $2 LIMIT 1",
                    &[&skey, &ArtifactStatus::Deleted.code()],
                )?
                .is_some();
            if live {
                return Ok(None);
            }
            let digests = tx
                .query(
                    "SELECT DISTINCT file_hash FROM artifacts WHERE skey = $1",
                    &[&skey],
                )?
                .iter()
                .filter_map(|r| r.get::<_, String>(0).parse::<Digest>().ok())
                .collect();
            tx.exec("DELETE FROM sessions WHERE skey = $1", &[&skey])?;
            Ok(Some(digests))
        })
    }

    fn delete_unreferenced(
        &self,
        digests: &[Digest],
        delete: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<Vec<Digest>> {
        self.release_blobs(digests, delete)
    }

    fn unreferenced(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.unreferenced_digests(digests)
    }

    fn await_blob_release(&self, digest: &Digest, timeout: std::time::Duration) -> Result<()> {
        self.await_release(digest, timeout)
    }

    fn stale_blob_releases(&self) -> Result<Vec<Digest>> {
        self.stale_releases()
    }

    fn artifact_counts_by_task(&self, upgrade_id: &str) -> Result<HashMap<String, u64>> {
        self.read(|db| {
            Ok(db
                .query(
                    "SELECT task_id, count(*) FROM artifacts WHERE upgrade_id = $1 \
                     AND task_id IS NOT NULL AND status != $2 GROUP BY task_id",
                    &[&upgrade_id, &ArtifactStatus::Deleted.code()],
                )?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    fn delete_orphan_reports(
        &self,
        created_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TestArtifact>> {
        let (ty, deleted) = (
            ArtifactType::TestResult.code(),
            ArtifactStatus::Deleted.code(),
        );
        self.write(|tx| {
            let keys: Vec<i64> = tx
                .query(
                    "SELECT a.akey FROM artifacts a WHERE a.artifact_type = $1 \
                     AND a.status <> $2 AND a.created_at < $3 \
                     AND (CASE WHEN strpos(a.metadata, $5) > 0 \
                       THEN jsonb_typeof(a.metadata::jsonb -> $5::text) END) = 'string' \
                     AND NOT EXISTS (SELECT 1 FROM test_runs r \
                       WHERE r.run_id = a.metadata::jsonb ->> $5::text) \
                     ORDER BY a.akey LIMIT $4 FOR UPDATE OF a",
                    &[
                        &ty,
                        &deleted,
                        &micros(created_before),
                        &(limit as i64),
                        &crate::store::PENDING_RUN_KEY,
                    ],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            // Locked now: a `record_run` naming one of them either committed before the lock
            // (its run is seen here: a new statement, a new snapshot) or waits for this
            // transaction and then finds its report deleted.
            let found = tx
                .query(
                    &format!(
                        "{ARTIFACT_SELECT} WHERE a.akey = ANY($1) AND a.status <> $2 \
                         AND strpos(a.metadata, $3) > 0 \
                         AND NOT EXISTS (SELECT 1 FROM test_runs r \
                           WHERE r.run_id = a.metadata::jsonb ->> $3::text) ORDER BY a.akey"
                    ),
                    &[&keys, &deleted, &crate::store::PENDING_RUN_KEY],
                )?
                .iter()
                .map(artifact_row)
                .collect::<Result<Vec<_>>>()?;
            let ids: Vec<&str> = found.iter().map(|a| a.artifact_id.as_str()).collect();
            tx.exec(
                "UPDATE artifacts SET status = $2, upload_state = CASE WHEN upload_state IN (1, 3) \
                 THEN 0 ELSE upload_state END, upload_claimed_by = NULL \
                 WHERE artifact_id = ANY($1)",
                &[&ids, &deleted],
            )?;
            Ok(found)
        })
    }

    fn set_artifact_status(
        &self,
        artifact_id: &str,
        status: ArtifactStatus,
    ) -> Result<TestArtifact> {
        self.write(|tx| {
            let n = tx.exec(
                // A deleted artifact leaves the upload queue: no claim takes it and an
                // uploader's late outcome finds no queued row to settle.
                "UPDATE artifacts SET status = $2, upload_state = CASE WHEN $3 AND \
                 upload_state IN (1, 3) THEN 0 ELSE upload_state END, \
                 upload_claimed_by = CASE WHEN $3 THEN NULL ELSE upload_claimed_by END \
                 WHERE artifact_id = $1",
                &[
                    &artifact_id,
                    &status.code(),
                    &(status == ArtifactStatus::Deleted),
                ],
            )?;
            if n == 0 {
                return Err(Error::not_found(format!("artifact {artifact_id:?}")));
            }
            load_artifact(tx, artifact_id)
        })
    }

    fn import_session(
        &self,
        session: &TestSession,
        collections: &[ArtifactCollection],
        artifacts: &[TestArtifact],
    ) -> Result<()> {
        crate::artifacts::check_retention_days(session.retention_days)?;
        let exists = || Error::AlreadyExists {
            what: format!("session {:?}", session.session_id),
        };
        self.write(|tx| {
            if session_key(tx, &session.session_id).is_ok() {
                return Err(exists());
            }
            import_session_tx(tx, session, collections, artifacts)
        })
        .map_err(|e| if unique_violation(&e) { exists() } else { e })
    }
}

/// Inserts a session row; returns its key.
fn insert_session(tx: &mut Tx<'_, '_>, s: &TestSession) -> Result<i64> {
    Ok(tx
        .one(
            "INSERT INTO sessions (session_id, upgrade_id, cluster_name, name, description, \
             started_at, completed_at, retention_days) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             RETURNING skey",
            &[
                &s.session_id,
                &s.upgrade_id,
                &s.cluster_name,
                &s.name,
                &s.description,
                &micros(s.started_at),
                &s.completed_at.map(micros),
                &i64::from(s.retention_days),
            ],
        )?
        .get(0))
}

/// Inserts a collection row; returns its key.
fn insert_collection(tx: &mut Tx<'_, '_>, skey: i64, c: &ArtifactCollection) -> Result<i64> {
    Ok(tx
        .one(
            "INSERT INTO collections (collection_id, skey, name, description, task_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING ckey",
            &[
                &c.collection_id,
                &skey,
                &c.name,
                &c.description,
                &c.task_id,
                &micros(c.created_at),
            ],
        )?
        .get(0))
}

/// Inserts the tag rows of an artifact.
fn insert_tags(tx: &mut Tx<'_, '_>, akey: i64, tags: &[String]) -> Result<()> {
    for t in tags {
        tx.exec(
            "INSERT INTO artifact_tags (tag, akey) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[t, &akey],
        )?;
    }
    Ok(())
}

fn import_session_tx(
    tx: &mut Tx<'_, '_>,
    s: &TestSession,
    collections: &[ArtifactCollection],
    artifacts: &[TestArtifact],
) -> Result<()> {
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
        let digest = a.file_hash.parse::<Digest>()?;
        if a.status != ArtifactStatus::Deleted {
            // As an add: serialized with releases of the digest, refused during one (G105).
            lock_digest(tx, &digest)?;
            if super::releases::in_progress(tx, &digest)? {
                return Err(Error::Backend {
                    message: format!(
                        "the blob of {:?} (sha256:{digest}) is being released by another \
                         replica (its gc, cleanup or delete); pull the session again",
                        a.name
                    ),
                    source: Some(Box::new(crate::store::BlobReleased(digest))),
                });
            }
        }
        let tags = (!a.tags.is_empty()).then(|| serde_json::to_string(&a.tags).unwrap_or_default());
        let state: i64 = if a.s3_key.is_some() { 2 } else { 0 };
        let akey: i64 = tx
            .one(
                "INSERT INTO artifacts (artifact_id, skey, ckey, name, export_name, description, \
                 artifact_type, file_size, file_hash, status, s3_bucket, s3_key, s3_url, created_at, \
                 uploaded_at, task_id, step_id, upgrade_id, tags, metadata, upload_state) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                 $17, $18, $19, $20, $21) RETURNING akey",
                &[
                    &a.artifact_id,
                    &skey,
                    &ckey,
                    &a.name,
                    &a.export_name,
                    &a.description,
                    &a.artifact_type.code(),
                    &(a.file_size.min(i64::MAX as u64) as i64),
                    &a.file_hash,
                    &a.status.code(),
                    &a.s3_bucket,
                    &a.s3_key,
                    &a.s3_url,
                    &micros(a.created_at),
                    &a.uploaded_at.map(micros),
                    &a.task_id,
                    &a.step_id,
                    &a.upgrade_id,
                    &tags,
                    &json_text(&a.metadata),
                    &state,
                ],
            )?
            .get(0);
        insert_tags(tx, akey, &a.tags)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::postgres::PostgresOptions;
    use crate::test_support::PgCluster;

    /// The artifact index and upload queue suite on PostgreSQL.
    #[test]
    fn conformance() {
        let pg = PgCluster::start();
        let options = PostgresOptions {
            pool_size: 4,
            ..PostgresOptions::default()
        };
        crate::artifacts::conformance::run(&|| {
            let store = Arc::new(PostgresStore::open(&pg.create_database(), &options).unwrap());
            crate::artifacts::conformance::Backend {
                index: store.clone(),
                uploads: store.clone(),
                results: store.clone(),
                progress: store,
            }
        });
    }

    #[test]
    fn globs_become_anchored_regular_expressions() {
        for (glob, re) in [
            ("*.xml", "^.*\\.xml$"),
            ("kubelet-ip-?.log", "^kubelet\\-ip\\-.\\.log$"),
            ("a[bc]*", "^a[bc].*$"),
            ("a[!b]", "^a[^b]$"),
            ("a[", "^a\\[$"),
            ("50%_(x)", "^50\\%\\_\\(x\\)$"),
        ] {
            assert_eq!(glob_regex(glob), re, "{glob}");
        }
    }
}
