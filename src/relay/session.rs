//! One connection from PgBouncer: a server login to relay, or a cancel request to forward.
//!
//! Up to the upstream's ReadyForQuery every message is framed and bounded in size, and the
//! whole handshake in time; after it the relay copies bytes and looks at none of them.

use super::cancel::{self, Registration};
use super::upstream::{self, UpstreamStream};
use super::{Shared, Upstream};
use crate::endpoint::backend;
use crate::endpoint::listener::Stream;
use crate::endpoint::pre_auth::PreAuth;
use crate::endpoint::session::{Conn, End, Negotiated, bounded, negotiate, scram_exchange};
use crate::metrics::RelayRefusal;
use crate::token::TokenKey;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};

pub(super) async fn run(
    shared: Arc<Shared>,
    stream: Stream,
    peer: String,
    stopped: watch::Receiver<bool>,
    pre_auth: PreAuth,
) {
    let handshake = Handshake {
        deadline: Instant::now() + shared.config.limits.handshake_timeout,
        peer,
        stopped,
        pre_auth,
    };
    match stream {
        Stream::Tcp(s) => {
            let offer_tls = shared.acceptor.is_some();
            let (client, negotiated) = greet(&shared, s, offer_tls, &handshake).await;
            let Ok(Negotiated::StartTls) = negotiated else {
                return connection(&shared, client, negotiated, false, handshake).await;
            };
            let Some(acceptor) = &shared.acceptor else {
                return;
            };
            let peer = handshake.peer.clone();
            match timeout_at(handshake.deadline, acceptor.accept(client.stream)).await {
                Ok(Ok(tls)) => without_tls(&shared, tls, false, handshake).await,
                Ok(Err(error)) => tracing::info!(peer, %error, "TLS handshake failed"),
                Err(_) => tracing::info!(peer, "TLS handshake timed out"),
            }
        }
        Stream::Unix(s) => {
            let trusted = shared.config.peer_uid.is_some_and(|uid| {
                s.peer_cred()
                    .is_ok_and(|credentials| credentials.uid() == uid)
            });
            // PgBouncer never starts TLS over a unix socket.
            without_tls(&shared, s, trusted, handshake).await;
        }
    }
}

/// What bounds one connection's handshake, and whom it is with.
struct Handshake {
    deadline: Instant,
    peer: String,
    stopped: watch::Receiver<bool>,
    pre_auth: PreAuth,
}

/// A connection on which TLS is not offered, or already running underneath.
async fn without_tls<S>(shared: &Shared, stream: S, trusted: bool, handshake: Handshake)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (client, negotiated) = greet(shared, stream, false, &handshake).await;
    connection(shared, client, negotiated, trusted, handshake).await;
}

/// Frames the connection and reads what PgBouncer asks for first.
async fn greet<S>(
    shared: &Shared,
    stream: S,
    offer_tls: bool,
    handshake: &Handshake,
) -> (Conn<S>, Result<Negotiated, End>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut client = Conn::new(stream, shared.config.limits.max_message_bytes);
    let negotiated = bounded(
        handshake.deadline,
        handshake.stopped.clone(),
        negotiate(&mut client, offer_tls),
    )
    .await;
    (client, negotiated)
}

/// Goes on from what PgBouncer asked for first. `trusted`: the peer's uid already proved it
/// is PgBouncer, so no password is asked.
async fn connection<S>(
    shared: &Shared,
    mut client: Conn<S>,
    negotiated: Result<Negotiated, End>,
    trusted: bool,
    handshake: Handshake,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Handshake {
        deadline,
        peer,
        stopped,
        pre_auth,
    } = handshake;
    let params = match negotiated {
        Ok(Negotiated::Startup(params)) => params,
        Ok(Negotiated::Cancel(key)) => {
            forward_cancel(shared, &key, deadline, &peer).await;
            return client.finish(End::Quiet, &peer).await;
        }
        // A second SSLRequest inside TLS is answered "N" by negotiate; none gets here.
        Ok(Negotiated::StartTls) => return,
        Err(end) => return client.finish(end, &peer).await,
    };
    let logged_in = bounded(
        deadline,
        stopped,
        login(shared, &mut client, &params, trusted, pre_auth),
    )
    .await;
    match logged_in {
        Ok((server, registration)) => {
            relay(client, server, &peer).await;
            drop(registration);
        }
        Err(end) => client.finish(end, &peer).await,
    }
}

