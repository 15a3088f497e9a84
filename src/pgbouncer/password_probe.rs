//! Measures the password limit of the PgBouncer that runs, rather than guess it from
//! `SHOW VERSION`: the development branch that raised it from 2047 to 65530 bytes still
//! reports 1.25.2, and PgBouncer truncates a longer password without a word.
//!
//! The probe is a `[databases]` entry of its own, in [`PROBE_INI`] (which `databases.ini`
//! `%include`s), whose forced user has a [`PROBE_PASSWORD_BYTES`]-byte password, longer than
//! any PgBouncer keeps, and asks for one server connection (`min_pool_size=1`): PgBouncer 1.21
//! and newer opens it without any client. The server it dials is the daemon's probe socket,
//! which asks for the password in clear text, takes the length of what PgBouncer kept of it
//! as the limit, and refuses the login. Once measured, the entry is emptied out.
//!
//! The password is random letters that log in nowhere, so the probe holds no secret; they
//! authenticate PgBouncer to the probe: a peer that does not send a long enough prefix of
//! them (another local process of the daemon's uid) is refused and measures nothing.

use crate::token::{Learned, PasswordLimit};
use crate::wire::backend;
use crate::wire::conn::{Conn, End};
use crate::wire::startup::{First, Handshake};
use crate::wire::{Afterwards, Protocol};
use rand::RngExt;
use rand::distr::Alphanumeric;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;

/// The file that holds the probe's entry while it measures, and a comment after.
pub const PROBE_INI: &str = "password-probe.ini";
/// The entry's name, as `SHOW DATABASES` and PgBouncer's log show it. No hba rule admits a
/// client to it.
pub const PROBE_DATABASE: &str = "aws_pgbouncer_password_probe";
const PROBE_USER: &str = "aws_pgbouncer_password_probe";
/// More than any PgBouncer can pass on: PostgreSQL refuses authentication messages over
/// 65535 bytes, so no server takes a longer cleartext password than 65530.
pub const PROBE_PASSWORD_BYTES: usize = 65536;
/// A prefix this long of the random password cannot be guessed; every released PgBouncer
/// keeps far more.
const MIN_AUTHENTIC_BYTES: usize = 64;
/// The largest message the probe reads: the password message with its header and NUL.
pub const MAX_PROBE_MESSAGE: usize = PROBE_PASSWORD_BYTES + 64;

const HEADER: &str = ";; Written by aws-pgbouncer: PgBouncer's password-limit probe.\n";

/// Random letters and digits, which need no quoting in PgBouncer's connection strings.
pub fn probe_password() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(PROBE_PASSWORD_BYTES)
        .map(char::from)
        .collect()
}

/// The probe's entry: PgBouncer keeps one server connection to the probe socket
/// `{socket_dir}/.s.PGSQL.{port}`, logging in with `password`.
pub fn probe_ini(socket_dir: &Path, port: u16, password: &str) -> String {
    format!(
        "{HEADER}[databases]\n{PROBE_DATABASE} = host='{}' port={port} dbname={PROBE_DATABASE} \
         user={PROBE_USER} password='{password}' pool_size=1 min_pool_size=1 \
         max_db_connections=1\n",
        socket_dir.display().to_string().replace('\'', "''"),
    )
}

/// What the file holds once the probe is done: `databases.ini` still includes it.
pub fn finished_probe_ini(outcome: &str) -> String {
    format!("{HEADER};; {outcome}; the probe's entry is gone.\n")
}

/// Why a connection to the probe measured nothing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotTheProbe {
    #[error("the password sent is not the probe's: the peer is not PgBouncer on its files")]
    Foreign,
    #[error("the password sent is not a password message")]
    Malformed,
}

/// PgBouncer's limit from the password it sent (`received`, without the NUL) for `sent`.
pub fn measure(received: &[u8], sent: &str) -> Result<PasswordLimit, NotTheProbe> {
    if received.len() < MIN_AUTHENTIC_BYTES || !sent.as_bytes().starts_with(received) {
        return Err(NotTheProbe::Foreign);
    }
    let learned = match received.len() == sent.len() {
        true => Learned::MeasuredAtLeast,
        false => Learned::Measured,
    };
    Ok(PasswordLimit {
        bytes: received.len(),
        learned,
    })
}

