//! Framing of the messages a client sends, the startup packet and the body readers the
//! decoders share.
//!
//! Everything here works on bytes already in memory and never panics: a length that lies, a
//! count that promises more fields than the body holds, or a string without its NUL all come
//! back as a [`ProtocolError`]. Each frame is checked against the size limit as soon as its
//! header is in, so a hostile length never makes a connection buffer more than the limit.

use bytes::{Buf, Bytes, BytesMut};
use std::fmt;

/// Protocol 3.0, the only major version Postgres (and so PgBouncer) speaks.
const PROTOCOL_3: i32 = 3 << 16;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// Why the bytes a client sent cannot be a message. Always fatal to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A frame announces more bytes than the configured limit.
    TooLarge { len: usize, max: usize },
    /// A frame announces a length smaller than its own header.
    BadLength(i32),
    /// A message type the endpoint does not know (or does not accept at this point).
    UnknownType(u8),
    /// The body does not have the shape its type requires.
    Malformed(&'static str),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
            Self::BadLength(len) => write!(f, "invalid message length {len}"),
            Self::UnknownType(tag) => write!(f, "unexpected message type 0x{tag:02x}"),
            Self::Malformed(what) => write!(f, "malformed message: {what}"),
        }
    }
}

/// The first packet of a connection, which has no type byte.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    /// The key of the backend to cancel, as its BackendKeyData carried it: the process id,
    /// then the secret (4 bytes in protocol 3.0, longer in 3.2). Not checked: an unknown key
    /// is dropped anyway.
    Cancel(Bytes),
    /// Protocol 3.x; `minor` above 0 is answered with NegotiateProtocolVersion.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
    /// Any other protocol code (2.0, garbage).
    Unsupported(i32),
}

/// Splits the startup packet off the front of `buf`; `Ok(None)` means more bytes are needed.
pub fn split_startup(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<StartupPacket>, ProtocolError> {
    let Some(body) = split_frame(buf, 0, max)? else {
        return Ok(None);
    };
    decode_startup(body).map(Some)
}

/// Splits one typed message off the front of `buf`; `Ok(None)` means more bytes are needed.
pub fn split_message(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Bytes)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    Ok(split_frame(buf, 1, max)?.map(|body| (tag, body)))
}

/// A frame is `prefix` bytes (the type, if any), a big-endian i32 length that counts itself,
/// then the body. `max` bounds the whole frame.
fn split_frame(
    buf: &mut BytesMut,
    prefix: usize,
    max: usize,
) -> Result<Option<Bytes>, ProtocolError> {
    let Some(total) = frame_len(buf, prefix, max)? else {
        return Ok(None);
    };
    let mut frame = buf.split_to(total);
    frame.advance(prefix + 4);
    Ok(Some(frame.freeze()))
}

