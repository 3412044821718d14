//! Signing a workload's CSR ([`Authority::sign_csr`]): the private key never touches the CA.
//!
//! The CSR's self-signature is verified (rcgen, via x509-parser), then only its public key is
//! used: subject, SANs, key usages and every other requested attribute are discarded and replaced
//! by the SVID profile built from the SPIFFE ID and DNS names the operator passed on the command
//! line, never copied from the request.

use std::path::Path;

use rcgen::CertificateSigningRequestParams;
use rustls_pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;

use crate::inventory::Source;
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
