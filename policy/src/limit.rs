//! `[[limit]]`: overload limits per caller, optionally per route, declared in the policy file so
//! reviewers see and diff them next to the access they bound.
//!
//! ```toml
//! [[limit]]
//! caller      = "report-service"       # alias, SPIFFE ID, pattern or "*"
//! route       = "report data export"   # optional: only requests this route decides
//! concurrency = 8                      # in-flight requests to the app
//! rate        = "50/s"                 # token bucket: 50 per second ("N/m": per minute)
//! burst       = 50                     # optional bucket size; default the rate's N
//! ```
//!
//! Semantics, the same in the sidecar and the CLI:
//! - every limit whose `caller` admits the request's identity and whose `route` is absent or is
//!   the deciding route applies; a request needs room in all of them;
//! - budgets are per identity: a limit written for a pattern (or an alias standing for one)
//!   gives every matching identity its own concurrency and its own bucket, so one caller's
//!   excess never spends another caller's budget;
//! - the compiled lookup ([`crate::Policy::limits_for`]) is a per-route list of candidate
//!   limits filtered by pattern: no allocation, well under a microsecond.
//!
//! The budgets themselves (counters, buckets) live in the sidecar; this module is pure.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use toml::Spanned;

use crate::compile::{Compiler, Policy};
use crate::file::RawLimit;
use crate::identity::{IdentityPattern, SpiffeId, TrustDomain};
use crate::matcher::{Loc, Route};

/// The largest `N` of a rate and the largest concurrency or burst: beyond it a limit bounds
/// nothing a sidecar could serve, and the arithmetic stays far from overflow.
pub const MAX_LIMIT_VALUE: i64 = 1_000_000;

/// A token-bucket rate: `tokens` per `per`, with a bucket of `burst` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rate {
    /// Tokens added per period.
    pub tokens: u32,
    /// The period: one second (`/s`) or one minute (`/m`).
    #[serde(serialize_with = "period_name")]
    pub per: Duration,
    /// The bucket size: how many requests may come at once after a quiet spell.
    pub burst: u32,
}

fn period_name<S: serde::Serializer>(per: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if per.as_secs() == 60 { "m" } else { "s" })
}

impl Rate {
    /// The time one token takes to come back: `per / tokens`.
    pub fn interval(&self) -> Duration {
        self.per / self.tokens.max(1)
    }

    /// Tokens per second, for comparing rates of different periods.
    pub fn per_second(&self) -> f64 {
        f64::from(self.tokens) / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per.as_secs() == 60 { "m" } else { "s" };
        write!(f, "{}/{unit}", self.tokens)
    }
}

/// A compiled `[[limit]]`.
#[derive(Debug, Clone)]
pub struct Limit {
    pub(crate) caller_written: String,
    pub(crate) caller: IdentityPattern,
    pub(crate) route: Option<(u32, String)>,
    pub(crate) concurrency: Option<u32>,
    pub(crate) rate: Option<Rate>,
    pub(crate) loc: Loc,
}

impl Limit {
    /// The caller as written (alias, ID, pattern or `*`).
    pub fn caller_written(&self) -> &str {
        &self.caller_written
    }

    /// The identity pattern the caller stands for.
    pub fn caller(&self) -> &IdentityPattern {
        &self.caller
    }

    /// The route it is restricted to, `None` for every route.
    pub fn route_name(&self) -> Option<&str> {
        self.route.as_ref().map(|(_, n)| n.as_str())
    }

    /// The most in-flight requests per identity, if bounded.
    pub fn concurrency(&self) -> Option<u32> {
        self.concurrency
    }

    /// The token-bucket rate per identity, if bounded.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// The line of the `[[limit]]` table.
    pub fn line(&self) -> usize {
        self.loc.line
    }

    /// `caller` (and ` on route` when restricted): how the CLI and the diff name a limit.
    pub fn key(&self) -> String {
        match self.route_name() {
            Some(r) => format!("{} on route `{r}`", self.caller),
            None => self.caller.to_string(),
        }
    }

    /// The bounds as text: `concurrency 8, rate 50/s (burst 50)`.
    pub fn bounds_text(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.concurrency {
            parts.push(format!("concurrency {c}"));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate {r} (burst {})", r.burst));
        }
        parts.join(", ")
    }
}

/// The compiled limits and their per-route index.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    pub(crate) list: Vec<Limit>,
    /// Per route index: the limits restricted to it followed by the ones for every route.
    by_route: Vec<Vec<u16>>,
    /// Limits for every route (what applies when no route decided).
    any_route: Vec<u16>,
}

