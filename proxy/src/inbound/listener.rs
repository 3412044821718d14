//! The inbound accept loop and one task per connection (mini-redis `Listener`/`Handler`):
//! a semaphore bounds open connections, the TLS handshake runs under a timeout, the verified
//! [`crate::tls::PeerIdentity`] is taken from the session (never from headers), and the
//! connection is served as HTTP/1.1 or HTTP/2 as negotiated by ALPN:
//!
//! - HTTP/1.1 by hyper, each request through [`handle`];
//! - HTTP/2 by the `h2` crate directly (`super::h2`), each stream's request through the same
//!   [`handle`], the streams polled inside the connection's task.
//!
//! One driver (`drive`) runs either protocol's connection to its end: it is closed
//! gracefully when it has been idle for `idle_timeout` or when shutdown starts (HTTP/2 sends
//! GOAWAY and lets the streams already open finish, HTTP/1.1 finishes the request in flight).
//!
//! It also holds the write-progress deadline (`send_timeout`): the socket is wrapped in a
//! [`WriteWatch`] that notes when a write is refused (the client reads nothing and the
//! buffers are full) and when one goes through again. A connection whose socket took no byte
//! for `send_timeout` is dropped, and with it the responses in flight and their app
//! connections. This is the right depth for HTTP/1.1, where hyper stops polling the response
//! body while the socket is blocked (a timer on the body would never be looked at), and it
//! also ends an HTTP/2 connection whose client reads nothing (HTTP/2 streams left without
//! flow-control window by a client that does read are reset in `super::h2`). The watch costs
//! a load per write; the driver is woken once when a stall begins, never per request.
//!
//! Each connection also watches for reloads ([`crate::state::State::subscribe`]): after every
//! swap it re-runs the *new* snapshot's verifier (chain to the new bundle, new CRL, expiry,
//! SVID rules) on the certificates its peer presented. A peer that no longer passes (revoked,
//! or its root retired) gets its connection closed: requests still arriving get 503, the
//! connection is shut down gracefully (HTTP/2 GOAWAY, HTTP/1.1 after the request in flight) and
//! dropped outright after [`UNTRUSTED_GRACE`].

use std::fmt::Display;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span};

use super::Inbound;
use super::h2::{H2Server, ResetBudget, h2_builder, serve_stream};
use super::request::{ConnCtx, RequestBody, handle};
use super::sources::Admission;
use crate::accept::Acceptor;
use crate::metrics::Metrics;
use crate::signal::Shutdown;
use crate::state::{Snapshot, State};
use crate::tls::bounds::is_bound_refusal;
use crate::tls::verify::failure_reason;

/// Accepts connections until shutdown starts.
pub async fn serve(inbound: Arc<Inbound>, mut listener: Acceptor, shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(inbound.cfg.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = shutdown.token().cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.token().cancelled() => break,
        };
        let admission = match inbound.sources.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                // Closed before a TLS byte is read; the slot's permit is released with it.
                inbound
                    .metrics
                    .inbound_connections_refused
                    .with_label_values(&[refusal.reason()])
                    .inc();
                drop((tcp, permit));
                continue;
            }
        };
        // Subscribe before loading the snapshot: a swap in between is then seen as a change.
        let reloads = inbound.state.subscribe();
        let snapshot = inbound.state.snapshot();
        let task = serve_one(
            inbound.clone(),
            tcp,
            snapshot,
            reloads,
            (permit, admission),
            shutdown.clone(),
        );
        shutdown
            .tracker()
            .spawn(task.instrument(info_span!("inbound", %peer)));
    }
    debug!("inbound listener stopped accepting");
}

