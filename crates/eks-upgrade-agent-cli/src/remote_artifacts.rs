//! The artifact operations the `artifacts` commands use, over a local data dir
//! (`TestArtifactsManager`) or a server's API (`--server`), so both print the same.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use chrono::{DateTime, Utc};
use eks_upgrade_agent::artifacts::{
    AddOptions, CleanupReport, ExportReport, ExportSource, GcReport, NewSession, Progress,
    PullReport, UploadReport, VerifyReport, export_session_from, plan_paths,
};

use crate::requests::{PullRequest, UploadRequest};
use eks_upgrade_agent::blob::{Digest, VerifyingReader};
use eks_upgrade_agent::model::{
    ArtifactCollection, ArtifactPage, ArtifactQuery, ArtifactStats, RunPhase, SessionSummary,
    TestArtifact, TestRun, TestSession,
};
use eks_upgrade_agent::store::IdKind;
use eks_upgrade_agent::store::remote::{RemoteStore, encode};
use eks_upgrade_agent::{Error, Result, TestArtifactsManager};

/// The media type of a maintenance answer in progress lines (the server's `maintenance.rs`).
const PROGRESS_LINES: &str = "application/x-ndjson";
/// Largest maintenance answer read (a verify report lists every problem it found).
const MAX_ANSWER: u64 = 512 * 1024 * 1024;

