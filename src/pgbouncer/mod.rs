//! Everything that touches PgBouncer: the files it reads, its admin console, and its process
//! when the daemon supervises it.

pub mod admin;
pub mod databases_ini;
pub mod files;
pub mod login_rules;
pub mod password_probe;
pub mod render;
pub mod scram_only;
pub mod server_connections;
pub mod supervise;
