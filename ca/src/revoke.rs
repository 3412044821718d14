//! Revocation ([`Authority::revoke`]) and CRLs ([`Authority::crl_pem`]).
//!
//! A revocation is one `revoked` line in the inventory. A CRL file is PEM with one signed v2 CRL
//! (CRL number, this-update, next-update, authority key identifier) per issuing CA of every
//! generation still in the bundle: the leaf-signing CA (intermediate or root) lists the revoked,
//! unexpired leaves of its generation; with intermediates the root also signs a CRL (listing no
//! intermediate today) so that verifiers that check the whole chain, as rustls/webpki do by
//! default, know the intermediate's status too. All CRLs of one run share a CRL number, which
//! increases by one per run (`ca.json`).
//!
//! Offline root: the root's CRL lives [`DEFAULT_ROOT_CRL_TTL`] (or `ca crl --root-ttl`) and is
//! kept in `gen-N/root.crl.pem` whenever the root key signs one. When `gen-N/root.key` is absent,
//! that stored CRL is reused as is (same CRL number: webpki and the sidecar's rollback check accept
//! an issuer's CRL number repeating), and the run is refused ([`CaError::RootCrlNeeded`]) when it
//! is missing or expires within the new CRLs' lifetime.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;

use crate::authority::{CaState, CrlOutput};
use crate::inventory::{self, CertState, Record, Revoked, fmt_time, parse_time};
use crate::store::{self, PUBLIC_MODE};
use crate::{Authority, CaError, SpiffeId};

/// Default lifetime of a root's CRL (`ca crl --root-ttl`): 90 days, so the root key can stay
/// offline between renewals.
pub const DEFAULT_ROOT_CRL_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The root's last signed CRL, kept next to its certificate for the offline-root layout.
const ROOT_CRL_FILE: &str = "root.crl.pem";

/// How many CRL files `ca.json` remembers (the oldest is forgotten first).
const MAX_CRL_OUTPUTS: usize = 16;

fn crl_ttl(ttl: Duration) -> Result<time::Duration, CaError> {
    let ttl = time::Duration::try_from(ttl).map_err(|_| CaError::ZeroTtl)?;
    if ttl <= time::Duration::ZERO {
        return Err(CaError::ZeroTtl);
    }
    Ok(ttl)
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// One certificate by serial (hex, `:` separators and case ignored).
    Serial(String),
    /// Every live (unexpired, unrevoked) certificate of an identity.
    Identity(SpiffeId),
}

/// RFC 5280 §5.3.1 reasons, by their kebab-case names.
const REASONS: [(&str, RevocationReason); 8] = [
    ("unspecified", RevocationReason::Unspecified),
    ("key-compromise", RevocationReason::KeyCompromise),
    ("ca-compromise", RevocationReason::CaCompromise),
    ("affiliation-changed", RevocationReason::AffiliationChanged),
    ("superseded", RevocationReason::Superseded),
    (
        "cessation-of-operation",
        RevocationReason::CessationOfOperation,
    ),
    ("certificate-hold", RevocationReason::CertificateHold),
    ("privilege-withdrawn", RevocationReason::PrivilegeWithdrawn),
];

/// Checks a reason name (`key-compromise`, ...).
///
/// # Errors
/// [`CaError::UnknownReason`].
pub fn check_reason(reason: &str) -> Result<(), CaError> {
    reason_code(reason)
        .map(|_| ())
        .ok_or_else(|| CaError::UnknownReason {
            reason: reason.to_owned(),
        })
}

fn reason_code(reason: &str) -> Option<RevocationReason> {
    REASONS.iter().find(|(n, _)| *n == reason).map(|(_, r)| *r)
}

