//! The `TestResultStore` conformance suite. Every backend runs it through [`run`] with a factory
//! that returns a fresh, empty store (and its outbox, when the backend has one, for the
//! `upgrade.validation_failed` case); differences are parameters, never copies of the suite.

use std::sync::Arc;

use chrono::{Duration, Utc};

use super::{Ingest, TestResults};
use crate::error::Error;
use crate::model::{CaseAttempt, RunPhase, RunQuery, TestStatus};
use crate::store::{Outbox, TestResultStore};

/// A fresh store, and its outbox when it has one.
pub type Factory<'a> = &'a dyn Fn() -> (Arc<dyn TestResultStore>, Option<Arc<dyn Outbox>>);
type Case = (&'static str, fn(TestResults, Option<Arc<dyn Outbox>>));

/// Runs every case against fresh stores from `factory`.
pub fn run(factory: Factory<'_>) {
    let cases: [Case; 8] = [
        ("attempts_fold_last_decides", attempts_fold_last_decides),
        (
            "a_failing_source_stores_nothing",
            a_failing_source_stores_nothing,
        ),
        ("compare_classifies_and_gates", compare_classifies_and_gates),
        ("gate_failure_is_notified", gate_failure_is_notified),
        (
            "history_newest_first_per_cluster",
            history_newest_first_per_cluster,
        ),
        ("flaky_window_and_clearing", flaky_window_and_clearing),
        ("duration_regressions", duration_regressions),
        ("run_lookups", run_lookups),
    ];
    for (name, case) in cases {
        let (store, outbox) = factory();
        eprintln!("test results conformance: {name}");
        case(TestResults::new(store), outbox);
    }
}

/// One attempt: `suite/classname::name` in `status`, taking `secs`.
pub fn attempt(name: &str, status: TestStatus, secs: f64) -> CaseAttempt {
    CaseAttempt {
        framework: "pytest".into(),
        suite: "smoke".into(),
        classname: "tests.api".into(),
        name: name.into(),
        status,
        duration: secs,
        message: status
            .is_failure()
            .then(|| format!("{name} broke ({status})")),
        suite_window: None,
    }
}

fn record(
    r: &TestResults,
    upgrade: &str,
    cluster: &str,
    phase: RunPhase,
    attempts: Vec<CaseAttempt>,
) -> crate::model::TestRun {
    r.record(
        &Ingest::new(upgrade, cluster, phase),
        vec!["report.xml".into()],
        Vec::new(),
        &mut attempts.into_iter(),
    )
    .unwrap()
}

fn names(list: &[crate::model::ComparedTest]) -> Vec<&str> {
    list.iter().map(|t| t.name.as_str()).collect()
}

use TestStatus::{Error as Errored, Failed, Passed, Skipped};

fn attempts_fold_last_decides(r: TestResults, _: Option<Arc<dyn Outbox>>) {
    let run = record(
        &r,
        "u1",
        "prod",
        RunPhase::Pre,
        vec![
            attempt("a", Passed, 1.0),
            attempt("b", Failed, 2.0),
            attempt("c", Failed, 1.0),
            attempt("b", Passed, 3.0),
            attempt("c", Errored, 1.5),
            attempt("d", Errored, 0.5),
            attempt("e", Skipped, 0.0),
        ],
    );
    assert_eq!(run.counts.tests, 5);
    assert_eq!(
        (
            run.counts.passed,
            run.counts.failed,
            run.counts.errors,
            run.counts.skipped,
            run.counts.flaky
        ),
        (2, 0, 2, 1, 1)
    );
    assert!((run.counts.duration - (1.0 + 3.0 + 1.5 + 0.5)).abs() < 1e-9);
    assert_eq!(run.suites, ["smoke"]);
    assert_eq!(run.phase, RunPhase::Pre);
    let results = r.results(&run.run_id, false).unwrap();
    let by = |n: &str| results.iter().find(|x| x.name == n).unwrap().clone();
    let b = by("b");
    assert_eq!((b.status, b.attempts, b.flaky), (Passed, 2, true));
    assert_eq!(b.duration, 3.0, "the last attempt's duration");
    assert_eq!(
        b.message.as_deref(),
        Some("b broke (failed)"),
        "the failure it recovered from"
    );
    let c = by("c");
    assert_eq!((c.status, c.attempts, c.flaky), (Errored, 2, false));
    assert_eq!(c.message.as_deref(), Some("c broke (error)"));
    assert_eq!(by("a").attempts, 1);
    assert_eq!(
        by("a").test_id,
        crate::model::test_id("pytest", "smoke", "tests.api", "a")
    );
    let failing = r.results(&run.run_id, true).unwrap();
    assert_eq!(
        failing.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
        ["c", "d"]
    );
}

fn a_failing_source_stores_nothing(r: TestResults, outbox: Option<Arc<dyn Outbox>>) {
    record(
        &r,
        "u1",
        "prod",
        RunPhase::Pre,
        vec![attempt("a", Passed, 1.0)],
    );
    let new = crate::model::NewRun {
        run_id: "run-broken".into(),
        upgrade_id: "u1".into(),
        cluster_name: "prod".into(),
        phase: RunPhase::Post,
        created_at: Utc::now(),
        files: vec!["r.xml".into()],
        artifact_ids: Vec::new(),
    };
    let e = r
        .store()
        .record_run(&new, &mut |sink| {
            sink(attempt("a", Failed, 1.0))?;
            sink(attempt("z", Failed, 1.0))?;
            Err(Error::invalid("r.xml:9: invalid JUnit XML: boom"))
        })
        .unwrap_err();
    assert_eq!(e.to_string(), "r.xml:9: invalid JUnit XML: boom");
    assert!(matches!(
        r.store().run("run-broken"),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(r.runs(&RunQuery::default()).unwrap().len(), 1);
    assert!(r.history("z", None, 0).unwrap().is_empty());
    assert_eq!(r.history("a", None, 0).unwrap().len(), 1);
    assert!(r.flaky(None, None).unwrap().is_empty());
    if let Some(o) = outbox {
        o.ingest("conformance", crate::notify::Kinds::All).unwrap();
        // Only the stored run's trace-only entry: the broken run wrote nothing.
        let due = o.due("conformance", Utc::now(), 100).unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].0.detail_type, crate::notify::TEST_RUN_TRACE);
        assert_ne!(due[0].0.detail["run_id"], "run-broken");
    }
    // The id was not taken.
    let run = r
        .store()
        .record_run(&new, &mut |sink| sink(attempt("a", Passed, 1.0)))
        .unwrap();
    assert_eq!(run.counts.tests, 1);
    let dup = r
        .store()
        .record_run(&new, &mut |sink| sink(attempt("a", Passed, 1.0)))
        .unwrap_err();
    assert!(matches!(dup, Error::AlreadyExists { .. }), "{dup:?}");
}

fn compare_classifies_and_gates(r: TestResults, _: Option<Arc<dyn Outbox>>) {
    // Flaky on the cluster before the runs compared: failed once, passed once.
    record(
        &r,
        "u0",
        "prod",
        RunPhase::Adhoc,
        vec![attempt("wobbly", Failed, 1.0)],
    );
    record(
        &r,
        "u0",
        "prod",
        RunPhase::Adhoc,
        vec![attempt("wobbly", Passed, 1.0)],
    );
    let pre = record(
        &r,
        "u1",
        "prod",
        RunPhase::Pre,
        vec![
            attempt("new-failure", Passed, 1.0),
            attempt("new-error", Passed, 1.0),
            attempt("still", Failed, 1.0),
            attempt("fixed", Failed, 1.0),
            attempt("skipped-now", Passed, 1.0),
            attempt("missing", Passed, 1.0),
            attempt("steady", Passed, 1.0),
            attempt("flaky-pre", Failed, 1.0),
            attempt("flaky-pre", Passed, 1.0),
            attempt("wobbly", Passed, 1.0),
            attempt("was-skipped", Skipped, 0.0),
        ],
    );
    let post = record(
        &r,
        "u1",
        "prod",
        RunPhase::Post,
        vec![
            attempt("new-failure", Failed, 1.0),
            attempt("new-error", Errored, 1.0),
            attempt("still", Errored, 1.0),
            attempt("fixed", Passed, 1.0),
            attempt("skipped-now", Skipped, 0.0),
            attempt("steady", Passed, 1.0),
            attempt("flaky-pre", Passed, 1.0),
            attempt("added", Failed, 1.0),
            attempt("wobbly", Passed, 1.0),
            attempt("was-skipped", Failed, 1.0),
        ],
    );
    for c in [
        r.compare(&pre.run_id, &post.run_id).unwrap(),
        r.compare_upgrade("u1").unwrap(),
    ] {
        assert_eq!(c.run_a.run_id, pre.run_id);
        assert_eq!(c.run_b.run_id, post.run_id);
        assert_eq!(names(&c.new_failures), ["new-failure"]);
        assert_eq!(
            c.new_failures[0].message.as_deref(),
            Some("new-failure broke (failed)")
        );
        assert_eq!(c.new_failures[0].before, Some(Passed));
        assert_eq!(c.new_failures[0].after, Some(Failed));
        assert_eq!(names(&c.new_errors), ["new-error"]);
        assert_eq!(names(&c.still_failing), ["still"]);
        assert_eq!(names(&c.fixed), ["fixed"]);
        assert_eq!(names(&c.newly_skipped), ["skipped-now"]);
        // Skipped before, failing now: no result to break, so added (T15), not a new failure.
        assert_eq!(names(&c.added), ["added", "was-skipped"]);
        assert_eq!(names(&c.missing), ["missing"]);
        // Not the new failures, errors or fixes of these very runs.
        assert_eq!(names(&c.flaky), ["flaky-pre", "wobbly"]);
        assert!(c.duration_regressions.is_empty());
        assert!(!c.gate.passed);
        assert_eq!(
            c.gate.reasons,
            ["1 new failure", "1 new error", "1 missing test"]
        );
    }
    // The same run against itself passes.
    assert!(r.compare(&post.run_id, &post.run_id).unwrap().gate.passed);
    let e = r.compare_upgrade("nope").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("--phase pre"), "{e}");
    record(
        &r,
        "u2",
        "prod",
        RunPhase::Pre,
        vec![attempt("a", Passed, 1.0)],
    );
    let e = r.compare_upgrade("u2").unwrap_err().to_string();
    assert!(e.contains("--phase post"), "{e}");
}

