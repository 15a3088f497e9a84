//! Entry point for the relay's fuzz target in `fuzz/` (built with `--cfg fuzzing`), and the
//! unit test that replays its corpus in `cargo test`. Not in release builds.

use super::login::upstream_login;
use super::{Limits, LoginTokens, RelayConfig, Shared, Upstream};
use crate::wire::conn::Conn;
use crate::wire::fuzz::through_a_pipe;
use crate::wire::pre_auth::PreAuth;
use crate::wire::startup::{self, Handshake, StartupParams};
use bytes::BytesMut;
use secrecy::SecretString;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DATABASE: &str = "db";
/// The uid the fuzzed relay trusts without a password.
const TRUSTED_UID: u32 = 70;

/// Hands out a fixed token: the fuzzer explores the protocol, not the signing.
struct FixedToken;

impl LoginTokens for FixedToken {
    async fn token(&self, _upstream: &Upstream, _user: &str) -> Result<SecretString, String> {
        Ok("fuzz-token".to_owned().into())
    }
}

/// Feeds `data` to the relay through an in-memory pipe and lets it run to its end. The first
/// byte picks the side: 0 mod 3, `data` is what PgBouncer sends (startup, SCRAM); 1 mod 3,
/// the same from a peer trusted by uid, so the login goes on to the (unreachable) upstream;
/// 2 mod 3, `data` is what the upstream server answers to a login.
pub fn fuzz_relay(data: &[u8]) {
    static SHARED: OnceLock<Shared<FixedToken>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        // Port 1 on loopback refuses at once: the trusted side ends at the connect.
        let target = Upstream {
            kind: crate::token::TokenKind::Rds,
            host: "127.0.0.1".into(),
            port: 1,
            dial: None,
            region: "us-east-1".into(),
            database: "appdb".into(),
            users: vec!["app_user".into()],
            role: None,
        };
        let config = RelayConfig {
            secret: "relay-secret".to_owned().into(),
            peer_uid: Some(TRUSTED_UID),
            upstream_tls: Arc::new(tls),
            server_tls: None,
            targets: [(DATABASE.to_owned(), Arc::new(target))].into(),
            limits: Limits {
                max_message_bytes: 1024,
                handshake_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
            metrics: None,
            follow_peer_cpu: false,
        };
        Shared::new(Arc::new(config), FixedToken)
    });
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    through_a_pipe(input, |relay_side| async move {
        if mode % 3 == 2 {
            let mut server = Conn::new(relay_side, shared.config.limits.max_message_bytes);
            let params = StartupParams(vec![
                ("user".to_owned(), "app_user".to_owned()),
                ("database".to_owned(), DATABASE.to_owned()),
            ]);
            let target = &shared.config.targets[DATABASE];
            let mut out = BytesMut::new();
            let final_message = Some("v=fuzz".into());
            let _ = upstream_login(
                &shared.tokens,
                &mut server,
                &mut out,
                target,
                &params,
                final_message,
            )
            .await;
        } else {
            let handshake = Handshake {
                deadline: Instant::now() + shared.config.limits.handshake_timeout,
                peer: "fuzz".into(),
                peer_uid: (mode % 3 == 1).then_some(TRUSTED_UID),
                peer_pid: None,
                shutdown: CancellationToken::new(),
                pre_auth: PreAuth::detached(),
                counted: None,
            };
            let max_message = shared.config.limits.max_message_bytes;
            let afterwards = startup::run(shared, relay_side, None, max_message, handshake).await;
            if let Some(afterwards) = afterwards {
                afterwards.await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::wire::fuzz::{corpus, replay};
    use bytes::{BufMut, BytesMut};
    use postgres_protocol::message::frontend;

    /// Seeds for each side: a whole login from PgBouncer, a cancel, the upstream's answers.
    fn seeds() -> Vec<Vec<u8>> {
        let mut client_side = BytesMut::new();
        frontend::startup_message([("user", "app_user"), ("database", "db")], &mut client_side)
            .unwrap();
        frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdef", &mut client_side)
            .unwrap();
        frontend::sasl_response(b"c=biws,r=abcdef,p=AAAA", &mut client_side).unwrap();
        let mut cancel = BytesMut::new();
        frontend::cancel_request(7, 9, &mut cancel);

        let message = |out: &mut BytesMut, tag: u8, body: &[u8]| {
            out.put_u8(tag);
            out.put_i32(4 + i32::try_from(body.len()).unwrap());
            out.put_slice(body);
        };
        let mut server_side = BytesMut::new();
        message(&mut server_side, b'R', &3i32.to_be_bytes());
        message(&mut server_side, b'N', b"SNOTICE\0Mhello\0\0");
        message(&mut server_side, b'R', &0i32.to_be_bytes());
        message(&mut server_side, b'S', b"server_version\x0016\0");
        message(&mut server_side, b'K', &[0, 0, 0, 7, 0, 0, 0, 9]);
        message(&mut server_side, b'Z', b"I");
        let mut answers = vec![server_side];
        for body in [
            &5i32.to_be_bytes()[..],
            b"\0\0\0\x0aSCRAM-SHA-256\0\0",
            b"\0\0",
            b"\0\0\0\x0d",
        ] {
            let mut out = BytesMut::new();
            message(&mut out, b'R', body);
            answers.push(out);
        }
        let mut error = BytesMut::new();
        message(&mut error, b'E', b"SFATAL\0C28000\0Mno\0\0");
        answers.push(error);

        let mut seeds: Vec<Vec<u8>> = Vec::new();
        for mode in [0u8, 1] {
            for bytes in [&client_side, &cancel] {
                seeds.push([&[mode][..], bytes].concat());
            }
        }
        for bytes in &answers {
            seeds.push([&[2u8][..], bytes].concat());
        }
        seeds
    }

    /// The relay's fuzz entry point in plain `cargo test`: seeds for each side, the kept
    /// corpus, then seeded random mutations that keep each input's side byte.
    #[test]
    fn fuzz_entry_point_replays_the_corpus() {
        let mut inputs = seeds();
        inputs.extend(corpus("relay"));
        replay(&inputs, 300, 1, super::fuzz_relay);
    }
}
