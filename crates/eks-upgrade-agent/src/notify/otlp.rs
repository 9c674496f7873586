//! [`OtlpSink`]: every upgrade as one OpenTelemetry trace, sent as OTLP/HTTP with protobuf
//! bodies (`POST .../v1/traces`, the official generated messages of `opentelemetry-proto`),
//! gzip-compressed when asked.
//!
//! The trace model:
//! - one trace per upgrade, its id derived from the upgrade id ([`trace_id`]);
//! - the root span is the upgrade (from its start to its end), exported when the upgrade
//!   completes or fails;
//! - each task attempt is a span under its parent task's span (or the root), exported when the
//!   attempt ends (completed, failed or cancelled), so a long upgrade exports its finished task
//!   spans as it goes. The attempt is the number of `task.retried` events of the task before the
//!   end; a retried task's new span carries a link to the failed attempt's span. Span ids derive
//!   from the upgrade id, the task id and the attempt ([`span_id`]): re-sending gives the same
//!   ids, and the same bytes.
//! - span events: the task's events of that attempt (the upgrade's own events for the root), at
//!   most [`MAX_SPAN_EVENTS`]: the first, the last and evenly spaced ones between
//!   ([`sample_indices`]); the others are counted in `dropped_events_count`.
//! - test runs of the upgrade: spans under the root ([`run_span_id`]), one event per failing
//!   test (sampled as above); each recorded run is exported once, by the trace-only
//!   [`TEST_RUN_TRACE`](super::TEST_RUN_TRACE) entry its transaction wrote
//!   ([`TraceSource::test_run`]), whatever its phase and result, before or after the upgrade's
//!   end.
//!
//! The outbox entry carries the ids, the seq and the time of the ending event; the sink reads the
//! rest when it delivers, through [`TraceSource`], only from what never changes after that event
//! (the append-only event log up to the entry's seq, a task's name, type and parent, an upgrade's
//! cluster, plan, metadata and start), so a late or repeated delivery sends the same span. See
//! ARCHITECTURE.md ("Notifications go through the outbox").

use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message as _;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::{EntryResult, EventSink, Notification};
use crate::error::{Error, Result};
use crate::model::{ProgressEvent, SuiteWindow, Task, TestResult, TestRun, TestStatus, Upgrade};

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "eks-upgrade-agent";
/// Most span events per span.
pub const MAX_SPAN_EVENTS: usize = 128;
/// Largest `details` object (serialized) copied into a span event, in bytes.
pub const MAX_EVENT_DETAILS: usize = 1024;

/// Compression of request bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// None (the OTLP default).
    #[default]
    None,
    /// gzip (`Content-Encoding: gzip`).
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Compression> {
        match s.trim() {
            "gzip" => Ok(Compression::Gzip),
            "none" | "" => Ok(Compression::None),
            _ => Err(Error::invalid(format!(
                "invalid OTLP compression {s:?}: expected gzip or none"
            ))),
        }
    }
}

/// OTLP settings of one layer (the configuration file, the environment, the flags); see
/// [`OtlpSettings::over`]. The sink is on when an endpoint is set.
#[derive(Clone, Default, PartialEq)]
pub struct OtlpSettings {
    /// The traces URL, e.g. `https://collector.example.com:4318/v1/traces`.
    pub endpoint: Option<String>,
    /// Request headers (values hidden from `Debug`: they often carry API keys).
    pub headers: Vec<(String, String)>,
    /// Body compression.
    pub compression: Option<Compression>,
    /// `service.name` of the resource.
    pub service_name: Option<String>,
    /// Further resource attributes.
    pub resource_attributes: Vec<(String, String)>,
    /// Timeout of one export.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpSettings")
            .field(
                "endpoint",
                &self.endpoint.as_deref().map(crate::net::redact),
            )
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(k, _)| format!("{k}=<hidden>"))
                    .collect::<Vec<_>>(),
            )
            .field("compression", &self.compression)
            .field("service_name", &self.service_name)
            .field("resource_attributes", &self.resource_attributes)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `base` with the traces path appended, as `OTEL_EXPORTER_OTLP_ENDPOINT` is used:
/// `http://localhost:4318` -> `http://localhost:4318/v1/traces`.
pub fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

/// The traces URL of an endpoint given on the command line or in the configuration file:
/// `/v1/traces` is appended unless it is already there.
pub fn endpoint_url(given: &str) -> String {
    let given = given.trim();
    if given.trim_end_matches('/').ends_with("/v1/traces") {
        given.trim_end_matches('/').to_owned()
    } else {
        traces_url(given)
    }
}

/// Parses `k=v,k2=v2` (the format of `OTEL_EXPORTER_OTLP_HEADERS` and
/// `OTEL_RESOURCE_ATTRIBUTES`; values percent-decoded, blanks around items ignored). `what`
/// names the setting in errors.
pub fn parse_pairs(what: &str, s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in s.split(',') {
        if item.trim().is_empty() {
            continue;
        }
        out.push(parse_pair(what, item)?);
    }
    Ok(out)
}

