//! The store protocol: `RemoteStore` (the library's `ProgressStore` over HTTP) against a real
//! server on 127.0.0.1 passes the same conformance suite as the SQLite store, and keeps the
//! server's streams and tokens in play.

use std::sync::{Arc, Mutex};

use eks_upgrade_agent::ProgressTracker;
use eks_upgrade_agent::store::ProgressStore;
use eks_upgrade_agent::store::remote::RemoteStore;
use eks_upgrade_agent_server::{AppState, Auth};

use crate::util::state;

fn serve_on(runtime: &tokio::runtime::Runtime, s: AppState) -> String {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(eks_upgrade_agent_server::serve(
        listener,
        s,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

#[test]
fn remote_store_passes_the_conformance_suite() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dirs = Mutex::new(Vec::new());
    // The store protocol leaves `Committed::task` out (answers as small as the events).
    let expect = eks_upgrade_agent::conformance::Expect {
        committed_task: false,
    };
    eks_upgrade_agent::conformance::run_with(
        &|| {
            let dir = tempfile::tempdir().unwrap();
            let url = serve_on(&runtime, state(dir.path()));
            dirs.lock().unwrap().push(dir);
            Box::new(RemoteStore::new(&url, None).unwrap())
        },
        expect,
    );
}

#[test]
fn remote_writes_reach_the_servers_state_and_tokens_apply() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let auth = Auth::from_specs(&[
        "remote-read-token-0001:read",
        "remote-write-token-0001:write",
    ])
    .unwrap();
    let s = state(dir.path()).with_auth(auth);
    let server_tracker = Arc::clone(&s.tracker);
    let url = serve_on(&runtime, s);

    let writer = ProgressTracker::new(Arc::new(
        RemoteStore::new(&url, Some("remote-write-token-0001")).unwrap(),
    ));
    crate::util::seed(&writer, "u1");
    writer
        .update_task("u1", "a", 30.0, Some("over HTTP"), Default::default())
        .unwrap();
    let task = server_tracker.task_detail("u1", "a").unwrap().task;
    assert_eq!(
        (task.percentage, task.last_message.as_deref()),
        (30.0, Some("over HTTP"))
    );

    // A read token reads but cannot write; no token cannot even read.
    let reader = RemoteStore::new(&url, Some("remote-read-token-0001")).unwrap();
    assert_eq!(reader.upgrade("u1").unwrap().cluster_name, "prod");
    let e = ProgressTracker::new(Arc::new(reader))
        .update_task("u1", "a", 40.0, None, Default::default())
        .unwrap_err();
    assert!(e.to_string().contains("may only read"), "{e}");
    let e = RemoteStore::new(&url, None)
        .unwrap()
        .last_seq()
        .unwrap_err();
    assert!(e.to_string().contains("missing token"), "{e}");
    // The library's errors come back as themselves.
    let e = writer.complete_task("u1", "nope", None).unwrap_err();
    assert!(
        matches!(e, eks_upgrade_agent::Error::NotFound { .. }),
        "{e:?}"
    );
    assert_eq!(
        server_tracker
            .task_detail("u1", "a")
            .unwrap()
            .task
            .percentage,
        30.0,
        "refused writes changed nothing"
    );
}

/// The server takes at most 4 MiB per `execute`: `RemoteStore` sends a larger batch in groups
/// below it (each command commits on its own either way), so nothing a local store accepts is
/// refused remotely for its batch size.
#[test]
fn a_batch_larger_than_one_request_is_split() {
    use eks_upgrade_agent::progress::Command;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let server_tracker = Arc::clone(&s.tracker);
    let url = serve_on(&runtime, s);
    let remote = RemoteStore::new(&url, None).unwrap();
    let writer = ProgressTracker::new(Arc::new(remote));
    crate::util::seed(&writer, "u1");
    // 100 updates with 60 KB of details each: about 6 MB in all.
    let details: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({"log": "x".repeat(60_000)})).unwrap();
    let cmds: Vec<Command> = (0..100)
        .map(|i| Command::TaskUpdate {
            upgrade_id: "u1".into(),
            task_id: "a".into(),
            percentage: f64::from(i) / 2.0,
            message: None,
            details: details.clone(),
        })
        .collect();
    let results = writer.execute_batch(&cmds).unwrap();
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let seqs: Vec<u64> = results
        .iter()
        .map(|r| r.as_ref().unwrap().last_seq())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert_eq!(
        server_tracker
            .task_detail("u1", "a")
            .unwrap()
            .task
            .percentage,
        49.5
    );
}

/// An import larger than the server takes (16 MiB) is refused by `RemoteStore` before sending,
/// saying what to do instead; the server is unchanged.
#[test]
fn an_import_larger_than_the_server_takes_says_what_to_do() {
    use eks_upgrade_agent::store::EventQuery;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path());
    let server_tracker = Arc::clone(&s.tracker);
    let url = serve_on(&runtime, s);
    // A local upgrade with about 18 MB of events.
    let local_dir = tempfile::tempdir().unwrap();
    let local = crate::util::tracker(local_dir.path());
    crate::util::seed(&local, "big");
    let details: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({"log": "x".repeat(60_000)})).unwrap();
    for i in 0..300 {
        local
            .update_task("big", "a", f64::from(i) / 4.0, None, details.clone())
            .unwrap();
    }
    let store = local.store();
    let events = store
        .events(&EventQuery {
            upgrade_id: Some("big".into()),
            since: 0,
            limit: usize::MAX,
        })
        .unwrap();
    let remote = RemoteStore::new(&url, None).unwrap();
    let e = remote
        .import(
            &store.upgrade("big").unwrap(),
            &store.tasks("big").unwrap(),
            &events,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("at most 16777216 bytes")
            && e.to_string().contains("server's machine"),
        "{e}"
    );
    assert!(server_tracker.list_upgrades().unwrap().is_empty());
}
