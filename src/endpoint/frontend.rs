//! Decoding of the query-phase messages PgBouncer sends the auth endpoint (the extended
//! protocol, simple queries). Framing is the wire layer's ([`crate::wire::framing`]); like it,
//! nothing here panics on hostile bytes.

use crate::wire::framing::{ProtocolError, get_count, get_cstr, get_i16, get_i32, get_value};
use bytes::{Buf, Bytes};

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

fn get_formats(body: &mut Bytes) -> Result<Vec<i16>, ProtocolError> {
    let count = get_count(body, 2)?;
    (0..count).map(|_| get_i16(body)).collect()
}

fn get_target(body: &mut Bytes) -> Result<Target, ProtocolError> {
    match body.try_get_u8() {
        Ok(b'S') => Ok(Target::Statement),
        Ok(b'P') => Ok(Target::Portal),
        _ => Err(ProtocolError::Malformed("target must be 'S' or 'P'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::framing::{decode_sasl_initial, split_message};
    use bytes::BytesMut;
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
