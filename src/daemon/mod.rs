//! The `run` command: the long-lived daemon.
//!
//! Start-up order matters for the probes: settings are checked and the directory and HTTP
//! port claimed before any token is minted, so that bad input fails at once; `/startupz`
//! turns green only once PgBouncer has re-read files holding the first tokens.

mod auth_query_mode;
mod config_mode;
mod reloader;
mod state;

use crate::cli::{LogFormat, Mode, RunArgs};
use crate::config::Settings;
use crate::http;
use crate::metrics::Metrics;
use crate::pgbouncer::admin::AdminConsole;
use crate::pgbouncer::files::{load_or_create_secret, prepare_dir};
use crate::pgbouncer::supervise::Supervised;
use crate::token::{CredentialCache, Presenter, TokenSource, default_chain};
use auth_query_mode::AuthQueryMode;
use config_mode::ConfigMode;
use reloader::Reloader;
use state::DaemonState;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

const ADMIN_SECRET_FILE: &str = "admin-secret";

/// Why the daemon ended, which decides its exit code so that orchestrators can tell a crash
/// from an ordered stop.
#[derive(Debug)]
pub enum Outcome {
    /// Stopped by SIGTERM or SIGINT.
    Signalled { signal: i32, exit_zero: bool },
    /// Stopped by `POST /quitquitquit`: the application has finished, which is success.
    Requested,
    /// The supervised PgBouncer exited on its own.
    PgBouncerExited(String),
    /// Bad settings or an unrecoverable error.
    Failed(String),
}

impl Outcome {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::Signalled {
                exit_zero: true, ..
            }
            | Outcome::Requested => ExitCode::SUCCESS,
            // The shell's convention, which Kubernetes and docker report as such.
            Outcome::Signalled { signal, .. } => ExitCode::from(128 + *signal as u8),
            Outcome::PgBouncerExited(_) => ExitCode::from(3),
            Outcome::Failed(_) => ExitCode::FAILURE,
        }
    }
}

/// Libraries whose trace output carries secrets: aws-sigv4 logs canonical requests with the
/// session token, the smithy runtime logs whole HTTP responses (credentials from STS, IMDS or
/// the container endpoint), and the network crates log the bytes they move. They never log
/// below debug, whatever `RUST_LOG` says; `tests/operability.rs` scans a trace-level run.
const CAPPED_AT_DEBUG: &[&str] = &[
    "aws_config",
    "aws_runtime",
    "aws_sigv4",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "h2",
    "hyper",
    "hyper_util",
    "postgres_protocol",
    "rustls",
    "tokio_postgres",
];

/// aws-config's credential chain warns of each provider that failed with the SDK's `Debug`
/// dump of the error (nested structs, the HTTP response). The daemon's own "token refresh
/// failed" warning gives the same causes on one line, so the chain logs errors only.
const CREDENTIAL_CHAIN: &str = "aws_config::meta::credentials::chain";

/// One line per event on stderr, levels from `RUST_LOG` (default info), within the caps.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let requested = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let caps = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(
            CAPPED_AT_DEBUG
                .iter()
                .map(|target| (*target, LevelFilter::DEBUG)),
        )
        .with_target(CREDENTIAL_CHAIN, LevelFilter::ERROR);
    let registry = tracing_subscriber::registry().with(caps).with(requested);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(lines.json().flatten_event(true)).init(),
        LogFormat::Text => registry
            .with(lines.with_ansi(std::io::stderr().is_terminal()))
            .init(),
    }
}

pub async fn run(args: &RunArgs) -> Outcome {
    let settings = match Settings::resolve(args).await {
        Ok(settings) => settings,
        Err(message) => return Outcome::Failed(message),
    };
    let quit = args.quitquitquit.then(|| Arc::new(Notify::new()));
    run_with(settings, args, Signals::install(quit))
        .await
        .unwrap_or_else(Outcome::Failed)
}

