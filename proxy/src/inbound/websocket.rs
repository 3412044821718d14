//! A WebSocket tunnel arriving from a peer's outbound sidecar (issue 17): an RFC 8441
//! extended CONNECT stream (`:protocol = websocket`) on the HTTP/2 connection, which the
//! server allows (`SETTINGS_ENABLE_CONNECT_PROTOCOL`).
//!
//! It is decided like any request, as the `GET` it stands for: path normalization, then
//! `policy.decide(caller, "GET", path)` and the same audit line and metrics as an HTTP
//! request (a denial is 403 on the stream, and the app sees nothing). Allowed, the app gets an
//! HTTP/1.1 `Upgrade: websocket` request on a connection of its own (an upgraded connection is
//! never pooled), with the handshake headers the client sent, our identity headers
//! (`x-client-spiffe-id`, `x-forwarded-client-cert`) and `x-request-id`. When the app answers
//! `101`, the stream gets `200` with the app's `sec-websocket-accept` (and the protocol and
//! extensions it chose) and the bytes are pumped both ways ([`crate::tcp::pump`], the stream
//! as [`H2Io`]) until either side closes, nothing moved for `websocket_idle_timeout`, or
//! `websocket_max_duration` passed; then a close line is written (`direction =
//! "websocket_inbound"`, bytes each way, duration, how it ended). Any other answer of the app
//! goes back as it came: no upgrade.
//!
//! The tunnel counts as a request in flight (the connection's idle timeout waits for it) and
//! lives in the connection's stream set: a revoked peer's connection, dropped after its grace
//! period, takes its tunnels with it. `[[limit]]`s are not applied to upgrades.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_policy::path::normalize;
use h2::RecvStream;
use h2::ext::Protocol;
use h2::server::SendResponse;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Empty, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::request::ConnCtx;
use crate::audit::{TcpRecord, record_tcp};
use crate::error::Refusal;
use crate::http::body::pipe_within;
use crate::http::h2_server::{StreamEnd, end_of, fit_for_h2};
use crate::http::headers::{
    REQUEST_ID, keep_or_assign, keep_or_derive_trace, strip_for_app, strip_hop_by_hop,
};
use crate::http::respond::ErrorResponse;
use crate::http::tunnel::{H2Io, SideMetrics};
use crate::metrics::GaugeGuard;
use crate::outcome::{Outcome, Rejection};
use crate::tcp::pump::pump;

/// The app's handshake answer, passed back to the client.
const ANSWER: [HeaderName; 3] = [
    HeaderName::from_static("sec-websocket-accept"),
    HeaderName::from_static("sec-websocket-protocol"),
    HeaderName::from_static("sec-websocket-extensions"),
];

/// Whether an HTTP/2 request is an extended CONNECT (a tunnel), served by [`serve`].
pub(super) fn is_tunnel(req: &Request<RecvStream>) -> bool {
    req.method() == Method::CONNECT && req.extensions().get::<Protocol>().is_some()
}

