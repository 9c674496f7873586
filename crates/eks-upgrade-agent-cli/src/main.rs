//! `eks-upgrade-agent`: the one binary. Parses flags, layers configuration, opens the store and
//! hands off to the subcommand modules.
//!
//! Exit codes: 0 success; 1 the operation failed (bad input, unknown id, invalid transition,
//! storage error; for `progress apply`, at least one line was rejected); 2 usage error (unknown
//! flag, malformed value); 3 `progress wait` (or `watch --exit-status`): the upgrade ended
//! without reaching the condition, or `tests compare`: the gate failed (new failures, new errors
//! or missing tests); 4 `progress wait`: timed out. A closed stdout (e.g. `| head`)
//! exits 0.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{FromArgMatches, Parser, Subcommand, ValueEnum};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::config::{Config, default_data_dir};
use eks_upgrade_agent::notify::{Dispatcher, DispatcherOptions};
use eks_upgrade_agent::store::Durability;
use eks_upgrade_agent::store::postgres::{PostgresOptions, PostgresStore};
use eks_upgrade_agent::store::remote::{RemoteOptions, RemoteStore};
use eks_upgrade_agent::{SqliteStore, TestArtifactsManager};

mod artifacts;
mod artifacts_apply;
mod config_file;
mod demo;
mod help;
mod kv;
mod notify;
mod output;
mod progress;
mod remote_artifacts;
mod render;
mod requests;
mod serve;
mod store_cmd;
mod test_results;
mod wait;

/// Progress tracking and test artifacts for EKS cluster upgrades.
#[derive(Debug, Parser)]
#[command(name = "eks-upgrade-agent", version, about, max_term_width = 100)]
struct Cli {
    /// Configuration file (TOML) [default: $XDG_CONFIG_HOME/eks-upgrade-agent/config.toml,
    /// else ~/.config/eks-upgrade-agent/config.toml, when it exists]
    #[arg(long, global = true, env = "EUA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Directory holding the store [default: $XDG_DATA_HOME/eks-upgrade-agent, else
    /// ~/.local/share/eks-upgrade-agent]
    #[arg(long, global = true, env = "EUA_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// PostgreSQL instead of the data dir (team mode: several `serve` replicas share it), e.g.
    /// postgres://user:password@host:5432/db?sslmode=disable
    #[arg(
        long,
        global = true,
        env = "EUA_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,

    /// Output format: `table` for people, `json` for programs
    #[arg(short, long, global = true, env = "EUA_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,

    /// Commit durability: `process_crash` survives kill -9 (default), `power_loss` also
    /// fsyncs the WAL at every commit (for power cuts)
    #[arg(long, global = true, env = "EUA_DURABILITY", value_name = "LEVEL")]
    durability: Option<Durability>,

    /// Talk to this server (e.g. http://127.0.0.1:8080) instead of a local data dir; every
    /// `progress` and `artifacts` command works the same
    #[arg(long, global = true, env = "EUA_SERVER", value_name = "URL")]
    server: Option<String>,

    /// With --server: the bearer token (env EUA_TOKEN). For `serve`: TOKEN:ROLE, ROLE read or
    /// write (repeatable; env EUA_TOKENS, comma-separated)
    #[arg(
        long = "token",
        global = true,
        value_name = "TOKEN",
        hide_env_values = true
    )]
    tokens: Vec<String>,

    /// More log output on stderr: -v adds the AWS SDK's and libraries' warnings, -vv info,
    /// -vvv debug (EUA_LOG or RUST_LOG, e.g. `aws_config=debug`, override)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(flatten)]
    notify: notify::NotifyArgs,

    #[command(flatten)]
    s3: artifacts::S3Args,

    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable tables and trees.
    Table,
    /// Machine-readable JSON.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Track upgrades and their tasks
    #[command(subcommand)]
    Progress(progress::ProgressCmd),
    /// Keep, find, verify and export test artifacts
    #[command(subcommand)]
    Artifacts(artifacts::ArtifactsCmd),
    /// Test results as data: ingest JUnit XML, compare pre/post with a gate, history, flaky
    #[command(subcommand)]
    Tests(test_results::TestsCmd),
    /// Simulate a realistic EKS upgrade into the store, with live progress bars
    Demo(demo::DemoArgs),
    /// See and deliver pending notifications (EventBridge, webhook)
    #[command(subcommand)]
    Notify(notify::NotifyCmd),
    /// Serve the HTTP API, live streams and the dashboard
    Serve(serve::ServeArgs),
    /// The store itself: schema migrations and what it holds
    #[command(subcommand)]
    Store(store_cmd::StoreCmd),
    /// Print shell completions
    Completion {
        /// bash, zsh, fish, powershell or elvish
        shell: clap_complete::Shell,
    },
}

