//! The embedded SQLite backend: one database file in WAL mode inside the data directory.
//!
//! - [`progress`]: the store itself (connections, durability, the `ProgressStore` impl) and the
//!   row helpers the other files share;
//! - `tasks`, `import`: task writes and whole-upgrade imports;
//! - `artifacts`: the artifact index and the upload queue;
//! - `outbox`: notifications waiting for delivery;
//! - `history`: task duration history (ETA from history, stalled tasks);
//! - `trace`: the per-upgrade trace model read by the OTLP sink;
//! - `test_results`: test runs, results, history and flaky statistics (`TestResultStore`);
//! - `schema`: versioned migrations.

mod artifacts;
mod copy;
mod history;
mod import;
mod outbox;
pub mod progress;
mod schema;
mod tasks;
mod test_results;
mod trace;

pub use copy::probe_target as probe_copy_target;
pub use progress::{DB_FILE, SqliteOptions, SqliteStore};
