//! Integration tests of the `eks-upgrade-agent` binary: real processes on real data dirs.

mod apply;
mod artifacts;
mod aws_errors;
mod cli;
mod completion;
mod crash;
mod dashboard;
mod delivery;
mod eventbridge;
mod help;
mod ids;
mod limits;
mod otlp;
mod profiles;
mod reference;
mod remote;
mod s3;
mod s3_settings;
mod settings;
mod stream_memory;
mod structure;
mod tables;
mod terminal;
mod trust;
mod util;
mod wait;