fn gate_failure_is_notified(r: TestResults, outbox: Option<Arc<dyn Outbox>>) {
    let Some(outbox) = outbox else {
        return;
    };
    let due = || {
        outbox
            .ingest("conformance", crate::notify::Kinds::Events)
            .unwrap();
        outbox
            .due("conformance", Utc::now(), 100)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    // A post run without a pre run: nothing to judge.
    record(
        &r,
        "u1",
        "prod",
        RunPhase::Post,
        vec![attempt("a", Failed, 1.0)],
    );
    assert!(due().is_empty());
    let pre = record(
        &r,
        "u1",
        "prod",
        RunPhase::Pre,
        vec![attempt("a", Passed, 1.0), attempt("b", Passed, 1.0)],
    );
    // Skipped in the pre run, failing in a post run: not a new failure, no notification.
    record(
        &r,
        "u9",
        "prod",
        RunPhase::Pre,
        vec![attempt("s", Skipped, 0.0)],
    );
    record(
        &r,
        "u9",
        "prod",
        RunPhase::Post,
        vec![attempt("s", Failed, 1.0)],
    );
    assert!(due().is_empty());
    // Passing post: no notification; pre and adhoc runs never notify.
    record(
        &r,
        "u1",
        "prod",
        RunPhase::Post,
        vec![attempt("a", Passed, 1.0), attempt("b", Passed, 1.0)],
    );
    record(
        &r,
        "u1",
        "prod",
        RunPhase::Adhoc,
        vec![attempt("a", Failed, 1.0)],
    );
    assert!(due().is_empty());
    let post = record(
        &r,
        "u1",
        "prod",
        RunPhase::Post,
        vec![attempt("a", Failed, 1.0)],
    );
    let got = due();
    assert_eq!(got.len(), 1, "{got:?}");
    let n = &got[0];
    assert_eq!(n.detail_type, "upgrade.validation_failed");
    assert_eq!(n.upgrade_id, "u1");
    assert_eq!(n.event_id, post.run_id);
    assert_eq!(n.detail["run_id"], post.run_id.as_str());
    assert_eq!(n.detail["pre_run_id"], pre.run_id.as_str());
    assert_eq!(n.detail["cluster_name"], "prod");
    assert_eq!(n.detail["new_failures"], 1);
    assert_eq!(n.detail["missing"], 1);
    assert_eq!(
        n.detail["reasons"],
        serde_json::json!(["1 new failure", "1 missing test"])
    );
    // The notification says what compare says.
    assert_eq!(
        r.compare_upgrade("u1").unwrap().gate.reasons,
        ["1 new failure", "1 missing test"]
    );
    // A trace sink (the OTLP sink) takes in one trace-only entry per recorded run, whatever
    // its phase and result, naming the run; the others never see them (above).
    outbox.ingest("trace", crate::notify::Kinds::All).unwrap();
    let traced: Vec<_> = outbox
        .due("trace", Utc::now(), 100)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.detail_type == crate::notify::TEST_RUN_TRACE)
        .collect();
    let runs = r.runs(&RunQuery::default()).unwrap();
    assert_eq!(traced.len(), 7, "{traced:?}");
    assert_eq!(traced.len(), runs.len());
    for run in &runs {
        let n: Vec<_> = traced
            .iter()
            .filter(|n| n.detail["run_id"] == run.run_id.as_str())
            .collect();
        assert_eq!(n.len(), 1, "one entry for {}", run.run_id);
        assert_eq!(n[0].upgrade_id, run.upgrade_id);
        assert_eq!(n[0].time, run.created_at);
        assert_eq!(n[0].detail["phase"], run.phase.as_str());
    }
    assert_eq!(
        outbox
            .sink_status("conformance", crate::notify::Kinds::Events)
            .unwrap()
            .total,
        1,
        "only the gate's notification counts for the other sinks"
    );
}

