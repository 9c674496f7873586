//! `eks-upgrade-agent tests ...` and `artifacts add --phase`: JUnit reports as data, end to end
//! through the binary (issue #12).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{Env, wait_for_body, webhook_receiver};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../eks-upgrade-agent/tests/fixtures/junit")
        .join(name)
}

/// A small pytest-like report: `(name, outcome)` with outcome `pass`, `fail`, `error`, `skip`.
fn report(env: &Env, file: &str, cases: &[(&str, &str)]) -> String {
    let mut xml = String::from("<?xml version=\"1.0\"?>\n<testsuite name=\"smoke\">\n");
    for (name, outcome) in cases {
        let inner = match *outcome {
            "pass" => String::new(),
            "fail" => format!("<failure message=\"{name} broke\">trace</failure>"),
            "error" => format!("<error message=\"{name} errored\"/>"),
            "skip" => "<skipped/>".into(),
            other => panic!("{other}"),
        };
        xml.push_str(&format!(
            "  <testcase classname=\"tests.api\" name=\"{name}\" time=\"1.0\">{inner}</testcase>\n"
        ));
    }
    xml.push_str("</testsuite>\n");
    let path = env.data_dir().join(file);
    std::fs::write(&path, xml).unwrap();
    path.to_str().unwrap().to_owned()
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect()
}

#[test]
fn ingest_compare_and_the_gate_exit_code() {
    let env = Env::with_task();
    let pre = report(
        &env,
        "pre.xml",
        &[
            ("health", "pass"),
            ("pods", "pass"),
            ("dns", "pass"),
            ("old", "fail"),
        ],
    );
    let post = report(
        &env,
        "post.xml",
        &[
            ("health", "pass"),
            ("pods", "fail"),
            ("old", "pass"),
            ("new", "pass"),
        ],
    );
    let run = env.json(&["tests", "ingest", &pre, "--upgrade", "u", "--phase", "pre"]);
    for key in [
        "run_id", "tests", "passed", "failed", "errors", "skipped", "flaky", "duration",
    ] {
        assert!(run.get(key).is_some(), "{key} missing: {run}");
    }
    assert_eq!(
        (
            &run["tests"],
            &run["passed"],
            &run["failed"],
            &run["cluster_name"]
        ),
        (&4.into(), &3.into(), &1.into(), &"c".into())
    );
    env.json(&[
        "tests",
        "ingest",
        &post,
        "--upgrade",
        "u",
        "--phase",
        "post",
    ]);

    // The gate fails: exit 3, both for people and for programs.
    let out = env.run(&["tests", "compare", "--upgrade", "u"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("gate: FAILED (1 new failure, 1 missing test)"),
        "{text}"
    );
    let (nf, fixed) = (
        text.find("NEW FAILURES (1)").unwrap(),
        text.find("FIXED (1)").unwrap(),
    );
    assert!(
        nf < text.find("MISSING (1)").unwrap() && nf < fixed,
        "worst first: {text}"
    );
    assert!(
        text.contains("pods broke"),
        "new failures show their message: {text}"
    );
    let out = env.run(&["-o", "json", "tests", "compare", "--upgrade", "u"]);
    assert_eq!(out.status.code(), Some(3));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["gate"]["passed"], false);
    assert_eq!(names(&c["new_failures"]), ["pods"]);
    assert_eq!(c["new_failures"][0]["message"], "pods broke");
    assert_eq!(c["new_failures"][0]["classname"], "tests.api");
    assert_eq!(c["new_failures"][0]["suite"], "smoke");
    assert_eq!(names(&c["missing"]), ["dns"]);
    assert_eq!(names(&c["fixed"]), ["old"]);
    assert_eq!(names(&c["added"]), ["new"]);
    for key in [
        "new_errors",
        "still_failing",
        "newly_skipped",
        "flaky",
        "duration_regressions",
    ] {
        assert!(c[key].as_array().unwrap().is_empty(), "{key}: {c}");
    }
    // Two runs by id, the same run twice: the gate passes, exit 0.
    let post_id = c["run_b"]["run_id"].as_str().unwrap().to_owned();
    let same = env.json(&["tests", "compare", &post_id, &post_id]);
    assert_eq!(same["gate"]["passed"], true);
    // A failed command is still 1, not 3.
    let err = env.fails(1, &["tests", "compare", "--upgrade", "nope"]);
    assert!(err.contains("--phase pre"), "{err}");
}

