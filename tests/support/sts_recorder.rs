//! STS as the daemon sees it: moto behind a loopback relay that tells the stand-in what each
//! credential it issues is and when it expires.
//!
//! RDS refuses a token once the credentials that signed it have expired. moto's state dump,
//! which the stand-in's verifier reads, carries no expiry, so on its own the stand-in would
//! accept such a token. The relay reads every AssumeRole answer and registers the key with
//! its `Expiration` in the stand-in's key file, where the verifier enforces it.

use super::{Moto, Standin};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One set of credentials STS issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The AssumeRole request's form fields, decoded (RoleArn, DurationSeconds, ...).
    pub request: Vec<(String, String)>,
    pub akid: String,
    /// When the answer passed, and when the credentials expire (seconds since 1970).
    pub issued_at: f64,
    pub expires_at: f64,
}

impl Issued {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.request
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

pub struct StsRecorder {
    port: u16,
    issued: Arc<Mutex<Vec<Issued>>>,
    stop: Arc<AtomicBool>,
    /// Holds a handle on the stand-in: joined on drop, so the test's own handle is the last.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StsRecorder {
    /// Relays to `moto`, registering what it issues with `standin`.
    pub fn start(moto: &Moto, standin: Arc<Standin>) -> StsRecorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the STS relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().unwrap().port();
        let upstream = moto.url().trim_start_matches("http://").to_owned();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (issued_, stop_) = (issued.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop_.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if let Err(error) = relay(client, &upstream, &standin, &issued_) {
                            eprintln!("STS relay: {error}");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        StsRecorder {
            port,
            issued,
            stop,
            thread: Some(thread),
        }
    }

    /// For `AWS_ENDPOINT_URL_STS`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every credential issued so far, oldest first.
    pub fn issued(&self) -> Vec<Issued> {
        self.issued.lock().unwrap().clone()
    }
}

impl Drop for StsRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request, `Connection: close` both ways: the SDK opens another connection for the next.
fn relay(
    client: TcpStream,
    upstream: &str,
    standin: &Standin,
    issued: &Mutex<Vec<Issued>>,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let lower = trimmed.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        if !lower.starts_with("connection:") {
            head.push_str(trimmed);
            head.push_str("\r\n");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;

    let mut server = TcpStream::connect(upstream)?;
    server.write_all(head.as_bytes())?;
    server.write_all(b"Connection: close\r\n\r\n")?;
    server.write_all(&body)?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer)?;
    // Registered before the daemon can sign with it.
    if let Some(credentials) = issued_credentials(&body, &answer) {
        standin.set_key_entry(
            &credentials.akid,
            serde_json::json!({
                "secret": credentials.secret,
                "session_token": credentials.session_token,
                "expiration": credentials.issued.expires_at,
            }),
        );
        issued.lock().unwrap().push(credentials.issued);
    }
    (&client).write_all(&answer)
}

struct Credentials {
    issued: Issued,
    akid: String,
    secret: String,
    session_token: String,
}

fn issued_credentials(request: &[u8], answer: &[u8]) -> Option<Credentials> {
    let answer = String::from_utf8_lossy(answer);
    let element = |name: &str| -> Option<String> {
        let start = answer.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + answer[start..].find(&format!("</{name}>"))?;
        Some(answer[start..end].to_owned())
    };
    let akid = element("AccessKeyId")?;
    let expiration = aws_smithy_types::DateTime::from_str(
        &element("Expiration")?,
        aws_smithy_types::date_time::Format::DateTime,
    )
    .expect("STS Expiration is an ISO 8601 time");
    let request = String::from_utf8_lossy(request)
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(&text.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            Some((decode(key), decode(value)))
        })
        .collect();
    Some(Credentials {
        issued: Issued {
            request,
            akid: akid.clone(),
            issued_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64(),
            expires_at: expiration.as_secs_f64(),
        },
        akid,
        secret: element("SecretAccessKey")?,
        session_token: element("SessionToken")?,
    })
}