fn history_newest_first_per_cluster(r: TestResults, _: Option<Arc<dyn Outbox>>) {
    let mut ids = Vec::new();
    for (i, cluster) in ["prod", "staging", "prod", "prod"].iter().enumerate() {
        let status = if i == 2 { Failed } else { Passed };
        let run = record(
            &r,
            &format!("u{i}"),
            cluster,
            RunPhase::Post,
            vec![
                attempt("x", status, i as f64),
                attempt("other", Passed, 1.0),
            ],
        );
        ids.push(run.run_id);
    }
    let all = r.history("x", None, 0).unwrap();
    assert_eq!(
        all.iter().map(|h| h.run_id.as_str()).collect::<Vec<_>>(),
        [&ids[3], &ids[2], &ids[1], &ids[0]]
    );
    assert_eq!(all[1].status, Failed);
    assert_eq!(all[1].upgrade_id, "u2");
    assert_eq!(all[1].message.as_deref(), Some("x broke (failed)"));
    assert_eq!(all[0].duration, 3.0);
    let prod = r.history("x", Some("prod"), 2).unwrap();
    assert_eq!(
        prod.iter().map(|h| h.run_id.as_str()).collect::<Vec<_>>(),
        [&ids[3], &ids[2]]
    );
    // By test id too.
    let id = crate::model::test_id("pytest", "smoke", "tests.api", "x");
    assert_eq!(r.history(&id, Some("staging"), 0).unwrap().len(), 1);
    assert!(r.history("nothing", None, 0).unwrap().is_empty());
    assert!(matches!(
        r.history("", None, 0),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        r.history("x", None, 10_001),
        Err(Error::InvalidInput(_))
    ));
}