/// Serves one extended-CONNECT stream; see the module docs.
pub(super) async fn serve(
    ctx: Arc<ConnCtx>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    side: SideMetrics,
) -> StreamEnd {
    let _guard = ctx.activity.begin();
    let mut respond = respond;
    let started = Instant::now();
    let (mut parts, recv) = req.into_parts();
    let request_id = keep_or_assign(&ctx.inbound.request_ids, &mut parts.headers);
    let snapshot = ctx.inbound.state.snapshot();
    let Some(inb) = snapshot.inbound.as_ref() else {
        return send_own(&mut respond, Refusal::Denied.response(&request_id));
    };
    let trace_id = crate::audit::enabled()
        .then(|| keep_or_derive_trace(&mut parts.headers, &request_id, true));
    let mut log = ctx.request_log(&snapshot, inb, &request_id, trace_id, Method::GET, started);
    let uri = parts.uri.clone();
    if ctx.is_distrusted() {
        log.finish(
            uri.path(),
            None,
            Outcome::Rejected(Rejection::PeerNotTrusted),
        );
        let resp = Refusal::PeerNoLongerTrusted.response(&request_id);
        return send_own(&mut respond, resp);
    }
    if parts.extensions.get::<Protocol>().map(Protocol::as_str) != Some("websocket") {
        side.upgrade("failed");
        let resp = ErrorResponse {
            status: StatusCode::NOT_IMPLEMENTED,
            error: "not_implemented",
            reason: "unsupported_protocol",
            message: "only WebSocket tunnels (:protocol = websocket) are accepted",
            details: &[],
        }
        .into_response(&request_id);
        return send_own(&mut respond, resp);
    }
    let path = match normalize(uri.path(), &inb.normalize) {
        Ok(p) => p,
        Err(e) => {
            log.finish(uri.path(), None, Outcome::Rejected(Rejection::BadPath));
            return send_own(&mut respond, Refusal::BadPath(&e).response(&request_id));
        }
    };
    let decision = inb.policy.decide(ctx.peer().id(), "GET", &path);
    let route = decision.route_name();
    if !decision.is_allowed() {
        side.upgrade("denied");
        let outcome = Outcome::decided(&decision, StatusCode::FORBIDDEN);
        log.finish(&path, route, outcome);
        return send_own(&mut respond, Refusal::Denied.response(&request_id));
    }
    // The caller's `[[limit]]`s apply as to any request; a concurrency budget is held while
    // the tunnel is open (a caller cannot open more tunnels than its limit allows).
    let _limit = match log.admit(&decision, &path) {
        Ok(held) => held,
        Err(refusal) => {
            side.upgrade("limited");
            return send_own(&mut respond, refusal.response(&request_id));
        }
    };
    // The app's upgrade request: the client's headers as for any request (hop-by-hop and
    // identity look-alikes removed, ours added), `GET`, origin-form, `Host`.
    let mut h = std::mem::take(&mut parts.headers);
    if strip_for_app(&mut h).is_err() {
        h.remove(header::TRANSFER_ENCODING);
    }
    ctx.add_identity(&mut h);
    if let header::Entry::Vacant(host) = h.entry(header::HOST) {
        let authority = uri.authority().map(|a| a.as_str().to_owned());
        host.insert(
            authority
                .and_then(|a| HeaderValue::from_str(&a).ok())
                .unwrap_or_else(|| ctx.inbound.app_host.clone()),
        );
    }
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut up = Request::new(Empty::<Bytes>::new());
    *up.uri_mut() = PathAndQuery::try_from(target)
        .map(http::Uri::from)
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    *up.headers_mut() = h;
    let cfg = &ctx.inbound.cfg;
    let answered = tokio::time::timeout(cfg.app_timeout, ask_app(cfg.app, up)).await;
    let mut resp = match answered {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            warn!(error = %e, app = %cfg.app, "WebSocket upgrade to the app failed");
            side.upgrade("failed");
            log.finish(
                &path,
                route,
                Outcome::decided(&decision, StatusCode::BAD_GATEWAY),
            );
            return send_own(&mut respond, Refusal::AppUnreachable.response(&request_id));
        }
        Err(_) => {
            side.upgrade("failed");
            let outcome = Outcome::decided(&decision, StatusCode::GATEWAY_TIMEOUT);
            log.finish(&path, route, outcome);
            return send_own(&mut respond, Refusal::AppTimeout.response(&request_id));
        }
    };
    log.finish(&path, route, Outcome::decided(&decision, resp.status()));
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The app would not switch: its answer as it came, no tunnel.
        side.upgrade("not_upgraded");
        strip_hop_by_hop(resp.headers_mut());
        resp.headers_mut()
            .entry(REQUEST_ID)
            .or_insert_with(|| request_id.clone());
        let (mut head, body) = resp.into_parts();
        fit_for_h2(&mut head.headers, &body);
        let end = body.is_end_stream();
        return match respond.send_response(Response::from_parts(head, ()), end) {
            Ok(tx) if !end => match pipe_within(body, tx, Some(cfg.send_timeout)).await {
                Ok(()) => StreamEnd::Done,
                Err(e) => end_of(&e),
            },
            _ => StreamEnd::Done,
        };
    }
    let mut ok = Response::new(());
    for name in ANSWER {
        if let Some(v) = resp.headers().get(&name) {
            ok.headers_mut().insert(name, v.clone());
        }
    }
    ok.headers_mut().insert(REQUEST_ID, request_id.clone());
    let app = match hyper::upgrade::on(resp).await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(e) => {
            debug!(error = %e, "the app's connection did not upgrade");
            side.upgrade("failed");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return StreamEnd::Done;
        }
    };
    let send = match respond.send_response(ok, false) {
        Ok(send) => send,
        Err(e) => {
            debug!(error = %e, "WebSocket tunnel head not sent");
            return StreamEnd::Done;
        }
    };
    side.upgrade("upgraded");
    let active = GaugeGuard::new(&side.active);
    let opened = Instant::now();
    let (idle, max) = (cfg.websocket_idle_timeout, cfg.websocket_max_duration);
    let flow = pump(H2Io::new(send, recv), app, idle, &side, async {
        tokio::time::sleep(max).await;
        "max_duration"
    })
    .await;
    drop(active);
    record_close(&ctx, inb, &request_id, flow, opened.elapsed());
    StreamEnd::Done
}

/// The close line of an inbound tunnel.
fn record_close(
    ctx: &ConnCtx,
    inb: &crate::state::InboundSnapshot,
    request_id: &HeaderValue,
    flow: crate::tcp::pump::Flow,
    duration: Duration,
) {
    let peer = ctx.peer();
    record_tcp(&TcpRecord {
        direction: "websocket_inbound",
        listener: "inbound",
        peer: Some(peer.id().as_str()),
        peer_serial: Some(peer.serial_hex()),
        policy_sha256: Some(&inb.policy_sha256),
        decision: "allow",
        reason: flow.end,
        bytes_client_to_server: flow.client_to_server,
        bytes_server_to_client: flow.server_to_client,
        duration,
        request_id: request_id.to_str().ok(),
    });
}

/// The upgrade request on a new HTTP/1.1 connection to the app (upgrades enabled).
async fn ask_app(
    addr: std::net::SocketAddr,
    req: Request<Empty<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, crate::http::body::BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "app WebSocket connection ended with an error");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// Sends one of the sidecar's own answers on the stream.
fn send_own(respond: &mut SendResponse<Bytes>, resp: Response<Full<Bytes>>) -> StreamEnd {
    let (mut head, body) = resp.into_parts();
    fit_for_h2(&mut head.headers, &body);
    let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body))
        .and_then(Result::ok)
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    match respond.send_response(Response::from_parts(head, ()), bytes.is_empty()) {
        Ok(mut tx) if !bytes.is_empty() => {
            // Small (a JSON error): within the stream's initial window.
            tx.reserve_capacity(bytes.len());
            let _ = tx.send_data(bytes, true);
        }
        Ok(_) => {}
        Err(e) => debug!(error = %e, "WebSocket refusal not sent"),
    }
    StreamEnd::Done
}
