//! Auth-query mode's answer to PgBouncer keeping each pool's password: pushing refreshed
//! tokens into the pools.
//!
//! PgBouncer runs its auth_query only when a client logs in, and keeps the answer for the
//! pool: an application that stays connected never asks again, and PgBouncer's next server
//! login for it (idle timeout, a killed connection, failover, pool growth) would use a dead
//! token. So whenever a token is refreshed, the daemon logs in to PgBouncer once as each
//! user that has a pool (`SHOW POOLS`), sending no query: PgBouncer re-runs the auth_query
//! for that login and updates the pool's password in place.
//!
//! Only the pools of the users whose tokens changed are touched, and the events that arrive
//! during a pass make one next pass: each refresh costs a login per pool of that user, not
//! one per pool of every user.

use crate::config::Database;
use crate::pgbouncer::admin::AdminConsole;
use crate::token::{Changed, KeyEvents};
use std::net::IpAddr;
use std::time::Duration;

const TOUCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes PgBouncer re-run its auth_query for the pools whose users got new tokens.
pub(super) struct PoolRefresher {
    pub(super) console: AdminConsole,
    pub(super) pgbouncer: IpAddr,
    pub(super) pgbouncer_port: u16,
    pub(super) databases: Vec<Database>,
}

impl PoolRefresher {
    /// Follows `events` for as long as the token source lives.
    pub(super) fn spawn(self, events: KeyEvents) {
        tokio::spawn(self.run(events));
    }

    async fn run(mut self, mut events: KeyEvents) {
        while let Some(changed) = events.next().await {
            self.refresh_pools(&changed).await;
        }
    }

    async fn refresh_pools(&mut self, changed: &Changed) {
        let pools = match self.console.pools().await {
            Ok(pools) => pools,
            Err(error) => {
                tracing::warn!(%error, "cannot list PgBouncer's pools to refresh their tokens");
                return;
            }
        };
        for (database, user) in pools {
            let refreshed = self.databases.iter().any(|db| {
                db.name == database
                    && db.allowed_users.contains(&user)
                    && changed.contains(&db.key_for(&user))
            });
            if refreshed {
                self.touch(&database, &user).await;
            }
        }
    }

    /// A login that sends no query: enough for PgBouncer to run auth_query and update the
    /// pool's password.
    async fn touch(&self, database: &str, user: &str) {
        let connected = tokio_postgres::Config::new()
            .host(self.pgbouncer.to_string())
            .port(self.pgbouncer_port)
            .user(user)
            .dbname(database)
            .application_name("aws-pgbouncer-refresh")
            .connect_timeout(TOUCH_TIMEOUT)
            .connect(tokio_postgres::NoTls)
            .await;
        match connected {
            Ok(_) => tracing::debug!(database, user, "refreshed the pool's token"),
            Err(error) => {
                tracing::warn!(database, user, %error, "could not refresh the pool's token")
            }
        }
    }
}
