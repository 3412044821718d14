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
//! and retires its open connections ([`crate::outbound::upstream::Upstream::retire_all`]):
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::LoadError;
use crate::input::{Inputs, WATCHED};
use crate::metrics::Metrics;
use crate::outbound::upstream::Upstream;
use crate::outbound::{self, OutboundTls};
use crate::signal::Shutdown;
use crate::state::{Snapshot, State, watched_paths};
use crate::tls::crl::StaleReport;

/// How long one reload attempt (reading the watched files, building and validating a
/// snapshot) may take before it is reported stuck. Reading is bounded by the size limits and
/// building takes milliseconds, so only a hung file system (NFS, FUSE) gets near it.
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

// Bits of the watched inputs, in `WATCHED` order.
const CERT: u8 = 1 << 0;
const KEY: u8 = 1 << 1;
const BUNDLE: u8 = 1 << 2;
const CRL: u8 = 1 << 3;
const POLICY: u8 = 1 << 4;

/// Inputs applied or refused together, in order of preference when not all of them can be
/// applied: trust (revocation) first, then authorization, then our own certificate.
const GROUPS: [u8; 3] = [BUNDLE | CRL, POLICY, CERT | KEY];

/// Which combinations of `GROUPS` to try, by index, most groups first, then by preference.
const COMBINATIONS: [&[usize]; 7] = [&[0, 1, 2], &[0, 1], &[0, 2], &[1, 2], &[0], &[1], &[2]];

/// The `what` labels of the inputs in `mask`.
fn kinds(mask: u8) -> Vec<&'static str> {
    (0..WATCHED.len())
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| WATCHED[i].label())
        .collect()
}

/// The input masks to try for the changed inputs `pending`: each combination of the groups
/// that hold a changed input, in the order of [`COMBINATIONS`].
fn candidates(pending: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for combination in COMBINATIONS {
        if combination.iter().all(|g| GROUPS[*g] & pending != 0) {
            out.push(combination.iter().fold(0, |m, g| m | GROUPS[*g]) & pending);
        }
    }
    out
}

/// One refused input: which content, since when, why.
#[derive(Debug, Clone)]
struct Refused {
    digest: [u8; 32],
    path: PathBuf,
    since: OffsetDateTime,
    errors: Vec<String>,
}

/// What the reloader reports on `/status` (`reload`).
#[derive(Debug, Default)]
pub struct ReloadStatus {
    refused: [Option<Refused>; 5],
    last_attempt: Option<OffsetDateTime>,
    last_result: Option<&'static str>,
    stuck_since: Option<OffsetDateTime>,
}

impl ReloadStatus {
    /// `{"last_attempt", "last_result", "stuck_since", "refused": [{"what", "path", "since",
    /// "errors"}]}`; times in RFC 3339.
    pub fn to_json(&self) -> serde_json::Value {
        let time = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
        let refused: Vec<serde_json::Value> = self
            .refused
            .iter()
            .zip(WATCHED)
            .filter_map(|(r, kind)| {
                let r = r.as_ref()?;
                Some(serde_json::json!({
                    "what": kind.label(),
                    "path": r.path.display().to_string(),
                    "since": time(Some(r.since)),
                    "errors": r.errors,
                }))
            })
            .collect();
        serde_json::json!({
            "last_attempt": time(self.last_attempt),
            "last_result": self.last_result,
            "stuck_since": time(self.stuck_since),
            "refused": refused,
        })
    }
}

/// One attempt's result, computed on the blocking pool.
struct Attempt {
    /// The files as read.
    inputs: Inputs,
    /// The inputs whose content differs from the serving one.
    pending: u8,
    /// What to apply; `None` when nothing is new since the last attempt.
    plan: Option<Plan>,
    /// The files did not change while the attempt ran.
    settled: bool,
}

/// What an attempt decided.
struct Plan {
    /// The inputs the new snapshot takes from disk (the rest keep their serving content).
    applied: u8,
    /// The snapshot to swap in (`None`: nothing applies).
    built: Option<Prepared>,
    /// Why the rest was refused (empty when everything applied).
    errors: Vec<String>,
}

