//! Serializers for the server messages the endpoint and the relay send.
//!
//! postgres-protocol only parses these (it is a client library), so they are written here;
//! the tests parse every one of them back with postgres-protocol's own parser.

use bytes::{BufMut, BytesMut};
use tokio_postgres::error::SqlState;

/// Type OIDs from pg_type.
pub const TEXT_OID: u32 = 25;
pub const INT4_OID: u32 = 23;

/// One column of a RowDescription.
pub struct Column<'a> {
    pub name: &'a str,
    pub type_oid: u32,
    /// Size in bytes, -1 for variable length (pg_type.typlen).
    pub type_len: i16,
    /// 0 text, 1 binary; 0 when not yet known (Describe of a statement).
    pub format: i16,
}

/// Appends a message: its type byte, then a length that counts itself, then what `body`
/// writes.
pub(crate) fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(out: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the other side; none of the strings the
    // endpoint sends can hold one, but cut there rather than send a broken frame.
    out.put_slice(s.split('\0').next().unwrap_or_default().as_bytes());
    out.put_u8(0);
}

pub fn authentication_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

/// Asks for the password in clear text: what the password-limit probe wants to measure.
pub fn authentication_cleartext_password(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(3));
}

pub fn authentication_sasl(out: &mut BytesMut, mechanism: &str) {
    message(out, b'R', |b| {
        b.put_i32(10);
        cstr(b, mechanism);
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(out, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn negotiate_protocol_version(out: &mut BytesMut, minor: i32, unrecognized: &[&str]) {
    message(out, b'v', |b| {
        b.put_i32((3 << 16) | minor);
        b.put_i32(i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
        for option in unrecognized {
            cstr(b, option);
        }
    });
}

/// The endpoint never holds a transaction open, so the status is always idle ('I'), after a
/// failed extended-protocol batch too: its Sync ends the implicit transaction.
pub fn ready_for_query(out: &mut BytesMut) {
    message(out, b'Z', |b| b.put_u8(b'I'));
}

/// An ErrorResponse. `severity` is ERROR (session goes on) or FATAL (session ends). The
/// SQLSTATE is a required [`SqlState`]: PgBouncer before 1.25.2 crashes on an error without.
pub fn error_response(out: &mut BytesMut, severity: &str, code: &SqlState, text: &str) {
    message(out, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, severity);
        b.put_u8(b'V');
        cstr(b, severity);
        b.put_u8(b'C');
        cstr(b, code.code());
        b.put_u8(b'M');
        cstr(b, text);
        b.put_u8(0);
    });
}

pub fn parse_complete(out: &mut BytesMut) {
    message(out, b'1', |_| {});
}

pub fn bind_complete(out: &mut BytesMut) {
    message(out, b'2', |_| {});
}

pub fn close_complete(out: &mut BytesMut) {
    message(out, b'3', |_| {});
}

pub fn empty_query_response(out: &mut BytesMut) {
    message(out, b'I', |_| {});
}

pub fn parameter_description(out: &mut BytesMut, types: &[u32]) {
    message(out, b't', |b| {
        b.put_i16(i16::try_from(types.len()).unwrap_or(i16::MAX));
        for &oid in types {
            b.put_u32(oid);
        }
    });
}

pub fn row_description(out: &mut BytesMut, columns: &[Column<'_>]) {
    message(out, b'T', |b| {
        b.put_i16(i16::try_from(columns.len()).unwrap_or(i16::MAX));
        for column in columns {
            cstr(b, column.name);
            b.put_u32(0); // table OID: not a table column
            b.put_i16(0); // attribute number
            b.put_u32(column.type_oid);
            b.put_i16(column.type_len);
            b.put_i32(-1); // type modifier
            b.put_i16(column.format);
        }
    });
}

/// A DataRow of non-NULL values. Text and binary encodings of text and of the int4 the
/// endpoint sends differ, so each value arrives already encoded.
pub fn data_row(out: &mut BytesMut, values: &[&[u8]]) {
    message(out, b'D', |b| {
        b.put_i16(i16::try_from(values.len()).unwrap_or(i16::MAX));
        for value in values {
            b.put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
            b.put_slice(value);
        }
    });
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |b| cstr(b, tag));
}

#[cfg(test)]
mod tests {
    use super::*;
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;

    /// Every message, written here and parsed back by postgres-protocol (tokio-postgres's parser).
    #[test]
    fn postgres_protocol_parses_what_is_written() {
        let mut out = BytesMut::new();
        authentication_sasl(&mut out, "SCRAM-SHA-256");
        authentication_sasl_continue(&mut out, b"r=abc,s=c2FsdA==,i=4096");
        authentication_sasl_final(&mut out, b"v=sig");
        authentication_ok(&mut out);
        parameter_status(&mut out, "server_version", "16.0");
        backend_key_data(&mut out, 7, 9);
        parse_complete(&mut out);
        bind_complete(&mut out);
        close_complete(&mut out);
        parameter_description(&mut out, &[TEXT_OID]);
        let column = |name| Column {
            name,
            type_oid: TEXT_OID,
            type_len: -1,
            format: 1,
        };
        row_description(&mut out, &[column("usename"), column("passwd")]);
        data_row(&mut out, &[b"alice", b"token"]);
        command_complete(&mut out, "SELECT 1");
        empty_query_response(&mut out);
        error_response(&mut out, "ERROR", &SqlState::FEATURE_NOT_SUPPORTED, "nope");
        ready_for_query(&mut out);

        let mut next = || Message::parse(&mut out).unwrap().unwrap();
        let Message::AuthenticationSasl(m) = next() else {
            panic!()
        };
        assert_eq!(
            m.mechanisms().collect::<Vec<_>>().unwrap(),
            ["SCRAM-SHA-256"]
        );
        let Message::AuthenticationSaslContinue(m) = next() else {
            panic!()
        };
        assert_eq!(m.data(), b"r=abc,s=c2FsdA==,i=4096");
        let Message::AuthenticationSaslFinal(m) = next() else {
            panic!()
        };
        assert_eq!(m.data(), b"v=sig");
        assert!(matches!(next(), Message::AuthenticationOk));
        let Message::ParameterStatus(m) = next() else {
            panic!()
        };
        assert_eq!(
            (m.name().unwrap(), m.value().unwrap()),
            ("server_version", "16.0")
        );
        let Message::BackendKeyData(m) = next() else {
            panic!()
        };
        assert_eq!((m.process_id(), m.secret_key()), (7, 9));
        assert!(matches!(next(), Message::ParseComplete));
        assert!(matches!(next(), Message::BindComplete));
        assert!(matches!(next(), Message::CloseComplete));
        let Message::ParameterDescription(m) = next() else {
            panic!()
        };
        assert_eq!(m.parameters().collect::<Vec<_>>().unwrap(), [TEXT_OID]);
        let Message::RowDescription(m) = next() else {
            panic!()
        };
        let fields: Vec<_> = m
            .fields()
            .map(|f| Ok((f.name().to_owned(), f.type_oid(), f.format())))
            .collect()
            .unwrap();
        assert_eq!(
            fields,
            [
                ("usename".into(), TEXT_OID, 1),
                ("passwd".into(), TEXT_OID, 1)
            ]
        );
        let Message::DataRow(m) = next() else {
            panic!()
        };
        let values: Vec<_> = m
            .ranges()
            .map(|r| Ok(m.buffer()[r.unwrap()].to_vec()))
            .collect()
            .unwrap();
        assert_eq!(values, [b"alice".to_vec(), b"token".to_vec()]);
        let Message::CommandComplete(m) = next() else {
            panic!()
        };
        assert_eq!(m.tag().unwrap(), "SELECT 1");
        assert!(matches!(next(), Message::EmptyQueryResponse));
        let Message::ErrorResponse(m) = next() else {
            panic!()
        };
        let fields: Vec<_> = m
            .fields()
            .map(|f| Ok((f.type_(), f.value_bytes().to_vec())))
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'C', b"0A000".to_vec())));
        let Message::ReadyForQuery(m) = next() else {
            panic!()
        };
        assert_eq!(m.status(), b'I');
        assert!(out.is_empty());
    }
}
