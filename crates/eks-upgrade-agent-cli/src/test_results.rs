//! `eks-upgrade-agent tests ...`: JUnit reports as data. `ingest` records a run (and keeps the
//! files as `test_result` artifacts), `compare` classifies pre → post and gates (exit 3 when the
//! gate fails), `runs`, `show`, `history` and `flaky` read them back. On the local data dir,
//! with `--database-url` on PostgreSQL (the files kept in S3 when a bucket is set), or with
//! `--server` through the server's `/api/v1/tests/...` API (the same output).

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;

use eks_upgrade_agent::artifacts::AddOptions;
use eks_upgrade_agent::model::{
    ComparedTest, Comparison, FlakyTest, HistoryEntry, RunPhase, RunQuery, TestResult, TestRun,
};
use eks_upgrade_agent::results::{Ingest, KeepFiles, TestResults};
use eks_upgrade_agent::store::remote::{RemoteStore, encode};
use eks_upgrade_agent::{ProgressTracker, TestArtifactsManager};

use crate::output::{
    artifact_header, artifact_line, duration, print_json, printable, time, truncate,
};
use crate::remote_artifacts::{Artifacts, RemoteArtifacts};
use crate::{Access, Ctx};
use eks_upgrade_agent::model::ArtifactType;
use eks_upgrade_agent::store::IdKind;

/// Exit code of `tests compare` when the gate fails.
pub(crate) const GATE_FAILED: u8 = 3;