/// Decrements the active-connection gauge when the connection task ends.
struct ActiveGuard(prometheus::IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_one(
    inbound: Arc<Inbound>,
    tcp: TcpStream,
    snapshot: Arc<Snapshot>,
    reloads: tokio::sync::watch::Receiver<u64>,
    (_permit, mut admission): (OwnedSemaphorePermit, Admission),
    shutdown: Shutdown,
) {
    let m = &inbound.metrics;
    m.inbound_active_connections.inc();
    let _active = ActiveGuard(m.inbound_active_connections.clone());
    let _ = tcp.set_nodelay(true);
    let Some(inb) = snapshot.inbound.as_ref() else {
        return;
    };
    if let Some(delay) = admission.delay() {
        // A penalized source (it sent a chain over the bounds): wait before any TLS work.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.token().cancelled() => return,
        }
    }
    let started = Instant::now();
    let accept = TlsAcceptor::from(inb.tls.clone()).accept(tcp);
    let tls = tokio::select! {
        r = tokio::time::timeout(inbound.cfg.handshake_timeout, accept) => r,
        () = shutdown.token().cancelled() => return,
    };
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if io_tls_error(&e).is_some_and(is_bound_refusal) {
                inbound.sources.penalize(admission.ip());
            }
            return handshake_failed(&inbound, io_reason(&e), &e);
        }
        Err(_) => return handshake_failed(&inbound, "timeout", &"handshake timed out"),
    };
    let (_, session) = tls.get_ref();
    let peer = match inb.verifier.identify(session) {
        Ok(p) => p,
        Err(e) => return handshake_failed(&inbound, failure_reason(&e), &e),
    };
    admission.authenticated();
    m.tls_handshakes
        .with_label_values(&["inbound", "ok", "none"])
        .inc();
    m.tls_handshake_duration
        .with_label_values(&["inbound"])
        .observe(started.elapsed().as_secs_f64());
    let h2 = session.alpn_protocol() == Some(b"h2");
    debug!(caller = %peer.id(), h2, "mTLS handshake ok");
    // Parsed once, by the verifier's `identify`.
    let serial = peer.serial_hex().to_owned();
    let mut recheck = Recheck {
        reloads,
        state: inbound.state.clone(),
        certs: session
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default(),
        serial,
    };
    let ctx = Arc::new(ConnCtx::new(inbound.clone(), &snapshot, peer));
    drop(snapshot);
    let activity = ctx.activity.clone();
    let conn_ctx = ctx.clone();
    let cfg = &inbound.cfg;
    let tls = WriteWatch {
        io: tls,
        activity: activity.clone(),
    };
    let timeouts = Timeouts {
        idle: cfg.idle_timeout,
        send: cfg.send_timeout,
        metrics: &inbound.metrics,
        protocol: if h2 { "h2" } else { "http1" },
    };
    if h2 {
        let mut builder = h2_builder(cfg.max_h2_streams, cfg.max_header_bytes);
        // Streams reset while in `h2`'s accept queue (a burst read at once, or a loop that
        // was not scheduled for a while) are accepted and counted by the reset budget like
        // any other; `h2`'s own limit on them stays only as the memory bound of that queue.
        builder.max_pending_accept_reset_streams(
            usize::try_from(cfg.max_h2_resets).unwrap_or(usize::MAX),
        );
        let resets = ResetBudget::new(
            cfg.max_h2_resets,
            cfg.h2_reset_window,
            inbound.metrics.clone(),
        );
        let send_timeout = cfg.send_timeout;
        let server = H2Server::new(
            builder.handshake(tls),
            move |req, respond| serve_stream(ctx.clone(), req, respond, send_timeout),
            resets,
        );
        drive(
            server,
            H2Server::graceful_shutdown,
            &activity,
            &timeouts,
            &shutdown,
            &mut recheck,
            &conn_ctx,
        )
        .await;
    } else {
        let svc =
            service_fn(move |req: Request<Incoming>| handle(ctx.clone(), req.map(RequestBody::H1)));
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_header_size(cfg.max_header_bytes);
        drive(
            b.serve_connection(TokioIo::new(tls), svc),
            |c| c.graceful_shutdown(),
            &activity,
            &timeouts,
            &shutdown,
            &mut recheck,
            &conn_ctx,
        )
        .await;
    }
}

/// A connection's timeouts, and where a send timeout is counted.
struct Timeouts<'a> {
    idle: Duration,
    send: Duration,
    metrics: &'a Metrics,
    protocol: &'static str,
}

fn handshake_failed(inbound: &Inbound, reason: &'static str, e: &dyn std::fmt::Display) {
    inbound
        .metrics
        .tls_handshakes
        .with_label_values(&["inbound", "error", reason])
        .inc();
    info!(reason, error = %e, "mTLS handshake refused");
}

/// The handshake failure reason carried inside tokio-rustls' I/O error.
fn io_reason(e: &std::io::Error) -> &'static str {
    match io_tls_error(e) {
        Some(tls) => failure_reason(tls),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}

