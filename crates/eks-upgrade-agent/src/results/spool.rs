//! Parsed attempts on disk: an ingest reads every report once, before anything is stored, into
//! a spool (an unlinked temporary file, so memory stays flat whatever the report's size); the
//! store's write transaction then only replays decoded records, it never parses XML while it
//! holds the write lock. Each file's SHA-256 is taken as it is read, so the bytes kept as an
//! artifact can be checked to be the bytes that were parsed.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::junit::{self, ParseOptions, ParseSummary};
use crate::blob::Digest;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};

use crate::model::{CaseAttempt, SuiteWindow, TestStatus};

/// Attempts written once, replayed once.
pub(crate) struct Spool {
    out: BufWriter<File>,
    /// Removed on drop when it could not be unlinked at once.
    path: Option<PathBuf>,
    records: u64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("records", &self.records)
            .finish()
    }
}

fn io(e: std::io::Error) -> Error {
    Error::backend(
        "cannot write the parsed test results to a temporary file",
        e,
    )
}

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

impl Spool {
    /// An empty spool in the temporary directory.
    pub(crate) fn new() -> Result<Spool> {
        let path = std::env::temp_dir().join(format!("eua-spool-{}", uuid::Uuid::now_v7()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        let path = match std::fs::remove_file(&path) {
            Ok(()) => None,
            Err(_) => Some(path),
        };
        Ok(Spool {
            out: BufWriter::with_capacity(64 * 1024, file),
            path,
            records: 0,
        })
    }

    fn push(&mut self, a: &CaseAttempt) -> Result<()> {
        let w = &mut self.out;
        let put = |w: &mut BufWriter<File>, s: &str| -> std::io::Result<()> {
            w.write_all(&(s.len() as u32).to_le_bytes())?;
            w.write_all(s.as_bytes())
        };
        (|| -> std::io::Result<()> {
            w.write_all(&[
                a.status.code() as u8,
                u8::from(a.message.is_some()),
                u8::from(a.suite_window.is_some()),
            ])?;
            w.write_all(&a.duration.to_le_bytes())?;
            if let Some(t) = &a.suite_window {
                w.write_all(&t.start.timestamp_micros().to_le_bytes())?;
                w.write_all(&t.end.timestamp_micros().to_le_bytes())?;
            }
            for s in [&a.framework, &a.suite, &a.classname, &a.name] {
                put(w, s)?;
            }
            if let Some(m) = &a.message {
                put(w, m)?;
            }
            Ok(())
        })()
        .map_err(io)?;
        self.records += 1;
        Ok(())
    }

    /// Parses the report at `path` into the spool; answers the file's SHA-256.
    pub(crate) fn parse_file(
        &mut self,
        path: &Path,
        label: &str,
        options: &ParseOptions,
    ) -> Result<(Digest, ParseSummary)> {
        let file = File::open(path).map_err(|e| {
            Error::invalid(format!(
                "cannot read {label}: {e} (give the path of a JUnit XML report)"
            ))
        })?;
        let mut reader = BufReader::with_capacity(
            64 * 1024,
            Hashing {
                inner: file,
                sha: Sha256::new(),
            },
        );
        let summary = junit::parse(&mut reader, label, options, &mut |a| self.push(&a))?;
        // Whatever follows the root element (parse stops at the end) is hashed too.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| {
            Error::invalid(format!(
                "cannot read {label}: {e} (give the path of a JUnit XML report)"
            ))
        })?;
        let sha = reader.into_inner().sha;
        Ok((Digest(sha.finalize().into()), summary))
    }

    /// Feeds every record, in the order written, to `sink`.
    pub(crate) fn replay(&mut self, sink: &mut dyn FnMut(CaseAttempt) -> Result<()>) -> Result<()> {
        self.out.flush().map_err(io)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut r = BufReader::with_capacity(64 * 1024, &*file);
        let corrupt = || Error::invalid("the spooled test results are damaged: ingest again");
        fn take<const N: usize>(r: &mut impl BufRead) -> std::io::Result<[u8; N]> {
            let mut b = [0u8; N];
            r.read_exact(&mut b)?;
            Ok(b)
        }
        let text = |r: &mut BufReader<&File>| -> Result<String> {
            let len = u32::from_le_bytes(take::<4>(r).map_err(io)?) as usize;
            let mut b = vec![0u8; len];
            r.read_exact(&mut b).map_err(io)?;
            String::from_utf8(b).map_err(|_| corrupt())
        };
        for _ in 0..self.records {
            let [status, has_message, has_window] = take::<3>(&mut r).map_err(io)?;
            let duration = f64::from_le_bytes(take::<8>(&mut r).map_err(io)?);
            let suite_window = if has_window == 1 {
                let mut at = || -> Result<DateTime<Utc>> {
                    let us = i64::from_le_bytes(take::<8>(&mut r).map_err(io)?);
                    DateTime::from_timestamp_micros(us).ok_or_else(corrupt)
                };
                Some(SuiteWindow {
                    start: at()?,
                    end: at()?,
                })
            } else {
                None
            };
            let status = TestStatus::from_code(i64::from(status)).ok_or_else(corrupt)?;
            let framework = text(&mut r)?;
            let suite = text(&mut r)?;
            let classname = text(&mut r)?;
            let name = text(&mut r)?;
            let message = if has_message == 1 {
                Some(text(&mut r)?)
            } else {
                None
            };
            sink(CaseAttempt {
                framework,
                suite,
                classname,
                name,
                status,
                duration,
                message,
                suite_window,
            })?;
        }
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
