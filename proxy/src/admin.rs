//! The admin listener (plain HTTP/1.1, for probes and scrapers): `/metrics` (Prometheus text),
//! `/healthz` (the process is up), `/readyz` (listeners bound, identity loaded and unexpired,
//! no CRL stale beyond `crl_grace` unless `crl_stale = "warn"`, not shutting down), `/status` (identity, leaf serial
//! and expiry, bundle roots and CRLs, reload generation and refused or stuck reloads, policy hash, configuration
//! summary, as JSON). It keeps answering while the sidecar drains, so probes see `/readyz` turn 503.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gatehouse_ca::admission::{Admission, Caps, Sources};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::config::CrlStale;
use crate::identity::{IdentityHandle, Material};
use crate::metrics::Metrics;
use crate::reload::ReloadStatus;
use crate::signal::Shutdown;
use crate::state::State;

/// Admin connections held at once.
const MAX_CONNECTIONS: usize = 256;
/// Admin connections from one address (a scraper keeps one; probes open one per check).
const MAX_CONNECTIONS_PER_SOURCE: usize = 64;

/// The admin port: its socket and its connection limits, the same for the phase before the first
/// SVID ([`until_ready`]) and the full [`Admin`]. At most [`MAX_CONNECTIONS`] connections (more
/// wait in the accept queue), at most [`MAX_CONNECTIONS_PER_SOURCE`] from one address (more are
/// closed at once), each closed when it sends no request head for 10 s. The admin port often
/// listens on the pod's address for probes: a client that reaches it despite the network policy
/// can neither exhaust the sidecar's file descriptors nor keep the kubelet's probes out.
#[derive(Debug)]
pub(crate) struct AdminListener {
    tcp: TcpListener,
    slots: Arc<Semaphore>,
    sources: Arc<Sources>,
}

/// What an admitted admin connection holds until it closes.
type Held = (OwnedSemaphorePermit, Admission);

impl AdminListener {
    /// The limits around a bound socket.
    pub(crate) fn new(tcp: TcpListener) -> Self {
        Self {
            tcp,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            sources: Arc::new(Sources::new(Caps {
                connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
                handshakes_per_source: MAX_CONNECTIONS_PER_SOURCE,
                pending_handshakes: MAX_CONNECTIONS,
                failed_handshake_delay: Duration::ZERO,
            })),
        }
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next admitted connection; those over their address's share are closed and counted.
    /// Cancel-safe (a slot taken before the accept is given back).
    async fn accept(&self, metrics: &Metrics) -> (tokio::net::TcpStream, Held) {
        loop {
            let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await else {
                continue; // never closed
            };
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match self.sources.admit(peer.ip()) {
                Ok(admission) => return (tcp, (slot, admission)),
                Err(_) => {
                    metrics.admin_connections_refused.inc();
                    debug!(%peer, "admin connection refused: its address holds its share");
                }
            }
        }
    }
}

/// What the admin endpoints report on.
#[derive(Debug)]
pub(crate) struct Admin {
    /// Shared state.
    pub state: Arc<State>,
    /// Metrics to expose.
    pub metrics: Metrics,
    /// Shutdown state (for `/readyz`).
    pub shutdown: Shutdown,
    /// Bound listeners, `(name, address)`, for `/status`.
    pub listeners: Vec<(String, SocketAddr)>,
    /// The reloader's state (inputs refused, an attempt stuck), for `/status`.
    pub reload: Arc<std::sync::Mutex<ReloadStatus>>,
    /// The online identity's driver (`[identity] ca = …`), for `/status`.
    pub identity: Option<IdentityHandle>,
    /// The outbound upstreams and their endpoints, for `/status`.
    pub upstreams: Arc<crate::outbound::UpstreamRegistry>,
}

impl Admin {
    /// Serves until the process exits (connections as [`AdminListener`] admits them).
    pub(crate) async fn serve(self: Arc<Self>, listener: AdminListener) {
        loop {
            let (tcp, held) = listener.accept(&self.metrics).await;
            let admin = self.clone();
            tokio::spawn(async move {
                let _held = held;
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(&req)) }
                });
                serve_connection(tcp, svc, true).await;
            });
        }
    }

    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(prometheus::TEXT_FORMAT),
                );
                r
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.not_ready() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => {
                    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "");
                    *r.body_mut() = Full::new(Bytes::from(why));
                    r
                }
            },
            "/status" => {
                let mut r = Response::new(Full::new(Bytes::from(self.status().to_string())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics /healthz /readyz /status\n",
            ),
        }
    }

    /// Why the sidecar is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        if self.shutdown.is_draining() {
            return Some("shutting down\n".into());
        }
        let snap = self.state.snapshot();
        let now = OffsetDateTime::now_utc();
        if snap.credentials.not_after <= now {
            return Some("own certificate expired\n".into());
        }
        let policy = self.state.config.identity.crl_policy;
        if policy.stale != CrlStale::Warn
            && let Some(crl) = snap
                .credentials
                .crl_set
                .first_stale_beyond(now, policy.grace)
        {
            return Some(format!(
                "CRL from `{}` is stale: its next-update passed more than crl_grace ago\n",
                crl.issuer
            ));
        }
        None
    }

    fn status(&self) -> serde_json::Value {
        let snap = self.state.snapshot();
        let c = &snap.credentials;
        let now = OffsetDateTime::now_utc();
        let cfg = &self.state.config;
        let policy = snap.inbound.as_ref().map(|i| {
            serde_json::json!({
                "path": cfg.inbound.as_ref().map(|c| c.policy.display().to_string()),
                "sha256": i.policy_sha256,
                "routes": i.policy.route_count(),
                "mode": if i.policy.is_audit_mode() { "audit" } else { "enforce" },
            })
        });
        let bundle: Vec<serde_json::Value> = c
            .bundle
            .iter()
            .filter_map(crate::reload::serial_and_expiry)
            .map(|(serial, not_after)| {
                serde_json::json!({
                    "serial": serial,
                    "not_after": not_after.format(&Rfc3339).unwrap_or_default(),
                })
            })
            .collect();
        let listeners: serde_json::Map<String, serde_json::Value> = self
            .listeners
            .iter()
            .map(|(n, a)| (n.clone(), a.to_string().into()))
            .collect();
        serde_json::json!({
            "identity": c.id.as_str(),
            "trust_domain": snap.trust_domain.as_str(),
            "ready": self.not_ready().is_none(),
            "draining": self.shutdown.is_draining(),
            "certificate": {
                "serial": c.serial_hex,
                "not_after": c.not_after.format(&Rfc3339).unwrap_or_default(),
                "seconds_left": (c.not_after - now).whole_seconds(),
                "path": cfg.identity.cert.display().to_string(),
            },
            "bundle": bundle,
            "crls": self.crls(&snap, now),
            "reload_generation": self.state.generation(),
            "reload": self.reload.lock().map(|r| r.to_json()).unwrap_or_default(),
            "policy": policy,
            "config": {
                "path": cfg.path.display().to_string(),
                "min_tls": cfg.min_tls.to_string(),
                "app": cfg.inbound.as_ref().map(|i| i.app.to_string()),
                "crl": cfg.identity.crl.as_ref().map(|p| p.display().to_string()),
                "outbound": cfg.outbound.iter().map(|o| serde_json::json!({
                    "name": o.name,
                    "connect": format!("{}:{}", o.target.host(), o.target.port()),
                    "server_id": o.server_id.as_str(),
                })).collect::<Vec<_>>(),
                "shutdown_grace_period_s": cfg.shutdown_grace_period.as_secs_f64(),
            },
            "listeners": listeners,
            "online_identity": self.identity.as_ref().map(IdentityHandle::status),
            "upstreams": self.upstreams.status(),
        })
    }

    /// `/status` `crls`: issuer, number, next-update and freshness of each CRL.
    fn crls(&self, snap: &crate::state::Snapshot, now: OffsetDateTime) -> serde_json::Value {
        let grace = self.state.config.identity.crl_policy.grace;
        let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        snap.credentials
            .crl_set
            .crls()
            .iter()
            .map(|c| {
                let state = if c.stale_beyond(now, grace) {
                    "stale_beyond_grace"
                } else if c.stale(now) {
                    "stale"
                } else {
                    "fresh"
                };
                serde_json::json!({
                    "issuer": c.issuer,
                    "number": c.number_str(),
                    "this_update": fmt(c.this_update),
                    "next_update": c.next_update.map(fmt),
                    "state": state,
                })
            })
            .collect()
    }
}