/// The rustls error inside tokio-rustls' I/O error, if any.
fn io_tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// Requests in flight on a connection and when the last one ended (milliseconds since the
/// connection started), for the idle timeout; since when its socket refuses our writes, for
/// the send timeout.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
    /// Milliseconds since `started`, plus one, of the first refused write since the last one
    /// that went through; 0 while writes go through.
    stalled_ms: AtomicU64,
    /// The driver, waiting for a stall to begin.
    stall_waker: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            stalled_ms: AtomicU64::new(0),
            stall_waker: AtomicWaker::new(),
        }
    }

    /// A write was refused (`Pending`): the stall begins now unless it already had.
    fn write_refused(&self) {
        if self.stalled_ms.load(Ordering::Relaxed) == 0 {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.stalled_ms.store(ms + 1, Ordering::Relaxed);
            // Only registered while the driver waits for a stall: a no-op otherwise.
            self.stall_waker.wake();
        }
    }

    /// A write (or flush) went through: no stall.
    fn write_done(&self) {
        if self.stalled_ms.load(Ordering::Relaxed) != 0 {
            self.stalled_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Since when writes have been refused, if they are.
    fn stalled_since(&self) -> Option<Instant> {
        match self.stalled_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.started + Duration::from_millis(ms - 1)),
        }
    }

    /// Resolves once a stall has begun.
    async fn stall_begins(&self) {
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
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    fn idle_since(&self) -> Option<Instant> {
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
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's socket, noting refused and completed writes in its [`Activity`] for the
/// send timeout. Reads pass through.
struct WriteWatch<T> {
    io: T,
    activity: Arc<Activity>,
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

/// How long a connection whose peer is no longer trusted may take to finish its in-flight
/// requests before it is dropped.
pub const UNTRUSTED_GRACE: Duration = Duration::from_secs(5);

/// What a connection needs to re-check its peer after a reload.
struct Recheck {
    reloads: tokio::sync::watch::Receiver<u64>,
    state: Arc<State>,
    /// The peer's certificates as presented (leaf first).
    certs: Vec<CertificateDer<'static>>,
    serial: String,
}

impl Recheck {
    /// Whether the current snapshot's verifier still accepts the peer; logs why not.
    fn still_trusted(&self) -> bool {
        let snap = self.state.snapshot();
        let (Some(inb), Some((leaf, intermediates))) =
            (snap.inbound.as_ref(), self.certs.split_first())
        else {
            return false;
        };
        match inb
            .verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
        {
            Ok(_) => true,
            Err(e) => {
                info!(
                    peer_serial = %self.serial,
                    reason = failure_reason(&e),
                    error = %e,
                    "closing connection: its client certificate is no longer trusted after reload"
                );
                false
            }
        }
    }
}

/// Runs a connection to completion, asking it to finish gracefully on shutdown, once idle, or
/// when a reload stops trusting the peer (then dropped after [`UNTRUSTED_GRACE`]); dropping it
/// at once when its socket took no byte for the send timeout.
///
/// `graceful` asks the connection to finish (hyper's `graceful_shutdown`, or the HTTP/2
/// server's GOAWAY). A connection error is logged at debug level: it is the peer's business.
async fn drive<C, E>(
    conn: C,
    mut graceful: impl FnMut(Pin<&mut C>),
    activity: &Activity,
    timeouts: &Timeouts<'_>,
    shutdown: &Shutdown,
    recheck: &mut Recheck,
    ctx: &ConnCtx,
) where
    C: Future<Output = Result<(), E>>,
    E: Display,
{
    let idle = timeouts.idle;
    let mut conn = pin!(conn);
    let mut closing = false;
    let mut watching = true;
    let mut cutoff: Option<tokio::time::Instant> = None;
    loop {
        let stalled = activity.stalled_since();
        let timer = async {
            match (stalled, activity.idle_since()) {
                (Some(since), _) => tokio::time::sleep_until((since + timeouts.send).into()).await,
                (None, _) if closing => std::future::pending().await,
                (None, Some(since)) => tokio::time::sleep_until((since + idle).into()).await,
                // A request is in flight: look again later.
                (None, None) => tokio::time::sleep(idle.min(Duration::from_secs(1))).await,
            }
        };
        let hard_stop = async {
            match cutoff {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(error = %e, "inbound connection ended with an error");
                }
                return;
            }
            () = hard_stop => {
                debug!("untrusted peer's connection dropped after the grace period");
                return;
            }
            changed = recheck.reloads.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                } else if !recheck.still_trusted() {
                    watching = false;
                    ctx.distrust();
                    cutoff = Some(tokio::time::Instant::now() + UNTRUSTED_GRACE);
                    if !closing {
                        closing = true;
                        graceful(conn.as_mut());
                    }
                }
            }
            () = shutdown.token().cancelled(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            // A stall began: the next round arms its deadline.
            () = activity.stall_begins(), if stalled.is_none() => {}
            () = timer => {
                if activity.stalled_since().is_some_and(|s| s.elapsed() >= timeouts.send) {
                    timeouts
                        .metrics
                        .inbound_send_timeouts
                        .with_label_values(&[timeouts.protocol])
                        .inc();
                    info!(
                        send_timeout = ?timeouts.send,
                        protocol = timeouts.protocol,
                        "connection dropped: the client read nothing for the send timeout"
                    );
                    return;
                }
                if !closing && activity.idle_since().is_some_and(|s| s.elapsed() >= idle) {
                    closing = true;
                    graceful(conn.as_mut());
                }
            }
        }
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
