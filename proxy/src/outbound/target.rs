//! Where an upstream lives: `host:port` from `connect`, kept unresolved (DNS is asked at
//! connect time).

use http::uri::Authority;

/// Where an upstream lives: `host:port` from `connect`, kept unresolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

/// `connect` is not `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not host:port (write e.g. `monolith.internal:8443` or `[::1]:8443`)")]
pub struct TargetError(String);

impl Target {
    /// A target from an already validated host (DNS name or IP, without brackets) and port.
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
        }
    }

    /// Parses `host:port`, `ipv4:port` or `[ipv6]:port`.
    ///
    /// # Errors
    /// Anything else.
    pub fn parse(s: &str) -> Result<Self, TargetError> {
        let bad = || TargetError(s.to_owned());
        let authority: Authority = s.parse().map_err(|_| bad())?;
        let port = authority.port_u16().ok_or_else(bad)?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || authority.as_str().contains('@') {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The host without brackets: a DNS name or an IP address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub(super) fn authority(&self) -> Authority {
        let text = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        // Invariant: built from a parsed authority's host and port.
        text.parse().expect("host and port of a parsed authority")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parses_names_and_addresses() {
        let t = Target::parse("monolith.internal:8443").unwrap();
        assert_eq!((t.host(), t.port()), ("monolith.internal", 8443));
        let t = Target::parse("127.0.0.1:9").unwrap();
        assert_eq!((t.host(), t.port()), ("127.0.0.1", 9));
        let t = Target::parse("[::1]:8443").unwrap();
        assert_eq!((t.host(), t.port()), ("::1", 8443));
        assert_eq!(t.authority().as_str(), "[::1]:8443");
        for bad in [
            "monolith",
            "monolith:",
            ":8443",
            "user@host:1",
            "http://h:1",
            "",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