impl Limits {
    fn build(list: Vec<Limit>, routes: usize) -> Limits {
        let idx = |i: usize| u16::try_from(i).unwrap_or(u16::MAX);
        let any_route: Vec<u16> = (0..list.len())
            .filter(|&i| list[i].route.is_none())
            .map(idx)
            .collect();
        let by_route = (0..routes)
            .map(|r| {
                let mut v: Vec<u16> = (0..list.len())
                    .filter(|&i| {
                        list[i]
                            .route
                            .as_ref()
                            .is_some_and(|(ri, _)| *ri as usize == r)
                    })
                    .map(idx)
                    .collect();
                v.extend_from_slice(&any_route);
                v
            })
            .collect();
        Limits {
            list,
            by_route,
            any_route,
        }
    }
}

impl Policy {
    /// Every `[[limit]]`, in file order; a limit's position here is its stable index within
    /// this compiled policy (the sidecar keys its budgets by it).
    pub fn limits(&self) -> &[Limit] {
        &self.limits.list
    }

    /// The limits that apply to a request from `caller` decided by `route` (`None` when no
    /// route matched), as `(index, limit)`. Allocates nothing.
    pub fn limits_for<'a>(
        &'a self,
        caller: &'a SpiffeId,
        route: Option<&Route>,
    ) -> impl Iterator<Item = (usize, &'a Limit)> + 'a {
        let candidates: &[u16] = match route {
            Some(r) => self
                .limits
                .by_route
                .get(r.index as usize)
                .map_or(&[], Vec::as_slice),
            None => &self.limits.any_route,
        };
        candidates.iter().filter_map(move |&i| {
            let l = &self.limits.list[usize::from(i)];
            l.caller.matches(caller).then_some((usize::from(i), l))
        })
    }
}

impl Compiler<'_> {
    pub(crate) fn limits(
        &mut self,
        raw: &[Spanned<RawLimit>],
        aliases: &[crate::Alias],
        td: Option<&TrustDomain>,
        routes: &[Route],
    ) -> Limits {
        let mut out: Vec<Limit> = Vec::new();
        let mut seen: HashMap<(String, Option<u32>), usize> = HashMap::new();
        for r in raw {
            let Some(limit) = self.limit(r, aliases, td, routes) else {
                continue;
            };
            let key = (
                limit.caller.to_string(),
                limit.route.as_ref().map(|(i, _)| *i),
            );
            if let Some(line) = seen.insert(key, limit.loc.line) {
                self.errors.push(crate::Diagnostic {
                    file: self.src.name().to_owned(),
                    line: limit.loc.line,
                    col: limit.loc.col,
                    message: format!(
                        "a limit for {} is already declared on line {line}",
                        limit.key()
                    ),
                    help: "merge the two [[limit]] tables into one (concurrency and rate may go together)"
                        .to_owned(),
                });
                continue;
            }
            out.push(limit);
        }
        Limits::build(out, routes.len())
    }

    fn limit(
        &mut self,
        raw: &Spanned<RawLimit>,
        aliases: &[crate::Alias],
        td: Option<&TrustDomain>,
        routes: &[Route],
    ) -> Option<Limit> {
        let span = raw.span();
        let r = raw.get_ref();
        let caller = match &r.caller {
            Some(c) => self.allow_entry(c, aliases, td),
            None => {
                self.error(
                    span.clone(),
                    "limit has no `caller`",
                    "add caller = \"<alias, spiffe:// ID or pattern>\"; use \"*\" to give every caller its own budget",
                );
                None
            }
        };
        let route = match &r.route {
            None => Some(None),
            Some(name) => match routes.iter().find(|rt| rt.name == *name.get_ref()) {
                Some(rt) => Some(Some((rt.index, rt.name.clone()))),
                None => {
                    let known: Vec<&str> = routes.iter().map(|rt| rt.name.as_str()).collect();
                    self.error(
                        name.span(),
                        format!("unknown route `{}` in limit", name.get_ref()),
                        format!(
                            "name a [[route]] of this file (routes: {}), or omit `route` to limit every route",
                            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                        ),
                    );
                    None
                }
            },
        };
        let concurrency = self.count(r.concurrency.as_ref(), "concurrency");
        let burst = self.count(r.burst.as_ref(), "burst");
        let rate = match &r.rate {
            None => Some(None),
            Some(text) => match parse_rate(text.get_ref()) {
                Ok((tokens, per)) => Some(Some(Rate {
                    tokens,
                    per,
                    burst: tokens,
                })),
                Err(problem) => {
                    self.error(
                        text.span(),
                        format!("bad rate `{}`: {problem}", text.get_ref()),
                        "write rate = \"N/s\" or \"N/m\" with N from 1 to 1000000, e.g. \"50/s\"",
                    );
                    None
                }
            },
        };
        let (caller, route, concurrency, burst, mut rate) =
            (caller?, route?, concurrency?, burst?, rate?);
        if let Some(b) = burst {
            match (&mut rate, &r.burst) {
                (Some(rate), _) => rate.burst = b,
                (None, Some(bs)) => {
                    self.error(
                        bs.span(),
                        "`burst` without `rate`",
                        "burst is the size of the rate's token bucket: add rate = \"N/s\", or remove burst",
                    );
                    return None;
                }
                (None, None) => {}
            }
        }
        if concurrency.is_none() && rate.is_none() {
            self.error(
                span,
                "limit bounds nothing: it has neither `concurrency` nor `rate`",
                "add concurrency = N (in-flight requests) and/or rate = \"N/s\"",
            );
            return None;
        }
        Some(Limit {
            caller_written: r.caller.as_ref()?.get_ref().clone(),
            caller,
            route,
            concurrency,
            rate,
            loc: self.loc(&span),
        })
    }

    /// A positive count (`concurrency`, `burst`); `Some(None)` when absent, `None` on error.
    fn count(&mut self, v: Option<&Spanned<i64>>, what: &str) -> Option<Option<u32>> {
        let Some(v) = v else { return Some(None) };
        match u32::try_from(*v.get_ref()) {
            Ok(n) if n >= 1 && i64::from(n) <= MAX_LIMIT_VALUE => Some(Some(n)),
            _ => {
                self.error(
                    v.span(),
                    format!("`{what}` must be from 1 to {MAX_LIMIT_VALUE}, not {}", v.get_ref()),
                    if *v.get_ref() == 0 {
                        format!("a {what} of 0 would refuse every request: to deny a caller, leave it out of the route's allow-list")
                    } else {
                        format!("write a positive {what}")
                    },
                );
                None
            }
        }
    }
}

