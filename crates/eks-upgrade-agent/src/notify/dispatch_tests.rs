//! Outbox + dispatcher tests on the real SQLite store, with in-memory and webhook sinks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::model::TaskType;
use crate::progress::{NewTask, ProgressTracker};
use crate::store::sqlite::{SqliteOptions, SqliteStore};

fn store(dir: &std::path::Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(dir, &SqliteOptions::default()).unwrap())
}

fn fast() -> DispatcherOptions {
    DispatcherOptions {
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        poll: Duration::from_millis(10),
        ..DispatcherOptions::default()
    }
}

/// Runs a small upgrade: returns the notification types it should produce, in order.
fn run_upgrade(t: &ProgressTracker, u: &str) -> Vec<String> {
    t.create_upgrade(u, "p", "prod", JsonMap::new()).unwrap();
    t.start_upgrade(u, Some("plan")).unwrap();
    t.add_tasks(
        u,
        vec![
            NewTask::new("a", "Drain", TaskType::UpgradeStep),
            NewTask::new("b", "Validate", TaskType::Validation),
        ],
    )
    .unwrap();
    t.update_task(u, "a", 10.0, None, JsonMap::new()).unwrap(); // implicit start
    t.update_task(u, "a", 50.0, None, JsonMap::new()).unwrap(); // not notified
    t.fail_task(u, "a", "PDB").unwrap();
    t.retry_task(u, "a", None).unwrap();
    t.complete_task(u, "a", None).unwrap();
    t.set_phase(u, "validate").unwrap();
    t.start_task(u, "b", None).unwrap();
    t.complete_task(u, "b", None).unwrap();
    t.complete_upgrade(u).unwrap();
    [
        "upgrade.started",
        "task.started",
        "task.failed",
        "task.retried",
        "task.completed",
        "upgrade.phase_changed",
        "task.started",
        "task.completed",
        "upgrade.completed",
    ]
    .map(String::from)
    .to_vec()
}

/// Every recorded test run writes a trace-only entry (any phase, any result, before or after
/// the upgrade's end): a sink taking every kind (as the OTLP sink does) gets one per run, in
/// order with the upgrade's notifications; the other sinks (EventBridge, webhooks, this
/// in-memory one by default) never see them, nor count them in their status.
#[test]
fn trace_only_entries_reach_only_the_sinks_that_take_them() {
    use crate::model::{CaseAttempt, NewRun, RunPhase, TestStatus};
    use crate::store::TestResultStore;
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    let record = |id: &str, phase: RunPhase, status: TestStatus| {
        let run = NewRun {
            run_id: id.into(),
            upgrade_id: "u1".into(),
            cluster_name: "prod".into(),
            phase,
            created_at: chrono::Utc::now(),
            files: vec!["r.xml".into()],
            artifact_ids: Vec::new(),
        };
        s.record_run(&run, &mut |sink| {
            sink(CaseAttempt {
                framework: "pytest".into(),
                suite: "smoke".into(),
                classname: "tests".into(),
                name: "health".into(),
                status,
                duration: 1.0,
                message: None,
                suite_window: None,
            })
        })
        .unwrap();
    };
    t.create_upgrade("u1", "p", "prod", JsonMap::new()).unwrap();
    record("pre", RunPhase::Pre, TestStatus::Passed);
    let mut expected = run_upgrade_rest(&t, "u1");
    record("post", RunPhase::Post, TestStatus::Passed);
    record("adhoc", RunPhase::Adhoc, TestStatus::Failed);
    let events = Arc::new(InMemoryEventSink::new("events"));
    let traces = Arc::new(InMemoryEventSink::new("traces").with_kinds(Kinds::All));
    let d = Dispatcher::new(s.clone(), vec![events.clone(), traces.clone()], fast());
    let status = d.status().unwrap();
    assert_eq!((status[0].total, status[0].pending), (9, 9));
    assert_eq!((status[1].total, status[1].pending), (12, 12));
    d.run_once().unwrap();
    let types = |sink: &InMemoryEventSink| -> Vec<String> {
        sink.received()
            .iter()
            .map(|n| match n.detail_type.as_str() {
                TEST_RUN_TRACE => format!("run {}", n.detail["run_id"].as_str().unwrap()),
                other => other.to_owned(),
            })
            .collect()
    };
    assert_eq!(types(&events), expected);
    expected.insert(0, "run pre".into());
    expected.extend(["run post".to_owned(), "run adhoc".to_owned()]);
    assert_eq!(types(&traces), expected);
    let status = d.status().unwrap();
    assert_eq!((status[0].delivered, status[0].pending), (9, 0));
    assert_eq!((status[1].delivered, status[1].pending), (12, 0));
    assert!(traces.received().iter().all(|n| n.upgrade_id == "u1"));
}

