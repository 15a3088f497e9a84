//! PgBouncer's admin console, reached as the daemon's own admin user.
//!
//! The console speaks only the simple query protocol, which tokio-postgres's `simple_query`
//! uses. The connection is kept between reloads and made anew after any error, so a PgBouncer
//! restart costs one failed attempt, not a stuck daemon.

use super::render::ADMIN_USER;
use super::scram_only::{Refusal, ScramOnly};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::{NoTls, SimpleQueryMessage};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach PgBouncer's admin console at {at}: {source}")]
    Connect {
        at: ConsoleAddress,
        source: tokio_postgres::Error,
    },
    #[error("cannot reach PgBouncer's admin console at {at}: {source}")]
    Unreachable {
        at: ConsoleAddress,
        source: std::io::Error,
    },
    #[error(
        "refused to log in to PgBouncer's admin console at {at}: {why}; the admin secret was \
         not sent (is something other than PgBouncer listening there?)"
    )]
    NotScram { at: ConsoleAddress, why: String },
    #[error("PgBouncer's admin console refused {command}: {source}")]
    Command {
        command: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("PgBouncer's admin console gave no answer to {0}")]
    NoAnswer(&'static str),
}

/// Where the console is reached: PgBouncer's unix socket in the daemon's own directory, where
/// no other user can listen, or else its TCP address.
#[derive(Debug, Clone)]
pub enum ConsoleAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ConsoleAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleAddress::Tcp(addr) => write!(f, "{addr}"),
            ConsoleAddress::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

pub struct AdminConsole {
    socket: Option<PathBuf>,
    tcp: SocketAddr,
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
}

impl AdminConsole {
    /// `listen` is PgBouncer's listen address; a wildcard address is reached over loopback.
    /// `socket_dir`, if any, is where the rendered pgbouncer.ini puts PgBouncer's unix socket,
    /// used whenever it is there (a PgBouncer on your own pgbouncer.ini may have none there).
    pub fn new(listen: SocketAddr, socket_dir: Option<&Path>, secret: &SecretString) -> Self {
        let socket = socket_dir.map(|dir| dir.join(format!(".s.PGSQL.{}", listen.port())));
        let tcp = SocketAddr::new(reachable_ip(listen), listen.port());
        let mut config = tokio_postgres::Config::new();
        config
            .user(ADMIN_USER)
            .password(secret.expose_secret())
            .dbname("pgbouncer")
            .application_name("aws-pgbouncer");
        Self {
            socket,
            tcp,
            config,
            client: None,
        }
    }

    /// PgBouncer's value of the setting `key` (`SHOW CONFIG`).
    pub async fn setting(&mut self, key: &str) -> Result<Option<String>, AdminError> {
        let rows = self.run("SHOW CONFIG").await?;
        Ok(rows.into_iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) if row.try_get("key").ok()? == Some(key) => {
                row.try_get("value").ok()?.map(str::to_owned)
            }
            _ => None,
        }))
    }

    /// PgBouncer's version string, e.g. `PgBouncer 1.24.1`.
    pub async fn version(&mut self) -> Result<String, AdminError> {
        let rows = self.run("SHOW VERSION").await?;
        rows.into_iter()
            .find_map(|message| match message {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .ok_or(AdminError::NoAnswer("SHOW VERSION"))
    }

    /// The (database, user) of every pool PgBouncer holds: the users with clients now, or
    /// with server connections kept for them.
    pub async fn pools(&mut self) -> Result<Vec<(String, String)>, AdminError> {
        let rows = self.run("SHOW POOLS").await?;
        Ok(rows
            .into_iter()
            .filter_map(|message| match message {
                SimpleQueryMessage::Row(row) => Some((
                    row.try_get("database").ok()??.to_owned(),
                    row.try_get("user").ok()??.to_owned(),
                )),
                _ => None,
            })
            .collect())
    }

    /// Makes PgBouncer re-read its config and auth file. Server connections survive it when
    /// only passwords changed (PgBouncer 1.24+).
    pub async fn reload(&mut self) -> Result<(), AdminError> {
        self.run("RELOAD").await.map(drop)
    }

    async fn run(&mut self, command: &'static str) -> Result<Vec<SimpleQueryMessage>, AdminError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.connect().await?,
        };
        let outcome = client.simple_query(command).await;
        match outcome {
            Ok(messages) => {
                self.client = Some(client);
                Ok(messages)
            }
            Err(source) => Err(AdminError::Command { command, source }),
        }
    }

    /// Through PgBouncer's socket in the daemon's directory when it is there, else over TCP.
    async fn connect(&self) -> Result<tokio_postgres::Client, AdminError> {
        match self.socket.as_ref().filter(|socket| socket.exists()) {
            Some(path) => {
                let at = ConsoleAddress::Unix(path.clone());
                let stream = within_timeout(&at, tokio::net::UnixStream::connect(path)).await?;
                self.log_in(stream, at).await
            }
            None => {
                let at = ConsoleAddress::Tcp(self.tcp);
                let stream = within_timeout(&at, tokio::net::TcpStream::connect(self.tcp)).await?;
                self.log_in(stream, at).await
            }
        }
    }

    /// Logs in over `stream`, answering only a SCRAM request (see [`ScramOnly`]).
    async fn log_in<S>(
        &self,
        stream: S,
        at: ConsoleAddress,
    ) -> Result<tokio_postgres::Client, AdminError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let refusal = Refusal::default();
        let guarded = ScramOnly::new(stream, refusal.clone());
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect_raw(guarded, NoTls))
                .await
                .map_err(|_| AdminError::Unreachable {
                    at: at.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                })?;
        let (client, connection) = connected.map_err(|source| match refusal.take() {
            Some(why) => AdminError::NotScram { at, why },
            None => AdminError::Connect { at, source },
        })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "admin console connection ended");
            }
        });
        Ok(client)
    }
}

