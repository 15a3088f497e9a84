//! A loopback container-credentials endpoint, the shape ECS and EKS Pod Identity serve
//! (`AWS_CONTAINER_CREDENTIALS_FULL_URI`), that hands out short-lived keys on a schedule.
//!
//! The keys come from a pool the stand-in already trusts, each with an `expiration` the
//! stand-in's verifier enforces, so a token signed with an expired key fails as on RDS.

use super::{Creds, Standin};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Plan {
    /// A new key every `rotate_every`; each lives `lifetime` from the start of its slot.
    rotate_every: Duration,
    lifetime: Duration,
    started: SystemTime,
    keys: Vec<Creds>,
}

pub struct CredentialServer {
    port: u16,
    plan: Arc<Mutex<Plan>>,
    failing: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CredentialServer {
    /// Serves `slots` keys, registering each with `standin` (with its expiration) first.
    pub fn start(
        standin: &Standin,
        rotate_every: Duration,
        lifetime: Duration,
        slots: usize,
    ) -> Self {
        let started = SystemTime::now();
        let keys: Vec<Creds> = (0..slots)
            .map(|slot| {
                let creds = Creds::new(
                    &format!("ASIAROTATING{slot:08}"),
                    &format!("rotating-secret-{slot}-{}", super::now_epoch()),
                    Some(&format!(
                        "rotating-session-token-{slot}-{}",
                        "x".repeat(600)
                    )),
                );
                let expires = started + rotate_every * slot as u32 + lifetime;
                standin.set_key_entry(
                    &creds.akid,
                    serde_json::json!({
                        "secret": creds.secret,
                        "session_token": creds.session_token,
                        "expiration": epoch(expires),
                    }),
                );
                creds
            })
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind credential server");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().unwrap().port();
        let server = CredentialServer {
            port,
            plan: Arc::new(Mutex::new(Plan {
                rotate_every,
                lifetime,
                started,
                keys,
            })),
            failing: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (plan, failing, requests, stop) = (
            server.plan.clone(),
            server.failing.clone(),
            server.requests.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                stream.set_nonblocking(false).ok();
                stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                requests.fetch_add(1, Ordering::Relaxed);
                let (status, body) = if failing.load(Ordering::Relaxed) {
                    (
                        "500 Internal Server Error",
                        "{\"message\":\"credential source down\"}".to_owned(),
                    )
                } else {
                    ("200 OK", plan.lock().unwrap().current_body())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
            }
        });
        server
    }

    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI` for this server.
    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}/credentials", self.port)
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// The key handed out now.
    pub fn current(&self) -> Creds {
        let plan = self.plan.lock().unwrap();
        plan.keys[plan.slot()].clone()
    }
}

impl Plan {
    fn slot(&self) -> usize {
        let elapsed = self.started.elapsed().unwrap_or_default();
        ((elapsed.as_millis() / self.rotate_every.as_millis()) as usize).min(self.keys.len() - 1)
    }

    fn current_body(&self) -> String {
        let slot = self.slot();
        let creds = &self.keys[slot];
        let expires = self.started + self.rotate_every * slot as u32 + self.lifetime;
        let expiration = aws_smithy_types::DateTime::from_secs(epoch(expires))
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .expect("format expiration");
        serde_json::json!({
            "AccessKeyId": creds.akid,
            "SecretAccessKey": creds.secret,
            "Token": creds.session_token,
            "Expiration": expiration,
        })
        .to_string()
    }
}

impl Drop for CredentialServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn epoch(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}
