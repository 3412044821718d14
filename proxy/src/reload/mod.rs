//! Hot reload and rotation.
//!
//! # Reload and rotation
//!
//! **Triggers.** Three ways, all ending in `Reloader::reload`:
//! - file events (notify/inotify) on the *directories* holding the certificate, key, bundle,
//!   CRL and policy files, debounced by `[reload] debounce` (default 75 ms). Directories, not
//!   files: `ca rotate` and kubelet publish a new version by renaming a `..data` symlink, and
//!   `write + rename` replaces the inode a file watch would be attached to;
//! - a polling fallback every `[reload] poll_interval` (default 2 s) for file systems without
//!   events (some network and overlay mounts) and for events lost under load;
//! - `SIGHUP`, which reloads even when nothing changed (ignored once shutdown started).
//!
//! Whatever the trigger, the files are read (once, with [`crate::input::read`]: regular files
//! only, size limits, never blocking on a FIFO), hashed (SHA-256), and compared with the
//! content the *serving* snapshot was built from, not with what was last seen: an input
//! refused once is still pending until a snapshot with it serves. Nothing happens when
//! nothing differs, or when only contents already refused differ (except on SIGHUP). The
//! differing kinds label `gatehouse_reloads_total{what,result}`.
//!
//! **Partial apply.** The inputs form three groups that are applied or refused together:
//! trust (bundle, CRL), policy, and identity (cert, key). When the whole set does not
//! validate, the largest set of changed groups that validates together with the serving
//! rest is applied, trust first, then policy: a typo in `policy.toml` cannot hold back a
//! revocation, and a broken certificate rotation cannot hold back a policy edit. What is
//! refused stays visibly refused until its file changes again or goes back to the serving
//! content: `gatehouse_reload_input_refused{what}` is 1, `/status` `reload.refused` names the
//! file, since when and why, and the `reload refused` log line says what was applied.
//!
//! **Deadline.** One attempt (read, build, validate) runs on the blocking pool under
//! [`RELOAD_DEADLINE`]. One that overruns it is logged (`reload stuck`), counted
//! (`gatehouse_reloads_total{what="all",result="timeout"}`), flagged
//! (`gatehouse_reload_stuck` 1, `/status` `reload.stuck_since`), and no new attempt starts
//! until it has finished (its result is then discarded and the files are read again), so a
//! hung file system cannot pile up blocked threads.
//!
//! **Validation.** A reload builds a whole new [`Snapshot`](crate::state::Snapshot) through the same code as startup
//! ([`State::build_snapshot`]: credentials, policy, the inbound `ServerConfig` and every
//! outbound `ClientConfig`), so it checks everything startup checks: every file reads and
//! parses, the key matches the certificate, the leaf is an X.509-SVID, chains to the (new)
//! bundle and has not expired, the CRL parses, the policy compiles and is for our trust domain,
//! the outbound TLS configurations build. In addition no issuer's CRL may go back to a lower
//! CRL number, and the SPIFFE ID must be the running one unless
//! `[reload] allow_identity_change = true` (DANGEROUS: a sidecar that silently becomes
//! another workload defeats every policy written about it). On any failure the old snapshot
//! stays, the reason is logged (`reload refused`, with the trigger, the changed kinds and every
//! error) and `gatehouse_reloads_total{result="error"}` counts it. The reasons stay typed
//! (`reload::error::ReloadError`: the startup `LoadError`s, a CRL rollback, an identity
//! change) until the log line and `/status` render them.
//!
//! **Swap.** The new snapshot is swapped in atomically (`State::swap`): new inbound
//! handshakes use its `ServerConfig` (a fresh one, so a fresh session cache, whenever the
//! bundle or CRL changed or on SIGHUP: no session verified under an old bundle or CRL resumes;
//! a resumed peer is re-verified anyway, see [`crate::tls::verify`]; a reload that leaves
//! trust alone keeps the running `ServerConfig` and its sessions), both TLS roles present the
//! new certificate, and every request, including those on open keep-alive and HTTP/2
//! connections, is decided by the new policy. Outbound pools read their entry's
//! `ClientConfig` from the current snapshot whenever they dial
//! ([`crate::outbound::tls_source`]); when the bundle or CRL changed (or on SIGHUP) the swap
//! also starts a new *trust generation*, and pooled outbound connections opened under an
//! older one are not reused: requests in flight finish, new ones go over new handshakes.
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