async fn run_with(
    settings: Settings,
    args: &RunArgs,
    mut signals: Signals,
) -> Result<Outcome, String> {
    let dir = prepare_dir(&settings.pgbouncer_dir).map_err(|error| error.to_string())?;
    let dir = dir
        .canonicalize()
        .map_err(|error| format!("{}: {error}", dir.display()))?;
    let admin_secret =
        load_or_create_secret(&dir, ADMIN_SECRET_FILE).map_err(|error| error.to_string())?;
    let http_listener = tokio::net::TcpListener::bind(&args.http_listen)
        .await
        .map_err(|error| format!("cannot listen on {} for HTTP: {error}", args.http_listen))?;

    // STS needs a region for web identity; the first database's is as good as any.
    let provider = default_chain(&settings.databases[0].target.region).await;
    let presenter = match settings.mode {
        Mode::Config | Mode::AuthQuery => Presenter::PgBouncer,
        Mode::Passthrough => Presenter::Relay,
    };
    let source = TokenSource::new(
        CredentialCache::new(provider, settings.token_lifetime),
        settings.token_lifetime,
        presenter,
    );
    let targets = settings
        .databases
        .iter()
        .map(|db| db.target.clone())
        .collect();
    let state = Arc::new(DaemonState::new(source.clone(), targets));
    let weak_source = Arc::downgrade(&source);
    let metrics = Arc::new(Metrics::new(&settings.databases, move || {
        weak_source
            .upgrade()
            .map(|source| source.health())
            .unwrap_or_default()
    }));
    // Dropped at return, which stops the HTTP server and the auth endpoint.
    let (stop_serving, serving_stopped) = tokio::sync::watch::channel(());
    let stopped = move || {
        let mut receiver = serving_stopped.clone();
        async move {
            let _ = receiver.changed().await;
        }
    };
    tokio::spawn(http::serve(
        http_listener,
        state.clone(),
        metrics.clone(),
        signals.quit.clone(),
        stopped(),
    ));

    let mut generations = source.subscribe();
    let starting = async {
        Ok::<_, String>(match settings.mode {
            Mode::Config => {
                Handler::Config(ConfigMode::start(&settings, &dir, &admin_secret, &source).await?)
            }
            Mode::AuthQuery | Mode::Passthrough => Handler::AuthQuery(
                AuthQueryMode::start(&settings, &dir, &admin_secret, &source, &metrics, &stopped)
                    .await?,
            ),
        })
    };
    let mut mode = tokio::select! {
        mode = starting => mode?,
        stop = signals.next_stop() => return Ok(stop.outcome(args)),
    };
    metrics.set_credentials_expiry(mode.credentials_expiry());

    let reloader = Reloader::spawn(
        AdminConsole::new(
            settings.listen,
            crate::pgbouncer::render::pgbouncer_socket_dir(&settings, &dir).as_deref(),
            &admin_secret,
        ),
        expected_server_tls(&settings),
        state.clone(),
        metrics.clone(),
    );
    let mut child = match args.supervise {
        true => Some(Supervised::start(&args.pgbouncer_bin, &mode.ini_path())?),
        false => None,
    };
    // A PgBouncer that was already running still holds whatever it read before; one that
    // just started has read these files, and the RELOAD confirms it for /startupz.
    reloader.request();

    let mut stopping: Option<Stopping> = None;
    loop {
        let linger = async {
            match &stopping {
                Some(stopping) => tokio::time::sleep_until(stopping.linger_until.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    return Err("the token source stopped".into());
                }
                if mode.on_new_tokens(&source).await {
                    reloader.request();
                }
                metrics.set_credentials_expiry(mode.credentials_expiry());
            }
            received = signals.next() => match received {
                Received::Stop(stop) => match &stopping {
                    // A second stop signal cuts the lingering short.
                    Some(_) => break,
                    None => {
                        tracing::info!(cause = %stop, min_delay_secs = args.min_shutdown_delay, "stopping: readiness is now 503");
                        state.mark_stopping();
                        stopping = Some(Stopping {
                            stop,
                            began: Instant::now(),
                            linger_until: Instant::now() + Duration::from_secs(args.min_shutdown_delay),
                        });
                    }
                },
                Received::Hangup => {
                    tracing::info!("SIGHUP: minting fresh tokens");
                    mode.refresh_now(&source).await;
                }
            },
            () = linger => break,
            status = exited(&mut child) => {
                let status = status.map_or_else(|error| error.to_string(), |status| status.to_string());
                return Ok(Outcome::PgBouncerExited(format!("PgBouncer exited: {status}")));
            }
        }
    }
    let stopping = stopping.expect("the loop ends only when stopping");
    if let Some(child) = child.as_mut() {
        let bound = Duration::from_secs(args.max_shutdown_delay)
            .saturating_sub(stopping.began.elapsed())
            .max(Duration::from_secs(1));
        let status = child.stop(bound).await;
        tracing::info!(?status, "PgBouncer stopped");
    }
    drop(stop_serving);
    Ok(stopping.stop.outcome(args))
}

/// The `server_tls_sslmode` PgBouncer should run with: the daemon's own setting, and in
/// passthrough mode `verify-full` when a leg to the daemon is on TCP (over unix sockets
/// PgBouncer never starts TLS, so nothing is to be checked).
fn expected_server_tls(settings: &Settings) -> Option<crate::cli::TlsMode> {
    use crate::config::LocalListen;
    match settings.mode {
        Mode::Passthrough => {
            let tcp = |listen: &LocalListen| matches!(listen, LocalListen::Tcp(_));
            (tcp(&settings.auth_listen) || tcp(&settings.relay_listen))
                .then_some(crate::cli::TlsMode::VerifyFull)
        }
        Mode::Config | Mode::AuthQuery => Some(settings.server_tls_mode),
    }
}