/// Parses one `k=v` (value percent-decoded).
pub fn parse_pair(what: &str, item: &str) -> Result<(String, String)> {
    let Some((k, v)) = item.split_once('=') else {
        return Err(Error::invalid(format!(
            "invalid {what} entry {:?}: expected key=value",
            item.trim()
        )));
    };
    let k = k.trim();
    if k.is_empty() {
        return Err(Error::invalid(format!(
            "invalid {what} entry {:?}: the key is empty",
            item.trim()
        )));
    }
    let v = url::form_urlencoded::parse(format!("v={}", v.trim().replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    Ok((k.to_owned(), v))
}

/// Sets `k` to `v` in `pairs` (keys compared without case when `fold`), or appends it.
fn upsert(pairs: &mut Vec<(String, String)>, k: String, v: String, fold: bool) {
    match pairs.iter_mut().find(|(x, _)| {
        if fold {
            x.eq_ignore_ascii_case(&k)
        } else {
            *x == k
        }
    }) {
        Some(p) => p.1 = v,
        None => pairs.push((k, v)),
    }
}

impl OtlpSettings {
    /// The standard `OTEL_*` variables of this process (see [`from_vars`](Self::from_vars)).
    pub fn from_env() -> Result<OtlpSettings> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The standard variables, read through `var`: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as
    /// is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended), `..._HEADERS`,
    /// `..._COMPRESSION`, `..._TIMEOUT` (milliseconds; the `TRACES_` form wins over the general
    /// one), `OTEL_EXPORTER_OTLP_PROTOCOL` (only `http/protobuf`), `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`. Empty variables count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<OtlpSettings> {
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let either = |name: &str| {
            let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{name}");
            let general = format!("OTEL_EXPORTER_OTLP_{name}");
            get(&traces)
                .map(|v| (traces.clone(), v))
                .or_else(|| get(&general).map(|v| (general.clone(), v)))
        };
        let mut s = OtlpSettings {
            endpoint: get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .map(|e| e.trim().to_owned())
                .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| traces_url(e.trim()))),
            ..OtlpSettings::default()
        };
        // Another tool's protocol setting matters only when the environment turns us on.
        if let Some((name, p)) = either("PROTOCOL")
            && s.endpoint.is_some()
            && p.trim() != "http/protobuf"
        {
            return Err(Error::invalid(format!(
                "{name}={:?} is not supported: the OTLP sink sends http/protobuf; set it to \
                 http/protobuf or unset it",
                p.trim()
            )));
        }
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(h) = get(name) {
                for (k, v) in parse_pairs(name, &h)? {
                    upsert(&mut s.headers, k, v, true);
                }
            }
        }
        if let Some((name, c)) = either("COMPRESSION") {
            s.compression = Some(c.parse().map_err(|_| {
                Error::invalid(format!(
                    "invalid {name} {:?}: expected gzip or none",
                    c.trim()
                ))
            })?);
        }
        if let Some((name, t)) = either("TIMEOUT") {
            let ms: u64 = t.trim().parse().map_err(|_| {
                Error::invalid(format!(
                    "invalid {name} {:?}: expected milliseconds, e.g. 10000",
                    t.trim()
                ))
            })?;
            s.timeout = Some(Duration::from_millis(ms.max(1)));
        }
        s.service_name = get("OTEL_SERVICE_NAME").map(|n| n.trim().to_owned());
        if let Some(a) = get("OTEL_RESOURCE_ATTRIBUTES") {
            s.resource_attributes = parse_pairs("OTEL_RESOURCE_ATTRIBUTES", &a)?;
        }
        Ok(s)
    }

    /// `self` over `lower`: what `self` sets wins; headers and resource attributes merge key by
    /// key, `self`'s value winning.
    pub fn over(self, lower: OtlpSettings) -> OtlpSettings {
        let mut headers = lower.headers;
        for (k, v) in self.headers {
            upsert(&mut headers, k, v, true);
        }
        let mut resource_attributes = lower.resource_attributes;
        for (k, v) in self.resource_attributes {
            upsert(&mut resource_attributes, k, v, false);
        }
        OtlpSettings {
            endpoint: self.endpoint.or(lower.endpoint),
            headers,
            compression: self.compression.or(lower.compression),
            service_name: self.service_name.or(lower.service_name),
            resource_attributes,
            timeout: self.timeout.or(lower.timeout),
        }
    }
}

/// What the sink reads, when it delivers, to build a span beyond what the outbox entry carries.
/// Everything it asks for is fixed once the entry's event is committed.
pub trait TraceSource: Send + Sync + fmt::Debug {
    /// The upgrade (cluster, plan, metadata, start).
    fn upgrade(&self, upgrade_id: &str) -> Result<Upgrade>;
    /// The task (name, type, parent).
    fn task(&self, upgrade_id: &str, task_id: &str) -> Result<Task>;
    /// The history of one attempt: of task `task_id` (the attempt running at `upto`), or of
    /// the upgrade itself (`None`), from the events with `seq <= upto`. `max_events` bounds the
    /// events returned (see [`sample_indices`]).
    fn span_history(
        &self,
        upgrade_id: &str,
        task_id: Option<&str>,
        upto: u64,
        max_events: usize,
    ) -> Result<SpanHistory>;

    /// Everything the spans of one batch need, one answer per ask, in order. The default asks
    /// [`TraceSource::upgrade`], [`TraceSource::task`] and [`TraceSource::span_history`] for
    /// each; a backend can answer the whole batch from one snapshot instead (the SQLite store
    /// reads it in one read transaction: one snapshot and a page cache that stays warm, where
    /// one statement at a time began a transaction and dropped the cache per statement while
    /// progress calls were committing).
    fn span_facts(&self, asks: &[SpanAsk<'_>], max_events: usize) -> Vec<Result<SpanFacts>> {
        asks.iter()
            .map(|a| {
                let upgrade = self.upgrade(a.upgrade_id)?;
                let Some(task_id) = a.task_id else {
                    let history = self.span_history(a.upgrade_id, None, a.upto, max_events)?;
                    return Ok(SpanFacts {
                        upgrade,
                        task: None,
                        history,
                        parent_attempt: None,
                    });
                };
                let task = self.task(a.upgrade_id, task_id)?;
                let history = self.span_history(a.upgrade_id, Some(task_id), a.upto, max_events)?;
                let parent_attempt = match &task.parent_task_id {
                    Some(p) => Some(self.span_history(a.upgrade_id, Some(p), a.upto, 0)?.attempt),
                    None => None,
                };
                Ok(SpanFacts {
                    upgrade,
                    task: Some(task),
                    history,
                    parent_attempt,
                })
            })
            .collect()
    }

    /// One test run (`None` when the backend keeps no test results): the run a
    /// [`TEST_RUN_TRACE`](super::TEST_RUN_TRACE) entry names, exported with it (whatever its
    /// phase and result, before or after the upgrade's end).
    fn test_run(&self, run_id: &str, max_events: usize) -> Result<Option<RunFacts>> {
        let _ = (run_id, max_events);
        Ok(None)
    }
}

/// `m` cut to at most [`MAX_EVENT_DETAILS`] bytes on a character boundary, `…` marking a cut.
pub(crate) fn cut(mut m: String) -> String {
    if m.len() <= MAX_EVENT_DETAILS {
        return m;
    }
    let mut end = MAX_EVENT_DETAILS - '…'.len_utf8();
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m.truncate(end);
    m.push('…');
    m
}

/// A test run as its span needs it ([`TraceSource::test_run`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunFacts {
    /// The run (its counts, suites, phase, time).
    pub run: TestRun,
    /// Its failing tests (failed or error), in (suite, class name, name) order, sampled down
    /// to `max_events` as [`sample_indices`] does; messages cut to [`MAX_EVENT_DETAILS`] bytes.
    pub failures: Vec<TestResult>,
    /// How many failing tests the run has in all.
    pub total_failures: u64,
    /// How long the run took, in seconds: its longest suite's total test time (suites may run
    /// in parallel; the tests of one suite are taken to run one after another). Used only
    /// without a [`window`](RunFacts::window).
    pub lasted: f64,
    /// When its suites ran, from their earliest `<testsuite timestamp>` to their latest end
    /// (timestamp plus `time`); `None` when no report gave a timestamp.
    pub window: Option<SuiteWindow>,
}

