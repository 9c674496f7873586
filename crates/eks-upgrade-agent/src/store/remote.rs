//! [`RemoteStore`]: the [`ProgressStore`] of a server, over its store protocol
//! (`/api/v1/store/...` of `eks-upgrade-agent serve`). A `ProgressTracker` over it reports to
//! the server exactly as it would to a local store: the same commands, the same results, the
//! same errors (the server sends each library error with its parts, and they are rebuilt here).
//! It passes the store conformance suite.
//!
//! Blocking (ureq), like the rest of the library's API. Without a token it sends none; with one,
//! `Authorization: Bearer <token>`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

mod stream;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Committed, EventQuery, ProgressStore};
use crate::error::{Error, Result};
use crate::model::{ProgressEvent, ProgressStatus, Task, Upgrade};
use crate::store::domain::command::Command;

/// Largest response read (event pages, task lists).
const MAX_RESPONSE: u64 = 512 * 1024 * 1024;
/// Largest `execute` body a server takes (`eks_upgrade_agent_server::MAX_EXECUTE_BODY`).
const MAX_EXECUTE_BODY: usize = 4 * 1024 * 1024;
/// Largest `import` body a server takes (`eks_upgrade_agent_server::MAX_IMPORT_BODY`).
const MAX_IMPORT_BODY: usize = 16 * 1024 * 1024;
/// Longest wait for a connection to the server.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Longest silence of the server: one read (the answer, its body) or one write (the request,
/// a streamed upload) that makes no progress for this long ends the request. There is no limit
/// on a whole request: an upload that keeps being read may take hours.
const IDLE_LIMIT: Duration = Duration::from_secs(300);
/// The answer to a streamed request may take this many idle limits (an hour by default): the
/// server works on a received upload in silence before it answers.
const ANSWER_FACTOR: u32 = 12;

/// How a [`RemoteStore`] talks to its server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// A token or credentials may go over plain `http://` to any host (the CLI's
    /// `EUA_ALLOW_PLAIN_HTTP=1`; see [`RemoteStore::new_allowing_plain_http`]).
    pub allow_plain_http: bool,
    /// Longest silence of the server: a read or a write that makes no progress for this long
    /// ends the request (default 300 s; the CLI's `EUA_SERVER_IDLE_LIMIT`).
    pub idle_limit: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            allow_plain_http: false,
            idle_limit: IDLE_LIMIT,
        }
    }
}

