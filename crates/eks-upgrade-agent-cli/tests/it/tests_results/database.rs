//! Test results on a PostgreSQL database: the `tests` commands, and reports kept as
//! artifacts in S3 and the database's index.

use super::*;

/// G61: with `--database-url` (team mode) the `tests` commands record and read runs in
/// PostgreSQL (without a bucket the reports are recorded, not kept, with a warning, and
/// `--session` is refused naming `--s3-bucket`), and `serve` on the database answers
/// `/api/v1/tests/...` from it; the data dir is not touched.
#[test]
fn tests_commands_on_a_database() {
    let pg = eks_upgrade_agent::test_support::PgCluster::start();
    let db = pg.create_database();
    let env = Env::new();
    let with_db = |args: &[&str]| -> std::process::Output {
        env.command()
            .env("EUA_DATABASE_URL", &db)
            .args(args)
            .output()
            .unwrap()
    };
    let json = |args: &[&str]| -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let out = with_db(&a);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    json(&[
        "progress",
        "upgrade",
        "create",
        "u",
        "--plan",
        "p",
        "--cluster",
        "k",
    ]);
    let pre = report(&env, "pre.xml", &[("health", "pass"), ("pods", "pass")]);
    let post = report(&env, "post.xml", &[("health", "pass"), ("pods", "fail")]);
    let pre_run = json(&["tests", "ingest", &pre, "--upgrade", "u", "--phase", "pre"]);
    assert_eq!(pre_run["cluster_name"], "k");
    assert_eq!(pre_run["artifact_ids"], serde_json::json!([]));
    json(&[
        "tests",
        "ingest",
        &post,
        "--upgrade",
        "u",
        "--phase",
        "post",
    ]);
    let out = with_db(&["-o", "json", "tests", "compare", "--upgrade", "u"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names(&c["new_failures"]), ["pods"]);
    let h = json(&["tests", "history", "pods", "--cluster", "k"]);
    assert_eq!(h.as_array().unwrap().len(), 2, "{h}");
    // Without a bucket the report is recorded only, and a warning says so; asking to keep it
    // in a session is refused, naming what to set.
    let out = with_db(&[
        "tests",
        "ingest",
        &pre,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recorded but not kept"),
        "{out:?}"
    );
    let out = with_db(&[
        "tests",
        "ingest",
        &pre,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
        "--session",
        "s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set --s3-bucket"),
        "{out:?}"
    );
    let served = crate::util::serve(&env, &[("EUA_DATABASE_URL", db.as_str())]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let runs = env.json(&["--server", &url, "tests", "runs", "--upgrade", "u"]);
    assert_eq!(runs.as_array().unwrap().len(), 3, "{runs}");
    // A server on the database without a bucket records, and refuses to keep in a session.
    let e = env.fails(
        1,
        &[
            "--server",
            &url,
            "tests",
            "ingest",
            &pre,
            "--upgrade",
            "u",
            "--phase",
            "adhoc",
            "--session",
            "s",
        ],
    );
    assert!(e.contains("--s3-bucket"), "{e}");
    assert!(
        !env.data_dir().join("eks-upgrade-agent.sqlite3").exists(),
        "a data dir store was created"
    );
}

/// Runs `sql` on the database at `url` (psql of the test cluster).
fn psql(url: &str, sql: &str) {
    let bin = eks_upgrade_agent::test_support::postgres_bin_dir()
        .expect("PostgreSQL binaries")
        .join("psql");
    let out = std::process::Command::new(bin)
        .args([url, "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "{sql}: {out:?}");
}

/// G100: with `--database-url` and a bucket, `tests ingest` keeps each report as a
/// `test_result` artifact (bytes in S3, row in the database's artifact index) as on a data dir:
/// in the `--session`/`--collection` given (ids or prefixes), else the upgrade's latest
/// session's `validation` collection; the run names its artifact and the artifact its run. The
/// kept report downloads, verified, from a replica with its own (empty) cache; the same holds
/// for `POST /api/v1/tests/ingest` and an upload with `type=test_result&phase=P` on a replica,
/// and for `artifacts add --phase` on the database.
/// G101: an ingest whose run cannot be recorded after its report was kept (a failing insert)
/// leaves no live artifact and no run, on the CLI and over HTTP (ingest and upload).
#[test]
fn reports_are_kept_as_artifacts_on_a_database() {
    let pg = eks_upgrade_agent::test_support::PgCluster::start();
    let db = pg.create_database();
    let moto = crate::util::Moto::start();
    moto.python(
        "s3 = boto3.client('s3', **kw)\n\
         s3.create_bucket(Bucket='team')\n\
         print('null')",
    );
    let mut vars: Vec<(&str, &str)> = crate::s3::aws_env(&moto.url).to_vec();
    vars.extend([("EUA_DATABASE_URL", db.as_str()), ("EUA_S3_BUCKET", "team")]);
    let env = Env::new();
    let run = |env: &Env, args: &[&str]| -> std::process::Output {
        env.command()
            .envs(vars.iter().copied())
            .args(args)
            .output()
            .unwrap()
    };
    let json = |env: &Env, args: &[&str]| -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let out = run(env, &a);
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    json(
        &env,
        &[
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
    let s = json(
        &env,
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
    let c = json(
        &env,
        &["artifacts", "collection", "create", &sid, "--name", "mine"],
    );
    let cid = c["collection_id"].as_str().unwrap().to_owned();
    let pre = report(&env, "pre.xml", &[("health", "pass"), ("pods", "pass")]);
    let post = report(&env, "post.xml", &[("health", "pass"), ("pods", "fail")]);

    // CLI on the database, into the session and collection given (by prefix).
    let r = json(
        &env,
        &[
            "tests",
            "ingest",
            &pre,
            "--upgrade",
            "u",
            "--phase",
            "pre",
            "--session",
            &sid[..12],
            "--collection",
            &cid,
        ],
    );
    assert_eq!(r["artifact_ids"].as_array().unwrap().len(), 1, "{r}");
    let kept_id = r["artifact_ids"][0].as_str().unwrap().to_owned();
    let kept = json(&env, &["artifacts", "show", &kept_id]);
    assert_eq!(kept["session_id"], sid.as_str(), "{kept}");
    assert_eq!(kept["collection_id"], cid.as_str(), "{kept}");
    assert_eq!(kept["artifact_type"], "test_result", "{kept}");
    assert_eq!(kept["metadata"]["run_id"], r["run_id"], "{kept}");
    assert_eq!(kept["tags"], serde_json::json!(["pre"]), "{kept}");
    // Without --session: the upgrade's latest session, its `validation` collection.
    let r2 = json(
        &env,
        &[
            "tests",
            "ingest",
            &post,
            "--upgrade",
            "u",
            "--phase",
            "post",
        ],
    );
    let kept2 = json(
        &env,
        &["artifacts", "show", r2["artifact_ids"][0].as_str().unwrap()],
    );
    assert_eq!(kept2["session_id"], sid.as_str(), "{kept2}");
    let cols = json(&env, &["artifacts", "collection", "list", &sid]);
    let validation = cols
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "validation")
        .unwrap_or_else(|| panic!("no validation collection: {cols}"));
    assert_eq!(kept2["collection_id"], validation["collection_id"]);

    // Another replica, its own data dir (an empty blob cache): the report downloads verified.
    let home = Env::new();
    let replica = crate::util::serve(&home, &vars);
    let url = format!("http://127.0.0.1:{}", replica.port);
    let client = Env::new();
    let got = client.dir.path().join("got.xml");
    client.ok(&[
        "--server",
        &url,
        "artifacts",
        "get",
        &kept_id,
        "--out",
        got.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(&pre).unwrap(),
        "the kept report"
    );

    // Over HTTP on the replica: kept in the session given, readable from the database by a
    // client with yet another (empty) cache.
    let over_http = client.json(&[
        "--server",
        &url,
        "tests",
        "ingest",
        &post,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
        "--session",
        &sid,
        "--collection",
        &cid[..12],
    ]);
    assert_eq!(over_http["artifact_ids"].as_array().unwrap().len(), 1);
    let http_id = over_http["artifact_ids"][0].as_str().unwrap();
    let third = Env::new();
    let got2 = third.dir.path().join("got2.xml");
    let out = run(
        &third,
        &["artifacts", "get", http_id, "--out", got2.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&got2).unwrap(), std::fs::read(&post).unwrap());
    assert_eq!(
        json(&third, &["artifacts", "show", http_id])["collection_id"],
        cid.as_str()
    );

    // `artifacts add --phase` on the database: kept and recorded as one run.
    let added = json(
        &env,
        &[
            "artifacts",
            "add",
            &sid,
            &cid,
            &pre,
            "--type",
            "test_result",
            "--phase",
            "adhoc",
        ],
    );
    let added_id = added[0]["artifact_id"].as_str().unwrap();
    // And through the replica (an upload with `type=test_result&phase=P`).
    let uploaded = client.json(&[
        "--server",
        &url,
        "artifacts",
        "add",
        &sid,
        &cid,
        &post,
        "--type",
        "test_result",
        "--phase",
        "adhoc",
    ]);
    let uploaded_id = uploaded[0]["artifact_id"].as_str().unwrap();
    let got3 = third.dir.path().join("got3.xml");
    let out = run(
        &third,
        &[
            "artifacts",
            "get",
            uploaded_id,
            "--out",
            got3.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&got3).unwrap(), std::fs::read(&post).unwrap());
    let runs = json(&env, &["tests", "runs", "--upgrade", "u"]);
    assert_eq!(runs.as_array().unwrap().len(), 5, "{runs}");
    for id in [added_id, uploaded_id] {
        assert!(
            runs.as_array()
                .unwrap()
                .iter()
                .any(|r| r["artifact_ids"] == serde_json::json!([id])),
            "{id}: {runs}"
        );
    }

    // A run that cannot be recorded after its report was kept: nothing is left.
    psql(
        &db,
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'disk full (test)'; END $$; \
         CREATE TRIGGER boom BEFORE INSERT ON test_runs FOR EACH ROW EXECUTE FUNCTION boom();",
    );
    // (The undone artifacts stay as `deleted` records, as on a data dir.)
    let live = |env: &Env| -> Vec<Value> {
        let all = json(env, &["artifacts", "search", "--session", &sid]);
        all.as_array()
            .unwrap()
            .iter()
            .filter(|a| a["status"] != "deleted")
            .cloned()
            .collect()
    };
    let before = live(&env);
    let out = run(
        &env,
        &[
            "tests",
            "ingest",
            &pre,
            "--upgrade",
            "u",
            "--phase",
            "adhoc",
            "--session",
            &sid,
            "--collection",
            &cid,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("disk full (test)"),
        "{out:?}"
    );
    assert_eq!(live(&env), before, "the CLI ingest left an artifact");
    let out = client.run(&[
        "--server",
        &url,
        "tests",
        "ingest",
        &pre,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
        "--session",
        &sid,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(live(&env), before, "the HTTP ingest left an artifact");
    let out = client.run(&[
        "--server",
        &url,
        "artifacts",
        "add",
        &sid,
        &cid,
        &pre,
        "--type",
        "test_result",
        "--phase",
        "adhoc",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(live(&env), before, "the HTTP upload left an artifact");
    psql(&db, "DROP TRIGGER boom ON test_runs");
    assert_eq!(
        json(&env, &["tests", "runs", "--upgrade", "u"])
            .as_array()
            .unwrap()
            .len(),
        5
    );
    drop((replica, moto, pg));
}
