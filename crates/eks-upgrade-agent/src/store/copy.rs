//! `store copy`: a whole store (a data dir's SQLite file or a PostgreSQL database) copied into
//! another, empty one, every table with its identity (keys, `seq`s, event ids).
//!
//! The portable row model is one table list, [`TABLES`], shared by both backends: each table's
//! columns with their [`Kind`], its key (the order rows are read in) and the columns only one
//! backend has (`prev_task_seq`/`last_event_seq`, SQLite's per-task event chain, which the
//! PostgreSQL backend replaces by an index; work leases, which are reset). A row is a list of
//! [`Cell`]s in the table's column order ([`Cell::Absent`] where the source backend has no such
//! column). Each backend implements [`CopySource`] (pages of rows in key order, inside one
//! read snapshot) and [`CopyTarget`] (inserts inside one write transaction, then its
//! counters); [`copy`] drives them and the artifact bytes.
//!
//! Not copied: PostgreSQL's `blob_releases` (schema 9), the marks of blob deletions in
//! progress. They belong to the source's deleting processes, and the digest a mark names has
//! no live artifact (a mark is set only when none references it, and no add commits while it
//! is there), so its bytes are never copied: only `deleted` rows name it, and those move
//! without bytes.
//!
//! Memory: one page ([`PAGE`] rows at most) of one table at a time, whatever the table sizes.
//! Atomicity: the target writes everything in one transaction, so a copy that fails (or is
//! killed) midway leaves the target as it was: empty. Artifact bytes are content-addressed, so
//! blobs put before a failure are harmless (a rerun finds them and skips them).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blob::{BlobStore, Digest};
use crate::error::{Error, Result};

/// Rows per page read from the source and per insert batch on the target.
pub const PAGE: usize = 1000;

/// How a column's values are typed on the wire between backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 64-bit integer (SQLite `INTEGER`, PostgreSQL `BIGINT`).
    Int,
    /// Double (SQLite `REAL`, PostgreSQL `DOUBLE PRECISION`).
    Real,
    /// Text.
    Text,
    /// Bytes (SQLite `BLOB`, PostgreSQL `BYTEA`).
    Bytes,
    /// A UUID (SQLite: 16 bytes in a `BLOB`; PostgreSQL `UUID`).
    Uuid,
}

/// Which backends have a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// Both.
    Both,
    /// Only SQLite (PostgreSQL derives it another way).
    Sqlite,
}

/// One column of a copied table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Its name (the same on both backends).
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Which backends have it.
    pub only: Only,
}

/// One copied table.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Its name (the same on both backends).
    pub name: &'static str,
    /// The primary key's columns: rows are read in this order, a page after the last key.
    pub key: &'static [&'static str],
    /// Its columns.
    pub columns: &'static [Column],
    /// Whether the emptiness check of a target counts it (the tables a store's user made:
    /// anything but the derived ones).
    pub user_data: bool,
}

impl Table {
    /// Positions of the key's columns in [`Table::columns`].
    pub fn key_indexes(&self) -> Vec<usize> {
        self.key
            .iter()
            .map(|k| {
                self.columns
                    .iter()
                    .position(|c| c.name == *k)
                    .expect("a key column is a column")
            })
            .collect()
    }

    /// The columns `backend` has.
    pub fn columns_of(&self, sqlite: bool) -> impl Iterator<Item = (usize, &Column)> {
        self.columns
            .iter()
            .enumerate()
            .filter(move |(_, c)| sqlite || c.only == Only::Both)
    }
}

/// One value of a portable row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A double.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes (UUIDs too, as their 16 bytes).
    Bytes(Vec<u8>),
    /// The source backend has no such column (the target derives it or uses its default).
    Absent,
}

