//! Client side TLS for outbound connections: our certificate through a swappable resolver, and a
//! server verifier that checks *identity*, not hostname.
//!
//! X.509-SVIDs carry no DNS SAN, so the stock `WebPkiServerVerifier` (hostname check) is useless
//! here. [`ServerIdentityVerifier`] validates the chain with webpki against the trust bundle (and
//! the CRL when one is configured), reads the SPIFFE ID with [`svid_identity`], and accepts the
//! server only if that ID matches the pinned `server_id`. It runs inside the handshake, so on a
//! mismatch the handshake fails and not one request byte is written.
//!
//! The typed reason survives the trip through rustls and tokio-rustls:
//! [`ServerIdentityError`] is wrapped in `CertificateError::Other`, and
//! [`server_identity_error`] digs it back out of the `io::Error` the connector returns.
//!
//! Not here: PEM loading and the SVID rules themselves (`tls::svid`), connection pooling
//! (`outbound::upstream`).

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;

use gatehouse_policy::{IdentityPattern, SpiffeId, TrustDomain};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, OtherError,
    RootCertStore, SignatureScheme, SupportedProtocolVersion,
};
use webpki::{
    CertRevocationList, EndEntityCert, OwnedCertRevocationList, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::tls::bounds::check_chain;
use crate::tls::crl::Freshness;
use crate::tls::svid::{SvidError, svid_identity};

/// Why the server's certificate was refused after its chain validated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ServerIdentityError {
    /// The server proved an identity of our trust domain, but not the one we pinned.
    #[error("server presented `{presented}`, expected `{expected}`")]
    Mismatch {
        /// The `server_id` (or pattern) the outbound entry pins.
        expected: IdentityPattern,
        /// The SPIFFE ID in the server's certificate.
        presented: SpiffeId,
    },
    /// The certificate chains to our bundle but is not a valid X.509-SVID of our trust domain.
    #[error("server certificate is not an X.509-SVID of our trust domain: {0}")]
    NotAnSvid(#[source] SvidError),
}

/// The CRL given to [`ServerIdentityVerifier::new`] could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("certificate revocation list {index} is not valid DER: {source}")]
pub(crate) struct CrlError {
    /// Position of the bad CRL in the list (0-based).
    pub index: usize,
    /// What webpki said.
    #[source]
    pub source: webpki::Error,
}

/// A rustls server verifier that pins the server's SPIFFE ID.
pub(crate) struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    freshness: Freshness,
    crls: Vec<CertRevocationList<'static>>,
    trust_domain: TrustDomain,
    expected: IdentityPattern,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ServerIdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentityVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("expected", &self.expected)
            .field("roots", &self.roots.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

impl ServerIdentityVerifier {
    /// A verifier accepting servers whose chain ends in `roots` (not revoked by any of `crls`)
    /// and whose SVID identity, in `trust_domain`, matches `expected`.
    ///
    /// # Errors
    /// A CRL that does not parse.
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        crls: &[CertificateRevocationListDer<'_>],
        trust_domain: TrustDomain,
        expected: IdentityPattern,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CrlError> {
        let crls = crls
            .iter()
            .enumerate()
            .map(|(index, der)| {
                OwnedCertRevocationList::from_der(der.as_ref())
                    .map(CertRevocationList::from)
                    .map_err(|source| CrlError { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            roots,
            freshness: Freshness::off(),
            crls,
            trust_domain,
            expected,
            provider,
        })
    }

    /// Also refuses servers whose issuer's CRL is stale beyond the grace period (see
    /// [`Freshness`]).
    #[must_use]
    pub(crate) fn with_freshness(mut self, freshness: Freshness) -> Self {
        self.freshness = freshness;
        self
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        check_chain(end_entity, intermediates)?;
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        // As on the inbound side: with CRLs, the leaf's revocation status must be known (our
        // CRLs come from the signing CA for the leaves it issued; CA certificates are retired
        // by root rotation, not revocation).
        let revocation = match RevocationOptionsBuilder::new(&crl_refs) {
            Ok(builder) => Some(
                builder
                    .with_depth(RevocationCheckDepth::EndEntity)
                    .with_status_policy(UnknownStatusPolicy::Deny)
                    .build(),
            ),
            Err(_no_crls) => None,
        };
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            revocation,
            None,
        )
        .map(|_path| ())
        .map_err(pki_error)
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain first: nothing about an unauthenticated certificate is worth reporting.
        self.verify_chain(end_entity, intermediates, now)?;
        self.freshness.check(end_entity, now)?;
        let presented = svid_identity(end_entity, &self.trust_domain)
            .map_err(|e| identity_error(ServerIdentityError::NotAnSvid(e)))?;
        if !self.expected.matches(&presented) {
            return Err(identity_error(ServerIdentityError::Mismatch {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn identity_error(e: ServerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps webpki's verdict to the rustls error (and so the alert) the server will see.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert_error = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

/// The rustls client configuration for one upstream: the given protocol versions (TLS 1.3 only
/// unless configuration allows 1.2), ALPN `alpn` (most preferred first), our certificate from `cert`,
/// the server checked by `verifier`, SNI sent (its value is the `ServerName` the connector
/// passes: the `sni` setting or the host of `connect`).
///
/// # Errors
/// The provider does not support the requested protocol versions.
pub(crate) fn client_config(
    provider: Arc<CryptoProvider>,
    versions: &[&'static SupportedProtocolVersion],
    verifier: Arc<ServerIdentityVerifier>,
    cert: Arc<dyn ResolvesClientCert>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = true;
    Ok(config)
}

/// Finds the [`ServerIdentityError`] behind a failed handshake, if that is why it failed.
pub(crate) fn server_identity_error<'e>(
    err: &'e (dyn StdError + 'static),
) -> Option<&'e ServerIdentityError> {
    match rustls_error(err)? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<ServerIdentityError>()
        }
        _ => None,
    }
}

/// The fatal alert the peer sent, if `err` (or anything it wraps) is one.
///
/// In TLS 1.3 the client's handshake completes before the server has judged our certificate,
/// so a refusal of *our* identity arrives as an alert on the first read after the request was
/// written: this is how the caller tells "the server refused us" from a broken connection.
pub(crate) fn received_alert(err: &(dyn StdError + 'static)) -> Option<AlertDescription> {
    match rustls_error(err)? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// Walks an error chain looking for the rustls error inside. `io::Error::source` skips the
/// wrapped error itself (it returns the wrapped error's source), so look into `get_ref` too.
pub(crate) fn rustls_error<'e>(err: &'e (dyn StdError + 'static)) -> Option<&'e rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| rustls_error(inner))
        {
            return Some(tls);
        }
        cur = e.source();
    }
    None
}

/// Lowercase snake_case name of a TLS alert (`certificate_required`, `unknown_ca`), as the
/// RFCs spell them; used in error bodies and logs.
pub(crate) fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    let mut prev_lower = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            // `UnknownCA` → `unknown_ca`: a break only where a lowercase letter ends a word.
            if prev_lower {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_names_follow_the_rfc_spelling() {
        assert_eq!(
            alert_name(AlertDescription::CertificateRequired),
            "certificate_required"
        );
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(alert_name(AlertDescription::AccessDenied), "access_denied");
    }

    #[test]
    fn a_server_chain_over_the_bounds_is_refused_before_path_building() {
        let td = TrustDomain::parse("fintech.internal").expect("td");
        let id = SpiffeId::parse("spiffe://fintech.internal/monolith").expect("id");
        let v = ServerIdentityVerifier::new(
            Arc::new(RootCertStore::empty()),
            &[],
            td,
            IdentityPattern::Exact(id),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .expect("verifier");
        let cert = CertificateDer::from(vec![0x30u8; 64]);
        let chain = vec![cert.clone(); crate::tls::bounds::MAX_CHAIN_INTERMEDIATES + 1];
        let name = ServerName::try_from("localhost").expect("name");
        let e = v
            .verify_server_cert(&cert, &chain, &name, &[], UnixTime::now())
            .expect_err("refused");
        assert!(crate::tls::bounds::is_bound_refusal(&e), "{e:?}");
    }
}
