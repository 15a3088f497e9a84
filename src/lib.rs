//! aws-pgbouncer keeps a stock PgBouncer supplied with fresh RDS IAM authentication tokens.
//!
//! The crate is a library with one thin binary on top, so that integration tests and
//! benchmarks exercise exactly the code the daemon runs.

pub mod token;
