//! What a certificate file says ([`inspect_pem`]) and whether it chains to a bundle with webpki
//! ([`verify_chain`]).

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::CaError;
use crate::inventory::fmt_time;

/// The facts `ca inspect` prints about the first certificate of a PEM file.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file inspected.
    pub file: String,
    /// The SPIFFE ID when the leaf has exactly one URI SAN.
    pub spiffe_id: Option<String>,
    /// All URI SANs (an SVID has exactly one).
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// Seconds until not-after (negative when expired).
    pub seconds_left: i64,
    /// Past its not-after.
    pub expired: bool,
    /// `ecdsa-p256`, `ecdsa-p384`, `ed25519`, `rsa-2048`, ...
    pub key_type: String,
    /// Basic constraints `CA:TRUE`.
    pub is_ca: bool,
    /// Certificates in the file (leaf + chain).
    pub chain_len: usize,
    /// SHA-256 of the leaf DER, lowercase hex.
    pub sha256: String,
    /// With a bundle: whether the chain verifies with webpki (serverAuth and clientAuth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// With a bundle: why it does not verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_error: Option<String>,
}

/// Reads every certificate of a PEM file, in order.
///
/// # Errors
/// [`CaError::BadCertificate`] when there is none or the PEM is broken.
pub fn read_chain(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bad = |detail: String| CaError::BadCertificate {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("broken PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no `CERTIFICATE` PEM block".into()));
    }
    Ok(certs)
}

pub(crate) fn parse_x509<'a>(der: &'a [u8], path: &Path) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::BadCertificate {
            path: path.to_path_buf(),
            detail: format!("not an X.509 certificate: {e}"),
        })
}

/// The not-after of the first certificate in a PEM file.
pub(crate) fn not_after_of_pem(pem: &str, path: &Path) -> Result<OffsetDateTime, CaError> {
    let chain = read_chain(pem, path)?;
    Ok(parse_x509(&chain[0], path)?
        .validity()
        .not_after
        .to_datetime())
}

/// Inspects the first certificate of `pem` (read from `path`); with a bundle, also verifies the
/// chain (the file's other certificates as intermediates) with webpki at `now`.
///
/// # Errors
/// [`CaError::BadCertificate`] for unreadable input. A chain that does not verify is reported in
/// the result, not as an error.
pub fn inspect_pem(
    pem: &str,
    path: &Path,
    bundle: Option<(&str, &Path)>,
    now: OffsetDateTime,
) -> Result<Inspection, CaError> {
    let chain = read_chain(pem, path)?;
    let cert = parse_x509(&chain[0], path)?;
    let (mut uri_sans, mut dns) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after.to_datetime();
    let (verified, verify_error) = match bundle {
        None => (None, None),
        Some((bundle_pem, bundle_path)) => {
            match verify_chain(pem, path, bundle_pem, bundle_path, now) {
                Ok(()) => (Some(true), None),
                Err(CaError::BadCertificate { detail, .. }) => (Some(false), Some(detail)),
                Err(e) => return Err(e),
            }
        }
    };
    Ok(Inspection {
        file: path.display().to_string(),
        spiffe_id: (uri_sans.len() == 1).then(|| uri_sans[0].clone()),
        uri_sans,
        dns,
        serial: hex::encode(cert.raw_serial()),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: fmt_time(cert.validity().not_before.to_datetime()),
        not_after: fmt_time(not_after),
        seconds_left: (not_after - now).whole_seconds(),
        expired: not_after <= now,
        key_type: key_type_name(&cert),
        is_ca: cert.is_ca(),
        chain_len: chain.len(),
        sha256: hex::encode(Sha256::digest(&chain[0])),
        verified,
        verify_error,
    })
}

fn key_type_name(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let param = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (alg.as_str(), param.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "ecdsa-p256".into(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "ecdsa-p384".into(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => "ecdsa-p521".into(),
        ("1.3.101.112", _) => "ed25519".into(),
        ("1.2.840.113549.1.1.1", _) => match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => format!("rsa-{}", rsa.key_size()),
            _ => "rsa".into(),
        },
        (other, _) => format!("unknown ({other})"),
    }
}

/// Verifies the leaf of `pem` against the roots in `bundle_pem` with webpki, for both serverAuth
/// and clientAuth, using the file's other certificates as intermediates.
///
/// # Errors
/// [`CaError::BadCertificate`] naming `path` with webpki's reason when the chain does not verify.
pub fn verify_chain(
    pem: &str,
    path: &Path,
    bundle_pem: &str,
    bundle_path: &Path,
    now: OffsetDateTime,
) -> Result<(), CaError> {
    let chain = read_chain(pem, path)?;
    let roots = read_chain(bundle_pem, bundle_path)?;
    let anchors = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadCertificate {
            path: bundle_path.to_path_buf(),
            detail: format!("not a trust anchor: {e}"),
        })?;
    let bad = |detail: String| CaError::BadCertificate {
        path: path.to_path_buf(),
        detail,
    };
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| bad(format!("webpki cannot parse the leaf: {e}")))?;
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    for (usage, name) in [
        (webpki::KeyUsage::server_auth(), "serverAuth"),
        (webpki::KeyUsage::client_auth(), "clientAuth"),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            time,
            usage,
            None,
            None,
        )
        .map_err(|e| bad(format!("chain does not verify for {name}: {e}")))?;
    }
    Ok(())
}
