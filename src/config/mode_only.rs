//! Settings that only some modes read. Under another mode they do nothing, and the daemon
//! says so: a relay limit "set" in auth-query mode, or an endpoint address in config mode,
//! looks configured and is not. A warning, not an error: one set of settings (a chart's
//! environment, a shared TOML file) serving several modes is a normal way to deploy.

use super::{ConfigFile, Mode};
use crate::cli::RunArgs;
use clap::ValueEnum;

const AUTH_QUERY: &[Mode] = &[Mode::AuthQuery];
const PASSTHROUGH: &[Mode] = &[Mode::Passthrough];

/// Warns, in one line, of every setting given (as a flag, its environment variable or a key)
/// that `mode` does not read.
pub(super) fn warn_unread(mode: Mode, args: &RunArgs, file: &ConfigFile) {
    let settings: [(&str, bool, &[Mode]); 6] = [
        (
            "auth_listen",
            args.auth_listen.is_some() || file.auth_listen.is_some(),
            AUTH_QUERY,
        ),
        (
            "auth_listen_non_loopback",
            args.auth_listen_non_loopback,
            AUTH_QUERY,
        ),
        (
            "relay_listen",
            args.relay_listen.is_some() || file.relay_listen.is_some(),
            PASSTHROUGH,
        ),
        (
            "relay_max_connections",
            args.relay_max_connections.is_some() || file.relay_max_connections.is_some(),
            PASSTHROUGH,
        ),
        (
            "relay_login_rate",
            args.relay_login_rate.is_some() || file.relay_login_rate.is_some(),
            PASSTHROUGH,
        ),
        (
            "relay_follow_pgbouncer_cpu",
            args.relay_follow_pgbouncer_cpu.is_some() || file.relay_follow_pgbouncer_cpu.is_some(),
            PASSTHROUGH,
        ),
    ];
    let unread: Vec<String> = settings
        .iter()
        .filter(|(_, given, modes)| *given && !modes.contains(&mode))
        .map(|(name, _, modes)| format!("{name} (read in {} mode)", mode_names(modes)))
        .collect();
    if !unread.is_empty() {
        tracing::warn!(
            mode = mode_names(&[mode]),
            settings = unread.join(", "),
            "settings given that this mode does not read: they have no effect"
        );
    }
}

/// The names clap and serde accept, so that the message names modes as the user writes them.
fn mode_names(modes: &[Mode]) -> String {
    let names: Vec<String> = modes
        .iter()
        .filter_map(|mode| mode.to_possible_value())
        .map(|value| value.get_name().to_owned())
        .collect();
    names.join(" and ")
}
