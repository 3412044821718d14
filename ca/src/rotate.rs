//! `ca rotate`: re-issue certificate directories written by `ca issue` when they are due.
//!
//! A directory is due when any of these holds (the first one found is the reported reason):
//! - `--force`;
//! - its leaf is inside the renewal window: the last third of its lifetime (not counting the
//!   not-before backdate) by default, or the last `--renew-before`;
//! - its leaf was signed by a generation that is no longer current (after `ca root rotate`), or
//!   its key does not match its certificate.
//!
//! A directory whose leaf is revoked is skipped, whatever else holds (even `--force`), and
//! reported as [`Outcome::Skipped`]: a revoked identity is decommissioned or compromised, and a
//! cron job must not mint it a fresh certificate. `--include-revoked` (`include_revoked`) re-issues
//! it deliberately, with a new key.
//!
//! A due directory gets a new certificate for the same SPIFFE ID and DNS SANs and the same
//! lifetime, with a new key (or the same key with `keep_key`), written with the `..data` symlink
//! swap of [`crate::store`], so key and certificate change together: a reader, or a `ca rotate`
//! killed at any moment, never leaves a new certificate next to an old key. A directory that is
//! not due but holds an outdated `bundle.pem` (roots rotated or retired) gets the current bundle
//! with its certificate and key unchanged; `bundle_only` does only that, to every directory, due or
//! not (the first step of a root rotation: trust both roots before any leaf changes). Each re-issue is an `issued` inventory line with
//! `"source":"rotate"` and `"replaces":"<old serial>"`. Running it again right away does nothing:
//! safe from cron or a Kubernetes CronJob. Two `ca rotate` runs on the same directory are
//! serialized by the directory's lock file, `OUT/.lock`, held from reading the old certificate
//! to publishing the new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::KeyPair;
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::prelude::GeneralName;

use crate::inspect::{parse_x509, read_chain};
use crate::inventory::{CertState, Source, fmt_time};
use crate::store::{self, DirLock};
use crate::{Authority, CaError, IssueRequest, SpiffeId, profile};

/// Knobs of `ca rotate`.
#[derive(Debug, Clone, Default)]
pub struct RotateOptions {
    /// Renew when less than this is left (default: a third of the lifetime).
    pub renew_before: Option<Duration>,
    /// Re-issue even when not due.
    pub force: bool,
    /// Reuse the existing key instead of generating a new one.
    pub keep_key: bool,
    /// Re-issue directories whose leaf is revoked (skipped by default).
    pub include_revoked: bool,
    /// Re-issue nothing: only give each directory the CA's current `bundle.pem` (the bundle-only
    /// step of a root rotation, while every leaf is still due).
    pub bundle_only: bool,
}

/// What `ca rotate` did to one directory.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Outcome {
    /// Re-issued.
    Rotated {
        /// Why it was due.
        reason: String,
        /// The replaced certificate.
        old_serial: String,
        /// The new certificate.
        new_serial: String,
        /// RFC 3339.
        not_after: String,
    },
    /// Not due; only `bundle.pem` was replaced by the CA's current bundle.
    BundleUpdated {
        /// Unchanged certificate.
        serial: String,
    },
    /// The leaf is revoked and `include_revoked` was not set; nothing written.
    Skipped {
        /// The revoked certificate, left in place.
        serial: String,
        /// Why it was skipped, and how to re-issue it anyway.
        reason: String,
    },
    /// Not due; nothing written.
    Current {
        /// Unchanged certificate.
        serial: String,
        /// When it becomes due, RFC 3339.
        due_at: String,
    },
}

