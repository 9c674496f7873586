//! Progress tracking: the commands that change state, the state machine that judges them, the
//! [`ProgressTracker`] an agent calls, the JSON Lines `apply` engine and the reference-format
//! import/export.

pub mod apply;
pub mod reference;
pub mod tracker;

pub use crate::store::domain::command::{Command, NewTask};
/// The commands and the state machine live with the stores that execute them.
pub use crate::store::domain::{command, machine};
pub use tracker::ProgressTracker;
