//! Request balancing over the endpoints of one outbound (issue 15).
//!
//! - **Pick**: power of two choices over the eligible endpoints: two distinct endpoints drawn at
//!   random, the one with the lower load wins, load = peak-EWMA latency × (outstanding + 1)
//!   (linkerd2-proxy's `linkerd/pool/p2c` and `PeakEwma` are
//!   the model; this is our own code). Two draws instead of a scan keep a pick O(1) and avoid
//!   the herd a global "least loaded" choice causes when many callers see the same numbers.
//! - **Slow start**: an endpoint that was just added (or just came back from ejection) has its
//!   weight ramp from 10 % to 100 % over `slow_start` (default 5 s): it enters a draw's duel
//!   with that probability (Envoy's slow start scales the weight the same way), so a fresh JVM
//!   is not flooded and still gets its growing share at any load.
//! - **Outlier ejection**: `eject_after` consecutive connect/TLS failures or gateway errors
//!   (502/503/504 from the peer sidecar) eject the endpoint for a back-off that doubles with
//!   every ejection in a row (`ejection_base` … `ejection_max`, default 1 s … 15 s); a success
//!   resets it. After the back-off the endpoint is eligible again (warming up); its next failure
//!   ejects it again at once.
//! - **Panic mode**: when every endpoint is ejected, the balancer uses them all rather than
//!   failing every request; [`Balancer::status`] says so.
//! - **Draining**: an endpoint DNS no longer returns is never picked again; requests in flight
//!   finish, and it leaves the set (its connection dropped) when the last one is done.
//!
//! Generic over the connection type `C`, so the outbound holds a `Balancer<Upstream>`.
//! Wired into outbound in the next step (issue 15).

pub mod discover;
mod ewma;
pub mod retry;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use ewma::PeakEwma;
pub use retry::RetryBudget;

/// Balancer settings. Defaults: [`BalanceConfig::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Ramp-up of a new (or returning) endpoint's share; `ZERO` turns slow start off.
    pub slow_start: Duration,
    /// Consecutive failures that eject an endpoint.
    pub eject_after: u32,
    /// First ejection's length; doubles with each ejection in a row.
    pub ejection_base: Duration,
    /// Longest ejection.
    pub ejection_max: Duration,
    /// Decay time of the latency average.
    pub decay: Duration,
    /// Latency assumed for an endpoint before its first response while no endpoint has
    /// answered yet (afterwards the balancer's typical latency is assumed).
    pub default_rtt: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            slow_start: Duration::from_secs(5),
            eject_after: 3,
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(15),
            decay: Duration::from_secs(2),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// How a request on an endpoint ended, for health and latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response from the app (any status but a gateway error).
    Success,
    /// TCP connect or TLS handshake failed (including a peer that is not `server_id`).
    ConnectFailure,
    /// 502, 503 or 504 from the peer sidecar, or the connection broke mid-request.
    GatewayError,
}

/// One endpoint: its address, its connection, its load and health.
pub struct Endpoint<C> {
    addr: SocketAddr,
    conn: C,
    outstanding: AtomicU32,
    draining: AtomicBool,
    /// Nanoseconds since the balancer's epoch; 0 = not ejected.
    ejected_until: AtomicU64,
    /// When the current slow-start ramp began (added, or back from ejection), ns since epoch.
    warm_from: AtomicU64,
    health: Mutex<Health>,
    ewma: Mutex<PeakEwma>,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    /// Ejections since the last success (the back-off exponent).
    ejections: u32,
    total_ejections: u64,
}

