//! What a served connection knows of its own traffic, for its idle and send timeouts:
//! requests in flight and when the last one ended (`Activity`, `RequestGuard`), and since
//! when its socket refuses our writes (`WriteWatch`); for parking an idle HTTP/1.1
//! connection ([`super::h1_server`]), whether a request body is still unread (`BodyWatch`).
//!
//! The write-progress deadline (`send_timeout`): the socket is wrapped in a `WriteWatch` that
//! notes when a write is refused (the client reads nothing and the buffers are full) and when
//! one goes through again. A connection whose socket took no byte for `send_timeout` is
//! dropped by its driver, and with it the responses in flight. This is the right depth for
//! HTTP/1.1, where hyper stops polling the response body while the socket is blocked (a timer
//! on the body would never be looked at), and it also ends an HTTP/2 connection whose client
//! reads nothing. The watch costs a load per write; the driver is woken once when a stall
//! begins, never per request.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Requests in flight on a connection and when the last one ended (milliseconds since the
/// connection started), for the idle timeout; since when its socket refuses our writes, for
/// the send timeout.
#[derive(Debug)]
pub(crate) struct Activity {
    started: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
    /// Milliseconds since `started`, plus one, of the first refused write since the last one
    /// that went through; 0 while writes go through.
    stalled_ms: AtomicU64,
    /// The driver, waiting for a stall to begin.
    stall_waker: AtomicWaker,
    /// HTTP/1.1 request bodies begun and not yet read to their end ([`BodyWatch`]).
    unread_bodies: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            stalled_ms: AtomicU64::new(0),
            stall_waker: AtomicWaker::new(),
            unread_bodies: AtomicUsize::new(0),
        }
    }

    /// A write was refused (`Pending`): the stall begins now unless it already had.
    pub(crate) fn write_refused(&self) {
        if self.stalled_ms.load(Ordering::Relaxed) == 0 {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.stalled_ms.store(ms + 1, Ordering::Relaxed);
            // Only registered while the driver waits for a stall: a no-op otherwise.
            self.stall_waker.wake();
        }
    }

    /// A write (or flush) went through: no stall.
    pub(crate) fn write_done(&self) {
        if self.stalled_ms.load(Ordering::Relaxed) != 0 {
            self.stalled_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Since when writes have been refused, if they are.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        match self.stalled_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.started + Duration::from_millis(ms - 1)),
        }
    }

    /// Resolves once a stall has begun.
    pub(crate) async fn stall_begins(&self) {
        poll_fn(|cx| {
            self.stall_waker.register(cx.waker());
            match self.stalled_ms.load(Ordering::Relaxed) {
                0 => Poll::Pending,
                _ => Poll::Ready(()),
            }
        })
        .await;
    }

    /// A request started; the returned guard ends it when dropped (with the response body).
    pub(crate) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// A request body began: the returned watch says when it was read to its end.
    pub(crate) fn watch_body(self: &Arc<Self>) -> BodyWatch {
        self.unread_bodies.fetch_add(1, Ordering::Relaxed);
        BodyWatch(Some(self.clone()))
    }

    /// Whether every request body was read to its end: none has bytes left on the socket. A
    /// body dropped before its end keeps this false for the connection's life.
    pub(crate) fn bodies_read(&self) -> bool {
        self.unread_bodies.load(Ordering::Relaxed) == 0
    }

    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.active.load(Ordering::Relaxed) == 0)
            .then(|| self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Ends a request's activity on drop.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request body being read ([`Activity::watch_body`]): [`BodyWatch::ended`] when its last
/// byte was read. Dropped before, it leaves the body counted as unread.
#[derive(Debug)]
pub(crate) struct BodyWatch(Option<Arc<Activity>>);

impl BodyWatch {
    /// The body was read to its end.
    pub(crate) fn ended(&mut self) {
        if let Some(a) = self.0.take() {
            a.unread_bodies.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection's socket, noting refused and completed writes in its [`Activity`] for the
/// send timeout. Reads pass through.
pub(crate) struct WriteWatch<T> {
    pub(crate) io: T,
    pub(crate) activity: Arc<Activity>,
}

impl<T> WriteWatch<T> {
    fn note<R>(&self, polled: Poll<R>) -> Poll<R> {
        match polled {
            Poll::Pending => self.activity.write_refused(),
            Poll::Ready(_) => self.activity.write_done(),
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.note(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(polled)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stall_starts_at_the_first_refused_write_and_ends_at_the_next_one_through() {
        let activity = Arc::new(Activity::new());
        assert_eq!(activity.stalled_since(), None);
        // The driver, waiting for a stall, is woken by the first refused write.
        let watched = activity.clone();
        let driver = tokio::spawn(async move { watched.stall_begins().await });
        tokio::task::yield_now().await;
        let before = Instant::now();
        activity.write_refused();
        tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("the driver learns that a stall began")
            .expect("join");
        let since = activity.stalled_since().expect("stalled");
        assert!(since <= before + Duration::from_millis(2));
        // Later refusals keep the first one's time; a write through ends the stall.
        std::thread::sleep(Duration::from_millis(20));
        activity.write_refused();
        assert_eq!(activity.stalled_since(), Some(since));
        activity.write_done();
        assert_eq!(activity.stalled_since(), None);
    }
}
