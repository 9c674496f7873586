//! `eks-upgrade-agent store`: the store itself. `migrate` brings the schema of the data dir's
//! SQLite file or of the `--database-url` database up to this build's version (opening a store
//! does it too; this runs it explicitly, e.g. before rolling out replicas); `info` shows the
//! backend, its schema version and how many rows each table holds; `copy --to` copies the
//! whole store into another, empty one (library: `eks_upgrade_agent::store::copy`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use eks_upgrade_agent::blob::{BlobStore, LocalBlobStore};
use eks_upgrade_agent::store::copy::{Blobs, CopyProgress, CopyStore};
use eks_upgrade_agent::store::postgres::PostgresOptions;
use eks_upgrade_agent::store::postgres::progress::redact;
use eks_upgrade_agent::store::sqlite::SqliteOptions;
use eks_upgrade_agent::store::{PostgresStore, SqliteStore};

use crate::Ctx;

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCmd {
    /// Bring the store's schema up to this version (data dir, or --database-url)
    Migrate,
    /// Backend, schema version and row counts of the store
    Info,
    /// Copy the whole store (data dir, or --database-url) into another, empty one
    Copy {
        /// Where to: postgres://... or postgresql://... (a database), or a directory, file://DIR
        /// or sqlite://DIR (a data dir: new, or holding an empty store)
        #[arg(long, value_name = "URL")]
        to: String,
        /// S3 bucket of the target database's artifact bytes [default: --s3-bucket]
        #[arg(long, value_name = "BUCKET")]
        to_s3_bucket: Option<String>,
        /// Key prefix in that bucket [default: --s3-prefix]
        #[arg(long, value_name = "PREFIX")]
        to_s3_prefix: Option<String>,
        /// Database to database: let the target use the source's bucket and prefix (blobs
        /// shared; only when the source is being retired: `artifacts gc` on either store would
        /// delete blobs the other references)
        #[arg(long)]
        share_bucket: bool,
        /// A database target: how long to wait for other sessions' locks on its tables (a
        /// server using it) before giving up, nothing copied [default: 10s]
        #[arg(long, value_name = "DURATION", value_parser = eks_upgrade_agent::units::parse_duration)]
        lock_timeout: Option<std::time::Duration>,
    },
}

