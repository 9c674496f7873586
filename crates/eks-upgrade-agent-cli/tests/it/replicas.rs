//! Team mode: three `serve` replicas on one PostgreSQL database. Writers on two replicas at
//! once; a WebSocket follower on the third sees every event once, in `seq` order; the third is
//! killed (SIGKILL) mid-stream and the follower resumes on another replica with `?since=`
//! without a gap; a webhook receiver gets every notification, and each one written after the
//! kill exactly once, whichever live replica sends it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use eks_upgrade_agent::test_support::PgCluster;

use crate::util::{Env, Served, serve, webhook_receiver_slow};

/// Reads progress events from a WebSocket until `until(seq)` or the socket ends; returns
/// `(seq, event_id)` pairs.
async fn follow(url: String, tx: std::sync::mpsc::Sender<(u64, String)>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "progress_event" {
                let id = v["data"]["event_id"].as_str().unwrap().to_owned();
                if tx.send((v["seq"].as_u64().unwrap(), id)).is_err() {
                    return;
                }
            }
        }
    }
}

fn cli(env: &Env, args: &[&str]) {
    let out = env.command().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn last_seq(port: u16) -> u64 {
    let resp = crate::util::http(
        port,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(body.trim()).unwrap_or_else(|_| panic!("{resp}"));
    v["last_seq"].as_u64().unwrap()
}

#[test]
fn three_replicas_share_one_database_without_gaps_or_double_sends() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let env = Env::new();
    // A slow receiver: replicas' delivery passes overlap, so only the leases keep them from
    // sending the same notification twice.
    let (hook, got) = webhook_receiver_slow(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        Duration::from_millis(150),
    );
    let vars = [
        ("EUA_DATABASE_URL", db.as_str()),
        ("EUA_WEBHOOK_URL", hook.as_str()),
    ];
    let a = serve(&env, &vars);
    let b = serve(&env, &vars);
    let mut c: Option<Served> = Some(serve(&env, &vars));
    let server = |s: &Served| format!("http://127.0.0.1:{}", s.port);

    cli(
        &env,
        &[
            "--server",
            &server(&a),
            "progress",
            "upgrade",
            "create",
            "u",
            "--plan",
            "p",
            "--cluster",
            "k",
        ],
    );
    // The follower on the third replica, from the start.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let c_port = c.as_ref().unwrap().port;
    let first = runtime.spawn(follow(
        format!("ws://127.0.0.1:{c_port}/api/v1/upgrades/u/ws?since=0"),
        tx.clone(),
    ));

    // Two writers, one on each of the other replicas, at once.
    const TASKS: usize = 10;
    let writers: Vec<_> = [(0, server(&a)), (1, server(&b))]
        .into_iter()
        .map(|(w, url)| {
            std::thread::spawn(move || {
                let env = Env::new();
                for j in 0..TASKS {
                    let t = format!("w{w}-{j}");
                    let base = ["--server", url.as_str(), "progress", "task"];
                    let run = |rest: &[&str]| {
                        let mut args = base.to_vec();
                        args.extend_from_slice(rest);
                        cli(&env, &args);
                    };
                    run(&["add", "u", &t, "--name", &t, "--type", "upgrade_step"]);
                    run(&["start", "u", &t]);
                    run(&["update", "u", &t, "--percent", "50"]);
                    run(&["complete", "u", &t]);
                }
            })
        })
        .collect();

    // Mid-stream: once the follower has some events, SIGKILL the third replica.
    let mut seen: Vec<(u64, String)> = Vec::new();
    let start = Instant::now();
    while seen.len() < 8 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no events on the third replica: {seen:?}"
        );
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(e);
        }
    }
    drop(c.take()); // kill -9 and reap
    // Everything written from now on was never claimed by the dead replica.
    let killed_at = last_seq(a.port);
    first.abort();
    while let Ok(e) = rx.try_recv() {
        seen.push(e);
    }
    let resume_from = seen.last().unwrap().0;
    runtime.spawn(follow(
        format!(
            "ws://127.0.0.1:{}/api/v1/upgrades/u/ws?since={resume_from}",
            b.port
        ),
        tx,
    ));
    for w in writers {
        w.join().unwrap();
    }
    let total = last_seq(a.port);
    let start = Instant::now();
    while seen.last().map(|e| e.0) != Some(total) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the follower stopped at {:?} of {total}",
            seen.last()
        );
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(e);
        }
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e.0).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "the follower missed, repeated or reordered events across the kill"
    );
    assert_eq!(total as usize, 1 + 2 * TASKS * 4);

    // Each notification (task started and completed) reached the webhook, from whichever
    // replica claimed it.
    let expected = 2 * TASKS * 2;
    // A webhook body is a JSON array: one entry per notification.
    let entries = |bodies: &[String]| -> Vec<Value> {
        bodies
            .iter()
            .flat_map(|b| {
                let v: Value = serde_json::from_str(&b[b.find('[').unwrap()..]).unwrap();
                v.as_array().unwrap().clone()
            })
            .collect()
    };
    let start = Instant::now();
    loop {
        let n = entries(&got.lock().unwrap())
            .iter()
            .map(|v| v["Id"].to_string())
            .collect::<HashSet<_>>()
            .len();
        if n >= expected {
            break;
        }
        // What the killed replica had claimed waits for its lease to expire (15 s).
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{n} of {expected} deliveries"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let entries = entries(&got.lock().unwrap());
    // Delivery is at least once: a replica killed between sending a notification and
    // recording it leaves it to another replica once its lease expires, so what was written
    // before the kill may arrive twice. What was written after it, the live replicas share
    // with their leases: exactly once, from overlapping delivery passes.
    let mut ids: HashMap<String, (usize, u64)> = HashMap::new();
    for v in &entries {
        let json = v.to_string();
        let id = v["Id"]
            .as_str()
            .unwrap_or_else(|| panic!("no Id in {json}"))
            .to_owned();
        let seq = v["Detail"]["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("no Detail.seq in {json}"));
        ids.entry(id).or_insert((0, seq)).0 += 1;
    }
    assert_eq!(ids.len(), expected, "every notification arrived: {ids:?}");
    let after_kill = ids.values().filter(|(_, seq)| *seq > killed_at).count();
    assert!(
        after_kill >= 4,
        "too few notifications after the kill to test exactly-once ({after_kill})"
    );
    let twice: HashSet<_> = ids
        .iter()
        .filter(|(_, (n, seq))| *n > 1 && *seq > killed_at)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    drop((a, b, pg));
}

fn healthz(port: u16) -> String {
    crate::util::http(
        port,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
}

/// `store migrate` and `store info` on a database; data-dir-only commands refuse a database URL
/// (and create no data dir store); `/healthz` answers 503 while the database is down and 200 once
/// it is back, and writes work again without restarting the replica.
#[test]
fn store_commands_refusals_and_health_follow_the_database() {
    let mut pg = PgCluster::start();
    let db = pg.create_database();
    let env = Env::new();
    let with_db = |args: &[&str]| {
        env.command()
            .env("EUA_DATABASE_URL", &db)
            .args(args)
            .output()
            .unwrap()
    };
    let out = with_db(&["store", "migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("postgresql store at postgres://postgres@127.0.0.1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = with_db(&[
        "progress",
        "upgrade",
        "create",
        "u",
        "--plan",
        "p",
        "--cluster",
        "k",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_db(&["-o", "json", "store", "info"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["backend"], "postgresql");
    assert_eq!(info["schema_version"], 2);
    assert_eq!(info["counts"]["upgrades"], 1);
    assert_eq!(info["counts"]["events"], 1);

    let out = with_db(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u",
        "--cluster",
        "k",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not work with --database-url"), "{err}");
    assert!(
        !env.data_dir().join("eks-upgrade-agent.sqlite3").exists(),
        "a data dir store was created"
    );
    // The data dir is untouched by progress commands on the database too.
    let out = env.run(&["progress", "upgrade", "show", "u"]);
    assert_eq!(out.status.code(), Some(1));

    let replica = serve(&env, &[("EUA_DATABASE_URL", db.as_str())]);
    assert!(
        healthz(replica.port).starts_with("HTTP/1.1 200"),
        "{}",
        healthz(replica.port)
    );
    pg.stop();
    let down = healthz(replica.port);
    assert!(down.starts_with("HTTP/1.1 503"), "{down}");
    let server = format!("http://127.0.0.1:{}", replica.port);
    let out = env.run(&["--server", &server, "progress", "upgrade", "start", "u"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a write while the database is down fails"
    );
    pg.restart();
    let start = Instant::now();
    while !healthz(replica.port).starts_with("HTTP/1.1 200") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            healthz(replica.port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.run(&["--server", &server, "progress", "upgrade", "start", "u"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_db(&["-o", "json", "store", "info"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["counts"]["events"], 2, "nothing acknowledged was lost");
}
