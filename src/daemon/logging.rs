//! The daemon's log lines, and the libraries kept from logging secrets into them.

use crate::cli::LogFormat;

/// Libraries whose trace output carries secrets: aws-sigv4 logs canonical requests with the
/// session token, the smithy runtime logs whole HTTP responses (credentials from STS, IMDS or
/// the container endpoint), and the network crates log the bytes they move. They never log
/// below debug, whatever `RUST_LOG` says; `tests/operability.rs` scans a trace-level run.
const CAPPED_AT_DEBUG: &[&str] = &[
    "aws_config",
    "aws_runtime",
    "aws_sigv4",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "h2",
    "hyper",
    "hyper_util",
    "postgres_protocol",
    "rustls",
    "tokio_postgres",
];

/// aws-config's credential chain warns of each provider that failed with the SDK's `Debug`
/// dump of the error (nested structs, the HTTP response). The daemon's own "token refresh
/// failed" warning gives the same causes on one line, so the chain logs errors only.
const CREDENTIAL_CHAIN: &str = "aws_config::meta::credentials::chain";

/// One line per event on stderr, levels from `RUST_LOG` (default info), within the caps.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let requested = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let caps = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(
            CAPPED_AT_DEBUG
                .iter()
                .map(|target| (*target, LevelFilter::DEBUG)),
        )
        .with_target(CREDENTIAL_CHAIN, LevelFilter::ERROR);
    let registry = tracing_subscriber::registry().with(caps).with(requested);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(lines.json().flatten_event(true)).init(),
        LogFormat::Text => registry
            .with(lines.with_ansi(std::io::stderr().is_terminal()))
            .init(),
    }
}
