//! One request to the daemon's own HTTP server, for the `wait` and `shutdown` commands.
//!
//! Images built from scratch have neither curl nor a shell, so the binary speaks to itself. One
//! request per connection over plain HTTP/1.1 keeps this free of an HTTP client dependency.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status code the daemon at `address` answers `method path` with.
pub async fn status(address: &str, method: &str, path: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|error| format!("cannot connect to {address}: {error}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
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
