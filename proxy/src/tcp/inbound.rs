//! `[[tcp_inbound]]`: accept, mTLS handshake with the snapshot's TCP server configuration
//! (the HTTP inbound's own when there is one), the caller decided by the policy's `[[tcp]]`
//! entry of the listener's name, then the app connection and [`super::pump::pump`]. A denied
//! caller's connection is closed right after the handshake: the app is never dialled, so not
//! one byte reaches it. After every reload the peer is checked again (verifier and policy of
//! the new snapshot); a peer that fails is cut at once.

use std::time::{Duration, Instant};

use gatehouse_ca::admission::Refusal;
use gatehouse_policy::TcpDecision;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::config::TcpInboundConfig;
use super::pump::pump;
use crate::audit::{TcpRecord, record_tcp};
use crate::signal::Shutdown;
use crate::tls::verify::{PeerIdentity, failure_reason};

/// The shared parts of a `[[tcp_inbound]]` listener.
type Listener = super::listener::Listener<TcpInboundConfig>;

pub(super) async fn serve_one(l: &Listener, tcp: TcpStream, shutdown: &Shutdown) {
    let started = Instant::now();
    // Before any TLS byte is read: the source must be under its caps (as on `[inbound]`).
    let mut admission = match (&l.sources, tcp.peer_addr()) {
        (Some(sources), Ok(peer)) => match sources.admit(peer.ip()) {
            Ok(a) => Some(a),
            Err(refusal) => return l.metrics.connection(refused(refusal)),
        },
        _ => None,
    };
    if let Some(a) = &admission {
        tokio::select! {
            () = a.penalty() => {}
            () = shutdown.token().cancelled() => return,
        }
    }
    let _ = tcp.set_nodelay(true);
    // Subscribe before loading the snapshot: a swap in between is then seen as a change.
    let mut reloads = l.state.subscribe();
    let snapshot = l.state.snapshot();
    let Some(server) = snapshot.tcp.server.clone() else {
        return;
    };
    let accept = TlsAcceptor::from(server.tls.clone()).accept(tcp);
    let tls = tokio::select! {
        r = tokio::time::timeout(l.cfg.handshake_timeout, accept) => r,
        () = shutdown.token().cancelled() => return,
    };
    let mut tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let Some(a) = &admission {
                a.handshake_failed(&e);
            }
            return handshake_failed(l, &e);
        }
        Err(_) => return handshake_failed(l, &"handshake timed out"),
    };
    if let Some(a) = admission.as_mut() {
        a.authenticated();
    }
    let (_, session) = tls.get_ref();
    let peer = match server.verifier.identify(session) {
        Ok(p) => p,
        Err(e) => {
            info!(reason = failure_reason(&e), error = %e, "tcp mTLS handshake refused");
            return handshake_failed(l, &e);
        }
    };
    let certs: Vec<CertificateDer<'static>> = session
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let policy = &snapshot.tcp.policies[l.index];
    let decision = policy.policy.decide_tcp(&l.cfg.name, peer.id());
    let (allowed, reason) = (decision.is_allowed(), decision.reason());
    let audit_only = !allowed && policy.policy.is_audit_mode();
    let sha256 = policy.sha256.clone();
    // The connection keeps no snapshot: a reload's is looked up by `watch_peer`.
    drop(snapshot);
    let line = Line {
        l,
        peer: &peer,
        sha256: &sha256,
        started,
    };
    if !allowed && !audit_only {
        l.metrics.connection("denied");
        info!(caller = %peer.id(), reason, "tcp connection denied");
        line.write("deny", reason, None);
        // close_notify, then the socket closes: the app was never dialled.
        let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        return;
    }
    let app = tokio::time::timeout(l.cfg.handshake_timeout, TcpStream::connect(l.cfg.app)).await;
    let app = match app {
        Ok(Ok(app)) => app,
        Ok(Err(e)) => return app_unreachable(&line, &e),
        Err(_) => return app_unreachable(&line, &"connect timed out"),
    };
    let _ = app.set_nodelay(true);
    let (result, decision_label) = if audit_only {
        ("audit_denied", "audit_deny")
    } else {
        ("allowed", "allow")
    };
    l.metrics.connection(result);
    debug!(caller = %peer.id(), "tcp connection allowed");
    let stop = async {
        tokio::select! {
            why = watch_peer(l, &mut reloads, &certs, &peer) => why,
            () = shutdown.token().cancelled() => "shutdown",
        }
    };
    let flow = pump(tls, app, l.cfg.idle_timeout, &l.metrics, stop).await;
    info!(
        caller = %peer.id(),
        end = flow.end,
        bytes_client_to_server = flow.client_to_server,
        bytes_server_to_client = flow.server_to_client,
        "tcp connection closed"
    );
    line.write(decision_label, flow.end, Some(flow));
}

/// Resolves (with the reason) once a reload stops trusting the peer or stops allowing it.
async fn watch_peer(
    l: &Listener,
    reloads: &mut tokio::sync::watch::Receiver<u64>,
    certs: &[CertificateDer<'static>],
    peer: &PeerIdentity,
) -> &'static str {
    loop {
        if reloads.changed().await.is_err() {
            return std::future::pending().await;
        }
        let snap = l.state.snapshot();
        let (Some(server), Some((leaf, intermediates))) =
            (snap.tcp.server.as_ref(), certs.split_first())
        else {
            return "peer_not_trusted";
        };
        if let Err(e) = server
            .verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
        {
            info!(
                peer_serial = %peer.serial_hex(),
                reason = failure_reason(&e),
                error = %e,
                "closing tcp connection: its client certificate is no longer trusted after reload"
            );
            return "peer_not_trusted";
        }
        let policy = &snap.tcp.policies[l.index].policy;
        if let d @ (TcpDecision::NotAllowed { .. } | TcpDecision::NoEntry) =
            policy.decide_tcp(&l.cfg.name, peer.id())
            && !policy.is_audit_mode()
        {
            info!(caller = %peer.id(), reason = d.reason(), "closing tcp connection: the reloaded policy no longer allows its caller");
            return "not_allowed";
        }
    }
}

/// The `result` label of a connection refused at admission.
fn refused(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::SourceConnections => "refused_source_connections",
        Refusal::SourceHandshakes => "refused_source_handshakes",
        Refusal::PendingHandshakes => "refused_pending_handshakes",
    }
}

fn handshake_failed(l: &Listener, e: &dyn std::fmt::Display) {
    l.metrics.connection("handshake_failed");
    info!(error = %e, "tcp mTLS handshake failed");
}

fn app_unreachable(line: &Line<'_>, e: &dyn std::fmt::Display) {
    line.l.metrics.connection("app_unreachable");
    info!(app = %line.l.cfg.app, error = %e, "tcp app unreachable");
    line.write("error", "app_unreachable", None);
}

/// What the connection's audit line needs besides its outcome.
struct Line<'a> {
    l: &'a Listener,
    peer: &'a PeerIdentity,
    sha256: &'a str,
    started: Instant,
}

impl Line<'_> {
    fn write(&self, decision: &str, reason: &str, flow: Option<super::pump::Flow>) {
        record_tcp(&TcpRecord {
            direction: "tcp_inbound",
            listener: &self.l.cfg.name,
            peer: Some(self.peer.id().as_str()),
            peer_serial: Some(self.peer.serial_hex()),
            policy_sha256: Some(self.sha256),
            decision,
            reason,
            bytes_client_to_server: flow.map_or(0, |f| f.client_to_server),
            bytes_server_to_client: flow.map_or(0, |f| f.server_to_client),
            duration: self.started.elapsed(),
            request_id: None,
        });
    }
}