/// A store behind a server.
pub struct RemoteStore {
    base: String,
    /// `base` with its password hidden, for messages.
    shown: String,
    token: Option<String>,
    /// Reads the answer after a failed write of a body ([`stream`]).
    agent: ureq::Agent,
    /// Longest silence of the server ([`IDLE_LIMIT`]).
    idle: Duration,
    /// The agent of streamed requests with the flag its connector shares with their bodies
    /// ([`stream`]), kept between requests so that the files of one command go over one
    /// connection (while the server keeps it open); a request takes it, so concurrent ones
    /// get agents of their own.
    streaming: std::sync::Mutex<Option<(ureq::Agent, Arc<AtomicBool>)>>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("base", &self.shown)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Percent-encodes one path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RemoteStore {
    /// The store of the server at `url` (e.g. `http://127.0.0.1:8080`), with an optional bearer
    /// token.
    ///
    /// A token or credentials in the URL are refused over plain `http://` to a host other than
    /// loopback; [`RemoteStore::new_allowing_plain_http`] lifts that (a service mesh or a
    /// private network that encrypts the hop).
    pub fn new(url: &str, token: Option<&str>) -> Result<RemoteStore> {
        Self::connect(url, token, false, IDLE_LIMIT)
    }

    /// As [`RemoteStore::new`], with another limit on the server's silence (tests).
    #[cfg(test)]
    pub(crate) fn new_with_idle_limit(
        url: &str,
        token: Option<&str>,
        idle: Duration,
    ) -> Result<RemoteStore> {
        Self::connect(url, token, false, idle)
    }

    /// As [`RemoteStore::new`], but a token or credentials may go over plain `http://` to any
    /// host (the CLI's `EUA_ALLOW_PLAIN_HTTP=1`): for a hop that is encrypted underneath, such
    /// as a service mesh's mTLS inside a cluster.
    pub fn new_allowing_plain_http(url: &str, token: Option<&str>) -> Result<RemoteStore> {
        Self::connect(url, token, true, IDLE_LIMIT)
    }

    /// As [`RemoteStore::new`], with `options`.
    pub fn with_options(
        url: &str,
        token: Option<&str>,
        options: &RemoteOptions,
    ) -> Result<RemoteStore> {
        if options.idle_limit.is_zero() {
            return Err(Error::invalid(
                "the idle limit must be above 0 s (it bounds the server's silence)",
            ));
        }
        Self::connect(url, token, options.allow_plain_http, options.idle_limit)
    }

    /// The longest silence of the server a request waits out.
    pub fn idle_limit(&self) -> Duration {
        self.idle
    }

    fn connect(
        url: &str,
        token: Option<&str>,
        allow_plain_http: bool,
        idle: Duration,
    ) -> Result<RemoteStore> {
        let base = url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 8 {
            return Err(Error::invalid(format!(
                "invalid server URL {:?}: expected http://HOST:PORT or https://HOST",
                crate::net::redact(url)
            )));
        }
        // Credentials in the URL (a Basic header) and a bearer token travel in clear text over
        // plain http: only to this machine.
        let credentials = crate::net::has_credentials(base);
        if !allow_plain_http
            && crate::net::is_plain_http(base)
            && (credentials || token.is_some())
            && !crate::net::is_loopback(base)
        {
            return Err(Error::invalid(format!(
                "refusing to send {} to the server at {} over plain http: use https:// (plain \
                 http with credentials is only for localhost, 127.0.0.0/8, [::1]; set \
                 EUA_ALLOW_PLAIN_HTTP=1 if the network encrypts the hop, e.g. a service mesh)",
                if credentials {
                    "the URL's credentials"
                } else {
                    "the token (EUA_TOKEN)"
                },
                crate::net::redact(base)
            )));
        }
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_LIMIT))
            // Per read and per write, not per request: a long upload that keeps going
            // succeeds, a silent server is cut.
            .timeout_per_read(Some(idle))
            .timeout_per_write(Some(idle))
            .http_status_as_error(false)
            .build();
        use ureq::unversioned::transport::Connector as _;
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new()
                .chain(stream::AnswerAfterWriteError::default()),
            ureq::unversioned::resolver::DefaultResolver::default(),
        );
        Ok(RemoteStore {
            base: base.to_owned(),
            shown: crate::net::redact(base),
            token: token.map(str::to_owned),
            agent,
            idle,
            streaming: std::sync::Mutex::new(None),
        })
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The server's base URL with its password (if any) hidden, for messages.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The agent (shared connection pool) for other calls to the same server.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// `POST {url}{path}` streaming `body` (with the token, if any), for uploads: when the
    /// server answers and closes before reading it all (a refusal), the answer is returned, not
    /// the failed write ("broken pipe"), as for every request of this store's agent. Read it
    /// with [`RemoteStore::answer`].
    pub fn post_stream(
        &self,
        path: &str,
        content_type: &str,
        body: &mut dyn std::io::Read,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        // A connector of its own shares a flag with the body: once a write fails, the body
        // ends, and the rest of the file is not read. The agent is this request's alone while
        // it is sent (its flag cleared first), then kept for the next one (its pool keeps the
        // connection once the answer is read).
        let taken = self
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (agent, failed) = taken.unwrap_or_else(|| {
            let failed = Arc::new(AtomicBool::new(false));
            use ureq::unversioned::transport::Connector as _;
            let agent = ureq::Agent::with_parts(
                self.agent.config().clone(),
                ureq::unversioned::transport::DefaultConnector::new()
                    .chain(stream::AnswerAfterWriteError::signalling(failed.clone())),
                ureq::unversioned::resolver::DefaultResolver::default(),
            );
            (agent, failed)
        });
        failed.store(false, std::sync::atomic::Ordering::Release);
        let mut req = agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        // Once the body is in, the server may work on it in silence (parse a report, copy the
        // kept file into S3) before it answers: the answer gets a longer limit than the idle
        // limit of sending.
        let req = req
            .config()
            .timeout_per_read(Some(self.idle * ANSWER_FACTOR))
            .build();
        let mut body = stream::StopAfterWriteError::new(body, failed.clone());
        let answer = req.send(ureq::SendBody::from_reader(&mut body));
        let mut slot = self.streaming.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((agent, failed));
        }
        drop(slot);
        answer.map_err(|e| self.unreachable(&e))
    }

    /// The error for a request to this server that failed on the way (not an answer): a
    /// silence past the idle limit says so, anything else says the server cannot be reached.
    pub fn unreachable(&self, e: &ureq::Error) -> Error {
        let message = match e {
            ureq::Error::Timeout(ureq::Timeout::PerRead | ureq::Timeout::PerWrite) => format!(
                "the server at {} stopped answering: nothing received or sent for {} s \
                 ({e}); check that the server is running and reachable",
                self.shown,
                self.idle.as_secs_f64()
            ),
            _ => format!("cannot reach the server at {}: {e}", self.shown),
        };
        Error::Backend {
            message,
            source: None,
        }
    }

    /// `GET path` as JSON.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| self.unreachable(&e))?;
        self.answer(resp)
    }

    /// `POST path` with a JSON body, answer as JSON.
    pub fn post_json<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::invalid(format!("cannot encode the request: {e}")))?;
        self.post_encoded(path, &body)
    }

    /// `POST path` with an encoded JSON body, answer as JSON.
    fn post_encoded<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.send(body).map_err(|e| self.unreachable(&e))?;
        self.answer(resp)
    }

    /// One `POST /api/v1/store/execute` of already encoded commands.
    fn execute_encoded(&self, encoded: &[Vec<u8>]) -> Result<Vec<Result<Committed>>> {
        let mut body = Vec::with_capacity(encoded.iter().map(|c| c.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, c) in encoded.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(c);
        }
        body.push(b']');
        let answers: Vec<Value> = self.post_encoded("/api/v1/store/execute", &body)?;
        if answers.len() != encoded.len() {
            return Err(Error::Backend {
                message: format!(
                    "the server at {} answered {} results for {} commands",
                    self.shown,
                    answers.len(),
                    encoded.len()
                ),
                source: None,
            });
        }
        Ok(answers
            .into_iter()
            .map(|mut a| match a.get_mut("ok") {
                Some(ok) => serde_json::from_value(ok.take()).map_err(|e| Error::Backend {
                    message: format!("unexpected answer from {}: {e}", self.shown),
                    source: None,
                }),
                None => Err(self.error_of(200, &a["error"])),
            })
            .collect())
    }

    /// Reads a JSON answer, or turns an error answer into the library error it reports.
    pub fn answer<T: DeserializeOwned>(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<T> {
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(|e| self.unreachable(&e))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| Error::Backend {
                message: format!("unexpected answer from {}: {e}", self.shown),
                source: None,
            });
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(self.error_of(status, &v["error"]))
    }

    /// The library error an API error object stands for.
    pub fn error_of(&self, status: u16, e: &Value) -> Error {
        let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        let message = text("message");
        let what = text("what");
        let status_of = |k: &str| serde_json::from_value::<ProgressStatus>(e[k].clone()).ok();
        match e["code"].as_str().unwrap_or_default() {
            "not_found" if !what.is_empty() => Error::NotFound { what },
            "already_exists" if !what.is_empty() => Error::AlreadyExists { what },
            "invalid_transition" => match (status_of("from"), status_of("to")) {
                (Some(from), Some(to)) => Error::InvalidTransition { what, from, to },
                _ => Error::InvalidInput(message),
            },
            "invalid_input" | "malformed_json" | "invalid_query" | "too_large" => {
                Error::InvalidInput(message)
            }
            "unauthorized" | "forbidden" => Error::Backend {
                message: format!(
                    "the server at {} refused the request: {message}",
                    self.shown
                ),
                source: None,
            },
            _ if message.is_empty() => Error::Backend {
                message: format!("the server at {} answered {status}", self.shown),
                source: None,
            },
            _ => Error::Backend {
                message: format!("the server at {} answered {status}: {message}", self.shown),
                source: None,
            },
        }
    }
}