/// One directory's result.
#[derive(Debug, Clone, Serialize)]
pub struct DirReport {
    /// The certificate directory.
    pub dir: PathBuf,
    /// Its identity.
    pub spiffe_id: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The leaf of a certificate directory, as `rotate` needs it.
struct Current {
    id: SpiffeId,
    dns: Vec<String>,
    serial: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_matches: bool,
    key_pem: String,
    cert_pem: String,
}

impl Authority {
    /// Rotates one certificate directory if it is due (see the module docs).
    ///
    /// # Errors
    /// [`CaError::NotRotatable`] for a directory that does not hold a certificate from this CA,
    /// [`CaError::OutputInsideCa`] for a directory inside the CA directory,
    /// the errors of [`Authority::issue`] (a lifetime beyond the CA is refused, not shortened), I/O.
    pub fn rotate_dir(
        &self,
        dir: &Path,
        opts: &RotateOptions,
        now: OffsetDateTime,
    ) -> Result<DirReport, CaError> {
        let not_rotatable = |detail: String| CaError::NotRotatable {
            dir: dir.to_path_buf(),
            detail,
        };
        self.check_output(dir)?;
        if !dir.join("cert.pem").exists() {
            return Err(not_rotatable(
                "no cert.pem (write it with `ca issue --out` first)".into(),
            ));
        }
        let _dir_lock = DirLock::acquire_named(dir, store::CERT_DIR_LOCK)?;
        let cur = read_current(dir)?;
        if !cur.id.is_member_of(self.trust_domain()) {
            return Err(not_rotatable(format!(
                "{} is not in trust domain {}",
                cur.id,
                self.trust_domain()
            )));
        }
        let entries = self.entries(now)?;
        let Some(entry) = entries.iter().find(|e| e.serial == cur.serial) else {
            return Err(not_rotatable(format!(
                "serial {} is not in this CA's inventory",
                cur.serial
            )));
        };
        let (_, current_gen) = self.generations()?;
        // The lifetime that was asked for: not-before is backdated for clock skew, and counting
        // the backdate would put short-lived certificates inside their window at birth.
        let lifetime =
            (cur.not_after - cur.not_before - profile::BACKDATE).max(time::Duration::MINUTE);
        let window = match opts.renew_before {
            Some(d) => time::Duration::try_from(d).unwrap_or(time::Duration::MAX),
            None => lifetime / 3,
        };
        let due_at = cur.not_after - window;
        let spiffe_id = cur.id.as_str().to_owned();
        if entry.state == CertState::Revoked && !opts.include_revoked {
            return Ok(DirReport {
                dir: dir.to_path_buf(),
                spiffe_id,
                outcome: Outcome::Skipped {
                    serial: cur.serial,
                    reason: "revoked: not re-issued (pass --include-revoked to re-issue it)"
                        .to_owned(),
                },
            });
        }
        let reason = if opts.bundle_only {
            None
        } else if opts.force {
            Some("forced".to_owned())
        } else if entry.state == CertState::Revoked {
            Some("revoked (--include-revoked)".to_owned())
        } else if !cur.key_matches {
            Some("key.pem does not match cert.pem".to_owned())
        } else if entry.generation != current_gen {
            Some(format!(
                "signed by root generation {} (current: {current_gen})",
                entry.generation
            ))
        } else if now >= due_at {
            Some(format!(
                "inside its renewal window (due {})",
                fmt_time(due_at)
            ))
        } else {
            None
        };
        let Some(reason) = reason else {
            let bundle = self.bundle_pem()?;
            let dir_bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap_or_default();
            if dir_bundle == bundle {
                return Ok(DirReport {
                    dir: dir.to_path_buf(),
                    spiffe_id,
                    outcome: Outcome::Current {
                        serial: cur.serial,
                        due_at: fmt_time(due_at),
                    },
                });
            }
            store::write_cert_dir_locked(dir, &cur.cert_pem, &cur.key_pem, &bundle)?;
            return Ok(DirReport {
                dir: dir.to_path_buf(),
                spiffe_id,
                outcome: Outcome::BundleUpdated { serial: cur.serial },
            });
        };
        let key = if opts.keep_key {
            // A revoked leaf's key may be the leaked one: never reuse it.
            if entry.state == CertState::Revoked {
                return Err(not_rotatable(
                    "--keep-key: the leaf is revoked and its key may be compromised; re-issue it with a new key (drop --keep-key)".into(),
                ));
            }
            if !cur.key_matches {
                return Err(not_rotatable(
                    "--keep-key: key.pem does not match cert.pem".into(),
                ));
            }
            KeyPair::from_pem(&cur.key_pem).map_err(|e| not_rotatable(format!("key.pem: {e}")))?
        } else {
            self.key_type().generate()?
        };
        let req = IssueRequest {
            spiffe_id: cur.id,
            dns: cur.dns,
            ttl: Duration::try_from(lifetime).unwrap_or(Duration::from_secs(60)),
        };
        let svid = self.issue_for_key(&req, &key, Source::Rotate, Some(&cur.serial))?;
        store::write_cert_dir_locked(dir, &svid.cert_pem, &svid.key_pem, &svid.bundle_pem)?;
        Ok(DirReport {
            dir: dir.to_path_buf(),
            spiffe_id,
            outcome: Outcome::Rotated {
                reason,
                old_serial: cur.serial,
                new_serial: svid.serial_hex,
                not_after: fmt_time(svid.not_after),
            },
        })
    }
}

fn read_current(dir: &Path) -> Result<Current, CaError> {
    let not_rotatable = |detail: String| CaError::NotRotatable {
        dir: dir.to_path_buf(),
        detail,
    };
    let cert_path = dir.join("cert.pem");
    let cert_pem = store::read_string(&cert_path)?;
    let key_pem = store::read_string(&dir.join("key.pem"))?;
    let chain = read_chain(&cert_pem, &cert_path)?;
    let cert = parse_x509(&chain[0], &cert_path)?;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(*u),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let [uri] = uris[..] else {
        return Err(not_rotatable(format!(
            "the leaf has {} URI SANs; an X.509-SVID has exactly one",
            uris.len()
        )));
    };
    let id = SpiffeId::parse(uri).map_err(|e| not_rotatable(format!("URI SAN `{uri}`: {e}")))?;
    let key_matches = KeyPair::from_pem(&key_pem)
        .is_ok_and(|k| k.public_key_raw() == cert.public_key().subject_public_key.data.as_ref());
    Ok(Current {
        id,
        dns,
        serial: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        key_matches,
        key_pem,
        cert_pem,
    })
}