/// Reads the files and decides what to apply (blocking: runs on the blocking pool).
fn attempt(
    read: ReadInputs,
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
    let mut errors: Option<Vec<String>> = None;
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
                errors.get_or_insert(e);
            }
        }
    }
    let built = if signal {
        prepare(state, served)
            .map_err(|e| errors.get_or_insert(e).clone())
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

/// How an attempt reads the watched files: [`Inputs::read`] (tests slow it down).
type ReadInputs = fn(&[Option<PathBuf>; 5]) -> Inputs;

/// Watches the files and reloads the snapshot; one per sidecar, run by [`Reloader::run`].
pub struct Reloader {
    state: Arc<State>,
    metrics: Metrics,
    upstreams: Vec<Vec<Arc<Upstream>>>,
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
    /// per event loop for each entry); `served` the files the current snapshot was built from
    /// (what changes are compared with). Publishes the expiry metrics of the current snapshot.
    pub fn new(
        state: Arc<State>,
        metrics: Metrics,
        upstreams: Vec<Vec<Arc<Upstream>>>,
        served: Inputs,
    ) -> Self {
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
            upstreams,
            paths,
            served,
            status: Arc::default(),
            deadline: RELOAD_DEADLINE,
            read: Inputs::read,
            stuck: None,
            warned_serial: None,
            crl_report: StaleReport::default(),
        };
        let snap = r.state.snapshot();
        publish_expiry(&r.metrics, &snap);
        r.check_lifetime(&snap);
        r.check_crls(&snap);
        r
    }

    /// What `/status` shows under `reload`.
    pub fn status(&self) -> Arc<Mutex<ReloadStatus>> {
        self.status.clone()
    }

    fn with_status<T>(&self, f: impl FnOnce(&mut ReloadStatus) -> T) -> T {
        let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
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
            let job = tokio::task::spawn_blocking(move || {
                attempt(read, &state, &paths, &served, refused, signal)
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

    /// Records an attempt (metrics, `/status`, log) and swaps in what it built.
    fn finish(&mut self, trigger: Trigger, att: Attempt) {
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
                errors = %plan.errors.join("; "),
                "reload refused: keeping the serving version of the refused files{}",
                if plan.applied != 0 { " and applying the rest" } else { "" }
            );
        }
        let Some((snapshot, outbound_tls)) = plan.built else {
            return;
        };
        self.served = self.served.with(&inputs, plan.applied);
        let signal = matches!(trigger, Trigger::Signal);
        let trust_changed = plan.applied & (BUNDLE | CRL) != 0 || signal;
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

    /// Sets `gatehouse_reload_input_refused{what}` from the refused inputs.
    fn publish_refused(&self) {
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

/// A new snapshot and the outbound TLS configurations.
type Prepared = (Snapshot, Vec<Arc<rustls::ClientConfig>>);

/// Builds and validates a snapshot from `inputs` and the outbound TLS configurations; the
/// errors rendered one per string.
fn prepare(state: &State, inputs: &Inputs) -> Result<Prepared, Vec<String>> {
    let render = |es: Vec<LoadError>| es.iter().map(ToString::to_string).collect::<Vec<_>>();
    let snapshot = state.build_snapshot(inputs).map_err(render)?;
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
    fn candidates_try_every_changed_group_then_trust_first() {
        assert!(candidates(0).is_empty());
        assert_eq!(candidates(POLICY), vec![POLICY]);
        assert_eq!(
            candidates(CRL | POLICY),
            vec![CRL | POLICY, CRL, POLICY],
            "trust alone before policy alone"
        );
        assert_eq!(
            candidates(CERT | CRL | POLICY),
            vec![
                CERT | CRL | POLICY,
                CRL | POLICY,
                CERT | CRL,
                CERT | POLICY,
                CRL,
                POLICY,
                CERT
            ]
        );
        // Cert and key are one group, as are bundle and CRL: never applied apart.
        assert_eq!(candidates(KEY | BUNDLE), vec![KEY | BUNDLE, BUNDLE, KEY]);
        assert_eq!(kinds(CERT | POLICY), vec!["cert", "policy"]);
    }

    /// A sidecar state over files minted by our CA, with a CRL and a policy.
    fn state(dir: &Path) -> (Arc<State>, Inputs) {
        use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType};
        use gatehouse_policy::{SpiffeId, TrustDomain};
        let ca = Authority::init(
            &dir.join("ca"),
            &InitOptions {
                trust_domain: TrustDomain::parse("reload.test").expect("td"),
                key_type: KeyType::EcdsaP256,
                ttl: Duration::from_secs(86400),
                intermediate: false,
            },
        )
        .expect("ca init");
        let svid = ca
            .issue(&IssueRequest {
                spiffe_id: SpiffeId::parse("spiffe://reload.test/app").expect("id"),
                dns: vec![],
                ttl: Duration::from_secs(3600),
            })
            .expect("issue");
        svid.write_to(&dir.join("certs")).expect("write");
        std::fs::write(
            dir.join("policy.toml"),
            "version = 1\ntrust_domain = \"reload.test\"\n\n[[route]]\nname = \"all\"\n\
             path = \"/**\"\nallow = [\"*\"]\n",
        )
        .expect("policy");
        let config = "[identity]\ncert = \"certs/cert.pem\"\nkey = \"certs/key.pem\"\n\
             bundle = \"certs/bundle.pem\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
             app = \"127.0.0.1:1\"\npolicy = \"policy.toml\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n";
        let config =
            crate::config::Config::parse(config, &dir.join("sidecar.toml")).expect("config");
        let (state, inputs) = State::load(config).expect("state");
        (Arc::new(state), inputs)
    }

    fn slow_read(paths: &[Option<PathBuf>; 5]) -> Inputs {
        std::thread::sleep(Duration::from_millis(600));
        Inputs::read(paths)
    }

    /// A reload attempt past its deadline is a visible error (log, metric, `/status`), no
    /// second attempt starts while it runs, and reloading resumes once it finished.
    #[tokio::test]
    async fn stuck_attempt_is_reported_and_blocks_no_later_reload() {
        let dir = tempfile::tempdir().expect("tmp");
        let (state, inputs) = state(dir.path());
        let metrics = Metrics::register().expect("metrics");
        let mut r = Reloader::new(state.clone(), metrics.clone(), Vec::new(), inputs);
        r.deadline = Duration::from_millis(100);
        r.read = slow_read;
        let status = r.status();
        let timeouts = || metrics.reloads.with_label_values(&["all", "timeout"]).get();

        r.reload(Trigger::Signal).await;
        assert_eq!(timeouts(), 1);
        assert_eq!(metrics.reload_stuck.get(), 1);
        let json = status.lock().expect("status").to_json();
        assert!(json["stuck_since"].is_string(), "{json}");
        assert_eq!(json["last_result"], "timeout");
        assert_eq!(state.generation(), 0);

        // Still running: no new attempt (none times out, nothing is swapped).
        r.reload(Trigger::Signal).await;
        assert_eq!(timeouts(), 1);
        assert!(r.stuck.is_some());

        // Once it finished, the next trigger reads again and reloads.
        let finished = tokio::time::timeout(Duration::from_secs(10), async {
            while !r.stuck.as_ref().is_some_and(JoinHandle::is_finished) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        finished.await.expect("the slow attempt finishes");
        r.read = Inputs::read;
        r.reload(Trigger::Signal).await;
        assert_eq!(metrics.reload_stuck.get(), 0);
        assert!(status.lock().expect("status").to_json()["stuck_since"].is_null());
        assert_eq!(state.generation(), 1);
        assert_eq!(metrics.reloads.with_label_values(&["none", "ok"]).get(), 1);
    }
}
