//! Hot reload and rotation.
//!
//! # Reload and rotation
//!
//! **Triggers.** Three ways, all ending in [`Reloader::reload`]:
//! - file events (notify/inotify) on the *directories* holding the certificate, key, bundle,
//!   CRL and policy files, debounced by `[reload] debounce` (default 75 ms). Directories, not
//!   files: `ca rotate` and kubelet publish a new version by renaming a `..data` symlink, and
//!   `write + rename` replaces the inode a file watch would be attached to;
//! - a polling fallback every `[reload] poll_interval` (default 2 s) for file systems without
//!   events (some network and overlay mounts) and for events lost under load;
//! - `SIGHUP`, which reloads even when nothing changed (ignored once shutdown started).
//!
//! Whatever the trigger, the files' contents are hashed (SHA-256, following symlinks) and
//! compared with the last ones seen; nothing happens when nothing changed (except on SIGHUP).
//! The changed kinds label `gatehouse_reloads_total{what,result}`.
//!
//! **Validation.** A reload builds a whole new [`Snapshot`] through the same code as startup
//! ([`State::build_snapshot`]), so it checks everything startup checks: every file reads and
//! parses, the key matches the certificate, the leaf is an X.509-SVID, chains to the (new)
//! bundle and has not expired, the CRL parses, the policy compiles and is for our trust domain,
//! the outbound TLS configurations build. In addition the SPIFFE ID must be the running one
//! unless `[reload] allow_identity_change = true` (DANGEROUS: a sidecar that silently becomes
//! another workload defeats every policy written about it). On any failure the old snapshot
//! stays, the reason is logged (`reload refused`, with the trigger, the changed kinds and every
//! error) and `gatehouse_reloads_total{result="error"}` counts it.
//!
//! **Swap.** The new snapshot is swapped in atomically ([`State::swap`]): new inbound
//! handshakes use its `ServerConfig` (a fresh one, so a fresh session cache, whenever the
//! bundle or CRL changed or on SIGHUP: no session verified under an old bundle or CRL resumes;
//! a resumed peer is re-verified anyway, see [`crate::tls::verify`]; a reload that leaves
//! trust alone keeps the running `ServerConfig` and its sessions, see
//! [`State::keep_server_tls`]), both TLS roles present the new certificate, and every
//! request, including those on open keep-alive and HTTP/2 connections, is decided by the new
//! policy. When the bundle or CRL changed, each outbound pool gets a new client configuration
//! and retires its open connections ([`crate::outbound::connect::Upstream::retire_all`]):
//! requests in flight finish, new ones go over new handshakes.
//!
//! **Live connections keep** their TLS session (and the certificate it presented) and their
//! requests in flight. They do not keep their trust: after every swap each inbound connection
//! re-runs the new verifier on its peer's certificates and is closed when the peer is no longer
//! trusted (revoked, root retired): see [`crate::inbound::listener`]. Outbound pooled
//! connections are also retired by age (`max_connection_age`, default 5 min), so a rotated
//! client certificate reaches every peer within that bound.
//!
//! **Expiry.** `gatehouse_cert_expiry_timestamp_seconds` is kept for the own leaf
//! (`cert="leaf"`) and each bundle root (`cert="root:<serial>"`); a warning is logged once per
//! leaf when less than a third of its lifetime is left; `/readyz` fails once it has expired;
//! startup refuses an expired leaf, naming the file and the expiry time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::error::LoadError;
use crate::metrics::Metrics;
use crate::outbound::connect::Upstream;
use crate::outbound::{self, OutboundTls};
use crate::signal::Shutdown;
use crate::state::{Snapshot, State};
use crate::tls::crl::StaleReport;

/// The kinds of watched files, in `gatehouse_reloads_total{what}` spelling.
const KINDS: [&str; 5] = ["cert", "key", "bundle", "crl", "policy"];

/// SHA-256 of each watched file's content (`None`: not configured); a read error hashes the
/// error, so a vanished file is a change too.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([Option<[u8; 32]>; 5]);

impl Fingerprint {
    fn read(paths: &[Option<PathBuf>; 5]) -> Self {
        Self(paths.each_ref().map(|p| {
            p.as_deref().map(|p| {
                let mut h = Sha256::new();
                match std::fs::read(p) {
                    Ok(bytes) => h.update(&bytes),
                    Err(e) => h.update(format!("unreadable: {}", e.kind()).as_bytes()),
                }
                h.finalize().into()
            })
        }))
    }