pub(crate) fn run(ctx: &Ctx, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    if ctx.server.is_some() {
        anyhow::bail!(
            "store works on a data dir or a database; --server (EUA_SERVER) is for the client commands"
        );
    }
    let migrate = match cmd {
        StoreCmd::Copy {
            to,
            to_s3_bucket,
            to_s3_prefix,
            share_bucket,
            lock_timeout,
        } => {
            return copy(
                ctx,
                &to,
                to_s3_bucket,
                to_s3_prefix,
                share_bucket,
                lock_timeout,
            );
        }
        StoreCmd::Migrate => true,
        StoreCmd::Info => false,
    };
    let (backend, location, version, counts) = match ctx.database(2)? {
        Some(db) => (
            "postgresql",
            db.url().to_owned(),
            db.schema_version()?,
            db.counts()?,
        ),
        None => {
            let store = if migrate {
                ctx.store()?
            } else {
                ctx.existing_store()?
            };
            (
                "sqlite",
                store.path().display().to_string(),
                store.schema_version()?,
                store.counts()?,
            )
        }
    };
    if ctx.json() {
        let counts: serde_json::Map<String, serde_json::Value> =
            counts.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        crate::output::print_json(&json!({
            "backend": backend,
            "location": location,
            "schema_version": version,
            "counts": counts,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if migrate {
        println!("{backend} store at {location}: schema version {version}");
    } else {
        println!("backend         {backend}");
        println!("location        {location}");
        println!("schema version  {version}");
        for (table, n) in &counts {
            println!("{table:<15} {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `store copy` writes.
#[derive(Debug)]
enum Target {
    Database(String),
    DataDir(PathBuf),
}

/// Reads `--to`: a database URL, or a data dir (a path, `file://` or `sqlite://`). Schemes
/// compare case-insensitively; an error never prints the URL (it may hold a password).
fn parse_target(to: &str) -> anyhow::Result<Target> {
    let to = to.trim();
    if to.is_empty() {
        anyhow::bail!(
            "--to is empty: give a database (postgres://...) or a data dir (a path, file://DIR)"
        );
    }
    // A scheme: letters first, then letters, digits, `+`, `-` or `.`, then `:`.
    let scheme = to.split_once(':').filter(|(s, _)| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let path = match scheme {
        None => to,
        Some((scheme, rest)) => {
            let lower = scheme.to_ascii_lowercase();
            let Some(after) = rest.strip_prefix("//") else {
                anyhow::bail!(
                    "--to starts with {:?} but has no \"//\" after it: give postgres://..., \
                     file://DIR, or ./{scheme}:... for a directory of that name",
                    crate::output::printable(&format!("{scheme}:"))
                );
            };
            match lower.as_str() {
                "postgres" | "postgresql" => {
                    return Ok(Target::Database(format!("{lower}://{after}")));
                }
                "file" | "sqlite" => after,
                _ => anyhow::bail!(
                    "--to: unknown scheme {:?}: give postgres://..., postgresql://..., \
                     file://DIR, sqlite://DIR or a directory",
                    crate::output::printable(scheme)
                ),
            }
        }
    };
    if path.is_empty() {
        anyhow::bail!("--to names no directory");
    }
    let path = PathBuf::from(path);
    if path.exists() && !path.is_dir() {
        anyhow::bail!(
            "--to {}: not a directory (a data dir target is a directory)",
            path.display()
        );
    }
    Ok(Target::DataDir(path))
}

/// A blob store in S3, or why there is none.
#[cfg(feature = "aws")]
fn s3(bucket: Option<&str>, prefix: &str, hint: &str) -> Result<Arc<dyn BlobStore>, String> {
    let Some(bucket) = bucket else {
        return Err(hint.to_owned());
    };
    eks_upgrade_agent::blob::S3BlobStore::from_env(bucket, prefix)
        .map(|s| Arc::new(s) as Arc<dyn BlobStore>)
        .map_err(|e| format!("cannot use S3 bucket {bucket}: {e}"))
}

#[cfg(not(feature = "aws"))]
fn s3(_: Option<&str>, _: &str, _: &str) -> Result<Arc<dyn BlobStore>, String> {
    Err(
        "artifact bytes of a database are in S3: this build has no S3 support (feature `aws`)"
            .into(),
    )
}

fn copy(
    ctx: &Ctx,
    to: &str,
    to_bucket: Option<String>,
    to_prefix: Option<String>,
    share_bucket: bool,
    lock_timeout: Option<std::time::Duration>,
) -> anyhow::Result<ExitCode> {
    let target = parse_target(to)?;
    if let (Target::DataDir(_), Some(_)) = (&target, lock_timeout) {
        anyhow::bail!(
            "--lock-timeout is for a database target (a data dir target is a new store no one \
             else uses): drop it"
        );
    }
    let config = &ctx.config;
    // The source: the database, or the data dir's store (which must exist).
    let (source, from_blobs, from_name): (Arc<dyn CopyStore>, _, String) = match ctx.database(3)? {
        Some(db) => {
            let blobs = s3(
                config.s3.s3_bucket.as_deref(),
                config.s3_prefix(),
                "the source database keeps artifact bytes in S3: set --s3-bucket (or \
                 EUA_S3_BUCKET, or s3_bucket in the config file) to its bucket",
            );
            let name = db.url().to_owned();
            (db, blobs, name)
        }
        None => {
            let store = ctx.existing_store()?;
            let blobs = LocalBlobStore::open(&config.blob_dir(), config.durability)
                .map(|b| Arc::new(b) as Arc<dyn BlobStore>)
                .map_err(|e| format!("cannot open {}: {e}", config.blob_dir().display()));
            let name = config.data_dir.display().to_string();
            (store, blobs, name)
        }
    };
    // Refuse what is known to fail before creating or migrating anything on the target.
    let has_artifacts = source.non_empty()?.iter().any(|(t, _)| t == "artifacts");
    if let (true, Err(hint)) = (has_artifacts, &from_blobs) {
        anyhow::bail!("{hint}");
    }
    let to_bucket = to_bucket
        .filter(|b| !b.is_empty())
        .or(config.s3.s3_bucket.clone());
    let to_prefix = to_prefix.unwrap_or_else(|| config.s3_prefix().to_owned());
    if let (Target::Database(_), true, None) = (&target, has_artifacts, &to_bucket) {
        anyhow::bail!(
            "the source has artifacts and a database keeps their bytes in S3: give \
             --to-s3-bucket (or --s3-bucket) for the target"
        );
    }
    let same_store = |what: &str| {
        anyhow::anyhow!(
            "the target is the source store itself ({what}): give another database or an \
             empty data dir to --to"
        )
    };
    match &target {
        Target::Database(url) => {
            // Read-only: the target is neither migrated nor written before these checks pass.
            let (identity, _version, found) =
                eks_upgrade_agent::store::postgres::probe_copy_target(url)
                    .with_context(|| format!("cannot read the target database {}", redact(url)))?;
            if identity == source.identity()? {
                return Err(same_store(&identity));
            }
            eks_upgrade_agent::store::copy::refuse_non_empty(found)?;
            if ctx.database_url.is_some()
                && !share_bucket
                && to_bucket.as_deref() == config.s3.s3_bucket.as_deref()
                && to_prefix == config.s3_prefix()
            {
                anyhow::bail!(
                    "the target database would share the source's bucket and prefix (s3://{}/{}): \
                     `artifacts gc` on either would delete blobs the other references; give \
                     --to-s3-bucket or --to-s3-prefix, or --share-bucket if the source is being \
                     retired",
                    to_bucket.as_deref().unwrap_or(""),
                    to_prefix
                );
            }
        }
        Target::DataDir(dir) => {
            if ctx.database_url.is_none() {
                let same = |a: &std::path::Path, b: &std::path::Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
                if same(dir, &config.data_dir) {
                    return Err(same_store(&dir.display().to_string()));
                }
            }
            // Read-only: nothing is created or migrated before these checks pass.
            match eks_upgrade_agent::store::sqlite::probe_copy_target(dir)? {
                Some((_version, found)) => eks_upgrade_agent::store::copy::refuse_non_empty(found)?,
                None if dir.is_dir() => {
                    let mut entries = std::fs::read_dir(dir)
                        .with_context(|| format!("cannot read {}", dir.display()))?;
                    if entries.next().is_some() {
                        anyhow::bail!(
                            "--to {}: the directory is not empty and holds no store: give a new \
                             or empty directory",
                            dir.display()
                        );
                    }
                }
                None => {}
            }
        }
    }
    let (dest, to_blobs, to_name): (Arc<dyn CopyStore>, _, String) = match &target {
        Target::Database(url) => {
            let options = PostgresOptions {
                pool_size: 2,
                copy_lock_timeout: lock_timeout
                    .unwrap_or(PostgresOptions::default().copy_lock_timeout),
                ..PostgresOptions::default()
            };
            let db = PostgresStore::open(url, &options)
                .with_context(|| format!("cannot open the target database {}", redact(url)))?;
            let blobs = s3(
                to_bucket.as_deref(),
                &to_prefix,
                "give --to-s3-bucket for the target database's artifact bytes",
            );
            let name = db.url().to_owned();
            (Arc::new(db), blobs, name)
        }
        Target::DataDir(dir) => {
            let options = SqliteOptions {
                durability: config.durability,
                ..Default::default()
            };
            let store = SqliteStore::open(dir, &options)
                .with_context(|| format!("cannot create the store in {}", dir.display()))?;
            let blobs = LocalBlobStore::open(&dir.join("blobs"), config.durability)
                .map(|b| Arc::new(b) as Arc<dyn BlobStore>)
                .map_err(|e| format!("cannot open {}: {e}", dir.join("blobs").display()));
            (Arc::new(store), blobs, dir.display().to_string())
        }
    };
    let mut bars = Bars::new(!ctx.json() && std::io::stderr().is_terminal());
    let report = eks_upgrade_agent::store::copy::copy(
        source.as_ref(),
        dest.as_ref(),
        &Blobs {
            from: from_blobs,
            to: to_blobs,
        },
        &mut bars,
    )?;
    bars.clear();
    if ctx.json() {
        let tables: serde_json::Map<String, serde_json::Value> = report
            .tables
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        crate::output::print_json(&json!({
            "from": from_name,
            "to": to_name,
            "tables": tables,
            "blobs": {
                "copied": report.blobs_copied,
                "present": report.blobs_present,
                "skipped": report.blobs_skipped,
                "bytes": report.blob_bytes,
            },
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    for (table, n) in &report.tables {
        println!("{table:<15} {n}");
    }
    println!(
        "{:<15} {} copied ({}), {} already there, {} without bytes (deleted, or only in S3)",
        "blobs",
        report.blobs_copied,
        crate::output::size(report.blob_bytes),
        report.blobs_present,
        report.blobs_skipped
    );
    println!(
        "copied {} to {}",
        crate::output::printable(&from_name),
        crate::output::printable(&to_name)
    );
    Ok(ExitCode::SUCCESS)
}

/// One progress bar per table on a terminal (stderr); nothing otherwise.
struct Bars {
    multi: Option<MultiProgress>,
    current: Option<ProgressBar>,
}

impl Bars {
    fn new(show: bool) -> Bars {
        Bars {
            multi: show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            current: None,
        }
    }

    fn clear(&mut self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

impl CopyProgress for Bars {
    fn start(&mut self, table: &str, total: u64) {
        let Some(multi) = &self.multi else { return };
        let pb = multi.add(ProgressBar::new(total));
        pb.set_style(
            ProgressStyle::with_template("{prefix:<15} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("##-"),
        );
        pb.set_prefix(table.to_owned());
        self.current = Some(pb);
    }

    fn advance(&mut self, n: u64) {
        if let Some(pb) = &self.current {
            pb.inc(n);
        }
    }

    fn done(&mut self, _: &str) {
        if let Some(pb) = self.current.take() {
            pb.finish();
        }
    }
}