/// A tracker over the local store, a server's or a database, and which one it is.
struct Backend {
    tracker: ProgressTracker,
    local: Option<Arc<SqliteStore>>,
    remote: Option<Arc<RemoteStore>>,
    database: Option<Arc<PostgresStore>>,
}

impl Backend {
    /// After a local change: one notification delivery pass (a server delivers its own).
    fn after_commit(&self, ctx: &Ctx) {
        if let Some(store) = &self.local {
            notify::after_commit(ctx, store);
        }
    }

    /// Artifacts per task of an upgrade.
    fn artifact_counts(
        &self,
        ctx: &Ctx,
        upgrade: &str,
    ) -> anyhow::Result<std::collections::HashMap<String, u64>> {
        if let Some(remote) = &self.remote {
            return Ok(remote.get_json(&format!(
                "/api/v1/upgrades/{}/artifact_counts",
                eks_upgrade_agent::store::remote::encode(upgrade)
            ))?);
        }
        if let Some(db) = &self.database {
            use eks_upgrade_agent::store::ArtifactIndex;
            return Ok(db.artifact_counts_by_task(upgrade)?);
        }
        let store = self.local.clone().expect("local or remote");
        Ok(ctx.artifacts_on(store)?.counts_by_task(upgrade)?)
    }
}

/// Whether a command may create the data dir and its store (`Create`: it creates something,
/// e.g. an upgrade or a session) or needs them to exist (`Existing`: it reads, or changes what
/// is there, and a missing store is an error that names the directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Existing,
    Create,
}

/// What every subcommand gets.
struct Ctx {
    output: Output,
    config: Config,
    /// `tokens` from the configuration file (for `serve`).
    file_tokens: Vec<String>,
    /// Allowed hosts and origins from the configuration file (for `serve`).
    file_guard: config_file::FileGuard,
    /// `--token` values.
    tokens: Vec<String>,
    /// `--server`.
    server: Option<String>,
    /// `--database-url` (or the file's `database_url`).
    database_url: Option<String>,
}

impl Ctx {
    /// The PostgreSQL store of `--database-url`, migrated; `None` without one.
    fn database(&self, pool_size: u32) -> anyhow::Result<Option<Arc<PostgresStore>>> {
        let Some(url) = &self.database_url else {
            return Ok(None);
        };
        let options = PostgresOptions {
            pool_size,
            ..PostgresOptions::default()
        };
        let store = PostgresStore::open(url, &options).with_context(|| {
            format!(
                "cannot open the database {}",
                eks_upgrade_agent::store::postgres::progress::redact(url)
            )
        })?;
        Ok(Some(Arc::new(store)))
    }

    /// Refuses data-dir commands that the database does not serve yet, rather than quietly
    /// using the data dir.
    fn no_database(&self) -> anyhow::Result<()> {
        if self.database_url.is_some() {
            anyhow::bail!(
                "this command does not work with --database-url (EUA_DATABASE_URL) yet: only \
                 `progress`, `artifacts`, `tests`, `serve` and `store` do; unset it to use the data dir"
            );
        }
        Ok(())
    }

    /// The local store, created when missing (commands that create things).
    fn store(&self) -> anyhow::Result<Arc<SqliteStore>> {
        self.no_database()?;
        let store = self.config.open_store().with_context(|| {
            format!(
                "cannot open the store in {}",
                self.config.data_dir.display()
            )
        })?;
        Ok(Arc::new(store))
    }

