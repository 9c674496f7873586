//! A streaming JUnit XML reader: test case records come out one at a time, as the file is read,
//! so memory stays flat whatever the report's size (a 50 MB report ingests in well under
//! 64 MiB of RSS).
//!
//! Why not `junit-parser` (the maintained JUnit crate, which knows the `testsuites`/`testsuite`
//! roots and Surefire's reruns): it builds the whole report as a tree before returning, so a
//! report's memory is a multiple of its size. This reader uses `quick-xml`'s pull parser (already
//! in the dependency tree through `object_store`) with one reused buffer and keeps only the
//! current test case.
//!
//! Variants read: pytest (`xunit1`/`xunit2`; a rerun plugin writes one `<testcase>` per
//! attempt), Surefire/Failsafe (root `<testsuite>`; `flakyFailure`/`flakyError` are failed
//! attempts of a test that passed, `rerunFailure`/`rerunError` further failed attempts of one that
//! failed), ginkgo v2 and Kubernetes e2e (the `status` attribute, one classname for every case,
//! `[It] ...` names), jest-junit and go-junit-report. Each record becomes one [`CaseAttempt`];
//! folding attempts into results is the store's job (see [`crate::store::TestResultStore`]).
//!
//! Errors name the file and the line: `report.xml:12: invalid JUnit XML: ...`.
//!
//! Suite times: a `<testsuite timestamp="...">` (ISO 8601 / RFC 3339; a timestamp without a
//! zone, as Surefire, jest-junit and pytest write it, is taken as UTC) and its `time` give each
//! attempt its [`SuiteWindow`]; a suite without a timestamp takes its enclosing suite's. A
//! timestamp that cannot be read is ignored with a warning naming the file and the line: the
//! report is still taken.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};

use crate::error::{Error, Result};
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};

use crate::model::{CaseAttempt, MAX_MESSAGE_BYTES, SuiteWindow, TestStatus};

/// How to read a report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// Use this suite name for every case instead of the `<testsuite name>`.
    pub suite: Option<String>,
    /// Use this framework instead of the detected one.
    pub framework: Option<String>,
}

/// What a parse saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseSummary {
    /// Test case records (attempts).
    pub records: u64,
    /// Suite names.
    pub suites: BTreeSet<String>,
    /// The framework (detected or given).
    pub framework: String,
    /// `<testsuite timestamp>` values that could not be read (ignored, each with a warning).
    pub bad_timestamps: u64,
}

/// Whether `path` looks like a JUnit report: its first element is `<testsuites>` or
/// `<testsuite>`. Reads only up to that element; a file that is not XML is not JUnit.
pub fn is_junit(path: &Path) -> Result<bool> {
    let file = File::open(path)
        .map_err(|e| Error::backend(format!("cannot open {}", path.display()), e))?;
    let mut reader =
        quick_xml::Reader::from_reader(super::bounded::Bounded::new(BufReader::new(file)));
    let mut buf = Vec::new();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                let name = e.local_name();
                return Ok(matches!(name.as_ref(), b"testsuites" | b"testsuite"));
            }
            Ok(Event::Eof) | Err(_) => return Ok(false),
            Ok(_) => {}
        }
        buf.clear();
        if reader.buffer_position() > 64 * 1024 {
            return Ok(false);
        }
    }
}

/// Parses the report at `path`, calling `sink` with each record in file order. `label` names
/// the file in errors. Stops at the first error (of the XML or of `sink`).
pub fn parse_file(
    path: &Path,
    label: &str,
    options: &ParseOptions,
    sink: &mut dyn FnMut(CaseAttempt) -> Result<()>,
) -> Result<ParseSummary> {
    let file = File::open(path).map_err(|e| {
        Error::invalid(format!(
            "cannot read {label}: {e} (give the path of a JUnit XML report)"
        ))
    })?;
    parse(
        BufReader::with_capacity(64 * 1024, file),
        label,
        options,
        sink,
    )
}

/// Counts the newlines a reader's consumer has consumed, so an error can name its line.
struct LineCounter<R> {
    inner: R,
    lines: u64,
}

impl<R: BufRead> Read for LineCounter<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let buf = self.inner.fill_buf()?;
            let n = buf.len().min(out.len());
            out[..n].copy_from_slice(&buf[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for LineCounter<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            let amt = amt.min(buf.len());
            self.lines += buf[..amt].iter().filter(|b| **b == b'\n').count() as u64;
        }
        self.inner.consume(amt);
    }
}

/// Hints gathered before the first test case, to name the framework.
#[derive(Debug, Default)]
struct Hints {
    jest: bool,
    pytest: bool,
    surefire: bool,
    go: bool,
    ginkgo: bool,
}

impl Hints {
    fn framework(&self) -> &'static str {
        if self.ginkgo {
            "ginkgo"
        } else if self.pytest {
            "pytest"
        } else if self.surefire {
            "surefire"
        } else if self.jest {
            "jest"
        } else if self.go {
            "go"
        } else {
            "junit"
        }
    }
}