#[derive(Debug, Subcommand)]
pub(crate) enum TestsCmd {
    /// Record one run from JUnit XML files (kept as test_result artifacts)
    Ingest {
        /// JUnit XML reports (one run for all of them)
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The upgrade the run belongs to
        #[arg(long)]
        upgrade: String,
        /// pre, post or adhoc
        #[arg(long, value_parser = parse_phase)]
        phase: RunPhase,
        /// Suite name for every test [default: each <testsuite name>]
        #[arg(long)]
        suite: Option<String>,
        /// Framework, part of each test's identity [default: detected: pytest, surefire,
        /// ginkgo, jest, go or junit]
        #[arg(long)]
        framework: Option<String>,
        /// Cluster [default: the upgrade's]
        #[arg(long)]
        cluster: Option<String>,
        /// Session keeping the files [default: the upgrade's latest, created when missing]
        #[arg(long)]
        session: Option<String>,
        /// Collection keeping the files [default: the session's `validation` collection]
        #[arg(long, requires = "session")]
        collection: Option<String>,
    },
    /// Compare two runs: the upgrade's latest pre and post runs, or RUN_A then RUN_B; exit 3
    /// when the gate fails (new failures, new errors or missing tests)
    Compare {
        /// The first (pre) run
        #[arg(requires = "run_b", conflicts_with = "upgrade")]
        run_a: Option<String>,
        /// The second (post) run
        run_b: Option<String>,
        /// Compare this upgrade's latest pre and post runs
        #[arg(long, required_unless_present = "run_a")]
        upgrade: Option<String>,
    },
    /// List runs, newest first
    Runs {
        /// Only this upgrade's
        #[arg(long)]
        upgrade: Option<String>,
        /// Only this cluster's
        #[arg(long)]
        cluster: Option<String>,
        /// Only pre, post or adhoc runs
        #[arg(long, value_parser = parse_phase)]
        phase: Option<RunPhase>,
        /// At most this many
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show a run: counts, then its failures and errors with their messages
    Show {
        /// Run id (a prefix of 4+ characters works)
        run: String,
    },
    /// Every result of the tests named NAME (or with that test id), newest first
    History {
        /// Test name, or test id
        name: String,
        /// Only this cluster's
        #[arg(long)]
        cluster: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Tests that passed and failed on a cluster within the window (cleared after 5 passes in
    /// a row)
    Flaky {
        /// Only this cluster's
        #[arg(long)]
        cluster: Option<String>,
        /// Window, days
        #[arg(long, default_value_t = 14)]
        days: u32,
    },
}

pub(crate) fn parse_phase(s: &str) -> Result<RunPhase, String> {
    s.parse()
        .map_err(|e: eks_upgrade_agent::Error| e.to_string())
}

/// `artifacts add --type test_result --phase P`: the JUnit XML files are kept and recorded as
/// one run of the session's upgrade (through `tests ingest`); other files are only kept. On a
/// server the report is uploaded with `type=test_result&phase=P` (the server keeps and records
/// it the same way), one report per command as `tests ingest --server`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_with_phase(
    ctx: &Ctx,
    m: &dyn Artifacts,
    local: Option<&TestArtifactsManager>,
    remote: Option<&RemoteArtifacts>,
    session: &str,
    collection: &str,
    paths: &[PathBuf],
    opts: &AddOptions,
    phase: RunPhase,
) -> anyhow::Result<ExitCode> {
    if opts.artifact_type != Some(ArtifactType::TestResult) {
        anyhow::bail!("--phase records test results: give it with --type test_result");
    }
    let mut junit = Vec::new();
    let mut other = Vec::new();
    for p in paths {
        if !p.is_file() {
            anyhow::bail!(
                "{} is not a file: with --phase, give the JUnit XML files themselves",
                printable(&p.to_string_lossy())
            );
        }
        if eks_upgrade_agent::results::junit::is_junit(p)? {
            junit.push(p.clone());
        } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("xml")) {
            // An XML file given as a test result with a phase is meant to be a report: an
            // empty or broken one (what a crashed suite leaves) is an error, not an opaque
            // artifact that hides the missing run.
            let label = p.to_string_lossy();
            eks_upgrade_agent::results::junit::parse_file(
                p,
                &label,
                &Default::default(),
                &mut |_| Ok(()),
            )?;
            anyhow::bail!(
                "{}: not a JUnit XML report (its root is not <testsuites> or <testsuite>); \
                 nothing was stored",
                printable(&label)
            );
        } else {
            other.push(p.clone());
        }
    }
    // The other files' names are checked before the reports are recorded: a refused name
    // fails the command before a run is stored (a retry would record a second run).
    if !other.is_empty() {
        eks_upgrade_agent::artifacts::plan_paths(&other, opts)?;
    }
    let local = match (local, remote) {
        (Some(l), _) => l,
        (None, None) => anyhow::bail!("--phase needs a data dir, a database or a server"),
        (None, Some(r)) => {
            if junit.len() > 1 {
                anyhow::bail!(
                    "against a server, give one JUnit report per command (the server records \
                     one report per run): {} given",
                    junit.len()
                );
            }
            // The report first: when the server refuses it, nothing else was stored.
            let mut added = Vec::new();
            let mut run = None;
            if let Some(report) = junit.first() {
                let (artifact, r) = r.add_report(session, collection, report, opts, phase)?;
                added.push(artifact);
                run = Some(r);
            }
            if !other.is_empty() {
                added.extend(m.add_paths(session, collection, &other, opts, &mut |_| {})?);
            }
            return print_added(ctx, m, &added, run.as_ref());
        }
    };
    let s = local.session(session)?;
    let mut added = Vec::new();
    let mut run = None;
    if !junit.is_empty() {
        // The run goes where the artifacts are: the database (team mode) or the data dir.
        let (results, tracker, sqlite) = match ctx.database(4)? {
            Some(db) => (TestResults::new(db.clone()), ProgressTracker::new(db), None),
            None => {
                let store = ctx.store_for(Access::Existing)?;
                (
                    TestResults::new(store.clone()),
                    ProgressTracker::new(store.clone()),
                    Some(store),
                )
            }
        };
        let r = ingest(
            &tracker,
            &results,
            local,
            &junit,
            Ingest {
                upgrade_id: s.upgrade_id.clone(),
                cluster_name: s.cluster_name.clone(),
                phase,
                suite: None,
                framework: None,
                labels: Vec::new(),
            },
            Some(session),
            Some(collection),
            Some(opts),
        )?;
        if let Some(store) = &sqlite {
            crate::notify::after_commit(ctx, store);
        }
        for id in &r.artifact_ids {
            added.push(local.artifact(id)?);
        }
        run = Some(r);
    }
    if !other.is_empty() {
        added.extend(m.add_paths(session, collection, &other, opts, &mut |_| {})?);
    }
    print_added(ctx, m, &added, run.as_ref())
}

/// What `artifacts add --phase` prints: the artifacts, then the run recorded.
fn print_added(
    ctx: &Ctx,
    m: &dyn Artifacts,
    added: &[eks_upgrade_agent::model::TestArtifact],
    run: Option<&TestRun>,
) -> anyhow::Result<ExitCode> {
    if ctx.json() {
        print_json(&added)?;
    } else {
        let mut out = io::stdout().lock();
        artifact_header(&mut out)?;
        let ids: Vec<&str> = added.iter().map(|a| a.artifact_id.as_str()).collect();
        for (a, short) in added.iter().zip(m.shorts(IdKind::Artifact, &ids)) {
            artifact_line(&mut out, &short, a)?;
        }
        writeln!(
            out,
            "added {} artifact{}",
            added.len(),
            if added.len() == 1 { "" } else { "s" }
        )?;
        if let Some(r) = run {
            print_run_line(&mut out, "recorded", r)?;
        }
    }
    if let Some(r) = run {
        eprintln!("test run {} recorded ({} tests)", r.run_id, r.counts.tests);
    }
    Ok(ExitCode::SUCCESS)
}

/// Where test results live: the local store, or a server's API (`--server`).
enum Results {
    Local(TestResults),
    Remote(Arc<RemoteStore>),
}

/// `?k=v&...` of the pairs that have a value (empty when none has).
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

impl Results {
    fn compare(&self, a: &str, b: &str) -> eks_upgrade_agent::Result<Comparison> {
        match self {
            Results::Local(r) => r.compare(a, b),
            Results::Remote(s) => s.get_json(&format!(
                "/api/v1/tests/compare{}",
                query(&[("a", Some(a.to_owned())), ("b", Some(b.to_owned()))])
            )),
        }
    }