    /// The local store when it exists; a clear error naming the directory otherwise, and
    /// nothing created (every command but those that create).
    fn existing_store(&self) -> anyhow::Result<Arc<SqliteStore>> {
        self.no_database()?;
        match self.config.open_existing_store() {
            Ok(store) => Ok(Arc::new(store)),
            Err(eks_upgrade_agent::Error::NotFound { .. }) => anyhow::bail!(
                "no store in {}: check --data-dir (or EUA_DATA_DIR); commands that create things \
                 (`progress upgrade create`, `artifacts session create`, ...) create it",
                self.config.data_dir.display()
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "cannot open the store in {}",
                    self.config.data_dir.display()
                )
            }),
        }
    }

    /// [`Ctx::store`] or [`Ctx::existing_store`].
    fn store_for(&self, access: Access) -> anyhow::Result<Arc<SqliteStore>> {
        match access {
            Access::Create => self.store(),
            Access::Existing => self.existing_store(),
        }
    }

    /// Team mode: the artifacts of the database, their bytes in S3 (required) behind the data
    /// dir's blob cache.
    #[cfg(feature = "aws")]
    fn team_artifacts(&self, db: Arc<PostgresStore>) -> anyhow::Result<TestArtifactsManager> {
        Ok(self.config.team_artifacts_manager(db)?)
    }

    #[cfg(not(feature = "aws"))]
    fn team_artifacts(&self, _: Arc<PostgresStore>) -> anyhow::Result<TestArtifactsManager> {
        anyhow::bail!(
            "artifacts with --database-url need S3: this build has no S3 support (feature `aws`)"
        )
    }

    /// The upload queue: the database's, else the data dir's.
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    fn upload_queue(&self) -> anyhow::Result<Arc<dyn eks_upgrade_agent::store::UploadQueue>> {
        if let Some(db) = self.database(4)? {
            return Ok(db);
        }
        Ok(self.store()?)
    }

    fn artifacts_on(&self, store: Arc<SqliteStore>) -> anyhow::Result<TestArtifactsManager> {
        self.config.artifacts_manager(store).with_context(|| {
            format!(
                "cannot open the blob store in {}",
                self.config.blob_dir().display()
            )
        })
    }

    /// The notification dispatcher over `store`, when sinks are configured.
    fn dispatcher(&self, store: &Arc<SqliteStore>) -> anyhow::Result<Option<Arc<Dispatcher>>> {
        if self.config.notify.is_empty() {
            return Ok(None);
        }
        let sinks = self
            .config
            .notify
            .sinks(store.clone())
            .context("cannot set up notification sinks")?;
        Ok(Some(Arc::new(Dispatcher::new(
            store.clone(),
            sinks,
            DispatcherOptions::default(),
        ))))
    }

    /// The server's store when `--server` is given.
    fn remote(&self) -> anyhow::Result<Option<Arc<RemoteStore>>> {
        let Some(url) = &self.server else {
            return Ok(None);
        };
        if self.tokens.len() > 1 {
            anyhow::bail!("give one --token with --server");
        }
        let token = self
            .tokens
            .first()
            .cloned()
            .or_else(|| std::env::var("EUA_TOKEN").ok().filter(|t| !t.is_empty()));
        let mut options = RemoteOptions {
            allow_plain_http: allow_plain_http()?,
            ..RemoteOptions::default()
        };
        if let Some(limit) = server_idle_limit()? {
            options.idle_limit = limit;
        }
        let remote = RemoteStore::with_options(url, token.as_deref(), &options)?;
        Ok(Some(Arc::new(remote)))
    }

    /// Where progress lives: the local store, or the server's with `--server`.
    fn progress_backend(&self, access: Access) -> anyhow::Result<Backend> {
        if let Some(remote) = self.remote()? {
            return Ok(Backend {
                tracker: ProgressTracker::new(remote.clone()),
                local: None,
                remote: Some(remote),
                database: None,
            });
        }
        if let Some(db) = self.database(4)? {
            return Ok(Backend {
                tracker: ProgressTracker::new(db.clone()),
                local: None,
                remote: None,
                database: Some(db),
            });
        }
        let store = self.store_for(access)?;
        Ok(Backend {
            tracker: ProgressTracker::new(store.clone()),
            local: Some(store),
            remote: None,
            database: None,
        })
    }

    fn json(&self) -> bool {
        self.output == Output::Json
    }
}