fn flaky_window_and_clearing(r: TestResults, _: Option<Arc<dyn Outbox>>) {
    let run = |status: TestStatus, cluster: &str| {
        record(
            &r,
            "u1",
            cluster,
            RunPhase::Adhoc,
            vec![
                attempt("wobbly", status, 1.0),
                attempt("solid", Passed, 1.0),
            ],
        );
    };
    run(Passed, "prod");
    assert!(r.flaky(Some("prod"), None).unwrap().is_empty());
    run(Failed, "prod");
    // Failing on another cluster does not make it flaky on this one.
    run(Failed, "staging");
    let f = r.flaky(Some("prod"), None).unwrap();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!((f[0].name.as_str(), f[0].passes_since), ("wobbly", 0));
    assert_eq!(f[0].message.as_deref(), Some("wobbly broke (failed)"));
    assert!(r.flaky(Some("staging"), None).unwrap().is_empty());
    assert_eq!(r.flaky(None, None).unwrap().len(), 1);
    for i in 1..5 {
        run(Passed, "prod");
        assert_eq!(r.flaky(Some("prod"), None).unwrap()[0].passes_since, i);
    }
    run(Passed, "prod");
    assert!(
        r.flaky(Some("prod"), None).unwrap().is_empty(),
        "cleared after 5 passes in a row"
    );
    // Flaky within a run (passed on a retry) counts as failing and passing.
    record(
        &r,
        "u1",
        "dev",
        RunPhase::Adhoc,
        vec![attempt("retry", Failed, 1.0), attempt("retry", Passed, 1.0)],
    );
    assert_eq!(r.flaky(Some("dev"), None).unwrap().len(), 1);
    // The window: both the pass and the failure must fall inside it.
    let future = Utc::now() + Duration::days(1);
    assert!(r.store().flaky(Some("dev"), future).unwrap().is_empty());
    assert!(matches!(
        r.flaky(None, Some(0)),
        Err(Error::InvalidInput(_))
    ));
}

