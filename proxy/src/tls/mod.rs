//! TLS for both directions: the crypto provider, PEM parsing (of files read by
//! [`crate::input::read`]) of the sidecar's own credentials
//! (cert chain, key, trust bundle, CRLs), and the submodules:
//! - [`svid`]: the X.509-SVID rules (one URI SAN of our trust domain, not a CA);
//! - [`verify`]: the SPIFFE-aware client verifier and the only constructor of [`PeerIdentity`];
//! - [`resolver`]: the swappable certificate resolver (server and client side);
//! - [`server`]: the inbound `ServerConfig`.

pub(crate) mod alert_tap;
pub(crate) use gatehouse_ca::chain_bounds as bounds;
pub(crate) mod client;
pub(crate) mod crl;
pub(crate) mod resolver;
pub(crate) mod server;
pub(crate) mod svid;
pub(crate) mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gatehouse_policy::SpiffeId;

use crate::config::CrlPolicy;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::input::{FileError, FileKind, Input};

pub(crate) use svid::SvidError;
pub use svid::{leaf_identity, svid_identity};
pub(crate) use verify::PeerIdentity;

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
    /// A file could not be read: missing, not a regular file, or too large.
    #[error(transparent)]
    File(#[from] FileError),
    /// A file holds no valid PEM.
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
    /// The CRL file has no CRL from a CA the bundle trusts or that signed our certificate:
    /// every handshake of that CA's leaves would fail with an unknown revocation status.
    #[error("{}: no CRL from `{issuer}`, {of}", path.display())]
    CrlMissing {
        /// The CRL file.
        path: PathBuf,
        /// The CA without a CRL.
        issuer: String,
        /// Which CA that is (a bundle root, our own issuer).
        of: String,
    },
    /// A reloaded CRL is older (lower CRL number) than the one serving.
    #[error("{}: the CRL from `{issuer}` has number {number}, lower than the serving CRL's {serving}: refusing a rollback", path.display())]
    CrlRollback {
        /// The CRL file.
        path: PathBuf,
        /// The issuer.
        issuer: String,
        /// The new CRL's number.
        number: String,
        /// The serving CRL's number.
        serving: String,
    },
    /// Two CRLs from one issuer (webpki would use only the first).
    #[error("{}: two CRLs from `{issuer}`", path.display())]
    CrlDuplicate {
        /// The CRL file.
        path: PathBuf,
        /// The issuer.
        issuer: String,
    },
    /// A CRL whose issuer we hold does not verify with that issuer's key.
    #[error("{}: the CRL from `{issuer}` is not signed by that CA's key", path.display())]
    CrlSignature {
        /// The CRL file.
        path: PathBuf,
        /// The issuer it claims.
        issuer: String,
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
    pub fn help(&self) -> String {
        let help = match self {
            Self::File(e) => return e.help(),
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
            Self::CrlMissing { .. } => {
                "publish CRLs for every root of the bundle: `ca crl --dir CA --out FILE` (`ca root rotate` rewrites the files `ca crl` wrote)"
            }
            Self::CrlRollback { .. } => {
                "publish a new CRL (`ca crl --dir CA --out FILE`); an older CRL would un-revoke certificates"
            }
            Self::CrlDuplicate { .. } => {
                "keep one CRL per issuer: write the file with `ca crl --dir CA --out FILE`"
            }
            Self::CrlSignature { .. } => {
                "the CRL was altered or comes from another CA: publish it again with `ca crl --dir CA --out FILE`"
            }
            Self::Config { .. } => "check min_tls and the key type",
        };
        help.to_owned()
    }
}

fn read_err(path: &Path, what: &'static str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        what,
        detail: e.to_string(),
    }
}

/// Parses a PEM certificate chain (leaf first).
///
/// # Errors
/// [`TlsError::File`], [`TlsError::Read`] or [`TlsError::Empty`].
pub fn load_chain(file: &Input) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let (path, pem) = (file.path.as_path(), file.bytes()?);
    let what = "certificates";
    let chain = CertificateDer::pem_slice_iter(pem)
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

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1).
///
/// # Errors
/// [`TlsError::File`] or [`TlsError::Read`].
pub fn load_key(file: &Input) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(file.bytes()?)
        .map_err(|e| read_err(&file.path, "a private key", e))
}

/// Parses the trust bundle into a root store, and returns the anchors' DER too (for expiry
/// metrics and `/status`).
///
/// # Errors
/// [`TlsError::File`], [`TlsError::Read`] or [`TlsError::Empty`] when no certificate is
/// usable as an anchor.
pub fn load_bundle(
    file: &Input,
) -> Result<(Arc<RootCertStore>, Vec<CertificateDer<'static>>), TlsError> {
    let path = file.path.as_path();
    let certs = load_chain(file)?;
    let mut roots = RootCertStore::empty();
    for c in &certs {
        roots
            .add(c.clone())
            .map_err(|e| read_err(path, "trust anchors", e))?;
    }
    Ok((Arc::new(roots), certs))
}

