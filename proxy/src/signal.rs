//! Signals and the shutdown sequence.
//!
//! SIGTERM or SIGINT starts a graceful shutdown: `/readyz` turns 503 ([`Shutdown::is_draining`]),
//! every listener stops accepting and every open connection is told to finish
//! ([`Shutdown::token`] is cancelled: HTTP/1.1 connections close after their in-flight
//! request, HTTP/2 connections send GOAWAY), and the process waits for the connection tasks
//! ([`Shutdown::tracker`]) up to the grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared shutdown state. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
    draining: Arc<AtomicBool>,
}

impl Shutdown {
    /// A fresh, not-cancelled shutdown handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when shutdown starts: listeners stop accepting and connections drain.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Tracks connection tasks (inbound and outbound) so shutdown can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Whether shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts shutdown (idempotent).
    pub fn begin(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.token.cancel();
    }

    /// Starts shutdown, waits for tracked tasks up to `grace`; returns how many were still
    /// running when the grace period ran out.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.begin();
        self.tracker.close();
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

/// SIGTERM and SIGINT handlers, installed before anything is bound so a signal that arrives
/// early is never lost to the default action.
#[derive(Debug)]
pub(crate) struct Terminate {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Terminate {
    /// Installs the handlers.
    ///
    /// # Errors
    /// The I/O error if a handler cannot be installed.
    pub(crate) fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT and returns the signal's name.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
