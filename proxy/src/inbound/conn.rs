//! One inbound connection (mini-redis's `Handler`): a `Conn` owns what the connection
//! needs from accept to close. The TLS handshake runs under a timeout, the verified
//! [`crate::tls::PeerIdentity`] is taken from the session (never from headers), and the
//! connection is served as HTTP/1.1 or HTTP/2 as negotiated by ALPN:
//!
//! - HTTP/1.1 by hyper, each request through `handle`; a connection idle for
//!   [`PARK_AFTER`] lets go of hyper until its client writes again ([`H1Conn`]);
//! - HTTP/2 by `H2Server` (the `h2` crate directly), each stream through `serve_stream`,
//!   which runs the same `handle`, the streams polled inside the connection's task.
//!
//! One driver (`Session::drive`) runs either protocol's connection to its end: it is closed
//! gracefully when it has been idle for `idle_timeout` (HTTP/1.1: or `header_read_timeout`,
//! if shorter) or when shutdown starts (HTTP/2 sends
//! GOAWAY and lets the streams already open finish, HTTP/1.1 finishes the request in flight),
//! and dropped when its socket took no byte for `send_timeout` ([`crate::http::activity`]).
//!
//! Each connection also watches for reloads ([`crate::state::State::subscribe`]): after every
//! swap it re-runs the *new* snapshot's verifier (chain to the new bundle, new CRL, expiry,
//! SVID rules) on the certificates its peer presented. A peer that no longer passes (revoked,
//! or its root retired) gets its connection closed: requests still arriving get 503, the
//! connection is shut down gracefully (HTTP/2 GOAWAY, HTTP/1.1 after the request in flight) and
//! dropped outright after `UNTRUSTED_GRACE`.

use std::fmt::Display;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};

use super::Inbound;
use super::request::{ConnCtx, RequestBody, handle};
use super::sources::Admission;
use super::websocket;
use crate::http::activity::WriteWatch;
use crate::http::body::{BoxError, RecvBody, pipe_within};
use crate::http::h1_server::{H1Conn, H1Io, H1Service, PARK_AFTER};
use crate::http::h2_server::{
    H2Server, ResetBudget, StreamEnd, end_of, fit_for_h2, h2_builder, reset_end,
};
use crate::http::linger::Linger;
use crate::metrics::GaugeGuard;
use crate::signal::Shutdown;
use crate::state::{Snapshot, State};
use crate::tls::verify::failure_reason;
use futures_util::future::Either;

/// One accepted connection and what it holds until it ends.
pub(super) struct Conn {
    inbound: Arc<Inbound>,
    /// The snapshot current at accept: its TLS acceptor and verifier.
    snapshot: Arc<Snapshot>,
    /// Swaps of the snapshot, for the peer's re-check.
    reloads: watch::Receiver<u64>,
    admission: Admission,
    shutdown: Shutdown,
    /// The connection's slot under `max_connections`.
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// A connection just accepted, holding its slot (`permit`) and its source's admission.
    /// Subscribe to `reloads` before loading `snapshot`: a swap in between is then seen as a
    /// change.
    pub(super) fn new(
        inbound: Arc<Inbound>,
        snapshot: Arc<Snapshot>,
        reloads: watch::Receiver<u64>,
        admission: Admission,
        permit: OwnedSemaphorePermit,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            inbound,
            snapshot,
            reloads,
            admission,
            shutdown,
            _permit: permit,
        }
    }

    /// Serves the connection on `tcp` to its end.
    ///
    /// The task's future is allocated at spawn for its largest state and kept for the
    /// connection's lifetime, so the handshake and each protocol's serving are boxed: an idle
    /// HTTP/1.1 connection carries neither the handshake's state nor an HTTP/2 connection's.
    pub(super) async fn run(self, tcp: TcpStream) {
        let _active = GaugeGuard::new(&self.inbound.metrics.inbound_active_connections);
        let _ = tcp.set_nodelay(true);
        let Self {
            inbound,
            snapshot,
            reloads,
            mut admission,
            shutdown,
            _permit,
        } = self;
        // Boxed in a statement of its own: a temporary lives (and keeps its slot in this
        // future) until the end of the statement that awaits it.
        let accepting = Box::pin(accept(
            &inbound,
            snapshot,
            reloads,
            &mut admission,
            shutdown,
            tcp,
        ));
        let Some((session, tls, h2)) = accepting.await else {
            return;
        };
        if h2 {
            let serving = Box::pin(session.serve_h2(tls));
            serving.await;
        } else {
            let serving = Box::pin(session.serve_h1(tls));
            serving.await;
        }
    }
}

