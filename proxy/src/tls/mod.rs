//! TLS for both directions: the crypto provider, PEM loading of the sidecar's own credentials
//! (cert chain, key, trust bundle, CRLs), and the submodules:
//! - [`svid`]: the X.509-SVID rules (one URI SAN of our trust domain, not a CA);
//! - [`verify`]: the SPIFFE-aware client verifier and the only constructor of [`PeerIdentity`];
//! - [`resolver`]: the swappable certificate resolver (server and client side);
//! - [`server`]: the inbound `ServerConfig`.

pub mod bounds;
pub mod client;
pub mod resolver;
pub mod server;
pub mod svid;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gatehouse_policy::SpiffeId;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use svid::{SvidError, leaf_identity, svid_identity};
pub use verify::PeerIdentity;

/// The one crypto provider used everywhere: aws-lc-rs with its default suites, AES-128-GCM
/// preferred. Both AES-GCM suites are 128-bit-secure AEADs; AES-128 with SHA-256 costs about
/// 10 % less per full handshake than AES-256 with SHA-384 (transcript hash and HKDF, measured
/// with callgrind) and a little less per record. Our client offers it first and the server
/// prefers it (`ignore_client_order`), so callers that list AES-256 first get it too.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// A problem with the sidecar's own TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no valid PEM.
    #[error("{}: cannot read {what}: {detail}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
        /// The reason.
        detail: String,
    },
    /// The PEM file holds no item of the expected kind.
    #[error("{}: no {what} found", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// The private key does not belong to the certificate.
    #[error("{}: the private key does not match the certificate {}: {detail}", key.display(), cert.display())]
    KeyMismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Detail from rustls.
        detail: String,
    },
    /// The own certificate is not a valid X.509-SVID.
    #[error("{}: not an X.509-SVID: {source}", path.display())]
    NotSvid {
        /// Certificate file.
        path: PathBuf,
        /// The broken rule.
        source: SvidError,
    },
    /// The own certificate has expired.
    #[error("{}: the certificate expired at {not_after}", path.display())]
    Expired {
        /// Certificate file.
        path: PathBuf,
        /// RFC 3339 expiry time.
        not_after: String,
    },
    /// The own certificate does not chain to the bundle.
    #[error("{}: the certificate does not verify against the bundle {}: {detail}", cert.display(), bundle.display())]
    Untrusted {
        /// Certificate file.
        cert: PathBuf,
        /// Bundle file.
        bundle: PathBuf,
        /// webpki's reason.
        detail: String,
    },
    /// The verifier could not be built (for instance, an unusable CRL).
    #[error("cannot build the certificate verifier: {detail}")]
    Verifier {
        /// The reason.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration: {detail}")]
    Config {
        /// The reason.
        detail: String,
    },
}

impl TlsError {
    /// The `help:` line.
    pub fn help(&self) -> &'static str {
        match self {
            Self::Read { .. } | Self::Empty { .. } => {
                "check the path under [identity]; issue certificates with `ca issue --dir CA --spiffe-id ID --out DIR`"
            }
            Self::KeyMismatch { .. } => {
                "cert.pem and key.pem must come from the same `ca issue` run; re-issue both"
            }
            Self::NotSvid { .. } => {
                "use a certificate issued by `ca issue` (exactly one spiffe:// URI SAN, CA:FALSE)"
            }
            Self::Expired { .. } => "re-issue it: `ca rotate --dir CA --force OUTDIR`",
            Self::Untrusted { .. } => {
                "the bundle must hold the root that signed this certificate; copy the CA's bundle.pem"
            }
            Self::Verifier { .. } => {
                "check the CRL file (`ca crl --dir CA --out FILE`) and the bundle"
            }
            Self::Config { .. } => "check min_tls and the key type",
        }
    }
}

fn read_err(path: &Path, what: &'static str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        what,
        detail: e.to_string(),
    }
}

/// Reads a PEM certificate chain (leaf first).
///
/// # Errors
/// [`TlsError::Read`] or [`TlsError::Empty`].
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let what = "certificates";
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(path, what, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(path, what, e))?;
    if chain.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(chain)
}

/// Reads a PEM private key (PKCS#8, SEC1 or PKCS#1).
///
/// # Errors
/// [`TlsError::Read`].
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_err(path, "a private key", e))
}

/// Reads the trust bundle into a root store, and returns the anchors' DER too (for expiry
/// metrics and `/status`).
///
/// # Errors
/// [`TlsError::Read`] or [`TlsError::Empty`] when no certificate is usable as an anchor.
pub fn load_bundle(
    path: &Path,
) -> Result<(Arc<RootCertStore>, Vec<CertificateDer<'static>>), TlsError> {
    let certs = load_chain(path)?;
    let mut roots = RootCertStore::empty();
    for c in &certs {
        roots
            .add(c.clone())
            .map_err(|e| read_err(path, "trust anchors", e))?;
    }
    Ok((Arc::new(roots), certs))
}

