//! The SCRAM-SHA-256 exchange over a [`Conn`], up to the check of the client's proof.

use super::backend;
use super::conn::{Conn, End};
use super::framing::{self, ProtocolError};
use super::scram::{self, ScramError, ScramSecret};
use base64::Engine;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::error::SqlState;

/// Runs SCRAM-SHA-256 for `user` against `secret`. Returns the server-final-message unsent,
/// so that the relay can hold it back until the upstream server has accepted the login:
/// PgBouncer then never sees a success followed by a failure.
pub(crate) async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    secret: &ScramSecret,
    user: &str,
) -> Result<String, End> {
    let scram_end = |e: ScramError| match e {
        ScramError::WrongProof => password_failed(user),
        ScramError::Malformed(what) => End::Fatal(
            SqlState::PROTOCOL_VIOLATION,
            format!("malformed SCRAM message: {what}"),
        ),
    };

    backend::authentication_sasl(&mut conn.wbuf, scram::MECHANISM);
    conn.flush().await?;
    let (mechanism, first) = framing::decode_sasl_initial(password_message(conn).await?)?;
    if mechanism != scram::MECHANISM {
        return Err(End::Fatal(
            SqlState::PROTOCOL_VIOLATION,
            "client selected an invalid SASL authentication mechanism".into(),
        ));
    }
    let mut nonce = [0u8; 18];
    rand::fill(&mut nonce);
    let nonce = base64::engine::general_purpose::STANDARD.encode(nonce);
    let (state, server_first) = scram::client_first(secret, &first, &nonce).map_err(scram_end)?;
    backend::authentication_sasl_continue(&mut conn.wbuf, server_first.as_bytes());
    conn.flush().await?;
    state
        .client_final(&password_message(conn).await?)
        .map_err(scram_end)
}

/// What a client that failed the proof is told (28P01, as PostgreSQL says it).
pub(crate) fn password_failed(user: &str) -> End {
    End::Fatal(
        SqlState::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

/// The next message, which must be a 'p' (or a Terminate).
async fn password_message<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
) -> Result<Bytes, End> {
    match conn.read_message().await? {
        (b'p', body) => Ok(body),
        (b'X', _) => Err(End::Quiet),
        (tag, _) => Err(ProtocolError::UnknownType(tag).into()),
    }
}