async fn forward_cancel(shared: &Shared, key: &[u8], deadline: Instant, peer: &str) {
    let Some(upstream) = shared.cancels.lookup(key) else {
        tracing::debug!(peer, "cancel request with an unknown key dropped");
        return;
    };
    let forwarded = timeout_at(deadline, cancel::forward(&upstream, &shared.tls, key)).await;
    match forwarded {
        Ok(Ok(())) => tracing::debug!(peer, host = upstream.host, "cancel request forwarded"),
        Ok(Err(error)) => tracing::warn!(peer, error, "cancel request not forwarded"),
        Err(_) => tracing::warn!(peer, host = upstream.host, "forwarding a cancel timed out"),
    }
}

/// The startup parameters PgBouncer puts in a (non-replication) server StartupMessage; the
/// relay refuses any other. Matched without regard to case, as PostgreSQL matches settings.
pub const FORWARDED_PARAMETERS: [&str; 6] = [
    "user",
    "database",
    "client_encoding",
    "datestyle",
    "timezone",
    "application_name",
];

/// Authenticates PgBouncer, checks that it asks for no more than it may, then logs in
/// upstream. PgBouncer's login succeeds only when the upstream's does: the SCRAM
/// server-final-message is held back until then.
async fn login<S>(
    shared: &Shared,
    client: &mut Conn<S>,
    params: &[(String, String)],
    trusted: bool,
    pre_auth: PreAuth,
) -> Result<(Conn<UpstreamStream>, Option<Registration>), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let user = param("user").unwrap_or_default();
    if user.is_empty() {
        return Err(End::Fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet".into(),
        ));
    }
    let server_final = if trusted {
        None
    } else {
        let proof = scram_exchange(client, &shared.secret, user).await;
        if let Err(End::Fatal("28P01", _)) = &proof {
            shared.count_refusal(RelayRefusal::Authentication);
        }
        Some(proof?)
    };
    // PgBouncer has proved itself; the upstream login may take seconds and keeps its slot.
    pre_auth.authenticated();
    // Only now, so that the target names are not disclosed to whoever can connect.
    let database = param("database").filter(|d| !d.is_empty()).unwrap_or(user);
    let target = admit(shared, params, user, database)?;
    let stream = upstream::connect(target, &shared.tls)
        .await
        .map_err(|error| End::Fatal("08001", error))?;
    let mut server = Conn::new(stream, shared.config.limits.max_message_bytes);
    let key = upstream_login(
        shared,
        &mut server,
        &mut client.wbuf,
        target,
        params,
        server_final,
    )
    .await?;
    // Registered before PgBouncer sees ReadyForQuery, so before it can want to cancel.
    let registration = key.map(|key| shared.cancels.register(key, target.clone()));
    Ok((server, registration))
}

/// The target PgBouncer may log in to as `user` with `params`, or the refusal it gets.
fn admit<'a>(
    shared: &'a Shared,
    params: &[(String, String)],
    user: &str,
    database: &str,
) -> Result<&'a Upstream, End> {
    let Some(target) = shared.config.targets.get(database) else {
        return Err(shared.refused(
            RelayRefusal::UnknownDatabase,
            End::Fatal(
                "3D000",
                format!(
                    "database \"{database}\" does not exist: the relay has no target of that name"
                ),
            ),
        ));
    };
    if !target.users.iter().any(|allowed| allowed == user) {
        return Err(shared.refused(
            RelayRefusal::UserNotAllowed,
            End::Fatal(
                "28000",
                format!("user \"{user}\" is not on the allow-list of database \"{database}\""),
            ),
        ));
    }
    let unexpected = params.iter().map(|(k, _)| k.as_str()).find(|k| {
        !k.starts_with("_pq_.")
            && !FORWARDED_PARAMETERS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(k))
    });
    if let Some(name) = unexpected {
        return Err(shared.refused(
            RelayRefusal::StartupParameter,
            End::Fatal(
                "08P01",
                format!(
                    "the relay does not forward startup parameter \"{name}\": PgBouncer \
                     never sends it to a server"
                ),
            ),
        ));
    }
    Ok(target)
}

