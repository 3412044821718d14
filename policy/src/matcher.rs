//! The compiled route table and [`Policy::decide`].
//!
//! Routes live in a segment trie: each node has its literal children in a hash map, at most
//! one `*` child, and two terminals: routes whose pattern ends exactly here and routes whose
//! pattern ends here with `/**`. A lookup walks the request path once, trying at each node the
//! literal child, then `*`, then `/**`, and backtracks only when a branch holds no route for
//! the method. So the first route found is the most specific one (literal > `*` > end of
//! pattern > `**`, segment by segment; then a route naming the method beats one that does not).
//! The work depends on the depth of the patterns (at most a literal and a `*` branch per
//! level), never on the number of routes: one hash lookup per segment in the common case. A
//! decision borrows everything it returns from the policy and allocates nothing.
//!
//! What is not here: parsing and validation (`compile.rs`), path normalization (`path.rs`).

use std::collections::HashMap;
use std::fmt;

use crate::compile::Policy;
use crate::identity::{IdentityPattern, SpiffeId};
use crate::source::Diagnostic;

/// The methods a route may name. Requests with other (extension) methods only match routes
/// that name no method.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// A set of [`METHODS`] as a bit mask; the empty set means "any method".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct MethodSet(pub(crate) u16);

impl MethodSet {
    /// The bit of a method name, if it is one of [`METHODS`] (exact, upper case).
    pub(crate) fn bit(method: &str) -> Option<u16> {
        METHODS.iter().position(|m| *m == method).map(|i| 1 << i)
    }

    pub(crate) fn is_any(self) -> bool {
        self.0 == 0
    }

    /// Whether a request with this method bit is matched (`None`: an extension method).
    pub(crate) fn admits(self, bit: Option<u16>) -> bool {
        self.is_any() || bit.is_some_and(|b| self.0 & b != 0)
    }

    /// Whether two routes with the same path and these method sets could never be told apart:
    /// both match any method, or both name a common method. (A route naming the method beats
    /// an any-method one, so that pair is distinguishable.)
    pub(crate) fn conflicts(self, other: MethodSet) -> bool {
        (self.is_any() && other.is_any()) || self.0 & other.0 != 0
    }

    /// The method names, in [`METHODS`] order; empty for "any".
    pub(crate) fn names(self) -> impl Iterator<Item = &'static str> {
        METHODS
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, m)| *m)
    }
}

/// One segment of a compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Segment {
    /// Matches exactly this (normalized) segment.
    Literal(Box<str>),
    /// `*`: exactly one non-empty segment.
    Star,
    /// `**`, always last: any number of segments, including none.
    Rest,
}

/// Where something was written in the policy file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Loc {
    pub line: usize,
    pub col: usize,
}

/// One `allow` entry after alias resolution.
#[derive(Debug, Clone)]
pub struct AllowEntry {
    /// What the file says: an alias name, a SPIFFE ID, a pattern or `*`.
    pub(crate) written: String,
    pub(crate) pattern: IdentityPattern,
    pub(crate) loc: Loc,
}

impl AllowEntry {
    /// The entry as written in the file (an alias name or the pattern itself).
    pub fn written(&self) -> &str {
        &self.written
    }

    /// The identity pattern it stands for.
    pub fn pattern(&self) -> &IdentityPattern {
        &self.pattern
    }

    /// The line of the entry in the policy file.
    pub fn line(&self) -> usize {
        self.loc.line
    }
}

/// A compiled `[[route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in [`crate::Policy::routes`] (file order), the key of per-route tables.
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) methods: MethodSet,
    pub(crate) path: String,
    pub(crate) segments: Vec<Segment>,
    pub(crate) allow: Vec<AllowEntry>,
    pub(crate) loc: Loc,
    pub(crate) path_loc: Loc,
}

impl Route {
    /// The route's position in [`crate::Policy::routes`].
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// The route's `name`, as used in audit lines and metric labels.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path pattern as written (`/api/*/reports`, `/api/**`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The methods the route names; empty means any method.
    pub fn methods(&self) -> Vec<&'static str> {
        self.methods.names().collect()
    }

    /// The allow-list, in file order.
    pub fn allow(&self) -> &[AllowEntry] {
        &self.allow
    }

    /// The line of the route's table in the policy file.
    pub fn line(&self) -> usize {
        self.loc.line
    }

    /// The first allow entry admitting `caller`, if any.
    fn admitting(&self, caller: &SpiffeId) -> Option<&IdentityPattern> {
        self.allow
            .iter()
            .map(|a| &a.pattern)
            .find(|p| p.matches(caller))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let methods = if self.methods.is_any() {
            "*".to_owned()
        } else {
            self.methods().join(",")
        };
        write!(f, "`{}` ({methods} {})", self.name, self.path)
    }
}