/// One span the sink is about to build: the span of the upgrade (`task_id` `None`) or of the
/// attempt of a task running at `upto`, the seq of the event that ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanAsk<'a> {
    /// The upgrade.
    pub upgrade_id: &'a str,
    /// The task, or `None` for the upgrade's root span.
    pub task_id: Option<&'a str>,
    /// The seq of the ending event.
    pub upto: u64,
}

/// What [`TraceSource::span_facts`] answers for one [`SpanAsk`].
#[derive(Debug, Clone, PartialEq)]
pub struct SpanFacts {
    /// The upgrade.
    pub upgrade: Upgrade,
    /// The task (`None` for the root span).
    pub task: Option<Task>,
    /// The attempt's history, as [`TraceSource::span_history`] gives it.
    pub history: SpanHistory,
    /// The attempt of the task's parent running at `upto` (`None` without a parent).
    pub parent_attempt: Option<u32>,
}

/// One attempt's history, as [`TraceSource::span_history`] finds it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanHistory {
    /// The attempt: the number of `task.retried` events of the task up to `upto` (0 for the
    /// upgrade).
    pub attempt: u32,
    /// When the attempt began: its first event (not counting `task.added`).
    pub start: Option<DateTime<Utc>>,
    /// Its events, oldest first, sampled down to `max_events`.
    pub events: Vec<ProgressEvent>,
    /// How many events the attempt has in all.
    pub total_events: u64,
}

/// Which of `n` items to keep when at most `max` may be: all when they fit; otherwise the
/// first, the last and evenly spaced ones between (`i * (n - 1) / (max - 1)`), in order.
pub fn sample_indices(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    match max {
        0 => Vec::new(),
        1 => vec![n - 1],
        _ => (0..max)
            .map(|i| ((i as u128 * (n as u128 - 1)) / (max as u128 - 1)) as usize)
            .collect(),
    }
}

