//! Graceful shutdown: one signal listener per process, shared through a watch channel.
//!
//! The first SIGTERM or SIGINT triggers the shutdown: readiness turns 503, loops stop taking new
//! work, in-flight work drains, and the process exits 0. A second signal exits at once with
//! code 130, for an operator who does not want to wait.

use tokio::sync::watch;

/// A cloneable view of the shutdown state.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers the shutdown by hand (tests, or a fatal error in one task).
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// A shutdown that only fires through the returned trigger.
    pub fn manual() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Listens for SIGTERM and SIGINT (must be called inside a tokio runtime).
    pub fn install() -> (ShutdownTrigger, Shutdown) {
        let (trigger, shutdown) = Self::manual();
        let on_signal = trigger.clone();
        tokio::spawn(async move {
            let name = wait_for_signal().await;
            tracing::info!(signal = name, "shutdown requested; draining");
            on_signal.trigger();
            let name = wait_for_signal().await;
            tracing::warn!(signal = name, "second signal; exiting without draining");
            std::process::exit(130);
        });
        (trigger, shutdown)
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the shutdown is triggered (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means every trigger is gone: nothing can shut us down any more through this
        // channel, so treat it as a shutdown rather than hang forever.
        let _ = rx.wait_for(|v| *v).await;
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; falling back to Ctrl-C");
            ctrl_c().await
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    ctrl_c().await
}

async fn ctrl_c() -> &'static str {
    match tokio::signal::ctrl_c().await {
        Ok(()) => "SIGINT",
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for Ctrl-C; only a manual trigger stops this process");
            std::future::pending().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_trigger_wakes_every_clone() {
        let (trigger, shutdown) = Shutdown::manual();
        let other = shutdown.clone();
        assert!(!shutdown.is_triggered());
        let waiter = tokio::spawn(async move { other.wait().await });
        trigger.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert!(shutdown.is_triggered());
        shutdown.wait().await; // already triggered: returns at once
    }
}
