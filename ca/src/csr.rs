//! Signing a workload's CSR ([`Authority::sign_csr`]): the private key never touches the CA.
//!
//! The CSR's self-signature is verified (rcgen, via x509-parser), then only its public key is
//! used: subject, SANs, key usages and every other requested attribute are discarded and replaced
//! by the SVID profile built from the SPIFFE ID and DNS names the operator passed on the command
//! line, never copied from the request.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateSigningRequestParams, PublicKeyData};
use rustls_pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;

use crate::inventory::Source;
use crate::issue::Provenance;
use crate::{Authority, CaError, IssueRequest, SpiffeId};

/// A certificate signed from a CSR (no private key: the workload holds it).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SignedCert {
    /// The identity in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf followed by the intermediate (if any), PEM.
    pub cert_pem: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the leaf DER, lowercase hex.
    pub sha256_hex: String,
}

impl Authority {
    /// Verifies the CSR in `csr` (PEM or DER, read from `csr_path`, used in errors) and signs its
    /// public key with the SVID profile for `req`.
    ///
    /// # Errors
    /// [`CaError::MalformedCsr`], [`CaError::CsrSignature`], and the errors of [`Authority::issue`].
    pub fn sign_csr(
        &self,
        csr: &[u8],
        csr_path: &Path,
        req: &IssueRequest,
    ) -> Result<SignedCert, CaError> {
        let parsed = parse_csr(csr, csr_path)?;
        let params = self.svid_params(&req.spiffe_id, &req.dns, req.ttl)?;
        let signed = self.sign_leaf(params, &parsed.public_key, Source::Sign, true, None)?;
        Ok(SignedCert {
            spiffe_id: req.spiffe_id.clone(),
            cert_pem: signed.chain_pem,
            serial_hex: signed.serial_hex,
            not_after: signed.not_after,
            sha256_hex: signed.sha256_hex,
        })
    }
}

/// The credential an online request (`ca serve`) was authenticated with. The SPIFFE ID of the
/// certificate always comes from here, never from the CSR.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Credential<'a> {
    /// A join token: one use is spent, and the identity is the token's, under the same hold of
    /// the directory lock as the signature.
    JoinToken(&'a str),
    /// An enrollment certificate presented as the TLS client certificate (already verified for
    /// the enroll-only EKU by the TLS layer): the identity is the one it is bound to; its serial
    /// is re-checked against the revocations under the lock.
    EnrollmentCert {
        /// The identity it is bound to ([`crate::profile::enrollment_target`]).
        id: SpiffeId,
        /// Its serial, lowercase hex.
        serial: String,
    },
    /// The requester's current SVID (renewal), already verified by the TLS layer: the identity is
    /// its URI SAN; its serial is re-checked against the revocations under the lock, and the CSR
    /// must carry a different key.
    Svid {
        /// The URI SAN of the presented certificate.
        id: SpiffeId,
        /// Its serial, lowercase hex.
        serial: String,
        /// Its raw subject public key (the BIT STRING content of the SPKI).
        public_key: Vec<u8>,
    },
    /// A Kubernetes projected service-account token, already verified
    /// ([`crate::k8s::K8sVerifier::verify`]): the identity is the one its namespace and
    /// service account map to.
    K8sServiceAccount {
        /// `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>`.
        id: SpiffeId,
    },
}

impl Credential<'_> {
    /// The kind recorded in the inventory (`join_token`, `enrollment_certificate`, `svid`,
    /// `k8s_service_account`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JoinToken(_) => "join_token",
            Self::EnrollmentCert { .. } => "enrollment_certificate",
            Self::Svid { .. } => "svid",
            Self::K8sServiceAccount { .. } => "k8s_service_account",
        }
    }
}

impl Authority {
    /// Signs a CSR received by `ca serve`: verifies its signature, takes the identity from
    /// `credential` (see [`Credential`]), issues a normal SVID (no DNS SANs, lifetime `ttl`) and
    /// records the credential kind and `peer` in the inventory. A refused credential writes
    /// nothing and issues nothing.
    ///
    /// # Errors
    /// [`CaError::MalformedCsr`], [`CaError::CsrSignature`], [`CaError::TokenUnknown`],
    /// [`CaError::TokenExpired`], [`CaError::TokenUsed`], [`CaError::RenewSameKey`],
    /// [`CaError::Revoked`], and the errors of [`Authority::issue`].
    pub fn sign_csr_online(
        &self,
        csr: &[u8],
        credential: &Credential<'_>,
        ttl: Duration,
        peer: &str,
    ) -> Result<SignedCert, CaError> {
        let parsed = parse_csr(csr, Path::new("request body"))?;
        if let Credential::Svid { public_key, .. } = credential
            && parsed.public_key.der_bytes() == public_key.as_slice()
        {
            return Err(CaError::RenewSameKey);
        }
        let _lock = self.lock()?;
        let (id, source) = match credential {
            Credential::JoinToken(token) => {
                // Check the profile first so a token is never spent on a request we then refuse.
                (self.peek_token_locked(token)?, Source::Enroll)
            }
            Credential::Svid { id, serial, .. } | Credential::EnrollmentCert { id, serial } => {
                if self.revoked_serials()?.contains(serial) {
                    return Err(CaError::Revoked {
                        serial: serial.clone(),
                    });
                }
                let source = match credential {
                    Credential::Svid { .. } => Source::Renew,
                    _ => Source::Enroll,
                };
                (id.clone(), source)
            }
            Credential::K8sServiceAccount { id } => (id.clone(), Source::Enroll),
        };
        let params = self.svid_params(&id, &[], ttl)?;
        if let Credential::JoinToken(token) = credential {
            self.spend_token_locked(token)?;
        }
        let how = Provenance {
            source,
            replaces: None,
            credential: Some(credential.kind()),
            peer: Some(peer),
        };
        let signed = self.sign_leaf_locked(params, &parsed.public_key, &how, true)?;
        Ok(SignedCert {
            spiffe_id: id,
            cert_pem: signed.chain_pem,
            serial_hex: signed.serial_hex,
            not_after: signed.not_after,
            sha256_hex: signed.sha256_hex,
        })
    }
}

/// Parses a PEM or DER PKCS#10 request and verifies its signature: what [`Authority::sign_csr`]
/// does with a CSR before it signs anything (public for the fuzz target `fuzz/csr_parse`).
///
/// # Errors
/// [`CaError::MalformedCsr`] or [`CaError::CsrSignature`], naming `path`.
pub fn parse_csr(csr: &[u8], path: &Path) -> Result<CertificateSigningRequestParams, CaError> {
    let malformed = |detail: String| CaError::MalformedCsr {
        path: path.to_path_buf(),
        detail,
    };
    let der: Vec<u8> = if csr.trim_ascii_start().starts_with(b"-----BEGIN") {
        use rustls_pki_types::pem::PemObject;
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map_err(|e| malformed(format!("no `CERTIFICATE REQUEST` PEM block ({e})")))?
            .as_ref()
            .to_vec()
    } else {
        csr.to_vec()
    };
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der)).map_err(
        |e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => CaError::CsrSignature {
                path: path.to_path_buf(),
            },
            rcgen::Error::CouldNotParseCertificationRequest => {
                malformed("not a PKCS#10 certificate request".into())
            }
            other => malformed(other.to_string()),
        },
    )
}
