//! The auth-query endpoint on a local port with a stub token lookup ([`Endpoint`], [`Stub`]),
//! and [`RawClient`], a client that sends exactly what PgBouncer sends, message by message.

use super::in_process::InProcess;
use aws_pgbouncer::endpoint::{
    self, BoundListener, EndpointConfig, Limits, Listen, Lookup, TokenLookup,
};
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

pub const AUTH_USER: &str = "pgbouncer_auth";
pub const AUTH_SECRET: &str = "auth-secret-ünïcode";
pub const DATABASE: &str = "appdb";
pub const PGBOUNCER_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

pub struct Stub;

impl TokenLookup for Stub {
    async fn lookup(&self, database: &str, user: &str) -> Lookup {
        match (database, user) {
            (DATABASE, "alice") => Lookup::Token("alice-token".to_owned().into()),
            (DATABASE, "bob") => Lookup::Unavailable("credentials expired".into()),
            (DATABASE, _) => Lookup::NoSuchUser,
            _ => Lookup::UnknownDatabase,
        }
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    server: InProcess,
}

impl Endpoint {
    pub async fn start(limits: Limits, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = BoundListener::bind(&Listen::Tcp("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(EndpointConfig {
            auth_user: AUTH_USER.into(),
            auth_secret: AUTH_SECRET.to_owned().into(),
            limits,
            tls,
            metrics: None,
        });
        let server = InProcess::spawn(|shutdown| {
            endpoint::serve(listener, config, Arc::new(Stub), shutdown)
        });
        Self { addr, server }
    }

    pub fn config(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(user)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5));
        if let Some(password) = password {
            config.password(password);
        }
        config
    }

    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config(user, password, DATABASE).connect(NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn login(&self) -> Client {
        self.connect(AUTH_USER, Some(AUTH_SECRET)).await.unwrap()
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}

pub fn quick_limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

/// A client that speaks the protocol message by message, with postgres-protocol's
/// serializers and parser.
pub struct RawClient {
    stream: TcpStream,
    pub out: BytesMut,
    input: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            out: BytesMut::new(),
            input: BytesMut::new(),
        }
    }

    pub async fn send(&mut self) {
        self.stream.write_all(&self.out).await.unwrap();
        self.out.clear();
    }

    pub async fn startup(&mut self, user: &str) {
        frontend::startup_message(
            [
                ("user", user),
                ("database", DATABASE),
                ("application_name", "raw"),
            ],
            &mut self.out,
        )
        .unwrap();
        self.send().await;
    }

    pub async fn next(&mut self) -> Message {
        loop {
            if let Some(message) = Message::parse(&mut self.input).unwrap() {
                return message;
            }
            let n = tokio::time::timeout(
                Duration::from_secs(5),
                self.stream.read_buf(&mut self.input),
            )
            .await
            .expect("server answers in time")
            .unwrap();
            assert!(n > 0, "unexpected EOF");
        }
    }

    /// The SQLSTATE of the next ErrorResponse, skipping other messages.
    pub async fn error_code(&mut self) -> String {
        use fallible_iterator::FallibleIterator;
        loop {
            if let Message::ErrorResponse(body) = self.next().await {
                let mut fields = body.fields();
                while let Some(field) = fields.next().unwrap() {
                    if field.type_() == b'C' {
                        return String::from_utf8(field.value_bytes().to_vec()).unwrap();
                    }
                }
                panic!("ErrorResponse without SQLSTATE");
            }
        }
    }

    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest))
            .await
            .expect("server closes in time")
            .unwrap();
    }

    /// Startup and SCRAM as the auth user, up to ReadyForQuery.
    pub async fn login(&mut self) {
        self.startup(AUTH_USER).await;
        let Message::AuthenticationSasl(body) = self.next().await else {
            panic!("SASL expected")
        };
        use fallible_iterator::FallibleIterator;
        let mechanisms: Vec<String> = body
            .mechanisms()
            .map(|m| Ok(m.to_owned()))
            .collect()
            .unwrap();
        assert_eq!(mechanisms, ["SCRAM-SHA-256"]);
        let mut scram = ScramSha256::new(AUTH_SECRET.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut self.out).unwrap();
        self.send().await;
        let Message::AuthenticationSaslContinue(body) = self.next().await else {
            panic!("SASL continue expected")
        };
        scram.update(body.data()).unwrap();
        frontend::sasl_response(scram.message(), &mut self.out).unwrap();
        self.send().await;
        let Message::AuthenticationSaslFinal(body) = self.next().await else {
            panic!("SASL final expected")
        };
        scram.finish(body.data()).unwrap();
        assert!(matches!(self.next().await, Message::AuthenticationOk));
        let mut parameters = Vec::new();
        loop {
            match self.next().await {
                Message::ParameterStatus(p) => {
                    parameters.push((p.name().unwrap().to_owned(), p.value().unwrap().to_owned()))
                }
                Message::BackendKeyData(_) => {}
                Message::ReadyForQuery(_) => break,
                _ => panic!("unexpected message during login"),
            }
        }
        for expected in [
            ("client_encoding", "UTF8"),
            ("standard_conforming_strings", "on"),
            ("integer_datetimes", "on"),
            ("server_encoding", "UTF8"),
            ("application_name", "raw"),
        ] {
            assert!(
                parameters
                    .iter()
                    .any(|(k, v)| (k.as_str(), v.as_str()) == expected),
                "{expected:?} in {parameters:?}"
            );
        }
        assert!(parameters.iter().any(|(k, _)| k == "server_version"));
    }
}