/// The probe socket's server: each authentic measurement goes to `measured`.
pub struct PasswordProbe {
    pub password: String,
    pub measured: mpsc::Sender<PasswordLimit>,
}

impl PasswordProbe {
    async fn measure_one<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        conn: &mut Conn<S>,
    ) -> Result<PasswordLimit, End> {
        backend::authentication_cleartext_password(&mut conn.wbuf);
        conn.flush().await?;
        let (kind, body) = conn.read_message().await?;
        let received = match (kind, body.split_last()) {
            (b'p', Some((0, password))) => password,
            _ => return Err(refused(NotTheProbe::Malformed)),
        };
        measure(received, &self.password).map_err(refused)
    }
}

fn refused(why: NotTheProbe) -> End {
    End::Fatal(SqlState::INVALID_PASSWORD, why.to_string())
}

impl Protocol for PasswordProbe {
    async fn started<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        mut conn: Conn<S>,
        first: First,
        handshake: Handshake,
    ) -> Option<Afterwards> {
        if let First::Cancel(_) = first {
            conn.finish(End::Quiet, &handshake.peer).await;
            return None;
        }
        let end = match handshake.bounded(self.measure_one(&mut conn)).await {
            Ok(limit) => {
                let _ = self.measured.try_send(limit);
                // PgBouncer logs this as the failed login of the probe's entry; the SQLSTATE
                // is not optional (PgBouncer before 1.25.2 crashes without one).
                End::Fatal(
                    SqlState::CANNOT_CONNECT_NOW,
                    format!(
                        "aws-pgbouncer's password-limit probe, not a database: measured {} \
                         bytes",
                        limit.bytes
                    ),
                )
            }
            Err(end) => {
                tracing::warn!(peer = %handshake.peer, ?end, "password-limit probe: connection refused, nothing measured");
                end
            }
        };
        conn.finish(end, &handshake.peer).await;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_pgbouncer_kept_is_its_limit() {
        let sent = probe_password();
        assert_eq!(sent.len(), PROBE_PASSWORD_BYTES);
        let kept = |len: usize| measure(&sent.as_bytes()[..len], &sent);
        let limit = kept(2047).unwrap();
        assert_eq!((limit.bytes, limit.learned), (2047, Learned::Measured));
        assert_eq!(kept(65530).unwrap().bytes, 65530);
        let whole = kept(PROBE_PASSWORD_BYTES).unwrap();
        assert_eq!(
            (whole.bytes, whole.learned),
            (PROBE_PASSWORD_BYTES, Learned::MeasuredAtLeast)
        );
    }

    #[test]
    fn a_peer_that_does_not_know_the_password_measures_nothing() {
        let sent = probe_password();
        let mut forged = sent.as_bytes()[..3000].to_vec();
        forged[2999] ^= 1;
        assert_eq!(measure(&forged, &sent), Err(NotTheProbe::Foreign));
        assert_eq!(measure(b"", &sent), Err(NotTheProbe::Foreign));
        let short = &sent.as_bytes()[..MIN_AUTHENTIC_BYTES - 1];
        assert_eq!(measure(short, &sent), Err(NotTheProbe::Foreign));
        assert!(measure(&sent.as_bytes()[..MIN_AUTHENTIC_BYTES], &sent).is_ok());
        let longer = format!("{sent}x");
        assert_eq!(measure(longer.as_bytes(), &sent), Err(NotTheProbe::Foreign));
    }

    #[test]
    fn the_entry_keeps_one_server_connection_to_the_probe_socket() {
        let ini = probe_ini(Path::new("/run/o'dir"), 1, "pw");
        assert!(
            ini.ends_with(
                "aws_pgbouncer_password_probe = host='/run/o''dir' port=1 \
                 dbname=aws_pgbouncer_password_probe user=aws_pgbouncer_password_probe \
                 password='pw' pool_size=1 min_pool_size=1 max_db_connections=1\n"
            ),
            "{ini}"
        );
        assert!(!finished_probe_ini("measured").contains(PROBE_DATABASE));
    }
}