impl Cell {
    /// The text, if it is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// A row: one cell per column of its table, in order.
pub type Row = Vec<Cell>;

macro_rules! cols {
    ($($name:ident : $kind:ident $(@ $only:ident)?),* $(,)?) => {
        &[$(Column {
            name: stringify!($name),
            kind: Kind::$kind,
            only: cols!(@only $($only)?),
        }),*]
    };
    (@only) => { Only::Both };
    (@only $only:ident) => { Only::$only };
}

/// Every copied table, in the order they are copied (a table after those it refers to: tasks
/// before events, whose chain a SQLite target derives from them).
pub const TABLES: &[Table] = &[
    Table {
        name: "upgrades",
        key: &["ukey"],
        user_data: true,
        columns: cols!(ukey: Int, upgrade_id: Text, plan_id: Text, cluster_name: Text,
            status: Int, current_phase: Text, created_at: Int, started_at: Int,
            completed_at: Int, error_message: Text, metadata: Text, top_weight: Real,
            top_sum: Real, c0: Int, c1: Int, c2: Int, c3: Int, c4: Int, c5: Int, last_seq: Int),
    },
    Table {
        name: "tasks",
        key: &["tkey"],
        user_data: true,
        columns: cols!(tkey: Int, ukey: Int, task_id: Text, name: Text, task_type: Int,
            parent_tkey: Int, parent_task_id: Text, depth: Int, status: Int, percentage: Real,
            current_step: Text, total_steps: Int, completed_steps: Int, weight: Real,
            children: Int, child_weight: Real, child_sum: Real, error_message: Text,
            retry_count: Int, last_message: Text, created_at: Int, started_at: Int,
            completed_at: Int, duration: Real, metadata: Text, k0: Int, k1: Int, k2: Int,
            k3: Int, k4: Int, k5: Int, last_event_seq: Int @ Sqlite),
    },
    Table {
        name: "events",
        key: &["seq"],
        user_data: true,
        columns: cols!(seq: Int, event_id: Uuid, ukey: Int, tkey: Int, kind: Int, status: Int,
            ts: Int, message: Text, details: Text, percentage: Real,
            prev_task_seq: Int @ Sqlite),
    },
    Table {
        name: "task_history",
        key: &["task_id", "cluster"],
        user_data: false,
        columns: cols!(task_id: Text, cluster: Text, total: Int, samples: Bytes,
            step_samples: Bytes),
    },
    Table {
        name: "sessions",
        key: &["skey"],
        user_data: true,
        columns: cols!(skey: Int, session_id: Text, upgrade_id: Text, cluster_name: Text,
            name: Text, description: Text, started_at: Int, completed_at: Int,
            retention_days: Int),
    },
    Table {
        name: "collections",
        key: &["ckey"],
        user_data: true,
        columns: cols!(ckey: Int, collection_id: Text, skey: Int, name: Text,
            description: Text, task_id: Text, created_at: Int),
    },
    // Upload claims (`upload_claimed_by`, `upload_lease_until`) are not copied: they belong to
    // processes of the source; the target's uploaders may take every queued entry.
    Table {
        name: "artifacts",
        key: &["akey"],
        user_data: true,
        columns: cols!(akey: Int, artifact_id: Text, skey: Int, ckey: Int, name: Text,
            export_name: Text, description: Text, artifact_type: Int, file_size: Int,
            file_hash: Text, status: Int, s3_bucket: Text, s3_key: Text, s3_url: Text,
            created_at: Int, uploaded_at: Int, task_id: Text, step_id: Text, upgrade_id: Text,
            tags: Text, metadata: Text, upload_state: Int, upload_attempts: Int,
            upload_next_at: Int, upload_error: Text),
    },
    Table {
        name: "artifact_tags",
        key: &["tag", "akey"],
        user_data: false,
        columns: cols!(tag: Text, akey: Int),
    },
    Table {
        name: "notifications",
        key: &["nid"],
        user_data: true,
        columns: cols!(nid: Int, event_id: Text, seq: Int, upgrade_id: Text, detail_type: Text,
            time: Int, detail: Text),
    },
    Table {
        name: "sink_cursors",
        key: &["sink"],
        user_data: false,
        columns: cols!(sink: Text, upto: Int),
    },
    // Delivery leases (PostgreSQL's `lease_owner`, `lease_until`) are not copied either.
    Table {
        name: "deliveries",
        key: &["sink", "nid"],
        user_data: false,
        columns: cols!(sink: Text, nid: Int, status: Int, attempts: Int, next_at: Int,
            last_error: Text, updated_at: Int),
    },
    Table {
        name: "test_runs",
        key: &["rkey"],
        user_data: true,
        columns: cols!(rkey: Int, run_id: Text, upgrade_id: Text, cluster_name: Text,
            phase: Int, created_at: Int, suites: Text, files: Text, artifact_ids: Text,
            tests: Int, passed: Int, failed: Int, errors: Int, skipped: Int, flaky: Int,
            duration: Real, started_at: Int, ended_at: Int),
    },
    Table {
        name: "test_cases",
        key: &["ckey"],
        user_data: false,
        columns: cols!(ckey: Int, test_id: Text, framework: Text, suite: Text,
            classname: Text, name: Text),
    },
    Table {
        name: "test_results",
        key: &["rkey", "ckey"],
        user_data: false,
        columns: cols!(rkey: Int, ckey: Int, cluster: Text, status: Int, attempts: Int,
            fails: Int, duration: Real, message: Text),
    },
    Table {
        name: "test_stats",
        key: &["cluster", "ckey"],
        user_data: false,
        columns: cols!(cluster: Text, ckey: Int, last_pass_at: Int, last_fail_at: Int,
            pass_streak: Int, message: Text, both_at: Int, prev_pass_at: Int,
            prev_fail_at: Int, prev_streak: Int),
    },
];

/// The table families `store info` counts on both backends: every copied table.
pub fn table_names() -> impl Iterator<Item = &'static str> {
    TABLES.iter().map(|t| t.name)
}

