use aws_credential_types::provider::ProvideCredentials;
use aws_pgbouncer::cli::{Cli, Command, TokenArgs, TokenFor};
use aws_pgbouncer::config::Settings;
use aws_pgbouncer::daemon::Outcome;
use aws_pgbouncer::error_text::one_line;
use aws_pgbouncer::token::{self, DsqlKey, TokenKey, TokenKind};
use clap::Parser;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// One thread, like PgBouncer itself: the work per event is small (a token lookup, a byte
/// copy in the relay), and a second worker mostly costs wake-ups. Measured in passthrough mode
/// (docs/BENCHMARKS.md): the daemon's CPU per relayed statement fell from 17.2 to 15.0 µs.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Token(args) => print_token(args).await,
        Command::Check(args) => match Settings::resolve(&args).await {
            Ok(settings) => aws_pgbouncer::check::run(&settings).await,
            Err(message) => Err(message),
        },
        Command::Wait(args) => aws_pgbouncer::wait::run(&args).await,
        Command::Shutdown(args) => aws_pgbouncer::shutdown::run(&args).await,
        Command::Run(args) => {
            aws_pgbouncer::daemon::init_logging(args.log_format);
            // Before any listener opens; the listeners are sized to what this leaves.
            match aws_pgbouncer::fd_limit::raise_soft_to_hard() {
                Ok(soft) => tracing::debug!(soft, "RLIMIT_NOFILE raised to the hard limit"),
                Err(error) => tracing::warn!(%error, "cannot raise RLIMIT_NOFILE"),
            }
            let outcome = match Settings::resolve(&args).await {
                Ok(settings) => aws_pgbouncer::daemon::run(settings).await,
                Err(message) => Outcome::Failed(message),
            };
            match &outcome {
                // Once, in the log's own format, so that a JSON log stays JSON.
                Outcome::Failed(message) | Outcome::PgBouncerExited(message) => {
                    tracing::error!("{message}");
                }
                Outcome::Signalled { .. } | Outcome::Requested => {}
            }
            return outcome.exit_code();
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("aws-pgbouncer: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn print_token(args: TokenArgs) -> Result<(), String> {
    let token_for = args.checked().unwrap_or_else(|usage| usage.exit());
    let region = token::resolve_region(args.region.as_deref(), &args.host)
        .await
        .map_err(|error| error.to_string())?;
    let credentials = token::default_chain(&region)
        .await
        .provide_credentials()
        .await
        .map_err(|error| format!("could not get AWS credentials: {}", one_line(&error)))?;
    let (now, expires_in) = (SystemTime::now(), Duration::from_secs(args.expires_in));
    let minted = match token_for {
        TokenFor::Rds { port, user } => {
            let key = TokenKey {
                kind: TokenKind::Rds,
                host: args.host,
                port,
                user,
                region,
                role: None,
            };
            token::mint(&credentials, &key, now, expires_in)
        }
        TokenFor::Dsql { action } => {
            let key = DsqlKey {
                host: args.host,
                region,
                action,
            };
            token::mint_dsql(&credentials, &key, now, expires_in)
        }
    };
    // Printed tokens usually end up in a PgBouncer file, so they get PgBouncer's limit: the
    // conservative one, as no PgBouncer is at hand to measure.
    let limit = token::PasswordLimit::CONSERVATIVE;
    let minted = minted
        .and_then(|minted| {
            token::check_pgbouncer_limit(&minted, &credentials, limit).map(|()| minted)
        })
        .map_err(|error| error.to_string())?;
    println!("{}", minted.expose());
    Ok(())
}