mod apply;
mod error;
mod expiry;
mod status;
#[cfg(test)]
mod tests;
mod watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::identity::IdentityHandle;
use crate::input::{Inputs, WATCHED};
use crate::metrics::Metrics;
use crate::signal::Shutdown;
use crate::state::{State, watched_paths, with_material};
use crate::tls::crl::StaleReport;
use apply::{Attempt, attempt};
pub(crate) use expiry::{publish_expiry, serial_and_expiry};
pub(crate) use status::ReloadStatus;

/// How long one reload attempt (reading the watched files, building and validating a
/// snapshot) may take before it is reported stuck. Reading is bounded by the size limits and
/// building takes milliseconds, so only a hung file system (NFS, FUSE) gets near it.
pub(crate) const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

/// How an attempt reads the watched files: [`Inputs::read`] (tests slow it down).
type ReadInputs = fn(&[Option<PathBuf>; 5]) -> Inputs;

/// Watches the files and reloads the snapshot; one per sidecar, run by [`Reloader::run`].
pub(crate) struct Reloader {
    state: Arc<State>,
    metrics: Metrics,
    paths: [Option<PathBuf>; 5],
    /// The inputs the serving snapshot was built from.
    served: Inputs,
    status: Arc<Mutex<ReloadStatus>>,
    deadline: Duration,
    read: ReadInputs,
    /// An attempt that overran the deadline and has not finished yet.
    stuck: Option<JoinHandle<Attempt>>,
    warned_serial: Option<String>,
    crl_report: StaleReport,
    /// The online identity (`[identity] ca = …`): its SVID, key, bundle and CRLs are inputs
    /// held in memory, and each new one triggers a reload.
    online: Option<IdentityHandle>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for `state`; `served` the files the current snapshot was built from (what
    /// changes are compared with). Publishes the expiry metrics of the current snapshot.
    pub(crate) fn new(state: Arc<State>, metrics: Metrics, served: Inputs) -> Self {
        let paths = watched_paths(&state.config);
        for kind in WATCHED.iter().zip(&paths).filter(|(_, p)| p.is_some()) {
            metrics
                .reload_input_refused
                .with_label_values(&[kind.0.label()])
                .set(0);
        }
        let mut r = Self {
            state,
            metrics,
            paths,
            served,
            status: Arc::default(),
            deadline: RELOAD_DEADLINE,
            read: Inputs::read,
            stuck: None,
            warned_serial: None,
            crl_report: StaleReport::default(),
            online: None,
        };
        let snap = r.state.snapshot();
        publish_expiry(&r.metrics, &snap);
        r.check_lifetime(&snap);
        r.check_crls(&snap);
        r
    }

    /// Follows an online identity: every new [`crate::identity::Material`] (renewal, bundle,
    /// CRLs) is an input change, validated and applied like a changed file.
    pub(crate) fn follow(mut self, identity: IdentityHandle) -> Self {
        self.online = Some(identity);
        self
    }

    /// What `/status` shows under `reload`.
    pub(crate) fn status(&self) -> Arc<Mutex<ReloadStatus>> {
        self.status.clone()
    }

    fn with_status<T>(&self, f: impl FnOnce(&mut ReloadStatus) -> T) -> T {
        let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Runs until shutdown starts: file events (debounced), the polling fallback, and SIGHUP
    /// (`hangup`, installed before anything was bound; ignored while draining).
    pub(crate) async fn run(mut self, mut hangup: tokio::signal::unix::Signal, shutdown: Shutdown) {
        let cfg = self.state.config.reload.clone();
        let (tx, mut events) = mpsc::unbounded_channel::<()>();
        let _watcher = if cfg.watch { self.watch(tx) } else { None };
        let mut poll = tokio::time::interval(cfg.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await; // the first tick is immediate
        let mut material = self.online.as_ref().map(IdentityHandle::subscribe);
        if let Some(m) = material.as_mut() {
            m.mark_unchanged(); // the first snapshot was built from the current one
        }
        loop {
            let new_material = async {
                match material.as_mut() {
                    Some(m) => m.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.token().cancelled() => break,
                true = new_material => self.reload(Trigger::Identity).await,
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

    /// Reads the files and applies what differs from the serving snapshot and validates
    /// (always rebuilds on SIGHUP).
    async fn reload(&mut self, trigger: Trigger) {
        if !self.unstuck() {
            debug!(
                trigger = trigger.as_str(),
                "a stuck reload attempt is still running: not starting another"
            );
            return;
        }
        let signal = matches!(trigger, Trigger::Signal);
        // Files still being written while we read them (a writer that is not atomic, or a
        // `..data` swap between reading cert.pem and key.pem) would give a spurious refusal:
        // read again, after the debounce, until the files held still during an attempt.
        let debounce = self.state.config.reload.debounce;
        let mut tries = 0;
        let outcome = loop {
            tries += 1;
            let (state, paths, served) =
                (self.state.clone(), self.paths.clone(), self.served.clone());
            let refused =
                self.with_status(|s| s.refused.each_ref().map(|r| r.as_ref().map(|r| r.digest)));
            let read = self.read;
            let material = self.online.as_ref().and_then(IdentityHandle::current);
            let job = tokio::task::spawn_blocking(move || {
                let read =
                    |paths: &_| with_material(read(paths), &state.config, material.as_deref());
                attempt(&read, &state, &paths, &served, refused, signal)
            });
            let Some(outcome) = self.within_deadline(job).await else {
                return;
            };
            if outcome.settled || tries >= 3 {
                break outcome;
            }
            debug!(tries, "files changed during the reload: reading again");
            tokio::time::sleep(debounce).await;
        };
        self.finish(trigger, outcome);
    }

    /// Waits for an attempt up to the deadline; past it the attempt is reported stuck.
    async fn within_deadline(&mut self, mut job: JoinHandle<Attempt>) -> Option<Attempt> {
        match tokio::time::timeout(self.deadline, &mut job).await {
            Ok(Ok(outcome)) => Some(outcome),
            Ok(Err(e)) => {
                warn!(error = %e, "reload attempt failed: keeping the current certificates and policy");
                None
            }
            Err(_) => {
                let now = OffsetDateTime::now_utc();
                self.metrics
                    .reloads
                    .with_label_values(&["all", "timeout"])
                    .inc();
                self.metrics.reload_stuck.set(1);
                self.with_status(|s| {
                    s.stuck_since = Some(now);
                    s.last_attempt = Some(now);
                    s.last_result = Some("timeout");
                });
                warn!(
                    deadline_s = self.deadline.as_secs_f64(),
                    paths = ?self.paths.iter().flatten().collect::<Vec<_>>(),
                    "reload stuck: reading and validating the watched files took longer than the \
                     deadline; keeping the current certificates and policy, and starting no other \
                     reload until it finishes: check the file system holding these files"
                );
                self.stuck = Some(job);
                None
            }
        }
    }

    /// Whether no attempt is stuck (any more); clears the stuck state once it finished.
    fn unstuck(&mut self) -> bool {
        let Some(job) = &self.stuck else {
            return true;
        };
        if !job.is_finished() {
            return false;
        }
        self.stuck = None;
        self.metrics.reload_stuck.set(0);
        self.with_status(|s| s.stuck_since = None);
        info!(
            "the stuck reload attempt finished: its result is discarded, reading the files again"
        );
        true
    }
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    Watch,
    Poll,
    Signal,
    /// New material from the online CA.
    Identity,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Watch => "file_event",
            Self::Poll => "poll",
            Self::Signal => "SIGHUP",
            Self::Identity => "identity",
        }
    }
}