/// Reads one or more PEM CRLs.
///
/// # Errors
/// [`TlsError::Read`] or [`TlsError::Empty`].
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let what = "CRLs";
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| read_err(path, what, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(path, what, e))?;
    if crls.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "CRL",
        });
    }
    Ok(crls)
}

/// The sidecar's own credentials, loaded and checked: the key matches the leaf, the leaf is an
/// X.509-SVID, it chains to the bundle and has not expired.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Leaf + intermediates and the signing key, for both TLS roles.
    pub certified: Arc<CertifiedKey>,
    /// Trust anchors.
    pub roots: Arc<RootCertStore>,
    /// The bundle's certificates as read.
    pub bundle: Vec<CertificateDer<'static>>,
    /// CRLs (empty when none is configured).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Our own SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf expiry.
    pub not_after: OffsetDateTime,
    /// Leaf serial, lowercase hex.
    pub serial_hex: String,
}

/// Paths of the credential files.
#[derive(Debug, Clone, Copy)]
pub struct CredentialPaths<'a> {
    /// Certificate chain.
    pub cert: &'a Path,
    /// Private key.
    pub key: &'a Path,
    /// Trust bundle.
    pub bundle: &'a Path,
    /// Optional CRL file.
    pub crl: Option<&'a Path>,
}

impl Credentials {
    /// Loads and checks the credentials.
    ///
    /// # Errors
    /// Every problem found.
    pub fn load(p: CredentialPaths<'_>, provider: &CryptoProvider) -> Result<Self, Vec<TlsError>> {
        let mut errors = Vec::new();
        let chain = load_chain(p.cert).map_err(|e| errors.push(e)).ok();
        let key = load_key(p.key).map_err(|e| errors.push(e)).ok();
        let bundle = load_bundle(p.bundle).map_err(|e| errors.push(e)).ok();
        let crls = match p.crl {
            Some(path) => load_crls(path).map_err(|e| errors.push(e)).ok(),
            None => Some(Vec::new()),
        };
        let identity = chain.as_ref().and_then(|c| {
            leaf_identity(&c[0])
                .map_err(|source| {
                    errors.push(TlsError::NotSvid {
                        path: p.cert.to_path_buf(),
                        source,
                    })
                })
                .ok()
        });
        let (Some(chain), Some(key), Some((roots, bundle)), Some(crls), Some(id)) =
            (chain, key, bundle, crls, identity)
        else {
            return Err(errors);
        };
        let (not_after, serial_hex) = leaf_facts(&chain[0]);
        if not_after <= OffsetDateTime::now_utc() {
            errors.push(TlsError::Expired {
                path: p.cert.to_path_buf(),
                not_after: not_after.format(&Rfc3339).unwrap_or_default(),
            });
        } else if let Err(e) = verify_own(&chain, &roots, provider) {
            errors.push(TlsError::Untrusted {
                cert: p.cert.to_path_buf(),
                bundle: p.bundle.to_path_buf(),
                detail: e.to_string(),
            });
        }
        let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            errors.push(TlsError::KeyMismatch {
                cert: p.cert.to_path_buf(),
                key: p.key.to_path_buf(),
                detail: e.to_string(),
            })
        });
        match certified {
            Ok(ck) if errors.is_empty() => Ok(Self {
                certified: Arc::new(ck),
                roots,
                bundle,
                crls,
                id,
                not_after,
                serial_hex,
            }),
            _ => Err(errors),
        }
    }
}

/// The serial of the first certificate of `certs` (a peer's leaf), lowercase hex; empty when
/// there is none or it does not parse.
pub fn leaf_serial_hex(certs: Option<&[CertificateDer<'_>]>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    certs
        .and_then(<[_]>::first)
        .and_then(|c| X509Certificate::from_der(c.as_ref()).ok())
        .map(|(_, c)| hex::encode(c.raw_serial()))
        .unwrap_or_default()
}

/// Expiry and serial of a leaf that already parsed in [`leaf_identity`].
fn leaf_facts(leaf: &CertificateDer<'_>) -> (OffsetDateTime, String) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match X509Certificate::from_der(leaf.as_ref()) {
        Ok((_, c)) => (
            c.validity().not_after.to_datetime(),
            hex::encode(c.raw_serial()),
        ),
        // leaf_identity parsed the same bytes; treat the impossible case as expired.
        Err(_) => (OffsetDateTime::UNIX_EPOCH, String::new()),
    }
}

/// Our own leaf must chain to our bundle, or peers will refuse us.
fn verify_own(
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
    provider: &CryptoProvider,
) -> Result<(), webpki::Error> {
    let ee = webpki::EndEntityCert::try_from(&chain[0])?;
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}
