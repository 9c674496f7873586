//! The pure domain every backend executes, free of SQL and I/O: the [`command::Command`]s that
//! change progress, their validation, and the [`machine`] that judges a status change and does
//! the rollup math. Backends call into it inside their transactions; it calls nothing outside
//! `model` and `error`.

pub mod command;
pub mod machine;