    fn compare_upgrade(&self, u: &str) -> eks_upgrade_agent::Result<Comparison> {
        match self {
            Results::Local(r) => r.compare_upgrade(u),
            Results::Remote(s) => {
                s.get_json(&format!("/api/v1/upgrades/{}/tests/compare", encode(u)))
            }
        }
    }

    fn runs(&self, q: &RunQuery) -> eks_upgrade_agent::Result<Vec<TestRun>> {
        match self {
            Results::Local(r) => r.runs(q),
            Results::Remote(s) => s.get_json(&format!(
                "/api/v1/tests/runs{}",
                query(&[
                    ("upgrade", q.upgrade_id.clone()),
                    ("cluster", q.cluster_name.clone()),
                    ("phase", q.phase.map(|p| p.to_string())),
                    ("limit", Some(q.limit.to_string())),
                ])
            )),
        }
    }

    fn show(&self, run: &str) -> eks_upgrade_agent::Result<(TestRun, Vec<TestResult>)> {
        match self {
            Results::Local(r) => {
                let run = r.run(run)?;
                let failing = r.results(&run.run_id, true)?;
                Ok((run, failing))
            }
            Results::Remote(s) => {
                #[derive(serde::Deserialize)]
                struct Shown {
                    run: TestRun,
                    failures: Vec<TestResult>,
                }
                let v: Shown = s.get_json(&format!("/api/v1/tests/runs/{}", encode(run)))?;
                Ok((v.run, v.failures))
            }
        }
    }

