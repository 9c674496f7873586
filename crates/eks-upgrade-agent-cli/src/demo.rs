//! `eks-upgrade-agent demo`: simulates a realistic EKS upgrade (plan, control plane, add-ons,
//! node groups drained and replaced node by node, validation, cleanup) into the store through
//! the library, with one failure that is retried, while the main thread shows live progress.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::model::{JsonMap, TaskType};
use eks_upgrade_agent::progress::NewTask;

use crate::Ctx;
use crate::progress::stdout_is_terminal;
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
}

struct Sim<'a> {
    t: &'a ProgressTracker,
    u: &'a str,
    step: Duration,
}

impl Sim<'_> {
    fn pause(&self, steps: f64) {
        std::thread::sleep(self.step.mul_f64(steps));
    }

    /// Runs a task through its named steps.
    fn run_steps(&self, task: &str, steps: &[String]) -> eks_upgrade_agent::Result<()> {
        self.t.start_task(self.u, task, Some(&steps[0]))?;
        for (i, name) in steps.iter().enumerate() {
            self.t.step_task(self.u, task, i as u32, Some(name))?;
            self.pause(1.0);
        }
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
    let tracker = ctx.tracker()?;
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

    let live = !ctx.json() && stdout_is_terminal();
    let sim = Sim {
        t: &tracker,
        u: &upgrade_id,
        step: Duration::from_secs_f64(0.35 / args.speed),
    };
    let outcome = std::thread::scope(|scope| -> anyhow::Result<()> {
        let worker = scope.spawn(|| -> eks_upgrade_agent::Result<()> {
            let (t, u) = (sim.t, sim.u);
            t.start_upgrade(u, Some("planning"))?;
            sim.run_steps("plan", &plan_steps)?;
            t.set_phase(u, "control-plane")?;
            sim.run_steps("control-plane", &cp_steps)?;
            t.set_phase(u, "add-ons")?;
            t.start_task(u, "addons", None)?;
            for (id, name, roll) in &addons {
                sim.run_steps(id, &[format!("update {name}"), (*roll).to_owned(), "verify".to_owned()])?;
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
                    t.fail_task(
                        u,
                        g,
                        "PodDisruptionBudget web-pdb blocks eviction of web-7d9f6c-x2x8q (drain timed out after 300s)",
                    )?;
                    sim.pause(2.0);
                    t.retry_task(u, g, Some("retrying after scaling web to 3 replicas"))?;
                    for (i, s) in steps.iter().enumerate() {
                        t.step_task(u, g, i as u32, Some(s))?;
                        sim.pause(1.0);
                    }
                    t.complete_task(u, g, None)?;
                } else {
                    sim.run_steps(g, &steps)?;
                }
            }
            t.complete_task(u, "node-groups", None)?;
            t.set_phase(u, "validation")?;
            t.start_task(u, "validation", None)?;
            for (id, steps) in &validations {
                sim.run_steps(id, &names(steps))?;
            }
            t.complete_task(u, "validation", None)?;
            t.set_phase(u, "cleanup")?;
            sim.run_steps("cleanup", &cleanup_steps)?;
            t.complete_upgrade(u)?;
            Ok(())
        });
        if live {
            let mut watcher = Watcher::new(&tracker, &upgrade_id, true)?;
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
    let summary = tracker.summary(&upgrade_id)?;
    if ctx.json() {
        let mut v = serde_json::to_value(&summary)?;
        v["tasks"] = serde_json::to_value(tracker.tasks(&upgrade_id)?)?;
        crate::progress::print_json(&v)?;
    } else {
        let mut out = io::stdout().lock();
        writeln!(out)?;
        render::summary(&mut out, &summary)?;
        writeln!(out)?;
        render::task_tree(&mut out, &tracker.tasks(&upgrade_id)?)?;
        writeln!(
            out,
            "\ndata dir: {}\nsee it again: eks-upgrade-agent --data-dir {} progress upgrade show {upgrade_id}",
            ctx.config.data_dir.display(),
            ctx.config.data_dir.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
