//! A stream wrapper that lets the admin console's client send its secret only through
//! SCRAM-SHA-256.
//!
//! tokio-postgres answers whatever password request the server makes: a cleartext request
//! gets the password itself, an MD5 request a hash that can be replayed and attacked offline.
//! Whatever holds PgBouncer's port before PgBouncer does (another container of the pod, a
//! local process after a PgBouncer restart) could ask so. This wrapper reads the server's
//! messages before tokio-postgres does, up to AuthenticationOk, and ends the connection with
//! an error at the first Authentication request other than SASL (SCRAM), so the request never
//! reaches the client and nothing is sent. SCRAM proves nothing the other side can reuse, and
//! tokio-postgres checks the server's signature, so a squatter cannot complete it either.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Authentication request codes (PostgreSQL protocol 3.0).
const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

/// Why a connection was ended, for the caller to report: the stream error itself reaches
/// the caller only as tokio-postgres's "error communicating with the server".
#[derive(Clone, Default)]
pub struct Refusal(Arc<Mutex<Option<String>>>);

impl Refusal {
    pub fn take(&self) -> Option<String> {
        self.0.lock().expect("refusal lock").take()
    }

    fn set(&self, why: String) -> io::Error {
        *self.0.lock().expect("refusal lock") = Some(why.clone());
        io::Error::new(io::ErrorKind::PermissionDenied, why)
    }
}

pub struct ScramOnly<S> {
    inner: S,
    scan: Scan,
    refusal: Refusal,
}

/// Where the scan of the server's byte stream stands.
enum Scan {
    /// Reading a message header: the tag and the length.
    Header { bytes: [u8; 5], have: usize },
    /// Inside a message body; for an Authentication message, its code is read first.
    Body {
        tag: u8,
        left: usize,
        code: [u8; 4],
        have: usize,
    },
    /// Authenticated: nothing more is looked at.
    Done,
}

impl<S> ScramOnly<S> {
    pub fn new(inner: S, refusal: Refusal) -> Self {
        Self {
            inner,
            scan: Scan::Header {
                bytes: [0; 5],
                have: 0,
            },
            refusal,
        }
    }

    /// Follows the message framing through `data`; an error for a request to refuse.
    fn inspect(&mut self, data: &[u8]) -> io::Result<()> {
        for &byte in data {
            if matches!(self.scan, Scan::Done) {
                return Ok(());
            }
            let scan = std::mem::replace(&mut self.scan, Scan::Done);
            self.scan = self.step(scan, byte)?;
        }
        Ok(())
    }

    fn step(&self, scan: Scan, byte: u8) -> io::Result<Scan> {
        let body = match scan {
            Scan::Done => return Ok(Scan::Done),
            Scan::Header { mut bytes, have } => {
                bytes[have] = byte;
                if have + 1 < bytes.len() {
                    return Ok(Scan::Header {
                        bytes,
                        have: have + 1,
                    });
                }
                let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                let left = (length as usize)
                    .checked_sub(4)
                    .filter(|left| bytes[0] != b'R' || *left >= 4);
                let left = left.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed message from the server",
                    )
                })?;
                Scan::Body {
                    tag: bytes[0],
                    left,
                    code: [0; 4],
                    have: 0,
                }
            }
            Scan::Body {
                tag,
                left,
                mut code,
                have,
            } => {
                let mut have = have;
                if tag == b'R' && have < code.len() {
                    code[have] = byte;
                    have += 1;
                    if have == code.len() && self.judge(u32::from_be_bytes(code))? {
                        return Ok(Scan::Done);
                    }
                }
                Scan::Body {
                    tag,
                    left: left - 1,
                    code,
                    have,
                }
            }
        };
        Ok(match body {
            Scan::Body { left: 0, .. } => Scan::Header {
                bytes: [0; 5],
                have: 0,
            },
            body => body,
        })
    }

    /// True once authenticated; an error for a request that would give the secret away.
    fn judge(&self, code: u32) -> io::Result<bool> {
        match code {
            AUTH_OK => Ok(true),
            AUTH_SASL | AUTH_SASL_CONTINUE | AUTH_SASL_FINAL => Ok(false),
            AUTH_CLEARTEXT => Err(self
                .refusal
                .set("it asked for the password in cleartext, not SCRAM-SHA-256".to_owned())),
            AUTH_MD5 => Err(self
                .refusal
                .set("it asked for an MD5 password hash, not SCRAM-SHA-256".to_owned())),
            other => Err(self.refusal.set(format!(
                "it asked for authentication method {other}, not SCRAM-SHA-256"
            ))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ScramOnly<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let fresh = buf.filled()[before..].to_vec();
            if let Err(error) = self.inspect(&fresh) {
                // Nothing of what was read reaches tokio-postgres.
                buf.set_filled(before);
                return Poll::Ready(Err(error));
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ScramOnly<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut message = vec![b'R'];
        message.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
        message.extend_from_slice(&code.to_be_bytes());
        message.extend_from_slice(extra);
        message
    }

    async fn read_through(server: Vec<u8>) -> (io::Result<Vec<u8>>, Option<String>) {
        let refusal = Refusal::default();
        let mut stream = ScramOnly::new(&server[..], refusal.clone());
        let mut seen = Vec::new();
        let outcome = stream.read_to_end(&mut seen).await.map(|_| seen);
        (outcome, refusal.take())
    }

    #[tokio::test]
    async fn cleartext_and_md5_requests_are_refused_before_the_client_sees_them() {
        for (request, why) in [
            (auth(AUTH_CLEARTEXT, b""), "cleartext"),
            (auth(AUTH_MD5, b"salt"), "MD5"),
            (auth(7, b""), "method 7"),
        ] {
            let (outcome, refusal) = read_through(request).await;
            assert!(outcome.is_err());
            assert!(refusal.unwrap().contains(why));
        }
    }

    #[tokio::test]
    async fn scram_and_everything_after_authentication_pass_unchanged() {
        let mut server = auth(AUTH_SASL, b"SCRAM-SHA-256\0\0");
        server.extend(auth(AUTH_SASL_CONTINUE, b"r=abc"));
        server.extend(auth(AUTH_SASL_FINAL, b"v=xyz"));
        server.extend(auth(AUTH_OK, b""));
        // After AuthenticationOk nothing is looked at, not even a later cleartext request.
        server.extend(auth(AUTH_CLEARTEXT, b""));
        let (outcome, refusal) = read_through(server.clone()).await;
        assert_eq!(outcome.unwrap(), server);
        assert!(refusal.is_none());
    }

    #[tokio::test]
    async fn a_request_split_across_reads_is_still_seen() {
        let mut server = vec![b'E'];
        server.extend_from_slice(&9u32.to_be_bytes());
        server.extend_from_slice(b"Mhi\0\0");
        server.extend(auth(AUTH_CLEARTEXT, b""));
        let refusal = Refusal::default();
        let (client, mut far) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for byte in server {
                if far.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
        });
        let mut stream = ScramOnly::new(client, refusal.clone());
        let mut seen = Vec::new();
        assert!(stream.read_to_end(&mut seen).await.is_err());
        assert!(refusal.take().unwrap().contains("cleartext"));
        writer.abort();
    }
}