/// The mTLS handshake (after the source's penalty delay, if any) under its timeout, and the
/// peer's identity: the [`Session`] that serves the connection, its socket, and whether ALPN
/// chose HTTP/2. `None` when the handshake failed (counted and logged) or shutdown began.
async fn accept(
    inbound: &Arc<Inbound>,
    snapshot: Arc<Snapshot>,
    reloads: watch::Receiver<u64>,
    admission: &mut Admission,
    shutdown: Shutdown,
    tcp: TcpStream,
) -> Option<(Session, WriteWatch<TlsStream<Linger>>, bool)> {
    let m = &inbound.metrics;
    let inb = snapshot.inbound.as_ref()?;
    tokio::select! {
        () = admission.penalty() => {}
        () = shutdown.token().cancelled() => return None,
    }
    let started = Instant::now();
    // Closed lingering, so a client still writing reads our GOAWAY or alert first.
    let accept = TlsAcceptor::from(inb.tls.clone()).accept(Linger::new(tcp));
    let tls = tokio::select! {
        r = tokio::time::timeout(inbound.cfg.handshake_timeout, accept) => r,
        () = shutdown.token().cancelled() => return None,
    };
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            admission.handshake_failed(&e);
            handshake_failed(inbound, io_reason(&e), &e);
            return None;
        }
        Err(_) => {
            handshake_failed(inbound, "timeout", &"handshake timed out");
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    let peer = match inb.verifier.identify(session) {
        Ok(p) => p,
        Err(e) => {
            handshake_failed(inbound, failure_reason(&e), &e);
            return None;
        }
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
    let recheck = Recheck {
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
    let tls = WriteWatch {
        io: tls,
        activity: ctx.activity.clone(),
    };
    let session = Session {
        ctx,
        recheck,
        shutdown,
        protocol: if h2 { "h2" } else { "http1" },
    };
    Some((session, tls, h2))
}

/// A connection once its peer is known: what runs it to its end.
struct Session {
    ctx: Arc<ConnCtx>,
    recheck: Recheck,
    shutdown: Shutdown,
    /// `h2` or `http1`, for the send-timeout metric.
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

/// How long a connection whose peer is no longer trusted may take to finish its in-flight
/// requests before it is dropped.
pub(super) const UNTRUSTED_GRACE: Duration = Duration::from_secs(5);

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

impl Session {
    /// Serves an HTTP/2 connection (`h2`, each stream through [`serve_stream`]) to its end.
    async fn serve_h2(mut self, tls: WriteWatch<TlsStream<Linger>>) {
        let ctx = self.ctx.clone();
        let inbound = &ctx.inbound;
        let cfg = &inbound.cfg;
        let handshake = {
            let mut builder = h2_builder(cfg.max_h2_streams, cfg.max_header_bytes);
            // Streams reset while in `h2`'s accept queue (a burst read at once, or a loop that
            // was not scheduled for a while) are accepted and counted by the reset budget like
            // any other; `h2`'s own limit on them stays only as the memory bound of that queue.
            builder.max_pending_accept_reset_streams(
                usize::try_from(cfg.max_h2_resets).unwrap_or(usize::MAX),
            );
            // WebSocket tunnels from a peer's outbound side: RFC 8441 (issue 17).
            builder.enable_connect_protocol();
            builder.handshake(tls)
        };
        let resets = ResetBudget::new(
            cfg.max_h2_resets,
            cfg.h2_reset_window,
            inbound.metrics.clone(),
        );
        let send_timeout = cfg.send_timeout;
        let stream_ctx = ctx.clone();
        let server = H2Server::new(
            handshake,
            move |req, respond| {
                // A tunnel is rare and long: boxed, so the request streams' futures stay
                // what they were (one branch per stream to tell them apart).
                if websocket::is_tunnel(&req) {
                    let side = stream_ctx.inbound.websocket.clone();
                    let tunnel = websocket::serve(stream_ctx.clone(), req, respond, side);
                    return Either::Right(Box::pin(tunnel));
                }
                Either::Left(serve_stream(stream_ctx.clone(), req, respond, send_timeout))
            },
            resets,
        );
        self.drive(pin!(server), cfg.idle_timeout).await;
    }

    /// Serves an HTTP/1.1 connection (hyper, each request through `handle`) to its end,
    /// letting go of hyper while it waits for its next request ([`H1Conn`]).
    ///
    /// The connection is made before the future: the future holds it (and the TLS stream in
    /// it) once, where an `async fn` would also keep the `tls` argument's slot.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` stores its by-value arguments twice in its future"
    )]
    fn serve_h1(
        mut self,
        tls: WriteWatch<TlsStream<Linger>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let ctx = self.ctx.clone();
        let cfg = &ctx.inbound.cfg;
        let svc_ctx = ctx.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            // A body with bytes to come is watched to its end: the connection parks only
            // once nothing of it is left on the socket.
            let req = req.map(|body| match body.is_end_stream() {
                true => RequestBody::H1(body),
                false => RequestBody::H1Watched(body, svc_ctx.activity.watch_body()),
            });
            handle(svc_ctx.clone(), req)
        });
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_header_size(cfg.max_header_bytes);
        let mut conn = H1Conn::new(
            b,
            tls,
            svc,
            ctx.activity.clone(),
            ctx.inbound.metrics.inbound_parked_connections.clone(),
        );
        // hyper bounds the wait for the next request by `header_read_timeout`; while the
        // connection is parked the driver does.
        let idle = cfg.idle_timeout.min(cfg.header_read_timeout);
        async move {
            self.drive(Pin::new(&mut conn), idle).await;
        }
    }

    /// Runs a connection to completion, asking it to finish gracefully on shutdown, once idle
    /// for `idle`, or when a reload stops trusting the peer (then dropped after
    /// [`UNTRUSTED_GRACE`]); dropping it at once when its socket took no byte for the send
    /// timeout; parking it ([`Served::park`]) once per idle spell of [`PARK_AFTER`].
    ///
    /// A connection error is logged at debug level: it is the peer's business.
    async fn drive<C: Served>(&mut self, mut conn: Pin<&mut C>, idle: Duration) {
        let Self {
            ctx,
            recheck,
            shutdown,
            protocol,
        } = self;
        let protocol = *protocol;
        let activity = &*ctx.activity;
        let cfg = &ctx.inbound.cfg;
        let send = cfg.send_timeout;
        let mut closing = false;
        // The idle spell (its start) in which the connection was last parked: once per spell,
        // so one that woke and has not finished a request since is not parked again.
        let mut parked_in: Option<Instant> = None;
        let mut watching = true;
        let mut cutoff: Option<tokio::time::Instant> = None;
        loop {
            let stalled = activity.stalled_since();
            let timer = async {
                match (stalled, activity.idle_since()) {
                    (Some(since), _) => tokio::time::sleep_until((since + send).into()).await,
                    (None, _) if closing => std::future::pending().await,
                    (None, Some(since)) if C::PARKS && parked_in != Some(since) => {
                        tokio::time::sleep_until((since + PARK_AFTER.min(idle)).into()).await;
                    }
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
                            conn.as_mut().graceful();
                        }
                    }
                }
                () = shutdown.token().cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful();
                }
                // A stall began: the next round arms its deadline.
                () = activity.stall_begins(), if stalled.is_none() => {}
                () = timer => {
                    if activity.stalled_since().is_some_and(|s| s.elapsed() >= send) {
                        ctx.inbound
                            .metrics
                            .inbound_send_timeouts
                            .with_label_values(&[protocol])
                            .inc();
                        info!(
                            send_timeout = ?send,
                            protocol,
                            "connection dropped: the client read nothing for the send timeout"
                        );
                        return;
                    }
                    let Some(since) = activity.idle_since() else { continue };
                    if closing {
                        continue;
                    }
                    if since.elapsed() >= idle {
                        closing = true;
                        conn.as_mut().graceful();
                    } else if C::PARKS
                        && parked_in != Some(since)
                        && since.elapsed() >= PARK_AFTER
                        && activity.stalled_since().is_none()
                    {
                        parked_in = Some(since);
                        conn.as_mut().park();
                    }
                }
            }
        }
    }
}

