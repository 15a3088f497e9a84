//! `aws-pgbouncer shutdown`: asks a running daemon to stop through `POST /quitquitquit`.
//!
//! Distroless images have no shell for a preStop hook or a Job's last step to run curl in;
//! the binary they already hold can make the request instead.

use crate::cli::DaemonHttp;
use crate::http::QUIT_PATH as PATH;
use crate::local_http;
use crate::wait::REQUEST_TIMEOUT;
use tokio::time::timeout;

/// `Ok` once the daemon has accepted; it then stops as after SIGTERM and exits 0.
pub async fn run(args: &DaemonHttp) -> Result<(), String> {
    let address = &args.http;
    let answer = timeout(REQUEST_TIMEOUT, local_http::status(address, "POST", PATH))
        .await
        .map_err(|_| {
            format!(
                "the daemon at {address} did not answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            )
        })??;
    match answer {
        200 => Ok(()),
        404 => Err(format!(
            "the daemon at {address} does not serve {PATH}: start it with --quitquitquit \
             (AWS_PGBOUNCER_QUITQUITQUIT=true)"
        )),
        403 => Err(format!(
            "the daemon at {address} refused: {PATH} is served to callers on loopback only"
        )),
        status => Err(format!("the daemon at {address} answered HTTP {status}")),
    }
}
