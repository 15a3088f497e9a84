//! What an entry's kind changes. Aurora DSQL entries default to DSQL's one database, may have
//! longer-lived tokens, and must have PgBouncer close its server connections before DSQL ends
//! the session: DSQL ends every session after an hour, in use or not.

use super::{Database, Mode, TlsMode};
use crate::token::TokenKind;

/// The database every DSQL cluster has, and the only one.
const DSQL_DBNAME: &str = "postgres";

/// DSQL ends every session this long after its login.
const DSQL_SESSION_SECS: u64 = 3600;

/// The longest `server_lifetime` a DSQL entry may have. PgBouncer closes server connections
/// past their `server_lifetime` one at a time, `server_lifetime / pool_size` apart (`life_over`
/// in objects.c, 1.23 to 1.25), so of a pool opened at once the last goes almost another
/// `server_lifetime` later: only half an hour keeps every one of them inside DSQL's hour.
const DSQL_MAX_SERVER_LIFETIME: u64 = DSQL_SESSION_SECS / 2;

/// The daemon's `server_lifetime` for DSQL entries: 25 minutes, so that even the last
/// connection of such a pool is closed by 50 minutes, with time to spare for PgBouncer's
/// janitor and a transaction in flight.
const DSQL_SERVER_LIFETIME: u64 = 1500;
const _: () = assert!(DSQL_SERVER_LIFETIME <= DSQL_MAX_SERVER_LIFETIME);

/// The entry's database: given, or DSQL's `postgres`; RDS entries must name theirs.
pub(super) fn dbname(kind: TokenKind, host: &str, given: Option<String>) -> Result<String, String> {
    match (given, kind) {
        (Some(dbname), _) => Ok(dbname),
        (None, TokenKind::Dsql) => Ok(DSQL_DBNAME.to_owned()),
        (None, TokenKind::Rds) => Err(format!(
            "database entry for host {host}: dbname is missing (the database on the server; \
             only kind = \"dsql\" entries default to {DSQL_DBNAME})"
        )),
    }
}

/// The entry's `[databases]` options with what its kind needs: for DSQL a `server_lifetime`
/// inside DSQL's session limit, the user's if it is one, else the daemon's.
pub(super) fn session_options(
    name: &str,
    kind: TokenKind,
    mut options: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, String> {
    if kind == TokenKind::Rds {
        return Ok(options);
    }
    match options.iter().find(|(key, _)| key == "server_lifetime") {
        Some((_, value)) => check_dsql_server_lifetime(name, value)?,
        None => options.push((
            "server_lifetime".to_owned(),
            DSQL_SERVER_LIFETIME.to_string(),
        )),
    }
    Ok(options)
}

fn check_dsql_server_lifetime(name: &str, value: &str) -> Result<(), String> {
    let seconds: u64 = value
        .parse()
        .map_err(|_| format!("database {name}: server_lifetime {value:?} is not whole seconds"))?;
    if seconds == 0 {
        return Err(format!(
            "database {name}: server_lifetime 0 in a [databases] entry means PgBouncer's global \
             server_lifetime (3600 s unless set), which Aurora DSQL's one-hour sessions do not \
             outlast; use 1 to {DSQL_MAX_SERVER_LIFETIME}, or leave it out for \
             {DSQL_SERVER_LIFETIME}"
        ));
    }
    if seconds > DSQL_MAX_SERVER_LIFETIME {
        return Err(format!(
            "database {name}: server_lifetime {seconds} s is too long for Aurora DSQL, which \
             ends every session after {DSQL_SESSION_SECS} s: PgBouncer closes connections past \
             server_lifetime one at a time, the last up to another server_lifetime later; use \
             1 to {DSQL_MAX_SERVER_LIFETIME}, or leave it out for {DSQL_SERVER_LIFETIME}"
        ));
    }
    Ok(())
}

/// The settings every entry shares, against each entry's kind: the token lifetime against its
/// service's limit, and TLS, without which DSQL takes no connection.
pub(super) fn check_entries(
    token_lifetime: u64,
    mode: Mode,
    tls: TlsMode,
    databases: &[Database],
) -> Result<(), String> {
    if token_lifetime == 0 {
        return Err("token lifetime 0 s is out of range: at least 1 second".to_owned());
    }
    for database in databases {
        let kind = database.target.kind;
        let max = kind.max_expires_in_secs();
        if token_lifetime > max {
            return Err(format!(
                "token lifetime {token_lifetime} s is out of range for database {}: {} accepts \
                 1 to {max} seconds (Aurora DSQL entries up to {})",
                database.name,
                kind.service_name(),
                TokenKind::Dsql.max_expires_in_secs()
            ));
        }
        // In passthrough mode the relay, always TLS, connects to the server.
        if kind == TokenKind::Dsql && tls == TlsMode::Disable && mode != Mode::Passthrough {
            return Err(format!(
                "database {}: Aurora DSQL takes TLS connections only, and server TLS mode \
                 disable never starts TLS; use verify-full (the default) with Amazon's root CAs \
                 in --server-ca-file",
                database.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifetime_option(value: Option<&str>) -> Result<Vec<(String, String)>, String> {
        let mut options = vec![("pool_size".to_owned(), "5".to_owned())];
        if let Some(value) = value {
            options.push(("server_lifetime".to_owned(), value.to_owned()));
        }
        session_options("app", TokenKind::Dsql, options)
    }

    #[test]
    fn dsql_entries_get_a_server_lifetime_well_inside_the_hour() {
        let options = lifetime_option(None).unwrap();
        assert_eq!(options[1], ("server_lifetime".into(), "1500".into()));
        for fine in ["1", "600", "1800"] {
            let options = lifetime_option(Some(fine)).unwrap();
            assert_eq!(options.len(), 2, "{fine}: the user's value stands alone");
        }
        let rds = session_options("app", TokenKind::Rds, Vec::new()).unwrap();
        assert!(rds.is_empty(), "RDS entries keep PgBouncer's default");
    }

    #[test]
    fn a_dsql_server_lifetime_past_half_an_hour_is_refused_with_the_reason() {
        for (bad, reason) in [
            ("3600", "too long for Aurora DSQL"),
            ("1801", "too long for Aurora DSQL"),
            ("0", "means PgBouncer's global server_lifetime"),
            ("30min", "is not whole seconds"),
        ] {
            let error = lifetime_option(Some(bad)).unwrap_err();
            assert!(
                error.starts_with("database app: server_lifetime"),
                "{error}"
            );
            assert!(error.contains(reason), "{bad}: {error}");
        }
    }

    #[test]
    fn only_dsql_entries_default_their_database() {
        assert_eq!(dbname(TokenKind::Dsql, "h", None).unwrap(), "postgres");
        assert_eq!(dbname(TokenKind::Dsql, "h", Some("x".into())).unwrap(), "x");
        let error = dbname(TokenKind::Rds, "db.example", None).unwrap_err();
        assert!(
            error.contains("host db.example: dbname is missing"),
            "{error}"
        );
    }
}