/// Why a request was (or, in audit mode, would have been) denied.
#[derive(Debug, Clone, Copy)]
pub enum DenyReason<'p> {
    /// No route matches the method and path.
    NoRoute,
    /// The deciding route does not list the caller.
    NotAllowed {
        /// The route that decided.
        route: &'p Route,
    },
}

/// The outcome of [`Policy::decide`], borrowing the deciding route from the policy.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'p> {
    /// The deciding route admits the caller.
    Allow {
        /// The route that decided.
        route: &'p Route,
        /// The allow entry that admitted the caller.
        matched: &'p IdentityPattern,
    },
    /// Denied: the request must not reach the app.
    Deny {
        /// Why.
        reason: DenyReason<'p>,
    },
    /// Audit mode: the policy would deny, but the request is let through (and counted).
    AuditDeny {
        /// Why it would have been denied.
        reason: DenyReason<'p>,
    },
}

impl<'p> Decision<'p> {
    /// Whether the request may proceed: `Allow`, and `AuditDeny` in audit mode.
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Self::Deny { .. })
    }

    /// `"allow"`, `"deny"` or `"audit_deny"`, for metrics and audit lines.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allow",
            Self::Deny { .. } => "deny",
            Self::AuditDeny { .. } => "audit_deny",
        }
    }

    /// `"allowed"`, `"no_route"` or `"not_allowed"`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allowed",
            Self::Deny { reason } | Self::AuditDeny { reason } => match reason {
                DenyReason::NoRoute => "no_route",
                DenyReason::NotAllowed { .. } => "not_allowed",
            },
        }
    }

    /// The deciding route, `None` when no route matched.
    pub fn route(&self) -> Option<&'p Route> {
        match *self {
            Self::Allow { route, .. } => Some(route),
            Self::Deny { reason } | Self::AuditDeny { reason } => match reason {
                DenyReason::NoRoute => None,
                DenyReason::NotAllowed { route } => Some(route),
            },
        }
    }

    /// The deciding route's name, `None` when no route matched.
    pub fn route_name(&self) -> Option<&'p str> {
        self.route().map(|r| r.name.as_str())
    }

    /// The allow entry that admitted the caller (only for `Allow`).
    pub fn matched(&self) -> Option<&'p IdentityPattern> {
        match *self {
            Self::Allow { matched, .. } => Some(matched),
            _ => None,
        }
    }
}

/// The routes ending at a trie node: at most one per method (the compiler refuses overlaps)
/// and at most one for any method.
#[derive(Debug, Default)]
struct Terminal {
    by_method: Vec<(MethodSet, u32)>,
    any: Option<u32>,
}

impl Terminal {
    fn pick(&self, method: Option<u16>, exclude: Option<u32>) -> Option<u32> {
        let ok = |r: &u32| Some(*r) != exclude;
        self.by_method
            .iter()
            .find(|(set, r)| !set.is_any() && set.admits(method) && ok(r))
            .map(|(_, r)| *r)
            .or(self.any.filter(ok))
    }
}

#[derive(Debug, Default)]
struct Node {
    literals: HashMap<Box<str>, u32>,
    star: Option<u32>,
    /// Routes whose pattern ends exactly at this node.
    end: Terminal,
    /// Routes whose pattern ends with `/**` at this node.
    rest: Terminal,
}

/// The segment trie over a policy's routes.
#[derive(Debug)]
pub(crate) struct Matcher {
    nodes: Vec<Node>,
}

impl Matcher {
    /// Builds the trie; `routes` must already be free of indistinguishable pairs.
    pub(crate) fn build(routes: &[Route]) -> Self {
        let mut m = Self {
            nodes: vec![Node::default()],
        };
        for (i, route) in routes.iter().enumerate() {
            m.insert(route, i as u32);
        }
        m
    }

    fn insert(&mut self, route: &Route, index: u32) {
        let mut node = 0usize;
        let mut rest = false;
        for seg in &route.segments {
            let next = self.nodes.len() as u32;
            let child = match seg {
                Segment::Literal(lit) => {
                    *self.nodes[node].literals.entry(lit.clone()).or_insert(next)
                }
                Segment::Star => *self.nodes[node].star.get_or_insert(next),
                Segment::Rest => {
                    rest = true;
                    break;
                }
            };
            if child == next {
                self.nodes.push(Node::default());
            }
            node = child as usize;
        }
        let n = &mut self.nodes[node];
        let terminal = if rest { &mut n.rest } else { &mut n.end };
        if route.methods.is_any() {
            terminal.any = Some(index);
        } else {
            terminal.by_method.push((route.methods, index));
        }
    }

    /// The index of the most specific route matching `method` and `path` (already
    /// normalized), skipping `exclude`.
    ///
    /// A trailing slash is ignored: `/a/` is decided like `/a`. Express (non-strict routing,
    /// the default) and Spring MVC 5 (trailing-slash match) serve `/a/` with `/a`'s handler, so
    /// if `/a/` fell to a broader route such as `/**`, a caller that `/a`'s route refuses could
    /// reach that handler. The path forwarded to the app keeps its slash.
    pub(crate) fn find(&self, method: &str, path: &str, exclude: Option<u32>) -> Option<u32> {
        let rest = path.strip_prefix('/')?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let rest = if rest.is_empty() { None } else { Some(rest) };
        self.search(0, rest, MethodSet::bit(method), exclude)
    }