/// [`run_upgrade`] of an upgrade already created.
fn run_upgrade_rest(t: &ProgressTracker, u: &str) -> Vec<String> {
    t.start_upgrade(u, Some("plan")).unwrap();
    t.add_tasks(
        u,
        vec![
            NewTask::new("a", "Drain", TaskType::UpgradeStep),
            NewTask::new("b", "Validate", TaskType::Validation),
        ],
    )
    .unwrap();
    t.update_task(u, "a", 10.0, None, JsonMap::new()).unwrap();
    t.update_task(u, "a", 50.0, None, JsonMap::new()).unwrap();
    t.fail_task(u, "a", "PDB").unwrap();
    t.retry_task(u, "a", None).unwrap();
    t.complete_task(u, "a", None).unwrap();
    t.set_phase(u, "validate").unwrap();
    t.start_task(u, "b", None).unwrap();
    t.complete_task(u, "b", None).unwrap();
    t.complete_upgrade(u).unwrap();
    run_upgrade_types()
}

fn run_upgrade_types() -> Vec<String> {
    [
        "upgrade.started",
        "task.started",
        "task.failed",
        "task.retried",
        "task.completed",
        "upgrade.phase_changed",
        "task.started",
        "task.completed",
        "upgrade.completed",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn outbox_rows_are_written_with_the_change_and_delivered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    let expected = run_upgrade(&t, "u1");
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    let d = Dispatcher::new(s.clone(), vec![sink.clone()], fast());
    let status = d.status().unwrap();
    assert_eq!(
        (status[0].total, status[0].pending, status[0].delivered),
        (9, 9, 0)
    );
    let report = d.run_once().unwrap();
    assert_eq!(report.delivered, 9);
    let got = sink.received();
    assert_eq!(
        got.iter()
            .map(|n| n.detail_type.clone())
            .collect::<Vec<_>>(),
        expected
    );
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "seq order");
    let failed = &got[2];
    assert_eq!(failed.detail["task_name"], "Drain");
    assert_eq!(failed.detail["error_message"], "PDB");
    assert_eq!(failed.detail["cluster_name"], "prod");
    assert_eq!(failed.detail["event_id"], json!(failed.event_id));
    assert_eq!(failed.detail["seq"], json!(failed.seq));
    assert_eq!(got[5].detail["phase"], "validate");
    assert!(got[8].detail["duration"].as_f64().is_some());
    // Nothing more to do; a second pass sends nothing.
    assert_eq!(d.run_once().unwrap().calls, 0);
    let st = &d.status().unwrap()[0];
    assert_eq!((st.pending, st.delivered, st.dead), (0, 9, 0));
}

#[test]
fn an_outage_loses_nothing_and_does_not_block_progress() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    sink.set_rule(Some(Box::new(|_| {
        Some(EntryResult::Retry("endpoint down".into()))
    })));
    let d = Arc::new(Dispatcher::new(s.clone(), vec![sink.clone()], fast()));
    let handle = d.clone().spawn();
    let expected = run_upgrade(&t, "u1");
    std::thread::sleep(Duration::from_millis(100));
    let st = &d.status().unwrap()[0];
    assert_eq!(st.delivered, 0);
    assert_eq!(st.pending, 9);
    assert_eq!(st.last_error.as_deref(), Some("endpoint down"));
    // Endpoint back: everything arrives, in order; duplicates (if any) carry the same id.
    sink.set_rule(None);
    handle.wake();
    let report = d.flush(Duration::from_secs(5)).unwrap();
    drop(handle);
    let st = &d.status().unwrap()[0];
    assert_eq!((st.pending, st.delivered, st.dead), (0, 9, 0), "{report:?}");
    let got = sink.received();
    let mut ids: Vec<_> = got.iter().map(|n| n.event_id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 9);
    assert_eq!(
        got.iter()
            .map(|n| n.detail_type.clone())
            .collect::<Vec<_>>(),
        expected
    );
}