/// Canonical serial spelling: lowercase hex, no separators, no `0x`.
pub fn normalize_serial(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    s.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

impl Authority {
    /// Records the revocation of `target` with `reason` in the inventory and returns what was
    /// newly revoked (a certificate already revoked is not recorded twice).
    ///
    /// # Errors
    /// [`CaError::UnknownSerial`], [`CaError::UnknownIdentity`], [`CaError::UnknownReason`], I/O.
    pub fn revoke(&self, target: &RevokeTarget, reason: &str) -> Result<Vec<Revoked>, CaError> {
        check_reason(reason)?;
        let _lock = self.lock()?;
        let now = OffsetDateTime::now_utc();
        let entries = self.entries(now)?;
        let chosen: Vec<_> = match target {
            RevokeTarget::Serial(s) => {
                let serial = normalize_serial(s);
                let found: Vec<_> = entries.iter().filter(|e| e.serial == serial).collect();
                if found.is_empty() {
                    return Err(CaError::UnknownSerial { serial });
                }
                found
            }
            RevokeTarget::Identity(id) => {
                let found: Vec<_> = entries
                    .iter()
                    .filter(|e| e.spiffe_id.as_deref() == Some(id.as_str()) && e.state.is_live())
                    .collect();
                if found.is_empty() {
                    return Err(CaError::UnknownIdentity { id: id.clone() });
                }
                found
            }
        };
        let mut done = Vec::new();
        for entry in chosen.into_iter().filter(|e| e.state != CertState::Revoked) {
            let record = Revoked {
                serial: entry.serial.clone(),
                reason: reason.to_owned(),
                revoked_at: fmt_time(now),
            };
            self.append_record(&Record::Revoked(record.clone()))?;
            done.push(record);
        }
        Ok(done)
    }

    /// Signs the CRLs (see the module docs) valid for `ttl`, PEM, and bumps the CRL number.
    ///
    /// # Errors
    /// [`CaError::ZeroTtl`], generation and I/O errors.
    pub fn crl_pem(&self, ttl: Duration) -> Result<String, CaError> {
        let ttl = crl_ttl(ttl)?;
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let number = self.next_crl_number(&mut state)?;
        let pem = self.sign_crls(&state, number, ttl, crl_ttl(DEFAULT_ROOT_CRL_TTL)?)?;
        self.save_state(&state)?;
        Ok(pem)
    }

    /// [`Authority::crl_pem`] written atomically to `out`, which is recorded in `ca.json` as a
    /// place the CA publishes to (with `ttl`): `ca root rotate` and `ca root retire` rewrite
    /// every recorded file, so the published CRLs keep covering every root in the bundle.
    ///
    /// # Errors
    /// As [`Authority::crl_pem`], [`CaError::OutputInsideCa`] (checked before the CRL number is
    /// used), plus I/O errors naming `out`.
    pub fn write_crl(&self, out: &Path, ttl: Duration) -> Result<(), CaError> {
        self.write_crl_with_root_ttl(out, ttl, DEFAULT_ROOT_CRL_TTL)
    }

    /// [`Authority::write_crl`] with the lifetime of the roots' CRLs (when their keys are
    /// present; see the module docs): the longer of `root_ttl` and `ttl`.
    ///
    /// # Errors
    /// As [`Authority::write_crl`], plus [`CaError::RootCrlNeeded`].
    pub fn write_crl_with_root_ttl(
        &self,
        out: &Path,
        ttl: Duration,
        root_ttl: Duration,
    ) -> Result<(), CaError> {
        // Before the CRL number is used: `out` must not overwrite the CA's own state.
        self.check_output(out)?;
        let ttl_secs = ttl.as_secs();
        let ttl = crl_ttl(ttl)?;
        let path = std::path::absolute(out).map_err(CaError::io("cannot resolve", out))?;
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let number = self.next_crl_number(&mut state)?;
        let root_ttl = crl_ttl(root_ttl)?;
        let pem = self.sign_crls(&state, number, ttl, root_ttl)?;
        state.crl_outputs.retain(|o| o.path != path);
        state.crl_outputs.push(CrlOutput {
            path: path.clone(),
            ttl_secs,
        });
        let excess = state.crl_outputs.len().saturating_sub(MAX_CRL_OUTPUTS);
        state.crl_outputs.drain(..excess);
        self.save_state(&state)?;
        store::write_atomic(&path, pem.as_bytes(), PUBLIC_MODE)
    }

    /// Rewrites every recorded CRL file ([`Authority::crl_outputs`]) with fresh CRLs for the
    /// generations of `state` (the caller holds the lock and saves `state`, whose CRL number
    /// is bumped once for all files). A recorded file that no longer exists is forgotten, not
    /// recreated: its publisher moved on.
    pub(crate) fn republish_crls(&self, state: &mut CaState) -> Result<(), CaError> {
        state.crl_outputs.retain(|o| o.path.exists());
        if state.crl_outputs.is_empty() {
            return Ok(());
        }
        // One number per run, shared by every file (as one `ca crl` would).
        let number = self.next_crl_number(state)?;
        let mut signed: Vec<(u64, String)> = Vec::new();
        for out in &state.crl_outputs {
            if !signed.iter().any(|(t, _)| *t == out.ttl_secs) {
                let ttl = crl_ttl(Duration::from_secs(out.ttl_secs))?;
                let root_ttl = crl_ttl(DEFAULT_ROOT_CRL_TTL)?;
                signed.push((out.ttl_secs, self.sign_crls(state, number, ttl, root_ttl)?));
            }
            let pem = signed
                .iter()
                .find(|(t, _)| *t == out.ttl_secs)
                .map(|(_, p)| p);
            let pem = pem.map_or(&b""[..], |p| p.as_bytes());
            store::write_atomic(&out.path, pem, PUBLIC_MODE)?;
        }
        Ok(())
    }

    /// Signs one CRL per issuing CA of every generation of `state` not retired (see the module
    /// docs) with CRL number `number`.
    fn sign_crls(
        &self,
        state: &CaState,
        number: u64,
        ttl: time::Duration,
        root_ttl: time::Duration,
    ) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let entries = self.entries(now)?;
        let mut pem = String::new();
        for generation in state.generations.iter().filter(|g| !g.retired) {
            let revoked: Vec<RevokedCertParams> = entries
                .iter()
                .filter(|e| e.generation == generation.id && e.state == CertState::Revoked)
                .filter_map(|e| {
                    let r = e.revoked.as_ref()?;
                    Some(RevokedCertParams {
                        serial_number: SerialNumber::from_slice(&hex::decode(&e.serial).ok()?),
                        revocation_time: parse_time(&r.revoked_at).unwrap_or(now),
                        reason_code: reason_code(&r.reason),
                        invalidity_date: None,
                    })
                })
                .collect();
            let signer = self.signer(state, generation.id)?;
            pem.push_str(&sign_crl(&signer.issuer, revoked, number, now, ttl)?);
            if state.intermediate {
                pem.push_str(&self.root_crl(generation.id, number, now, ttl, root_ttl)?);
            }
        }
        Ok(pem)
    }

    /// The (empty) CRL of generation `id`'s root: signed for `max(ttl, root_ttl)` and stored when
    /// `gen-N/root.key` is present (or the root key is in a PKCS#11 token), else the stored one if it outlives this run's CRLs.
    fn root_crl(
        &self,
        id: u32,
        number: u64,
        now: OffsetDateTime,
        ttl: time::Duration,
        root_ttl: time::Duration,
    ) -> Result<String, CaError> {
        let gen_dir = self.dir().join(format!("gen-{id}"));
        let stored = gen_dir.join(ROOT_CRL_FILE);
        // A token-held root is always online: only a PKCS#8 root.key can be moved offline.
        if gen_dir.join("root.key").exists() || self.state()?.key_store.is_some() {
            let root = self.root_signer(id)?;
            let pem = sign_crl(&root.issuer, Vec::new(), number, now, ttl.max(root_ttl))?;
            store::write_atomic(&stored, pem.as_bytes(), PUBLIC_MODE)?;
            return Ok(pem);
        }
        let needed = |detail: String| CaError::RootCrlNeeded {
            generation: id,
            path: stored.clone(),
            detail,
        };
        let pem = match std::fs::read_to_string(&stored) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(needed("there is no stored root CRL".into()));
            }
            Err(e) => return Err(CaError::io("cannot read", &stored)(e)),
        };
        let next_update = crl_next_update(&pem).ok_or_else(|| CaError::Corrupt {
            path: stored.clone(),
            detail: "not a PEM CRL with a next-update".into(),
        })?;
        if next_update < now + ttl {
            return Err(needed(format!(
                "the stored root CRL expires {}, before this CRL's next-update {}",
                fmt_time(next_update),
                fmt_time(now + ttl)
            )));
        }
        Ok(pem)
    }

    /// Serials currently revoked (for callers checking a CRL's content).
    ///
    /// # Errors
    /// As [`inventory::read_records`].
    pub fn revoked_serials(&self) -> Result<HashSet<String>, CaError> {
        if let Some(store) = self.store() {
            return store.revoked_serials();
        }
        Ok(inventory::read_records(self.dir())?
            .into_iter()
            .filter_map(|r| match r {
                Record::Revoked(r) => Some(r.serial),
                Record::Issued(_) => None,
            })
            .collect())
    }
}

