//! Where the daemon's local Postgres servers for PgBouncer (the auth endpoint, the relay)
//! listen, and how PgBouncer reaches them.

use crate::config::LocalListen;
use crate::endpoint::{BoundListener, DEFAULT_SOCKET_MODE, Listen};
use crate::pgbouncer::admin::reachable_ip;
use std::path::Path;

pub(super) fn is_tcp(listen: &LocalListen) -> bool {
    matches!(listen, LocalListen::Tcp(_))
}

pub(super) struct LocalAddress {
    pub listen: Listen,
    /// PgBouncer's `host=`: the address, or the socket's directory.
    pub host: String,
    pub port: u16,
}

impl LocalAddress {
    pub fn of(listen: &LocalListen, dir: &Path) -> Self {
        match *listen {
            LocalListen::Tcp(addr) => Self {
                listen: Listen::Tcp(addr),
                host: reachable_ip(addr).to_string(),
                port: addr.port(),
            },
            LocalListen::Unix { port } => Self {
                listen: Listen::Unix {
                    path: dir.join(format!(".s.PGSQL.{port}")),
                    mode: DEFAULT_SOCKET_MODE,
                },
                host: dir.display().to_string(),
                port,
            },
        }
    }

    pub async fn bind(&self, what: &str) -> Result<BoundListener, String> {
        BoundListener::bind(&self.listen)
            .await
            .map_err(|error| format!("{what} cannot listen on {:?}: {error}", self.listen))
    }
}