/// A store read in one snapshot: pages of rows in key order.
pub trait CopySource {
    /// Rows of `table` in key order after the key `after` (from the start when `None`), at
    /// most `limit`.
    fn page(&mut self, table: &Table, after: Option<&[Cell]>, limit: usize) -> Result<Vec<Row>>;

    /// Number of rows of `table` (for progress).
    fn count(&mut self, table: &Table) -> Result<u64>;
}

/// A store written in one transaction.
pub trait CopyTarget {
    /// Inserts `rows` of `table` (at most [`PAGE`]).
    fn insert(&mut self, table: &Table, rows: &[Row]) -> Result<()>;

    /// After every table: counters and derived state (the next `seq` and keys, indexes).
    fn finish(&mut self) -> Result<()>;
}

/// A store a copy can read (a snapshot) or write (one transaction), and how to tell two apart.
pub trait CopyStore {
    /// A string naming this store's storage (a canonical path; a server and database), so a
    /// copy onto itself is refused.
    fn identity(&self) -> Result<String>;

    /// Row counts of the tables a user made that hold rows (a target must have none).
    fn non_empty(&self) -> Result<Vec<(String, u64)>>;

    /// Runs `f` over a read snapshot of the whole store.
    fn read_snapshot(&self, f: &mut dyn FnMut(&mut dyn CopySource) -> Result<()>) -> Result<()>;

    /// Runs `f` in one write transaction, committed when it returns `Ok` after an emptiness
    /// check inside the transaction (an error listing what is there otherwise).
    fn write_all(&self, f: &mut dyn FnMut(&mut dyn CopyTarget) -> Result<()>) -> Result<()>;
}

/// Progress of a copy, per table (a bar on a terminal).
pub trait CopyProgress {
    /// `table` starts; `total` rows (or bytes for `blobs`).
    fn start(&mut self, table: &str, total: u64);
    /// `n` more rows (bytes) done.
    fn advance(&mut self, n: u64);
    /// `table` is done.
    fn done(&mut self, table: &str);
}

/// A [`CopyProgress`] that shows nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl CopyProgress for NoProgress {
    fn start(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn done(&mut self, _: &str) {}
}