#[test]
fn partial_failures_resend_only_what_failed_and_dead_letter_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    run_upgrade(&t, "u1");
    run_upgrade(&t, "u2");
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    let flaky = Arc::new(Mutex::new(1u32));
    let f = flaky.clone();
    sink.set_rule(Some(Box::new(move |n: &Notification| {
        if n.upgrade_id == "u2" && n.detail_type == "task.failed" {
            return Some(EntryResult::Reject("malformed entry".into()));
        }
        if n.upgrade_id == "u1" && n.detail_type == "task.retried" {
            let mut left = f.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Some(EntryResult::Retry("ThrottlingException".into()));
            }
        }
        None
    })));
    let d = Dispatcher::new(s.clone(), vec![sink.clone()], fast());
    d.flush(Duration::from_secs(5)).unwrap();
    let st = &d.status().unwrap()[0];
    assert_eq!((st.pending, st.delivered, st.dead), (0, 17, 1));
    let got = sink.received();
    // u1's notifications end in order (a later one may have been sent early, then again).
    let u1: Vec<_> = got
        .iter()
        .filter(|n| n.upgrade_id == "u1")
        .map(|n| n.seq)
        .collect();
    let mut last_copy = u1.clone();
    last_copy.reverse();
    let mut seen = std::collections::HashSet::new();
    last_copy.retain(|s| seen.insert(*s));
    last_copy.reverse();
    assert!(last_copy.windows(2).all(|w| w[0] < w[1]), "{u1:?}");
    assert_eq!(seen.len(), 9);
    assert!(
        got.iter()
            .all(|n| !(n.upgrade_id == "u2" && n.detail_type == "task.failed"))
    );
    // Only the failed entry (and what followed it in its upgrade) was resent.
    assert!(got.len() <= 17 + 5, "{}", got.len());
}

#[test]
fn entries_out_of_attempts_or_too_large_are_dead_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    t.add_task("u", NewTask::new("a", "A", TaskType::Cleanup))
        .unwrap();
    t.fail_task("u", "a", &"x".repeat(8 * 1024)).unwrap();
    #[derive(Debug)]
    struct Small(InMemoryEventSink);
    impl EventSink for Small {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn max_batch_bytes(&self) -> usize {
            4096
        }
        fn deliver(&self, b: &[Notification]) -> Vec<EntryResult> {
            self.0.deliver(b)
        }
    }
    let small = Arc::new(Small(InMemoryEventSink::new("small")));
    let down = Arc::new(InMemoryEventSink::new("down"));
    down.set_rule(Some(Box::new(|_| {
        Some(EntryResult::Retry("connection refused".into()))
    })));
    let d = Dispatcher::new(
        s.clone(),
        vec![small.clone(), down.clone()],
        DispatcherOptions {
            max_attempts: 3,
            ..fast()
        },
    );
    d.flush(Duration::from_secs(5)).unwrap();
    let st = d.status().unwrap();
    assert_eq!(
        (st[0].delivered, st[0].dead),
        (1, 1),
        "oversize entry dead: {:?}",
        st[0]
    );
    assert!(
        st[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("accepts at most 4096")
    );
    assert_eq!(
        (st[1].delivered, st[1].dead, st[1].pending),
        (0, 2, 0),
        "{:?}",
        st[1]
    );
    assert!(
        st[1]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("gave up after 3 attempts")
    );
    // Dead entries stay in the outbox.
    assert_eq!(st[1].total, 2);
}

#[test]
fn a_new_process_delivers_what_the_old_one_left() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = store(dir.path());
        run_upgrade(&ProgressTracker::new(s), "u1");
    }
    let s = store(dir.path());
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    Dispatcher::new(s.clone(), vec![sink.clone()], fast())
        .flush(Duration::from_secs(5))
        .unwrap();
    assert_eq!(sink.received().len(), 9);
}

/// A minimal HTTP/1.1 receiver on 127.0.0.1: records (signature header, body); answers with the
/// status in `code`.
/// Requests received: (signature header, body).
type Received = Arc<Mutex<Vec<(Option<String>, Vec<u8>)>>>;

fn receiver(code: Arc<AtomicU16>) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            let mut sig = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                    if k.eq_ignore_ascii_case(webhook::SIGNATURE_HEADER) {
                        sig = Some(v.trim().to_owned());
                    }
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let status = code.load(Ordering::SeqCst);
            if status == 200 {
                g.lock().unwrap().push((sig, body));
            }
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

