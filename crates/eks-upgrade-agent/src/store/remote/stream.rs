//! Streamed request bodies (uploads, test reports) whose refusal still reaches the caller.
//!
//! A server may answer before it has read a body (a bad query, an unknown session) and close
//! the connection; the next write of a client still sending fails with "broken pipe" or
//! "connection reset", and ureq gives up with that instead of reading the answer, which is
//! already in the socket's receive buffer. [`AnswerAfterWriteError`] wraps the connection: after
//! such a write error it discards the rest of the body and lets ureq read the answer (what
//! curl and urllib3 do). When no answer comes, the caller gets the write error.
//!
//! The body itself is read through [`StopAfterWriteError`], which ends it (EOF) once a write
//! has failed, so the rest of a large file is not read (and thrown away) before the answer.
//! The two meet through a flag the request owns: a streamed request gets a connector of its own
//! ([`AnswerAfterWriteError::signalling`]) holding the same flag as its body (no global or
//! thread-local state). That agent and its flag are reused by the next streamed request (one
//! at a time, the flag cleared before each), so the files of a command share a connection.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A request body that ends as soon as a write of its request failed (the server stopped
/// reading): the rest is not read.
pub(crate) struct StopAfterWriteError<'a> {
    inner: &'a mut dyn io::Read,
    failed: Arc<AtomicBool>,
}

impl<'a> StopAfterWriteError<'a> {
    /// `failed` is the flag of the connector the request is sent through.
    pub(crate) fn new(inner: &'a mut dyn io::Read, failed: Arc<AtomicBool>) -> Self {
        StopAfterWriteError { inner, failed }
    }
}

impl io::Read for StopAfterWriteError<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed.load(Ordering::Acquire) {
            return Ok(0);
        }
        self.inner.read(buf)
    }
}

use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// The connector that wraps each connection in [`Forgiving`].
#[derive(Debug, Default)]
pub(crate) struct AnswerAfterWriteError {
    /// Set when a write failed, for the body of a streamed request ([`StopAfterWriteError`]).
    failed: Option<Arc<AtomicBool>>,
}

impl AnswerAfterWriteError {
    /// A connector for one streamed request whose body reads `failed`.
    pub(crate) fn signalling(failed: Arc<AtomicBool>) -> Self {
        AnswerAfterWriteError {
            failed: Some(failed),
        }
    }
}

impl<In: Transport> Connector<In> for AnswerAfterWriteError {
    type Out = Forgiving<In>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        Ok(chained.map(|inner| Forgiving {
            inner,
            write_error: None,
            answered: false,
            failed: self.failed.clone(),
        }))
    }
}

/// A connection whose peer may have stopped reading: writes after a reset are dropped, reads
/// go on.
#[derive(Debug)]
pub(crate) struct Forgiving<T> {
    inner: T,
    /// The write error that ended sending.
    write_error: Option<io::ErrorKind>,
    /// Bytes arrived after the write error.
    answered: bool,
    /// Told of the write error (the streamed body's flag).
    failed: Option<Arc<AtomicBool>>,
}

/// A write error after which the peer may still have answered.
fn peer_stopped_reading(e: &ureq::Error) -> Option<io::ErrorKind> {
    match e {
        ureq::Error::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ) =>
        {
            Some(e.kind())
        }
        _ => None,
    }
}

impl<T: Transport> Transport for Forgiving<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        if self.write_error.is_some() {
            return Ok(());
        }
        match self.inner.transmit_output(amount, timeout) {
            Err(e) => match peer_stopped_reading(&e) {
                Some(kind) => {
                    self.write_error = Some(kind);
                    if let Some(failed) = &self.failed {
                        failed.store(true, Ordering::Release);
                    }
                    Ok(())
                }
                None => Err(e),
            },
            ok => ok,
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let Some(kind) = self.write_error else {
            return self.inner.await_input(timeout);
        };
        match self.inner.await_input(timeout) {
            Ok(true) => {
                self.answered = true;
                Ok(true)
            }
            // No answer came after all: the write error is the news.
            Err(_) | Ok(false) if !self.answered => Err(ureq::Error::Io(io::Error::new(
                kind,
                "the server closed the connection while the request body was being sent",
            ))),
            r => r,
        }
    }

    fn is_open(&mut self) -> bool {
        self.write_error.is_none() && self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
