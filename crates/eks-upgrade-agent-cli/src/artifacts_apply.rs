//! `artifacts apply`: artifact operations as JSON Lines, for programs that add many artifacts
//! (the drop-in Python package) without a process per call. One request per input line, one
//! acknowledgement per line on stdout once the operation is done (and, for a change, durable):
//! `{"ok":true,"result":...}` or `{"ok":false,"line":L,"code":"...","error":"..."}`. A bad line
//! never stops the stream. Works on a data dir or, with `--server`, on a server. A request may
//! carry an `"id"` (any JSON value); its acknowledgement carries the same `"id"`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

use eks_upgrade_agent::artifacts::{AddOptions, NewSession};
use eks_upgrade_agent::model::{ArtifactQuery, ArtifactType, JsonMap};
use eks_upgrade_agent::{Error, Result};

use crate::remote_artifacts::Artifacts;

/// Longest accepted input line, in bytes.
const MAX_LINE: usize = 1024 * 1024;

/// One request line, tagged by `op`.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
enum Request {
    #[serde(rename = "session.create")]
    SessionCreate {
        upgrade_id: String,
        cluster_name: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        retention_days: Option<u32>,
    },
    #[serde(rename = "session.complete")]
    SessionComplete { session_id: String },
    /// The session summary (reference fields) with its collections.
    #[serde(rename = "session.get")]
    SessionGet { session_id: String },
    #[serde(rename = "session.list")]
    SessionList {
        #[serde(default)]
        upgrade_id: Option<String>,
    },
    #[serde(rename = "collection.create")]
    CollectionCreate {
        session_id: String,
        name: String,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        task_id: Option<String>,
    },
    #[serde(rename = "artifact.add")]
    ArtifactAdd {
        session_id: String,
        collection_id: String,
        /// A file (or a directory: every regular file under it).
        path: PathBuf,
        #[serde(default)]
        artifact_type: Option<ArtifactType>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        task_id: Option<String>,
        #[serde(default)]
        step_id: Option<String>,
        #[serde(default)]
        metadata: JsonMap,
    },
    #[serde(rename = "artifact.get")]
    ArtifactGet { artifact_id: String },
    /// One page: `{"artifacts":[...],"next_cursor":...}`.
    #[serde(rename = "artifact.search")]
    ArtifactSearch {
        #[serde(flatten)]
        query: ArtifactQuery,
    },
    #[serde(rename = "stats")]
    Stats {
        #[serde(default)]
        session_id: Option<String>,
    },
}

fn run_one(m: &dyn Artifacts, request: Request) -> Result<Value> {
    Ok(match request {
        Request::SessionCreate {
            upgrade_id,
            cluster_name,
            name,
            description,
            retention_days,
        } => v(&m.create_session(NewSession {
            upgrade_id,
            cluster_name,
            name,
            description,
            retention_days,
        })?),
        Request::SessionComplete { session_id } => v(&m.complete_session(&session_id)?),
        Request::SessionGet { session_id } => {
            let summary = m.session_summary(&session_id)?;
            let collections = m.collections(&session_id)?;
            let mut out = v(&summary);
            out["collections"] = v(&collections);
            out
        }
        Request::SessionList { upgrade_id } => v(&m.sessions(upgrade_id.as_deref())?),
        Request::CollectionCreate {
            session_id,
            name,
            description,
            task_id,
        } => v(&m.create_collection(
            &session_id,
            &name,
            description.as_deref(),
            task_id.as_deref(),
        )?),
        Request::ArtifactAdd {
            session_id,
            collection_id,
            path,
            artifact_type,
            name,
            description,
            tags,
            task_id,
            step_id,
            metadata,
        } => {
            let opts = AddOptions {
                artifact_type,
                name,
                description,
                tags,
                task_id,
                step_id,
                metadata,
            };
            v(&m.add_paths(&session_id, &collection_id, &[path], &opts, &mut |_| {})?)
        }
        Request::ArtifactGet { artifact_id } => v(&m.artifact(&artifact_id)?),
        Request::ArtifactSearch { mut query } => {
            if query.limit == 0 {
                query.limit = 100;
            }
            v(&m.search_page(&query)?)
        }
        Request::Stats { session_id } => v(&m.stats(session_id.as_deref())?),
    })
}

fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).unwrap_or_default()
}

/// Totals of one run.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) lines: u64,
    pub(crate) failed: u64,
}

/// Reads requests from `input` until its end, answering each on `output`. `Err` only when
/// reading or writing fails.
pub(crate) fn run(
    m: &dyn Artifacts,
    input: impl Read,
    mut output: impl Write,
) -> io::Result<Stats> {
    let mut input = BufReader::with_capacity(64 * 1024, input);
    let mut stats = Stats::default();
    let mut buf = Vec::with_capacity(1024);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = input
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let mut id = None;
        let answer = if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
            skip_rest(&mut input)?;
            Err(Error::InvalidInput(format!(
                "line is longer than {MAX_LINE} bytes"
            )))
        } else {
            match std::str::from_utf8(&buf).map(str::trim) {
                Err(_) => Err(Error::InvalidInput("line is not valid UTF-8".into())),
                Ok("") => continue,
                Ok(text) => eks_upgrade_agent::progress::apply::split_id(text)
                    .and_then(|(i, v)| {
                        id = i;
                        serde_json::from_value::<Request>(v)
                    })
                    .map_err(|e| Error::InvalidInput(format!("malformed request: {e}")))
                    .and_then(|r| run_one(m, r)),
            }
        };
        stats.lines += 1;
        let mut ack = match answer {
            Ok(result) => json!({"ok": true, "result": result}),
            Err(e) => {
                stats.failed += 1;
                json!({"ok": false, "line": line_no, "code": e.code(), "error": e.to_string()})
            }
        };
        if let Some(id) = id {
            ack["id"] = id;
        }
        serde_json::to_writer(&mut output, &ack)?;
        output.write_all(b"\n")?;
        output.flush()?;
    }
    Ok(stats)
}

fn skip_rest(input: &mut impl BufRead) -> io::Result<()> {
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok(());
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let len = available.len();
                input.consume(len);
            }
        }
    }
}
