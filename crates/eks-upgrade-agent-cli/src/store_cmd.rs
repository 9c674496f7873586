//! `eks-upgrade-agent store`: the store itself. `migrate` brings the schema of the data dir's
//! SQLite file or of the `--database-url` database up to this build's version (opening a store
//! does it too; this runs it explicitly, e.g. before rolling out replicas); `info` shows the
//! backend, its schema version and how many rows each table holds.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::Ctx;

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCmd {
    /// Bring the store's schema up to this version (data dir, or --database-url)
    Migrate,
    /// Backend, schema version and row counts of the store
    Info,
}

pub(crate) fn run(ctx: &Ctx, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    if ctx.server.is_some() {
        anyhow::bail!(
            "store works on a data dir or a database; --server (EUA_SERVER) is for the client commands"
        );
    }
    let (backend, location, version, counts) = match ctx.database(2)? {
        Some(db) => (
            "postgresql",
            db.url().to_owned(),
            db.schema_version()?,
            db.counts()?,
        ),
        None => {
            let store = match cmd {
                StoreCmd::Migrate => ctx.store()?,
                StoreCmd::Info => ctx.existing_store()?,
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
    match cmd {
        StoreCmd::Migrate => println!("{backend} store at {location}: schema version {version}"),
        StoreCmd::Info => {
            println!("backend         {backend}");
            println!("location        {location}");
            println!("schema version  {version}");
            for (table, n) in &counts {
                println!("{table:<15} {n}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
