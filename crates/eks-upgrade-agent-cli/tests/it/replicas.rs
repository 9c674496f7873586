//! Team mode: three `serve` replicas on one PostgreSQL database. Writers on two replicas at
//! once; a WebSocket follower on the third sees every event once, in `seq` order; the third is
//! killed (SIGKILL) mid-stream and the follower resumes on another replica with `?since=`
//! without a gap; a webhook receiver gets every notification, and each one written after the
//! kill exactly once, whichever live replica sends it. An artifact added through one replica
//! downloads, verified, from another (its bytes in S3, each replica's blob cache its own).

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
    assert_eq!(info["schema_version"], 12);
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
    // Artifacts on a database keep their bytes in S3: without a bucket, say which setting.
    assert!(
        err.contains("--s3-bucket") && err.contains("EUA_S3_BUCKET"),
        "{err}"
    );
    let out = with_db(&["notify", "status"]);
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

/// G24: `serve` on a database without an S3 bucket says on stderr, before it serves, that
/// artifacts are off and which setting turns them on; its artifact routes then answer 404
/// saying artifacts are not enabled, while progress works.
#[test]
fn serve_on_a_database_without_a_bucket_warns_and_turns_artifacts_off() {
    use std::io::BufRead;
    let pg = PgCluster::start();
    let db = pg.create_database();
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = env.command();
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("EUA_DATABASE_URL", &db)
        .env_remove("EUA_S3_BUCKET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut served = Served {
        child: cmd.spawn().unwrap(),
        port,
    };
    let stderr = served.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("serve did not start ({e}): {lines:?}"));
        let serving = line.starts_with("serving http://");
        lines.push(line);
        if serving {
            break;
        }
    }
    let warning = lines
        .iter()
        .find(|l| l.starts_with("warning: artifacts are off"))
        .unwrap_or_else(|| panic!("no warning on stderr: {lines:?}"));
    assert!(
        warning.contains("--s3-bucket")
            && warning.contains("EUA_S3_BUCKET")
            && warning.contains("--database-url"),
        "{warning}"
    );
    let resp = crate::util::http(
        port,
        "GET /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(
        resp.starts_with("HTTP/1.1 404") && resp.contains("artifacts are not enabled"),
        "{resp}"
    );
    assert!(
        healthz(port).starts_with("HTTP/1.1 200"),
        "{}",
        healthz(port)
    );
    served.child.kill().unwrap();
    let status = served.child.wait().unwrap();
    assert!(!status.success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut served.child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(
        !stdout.contains("warning"),
        "the warning goes to stderr: {stdout}"
    );
    reader.join().unwrap();
    drop(pg);
}

