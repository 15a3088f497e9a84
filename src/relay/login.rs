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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use secrecy::SecretString;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Given(&'static str);

    impl LoginTokens for Given {
        async fn token(&self, upstream: &Upstream, user: &str) -> Result<SecretString, String> {
            assert_eq!((upstream.host.as_str(), user), ("db.example", "app_user"));
            Ok(self.0.to_owned().into())
        }
    }

    struct Failing;

    impl LoginTokens for Failing {
        async fn token(&self, _: &Upstream, _: &str) -> Result<SecretString, String> {
            Err("credentials expired".into())
        }
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(4 + i32::try_from(body.len()).unwrap()).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: i32, rest: &[u8]) -> Vec<u8> {
        message(b'R', &[&code.to_be_bytes()[..], rest].concat())
    }

    struct Outcome {
        result: Result<Option<CancelKey>, End>,
        /// What PgBouncer would be sent.
        out: BytesMut,
        /// The password messages the server received, as their bodies without the NUL.
        passwords: Vec<Vec<u8>>,
    }

    /// Runs the upstream login against a server that answers `script` to any startup.
    async fn login_against(tokens: impl LoginTokens, script: Vec<u8>) -> Outcome {
        let (relay_side, mut server_side) = tokio::io::duplex(16 * 1024);
        let target = Upstream {
            kind: crate::token::TokenKind::Rds,
            host: "db.example".into(),
            port: 5432,
            dial: None,
            region: "us-east-1".into(),
            database: "appdb".into(),
            users: vec!["app_user".into()],
            role: None,
        };
        let params = StartupParams(vec![
            ("user".into(), "app_user".into()),
            ("database".into(), "target".into()),
        ]);
        let relay = async {
            let mut server = Conn::new(relay_side, 16 * 1024);
            let mut out = BytesMut::new();
            let result =
                upstream_login(&tokens, &mut server, &mut out, &target, &params, None).await;
            drop(server);
            (result, out)
        };
        let server = async {
            server_side.write_all(&script).await.unwrap();
            // Then EOF: a relay that waits for more hears the server close.
            server_side.shutdown().await.unwrap();
            let mut received = Vec::new();
            let _ = server_side.read_to_end(&mut received).await;
            received
        };
        let ((result, out), received) = tokio::join!(relay, server);
        let mut received = bytes::Bytes::from(received);
        let startup_len = (&received[..4]).get_i32() as usize;
        received.advance(startup_len);
        let mut passwords = Vec::new();
        while received.len() >= 5 {
            let tag = received.get_u8();
            let len = received.get_i32() as usize - 4;
            let body = received.split_to(len);
            assert_eq!(tag, b'p', "only password messages follow the startup");
            passwords.push(body[..body.len() - 1].to_vec());
        }
        Outcome {
            result,
            out,
            passwords,
        }
    }

    fn refused_with(outcome: &Outcome, code: &SqlState, needle: &str) {
        match &outcome.result {
            Err(End::Fatal(got, text)) => {
                assert_eq!(got, code, "{text}");
                assert!(text.contains(needle), "{needle:?} in {text:?}");
            }
            other => panic!("a refusal expected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_token_from_login_tokens_is_the_password_and_the_key_is_kept() {
        let script = [
            auth(3, b""),
            message(b'N', b"SNOTICE\0Mearly\0\0"),
            auth(0, b""),
            message(b'S', b"server_version\x0016\0"),
            message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]),
            message(b'Z', b"I"),
        ]
        .concat();
        let outcome = login_against(Given("token-from-the-trait"), script).await;
        assert_eq!(outcome.passwords, [b"token-from-the-trait".to_vec()]);
        let key = outcome.result.expect("logged in");
        assert_eq!(
            key,
            Some(CancelKey {
                process_id: 7,
                secret_key: 9
            })
        );
        // PgBouncer gets AuthenticationOk, the held notice, then the rest unchanged.
        let expected = [
            auth(0, b""),
            message(b'N', b"SNOTICE\0Mearly\0\0"),
            message(b'S', b"server_version\x0016\0"),
            message(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]),
            message(b'Z', b"I"),
        ]
        .concat();
        assert_eq!(&outcome.out[..], &expected[..]);
    }

    #[tokio::test]
    async fn each_way_a_login_fails_has_its_sqlstate() {
        let no_token = login_against(Failing, auth(3, b"")).await;
        refused_with(&no_token, &SqlState::SYSTEM_ERROR, "credentials expired");
        assert!(no_token.passwords.is_empty());

        let md5 = login_against(Given("t"), auth(5, b"salt")).await;
        refused_with(
            &md5,
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "is not an IAM user",
        );
        let sasl = login_against(Given("t"), auth(10, b"SCRAM-SHA-256\0\0")).await;
        refused_with(
            &sasl,
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "is not an IAM user",
        );
        for code in [7, 13] {
            let other = login_against(Given("t"), auth(code, b"")).await;
            refused_with(
                &other,
                &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                &format!("authentication method {code};"),
            );
        }
        let malformed = login_against(Given("t"), message(b'R', b"\0\0")).await;
        refused_with(&malformed, &SqlState::PROTOCOL_VIOLATION, "malformed");
        let unexpected = login_against(Given("t"), message(b'D', b"\0\0")).await;
        refused_with(&unexpected, &SqlState::PROTOCOL_VIOLATION, "type 0x44");
        let closed = login_against(Given("t"), Vec::new()).await;
        refused_with(&closed, &SqlState::CONNECTION_FAILURE, "db.example:5432");

        // The server's own refusal reaches PgBouncer byte for byte.
        let error = message(b'E', b"SFATAL\0C28000\0MPAM authentication failed\0\0");
        let refused = login_against(Given("t"), [auth(3, b""), error.clone()].concat()).await;
        assert!(matches!(refused.result, Err(End::Answered)));
        assert_eq!(&refused.out[..], &error[..]);
    }
}
