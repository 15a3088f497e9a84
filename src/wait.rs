//! `aws-pgbouncer wait`: blocks until the daemon reports that it has started.
//!
//! Made for a pod's `postStart` hook or an init script: an application container that starts
//! before the first tokens are in PgBouncer sees login failures, and images built from scratch
//! have neither curl nor a shell loop to poll with.

use crate::cli::WaitArgs;
use crate::local_http;
use std::time::Duration;
use tokio::time::{Instant, sleep, timeout};

const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// One poll; the daemon answers from memory, so anything slower is a daemon not yet serving.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// `Ok` once `/startupz` answers 200; `Err` with the last thing seen when time runs out.
pub async fn run(args: &WaitArgs) -> Result<(), String> {
    let address = &args.daemon.http;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let last = match timeout(
            REQUEST_TIMEOUT,
            local_http::status(address, "GET", "/startupz"),
        )
        .await
        {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => format!("/startupz answered HTTP {status}"),
            Ok(Err(error)) => error,
            Err(_) => format!(
                "/startupz did not answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        };
        if Instant::now() + POLL_INTERVAL >= deadline {
            return Err(format!(
                "the daemon at {address} did not report started within {} s (last: {last})",
                args.timeout
            ));
        }
        sleep(POLL_INTERVAL).await;
    }
}
