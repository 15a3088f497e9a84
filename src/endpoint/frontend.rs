//! Framing and decoding of the messages a client sends.
//!
//! Everything here works on bytes already in memory and never panics: a length that lies, a
//! count that promises more fields than the body holds, or a string without its NUL all come
//! back as a [`ProtocolError`]. Each frame is checked against the size limit as soon as its
//! header is in, so a hostile length never makes the session buffer more than the limit.

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

/// Which object a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// A decoded regular message (one with a type byte).
#[derive(Debug, PartialEq, Eq)]
pub enum FrontendMessage {
    Query(String),
    Parse {
        name: String,
        query: String,
        param_types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        param_formats: Vec<i16>,
        /// `None` is SQL NULL.
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    },
    Describe {
        target: Target,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        target: Target,
        name: String,
    },
    Sync,
    Flush,
    Terminate,
    /// 'p': its meaning (password, SASLInitialResponse, SASLResponse) depends on the
    /// authentication step, so the body is decoded there.
    Password(Bytes),
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
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(prefix + 4);
    Ok(Some(frame.freeze()))
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

/// Decodes the body of a typed message. Types the endpoint never accepts are `UnknownType`.
pub fn decode(tag: u8, mut body: Bytes) -> Result<FrontendMessage, ProtocolError> {
    let message = match tag {
        b'Q' => FrontendMessage::Query(get_cstr(&mut body)?),
        b'P' => {
            let name = get_cstr(&mut body)?;
            let query = get_cstr(&mut body)?;
            let count = get_count(&mut body, 4)?;
            let param_types = (0..count)
                .map(|_| get_i32(&mut body).map(|oid| oid as u32))
                .collect::<Result<_, _>>()?;
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            }
        }
        b'B' => {
            let portal = get_cstr(&mut body)?;
            let statement = get_cstr(&mut body)?;
            let param_formats = get_formats(&mut body)?;
            let count = get_count(&mut body, 4)?;
            let params = (0..count)
                .map(|_| get_value(&mut body))
                .collect::<Result<_, _>>()?;
            let result_formats = get_formats(&mut body)?;
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            }
        }
        b'D' => {
            let target = get_target(&mut body)?;
            FrontendMessage::Describe {
                target,
                name: get_cstr(&mut body)?,
            }
        }
        b'E' => FrontendMessage::Execute {
            portal: get_cstr(&mut body)?,
            max_rows: get_i32(&mut body)?,
        },
        b'C' => {
            let target = get_target(&mut body)?;
            FrontendMessage::Close {
                target,
                name: get_cstr(&mut body)?,
            }
        }
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'X' => FrontendMessage::Terminate,
        b'p' => return Ok(FrontendMessage::Password(body)),
        other => return Err(ProtocolError::UnknownType(other)),
    };
    if body.is_empty() {
        Ok(message)
    } else {
        Err(ProtocolError::Malformed(
            "trailing bytes after message fields",
        ))
    }
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

fn get_i32(body: &mut Bytes) -> Result<i32, ProtocolError> {
    body.try_get_i32()
        .map_err(|_| ProtocolError::Malformed("truncated integer"))
}

fn get_i16(body: &mut Bytes) -> Result<i16, ProtocolError> {
    body.try_get_i16()
        .map_err(|_| ProtocolError::Malformed("truncated integer"))
}

/// A 16-bit element count, checked against what the body can still hold so that a lying
/// count fails before anything is allocated for it.
fn get_count(body: &mut Bytes, min_element_bytes: usize) -> Result<usize, ProtocolError> {
    let count = usize::from(
        body.try_get_u16()
            .map_err(|_| ProtocolError::Malformed("truncated count"))?,
    );
    if count * min_element_bytes > body.len() {
        return Err(ProtocolError::Malformed("count exceeds message length"));
    }
    Ok(count)
}

fn get_formats(body: &mut Bytes) -> Result<Vec<i16>, ProtocolError> {
    let count = get_count(body, 2)?;
    (0..count).map(|_| get_i16(body)).collect()
}