/// The log filter: EUA_LOG, else RUST_LOG, else by `-v`: without it only this program's own
/// warnings (the AWS SDK and HTTP libraries stay quiet: their failures reach the user as one
/// summarised error), `-v` everyone's warnings, `-vv` info, `-vvv` debug.
fn log_filter(verbose: u8) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    EnvFilter::try_from_env("EUA_LOG")
        .or_else(|_| EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| {
            EnvFilter::new(match verbose {
                0 => "off,eks_upgrade_agent=warn,eks_upgrade_agent_server=warn",
                1 => "warn",
                2 => "info",
                _ => "debug",
            })
        })
}

fn main() -> ExitCode {
    let matches = help::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(cli.verbose))
        .with_writer(io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            // Messages may carry text from elsewhere (a server's reply, a stored name).
            let text = format!("{err:#}");
            if std::env::var_os("EUA_ERROR_FORMAT").is_some_and(|v| v == "json") {
                // For programs (the Python package): the library error's code with the message.
                let code = err
                    .chain()
                    .find_map(|e| e.downcast_ref::<eks_upgrade_agent::Error>())
                    .map_or("failed", |e| e.code());
                let v = serde_json::json!({"error": {"code": code, "message": text}});
                let _ = writeln!(io::stderr(), "{v}");
            } else {
                let _ = writeln!(io::stderr(), "error: {}", output::printable(&text));
            }
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            // `-o json` writes through serde_json, whose error wraps the I/O error.
            || e.downcast_ref::<serde_json::Error>()
                .is_some_and(|e| e.io_error_kind() == Some(io::ErrorKind::BrokenPipe))
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Completion { shell } = cli.command {
        // Reads no configuration and touches no store.
        let mut script = Vec::new();
        clap_complete::generate(
            shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "eks-upgrade-agent",
            &mut script,
        );
        let mut script = String::from_utf8(script).context("completion script")?;
        if shell == clap_complete::Shell::Bash {
            // clap_complete 4.6 spells a hyphenated binary's state two ways in bash (the loop
            // `eks__upgrade__agent__subcmd__progress`, the case arms
            // `eks__subcmd__upgrade__subcmd__agent__subcmd__progress`), so nothing past the
            // first word would complete (clap-rs/clap#6421): use the loop's spelling.
            script = script.replace("eks__subcmd__upgrade__subcmd__agent", "eks__upgrade__agent");
        }
        let mut out = io::stdout().lock();
        out.write_all(script.as_bytes())?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    // Defaults, then the config file, then EUA_* variables and flags (clap merges those two).
    let file = config_file::load(cli.config.as_deref())?;
    let mut config = Config::new(
        cli.data_dir
            .or(file.data_dir.clone())
            .unwrap_or_else(default_data_dir),
    );
    if let Some(d) = cli.durability.or(file.durability) {
        config.durability = d;
    }
    config.notify = file.notify(cli.notify.into_config()?)?;
    config.s3 = eks_upgrade_agent::config::S3Config {
        s3_bucket: cli
            .s3
            .s3_bucket
            .filter(|b| !b.is_empty())
            .or(file.s3_bucket.clone()),
        s3_prefix: cli.s3.s3_prefix.or(file.s3_prefix.clone()),
        auto_upload: cli.s3.auto_upload.or(file.auto_upload).unwrap_or(false),
    };
    if let Some(n) = cli.s3.blob_cache_size {
        config.blob_cache_bytes = n;
    } else if let Some(text) = &file.blob_cache_size {
        config.blob_cache_bytes = eks_upgrade_agent::units::parse_size(text).map_err(|e| {
            anyhow::anyhow!("invalid blob_cache_size in the configuration file: {e}")
        })?;
    }
    let ctx = Ctx {
        output: cli.output,
        config,
        file_tokens: file.tokens.clone().unwrap_or_default(),
        file_guard: file.guard(),
        tokens: cli.tokens,
        server: cli.server.filter(|s| !s.is_empty()),
        database_url: cli
            .database_url
            .filter(|u| !u.is_empty())
            .or(file.database_url.clone()),
    };
    if ctx.database_url.is_some() && ctx.server.is_some() {
        anyhow::bail!(
            "give either --server (a server's store) or --database-url (a database), not both"
        );
    }
    match cli.command {
        Command::Progress(cmd) => progress::run(&ctx, cmd),
        Command::Artifacts(cmd) => artifacts::run(&ctx, cmd),
        Command::Tests(cmd) => test_results::run(&ctx, cmd),
        Command::Demo(args) => demo::run(&ctx, args),
        Command::Notify(cmd) => notify::run(&ctx, cmd),
        Command::Serve(args) => serve::run(&ctx, args),
        Command::Store(cmd) => store_cmd::run(&ctx, cmd),
        Command::Completion { .. } => unreachable!("handled before the configuration is read"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The defaults the README states: `serve` and `demo --serve` listen on 127.0.0.1:8080,
    /// `serve` serves 1,024 connections at once; `--max-connections` changes it, and 0 is
    /// refused.
    #[test]
    fn serve_defaults_and_the_connection_cap_settings() {
        let serve = |argv: &[&str]| match super::Cli::try_parse_from(argv).unwrap().command {
            super::Command::Serve(args) => args,
            _ => unreachable!(),
        };
        // (`EUA_MAX_CONNECTIONS` is proven end to end by tests/it/settings.rs.)
        assert!(
            std::env::var_os("EUA_MAX_CONNECTIONS").is_none(),
            "run the tests without EUA_MAX_CONNECTIONS"
        );
        let args = serve(&["eks-upgrade-agent", "serve"]);
        assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.max_connections, 1024);
        assert_eq!(
            serve(&["eks-upgrade-agent", "serve", "--max-connections", "7"]).max_connections,
            7
        );
        assert!(
            super::Cli::try_parse_from(["eks-upgrade-agent", "serve", "--max-connections", "0"])
                .is_err()
        );
        assert_eq!(args.group_wait_ms, 2);
        assert_eq!(
            serve(&["eks-upgrade-agent", "serve", "--group-wait", "0"]).group_wait_ms,
            0
        );
        assert!(
            super::Cli::try_parse_from(["eks-upgrade-agent", "serve", "--group-wait", "5000"])
                .is_err()
        );
        match super::Cli::try_parse_from(["eks-upgrade-agent", "demo", "--serve"])
            .unwrap()
            .command
        {
            super::Command::Demo(args) => {
                assert_eq!(args.serve.unwrap().to_string(), "127.0.0.1:8080")
            }
            _ => unreachable!(),
        }
    }

    /// "`--help` works at every level": every command and subcommand, walked from the
    /// definition (so a new one is covered without listing it), answers `--help` with its usage;
    /// every leaf command has examples, and each example parses.
    #[test]
    fn help_works_at_every_level() {
        let root = super::help::command();
        root.clone().debug_assert();
        fn walk(
            root: &clap::Command,
            cmd: &clap::Command,
            path: &mut Vec<String>,
            seen: &mut usize,
        ) {
            let mut args = vec!["eks-upgrade-agent".to_owned()];
            args.extend(path.iter().cloned());
            args.push("--help".into());
            let err = root
                .clone()
                .try_get_matches_from(&args)
                .expect_err("--help exits");
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{args:?}");
            let text = err.to_string();
            assert!(text.contains("Usage:"), "{args:?}: {text}");
            *seen += 1;
            if cmd.get_subcommands().next().is_none() && cmd.get_name() != "help" {
                let examples = super::help::examples(&path.join(" "))
                    .unwrap_or_else(|| panic!("no examples for {path:?}"));
                assert!(text.contains("Examples:"), "{args:?}: {text}");
                for line in examples.lines() {
                    let words = shell_words(line.trim_start_matches("  eks-upgrade-agent "));
                    let mut argv = vec!["eks-upgrade-agent".to_owned()];
                    argv.extend(words);
                    if let Err(e) = root.clone().try_get_matches_from(&argv) {
                        panic!("example {line:?} of {path:?} does not parse: {e}");
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                path.push(sub.get_name().to_owned());
                walk(root, sub, path, seen);
                path.pop();
            }
        }
        let mut seen = 0;
        walk(&root, &root, &mut Vec::new(), &mut seen);
        assert!(seen > 40, "only {seen} commands");
    }

    /// Words of an example line: double quotes group, `#`, `|`, `<` and `>` end the command.
    fn shell_words(line: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word = String::new();
        let (mut quoted, mut any) = (false, false);
        for c in line.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    any = true;
                }
                '#' | '|' | '<' | '>' if !quoted => break,
                c if c.is_whitespace() && !quoted => {
                    if any {
                        words.push(std::mem::take(&mut word));
                        any = false;
                    }
                }
                c => {
                    word.push(c);
                    any = true;
                }
            }
        }
        if any {
            words.push(word);
        }
        words
    }
}

/// `EUA_ALLOW_PLAIN_HTTP=1`: a token or credentials may go to `--server` over plain http beyond
/// loopback (the hop is encrypted underneath, e.g. by a service mesh).
fn allow_plain_http() -> anyhow::Result<bool> {
    parse_allow_plain_http(std::env::var("EUA_ALLOW_PLAIN_HTTP").ok().as_deref())
}

/// `EUA_SERVER_IDLE_LIMIT=SECONDS`: how long a `--server` request waits out the server's
/// silence before it gives up (default 300 s; a server at work sends a line at least every
/// 15 s, see README "Remote CLI").
fn server_idle_limit() -> anyhow::Result<Option<std::time::Duration>> {
    parse_server_idle_limit(std::env::var("EUA_SERVER_IDLE_LIMIT").ok().as_deref())
}

fn parse_server_idle_limit(value: Option<&str>) -> anyhow::Result<Option<std::time::Duration>> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Some(std::time::Duration::from_secs_f64(s))),
        _ => anyhow::bail!(
            "EUA_SERVER_IDLE_LIMIT must be a number of seconds above 0 and at most 86400, not {v:?}"
        ),
    }
}

