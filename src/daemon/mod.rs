//! The `run` command: the long-lived daemon.
//!
//! Start-up order matters for the probes: settings are checked and the directory and HTTP
//! port claimed before any token is minted, so that bad input fails at once; `/startupz`
//! turns green only once PgBouncer has re-read files holding the first tokens.

mod allowed_keys;
mod auth_endpoint;
mod auth_query_mode;
mod config_mode;
mod limit_probe;
mod local_address;
mod logging;
mod passthrough_mode;
mod pool_refresher;
mod relay_tokens;
mod reloader;
mod running_mode;
mod signals;
mod state;

pub use logging::init_logging;

use crate::code_pages::CodePages;
use crate::config::Settings;
use crate::http;
use crate::metrics::Metrics;
use crate::pgbouncer::admin::AdminConsole;
use crate::pgbouncer::files::{load_or_create_secret, prepare_dir};
use crate::pgbouncer::render::PGBOUNCER_INI;
use crate::pgbouncer::supervise::Supervised;
use crate::token::{CredentialCache, TokenSource, default_chain};
use reloader::Reloader;
use running_mode::{RunningMode, Start};
use signals::{Received, Signals, Stop};
use state::DaemonState;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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

pub async fn run(settings: Settings) -> Outcome {
    let quit = settings
        .lifecycle
        .quitquitquit
        .then(|| Arc::new(Notify::new()));
    run_with(settings, Signals::install(quit))
        .await
        .unwrap_or_else(Outcome::Failed)
}

async fn run_with(settings: Settings, mut signals: Signals) -> Result<Outcome, String> {
    let lifecycle = &settings.lifecycle;
    let dir = prepare_dir(&settings.pgbouncer_dir).map_err(|error| error.to_string())?;
    let dir = dir
        .canonicalize()
        .map_err(|error| format!("{}: {error}", dir.display()))?;
    let admin_secret =
        load_or_create_secret(&dir, ADMIN_SECRET_FILE).map_err(|error| error.to_string())?;
    let http_listener = tokio::net::TcpListener::bind(&lifecycle.http_listen)
        .await
        .map_err(|error| {
            format!(
                "cannot listen on {} for HTTP: {error}",
                lifecycle.http_listen
            )
        })?;

    // STS needs a region for web identity; the first database's is as good as any.
    let provider = default_chain(&settings.databases[0].target.region).await;
    let source = TokenSource::new(
        CredentialCache::new(provider, settings.token_lifetime),
        settings.token_lifetime,
        running_mode::presenter(&settings.mode),
    );
    let state = Arc::new(DaemonState::new(source.clone(), &settings.databases));
    let weak_source = Arc::downgrade(&source);
    let metrics = Arc::new(Metrics::new(&settings.databases, move || {
        weak_source
            .upgrade()
            .map(|source| source.health())
            .unwrap_or_default()
    }));
    // Cancelled when this guard drops at return, however it returns, which stops the HTTP
    // server, the auth endpoint and the relay.
    let serving = CancellationToken::new();
    let stop_serving = serving.clone().drop_guard();
    let stopped = move || serving.clone().cancelled_owned();
    tokio::spawn(http::serve(
        http_listener,
        state.clone(),
        metrics.clone(),
        signals.quit.clone(),
        stopped(),
    ));

    let code_pages = CodePages::spawn({
        let state = state.clone();
        async move { state.until_started().await }
    });
    let mut token_events = source.subscribe();
    // Before any file names the probe's entry.
    let limit_probe = limit_probe::LimitProbe::prepare(&settings, &dir).await?;
    let start = Start {
        settings: &settings,
        dir: &dir,
        admin_secret: &admin_secret,
        source: &source,
        metrics: &metrics,
        code_pages: &code_pages,
        state: &state,
    };
    let starting = RunningMode::start(&start, &stopped);
    let mut mode = tokio::select! {
        mode = starting => mode?,
        stop = signals.next_stop() => return Ok(stop.outcome(lifecycle)),
    };

    let reloader = Arc::new(Reloader::spawn(
        AdminConsole::new(
            settings.listen,
            crate::pgbouncer::render::pgbouncer_socket_dir(&settings, &dir).as_deref(),
            &admin_secret,
        ),
        running_mode::expected_server_tls(&settings),
        state.clone(),
        metrics.clone(),
        code_pages.clone(),
    ));
    if let Some(probe) = limit_probe {
        probe.spawn(source.clone(), state.clone(), reloader.clone());
    }
    let mut child = match &lifecycle.supervise {
        Some(pgbouncer_bin) => Some(Supervised::start(pgbouncer_bin, &dir.join(PGBOUNCER_INI))?),
        None => None,
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
            changed = token_events.next() => {
                let Some(changed) = changed else {
                    return Err("the token source stopped".into());
                };
                code_pages.work_ran();
                if mode.on_new_tokens(&source, &changed).await {
                    reloader.request();
                }
            }
            received = signals.next() => match received {
                Received::Stop(stop) => match &stopping {
                    // A second stop signal cuts the lingering short.
                    Some(_) => break,
                    None => {
                        tracing::info!(cause = %stop, min_delay_secs = lifecycle.min_shutdown_delay.as_secs(), "stopping: readiness is now 503");
                        state.mark_stopping();
                        stopping = Some(Stopping {
                            stop,
                            began: Instant::now(),
                            linger_until: Instant::now() + lifecycle.min_shutdown_delay,
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
        let bound = lifecycle
            .max_shutdown_delay
            .saturating_sub(stopping.began.elapsed())
            .max(Duration::from_secs(1));
        let status = child.stop(bound).await;
        tracing::info!(?status, "PgBouncer stopped");
    }
    drop(stop_serving);
    Ok(stopping.stop.outcome(lifecycle))
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
    use crate::pgbouncer::login_rules::hba;
    use crate::pgbouncer::render::{self, DATABASES_INI, HBA, USERLIST};
    use secrecy::ExposeSecret;
    let write = |name: &str, text: &str| {
        write_atomically(dir, name, text.as_bytes()).map_err(|error| error.to_string())
    };
    write(DATABASES_INI, databases_ini)?;
    write(USERLIST, userlist.expose_secret())?;
    write(
        HBA,
        &hba(settings.mode.mode(), &settings.databases, &settings.clients),
    )?;
    write(
        PGBOUNCER_INI,
        &render::pgbouncer_ini(settings, dir, server_tls),
    )?;
    tracing::info!(dir = %dir.display(), databases = settings.databases.len(), "wrote PgBouncer's files");
    Ok(())
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
