//! Acknowledged means durable: a `progress apply` child streaming updates is killed with
//! SIGKILL at random moments, many times, on the same data dir; after each kill the store
//! reopens and holds every acknowledged seq with the content of its line, and the current
//! state agrees with the history.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

use crate::util::Env;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_never_loses_an_acknowledged_update() {
    let env = Env::with_task();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut next_line = 0u64;
    let mut total_acked = 0usize;
    for round in 0..30 {
        let mut child = env
            .command()
            .args(["progress", "apply"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let first = next_line;
        let count = 200_000u64;
        next_line += count;
        // Pipelined writer: keeps sending until the pipe breaks.
        let writer = std::thread::spawn(move || {
            for k in first..first + count {
                let line = format!(
                    "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"t\",\"percentage\":{},\"message\":\"{k}\"}}\n",
                    k % 101
                );
                if stdin.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        });
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for (i, line) in BufReader::new(stdout).lines().enumerate() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line).expect("whole ack lines");
                assert_eq!(v["ok"], true, "{line}");
                acked.push((v["seq"].as_u64().unwrap(), first + i as u64));
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
        child.kill().unwrap();
        child.wait().unwrap();
        writer.join().unwrap();
        let acked = reader.join().unwrap();
        total_acked += acked.len();

        // Reopen, as the next process would, and check every acknowledged line.
        let store = SqliteStore::open(env.data_dir(), &SqliteOptions::default())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): store does not reopen: {e}"));
        let tracker = ProgressTracker::new(Arc::new(store));
        if let Some(&(first_seq, _)) = acked.first() {
            let events = tracker
                .events_since(Some("u"), first_seq - 1, acked.len() + 10_000)
                .unwrap();
            let by_seq: std::collections::HashMap<u64, &str> = events
                .iter()
                .map(|e| (e.seq, e.message.as_deref().unwrap_or("")))
                .collect();
            for (seq, k) in &acked {
                assert_eq!(
                    by_seq.get(seq).copied(),
                    Some(k.to_string().as_str()),
                    "round {round} (seed {seed}): acknowledged seq {seq} (line {k}) lost"
                );
            }
        }
        // Current state matches the newest event of the task.
        let detail = tracker.task_detail("u", "t").unwrap();
        let newest = &detail.recent_events[0];
        assert_eq!(
            detail.task.percentage, newest.percentage,
            "round {round} (seed {seed})"
        );
        if newest.kind != eks_upgrade_agent::model::EventKind::TaskAdded {
            assert_eq!(
                detail.task.last_message, newest.message,
                "round {round} (seed {seed})"
            );
        }
        let summary = tracker.summary("u").unwrap();
        assert_eq!(summary.overall_percentage, detail.task.percentage);
        assert_eq!(summary.last_seq, newest.seq);
    }
    assert!(
        total_acked > 1000,
        "the children acknowledged too little to test: {total_acked}"
    );
}

/// `--durability power_loss` really syncs the WAL at every commit, and the default does not
/// (it syncs at checkpoints only): the fsync/fdatasync calls on the `-wal` file, counted with
/// strace, over 200 commits of one `apply` (one line per transaction). The level is taken from
/// the flag, from `EUA_DURABILITY` and from the configuration file's `durability` key alike.
#[test]
fn power_loss_durability_syncs_the_wal_at_every_commit() {
    #[derive(Clone, Copy)]
    enum From {
        Flag,
        Variable,
        File,
    }
    let count_wal_syncs = |durability: &str, from: From| -> usize {
        let env = Env::with_task();
        let input: String = (0..200)
            .map(|i| {
                format!(
                    "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"t\",\"percentage\":{}}}\n",
                    i % 100
                )
            })
            .collect();
        let trace = env.data_dir().join("strace.out");
        let cmd = env.command();
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut strace = std::process::Command::new("strace");
        strace
            .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&trace)
            .arg(program)
            .args(args)
            .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env_remove("EUA_DURABILITY")
            .env_remove("EUA_CONFIG");
        match from {
            From::Flag => drop(strace.args(["--durability", durability])),
            From::Variable => drop(strace.env("EUA_DURABILITY", durability)),
            From::File => {
                let file = env.data_dir().join("config.toml");
                std::fs::write(&file, format!("durability = {durability:?}\n")).unwrap();
                strace.env("EUA_CONFIG", file);
            }
        }
        strace
            .args(["progress", "apply", "--max-batch", "1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = strace.spawn().unwrap_or_else(|e| {
            panic!("cannot run strace ({e}): scripts/test installs it (apt-get install strace)")
        });
        let mut stdin = child.stdin.take().unwrap();
        // One line at a time, each acknowledged before the next: 200 separate commits.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        for line in input.lines() {
            writeln!(stdin, "{line}").unwrap();
            stdin.flush().unwrap();
            let mut ack = String::new();
            out.read_line(&mut ack).unwrap();
            assert!(ack.contains("\"ok\":true"), "{ack}");
        }
        drop(stdin);
        assert!(child.wait().unwrap().success());
        std::fs::read_to_string(&trace)
            .unwrap()
            .lines()
            // Calls on the WAL (with -f a call may be split into "<unfinished ...>" and
            // "resumed" lines: the first names the file).
            .filter(|l| {
                l.contains("sqlite3-wal>") && (l.contains("fsync(") || l.contains("fdatasync("))
            })
            .count()
    };
    for from in [From::Flag, From::Variable, From::File] {
        let full = count_wal_syncs("power_loss", from);
        let normal = count_wal_syncs("process_crash", from);
        let name = match from {
            From::Flag => "--durability",
            From::Variable => "EUA_DURABILITY",
            From::File => "the config file's durability",
        };
        assert!(
            full >= 200,
            "power_loss from {name}: {full} WAL syncs for 200 commits"
        );
        // The default syncs only at checkpoints (every 20 ms at most, whatever the commit
        // rate): far fewer than one per commit, even on a slow machine.
        assert!(
            normal < 150,
            "process_crash from {name}: {normal} WAL syncs for 200 commits"
        );
    }
}

