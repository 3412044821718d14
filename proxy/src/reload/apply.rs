//! One reload attempt: read the watched files, decide which changed groups apply (the largest
//! set that validates with the serving rest), build the new snapshot through the one build
//! path of startup ([`State::build_snapshot`]), then record the result and swap it in.

use std::path::PathBuf;

use time::OffsetDateTime;
use tracing::{info, warn};

use super::error::{ReloadError, ReloadErrors};
use super::expiry::publish_expiry;
use super::status::Refused;
use super::{Reloader, Trigger};
use crate::input::{Inputs, WATCHED};
use crate::state::{Snapshot, State, Trust};

// Bits of the watched inputs, in `WATCHED` order.
pub(super) const CERT: u8 = 1 << 0;
pub(super) const KEY: u8 = 1 << 1;
pub(super) const BUNDLE: u8 = 1 << 2;
pub(super) const CRL: u8 = 1 << 3;
pub(super) const POLICY: u8 = 1 << 4;

/// Inputs applied or refused together, in order of preference when not all of them can be
/// applied: trust (revocation) first, then authorization, then our own certificate.
const GROUPS: [u8; 3] = [BUNDLE | CRL, POLICY, CERT | KEY];

/// Which combinations of `GROUPS` to try, by index, most groups first, then by preference.
const COMBINATIONS: [&[usize]; 7] = [&[0, 1, 2], &[0, 1], &[0, 2], &[1, 2], &[0], &[1], &[2]];

/// The `what` labels of the inputs in `mask`.
pub(super) fn kinds(mask: u8) -> Vec<&'static str> {
    (0..WATCHED.len())
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| WATCHED[i].label())
        .collect()
}

/// The input masks to try for the changed inputs `pending`: each combination of the groups
/// that hold a changed input, in the order of [`COMBINATIONS`].
pub(super) fn candidates(pending: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for combination in COMBINATIONS {
        if combination.iter().all(|g| GROUPS[*g] & pending != 0) {
            out.push(combination.iter().fold(0, |m, g| m | GROUPS[*g]) & pending);
        }
    }
    out
}

/// One attempt's result, computed on the blocking pool.
pub(super) struct Attempt {
    /// The files as read.
    inputs: Inputs,
    /// The inputs whose content differs from the serving one.
    pending: u8,
    /// What to apply; `None` when nothing is new since the last attempt.
    plan: Option<Plan>,
    /// The files did not change while the attempt ran.
    pub(super) settled: bool,
}

/// What an attempt decided.
struct Plan {
    /// The inputs the new snapshot takes from disk (the rest keep their serving content).
    applied: u8,
    /// The snapshot to swap in (`None`: nothing applies).
    built: Option<Snapshot>,
    /// Why the rest was refused (empty when everything applied).
    errors: ReloadErrors,
}

/// Reads the files and decides what to apply (blocking: runs on the blocking pool).
pub(super) fn attempt(
    read: &dyn Fn(&[Option<PathBuf>; 5]) -> Inputs,
    state: &State,
    paths: &[Option<PathBuf>; 5],
    served: &Inputs,
    refused: [Option<[u8; 32]>; 5],
    signal: bool,
) -> Attempt {
    let inputs = read(paths);
    let mask = |f: &dyn Fn(usize) -> bool| (0..5).filter(|i| f(*i)).fold(0u8, |m, i| m | 1 << i);
    let pending = mask(&|i| inputs.digest(i) != served.digest(i));
    // Refused contents that are still there are no reason for another attempt (a refused
    // input back to its serving content needs none either: `finish` clears its refusal).
    let still_refused = mask(&|i| refused[i].is_some() && refused[i] == inputs.digest(i));
    let plan = (signal || pending & !still_refused != 0)
        .then(|| plan(state, served, &inputs, pending, signal));
    let settled = plan.is_none() || read(paths).digests() == inputs.digests();
    Attempt {
        inputs,
        pending,
        plan,
        settled,
    }
}

/// The largest set of changed groups that validates with the serving rest (see the module
/// docs); on SIGHUP at least the serving inputs are rebuilt.
fn plan(state: &State, served: &Inputs, inputs: &Inputs, pending: u8, signal: bool) -> Plan {
    let mut errors: Option<ReloadErrors> = None;
    for applied in candidates(pending) {
        match prepare(state, &served.with(inputs, applied)) {
            Ok(built) => {
                return Plan {
                    applied,
                    built: Some(built),
                    errors: errors.unwrap_or_default(),
                };
            }
            Err(e) => {
                // The whole set's errors: every problem, as startup would report them.
                errors.get_or_insert(e.into());
            }
        }
    }
    let built = if signal {
        prepare(state, served)
            .map_err(|e| errors.get_or_insert(e.into()).clone())
            .ok()
    } else {
        None
    };
    Plan {
        applied: 0,
        built,
        errors: errors.unwrap_or_default(),
    }
}