    /// `rest` is the unmatched part of the path without its leading `/`; `None` once every
    /// segment is consumed (`Some("")` is an empty segment, which normalized paths do not
    /// have and `*` does not match). Recursion
    /// depth is bounded by the depth of the trie, i.e. by the longest pattern in the policy.
    fn search(
        &self,
        node: usize,
        rest: Option<&str>,
        method: Option<u16>,
        ex: Option<u32>,
    ) -> Option<u32> {
        let n = &self.nodes[node];
        let Some(s) = rest else {
            return n.end.pick(method, ex).or_else(|| n.rest.pick(method, ex));
        };
        let (seg, next) = match s.split_once('/') {
            Some((seg, next)) => (seg, Some(next)),
            None => (s, None),
        };
        if let Some(&child) = n.literals.get(seg)
            && let Some(found) = self.search(child as usize, next, method, ex)
        {
            return Some(found);
        }
        if let Some(child) = n.star.filter(|_| !seg.is_empty())
            && let Some(found) = self.search(child as usize, next, method, ex)
        {
            return Some(found);
        }
        n.rest.pick(method, ex)
    }
}

impl Policy {
    /// Decides a request from an authenticated `caller` to `method` `normalized_path` (the
    /// output of [`crate::path::normalize`]). Allocates nothing.
    ///
    /// The most specific route matching the method and path decides: it allows the caller if
    /// one of its allow entries admits the caller. No matching route means deny. In audit mode
    /// a would-be denial is returned as [`Decision::AuditDeny`], which is allowed.
    ///
    /// `method` is matched exactly: refuse non-canonical spellings with
    /// [`crate::method::check`] first, as the sidecar and `policy test` do (here `get` is an
    /// extension method, which only any-method routes match).
    pub fn decide(&self, caller: &SpiffeId, method: &str, normalized_path: &str) -> Decision<'_> {
        let found = self.matcher.find(method, normalized_path, None);
        self.decision_for(found, caller)
    }

    /// The deciding route (skipping `exclude`) and whether its allow-list admits `caller`,
    /// ignoring audit mode: what review and diff reason about.
    pub(crate) fn enforced(
        &self,
        caller: &SpiffeId,
        method: &str,
        path: &str,
        exclude: Option<u32>,
    ) -> (Option<u32>, bool) {
        let found = self.matcher.find(method, path, exclude);
        let allowed = found.is_some_and(|i| {
            caller.is_member_of(&self.trust_domain)
                && self.routes[i as usize].admitting(caller).is_some()
        });
        (found, allowed)
    }

    pub(crate) fn decision_for(&self, found: Option<u32>, caller: &SpiffeId) -> Decision<'_> {
        let reason = match found.map(|i| &self.routes[i as usize]) {
            None => DenyReason::NoRoute,
            Some(route) => {
                // The verifier admits only our trust domain; checking again here keeps `"*"`
                // meaning "our trust domain" even if a caller of another one ever got this far.
                if caller.is_member_of(&self.trust_domain)
                    && let Some(matched) = route.admitting(caller)
                {
                    return Decision::Allow { route, matched };
                }
                DenyReason::NotAllowed { route }
            }
        };
        if self.audit {
            Decision::AuditDeny { reason }
        } else {
            Decision::Deny { reason }
        }
    }
}

/// Diagnostics for routes that could never be told apart: same path pattern and a method in
/// common. `routes` are in file order; the later route of each pair is reported.
pub(crate) fn indistinguishable(routes: &[Route], file: &str) -> Vec<Diagnostic> {
    let mut seen: HashMap<&[Segment], Vec<usize>> = HashMap::new();
    let mut out = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let earlier = seen.entry(&route.segments).or_default();
        if let Some(&j) = earlier
            .iter()
            .find(|&&j| routes[j].methods.conflicts(route.methods))
        {
            let other = &routes[j];
            out.push(Diagnostic {
                file: file.to_owned(),
                line: route.path_loc.line,
                col: route.path_loc.col,
                message: format!(
                    "route `{}` can never be told apart from route `{}` (line {}): same path `{}` and {}",
                    route.name,
                    other.name,
                    other.loc.line,
                    other.path,
                    common_methods(other.methods, route.methods),
                ),
                help: "merge the two routes into one, or give them different paths or methods"
                    .to_owned(),
            });
        }
        earlier.push(i);
    }
    out
}

fn common_methods(a: MethodSet, b: MethodSet) -> String {
    if a.is_any() && b.is_any() {
        return "both match any method".to_owned();
    }
    let both: Vec<_> = MethodSet(a.0 & b.0).names().collect();
    format!("both name {}", both.join(", "))
}