/// Reads never block writes (WAL: a long read transaction elsewhere does not stop a commit),
/// and a write that cannot get the lock waits the busy timeout (10 s), then fails clearly
/// instead of hanging or corrupting.
#[test]
fn reads_never_block_writes_and_a_held_write_lock_times_out_clearly() {
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
    let db = rusqlite::Connection::open(env.data_dir().join("eks-upgrade-agent.sqlite3")).unwrap();
    // A read transaction held open.
    db.execute_batch("BEGIN").unwrap();
    let n: i64 = db
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert!(n >= 1);
    let started = std::time::Instant::now();
    env.ok(&["progress", "upgrade", "start", "u"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a read held the write back for {:?}",
        started.elapsed()
    );
    db.execute_batch("COMMIT").unwrap();
    // The write lock held: a write waits about 10 s, then fails with a clear error.
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let err = env.fails(1, &["progress", "upgrade", "phase", "u", "nodes"]);
    let waited = started.elapsed();
    assert!(err.contains("locked"), "{err}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(30),
        "waited {waited:?}"
    );
    db.execute_batch("ROLLBACK").unwrap();
    // Nothing was half done: the refused change is not there, the next one goes through.
    let s = env.json(&["progress", "upgrade", "show", "u"]);
    assert_eq!(s["current_phase"], serde_json::Value::Null);
    env.ok(&["progress", "upgrade", "phase", "u", "nodes"]);
}

/// README "Notifications": every notification is written to the outbox in the same transaction
/// as its change, so a crash or an outage delays it but never loses it. `apply` children
/// streaming task start/complete pairs with a webhook on a closed port are killed with SIGKILL
/// at random moments; after each kill every notifying event in the store (acknowledged or not)
/// has exactly one outbox row, and no row lacks its event. Then, with a receiver on that port,
/// `notify flush` delivers every one.
#[test]
fn sigkill_with_a_sink_down_never_loses_a_notification() {
    use eks_upgrade_agent::notify::detail_type;

    let env = Env::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/hook");
    const TASKS: usize = 30 * 1_500;
    let mut setup = String::from(
        "{\"op\":\"upgrade.create\",\"upgrade_id\":\"u\",\"plan_id\":\"p\",\"cluster_name\":\"c\"}\n",
    );
    for t in 0..TASKS {
        setup.push_str(&format!(
            "{{\"op\":\"task.add\",\"upgrade_id\":\"u\",\"task_id\":\"t{t}\",\"name\":\"T\",\"task_type\":\"upgrade_step\"}}\n"
        ));
    }
    assert!(env.apply(&setup).iter().all(|a| a["ok"] == true));
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("notification crash test seed {seed}");
    let mut rng = Rng(seed);
    let db = env.data_dir().join("eks-upgrade-agent.sqlite3");
    let (mut next_task, mut total_acked) = (0usize, 0usize);
    let mut notifying = std::collections::BTreeSet::new();
    let mut checked = 0u64;
    for round in 0..30 {
        let mut child = env
            .command()
            .env("EUA_WEBHOOK_URL", &url)
            .args(["progress", "apply"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let first = next_task;
        next_task += 1_500;
        let writer = std::thread::spawn(move || {
            for t in first..first + 1_500 {
                let line = format!(
                    "{{\"op\":\"task.start\",\"upgrade_id\":\"u\",\"task_id\":\"t{t}\"}}\n{{\"op\":\"task.complete\",\"upgrade_id\":\"u\",\"task_id\":\"t{t}\"}}\n"
                );
                if stdin.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        });
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line).expect("whole ack lines");
                assert_eq!(v["ok"], true, "{line}");
                acked.push(v["seq"].as_u64().unwrap());
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(60 + rng.next() % 100));
        child.kill().unwrap();
        child.wait().unwrap();
        writer.join().unwrap();
        let acked = reader.join().unwrap();
        total_acked += acked.len();
        eprintln!("round {round}: {} acknowledged", acked.len());

        // Every notifying event in the store has exactly one outbox row, and every row its event.
        let store = SqliteStore::open(env.data_dir(), &SqliteOptions::default())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): store does not reopen: {e}"));
        let tracker = ProgressTracker::new(Arc::new(store));
        // Only what this round wrote (earlier rounds were checked already).
        let events = tracker
            .events_since(Some("u"), checked, 10_000_000)
            .unwrap();
        let round_notifying: std::collections::BTreeSet<u64> = events
            .iter()
            .filter(|e| detail_type(e.kind, None).is_some())
            .map(|e| e.seq)
            .collect();
        let conn = rusqlite::Connection::open(&db).unwrap();
        let rows: Vec<u64> = conn
            .prepare("SELECT seq FROM notifications WHERE seq > ?1 ORDER BY seq")
            .unwrap()
            .query_map([checked as i64], |r| r.get::<_, i64>(0).map(|s| s as u64))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let outbox: std::collections::BTreeSet<u64> = rows.iter().copied().collect();
        // Compared before any dedup: a seq with two rows makes `rows` longer than the set.
        assert_eq!(
            rows.len(),
            outbox.len(),
            "round {round}: an event has two outbox rows"
        );
        let missing: Vec<_> = round_notifying.difference(&outbox).take(5).collect();
        assert!(
            missing.is_empty(),
            "round {round} (seed {seed}): committed events without an outbox row: {missing:?}"
        );
        assert_eq!(
            outbox, round_notifying,
            "round {round}: outbox rows without their event"
        );
        checked = events.last().map_or(checked, |e| e.seq);
        notifying.extend(round_notifying);
        for seq in &acked {
            assert!(
                events.iter().any(|e| e.seq == *seq),
                "round {round}: acknowledged seq {seq} lost"
            );
        }
    }
    assert!(
        total_acked > 1_000,
        "the children acknowledged too little to test: {total_acked}"
    );
    // The outage shows as pending, all of them.
    let status = env.json(&["--webhook-url", &url, "notify", "status"]);
    assert_eq!(status[0]["total"], notifying.len() as u64, "{status}");
    assert_eq!(status[0]["pending"], notifying.len() as u64, "{status}");

    // The sink is back: everything is delivered.
    let (_, got) =
        crate::util::webhook_receiver_on(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    env.ok(&["--webhook-url", &url, "notify", "flush"]);
    let delivered: std::collections::BTreeSet<u64> = got
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| {
            let body = b.split_once('\n').unwrap().1;
            let batch: serde_json::Value = serde_json::from_str(body).unwrap();
            batch
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["Detail"]["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(delivered, notifying);
}
