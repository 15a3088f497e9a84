//! The relay's byte copy once a session has logged in: both ways, until both sides have
//! closed, holding no buffer while the session is idle.
//!
//! `tokio::io::copy_bidirectional` keeps an 8-KiB buffer per direction for the whole
//! session, 16 KiB for each of PgBouncer's server connections, and those mostly sit idle in
//! its pools (1,000 users, 1,000 sessions). Here every read goes into one scratch buffer per
//! thread and is written on at once; only what the writer does not take then is kept, in a
//! buffer of the session's own that is freed as soon as it has been written.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most read at once: a TLS record's worth of plaintext, so that a bulk transfer goes
/// out in full records.
const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    /// Borrowed only within one poll, never across an await, so one per thread serves every
    /// session the thread runs.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Copies `a` to `b` and `b` to `a` until both have reached EOF (each EOF shuts the other
/// side's writing down), or either fails. Returns the bytes copied each way.
pub(super) async fn both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    poll_fn(|cx| {
        let a_to_b_done = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let b_to_a_done = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (a_to_b_done, b_to_a_done) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok((a_to_b.copied, b_to_a.copied))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of the copy.
#[derive(Default)]
struct Direction {
    /// Read but not taken by the writer yet; empty, with no allocation, whenever the writer
    /// has kept up.
    unwritten: Vec<u8>,
    /// How much of `unwritten` has been written since.
    written: usize,
    /// Written since the last flush: a TLS writer may hold records back until flushed.
    need_flush: bool,
    state: State,
    copied: u64,
}

#[derive(Default)]
enum State {
    #[default]
    Copying,
    /// The reader is at EOF and everything has been written: shut the writer down.
    ShuttingDown,
    Done,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self.state {
                State::Copying => {}
                State::ShuttingDown => {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.state = State::Done;
                    continue;
                }
                State::Done => return Poll::Ready(Ok(())),
            }
            while self.written < self.unwritten.len() {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.unwritten[self.written..])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.need_flush = true;
            }
            if self.unwritten.capacity() > 0 {
                self.unwritten = Vec::new();
                self.written = 0;
            }
            match self.read_and_write(cx, reader.as_mut(), writer.as_mut()) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(0)) => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    self.state = State::ShuttingDown;
                }
                Poll::Ready(Ok(n)) => self.copied += n as u64,
            }
        }
    }

    /// Reads once into the thread's scratch buffer and writes what came as far as the writer
    /// takes it now; the rest goes to `unwritten`. Ready with the bytes read, 0 at EOF.
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            ready!(reader.as_mut().poll_read(cx, &mut buf))?;
            let read = buf.filled();
            let mut written = 0;
            while written < read.len() {
                match writer.as_mut().poll_write(cx, &read[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => break,
                }
            }
            self.need_flush |= written > 0;
            self.unwritten.extend_from_slice(&read[written..]);
            Poll::Ready(Ok(read.len()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_until_both_sides_close() {
        let (mut client, mut relay_client) = duplex(64);
        let (mut relay_server, server) = duplex(64);
        let relay =
            tokio::spawn(async move { both_ways(&mut relay_client, &mut relay_server).await });
        let up: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let down: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&up_sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let (mut server_reads, mut server_writes) = tokio::io::split(server);
        let mut got_up = Vec::new();
        let (written, read) = tokio::join!(
            async {
                server_writes.write_all(&down_sent).await?;
                server_writes.shutdown().await
            },
            server_reads.read_to_end(&mut got_up)
        );
        written.unwrap();
        read.unwrap();
        assert!(got_up == up, "PgBouncer's bytes reach the server unchanged");
        assert!(
            client_side.await.unwrap() == down,
            "and the server's reach PgBouncer"
        );
        let copied = relay.await.unwrap().unwrap();
        assert_eq!(copied, (up.len() as u64, down.len() as u64));
    }

    /// The property the module exists for: a buffer is held only while the writer lags, and
    /// none once it has caught up, so that an idle session costs no copy buffer.
    #[tokio::test]
    async fn an_idle_session_holds_no_copy_buffer() {
        let (mut from, mut reader) = duplex(64 * 1024);
        let (mut writer, mut to) = duplex(1024);
        let mut direction = Direction::default();
        let mut cx = Context::from_waker(Waker::noop());
        let mut poll = |direction: &mut Direction| {
            let polled = direction.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
            assert!(polled.is_pending(), "the copy goes on");
        };

        from.write_all(&[7; 10_000]).await.unwrap();
        poll(&mut direction);
        assert!(
            direction.unwritten.capacity() > 0,
            "the writer took 1 KiB of 10: the rest waits in the session's buffer"
        );
        let mut received = Vec::new();
        while received.len() < 10_000 {
            let mut chunk = [0; 4096];
            let n = to.read(&mut chunk).await.unwrap();
            received.extend_from_slice(&chunk[..n]);
            poll(&mut direction);
        }
        assert_eq!(received, vec![7; 10_000]);
        assert_eq!(
            direction.unwritten.capacity(),
            0,
            "written out and idle: no buffer held"
        );
    }
}
