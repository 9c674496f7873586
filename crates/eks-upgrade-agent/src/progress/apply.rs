//! The `progress apply` engine: JSON Lines [`Command`]s in, one acknowledgement line out per
//! input line, written only after the command is durably committed.
//!
//! Lines that are already buffered when a line arrives are committed together in one
//! transaction (group commit, up to [`ApplyOptions::max_batch`]); the engine never waits for more
//! input while it holds unacknowledged lines, so a writer that sends one line and waits for its
//! acknowledgement gets it at once.
//!
//! Acknowledgements: `{"ok":true,"seq":N}` (the seq of the last event the line appended) or
//! `{"ok":false,"line":L,"code":"...","error":"..."}`; a bad line never stops the stream. With
//! [`ApplyOptions::ack_events`], a success also carries what the line committed:
//! `{"ok":true,"seq":N,"events":[...],"status_changes":[...]}` (the drop-in Python package
//! returns those events and runs its callbacks on them).
//!
//! A line may carry an `"id"` (any JSON value) beside its command's fields; its acknowledgement
//! then carries the same `"id"`, so a writer matches answers to requests instead of assuming
//! their order (an interrupted writer can tell a late answer from the one it waits for).

use std::io::{BufRead, BufReader, Read, Write};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::progress::tracker::ProgressTracker;
use crate::store::domain::command::Command;

/// Longest accepted input line, in bytes.
pub const MAX_LINE: usize = 1024 * 1024;

/// Tuning for [`run`].
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Most lines committed in one transaction.
    pub max_batch: usize,
    /// Acknowledge each success with the events and status changes it committed.
    pub ack_events: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_batch: 1024,
            ack_events: false,
        }
    }
}

/// Totals of one [`run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Non-blank lines read.
    pub lines: u64,
    /// Lines committed.
    pub ok: u64,
    /// Lines rejected.
    pub failed: u64,
}

enum Line {
    Command(u64, Option<Value>, Box<Command>),
    Bad(u64, Option<Value>, Error),
}

/// Splits the optional `"id"` off a request line; the rest is the request itself.
/// Lines without an `"id"` are parsed once, as before.
pub fn split_id(text: &str) -> std::result::Result<(Option<Value>, Value), serde_json::Error> {
    let mut v: Value = serde_json::from_str(text)?;
    let id = v.as_object_mut().and_then(|m| m.remove("id"));
    Ok((id, v))
}

/// Reads commands from `input` until end of input and acknowledges each on `output`.
/// Returns `Err` only when writing to `output` fails.
pub fn run<R: Read, W: Write>(
    tracker: &ProgressTracker,
    input: R,
    mut output: W,
    options: &ApplyOptions,
) -> Result<ApplyStats> {
    let mut input = BufReader::with_capacity(256 * 1024, input);
    let mut stats = ApplyStats::default();
    let mut line_no = 0u64;
    let mut buf = Vec::with_capacity(1024);
    let mut batch: Vec<Line> = Vec::new();
    loop {
        // Block for the first line, then take only what is already buffered.
        let Some(first) = read_line(&mut input, &mut buf, &mut line_no)? else {
            break;
        };
        batch.extend(first);
        while batch.len() < options.max_batch && input.buffer().contains(&b'\n') {
            match read_line(&mut input, &mut buf, &mut line_no)? {
                Some(line) => batch.extend(line),
                None => break,
            }
        }
        commit(tracker, &mut batch, &mut output, &mut stats, options)?;
    }
    commit(tracker, &mut batch, &mut output, &mut stats, options)?;
    Ok(stats)
}

/// Reads one line; `Ok(None)` at end of input, `Ok(Some(None))` for a blank line.
fn read_line<R: Read>(
    input: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    line_no: &mut u64,
) -> Result<Option<Option<Line>>> {
    buf.clear();
    let n = input
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    *line_no += 1;
    let no = *line_no;
    if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
        // Skip the rest of the oversize line.
        loop {
            let available = input.fill_buf()?;
            if available.is_empty() {
                break;
            }
            match available.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    input.consume(i + 1);
                    break;
                }
                None => {
                    let len = available.len();
                    input.consume(len);
                }
            }
        }
        return Ok(Some(Some(Line::Bad(
            no,
            None,
            Error::invalid(format!("line is longer than {MAX_LINE} bytes")),
        ))));
    }
    let text = match std::str::from_utf8(buf) {
        Ok(t) => t.trim(),
        Err(_) => {
            return Ok(Some(Some(Line::Bad(
                no,
                None,
                Error::invalid("line is not valid UTF-8"),
            ))));
        }
    };
    if text.is_empty() {
        return Ok(Some(None));
    }
    if !text.contains("\"id\"") {
        return Ok(Some(Some(match serde_json::from_str::<Command>(text) {
            Ok(c) => Line::Command(no, None, Box::new(c)),
            Err(e) => Line::Bad(no, None, Error::invalid(format!("malformed command: {e}"))),
        })));
    }
    Ok(Some(Some(match split_id(text) {
        Err(e) => Line::Bad(no, None, Error::invalid(format!("malformed command: {e}"))),
        Ok((id, v)) => match serde_json::from_value::<Command>(v) {
            Ok(c) => Line::Command(no, id, Box::new(c)),
            Err(e) => Line::Bad(no, id, Error::invalid(format!("malformed command: {e}"))),
        },
    })))
}