/// Parses one or more PEM CRLs.
///
/// # Errors
/// [`TlsError::File`], [`TlsError::Read`] or [`TlsError::Empty`].
pub fn load_crls(file: &Input) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let (path, pem) = (file.path.as_path(), file.bytes()?);
    let what = "CRLs";
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
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
    /// What the CRLs say (issuers, numbers, next-update), for the checks webpki does not make.
    pub crl_set: Arc<crl::CrlSet>,
    /// The `crl_stale = "refuse"` check the verifiers apply after webpki's.
    pub freshness: crl::Freshness,
    /// Our own SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf expiry.
    pub not_after: OffsetDateTime,
    /// Leaf serial, lowercase hex.
    pub serial_hex: String,
}

/// The four credential files: their paths ([`CredentialPaths`]) or their content as read
/// ([`CredentialFiles`]).
#[derive(Debug)]
pub struct CredentialSet<'a, T: ?Sized> {
    /// Certificate chain.
    pub cert: &'a T,
    /// Private key.
    pub key: &'a T,
    /// Trust bundle.
    pub bundle: &'a T,
    /// Optional CRL file.
    pub crl: Option<&'a T>,
    /// `[identity] crl_stale` and `crl_grace`.
    pub crl_policy: CrlPolicy,
}

impl<T: ?Sized> Clone for CredentialSet<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ?Sized> Copy for CredentialSet<'_, T> {}

/// Paths of the credential files.
pub(crate) type CredentialPaths<'a> = CredentialSet<'a, Path>;

/// The credential files as read (with [`crate::input::read`]).
pub type CredentialFiles<'a> = CredentialSet<'a, Input>;

impl Credentials {
    /// Reads (with [`crate::input::read`]), loads and checks the credentials.
    ///
    /// # Errors
    /// Every problem found.
    pub fn load(p: CredentialPaths<'_>, provider: &CryptoProvider) -> Result<Self, Vec<TlsError>> {
        let crl = p.crl.map(|path| Input::read(path, FileKind::Crl));
        let files = CredentialFiles {
            cert: &Input::read(p.cert, FileKind::Cert),
            key: &Input::read(p.key, FileKind::Key),
            bundle: &Input::read(p.bundle, FileKind::Bundle),
            crl: crl.as_ref(),
            crl_policy: p.crl_policy,
        };
        Self::parse(files, provider)
    }

    /// Loads and checks credentials from files already read.
    ///
    /// # Errors
    /// Every problem found.
    pub fn parse(p: CredentialFiles<'_>, provider: &CryptoProvider) -> Result<Self, Vec<TlsError>> {
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
                        path: p.cert.path.clone(),
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
        let crl_set = match p.crl {
            Some(file) => crl_set(&file.path, &crls, &bundle, &chain, &p.bundle.path)
                .map_err(|e| errors.push(e))
                .ok(),
            None => Some(crl::CrlSet::default()),
        };
        let crl_set = Arc::new(crl_set.unwrap_or_default());
        let freshness =
            crl::Freshness::new(crl_set.clone(), p.crl_policy.stale, p.crl_policy.grace);
        let (not_after, serial_hex) = leaf_facts(&chain[0]);
        if not_after <= OffsetDateTime::now_utc() {
            errors.push(TlsError::Expired {
                path: p.cert.path.clone(),
                not_after: not_after.format(&Rfc3339).unwrap_or_default(),
            });
        } else if let Err(e) = verify_own(&chain, &roots, provider) {
            errors.push(TlsError::Untrusted {
                cert: p.cert.path.clone(),
                bundle: p.bundle.path.clone(),
                detail: e.to_string(),
            });
        }
        let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            errors.push(TlsError::KeyMismatch {
                cert: p.cert.path.clone(),
                key: p.key.path.clone(),
                detail: e.to_string(),
            })
        });
        match certified {
            Ok(ck) if errors.is_empty() => Ok(Self {
                certified: Arc::new(ck),
                roots,
                bundle,
                crls,
                crl_set,
                freshness,
                id,
                not_after,
                serial_hex,
            }),
            _ => Err(errors),
        }
    }
}

/// Parses the CRLs of `path` (verifying those of the CAs we hold: the bundle's roots and our
/// chain) and checks that they cover every bundle root and our own issuer.
fn crl_set(
    path: &Path,
    crls: &[CertificateRevocationListDer<'static>],
    bundle: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    bundle_path: &Path,
) -> Result<crl::CrlSet, TlsError> {
    let cas: Vec<CertificateDer<'static>> =
        bundle.iter().chain(chain.iter().skip(1)).cloned().collect();
    let set = crl::CrlSet::load(path, crls, &cas)?;
    set.check_coverage(bundle_path, bundle, chain)?;
    Ok(set)
}

/// The serial number of the certificate `der`, lowercase hex as encoded (what `openssl x509
/// -serial` prints, in lowercase); empty when the certificate cannot be parsed.
pub fn serial_hex(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der.as_ref())
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
