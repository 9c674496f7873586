//! The PostgreSQL backend (team mode): several server replicas share one database.
//!
//! - [`progress`]: the store (the connection pool, `seq` assignment, the `ProgressStore` impl)
//!   and the row helpers the other files share;
//! - `tasks`, `import`: task writes and whole-upgrade imports (the same rules as the SQLite
//!   backend, from `store/domain`);
//! - [`listen`]: wake-ups of followers (`LISTEN`), with polling while it is down;
//! - `history`: task duration history (schema 2), written with the completions;
//! - `outbox`: notifications waiting for delivery, claimed by replicas with a lease;
//! - `test_results`: test runs and their results (issue #12), the SQLite backend's tables;
//! - `artifacts`, `uploads`: the artifact index and its upload queue (claimed with
//!   `FOR UPDATE SKIP LOCKED` and a lease); `lease`: the lease conditions both queues share;
//!   `clock`: their retry due-times, kept on the database's clock; `releases`: blob deletions
//!   marked in the database, the S3 delete outside any transaction;
//! - `schema`: versioned migrations (a `schema_version` table);
//! - `order`: which keyset pages see rows that commit late, and the lock that makes upgrade
//!   keys commit in order.
//!
//! Ordering across replicas: a transaction takes the one-row `seq_counter` (`UPDATE ...
//! RETURNING`) as its last statement before `COMMIT`, so the row lock serializes commits only
//! at their end and `seq` order is commit order: a reader following `seq` never misses an
//! event that commits later with a smaller `seq`.

mod artifacts;
mod clock;
mod connect;
mod copy;
mod health;
mod history;
mod import;
mod lease;
pub mod listen;
mod order;
mod outbox;
pub mod progress;
mod releases;
mod schema;
mod tasks;
mod test_results;
mod trace;
mod uploads;

pub use copy::probe_target as probe_copy_target;
pub use listen::{ListenOptions, ListenStats, Listener};
pub use outbox::LeaseCounts;
pub use progress::{PostgresOptions, PostgresStore};

#[cfg(test)]
mod concurrency_tests;
#[cfg(test)]
mod copy_paging_tests;
#[cfg(test)]
mod copy_queue_tests;
#[cfg(test)]
mod ingest_tests;
#[cfg(test)]
mod outbox_tests;
#[cfg(test)]
mod paging_tests;
#[cfg(all(test, feature = "aws"))]
mod release_tests;
#[cfg(test)]
mod tls_tests;
#[cfg(test)]
mod uploads_tests;
