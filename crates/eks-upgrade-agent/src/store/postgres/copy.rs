//! `store copy` on PostgreSQL: the database read in one `REPEATABLE READ READ ONLY`
//! transaction (a snapshot), or written in one transaction that first locks every copied table
//! against other writers (see `store/copy.rs`). Rows go in as multi-row `INSERT`s of one page;
//! at the end the key sequences and the `seq` counter move past the copied rows, so new writes
//! continue after them.

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use uuid::Uuid;

use super::progress::{Conn, Db, PostgresStore};
use crate::error::{Error, Result};
use crate::store::copy::{
    Cell, CopySource, CopyStore, CopyTarget, Kind, Row, TABLES, Table, refuse_non_empty,
};

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null | Cell::Absent => Ok(IsNull::Yes),
            Cell::Int(v) => v.to_sql(ty, out),
            Cell::Real(v) => v.to_sql(ty, out),
            Cell::Text(s) => s.to_sql(ty, out),
            Cell::Bytes(b) if *ty == Type::UUID => Uuid::from_slice(b)?.to_sql(ty, out),
            Cell::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [
            Type::INT8,
            Type::FLOAT8,
            Type::TEXT,
            Type::BYTEA,
            Type::UUID,
        ]
        .contains(ty)
    }

    to_sql_checked!();
}

/// The key columns that are sequences (`BIGSERIAL`), moved past the copied rows.
const SERIALS: &[(&str, &str)] = &[
    ("upgrades", "ukey"),
    ("tasks", "tkey"),
    ("notifications", "nid"),
    ("sessions", "skey"),
    ("collections", "ckey"),
    ("artifacts", "akey"),
    ("test_runs", "rkey"),
    ("test_cases", "ckey"),
];

/// What names a database: the server (its port and start time), the database and schema.
const IDENTITY: &str = "SELECT current_setting('port'), pg_postmaster_start_time()::text, \
                        current_database()::text, current_schema()::text";

fn identity(r: &postgres::Row) -> String {
    format!(
        "postgresql server started {} on port {}, database {}, schema {}",
        r.get::<_, String>(1),
        r.get::<_, String>(0),
        r.get::<_, String>(2),
        r.get::<_, String>(3)
    )
}

/// Row counts of the tables a user made that hold rows.
fn non_empty<C: postgres::GenericClient>(db: &mut Db<'_, C>) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for t in TABLES.iter().filter(|t| t.user_data) {
        let n: i64 = db
            .one(&format!("SELECT count(*) FROM {}", t.name), &[])?
            .get(0);
        if n > 0 {
            out.push((t.name.to_owned(), n as u64));
        }
    }
    Ok(out)
}

/// The columns this backend has, by position in the table.
fn columns(table: &Table) -> Vec<usize> {
    table.columns_of(false).map(|(i, _)| i).collect()
}

struct Source<'a, 'c> {
    db: Db<'a, postgres::Transaction<'c>>,
}

impl CopySource for Source<'_, '_> {
    fn page(&mut self, table: &Table, after: Option<&[Cell]>, limit: usize) -> Result<Vec<Row>> {
        let cols = columns(table);
        let names: Vec<&str> = cols.iter().map(|&i| table.columns[i].name).collect();
        let keys = table.key.join(", ");
        let mut sql = format!("SELECT {} FROM {}", names.join(", "), table.name);
        if after.is_some() {
            let marks: Vec<String> = (1..=table.key.len()).map(|i| format!("${i}")).collect();
            sql.push_str(&format!(" WHERE ({keys}) > ({})", marks.join(", ")));
        }
        sql.push_str(&format!(" ORDER BY {keys} LIMIT {limit}"));
        let params: Vec<&(dyn ToSql + Sync)> = after
            .unwrap_or_default()
            .iter()
            .map(|c| c as &(dyn ToSql + Sync))
            .collect();
        let rows = self.db.query(&sql, &params)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = vec![Cell::Absent; table.columns.len()];
            for (j, &i) in cols.iter().enumerate() {
                let c = &table.columns[i];
                row[i] = match c.kind {
                    Kind::Int => r.get::<_, Option<i64>>(j).map_or(Cell::Null, Cell::Int),
                    Kind::Real => r.get::<_, Option<f64>>(j).map_or(Cell::Null, Cell::Real),
                    Kind::Text => r.get::<_, Option<String>>(j).map_or(Cell::Null, Cell::Text),
                    Kind::Bytes => r
                        .get::<_, Option<Vec<u8>>>(j)
                        .map_or(Cell::Null, Cell::Bytes),
                    Kind::Uuid => r
                        .get::<_, Option<Uuid>>(j)
                        .map_or(Cell::Null, |u| Cell::Bytes(u.as_bytes().to_vec())),
                };
            }
            out.push(row);
        }
        Ok(out)
    }

    fn count(&mut self, table: &Table) -> Result<u64> {
        let n: i64 = self
            .db
            .one(&format!("SELECT count(*) FROM {}", table.name), &[])?
            .get(0);
        Ok(n as u64)
    }
}