fn hash(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// The trace id of an upgrade: the first 16 bytes of SHA-256 over a fixed tag and the id
/// (never all zero).
pub fn trace_id(upgrade_id: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    id.copy_from_slice(&hash(&["eks-upgrade-agent/trace", upgrade_id])[..16]);
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

/// The span id of a test run of the upgrade (a child of the root span): the first 8 bytes of
/// SHA-256 over a fixed tag and the ids (never all zero).
pub fn run_span_id(upgrade_id: &str, run_id: &str) -> [u8; 8] {
    let digest = hash(&["eks-upgrade-agent/test_run", upgrade_id, run_id]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// The span id of the upgrade (`task` `None`: the root span) or of attempt `attempt` of a task:
/// the first 8 bytes of SHA-256 over a fixed tag, the ids and the attempt (never all zero).
pub fn span_id(upgrade_id: &str, task: Option<(&str, u32)>) -> [u8; 8] {
    let digest = match task {
        None => hash(&["eks-upgrade-agent/upgrade", upgrade_id]),
        Some((task_id, attempt)) => hash(&[
            "eks-upgrade-agent/task",
            upgrade_id,
            task_id,
            &attempt.to_string(),
        ]),
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

fn kv(key: impl Into<String>, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn s(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

fn json_kv(key: String, v: &Value) -> KeyValue {
    use any_value::Value as V;
    let value = match v {
        Value::String(x) => V::StringValue(x.clone()),
        Value::Bool(b) => V::BoolValue(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => V::IntValue(i),
            (None, Some(f)) => V::DoubleValue(f),
            _ => V::StringValue(n.to_string()),
        },
        other => V::StringValue(other.to_string()),
    };
    kv(key, value)
}

fn nanos(t: DateTime<Utc>) -> u64 {
    t.timestamp_nanos_opt().map_or(0, |n| n.max(0) as u64)
}

/// `otlp:HOST[:PORT]#xxxxxx`: no path, query or credentials; 6 hex digits of the URL's SHA-256
/// tell two endpoints on one host apart.
fn label(url: &str) -> String {
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| {
            let h = u.host_str()?.to_owned();
            Some(match u.port() {
                Some(p) => format!("{h}:{p}"),
                None => h,
            })
        })
        .unwrap_or_default();
    let digest = hex::encode(&Sha256::digest(url.as_bytes())[..3]);
    format!("otlp:{host}#{digest}")
}

/// The transport of traces to one OTLP/HTTP endpoint: its URL, headers, compression and
/// resource. [`OtlpSink`] sends through one; so can other producers of spans (the server's
/// request spans). Checked once, by [`OtlpExporter::new`].
pub struct OtlpExporter {
    label: String,
    url: String,
    headers: Vec<(String, String)>,
    compression: Compression,
    resource: Resource,
    agent: ureq::Agent,
}

impl fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("label", &self.label)
            .field("headers", &self.headers.len())
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

/// Sends every upgrade as a trace to an OTLP/HTTP endpoint.
pub struct OtlpSink {
    /// Delivery-state key (holds the URL: never shown).
    name: String,
    exporter: OtlpExporter,
    source: Arc<dyn TraceSource>,
}

impl fmt::Debug for OtlpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpSink")
            .field("exporter", &self.exporter)
            .finish_non_exhaustive()
    }
}

fn check_header(k: &str, v: &str) -> Result<()> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if k.is_empty() || !k.chars().all(token) {
        return Err(Error::invalid(format!(
            "invalid OTLP header name {k:?}: use letters, digits and -"
        )));
    }
    if v.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Error::invalid(format!(
            "invalid value of OTLP header {k:?}: it must not hold control characters"
        )));
    }
    Ok(())
}

impl OtlpExporter {
    /// The exporter of `settings` (which must name an endpoint; `timeout` unless they set
    /// one). The endpoint must be an http(s) URL; plain http only to this machine (headers
    /// often carry API keys).
    pub fn new(settings: &OtlpSettings, timeout: Duration) -> Result<OtlpExporter> {
        let Some(url) = settings.endpoint.as_deref() else {
            return Err(Error::invalid(
                "no OTLP endpoint: set --otlp-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT",
            ));
        };
        let shown = crate::net::redact(url);
        let parsed = url::Url::parse(url).map_err(|_| {
            Error::invalid(format!(
                "invalid OTLP endpoint {shown:?}: expected a URL such as https://collector.example.com:4318"
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "invalid OTLP endpoint {shown:?}: expected http:// or https://"
            )));
        }
        if crate::net::is_plain_http(url) && !crate::net::is_loopback(url) {
            return Err(Error::invalid(format!(
                "refusing plain http to the OTLP endpoint {}: only loopback endpoints \
                 (localhost, 127.0.0.0/8, [::1]) may use http; use https",
                label(url)
            )));
        }
        for (k, v) in &settings.headers {
            check_header(k, v)?;
        }
        let mut attributes = Vec::new();
        let service = settings
            .service_name
            .clone()
            .or_else(|| {
                settings
                    .resource_attributes
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        attributes.push(s("service.name", service));
        if !settings
            .resource_attributes
            .iter()
            .any(|(k, _)| k == "service.version")
        {
            attributes.push(s("service.version", env!("CARGO_PKG_VERSION")));
        }
        for (k, v) in &settings.resource_attributes {
            if k != "service.name" {
                attributes.push(s(k, v.clone()));
            }
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout.unwrap_or(timeout)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(OtlpExporter {
            label: label(url),
            url: url.to_owned(),
            headers: settings.headers.clone(),
            compression: settings.compression.unwrap_or_default(),
            resource: Resource {
                attributes,
                ..Resource::default()
            },
            agent,
        })
    }

    /// `otlp:HOST:PORT#xxxxxx`: the endpoint as shown to people (no secrets).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The export request of `spans` under this exporter's resource and the instrumentation
    /// scope `scope` (with this crate's version).
    pub fn request(&self, scope: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: scope.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// Sends `request` (one POST, no retry): `Delivered` on 2xx, `Reject` when the collector
    /// refuses the request itself (400, 413, 422), `Retry` otherwise; errors name the endpoint
    /// by its label only.
    pub fn send(&self, request: &ExportTraceServiceRequest) -> EntryResult {
        let body = self.body(request);
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/x-protobuf");
        if self.compression == Compression::Gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send(&body[..]) {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match status {
                    200..=299 => EntryResult::Delivered,
                    // OTLP/HTTP: 400 is a malformed request, never retried.
                    400 | 413 | 422 => {
                        EntryResult::Reject(format!("{} answered {status}", self.label))
                    }
                    _ => EntryResult::Retry(format!("{} answered {status}", self.label)),
                }
            }
            Err(e) => EntryResult::Retry(format!(
                "{}: {}",
                self.label,
                e.to_string().replace(&self.url, "<url>")
            )),
        }
    }

    fn body(&self, request: &ExportTraceServiceRequest) -> Vec<u8> {
        let raw = request.encode_to_vec();
        match self.compression {
            Compression::None => raw,
            Compression::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                // Writing to a Vec cannot fail.
                let _ = gz.write_all(&raw);
                gz.finish().unwrap_or_default()
            }
        }
    }
}

impl OtlpSink {
    /// A sink for `settings` (which must name an endpoint, see [`OtlpExporter::new`]),
    /// reading spans' history from `source`.
    pub fn new(
        settings: &OtlpSettings,
        source: Arc<dyn TraceSource>,
        timeout: Duration,
    ) -> Result<OtlpSink> {
        let exporter = OtlpExporter::new(settings, timeout)?;
        Ok(OtlpSink {
            name: format!("otlp:{}", exporter.url),
            exporter,
            source,
        })
    }

    /// The export request for `batch`, and for each entry whether it carries a span (`None`:
    /// nothing to send for it) or why it could not be built.
    pub fn request(
        &self,
        batch: &[Notification],
    ) -> (ExportTraceServiceRequest, Vec<Option<EntryResult>>) {
        let (request, fates, _) = self.request_with_owners(batch);
        (request, fates)
    }

    /// [`request`](Self::request), with the index in `batch` of the entry each span is for,
    /// in span order.
    fn request_with_owners(
        &self,
        batch: &[Notification],
    ) -> (
        ExportTraceServiceRequest,
        Vec<Option<EntryResult>>,
        Vec<usize>,
    ) {
        let mut owners = Vec::new();
        let mut fates: Vec<Option<EntryResult>> = Vec::with_capacity(batch.len());
        // The entries that end a span, with what to ask the source for them.
        let mut asks = Vec::new();
        let mut asked = Vec::new();
        // The trace-only entries of recorded test runs, with the run each names.
        let mut runs_asked = Vec::new();
        for (i, n) in batch.iter().enumerate() {
            if n.detail_type == super::TEST_RUN_TRACE {
                match n.detail.get("run_id").and_then(Value::as_str) {
                    Some(run_id) => {
                        runs_asked.push((i, run_id));
                        fates.push(None);
                    }
                    None => fates.push(Some(self.unbuilt(Error::invalid(format!(
                        "a {} notification without a run_id",
                        super::TEST_RUN_TRACE
                    ))))),
                }
                continue;
            }
            match span_ask(n) {
                Ok(Some(ask)) => {
                    asks.push(ask);
                    asked.push(i);
                    fates.push(None);
                }
                Ok(None) => fates.push(Some(EntryResult::Delivered)),
                Err(e) => fates.push(Some(self.unbuilt(e))),
            }
        }
        let facts = if asks.is_empty() {
            Vec::new()
        } else {
            self.source.span_facts(&asks, MAX_SPAN_EVENTS)
        };
        let mut facts = facts.into_iter();
        let mut spans = Vec::with_capacity(asks.len());
        for i in asked {
            let f = facts
                .next()
                .unwrap_or_else(|| Err(Error::invalid("the trace source answered too few asks")));
            match f {
                Ok(f) => {
                    spans.push(self.span(&batch[i], f));
                    owners.push(i);
                }
                Err(e) => fates[i] = Some(self.unbuilt(e)),
            }
        }
        for (i, run_id) in runs_asked {
            let r = match self.source.test_run(run_id, MAX_SPAN_EVENTS) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    fates[i] = Some(EntryResult::Delivered);
                    continue;
                }
                Err(e) => {
                    fates[i] = Some(self.unbuilt(e));
                    continue;
                }
            };
            // Test runs may name an upgrade the progress store does not track.
            let upgrade = match self.source.upgrade(&r.run.upgrade_id) {
                Ok(u) => Some(u),
                Err(Error::NotFound { .. }) => None,
                Err(e) => {
                    fates[i] = Some(self.unbuilt(e));
                    continue;
                }
            };
            spans.push(run_span(upgrade.as_ref(), &r));
            owners.push(i);
        }
        let request = self.exporter.request("eks-upgrade-agent", spans);
        (request, fates, owners)
    }

    /// The fate of an entry whose span could not be built: a missing upgrade or task never
    /// appears later (dead), anything else is retried.
    fn unbuilt(&self, e: Error) -> EntryResult {
        let message = format!("{}: cannot build the span: {e}", self.exporter.label);
        match e {
            Error::NotFound { .. } => EntryResult::Reject(message),
            _ => EntryResult::Retry(message),
        }
    }

    /// The span notification `n` ends, from what the source answered for it.
    fn span(&self, n: &Notification, facts: SpanFacts) -> Span {
        let SpanFacts {
            upgrade,
            task,
            history,
            parent_attempt,
        } = facts;
        let uid = upgrade.upgrade_id.as_str();
        let mut attributes = vec![
            s("eks.upgrade.id", uid),
            s("eks.cluster.name", upgrade.cluster_name.clone()),
            s("eks.plan.id", upgrade.plan_id.clone()),
            s("cicd.pipeline.name", pipeline_name(&upgrade)),
            s("cicd.pipeline.run.id", uid),
        ];
        for (k, v) in &upgrade.metadata {
            attributes.push(json_kv(format!("eks.meta.{k}"), v));
        }
        let error = n
            .detail
            .get("error_message")
            .and_then(Value::as_str)
            .or_else(|| n.detail.get("message").and_then(Value::as_str))
            .unwrap_or("failed")
            .to_owned();
        let result = match n.detail_type.as_str() {
            "task.completed" | "upgrade.completed" => "success",
            "task.failed" | "upgrade.failed" => "failure",
            _ => "cancellation",
        };
        let status = Some(match result {
            "success" => Status {
                code: status::StatusCode::Ok as i32,
                message: String::new(),
            },
            "failure" => Status {
                code: status::StatusCode::Error as i32,
                message: error,
            },
            _ => Status::default(),
        });
        let (name, span_id, parent, history, links) = match task {
            None => {
                attributes.push(s("cicd.pipeline.result", result));
                (
                    pipeline_name(&upgrade),
                    span_id(uid, None),
                    Vec::new(),
                    SpanHistory {
                        start: upgrade.started_at.or(Some(upgrade.created_at)),
                        ..history
                    },
                    Vec::new(),
                )
            }
            Some(task) => {
                let task_id = task.task_id.as_str();
                let h = history;
                let parent = match (&task.parent_task_id, parent_attempt) {
                    (Some(p), Some(pa)) => span_id(uid, Some((p, pa))),
                    _ => span_id(uid, None),
                };
                let run_id = format!("{task_id}#{}", h.attempt);
                attributes.extend([
                    s("eks.task.id", task_id),
                    s("eks.task.type", task.task_type.as_str()),
                    kv(
                        "eks.task.attempt",
                        any_value::Value::IntValue(h.attempt.into()),
                    ),
                    s("cicd.pipeline.task.name", task.name.clone()),
                    s("cicd.pipeline.task.run.id", run_id),
                    s("cicd.pipeline.task.run.result", result),
                ]);
                let links = if h.attempt > 0 {
                    vec![span::Link {
                        trace_id: trace_id(uid).to_vec(),
                        span_id: span_id(uid, Some((task_id, h.attempt - 1))).to_vec(),
                        attributes: vec![s("eks.link", "previous_attempt")],
                        ..span::Link::default()
                    }]
                } else {
                    Vec::new()
                };
                (
                    task.name.clone(),
                    span_id(uid, Some((task_id, h.attempt))),
                    parent.to_vec(),
                    h,
                    links,
                )
            }
        };
        let events: Vec<span::Event> = history.events.iter().map(span_event).collect();
        let dropped = history
            .total_events
            .saturating_sub(events.len() as u64)
            .min(u64::from(u32::MAX)) as u32;
        Span {
            trace_id: trace_id(uid).to_vec(),
            span_id: span_id.to_vec(),
            parent_span_id: parent,
            name,
            kind: span::SpanKind::Internal as i32,
            start_time_unix_nano: nanos(history.start.unwrap_or(n.time).min(n.time)),
            end_time_unix_nano: nanos(n.time),
            attributes,
            events,
            dropped_events_count: dropped,
            links,
            status,
            ..Span::default()
        }
    }
}

/// What to ask the source for the span notification `n` ends (`None`: it ends none).
fn span_ask(n: &Notification) -> Result<Option<SpanAsk<'_>>> {
    let ends_task = matches!(
        n.detail_type.as_str(),
        "task.completed" | "task.failed" | "task.cancelled"
    );
    let ends_upgrade = matches!(
        n.detail_type.as_str(),
        "upgrade.completed" | "upgrade.failed"
    );
    if !ends_task && !ends_upgrade {
        return Ok(None);
    }
    let task_id = if ends_task {
        Some(
            n.detail
                .get("task_id")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::invalid("a task notification without a task_id"))?,
        )
    } else {
        None
    };
    Ok(Some(SpanAsk {
        upgrade_id: &n.upgrade_id,
        task_id,
        upto: n.seq,
    }))
}