/// Where artifact bytes come from and go. A store without one configured (`None`) can copy
/// only when there are no artifacts: the error is then the hint.
#[derive(Debug, Clone)]
pub struct Blobs {
    /// The source's blob store, or what to tell the user when it is missing.
    pub from: std::result::Result<Arc<dyn BlobStore>, String>,
    /// The target's blob store, or what to tell the user when it is missing.
    pub to: std::result::Result<Arc<dyn BlobStore>, String>,
}

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// Rows per table, in [`TABLES`] order.
    pub tables: Vec<(String, u64)>,
    /// Blobs written to the target.
    pub blobs_copied: u64,
    /// Blobs the target already had (skipped).
    pub blobs_present: u64,
    /// Artifact rows copied without bytes: deleted ones, and uploaded ones whose bytes are only
    /// in their S3 object (the target reads them there, as the source does).
    #[serde(default)]
    pub blobs_skipped: u64,
    /// Bytes written to the target's blob store.
    pub blob_bytes: u64,
}

/// Copies every table of `from` into `to` (which must be empty and not `from`), and the
/// artifact bytes between `blobs`. The target's transaction commits only when everything is
/// there; an error leaves it unchanged.
pub fn copy(
    from: &dyn CopyStore,
    to: &dyn CopyStore,
    blobs: &Blobs,
    progress: &mut dyn CopyProgress,
) -> Result<CopyReport> {
    copy_paged(from, to, blobs, progress, PAGE)
}

/// [`copy`] with pages of `page` rows (tests: small pages make every table span several).
pub(crate) fn copy_paged(
    from: &dyn CopyStore,
    to: &dyn CopyStore,
    blobs: &Blobs,
    progress: &mut dyn CopyProgress,
    page: usize,
) -> Result<CopyReport> {
    let page = page.clamp(1, PAGE);
    let (a, b) = (from.identity()?, to.identity()?);
    if a == b {
        return Err(Error::invalid(format!(
            "the target is the source store itself ({a}): give another database or an empty \
             data dir to --to"
        )));
    }
    // A clear refusal before the long part; `write_all` checks again in its transaction.
    refuse_non_empty(to.non_empty()?)?;
    let mut report = CopyReport::default();
    from.read_snapshot(&mut |src| {
        to.write_all(&mut |dst| {
            report = CopyReport::default();
            for table in TABLES {
                let n = copy_table(src, dst, table, blobs, &mut report, progress, page)?;
                report.tables.push((table.name.to_owned(), n));
            }
            dst.finish()
        })
    })?;
    Ok(report)
}

/// Row counts by table name.
pub type RowCounts = Vec<(String, u64)>;

/// The refusal of a target holding rows.
pub fn refuse_non_empty(found: Vec<(String, u64)>) -> Result<()> {
    if found.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = found.iter().map(|(t, n)| format!("{t}: {n}")).collect();
    Err(Error::invalid(format!(
        "the target is not empty ({}): copy into a new database or an empty data dir",
        what.join(", ")
    )))
}

fn copy_table(
    src: &mut dyn CopySource,
    dst: &mut dyn CopyTarget,
    table: &Table,
    blobs: &Blobs,
    report: &mut CopyReport,
    progress: &mut dyn CopyProgress,
    page: usize,
) -> Result<u64> {
    let total = src.count(table)?;
    progress.start(table.name, total);
    let keys = table.key_indexes();
    let mut after: Option<Vec<Cell>> = None;
    let mut n = 0u64;
    loop {
        let rows = src.page(table, after.as_deref(), page)?;
        if rows.is_empty() {
            break;
        }
        debug_assert!(rows.len() <= page);
        if table.name == "artifacts" {
            copy_bytes(table, &rows, blobs, report)?;
        }
        dst.insert(table, &rows)?;
        n += rows.len() as u64;
        progress.advance(rows.len() as u64);
        let last = rows.last().expect("a page that is not empty");
        after = Some(keys.iter().map(|&i| last[i].clone()).collect());
        if rows.len() < page {
            break;
        }
    }
    progress.done(table.name);
    Ok(n)
}

