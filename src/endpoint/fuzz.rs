//! Entry points for the fuzz targets in `fuzz/` (built with `--cfg fuzzing`), and the unit
//! test that replays their corpus in `cargo test`. Not in release builds.

use super::queries::Queries;
use super::session::Shared;
use super::{EndpointConfig, Lookup, TokenLookup};
use crate::token::MAX_TOKEN_BYTES;
use crate::wire::conn::Conn;
use crate::wire::framing;
use crate::wire::fuzz::through_a_pipe;
use crate::wire::pre_auth::PreAuth;
use crate::wire::startup::{self, Handshake};
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Frames and decodes `data` as a startup packet followed by messages, as a session would,
/// stopping at the first error.
pub fn parse_frontend(data: &[u8]) {
    use super::frontend;
    let mut buf = bytes::BytesMut::from(data);
    let limit = 8 * 1024;
    if !matches!(framing::split_startup(&mut buf, limit), Ok(Some(_))) {
        return;
    }
    while let Ok(Some((tag, body))) = framing::split_message(&mut buf, limit) {
        match frontend::decode(tag, body) {
            Ok(frontend::FrontendMessage::Password(body)) => {
                let _ = framing::decode_sasl_initial(body);
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Feeds `data` to a session through an in-memory pipe and lets it run to its end. The first
/// byte picks where the session starts: even, at the startup packet; odd, already
/// authenticated (random bytes cannot pass SCRAM, so the query phase is reached directly).
pub fn fuzz_session(data: &[u8]) {
    use std::sync::OnceLock;

    struct FuzzLookup;
    impl TokenLookup for FuzzLookup {
        async fn lookup(&self, _database: &str, user: &str) -> Lookup {
            match user {
                "alice" => Lookup::Token("token-for-alice".to_owned().into()),
                "bob" => Lookup::Unavailable("credentials expired".into()),
                "carol" => Lookup::UnknownDatabase,
                "dave" => Lookup::Token("x".repeat(MAX_TOKEN_BYTES + 1).into()),
                _ => Lookup::NoSuchUser,
            }
        }
    }

    static SHARED: OnceLock<Arc<Shared<FuzzLookup>>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let config = EndpointConfig {
            auth_user: "pgbouncer".into(),
            auth_secret: "secret".to_owned().into(),
            limits: super::Limits {
                max_message_bytes: 1024,
                ..Default::default()
            },
            tls: None,
            metrics: None,
        };
        Arc::new(Shared::new(Arc::new(config), Arc::new(FuzzLookup)))
    });
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    through_a_pipe(input, |server| async move {
        if mode % 2 == 0 {
            let handshake = Handshake {
                deadline: Instant::now() + shared.config.limits.handshake_timeout,
                peer: "fuzz".into(),
                peer_uid: None,
                peer_pid: None,
                shutdown: CancellationToken::new(),
                pre_auth: PreAuth::detached(),
                counted: None,
            };
            let max_message = shared.config.limits.max_message_bytes;
            startup::run(&**shared, server, None, max_message, handshake).await;
        } else {
            let mut conn = Conn::new(server, shared.config.limits.max_message_bytes);
            let mut queries = Queries::new(shared, "db".into());
            queries.welcome(&mut conn.wbuf);
            let end = queries.serve(&mut conn, &CancellationToken::new()).await;
            conn.finish(end, "fuzz").await;
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::wire::fuzz::{corpus, replay};

    /// The fuzz targets' entry points in plain `cargo test`: the kept corpus (seeds and every
    /// finding), then seeded random mutations of it. cargo-fuzz explores further.
    #[test]
    fn fuzz_entry_points_replay_the_corpus() {
        let mut inputs = corpus("frontend_parser");
        inputs.extend(corpus("session"));
        replay(&inputs, 400, 0, |input| {
            super::parse_frontend(input);
            super::fuzz_session(input);
        });
    }
}
