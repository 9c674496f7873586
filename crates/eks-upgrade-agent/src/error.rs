//! The library's one error type. Variants are what a caller can act on; backend error types
//! (SQLite, I/O) are wrapped into [`Error::Backend`] and never leak.

use crate::model::ProgressStatus;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named thing does not exist (`what` is e.g. `upgrade "u1"`).
    #[error("{what} not found")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// The named thing exists already.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What was created twice.
        what: String,
    },
    /// The state machine does not allow this change.
    #[error("invalid transition for {what}: {from} -> {to}")]
    InvalidTransition {
        /// The task or upgrade.
        what: String,
        /// Its status now.
        from: ProgressStatus,
        /// The status the operation would move it to.
        to: ProgressStatus,
    },
    /// Stored content does not match its digest.
    #[error("{what}")]
    Corrupt {
        /// What is corrupt and how.
        what: String,
    },
    /// The input is malformed or out of range; the message says what to fix.
    #[error("{0}")]
    InvalidInput(String),
    /// The storage backend failed (I/O, corruption, lock timeout).
    #[error("storage backend error: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidInput(message.into())
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Error {
        Error::NotFound { what: what.into() }
    }

    pub(crate) fn backend(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Backend {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A short, stable code for this error (`not_found`, `already_exists`, `invalid_transition`,
    /// `invalid_input`, `corrupt`, `backend`), the same in the CLI's JSON and the HTTP API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not_found",
            Error::AlreadyExists { .. } => "already_exists",
            Error::InvalidTransition { .. } => "invalid_transition",
            Error::InvalidInput(_) => "invalid_input",
            Error::Corrupt { .. } => "corrupt",
            Error::Backend { .. } => "backend",
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        Error::backend("sqlite", e)
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        use postgres::error::SqlState;
        // Input the database cannot take (a NUL byte in text, a pattern that is no regular
        // expression) is the caller's to fix, not a failure of the store.
        if let Some(db) = e.as_db_error()
            && [
                SqlState::CHARACTER_NOT_IN_REPERTOIRE,
                SqlState::UNTRANSLATABLE_CHARACTER,
                SqlState::INVALID_REGULAR_EXPRESSION,
            ]
            .contains(db.code())
        {
            return Error::invalid(format!(
                "the database refused this input: {} (remove NUL bytes; check patterns)",
                db.message()
            ));
        }
        let message = match e.as_db_error() {
            Some(db) => format!("postgresql: {}", db.message()),
            None if e.is_closed() => {
                "postgresql: the connection to the database is closed".to_owned()
            }
            None => "postgresql".to_owned(),
        };
        Error::backend(message, e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        // A verifying reader reports corruption as an I/O error carrying our error.
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            match e.into_inner().map(|inner| inner.downcast::<Error>()) {
                Some(Ok(inner)) => return *inner,
                Some(Err(other)) => return Error::backend("i/o", std::io::Error::other(other)),
                None => unreachable!("checked get_ref above"),
            }
        }
        Error::backend("i/o", e)
    }
}