#[test]
fn webhook_delivers_signed_cloudevents_to_a_real_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    let code = Arc::new(AtomicU16::new(503));
    let (url, got) = receiver(code.clone());
    let sink = Arc::new(
        WebhookSink::new(
            &url,
            Some("s3cret"),
            Format::Cloudevents,
            DEFAULT_SOURCE,
            Duration::from_secs(2),
        )
        .unwrap(),
    );
    run_upgrade(&t, "u1");
    let d = Dispatcher::new(s.clone(), vec![sink], fast());
    d.run_once().unwrap();
    let st = &d.status().unwrap()[0];
    assert_eq!(st.delivered, 0);
    assert!(st.last_error.as_deref().unwrap().contains("503"), "{st:?}");
    code.store(200, Ordering::SeqCst);
    d.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(d.status().unwrap()[0].delivered, 9);
    let got = got.lock().unwrap();
    let mut types = Vec::new();
    for (sig, body) in got.iter() {
        assert_eq!(
            sig.as_deref(),
            Some(webhook::sign(b"s3cret", body).as_str())
        );
        let events: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
        for e in events {
            assert_eq!(e["specversion"], "1.0");
            assert_eq!(e["source"], "eks-upgrade-agent");
            types.push(e["type"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(types.len(), 9);
    assert_eq!(types[2], "com.eks-upgrade-agent.task.failed.v1");
    // Nothing listening: a clear retry, nothing lost.
    let dead_url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/", l.local_addr().unwrap())
    };
    let sink = Arc::new(
        WebhookSink::new(
            &dead_url,
            None,
            Format::Reference,
            DEFAULT_SOURCE,
            Duration::from_millis(500),
        )
        .unwrap(),
    );
    let d = Dispatcher::new(s.clone(), vec![sink], fast());
    d.run_once().unwrap();
    let st = &d.status().unwrap()[0];
    assert_eq!((st.delivered, st.pending), (0, 9));
}

/// Batches: never more than 10 entries, and full batches when there is enough (a check of
/// "at most 10" alone passes with 9 notifications and batches of one).
#[test]
fn batches_hold_at_most_ten_and_fill_up_to_ten() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    let tasks = (0..24)
        .map(|i| NewTask::new(format!("t{i}"), format!("T{i}"), TaskType::UpgradeStep))
        .collect();
    t.add_tasks("u", tasks).unwrap();
    for i in 0..24 {
        t.start_task("u", &format!("t{i}"), None).unwrap();
    }
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    let d = Dispatcher::new(s.clone(), vec![sink.clone()], fast());
    d.flush(Duration::from_secs(5)).unwrap();
    let calls = sink.calls();
    assert_eq!(calls.iter().sum::<usize>(), 25, "{calls:?}");
    assert!(calls.iter().all(|c| *c <= 10), "{calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == 10).count(), 2, "{calls:?}");
}

/// The 256 KB cap with entries as large as real ones get (16 KiB error messages, 256-byte
/// names), on a sink whose count limit does not bind: batches are cut by bytes, and each
/// batch's PutEvents size (Source + DetailType + Detail + Time per entry, as AWS counts it)
/// stays under 256 KiB.
#[test]
fn real_sized_entries_are_cut_by_the_256_kb_cap() {
    use crate::store::domain::command::{MAX_MESSAGE_LEN, MAX_NAME_LEN};
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    let name = "n".repeat(MAX_NAME_LEN - 4);
    let tasks = (0..40)
        .map(|i| {
            NewTask::new(
                format!("t{i}"),
                format!("{name}{i:04}"),
                TaskType::UpgradeStep,
            )
        })
        .collect();
    t.add_tasks("u", tasks).unwrap();
    let error = "e".repeat(MAX_MESSAGE_LEN);
    for i in 0..40 {
        t.fail_task("u", &format!("t{i}"), &error).unwrap();
    }
    #[derive(Debug)]
    struct Wide(InMemoryEventSink);
    impl EventSink for Wide {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn max_batch(&self) -> usize {
            1000
        }
        fn deliver(&self, b: &[Notification]) -> Vec<EntryResult> {
            self.0.deliver(b)
        }
    }
    let sink = Arc::new(Wide(InMemoryEventSink::new("wide")));
    let d = Dispatcher::new(s.clone(), vec![sink.clone()], fast());
    d.flush(Duration::from_secs(5)).unwrap();
    let got = sink.0.received();
    assert_eq!(got.len(), 41, "every notification delivered");
    let calls = sink.0.calls();
    assert!(calls.len() >= 3, "cut by bytes: {calls:?}");
    let entry = |x: &Notification| {
        DEFAULT_SOURCE.len()
            + x.detail_type.len()
            + serde_json::to_vec(&x.detail).unwrap().len()
            + 14
    };
    let largest_entry = got.iter().map(entry).max().unwrap();
    assert!(largest_entry > 16 * 1024, "real-sized: {largest_entry}");
    let mut at = 0;
    for (k, n) in calls.iter().enumerate() {
        let size: usize = got[at..at + n].iter().map(entry).sum();
        assert!(size <= 256 * 1024, "batch of {n} is {size} bytes");
        // Not cut needlessly early: every batch but the last is within two entries of full.
        if k + 1 < calls.len() {
            assert!(
                size > 256 * 1024 - 2 * largest_entry,
                "batch {k}: {size} of {calls:?}"
            );
        }
        at += n;
    }
}

/// "An outage never slows the progress call": with one sink refusing connections and one that
/// accepts and never answers (5 s timeout, longer than the bound below), both delivering in the background the whole time,
/// every notified progress call (start, complete) returns well within a bound a blocked call
/// could not meet.
#[test]
fn sinks_that_are_down_or_hang_never_slow_a_progress_call() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    // Accepts connections and never answers.
    let hang = TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_url = format!("http://{}/hook", hang.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let hanging = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (h, still) = (held.clone(), hanging.clone());
    std::thread::spawn(move || {
        for stream in hang.incoming().flatten() {
            if still.load(Ordering::SeqCst) {
                h.lock().unwrap().push(stream);
            }
        }
    });
    let refused_url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let sink = |url: &str| -> Arc<dyn EventSink> {
        Arc::new(
            WebhookSink::new(
                url,
                None,
                Format::Reference,
                DEFAULT_SOURCE,
                Duration::from_secs(30),
            )
            .unwrap(),
        )
    };
    let d = Arc::new(Dispatcher::new(
        s.clone(),
        vec![sink(&hang_url), sink(&refused_url)],
        fast(),
    ));
    let handle = d.clone().spawn();
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    let tasks = (0..200)
        .map(|i| NewTask::new(format!("t{i}"), format!("T{i}"), TaskType::UpgradeStep))
        .collect();
    t.add_tasks("u", tasks).unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let id = format!("t{i}");
        for call in 0..2 {
            let started = std::time::Instant::now();
            if call == 0 {
                t.start_task("u", &id, None).unwrap();
            } else {
                t.complete_task("u", &id, None).unwrap();
            }
            slowest = slowest.max(started.elapsed());
        }
    }
    // The hanging sink really held a delivery open, the other really failed.
    assert!(
        !held.lock().unwrap().is_empty(),
        "the hanging sink was called"
    );
    let status = d.status().unwrap();
    assert!(
        status.iter().all(|s| s.delivered == 0 && s.pending > 0),
        "{status:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a progress call took {slowest:?} while sinks were down"
    );
    // Let the background pass end quickly: close what the sink holds, hang no more.
    hanging.store(false, Ordering::SeqCst);
    held.lock().unwrap().clear();
    drop(handle);
}

/// "One delivery pass runs at a time per process": passes started together from several
/// threads (a background pass and a `flush`, say) never call the sink at the same time, and
/// so never send an entry twice.
#[test]
fn one_delivery_pass_at_a_time() {
    use std::sync::atomic::AtomicUsize;
    #[derive(Debug)]
    struct Slow {
        inner: InMemoryEventSink,
        now: AtomicUsize,
        most: AtomicUsize,
    }
    impl EventSink for Slow {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn deliver(&self, b: &[Notification]) -> Vec<EntryResult> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.deliver(b)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    for u in ["u1", "u2", "u3"] {
        run_upgrade(&t, u);
    }
    let sink = Arc::new(Slow {
        inner: InMemoryEventSink::new("slow"),
        now: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
    });
    let d = Arc::new(Dispatcher::new(s.clone(), vec![sink.clone()], fast()));
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let passes: Vec<_> = (0..4)
        .map(|_| {
            let (d, barrier) = (d.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                d.run_once().unwrap()
            })
        })
        .collect();
    for p in passes {
        p.join().unwrap();
    }
    assert_eq!(
        sink.most.load(Ordering::SeqCst),
        1,
        "two passes called the sink at once"
    );
    let got = sink.inner.received();
    let mut ids: Vec<_> = got.iter().map(|n| n.event_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((got.len(), ids.len()), (27, 27), "each entry sent once");
}

/// README "Notifications": the types are exactly the reference seven plus `task.paused`,
/// `task.cancelled` and `task.retried`; percentage updates are not notified. README "Using it":
/// a parent's derived change is an event of its own, so callbacks and notifications see it.
#[test]
fn pauses_cancels_and_derived_parent_changes_are_notified() {
    use crate::model::EventKind;
    let mut types: Vec<&str> = EventKind::ALL
        .iter()
        .flat_map(|k| {
            [ProgressStatus::NotStarted, ProgressStatus::InProgress]
                .map(|from| detail_type(*k, Some(from)))
        })
        .flatten()
        .collect();
    types.sort_unstable();
    types.dedup();
    assert_eq!(
        types,
        [
            "task.cancelled",
            "task.completed",
            "task.failed",
            "task.paused",
            "task.retried",
            "task.started",
            "upgrade.completed",
            "upgrade.failed",
            "upgrade.phase_changed",
            "upgrade.started",
        ]
    );

    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let (e, c) = (seen.clone(), changes.clone());
    t.on_event(move |ev| {
        e.lock()
            .unwrap()
            .push((ev.task_id.clone(), ev.kind, ev.message.clone()));
    });
    t.on_status_change(move |ch| {
        c.lock().unwrap().push((ch.task_id.clone(), ch.from, ch.to));
    });
    t.create_upgrade("u", "p", "c", JsonMap::new()).unwrap();
    t.start_upgrade("u", None).unwrap();
    t.add_tasks(
        "u",
        vec![
            NewTask::new("a", "A", TaskType::UpgradeStep),
            NewTask::new("p", "Node groups", TaskType::UpgradeStep),
            NewTask::new("c1", "ng-1", TaskType::UpgradeStep).parent("p"),
            NewTask::new("c2", "ng-2", TaskType::UpgradeStep).parent("p"),
        ],
    )
    .unwrap();
    t.start_task("u", "a", None).unwrap();
    t.pause_task("u", "a", None).unwrap();
    t.resume_task("u", "a", None).unwrap();
    t.update_task("u", "a", 40.0, None, JsonMap::new()).unwrap();
    t.cancel_task("u", "a", None).unwrap();
    t.start_task("u", "c1", None).unwrap();
    t.fail_task("u", "c1", "disk full").unwrap();

    let sink = Arc::new(InMemoryEventSink::new("mem"));
    let d = Dispatcher::new(s.clone(), vec![sink.clone()], fast());
    d.flush(Duration::from_secs(5)).unwrap();
    let got: Vec<(Option<String>, String)> = sink
        .received()
        .iter()
        .map(|n| {
            (
                n.detail
                    .get("task_id")
                    .and_then(|v| v.as_str())
                    .map(String::from),
                n.detail_type.clone(),
            )
        })
        .collect();
    let some = |t: &str, k: &str| (Some(t.to_owned()), k.to_owned());
    assert_eq!(
        got,
        [
            (None, "upgrade.started".to_owned()),
            some("a", "task.started"),
            some("a", "task.paused"),
            some("a", "task.cancelled"),
            some("c1", "task.started"),
            some("p", "task.started"),
            some("c1", "task.failed"),
            some("p", "task.failed"),
        ]
    );
    let failed = sink.received().pop().unwrap();
    assert_eq!(
        failed.detail["error_message"],
        "subtask \"c1\" failed: disk full"
    );
    // The in-process callbacks see the parent's own event and status change too.
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|(t, k, _)| t.as_deref() == Some("p") && *k == EventKind::TaskFailed),
        "{:?}",
        seen.lock().unwrap()
    );
    assert!(
        changes.lock().unwrap().contains(&(
            Some("p".into()),
            ProgressStatus::InProgress,
            ProgressStatus::Failed
        )),
        "{:?}",
        changes.lock().unwrap()
    );
}

