//! X.509-SVID rules (SPIFFE X509-SVID §2, §4): what makes a certificate a workload identity of
//! our trust domain. Shared by the inbound client verifier, the outbound server verifier and
//! the sidecar's check of its own certificate, so all three apply exactly the same rules.
//!
//! Chain validation (signature, validity, revocation) is webpki's job and happens first; this
//! module only looks at the leaf's extensions.

use gatehouse_policy::{IdError, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a certificate is not an X.509-SVID of our trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("the certificate does not parse as X.509")]
    Malformed,
    /// `CA:TRUE` on a leaf (X509-SVID §4.1: a leaf SVID must not be a CA).
    #[error("the leaf certificate is a CA (basic constraints CA:TRUE)")]
    CaLeaf,
    /// `keyCertSign` or `cRLSign` on a leaf (X509-SVID §4.3).
    #[error("the leaf certificate may sign certificates or CRLs (key usage)")]
    SigningKeyUsage,
    /// No URI SAN at all.
    #[error("the certificate has no URI SAN (no SPIFFE ID)")]
    NoUriSan,
    /// More than one URI SAN (X509-SVID §2: exactly one).
    #[error("the certificate has {count} URI SANs; an X.509-SVID has exactly one")]
    MultipleUriSans {
        /// How many.
        count: usize,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("the URI SAN `{uri}` is not a valid SPIFFE ID: {source}")]
    InvalidId {
        /// The URI as presented.
        uri: String,
        /// The broken rule.
        source: IdError,
    },
    /// A SPIFFE ID of another trust domain.
    #[error("`{id}` is not in trust domain `{expected}`")]
    ForeignTrustDomain {
        /// The presented identity.
        id: SpiffeId,
        /// Our trust domain.
        expected: TrustDomain,
    },
}

impl SvidError {
    /// A short, bounded label for metrics (`gatehouse_tls_handshakes_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "svid_malformed",
            Self::CaLeaf => "svid_ca_leaf",
            Self::SigningKeyUsage => "svid_key_usage",
            Self::NoUriSan => "svid_no_uri_san",
            Self::MultipleUriSans { .. } => "svid_multiple_uri_sans",
            Self::InvalidId { .. } => "svid_invalid_id",
            Self::ForeignTrustDomain { .. } => "svid_foreign_trust_domain",
        }
    }
}

/// The SPIFFE ID of an X.509-SVID leaf, without the trust-domain check: exactly one URI SAN that
/// parses as a [`SpiffeId`], not a CA, no certificate- or CRL-signing key usage.
///
/// # Errors
/// The [`SvidError`] naming the rule the certificate breaks.
pub fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|_| SvidError::Malformed)?;
    let bc = cert.basic_constraints().map_err(|_| SvidError::Malformed)?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::CaLeaf);
    }
    let ku = cert.key_usage().map_err(|_| SvidError::Malformed)?;
    if ku.is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign()) {
        return Err(SvidError::SigningKeyUsage);
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::Malformed)?;
    let mut uris = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    let uri = uris.next().ok_or(SvidError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(SvidError::MultipleUriSans { count: extra + 1 });
    }
    SpiffeId::parse(uri).map_err(|source| SvidError::InvalidId {
        uri: uri.to_owned(),
        source,
    })
}

/// The SPIFFE ID of an X.509-SVID leaf of trust domain `td` (see [`leaf_identity`] for the other
/// rules). Call it only on a leaf whose chain webpki has already validated.
///
/// # Errors
/// The [`SvidError`] naming the rule the certificate breaks.
pub fn svid_identity(leaf: &CertificateDer<'_>, td: &TrustDomain) -> Result<SpiffeId, SvidError> {
    let id = leaf_identity(leaf)?;
    if !id.is_member_of(td) {
        return Err(SvidError::ForeignTrustDomain {
            id,
            expected: td.clone(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};

    fn td() -> TrustDomain {
        TrustDomain::parse("fintech.internal").expect("td")
    }

    fn cert(sans: &[SanType], ca: bool, usages: &[KeyUsagePurpose]) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans.to_vec();
        p.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = usages.to_vec();
        let key = KeyPair::generate().expect("key");
        p.self_signed(&key).expect("sign").der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn svid_rules_table() {
        let ds = [KeyUsagePurpose::DigitalSignature];
        let ok = "spiffe://fintech.internal/report-service";
        let cases: Vec<(&str, CertificateDer<'static>, Result<&str, &str>)> = vec![
            ("one URI SAN", cert(&[uri(ok)], false, &ds), Ok(ok)),
            (
                "URI plus DNS SAN",
                cert(
                    &[
                        uri(ok),
                        SanType::DnsName("x.internal".try_into().expect("dns")),
                    ],
                    false,
                    &ds,
                ),
                Ok(ok),
            ),
            ("CA:TRUE", cert(&[uri(ok)], true, &ds), Err("svid_ca_leaf")),
            (
                "keyCertSign",
                cert(&[uri(ok)], false, &[KeyUsagePurpose::KeyCertSign]),
                Err("svid_key_usage"),
            ),
            (
                "no URI SAN",
                cert(
                    &[SanType::DnsName("x.internal".try_into().expect("dns"))],
                    false,
                    &ds,
                ),
                Err("svid_no_uri_san"),
            ),
            (
                "no SAN at all",
                cert(&[], false, &ds),
                Err("svid_no_uri_san"),
            ),
            (
                "two URI SANs",
                cert(&[uri(ok), uri("spiffe://fintech.internal/ops")], false, &ds),
                Err("svid_multiple_uri_sans"),
            ),
            (
                "not a SPIFFE URI",
                cert(&[uri("https://fintech.internal/x")], false, &ds),
                Err("svid_invalid_id"),
            ),
            (
                "uppercase trust domain",
                cert(&[uri("spiffe://FINTECH.internal/x")], false, &ds),
                Err("svid_invalid_id"),
            ),
            (
                "another trust domain",
                cert(&[uri("spiffe://evil.example/report-service")], false, &ds),
                Err("svid_foreign_trust_domain"),
            ),
            (
                "garbage DER",
                CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]),
                Err("svid_malformed"),
            ),
        ];
        for (name, der, want) in cases {
            let got = svid_identity(&der, &td());
            match want {
                Ok(id) => assert_eq!(got.map(|i| i.to_string()).as_deref(), Ok(id), "{name}"),
                Err(reason) => {
                    let e = got.expect_err(name);
                    assert_eq!(e.reason(), reason, "{name}: {e}");
                }
            }
        }
    }
}