/// Parses `N/s` or `N/m`.
pub(crate) fn parse_rate(s: &str) -> Result<(u32, Duration), &'static str> {
    let (n, unit) = s.split_once('/').ok_or("missing `/s` or `/m`")?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        _ => return Err("the unit must be `s` (per second) or `m` (per minute)"),
    };
    let n: u32 = n.trim().parse().map_err(|_| "N must be a whole number")?;
    if n == 0 {
        return Err("a rate of 0 would refuse every request");
    }
    if i64::from(n) > MAX_LIMIT_VALUE {
        return Err("N is larger than 1000000");
    }
    Ok((n, per))
}

/// How a limit changed between two policies (`policy diff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitChangeKind {
    /// A limit only the new policy has: narrowing.
    Added,
    /// A limit only the old policy has: widening.
    Removed,
    /// Some bound is higher (or gone) in the new policy: widening.
    Raised,
    /// Every changed bound is lower (or new) in the new policy: narrowing.
    Lowered,
}

/// One limit difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitChange {
    /// What happened.
    pub change: LimitChangeKind,
    /// The caller pattern and route, as [`Limit::key`].
    pub limit: String,
    /// The old bounds (`None` when added).
    pub old: Option<String>,
    /// The new bounds (`None` when removed).
    pub new: Option<String>,
}

impl LimitChangeKind {
    /// Whether the change lets a caller do more than before.
    pub fn widens(self) -> bool {
        matches!(self, Self::Removed | Self::Raised)
    }
}

/// Limits compared by caller pattern and route name.
pub(crate) fn diff(old: &Policy, new: &Policy) -> Vec<LimitChange> {
    let key = |l: &Limit| (l.caller.to_string(), l.route_name().map(str::to_owned));
    let mut out = Vec::new();
    for o in old.limits() {
        let n = new.limits().iter().find(|n| key(n) == key(o));
        let change = match n {
            None => Some(LimitChangeKind::Removed),
            Some(n) => compare(o, n),
        };
        if let Some(change) = change {
            out.push(LimitChange {
                change,
                limit: o.key(),
                old: Some(o.bounds_text()),
                new: n.map(Limit::bounds_text),
            });
        }
    }
    for n in new.limits() {
        if !old.limits().iter().any(|o| key(o) == key(n)) {
            out.push(LimitChange {
                change: LimitChangeKind::Added,
                limit: n.key(),
                old: None,
                new: Some(n.bounds_text()),
            });
        }
    }
    out.sort_by(|a, b| (a.change, &a.limit).cmp(&(b.change, &b.limit)));
    out
}

/// `None` when equal; `Raised` when any bound is higher or dropped.
fn compare(o: &Limit, n: &Limit) -> Option<LimitChangeKind> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    // `None` (unbounded) is the highest value.
    fn ord<T: PartialOrd>(o: Option<T>, n: Option<T>) -> std::cmp::Ordering {
        match (o, n) {
            (None, None) => Equal,
            (Some(_), None) => Greater,
            (None, Some(_)) => Less,
            (Some(a), Some(b)) => b.partial_cmp(&a).unwrap_or(Equal),
        }
    }
    let dims = [
        ord(o.concurrency, n.concurrency),
        ord(
            o.rate.map(|r| r.per_second()),
            n.rate.map(|r| r.per_second()),
        ),
        ord(o.rate.map(|r| r.burst), n.rate.map(|r| r.burst)),
    ];
    if dims.contains(&Greater) {
        Some(LimitChangeKind::Raised)
    } else if dims.contains(&Less) {
        Some(LimitChangeKind::Lowered)
    } else {
        None
    }
}
