//! `artifacts` through the CLI: every operation, every bad input (clear message, non-zero
//! exit, nothing changed), kill -9 in the middle of a large add, two processes adding at once.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::Env;

struct Ids {
    session: String,
    collection: String,
}

fn setup(env: &Env) -> Ids {
    let s = env.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u1",
        "--cluster",
        "prod",
        "--retention-days",
        "7",
    ]);
    let session = s["session_id"].as_str().unwrap().to_owned();
    let c = env.json(&[
        "artifacts",
        "collection",
        "create",
        &session,
        "--name",
        "Upgrade Logs",
        "--task-id",
        "ng1",
    ]);
    Ids {
        session,
        collection: c["collection_id"].as_str().unwrap().to_owned(),
    }
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Blob count and artifact stats: what "nothing changed" is checked against.
fn state(env: &Env) -> (Value, Value) {
    let stats = env.json(&["artifacts", "stats"]);
    let sessions = env.json(&["artifacts", "session", "list"]);
    (stats, sessions)
}

#[test]
fn every_operation_through_the_cli() {
    let env = Env::new();
    let ids = setup(&env);
    let src = env.dir.path().join("src");
    write(&src.join("kubelet.log"), b"kubelet ok\n");
    write(&src.join("logs/nodes/ip-1.log"), b"node 1\n");
    write(&src.join("logs/nodes/ip-2.log"), b"node 2\n");
    write(&src.join("junit.xml"), b"<testsuites/>");

    let added = env.json(&[
        "artifacts",
        "add",
        &ids.session,
        &ids.collection,
        src.join("kubelet.log").to_str().unwrap(),
        "--tag",
        "node",
        "--tag",
        "kubelet",
        "--task-id",
        "ng1",
        "--step-id",
        "drain",
        "--meta",
        "node=ip-1",
        "--meta",
        "k8s=1.30",
        "--meta-json",
        "pods=3",
        "--description",
        "kubelet log",
    ]);
    let kubelet = &added[0];
    assert_eq!(kubelet["name"], "kubelet.log");
    assert_eq!(kubelet["artifact_type"], "log_file");
    assert_eq!(kubelet["file_size"], 11);
    assert_eq!(kubelet["tags"], serde_json::json!(["node", "kubelet"]));
    assert_eq!(
        kubelet["metadata"],
        serde_json::json!({"node": "ip-1", "k8s": "1.30", "pods": 3})
    );
    let kubelet_id = kubelet["artifact_id"].as_str().unwrap().to_owned();

    let dir = env.json(&[
        "artifacts",
        "add",
        &ids.session,
        &ids.collection,
        src.join("logs").to_str().unwrap(),
        "--tag",
        "node",
    ]);
    let names: Vec<&str> = dir
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nodes/ip-1.log", "nodes/ip-2.log"]);
    env.json(&[
        "artifacts",
        "add",
        &ids.session,
        &ids.collection,
        src.join("junit.xml").to_str().unwrap(),
        "--type",
        "test_result",
        "--name",
        "results/junit-smoke.xml",
    ]);
    let table = env.ok(&[
        "artifacts",
        "add",
        &ids.session,
        &ids.collection,
        src.join("kubelet.log").to_str().unwrap(),
    ]);
    assert!(table.contains("added 1 artifact (11 B)"), "{table}");

    let search = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["artifacts", "search"];
        a.extend_from_slice(args);
        env.json(&a)
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        search(&["--tag", "node", "--tag", "kubelet"]),
        ["kubelet.log"]
    );
    assert_eq!(
        search(&["--type", "test_result"]),
        ["results/junit-smoke.xml"]
    );
    assert_eq!(
        search(&["--name", "IP-"]),
        ["nodes/ip-2.log", "nodes/ip-1.log"]
    );
    assert_eq!(search(&["--name", "*.xml"]), ["results/junit-smoke.xml"]);
    assert_eq!(search(&["--task-id", "ng1"]), ["kubelet.log"]);
    assert_eq!(
        search(&["--min-size", "11", "--max-size", "1KiB"]),
        ["results/junit-smoke.xml", "kubelet.log"]
    );
    assert_eq!(search(&["--since", "1h", "--limit", "1"]).len(), 1);
    assert_eq!(search(&["--status", "uploaded"]), Vec::<String>::new());
    assert_eq!(
        search(&[
            "--upgrade",
            "u1",
            "--session",
            &ids.session,
            "--collection",
            &ids.collection
        ])
        .len(),
        4
    );
    let text = env.ok(&["artifacts", "search", "--upgrade", "nope"]);
    assert_eq!(text.trim(), "no artifacts found");

    let stats = env.json(&["artifacts", "stats", "--session", &ids.session]);
    assert_eq!(stats["total_artifacts"], 4);
    assert_eq!(stats["total_size_bytes"], 11 + 7 + 7 + 13);
    assert_eq!(stats["type_distribution"]["log_file"], 3);
    assert_eq!(stats["status_distribution"]["created"], 4);
    assert_eq!(stats["sessions_searched"], 1);

    let show = env.json(&["artifacts", "show", &kubelet_id]);
    assert_eq!(show["step_id"], "drain");
    assert_eq!(show["upgrade_id"], "u1");
    assert_eq!(env.ok(&["artifacts", "get", &kubelet_id]), "kubelet ok\n");
    let out = env.dir.path().join("copy.log");
    env.ok(&[
        "artifacts",
        "get",
        &kubelet_id,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(fs::read(&out).unwrap(), b"kubelet ok\n");

    let export = env.dir.path().join("export");
    let report = env.json(&[
        "artifacts",
        "export",
        &ids.session,
        export.to_str().unwrap(),
    ]);
    assert_eq!(report["files"], 4);
    assert_eq!(
        fs::read(export.join("Upgrade Logs/nodes/ip-2.log")).unwrap(),
        b"node 2\n"
    );
    assert_eq!(
        fs::read(export.join("Upgrade Logs/results/junit-smoke.xml")).unwrap(),
        b"<testsuites/>"
    );

    let verify = env.json(&["artifacts", "verify"]);
    assert_eq!(
        (
            verify["artifacts_checked"].as_u64(),
            verify["corrupt"].as_array().unwrap().len()
        ),
        (Some(4), 0)
    );

    env.ok(&["artifacts", "session", "complete", &ids.session]);
    let summary = env.json(&["artifacts", "session", "show", &ids.session]);
    assert_eq!(summary["total_artifacts"], 4);
    assert_eq!(summary["collections_count"], 1);
    assert_eq!(summary["artifact_types"]["test_result"], 1);
    assert!(summary["completed_at"].is_string());
    assert_eq!(summary["collections"][0]["task_id"], "ng1");
    let list = env.json(&["artifacts", "session", "list", "--upgrade", "u1"]);
    assert_eq!(list.as_array().unwrap().len(), 1);

    // Retention: a dry run in 8 days lists the session and changes nothing; then it goes.
    let in_8_days = (chrono::Utc::now() + chrono::Duration::days(8)).to_rfc3339();
    let plan = env.json(&["artifacts", "cleanup", "--dry-run", "--as-of", &in_8_days]);
    assert_eq!(plan["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(env.json(&["artifacts", "stats"])["total_artifacts"], 4);
    let done = env.json(&["artifacts", "cleanup", "--as-of", &in_8_days]);
    assert_eq!(done["blobs_removed"], 4);
    assert_eq!(env.json(&["artifacts", "stats"])["total_artifacts"], 0);
    let gc = env.json(&["artifacts", "gc"]);
    assert_eq!(gc["blobs_removed"], 0);
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let env = Env::new();
    let ids = setup(&env);
    let file = env.dir.path().join("a.log");
    write(&file, b"a");
    let added = env.json(&[
        "artifacts",
        "add",
        &ids.session,
        &ids.collection,
        file.to_str().unwrap(),
    ]);
    let id = added[0]["artifact_id"].as_str().unwrap().to_owned();
    let full = env.dir.path().join("full");
    write(&full.join("x"), b"x");
    let missing = env.dir.path().join("missing.log");
    let f = file.to_str().unwrap();
    let cases: Vec<(i32, Vec<&str>, &str)> = vec![
        (
            1,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                missing.to_str().unwrap(),
            ],
            "missing.log not found",
        ),
        (
            1,
            vec!["artifacts", "add", "nope", &ids.collection, f],
            "session \"nope\" not found",
        ),
        (
            1,
            vec!["artifacts", "add", &ids.session, "nope", f],
            "collection \"nope\" not found",
        ),
        (
            2,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                f,
                "--type",
                "logs",
            ],
            "invalid artifact type \"logs\"",
        ),
        (
            1,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                f,
                "--name",
                "../../etc/cron.d/x",
            ],
            "must not contain '..'",
        ),
        (
            1,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                f,
                "--name",
                "/abs",
            ],
            "relative",
        ),
        (
            1,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                f,
                "--name",
                "a\u{7}b",
            ],
            "control",
        ),
        (
            2,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                f,
                "--meta",
                "novalue",
            ],
            "KEY=VALUE",
        ),
        // The ingest's mark is reserved (G121).
        (
            1,
            vec![
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                f,
                "--meta",
                "eua_pending_run=x",
            ],
            "metadata key \"eua_pending_run\" is reserved",
        ),
        (
            2,
            vec!["artifacts", "search", "--status", "gone"],
            "invalid artifact status \"gone\"",
        ),
        (
            2,
            vec!["artifacts", "search", "--min-size", "lots"],
            "invalid size \"lots\"",
        ),
        (
            2,
            vec!["artifacts", "search", "--since", "yesterday"],
            "invalid duration \"yesterday\"",
        ),
        (
            1,
            vec!["artifacts", "search", "--min-size", "10", "--max-size", "1"],
            "larger than max",
        ),
        (
            2,
            vec!["artifacts", "cleanup", "--as-of", "tomorrow"],
            "RFC 3339",
        ),
        (
            1,
            vec!["artifacts", "show", "nope"],
            "artifact \"nope\" not found",
        ),
        (
            1,
            vec!["artifacts", "get", "nope"],
            "artifact \"nope\" not found",
        ),
        (
            1,
            vec!["artifacts", "session", "show", "nope"],
            "session \"nope\" not found",
        ),
        (
            1,
            vec!["artifacts", "session", "complete", "nope"],
            "session \"nope\" not found",
        ),
        (
            1,
            vec![
                "artifacts",
                "collection",
                "create",
                &ids.session,
                "--name",
                "Upgrade Logs",
            ],
            "already exists",
        ),
        (
            1,
            vec!["artifacts", "collection", "create", "nope", "--name", "x"],
            "session \"nope\" not found",
        ),
        (
            1,
            vec![
                "artifacts",
                "session",
                "create",
                "--upgrade",
                "u 1",
                "--cluster",
                "c",
            ],
            "whitespace",
        ),
        (
            1,
            vec![
                "artifacts",
                "session",
                "create",
                "--upgrade",
                "u",
                "--cluster",
                "c",
                "--retention-days",
                "0",
            ],
            "retention_days",
        ),
        (
            1,
            vec!["artifacts", "export", &ids.session, full.to_str().unwrap()],
            "not empty; use --force",
        ),
        (
            1,
            vec!["artifacts", "stats", "--session", "nope"],
            "session \"nope\" not found",
        ),
    ];
    for (code, args, needle) in cases {
        let before = state(&env);
        let err = env.fails(code, &args);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err:?}"
        );
        assert_eq!(state(&env), before, "{args:?} changed something");
    }
    assert_eq!(
        fs::read_dir(&full).unwrap().count(),
        1,
        "the non-empty export dir is untouched"
    );

    // A blob corrupted on disk: get refuses (nothing written), verify reports it, exit 1.
    let small = env.data_dir().join("blobs/small.sqlite3");
    assert!(corrupt_small_blobs(&small), "corrupted the stored bytes");
    let out = env.dir.path().join("out.log");
    let err = env.fails(
        1,
        &["artifacts", "get", &id, "--out", out.to_str().unwrap()],
    );
    assert!(err.contains("is corrupt"), "{err}");
    assert!(!out.exists());
    let err = env.fails(1, &["artifacts", "get", &id]);
    assert!(err.contains("is corrupt"), "{err}");
    let out = env.run(&["artifacts", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("1 corrupt") && text.contains(&id), "{text}");
}

