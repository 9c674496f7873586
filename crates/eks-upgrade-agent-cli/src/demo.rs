//! `eks-upgrade-agent demo`: simulates a realistic EKS upgrade (plan, control plane, add-ons,
//! node groups drained and replaced node by node, validation, cleanup) into the store through
//! the library, with one failure that is retried, while the main thread shows live progress.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use std::collections::HashMap;

use eks_upgrade_agent::artifacts::{AddOptions, NewSession};
use eks_upgrade_agent::model::{ArtifactType, JsonMap, TaskType};
use eks_upgrade_agent::progress::NewTask;
use eks_upgrade_agent::{ProgressTracker, TestArtifactsManager};

use crate::Ctx;
use crate::output::stdout_is_terminal;
use crate::render::{self, Watcher};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Speed factor: 2 runs twice as fast, 0.5 half as fast (1 takes about 20 s)
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Upgrade id [default: demo-YYYYmmdd-HHMMSS]
    #[arg(long)]
    upgrade_id: Option<String>,
    /// Cluster name
    #[arg(long, default_value = "demo-cluster")]
    cluster: String,
    /// Also serve the dashboard and API while the demo runs (and after, until Ctrl-C), on
    /// ADDR [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    pub(crate) serve: Option<std::net::SocketAddr>,
}

struct Sim<'a> {
    t: &'a ProgressTracker,
    u: &'a str,
    cluster: &'a str,
    step: Duration,
    artifacts: &'a TestArtifactsManager,
    results: &'a eks_upgrade_agent::TestResults,
    session_id: String,
    /// Collection id per phase.
    collections: HashMap<&'static str, String>,
}

/// A 1x1 PNG, the demo's "screenshot" of the dashboard.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0,
    0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// The demo's smoke suite as pytest writes it (xunit2, a rerun plugin writing one testcase per
/// attempt). After the upgrade, `test_list_pods` fails (new) and `test_resolve_service` passes
/// on its second attempt (flaky).
fn smoke_junit(after: bool) -> String {
    let mut cases = vec![
        "<testcase classname=\"tests.smoke.test_api\" name=\"test_health\" time=\"0.12\"/>".to_owned(),
        "<testcase classname=\"tests.smoke.test_storage\" name=\"test_ebs_attach\" time=\"6.4\"/>".to_owned(),
        "<testcase classname=\"tests.smoke.test_ingress\" name=\"test_alb_reachable\" time=\"2.1\"/>".to_owned(),
    ];
    if after {
        cases.push("<testcase classname=\"tests.smoke.test_api\" name=\"test_list_pods\" time=\"1.5\"><failure message=\"AssertionError: GET /api/v1/pods returned 503 after the control plane upgrade\">assert 503 == 200</failure></testcase>".to_owned());
        cases.push("<testcase classname=\"tests.smoke.test_dns\" name=\"test_resolve_service\" time=\"2.0\"><failure message=\"TimeoutError: coredns lookup timed out\">TimeoutError</failure></testcase>".to_owned());
    } else {
        cases.push(
            "<testcase classname=\"tests.smoke.test_api\" name=\"test_list_pods\" time=\"1.1\"/>"
                .to_owned(),
        );
    }
    cases.push(
        "<testcase classname=\"tests.smoke.test_dns\" name=\"test_resolve_service\" time=\"0.8\"/>"
            .to_owned(),
    );
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<testsuites name=\"pytest tests\"><testsuite name=\"pytest\">\n{}\n</testsuite></testsuites>\n",
        cases.join("\n")
    )
}