struct Target<'a, 'c> {
    db: Db<'a, postgres::Transaction<'c>>,
}

impl CopyTarget for Target<'_, '_> {
    fn insert(&mut self, table: &Table, rows: &[Row]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // The columns this backend has that the source gave (an absent one takes its default).
        let cols: Vec<usize> = columns(table)
            .into_iter()
            .filter(|&i| rows[0][i] != Cell::Absent)
            .collect();
        let names: Vec<&str> = cols.iter().map(|&i| table.columns[i].name).collect();
        let mut values = Vec::with_capacity(rows.len());
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * cols.len());
        for row in rows {
            let marks: Vec<String> = (0..cols.len())
                .map(|k| format!("${}", params.len() + k + 1))
                .collect();
            values.push(format!("({})", marks.join(", ")));
            params.extend(cols.iter().map(|&i| &row[i] as &(dyn ToSql + Sync)));
        }
        let sql = format!(
            "INSERT INTO {} ({}) VALUES {}",
            table.name,
            names.join(", "),
            values.join(", ")
        );
        self.db
            .exec(&sql, &params)
            .map_err(|e| orphan_row(e, table, rows))?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        for (table, key) in SERIALS {
            self.db.exec(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', '{key}'), \
                     coalesce((SELECT max({key}) FROM {table}), 0) + 1, false)"
                ),
                &[],
            )?;
        }
        // The next event takes the `seq` after the last copied one.
        self.db.exec(
            "UPDATE seq_counter SET seq = greatest(seq, (SELECT coalesce(max(seq), 0) FROM events))",
            &[],
        )?;
        Ok(())
    }
}

