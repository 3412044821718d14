//! Bounds on a peer's certificate chain, checked before webpki sees it: one rule for every
//! verifier (the sidecar's inbound client verifier and outbound server verifier, and `ca serve`'s
//! client verifier).
//!
//! webpki builds paths by trying every presented certificate whose subject matches the issuer
//! it looks for. A chain of many self-issued CAs with one subject makes that search
//! exponential: webpki gives up at its own budget (`MaximumPathBuildCallsExceeded`), but only
//! after about 100 ms of CPU on the event loop. Our chains are a leaf plus at most one or two
//! intermediates, so a small count and size bound refuses such a chain in microseconds,
//! before any path is built. The chain itself is still verified by webpki only.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, Error, OtherError};

/// Most intermediates a peer may send after its leaf.
pub const MAX_CHAIN_INTERMEDIATES: usize = 4;
/// Largest single certificate accepted, in DER bytes (an RSA-4096 SVID is about 1.5 KiB).
pub const MAX_CERT_BYTES: usize = 16 * 1024;
/// Largest whole chain (leaf + intermediates) accepted, in DER bytes.
pub const MAX_CHAIN_BYTES: usize = 48 * 1024;

/// Why a chain was refused before verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainBoundError {
    /// More intermediates than [`MAX_CHAIN_INTERMEDIATES`].
    TooManyIntermediates(usize),
    /// One certificate larger than [`MAX_CERT_BYTES`].
    CertTooLarge(usize),
    /// The chain larger than [`MAX_CHAIN_BYTES`].
    ChainTooLarge(usize),
}

impl ChainBoundError {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooManyIntermediates(_) => "chain_too_long",
            Self::CertTooLarge(_) => "cert_too_large",
            Self::ChainTooLarge(_) => "chain_too_large",
        }
    }
}

impl fmt::Display for ChainBoundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyIntermediates(n) => write!(
                f,
                "the peer sent {n} intermediate certificates, more than {MAX_CHAIN_INTERMEDIATES}: \
                 send only the leaf and the intermediates up to the trust bundle's root"
            ),
            Self::CertTooLarge(n) => write!(
                f,
                "a certificate of the peer's chain is {n} bytes, more than {MAX_CERT_BYTES}"
            ),
            Self::ChainTooLarge(n) => write!(
                f,
                "the peer's certificate chain is {n} bytes, more than {MAX_CHAIN_BYTES}"
            ),
        }
    }
}

impl std::error::Error for ChainBoundError {}

/// Refuses a chain over the bounds (alert `certificate_unknown`, metric reason from
/// [`ChainBoundError::reason`]); call it first in every certificate verifier.
///
/// # Errors
/// [`Error::InvalidCertificate`] carrying the [`ChainBoundError`].
pub fn check_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), Error> {
    bound(end_entity, intermediates)
        .map_err(|e| Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))
}

/// Whether `e` is a refusal by [`check_chain`].
pub fn is_bound_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))
            if inner.downcast_ref::<ChainBoundError>().is_some()
    )
}

/// Whether a failed TLS accept or connect (the I/O error `tokio_rustls` returns) was a
/// refusal by [`check_chain`].
pub fn is_bound_refusal_io(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(is_bound_refusal)
}

fn bound(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), ChainBoundError> {
    if intermediates.len() > MAX_CHAIN_INTERMEDIATES {
        return Err(ChainBoundError::TooManyIntermediates(intermediates.len()));
    }
    let mut total = 0;
    for cert in std::iter::once(end_entity).chain(intermediates) {
        let len = cert.as_ref().len();
        if len > MAX_CERT_BYTES {
            return Err(ChainBoundError::CertTooLarge(len));
        }
        total += len;
    }
    if total > MAX_CHAIN_BYTES {
        return Err(ChainBoundError::ChainTooLarge(total));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(len: usize) -> CertificateDer<'static> {
        CertificateDer::from(vec![0u8; len])
    }

    #[test]
    fn chains_within_the_bounds_pass() {
        let inter = vec![cert(2000); MAX_CHAIN_INTERMEDIATES];
        assert_eq!(bound(&cert(1500), &inter), Ok(()));
    }

    #[test]
    fn too_many_intermediates_are_refused() {
        let inter = vec![cert(300); MAX_CHAIN_INTERMEDIATES + 1];
        let e = bound(&cert(300), &inter).unwrap_err();
        assert_eq!(e, ChainBoundError::TooManyIntermediates(5));
        assert_eq!(e.reason(), "chain_too_long");
        assert!(is_bound_refusal(
            &check_chain(&cert(300), &inter).unwrap_err()
        ));
    }

    #[test]
    fn oversized_certificates_and_chains_are_refused() {
        assert_eq!(
            bound(&cert(MAX_CERT_BYTES + 1), &[]),
            Err(ChainBoundError::CertTooLarge(MAX_CERT_BYTES + 1))
        );
        let inter = vec![cert(MAX_CERT_BYTES); 3];
        assert_eq!(
            bound(&cert(MAX_CERT_BYTES), &inter),
            Err(ChainBoundError::ChainTooLarge(4 * MAX_CERT_BYTES))
        );
    }
}