/// Team-mode artifacts: added through one replica, the bytes go to S3 before the row commits,
/// and another replica (its own data dir, an empty cache) downloads them verified, reading
/// through into its cache; a replica's cache stays within `EUA_BLOB_CACHE_SIZE` (least
/// recently used out). With `auto_upload` on every replica, the layout object is uploaded once
/// (one version in a versioned bucket), and so is the blob.
#[test]
fn an_artifact_added_through_one_replica_downloads_verified_from_another() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let moto = crate::util::Moto::start();
    moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         s3.create_bucket(Bucket='team')\n\
         s3.put_bucket_versioning(Bucket='team', VersioningConfiguration={'Status': 'Enabled'})\n\
         print('null')",
    );
    let env = Env::new();
    // Each replica its own data dir (its own blob cache).
    let homes: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    let mut vars: Vec<(&str, &str)> = crate::s3::aws_env(&moto.url).to_vec();
    vars.extend([
        ("EUA_DATABASE_URL", db.as_str()),
        ("EUA_S3_BUCKET", "team"),
        ("EUA_AUTO_UPLOAD", "true"),
    ]);
    let replica = |i: usize, cache: &str| {
        let mut v = vars.clone();
        v.push(("EUA_BLOB_CACHE_SIZE", cache));
        serve(&homes[i], &v)
    };
    let a = replica(0, "1GiB");
    let b = replica(1, "1GiB");
    let c = replica(2, "150KiB");
    let on = |s: &Served, args: &[&str]| -> Value {
        let server = format!("http://127.0.0.1:{}", s.port);
        let out = env
            .command()
            .args(["--server", &server, "-o", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let s = on(
        &a,
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u",
            "--cluster",
            "k",
        ],
    );
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let col = on(
        &a,
        &["artifacts", "collection", "create", &sid, "--name", "logs"],
    );
    let cid = col["collection_id"].as_str().unwrap().to_owned();
    // Files (not inline rows) in the caches: 100 KB each.
    let bodies: Vec<Vec<u8>> = (0..2u8)
        .map(|k| (0..100_000u32).map(|i| (i % 251) as u8 ^ k).collect())
        .collect();
    let mut ids = Vec::new();
    let mut hashes = Vec::new();
    for (k, body) in bodies.iter().enumerate() {
        let file = env.dir.path().join(format!("node-{k}.log"));
        std::fs::write(&file, body).unwrap();
        let added = on(
            &a,
            &["artifacts", "add", &sid, &cid, file.to_str().unwrap()],
        );
        ids.push(added[0]["artifact_id"].as_str().unwrap().to_owned());
        hashes.push(added[0]["file_hash"].as_str().unwrap().to_owned());
    }
    let cached = |i: usize, hash: &str| {
        homes[i]
            .data_dir()
            .join("blobs/sha256")
            .join(&hash[..2])
            .join(&hash[2..])
            .exists()
    };
    assert!(cached(0, &hashes[0]), "the adding replica keeps a copy");
    assert!(
        !cached(1, &hashes[0]),
        "another replica has none before reading"
    );
    // Downloads from the other replicas, verified (the server checks the digest, and so do we).
    let out = env.dir.path().join("got.log");
    on(
        &b,
        &["artifacts", "get", &ids[0], "--out", out.to_str().unwrap()],
    );
    assert!(std::fs::read(&out).unwrap() == bodies[0]);
    assert!(cached(1, &hashes[0]), "read through into B's cache");
    // C's cache holds 150 KiB: the second artifact pushes the first one out.
    on(
        &c,
        &["artifacts", "get", &ids[0], "--out", out.to_str().unwrap()],
    );
    assert!(cached(2, &hashes[0]));
    on(
        &c,
        &["artifacts", "get", &ids[1], "--out", out.to_str().unwrap()],
    );
    assert!(std::fs::read(&out).unwrap() == bodies[1]);
    assert!(cached(2, &hashes[1]));
    assert!(
        !cached(2, &hashes[0]),
        "least recently used evicted at the cap"
    );
    on(
        &c,
        &["artifacts", "get", &ids[0], "--out", out.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&out).unwrap() == bodies[0],
        "read through again"
    );
    // Every replica runs the uploader (every 2 s): each artifact ends uploaded, and later
    // passes rewrite nothing (that two never claim one artifact at once is G22's test).
    let start = Instant::now();
    loop {
        let shown = on(&b, &["artifacts", "show", &ids[1]]);
        if shown["status"] == "uploaded"
            && on(&b, &["artifacts", "show", &ids[0]])["status"] == "uploaded"
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not uploaded: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Several more passes of all three uploaders.
    std::thread::sleep(Duration::from_secs(5));
    let versions = moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         v = s3.list_object_versions(Bucket='team').get('Versions', [])\n\
         print(json.dumps([x['Key'] for x in v]))",
    );
    let keys: Vec<&str> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    for (k, hash) in hashes.iter().enumerate() {
        let layout = format!("eks-upgrade-agent/artifacts/{sid}/{cid}/node-{k}.log");
        assert_eq!(
            keys.iter().filter(|x| **x == layout).count(),
            1,
            "uploaded once: {keys:?}"
        );
        let blob = format!(
            "eks-upgrade-agent/artifacts/blobs/sha256/{}/{}",
            &hash[..2],
            &hash[2..]
        );
        assert_eq!(
            keys.iter().filter(|x| **x == blob).count(),
            1,
            "blob stored once: {keys:?}"
        );
    }
    drop((a, b, c, pg));
}
