//! `store copy` on SQLite: the store read in one read transaction (a snapshot), or written in
//! one write transaction (see `store/copy.rs`). A source without the per-task event chain (a
//! database) gets it rebuilt as its events arrive in `seq` order: each event's
//! `prev_task_seq` is its task's `last_event_seq` so far.

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql, Transaction};

use super::SqliteStore;
use crate::error::{Error, Result};
use crate::store::copy::{
    Cell, CopySource, CopyStore, CopyTarget, Kind, Row, TABLES, Table, refuse_non_empty,
};

impl ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Cell::Null | Cell::Absent => ToSqlOutput::Borrowed(ValueRef::Null),
            Cell::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Cell::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            Cell::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Cell::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

fn cell(v: ValueRef<'_>, kind: Kind, table: &str, column: &str) -> Result<Cell> {
    Ok(match (v, kind) {
        (ValueRef::Null, _) => Cell::Null,
        (ValueRef::Integer(i), Kind::Int) => Cell::Int(i),
        (ValueRef::Integer(i), Kind::Real) => Cell::Real(i as f64),
        (ValueRef::Real(f), Kind::Real) => Cell::Real(f),
        (ValueRef::Text(t), Kind::Text) => {
            Cell::Text(String::from_utf8(t.to_vec()).map_err(|_| Error::Corrupt {
                what: format!(
                    "{table}.{column} holds text that is not UTF-8: fix that row and copy again"
                ),
            })?)
        }
        (ValueRef::Blob(b), Kind::Bytes | Kind::Uuid) => Cell::Bytes(b.to_vec()),
        (v, kind) => {
            return Err(Error::Backend {
                message: format!(
                    "{table}.{column} holds a {:?} where a {kind:?} belongs",
                    v.data_type()
                ),
                source: None,
            });
        }
    })
}

/// Row counts of the tables a user made that hold rows.
fn non_empty(c: &Connection) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for t in TABLES.iter().filter(|t| t.user_data) {
        let n: i64 = c.query_row(&format!("SELECT count(*) FROM {}", t.name), [], |r| {
            r.get(0)
        })?;
        if n > 0 {
            out.push((t.name.to_owned(), n as u64));
        }
    }
    Ok(out)
}

struct Source<'c> {
    c: &'c Connection,
}

impl CopySource for Source<'_> {
    fn page(&mut self, table: &Table, after: Option<&[Cell]>, limit: usize) -> Result<Vec<Row>> {
        let cols: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
        let keys = table.key.join(", ");
        let mut sql = format!("SELECT {} FROM {}", cols.join(", "), table.name);
        if after.is_some() {
            let marks: Vec<String> = (1..=table.key.len()).map(|i| format!("?{i}")).collect();
            sql.push_str(&format!(" WHERE ({keys}) > ({})", marks.join(", ")));
        }
        sql.push_str(&format!(" ORDER BY {keys} LIMIT {limit}"));
        let mut stmt = self.c.prepare_cached(&sql)?;
        let mut rows = match after {
            Some(key) => stmt.query(rusqlite::params_from_iter(key.iter()))?,
            None => stmt.query([])?,
        };
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(cols.len());
            for (i, c) in table.columns.iter().enumerate() {
                row.push(cell(r.get_ref(i)?, c.kind, table.name, c.name)?);
            }
            out.push(row);
        }
        Ok(out)
    }

    fn count(&mut self, table: &Table) -> Result<u64> {
        let n: i64 =
            self.c
                .query_row(&format!("SELECT count(*) FROM {}", table.name), [], |r| {
                    r.get(0)
                })?;
        Ok(n as u64)
    }
}

struct Target<'t, 'c> {
    tx: &'t Transaction<'c>,
}

