//! `aws-pgbouncer wait`: blocks until the daemon reports that it has started.
//!
//! Made for a pod's `postStart` hook or an init script: an application container that starts
//! before the first tokens are in PgBouncer sees login failures, and images built from scratch
//! have neither curl nor a shell loop to poll with. One request per poll over plain HTTP/1.1
//! keeps this free of an HTTP client dependency.

use crate::cli::WaitArgs;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// One poll; the daemon answers from memory, so anything slower is a daemon not yet serving.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// `Ok` once `/startupz` answers 200; `Err` with the last thing seen when time runs out.
pub async fn run(args: &WaitArgs) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let last = match timeout(REQUEST_TIMEOUT, startupz_status(&args.http)).await {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => format!("/startupz answered HTTP {status}"),
            Ok(Err(error)) => error,
            Err(_) => format!(
                "/startupz did not answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        };
        if Instant::now() + POLL_INTERVAL >= deadline {
            return Err(format!(
                "the daemon at {} did not report started within {} s (last: {last})",
                args.http, args.timeout
            ));
        }
        sleep(POLL_INTERVAL).await;
    }
}

async fn startupz_status(address: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|error| format!("cannot connect to {address}: {error}"))?;
    let request = format!("GET /startupz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("sending to {address}: {error}"))?;
    // The status line is all that matters; the body is a word or two.
    let mut response = Vec::with_capacity(256);
    stream
        .take(4096)
        .read_to_end(&mut response)
        .await
        .map_err(|error| format!("reading from {address}: {error}"))?;
    parse_status(&response).ok_or_else(|| format!("{address} did not answer with HTTP"))
}

fn parse_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&byte| byte == b'\n').next()?;
    let mut words = std::str::from_utf8(line).ok()?.split_whitespace();
    words.next()?.starts_with("HTTP/1.").then_some(())?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn reads_the_status_line() {
        assert_eq!(
            parse_status(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nstarting\n"
            ),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n\r\n"), Some(200));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
