//! Command-line interface. Every `run` flag can also come from an `AWS_PGBOUNCER_*` variable,
//! so that container manifests configure the daemon without a wrapper script.

use crate::config::{Mode, TlsMode};
use crate::token::{DsqlAction, TokenKind};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "aws-pgbouncer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one RDS IAM authentication token, like `aws rds generate-db-auth-token`, or an
    /// Aurora DSQL one, like `aws dsql generate-db-connect-auth-token`.
    Token(TokenArgs),
    /// Run the daemon: keep PgBouncer supplied with fresh tokens.
    Run(Box<RunArgs>),
    /// Log in to every configured database once with a fresh token, as `run` would, and
    /// explain any failure. Takes the same flags as `run`.
    Check(Box<RunArgs>),
    /// Wait until a running daemon reports that it has started (its /startupz answers 200).
    Wait(WaitArgs),
    /// Ask a running daemon to stop (POST /quitquitquit; the daemon needs --quitquitquit).
    /// For a Job's last step or a preStop hook in an image without a shell.
    Shutdown(DaemonHttp),
}

/// Where `wait` and `shutdown` find the daemon.
#[derive(Debug, Args)]
pub struct DaemonHttp {
    /// The daemon's HTTP address.
    #[arg(
        long,
        env = "AWS_PGBOUNCER_HTTP_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub http: String,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub daemon: DaemonHttp,
    /// Give up after this many seconds (exit status 1).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// What the token logs in to.
    #[arg(long, value_enum, default_value_t = TokenKind::Rds)]
    pub kind: TokenKind,
    /// The database host name the client connects to (the token is valid for it only).
    #[arg(long, visible_alias = "hostname")]
    pub host: String,
    /// RDS: the database port [default: 5432] (DSQL tokens are not bound to one).
    #[arg(long)]
    pub port: Option<u16>,
    /// RDS: the database user, an IAM user (GRANT rds_iam); required for RDS.
    #[arg(long, visible_alias = "username")]
    pub user: Option<String>,
    /// DSQL: a token for the `admin` role (DbConnectAdmin) rather than DbConnect.
    #[arg(long)]
    pub admin: bool,
    /// The region to sign for; else AWS_REGION, the AWS profile, or the host name.
    #[arg(long)]
    pub region: Option<String>,
    /// The token's X-Amz-Expires in seconds: up to 900 for RDS, 604800 for DSQL.
    #[arg(
        long,
        default_value_t = 900,
        value_parser = clap::value_parser!(u64).range(1..=TokenKind::Dsql.max_expires_in_secs())
    )]
    pub expires_in: u64,
}

/// The `token` flags that depend on `--kind`, once checked together.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenFor {
    Rds { port: u16, user: String },
    Dsql { action: DsqlAction },
}

impl TokenArgs {
    /// The flag combinations clap's attributes cannot express, since they depend on the value
    /// of `--kind`. A wrong one is a usage error (exit 2), like clap's own, rather than a
    /// flag silently ignored.
    pub fn checked(&self) -> Result<TokenFor, clap::Error> {
        let usage = |message: String| {
            clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, message + "\n")
        };
        let max = self.kind.max_expires_in_secs();
        if self.expires_in > max {
            return Err(usage(format!(
                "--expires-in {} is over {}'s limit of {max} seconds",
                self.expires_in,
                self.kind.service_name()
            )));
        }
        match self.kind {
            TokenKind::Rds => {
                if self.admin {
                    return Err(usage(
                        "--admin is for --kind dsql; an RDS token's role is --user".into(),
                    ));
                }
                let user = self.user.clone().ok_or_else(|| {
                    usage("--kind rds (the default) needs --user (or --username)".into())
                })?;
                Ok(TokenFor::Rds {
                    port: self.port.unwrap_or(5432),
                    user,
                })
            }
            TokenKind::Dsql => {
                let unsigned = [
                    ("--user", self.user.is_some()),
                    ("--port", self.port.is_some()),
                ];
                if let Some((flag, _)) = unsigned.iter().find(|(_, given)| *given) {
                    return Err(usage(format!(
                        "{flag} is for --kind rds: Aurora DSQL tokens sign neither user nor \
                         port (use --admin for the admin role)"
                    )));
                }
                let action = if self.admin {
                    DsqlAction::DbConnectAdmin
                } else {
                    DsqlAction::DbConnect
                };
                Ok(TokenFor::Dsql { action })
            }
        }
    }
}