fn sign_crl(
    issuer: &rcgen::Issuer<'static, crate::keystore::CaKey>,
    revoked_certs: Vec<RevokedCertParams>,
    number: u64,
    now: OffsetDateTime,
    ttl: time::Duration,
) -> Result<String, CaError> {
    let params = CertificateRevocationListParams {
        this_update: now - crate::profile::BACKDATE,
        next_update: now + ttl,
        crl_number: SerialNumber::from_slice(&minimal_be(number)),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

/// The next-update of the first CRL in `pem`.
fn crl_next_update(pem: &str) -> Option<OffsetDateTime> {
    use x509_parser::prelude::FromDer;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&block.contents).ok()?;
    Some(crl.next_update()?.to_datetime())
}

/// Big-endian bytes of `n` without leading zeros, and with a leading zero if the top bit is set
/// (a positive DER INTEGER).
fn minimal_be(n: u64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(7);
    let mut out = bytes[first..].to_vec();
    if out[0] & 0x80 != 0 {
        out.insert(0, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_spellings_normalize() {
        for (input, want) in [
            ("4F:1C:00", "4f1c00"),
            ("0x4f1c", "4f1c"),
            (" 4f1c ", "4f1c"),
            ("4f1c", "4f1c"),
        ] {
            assert_eq!(normalize_serial(input), want, "{input:?}");
        }
    }

    #[test]
    fn crl_numbers_are_positive_minimal_integers() {
        for (n, want) in [
            (1u64, vec![1u8]),
            (127, vec![0x7f]),
            (128, vec![0, 0x80]),
            (256, vec![1, 0]),
            (
                u64::MAX,
                vec![0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
        ] {
            assert_eq!(minimal_be(n), want, "{n}");
        }
    }

    #[test]
    fn reason_names() {
        assert!(check_reason("key-compromise").is_ok());
        assert!(check_reason("superseded").is_ok());
        assert!(matches!(
            check_reason("KeyCompromise"),
            Err(CaError::UnknownReason { .. })
        ));
        assert!(matches!(
            check_reason(""),
            Err(CaError::UnknownReason { .. })
        ));
    }
}
