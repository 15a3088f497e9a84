//! How many server connections the PgBouncer the daemon configures may open at once, read
//! from the same settings its files are rendered from. In passthrough mode every one of them
//! is a relay connection, so this is what the relay must admit: a relay limit below it turns
//! PgBouncer's server logins into "sorry, too many clients already" under load.

use crate::config::{Database, Settings};

/// PgBouncer's `default_pool_size` when nothing sets it.
const PGBOUNCER_DEFAULT_POOL_SIZE: usize = 20;

/// Connections the relay admits beyond PgBouncer's server connections: PgBouncer opens a new
/// connection for each cancel request, and a server connection PgBouncer has closed may still
/// hold its slot for a moment while the relay tears it down.
fn headroom(server_connections: usize) -> usize {
    server_connections / 4 + 8
}

/// The relay's connection limit for `settings`: for each database entry, the most server
/// connections PgBouncer may open to it (its `max_db_connections` when set, else a pool of
/// `pool_size` plus `reserve_pool` per allowed user), summed, plus [`headroom`].
pub fn relay_connection_limit(settings: &Settings) -> usize {
    let pooled = PoolSizes::of(settings);
    let servers: usize = settings
        .databases
        .iter()
        .map(|database| pooled.most_server_connections(database))
        .fold(0, usize::saturating_add);
    servers.saturating_add(headroom(servers))
}

/// The `[pgbouncer]` defaults that an entry's own options override.
struct PoolSizes {
    pool_size: usize,
    reserve_pool: usize,
    /// 0: no limit, as in PgBouncer.
    max_db_connections: usize,
}

impl PoolSizes {
    fn of(settings: &Settings) -> Self {
        let global = |key: &str| number(&settings.pgbouncer_settings, key);
        Self {
            pool_size: global("default_pool_size").unwrap_or(PGBOUNCER_DEFAULT_POOL_SIZE),
            reserve_pool: global("reserve_pool_size").unwrap_or(0),
            max_db_connections: global("max_db_connections").unwrap_or(0),
        }
    }

    fn most_server_connections(&self, database: &Database) -> usize {
        let option = |key: &str| number(&database.options, key);
        let per_user = option("pool_size")
            .unwrap_or(self.pool_size)
            .saturating_add(option("reserve_pool").unwrap_or(self.reserve_pool));
        let pools = per_user.saturating_mul(database.allowed_users.len());
        match option("max_db_connections").unwrap_or(self.max_db_connections) {
            0 => pools,
            cap => cap.min(pools),
        }
    }
}

/// The value of `key` as PgBouncer would read a count, if set and a count. A value PgBouncer
/// cannot read either stops it from loading the file, so the default is as good as any.
fn number(settings: &[(String, String)], key: &str) -> Option<usize> {
    settings
        .iter()
        .rev()
        .find(|(name, _)| name == key)
        .and_then(|(_, value)| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgbouncer::render::tests::settings_with;

    fn entry(users: &[&str], options: &[(&str, &str)]) -> Database {
        let mut database = crate::pgbouncer::render::tests::database("app", users[0]);
        database.allowed_users = users.iter().map(|user| user.to_string()).collect();
        database.options = options
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        database
    }

    #[test]
    fn each_allowed_user_gets_a_pool_of_pgbouncers_default_size() {
        let users: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let settings = settings_with(vec![entry(&users, &[])], &[]);
        // 1,000 users × 20, and a quarter more (plus 8) for cancels and closing connections.
        assert_eq!(relay_connection_limit(&settings), 20_000 + 5_000 + 8);
    }

    #[test]
    fn entry_options_win_over_pgbouncer_defaults_and_max_db_connections_caps() {
        let global = [("default_pool_size", "10"), ("reserve_pool_size", "2")];
        let databases = vec![
            // 3 users × (10 + 2), from the [pgbouncer] table.
            entry(&["a", "b", "c"], &[]),
            // 2 users × (5 + 1), from the entry's own options.
            entry(&["a", "b"], &[("pool_size", "5"), ("reserve_pool", "1")]),
            // 4 users × 12 = 48, capped by the entry's max_db_connections.
            entry(&["a", "b", "c", "d"], &[("max_db_connections", "7")]),
        ];
        let servers = 36 + 12 + 7;
        assert_eq!(
            relay_connection_limit(&settings_with(databases, &global)),
            servers + servers / 4 + 8
        );
    }

    #[test]
    fn a_global_max_db_connections_caps_every_entry() {
        let databases = vec![entry(&["a", "b"], &[]), entry(&["a"], &[])];
        let settings = settings_with(databases, &[("max_db_connections", "15")]);
        // min(40, 15) + min(20, 15)
        assert_eq!(relay_connection_limit(&settings), 30 + 30 / 4 + 8);
    }

    #[test]
    fn one_user_with_a_pool_of_one_needs_few() {
        let settings = settings_with(vec![entry(&["a"], &[("pool_size", "1")])], &[]);
        assert_eq!(relay_connection_limit(&settings), 9);
    }
}
