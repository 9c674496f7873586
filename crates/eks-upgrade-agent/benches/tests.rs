//! `cargo bench -p eks-upgrade-agent --bench tests`
//!
//! Prints one figure per line (issue #12):
//! - `tests_ingest_ms cases=10000`: one JUnit file of 10,000 cases ingested end to end (checked,
//!   kept as a `test_result` artifact, read back and recorded), median of 5;
//! - `tests_compare_ms cases=10000`: a post run of 10,000 cases against its pre run (results of
//!   both, the flaky set and the earlier durations of the slow tests), median of 5;
//! - `tests_history_ms results=1000000`: one test's history on a cluster (limit 100) in a store
//!   of 100 runs × 10,000 results, median of 50;
//! - `tests_flaky_ms results=1000000`: the flaky tests of a cluster over 14 days in that store,
//!   median of 20.
//!
//! The peak RSS of a 50 MB ingest is asserted (≤ 64 MiB) and printed by the CLI's integration
//! test `tests_results::a_50_mb_report_ingests_in_flat_memory`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use eks_upgrade_agent::TestArtifactsManager;
use eks_upgrade_agent::artifacts::ArtifactsOptions;
use eks_upgrade_agent::blob::LocalBlobStore;
use eks_upgrade_agent::model::{CaseAttempt, RunPhase, TestStatus};
use eks_upgrade_agent::results::{Ingest, KeepFiles, TestResults};
use eks_upgrade_agent::store::Durability;
use eks_upgrade_agent::store::sqlite::{SqliteOptions, SqliteStore};

const CASES: usize = 10_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn junit(run: usize) -> String {
    let mut x = String::from("<?xml version=\"1.0\"?>\n<testsuites>\n");
    for s in 0..10 {
        x.push_str(&format!("<testsuite name=\"suite-{s}\">\n"));
        for i in 0..CASES / 10 {
            if (i + run).is_multiple_of(97) {
                x.push_str(&format!(
                    "<testcase classname=\"pkg.Class{}\" name=\"test_{i}\" time=\"0.5\">\
                     <failure message=\"assertion {i} failed\">trace</failure></testcase>\n",
                    i % 50
                ));
            } else {
                x.push_str(&format!(
                    "<testcase classname=\"pkg.Class{}\" name=\"test_{i}\" time=\"{}\"/>\n",
                    i % 50,
                    if i % 100 == 0 { 8.0 } else { 0.5 }
                ));
            }
        }
        x.push_str("</testsuite>\n");
    }
    x + "</testsuites>\n"
}

fn attempts(run: usize) -> impl Iterator<Item = CaseAttempt> {
    (0..CASES).map(move |i| CaseAttempt {
        framework: "pytest".into(),
        suite: format!("suite-{}", i % 10),
        classname: format!("pkg.Class{}", i % 50),
        name: format!("test_{i}"),
        status: if (i + run).is_multiple_of(97) {
            TestStatus::Failed
        } else {
            TestStatus::Passed
        },
        duration: 0.5,
        message: ((i + run).is_multiple_of(97)).then(|| format!("assertion {i} failed")),
        suite_window: None,
    })
}

fn open(dir: &Path) -> (Arc<SqliteStore>, TestArtifactsManager) {
    let store = Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap());
    let blobs = Arc::new(LocalBlobStore::open(&dir.join("blobs"), Durability::default()).unwrap());
    let m = TestArtifactsManager::new(store.clone(), blobs, ArtifactsOptions::default());
    (store, m)
}

fn main() {
    // Ingest and compare on a fresh store.
    let dir = tempfile::tempdir().unwrap();
    let (store, m) = open(dir.path());
    let r = TestResults::new(store.clone());
    let mut ingest_ms = Vec::new();
    let mut runs = Vec::new();
    for i in 0..5 {
        let file = dir.path().join(format!("report-{i}.xml"));
        std::fs::write(&file, junit(i)).unwrap();
        let phase = if i % 2 == 0 {
            RunPhase::Pre
        } else {
            RunPhase::Post
        };
        let t = Instant::now();
        let run = r
            .ingest(
                &[file],
                &Ingest::new("u1", "prod", phase),
                Some(KeepFiles {
                    artifacts: &m,
                    session_id: None,
                    collection_id: None,
                    options: None,
                }),
            )
            .unwrap();
        ingest_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(run.counts.tests, CASES as u64);
        runs.push(run.run_id);
    }
    println!("tests_ingest_ms cases=10000: {:.1}", median(ingest_ms));
    let mut compare_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let c = r.compare(&runs[3], &runs[4]).unwrap();
        compare_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(!c.new_failures.is_empty());
    }
    println!("tests_compare_ms cases=10000: {:.1}", median(compare_ms));
    drop((r, m, store));

    // History and flaky in a store of 1,000,000 results.
    let dir = tempfile::tempdir().unwrap();
    let (store, _m) = open(dir.path());
    let r = TestResults::new(store);
    let t = Instant::now();
    for run in 0..100 {
        let cluster = if run % 2 == 0 { "prod" } else { "staging" };
        r.record(
            &Ingest::new(&format!("u{run}"), cluster, RunPhase::Adhoc),
            vec![],
            vec![],
            &mut attempts(run),
        )
        .unwrap();
    }
    eprintln!(
        "(grew the store to 1,000,000 results in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let mut history_ms = Vec::new();
    for i in 0..50 {
        let name = format!("test_{}", i * 37);
        let t = Instant::now();
        let h = r.history(&name, Some("prod"), 100).unwrap();
        history_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(h.len(), 50);
    }
    println!(
        "tests_history_ms results=1000000: {:.2}",
        median(history_ms)
    );
    let mut flaky_ms = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let f = r.flaky(Some("prod"), Some(14)).unwrap();
        flaky_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(!f.is_empty());
    }
    println!("tests_flaky_ms results=1000000: {:.1}", median(flaky_ms));
}
