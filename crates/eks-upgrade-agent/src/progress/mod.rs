//! Progress tracking: the commands that change state, the state machine that judges them, the
//! [`ProgressTracker`] an agent calls, the JSON Lines `apply` engine and the reference-format
//! import/export.

pub mod apply;
pub mod command;
pub mod machine;
pub mod reference;
pub mod tracker;

pub use command::{Command, NewTask};
pub use tracker::ProgressTracker;