impl Sim<'_> {
    /// Keeps `junit` in the validation collection and records it as a test run of the upgrade.
    fn test_run(
        &self,
        phase: eks_upgrade_agent::model::RunPhase,
        junit: &str,
    ) -> eks_upgrade_agent::Result<()> {
        let name = format!("junit/smoke-{phase}.xml");
        let opts = AddOptions {
            artifact_type: Some(ArtifactType::TestResult),
            tags: vec!["junit".into(), phase.as_str().into()],
            ..AddOptions::default()
        };
        let kept = self.artifacts.add_bytes(
            &self.session_id,
            &self.collections["validation"],
            junit.as_bytes(),
            &name,
            &opts,
        )?;
        let mut attempts = Vec::new();
        eks_upgrade_agent::results::junit::parse(
            junit.as_bytes(),
            &name,
            &Default::default(),
            &mut |a| {
                attempts.push(a);
                Ok(())
            },
        )?;
        self.results.record(
            &eks_upgrade_agent::results::Ingest::new(self.u, self.cluster, phase),
            vec![name],
            vec![kept.artifact_id],
            &mut attempts.into_iter(),
        )?;
        Ok(())
    }

    fn pause(&self, steps: f64) {
        std::thread::sleep(self.step.mul_f64(steps));
    }

    /// Stores one artifact of `task` in the phase's collection.
    fn record(
        &self,
        phase: &'static str,
        task: &str,
        name: &str,
        bytes: &[u8],
        artifact_type: ArtifactType,
        tags: &[&str],
    ) -> eks_upgrade_agent::Result<()> {
        let opts = AddOptions {
            artifact_type: Some(artifact_type),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            task_id: Some(task.to_owned()),
            ..AddOptions::default()
        };
        self.artifacts.add_bytes(
            &self.session_id,
            &self.collections[phase],
            bytes,
            name,
            &opts,
        )?;
        Ok(())
    }

    /// Runs a task through its named steps and stores its log.
    fn run_steps(
        &self,
        phase: &'static str,
        task: &str,
        steps: &[String],
    ) -> eks_upgrade_agent::Result<()> {
        self.t.start_task(self.u, task, Some(&steps[0]))?;
        let mut log = String::new();
        for (i, name) in steps.iter().enumerate() {
            self.t.step_task(self.u, task, i as u32, Some(name))?;
            log.push_str(&format!(
                "{} INFO {task}: {name}\n",
                chrono::Utc::now().to_rfc3339()
            ));
            self.pause(1.0);
        }
        log.push_str(&format!(
            "{} INFO {task}: done\n",
            chrono::Utc::now().to_rfc3339()
        ));
        self.record(
            phase,
            task,
            &format!("{task}.log"),
            log.as_bytes(),
            ArtifactType::LogFile,
            &["log", phase],
        )?;
        self.t.complete_task(self.u, task, None)?;
        Ok(())
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn node_steps(group: &str, nodes: usize) -> Vec<String> {
    (0..nodes)
        .flat_map(|n| {
            let node = format!(
                "ip-10-0-{}-{}.eu-west-1.compute.internal",
                group.len(),
                11 + n * 7
            );
            [format!("drain {node}"), format!("replace {node}")]
        })
        .collect()
}

pub(crate) fn run(ctx: &Ctx, args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !(args.speed.is_finite() && args.speed > 0.0 && args.speed <= 1000.0) {
        anyhow::bail!("--speed must be a number in (0, 1000], got {}", args.speed);
    }
    let store = ctx.store()?;
    let tracker = std::sync::Arc::new(ProgressTracker::new(store.clone()));
    let server = match args.serve {
        Some(addr) => Some(DemoServer::start(ctx, &store, &tracker, addr)?),
        None => None,
    };
    let artifacts = ctx.artifacts_on(store.clone())?;
    let notifier = crate::notify::dispatcher_or_warn(ctx, &store).map(|d| d.spawn());
    let upgrade_id = args
        .upgrade_id
        .unwrap_or_else(|| format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S")));
    let plan = format!("plan-{upgrade_id}");
    let mut meta = JsonMap::new();
    meta.insert("from_version".into(), json!("1.29"));
    meta.insert("to_version".into(), json!("1.30"));
    meta.insert("region".into(), json!("eu-west-1"));
    tracker
        .create_upgrade(&upgrade_id, &plan, &args.cluster, meta)
        .with_context(|| format!("cannot create upgrade {upgrade_id}"))?;

    let groups = [("ng-system", 3usize), ("ng-app-a", 4), ("ng-app-b", 4)];
    let plan_steps = names(&[
        "check current and target versions",
        "check add-on compatibility",
        "check PodDisruptionBudgets",
        "back up cluster configuration",
    ]);
    let cp_steps = names(&[
        "UpdateClusterVersion 1.29 -> 1.30",
        "wait for control plane ACTIVE",
        "verify API server health",
    ]);
    let addons = [
        (
            "addon-vpc-cni",
            "vpc-cni v1.18.3",
            "roll aws-node daemonset",
        ),
        (
            "addon-coredns",
            "coredns v1.11.1",
            "roll coredns deployment",
        ),
        (
            "addon-kube-proxy",
            "kube-proxy v1.30.0",
            "roll kube-proxy daemonset",
        ),
    ];
    let validations = [
        (
            "validate-nodes",
            vec![
                "all nodes Ready",
                "kubelet versions 1.30",
                "no pressure conditions",
            ],
        ),
        (
            "validate-workloads",
            vec![
                "deployments available",
                "daemonsets scheduled",
                "no CrashLoopBackOff",
                "ingress responds",
            ],
        ),
        (
            "validate-conformance",
            vec![
                "DNS resolution",
                "pod-to-pod networking",
                "service load balancing",
                "PVC attach",
                "RBAC",
            ],
        ),
    ];
    let cleanup_steps = names(&[
        "delete old launch template versions",
        "remove upgrade taints",
    ]);

    let mut tasks = vec![
        NewTask::new("plan", "Plan upgrade", TaskType::UpgradePlan).steps(plan_steps.len() as u32),
        NewTask::new(
            "control-plane",
            "Upgrade control plane",
            TaskType::UpgradeStep,
        )
        .steps(cp_steps.len() as u32),
        NewTask::new("addons", "Upgrade add-ons", TaskType::UpgradeStep),
    ];
    for (id, name, _) in &addons {
        tasks.push(
            NewTask::new(*id, format!("Upgrade {name}"), TaskType::UpgradeStep)
                .parent("addons")
                .steps(3),
        );
    }
    tasks.push(
        NewTask::new("node-groups", "Upgrade node groups", TaskType::UpgradeStep).weight(3.0),
    );
    for (g, n) in &groups {
        tasks.push(
            NewTask::new(*g, format!("Roll node group {g}"), TaskType::UpgradeStep)
                .parent("node-groups")
                .steps((*n * 2) as u32)
                .weight(*n as f64),
        );
    }
    tasks.push(NewTask::new(
        "validation",
        "Validate cluster",
        TaskType::Validation,
    ));
    for (id, steps) in &validations {
        tasks.push(
            NewTask::new(*id, id.replace('-', " "), TaskType::Validation)
                .parent("validation")
                .steps(steps.len() as u32),
        );
    }
    tasks.push(
        NewTask::new("cleanup", "Clean up", TaskType::Cleanup).steps(cleanup_steps.len() as u32),
    );
    tracker.add_tasks(&upgrade_id, tasks)?;

    let session = artifacts.create_session(NewSession {
        upgrade_id: upgrade_id.clone(),
        cluster_name: args.cluster.clone(),
        description: Some("artifacts of the demo upgrade".into()),
        ..NewSession::default()
    })?;
    let mut collections = HashMap::new();
    for (phase, task) in [
        ("planning", "plan"),
        ("control-plane", "control-plane"),
        ("add-ons", "addons"),
        ("node-groups", "node-groups"),
        ("validation", "validation"),
        ("cleanup", "cleanup"),
    ] {
        let c = artifacts.create_collection(&session.session_id, phase, None, Some(task))?;
        collections.insert(phase, c.collection_id);
    }
    let live = !ctx.json() && stdout_is_terminal();
    let results = eks_upgrade_agent::TestResults::new(store.clone());
    let sim = Sim {
        t: tracker.as_ref(),
        u: &upgrade_id,
        cluster: &args.cluster,
        step: Duration::from_secs_f64(0.35 / args.speed),
        artifacts: &artifacts,
        results: &results,
        session_id: session.session_id.clone(),
        collections,
    };
    let outcome = std::thread::scope(|scope| -> anyhow::Result<()> {
        let worker = scope.spawn(|| -> eks_upgrade_agent::Result<()> {
            let (t, u) = (sim.t, sim.u);
            t.start_upgrade(u, Some("planning"))?;
            sim.record(
                "planning",
                "plan",
                "cluster-config.yaml",
                format!("cluster: {}\nversion: \"1.29\"\ntarget: \"1.30\"\nnodeGroups: [ng-system, ng-app-a, ng-app-b]\n", sim.u).as_bytes(),
                ArtifactType::Configuration,
                &["config", "pre-upgrade"],
            )?;
            sim.run_steps("planning", "plan", &plan_steps)?;
            // The smoke suite before the upgrade: the baseline `tests compare` judges by.
            sim.test_run(eks_upgrade_agent::model::RunPhase::Pre, &smoke_junit(false))?;
            t.set_phase(u, "control-plane")?;
            sim.run_steps("control-plane", "control-plane", &cp_steps)?;
            t.set_phase(u, "add-ons")?;
            t.start_task(u, "addons", None)?;
            for (id, name, roll) in &addons {
                sim.run_steps(
                    "add-ons",
                    id,
                    &[format!("update {name}"), (*roll).to_owned(), "verify".to_owned()],
                )?;
            }
            t.complete_task(u, "addons", None)?;
            t.set_phase(u, "node-groups")?;
            t.start_task(u, "node-groups", None)?;
            for (g, n) in &groups {
                let steps = node_steps(g, *n);
                if *g == "ng-app-a" {
                    // The realistic failure: a PodDisruptionBudget blocks a drain; the operator
                    // scales the workload and the node group is retried.
                    t.start_task(u, g, Some(&steps[0]))?;
                    for (i, s) in steps.iter().take(3).enumerate() {
                        t.step_task(u, g, i as u32, Some(s))?;
                        sim.pause(1.0);
                    }
                    let why = "PodDisruptionBudget web-pdb blocks eviction of web-7d9f6c-x2x8q (drain timed out after 300s)";
                    t.fail_task(u, g, why)?;
                    let bundle = serde_json::to_vec_pretty(&json!({
                        "node_group": g,
                        "error": why,
                        "pdb": {"name": "web-pdb", "minAvailable": 2, "currentHealthy": 2},
                        "pods": [{"name": "web-7d9f6c-x2x8q", "phase": "Running"}],
                    }))
                    .expect("static JSON");
                    sim.record("node-groups", g, &format!("diagnostics/{g}-drain-failure.json"), &bundle, ArtifactType::Diagnostic, &["failure", "drain"])?;
                    sim.pause(2.0);
                    t.retry_task(u, g, Some("retrying after scaling web to 3 replicas"))?;
                    for (i, s) in steps.iter().enumerate() {
                        t.step_task(u, g, i as u32, Some(s))?;
                        sim.pause(1.0);
                    }
                    t.complete_task(u, g, None)?;
                } else {
                    sim.run_steps("node-groups", g, &steps)?;
                }
            }
            let metrics = serde_json::to_vec_pretty(&json!({
                "nodes_replaced": groups.iter().map(|(_, n)| n).sum::<usize>(),
                "drain_seconds_p50": 41.5, "drain_seconds_p99": 212.0,
                "pods_evicted": 184, "pdb_blocks": 1,
            }))
            .expect("static JSON");
            sim.record("node-groups", "node-groups", "metrics/node-rollout.json", &metrics, ArtifactType::MetricsData, &["metrics"])?;
            t.complete_task(u, "node-groups", None)?;
            t.set_phase(u, "validation")?;
            t.start_task(u, "validation", None)?;
            let mut junit = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
            for (id, steps) in &validations {
                sim.run_steps("validation", id, &names(steps))?;
                junit.push_str(&format!("  <testsuite name=\"{id}\" tests=\"{}\" failures=\"0\">\n", steps.len()));
                for s in steps {
                    junit.push_str(&format!("    <testcase classname=\"{id}\" name=\"{s}\" time=\"0.4\"/>\n"));
                }
                junit.push_str("  </testsuite>\n");
            }
            junit.push_str("</testsuites>\n");
            sim.record("validation", "validation", "junit/validation.xml", junit.as_bytes(), ArtifactType::TestResult, &["junit", "post-upgrade"])?;
            // The smoke suite again: one new failure (the gate fails, `upgrade.validation_failed`
            // is notified) and one test that passed only on a retry (flaky).
            sim.test_run(eks_upgrade_agent::model::RunPhase::Post, &smoke_junit(true))?;
            sim.record("validation", "validation", "screenshots/dashboard.png", PNG, ArtifactType::Screenshot, &["screenshot"])?;
            t.complete_task(u, "validation", None)?;
            t.set_phase(u, "cleanup")?;
            sim.run_steps("cleanup", "cleanup", &cleanup_steps)?;
            t.complete_upgrade(u)?;
            sim.artifacts.complete_session(&sim.session_id)?;
            Ok(())
        });
        // On a terminal, live bars; otherwise one timestamped line per event (CI logs).
        if live || !ctx.json() {
            let mut watcher = Watcher::new(tracker.as_ref(), &upgrade_id, live)?;
            while !worker.is_finished() {
                watcher.poll(ctx)?;
                std::thread::sleep(Duration::from_millis(80));
            }
            watcher.poll(ctx)?;
            watcher.close();
        }
        worker.join().expect("demo worker panicked")?;
        Ok(())
    });
    if let Err(e) = outcome {
        let _ = tracker.fail_upgrade(&upgrade_id, &format!("demo aborted: {e:#}"));
        return Err(e);
    }
    drop(notifier);
    crate::notify::after_commit(ctx, &store);
    let summary = tracker.summary(&upgrade_id)?;
    if ctx.json() {
        let mut v = serde_json::to_value(&summary)?;
        v["tasks"] = serde_json::to_value(tracker.tasks(&upgrade_id)?)?;
        v["artifacts_session"] =
            serde_json::to_value(artifacts.session_summary(&session.session_id)?)?;
        crate::output::print_json(&v)?;
    } else {
        let mut out = io::stdout().lock();
        writeln!(out)?;
        render::summary(&mut out, &summary)?;
        writeln!(out)?;
        render::task_tree(
            &mut out,
            &tracker.tasks(&upgrade_id)?,
            &artifacts.counts_by_task(&upgrade_id)?,
        )?;
        writeln!(
            out,
            "\nartifacts: session {} ({} files)\ndata dir: {}\nsee it again: eks-upgrade-agent --data-dir {} progress upgrade show {upgrade_id}\n              eks-upgrade-agent --data-dir {} artifacts search --upgrade {upgrade_id}",
            session.session_id,
            artifacts
                .session_summary(&session.session_id)?
                .total_artifacts,
            ctx.config.data_dir.display(),
            ctx.config.data_dir.display(),
            ctx.config.data_dir.display()
        )?;
    }
    if let Some(server) = server {
        // What is written through the dashboard's API while it serves is delivered as it
        // commits, and at the stop the notification thread makes its last pass, waited for
        // as `serve` waits for it (bounded).
        let notifier = crate::notify::dispatcher_or_warn(ctx, &store).map(|d| d.spawn());
        server.wait_for_ctrl_c()?;
        crate::serve::finish_exports(notifier, None);
    }
    Ok(ExitCode::SUCCESS)
}

/// `demo --serve`: the server on its own thread and runtime, over the demo's store and tracker
/// (the tracker's callbacks wake the streams at once).
struct DemoServer {
    runtime: tokio::runtime::Runtime,
    url: String,
}

impl DemoServer {
    fn start(
        ctx: &Ctx,
        store: &std::sync::Arc<eks_upgrade_agent::store::sqlite::SqliteStore>,
        tracker: &std::sync::Arc<ProgressTracker>,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<DemoServer> {
        if !addr.ip().is_loopback() {
            anyhow::bail!(
                "demo --serve listens on loopback only (e.g. 127.0.0.1:8080); use `serve` with tokens to share a dashboard"
            );
        }
        let artifacts = std::sync::Arc::new(ctx.artifacts_on(store.clone())?);
        let state = eks_upgrade_agent_server::AppState::new(std::sync::Arc::clone(tracker))
            .with_artifacts(artifacts, Some(store.clone()))
            .with_test_results(std::sync::Arc::new(eks_upgrade_agent::TestResults::new(
                store.clone(),
            )));
        let runtime = tokio::runtime::Runtime::new().context("cannot start the server runtime")?;
        let listener = runtime.block_on(crate::serve::bind(addr))?;
        let url = format!("http://{}/", listener.local_addr()?);
        runtime.spawn(async move {
            if let Err(e) =
                eks_upgrade_agent_server::serve(listener, state, std::future::pending()).await
            {
                eprintln!("error: the dashboard server stopped: {e}");
            }
        });
        eprintln!("dashboard: {url}");
        Ok(DemoServer { runtime, url })
    }

    fn wait_for_ctrl_c(self) -> anyhow::Result<()> {
        eprintln!("demo finished; still serving {} (Ctrl-C to stop)", self.url);
        self.runtime.block_on(crate::serve::stop_signal());
        Ok(())
    }
}