fn duration_regressions(r: TestResults, _: Option<Arc<dyn Outbox>>) {
    // Steady history of 10 s; erratic history around 10 s; a short test.
    let steady = [10.0, 10.5, 9.5, 10.0, 10.2];
    let erratic = [1.0, 30.0, 2.0, 40.0, 3.0];
    for i in 0..5 {
        record(
            &r,
            &format!("old{i}"),
            "prod",
            RunPhase::Post,
            vec![
                attempt("steady", Passed, steady[i]),
                attempt("erratic", Passed, erratic[i]),
                attempt("short", Passed, 2.0),
                attempt("failing-then", if i == 4 { Failed } else { Passed }, 10.0),
            ],
        );
        // Another cluster's durations never count.
        record(
            &r,
            &format!("other{i}"),
            "staging",
            RunPhase::Post,
            vec![attempt("other-cluster", Passed, 1.0)],
        );
    }
    let slow = |name: &str, secs: f64| attempt(name, Passed, secs);
    let pre = record(
        &r,
        "u1",
        "prod",
        RunPhase::Pre,
        vec![
            slow("steady", 10.0),
            slow("erratic", 10.0),
            slow("short", 2.0),
            slow("other-cluster", 1.0),
        ],
    );
    let post = record(
        &r,
        "u1",
        "prod",
        RunPhase::Post,
        vec![
            slow("steady", 16.0),
            slow("erratic", 60.0),
            slow("short", 3.5),
            slow("other-cluster", 30.0),
        ],
    );
    let c = r.compare(&pre.run_id, &post.run_id).unwrap();
    assert_eq!(names(&c.duration_regressions), ["steady"]);
    let t = &c.duration_regressions[0];
    assert_eq!(t.duration_after, Some(16.0));
    assert_eq!(t.baseline_duration, Some(10.0));
    assert!(c.gate.passed, "slower is not a gate failure");
    let d = r
        .store()
        .passing_durations(
            "prod",
            &post.run_id,
            &[crate::model::test_id("pytest", "smoke", "tests.api", "failing-then").as_str()],
            20,
        )
        .unwrap();
    assert_eq!(
        d.values().next().unwrap().len(),
        4,
        "failing results are not passing durations"
    );
}

fn run_lookups(r: TestResults, _: Option<Arc<dyn Outbox>>) {
    let a = record(
        &r,
        "u1",
        "prod",
        RunPhase::Pre,
        vec![attempt("a", Passed, 1.0)],
    );
    let b = record(
        &r,
        "u2",
        "staging",
        RunPhase::Post,
        vec![attempt("a", Passed, 1.0)],
    );
    assert_eq!(r.run(&a.run_id).unwrap(), a);
    assert_eq!(
        r.run(&b.run_id[..b.run_id.len() - 2]).unwrap().run_id,
        b.run_id
    );
    assert!(matches!(r.run("no-such-run"), Err(Error::NotFound { .. })));
    let e = r.run(&a.run_id[..4]).unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    assert!(e.to_string().contains("give more characters"), "{e}");
    let runs = |q: RunQuery| {
        r.runs(&q)
            .unwrap()
            .into_iter()
            .map(|x| x.run_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        runs(RunQuery::default()),
        [b.run_id.clone(), a.run_id.clone()]
    );
    assert_eq!(
        runs(RunQuery {
            upgrade_id: Some("u1".into()),
            ..RunQuery::default()
        }),
        std::slice::from_ref(&a.run_id)
    );
    assert_eq!(
        runs(RunQuery {
            cluster_name: Some("staging".into()),
            ..RunQuery::default()
        }),
        std::slice::from_ref(&b.run_id)
    );
    assert!(
        runs(RunQuery {
            upgrade_id: Some("u1".into()),
            phase: Some(RunPhase::Post),
            ..RunQuery::default()
        })
        .is_empty()
    );
    assert_eq!(
        runs(RunQuery {
            limit: 1,
            ..RunQuery::default()
        }),
        std::slice::from_ref(&b.run_id)
    );
    assert!(matches!(
        r.runs(&RunQuery {
            limit: 10_001,
            ..RunQuery::default()
        }),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        r.results("no-such-run", false),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        r.store().latest_run("u2", RunPhase::Post).unwrap().unwrap(),
        b
    );
    assert!(r.store().latest_run("u2", RunPhase::Pre).unwrap().is_none());
}
