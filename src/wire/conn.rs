//! A framed connection and the ways it ends.
//!
//! Every read is bounded in size, and every way out goes through [`Conn::finish`], which
//! tells the peer why (when there is a why) before closing.

use super::backend;
use super::framing::{self, ProtocolError, StartupPacket};
use crate::log_throttle::LogThrottle;
use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_postgres::error::SqlState;

/// How long a closing connection spends telling the peer why.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum End {
    /// The client left: EOF, Terminate or CancelRequest.
    Quiet,
    /// The client already has its answer in the output buffer (the relay passes an
    /// upstream's ErrorResponse on as is).
    Answered,
    Io(io::Error),
    Protocol(ProtocolError),
    /// A FATAL error to report. The SQLSTATE is not optional: PgBouncer before 1.25.2
    /// crashes on an ErrorResponse without one.
    Fatal(SqlState, String),
    HandshakeTimeout,
    IdleTimeout,
    Shutdown,
}

impl End {
    /// The FATAL error the client is told, if it is owed one.
    pub(crate) fn fatal(&self) -> Option<(SqlState, String)> {
        match self {
            End::Quiet | End::Answered | End::Io(_) => None,
            End::Protocol(e) => Some((SqlState::PROTOCOL_VIOLATION, e.to_string())),
            End::Fatal(code, message) => Some((code.clone(), message.clone())),
            End::HandshakeTimeout => Some((
                SqlState::QUERY_CANCELED,
                "canceling authentication due to timeout".into(),
            )),
            End::IdleTimeout => Some((
                SqlState::IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle timeout".into(),
            )),
            End::Shutdown => Some((
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command".into(),
            )),
        }
    }
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

    pub async fn read_startup(&mut self) -> Result<StartupPacket, End> {
        loop {
            if let Some(packet) = framing::split_startup(&mut self.rbuf, self.max_message)? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// One typed message as (type, body). Cancel-safe: a partial frame stays in `rbuf`.
    pub async fn read_message(&mut self) -> Result<(u8, Bytes), End> {
        loop {
            if let Some(message) = framing::split_message(&mut self.rbuf, self.max_message)? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    /// One typed message whole (type, length, body), as a parser such as postgres-protocol's
    /// takes it, or to pass on unchanged.
    pub async fn read_frame(&mut self) -> Result<BytesMut, End> {
        loop {
            if let Some(len) = framing::frame_len(&self.rbuf, 1, self.max_message)? {
                return Ok(self.rbuf.split_to(len));
            }
            self.fill().await?;
        }
    }

    /// The stream alone, its buffers freed: for a connection that is past framing (a relayed
    /// session) and may stay open, idle, for hours. Whatever the buffers held is dropped.
    pub fn into_stream(self) -> S {
        self.stream
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.stream.flush().await
    }

    /// Tells the client why the connection ends, when it is owed a reason, and closes.
    pub async fn finish(mut self, end: End, peer: &str) {
        let fatal = end.fatal();
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
            backend::error_response(&mut self.wbuf, "FATAL", &code, &message);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    /// The SQLSTATE of the one ErrorResponse in `out`.
    pub(crate) fn sqlstate(out: &[u8]) -> String {
        use fallible_iterator::FallibleIterator;
        let mut buf = BytesMut::from(out);
        let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut buf) else {
            panic!("an ErrorResponse expected in {out:?}");
        };
        assert!(buf.is_empty(), "one message");
        let code = body
            .fields()
            .find(|f| Ok(f.type_() == b'C'))
            .unwrap()
            .map(|f| String::from_utf8_lossy(f.value_bytes()).into_owned());
        code.expect("a SQLSTATE field")
    }

    #[tokio::test]
    async fn every_error_a_connection_ends_with_carries_a_sqlstate() {
        let ends = [
            End::Protocol(ProtocolError::UnknownType(b'?')),
            End::Fatal(SqlState::INVALID_PASSWORD, "no".into()),
            End::HandshakeTimeout,
            End::IdleTimeout,
            End::Shutdown,
        ];
        for end in ends {
            let label = format!("{end:?}");
            let (mut client, server) = tokio::io::duplex(4096);
            Conn::new(server, 1024).finish(end, "test").await;
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            let code = sqlstate(&out);
            assert_eq!(code.len(), 5, "{label}: {code}");
        }
        for end in [
            End::Quiet,
            End::Answered,
            End::Io(io::ErrorKind::Other.into()),
        ] {
            assert!(end.fatal().is_none(), "{end:?} owes the client nothing");
        }
    }
}
