//! Certificate profiles: the X.509-SVID leaf and the CA certificates.
//!
//! Leaf (X509-SVID §4 and RFC 5280): exactly one URI SAN (the SPIFFE ID) plus optional DNS SANs,
//! `CA:FALSE`, key usage `digitalSignature` (critical), EKU serverAuth + clientAuth (webpki only
//! enforces an EKU when present, so both are listed), a random positive serial of 20 octets, an
//! authority key identifier, and a not-before backdated by [`BACKDATE`] for clock skew.
//!
//! CA (X509-SVID §5): `CA:TRUE` (critical) with a path length constraint, key usage
//! `keyCertSign, cRLSign` (critical). No name constraints: webpki rejects URI name constraints,
//! so the trust domain is enforced by the sidecar's verifier.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{CaError, SpiffeId, store};

/// How far the not-before of every certificate is moved into the past, for clock skew.
pub const BACKDATE: Duration = Duration::minutes(5);

/// Length of generated serial numbers (RFC 5280 §4.1.2.2 allows at most 20 octets).
pub const SERIAL_LEN: usize = 20;

/// A fresh random serial: 20 bytes, first byte in `0x01..=0x7f` so the DER INTEGER is positive,
/// minimally encoded and exactly 20 octets.
///
/// # Errors
/// [`CaError::Io`] when the OS random source cannot be read.
pub fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = store::random_bytes(SERIAL_LEN)?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// Validates DNS SAN names (RFC 1123 syntax, as webpki reads them).
///
/// # Errors
/// [`CaError::InvalidDnsName`] for the first bad name.
pub fn check_dns_names(dns: &[String]) -> Result<(), CaError> {
    for name in dns {
        if rustls_pki_types::DnsName::try_from(name.as_str()).is_err()
            || name.parse::<std::net::IpAddr>().is_ok()
        {
            return Err(CaError::InvalidDnsName { name: name.clone() });
        }
    }
    Ok(())
}

/// Parameters of an X.509-SVID for `id` valid from `now - BACKDATE` to `not_after`.
///
/// # Errors
/// [`CaError::Generate`] when a SAN cannot be encoded; [`CaError::Io`] from the serial.
pub fn svid_params(
    id: &SpiffeId,
    dns: &[String],
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Gatehouse");
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    for name in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    Ok(params)
}

/// Path prefix of enrollment certificates: the one for `spiffe://<td>/<path>` carries the URI SAN
/// `spiffe://<td>/gatehouse/enroll/<path>`, so even a verifier that ignored the EKU would not
/// see the workload's identity.
pub const ENROLL_PREFIX: &str = "/gatehouse/enroll";

/// The enroll-only extended key usage, OID value bytes (DER without tag and length) of the UUID
/// OID `2.25.147856376378846556861936914330026716225` (X.667; no registration needed). An
/// enrollment certificate lists only this EKU, so webpki refuses it for serverAuth and
/// clientAuth (`KeyUsage::client_auth()` requires clientAuth when an EKU is present): the
/// sidecars refuse it for traffic; only `ca serve` accepts it, for `POST /v1/enroll`.
pub const ENROLL_EKU_OID: &[u8] = &[
    0x69, 0x81, 0xde, 0xbc, 0x8d, 0x8b, 0xd3, 0xb4, 0xea, 0xba, 0x95, 0xa1, 0xe2, 0xcf, 0xaf, 0xe9,
    0xf8, 0xac, 0xd8, 0x41,
];

/// Turns SVID parameters into enrollment-certificate parameters: only [`ENROLL_EKU_OID`] as
/// extended key usage.
pub fn make_enroll_only(params: &mut CertificateParams) {
    params.extended_key_usages = Vec::new();
    let mut eku = vec![
        0x30,
        2 + ENROLL_EKU_OID.len() as u8,
        0x06,
        ENROLL_EKU_OID.len() as u8,
    ];
    eku.extend_from_slice(ENROLL_EKU_OID);
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 37],
            eku,
        ));
}

/// The SPIFFE ID an enrollment certificate's URI SAN stands for: `spiffe://<td>/<path>` for
/// `spiffe://<td>/gatehouse/enroll/<path>`, `None` for any other ID.
pub fn enrollment_target(uri: &SpiffeId) -> Option<SpiffeId> {
    let rest = uri.path().strip_prefix(ENROLL_PREFIX)?;
    if !rest.starts_with('/') || rest.len() < 2 {
        return None;
    }
    SpiffeId::parse(&format!("spiffe://{}{rest}", uri.trust_domain_str())).ok()
}

/// Parameters of a CA certificate named `common_name`, constrained to `path_len` CAs below it.
///
/// # Errors
/// [`CaError::Io`] from the serial.
pub fn ca_params(
    common_name: &str,
    path_len: u8,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Gatehouse");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_20_positive_minimal_octets_and_differ() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let s = random_serial().expect("serial").to_bytes();
            assert_eq!(s.len(), SERIAL_LEN);
            assert!(
                s[0] != 0 && s[0] & 0x80 == 0,
                "positive, no leading zero: {:02x}",
                s[0]
            );
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn dns_names_table() {
        for ok in ["api", "api.fintech.internal", "a-b.c", "x1.y2"] {
            assert!(check_dns_names(&[ok.to_owned()]).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "bad name",
            "api:443",
            "https://api",
            "10.0.0.1",
            "a..b",
            "-a.b",
            "a/b",
        ] {
            assert!(
                matches!(
                    check_dns_names(&[bad.to_owned()]),
                    Err(CaError::InvalidDnsName { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }
}
