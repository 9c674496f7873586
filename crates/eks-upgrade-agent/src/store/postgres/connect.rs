//! Connecting to PostgreSQL: the options, the database URL (libpq's options; passwords
//! never shown), and the pool of connections, each with its prepared statements.

use std::collections::HashMap;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement};
use r2d2_postgres::r2d2;

use crate::error::{Error, Result};

/// Options for opening a [`PostgresStore`](super::progress::PostgresStore).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections the pool holds.
    pub pool_size: u32,
    /// How long taking a connection from the pool (or making one) may wait.
    pub connect_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// One pooled connection with its prepared statements.
pub(crate) struct Conn {
    pub(crate) client: Client,
    pub(super) stmts: HashMap<String, Statement>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("statements", &self.stmts.len())
            .finish()
    }
}

/// Makes [`Conn`]s for the pool.
#[derive(Debug)]
pub(crate) struct Manager {
    pub(super) config: postgres::Config,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<Conn, postgres::Error> {
        Ok(Conn {
            client: self.config.connect(NoTls)?,
            stmts: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), postgres::Error> {
        conn.client.simple_query("")?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}

/// A client (or transaction) with the connection's statement cache.
pub(crate) struct Db<'a, C: GenericClient> {
    pub(crate) c: &'a mut C,
    pub(super) stmts: &'a mut HashMap<String, Statement>,
}

impl<C: GenericClient> Db<'_, C> {
    fn stmt(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        if self.stmts.len() >= 256 {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(crate) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let s = self.stmt(sql)?;
        Ok(self.c.query(&s, params)?)
    }

    pub(crate) fn opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_opt(&s, params)?)
    }

    pub(crate) fn one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_one(&s, params)?)
    }

    pub(crate) fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let s = self.stmt(sql)?;
        Ok(self.c.execute(&s, params)?)
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.c.batch_execute(sql)?)
    }
}

pub(crate) type Tx<'a, 'c> = Db<'a, postgres::Transaction<'c>>;

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // libpq also takes the password (and an SSL key's passphrase) as query options.
            if u.query_pairs().any(|(k, _)| secret_option(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret_option(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(unparsable database URL)".to_owned(),
    }
}

/// Query options of a database URL that carry secrets.
fn secret_option(key: &str) -> bool {
    matches!(key, "password" | "sslpassword")
}

/// Parses a `postgres://` URL (libpq's options: `sslmode`, `connect_timeout`,
/// `application_name`, ...); a bad one is `InvalidInput` saying what to fix.
pub fn parse_url(url: &str) -> Result<postgres::Config> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(Error::invalid(format!(
            "invalid database URL {}: expected postgres://user:password@host:port/database",
            redact(url)
        )));
    }
    let mut config: postgres::Config = url.parse().map_err(|e| {
        Error::invalid(format!(
            "invalid database URL {}: {e} (expected postgres://user:password@host:port/database)",
            redact(url)
        ))
    })?;
    if config.get_application_name().is_none() {
        config.application_name("eks-upgrade-agent");
    }
    if matches!(config.get_ssl_mode(), postgres::config::SslMode::Require) {
        return Err(Error::invalid(format!(
            "database URL {}: sslmode=require is not supported by this build yet; use \
             sslmode=disable (or prefer) on a trusted network",
            redact(url)
        )));
    }
    Ok(config)
}
