//! Issuing X.509-SVIDs: [`Authority::issue`] (key generated here), and
//! [`Authority::sign_custom`] (arbitrary parameters, for test fixtures and tooling).
//!
//! Every signature goes through one path, `Authority::sign_leaf`: under the directory lock it
//! loads the current signer, refuses a lifetime beyond the signing CA, picks a serial not yet in
//! the ledger, signs, and appends the `issued` line before returning.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::inventory::{Issued, Record, Source, fmt_time};
use crate::{Authority, CaError, SpiffeId, profile, store};

/// What to issue: one identity, optional DNS SANs, a lifetime.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The SPIFFE ID (must be in the CA's trust domain).
    pub spiffe_id: SpiffeId,
    /// Extra DNS SANs (RFC 1123 names).
    pub dns: Vec<String>,
    /// Lifetime from now; must not outlive the signing CA.
    pub ttl: Duration,
}

/// An issued X.509-SVID with its private key.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Svid {
    /// The identity in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf followed by the intermediate (if any), PEM. The root is in `bundle_pem`.
    pub cert_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The trust bundle (every active root) at issue time, PEM.
    pub bundle_pem: String,
    /// Serial number, lowercase hex without separators.
    pub serial_hex: String,
    /// Start of validity (backdated by [`profile::BACKDATE`]).
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the leaf DER, lowercase hex.
    pub sha256_hex: String,
}

impl Svid {
    /// Writes `cert.pem`, `key.pem` (0600) and `bundle.pem` into `out_dir` (created if missing),
    /// atomically as one versioned set (see [`store`]: a reader never sees a new certificate
    /// with an old key).
    ///
    /// # Errors
    /// [`CaError::Io`] naming the file; the previous contents stay in place on error.
    pub fn write_to(&self, out_dir: &Path) -> Result<(), CaError> {
        store::write_cert_dir(out_dir, &self.cert_pem, &self.key_pem, &self.bundle_pem)
    }
}

/// How a certificate came to be signed (the inventory line's provenance fields).
pub(crate) struct Provenance<'a> {
    pub source: Source,
    pub replaces: Option<&'a str>,
    pub credential: Option<&'a str>,
    pub peer: Option<&'a str>,
}

/// A freshly signed certificate (internal result of [`Authority::sign_leaf`]).
pub(crate) struct Signed {
    pub chain_pem: String,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub sha256_hex: String,
}

impl Authority {
    /// Issues an X.509-SVID with a new key of the CA's key type and records it in the inventory.
    ///
    /// # Errors
    /// [`CaError::ForeignTrustDomain`], [`CaError::InvalidDnsName`], [`CaError::ZeroTtl`],
    /// [`CaError::TtlBeyondCa`] (never silently shortened), generation and I/O errors.
    pub fn issue(&self, req: &IssueRequest) -> Result<Svid, CaError> {
        let key = self.key_type().generate()?;
        self.issue_for_key(req, &key, Source::Issue, None)
    }

    /// Issues an enrollment certificate for `bound` (see [`profile::ENROLL_EKU_OID`]): URI SAN
    /// `spiffe://<td>/gatehouse/enroll/<path>`, only the enroll-only EKU, a new key. Presented
    /// to `ca serve` as the TLS client certificate it enrolls as `bound`; the sidecars refuse it.
    ///
    /// # Errors
    /// As [`Authority::issue`]; [`CaError::ReservedPath`] when `bound` is itself under
    /// `/gatehouse/`.
    pub fn issue_enrollment(&self, bound: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        if bound.path().starts_with("/gatehouse/") {
            return Err(CaError::ReservedPath { id: bound.clone() });
        }
        let enroll_id = SpiffeId::parse(&format!(
            "spiffe://{}{}{}",
            bound.trust_domain_str(),
            profile::ENROLL_PREFIX,
            bound.path()
        ))
        .map_err(|source| CaError::InvalidId {
            input: bound.as_str().to_owned(),
            source,
        })?;
        let key = self.key_type().generate()?;
        let mut params = self.svid_params(&enroll_id, &[], ttl)?;
        profile::make_enroll_only(&mut params);
        let signed = self.sign_leaf(params, &key, Source::Enrollment, true, None)?;
        self.svid(enroll_id, &key, signed)
    }

    /// An [`Svid`] from a signature and its key, with the current bundle.
    fn svid(&self, spiffe_id: SpiffeId, key: &KeyPair, signed: Signed) -> Result<Svid, CaError> {
        Ok(Svid {
            spiffe_id,
            cert_pem: signed.chain_pem,
            key_pem: key.serialize_pem(),
            bundle_pem: self.bundle_pem()?,
            serial_hex: signed.serial_hex,
            not_before: signed.not_before,
            not_after: signed.not_after,
            sha256_hex: signed.sha256_hex,
        })
    }