/// What the `artifacts` commands need from where artifacts live.
pub(crate) trait Artifacts {
    /// The full id an abbreviation names (a unique prefix, or suffix of 6+ characters).
    fn resolve(&self, kind: IdKind, abbrev: &str) -> Result<String>;
    /// The shortest form of `id` that [`Artifacts::resolve`] takes back to it (the id itself
    /// when that cannot be told, e.g. from a server).
    fn short(&self, kind: IdKind, id: &str) -> String {
        let _ = kind;
        id.to_owned()
    }
    /// [`Artifacts::short`] of each id, in order (one round trip per chunk for a server).
    fn shorts(&self, kind: IdKind, ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| self.short(kind, id)).collect()
    }
    fn create_session(&self, new: NewSession) -> Result<TestSession>;
    fn complete_session(&self, id: &str) -> Result<TestSession>;
    fn session_summary(&self, id: &str) -> Result<SessionSummary>;
    fn sessions(&self, upgrade: Option<&str>) -> Result<Vec<TestSession>>;
    fn create_collection(
        &self,
        session: &str,
        name: &str,
        description: Option<&str>,
        task_id: Option<&str>,
    ) -> Result<ArtifactCollection>;
    fn collections(&self, session: &str) -> Result<Vec<ArtifactCollection>>;
    fn add_paths(
        &self,
        session: &str,
        collection: &str,
        paths: &[PathBuf],
        opts: &AddOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<TestArtifact>>;
    /// One page of results and the cursor of the next.
    fn search_page(&self, q: &ArtifactQuery) -> Result<ArtifactPage>;
    fn stats(&self, session: Option<&str>) -> Result<ArtifactStats>;
    fn artifact(&self, id: &str) -> Result<TestArtifact>;
    fn delete_artifact(&self, id: &str) -> Result<TestArtifact>;
    /// The verified bytes.
    fn open(&self, id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)>;
    fn write_to(&self, id: &str, path: &Path) -> Result<u64> {
        let (_, mut r) = self.open(id)?;
        eks_upgrade_agent::artifacts::write_atomically(path, &mut r)
    }
    fn export_session(
        &self,
        session: &str,
        dir: &Path,
        force: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ExportReport>;
    fn verify(&self, progress: &mut dyn FnMut(Progress)) -> Result<VerifyReport>;
    fn cleanup(&self, dry_run: bool, as_of: Option<DateTime<Utc>>) -> Result<CleanupReport>;
    fn gc(&self) -> Result<GcReport>;
}

impl Artifacts for TestArtifactsManager {
    fn create_session(&self, new: NewSession) -> Result<TestSession> {
        TestArtifactsManager::create_session(self, new)
    }
    fn complete_session(&self, id: &str) -> Result<TestSession> {
        TestArtifactsManager::complete_session(self, id)
    }
    fn resolve(&self, kind: IdKind, abbrev: &str) -> Result<String> {
        TestArtifactsManager::resolve_id(self, kind, abbrev)
    }
    fn short(&self, kind: IdKind, id: &str) -> String {
        self.abbreviate(kind, id).unwrap_or_else(|_| id.to_owned())
    }
    fn session_summary(&self, id: &str) -> Result<SessionSummary> {
        TestArtifactsManager::session_summary(self, id)
    }
    fn sessions(&self, upgrade: Option<&str>) -> Result<Vec<TestSession>> {
        TestArtifactsManager::sessions(self, upgrade)
    }
    fn create_collection(
        &self,
        session: &str,
        name: &str,
        description: Option<&str>,
        task_id: Option<&str>,
    ) -> Result<ArtifactCollection> {
        TestArtifactsManager::create_collection(self, session, name, description, task_id)
    }
    fn collections(&self, session: &str) -> Result<Vec<ArtifactCollection>> {
        TestArtifactsManager::collections(self, session)
    }
    fn add_paths(
        &self,
        session: &str,
        collection: &str,
        paths: &[PathBuf],
        opts: &AddOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<TestArtifact>> {
        TestArtifactsManager::add_paths(self, session, collection, paths, opts, progress)
    }
    fn search_page(&self, q: &ArtifactQuery) -> Result<ArtifactPage> {
        TestArtifactsManager::search_page(self, q)
    }
    fn stats(&self, session: Option<&str>) -> Result<ArtifactStats> {
        TestArtifactsManager::stats(self, session)
    }
    fn artifact(&self, id: &str) -> Result<TestArtifact> {
        TestArtifactsManager::artifact(self, id)
    }
    fn delete_artifact(&self, id: &str) -> Result<TestArtifact> {
        TestArtifactsManager::delete_artifact(self, id)
    }
    fn open(&self, id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)> {
        TestArtifactsManager::open(self, id)
    }
    fn write_to(&self, id: &str, path: &Path) -> Result<u64> {
        TestArtifactsManager::write_to(self, id, path)
    }
    fn export_session(
        &self,
        session: &str,
        dir: &Path,
        force: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ExportReport> {
        TestArtifactsManager::export_session(self, session, dir, force, progress)
    }
    fn verify(&self, progress: &mut dyn FnMut(Progress)) -> Result<VerifyReport> {
        TestArtifactsManager::verify(self, progress)
    }
    fn cleanup(&self, dry_run: bool, as_of: Option<DateTime<Utc>>) -> Result<CleanupReport> {
        TestArtifactsManager::cleanup(self, dry_run, as_of)
    }
    fn gc(&self) -> Result<GcReport> {
        TestArtifactsManager::gc(self)
    }
}

/// Artifacts behind a server's API.
#[derive(Debug)]
pub(crate) struct RemoteArtifacts {
    store: Arc<RemoteStore>,
}

impl RemoteArtifacts {
    pub(crate) fn new(store: Arc<RemoteStore>) -> Self {
        RemoteArtifacts { store }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.store.url())
    }

    fn authorize<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match self.store.token() {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// The store's wording, so every failed request reads alike.
    fn unreachable(&self, e: &ureq::Error) -> Error {
        self.store.unreachable(e)
    }

    /// `POST /api/v1/maintenance/{what}`: runs on the server's data dir, without a time limit
    /// on the whole (a verify of a large store takes as long as reading it), but with the
    /// store's limit on silence: the answer comes in progress lines (`{"working": s}` at least
    /// every 15 s while the server works, then `{"ok": ...}` or the error), so a server that
    /// died, stopped or was cut off is given up after the idle limit.
    fn maintain<T: serde::de::DeserializeOwned>(&self, what: &str, body: &Value) -> Result<T> {
        use std::io::BufRead;
        let body = serde_json::to_vec(body).unwrap_or_default();
        let resp = self
            .authorize(
                self.store
                    .agent()
                    .post(self.url(&format!("/api/v1/maintenance/{what}")))
                    .config()
                    .timeout_global(None)
                    .build(),
            )
            .header("Content-Type", "application/json")
            .header("Accept", PROGRESS_LINES)
            .send(&body[..])
            .map_err(|e| self.unreachable(&e))?;
        let lines = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(PROGRESS_LINES.as_bytes()));
        if !lines {
            // Refused before the work began (or a server without progress lines).
            return self.store.answer(resp);
        }
        let unexpected = |why: String| Error::Backend {
            message: format!(
                "unexpected answer from the server at {}: {why}",
                self.store.shown_url()
            ),
            source: None,
        };
        let mut reader = std::io::BufReader::new(
            resp.into_body()
                .into_with_config()
                .limit(MAX_ANSWER)
                .reader(),
        );
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(|e| {
                match ureq::Error::from(e) {
                    // Silence, or the connection lost: the server's fault, said as usual.
                    e @ (ureq::Error::Timeout(_) | ureq::Error::Io(_)) => self.unreachable(&e),
                    e => unexpected(e.to_string()),
                }
            })?;
            if n == 0 {
                return Err(unexpected(
                    "the answer ended before the result (see the server's log)".into(),
                ));
            }
            let mut v: Value =
                serde_json::from_slice(&line).map_err(|e| unexpected(e.to_string()))?;
            if v.get("working").is_some() {
                continue;
            }
            if let Some(ok) = v.get_mut("ok") {
                return serde_json::from_value(ok.take()).map_err(|e| unexpected(e.to_string()));
            }
            if v.get("error").is_some() {
                let status = v["status"].as_u64().and_then(|s| u16::try_from(s).ok());
                return Err(self.store.error_of(status.unwrap_or(500), &v["error"]));
            }
            return Err(unexpected(format!("a line without a result: {v}")));
        }
    }

    /// An upload run on the server, to its bucket; returns the bucket and the report.
    pub(crate) fn upload(&self, req: &UploadRequest) -> Result<(String, UploadReport)> {
        #[derive(serde::Deserialize)]
        struct Answer {
            bucket: String,
            report: UploadReport,
        }
        let a: Answer = self.maintain("upload", &serde_json::to_value(req).unwrap_or_default())?;
        Ok((a.bucket, a.report))
    }

    /// A pull of a session from S3 into the server's data dir.
    pub(crate) fn pull(&self, req: &PullRequest) -> Result<PullReport> {
        self.maintain("pull", &serde_json::to_value(req).unwrap_or_default())
    }

    fn unreachable_status(&self) -> Error {
        Error::Backend {
            message: format!(
                "unexpected answer from the server at {}",
                self.store.shown_url()
            ),
            source: None,
        }
    }

    fn send(&self, method: &str, path: &str) -> Result<Value> {
        let req = match method {
            "DELETE" => self
                .authorize(self.store.agent().delete(self.url(path)))
                .call(),
            _ => self
                .authorize(self.store.agent().post(self.url(path)))
                .send_empty(),
        };
        let resp = req.map_err(|e| self.unreachable(&e))?;
        self.store.answer(resp)
    }
}

/// The query of an upload with `opts` (`&type=...&tag=...`), after `?name=`.
fn add_query(opts: &AddOptions) -> String {
    let mut query = String::new();
    if let Some(t) = opts.artifact_type {
        query.push_str(&format!("&type={}", t.as_str()));
    }
    for t in &opts.tags {
        query.push_str(&format!("&tag={}", encode(t)));
    }
    for (k, v) in [
        ("task_id", &opts.task_id),
        ("step_id", &opts.step_id),
        ("description", &opts.description),
    ] {
        if let Some(v) = v {
            query.push_str(&format!("&{k}={}", encode(v)));
        }
    }
    if !opts.metadata.is_empty() {
        let m = serde_json::to_string(&opts.metadata).unwrap_or_default();
        query.push_str(&format!("&metadata={}", encode(&m)));
    }
    query
}

impl RemoteArtifacts {
    /// Streams the planned file `f` to the collection's upload route with `query`; the answer.
    fn post_file(
        &self,
        session: &str,
        collection: &str,
        f: &eks_upgrade_agent::artifacts::PlannedFile,
        query: &str,
        report: &mut dyn FnMut(u64),
    ) -> Result<Value> {
        let file = std::fs::File::open(&f.path)
            .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", f.path.display())))?;
        let mut reader = Counting {
            inner: std::io::BufReader::with_capacity(256 * 1024, file),
            done: 0,
            report,
        };
        let path = format!(
            "/api/v1/sessions/{}/collections/{}/artifacts?name={}{query}",
            encode(session),
            encode(collection),
            encode(&f.name)
        );
        let resp = self
            .store
            .post_stream(&path, "application/octet-stream", &mut reader)?;
        self.store.answer(resp)
    }

    /// `artifacts add --phase` on a server: one JUnit report uploaded with
    /// `type=test_result&phase=P`, which the server keeps and records as a run of the session's
    /// upgrade; the artifact and the run.
    pub(crate) fn add_report(
        &self,
        session: &str,
        collection: &str,
        path: &Path,
        opts: &AddOptions,
        phase: RunPhase,
    ) -> Result<(TestArtifact, TestRun)> {
        let plan = plan_paths(std::slice::from_ref(&path.to_path_buf()), opts)?;
        let [f] = &plan[..] else {
            return Err(Error::InvalidInput(format!(
                "{} is not one file: give the JUnit XML report itself",
                path.display()
            )));
        };
        let query = format!("{}&phase={phase}", add_query(opts));
        let mut v = self.post_file(session, collection, f, &query, &mut |_| {})?;
        let run = v
            .as_object_mut()
            .and_then(|o| o.remove("test_run"))
            .ok_or_else(|| Error::Backend {
                message: format!(
                    "the server at {} kept {} but recorded no test run: is it an older version?",
                    self.store.shown_url(),
                    f.name
                ),
                source: None,
            })?;
        Ok((from_value(v)?, from_value(run)?))
    }
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Backend {
        message: format!("unexpected answer from the server: {e}"),
        source: None,
    })
}

