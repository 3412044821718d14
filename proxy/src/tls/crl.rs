//! What the sidecar checks about its CRLs beyond webpki's per-handshake revocation lookup:
//!
//! - **coverage** ([`CrlSet::check_coverage`]): every root of the bundle, and the CA that signed
//!   our own certificate, must have a CRL in the file. webpki refuses a peer whose issuer has no
//!   CRL (`UnknownRevocationStatus`), so a CRL file that misses a root (after `ca root rotate`
//!   with a CRL published before it) would fail every handshake of that root's leaves; the
//!   snapshot is refused instead, naming the missing issuer, and the old one keeps serving;
//! - **authenticity**: a CRL whose issuer is a CA we hold (a bundle root, a CA of our own chain)
//!   must verify with that CA's key at load time, so a forged CRL is refused at reload rather
//!   than failing handshakes (and cannot raise the rollback floor below);
//! - **rollback** ([`CrlSet::check_rollback`]): a reload may not replace an issuer's CRL with
//!   one of a lower CRL number (an older, validly signed CRL would un-revoke certificates);
//! - **one CRL per issuer**: webpki uses the first CRL of an issuer it finds, so a second one
//!   (an old CRL prepended to the new) is refused;
//! - **freshness** ([`Freshness`]): a CRL past its next-update is stale (RFC 5280 §5.1.2.5);
//!   beyond `[identity] crl_grace` after that, `crl_stale` decides: log a warning (`warn`),
//!   also fail `/readyz` (`unready`), or also refuse the peers that CRL vouches for (`refuse`,
//!   the default). The handshake check compares against the time of the handshake, so it
//!   fires as time passes without any reload.
//!
//! Not here: the revocation lookup itself (webpki, in `verify` and `client`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::CertificateError;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::{error, warn};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::TlsError;
use crate::config::{CrlPolicy, CrlStale};

/// Longest issuer name kept for logs, `/status` and metric labels.
const MAX_ISSUER_NAME: usize = 96;

/// What is known about one CRL of the file.
#[derive(Debug, Clone)]
pub struct CrlInfo {
    issuer_der: Vec<u8>,
    /// The issuer's common name (or its whole name), at most 96 characters.
    pub issuer: String,
    /// The CRL number, when the CRL has one.
    pub number: Option<x509_parser::num_bigint::BigUint>,
    /// When it was issued.
    pub this_update: OffsetDateTime,
    /// When the next one is due; `None` when the CRL does not say.
    pub next_update: Option<OffsetDateTime>,
}

impl CrlInfo {
    /// True once `now` reached `grace` past the next-update (whole seconds, as handshakes see
    /// the time).
    pub fn stale_beyond(&self, now: OffsetDateTime, grace: Duration) -> bool {
        self.next_update.is_some_and(|next| now >= next + grace)
    }

    /// True once `now` reached the next-update.
    pub fn stale(&self, now: OffsetDateTime) -> bool {
        self.next_update.is_some_and(|next| now >= next)
    }

    /// The CRL number in decimal, or `-`.
    pub fn number_str(&self) -> String {
        self.number
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    }
}

/// The CRLs of the `[identity] crl` file, parsed (empty when none is configured).
#[derive(Debug, Clone, Default)]
pub struct CrlSet {
    path: PathBuf,
    crls: Vec<CrlInfo>,
}