fn parse_allow_plain_http(value: Option<&str>) -> anyhow::Result<bool> {
    match value {
        None | Some("") | Some("0") | Some("false") => Ok(false),
        Some("1") | Some("true") => Ok(true),
        Some(other) => anyhow::bail!("EUA_ALLOW_PLAIN_HTTP must be 1 or 0, not {other:?}"),
    }
}

#[cfg(test)]
mod allow_plain_http_tests {
    #[test]
    fn the_opt_out_takes_one_or_zero() {
        let allow = super::parse_allow_plain_http;
        assert!(allow(Some("1")).unwrap() && allow(Some("true")).unwrap());
        for off in [None, Some(""), Some("0"), Some("false")] {
            assert!(!allow(off).unwrap(), "{off:?}");
        }
        let e = allow(Some("yes please")).unwrap_err().to_string();
        assert!(e.contains("EUA_ALLOW_PLAIN_HTTP must be 1 or 0"), "{e}");
    }

    #[test]
    fn the_idle_limit_takes_positive_seconds() {
        let limit = super::parse_server_idle_limit;
        assert_eq!(limit(None).unwrap(), None);
        assert_eq!(limit(Some("")).unwrap(), None);
        assert_eq!(
            limit(Some("1.5")).unwrap(),
            Some(std::time::Duration::from_millis(1500))
        );
        for bad in ["0", "-1", "soon", "NaN", "inf", "1e9"] {
            let e = limit(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("EUA_SERVER_IDLE_LIMIT must be"), "{bad}: {e}");
        }
    }
}