/// Logs in to `target` as PgBouncer's user and writes into `out` what PgBouncer gets: the
/// SASL final message and AuthenticationOk, then the upstream's messages up to and including
/// ReadyForQuery. Returns the upstream's cancel key, if it sent one.
async fn upstream_login<U>(
    shared: &Shared,
    server: &mut Conn<U>,
    out: &mut BytesMut,
    target: &Upstream,
    params: &[(String, String)],
    server_final: Option<String>,
) -> Result<Option<Bytes>, End>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map_or("", |(_, v)| v.as_str());
    // Protocol 3.0 without `_pq_.` options: what `negotiate` told PgBouncer it speaks.
    let forwarded = params
        .iter()
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
        let (tag, body) = server
            .read_message()
            .await
            .map_err(|e| upstream_failed(target, e))?;
        match tag {
            b'R' => match auth_request(&body)? {
                0 => break,
                3 => {
                    let key = TokenKey {
                        host: target.host.clone(),
                        port: target.port,
                        user: user.to_owned(),
                        region: target.region.clone(),
                    };
                    let fresh = shared.source.token(&key).await.map_err(|error| {
                        End::Fatal("58000", format!("no IAM token for {key}: {error}"))
                    })?;
                    frontend::password_message(fresh.token.expose().as_bytes(), &mut server.wbuf)?;
                    server
                        .flush()
                        .await
                        .map_err(|e| upstream_failed(target, e.into()))?;
                }
                5 | 10 => {
                    return Err(End::Fatal(
                        "28000",
                        format!(
                            "user \"{user}\" is not an IAM user: the server asked for a password \
                             (GRANT rds_iam TO {user})"
                        ),
                    ));
                }
                code => {
                    return Err(End::Fatal(
                        "28000",
                        format!(
                            "the server asked for authentication method {code}; the relay \
                             answers only with IAM tokens"
                        ),
                    ));
                }
            },
            b'E' => {
                tracing::info!(
                    user,
                    host = target.host,
                    "the upstream server refused the login"
                );
                pass_on(out, tag, &body);
                return Err(End::Answered);
            }
            b'N' => pass_on(&mut held, tag, &body),
            other => return Err(unexpected(other)),
        }
    }
    if let Some(server_final) = server_final {
        backend::authentication_sasl_final(out, server_final.as_bytes());
    }
    backend::authentication_ok(out);
    out.put_slice(&held);

    let mut cancel_key = None;
    loop {
        let (tag, body) = server
            .read_message()
            .await
            .map_err(|e| upstream_failed(target, e))?;
        pass_on(out, tag, &body);
        match tag {
            b'Z' => return Ok(cancel_key),
            b'K' => cancel_key = Some(body),
            // After AuthenticationOk, e.g. "database does not exist": PgBouncer reads it as
            // it would from the server itself.
            b'E' => return Err(End::Answered),
            b'S' | b'N' => {}
            other => return Err(unexpected(other)),
        }
    }
}

/// Copies both ways until either side closes. Bytes already read past the handshake on
/// either side go first.
async fn relay<S, U>(mut client: Conn<S>, mut server: Conn<U>, peer: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let relayed = async {
        if !client.rbuf.is_empty() {
            server.stream.write_all(&client.rbuf).await?;
            server.stream.flush().await?;
        }
        client.wbuf.put_slice(&server.rbuf);
        client.flush().await?;
        tokio::io::copy_bidirectional(&mut client.stream, &mut server.stream).await
    };
    match relayed.await {
        Ok((up, down)) => tracing::debug!(peer, up, down, "relayed session ended"),
        Err(error) => tracing::debug!(peer, %error, "relayed session ended on an I/O error"),
    }
}

