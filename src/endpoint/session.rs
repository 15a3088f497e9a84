//! One client connection, from the first byte to the close.
//!
//! The session is a straight line: negotiate encryption, read the startup packet, run SCRAM,
//! then answer queries until the client leaves, a limit is hit or the endpoint shuts down.
//! Every read and write is bounded in size and time, and every way out goes through
//! [`Conn::finish`], which tells the client why (when there is a why) before closing.

use super::backend::{self, Column, INT4_OID, TEXT_OID};
use super::frontend::{self, FrontendMessage, ProtocolError, StartupPacket, Target};
use super::pre_auth::PreAuth;
use super::scram::{self, ScramError, ScramSecret};
use super::{EndpointConfig, Lookup, TokenLookup};
use crate::log_throttle::LogThrottle;
use crate::token::MAX_TOKEN_BYTES;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;

/// What every session of one endpoint shares.
pub(crate) struct Shared<L> {
    pub config: Arc<EndpointConfig>,
    secret: ScramSecret,
    lookup: Arc<L>,
}

impl<L: TokenLookup> Shared<L> {
    pub fn new(config: Arc<EndpointConfig>, lookup: Arc<L>) -> Self {
        let secret = ScramSecret::generate(&config.auth_secret);
        Self {
            config,
            secret,
            lookup,
        }
    }
}

