//! The auth-query endpoint against real clients: tokio-postgres, and a raw client that sends
//! exactly what PgBouncer sends. A stub lookup stands in for the token source: these tests
//! are about the protocol, not about tokens.

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
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const AUTH_USER: &str = "pgbouncer_auth";
const AUTH_SECRET: &str = "auth-secret-ünïcode";
const DATABASE: &str = "appdb";
const PGBOUNCER_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

struct Stub;

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

struct Endpoint {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Endpoint {
    async fn start(limits: Limits, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
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
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(endpoint::serve(listener, config, Arc::new(Stub), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn config(&self, user: &str, password: Option<&str>, dbname: &str) -> tokio_postgres::Config {
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

    async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config(user, password, DATABASE).connect(NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn login(&self) -> Client {
        self.connect(AUTH_USER, Some(AUTH_SECRET)).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn quick_limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

#[tokio::test]
async fn auth_user_runs_the_auth_query() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let client = ep.login().await;
    let statement = client.prepare(PGBOUNCER_QUERY).await.unwrap();
    let rows = client.query(&statement, &[&"alice"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "alice");
    assert_eq!(rows[0].get::<_, String>(1), "alice-token");
    assert!(
        client
            .query(&statement, &[&"mallory"])
            .await
            .unwrap()
            .is_empty()
    );
    // A customised auth_query works as long as $1 is its only parameter.
    let custom = "SELECT u, p FROM my_users($1)";
    let rows = client.query(custom, &[&"alice"]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(1), "alice-token");
    // Lookup failures are errors the session survives.
    let err = client.query(&statement, &[&"bob"]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYSTEM_ERROR), "{err}");
    assert!(!format!("{err:?}").contains("alice-token"), "{err:?}");
    let err = client.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let err = client
        .query("SELECT $1, $2", &[&"a", &"b"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    assert_eq!(
        client.query(&statement, &[&"alice"]).await.unwrap().len(),
        1
    );
    ep.stop().await;
}

#[tokio::test]
async fn the_target_is_the_database_connected_to() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let (client, connection) = ep
        .config(AUTH_USER, Some(AUTH_SECRET), "otherdb")
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let err = client
        .query(PGBOUNCER_QUERY, &[&"alice"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    ep.stop().await;
}

#[tokio::test]
async fn simple_queries() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let client = ep.login().await;
    let rows = client.simple_query("SELECT 1").await.unwrap();
    let values: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1"]);
    client.simple_query("").await.unwrap();
    client.batch_execute("select 1;").await.unwrap();
    // What PgBouncer sends on its own: variable sync and its server_reset_query.
    client
        .batch_execute("SET DateStyle='ISO, DMY';SET application_name='it''s me';")
        .await
        .unwrap();
    client.batch_execute("DISCARD ALL").await.unwrap();
    let err = client.simple_query("SELECT now()").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let err = client
        .batch_execute("SELECT 1; DROP TABLE x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    assert_eq!(client.simple_query("SELECT 1").await.unwrap().len(), 3);
    ep.stop().await;
}

#[tokio::test]
async fn only_the_auth_user_with_its_password_gets_in() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let err = ep.connect(AUTH_USER, Some("wrong")).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    let err = ep.connect("alice", Some(AUTH_SECRET)).await.err().unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    // Without a password the client cannot answer SCRAM and gives up.
    let err = ep.connect(AUTH_USER, None).await.err().unwrap();
    assert!(err.to_string().contains("invalid configuration"), "{err}");
    // A cleartext password where SCRAM is expected is refused by the server.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.startup(AUTH_USER).await;
    assert!(matches!(raw.next().await, Message::AuthenticationSasl(_)));
    frontend::password_message(AUTH_SECRET.as_bytes(), &mut raw.out).unwrap();
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    ep.login().await;
    ep.stop().await;
}

#[tokio::test]
async fn pgbouncer_shaped_auth_query() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let mut raw = RawClient::connect(ep.addr).await;
    raw.login().await;
    for (user, rows) in [("alice", 1), ("mallory", 0)] {
        // PgBouncer's pktbuf_write_ExtQuery: Parse, Bind (no format codes, one text value),
        // Describe portal, Execute, Sync, all in one write.
        frontend::parse("", PGBOUNCER_QUERY, [], &mut raw.out).unwrap();
        frontend::bind(
            "",
            "",
            [],
            [user],
            |v, buf| {
                buf.extend_from_slice(v.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [],
            &mut raw.out,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::describe(b'P', "", &mut raw.out).unwrap();
        frontend::execute("", 0, &mut raw.out).unwrap();
        frontend::sync(&mut raw.out);
        raw.send().await;
        assert!(matches!(raw.next().await, Message::ParseComplete));
        assert!(matches!(raw.next().await, Message::BindComplete));
        let Message::RowDescription(desc) = raw.next().await else {
            panic!("RowDescription expected")
        };
        use fallible_iterator::FallibleIterator;
        assert_eq!(desc.fields().count().unwrap(), 2);
        if rows == 1 {
            let Message::DataRow(row) = raw.next().await else {
                panic!("DataRow expected")
            };
            let buf = row.buffer();
            let values: Vec<_> = row
                .ranges()
                .map(|r| Ok(std::str::from_utf8(&buf[r.unwrap()]).unwrap().to_owned()))
                .collect()
                .unwrap();
            assert_eq!(values, ["alice", "alice-token"]);
        }
        let Message::CommandComplete(done) = raw.next().await else {
            panic!("CommandComplete expected")
        };
        assert_eq!(done.tag().unwrap(), format!("SELECT {rows}"));
        assert!(matches!(raw.next().await, Message::ReadyForQuery(_)));
    }
    // After an error, the rest of the batch is skipped up to Sync.
    frontend::execute("no-such-portal", 0, &mut raw.out).unwrap();
    frontend::describe(b'S', "", &mut raw.out).unwrap();
    frontend::sync(&mut raw.out);
    raw.send().await;
    assert_eq!(raw.error_code().await, "34000");
    assert!(matches!(raw.next().await, Message::ReadyForQuery(_)));
    frontend::terminate(&mut raw.out);
    raw.send().await;
    raw.expect_eof().await;
    ep.stop().await;
}

#[tokio::test]
async fn hostile_clients_are_cut_off_and_the_endpoint_goes_on() {
    let ep = Endpoint::start(quick_limits(), None).await;
    // Garbage: an HTTP request read as a startup packet announces a huge length.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.out
        .extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    raw.expect_eof().await;
    // An oversized message after login.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.login().await;
    frontend::query(&"x".repeat(20_000), &mut raw.out).unwrap();
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    raw.expect_eof().await;
    // An unknown message type (FunctionCall).
    let mut raw = RawClient::connect(ep.addr).await;
    raw.login().await;
    raw.out.extend_from_slice(&[b'F', 0, 0, 0, 4]);
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    raw.expect_eof().await;
    // Silence: the handshake timeout closes the connection.
    let mut raw = RawClient::connect(ep.addr).await;
    let started = std::time::Instant::now();
    raw.expect_eof().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // A stalled SCRAM exchange is cut off too.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.startup(AUTH_USER).await;
    assert!(matches!(raw.next().await, Message::AuthenticationSasl(_)));
    assert_eq!(raw.error_code().await, "57014");
    // Protocol 2.0.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.out.extend_from_slice(&[0, 0, 0, 8, 0, 2, 0, 0]);
    raw.send().await;
    assert_eq!(raw.error_code().await, "0A000");
    ep.login().await.simple_query("SELECT 1").await.unwrap();
    ep.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused() {
    let ep = Endpoint::start(
        Limits {
            max_connections: 2,
            ..quick_limits()
        },
        None,
    )
    .await;
    let first = ep.login().await;
    let _second = ep.login().await;
    let err = ep
        .connect(AUTH_USER, Some(AUTH_SECRET))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    drop(first);
    // The slot frees once the session has seen the client go.
    let mut admitted = false;
    for _ in 0..50 {
        if ep.connect(AUTH_USER, Some(AUTH_SECRET)).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted);
    ep.stop().await;
}

#[tokio::test]
async fn shutdown_ends_idle_sessions() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let client = ep.login().await;
    ep.stop().await;
    assert!(client.simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn tls_with_the_generated_ca() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let dir = tempfile::tempdir().unwrap();
    let (server_tls, ca_path) = endpoint::self_signed_tls(dir.path()).unwrap();
    let ep = Endpoint::start(quick_limits(), Some(server_tls)).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = ep.config(AUTH_USER, Some(AUTH_SECRET), DATABASE);
    config
        .host("localhost")
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = client.query(PGBOUNCER_QUERY, &[&"alice"]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(1), "alice-token");

    // Bytes pipelined behind the SSLRequest would bypass TLS: refused.
    let mut raw = RawClient::connect(ep.addr).await;
    frontend::ssl_request(&mut raw.out);
    frontend::startup_message([("user", AUTH_USER)], &mut raw.out).unwrap();
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    ep.stop().await;
}

#[tokio::test]
async fn unix_socket_with_its_mode() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".s.PGSQL.6000");
    let listener = BoundListener::bind(&Listen::Unix {
        path: path.clone(),
        mode: 0o660,
    })
    .await
    .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A live socket is not taken over.
    let again = BoundListener::bind(&Listen::Unix {
        path: path.clone(),
        mode: 0o600,
    })
    .await;
    assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);

    let config = Arc::new(EndpointConfig {
        auth_user: AUTH_USER.into(),
        auth_secret: AUTH_SECRET.to_owned().into(),
        limits: quick_limits(),
        tls: None,
        metrics: None,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(endpoint::serve(listener, config, Arc::new(Stub), async {
        let _ = stopped.await;
    }));
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(dir.path())
        .port(6000)
        .user(AUTH_USER)
        .password(AUTH_SECRET)
        .dbname(DATABASE)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(
        client
            .query(PGBOUNCER_QUERY, &[&"alice"])
            .await
            .unwrap()
            .len(),
        1
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[test]
fn debug_output_hides_the_secret() {
    let config = EndpointConfig {
        auth_user: AUTH_USER.into(),
        auth_secret: AUTH_SECRET.to_owned().into(),
        limits: Limits::default(),
        tls: None,
        metrics: None,
    };
    assert!(!format!("{config:?}").contains(AUTH_SECRET));
    let lookup = Lookup::Token("tok-secret".to_owned().into());
    assert!(!format!("{lookup:?}").contains("tok-secret"));
}

/// A client that speaks the protocol message by message, with postgres-protocol's
/// serializers and parser.
struct RawClient {
    stream: TcpStream,
    out: BytesMut,
    input: BytesMut,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            out: BytesMut::new(),
            input: BytesMut::new(),
        }
    }

    async fn send(&mut self) {
        self.stream.write_all(&self.out).await.unwrap();
        self.out.clear();
    }

    async fn startup(&mut self, user: &str) {
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

    async fn next(&mut self) -> Message {
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
    async fn error_code(&mut self) -> String {
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

    async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest))
            .await
            .expect("server closes in time")
            .unwrap();
    }

    /// Startup and SCRAM as the auth user, up to ReadyForQuery.
    async fn login(&mut self) {
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
