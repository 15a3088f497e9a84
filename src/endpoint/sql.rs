//! The little SQL the auth endpoint reads: statements split at semicolons, `SET` statements,
//! and the highest `$n` placeholder. Nothing else in a query is interpreted.

/// The highest `$n` in the statement text (0 for none). The text is not parsed further.
pub(super) fn max_placeholder(sql: &str) -> u32 {
    let mut max = 0;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n = rest[..digits].parse::<u32>().unwrap_or(u32::MAX);
        if digits > 0 {
            max = max.max(n);
        }
        rest = &rest[digits..];
    }
    max
}

/// Splits a simple query at the semicolons outside quotes, dropping empty statements.
pub(super) fn split_statements(sql: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut quote: Option<(char, bool)> = None; // (quote char, backslash escapes)
    let mut previous = ' ';
    let mut chars = sql.char_indices();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some((_, true)) if c == '\\' => {
                chars.next();
            }
            Some((q, _)) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' => quote = Some(('\'', previous.eq_ignore_ascii_case(&'e'))),
            None if c == '"' => quote = Some(('"', false)),
            None if c == ';' => {
                statements.push(&sql[start..i]);
                start = i + 1;
            }
            None => {}
        }
        previous = c;
    }
    statements.push(&sql[start..]);
    statements
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// `SET [SESSION] name {= | TO} value` → (name, value), the value unquoted. `None` for any
/// other shape: the statement is then acknowledged without a report.
pub(super) fn parse_set(statement: &str) -> Option<(&str, String)> {
    let rest = statement.get(3..)?.trim_start();
    let rest = match rest.get(..8) {
        Some(w) if w.eq_ignore_ascii_case("session ") => rest[8..].trim_start(),
        _ => rest,
    };
    let name_len = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let (name, rest) = rest.split_at(name_len);
    let rest = rest.trim_start();
    let value = if let Some(v) = rest.strip_prefix('=') {
        v
    } else if rest.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("to ")) {
        &rest[3..]
    } else {
        return None;
    };
    let value = value.trim();
    let (escapes, quoted) = match value.as_bytes() {
        [b'e' | b'E', b'\'', ..] => (true, &value[1..]),
        [b'\'', ..] => (false, value),
        _ => return Some((name, value.to_owned())),
    };
    let inner = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if escapes => out.push(chars.next()?),
            '\'' => {
                if chars.next()? != '\'' {
                    return None;
                }
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    Some((name, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(split_statements(""), Vec::<&str>::new());
        assert_eq!(split_statements(" ; ;"), Vec::<&str>::new());
        assert_eq!(split_statements("SELECT 1;"), ["SELECT 1"]);
        assert_eq!(
            split_statements("SET a='x;y';SET b=E'q\\';z' ; select 1"),
            ["SET a='x;y'", "SET b=E'q\\';z'", "select 1"]
        );
        assert_eq!(split_statements("SET \"a;b\"=1;x"), ["SET \"a;b\"=1", "x"]);
    }

    #[test]
    fn set_statements() {
        assert_eq!(
            parse_set("SET application_name='it''s'"),
            Some(("application_name", "it's".into()))
        );
        assert_eq!(
            parse_set("set TimeZone TO 'UTC'"),
            Some(("TimeZone", "UTC".into()))
        );
        assert_eq!(
            parse_set("SET SESSION DateStyle = E'ISO, \\\\DMY'"),
            Some(("DateStyle", "ISO, \\DMY".into()))
        );
        assert_eq!(parse_set("SET x = 5"), Some(("x", "5".into())));
        assert_eq!(parse_set("SET x"), None);
        assert_eq!(parse_set("SET x = 'open"), None);
        assert_eq!(parse_set("SET x = 'a'b'"), None);
        assert_eq!(parse_set("SET"), None);
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            max_placeholder("SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1"),
            1
        );
        assert_eq!(max_placeholder("SELECT $1, $1"), 1);
        assert_eq!(max_placeholder("SELECT $2"), 2);
        assert_eq!(max_placeholder("SELECT $$a$$, $10"), 10);
        assert_eq!(max_placeholder("SELECT 1"), 0);
        assert_eq!(max_placeholder("SELECT $99999999999999999999"), u32::MAX);
        assert_eq!(max_placeholder("$"), 0);
    }
}