    /// The kinds whose content differs.
    fn changed(&self, before: &Self) -> Vec<&'static str> {
        KINDS
            .iter()
            .zip(self.0.iter().zip(before.0.iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(k, _)| *k)
            .collect()
    }
}

fn watched_paths(cfg: &Config) -> [Option<PathBuf>; 5] {
    [
        Some(cfg.identity.cert.clone()),
        Some(cfg.identity.key.clone()),
        Some(cfg.identity.bundle.clone()),
        cfg.identity.crl.clone(),
        cfg.inbound.as_ref().map(|i| i.policy.clone()),
    ]
}

/// What started a reload (a log field).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Watch,
    Poll,
    Signal,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Watch => "file_event",
            Self::Poll => "poll",
            Self::Signal => "SIGHUP",
        }
    }
}

/// Watches the files and reloads the snapshot; one per sidecar, run by [`Reloader::run`].
pub struct Reloader {
    state: Arc<State>,
    metrics: Metrics,
    upstreams: Vec<Vec<Arc<Upstream>>>,
    paths: [Option<PathBuf>; 5],
    last: Fingerprint,
    warned_serial: Option<String>,
    crl_report: StaleReport,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for `state`; `upstreams` are the outbound pools in configuration order (one
    /// per event loop for each entry). Reads
    /// the files once (the baseline the first change is compared with) and publishes the
    /// expiry metrics of the current snapshot.
    pub fn new(state: Arc<State>, metrics: Metrics, upstreams: Vec<Vec<Arc<Upstream>>>) -> Self {
        let paths = watched_paths(&state.config);
        let last = Fingerprint::read(&paths);
        let mut r = Self {
            state,
            metrics,
            upstreams,
            paths,
            last,
            warned_serial: None,
            crl_report: StaleReport::default(),
        };
        let snap = r.state.snapshot();
        publish_expiry(&r.metrics, &snap);
        r.check_lifetime(&snap);
        r.check_crls(&snap);
        r
    }

    /// Runs until shutdown starts: file events (debounced), the polling fallback, and SIGHUP
    /// (`hangup`, installed before anything was bound; ignored while draining).
    pub async fn run(mut self, mut hangup: tokio::signal::unix::Signal, shutdown: Shutdown) {
        let cfg = self.state.config.reload.clone();
        let (tx, mut events) = mpsc::unbounded_channel::<()>();
        let _watcher = if cfg.watch { self.watch(tx) } else { None };
        let mut poll = tokio::time::interval(cfg.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                () = shutdown.token().cancelled() => break,
                Some(()) = events.recv() => {
                    // Debounce: a writer's burst (temp file, rename, symlink swap) is one reload.
                    tokio::time::sleep(cfg.debounce).await;
                    while events.try_recv().is_ok() {}
                    self.reload(Trigger::Watch).await;
                }
                _ = poll.tick() => {
                    self.reload(Trigger::Poll).await;
                    let snap = self.state.snapshot();
                    self.check_lifetime(&snap);
                    self.check_crls(&snap);
                }
                _ = hangup.recv() => {
                    if shutdown.is_draining() {
                        info!("SIGHUP ignored: shutting down");
                    } else {
                        self.reload(Trigger::Signal).await;
                    }
                }
            }
        }
        debug!("reloader stopped");
    }

