//! The hop to the app: a small pool of keep-alive HTTP/1.1 connections to its one address.
//!
//! - Idle connections are reused last-in first-out (the warmest first), at most
//!   `app_pool_max_idle` of them are kept, and one idle for `app_pool_idle_timeout` is closed
//!   (checked when it is taken, and by a sweep task that runs only while the pool holds
//!   connections; it is spawned on the runtime that first returns one, never in
//!   [`AppPool::new`]).
//! - A connection goes back to the pool only once the app's response has been read to its end
//!   without error; one whose response was dropped half-read, or that failed, is closed.
//! - Bodies stream both ways; nothing is buffered.
//! - Retry: a request is sent again (once, on a new connection) only when a *pooled*
//!   connection turned out to be closed and hyper handed the request back unsent. A request
//!   any byte of which may have been written is never retried.
//!
//! The pool lives in one [`super::Inbound`], which serves one event loop: connection tasks are
//! spawned on the runtime of the request that opened them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::http::h1_pool::{Idle, once_ready};

use crate::http::body::HttpBody as RequestBody;

/// What a request body sent to the app must be (the caller's [`RequestBody`]; tests use
/// others).
pub(crate) trait AppRequestBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

impl<B> AppRequestBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

/// Forwarding to the app failed (the caller gets 502).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// No TCP connection to the app.
    #[error("cannot connect to the app at {addr}: {source}")]
    Connect {
        /// The app's address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The HTTP/1.1 exchange failed (reset, closed mid-response, malformed response).
    #[error(transparent)]
    Http(hyper::Error),
    /// The h2c connection or stream failed (`app_protocol = "h2c"`, issue 17).
    #[error("h2c to the app: {0}")]
    H2(h2::Error),
}

/// Keep-alive HTTP/1.1 connections to the app.
pub(crate) struct AppPool<B: AppRequestBody = RequestBody> {
    addr: SocketAddr,
    max_idle: usize,
    idle_timeout: Duration,
    idle: Mutex<Pooled<B>>,
}

struct Pooled<B> {
    /// Idle connections (the keep-alive pool both hops share).
    conns: Idle<SendRequest<B>>,
    /// A sweep task is running.
    sweeping: bool,
}

impl<B: AppRequestBody> std::fmt::Debug for AppPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPool")
            .field("addr", &self.addr)
            .field("max_idle", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<B: AppRequestBody> AppPool<B> {
    /// An empty pool for `addr`; nothing is opened or spawned until the first request.
    pub(crate) fn new(addr: SocketAddr, max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            addr,
            max_idle,
            idle_timeout,
            idle: Mutex::new(Pooled {
                conns: Idle::new(max_idle, idle_timeout),
                sweeping: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pooled<B>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the response head; the body
    /// streams on and returns the connection to the pool once read to its end.
    ///
    /// # Errors
    /// No connection to the app, or the exchange failed.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` stores its by-value arguments twice in its future"
    )]
    pub(crate) fn send(
        self: &Arc<Self>,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<AppBody<B>>, AppError>> + Send + '_ {
        // This future is part of every request's task (moved, and copied on each move, by
        // hyper and tokio): nothing large may stay alive across an await in it, the rare
        // paths (new connection, retry) are boxed, and it is an `async` block rather than an
        // `async fn` (whose by-value arguments are stored twice).
        async move {
            let Some(mut sender) = self.take() else {
                let fresh = Box::pin(self.send_fresh(req)).await;
                return fresh.map(|(sender, resp)| self.lend(sender, resp));
            };
            let failed = match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lend(sender, resp)),
                Err(e) => e,
            };
            drop(sender);
            let retried = Box::pin(self.resend(failed)).await;
            retried.map(|(sender, resp)| self.lend(sender, resp))
        }
    }

    /// The response, its body holding `sender` until read to its end.
    fn lend(
        self: &Arc<Self>,
        sender: SendRequest<B>,
        resp: Response<Incoming>,
    ) -> Response<AppBody<B>> {
        let lease = if resp.body().is_end_stream() {
            // No body (HEAD, 204, 304, `content-length: 0`): reusable right away.
            self.put(sender);
            None
        } else {
            Some(Lease {
                sender,
                pool: Arc::clone(self),
            })
        };
        resp.map(|body| AppBody { body, lease })
    }

    /// After a pooled connection failed: again on a new connection if the request came back
    /// unsent (the connection had closed while idle), else the error.
    async fn resend(
        &self,
        mut e: hyper::client::conn::TrySendError<Request<B>>,
    ) -> Result<(SendRequest<B>, Response<Incoming>), AppError> {
        match e.take_message() {
            Some(req) => {
                debug!(app = %self.addr, "pooled app connection closed before the request was written; retrying on a new one");
                self.send_fresh(req).await
            }
            None => Err(AppError::Http(e.into_error())),
        }
    }

    /// On a new connection.
    async fn send_fresh(
        &self,
        req: Request<B>,
    ) -> Result<(SendRequest<B>, Response<Incoming>), AppError> {
        let mut sender = self.connect().await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((sender, resp)),
            Err(e) => Err(AppError::Http(e)),
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, AppError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| AppError::Connect {
                addr: self.addr,
                source,
            })?;
        // Requests and responses are small writes; do not let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(AppError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "app connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// The most recently idle connection that is still open and not past the idle timeout.
    fn take(&self) -> Option<SendRequest<B>> {
        self.lock().conns.take(Instant::now(), |_| true)
    }

    /// A connection whose exchange ended cleanly: idle, or once it has finished (the request
    /// body may still be on its way when the app answered early).
    fn put(self: &Arc<Self>, sender: SendRequest<B>) {
        if self.max_idle == 0 {
            return;
        }
        once_ready(sender, self, Self::put_ready);
    }

    fn put_ready(self: &Arc<Self>, sender: SendRequest<B>) {
        let mut idle = self.lock();
        // Dropping the sender when it is not kept closes the connection.
        if idle.conns.put(sender, Instant::now())
            && !idle.sweeping
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            idle.sweeping = true;
            rt.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Idle connections (for tests).
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.lock().conns.len()
    }
}