#[test]
fn files_are_kept_in_the_validation_collection() {
    let env = Env::with_task();
    let pre = report(&env, "pre.xml", &[("a", "pass")]);
    let post = report(&env, "post.xml", &[("a", "fail")]);
    let run = env.json(&["tests", "ingest", &pre, "--upgrade", "u", "--phase", "pre"]);
    env.json(&[
        "tests",
        "ingest",
        &post,
        "--upgrade",
        "u",
        "--phase",
        "post",
    ]);
    // T16: the same bytes under the same name again are a new run with its own artifact
    // (its own phase tag and run id), named after the run.
    let again = env.json(&[
        "tests",
        "ingest",
        &pre,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
    ]);
    assert_ne!(again["run_id"], run["run_id"]);
    assert_ne!(again["artifact_ids"], run["artifact_ids"]);
    let sessions = env.json(&["artifacts", "session", "list", "--upgrade", "u"]);
    assert_eq!(
        sessions.as_array().unwrap().len(),
        1,
        "one session, created once: {sessions}"
    );
    let sid = sessions[0]["session_id"].as_str().unwrap();
    assert_eq!(sessions[0]["cluster_name"], "c");
    let cols = env.json(&["artifacts", "collection", "list", sid]);
    assert_eq!(cols.as_array().unwrap().len(), 1, "{cols}");
    assert_eq!(cols[0]["name"], "validation");
    let found = env.json(&[
        "artifacts",
        "search",
        "--type",
        "test_result",
        "--upgrade",
        "u",
    ]);
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 3, "{found:?}");
    let kept = found
        .iter()
        .find(|a| a["tags"] == serde_json::json!(["pre"]))
        .unwrap();
    assert_eq!(kept["metadata"]["run_id"], run["run_id"]);
    assert_eq!(run["artifact_ids"][0], kept["artifact_id"]);
    let rekept = found
        .iter()
        .find(|a| a["tags"] == serde_json::json!(["adhoc"]))
        .unwrap();
    assert_eq!(rekept["metadata"]["run_id"], again["run_id"]);
    assert_eq!(again["artifact_ids"][0], rekept["artifact_id"]);
    let id = again["run_id"].as_str().unwrap();
    assert_eq!(
        rekept["name"],
        format!("pre.run-{}.xml", &id[id.len() - 12..])
    );
}

#[test]
fn bad_xml_fails_naming_file_and_line_and_stores_nothing() {
    let env = Env::with_task();
    let good = report(&env, "good.xml", &[("a", "pass")]);
    let broken = fixture("broken_tag.xml");
    let err = env.fails(
        1,
        &[
            "tests",
            "ingest",
            &good,
            broken.to_str().unwrap(),
            "--upgrade",
            "u",
            "--phase",
            "pre",
        ],
    );
    assert!(err.contains("broken_tag.xml:6: invalid JUnit XML"), "{err}");
    assert_eq!(env.json(&["tests", "runs"]), serde_json::json!([]));
    assert_eq!(
        env.json(&["artifacts", "session", "list"]),
        serde_json::json!([]),
        "no session created for a refused ingest"
    );
    let err = env.fails(
        1,
        &[
            "tests",
            "ingest",
            &good,
            "--upgrade",
            "ghost",
            "--phase",
            "pre",
        ],
    );
    assert!(err.contains("upgrade \"ghost\" not found"), "{err}");
    let err = env.fails(
        2,
        &[
            "tests",
            "ingest",
            &good,
            "--upgrade",
            "u",
            "--phase",
            "later",
        ],
    );
    assert!(err.contains("expected pre, post or adhoc"), "{err}");
    assert_eq!(env.json(&["tests", "runs"]), serde_json::json!([]));
}

