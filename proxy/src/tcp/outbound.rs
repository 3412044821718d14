//! `[[tcp_outbound]]`: the app connects in plain TCP on loopback; the sidecar dials the peer
//! sidecar (DNS at connect time), runs the mTLS handshake with the current snapshot's pinned
//! client configuration for the entry (our certificate; the server must prove `server_id`),
//! then [`super::pump::pump`]s. If the handshake fails the app's connection is closed without
//! a byte. With TLS 1.3 the peer judges our certificate and its policy after our handshake
//! completes: a refusal shows up as the peer closing, which the app sees as its connection
//! closing before any answer.

use std::time::Instant;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::info;

use super::config::TcpOutboundConfig;
use super::pump::pump;
use crate::audit::{TcpRecord, record_tcp};
use crate::signal::Shutdown;

/// The shared parts of a `[[tcp_outbound]]` listener.
type Listener = super::listener::Listener<TcpOutboundConfig>;

pub(super) async fn serve_one(l: &Listener, app: TcpStream, shutdown: &Shutdown) {
    let started = Instant::now();
    let _ = app.set_nodelay(true);
    let client = l.state.snapshot().tcp.outbound[l.index].clone();
    let c = &l.cfg;
    let dial = async {
        let tcp = TcpStream::connect((c.target.host(), c.target.port())).await?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(client.tls)
            .connect(client.server_name, tcp)
            .await
    };
    let tls = tokio::select! {
        r = tokio::time::timeout(c.connect_timeout, dial) => r,
        () = shutdown.token().cancelled() => return,
    };
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return connect_failed(l, started, &e),
        Err(_) => return connect_failed(l, started, &"connect timed out"),
    };
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(crate::tls::serial_hex);
    l.metrics.connection("allowed");
    let stop = async {
        shutdown.token().cancelled().await;
        "shutdown"
    };
    let flow = pump(app, tls, c.idle_timeout, &l.metrics, stop).await;
    info!(
        end = flow.end,
        bytes_client_to_server = flow.client_to_server,
        bytes_server_to_client = flow.server_to_client,
        "tcp outbound connection closed"
    );
    record_tcp(&TcpRecord {
        direction: "tcp_outbound",
        listener: &c.name,
        peer: Some(c.server_id.as_str()),
        peer_serial: serial.as_deref(),
        policy_sha256: None,
        decision: "allow",
        reason: flow.end,
        bytes_client_to_server: flow.client_to_server,
        bytes_server_to_client: flow.server_to_client,
        duration: started.elapsed(),
        request_id: None,
    });
}

fn connect_failed(l: &Listener, started: Instant, e: &dyn std::fmt::Display) {
    l.metrics.connection("connect_failed");
    info!(connect = %format!("{}:{}", l.cfg.target.host(), l.cfg.target.port()), error = %e, "tcp outbound: cannot reach the peer");
    record_tcp(&TcpRecord {
        direction: "tcp_outbound",
        listener: &l.cfg.name,
        peer: None,
        peer_serial: None,
        policy_sha256: None,
        decision: "error",
        reason: "connect_failed",
        bytes_client_to_server: 0,
        bytes_server_to_client: 0,
        duration: started.elapsed(),
        request_id: None,
    });
}
