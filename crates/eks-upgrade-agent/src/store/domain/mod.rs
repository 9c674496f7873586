//! The pure domain every backend executes, free of SQL and I/O: the [`command::Command`]s that
//! change progress, their validation, the [`machine`] that judges a status change and does
//! the rollup math, and the task duration [`history`] (percentiles, remaining time, stalls).
//! The task write path (`tasks`: a command's rows, events and the walk up the tree) and the
//! import plan (`import`) run here too, once for every backend, over the row access each
//! backend implements (`tasks::TaskRows`). Backends call into it inside their transactions; it
//! calls nothing outside `model` and
//! `error`.

pub mod command;
pub mod history;
pub(crate) mod import;
pub mod machine;
pub(crate) mod tasks;