#[test]
fn artifacts_add_with_a_phase_ingests_junit_files() {
    let env = Env::with_task();
    let s = env.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u",
        "--cluster",
        "c",
    ]);
    let sid = s["session_id"].as_str().unwrap();
    let c = env.json(&[
        "artifacts",
        "collection",
        "create",
        sid,
        "--name",
        "results",
    ]);
    let cid = c["collection_id"].as_str().unwrap();
    let xml = fixture("surefire_flaky.xml");
    let log = env.data_dir().join("runner.log");
    std::fs::write(&log, "not xml").unwrap();
    let added = env.json(&[
        "artifacts",
        "add",
        sid,
        cid,
        xml.to_str().unwrap(),
        log.to_str().unwrap(),
        "--type",
        "test_result",
        "--phase",
        "pre",
        "--tag",
        "java",
    ]);
    assert_eq!(added.as_array().unwrap().len(), 2, "{added}");
    let runs = env.json(&["tests", "runs", "--upgrade", "u"]);
    assert_eq!(
        runs.as_array().unwrap().len(),
        1,
        "only the JUnit file is a run: {runs}"
    );
    let r = &runs[0];
    assert_eq!(
        (&r["tests"], &r["flaky"], &r["failed"], &r["skipped"]),
        (&4.into(), &1.into(), &1.into(), &1.into())
    );
    assert_eq!(r["artifact_ids"].as_array().unwrap().len(), 1);
    let kept = env.json(&["artifacts", "show", r["artifact_ids"][0].as_str().unwrap()]);
    assert_eq!(kept["collection_id"], cid);
    assert_eq!(kept["tags"], serde_json::json!(["java", "pre"]));
    let err = env.fails(
        1,
        &[
            "artifacts",
            "add",
            sid,
            cid,
            xml.to_str().unwrap(),
            "--phase",
            "pre",
        ],
    );
    assert!(err.contains("--type test_result"), "{err}");
    // An empty or broken XML report (what a crashed suite leaves) is an error naming it, and
    // nothing of the call is stored (not the good report beside it either).
    let empty = env.data_dir().join("junit.xml");
    std::fs::write(&empty, "").unwrap();
    let artifacts_before = env.json(&["artifacts", "search", "--session", sid]);
    for bad in [
        empty.clone(),
        fixture("broken_tag.xml"),
        fixture("not_junit.xml"),
    ] {
        let err = env.fails(
            1,
            &[
                "artifacts",
                "add",
                sid,
                cid,
                xml.to_str().unwrap(),
                bad.to_str().unwrap(),
                "--type",
                "test_result",
                "--phase",
                "post",
            ],
        );
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name), "{err}");
        assert_eq!(
            env.json(&["artifacts", "search", "--session", sid]),
            artifacts_before,
            "nothing stored for {name}"
        );
    }
    assert_eq!(env.json(&["tests", "runs"]).as_array().unwrap().len(), 1);
    // Without --phase a JUnit file is an opaque artifact, as before.
    env.json(&[
        "artifacts",
        "add",
        sid,
        cid,
        xml.to_str().unwrap(),
        "--type",
        "test_result",
    ]);
    assert_eq!(env.json(&["tests", "runs"]).as_array().unwrap().len(), 1);
}

