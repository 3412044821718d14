//! `[[tcp_inbound]]` and `[[tcp_outbound]]` in the sidecar configuration: the raw serde
//! mirror (`deny_unknown_fields`, spans kept) and the validated entries, checked by the same
//! `Check` pass as the rest of the file (every problem with `file:line:col`).
//!
//! ```toml
//! [[tcp_inbound]]                # mTLS in, plain TCP to the app
//! name   = "postgres"
//! listen = "0.0.0.0:15432"
//! app    = "127.0.0.1:5432"
//! policy = "policy.toml"         # decided by that file's [[tcp]] entry of the same name
//!
//! [[tcp_outbound]]               # plain TCP from the app, mTLS to the peer (server_id pinned)
//! name      = "reports-db"
//! listen    = "127.0.0.1:5432"
//! connect   = "reports-db.internal:15432"
//! server_id = "spiffe://fintech.internal/reports-db"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gatehouse_policy::SpiffeId;
use serde::Deserialize;
use toml::Spanned;

use crate::config::{
    Check, ConfigErrorKind, DEFAULT_MAX_HANDSHAKES_PER_SOURCE, DEFAULT_MAX_PENDING_HANDSHAKES,
    DEFAULT_TCP_HANDSHAKE_TIMEOUT, DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_TCP_MAX_CONNECTIONS,
    DEFAULT_TCP_MAX_CONNECTIONS_PER_SOURCE, Target,
};

type S<T> = Spanned<T>;

/// One `[[tcp_inbound]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcpInbound {
    name: S<String>,
    listen: S<String>,
    app: S<String>,
    policy: S<String>,
    #[serde(default)]
    insecure_app_address: bool,
    handshake_timeout: Option<S<String>>,
    idle_timeout: Option<S<String>>,
    max_connections: Option<S<u64>>,
    max_connections_per_source: Option<S<u64>>,
    max_handshakes_per_source: Option<S<u64>>,
    max_pending_handshakes: Option<S<u64>>,
}

/// One `[[tcp_outbound]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcpOutbound {
    name: S<String>,
    listen: S<String>,
    connect: S<String>,
    server_id: S<String>,
    sni: Option<S<String>>,
    #[serde(default)]
    allow_non_loopback_listen: bool,
    connect_timeout: Option<S<String>>,
    idle_timeout: Option<S<String>>,
    max_connections: Option<S<u64>>,
}

/// A validated `[[tcp_inbound]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct TcpInboundConfig {
    /// Name: the policy's `[[tcp]]` entry, metric label, audit `listener`.
    pub name: String,
    /// mTLS listen address.
    pub listen: SocketAddr,
    /// The app (plain TCP).
    pub app: SocketAddr,
    /// The policy file whose `[[tcp]]` entry `name` decides.
    pub policy: PathBuf,
    /// The app is not on loopback and the operator said that is fine (dangerous).
    pub insecure_app_address: bool,
    /// TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// No byte either way for this long closes the connection.
    pub idle_timeout: Duration,
    /// Open connections on this listener.
    pub max_connections: usize,
    /// Open connections from one source address (`gatehouse_ca::admission`, as `[inbound]`).
    pub max_connections_per_source: usize,
    /// Handshakes in progress from one source address.
    pub max_handshakes_per_source: usize,
    /// Handshakes in progress over all sources (at most half of `max_connections`).
    pub max_pending_handshakes: usize,
}

/// A validated `[[tcp_outbound]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct TcpOutboundConfig {
    /// Name: metric label, audit `listener`.
    pub name: String,
    /// Plain TCP listen address for the local app.
    pub listen: SocketAddr,
    /// The peer sidecar (`connect`), parsed once like an `[[outbound]]`'s; the host is
    /// resolved at connect time.
    pub target: Target,
    /// The SPIFFE ID the peer must present.
    pub server_id: SpiffeId,
    /// SNI to send; `None` means the host of `connect`.
    pub sni: Option<String>,
    /// `listen` is not loopback and the operator said that is fine (dangerous).
    pub allow_non_loopback_listen: bool,
    /// TCP connect + TLS handshake timeout.
    pub connect_timeout: Duration,
    /// No byte either way for this long closes the connection.
    pub idle_timeout: Duration,
    /// Open connections on this listener.
    pub max_connections: usize,
}

/// Every TCP listener of a sidecar.
#[derive(Debug, Clone, Default)]
pub(crate) struct TcpConfig {
    /// `[[tcp_inbound]]` entries, in file order.
    pub inbound: Vec<TcpInboundConfig>,
    /// `[[tcp_outbound]]` entries, in file order.
    pub outbound: Vec<TcpOutboundConfig>,
}

