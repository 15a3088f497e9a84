//! TLS to the upstream server on rustls's unbuffered API, so that an idle session holds no
//! TLS buffer.
//!
//! `tokio_rustls` drives rustls's buffered `ClientConnection`, whose receive buffer never
//! shrinks below 4 KiB once used: 4 MiB at 1,000 pooled server connections, nearly all idle.
//! Here ciphertext is read into a scratch buffer of the thread's and decrypted there; a
//! session keeps bytes of its own only for what could not be used at once (a record not fully
//! received, plaintext the reader had no room for, ciphertext the socket did not take), each
//! freed as soon as it has been used up.

use rustls::ClientConfig;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most read at once: the largest TLS record (16 KiB of plaintext, up to 2 KiB of TLS
/// 1.2's overhead, the header), so that a bulk transfer arrives a record per read.
const READ_BYTES: usize = 16 * 1024 + 2048 + 5;

/// The most plaintext encrypted per write: one full record.
const WRITE_BYTES: usize = 16 * 1024;

thread_local! {
    /// Borrowed only within one poll, never across an await, so one per thread serves every
    /// session the thread runs. Grows past [`READ_BYTES`] only while rustls joins a handshake
    /// message that spans records (a long certificate chain: up to 64 KiB).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A TLS client connection over TCP, read and written as plaintext.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedClientConnection,
    /// Received ciphertext rustls is not done with: a record not complete yet, or the records
    /// of a handshake message it is still joining, which must come back to it unchanged.
    incoming: Vec<u8>,
    /// Decrypted, but more than the reader's buffer took.
    plaintext: Leftover,
    /// Encrypted, but not taken by the socket yet.
    outgoing: Leftover,
    /// The server has sent close_notify: reads are at EOF once `plaintext` is empty.
    peer_closed: bool,
}

impl TlsStream {
    /// Performs the handshake on `tcp`, verifying the server's certificate as `config` says.
    pub async fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> io::Result<Self> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        let mut stream = Self {
            tcp,
            conn,
            incoming: Vec::new(),
            plaintext: Leftover::default(),
            outgoing: Leftover::default(),
            peer_closed: false,
        };
        // Nothing received yet: this encodes the ClientHello.
        stream.process(&mut [], None, |_| ())?;
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_receive(cx, None))?;
        }
    }

    /// Feeds `incoming` to rustls until it needs more: plaintext goes to `out` as far as it
    /// has room, the rest to `plaintext`; what rustls has to send goes to `outgoing`. rustls
    /// lends its encryptor only as the state it ends in, so `traffic` runs in here. Returns
    /// how much of `incoming` rustls is done with, and what `traffic` returned (`None` while
    /// the handshake is unfinished, or once both sides have closed).
    fn process<R>(
        &mut self,
        incoming: &mut [u8],
        mut out: Option<&mut ReadBuf<'_>>,
        traffic: impl FnOnce(WriteTraffic<'_, ClientConnectionData>) -> R,
    ) -> io::Result<(usize, Option<R>)> {
        let mut done = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut incoming[done..]);
            match state {
                Err(error) => {
                    // So that the server's log says why: rustls has queued an alert for it.
                    let again = self
                        .conn
                        .process_tls_records(&mut incoming[done + discard..]);
                    if let Ok(ConnectionState::EncodeTlsData(mut alert)) = again.state {
                        let _ = encode_into(&mut self.outgoing.bytes, &mut alert);
                    }
                    return Err(tls_error(error));
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        deliver(record.payload, out.as_deref_mut(), &mut self.plaintext);
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut message)) => {
                    encode_into(&mut self.outgoing.bytes, &mut message)?;
                }
                // Sent in order with everything else from `outgoing`, by whoever polls next.
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(ConnectionState::PeerClosed) => self.peer_closed = true,
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    return Ok((done + discard, None));
                }
                Ok(ConnectionState::BlockedHandshake) => return Ok((done + discard, None)),
                Ok(ConnectionState::WriteTraffic(write)) => {
                    return Ok((done + discard, Some(traffic(write))));
                }
                Ok(other) => {
                    return Err(io::Error::other(format!(
                        "unexpected TLS client state {other:?}"
                    )));
                }
            }
            done += discard;
        }
    }

    /// Reads what the socket has into the scratch buffer, behind the ciphertext kept from
    /// before (rustls must see that again, unchanged), and has rustls process it.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<()>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let kept = self.incoming.len();
            if scratch.len() < kept + READ_BYTES {
                scratch.resize(kept + READ_BYTES, 0);
            }
            scratch[..kept].copy_from_slice(&self.incoming);
            let mut read = ReadBuf::new(&mut scratch[kept..kept + READ_BYTES]);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut read))?;
            let received = read.filled().len();
            if received == 0 {
                let when = if self.conn.is_handshaking() {
                    "during the TLS handshake"
                } else {
                    "without a TLS close_notify"
                };
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the server closed the connection {when}"),
                )));
            }
            let received = &mut scratch[..kept + received];
            match self.process(received, out, |_| ()) {
                Ok((done, _)) => {
                    self.incoming = received[done..].to_vec();
                    Poll::Ready(Ok(()))
                }
                Err(error) => {
                    // The alert, if the socket takes it now; the session ends either way.
                    let _ = self.poll_send(cx);
                    Poll::Ready(Err(error))
                }
            }
        })
    }

    /// Brings rustls to where it takes application data and has `write` encrypt into
    /// `scratch`: the ciphertext's length, or `None` once both sides have closed.
    fn encrypt(
        &mut self,
        scratch: &mut Vec<u8>,
        mut write: impl FnMut(
            &mut WriteTraffic<'_, ClientConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
    ) -> io::Result<Option<usize>> {
        let mut incoming = mem::take(&mut self.incoming);
        let processed = self.process(&mut incoming, None, |mut traffic| {
            encrypt_into(scratch, |out| write(&mut traffic, out))
        });
        let (done, encrypted) = processed?;
        incoming.drain(..done);
        if !incoming.is_empty() {
            self.incoming = incoming;
        }
        encrypted.transpose()
    }

    /// Writes the ciphertext waiting in `outgoing`: ready once the socket has taken it all.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, self.outgoing.unused()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.use_up(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `ciphertext` as far as the socket takes it now and keeps the rest; straight
    /// from the scratch buffer only when nothing is waiting, so that nothing encoded earlier
    /// (a KeyUpdate's answer, a record not fully sent) is overtaken.
    fn send_now(&mut self, cx: &mut Context<'_>, ciphertext: &[u8]) -> io::Result<()> {
        let mut sent = 0;
        while self.outgoing.is_empty() && sent < ciphertext.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &ciphertext[sent..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(error)) => return Err(error),
                Poll::Pending => break,
            }
        }
        self.outgoing.push(&ciphertext[sent..]);
        Ok(())
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plaintext.is_empty() {
                let n = this.plaintext.unused().len().min(buf.remaining());
                buf.put_slice(&this.plaintext.unused()[..n]);
                this.plaintext.use_up(n);
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // What rustls owes the server (a KeyUpdate's answer) goes out without waiting
            // for the caller to write.
            if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
            let before = buf.filled().len();
            ready!(this.poll_receive(cx, Some(buf)))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What the socket did not take before goes first; this also bounds what is held to
        // about one record.
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(WRITE_BYTES)];
        Poll::Ready(SCRATCH.with_borrow_mut(|scratch| {
            let Some(length) = this.encrypt(scratch, |traffic, out| traffic.encrypt(data, out))?
            else {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the TLS connection is closed",
                ));
            };
            this.send_now(cx, &scratch[..length])?;
            Ok(data.len())
        }))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends close_notify, then shuts TCP down. Polled again after `Pending`, rustls encodes
    /// no second close_notify.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        SCRATCH.with_borrow_mut(|scratch| {
            let closing = this.encrypt(scratch, |traffic, out| traffic.queue_close_notify(out))?;
            this.send_now(cx, &scratch[..closing.unwrap_or(0)])
        })?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Bytes kept for later, with no allocation while there are none.
