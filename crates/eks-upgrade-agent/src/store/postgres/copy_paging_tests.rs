//! A store copy through PostgreSQL in pages of 2 and 3 rows: every table spans several pages,
//! the tables with two-column keys (`task_history`, `deliveries`, `test_results`) too, so a
//! page starts after a (first, second) key on both backends. Every row arrives exactly once.

use std::sync::Arc;

use super::progress::{PostgresOptions, PostgresStore};
use crate::model::{JsonMap, RunPhase, TaskType, TestStatus};
use crate::progress::ProgressTracker;
use crate::results::{Ingest, TestResults};
use crate::store::Outbox;
use crate::store::copy::{Blobs, CopyStore, NoProgress, Row, TABLES, copy_paged};
use crate::store::domain::command::NewTask;
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::test_support::PgCluster;

/// Every row of every copied table, in key order.
fn all_rows(store: &dyn CopyStore) -> Vec<(String, Vec<Row>)> {
    let mut out = Vec::new();
    store
        .read_snapshot(&mut |src| {
            out.clear();
            for t in TABLES {
                out.push((t.name.to_owned(), src.page(t, None, 1_000_000)?));
            }
            Ok(())
        })
        .unwrap();
    out
}

/// A SQLite store where the two-column-key tables hold several rows per first key column.
fn filled(dir: &std::path::Path) -> Arc<SqliteStore> {
    let store = Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap());
    let tracker = ProgressTracker::new(store.clone());
    for (u, cluster) in [("u1", "prod"), ("u2", "staging")] {
        tracker
            .create_upgrade(u, "p", cluster, JsonMap::new())
            .unwrap();
        tracker.start_upgrade(u, None).unwrap();
        for t in ["a", "b", "c"] {
            tracker
                .add_task(u, NewTask::new(t, t, TaskType::UpgradeStep))
                .unwrap();
            tracker.start_task(u, t, None).unwrap();
            tracker.complete_task(u, t, None).unwrap();
        }
    }
    let results = TestResults::new(store.clone());
    for (u, cluster) in [("u1", "prod"), ("u2", "staging")] {
        let attempts = ["t1", "t2", "t3", "t4"]
            .into_iter()
            .map(|n| crate::results::conformance::attempt(n, TestStatus::Passed, 1.0));
        results
            .record(
                &Ingest::new(u, cluster, RunPhase::Pre),
                vec!["report.xml".into()],
                Vec::new(),
                &mut attempts.collect::<Vec<_>>().into_iter(),
            )
            .unwrap();
    }
    for sink in ["s1", "s2", "s3"] {
        store.ingest(sink, crate::notify::Kinds::All).unwrap();
    }
    store
}

#[test]
fn a_copy_in_pages_of_two_and_three_rows_moves_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = filled(&dir.path().join("a"));
    let before = all_rows(&*a);
    let count = |name: &str| {
        before
            .iter()
            .find(|(t, _)| t == name)
            .map_or(0, |(_, rows)| rows.len())
    };
    // Each two-column-key table spans several pages of 2 and of 3 rows.
    for t in ["task_history", "deliveries", "test_results"] {
        assert!(count(t) > 6, "{t}: {} rows", count(t));
    }
    let pg = PgCluster::start();
    let url = pg.create_database();
    let via = PostgresStore::open(&url, &PostgresOptions::default()).unwrap();
    let blobs = Blobs {
        from: Err("no blobs".into()),
        to: Err("no blobs".into()),
    };
    let there = copy_paged(&*a, &via, &blobs, &mut NoProgress, 2).unwrap();
    let b = SqliteStore::open(&dir.path().join("b"), &SqliteOptions::default()).unwrap();
    let back = copy_paged(&via, &b, &blobs, &mut NoProgress, 3).unwrap();
    for (name, rows) in &before {
        let n = rows.len() as u64;
        let row = |r: &crate::store::copy::CopyReport| {
            r.tables.iter().find(|(t, _)| t == name).unwrap().1
        };
        assert_eq!((row(&there), row(&back)), (n, n), "{name}");
    }
    // The same rows, each once: the keys are unique, so equal lists in key order mean that
    // no row was skipped at a page boundary nor read twice.
    let after = all_rows(&b);
    for ((name, rows), (_, got)) in before.iter().zip(&after) {
        assert_eq!(rows.len(), got.len(), "{name}");
        assert!(rows == got, "{name}: the rows differ after the round trip");
    }
}