impl<C> fmt::Debug for Endpoint<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("outstanding", &self.outstanding.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C> Endpoint<C> {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its connection (or pool).
    pub fn conn(&self) -> &C {
        &self.conn
    }
}

/// The balancer of one outbound.
pub struct Balancer<C> {
    config: BalanceConfig,
    epoch: Instant,
    endpoints: ArcSwap<Vec<Arc<Endpoint<C>>>>,
    /// Serializes updates (picks never take it).
    update: Mutex<()>,
    rng: AtomicU64,
    /// The latency of this balancer's responses (an average over every endpoint's samples,
    /// `f64` nanoseconds as bits; 0 before the first): an endpoint that has not answered yet
    /// is assumed to take this long. A fixed guess (30 ms) is wrong both ways: it made a slow
    /// endpoint look better than fast ones answering in 40 ms under load (a burst until its
    /// first slow answer), and a new one look 30 times worse than fast ones answering in 1 ms
    /// (no request at all).
    typical_rtt: AtomicU64,
}

impl<C> fmt::Debug for Balancer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("endpoints", &self.endpoints.load().len())
            .finish_non_exhaustive()
    }
}

/// No endpoint to send to (DNS never returned one, or every one left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no endpoint to send the request to: the name resolved to no address yet")]
pub struct NoEndpoints;

/// An endpoint picked for one request; records the outcome and latency when finished.
/// Dropping it unfinished (the request was cancelled) releases it without a sample.
pub struct Pick<C> {
    endpoint: Arc<Endpoint<C>>,
    started: Instant,
    done: bool,
}

impl<C> fmt::Debug for Pick<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("addr", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

impl<C> Pick<C> {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// The endpoint's connection.
    pub fn conn(&self) -> &C {
        &self.endpoint.conn
    }

    /// Starts the latency clock now: the time to open a connection (TCP, TLS) is not the
    /// endpoint's response latency, and a first request that paid for a handshake must not
    /// make the endpoint look slow for the whole decay time.
    pub fn sent(&mut self) {
        self.started = Instant::now();
    }

    /// Records how the request ended, now; `true` when this outcome ejected the endpoint.
    pub fn finish<B>(self, balancer: &Balancer<B>, outcome: Outcome) -> bool {
        let now = Instant::now();
        self.finish_at(balancer, outcome, now)
    }

    /// [`Pick::finish`] at a given time (tests drive the clock).
    pub fn finish_at<B>(mut self, balancer: &Balancer<B>, outcome: Outcome, now: Instant) -> bool {
        self.done = true;
        let ep = &self.endpoint;
        ep.outstanding.fetch_sub(1, Ordering::AcqRel);
        let latency = now.saturating_duration_since(self.started);
        ep.ewma
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_peak(latency, now);
        balancer.note_typical(latency);
        let mut h = ep.health.lock().unwrap_or_else(PoisonError::into_inner);
        if outcome == Outcome::Success {
            h.consecutive_failures = 0;
            h.ejections = 0;
            return false;
        }
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let now_ns = balancer.ns(now);
        let ejected = ep.ejected_until.load(Ordering::Acquire) > now_ns;
        if h.consecutive_failures >= balancer.config.eject_after && !ejected {
            let backoff = balancer.backoff(h.ejections);
            h.ejections = h.ejections.saturating_add(1);
            h.total_ejections += 1;
            let until = now_ns.saturating_add(nanos(backoff)).max(1);
            ep.ejected_until.store(until, Ordering::Release);
            ep.warm_from.store(until, Ordering::Release);
            tracing::warn!(
                endpoint = %ep.addr,
                ?outcome,
                failures = h.consecutive_failures,
                backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "endpoint ejected"
            );
            return true;
        }
        false
    }
}

impl<C> Drop for Pick<C> {
    fn drop(&mut self) {
        if !self.done {
            self.endpoint.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An endpoint's state in [`Balancer::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum EndpointState {
    /// Picked at full weight.
    Active,
    /// Ramping up after being added or coming back.
    Warming {
        /// Milliseconds until full weight.
        for_ms: u64,
    },
    /// Not picked (unless every endpoint is ejected).
    Ejected {
        /// Milliseconds until it is tried again.
        for_ms: u64,
    },
    /// Left DNS; finishing its in-flight requests.
    Draining,
}

impl EndpointState {
    /// `active`, `warming`, `ejected` or `draining`: the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Warming { .. } => "warming",
            Self::Ejected { .. } => "ejected",
            Self::Draining => "draining",
        }
    }
}

/// One endpoint in [`Balancer::status`].
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// Its address.
    pub addr: SocketAddr,
    /// Active, warming, ejected or draining.
    #[serde(flatten)]
    pub state: EndpointState,
    /// Requests in flight.
    pub outstanding: u32,
    /// The latency average (peak-EWMA, decayed to now), milliseconds; `None` before the first
    /// response.
    pub latency_ms: Option<f64>,
    /// Ejections since it was added.
    pub ejections: u64,
}