    fn history(
        &self,
        name: &str,
        cluster: Option<&str>,
        limit: usize,
    ) -> eks_upgrade_agent::Result<Vec<HistoryEntry>> {
        match self {
            Results::Local(r) => r.history(name, cluster, limit),
            Results::Remote(s) => s.get_json(&format!(
                "/api/v1/tests/history{}",
                query(&[
                    ("name", Some(name.to_owned())),
                    ("cluster", cluster.map(str::to_owned)),
                    ("limit", Some(limit.to_string())),
                ])
            )),
        }
    }

    fn flaky(&self, cluster: Option<&str>, days: u32) -> eks_upgrade_agent::Result<Vec<FlakyTest>> {
        match self {
            Results::Local(r) => r.flaky(cluster, Some(days)),
            Results::Remote(s) => s.get_json(&format!(
                "/api/v1/tests/flaky{}",
                query(&[
                    ("cluster", cluster.map(str::to_owned)),
                    ("days", Some(days.to_string())),
                ])
            )),
        }
    }
}

/// `tests ingest --server`: one report per call (the API records one report per run), streamed
/// to `POST /api/v1/tests/ingest` with the same options as a local ingest.
#[allow(clippy::too_many_arguments)]
fn ingest_remote(
    remote: &RemoteStore,
    files: &[PathBuf],
    upgrade: String,
    phase: RunPhase,
    suite: Option<String>,
    framework: Option<String>,
    cluster: Option<String>,
    session: Option<String>,
    collection: Option<String>,
) -> anyhow::Result<TestRun> {
    let [file] = files else {
        anyhow::bail!(
            "against a server, ingest one report per command (the API records one report per \
             run): give one file, or drop --server"
        );
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let body = std::fs::File::open(file).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {e} (give the path of a JUnit XML report)",
            printable(&file.to_string_lossy())
        )
    })?;
    let path = format!(
        "/api/v1/tests/ingest{}",
        query(&[
            ("upgrade", Some(upgrade)),
            ("phase", Some(phase.to_string())),
            ("name", Some(name)),
            ("suite", suite),
            ("framework", framework),
            ("cluster", cluster),
            ("session", session),
            ("collection", collection),
        ])
    );
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, body);
    let resp = remote.post_stream(&path, "application/xml", &mut reader)?;
    remote
        .answer(resp)
        .context("cannot ingest the test results")
}