/// A reader that reports how many bytes went through.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    report: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.report)(self.done);
        Ok(n)
    }
}

impl Artifacts for RemoteArtifacts {
    fn create_session(&self, new: NewSession) -> Result<TestSession> {
        let body = json!({
            "upgrade_id": new.upgrade_id,
            "cluster_name": new.cluster_name,
            "name": new.name,
            "description": new.description,
            "retention_days": new.retention_days,
        });
        self.store.post_json("/api/v1/sessions", &body)
    }

    fn complete_session(&self, id: &str) -> Result<TestSession> {
        from_value(self.send("POST", &format!("/api/v1/sessions/{}/complete", encode(id)))?)
    }

    fn shorts(&self, kind: IdKind, ids: &[&str]) -> Vec<String> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(100) {
            let list = chunk
                .iter()
                .map(|i| encode(i))
                .collect::<Vec<_>>()
                .join(",");
            let got: Result<Value> = self
                .store
                .get_json(&format!("/api/v1/ids/{}?shortest={list}", kind.as_str()));
            // An older server, or an error: the full ids (still valid, just long).
            match got.map(|mut v| from_value::<Vec<String>>(v["shortest"].take())) {
                Ok(Ok(s)) if s.len() == chunk.len() => out.extend(s),
                _ => out.extend(chunk.iter().map(|i| (*i).to_owned())),
            }
        }
        out
    }

    fn resolve(&self, kind: IdKind, abbrev: &str) -> Result<String> {
        let mut v: Value =
            self.store
                .get_json(&format!("/api/v1/ids/{}/{}", kind.as_str(), encode(abbrev)))?;
        from_value(v["id"].take())
    }
    fn session_summary(&self, id: &str) -> Result<SessionSummary> {
        let mut v: Value = self
            .store
            .get_json(&format!("/api/v1/sessions/{}", encode(id)))?;
        from_value(v["summary"].take())
    }

    fn sessions(&self, upgrade: Option<&str>) -> Result<Vec<TestSession>> {
        match upgrade {
            Some(u) => self
                .store
                .get_json(&format!("/api/v1/sessions?upgrade_id={}", encode(u))),
            None => self.store.get_json("/api/v1/sessions"),
        }
    }

    fn create_collection(
        &self,
        session: &str,
        name: &str,
        description: Option<&str>,
        task_id: Option<&str>,
    ) -> Result<ArtifactCollection> {
        let body = json!({"name": name, "description": description, "task_id": task_id});
        self.store.post_json(
            &format!("/api/v1/sessions/{}/collections", encode(session)),
            &body,
        )
    }

    fn collections(&self, session: &str) -> Result<Vec<ArtifactCollection>> {
        self.store
            .get_json(&format!("/api/v1/sessions/{}/collections", encode(session)))
    }

    fn add_paths(
        &self,
        session: &str,
        collection: &str,
        paths: &[PathBuf],
        opts: &AddOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<TestArtifact>> {
        // The same plan (names, checks) as a local add, before anything is sent.
        let plan = plan_paths(paths, opts)?;
        let mut p = Progress {
            files_total: plan.len() as u64,
            bytes_total: plan.iter().map(|f| f.size).sum(),
            ..Progress::default()
        };
        progress(p);
        let query = add_query(opts);
        let mut out = Vec::with_capacity(plan.len());
        for f in plan {
            let base = p.bytes_done;
            let mut report = |done: u64| {
                progress(Progress {
                    bytes_done: base + done,
                    ..p
                })
            };
            let a: TestArtifact =
                from_value(self.post_file(session, collection, &f, &query, &mut report)?)?;
            p.bytes_done = base + a.file_size;
            p.files_done += 1;
            progress(p);
            out.push(a);
        }
        Ok(out)
    }

    fn search_page(&self, q: &ArtifactQuery) -> Result<ArtifactPage> {
        let limit = match q.limit {
            0 => eks_upgrade_agent::model::DEFAULT_SEARCH_LIMIT,
            n => n,
        };
        let mut query = vec![format!("limit={limit}")];
        let mut push = |k: &str, v: &str| query.push(format!("{k}={}", encode(v)));
        for (k, v) in [
            ("session", &q.session_id),
            ("collection", &q.collection_id),
            ("upgrade", &q.upgrade_id),
            ("task_id", &q.task_id),
            ("name", &q.name),
        ] {
            if let Some(v) = v {
                push(k, v);
            }
        }
        if let Some(t) = q.artifact_type {
            push("type", t.as_str());
        }
        if let Some(s) = q.status {
            push("status", s.as_str());
        }
        for t in &q.tags {
            push("tag", t);
        }
        if let Some(n) = q.min_size {
            push("min_size", &n.to_string());
        }
        if let Some(n) = q.max_size {
            push("max_size", &n.to_string());
        }
        if let Some(t) = q.created_since {
            let secs = (eks_upgrade_agent::model::now() - t).num_seconds().max(0);
            push("since", &format!("{secs}s"));
        }
        if let Some(c) = &q.cursor {
            push("cursor", c);
        }
        let path = format!("/api/v1/artifacts?{}", query.join("&"));
        let resp = self
            .authorize(self.store.agent().get(self.url(&path)))
            .call()
            .map_err(|e| self.unreachable(&e))?;
        let next_cursor = resp
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(ArtifactPage {
            artifacts: self.store.answer(resp)?,
            next_cursor,
        })
    }

    fn stats(&self, session: Option<&str>) -> Result<ArtifactStats> {
        match session {
            Some(s) => self
                .store
                .get_json(&format!("/api/v1/artifacts/stats?session={}", encode(s))),
            None => self.store.get_json("/api/v1/artifacts/stats"),
        }
    }

    fn artifact(&self, id: &str) -> Result<TestArtifact> {
        self.store
            .get_json(&format!("/api/v1/artifacts/{}", encode(id)))
    }

    fn delete_artifact(&self, id: &str) -> Result<TestArtifact> {
        from_value(self.send("DELETE", &format!("/api/v1/artifacts/{}", encode(id)))?)
    }

    fn open(&self, id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)> {
        let a = self.artifact(id)?;
        let digest: Digest = a.file_hash.parse()?;
        let resp = self
            .authorize(
                self.store
                    .agent()
                    .get(self.url(&format!("/api/v1/artifacts/{}/content", encode(id)))),
            )
            .call()
            .map_err(|e| self.unreachable(&e))?;
        if !resp.status().is_success() {
            return match self.store.answer::<Value>(resp) {
                Err(e) => Err(e),
                Ok(_) => Err(self.unreachable_status()),
            };
        }
        // Verified here too: what arrives must be the digest the index names.
        let reader = resp.into_body().into_reader();
        Ok((a, Box::new(VerifyingReader::new(reader, digest))))
    }

    fn export_session(
        &self,
        session: &str,
        dir: &Path,
        force: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ExportReport> {
        export_session_from(self, session, dir, force, progress)
    }

    fn verify(&self, _: &mut dyn FnMut(Progress)) -> Result<VerifyReport> {
        self.maintain("verify", &json!({}))
    }

    fn cleanup(&self, dry_run: bool, as_of: Option<DateTime<Utc>>) -> Result<CleanupReport> {
        self.maintain("cleanup", &json!({"dry_run": dry_run, "as_of": as_of}))
    }

    fn gc(&self) -> Result<GcReport> {
        self.maintain("gc", &json!({}))
    }
}

impl ExportSource for RemoteArtifacts {
    fn session_summary(&self, session_id: &str) -> Result<SessionSummary> {
        Artifacts::session_summary(self, session_id)
    }
    fn collections(&self, session_id: &str) -> Result<Vec<ArtifactCollection>> {
        Artifacts::collections(self, session_id)
    }
    fn for_each_artifact(
        &self,
        session_id: &str,
        f: &mut dyn FnMut(TestArtifact) -> Result<()>,
    ) -> Result<()> {
        // Every page, not only the first (a page holds at most 10,000).
        let mut cursor = None;
        loop {
            let page = self.search_page(&ArtifactQuery {
                session_id: Some(session_id.to_owned()),
                limit: eks_upgrade_agent::model::MAX_SEARCH_LIMIT,
                cursor: cursor.take(),
                ..ArtifactQuery::default()
            })?;
            page.artifacts.into_iter().try_for_each(&mut *f)?;
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(()),
            }
        }
    }
    fn open(&self, artifact_id: &str) -> Result<(TestArtifact, Box<dyn Read + Send>)> {
        Artifacts::open(self, artifact_id)
    }
}
