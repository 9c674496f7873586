//! The domain model shared by every backend and every front end, with the reference design's
//! enums and field names (snake_case on the wire): upgrades, tasks and progress events
//! ([`progress`]), sessions, collections and artifacts ([`artifacts`]), test runs and their results
//! ([`results`]).
//!
//! Types here are plain data. The rules that change progress live in
//! [`crate::store::domain::machine`]; storage lives in [`crate::store`] and [`crate::blob`].

pub mod artifacts;
pub mod progress;
pub mod results;

pub use artifacts::*;
pub use progress::*;
pub use results::*;