/// Where text goes while inside an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Failure,
    Error,
    Skipped,
    FlakyFailure,
    FlakyError,
    RerunFailure,
    RerunError,
}

impl Outcome {
    fn of(name: &[u8]) -> Option<Outcome> {
        Some(match name {
            b"failure" => Outcome::Failure,
            b"error" => Outcome::Error,
            b"skipped" => Outcome::Skipped,
            b"flakyFailure" => Outcome::FlakyFailure,
            b"flakyError" => Outcome::FlakyError,
            b"rerunFailure" => Outcome::RerunFailure,
            b"rerunError" => Outcome::RerunError,
            _ => return None,
        })
    }
}

/// The test case being read.
#[derive(Debug)]
struct Case {
    classname: String,
    name: String,
    duration: f64,
    status: TestStatus,
    message: Option<String>,
    /// Earlier failed attempts (Surefire's flaky and rerun elements), in order.
    earlier: Vec<(TestStatus, f64, Option<String>)>,
    /// The outcome element being read, with the text gathered for its message.
    open: Option<(Outcome, f64, Option<String>, String)>,
}

struct Parser<'a> {
    options: &'a ParseOptions,
    hints: Hints,
    framework: Option<String>,
    /// The open suites: name, window (its own, or its enclosing suite's), and whether the
    /// window grows with its cases' times (a timestamp without `time`).
    suites: Vec<(String, Option<SuiteWindow>, bool)>,
    case: Option<Case>,
    summary: ParseSummary,
    /// A `timestamp` the last `start` could not read, for the caller to warn about.
    bad_timestamp: Option<String>,
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES - '…'.len_utf8();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn seconds(v: &str) -> f64 {
    // Surefire writes locale-formatted times ("1,234.5"); anything unreadable counts as 0.
    let x: f64 = v.trim().replace(',', "").parse().unwrap_or(0.0);
    // At most 100 years (the limit of every duration here), so sums over any number of cases
    // stay finite (`1e308` twice would be infinite, and JSON has no infinity).
    if x.is_finite() && x >= 0.0 {
        x.min(MAX_SECONDS)
    } else {
        0.0
    }
}

/// A `<testsuite timestamp>`: RFC 3339 (`2026-01-01T12:00:00.5+02:00`, `...Z`), or without a
/// zone (`2026-01-01T12:00:00`, a space for the `T` too), taken as UTC. `None` when it cannot
/// be read or lies outside what a span can carry (1970 to 2262).
pub(crate) fn timestamp(v: &str) -> Option<DateTime<Utc>> {
    let v = v.trim();
    let t = DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            DateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S%.f%z").map(|t| t.with_timezone(&Utc))
        })
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(v, f).ok())
                .map(|n| n.and_utc())
        })?;
    // Within unix nanoseconds, with room for the longest `time` after it.
    (t.timestamp() >= 0 && t.timestamp() < i64::MAX / 1_000_000_000 - MAX_SECONDS as i64)
        .then_some(t)
}

/// Unreadable suite timestamps warned about one by one per report; the rest are counted.
const WARNED_TIMESTAMPS: u64 = 5;

/// The longest duration a `time` attribute counts for: 100 years.
const MAX_SECONDS: f64 = 100.0 * 365.25 * 86_400.0;
/// Deepest `<testsuite>` nesting taken (each level keeps its name while open).
pub(crate) const MAX_SUITE_DEPTH: usize = 64;
/// Deepest element nesting taken (the XML reader keeps every open element's name).
pub(crate) const MAX_DEPTH: usize = 256;