/// G102: `artifacts add --phase P --server URL` works as on a data dir: the JUnit report is
/// uploaded with `type=test_result&phase=P` and the server keeps it and records it as a run of
/// the session's upgrade (tags and options kept), other files are only kept; more than one
/// report per command, or a broken XML report, is refused and nothing is stored.
#[test]
fn artifacts_add_with_a_phase_works_against_a_server() {
    let server_env = Env::with_task();
    let served = crate::util::serve(&server_env, &[]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let on = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["--server".to_owned(), url.clone()];
        a.extend(args.iter().map(|s| s.to_string()));
        a
    };
    let remote = |args: &[&str]| -> Value {
        let a = on(args);
        client.json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let s = remote(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u",
        "--cluster",
        "c",
    ]);
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let c = remote(&[
        "artifacts",
        "collection",
        "create",
        &sid,
        "--name",
        "results",
    ]);
    let cid = c["collection_id"].as_str().unwrap().to_owned();
    let xml = fixture("surefire_flaky.xml");
    let log = client.data_dir().join("runner.log");
    std::fs::write(&log, "not xml").unwrap();
    let added = remote(&[
        "artifacts",
        "add",
        &sid[..12],
        &cid,
        xml.to_str().unwrap(),
        log.to_str().unwrap(),
        "--type",
        "test_result",
        "--phase",
        "pre",
        "--tag",
        "java",
    ]);
    assert_eq!(added.as_array().unwrap().len(), 2, "{added}");
    let runs = server_env.json(&["tests", "runs", "--upgrade", "u"]);
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    let r = &runs[0];
    assert_eq!(
        (
            &r["tests"],
            &r["flaky"],
            &r["failed"],
            &r["skipped"],
            &r["phase"]
        ),
        (&4.into(), &1.into(), &1.into(), &1.into(), &"pre".into())
    );
    assert_eq!(r["cluster_name"], "c");
    assert_eq!(
        r["artifact_ids"],
        serde_json::json!([added[0]["artifact_id"]])
    );
    let kept = server_env.json(&["artifacts", "show", r["artifact_ids"][0].as_str().unwrap()]);
    assert_eq!(kept["collection_id"], cid.as_str());
    assert_eq!(kept["name"], "surefire_flaky.xml");
    assert_eq!(kept["tags"], serde_json::json!(["java", "pre"]));
    assert_eq!(added[1]["name"], "runner.log");
    // Refusals store nothing: two reports in one command, a broken XML report.
    let before = server_env.json(&["artifacts", "search", "--session", &sid]);
    let two = client.data_dir().join("again.xml");
    std::fs::copy(&xml, &two).unwrap();
    let a = on(&[
        "artifacts",
        "add",
        &sid,
        &cid,
        xml.to_str().unwrap(),
        two.to_str().unwrap(),
        "--type",
        "test_result",
        "--phase",
        "post",
    ]);
    let e = client.fails(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("one JUnit report per command"), "{e}");
    let a = on(&[
        "artifacts",
        "add",
        &sid,
        &cid,
        fixture("broken_tag.xml").to_str().unwrap(),
        "--type",
        "test_result",
        "--phase",
        "post",
    ]);
    let e = client.fails(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("broken_tag.xml"), "{e}");
    // Another file whose name is refused (a control character): refused before the report
    // is recorded, so a retry does not record a second run.
    let bad = client.data_dir().join("runner\u{1}.log");
    std::fs::write(&bad, "log").unwrap();
    let a = on(&[
        "artifacts",
        "add",
        &sid,
        &cid,
        xml.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--type",
        "test_result",
        "--phase",
        "post",
    ]);
    let e = client.fails(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("control character"), "{e}");
    assert_eq!(
        server_env.json(&["artifacts", "search", "--session", &sid]),
        before
    );
    assert_eq!(
        server_env
            .json(&["tests", "runs"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn runs_show_history_and_flaky() {
    let env = Env::with_task();
    let mut ids = Vec::new();
    for (i, outcome) in ["pass", "fail", "pass"].iter().enumerate() {
        let f = report(
            &env,
            &format!("r{i}.xml"),
            &[("wobbly", outcome), ("solid", "pass")],
        );
        let run = env.json(&["tests", "ingest", &f, "--upgrade", "u", "--phase", "adhoc"]);
        ids.push(run["run_id"].as_str().unwrap().to_owned());
    }
    let runs = env.json(&["tests", "runs", "--cluster", "c"]);
    assert_eq!(
        runs.as_array()
            .unwrap()
            .iter()
            .map(|r| r["run_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [&ids[2], &ids[1], &ids[0]]
    );
    let table = env.ok(&["tests", "runs"]);
    assert!(table.starts_with("RUN "), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let show = env.json(&["tests", "show", &ids[1][..ids[1].len() - 3]]);
    assert_eq!(show["run"]["run_id"], ids[1].as_str());
    assert_eq!(names(&show["failures"]), ["wobbly"]);
    let text = env.ok(&["tests", "show", &ids[1]]);
    assert!(
        text.contains("FAILED  smoke › tests.api › wobbly"),
        "{text}"
    );
    assert!(text.contains("wobbly broke"), "{text}");
    let h = env.json(&["tests", "history", "wobbly", "--cluster", "c"]);
    assert_eq!(
        h.as_array()
            .unwrap()
            .iter()
            .map(|e| e["status"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["passed", "failed", "passed"],
        "newest first"
    );
    assert_eq!(h[0]["run_id"], ids[2].as_str());
    assert_eq!(h[0]["upgrade_id"], "u");
    assert_eq!(h[0]["phase"], "adhoc");
    let f = env.json(&["tests", "flaky", "--cluster", "c"]);
    assert_eq!(names(&f), ["wobbly"]);
    assert_eq!(f[0]["passes_since"], 1);
    let text = env.ok(&["tests", "flaky"]);
    assert!(text.contains("smoke › tests.api › wobbly"), "{text}");
    assert!(
        env.ok(&["tests", "flaky", "--cluster", "other"])
            .contains("no flaky tests")
    );
    let err = env.fails(1, &["tests", "flaky", "--days", "0"]);
    assert!(err.contains("give 1 to 3650"), "{err}");
    let err = env.fails(1, &["tests", "show", "nope"]);
    assert!(err.contains("test run \"nope\" not found"), "{err}");
}

#[test]
fn a_post_run_failing_the_gate_is_notified() {
    let env = Env::with_task();
    let (url, got) = webhook_receiver();
    let pre = report(&env, "pre.xml", &[("a", "pass"), ("b", "pass")]);
    let post = report(&env, "post.xml", &[("a", "fail"), ("b", "pass")]);
    let run = |f: &str, phase: &str| {
        let out = env
            .command()
            .env("EUA_WEBHOOK_URL", &url)
            .args([
                "-o",
                "json",
                "tests",
                "ingest",
                f,
                "--upgrade",
                "u",
                "--phase",
                phase,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    run(&pre, "pre");
    let p = run(&post, "post");
    wait_for_body(&got, "upgrade.validation_failed");
    let bodies = got.lock().unwrap().clone();
    let body = bodies
        .iter()
        .find(|b| b.contains("upgrade.validation_failed"))
        .unwrap();
    assert!(body.contains(p["run_id"].as_str().unwrap()), "{body}");
    assert!(body.contains("1 new failure"), "{body}");
    assert_eq!(
        bodies
            .iter()
            .filter(|b| b.contains("upgrade.validation_failed"))
            .count(),
        1
    );
    // The runs' trace-only entries (for the OTLP sink) never reach a webhook (each one-shot
    // command delivered before it exited).
    assert!(
        !bodies.iter().any(|b| b.contains("trace.")),
        "a trace-only entry reached the webhook: {bodies:?}"
    );
}

/// Issue #12 "a 50 MB report streams (memory flat)": the ingest of a 50 MB JUnit file (every
/// case with a failure message and captured output) stays under 64 MiB of peak RSS.
#[test]
fn a_50_mb_report_ingests_in_flat_memory() {
    use std::io::Write;
    let env = Env::with_task();
    let path = env.data_dir().join("big.xml");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(f, "<?xml version=\"1.0\"?>\n<testsuites>").unwrap();
    let output = "x".repeat(700);
    let mut cases = 0u64;
    let mut suite = 0;
    while f.get_ref().metadata().unwrap().len() < 50 * 1024 * 1024 {
        writeln!(f, "<testsuite name=\"suite-{suite}\">").unwrap();
        for i in 0..1000 {
            if i % 10 == 0 {
                writeln!(
                    f,
                    "<testcase classname=\"pkg.Class{i}\" name=\"test_{i}\" time=\"0.5\">\
                     <failure message=\"assertion {i} failed\">stack {output}</failure>\
                     <system-out>{output}</system-out></testcase>"
                )
                .unwrap();
            } else {
                writeln!(
                    f,
                    "<testcase classname=\"pkg.Class{i}\" name=\"test_{i}\" time=\"0.5\">\
                     <system-out>{output}</system-out></testcase>"
                )
                .unwrap();
            }
            cases += 1;
        }
        writeln!(f, "</testsuite>").unwrap();
        f.flush().unwrap();
        suite += 1;
    }
    writeln!(f, "</testsuites>").unwrap();
    drop(f);
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size >= 50 * 1024 * 1024, "{size}");
    let child = env
        .command()
        .args(["-o", "json", "tests", "ingest", path.to_str().unwrap()])
        .args(["--upgrade", "u", "--phase", "post"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (out, peak_kib) = crate::s3::wait_with_peak_rss(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["tests"], cases);
    assert_eq!(run["failed"], cases / 10);
    eprintln!(
        "50 MB ingest: {cases} cases, peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib <= 64 * 1024, "peak RSS {peak_kib} KiB over 64 MiB");

    // T4: one huge text node is not buffered whole either: a report whose failure message
    // attribute is one 50 MB value and whose system-out is one 50 MB CDATA block.
    let path = env.data_dir().join("block.xml");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let chunk = "0123456789abcdef&amp;".repeat(1024);
    write!(
        f,
        "<?xml version=\"1.0\"?>\n<testsuite name=\"block\">\n\
         <testcase classname=\"c\" name=\"huge\" time=\"1\"><failure message=\""
    )
    .unwrap();
    for _ in 0..(50 * 1024 * 1024 / chunk.len() + 1) {
        f.write_all(chunk.as_bytes()).unwrap();
    }
    write!(f, "\"/><system-out><![CDATA[").unwrap();
    let line = format!("{}\n", "x".repeat(1023));
    for _ in 0..(50 * 1024 + 1) {
        f.write_all(line.as_bytes()).unwrap();
    }
    writeln!(
        f,
        "]]></system-out></testcase>\n<testcase classname=\"c\" name=\"after\"/>\n</testsuite>"
    )
    .unwrap();
    drop(f);
    let child = env
        .command()
        .args(["-o", "json", "tests", "ingest", path.to_str().unwrap()])
        .args(["--upgrade", "u", "--phase", "adhoc"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (out, peak_kib) = crate::s3::wait_with_peak_rss(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&run["tests"], &run["failed"]), (&2.into(), &1.into()));
    eprintln!(
        "one 50 MB attribute and one 50 MB CDATA block: peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib <= 64 * 1024, "peak RSS {peak_kib} KiB over 64 MiB");
    let id = run["run_id"].as_str().unwrap();
    let shown = env.json(&["tests", "show", id]);
    let m = shown["failures"][0]["message"].as_str().unwrap();
    assert!(m.starts_with("0123456789abcdef&0123"), "{}", &m[..40]);
    assert!(m.ends_with('…'), "the cut is marked");
}

/// The demo records a pre and a post run of its smoke suite: one new failure, one flaky test.
#[test]
fn the_demo_produces_pre_and_post_runs() {
    let env = Env::new();
    env.json(&["demo", "--speed", "500", "--upgrade-id", "d1"]);
    let out = env.run(&["-o", "json", "tests", "compare", "--upgrade", "d1"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names(&c["new_failures"]), ["test_list_pods"]);
    assert!(
        c["new_failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{c}"
    );
    assert_eq!(names(&c["flaky"]), ["test_resolve_service"]);
    assert_eq!(c["gate"]["reasons"], serde_json::json!(["1 new failure"]));
    let runs = env.json(&["tests", "runs", "--upgrade", "d1"]);
    assert_eq!(runs.as_array().unwrap().len(), 2);
    assert_eq!(runs[0]["artifact_ids"].as_array().unwrap().len(), 1);
}

/// T17: every `tests` command works with `--server URL` through the HTTP API and says what the
/// same command says on the server's data dir: ingest (kept as an artifact on the server),
/// compare (exit 3 when the gate fails, 0 when it passes), runs, show, history and flaky. More
/// than one file per remote ingest is refused (the API records one report per run).
#[test]
fn tests_commands_work_against_a_server() {
    let server_env = Env::with_task();
    let served = crate::util::serve(&server_env, &[]);
    let url = format!("http://127.0.0.1:{}", served.port);
    let client = Env::new();
    let on = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["--server".to_owned(), url.clone()];
        a.extend(args.iter().map(|s| s.to_string()));
        a
    };
    let remote = |args: &[&str]| -> Value {
        let a = on(args);
        client.json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let pre = report(&client, "pre.xml", &[("health", "pass"), ("pods", "pass")]);
    let post = report(&client, "post.xml", &[("health", "pass"), ("pods", "fail")]);
    let pre_run = remote(&["tests", "ingest", &pre, "--upgrade", "u", "--phase", "pre"]);
    assert_eq!(pre_run["cluster_name"], "c");
    assert_eq!(pre_run["files"], serde_json::json!(["pre.xml"]));
    assert_eq!(pre_run["artifact_ids"].as_array().unwrap().len(), 1);
    let post_run = remote(&[
        "tests",
        "ingest",
        &post,
        "--upgrade",
        "u",
        "--phase",
        "post",
    ]);
    assert_eq!(post_run["failed"], 1);
    // Kept on the server.
    let kept = server_env.json(&["artifacts", "search", "--type", "test_result"]);
    assert_eq!(kept.as_array().unwrap().len(), 2, "{kept}");
    // compare: exit 3 on a failed gate, the same JSON as on the server's data dir.
    let a = on(&["-o", "json", "tests", "compare", "--upgrade", "u"]);
    let out = client.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names(&c["new_failures"]), ["pods"]);
    let local = server_env.run(&["-o", "json", "tests", "compare", "--upgrade", "u"]);
    assert_eq!(local.status.code(), Some(3));
    assert_eq!(c, serde_json::from_slice::<Value>(&local.stdout).unwrap());
    let text = on(&["tests", "compare", "--upgrade", "u"]);
    let out = client.run(&text.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gate: FAILED (1 new failure)"),
        "{out:?}"
    );
    let post_id = post_run["run_id"].as_str().unwrap();
    let same = remote(&["tests", "compare", post_id, post_id]);
    assert_eq!(same["gate"]["passed"], true);
    // runs, show, history, flaky: what the server's data dir says.
    for args in [
        vec!["tests", "runs", "--upgrade", "u"],
        vec!["tests", "runs", "--cluster", "c", "--phase", "post"],
        vec!["tests", "show", post_id],
        vec!["tests", "history", "pods", "--cluster", "c"],
        vec!["tests", "flaky", "--cluster", "c"],
    ] {
        assert_eq!(remote(&args), server_env.json(&args), "{args:?}");
    }
    let shown = remote(&["tests", "show", post_id]);
    assert_eq!(names(&shown["failures"]), ["pods"]);
    assert_eq!(remote(&["tests", "runs"]).as_array().unwrap().len(), 2);
    // Errors come back as errors.
    let a = on(&["tests", "show", "no-such-run"]);
    let e = client.fails(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("no-such-run"), "{e}");
    let a = on(&[
        "tests",
        "ingest",
        &pre,
        &post,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
    ]);
    let e = client.fails(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("one report per command"), "{e}");
    assert_eq!(remote(&["tests", "runs"]).as_array().unwrap().len(), 2);
    // --cluster, --session and --collection reach the server: the run is on the given cluster
    // and its file in the given collection (by id prefix), not the upgrade's defaults.
    let s = server_env.json(&[
        "artifacts",
        "session",
        "create",
        "--upgrade",
        "u",
        "--cluster",
        "c",
    ]);
    let session = s["session_id"].as_str().unwrap().to_owned();
    let c = server_env.json(&[
        "artifacts",
        "collection",
        "create",
        &session,
        "--name",
        "mine",
    ]);
    let collection = c["collection_id"].as_str().unwrap().to_owned();
    let run = remote(&[
        "tests",
        "ingest",
        &pre,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
        "--cluster",
        "elsewhere",
        "--session",
        &session[..12],
        "--collection",
        &collection,
    ]);
    assert_eq!(run["cluster_name"], "elsewhere", "{run}");
    let id = run["artifact_ids"][0].as_str().unwrap();
    let kept = server_env.json(&["artifacts", "show", id]);
    assert_eq!(kept["session_id"], session.as_str(), "{kept}");
    assert_eq!(kept["collection_id"], collection.as_str(), "{kept}");
    let a = on(&[
        "tests",
        "ingest",
        &pre,
        "--upgrade",
        "u",
        "--phase",
        "adhoc",
        "--session",
        "no-such-session",
    ]);
    let e = client.fails(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("no-such-session"), "{e}");
    assert_eq!(remote(&["tests", "runs"]).as_array().unwrap().len(), 3);
}

mod database;
