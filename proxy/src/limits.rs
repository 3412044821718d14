//! Per-caller overload limits (`[[limit]]` in the policy file): the budgets behind
//! [`gatehouse_policy::Policy::limits_for`].
//!
//! One budget per (limit, caller identity): a concurrency counter and a GCRA token bucket
//! (the "theoretical arrival time" form of a token bucket: one `AtomicU64`, updated with a
//! compare-and-swap, no lock). A limit written for a pattern therefore gives every matching
//! identity its own budget, and one caller's excess never spends another caller's budget.
//!
//! Budgets live in a sharded map per limit (a short `Mutex` per shard, held for the lookup
//! only). Memory is bounded: identities are bounded by the certificates the trust domain issued,
//! but a map keyed by what a peer presents is bounded anyway, at `max_identities` per limit
//! (default [`DEFAULT_MAX_IDENTITIES`]). When a shard is full, budgets at rest (nothing in
//! flight, bucket full) are dropped, which loses no state; if every budget is busy the request
//! is refused as overloaded (fail closed: the limit exists to protect the app).
//!
//! The limiter is built from one compiled policy and replaced with it on reload (budgets start
//! full again; in-flight guards keep their old counters alive until they finish).
//!
//! Asked by the inbound request path (`crate::inbound::request`) once the policy allowed a
//! request; the limiter sits in the snapshot next to the policy it was built from.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_policy::{Policy, Route, SpiffeId};

/// Budgets kept per limit before idle ones are dropped and busy ones refuse newcomers.
pub(crate) const DEFAULT_MAX_IDENTITIES: usize = 65_536;

/// The `retry-after` of an over-concurrency refusal: in-flight requests have no schedule, so a
/// short fixed hint.
pub(crate) const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

const SHARDS: usize = 16;

/// What [`Limiter::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Within every applicable limit; hold the guard while the request is in flight.
    Allow(LimitGuard),
    /// Over a rate: answer 429 with `retry-after`, audit reason `rate_limited`.
    RateLimited {
        /// When a token will be available.
        retry_after: Duration,
        /// Index of the limit in [`Policy::limits`].
        limit: usize,
    },
    /// Over a concurrency bound (or the budget table is full of busy callers): answer 503 with
    /// `retry-after`, audit reason `overloaded`.
    Overloaded {
        /// A hint for the client.
        retry_after: Duration,
        /// Index of the limit in [`Policy::limits`].
        limit: usize,
    },
}

impl Admission {
    /// `"allowed"`, `"rate_limited"` or `"overloaded"`: the audit reason and metric label
    /// (the request path takes them from [`crate::outcome::Outcome`]).
    #[cfg(test)]
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Allow(_) => "allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::Overloaded { .. } => "overloaded",
        }
    }

    /// The `retry-after` header value in whole seconds (at least 1), `None` when allowed.
    pub(crate) fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Allow(_) => None,
            Self::RateLimited { retry_after, .. } | Self::Overloaded { retry_after, .. } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
                    .map(|s| s.max(1))
            }
        }
    }
}

/// One identity's budget under one limit.
#[derive(Debug, Default)]
struct Budget {
    in_flight: AtomicU32,
    /// GCRA theoretical arrival time, nanoseconds since the limiter's epoch.
    tat: AtomicU64,
}

impl Budget {
    /// Whether dropping it loses nothing: nothing in flight and a full bucket.
    fn at_rest(&self, now: u64) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.tat.load(Ordering::Acquire) <= now
    }
}

/// The state of one `[[limit]]`.
#[derive(Debug)]
struct LimitState {
    concurrency: Option<u32>,
    /// (interval, tolerance = interval × burst), nanoseconds.
    gcra: Option<(u64, u64)>,
    shards: Vec<Mutex<HashMap<Box<str>, Arc<Budget>>>>,
    per_shard: usize,
}

/// The budgets of every limit of one compiled policy.
#[derive(Debug)]
pub(crate) struct Limiter {
    epoch: Instant,
    hasher: RandomState,
    limits: Vec<LimitState>,
}

/// A short list kept inline (no allocation for the usual one or two limits per request).
#[derive(Debug)]
struct Inline<T> {
    inline: [Option<T>; 2],
    more: Vec<T>,
}

