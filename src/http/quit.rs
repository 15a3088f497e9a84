//! `POST /quitquitquit`: lets an application that has finished its work (a Kubernetes Job)
//! end the daemon, as cloud-sql-proxy's route of the same name does.
//!
//! Stopping the daemon is an outage for everyone else on the host, so the route exists only
//! when `--quitquitquit` asks for it, and even then answers only peers on loopback: in a pod
//! that is the pod's own containers, while the kubelet's probes (which are why manifests
//! listen on 0.0.0.0) and other pods arrive from elsewhere. POST only, so that a prefetching
//! proxy or a stray GET cannot stop anything.

use super::{method_not_allowed, text};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use std::net::SocketAddr;
use tokio::sync::Notify;

pub const PATH: &str = "/quitquitquit";

pub fn respond(method: &Method, peer: SocketAddr, quit: &Notify) -> Response<Full<Bytes>> {
    if method != Method::POST {
        return method_not_allowed("POST");
    }
    // A dual-stack listener sees IPv4 loopback as ::ffff:127.0.0.1.
    if !peer.ip().to_canonical().is_loopback() {
        tracing::warn!(%peer, "refused {PATH} from a peer that is not on loopback");
        return text(
            StatusCode::FORBIDDEN,
            format!("{PATH} is served to loopback only\n"),
        );
    }
    tracing::info!("{PATH}: stopping as asked");
    // Stores a permit if the daemon is not waiting yet, so that no request is lost.
    quit.notify_one();
    text(StatusCode::OK, "stopping\n".to_owned())
}