/// Builds a snapshot from `inputs` exactly as startup does (credentials, policy, inbound and
/// outbound TLS), then checks what only a reload can get wrong: a CRL rollback and an identity
/// change.
fn prepare(state: &State, inputs: &Inputs) -> Result<Snapshot, Vec<ReloadError>> {
    let snapshot = state
        .build_snapshot(inputs)
        .map_err(|es| es.into_iter().map(ReloadError::from).collect::<Vec<_>>())?;
    let old = state.snapshot();
    // An older CRL of an issuer (lower CRL number) would un-revoke certificates.
    if let Err(e) = snapshot
        .credentials
        .crl_set
        .check_rollback(&old.credentials.crl_set)
    {
        return Err(vec![ReloadError::CrlRollback(e)]);
    }
    if snapshot.credentials.id != old.credentials.id && !state.config.reload.allow_identity_change {
        return Err(vec![ReloadError::IdentityChange {
            cert: state.config.identity.cert.clone(),
            found: snapshot.credentials.id.clone(),
            running: old.credentials.id.clone(),
        }]);
    }
    if snapshot.credentials.id != old.credentials.id {
        warn!(
            from = %old.credentials.id,
            to = %snapshot.credentials.id,
            "DANGEROUS: identity change accepted (allow_identity_change = true)"
        );
    }
    Ok(snapshot)
}

impl Reloader {
    /// Records an attempt (metrics, `/status`, log) and swaps in what it built.
    pub(super) fn finish(&mut self, trigger: Trigger, att: Attempt) {
        let Attempt {
            inputs,
            pending,
            plan,
            ..
        } = att;
        let now = OffsetDateTime::now_utc();
        // A refused input whose file is back to the serving content is resolved.
        let resolved = self.with_status(|s| {
            let mut resolved = 0u8;
            for i in 0..5 {
                if s.refused[i].is_some() && inputs.digest(i) == self.served.digest(i) {
                    s.refused[i] = None;
                    resolved |= 1 << i;
                }
            }
            resolved
        });
        for what in kinds(resolved) {
            self.metrics.reloads.with_label_values(&[what, "ok"]).inc();
        }
        let Some(plan) = plan else {
            self.publish_refused();
            return;
        };
        let refused = pending & !plan.applied;
        let ok = if plan.built.is_some() { "ok" } else { "error" };
        if pending == 0 && resolved == 0 {
            self.metrics.reloads.with_label_values(&["none", ok]).inc();
        }
        for (i, what) in WATCHED.iter().map(|k| k.label()).enumerate() {
            let bit = 1 << i;
            if pending & bit != 0 {
                let result = if plan.applied & bit != 0 {
                    "ok"
                } else {
                    "error"
                };
                self.metrics
                    .reloads
                    .with_label_values(&[what, result])
                    .inc();
            }
        }
        self.with_status(|s| {
            for i in 0..5 {
                let bit = 1 << i;
                if refused & bit != 0
                    && let Some(input) = &inputs.0[i]
                {
                    let since = match &s.refused[i] {
                        Some(r) if r.digest == input.digest => r.since,
                        _ => now,
                    };
                    s.refused[i] = Some(Refused {
                        digest: input.digest,
                        path: input.path.clone(),
                        since,
                        errors: plan.errors.clone(),
                    });
                } else if plan.applied & bit != 0 {
                    s.refused[i] = None;
                }
            }
            s.last_attempt = Some(now);
            s.last_result = Some(
                match (refused != 0 || plan.built.is_none(), plan.applied != 0) {
                    (false, _) => "ok",
                    (true, true) => "partial",
                    (true, false) => "refused",
                },
            );
        });
        self.publish_refused();
        let what = if pending == 0 {
            vec!["none"]
        } else {
            kinds(pending)
        };
        if refused != 0 || plan.built.is_none() {
            warn!(
                trigger = trigger.as_str(),
                what = %what.join(","),
                refused = %kinds(refused).join(","),
                applied = %kinds(plan.applied).join(","),
                errors = %plan.errors,
                "reload refused: keeping the serving version of the refused files{}",
                if plan.applied != 0 { " and applying the rest" } else { "" }
            );
        }
        let Some(snapshot) = plan.built else {
            return;
        };
        self.served = self.served.with(&inputs, plan.applied);
        let signal = matches!(trigger, Trigger::Signal);
        let trust = if plan.applied & (BUNDLE | CRL) != 0 || signal {
            Trust::Changed
        } else {
            Trust::Kept
        };
        let serial = snapshot.credentials.serial_hex.clone();
        let policy_sha = snapshot.inbound.as_ref().map(|i| i.policy_sha256.clone());
        publish_expiry(&self.metrics, &snapshot);
        self.state.swap(snapshot, trust);
        if trust == Trust::Kept && plan.applied & (CERT | KEY) != 0 {
            // A new certificate of our own (an online renewal, or `ca rotate` on disk): pooled
            // outbound connections presented the previous one, which the peer stops trusting
            // soon (it expires, is revoked, or its root is retired next). Stop reusing them
            // now, while the peer still accepts them, rather than when the peer refuses it.
            self.state.retire_outbound();
        }
        let applied = if plan.applied == 0 {
            vec!["none"]
        } else {
            kinds(plan.applied)
        };
        info!(
            trigger = trigger.as_str(),
            what = %applied.join(","),
            serial = %serial,
            policy_sha256 = policy_sha.as_deref().unwrap_or("-"),
            generation = self.state.generation(),
            "reloaded"
        );
        let snap = self.state.snapshot();
        self.check_lifetime(&snap);
        self.check_crls(&snap);
    }

    /// Sets `gatehouse_reload_input_refused{what}` from the refused inputs.
    pub(super) fn publish_refused(&self) {
        let refused = self.with_status(|s| s.refused.each_ref().map(Option::is_some));
        for ((kind, path), refused) in WATCHED.iter().zip(&self.paths).zip(refused) {
            if path.is_some() {
                self.metrics
                    .reload_input_refused
                    .with_label_values(&[kind.label()])
                    .set(i64::from(refused));
            }
        }
    }
}
