//! The relay's login to the upstream server, read with postgres-protocol's backend parser.

use super::cancel::CancelKey;
use super::{LoginTokens, Upstream};
use crate::wire::backend;
use crate::wire::conn::{Conn, End};
use crate::wire::startup::StartupParams;
use bytes::{BufMut, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::error::SqlState;

/// Logs in to `target` as PgBouncer's user and writes into `out` what PgBouncer gets: the
/// SASL final message and AuthenticationOk, then the upstream's messages up to and including
/// ReadyForQuery. Returns the upstream's cancel key, if it sent one.
pub(super) async fn upstream_login<T, U>(
    tokens: &T,
    server: &mut Conn<U>,
    out: &mut BytesMut,
    target: &Upstream,
    params: &StartupParams,
    server_final: Option<String>,
) -> Result<Option<CancelKey>, End>
where
    T: LoginTokens,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let user = params.get("user").unwrap_or_default();
    // Protocol 3.0 without `_pq_.` options: what the wire layer told PgBouncer it speaks.
    let forwarded = (params.0.iter())
        .filter(|(k, _)| k != "database" && !k.starts_with("_pq_."))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("database", target.database.as_str())]);
    frontend::startup_message(forwarded, &mut server.wbuf)?;
    server
        .flush()
        .await
        .map_err(|e| upstream_failed(target, e.into()))?;

    // Notices the server sends before AuthenticationOk wait until PgBouncer has its own.
    let mut held = BytesMut::new();
    loop {
        let (frame, message) = next(server, target).await?;
        match message {
            Message::AuthenticationOk => break,
            Message::AuthenticationCleartextPassword => {
                let token = tokens.token(target, user).await.map_err(|error| {
                    End::Fatal(
                        SqlState::SYSTEM_ERROR,
                        format!(
                            "no IAM token for {user}@{}:{} ({}): {error}",
                            target.host, target.port, target.region
                        ),
                    )
                })?;
                frontend::password_message(token.expose_secret().as_bytes(), &mut server.wbuf)?;
                server
                    .flush()
                    .await
                    .map_err(|e| upstream_failed(target, e.into()))?;
            }
            Message::AuthenticationMd5Password(_) | Message::AuthenticationSasl(_) => {
                return Err(End::Fatal(
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!(
                        "user \"{user}\" is not an IAM user: the server asked for a password \
                         (GRANT rds_iam TO {user})"
                    ),
                ));
            }
            Message::ErrorResponse(_) => {
                tracing::info!(
                    user,
                    host = target.host,
                    "the upstream server refused the login"
                );
                out.put_slice(&frame);
                return Err(End::Answered);
            }
            Message::NoticeResponse(_) => held.put_slice(&frame),
            _ if frame[0] == b'R' => return Err(other_method(&frame)),
            _ => return Err(unexpected(frame[0])),
        }
    }
    if let Some(server_final) = server_final {
        backend::authentication_sasl_final(out, server_final.as_bytes());
    }
    backend::authentication_ok(out);
    out.put_slice(&held);

    let mut cancel_key = None;
    loop {
        let (frame, message) = next(server, target).await?;
        out.put_slice(&frame);
        match message {
            Message::ReadyForQuery(_) => return Ok(cancel_key),
            Message::BackendKeyData(key) => {
                cancel_key = Some(CancelKey {
                    process_id: key.process_id(),
                    secret_key: key.secret_key(),
                });
            }
            // After AuthenticationOk, e.g. "database does not exist": PgBouncer reads it as
            // it would from the server itself.
            Message::ErrorResponse(_) => return Err(End::Answered),
            Message::ParameterStatus(_) | Message::NoticeResponse(_) => {}
            _ => return Err(unexpected(frame[0])),
        }
    }
}

/// The server's next message, whole (to pass on as it is) and parsed. The frame is bounded
/// in size by the connection before the parser sees it.
async fn next<U>(server: &mut Conn<U>, target: &Upstream) -> Result<(BytesMut, Message), End>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let frame = server
        .read_frame()
        .await
        .map_err(|e| upstream_failed(target, e))?;
    match Message::parse(&mut frame.clone()) {
        Ok(Some(message)) => Ok((frame, message)),
        // An authentication method postgres-protocol does not know either.
        Err(_) if frame[0] == b'R' && frame.len() >= 9 => Err(other_method(&frame)),
        Ok(None) => Err(unexpected(frame[0])),
        Err(error) => Err(End::Fatal(
            SqlState::PROTOCOL_VIOLATION,
            format!(
                "the server sent a malformed message (type 0x{:02x}) during login: {error}",
                frame[0]
            ),
        )),
    }
}

/// An authentication request (a whole 'R' frame) for a method other than a password.
fn other_method(frame: &[u8]) -> End {
    let code = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
    End::Fatal(
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        format!(
            "the server asked for authentication method {code}; the relay answers only with \
             IAM tokens"
        ),
    )
}

fn unexpected(tag: u8) -> End {
    End::Fatal(
        SqlState::PROTOCOL_VIOLATION,
        format!("the server sent an unexpected message (type 0x{tag:02x}) during login"),
    )
}

/// What PgBouncer hears when the upstream connection fails during the login.
fn upstream_failed(target: &Upstream, end: End) -> End {
    let why = match end {
        End::Io(error) => error.to_string(),
        End::Protocol(error) => error.to_string(),
        _ => "closed the connection".to_owned(),
    };
    End::Fatal(
        SqlState::CONNECTION_FAILURE,
        format!(
            "upstream {}:{} during login: {why}",
            target.host, target.port
        ),
    )
}