/// The span of a test run: a child of the upgrade's root span, over its suites' times
/// ([`RunFacts::window`]: the earliest suite timestamp to the latest suite end) when the
/// reports give them and they end before the recording (5 min of clock skew allowed), else from the run's start (its recording time less its longest suite's
/// total test time, [`RunFacts::lasted`]) to its recording; the run's counts as
/// attributes; `ERROR` when tests failed; one event per failing test (sampled).
fn run_span(upgrade: Option<&Upgrade>, f: &RunFacts) -> Span {
    let run = &f.run;
    let uid = run.upgrade_id.as_str();
    let c = &run.counts;
    let failing = c.failed.saturating_add(c.errors);
    let result = if failing > 0 { "failure" } else { "success" };
    let name = run_span_name(run);
    let pipeline = match upgrade {
        Some(u) => pipeline_name(u),
        None => format!("eks upgrade {}", run.cluster_name),
    };
    let int = |k: &str, v: u64| kv(k, any_value::Value::IntValue(v.min(i64::MAX as u64) as i64));
    let mut attributes = vec![
        s("eks.upgrade.id", uid),
        s("eks.cluster.name", run.cluster_name.clone()),
    ];
    if let Some(u) = upgrade {
        attributes.push(s("eks.plan.id", u.plan_id.clone()));
    }
    attributes.extend([
        s("cicd.pipeline.name", pipeline),
        s("cicd.pipeline.run.id", uid),
        s("cicd.pipeline.task.name", name.clone()),
        s("cicd.pipeline.task.run.id", run.run_id.clone()),
        s("cicd.pipeline.task.type", "test"),
        s("cicd.pipeline.task.run.result", result),
        s("eks.test_run.id", run.run_id.clone()),
        s("eks.test_run.phase", run.phase.as_str()),
        s("test.suite.name", run.suites.join(", ")),
        s("test.suite.run.status", result),
        int("eks.tests.total", c.tests),
        int("eks.tests.passed", c.passed),
        int("eks.tests.failed", c.failed),
        int("eks.tests.errors", c.errors),
        int("eks.tests.skipped", c.skipped),
        int("eks.tests.flaky", c.flaky),
        kv(
            "eks.tests.duration",
            any_value::Value::DoubleValue(c.duration),
        ),
    ]);
    if let Some(u) = upgrade {
        for (k, v) in &u.metadata {
            attributes.push(json_kv(format!("eks.meta.{k}"), v));
        }
    }
    let status = if failing > 0 {
        Status {
            code: status::StatusCode::Error as i32,
            message: format!("{failing} of {} tests failed", c.tests),
        }
    } else {
        Status {
            code: status::StatusCode::Ok as i32,
            message: String::new(),
        }
    };
    let recorded = nanos(run.created_at);
    let (start, end) = match f.window {
        // Tests cannot end after their report was recorded: a window that does was read in
        // the wrong zone (a zone-less local time east of UTC) and is not used.
        Some(w) if nanos(w.end) <= recorded.saturating_add(WINDOW_SLACK_NANOS) => {
            let start = nanos(w.start);
            (start, nanos(w.end).max(start))
        }
        _ => {
            let end = recorded;
            let lasted = if f.lasted.is_finite() && f.lasted > 0.0 {
                (f.lasted * 1e9).min(end as f64) as u64
            } else {
                0
            };
            (end.saturating_sub(lasted), end)
        }
    };
    let events: Vec<span::Event> = f.failures.iter().map(|t| failure_event(t, end)).collect();
    let dropped = f
        .total_failures
        .saturating_sub(events.len() as u64)
        .min(u64::from(u32::MAX)) as u32;
    Span {
        trace_id: trace_id(uid).to_vec(),
        span_id: run_span_id(uid, &run.run_id).to_vec(),
        parent_span_id: span_id(uid, None).to_vec(),
        name,
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes,
        events,
        dropped_events_count: dropped,
        status: Some(status),
        ..Span::default()
    }
}

