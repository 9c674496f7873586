//! The command definition as `--help` shows it: global, S3 and notification flags are listed
//! once, under their own headings, in `eks-upgrade-agent --help` and on the commands that use
//! them; every other command's help shows its own options and examples. The flags still parse
//! anywhere on the line (they are clap `global` flags, only hidden from the other helps).

use clap::{Command, CommandFactory};

use crate::Cli;

/// Heading of the flags every command takes.
pub(crate) const GLOBAL_HEADING: &str = "Global options";
/// Heading of the S3 flags (artifacts::S3Args).
pub(crate) const S3_HEADING: &str = "S3 (off unless a bucket is set)";
/// Heading of the notification flags (notify::NotifyArgs).
pub(crate) const NOTIFY_HEADING: &str = "Notifications (all off unless set)";

/// Commands that use the S3 flags (their `--help` lists them).
const USES_S3: &[&str] = &[
    "artifacts add",
    "artifacts apply",
    "artifacts get",
    "artifacts upload",
    "artifacts pull",
    "demo",
    "serve",
    "store copy",
];

/// Commands that use the notification flags (they deliver notifications while they run).
const USES_NOTIFY: &[&str] = &[
    "artifacts add",
    "tests ingest",
    "notify status",
    "notify flush",
    "progress apply",
    "progress watch",
    "demo",
    "serve",
];

/// Examples per command (path below the binary), shown at the end of its help.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "tests ingest",
        "tests ingest junit/*.xml --upgrade u1 --phase pre\n  eks-upgrade-agent tests ingest e2e.xml --upgrade u1 --phase post --suite conformance",
    ),
    (
        "tests compare",
        "tests compare --upgrade u1   # exit 0 gate passed, 3 failed\n  eks-upgrade-agent -o json tests compare 0193a1b2 0193a1c4",
    ),
    (
        "tests runs",
        "tests runs --upgrade u1\n  eks-upgrade-agent tests runs --cluster prod-eu",
    ),
    ("tests show", "tests show 0193a1b2"),
    (
        "tests history",
        "tests history test_list_pods --cluster prod-eu",
    ),
    ("tests flaky", "tests flaky --cluster prod-eu --days 30"),
    (
        "progress upgrade create",
        "progress upgrade create u1 --plan plan-1 --cluster prod-eu --meta to=1.30",
    ),
    (
        "progress upgrade start",
        "progress upgrade start u1 --phase planning",
    ),
    (
        "progress upgrade phase",
        "progress upgrade phase u1 validation",
    ),
    ("progress upgrade complete", "progress upgrade complete u1"),
    (
        "progress upgrade fail",
        "progress upgrade fail u1 --error \"node group ng-1 stuck\"",
    ),
    (
        "progress upgrade show",
        "progress upgrade show u1\n  eks-upgrade-agent -o json progress upgrade show u1",
    ),
    ("progress upgrade list", "progress upgrade list"),
    (
        "progress task add",
        "progress task add u1 ng-1 --name ng-1 --type upgrade_step --parent nodes --total-steps 8",
    ),
    (
        "progress task start",
        "progress task start u1 ng-1 -m \"draining\"",
    ),
    (
        "progress task update",
        "progress task update u1 ng-1 --percent 40 -m draining --detail pods=12",
    ),
    (
        "progress task step",
        "progress task step u1 ng-1 --completed 3 --name \"drain ip-10-0-1-23\"",
    ),
    ("progress task complete", "progress task complete u1 ng-1"),
    (
        "progress task fail",
        "progress task fail u1 ng-1 --error \"PDB blocks eviction\"",
    ),
    (
        "progress task pause",
        "progress task pause u1 ng-1 -m \"waiting for a window\"",
    ),
    ("progress task resume", "progress task resume u1 ng-1"),
    ("progress task cancel", "progress task cancel u1 ng-1"),
    ("progress task retry", "progress task retry u1 ng-1"),
    ("progress task show", "progress task show u1 ng-1"),
    (
        "progress events",
        "progress events u1 --since 10 --follow\n  eks-upgrade-agent progress events u1 --limit 50",
    ),
    (
        "progress watch",
        "progress watch u1\n  eks-upgrade-agent progress watch u1 --exit-status   # exit 0 completed, 3 failed",
    ),
    (
        "progress wait",
        "progress wait u1 --timeout 2h\n  eks-upgrade-agent progress wait u1 --for phase=validation --timeout 30m\n  eks-upgrade-agent --server http://agent:8080 progress wait u1 --for started",
    ),
    (
        "progress export",
        "progress export u1\n  eks-upgrade-agent progress export u1 --out - | jq .summary",
    ),
    ("progress import", "progress import upgrade_u1.json"),
    ("progress apply", "progress apply < commands.jsonl"),
    (
        "artifacts session create",
        "artifacts session create --upgrade u1 --cluster prod-eu",
    ),
    (
        "artifacts session complete",
        "artifacts session complete 0193a1b2",
    ),
    ("artifacts session show", "artifacts session show 0193a1b2"),
    ("artifacts session list", "artifacts session list"),
    (
        "artifacts collection create",
        "artifacts collection create 0193a1b2 --name logs",
    ),
    (
        "artifacts collection list",
        "artifacts collection list 0193a1b2",
    ),
    (
        "artifacts add",
        "artifacts add 0193a1b2 4c5d6e ./logs --type log_file --tag node\n  eks-upgrade-agent artifacts add 0193a1b2 4c5d6e junit.xml --type test_result --phase post",
    ),
    (
        "artifacts search",
        "artifacts search --tag node --type log_file",
    ),
    ("artifacts stats", "artifacts stats"),
    ("artifacts show", "artifacts show 7f8e9d"),
    ("artifacts delete", "artifacts delete 7f8e9d"),
    ("artifacts get", "artifacts get 7f8e9d --out kubelet.log"),
    (
        "artifacts export",
        "artifacts export 0193a1b2 ./session-0193a1b2",
    ),
    (
        "artifacts upload",
        "artifacts upload --s3-bucket team-artifacts --session 0193a1b2\n  eks-upgrade-agent artifacts upload --s3-bucket team-artifacts --all --retry-failed",
    ),
    (
        "artifacts pull",
        "artifacts pull 0193a1b2 --bucket team-artifacts",
    ),
    ("artifacts verify", "artifacts verify"),
    ("artifacts cleanup", "artifacts cleanup --dry-run"),
    ("artifacts apply", "artifacts apply < artifacts.jsonl"),
    ("artifacts gc", "artifacts gc"),
    (
        "demo",
        "demo --speed 4\n  eks-upgrade-agent demo --serve 127.0.0.1:8080",
    ),
    (
        "notify status",
        "notify status --webhook-url https://hooks.example/eua",
    ),
    ("notify flush", "notify flush --timeout 60"),
    (
        "serve",
        "serve --listen 127.0.0.1:8080 --token \"$TOKEN:write\"",
    ),
    (
        "store migrate",
        "store migrate --database-url postgres://eua@db/eua",
    ),
    (
        "store info",
        "store info --database-url postgres://eua@db/eua\n  eks-upgrade-agent store info --data-dir /var/lib/eks-upgrade-agent",
    ),
    (
        "store copy",
        "store copy --to postgres://eua@db/eua --to-s3-bucket team-artifacts\n  eks-upgrade-agent store copy --database-url postgres://eua@db/eua --s3-bucket team-artifacts --to /backup/eua",
    ),
    (
        "completion",
        "completion bash > ~/.local/share/bash-completion/completions/eks-upgrade-agent\n  eks-upgrade-agent completion zsh > \"${fpath[1]}/_eks-upgrade-agent\"",
    ),
];