async fn serve_connection<S>(tcp: tokio::net::TcpStream, svc: S, keep_alive: bool)
where
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .keep_alive(keep_alive)
        .header_read_timeout(std::time::Duration::from_secs(10));
    if let Err(e) = b.serve_connection(TokioIo::new(tcp), svc).await {
        debug!(error = %e, "admin connection error");
    }
}

/// The admin listener of an online identity before its first SVID: `/healthz` 200, `/readyz`
/// 503 (with the last error), `/status` the enrollment status, `/metrics`. Returns the first
/// [`Material`] (`None`: the driver stopped, i.e. shutdown); the listener then goes to the
/// full [`Admin`]. Connections are not kept alive, so none outlives this phase.
pub(crate) async fn until_ready(
    listener: &AdminListener,
    identity: &IdentityHandle,
    metrics: &Metrics,
) -> Option<Arc<Material>> {
    loop {
        let (tcp, held) = tokio::select! {
            m = identity.ready() => return m,
            a = listener.accept(metrics) => a,
        };
        let (identity, metrics) = (identity.clone(), metrics.clone());
        tokio::spawn(async move {
            let _held = held;
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = unready_route(req.uri().path(), &identity, &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            serve_connection(tcp, svc, false).await;
        });
    }
}

fn unready_route(
    path: &str,
    identity: &IdentityHandle,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    let status = identity.status();
    let mut r = match path {
        "/metrics" => return Response::new(Full::new(Bytes::from(metrics.encode()))),
        "/healthz" => return text(StatusCode::OK, "ok\n"),
        "/readyz" => Response::new(Full::new(Bytes::from(format!(
            "waiting for the first SVID from {}{}\n",
            status.ca,
            status
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )))),
        "/status" => {
            let body = serde_json::json!({ "ready": false, "online_identity": status });
            return Response::new(Full::new(Bytes::from(body.to_string())));
        }
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics /healthz /readyz /status\n",
            );
        }
    };
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