impl<T> Default for Inline<T> {
    fn default() -> Self {
        Inline {
            inline: [None, None],
            more: Vec::new(),
        }
    }
}

impl<T> Inline<T> {
    fn push(&mut self, v: T) {
        match self.inline.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(v),
            None => self.more.push(v),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.inline.iter().flatten().chain(self.more.iter())
    }
}

/// Releases the concurrency it holds when dropped (when the response is done).
#[derive(Debug, Default)]
pub(crate) struct LimitGuard {
    held: Inline<Arc<Budget>>,
}

impl LimitGuard {
    fn hold(&mut self, b: Arc<Budget>) {
        self.held.push(b);
    }

    /// Whether it holds no concurrency budget (dropping it releases nothing).
    pub(crate) fn is_empty(&self) -> bool {
        self.held.iter().next().is_none()
    }

    /// How many concurrency budgets it holds.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.iter().count()
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        for b in self.held.iter() {
            b.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Limiter {
    /// The budgets for `policy`'s limits, at most [`DEFAULT_MAX_IDENTITIES`] identities each.
    pub(crate) fn new(policy: &Policy) -> Limiter {
        Self::with_max_identities(policy, DEFAULT_MAX_IDENTITIES)
    }

    /// As [`Limiter::new`] with another bound on identities per limit.
    pub(crate) fn with_max_identities(policy: &Policy, max_identities: usize) -> Limiter {
        let per_shard = max_identities.div_ceil(SHARDS).max(1);
        let limits = policy
            .limits()
            .iter()
            .map(|l| LimitState {
                concurrency: l.concurrency(),
                gcra: l.rate().map(|r| {
                    let t = nanos(r.interval()).max(1);
                    (t, t.saturating_mul(u64::from(r.burst)))
                }),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                per_shard,
            })
            .collect();
        Limiter {
            epoch: Instant::now(),
            hasher: RandomState::new(),
            limits,
        }
    }

    /// Decides whether a request from `caller` decided by `route` fits its limits, now.
    /// `policy` must be the policy this limiter was built from.
    pub(crate) fn admit(
        &self,
        policy: &Policy,
        caller: &SpiffeId,
        route: Option<&Route>,
    ) -> Admission {
        self.admit_at(policy, caller, route, Instant::now())
    }

    /// [`Limiter::admit`] at a given time (tests drive the clock).
    pub(crate) fn admit_at(
        &self,
        policy: &Policy,
        caller: &SpiffeId,
        route: Option<&Route>,
        now: Instant,
    ) -> Admission {
        let now = nanos(now.saturating_duration_since(self.epoch));
        let mut guard = LimitGuard::default();
        // Tokens taken so far, returned if a later limit refuses: a refused request spends
        // nothing.
        let mut refunds: Inline<(Arc<Budget>, u64)> = Inline::default();
        for (i, _) in policy.limits_for(caller, route) {
            let Some(state) = self.limits.get(i) else {
                continue;
            };
            let Some(budget) = self.budget(state, caller.as_str(), now) else {
                refund(&refunds);
                return Admission::Overloaded {
                    retry_after: OVERLOADED_RETRY_AFTER,
                    limit: i,
                };
            };
            if let Some((interval, tolerance)) = state.gcra {
                if let Err(wait) = take_token(&budget, now, interval, tolerance) {
                    refund(&refunds);
                    return Admission::RateLimited {
                        retry_after: Duration::from_nanos(wait),
                        limit: i,
                    };
                }
                refunds.push((Arc::clone(&budget), interval));
            }
            if let Some(max) = state.concurrency {
                let before = budget.in_flight.fetch_add(1, Ordering::AcqRel);
                if before >= max {
                    budget.in_flight.fetch_sub(1, Ordering::AcqRel);
                    refund(&refunds);
                    return Admission::Overloaded {
                        retry_after: OVERLOADED_RETRY_AFTER,
                        limit: i,
                    };
                }
                guard.hold(budget);
            }
        }
        Admission::Allow(guard)
    }

    /// The budget of `id` under `state`, created at rest; `None` when the shard is full of
    /// busy budgets.
    fn budget(&self, state: &LimitState, id: &str, now: u64) -> Option<Arc<Budget>> {
        let shard = &state.shards[(self.hasher.hash_one(id) as usize) % SHARDS];
        let mut map = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = map.get(id) {
            return Some(Arc::clone(b));
        }
        if map.len() >= state.per_shard {
            map.retain(|_, b| !b.at_rest(now));
            if map.len() >= state.per_shard {
                return None;
            }
        }
        let b = Arc::new(Budget::default());
        map.insert(id.into(), Arc::clone(&b));
        Some(b)
    }

    /// How many identities hold a budget under limit `i` (for tests).
    #[cfg(test)]
    pub(crate) fn identities(&self, i: usize) -> usize {
        self.limits.get(i).map_or(0, |s| {
            s.shards
                .iter()
                .map(|m| {
                    m.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .len()
                })
                .sum()
        })
    }
}

/// GCRA: takes one token or returns how long until one is available (nanoseconds).
fn take_token(b: &Budget, now: u64, interval: u64, tolerance: u64) -> Result<(), u64> {
    let mut tat = b.tat.load(Ordering::Acquire);
    loop {
        let new_tat = tat.max(now).saturating_add(interval);
        let ahead = new_tat - now;
        if ahead > tolerance {
            return Err(ahead - tolerance);
        }
        match b
            .tat
            .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Ok(()),
            Err(seen) => tat = seen,
        }
    }
}

fn refund(taken: &Inline<(Arc<Budget>, u64)>) {
    for (b, interval) in taken.iter() {
        let _ = b
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(*interval))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"
api-gateway    = "spiffe://fintech.internal/api-gateway"

[[route]]
name  = "export"
path  = "/export"
allow = ["*"]

[[route]]
name  = "api"
path  = "/api/**"
allow = ["*"]

[[limit]]
caller      = "*"
concurrency = 2
rate        = "10/s"

[[limit]]
caller = "report-service"
route  = "export"
rate   = "1/s"
"#;

    fn setup() -> (Policy, Limiter) {
        let p = Policy::parse("p.toml", POLICY).unwrap();
        let l = Limiter::new(&p);
        (p, l)
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://fintech.internal/{s}")).unwrap()
    }

    fn route<'p>(p: &'p Policy, name: &str) -> Option<&'p Route> {
        p.routes().iter().find(|r| r.name() == name)
    }

    #[test]
    fn rate_allows_a_burst_then_429_with_retry_after_then_refills() {
        let (p, l) = setup();
        let rs = id("report-service");
        let t0 = Instant::now();
        let api = route(&p, "api");
        // Burst 10, each released immediately (concurrency is not the bound here).
        for _ in 0..10 {
            assert!(matches!(l.admit_at(&p, &rs, api, t0), Admission::Allow(_)));
        }
        let refused = l.admit_at(&p, &rs, api, t0);
        let Admission::RateLimited { retry_after, limit } = refused else {
            panic!("expected rate_limited, got {refused:?}");
        };
        assert_eq!(limit, 0);
        assert_eq!(
            retry_after,
            Duration::from_millis(100),
            "one token per 100 ms"
        );
        assert_eq!(refused.retry_after_secs(), Some(1));
        assert_eq!(refused.reason(), "rate_limited");
        // A token is back after 100 ms, one only.
        let t1 = t0 + Duration::from_millis(100);
        assert!(matches!(l.admit_at(&p, &rs, api, t1), Admission::Allow(_)));
        assert!(matches!(
            l.admit_at(&p, &rs, api, t1),
            Admission::RateLimited { .. }
        ));
    }

    #[test]
    fn concurrency_is_released_when_the_guard_drops() {
        let (p, l) = setup();
        let gw = id("api-gateway");
        let now = Instant::now();
        let api = route(&p, "api");
        let a = l.admit_at(&p, &gw, api, now);
        let b = l.admit_at(&p, &gw, api, now);
        assert!(matches!(
            (&a, &b),
            (Admission::Allow(_), Admission::Allow(_))
        ));
        let c = l.admit_at(&p, &gw, api, now);
        assert!(matches!(c, Admission::Overloaded { limit: 0, .. }), "{c:?}");
        assert_eq!(c.retry_after_secs(), Some(1));
        assert_eq!(c.reason(), "overloaded");
        drop(a);
        assert!(matches!(l.admit_at(&p, &gw, api, now), Admission::Allow(_)));
    }

    #[test]
    fn one_callers_excess_never_spends_another_callers_budget() {
        let (p, l) = setup();
        let (rs, gw) = (id("report-service"), id("api-gateway"));
        let now = Instant::now();
        let api = route(&p, "api");
        // report-service takes its two slots and its whole bucket, then keeps pushing.
        let held: Vec<_> = (0..2).map(|_| l.admit_at(&p, &rs, api, now)).collect();
        for _ in 0..50 {
            assert!(!matches!(
                l.admit_at(&p, &rs, api, now),
                Admission::Allow(_)
            ));
        }
        // The same `*` limit gives api-gateway its own, untouched budget.
        let gw_held: Vec<_> = (0..2).map(|_| l.admit_at(&p, &gw, api, now)).collect();
        assert!(gw_held.iter().all(|a| matches!(a, Admission::Allow(_))));
        drop(gw_held);
        for _ in 0..8 {
            assert!(matches!(l.admit_at(&p, &gw, api, now), Admission::Allow(_)));
        }
        assert_eq!(l.identities(0), 2);
        drop(held);
    }

    #[test]
    fn a_refused_request_spends_nothing() {
        let (p, l) = setup();
        let rs = id("report-service");
        let now = Instant::now();
        let export = route(&p, "export");
        // The `*` limit (10/s) and the export limit (1/s) both apply; the second refuses.
        let first = l.admit_at(&p, &rs, export, now);
        let Admission::Allow(g) = first else {
            panic!("{first:?}")
        };
        assert_eq!(g.held(), 1, "only the `*` limit bounds concurrency");
        drop(g);
        for _ in 0..20 {
            assert!(matches!(
                l.admit_at(&p, &rs, export, now),
                Admission::RateLimited { limit: 1, .. }
            ));
        }
        // The refusals above gave their `*` tokens back: 9 are left on another route.
        let api = route(&p, "api");
        for _ in 0..9 {
            assert!(matches!(l.admit_at(&p, &rs, api, now), Admission::Allow(_)));
        }
        assert!(matches!(
            l.admit_at(&p, &rs, api, now),
            Admission::RateLimited { limit: 0, .. }
        ));
    }

    #[test]
    fn memory_is_bounded_idle_budgets_are_dropped_busy_ones_refuse_newcomers() {
        let p = Policy::parse("p.toml", POLICY).unwrap();
        let l = Limiter::with_max_identities(&p, SHARDS); // one budget per shard
        let now = Instant::now();
        let api = route(&p, "api");
        // Many identities one after another, each at rest after its request (the 10/s bucket
        // refills within the second we step): the table never grows past its bound.
        for i in 0..200u64 {
            let t = now + Duration::from_secs(i);
            assert!(matches!(
                l.admit_at(&p, &id(&format!("w{i}")), api, t),
                Admission::Allow(_)
            ));
        }
        assert!(l.identities(0) <= SHARDS);
        // Busy identities (requests in flight) are kept; a newcomer whose shard is full of
        // busy budgets is refused as overloaded.
        let later = now + Duration::from_secs(1_000);
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..400u64 {
            match l.admit_at(&p, &id(&format!("b{i}")), api, later) {
                a @ Admission::Allow(_) => held.push(a),
                Admission::Overloaded { .. } => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(held.len(), SHARDS);
        assert_eq!(refused, 400 - SHARDS);
    }

    #[test]
    fn concurrent_callers_never_exceed_concurrency() {
        let (p, l) = setup();
        let p = Arc::new(p);
        let l = Arc::new(l);
        let peak = Arc::new(AtomicU32::new(0));
        let live = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (p, l, peak, live) = (p.clone(), l.clone(), peak.clone(), live.clone());
                std::thread::spawn(move || {
                    let gw = id("api-gateway");
                    for k in 0..2_000u64 {
                        // Far apart in time so the rate never binds.
                        let t = Instant::now() + Duration::from_secs(k);
                        if let Admission::Allow(g) = l.admit_at(&p, &gw, route(&p, "api"), t) {
                            let n = live.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(n, Ordering::SeqCst);
                            live.fetch_sub(1, Ordering::SeqCst);
                            drop(g);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 2);
    }
}