/// Session parameters reported to the client. PgBouncer remembers them per server
/// connection and sends `SET` for those a logging-in client wants otherwise.
const REPORTED: [(&str, &str); 9] = [
    ("server_version", "16.0 (aws-pgbouncer)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("application_name", ""),
];

/// Of [`REPORTED`], those a client may set (in the startup packet or with `SET`): their new
/// value is reported back, as PostgreSQL does, so PgBouncer does not send the same `SET` again.
const SETTABLE: [&str; 5] = [
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "application_name",
];

/// Prepared statements and portals a session may hold at once; PgBouncer uses one of each.
const MAX_OBJECTS: usize = 16;
/// Output is written out at this size even before a Sync, so a client that pipelines many
/// Describes without Sync cannot make the session buffer without bound.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// How long a closing session spends telling the client why.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a session ends.
#[derive(Debug)]
pub(crate) enum End {
    /// The client left: EOF, Terminate or CancelRequest.
    Quiet,
    /// The client already has its answer in the output buffer (the relay passes an
    /// upstream's ErrorResponse on as is).
    Answered,
    Io(io::Error),
    Protocol(ProtocolError),
    /// A FATAL error to report (SQLSTATE, message).
    Fatal(&'static str, String),
    HandshakeTimeout,
    IdleTimeout,
    Shutdown,
}

impl From<ProtocolError> for End {
    fn from(e: ProtocolError) -> Self {
        End::Protocol(e)
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

/// A framed connection. The relay uses one towards PgBouncer and one towards the upstream
/// server: the framing is the same in both directions.
pub(crate) struct Conn<S> {
    pub stream: S,
    /// Read but not yet framed.
    pub rbuf: BytesMut,
    /// Written on the next flush.
    pub wbuf: BytesMut,
    max_message: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, max_message: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(1024),
            max_message,
        }
    }

    /// Reads more input. The framing checks lengths as soon as a header is in, so `rbuf`
    /// never holds much more than one maximal frame.
    async fn fill(&mut self) -> Result<(), End> {
        self.rbuf.reserve(4096);
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(End::Quiet),
            _ => Ok(()),
        }
    }

    async fn read_startup(&mut self) -> Result<StartupPacket, End> {
        loop {
            if let Some(packet) = frontend::split_startup(&mut self.rbuf, self.max_message)? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// Cancel-safe: a partial frame stays in `rbuf`.
    pub async fn read_message(&mut self) -> Result<(u8, Bytes), End> {
        loop {
            if let Some(message) = frontend::split_message(&mut self.rbuf, self.max_message)? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.stream.flush().await
    }

    /// Tells the client why the session ends, when it is owed a reason, and closes.
    pub async fn finish(mut self, end: End, peer: &str) {
        let fatal: Option<(&str, String)> = match &end {
            End::Quiet | End::Answered | End::Io(_) => None,
            End::Protocol(e) => Some(("08P01", e.to_string())),
            End::Fatal(code, message) => Some((code, message.clone())),
            End::HandshakeTimeout => {
                Some(("57014", "canceling authentication due to timeout".into()))
            }
            End::IdleTimeout => {
                Some(("57P05", "terminating connection due to idle timeout".into()))
            }
            End::Shutdown => Some((
                "57P01",
                "terminating connection due to administrator command".into(),
            )),
        };
        match &end {
            End::Quiet => tracing::debug!(peer, "session closed by the client"),
            End::Answered => tracing::debug!(peer, "session ended after its answer"),
            End::Io(e) => tracing::debug!(peer, error = %e, "session ended on an I/O error"),
            // Another local process can make these as fast as it can connect (wrong
            // passwords, garbage): one line per interval, with a count.
            _ if ENDED_WITH_AN_ERROR.first() => {
                tracing::info!(peer, reason = ?fatal.as_ref().map(|f| &f.1), "session ended");
            }
            _ => {}
        }
        if let Some((code, message)) = fatal {
            backend::error_response(&mut self.wbuf, "FATAL", code, &message);
        }
        let _ = timeout(GOODBYE_TIMEOUT, async {
            self.flush().await?;
            self.stream.shutdown().await
        })
        .await;
    }
}

/// Sessions of the endpoint and the relay that ended with an error sent to the client.
static ENDED_WITH_AN_ERROR: LazyLock<LogThrottle> =
    LazyLock::new(|| LogThrottle::new("sessions ended with an error"));

/// Runs one session on an accepted connection. `tls` is offered to an SSLRequest when set.
pub(crate) async fn run<S, L>(
    stream: S,
    shared: Arc<Shared<L>>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    peer: String,
    pre_auth: PreAuth,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    L: TokenLookup,
{
    let limits = &shared.config.limits;
    let deadline = Instant::now() + limits.handshake_timeout;
    let mut conn = Conn::new(stream, limits.max_message_bytes);
    let negotiated = bounded(
        deadline,
        shutdown.clone(),
        negotiate(&mut conn, tls.is_some()),
    )
    .await;
    match negotiated {
        Ok(Negotiated::Startup(params)) => {
            session(conn, params, &shared, deadline, shutdown, &peer, pre_auth).await;
        }
        Ok(Negotiated::Cancel(_)) => conn.finish(End::Quiet, &peer).await,
        Ok(Negotiated::StartTls) => {
            let Some(acceptor) = tls else { return };
            match timeout_at(deadline, acceptor.accept(conn.stream)).await {
                Ok(Ok(stream)) => {
                    let mut conn = Conn::new(stream, limits.max_message_bytes);
                    match bounded(deadline, shutdown.clone(), negotiate(&mut conn, false)).await {
                        Ok(Negotiated::Startup(params)) => {
                            session(conn, params, &shared, deadline, shutdown, &peer, pre_auth)
                                .await;
                        }
                        Ok(Negotiated::Cancel(_)) => conn.finish(End::Quiet, &peer).await,
                        Ok(Negotiated::StartTls) => {}
                        Err(end) => conn.finish(end, &peer).await,
                    }
                }
                Ok(Err(e)) => tracing::info!(peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(peer, "TLS handshake timed out"),
            }
        }
        Err(end) => conn.finish(end, &peer).await,
    }
}

/// Runs `work` until the handshake deadline or shutdown, whichever comes first.
pub(crate) async fn bounded<T>(
    deadline: Instant,
    mut shutdown: watch::Receiver<bool>,
    work: impl Future<Output = Result<T, End>>,
) -> Result<T, End> {
    tokio::select! {
        result = timeout_at(deadline, work) => result.unwrap_or(Err(End::HandshakeTimeout)),
        () = signalled(&mut shutdown) => Err(End::Shutdown),
    }
}

/// Resolves when shutdown is signalled; never, if the endpoint is gone without signalling.
async fn signalled(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|&stop| stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub(crate) enum Negotiated {
    Startup(Vec<(String, String)>),
    /// A CancelRequest with the key it names.
    Cancel(Bytes),
    StartTls,
}

/// Answers encryption requests until the startup packet (or a CancelRequest) comes.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    offer_tls: bool,
) -> Result<Negotiated, End> {
    loop {
        match conn.read_startup().await? {
            StartupPacket::Ssl if offer_tls => {
                // Bytes sent after the SSLRequest but before the handshake would be taken as
                // if they came over TLS (CVE-2021-23214): refuse them.
                if !conn.rbuf.is_empty() {
                    return Err(ProtocolError::Malformed("data after SSLRequest").into());
                }
                conn.stream.write_all(b"S").await?;
                conn.stream.flush().await?;
                return Ok(Negotiated::StartTls);
            }
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                conn.stream.write_all(b"N").await?;
                conn.stream.flush().await?;
            }
            StartupPacket::Cancel(key) => return Ok(Negotiated::Cancel(key)),
            StartupPacket::Unsupported(code) => {
                return Err(End::Fatal(
                    "0A000",
                    format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0",
                        code >> 16,
                        code & 0xffff
                    ),
                ));
            }
            StartupPacket::Startup { minor, params } => {
                // Newer minor versions and `_pq_.` options are declined the way PostgreSQL
                // declines them, and the session goes on in 3.0.
                let options: Vec<&str> = params
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| k.starts_with("_pq_."))
                    .collect();
                if minor > 0 || !options.is_empty() {
                    backend::negotiate_protocol_version(&mut conn.wbuf, 0, &options);
                }
                return Ok(Negotiated::Startup(params));
            }
        }
    }
}

async fn session<S, L>(
    mut conn: Conn<S>,
    params: Vec<(String, String)>,
    shared: &Shared<L>,
    deadline: Instant,
    shutdown: watch::Receiver<bool>,
    peer: &str,
    pre_auth: PreAuth,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    L: TokenLookup,
{
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let user = param("user").unwrap_or_default().to_owned();
    let database = match param("database") {
        Some(db) if !db.is_empty() => db.to_owned(),
        _ => user.clone(),
    };
    let authenticated = bounded(
        deadline,
        shutdown.clone(),
        authenticate(&mut conn, shared, &user),
    )
    .await;
    let end = match authenticated {
        Ok(()) => {
            pre_auth.authenticated();
            tracing::debug!(peer, user, database, "authenticated");
            let mut queries = Queries::new(shared, database);
            for (name, value) in &params {
                queries.startup_setting(name, value);
            }
            queries.welcome(&mut conn.wbuf);
            queries.serve(&mut conn, shutdown).await
        }
        Err(end) => end,
    };
    conn.finish(end, peer).await;
}

/// SCRAM-SHA-256 for the auth user; FATAL for anyone or anything else.
async fn authenticate<S, L>(conn: &mut Conn<S>, shared: &Shared<L>, user: &str) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: TokenLookup,
{
    if user.is_empty() {
        return Err(End::Fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet".into(),
        ));
    }
    if user != shared.config.auth_user {
        return Err(End::Fatal(
            "28000",
            format!("role \"{user}\" is not permitted to log in to the auth endpoint"),
        ));
    }
    let server_final = scram_exchange(conn, &shared.secret, user).await?;
    backend::authentication_sasl_final(&mut conn.wbuf, server_final.as_bytes());
    backend::authentication_ok(&mut conn.wbuf);
    Ok(())
}

/// SCRAM-SHA-256 up to the check of the client's proof. Returns the server-final-message
/// unsent, so that the relay can hold it back until the upstream server has accepted the
/// login: PgBouncer then never sees a success followed by a failure.
pub(crate) async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    secret: &ScramSecret,
    user: &str,
) -> Result<String, End> {
    let failed = || {
        End::Fatal(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    };
    let scram_end = |e: ScramError| match e {
        ScramError::WrongProof => failed(),
        ScramError::Malformed(what) => {
            End::Fatal("08P01", format!("malformed SCRAM message: {what}"))
        }
    };

    backend::authentication_sasl(&mut conn.wbuf, scram::MECHANISM);
    conn.flush().await?;
    let (mechanism, first) = frontend::decode_sasl_initial(password_message(conn).await?)?;
    if mechanism != scram::MECHANISM {
        return Err(End::Fatal(
            "08P01",
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

struct Statement {
    param_type: u32,
}

struct Portal {
    /// `None` when the parameter is NULL or not UTF-8: no user has such a name.
    user: Option<String>,
    formats: [i16; 2],
    done: bool,
}

/// The query phase: session settings, prepared statements and portals.
struct Queries<'a, L> {
    shared: &'a Shared<L>,
    database: String,
    settings: Vec<(&'static str, String)>,
    statements: HashMap<String, Statement>,
    portals: HashMap<String, Portal>,
    /// After an error in an extended-protocol batch, everything up to Sync is skipped.
    failed: bool,
}

/// An error inside the query phase: reported, and the session goes on.
struct QueryError(&'static str, String);

impl<'a, L: TokenLookup> Queries<'a, L> {
    fn new(shared: &'a Shared<L>, database: String) -> Self {
        Self {
            shared,
            database,
            settings: REPORTED.iter().map(|&(k, v)| (k, v.to_owned())).collect(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            failed: false,
        }
    }

    /// Records a setting the client asked for; `false` if it is not one the endpoint keeps.
    fn startup_setting(&mut self, name: &str, value: &str) -> bool {
        let Some(canonical) = SETTABLE.iter().find(|s| s.eq_ignore_ascii_case(name)) else {
            return false;
        };
        if let Some(slot) = self.settings.iter_mut().find(|(k, _)| k == canonical) {
            slot.1 = value.to_owned();
        }
        true
    }

    fn welcome(&self, out: &mut BytesMut) {
        for (name, value) in &self.settings {
            backend::parameter_status(out, name, value);
        }
        backend::backend_key_data(out, rand::random::<i32>() & i32::MAX, rand::random());
        backend::ready_for_query(out);
    }

    async fn serve<S>(&mut self, conn: &mut Conn<S>, mut shutdown: watch::Receiver<bool>) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = self.shared.config.limits.idle_timeout;
        // PostgreSQL writes its answers out at ReadyForQuery and Flush; so does this, and
        // also when output piles up. The welcome goes out first.
        let mut flush = true;
        loop {
            if flush || conn.wbuf.len() > MAX_PENDING_OUTPUT {
                match timeout(idle, conn.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Io(e),
                    Err(_) => return End::IdleTimeout,
                }
            }
            let next = tokio::select! {
                next = timeout(idle, conn.read_message()) => next,
                () = signalled(&mut shutdown) => return End::Shutdown,
            };
            let (tag, body) = match next {
                Ok(Ok(message)) => message,
                Ok(Err(end)) => return end,
                Err(_) => return End::IdleTimeout,
            };
            let message = match frontend::decode(tag, body) {
                Ok(FrontendMessage::Password(_)) => return ProtocolError::UnknownType(b'p').into(),
                Ok(message) => message,
                Err(e) => return e.into(),
            };
            flush = matches!(
                message,
                FrontendMessage::Sync | FrontendMessage::Flush | FrontendMessage::Query(_)
            );
            match message {
                FrontendMessage::Terminate => return End::Quiet,
                FrontendMessage::Sync => {
                    self.portals.clear();
                    self.failed = false;
                    backend::ready_for_query(&mut conn.wbuf);
                }
                _ if self.failed => {}
                FrontendMessage::Flush => {}
                FrontendMessage::Query(sql) => {
                    self.simple_query(&sql, &mut conn.wbuf);
                    backend::ready_for_query(&mut conn.wbuf);
                }
                extended => {
                    if let Err(QueryError(code, text)) =
                        self.extended(extended, &mut conn.wbuf).await
                    {
                        backend::error_response(&mut conn.wbuf, "ERROR", code, &text);
                        self.failed = true;
                    }
                }
            }
        }
    }

    fn simple_query(&mut self, sql: &str, out: &mut BytesMut) {
        let statements = split_statements(sql);
        if statements.is_empty() {
            backend::empty_query_response(out);
            return;
        }
        for statement in statements {
            let words: Vec<String> = statement
                .split_whitespace()
                .map(|w| w.to_ascii_lowercase())
                .collect();
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            match words.as_slice() {
                ["select", "1"] => {
                    backend::row_description(
                        out,
                        &[Column {
                            name: "?column?",
                            type_oid: INT4_OID,
                            type_len: 4,
                            format: 0,
                        }],
                    );
                    backend::data_row(out, &[b"1"]);
                    backend::command_complete(out, "SELECT 1");
                }
                ["set", ..] => {
                    if let Some((name, value)) = parse_set(statement)
                        && self.startup_setting(name, &value)
                    {
                        backend::parameter_status(out, canonical(name), &value);
                    }
                    backend::command_complete(out, "SET");
                }
                ["reset", "all"] => backend::command_complete(out, "RESET"),
                ["discard", "all"] | ["deallocate", "all"] => {
                    self.statements.clear();
                    let tag = if words[0] == "discard" {
                        "DISCARD ALL"
                    } else {
                        "DEALLOCATE ALL"
                    };
                    backend::command_complete(out, tag);
                }
                _ => {
                    backend::error_response(
                        out,
                        "ERROR",
                        "0A000",
                        "the auth endpoint answers only its auth_query and SELECT 1",
                    );
                    return;
                }
            }
        }
    }

    async fn extended(
        &mut self,
        message: FrontendMessage,
        out: &mut BytesMut,
    ) -> Result<(), QueryError> {
        match message {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => {
                if !name.is_empty() && self.statements.contains_key(&name) {
                    return Err(QueryError(
                        "42P05",
                        format!("prepared statement \"{name}\" already exists"),
                    ));
                }
                if max_placeholder(&query) != 1 || param_types.len() > 1 {
                    return Err(QueryError(
                        "0A000",
                        "the auth endpoint answers only its auth_query: a statement whose only parameter is $1".into(),
                    ));
                }
                let param_type = match param_types.first() {
                    None | Some(0) => TEXT_OID,
                    Some(&oid) if STRING_TYPES.contains(&oid) => oid,
                    Some(oid) => {
                        return Err(QueryError(
                            "42804",
                            format!("parameter $1 must be a string type, not OID {oid}"),
                        ));
                    }
                };
                if !name.is_empty() && self.statements.len() >= MAX_OBJECTS {
                    return Err(QueryError("54000", "too many prepared statements".into()));
                }
                self.statements.insert(name, Statement { param_type });
                backend::parse_complete(out);
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                if !self.statements.contains_key(&statement) {
                    return Err(QueryError(
                        "26000",
                        format!("prepared statement \"{statement}\" does not exist"),
                    ));
                }
                if params.len() != 1 {
                    return Err(QueryError(
                        "08P01",
                        format!(
                            "bind message supplies {} parameters, but prepared statement \"{statement}\" requires 1",
                            params.len()
                        ),
                    ));
                }
                if param_formats.len() > 1 || param_formats.iter().any(|&f| f != 0 && f != 1) {
                    return Err(QueryError("08P01", "invalid parameter format codes".into()));
                }
                let formats = match result_formats.as_slice() {
                    [] => [0, 0],
                    &[f] => [f, f],
                    &[a, b] => [a, b],
                    _ => {
                        return Err(QueryError(
                            "08P01",
                            format!(
                                "bind message has {} result formats but query has 2 columns",
                                result_formats.len()
                            ),
                        ));
                    }
                };
                if formats.iter().any(|&f| f != 0 && f != 1) {
                    return Err(QueryError("08P01", "invalid result format codes".into()));
                }
                if !portal.is_empty() && self.portals.contains_key(&portal) {
                    return Err(QueryError(
                        "42P03",
                        format!("cursor \"{portal}\" already exists"),
                    ));
                }
                if !portal.is_empty() && self.portals.len() >= MAX_OBJECTS {
                    return Err(QueryError("54000", "too many portals".into()));
                }
                // Text and binary forms of a string are the same bytes.
                let user = params
                    .into_iter()
                    .next()
                    .flatten()
                    .and_then(|v| String::from_utf8(v.to_vec()).ok());
                self.portals.insert(
                    portal,
                    Portal {
                        user,
                        formats,
                        done: false,
                    },
                );
                backend::bind_complete(out);
            }
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } => {
                let statement = self.statements.get(&name).ok_or_else(|| {
                    QueryError(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    )
                })?;
                backend::parameter_description(out, &[statement.param_type]);
                row_description(out, [0, 0]);
            }
            FrontendMessage::Describe {
                target: Target::Portal,
                name,
            } => {
                let portal = self.portals.get(&name).ok_or_else(|| no_portal(&name))?;
                row_description(out, portal.formats);
            }
            FrontendMessage::Execute { portal, .. } => {
                let portal = self
                    .portals
                    .get_mut(&portal)
                    .ok_or_else(|| no_portal(&portal))?;
                // A portal yields its row once; executing it again finds nothing more.
                let user = if portal.done {
                    None
                } else {
                    portal.user.clone()
                };
                portal.done = true;
                match user {
                    Some(user) => self.answer(&user, out).await?,
                    None => backend::command_complete(out, "SELECT 0"),
                }
            }
            FrontendMessage::Close { target, name } => {
                // Closing what does not exist is not an error.
                match target {
                    Target::Statement => drop(self.statements.remove(&name)),
                    Target::Portal => drop(self.portals.remove(&name)),
                }
                backend::close_complete(out);
            }
            FrontendMessage::Query(_)
            | FrontendMessage::Sync
            | FrontendMessage::Flush
            | FrontendMessage::Terminate
            | FrontendMessage::Password(_) => {}
        }
        Ok(())
    }

    /// Looks the user up and writes the auth query's answer.
    async fn answer(&self, user: &str, out: &mut BytesMut) -> Result<(), QueryError> {
        let database = &self.database;
        let limits = &self.shared.config.limits;
        let answer = timeout(
            limits.lookup_timeout,
            self.shared.lookup.lookup(database, user),
        )
        .await
        .map_err(|_| {
            QueryError(
                "57014",
                format!("token lookup for user \"{user}\" timed out"),
            )
        })?;
        match answer {
            Lookup::Token(token) => {
                let token = token.expose_secret();
                if token.len() > MAX_TOKEN_BYTES {
                    // PgBouncer would cut it short, and the login to RDS would fail later,
                    // far from the cause.
                    return Err(QueryError(
                        "22001",
                        format!(
                            "token for user \"{user}\" is longer than PgBouncer's {MAX_TOKEN_BYTES}-byte password limit"
                        ),
                    ));
                }
                backend::data_row(out, &[user.as_bytes(), token.as_bytes()]);
                backend::command_complete(out, "SELECT 1");
            }
            Lookup::NoSuchUser => backend::command_complete(out, "SELECT 0"),
            Lookup::UnknownDatabase => {
                return Err(QueryError(
                    "3D000",
                    format!("database \"{database}\" does not exist"),
                ));
            }
            Lookup::Unavailable(reason) => {
                tracing::warn!(user, database, reason, "no token to answer the auth query");
                return Err(QueryError(
                    "58000",
                    format!("no token for user \"{user}\": {reason}"),
                ));
            }
        }
        Ok(())
    }
}

fn no_portal(name: &str) -> QueryError {
    QueryError("34000", format!("portal \"{name}\" does not exist"))
}

/// text, varchar, bpchar, name: the types a user name may be declared as.
const STRING_TYPES: [u32; 4] = [25, 1043, 1042, 19];

/// The auth query's result shape, as pg_shadow's (usename, passwd) but both as text.
fn row_description(out: &mut BytesMut, formats: [i16; 2]) {
    let column = |name, format| Column {
        name,
        type_oid: TEXT_OID,
        type_len: -1,
        format,
    };
    backend::row_description(
        out,
        &[column("usename", formats[0]), column("passwd", formats[1])],
    );
}

fn canonical(name: &str) -> &'static str {
    SETTABLE
        .iter()
        .find(|s| s.eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("")
}

/// The highest `$n` in the statement text (0 for none). The text is not parsed further.
fn max_placeholder(sql: &str) -> u32 {
    let mut max = 0;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n = rest[..digits].parse::<u32>().unwrap_or(u32::MAX);
        if digits > 0 {
            max = max.max(n);
        }
        rest = &rest[digits..];
    }
    max
}

/// Splits a simple query at the semicolons outside quotes, dropping empty statements.
fn split_statements(sql: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut quote: Option<(char, bool)> = None; // (quote char, backslash escapes)
    let mut previous = ' ';
    let mut chars = sql.char_indices();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some((_, true)) if c == '\\' => {
                chars.next();
            }
            Some((q, _)) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' => quote = Some(('\'', previous.eq_ignore_ascii_case(&'e'))),
            None if c == '"' => quote = Some(('"', false)),
            None if c == ';' => {
                statements.push(&sql[start..i]);
                start = i + 1;
            }
            None => {}
        }
        previous = c;
    }
    statements.push(&sql[start..]);
    statements
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// `SET [SESSION] name {= | TO} value` → (name, value), the value unquoted. `None` for any
/// other shape: the statement is then acknowledged without a report.
fn parse_set(statement: &str) -> Option<(&str, String)> {
    let rest = statement.get(3..)?.trim_start();
    let rest = match rest.get(..8) {
        Some(w) if w.eq_ignore_ascii_case("session ") => rest[8..].trim_start(),
        _ => rest,
    };
    let name_len = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let (name, rest) = rest.split_at(name_len);
    let rest = rest.trim_start();
    let value = if let Some(v) = rest.strip_prefix('=') {
        v
    } else if rest.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("to ")) {
        &rest[3..]
    } else {
        return None;
    };
    let value = value.trim();
    let (escapes, quoted) = match value.as_bytes() {
        [b'e' | b'E', b'\'', ..] => (true, &value[1..]),
        [b'\'', ..] => (false, value),
        _ => return Some((name, value.to_owned())),
    };
    let inner = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if escapes => out.push(chars.next()?),
            '\'' => {
                if chars.next()? != '\'' {
                    return None;
                }
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    Some((name, out))
}

/// Feeds `data` to a session through an in-memory pipe and lets it run to its end. The first
/// byte picks where the session starts: even, at the startup packet; odd, already
/// authenticated (random bytes cannot pass SCRAM, so the query phase is reached directly).
#[doc(hidden)]
pub fn fuzz_session(data: &[u8]) {
    use std::sync::OnceLock;

    struct FuzzLookup;
    impl TokenLookup for FuzzLookup {
        async fn lookup(&self, _database: &str, user: &str) -> Lookup {
            match user {
                "alice" => Lookup::Token("token-for-alice".to_owned().into()),
                "bob" => Lookup::Unavailable("credentials expired".into()),
                "carol" => Lookup::UnknownDatabase,
                "dave" => Lookup::Token("x".repeat(MAX_TOKEN_BYTES + 1).into()),
                _ => Lookup::NoSuchUser,
            }
        }
    }

    static SHARED: OnceLock<Arc<Shared<FuzzLookup>>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let config = EndpointConfig {
            auth_user: "pgbouncer".into(),
            auth_secret: "secret".to_owned().into(),
            limits: super::Limits {
                max_message_bytes: 1024,
                ..Default::default()
            },
            tls: None,
            metrics: None,
        };
        Arc::new(Shared::new(Arc::new(config), Arc::new(FuzzLookup)))
    });
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(4096);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let feed = async {
            let _ = client_write.write_all(input).await;
            let _ = client_write.shutdown().await;
        };
        let drain = async {
            let mut sink = Vec::new();
            let _ = client_read.read_to_end(&mut sink).await;
        };
        let (_stop, shutdown) = watch::channel(false);
        let session = async {
            if mode % 2 == 0 {
                let pre_auth = PreAuth::detached();
                run(
                    server,
                    Arc::clone(shared),
                    None,
                    shutdown,
                    "fuzz".into(),
                    pre_auth,
                )
                .await;
            } else {
                let mut conn = Conn::new(server, shared.config.limits.max_message_bytes);
                let mut queries = Queries::new(shared, "db".into());
                queries.welcome(&mut conn.wbuf);
                let end = queries.serve(&mut conn, shutdown).await;
                conn.finish(end, "fuzz").await;
            }
        };
        tokio::join!(feed, drain, session);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(split_statements(""), Vec::<&str>::new());
        assert_eq!(split_statements(" ; ;"), Vec::<&str>::new());
        assert_eq!(split_statements("SELECT 1;"), ["SELECT 1"]);
        assert_eq!(
            split_statements("SET a='x;y';SET b=E'q\\';z' ; select 1"),
            ["SET a='x;y'", "SET b=E'q\\';z'", "select 1"]
        );
        assert_eq!(split_statements("SET \"a;b\"=1;x"), ["SET \"a;b\"=1", "x"]);
    }

    #[test]
    fn set_statements() {
        assert_eq!(
            parse_set("SET application_name='it''s'"),
            Some(("application_name", "it's".into()))
        );
        assert_eq!(
            parse_set("set TimeZone TO 'UTC'"),
            Some(("TimeZone", "UTC".into()))
        );
        assert_eq!(
            parse_set("SET SESSION DateStyle = E'ISO, \\\\DMY'"),
            Some(("DateStyle", "ISO, \\DMY".into()))
        );
        assert_eq!(parse_set("SET x = 5"), Some(("x", "5".into())));
        assert_eq!(parse_set("SET x"), None);
        assert_eq!(parse_set("SET x = 'open"), None);
        assert_eq!(parse_set("SET x = 'a'b'"), None);
        assert_eq!(parse_set("SET"), None);
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            max_placeholder("SELECT usename, passwd FROM pg_shadow WHERE usename=$1"),
            1
        );
        assert_eq!(max_placeholder("SELECT $1, $1"), 1);
        assert_eq!(max_placeholder("SELECT $2"), 2);
        assert_eq!(max_placeholder("SELECT $$a$$, $10"), 10);
        assert_eq!(max_placeholder("SELECT 1"), 0);
        assert_eq!(max_placeholder("SELECT $99999999999999999999"), u32::MAX);
        assert_eq!(max_placeholder("$"), 0);
    }
}