/// Everything PgBouncer reads, written in the order that keeps what it sees consistent:
/// `pgbouncer.ini`, which names the others, comes last.
fn write_pgbouncer_files(
    settings: &Settings,
    dir: &std::path::Path,
    databases_ini: &str,
    userlist: &secrecy::SecretString,
    server_tls: crate::pgbouncer::render::ServerTls<'_>,
) -> Result<(), String> {
    use crate::pgbouncer::files::write_atomically;
    use crate::pgbouncer::render::{self, DATABASES_INI, HBA, PGBOUNCER_INI, USERLIST};
    use secrecy::ExposeSecret;
    let write = |name: &str, text: &str| {
        write_atomically(dir, name, text.as_bytes()).map_err(|error| error.to_string())
    };
    write(DATABASES_INI, databases_ini)?;
    write(USERLIST, userlist.expose_secret())?;
    write(
        HBA,
        &render::hba(settings.mode, &settings.databases, &settings.clients),
    )?;
    write(
        PGBOUNCER_INI,
        &render::pgbouncer_ini(settings, dir, server_tls),
    )?;
    tracing::info!(dir = %dir.display(), databases = settings.databases.len(), "wrote PgBouncer's files");
    Ok(())
}

/// What differs between the modes once the daemon runs.
enum Handler {
    Config(ConfigMode),
    AuthQuery(AuthQueryMode),
}

impl Handler {
    fn ini_path(&self) -> std::path::PathBuf {
        match self {
            Handler::Config(mode) => mode.ini_path(),
            Handler::AuthQuery(mode) => mode.ini_path(),
        }
    }

    /// Hands new tokens to PgBouncer; true when PgBouncer must reload to see them.
    async fn on_new_tokens(&mut self, source: &Arc<TokenSource>) -> bool {
        match self {
            Handler::Config(mode) => mode.on_new_tokens(source).await,
            Handler::AuthQuery(mode) => mode.on_new_tokens(),
        }
    }

    async fn refresh_now(&self, source: &Arc<TokenSource>) {
        match self {
            Handler::Config(mode) => mode.refresh_now(source).await,
            Handler::AuthQuery(mode) => mode.refresh_now(source).await,
        }
    }

    fn credentials_expiry(&self) -> Option<std::time::SystemTime> {
        match self {
            Handler::Config(mode) => mode.credentials_expiry(),
            Handler::AuthQuery(mode) => mode.credentials_expiry(),
        }
    }
}

struct Stopping {
    stop: Stop,
    began: Instant,
    linger_until: Instant,
}

async fn exited(child: &mut Option<Supervised>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(child) => child.exited().await,
        None => std::future::pending().await,
    }
}

/// What tells the daemon to stop or refresh: signals, installed once at start so that none is
/// lost to the default action while the daemon is busy, and `POST /quitquitquit` when enabled.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    quit: Option<Arc<Notify>>,
}

#[derive(Clone, Copy)]
pub enum Stop {
    Signal(i32),
    Requested,
}

impl Stop {
    fn outcome(self, args: &RunArgs) -> Outcome {
        match self {
            Stop::Signal(signal) => Outcome::Signalled {
                signal,
                exit_zero: args.exit_zero_on_sigterm && signal == libc::SIGTERM,
            },
            Stop::Requested => Outcome::Requested,
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal(libc::SIGTERM) => f.write_str("SIGTERM"),
            Stop::Signal(libc::SIGINT) => f.write_str("SIGINT"),
            Stop::Signal(signal) => write!(f, "signal {signal}"),
            Stop::Requested => f.write_str("POST /quitquitquit"),
        }
    }
}

pub enum Received {
    Stop(Stop),
    Hangup,
}

impl Signals {
    fn install(quit: Option<Arc<Notify>>) -> Self {
        let install = |kind| signal(kind).expect("installing a signal handler");
        Self {
            terminate: install(SignalKind::terminate()),
            interrupt: install(SignalKind::interrupt()),
            hangup: install(SignalKind::hangup()),
            quit,
        }
    }

    async fn next(&mut self) -> Received {
        let quit = self.quit.clone();
        let quit = async move {
            match quit {
                Some(quit) => quit.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.terminate.recv() => Received::Stop(Stop::Signal(libc::SIGTERM)),
            _ = self.interrupt.recv() => Received::Stop(Stop::Signal(libc::SIGINT)),
            _ = self.hangup.recv() => Received::Hangup,
            () = quit => Received::Stop(Stop::Requested),
        }
    }

    /// The next stop signal; SIGHUP before start-up has nothing to refresh yet.
    async fn next_stop(&mut self) -> Stop {
        loop {
            if let Received::Stop(stop) = self.next().await {
                return stop;
            }
        }
    }
}
