//! The pure domain every backend executes, free of SQL and I/O: the [`command::Command`]s that
//! change progress, their validation, the [`machine`] that judges a status change and does
//! the rollup math, and the task duration [`history`] (percentiles, remaining time, stalls).
//! Backends call into it inside their transactions; it calls nothing outside `model` and
//! `error`.

pub mod command;
pub mod history;
pub mod machine;
