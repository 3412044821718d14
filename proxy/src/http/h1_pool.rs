//! The HTTP/1.1 keep-alive pool both hops use: the inbound side's to the app
//! ([`crate::inbound::upstream`]) and the outbound side's to a peer sidecar
//! ([`crate::outbound::upstream`]), which differ only in how a connection is opened (plain TCP,
//! or TLS with the peer pinned) and what each keeps beside it.
//!
//! - Idle connections are reused last-in first-out (the warmest first);
//! - at most `max_idle` are kept (one more is dropped, which closes it);
//! - one idle for `idle_timeout`, closed by the peer, or refused by the owner's own check (too
//!   old, retired) is never handed out, and is dropped by the owner's periodic `Idle::sweep`;
//! - a connection goes back only once its exchange has ended cleanly (`once_ready`: hyper's
//!   sender is ready again once the response was read to its end).

use std::future::poll_fn;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

/// A pooled connection: hyper's sender, or something that holds one.
pub(crate) trait Keepalive {
    /// The peer (or hyper) closed it.
    fn is_closed(&self) -> bool;
    /// It can take another request now.
    fn is_ready(&self) -> bool;
    /// Resolves once it can take another request; an error once it never will.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>>;
}

impl<B> Keepalive for SendRequest<B> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }

    fn is_ready(&self) -> bool {
        SendRequest::is_ready(self)
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        SendRequest::poll_ready(self, cx)
    }
}

/// Idle keep-alive connections and since when each is idle, oldest first.
#[derive(Debug)]
pub(crate) struct Idle<C> {
    conns: Vec<(C, Instant)>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl<C: Keepalive> Idle<C> {
    /// An empty set keeping at most `max_idle` connections for at most `idle_timeout` each.
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            conns: Vec::new(),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently idle connection that is open, within the idle timeout at `now`, and
    /// `usable`; the ones passed over on the way are dropped.
    pub(crate) fn take(&mut self, now: Instant, mut usable: impl FnMut(&C) -> bool) -> Option<C> {
        while let Some((conn, since)) = self.conns.pop() {
            if self.fresh(&conn, since, now) && usable(&conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` as idle since `now`; `false` (and `conn` dropped, which closes it) when
    /// `max_idle` are kept already or it is closed.
    pub(crate) fn put(&mut self, conn: C, now: Instant) -> bool {
        if self.conns.len() >= self.max_idle || conn.is_closed() {
            return false;
        }
        self.conns.push((conn, now));
        true
    }

    /// Drops the connections that are closed, past the idle timeout at `now`, or not
    /// `usable`; `true` when none is left.
    pub(crate) fn sweep(&mut self, now: Instant, mut usable: impl FnMut(&C) -> bool) -> bool {
        let (timeout, conns) = (self.idle_timeout, &mut self.conns);
        conns.retain(|(conn, since)| {
            !conn.is_closed() && now.saturating_duration_since(*since) < timeout && usable(conn)
        });
        conns.is_empty()
    }

    /// How many are idle.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    fn fresh(&self, conn: &C, since: Instant, now: Instant) -> bool {
        !conn.is_closed() && now.saturating_duration_since(since) < self.idle_timeout
    }
}

/// Hands `conn` back to its pool (`back(owner, conn)`) once it can take another request (the
/// response was read to its end): at once when it already can, else from a small task that
/// holds the owner weakly. A connection that closed or failed in the meantime is dropped.
pub(crate) fn once_ready<C, P>(mut conn: C, owner: &Arc<P>, back: fn(&Arc<P>, C))
where
    C: Keepalive + Send + 'static,
    P: Send + Sync + 'static,
{
    if conn.is_closed() {
        return;
    }
    if conn.is_ready() {
        back(owner, conn);
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let owner: Weak<P> = Arc::downgrade(owner);
    rt.spawn(async move {
        if poll_fn(|cx| conn.poll_ready(cx)).await.is_ok()
            && let Some(owner) = owner.upgrade()
        {
            back(&owner, conn);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(bool);

    impl Keepalive for Fake {
        fn is_closed(&self) -> bool {
            self.0
        }
        fn is_ready(&self) -> bool {
            true
        }
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn the_warmest_open_fresh_connection_is_taken_and_the_set_is_bounded() {
        let t0 = Instant::now();
        let mut idle = Idle::new(2, Duration::from_secs(10));
        assert!(idle.put(Fake(false), t0));
        assert!(!idle.put(Fake(true), t0), "a closed one is not kept");
        assert!(idle.put(Fake(false), t0 + Duration::from_secs(1)));
        assert!(!idle.put(Fake(false), t0), "bounded by max_idle");
        assert_eq!(idle.len(), 2);
        // Past the idle timeout for the first, not the second: the second (warmest) is taken.
        let later = t0 + Duration::from_millis(10_500);
        assert!(idle.take(later, |_| true).is_some());
        assert!(
            idle.take(later, |_| true).is_none(),
            "the stale one is dropped"
        );
        assert!(idle.put(Fake(false), later));
        assert!(
            idle.take(later, |_| false).is_none(),
            "the owner's check applies"
        );
        assert!(idle.put(Fake(false), later));
        assert!(idle.sweep(later + Duration::from_secs(11), |_| true));
    }
}