    /// Starts watching the directories of the watched files; `None` (polling only) when
    /// notify cannot watch them.
    fn watch(&self, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let dirs: BTreeSet<PathBuf> = self
            .paths
            .iter()
            .flatten()
            .map(|p| p.parent().unwrap_or(Path::new("/")).to_path_buf())
            .collect();
        let handler = move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, EventKind::Access(_))
            {
                let _ = tx.send(());
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot start the file watcher: reloading by polling only");
                return None;
            }
        };
        for dir in &dirs {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory: changes there are seen by polling only");
            }
        }
        debug!(dirs = ?dirs, "watching for changes");
        Some(watcher)
    }

    /// Rebuilds and swaps the snapshot if a watched file changed (always on SIGHUP).
    async fn reload(&mut self, trigger: Trigger) {
        let paths = self.paths.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || Fingerprint::read(&paths)).await else {
            return;
        };
        if now == self.last && !matches!(trigger, Trigger::Signal) {
            return;
        }
        // Files still being written while we read them (a writer that is not atomic, or a
        // `..data` swap between reading cert.pem and key.pem) would give a spurious refusal:
        // build again, after the debounce, until the files held still during a build.
        let debounce = self.state.config.reload.debounce;
        let mut attempt = 0;
        let (seen, built) = loop {
            attempt += 1;
            let state = self.state.clone();
            let paths = self.paths.clone();
            let job = tokio::task::spawn_blocking(move || {
                let before = Fingerprint::read(&paths);
                let built = prepare(&state);
                (before, built, Fingerprint::read(&paths))
            });
            let Ok((before, built, after)) = job.await else {
                return;
            };
            if before == after || attempt >= 3 {
                break (after, built);
            }
            debug!(attempt, "files changed during the reload: building again");
            tokio::time::sleep(debounce).await;
        };
        let changed = seen.changed(&self.last);
        // Remember what was seen even if it is refused: a broken file is reported once, and
        // the next write (the fix) triggers the next attempt.
        self.last = seen;
        let what: Vec<&'static str> = if changed.is_empty() {
            vec!["none"]
        } else {
            changed.clone()
        };
        let result = if built.is_ok() { "ok" } else { "error" };
        for w in &what {
            self.metrics.reloads.with_label_values(&[w, result]).inc();
        }
        let (snapshot, outbound_tls) = match built {
            Ok(b) => b,
            Err(errors) => {
                warn!(
                    trigger = trigger.as_str(),
                    what = %what.join(","),
                    errors = %errors.join("; "),
                    "reload refused: keeping the current certificates and policy"
                );
                return;
            }
        };
        let trust_changed = changed.iter().any(|k| matches!(*k, "bundle" | "crl"))
            || matches!(trigger, Trigger::Signal);
        let mut snapshot = snapshot;
        if !trust_changed {
            self.state.keep_server_tls(&mut snapshot);
        }
        let serial = snapshot.credentials.serial_hex.clone();
        let policy_sha = snapshot.inbound.as_ref().map(|i| i.policy_sha256.clone());
        publish_expiry(&self.metrics, &snapshot);
        self.state.swap(snapshot);
        for (pools, tls) in self.upstreams.iter().zip(outbound_tls) {
            for upstream in pools {
                upstream.set_tls(Arc::clone(&tls));
                if trust_changed {
                    upstream.retire_all();
                }
            }
        }
        info!(
            trigger = trigger.as_str(),
            what = %what.join(","),
            serial = %serial,
            policy_sha256 = policy_sha.as_deref().unwrap_or("-"),
            generation = self.state.generation(),
            "reloaded"
        );
        let snap = self.state.snapshot();
        self.check_lifetime(&snap);
        self.check_crls(&snap);
    }

    /// Reports stale CRLs (see [`StaleReport`]) at start, after every reload and on every
    /// poll tick, so it fires as time passes with no reload. When one went stale beyond
    /// `crl_grace` with `crl_stale = "refuse"`, open connections were verified before: inbound
    /// ones re-check their peer, pooled outbound ones are retired so the next request
    /// verifies its server again.
    fn check_crls(&mut self, snap: &Snapshot) {
        let policy = self.state.config.identity.crl_policy;
        if self.crl_report.check(&snap.credentials.crl_set, policy) {
            self.state.recheck_peers();
            self.upstreams.iter().flatten().for_each(|u| u.retire_all());
        }
    }

    /// Warns once per leaf when less than a third of its lifetime is left (and once when it
    /// has expired: `/readyz` fails from then on).
    fn check_lifetime(&mut self, snap: &Snapshot) {
        let Some((not_before, not_after)) =
            validity(snap.credentials.certified.end_entity_cert().ok())
        else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        let serial = &snap.credentials.serial_hex;
        let left = not_after - now;
        let third = (not_after - not_before) / 3;
        let key = if left <= time::Duration::ZERO {
            format!("{serial}:expired")
        } else if left < third {
            serial.clone()
        } else {
            return;
        };
        if self.warned_serial.as_deref() == Some(key.as_str()) {
            return;
        }
        self.warned_serial = Some(key);
        warn!(
            cert = %self.state.config.identity.cert.display(),
            serial = %serial,
            not_after = %not_after.format(&Rfc3339).unwrap_or_default(),
            seconds_left = left.whole_seconds(),
            "own certificate has less than a third of its lifetime left: rotate it (`ca rotate --dir CA OUTDIR`)"
        );
    }
}