impl TcpConfig {
    /// Whether there is no TCP listener at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.inbound.is_empty() && self.outbound.is_empty()
    }

    /// `(tcp_inbound:NAME | tcp_outbound:NAME, listen)` for every TCP listener.
    pub(crate) fn listeners(&self) -> impl Iterator<Item = (String, SocketAddr)> + '_ {
        let inbound = self
            .inbound
            .iter()
            .map(|t| (format!("tcp_inbound:{}", t.name), t.listen));
        let outbound = self
            .outbound
            .iter()
            .map(|t| (format!("tcp_outbound:{}", t.name), t.listen));
        inbound.chain(outbound)
    }
}

impl Check<'_> {
    /// Validates the TCP tables; names are unique across both kinds.
    pub(crate) fn tcp(
        &mut self,
        inbound: Vec<RawTcpInbound>,
        outbound: Vec<RawTcpOutbound>,
    ) -> TcpConfig {
        let mut names = HashSet::new();
        let inbound = inbound
            .into_iter()
            .map(|t| {
                self.tcp_name(&t.name, "tcp_inbound", &mut names);
                self.tcp_inbound(t)
            })
            .collect();
        // One namespace for both kinds: the name is the `listener` metric label.
        let outbound = outbound
            .into_iter()
            .filter_map(|t| {
                self.tcp_name(&t.name, "tcp_outbound", &mut names);
                self.tcp_outbound(t)
            })
            .collect();
        TcpConfig { inbound, outbound }
    }

    fn tcp_name(&mut self, name: &S<String>, kind: &'static str, seen: &mut HashSet<String>) {
        let n = name.get_ref();
        if n.is_empty() {
            let key = if kind == "tcp_inbound" {
                "tcp_inbound.name"
            } else {
                "tcp_outbound.name"
            };
            self.push(Some(name.span()), ConfigErrorKind::Empty { key });
        } else if !seen.insert(n.clone()) {
            let msg = format!("[[{kind}]] name `{n}` is used twice: give each entry its own name");
            self.push(Some(name.span()), ConfigErrorKind::Syntax(msg));
        }
    }

    fn tcp_inbound(&mut self, t: RawTcpInbound) -> TcpInboundConfig {
        let listen = self.addr(&t.listen).unwrap_or_else(placeholder);
        let app = self.addr(&t.app).unwrap_or_else(placeholder);
        if !app.ip().is_loopback() && !t.insecure_app_address {
            self.push(
                Some(t.app.span()),
                ConfigErrorKind::NonLoopbackApp { addr: app },
            );
        }
        let max_connections = self.count(
            t.max_connections.as_ref(),
            "tcp_inbound.max_connections",
            DEFAULT_TCP_MAX_CONNECTIONS,
        );
        TcpInboundConfig {
            name: t.name.into_inner(),
            listen,
            app,
            policy: self.path(&t.policy, "tcp_inbound.policy"),
            insecure_app_address: t.insecure_app_address,
            handshake_timeout: self.duration(
                t.handshake_timeout.as_ref(),
                "tcp_inbound.handshake_timeout",
                DEFAULT_TCP_HANDSHAKE_TIMEOUT,
            ),
            idle_timeout: self.duration(
                t.idle_timeout.as_ref(),
                "tcp_inbound.idle_timeout",
                DEFAULT_TCP_IDLE_TIMEOUT,
            ),
            max_connections,
            max_connections_per_source: self.count(
                t.max_connections_per_source.as_ref(),
                "tcp_inbound.max_connections_per_source",
                DEFAULT_TCP_MAX_CONNECTIONS_PER_SOURCE,
            ),
            max_handshakes_per_source: self.count(
                t.max_handshakes_per_source.as_ref(),
                "tcp_inbound.max_handshakes_per_source",
                DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            ),
            // Unauthenticated connections never hold more than half the slots.
            max_pending_handshakes: self
                .count(
                    t.max_pending_handshakes.as_ref(),
                    "tcp_inbound.max_pending_handshakes",
                    DEFAULT_MAX_PENDING_HANDSHAKES,
                )
                .min(max_connections.div_ceil(2)),
        }
    }

    fn tcp_outbound(&mut self, t: RawTcpOutbound) -> Option<TcpOutboundConfig> {
        let name = t.name.get_ref().clone();
        let listen = self.addr(&t.listen).unwrap_or_else(placeholder);
        if !listen.ip().is_loopback() && !t.allow_non_loopback_listen {
            let kind = ConfigErrorKind::NonLoopbackOutbound {
                name: name.clone(),
                addr: listen,
            };
            self.push(Some(t.listen.span()), kind);
        }
        let target = self.target(&t.connect);
        let server_id = match SpiffeId::parse(t.server_id.get_ref()) {
            Ok(id) => Some(id),
            Err(source) => {
                let value = t.server_id.get_ref().clone();
                self.push(
                    Some(t.server_id.span()),
                    ConfigErrorKind::SpiffeId { value, source },
                );
                None
            }
        };
        let sni = t.sni.map(|s| {
            if s.get_ref().is_empty() {
                let key = "tcp_outbound.sni";
                self.push(Some(s.span()), ConfigErrorKind::Empty { key });
            }
            s.into_inner()
        });
        let connect_timeout = self.duration(
            t.connect_timeout.as_ref(),
            "tcp_outbound.connect_timeout",
            DEFAULT_TCP_HANDSHAKE_TIMEOUT,
        );
        let idle_timeout = self.duration(
            t.idle_timeout.as_ref(),
            "tcp_outbound.idle_timeout",
            DEFAULT_TCP_IDLE_TIMEOUT,
        );
        let max_connections = self.count(
            t.max_connections.as_ref(),
            "tcp_outbound.max_connections",
            DEFAULT_TCP_MAX_CONNECTIONS,
        );
        Some(TcpOutboundConfig {
            name,
            listen,
            target,
            // An error is already recorded when it did not parse.
            server_id: server_id?,
            sni,
            allow_non_loopback_listen: t.allow_non_loopback_listen,
            connect_timeout,
            idle_timeout,
            max_connections,
        })
    }
}