fn commit<W: Write>(
    tracker: &ProgressTracker,
    batch: &mut Vec<Line>,
    output: &mut W,
    stats: &mut ApplyStats,
    options: &ApplyOptions,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let commands: Vec<Command> = batch
        .iter()
        .filter_map(|l| match l {
            Line::Command(_, _, c) => Some((**c).clone()),
            Line::Bad(..) => None,
        })
        .collect();
    let mut results = match tracker.execute_batch(&commands) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "apply batch failed; nothing in it was committed");
            let msg = e.to_string();
            commands
                .iter()
                .map(|_| {
                    Err(Error::Backend {
                        message: msg.clone(),
                        source: None,
                    })
                })
                .collect::<Vec<_>>()
        }
    }
    .into_iter();
    let mut out = Vec::with_capacity(batch.len() * 24);
    for line in batch.drain(..) {
        stats.lines += 1;
        let ack = match line {
            Line::Command(no, id, _) => match results.next().expect("one result per command") {
                Ok(committed) => {
                    stats.ok += 1;
                    out.extend_from_slice(b"{\"ok\":true,");
                    if let Some(id) = &id {
                        out.extend_from_slice(b"\"id\":");
                        serde_json::to_writer(&mut out, id)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        out.push(b',');
                    }
                    out.extend_from_slice(b"\"seq\":");
                    out.extend_from_slice(committed.last_seq().to_string().as_bytes());
                    if options.ack_events {
                        out.extend_from_slice(b",\"events\":");
                        serde_json::to_writer(&mut out, &committed.events)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        out.extend_from_slice(b",\"status_changes\":");
                        serde_json::to_writer(&mut out, &committed.status_changes)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                    }
                    out.extend_from_slice(b"}\n");
                    continue;
                }
                Err(e) => (no, id, e),
            },
            Line::Bad(no, id, e) => (no, id, e),
        };
        stats.failed += 1;
        let (no, id, e) = ack;
        let mut v = json!({"ok": false, "line": no, "code": e.code(), "error": e.to_string()});
        if let Some(id) = id {
            v["id"] = id;
        }
        serde_json::to_writer(&mut out, &v).map_err(|e| Error::invalid(e.to_string()))?;
        out.push(b'\n');
    }
    output.write_all(&out)?;
    output.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::{ProgressEvent, Task, Upgrade};
    use crate::store::{Committed, EventQuery, ProgressStore, SqliteStore};

    /// A SQLite store that counts the transactions `execute` runs and their sizes.
    #[derive(Debug)]
    struct Counting {
        inner: SqliteStore,
        calls: AtomicUsize,
        largest: AtomicUsize,
    }

    impl ProgressStore for Counting {
        fn execute(&self, commands: &[Command]) -> Result<Vec<Result<Committed>>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.largest.fetch_max(commands.len(), Ordering::SeqCst);
            self.inner.execute(commands)
        }
        fn import(&self, u: &Upgrade, t: &[Task], e: &[ProgressEvent]) -> Result<u64> {
            self.inner.import(u, t, e)
        }
        fn upgrade(&self, id: &str) -> Result<Upgrade> {
            self.inner.upgrade(id)
        }
        fn upgrades_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Upgrade>> {
            self.inner.upgrades_page(after, limit)
        }
        fn tasks_page(&self, u: &str, after: Option<&str>, limit: usize) -> Result<Vec<Task>> {
            self.inner.tasks_page(u, after, limit)
        }
        fn task(&self, u: &str, t: &str) -> Result<Task> {
            self.inner.task(u, t)
        }
        fn recent_task_events(&self, u: &str, t: &str, n: usize) -> Result<Vec<ProgressEvent>> {
            self.inner.recent_task_events(u, t, n)
        }
        fn events(&self, q: &EventQuery) -> Result<Vec<ProgressEvent>> {
            self.inner.events(q)
        }
        fn latest_events(&self, u: &str, n: usize) -> Result<Vec<ProgressEvent>> {
            self.inner.latest_events(u, n)
        }
        fn last_seq(&self) -> Result<u64> {
            self.inner.last_seq()
        }
    }

    /// "`apply` commits the lines already waiting together": 2,000 buffered lines take a few
    /// transactions of up to `max_batch` lines, not 2,000; with `max_batch` 1, one each. Every
    /// line is still acknowledged once.
    #[test]
    fn buffered_lines_share_a_transaction() {
        for (max_batch, most_calls, largest) in [(1024, 4, 1024), (1, 2002, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Counting {
                inner: SqliteStore::open(dir.path(), &Default::default()).unwrap(),
                calls: AtomicUsize::new(0),
                largest: AtomicUsize::new(0),
            });
            let t = ProgressTracker::new(store.clone());
            let mut input = String::from(
                "{\"op\":\"upgrade.create\",\"upgrade_id\":\"u\",\"plan_id\":\"p\",\"cluster_name\":\"c\"}\n\
                 {\"op\":\"task.add\",\"upgrade_id\":\"u\",\"task_id\":\"t\",\"name\":\"T\",\"task_type\":\"cleanup\"}\n",
            );
            for i in 0..2000 {
                input.push_str(&format!(
                    "{{\"op\":\"task.update\",\"upgrade_id\":\"u\",\"task_id\":\"t\",\"percentage\":{}}}\n",
                    i % 100
                ));
            }
            let mut out = Vec::new();
            let stats = run(
                &t,
                input.as_bytes(),
                &mut out,
                &ApplyOptions {
                    max_batch,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!((stats.lines, stats.ok), (2002, 2002));
            assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2002);
            let calls = store.calls.load(Ordering::SeqCst);
            assert!(
                calls <= most_calls,
                "max_batch {max_batch}: {calls} transactions"
            );
            assert_eq!(
                store.largest.load(Ordering::SeqCst),
                largest,
                "max_batch {max_batch}"
            );
        }
    }
}