/// Builds and validates a new snapshot and the outbound TLS configurations; the errors
/// rendered one per string.
type Prepared = (Snapshot, Vec<Arc<rustls::ClientConfig>>);

fn prepare(state: &State) -> Result<Prepared, Vec<String>> {
    let render = |es: Vec<LoadError>| es.iter().map(ToString::to_string).collect::<Vec<_>>();
    let snapshot = state.build_snapshot().map_err(render)?;
    let old = state.snapshot();
    // An older CRL of an issuer (lower CRL number) would un-revoke certificates.
    if let Err(e) = snapshot
        .credentials
        .crl_set
        .check_rollback(&old.credentials.crl_set)
    {
        return Err(vec![e.to_string()]);
    }
    if snapshot.credentials.id != old.credentials.id && !state.config.reload.allow_identity_change {
        return Err(vec![format!(
            "{}: the certificate is for {} but this sidecar runs as {}; refusing to change \
             identity (set [reload] allow_identity_change = true to allow it, DANGEROUS)",
            state.config.identity.cert.display(),
            snapshot.credentials.id,
            old.credentials.id
        )]);
    }
    if snapshot.credentials.id != old.credentials.id {
        warn!(
            from = %old.credentials.id,
            to = %snapshot.credentials.id,
            "DANGEROUS: identity change accepted (allow_identity_change = true)"
        );
    }
    let tls = OutboundTls {
        cert: state.resolver.clone(),
        credentials: snapshot.credentials.clone(),
        min_tls: state.config.min_tls,
        provider: state.provider.clone(),
    };
    let outbound = outbound::prepare(&state.config.outbound, &tls)
        .map_err(|es| es.iter().map(ToString::to_string).collect::<Vec<String>>())?;
    Ok((
        snapshot,
        outbound
            .iter()
            .map(outbound::PreparedOutbound::tls_config)
            .collect(),
    ))
}

/// Sets `gatehouse_cert_expiry_timestamp_seconds` for the leaf and every bundle root, and
/// `gatehouse_crl_next_update_timestamp_seconds` for every CRL.
pub fn publish_expiry(metrics: &Metrics, snap: &Snapshot) {
    metrics.publish_crls(&snap.credentials.crl_set);
    let g = &metrics.cert_expiry;
    g.reset();
    g.with_label_values(&["leaf"])
        .set(snap.credentials.not_after.unix_timestamp());
    for root in &snap.credentials.bundle {
        if let Some((serial, not_after)) = serial_and_expiry(root) {
            let label = format!("root:{}", &serial[..serial.len().min(16)]);
            g.with_label_values(&[label.as_str()])
                .set(not_after.unix_timestamp());
        }
    }
}

/// Serial (hex), not-after of a certificate.
pub fn serial_and_expiry(cert: &CertificateDer<'_>) -> Option<(String, OffsetDateTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some((
        hex::encode(c.raw_serial()),
        c.validity().not_after.to_datetime(),
    ))
}

fn validity(cert: Option<&CertificateDer<'_>>) -> Option<(OffsetDateTime, OffsetDateTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert?.as_ref()).ok()?;
    Some((
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_names_the_changed_kinds_and_a_vanished_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = |n: &str| dir.path().join(n);
        for n in ["c", "k", "b", "p"] {
            std::fs::write(f(n), n).expect("write");
        }
        let paths = [Some(f("c")), Some(f("k")), Some(f("b")), None, Some(f("p"))];
        let a = Fingerprint::read(&paths);
        assert!(Fingerprint::read(&paths).changed(&a).is_empty());
        std::fs::write(f("k"), "new").expect("write");
        std::fs::remove_file(f("p")).expect("rm");
        assert_eq!(Fingerprint::read(&paths).changed(&a), vec!["key", "policy"]);
    }
}