/// The examples of a command, if it has some.
pub(crate) fn examples(path: &str) -> Option<&'static str> {
    EXAMPLES.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
}

/// The CLI's definition with the help tidied as described above (use it to parse).
///
/// Each subcommand gets its own copy of every global flag, hidden unless it uses that flag's
/// group; clap then propagates nothing (a command that has the flag keeps it), and a value given
/// after a subcommand still reaches the top level (the copies keep the same id and stay global).
pub(crate) fn command() -> Command {
    let mut cmd = Cli::command();
    let globals: Vec<(clap::Arg, &'static str)> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| {
            let heading = match a.get_help_heading() {
                Some(S3_HEADING) => S3_HEADING,
                Some(NOTIFY_HEADING) => NOTIFY_HEADING,
                _ => GLOBAL_HEADING,
            };
            (a.clone().help_heading(heading), heading)
        })
        .collect();
    for (arg, heading) in &globals {
        if *heading == GLOBAL_HEADING {
            cmd = cmd.mut_arg(arg.get_id(), |a| a.help_heading(GLOBAL_HEADING));
        }
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(&name, |sub| tidy(sub, &name, &globals));
    }
    cmd
}

fn tidy(mut cmd: Command, path: &str, globals: &[(clap::Arg, &'static str)]) -> Command {
    let s3 = USES_S3.contains(&path);
    let notify = USES_NOTIFY.contains(&path);
    for (arg, heading) in globals {
        let shown = match *heading {
            S3_HEADING => s3,
            NOTIFY_HEADING => notify,
            _ => false,
        };
        cmd = cmd.arg(arg.clone().hide(!shown));
    }
    let mut after = String::new();
    if let Some(e) = examples(path) {
        after.push_str(&format!("Examples:\n  eks-upgrade-agent {e}\n\n"));
    }
    after.push_str(
        "Global options (--data-dir, -o/--output, --server, --token, --config, --durability, \
         -v): see eks-upgrade-agent --help",
    );
    cmd = cmd.after_help(after);
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subs {
        let sub_path = format!("{path} {name}");
        cmd = cmd.mut_subcommand(&name, |sub| tidy(sub, &sub_path, globals));
    }
    cmd
}