/// A connection as [`Session::drive`] runs it: HTTP/1.1 ([`H1Conn`]) or HTTP/2 ([`H2Server`]).
trait Served: Future<Output = Result<(), Self::Error>> {
    /// Why the connection ended early.
    type Error: Display;

    /// Whether [`Served::park`] does anything.
    const PARKS: bool;

    /// Asks the connection to finish (hyper's graceful shutdown, HTTP/2's GOAWAY).
    fn graceful(self: Pin<&mut Self>);

    /// The connection has been idle for [`PARK_AFTER`]: let go of what it holds for requests.
    fn park(self: Pin<&mut Self>) {}
}

impl<T: H1Io, S: H1Service> Served for H1Conn<T, S> {
    type Error = BoxError;
    const PARKS: bool = true;

    fn graceful(self: Pin<&mut Self>) {
        self.get_mut().graceful_shutdown();
    }

    fn park(self: Pin<&mut Self>) {
        self.get_mut().park();
    }
}

impl<T, S, F> Served for H2Server<T, S, F>
where
    T: H1Io,
    S: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
    F: Future<Output = StreamEnd>,
{
    type Error = h2::Error;
    const PARKS: bool = false;

    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// One HTTP/2 stream: the request through [`handle`], then the response head and body.
///
/// A reset from the client while the response is being made drops the handling (and with it
/// the request to the app), as hyper did. The [`super::request::ResponseBody`] (and so the
/// request's activity for the idle timeout) lives until its last byte is queued.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` stores its by-value arguments twice in its future"
)]
pub(super) fn serve_stream(
    ctx: Arc<ConnCtx>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    send_timeout: Duration,
) -> impl Future<Output = StreamEnd> + Send + 'static {
    async move {
        let resp = {
            let mut handling = pin!(handle(ctx, req.map(|s| RequestBody::H2(RecvBody::new(s)))));
            // A `move` closure owning its flag and the two borrows: 16 bytes less per stream
            // than borrowing three locals (the room the limit guard in the body takes).
            let respond = &mut respond;
            let mut polled = false;
            poll_fn(move |cx| {
                // The first poll looks at the reset first: a stream reset before we got to it
                // never reaches the app. Later polls look after the handling, whose readiness
                // is the common case; either way the reset's waker is registered.
                let first = !std::mem::replace(&mut polled, true);
                if first && let Poll::Ready(reset) = respond.poll_reset(cx) {
                    return Poll::Ready(Err(reset_end(reset)));
                }
                if let Poll::Ready(Ok(resp)) = handling.as_mut().poll(cx) {
                    return Poll::Ready(Ok(resp));
                }
                if first {
                    return Poll::Pending;
                }
                respond.poll_reset(cx).map(|reset| Err(reset_end(reset)))
            })
            .await
        };
        let resp = match resp {
            Ok(resp) => resp,
            Err(end) => return end,
        };
        let (mut head, body) = resp.into_parts();
        fit_for_h2(&mut head.headers, &body);
        let end = body.is_end_stream();
        match respond.send_response(Response::from_parts(head, ()), end) {
            Ok(tx) if !end => match pipe_within(body, tx, Some(send_timeout)).await {
                Ok(()) => StreamEnd::Done,
                Err(e) => {
                    debug!(error = %e, "HTTP/2 response body not sent whole");
                    end_of(&e)
                }
            },
            Ok(_) => StreamEnd::Done,
            Err(e) => {
                debug!(error = %e, "HTTP/2 response head not sent");
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
                StreamEnd::Done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's future (`handle`'s and the response's) is copied into the stream set once
    /// per request: keep it small. Raise the bound only knowingly: 1800 → 1824 when the
    /// hardening (reset check, `send_timeout`) and the audit evidence (trace id, serial, policy
    /// hash) landed together (1792 and under 1800 apart); 1824 → 1848 with the request body's
    /// variant that watches an HTTP/1.1 body to its end (`HttpBody::H1Watched`, for parking:
    /// 24 bytes per stream against ~10 KiB less per idle HTTP/1.1 connection).
    #[test]
    fn the_per_stream_future_stays_small() {
        fn future_size<F, A, B, C, D, R>(_: &F) -> usize
        where
            F: Fn(A, B, C, D) -> R,
        {
            std::mem::size_of::<R>()
        }
        let size = future_size(&serve_stream);
        assert!(size <= 1848, "serve_stream's future is {size} bytes");
    }

    /// Memory per idle connection: the connection task's own future is allocated at spawn and
    /// kept for the connection's lifetime, so it holds neither the handshake's state nor an
    /// HTTP/2 connection's (both boxed, freed or never made), and an idle HTTP/1.1 connection
    /// carries only its own serving future. 9328 bytes for the task alone (debug) before.
    /// The HTTP/1.1 one holds its TLS stream once (made before the future, not an `async fn`
    /// argument moved into it) and hyper's connection boxed, dropped while parked: 4.0 KB →
    /// 2.2 KB.
    #[test]
    fn an_idle_connection_carries_only_its_protocol_s_future() {
        fn future_size<F, A, B, R>(_: &F) -> usize
        where
            F: Fn(A, B) -> R,
        {
            std::mem::size_of::<R>()
        }
        let task = future_size(&Conn::run);
        assert!(task <= 512, "the connection task's future is {task} bytes");
        let h1 = future_size(&Session::serve_h1);
        assert!(h1 <= 2304, "an HTTP/1.1 connection's future is {h1} bytes");
    }
}
