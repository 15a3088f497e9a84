use aws_credential_types::provider::ProvideCredentials;
use aws_pgbouncer::cli::{Cli, Command, TokenArgs};
use aws_pgbouncer::daemon::Outcome;
use aws_pgbouncer::token::{self, TokenKey};
use aws_smithy_types::error::display::DisplayErrorContext;
use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Token(args) => print_token(args).await,
        Command::Check(args) => aws_pgbouncer::check::run(&args).await,
        Command::Wait(args) => aws_pgbouncer::wait::run(&args).await,
        Command::Run(args) => {
            init_logging();
            let outcome = aws_pgbouncer::daemon::run(&args).await;
            match &outcome {
                Outcome::Failed(message) | Outcome::PgBouncerExited(message) => {
                    tracing::error!("{message}");
                    eprintln!("aws-pgbouncer: {message}");
                }
                Outcome::Signalled(_) => {}
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
    let region = token::resolve_region(args.region.as_deref(), &args.host)
        .await
        .map_err(|error| error.to_string())?;
    let credentials = token::default_chain(&region)
        .await
        .provide_credentials()
        .await
        .map_err(|error| {
            format!(
                "could not get AWS credentials: {}",
                DisplayErrorContext(&error)
            )
        })?;
    let key = TokenKey {
        host: args.host,
        port: args.port,
        user: args.user,
        region,
    };
    let minted = token::mint(
        &credentials,
        &key,
        SystemTime::now(),
        Duration::from_secs(args.expires_in),
    )
    .map_err(|error| error.to_string())?;
    println!("{}", minted.expose());
    Ok(())
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