    /// [`Authority::issue`] with a given key (rotation with `--keep-key`), recording `source`.
    pub(crate) fn issue_for_key(
        &self,
        req: &IssueRequest,
        key: &KeyPair,
        source: Source,
        replaces: Option<&str>,
    ) -> Result<Svid, CaError> {
        let params = self.svid_params(&req.spiffe_id, &req.dns, req.ttl)?;
        let signed = self.sign_leaf(params, key, source, true, replaces)?;
        self.svid(req.spiffe_id.clone(), key, signed)
    }

    /// Checks an SVID request against the CA's rules and builds the profile parameters.
    pub(crate) fn svid_params(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ttl: Duration,
    ) -> Result<CertificateParams, CaError> {
        if !id.is_member_of(self.trust_domain()) {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                expected: self.trust_domain().clone(),
            });
        }
        profile::check_dns_names(dns)?;
        let ttl = time::Duration::try_from(ttl).map_err(|_| CaError::ZeroTtl)?;
        if ttl <= time::Duration::ZERO {
            return Err(CaError::ZeroTtl);
        }
        // Whole seconds: X.509 times have no fraction, so `Svid::not_after` equals the certificate's.
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let not_after = now.checked_add(ttl).ok_or(CaError::TtlBeyondCa {
            requested: format!("{ttl} from now"),
            ca_not_after: "-".into(),
        })?;
        profile::svid_params(id, dns, now, not_after)
    }

    /// Signs arbitrary parameters with the CA's current signing key, bypassing the SVID profile.
    ///
    /// For test fixtures and tooling: deliberately bad certificates (CA:TRUE leaf, no URI SAN,
    /// two URI SANs, expired, not yet valid). A random serial is set when `params` has none, and
    /// the authority key identifier is always added. The certificate is recorded in the
    /// inventory with `"source":"custom"` (the ledger lists everything the CA key signed).
    /// Returns the leaf followed by the intermediate (if any), PEM.
    ///
    /// # Errors
    /// Generation and I/O errors.
    pub fn sign_custom(
        &self,
        mut params: CertificateParams,
        subject_key: &KeyPair,
    ) -> Result<String, CaError> {
        if params.serial_number.is_none() {
            params.serial_number = Some(profile::random_serial()?);
        }
        params.use_authority_key_identifier_extension = true;
        Ok(self
            .sign_leaf(params, subject_key, Source::Custom, false, None)?
            .chain_pem)
    }

    /// The one signing path: lock, load signer, check lifetime, unique serial, sign, record.
    pub(crate) fn sign_leaf(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
        source: Source,
        enforce_ca_lifetime: bool,
        replaces: Option<&str>,
    ) -> Result<Signed, CaError> {
        let _lock = self.lock()?;
        let how = Provenance {
            source,
            replaces,
            credential: None,
            peer: None,
        };
        self.sign_leaf_locked(params, public_key, &how, enforce_ca_lifetime)
    }

    /// [`Authority::sign_leaf`] for a caller that already holds the directory lock.
    pub(crate) fn sign_leaf_locked(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        how: &Provenance<'_>,
        enforce_ca_lifetime: bool,
    ) -> Result<Signed, CaError> {
        let state = self.state()?;
        let mut signer = self.signer(&state, self.signing_generation(&state, how.source))?;
        if signer.generation != state.current && params.not_after > signer.not_after {
            // The older root ends before this certificate would: the new one signs it.
            signer = self.signer(&state, state.current)?;
        }
        if enforce_ca_lifetime && params.not_after > signer.not_after {
            return Err(CaError::TtlBeyondCa {
                requested: fmt_time(params.not_after),
                ca_not_after: fmt_time(signer.not_after),
            });
        }
        let known = self.serial_checker()?;
        while let Some(s) = params.serial_number.as_ref()
            && known(&hex::encode(s.to_bytes()))?
        {
            params.serial_number = Some(profile::random_serial()?);
        }
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        let cert = params.signed_by(public_key, &signer.issuer)?;
        let sha256_hex = hex::encode(Sha256::digest(cert.der()));
        let spiffe_id = params.subject_alt_names.iter().find_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        });
        let dns = params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::DnsName(d) => Some(d.as_str().to_owned()),
                _ => None,
            })
            .collect();
        self.append_record(&Record::Issued(Issued {
            serial: serial_hex.clone(),
            spiffe_id,
            dns,
            not_before: fmt_time(params.not_before),
            not_after: fmt_time(params.not_after),
            sha256: sha256_hex.clone(),
            issued_at: fmt_time(OffsetDateTime::now_utc()),
            generation: signer.generation,
            source: how.source,
            replaces: how.replaces.map(str::to_owned),
            credential: how.credential.map(str::to_owned),
            peer: how.peer.map(str::to_owned),
            public_key_sha256: Some(hex::encode(Sha256::digest(
                public_key.subject_public_key_info(),
            ))),
        }))?;
        Ok(Signed {
            chain_pem: format!("{}{}", cert.pem(), signer.chain_pem),
            serial_hex,
            not_before: params.not_before,
            not_after: params.not_after,
            sha256_hex,
        })
    }
}
