//! The extended protocol as PgBouncer's auth_query uses it: Parse, Bind, Describe, Execute
//! and Close of a statement whose only parameter is the user name.

use super::frontend::{FrontendMessage, Target};
use super::queries::{MAX_OBJECTS, Queries, QueryError};
use super::sql::max_placeholder;
use super::{Lookup, TokenLookup};
use crate::wire::backend::{self, Column, TEXT_OID};
use bytes::BytesMut;
use secrecy::ExposeSecret;
use tokio::time::timeout;
use tokio_postgres::error::SqlState;

pub(super) struct Statement {
    param_type: u32,
}

pub(super) struct Portal {
    /// `None` when the parameter is NULL or not UTF-8: no user has such a name.
    user: Option<String>,
    formats: [i16; 2],
    done: bool,
}

impl<L: TokenLookup> Queries<'_, L> {
    pub(super) async fn extended(
        &mut self,
        message: FrontendMessage,
        out: &mut BytesMut,
    ) -> Result<(), QueryError> {
        match message {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => {
                if !name.is_empty() && self.statements.contains_key(&name) {
                    return Err(QueryError(
                        SqlState::DUPLICATE_PSTATEMENT,
                        format!("prepared statement \"{name}\" already exists"),
                    ));
                }
                if max_placeholder(&query) != 1 || param_types.len() > 1 {
                    return Err(QueryError(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "the auth endpoint answers only its auth_query: a statement whose only parameter is $1".into(),
                    ));
                }
                let param_type = match param_types.first() {
                    None | Some(0) => TEXT_OID,
                    Some(&oid) if STRING_TYPES.contains(&oid) => oid,
                    Some(oid) => {
                        return Err(QueryError(
                            SqlState::DATATYPE_MISMATCH,
                            format!("parameter $1 must be a string type, not OID {oid}"),
                        ));
                    }
                };
                if !name.is_empty() && self.statements.len() >= MAX_OBJECTS {
                    return Err(QueryError(
                        SqlState::PROGRAM_LIMIT_EXCEEDED,
                        "too many prepared statements".into(),
                    ));
                }
                self.statements.insert(name, Statement { param_type });
                backend::parse_complete(out);
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                if !self.statements.contains_key(&statement) {
                    return Err(QueryError(
                        SqlState::INVALID_SQL_STATEMENT_NAME,
                        format!("prepared statement \"{statement}\" does not exist"),
                    ));
                }
                if params.len() != 1 {
                    return Err(QueryError(
                        SqlState::PROTOCOL_VIOLATION,
                        format!(
                            "bind message supplies {} parameters, but prepared statement \"{statement}\" requires 1",
                            params.len()
                        ),
                    ));
                }
                if param_formats.len() > 1 || param_formats.iter().any(|&f| f != 0 && f != 1) {
                    return Err(QueryError(
                        SqlState::PROTOCOL_VIOLATION,
                        "invalid parameter format codes".into(),
                    ));
                }
                let formats = match result_formats.as_slice() {
                    [] => [0, 0],
                    &[f] => [f, f],
                    &[a, b] => [a, b],
                    _ => {
                        return Err(QueryError(
                            SqlState::PROTOCOL_VIOLATION,
                            format!(
                                "bind message has {} result formats but query has 2 columns",
                                result_formats.len()
                            ),
                        ));
                    }
                };
                if formats.iter().any(|&f| f != 0 && f != 1) {
                    return Err(QueryError(
                        SqlState::PROTOCOL_VIOLATION,
                        "invalid result format codes".into(),
                    ));
                }
                if !portal.is_empty() && self.portals.contains_key(&portal) {
                    return Err(QueryError(
                        SqlState::DUPLICATE_CURSOR,
                        format!("cursor \"{portal}\" already exists"),
                    ));
                }
                if !portal.is_empty() && self.portals.len() >= MAX_OBJECTS {
                    return Err(QueryError(
                        SqlState::PROGRAM_LIMIT_EXCEEDED,
                        "too many portals".into(),
                    ));
                }
                // Text and binary forms of a string are the same bytes.
                let user = params
                    .into_iter()
                    .next()
                    .flatten()
                    .and_then(|v| String::from_utf8(v.to_vec()).ok());
                self.portals.insert(
                    portal,
                    Portal {
                        user,
                        formats,
                        done: false,
                    },
                );
                backend::bind_complete(out);
            }
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } => {
                let statement = self.statements.get(&name).ok_or_else(|| {
                    QueryError(
                        SqlState::INVALID_SQL_STATEMENT_NAME,
                        format!("prepared statement \"{name}\" does not exist"),
                    )
                })?;
                backend::parameter_description(out, &[statement.param_type]);
                row_description(out, [0, 0]);
            }
            FrontendMessage::Describe {
                target: Target::Portal,
                name,
            } => {
                let portal = self.portals.get(&name).ok_or_else(|| no_portal(&name))?;
                row_description(out, portal.formats);
            }
            FrontendMessage::Execute { portal, .. } => {
                let portal = self
                    .portals
                    .get_mut(&portal)
                    .ok_or_else(|| no_portal(&portal))?;
                // A portal yields its row once; executing it again finds nothing more.
                let user = if portal.done {
                    None
                } else {
                    portal.user.clone()
                };
                portal.done = true;
                match user {
                    Some(user) => self.answer(&user, out).await?,
                    None => backend::command_complete(out, "SELECT 0"),
                }
            }
            FrontendMessage::Close { target, name } => {
                // Closing what does not exist is not an error.
                match target {
                    Target::Statement => drop(self.statements.remove(&name)),
                    Target::Portal => drop(self.portals.remove(&name)),
                }
                backend::close_complete(out);
            }
            FrontendMessage::Query(_)
            | FrontendMessage::Sync
            | FrontendMessage::Flush
            | FrontendMessage::Terminate
            | FrontendMessage::Password(_) => {}
        }
        Ok(())
    }

    /// Looks the user up and writes the auth query's answer.
    async fn answer(&self, user: &str, out: &mut BytesMut) -> Result<(), QueryError> {
        let database = &self.database;
        let limits = &self.shared.config.limits;
        let answer = timeout(
            limits.lookup_timeout,
            self.shared.lookup.lookup(database, user),
        )
        .await
        .map_err(|_| {
            QueryError(
                SqlState::QUERY_CANCELED,
                format!("token lookup for user \"{user}\" timed out"),
            )
        })?;
        match answer {
            Lookup::Token(token) => {
                let token = token.expose_secret();
                let limit = self.shared.lookup.password_limit();
                if !limit.admits(token.len()) {
                    // PgBouncer would cut it short, and the login to RDS would fail later,
                    // far from the cause.
                    return Err(QueryError(
                        SqlState::STRING_DATA_RIGHT_TRUNCATION,
                        format!("token for user \"{user}\" is longer than PgBouncer's {limit}"),
                    ));
                }
                backend::data_row(out, &[user.as_bytes(), token.as_bytes()]);
                backend::command_complete(out, "SELECT 1");
            }
            Lookup::NoSuchUser => backend::command_complete(out, "SELECT 0"),
            Lookup::UnknownDatabase => {
                return Err(QueryError(
                    SqlState::INVALID_CATALOG_NAME,
                    format!("database \"{database}\" does not exist"),
                ));
            }
            Lookup::Unavailable(reason) => {
                tracing::warn!(user, database, reason, "no token to answer the auth query");
                return Err(QueryError(
                    SqlState::SYSTEM_ERROR,
                    format!("no token for user \"{user}\": {reason}"),
                ));
            }
        }
        Ok(())
    }
}

fn no_portal(name: &str) -> QueryError {
    QueryError(
        SqlState::INVALID_CURSOR_NAME,
        format!("portal \"{name}\" does not exist"),
    )
}

/// text, varchar, bpchar, name: the types a user name may be declared as.
const STRING_TYPES: [u32; 4] = [25, 1043, 1042, 19];

/// The auth query's result shape, as pg_shadow's (usename, passwd) but both as text.
fn row_description(out: &mut BytesMut, formats: [i16; 2]) {
    let column = |name, format| Column {
        name,
        type_oid: TEXT_OID,
        type_len: -1,
        format,
    };
    backend::row_description(
        out,
        &[column("usename", formats[0]), column("passwd", formats[1])],
    );
}