/// The whole length of the frame at the front of `buf` once it is all there (`Ok(None)`
/// before), checked against `max` as soon as its header is in.
pub(crate) fn frame_len(
    buf: &[u8],
    prefix: usize,
    max: usize,
) -> Result<Option<usize>, ProtocolError> {
    let Some(header) = buf.get(prefix..prefix + 4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let len_usize = usize::try_from(len).map_err(|_| ProtocolError::BadLength(len))?;
    if len_usize < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    let total = prefix + len_usize;
    if total > max {
        return Err(ProtocolError::TooLarge { len: total, max });
    }
    Ok((buf.len() >= total).then_some(total))
}

fn decode_startup(mut body: Bytes) -> Result<StartupPacket, ProtocolError> {
    let code = get_i32(&mut body)?;
    Ok(match code {
        SSL_REQUEST | GSSENC_REQUEST if !body.is_empty() => {
            return Err(ProtocolError::Malformed(
                "trailing bytes in encryption request",
            ));
        }
        SSL_REQUEST => StartupPacket::Ssl,
        GSSENC_REQUEST => StartupPacket::GssEnc,
        CANCEL_REQUEST => StartupPacket::Cancel(body),
        code if code >> 16 == PROTOCOL_3 >> 16 => {
            let mut params = Vec::new();
            loop {
                let key = get_cstr(&mut body)?;
                if key.is_empty() {
                    break;
                }
                let value = get_cstr(&mut body)?;
                params.push((key, value));
            }
            if !body.is_empty() {
                return Err(ProtocolError::Malformed(
                    "trailing bytes after startup parameters",
                ));
            }
            StartupPacket::Startup {
                minor: (code & 0xffff) as u16,
                params,
            }
        }
        other => StartupPacket::Unsupported(other),
    })
}

/// SASLInitialResponse: the mechanism name and the client-first-message.
pub fn decode_sasl_initial(mut body: Bytes) -> Result<(String, Bytes), ProtocolError> {
    let mechanism = get_cstr(&mut body)?;
    let data = get_value(&mut body)?.ok_or(ProtocolError::Malformed("missing SASL data"))?;
    if !body.is_empty() {
        return Err(ProtocolError::Malformed("trailing bytes after SASL data"));
    }
    Ok((mechanism, data))
}

pub(crate) fn get_i32(body: &mut Bytes) -> Result<i32, ProtocolError> {
    body.try_get_i32()
        .map_err(|_| ProtocolError::Malformed("truncated integer"))
}

pub(crate) fn get_i16(body: &mut Bytes) -> Result<i16, ProtocolError> {
    body.try_get_i16()
        .map_err(|_| ProtocolError::Malformed("truncated integer"))
}

/// A 16-bit element count, checked against what the body can still hold so that a lying
/// count fails before anything is allocated for it.
pub(crate) fn get_count(
    body: &mut Bytes,
    min_element_bytes: usize,
) -> Result<usize, ProtocolError> {
    let count = usize::from(
        body.try_get_u16()
            .map_err(|_| ProtocolError::Malformed("truncated count"))?,
    );
    if count * min_element_bytes > body.len() {
        return Err(ProtocolError::Malformed("count exceeds message length"));
    }
    Ok(count)
}

/// A length-prefixed value; length -1 is NULL.
pub(crate) fn get_value(body: &mut Bytes) -> Result<Option<Bytes>, ProtocolError> {
    let len = get_i32(body)?;
    if len == -1 {
        return Ok(None);
    }
    let len =
        usize::try_from(len).map_err(|_| ProtocolError::Malformed("negative value length"))?;
    if len > body.len() {
        return Err(ProtocolError::Malformed("value exceeds message length"));
    }
    Ok(Some(body.split_to(len)))
}

/// A NUL-terminated UTF-8 string (the session announces client_encoding UTF8).
pub(crate) fn get_cstr(body: &mut Bytes) -> Result<String, ProtocolError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("string without terminator"))?;
    let raw = body.split_to(nul);
    body.advance(1);
    String::from_utf8(raw.to_vec()).map_err(|_| ProtocolError::Malformed("string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend as pg;

    const MAX: usize = 8 * 1024;

    #[test]
    fn startup_packets() {
        let mut buf = BytesMut::new();
        pg::startup_message([("user", "u"), ("database", "d")], &mut buf).unwrap();
        pg::ssl_request(&mut buf);
        pg::cancel_request(1, 2, &mut buf);
        assert_eq!(
            split_startup(&mut buf, MAX),
            Ok(Some(StartupPacket::Startup {
                minor: 0,
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())],
            }))
        );
        assert_eq!(split_startup(&mut buf, MAX), Ok(Some(StartupPacket::Ssl)));
        assert_eq!(
            split_startup(&mut buf, MAX),
            Ok(Some(StartupPacket::Cancel(Bytes::from_static(&[
                0, 0, 0, 1, 0, 0, 0, 2
            ]))))
        );
        assert_eq!(split_startup(&mut buf, MAX), Ok(None));
        let mut v2 = BytesMut::from(&[0, 0, 0, 8, 0, 2, 0, 0][..]);
        assert_eq!(
            split_startup(&mut v2, MAX),
            Ok(Some(StartupPacket::Unsupported(2 << 16)))
        );
    }

    #[test]
    fn truncated_input_waits_for_more() {
        let mut whole = BytesMut::new();
        pg::query("SELECT 1", &mut whole).unwrap();
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(split_message(&mut part, MAX), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn lengths_are_checked_before_buffering() {
        // Announces 1 GiB: refused from the header alone.
        let mut huge = BytesMut::from(&[b'Q', 0x40, 0, 0, 0][..]);
        assert!(matches!(
            split_message(&mut huge, MAX),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut huge = BytesMut::from(&b"GET / HTTP/1.1"[..]);
        assert!(matches!(
            split_startup(&mut huge, MAX),
            Err(ProtocolError::TooLarge { .. })
        ));
        for len in [i32::MIN, -1, 0, 3] {
            let mut bad = BytesMut::from(&[b'S'][..]);
            bad.extend_from_slice(&len.to_be_bytes());
            assert_eq!(
                split_message(&mut bad, MAX),
                Err(ProtocolError::BadLength(len))
            );
        }
        let mut exact = BytesMut::new();
        pg::query(&"x".repeat(MAX - 6), &mut exact).unwrap();
        assert_eq!(exact.len(), MAX);
        assert!(split_message(&mut exact.clone(), MAX).unwrap().is_some());
        assert!(split_message(&mut exact, MAX - 1).is_err());
    }
}
