//! Integration tests of the server: handlers through `oneshot`, and real TCP/WebSocket clients
//! against `serve` on 127.0.0.1.

mod api;
mod artifacts;
mod auth;
mod conn;
mod database;
mod guard;
mod hostile;
mod remote;
mod stream;
mod tests_api;
mod util;
