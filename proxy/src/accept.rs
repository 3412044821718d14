//! Spreading accepted connections over the sidecar's event loops (`[runtime] worker_threads`).
//!
//! With one loop, an [`Acceptor`] is the bound listener itself. With more, one accept task (on
//! the main loop) takes every connection and hands them out round-robin, each to one loop's
//! [`Acceptor`], where the connection stays for its whole life. Letting every loop accept from
//! the same socket instead does not spread anything: the first loop to wake drains the whole
//! accept queue, and the two h2 connections between a pair of sidecars would usually end up on
//! the same thread.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, warn};

use crate::signal::Shutdown;

/// Connections accepted but not yet taken by a loop, per loop: when a loop falls this far
/// behind, the accept task waits for it (and the kernel's backlog holds the rest).
const HANDOFF_DEPTH: usize = 64;

/// Pause after a failed accept (file descriptors exhausted, say) before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Where one event loop gets its connections.
#[derive(Debug)]
pub(crate) struct Acceptor {
    source: Source,
    local_addr: SocketAddr,
}

#[derive(Debug)]
enum Source {
    Listener(TcpListener),
    Handoff(mpsc::Receiver<(std::net::TcpStream, SocketAddr)>),
}

impl Acceptor {
    /// A loop that accepts from `listener` itself (the single-loop case).
    ///
    /// # Errors
    /// The socket's error reading its address.
    pub(crate) fn listener(listener: TcpListener) -> std::io::Result<Self> {
        Ok(Self {
            local_addr: listener.local_addr()?,
            source: Source::Listener(listener),
        })
    }

    /// The listening address connections arrive on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next connection for this loop. Accept errors (EMFILE and friends) are logged and
    /// retried after a short back-off instead of spinning, so this only returns connections.
    /// After shutdown has started and the accept task has stopped, this never resolves:
    /// callers select it against the shutdown token.
    pub(crate) async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let res = match &mut self.source {
                Source::Listener(l) => l.accept().await,
                Source::Handoff(rx) => match rx.recv().await {
                    Some((tcp, peer)) => TcpStream::from_std(tcp).map(|t| (t, peer)),
                    None => std::future::pending().await,
                },
            };
            match res {
                Ok(c) => return c,
                Err(e) => {
                    warn!(listen = %self.local_addr, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    /// The accept loop's limiter, the same on both sides: waits for a free slot under `limit`,
    /// then for the next connection; `None` once shutdown starts. The permit is the
    /// connection's slot: hold it until the connection ends.
    pub(crate) async fn accept_within(
        &mut self,
        limit: &Arc<Semaphore>,
        shutdown: &Shutdown,
    ) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = shutdown.token().cancelled() => return None,
        };
        let (tcp, peer) = tokio::select! {
            c = self.accept() => c,
            () = shutdown.token().cancelled() => return None,
        };
        Some((tcp, peer, permit))
    }
}

/// Acceptors for `loops` event loops on `listener`: the listener itself when `loops` is 1,
/// else one hand-off each, fed round-robin by an accept task spawned on the calling loop
/// (it stops when shutdown starts).
///
/// # Errors
/// The socket's error reading its address.
pub(crate) fn spread(
    listener: TcpListener,
    loops: usize,
    shutdown: &Shutdown,
) -> std::io::Result<Vec<Acceptor>> {
    if loops <= 1 {
        return Ok(vec![Acceptor::listener(listener)?]);
    }
    let local_addr = listener.local_addr()?;
    let (senders, acceptors): (Vec<_>, Vec<_>) = (0..loops)
        .map(|_| {
            let (tx, rx) = mpsc::channel(HANDOFF_DEPTH);
            let acceptor = Acceptor {
                source: Source::Handoff(rx),
                local_addr,
            };
            (tx, acceptor)
        })
        .unzip();
    tokio::spawn(hand_out(listener, senders, shutdown.clone()));
    Ok(acceptors)
}

async fn hand_out(
    listener: TcpListener,
    loops: Vec<mpsc::Sender<(std::net::TcpStream, SocketAddr)>>,
    shutdown: Shutdown,
) {
    let mut listener = match Acceptor::listener(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the listening socket's address: not accepting");
            return;
        }
    };
    let addr = listener.local_addr();
    let mut next = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.token().cancelled() => break,
        };
        // Deregistered from this loop's reactor; the receiving loop registers it with its own.
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                warn!(listen = %addr, %peer, error = %e, "cannot hand over an accepted connection");
                continue;
            }
        };
        let target = &loops[next];
        next = (next + 1) % loops.len();
        tokio::select! {
            res = target.send((tcp, peer)) => if res.is_err() {
                debug!(listen = %addr, "an event loop stopped taking connections");
            },
            () = shutdown.token().cancelled() => break,
        }
    }
    debug!(listen = %addr, "accept task stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_spread_round_robin() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let mut acceptors = spread(listener, 3, &shutdown).expect("spread");
        assert!(acceptors.iter().all(|a| a.local_addr() == addr));
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        for (i, acceptor) in acceptors.iter_mut().enumerate() {
            for _ in 0..2 {
                let (tcp, peer) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept())
                    .await
                    .unwrap_or_else(|_| panic!("loop {i} got fewer than 2 connections"));
                assert_eq!(tcp.peer_addr().expect("peer"), peer);
            }
        }
        for (i, acceptor) in acceptors.iter_mut().enumerate() {
            let more = tokio::time::timeout(Duration::from_millis(50), acceptor.accept()).await;
            assert!(more.is_err(), "loop {i} got more than its share");
        }
        shutdown.begin();
    }

    #[tokio::test]
    async fn one_loop_accepts_from_the_listener_itself() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut acceptors = spread(listener, 1, &Shutdown::new()).expect("spread");
        assert_eq!(acceptors.len(), 1);
        assert!(matches!(acceptors[0].source, Source::Listener(_)));
        let _client = TcpStream::connect(addr).await.expect("connect");
        acceptors[0].accept().await;
    }
}