#[derive(Default)]
struct Leftover {
    bytes: Vec<u8>,
    used: usize,
}

impl Leftover {
    fn is_empty(&self) -> bool {
        self.used == self.bytes.len()
    }

    fn unused(&self) -> &[u8] {
        &self.bytes[self.used..]
    }

    fn push(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
    }

    /// Marks `n` more bytes used, and frees the buffer once all are.
    fn use_up(&mut self, n: usize) {
        self.used += n;
        if self.is_empty() {
            *self = Self::default();
        }
    }
}

/// Puts as much of `payload` in `out` as it has room for, the rest in `kept`. Only ever
/// called with `kept` empty or `out` full, so the order holds.
fn deliver(payload: &[u8], out: Option<&mut ReadBuf<'_>>, kept: &mut Leftover) {
    let taken = out.map_or(0, |out| {
        let n = payload.len().min(out.remaining());
        out.put_slice(&payload[..n]);
        n
    });
    kept.push(&payload[taken..]);
}

/// Appends a handshake or alert record to `out`, growing it as far as rustls needs.
fn encode_into(
    out: &mut Vec<u8>,
    message: &mut EncodeTlsData<'_, ClientConnectionData>,
) -> io::Result<()> {
    let start = out.len();
    loop {
        match message.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(start + required_size, 0);
            }
            Err(error) => return Err(io::Error::other(error)),
        }
    }
}

/// Has `write` encrypt into `out` from its start, growing it as far as rustls needs: the
/// ciphertext's length. `out` never shrinks, so the scratch buffer is zeroed once per thread.
fn encrypt_into(
    out: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<usize> {
    loop {
        match write(out) {
            Ok(n) => return Ok(n),
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(required_size, 0);
            }
            Err(error) => return Err(io::Error::other(error)),
        }
    }
}

/// As `tokio_rustls` reports them, so that the messages read as before ("invalid peer
/// certificate: ...", "received fatal alert: ...").
fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests;