/// The authentication request code of an 'R' message.
fn auth_request(body: &[u8]) -> Result<i32, End> {
    let mut body = body;
    body.try_get_i32().map_err(|_| {
        End::Fatal(
            "08P01",
            "the server sent a malformed authentication request".into(),
        )
    })
}

fn pass_on(out: &mut BytesMut, tag: u8, body: &[u8]) {
    backend::message(out, tag, |b| b.put_slice(body));
}

fn unexpected(tag: u8) -> End {
    End::Fatal(
        "08P01",
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
        "08006",
        format!(
            "upstream {}:{} during login: {why}",
            target.host, target.port
        ),
    )
}

/// Feeds `data` to the relay through an in-memory pipe and lets it run to its end. The first
/// byte picks the side: 0 mod 3, `data` is what PgBouncer sends (startup, SCRAM); 1 mod 3,
/// the same from a peer trusted by uid, so the login goes on to the (unreachable) upstream;
/// 2 mod 3, `data` is what the upstream server answers to a login.
#[doc(hidden)]
pub fn fuzz_relay(data: &[u8]) {
    use super::{Limits, RelayConfig};
    use crate::token::{CredentialCache, Presenter, TokenSource};
    use aws_credential_types::Credentials;
    use aws_credential_types::provider::SharedCredentialsProvider;
    use std::sync::OnceLock;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    const DATABASE: &str = "db";
    static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let credentials = Credentials::new("AKIDFUZZ", "fuzz-secret", None, None, "fuzz");
        let lifetime = Duration::from_secs(900);
        let source = TokenSource::new(
            CredentialCache::new(SharedCredentialsProvider::new(credentials), lifetime),
            lifetime,
            Presenter::Relay,
        );
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        // Port 1 on loopback refuses at once: the trusted side ends at the connect.
        let target = Upstream {
            host: "127.0.0.1".into(),
            port: 1,
            region: "us-east-1".into(),
            database: "appdb".into(),
            users: vec!["app_user".into()],
        };
        let config = Arc::new(RelayConfig {
            secret: "relay-secret".to_owned().into(),
            peer_uid: None,
            upstream_tls: Arc::new(tls),
            server_tls: None,
            targets: [(DATABASE.to_owned(), target)].into(),
            limits: Limits {
                max_message_bytes: 1024,
                handshake_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
            metrics: None,
        });
        Arc::new(Shared {
            secret: crate::endpoint::scram::ScramSecret::generate(&config.secret),
            tls: tokio_rustls::TlsConnector::from(Arc::clone(&config.upstream_tls)),
            acceptor: None,
            config,
            source,
            cancels: super::cancel::CancelMap::default(),
        })
    });
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(async {
        let (peer, relay_side) = tokio::io::duplex(4096);
        let (mut peer_read, mut peer_write) = tokio::io::split(peer);
        let feed = async {
            let _ = peer_write.write_all(input).await;
            let _ = peer_write.shutdown().await;
        };
        let drain = async {
            let mut sink = Vec::new();
            let _ = peer_read.read_to_end(&mut sink).await;
        };
        let (_stop, stopped) = watch::channel(false);
        let relay = async {
            match mode % 3 {
                0 | 1 => {
                    let trusted = mode % 3 == 1;
                    let handshake = Handshake {
                        deadline: Instant::now() + shared.config.limits.handshake_timeout,
                        peer: "fuzz".into(),
                        stopped,
                        pre_auth: PreAuth::detached(),
                    };
                    without_tls(shared, relay_side, trusted, handshake).await;
                }
                _ => {
                    let mut server = Conn::new(relay_side, shared.config.limits.max_message_bytes);
                    let params = [
                        ("user".to_owned(), "app_user".to_owned()),
                        ("database".to_owned(), DATABASE.to_owned()),
                    ];
                    let target = &shared.config.targets[DATABASE];
                    let mut out = BytesMut::new();
                    let _ = upstream_login(
                        shared,
                        &mut server,
                        &mut out,
                        target,
                        &params,
                        Some("v=fuzz".into()),
                    )
                    .await;
                }
            }
        };
        tokio::join!(feed, drain, relay);
    });
}