/// Most notifications the OTLP sink takes per delivery (at most one span each): a pass of the
/// notification thread over a busy upgrade sends few large requests rather than many small
/// ones (each request is a read transaction, a write transaction recording the outcomes and a
/// round trip; N22).
pub const MAX_BATCH_SPANS: usize = 200;

/// Most bytes of one export request (encoded, before compression): a batch whose spans encode
/// to more goes as several requests ([`split_request`]), so long spans (128 events with 1 KiB
/// details each) stay under collectors' request limits.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// `request` (one resource, one scope, as [`OtlpExporter::request`] builds it) as requests of
/// at most `max` encoded bytes each, its spans in order, each request with the same resource
/// and scope; a span larger than `max` alone goes in a request of its own.
pub fn split_request(
    request: ExportTraceServiceRequest,
    max: usize,
) -> Vec<ExportTraceServiceRequest> {
    if request.encoded_len() <= max {
        return vec![request];
    }
    let mut out = Vec::new();
    for rs in request.resource_spans {
        for ScopeSpans {
            scope,
            spans: all,
            schema_url,
        } in rs.scope_spans
        {
            let part = |spans: Vec<Span>| ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: rs.resource.clone(),
                    scope_spans: vec![ScopeSpans {
                        scope: scope.clone(),
                        spans,
                        schema_url: schema_url.clone(),
                    }],
                    schema_url: rs.schema_url.clone(),
                }],
            };
            // With room for the length prefixes of the scope and resource growing.
            let base = part(Vec::new()).encoded_len() + 16;
            let (mut spans, mut bytes) = (Vec::new(), base);
            for span in all {
                // The span's bytes with its field key and length prefix.
                let n = span.encoded_len() + 8;
                if bytes + n > max && !spans.is_empty() {
                    out.push(part(std::mem::take(&mut spans)));
                    bytes = base;
                }
                bytes += n;
                spans.push(span);
            }
            if !spans.is_empty() {
                out.push(part(spans));
            }
        }
    }
    out
}

/// How far past a run's recording its suites' window may end (clock skew between the test
/// runner and the recorder) before the window is taken as misread and not used.
const WINDOW_SLACK_NANOS: u64 = 300 * 1_000_000_000;

/// `tests post: smoke, api` (at most three suites named, then how many more).
fn run_span_name(run: &TestRun) -> String {
    let mut name = format!("tests {}", run.phase.as_str());
    if !run.suites.is_empty() {
        name.push_str(": ");
        name.push_str(
            &run.suites
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        );
        if run.suites.len() > 3 {
            name.push_str(&format!(" (+{} more)", run.suites.len() - 3));
        }
    }
    name
}

/// The span event of a failing test, at the run's end (tests carry no time of their own).
fn failure_event(t: &TestResult, at: u64) -> span::Event {
    let full = if t.classname.is_empty() {
        t.name.clone()
    } else {
        format!("{}.{}", t.classname, t.name)
    };
    let mut attributes = vec![
        s("test.case.name", full),
        s("test.case.result.status", "fail"),
        s("test.suite.name", t.suite.clone()),
        s("eks.test.id", t.test_id.clone()),
        s("eks.test.status", t.status.as_str()),
        kv(
            "eks.test.attempts",
            any_value::Value::IntValue(t.attempts.into()),
        ),
        kv(
            "eks.test.duration",
            any_value::Value::DoubleValue(t.duration),
        ),
    ];
    if let Some(m) = &t.message {
        attributes.push(s("eks.message", m.clone()));
    }
    span::Event {
        time_unix_nano: at,
        name: if t.status == TestStatus::Error {
            "test.error".into()
        } else {
            "test.failed".into()
        },
        attributes,
        dropped_attributes_count: 0,
    }
}

/// `cicd.pipeline.name` and the root span's name.
fn pipeline_name(u: &Upgrade) -> String {
    format!("eks upgrade {}", u.cluster_name)
}

fn span_event(e: &ProgressEvent) -> span::Event {
    let mut attributes = vec![
        kv("eks.event.seq", any_value::Value::IntValue(e.seq as i64)),
        s("eks.event.id", e.event_id.clone()),
        s("eks.status", e.status.as_str()),
        kv(
            "eks.percentage",
            any_value::Value::DoubleValue(e.percentage),
        ),
    ];
    if let Some(m) = &e.message {
        attributes.push(s("eks.message", m.clone()));
    }
    if !e.details.is_empty()
        && let Ok(d) = serde_json::to_string(&e.details)
        && d.len() <= MAX_EVENT_DETAILS
    {
        attributes.push(s("eks.details", d));
    }
    span::Event {
        time_unix_nano: nanos(e.timestamp),
        name: e.kind.as_str().to_owned(),
        attributes,
        dropped_attributes_count: 0,
    }
}

