//! `eks-upgrade-agent artifacts ...`: sessions, collections, adding, finding, reading,
//! exporting and verifying test artifacts, retention and garbage collection.

use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::artifacts::{AddOptions, NewSession, Progress};
use eks_upgrade_agent::artifacts::{PullReport, UploadReport};
use eks_upgrade_agent::model::{ArtifactQuery, ArtifactStatus, ArtifactType};
use eks_upgrade_agent::units::{parse_duration, parse_size};

use crate::Access;
use crate::Ctx;
use crate::kv::{parse_kv, parse_kv_json, to_map};
use crate::output::print_json;
use crate::output::{artifact_header, artifact_line, print_table, printable, truncate};
use crate::remote_artifacts::{Artifacts, RemoteArtifacts};
use crate::requests::{PullRequest, UploadRequest};
use eks_upgrade_agent::store::IdKind;

/// S3 settings, global flags.
#[derive(Debug, Args)]
#[command(next_help_heading = crate::help::S3_HEADING)]
pub(crate) struct S3Args {
    /// Share artifacts through this S3 bucket (standard AWS credentials, region, endpoint)
    #[arg(long, global = true, env = "EUA_S3_BUCKET", value_name = "BUCKET")]
    pub(crate) s3_bucket: Option<String>,
    /// Key prefix [default: eks-upgrade-agent/artifacts]
    #[arg(long, global = true, env = "EUA_S3_PREFIX", value_name = "PREFIX")]
    pub(crate) s3_prefix: Option<String>,
    /// Queue every added artifact for upload
    #[arg(long, global = true, env = "EUA_AUTO_UPLOAD", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub(crate) auto_upload: Option<bool>,
    /// With --database-url: most bytes the data dir keeps as a cache of the S3 blobs, least
    /// recently used evicted first (e.g. 10GiB) [default: 1GiB]
    #[arg(long, global = true, env = "EUA_BLOB_CACHE_SIZE", value_name = "BYTES", value_parser = parse_size)]
    pub(crate) blob_cache_size: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ArtifactsCmd {
    /// Create, complete, show and list test sessions
    #[command(subcommand)]
    Session(SessionCmd),
    /// Create and list collections in a session
    #[command(subcommand)]
    Collection(CollectionCmd),
    /// Add files, or every file under directories, to a collection
    Add {
        /// Session id
        session: String,
        /// Collection id
        collection: String,
        /// Files or directories (directories are added recursively, names relative to them)
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// log_file (default), test_result, configuration, screenshot, metrics_data, backup,
        /// report or diagnostic
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
        artifact_type: Option<ArtifactType>,
        /// Name (one file), or name prefix (directory) [default: the file name]
        #[arg(long)]
        name: Option<String>,
        /// Description
        #[arg(long)]
        description: Option<String>,
        /// Tag (repeatable)
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Task that produced it
        #[arg(long)]
        task_id: Option<String>,
        /// Step that produced it
        #[arg(long)]
        step_id: Option<String>,
        /// Metadata KEY=VALUE, the value a string (repeatable)
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_kv)]
        meta: Vec<(String, Value)>,
        /// Metadata KEY=JSON, the value a JSON number, bool, array or object (repeatable)
        #[arg(long = "meta-json", value_name = "KEY=JSON", value_parser = parse_kv_json)]
        meta_json: Vec<(String, Value)>,
        /// With --type test_result: pre, post or adhoc; the JUnit XML files among the paths
        /// are also recorded as one test run of the session's upgrade (`tests ...`)
        #[arg(long, value_name = "PHASE", value_parser = crate::test_results::parse_phase)]
        phase: Option<eks_upgrade_agent::model::RunPhase>,
    },
    /// Find artifacts (newest first); every filter narrows the result
    Search {
        /// Session id
        #[arg(long)]
        session: Option<String>,
        /// Collection id
        #[arg(long)]
        collection: Option<String>,
        /// Upgrade id
        #[arg(long)]
        upgrade: Option<String>,
        /// Artifact type
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
        artifact_type: Option<ArtifactType>,
        /// Tag; several must all match
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Task id
        #[arg(long)]
        task_id: Option<String>,
        /// created, uploaded, archived, deleted or failed
        #[arg(long, value_parser = parse_status)]
        status: Option<ArtifactStatus>,
        /// Case-insensitive substring of the name (a glob with * or ?)
        #[arg(long)]
        name: Option<String>,
        /// Smallest size, e.g. 1024, 10KiB, 5MB
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        min_size: Option<u64>,
        /// Largest size
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Added within this long, e.g. 30m, 6h, 2d
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<Duration>,
        /// Most results per page (at most 10000); see --all and --cursor for more
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Every result, a page at a time (streamed)
        #[arg(long)]
        all: bool,
        /// Start after this point: the cursor a previous search printed
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Counts and bytes by type and status, for one session or all
    Stats {
        /// Session id
        #[arg(long)]
        session: Option<String>,
    },
    /// Show one artifact
    Show {
        /// Artifact id
        artifact: String,
    },
    /// Delete an artifact: its S3 object, then its local copy; the record stays as `deleted`
    Delete {
        /// Artifact id
        artifact: String,
    },
    /// Write an artifact's verified bytes to stdout or a file
    Get {
        /// Artifact id
        artifact: String,
        /// Output file [default: stdout]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Export a session to DIR as {collection name}/{artifact name}, verifying every digest
    Export {
        /// Session id
        session: String,
        /// Target directory (absent or empty unless --force)
        dir: PathBuf,
        /// Export into a non-empty directory
        #[arg(long)]
        force: bool,
    },
    /// Upload artifacts to S3 (queued ones, plus those selected), with a progress bar
    Upload {
        /// Queue this session's artifacts
        #[arg(long, conflicts_with_all = ["artifact", "all"])]
        session: Option<String>,
        /// Queue this artifact
        #[arg(long, conflicts_with = "all")]
        artifact: Option<String>,
        /// Queue every artifact not uploaded yet
        #[arg(long)]
        all: bool,
        /// Also retry failed uploads now, without waiting for their backoff
        #[arg(long)]
        retry_failed: bool,
        /// Upload larger artifacts in parts, e.g. 64MiB (the default)
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        multipart_threshold: Option<u64>,
    },
    /// Rebuild a session from its manifest in S3 (on another machine, into this data dir)
    Pull {
        /// Session id
        session: String,
        /// Bucket holding the session
        #[arg(long)]
        bucket: String,
        /// Key prefix [default: eks-upgrade-agent/artifacts]
        #[arg(long)]
        prefix: Option<String>,
        /// Download every artifact now (verified) instead of on first read
        #[arg(long)]
        eager: bool,
    },
    /// Check every stored blob against its digest and every artifact against its blob
    Verify,
    /// Remove completed sessions whose retention has passed
    Cleanup {
        /// Only show what would be removed
        #[arg(long)]
        dry_run: bool,
        /// Judge retention at this time (RFC 3339) instead of now
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        as_of: Option<DateTime<Utc>>,
    },
    /// Read requests as JSON Lines on stdin, one acknowledgement line each on stdout, e.g.
    /// {"op":"artifact.add","session_id":"S","collection_id":"C","path":"a.log","tags":["x"]}.
    /// Ops: session.create|complete|get|list, collection.create, artifact.add|get|search,
    /// stats, with the model's field names. Each line gets {"ok":true,"result":...} once done
    /// (durable) or {"ok":false,"line":L,"code":"...","error":"..."}; bad lines do not stop
    /// the stream. Exits 1 if any line was rejected.
    Apply,
    /// Remove leftovers of interrupted adds and blobs no artifact references
    Gc,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SessionCmd {
    /// Create a session
    Create {
        /// Upgrade id
        #[arg(long)]
        upgrade: String,
        /// Cluster name
        #[arg(long)]
        cluster: String,
        /// Name [default: upgrade-{upgrade}-{YYYYmmdd-HHMMSS}]
        #[arg(long)]
        name: Option<String>,
        /// Description
        #[arg(long)]
        description: Option<String>,
        /// Days to keep it after completion [default: 30]
        #[arg(long)]
        retention_days: Option<u32>,
    },
    /// Mark a session completed (its retention starts)
    Complete {
        /// Session id
        session: String,
    },
    /// Session summary (reference fields) and collections
    Show {
        /// Session id
        session: String,
    },
    /// List sessions
    List {
        /// Only this upgrade's
        #[arg(long)]
        upgrade: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CollectionCmd {
    /// Create a collection
    Create {
        /// Session id
        session: String,
        /// Name, unique in the session
        #[arg(long)]
        name: String,
        /// Description
        #[arg(long)]
        description: Option<String>,
        /// Task the collection belongs to
        #[arg(long)]
        task_id: Option<String>,
    },
    /// List a session's collections
    List {
        /// Session id
        session: String,
    },
}

fn parse_type(s: &str) -> Result<ArtifactType, String> {
    s.parse()
        .map_err(|e: eks_upgrade_agent::Error| e.to_string())
}

fn parse_status(s: &str) -> Result<ArtifactStatus, String> {
    s.parse()
        .map_err(|e: eks_upgrade_agent::Error| e.to_string())
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("invalid time {s:?}: expected RFC 3339, e.g. 2026-12-01T00:00:00Z"))
}

/// A progress bar on stderr, shown only on a terminal and never in JSON mode.
fn bar(ctx: &Ctx, what: &str) -> ProgressBar {
    if ctx.json() || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("##-"),
    );
    pb.set_prefix(what.to_owned());
    pb
}

fn track(pb: &ProgressBar) -> impl FnMut(Progress) + '_ {
    move |p: Progress| {
        pb.set_length(p.bytes_total.max(p.bytes_done));
        pb.set_position(p.bytes_done);
        if p.files_total > 0 {
            pb.set_message(format!("{}/{} files", p.files_done, p.files_total));
        } else {
            pb.set_message(format!("{} files", p.files_done));
        }
    }
}

/// The AWS cause every failure shares ("no AWS credentials found (...)", "no AWS region
/// configured (...)", "access denied to s3://b", "bucket b does not exist"), when there are
/// failures and they all share one.
fn common_cause(failed: &[(String, String)]) -> Option<&str> {
    const CAUSES: [&str; 4] = [
        "no AWS credentials found",
        "no AWS region configured",
        "access denied to s3://",
        "bucket ",
    ];
    let cause_of = |e: &'_ str| -> Option<usize> {
        CAUSES
            .iter()
            .filter_map(|c| e.rfind(&format!(": {c}")).map(|i| i + 2))
            .max()
    };
    let (_, first) = failed.first()?;
    let start = cause_of(first)?;
    let cause = first[start..]
        .split("; check")
        .next()
        .unwrap_or(&first[start..]);
    failed
        .iter()
        .all(|(_, e)| cause_of(e).is_some_and(|i| e[i..].starts_with(cause)))
        .then_some(cause)
}

