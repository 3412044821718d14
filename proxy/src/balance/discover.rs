//! Endpoints from DNS: `connect = "host:port"` → every A/AAAA record of `host` is an endpoint.
//!
//! Uses `hickory-resolver` (the maintained Rust DNS resolver; 0.26 runs on our tokio 1.x).
//! The name is re-resolved when its answer's TTL runs out, clamped to `min_ttl` … `max_ttl`
//! (default 5 s … 60 s: DNS TTLs of 0 or of a day are both common, and neither is a sensible
//! refresh). `resolver = "ip:port"` asks that DNS server (UDP, then TCP) instead of the system's
//! (`/etc/resolv.conf`). An IP literal is one fixed endpoint and never resolved. A failed or
//! empty resolution keeps the last known set (and retries after `min_ttl`): losing DNS must not
//! take every endpoint away. Each new set is published on a `watch` channel, sorted; the
//! balancer's [`super::Balancer::update`] turns it into added and draining endpoints.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;

/// Discovery settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoverConfig {
    /// Shortest re-resolution interval (a TTL below it is raised to it).
    pub min_ttl: Duration,
    /// Longest re-resolution interval.
    pub max_ttl: Duration,
    /// The DNS server to ask; `None` for the system's.
    pub resolver: Option<SocketAddr>,
}

impl Default for DiscoverConfig {
    fn default() -> Self {
        DiscoverConfig {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(60),
            resolver: None,
        }
    }
}

/// What `connect` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IP literal: one endpoint.
    Fixed(SocketAddr),
    /// A DNS name and port.
    Name {
        /// The host name.
        host: String,
        /// The port every endpoint listens on.
        port: u16,
    },
}

/// Why a `connect` value or a resolution failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// Not `host:port`.
    #[error("`{0}` is not host:port; write e.g. \"monolith.internal:8443\" or \"10.0.0.5:8443\"")]
    BadTarget(String),
    /// The resolver could not be set up (e.g. unreadable /etc/resolv.conf).
    #[error(
        "cannot set up the DNS resolver: {0}; set `resolver = \"ip:port\"` to name a DNS server"
    )]
    Setup(String),
    /// The lookup failed.
    #[error("resolving `{host}` failed: {reason}")]
    Lookup {
        /// The name.
        host: String,
        /// The resolver's message.
        reason: String,
    },
}

impl Target {
    /// Parses `host:port`, `ipv4:port` or `[ipv6]:port`.
    ///
    /// # Errors
    /// [`DiscoverError::BadTarget`].
    pub fn parse(connect: &str) -> Result<Target, DiscoverError> {
        if let Ok(a) = connect.parse::<SocketAddr>() {
            return Ok(Target::Fixed(a));
        }
        let bad = || DiscoverError::BadTarget(connect.to_owned());
        let (host, port) = connect.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(['[', ']', ':', '/', ' ']) {
            return Err(bad());
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Target::Fixed(SocketAddr::new(ip, port)));
        }
        Ok(Target::Name {
            host: host.to_owned(),
            port,
        })
    }
}

/// A resolver for one name.
pub struct Discovery {
    resolver: TokioResolver,
    host: String,
    port: u16,
    config: DiscoverConfig,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// A resolver for `host`, asking `config.resolver` or the system's DNS servers.
    ///
    /// # Errors
    /// [`DiscoverError::Setup`] when the system configuration cannot be read.
    pub fn new(host: &str, port: u16, config: DiscoverConfig) -> Result<Discovery, DiscoverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match config.resolver {
            Some(server) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    provider,
                )
            }
            None => {
                TokioResolver::builder(provider).map_err(|e| DiscoverError::Setup(e.to_string()))?
            }
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        // Our own re-resolution schedule decides freshness; no answer is served from a cache
        // past the next refresh.
        opts.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| DiscoverError::Setup(e.to_string()))?;
        Ok(Discovery {
            resolver,
            host: host.to_owned(),
            port,
            config,
        })
    }

    /// Resolves once: every address (sorted, deduplicated) and when to resolve again.
    ///
    /// # Errors
    /// [`DiscoverError::Lookup`] on failure or an empty answer.
    pub async fn resolve(&self) -> Result<(Vec<SocketAddr>, Duration), DiscoverError> {
        let fail = |reason: String| DiscoverError::Lookup {
            host: self.host.clone(),
            reason,
        };
        // Fully qualified: no search-domain guessing.
        let name = if self.host.ends_with('.') {
            self.host.clone()
        } else {
            format!("{}.", self.host)
        };
        let answer = self
            .resolver
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut addrs: Vec<SocketAddr> = answer
            .iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(fail("no A or AAAA record".to_owned()));
        }
        let ttl = answer
            .valid_until()
            .saturating_duration_since(Instant::now());
        Ok((addrs, self.clamp(ttl)))
    }

    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(
            self.config.min_ttl,
            self.config.max_ttl.max(self.config.min_ttl),
        )
    }

    /// Resolves now and then on every TTL, publishing each changed set; a failure keeps the
    /// last set. The task ends when every receiver is gone. The first resolution is awaited
    /// (its error returned), so a sidecar can report a name that does not resolve at start.
    ///
    /// # Errors
    /// The first resolution's error.
    pub async fn spawn(self) -> Result<watch::Receiver<Arc<Vec<SocketAddr>>>, DiscoverError> {
        let (first, ttl) = self.resolve().await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            let mut wait = ttl;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
                match self.resolve().await {
                    Ok((addrs, ttl)) => {
                        wait = ttl;
                        if **tx.borrow() != addrs {
                            tracing::info!(host = %self.host, endpoints = addrs.len(), "endpoint set changed");
                            tx.send_replace(Arc::new(addrs));
                        }
                    }
                    Err(e) => {
                        wait = self.config.min_ttl;
                        tracing::warn!(host = %self.host, error = %e, "resolution failed; keeping the last endpoint set");
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The difference between two endpoint sets: what to add and what to drain.
pub fn changes(old: &[SocketAddr], new: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let added = new.iter().filter(|a| !old.contains(a)).copied().collect();
    let removed = old.iter().filter(|a| !new.contains(a)).copied().collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("10.0.0.5:8443").unwrap(),
            Target::Fixed("10.0.0.5:8443".parse().unwrap())
        );
        assert_eq!(
            Target::parse("[::1]:8443").unwrap(),
            Target::Fixed("[::1]:8443".parse().unwrap())
        );
        assert_eq!(
            Target::parse("monolith.internal:8443").unwrap(),
            Target::Name {
                host: "monolith.internal".to_owned(),
                port: 8443
            }
        );
        for bad in [
            "monolith.internal",
            "host:port",
            ":8443",
            "a b:1",
            "::1:8443x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn changes_are_added_and_removed() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let c: SocketAddr = "127.0.0.3:1".parse().unwrap();
        assert_eq!(changes(&[a, b], &[b, c]), (vec![c], vec![a]));
    }
}
