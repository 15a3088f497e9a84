//! Which upstream each live session's cancel key belongs to, and forwarding cancels there.
//!
//! Keys are passed through unchanged, so two upstreams could in principle hand out the same
//! (process id, secret) pair. The chance is about 2^-32 per pair of sessions with the same
//! process id; the newer session then wins the key, and the older one's registration never
//! removes the newer one's entry.

use super::Upstream;
use super::upstream;
use bytes::BytesMut;
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A backend's cancel key, as its BackendKeyData carried it (protocol 3.0, which is what the
/// relay speaks upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct CancelKey {
    pub process_id: i32,
    pub secret_key: i32,
}

impl CancelKey {
    /// The key of a CancelRequest as PgBouncer sent it; `None` for any other length, which
    /// no upstream of the relay can have handed out.
    pub fn parse(key: &[u8]) -> Option<Self> {
        let key: [u8; 8] = key.try_into().ok()?;
        let [p0, p1, p2, p3, s0, s1, s2, s3] = key;
        Some(Self {
            process_id: i32::from_be_bytes([p0, p1, p2, p3]),
            secret_key: i32::from_be_bytes([s0, s1, s2, s3]),
        })
    }
}

#[derive(Default)]
pub(super) struct CancelMap {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: AtomicU64,
    keys: Mutex<HashMap<CancelKey, (u64, Arc<Upstream>)>>,
}

/// A key's entry, removed when this is dropped (the session ended, however it ended).
pub(super) struct Registration {
    inner: Arc<Inner>,
    key: CancelKey,
    id: u64,
}

impl CancelMap {
    /// Maps `key` to `upstream` until the registration is dropped.
    pub fn register(&self, key: CancelKey, upstream: Arc<Upstream>) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let replaced = self
            .inner
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (id, upstream));
        if replaced.is_some() {
            tracing::debug!("two live sessions share a cancel key; the newer one gets it");
        }
        Registration {
            inner: Arc::clone(&self.inner),
            key,
            id,
        }
    }

    pub fn lookup(&self, key: CancelKey) -> Option<Arc<Upstream>> {
        let keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(&key).map(|(_, upstream)| Arc::clone(upstream))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            keys.remove(&self.key);
        }
    }
}

/// Sends the CancelRequest for `key` to `upstream` over TLS, and waits for the server to
/// close the connection, as libpq does, so that PgBouncer's next query cannot overtake it.
pub(super) async fn forward(
    upstream: &Upstream,
    tls: &Arc<rustls::ClientConfig>,
    key: CancelKey,
) -> Result<(), String> {
    let mut stream = upstream::connect(upstream, tls).await?;
    let mut request = BytesMut::new();
    frontend::cancel_request(key.process_id, key.secret_key, &mut request);
    let sent = async {
        stream.write_all(&request).await?;
        stream.flush().await?;
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    sent.await.map_err(|e| {
        format!(
            "sending a cancel request to {}:{}: {e}",
            upstream.dial_address().0,
            upstream.dial_address().1,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(host: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            kind: crate::token::TokenKind::Rds,
            host: host.into(),
            port: 5432,
            dial: None,
            region: "us-east-1".into(),
            database: "appdb".into(),
            users: Vec::new(),
            role: None,
        })
    }

    fn key(process_id: i32, secret_key: i32) -> CancelKey {
        CancelKey {
            process_id,
            secret_key,
        }
    }

    #[test]
    fn a_key_maps_to_its_upstream_while_the_session_lives() {
        let map = CancelMap::default();
        let a = map.register(key(1, 10), upstream("a"));
        let b = map.register(key(2, 20), upstream("b"));
        assert_eq!(map.lookup(key(1, 10)), Some(upstream("a")));
        assert_eq!(map.lookup(key(2, 20)), Some(upstream("b")));
        assert_eq!(map.lookup(key(1, 20)), None, "the secret must match too");
        assert_eq!(CancelKey::parse(&[]), None);
        let mut request = BytesMut::new();
        frontend::cancel_request(1, 10, &mut request);
        assert_eq!(CancelKey::parse(&request[8..]), Some(key(1, 10)));
        drop(a);
        assert_eq!(map.lookup(key(1, 10)), None);
        assert_eq!(map.lookup(key(2, 20)), Some(upstream("b")));
        drop(b);
        assert!(map.inner.keys.lock().unwrap().is_empty());
    }

    #[test]
    fn the_newer_of_two_sessions_with_one_key_keeps_it() {
        let map = CancelMap::default();
        let older = map.register(key(7, 7), upstream("old"));
        let newer = map.register(key(7, 7), upstream("new"));
        assert_eq!(map.lookup(key(7, 7)), Some(upstream("new")));
        drop(older);
        assert_eq!(
            map.lookup(key(7, 7)),
            Some(upstream("new")),
            "the older session's end leaves the newer one's entry"
        );
        drop(newer);
        assert_eq!(map.lookup(key(7, 7)), None);
    }

    #[test]
    fn registrations_from_many_threads() {
        let map = Arc::new(CancelMap::default());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let map = Arc::clone(&map);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let k = key(t, i);
                        let r = map.register(k, upstream("x"));
                        assert!(map.lookup(k).is_some());
                        drop(r);
                        assert!(map.lookup(k).is_none());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(map.inner.keys.lock().unwrap().is_empty());
    }
}