/// README "Notifications": an entry that keeps failing is dead after 24 h even with attempts
/// left, and by default after 25 attempts.
#[test]
fn entries_failing_for_a_day_are_dead_and_the_default_is_25_attempts() {
    let defaults = DispatcherOptions::default();
    assert_eq!(defaults.max_attempts, 25);
    assert_eq!(defaults.max_age, Duration::from_secs(24 * 3600));

    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    for u in ["old", "recent", "young"] {
        t.create_upgrade(u, "p", "c", JsonMap::new()).unwrap();
        t.start_upgrade(u, None).unwrap();
    }
    // Backdate the changes: 25 h for "old", 23 h for "recent".
    for (u, hours) in [("old", 25), ("recent", 23)] {
        let back = chrono::Duration::hours(hours).num_microseconds().unwrap();
        s.write(|tx| {
            tx.execute(
                "UPDATE notifications SET time = time - ?2 WHERE upgrade_id = ?1",
                rusqlite::params![u, back],
            )?;
            Ok(())
        })
        .unwrap();
    }
    let down = Arc::new(InMemoryEventSink::new("down"));
    down.set_rule(Some(Box::new(|_| {
        Some(EntryResult::Retry("connection refused".into()))
    })));
    let d = Dispatcher::new(
        s.clone(),
        vec![down.clone()],
        DispatcherOptions {
            base_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
            ..DispatcherOptions::default()
        },
    );
    let report = d.run_once().unwrap();
    assert_eq!((report.dead, report.retried), (1, 2), "{report:?}");
    let st = &d.status().unwrap()[0];
    assert_eq!((st.total, st.dead, st.pending), (3, 1, 2), "{st:?}");
}