/// Settings for `run`. Flags win over their environment variables, which win over the config
/// file, which wins over the defaults named in each help text.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// How tokens reach PgBouncer [default: config].
    #[arg(long, env = "AWS_PGBOUNCER_MODE")]
    pub mode: Option<Mode>,
    /// A TOML file with several databases, client users and PgBouncer settings.
    #[arg(long, env = "AWS_PGBOUNCER_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// The directory the daemon owns and writes pgbouncer.ini, databases.ini, userlist.txt and
    /// pg_hba.conf into [default: /run/aws-pgbouncer].
    #[arg(long, env = "AWS_PGBOUNCER_PGBOUNCER_DIR")]
    pub pgbouncer_dir: Option<std::path::PathBuf>,
    /// What the database is, which decides its tokens: RDS (also Aurora and RDS Proxy) or
    /// Aurora DSQL [default: rds].
    #[arg(long, env = "AWS_PGBOUNCER_KIND", value_enum)]
    pub kind: Option<TokenKind>,
    /// The database host (RDS or Aurora endpoint, DSQL cluster endpoint). Also read from
    /// RDS_HOST.
    #[arg(long, env = "AWS_PGBOUNCER_HOST")]
    pub host: Option<String>,
    /// The database port [default: 5432]. Also read from DB_PORT.
    #[arg(long, env = "AWS_PGBOUNCER_PORT")]
    pub port: Option<u16>,
    /// The RDS endpoint name tokens are signed for, when --host is another way to reach it
    /// (an NLB, a tunnel, a port-forward) [default: --host].
    #[arg(long, env = "AWS_PGBOUNCER_TOKEN_HOST")]
    pub token_host: Option<String>,
    /// The port tokens are signed for [default: --port].
    #[arg(long, env = "AWS_PGBOUNCER_TOKEN_PORT")]
    pub token_port: Option<u16>,
    /// The database name on the server, also the name applications connect to [default for
    /// --kind dsql: postgres]. Also read from DB_NAME.
    #[arg(long, env = "AWS_PGBOUNCER_DBNAME")]
    pub dbname: Option<String>,
    /// The IAM database user PgBouncer logs in as. Also read from DB_USERNAME.
    #[arg(long, env = "AWS_PGBOUNCER_USER")]
    pub user: Option<String>,
    /// Auth-query and passthrough modes: the IAM users allowed to log in, comma-separated
    /// (with --user).
    #[arg(long, env = "AWS_PGBOUNCER_ALLOW_USERS", value_delimiter = ',')]
    pub allow_users: Vec<String>,
    /// The region tokens are signed for; else AWS_REGION, the AWS profile, or the host name.
    #[arg(long, env = "AWS_PGBOUNCER_REGION")]
    pub region: Option<String>,
    /// An IAM role (possibly in another account) to assume for signing the tokens.
    #[arg(long, env = "AWS_PGBOUNCER_ROLE_ARN")]
    pub role_arn: Option<String>,
    /// The external ID the role's trust policy asks for (with --role-arn).
    #[arg(long, env = "AWS_PGBOUNCER_EXTERNAL_ID")]
    pub external_id: Option<String>,
    /// The session name the assumed role shows in CloudTrail (with --role-arn).
    #[arg(long, env = "AWS_PGBOUNCER_ROLE_SESSION_NAME")]
    pub role_session_name: Option<String>,
    /// How long the role's credentials live, in seconds (STS's DurationSeconds; AWS accepts
    /// 900 to 43200, capped by the role's MaxSessionDuration) [default: STS's, one hour].
    #[arg(long, env = "AWS_PGBOUNCER_ROLE_DURATION_SECONDS")]
    pub role_duration_seconds: Option<u64>,
    /// Where PgBouncer serves applications [default: 127.0.0.1:6432].
    #[arg(long, env = "AWS_PGBOUNCER_LISTEN")]
    pub listen: Option<String>,
    /// Auth-query mode: where the auth endpoint listens, `unix[:PORT]` for a socket in
    /// --pgbouncer-dir or ADDR:PORT (TLS) [default: unix:6433].
    #[arg(long, env = "AWS_PGBOUNCER_AUTH_LISTEN")]
    pub auth_listen: Option<String>,
    /// Passthrough mode: where the relay listens, `unix[:PORT]` for a socket in
    /// --pgbouncer-dir or a loopback ADDR:PORT (TLS) [default: unix:6434].
    #[arg(long, env = "AWS_PGBOUNCER_RELAY_LISTEN")]
    pub relay_listen: Option<String>,
    /// Passthrough mode: connections the relay admits at once [default: PgBouncer's server
    /// pool sizes for the relayed databases, summed, and a quarter more].
    #[arg(long, env = "AWS_PGBOUNCER_RELAY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub relay_max_connections: Option<u64>,
    /// Passthrough mode: new upstream logins per second per RDS host, with a burst of a tenth
    /// (AWS throttles beyond about 200 per instance); a login waits up to 5 s for its turn,
    /// else is refused with 57P03 [default: 100].
    #[arg(long, env = "AWS_PGBOUNCER_RELAY_LOGIN_RATE", value_parser = clap::value_parser!(u32).range(1..))]
    pub relay_login_rate: Option<u32>,
    /// Passthrough mode: keep the relay's thread on the CPU PgBouncer last ran on (read from
    /// /proc every 0.2 s; relay_listen on a unix socket only), so that their wake-ups stay on
    /// one CPU [default: false].
    #[arg(
        long,
        env = "AWS_PGBOUNCER_RELAY_FOLLOW_PGBOUNCER_CPU",
        value_name = "BOOL"
    )]
    pub relay_follow_pgbouncer_cpu: Option<bool>,
    /// Auth-query mode: allow --auth-listen on an address other than loopback.
    #[arg(long, env = "AWS_PGBOUNCER_AUTH_LISTEN_NON_LOOPBACK")]
    pub auth_listen_non_loopback: bool,
    /// PgBouncer's TLS mode towards the database [default: verify-full].
    #[arg(long, env = "AWS_PGBOUNCER_SERVER_TLS_MODE")]
    pub server_tls_mode: Option<TlsMode>,
    /// The CA bundle that signs the database's certificate (the RDS CA bundle).
    #[arg(long, env = "AWS_PGBOUNCER_SERVER_CA_FILE")]
    pub server_ca_file: Option<std::path::PathBuf>,
    /// The tokens' lifetime (X-Amz-Expires) in seconds: 1 to 900 with RDS databases, to
    /// 604800 with Aurora DSQL ones only [default: 900].
    #[arg(long, env = "AWS_PGBOUNCER_TOKEN_LIFETIME", value_parser = clap::value_parser!(u64).range(1..=TokenKind::Dsql.max_expires_in_secs()))]
    pub token_lifetime: Option<u64>,
    /// Start PgBouncer as a child process on the rendered config, as the old single-container
    /// sidecar did, and stop with it.
    #[arg(long, env = "AWS_PGBOUNCER_SUPERVISE")]
    pub supervise: bool,
    /// The PgBouncer executable that --supervise starts.
    #[arg(long, env = "AWS_PGBOUNCER_PGBOUNCER_BIN", default_value = "pgbouncer")]
    pub pgbouncer_bin: std::path::PathBuf,
    /// Where /healthz, /readyz, /startupz and /metrics are served.
    #[arg(
        long,
        env = "AWS_PGBOUNCER_HTTP_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub http_listen: String,
    /// After SIGTERM, keep serving (with /readyz at 503) this many seconds, so that load
    /// balancers and the app stop sending new work first.
    #[arg(long, env = "AWS_PGBOUNCER_MIN_SHUTDOWN_DELAY", default_value_t = 0)]
    pub min_shutdown_delay: u64,
    /// After SIGTERM, be gone within this many seconds; a supervised PgBouncer that has not
    /// finished its server work by then is killed.
    #[arg(long, env = "AWS_PGBOUNCER_MAX_SHUTDOWN_DELAY", default_value_t = 30)]
    pub max_shutdown_delay: u64,
    /// Exit 0 instead of 143 after SIGTERM (for Kubernetes Jobs).
    #[arg(long, env = "AWS_PGBOUNCER_EXIT_ZERO_ON_SIGTERM")]
    pub exit_zero_on_sigterm: bool,
    /// Serve POST /quitquitquit to callers on loopback: stop as after SIGTERM, then exit 0
    /// (for Kubernetes Jobs: the app ends its sidecars when it finishes).
    #[arg(long, env = "AWS_PGBOUNCER_QUITQUITQUIT")]
    pub quitquitquit: bool,
    /// Log line format.
    #[arg(long, env = "AWS_PGBOUNCER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
