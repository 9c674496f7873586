//! `store copy --to URL` (issue #13): a data dir copied to a PostgreSQL database (bytes to S3,
//! moto), from there to another database and to a new data dir keeps every table with its identity: the events with
//! their `seq`s and ids (new writes continue after them), the per-task event chain, artifacts
//! (downloaded verified from each copy), test results, and the outbox (what was delivered is not
//! sent again; what was pending is delivered once by the copy's dispatcher). Refusals (a bad
//! URL, the store itself, a target that is not empty) change nothing; a copy that fails midway
//! leaves its target empty.

use std::path::Path;

use serde_json::Value;

use eks_upgrade_agent::test_support::PgCluster;

use crate::util::{Env, Moto, Received, serve, webhook_receiver};

/// Runs the binary in `env` with `vars` and `-o json`; asserts success, parses stdout.
fn json(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Value {
    let out = env
        .command()
        .envs(vars.iter().copied())
        .args(["-o", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Runs and expects failure; returns stderr.
fn refused(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> String {
    let out = env
        .command()
        .envs(vars.iter().copied())
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// A one-suite JUnit report: `(name, passed)`.
fn report(dir: &Path, file: &str, cases: &[(&str, bool)]) -> String {
    let mut xml = String::from("<?xml version=\"1.0\"?>\n<testsuite name=\"smoke\">\n");
    for (name, passed) in cases {
        let inner = if *passed {
            String::new()
        } else {
            format!("<failure message=\"{name} broke\">trace</failure>")
        };
        xml.push_str(&format!(
            "  <testcase classname=\"tests.api\" name=\"{name}\" time=\"1.5\">{inner}</testcase>\n"
        ));
    }
    xml.push_str("</testsuite>\n");
    let path = dir.join(file);
    std::fs::write(&path, xml).unwrap();
    path.to_str().unwrap().to_owned()
}

/// How many bodies a receiver got that carry `id`.
fn sent(got: &Received, id: &str) -> usize {
    got.lock()
        .unwrap()
        .iter()
        .filter(|b| b.contains(id))
        .count()
}

/// The id of the event of `kind` on `task` in `events`.
fn event_id(events: &Value, kind: &str, task: &str) -> String {
    events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == kind && e["task_id"] == task)
        .unwrap_or_else(|| panic!("no {kind} of {task}"))["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until `cond` holds (20 s at most).
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_data_dir_copied_to_a_database_and_back_keeps_everything() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let moto = Moto::start();
    moto.python("boto3.client('s3', **kw).create_bucket(Bucket='team')\nprint('null')");
    let aws = crate::s3::aws_env(&moto.url);
    let (hook, got) = webhook_receiver();
    let src = Env::new();
    let hooked: &[(&str, &str)] = &[("EUA_WEBHOOK_URL", hook.as_str())];

    // Delivered before the copy: u1, t1 started and completed (a duration sample), artifacts,
    // a pre run.
    for args in [
        &[
            "progress",
            "upgrade",
            "create",
            "u1",
            "--plan",
            "p",
            "--cluster",
            "k",
        ][..],
        &["progress", "upgrade", "start", "u1"],
        &[
            "progress",
            "task",
            "add",
            "u1",
            "t1",
            "--name",
            "T1",
            "--type",
            "upgrade_step",
        ],
        &[
            "progress",
            "task",
            "add",
            "u1",
            "t2",
            "--name",
            "T2",
            "--type",
            "validation",
        ],
        &["progress", "task", "start", "u1", "t1"],
        &["progress", "task", "update", "u1", "t1", "--percent", "50"],
        &["progress", "task", "complete", "u1", "t1"],
    ] {
        json(&src, hooked, args);
    }
    let session = json(
        &src,
        &[],
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u1",
            "--cluster",
            "k",
        ],
    )["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let coll = json(
        &src,
        &[],
        &[
            "artifacts",
            "collection",
            "create",
            &session,
            "--name",
            "logs",
        ],
    )["collection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let files = tempfile::tempdir().unwrap();
    // One blob in a file of its own (over 16 KiB), one inline, and the same bytes twice.
    let big: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(files.path().join("big.log"), &big).unwrap();
    std::fs::write(files.path().join("small.txt"), b"small bytes").unwrap();
    std::fs::write(files.path().join("again.txt"), b"small bytes").unwrap();
    let added = json(
        &src,
        &[],
        &[
            "artifacts",
            "add",
            &session,
            &coll,
            files.path().to_str().unwrap(),
            "--tag",
            "x",
        ],
    );
    let ids: Vec<(String, String)> = added
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["artifact_id"].as_str().unwrap().to_owned(),
                a["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(ids.len(), 3);
    // A deleted artifact: its row stays (status deleted), its bytes are gone.
    let gone_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        gone_dir.path().join("gone.txt"),
        b"bytes deleted before the copy",
    )
    .unwrap();
    let gone = json(
        &src,
        &[],
        &[
            "artifacts",
            "add",
            &session,
            &coll,
            gone_dir.path().join("gone.txt").to_str().unwrap(),
        ],
    );
    let gone = gone[0]["artifact_id"].as_str().unwrap().to_owned();
    json(&src, &[], &["artifacts", "delete", &gone]);
    let pre = report(files.path(), "pre.xml", &[("dns", true), ("pods", true)]);
    json(
        &src,
        &[],
        &["tests", "ingest", &pre, "--upgrade", "u1", "--phase", "pre"],
    );
    json(&src, hooked, &["notify", "flush"]);
    let delivered = sent(
        &got,
        &event_id(&src.events("u1").into(), "task.completed", "t1"),
    );
    assert_eq!(delivered, 1, "the source delivered t1's completion");

    // Pending at the copy (no sink while they were written): t2 started and failed, a post
    // run that fails the gate.
    json(&src, &[], &["progress", "task", "start", "u1", "t2"]);
    json(
        &src,
        &[],
        &[
            "progress",
            "task",
            "fail",
            "u1",
            "t2",
            "--error",
            "pods broke",
        ],
    );
    let post = report(files.path(), "post.xml", &[("dns", true), ("pods", false)]);
    let out = src
        .command()
        .args([
            "tests",
            "ingest",
            &post,
            "--upgrade",
            "u1",
            "--phase",
            "post",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "{out:?}"
    );

    let events: Value = src.events("u1").into();
    let info =
        |env: &Env, vars: &[(&str, &str)]| json(env, vars, &["store", "info"])["counts"].clone();
    let src_counts = info(&src, &[]);
    let compare = |env: &Env, vars: &[(&str, &str)]| {
        let out = env
            .command()
            .envs(vars.iter().copied())
            .args(["-o", "json", "tests", "compare", "--upgrade", "u1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "the gate fails: {out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let history = |env: &Env, vars: &[(&str, &str)]| {
        json(env, vars, &["tests", "history", "pods", "--cluster", "k"])
    };
    let src_compare = compare(&src, &[]);
    let src_history = history(&src, &[]);
    let src_t1 = json(&src, &[], &["progress", "task", "show", "u1", "t1"]);

    // Refusals change nothing.
    let err = refused(&src, &[], &["store", "copy", "--to", "ftp://somewhere/x"]);
    assert!(err.contains("unknown scheme \"ftp\""), "{err}");
    let err = refused(&src, &[], &["store", "copy", "--to", &db]);
    assert!(err.contains("--to-s3-bucket"), "{err}");
    let err = refused(
        &src,
        &[],
        &[
            "store",
            "copy",
            "--to",
            &format!("sqlite://{}", src.data_dir().display()),
        ],
    );
    assert!(err.contains("the source store itself"), "{err}");

    // Data dir -> database (bytes to S3).
    let mut to_db: Vec<(&str, &str)> = aws.to_vec();
    to_db.push(("EUA_S3_BUCKET", "team"));
    let copied = json(&src, &to_db, &["store", "copy", "--to", &db]);
    assert_eq!(copied["tables"], src_counts, "{copied}");
    // Four distinct blobs (the two reports are kept as artifacts too), one added twice.
    assert_eq!(copied["blobs"]["copied"], 4, "{copied}");
    assert_eq!(copied["blobs"]["present"], 1, "{copied}");
    assert_eq!(
        copied["blobs"]["skipped"], 1,
        "the deleted artifact: {copied}"
    );

    // The database: the same rows, events and answers.
    let team = Env::new();
    let mut on_db = to_db.clone();
    on_db.push(("EUA_DATABASE_URL", db.as_str()));
    assert_eq!(info(&team, &on_db), src_counts);
    assert_eq!(
        json(&team, &on_db, &["progress", "events", "u1"]),
        events,
        "a follower from seq 0 sees the source's events, seqs and ids"
    );
    assert_eq!(compare(&team, &on_db), src_compare);
    assert_eq!(history(&team, &on_db), src_history);
    for (id, name) in &ids {
        let out = team.data_dir().join(format!("db-{name}"));
        json(
            &team,
            &on_db,
            &["artifacts", "get", id, "--out", out.to_str().unwrap()],
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(files.path().join(name)).unwrap(),
            "{name}"
        );
    }

    // A copy onto a database that holds rows, or onto itself, is refused and changes nothing.
    let err = refused(&src, &to_db, &["store", "copy", "--to", &db]);
    assert!(
        err.contains("not empty") && err.contains("upgrades: 1"),
        "{err}"
    );
    let err = refused(&team, &on_db, &["store", "copy", "--to", &db]);
    assert!(err.contains("the source store itself"), "{err}");
    assert_eq!(info(&team, &on_db), src_counts);

    // Database -> database: the same bucket and prefix only when asked (the source retired:
    // every blob is there already).
    let db2 = pg.create_database();
    let err = refused(&team, &on_db, &["store", "copy", "--to", &db2]);
    assert!(err.contains("--share-bucket"), "{err}");
    let copied = json(
        &team,
        &on_db,
        &["store", "copy", "--to", &db2, "--share-bucket"],
    );
    assert_eq!(copied["tables"], src_counts, "{copied}");
    assert_eq!(copied["blobs"]["copied"], 0, "{copied}");
    assert_eq!(copied["blobs"]["present"], 5, "{copied}");
    let mut on_db2 = to_db.clone();
    on_db2.push(("EUA_DATABASE_URL", db2.as_str()));
    assert_eq!(json(&team, &on_db2, &["progress", "events", "u1"]), events);
    assert_eq!(compare(&team, &on_db2), src_compare);

    // Database -> a new data dir (an empty directory).
    let back = Env::new();
    let copied = json(
        &team,
        &on_db,
        &[
            "store",
            "copy",
            "--to",
            &format!("file://{}", back.data_dir().display()),
        ],
    );
    assert_eq!(copied["tables"], src_counts, "{copied}");
    let in_back = |args: &[&str]| json(&back, &[], args);
    assert_eq!(in_back(&["store", "info"])["counts"], src_counts);
    assert_eq!(in_back(&["progress", "events", "u1"]), events);
    // The per-task chain (which the database does not store) is rebuilt.
    assert_eq!(in_back(&["progress", "task", "show", "u1", "t1"]), src_t1);
    assert_eq!(compare(&back, &[]), src_compare);
    assert_eq!(history(&back, &[]), src_history);
    for (id, name) in &ids {
        let out = files.path().join(format!("back-{name}"));
        in_back(&["artifacts", "get", id, "--out", out.to_str().unwrap()]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(files.path().join(name)).unwrap()
        );
    }
    in_back(&["artifacts", "verify"]);

    // New writes continue after the copied seqs, on both copies.
    let last = events.as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    let t3 = [
        "progress", "task", "add", "u1", "t3", "--name", "T3", "--type", "cleanup",
    ];
    json(&team, &on_db, &t3);
    in_back(&t3);
    for seqs in [
        json(&team, &on_db, &["progress", "events", "u1"]),
        in_back(&["progress", "events", "u1"]),
    ] {
        let tail = seqs.as_array().unwrap().last().unwrap();
        assert_eq!(tail["seq"].as_u64().unwrap(), last + 1, "{tail}");
        assert_eq!(tail["task_id"], "t3");
    }

    // The outbox: on each copy the pending notifications are delivered once, the delivered
    // ones not again.
    let pending = [
        event_id(&events, "task.started", "t2"),
        event_id(&events, "task.failed", "t2"),
    ];
    let done = [
        event_id(&events, "task.started", "t1"),
        event_id(&events, "task.completed", "t1"),
    ];
    for id in &pending {
        assert_eq!(sent(&got, id), 0, "not sent before the copy");
    }
    json(&back, hooked, &["notify", "flush"]);
    for id in &pending {
        assert_eq!(sent(&got, id), 1, "sent once from the data dir copy");
    }
    let mut serve_vars = on_db.clone();
    serve_vars.push(("EUA_WEBHOOK_URL", hook.as_str()));
    let served = serve(&team, &serve_vars);
    for id in &pending {
        wait_until("the database's dispatcher", || sent(&got, id) == 2);
    }
    // Until the copy's dispatcher has nothing pending: by then it has sent every entry the
    // outbox holds as undelivered (a delivery copied as pending by mistake too), so the
    // counts below are final (no waiting for a resend that may come).
    wait_until("nothing pending on the database copy", || {
        notifications_pending(served.port) == Some(0)
    });
    drop(served);
    for id in &pending {
        assert_eq!(sent(&got, id), 2, "once per copy");
    }
    for id in &done {
        assert_eq!(sent(&got, id), 1, "delivered before the copy: never again");
    }
}

/// The notifications a server's dispatcher has not delivered, from its `/metrics` (`None`
/// before it lists a sink).
fn notifications_pending(port: u16) -> Option<u64> {
    let text = crate::util::http(
        port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("eua_notifications_pending{"))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A copy that fails midway (an artifact's bytes are corrupt or missing in the source, found
/// after the progress tables went in) leaves the target empty, data dir or database; a rerun once
/// the cause is gone succeeds.
#[test]
fn a_copy_that_fails_midway_leaves_the_target_empty() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let moto = Moto::start();
    moto.python("boto3.client('s3', **kw).create_bucket(Bucket='team')\nprint('null')");
    let src = Env::with_task();
    let session = json(
        &src,
        &[],
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u",
            "--cluster",
            "c",
        ],
    )["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let coll = json(
        &src,
        &[],
        &["artifacts", "collection", "create", &session, "--name", "l"],
    )["collection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = src.data_dir().join("big.log");
    std::fs::write(&file, vec![9u8; 30_000]).unwrap();
    let a = json(
        &src,
        &[],
        &["artifacts", "add", &session, &coll, file.to_str().unwrap()],
    );
    let hex = a[0]["file_hash"].as_str().unwrap().to_owned();
    let blob = src
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(&hex[2..]);
    let saved = src.data_dir().join("saved-blob");
    std::fs::copy(&blob, &saved).unwrap();

    let mut to_db: Vec<(&str, &str)> = crate::s3::aws_env(&moto.url).to_vec();
    to_db.push(("EUA_S3_BUCKET", "team"));
    let dir = Env::new();
    let target = dir.data_dir();
    // Corrupt bytes (the digest is checked as they are read), then missing bytes.
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    for to in [db.as_str(), target.to_str().unwrap()] {
        let err = refused(&src, &to_db, &["store", "copy", "--to", to]);
        assert!(err.contains("is corrupt"), "{err}");
    }
    std::fs::remove_file(&blob).unwrap();
    for to in [db.as_str(), target.to_str().unwrap()] {
        let err = refused(&src, &to_db, &["store", "copy", "--to", to]);
        assert!(
            err.contains("missing from the source's blob store"),
            "{err}"
        );
    }
    let team = Env::new();
    let mut on_db = to_db.clone();
    on_db.push(("EUA_DATABASE_URL", db.as_str()));
    let zero = |counts: &Value| counts.as_object().unwrap().values().all(|n| n == 0);
    let counts = json(&team, &on_db, &["store", "info"])["counts"].clone();
    assert!(zero(&counts), "{counts}");
    let counts = json(&dir, &[], &["store", "info"])["counts"].clone();
    assert!(zero(&counts), "{counts}");

    std::fs::rename(&saved, &blob).unwrap();
    // A wrong blob under that digest already on the target is not trusted: it is replaced.
    let planted = target.join("blobs/sha256").join(&hex[..2]).join(&hex[2..]);
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, vec![7u8; 30_000]).unwrap();
    for to in [db.as_str(), target.to_str().unwrap()] {
        let copied = json(&src, &to_db, &["store", "copy", "--to", to]);
        assert_eq!(copied["tables"]["artifacts"], 1, "{copied}");
        assert_eq!(copied["blobs"]["copied"], 1, "{copied}");
    }
    assert_eq!(std::fs::read(&planted).unwrap(), vec![9u8; 30_000]);
    json(&dir, &[], &["artifacts", "verify"]);
}

/// A data dir whose upgrade `u` has `events` events (task updates with 200-byte messages),
/// written through the library in batches.
fn store_with_events(events: usize) -> Env {
    use eks_upgrade_agent::store::ProgressStore;
    use eks_upgrade_agent::store::domain::command::Command;
    use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};
    let env = Env::new();
    let store = SqliteStore::open(env.data_dir(), &SqliteOptions::default()).unwrap();
    let command = |v: Value| serde_json::from_value::<Command>(v).unwrap();
    let setup = [
        command(
            serde_json::json!({"op": "upgrade.create", "upgrade_id": "u", "plan_id": "p",
            "cluster_name": "k"}),
        ),
        command(
            serde_json::json!({"op": "task.add", "upgrade_id": "u", "task_id": "t",
            "name": "T", "task_type": "upgrade_step"}),
        ),
    ];
    for r in store.execute(&setup).unwrap() {
        r.unwrap();
    }
    let pad = "m".repeat(192);
    for batch in 0..events / 1000 {
        let commands: Vec<Command> = (0..1000)
            .map(|k| {
                let n = batch * 1000 + k;
                command(serde_json::json!({"op": "task.update", "upgrade_id": "u",
                    "task_id": "t", "percentage": (n % 100) as f64,
                    "message": format!("{n:08}{pad}")}))
            })
            .collect();
        for r in store.execute(&commands).unwrap() {
            r.unwrap();
        }
    }
    env
}

/// The peak resident memory (KiB, `VmHWM`) of `store copy` from `env` to a new data dir, as
/// last seen before it exits (the high-water mark only grows, so what is missed is the end).
fn copy_peak_kib(env: &Env) -> u64 {
    let target = tempfile::tempdir().unwrap();
    let mut child = env
        .command()
        .args(["store", "copy", "--to", target.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status)
            && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line[6..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap();
            peak = peak.max(kib);
        }
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "store copy failed");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(peak > 0, "no VmHWM read");
    peak
}

/// Memory stays flat: copying ten times the events (200,000, about 60 MB of rows) takes no
/// more memory than the small copy, give or take 16 MiB (holding the events would take
/// well over 100 MiB).
#[test]
fn a_copy_takes_the_same_memory_whatever_the_number_of_events() {
    let small = copy_peak_kib(&store_with_events(20_000));
    let large = copy_peak_kib(&store_with_events(200_000));
    assert!(
        large <= small + 16 * 1024,
        "peak {large} KiB for 200,000 events, {small} KiB for 20,000"
    );
}

/// Refusals read the target without changing it: a database at an older schema holding rows
/// keeps its schema version and gets no new table; a data dir store at an older version keeps
/// its version; a directory that holds files but no store is refused; a URL in an error never
/// shows its password; a source database's artifacts without a bucket are refused before a
/// data dir is created.
#[test]
fn refusals_read_the_target_without_changing_it() {
    let pg = PgCluster::start();
    let src = Env::with_task();

    // A database at schema version 1 with a row.
    let old = pg.create_database();
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .args([old.as_str(), "-v", "ON_ERROR_STOP=1", "-tAc", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    psql(
        "CREATE TABLE schema_version (version BIGINT NOT NULL); \
         INSERT INTO schema_version VALUES (1); \
         CREATE TABLE upgrades (ukey BIGSERIAL PRIMARY KEY, upgrade_id TEXT); \
         INSERT INTO upgrades (upgrade_id) VALUES ('old')",
    );
    let err = refused(&src, &[], &["store", "copy", "--to", &old]);
    assert!(
        err.contains("not empty") && err.contains("upgrades: 1"),
        "{err}"
    );
    assert_eq!(psql("SELECT version FROM schema_version"), "1");
    assert_eq!(
        psql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"),
        "2",
        "no table created"
    );

    // A data dir store with a row, set back to an older version.
    let full = Env::with_task();
    let db_file = full
        .data_dir()
        .join(eks_upgrade_agent::store::sqlite::DB_FILE);
    let set = rusqlite::Connection::open(&db_file).unwrap();
    set.pragma_update(None, "user_version", 9).unwrap();
    drop(set);
    let err = refused(
        &src,
        &[],
        &["store", "copy", "--to", full.data_dir().to_str().unwrap()],
    );
    assert!(
        err.contains("not empty") && err.contains("upgrades: 1"),
        "{err}"
    );
    let version: i64 = rusqlite::Connection::open(&db_file)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 9, "not migrated");

    // A directory with files but no store.
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("notes.txt"), b"mine").unwrap();
    let err = refused(
        &src,
        &[],
        &["store", "copy", "--to", home.path().to_str().unwrap()],
    );
    assert!(err.contains("not empty and holds no store"), "{err}");
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 1);

    // Passwords stay out of errors; schemes compare case-insensitively; `scheme:` without `//`
    // is not taken for a directory.
    for (to, says) in [
        ("pg://u:s3cret@127.0.0.1:1/db", "unknown scheme \"pg\""),
        ("postgres:/u:s3cret@127.0.0.1:1/db", "no \"//\""),
        ("POSTGRES://u:s3cret@127.0.0.1:1/db", "cannot"),
    ] {
        let err = refused(&src, &[], &["store", "copy", "--to", to]);
        assert!(err.contains(says), "{to}: {err}");
        assert!(!err.contains("s3cret"), "{to}: {err}");
    }
    assert!(!src.data_dir().join("postgres:").exists());

    // A database source with artifacts and no bucket: refused before the data dir exists.
    let db = pg.create_database();
    let on_db: &[(&str, &str)] = &[("EUA_DATABASE_URL", db.as_str())];
    let team = Env::new();
    json(
        &team,
        on_db,
        &[
            "progress",
            "upgrade",
            "create",
            "u",
            "--plan",
            "p",
            "--cluster",
            "c",
        ],
    );
    // The same store in disguise: another host name for the server, extra parameters; a
    // symlink to the data dir.
    let disguised = format!(
        "{}?application_name=other",
        db.replace("127.0.0.1", "localhost")
    );
    assert_ne!(disguised, db);
    let err = refused(&team, on_db, &["store", "copy", "--to", &disguised]);
    assert!(err.contains("the source store itself"), "{err}");
    let link = home.path().join("link");
    std::os::unix::fs::symlink(src.data_dir(), &link).unwrap();
    let err = refused(
        &src,
        &[],
        &["store", "copy", "--to", link.to_str().unwrap()],
    );
    assert!(err.contains("the source store itself"), "{err}");

    psql_on(
        &db,
        "INSERT INTO sessions (session_id, upgrade_id, cluster_name, name, started_at, \
         retention_days) VALUES ('s1', 'u', 'c', 's', 0, 30); \
         INSERT INTO collections (collection_id, skey, name, created_at) \
         SELECT 'c1', skey, 'l', 0 FROM sessions",
    );
    psql_on(
        &db,
        "INSERT INTO artifacts (artifact_id, skey, ckey, name, export_name, artifact_type, \
         file_size, file_hash, status, created_at, upgrade_id) SELECT 'a1', skey, ckey, 'n', \
         'n', 0, 1, repeat('0', 64), 0, 0, 'u' FROM collections LIMIT 1",
    );
    let fresh = team.data_dir().join("fresh");
    let err = refused(
        &team,
        on_db,
        &["store", "copy", "--to", fresh.to_str().unwrap()],
    );
    assert!(err.contains("--s3-bucket"), "{err}");
    assert!(!fresh.exists(), "nothing created");
}

fn psql_on(url: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A `psql` session holding a transaction open (killed on drop).
struct PsqlSession(std::process::Child);

impl PsqlSession {
    /// Runs `sql` in a transaction left open, once `psql` has answered it.
    fn hold(url: &str, sql: &str) -> PsqlSession {
        use std::io::{BufRead, Write};
        let mut child = std::process::Command::new("psql")
            .args([url, "-v", "ON_ERROR_STOP=1", "-tAq"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "BEGIN; {sql}; SELECT 'held';").unwrap();
        stdin.flush().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "held");
        child.stdin = Some(stdin);
        PsqlSession(child)
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A copy into a database another session is writing to (it holds a lock on a copied table)
/// gives up after `--lock-timeout` with an error saying so, and copies nothing; once the
/// session is gone, the copy succeeds (G122). Before, the copy waited forever (the test kills
/// it after a minute).
#[test]
fn a_copy_into_a_database_in_use_gives_up_after_the_lock_timeout() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let src = Env::with_task();
    let team = Env::new();
    let on_db = [("EUA_DATABASE_URL", db.as_str())];
    json(&team, &on_db, &["store", "migrate"]);
    let holder = PsqlSession::hold(&db, "LOCK TABLE upgrades IN ROW EXCLUSIVE MODE");
    let mut copy = src
        .command()
        .args(["store", "copy", "--to", &db, "--lock-timeout", "1s"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = copy.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            let _ = copy.kill();
            let _ = copy.wait();
            panic!("the copy still waits for the lock after a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut copy.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("the target database is in use")
            && err.contains("waited more than 1 s")
            && err.contains("nothing was copied"),
        "{err}"
    );
    let data_dir = Env::new();
    let refusal = refused(
        &src,
        &[],
        &[
            "store",
            "copy",
            "--to",
            data_dir.data_dir().to_str().unwrap(),
            "--lock-timeout",
            "1s",
        ],
    );
    assert!(
        refusal.contains("--lock-timeout is for a database target"),
        "{refusal}"
    );
    drop(holder);
    let counts = json(&team, &on_db, &["store", "info"])["counts"].clone();
    assert!(
        counts.as_object().unwrap().values().all(|n| n == 0),
        "{counts}"
    );
    let copied = json(&src, &[], &["store", "copy", "--to", &db]);
    assert_eq!(copied["tables"]["upgrades"], 1, "{copied}");
}

/// A data dir (no foreign keys) holding an artifact whose collection was removed by hand
/// copies to a database with an error naming the artifact, its missing collection and what
/// to do, and copies nothing (before: the database's bare foreign-key error) (G123).
#[test]
fn an_orphan_artifact_is_named_when_a_database_refuses_it() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let moto = Moto::start();
    moto.python("boto3.client('s3', **kw).create_bucket(Bucket='team')\nprint('null')");
    let src = Env::with_task();
    let session = json(
        &src,
        &[],
        &[
            "artifacts",
            "session",
            "create",
            "--upgrade",
            "u",
            "--cluster",
            "c",
        ],
    )["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let coll = json(
        &src,
        &[],
        &["artifacts", "collection", "create", &session, "--name", "l"],
    )["collection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = src.data_dir().join("a.log");
    std::fs::write(&file, b"orphan").unwrap();
    let a = json(
        &src,
        &[],
        &["artifacts", "add", &session, &coll, file.to_str().unwrap()],
    );
    let artifact = a[0]["artifact_id"].as_str().unwrap().to_owned();
    let conn =
        rusqlite::Connection::open(src.data_dir().join("eks-upgrade-agent.sqlite3")).unwrap();
    let ckey: i64 = conn
        .query_row(
            "SELECT ckey FROM collections WHERE collection_id = ?1",
            [&coll],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute("DELETE FROM collections WHERE ckey = ?1", [ckey])
        .unwrap();
    drop(conn);
    let mut to_db: Vec<(&str, &str)> = crate::s3::aws_env(&moto.url).to_vec();
    to_db.push(("EUA_S3_BUCKET", "team"));
    let err = refused(&src, &to_db, &["store", "copy", "--to", &db]);
    assert!(
        err.contains(&format!("artifact_id \"{artifact}\""))
            && err.contains(&format!("collections row ckey = {ckey}"))
            && err.contains("delete that artifacts row from the source")
            && err.contains("nothing was copied"),
        "{err}"
    );
    let team = Env::new();
    let mut on_db = to_db.clone();
    on_db.push(("EUA_DATABASE_URL", db.as_str()));
    let counts = json(&team, &on_db, &["store", "info"])["counts"].clone();
    assert!(
        counts.as_object().unwrap().values().all(|n| n == 0),
        "{counts}"
    );
}

/// `text` without its ANSI escape sequences (`ESC [ ... letter`).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `cmd` as one `sh` word list, each argument single-quoted.
fn shell_line(cmd: &std::process::Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_str().unwrap().replace('\'', r"'\''"));
    std::iter::once(quote(cmd.get_program()))
        .chain(cmd.get_args().map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

/// G87: on a terminal (a pseudo-terminal from util-linux `script`) `store copy` draws a
/// progress bar per table on stderr, then its summary; not on a terminal it prints the
/// summary alone (stdout) and nothing on stderr.
#[test]
fn store_copy_draws_bars_on_a_terminal_and_only_the_result_elsewhere() {
    let src = Env::with_task();
    let summary = |out: &str| {
        let tables: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        tables.contains(&"upgrades") && tables.contains(&"events") && out.contains("copied ")
    };
    // Not a terminal: the result only.
    let plain = Env::new();
    let out = src
        .command()
        .args(["store", "copy", "--to", plain.data_dir().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary(&stdout), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('['),
        "{stdout}"
    );

    // A terminal: `script` runs the copy on a pseudo-terminal and writes what it shows.
    let on_a_terminal = |args: &[&str]| {
        let mut copy = src.command();
        copy.args(args);
        let mut script = std::process::Command::new("script");
        script
            .args(["-qfec", &shell_line(&copy), "/dev/null"])
            .env("COLUMNS", "120")
            .env("TERM", "xterm")
            .stdin(std::process::Stdio::null());
        for (k, v) in copy.get_envs() {
            match v {
                Some(v) => script.env(k, v),
                None => script.env_remove(k),
            };
        }
        script.output().expect("script (util-linux) runs")
    };
    // With `-o json`, the JSON alone, even there.
    let json_dir = Env::new();
    let out = on_a_terminal(&[
        "-o",
        "json",
        "store",
        "copy",
        "--to",
        json_dir.data_dir().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let parsed: Value = serde_json::from_str(&printed).expect("only JSON on the terminal");
    assert_eq!(parsed["tables"]["events"], 2, "{printed}");
    let tty = Env::new();
    let out = on_a_terminal(&["store", "copy", "--to", tty.data_dir().to_str().unwrap()]);
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    // Without the terminal's escape sequences (colours, cursor moves): what a reader sees.
    let shown = strip_escapes(&raw);
    // A bar per table: its name, the full bar, and rows done of the total.
    for (table, rows) in [("upgrades", 1), ("tasks", 1), ("events", 2)] {
        let bar = format!("{table:<15} [{}] {rows}/{rows}", "#".repeat(30));
        assert!(shown.contains(&bar), "no progress bar {bar:?} in {shown:?}");
    }
    assert!(
        raw.contains('\u{1b}'),
        "drawn with terminal sequences: {raw:?}"
    );
    assert!(summary(&shown), "{shown:?}");
    // The copy on the terminal copied the same as the other.
    let counts = |env: &Env| json(env, &[], &["store", "info"])["counts"].clone();
    assert_eq!(counts(&tty), counts(&plain));
}
