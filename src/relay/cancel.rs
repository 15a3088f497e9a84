//! Which upstream each live session's cancel key belongs to, and forwarding cancels there.
//!
//! Keys are passed through unchanged, so two upstreams could in principle hand out the same
//! (process id, secret) pair. The chance is about 2^-32 per pair of sessions with the same
//! process id; the newer session then wins the key, and the older one's registration never
//! removes the newer one's entry.

use super::Upstream;
use super::upstream;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CANCEL_REQUEST_CODE: i32 = 80_877_102;

#[derive(Default)]
pub(super) struct CancelMap {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: AtomicU64,
    keys: Mutex<HashMap<Bytes, (u64, Upstream)>>,
}

/// A key's entry, removed when this is dropped (the session ended, however it ended).
pub(super) struct Registration {
    inner: Arc<Inner>,
    key: Bytes,
    id: u64,
}

impl CancelMap {
    /// Maps `key` (BackendKeyData's body) to `upstream` until the registration is dropped.
    pub fn register(&self, key: Bytes, upstream: Upstream) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let replaced = self
            .inner
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), (id, upstream));
        if replaced.is_some() {
            tracing::debug!("two live sessions share a cancel key; the newer one gets it");
        }
        Registration {
            inner: Arc::clone(&self.inner),
            key,
            id,
        }
    }

    pub fn lookup(&self, key: &[u8]) -> Option<Upstream> {
        let keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(key).map(|(_, upstream)| upstream.clone())
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
    tls: &tokio_rustls::TlsConnector,
    key: &[u8],
) -> Result<(), String> {
    let mut stream = upstream::connect(upstream, tls).await?;
    let mut request = BytesMut::with_capacity(8 + key.len());
    request.put_i32(i32::try_from(8 + key.len()).unwrap_or(i32::MAX));
    request.put_i32(CANCEL_REQUEST_CODE);
    request.put_slice(key);
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
            upstream.host, upstream.port
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(host: &str) -> Upstream {
        Upstream {
            host: host.into(),
            port: 5432,
            region: "us-east-1".into(),
            database: "appdb".into(),
            users: Vec::new(),
        }
    }

    fn key(pid: i32, secret: i32) -> Bytes {
        let mut key = BytesMut::new();
        key.put_i32(pid);
        key.put_i32(secret);
        key.freeze()
    }

    #[test]
    fn a_key_maps_to_its_upstream_while_the_session_lives() {
        let map = CancelMap::default();
        let a = map.register(key(1, 10), upstream("a"));
        let b = map.register(key(2, 20), upstream("b"));
        assert_eq!(map.lookup(&key(1, 10)), Some(upstream("a")));
        assert_eq!(map.lookup(&key(2, 20)), Some(upstream("b")));
        assert_eq!(map.lookup(&key(1, 20)), None, "the secret must match too");
        assert_eq!(map.lookup(&[]), None);
        drop(a);
        assert_eq!(map.lookup(&key(1, 10)), None);
        assert_eq!(map.lookup(&key(2, 20)), Some(upstream("b")));
        drop(b);
        assert!(map.inner.keys.lock().unwrap().is_empty());
    }

    #[test]
    fn the_newer_of_two_sessions_with_one_key_keeps_it() {
        let map = CancelMap::default();
        let older = map.register(key(7, 7), upstream("old"));
        let newer = map.register(key(7, 7), upstream("new"));
        assert_eq!(map.lookup(&key(7, 7)), Some(upstream("new")));
        drop(older);
        assert_eq!(
            map.lookup(&key(7, 7)),
            Some(upstream("new")),
            "the older session's end leaves the newer one's entry"
        );
        drop(newer);
        assert_eq!(map.lookup(&key(7, 7)), None);
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
                        let r = map.register(k.clone(), upstream("x"));
                        assert!(map.lookup(&k).is_some());
                        drop(r);
                        assert!(map.lookup(&k).is_none());
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
