//! Errors as people read them: one line, the error and its causes.

use std::error::Error;

/// `error: cause: root cause` on one line. This is what `DisplayErrorContext` prints, without
/// the `Debug` dump it appends (for AWS SDK errors whole HTTP responses and nested structs)
/// and without the line breaks some causes hold (the credential chain's error lists each
/// provider on a line of its own). A cause whose text its error already shows is left out.
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_the_causes_on_one_line_without_debug_output() {
        let inner = std::io::Error::other("connection\n  refused");
        assert_eq!(one_line(&Outer(inner)), "outer failed: connection refused");
    }
}