fn placeholder() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const TCP_ONLY: &str = r#"
[identity]
cert = "certs/cert.pem"
key = "certs/key.pem"
bundle = "certs/bundle.pem"

[[tcp_inbound]]
name   = "postgres"
listen = "0.0.0.0:15432"
app    = "127.0.0.1:5432"
policy = "policy.toml"

[[tcp_outbound]]
name      = "reports-db"
listen    = "127.0.0.1:5432"
connect   = "reports-db.internal:15432"
server_id = "spiffe://fintech.internal/reports-db"
idle_timeout = "5m"

[admin]
listen = "127.0.0.1:9901"
"#;

    #[test]
    fn a_sidecar_with_only_tcp_listeners_is_valid() {
        let c = Config::parse(TCP_ONLY, Path::new("/etc/gatehouse/sidecar.toml")).expect("valid");
        assert!(c.inbound.is_none() && c.outbound.is_empty());
        let t = &c.tcp.inbound[0];
        assert_eq!(t.name, "postgres");
        assert_eq!(t.policy, Path::new("/etc/gatehouse/policy.toml"));
        assert_eq!(t.idle_timeout, super::DEFAULT_TCP_IDLE_TIMEOUT);
        let o = &c.tcp.outbound[0];
        assert_eq!(
            (o.target.host(), o.target.port()),
            ("reports-db.internal", 15432)
        );
        assert_eq!(o.idle_timeout.as_secs(), 300);
        assert!(
            c.listeners()
                .iter()
                .any(|(n, _)| n == "tcp_outbound:reports-db")
        );
    }

    #[test]
    fn tcp_mistakes_are_reported_with_their_position() {
        let text = TCP_ONLY
            .replace("\"127.0.0.1:5432\"\npolicy", "\"10.0.0.5:5432\"\npolicy")
            .replace(
                "listen    = \"127.0.0.1:5432\"",
                "listen    = \"0.0.0.0:5432\"",
            )
            .replace("idle_timeout = \"5m\"", "idle_timeout = \"soon\"\nport = 1");
        let errs = Config::parse(&text, Path::new("sidecar.toml")).expect_err("refused");
        let e: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            e.iter().any(|e| e.contains("unknown field `port`")),
            "{e:?}"
        );
        let text = TCP_ONLY
            .replace("\"127.0.0.1:5432\"\npolicy", "\"10.0.0.5:5432\"\npolicy")
            .replace(
                "listen    = \"127.0.0.1:5432\"",
                "listen    = \"0.0.0.0:5432\"",
            )
            .replace("idle_timeout = \"5m\"", "idle_timeout = \"soon\"");
        let errs = Config::parse(&text, Path::new("sidecar.toml")).expect_err("refused");
        let e: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let has = |at: &str, what: &str| e.iter().any(|x| x.contains(at) && x.contains(what));
        assert!(has("sidecar.toml:10:10", "not a loopback address"), "{e:?}");
        assert!(
            has("sidecar.toml:15:13", "listens on 0.0.0.0:5432"),
            "{e:?}"
        );
        assert!(
            has("sidecar.toml:18:16", "`soon` is not a duration"),
            "{e:?}"
        );
    }
}