/// Closes idle connections past the idle timeout (or closed by the app); ends when the pool
/// is empty or dropped, and is started again by the next connection returned.
async fn sweep<B: AppRequestBody>(pool: Weak<AppPool<B>>) {
    let Some(period) = pool
        .upgrade()
        .map(|p| (p.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(15)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = pool.lock();
        if idle.conns.sweep(Instant::now(), |_| true) {
            idle.sweeping = false;
            return;
        }
    }
}

/// A connection lent to one response.
struct Lease<B: AppRequestBody> {
    sender: SendRequest<B>,
    pool: Arc<AppPool<B>>,
}

/// The app's response body; gives its connection back to the pool once read to its end
/// (dropped earlier, or failed, the connection closes).
pub(crate) struct AppBody<B: AppRequestBody = RequestBody> {
    body: Incoming,
    lease: Option<Lease<B>>,
}

impl<B: AppRequestBody> AppBody<B> {
    fn release(&mut self) {
        if let Some(l) = self.lease.take() {
            l.pool.put(l.sender);
        }
    }
}

impl<B: AppRequestBody> Body for AppBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            // The last bytes of a sized body: servers stop polling here.
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: AppRequestBody> Drop for AppBody<B> {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1.1 app answering `GET /n` with `n` bytes, counting the connections it accepts.
    async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let n: usize = req.uri().path()[1..].parse().unwrap_or(2);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; n]))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header(http::header::HOST, "app")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn fetch(pool: &Arc<AppPool<Full<Bytes>>>, path: &str) -> usize {
        let resp = pool.send(get(path)).await.expect("app answers");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        body.len()
    }

    #[tokio::test]
    async fn connections_are_reused_after_a_fully_read_response() {
        let (addr, accepted) = app().await;
        let pool = Arc::new(AppPool::new(addr, 4, Duration::from_secs(60)));
        for _ in 0..3 {
            assert_eq!(fetch(&pool, "/100000").await, 100_000);
            assert_eq!(fetch(&pool, "/0").await, 0);
        }
        // Servers stop polling a sized body once `is_end_stream`, then drop it.
        let mut body = pool.send(get("/300000")).await.unwrap().into_body();
        while !body.is_end_stream() {
            body.frame().await.unwrap().unwrap();
        }
        drop(body);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_len(), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_closes_its_connection() {
        let (addr, accepted) = app().await;
        let pool = Arc::new(AppPool::new(addr, 4, Duration::from_secs(60)));
        let mut body = pool.send(get("/1000000")).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < 1_000_000));
        drop(body);
        assert_eq!(pool.idle_len(), 0);
        assert_eq!(fetch(&pool, "/10").await, 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_and_closed_after_the_idle_timeout() {
        let (addr, accepted) = app().await;
        let pool = Arc::new(AppPool::new(addr, 1, Duration::from_millis(200)));
        // Two responses held at once: two connections, only one kept when both end.
        let a = pool.send(get("/10")).await.unwrap();
        let b = pool.send(get("/10")).await.unwrap();
        a.into_body().collect().await.unwrap();
        b.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_len(), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            pool.idle_len(),
            0,
            "the sweep closes it after the idle timeout"
        );
        assert_eq!(fetch(&pool, "/10").await, 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        let none = Arc::new(AppPool::new(addr, 0, Duration::from_secs(60)));
        assert_eq!(fetch(&none, "/10").await, 10);
        assert_eq!(none.idle_len(), 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_before_the_request_was_written_is_retried_once() {
        let (addr, accepted) = app().await;
        let pool = Arc::new(AppPool::new(addr, 4, Duration::from_secs(60)));
        // A pooled connection whose peer has gone, before its driver has noticed (it has not
        // run yet: single-threaded runtime, no await in between).
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        tokio::spawn(conn);
        drop(theirs);
        pool.put_ready(sender);
        assert_eq!(fetch(&pool, "/10").await, 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connect_failure_is_reported_with_the_address() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = Arc::new(AppPool::<Full<Bytes>>::new(
            addr,
            4,
            Duration::from_secs(60),
        ));
        let err = pool.send(get("/")).await.err().unwrap();
        assert!(matches!(err, AppError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
