//! EventBridge notifications against a real server speaking the AWS wire protocol: moto on
//! 127.0.0.1, started here (installed by `.ci/run`). A bus, a rule matching source
//! `eks-upgrade-agent` and an SQS queue as its target are created with boto3; after an upgrade
//! runs, the queue must hold exactly the expected notifications.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Env, Moto};

fn aws(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("EUA_EVENTBRIDGE_BUS_NAME", "upgrades");
}

fn run(env: &Env, endpoint: &str, args: &[&str]) -> std::process::Output {
    let mut c = env.command();
    aws(&mut c, endpoint);
    c.args(args).output().unwrap()
}

const SETUP: &str = "
events.create_event_bus(Name='upgrades')
q = sqs.create_queue(QueueName='upgrade-events')['QueueUrl']
arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=['QueueArn'])['Attributes']['QueueArn']
events.put_rule(Name='eua', EventBusName='upgrades', EventPattern=json.dumps({'source': ['eks-upgrade-agent']}))
events.put_targets(Rule='eua', EventBusName='upgrades', Targets=[{'Id': 'q', 'Arn': arn}])
print(json.dumps(q))
";

fn receive_all(moto: &Moto, queue: &str) -> Vec<Value> {
    let v = moto.python(&format!(
        "out = []\n\
         while True:\n    \
             r = sqs.receive_message(QueueUrl={queue:?}, MaxNumberOfMessages=10, WaitTimeSeconds=0)\n    \
             msgs = r.get('Messages', [])\n    \
             if not msgs: break\n    \
             for m in msgs:\n        \
                 out.append(json.loads(m['Body']))\n        \
                 sqs.delete_message(QueueUrl={queue:?}, ReceiptHandle=m['ReceiptHandle'])\n\
         print(json.dumps(out))"
    ));
    v.as_array().cloned().unwrap_or_default()
}