/// README "Notifications": failed entries are resent after a capped exponential backoff with
/// jitter: each delay lies in [50%, 100%] of `base * 2^attempts`, never above the cap, and
/// draws differ.
#[test]
fn the_retry_delay_grows_exponentially_up_to_the_cap_with_jitter() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::new(
        store(dir.path()),
        Vec::new(),
        DispatcherOptions {
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
            ..DispatcherOptions::default()
        },
    );
    for attempts in 0..30u32 {
        let full = Duration::from_millis(500)
            .saturating_mul(1 << attempts.min(20))
            .min(Duration::from_secs(300));
        for _ in 0..20 {
            let delay = d.backoff(attempts);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempts}: {delay:?} not within [{:?}, {full:?}]",
                full / 2
            );
        }
    }
    // Exponential: attempt 4 waits at least twice as long as attempt 2 can.
    assert!(d.backoff(4) >= d.backoff(2).max(Duration::from_secs(2)));
    // Capped: far attempts never exceed the cap (and never overflow).
    assert!(d.backoff(u32::MAX) <= Duration::from_secs(300));
    // Jitter: draws differ.
    let draws: std::collections::HashSet<Duration> = (0..100).map(|_| d.backoff(3)).collect();
    assert!(draws.len() > 20, "{} distinct delays of 100", draws.len());
}