#[derive(serde::Deserialize)]
struct LastSeq {
    last_seq: u64,
}

impl ProgressStore for RemoteStore {
    fn execute(&self, commands: &[Command]) -> Result<Vec<Result<Committed>>> {
        // The server takes at most MAX_EXECUTE_BODY bytes per request: send the batch in
        // groups below it (each command commits on its own either way). A command too large
        // for any request fails alone.
        let mut out: Vec<Result<Committed>> = Vec::with_capacity(commands.len());
        let mut group: Vec<Vec<u8>> = Vec::new();
        let mut size = 2;
        for c in commands {
            let encoded = serde_json::to_vec(c)
                .map_err(|e| Error::invalid(format!("cannot encode the request: {e}")))?;
            if encoded.len() + 2 > MAX_EXECUTE_BODY {
                out.extend(self.execute_encoded(&std::mem::take(&mut group))?);
                size = 2;
                out.push(Err(Error::invalid(format!(
                    "this {} command is {} bytes as JSON; a server takes at most {MAX_EXECUTE_BODY} bytes per request: send it in smaller parts (fewer tasks per add, shorter details)",
                    c.op_name(),
                    encoded.len()
                ))));
                continue;
            }
            if size + encoded.len() + 1 > MAX_EXECUTE_BODY {
                out.extend(self.execute_encoded(&std::mem::take(&mut group))?);
                size = 2;
            }
            size += encoded.len() + 1;
            group.push(encoded);
        }
        if !group.is_empty() || commands.is_empty() {
            out.extend(self.execute_encoded(&group)?);
        }
        Ok(out)
    }

