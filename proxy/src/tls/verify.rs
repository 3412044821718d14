//! The SPIFFE-aware client certificate verifier and [`PeerIdentity`], the proof that a peer
//! completed a verified mTLS handshake.
//!
//! Verification is two steps, in this order: webpki validates the chain against the trust
//! bundle (and the CRLs when configured), then [`svid_identity`] enforces the X.509-SVID rules
//! and our trust domain. Both run inside the handshake, so a refused peer gets an alert and
//! never reaches HTTP.
//!
//! rustls restores a *resumed* session's peer certificates without running the verifier
//! (`server/tls13.rs`), so [`SpiffeClientVerifier::identify`] runs after every handshake: it
//! re-checks the leaf's SVID rules always and re-runs the full verifier (chain, CRL, expiry) on
//! resumed sessions.

use std::error::Error as StdError;
use std::sync::Arc;

use gatehouse_policy::{SpiffeId, TrustDomain};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, HandshakeKind, OtherError,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use sha2::{Digest, Sha256};

use super::TlsError;
use super::bounds::{ChainBoundError, check_chain};
use super::crl::Freshness;
use super::svid::{SvidError, svid_identity};

/// A peer that completed a verified mTLS handshake, and its SPIFFE ID.
///
/// Only this module constructs it, after the chain was validated and the X.509-SVID rules held,
/// so holding one proves it.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    id: SpiffeId,
    leaf_sha256_hex: String,
    serial_hex: String,
}

impl PeerIdentity {
    /// The peer's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// SHA-256 of the peer's leaf certificate DER, lowercase hex (the XFCC `Hash=`).
    pub fn leaf_sha256_hex(&self) -> &str {
        &self.leaf_sha256_hex
    }

    /// The serial number of the peer's leaf certificate, lowercase hex (the audit lines').
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }

    /// Identity of the peer of a session whose certificates the verifier already validated in
    /// the handshake: re-applies the SVID rules to the leaf. Private: holding a
    /// `PeerIdentity` must mean a verifier of this module ran.
    fn from_verified_certs(
        peer_certs: Option<&[CertificateDer<'_>]>,
        td: &TrustDomain,
    ) -> Result<Self, Error> {
        let leaf = peer_certs
            .and_then(<[_]>::first)
            .ok_or(Error::NoCertificatesPresented)?;
        let id = svid_identity(leaf, td).map_err(svid_rejection)?;
        Ok(Self {
            id,
            leaf_sha256_hex: hex::encode(Sha256::digest(leaf.as_ref())),
            serial_hex: super::serial_hex(leaf),
        })
    }
}

/// The error rustls turns into a `certificate_unknown` alert, keeping the [`SvidError`] for the
/// metric reason.
fn svid_rejection(e: SvidError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// webpki chain validation (+ CRLs), then the X.509-SVID rules for trust domain `td`.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    td: TrustDomain,
    freshness: Freshness,
}

impl SpiffeClientVerifier {
    /// Builds the verifier. With CRLs, only the leaf's revocation status is checked: our CRLs
    /// are issued by the signing CA for the leaves it issued, and CA certificates are retired by
    /// root rotation, not revocation.
    ///
    /// # Errors
    /// [`TlsError::Verifier`] when webpki refuses the roots or a CRL.
    pub fn new(
        roots: Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        td: TrustDomain,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider);
        if !crls.is_empty() {
            builder = builder.with_crls(crls).only_check_end_entity_revocation();
        }
        let inner = builder.build().map_err(|e| TlsError::Verifier {
            detail: e.to_string(),
        })?;
        Ok(Self {
            inner,
            td,
            freshness: Freshness::off(),
        })
    }

    /// Also refuses peers whose issuer's CRL is stale beyond the grace period (see
    /// [`Freshness`]).
    #[must_use]
    pub fn with_freshness(mut self, freshness: Freshness) -> Self {
        self.freshness = freshness;
        self
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The verified identity of the client of a completed handshake. Resumed sessions are
    /// verified again in full (rustls skipped the verifier for them).
    ///
    /// # Errors
    /// The rustls error describing why the peer is not acceptable.
    pub fn identify(&self, conn: &ServerConnection) -> Result<PeerIdentity, Error> {
        let certs = conn.peer_certificates();
        if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
            let (leaf, intermediates) = certs
                .and_then(<[_]>::split_first)
                .ok_or(Error::NoCertificatesPresented)?;
            let now = UnixTime::now();
            self.inner.verify_client_cert(leaf, intermediates, now)?;
            self.freshness.check(leaf, now)?;
        }
        PeerIdentity::from_verified_certs(certs, &self.td)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check_chain(end_entity, intermediates)?;
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.freshness.check(end_entity, now)?;
        svid_identity(end_entity, &self.td).map_err(svid_rejection)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A bounded label saying why a handshake failed, for `gatehouse_tls_handshakes_total{reason}`.
pub(crate) fn failure_reason(e: &Error) -> &'static str {
    match e {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(c) => certificate_reason(c),
        Error::PeerIncompatible(_) => "incompatible",
        Error::NoApplicationProtocol => "no_alpn",
        Error::DecryptError => "decrypt_error",
        Error::AlertReceived(_) => "alert_received",
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => "invalid_message",
        Error::PeerMisbehaved(_) => "peer_misbehaved",
        _ => "other",
    }
}

fn certificate_reason(c: &CertificateError) -> &'static str {
    match c {
        CertificateError::UnknownIssuer => "unknown_issuer",
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not_yet_valid"
        }
        CertificateError::Revoked => "revoked",
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => "crl_stale",
        CertificateError::UnknownRevocationStatus => "unknown_revocation_status",
        CertificateError::BadSignature => "bad_signature",
        CertificateError::BadEncoding => "bad_encoding",
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "invalid_purpose"
        }
        CertificateError::Other(OtherError(inner)) => {
            let inner: &(dyn StdError + 'static) = &**inner;
            if let Some(svid) = inner.downcast_ref::<SvidError>() {
                svid.reason()
            } else if let Some(bound) = inner.downcast_ref::<ChainBoundError>() {
                bound.reason()
            } else if let Some(webpki::Error::CaUsedAsEndEntity) = inner.downcast_ref() {
                "ca_used_as_end_entity"
            } else {
                "invalid_certificate"
            }
        }
        _ => "invalid_certificate",
    }
}