/// A foreign key the target refused (the source, a data dir without foreign keys, holds a row
/// whose parent is gone: an artifact whose collection was removed by hand, say) as an error
/// naming the row, its missing parent and what to do; any other error as is.
fn orphan_row(e: Error, table: &Table, rows: &[Row]) -> Error {
    let Error::Backend {
        source: Some(source),
        ..
    } = &e
    else {
        return e;
    };
    let Some(db) = source
        .downcast_ref::<postgres::Error>()
        .and_then(|p| p.as_db_error())
        .filter(|d| *d.code() == postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    else {
        return e;
    };
    // "Key (ckey)=(5) is not present in table "collections"."
    let detail = db.detail().unwrap_or_default();
    let parsed = detail
        .strip_prefix("Key (")
        .and_then(|d| d.split_once(")=("))
        .and_then(|(col, rest)| {
            let (value, rest) = rest.split_once(") ")?;
            let parent = rest.split('"').nth(1)?;
            Some((col, value, parent))
        });
    let Some((col, value, parent)) = parsed else {
        return Error::invalid(format!(
            "cannot copy table {}: a row refers to a row the source does not have ({detail}): \
             remove that row from the source (or restore what it refers to) and copy again; \
             nothing was copied",
            table.name
        ));
    };
    // The row: the first of the page with that value, named by its id (or its key).
    let at = table.columns.iter().position(|c| c.name == col);
    let row = rows.iter().find(|r| {
        at.is_some_and(|i| match &r[i] {
            Cell::Int(v) => v.to_string() == value,
            Cell::Text(v) => v == value,
            _ => false,
        })
    });
    let name = row.map_or_else(String::new, |r| {
        let id = (0..table.columns.len())
            .find(|&i| table.columns[i].name.ends_with("_id") && matches!(r[i], Cell::Text(_)));
        let named: Vec<String> = match id {
            Some(i) => vec![format!(
                "{} {:?}",
                table.columns[i].name,
                r[i].as_text().unwrap_or("")
            )],
            None => table
                .key_indexes()
                .into_iter()
                .map(|i| format!("{} {:?}", table.columns[i].name, r[i]))
                .collect(),
        };
        format!(" ({})", named.join(", "))
    });
    Error::invalid(format!(
        "cannot copy table {}: its row{name} refers to {parent} row {col} = {value}, which the \
         source does not have (removed by hand, or lost): delete that {} row from the source \
         (or restore its {parent} row) and copy again; nothing was copied",
        table.name, table.name
    ))
}

/// A copy's transactions run as long as the copy: no idle or statement limit.
const NO_LIMITS: &str =
    "SET LOCAL idle_in_transaction_session_timeout = 0; SET LOCAL statement_timeout = 0";

impl CopyStore for PostgresStore {
    fn identity(&self) -> Result<String> {
        self.read(|db| Ok(identity(&db.one(IDENTITY, &[])?)))
    }

    fn non_empty(&self) -> Result<Vec<(String, u64)>> {
        self.read(non_empty)
    }

    fn read_snapshot(&self, f: &mut dyn FnMut(&mut dyn CopySource) -> Result<()>) -> Result<()> {
        self.with_conn(|conn| {
            let Conn { client, stmts } = conn;
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            tx.batch_execute(NO_LIMITS)?;
            f(&mut Source {
                db: Db { c: &mut tx, stmts },
            })?;
            Ok(tx.commit()?)
        })
    }

    fn write_all(&self, f: &mut dyn FnMut(&mut dyn CopyTarget) -> Result<()>) -> Result<()> {
        self.with_conn(|conn| {
            let Conn { client, stmts } = conn;
            let mut tx = client.transaction()?;
            tx.batch_execute(NO_LIMITS)?;
            // Other writers wait until the copy commits (or rolls back); readers do not. The
            // copy waits for the locks only so long: a database in use (a server writing, a
            // transaction left open) is an error saying so, not a copy that hangs.
            let names: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
            let wait_ms = self
                .copy_lock_timeout
                .as_millis()
                .clamp(1, i32::MAX as u128);
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = {wait_ms}; \
                 LOCK TABLE {}, seq_counter IN EXCLUSIVE MODE; SET LOCAL lock_timeout = 0",
                names.join(", ")
            ))
            .map_err(|e| {
                if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                    Error::Backend {
                        message: format!(
                            "the target database is in use: the copy waited more than {} s for \
                             a lock another session holds on its tables (a server or another \
                             client writing, or a transaction left open); stop what uses it, or \
                             give a longer --lock-timeout, and run the copy again (nothing was \
                             copied)",
                            self.copy_lock_timeout.as_secs_f64()
                        ),
                        source: None,
                    }
                } else {
                    Error::backend("cannot lock the target's tables for the copy", e)
                }
            })?;
            let mut db = Db { c: &mut tx, stmts };
            refuse_non_empty(non_empty(&mut db)?)?;
            f(&mut Target { db })?;
            tx.commit()
                .map_err(|e| Error::backend("cannot commit the copy", e))
        })
    }
}

/// What a `store copy` target database holds, read without changing it (no migration): its
/// identity (as [`CopyStore::identity`]), its schema version and the row counts of the copied tables that exist there and hold rows. A
/// copy checks this before it opens (and migrates) the target, so a refusal changes nothing.
pub fn probe_target(url: &str) -> Result<(String, i64, crate::store::copy::RowCounts)> {
    let super::connect::Target { mut config, tls } = super::connect::parse_target(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    let mut client = tls.connect(&config).map_err(|e| {
        Error::backend(
            format!("cannot connect to {}", super::progress::redact(url)),
            e,
        )
    })?;
    let version = super::schema::version(&mut client)?;
    let r = client.query_one(IDENTITY, &[])?;
    let identity = identity(&r);
    let mut tx = client.build_transaction().read_only(true).start()?;
    let mut out = Vec::new();
    for t in TABLES.iter().filter(|t| t.user_data) {
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = $1)",
                &[&t.name],
            )?
            .get(0);
        if !exists {
            continue;
        }
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {}", t.name), &[])?
            .get(0);
        if n > 0 {
            out.push((t.name.to_owned(), n as u64));
        }
    }
    tx.rollback()?;
    Ok((identity, version, out))
}