pub(crate) fn run(ctx: &Ctx, cmd: ArtifactsCmd) -> anyhow::Result<ExitCode> {
    if let Some(remote) = ctx.remote()? {
        let r = RemoteArtifacts::new(remote);
        return run_on(ctx, &r, Place::Remote(&r), cmd);
    }
    // Only creating a session or pulling one may create the data dir; every other command
    // needs a store to be there and says so, naming the directory.
    let access = match &cmd {
        ArtifactsCmd::Session(SessionCmd::Create { .. })
        | ArtifactsCmd::Pull { .. }
        | ArtifactsCmd::Apply => Access::Create,
        _ => Access::Existing,
    };
    if let Some(db) = ctx.database(4)? {
        let m = ctx.team_artifacts(db)?;
        return run_on(ctx, &m, Place::Local(&m), cmd);
    }
    let m = ctx.artifacts_on(ctx.store_for(access)?)?;
    run_on(ctx, &m, Place::Local(&m), cmd)
}

/// Where the artifacts are: a data dir, or a server (`--server`).
#[derive(Clone, Copy)]
enum Place<'a> {
    Local(&'a TestArtifactsManager),
    Remote(&'a RemoteArtifacts),
}

/// Replaces each session, collection and artifact id of `cmd` by the full id it abbreviates
/// (a unique prefix, or a unique suffix of 6+ characters); an ambiguous one fails listing the
/// candidates. `pull` keeps its session id: that session is in S3, not here.
fn resolve_ids(m: &dyn Artifacts, cmd: &mut ArtifactsCmd) -> eks_upgrade_agent::Result<()> {
    use IdKind::{Artifact, Collection, Session};
    let one = |kind, id: &mut String| -> eks_upgrade_agent::Result<()> {
        *id = m.resolve(kind, id)?;
        Ok(())
    };
    let opt = |kind, id: &mut Option<String>| -> eks_upgrade_agent::Result<()> {
        if let Some(id) = id {
            *id = m.resolve(kind, id)?;
        }
        Ok(())
    };
    match cmd {
        ArtifactsCmd::Session(SessionCmd::Complete { session } | SessionCmd::Show { session })
        | ArtifactsCmd::Collection(
            CollectionCmd::Create { session, .. } | CollectionCmd::List { session },
        )
        | ArtifactsCmd::Export { session, .. } => one(Session, session)?,
        ArtifactsCmd::Add {
            session,
            collection,
            ..
        } => {
            one(Session, session)?;
            one(Collection, collection)?;
        }
        ArtifactsCmd::Search {
            session,
            collection,
            ..
        } => {
            opt(Session, session)?;
            opt(Collection, collection)?;
        }
        ArtifactsCmd::Stats { session } => opt(Session, session)?,
        ArtifactsCmd::Show { artifact }
        | ArtifactsCmd::Get { artifact, .. }
        | ArtifactsCmd::Delete { artifact } => one(Artifact, artifact)?,
        ArtifactsCmd::Upload {
            session, artifact, ..
        } => {
            opt(Session, session)?;
            opt(Artifact, artifact)?;
        }
        ArtifactsCmd::Session(SessionCmd::Create { .. } | SessionCmd::List { .. })
        | ArtifactsCmd::Pull { .. }
        | ArtifactsCmd::Verify
        | ArtifactsCmd::Cleanup { .. }
        | ArtifactsCmd::Apply
        | ArtifactsCmd::Gc => {}
    }
    Ok(())
}

/// Runs `cmd` on `m`, which is the one at `place`.
fn run_on(
    ctx: &Ctx,
    m: &dyn Artifacts,
    place: Place<'_>,
    mut cmd: ArtifactsCmd,
) -> anyhow::Result<ExitCode> {
    resolve_ids(m, &mut cmd)?;
    match cmd {
        ArtifactsCmd::Session(c) => session(ctx, m, c),
        ArtifactsCmd::Collection(c) => collection(ctx, m, c),
        ArtifactsCmd::Apply => {
            let stats = crate::artifacts_apply::run(m, io::stdin().lock(), io::stdout().lock())?;
            if stats.failed > 0 {
                eprintln!("apply: {} of {} lines rejected", stats.failed, stats.lines);
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCmd::Add {
            session,
            collection,
            paths,
            artifact_type,
            name,
            description,
            tags,
            task_id,
            step_id,
            meta,
            meta_json,
            phase,
        } => {
            let opts = AddOptions {
                artifact_type,
                name,
                description,
                tags,
                task_id,
                step_id,
                metadata: to_map(meta, meta_json),
            };
            if let Some(phase) = phase {
                let (local, remote) = match place {
                    Place::Local(l) => (Some(l), None),
                    Place::Remote(r) => (None, Some(r)),
                };
                return crate::test_results::add_with_phase(
                    ctx,
                    m,
                    local,
                    remote,
                    &session,
                    &collection,
                    &paths,
                    &opts,
                    phase,
                );
            }
            // Links are never followed (in or out of the directory): say which were skipped,
            // on stderr so the JSON on stdout keeps its shape.
            let skipped = eks_upgrade_agent::artifacts::skipped_entries(&paths)?;
            for p in &skipped {
                let what = if p.is_symlink() {
                    "symbolic link"
                } else {
                    "special file"
                };
                eprintln!(
                    "skipped {what} {} (not followed)",
                    printable(&p.to_string_lossy())
                );
            }
            if !skipped.is_empty() {
                eprintln!(
                    "skipped {} entr{} that {} not regular files; add the targets by path to store them",
                    skipped.len(),
                    if skipped.len() == 1 { "y" } else { "ies" },
                    if skipped.len() == 1 { "is" } else { "are" }
                );
            }
            let pb = bar(ctx, "adding");
            let added = m.add_paths(&session, &collection, &paths, &opts, &mut track(&pb));
            pb.finish_and_clear();
            let added = added?;
            if ctx.json() {
                print_json(&added)?;
            } else {
                let mut out = io::stdout().lock();
                if !added.is_empty() {
                    artifact_header(&mut out)?;
                }
                let ids: Vec<&str> = added.iter().map(|a| a.artifact_id.as_str()).collect();
                for (a, short) in added.iter().zip(m.shorts(IdKind::Artifact, &ids)) {
                    artifact_line(&mut out, &short, a)?;
                }
                writeln!(
                    out,
                    "added {} artifact{} ({})",
                    added.len(),
                    if added.len() == 1 { "" } else { "s" },
                    crate::output::size(added.iter().map(|a| a.file_size).sum::<u64>())
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCmd::Search {
            session,
            collection,
            upgrade,
            artifact_type,
            tags,
            task_id,
            status,
            name,
            min_size,
            max_size,
            since,
            limit,
            all,
            cursor,
        } => {
            let created_since = since
                .map(|d| chrono::Duration::from_std(d).map(|d| Utc::now() - d))
                .transpose()
                .context("--since is too long")?;
            let q = ArtifactQuery {
                session_id: session,
                collection_id: collection,
                upgrade_id: upgrade,
                artifact_type,
                tags,
                task_id,
                status,
                name,
                min_size,
                max_size,
                created_since,
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
                cursor,
            };
            let max = eks_upgrade_agent::model::MAX_SEARCH_LIMIT;
            if q.limit > max {
                anyhow::bail!(
                    "--limit {limit} is above the maximum of {max} per page; use --all for every result"
                );
            }
            search(ctx, m, q, all)
        }
        ArtifactsCmd::Stats { session } => {
            let st = m.stats(session.as_deref())?;
            if ctx.json() {
                print_json(&st)?;
            } else {
                println!(
                    "{} artifacts, {} bytes (average {:.0}) in {} session{}",
                    st.total_artifacts,
                    st.total_size_bytes,
                    st.average_size_bytes,
                    st.sessions_searched,
                    if st.sessions_searched == 1 { "" } else { "s" }
                );
                for (ty, n) in &st.type_distribution {
                    println!(
                        "  {:<14} {n:>8}  {:>14} bytes",
                        ty.as_str(),
                        st.type_bytes.get(ty).copied().unwrap_or(0)
                    );
                }
                for (status, n) in &st.status_distribution {
                    println!("  {:<14} {n:>8}", status.as_str());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCmd::Show { artifact } => {
            let a = m.artifact(&artifact)?;
            if ctx.json() {
                print_json(&a)?;
            } else {
                let v = serde_json::to_value(&a)?;
                let mut out = io::stdout().lock();
                for (k, v) in v.as_object().expect("an artifact is an object") {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    writeln!(out, "{k:<14} {}", printable(&text))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCmd::Get { artifact, out } => get(ctx, m, &artifact, out),
        ArtifactsCmd::Delete { artifact } => {
            let a = m.delete_artifact(&artifact)?;
            if ctx.json() {
                print_json(&a)?;
            } else {
                println!("deleted artifact {} ({})", a.artifact_id, a.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCmd::Export {
            session,
            dir,
            force,
        } => {
            let pb = bar(ctx, "exporting");
            let report = m.export_session(&session, &dir, force, &mut track(&pb));
            pb.finish_and_clear();
            let report = report?;
            if ctx.json() {
                print_json(
                    &json!({"dir": dir, "files": report.files, "bytes": report.bytes,
                    "failures": report.failures.iter().map(|(id, e)| json!({"artifact_id": id, "error": e})).collect::<Vec<_>>()}),
                )?;
            } else {
                println!(
                    "exported {} files ({} bytes) to {}",
                    report.files,
                    report.bytes,
                    dir.display()
                );
                for (id, e) in &report.failures {
                    eprintln!("error: artifact {id}: {}", printable(&e.to_string()));
                }
            }
            Ok(if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ArtifactsCmd::Upload {
            session,
            artifact,
            all,
            retry_failed,
            multipart_threshold,
        } => upload(
            ctx,
            place,
            &UploadRequest {
                session,
                artifact,
                all,
                retry_failed,
                multipart_threshold,
            },
        ),
        ArtifactsCmd::Pull {
            session,
            bucket,
            prefix,
            eager,
        } => pull(
            ctx,
            place,
            &PullRequest {
                session_id: session,
                bucket,
                prefix,
                eager,
            },
        ),
        ArtifactsCmd::Verify => {
            let pb = bar(ctx, "verifying");
            let report = m.verify(&mut track(&pb));
            pb.finish_and_clear();
            let report = report?;
            if ctx.json() {
                print_json(&report)?;
            } else {
                println!(
                    "checked {} blobs ({} bytes) and {} artifacts: {} corrupt, {} missing",
                    report.blobs_checked,
                    report.bytes_checked,
                    report.artifacts_checked,
                    report.corrupt.len(),
                    report.missing.len()
                );
                for (id, name, why) in &report.corrupt {
                    println!("corrupt  {id}  {name}: {why}");
                }
                for (id, name) in &report.missing {
                    println!("missing  {id}  {name}");
                }
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ArtifactsCmd::Cleanup { dry_run, as_of } => {
            let report = m.cleanup(dry_run, as_of)?;
            if ctx.json() {
                print_json(&report)?;
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for e in &report.sessions {
                    println!(
                        "{verb} session {} ({}, upgrade {}{}): {} artifacts, {} bytes, expired {}",
                        e.session.session_id,
                        e.session.name,
                        e.session.upgrade_id,
                        if e.upgrade_failed { ", failed" } else { "" },
                        e.artifacts,
                        e.bytes,
                        crate::output::time(Some(e.expired_at))
                    );
                }
                println!(
                    "{} session{} {verb}; {} blobs removed, {} bytes freed",
                    report.sessions.len(),
                    if report.sessions.len() == 1 { "" } else { "s" },
                    report.blobs_removed,
                    report.bytes_freed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCmd::Gc => {
            let report = m.gc()?;
            if ctx.json() {
                print_json(&report)?;
            } else {
                println!(
                    "removed {} incomplete uploads and {} unreferenced blobs ({} bytes); {} recent unreferenced blobs kept",
                    report.incomplete_removed,
                    report.blobs_removed,
                    report.bytes_freed,
                    report.blobs_in_grace
                );
                if report.orphan_reports_removed > 0 {
                    println!(
                        "deleted {} test reports of runs that were never recorded",
                        report.orphan_reports_removed
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn get(
    ctx: &Ctx,
    m: &dyn Artifacts,
    artifact: &str,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    match out {
        Some(path) if path.as_os_str() != "-" => {
            let n = m.write_to(artifact, &path).with_context(|| {
                format!("cannot write artifact {artifact} to {}", path.display())
            })?;
            if ctx.json() {
                print_json(&json!({"artifact_id": artifact, "path": path, "bytes": n}))?;
            } else {
                eprintln!("wrote {n} bytes to {}", path.display());
            }
        }
        _ => {
            // Verify first, so bad bytes never reach the pipe; then stream.
            let (_, mut check) = m.open(artifact)?;
            eks_upgrade_agent::blob::drain_verified(&mut check)?;
            let (_, mut r) = m.open(artifact)?;
            let mut stdout = io::stdout().lock();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = r.read(&mut buf).map_err(eks_upgrade_agent::Error::from)?;
                if n == 0 {
                    break;
                }
                stdout.write_all(&buf[..n])?;
            }
            stdout.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An upload run on the data dir; returns the bucket and the report.
#[cfg(feature = "aws")]
fn upload_local(
    ctx: &Ctx,
    m: &TestArtifactsManager,
    req: &UploadRequest,
    pb: &ProgressBar,
) -> anyhow::Result<(String, UploadReport)> {
    use eks_upgrade_agent::artifacts::upload::UploadOptions;
    use eks_upgrade_agent::store::UploadSelector;
    let Some(s3) = ctx.config.s3_store()? else {
        anyhow::bail!(
            "no S3 bucket is configured: set --s3-bucket (or EUA_S3_BUCKET, or s3_bucket in the config file)"
        );
    };
    let selector = match (&req.session, &req.artifact, req.all) {
        (Some(s), _, _) => Some(UploadSelector::Session(s.clone())),
        (_, Some(a), _) => Some(UploadSelector::Artifact(a.clone())),
        (_, _, true) => Some(UploadSelector::All),
        _ => None,
    };
    let queue = ctx.upload_queue()?;
    let mut options = UploadOptions::default();
    if let Some(t) = req.multipart_threshold {
        anyhow::ensure!(
            t >= 5 * 1024 * 1024,
            "--multipart-threshold must be at least 5MiB (the smallest S3 part), got {t}"
        );
        options.multipart_threshold = t;
    }
    let report = m.upload(
        queue.as_ref(),
        &s3,
        &options,
        selector.as_ref(),
        req.retry_failed,
        &mut track(pb),
    )?;
    Ok((s3.bucket().to_owned(), report))
}

#[cfg(not(feature = "aws"))]
fn upload_local(
    _: &Ctx,
    _: &TestArtifactsManager,
    _: &UploadRequest,
    _: &ProgressBar,
) -> anyhow::Result<(String, UploadReport)> {
    anyhow::bail!("this build has no S3 support (feature `aws`)")
}

fn upload(ctx: &Ctx, place: Place<'_>, req: &UploadRequest) -> anyhow::Result<ExitCode> {
    let pb = bar(ctx, "uploading");
    let result = match place {
        Place::Local(m) => upload_local(ctx, m, req, &pb),
        Place::Remote(r) => r.upload(req).map_err(anyhow::Error::from),
    };
    pb.finish_and_clear();
    let (bucket, report) = result?;
    if ctx.json() {
        print_json(&report)?;
    } else {
        let total = report.uploaded + report.already_there + report.failed.len() as u64;
        match common_cause(&report.failed) {
            // The same AWS failure for every artifact: said once.
            Some(cause) => {
                println!(
                    "{}/{total} uploaded: {}",
                    report.uploaded + report.already_there,
                    printable(cause)
                );
            }
            None => {
                println!(
                    "uploaded {} ({}), {} already in s3://{bucket}, {} failed",
                    report.uploaded,
                    crate::output::size(report.bytes),
                    report.already_there,
                    report.failed.len()
                );
                for (id, e) in &report.failed {
                    eprintln!("error: artifact {id}: {}", printable(&e.to_string()));
                }
            }
        }
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(feature = "aws")]
fn pull_local(
    m: &TestArtifactsManager,
    req: &PullRequest,
    pb: &ProgressBar,
) -> anyhow::Result<PullReport> {
    let prefix = req
        .prefix
        .clone()
        .unwrap_or_else(|| eks_upgrade_agent::artifacts::upload::DEFAULT_PREFIX.to_owned());
    let s3 = eks_upgrade_agent::blob::S3BlobStore::from_env(&req.bucket, &prefix)?;
    Ok(m.pull(&s3, &req.session_id, req.eager, &mut track(pb))?)
}

#[cfg(not(feature = "aws"))]
fn pull_local(
    _: &TestArtifactsManager,
    _: &PullRequest,
    _: &ProgressBar,
) -> anyhow::Result<PullReport> {
    anyhow::bail!("this build has no S3 support (feature `aws`)")
}

/// Prints the results of a search: one page, or every page with `all` (streamed; with
/// `-o json` still one JSON array). A listing cut at the page size says so on stderr, with
/// how to get the rest.
fn search(
    ctx: &Ctx,
    m: &dyn Artifacts,
    mut q: ArtifactQuery,
    all: bool,
) -> anyhow::Result<ExitCode> {
    let mut out = io::stdout().lock();
    let mut shown = 0u64;
    if ctx.json() {
        write!(out, "[")?;
    }
    let next = loop {
        let page = m.search_page(&q)?;
        let shorts = if ctx.json() {
            Vec::new()
        } else {
            let ids: Vec<&str> = page
                .artifacts
                .iter()
                .map(|a| a.artifact_id.as_str())
                .collect();
            m.shorts(IdKind::Artifact, &ids)
        };
        for (i, a) in page.artifacts.iter().enumerate() {
            if shown == 0 && !ctx.json() {
                artifact_header(&mut out)?;
            }
            if ctx.json() {
                write!(out, "{}\n  ", if shown == 0 { "" } else { "," })?;
                serde_json::to_writer(&mut out, a)?;
            } else {
                artifact_line(&mut out, &shorts[i], a)?;
            }
            shown += 1;
        }
        match page.next_cursor {
            Some(c) if all => q.cursor = Some(c),
            other => break other,
        }
    };
    if ctx.json() {
        writeln!(out, "{}]", if shown == 0 { "" } else { "\n" })?;
    } else if shown == 0 {
        writeln!(out, "no artifacts found")?;
    }
    out.flush()?;
    if let Some(c) = next {
        eprintln!(
            "showing {shown} results; more match: add --cursor {c} for the next page, or --all \
             for every result"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn pull(ctx: &Ctx, place: Place<'_>, req: &PullRequest) -> anyhow::Result<ExitCode> {
    let pb = bar(ctx, "pulling");
    let result = match place {
        Place::Local(m) => pull_local(m, req, &pb),
        Place::Remote(r) => r.pull(req).map_err(anyhow::Error::from),
    };
    pb.finish_and_clear();
    let report = result?;
    if ctx.json() {
        print_json(&report)?;
    } else {
        println!(
            "pulled session {}: {} artifacts, {} downloaded ({} bytes){}",
            report.session_id,
            report.artifacts,
            report.downloaded,
            report.bytes,
            if req.eager {
                ""
            } else {
                "; contents are read from S3 when needed"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn session(ctx: &Ctx, m: &dyn Artifacts, cmd: SessionCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionCmd::Create {
            upgrade,
            cluster,
            name,
            description,
            retention_days,
        } => {
            let s = m.create_session(NewSession {
                upgrade_id: upgrade,
                cluster_name: cluster,
                name,
                description,
                retention_days,
            })?;
            if ctx.json() {
                print_json(&s)?;
            } else {
                println!("{}  {}", s.session_id, printable(&s.name));
            }
        }
        SessionCmd::Complete { session } => {
            let s = m.complete_session(&session)?;
            if ctx.json() {
                print_json(&s)?;
            } else {
                println!(
                    "session {} completed at {}",
                    s.session_id,
                    crate::output::time(s.completed_at)
                );
            }
        }
        SessionCmd::Show { session } => {
            let sum = m.session_summary(&session)?;
            let collections = m.collections(&session)?;
            if ctx.json() {
                let mut v = serde_json::to_value(&sum)?;
                v["collections"] = serde_json::to_value(&collections)?;
                print_json(&v)?;
            } else {
                let s = &sum.session;
                println!("session {}  {}", s.session_id, printable(&s.name));
                println!(
                    "upgrade {}  cluster {}  retention {} days",
                    printable(&s.upgrade_id),
                    printable(&s.cluster_name),
                    s.retention_days
                );
                if let Some(d) = &s.description {
                    println!("description {}", printable(d));
                }
                println!(
                    "started {}  completed {}",
                    crate::output::time(Some(s.started_at)),
                    crate::output::time(s.completed_at)
                );
                println!(
                    "{} collections, {} artifacts, {}, {} uploaded",
                    sum.collections_count,
                    sum.total_artifacts,
                    crate::output::size(sum.total_size_bytes),
                    sum.uploaded_artifacts
                );
                for (ty, n) in &sum.artifact_types {
                    println!("  {:<14} {n}", ty.as_str());
                }
                let ids: Vec<&str> = collections
                    .iter()
                    .map(|c| c.collection_id.as_str())
                    .collect();
                for (c, short) in collections.iter().zip(m.shorts(IdKind::Collection, &ids)) {
                    println!(
                        "collection {}  {}{}",
                        printable(&short),
                        printable(&c.name),
                        c.task_id
                            .as_deref()
                            .map(|t| format!("  (task {t})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        SessionCmd::List { upgrade } => {
            let list = m.sessions(upgrade.as_deref())?;
            if ctx.json() {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no sessions");
            } else {
                let ids: Vec<&str> = list.iter().map(|s| s.session_id.as_str()).collect();
                let rows: Vec<[String; 6]> = list
                    .iter()
                    .zip(m.shorts(IdKind::Session, &ids))
                    .map(|(s, short)| {
                        [
                            printable(&short).into_owned(),
                            if s.completed_at.is_some() {
                                "completed"
                            } else {
                                "open"
                            }
                            .into(),
                            s.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            truncate(&printable(&s.upgrade_id), 24),
                            truncate(&printable(&s.cluster_name), 20),
                            printable(&s.name).into_owned(),
                        ]
                    })
                    .collect();
                print_table(
                    [
                        "ID",
                        "STATUS",
                        "STARTED (UTC)",
                        "UPGRADE",
                        "CLUSTER",
                        "NAME",
                    ],
                    &rows,
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn collection(ctx: &Ctx, m: &dyn Artifacts, cmd: CollectionCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CollectionCmd::Create {
            session,
            name,
            description,
            task_id,
        } => {
            let c =
                m.create_collection(&session, &name, description.as_deref(), task_id.as_deref())?;
            if ctx.json() {
                print_json(&c)?;
            } else {
                println!("{}  {}", c.collection_id, printable(&c.name));
            }
        }
        CollectionCmd::List { session } => {
            let list = m.collections(&session)?;
            if ctx.json() {
                print_json(&list)?;
            } else {
                let ids: Vec<&str> = list.iter().map(|c| c.collection_id.as_str()).collect();
                let rows: Vec<[String; 3]> = list
                    .iter()
                    .zip(m.shorts(IdKind::Collection, &ids))
                    .map(|(c, short)| {
                        [
                            printable(&short).into_owned(),
                            truncate(&printable(c.task_id.as_deref().unwrap_or("-")), 24),
                            printable(&c.name).into_owned(),
                        ]
                    })
                    .collect();
                print_table(["ID", "TASK", "NAME"], &rows)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10KiB").unwrap(), 10 * 1024);
        assert_eq!(parse_size("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("lots").unwrap_err().contains("invalid size"));
        assert!(
            parse_size("5 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("6h").unwrap(), Duration::from_secs(21_600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("1w").unwrap(), Duration::from_secs(604_800));
        assert_eq!(
            parse_time("2026-12-01T00:00:00+02:00").unwrap(),
            "2026-11-30T22:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("invalid duration")
        );
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