fn name_of(name: &x509_parser::x509::X509Name<'_>) -> String {
    let cn = name
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    let mut s = cn.map_or_else(|| name.to_string(), str::to_owned);
    if s.len() > MAX_ISSUER_NAME {
        let mut end = MAX_ISSUER_NAME;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl CrlSet {
    /// Parses the CRLs read from `path`; those issued by one of `cas` (the bundle's roots and
    /// our own chain) must verify with its key. Refuses two CRLs from one issuer.
    ///
    /// # Errors
    /// [`TlsError::Read`] for a CRL that does not parse, [`TlsError::CrlSignature`],
    /// [`TlsError::CrlDuplicate`].
    pub fn load(
        path: &Path,
        ders: &[CertificateRevocationListDer<'_>],
        cas: &[CertificateDer<'_>],
    ) -> Result<Self, TlsError> {
        let cas: Vec<X509Certificate<'_>> = cas
            .iter()
            .filter_map(|c| X509Certificate::from_der(c.as_ref()).ok().map(|(_, c)| c))
            .collect();
        let mut crls: Vec<CrlInfo> = Vec::with_capacity(ders.len());
        for (index, der) in ders.iter().enumerate() {
            let (_, crl) =
                CertificateRevocationList::from_der(der.as_ref()).map_err(|e| TlsError::Read {
                    path: path.to_path_buf(),
                    what: "CRLs",
                    detail: format!("CRL {} does not parse: {e}", index + 1),
                })?;
            let info = CrlInfo {
                issuer_der: crl.issuer().as_raw().to_vec(),
                issuer: name_of(crl.issuer()),
                number: crl.crl_number().cloned(),
                this_update: crl.last_update().to_datetime(),
                next_update: crl.next_update().map(|t| t.to_datetime()),
            };
            if crls.iter().any(|c| c.issuer_der == info.issuer_der) {
                return Err(TlsError::CrlDuplicate {
                    path: path.to_path_buf(),
                    issuer: info.issuer,
                });
            }
            // Two CAs may share a name (two CA directories of one trust domain): any may sign.
            let mut named = cas
                .iter()
                .filter(|c| c.subject().as_raw() == info.issuer_der)
                .peekable();
            if named.peek().is_some()
                && !named.any(|ca| crl.verify_signature(ca.public_key()).is_ok())
            {
                return Err(TlsError::CrlSignature {
                    path: path.to_path_buf(),
                    issuer: info.issuer,
                });
            }
            crls.push(info);
        }
        Ok(Self {
            path: path.to_path_buf(),
            crls,
        })
    }

    /// The CRLs, in file order.
    pub fn crls(&self) -> &[CrlInfo] {
        &self.crls
    }

    /// The CRL file (empty when none is configured).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn by_issuer(&self, issuer_der: &[u8]) -> Option<&CrlInfo> {
        self.crls.iter().find(|c| c.issuer_der == issuer_der)
    }

    /// Every root of `bundle` and the issuer of `own_chain`'s leaf must have a CRL here.
    ///
    /// # Errors
    /// [`TlsError::CrlMissing`] naming the first issuer without one.
    pub fn check_coverage(
        &self,
        bundle_path: &Path,
        bundle: &[CertificateDer<'_>],
        own_chain: &[CertificateDer<'_>],
    ) -> Result<(), TlsError> {
        let missing = |name: String, of: String| TlsError::CrlMissing {
            path: self.path.clone(),
            issuer: name,
            of,
        };
        for root in bundle {
            let Ok((_, root)) = X509Certificate::from_der(root.as_ref()) else {
                continue;
            };
            if self.by_issuer(root.subject().as_raw()).is_none() {
                let of = format!("a root of the bundle {}", bundle_path.display());
                return Err(missing(name_of(root.subject()), of));
            }
        }
        if let Some(Ok((_, leaf))) = own_chain
            .first()
            .map(|l| X509Certificate::from_der(l.as_ref()))
            && self.by_issuer(leaf.issuer().as_raw()).is_none()
        {
            let of = "the CA that signed our own certificate".to_owned();
            return Err(missing(name_of(leaf.issuer()), of));
        }
        Ok(())
    }

    /// Refuses replacing `serving`'s CRL of an issuer with one of a lower CRL number (or with
    /// none, when the serving one had a number).
    ///
    /// # Errors
    /// [`TlsError::CrlRollback`].
    pub fn check_rollback(&self, serving: &CrlSet) -> Result<(), TlsError> {
        for new in &self.crls {
            let Some(old) = serving.by_issuer(&new.issuer_der) else {
                continue;
            };
            if old.number.is_some() && new.number < old.number {
                return Err(TlsError::CrlRollback {
                    path: self.path.clone(),
                    issuer: new.issuer.clone(),
                    number: new.number_str(),
                    serving: old.number_str(),
                });
            }
        }
        Ok(())
    }

    /// The first CRL stale beyond `grace` at `now`.
    pub fn first_stale_beyond(&self, now: OffsetDateTime, grace: Duration) -> Option<&CrlInfo> {
        self.crls.iter().find(|c| c.stale_beyond(now, grace))
    }
}

/// The `crl_stale` action applied at handshakes: with `refuse`, a peer whose certificate's
/// issuer has a CRL stale beyond the grace period is refused (`crl_stale` in
/// `gatehouse_tls_handshakes_total{reason}`).
#[derive(Debug, Clone)]
pub struct Freshness {
    crls: Arc<CrlSet>,
    grace: Duration,
    /// Unix seconds from which some CRL is stale beyond the grace period (`None`: never, or
    /// not refusing): before it a handshake costs one comparison.
    refuse_from: Option<u64>,
}

impl Freshness {
    /// The handshake check for `crls` under `action` and `grace`.
    pub fn new(crls: Arc<CrlSet>, action: CrlStale, grace: Duration) -> Self {
        let refuse_from = (action == CrlStale::Refuse)
            .then(|| {
                crls.crls
                    .iter()
                    .filter_map(|c| c.next_update)
                    .map(|t| u64::try_from(t.unix_timestamp()).unwrap_or(0))
                    .min()
            })
            .flatten()
            .map(|t| t.saturating_add(grace.as_secs()));
        Self {
            crls,
            grace,
            refuse_from,
        }
    }

    /// No check: no CRL, or `crl_stale` is not `refuse`.
    pub fn off() -> Self {
        Self::new(Arc::default(), CrlStale::Warn, Duration::ZERO)
    }

    /// Refuses `leaf` when the CRL of its issuer is stale beyond the grace period at `now`.
    ///
    /// # Errors
    /// `CertificateError::ExpiredRevocationList`.
    pub fn check(&self, leaf: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
        match self.refuse_from {
            Some(from) if now.as_secs() >= from => {}
            _ => return Ok(()),
        }
        let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else {
            return Ok(()); // the chain verified: webpki parsed it; nothing to add
        };
        let now = OffsetDateTime::from_unix_timestamp(i64::try_from(now.as_secs()).unwrap_or(0))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        match self.crls.by_issuer(cert.issuer().as_raw()) {
            Some(crl) if crl.stale_beyond(now, self.grace) => Err(
                rustls::Error::InvalidCertificate(CertificateError::ExpiredRevocationList),
            ),
            _ => Ok(()),
        }
    }
}

/// Logs stale CRLs once per CRL and state: a warning when one passes its next-update, an
/// error saying what `crl_stale` does once it is `crl_grace` past it.
#[derive(Debug, Default)]
pub(crate) struct StaleReport {
    /// The stale CRL last reported: issuer, number, beyond the grace period.
    last: Option<String>,
}

impl StaleReport {
    /// Checks `set` now; true when a CRL just went stale beyond the grace period with
    /// `crl_stale = "refuse"` (the caller then re-checks open connections).
    pub(crate) fn check(&mut self, set: &CrlSet, policy: CrlPolicy) -> bool {
        let now = OffsetDateTime::now_utc();
        let stale = set
            .crls
            .iter()
            .filter(|c| c.stale(now))
            .min_by_key(|c| c.next_update);
        let Some(crl) = stale else {
            self.last = None;
            return false;
        };
        let beyond = crl.stale_beyond(now, policy.grace);
        let key = format!("{}:{}:{beyond}", crl.issuer, crl.number_str());
        if self.last.as_deref() == Some(key.as_str()) {
            return false;
        }
        self.last = Some(key);
        let next_update = crl
            .next_update
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        let (path, grace) = (set.path.display(), humantime::format_duration(policy.grace));
        let number = crl.number_str();
        if !beyond {
            warn!(
                crl = %path, issuer = %crl.issuer, number = %number, next_update = %next_update,
                grace = %grace,
                "CRL is past its next-update: publish a new one (`ca crl --dir CA --out FILE`) before the grace period ends"
            );
            return false;
        }
        let action = match policy.stale {
            CrlStale::Refuse => "refusing the peers it vouches for and failing /readyz",
            CrlStale::Unready => "failing /readyz",
            CrlStale::Warn => "still accepting the peers it vouches for (crl_stale = \"warn\")",
        };
        error!(
            crl = %path, issuer = %crl.issuer, number = %number, next_update = %next_update,
            grace = %grace, crl_stale = policy.stale.as_str(),
            "CRL is stale beyond the grace period: {action}; publish a new one (`ca crl --dir CA --out FILE`)"
        );
        policy.stale == CrlStale::Refuse
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gatehouse_ca::{Authority, InitOptions, KeyType, TrustDomain};
    use rustls_pki_types::pem::PemObject;

    use super::*;

    fn ca(dir: &Path) -> Authority {
        let opts = InitOptions {
            trust_domain: TrustDomain::parse("crl.test").expect("td"),
            key_type: KeyType::EcdsaP256,
            ttl: Duration::from_secs(24 * 3600),
            intermediate: true,
        };
        Authority::init(dir, &opts).expect("init")
    }

    fn crls(pem: &str) -> Vec<CertificateRevocationListDer<'static>> {
        CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("pem")
    }

    fn bundle(ca: &Authority) -> Vec<CertificateDer<'static>> {
        let pem = ca.bundle_pem().expect("bundle");
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("pem")
    }

    fn load(pem: &str, cas: &[CertificateDer<'_>]) -> Result<CrlSet, TlsError> {
        CrlSet::load(Path::new("crl.pem"), &crls(pem), cas)
    }

    #[test]
    fn a_second_crl_of_one_issuer_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = ca(&tmp.path().join("a"));
        let old = a.crl_pem(Duration::from_secs(3600)).expect("crl");
        let new = a.crl_pem(Duration::from_secs(3600)).expect("crl");
        let err = load(&format!("{old}{new}"), &bundle(&a)).expect_err("two per issuer");
        assert!(matches!(err, TlsError::CrlDuplicate { .. }), "{err}");
    }

    #[test]
    fn a_crl_not_signed_by_the_bundle_root_of_its_name_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (a, b) = (ca(&tmp.path().join("a")), ca(&tmp.path().join("b")));
        // Same trust domain, so the same issuer names; B's keys.
        let forged = b.crl_pem(Duration::from_secs(3600)).expect("crl");
        let err = load(&forged, &bundle(&a)).expect_err("forged");
        assert!(matches!(err, TlsError::CrlSignature { .. }), "{err}");
        let own = a.crl_pem(Duration::from_secs(3600)).expect("crl");
        load(&own, &bundle(&a)).expect("signed by A's root");
    }

    #[test]
    fn coverage_names_the_root_without_a_crl() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = ca(&tmp.path().join("a"));
        let before = a.crl_pem(Duration::from_secs(3600)).expect("crl");
        a.rotate_root().expect("rotate");
        let roots = bundle(&a);
        let set = load(&before, &roots).expect("loads");
        let err = set
            .check_coverage(Path::new("bundle.pem"), &roots, &[])
            .expect_err("g2 has no CRL");
        let msg = err.to_string();
        assert!(
            msg.contains("no CRL from `Gatehouse root CA crl.test g2`"),
            "{msg}"
        );
        let after = a.crl_pem(Duration::from_secs(3600)).expect("crl");
        let set = load(&after, &roots).expect("loads");
        set.check_coverage(Path::new("bundle.pem"), &roots, &[])
            .expect("both roots covered");
    }

    #[test]
    fn a_lower_crl_number_is_a_rollback() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = ca(&tmp.path().join("a"));
        let roots = bundle(&a);
        let one = load(&a.crl_pem(Duration::from_secs(3600)).expect("crl"), &roots).expect("1");
        let two = load(&a.crl_pem(Duration::from_secs(3600)).expect("crl"), &roots).expect("2");
        two.check_rollback(&one).expect("newer");
        two.check_rollback(&two).expect("the same");
        let err = one.check_rollback(&two).expect_err("older");
        assert!(
            err.to_string()
                .contains("number 1, lower than the serving CRL's 2"),
            "{err}"
        );
        // Another issuer's CRLs are not compared.
        one.check_rollback(&CrlSet::default())
            .expect("nothing serving");
    }
}