/// A length-prefixed value; length -1 is NULL.
fn get_value(body: &mut Bytes) -> Result<Option<Bytes>, ProtocolError> {
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

fn get_target(body: &mut Bytes) -> Result<Target, ProtocolError> {
    match body.try_get_u8() {
        Ok(b'S') => Ok(Target::Statement),
        Ok(b'P') => Ok(Target::Portal),
        _ => Err(ProtocolError::Malformed("target must be 'S' or 'P'")),
    }
}

/// A NUL-terminated UTF-8 string (the session announces client_encoding UTF8).
fn get_cstr(body: &mut Bytes) -> Result<String, ProtocolError> {
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
    use postgres_protocol::IsNull;
    use postgres_protocol::message::frontend as pg;

    const MAX: usize = 8 * 1024;

    fn one(bytes: &BytesMut) -> FrontendMessage {
        let mut buf = bytes.clone();
        let (tag, body) = split_message(&mut buf, MAX).unwrap().unwrap();
        assert!(buf.is_empty());
        decode(tag, body).unwrap()
    }

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
    fn extended_protocol_messages() {
        let mut buf = BytesMut::new();
        pg::parse("s", "SELECT $1", [25], &mut buf).unwrap();
        assert_eq!(
            one(&buf),
            FrontendMessage::Parse {
                name: "s".into(),
                query: "SELECT $1".into(),
                param_types: vec![25],
            }
        );
        let mut buf = BytesMut::new();
        pg::bind(
            "p",
            "s",
            [1],
            [Some("alice"), None],
            |v, out| match v {
                Some(v) => {
                    out.extend_from_slice(v.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            [0, 1],
            &mut buf,
        )
        .map_err(|_| "bind")
        .unwrap();
        assert_eq!(
            one(&buf),
            FrontendMessage::Bind {
                portal: "p".into(),
                statement: "s".into(),
                param_formats: vec![1],
                params: vec![Some(Bytes::from_static(b"alice")), None],
                result_formats: vec![0, 1],
            }
        );
        let mut buf = BytesMut::new();
        pg::describe(b'P', "p", &mut buf).unwrap();
        assert_eq!(
            one(&buf),
            FrontendMessage::Describe {
                target: Target::Portal,
                name: "p".into()
            }
        );
        let mut buf = BytesMut::new();
        pg::execute("p", 7, &mut buf).unwrap();
        assert_eq!(
            one(&buf),
            FrontendMessage::Execute {
                portal: "p".into(),
                max_rows: 7
            }
        );
        for (write, expected) in [
            (pg::sync as fn(&mut BytesMut), FrontendMessage::Sync),
            (pg::flush, FrontendMessage::Flush),
            (pg::terminate, FrontendMessage::Terminate),
        ] {
            let mut buf = BytesMut::new();
            write(&mut buf);
            assert_eq!(one(&buf), expected);
        }
        let mut buf = BytesMut::new();
        pg::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x", &mut buf).unwrap();
        let FrontendMessage::Password(body) = one(&buf) else {
            panic!("'p' expected")
        };
        assert_eq!(
            decode_sasl_initial(body),
            Ok(("SCRAM-SHA-256".into(), Bytes::from_static(b"n,,n=,r=x")))
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

    #[test]
    fn malformed_bodies() {
        let cases: [(u8, &[u8]); 10] = [
            (b'Q', b"no terminator"),
            (b'Q', b"a\0trailing"),
            (b'Q', b"\xff\0"),
            (b'E', b"\0\0\0"),
            (b'D', b"X\0"),
            (b'C', b""),
            // Parse that promises 65535 parameter types and has none.
            (b'P', b"\0q\0\xff\xff"),
            // Bind with a value length past the end.
            (b'B', b"\0\0\0\0\0\x01\0\0\x10\0ab"),
            (b'B', b"\0\0\0\0\0\x01\xff\xff\xff\xfe"),
            (b'S', b"x"),
        ];
        for (tag, body) in cases {
            assert!(
                matches!(
                    decode(tag, Bytes::copy_from_slice(body)),
                    Err(ProtocolError::Malformed(_))
                ),
                "{} {body:?}",
                tag as char
            );
        }
    }

    #[test]
    fn unknown_types_are_refused() {
        for tag in [b'F', b'd', b'c', b'f', 0, 0xff] {
            assert_eq!(
                decode(tag, Bytes::new()),
                Err(ProtocolError::UnknownType(tag))
            );
        }
    }
}