/// Parses a report from `reader`; see [`parse_file`].
pub fn parse<R: BufRead>(
    reader: R,
    label: &str,
    options: &ParseOptions,
    sink: &mut dyn FnMut(CaseAttempt) -> Result<()>,
) -> Result<ParseSummary> {
    let mut xml = quick_xml::Reader::from_reader(LineCounter {
        inner: super::bounded::Bounded::new(reader),
        lines: 0,
    });
    let mut p = Parser {
        options,
        hints: Hints::default(),
        framework: options.framework.clone(),
        suites: Vec::new(),
        case: None,
        summary: ParseSummary::default(),
        bad_timestamp: None,
    };
    let mut buf = Vec::with_capacity(8 * 1024);
    let mut depth = 0usize;
    let mut root_seen = false;
    loop {
        buf.clear();
        let line = xml.get_ref().lines + xml.get_ref().inner.dropped_lines + 1;
        let at = |what: String| Error::invalid(format!("{label}:{line}: {what}"));
        let event = match xml.read_event_into(&mut buf) {
            Ok(e) => e,
            Err(e) => {
                return Err(at(format!(
                    "invalid JUnit XML: {e} (fix the file or regenerate the report)"
                )));
            }
        };
        match event {
            Event::Start(ref e) | Event::Empty(ref e) if !root_seen => {
                root_seen = true;
                let name = e.local_name();
                if !matches!(name.as_ref(), b"testsuites" | b"testsuite") {
                    return Err(at(format!(
                        "not a JUnit report: the root element is <{}>, expected <testsuites> or \
                         <testsuite>",
                        String::from_utf8_lossy(name.as_ref())
                    )));
                }
                p.start(e).map_err(at)?;
                p.warn_timestamp(label, line);
                if matches!(event, Event::Start(_)) {
                    depth += 1;
                }
            }
            Event::Start(e) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(at(format!(
                        "invalid JUnit XML: elements nested more than {MAX_DEPTH} deep (not a \
                         report this reader takes: regenerate the report)"
                    )));
                }
                p.start(&e).map_err(at)?;
                p.warn_timestamp(label, line);
            }
            Event::Empty(e) => {
                p.start(&e).map_err(at)?;
                p.warn_timestamp(label, line);
                p.end(e.local_name().as_ref(), sink)?;
            }
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                p.end(e.local_name().as_ref(), sink)?;
            }
            Event::Text(t) if p.wants_text() => {
                let s = t
                    .decode()
                    .map_err(|e| at(format!("invalid JUnit XML: {e}")))?;
                p.text(&s);
            }
            Event::CData(t) if p.wants_text() => {
                let s = t
                    .decode()
                    .map_err(|e| at(format!("invalid JUnit XML: {e}")))?;
                p.text(&s);
            }
            Event::GeneralRef(r) => {
                // Checked everywhere (an unknown entity is malformed XML), kept in messages.
                let s = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name = r
                            .decode()
                            .map_err(|e| at(format!("invalid JUnit XML: {e}")))?;
                        match quick_xml::escape::resolve_predefined_entity(&name) {
                            Some(s) => s.to_owned(),
                            None => {
                                return Err(at(format!(
                                    "invalid JUnit XML: unknown entity &{name};"
                                )));
                            }
                        }
                    }
                    Err(e) => return Err(at(format!("invalid JUnit XML: {e}"))),
                };
                if p.wants_text() {
                    p.text(&s);
                }
            }
            Event::Eof => {
                if !root_seen {
                    return Err(at(
                        "not a JUnit report: no <testsuites> or <testsuite> element (the file is \
                         empty or not XML)"
                            .into(),
                    ));
                }
                if depth > 0 {
                    return Err(at(
                        "invalid JUnit XML: the file ends before its elements are closed (a \
                         truncated report?)"
                            .into(),
                    ));
                }
                break;
            }
            _ => {}
        }
    }
    p.summary.framework = p
        .framework
        .clone()
        .unwrap_or_else(|| p.hints.framework().to_owned());
    if p.summary.bad_timestamps > WARNED_TIMESTAMPS {
        tracing::warn!(
            file = label,
            count = p.summary.bad_timestamps - WARNED_TIMESTAMPS,
            "ignoring more <testsuite> timestamps that are not ISO 8601 times"
        );
    }
    Ok(p.summary)
}

fn attrs(e: &BytesStart<'_>) -> std::result::Result<Vec<(Vec<u8>, String)>, String> {
    let mut out = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|e| format!("invalid JUnit XML: {e}"))?;
        let v = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| format!("invalid JUnit XML: {e}"))?;
        out.push((a.key.local_name().as_ref().to_vec(), v.into_owned()));
    }
    Ok(out)
}

