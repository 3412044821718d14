//! A WebSocket upgrade from the app (issue 17): an HTTP/1.1 `GET` with `Upgrade: websocket`
//! is sent to the peer sidecar as an RFC 8441 extended CONNECT (`:protocol = websocket`) on
//! the upstream's shared HTTP/2 connection, carrying the app's handshake headers
//! (`sec-websocket-key`, `-version`, `-protocol`, `-extensions`, `origin`, …). The peer's
//! inbound sidecar decides it like any request and, when the app behind it switched
//! protocols, answers 200 with the app's `sec-websocket-accept` (and the protocol and
//! extensions it chose); the app here then gets `101 Switching Protocols` with those, and the
//! upgraded connection is pumped both ways through the stream ([`crate::http::tunnel::H2Io`],
//! [`crate::tcp::pump`]). Any other answer (403 for a denial, the app's own refusal) goes back
//! to the app as it came: no upgrade.
//!
//! Audit: the request's outbound line at the upgrade (status 101, or the refusal), and one
//! line when the tunnel closes (`direction = "websocket_outbound"`, bytes each way, duration,
//! how it ended). The tunnel ends on close from either side, after
//! [`DEFAULT_WEBSOCKET_IDLE_TIMEOUT`] without a byte, or [`DEFAULT_WEBSOCKET_MAX_DURATION`] after
//! the upgrade (the inbound side's configured limits end it sooner).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::pool::UpstreamBody;
use super::request::{Ctx, OutboundBody, display_id, forwarded, refused};
use crate::audit::{self, OutboundRecord, TcpRecord, record_tcp};
use crate::config::{DEFAULT_WEBSOCKET_IDLE_TIMEOUT, DEFAULT_WEBSOCKET_MAX_DURATION};
use crate::http::body::RecvBody;
use crate::http::headers::{REQUEST_ID, keep_or_assign, keep_or_derive_trace, strip_for_h2};
use crate::http::tunnel::{H2Io, SideMetrics, WebSocketMetrics};
use crate::metrics::GaugeGuard;
use crate::outcome::Outcome;
use crate::tcp::pump::pump;

/// The app's handshake answer, passed back from the app behind the peer.
const ANSWER: [HeaderName; 3] = [
    HeaderName::from_static("sec-websocket-accept"),
    HeaderName::from_static("sec-websocket-protocol"),
    HeaderName::from_static("sec-websocket-extensions"),
];

/// Whether `req` asks for a WebSocket upgrade, served by [`upgrade`]. hyper offers the upgrade
/// only to an HTTP/1.1 request with `Connection: upgrade`, so an ordinary request pays one
/// empty-extensions check.
pub(super) fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_some()
        && crate::http::tunnel::wants_websocket(req.headers())
}

/// Serves one upgrade request; see the module docs.
pub(super) async fn upgrade(ctx: Arc<Ctx>, mut req: Request<Incoming>) -> Response<OutboundBody> {
    let started = Instant::now();
    let request_id = keep_or_assign(&ctx.ids, req.headers_mut());
    let trace_id = keep_or_derive_trace(req.headers_mut(), &request_id, false);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let upstream = Arc::clone(&ctx.upstream);
    let metrics = upstream.metrics();
    let side = metrics.websocket.clone().unwrap_or_else(unregistered);
    let (parts, _empty) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let mut head = Request::new(());
    *head.method_mut() = Method::CONNECT;
    *head.uri_mut() = parts.uri;
    let mut headers = parts.headers;
    // `connection`, `upgrade` and the rest of the app's hop-by-hop headers stay here; the
    // `sec-websocket-*` ones are end to end and go on.
    strip_for_h2(&mut headers);
    headers.remove(header::HOST);
    *head.headers_mut() = headers;
    head.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (response, outcome, serial) = match upstream.open_tunnel(head).await {
        Ok((resp, send, serial)) if resp.status() == StatusCode::OK => {
            let (answer, recv) = resp.into_parts();
            let mut out = Response::new(Either::Right(Full::new(Bytes::new())));
            *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = out.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            for name in ANSWER {
                if let Some(v) = answer.headers.get(&name) {
                    h.insert(name, v.clone());
                }
            }
            h.insert(REQUEST_ID, request_id.clone());
            side.upgrade("upgraded");
            let tunnel = Tunnel {
                side: side.clone(),
                upstream: upstream.name().to_owned(),
                server_id: ctx.server_id.clone(),
                serial: Arc::clone(&serial),
                request_id: display_id(&request_id).to_owned(),
            };
            // Tracked: after the upgrade the app connection's task has ended, and graceful
            // shutdown drains the tunnel instead of cutting it.
            ctx.tracker
                .spawn(tunnel.run(on_upgrade, H2Io::new(send, recv)));
            (
                out,
                Outcome::Forwarded(StatusCode::SWITCHING_PROTOCOLS),
                Some(serial),
            )
        }
        Ok((resp, _send, serial)) => {
            // Refused (the peer's policy, or the app would not switch): as it came, no upgrade.
            let result = match resp.status() {
                StatusCode::FORBIDDEN => "denied",
                StatusCode::TOO_MANY_REQUESTS => "limited",
                _ => "not_upgraded",
            };
            side.upgrade(result);
            let resp = resp.map(|b| UpstreamBody::H2(RecvBody::new(b)));
            let (resp, outcome) = forwarded(resp, &request_id);
            (resp, outcome, Some(serial))
        }
        Err(e) => {
            side.upgrade("failed");
            let failed = "outbound WebSocket upgrade failed";
            let (resp, outcome) = refused(&e, &upstream, &request_id, failed);
            (resp, outcome, None)
        }
    };
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed.as_secs_f64());
    metrics.request(outcome.status().as_u16());
    audit::record_outbound(&OutboundRecord {
        request_id: display_id(&request_id),
        trace_id: Some(&trace_id),
        upstream: upstream.name(),
        server_id: &ctx.server_id,
        server_serial: serial.as_deref(),
        method: "GET",
        path: &path,
        outcome,
        duration: elapsed,
    });
    response
}

/// Counters that go nowhere, for an upstream built without the process's metrics (unit tests).
fn unregistered() -> SideMetrics {
    WebSocketMetrics::register(&prometheus::Registry::new())
        .expect("a fresh registry takes every family")
        .side("outbound")
}

/// An accepted upgrade, until its tunnel closes.
struct Tunnel {
    side: SideMetrics,
    upstream: String,
    server_id: String,
    serial: Arc<str>,
    request_id: String,
}

impl Tunnel {
    async fn run(self, on_upgrade: hyper::upgrade::OnUpgrade, peer: H2Io) {
        let started = Instant::now();
        let app = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                debug!(error = %e, "the app's connection did not upgrade");
                return;
            }
        };
        let active = GaugeGuard::new(&self.side.active);
        let max = tokio::time::sleep(DEFAULT_WEBSOCKET_MAX_DURATION);
        let flow = pump(
            app,
            peer,
            DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
            &self.side,
            async {
                max.await;
                "max_duration"
            },
        )
        .await;
        drop(active);
        record_tcp(&TcpRecord {
            direction: "websocket_outbound",
            listener: &self.upstream,
            peer: Some(&self.server_id),
            peer_serial: Some(&self.serial),
            policy_sha256: None,
            decision: "allow",
            reason: flow.end,
            bytes_client_to_server: flow.client_to_server,
            bytes_server_to_client: flow.server_to_client,
            duration: started.elapsed(),
            request_id: Some(&self.request_id),
        });
    }
}
