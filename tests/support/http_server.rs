//! The daemon's HTTP server (`serve`) on a socket of its own, with probe states the test sets
//! and metrics of one fixed token, and a plain HTTP/1.1 request to it: the probe and metrics
//! routes are tested over real sockets without a daemon to bring into each state.

use aws_pgbouncer::config::Database;
use aws_pgbouncer::http::{Probes, Readiness, serve};
use aws_pgbouncer::metrics::Metrics;
use aws_pgbouncer::token::{KeyHealth, TokenKey, TokenKind};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

pub struct TestProbes {
    pub started: AtomicBool,
    pub readiness: Mutex<Readiness>,
}

impl Probes for TestProbes {
    fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    fn readiness(&self) -> Readiness {
        self.readiness.lock().unwrap().clone()
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub probes: Arc<TestProbes>,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

fn target() -> TokenKey {
    TokenKey {
        kind: TokenKind::Rds,
        host: "localhost".to_owned(),
        port: 5432,
        user: "app_user".to_owned(),
        region: "us-east-1".to_owned(),
        role: None,
    }
}

pub async fn start() -> Server {
    start_on("127.0.0.1:0", None).await
}

pub async fn start_on(address: &str, quit: Option<Arc<Notify>>) -> Server {
    let listener = TcpListener::bind(address).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let probes = Arc::new(TestProbes {
        started: AtomicBool::new(false),
        readiness: Mutex::new(Readiness {
            ready: false,
            reasons: vec!["no token yet for app_user@localhost:5432".to_owned()],
        }),
    });
    let database = Database {
        name: "appdb".to_owned(),
        dbname: "appdb".to_owned(),
        target: target(),
        dial: None,
        allowed_users: vec![target().user],
        options: Vec::new(),
    };
    let metrics = Arc::new(Metrics::new(&[database], || {
        let now = SystemTime::now();
        vec![(
            target(),
            KeyHealth {
                usable_until: Some(now + Duration::from_secs(800)),
                signed_at: Some(now - Duration::from_secs(100)),
                successes: 3,
                ..KeyHealth::default()
            },
        )]
    }));
    metrics.reload_finished(Duration::from_millis(5), true);
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(
        listener,
        Arc::clone(&probes) as Arc<dyn Probes>,
        metrics,
        quit,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        probes,
        stop: Some(stop),
        task,
    }
}

pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .expect("a status code");
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

pub async fn status(addr: SocketAddr, path: &str) -> u16 {
    request(addr, "GET", path).await.status
}