/// Puts the bytes of a page of artifact rows into the target's blob store (before the rows:
/// an artifact row is only ever committed after its blob exists), skipping those there.
fn copy_bytes(table: &Table, rows: &[Row], blobs: &Blobs, report: &mut CopyReport) -> Result<()> {
    let col = |name: &str| {
        table
            .columns
            .iter()
            .position(|c| c.name == name)
            .expect("an artifacts column")
    };
    let (hash, id) = (col("file_hash"), col("artifact_id"));
    let (status, s3_key) = (col("status"), col("s3_key"));
    for row in rows {
        let (Some(hex), Some(artifact)) = (row[hash].as_text(), row[id].as_text()) else {
            return Err(Error::invalid("an artifact row without a file hash"));
        };
        // A deleted artifact keeps its row as a record, its bytes are gone: the row moves alone.
        if row[status] == Cell::Int(crate::model::ArtifactStatus::Deleted.code()) {
            report.blobs_skipped += 1;
            continue;
        }
        let digest: Digest = hex.parse()?;
        let (from, to) = match (&blobs.from, &blobs.to) {
            (Ok(from), Ok(to)) => (from, to),
            (Err(hint), _) | (_, Err(hint)) => return Err(Error::invalid(hint.clone())),
        };
        // An uploaded artifact with no local blob (uploaded then cleaned, or indexed by a lazy
        // `artifacts pull`) is read from its S3 object, as on the source: the row moves alone,
        // keeping its bucket and key.
        if row[s3_key].as_text().is_some() && !from.exists(&digest)? {
            report.blobs_skipped += 1;
            continue;
        }
        // A blob already on the target is not trusted: it is read and hashed; a wrong one is
        // replaced by the source's bytes.
        if to.exists(&digest)? {
            match to
                .open_uncached(&digest)
                .and_then(|mut r| crate::blob::drain_verified(&mut r))
            {
                Ok(_) => {
                    report.blobs_present += 1;
                    continue;
                }
                Err(Error::Corrupt { .. }) => {
                    to.delete(&digest)?;
                }
                Err(e) => return Err(e),
            }
        }
        let mut reader = from.open_uncached(&digest).map_err(|e| match e {
            Error::NotFound { .. } => Error::invalid(format!(
                "the bytes of artifact {artifact} (sha256 {hex}) are missing from the source's \
                 blob store: restore them (or delete the artifact) and copy again"
            )),
            e => e,
        })?;
        // The source's reader verifies the digest as it ends; the target hashes what it stores.
        let info = to.put(&mut reader, &mut |_| {})?;
        if info.digest != digest {
            return Err(Error::Corrupt {
                what: format!(
                    "artifact {artifact}: the copied bytes hash to {}, not {hex}",
                    info.digest.to_hex()
                ),
            });
        }
        report.blobs_copied += u64::from(info.created);
        report.blobs_present += u64::from(!info.created);
        report.blob_bytes += info.size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::store::ProgressStore;
    use crate::store::domain::command::Command;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};

    /// Columns a copy leaves out on purpose (`table.column`): claims that belong to the
    /// source's processes. Any other column of a copied table must be in [`TABLES`], so a
    /// column a later migration adds is not dropped by a copy without anyone noticing.
    const NOT_COPIED: &[&str] = &[
        "artifacts.upload_claimed_by",
        "artifacts.upload_lease_until",
        "deliveries.lease_owner",
        "deliveries.lease_until",
    ];

    /// `(table, column)` pairs of the database that [`TABLES`] (for that backend) does not
    /// list, and those it lists that the database lacks.
    fn drift(
        columns_of: &mut dyn FnMut(&str) -> Vec<String>,
        sqlite: bool,
    ) -> (Vec<String>, Vec<String>) {
        let (mut unknown, mut missing) = (Vec::new(), Vec::new());
        for t in TABLES {
            let actual = columns_of(t.name);
            assert!(!actual.is_empty(), "no table {}", t.name);
            let listed: Vec<&str> = t
                .columns
                .iter()
                .filter(|c| sqlite || c.only == Only::Both)
                .map(|c| c.name)
                .collect();
            for c in &actual {
                let full = format!("{}.{c}", t.name);
                if !listed.contains(&c.as_str()) && !NOT_COPIED.contains(&full.as_str()) {
                    unknown.push(full);
                }
            }
            for c in listed {
                if !actual.iter().any(|a| a == c) {
                    missing.push(format!("{}.{c}", t.name));
                }
            }
        }
        (unknown, missing)
    }

    #[test]
    fn the_copied_columns_are_every_column_of_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteOptions::default()).unwrap();
        let (unknown, missing) = drift(
            &mut |table| {
                store
                    .read(|c| {
                        let mut stmt = c.prepare(&format!("PRAGMA table_info({table})"))?;
                        let names = stmt
                            .query_map([], |r| r.get::<_, String>(1))?
                            .collect::<rusqlite::Result<Vec<_>>>()?;
                        Ok(names)
                    })
                    .unwrap()
            },
            true,
        );
        assert_eq!(unknown, Vec::<String>::new(), "columns a copy would drop");
        assert_eq!(
            missing,
            Vec::<String>::new(),
            "listed columns the schema lacks"
        );
    }

    #[test]
    fn the_copied_columns_are_every_column_of_postgres() {
        let pg = crate::test_support::PgCluster::start();
        let url = pg.create_database();
        let store = crate::store::postgres::PostgresStore::open(
            &url,
            &crate::store::postgres::PostgresOptions::default(),
        )
        .unwrap();
        drop(store);
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let (unknown, missing) = drift(
            &mut |table| {
                client
                    .query(
                        "SELECT column_name::text FROM information_schema.columns \
                         WHERE table_schema = current_schema() AND table_name = $1 \
                         ORDER BY ordinal_position",
                        &[&table],
                    )
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            },
            false,
        );
        assert_eq!(unknown, Vec::<String>::new(), "columns a copy would drop");
        assert_eq!(
            missing,
            Vec::<String>::new(),
            "listed columns the schema lacks"
        );
    }

    #[test]
    fn every_key_is_a_column_and_only_sqlite_columns_are_never_keys() {
        for t in TABLES {
            for i in t.key_indexes() {
                assert_eq!(t.columns[i].only, Only::Both, "{}", t.name);
            }
            // A PostgreSQL page insert binds one parameter per cell: at most 65,535.
            assert!(t.columns.len() * PAGE <= 65_535, "{}", t.name);
        }
    }

    /// The largest page each side saw, and how many pages of events the source gave.
    #[derive(Default)]
    struct Seen {
        largest_read: usize,
        largest_insert: usize,
        event_pages: usize,
    }

    /// A store that records the pages going through it.
    struct Watched<'a> {
        store: &'a SqliteStore,
        seen: &'a RefCell<Seen>,
    }

    struct WatchedSource<'a, 'b> {
        inner: &'b mut dyn CopySource,
        seen: &'a RefCell<Seen>,
    }

    impl CopySource for WatchedSource<'_, '_> {
        fn page(&mut self, t: &Table, after: Option<&[Cell]>, limit: usize) -> Result<Vec<Row>> {
            let rows = self.inner.page(t, after, limit)?;
            let mut seen = self.seen.borrow_mut();
            seen.largest_read = seen.largest_read.max(rows.len());
            seen.event_pages += usize::from(t.name == "events");
            Ok(rows)
        }
        fn count(&mut self, t: &Table) -> Result<u64> {
            self.inner.count(t)
        }
    }

    struct WatchedTarget<'a, 'b> {
        inner: &'b mut dyn CopyTarget,
        seen: &'a RefCell<Seen>,
    }

    impl CopyTarget for WatchedTarget<'_, '_> {
        fn insert(&mut self, t: &Table, rows: &[Row]) -> Result<()> {
            let mut seen = self.seen.borrow_mut();
            seen.largest_insert = seen.largest_insert.max(rows.len());
            drop(seen);
            self.inner.insert(t, rows)
        }
        fn finish(&mut self) -> Result<()> {
            self.inner.finish()
        }
    }

    impl CopyStore for Watched<'_> {
        fn identity(&self) -> Result<String> {
            self.store.identity()
        }
        fn non_empty(&self) -> Result<Vec<(String, u64)>> {
            self.store.non_empty()
        }
        fn read_snapshot(
            &self,
            f: &mut dyn FnMut(&mut dyn CopySource) -> Result<()>,
        ) -> Result<()> {
            self.store.read_snapshot(&mut |inner| {
                f(&mut WatchedSource {
                    inner,
                    seen: self.seen,
                })
            })
        }
        fn write_all(&self, f: &mut dyn FnMut(&mut dyn CopyTarget) -> Result<()>) -> Result<()> {
            self.store.write_all(&mut |inner| {
                f(&mut WatchedTarget {
                    inner,
                    seen: self.seen,
                })
            })
        }
    }

    fn command(json: serde_json::Value) -> Command {
        serde_json::from_value(json).unwrap()
    }

    /// Text that is not UTF-8 stops the copy with the column named; it is not rewritten.
    #[test]
    fn text_that_is_not_utf8_stops_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let from = SqliteStore::open(&dir.path().join("a"), &SqliteOptions::default()).unwrap();
        let create = command(
            serde_json::json!({"op": "upgrade.create", "upgrade_id": "u",
            "plan_id": "p", "cluster_name": "k"}),
        );
        for r in from.execute(&[create]).unwrap() {
            r.unwrap();
        }
        drop(from);
        let raw =
            rusqlite::Connection::open(dir.path().join("a").join(crate::store::sqlite::DB_FILE))
                .unwrap();
        raw.execute("UPDATE upgrades SET plan_id = CAST(x'70ff' AS TEXT)", [])
            .unwrap();
        drop(raw);
        let from = SqliteStore::open(&dir.path().join("a"), &SqliteOptions::default()).unwrap();
        let to = SqliteStore::open(&dir.path().join("b"), &SqliteOptions::default()).unwrap();
        let blobs = Blobs {
            from: Err("no blobs".into()),
            to: Err("no blobs".into()),
        };
        let err = copy(&from, &to, &blobs, &mut NoProgress).unwrap_err();
        assert!(err.to_string().contains("upgrades.plan_id"), "{err}");
        assert!(to.non_empty().unwrap().is_empty());
    }

    /// Memory stays flat: a copy holds one page of one table at a time, whatever the size of
    /// the tables (events here span several pages).
    #[test]
    fn a_copy_reads_and_writes_bounded_pages() {
        let dir = tempfile::tempdir().unwrap();
        let from = SqliteStore::open(&dir.path().join("a"), &SqliteOptions::default()).unwrap();
        let mut commands = vec![
            command(
                serde_json::json!({"op": "upgrade.create", "upgrade_id": "u",
                "plan_id": "p", "cluster_name": "k"}),
            ),
            command(
                serde_json::json!({"op": "task.add", "upgrade_id": "u", "task_id": "t",
                "name": "T", "task_type": "upgrade_step"}),
            ),
        ];
        for k in 0..2 * PAGE + 500 {
            commands.push(command(
                serde_json::json!({"op": "task.update", "upgrade_id": "u",
                "task_id": "t", "percentage": (k % 100) as f64}),
            ));
        }
        for r in from.execute(&commands).unwrap() {
            r.unwrap();
        }
        let events = from.counts().unwrap()[2].1;
        assert!(events > 2 * PAGE as u64, "{events}");
        let to = SqliteStore::open(&dir.path().join("b"), &SqliteOptions::default()).unwrap();
        let seen = RefCell::new(Seen::default());
        let blobs = Blobs {
            from: Err("no blobs".into()),
            to: Err("no blobs".into()),
        };
        let report = copy(
            &Watched {
                store: &from,
                seen: &seen,
            },
            &Watched {
                store: &to,
                seen: &seen,
            },
            &blobs,
            &mut NoProgress,
        )
        .unwrap();
        let seen = seen.into_inner();
        assert_eq!(seen.largest_read, PAGE);
        assert_eq!(seen.largest_insert, PAGE);
        assert_eq!(seen.event_pages, (events as usize).div_ceil(PAGE));
        assert_eq!(report.tables[2], ("events".to_owned(), events));
        assert_eq!(to.counts().unwrap(), from.counts().unwrap());
    }
}