impl CopyTarget for Target<'_, '_> {
    fn insert(&mut self, table: &Table, rows: &[Row]) -> Result<()> {
        for row in rows {
            // The columns the source had (an absent one takes its default, or is derived).
            let present: Vec<usize> = (0..table.columns.len())
                .filter(|&i| row[i] != Cell::Absent)
                .collect();
            let names: Vec<&str> = present.iter().map(|&i| table.columns[i].name).collect();
            let mut values: Vec<String> = (1..=present.len()).map(|i| format!("?{i}")).collect();
            let mut extra_names = Vec::new();
            let chain = table.name == "events" && row[col(table, "prev_task_seq")] == Cell::Absent;
            if chain {
                let tkey = present
                    .iter()
                    .position(|&i| table.columns[i].name == "tkey")
                    .expect("events have a tkey");
                extra_names.push("prev_task_seq");
                values.push(format!(
                    "(SELECT nullif(last_event_seq, 0) FROM tasks WHERE tkey = ?{})",
                    tkey + 1
                ));
            }
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                table.name,
                names
                    .iter()
                    .chain(extra_names.iter())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
                values.join(", ")
            );
            self.tx
                .prepare_cached(&sql)?
                .execute(rusqlite::params_from_iter(present.iter().map(|&i| &row[i])))?;
            if chain && row[col(table, "tkey")] != Cell::Null {
                self.tx
                    .prepare_cached("UPDATE tasks SET last_event_seq = ?1 WHERE tkey = ?2")?
                    .execute([&row[col(table, "seq")], &row[col(table, "tkey")]])?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        // `seq` and the keys are rowids: the next ones follow the largest copied. Names enter
        // the trigram index.
        super::artifacts::index_names(self.tx, true)
    }
}

fn col(table: &Table, name: &str) -> usize {
    table
        .columns
        .iter()
        .position(|c| c.name == name)
        .expect("a column of the table")
}

impl CopyStore for SqliteStore {
    fn identity(&self) -> Result<String> {
        let path = std::fs::canonicalize(self.path())
            .map_err(|e| Error::backend(format!("cannot resolve {}", self.path().display()), e))?;
        Ok(format!("sqlite {}", path.display()))
    }

    fn non_empty(&self) -> Result<Vec<(String, u64)>> {
        self.read(non_empty)
    }

    fn read_snapshot(&self, f: &mut dyn FnMut(&mut dyn CopySource) -> Result<()>) -> Result<()> {
        self.read(|c| {
            // A copy reads each page once: a small page cache for it, so memory does not grow
            // with the store up to the reader's usual cache.
            let cache: i64 = c.pragma_query_value(None, "cache_size", |r| r.get(0))?;
            c.pragma_update(None, "cache_size", -1000)?;
            // One read transaction: every page sees the same commit.
            let out = c
                .execute_batch("BEGIN")
                .map_err(Error::from)
                .and_then(|()| {
                    let out = f(&mut Source { c });
                    let end = c.execute_batch(if out.is_ok() { "COMMIT" } else { "ROLLBACK" });
                    out?;
                    Ok(end?)
                });
            c.pragma_update(None, "cache_size", cache)?;
            out
        })
    }

    fn write_all(&self, f: &mut dyn FnMut(&mut dyn CopyTarget) -> Result<()>) -> Result<()> {
        self.write(|tx| {
            refuse_non_empty(non_empty(tx)?)?;
            f(&mut Target { tx })
        })
    }
}

/// What the store in the data dir `dir` holds, read without changing it (opened read-only, no
/// migration): its schema version and the row counts of the copied tables that exist there and
/// hold rows; `None` when there is no store file. A copy checks this before it creates or
/// migrates the target, so a refusal changes nothing.
pub fn probe_target(dir: &std::path::Path) -> Result<Option<(i64, crate::store::copy::RowCounts)>> {
    let path = dir.join(super::DB_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let c = Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let mut out = Vec::new();
    for t in TABLES.iter().filter(|t| t.user_data) {
        let exists: bool = c.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [t.name],
            |r| r.get(0),
        )?;
        if !exists {
            continue;
        }
        let n: i64 = c.query_row(&format!("SELECT count(*) FROM {}", t.name), [], |r| {
            r.get(0)
        })?;
        if n > 0 {
            out.push((t.name.to_owned(), n as u64));
        }
    }
    Ok(Some((version, out)))
}