async fn within_timeout<T>(
    at: &ConsoleAddress,
    connecting: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, AdminError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .map_err(|source| AdminError::Unreachable {
            at: at.clone(),
            source,
        })
}

/// A wildcard listen address is reached over loopback.
pub fn reachable_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// The known problems of the PgBouncer answering `SHOW VERSION` (`PgBouncer 1.24.1`), each
/// with its reason, for the daemon to warn about once at start. Unparsable versions (a
/// development build, say) get none.
pub fn version_warnings(version: &str) -> Vec<&'static str> {
    let number = version.split_whitespace().last().unwrap_or_default();
    let mut parts = number.split('.').map(|part| part.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return Vec::new();
    };
    let release = (major, minor, parts.next().flatten().unwrap_or(0));
    KNOWN_PROBLEMS
        .iter()
        .filter(|problem| (problem.first_affected..problem.fixed_in).contains(&release))
        .map(|problem| problem.reason)
        .collect()
}

struct KnownProblem {
    first_affected: (u32, u32, u32),
    fixed_in: (u32, u32, u32),
    reason: &'static str,
}

/// From PgBouncer's release notes and CVE advisories.
const KNOWN_PROBLEMS: &[KnownProblem] = &[
    KnownProblem {
        first_affected: (0, 0, 0),
        fixed_in: (1, 24, 0),
        reason: "PgBouncer before 1.24 drops every TLS server connection at each RELOAD, so \
                 each token refresh reconnects all pools; upgrade to 1.26.1 or newer",
    },
    KnownProblem {
        first_affected: (1, 24, 0),
        fixed_in: (1, 25, 0),
        reason: "PgBouncer 1.24.x crashes when a server asks for SCRAM and the password is 1024 \
                 bytes or longer (tokens signed with session credentials are); upgrade to \
                 1.26.1 or newer",
    },
    KnownProblem {
        first_affected: (0, 0, 0),
        fixed_in: (1, 25, 1),
        reason: "PgBouncer before 1.25.1 has CVE-2025-12819 (SQL through an auth_query with \
                 unqualified names when search_path is tracked; the daemon's auth_query is \
                 schema-qualified, one of your own may not be); upgrade to 1.26.1 or newer",
    },
    KnownProblem {
        first_affected: (0, 0, 0),
        fixed_in: (1, 25, 2),
        reason: "PgBouncer before 1.25.2 has CVE-2026-6664 to 6667 (6666: a server error \
                 without a SQLSTATE crashes it; the daemon's endpoint and relay always send \
                 one); upgrade to 1.26.1 or newer",
    },
    KnownProblem {
        first_affected: (1, 17, 0),
        fixed_in: (1, 26, 1),
        reason: "PgBouncer before 1.26.1 has CVE-2026-107348 to 107350 (packet buffer \
                 overflow, an empty startup option name spinning a core, a second \
                 StartupMessage during SCRAM logging in as another user); upgrade to 1.26.1 or \
                 newer",
    },
];

#[cfg(test)]
mod tests {
    use super::version_warnings;

    /// The first words of each warning for `version`.
    fn reasons(version: &str) -> Vec<String> {
        version_warnings(version)
            .iter()
            .map(|warning| warning.split(" (").next().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn each_release_gets_the_problems_it_has_and_no_others() {
        let all_cves = [
            "PgBouncer before 1.25.1 has CVE-2025-12819",
            "PgBouncer before 1.25.2 has CVE-2026-6664 to 6667",
            "PgBouncer before 1.26.1 has CVE-2026-107348 to 107350",
        ];
        let mut old = vec!["PgBouncer before 1.24 drops every TLS server connection at each RELOAD, so each token refresh reconnects all pools; upgrade to 1.26.1 or newer".to_owned()];
        old.extend(all_cves.map(String::from));
        assert_eq!(reasons("PgBouncer 1.18.0"), old);
        let mut trixie = vec!["PgBouncer 1.24.x crashes when a server asks for SCRAM and the password is 1024 bytes or longer".to_owned()];
        trixie.extend(all_cves.map(String::from));
        assert_eq!(reasons("PgBouncer 1.24.1"), trixie);
        assert_eq!(reasons("PgBouncer 1.25.0"), all_cves.map(String::from));
        assert_eq!(reasons("PgBouncer 1.25.1"), all_cves[1..].to_vec());
        assert_eq!(reasons("PgBouncer 1.25.2"), all_cves[2..].to_vec());
        assert_eq!(reasons("PgBouncer 1.26.0"), all_cves[2..].to_vec());
        assert!(reasons("PgBouncer 1.26.1").is_empty());
        assert!(reasons("PgBouncer 1.27").is_empty());
        assert!(reasons("PgBouncer 2.0.0").is_empty());
        assert!(reasons("PgBouncer dev").is_empty());
    }
}
