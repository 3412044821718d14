//! The inbound `ServerConfig`: TLS 1.3 only unless `min_tls = "1.2"`, ALPN `h2` then
//! `http/1.1`, client certificate required and checked by [`SpiffeClientVerifier`], our
//! certificate from the swappable [`CertResolver`]. No 0-RTT (rustls default).
//!
//! A new `ServerConfig` gets a fresh session cache, so a trust or CRL change never resumes a
//! session verified under the old rules.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::version::{TLS12, TLS13};

use super::TlsError;
use super::resolver::CertResolver;
use super::verify::SpiffeClientVerifier;
use crate::config::MinTls;

/// ALPN protocols we offer, in preference order.
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The protocol versions for `min`.
pub(crate) fn versions(min: MinTls) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&TLS13];
    static FROM_12: [&rustls::SupportedProtocolVersion; 2] = [&TLS13, &TLS12];
    match min {
        MinTls::Tls13 => &ONLY_13,
        MinTls::Tls12 => &FROM_12,
    }
}

/// Builds the inbound server configuration.
///
/// # Errors
/// [`TlsError::Config`] when rustls refuses the protocol versions for the provider.
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    min: MinTls,
    verifier: Arc<SpiffeClientVerifier>,
    resolver: Arc<CertResolver>,
) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(min))
        .map_err(|e| TlsError::Config {
            detail: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // Our suite order (AES-128-GCM first, see `tls::provider`), not the client's.
    cfg.ignore_client_order = true;
    Ok(cfg)
}