/// What `/status` shows of one balancer.
#[derive(Debug, Clone, Serialize)]
pub struct BalancerStatus {
    /// Every endpoint is ejected, so all of them are used.
    pub panic: bool,
    /// The endpoints, in the order they were added.
    pub endpoints: Vec<EndpointStatus>,
}

impl<C> Balancer<C> {
    /// An empty balancer; the seed makes its choices reproducible (tests); use
    /// [`Balancer::new`] otherwise.
    pub fn with_seed(config: BalanceConfig, seed: u64) -> Balancer<C> {
        Balancer {
            config,
            epoch: Instant::now(),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            update: Mutex::new(()),
            rng: AtomicU64::new(seed),
            typical_rtt: AtomicU64::new(0),
        }
    }

    /// An empty balancer seeded from the clock.
    pub fn new(config: BalanceConfig) -> Balancer<C> {
        let seed = nanos(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        Self::with_seed(config, seed ^ (std::process::id() as u64).rotate_left(32))
    }

    /// Its settings.
    pub fn config(&self) -> &BalanceConfig {
        &self.config
    }

    fn ns(&self, t: Instant) -> u64 {
        nanos(t.saturating_duration_since(self.epoch)).max(1)
    }

    fn backoff(&self, ejections: u32) -> Duration {
        let factor = 1u32.checked_shl(ejections.min(30)).unwrap_or(u32::MAX);
        self.config
            .ejection_base
            .saturating_mul(factor)
            .min(self.config.ejection_max)
    }

    /// splitmix64 on an atomic counter: lock-free, and reproducible with a fixed seed.
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Adds an endpoint (warming up), or takes back a draining one with the same address.
    pub fn add(&self, addr: SocketAddr, conn: C) {
        self.add_at(addr, conn, Instant::now());
    }

    /// [`Balancer::add`] at a given time.
    pub fn add_at(&self, addr: SocketAddr, conn: C, now: Instant) {
        let _g = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let cur = self.endpoints.load_full();
        if let Some(ep) = cur.iter().find(|e| e.addr == addr) {
            ep.draining.store(false, Ordering::Release);
            return;
        }
        let mut next: Vec<_> = cur.iter().cloned().collect();
        next.push(self.endpoint(addr, conn, now));
        self.endpoints.store(Arc::new(next));
    }

    /// Starts draining an endpoint: never picked again, it leaves when its last request ends.
    pub fn remove(&self, addr: SocketAddr) {
        if let Some(ep) = self.endpoints.load().iter().find(|e| e.addr == addr) {
            ep.draining.store(true, Ordering::Release);
        }
        self.prune();
    }

    /// Makes the set `addrs`: new addresses are added (`make` builds their connection), known
    /// ones stay (a draining one is taken back), missing ones drain. What discovery calls on
    /// every resolution.
    pub fn update(&self, addrs: &[SocketAddr], mut make: impl FnMut(SocketAddr) -> C) {
        let now = Instant::now();
        {
            let _g = self.update.lock().unwrap_or_else(PoisonError::into_inner);
            let mut next: Vec<_> = self.endpoints.load().iter().cloned().collect();
            for ep in &next {
                ep.draining
                    .store(!addrs.contains(&ep.addr), Ordering::Release);
            }
            for &a in addrs {
                if !next.iter().any(|e| e.addr == a) {
                    next.push(self.endpoint(a, make(a), now));
                }
            }
            self.endpoints.store(Arc::new(next));
        }
        self.prune();
    }

    fn endpoint(&self, addr: SocketAddr, conn: C, now: Instant) -> Arc<Endpoint<C>> {
        Arc::new(Endpoint {
            addr,
            conn,
            outstanding: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            warm_from: AtomicU64::new(self.ns(now)),
            health: Mutex::new(Health::default()),
            ewma: Mutex::new(PeakEwma::new(self.config.decay, now)),
        })
    }

    /// Drops drained endpoints with nothing in flight (their connections close).
    pub fn prune(&self) {
        let _g = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let cur = self.endpoints.load_full();
        let gone = |e: &Arc<Endpoint<C>>| {
            e.draining.load(Ordering::Acquire) && e.outstanding.load(Ordering::Acquire) == 0
        };
        if cur.iter().any(gone) {
            let next: Vec<_> = cur.iter().filter(|e| !gone(e)).cloned().collect();
            self.endpoints.store(Arc::new(next));
        }
    }

    /// Picks an endpoint for a request, now.
    ///
    /// # Errors
    /// [`NoEndpoints`] when the set is empty or every endpoint is draining.
    pub fn pick(&self) -> Result<Pick<C>, NoEndpoints> {
        self.pick_at(Instant::now(), None)
    }

    /// Picks an endpoint other than `not` (a retry goes to a different endpoint when there is
    /// one), at `now`.
    ///
    /// # Errors
    /// As [`Balancer::pick`].
    pub fn pick_at(&self, now: Instant, not: Option<SocketAddr>) -> Result<Pick<C>, NoEndpoints> {
        let eps = self.endpoints.load();
        let now_ns = self.ns(now);
        // Tiers, best first: healthy and not `not`; healthy; then (panic mode) every endpoint
        // not draining, preferring one other than `not`.
        let eligible = |e: &Endpoint<C>, tier: u8| {
            let usable = !e.draining.load(Ordering::Acquire);
            let healthy = usable && e.ejected_until.load(Ordering::Acquire) <= now_ns;
            let other = Some(e.addr) != not;
            match tier {
                0 => healthy && other,
                1 => healthy,
                2 => usable && other,
                _ => usable,
            }
        };
        for tier in 0..4u8 {
            let eligible = |e: &&Arc<Endpoint<C>>| eligible(e, tier);
            let n = eps.iter().filter(eligible).count();
            if n == 0 {
                continue;
            }
            let nth = |k: usize| eps.iter().filter(eligible).nth(k);
            let chosen = if n == 1 {
                nth(0)
            } else {
                let r = self.random();
                let a = (r % n as u64) as usize;
                let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (nth(a), nth(b));
                match (ea, eb) {
                    (Some(x), Some(y)) => Some(self.duel(x, y, now, now_ns)),
                    (x, y) => x.or(y),
                }
            };
            if let Some(ep) = chosen {
                ep.outstanding.fetch_add(1, Ordering::AcqRel);
                return Ok(Pick {
                    endpoint: Arc::clone(ep),
                    started: now,
                    done: false,
                });
            }
        }
        Err(NoEndpoints)
    }

    /// Folds one response's latency into the typical latency (a plain moving average, 1/16
    /// per sample; a lost race between two updates loses one sample, which is harmless).
    fn note_typical(&self, latency: Duration) {
        let s = latency.as_secs_f64() * 1e9;
        let cur = f64::from_bits(self.typical_rtt.load(Ordering::Relaxed));
        let next = if cur > 0.0 { cur + (s - cur) / 16.0 } else { s };
        self.typical_rtt
            .store(next.max(1.0).to_bits(), Ordering::Relaxed);
    }

    /// What an endpoint that has not answered yet is assumed to take: the typical latency of
    /// the endpoints that answered (no better, so a slow newcomer gets no burst; no worse, so a
    /// newcomer beside fast endpoints is not outbid forever), or `default_rtt` before any
    /// answer.
    fn unknown_rtt(&self) -> f64 {
        let typical = f64::from_bits(self.typical_rtt.load(Ordering::Relaxed));
        if typical > 0.0 {
            typical
        } else {
            self.config.default_rtt.as_secs_f64() * 1e9
        }
    }

    /// The power-of-two-choices duel: the lower load wins. A warming endpoint takes part only
    /// with a probability equal to its slow-start weight (otherwise the other one wins), so its
    /// share ramps from 10 % of a full one to all of it whatever the load. (Dividing the load by
    /// the weight instead made it lose every duel at low concurrency, where loads are equal.)
    fn duel<'e>(
        &self,
        x: &'e Arc<Endpoint<C>>,
        y: &'e Arc<Endpoint<C>>,
        now: Instant,
        now_ns: u64,
    ) -> &'e Arc<Endpoint<C>> {
        let (wx, wy) = (self.weight(x, now_ns), self.weight(y, now_ns));
        if wx < 1.0 || wy < 1.0 {
            #[allow(clippy::cast_precision_loss)]
            let coin = (self.random() >> 11) as f64 / (1u64 << 53) as f64;
            match (coin < wx, coin < wy) {
                (true, false) => return x,
                (false, true) => return y,
                _ => {}
            }
        }
        if self.load(x, now) <= self.load(y, now) {
            x
        } else {
            y
        }
    }

    /// Latency × (outstanding + 1).
    fn load(&self, e: &Endpoint<C>, now: Instant) -> f64 {
        let rtt = e
            .ewma
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_at(now)
            .unwrap_or_else(|| self.unknown_rtt())
            .max(1_000.0);
        rtt * f64::from(e.outstanding.load(Ordering::Acquire) + 1)
    }

    /// Slow-start weight in (0.1, 1].
    fn weight(&self, e: &Endpoint<C>, now_ns: u64) -> f64 {
        let ramp = nanos(self.config.slow_start);
        if ramp == 0 {
            return 1.0;
        }
        let age = now_ns.saturating_sub(e.warm_from.load(Ordering::Acquire));
        if age >= ramp {
            1.0
        } else {
            (age as f64 / ramp as f64).max(0.1)
        }
    }

    /// The endpoints and their state, for `/status` and the metrics.
    pub fn status(&self) -> BalancerStatus {
        self.status_at(Instant::now())
    }

    /// [`Balancer::status`] at a given time.
    pub fn status_at(&self, now: Instant) -> BalancerStatus {
        let eps = self.endpoints.load();
        let now_ns = self.ns(now);
        let ms = |ns: u64| ns / 1_000_000;
        let endpoints: Vec<EndpointStatus> = eps
            .iter()
            .map(|e| {
                let until = e.ejected_until.load(Ordering::Acquire);
                let warm_end = e
                    .warm_from
                    .load(Ordering::Acquire)
                    .saturating_add(nanos(self.config.slow_start));
                let state = if e.draining.load(Ordering::Acquire) {
                    EndpointState::Draining
                } else if until > now_ns {
                    EndpointState::Ejected {
                        for_ms: ms(until - now_ns),
                    }
                } else if warm_end > now_ns {
                    EndpointState::Warming {
                        for_ms: ms(warm_end - now_ns),
                    }
                } else {
                    EndpointState::Active
                };
                EndpointStatus {
                    addr: e.addr,
                    state,
                    outstanding: e.outstanding.load(Ordering::Acquire),
                    latency_ms: e
                        .ewma
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_at(now)
                        .map(|ns| ns / 1e6),
                    ejections: e
                        .health
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .total_ejections,
                }
            })
            .collect();
        let usable = endpoints
            .iter()
            .filter(|e| e.state != EndpointState::Draining)
            .count();
        let ejected = endpoints
            .iter()
            .filter(|e| matches!(e.state, EndpointState::Ejected { .. }))
            .count();
        BalancerStatus {
            panic: usable > 0 && ejected == usable,
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests;