fn get<'a>(attrs: &'a [(Vec<u8>, String)], key: &[u8]) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Parser<'_> {
    /// Warns about (and counts) the timestamp the last `start` could not read: the first
    /// [`WARNED_TIMESTAMPS`] each with its line, the rest counted in one warning at the end.
    fn warn_timestamp(&mut self, label: &str, line: u64) {
        if let Some(v) = self.bad_timestamp.take() {
            self.summary.bad_timestamps += 1;
            if self.summary.bad_timestamps > WARNED_TIMESTAMPS {
                return;
            }
            tracing::warn!(
                file = label,
                line,
                timestamp = %v,
                "ignoring a <testsuite> timestamp that is not an ISO 8601 time (the report is \
                 kept; fix the timestamp for the suite's time to count in the run's span)"
            );
        }
    }

    fn wants_text(&self) -> bool {
        self.case.as_ref().is_some_and(|c| c.open.is_some())
    }

    fn text(&mut self, s: &str) {
        if let Some(Some((_, _, _, text))) = self.case.as_mut().map(|c| c.open.as_mut()) {
            // Keep a little more than the bound, so `bounded` marks the cut.
            if text.len() <= MAX_MESSAGE_BYTES {
                let room = MAX_MESSAGE_BYTES + 4 - text.len();
                let mut cut = s.len().min(room);
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.push_str(&s[..cut]);
            }
        }
    }

    fn start(&mut self, e: &BytesStart<'_>) -> std::result::Result<(), String> {
        let local = e.local_name();
        let name = local.as_ref();
        match name {
            b"testsuites" | b"testsuite" => {
                let a = attrs(e)?;
                let n = get(&a, b"name").unwrap_or("");
                if n == "jest tests" {
                    self.hints.jest = true;
                }
                if n == "pytest" || n == "pytest tests" {
                    self.hints.pytest = true;
                }
                if get(&a, b"noNamespaceSchemaLocation")
                    .is_some_and(|s| s.contains("surefire") || s.contains("failsafe"))
                {
                    self.hints.surefire = true;
                }
                if name == b"testsuite" {
                    if self.suites.len() >= MAX_SUITE_DEPTH {
                        return Err(format!(
                            "invalid JUnit XML: <testsuite> nested more than {MAX_SUITE_DEPTH} \
                             deep (flatten the suites or regenerate the report)"
                        ));
                    }
                    let mut grows = false;
                    let window = match get(&a, b"timestamp").filter(|t| !t.trim().is_empty()) {
                        Some(t) => match timestamp(t) {
                            Some(start) => {
                                grows = get(&a, b"time").is_none();
                                let time = get(&a, b"time").map(seconds).unwrap_or(0.0);
                                Some(SuiteWindow {
                                    start,
                                    end: start + TimeDelta::microseconds((time * 1e6) as i64),
                                })
                            }
                            None => {
                                self.bad_timestamp = Some(t.chars().take(64).collect());
                                None
                            }
                        },
                        None => None,
                    };
                    let window = window.or_else(|| self.suites.last().and_then(|s| s.1));
                    self.suites.push((n.to_owned(), window, grows));
                }
            }
            b"property" => {
                let a = attrs(e)?;
                match get(&a, b"name").unwrap_or("") {
                    "go.version" => self.hints.go = true,
                    "SuiteSucceeded"
                    | "SuiteHasProgrammaticFocus"
                    | "SpecialSuiteFailureReason" => self.hints.ginkgo = true,
                    n if n.starts_with("surefire.") || n == "java.version" => {
                        self.hints.surefire = true
                    }
                    _ => {}
                }
            }
            b"testcase" => {
                if self.case.is_some() {
                    return Err("invalid JUnit XML: <testcase> inside a <testcase>".into());
                }
                let a = attrs(e)?;
                let Some(case_name) = get(&a, b"name").filter(|n| !n.trim().is_empty()) else {
                    return Err(
                        "a <testcase> has no name attribute (every test case needs one)".into(),
                    );
                };
                let status_attr = get(&a, b"status");
                if status_attr.is_some() || case_name.starts_with("[It]") {
                    self.hints.ginkgo = true;
                }
                if self.framework.is_none() {
                    self.framework = Some(self.hints.framework().to_owned());
                }
                let status = match status_attr.map(str::to_ascii_lowercase).as_deref() {
                    None | Some("passed") | Some("success") | Some("run") => TestStatus::Passed,
                    Some("failed") | Some("failure") | Some("timedout") => TestStatus::Failed,
                    Some("skipped") | Some("pending") | Some("disabled") | Some("notrun") => {
                        TestStatus::Skipped
                    }
                    // ginkgo: errored, panicked, interrupted, aborted.
                    Some(_) => TestStatus::Error,
                };
                self.case = Some(Case {
                    classname: get(&a, b"classname").unwrap_or("").to_owned(),
                    name: case_name.to_owned(),
                    duration: get(&a, b"time").map(seconds).unwrap_or(0.0),
                    status,
                    message: None,
                    earlier: Vec::new(),
                    open: None,
                });
            }
            other => {
                if let (Some(outcome), Some(case)) = (Outcome::of(other), self.case.as_mut()) {
                    let a = attrs(e)?;
                    let message = get(&a, b"message")
                        .filter(|m| !m.trim().is_empty())
                        .map(str::to_owned);
                    let time = get(&a, b"time").map(seconds).unwrap_or(case.duration);
                    case.open = Some((outcome, time, message, String::new()));
                }
            }
        }
        Ok(())
    }

    fn end(&mut self, name: &[u8], sink: &mut dyn FnMut(CaseAttempt) -> Result<()>) -> Result<()> {
        match name {
            b"testsuite" => {
                self.suites.pop();
            }
            b"testcase" => {
                if let Some(case) = self.case.take() {
                    self.emit(case, sink)?;
                }
            }
            other => {
                let Some(case) = self.case.as_mut() else {
                    return Ok(());
                };
                let Some(outcome) = Outcome::of(other) else {
                    return Ok(());
                };
                let Some((open, time, attr_message, text)) = case.open.take() else {
                    return Ok(());
                };
                debug_assert_eq!(open, outcome);
                let text = text.trim();
                let message = attr_message
                    .or_else(|| (!text.is_empty()).then(|| text.to_owned()))
                    .map(bounded);
                match outcome {
                    Outcome::Failure | Outcome::Error | Outcome::Skipped => {
                        // An explicit ginkgo status wins over the element only when it says
                        // more (errored beats failure).
                        let s = match outcome {
                            Outcome::Failure => TestStatus::Failed,
                            Outcome::Error => TestStatus::Error,
                            _ => TestStatus::Skipped,
                        };
                        if !(case.status == TestStatus::Error && s == TestStatus::Failed) {
                            case.status = s;
                        }
                        if message.is_some() || case.message.is_none() {
                            case.message = message;
                        }
                    }
                    Outcome::FlakyFailure | Outcome::RerunFailure => {
                        case.earlier.push((TestStatus::Failed, time, message))
                    }
                    Outcome::FlakyError | Outcome::RerunError => {
                        case.earlier.push((TestStatus::Error, time, message))
                    }
                }
            }
        }
        Ok(())
    }

    fn emit(&mut self, case: Case, sink: &mut dyn FnMut(CaseAttempt) -> Result<()>) -> Result<()> {
        let suite = match &self.options.suite {
            Some(s) => s.clone(),
            None => self.suites.last().map(|s| s.0.clone()).unwrap_or_default(),
        };
        let framework = self
            .framework
            .clone()
            .unwrap_or_else(|| self.hints.framework().to_owned());
        self.summary.suites.insert(suite.clone());
        // Surefire: the case element is the first run, rerun elements the later ones; flaky
        // elements are the failed runs before the final pass.
        let mut attempts: Vec<(TestStatus, f64, Option<String>)> = Vec::new();
        if case.status.is_failure() && !case.earlier.is_empty() {
            // failure + rerunFailure...: the first run, then the reruns; the last one decides.
            attempts.push((case.status, case.duration, case.message));
            attempts.extend(case.earlier);
        } else {
            attempts.extend(case.earlier);
            attempts.push((case.status, case.duration, case.message));
        }
        for (status, duration, message) in attempts {
            self.summary.records += 1;
            // A suite without `time` lasts its attempts' times, one after the other.
            let suite_window = match self.suites.last_mut() {
                Some((_, Some(w), true)) => {
                    // At most 100 years in all, however many cases (no overflow).
                    let cap = w.start + TimeDelta::microseconds((MAX_SECONDS * 1e6) as i64);
                    w.end = w
                        .end
                        .checked_add_signed(TimeDelta::microseconds((duration * 1e6) as i64))
                        .map_or(cap, |e| e.min(cap));
                    Some(*w)
                }
                Some((_, w, _)) => *w,
                None => None,
            };
            sink(CaseAttempt {
                framework: framework.clone(),
                suite: suite.clone(),
                classname: case.classname.clone(),
                name: case.name.clone(),
                status,
                duration,
                message,
                suite_window,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/junit")
            .join(name)
    }

    /// Each record as `framework|suite|classname|name|status|duration|message`.
    fn records(name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let summary = parse_file(&fixture(name), name, &ParseOptions::default(), &mut |a| {
            out.push(format!(
                "{}|{}|{}|{}|{}|{}|{}",
                a.framework,
                a.suite,
                a.classname,
                a.name,
                a.status,
                a.duration,
                a.message.unwrap_or_default().replace('\n', "\\n")
            ));
            Ok(())
        })
        .unwrap();
        assert_eq!(summary.records as usize, out.len());
        out
    }

    fn error(text: &str) -> String {
        parse(
            text.as_bytes(),
            "r.xml",
            &ParseOptions::default(),
            &mut |_| Ok(()),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn pytest_xunit2_with_reruns_gives_one_record_per_attempt() {
        assert_eq!(
            records("pytest_xunit2_rerun.xml"),
            [
                "pytest|pytest|tests.smoke.test_api|test_health|passed|0.12|",
                "pytest|pytest|tests.smoke.test_api|test_list_pods|failed|1.5|AssertionError: assert 503 == 200",
                "pytest|pytest|tests.smoke.test_api|test_list_pods|passed|1.1|",
                "pytest|pytest|tests.smoke.test_dns|test_resolve[coredns]|failed|2|TimeoutError: lookup timed out",
                "pytest|pytest|tests.smoke.test_dns|test_resolve[coredns]|failed|2|TimeoutError: lookup timed out again",
                "pytest|pytest|tests.smoke.test_storage|test_ebs_attach|error|0.01|failed on setup with \"botocore.exceptions.NoCredentialsError\"",
                "pytest|pytest|tests.smoke.test_storage|test_efs_mount|skipped|0|EFS not installed on this cluster",
            ]
        );
    }

    #[test]
    fn surefire_flaky_and_rerun_elements_are_attempts() {
        assert_eq!(
            records("surefire_flaky.xml"),
            [
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|createsOrder|passed|0.512|",
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|cancelsOrder|failed|0.801|expected: <200> but was: <500>",
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|cancelsOrder|passed|0.801|",
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|refundsOrder|failed|2|connection refused",
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|refundsOrder|failed|2|connection refused (rerun 1)",
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|refundsOrder|failed|2|connection refused (rerun 2)",
                "surefire|com.example.orders.OrderApiIT|com.example.orders.OrderApiIT|exportsOrders|skipped|0|@Disabled: export service not deployed",
            ]
        );
        assert_eq!(
            records("failsafe_rerun_error.xml"),
            [
                "surefire|com.example.billing.InvoiceIT|com.example.billing.InvoiceIT|issuesInvoice|error|1|socket timeout",
                "surefire|com.example.billing.InvoiceIT|com.example.billing.InvoiceIT|issuesInvoice|failed|1|expected 1 invoice",
                "surefire|com.example.billing.InvoiceIT|com.example.billing.InvoiceIT|issuesInvoice|passed|1|",
                "surefire|com.example.billing.InvoiceIT|com.example.billing.InvoiceIT|voidsInvoice|error|2.1|NullPointerException",
                "surefire|com.example.billing.InvoiceIT|com.example.billing.InvoiceIT|voidsInvoice|error|2.1|NullPointerException again",
            ]
        );
    }

    #[test]
    fn ginkgo_status_attribute_decides() {
        let s = "ginkgo|Kubernetes e2e suite|Kubernetes e2e suite|";
        assert_eq!(
            records("ginkgo_k8s_e2e.xml"),
            [
                format!("{s}[SynchronizedBeforeSuite]|passed|3.2|"),
                format!(
                    "{s}[It] [sig-network] DNS should provide DNS for the cluster [Conformance]|passed|12.5|"
                ),
                format!(
                    "{s}[It] [sig-apps] Deployment should run the lifecycle of a Deployment [Conformance]|failed|301|[FAILED] timed out waiting for the condition"
                ),
                format!(
                    "{s}[It] [sig-storage] CSI Volumes [Driver: csi-hostpath] should mount [Serial]|skipped|0|skipped"
                ),
                format!("{s}[It] [sig-node] Pods should be updated [Slow]|skipped|0|skipped"),
                format!(
                    "{s}[It] [sig-cli] Kubectl client should panic|error|1|[PANICKED] runtime error: invalid memory address"
                ),
            ]
        );
    }

    #[test]
    fn jest_junit_messages_come_from_the_element_text() {
        let r = records("jest_junit.xml");
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0],
            "jest|orders API|orders API returns 200 for GET /orders|orders API returns 200 for GET /orders|passed|0.3|"
        );
        assert!(
            r[1].starts_with("jest|orders API|orders API rejects a bad token|orders API rejects a bad token|failed|0.2|Error: expect(received).toBe(expected)"),
            "{}",
            r[1]
        );
        assert!(r[1].contains("at Object.<anonymous>"), "{}", r[1]);
        assert_eq!(
            r[2],
            "jest|orders API|orders API paginates|orders API paginates|skipped|0|"
        );
        assert_eq!(
            r[3],
            "jest|health|health responds|health responds|passed|1.1|"
        );
    }

    #[test]
    fn go_junit_report() {
        assert_eq!(
            records("go_junit_report.xml"),
            [
                "go|github.com/example/agent/pkg/nodes|github.com/example/agent/pkg/nodes|TestDrain|passed|0.1|",
                "go|github.com/example/agent/pkg/nodes|github.com/example/agent/pkg/nodes|TestDrain/with_pdb|failed|0.2|Failed",
                "go|github.com/example/agent/pkg/nodes|github.com/example/agent/pkg/nodes|TestCordon|passed|0.12|",
            ]
        );
    }

    #[test]
    fn overrides_and_plain_junit() {
        let mut out = Vec::new();
        let opts = ParseOptions {
            suite: Some("smoke".into()),
            framework: Some("custom".into()),
        };
        let text = r#"<testsuite name="x"><testcase name="a"/></testsuite>"#;
        parse(text.as_bytes(), "r.xml", &opts, &mut |a| {
            out.push((a.framework, a.suite));
            Ok(())
        })
        .unwrap();
        assert_eq!(out, [("custom".to_owned(), "smoke".to_owned())]);
        let mut out = Vec::new();
        parse(
            r#"<testsuites><testsuite><testcase name="a"/></testsuite></testsuites>"#.as_bytes(),
            "r.xml",
            &ParseOptions::default(),
            &mut |a| {
                out.push((a.framework, a.suite));
                Ok(())
            },
        )
        .unwrap();
        // No suite name: the suite is empty, never the file's path (the same tests written to
        // another path are the same tests).
        assert_eq!(out, [("junit".to_owned(), String::new())]);
    }

    /// T4: nesting is capped, so a file of nested suites cannot grow the parser's memory
    /// with its size: `<testsuite>` past 64 levels, any element past 256, refused naming the
    /// line; 64 nested suites are taken.
    #[test]
    fn deep_nesting_is_refused_naming_the_line() {
        let parse_doc = |doc: &str| {
            parse(
                doc.as_bytes(),
                "r.xml",
                &ParseOptions::default(),
                &mut |_| Ok(()),
            )
        };
        let suites = |n: usize| {
            let open: String = (0..n)
                .map(|i| format!("<testsuite name=\"s{i}\">\n"))
                .collect();
            format!("{open}<testcase name=\"t\"/>{}", "</testsuite>".repeat(n))
        };
        parse_doc(&suites(MAX_SUITE_DEPTH)).unwrap();
        let e = parse_doc(&suites(MAX_SUITE_DEPTH + 1)).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "r.xml:65: invalid JUnit XML: <testsuite> nested more than 64 deep (flatten the \
             suites or regenerate the report)"
        );
        let deep = format!(
            "<testsuites>\n{}{}</testsuites>",
            "<x>".repeat(MAX_DEPTH),
            "</x>".repeat(MAX_DEPTH)
        );
        let e = parse_doc(&deep).unwrap_err().to_string();
        assert!(
            e.starts_with("r.xml:2: invalid JUnit XML: elements nested more than 256"),
            "{e}"
        );
    }

    #[test]
    fn bad_xml_names_the_file_and_the_line() {
        let e = parse_file(
            &fixture("broken_tag.xml"),
            "broken_tag.xml",
            &ParseOptions::default(),
            &mut |_| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.starts_with("broken_tag.xml:6: invalid JUnit XML"), "{e}");
        assert!(e.contains("testcas"), "{e}");
        let e = parse_file(
            &fixture("truncated.xml"),
            "truncated.xml",
            &ParseOptions::default(),
            &mut |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("truncated.xml:"), "{e}");
        assert!(e.contains("truncated report"), "{e}");
        let e = parse_file(
            &fixture("not_junit.xml"),
            "not_junit.xml",
            &ParseOptions::default(),
            &mut |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "not_junit.xml:2: not a JUnit report: the root element is <html>, expected \
             <testsuites> or <testsuite>"
        );
        assert!(
            error("").contains("r.xml:1: not a JUnit report"),
            "{}",
            error("")
        );
        assert!(
            error("<testsuite>\n<testcase classname=\"x\"/>\n</testsuite>")
                .starts_with("r.xml:2: a <testcase> has no name attribute"),
            "{}",
            error("<testsuite>\n<testcase classname=\"x\"/>\n</testsuite>")
        );
        assert!(
            error("<testsuite>\n\n<testcase name=\"a\">&bogus;</testcase></testsuite>")
                .starts_with("r.xml:3: invalid JUnit XML"),
        );
        let e = parse_file(
            Path::new("/nonexistent/r.xml"),
            "/nonexistent/r.xml",
            &ParseOptions::default(),
            &mut |_| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    }

    #[test]
    fn messages_are_bounded() {
        let long = "x".repeat(3 * MAX_MESSAGE_BYTES);
        let text = format!(
            "<testsuite name=\"s\"><testcase name=\"a\"><failure>{long}</failure></testcase>\
             <testcase name=\"b\"><failure message=\"{long}\"/></testcase></testsuite>"
        );
        let mut out = Vec::new();
        parse(
            text.as_bytes(),
            "r.xml",
            &ParseOptions::default(),
            &mut |a| {
                out.push(a.message.unwrap());
                Ok(())
            },
        )
        .unwrap();
        for m in out {
            assert!(m.len() <= MAX_MESSAGE_BYTES, "{}", m.len());
            assert!(m.ends_with('…'));
        }
    }

    /// T4: one huge text node or attribute is cut as it streams (see `bounded`), so it is
    /// never buffered whole; the cases after it are read, messages stay bounded and marked,
    /// and later errors still name their line (the newlines cut away are counted).
    #[test]
    fn huge_text_nodes_and_attributes_are_cut_as_they_stream() {
        let out = "line\n".repeat(300_000);
        let head = format!(
            "<testsuite name=\"s\">\n<testcase name=\"a\"><failure message=\"{}\"/>\
             <system-out><![CDATA[{out}]]></system-out></testcase>\n<testcase name=\"b\">\
             <error>{}</error></testcase>",
            "q&quot;".repeat(200_000),
            "é".repeat(400_000)
        );
        let mut got = Vec::new();
        parse(
            format!("{head}</testsuite>").as_bytes(),
            "r.xml",
            &ParseOptions::default(),
            &mut |a| {
                got.push((a.name, a.status, a.message.unwrap_or_default()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got.len(), 2);
        for (_, _, m) in &got {
            assert!(
                m.len() <= MAX_MESSAGE_BYTES && m.ends_with('…'),
                "{}",
                m.len()
            );
        }
        assert!(got[0].2.starts_with("q\"q\""), "{}", &got[0].2[..20]);
        assert_eq!(got[1].1, TestStatus::Error);
        let e = error(&format!(
            "{head}\n<testcase name=\"c\">&bogus;</testcase></testsuite>"
        ));
        assert!(e.starts_with("r.xml:300004: invalid JUnit XML"), "{e}");
    }

    /// N27: each attempt carries its suite's window, from `timestamp` (zone-less is UTC,
    /// offsets and fractions read) to timestamp + `time` (without `time`, + its cases' times
    /// so far); a nested suite without a timestamp
    /// takes its enclosing suite's, one outside any has none; an unreadable timestamp is
    /// counted and ignored, the report still read.
    #[test]
    fn suite_timestamps_give_each_attempt_its_window() {
        let text = r#"<testsuites>
<testsuite name="a" timestamp="2026-03-01T10:00:00" time="1.5">
  <testcase name="a1"/>
  <testsuite name="inner"><testcase name="i1"/></testsuite>
</testsuite>
<testsuite name="b" timestamp="2026-03-01T12:00:00.25+02:00"><testcase name="b1" time="2"/><testcase name="b2" time="1.5"/></testsuite>
<testsuite name="c" timestamp="2026-03-01 10:00:05Z" time="2"><testcase name="c1"/></testsuite>
<testsuite name="d"><testcase name="d1"/></testsuite>
<testsuite name="e" timestamp="31/02/2026" time="9"><testcase name="e1"/></testsuite>
<testsuite name="f" timestamp="1969-12-31T23:59:59Z"><testcase name="f1"/></testsuite>
</testsuites>"#;
        let mut got = Vec::new();
        let summary = parse(
            text.as_bytes(),
            "r.xml",
            &ParseOptions::default(),
            &mut |a| {
                got.push((a.name, a.suite_window));
                Ok(())
            },
        )
        .unwrap();
        let at = |s: &str| Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc));
        let w = |from: &str, to: &str| {
            Some(SuiteWindow {
                start: at(from).unwrap(),
                end: at(to).unwrap(),
            })
        };
        assert_eq!(
            got,
            [
                (
                    "a1".into(),
                    w("2026-03-01T10:00:00Z", "2026-03-01T10:00:01.5Z")
                ),
                (
                    "i1".into(),
                    w("2026-03-01T10:00:00Z", "2026-03-01T10:00:01.5Z")
                ),
                (
                    "b1".into(),
                    w("2026-03-01T10:00:00.25Z", "2026-03-01T10:00:02.25Z")
                ),
                (
                    "b2".into(),
                    w("2026-03-01T10:00:00.25Z", "2026-03-01T10:00:03.75Z")
                ),
                (
                    "c1".into(),
                    w("2026-03-01T10:00:05Z", "2026-03-01T10:00:07Z")
                ),
                ("d1".into(), None),
                ("e1".into(), None),
                ("f1".into(), None),
            ]
        );
        assert_eq!(summary.bad_timestamps, 2);
        // A suite without `time` whose cases add up past any date: capped at 100 years, no
        // overflow (chrono's `+=` panics).
        let many: String = (0..3000)
            .map(|i| format!("<testcase name=\"t{i}\" time=\"3e9\"/>"))
            .collect();
        let mut last = None;
        parse(
            format!("<testsuite name=\"x\" timestamp=\"2150-01-01T00:00:00Z\">{many}</testsuite>")
                .as_bytes(),
            "r.xml",
            &ParseOptions::default(),
            &mut |a| {
                last = a.suite_window;
                Ok(())
            },
        )
        .unwrap();
        let last = last.unwrap();
        assert_eq!(
            last.end - last.start,
            TimeDelta::microseconds((MAX_SECONDS * 1e6) as i64)
        );
        assert_eq!(timestamp("2026-03-01T10:00:00"), at("2026-03-01T10:00:00Z"));
        assert_eq!(
            timestamp("2026-03-01T10:00:00-0130"),
            at("2026-03-01T11:30:00Z")
        );
        for bad in ["", "yesterday", "2026-13-01T00:00:00", "1e9", "2026-03-01"] {
            assert_eq!(timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_are_bounded_and_finite() {
        assert_eq!(seconds("1.5"), 1.5);
        assert_eq!(seconds("1,234.5"), 1234.5);
        assert_eq!(seconds("-3"), 0.0);
        assert_eq!(seconds("NaN"), 0.0);
        assert_eq!(seconds("later"), 0.0);
        assert_eq!(seconds("1e308"), MAX_SECONDS);
        assert!((seconds("1e308") + seconds("1e308")).is_finite());
    }

    #[test]
    fn sniffing() {
        assert!(is_junit(&fixture("surefire_flaky.xml")).unwrap());
        assert!(is_junit(&fixture("jest_junit.xml")).unwrap());
        assert!(!is_junit(&fixture("not_junit.xml")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.txt");
        std::fs::write(&p, "plain text, not XML").unwrap();
        assert!(!is_junit(&p).unwrap());
    }
}