/// The notifications an upgrade's events must produce, in order.
fn expected(env: &Env, upgrade: &str) -> Vec<String> {
    env.events(upgrade)
        .iter()
        .filter_map(|e| {
            let kind = e["kind"].as_str().unwrap();
            match kind {
                "upgrade.started"
                | "upgrade.completed"
                | "upgrade.failed"
                | "upgrade.phase_changed"
                | "task.started"
                | "task.completed"
                | "task.failed"
                | "task.paused"
                | "task.cancelled"
                | "task.retried" => Some(kind.to_owned()),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn an_upgrade_reaches_eventbridge_and_an_outage_loses_nothing() {
    let moto = Moto::start();
    let queue = moto.python(SETUP).as_str().unwrap().to_owned();
    let env = Env::new();

    // The demo runs a dispatcher while it works; everything arrives, nothing else does.
    let out = run(
        &env,
        &moto.url,
        &["-o", "json", "demo", "--speed", "100", "--upgrade-id", "d1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = run(&env, &moto.url, &["-o", "json", "notify", "status"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let mut want = expected(&env, "d1");
    // The demo's post-upgrade smoke run fails its gate (one new failure): notified too.
    want.push("upgrade.validation_failed".into());
    assert_eq!(
        status[0]["delivered"].as_u64(),
        Some(want.len() as u64),
        "{status}"
    );
    assert_eq!(status[0]["pending"], 0);
    let got = receive_all(&moto, &queue);
    let types: Vec<String> = got
        .iter()
        .map(|m| m["detail-type"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted_got = types.clone();
    let mut sorted_want = want.clone();
    sorted_got.sort();
    sorted_want.sort();
    assert_eq!(
        sorted_got, sorted_want,
        "exactly the expected notifications"
    );
    let failed = got
        .iter()
        .find(|m| m["detail-type"] == "task.failed")
        .expect("a task.failed");
    assert_eq!(failed["source"], "eks-upgrade-agent");
    let d = &failed["detail"];
    assert_eq!(d["upgrade_id"], "d1");
    assert_eq!(d["cluster_name"], "demo-cluster");
    assert_eq!(d["task_id"], "ng-app-a");
    assert!(
        d["error_message"]
            .as_str()
            .unwrap()
            .contains("PodDisruptionBudget")
    );
    assert!(d["event_id"].is_string() && d["seq"].is_u64());
    let phase = got
        .iter()
        .find(|m| m["detail-type"] == "upgrade.phase_changed")
        .unwrap();
    assert!(phase["detail"]["phase"].is_string());

    // EventBridge down: every command still succeeds promptly; notifications stay pending.
    let dead = format!(
        "http://127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let start = Instant::now();
    for args in [
        vec![
            "progress",
            "upgrade",
            "create",
            "u2",
            "--plan",
            "p",
            "--cluster",
            "c2",
        ],
        vec!["progress", "upgrade", "start", "u2", "--phase", "plan"],
        vec![
            "progress",
            "task",
            "add",
            "u2",
            "t",
            "--name",
            "T",
            "--type",
            "validation",
        ],
        vec!["progress", "task", "start", "u2", "t"],
        vec!["progress", "task", "fail", "u2", "t", "--error", "boom"],
        vec!["progress", "upgrade", "fail", "u2", "--error", "boom"],
    ] {
        let out = run(&env, &dead, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // From the first notifying command on, something is pending.
        let notifies = args[2] != "create";
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).contains("not delivered yet"),
            notifies,
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "commands were slowed: {:?}",
        start.elapsed()
    );
    let status = run(&env, &dead, &["-o", "json", "notify", "status"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status[0]["pending"], 4, "{status}");
    assert!(
        status[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("PutEvents"),
        "{status}"
    );
    // Back up: a flush delivers everything, once per id.
    let out = run(&env, &moto.url, &["notify", "flush"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let got = receive_all(&moto, &queue);
    let mut ids: Vec<&str> = got
        .iter()
        .map(|m| m["detail"]["event_id"].as_str().unwrap())
        .collect();
    let types: Vec<&str> = got
        .iter()
        .map(|m| m["detail-type"].as_str().unwrap())
        .collect();
    let mut sorted = types.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "task.failed",
            "task.started",
            "upgrade.failed",
            "upgrade.started"
        ]
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    // CloudEvents as Detail, selected for this sink.
    for args in [
        vec![
            "progress",
            "upgrade",
            "create",
            "u3",
            "--plan",
            "p",
            "--cluster",
            "c3",
        ],
        vec![
            "--eventbridge-format",
            "cloudevents",
            "progress",
            "upgrade",
            "start",
            "u3",
        ],
    ] {
        let out = run(&env, &moto.url, &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let got = receive_all(&moto, &queue);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["detail-type"], "upgrade.started");
    assert_eq!(got[0]["detail"]["specversion"], "1.0");
    assert_eq!(
        got[0]["detail"]["type"],
        "com.eks-upgrade-agent.upgrade.started.v1"
    );
    assert_eq!(got[0]["detail"]["data"]["cluster_name"], "c3");
    // Wrong settings are a clear error of the notify command itself.
    let mut c = env.command();
    c.env_remove("EUA_EVENTBRIDGE_BUS_NAME")
        .env_remove("EUA_WEBHOOK_URL");
    let out = c.args(["notify", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no notification sink is configured"));
}

/// `AWS_ENDPOINT_URL` with plain http is allowed only towards this machine, judged on the
/// parsed host: names that merely start with `127.` or `localhost` are refused (the progress
/// call itself still succeeds: notifications stay in the outbox, with a warning).
#[test]
fn plain_http_to_a_host_that_only_looks_local_is_refused() {
    for hostile in [
        "http://127.evil.example:9",
        "http://127.0.0.1.evil.example",
        "http://localhost.evil:9",
        "http://127.0.0.1@evil.example",
    ] {
        let env = Env::new();
        let out = run(
            &env,
            hostile,
            &[
                "progress",
                "upgrade",
                "create",
                "u1",
                "--plan",
                "p1",
                "--cluster",
                "c",
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("notifications are kept in the outbox but not sent")
                && stderr.contains("refusing plain http")
                && stderr.contains("only loopback endpoints"),
            "{hostile}: {stderr}"
        );
    }
}

/// `--aws-region` stands in for `AWS_REGION`, and `--event-source` replaces the `Source`: a
/// rule matching only the custom source gets the notification.
#[test]
fn region_and_source_come_from_flags() {
    let moto = Moto::start();
    let queue = moto
        .python(&SETUP.replace(
            "'source': ['eks-upgrade-agent']",
            "'source': ['team.upgrades']",
        ))
        .as_str()
        .unwrap()
        .to_owned();
    let env = Env::with_task();
    let mut c = env.command();
    aws(&mut c, &moto.url);
    c.env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", env.dir.path().join("no-aws-config"))
        .args([
            "--aws-region",
            "us-east-1",
            "--event-source",
            "team.upgrades",
        ])
        .args(["progress", "task", "start", "u", "t"]);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("not delivered"), "{stderr}");
    let got = receive_all(&moto, &queue);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["source"], "team.upgrades");
    assert_eq!(got[0]["detail-type"], "task.started");
    assert_eq!(got[0]["region"], "us-east-1");

    // Without a region anywhere, the sink says what to set.
    let mut c = env.command();
    aws(&mut c, &moto.url);
    c.env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", env.dir.path().join("no-aws-config"))
        .args(["notify", "flush"]);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("region"), "{stderr}");
}

/// EventBridge failures are said once per sink, in the words of the S3 reports: no
/// credentials, and a bus that does not exist (moto); never the SDK's debug dump.
#[test]
fn eventbridge_failures_are_named_once_in_plain_words() {
    let moto = Moto::start();
    // Each case on a fresh data dir: a failed attempt puts the sink in backoff.
    let started = || {
        let env = Env::new();
        env.ok(&[
            "progress",
            "upgrade",
            "create",
            "u",
            "--plan",
            "p",
            "--cluster",
            "c",
        ]);
        env.ok(&["progress", "upgrade", "start", "u"]);
        env
    };
    let env = started();
    let flush = |vars: &[(&str, &str)], remove: &[&str]| {
        let env = started();
        let mut c = env.command();
        aws(&mut c, &moto.url);
        for k in remove {
            c.env_remove(k);
        }
        c.env("HOME", env.dir.path()).envs(vars.iter().copied());
        let out = c
            .args(["notify", "flush", "--timeout", "3"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // No region anywhere: said before anything is sent.
    let mut c = env.command();
    aws(&mut c, &moto.url);
    c.env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("HOME", env.dir.path());
    let out = c.args(["notify", "flush"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no AWS region configured for EventBridge: set AWS_REGION or --aws-region"),
        "{err}"
    );
    // No credentials anywhere (IMDS off, as on a laptop).
    let (code, text) = flush(&[], &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "eventbridge:upgrades: PutEvents to bus upgrades: no AWS credentials found (environment, profile, instance metadata)"
        ),
        "{text}"
    );
    assert!(!text.contains("DispatchFailure"), "{text}");
    assert_eq!(
        text.matches("no AWS credentials found").count(),
        1,
        "{text}"
    );
    // The bus was never created.
    let (code, text) = flush(&[], &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("PutEvents to bus upgrades: event bus upgrades does not exist"),
        "{text}"
    );
}
