//! One of the crate's servers (the relay, the auth endpoint) spawned on the test's runtime,
//! and its stop: the server must return cleanly once told to.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Resolves when the test stops the server: the `shutdown` argument of the crate's `serve`s.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct InProcess {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// Spawns the future `serve` makes from the shutdown signal it is handed.
    pub fn spawn<F>(serve: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(Box::pin(async {
            let _ = stopped.await;
        })));
        Self { stop, task }
    }

    /// Tells the server to stop and waits for it to return without error.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}
