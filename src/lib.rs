//! aws-pgbouncer keeps a stock PgBouncer supplied with fresh RDS IAM authentication tokens.
//!
//! The crate is a library with one thin binary on top, so that integration tests and
//! benchmarks exercise exactly the code the daemon runs.
//!
//! - [`token`] mints tokens and keeps them fresh;
//! - [`config`] merges flags, environment and the TOML file into checked settings;
//! - [`pgbouncer`] renders PgBouncer's files and talks to its admin console;
//! - [`daemon`] ties them together for `aws-pgbouncer run`;
//! - [`endpoint`] (auth-query mode) and [`relay`] (passthrough mode) serve PgBouncer over one
//!   PostgreSQL wire layer, [`wire`];
//! - [`http`] and [`metrics`] serve probes and Prometheus metrics;
//! - [`check`], [`wait`] and [`shutdown`] are the `check`, `wait` and `shutdown` commands;
//! - [`cpu_follow`] keeps the relay's thread on PgBouncer's CPU;
//! - [`error_text`] turns errors into the one-line messages all of them print.

pub mod backoff;
pub mod ca_bundle;
pub mod check;
pub mod cli;
pub mod code_pages;
pub mod config;
pub mod cpu_follow;
pub mod daemon;
pub mod endpoint;
pub mod error_text;
pub mod fd_limit;
pub mod http;
mod local_http;
pub mod log_throttle;
pub mod metrics;
pub mod pgbouncer;
pub mod relay;
pub mod shutdown;
pub mod token;
pub mod wait;
pub mod wire;