    fn import(&self, upgrade: &Upgrade, tasks: &[Task], events: &[ProgressEvent]) -> Result<u64> {
        let body = serde_json::json!({"upgrade": upgrade, "tasks": tasks, "events": events});
        let body = serde_json::to_vec(&body)
            .map_err(|e| Error::invalid(format!("cannot encode the request: {e}")))?;
        if body.len() > MAX_IMPORT_BODY {
            return Err(Error::invalid(format!(
                "upgrade {:?} is {} bytes as JSON; a server imports at most {MAX_IMPORT_BODY} bytes at once: import it on the server's machine, into its data dir",
                upgrade.upgrade_id,
                body.len()
            )));
        }
        let r: LastSeq = self.post_encoded("/api/v1/store/import", &body)?;
        Ok(r.last_seq)
    }

    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade> {
        self.get_json(&format!("/api/v1/store/upgrades/{}", encode(upgrade_id)))
    }

    fn upgrades_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Upgrade>> {
        self.get_json(&format!(
            "/api/v1/store/upgrades?limit={limit}{}",
            after
                .map(|a| format!("&after={}", encode(a)))
                .unwrap_or_default()
        ))
    }

    fn tasks_page(&self, upgrade_id: &str, after: Option<&str>, limit: usize) -> Result<Vec<Task>> {
        self.get_json(&format!(
            "/api/v1/store/upgrades/{}/tasks?limit={limit}{}",
            encode(upgrade_id),
            after
                .map(|a| format!("&after={}", encode(a)))
                .unwrap_or_default()
        ))
    }

    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task> {
        self.get_json(&format!(
            "/api/v1/store/upgrades/{}/tasks/{}",
            encode(upgrade_id),
            encode(task_id)
        ))
    }

