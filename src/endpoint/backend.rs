//! Serializers for the server messages the endpoint sends.
//!
//! postgres-protocol only parses these (it is a client library), so they are written here;
//! the tests parse every one of them back with postgres-protocol's own parser.

use bytes::{BufMut, BytesMut};

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
fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
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

/// An ErrorResponse. `severity` is ERROR (session goes on) or FATAL (session ends).
pub fn error_response(out: &mut BytesMut, severity: &str, code: &str, text: &str) {
    message(out, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, severity);
        b.put_u8(b'V');
        cstr(b, severity);
        b.put_u8(b'C');
        cstr(b, code);
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