/// Appends a byte to every small blob stored in `db`, as disk corruption would.
fn corrupt_small_blobs(db: &Path) -> bool {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute("UPDATE blobs SET data = CAST(data || x'21' AS BLOB)", [])
        .unwrap()
        > 0
}

#[test]
fn kill_during_a_large_add_leaves_no_half_artifact_and_gc_cleans_up() {
    let env = Env::new();
    let ids = setup(&env);
    let big = env.dir.path().join("big.bin");
    let f = fs::File::create(&big).unwrap();
    f.set_len(2 << 30).unwrap(); // 2 GiB, sparse: reading it is fast, adding it is not instant
    drop(f);
    let mut child = env
        .command()
        .args([
            "artifacts",
            "add",
            &ids.session,
            &ids.collection,
            big.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the blob is being written, then kill.
    let tmp = env.data_dir().join("blobs/tmp");
    let start = Instant::now();
    loop {
        let writing = fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
            })
            .unwrap_or(false);
        if writing {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the add never started writing"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the add finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        env.json(&["artifacts", "search"]),
        serde_json::json!([]),
        "no visible half artifact"
    );
    assert!(
        env.json(&["artifacts", "verify"])["corrupt"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let gc = env.json(&["artifacts", "gc"]);
    assert_eq!(gc["incomplete_removed"], 1);
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
}

#[test]
fn two_processes_add_to_the_same_session_at_once() {
    let env = Env::new();
    let ids = setup(&env);
    // A barrier across processes: the test holds the store's write lock while both adds
    // start, so neither can finish before the other has begun.
    let db = rusqlite::Connection::open(env.data_dir().join("eks-upgrade-agent.sqlite3")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut children = Vec::new();
    for p in 0..2 {
        let dir = env.dir.path().join(format!("src{p}"));
        for i in 0..150 {
            // Same relative names in both trees, different bytes: both must be kept.
            write(
                &dir.join(format!("logs/{i}.log")),
                format!("process {p} file {i}").as_bytes(),
            );
        }
        children.push(
            env.command()
                .args([
                    "-o",
                    "json",
                    "artifacts",
                    "add",
                    &ids.session,
                    &ids.collection,
                    dir.to_str().unwrap(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(700));
    for c in &mut children {
        assert!(
            c.try_wait().unwrap().is_none(),
            "an add finished while the store was locked"
        );
    }
    // Both are running (and waiting on the lock) at once: let them go together.
    db.execute_batch("COMMIT").unwrap();
    let mut ids_seen = std::collections::HashSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        for a in v.as_array().unwrap() {
            ids_seen.insert(a["artifact_id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(ids_seen.len(), 300);
    assert_eq!(env.json(&["artifacts", "stats"])["total_artifacts"], 300);
    let export = env.dir.path().join("export");
    let report = env.json(&[
        "artifacts",
        "export",
        &ids.session,
        export.to_str().unwrap(),
    ]);
    assert_eq!(
        report["files"], 300,
        "distinct export names: nothing overwritten"
    );
    let mut contents = std::collections::HashSet::new();
    for e in fs::read_dir(export.join("Upgrade Logs/logs")).unwrap() {
        contents.insert(fs::read(e.unwrap().path()).unwrap());
    }
    assert_eq!(contents.len(), 300);
    assert!(
        env.json(&["artifacts", "verify"])["missing"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Issue #10, item 15: corrupt a blob on disk (a file blob and an inline one), add the same
/// bytes again: the add repairs the store, and both artifacts read back intact.
#[test]
fn adding_the_same_bytes_again_repairs_a_corrupt_blob() {
    let env = Env::new();
    let ids = setup(&env);
    for (i, data) in [vec![b'x'; 40_000], b"small content\n".to_vec()]
        .iter()
        .enumerate()
    {
        let file = env.dir.path().join(format!("in-{i}.bin"));
        fs::write(&file, data).unwrap();
        let add = |name: &str| {
            env.json(&[
                "artifacts",
                "add",
                &ids.session,
                &ids.collection,
                file.to_str().unwrap(),
                "--name",
                name,
            ])[0]
                .clone()
        };
        let first = add(&format!("first-{i}.bin"));
        let hash = first["file_hash"].as_str().unwrap().to_owned();
        let blob = env
            .dir
            .path()
            .join("blobs/sha256")
            .join(&hash[..2])
            .join(&hash[2..]);
        if blob.exists() {
            let mut perms = fs::metadata(&blob).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            fs::set_permissions(&blob, perms).unwrap();
            fs::write(&blob, b"bit rot").unwrap();
        } else {
            let out = std::process::Command::new("python3")
                .arg("-c")
                .arg(format!(
                    "import sqlite3; c = sqlite3.connect({:?}); \
                     c.execute(\"UPDATE blobs SET data = x'00' WHERE hex(digest) = upper('{hash}')\"); \
                     c.commit(); print(c.total_changes)",
                    env.dir.path().join("blobs/small.sqlite3").to_str().unwrap()
                ))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
        }
        env.fails(1, &["artifacts", "verify"]);
        let second = add(&format!("second-{i}.bin"));
        assert_eq!(second["file_hash"], hash.as_str());
        env.ok(&["artifacts", "verify"]);
        for a in [&first, &second] {
            let out = env
                .command()
                .args(["artifacts", "get", a["artifact_id"].as_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success() && out.stdout == *data, "{out:?}");
        }
    }
}

/// Issue #10, item 8: a directory add skips symbolic links (inside or out of the directory)
/// and says so on stderr, per link and as a count; the JSON on stdout stays parseable.
#[test]
fn a_directory_add_says_which_links_it_skipped() {
    let env = Env::new();
    let ids = setup(&env);
    let dir = env.dir.path().join("results");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a.txt"), b"a").unwrap();
    std::os::unix::fs::symlink(dir.join("a.txt"), dir.join("inside-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("sub/outside-link")).unwrap();
    let out = env
        .command()
        .args([
            "-o",
            "json",
            "artifacts",
            "add",
            &ids.session,
            &ids.collection,
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let added: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(added.as_array().unwrap().len(), 1, "{added}");
    assert_eq!(added[0]["name"], "a.txt");
    for link in ["inside-link", "sub/outside-link"] {
        assert!(
            stderr.contains(&format!(
                "skipped symbolic link {}",
                dir.join(link).display()
            )),
            "{stderr}"
        );
    }
    assert!(stderr.contains("skipped 2 entries"), "{stderr}");
    // "Name a link's target to add it": a path named on the command line is read through its
    // link, and its target's bytes are stored.
    let out = env
        .command()
        .args([
            "-o",
            "json",
            "artifacts",
            "add",
            &ids.session,
            &ids.collection,
        ])
        .arg(dir.join("inside-link"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let added: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(added[0]["file_size"], 1, "{added}");
    let got = env
        .command()
        .args([
            "artifacts",
            "get",
            added[0]["artifact_id"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(got.stdout, b"a");
}

/// Issue #10, item 14: a search cut at its page size says so on stderr (JSON on stdout stays
/// parseable) with the cursor of the next page; `--all` streams every page; a limit above the
/// maximum is refused naming it.
#[test]
fn a_search_cut_at_the_page_size_says_how_to_get_the_rest() {
    let env = Env::new();
    let ids = setup(&env);
    let dir = env.dir.path().join("many");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..130 {
        fs::write(dir.join(format!("f{i:03}.log")), format!("file {i}")).unwrap();
    }
    env.ok(&[
        "artifacts",
        "add",
        &ids.session,
        &ids.collection,
        dir.to_str().unwrap(),
    ]);
    let search = |args: &[&str]| {
        let out = env
            .command()
            .args([
                "-o",
                "json",
                "artifacts",
                "search",
                "--session",
                &ids.session,
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect();
        (names, String::from_utf8(out.stderr).unwrap())
    };
    let (first, note) = search(&[]);
    assert_eq!(first.len(), 100);
    assert_eq!(first[0], "f129.log", "newest first");
    assert!(note.contains("showing 100 results; more match"), "{note}");
    let cursor = note
        .split("--cursor ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no cursor in {note:?}"))
        .to_owned();
    let (rest, note) = search(&["--cursor", &cursor]);
    assert_eq!(rest.len(), 30);
    assert_eq!(rest[0], "f029.log");
    assert!(note.is_empty(), "the last page says nothing: {note}");
    let (all, note) = search(&["--all", "--limit", "7"]);
    assert_eq!(all.len(), 130);
    assert!(note.is_empty(), "{note}");
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 130);
    // Table output says it too.
    let out = env
        .command()
        .args([
            "artifacts",
            "search",
            "--session",
            &ids.session,
            "--limit",
            "5",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("showing 5 results; more match"));
    let err = env.fails(1, &["artifacts", "search", "--limit", "10001"]);
    assert!(err.contains("above the maximum of 10000"), "{err}");
    let err = env.fails(1, &["artifacts", "search", "--cursor", "nonsense"]);
    assert!(err.contains("invalid cursor"), "{err}");

    // Through a server (--server): the same pages, the same note.
    let served = crate::util::serve(&env, &[]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let remote = |args: &[&str]| {
        let out = client
            .command()
            .args([
                "--server",
                &url,
                "-o",
                "json",
                "artifacts",
                "search",
                "--session",
                &ids.session,
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v.as_array().unwrap().len(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (n, note) = remote(&[]);
    assert_eq!(n, 100);
    assert!(
        note.contains("showing 100 results; more match: add --cursor"),
        "{note}"
    );
    assert_eq!(remote(&["--all", "--limit", "40"]).0, 130);
    assert_eq!(remote(&["--cursor", &cursor]).0, 30);
}
