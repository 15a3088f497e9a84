//! The auth endpoint's query phase: session settings, health probes, and the auth query
//! through the extended protocol ([`super::extended`]).

use super::TokenLookup;
use super::extended::{Portal, Statement};
use super::frontend::{self, FrontendMessage};
use super::session::Shared;
use super::sql::{parse_set, split_statements};
use crate::wire::backend::{self, Column, INT4_OID};
use crate::wire::conn::{Conn, End};
use crate::wire::framing::ProtocolError;
use bytes::BytesMut;
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

/// Session parameters reported to the client. PgBouncer remembers them per server
/// connection and sends `SET` for those a logging-in client wants otherwise.
const REPORTED: [(&str, &str); 9] = [
    ("server_version", "16.0 (aws-pgbouncer)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("application_name", ""),
];

/// Of [`REPORTED`], those a client may set (in the startup packet or with `SET`): their new
/// value is reported back, as PostgreSQL does, so PgBouncer does not send the same `SET` again.
const SETTABLE: [&str; 5] = [
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "application_name",
];

/// Prepared statements and portals a session may hold at once; PgBouncer uses one of each.
pub(super) const MAX_OBJECTS: usize = 16;
/// Output is written out at this size even before a Sync, so a client that pipelines many
/// Describes without Sync cannot make the session buffer without bound.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// The query phase: session settings, prepared statements and portals.
pub(super) struct Queries<'a, L> {
    pub(super) shared: &'a Shared<L>,
    pub(super) database: String,
    settings: Vec<(&'static str, String)>,
    pub(super) statements: HashMap<String, Statement>,
    pub(super) portals: HashMap<String, Portal>,
    /// After an error in an extended-protocol batch, everything up to Sync is skipped.
    failed: bool,
}

/// An error inside the query phase: reported, and the session goes on.
pub(super) struct QueryError(pub(super) SqlState, pub(super) String);

impl<'a, L: TokenLookup> Queries<'a, L> {
    pub(super) fn new(shared: &'a Shared<L>, database: String) -> Self {
        Self {
            shared,
            database,
            settings: REPORTED.iter().map(|&(k, v)| (k, v.to_owned())).collect(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            failed: false,
        }
    }

    /// Records a setting the client asked for; `false` if it is not one the endpoint keeps.
    pub(super) fn startup_setting(&mut self, name: &str, value: &str) -> bool {
        let Some(canonical) = SETTABLE.iter().find(|s| s.eq_ignore_ascii_case(name)) else {
            return false;
        };
        if let Some(slot) = self.settings.iter_mut().find(|(k, _)| k == canonical) {
            slot.1 = value.to_owned();
        }
        true
    }

    pub(super) fn welcome(&self, out: &mut BytesMut) {
        for (name, value) in &self.settings {
            backend::parameter_status(out, name, value);
        }
        backend::backend_key_data(out, rand::random::<i32>() & i32::MAX, rand::random());
        backend::ready_for_query(out);
    }

    pub(super) async fn serve<S>(&mut self, conn: &mut Conn<S>, shutdown: &CancellationToken) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = self.shared.config.limits.idle_timeout;
        // PostgreSQL writes its answers out at ReadyForQuery and Flush; so does this, and
        // also when output piles up. The welcome goes out first.
        let mut flush = true;
        loop {
            if flush || conn.wbuf.len() > MAX_PENDING_OUTPUT {
                match timeout(idle, conn.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Io(e),
                    Err(_) => return End::IdleTimeout,
                }
            }
            let next = tokio::select! {
                next = timeout(idle, conn.read_message()) => next,
                () = shutdown.cancelled() => return End::Shutdown,
            };
            let (tag, body) = match next {
                Ok(Ok(message)) => message,
                Ok(Err(end)) => return end,
                Err(_) => return End::IdleTimeout,
            };
            let message = match frontend::decode(tag, body) {
                Ok(FrontendMessage::Password(_)) => return ProtocolError::UnknownType(b'p').into(),
                Ok(message) => message,
                Err(e) => return e.into(),
            };
            flush = matches!(
                message,
                FrontendMessage::Sync | FrontendMessage::Flush | FrontendMessage::Query(_)
            );
            match message {
                FrontendMessage::Terminate => return End::Quiet,
                FrontendMessage::Sync => {
                    self.portals.clear();
                    self.failed = false;
                    backend::ready_for_query(&mut conn.wbuf);
                }
                _ if self.failed => {}
                FrontendMessage::Flush => {}
                FrontendMessage::Query(sql) => {
                    self.simple_query(&sql, &mut conn.wbuf);
                    backend::ready_for_query(&mut conn.wbuf);
                }
                extended => {
                    if let Err(QueryError(code, text)) =
                        self.extended(extended, &mut conn.wbuf).await
                    {
                        backend::error_response(&mut conn.wbuf, "ERROR", &code, &text);
                        self.failed = true;
                    }
                }
            }
        }
    }

    fn simple_query(&mut self, sql: &str, out: &mut BytesMut) {
        let statements = split_statements(sql);
        if statements.is_empty() {
            backend::empty_query_response(out);
            return;
        }
        for statement in statements {
            let words: Vec<String> = statement
                .split_whitespace()
                .map(|w| w.to_ascii_lowercase())
                .collect();
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            match words.as_slice() {
                ["select", "1"] => {
                    backend::row_description(
                        out,
                        &[Column {
                            name: "?column?",
                            type_oid: INT4_OID,
                            type_len: 4,
                            format: 0,
                        }],
                    );
                    backend::data_row(out, &[b"1"]);
                    backend::command_complete(out, "SELECT 1");
                }
                ["set", ..] => {
                    if let Some((name, value)) = parse_set(statement)
                        && self.startup_setting(name, &value)
                    {
                        backend::parameter_status(out, canonical(name), &value);
                    }
                    backend::command_complete(out, "SET");
                }
                ["reset", "all"] => backend::command_complete(out, "RESET"),
                ["discard", "all"] | ["deallocate", "all"] => {
                    self.statements.clear();
                    let tag = if words[0] == "discard" {
                        "DISCARD ALL"
                    } else {
                        "DEALLOCATE ALL"
                    };
                    backend::command_complete(out, tag);
                }
                _ => {
                    backend::error_response(
                        out,
                        "ERROR",
                        &SqlState::FEATURE_NOT_SUPPORTED,
                        "the auth endpoint answers only its auth_query and SELECT 1",
                    );
                    return;
                }
            }
        }
    }
}

fn canonical(name: &str) -> &'static str {
    SETTABLE
        .iter()
        .find(|s| s.eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("")
}