/// `finish` (a graceful stop): the thread makes one more pass for what the last changes
/// committed, and is waited for; entries committed while it slept are delivered before
/// `finish` returns.
#[test]
fn finish_delivers_what_the_last_changes_committed() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let t = ProgressTracker::new(s.clone());
    let sink = Arc::new(InMemoryEventSink::new("mem"));
    let slow_poll = DispatcherOptions {
        poll: Duration::from_secs(60),
        ..fast()
    };
    let d = Arc::new(Dispatcher::new(s.clone(), vec![sink.clone()], slow_poll));
    let handle = Arc::clone(&d).spawn();
    // The thread's first pass (nothing to do) has ended; it then sleeps for a minute.
    assert!(d.wait_for_passes(1, Duration::from_secs(30)));
    t.create_upgrade("u1", "p", "prod", JsonMap::new()).unwrap();
    t.start_upgrade("u1", None).unwrap();
    assert!(sink.received().is_empty());
    assert!(handle.finish(Duration::from_secs(10)));
    let got: Vec<String> = sink
        .received()
        .iter()
        .map(|n| n.detail_type.clone())
        .collect();
    assert_eq!(got, ["upgrade.started"]);
    // Delivered by the last pass of `finish`, not by a second pass of the loop.
    assert!(!d.wait_for_passes(2, Duration::ZERO), "a second pass ran");
}