pub(crate) fn run(ctx: &Ctx, cmd: TestsCmd) -> anyhow::Result<ExitCode> {
    let remote = ctx.remote()?;
    let database = match &remote {
        Some(_) => None,
        None => ctx.database(4)?,
    };
    let (results, local) = match (remote, &database) {
        (Some(r), _) => (Results::Remote(r), None),
        (None, Some(db)) => (Results::Local(TestResults::new(db.clone())), None),
        (None, None) => {
            let access = match &cmd {
                TestsCmd::Ingest { .. } => Access::Create,
                _ => Access::Existing,
            };
            let store = ctx.store_for(access)?;
            (Results::Local(TestResults::new(store.clone())), Some(store))
        }
    };
    match cmd {
        TestsCmd::Ingest {
            files,
            upgrade,
            phase,
            suite,
            framework,
            cluster,
            session,
            collection,
        } => {
            let run = match (&results, &local) {
                (Results::Local(r), Some(store)) => {
                    let artifacts = ctx.artifacts_on(store.clone())?;
                    let run = ingest(
                        &ProgressTracker::new(store.clone()),
                        r,
                        &artifacts,
                        &files,
                        Ingest {
                            upgrade_id: upgrade,
                            cluster_name: cluster.unwrap_or_default(),
                            phase,
                            suite,
                            framework,
                            labels: Vec::new(),
                        },
                        session.as_deref(),
                        collection.as_deref(),
                        None,
                    )?;
                    crate::notify::after_commit(ctx, store);
                    run
                }
                (Results::Local(r), None) => {
                    // On the database (team mode): the reports are kept in S3 + the database's
                    // artifact index, as on a data dir; without a bucket they are recorded
                    // only (a warning says so), and asking to keep them is refused.
                    let Some(db) = &database else {
                        unreachable!("local results without a store are the database's")
                    };
                    let tracker = ProgressTracker::new(db.clone());
                    let what = Ingest {
                        upgrade_id: upgrade,
                        cluster_name: cluster.unwrap_or_default(),
                        phase,
                        suite,
                        framework,
                        labels: Vec::new(),
                    };
                    if ctx.config.s3.s3_bucket.is_some() {
                        let artifacts = ctx.team_artifacts(db.clone())?;
                        ingest(
                            &tracker,
                            r,
                            &artifacts,
                            &files,
                            what,
                            session.as_deref(),
                            collection.as_deref(),
                            None,
                        )?
                    } else {
                        if session.is_some() || collection.is_some() {
                            anyhow::bail!(NO_BUCKET_TO_KEEP);
                        }
                        let run = record_only(&tracker, r, &files, what)?;
                        eprintln!(
                            "warning: the report was recorded but not kept: with --database-url \
                             reports are kept in S3; set --s3-bucket (or EUA_S3_BUCKET) to keep them"
                        );
                        run
                    }
                }
                (Results::Remote(remote), _) => ingest_remote(
                    remote, &files, upgrade, phase, suite, framework, cluster, session, collection,
                )?,
            };
            if ctx.json() {
                print_json(&run)?;
            } else {
                print_run_line(&mut io::stdout().lock(), "recorded", &run)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TestsCmd::Compare {
            run_a,
            run_b,
            upgrade,
        } => {
            let c = match (run_a, run_b, upgrade) {
                (Some(a), Some(b), _) => results.compare(&a, &b)?,
                (_, _, Some(u)) => results.compare_upgrade(&u)?,
                _ => anyhow::bail!("give RUN_A and RUN_B, or --upgrade"),
            };
            if ctx.json() {
                print_json(&c)?;
            } else {
                print_comparison(&mut io::stdout().lock(), &c)?;
            }
            Ok(if c.gate.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(GATE_FAILED)
            })
        }
        TestsCmd::Runs {
            upgrade,
            cluster,
            phase,
            limit,
        } => {
            let runs = results.runs(&RunQuery {
                upgrade_id: upgrade,
                cluster_name: cluster,
                phase,
                limit,
            })?;
            if ctx.json() {
                print_json(&runs)?;
            } else {
                let mut out = io::stdout().lock();
                writeln!(
                    out,
                    "{:<36}  {:<16}  {:<14}  {:<5}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}  {:>5}  CREATED",
                    "RUN",
                    "UPGRADE",
                    "CLUSTER",
                    "PHASE",
                    "TESTS",
                    "PASSED",
                    "FAILED",
                    "ERRORS",
                    "SKIPPED",
                    "FLAKY"
                )?;
                for r in &runs {
                    let c = &r.counts;
                    writeln!(
                        out,
                        "{:<36}  {:<16}  {:<14}  {:<5}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}  {:>5}  {}",
                        r.run_id,
                        printable(&truncate(&r.upgrade_id, 16)),
                        printable(&truncate(&r.cluster_name, 14)),
                        r.phase,
                        c.tests,
                        c.passed,
                        c.failed,
                        c.errors,
                        c.skipped,
                        c.flaky,
                        time(Some(r.created_at))
                    )?;
                }
                if runs.is_empty() {
                    writeln!(out, "no test runs")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TestsCmd::Show { run } => {
            let (r, failing) = results.show(&run)?;
            if ctx.json() {
                print_json(&serde_json::json!({ "run": r, "failures": failing }))?;
            } else {
                let mut out = io::stdout().lock();
                print_run_line(&mut out, "run", &r)?;
                writeln!(out, "suites: {}", printable(&r.suites.join(", ")))?;
                writeln!(out, "files: {}", printable(&r.files.join(", ")))?;
                for t in &failing {
                    writeln!(
                        out,
                        "{:<7} {}  ({}, {} attempt{})",
                        t.status.as_str().to_uppercase(),
                        printable(&qualified(&t.suite, &t.classname, &t.name)),
                        duration(Some(t.duration)),
                        t.attempts,
                        if t.attempts == 1 { "" } else { "s" }
                    )?;
                    if let Some(m) = &t.message {
                        writeln!(out, "        {}", printable(&first_line(m)))?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TestsCmd::History {
            name,
            cluster,
            limit,
        } => {
            let h = results.history(&name, cluster.as_deref(), limit)?;
            if ctx.json() {
                print_json(&h)?;
            } else {
                let mut out = io::stdout().lock();
                writeln!(
                    out,
                    "{:<23}  {:<36}  {:<16}  {:<14}  {:<5}  {:<7}  {:>8}  TEST",
                    "CREATED", "RUN", "UPGRADE", "CLUSTER", "PHASE", "STATUS", "DURATION"
                )?;
                for e in &h {
                    writeln!(
                        out,
                        "{:<23}  {:<36}  {:<16}  {:<14}  {:<5}  {:<7}  {:>8}  {}",
                        time(Some(e.created_at)),
                        e.run_id,
                        printable(&truncate(&e.upgrade_id, 16)),
                        printable(&truncate(&e.cluster_name, 14)),
                        e.phase,
                        if e.flaky { "flaky" } else { e.status.as_str() },
                        duration(Some(e.duration)),
                        printable(&qualified(&e.suite, &e.classname, &e.name))
                    )?;
                }
                if h.is_empty() {
                    writeln!(out, "no results for {}", printable(&name))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TestsCmd::Flaky { cluster, days } => {
            let f = results.flaky(cluster.as_deref(), days)?;
            if ctx.json() {
                print_json(&f)?;
            } else {
                let mut out = io::stdout().lock();
                writeln!(
                    out,
                    "{:<14}  {:<23}  {:>6}  TEST / LAST FAILURE",
                    "CLUSTER", "LAST FAILED", "PASSES"
                )?;
                for t in &f {
                    writeln!(
                        out,
                        "{:<14}  {:<23}  {:>6}  {}",
                        printable(&truncate(&t.cluster_name, 14)),
                        time(Some(t.last_failed_at)),
                        t.passes_since,
                        printable(&qualified(&t.suite, &t.classname, &t.name))
                    )?;
                    if let Some(m) = &t.message {
                        writeln!(out, "{:>50}{}", "", printable(&first_line(m)))?;
                    }
                }
                if f.is_empty() {
                    writeln!(out, "no flaky tests in the last {days} days")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Records a run of `files`: the cluster is the upgrade's unless given; the files are kept as
/// artifacts (in `session`/`collection`, or the upgrade's `validation` collection).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ingest(
    tracker: &ProgressTracker,
    results: &TestResults,
    artifacts: &TestArtifactsManager,
    files: &[PathBuf],
    mut ingest: Ingest,
    session: Option<&str>,
    collection: Option<&str>,
    options: Option<&AddOptions>,
) -> anyhow::Result<TestRun> {
    if ingest.cluster_name.is_empty() {
        ingest.cluster_name = cluster_of(tracker, &ingest.upgrade_id)?;
    }
    let session = session
        .map(|s| artifacts.resolve_id(eks_upgrade_agent::store::IdKind::Session, s))
        .transpose()?;
    let collection = collection
        .map(|c| artifacts.resolve_id(eks_upgrade_agent::store::IdKind::Collection, c))
        .transpose()?;
    results
        .ingest(
            files,
            &ingest,
            Some(KeepFiles {
                artifacts,
                session_id: session.as_deref(),
                collection_id: collection.as_deref(),
                options,
            }),
        )
        .context("cannot ingest the test results")
}

/// Records a run of `files` without keeping them (a database without a bucket).
fn record_only(
    tracker: &ProgressTracker,
    results: &TestResults,
    files: &[PathBuf],
    mut ingest: Ingest,
) -> anyhow::Result<TestRun> {
    if ingest.cluster_name.is_empty() {
        ingest.cluster_name = cluster_of(tracker, &ingest.upgrade_id)?;
    }
    results
        .ingest(files, &ingest, None)
        .context("cannot ingest the test results")
}

/// Why `--session`/`--collection` are refused on a database without a bucket.
const NO_BUCKET_TO_KEEP: &str = "with --database-url reports are kept as artifacts in S3: set \
     --s3-bucket (or EUA_S3_BUCKET, or s3_bucket in the config file) to keep them in a session, \
     or drop --session and --collection to record the run without keeping the report";

/// The cluster of `upgrade`, for a run given no `--cluster`.
fn cluster_of(tracker: &ProgressTracker, upgrade: &str) -> anyhow::Result<String> {
    match tracker.upgrade(upgrade) {
        Ok(u) => Ok(u.cluster_name),
        Err(eks_upgrade_agent::Error::NotFound { .. }) => anyhow::bail!(
            "upgrade {upgrade:?} not found: create it (`progress upgrade create`) or give --cluster"
        ),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn print_run_line(out: &mut impl Write, verb: &str, r: &TestRun) -> io::Result<()> {
    let c = &r.counts;
    writeln!(
        out,
        "{verb} {} ({}) of upgrade {} on {}: {} tests, {} passed, {} failed, {} errors, {} \
         skipped, {} flaky, {}",
        r.run_id,
        r.phase,
        printable(&r.upgrade_id),
        printable(&r.cluster_name),
        c.tests,
        c.passed,
        c.failed,
        c.errors,
        c.skipped,
        c.flaky,
        duration(Some(c.duration))
    )
}

fn qualified(suite: &str, classname: &str, name: &str) -> String {
    if classname.is_empty() || classname == suite || classname == name {
        format!("{suite} › {name}")
    } else {
        format!("{suite} › {classname} › {name}")
    }
}

fn first_line(m: &str) -> String {
    truncate(m.lines().find(|l| !l.trim().is_empty()).unwrap_or(""), 160)
}

/// The comparison for people: the gate, then the groups worst first.
fn print_comparison(out: &mut impl Write, c: &Comparison) -> io::Result<()> {
    writeln!(
        out,
        "{} ({}) → {} ({}) of upgrade {} on {}",
        c.run_a.run_id,
        c.run_a.phase,
        c.run_b.run_id,
        c.run_b.phase,
        printable(&c.run_b.upgrade_id),
        printable(&c.run_b.cluster_name)
    )?;
    if c.gate.passed {
        writeln!(out, "gate: passed")?;
    } else {
        writeln!(out, "gate: FAILED ({})", c.gate.reasons.join(", "))?;
    }
    let groups: [(&str, &[ComparedTest]); 9] = [
        ("new failures", &c.new_failures),
        ("new errors", &c.new_errors),
        ("missing", &c.missing),
        ("still failing", &c.still_failing),
        ("duration regressions", &c.duration_regressions),
        ("flaky", &c.flaky),
        ("newly skipped", &c.newly_skipped),
        ("fixed", &c.fixed),
        ("added", &c.added),
    ];
    for (title, list) in groups {
        if list.is_empty() {
            continue;
        }
        writeln!(out, "\n{} ({})", title.to_uppercase(), list.len())?;
        for t in list {
            let status =
                |s: Option<eks_upgrade_agent::model::TestStatus>| s.map_or("-", |s| s.as_str());
            let mut line = format!(
                "  {}  [{} → {}]",
                printable(&qualified(&t.suite, &t.classname, &t.name)),
                status(t.before),
                status(t.after)
            );
            if let Some(b) = t.baseline_duration {
                line.push_str(&format!(
                    "  {} (median {})",
                    duration(t.duration_after),
                    duration(Some(b))
                ));
            }
            writeln!(out, "{line}")?;
            if matches!(title, "new failures" | "new errors" | "still failing")
                && let Some(m) = &t.message
            {
                writeln!(out, "      {}", printable(&first_line(m)))?;
            }
        }
    }
    Ok(())
}