    fn recent_task_events(
        &self,
        upgrade_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<ProgressEvent>> {
        self.get_json(&format!(
            "/api/v1/store/upgrades/{}/tasks/{}/recent?limit={limit}",
            encode(upgrade_id),
            encode(task_id)
        ))
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<ProgressEvent>> {
        // The server caps a page; ask page by page until the caller's limit or the end.
        const PAGE: usize = 10_000;
        let mut out: Vec<ProgressEvent> = Vec::new();
        let mut since = query.since;
        loop {
            let want = (query.limit - out.len()).min(PAGE);
            let mut path = format!("/api/v1/store/events?since={since}&limit={want}");
            if let Some(u) = &query.upgrade_id {
                path.push_str(&format!("&upgrade_id={}", encode(u)));
            }
            let page: Vec<ProgressEvent> = self.get_json(&path)?;
            let n = page.len();
            if let Some(last) = page.last() {
                since = last.seq;
            }
            out.extend(page);
            if n < want || out.len() >= query.limit {
                return Ok(out);
            }
        }
    }

    fn latest_events(&self, upgrade_id: &str, limit: usize) -> Result<Vec<ProgressEvent>> {
        self.get_json(&format!(
            "/api/v1/store/upgrades/{}/latest?limit={limit}",
            encode(upgrade_id)
        ))
    }

    fn last_seq(&self) -> Result<u64> {
        let r: LastSeq = self.get_json("/api/v1/store/last_seq")?;
        Ok(r.last_seq)
    }

    fn task_history(
        &self,
        cluster_name: &str,
        task_ids: &[&str],
    ) -> Result<Vec<crate::store::domain::history::TaskHistory>> {
        // Ids hold no whitespace: space-separated, 100 at a time (short URLs).
        let mut out = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(100) {
            let page: Vec<crate::store::domain::history::TaskHistory> =
                match self.get_json(&format!(
                    "/api/v1/store/task_history?cluster={}&task_ids={}",
                    encode(cluster_name),
                    encode(&chunk.join(" "))
                )) {
                    Ok(page) => page,
                    // A server older than the route: no history (estimates use the rate).
                    Err(Error::NotFound { .. }) => {
                        return Ok(vec![Default::default(); task_ids.len()]);
                    }
                    Err(e) => return Err(e),
                };
            if page.len() != chunk.len() {
                return Err(Error::Backend {
                    message: format!(
                        "the server answered {} task histories for {} tasks",
                        page.len(),
                        chunk.len()
                    ),
                    source: None,
                });
            }
            out.extend(page);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_and_urls() {
        assert_eq!(encode("u-1.a_b~"), "u-1.a_b~");
        assert_eq!(encode("a b?#%"), "a%20b%3F%23%25");
        assert_eq!(encode("é"), "%C3%A9");
        assert!(RemoteStore::new("localhost:8080", None).is_err());
        let s = RemoteStore::new("http://127.0.0.1:1/", Some("t")).unwrap();
        assert_eq!(s.url(), "http://127.0.0.1:1");
        assert!(
            !format!("{s:?}").contains("\"t\""),
            "the token is not printed"
        );
    }

    /// TR4: a server URL's password never reaches a message or `Debug`.
    #[test]
    fn server_urls_keep_their_passwords_out_of_messages() {
        let s = RemoteStore::new("http://u:s3cr3t@127.0.0.1:1/", None).unwrap();
        let e = s.last_seq().unwrap_err().to_string();
        assert!(e.contains("http://u:***@127.0.0.1:1"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(!format!("{s:?}").contains("s3cr3t"));
        assert_eq!(s.shown_url(), "http://u:***@127.0.0.1:1");
        let e = s
            .error_of(500, &serde_json::json!({"code":"internal"}))
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = RemoteStore::new("u:s3cr3t@h", None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    /// Credentials or a token never travel over plain http beyond this machine.
    #[test]
    fn credentials_over_plain_http_only_to_loopback() {
        for (url, token) in [
            ("http://u:s3cr3t@eua.example.com", None),
            ("http://s3cr3t@10.0.0.1:8080", None),
            ("http://eua.example.com:8080", Some("s3cr3t")),
            ("http://127.0.0.1.evil.example", Some("s3cr3t")),
        ] {
            let e = RemoteStore::new(url, token).unwrap_err().to_string();
            assert!(
                e.contains("over plain http") && e.contains("use https://"),
                "{url}: {e}"
            );
            assert!(!e.contains("s3cr3t"), "{e}");
            assert!(e.contains("EUA_ALLOW_PLAIN_HTTP=1"), "{url}: {e}");
            // The explicit opt-out (an encrypted hop underneath) lets it through.
            let s = RemoteStore::new_allowing_plain_http(url, token).unwrap();
            assert!(!format!("{s:?}").contains("s3cr3t"));
        }
        for (url, token) in [
            ("https://u:s3cr3t@eua.example.com", Some("t")),
            ("http://u:s3cr3t@127.0.0.1:1", Some("t")),
            ("http://localhost:1", Some("t")),
            ("http://[::1]:1", Some("t")),
            ("http://eua.example.com:8080", None),
        ] {
            assert!(RemoteStore::new(url, token).is_ok(), "{url}");
        }
    }

    #[test]
    fn api_errors_become_library_errors() {
        let s = RemoteStore::new("http://127.0.0.1:1", None).unwrap();
        let e = s.error_of(404, &serde_json::json!({"code":"not_found","message":"upgrade \"x\" not found","what":"upgrade \"x\""}));
        assert_eq!(e.to_string(), "upgrade \"x\" not found");
        let e = s.error_of(409, &serde_json::json!({"code":"invalid_transition","message":"m","what":"task \"a\"","from":"completed","to":"in_progress"}));
        assert!(
            matches!(
                e,
                Error::InvalidTransition {
                    from: ProgressStatus::Completed,
                    to: ProgressStatus::InProgress,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = s.error_of(
            422,
            &serde_json::json!({"code":"invalid_input","message":"percentage must be in 0..=100"}),
        );
        assert_eq!(e.to_string(), "percentage must be in 0..=100");
        let e = s.error_of(
            401,
            &serde_json::json!({"code":"unauthorized","message":"invalid token"}),
        );
        assert!(
            e.to_string().contains("refused the request: invalid token"),
            "{e}"
        );
        // Nothing listens on port 1.
        let e = s.last_seq().unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot reach the server at http://127.0.0.1:1"),
            "{e}"
        );
    }

    /// A body of zeros that counts what was read of it.
    struct Counted {
        left: u64,
        read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }
    impl std::io::Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (buf.len() as u64).min(self.left) as usize;
            buf[..n].fill(0);
            self.left -= n as u64;
            self.read
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
    }

    /// A refused large upload: the answer comes once a write fails, without reading the rest
    /// of the body (512 MiB here; a multi-GB file would take minutes).
    #[test]
    fn a_refused_large_upload_stops_reading_the_body() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let body =
                r#"{"error":{"code":"invalid_input","message":"unknown artifact type \"bogus\""}}"#;
            let mut conn = conn;
            // One write, as a server sends its answer: `write!` would send the pieces of the
            // format one system call each, and the reset of the close below could reach the
            // client between them, cutting the answer (it failed so under load).
            let answer = format!(
                "HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).unwrap();
            // Closed with the body unread: the client's next writes fail.
        });
        let s = RemoteStore::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let total = 512u64 << 20;
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut body = Counted {
            left: total,
            read: read.clone(),
        };
        let resp = s
            .post_stream("/api/v1/artifacts", "application/octet-stream", &mut body)
            .unwrap();
        let e = s.answer::<Value>(resp).unwrap_err().to_string();
        server.join().unwrap();
        assert!(e.contains("unknown artifact type"), "{e}");
        let read = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read < 64 << 20, "{read} bytes of {total} read");
    }

    /// An upload lasts longer than the limit on the server's silence: it succeeds while the
    /// server keeps reading (there is no limit on a whole request; it was 300 s).
    #[test]
    fn an_upload_longer_than_the_idle_limit_succeeds_while_it_is_read() {
        use std::io::{BufRead, BufReader, Read, Write};
        let idle = Duration::from_secs(1);
        let total: u64 = 160 << 20;
        // Paced for the first 96 MiB (2 MiB every 50 ms: at least 2.4 s), the rest read at
        // once so the bytes held in socket buffers do not wait.
        let paced: u64 = 96 << 20;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::with_capacity(64 << 10, conn.try_clone().unwrap());
            let mut line = String::new();
            let mut chunked = false;
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line
                    .to_ascii_lowercase()
                    .starts_with("transfer-encoding: chunked")
                {
                    chunked = true;
                }
                if line == "\r\n" {
                    break;
                }
            }
            assert!(chunked, "a streamed upload is chunked");
            let mut got: u64 = 0;
            let mut since_pause: u64 = 0;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let size = u64::from_str_radix(line.trim(), 16).unwrap();
                if size == 0 {
                    reader.read_line(&mut line).unwrap();
                    break;
                }
                let mut left = size;
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    reader.read_exact(&mut buf[..n]).unwrap();
                    left -= n as u64;
                    got += n as u64;
                    since_pause += n as u64;
                    if got < paced && since_pause >= 2 << 20 {
                        since_pause = 0;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                line.clear();
                reader.read_line(&mut line).unwrap();
            }
            let body = format!(r#"{{"received":{got}}}"#);
            let mut conn = conn;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            got
        });
        let s = RemoteStore::new_with_idle_limit(&format!("http://127.0.0.1:{port}"), None, idle)
            .unwrap();
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut body = Counted {
            left: total,
            read: read.clone(),
        };
        let start = std::time::Instant::now();
        let resp = s
            .post_stream("/api/v1/artifacts", "application/octet-stream", &mut body)
            .unwrap();
        let answer: Value = s.answer(resp).unwrap();
        let took = start.elapsed();
        assert_eq!(
            server.join().unwrap(),
            total,
            "the server read the whole body"
        );
        assert_eq!(answer["received"], total);
        assert!(
            took > 2 * idle,
            "the upload lasted {took:?}: not longer than the idle limit, the test proves nothing"
        );
    }

    /// After a streamed body is in, the server may work on it in silence for longer than the
    /// idle limit (parsing a report, copying the kept file into S3): the answer has
    /// `ANSWER_FACTOR` times the idle limit (an hour by default), so a slow answer still arrives.
    #[test]
    fn a_slow_answer_to_a_received_upload_still_arrives() {
        use std::io::{BufRead, BufReader, Write};
        let idle = Duration::from_millis(500);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            // Headers, then the chunked body up to its last (empty) chunk.
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
            }
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let size = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut chunk = vec![0u8; size + 2];
                std::io::Read::read_exact(&mut reader, &mut chunk).unwrap();
                if size == 0 {
                    break;
                }
            }
            // Three idle limits of silence before the answer.
            std::thread::sleep(3 * idle);
            let mut conn = conn;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{{\"ok\":true}}"
            )
            .unwrap();
        });
        let s = RemoteStore::new_with_idle_limit(&format!("http://127.0.0.1:{port}"), None, idle)
            .unwrap();
        let mut body: &[u8] = b"<testsuites/>";
        let resp = s
            .post_stream("/api/v1/tests/ingest", "application/xml", &mut body)
            .unwrap();
        let answer: Value = s.answer(resp).unwrap();
        server.join().unwrap();
        assert_eq!(answer["ok"], true);
    }

    /// A server that accepts the connection and then says nothing is cut after the idle limit,
    /// with a message that says so.
    #[test]
    fn a_silent_server_is_cut_after_the_idle_limit() {
        let idle = Duration::from_millis(500);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            // Holds the connection open, reads nothing, answers nothing.
            let _ = done_rx.recv();
            drop(conn);
        });
        let s = RemoteStore::new_with_idle_limit(&format!("http://127.0.0.1:{port}"), None, idle)
            .unwrap();
        let start = std::time::Instant::now();
        let e = s
            .get_json::<Value>("/api/v1/store/upgrades")
            .unwrap_err()
            .to_string();
        let took = start.elapsed();
        done_tx.send(()).unwrap();
        server.join().unwrap();
        assert!(took >= idle, "cut after {took:?}, before the idle limit");
        assert!(took < Duration::from_secs(30), "cut after {took:?}");
        assert!(
            e.contains("stopped answering") && e.contains("0.5 s"),
            "unclear error: {e}"
        );
        assert!(e.contains("http://127.0.0.1"), "{e}");
    }

    /// A server that accepts an upload and then neither reads it nor answers is cut after the
    /// idle limit once the socket buffers are full (a write that makes no progress).
    #[test]
    fn an_upload_the_server_stops_reading_is_cut_after_the_idle_limit() {
        let idle = Duration::from_millis(500);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let _ = done_rx.recv();
            drop(conn);
        });
        let s = RemoteStore::new_with_idle_limit(&format!("http://127.0.0.1:{port}"), None, idle)
            .unwrap();
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let total = 1u64 << 30;
        let mut body = Counted {
            left: total,
            read: read.clone(),
        };
        let e = s
            .post_stream("/api/v1/artifacts", "application/octet-stream", &mut body)
            .unwrap_err()
            .to_string();
        done_tx.send(()).unwrap();
        server.join().unwrap();
        assert!(e.contains("stopped answering"), "unclear error: {e}");
        let read = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read < 256 << 20, "{read} bytes of {total} read");
    }
}