impl EventSink for OtlpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn label(&self) -> &str {
        self.exporter.label()
    }

    fn kinds(&self) -> super::Kinds {
        super::Kinds::All
    }

    /// [`MAX_BATCH_SPANS`].
    fn max_batch(&self) -> usize {
        MAX_BATCH_SPANS
    }

    /// One export request for the batch's spans, or several when they encode to more than
    /// [`MAX_REQUEST_BYTES`] ([`split_request`]), sent in order until one fails
    /// (`part_outcomes`): each entry gets the outcome of the request its span went in, and
    /// the entries of requests not sent after a failure are retried.
    fn deliver(&self, batch: &[Notification]) -> Vec<EntryResult> {
        let (request, fates, owners) = self.request_with_owners(batch);
        if owners.is_empty() {
            return fates
                .into_iter()
                .map(|f| f.unwrap_or(EntryResult::Delivered))
                .collect();
        }
        let parts = split_request(request, MAX_REQUEST_BYTES);
        part_outcomes(fates, &owners, &parts, |part| self.exporter.send(part))
    }
}

/// The spans of one request built by [`OtlpExporter::request`] or [`split_request`].
fn span_count(request: &ExportTraceServiceRequest) -> usize {
    request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum()
}

/// Sends `parts` in order with `send` until one is not delivered, and gives each entry
/// without a fate yet the outcome of the part its span went in (`owners`: the entry of each
/// span, in span order, as the parts hold them): `Delivered` for the parts sent before, the
/// failed part's own outcome for its entries, and `Retry` for the entries of the parts never
/// sent (a refused part says nothing of them, so none is dead-lettered unsent).
fn part_outcomes(
    mut fates: Vec<Option<EntryResult>>,
    owners: &[usize],
    parts: &[ExportTraceServiceRequest],
    mut send: impl FnMut(&ExportTraceServiceRequest) -> EntryResult,
) -> Vec<EntryResult> {
    let mut owners = owners.iter();
    let mut failed: Option<String> = None;
    for part in parts {
        let outcome = match &failed {
            None => send(part),
            Some(why) => EntryResult::Retry(format!(
                "not sent: an earlier request of the same batch failed ({why})"
            )),
        };
        if failed.is_none() {
            match &outcome {
                EntryResult::Delivered => {}
                EntryResult::Retry(m) | EntryResult::Reject(m) => failed = Some(m.clone()),
            }
        }
        for &i in owners.by_ref().take(span_count(part)) {
            fates[i] = Some(outcome.clone());
        }
    }
    // Every span went in a part; an entry left without a fate would be a bug: retry it.
    fates
        .into_iter()
        .map(|f| f.unwrap_or_else(|| EntryResult::Retry("not sent".into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    /// A batch sent as several requests: the entries of the parts delivered before a refused
    /// one are delivered, the refused part's entries take its outcome, and the entries of the
    /// parts never sent are retried, not dead-lettered with it; entries decided before the
    /// send (no span) keep their fate.
    #[test]
    fn each_entry_gets_the_outcome_of_its_own_request() {
        let exporter = OtlpExporter::new(
            &OtlpSettings {
                endpoint: Some("http://127.0.0.1:1/v1/traces".into()),
                ..OtlpSettings::default()
            },
            Duration::from_secs(1),
        )
        .unwrap();
        let span = |i: usize| Span {
            span_id: (i as u64).to_be_bytes().to_vec(),
            name: format!("s{i}"),
            attributes: vec![s("pad", "x".repeat(100_000))],
            ..Span::default()
        };
        // Entries 0..=6; entry 3 has no span (decided before the send); the spans are for
        // entries 0, 1, 2, 4, 5, 6 in that order, two to a part.
        let owners = [0, 1, 2, 4, 5, 6];
        let whole = exporter.request("scope", owners.iter().map(|&i| span(i)).collect());
        let parts = split_request(whole, 250_000);
        assert_eq!(parts.iter().map(span_count).collect::<Vec<_>>(), [2, 2, 2]);
        let mut fates: Vec<Option<EntryResult>> = vec![None; 7];
        fates[3] = Some(EntryResult::Reject("no such task".into()));
        let mut sent = 0;
        let out = part_outcomes(fates, &owners, &parts, |_| {
            sent += 1;
            if sent == 2 {
                EntryResult::Reject("collector answered 400".into())
            } else {
                EntryResult::Delivered
            }
        });
        assert_eq!(sent, 2, "nothing is sent after a refused part");
        let kind = |r: &EntryResult| match r {
            EntryResult::Delivered => "delivered",
            EntryResult::Retry(_) => "retry",
            EntryResult::Reject(_) => "reject",
        };
        assert_eq!(
            out.iter().map(kind).collect::<Vec<_>>(),
            [
                "delivered",
                "delivered",
                "reject",
                "reject",
                "reject",
                "retry",
                "retry"
            ]
        );
        // All delivered: every entry with a span is delivered.
        let mut fates: Vec<Option<EntryResult>> = vec![None; 7];
        fates[3] = Some(EntryResult::Delivered);
        let out = part_outcomes(fates, &owners, &parts, |_| EntryResult::Delivered);
        assert_eq!(
            out.iter().map(kind).filter(|k| *k == "delivered").count(),
            7
        );
    }

    /// N22's larger batches stay under collectors' request limits: a request over the limit
    /// goes as several, each at most the limit, the spans in order, each with the resource and
    /// scope; one under it is sent as is; a span over the limit alone goes on its own.
    #[test]
    fn large_requests_are_split() {
        let exporter = OtlpExporter::new(
            &OtlpSettings {
                endpoint: Some("http://127.0.0.1:1/v1/traces".into()),
                ..OtlpSettings::default()
            },
            Duration::from_secs(1),
        )
        .unwrap();
        let span = |i: usize, size: usize| Span {
            span_id: (i as u64).to_be_bytes().to_vec(),
            name: format!("s{i}"),
            attributes: vec![s("pad", "x".repeat(size))],
            ..Span::default()
        };
        let spans: Vec<Span> = (0..30).map(|i| span(i, 100_000)).collect();
        let whole = exporter.request("scope", spans.clone());
        assert!(whole.encoded_len() > 2_900_000);
        let parts = split_request(whole.clone(), 1_000_000);
        assert!(parts.len() >= 3, "{}", parts.len());
        let mut again = Vec::new();
        for p in &parts {
            assert!(p.encoded_len() <= 1_000_000, "{}", p.encoded_len());
            let rs = &p.resource_spans[0];
            assert_eq!(rs.resource, whole.resource_spans[0].resource);
            assert_eq!(
                rs.scope_spans[0].scope,
                whole.resource_spans[0].scope_spans[0].scope
            );
            again.extend(rs.scope_spans[0].spans.iter().cloned());
        }
        assert_eq!(again, spans);
        assert_eq!(split_request(whole.clone(), 4_000_000), vec![whole]);
        let big = exporter.request("scope", vec![span(0, 10), span(1, 2_000_000), span(2, 10)]);
        let parts = split_request(big, 1_000_000);
        let names: Vec<Vec<&str>> = parts
            .iter()
            .map(|p| {
                p.resource_spans[0].scope_spans[0]
                    .spans
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect()
            })
            .collect();
        assert_eq!(names, [vec!["s0"], vec!["s1"], vec!["s2"]]);
    }

    #[test]
    fn standard_variables() {
        let s = OtlpSettings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318/"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,x-team = ops"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "API-KEY=c"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_SERVICE_NAME", "upgrader"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,team=a%2Cb",
            ),
        ]))
        .unwrap();
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://localhost:4318/v1/traces")
        );
        assert_eq!(
            s.headers,
            vec![
                ("api-key".to_owned(), "c".to_owned()),
                ("x-team".to_owned(), "ops".to_owned())
            ]
        );
        assert_eq!(s.compression, Some(Compression::Gzip));
        assert_eq!(s.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(s.service_name.as_deref(), Some("upgrader"));
        assert_eq!(s.resource_attributes[1].1, "a,b");
        assert!(!format!("{s:?}").contains("ops"), "{s:?}");
        // The signal-specific endpoint is used as is and wins.
        let s = OtlpSettings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c.example/x"),
        ]))
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("https://c.example/x"));
        for (k, v, needle) in [
            (
                "OTEL_EXPORTER_OTLP_COMPRESSION",
                "zstd",
                "expected gzip or none",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s", "expected milliseconds"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "novalue",
                "expected key=value",
            ),
        ] {
            let e = OtlpSettings::from_vars(vars(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains(k), "{e}");
        }
        let e = OtlpSettings::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && e.contains("http/protobuf"),
            "{e}"
        );
        // Without an endpoint, nobody asked us to export: another tool's protocol is fine.
        assert!(OtlpSettings::from_vars(vars(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).is_ok());
        assert_eq!(
            OtlpSettings::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap(),
            OtlpSettings::default()
        );
    }

    #[test]
    fn layers_merge_headers_by_key() {
        let flags = OtlpSettings {
            headers: vec![("X-Key".into(), "flag".into())],
            ..OtlpSettings::default()
        };
        let env = OtlpSettings {
            endpoint: Some("https://env/v1/traces".into()),
            headers: vec![("x-key".into(), "env".into()), ("other".into(), "1".into())],
            compression: Some(Compression::Gzip),
            ..OtlpSettings::default()
        };
        let m = flags.over(env);
        assert_eq!(m.endpoint.as_deref(), Some("https://env/v1/traces"));
        assert_eq!(m.compression, Some(Compression::Gzip));
        assert_eq!(
            m.headers,
            vec![
                ("x-key".to_owned(), "flag".to_owned()),
                ("other".to_owned(), "1".to_owned())
            ]
        );
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(trace_id("u1"), trace_id("u1"));
        assert_ne!(trace_id("u1"), trace_id("u2"));
        let a = span_id("u1", Some(("t", 0)));
        assert_eq!(a, span_id("u1", Some(("t", 0))));
        assert_ne!(a, span_id("u1", Some(("t", 1))));
        assert_ne!(a, span_id("u1", None));
        assert_ne!(a, span_id("u2", Some(("t", 0))));
        // Length-prefixed parts: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(span_id("ab", Some(("c", 0))), span_id("a", Some(("bc", 0))));
        // Pinned: the ids are a wire contract (re-sending must give the same).
        assert_eq!(hex::encode(trace_id("u1")).len(), 32);
        assert_eq!(hex::encode(span_id("u1", None)).len(), 16);
    }

    #[test]
    fn sampling_keeps_first_last_and_even_spacing() {
        assert_eq!(sample_indices(3, 128), vec![0, 1, 2]);
        assert_eq!(sample_indices(10, 0), Vec::<usize>::new());
        assert_eq!(sample_indices(10, 1), vec![9]);
        assert_eq!(sample_indices(10, 4), vec![0, 3, 6, 9]);
        let s = sample_indices(100_000, MAX_SPAN_EVENTS);
        assert_eq!(s.len(), MAX_SPAN_EVENTS);
        assert_eq!((s[0], s[127]), (0, 99_999));
        let gaps: Vec<usize> = s.windows(2).map(|w| w[1] - w[0]).collect();
        let (lo, hi) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
        assert!(hi - lo <= 1, "{lo}..{hi}");
        let s = sample_indices(129, MAX_SPAN_EVENTS);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }

    #[derive(Debug)]
    struct NoSource;
    impl TraceSource for NoSource {
        fn upgrade(&self, u: &str) -> Result<Upgrade> {
            Err(Error::not_found(u))
        }
        fn task(&self, _: &str, t: &str) -> Result<Task> {
            Err(Error::not_found(t))
        }
        fn span_history(&self, _: &str, _: Option<&str>, _: u64, _: usize) -> Result<SpanHistory> {
            Ok(SpanHistory::default())
        }
    }

    #[test]
    fn endpoints_are_checked() {
        let mk = |url: &str, headers: Vec<(String, String)>| {
            OtlpSink::new(
                &OtlpSettings {
                    endpoint: Some(url.into()),
                    headers,
                    ..OtlpSettings::default()
                },
                Arc::new(NoSource),
                Duration::from_secs(1),
            )
        };
        let e = mk("http://collector.example:4318/v1/traces", vec![])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing plain http") && e.contains("use https"),
            "{e}"
        );
        assert!(mk("http://127.0.0.1:4318/v1/traces", vec![]).is_ok());
        assert!(mk("https://collector.example/v1/traces", vec![]).is_ok());
        let e = mk("ftp://x/v1/traces", vec![]).unwrap_err().to_string();
        assert!(e.contains("expected http:// or https://"), "{e}");
        let e = mk("not a url", vec![]).unwrap_err().to_string();
        assert!(e.contains("invalid OTLP endpoint"), "{e}");
        // TR4: a password in the endpoint is never shown.
        for url in ["ftp://u:s3cr3t@x/v1/traces", "http://u:s3cr3t@[x/v1/traces"] {
            let e = mk(url, vec![]).unwrap_err().to_string();
            assert!(e.contains("u:***@") && !e.contains("s3cr3t"), "{e}");
        }
        let e = mk("http://u:s3cr3t@collector.example:4318/v1/traces", vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("use https") && !e.contains("s3cr3t"), "{e}");
        let e = mk(
            "https://c.example/v1/traces",
            vec![("bad name".into(), "v".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid OTLP header name"), "{e}");
        let sink = mk(
            "https://user:pw@c.example:4318/v1/traces?token=s3cr3t",
            vec![("api-key".into(), "hunter2".into())],
        )
        .unwrap();
        assert!(
            sink.label().starts_with("otlp:c.example:4318#"),
            "{}",
            sink.label()
        );
        for secret in ["s3cr3t", "pw", "hunter2"] {
            assert!(!sink.label().contains(secret));
            assert!(!format!("{sink:?}").contains(secret));
        }
    }
}
