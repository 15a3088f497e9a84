//! The operability HTTP server: Kubernetes probes, Prometheus metrics and, when asked for,
//! `/quitquitquit`.
//!
//! Every answer comes from memory: probes never wait on AWS or the database, so a slow
//! dependency cannot make the kubelet kill a daemon that is still serving good tokens. The
//! server is small on purpose (HTTP/1.1, a handful of paths) and bounds what a
//! client can hold: header read time, connection lifetime and the number of connections.

mod quit;

pub use quit::PATH as QUIT_PATH;

use crate::log_throttle::LogThrottle;
use crate::metrics::{self, Metrics};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};

/// A client that has not sent its request headers by then is cut off.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapers and probes reuse connections; none needs one for longer than this.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// At most this many connections are open, so that a misbehaving client cannot exhaust the
/// daemon's file descriptors. A new connection beyond it closes the oldest one: probes and
/// scrapes are answered in their first moments, so under a flood of connections that send
/// nothing (or send slowly) the oldest is one of the flood's, and the kubelet's next probe
/// still gets in. Refusing the new one instead let 600 held connections starve `/healthz`.
const MAX_CONNECTIONS: usize = 64;
/// Request heads are a few hundred bytes; hyper's minimum buffer is 8 KiB.
const MAX_BUF_SIZE: usize = 8 * 1024;

const TEXT: &str = "text/plain; charset=utf-8";

/// What the probes report. The daemon implements it from its own state.
pub trait Probes: Send + Sync {
    /// True once the daemon has done its start-up work (first tokens minted, PgBouncer
    /// configured). Until then `/startupz` fails, which holds back the other probes.
    fn started(&self) -> bool;
    fn readiness(&self) -> Readiness;
}

/// Whether the daemon can serve logins now, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Short reasons shown in `/readyz`'s body. They are served without authentication, so
    /// they must never contain a token, a key or a password.
    pub reasons: Vec<String>,
}

/// Serves until `shutdown` completes, then closes every connection still open. With `quit`,
/// `POST /quitquitquit` from loopback notifies it.
pub async fn serve(
    listener: TcpListener,
    probes: Arc<dyn Probes>,
    metrics: Arc<Metrics>,
    quit: Option<Arc<Notify>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE);
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    // The open connections' tasks, oldest first.
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    let accept_failed = LogThrottle::new("HTTP server: accept failed");
    let oldest_closed = LogThrottle::new(format!(
        "HTTP server: {MAX_CONNECTIONS} connections open, the oldest closed for a new one"
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Running out of file descriptors is the usual cause; pausing lets
                        // other connections end instead of spinning on the error.
                        if accept_failed.first() {
                            tracing::warn!(%error, "HTTP server: accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                open.retain(|task| !task.is_finished());
                if open.len() >= MAX_CONNECTIONS
                    && let Some(oldest) = open.pop_front()
                {
                    oldest.abort();
                    if oldest_closed.first() {
                        tracing::warn!(
                            max = MAX_CONNECTIONS,
                            "HTTP server: too many connections; closing the oldest for each new one"
                        );
                    }
                }
                let builder = Arc::clone(&builder);
                let probes = Arc::clone(&probes);
                let metrics = Arc::clone(&metrics);
                let quit = quit.clone();
                open.push_back(connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let response =
                            respond(&request, peer, probes.as_ref(), &metrics, quit.as_deref());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    // Errors here are clients that went away or sent garbage: nothing to do.
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                }));
            }
        }
    }
    connections.shutdown().await;
}

fn respond(
    request: &Request<Incoming>,
    peer: SocketAddr,
    probes: &dyn Probes,
    metrics: &Metrics,
    quit: Option<&Notify>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if let (quit::PATH, Some(quit)) = (path, quit) {
        return quit::respond(request.method(), peer, quit);
    }
    let known = matches!(path, "/healthz" | "/startupz" | "/readyz" | "/metrics");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return method_not_allowed("GET, HEAD");
    }
    match path {
        // Answering at all shows that the event loop runs.
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/startupz" if probes.started() => text(StatusCode::OK, "started\n".to_owned()),
        "/startupz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned()),
        "/readyz" => {
            let readiness = probes.readiness();
            if readiness.ready {
                text(StatusCode::OK, "ready\n".to_owned())
            } else {
                let mut body = String::from("not ready:\n");
                for reason in &readiness.reasons {
                    body.push_str("- ");
                    body.push_str(reason);
                    body.push('\n');
                }
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        // "/metrics", the one known path left.
        _ => with_type(StatusCode::OK, metrics::CONTENT_TYPE, metrics.encode()),
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed\n".to_owned(),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, TEXT, body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Probe answers go stale at once; a caching proxy in between must not keep them.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
